//! Connections of their own from the daemon to a running guest agent, for the requests that
//! stream (files, followed programs) or must not wait for the agent's queue of programs and
//! models. Each runs on a blocking thread; bytes cross to and from the HTTP side through small
//! bounded channels, so a slow end slows the other and memory stays bounded.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Frame;
use tokio::sync::{mpsc, oneshot};

use agentos_core::agent::connection::{AgentConnection, ConnectionError};
use agentos_core::agent::vm::connect_to_agent;
use agentos_core::cgroup::AgentCgroup;

use super::api::{ApiError, ErrorKind};

/// How long opening a connection to the guest agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Chunks in flight between the guest's side and the client's, each way.
const CHANNEL_CHUNKS: usize = 4;

/// Bytes as they come; an error ends the stream unfinished. A body sent to the guest ends with
/// an empty chunk: a stream that closes without it was cut off.
pub type Chunks = mpsc::Receiver<Result<Bytes, io::Error>>;

/// Chunks as an HTTP body (sent chunked); an error ends it unfinished, which the far end sees
/// as a body cut short.
pub struct ChunkBody(pub Chunks);

impl hyper::body::Body for ChunkBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|chunk| chunk.map(Frame::data)))
    }
}

/// Where a running agent's guest agent is reached, and its name for messages.
pub struct GuestLink {
    pub name: String,
    pub socket: PathBuf,
    /// Its VM's cgroup: a frozen (paused) agent's silence is no stall.
    pub cgroup: Option<Arc<AgentCgroup>>,
}

impl GuestLink {
    pub fn connect(&self) -> Result<AgentConnection, ApiError> {
        let mut conn =
            connect_to_agent(&self.socket, CONNECT_TIMEOUT).map_err(|e| self.error(e))?;
        if let Some(cgroup) = self.cgroup.clone() {
            conn.set_pause_check(Some(Box::new(move || cgroup.is_frozen())));
        }
        Ok(conn)
    }

    /// A failure of the guest agent's side as the API tells it.
    pub fn error(&self, e: ConnectionError) -> ApiError {
        let name = &self.name;
        match e {
            ConnectionError::File { kind, message } => ApiError::new(
                ErrorKind::of_file(kind),
                format!("agent `{name}`: {message}"),
            ),
            ConnectionError::Refused(message) => {
                ApiError::new(ErrorKind::Failed, format!("agent `{name}`: {message}"))
            }
            ConnectionError::TimedOut => ApiError::new(
                ErrorKind::TimedOut,
                format!("agent `{name}` did not answer in time"),
            ),
            ConnectionError::Closed => super::agent::gone(name),
            e => ApiError::new(
                ErrorKind::Failed,
                format!(
                    "agent `{name}` failed the request: {}",
                    agentos_protocol::error_chain(&e)
                ),
            ),
        }
    }

    /// Runs `work` with this link on a blocking thread.
    pub async fn blocking<T: Send + 'static>(
        self,
        work: impl FnOnce(&Self) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        tokio::task::spawn_blocking(move || work(&self))
            .await
            .map_err(|e| ApiError::new(ErrorKind::Failed, e.to_string()))?
    }

    /// Runs `produce` on a blocking thread, which hands bytes to its [`Emit`]. Answers once the
    /// first bytes went out, or `produce` ended: the stream of its bytes, or the error it met
    /// before sending any. An error after that ends the stream unfinished.
    pub async fn stream(
        self,
        produce: impl FnOnce(&Self, &mut Emit) -> Result<(), ApiError> + Send + 'static,
    ) -> Result<Chunks, ApiError> {
        let (chunks, stream) = mpsc::channel(CHANNEL_CHUNKS);
        let (opened, started) = oneshot::channel();
        tokio::task::spawn_blocking(move || {
            let mut emit = Emit {
                opened: Some(opened),
                chunks,
            };
            let produced = produce(&self, &mut emit);
            match (produced, emit.opened.take()) {
                (Ok(()), Some(opened)) => {
                    let _ = opened.send(Ok(()));
                }
                (Err(e), Some(opened)) => {
                    let _ = opened.send(Err(e));
                }
                (Ok(()), None) => {}
                (Err(e), None) => {
                    tracing::warn!(agent = self.name, error = %e.message, "a stream failed on the way");
                    let _ = emit.chunks.blocking_send(Err(io::Error::other(e.message)));
                }
            }
        });
        match started.await {
            Ok(Ok(())) => Ok(stream),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ApiError::new(
                ErrorKind::Failed,
                "the stream's producer ended unexpectedly",
            )),
        }
    }
}

/// Where a stream's producer sends its bytes.
pub struct Emit {
    opened: Option<oneshot::Sender<Result<(), ApiError>>>,
    chunks: mpsc::Sender<Result<Bytes, io::Error>>,
}

impl Emit {
    /// A check that tells when the client went (the stream was dropped).
    pub fn gone_check(&self) -> Box<dyn Fn() -> bool + Send> {
        let chunks = self.chunks.clone();
        Box::new(move || chunks.is_closed())
    }

    /// Whether bytes went out already (the client has its answer's head).
    pub fn started(&self) -> bool {
        self.opened.is_none()
    }

    /// Sends `bytes`, waiting while the client is behind; fails once the client went.
    pub fn send(&mut self, bytes: Bytes) -> io::Result<()> {
        if let Some(opened) = self.opened.take() {
            let _ = opened.send(Ok(()));
        }
        self.chunks
            .blocking_send(Ok(bytes))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went"))
    }
}
