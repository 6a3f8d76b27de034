//! A program's standard input on its way from the host: queued in bounded memory and written
//! by a feeder thread of its own, so that a program that stops reading blocks neither the
//! connection nor the other programs on it.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::lock;

/// Standard input queued per program beyond what its pipe holds.
const STDIN_QUEUE_BYTES: usize = 1 << 20;

/// How long the connection waits for a program to take any of its queued input before it stops
/// waiting and kills the program: the connection reads nothing else meanwhile.
pub const STDIN_STALL_LIMIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StdinError {
    #[error("standard input is already closed")]
    Closed,
    #[error("the program took none of its input for {} s", STDIN_STALL_LIMIT.as_secs())]
    Stalled,
}

/// Standard input on its way to a program, bounded in bytes.
pub struct StdinQueue {
    state: Mutex<StdinState>,
    changed: Condvar,
}

struct StdinState {
    chunks: VecDeque<Vec<u8>>,
    bytes: usize,
    /// No more input comes: the host closed it, or the program was reported.
    closed: bool,
    /// The program no longer reads (its end of the pipe is closed).
    broken: bool,
    /// When the program last took some input.
    last_progress: Instant,
}

impl StdinQueue {
    pub fn start(pipe: File, pid: i32) -> io::Result<Arc<Self>> {
        let queue = Arc::new(Self {
            state: Mutex::new(StdinState {
                chunks: VecDeque::new(),
                bytes: 0,
                closed: false,
                broken: false,
                last_progress: Instant::now(),
            }),
            changed: Condvar::new(),
        });
        let feeder = Arc::clone(&queue);
        thread::Builder::new()
            .name(format!("stdin-{pid}"))
            .spawn(move || feeder.feed(pipe))?;
        Ok(queue)
    }

    /// Queues `data`, waiting while the queue is full and the program takes input.
    pub fn push(&self, data: Vec<u8>) -> Result<(), StdinError> {
        let asked = Instant::now();
        let mut state = lock(&self.state);
        loop {
            if state.closed {
                return Err(StdinError::Closed);
            }
            // Like a write to a pipe nobody reads: the bytes go nowhere, and the program's exit
            // tells the rest.
            if state.broken || data.is_empty() {
                return Ok(());
            }
            if state.bytes == 0 || state.bytes + data.len() <= STDIN_QUEUE_BYTES {
                state.bytes += data.len();
                state.chunks.push_back(data);
                self.changed.notify_all();
                return Ok(());
            }
            let idle = state.last_progress.max(asked).elapsed();
            let left = STDIN_STALL_LIMIT.saturating_sub(idle);
            if left.is_zero() {
                return Err(StdinError::Stalled);
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .map(|(state, _)| state)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Ends the input once the queued bytes are written.
    pub fn close(&self) -> Result<(), StdinError> {
        let mut state = lock(&self.state);
        if state.closed {
            return Err(StdinError::Closed);
        }
        state.closed = true;
        self.changed.notify_all();
        Ok(())
    }

    /// Drops what is queued and ends the feeder.
    pub fn abandon(&self) {
        let mut state = lock(&self.state);
        state.closed = true;
        state.chunks.clear();
        state.bytes = 0;
        self.changed.notify_all();
    }

    fn feed(&self, mut pipe: File) {
        while let Some(chunk) = self.next_chunk() {
            let mut written = 0;
            while written < chunk.len() {
                match pipe.write(&chunk[written..]) {
                    Ok(n) if n > 0 => {
                        written += n;
                        lock(&self.state).last_progress = Instant::now();
                    }
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    _ => {
                        let mut state = lock(&self.state);
                        state.broken = true;
                        state.chunks.clear();
                        state.bytes = 0;
                        self.changed.notify_all();
                        return;
                    }
                }
            }
        }
    }

    /// The next chunk to write, or `None` once the input is closed and drained.
    fn next_chunk(&self) -> Option<Vec<u8>> {
        let mut state = lock(&self.state);
        loop {
            if let Some(chunk) = state.chunks.pop_front() {
                state.bytes = state.bytes.saturating_sub(chunk.len());
                self.changed.notify_all();
                return Some(chunk);
            }
            if state.closed {
                return None;
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }
}
