//! Collecting the exit statuses of child processes.
//!
//! As PID 1 the agent inherits every orphan in the VM, so one thread waits for any child and hands
//! each status to the exec that owns the pid. Elsewhere (tests, a run on a developer's machine) the
//! process may have children that are none of our business, so each exec waits for its own pid.

use std::collections::{HashMap, HashSet};
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use agentos_protocol::ExitStatus;

use crate::lock;

/// How often a non-PID-1 agent looks at a child that outlived its pipes while a deadline runs.
const OWN_CHILD_POLL: Duration = Duration::from_millis(10);

/// Pause after an unexpected `waitid` failure, so that a persistent one cannot spin a CPU.
const REAPER_BACKOFF: Duration = Duration::from_millis(100);

pub struct Reaper {
    mode: Mode,
    /// Held across each spawn. `Command::spawn` reaps a child whose `exec` failed by its pid; a
    /// concurrent `waitpid(-1)` could steal that child and make std's own wait fail.
    spawning: Mutex<()>,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// PID 1: a reaper thread collects every child.
    AllChildren,
    /// Each exec waits for its own pid.
    OwnChildren,
}

#[derive(Default)]
struct State {
    /// Pids spawned through [`Reaper::spawn`] whose status nobody has taken yet.
    owned: HashSet<i32>,
    /// Statuses of owned pids, reaped before their exec asked for them.
    exited: HashMap<i32, ExitStatus>,
    /// Counts spawns, so that a reaper without children knows when to look again.
    spawns: u64,
}

/// What [`Reaper::wait`] saw.
#[derive(Debug, PartialEq, Eq)]
pub enum Waited {
    Exited(ExitStatus),
    DeadlinePassed,
}

impl Reaper {
    /// The reaper of PID 1, with its thread.
    pub fn all_children() -> io::Result<Arc<Self>> {
        let reaper = Arc::new(Self::new(Mode::AllChildren));
        let worker = Arc::clone(&reaper);
        thread::Builder::new()
            .name("reaper".into())
            .spawn(move || worker.reap_forever())?;
        Ok(reaper)
    }

    pub fn own_children() -> Arc<Self> {
        Arc::new(Self::new(Mode::OwnChildren))
    }

    fn new(mode: Mode) -> Self {
        Self {
            mode,
            spawning: Mutex::new(()),
            state: Mutex::default(),
            changed: Condvar::new(),
        }
    }

    /// Spawns `command` and returns it with its pid; its status is then collected only through
    /// [`Reaper::wait`].
    pub fn spawn(&self, command: &mut Command) -> io::Result<(Child, i32)> {
        let _spawning = lock(&self.spawning);
        let child = command.spawn()?;
        // Linux pids are below 2^22; the conversion cannot fail.
        let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
        if self.mode == Mode::AllChildren {
            let mut state = lock(&self.state);
            state.owned.insert(pid);
            state.spawns += 1;
            self.changed.notify_all();
        }
        Ok((child, pid))
    }

    /// Waits until the spawned process `pid` has exited, or until `deadline`.
    pub fn wait(&self, pid: i32, deadline: Option<Instant>) -> io::Result<Waited> {
        match self.mode {
            Mode::AllChildren => Ok(self.take_status(pid, deadline)),
            Mode::OwnChildren => wait_own_child(pid, deadline),
        }
    }

    fn take_status(&self, pid: i32, deadline: Option<Instant>) -> Waited {
        let mut state = lock(&self.state);
        loop {
            if let Some(status) = state.exited.remove(&pid) {
                state.owned.remove(&pid);
                return Waited::Exited(status);
            }
            state = match deadline {
                None => self.changed.wait(state).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Waited::DeadlinePassed;
                    }
                    self.changed
                        .wait_timeout(state, left)
                        .map(|(state, _)| state)
                        .unwrap_or_else(|e| e.into_inner().0)
                }
            };
        }
    }

    fn reap_forever(&self) {
        loop {
            let spawns_seen = lock(&self.state).spawns;
            match wait_for_any_child() {
                Ok(()) => self.collect(),
                Err(err) if err.raw_os_error() == Some(libc::ECHILD) => {
                    // Children appear only through our spawns: an orphan is re-parented to PID 1
                    // while its dying parent, our child, is still unreaped.
                    let mut state = lock(&self.state);
                    while state.spawns == spawns_seen {
                        state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    console!("waiting for child processes failed: {err}");
                    thread::sleep(REAPER_BACKOFF);
                }
            }
        }
    }

    /// Reaps every exited child, keeping the statuses of owned pids; the rest are orphans.
    fn collect(&self) {
        let _spawning = lock(&self.spawning);
        loop {
            let mut raw = 0;
            // SAFETY: `raw` is a live c_int for the kernel to write.
            let pid = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) };
            if pid <= 0 {
                if pid < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            let mut state = lock(&self.state);
            if state.owned.contains(&pid) {
                state.exited.insert(pid, exit_status(raw));
                self.changed.notify_all();
            }
        }
    }
}

/// Blocks until some child has exited, leaving it unreaped.
fn wait_for_any_child() -> io::Result<()> {
    // SAFETY: siginfo_t is plain old data; all-zero bytes are a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a live siginfo_t for the kernel to write.
    let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn wait_own_child(pid: i32, deadline: Option<Instant>) -> io::Result<Waited> {
    let flags = if deadline.is_some() { libc::WNOHANG } else { 0 };
    loop {
        let mut raw = 0;
        // SAFETY: `raw` is a live c_int for the kernel to write.
        let rc = unsafe { libc::waitpid(pid, &mut raw, flags) };
        if rc == pid {
            return Ok(Waited::Exited(exit_status(raw)));
        }
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Waited::DeadlinePassed);
            }
            thread::sleep(left.min(OWN_CHILD_POLL));
        }
    }
}

fn exit_status(raw: libc::c_int) -> ExitStatus {
    if libc::WIFEXITED(raw) {
        ExitStatus {
            code: Some(libc::WEXITSTATUS(raw)),
            ..ExitStatus::default()
        }
    } else if libc::WIFSIGNALED(raw) {
        ExitStatus {
            signal: Some(libc::WTERMSIG(raw)),
            ..ExitStatus::default()
        }
    } else {
        ExitStatus::default()
    }
}
