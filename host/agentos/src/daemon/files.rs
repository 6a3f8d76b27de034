//! An agent's files through the API. Each request opens a connection of its own to the guest
//! agent (through the VMM's socket), so a transfer waits neither for the agent's programs and
//! models nor they for it; it runs on a blocking thread, and its bytes cross to and from the
//! HTTP side through small bounded channels, so a file of any size takes bounded memory and a
//! slow end slows the other.

use std::io::{self, Read};
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Frame;
use tokio::sync::{mpsc, oneshot};

use agentos_core::agent::connection::{AgentConnection, ConnectionError};
use agentos_core::agent::vm::connect_to_agent;
use agentos_protocol::files::FsOp;

use super::api::{ApiError, ErrorKind, FileWrittenReply, ListReply};

/// How long opening a connection to the guest agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Chunks in flight between the guest's side and the client's, each way.
const CHANNEL_CHUNKS: usize = 4;

/// A file's bytes as they come; an error ends the stream unfinished. A body sent to
/// [`AgentFiles::write`] ends with an empty chunk: a stream that closes without it was cut off.
pub type Chunks = mpsc::Receiver<Result<Bytes, io::Error>>;

/// A file's chunks as an HTTP body (sent chunked); an error ends it unfinished, which the far
/// end sees as a body cut short.
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

/// Where an agent's guest agent is reached, and its name for messages.
pub struct AgentFiles {
    pub name: String,
    pub socket: PathBuf,
}

impl AgentFiles {
    fn connect(&self) -> Result<AgentConnection, ApiError> {
        connect_to_agent(&self.socket, CONNECT_TIMEOUT).map_err(|e| self.error(e))
    }

    fn error(&self, e: ConnectionError) -> ApiError {
        let name = &self.name;
        match e {
            ConnectionError::File { kind, message } => ApiError::new(
                ErrorKind::of_file(kind),
                format!("agent `{name}`: {message}"),
            ),
            ConnectionError::TimedOut => ApiError::new(
                ErrorKind::TimedOut,
                format!("agent `{name}` did not answer in time"),
            ),
            e => ApiError::new(
                ErrorKind::Failed,
                format!(
                    "agent `{name}` failed the request: {}",
                    agentos_protocol::error_chain(&e)
                ),
            ),
        }
    }

    /// Runs one operation other than a transfer; its answer as the API gives it.
    pub async fn fs(self, op: FsOp) -> Result<serde_json::Value, ApiError> {
        blocking(move || {
            let mut conn = self.connect()?;
            let value = match op {
                FsOp::List { path, depth } => conn
                    .list(&path, depth)
                    .map(|entries| serde_json::to_value(ListReply { entries })),
                op => conn.fs(op).map(|entry| match entry {
                    Some(entry) => serde_json::to_value(entry),
                    None => Ok(serde_json::json!({})),
                }),
            };
            value
                .map_err(|e| self.error(e))?
                .map_err(|e| ApiError::new(ErrorKind::Failed, e.to_string()))
        })
        .await
    }

    /// Starts reading the file `path`: once the guest has opened it and sent its first bytes
    /// (or its end), the stream of its bytes; a file the guest cannot read is an error here.
    pub async fn read(self, path: String) -> Result<Chunks, ApiError> {
        let (chunks, stream) = mpsc::channel(CHANNEL_CHUNKS);
        let (opened, started) = oneshot::channel::<Result<(), ApiError>>();
        tokio::task::spawn_blocking(move || {
            let mut opened = Some(opened);
            let mut conn = match self.connect() {
                Ok(conn) => conn,
                Err(e) => {
                    let _ = opened.take().map(|o| o.send(Err(e)));
                    return;
                }
            };
            let read = conn.read_file(&path, &mut |bytes| {
                if let Some(opened) = opened.take() {
                    let _ = opened.send(Ok(()));
                }
                chunks
                    .blocking_send(Ok(Bytes::copy_from_slice(bytes)))
                    .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went"))
            });
            match (read, opened.take()) {
                (Ok(_), Some(opened)) => {
                    let _ = opened.send(Ok(()));
                }
                (Ok(_), None) => {}
                (Err(e), Some(opened)) => {
                    let _ = opened.send(Err(self.error(e)));
                }
                // Cut off after its first bytes: the client sees its body end unfinished.
                (Err(ConnectionError::Transfer(_)), None) => {}
                (Err(e), None) => {
                    tracing::warn!(agent = self.name, path, error = %e, "a file read failed on the way");
                    let _ = chunks.blocking_send(Err(io::Error::other(e.to_string())));
                }
            }
        });
        match started.await {
            Ok(Ok(())) => Ok(stream),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ApiError::new(
                ErrorKind::Failed,
                "the file's reader ended unexpectedly",
            )),
        }
    }

    /// Writes the file `path` from `body`, to its end; the guest puts it in place only once
    /// whole, so an error on the way (the client went, its body broke) leaves no file changed.
    pub async fn write(
        self,
        path: String,
        mode: Option<u32>,
        body: Chunks,
    ) -> Result<serde_json::Value, ApiError> {
        blocking(move || {
            let mut conn = self.connect()?;
            let mut source = ChannelReader {
                chunks: body,
                current: Bytes::new(),
                ended: false,
            };
            let size = conn
                .write_file(&path, mode, &mut source)
                .map_err(|e| match e {
                    ConnectionError::Transfer(e) => ApiError::new(
                        ErrorKind::BadRequest,
                        format!("the body could not be read whole: {e}; nothing was written"),
                    ),
                    e => self.error(e),
                })?;
            serde_json::to_value(FileWrittenReply { path, size })
                .map_err(|e| ApiError::new(ErrorKind::Failed, e.to_string()))
        })
        .await
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(ErrorKind::Failed, e.to_string()))?
}

/// A body's chunks as a blocking reader: it ends at the empty chunk that marks the body's end,
/// and fails when the stream closes before it (the client went).
struct ChannelReader {
    chunks: Chunks,
    current: Bytes,
    ended: bool,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            if self.ended {
                return Ok(0);
            }
            match self.chunks.blocking_recv() {
                Some(Ok(chunk)) if chunk.is_empty() => self.ended = true,
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => return Err(e),
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the body was cut off",
                    ));
                }
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_ends_only_at_its_end_mark() {
        let read_all = |chunks: Vec<Result<Bytes, io::Error>>, close_early: bool| {
            let (tx, rx) = mpsc::channel(16);
            for chunk in chunks {
                tx.try_send(chunk).unwrap();
            }
            if !close_early {
                tx.try_send(Ok(Bytes::new())).unwrap();
            }
            drop(tx);
            let mut reader = ChannelReader {
                chunks: rx,
                current: Bytes::new(),
                ended: false,
            };
            let mut out = Vec::new();
            reader.read_to_end(&mut out).map(|_| out)
        };
        let whole = read_all(vec![Ok(Bytes::from("ab")), Ok(Bytes::from("c"))], false);
        assert_eq!(whole.unwrap(), b"abc");
        let cut = read_all(vec![Ok(Bytes::from("ab"))], true);
        assert_eq!(cut.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        let broken = read_all(vec![Err(io::Error::other("x"))], false);
        assert!(broken.is_err());
    }
}
