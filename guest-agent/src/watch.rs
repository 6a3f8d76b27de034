//! Watching directories for the host (inotify): each watch is a thread that reads the kernel's
//! events and sends them as `changes` frames, until its connection goes. A change the agent
//! itself makes for the host (a file written, a directory made) is sent by every watch before
//! the agent answers the request that made it ([`settle`]), so a client that asks its watcher
//! right after the answer finds it.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread;
use std::time::{Duration, Instant};

use agentos_protocol::GuestMessage;
use agentos_protocol::files::{Change, ChangeKind, FileErrorKind, MAX_WATCHED_DIRS};

use crate::files::Failure;
use crate::outbox::Outbox;

/// Watches one connection may hold; each is a thread and an inotify instance.
const MAX_WATCHES: usize = 16;
/// Most changes one frame carries.
const CHANGES_BATCH: usize = 256;
/// What each watched directory reports.
const MASK: u32 = libc::IN_CREATE
    | libc::IN_MOVED_TO
    | libc::IN_MODIFY
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF
    | libc::IN_ONLYDIR;
/// Bytes of an event before its name.
const EVENT_HEADER: usize = std::mem::size_of::<libc::inotify_event>();

/// How often a quiet watch looks whether its connection has ended.
const STOP_POLL_MS: libc::c_int = 500;
/// Reads of the kernel's queue one wake-up takes before the watch looks at its stop again.
const MAX_READS_AT_ONCE: usize = 64;
/// The longest [`settle`] waits for the watches (one whose host reads nothing blocks).
const SETTLE_LIMIT: Duration = Duration::from_millis(250);

/// The watches alive now, for [`settle`].
static LIVE: Mutex<Vec<Weak<Settle>>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits, at most [`SETTLE_LIMIT`], until every watch has sent the changes the kernel had
/// queued for it when this was called.
pub fn settle() {
    let live: Vec<Arc<Settle>> = {
        let mut live = lock(&LIVE);
        live.retain(|w| w.strong_count() > 0);
        live.iter().filter_map(Weak::upgrade).collect()
    };
    if live.is_empty() {
        return;
    }
    let deadline = Instant::now() + SETTLE_LIMIT;
    let tickets: Vec<u64> = live.iter().map(|watch| watch.ask()).collect();
    for (watch, ticket) in live.iter().zip(tickets) {
        watch.wait(ticket, deadline);
    }
}

/// How a writer asks one watch to send what is queued, and learns that it did.
struct Settle {
    /// Wakes the watch's thread (an eventfd).
    wake: File,
    /// Rounds asked and rounds answered.
    rounds: Mutex<(u64, u64)>,
    answered: Condvar,
}

impl Settle {
    fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes an initial count and flags only.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            // SAFETY: a new descriptor, ours alone.
            wake: File::from(unsafe { OwnedFd::from_raw_fd(fd) }),
            rounds: Mutex::new((0, 0)),
            answered: Condvar::new(),
        })
    }

    /// Asks for a round; its number.
    fn ask(&self) -> u64 {
        let ticket = {
            let mut rounds = lock(&self.rounds);
            rounds.0 += 1;
            rounds.0
        };
        // A full counter (2^64 - 2 wakes unread) wakes the thread as well as a write would.
        let _ = (&self.wake).write(&1u64.to_ne_bytes());
        ticket
    }

    fn wait(&self, ticket: u64, deadline: Instant) {
        let mut rounds = lock(&self.rounds);
        while rounds.1 < ticket {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            rounds = match self.answered.wait_timeout(rounds, left) {
                Ok((rounds, _)) => rounds,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// Takes the wake-ups; the rounds asked until now.
    fn take(&self) -> u64 {
        let mut count = [0u8; 8];
        let _ = (&self.wake).read(&mut count);
        lock(&self.rounds).0
    }

    fn answer(&self, round: u64) {
        let mut rounds = lock(&self.rounds);
        rounds.1 = rounds.1.max(round);
        self.answered.notify_all();
    }
}

/// Answers every round for good when its watch ends.
struct Ended(Arc<Settle>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.answer(u64::MAX);
    }
}

/// The watches of one connection, counted against [`MAX_WATCHES`]; they end with [`Watches::stop`].
#[derive(Clone, Default)]
pub struct Watches(Arc<AtomicUsize>, Arc<AtomicBool>);

impl Watches {
    /// Ends every watch of the connection.
    pub fn stop(&self) {
        self.1.store(true, Ordering::SeqCst);
    }

    /// Starts watching `path` for request `id`: `watching` goes out, then `changes` as they come.
    pub fn start(
        &self,
        id: u64,
        path: &str,
        recursive: bool,
        outbox: &Outbox,
    ) -> Result<(), Failure> {
        let root = crate::files::absolute(path)?;
        let mut watcher = Watcher::new(recursive).map_err(|e| Failure::io("watch", root, &e))?;
        watcher
            .add(root)
            .map_err(|e| Failure::io("watch", root, &e))?;
        if recursive {
            watcher.add_below(root);
        }
        if self.0.fetch_add(1, Ordering::SeqCst) >= MAX_WATCHES {
            self.0.fetch_sub(1, Ordering::SeqCst);
            return Err(Failure::new(
                FileErrorKind::Invalid,
                format!("{MAX_WATCHES} directories are already watched on this connection"),
            ));
        }
        let settle = match Settle::new() {
            Ok(settle) => Arc::new(settle),
            Err(e) => {
                self.0.fetch_sub(1, Ordering::SeqCst);
                return Err(Failure::io("watch", root, &e));
            }
        };
        if outbox.send(GuestMessage::Watching { id }).is_err() {
            self.0.fetch_sub(1, Ordering::SeqCst);
            return Ok(());
        }
        {
            let mut live = lock(&LIVE);
            live.retain(|w| w.strong_count() > 0);
            live.push(Arc::downgrade(&settle));
        }
        let (count, stop, outbox) = (Arc::clone(&self.0), Arc::clone(&self.1), outbox.clone());
        let spawned = thread::Builder::new()
            .name(format!("watch-{id}"))
            .spawn(move || {
                let ended = Ended(settle);
                watcher.run(id, &outbox, &stop, &ended.0);
                count.fetch_sub(1, Ordering::SeqCst);
            });
        spawned.map(drop).map_err(|e| {
            self.0.fetch_sub(1, Ordering::SeqCst);
            Failure::new(
                FileErrorKind::Failed,
                format!("cannot start a thread to watch: {e}"),
            )
        })
    }
}

/// One inotify instance and the directories it watches.
struct Watcher {
    inotify: File,
    dirs: HashMap<i32, PathBuf>,
    recursive: bool,
}

impl Watcher {
    fn new(recursive: bool) -> io::Result<Self> {
        // SAFETY: inotify_init1 takes flags only.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor, ours alone.
        let inotify = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(Self {
            inotify,
            dirs: HashMap::new(),
            recursive,
        })
    }

    fn add(&mut self, dir: &Path) -> io::Result<()> {
        if self.dirs.len() >= MAX_WATCHED_DIRS {
            return Err(io::Error::other(format!(
                "more than {MAX_WATCHED_DIRS} directories to watch"
            )));
        }
        let path = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `path` is a NUL-terminated string that lives across the call.
        let wd = unsafe { libc::inotify_add_watch(self.inotify.as_raw_fd(), path.as_ptr(), MASK) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        self.dirs.insert(wd, dir.to_path_buf());
        Ok(())
    }

    /// Watches every directory below `dir` (those that cannot be are left out).
    fn add_below(&mut self, dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if is_dir && self.add(&entry.path()).is_ok() {
                self.add_below(&entry.path());
            }
        }
    }

    /// Reads events until the connection ends or nothing is watched any more; answers each
    /// round [`settle`] asked once what was queued before it is sent.
    fn run(mut self, id: u64, outbox: &Outbox, stop: &AtomicBool, settle: &Settle) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let mut polls = [
                libc::pollfd {
                    fd: self.inotify.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: settle.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two live pollfds, and the count says two.
            if unsafe { libc::poll(polls.as_mut_ptr(), 2, STOP_POLL_MS) } <= 0 {
                continue;
            }
            // The rounds asked before the queue is read: what they wait for is in it.
            let round = (polls[1].revents != 0).then(|| settle.take());
            if !self.send_queued(id, outbox, &mut buf) {
                return;
            }
            if let Some(round) = round {
                settle.answer(round);
            }
            if self.dirs.is_empty() {
                return;
            }
        }
    }

    /// Sends the events queued now (a bounded number of reads' worth); false once the watch
    /// must end.
    fn send_queued(&mut self, id: u64, outbox: &Outbox, buf: &mut [u8]) -> bool {
        for _ in 0..MAX_READS_AT_ONCE {
            let n = match self.inotify.read(buf) {
                Ok(0) => return false,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(_) => return false,
            };
            let changes = self.changes(&buf[..n]);
            for batch in changes.chunks(CHANGES_BATCH) {
                let frame = GuestMessage::Changes {
                    id,
                    changes: batch.to_vec(),
                };
                if outbox.send(frame).is_err() {
                    return false;
                }
            }
        }
        true
    }

    /// The changes of the events in `buf`, which the kernel filled with whole events.
    fn changes(&mut self, buf: &[u8]) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut at = 0;
        while at + EVENT_HEADER <= buf.len() {
            // SAFETY: the kernel wrote a whole event here; read_unaligned copes with any
            // alignment of the buffer.
            let event: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
            let name_end = (at + EVENT_HEADER)
                .saturating_add(event.len as usize)
                .min(buf.len());
            let name = &buf[at + EVENT_HEADER..name_end];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            at = name_end;
            if event.mask & libc::IN_IGNORED != 0 {
                self.dirs.remove(&event.wd);
                continue;
            }
            let Some(dir) = self.dirs.get(&event.wd) else {
                continue;
            };
            let path = if name.is_empty() {
                dir.clone()
            } else {
                dir.join(OsStr::from_bytes(name))
            };
            let Some(kind) = kind_of(event.mask) else {
                continue;
            };
            if self.recursive
                && kind == ChangeKind::Create
                && event.mask & libc::IN_ISDIR != 0
                && self.add(&path).is_ok()
            {
                self.add_below(&path);
            }
            changes.push(Change {
                kind,
                path: path.to_string_lossy().into_owned(),
            });
        }
        changes
    }
}

fn kind_of(mask: u32) -> Option<ChangeKind> {
    if mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
        Some(ChangeKind::Create)
    } else if mask & (libc::IN_DELETE | libc::IN_DELETE_SELF) != 0 {
        Some(ChangeKind::Remove)
    } else if mask & libc::IN_MOVED_FROM != 0 {
        Some(ChangeKind::Rename)
    } else if mask & libc::IN_MODIFY != 0 {
        Some(ChangeKind::Write)
    } else if mask & libc::IN_ATTRIB != 0 {
        Some(ChangeKind::Chmod)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_settled_change_is_queued_already() {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, frames) = Outbox::collector();
        let watches = Watches::default();
        watches
            .start(1, &dir.path().to_string_lossy(), false, &outbox)
            .unwrap();
        assert_eq!(
            frames.recv_timeout(Duration::from_secs(5)),
            Some(GuestMessage::Watching { id: 1 })
        );
        for n in 0..20 {
            let path = dir.path().join(format!("f{n}"));
            std::fs::write(&path, b"x").unwrap();
            settle();
            // No wait: the change is in the queue once `settle` returns.
            let Some(GuestMessage::Changes { changes, .. }) = frames.recv_timeout(Duration::ZERO)
            else {
                panic!("change {n} was not sent before settle returned");
            };
            assert_eq!(changes[0].path, path.to_string_lossy());
            while frames.recv_timeout(Duration::from_millis(1)).is_some() {}
        }
        watches.stop();
    }
}
