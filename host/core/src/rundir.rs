//! Run directories: where each VM's sockets, console log and report live while it runs.
//!
//! ```text
//! BASE                        one per user, mode 0700 (see base_path)
//!   <label>-<pid>-<n>/        one per VM (or daemon, carrier, trace), 0700, ours
//!     label                   what runs there, for `agentos top`
//!     vmm.log, console.log    the VMM's stderr and the guest's console, opened by us
//!     report.json             the VMM's report, a file it opened before its jail
//!     vmm/                    the VMM's own directory, 0700, owned by the VM's user
//!       vsock.sock            the VMM's listener for host-to-guest connections
//!       vsock.sock_<port>     ours: where guest-to-host connections to `port` arrive
//! ```
//!
//! Who may be hostile here: any local user, who may have made a path before us (a name under
//! `/tmp` is anyone's); and a VMM that its guest took over, which owns its `vmm/` directory and
//! may put anything there, symlinks to host files included. So the base is made with one
//! `mkdir` of mode 0700 and checked through a descriptor opened without following symlinks
//! (owner, mode, a directory) every time it is used; anything else is refused with the path and
//! the fix. Files are created and read through directory descriptors, without following
//! symlinks and, when created, only if new; nothing is `chmod`ed or `chown`ed by path; the one
//! directory that changes owner, `vmm/`, is ours until we give it away through its descriptor.
//! Sockets the VMM connects to get their mode from a umask at `bind` (see [`VmmDir::listen`]).

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Overrides where run directories go (tests give each their own).
pub const RUN_DIR_ENV: &str = "AGENTOS_RUN_DIR";
/// The user ids a jailed VMM may be given, one per VM: `FIRST-LAST`.
pub const VMM_IDS_ENV: &str = "AGENTOS_VMM_IDS";
/// Root's base: `/run` is root's alone.
const ROOT_BASE: &str = "/run/agentos";
/// By default the VMMs' users are taken from here: far above the ids distributions hand out to
/// people and services, and below those container tools reserve for their own user namespaces
/// (systemd's 0x80000000 and up); see docs/security.md.
pub const DEFAULT_VMM_IDS: (u32, u32) = (0x7000_0000, 0x7000_ffff);
/// Name of the VMM's own directory in a run directory.
pub const VMM_DIR: &str = "vmm";
/// A file in a run directory naming what runs there for people (`group/agent`).
const LABEL_FILE: &str = "label";
/// The longest label read back.
const MAX_LABEL_BYTES: u64 = 256;
/// Taken while a VMM's user is chosen and its directory given to it.
const IDS_LOCK_FILE: &str = "vmm-ids.lock";
/// How long choosing a VMM's user may wait for another agentos process that is choosing one.
const IDS_LOCK_TIMEOUT: Duration = Duration::from_secs(30);
const LOCK_POLL: Duration = Duration::from_millis(20);
/// Mode of the sockets a VMM connects to: its directory keeps everyone else out.
const VMM_SOCKET_UMASK: libc::mode_t = 0o111;
/// Mode of a socket only its owner may use.
const PRIVATE_SOCKET_UMASK: libc::mode_t = 0o177;

#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error(
        "{} {why}, so agentos will not keep its sockets there: remove it if it is yours, or set {RUN_DIR_ENV} to a directory of your own",
        path.display()
    )]
    Unsafe { path: PathBuf, why: String },
    #[error("cannot {what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot jail the VMM: cannot give {} to its user {id} (`--no-jail` runs it unconfined, unsafely)",
        path.display()
    )]
    GiveAway {
        path: PathBuf,
        id: u32,
        #[source]
        source: io::Error,
    },
    #[error(
        "every VMM user id in {first}-{last} is taken by a running VM; set {VMM_IDS_ENV}=FIRST-LAST to a larger range"
    )]
    NoFreeId { first: u32, last: u32 },
    #[error("{VMM_IDS_ENV}={0:?} is not FIRST-LAST with 0 < FIRST <= LAST < 4294967295")]
    BadIdRange(String),
    #[error(
        "another agentos process held {} for {} s; if none runs, remove that file",
        path.display(),
        IDS_LOCK_TIMEOUT.as_secs()
    )]
    LockTimeout { path: PathBuf },
}

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> RunDirError + 'a {
    move |source| RunDirError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Where this user's run directories go: `$AGENTOS_RUN_DIR`; for root `/run/agentos`; else
/// `$XDG_RUNTIME_DIR/agentos`, else `/tmp/agentos-UID`. Unix socket paths must fit in 108
/// bytes, so the base is short.
pub fn base_path() -> PathBuf {
    if let Some(dir) = std::env::var_os(RUN_DIR_ENV) {
        return PathBuf::from(dir);
    }
    if euid() == 0 {
        return PathBuf::from(ROOT_BASE);
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("agentos");
    }
    std::env::temp_dir().join(format!("agentos-{}", euid()))
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// This user's base directory, made if missing, and checked.
pub fn base() -> Result<Base, RunDirError> {
    Base::open(&base_path(), true)
}

/// The base directory, checked: a directory (not a symlink) of ours that no one else may enter.
pub struct Base {
    path: PathBuf,
    fd: OwnedFd,
}

impl Base {
    /// Opens the base at `path`, making it first (one `mkdir`, mode 0700) when `create`.
    pub fn open(path: &Path, create: bool) -> Result<Self, RunDirError> {
        if create {
            match mkdir_at(None, path, 0o700) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_error("create", path)(e)),
            }
        }
        let fd = open_dir_at(None, path).map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP | libc::ENOTDIR) => {
                let link = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_symlink());
                unsafe_path(
                    path,
                    if link {
                        "is a symbolic link"
                    } else {
                        "is not a directory"
                    },
                )
            }
            _ => io_error("open", path)(e),
        })?;
        let stat = fstat(fd.as_fd()).map_err(io_error("look at", path))?;
        if stat.st_uid != euid() {
            return Err(unsafe_path(
                path,
                &format!("belongs to user {}, not to you ({})", stat.st_uid, euid()),
            ));
        }
        if stat.st_mode & 0o077 != 0 {
            return Err(unsafe_path(
                path,
                &format!(
                    "has mode {:o}: others may enter it (agentos makes it 0700)",
                    stat.st_mode & 0o7777
                ),
            ));
        }
        Ok(Self {
            path: path.to_owned(),
            fd,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens (making it, mode 0600, if missing) a file directly in the base, never through a
    /// symlink.
    pub fn open_file(&self, name: &str) -> Result<File, RunDirError> {
        let path = self.path.join(name);
        open_file_at(self.fd.as_fd(), name, libc::O_RDWR | libc::O_CREAT, 0o600)
            .map_err(io_error("open", &path))
    }

    /// The names of the directories in the base (run directories, by their names).
    pub fn entries(&self) -> Vec<String> {
        std::fs::read_dir(&self.path)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn unsafe_path(path: &Path, why: &str) -> RunDirError {
    RunDirError::Unsafe {
        path: path.to_owned(),
        why: why.to_owned(),
    }
}

/// The label of the VM whose run directory (and cgroup) is named `name`, if it has one.
pub fn label_of(name: &str) -> Option<String> {
    if !is_plain_name(name) {
        return None;
    }
    let base = Base::open(&base_path(), false).ok()?;
    let dir = open_dir_at(Some(base.fd.as_fd()), Path::new(name)).ok()?;
    let text = read_bounded_at(dir.as_fd(), LABEL_FILE, MAX_LABEL_BYTES).ok()?;
    let text = String::from_utf8_lossy(&text);
    let label = text.trim();
    (!label.is_empty()).then(|| label.to_owned())
}

fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && !name.starts_with('.')
}

/// Removes the run directories of processes that are gone (a run or daemon that was killed);
/// returns how many.
pub fn remove_stale() -> usize {
    let Ok(base) = base() else {
        return 0;
    };
    let mut removed = 0;
    for name in base.entries() {
        let Some(owner) = crate::cgroup::owner_pid(&name) else {
            continue;
        };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        // remove_dir_all does not follow symlinks inside what it removes.
        if std::fs::remove_dir_all(base.path.join(&name)).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Listens on `path`, in a VMM's directory, for the VMM's connections: see [`VmmDir::listen`],
/// which this is for a path.
pub fn listen(path: &Path) -> io::Result<UnixListener> {
    // remove_file removes a symlink at `path`, never what it points to.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    bind_with_umask(path, VMM_SOCKET_UMASK)
}

/// Binds a Unix socket that only its owner may connect to, whatever the process's umask.
pub fn listen_private(path: &Path) -> io::Result<UnixListener> {
    bind_with_umask(path, PRIVATE_SOCKET_UMASK)
}

/// Binds `path` with `umask` applied to the new socket's mode. The umask is the calling
/// thread's alone: a short-lived thread detaches its file-system attributes from the process
/// (`unshare(CLONE_FS)`) first, so no other thread's files are created under it.
fn bind_with_umask(path: &Path, umask: libc::mode_t) -> io::Result<UnixListener> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: unshare with CLONE_FS gives this thread its own umask, working and
                // root directory; it touches no memory.
                if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: umask only sets this thread's mask, which is its own now.
                unsafe { libc::umask(umask) };
                UnixListener::bind(path)
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the bind thread failed")))
    })
}

/// One VM's (or daemon's, carrier's) directory in the base, removed when dropped.
pub struct RunDir {
    path: PathBuf,
    fd: OwnedFd,
}

impl RunDir {
    /// Creates a fresh, empty directory (mode 0700) for one VM of this process.
    pub fn create(label: &str) -> Result<Self, RunDirError> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let base = base()?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{label}-{}-{n}", std::process::id());
        let path = base.path.join(&name);
        mkdir_at(Some(base.fd.as_fd()), Path::new(&name), 0o700)
            .map_err(io_error("create", &path))?;
        let fd = open_dir_at(Some(base.fd.as_fd()), Path::new(&name))
            .map_err(io_error("open", &path))?;
        Ok(Self { path, fd })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Names what runs here, for `agentos top` and friends.
    pub fn set_label(&self, label: &str) -> io::Result<()> {
        use std::io::Write;
        let _ = unlink_at(self.fd.as_fd(), LABEL_FILE);
        self.create_file(LABEL_FILE)?.write_all(label.as_bytes())
    }

    /// Creates the file `name` here, for writing; fails if something of that name exists.
    pub fn create_file(&self, name: &str) -> io::Result<File> {
        open_file_at(
            self.fd.as_fd(),
            name,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            0o600,
        )
    }

    /// Up to `max` bytes of the regular file `name` here (not through a symlink, not a FIFO).
    pub fn read_file(&self, name: &str, max: u64) -> io::Result<Vec<u8>> {
        read_bounded_at(self.fd.as_fd(), name, max)
    }

    /// Makes the VMM's own directory, `vmm/`, and gives it to the VMM's user: `jailed` picks a
    /// user id of its own for this VM from the range (see [`vmm_ids`]), and the directory goes
    /// to it; otherwise it stays ours (a VMM without a jail, or a rootless one, is us).
    pub fn vmm_dir(&self, jailed: bool) -> Result<VmmDir, RunDirError> {
        let path = self.join(VMM_DIR);
        if !jailed || euid() != 0 {
            mkdir_at(Some(self.fd.as_fd()), Path::new(VMM_DIR), 0o700)
                .map_err(io_error("create", &path))?;
            let fd = open_dir_at(Some(self.fd.as_fd()), Path::new(VMM_DIR))
                .map_err(io_error("open", &path))?;
            return Ok(VmmDir { path, fd, id: None });
        }
        let (first, last) = vmm_ids()?;
        let base = base()?;
        let _lock = lock_with_timeout(base.open_file(IDS_LOCK_FILE)?, IDS_LOCK_TIMEOUT).map_err(
            |e| match e {
                LockError::TimedOut => RunDirError::LockTimeout {
                    path: base.path.join(IDS_LOCK_FILE),
                },
                LockError::Io(e) => io_error("lock", &base.path.join(IDS_LOCK_FILE))(e),
            },
        )?;
        let taken = ids_in_use(&base, first, last);
        let id = (first..=last)
            .find(|id| !taken.contains(id))
            .ok_or(RunDirError::NoFreeId { first, last })?;
        mkdir_at(Some(self.fd.as_fd()), Path::new(VMM_DIR), 0o700)
            .map_err(io_error("create", &path))?;
        let fd = open_dir_at(Some(self.fd.as_fd()), Path::new(VMM_DIR))
            .map_err(io_error("open", &path))?;
        // SAFETY: fchown on a descriptor we own, of a directory we just made.
        if unsafe { libc::fchown(fd.as_raw_fd(), id, id) } != 0 {
            return Err(RunDirError::GiveAway {
                path,
                id,
                source: io::Error::last_os_error(),
            });
        }
        Ok(VmmDir {
            path,
            fd,
            id: Some(id),
        })
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        // remove_dir_all does not follow symlinks inside what it removes (the VMM's directory
        // may hold anything its guest made it write).
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The VMM's own directory: its sockets, and the sockets it connects to.
pub struct VmmDir {
    path: PathBuf,
    fd: OwnedFd,
    /// The user (and group) id it was given, when the VMM runs as a user of its own.
    id: Option<u32>,
}

impl VmmDir {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The VMM's user and group id, when it has one of its own.
    pub fn id(&self) -> Option<u32> {
        self.id
    }

    /// Listens on `name` here for the VMM's connections. Connecting needs write permission on
    /// the socket and the VMM may run as another user, so the socket is made with mode 0666;
    /// that opens it to no one else, as this directory (0700, the VMM's) and the directories
    /// above it (0700, ours) let only us and the VMM through. Whatever the VMM left at that name
    /// is removed first (`unlinkat` removes a symlink, never what it points to).
    pub fn listen(&self, name: &str) -> io::Result<UnixListener> {
        if !is_plain_name(name) {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let _ = unlink_at(self.fd.as_fd(), name);
        bind_with_umask(&self.join(name), VMM_SOCKET_UMASK)
    }
}

/// The range VMM user ids are taken from: `$AGENTOS_VMM_IDS`, else [`DEFAULT_VMM_IDS`].
pub fn vmm_ids() -> Result<(u32, u32), RunDirError> {
    match std::env::var(VMM_IDS_ENV) {
        Err(_) => Ok(DEFAULT_VMM_IDS),
        Ok(text) => parse_id_range(&text).ok_or(RunDirError::BadIdRange(text)),
    }
}

fn parse_id_range(text: &str) -> Option<(u32, u32)> {
    let (first, last) = text.trim().split_once('-')?;
    let (first, last): (u32, u32) = (first.trim().parse().ok()?, last.trim().parse().ok()?);
    // 0 is root and u32::MAX means "no change" to setresuid.
    (first > 0 && first <= last && last < u32::MAX).then_some((first, last))
}

/// The ids of the `vmm/` directories in the base's run directories, within the range.
fn ids_in_use(base: &Base, first: u32, last: u32) -> Vec<u32> {
    base.entries()
        .into_iter()
        .filter_map(|name| {
            let dir = open_dir_at(Some(base.fd.as_fd()), Path::new(&name)).ok()?;
            let stat = fstatat_nofollow(dir.as_fd(), VMM_DIR).ok()?;
            Some(stat.st_uid)
        })
        .filter(|id| (first..=last).contains(id))
        .collect()
}

#[derive(Debug)]
pub enum LockError {
    TimedOut,
    Io(io::Error),
}

/// An exclusive `flock` held on a file; released when dropped (closing the file releases it).
pub struct FileLock {
    _file: File,
}

/// Takes an exclusive `flock` on `file`, waiting for it up to `timeout` (never without end: a
/// lock file anyone else can hold must not freeze us).
pub fn lock_with_timeout(file: File, timeout: Duration) -> Result<FileLock, LockError> {
    let deadline = Instant::now().checked_add(timeout);
    loop {
        // SAFETY: flock on a descriptor `file` keeps open.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(FileLock { _file: file });
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(LockError::Io(e));
        }
        if deadline.is_none_or(|d| Instant::now() >= d) {
            return Err(LockError::TimedOut);
        }
        std::thread::sleep(LOCK_POLL);
    }
}

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput.into())
}

fn dir_fd(dir: Option<BorrowedFd<'_>>) -> libc::c_int {
    dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd())
}

fn mkdir_at(dir: Option<BorrowedFd<'_>>, path: &Path, mode: libc::mode_t) -> io::Result<()> {
    let c = cpath(path)?;
    // SAFETY: a NUL-terminated path and a directory descriptor (or AT_FDCWD).
    if unsafe { libc::mkdirat(dir_fd(dir), c.as_ptr(), mode) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens a directory, refusing a symlink at the last component.
fn open_dir_at(dir: Option<BorrowedFd<'_>>, path: &Path) -> io::Result<OwnedFd> {
    let c = cpath(path)?;
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: a NUL-terminated path and a directory descriptor (or AT_FDCWD).
    let fd = unsafe { libc::openat(dir_fd(dir), c.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens `name` in `dir` with `flags`, never through a symlink.
fn open_file_at(
    dir: BorrowedFd<'_>,
    name: &str,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<File> {
    if !is_plain_name(name) {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    let c = cpath(Path::new(name))?;
    let flags = flags | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: a NUL-terminated name, a directory descriptor, flags and a mode.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags, libc::c_uint::from(mode)) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Up to `max` bytes of the regular file `name` in `dir`. Opened without following a symlink
/// and without blocking (a FIFO put there would otherwise hang the reader), then checked to be
/// a regular file.
fn read_bounded_at(dir: BorrowedFd<'_>, name: &str, max: u64) -> io::Result<Vec<u8>> {
    let file = open_file_at(dir, name, libc::O_RDONLY | libc::O_NONBLOCK, 0)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{name} is not a regular file"),
        ));
    }
    let mut bytes = Vec::new();
    file.take(max).read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn unlink_at(dir: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    let c = cpath(Path::new(name))?;
    // SAFETY: a NUL-terminated name and a directory descriptor.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data, filled in by fstat.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a descriptor we hold and a valid out pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat)
}

fn fstatat_nofollow(dir: BorrowedFd<'_>, name: &str) -> io::Result<libc::stat> {
    let c = cpath(Path::new(name))?;
    // SAFETY: stat is plain data, filled in by fstatat.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a directory descriptor, a NUL-terminated name and a valid out pointer.
    let rc = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            c.as_ptr(),
            &mut stat,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat)
}

#[cfg(test)]
mod tests;
