//! The API's connections: accepting clients, reading their frames, giving each request a lane and
//! a deadline, writing the replies. What a request does is the [`Handler`]'s business (the
//! daemon, or a test's stand-in); this part knows requests only by their kind and their limits.
//!
//! A client is any process of the socket's owner, and a careless or hostile one must not take
//! the API from the others:
//! - connections are bounded: the turn is taken before `accept`, so that clients past the bound
//!   wait in the kernel's backlog, not in our memory;
//! - a client has [`Limits::idle`] to start a request and [`Limits::frame`] to finish a frame it
//!   started, and [`Limits::write`] to take a reply; past that its connection is closed;
//! - each request has a deadline from its arrival (see [`time_limit`]), after which it is
//!   answered `timed_out`, whatever it waits for;
//! - requests that run programs, models or boots (the work lane) are bounded apart from those
//!   that look and stop (the control lane), so that `stop` and `ps` get through while work waits.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::agent::EXEC_GRACE;
use super::api::{
    self, ApiError, DEFAULT_INPUT_TIMEOUT_S, ErrorKind, INFER_TIMEOUT, MAX_REQUEST_BYTES, Reply,
    Request,
};
use agentos_core::agent::vm::DEFAULT_BOOT_TIMEOUT;

/// Connections served at once.
const MAX_CONNECTIONS: usize = 256;
/// Requests of the control lane (`version`, `ps`, `logs`, `stop`, `rm`, `metrics`,
/// `group_down`) served at once.
const CONTROL_LANE: usize = 16;
/// Requests of the work lane (`spawn`, `exec`, `infer`, `group_up`, `group_input`) served at
/// once, and how many more may wait for a turn; past both, a request is answered `busy`. Work
/// holds at most their sum of connections, which leaves the control lane room to connect.
const WORK_LANE: usize = 64;
const WORK_WAITING: usize = 128;
const _: () = assert!(WORK_LANE + WORK_WAITING + CONTROL_LANE < MAX_CONNECTIONS);
/// How long a client may take to start its next request.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client may take to send the rest of a frame it started (1 MiB at most, on a
/// local socket).
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to read its reply.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a failed `accept` (out of descriptors) pauses the loop, so that it does not spin.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The deadline of a control request (a `stop` of a busy agent kills its VMM after 2 s).
const CONTROL_TIME: Duration = Duration::from_secs(60);
/// The deadline of a `spawn` or `group_up` that does not wait for the boot.
const SETUP_TIME: Duration = Duration::from_secs(60);
/// How long saving an agent may take: its guest memory is written, then moved.
const SNAPSHOT_TIME: Duration = Duration::from_secs(600);
/// Beyond a boot's own timeout: finding the image and the model, the slice, the cgroup.
const BOOT_SLACK: Duration = Duration::from_secs(60);
/// Beyond a `group_input`'s own timeout: collecting its report.
const INPUT_SLACK: Duration = Duration::from_secs(10);
/// How long past a request's deadline the server waits for the handler's own answer (which
/// says more) before it answers `timed_out` itself.
const REPLY_SLACK: Duration = Duration::from_secs(5);
/// No deadline is further than this, whatever a request says (they are checked when parsed;
/// this keeps instant arithmetic safe anyway).
const MAX_REQUEST_TIME: Duration = Duration::from_secs(2 * api::MAX_TIMEOUT_S);

/// What answers the requests the server reads.
pub trait Handler: Send + Sync + 'static {
    /// Answers `request`, by `deadline` if it can (the server answers `timed_out` soon after).
    fn handle(
        &self,
        request: Request,
        deadline: Instant,
    ) -> impl Future<Output = Result<serde_json::Value, ApiError>> + Send;

    /// Counts an error a client was answered.
    fn count_error(&self, kind: ErrorKind);

    /// Counts a connection.
    fn count_client(&self);
}

/// How much of the daemon one client, and all of them, may hold, and for how long.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub connections: usize,
    pub control_lane: usize,
    pub work_lane: usize,
    pub work_waiting: usize,
    pub idle: Duration,
    pub frame: Duration,
    pub write: Duration,
    /// How long a request may take from its arrival.
    pub time_limit: fn(&Request) -> Duration,
    pub reply_slack: Duration,
}

impl Limits {
    pub const DAEMON: Self = Self {
        connections: MAX_CONNECTIONS,
        control_lane: CONTROL_LANE,
        work_lane: WORK_LANE,
        work_waiting: WORK_WAITING,
        idle: IDLE_TIMEOUT,
        frame: FRAME_TIMEOUT,
        write: WRITE_TIMEOUT,
        time_limit,
        reply_slack: REPLY_SLACK,
    };
}

/// The lane a request waits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lane {
    /// Looking, reading logs, stopping, removing: quick, or bounded by a stop.
    Control,
    /// Running programs and models, booting: as long as the request's own timeout.
    Work,
}

fn lane(request: &Request) -> Lane {
    match request {
        Request::Version
        | Request::Ps
        | Request::Logs(_)
        | Request::Stop(_)
        | Request::Rm(_)
        | Request::Metrics
        | Request::GroupDown(_)
        | Request::PoolCreate(_)
        | Request::PoolRm(_) => Lane::Control,
        Request::Spawn(_)
        | Request::Exec(_)
        | Request::Infer(_)
        | Request::GroupUp(_)
        | Request::GroupInput(_)
        | Request::Snapshot(_) => Lane::Work,
    }
}

/// How long `request` may take from its arrival, waiting for its lane and its agent included.
fn time_limit(request: &Request) -> Duration {
    let secs = Duration::from_secs;
    let limit = match request {
        Request::Exec(call) => call.timeout().saturating_add(EXEC_GRACE),
        Request::Infer(_) => INFER_TIMEOUT,
        Request::Spawn(spawn) if spawn.wait => spawn
            .boot_timeout_s
            .map_or(DEFAULT_BOOT_TIMEOUT, secs)
            .saturating_add(BOOT_SLACK),
        // Members boot with the default timeout.
        Request::GroupUp(up) if up.wait => DEFAULT_BOOT_TIMEOUT.saturating_add(BOOT_SLACK),
        Request::Spawn(_) | Request::GroupUp(_) => SETUP_TIME,
        Request::GroupInput(input) => {
            secs(input.timeout_s.unwrap_or(DEFAULT_INPUT_TIMEOUT_S)).saturating_add(INPUT_SLACK)
        }
        Request::Snapshot(_) => SNAPSHOT_TIME,
        Request::Version
        | Request::Ps
        | Request::Logs(_)
        | Request::Stop(_)
        | Request::Rm(_)
        | Request::Metrics
        | Request::GroupDown(_)
        | Request::PoolCreate(_)
        | Request::PoolRm(_) => CONTROL_TIME,
    };
    limit.min(MAX_REQUEST_TIME)
}

/// The turns requests take: a bounded number of each lane at once.
struct Lanes {
    control: Arc<Semaphore>,
    work: Arc<Semaphore>,
    /// Work running or waiting for a turn.
    work_admitted: Arc<Semaphore>,
}

/// A request's turn in its lane, given back when dropped.
struct Turn {
    _running: OwnedSemaphorePermit,
    _admitted: Option<OwnedSemaphorePermit>,
}

impl Lanes {
    fn new(limits: &Limits) -> Self {
        Self {
            control: Arc::new(Semaphore::new(limits.control_lane)),
            work: Arc::new(Semaphore::new(limits.work_lane)),
            work_admitted: Arc::new(Semaphore::new(limits.work_lane + limits.work_waiting)),
        }
    }

    /// Waits for `request`'s turn until `until`.
    async fn enter(
        &self,
        request: &Request,
        until: tokio::time::Instant,
    ) -> Result<Turn, ApiError> {
        let op = request.op();
        let (lane, admitted) = match lane(request) {
            Lane::Control => (&self.control, None),
            Lane::Work => {
                let admitted = self.work_admitted.clone().try_acquire_owned().map_err(|_| {
                    ApiError::new(
                        ErrorKind::Busy,
                        format!(
                            "the daemon has as many `spawn`, `exec`, `infer` and group requests under way and waiting as it takes; send `{op}` again later"
                        ),
                    )
                })?;
                (&self.work, Some(admitted))
            }
        };
        let running = match tokio::time::timeout_at(until, lane.clone().acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            // The semaphores are never closed.
            Ok(Err(_)) | Err(_) => return Err(timed_out(op, "waiting for its turn")),
        };
        Ok(Turn {
            _running: running,
            _admitted: admitted,
        })
    }
}

fn timed_out(op: &str, doing: &str) -> ApiError {
    ApiError::new(
        ErrorKind::TimedOut,
        format!(
            "`{op}` passed its deadline {doing}; what it started goes on (see `agentos ps`), and the deadlines are in docs/api.md"
        ),
    )
}

/// Serves clients on `listener` until `stop` completes.
pub async fn serve<H: Handler>(
    listener: UnixListener,
    handler: Arc<H>,
    limits: Limits,
    stop: impl Future<Output = ()>,
) {
    let connections = Arc::new(Semaphore::new(limits.connections));
    let lanes = Arc::new(Lanes::new(&limits));
    tokio::pin!(stop);
    loop {
        // The turn comes first: past the bound, clients wait in the kernel's backlog.
        let turn = tokio::select! {
            turn = connections.clone().acquire_owned() => turn,
            () = &mut stop => return,
        };
        let Ok(turn) = turn else { return };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => return,
        };
        match accepted {
            Ok((stream, _)) => {
                let (handler, lanes) = (handler.clone(), lanes.clone());
                tokio::spawn(async move {
                    let _turn = turn;
                    handler.count_client();
                    if let Err(e) = session(&*handler, &lanes, &limits, stream).await {
                        tracing::debug!(error = %e, "client connection ended");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

/// What a client sent next.
enum Incoming {
    Body(Vec<u8>),
    /// It went, or said nothing for too long.
    End,
    /// A frame that cannot be read: answered with this error, then the connection is closed.
    Refused(ApiError),
}

/// Reads requests and writes replies until the client goes or breaks a limit.
async fn session<H: Handler>(
    handler: &H,
    lanes: &Lanes,
    limits: &Limits,
    mut stream: UnixStream,
) -> io::Result<()> {
    loop {
        let body = match read_frame(&mut stream, limits).await? {
            Incoming::Body(body) => body,
            Incoming::End => return Ok(()),
            Incoming::Refused(error) => {
                handler.count_error(error.kind);
                return write_reply(&mut stream, &Reply::Error(error), limits.write).await;
            }
        };
        let reply = match api::parse_request(&body) {
            Ok(request) => answer(handler, lanes, limits, request).await,
            Err(e) => Err(e),
        };
        let reply = match reply {
            Ok(value) => Reply::Ok(value),
            Err(error) => {
                handler.count_error(error.kind);
                Reply::Error(error)
            }
        };
        write_reply(&mut stream, &reply, limits.write).await?;
    }
}

/// Reads one frame: the client has `limits.idle` to start it and `limits.frame` to finish it.
async fn read_frame(stream: &mut UnixStream, limits: &Limits) -> io::Result<Incoming> {
    let mut len = [0u8; 4];
    match tokio::time::timeout(limits.idle, stream.read(&mut len[..1])).await {
        Err(_) | Ok(Ok(0)) => return Ok(Incoming::End),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(e),
    }
    let until = tokio::time::Instant::now() + limits.frame;
    let late = || {
        Incoming::Refused(ApiError::new(
            ErrorKind::TimedOut,
            format!(
                "the frame was not complete within {} s of its first byte; send whole frames (docs/api.md)",
                limits.frame.as_secs_f64()
            ),
        ))
    };
    match tokio::time::timeout_at(until, stream.read_exact(&mut len[1..])).await {
        Err(_) => return Ok(late()),
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Incoming::End),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(_)) => {}
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_REQUEST_BYTES {
        return Ok(Incoming::Refused(ApiError::new(
            ErrorKind::TooLarge,
            format!("a request of {len} bytes is over the limit of {MAX_REQUEST_BYTES} bytes"),
        )));
    }
    let mut body = vec![0u8; len];
    match tokio::time::timeout_at(until, stream.read_exact(&mut body)).await {
        Err(_) => Ok(late()),
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(Incoming::End),
        Ok(Err(e)) => Err(e),
        Ok(Ok(_)) => Ok(Incoming::Body(body)),
    }
}

/// Answers a request in its lane, by its deadline.
async fn answer<H: Handler>(
    handler: &H,
    lanes: &Lanes,
    limits: &Limits,
    request: Request,
) -> Result<serde_json::Value, ApiError> {
    let op = request.op();
    let deadline = tokio::time::Instant::now() + (limits.time_limit)(&request);
    let _turn = lanes.enter(&request, deadline).await?;
    let answered = tokio::time::timeout_at(
        deadline + limits.reply_slack,
        handler.handle(request, deadline.into_std()),
    )
    .await;
    answered.unwrap_or_else(|_| Err(timed_out(op, "before it was done")))
}

async fn write_reply(stream: &mut UnixStream, reply: &Reply, limit: Duration) -> io::Result<()> {
    let frame = agentos_protocol::encode_frame(reply).unwrap_or_else(|e| {
        let error = ApiError::new(ErrorKind::Failed, format!("the reply cannot be sent: {e}"));
        agentos_protocol::encode_frame(&Reply::Error(error)).unwrap_or_default()
    });
    match tokio::time::timeout(limit, stream.write_all(&frame)).await {
        Ok(written) => written,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client did not take its reply",
        )),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream as StdStream;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    use agentos_protocol::FrameReader;
    use serde_json::{Value, json};

    use super::*;
    use crate::daemon::api::{ExecCall, GroupInputRequest, SpawnRequest};

    /// A server on a socket in a temporary directory, on a thread of its own; stopped when
    /// dropped.
    pub(in crate::daemon) struct Running {
        pub socket: PathBuf,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
        _dir: tempfile::TempDir,
    }

    impl Running {
        pub fn start<H: Handler>(handler: Arc<H>, limits: Limits) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let socket = dir.path().join("api.sock");
            let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
            listener.set_nonblocking(true).unwrap();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let thread = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let listener = UnixListener::from_std(listener).unwrap();
                    serve(listener, handler, limits, async {
                        let _ = stopped.await;
                    })
                    .await;
                });
            });
            Self {
                socket,
                stop: Some(stop),
                thread: Some(thread),
                _dir: dir,
            }
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    /// How long a test waits for a reply it expects.
    const PATIENCE: Duration = Duration::from_secs(5);

    pub(in crate::daemon) fn connect(socket: &Path) -> StdStream {
        let stream = StdStream::connect(socket).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream
    }

    pub(in crate::daemon) fn send(stream: &mut StdStream, body: &str) {
        stream
            .write_all(&(body.len() as u32).to_be_bytes())
            .unwrap();
        stream.write_all(body.as_bytes()).unwrap();
    }

    pub(in crate::daemon) fn receive(stream: &StdStream) -> Value {
        FrameReader::new(stream.try_clone().unwrap())
            .read::<Value>()
            .unwrap()
            .expect("a reply")
    }

    pub(in crate::daemon) fn call(stream: &mut StdStream, body: &str) -> Value {
        send(stream, body);
        receive(stream)
    }

    pub(in crate::daemon) fn kind(reply: &Value) -> &str {
        if reply.get("ok").is_some() {
            "ok"
        } else {
            reply["error"]["kind"].as_str().unwrap_or("?")
        }
    }

    /// Answers control requests at once; work waits until `gate` lets it through.
    struct Stub {
        gate: tokio::sync::Semaphore,
        errors: Mutex<Vec<ErrorKind>>,
    }

    impl Default for Stub {
        fn default() -> Self {
            Self {
                gate: tokio::sync::Semaphore::new(0),
                errors: Mutex::default(),
            }
        }
    }

    impl Handler for Stub {
        async fn handle(&self, request: Request, _deadline: Instant) -> Result<Value, ApiError> {
            if lane(&request) == Lane::Work {
                let _ = self.gate.acquire().await.map(|p| p.forget());
            }
            Ok(json!({ "op": request.op() }))
        }

        fn count_error(&self, kind: ErrorKind) {
            self.errors.lock().unwrap().push(kind);
        }

        fn count_client(&self) {}
    }

    fn quick(_: &Request) -> Duration {
        Duration::from_millis(300)
    }

    const TEST_LIMITS: Limits = Limits {
        connections: 8,
        control_lane: 1,
        work_lane: 2,
        work_waiting: 1,
        idle: Duration::from_millis(300),
        frame: Duration::from_millis(300),
        write: Duration::from_millis(300),
        time_limit,
        reply_slack: Duration::from_millis(100),
    };

    /// Reads until the server closes the connection; how long that took, or None if it did
    /// not within `PATIENCE`.
    fn closed_after(stream: &mut StdStream, since: std::time::Instant) -> Option<Duration> {
        let mut sink = Vec::new();
        match stream.read_to_end(&mut sink) {
            Ok(_) => Some(since.elapsed()),
            Err(_) => None,
        }
    }

    #[test]
    fn silent_and_stalled_clients_are_dropped_while_others_are_served() {
        let server = Running::start(Arc::new(Stub::default()), TEST_LIMITS);
        let started = std::time::Instant::now();
        let mut silent = connect(&server.socket);
        let mut half_length = connect(&server.socket);
        half_length.write_all(&[0, 0]).unwrap();
        let mut half_body = connect(&server.socket);
        half_body.write_all(&[0, 0, 0, 100, b'{']).unwrap();
        let mut other = connect(&server.socket);
        // Asking every 100 ms for longer than the idle limit: a client that keeps asking is
        // not idle.
        for _ in 0..5 {
            assert_eq!(kind(&call(&mut other, r#"{"op":"version"}"#)), "ok");
            std::thread::sleep(Duration::from_millis(100));
        }
        let silent_gone = closed_after(&mut silent, started);
        assert!(
            silent_gone.is_some_and(|t| t >= TEST_LIMITS.idle),
            "{silent_gone:?}"
        );
        for mut stalled in [half_length, half_body] {
            let reply = receive(&stalled);
            assert_eq!(kind(&reply), "timed_out", "{reply}");
            assert!(
                reply["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("frame was not complete")),
                "{reply}"
            );
            assert!(closed_after(&mut stalled, started).is_some());
        }
    }

    #[test]
    fn with_the_work_lane_full_control_requests_get_through_and_excess_work_is_busy() {
        let stub = Arc::new(Stub::default());
        let server = Running::start(stub.clone(), TEST_LIMITS);
        let exec = r#"{"op":"exec","name":"a","run":{"program":"/bin/sleep","args":["600"]}}"#;
        // Two run (the lane's size), one waits for a turn.
        let mut working: Vec<StdStream> = (0..3)
            .map(|_| {
                let mut stream = connect(&server.socket);
                send(&mut stream, exec);
                stream
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let mut late = connect(&server.socket);
        let busy = call(&mut late, exec);
        assert_eq!(kind(&busy), "busy", "{busy}");
        for body in [
            r#"{"op":"ps"}"#,
            r#"{"op":"version"}"#,
            r#"{"op":"stop","name":"a"}"#,
        ] {
            let mut control = connect(&server.socket);
            let asked = std::time::Instant::now();
            assert_eq!(kind(&call(&mut control, body)), "ok", "{body}");
            assert!(asked.elapsed() < Duration::from_secs(1));
        }
        stub.gate.add_permits(3);
        for stream in &mut working {
            assert_eq!(kind(&receive(stream)), "ok");
        }
        assert_eq!(*stub.errors.lock().unwrap(), [ErrorKind::Busy]);
    }

    #[test]
    fn a_request_past_its_deadline_is_answered_timed_out_and_gives_its_turn_back() {
        let limits = Limits {
            work_lane: 1,
            time_limit: quick,
            ..TEST_LIMITS
        };
        let server = Running::start(Arc::new(Stub::default()), limits);
        let mut client = connect(&server.socket);
        let exec = r#"{"op":"exec","name":"a","run":{"program":"/bin/true"}}"#;
        for _ in 0..2 {
            let asked = std::time::Instant::now();
            let reply = call(&mut client, exec);
            assert_eq!(kind(&reply), "timed_out", "{reply}");
            // Had the first kept its turn, the second would time out waiting for one.
            assert!(
                reply["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("before it was done")),
                "{reply}"
            );
            assert!(asked.elapsed() < Duration::from_secs(2));
        }
    }

    #[test]
    fn every_deadline_is_bounded_whatever_the_request_says() {
        let huge = u64::MAX;
        let requests = [
            Request::Exec(ExecCall {
                run: agentos_protocol::Program {
                    timeout_ms: Some(huge),
                    ..Default::default()
                },
                ..ExecCall::default()
            }),
            Request::GroupInput(GroupInputRequest {
                timeout_s: Some(huge),
                ..GroupInputRequest::default()
            }),
            Request::Spawn(SpawnRequest {
                boot_timeout_s: Some(huge),
                wait: true,
                ..SpawnRequest::default()
            }),
        ];
        for request in &requests {
            let limit = time_limit(request);
            assert!(limit <= MAX_REQUEST_TIME, "{request:?}: {limit:?}");
            assert!(tokio::time::Instant::now().checked_add(limit).is_some());
        }
        let default = time_limit(&Request::Exec(ExecCall::default()));
        assert_eq!(
            default,
            Duration::from_secs(crate::daemon::api::DEFAULT_EXEC_TIMEOUT_S) + EXEC_GRACE
        );
    }
}
