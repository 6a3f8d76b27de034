//! The API relayed to a daemon that serves it elsewhere (in a carrier, see [`super::carried`]):
//! each request accepted on this process's sites goes as it came to that daemon's TCP listener,
//! with the relay's own token in place of whatever the client sent, and the answer comes back as
//! it streams. Bodies are never gathered: a file of any size passes in either direction at the
//! pace of the slower end, and a client that goes closes the request it made.
//!
//! Who may ask is decided here as the daemon decides it ([`Listener::Unix`]: the socket's owner;
//! [`Listener::Tcp`]: a request with the API's token), and the daemon behind, which sees only the
//! relay, keeps every other limit (lanes, deadlines, sizes). E2B's API (see [`e2b::target`])
//! keeps its own keys: its control plane's key (`X-API-KEY`) is checked here and replaced as the
//! daemon's token is; a sandbox's own token (`X-Access-Token`, made by the daemon behind) and
//! its user (`Authorization: Basic`) pass as they came, for the daemon behind to check. While
//! that daemon is not up yet, requests wait for it; once it is gone they are answered
//! `shutting_down`, and a request it could not be asked is answered `failed`, both with the API's
//! error body.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, StatusCode, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};

use super::api::{ApiError, ErrorBody, ErrorKind};
use super::e2b::{self, Target};
use super::routes;
use super::secret::{bearer, same_secret};
use super::server::{ACCEPT_ERROR_PAUSE, Listener, Scope, Site};

/// Connections relayed at once per site (the daemon's own bound).
const MAX_CONNECTIONS: usize = 256;
/// How long a client may take to send a request's head, from connecting or from its last reply.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest request head the relay reads.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// How long connecting to the daemon behind may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Headers about one hop of a connection, not the request (RFC 9110, 7.6.1), and the one the
/// relay answers itself (`expect`).
const HOP_HEADERS: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::EXPECT,
];
/// Where E2B's control plane takes its key.
const API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Where the daemon behind the relay is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Not answering yet: requests wait.
    Booting,
    /// Answering at this address.
    Up(SocketAddr),
    /// Gone, for this reason: requests are refused.
    Down(Arc<str>),
}

/// Why a request could not be relayed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("cannot connect to it")]
    Connect(#[source] std::io::Error),
    #[error("no connection within {} s", CONNECT_TIMEOUT.as_secs())]
    ConnectTimeout,
    #[error("the exchange failed")]
    Http(#[from] hyper::Error),
    #[error("the request cannot be made")]
    Request(#[from] hyper::http::Error),
    #[error("the relay's token is not a header value")]
    Token,
}

/// What every connection of a relay shares.
pub struct Relay {
    gate: watch::Receiver<Gate>,
    /// `Bearer TOKEN` of the daemon behind.
    authorization: HeaderValue,
    /// Its token alone, as E2B's key.
    api_key: HeaderValue,
}

impl Relay {
    pub fn new(gate: watch::Receiver<Gate>, token: &str) -> Result<Self, RelayError> {
        let secret = |text: &str| -> Result<HeaderValue, RelayError> {
            let mut value = HeaderValue::from_str(text).map_err(|_| RelayError::Token)?;
            value.set_sensitive(true);
            Ok(value)
        };
        Ok(Self {
            gate,
            authorization: secret(&format!("Bearer {token}"))?,
            api_key: secret(token)?,
        })
    }

    /// Whether the daemon at `address` answers `GET /version` (200).
    pub async fn answers(&self, address: SocketAddr) -> bool {
        let request = hyper::Request::get("/version")
            .header(header::AUTHORIZATION, self.authorization.clone())
            .body(Empty::<Bytes>::new());
        match request {
            Ok(request) => forward(address, request)
                .await
                .is_ok_and(|response| response.status() == StatusCode::OK),
            Err(_) => false,
        }
    }

    /// Checks who asks (`token`: the API's token on TCP, none on the socket) as the daemon would,
    /// and puts the daemon's own credentials in `headers`; or why it is refused.
    fn credentials(
        &self,
        head: &mut hyper::http::request::Parts,
        scope: Scope,
        token: Option<&str>,
    ) -> Result<(), ApiError> {
        let target = match scope {
            Scope::Api => e2b::target(head),
            Scope::Metrics => None,
        };
        let headers = &mut head.headers;
        match target {
            // The daemon behind checks the sandbox's own token, made by it.
            Some(Target::Sandbox(_)) => {}
            Some(Target::Control) => {
                let given = headers
                    .get(&API_KEY)
                    .and_then(|v| v.to_str().ok())
                    .or_else(|| bearer(headers))
                    .unwrap_or_default();
                let allowed = token.is_none_or(|token| same_secret(given, token));
                headers.remove(&API_KEY);
                headers.remove(header::AUTHORIZATION);
                // Without the key, the daemon behind refuses it in E2B's own words.
                if allowed {
                    headers.insert(API_KEY, self.api_key.clone());
                }
            }
            None => {
                if let Some(token) = token
                    && !same_secret(bearer(headers).unwrap_or_default(), token)
                {
                    return Err(ApiError::new(
                        ErrorKind::Unauthorized,
                        "send the API token as `Authorization: Bearer TOKEN` (AGENTOS_API_TOKEN, or the file the daemon named when it started)",
                    ));
                }
                headers.insert(header::AUTHORIZATION, self.authorization.clone());
            }
        }
        Ok(())
    }

    /// The daemon's address once it is up, or why it never will be.
    async fn upstream(&self) -> Result<SocketAddr, Arc<str>> {
        let mut gate = self.gate.clone();
        let seen = gate
            .wait_for(|gate| *gate != Gate::Booting)
            .await
            .map(|gate| gate.clone());
        match seen {
            Ok(Gate::Up(address)) => Ok(address),
            Ok(Gate::Down(why)) => Err(why),
            Ok(Gate::Booting) | Err(_) => Err(Arc::from("the relay is stopping")),
        }
    }
}

/// Relays the requests of every site until `stop` completes.
pub async fn serve(sites: Vec<Site>, relay: Arc<Relay>, stop: impl Future<Output = ()>) {
    let loops: Vec<_> = sites
        .into_iter()
        .map(|site| tokio::spawn(accept_loop(relay.clone(), site)))
        .collect();
    stop.await;
    for accepting in loops {
        accepting.abort();
    }
}

async fn accept_loop(relay: Arc<Relay>, site: Site) {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        // The turn comes first: past the bound, clients wait in the kernel's backlog.
        let Ok(turn) = connections.clone().acquire_owned().await else {
            return;
        };
        let accepted = match &site.listener {
            Listener::Unix(listener) => listener.accept().await.map(|(stream, _)| {
                tokio::spawn(connection(relay.clone(), stream, site.scope, None, turn));
            }),
            Listener::Tcp(listener, token) => listener.accept().await.map(|(stream, _)| {
                let _ = stream.set_nodelay(true);
                let token = Some(token.clone());
                tokio::spawn(connection(relay.clone(), stream, site.scope, token, turn));
            }),
        };
        if let Err(e) = accepted {
            tracing::warn!(error = %e, "accept failed");
            tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
        }
    }
}

async fn connection<S>(
    relay: Arc<Relay>,
    stream: S,
    scope: Scope,
    token: Option<Arc<str>>,
    _turn: tokio::sync::OwnedSemaphorePermit,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request| {
        let (relay, token) = (relay.clone(), token.clone());
        async move { Ok::<_, Infallible>(respond(&relay, scope, token.as_deref(), request).await) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(IDLE_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "client connection ended");
    }
}

/// An answer: the daemon's as it streams, or the relay's own.
type Response = hyper::Response<Either<Incoming, Full<Bytes>>>;

async fn respond(
    relay: &Relay,
    scope: Scope,
    token: Option<&str>,
    request: hyper::Request<Incoming>,
) -> Response {
    let (mut head, body) = request.into_parts();
    if let Err(refused) = relay.credentials(&mut head, scope, token) {
        return error_response(refused);
    }
    let path = head.uri.path();
    if scope == Scope::Metrics && !(head.method == Method::GET && path == "/metrics") {
        return error_response(ApiError::new(
            ErrorKind::NotFound,
            format!(
                "this socket serves GET /metrics only, not {} {path}",
                head.method
            ),
        ));
    }
    let address = match relay.upstream().await {
        Ok(address) => address,
        Err(why) => return error_response(ApiError::new(ErrorKind::ShuttingDown, &*why)),
    };
    match forward(address, hyper::Request::from_parts(head, body)).await {
        Ok(response) => response.map(Either::Left),
        Err(e) => error_response(ApiError::new(
            ErrorKind::Failed,
            format!(
                "the daemon in the carrier did not answer: {}",
                with_causes(&e)
            ),
        )),
    }
}

/// Sends `request` (its credentials set) to the daemon at `address` on a connection of its own,
/// and returns its answer, whose body streams on.
async fn forward<B>(
    address: SocketAddr,
    request: hyper::Request<B>,
) -> Result<hyper::Response<Incoming>, RelayError>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
        .await
        .map_err(|_| RelayError::ConnectTimeout)?
        .map_err(RelayError::Connect)?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "a relayed connection ended");
        }
    });
    let (mut head, body) = request.into_parts();
    head.uri = head
        .uri
        .path_and_query()
        .map_or_else(|| Uri::from_static("/"), |p| Uri::from(p.clone()));
    head.version = hyper::Version::HTTP_11;
    strip_hop_headers(&mut head.headers);
    // The client's host stays: E2B's API routes by it.
    if !head.headers.contains_key(header::HOST) {
        head.headers.insert(
            header::HOST,
            HeaderValue::from_str(&address.to_string()).map_err(hyper::http::Error::from)?,
        );
    }
    let mut response = sender
        .send_request(hyper::Request::from_parts(head, body))
        .await?;
    strip_hop_headers(response.headers_mut());
    Ok(response)
}

/// An error and its causes, on one line.
pub(super) fn with_causes(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        line.push_str(": ");
        line.push_str(&e.to_string());
        cause = e.source();
    }
    line
}

/// Removes the headers about one hop, and those `Connection` names.
fn strip_hop_headers(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in HOP_HEADERS.iter().chain(&named) {
        headers.remove(name);
    }
}

fn error_response(error: ApiError) -> Response {
    let status = routes::status(error.kind);
    let body = serde_json::to_vec(&ErrorBody { error }).unwrap_or_default();
    let mut response = hyper::Response::new(Either::Right(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if status == StatusCode::UNAUTHORIZED {
        headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use http_body_util::BodyExt;
    use hyper::body::{Body, Frame};

    use super::*;

    const INNER: &str = "inner-token-0123456789";
    const OUTER: &str = "outer-token-0123456789";

    /// `len` bytes of a pattern, made as they are sent.
    struct Pattern {
        sent: usize,
        len: usize,
    }

    const PIECE: usize = 64 * 1024;

    fn pattern_byte(at: usize) -> u8 {
        (at % 251) as u8
    }

    impl Body for Pattern {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            if self.sent == self.len {
                return Poll::Ready(None);
            }
            let end = (self.sent + PIECE).min(self.len);
            let piece: Vec<u8> = (self.sent..end).map(pattern_byte).collect();
            self.sent = end;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(piece)))))
        }
    }

    /// A daemon stand-in: `/echo` streams the body back to those with its token; any other path
    /// is answered with what came: the target, the headers' names, the credentials and the host.
    async fn upstream() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let service = service_fn(|request: hyper::Request<Incoming>| async move {
                    let value = |name: &str| {
                        request
                            .headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_owned()
                    };
                    let authorization = value("authorization");
                    let response = if request.uri().path() != "/echo" {
                        let mut names: Vec<&str> =
                            request.headers().keys().map(HeaderName::as_str).collect();
                        names.sort();
                        let seen = format!(
                            "{} {} auth={authorization} key={} host={}",
                            request.uri(),
                            names.join(","),
                            value("x-api-key"),
                            value("host"),
                        );
                        hyper::Response::new(Either::Right(Full::new(Bytes::from(seen))))
                    } else if authorization == format!("Bearer {INNER}") {
                        hyper::Response::new(Either::Left(request.into_body()))
                    } else {
                        let mut response = hyper::Response::new(Either::Right(Full::default()));
                        *response.status_mut() = StatusCode::UNAUTHORIZED;
                        response
                    };
                    Ok::<_, Infallible>(response)
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        address
    }

    /// A relay in front of a stand-in: its socket, its TCP address and its gate.
    struct Setup {
        _dir: tempfile::TempDir,
        socket: std::path::PathBuf,
        tcp: SocketAddr,
        gate: watch::Sender<Gate>,
        upstream: SocketAddr,
    }

    async fn setup(gate: Gate) -> Setup {
        let upstream = upstream().await;
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let unix = tokio::net::UnixListener::bind(&socket).unwrap();
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp_address = tcp.local_addr().unwrap();
        let gate = match gate {
            Gate::Up(_) => Gate::Up(upstream),
            other => other,
        };
        let (sender, receiver) = watch::channel(gate);
        let relay = Arc::new(Relay::new(receiver, INNER).unwrap());
        let sites = vec![
            Site {
                listener: Listener::Unix(unix),
                scope: Scope::Api,
            },
            Site {
                listener: Listener::Tcp(tcp, Arc::from(OUTER)),
                scope: Scope::Api,
            },
        ];
        tokio::spawn(serve(sites, relay, std::future::pending()));
        Setup {
            _dir: dir,
            socket,
            tcp: tcp_address,
            gate: sender,
            upstream,
        }
    }

    type Sender<B> = hyper::client::conn::http1::SendRequest<B>;

    async fn over_unix<B>(socket: &std::path::Path) -> Sender<B>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        sender
    }

    async fn over_tcp(address: SocketAddr) -> Sender<Empty<Bytes>> {
        let stream = TcpStream::connect(address).await.unwrap();
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        sender
    }

    fn get(path: &str, authorization: Option<&str>) -> hyper::Request<Empty<Bytes>> {
        let mut request = hyper::Request::get(path).header(header::HOST, "agentos");
        if let Some(authorization) = authorization {
            request = request.header(header::AUTHORIZATION, authorization);
        }
        request.body(Empty::new()).unwrap()
    }

    async fn text(response: hyper::Response<Incoming>) -> (StatusCode, String) {
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_large_body_streams_through_in_both_directions_at_once() {
        const LEN: usize = 64 << 20;
        runtime().block_on(async {
            let setup = setup(Gate::Up(SocketAddr::from(([0, 0, 0, 0], 0)))).await;
            let mut sender = over_unix::<Pattern>(&setup.socket).await;
            // No length: the body goes chunked, and comes back as the stand-in echoes it.
            let request = hyper::Request::put("/echo")
                .header(header::HOST, "agentos")
                .body(Pattern { sent: 0, len: LEN })
                .unwrap();
            let response = sender.send_request(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let mut body = response.into_body();
            let mut got = 0;
            while let Some(frame) = body.frame().await {
                let data = frame.unwrap().into_data().unwrap_or_default();
                for (i, b) in data.iter().enumerate() {
                    assert_eq!(*b, pattern_byte(got + i), "byte {}", got + i);
                }
                got += data.len();
            }
            assert_eq!(got, LEN);
        });
    }

    #[test]
    fn tcp_clients_need_the_token_and_the_daemon_gets_its_own() {
        runtime().block_on(async {
            let setup = setup(Gate::Up(SocketAddr::from(([0, 0, 0, 0], 0)))).await;
            let mut tcp = over_tcp(setup.tcp).await;
            for authorization in [None, Some("Bearer wrong-token-0123456789"), Some(INNER)] {
                let (status, body) = text(
                    tcp.send_request(get("/version", authorization))
                        .await
                        .unwrap(),
                )
                .await;
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{authorization:?}");
                assert!(body.contains("\"unauthorized\""), "{body}");
            }
            let outer = format!("Bearer {OUTER}");
            let (status, body) = text(
                tcp.send_request(get("/version?x=1", Some(&outer)))
                    .await
                    .unwrap(),
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(
                body,
                format!("/version?x=1 authorization,host auth=Bearer {INNER} key=- host=agentos")
            );

            // On the socket no token is needed; one sent is not passed on, nor are hop headers.
            let mut unix = over_unix::<Empty<Bytes>>(&setup.socket).await;
            let mut request = get("/agents", Some("Bearer mine"));
            let headers = request.headers_mut();
            headers.insert(header::CONNECTION, HeaderValue::from_static("x-hop"));
            headers.insert("x-hop", HeaderValue::from_static("1"));
            headers.insert("x-kept", HeaderValue::from_static("1"));
            let (status, body) = text(unix.send_request(request).await.unwrap()).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert!(
                body.starts_with("/agents authorization,host,x-kept auth=Bearer inner"),
                "{body}"
            );
        });
    }

    #[test]
    fn e2b_keys_are_checked_and_replaced_and_a_sandboxs_own_pass_through() {
        runtime().block_on(async {
            let setup = setup(Gate::Up(SocketAddr::from(([0, 0, 0, 0], 0)))).await;
            let mut tcp = over_tcp(setup.tcp).await;
            let mut ask = async |path: &str, headers: &[(&'static str, &str)]| {
                let mut request = get(path, None);
                for (name, value) in headers {
                    request
                        .headers_mut()
                        .insert(*name, HeaderValue::from_str(value).unwrap());
                }
                text(tcp.send_request(request).await.unwrap()).await.1
            };
            // The control plane's key: the relay's own for the API's, none for another.
            let seen = ask("/v2/sandboxes", &[("x-api-key", OUTER)]).await;
            assert!(
                seen.ends_with(&format!("auth=- key={INNER} host=agentos")),
                "{seen}"
            );
            let seen = ask("/sandboxes", &[("x-api-key", "wrong-key-0123456789ab")]).await;
            assert!(seen.ends_with("auth=- key=- host=agentos"), "{seen}");
            // In a sandbox: its user and its token as they came, and the host that names it.
            let seen = ask(
                "/files?path=a",
                &[
                    ("authorization", "Basic dXNlcjo="),
                    ("x-access-token", "sandbox-token"),
                    ("host", "49983-abc123.agentos.local"),
                ],
            )
            .await;
            assert!(
                seen.ends_with("auth=Basic dXNlcjo= key=- host=49983-abc123.agentos.local"),
                "{seen}"
            );
            assert!(seen.contains("x-access-token"), "{seen}");
        });
    }

    #[test]
    fn requests_wait_while_the_daemon_boots_and_are_refused_once_it_is_gone() {
        runtime().block_on(async {
            let setup = setup(Gate::Booting).await;
            let mut unix = over_unix::<Empty<Bytes>>(&setup.socket).await;
            let waiting = tokio::spawn(async move {
                let answer = unix.send_request(get("/version", None)).await.unwrap();
                (unix, text(answer).await)
            });
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(!waiting.is_finished(), "answered while booting");
            setup.gate.send(Gate::Up(setup.upstream)).unwrap();
            let (mut unix, (status, _)) = waiting.await.unwrap();
            assert_eq!(status, StatusCode::OK);

            setup
                .gate
                .send(Gate::Down(Arc::from("the carrier ended")))
                .unwrap();
            let (status, body) =
                text(unix.send_request(get("/version", None)).await.unwrap()).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            let error: ErrorBody = serde_json::from_str(&body).unwrap();
            assert_eq!(error.error.kind, ErrorKind::ShuttingDown);
            assert_eq!(error.error.message, "the carrier ended");

            // A daemon that does not answer: the request is answered `failed`.
            let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let address = gone.local_addr().unwrap();
            drop(gone);
            setup.gate.send(Gate::Up(address)).unwrap();
            let (status, body) =
                text(unix.send_request(get("/version", None)).await.unwrap()).await;
            assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
            assert!(body.contains("\"failed\""), "{body}");
        });
    }
}
