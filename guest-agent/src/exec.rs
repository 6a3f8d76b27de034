//! Programs the host runs in the guest: spawning, streaming output, enforcing timeouts.
//!
//! Each program gets a supervisor thread that streams its output to whoever follows it (see
//! [`crate::processes`]) and reports its end, and, when the host feeds its standard input, a
//! feeder thread (see [`crate::stdin`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use agentos_protocol::process::{MAX_TAG_BYTES, ProcessInfo};
use agentos_protocol::{ExecRequest, ExitStatus, GuestMessage, PtySize, StreamData};

use crate::clip;
use crate::processes::{Heard, Process, Processes, Watcher};
use crate::reaper::{Reaper, Waited};
use crate::stdin::StdinQueue;
use crate::users;

/// Largest piece of output per frame: small enough to keep a frame far below the frame limit and
/// memory per connection bounded, large enough to keep the frame overhead low.
pub const OUTPUT_CHUNK_BYTES: usize = 32 * 1024;

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
    #[error("{0}")]
    Tag(String),
    #[error("{0}")]
    User(String),
    #[error("cannot open a terminal for the program")]
    Terminal(#[source] io::Error),
}

/// A pseudo-terminal for a program: the near end (the master) stays with the agent, the far end
/// becomes the program's standard input, output and error.
struct Terminal {
    near: OwnedFd,
    far: OwnedFd,
}

impl Terminal {
    fn open(size: PtySize) -> io::Result<Self> {
        let (mut near, mut far) = (-1, -1);
        let winsize = libc::winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: the four pointers are valid for the call: two ints it writes, no name, no
        // termios, and a winsize it reads.
        let opened = unsafe {
            libc::openpty(
                &mut near,
                &mut far,
                std::ptr::null_mut(),
                std::ptr::null(),
                &winsize,
            )
        };
        if opened != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: openpty succeeded: both descriptors are open and ours alone.
        let (near, far) = unsafe { (OwnedFd::from_raw_fd(near), OwnedFd::from_raw_fd(far)) };
        for fd in [&near, &far] {
            // Neither may leak into the program but as its standard streams.
            // SAFETY: fcntl on a descriptor we own, with an int argument.
            if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Self { near, far })
    }

    /// A copy of the far end, for one of the program's standard streams.
    fn far_end(&self) -> io::Result<Stdio> {
        Ok(Stdio::from(self.far.try_clone()?))
    }

    /// The near end three times: to read the program's output, to write its input, to resize.
    /// The far end is closed here: the program holds the only copies, so the output ends when
    /// it does.
    fn near_ends(self) -> io::Result<(File, File, File)> {
        drop(self.far);
        let near = File::from(self.near);
        Ok((near.try_clone()?, near.try_clone()?, near))
    }
}

/// Sets the size of the terminal `process` runs on.
pub fn resize(process: &Process, cols: u16, rows: u16) -> io::Result<()> {
    let Some(terminal) = process.terminal() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("process {} does not run on a terminal", process.pid()),
        ));
    };
    let winsize = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize, which lives across the call.
    if unsafe { libc::ioctl(terminal.as_raw_fd(), libc::TIOCSWINSZ, &winsize) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Signals the whole process group of the program `process`.
pub fn signal(process: &Process, signal: libc::c_int) -> io::Result<()> {
    let pgid = i32::try_from(process.pid()).map_err(io::Error::other)?;
    kill_group(pgid, signal)
}

/// Starts the program of `req` in its own process group, with the base environment plus the
/// request's, and lists it in `processes` until it ends. `watcher` follows it first: `started`,
/// `stdout`/`stderr` frames, then its end.
pub fn start(
    req: &ExecRequest,
    base_env: &BTreeMap<String, String>,
    reaper: &Arc<Reaper>,
    processes: &Arc<Processes>,
    watcher: Watcher,
) -> Result<Arc<Process>, StartError> {
    if let Some(tag) = &req.tag
        && (tag.is_empty() || tag.len() > MAX_TAG_BYTES)
    {
        return Err(StartError::Tag(format!(
            "a tag is 1 to {MAX_TAG_BYTES} bytes"
        )));
    }
    processes
        .check_tag(req.tag.as_deref())
        .map_err(StartError::Tag)?;
    if let Some(key) = req
        .run
        .env
        .keys()
        .find(|key| key.is_empty() || key.contains('='))
    {
        return Err(StartError::Environment(clip(key)));
    }
    let path = req.run.env.get("PATH").or_else(|| base_env.get("PATH"));
    let account = req
        .run
        .user
        .as_deref()
        .map(users::lookup)
        .transpose()
        .map_err(StartError::User)?;
    let terminal = req
        .pty
        .map(Terminal::open)
        .transpose()
        .map_err(StartError::Terminal)?;
    let mut command = Command::new(resolve(&req.run.program, path.map(String::as_str)));
    command
        .arg0(&req.run.program)
        .args(&req.run.args)
        .env_clear()
        .envs(base_env);
    if let Some(account) = &account {
        command
            .uid(account.uid)
            .gid(account.gid)
            .env("HOME", &account.home)
            .env("USER", &account.name)
            .env("LOGNAME", &account.name)
            .current_dir(&account.home);
    }
    command.envs(&req.run.env);
    match &terminal {
        Some(terminal) => {
            let end = |t: &Terminal| t.far_end().map_err(StartError::Terminal);
            command
                .stdin(end(terminal)?)
                .stdout(end(terminal)?)
                .stderr(end(terminal)?);
            // SAFETY: between fork and exec the closure makes only async-signal-safe calls
            // (setsid, ioctl) on the child's own descriptors, and allocates nothing.
            unsafe {
                command.pre_exec(|| {
                    // A session of its own, with the terminal (its standard input) as its
                    // controlling terminal: its process group is its pid, as for the others.
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                })
            };
        }
        None => {
            command
                .stdin(if req.stdin {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0);
        }
    }
    if let Some(cwd) = &req.run.cwd {
        command.current_dir(cwd);
    }
    let spawned = reaper.spawn(&mut command);
    // The terminal's far end stays open in the program only.
    drop(command);
    let (mut child, pid) = spawned.map_err(|source| StartError::Spawn {
        program: clip(&req.run.program),
        source,
    })?;
    let deadline = req
        .run
        .timeout_ms
        .and_then(|ms| Instant::now().checked_add(Duration::from_millis(ms)));
    let (pipes, input, resizer) = match terminal {
        Some(terminal) => {
            let (output, input, resizer) = match terminal.near_ends() {
                Ok(ends) => ends,
                Err(err) => {
                    abort(pid, reaper);
                    return Err(StartError::Terminal(err));
                }
            };
            ([Some(output), None], Some(input), Some(resizer))
        }
        None => (
            [
                child
                    .stdout
                    .take()
                    .map(|pipe| File::from(OwnedFd::from(pipe))),
                child
                    .stderr
                    .take()
                    .map(|pipe| File::from(OwnedFd::from(pipe))),
            ],
            child
                .stdin
                .take()
                .map(|pipe| File::from(OwnedFd::from(pipe))),
            None,
        ),
    };
    let stdin = match input.map(|input| StdinQueue::start(input, pid)) {
        None => None,
        Some(Ok(queue)) => Some(queue),
        Some(Err(err)) => {
            abort(pid, reaper);
            return Err(StartError::Thread(err));
        }
    };
    let info = ProcessInfo {
        pid: pid.unsigned_abs(),
        tag: req.tag.clone(),
        run: req.run.clone(),
        keep: req.keep,
        stdin: stdin.is_some(),
        pty: resizer.is_some(),
    };
    let process = Arc::new(Process::new(info, stdin.clone(), resizer));
    processes.insert(Arc::clone(&process));
    // Not ended: its supervisor has not started.
    let _ = process.watch(watcher);
    let supervisor = Supervisor {
        process: Arc::clone(&process),
        processes: Arc::clone(processes),
        pid,
        pipes,
        deadline,
        timed_out: false,
        reaper: Arc::clone(reaper),
    };
    let spawned = thread::Builder::new()
        .name(format!("exec-{pid}"))
        .spawn(move || supervisor.run());
    if let Err(err) = spawned {
        processes.remove(pid.unsigned_abs());
        if let Some(stdin) = &stdin {
            stdin.abandon();
        }
        abort(pid, reaper);
        return Err(StartError::Thread(err));
    }
    Ok(process)
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
    process: Arc<Process>,
    processes: Arc<Processes>,
    pid: i32,
    /// Standard output and standard error, until each reaches its end.
    pipes: [Option<File>; 2],
    deadline: Option<Instant>,
    timed_out: bool,
    reaper: Arc<Reaper>,
}

impl Supervisor {
    fn run(mut self) {
        let pid = self.process.pid();
        self.stream_output();
        let status = self.wait();
        // Unlisted first: a host that reads `exited` finds it gone.
        self.processes.remove(pid);
        self.process.finish(status);
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
                console!("cannot watch the output of process {}: {err}", self.pid);
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
                let data = StreamData(buf[..n].to_vec());
                let heard = self.process.tell(|id| {
                    let data = data.clone();
                    if index == 0 {
                        GuestMessage::Stdout { id, data }
                    } else {
                        GuestMessage::Stderr { id, data }
                    }
                });
                if heard == Heard::Abandoned {
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
                    console!("cannot collect the status of process {}: {err}", self.pid);
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
