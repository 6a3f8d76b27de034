//! E2B's control plane: sandboxes created, listed, inspected, given more time, connected to,
//! paused, resumed and killed. A sandbox is an agent named by the sandbox's id; what E2B keeps
//! beside it (template, metadata, environment, end of life, the in-sandbox token) is kept here,
//! for as long as the daemon runs. A sandbox whose time is up is removed with its agent; a
//! paused one is saved (a snapshot of its agent, whose VM ends) and restored when resumed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};

use agentos_e2b_proto::filesystem::FilesystemEvent;

use super::super::api::{
    AgentInfo, AgentState, ApiError, ErrorKind, MAX_TIMEOUT_S, NameRequest, Request, RmRequest,
    SnapshotRequest, SpawnRequest,
};
use super::super::link::Chunks;
use super::watchers::Watchers;
use super::{Api, Reply, random_text};

/// What sandboxes report as the version of their in-sandbox API: the features of every version
/// up to it are served (see docs/e2b.md).
pub const ENVD_VERSION: &str = "0.5.7";
/// A sandbox's life unless its creator says otherwise (E2B's default).
const DEFAULT_TIMEOUT_S: u64 = 300;
/// Sandbox ids: this many lowercase letters and digits, the first a letter.
const ID_CHARS: usize = 20;
/// The template a sandbox gets unless it names another (agentos's `base`: bash, python3 and a
/// `user` account, see docs/templates.md); any other name is a model bundle's.
pub const BASE_TEMPLATE: &str = "base";
/// The most sandboxes one listing page holds.
const MAX_PAGE: usize = 1000;

/// What is kept of a sandbox beside its agent.
#[derive(Clone, Debug)]
pub struct Sandbox {
    pub id: String,
    pub template: String,
    pub client_id: String,
    pub metadata: BTreeMap<String, String>,
    /// Added to every process's environment.
    pub env: BTreeMap<String, String>,
    pub started: SystemTime,
    pub end: SystemTime,
    /// What in-sandbox requests carry as `X-Access-Token`.
    pub access_token: String,
    /// Paused: it does not time out, and answers no in-sandbox request.
    pub paused: bool,
    /// Where it was saved when it was paused (its VM ended; resumed from there), rather than
    /// frozen.
    pub saved: Option<PathBuf>,
    /// Set (for every copy) once the sandbox is being killed or its time is up: what its
    /// processes then do is the sandbox's end, not theirs.
    pub ending: Arc<AtomicBool>,
}

/// The daemon's sandboxes.
#[derive(Default)]
pub struct Registry {
    sandboxes: Mutex<BTreeMap<String, Sandbox>>,
    watchers: Watchers,
    /// Where paused sandboxes are saved (see [`super::super::server::Handler::saved_sandboxes`]).
    saves: Option<PathBuf>,
}

impl Registry {
    pub fn new(saves: Option<PathBuf>) -> Self {
        Self {
            saves,
            ..Self::default()
        }
    }

    /// The directory a sandbox is saved into when it is paused (none: it is frozen instead).
    pub fn saves_of(&self, id: &str) -> Option<PathBuf> {
        self.saves.as_ref().map(|saves| saves.join(id))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Sandbox>> {
        self.sandboxes.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, id: &str) -> Option<Sandbox> {
        self.lock().get(id).cloned()
    }

    fn insert(&self, sandbox: Sandbox) {
        self.lock().insert(sandbox.id.clone(), sandbox);
    }

    fn remove(&self, id: &str) -> Option<Sandbox> {
        self.watchers.remove_sandbox(id);
        self.lock().remove(id)
    }

    pub fn check_watcher_room(&self, sandbox: &str) -> Result<(), ApiError> {
        self.watchers.check_room(sandbox)
    }

    /// Keeps the events of the watch `chunks` of `root` as watcher `id` of `sandbox` (unless the
    /// sandbox went meanwhile).
    pub fn add_watcher(
        &self,
        id: &str,
        sandbox: &str,
        root: String,
        chunks: Chunks,
    ) -> Result<(), ApiError> {
        let sandboxes = self.lock();
        if !sandboxes.contains_key(sandbox) {
            return Err(unknown(sandbox));
        }
        self.watchers.add(id, sandbox, root, chunks);
        Ok(())
    }

    pub fn watcher_events(
        &self,
        id: &str,
        sandbox: &str,
    ) -> Result<Vec<FilesystemEvent>, ApiError> {
        self.watchers.take_events(id, sandbox)
    }

    pub fn remove_watcher(&self, id: &str, sandbox: &str) -> Result<(), ApiError> {
        self.watchers.remove(id, sandbox)
    }

    fn all(&self) -> Vec<Sandbox> {
        self.lock().values().cloned().collect()
    }

    /// Sets when `id` ends; false when there is no such sandbox.
    fn set_end(&self, id: &str, end: SystemTime) -> bool {
        match self.lock().get_mut(id) {
            Some(sandbox) => {
                sandbox.end = end;
                true
            }
            None => false,
        }
    }

    fn set_paused(&self, id: &str, paused: bool, saved: Option<PathBuf>) {
        if let Some(sandbox) = self.lock().get_mut(id) {
            sandbox.paused = paused;
            sandbox.saved = saved;
        }
    }

    /// Takes out the sandboxes whose time is up at `now`.
    pub fn take_expired(&self, now: SystemTime) -> Vec<String> {
        let mut sandboxes = self.lock();
        let expired: Vec<String> = sandboxes
            .values()
            .filter(|s| s.end <= now && !s.paused)
            .map(|s| s.id.clone())
            .collect();
        for id in &expired {
            if let Some(sandbox) = sandboxes.remove(id) {
                sandbox.ending.store(true, Ordering::SeqCst);
            }
            self.watchers.remove_sandbox(id);
        }
        expired
    }
}

/// Removes the agent of a sandbox whose time is up.
pub async fn expire(api: &impl Api, id: String) {
    let request = Request::Rm(RmRequest {
        name: id.clone(),
        force: true,
    });
    match api.call(request).await {
        Ok(_) => tracing::info!(sandbox = id, "sandbox timed out and was removed"),
        Err(e) if e.kind == ErrorKind::UnknownAgent => {}
        Err(e) => {
            tracing::warn!(sandbox = id, error = %e.message, "cannot remove a timed-out sandbox")
        }
    }
    if let Some(saves) = api.registry().saves_of(&id) {
        remove_save_dir(&saves);
    }
}

/// Whether `path` is one of the control plane's.
pub fn claims(path: &str) -> bool {
    ["/sandboxes", "/v2/sandboxes"]
        .iter()
        .any(|root| path == *root || path.starts_with(&format!("{root}/")))
}

/// Answers a control-plane request.
pub async fn serve(
    api: &impl Api,
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: &[u8],
) -> Result<Reply, ApiError> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let segments = match segments.as_slice() {
        ["v2", rest @ ..] => rest,
        all => all,
    };
    match (segments, method.clone()) {
        (["sandboxes"], Method::POST) => create(api, body).await,
        (["sandboxes"], Method::GET) => list(api, query).await,
        (["sandboxes", id], Method::GET) => {
            let (sandbox, agent) = find(api, id).await?;
            Ok(Reply::json(StatusCode::OK, &detail(&sandbox, &agent)))
        }
        (["sandboxes", id], Method::DELETE) => kill(api, id).await,
        (["sandboxes", id, "timeout"], Method::POST) => set_timeout(api, id, body).await,
        (["sandboxes", id, "connect"], Method::POST) => connect(api, id, body).await,
        (["sandboxes", id, "pause"], Method::POST) => pause(api, id).await,
        (["sandboxes", id, "resume"], Method::POST) => resume(api, id, body).await,
        (["sandboxes", id, "metrics"], Method::GET) => metrics(api, id).await,
        (
            [
                "sandboxes",
                _,
                "refreshes" | "logs" | "fork" | "snapshots" | "network",
            ],
            _,
        ) => Err(ApiError::new(
            ErrorKind::MethodNotAllowed,
            format!("{method} {path} is not served by agentos (see docs/e2b.md for what is)"),
        )),
        _ => Err(ApiError::new(
            ErrorKind::NotFound,
            format!("no E2B API call is {method} {path} (see docs/e2b.md)"),
        )),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateBody {
    #[serde(rename = "templateID", default)]
    template_id: Option<String>,
    #[serde(default)]
    timeout: Option<u64>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    env_vars: Option<BTreeMap<String, String>>,
}

/// The answer to create and connect.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Created<'a> {
    #[serde(rename = "templateID")]
    template_id: &'a str,
    #[serde(rename = "sandboxID")]
    sandbox_id: &'a str,
    #[serde(rename = "clientID")]
    client_id: &'a str,
    envd_version: &'static str,
    envd_access_token: &'a str,
    alias: &'a str,
    domain: Option<&'a str>,
}

fn created(sandbox: &Sandbox) -> Created<'_> {
    Created {
        template_id: &sandbox.template,
        sandbox_id: &sandbox.id,
        client_id: &sandbox.client_id,
        envd_version: ENVD_VERSION,
        envd_access_token: &sandbox.access_token,
        alias: &sandbox.template,
        domain: None,
    }
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8], what: &str) -> Result<T, ApiError> {
    let body = if body.is_empty() {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            ErrorKind::BadRequest,
            format!("the body of {what} is not valid: {e}"),
        )
    })
}

fn timeout_of(secs: Option<u64>) -> Result<Duration, ApiError> {
    match secs.unwrap_or(DEFAULT_TIMEOUT_S) {
        secs @ 1..=MAX_TIMEOUT_S => Ok(Duration::from_secs(secs)),
        secs => Err(ApiError::new(
            ErrorKind::BadRequest,
            format!("a timeout of {secs} s is out of range: use 1 to {MAX_TIMEOUT_S} seconds"),
        )),
    }
}

async fn create(api: &impl Api, body: &[u8]) -> Result<Reply, ApiError> {
    let body: CreateBody = parse(body, "a sandbox to create")?;
    let life = timeout_of(body.timeout)?;
    let template = body.template_id.unwrap_or_else(|| BASE_TEMPLATE.to_owned());
    let id = new_id()?;
    let mut spawn = SpawnRequest {
        name: id.clone(),
        wait: true,
        ..SpawnRequest::default()
    };
    if template == BASE_TEMPLATE {
        spawn.template = Some(template.clone());
    } else {
        // Every other template is a model bundle (`agentos model ls`).
        spawn.model = Some(template.clone());
    }
    api.call(Request::Spawn(spawn)).await?;
    let started = SystemTime::now();
    let sandbox = Sandbox {
        id,
        template,
        client_id: random_text(8)?,
        metadata: body.metadata.unwrap_or_default(),
        env: body.env_vars.unwrap_or_default(),
        started,
        end: started + life,
        access_token: random_text(32)?,
        paused: false,
        saved: None,
        ending: Default::default(),
    };
    api.registry().insert(sandbox.clone());
    tracing::info!(
        sandbox = sandbox.id,
        template = sandbox.template,
        "sandbox created"
    );
    Ok(Reply::json(StatusCode::CREATED, &created(&sandbox)))
}

/// A fresh sandbox id.
fn new_id() -> Result<String, ApiError> {
    let tail = random_text(ID_CHARS - 1)?;
    Ok(format!("i{tail}"))
}

/// Whether `id` can be a sandbox's id (lowercase letters and digits).
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

fn unknown(id: &str) -> ApiError {
    ApiError::new(
        ErrorKind::NotFound,
        format!("sandbox {} not found", agentos_protocol::clip(id, 80)),
    )
}

/// A sandbox and its agent; an agent that is gone takes its sandbox with it.
pub async fn find(api: &impl Api, id: &str) -> Result<(Sandbox, AgentInfo), ApiError> {
    let sandbox = api.registry().get(id).ok_or_else(|| unknown(id))?;
    let info = api
        .call(Request::Inspect(NameRequest {
            name: id.to_owned(),
        }))
        .await;
    match info {
        Ok(value) => {
            let agent: AgentInfo = serde_json::from_value(value)
                .map_err(|e| ApiError::new(ErrorKind::Failed, e.to_string()))?;
            Ok((sandbox, agent))
        }
        // A saved sandbox's agent is away while it is restored.
        Err(e) if e.kind == ErrorKind::UnknownAgent && sandbox.saved.is_some() => {
            Err(ApiError::new(
                ErrorKind::NotRunning,
                format!("sandbox {id} is being resumed; try again"),
            ))
        }
        Err(e) if e.kind == ErrorKind::UnknownAgent => {
            api.registry().remove(id);
            Err(unknown(id))
        }
        Err(e) => Err(e),
    }
}

/// A sandbox as `GET /sandboxes/{id}` and listings show it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Detail<'a> {
    #[serde(rename = "templateID")]
    template_id: &'a str,
    #[serde(rename = "sandboxID")]
    sandbox_id: &'a str,
    #[serde(rename = "clientID")]
    client_id: &'a str,
    alias: &'a str,
    envd_version: &'static str,
    started_at: String,
    end_at: String,
    cpu_count: u8,
    #[serde(rename = "memoryMB")]
    memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    disk_size_mb: u64,
    state: &'static str,
    metadata: &'a BTreeMap<String, String>,
}

fn state(sandbox: &Sandbox, agent: &AgentInfo) -> &'static str {
    if sandbox.paused || agent.paused {
        "paused"
    } else {
        "running"
    }
}

fn detail<'a>(sandbox: &'a Sandbox, agent: &AgentInfo) -> Detail<'a> {
    Detail {
        template_id: &sandbox.template,
        sandbox_id: &sandbox.id,
        client_id: &sandbox.client_id,
        alias: &sandbox.template,
        envd_version: ENVD_VERSION,
        started_at: rfc3339(sandbox.started),
        end_at: rfc3339(sandbox.end),
        cpu_count: agent.vcpus,
        memory_mb: agent.memory_mib,
        // The guest's files live in its memory.
        disk_size_mb: 0,
        state: state(sandbox, agent),
        metadata: &sandbox.metadata,
    }
}

/// A time as RFC 3339, in UTC, to the second.
pub fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    #[serde(default)]
    metadata: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    next_token: Option<String>,
}

async fn list(api: &impl Api, query: Option<&str>) -> Result<Reply, ApiError> {
    let query: ListQuery = serde_urlencoded::from_str(query.unwrap_or("")).map_err(|e| {
        ApiError::new(
            ErrorKind::BadRequest,
            format!("the listing's query is not valid: {e}"),
        )
    })?;
    // `metadata` is itself a query string: `k=v&k2=v2`.
    let wanted: BTreeMap<String, String> = match &query.metadata {
        Some(text) => serde_urlencoded::from_str(text).map_err(|e| {
            ApiError::new(
                ErrorKind::BadRequest,
                format!("`metadata` is not `key=value&...`: {e}"),
            )
        })?,
        None => BTreeMap::new(),
    };
    let states: Option<Vec<&str>> = query.state.as_deref().map(|s| {
        s.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    });
    let limit = query.limit.unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE);
    let agents: BTreeMap<String, AgentInfo> = match api.call(Request::Ps).await {
        Ok(value) => serde_json::from_value::<super::super::api::PsReply>(value)
            .map_err(|e| ApiError::new(ErrorKind::Failed, e.to_string()))?
            .agents
            .into_iter()
            .map(|a| (a.name.clone(), a))
            .collect(),
        Err(e) => return Err(e),
    };
    let mut page = Vec::new();
    let mut next = None;
    for sandbox in api.registry().all() {
        if query
            .next_token
            .as_ref()
            .is_some_and(|after| sandbox.id <= *after)
        {
            continue;
        }
        let Some(agent) = agents.get(&sandbox.id) else {
            continue;
        };
        // A sandbox saved by its pause has a stopped agent until it resumes.
        if sandbox.saved.is_none()
            && matches!(
                agent.state,
                AgentState::Failed | AgentState::Exited | AgentState::Stopped
            )
        {
            continue;
        }
        if !wanted
            .iter()
            .all(|(k, v)| sandbox.metadata.get(k) == Some(v))
        {
            continue;
        }
        if let Some(states) = &states
            && !states.contains(&state(&sandbox, agent))
        {
            continue;
        }
        if page.len() == limit {
            next = page
                .last()
                .map(|(s, _): &(Sandbox, AgentInfo)| s.id.clone());
            break;
        }
        page.push((sandbox, agent.clone()));
    }
    let listed: Vec<Detail<'_>> = page.iter().map(|(s, a)| detail(s, a)).collect();
    let mut reply = Reply::json(StatusCode::OK, &listed);
    if let Some(token) = next {
        reply = reply.header("x-next-token", &token);
    }
    Ok(reply)
}

/// How long the CPU use a metrics sample reports is measured over.
const CPU_SAMPLE: Duration = Duration::from_millis(500);

/// One sample of a sandbox's CPU and memory, measured now (the daemon keeps no history).
async fn metrics(api: &impl Api, id: &str) -> Result<Reply, ApiError> {
    let (_, agent) = find(api, id).await?;
    let cpu_seconds = async || -> Result<(f64, f64), ApiError> {
        let value = api.call(Request::Metrics).await?;
        let text = value["text"].as_str().unwrap_or_default();
        let read = |family: &str| sample(text, family, id).unwrap_or(0.0);
        Ok((
            read("agentos_agent_cpu_seconds_total"),
            read("agentos_agent_memory_bytes"),
        ))
    };
    let (before, _) = cpu_seconds().await?;
    tokio::time::sleep(CPU_SAMPLE).await;
    let (after, memory) = cpu_seconds().await?;
    let cpus = f64::from(agent.vcpus.max(1));
    let used = ((after - before).max(0.0) / CPU_SAMPLE.as_secs_f64() / cpus * 100.0).min(100.0);
    let now = SystemTime::now();
    let unix = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let sample = serde_json::json!({
        "timestamp": rfc3339(now),
        "timestampUnix": unix,
        "cpuCount": agent.vcpus,
        "cpuUsedPct": (used * 10.0).round() / 10.0,
        "memUsed": memory as u64,
        "memTotal": agent.memory_mib * 1024 * 1024,
        "memCache": 0,
        "diskUsed": 0,
        "diskTotal": 0,
    });
    Ok(Reply::json(StatusCode::OK, &[sample]))
}

/// The value of `family{agent="id"}` in Prometheus text.
fn sample(text: &str, family: &str, id: &str) -> Option<f64> {
    let key = format!("{family}{{agent=\"{id}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&key))
        .and_then(|value| value.trim().parse().ok())
}

async fn kill(api: &impl Api, id: &str) -> Result<Reply, ApiError> {
    let Some(sandbox) = api.registry().get(id) else {
        return Err(unknown(id));
    };
    sandbox.ending.store(true, Ordering::SeqCst);
    let removed = api
        .call(Request::Rm(RmRequest {
            name: id.to_owned(),
            force: true,
        }))
        .await;
    api.registry().remove(id);
    if let Some(saves) = api.registry().saves_of(id) {
        remove_save_dir(&saves);
    }
    match removed {
        Ok(_) => {}
        Err(e) if e.kind == ErrorKind::UnknownAgent => return Err(unknown(id)),
        Err(e) => return Err(e),
    }
    tracing::info!(sandbox = id, "sandbox killed");
    Ok(Reply::empty(StatusCode::NO_CONTENT))
}

#[derive(Deserialize)]
struct TimeoutBody {
    #[serde(default)]
    timeout: Option<u64>,
}

async fn set_timeout(api: &impl Api, id: &str, body: &[u8]) -> Result<Reply, ApiError> {
    let body: TimeoutBody = parse(body, "a timeout")?;
    let Some(secs) = body.timeout else {
        return Err(ApiError::new(
            ErrorKind::BadRequest,
            "send `{\"timeout\": SECONDS}`",
        ));
    };
    let life = timeout_of(Some(secs))?;
    find(api, id).await?;
    if !api.registry().set_end(id, SystemTime::now() + life) {
        return Err(unknown(id));
    }
    Ok(Reply::empty(StatusCode::NO_CONTENT))
}

/// Pauses a sandbox: saves it (the daemon's `snapshot`: its memory, processes and devices
/// written into its own directory of the daemon's, its VM ended) where the daemon keeps saved
/// sandboxes, or else freezes its VM in memory. Either way it does not time out and answers no
/// in-sandbox request until it is resumed (or connected to).
async fn pause(api: &impl Api, id: &str) -> Result<Reply, ApiError> {
    let (sandbox, _) = find(api, id).await?;
    if sandbox.paused {
        return Err(ApiError::new(
            ErrorKind::AlreadyExists,
            format!("sandbox {id} is already paused"),
        ));
    }
    let saved = match api.registry().saves_of(id) {
        Some(saves) => {
            // A directory of its own each time: a sandbox restored from one is saved into
            // another, then the older ones go.
            let dir = saves.join(random_text(8)?);
            make_save_dir(&dir)?;
            let saving = api.call(Request::Snapshot(SnapshotRequest {
                name: id.to_owned(),
                to: dir.display().to_string(),
            }));
            if let Err(e) = saving.await {
                remove_save_dir(&dir);
                return Err(e);
            }
            for older in std::fs::read_dir(&saves).into_iter().flatten().flatten() {
                if older.path() != dir {
                    remove_save_dir(&older.path());
                }
            }
            Some(dir)
        }
        None => {
            api.call(Request::Pause(NameRequest {
                name: id.to_owned(),
            }))
            .await?;
            None
        }
    };
    tracing::info!(sandbox = id, saved = saved.is_some(), "sandbox paused");
    api.registry().set_paused(id, true, saved);
    Ok(Reply::empty(StatusCode::NO_CONTENT))
}

/// A fresh directory (private to the daemon's user) for a sandbox to be saved into.
fn make_save_dir(dir: &Path) -> Result<(), ApiError> {
    use std::os::unix::fs::DirBuilderExt;
    let failed = |e: std::io::Error| {
        ApiError::new(
            ErrorKind::Failed,
            format!("cannot make {} to save the sandbox in: {e}", dir.display()),
        )
    };
    remove_save_dir(dir);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(failed)
}

/// Removes a saved sandbox's directory (its memory file with it), as best it can.
fn remove_save_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a saved sandbox");
    }
}

/// Lets a paused sandbox run again, for `timeout` seconds (its creation's default unless
/// given) from now.
async fn resume(api: &impl Api, id: &str, body: &[u8]) -> Result<Reply, ApiError> {
    let body: TimeoutBody = parse(body, "a resumption")?;
    let (sandbox, _) = find(api, id).await?;
    if !sandbox.paused {
        return Err(ApiError::new(
            ErrorKind::AlreadyExists,
            format!("sandbox {id} is already running"),
        ));
    }
    let sandbox = thaw(api, sandbox, body.timeout).await?;
    Ok(Reply::json(StatusCode::CREATED, &created(&sandbox)))
}

async fn thaw(
    api: &impl Api,
    mut sandbox: Sandbox,
    timeout: Option<u64>,
) -> Result<Sandbox, ApiError> {
    let life = timeout_of(timeout)?;
    match &sandbox.saved {
        Some(dir) => {
            // The saved agent is stopped: it goes, and comes back from its snapshot under the
            // same name.
            match api
                .call(Request::Rm(RmRequest {
                    name: sandbox.id.clone(),
                    force: true,
                }))
                .await
            {
                Ok(_) => {}
                Err(e) if e.kind == ErrorKind::UnknownAgent => {}
                Err(e) => return Err(e),
            }
            api.call(Request::Spawn(SpawnRequest {
                name: sandbox.id.clone(),
                from: Some(dir.display().to_string()),
                wait: true,
                ..SpawnRequest::default()
            }))
            .await?;
        }
        None => {
            api.call(Request::Resume(NameRequest {
                name: sandbox.id.clone(),
            }))
            .await?;
        }
    }
    sandbox.end = SystemTime::now() + life;
    sandbox.paused = false;
    api.registry().set_end(&sandbox.id, sandbox.end);
    // The restored VM maps the saved memory: its directory stays until the sandbox is saved
    // again or goes.
    api.registry().set_paused(&sandbox.id, false, None);
    tracing::info!(sandbox = sandbox.id, "sandbox resumed");
    Ok(sandbox)
}

async fn connect(api: &impl Api, id: &str, body: &[u8]) -> Result<Reply, ApiError> {
    let body: TimeoutBody = parse(body, "a connection")?;
    let (sandbox, _) = find(api, id).await?;
    if sandbox.paused {
        // Connecting resumes a paused sandbox.
        let sandbox = thaw(api, sandbox, body.timeout).await?;
        return Ok(Reply::json(StatusCode::CREATED, &created(&sandbox)));
    }
    let mut sandbox = sandbox;
    if let Some(secs) = body.timeout {
        // Connecting gives a sandbox more time, never less.
        let end = SystemTime::now() + timeout_of(Some(secs))?;
        if end > sandbox.end && api.registry().set_end(id, end) {
            sandbox.end = end;
        }
    }
    Ok(Reply::json(StatusCode::OK, &created(&sandbox)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_plane_paths_are_told_from_the_api_s_own() {
        assert!(claims("/sandboxes"));
        assert!(claims("/v2/sandboxes"));
        assert!(claims("/sandboxes/i1/timeout"));
        assert!(!claims("/sandboxesx"));
        assert!(!claims("/agents"));
    }

    #[test]
    fn ids_are_lowercase_letters_and_digits() {
        let id = new_id().unwrap();
        assert_eq!(id.len(), ID_CHARS);
        assert!(valid_id(&id), "{id}");
        assert!(id.starts_with('i'));
        assert!(!valid_id("I1"));
        assert!(!valid_id("a-b"));
        assert!(!valid_id(""));
        assert!(!valid_id(&"a".repeat(65)));
    }

    #[test]
    fn timeouts_are_bounded() {
        assert_eq!(
            timeout_of(None).unwrap(),
            Duration::from_secs(DEFAULT_TIMEOUT_S)
        );
        assert!(timeout_of(Some(0)).is_err());
        assert!(timeout_of(Some(MAX_TIMEOUT_S + 1)).is_err());
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(86_400)),
            "1970-01-02T00:00:00Z"
        );
    }

    #[test]
    fn samples_are_read_from_the_metrics_text() {
        let text = "# HELP x\nagentos_agent_cpu_seconds_total{agent=\"i1\"} 1.5\nagentos_agent_cpu_seconds_total{agent=\"i10\"} 9\n";
        assert_eq!(
            sample(text, "agentos_agent_cpu_seconds_total", "i1"),
            Some(1.5)
        );
        assert_eq!(
            sample(text, "agentos_agent_cpu_seconds_total", "i10"),
            Some(9.0)
        );
        assert_eq!(sample(text, "agentos_agent_memory_bytes", "i1"), None);
    }

    #[test]
    fn expired_sandboxes_are_taken_out_once() {
        let registry = Registry::default();
        let now = SystemTime::now();
        for (id, end) in [
            ("a", now - Duration::from_secs(1)),
            ("b", now + Duration::from_secs(60)),
        ] {
            registry.insert(Sandbox {
                id: id.into(),
                template: BASE_TEMPLATE.into(),
                client_id: String::new(),
                metadata: BTreeMap::new(),
                env: BTreeMap::new(),
                started: now,
                end,
                access_token: String::new(),
                paused: false,
                saved: None,
                ending: Default::default(),
            });
        }
        registry.set_paused("a", true, None);
        assert!(
            registry.take_expired(now).is_empty(),
            "a paused sandbox does not time out"
        );
        registry.set_paused("a", false, None);
        let a = registry.get("a").unwrap();
        assert_eq!(registry.take_expired(now), ["a"]);
        assert!(a.ending.load(Ordering::SeqCst), "its streams learn it ends");
        assert!(registry.take_expired(now).is_empty());
        assert!(registry.set_end("b", now));
        assert_eq!(registry.take_expired(now), ["b"]);
        assert!(!registry.set_end("b", now));
    }
}
