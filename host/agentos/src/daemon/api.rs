//! The daemon's API: what a client may ask and what it gets back, whatever carries it. Requests
//! arrive over HTTP (see [`super::routes`] for which method and path ask for what, and
//! [`super::server`] for the connections); `docs/api.md` describes them.

use std::time::Duration;

use agentos_protocol::files::{Change, Entry, FileErrorKind, FsOp};
use agentos_protocol::process::{Control, ProcessInfo};
use agentos_protocol::{ExitStatus, InferOptions, Program, PtySize, StreamData, Task};
use serde::{Deserialize, Serialize};

use agentos_core::cgroup::slice::PriorityClass;

/// The largest request body the daemon reads. A longer one gets a `too_large` error and the
/// connection is closed (its body is never read).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// What `exec` keeps of each output stream; more is cut and the reply says so.
pub const MAX_EXEC_OUTPUT_BYTES: usize = 256 * 1024;
/// The most `logs` reads of the log at once; a client reads on from `next_offset`.
pub const MAX_LOG_CHUNK_BYTES: u64 = 256 * 1024;
/// The largest reply body of a request that returns text (`exec`, `logs`).
pub const MAX_REPLY_BYTES: usize = 1 << 20;
/// The most one text of a reply (`exec`'s `stdout` and `stderr`, `logs`' `text`) takes once
/// written as a JSON string: a control byte takes 6 bytes there and a quote 2, so the 256 KiB
/// kept of a stream could take 1.5 MiB, more than a reply is. Text is cut to fit (see
/// [`fit_text`]).
pub const MAX_TEXT_JSON_BYTES: usize = 448 * 1024;
/// What a reply needs beside its texts (field names, numbers).
const REPLY_FIELDS_BYTES: usize = 4 * 1024;
const _: () = assert!(2 * MAX_TEXT_JSON_BYTES + REPLY_FIELDS_BYTES <= MAX_REPLY_BYTES);

/// The longest `exec` (its `run.timeout_ms`) and `group_input` (its `timeout_s`): a day. Durations are range-checked
/// as requests are read: an instant plus one far past this would overflow, and a panic in the
/// daemon ends every VM it runs.
pub const MAX_TIMEOUT_S: u64 = 86_400;
/// The longest `boot_timeout_s` of `spawn`: an hour.
pub const MAX_BOOT_TIMEOUT_S: u64 = 3_600;
/// What an `exec` without `run.timeout_ms` gets: the program is killed after an hour.
pub const DEFAULT_EXEC_TIMEOUT_S: u64 = 3_600;
/// How long `group_input` waits for the results unless told otherwise.
pub const DEFAULT_INPUT_TIMEOUT_S: u64 = 600;
/// How long an `infer` may take.
pub const INFER_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    /// The daemon's version and process id.
    Version,
    /// Boot a new agent.
    Spawn(SpawnRequest),
    /// Every agent and its state.
    Ps,
    /// One agent and its state.
    Inspect(NameRequest),
    /// The model bundles installed for the daemon's agents.
    Models,
    /// Run a program in an agent and wait for its end.
    Exec(ExecCall),
    /// Run the agent's model on texts.
    Infer(InferCall),
    /// An agent's serial console and the daemon's notes about it, from a byte offset.
    Logs(LogsRequest),
    /// Shut an agent's VM down; the agent stays listed until `rm`.
    Stop(NameRequest),
    /// Freeze a running agent's VM (its cgroup's freezer: no CPU at all, its memory kept).
    Pause(NameRequest),
    /// Let a paused agent's VM run again.
    Resume(NameRequest),
    /// Forget an agent; a running one is stopped first only with `force`.
    Rm(RmRequest),
    /// The agents' CPU and memory figures as Prometheus text.
    Metrics,
    /// Start the agents of a group file and the router between them.
    GroupUp(GroupUpRequest),
    /// Stop a group's agents and forget them.
    GroupDown(GroupRequest),
    /// Give a running group an input and wait for its results.
    GroupInput(GroupInputRequest),
    /// Save a running agent to a directory of the daemon's host, and stop it (`spawn --from`
    /// runs it again).
    Snapshot(SnapshotRequest),
    /// Keep a pool of agents restored from a snapshot, ready for `spawn` with `pool`.
    PoolCreate(PoolCreateRequest),
    /// Remove a pool and its ready agents.
    PoolRm(PoolRequest),
    /// An agent's file, its bytes streamed in the reply's body.
    ReadFile(FileRequest),
    /// Write an agent's file from the request's body, streamed.
    WriteFile(WriteFileRequest),
    /// Look at or change an agent's files: stat, list, make a directory, move, remove.
    Fs(FsCall),
    /// Watch a directory of an agent: its changes streamed as they happen.
    Watch(WatchRequest),
    /// Start a program in an agent: follow it (its events streamed as they happen) or, with
    /// `detach`, leave it running.
    Start(StartCall),
    /// The programs running in an agent.
    Processes(NameRequest),
    /// Follow a running program of an agent from now on.
    Attach(ProcessRequest),
    /// Feed, close the input of, or signal a running program of an agent.
    Control(ControlCall),
}

impl Request {
    /// The name of the operation, for logs and counters.
    pub fn op(&self) -> &'static str {
        match self {
            Self::Version => "version",
            Self::Spawn(_) => "spawn",
            Self::Ps => "ps",
            Self::Inspect(_) => "inspect",
            Self::Models => "models",
            Self::Exec(_) => "exec",
            Self::Infer(_) => "infer",
            Self::Logs(_) => "logs",
            Self::Stop(_) => "stop",
            Self::Pause(_) => "pause",
            Self::Resume(_) => "resume",
            Self::Rm(_) => "rm",
            Self::Metrics => "metrics",
            Self::GroupUp(_) => "group_up",
            Self::GroupDown(_) => "group_down",
            Self::GroupInput(_) => "group_input",
            Self::Snapshot(_) => "snapshot",
            Self::PoolCreate(_) => "pool_create",
            Self::PoolRm(_) => "pool_rm",
            Self::ReadFile(_) => "read_file",
            Self::WriteFile(_) => "write_file",
            Self::Watch(_) => "watch",
            Self::Start(_) => "start",
            Self::Processes(_) => "processes",
            Self::Attach(_) => "attach",
            Self::Control(call) => match call.control {
                Control::Stdin { .. } => "stdin",
                Control::CloseStdin => "close_stdin",
                Control::Signal { .. } => "signal",
                Control::Resize { .. } => "resize",
            },
            Self::Fs(call) => match call.op {
                FsOp::Stat { .. } => "stat",
                FsOp::List { .. } => "list",
                FsOp::MakeDir { .. } => "make_dir",
                FsOp::Move { .. } => "move",
                FsOp::Remove { .. } => "remove",
            },
        }
    }
}

/// Refuses a duration out of its range.
pub fn check_durations(request: &Request) -> Result<(), ApiError> {
    let run = match request {
        Request::Exec(call) => Some(&call.run),
        Request::Start(call) => Some(&call.run),
        _ => None,
    };
    if let Some(run) = run
        && let Some(ms) = run.timeout_ms
        && !(1..=MAX_TIMEOUT_S * 1000).contains(&ms)
    {
        return Err(ApiError::new(
            ErrorKind::Invalid,
            format!(
                "{} `run.timeout_ms` is {ms}: use 1 to {} ms",
                request.op(),
                MAX_TIMEOUT_S * 1000
            ),
        ));
    }
    let (field, secs, max) = match request {
        Request::GroupInput(GroupInputRequest {
            timeout_s: Some(secs),
            ..
        }) => ("group_input `timeout_s`", *secs, MAX_TIMEOUT_S),
        Request::Spawn(SpawnRequest {
            boot_timeout_s: Some(secs),
            ..
        }) => ("spawn `boot_timeout_s`", *secs, MAX_BOOT_TIMEOUT_S),
        _ => return Ok(()),
    };
    if (1..=max).contains(&secs) {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorKind::Invalid,
            format!("{field} is {secs}: use 1 to {max} seconds"),
        ))
    }
}

/// When the daemon boots an agent again after its VM ended (the one rule every supervisor keeps).
pub use agentos_core::agent::supervision::RestartPolicy;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpawnRequest {
    pub name: String,
    /// An installed model bundle the agent carries (`agentos model ls`).
    #[serde(default)]
    pub model: Option<String>,
    /// What the agent has beyond the agent image: `base` gives it GNU bash at `/bin/bash` and
    /// CPython (`python3`, standard library included); other names are refused.
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub vcpus: Option<u8>,
    #[serde(default)]
    pub memory_mib: Option<u64>,
    #[serde(default)]
    pub cpus: Option<f64>,
    #[serde(default)]
    pub cpuset: Option<String>,
    /// Pin to the CPU pinned agents load least; moved when others leave.
    #[serde(default)]
    pub pin: bool,
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub class: Option<PriorityClass>,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Seconds the guest agent has to come up (default 300; 1 to [`MAX_BOOT_TIMEOUT_S`]).
    #[serde(default)]
    pub boot_timeout_s: Option<u64>,
    /// Reply once the agent is up (or failed), instead of at once.
    #[serde(default)]
    pub wait: bool,
    /// When its slice does not fit beside the running agents, boot it once it does (instead
    /// of refusing it with `no_room`).
    #[serde(default)]
    pub queue: bool,
    /// Restore the agent saved in this directory of the daemon's host (absolute) instead of
    /// booting one; vCPUs and memory are the snapshot's, and the agent restarts from it too.
    #[serde(default)]
    pub from: Option<String>,
    /// Take an agent from this warm pool (`pool_create`): one restored ahead of need, up at
    /// once; its snapshot decides what `from` would.
    #[serde(default)]
    pub pool: Option<String>,
    /// Host PCI devices passed to the agent with VFIO, `vfio:ADDRESS[,mmap=off]`: each bound to
    /// vfio-pci and held by no other agent (`no_room` otherwise).
    #[serde(default)]
    pub devices: Vec<String>,
    /// This many GPUs (PCI class display, bound to vfio-pci) that no other agent holds.
    #[serde(default)]
    pub gpus: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolCreateRequest {
    pub name: String,
    /// The snapshot directory its agents are restored from (absolute, on the daemon's host).
    pub from: String,
    /// Agents kept ready (1 to 64).
    pub size: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolRequest {
    pub name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    pub name: String,
    /// An existing directory of the daemon's host, as an absolute path: its `memory` and
    /// `vm.state` are replaced.
    pub to: String,
}

/// Answer to `snapshot`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotReply {
    pub name: String,
    pub to: String,
    /// What the memory file takes on disk (zero pages are holes).
    pub memory_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecCall {
    pub name: String,
    /// The program, as the guest agent runs it; its `timeout_ms` (default
    /// [`DEFAULT_EXEC_TIMEOUT_S`] seconds; 1 ms to [`MAX_TIMEOUT_S`] seconds) is when the agent
    /// kills it.
    pub run: Program,
    /// Standard input of the program (none: empty).
    #[serde(default)]
    pub stdin: Option<String>,
}

impl ExecCall {
    /// How long the program may run.
    pub fn timeout(&self) -> Duration {
        self.run.timeout_ms.map_or(
            Duration::from_secs(DEFAULT_EXEC_TIMEOUT_S),
            Duration::from_millis,
        )
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferCall {
    pub name: String,
    /// Default: the agent's model.
    #[serde(default)]
    pub model: Option<String>,
    pub task: Task,
    pub inputs: Vec<String>,
    #[serde(default)]
    pub options: InferOptions,
}

/// A program to start in an agent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartCall {
    pub name: String,
    pub run: Program,
    /// Its standard input is open, to be fed with `stdin` requests; otherwise it is empty.
    #[serde(default)]
    pub stdin: bool,
    /// Leave it running and answer with its process id at once; otherwise the reply follows it
    /// to its end, and it is killed if the client goes first.
    #[serde(default)]
    pub detach: bool,
    /// Follow it, but let it run on if the client goes (until it ends or its timeout passes).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep: bool,
    /// A name to find it by among the agent's running programs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Run it on a terminal of this size; its input is then open as with `stdin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<PtySize>,
}

/// A directory of an agent to watch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchRequest {
    pub name: String,
    pub path: String,
    /// Every directory below it too, as they come and go.
    #[serde(default)]
    pub recursive: bool,
}

/// One line of a watch's stream (newline-delimited JSON): `watching` once it began, then each
/// change as it happens, or `error` if the watch failed on the way.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchLine {
    Watching { path: String },
    Change(Change),
    Error(ApiError),
}

/// A running program of an agent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessRequest {
    pub name: String,
    pub pid: u32,
}

/// What to do to a running program of an agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlCall {
    pub name: String,
    pub pid: u32,
    pub control: Control,
}

/// The answer to a `start` with `detach`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartedReply {
    pub pid: u32,
}

/// The answer to `processes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessesReply {
    pub processes: Vec<ProcessInfo>,
}

/// One line of a followed program's stream (newline-delimited JSON): `started` first, its
/// output as it comes (base64), then `exited`, or `error` if following it failed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgramLine {
    Started { pid: u32 },
    Stdout(StreamData),
    Stderr(StreamData),
    Exited(ExitStatus),
    Error(ApiError),
}

/// An agent's file, by its absolute path in the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRequest {
    pub name: String,
    pub path: String,
}

/// A file to write into an agent; its bytes are the request's body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteFileRequest {
    pub name: String,
    pub path: String,
    /// Permission bits of a new file (0o644 when absent; a replaced file keeps its own).
    pub mode: Option<u32>,
    /// The guest account that owns a new file and the directories made for it (root when
    /// absent; a replaced file keeps its owner).
    pub user: Option<String>,
    /// Written into the file itself as it comes (E2B's way, which watchers see as a write),
    /// not put in place once whole.
    pub in_place: bool,
}

/// One operation on an agent's files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsCall {
    pub name: String,
    pub op: FsOp,
}

/// The answer to `write_file`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileWrittenReply {
    pub path: String,
    pub size: u64,
}

/// The answer to `list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListReply {
    pub entries: Vec<Entry>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsRequest {
    pub name: String,
    #[serde(default)]
    pub offset: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameRequest {
    pub name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RmRequest {
    pub name: String,
    #[serde(default)]
    pub force: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupUpRequest {
    /// Where the file came from, for error messages.
    pub file: String,
    /// The group file's text (TOML).
    pub text: String,
    /// Reply once every agent is up (or one failed, and the group was stopped again).
    #[serde(default)]
    pub wait: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupRequest {
    pub group: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupInputRequest {
    pub group: String,
    pub text: String,
    /// How long to wait for the results (default [`DEFAULT_INPUT_TIMEOUT_S`]; 1 to
    /// [`MAX_TIMEOUT_S`]).
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupUpReply {
    pub group: String,
    pub members: Vec<AgentInfo>,
}

/// The body of every error answer: `{"error": {"kind": ..., "message": ...}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ApiError,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The body or the query is not one the path takes.
    BadRequest,
    /// A TCP client without the API's token.
    Unauthorized,
    /// No resource has that path.
    NotFound,
    /// The path takes other methods.
    MethodNotAllowed,
    /// The body is longer than [`MAX_REQUEST_BYTES`].
    TooLarge,
    /// No agent has that name.
    UnknownAgent,
    /// No group of that name is up.
    UnknownGroup,
    /// An agent already has that name.
    DuplicateName,
    /// A name, model, size or slice that cannot be used.
    Invalid,
    /// The agent is not running now (booting, restarting, ended).
    NotRunning,
    /// The host has no room for the agent's slice.
    NoRoom,
    /// The VM or its guest agent failed the request.
    Failed,
    /// The daemon is stopping.
    ShuttingDown,
    /// The request passed its deadline (see docs/api.md); what it started may go on.
    TimedOut,
    /// The daemon serves as many requests of this kind as it takes; try again later.
    Busy,
    /// The agent's file or directory is already there.
    AlreadyExists,
    /// The guest refused access to the file.
    PermissionDenied,
    /// A path names a directory where a file was asked for.
    IsADirectory,
    /// Something on a path is not a directory where one was needed.
    NotADirectory,
    /// The agent's file system is full.
    NoSpace,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 20] = [
        Self::BadRequest,
        Self::Unauthorized,
        Self::NotFound,
        Self::MethodNotAllowed,
        Self::TooLarge,
        Self::UnknownAgent,
        Self::UnknownGroup,
        Self::DuplicateName,
        Self::Invalid,
        Self::NotRunning,
        Self::NoRoom,
        Self::Failed,
        Self::ShuttingDown,
        Self::TimedOut,
        Self::Busy,
        Self::AlreadyExists,
        Self::PermissionDenied,
        Self::IsADirectory,
        Self::NotADirectory,
        Self::NoSpace,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::TooLarge => "too_large",
            Self::UnknownAgent => "unknown_agent",
            Self::UnknownGroup => "unknown_group",
            Self::DuplicateName => "duplicate_name",
            Self::Invalid => "invalid",
            Self::NotRunning => "not_running",
            Self::NoRoom => "no_room",
            Self::Failed => "failed",
            Self::ShuttingDown => "shutting_down",
            Self::TimedOut => "timed_out",
            Self::Busy => "busy",
            Self::AlreadyExists => "already_exists",
            Self::PermissionDenied => "permission_denied",
            Self::IsADirectory => "is_a_directory",
            Self::NotADirectory => "not_a_directory",
            Self::NoSpace => "no_space",
        }
    }

    /// The kind of a guest's refusal of a file request.
    pub fn of_file(kind: FileErrorKind) -> Self {
        match kind {
            FileErrorKind::NotFound => Self::NotFound,
            FileErrorKind::AlreadyExists => Self::AlreadyExists,
            FileErrorKind::PermissionDenied => Self::PermissionDenied,
            FileErrorKind::IsADirectory => Self::IsADirectory,
            FileErrorKind::NotADirectory => Self::NotADirectory,
            FileErrorKind::Invalid => Self::Invalid,
            FileErrorKind::NoSpace => Self::NoSpace,
            FileErrorKind::Failed => Self::Failed,
        }
    }
}

/// The longest error message the daemon sends: messages quote names and values a client sent.
pub const MAX_ERROR_BYTES: usize = 1024;

impl ApiError {
    /// An error whose message is one line of at most [`MAX_ERROR_BYTES`], whatever it quotes.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        let message: String = message
            .into()
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        Self {
            kind,
            message: agentos_protocol::clip(&message, MAX_ERROR_BYTES),
        }
    }
}

/// Where an agent is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    Booting,
    Running,
    /// Its VM ended; it is booted again after a pause.
    Restarting,
    /// Its VM ended and the restart policy leaves it so.
    Exited,
    /// It did not boot, or crashed or hung and is not restarted.
    Failed,
    /// Stopped by `stop`.
    Stopped,
}

impl AgentState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Booting => "booting",
            Self::Running => "running",
            Self::Restarting => "restarting",
            Self::Exited => "exited",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
        }
    }

    /// Whether the agent has a VM, or is about to have one.
    pub fn is_live(self) -> bool {
        matches!(self, Self::Booting | Self::Running | Self::Restarting)
    }
}

/// One agent, as `spawn`, `ps` and `stop` describe it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub name: String,
    pub state: AgentState,
    #[serde(default)]
    pub model: Option<String>,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub restart: RestartPolicy,
    /// Times its VM was booted again.
    pub restarts: u32,
    #[serde(default)]
    pub vmm_pid: Option<u32>,
    /// Boot time of its current VM.
    #[serde(default)]
    pub boot_ms: Option<u64>,
    /// Seconds in its current state.
    pub for_s: u64,
    /// Why it last ended or failed.
    #[serde(default)]
    pub last_error: Option<String>,
    /// Whether its VM is frozen (`agentos pause`, or a batch agent while an interactive one
    /// works).
    #[serde(default)]
    pub paused: bool,
    /// The jail its current VM's VMM runs in (`full`, `rootless`, `none`).
    #[serde(default)]
    pub jail: Option<agentos_jail::JailLevel>,
    /// The host PCI devices it holds (`ADDRESS[,mmap=off]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PsReply {
    pub agents: Vec<AgentInfo>,
    /// The warm pools, and how many agents each has ready.
    #[serde(default)]
    pub pools: Vec<agentos_core::agent::pool::PoolInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecReply {
    #[serde(default)]
    pub code: Option<i32>,
    #[serde(default)]
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// The program's output, as UTF-8 (invalid bytes replaced), cut at
    /// [`MAX_EXEC_OUTPUT_BYTES`] and where its JSON form reaches [`MAX_TEXT_JSON_BYTES`].
    pub stdout: String,
    pub stderr: String,
    /// Whether either stream was cut.
    pub truncated: bool,
    pub ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsReply {
    /// At most [`MAX_LOG_CHUNK_BYTES`] of the log, as UTF-8 (invalid bytes replaced), cut where
    /// its JSON form reaches [`MAX_TEXT_JSON_BYTES`].
    pub text: String,
    /// Where the next read starts: past the bytes `text` stands for; equal to the log's length
    /// when everything was read.
    pub next_offset: u64,
}

/// Text made of bytes for a reply, and how many of the bytes it stands for.
#[derive(Debug, PartialEq, Eq)]
pub struct FittedText {
    pub text: String,
    pub used: usize,
}

/// The longest start of `bytes` whose text fits `budget` bytes as a JSON string (quotes aside):
/// the bytes read as UTF-8, each invalid sequence replaced by U+FFFD as
/// `String::from_utf8_lossy` does, cut between characters. Cutting after escaping is what keeps a
/// reply within [`MAX_REPLY_BYTES`] whatever the bytes. With `more_may_follow`, a character whose end is not
/// in `bytes` yet is left for the next read, unless it is all there is: a reader always moves on.
pub fn fit_text(bytes: &[u8], budget: usize, more_may_follow: bool) -> FittedText {
    let mut fitted = FittedText {
        text: String::new(),
        used: 0,
    };
    let mut size = 0;
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            size += json_len(c);
            if size > budget {
                return fitted;
            }
            fitted.text.push(c);
            fitted.used += c.len_utf8();
        }
        let invalid = chunk.invalid();
        if invalid.is_empty() {
            continue;
        }
        let unfinished = fitted.used + invalid.len() == bytes.len()
            && std::str::from_utf8(invalid).is_err_and(|e| e.error_len().is_none());
        if unfinished && more_may_follow && fitted.used > 0 {
            return fitted;
        }
        size += json_len(char::REPLACEMENT_CHARACTER);
        if size > budget {
            return fitted;
        }
        fitted.text.push(char::REPLACEMENT_CHARACTER);
        fitted.used += invalid.len();
    }
    fitted
}

/// The bytes `c` takes in a JSON string as serde_json writes it.
fn json_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\u{8}' | '\t' | '\n' | '\u{c}' | '\r' => 2,
        '\0'..='\u{1f}' => 6,
        c => c.len_utf8(),
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionReply {
    pub version: String,
    pub pid: u32,
}

/// Answer to `models`: the installed bundles, and the problems of those that cannot be used.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelsReply {
    pub models: Vec<ModelInfo>,
    #[serde(default)]
    pub broken: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Where the bundle is installed.
    pub dir: String,
    #[serde(flatten)]
    pub manifest: agentos_protocol::bundle::BundleManifest,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsReply {
    pub text: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_their_kind_and_one_line() {
        let error = ErrorBody {
            error: ApiError::new(ErrorKind::UnknownAgent, "no agent named `x`"),
        };
        assert_eq!(
            serde_json::to_string(&error).unwrap(),
            r#"{"error":{"kind":"unknown_agent","message":"no agent named `x`"}}"#
        );
        let long = ApiError::new(ErrorKind::BadRequest, format!("a\nb\r{}", "é".repeat(4000)));
        assert!(!long.message.contains(['\n', '\r']), "{}", long.message);
        assert!(long.message.starts_with("a b "));
        assert!(long.message.len() <= MAX_ERROR_BYTES + 4);
        for kind in ErrorKind::ALL {
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::Value::String(kind.as_str().into())
            );
        }
    }

    #[test]
    fn durations_out_of_their_range_are_invalid_and_named() {
        use hyper::Method;
        let read = |path: &str, body: &str| {
            crate::daemon::routes::route(&Method::POST, path, None, body.as_bytes())
        };
        let max = u64::MAX;
        let exec = "/agents/a/exec";
        for (path, body, field) in [
            (
                exec,
                format!(r#"{{"run":{{"program":"p","timeout_ms":{max}}}}}"#),
                "exec `run.timeout_ms`",
            ),
            (
                exec,
                r#"{"run":{"program":"p","timeout_ms":86401000}}"#.to_owned(),
                "exec `run.timeout_ms`",
            ),
            (
                exec,
                r#"{"run":{"program":"p","timeout_ms":0}}"#.to_owned(),
                "exec `run.timeout_ms`",
            ),
            (
                "/groups/g/input",
                format!(r#"{{"text":"t","timeout_s":{max}}}"#),
                "group_input `timeout_s`",
            ),
            (
                "/agents",
                format!(r#"{{"name":"a","boot_timeout_s":{max}}}"#),
                "spawn `boot_timeout_s`",
            ),
            (
                "/agents",
                r#"{"name":"a","boot_timeout_s":3601}"#.to_owned(),
                "spawn `boot_timeout_s`",
            ),
        ] {
            let e = read(path, &body).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Invalid, "{body}");
            assert!(e.message.starts_with(field), "{}", e.message);
            assert!(e.message.contains("use 1 to"), "{}", e.message);
        }
        for (path, body) in [
            (exec, r#"{"run":{"program":"p","timeout_ms":86400000}}"#),
            (exec, r#"{"run":{"program":"p","timeout_ms":1}}"#),
            ("/groups/g/input", r#"{"text":"t","timeout_s":86400}"#),
            ("/agents", r#"{"name":"a","boot_timeout_s":3600}"#),
        ] {
            assert!(read(path, body).is_ok(), "{body}");
        }
    }

    #[test]
    fn json_sizes_are_those_serde_json_writes() {
        let chars = (0..0x800u32)
            .chain([0xfffd, 0x10000, 0x10ffff])
            .filter_map(char::from_u32);
        for c in chars {
            let written = serde_json::to_string(&c.to_string()).unwrap().len() - 2;
            assert_eq!(json_len(c), written, "{c:?}");
        }
    }

    /// The bytes of `text` as a JSON string, quotes aside.
    fn json_size(text: &str) -> usize {
        serde_json::to_string(text).unwrap().len() - 2
    }

    #[test]
    fn text_is_cut_after_escaping_to_fit_its_budget() {
        let budget = 1000;
        for byte in [0x01, b'"', b'\\', b'\n', 0xff, b'x'] {
            let bytes = vec![byte; 4 * budget];
            let fitted = fit_text(&bytes, budget, false);
            let size = json_size(&fitted.text);
            assert!(size <= budget, "{byte:#x}: {size}");
            // Cut where the next character would not fit.
            assert!(size + 6 > budget, "{byte:#x}: {size}");
            assert!(fitted.used < bytes.len());
            assert_eq!(
                fitted.text,
                String::from_utf8_lossy(&bytes[..fitted.used]),
                "{byte:#x}"
            );
        }
        let short = fit_text("é\"x".as_bytes(), budget, false);
        assert_eq!((short.text.as_str(), short.used), ("é\"x", 4));
        // Between characters, never inside one.
        let accents = "é".repeat(budget);
        let fitted = fit_text(accents.as_bytes(), budget + 1, false);
        assert_eq!((fitted.used, fitted.text.len()), (budget, budget));
    }

    #[test]
    fn an_unfinished_character_is_left_for_the_next_read_unless_alone() {
        let bytes = "aé".as_bytes();
        let cut = &bytes[..2];
        let later = fit_text(cut, 100, true);
        assert_eq!((later.text.as_str(), later.used), ("a", 1));
        let now = fit_text(cut, 100, false);
        assert_eq!((now.text.as_str(), now.used), ("a\u{fffd}", 2));
        // Alone, it is read (replaced): a reader always moves on.
        let alone = fit_text(&bytes[1..2], 100, true);
        assert_eq!((alone.text.as_str(), alone.used), ("\u{fffd}", 1));
        // An invalid byte that no later byte can complete is replaced at once.
        let invalid = fit_text(&[b'a', 0xff], 100, true);
        assert_eq!((invalid.text.as_str(), invalid.used), ("a\u{fffd}", 2));
    }
}
