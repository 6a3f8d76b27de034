//! The client end of the daemon's API, for the CLI and the tests: each [`Request`] as an HTTP
//! request on the daemon's Unix socket (see [`super::routes`]), its answer read back as the type
//! the caller expects. [`raw`] writes and reads requests byte by byte, for clients that must
//! send what a well-behaved one never would.

use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use super::api::{ApiError, ErrorBody, ErrorKind, Request};
use super::routes;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the agentos daemon at {path}: {source}; start it with `agentos daemon` (or pass --socket PATH)"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the connection to the daemon failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("cannot start the client's event loop")]
    Runtime(#[source] io::Error),
    #[error("the daemon's answer is not what this client expects: {0}")]
    Unexpected(String),
    #[error("{0}")]
    Api(ApiError),
}

/// One connection to the daemon, carrying any number of requests one after the other.
pub struct Client {
    runtime: tokio::runtime::Runtime,
    sender: SendRequest<Full<Bytes>>,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ClientError::Runtime)?;
        let sender = runtime.block_on(async {
            let stream = tokio::net::UnixStream::connect(path)
                .await
                .map_err(|source| ClientError::Connect {
                    path: path.to_path_buf(),
                    source,
                })?;
            let (sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "the daemon connection ended");
                }
            });
            Ok::<_, ClientError>(sender)
        })?;
        Ok(Self { runtime, sender })
    }

    /// Sends `request` and reads its answer.
    pub fn call<T: DeserializeOwned>(&mut self, request: &Request) -> Result<T, ClientError> {
        let call = routes::call(request);
        let mut http = hyper::Request::new(Full::new(Bytes::from(
            call.body.clone().unwrap_or_default(),
        )));
        *http.method_mut() = call.method;
        *http.uri_mut() = call
            .target
            .parse()
            .map_err(|e| ClientError::Unexpected(format!("the path {}: {e}", call.target)))?;
        let headers = http.headers_mut();
        headers.insert(header::HOST, HeaderValue::from_static("agentos"));
        if call.body.is_some() {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        let sender = &mut self.sender;
        let (status, content_type, body) = self.runtime.block_on(async {
            sender.ready().await?;
            let response = sender.send_request(http).await?;
            let status = response.status();
            let content_type = response
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, ClientError>((status, content_type, body))
        })?;
        if !status.is_success() {
            return Err(error_of(status.as_u16(), &body));
        }
        let value = if content_type.starts_with("text/plain") {
            serde_json::json!({ "text": String::from_utf8_lossy(&body) })
        } else {
            serde_json::from_slice(&body).map_err(|e| ClientError::Unexpected(e.to_string()))?
        };
        serde_json::from_value(value).map_err(|e| ClientError::Unexpected(e.to_string()))
    }
}

/// The error an answer with `status` carries in `body`.
fn error_of(status: u16, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(error) => ClientError::Api(error.error),
        Err(_) => ClientError::Api(ApiError::new(
            ErrorKind::Failed,
            format!(
                "the daemon answered {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ),
        )),
    }
}

/// Requests and answers as bytes, for clients that test the server's limits.
pub mod raw {
    use std::io::{self, BufRead, Read};

    /// The bytes of an HTTP/1.1 request with `body`, its length declared as `length` (the
    /// body's own unless given).
    pub fn request(method: &str, target: &str, body: &[u8], length: Option<u64>) -> Vec<u8> {
        let length = length.unwrap_or(body.len() as u64);
        let mut bytes = format!(
            "{method} {target} HTTP/1.1\r\nHost: agentos\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
        )
        .into_bytes();
        bytes.extend_from_slice(body);
        bytes
    }

    /// An answer as it came.
    #[derive(Debug)]
    pub struct Reply {
        pub status: u16,
        pub content_type: String,
        pub body: Vec<u8>,
    }

    impl Reply {
        /// `ok` for a success, else the error's kind.
        pub fn kind(&self) -> String {
            if (200..300).contains(&self.status) {
                return "ok".into();
            }
            serde_json::from_slice::<serde_json::Value>(&self.body)
                .ok()
                .and_then(|v| v["error"]["kind"].as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("status {}", self.status))
        }

        /// The body as JSON (null when it is not).
        pub fn json(&self) -> serde_json::Value {
            serde_json::from_slice(&self.body).unwrap_or_default()
        }
    }

    /// The longest answer head read.
    const MAX_HEAD: usize = 64 * 1024;
    /// The longest answer body read.
    const MAX_BODY: u64 = 64 << 20;

    /// Reads one answer (its body by its `Content-Length`).
    pub fn read_reply(stream: &mut impl BufRead) -> io::Result<Reply> {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            if head.len() > MAX_HEAD {
                return Err(invalid("the answer's head is too long"));
            }
            let read = stream.read_until(b'\n', &mut head)?;
            if read == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the connection closed before an answer",
                ));
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        response
            .parse(&head)
            .map_err(|e| invalid(&format!("not an HTTP answer: {e}")))?;
        let status = response.code.unwrap_or_default();
        let value = |name: &str| {
            response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
        };
        let content_type = value("content-type").unwrap_or_default();
        let length: u64 = value("content-length")
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| invalid("the answer has no Content-Length"))?;
        if length > MAX_BODY {
            return Err(invalid("the answer's body is too long"));
        }
        let mut body = Vec::new();
        stream.take(length).read_to_end(&mut body)?;
        Ok(Reply {
            status,
            content_type,
            body,
        })
    }

    fn invalid(why: &str) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, why.to_owned())
    }
}
