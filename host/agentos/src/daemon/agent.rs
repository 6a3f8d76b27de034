//! One agent of the daemon: a thread that owns its VM. It boots the VM (a VMM ends with the
//! thread that started it, so this thread lives as long as the agent), serves the requests for
//! it one at a time, watches it (the VMM ending, the guest agent not answering a ping) and boots
//! it again as its restart policy says.

use std::fs::File;
use std::io::{self, Cursor, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use agentos_protocol::{ExecRequest, ExitStatus, InferReply, InferRequest, Program};
use tokio::sync::oneshot;

use super::api::{
    AgentInfo, AgentState, ApiError, ErrorKind, ExecCall, ExecReply, LogsReply,
    MAX_EXEC_OUTPUT_BYTES, MAX_LOG_CHUNK_BYTES, MAX_TEXT_JSON_BYTES, RestartPolicy, SnapshotReply,
    fit_text,
};
use agentos_core::agent::connection::{CappedOutput, ConnectionError, ExecIo, Keepalive};
use agentos_core::agent::supervision::{AgentHooks, Backoff};
use agentos_core::agent::vm::{AgentVm, BootOptions, VmError};
use agentos_core::cgroup::AgentCgroup;
use agentos_core::cgroup::slice::PriorityClass;
use agentos_vmm::devices::pci::PassedDevice;

/// How often an idle agent's thread looks at its VM.
const WATCH_TICK: Duration = Duration::from_millis(250);
/// How often a running agent is pinged.
const PING_INTERVAL: Duration = Duration::from_secs(5);
/// Requests waiting for one agent; more are refused.
const JOB_QUEUE: usize = 32;
/// A log longer than this is emptied before the next boot (the VMM bounds what one VM writes).
const MAX_LOG_BYTES: u64 = 32 << 20;
/// How long a stop waits for a request under way before it kills the agent's VMM.
const BUSY_STOP_GRACE: Duration = Duration::from_secs(2);
/// How long before an `exec`'s deadline the guest kills the program: the time its end (and
/// output) has to reach the host.
pub const EXEC_GRACE: Duration = Duration::from_secs(10);

/// What the daemon decided about an agent when it was spawned.
#[derive(Clone)]
pub struct AgentConfig {
    pub name: String,
    pub model: Option<String>,
    /// Its template (`base`), whose disk is `opts.base_disk`.
    pub template: Option<String>,
    pub restart: RestartPolicy,
    pub opts: BootOptions,
    /// The serial console of each of its VMs, and the daemon's notes between them.
    pub log: PathBuf,
    /// A guest agent that does not answer a ping within this is hung.
    pub hang_timeout: Duration,
    /// The group the agent is a member of, which starts and stops it.
    pub group: Option<String>,
    /// Its priority class, when it was given one (see [`super::arbiter`]).
    pub class: Option<PriorityClass>,
    /// At most this many restarts (none: no limit).
    pub max_restarts: Option<u32>,
    /// Told of each VM once it is up (before it counts as running: a group member joins its
    /// group there) and when it ends.
    pub hooks: Option<Arc<dyn AgentHooks>>,
    /// The PCI devices asked for by address and the number of GPUs, which admission turns
    /// into `opts.pci_devices` (see [`super::devices`]).
    pub devices: Vec<PassedDevice>,
    pub gpus: u32,
}

/// A request for the agent's thread: what to do, when its client stops waiting, and where the
/// answer goes.
pub struct Job {
    pub deadline: Instant,
    pub work: Work,
}

pub enum Work {
    Exec(ExecCall, oneshot::Sender<Result<ExecReply, ApiError>>),
    Infer(InferRequest, oneshot::Sender<Result<InferReply, ApiError>>),
    /// Save the agent to the directory and stop it.
    Snapshot(PathBuf, oneshot::Sender<Result<SnapshotReply, ApiError>>),
}

impl Work {
    /// Whether nobody waits for the answer any more (the request passed its deadline).
    fn abandoned(&self) -> bool {
        match self {
            Self::Exec(_, reply) => reply.is_closed(),
            Self::Infer(_, reply) => reply.is_closed(),
            Self::Snapshot(_, reply) => reply.is_closed(),
        }
    }
}

#[derive(Debug)]
struct Status {
    state: AgentState,
    since: Instant,
    restarts: u32,
    vmm_pid: Option<u32>,
    boot_ms: Option<u64>,
    last_error: Option<String>,
    /// Whether the admission control refused the agent's slice (it never booted).
    refused: bool,
    /// Whether a request is running in the VM.
    busy: bool,
    cgroup: Option<Arc<AgentCgroup>>,
    /// The jail of its running VM's VMM.
    jail: Option<agentos_jail::JailLevel>,
    /// Its running VM's socket for connections to the guest agent.
    guest_socket: Option<PathBuf>,
}

/// The daemon's handle on an agent.
pub struct Agent {
    config: Arc<AgentConfig>,
    status: Arc<Mutex<Status>>,
    jobs: SyncSender<Job>,
    stop: Arc<AtomicBool>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

/// Where the agent's thread keeps what the daemon shows of it.
#[derive(Clone)]
struct Shared {
    config: Arc<AgentConfig>,
    status: Arc<Mutex<Status>>,
    stop: Arc<AtomicBool>,
}

impl Agent {
    /// Starts the agent's thread, which boots its first VM.
    pub fn spawn(config: AgentConfig) -> io::Result<Self> {
        Self::start(config, None)
    }

    /// Starts the agent's thread with a VM that is up already (taken from a warm pool); the
    /// agent boots its later VMs itself, if its policy restarts it.
    pub fn spawn_with(config: AgentConfig, vm: AgentVm) -> io::Result<Self> {
        Self::start(config, Some(vm))
    }

    fn start(mut config: AgentConfig, first: Option<AgentVm>) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        config.opts.abort = Some(stop.clone());
        let config = Arc::new(config);
        let status = Arc::new(Mutex::new(Status {
            state: AgentState::Booting,
            since: Instant::now(),
            restarts: 0,
            vmm_pid: None,
            boot_ms: None,
            last_error: None,
            refused: false,
            busy: false,
            cgroup: None,
            jail: None,
            guest_socket: None,
        }));
        let (jobs, queue) = mpsc::sync_channel(JOB_QUEUE);
        let shared = Shared {
            config: config.clone(),
            status: status.clone(),
            stop: stop.clone(),
        };
        let thread = thread::Builder::new()
            .name(format!("agent-{}", config.name))
            .spawn(move || live(&shared, &queue, first))?;
        Ok(Self {
            config,
            status,
            jobs,
            stop,
            thread: Arc::new(Mutex::new(Some(thread))),
        })
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    pub fn state(&self) -> AgentState {
        lock(&self.status).state
    }

    /// Whether admission control refused it (nothing of it ever ran).
    pub fn was_refused(&self) -> bool {
        lock(&self.status).refused
    }

    pub fn info(&self) -> AgentInfo {
        let status = lock(&self.status);
        AgentInfo {
            name: self.config.name.clone(),
            state: status.state,
            model: self.config.model.clone(),
            vcpus: self.config.opts.vcpus,
            memory_mib: self.config.opts.memory_mib,
            restart: self.config.restart,
            restarts: status.restarts,
            vmm_pid: status.vmm_pid,
            boot_ms: status.boot_ms,
            for_s: status.since.elapsed().as_secs(),
            last_error: status.last_error.clone(),
            paused: status.cgroup.as_ref().is_some_and(|c| c.is_frozen()),
            jail: status.jail,
            devices: self
                .config
                .opts
                .pci_devices
                .iter()
                .map(ToString::to_string)
                .collect(),
        }
    }

    /// Where a connection of its own to the running guest agent is opened (see
    /// [`agentos_core::agent::vm::connect_to_agent`]); refused while it does not run or is
    /// paused (a paused guest would not answer).
    pub fn guest_socket(&self) -> Result<PathBuf, ApiError> {
        let status = lock(&self.status);
        match &status.guest_socket {
            Some(_) if status.cgroup.as_ref().is_some_and(|c| c.is_frozen()) => Err(ApiError::new(
                ErrorKind::NotRunning,
                format!(
                    "agent `{}` is paused; `agentos resume {}` first",
                    self.config.name, self.config.name
                ),
            )),
            Some(socket) if status.state == AgentState::Running => Ok(socket.clone()),
            _ => Err(not_running(&self.config.name, status.state)),
        }
    }

    /// Its running VM's cgroup.
    pub fn cgroup(&self) -> Option<Arc<AgentCgroup>> {
        lock(&self.status).cgroup.clone()
    }

    pub fn shared_config(&self) -> Arc<AgentConfig> {
        self.config.clone()
    }

    /// Hands a request to the agent's thread.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        let state = self.state();
        if state != AgentState::Running {
            return Err(not_running(&self.config.name, state));
        }
        match self.jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(ApiError::new(
                ErrorKind::Failed,
                format!(
                    "agent `{}` has {JOB_QUEUE} requests waiting already; try again later",
                    self.config.name
                ),
            )),
            Err(TrySendError::Disconnected(_)) => Err(not_running(&self.config.name, state)),
        }
    }

    /// Tells the agent's thread to stop its VM and end; `join` waits for it.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// What waits until the agent's thread has ended (its VM stopped, its run directory and
    /// cgroup removed). Blocking: the daemon runs it off its event loop.
    /// A request still running when the agent is stopped (a program that never ends) would
    /// keep the thread waiting: after [`BUSY_STOP_GRACE`] its VMM is killed, which ends it.
    pub fn waiter(&self) -> impl FnOnce() + Send + use<> {
        let thread = self.thread.clone();
        let status = self.status.clone();
        let name = self.config.name.clone();
        move || {
            let taken = thread.lock().unwrap_or_else(|e| e.into_inner()).take();
            let Some(thread) = taken else {
                return;
            };
            let waited = Instant::now();
            let mut killed = false;
            while !thread.is_finished() {
                let (busy, pid) = {
                    let status = lock(&status);
                    (status.busy, status.vmm_pid)
                };
                if busy && !killed && waited.elapsed() >= BUSY_STOP_GRACE {
                    if let Some(pid) = pid {
                        tracing::info!(agent = name, pid, "killing the VMM of a busy agent");
                        // SAFETY: kill has no memory-safety preconditions; the pid is that of
                        // the agent's VMM, a child of this process not reaped while it runs.
                        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                    }
                    killed = true;
                }
                thread::sleep(Duration::from_millis(50));
            }
            if thread.join().is_err() {
                tracing::error!(agent = name, "the agent's thread failed");
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.request_stop();
        self.waiter()();
    }
}

pub fn not_running(name: &str, state: AgentState) -> ApiError {
    ApiError::new(
        ErrorKind::NotRunning,
        format!(
            "agent `{name}` is {} now; see `agentos ps` and `agentos logs {name}`",
            state.as_str()
        ),
    )
}

fn lock(status: &Mutex<Status>) -> std::sync::MutexGuard<'_, Status> {
    status.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn set_state(&self, state: AgentState, error: Option<String>) {
        let mut status = lock(&self.status);
        status.state = state;
        status.since = Instant::now();
        if error.is_some() {
            status.last_error = error;
        }
        if !matches!(state, AgentState::Running) {
            status.vmm_pid = None;
            status.cgroup = None;
            status.jail = None;
            status.guest_socket = None;
        }
    }

    /// Told to stop, or the daemon was (its VMMs are being killed: no restarts then).
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst) || agentos_core::signals::interrupted()
    }

    fn note(&self, text: &str) {
        note(&self.config, text);
    }
}

/// Appends a line of the daemon's own to an agent's log.
pub fn note(config: &AgentConfig, text: &str) {
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let line = format!("[agentos {stamp}] {text}\n");
    if let Err(e) = File::options()
        .create(true)
        .append(true)
        .open(&config.log)
        .and_then(|mut f| f.write_all(line.as_bytes()))
    {
        tracing::warn!(agent = config.name, error = %e, "cannot write the agent's log");
    }
}

/// How one VM of the agent ended.
enum Ending {
    /// Asked to stop.
    Stopped,
    /// Saved to a snapshot directory, which ended its VM.
    Saved(PathBuf),
    /// The VM ended or hung: why, and whether that was a failure.
    Ended { why: String, failure: bool },
}

/// The agent's whole life: boot (or take `first`, up already), serve, and boot again while its
/// policy says so.
fn live(shared: &Shared, jobs: &Receiver<Job>, mut first: Option<AgentVm>) {
    let config = &shared.config;
    let mut backoff = Backoff::default();
    loop {
        trim_log(&config.log);
        let booted_at = Instant::now();
        let booted = match first.take() {
            Some(vm) => {
                shared.note("taken from a warm pool");
                Ok(vm)
            }
            None => {
                shared.set_state(AgentState::Booting, None);
                shared.note("booting");
                AgentVm::boot(&config.opts)
            }
        };
        let booted = booted.map(|mut vm| {
            let _ = vm.set_label(&config.name);
            // A guest that never answers the hook (a group's join) must not hold this thread,
            // and so a stop, for ever.
            vm.conn()
                .set_deadline(Instant::now().checked_add(config.hang_timeout));
            let restarts = lock(&shared.status).restarts;
            let hooked = config
                .hooks
                .as_ref()
                .map_or(Ok(()), |hooks| hooks.booted(&mut vm, restarts));
            vm.conn().set_deadline(None);
            (vm, hooked)
        });
        let ending = match booted {
            Ok((vm, Err(why))) => {
                drop(vm);
                Ending::Ended {
                    why: format!("did not join its group: {why}"),
                    failure: true,
                }
            }
            Ok((vm, Ok(()))) => {
                let boot = vm.boot_time();
                {
                    let mut status = lock(&shared.status);
                    status.vmm_pid = vm.vmm_pid();
                    status.boot_ms = Some(boot.as_millis() as u64);
                    status.cgroup = vm.cgroup();
                    status.jail = Some(vm.jail());
                    status.guest_socket = Some(vm.guest_socket());
                }
                shared.set_state(AgentState::Running, None);
                shared.note(&format!("up, booted in {:.1} s", boot.as_secs_f64()));
                tracing::info!(agent = config.name, boot_ms = boot.as_millis(), "agent up");
                serve(shared, jobs, vm)
            }
            Err(VmError::Interrupted) if shared.stopping() => Ending::Stopped,
            Err(VmError::Refused(refusal)) => {
                lock(&shared.status).refused = true;
                let why = format!("no room on this host: {refusal}");
                shared.note(&why);
                shared.set_state(AgentState::Failed, Some(why));
                return;
            }
            Err(e) => Ending::Ended {
                why: format!("did not boot: {}", agentos_protocol::error_chain(&e)),
                failure: true,
            },
        };
        let (why, failure) = match ending {
            Ending::Stopped => {
                shared.note("stopped");
                shared.set_state(AgentState::Stopped, None);
                return;
            }
            Ending::Saved(to) => {
                shared.note(&format!("saved to {}; stopped", to.display()));
                shared.set_state(AgentState::Stopped, None);
                return;
            }
            Ending::Ended { why, failure } => (why, failure),
        };
        tracing::warn!(agent = config.name, "the agent's VM ended: {why}");
        shared.note(&format!("ended: {why}"));
        let restarts = lock(&shared.status).restarts;
        let restart = config.restart.restarts(failure)
            && config.max_restarts.is_none_or(|most| restarts < most)
            && !shared.stopping();
        let pause = restart.then(|| backoff.next(booted_at.elapsed()));
        if let Some(hooks) = &config.hooks {
            hooks.ended(&why, restarts, pause);
        }
        let Some(pause) = pause else {
            let state = if shared.stopping() {
                AgentState::Stopped
            } else if failure {
                AgentState::Failed
            } else {
                AgentState::Exited
            };
            shared.set_state(state, Some(why));
            return;
        };
        shared.set_state(AgentState::Restarting, Some(why));
        shared.note(&format!("restarting in {} s", pause.as_secs()));
        if !pause_unless_stopped(shared, jobs, pause) {
            shared.note("stopped");
            shared.set_state(AgentState::Stopped, None);
            return;
        }
        lock(&shared.status).restarts += 1;
    }
}

/// Sleeps `pause`, refusing the requests that arrive meanwhile; false if told to stop.
fn pause_unless_stopped(shared: &Shared, jobs: &Receiver<Job>, pause: Duration) -> bool {
    let until = Instant::now() + pause;
    while Instant::now() < until {
        if shared.stopping() {
            return false;
        }
        if let Ok(job) = jobs.recv_timeout(WATCH_TICK) {
            refuse(
                job.work,
                not_running(&shared.config.name, AgentState::Restarting),
            );
        }
    }
    !shared.stopping()
}

fn refuse(work: Work, error: ApiError) {
    match work {
        Work::Exec(_, reply) => {
            let _ = reply.send(Err(error));
        }
        Work::Infer(_, reply) => {
            let _ = reply.send(Err(error));
        }
        Work::Snapshot(_, reply) => {
            let _ = reply.send(Err(error));
        }
    }
}

/// Serves requests and watches the VM until it ends, hangs or the agent is stopped.
fn serve(shared: &Shared, jobs: &Receiver<Job>, mut vm: AgentVm) -> Ending {
    let hang = shared.config.hang_timeout;
    if let Some(cgroup) = vm.cgroup() {
        vm.conn()
            .set_pause_check(Some(Box::new(move || cgroup.is_frozen())));
    }
    let mut last_ping = Instant::now();
    loop {
        match jobs.recv_timeout(WATCH_TICK) {
            Ok(Job {
                work: Work::Snapshot(to, reply),
                ..
            }) => match vm.snapshot_dir().map(Path::to_path_buf) {
                Some(own) => return save(shared, vm, &own, to, reply),
                None => {
                    let why = format!(
                        "agent `{}` runs a VM started without a snapshot directory (a group's member, or one taken from a warm pool before its first restart); it cannot be saved",
                        shared.config.name
                    );
                    let _ = reply.send(Err(ApiError::new(ErrorKind::Invalid, why)));
                }
            },
            Ok(job) => {
                vm.conn().set_keepalive(Some(Keepalive {
                    interval: PING_INTERVAL,
                    limit: hang,
                }));
                lock(&shared.status).busy = true;
                let stalled = run_job(shared, &mut vm, job);
                lock(&shared.status).busy = false;
                vm.conn().set_keepalive(None);
                vm.conn().set_deadline(None);
                last_ping = Instant::now();
                if let Some(quiet) = stalled {
                    return hung(vm, quiet);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => shared.stop.store(true, Ordering::SeqCst),
        }
        if shared.stopping() {
            vm.shutdown();
            return Ending::Stopped;
        }
        if vm.ended() {
            let end = vm.shutdown();
            return Ending::Ended {
                why: end.describe(),
                failure: !end.is_clean(),
            };
        }
        // A paused agent cannot answer; that is no hang.
        let frozen = vm.cgroup().is_some_and(|c| c.is_frozen());
        if !frozen && last_ping.elapsed() >= PING_INTERVAL {
            vm.conn().set_deadline(Some(Instant::now() + hang));
            let pinged = vm.conn().ping();
            vm.conn().set_deadline(None);
            last_ping = Instant::now();
            match pinged {
                Ok(_) => {}
                Err(ConnectionError::TimedOut) => return hung(vm, hang),
                Err(e) => {
                    // The link broke: the VM is ending; the next turn reads how.
                    tracing::info!(agent = shared.config.name, error = %e, "ping failed");
                    if !vm.ended() {
                        drop(vm);
                        return Ending::Ended {
                            why: format!("the guest agent's connection failed: {e}"),
                            failure: true,
                        };
                    }
                }
            }
        }
    }
}

/// Saves the agent into `to` and ends its VM: the VMM writes the snapshot into the agent's own
/// snapshot directory, which is then moved into place.
fn save(
    shared: &Shared,
    vm: AgentVm,
    own: &Path,
    to: PathBuf,
    reply: oneshot::Sender<Result<SnapshotReply, ApiError>>,
) -> Ending {
    let name = &shared.config.name;
    let failed = |why: String| ApiError::new(ErrorKind::Failed, why);
    match vm.snapshot() {
        Ok(_) => match agentos_core::agent::snapshot::move_snapshot(
            own,
            &to,
            shared.config.opts.model_disks.as_ref(),
            shared.config.opts.base_disk.as_deref(),
        )
        .and_then(|bytes| {
            let agent = agentos_core::agent::snapshot::SavedAgent {
                model: shared.config.model.clone(),
                template: shared.config.template.clone(),
            };
            agent.write(&to).map(|()| bytes)
        }) {
            Ok(memory_bytes) => {
                let _ = reply.send(Ok(SnapshotReply {
                    name: name.clone(),
                    to: to.display().to_string(),
                    memory_bytes,
                }));
                Ending::Saved(to)
            }
            Err(e) => {
                let why = format!("saved, but not moved into {}: {e}", to.display());
                let _ = reply.send(Err(failed(why.clone())));
                Ending::Ended { why, failure: true }
            }
        },
        Err(e) => {
            let why = agentos_protocol::error_chain(&e);
            let _ = reply.send(Err(failed(why.clone())));
            Ending::Ended { why, failure: true }
        }
    }
}

/// Kills a VM whose guest agent stopped answering.
fn hung(vm: AgentVm, quiet: Duration) -> Ending {
    drop(vm);
    Ending::Ended {
        why: format!(
            "hung: the guest agent did not answer a ping for {} s; its VM was killed",
            quiet.as_secs()
        ),
        failure: true,
    }
}

/// Runs one request until its deadline at most; returns how long the agent was quiet when it
/// stopped answering. A request whose client went (it waited for its turn past its deadline) is
/// dropped unseen.
fn run_job(shared: &Shared, vm: &mut AgentVm, job: Job) -> Option<Duration> {
    let Job { deadline, work } = job;
    if work.abandoned() {
        return None;
    }
    vm.conn().set_deadline(Some(deadline));
    match work {
        Work::Exec(call, reply) => {
            let result = exec(vm, call, deadline);
            let stalled = stalled_for(&result);
            let _ = reply.send(result.map_err(|e| job_error(&shared.config.name, e)));
            stalled
        }
        Work::Infer(request, reply) => {
            let result = vm.conn().infer(request);
            let stalled = stalled_for(&result);
            let _ = reply.send(result.map_err(|e| job_error(&shared.config.name, e)));
            stalled
        }
        // `serve` saves an agent itself, since that ends its VM.
        work @ Work::Snapshot(..) => {
            let why = "an agent is saved between requests, not during one";
            refuse(work, ApiError::new(ErrorKind::Failed, why.to_owned()));
            None
        }
    }
}

fn stalled_for<T>(result: &Result<T, ConnectionError>) -> Option<Duration> {
    match result {
        Err(ConnectionError::Stalled(quiet)) => Some(*quiet),
        _ => None,
    }
}

/// The error of a request whose agent went away while answering it (its VM stopped, or the
/// guest agent died): the agent is not running, which a client can tell from a failure.
pub fn gone(name: &str) -> ApiError {
    ApiError::new(
        ErrorKind::NotRunning,
        format!("agent `{name}` stopped while answering: the guest agent closed the connection"),
    )
}

fn job_error(name: &str, e: ConnectionError) -> ApiError {
    match e {
        ConnectionError::Refused(why) => ApiError::new(ErrorKind::Failed, why),
        ConnectionError::Closed => gone(name),
        ConnectionError::TimedOut => ApiError::new(
            ErrorKind::TimedOut,
            format!(
                "agent `{name}` did not finish the request by its deadline (waiting for its turn included); see docs/api.md"
            ),
        ),
        other => ApiError::new(
            ErrorKind::Failed,
            format!(
                "agent `{name}` failed the request: {}",
                agentos_protocol::error_chain(&other)
            ),
        ),
    }
}

/// Runs a program, which the guest kills [`EXEC_GRACE`] before `deadline` (the connection's
/// deadline, set by the caller): its timeout counts from the request's arrival.
fn exec(vm: &mut AgentVm, call: ExecCall, deadline: Instant) -> Result<ExecReply, ConnectionError> {
    let started = Instant::now();
    let Some(limit) = deadline
        .saturating_duration_since(started)
        .checked_sub(EXEC_GRACE)
        .filter(|limit| !limit.is_zero())
    else {
        return Err(ConnectionError::TimedOut);
    };
    let request = ExecRequest {
        id: 0,
        run: Program {
            timeout_ms: Some(u64::try_from(limit.as_millis()).unwrap_or(u64::MAX)),
            ..call.run
        },
        stdin: false,
        ..Default::default()
    };
    let mut stdout = CappedOutput::new(MAX_EXEC_OUTPUT_BYTES);
    let mut stderr = CappedOutput::new(MAX_EXEC_OUTPUT_BYTES);
    let stdin = call
        .stdin
        .map(|text| Box::new(Cursor::new(text.into_bytes())) as Box<dyn Read + Send>);
    let status = vm.conn().exec(
        request,
        ExecIo {
            stdin,
            stdout: &mut stdout,
            stderr: &mut stderr,
        },
    )?;
    Ok(exec_reply(&status, &stdout, &stderr, started.elapsed()))
}

/// The reply to an `exec`: each stream as text cut to fit its share of the reply.
fn exec_reply(
    status: &ExitStatus,
    stdout: &CappedOutput,
    stderr: &CappedOutput,
    took: Duration,
) -> ExecReply {
    let out = fit_text(&stdout.bytes, MAX_TEXT_JSON_BYTES, false);
    let err = fit_text(&stderr.bytes, MAX_TEXT_JSON_BYTES, false);
    ExecReply {
        code: status.code,
        signal: status.signal,
        timed_out: status.timed_out,
        truncated: stdout.cut
            || stderr.cut
            || out.used < stdout.bytes.len()
            || err.used < stderr.bytes.len(),
        stdout: out.text,
        stderr: err.text,
        ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
    }
}

/// Empties a log that grew past [`MAX_LOG_BYTES`] (readers then start again from 0).
fn trim_log(path: &Path) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > MAX_LOG_BYTES) {
        let _ = File::create(path);
    }
}

/// Up to [`MAX_LOG_CHUNK_BYTES`] of the log at `path`, from `offset` (from the start when the
/// log is shorter than that: it was emptied), as much as fits a reply: `next_offset` moves past
/// what the text stands for, at least a byte while there is more.
pub fn read_log(path: &Path, offset: u64) -> io::Result<LogsReply> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(LogsReply {
                text: String::new(),
                next_offset: 0,
            });
        }
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let start = if offset > len { 0 } else { offset };
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.take(MAX_LOG_CHUNK_BYTES).read_to_end(&mut bytes)?;
    // The guest may be writing a character whose end is not in the file yet.
    let fitted = fit_text(&bytes, MAX_TEXT_JSON_BYTES, true);
    Ok(LogsReply {
        text: fitted.text,
        next_offset: start + fitted.used as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_capped_and_says_so() {
        let mut out = CappedOutput::new(MAX_EXEC_OUTPUT_BYTES);
        out.write_all(&vec![b'x'; MAX_EXEC_OUTPUT_BYTES - 1])
            .unwrap();
        assert!(!out.cut);
        out.write_all(b"yz").unwrap();
        assert!(out.cut);
        assert_eq!(out.bytes.len(), MAX_EXEC_OUTPUT_BYTES);
    }

    #[test]
    fn logs_read_in_chunks_and_start_over_when_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        assert_eq!(read_log(&path, 0).unwrap().next_offset, 0);
        std::fs::write(&path, "hello\nworld\n").unwrap();
        let first = read_log(&path, 0).unwrap();
        assert_eq!(
            (first.text.as_str(), first.next_offset),
            ("hello\nworld\n", 12)
        );
        assert_eq!(read_log(&path, 6).unwrap().text, "world\n");
        assert_eq!(read_log(&path, 12).unwrap().text, "");
        std::fs::write(&path, "new\n").unwrap();
        assert_eq!(read_log(&path, 12).unwrap().text, "new\n");
    }

    #[test]
    fn exec_replies_stay_within_their_bound_whatever_the_output() {
        let status = ExitStatus {
            code: Some(3),
            ..ExitStatus::default()
        };
        for (out, err) in [(0x01, b'"'), (b'\\', 0x01), (0xff, b'\\')] {
            let stream = |byte: u8| {
                let mut capped = CappedOutput::new(MAX_EXEC_OUTPUT_BYTES);
                capped
                    .write_all(&vec![byte; MAX_EXEC_OUTPUT_BYTES])
                    .unwrap();
                capped
            };
            let reply = exec_reply(&status, &stream(out), &stream(err), Duration::ZERO);
            assert!(reply.truncated);
            let value = serde_json::to_value(&reply).unwrap();
            let body = serde_json::to_vec(&value).unwrap();
            assert!(
                body.len() <= super::super::api::MAX_REPLY_BYTES,
                "{}",
                body.len()
            );
            let back: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(back["code"], 3);
            assert_eq!(back["truncated"], true);
        }
        let plain = exec_reply(
            &status,
            &CappedOutput::new(MAX_EXEC_OUTPUT_BYTES),
            &CappedOutput::new(MAX_EXEC_OUTPUT_BYTES),
            Duration::ZERO,
        );
        assert!(!plain.truncated);
    }

    #[test]
    fn logs_of_control_bytes_and_quotes_move_forward_in_chunks_that_fit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let mut junk = vec![0x01u8; 600 * 1024];
        junk.extend(vec![b'"'; 300 * 1024]);
        junk.extend("é".repeat(100 * 1024).as_bytes());
        junk.extend([0xff, 0xfe, b'\n']);
        std::fs::write(&path, &junk).unwrap();
        let mut offset = 0;
        let mut text = String::new();
        let mut chunks = 0;
        while offset < junk.len() as u64 {
            let chunk = read_log(&path, offset).unwrap();
            let value = serde_json::to_value(&chunk).unwrap();
            let body = serde_json::to_vec(&value).unwrap();
            assert!(
                body.len() <= super::super::api::MAX_REPLY_BYTES,
                "{}",
                body.len()
            );
            assert!(chunk.next_offset > offset, "stuck at {offset}");
            offset = chunk.next_offset;
            text.push_str(&chunk.text);
            chunks += 1;
        }
        assert_eq!(offset, junk.len() as u64);
        assert!(read_log(&path, offset).unwrap().text.is_empty());
        // Nothing lost nor split: the chunks add up to the whole log.
        assert_eq!(text, String::from_utf8_lossy(&junk));
        assert!(chunks > 4, "{chunks}");
    }
}
