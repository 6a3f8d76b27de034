//! The single writer of a connection: every thread hands its frames to one queue, so frames never
//! interleave on the stream.

use std::io::Write;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread;
use std::time::{Duration, Instant};

use agentos_protocol::{GuestMessage, encode_frame};

use crate::transport::Connection;

/// Frames queued per connection. Output chunks are at most 32 KiB (about 44 KiB as a frame), so a
/// connection holds a few MiB at most; a host that stops reading stalls the programs, which then
/// block on their pipes, instead of growing the queue.
const QUEUE_FRAMES: usize = 64;

/// Step of the bounded waits used while a connection winds down.
const SEND_RETRY: Duration = Duration::from_millis(5);

enum Outgoing {
    Frame(GuestMessage),
    Stop,
}

/// The writer has stopped (the stream failed or was shut down); nothing more can be sent.
#[derive(Debug, thiserror::Error)]
#[error("the connection's writer has stopped")]
pub struct WriterGone;

/// Queues frames for the writer thread.
#[derive(Clone)]
pub struct Outbox(SyncSender<Outgoing>);

impl Outbox {
    /// Queues `msg`, waiting while the queue is full.
    pub fn send(&self, msg: GuestMessage) -> Result<(), WriterGone> {
        self.0.send(Outgoing::Frame(msg)).map_err(|_| WriterGone)
    }

    /// An outbox whose frames come back out of the returned [`Collected`] instead of going to a
    /// connection: for the agent's own requests (a group member running its model).
    pub fn collector() -> (Self, Collected) {
        let (queue, frames) = mpsc::sync_channel(QUEUE_FRAMES);
        (Self(queue), Collected(frames))
    }

    /// Queues `msg`, waiting no longer than `patience` for room; tells whether it was queued.
    pub fn send_within(&self, msg: GuestMessage, patience: Duration) -> bool {
        send_within(&self.0, Outgoing::Frame(msg), Instant::now() + patience)
    }
}

/// The frames sent to a [`Outbox::collector`].
pub struct Collected(Receiver<Outgoing>);

impl Collected {
    /// The next frame, or `None` when none came within `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<GuestMessage> {
        match self.0.recv_timeout(timeout) {
            Ok(Outgoing::Frame(msg)) => Some(msg),
            Ok(Outgoing::Stop) | Err(_) => None,
        }
    }
}

/// The writer thread, seen from its connection.
pub struct Writer {
    queue: SyncSender<Outgoing>,
    /// Disconnects when the thread ends.
    finished: Receiver<()>,
}

impl Writer {
    pub fn start(mut conn: Connection) -> std::io::Result<(Outbox, Self)> {
        let (queue, frames) = mpsc::sync_channel(QUEUE_FRAMES);
        let (finished_tx, finished) = mpsc::channel::<()>();
        thread::Builder::new()
            .name("writer".into())
            .spawn(move || {
                let _finished = finished_tx;
                for frame in frames {
                    let Outgoing::Frame(msg) = frame else { return };
                    let bytes = match encode_frame(&msg) {
                        Ok(bytes) => bytes,
                        Err(err) => {
                            console!("dropping an unencodable frame: {}", crate::describe(&err));
                            continue;
                        }
                    };
                    if let Err(err) = conn.write_all(&bytes) {
                        console!("writing to the host failed: {err}");
                        return;
                    }
                }
            })?;
        Ok((Outbox(queue.clone()), Self { queue, finished }))
    }

    /// Lets the frames already queued go out, then ends the thread; gives up after `patience`,
    /// so that a peer that stopped reading cannot hold the agent.
    pub fn finish(self, patience: Duration) {
        let deadline = Instant::now() + patience;
        if send_within(&self.queue, Outgoing::Stop, deadline) {
            let _ = self
                .finished
                .recv_timeout(deadline.saturating_duration_since(Instant::now()));
        }
    }
}

/// `SyncSender` has no timed send; polling is fine on these rare, short paths.
fn send_within(queue: &SyncSender<Outgoing>, mut item: Outgoing, deadline: Instant) -> bool {
    loop {
        match queue.try_send(item) {
            Ok(()) => return true,
            Err(TrySendError::Disconnected(_)) => return false,
            Err(TrySendError::Full(back)) => {
                if Instant::now() >= deadline {
                    return false;
                }
                item = back;
                thread::sleep(SEND_RETRY);
            }
        }
    }
}
