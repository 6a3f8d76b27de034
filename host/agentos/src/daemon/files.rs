//! An agent's files through the API, each request on a connection of its own to the guest agent
//! (see [`super::link`]): a file of any size crosses in bounded memory, and a transfer waits
//! neither for the agent's programs and models nor they for it.

use std::io::{self, Read};

use bytes::Bytes;

use agentos_core::agent::connection::{ConnectionError, FileWrite};
use agentos_protocol::files::FsOp;

use agentos_core::agent::connection::Keepalive;

use super::api::{ApiError, ErrorKind, FileWrittenReply, ListReply, WatchLine, WriteFileRequest};
use super::link::{Chunks, Emit, GuestLink};

/// How often a quiet watch's guest agent is pinged, and how long it may stay silent.
const WATCH_KEEPALIVE: Keepalive = Keepalive {
    interval: std::time::Duration::from_secs(10),
    limit: std::time::Duration::from_secs(30),
};

fn send_line(emit: &mut Emit, line: &WatchLine) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(line).map_err(io::Error::other)?;
    bytes.push(b'\n');
    emit.send(Bytes::from(bytes))
}

impl GuestLink {
    /// Runs one operation other than a transfer; its answer as the API gives it.
    pub async fn fs(self, op: FsOp) -> Result<serde_json::Value, ApiError> {
        self.blocking(move |link| {
            let mut conn = link.connect()?;
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
                .map_err(|e| link.error(e))?
                .map_err(|e| ApiError::new(ErrorKind::Failed, e.to_string()))
        })
        .await
    }

    /// Starts reading the file `path`: once the guest has opened it and sent its first bytes
    /// (or its end), the stream of its bytes; a file the guest cannot read is an error here.
    pub async fn read(self, path: String) -> Result<Chunks, ApiError> {
        self.stream(move |link, emit| {
            let mut conn = link.connect()?;
            match conn.read_file(&path, &mut |bytes| emit.send(Bytes::copy_from_slice(bytes))) {
                Ok(_) => Ok(()),
                // The client went: nobody to tell.
                Err(ConnectionError::Transfer(_)) => Ok(()),
                Err(e) => Err(link.error(e)),
            }
        })
        .await
    }

    /// Watches the directory `path`: the stream of its changes, once the watch began.
    pub async fn watch(self, path: String, recursive: bool) -> Result<Chunks, ApiError> {
        self.stream(move |link, emit| {
            let mut conn = link.connect()?;
            conn.set_keepalive(Some(WATCH_KEEPALIVE));
            conn.set_cancel_check(Some(emit.gone_check()));
            let mut begun = false;
            let watched = conn.watch(&path, recursive, &mut |changes| {
                if !begun {
                    begun = true;
                    send_line(emit, &WatchLine::Watching { path: path.clone() })?;
                }
                changes
                    .into_iter()
                    .try_for_each(|change| send_line(emit, &WatchLine::Change(change)))
            });
            match watched {
                Ok(()) | Err(ConnectionError::Transfer(_)) => Ok(()),
                Err(e) if emit.started() => {
                    let _ = send_line(emit, &WatchLine::Error(link.error(e)));
                    Ok(())
                }
                Err(e) => Err(link.error(e)),
            }
        })
        .await
    }

    /// Writes the file `path` from `body`, to its end; the guest puts it in place only once
    /// whole, so an error on the way (the client went, its body broke) leaves no file changed.
    pub async fn write(
        self,
        request: WriteFileRequest,
        body: Chunks,
    ) -> Result<serde_json::Value, ApiError> {
        let WriteFileRequest {
            path,
            mode,
            user,
            in_place,
            ..
        } = request;
        self.blocking(move |link| {
            let mut conn = link.connect()?;
            let mut source = ChannelReader {
                chunks: body,
                current: Bytes::new(),
                ended: false,
            };
            let size = conn
                .write_file(
                    &path,
                    FileWrite {
                        mode,
                        user: user.as_deref(),
                        in_place,
                    },
                    &mut source,
                )
                .map_err(|e| match e {
                    ConnectionError::Transfer(e) => ApiError::new(
                        ErrorKind::BadRequest,
                        format!("the body could not be read whole: {e}; nothing was written"),
                    ),
                    e => link.error(e),
                })?;
            serde_json::to_value(FileWrittenReply { path, size })
                .map_err(|e| ApiError::new(ErrorKind::Failed, e.to_string()))
        })
        .await
    }
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
            let (tx, rx) = tokio::sync::mpsc::channel(16);
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
