//! The messages carried in frames.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::files::{Change, Entry, FileErrorKind, FsOp};
use crate::infer::{InferReply, InferRequest};
use crate::peer::JoinRequest;
use crate::process::{Control, ProcessInfo, Selector};

/// Bytes carried as a base64 string, so that any output survives JSON.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct StreamData(pub Vec<u8>);

impl fmt::Debug for StreamData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamData({} bytes)", self.0.len())
    }
}

impl Serialize for StreamData {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&BASE64.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for StreamData {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <&str>::deserialize(d)?;
        BASE64
            .decode(text)
            .map(StreamData)
            .map_err(serde::de::Error::custom)
    }
}

/// What the host asks of a guest agent. Every request carries an `id` chosen by the host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum HostMessage {
    /// Liveness check; answered with [`GuestMessage::Pong`].
    Ping { id: u64 },
    /// Start a program. Output streams back as `stdout`/`stderr` frames, then one `exited`.
    Exec(ExecRequest),
    /// Bytes for the standard input of the program started by request `id`.
    Stdin { id: u64, data: StreamData },
    /// End of the standard input of the program started by request `id`.
    CloseStdin { id: u64 },
    /// Send a signal to the process group of the program started by request `id`.
    Signal { id: u64, signal: i32 },
    /// Stop every program and power the VM off; answered with `shutting_down`.
    Shutdown { id: u64 },
    /// Run a model; answered with `inferred`, or `error`.
    Infer(InferRequest),
    /// Become a member of a group; answered with `joined` once the agent listens for its
    /// messages, or `error`.
    Join(JoinRequest),
    /// The agent runs from a snapshot: mix `entropy` into the kernel's random pool and reseed
    /// it, so that no two clones of one snapshot share random state, and set the wall clock to
    /// `unix_time_ns`, which stood still while the agent was saved. Answered with `restored`,
    /// or `error`.
    Restored {
        id: u64,
        entropy: StreamData,
        unix_time_ns: u64,
    },
    /// Send the file `path` (absolute) as `file_chunk` frames and one `file_end`, or a
    /// `file_error`.
    ReadFile { id: u64, path: String },
    /// Write the file `path` (absolute; missing parents are made) from the `file_chunk`
    /// frames that follow, up to a `file_end`. It replaces `path` only once whole: answered
    /// with `file_written`, or a `file_error` after which the rest of its chunks are dropped.
    /// `mode` is for a new file (0o644 when absent; a replaced file keeps its own).
    WriteFile {
        id: u64,
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<u32>,
        /// The account (of the guest's `/etc/passwd`) that owns the file if it is new, and the
        /// directories made for it; root when absent. A replaced file keeps its owner.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        /// Write into `path` itself (truncated first, links followed) instead of replacing it
        /// once whole: watchers see the file written, as they would a program's write. A write
        /// cut short leaves what came; a file it made is removed.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        in_place: bool,
    },
    /// Bytes of the file written by request `id`.
    FileChunk { id: u64, data: StreamData },
    /// The file written by request `id` is whole.
    FileEnd { id: u64 },
    /// One operation on the file tree (see [`FsOp`]).
    Fs { id: u64, fs: FsOp },
    /// Follow a running program's output from now on, as if this request had started it:
    /// `started`, its output, `exited`; `stdin`, `close_stdin` and `signal` with this id then
    /// reach it too. Closing this connection does not end a program it did not start.
    Attach { id: u64, process: Selector },
    /// The programs running in the guest; answered with `processes`.
    ListProcesses { id: u64 },
    /// Watch the directory `path` (with `recursive`, and every directory below it, as they
    /// come and go): answered with `watching`, then `changes` as they happen, until the
    /// connection closes.
    Watch {
        id: u64,
        path: String,
        #[serde(default)]
        recursive: bool,
    },
    /// Act on a running program by its process id, from any connection; answered with `done`.
    Control { id: u64, pid: u32, control: Control },
}

/// Most entropy bytes a `restored` message may carry.
pub const MAX_RESTORE_ENTROPY: usize = 512;

impl HostMessage {
    pub fn id(&self) -> u64 {
        match self {
            Self::Exec(req) => req.id,
            Self::Infer(req) => req.id,
            Self::Join(req) => req.id,
            Self::Ping { id }
            | Self::Restored { id, .. }
            | Self::ReadFile { id, .. }
            | Self::WriteFile { id, .. }
            | Self::FileChunk { id, .. }
            | Self::FileEnd { id }
            | Self::Fs { id, .. }
            | Self::Attach { id, .. }
            | Self::ListProcesses { id }
            | Self::Watch { id, .. }
            | Self::Control { id, .. }
            | Self::Stdin { id, .. }
            | Self::CloseStdin { id }
            | Self::Signal { id, .. }
            | Self::Shutdown { id } => *id,
        }
    }
}

/// A program for an agent to run: what a client of the daemon asks for and what the guest
/// agent runs (one type, one unit of time).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Program {
    pub program: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// Variables added to (or replacing those of) the agent's base environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory; the agent's own (`/`) when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// The program is killed (whole process group) when it runs longer than this.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// The user it runs as, by name (from the guest's `/etc/passwd`: its ids, groups and home
    /// directory, which is also its working directory unless `cwd` says otherwise); root when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

impl Program {
    /// `program`, with no arguments and nothing else set.
    pub fn new(program: impl Into<String>) -> Self {
        Self {
            program: program.into(),
            ..Self::default()
        }
    }

    /// The same program with `args`.
    pub fn with_args<A: Into<String>>(self, args: impl IntoIterator<Item = A>) -> Self {
        Self {
            args: args.into_iter().map(Into::into).collect(),
            ..self
        }
    }
}

/// A program to run in the guest, on this connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub id: u64,
    pub run: Program,
    /// When true the host sends `stdin` frames and a `close_stdin`; otherwise stdin is empty.
    #[serde(default)]
    pub stdin: bool,
    /// The program outlives this connection: when it closes, the program runs on (its output
    /// goes to whoever attaches, or nowhere) until it ends or its timeout passes. Otherwise it
    /// is killed with the connection.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep: bool,
    /// A name to find it by (see [`Selector`]), unique among running programs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Run it on a terminal of this size (a pseudo-terminal, in a session of its own): its
    /// output comes as `stdout`, and its input is open as with `stdin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<PtySize>,
}

/// A terminal's size, in characters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PtySize {
    pub cols: u16,
    pub rows: u16,
}

/// How a program ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code, when the program exited on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// Signal number, when a signal ended it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Whether the agent killed it for running past its timeout.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timed_out: bool,
}

impl ExitStatus {
    /// The status a shell would report: the exit code, or 128 + the signal number.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            (None, None) => 255,
        }
    }
}

/// Uptimes measured by the guest, in milliseconds since its kernel started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootTimings {
    /// When the agent started as PID 1.
    pub init_ms: u64,
    /// When the agent was ready to serve (modules loaded, connection open).
    pub ready_ms: u64,
}

/// The first frame on every connection, sent by the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    /// Name and version of the agent binary.
    pub agent: String,
    /// Release of the guest kernel.
    pub kernel: String,
    pub vcpus: u32,
    pub memory_kib: u64,
    pub boot: BootTimings,
}

/// What a guest agent sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum GuestMessage {
    Hello(Hello),
    Pong {
        id: u64,
    },
    /// The program of request `id` is running as `pid`.
    Started {
        id: u64,
        pid: u32,
    },
    Stdout {
        id: u64,
        data: StreamData,
    },
    Stderr {
        id: u64,
        data: StreamData,
    },
    /// The program of request `id` ended; no output for `id` follows.
    Exited {
        id: u64,
        status: ExitStatus,
    },
    /// Request `id` failed (bad program, unknown id, ...); nothing else follows for it.
    Error {
        id: u64,
        message: String,
    },
    /// Answer to `shutdown`: the agent stops everything and powers off.
    ShuttingDown {
        id: u64,
    },
    /// Answer to `infer`.
    Inferred(InferReply),
    /// Answer to `join`.
    Joined {
        id: u64,
    },
    /// Answer to `restored`: the random pool is reseeded and the clock set.
    Restored {
        id: u64,
    },
    /// Bytes of the file read by request `id`, in order.
    FileChunk {
        id: u64,
        data: StreamData,
    },
    /// The file read by request `id` ended after `size` bytes.
    FileEnd {
        id: u64,
        size: u64,
    },
    /// The file of `write_file` request `id` is in place, `size` bytes long.
    FileWritten {
        id: u64,
        size: u64,
    },
    /// Answer to an `fs` request other than `list`: the entry it found or made, if any.
    FsDone {
        id: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        entry: Option<Entry>,
    },
    /// Entries of an `fs` `list`, in batches; the one with `last` ends the listing.
    Listed {
        id: u64,
        entries: Vec<Entry>,
        last: bool,
    },
    /// Answer to `list_processes`.
    Processes {
        id: u64,
        processes: Vec<ProcessInfo>,
    },
    /// Answer to `control`: it was done.
    Done {
        id: u64,
    },
    /// Answer to `watch`: changes from now on come as `changes`.
    Watching {
        id: u64,
    },
    /// Changes under the directory watched by request `id`, in the order they happened.
    Changes {
        id: u64,
        changes: Vec<Change>,
    },
    /// A file request failed; nothing else follows for it.
    FileError {
        id: u64,
        kind: FileErrorKind,
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire format is a contract with guests built earlier; a change here must be deliberate
    /// and come with a new `PROTOCOL_VERSION`.
    #[test]
    fn wire_format_is_stable() {
        let exec = HostMessage::Exec(ExecRequest {
            id: 3,
            run: Program {
                program: "/bin/sh".into(),
                args: vec!["-c".into(), "echo hi".into()],
                env: BTreeMap::from([("A".into(), "1".into())]),
                cwd: Some("/tmp".into()),
                timeout_ms: Some(500),
                user: None,
            },
            stdin: true,
            keep: false,
            tag: None,
            pty: None,
        });
        assert_eq!(
            serde_json::to_string(&exec).unwrap(),
            r#"{"op":"exec","id":3,"run":{"program":"/bin/sh","args":["-c","echo hi"],"env":{"A":"1"},"cwd":"/tmp","timeout_ms":500},"stdin":true}"#
        );
        let out = GuestMessage::Stdout {
            id: 3,
            data: StreamData(b"hi\n".to_vec()),
        };
        assert_eq!(
            serde_json::to_string(&out).unwrap(),
            r#"{"type":"stdout","id":3,"data":"aGkK"}"#
        );
        let exited = GuestMessage::Exited {
            id: 3,
            status: ExitStatus {
                code: None,
                signal: Some(9),
                timed_out: true,
            },
        };
        assert_eq!(
            serde_json::to_string(&exited).unwrap(),
            r#"{"type":"exited","id":3,"status":{"signal":9,"timed_out":true}}"#
        );
        let hello = GuestMessage::Hello(Hello {
            protocol: 1,
            agent: "agentos-guest 0.1.0".into(),
            kernel: "6.1.0".into(),
            vcpus: 2,
            memory_kib: 1024,
            boot: BootTimings {
                init_ms: 10,
                ready_ms: 20,
            },
        });
        assert_eq!(
            serde_json::to_string(&hello).unwrap(),
            r#"{"type":"hello","protocol":1,"agent":"agentos-guest 0.1.0","kernel":"6.1.0","vcpus":2,"memory_kib":1024,"boot":{"init_ms":10,"ready_ms":20}}"#
        );
    }

    #[test]
    fn restored_carries_entropy_and_time() {
        let msg = HostMessage::Restored {
            id: 4,
            entropy: StreamData(vec![1, 2, 3]),
            unix_time_ns: 5,
        };
        let text = serde_json::to_string(&msg).unwrap();
        assert_eq!(
            text,
            r#"{"op":"restored","id":4,"entropy":"AQID","unix_time_ns":5}"#
        );
        assert_eq!(serde_json::from_str::<HostMessage>(&text).unwrap(), msg);
        assert_eq!(
            serde_json::to_string(&GuestMessage::Restored { id: 4 }).unwrap(),
            r#"{"type":"restored","id":4}"#
        );
    }

    #[test]
    fn exec_defaults_optional_fields() {
        let msg: HostMessage =
            serde_json::from_str(r#"{"op":"exec","id":1,"run":{"program":"true"}}"#).unwrap();
        let HostMessage::Exec(req) = msg else {
            panic!("not an exec: {msg:?}")
        };
        assert!(req.run.args.is_empty() && req.run.env.is_empty() && !req.stdin);
        assert_eq!((req.run.cwd, req.run.timeout_ms), (None, None));
        let unknown = r#"{"op":"exec","id":1,"run":{"program":"true","timeout_s":5}}"#;
        assert!(serde_json::from_str::<HostMessage>(unknown).is_err());
    }

    #[test]
    fn stream_data_rejects_bad_base64() {
        let bad = r#"{"op":"stdin","id":1,"data":"!!!"}"#;
        assert!(serde_json::from_str::<HostMessage>(bad).is_err());
    }

    #[test]
    fn shell_code_maps_signals_above_128() {
        let by_signal = ExitStatus {
            signal: Some(15),
            ..Default::default()
        };
        assert_eq!(by_signal.shell_code(), 143);
        let by_code = ExitStatus {
            code: Some(7),
            ..Default::default()
        };
        assert_eq!(by_code.shell_code(), 7);
    }
}
