//! The host end of a guest-agent connection: handshake, ping, exec with streamed standard I/O,
//! inference, shutdown. The same client speaks to agents over vsock and to a carrier over virtio-serial.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use agentos_protocol::files::{
    Change, Entry, FILE_CHUNK_BYTES, FileErrorKind, FsOp, MAX_LISTED_ENTRIES,
};
use agentos_protocol::peer::JoinRequest;
use agentos_protocol::process::{Control, ProcessInfo, Selector};
use agentos_protocol::{
    ExecRequest, ExitStatus, FrameError, FrameReader, GuestMessage, Hello, HostMessage, InferReply,
    InferRequest, PROTOCOL_VERSION, StreamData, write_frame,
};

/// Standard input is forwarded in chunks of this size.
const STDIN_CHUNK: usize = 32 * 1024;
/// How long an agent gets to acknowledge a shutdown.
const SHUTDOWN_ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Entropy a restored agent gets for its random pool: 256 bits.
const RESTORE_ENTROPY_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("the connection to the guest agent failed")]
    Frame(#[from] FrameError),
    #[error("the guest agent closed the connection")]
    Closed,
    #[error("the guest agent did not say hello first (got {0})")]
    NoHello(String),
    #[error(
        "the guest agent speaks protocol {guest}, this host speaks {PROTOCOL_VERSION}: rebuild the image with `agentos image build`"
    )]
    Version { guest: u32 },
    #[error("the guest agent refused the request: {0}")]
    Refused(String),
    #[error("the guest agent did not answer in time")]
    TimedOut,
    #[error("the guest agent stopped answering: no reply to a ping for {} s", .0.as_secs())]
    Stalled(Duration),
    /// A file request failed in the guest, for a reason a client can act on.
    #[error("{message}")]
    File {
        kind: FileErrorKind,
        message: String,
    },
    /// Where a file's bytes came from or went failed (the client of a transfer went away).
    #[error("the transfer's other end failed")]
    Transfer(#[source] io::Error),
    #[error("the guest agent listed more than {MAX_LISTED_ENTRIES} entries")]
    TooManyEntries,
}

/// How often a wait with a cancel check looks whether anyone still waits.
pub const CANCEL_POLL: Duration = Duration::from_millis(250);

/// How long a file transfer waits for the guest's next frame.
pub const FILE_STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Pings an agent that has been quiet for `interval`, and gives up on it when `limit` passes
/// without a frame: for links whose far end can freeze without closing them.
#[derive(Clone, Copy, Debug)]
pub struct Keepalive {
    pub interval: Duration,
    pub limit: Duration,
}

/// A read that ran into its deadline is [`ConnectionError::TimedOut`]; anything else a frame
/// error.
fn timed_out_or(e: FrameError) -> ConnectionError {
    match e {
        FrameError::Io(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            ConnectionError::TimedOut
        }
        e => e.into(),
    }
}

/// The program [`AgentConnection::follow`] follows.
#[derive(Debug)]
pub enum Follow {
    /// One it starts.
    Start(ExecRequest),
    /// One that runs already.
    Attach(Selector),
}

/// What a followed program does, as it happens.
#[derive(Debug, PartialEq, Eq)]
pub enum ProgramEvent<'a> {
    Started { pid: u32 },
    Stdout(&'a [u8]),
    Stderr(&'a [u8]),
}

/// How [`AgentConnection::write_file`] writes a file.
#[derive(Clone, Copy, Debug, Default)]
pub struct FileWrite<'a> {
    /// Permission bits of a new file (0o644 when absent; a replaced file keeps its own).
    pub mode: Option<u32>,
    /// The guest account that owns a new file (root when absent).
    pub user: Option<&'a str>,
    /// Into the file as the bytes come, rather than in place once whole.
    pub in_place: bool,
}

/// Where the output of a program goes, and where its input comes from.
pub struct ExecIo<'a> {
    pub stdin: Option<Box<dyn Read + Send>>,
    pub stdout: &'a mut dyn Write,
    pub stderr: &'a mut dyn Write,
}

/// A program's output kept up to a limit, the rest dropped and noted as cut: a guest program
/// may write without end.
pub struct CappedOutput {
    pub bytes: Vec<u8>,
    pub cut: bool,
    limit: usize,
}

impl CappedOutput {
    pub fn new(limit: usize) -> Self {
        Self {
            bytes: Vec::new(),
            cut: false,
            limit,
        }
    }
}

impl Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.limit.saturating_sub(self.bytes.len());
        self.bytes.extend_from_slice(&buf[..buf.len().min(room)]);
        self.cut |= buf.len() > room;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The agent's stream as the frame reader reads it: every read ends by the deadline, however
/// slowly the far end sends a frame. A timeout per read would let a guest that trickles a frame
/// one byte at a time hold the host past any deadline.
struct DeadlineStream {
    stream: UnixStream,
    deadline: Option<Instant>,
}

impl Read for DeadlineStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let timeout = match self.deadline {
            Some(deadline) => Some(
                deadline
                    .checked_duration_since(Instant::now())
                    .filter(|d| !d.is_zero())
                    .ok_or(io::ErrorKind::TimedOut)?,
            ),
            None => None,
        };
        self.stream.set_read_timeout(timeout)?;
        self.stream.read(buf)
    }
}

pub struct AgentConnection {
    reader: FrameReader<DeadlineStream>,
    writer: Arc<Mutex<UnixStream>>,
    hello: Hello,
    next_id: u64,
    /// Past this instant, waiting for the agent is an error.
    deadline: Option<Instant>,
    keepalive: Option<Keepalive>,
    /// When the last frame arrived.
    last_heard: Instant,
    /// Whether a ping to a quiet agent is still unanswered.
    ping_outstanding: bool,
    /// Says when the far end is paused on purpose (its VM frozen): silence then is no stall.
    paused: Option<Box<dyn Fn() -> bool + Send>>,
    /// Says when whoever waits for the answer went (see [`AgentConnection::set_cancel_check`]).
    cancelled: Option<Box<dyn Fn() -> bool + Send>>,
    /// The id of a `restored` request not answered yet (see [`AgentConnection::restored`]).
    unconfirmed_restore: Option<u64>,
}

impl AgentConnection {
    /// Reads the agent's hello (within `timeout`) and checks its protocol version.
    pub fn handshake(stream: UnixStream, timeout: Duration) -> Result<Self, ConnectionError> {
        let writer = stream.try_clone().map_err(FrameError::Io)?;
        let mut reader = FrameReader::new(DeadlineStream {
            stream,
            deadline: Some(crate::deadline::from_now(timeout)),
        });
        let hello = match reader.read::<GuestMessage>() {
            Ok(Some(GuestMessage::Hello(hello))) => hello,
            Ok(Some(other)) => return Err(ConnectionError::NoHello(format!("{other:?}"))),
            Ok(None) => return Err(ConnectionError::Closed),
            Err(e) => return Err(timed_out_or(e)),
        };
        if hello.protocol != PROTOCOL_VERSION {
            return Err(ConnectionError::Version {
                guest: hello.protocol,
            });
        }
        reader.get_mut().deadline = None;
        Ok(Self {
            reader,
            writer: Arc::new(Mutex::new(writer)),
            hello,
            next_id: 1,
            deadline: None,
            keepalive: None,
            last_heard: Instant::now(),
            ping_outstanding: false,
            paused: None,
            cancelled: None,
            unconfirmed_restore: None,
        })
    }

    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    fn send(&self, msg: &HostMessage) -> Result<(), ConnectionError> {
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        write_frame(&mut *writer, msg).map_err(ConnectionError::from)
    }

    /// Makes every later wait for the agent end at `deadline` (None: wait as long as it takes).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    /// Pings the agent whenever it has been quiet for a while, and fails a wait once it has
    /// been quiet for too long (see [`Keepalive`]).
    pub fn set_keepalive(&mut self, keepalive: Option<Keepalive>) {
        self.keepalive = keepalive;
        self.last_heard = Instant::now();
        self.ping_outstanding = false;
    }

    /// Tells the keepalive how to know that the agent is paused on purpose: its silence while
    /// paused is not counted.
    pub fn set_pause_check(&mut self, paused: Option<Box<dyn Fn() -> bool + Send>>) {
        self.paused = paused;
    }

    /// Tells a wait for the agent (with a keepalive) how to know that nobody waits for its
    /// answer any more: the wait then ends within [`CANCEL_POLL`] with
    /// [`ConnectionError::Transfer`], even while the agent is silent.
    pub fn set_cancel_check(&mut self, cancelled: Option<Box<dyn Fn() -> bool + Send>>) {
        self.cancelled = cancelled;
    }

    /// With a keepalive, waits until a frame starts to arrive, pinging a quiet agent.
    fn await_frame(&mut self) -> Result<(), ConnectionError> {
        let Some(keepalive) = self.keepalive else {
            return Ok(());
        };
        let fd = self.reader.get_ref().stream.as_raw_fd();
        loop {
            if self.cancelled.as_ref().is_some_and(|cancelled| cancelled()) {
                return Err(ConnectionError::Transfer(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "nobody waits for the answer any more",
                )));
            }
            let mut wait = keepalive.interval;
            if self.cancelled.is_some() {
                wait = wait.min(CANCEL_POLL);
            }
            if let Some(deadline) = self.deadline {
                wait = wait.min(deadline.saturating_duration_since(Instant::now()));
            }
            if poll_readable(fd, wait) {
                return Ok(());
            }
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(ConnectionError::TimedOut);
            }
            if self.paused.as_ref().is_some_and(|paused| paused()) {
                self.last_heard = Instant::now();
                self.ping_outstanding = false;
                continue;
            }
            let quiet = self.last_heard.elapsed();
            if quiet >= keepalive.limit {
                return Err(ConnectionError::Stalled(quiet));
            }
            if !self.ping_outstanding && quiet >= keepalive.interval {
                let id = self.new_id();
                self.send(&HostMessage::Ping { id })?;
                self.ping_outstanding = true;
            }
        }
    }

    fn recv(&mut self) -> Result<GuestMessage, ConnectionError> {
        loop {
            let msg = self.recv_frame()?;
            match (self.unconfirmed_restore, msg) {
                (Some(pending), GuestMessage::Restored { id }) if id == pending => {
                    self.unconfirmed_restore = None;
                }
                (Some(pending), GuestMessage::Error { id, message }) if id == pending => {
                    return Err(ConnectionError::Refused(message));
                }
                (_, msg) => return Ok(msg),
            }
        }
    }

    fn recv_frame(&mut self) -> Result<GuestMessage, ConnectionError> {
        self.await_frame()?;
        self.reader.get_mut().deadline = self.deadline;
        match self.reader.read() {
            Ok(Some(msg)) => {
                self.last_heard = Instant::now();
                self.ping_outstanding = false;
                Ok(msg)
            }
            Ok(None) => Err(ConnectionError::Closed),
            Err(e) => Err(timed_out_or(e)),
        }
    }

    fn new_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Round trip time of a ping.
    pub fn ping(&mut self) -> Result<Duration, ConnectionError> {
        let id = self.new_id();
        let start = Instant::now();
        self.send(&HostMessage::Ping { id })?;
        loop {
            if let GuestMessage::Pong { id: got } = self.recv()?
                && got == id
            {
                return Ok(start.elapsed());
            }
        }
    }

    /// Tells an agent restored from a snapshot that it was: it gets fresh entropy for its
    /// kernel's random pool (every clone of a snapshot starts from the same pool) and the wall
    /// clock, which stood still while it was saved.
    ///
    /// Does not wait for the answer: the agent handles frames in order, so whatever is asked
    /// next runs after the refresh, and an agent that cannot refresh answers with an error and
    /// powers off before it runs anything. The answer is checked as later frames arrive; a
    /// refusal fails the request that meets it.
    pub fn restored(&mut self) -> Result<(), ConnectionError> {
        let mut entropy = vec![0u8; RESTORE_ENTROPY_BYTES];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut entropy))
            .map_err(FrameError::Io)?;
        let unix_time_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let id = self.new_id();
        self.send(&HostMessage::Restored {
            id,
            entropy: StreamData(entropy),
            unix_time_ns,
        })?;
        self.unconfirmed_restore = Some(id);
        Ok(())
    }

    /// Runs a program to its end, streaming its output as it arrives.
    pub fn exec(
        &mut self,
        mut request: ExecRequest,
        io: ExecIo<'_>,
    ) -> Result<ExitStatus, ConnectionError> {
        let id = self.new_id();
        request.id = id;
        request.stdin = io.stdin.is_some();
        self.send(&HostMessage::Exec(request))?;
        if let Some(stdin) = io.stdin {
            let writer = self.writer.clone();
            // Detached: it ends at stdin EOF or when the connection goes away; the caller may
            // exit while it is blocked reading a terminal.
            thread::Builder::new()
                .name("stdin".into())
                .spawn(move || pump_stdin(id, stdin, &writer))
                .map_err(|e| ConnectionError::Frame(FrameError::Io(e)))?;
        }
        loop {
            match self.recv()? {
                GuestMessage::Stdout { id: got, data } if got == id => {
                    write_out(io.stdout, &data.0);
                }
                GuestMessage::Stderr { id: got, data } if got == id => {
                    write_out(io.stderr, &data.0);
                }
                GuestMessage::Exited { id: got, status } if got == id => return Ok(status),
                GuestMessage::Error { id: got, message } if got == id => {
                    return Err(ConnectionError::Refused(message));
                }
                _ => {}
            }
        }
    }

    /// Starts a program (or, with `attach`, follows a running one) and follows it to its end,
    /// handing `sink` its process id, then its output as it arrives. A sink that fails ends the
    /// following ([`ConnectionError::Transfer`]); the caller then closes the connection, which
    /// ends a program it started unless that was kept.
    pub fn follow(
        &mut self,
        what: Follow,
        sink: &mut dyn FnMut(ProgramEvent<'_>) -> io::Result<()>,
    ) -> Result<ExitStatus, ConnectionError> {
        let id = self.new_id();
        self.send(&match what {
            Follow::Start(mut request) => {
                request.id = id;
                HostMessage::Exec(request)
            }
            Follow::Attach(process) => HostMessage::Attach { id, process },
        })?;
        loop {
            let event = match self.recv()? {
                GuestMessage::Started { id: got, pid } if got == id => {
                    sink(ProgramEvent::Started { pid })
                }
                GuestMessage::Stdout { id: got, data } if got == id => {
                    sink(ProgramEvent::Stdout(&data.0))
                }
                GuestMessage::Stderr { id: got, data } if got == id => {
                    sink(ProgramEvent::Stderr(&data.0))
                }
                GuestMessage::Exited { id: got, status } if got == id => return Ok(status),
                GuestMessage::Error { id: got, message } if got == id => {
                    return Err(ConnectionError::Refused(message));
                }
                _ => Ok(()),
            };
            event.map_err(ConnectionError::Transfer)?;
        }
    }

    /// Starts a program that outlives this connection (`keep`); its process id.
    pub fn start_kept(&mut self, mut request: ExecRequest) -> Result<u32, ConnectionError> {
        let id = self.new_id();
        request.id = id;
        request.keep = true;
        self.send(&HostMessage::Exec(request))?;
        loop {
            match self.recv()? {
                GuestMessage::Started { id: got, pid } if got == id => return Ok(pid),
                GuestMessage::Error { id: got, message } if got == id => {
                    return Err(ConnectionError::Refused(message));
                }
                _ => {}
            }
        }
    }

    /// The programs running in the guest.
    pub fn processes(&mut self) -> Result<Vec<ProcessInfo>, ConnectionError> {
        let id = self.new_id();
        self.send(&HostMessage::ListProcesses { id })?;
        loop {
            match self.recv()? {
                GuestMessage::Processes { id: got, processes } if got == id => {
                    return Ok(processes);
                }
                GuestMessage::Error { id: got, message } if got == id => {
                    return Err(ConnectionError::Refused(message));
                }
                _ => {}
            }
        }
    }

    /// Feeds, closes the input of, or signals the running program `pid`.
    pub fn control(&mut self, pid: u32, control: Control) -> Result<(), ConnectionError> {
        let id = self.new_id();
        self.send(&HostMessage::Control { id, pid, control })?;
        loop {
            match self.recv()? {
                GuestMessage::Done { id: got } if got == id => return Ok(()),
                GuestMessage::Error { id: got, message } if got == id => {
                    return Err(ConnectionError::Refused(message));
                }
                _ => {}
            }
        }
    }

    /// Runs an inference and waits for its answer. A refusal (unknown model, text too long, ...)
    /// comes back as [`ConnectionError::Refused`] with the agent's explanation.
    pub fn infer(&mut self, mut request: InferRequest) -> Result<InferReply, ConnectionError> {
        let id = self.new_id();
        request.id = id;
        self.send(&HostMessage::Infer(request))?;
        loop {
            match self.recv()? {
                GuestMessage::Inferred(reply) if reply.id == id => return Ok(reply),
                GuestMessage::Error { id: got, message } if got == id => {
                    return Err(ConnectionError::Refused(message));
                }
                _ => {}
            }
        }
    }

    /// Makes the agent a member of a group: it connects to the router and handles what it
    /// receives as `request` says. Returns once it listens for its messages.
    pub fn join(&mut self, mut request: JoinRequest) -> Result<(), ConnectionError> {
        let id = self.new_id();
        request.id = id;
        self.send(&HostMessage::Join(request))?;
        loop {
            match self.recv()? {
                GuestMessage::Joined { id: got } if got == id => return Ok(()),
                GuestMessage::Error { id: got, message } if got == id => {
                    return Err(ConnectionError::Refused(message));
                }
                _ => {}
            }
        }
    }

    /// The next frame of a file request, within [`FILE_STEP_TIMEOUT`].
    fn recv_file_step(&mut self) -> Result<GuestMessage, ConnectionError> {
        self.deadline = Some(Instant::now() + FILE_STEP_TIMEOUT);
        self.recv()
    }

    /// Reads the guest's file `path`, handing its bytes to `sink` as they arrive; returns its
    /// size. Each frame must arrive within [`FILE_STEP_TIMEOUT`], so a file of any size may take
    /// as long as it takes.
    pub fn read_file(
        &mut self,
        path: &str,
        sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<u64, ConnectionError> {
        let id = self.new_id();
        self.send(&HostMessage::ReadFile {
            id,
            path: path.to_owned(),
        })?;
        let mut got = 0u64;
        loop {
            match self.recv_file_step()? {
                GuestMessage::FileChunk { id: of, data } if of == id => {
                    got += data.0.len() as u64;
                    sink(&data.0).map_err(ConnectionError::Transfer)?;
                }
                GuestMessage::FileEnd { id: of, size } if of == id => {
                    if size != got {
                        return Err(ConnectionError::Refused(format!(
                            "the guest agent said the file had {size} bytes and sent {got}"
                        )));
                    }
                    return Ok(size);
                }
                msg => file_refusal(id, msg)?,
            }
        }
    }

    /// Writes the guest's file `path` from `source` (to its end); returns its size. The guest
    /// puts the file in place only once whole unless `how` says in place (see
    /// [`HostMessage::WriteFile`]).
    pub fn write_file(
        &mut self,
        path: &str,
        how: FileWrite<'_>,
        source: &mut dyn Read,
    ) -> Result<u64, ConnectionError> {
        let id = self.new_id();
        self.send(&HostMessage::WriteFile {
            id,
            path: path.to_owned(),
            mode: how.mode,
            user: how.user.map(str::to_owned),
            in_place: how.in_place,
        })?;
        let mut buf = vec![0u8; FILE_CHUNK_BYTES];
        loop {
            let n = match source.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ConnectionError::Transfer(e)),
            };
            // A refusal (no room, a directory in the way) ends the transfer early.
            if poll_readable(self.reader.get_ref().stream.as_raw_fd(), Duration::ZERO) {
                file_refusal(id, self.recv_file_step()?)?;
            }
            self.send(&HostMessage::FileChunk {
                id,
                data: StreamData(buf[..n].to_vec()),
            })?;
        }
        self.send(&HostMessage::FileEnd { id })?;
        loop {
            match self.recv_file_step()? {
                GuestMessage::FileWritten { id: of, size } if of == id => return Ok(size),
                msg => file_refusal(id, msg)?,
            }
        }
    }

    /// Runs one operation on the guest's files other than a listing; the entry it found or
    /// made, if any.
    pub fn fs(&mut self, op: FsOp) -> Result<Option<Entry>, ConnectionError> {
        let id = self.new_id();
        self.send(&HostMessage::Fs { id, fs: op })?;
        loop {
            match self.recv_file_step()? {
                GuestMessage::FsDone { id: of, entry } if of == id => return Ok(entry),
                msg => file_refusal(id, msg)?,
            }
        }
    }

    /// The entries under the guest's directory `path`, `depth` levels down.
    pub fn list(&mut self, path: &str, depth: u32) -> Result<Vec<Entry>, ConnectionError> {
        let id = self.new_id();
        self.send(&HostMessage::Fs {
            id,
            fs: FsOp::List {
                path: path.to_owned(),
                depth,
            },
        })?;
        let mut all = Vec::new();
        loop {
            match self.recv_file_step()? {
                GuestMessage::Listed {
                    id: of,
                    entries,
                    last,
                } if of == id => {
                    if all.len() + entries.len() > MAX_LISTED_ENTRIES {
                        return Err(ConnectionError::TooManyEntries);
                    }
                    all.extend(entries);
                    if last {
                        return Ok(all);
                    }
                }
                msg => file_refusal(id, msg)?,
            }
        }
    }

    /// Watches the guest's directory `path` (and, `recursive`, those below it), handing each
    /// batch of changes to `sink`, once with none when the watch has begun; returns when the
    /// sink fails or a cancel check says nobody waits any more ([`ConnectionError::Transfer`]),
    /// or the guest ends it.
    pub fn watch(
        &mut self,
        path: &str,
        recursive: bool,
        sink: &mut dyn FnMut(Vec<Change>) -> io::Result<()>,
    ) -> Result<(), ConnectionError> {
        let id = self.new_id();
        self.send(&HostMessage::Watch {
            id,
            path: path.to_owned(),
            recursive,
        })?;
        loop {
            let passed = match self.recv()? {
                GuestMessage::Watching { id: of } if of == id => sink(Vec::new()),
                GuestMessage::Changes { id: of, changes } if of == id => sink(changes),
                msg => {
                    file_refusal(id, msg)?;
                    Ok(())
                }
            };
            passed.map_err(ConnectionError::Transfer)?;
        }
    }

    /// Asks the agent to power the VM off; returns once it acknowledged (or the link dropped,
    /// which a powering-off guest may do first).
    pub fn shutdown(&mut self) -> Result<(), ConnectionError> {
        let id = self.new_id();
        self.deadline = Some(Instant::now() + SHUTDOWN_ACK_TIMEOUT);
        match self.send(&HostMessage::Shutdown { id }) {
            Err(ConnectionError::Frame(FrameError::Io(e)))
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) =>
            {
                return Ok(());
            }
            sent => sent?,
        }
        loop {
            match self.recv() {
                Ok(GuestMessage::ShuttingDown { id: got }) if got == id => return Ok(()),
                Ok(_) => {}
                Err(ConnectionError::Closed) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

/// Fails with the guest's refusal of file request `id`, if `msg` is one; other frames (pongs,
/// frames of other requests) pass.
fn file_refusal(id: u64, msg: GuestMessage) -> Result<(), ConnectionError> {
    match msg {
        GuestMessage::FileError {
            id: of,
            kind,
            message,
        } if of == id => Err(ConnectionError::File { kind, message }),
        GuestMessage::Error { id: of, message } if of == id => {
            Err(ConnectionError::Refused(message))
        }
        _ => Ok(()),
    }
}

/// Waits up to `timeout` for `fd` to become readable (or to hang up); true if it did.
pub fn poll_readable(fd: i32, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is a valid pollfd array of length 1 for the duration of the call.
    let ready = unsafe { libc::poll(&mut pfd, 1, millis) };
    ready > 0
}

/// Output the caller cannot take (a closed pipe) is dropped: the program runs to its end.
fn write_out(sink: &mut dyn Write, data: &[u8]) {
    if sink.write_all(data).is_ok() {
        let _ = sink.flush();
    }
}

fn pump_stdin(id: u64, mut stdin: Box<dyn Read + Send>, writer: &Mutex<UnixStream>) {
    let mut buf = vec![0u8; STDIN_CHUNK];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        let msg = if n == 0 {
            HostMessage::CloseStdin { id }
        } else {
            HostMessage::Stdin {
                id,
                data: StreamData(buf[..n].to_vec()),
            }
        };
        let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
        if write_frame(&mut *w, &msg).is_err() || n == 0 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use agentos_protocol::{BootTimings, FrameReader};

    use super::*;

    fn hello(protocol: u32) -> GuestMessage {
        GuestMessage::Hello(Hello {
            protocol,
            agent: "test".into(),
            kernel: "test".into(),
            vcpus: 1,
            memory_kib: 1,
            boot: BootTimings::default(),
        })
    }

    /// A guest that says hello, then answers each request with `respond`.
    fn fake_guest(
        respond: impl Fn(HostMessage) -> Vec<GuestMessage> + Send + 'static,
    ) -> AgentConnection {
        let (host, mut guest) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            write_frame(&mut guest, &hello(PROTOCOL_VERSION)).unwrap();
            let mut reader = FrameReader::new(guest.try_clone().unwrap());
            while let Ok(Some(msg)) = reader.read::<HostMessage>() {
                for answer in respond(msg) {
                    if write_frame(&mut guest, &answer).is_err() {
                        return;
                    }
                }
            }
        });
        AgentConnection::handshake(host, Duration::from_secs(5)).unwrap()
    }

    fn run(
        conn: &mut AgentConnection,
        program: &str,
    ) -> (Result<ExitStatus, ConnectionError>, Vec<u8>) {
        let mut out = Vec::new();
        let result = conn.exec(
            ExecRequest {
                run: agentos_protocol::Program::new(program),
                ..Default::default()
            },
            ExecIo {
                stdin: None,
                stdout: &mut out,
                stderr: &mut Vec::new(),
            },
        );
        (result, out)
    }

    const KEEPALIVE: Keepalive = Keepalive {
        interval: Duration::from_millis(50),
        limit: Duration::from_millis(400),
    };

    #[test]
    fn a_quiet_agent_that_answers_pings_is_waited_for() {
        // The program ends after twice the keepalive limit without output; meanwhile the
        // agent answers pings, as the guest's reader does while a program runs.
        let (host, mut guest) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            write_frame(&mut guest, &hello(PROTOCOL_VERSION)).unwrap();
            let writer = Arc::new(Mutex::new(guest.try_clone().unwrap()));
            let mut reader = FrameReader::new(guest);
            while let Ok(Some(msg)) = reader.read::<HostMessage>() {
                let writer = writer.clone();
                match msg {
                    HostMessage::Ping { id } => {
                        let _ =
                            write_frame(&mut *writer.lock().unwrap(), &GuestMessage::Pong { id });
                    }
                    HostMessage::Exec(req) => {
                        std::thread::spawn(move || {
                            std::thread::sleep(2 * KEEPALIVE.limit);
                            let exited = GuestMessage::Exited {
                                id: req.id,
                                status: ExitStatus::default(),
                            };
                            let _ = write_frame(&mut *writer.lock().unwrap(), &exited);
                        });
                    }
                    _ => {}
                }
            }
        });
        let mut conn = AgentConnection::handshake(host, Duration::from_secs(5)).unwrap();
        conn.set_keepalive(Some(KEEPALIVE));
        let (status, _) = run(&mut conn, "/bin/sleep");
        assert!(status.is_ok(), "{status:?}");
    }

    #[test]
    fn an_agent_that_stops_answering_is_declared_stalled() {
        let mut conn = fake_guest(|_| vec![]);
        conn.set_keepalive(Some(KEEPALIVE));
        let started = Instant::now();
        let (status, _) = run(&mut conn, "/bin/true");
        assert!(
            matches!(status, Err(ConnectionError::Stalled(_))),
            "{status:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn exec_streams_output_and_returns_the_status() {
        let mut conn = fake_guest(|msg| match msg {
            HostMessage::Exec(req) => vec![
                GuestMessage::Stdout {
                    id: req.id + 100,
                    data: StreamData(b"not ours".to_vec()),
                },
                GuestMessage::Stdout {
                    id: req.id,
                    data: StreamData(b"hi\n".to_vec()),
                },
                GuestMessage::Exited {
                    id: req.id,
                    status: ExitStatus {
                        code: Some(7),
                        ..Default::default()
                    },
                },
            ],
            _ => vec![],
        });
        let (status, out) = run(&mut conn, "/bin/true");
        assert_eq!(status.unwrap().code, Some(7));
        assert_eq!(out, b"hi\n");
    }

    #[test]
    fn a_refused_request_is_an_error_with_the_agents_reason() {
        let mut conn = fake_guest(|msg| {
            vec![GuestMessage::Error {
                id: msg.id(),
                message: "no such program".into(),
            }]
        });
        let (status, _) = run(&mut conn, "/nope");
        assert!(matches!(status, Err(ConnectionError::Refused(m)) if m == "no such program"));
    }

    /// A guest that answers `restored` as `refresh` says, then runs programs with status 0.
    fn restored_guest(refresh: fn(u64) -> GuestMessage) -> AgentConnection {
        fake_guest(move |msg| match msg {
            HostMessage::Restored { id, .. } => vec![refresh(id)],
            HostMessage::Exec(req) => vec![GuestMessage::Exited {
                id: req.id,
                status: ExitStatus::default(),
            }],
            _ => vec![],
        })
    }

    #[test]
    fn the_answer_to_restored_is_taken_by_the_next_request() {
        let mut conn = restored_guest(|id| GuestMessage::Restored { id });
        conn.restored().unwrap();
        assert_eq!(conn.unconfirmed_restore, Some(1));
        let (status, _) = run(&mut conn, "/bin/true");
        assert_eq!(status.unwrap().code, None);
        assert_eq!(conn.unconfirmed_restore, None);
    }

    #[test]
    fn a_guest_that_could_not_refresh_fails_the_next_request() {
        let mut conn = restored_guest(|id| GuestMessage::Error {
            id,
            message: "cannot refresh the restored guest".into(),
        });
        conn.restored().unwrap();
        let (status, _) = run(&mut conn, "/bin/true");
        assert!(
            matches!(&status, Err(ConnectionError::Refused(m)) if m.contains("refresh")),
            "{status:?}"
        );
    }

    #[test]
    fn a_silent_agent_times_out_at_the_deadline() {
        let mut conn = fake_guest(|_| vec![]);
        conn.set_deadline(Some(Instant::now() + Duration::from_millis(200)));
        let start = Instant::now();
        let (status, _) = run(&mut conn, "/bin/sleep");
        assert!(
            matches!(status, Err(ConnectionError::TimedOut)),
            "{status:?}"
        );
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    /// A guest that trickles a frame a byte at a time cannot hold the host past its deadline
    /// (each byte arrives well within any per-read timeout).
    #[test]
    fn a_frame_trickled_byte_by_byte_ends_at_the_deadline() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        write_frame(&mut guest, &hello(PROTOCOL_VERSION)).unwrap();
        let mut conn = AgentConnection::handshake(host, Duration::from_secs(5)).unwrap();
        let trickle = thread::spawn(move || {
            let frame = agentos_protocol::encode_frame(&GuestMessage::Pong { id: 1 }).unwrap();
            let mut padded = frame[..4].to_vec();
            padded[..4].copy_from_slice(&(64u32 * 1024).to_be_bytes());
            padded.extend(std::iter::repeat_n(b' ', 64 * 1024));
            for byte in padded {
                if guest.write_all(&[byte]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
        });
        conn.set_deadline(Some(Instant::now() + Duration::from_millis(500)));
        let started = Instant::now();
        let err = conn.ping().unwrap_err();
        assert!(matches!(err, ConnectionError::TimedOut), "{err:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        drop(conn);
        trickle.join().unwrap();
    }

    /// The same for the hello: a connection that trickles it is dropped at the handshake's
    /// timeout.
    #[test]
    fn a_hello_trickled_byte_by_byte_ends_at_the_handshake_timeout() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let trickle = thread::spawn(move || {
            let frame = agentos_protocol::encode_frame(&hello(PROTOCOL_VERSION)).unwrap();
            for byte in frame {
                if guest.write_all(&[byte]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
        });
        let started = Instant::now();
        let err = AgentConnection::handshake(host, Duration::from_millis(300))
            .err()
            .unwrap();
        assert!(matches!(err, ConnectionError::TimedOut), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        trickle.join().unwrap();
    }

    #[test]
    fn shutdown_of_a_guest_that_already_went_away_succeeds() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        write_frame(&mut guest, &hello(PROTOCOL_VERSION)).unwrap();
        let mut conn = AgentConnection::handshake(host, Duration::from_secs(5)).unwrap();
        drop(guest);
        assert!(conn.shutdown().is_ok());
    }

    #[test]
    fn another_protocol_version_is_refused() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        write_frame(&mut guest, &hello(PROTOCOL_VERSION + 1)).unwrap();
        let err = AgentConnection::handshake(host, Duration::from_secs(5))
            .err()
            .unwrap();
        assert!(matches!(err, ConnectionError::Version { .. }));
    }

    #[test]
    fn a_guest_that_speaks_before_hello_is_refused() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        write_frame(&mut guest, &GuestMessage::Pong { id: 1 }).unwrap();
        let err = AgentConnection::handshake(host, Duration::from_secs(5))
            .err()
            .unwrap();
        assert!(matches!(err, ConnectionError::NoHello(_)));
    }
}
