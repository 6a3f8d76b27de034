//! `agentos daemon`: owns long-lived agents and serves the API (see [`api`] and [`routes`]) over
//! HTTP on a Unix socket only its user can open, and on TCP for those with its token. Each agent
//! is a thread of this process that owns one VMM child (see [`agent`]); the event loop (tokio)
//! only reads requests, hands them over and writes replies.

pub mod agent;
pub mod api;
mod arbiter;
mod carried;
pub mod client;
pub mod devices;
mod e2b;
mod files;
mod groups;
mod link;
mod metrics;
mod processes;
mod relay;
pub mod routes;
mod secret;
mod server;

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentos_protocol::InferRequest;
use agentos_protocol::peer::valid_peer_name;
use serde::Serialize;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::oneshot;

use self::agent::{Agent, AgentConfig, Job, Work};
use self::api::AgentInfo;
use self::api::{
    AgentState, ApiError, ControlCall, ErrorKind, ExecCall, FileRequest, FsCall, InferCall,
    LogsRequest, MetricsReply, PoolCreateRequest, PoolRequest, ProcessRequest, PsReply, Request,
    RestartPolicy, RmRequest, SnapshotRequest, SpawnRequest, StartCall, VersionReply, WatchRequest,
    WriteFileRequest,
};
use self::link::{Chunks, GuestLink};

/// A request answered with a stream, and the agent it goes to.
enum Streamed {
    File(GuestLink, String),
    Start(GuestLink, StartCall),
    Attach(GuestLink, u32),
    Watch(GuestLink, String, bool),
}
use crate::placement::{self, CarrierChoice, Placement, PlacementError};
use agentos_core::agent::pool::Spawner;
use agentos_core::agent::spec::{AgentRequest, AgentSpec, SpecError};
use agentos_core::agent::vm::{BootOptions, DEFAULT_BOOT_TIMEOUT};
use agentos_core::rundir::{self, RunDir, RunDirError};
use agentos_core::{cgroup, signals};
use agentos_image as image;

/// Agents one daemon keeps (running or not).
pub const MAX_AGENTS: usize = 64;
/// How often the event loop looks for a stop signal.
const SIGNAL_POLL: Duration = Duration::from_millis(200);
/// How often `spawn` with `wait` looks whether the agent is up.
const SPAWN_POLL: Duration = Duration::from_millis(100);

#[derive(clap::Args, Debug)]
pub struct DaemonArgs {
    #[command(flatten)]
    pub socket: SocketArg,
    /// Also serve the agents' figures as Prometheus text (`GET /metrics`, HTTP) on this Unix
    /// socket, for a metrics collector that should get nothing else.
    #[arg(long, value_name = "PATH")]
    pub metrics: Option<PathBuf>,
    /// Also serve the API on TCP at this address (e.g. 127.0.0.1:8080). Every request there
    /// carries `Authorization: Bearer TOKEN`: AGENTOS_API_TOKEN, else a token generated at start
    /// and written (mode 0600) beside the socket (`daemon.token` for `daemon.sock`), whose path
    /// is printed.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<std::net::SocketAddr>,
    /// Seconds a guest agent may leave a ping unanswered before its VM counts as hung.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub hang_timeout: u64,
}

/// Where the daemon's API socket is.
#[derive(clap::Args, Debug, Clone)]
pub struct SocketArg {
    /// The daemon's API socket (default: `daemon.sock` in the run-directory base:
    /// `/run/agentos` for root, else `$XDG_RUNTIME_DIR/agentos` or `/tmp/agentos-UID`).
    #[arg(long, env = "AGENTOS_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

impl SocketArg {
    pub fn path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| rundir::base_path().join("daemon.sock"))
    }

    /// The socket a client connects to. The default one lies in the run-directory base, which
    /// must be the user's own (see [`rundir::Base`]): in a base someone else made, the socket
    /// could be theirs, and would receive what the client asks of its agents.
    pub fn client_path(&self) -> Result<PathBuf, rundir::RunDirError> {
        if self.socket.is_none() {
            match rundir::Base::open(&rundir::base_path(), false) {
                Ok(_) => {}
                // No base yet: no daemon either, which connecting will say.
                Err(rundir::RunDirError::Io { source, .. })
                    if source.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(self.path())
    }
}

/// Requests and errors since the daemon started.
#[derive(Default)]
struct Counters {
    requests: Mutex<BTreeMap<&'static str, u64>>,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    clients: AtomicU64,
}

struct Daemon {
    agents: Mutex<BTreeMap<String, Agent>>,
    groups: Mutex<BTreeMap<String, groups::GroupEntry>>,
    /// Agents' logs; removed with the daemon.
    state: RunDir,
    hang_timeout: Duration,
    counters: Counters,
    stopping: AtomicBool,
    /// Warm pools of agents restored ahead of need.
    pools: Arc<Spawner>,
}

/// Why the daemon did not start (or stopped serving).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Placement(#[from] PlacementError),
    #[error("the carrier that runs the daemon ended: {0}")]
    CarrierEnded(String),
    #[error(transparent)]
    RunDirBase(#[from] RunDirError),
    #[error("cannot create {}", .0.display())]
    SocketDir(PathBuf, #[source] io::Error),
    #[error("a daemon already serves {}; stop it first, or pass --socket PATH", .0.display())]
    InUse(PathBuf),
    #[error("cannot remove the stale socket {}", .0.display())]
    Stale(PathBuf, #[source] io::Error),
    #[error("cannot listen on {}", .0.display())]
    Listen(PathBuf, #[source] io::Error),
    #[error("cannot listen on {0}; give --listen an address and a free port this host has")]
    ListenTcp(std::net::SocketAddr, #[source] io::Error),
    #[error(
        "AGENTOS_API_TOKEN must be 16 to 256 visible ASCII characters (no spaces); leave it unset to have one generated"
    )]
    BadToken,
    #[error("cannot write the API token to {}", .0.display())]
    Token(PathBuf, #[source] io::Error),
    #[error("cannot start the daemon: {0}")]
    Start(&'static str, #[source] io::Error),
}

pub fn run(args: &DaemonArgs) -> Result<i32, DaemonError> {
    if placement::decide(CarrierChoice::Auto)? == Placement::Carrier {
        return carried::run(args);
    }
    let listeners = Listeners::bind(args)?;
    let removed = rundir::remove_stale();
    cgroup::remove_stale(&cgroup::Layout::discover());
    if removed > 0 {
        tracing::info!(
            removed,
            "removed the run directories of agents of a dead process"
        );
    }
    let daemon = Arc::new(
        Daemon::new(
            RunDir::create("daemon")?,
            Duration::from_secs(args.hang_timeout),
        )
        .map_err(|e| DaemonError::Start("its pool thread", e))?,
    );
    listeners.announce();
    let files = listeners.files.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DaemonError::Start("its event loop", e))?;
    runtime
        .block_on(serve(
            daemon.clone(),
            listeners.api,
            listeners.metrics,
            listeners
                .tcp
                .map(|(listener, token)| (listener, token.token)),
        ))
        .map_err(|e| DaemonError::Start("its listeners", e))?;
    remove_files(&files);
    eprintln!("agentos daemon: every agent stopped; exiting");
    Ok(0)
}

/// What the daemon serves on, bound before it does anything else.
struct Listeners {
    path: PathBuf,
    api: std::os::unix::net::UnixListener,
    metrics: Option<std::os::unix::net::UnixListener>,
    tcp: Option<(std::net::TcpListener, ApiToken)>,
    /// What to remove when the daemon exits: the sockets, a generated token's file.
    files: Vec<PathBuf>,
}

impl Listeners {
    fn bind(args: &DaemonArgs) -> Result<Self, DaemonError> {
        let path = args.socket.path();
        let api = bind_private(&path)?;
        let mut files = vec![path.clone()];
        let metrics = args.metrics.as_deref().map(bind_private).transpose()?;
        files.extend(args.metrics.clone());
        // A token file beside the socket is a dead daemon's: this one owns the socket now.
        let token_path = path.with_extension("token");
        let _ = std::fs::remove_file(&token_path);
        let tcp = match args.listen {
            Some(address) => {
                let listener = std::net::TcpListener::bind(address)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .map_err(|e| DaemonError::ListenTcp(address, e))?;
                let token = api_token(&token_path)?;
                files.extend(token.file.clone());
                Some((listener, token))
            }
            None => None,
        };
        Ok(Self {
            path,
            api,
            metrics,
            tcp,
            files,
        })
    }

    /// Says where the daemon serves, once it does (scripts wait for the first line).
    fn announce(&self) {
        eprintln!(
            "agentos daemon: listening on {} (pid {})",
            self.path.display(),
            std::process::id()
        );
        if let Some((listener, token)) = &self.tcp {
            let address = listener
                .local_addr()
                .map_or_else(|_| "?".into(), |a| a.to_string());
            eprintln!(
                "agentos daemon: listening on http://{address} ({})",
                token.told()
            );
        }
    }
}

fn remove_files(files: &[PathBuf]) {
    for file in files {
        let _ = std::fs::remove_file(file);
    }
}

/// Binds a Unix socket only its owner can connect to. A socket left by a dead daemon is replaced;
/// one a live daemon serves is not. The default place is the run-directory base, made and
/// checked first (see [`rundir::base`]); a directory given with `--socket` is made with mode
/// 0700 when missing.
fn bind_private(path: &Path) -> Result<std::os::unix::net::UnixListener, DaemonError> {
    let base = rundir::base_path();
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) if dir == base => {
            rundir::base()?;
        }
        Some(dir) => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| DaemonError::SocketDir(dir.to_owned(), e))?;
        }
        None => {}
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(|e| DaemonError::Stale(path.to_owned(), e))?;
    }
    // Made with no permission for others at all, so there is no moment when they could connect.
    let listener = rundir::listen_private(path)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| DaemonError::Listen(path.to_owned(), e))?;
    Ok(listener)
}

/// The API's token for TCP clients.
struct ApiToken {
    token: Arc<str>,
    /// The file a generated token was written to, removed when the daemon exits.
    file: Option<PathBuf>,
}

impl ApiToken {
    fn told(&self) -> String {
        match &self.file {
            Some(file) => format!("token in {}", file.display()),
            None => "token: AGENTOS_API_TOKEN".into(),
        }
    }
}

/// AGENTOS_API_TOKEN, else a new token written to `path` (beside the socket, in a directory only
/// the daemon's user may enter).
fn api_token(path: &Path) -> Result<ApiToken, DaemonError> {
    if let Some(token) = std::env::var_os("AGENTOS_API_TOKEN") {
        let token = token.into_string().map_err(|_| DaemonError::BadToken)?;
        let visible = token.bytes().all(|b| b.is_ascii_graphic());
        if !visible || !(16..=256).contains(&token.len()) {
            return Err(DaemonError::BadToken);
        }
        return Ok(ApiToken {
            token: Arc::from(token),
            file: None,
        });
    }
    let write = || -> io::Result<String> {
        let mut bytes = [0u8; 32];
        use std::io::{Read, Write};
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        // Made anew (a stale one was removed), never through a link.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        writeln!(file, "{token}")?;
        Ok(token)
    };
    let token = write().map_err(|e| DaemonError::Token(path.to_owned(), e))?;
    Ok(ApiToken {
        token: Arc::from(token),
        file: Some(path.to_owned()),
    })
}

async fn serve(
    daemon: Arc<Daemon>,
    listener: std::os::unix::net::UnixListener,
    metrics: Option<std::os::unix::net::UnixListener>,
    tcp: Option<(std::net::TcpListener, Arc<str>)>,
) -> io::Result<()> {
    let mut sites = vec![server::Site {
        listener: server::Listener::Unix(UnixListener::from_std(listener)?),
        scope: server::Scope::Api,
    }];
    if let Some(metrics) = metrics {
        sites.push(server::Site {
            listener: server::Listener::Unix(UnixListener::from_std(metrics)?),
            scope: server::Scope::Metrics,
        });
    }
    if let Some((listener, token)) = tcp {
        sites.push(server::Site {
            listener: server::Listener::Tcp(TcpListener::from_std(listener)?, token),
            scope: server::Scope::Api,
        });
    }
    let arbiter = {
        let daemon = daemon.clone();
        std::thread::Builder::new()
            .name("arbiter".into())
            .spawn(move || {
                let mut arbiter = arbiter::Arbiter::default();
                while !daemon.stopping.load(Ordering::SeqCst) && !signals::interrupted() {
                    std::thread::sleep(arbiter::TICK);
                    daemon.arbitrate(&mut arbiter);
                }
            })?
    };
    server::serve(sites, daemon.clone(), server::Limits::DAEMON, interrupted()).await;
    daemon.stopping.store(true, Ordering::SeqCst);
    let _ = tokio::task::spawn_blocking(move || arbiter.join()).await;
    let agents: Vec<Agent> = std::mem::take(&mut *daemon.lock_agents())
        .into_values()
        .collect();
    eprintln!("agentos daemon: stopping {} agent(s)", agents.len());
    for agent in &agents {
        agent.request_stop();
    }
    let groups = std::mem::take(&mut *daemon.groups.lock().unwrap_or_else(|e| e.into_inner()));
    let pools = daemon.clone();
    tokio::task::spawn_blocking(move || {
        drop(agents);
        drop(groups);
        // Last: the pools' thread started the VMs of agents taken from pools.
        pools.pools.stop();
    })
    .await?;
    Ok(())
}

/// Completes once the daemon is told to stop (SIGINT, SIGTERM, SIGHUP).
async fn interrupted() {
    let mut tick = tokio::time::interval(SIGNAL_POLL);
    while !signals::interrupted() {
        tick.tick().await;
    }
}

fn to_value<T: Serialize>(value: &T) -> Result<serde_json::Value, ApiError> {
    serde_json::to_value(value).map_err(|e| ApiError::new(ErrorKind::Failed, e.to_string()))
}

/// The installed model bundles, as `agentos model ls --json` shows them.
fn models() -> api::ModelsReply {
    let (bundles, broken) = image::model::ModelStore::new(&image::default_cache_dir()).list();
    api::ModelsReply {
        models: bundles
            .into_iter()
            .map(|b| api::ModelInfo {
                dir: b.dir.display().to_string(),
                manifest: b.manifest,
            })
            .collect(),
        broken: broken.iter().map(|e| e.to_string()).collect(),
    }
}

fn unknown_agent(name: &str, agents: &BTreeMap<String, Agent>) -> ApiError {
    let known: Vec<&str> = agents.keys().map(String::as_str).collect();
    ApiError::new(
        ErrorKind::UnknownAgent,
        if known.is_empty() {
            format!("no agent named `{name}`: there are no agents (start one with `agentos spawn`)")
        } else {
            format!("no agent named `{name}` (agents: {})", known.join(", "))
        },
    )
}

impl server::Handler for Daemon {
    fn saved_sandboxes(&self) -> Option<PathBuf> {
        Some(self.state.join("saved-sandboxes"))
    }

    fn handle(
        &self,
        request: Request,
        deadline: Instant,
    ) -> impl Future<Output = Result<serde_json::Value, ApiError>> + Send {
        self.answer(request, deadline)
    }

    fn stream(&self, request: Request) -> impl Future<Output = Result<Chunks, ApiError>> + Send {
        self.count_request(request.op());
        let answered = match request {
            Request::ReadFile(FileRequest { name, path }) => {
                self.link(&name).map(|link| Streamed::File(link, path))
            }
            Request::Start(call) => self
                .link(&call.name.clone())
                .map(|link| Streamed::Start(link, call)),
            Request::Attach(ProcessRequest { name, pid }) => {
                self.link(&name).map(|link| Streamed::Attach(link, pid))
            }
            Request::Watch(WatchRequest {
                name,
                path,
                recursive,
            }) => self
                .link(&name)
                .map(|link| Streamed::Watch(link, path, recursive)),
            request => Err(ApiError::new(
                ErrorKind::BadRequest,
                format!("`{}` is answered whole, not streamed", request.op()),
            )),
        };
        async move {
            match answered? {
                Streamed::File(link, path) => link.read(path).await,
                Streamed::Start(link, call) => link.start_followed(call).await,
                Streamed::Attach(link, pid) => link.attach(pid).await,
                Streamed::Watch(link, path, recursive) => link.watch(path, recursive).await,
            }
        }
    }

    fn write_file(
        &self,
        request: WriteFileRequest,
        body: Chunks,
    ) -> impl Future<Output = Result<serde_json::Value, ApiError>> + Send {
        self.count_request("write_file");
        let files = self.link(&request.name);
        async move { files?.write(request, body).await }
    }

    fn count_error(&self, kind: ErrorKind) {
        *lock(&self.counters.errors)
            .entry(kind.as_str())
            .or_default() += 1;
    }

    fn count_client(&self) {
        self.counters.clients.fetch_add(1, Ordering::Relaxed);
    }
}

impl Daemon {
    fn new(state: RunDir, hang_timeout: Duration) -> io::Result<Self> {
        Ok(Self {
            agents: Mutex::new(BTreeMap::new()),
            groups: Mutex::new(BTreeMap::new()),
            state,
            hang_timeout,
            counters: Counters::default(),
            stopping: AtomicBool::new(false),
            pools: Arc::new(Spawner::start()?),
        })
    }

    fn count_request(&self, op: &'static str) {
        *lock(&self.counters.requests).entry(op).or_default() += 1;
    }

    /// A way to the running agent `name`'s guest agent of its own.
    fn link(&self, name: &str) -> Result<GuestLink, ApiError> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(ApiError::new(
                ErrorKind::ShuttingDown,
                "the daemon is stopping",
            ));
        }
        let (socket, cgroup) = self.with_agent(name, |agent| {
            agent.guest_socket().map(|s| (s, agent.cgroup()))
        })??;
        Ok(GuestLink {
            name: name.to_owned(),
            socket,
            cgroup,
        })
    }

    fn lock_agents(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Agent>> {
        self.agents.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers a request that must be done by `deadline` (see docs/api.md).
    async fn answer(
        &self,
        request: Request,
        deadline: Instant,
    ) -> Result<serde_json::Value, ApiError> {
        self.count_request(request.op());
        if self.stopping.load(Ordering::SeqCst) {
            return Err(ApiError::new(
                ErrorKind::ShuttingDown,
                "the daemon is stopping",
            ));
        }
        match request {
            Request::Version => to_value(&VersionReply {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                pid: std::process::id(),
            }),
            Request::Spawn(spawn) => self.spawn(spawn, deadline).await,
            Request::Ps => to_value(&PsReply {
                agents: self.lock_agents().values().map(Agent::info).collect(),
                pools: self.pools.info(),
            }),
            Request::Inspect(one) => to_value(&self.with_agent(&one.name, Agent::info)?),
            Request::Models => {
                let listed = tokio::task::spawn_blocking(models)
                    .await
                    .map_err(|e| ApiError::new(ErrorKind::Failed, e.to_string()))?;
                to_value(&listed)
            }
            Request::Exec(call) => self.exec(call, deadline).await,
            Request::Infer(call) => self.infer(call, deadline).await,
            Request::Logs(LogsRequest { name, offset }) => {
                let log = self.with_agent(&name, |a| a.config().log.clone())?;
                let read = tokio::task::spawn_blocking(move || agent::read_log(&log, offset))
                    .await
                    .map_err(|e| ApiError::new(ErrorKind::Failed, e.to_string()))?;
                to_value(&read.map_err(|e| {
                    ApiError::new(ErrorKind::Failed, format!("cannot read the log: {e}"))
                })?)
            }
            Request::Stop(stop) => {
                self.check_not_member(&stop.name, "stop")?;
                self.stop(&stop.name).await
            }
            Request::Rm(rm) => {
                self.check_not_member(&rm.name, "remove")?;
                self.rm(rm).await
            }
            Request::Pause(api::NameRequest { name }) => self.set_paused(&name, true).await,
            Request::Resume(api::NameRequest { name }) => self.set_paused(&name, false).await,
            Request::GroupUp(up) => self.group_up(up, deadline).await,
            Request::GroupDown(down) => self.group_down(&down.group).await,
            Request::GroupInput(input) => self.group_input(input, deadline).await,
            Request::Snapshot(request) => {
                self.check_not_member(&request.name, "save")?;
                self.save(request, deadline).await
            }
            Request::PoolCreate(request) => self.pool_create(request).await,
            Request::PoolRm(PoolRequest { name }) => {
                let pools = self.pools.clone();
                tokio::task::spawn_blocking(move || pools.remove(&name).map(|()| name))
                    .await
                    .map_err(|e| ApiError::new(ErrorKind::Failed, e.to_string()))?
                    .map_err(|e| ApiError::new(ErrorKind::Invalid, e.to_string()))
                    .and_then(|name| to_value(&serde_json::json!({ "removed": name })))
            }
            Request::Metrics => to_value(&MetricsReply {
                text: self.metrics_text(),
            }),
            Request::Fs(FsCall { name, op }) => self.link(&name)?.fs(op).await,
            Request::Start(call) if call.detach => {
                self.link(&call.name.clone())?.start_detached(call).await
            }
            Request::Processes(agent) => self.link(&agent.name)?.processes().await,
            Request::Control(ControlCall { name, pid, control }) => {
                self.link(&name)?.control(pid, control).await
            }
            // The server hands these to `stream` and `write_file`.
            request @ (Request::ReadFile(_)
            | Request::WriteFile(_)
            | Request::Start(_)
            | Request::Attach(_)
            | Request::Watch(_)) => Err(ApiError::new(
                ErrorKind::BadRequest,
                format!("`{}` streams and is not answered whole", request.op()),
            )),
        }
    }

    fn with_agent<T>(&self, name: &str, f: impl FnOnce(&Agent) -> T) -> Result<T, ApiError> {
        let agents = self.lock_agents();
        match agents.get(name) {
            Some(agent) => Ok(f(agent)),
            None => Err(unknown_agent(name, &agents)),
        }
    }

    async fn spawn(
        &self,
        mut request: SpawnRequest,
        deadline: Instant,
    ) -> Result<serde_json::Value, ApiError> {
        let name = request.name.clone();
        check_name(&name)?;
        let pool = request.pool.clone();
        if let Some(pool) = &pool {
            let others = request.from.is_some()
                || request.model.is_some()
                || request.vcpus.is_some()
                || request.memory_mib.is_some()
                || request.cpus.is_some()
                || request.cpuset.is_some()
                || request.pin
                || request.weight.is_some()
                || request.class.is_some()
                || request.queue
                || !request.devices.is_empty()
                || request.gpus.is_some();
            if others {
                return Err(ApiError::new(
                    ErrorKind::Invalid,
                    "a pool's agents are alike: give no from, model, vcpus, memory, slice or devices with pool".to_owned(),
                ));
            }
            let opts = self
                .pools
                .options(pool)
                .map_err(|e| ApiError::new(ErrorKind::Invalid, e.to_string()))?;
            request.from = opts.from.map(|p| p.display().to_string());
        }
        {
            let agents = self.lock_agents();
            if agents.contains_key(&name) {
                return Err(ApiError::new(
                    ErrorKind::DuplicateName,
                    format!(
                        "an agent named `{name}` exists already; pick another name, or `agentos rm {name}` first"
                    ),
                ));
            }
            if agents.len() >= MAX_AGENTS {
                return Err(ApiError::new(
                    ErrorKind::Invalid,
                    format!("this daemon keeps at most {MAX_AGENTS} agents; `agentos rm` some"),
                ));
            }
        }
        let wait = request.wait;
        let log = self.state.join(&format!("{name}.log"));
        let hang_timeout = self.hang_timeout;
        let mut config =
            tokio::task::spawn_blocking(move || agent_config(request, log, hang_timeout))
                .await
                .map_err(|e| ApiError::new(ErrorKind::Failed, e.to_string()))??;
        {
            let mut agents = self.lock_agents();
            // Checked again: another client may have taken the name meanwhile.
            if agents.contains_key(&name) {
                return Err(ApiError::new(
                    ErrorKind::DuplicateName,
                    format!("an agent named `{name}` exists already; pick another name"),
                ));
            }
            devices::admit(&agents, &mut config)?;
            let _ = std::fs::remove_file(&config.log);
            // A pool with none ready is a restore from its snapshot, by the agent's thread.
            let claimed = match &pool {
                Some(pool) => self
                    .pools
                    .claim(pool)
                    .map_err(|e| ApiError::new(ErrorKind::Invalid, e.to_string()))?,
                None => None,
            };
            let agent = match claimed {
                Some(vm) => Agent::spawn_with(config, vm),
                None => Agent::spawn(config),
            }
            .map_err(|e| {
                ApiError::new(ErrorKind::Failed, format!("cannot start the agent: {e}"))
            })?;
            agents.insert(name.clone(), agent);
        }
        tracing::info!(agent = name, "spawned");
        if wait {
            if !self
                .wait_until_booted(std::slice::from_ref(&name), deadline)
                .await
            {
                return Err(ApiError::new(
                    ErrorKind::TimedOut,
                    format!(
                        "agent `{name}` is still booting at the request's deadline; it goes on (see `agentos ps {name}`)"
                    ),
                ));
            }
            if self.with_agent(&name, Agent::was_refused)? {
                let agent = self.lock_agents().remove(&name);
                let info = agent.as_ref().map(Agent::info);
                tokio::task::spawn_blocking(move || drop(agent)).await.ok();
                return Err(ApiError::new(
                    ErrorKind::NoRoom,
                    info.and_then(|i| i.last_error)
                        .unwrap_or_else(|| "no room on this host".to_owned()),
                ));
            }
        }
        let info = self.with_agent(&name, Agent::info)?;
        if wait && info.state != AgentState::Running {
            return Err(ApiError::new(
                ErrorKind::Failed,
                format!(
                    "agent `{name}` did not come up: {}; see `agentos logs {name}`",
                    info.last_error.as_deref().unwrap_or(info.state.as_str())
                ),
            ));
        }
        to_value(&info)
    }

    /// Waits until none of the agents `names` is booting any more (up, failed or gone), or
    /// `until`; returns whether none is.
    async fn wait_until_booted(&self, names: &[String], until: Instant) -> bool {
        loop {
            let booting = {
                let agents = self.lock_agents();
                names.iter().any(|n| {
                    agents
                        .get(n)
                        .is_some_and(|a| a.state() == AgentState::Booting)
                })
            };
            if !booting {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(SPAWN_POLL).await;
        }
    }

    async fn exec(&self, call: ExecCall, deadline: Instant) -> Result<serde_json::Value, ApiError> {
        if call.run.program.is_empty() {
            return Err(ApiError::new(ErrorKind::Invalid, "exec needs a program"));
        }
        let (reply, answer) = oneshot::channel();
        let name = call.name.clone();
        let job = Job {
            deadline,
            work: Work::Exec(call, reply),
        };
        self.with_agent(&name, |a| a.submit(job))??;
        answer_of(&name, answer).await
    }

    async fn infer(
        &self,
        call: InferCall,
        deadline: Instant,
    ) -> Result<serde_json::Value, ApiError> {
        let name = call.name.clone();
        let model = self.with_agent(&name, |a| a.config().model.clone())?;
        let model = match (call.model, model) {
            (Some(asked), Some(own)) if asked != own => {
                return Err(ApiError::new(
                    ErrorKind::Invalid,
                    format!("agent `{name}` carries model `{own}`, not `{asked}`"),
                ));
            }
            (_, Some(own)) => own,
            (_, None) => {
                return Err(ApiError::new(
                    ErrorKind::Invalid,
                    format!(
                        "agent `{name}` carries no model; spawn one with `agentos spawn --name N --model M`"
                    ),
                ));
            }
        };
        if call.inputs.is_empty() {
            return Err(ApiError::new(
                ErrorKind::Invalid,
                "infer needs at least one input",
            ));
        }
        let request = InferRequest {
            id: 0,
            model,
            task: call.task,
            inputs: call.inputs,
            options: call.options,
        };
        let (reply, answer) = oneshot::channel();
        let job = Job {
            deadline,
            work: Work::Infer(request, reply),
        };
        self.with_agent(&name, |a| a.submit(job))??;
        answer_of(&name, answer).await
    }

    /// Adds a warm pool: its agents are restored from the snapshot by the pools' thread.
    async fn pool_create(&self, request: PoolCreateRequest) -> Result<serde_json::Value, ApiError> {
        check_name(&request.name)?;
        let from = request.from.clone();
        let opts = tokio::task::spawn_blocking(move || pool_options(&from))
            .await
            .map_err(|e| ApiError::new(ErrorKind::Failed, e.to_string()))??;
        self.pools
            .create(&request.name, opts, request.size)
            .map_err(|e| ApiError::new(ErrorKind::Invalid, e.to_string()))?;
        tracing::info!(pool = request.name, size = request.size, "pool created");
        let info = self.pools.info();
        to_value(&info.iter().find(|p| p.name == request.name))
    }

    /// Saves a running agent into a directory of this host and stops it.
    async fn save(
        &self,
        request: SnapshotRequest,
        deadline: Instant,
    ) -> Result<serde_json::Value, ApiError> {
        let to = PathBuf::from(&request.to);
        let is_dir = std::fs::symlink_metadata(&to).is_ok_and(|m| m.is_dir());
        if !to.is_absolute() || !is_dir {
            return Err(ApiError::new(
                ErrorKind::Invalid,
                format!(
                    "snapshot to {}: give an existing directory of the daemon's host, as an absolute path (not a symlink)",
                    request.to
                ),
            ));
        }
        let devices = self.with_agent(&request.name, |a| a.info().devices)?;
        if !devices.is_empty() {
            return Err(ApiError::new(
                ErrorKind::Invalid,
                format!(
                    "agent `{}` holds PCI devices ({}): a VM with a passed-through device cannot be saved",
                    request.name,
                    devices.join(", ")
                ),
            ));
        }
        let (reply, answer) = oneshot::channel();
        let job = Job {
            deadline,
            work: Work::Snapshot(to, reply),
        };
        self.with_agent(&request.name, |a| a.submit(job))??;
        answer_of(&request.name, answer).await
    }

    /// Stops the agent's VM and waits until it is gone; the agent stays listed until `rm`.
    async fn stop(&self, name: &str) -> Result<serde_json::Value, ApiError> {
        let waiter = self.with_agent(name, |a| {
            a.request_stop();
            a.waiter()
        })?;
        tokio::task::spawn_blocking(waiter)
            .await
            .map_err(|e| ApiError::new(ErrorKind::Failed, e.to_string()))?;
        to_value(&self.with_agent(name, Agent::info)?)
    }

    async fn rm(&self, request: RmRequest) -> Result<serde_json::Value, ApiError> {
        let name = request.name;
        let state = self.with_agent(&name, Agent::state)?;
        if state.is_live() && !request.force {
            return Err(ApiError::new(
                ErrorKind::Invalid,
                format!(
                    "agent `{name}` is {}; `agentos stop {name}` first, or `agentos rm --force {name}`",
                    state.as_str()
                ),
            ));
        }
        let Some(agent) = self.lock_agents().remove(&name) else {
            return Err(unknown_agent(&name, &self.lock_agents()));
        };
        let log = agent.config().log.clone();
        tokio::task::spawn_blocking(move || drop(agent))
            .await
            .map_err(|e| ApiError::new(ErrorKind::Failed, e.to_string()))?;
        let _ = std::fs::remove_dir_all(snapshot_dir(&log));
        let _ = std::fs::remove_file(log);
        tracing::info!(agent = name, "removed");
        to_value(&serde_json::json!({ "removed": name }))
    }

    /// Freezes (or thaws) agent `name`'s VM; its state after. A VM frozen here is never thawed
    /// by the arbiter (which thaws only what it froze).
    async fn set_paused(&self, name: &str, paused: bool) -> Result<serde_json::Value, ApiError> {
        let (config, cgroup) = self.with_agent(name, |a| (a.shared_config(), a.cgroup()))?;
        let verb = if paused { "pause" } else { "resume" };
        let Some(cgroup) = cgroup else {
            return Err(ApiError::new(
                ErrorKind::NotRunning,
                format!("agent `{name}` has no running VM to {verb}"),
            ));
        };
        let done = tokio::task::spawn_blocking(move || {
            if cgroup.is_frozen() == paused {
                return Ok(false);
            }
            if paused {
                cgroup.freeze()
            } else {
                cgroup.thaw()
            }
            .map(|()| true)
        })
        .await
        .map_err(|e| ApiError::new(ErrorKind::Failed, e.to_string()))?
        .map_err(|e| ApiError::new(ErrorKind::Failed, format!("cannot {verb} `{name}`: {e}")))?;
        if done {
            agent::note(
                &config,
                if paused {
                    "paused by request"
                } else {
                    "resumed by request"
                },
            );
        }
        self.with_agent(name, |a| to_value(&a.info()))?
    }

    /// What the arbiter and the metrics read of each agent, taken under the lock; the cgroup
    /// files are read after it is released.
    fn snapshot(
        &self,
    ) -> Vec<(
        Arc<AgentConfig>,
        AgentInfo,
        Option<Arc<cgroup::AgentCgroup>>,
    )> {
        self.lock_agents()
            .values()
            .map(|a| (a.shared_config(), a.info(), a.cgroup()))
            .collect()
    }

    /// Freezes and thaws batch agents as the arbiter says, and evens out the CPUs of pinned
    /// agents (one may have left). Runs on the arbiter's thread: it reads and writes cgroup
    /// files and takes the admission lock.
    fn arbitrate(&self, arbiter: &mut arbiter::Arbiter) {
        let agents = self.snapshot();
        let pinned: Vec<(&AgentConfig, &cgroup::AgentCgroup)> = agents
            .iter()
            .filter(|(config, _, _)| config.opts.cpu.pin)
            .filter_map(|(config, _, cgroup)| Some((&**config, &**cgroup.as_ref()?)))
            .collect();
        if !pinned.is_empty() {
            let cgroups: Vec<&cgroup::AgentCgroup> = pinned.iter().map(|(_, c)| *c).collect();
            for (i, cpu) in
                agentos_core::admission::rebalance(&cgroup::Layout::discover(), &cgroups)
            {
                agent::note(
                    pinned[i].0,
                    &format!("moved to CPU {cpu}: pinned agents are spread evenly"),
                );
            }
        }
        let seen: Vec<arbiter::Seen> = agents
            .iter()
            .map(|(config, _, cgroup)| arbiter::Seen {
                name: config.name.clone(),
                class: config.class,
                cpu_usage_us: cgroup.as_ref().map(|c| c.stats().cpu_usage_us),
                frozen: cgroup.as_ref().is_some_and(|c| c.is_frozen()),
            })
            .collect();
        for action in arbiter.tick(&seen, std::time::Instant::now()) {
            let (name, freeze) = match &action {
                arbiter::Action::Freeze { name, .. } => (name, true),
                arbiter::Action::Thaw { name } => (name, false),
            };
            let Some((config, _, Some(cgroup))) = agents.iter().find(|(c, _, _)| &c.name == name)
            else {
                continue;
            };
            let done = if freeze {
                cgroup.freeze()
            } else {
                cgroup.thaw()
            };
            match (done, &action) {
                (Ok(()), arbiter::Action::Freeze { because, .. }) => {
                    agent::note(config, &format!("paused: {because}"));
                }
                (Ok(()), arbiter::Action::Thaw { .. }) => {
                    agent::note(config, "resumed: no interactive agent needs the CPU");
                }
                (Err(e), _) => tracing::warn!(agent = name, error = %e, "cannot pause or resume"),
            }
        }
    }

    fn metrics_text(&self) -> String {
        let rows: Vec<metrics::AgentRow> = self
            .snapshot()
            .into_iter()
            .map(|(_, info, cgroup)| metrics::AgentRow {
                info,
                stats: cgroup.map(|c| c.stats()),
            })
            .collect();
        metrics::render(
            &rows,
            &self.pools.info(),
            &lock(&self.counters.requests),
            &lock(&self.counters.errors),
        )
    }
}

/// What agent `name`'s thread answered to a request.
async fn answer_of<T: Serialize>(
    name: &str,
    answer: oneshot::Receiver<Result<T, ApiError>>,
) -> Result<serde_json::Value, ApiError> {
    let result = answer.await.map_err(|_| {
        ApiError::new(
            ErrorKind::Failed,
            format!("agent `{name}` ended before answering"),
        )
    })?;
    to_value(&result?)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn check_name(name: &str) -> Result<(), ApiError> {
    if valid_peer_name(name) {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorKind::Invalid,
            format!(
                "`{}` is not an agent name: use 1 to 64 letters, digits, `-`, `_` or `.`, not starting with `.`",
                agentos_protocol::clip(name, 80)
            ),
        ))
    }
}

/// Checks what a spawn asks for and turns it into the agent's boot options.
fn agent_config(
    request: SpawnRequest,
    log: PathBuf,
    hang_timeout: Duration,
) -> Result<AgentConfig, ApiError> {
    let from = request.from.as_deref().map(snapshot_source).transpose()?;
    let spec = AgentRequest {
        vcpus: request.vcpus,
        memory_mib: request.memory_mib,
        cpus: request.cpus,
        weight: request.weight,
        class: request.class,
        cpuset: request.cpuset.clone(),
        pin: request.pin,
        model: request.model.clone(),
        template: request.template.clone(),
        from,
        devices: request.devices.clone(),
        gpus: request.gpus,
        ..Default::default()
    }
    .validate()
    .map_err(spec_error)?;
    let mut config = configure(request.name, &spec, request.restart, log, hang_timeout)?;
    // In range: parse_request checked it.
    config.opts.boot_timeout = request
        .boot_timeout_s
        .map_or(DEFAULT_BOOT_TIMEOUT, Duration::from_secs);
    config.opts.wait_for_room = request.queue;
    Ok(config)
}

/// An agent of the daemon, as `spec` says, its console going to `log` and its snapshots beside
/// it.
fn configure(
    name: String,
    spec: &AgentSpec,
    restart: RestartPolicy,
    log: PathBuf,
    hang_timeout: Duration,
) -> Result<AgentConfig, ApiError> {
    let mut opts = spec
        .boot_options(&image::default_cache_dir())
        .map_err(spec_error)?;
    opts.console_log = Some(log.clone());
    let own = snapshot_dir(&log);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&own)
        .map_err(|e| {
            ApiError::new(
                ErrorKind::Failed,
                format!("cannot create {}: {e}", own.display()),
            )
        })?;
    // A VM with a PCI device cannot be saved.
    let with_devices = !spec.devices().is_empty() || spec.gpus() > 0;
    opts.snapshot_to = (!with_devices).then_some(own);
    Ok(AgentConfig {
        name,
        // A restored agent's are its snapshot's.
        model: opts.model_disks.as_ref().map(|disks| disks.name.clone()),
        template: opts
            .base_disk
            .as_ref()
            .map(|_| agentos_image::template::Template::Base.name().to_owned()),
        restart,
        opts,
        log,
        hang_timeout,
        group: None,
        class: spec.class(),
        max_restarts: None,
        hooks: None,
        devices: spec.devices().to_vec(),
        gpus: spec.gpus(),
    })
}

/// What a client gets when the agent it asked for cannot be: `invalid` when the request is at
/// fault, `failed` when this host is (no guest image, a model's disks not built).
fn spec_error(e: SpecError) -> ApiError {
    let kind = if e.is_bad_request() {
        ErrorKind::Invalid
    } else {
        ErrorKind::Failed
    };
    ApiError::new(kind, agentos_protocol::error_chain(&e))
}

/// The options a pool's agents are restored with: the snapshot's shape, the agent image, no
/// slice beyond memory; no snapshot directory (one taken from the pool is saved only once it
/// restarted).
fn pool_options(from: &str) -> Result<BootOptions, ApiError> {
    AgentRequest {
        from: Some(snapshot_source(from)?),
        ..Default::default()
    }
    .validate()
    .and_then(|spec| spec.boot_options(&image::default_cache_dir()))
    .map_err(spec_error)
}

/// A snapshot directory a client named: an absolute path of the daemon's host (the rest is
/// checked by `AgentSpec::boot_options`).
fn snapshot_source(from: &str) -> Result<PathBuf, ApiError> {
    let dir = PathBuf::from(from);
    if !dir.is_absolute() {
        return Err(ApiError::new(
            ErrorKind::Invalid,
            format!(
                "from {}: give the snapshot directory as an absolute path",
                dir.display()
            ),
        ));
    }
    Ok(dir)
}

/// Where an agent's VMM writes a snapshot before it is moved where it was asked for: beside the
/// agent's log, in the daemon's state directory.
fn snapshot_dir(log: &Path) -> PathBuf {
    log.with_extension("snapshot")
}

#[cfg(test)]
mod tests {
    use super::server::tests::{Running, call, connect, kind};
    use super::*;

    fn daemon() -> Arc<Daemon> {
        Arc::new(
            Daemon::new(
                RunDir::create("daemon-test").unwrap(),
                Duration::from_secs(60),
            )
            .unwrap(),
        )
    }

    #[test]
    fn durations_past_their_range_are_invalid_and_the_daemon_answers_on() {
        let server = Running::start(daemon(), server::Limits::DAEMON);
        let mut client = connect(&server.socket);
        let max = u64::MAX;
        for (path, body, field) in [
            (
                "/agents/a/exec",
                format!(r#"{{"run":{{"program":"/bin/true","timeout_ms":{max}}}}}"#),
                "exec `run.timeout_ms`",
            ),
            (
                "/agents/a/exec",
                r#"{"run":{"program":"/bin/true","timeout_ms":0}}"#.to_owned(),
                "exec `run.timeout_ms`",
            ),
            (
                "/groups/g/input",
                format!(r#"{{"text":"hi","timeout_s":{max}}}"#),
                "group_input `timeout_s`",
            ),
            (
                "/agents",
                format!(r#"{{"name":"a","boot_timeout_s":{max},"wait":true}}"#),
                "spawn `boot_timeout_s`",
            ),
            (
                "/agents",
                r#"{"name":"a","boot_timeout_s":3601}"#.to_owned(),
                "spawn `boot_timeout_s`",
            ),
        ] {
            let reply = call(&mut client, "POST", path, &body);
            assert_eq!(kind(&reply), "invalid", "{body}: {reply:?}");
            assert_eq!(reply.status, 422);
            let message = reply.json()["error"]["message"]
                .as_str()
                .unwrap()
                .to_owned();
            assert!(message.contains(field), "{message}");
            assert!(message.contains("use 1 to"), "{message}");
        }
        assert_eq!(kind(&call(&mut client, "GET", "/version", "")), "ok");
        assert_eq!(kind(&call(&mut client, "GET", "/agents", "")), "ok");
        let metrics = call(&mut client, "GET", "/metrics", "");
        assert!(
            String::from_utf8_lossy(&metrics.body).contains("agentos_api_requests_total"),
            "{metrics:?}"
        );
    }
}
