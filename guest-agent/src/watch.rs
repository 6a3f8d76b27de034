//! Watching directories for the host (inotify): each watch is a thread that reads the kernel's
//! events and sends them as `changes` frames, until its connection goes.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;

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
    | libc::IN_CLOSE_WRITE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF
    | libc::IN_ONLYDIR;
/// Bytes of an event before its name.
const EVENT_HEADER: usize = std::mem::size_of::<libc::inotify_event>();

/// How often a quiet watch looks whether its connection has ended.
const STOP_POLL_MS: libc::c_int = 500;

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
        if outbox.send(GuestMessage::Watching { id }).is_err() {
            self.0.fetch_sub(1, Ordering::SeqCst);
            return Ok(());
        }
        let (count, stop, outbox) = (Arc::clone(&self.0), Arc::clone(&self.1), outbox.clone());
        let spawned = thread::Builder::new()
            .name(format!("watch-{id}"))
            .spawn(move || {
                watcher.run(id, &outbox, &stop);
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
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
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

    /// Reads events until the connection ends or nothing is watched any more.
    fn run(mut self, id: u64, outbox: &Outbox, stop: &AtomicBool) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let mut poll = libc::pollfd {
                fd: self.inotify.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd, and the count says one.
            if unsafe { libc::poll(&mut poll, 1, STOP_POLL_MS) } <= 0 {
                continue;
            }
            let n = match self.inotify.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            let changes = self.changes(&buf[..n]);
            for batch in changes.chunks(CHANGES_BATCH) {
                let frame = GuestMessage::Changes {
                    id,
                    changes: batch.to_vec(),
                };
                if outbox.send(frame).is_err() {
                    return;
                }
            }
            if self.dirs.is_empty() {
                return;
            }
        }
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
    } else if mask & (libc::IN_MODIFY | libc::IN_CLOSE_WRITE) != 0 {
        Some(ChangeKind::Write)
    } else if mask & libc::IN_ATTRIB != 0 {
        Some(ChangeKind::Chmod)
    } else {
        None
    }
}
