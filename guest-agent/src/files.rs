//! The guest's files as the host reads, writes, lists and changes them.
//!
//! A file is read by a thread of its own, which sends it in chunks through the connection's
//! outbox (a host that reads slowly holds the thread, not memory). A file is written from the
//! chunks the host sends, into a temporary file beside it that replaces it only once whole, so a
//! write that fails or is cut off leaves the old file as it was. Paths are absolute; the guest is
//! the agent's own, so any path in it may be asked for.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread;

use agentos_protocol::files::{
    Entry, EntryKind, FILE_CHUNK_BYTES, FileErrorKind, FsOp, LISTED_BATCH, MAX_LIST_DEPTH,
    MAX_LISTED_ENTRIES, MAX_PATH_BYTES,
};
use agentos_protocol::{GuestMessage, StreamData};

use crate::clip;
use crate::outbox::{Outbox, WriterGone};

/// Files one connection may read at once; each costs a thread.
const MAX_READS: usize = 16;
/// Files one connection may write at once; each holds an open temporary file.
const MAX_WRITES: usize = 16;
/// Failed writes whose remaining chunks are still dropped quietly, per connection.
const MAX_DROPPED: usize = 1024;
/// Mode of a new file when the request names none.
const DEFAULT_MODE: u32 = 0o644;

/// A file request that failed, as the host is told.
#[derive(Debug)]
pub struct Failure {
    pub kind: FileErrorKind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: FileErrorKind, message: String) -> Self {
        Self { kind, message }
    }

    pub fn io(doing: &str, path: &Path, e: &io::Error) -> Self {
        Self::new(
            FileErrorKind::of(e),
            format!("cannot {doing} {}: {e}", clip(&path.to_string_lossy())),
        )
    }

    pub fn into_message(self, id: u64) -> GuestMessage {
        GuestMessage::FileError {
            id,
            kind: self.kind,
            message: self.message,
        }
    }
}

/// `path` if it is absolute and of a length the kernel takes.
pub fn absolute(path: &str) -> Result<&Path, Failure> {
    if !path.starts_with('/') || path.len() > MAX_PATH_BYTES || path.contains('\0') {
        return Err(Failure::new(
            FileErrorKind::Invalid,
            format!(
                "{:?} is not an absolute path of at most {MAX_PATH_BYTES} bytes",
                clip(path)
            ),
        ));
    }
    Ok(Path::new(path))
}

/// User and group ids that own what a request makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// The owner a request names by account name (none: root's, as the agent makes things).
fn owner(user: Option<&str>) -> Result<Option<Owner>, Failure> {
    user.map(|name| {
        crate::users::lookup(name)
            .map(|account| Owner {
                uid: account.uid,
                gid: account.gid,
            })
            .map_err(|why| Failure::new(FileErrorKind::Invalid, why))
    })
    .transpose()
}

/// Makes the directory `dir` and its missing parents, those it made owned by `owner`.
/// Something in the way that is not a directory is `not_a_directory` (the kernel says it
/// exists).
fn make_dirs(dir: &Path, owner: Option<Owner>) -> Result<(), Failure> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| fs::symlink_metadata(d).is_err())
        .collect();
    match fs::create_dir_all(dir) {
        Ok(()) => {
            if let Some(Owner { uid, gid }) = owner {
                for made in missing {
                    std::os::unix::fs::lchown(made, Some(uid), Some(gid))
                        .map_err(|e| Failure::io("give away the directory", made, &e))?;
                }
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(Failure::new(
            FileErrorKind::NotADirectory,
            format!(
                "cannot make the directory {}: something on its path is not a directory",
                clip(&dir.to_string_lossy())
            ),
        )),
        Err(e) => Err(Failure::io("make the directory", dir, &e)),
    }
}

fn entry(path: &Path, meta: &Metadata) -> Entry {
    let kind = if meta.is_symlink() {
        EntryKind::Symlink
    } else if meta.is_dir() {
        EntryKind::Dir
    } else if meta.is_file() {
        EntryKind::File
    } else {
        EntryKind::Other
    };
    let target = (kind == EntryKind::Symlink)
        .then(|| fs::read_link(path).ok())
        .flatten()
        .map(|target| target.to_string_lossy().into_owned());
    Entry {
        name: path.file_name().map_or_else(
            || "/".to_owned(),
            |name| name.to_string_lossy().into_owned(),
        ),
        path: path.to_string_lossy().into_owned(),
        kind,
        size: meta.len(),
        mode: meta.permissions().mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        modified_ms: meta
            .mtime()
            .saturating_mul(1000)
            .saturating_add(meta.mtime_nsec() / 1_000_000),
        target,
    }
}

/// What `path` is; a symbolic link is described, not followed.
pub fn stat(path: &str) -> Result<Entry, Failure> {
    let path = absolute(path)?;
    let meta = fs::symlink_metadata(path).map_err(|e| Failure::io("stat", path, &e))?;
    Ok(entry(path, &meta))
}

/// Runs an `fs` request other than `list`.
pub fn apply(op: &FsOp) -> Result<Option<Entry>, Failure> {
    match op {
        FsOp::Stat { path } => stat(path).map(Some),
        FsOp::MakeDir { path, user } => make_dir(path, user.as_deref()).map(Some),
        FsOp::Move { from, to } => move_entry(from, to).map(Some),
        FsOp::Remove { path } => remove(path).map(|()| None),
        FsOp::List { .. } => Err(Failure::new(
            FileErrorKind::Invalid,
            "a listing is answered in batches".into(),
        )),
    }
}

fn make_dir(path: &str, user: Option<&str>) -> Result<Entry, Failure> {
    let path = absolute(path)?;
    let owner = owner(user)?;
    if let Ok(meta) = fs::symlink_metadata(path) {
        let what = if meta.is_dir() {
            "a directory"
        } else {
            "something that is not a directory"
        };
        return Err(Failure::new(
            FileErrorKind::AlreadyExists,
            format!("{} is already {what}", clip(&path.to_string_lossy())),
        ));
    }
    make_dirs(path, owner)?;
    stat(&path.to_string_lossy())
}

fn move_entry(from: &str, to: &str) -> Result<Entry, Failure> {
    let (from, to) = (absolute(from)?, absolute(to)?);
    fs::symlink_metadata(from).map_err(|e| Failure::io("move", from, &e))?;
    if let Some(parent) = to.parent() {
        make_dirs(parent, None)?;
    }
    fs::rename(from, to).map_err(|e| {
        Failure::io(
            &format!("move {} to", clip(&from.to_string_lossy())),
            to,
            &e,
        )
    })?;
    stat(&to.to_string_lossy())
}

fn remove(path: &str) -> Result<(), Failure> {
    let path = absolute(path)?;
    if path == Path::new("/") {
        return Err(Failure::new(
            FileErrorKind::Invalid,
            "the root directory cannot be removed".into(),
        ));
    }
    let meta = fs::symlink_metadata(path).map_err(|e| Failure::io("remove", path, &e))?;
    let removed = if meta.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    removed.map_err(|e| Failure::io("remove", path, &e))
}

/// Lists the directory `path`, `depth` levels down, handing entries to `send` in batches of
/// [`LISTED_BATCH`] (the last with `true`). Directories below `path` that cannot be read are
/// listed but not entered; symbolic links are not followed.
pub fn list(
    path: &str,
    depth: u32,
    mut send: impl FnMut(Vec<Entry>, bool) -> Result<(), WriterGone>,
) -> Result<Result<(), Failure>, WriterGone> {
    let root = match absolute(path) {
        Ok(root) => root,
        Err(failure) => return Ok(Err(failure)),
    };
    if !(1..=MAX_LIST_DEPTH).contains(&depth) {
        return Ok(Err(Failure::new(
            FileErrorKind::Invalid,
            format!("a listing's depth is 1 to {MAX_LIST_DEPTH}, not {depth}"),
        )));
    }
    let top = match read_dir_sorted(root) {
        Ok(names) => names,
        Err(e) => return Ok(Err(Failure::io("list", root, &e))),
    };
    // Directories still to enter: (path, its remaining depth, its sorted entries).
    let mut stack = vec![(root.to_path_buf(), depth, top.into_iter())];
    let mut batch = Vec::with_capacity(LISTED_BATCH);
    let mut listed = 0usize;
    while let Some((dir, left, names)) = stack.last_mut() {
        let Some(name) = names.next() else {
            stack.pop();
            continue;
        };
        let path = dir.join(name);
        let left = *left;
        let Ok(meta) = fs::symlink_metadata(&path) else {
            // Gone since the directory was read.
            continue;
        };
        listed += 1;
        if listed > MAX_LISTED_ENTRIES {
            return Ok(Err(Failure::new(
                FileErrorKind::Invalid,
                format!(
                    "{} holds more than {MAX_LISTED_ENTRIES} entries at depth {depth}; list less deep",
                    clip(&root.to_string_lossy())
                ),
            )));
        }
        batch.push(entry(&path, &meta));
        if batch.len() == LISTED_BATCH {
            send(std::mem::take(&mut batch), false)?;
        }
        if meta.is_dir()
            && left > 1
            && let Ok(names) = read_dir_sorted(&path)
        {
            stack.push((path, left - 1, names.into_iter()));
        }
    }
    send(batch, true)?;
    Ok(Ok(()))
}

fn read_dir_sorted(dir: &Path) -> io::Result<Vec<std::ffi::OsString>> {
    let mut names = fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|entry| entry.file_name()))
        .collect::<Vec<_>>();
    names.sort();
    Ok(names)
}

/// The files a connection is reading, counted against [`MAX_READS`].
#[derive(Clone, Default)]
pub struct Reads(Arc<AtomicUsize>);

impl Reads {
    /// Starts sending the file `path` as request `id`: `file_chunk` frames, then `file_end` (or
    /// a `file_error` if reading fails on the way). Fails at once when the file cannot be read.
    pub fn start(&self, id: u64, path: &str, outbox: &Outbox) -> Result<(), Failure> {
        let path = absolute(path)?;
        // Not blocking: opening a pipe would wait for a writer. Reads of a regular file are
        // not changed by it.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| Failure::io("read", path, &e))?;
        let meta = file.metadata().map_err(|e| Failure::io("read", path, &e))?;
        if meta.is_dir() {
            return Err(Failure::new(
                FileErrorKind::IsADirectory,
                format!("{} is a directory", clip(&path.to_string_lossy())),
            ));
        }
        if !meta.is_file() {
            return Err(Failure::new(
                FileErrorKind::Invalid,
                format!(
                    "{} is not a regular file (a device, socket or pipe) and is not read whole",
                    clip(&path.to_string_lossy())
                ),
            ));
        }
        if self.0.fetch_add(1, Ordering::SeqCst) >= MAX_READS {
            self.0.fetch_sub(1, Ordering::SeqCst);
            return Err(Failure::new(
                FileErrorKind::Invalid,
                format!("{MAX_READS} files are already being read on this connection"),
            ));
        }
        let (reads, outbox, path) = (self.0.clone(), outbox.clone(), path.to_path_buf());
        let spawned = thread::Builder::new()
            .name(format!("read-{id}"))
            .spawn(move || {
                if let Err(failure) = send_file(id, file, &path, &outbox) {
                    let _ = outbox.send(failure.into_message(id));
                }
                reads.fetch_sub(1, Ordering::SeqCst);
            });
        spawned.map(drop).map_err(|e| {
            self.0.fetch_sub(1, Ordering::SeqCst);
            Failure::new(
                FileErrorKind::Failed,
                format!("cannot start a thread to read the file: {e}"),
            )
        })
    }
}

/// Sends `file` in chunks; a host that went away ends it quietly.
fn send_file(id: u64, mut file: File, path: &Path, outbox: &Outbox) -> Result<(), Failure> {
    let mut size = 0u64;
    let mut buf = vec![0u8; FILE_CHUNK_BYTES];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Failure::io("read", path, &e)),
        };
        size += n as u64;
        let chunk = GuestMessage::FileChunk {
            id,
            data: StreamData(buf[..n].to_vec()),
        };
        if outbox.send(chunk).is_err() {
            return Ok(());
        }
    }
    let _ = outbox.send(GuestMessage::FileEnd { id, size });
    Ok(())
}

/// Names temporary files apart across connections that reuse request ids.
static UPLOADS: AtomicU64 = AtomicU64::new(0);

/// A file being written, into a temporary file beside its destination or into the file
/// itself.
struct Upload {
    file: File,
    into: Into,
    dest: PathBuf,
    size: u64,
}

/// Where an [`Upload`]'s bytes go.
enum Into {
    /// A temporary file, renamed over the destination once whole.
    Temp(PathBuf),
    /// The destination itself; `made`, the file the write created (where the destination's
    /// links led), removed if the write is cut off.
    Place { made: Option<PathBuf> },
}

impl Upload {
    /// Removes what a write that never ended leaves: its temporary file, or the file it made.
    fn discard(&self) {
        match &self.into {
            Into::Temp(temp) => {
                let _ = fs::remove_file(temp);
            }
            Into::Place { made: Some(made) } => {
                let _ = fs::remove_file(made);
            }
            Into::Place { made: None } => {}
        }
    }
}

/// The files a connection is writing. Dropping it removes the temporary files of writes that
/// never ended.
#[derive(Default)]
pub struct Writes {
    open: HashMap<u64, Upload>,
    /// Writes that failed: their remaining chunks are dropped without another error.
    dropped: HashSet<u64>,
}

impl Writes {
    /// Starts writing `path` for request `id`: a new file owned by `user` (see [`owner`]), a
    /// replaced one keeping its owner and mode unless `mode` says; `in_place`, into the file
    /// itself (see [`HostMessage::WriteFile`](agentos_protocol::HostMessage::WriteFile)).
    pub fn begin(
        &mut self,
        id: u64,
        path: &str,
        mode: Option<u32>,
        user: Option<&str>,
        in_place: bool,
    ) -> Result<(), Failure> {
        let dest = absolute(path)?;
        let owner = owner(user)?;
        if self.open.contains_key(&id) {
            return Err(Failure::new(
                FileErrorKind::Invalid,
                format!("request {id} is already writing a file"),
            ));
        }
        if self.open.len() >= MAX_WRITES {
            return Err(Failure::new(
                FileErrorKind::Invalid,
                format!("{MAX_WRITES} files are already being written on this connection"),
            ));
        }
        let (Some(parent), Some(_)) = (dest.parent(), dest.file_name()) else {
            return Err(Failure::new(
                FileErrorKind::IsADirectory,
                "/ is a directory".into(),
            ));
        };
        let existing = fs::metadata(dest).ok();
        if existing.as_ref().is_some_and(Metadata::is_dir) {
            return Err(Failure::new(
                FileErrorKind::IsADirectory,
                format!("{} is a directory", clip(path)),
            ));
        }
        let mode = match (mode, &existing) {
            (Some(mode), _) => mode & 0o7777,
            (None, Some(meta)) => meta.permissions().mode() & 0o7777,
            (None, None) => DEFAULT_MODE,
        };
        make_dirs(parent, owner)?;
        let owner = match &existing {
            Some(meta) => Some(Owner {
                uid: meta.uid(),
                gid: meta.gid(),
            }),
            None => owner,
        };
        let (file, into) = if in_place {
            if existing.as_ref().is_some_and(|meta| !meta.is_file()) {
                return Err(not_a_file(dest));
            }
            open_in_place(dest, mode, existing.is_none())?
        } else {
            // Not named after the file: a name near the kernel's limit would leave no room.
            let temp = parent.join(format!(
                ".agentos-write-{}",
                UPLOADS.fetch_add(1, Ordering::Relaxed)
            ));
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&temp)
                .map_err(|e| Failure::io("write", dest, &e))?;
            (file, Into::Temp(temp))
        };
        let upload = Upload {
            file,
            into,
            dest: dest.to_path_buf(),
            size: 0,
        };
        // The process's umask took bits from `mode`; the request's mode is what was asked.
        // Ownership first: changing it clears set-user-ID bits. Each only when it changes
        // something, as each is a change a watcher sees.
        let given = set_owner_and_mode(&upload.file, owner, mode);
        if let Err(e) = given {
            upload.discard();
            return Err(Failure::io("set the owner and mode of", dest, &e));
        }
        self.open.insert(id, upload);
        Ok(())
    }

    /// Appends `data` to the file of request `id`.
    pub fn write(&mut self, id: u64, data: &[u8]) -> Result<(), Failure> {
        if self.dropped.contains(&id) {
            return Ok(());
        }
        let Some(upload) = self.open.get_mut(&id) else {
            return Err(no_write(id));
        };
        match upload.file.write_all(data) {
            Ok(()) => {
                upload.size += data.len() as u64;
                Ok(())
            }
            Err(e) => {
                let failure = Failure::io("write", &upload.dest, &e);
                self.abandon(id);
                Err(failure)
            }
        }
    }

    /// Puts the file of request `id` in place; its size, or `None` for a write that had
    /// failed (and said so).
    pub fn end(&mut self, id: u64) -> Result<Option<u64>, Failure> {
        if self.dropped.remove(&id) {
            return Ok(None);
        }
        let Some(upload) = self.open.remove(&id) else {
            return Err(no_write(id));
        };
        let Upload {
            file,
            into,
            dest,
            size,
        } = upload;
        drop(file);
        if let Into::Temp(temp) = into
            && let Err(e) = fs::rename(&temp, &dest)
        {
            let _ = fs::remove_file(&temp);
            return Err(Failure::io("write", &dest, &e));
        }
        Ok(Some(size))
    }

    fn abandon(&mut self, id: u64) {
        if let Some(upload) = self.open.remove(&id) {
            upload.discard();
        }
        if self.dropped.len() >= MAX_DROPPED {
            self.dropped.clear();
        }
        self.dropped.insert(id);
    }
}

impl Drop for Writes {
    fn drop(&mut self) {
        for upload in self.open.values() {
            upload.discard();
        }
    }
}

/// Opens `dest` to be written where it is: truncated, links followed, a regular file only (a
/// FIFO or a device would hang or misdirect the write; opened without blocking to find out).
fn open_in_place(dest: &Path, mode: u32, new: bool) -> Result<(File, Into), Failure> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(mode)
        .custom_flags(libc::O_NONBLOCK)
        .open(dest)
        .map_err(|e| Failure::io("write", dest, &e))?;
    let meta = file
        .metadata()
        .map_err(|e| Failure::io("write", dest, &e))?;
    if !meta.is_file() {
        return Err(not_a_file(dest));
    }
    // Truncated here, once it is known to be a file (an empty one is left be: each change is
    // an event a watcher sees).
    if meta.len() > 0 {
        file.set_len(0)
            .map_err(|e| Failure::io("write", dest, &e))?;
    }
    // A new file may be where a dangling link led: the file is removed, not the link.
    let made = new.then(|| fs::canonicalize(dest).unwrap_or_else(|_| dest.to_path_buf()));
    Ok((file, Into::Place { made }))
}

fn not_a_file(path: &Path) -> Failure {
    Failure::new(
        FileErrorKind::Invalid,
        format!(
            "{} is not a regular file to write into",
            clip(&path.to_string_lossy())
        ),
    )
}

/// Gives `file` its owner and mode where they differ from what it has.
fn set_owner_and_mode(file: &File, owner: Option<Owner>, mode: u32) -> io::Result<()> {
    let meta = file.metadata()?;
    if let Some(Owner { uid, gid }) = owner
        && (meta.uid(), meta.gid()) != (uid, gid)
    {
        std::os::unix::fs::fchown(file, Some(uid), Some(gid))?;
    }
    if file.metadata()?.permissions().mode() & 0o7777 != mode {
        file.set_permissions(fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

fn no_write(id: u64) -> Failure {
    Failure::new(
        FileErrorKind::Invalid,
        format!("no file is being written for request {id}"),
    )
}

#[cfg(test)]
mod tests;
