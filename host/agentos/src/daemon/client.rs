//! The client end of the daemon's API, for the CLI and the tests: each [`Request`] as an HTTP
//! request on the daemon's Unix socket (see [`super::routes`]), its answer read back as the type
//! the caller expects. [`raw`] writes and reads requests byte by byte, for clients that must
//! send what a well-behaved one never would.

use std::io;
use std::path::{Path, PathBuf};

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use super::api::{
    ApiError, ErrorBody, ErrorKind, FileRequest, FileWrittenReply, ProgramLine, Request,
    WriteFileRequest,
};
use super::link::ChunkBody;
use super::routes;
use agentos_protocol::files::FILE_CHUNK_BYTES;

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
    /// The local end of a file transfer failed.
    #[error("{0}")]
    Local(#[source] io::Error),
    #[error("the file was cut off on its way from the daemon: {0}")]
    CutOff(#[source] hyper::Error),
}

type RequestBody = BoxBody<Bytes, io::Error>;

/// One connection to the daemon, carrying any number of requests one after the other.
pub struct Client {
    runtime: tokio::runtime::Runtime,
    sender: SendRequest<RequestBody>,
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
        let http = whole_request(routes::call(request))?;
        self.answer(http)
    }

    /// Sends `http` and reads its whole answer as `T`, or the error it carries.
    fn answer<T: DeserializeOwned>(
        &mut self,
        http: hyper::Request<RequestBody>,
    ) -> Result<T, ClientError> {
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
        read_answer(status.as_u16(), &content_type, &body)
    }

    /// Reads an agent's file into `sink` as it arrives; its size.
    pub fn download(
        &mut self,
        request: &FileRequest,
        sink: &mut dyn Write,
    ) -> Result<u64, ClientError> {
        let mut size = 0u64;
        self.streamed(&Request::ReadFile(request.clone()), &mut |data| {
            size += data.len() as u64;
            sink.write_all(data).map_err(ClientError::Local)
        })?;
        Ok(size)
    }

    /// Sends a request answered with a program's lines (`start` without `detach`, `attach`)
    /// and hands each line to `on_line` as it comes, to the stream's end.
    pub fn follow(
        &mut self,
        request: &Request,
        on_line: &mut dyn FnMut(ProgramLine) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        let mut pending = Vec::new();
        self.streamed(request, &mut |data| {
            pending.extend_from_slice(data);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let line = serde_json::from_slice(&line)
                    .map_err(|e| ClientError::Unexpected(e.to_string()))?;
                on_line(line)?;
            }
            Ok(())
        })
    }

    /// Sends a request answered with a stream and hands its bytes to `on_data` as they come,
    /// to its end; an error answer is the error it carries.
    fn streamed(
        &mut self,
        request: &Request,
        on_data: &mut dyn FnMut(&[u8]) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        let http = whole_request(routes::call(request))?;
        let sender = &mut self.sender;
        self.runtime.block_on(async {
            sender.ready().await?;
            let response = sender.send_request(http).await?;
            let status = response.status();
            let mut body = response.into_body();
            if !status.is_success() {
                let body = body.collect().await?.to_bytes();
                return Err(error_of(status.as_u16(), &body));
            }
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.map_err(ClientError::CutOff)?.into_data() {
                    on_data(&data)?;
                }
            }
            Ok(())
        })
    }

    /// Writes an agent's file from `source`, read to its end on a thread of its own.
    pub fn upload(
        &mut self,
        request: &WriteFileRequest,
        mut source: Box<dyn Read + Send>,
    ) -> Result<FileWrittenReply, ClientError> {
        let call = routes::call(&Request::WriteFile(request.clone()));
        let (chunks, body) = tokio::sync::mpsc::channel(4);
        let failed: Arc<Mutex<Option<io::Error>>> = Arc::default();
        let reader_failed = failed.clone();
        std::thread::Builder::new()
            .name("upload".into())
            .spawn(move || {
                let mut buf = vec![0u8; FILE_CHUNK_BYTES];
                loop {
                    let chunk = match source.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => Ok(Bytes::copy_from_slice(&buf[..n])),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            let why = io::Error::new(e.kind(), e.to_string());
                            *reader_failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                            Err(why)
                        }
                    };
                    let last = chunk.is_err();
                    if chunks.blocking_send(chunk).is_err() || last {
                        return;
                    }
                }
            })
            .map_err(ClientError::Local)?;
        let http = http_request(call.method, &call.target, ChunkBody(body).boxed(), false)?;
        let answered = self.answer(http);
        if let Some(e) = failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(ClientError::Local(e));
        }
        answered
    }
}

/// `call` as an HTTP request with its whole body (JSON, when it has one).
fn whole_request(call: routes::HttpCall) -> Result<hyper::Request<RequestBody>, ClientError> {
    let json = call.body.is_some();
    let body = Full::new(Bytes::from(call.body.unwrap_or_default()))
        .map_err(|never| match never {})
        .boxed();
    http_request(call.method, &call.target, body, json)
}

/// An HTTP request to the daemon.
fn http_request(
    method: hyper::Method,
    target: &str,
    body: RequestBody,
    json: bool,
) -> Result<hyper::Request<RequestBody>, ClientError> {
    let mut http = hyper::Request::new(body);
    *http.method_mut() = method;
    *http.uri_mut() = target
        .parse()
        .map_err(|e| ClientError::Unexpected(format!("the path {target}: {e}")))?;
    let headers = http.headers_mut();
    headers.insert(header::HOST, HeaderValue::from_static("agentos"));
    if json {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    Ok(http)
}

/// An answer read as `T`, or as the error it carries.
fn read_answer<T: DeserializeOwned>(
    status: u16,
    content_type: &str,
    body: &[u8],
) -> Result<T, ClientError> {
    if !(200..300).contains(&status) {
        return Err(error_of(status, body));
    }
    let value = if content_type.starts_with("text/plain") {
        serde_json::json!({ "text": String::from_utf8_lossy(body) })
    } else {
        serde_json::from_slice(body).map_err(|e| ClientError::Unexpected(e.to_string()))?
    };
    serde_json::from_value(value).map_err(|e| ClientError::Unexpected(e.to_string()))
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
        let chunked = value("transfer-encoding").is_some_and(|v| v.contains("chunked"));
        let body = if status == 204 || status == 304 {
            Vec::new()
        } else if chunked {
            read_chunked(stream)?
        } else {
            let length: u64 = value("content-length")
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| invalid("the answer has no Content-Length"))?;
            if length > MAX_BODY {
                return Err(invalid("the answer's body is too long"));
            }
            let mut body = Vec::new();
            stream.take(length).read_to_end(&mut body)?;
            body
        };
        Ok(Reply {
            status,
            content_type,
            body,
        })
    }

    /// Reads a chunked body to its last chunk; a body cut short is an error.
    fn read_chunked(stream: &mut impl BufRead) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let mut line = Vec::new();
            stream.take(1024).read_until(b'\n', &mut line)?;
            if !line.ends_with(b"\n") {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the answer's body was cut short",
                ));
            }
            let size = std::str::from_utf8(&line)
                .ok()
                .and_then(|l| l.trim().split(';').next())
                .and_then(|hex| u64::from_str_radix(hex, 16).ok())
                .ok_or_else(|| invalid("a chunk's size is not hexadecimal"))?;
            if body.len() as u64 + size > MAX_BODY {
                return Err(invalid("the answer's body is too long"));
            }
            let before = body.len();
            stream.take(size).read_to_end(&mut body)?;
            let mut end = [0u8; 2];
            if (body.len() - before) as u64 != size || stream.read_exact(&mut end).is_err() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the answer's body was cut short",
                ));
            }
            if size == 0 {
                return Ok(body);
            }
        }
    }

    fn invalid(why: &str) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, why.to_owned())
    }
}
