//! The API's connections: accepting clients, reading their HTTP/1.1 requests (hyper), giving
//! each a lane and a deadline, writing the replies. Which path asks for what is [`routes`]'
//! business, what a request does the [`Handler`]'s (the daemon, or a test's stand-in); this part
//! knows requests only by their kind and their limits.
//!
//! A client is any process of the socket's owner (or, on TCP, anyone with the API's token), and
//! a careless or hostile one must not take the API from the others:
//! - connections are bounded: the turn is taken before `accept`, so that clients past the bound
//!   wait in the kernel's backlog, not in our memory;
//! - a client has [`Limits::idle`] to send a request's head (from connecting, and between
//!   requests), [`Limits::body`] to send its body once the head came, and [`Limits::write`]
//!   for each write of a reply to make progress; past that its connection is closed;
//! - each request has a deadline from its arrival (see [`time_limit`]), after which it is
//!   answered `timed_out`, whatever it waits for;
//! - requests that run programs, models or boots (the work lane) are bounded apart from those
//!   that look and stop (the control lane), so that `stop` and `ps` get through while work waits.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::agent::EXEC_GRACE;
use super::api::{
    self, ApiError, DEFAULT_INPUT_TIMEOUT_S, ErrorBody, ErrorKind, INFER_TIMEOUT,
    MAX_REQUEST_BYTES, Request, WriteFileRequest,
};
use super::link::{ChunkBody, Chunks};
use super::secret::{bearer, same_secret};
use super::{e2b, routes};
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
/// How long a client may take to send a request's head, from connecting or from its last reply.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client may take to send a request's body once its head came (1 MiB at most).
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write of a reply may wait for the client to take it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a failed `accept` (out of descriptors) pauses the loop, so that it does not spin.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The deadline of a control request (a `stop` of a busy agent kills its VMM after 2 s).
const CONTROL_TIME: Duration = Duration::from_secs(60);
/// The deadline of a `spawn` or `group_up` that does not wait for the boot.
const SETUP_TIME: Duration = Duration::from_secs(60);
/// How long an operation on an agent's files (not a transfer) may take.
const FS_TIME: Duration = Duration::from_secs(300);
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

    /// Opens the stream a request is answered with (see [`streams`]): a file's bytes, or a
    /// followed program's lines.
    fn stream(&self, request: Request) -> impl Future<Output = Result<Chunks, ApiError>> + Send;

    /// Writes an agent's file from `body` (see [`Request::WriteFile`]), which ends with an
    /// empty chunk; one that closes without it was cut off.
    fn write_file(
        &self,
        request: WriteFileRequest,
        body: Chunks,
    ) -> impl Future<Output = Result<serde_json::Value, ApiError>> + Send;

    /// Counts an error a client was answered.
    fn count_error(&self, kind: ErrorKind);

    /// Counts a connection.
    fn count_client(&self);

    /// Where E2B's pause saves a sandbox (a directory per sandbox, made when it is paused):
    /// none keeps a paused sandbox frozen in memory instead.
    fn saved_sandboxes(&self) -> Option<PathBuf> {
        None
    }
}

/// How much of the daemon one client, and all of them, may hold, and for how long.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub connections: usize,
    pub control_lane: usize,
    pub work_lane: usize,
    pub work_waiting: usize,
    pub idle: Duration,
    pub body: Duration,
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
        body: BODY_TIMEOUT,
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
        | Request::Models
        | Request::Inspect(_)
        | Request::Logs(_)
        | Request::Stop(_)
        | Request::Pause(_)
        | Request::Resume(_)
        | Request::Rm(_)
        | Request::Metrics
        | Request::GroupDown(_)
        | Request::PoolCreate(_)
        | Request::PoolRm(_) => Lane::Control,
        Request::ReadFile(_)
        | Request::WriteFile(_)
        | Request::Fs(_)
        | Request::Watch(_)
        | Request::Start(_)
        | Request::Processes(_)
        | Request::Attach(_)
        | Request::Control(_)
        | Request::Spawn(_)
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
        // A stream's deadline is for its start; then each step has its own limit.
        Request::ReadFile(_)
        | Request::WriteFile(_)
        | Request::Start(_)
        | Request::Attach(_)
        | Request::Watch(_) => CONTROL_TIME,
        Request::Processes(_) | Request::Control(_) => CONTROL_TIME,
        // A listing's batches each have the guest's step limit; all of them together, this.
        Request::Fs(_) => FS_TIME,
        Request::Version
        | Request::Ps
        | Request::Models
        | Request::Inspect(_)
        | Request::Logs(_)
        | Request::Stop(_)
        | Request::Pause(_)
        | Request::Resume(_)
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

/// Where the server listens, and who may ask what there.
pub struct Site {
    pub listener: Listener,
    /// What the site serves.
    pub scope: Scope,
}

pub enum Listener {
    /// A socket only the daemon's user can open: whoever connects may ask anything.
    Unix(UnixListener),
    /// TCP: every request carries `Authorization: Bearer TOKEN`, or is answered `unauthorized`.
    Tcp(TcpListener, Arc<str>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The whole API.
    Api,
    /// `GET /metrics` only (a socket for a metrics collector).
    Metrics,
}

/// What every connection of a server shares.
struct Shared<H> {
    handler: Arc<H>,
    lanes: Lanes,
    limits: Limits,
    /// The sandboxes of E2B's API.
    sandboxes: e2b::Registry,
}

/// E2B's API asks the daemon through the server, as a client would: in lanes, by deadlines.
impl<H: Handler> e2b::Api for Shared<H> {
    async fn call(&self, request: Request) -> Result<serde_json::Value, ApiError> {
        api::check_durations(&request)?;
        answer(&*self.handler, &self.lanes, &self.limits, request).await
    }

    async fn open(&self, request: Request) -> Result<Chunks, ApiError> {
        api::check_durations(&request)?;
        open_stream(self, request).await
    }

    async fn write_file(
        &self,
        request: WriteFileRequest,
        body: Chunks,
    ) -> Result<serde_json::Value, ApiError> {
        let probe = Request::WriteFile(request.clone());
        let deadline = tokio::time::Instant::now() + (self.limits.time_limit)(&probe);
        let _turn = self.lanes.enter(&probe, deadline).await?;
        self.handler.write_file(request, body).await
    }

    fn registry(&self) -> &e2b::Registry {
        &self.sandboxes
    }

    fn count_error(&self, kind: ErrorKind) {
        self.handler.count_error(kind);
    }
}

/// Serves clients on every site until `stop` completes.
pub async fn serve<H: Handler>(
    sites: Vec<Site>,
    handler: Arc<H>,
    limits: Limits,
    stop: impl Future<Output = ()>,
) {
    let sandboxes = e2b::Registry::new(handler.saved_sandboxes());
    let shared = Arc::new(Shared {
        lanes: Lanes::new(&limits),
        handler,
        limits,
        sandboxes,
    });
    let mut loops: Vec<_> = sites
        .into_iter()
        .map(|site| tokio::spawn(accept_loop(shared.clone(), site)))
        .collect();
    loops.push(tokio::spawn(expire_sandboxes(shared.clone())));
    stop.await;
    for task in loops {
        task.abort();
    }
}

/// Removes E2B sandboxes whose time is up.
async fn expire_sandboxes<H: Handler>(shared: Arc<Shared<H>>) {
    loop {
        tokio::time::sleep(e2b::EXPIRY_CHECK).await;
        for id in shared.sandboxes.take_expired(std::time::SystemTime::now()) {
            let shared = shared.clone();
            tokio::spawn(async move { e2b::sandboxes::expire(&*shared, id).await });
        }
    }
}

async fn accept_loop<H: Handler>(shared: Arc<Shared<H>>, site: Site) {
    let connections = Arc::new(Semaphore::new(shared.limits.connections));
    loop {
        // The turn comes first: past the bound, clients wait in the kernel's backlog.
        let Ok(turn) = connections.clone().acquire_owned().await else {
            return;
        };
        let (shared, scope) = (shared.clone(), site.scope);
        match &site.listener {
            Listener::Unix(listener) => match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(connection(shared, stream, scope, None, turn));
                }
                Err(e) => accept_failed(e).await,
            },
            Listener::Tcp(listener, token) => match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let token = Some(token.clone());
                    tokio::spawn(connection(shared, stream, scope, token, turn));
                }
                Err(e) => accept_failed(e).await,
            },
        }
    }
}

async fn accept_failed(e: io::Error) {
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
}

/// Serves one client's requests, one after another (HTTP/1.1 with keep-alive), until it goes or
/// breaks a limit: [`Limits::idle`] to send each request's head, [`Limits::body`] for its
/// body, [`Limits::write`] for each write of a reply.
async fn connection<H: Handler, S>(
    shared: Arc<Shared<H>>,
    stream: S,
    scope: Scope,
    token: Option<Arc<str>>,
    _turn: OwnedSemaphorePermit,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    shared.handler.count_client();
    let limits = shared.limits;
    let service = service_fn(move |request| {
        let (shared, token) = (shared.clone(), token.clone());
        async move { Ok::<_, Infallible>(respond(&shared, scope, token.as_deref(), request).await) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.idle)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(WriteLimit::new(stream, limits.write)), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "client connection ended");
    }
}

/// The longest request head (request line and headers) the server reads.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// A reply's body: whole, or a file's bytes as they come.
type ReplyBody = Either<Full<Bytes>, ChunkBody>;
type Response = hyper::Response<ReplyBody>;

async fn respond<H: Handler>(
    shared: &Shared<H>,
    scope: Scope,
    token: Option<&str>,
    request: hyper::Request<Incoming>,
) -> Response {
    let answered = read_and_answer(shared, scope, token, request).await;
    match answered {
        Ok(response) => response,
        Err(Refusal { error, close }) => {
            shared.handler.count_error(error.kind);
            let mut response = error_response(error);
            if close {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
    }
}

/// An error answer; with `close`, the connection ends after it (the request's body was not read
/// whole).
struct Refusal {
    error: ApiError,
    close: bool,
}

impl From<ApiError> for Refusal {
    fn from(error: ApiError) -> Self {
        Self {
            error,
            close: false,
        }
    }
}

async fn read_and_answer<H: Handler>(
    shared: &Shared<H>,
    scope: Scope,
    token: Option<&str>,
    request: hyper::Request<Incoming>,
) -> Result<Response, Refusal> {
    let (head, body) = request.into_parts();
    if scope == Scope::Api
        && let Some(target) = e2b::target(&head)
    {
        // E2B's API checks its own keys: the API token as `X-API-KEY`, each sandbox's own.
        return Ok(e2b::serve(shared, token, target, head, body).await);
    }
    if let Some(token) = token {
        check_token(&head.headers, token)?;
    }
    let path = head.uri.path().to_owned();
    if scope == Scope::Metrics && !(head.method == Method::GET && path == "/metrics") {
        return Err(ApiError::new(
            ErrorKind::NotFound,
            format!(
                "this socket serves GET /metrics only, not {} {path}",
                head.method
            ),
        )
        .into());
    }
    if head.method == Method::GET && path == routes::OPENAPI_PATH {
        return Ok(body_response(
            StatusCode::OK,
            "application/json",
            routes::OPENAPI.into(),
        ));
    }
    // Only a file's write streams its body (and only it takes PUT).
    if head.method == Method::PUT {
        let request = routes::route(&head.method, &path, head.uri.query(), &[])?;
        if let Request::WriteFile(write) = request {
            return write_file(shared, write, body, shared.limits.body).await;
        }
    }
    let body = read_body(body, &head.headers, shared.limits.body).await?;
    let request = routes::route(&head.method, &path, head.uri.query(), &body)?;
    if streams(&request) {
        return stream(shared, request).await;
    }
    let metrics = matches!(request, Request::Metrics);
    let status = routes::success(&request);
    let value = answer(&*shared.handler, &shared.lanes, &shared.limits, request).await?;
    if metrics {
        let text = value["text"].as_str().unwrap_or_default().to_owned();
        return Ok(body_response(status, METRICS_TYPE, text.into()));
    }
    Ok(json_response(status, &value))
}

/// Whether `request` is answered with a stream: a file read, a followed program.
fn streams(request: &Request) -> bool {
    match request {
        Request::ReadFile(_) | Request::Attach(_) | Request::Watch(_) => true,
        Request::Start(start) => !start.detach,
        _ => false,
    }
}

/// What a stream is sent as.
const NDJSON: &str = "application/x-ndjson";

/// Streams the answer to `request` once it started (the guest opened the file, the program
/// started); the request's turn is held until the stream ends.
async fn stream<H: Handler>(shared: &Shared<H>, request: Request) -> Result<Response, Refusal> {
    let content_type = match request {
        Request::ReadFile(_) => "application/octet-stream",
        _ => NDJSON,
    };
    let rx = open_stream(shared, request).await?;
    let mut response = hyper::Response::new(Either::Right(ChunkBody(rx)));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(response)
}

/// Opens the stream of `request` in its lane: its chunks, which hold the turn until they end or
/// are dropped.
async fn open_stream<H: Handler>(shared: &Shared<H>, request: Request) -> Result<Chunks, ApiError> {
    let op = request.op();
    let deadline = tokio::time::Instant::now() + (shared.limits.time_limit)(&request);
    let turn = shared.lanes.enter(&request, deadline).await?;
    let opened = tokio::time::timeout_at(deadline, shared.handler.stream(request))
        .await
        .unwrap_or_else(|_| Err(timed_out(op, "before its stream started")))?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    // The turn goes with the last chunk.
    tokio::spawn(forward(opened, tx, turn));
    Ok(rx)
}

/// Passes `from`'s chunks on, holding `turn` until they end or the client goes.
async fn forward(
    mut from: Chunks,
    to: tokio::sync::mpsc::Sender<Result<Bytes, io::Error>>,
    turn: Turn,
) {
    loop {
        // The client may go while the stream is quiet: then `from` is dropped at once, which
        // tells its producer.
        let chunk = tokio::select! {
            chunk = from.recv() => chunk,
            () = to.closed() => None,
        };
        let Some(chunk) = chunk else {
            break;
        };
        if to.send(chunk).await.is_err() {
            break;
        }
    }
    drop(turn);
}

/// Writes an agent's file from the request's body as it arrives: each piece of it must come
/// within `step` of the one before; the request's turn is held until the file is written.
async fn write_file<H: Handler>(
    shared: &Shared<H>,
    request: WriteFileRequest,
    mut body: Incoming,
    step: Duration,
) -> Result<Response, Refusal> {
    let probe = Request::WriteFile(request.clone());
    let deadline = tokio::time::Instant::now() + (shared.limits.time_limit)(&probe);
    let _turn = shared
        .lanes
        .enter(&probe, deadline)
        .await
        .map_err(|error| Refusal { error, close: true })?;
    let status = routes::success(&probe);
    let (tx, rx) = tokio::sync::mpsc::channel(FILE_BODY_CHUNKS);
    let pump = async move {
        loop {
            let frame = match tokio::time::timeout(step, body.frame()).await {
                Ok(Some(Ok(frame))) => frame,
                Ok(None) => {
                    let _ = tx.send(Ok(Bytes::new())).await;
                    return true;
                }
                Ok(Some(Err(e))) => {
                    let _ = tx.send(Err(io::Error::other(e))).await;
                    return false;
                }
                Err(_) => {
                    let why = format!("no part of the body came for {} s", step.as_secs_f64());
                    let _ = tx
                        .send(Err(io::Error::new(io::ErrorKind::TimedOut, why)))
                        .await;
                    return false;
                }
            };
            if let Ok(data) = frame.into_data()
                && !data.is_empty()
                && tx.send(Ok(data)).await.is_err()
            {
                // The write failed on the guest's side; its answer says why.
                return false;
            }
        }
    };
    let (whole_body, written) = tokio::join!(pump, shared.handler.write_file(request, rx));
    match written {
        Ok(value) => Ok(json_response(status, &value)),
        Err(error) => Err(Refusal {
            error,
            close: !whole_body,
        }),
    }
}

/// Pieces of a file's body in flight to the guest.
const FILE_BODY_CHUNKS: usize = 4;

/// What the metrics are served as: Prometheus text.
const METRICS_TYPE: &str = "text/plain; version=0.0.4";

/// Refuses a request without `Bearer token`. The comparison takes as long whatever the bytes.
fn check_token(headers: &HeaderMap, token: &str) -> Result<(), Refusal> {
    if same_secret(bearer(headers).unwrap_or_default(), token) {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorKind::Unauthorized,
            "send the API token as `Authorization: Bearer TOKEN` (AGENTOS_API_TOKEN, or the file the daemon named when it started)",
        )
        .into())
    }
}

/// Reads a request's body: at most [`MAX_REQUEST_BYTES`], whole within `limit` of its head.
async fn read_body(body: Incoming, headers: &HeaderMap, limit: Duration) -> Result<Bytes, Refusal> {
    let too_large = |len: String| Refusal {
        error: ApiError::new(
            ErrorKind::TooLarge,
            format!("a body of {len} bytes is over the limit of {MAX_REQUEST_BYTES} bytes"),
        ),
        close: true,
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared.filter(|&len| len > MAX_REQUEST_BYTES as u64) {
        return Err(too_large(len.to_string()));
    }
    match tokio::time::timeout(limit, Limited::new(body, MAX_REQUEST_BYTES).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<LengthLimitError>() => Err(too_large("more than that".into())),
        Ok(Err(e)) => Err(Refusal {
            error: ApiError::new(
                ErrorKind::BadRequest,
                format!("the body could not be read: {e}"),
            ),
            close: true,
        }),
        Err(_) => Err(Refusal {
            error: ApiError::new(
                ErrorKind::TimedOut,
                format!(
                    "the body was not complete within {} s of the request's head; send whole requests (docs/api.md)",
                    limit.as_secs_f64()
                ),
            ),
            close: true,
        }),
    }
}

fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => body_response(status, "application/json", body.into()),
        Err(e) => error_response(ApiError::new(
            ErrorKind::Failed,
            format!("the reply cannot be sent: {e}"),
        )),
    }
}

fn error_response(error: ApiError) -> Response {
    let status = routes::status(error.kind);
    let body = serde_json::to_vec(&ErrorBody { error }).unwrap_or_default();
    let mut response = body_response(status, "application/json", body.into());
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

fn body_response(status: StatusCode, content_type: &'static str, body: Bytes) -> Response {
    let mut response = hyper::Response::new(Either::Left(Full::new(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
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

/// A stream whose every write must make progress within a limit: a client that stops taking its
/// reply loses its connection instead of holding it.
struct WriteLimit<S> {
    stream: S,
    limit: Duration,
    /// Armed while a write waits.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteLimit<S> {
    fn new(stream: S, limit: Duration) -> Self {
        Self {
            stream,
            limit,
            stalled: None,
        }
    }

    /// Turns a pending write into an error once it waited past the limit.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let limit = self.limit;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client did not take its reply",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteLimit<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteLimit<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.stream).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::io::{BufReader, Read, Write};
    use std::os::unix::net::UnixStream as StdStream;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    use serde_json::{Value, json};

    use crate::daemon::client::raw;

    use super::*;
    use crate::daemon::api::{ExecCall, GroupInputRequest, SpawnRequest};

    /// A server on a socket in a temporary directory, on a thread of its own; stopped when
    /// dropped.
    pub(in crate::daemon) struct Running {
        pub socket: PathBuf,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
        _dir: Option<tempfile::TempDir>,
    }

    impl Running {
        pub fn start<H: Handler>(handler: Arc<H>, limits: Limits) -> Self {
            Self::serving(handler, limits, Scope::Api)
        }

        pub fn serving<H: Handler>(handler: Arc<H>, limits: Limits, scope: Scope) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let socket = dir.path().join("api.sock");
            let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
            listener.set_nonblocking(true).unwrap();
            let mut running = Self::on(handler, limits, move || Site {
                listener: Listener::Unix(UnixListener::from_std(listener).unwrap()),
                scope,
            });
            running.socket = socket;
            running._dir = Some(dir);
            running
        }

        /// A server on the site `site` makes (in the server's runtime, as tokio's listeners
        /// need).
        fn on<H: Handler>(
            handler: Arc<H>,
            limits: Limits,
            site: impl FnOnce() -> Site + Send + 'static,
        ) -> Self {
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let thread = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    serve(vec![site()], handler, limits, async {
                        let _ = stopped.await;
                    })
                    .await;
                });
            });
            Self {
                socket: PathBuf::new(),
                stop: Some(stop),
                thread: Some(thread),
                _dir: None,
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

    pub(in crate::daemon) fn send(stream: &mut StdStream, method: &str, target: &str, body: &str) {
        stream
            .write_all(&raw::request(method, target, body.as_bytes(), None))
            .unwrap();
    }

    pub(in crate::daemon) fn receive(stream: &StdStream) -> raw::Reply {
        raw::read_reply(&mut BufReader::new(stream.try_clone().unwrap())).expect("a reply")
    }

    pub(in crate::daemon) fn call(
        stream: &mut StdStream,
        method: &str,
        target: &str,
        body: &str,
    ) -> raw::Reply {
        send(stream, method, target, body);
        receive(stream)
    }

    pub(in crate::daemon) fn kind(reply: &raw::Reply) -> String {
        reply.kind()
    }

    /// Answers control requests at once; work waits until `gate` lets it through. Its files:
    /// `/missing` is not found, `/big` is [`BIG_FILE`] bytes, any other holds `{"op":"read_file"}`;
    /// what it is sent to write is kept in `writes` (its size, or why it was cut off).
    struct Stub {
        gate: tokio::sync::Semaphore,
        errors: Mutex<Vec<ErrorKind>>,
        writes: Mutex<Vec<Result<u64, String>>>,
    }

    impl Default for Stub {
        fn default() -> Self {
            Self {
                gate: tokio::sync::Semaphore::new(0),
                errors: Mutex::default(),
                writes: Mutex::default(),
            }
        }
    }

    /// The size of the stub's `/big`, in 64 KiB pieces of one byte value each.
    const BIG_FILE: usize = 3 << 20;

    fn big_file() -> Vec<u8> {
        (0..BIG_FILE).map(|i| (i >> 16) as u8).collect()
    }

    impl Handler for Stub {
        async fn handle(&self, request: Request, _deadline: Instant) -> Result<Value, ApiError> {
            if lane(&request) == Lane::Work {
                let _ = self.gate.acquire().await.map(|p| p.forget());
            }
            Ok(json!({ "op": request.op() }))
        }

        async fn stream(&self, request: Request) -> Result<Chunks, ApiError> {
            let path = match &request {
                Request::ReadFile(read) => read.path.as_str(),
                _ => "",
            };
            let content = match path {
                "/missing" => return Err(ApiError::new(ErrorKind::NotFound, "no /missing")),
                "/big" => big_file(),
                _ => json!({ "op": request.op() }).to_string().into_bytes(),
            };
            let (tx, rx) = tokio::sync::mpsc::channel(2);
            tokio::spawn(async move {
                for piece in content.chunks(1 << 16) {
                    if tx.send(Ok(Bytes::copy_from_slice(piece))).await.is_err() {
                        return;
                    }
                }
            });
            Ok(rx)
        }

        async fn write_file(
            &self,
            _request: WriteFileRequest,
            mut body: Chunks,
        ) -> Result<Value, ApiError> {
            let mut size = 0u64;
            let outcome = loop {
                match body.recv().await {
                    Some(Ok(chunk)) if chunk.is_empty() => break Ok(size),
                    Some(Ok(chunk)) => size += chunk.len() as u64,
                    Some(Err(e)) => break Err(e.to_string()),
                    None => break Err("closed without its end".to_owned()),
                }
            };
            self.writes.lock().unwrap().push(outcome.clone());
            match outcome {
                Ok(size) => Ok(json!({ "op": "write_file", "size": size })),
                Err(why) => Err(ApiError::new(ErrorKind::BadRequest, why)),
            }
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
        body: Duration::from_millis(300),
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
        let silent = connect(&server.socket);
        let mut half_head = connect(&server.socket);
        half_head.write_all(b"GET /vers").unwrap();
        let mut half_body = connect(&server.socket);
        half_body
            .write_all(&raw::request("POST", "/agents", b"{", Some(100)))
            .unwrap();
        let mut other = connect(&server.socket);
        // Asking every 100 ms for longer than the idle limit: a client that keeps asking is
        // not idle.
        for _ in 0..5 {
            assert_eq!(kind(&call(&mut other, "GET", "/version", "")), "ok");
            std::thread::sleep(Duration::from_millis(100));
        }
        for mut dropped in [silent, half_head] {
            let gone = closed_after(&mut dropped, started);
            assert!(gone.is_some_and(|t| t >= TEST_LIMITS.idle), "{gone:?}");
        }
        let reply = receive(&half_body);
        assert_eq!(kind(&reply), "timed_out", "{reply:?}");
        assert!(
            reply.json()["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("body was not complete")),
            "{reply:?}"
        );
        assert!(closed_after(&mut half_body, started).is_some());
        // The connection that kept asking is still served after the idle limit.
        assert_eq!(kind(&call(&mut other, "GET", "/version", "")), "ok");
    }

    #[test]
    fn with_the_work_lane_full_control_requests_get_through_and_excess_work_is_busy() {
        let stub = Arc::new(Stub::default());
        let server = Running::start(stub.clone(), TEST_LIMITS);
        let exec = r#"{"run":{"program":"/bin/sleep","args":["600"]}}"#;
        let exec_path = "/agents/a/exec";
        // Two run (the lane's size), one waits for a turn.
        let mut working: Vec<StdStream> = (0..3)
            .map(|_| {
                let mut stream = connect(&server.socket);
                send(&mut stream, "POST", exec_path, exec);
                stream
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let mut late = connect(&server.socket);
        let busy = call(&mut late, "POST", exec_path, exec);
        assert_eq!(kind(&busy), "busy", "{busy:?}");
        assert_eq!(busy.status, 429);
        for (method, path) in [
            ("GET", "/agents"),
            ("GET", "/version"),
            ("POST", "/agents/a/stop"),
        ] {
            let mut control = connect(&server.socket);
            let asked = std::time::Instant::now();
            assert_eq!(kind(&call(&mut control, method, path, "")), "ok", "{path}");
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
        let exec = r#"{"run":{"program":"/bin/true"}}"#;
        for _ in 0..2 {
            let asked = std::time::Instant::now();
            let reply = call(&mut client, "POST", "/agents/a/exec", exec);
            assert_eq!(kind(&reply), "timed_out", "{reply:?}");
            assert_eq!(reply.status, 504);
            // Had the first kept its turn, the second would time out waiting for one.
            assert!(
                reply.json()["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("before it was done")),
                "{reply:?}"
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

    #[test]
    fn bodies_over_the_limit_are_refused_unread_and_the_connection_closed() {
        let server = Running::start(Arc::new(Stub::default()), TEST_LIMITS);
        let started = std::time::Instant::now();
        let mut client = connect(&server.socket);
        let huge = MAX_REQUEST_BYTES as u64 + 1;
        client
            .write_all(&raw::request("POST", "/agents", b"{", Some(huge)))
            .unwrap();
        let reply = receive(&client);
        assert_eq!((reply.status, kind(&reply).as_str()), (413, "too_large"));
        assert!(closed_after(&mut client, started).is_some_and(|t| t < PATIENCE));
        // Chunked, with no length to refuse up front: read up to the limit, then refused.
        let mut chunked = connect(&server.socket);
        chunked
            .write_all(b"POST /agents HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap();
        let chunk = vec![b' '; 64 * 1024];
        for _ in 0..=(MAX_REQUEST_BYTES / chunk.len()) {
            if chunked
                .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .and_then(|()| chunked.write_all(&chunk))
                .and_then(|()| chunked.write_all(b"\r\n"))
                .is_err()
            {
                break;
            }
        }
        assert_eq!(kind(&receive(&chunked)), "too_large");
    }

    #[test]
    fn a_tcp_site_answers_only_requests_with_its_token() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap();
        let _server = Running::on(Arc::new(Stub::default()), TEST_LIMITS, move || Site {
            listener: Listener::Tcp(
                TcpListener::from_std(listener).unwrap(),
                Arc::from("s3cret"),
            ),
            scope: Scope::Api,
        });
        let ask = |authorization: Option<&str>| {
            let mut stream = std::net::TcpStream::connect(address).unwrap();
            stream.set_read_timeout(Some(PATIENCE)).unwrap();
            let header = authorization
                .map(|a| format!("Authorization: {a}\r\n"))
                .unwrap_or_default();
            stream
                .write_all(format!("GET /version HTTP/1.1\r\nHost: a\r\n{header}\r\n").as_bytes())
                .unwrap();
            raw::read_reply(&mut BufReader::new(stream)).unwrap()
        };
        for wrong in [
            None,
            Some("Bearer s3cre"),
            Some("Bearer s3cret2"),
            Some("s3cret"),
        ] {
            let reply = ask(wrong);
            assert_eq!(
                (reply.status, reply.kind().as_str()),
                (401, "unauthorized"),
                "{wrong:?}"
            );
        }
        assert_eq!(ask(Some("Bearer s3cret")).kind(), "ok");
    }

    #[test]
    fn the_openapi_document_and_errors_are_served_as_json() {
        let server = Running::start(Arc::new(Stub::default()), TEST_LIMITS);
        let mut client = connect(&server.socket);
        let document = call(&mut client, "GET", "/openapi.json", "");
        assert_eq!(document.status, 200);
        assert_eq!(document.content_type, "application/json");
        assert_eq!(document.json()["openapi"], "3.0.3");
        let missing = call(&mut client, "GET", "/nowhere", "");
        assert_eq!(
            (missing.status, missing.kind().as_str()),
            (404, "not_found")
        );
        let created = call(
            &mut client,
            "POST",
            "/pools",
            r#"{"name":"p","from":"/s","size":1}"#,
        );
        assert_eq!(created.status, 201);
    }

    #[test]
    fn a_metrics_site_serves_the_metrics_only() {
        let server = Running::serving(Arc::new(Stub::default()), TEST_LIMITS, Scope::Metrics);
        let mut client = connect(&server.socket);
        let metrics = call(&mut client, "GET", "/metrics", "");
        assert_eq!(metrics.status, 200, "{metrics:?}");
        assert_eq!(metrics.content_type, "text/plain; version=0.0.4");
        for (method, path) in [
            ("GET", "/version"),
            ("POST", "/agents"),
            ("GET", "/openapi.json"),
        ] {
            assert_eq!(
                call(&mut client, method, path, "").kind(),
                "not_found",
                "{path}"
            );
        }
    }

    #[test]
    fn curl_gets_an_answer_to_every_request() {
        let stub = Arc::new(Stub::default());
        stub.gate.add_permits(1000);
        let server = Running::start(stub, TEST_LIMITS);
        let body_dir = tempfile::tempdir().unwrap();
        for request in crate::daemon::routes::tests::every_request() {
            let call = routes::call(&request);
            let mut curl = std::process::Command::new("curl");
            curl.args(["--silent", "--show-error", "--unix-socket"])
                .arg(&server.socket)
                .args(["--request", call.method.as_str()])
                .args(["--write-out", "\n%{http_code}"]);
            if let Some(body) = &call.body {
                // From a file: a body may hold any bytes (a program's input).
                let file = body_dir.path().join("body");
                std::fs::write(&file, body).unwrap();
                curl.args([
                    "--header",
                    "Content-Type: application/json",
                    "--data-binary",
                ])
                .arg(format!("@{}", file.display()));
            }
            let out = curl
                .arg(format!("http://agentos{}", call.target))
                .output()
                .expect("curl runs (scripts/setup installs it)");
            let text = String::from_utf8_lossy(&out.stdout);
            let (body, status) = text.rsplit_once('\n').unwrap_or_default();
            assert!(
                out.status.success(),
                "{request:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                status == "200" || status == "201",
                "{request:?}: {status} {body}"
            );
            if !matches!(request, Request::Metrics) {
                let value: Value = serde_json::from_str(body).unwrap();
                assert_eq!(value["op"], request.op(), "{body}");
            }
        }
    }

    #[test]
    fn files_stream_both_ways_past_the_body_limit() {
        let stub = Arc::new(Stub::default());
        let server = Running::start(stub.clone(), TEST_LIMITS);
        let mut stream = connect(&server.socket);
        let big = call(&mut stream, "GET", "/agents/a/files?path=/big", "");
        assert_eq!(big.status, 200);
        assert_eq!(big.content_type, "application/octet-stream");
        assert!(big.body == big_file(), "{} bytes came", big.body.len());
        let missing = call(&mut stream, "GET", "/agents/a/files?path=/missing", "");
        assert_eq!(
            (missing.status, kind(&missing).as_str()),
            (404, "not_found")
        );

        // An upload three times the JSON body limit, in one request.
        let content = big_file();
        stream
            .write_all(&raw::request(
                "PUT",
                "/agents/a/files?path=/up&mode=600",
                &content,
                None,
            ))
            .unwrap();
        let up = receive(&stream);
        assert_eq!(
            (up.status, up.json()["size"].as_u64()),
            (201, Some(BIG_FILE as u64))
        );
        // Then the same connection serves on.
        assert_eq!(kind(&call(&mut stream, "GET", "/version", "")), "ok");
        assert_eq!(*stub.writes.lock().unwrap(), vec![Ok(BIG_FILE as u64)]);
    }

    #[test]
    fn a_cut_off_upload_is_never_taken_as_whole() {
        let stub = Arc::new(Stub::default());
        let server = Running::start(stub.clone(), TEST_LIMITS);
        // A client that stops sending halfway: each piece of a body has `body` to come.
        let mut stalled = connect(&server.socket);
        stalled
            .write_all(&raw::request(
                "PUT",
                "/agents/a/files?path=/x",
                b"half",
                Some(8),
            ))
            .unwrap();
        let started = std::time::Instant::now();
        let answer = receive(&stalled);
        assert_eq!(kind(&answer), "bad_request", "{:?}", answer.json());
        assert!(closed_after(&mut stalled, started).is_some());
        // A client that goes away halfway.
        let mut gone = connect(&server.socket);
        gone.write_all(&raw::request(
            "PUT",
            "/agents/a/files?path=/y",
            b"half",
            Some(8),
        ))
        .unwrap();
        drop(gone);
        let deadline = std::time::Instant::now() + PATIENCE;
        while stub.writes.lock().unwrap().len() < 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let writes = stub.writes.lock().unwrap().clone();
        assert_eq!(writes.len(), 2, "{writes:?}");
        assert!(writes.iter().all(Result::is_err), "{writes:?}");
    }

    #[test]
    fn a_bad_mode_is_refused_before_the_body_is_read() {
        let server = Running::start(Arc::new(Stub::default()), TEST_LIMITS);
        let mut stream = connect(&server.socket);
        let answer = call(
            &mut stream,
            "PUT",
            "/agents/a/files?path=/x&mode=999",
            "data",
        );
        assert_eq!(kind(&answer), "bad_request");
        assert!(
            String::from_utf8_lossy(&answer.body).contains("octal"),
            "{:?}",
            answer.json()
        );
    }
}
