//! E2B compatibility: the part of E2B's API its SDKs use, served beside the daemon's own and
//! translated into it, so that agents written for E2B run on agentos unchanged.
//!
//! - The control plane ([`sandboxes`]): `/sandboxes` and `/v2/sandboxes`, the API key in
//!   `X-API-KEY`, errors as `{"code": STATUS, "message": ...}`.
//! - The in-sandbox API (E2B's "envd"): Connect RPC with JSON ([`process`], [`filesystem`]) and
//!   plain `/files` and `/health`, for the sandbox that the `E2b-Sandbox-Id` header (or a
//!   `PORT-ID.DOMAIN` host) names, with the token the sandbox was created with in
//!   `X-Access-Token`.
//!
//! A sandbox is an agent named by its id; everything here goes through the daemon's API
//! ([`Api`]), with its lanes, deadlines and limits.

mod connect;
mod filesystem;
mod process;
pub mod sandboxes;
mod watchers;

use std::future::Future;
use std::io::{self, Read};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, StatusCode};
use serde::Serialize;
use tokio::sync::mpsc;

use super::api::{ApiError, ErrorKind, MAX_REQUEST_BYTES, Request, WriteFileRequest};
pub use super::link::ChunkBody;
use super::link::Chunks;
use super::secret::{bearer, same_secret};

pub use sandboxes::Registry;
use sandboxes::Sandbox;

/// How long a client may take to send a request's body (as the daemon's own API).
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a sandbox's time is checked.
pub const EXPIRY_CHECK: Duration = Duration::from_secs(1);

pub type Body = Either<Full<Bytes>, ChunkBody>;
pub type Response = hyper::Response<Body>;

/// What the E2B layer asks of the daemon.
pub trait Api: Send + Sync {
    /// Answers `request` in its lane, by its deadline.
    fn call(
        &self,
        request: Request,
    ) -> impl Future<Output = Result<serde_json::Value, ApiError>> + Send;

    /// Opens the stream `request` is answered with; it holds the request's turn in its lane
    /// until it ends or is dropped.
    fn open(&self, request: Request) -> impl Future<Output = Result<Chunks, ApiError>> + Send;

    /// Writes an agent's file from `body` (ended by an empty chunk).
    fn write_file(
        &self,
        request: WriteFileRequest,
        body: Chunks,
    ) -> impl Future<Output = Result<serde_json::Value, ApiError>> + Send;

    fn registry(&self) -> &Registry;

    fn count_error(&self, kind: ErrorKind);
}

/// Which part of E2B's API a request is for.
#[derive(Debug, PartialEq, Eq)]
pub enum Target {
    Control,
    /// The in-sandbox API of the sandbox with this id.
    Sandbox(String),
}

/// The part of E2B's API `head` asks for, if any: the daemon's own API has none of these paths
/// or headers.
pub fn target(head: &hyper::http::request::Parts) -> Option<Target> {
    if let Some(id) = head.headers.get("e2b-sandbox-id") {
        return Some(Target::Sandbox(id.to_str().unwrap_or_default().to_owned()));
    }
    let host = head
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| head.uri.host())
        .unwrap_or_default();
    if let Some(id) = sandbox_host(host) {
        return Some(Target::Sandbox(id.to_owned()));
    }
    sandboxes::claims(head.uri.path()).then_some(Target::Control)
}

/// The sandbox id of a `PORT-ID.DOMAIN` host name.
fn sandbox_host(host: &str) -> Option<&str> {
    let (label, _domain) = host.split_once('.')?;
    let (port, id) = label.split_once('-')?;
    (!port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && sandboxes::valid_id(id))
        .then_some(id)
}

/// A reply of the E2B layer.
pub struct Reply {
    status: StatusCode,
    content_type: &'static str,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Body,
}

impl Reply {
    pub fn json(status: StatusCode, value: &impl Serialize) -> Self {
        let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
        Self::bytes(status, connect::JSON, body.into())
    }

    pub fn bytes(status: StatusCode, content_type: &'static str, body: Bytes) -> Self {
        Self {
            status,
            content_type,
            headers: Vec::new(),
            body: Either::Left(Full::new(body)),
        }
    }

    pub fn empty(status: StatusCode) -> Self {
        Self::bytes(status, connect::JSON, Bytes::new())
    }

    pub fn stream(content_type: &'static str, body: ChunkBody) -> Self {
        Self {
            status: StatusCode::OK,
            content_type,
            headers: Vec::new(),
            body: Either::Right(body),
        }
    }

    pub fn header(mut self, name: &'static str, value: &str) -> Self {
        if let Ok(value) = HeaderValue::from_str(value) {
            self.headers.push((HeaderName::from_static(name), value));
        }
        self
    }

    fn into_response(self) -> Response {
        let mut response = hyper::Response::new(self.body);
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        );
        for (name, value) in self.headers {
            headers.insert(name, value);
        }
        response
    }
}

/// How an error is shaped for the part of the API that answers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// `{"code": STATUS, "message": ...}` (control plane, `/files`, `/health`).
    Rest,
    /// `{"code": "not_found", "message": ...}` with the Connect code's status.
    Connect,
}

fn error_reply(error: &ApiError, shape: Shape) -> Reply {
    match shape {
        Shape::Rest => {
            let status = super::routes::status(error.kind);
            Reply::json(
                status,
                &serde_json::json!({ "code": status.as_u16(), "message": error.message }),
            )
        }
        Shape::Connect => {
            let body = connect::ConnectError::from(error);
            Reply::json(connect::status(body.code), &body)
        }
    }
}

/// Answers one E2B request; `token` is the API's token on TCP (none on the private socket).
pub async fn serve(
    api: &impl Api,
    token: Option<&str>,
    target: Target,
    head: hyper::http::request::Parts,
    body: Incoming,
) -> Response {
    let shape = match &target {
        Target::Sandbox(_) if head.uri.path() == "/files" => Shape::Rest,
        Target::Sandbox(_) if head.uri.path() != "/health" => Shape::Connect,
        _ => Shape::Rest,
    };
    let (answered, close) = match target {
        Target::Control => (control(api, token, &head, body).await, false),
        Target::Sandbox(id) => in_sandbox(api, token, &id, &head, body).await,
    };
    let mut response = match answered {
        Ok(reply) => reply.into_response(),
        Err(error) => {
            api.count_error(error.kind);
            let mut reply = error_reply(&error, shape);
            if error.kind == ErrorKind::Unauthorized && shape == Shape::Rest {
                reply.status = StatusCode::UNAUTHORIZED;
            }
            reply.into_response()
        }
    };
    if close {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

async fn control(
    api: &impl Api,
    token: Option<&str>,
    head: &hyper::http::request::Parts,
    body: Incoming,
) -> Result<Reply, ApiError> {
    if let Some(token) = token {
        let given = head
            .headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .or_else(|| bearer(&head.headers))
            .unwrap_or_default();
        if !same_secret(given, token) {
            return Err(ApiError::new(
                ErrorKind::Unauthorized,
                "Invalid API key: send the daemon's API token as `X-API-KEY` (E2B_API_KEY)",
            ));
        }
    }
    let body = read_body(body, &head.headers).await?;
    sandboxes::serve(api, &head.method, head.uri.path(), head.uri.query(), &body).await
}

/// Answers an in-sandbox request; with `true` when the connection must close (its body was not
/// read whole).
async fn in_sandbox(
    api: &impl Api,
    token: Option<&str>,
    id: &str,
    head: &hyper::http::request::Parts,
    body: Incoming,
) -> (Result<Reply, ApiError>, bool) {
    let sandbox = match api.registry().get(id) {
        Some(sandbox) => sandbox,
        None if head.uri.path() == "/health" => {
            // What E2B's SDKs take for "not running".
            return (
                Ok(Reply::json(
                    StatusCode::BAD_GATEWAY,
                    &serde_json::json!({"code": 502, "message": "The sandbox was not found"}),
                )),
                false,
            );
        }
        None => {
            return (
                Err(ApiError::new(
                    ErrorKind::UnknownAgent,
                    format!("sandbox {} not found", agentos_protocol::clip(id, 80)),
                )),
                false,
            );
        }
    };
    if token.is_some() {
        let given = head
            .headers
            .get("x-access-token")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !same_secret(given, &sandbox.access_token) {
            return (
                Err(ApiError::new(
                    ErrorKind::Unauthorized,
                    "send the sandbox's `envdAccessToken` as `X-Access-Token`",
                )),
                false,
            );
        }
    }
    if sandbox.paused {
        if head.uri.path() == "/health" {
            return (
                Ok(Reply::json(
                    StatusCode::BAD_GATEWAY,
                    &serde_json::json!({"code": 502, "message": "The sandbox is paused"}),
                )),
                false,
            );
        }
        let error = ApiError::new(
            ErrorKind::NotRunning,
            format!(
                "sandbox {id} is paused: resume it (POST /sandboxes/{id}/resume, or connect to it)"
            ),
        );
        return (Err(error), false);
    }
    let user = match user_of(&head.headers) {
        Ok(user) => user,
        Err(e) => return (Err(e), false),
    };
    let call = Call {
        api,
        sandbox,
        user,
        timeout_ms: timeout_ms(&head.headers),
        keepalive: keepalive(&head.headers),
    };
    let path = head.uri.path();
    match (&head.method, path) {
        (&Method::GET, "/health") => (health(&call).await, false),
        (_, "/files") => filesystem::files(&call, head, body).await,
        (&Method::POST, _) => {
            let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
                return (Err(no_such_call(head)), false);
            };
            let stream = head
                .headers
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(connect::STREAM_JSON.as_bytes()));
            let body = match read_body(body, &head.headers).await {
                Ok(body) => body,
                Err(e) => return (Err(e), true),
            };
            let message = if stream {
                match connect::unenvelope(&body) {
                    Ok(message) => Bytes::copy_from_slice(message),
                    Err(e) => return (Err(e), false),
                }
            } else {
                body.clone()
            };
            let answered = match service {
                "process.Process" => process::serve(&call, method, &message, &body).await,
                "filesystem.Filesystem" => filesystem::serve(&call, method, &message).await,
                _ => Err(no_such_call(head)),
            };
            (answered, false)
        }
        _ => (Err(no_such_call(head)), false),
    }
}

fn no_such_call(head: &hyper::http::request::Parts) -> ApiError {
    ApiError::new(
        ErrorKind::MethodNotAllowed,
        format!(
            "{} {} is not part of the in-sandbox API agentos serves (see docs/e2b.md)",
            head.method,
            agentos_protocol::clip(head.uri.path(), 120)
        ),
    )
}

/// `GET /health`: 204 while the sandbox's agent runs.
async fn health(call: &Call<'_, impl Api>) -> Result<Reply, ApiError> {
    match sandboxes::find(call.api, &call.sandbox.id).await {
        Ok((_, agent)) if agent.state == super::api::AgentState::Running => {
            Ok(Reply::empty(StatusCode::NO_CONTENT))
        }
        _ => Ok(Reply::json(
            StatusCode::BAD_GATEWAY,
            &serde_json::json!({"code": 502, "message": "The sandbox is not running"}),
        )),
    }
}

/// One in-sandbox request: its sandbox, the user it acts as, its deadline.
pub struct Call<'a, A> {
    pub api: &'a A,
    pub sandbox: Sandbox,
    pub user: String,
    /// `Connect-Timeout-Ms`: for a process, how long it may run.
    pub timeout_ms: Option<u64>,
    /// `Keepalive-Ping-Interval`: how long a stream may stay silent before a keep-alive.
    pub keepalive: Option<Duration>,
}

impl<A> Call<'_, A> {
    /// The user's home, where relative paths start.
    pub fn home(&self) -> String {
        if self.user == "root" {
            "/root".to_owned()
        } else {
            format!("/home/{}", self.user)
        }
    }

    /// `path` made absolute from the user's home.
    pub fn path(&self, path: &str) -> String {
        if path.starts_with('/') {
            path.to_owned()
        } else if path.is_empty() || path == "~" {
            self.home()
        } else {
            let rest = path.strip_prefix("~/").unwrap_or(path);
            format!("{}/{rest}", self.home())
        }
    }
}

/// The user E2B's SDKs name with `Authorization: Basic base64("NAME:")`; `user` otherwise, as
/// in E2B's templates.
fn user_of(headers: &HeaderMap) -> Result<String, ApiError> {
    let Some(basic) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
    else {
        return Ok(DEFAULT_USER.to_owned());
    };
    let bad = || {
        ApiError::new(
            ErrorKind::BadRequest,
            "`Authorization: Basic` must hold base64 of `USER:` with a user name of letters, digits, `_` or `-`",
        )
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(basic.trim())
        .map_err(|_| bad())?;
    let text = String::from_utf8(decoded).map_err(|_| bad())?;
    let user = text.split(':').next().unwrap_or_default();
    let valid = (1..=32).contains(&user.len())
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if valid {
        Ok(user.to_owned())
    } else {
        Err(bad())
    }
}

/// Who in-sandbox requests act as unless they say.
const DEFAULT_USER: &str = "user";

/// The longest keep-alive interval a client may ask for.
const MAX_KEEPALIVE: Duration = Duration::from_secs(300);

fn keepalive(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|secs| Duration::from_secs(secs).clamp(Duration::from_secs(1), MAX_KEEPALIVE))
}

fn timeout_ms(headers: &HeaderMap) -> Option<u64> {
    headers
        .get("connect-timeout-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ms| *ms > 0)
}

/// Reads a request's body: at most [`MAX_REQUEST_BYTES`], within [`BODY_TIMEOUT`].
async fn read_body(body: Incoming, headers: &HeaderMap) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorKind::TooLarge,
            format!("a body over {MAX_REQUEST_BYTES} bytes; files go through `/files`"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_REQUEST_BYTES as u64) {
        return Err(too_large());
    }
    match tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(body, MAX_REQUEST_BYTES).collect(),
    )
    .await
    {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(ApiError::new(
            ErrorKind::BadRequest,
            format!("the body could not be read: {e}"),
        )),
        Err(_) => Err(ApiError::new(
            ErrorKind::TimedOut,
            format!(
                "the body was not complete within {} s",
                BODY_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// `len` random lowercase letters and digits.
pub fn random_text(len: usize) -> Result<String, ApiError> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(len);
    let mut urandom = std::fs::File::open("/dev/urandom")
        .map_err(|e| ApiError::new(ErrorKind::Failed, format!("no random bytes: {e}")))?;
    let mut bytes = [0u8; 64];
    while out.len() < len {
        urandom
            .read_exact(&mut bytes)
            .map_err(|e| ApiError::new(ErrorKind::Failed, format!("no random bytes: {e}")))?;
        // 252 = 7 * 36: bytes past it would favour some characters.
        for b in bytes.iter().filter(|b| **b < 252) {
            if out.len() == len {
                break;
            }
            out.push(char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]));
        }
    }
    Ok(out)
}

/// Turns the daemon's stream of newline-delimited JSON into another stream of messages.
pub trait Translate: Send + 'static {
    /// The messages for one line of the daemon's stream.
    fn line(&mut self, line: &[u8]) -> Vec<Bytes>;
    /// The message that keeps a quiet stream alive.
    fn keepalive(&self) -> Bytes;
    /// The messages that end the stream, once the daemon's ended.
    fn end(&mut self) -> Vec<Bytes>;
}

/// The longest line of a daemon stream that is translated; a longer one ends the stream.
const MAX_LINE_BYTES: usize = 16 << 20;

/// A body that carries `chunks`' lines translated, with a keep-alive message after every
/// `keepalive` of silence if asked; when the client goes, `chunks` is dropped at once, which
/// tells its producer.
pub fn relay(
    mut chunks: Chunks,
    mut translate: impl Translate,
    keepalive: Option<Duration>,
) -> ChunkBody {
    let (tx, rx) = mpsc::channel::<Result<Bytes, io::Error>>(1);
    tokio::spawn(async move {
        let mut pending: Vec<u8> = Vec::new();
        // Keep-alives come only once the stream began (its first message is `start`).
        let mut begun = false;
        loop {
            let silence = async {
                match keepalive.filter(|_| begun) {
                    Some(quiet) => tokio::time::sleep(quiet).await,
                    None => std::future::pending().await,
                }
            };
            let chunk = tokio::select! {
                chunk = chunks.recv() => chunk,
                () = tx.closed() => return,
                () = silence => {
                    if tx.send(Ok(translate.keepalive())).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            let data = match chunk {
                Some(Ok(data)) => data,
                Some(Err(_)) | None => break,
            };
            pending.extend_from_slice(&data);
            while let Some(at) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=at).collect();
                for message in translate.line(&line[..line.len() - 1]) {
                    begun = true;
                    if tx.send(Ok(message)).await.is_err() {
                        return;
                    }
                }
            }
            if pending.len() > MAX_LINE_BYTES {
                break;
            }
        }
        if !pending.is_empty() && pending.len() <= MAX_LINE_BYTES {
            for message in translate.line(&pending) {
                if tx.send(Ok(message)).await.is_err() {
                    return;
                }
            }
        }
        for message in translate.end() {
            if tx.send(Ok(message)).await.is_err() {
                return;
            }
        }
    });
    ChunkBody(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(headers: &[(&str, &str)], uri: &str) -> hyper::http::request::Parts {
        let mut request = hyper::Request::builder().uri(uri);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        request.body(()).unwrap().into_parts().0
    }

    #[test]
    fn requests_are_told_apart_by_header_host_or_path() {
        assert_eq!(
            target(&head(&[("e2b-sandbox-id", "iabc")], "/health")),
            Some(Target::Sandbox("iabc".into()))
        );
        assert_eq!(
            target(&head(&[("host", "49983-iabc.example.test")], "/files")),
            Some(Target::Sandbox("iabc".into()))
        );
        assert_eq!(
            target(&head(&[("host", "127.0.0.1:3000")], "/v2/sandboxes")),
            Some(Target::Control)
        );
        assert_eq!(target(&head(&[("host", "localhost")], "/agents")), None);
        assert_eq!(
            target(&head(&[("host", "x-Bad.example")], "/agents")),
            None,
            "not a PORT-ID host"
        );
    }

    /// Lines passed through as they are.
    struct Same;

    impl Translate for Same {
        fn line(&mut self, line: &[u8]) -> Vec<Bytes> {
            vec![Bytes::copy_from_slice(line)]
        }
        fn keepalive(&self) -> Bytes {
            Bytes::from_static(b"alive")
        }
        fn end(&mut self) -> Vec<Bytes> {
            vec![Bytes::from_static(b"end")]
        }
    }

    #[tokio::test]
    async fn a_silent_stream_gets_keep_alives_once_it_began() {
        let (tx, rx) = mpsc::channel(4);
        let ChunkBody(mut out) = relay(rx, Same, Some(Duration::from_millis(20)));
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send(Ok(Bytes::from_static(b"first\nsec")))
            .await
            .unwrap();
        assert_eq!(
            out.recv().await.unwrap().unwrap(),
            "first",
            "nothing before it began"
        );
        assert_eq!(out.recv().await.unwrap().unwrap(), "alive");
        tx.send(Ok(Bytes::from_static(b"ond\n"))).await.unwrap();
        let mut next = out.recv().await.unwrap().unwrap();
        while next == "alive" {
            next = out.recv().await.unwrap().unwrap();
        }
        assert_eq!(next, "second", "a line split across chunks comes whole");
        drop(tx);
        let mut last = out.recv().await.unwrap().unwrap();
        while last == "alive" {
            last = out.recv().await.unwrap().unwrap();
        }
        assert_eq!(last, "end");
        assert!(out.recv().await.is_none());
    }

    #[test]
    fn the_user_comes_from_basic_authorization_or_is_user() {
        let mut headers = HeaderMap::new();
        assert_eq!(user_of(&headers).unwrap(), "user");
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic cm9vdDo="),
        );
        assert_eq!(user_of(&headers).unwrap(), "root");
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic Li4vOg=="),
        );
        assert!(user_of(&headers).is_err(), "`../` is no user name");
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic !!"));
        assert!(user_of(&headers).is_err());
    }

    #[test]
    fn relative_paths_start_at_the_user_s_home() {
        let call = Call::<()> {
            api: &(),
            sandbox: Sandbox {
                id: "i1".into(),
                template: "base".into(),
                client_id: String::new(),
                metadata: Default::default(),
                env: Default::default(),
                started: std::time::SystemTime::now(),
                end: std::time::SystemTime::now(),
                access_token: String::new(),
                paused: false,
                saved: None,
                ending: Default::default(),
            },
            user: "user".into(),
            timeout_ms: None,
            keepalive: None,
        };
        assert_eq!(call.path("a/b"), "/home/user/a/b");
        assert_eq!(call.path("~/a"), "/home/user/a");
        assert_eq!(call.path(""), "/home/user");
        assert_eq!(call.path("/etc"), "/etc");
        let root = Call {
            user: "root".into(),
            ..call
        };
        assert_eq!(root.path("x"), "/root/x");
    }

    #[test]
    fn random_text_is_lowercase_letters_and_digits() {
        let text = random_text(40).unwrap();
        assert_eq!(text.len(), 40);
        assert!(sandboxes::valid_id(&text));
    }
}
