//! Programs the host runs in the guest: spawning, streaming output, feeding standard input,
//! enforcing timeouts.
//!
//! Each program gets a supervisor thread that streams its output and reports its end, and, when
//! the host feeds its standard input, a feeder thread, so that a program that stops reading blocks
//! neither the connection nor the other programs on it.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use agentos_protocol::{ExecRequest, ExitStatus, GuestMessage, StreamData};

use crate::outbox::Outbox;
use crate::reaper::{Reaper, Waited};
use crate::{clip, lock};

/// Largest piece of output per frame: small enough to keep a frame far below the frame limit and
/// memory per connection bounded, large enough to keep the frame overhead low.
pub const OUTPUT_CHUNK_BYTES: usize = 32 * 1024;

/// Standard input queued per program beyond what its pipe holds.
const STDIN_QUEUE_BYTES: usize = 1 << 20;

/// How long the connection waits for a program to take any of its queued input before it stops
/// waiting and kills the program: the connection reads nothing else meanwhile.
pub const STDIN_STALL_LIMIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("environment variable {0:?} cannot be set")]
    Environment(String),
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot start a thread to serve the program")]
    Thread(#[source] io::Error),
}

/// Called once with the final status of the program, after its last output.
pub type Finish = Box<dyn FnOnce(ExitStatus) + Send>;

/// A started program, as its connection keeps it.
pub struct Running {
    pgid: i32,
    stdin: Option<Arc<StdinQueue>>,
}

impl Running {
    pub fn stdin(&self) -> Option<&Arc<StdinQueue>> {
        self.stdin.as_ref()
    }

    /// Signals the program's whole process group.
    pub fn signal(&self, signal: libc::c_int) -> io::Result<()> {
        kill_group(self.pgid, signal)
    }

    /// The program has ended and been reported; stop feeding it.
    pub fn release(self) {
        if let Some(stdin) = self.stdin {
            stdin.abandon();
        }
    }
}

/// Starts the program of `req` in its own process group, with the base environment plus the
/// request's. Output goes to `outbox` as `started`, `stdout`/`stderr` frames; `finish` gets the
/// status.
pub fn start(
    req: &ExecRequest,
    base_env: &BTreeMap<String, String>,
    reaper: &Arc<Reaper>,
    outbox: &Outbox,
    finish: Finish,
) -> Result<Running, StartError> {
    if let Some(key) = req
        .run
        .env
        .keys()
        .find(|key| key.is_empty() || key.contains('='))
    {
        return Err(StartError::Environment(clip(key)));
    }
    let path = req.run.env.get("PATH").or_else(|| base_env.get("PATH"));
    let mut command = Command::new(resolve(&req.run.program, path.map(String::as_str)));
    command
        .arg0(&req.run.program)
        .args(&req.run.args)
        .env_clear()
        .envs(base_env)
        .envs(&req.run.env)
        .stdin(if req.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(cwd) = &req.run.cwd {
        command.current_dir(cwd);
    }
    let (mut child, pid) = reaper
        .spawn(&mut command)
        .map_err(|source| StartError::Spawn {
            program: clip(&req.run.program),
            source,
        })?;
    let deadline = req
        .run
        .timeout_ms
        .and_then(|ms| Instant::now().checked_add(Duration::from_millis(ms)));
    let pipes = [
        child
            .stdout
            .take()
            .map(|pipe| File::from(OwnedFd::from(pipe))),
        child
            .stderr
            .take()
            .map(|pipe| File::from(OwnedFd::from(pipe))),
    ];
    let stdin = match child
        .stdin
        .take()
        .map(|pipe| StdinQueue::start(pipe, req.id))
    {
        None => None,
        Some(Ok(queue)) => Some(queue),
        Some(Err(err)) => {
            abort(pid, reaper);
            return Err(StartError::Thread(err));
        }
    };
    let supervisor = Supervisor {
        id: req.id,
        pid,
        pipes,
        deadline,
        timed_out: false,
        outbox: outbox.clone(),
        reaper: Arc::clone(reaper),
    };
    let spawned = thread::Builder::new()
        .name(format!("exec-{}", req.id))
        .spawn(move || supervisor.run(finish));
    if let Err(err) = spawned {
        if let Some(stdin) = &stdin {
            stdin.abandon();
        }
        abort(pid, reaper);
        return Err(StartError::Thread(err));
    }
    Ok(Running { pgid: pid, stdin })
}

/// `program` found in the absolute directories of `path`, as the kernel will run it; as given when
/// it names a path or is found nowhere (the spawn then fails as it would have).
///
/// The standard library spawns a bare name that a new PATH must resolve with fork and exec, which
/// copies this whole process's page tables; a path lets it use `posix_spawn` (a vfork), several
/// times cheaper in a VM.
pub fn resolve(program: &str, path: Option<&str>) -> PathBuf {
    if program.contains('/') || program.is_empty() {
        return PathBuf::from(program);
    }
    path.into_iter()
        .flat_map(|path| path.split(':'))
        .filter(|dir| dir.starts_with('/'))
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| is_executable(candidate))
        .unwrap_or_else(|| PathBuf::from(program))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Undoes a spawn that cannot be served.
fn abort(pid: i32, reaper: &Reaper) {
    let _ = kill_group(pid, libc::SIGKILL);
    let _ = reaper.wait(pid, None);
}

fn kill_group(pgid: i32, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: kill takes no pointers; the negative pid addresses the process group.
    if unsafe { libc::kill(-pgid, signal) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

struct Supervisor {
    id: u64,
    pid: i32,
    /// Standard output and standard error, until each reaches its end.
    pipes: [Option<File>; 2],
    deadline: Option<Instant>,
    timed_out: bool,
    outbox: Outbox,
    reaper: Arc<Reaper>,
}

impl Supervisor {
    fn run(mut self, finish: Finish) {
        let started = GuestMessage::Started {
            id: self.id,
            pid: self.pid.unsigned_abs(),
        };
        if self.outbox.send(started).is_ok() {
            self.stream_output();
        } else {
            self.abandon_output();
        }
        let status = self.wait();
        finish(status);
    }

    fn stream_output(&mut self) {
        let mut buf = vec![0u8; OUTPUT_CHUNK_BYTES];
        while self.pipes.iter().any(Option::is_some) {
            if self
                .deadline
                .is_some_and(|deadline| Instant::now() >= deadline)
            {
                self.expire();
            }
            let mut polls = self.pipes.each_ref().map(|pipe| libc::pollfd {
                // poll(2) skips negative descriptors: the pipes that have ended.
                fd: pipe.as_ref().map_or(-1, AsRawFd::as_raw_fd),
                events: libc::POLLIN,
                revents: 0,
            });
            let timeout = self.deadline.map_or(-1, poll_timeout);
            // SAFETY: `polls` is a live array of two pollfds and the count says two.
            let ready = unsafe { libc::poll(polls.as_mut_ptr(), 2, timeout) };
            if ready < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                console!("cannot watch the output of request {}: {err}", self.id);
                self.abandon_output();
                return;
            }
            for (index, poll) in polls.iter().enumerate() {
                let Some(pipe) = self.pipes[index].as_mut().filter(|_| poll.revents != 0) else {
                    continue;
                };
                let n = match pipe.read(&mut buf) {
                    Ok(0) => {
                        self.pipes[index] = None;
                        continue;
                    }
                    Ok(n) => n,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        self.pipes[index] = None;
                        continue;
                    }
                };
                let id = self.id;
                let data = StreamData(buf[..n].to_vec());
                let msg = if index == 0 {
                    GuestMessage::Stdout { id, data }
                } else {
                    GuestMessage::Stderr { id, data }
                };
                if self.outbox.send(msg).is_err() {
                    self.abandon_output();
                    return;
                }
            }
        }
    }

    /// Nobody can receive the output any more: end the program rather than let it block on a
    /// full pipe forever.
    fn abandon_output(&mut self) {
        let _ = kill_group(self.pid, libc::SIGKILL);
        self.pipes = [None, None];
    }

    fn expire(&mut self) {
        self.deadline = None;
        if kill_group(self.pid, libc::SIGKILL).is_ok() {
            self.timed_out = true;
        }
    }

    fn wait(&mut self) -> ExitStatus {
        loop {
            match self.reaper.wait(self.pid, self.deadline) {
                Ok(Waited::Exited(status)) => {
                    return ExitStatus {
                        timed_out: self.timed_out,
                        ..status
                    };
                }
                Ok(Waited::DeadlinePassed) => self.expire(),
                Err(err) => {
                    console!("cannot collect the status of request {}: {err}", self.id);
                    return ExitStatus {
                        timed_out: self.timed_out,
                        ..ExitStatus::default()
                    };
                }
            }
        }
    }
}

/// Milliseconds until `deadline` for poll(2), rounded up so that poll never wakes just before it.
fn poll_timeout(deadline: Instant) -> libc::c_int {
    let left = deadline.saturating_duration_since(Instant::now());
    libc::c_int::try_from(left.as_nanos().div_ceil(1_000_000)).unwrap_or(libc::c_int::MAX)
}

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
    fn start(pipe: ChildStdin, id: u64) -> io::Result<Arc<Self>> {
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
            .name(format!("stdin-{id}"))
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
    fn abandon(&self) {
        let mut state = lock(&self.state);
        state.closed = true;
        state.chunks.clear();
        state.bytes = 0;
        self.changed.notify_all();
    }

    fn feed(&self, mut pipe: ChildStdin) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_name_is_found_in_the_absolute_directories_of_path() {
        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join("tool");
        std::fs::write(&program, "#!/bin/sh\n").unwrap();
        let not_executable = dir.path().join("data");
        std::fs::write(&not_executable, "").unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!("relative:/nonexistent:{}", dir.path().display());
        assert_eq!(resolve("tool", Some(&path)), program);
        // Found nowhere, not executable, or a path already: left as given.
        assert_eq!(resolve("data", Some(&path)), PathBuf::from("data"));
        assert_eq!(resolve("absent", Some(&path)), PathBuf::from("absent"));
        assert_eq!(resolve("tool", None), PathBuf::from("tool"));
        assert_eq!(resolve("./tool", Some(&path)), PathBuf::from("./tool"));
        assert_eq!(resolve("", Some(&path)), PathBuf::from(""));
    }
}
