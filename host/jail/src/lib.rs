//! The VMM's jail, entered by `agentos-vmm` before it opens anything of the guest's or starts a
//! thread, the way Firecracker's jailer confines Firecracker:
//!
//! - its own PID namespace: the process forks; the child is PID 1 of a new namespace and runs
//!   the VMM; the parent stays behind as a supervisor that only forwards stop signals, waits, and
//!   exits with the child's status (so whoever started `agentos-vmm` sees the same statuses),
//!   under `no_new_privs` and with no capability but `CAP_KILL` (none when rootless);
//! - its own mount, network, IPC and UTS namespaces, and a private root (a small tmpfs, then
//!   `pivot_root`) in which only the kernel and initrds (read-only), `/dev/kvm` and the VMM's own
//!   directory (its sockets) exist, at the paths they had;
//! - no core dumps, bounded open files and file sizes; `no_new_privs`;
//! - a user of its own and every capability dropped.
//!
//! Two levels, picked by who runs it, and nothing in between: as root, the **full** jail (the
//! VMM becomes the unprivileged user and group given, one per VM, and gets a `/dev/kvm` node of
//! its own); as anyone else, the **rootless** jail (first a user namespace mapping only the
//! caller's own ids, the way bubblewrap works, then the same namespaces and root, with the
//! host's `/dev/kvm` bound in). Any layer that cannot be applied is an error and the VMM does
//! not run: the jail fails closed. Running without it takes `--no-jail`, which says so loudly.
//!
//! A guest that takes over its VMM then holds a process that sees one directory and no other
//! process, has no network, runs as a user that owns nothing on the host but that directory,
//! cannot gain privileges and holds no capability.
//!
//! Files the VMM writes outside its directory (the console log, the report) are opened by
//! `agentos-vmm` before it enters the jail, as whoever started it: nothing is given away to the
//! VMM's user but its own directory, which must already be that user's.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

/// Open files the VMM may hold: its devices, guest connections and logs.
const MAX_OPEN_FILES: u64 = 4096;
/// The largest file the VMM may write (its console log is bounded below this).
pub const MAX_FILE_BYTES: u64 = 64 << 20;
/// Size of the tmpfs that becomes the root: directories, device nodes and empty mount points.
const ROOT_TMPFS: &str = "size=1m,mode=0755";
/// The uid and gid `agentos-vmm` runs its VMM as unless told otherwise: `nobody`/`nogroup` on
/// every common distribution, which own no files. `agentos run` and the daemon give each VM a
/// user of its own instead.
pub const DEFAULT_ID: u32 = 65534;
/// A device node in the jail is for the VMM's user alone.
const DEVICE_MODE: libc::mode_t = 0o600;
/// Signals the supervisor passes on to the VMM (those that stop it cleanly).
const FORWARDED_SIGNALS: [libc::c_int; 4] =
    [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1];
/// The capability to signal processes of other users (linux/capability.h).
const CAP_KILL: u32 = 5;
/// The supervisor's status when the VMM ended some way `waitpid` does not describe.
const EXIT_LOST: i32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("cannot {step}")]
    Step {
        step: String,
        #[source]
        source: io::Error,
    },
    #[error("{0} is not a path the jail can hold")]
    BadPath(PathBuf),
    #[error("{0} is not a character device")]
    NotADevice(PathBuf),
    #[error(
        "{} belongs to user {owner}, not to the VMM's user {user}: the VMM's directory must be its own (agentos run and the daemon make one; or pass --no-jail)",
        path.display()
    )]
    NotTheVmmsDir {
        path: PathBuf,
        owner: u32,
        user: u32,
    },
    #[error("{} is not a directory (a symlink or a file); the VMM's sockets need a directory of its own", .0.display())]
    NotADir(PathBuf),
    #[error("the VMM must not run as root; give it an unprivileged --uid and --gid")]
    RootIds,
    #[error(
        "user namespaces are not available to this user ({0}), so the rootless jail cannot be built: run agentos as root, allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces), or pass --no-jail to run the VMM unconfined"
    )]
    NoUserNamespace(#[source] io::Error),
}

/// The user and group the VMM runs as inside its jail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
}

impl Default for Ids {
    fn default() -> Self {
        Self {
            uid: DEFAULT_ID,
            gid: DEFAULT_ID,
        }
    }
}

/// What the VMM needs to see inside its jail, and as whom.
#[derive(Clone, Debug, Default)]
pub struct JailPlan {
    /// Files visible read-only (kernel, initrds).
    pub read_only: Vec<PathBuf>,
    /// Directories visible read-write: the VMM's own (its sockets), which must belong to the
    /// user it becomes.
    pub dirs: Vec<PathBuf>,
    /// Character devices (`/dev/kvm`): in the full jail recreated as nodes of the jail's user,
    /// mode 0600 (the host's nodes are never touched); in the rootless one bound in.
    pub devices: Vec<PathBuf>,
    /// Who the VMM becomes in the full jail (the rootless jail keeps the caller's ids).
    pub ids: Ids,
    /// Where the jail's root is built: `<base>/<supervisor pid>`, removed when the VMM ends.
    /// Without one, over `/proc` in the VMM's own mount namespace, which leaves nothing behind.
    pub chroot_base: Option<PathBuf>,
    /// The largest file the VMM may write: its guest memory when it may save a snapshot, else
    /// [`MAX_FILE_BYTES`] (its logs stay far below).
    pub max_file_bytes: u64,
    /// Directories visible read-only at their own paths (a passed-through PCI function's sysfs
    /// directory, where VFIO finds its IOMMU group).
    pub read_only_dirs: Vec<PathBuf>,
    /// Memory the VMM may lock (`RLIMIT_MEMLOCK`): the guest's RAM when a device's DMA pins
    /// it, else none.
    pub locked_memory_bytes: u64,
}

/// Where the new root is mounted before the pivot when no chroot base is given: a directory
/// every Linux host has, that holds nothing the jail binds, and that the VMM's own mount
/// namespace may cover (the host's `/proc` is untouched). Using it, the jail leaves no
/// directory behind on the host.
const ROOT_MOUNT_POINT: &str = "/proc";

/// Which jail the VMM runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JailLevel {
    /// Started by root: namespaces, private root, limits, a user of its own, no capabilities.
    Full,
    /// Started by another user: a user namespace mapping only that user, then the same.
    Rootless,
    /// `--no-jail`: limits only, not even that for the guest's sake.
    None,
}

impl JailLevel {
    /// The jail a VMM started by this process gets (it fails rather than get less).
    pub fn for_this_process(no_jail: bool) -> Self {
        if no_jail {
            Self::None
        } else if euid() == 0 {
            Self::Full
        } else {
            Self::Rootless
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Rootless => "rootless",
            Self::None => "none",
        }
    }
}

impl std::fmt::Display for JailLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

fn step(step: impl Into<String>) -> impl FnOnce(io::Error) -> JailError {
    let step = step.into();
    move |source| JailError::Step { step, source }
}

fn cstring(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::BadPath(path.to_owned()))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Enters the jail. Call while the process has one thread: forking, the mount namespace and the
/// root are safe and per process only then.
///
/// Returns in the process that runs the VMM, a new child; the calling process becomes its
/// supervisor and never returns from here. Every failure is an error: the caller must not run
/// the VMM then.
pub fn enter(plan: &JailPlan) -> Result<JailLevel, JailError> {
    let level = JailLevel::for_this_process(false);
    let user = match level {
        JailLevel::Full if plan.ids.uid == 0 || plan.ids.gid == 0 => {
            return Err(JailError::RootIds);
        }
        JailLevel::Full => plan.ids.uid,
        _ => euid(),
    };
    for dir in &plan.dirs {
        check_own_dir(dir, user)?;
    }
    if level == JailLevel::Rootless {
        enter_user_namespace()?;
    }
    // SAFETY: unshare takes flags only.
    check(unsafe { libc::unshare(libc::CLONE_NEWPID) })
        .map_err(step("create the jail's PID namespace"))?;
    let root = match &plan.chroot_base {
        Some(base) => chroot_dir(base)?,
        None => PathBuf::from(ROOT_MOUNT_POINT),
    };
    // Mounting the root over or under something the jail binds would hide it.
    if let Some(bad) = plan
        .dirs
        .iter()
        .chain(&plan.read_only)
        .chain(&plan.read_only_dirs)
        .chain(&plan.devices)
        .find(|p| p.starts_with(&root) || root.starts_with(p))
    {
        return Err(JailError::BadPath(bad.clone()));
    }
    if let Some(base) = &plan.chroot_base {
        std::fs::create_dir_all(base).map_err(step(format!("create {}", base.display())))?;
        std::fs::create_dir(&root).map_err(step(format!("create {}", root.display())))?;
    }
    let remove_root = || {
        if plan.chroot_base.is_some() {
            // Empty: whatever was mounted on it lived in the VMM's mount namespace only.
            if let Err(e) = std::fs::remove_dir(&root) {
                eprintln!(
                    "agentos-vmm: cannot remove the jail's root {}: {e}",
                    root.display()
                );
            }
        }
    };
    let forwarded = signal_set(&FORWARDED_SIGNALS);
    let (alive_read, alive_write) = match prepare_fork(&forwarded) {
        Ok(pipe) => pipe,
        Err(e) => {
            remove_root();
            return Err(e);
        }
    };
    // SAFETY: the process has one thread (the caller's contract), so the child gets a
    // consistent copy of memory and locks.
    match unsafe { libc::fork() } {
        -1 => {
            let e = io::Error::last_os_error();
            remove_root();
            Err(step("fork the VMM into its PID namespace")(e))
        }
        0 => {
            // SAFETY: closes a descriptor this process owns and no one else uses.
            unsafe { libc::close(alive_write) };
            jail_child(plan, &root, level)?;
            // Armed after the change of ids, which clears a parent-death signal set before.
            die_with_supervisor(alive_read)?;
            Ok(level)
        }
        child => {
            // SAFETY: as above; the write end stays open until the supervisor exits, so that
            // the child can tell whether it still lives.
            unsafe { libc::close(alive_read) };
            if let Err(e) = confine_supervisor(level) {
                eprintln!("agentos-vmm: {}", agentos_protocol::error_chain(&e));
                // SAFETY: kill takes integers only; the child is ours and not yet reaped.
                unsafe { libc::kill(child, libc::SIGKILL) };
                supervise(child, &forwarded);
                remove_root();
                std::process::exit(EXIT_LOST)
            }
            let code = supervise(child, &forwarded);
            remove_root();
            std::process::exit(code)
        }
    }
}

/// Blocks the stop signals and returns the two ends of a pipe by which the child sees its
/// supervisor die. The signals wait, blocked, until someone can take them: the supervisor once
/// it forwards them, the VMM once its signal thread runs (as PID 1 it would drop them otherwise).
fn prepare_fork(forwarded: &libc::sigset_t) -> Result<(libc::c_int, libc::c_int), JailError> {
    // SAFETY: `forwarded` is a valid signal set; the old mask is not wanted.
    check(unsafe { libc::sigprocmask(libc::SIG_BLOCK, forwarded, std::ptr::null_mut()) })
        .map_err(step("block stop signals"))?;
    let mut pipe = [0; 2];
    // SAFETY: `pipe` has room for the two descriptors.
    check(unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) })
        .map_err(step("create the supervisor's pipe"))?;
    Ok((pipe[0], pipe[1]))
}

/// Where the jail's root goes under `base`: a directory named after this process.
fn chroot_dir(base: &Path) -> Result<PathBuf, JailError> {
    if !base.is_absolute() {
        return Err(JailError::BadPath(base.to_owned()));
    }
    Ok(base.join(std::process::id().to_string()))
}

/// In the child: the VMM must not outlive its supervisor. The death signal is armed first;
/// then the pipe says whether the supervisor already died before it was.
fn die_with_supervisor(alive_read: libc::c_int) -> Result<(), JailError> {
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) })
        .map_err(step("tie the VMM to its supervisor"))?;
    let mut poll = libc::pollfd {
        fd: alive_read,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no waiting.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    // SAFETY: closes a descriptor this process owns.
    unsafe { libc::close(alive_read) };
    if ready != 0 {
        // The write end is closed: the supervisor is gone and no one would wait for this VM.
        // SAFETY: _exit ends the process without running anything else.
        unsafe { libc::_exit(EXIT_LOST) };
    }
    Ok(())
}

/// In the child, PID 1 of the new namespace: the rest of the jail.
fn jail_child(plan: &JailPlan, root: &Path, level: JailLevel) -> Result<(), JailError> {
    let namespaces =
        libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    // SAFETY: unshare takes flags only.
    check(unsafe { libc::unshare(namespaces) }).map_err(step("create the jail's namespaces"))?;
    private_root(plan, root, level)?;
    let name = b"agentos-vmm";
    // SAFETY: the pointer and length describe `name`.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
        .map_err(step("set the jail's host name"))?;
    limit(plan.max_file_bytes, plan.locked_memory_bytes)?;
    // Dropping the bounding set needs CAP_SETPCAP, which the change of ids below takes away.
    drop_bounding_and_ambient();
    if level == JailLevel::Full {
        switch_ids(plan.ids)?;
    }
    set_no_new_privs()?;
    clear_capabilities()
}

/// The full jail's supervisor keeps root's uid (it owns the jail's root directory, which it
/// removes at the end) but of the capabilities only `CAP_KILL`, which passing signals to the
/// VMM, running as another user, needs; the rootless one, whose VMM is its own user, keeps
/// none. With `no_new_privs` neither can regain any.
fn confine_supervisor(level: JailLevel) -> Result<(), JailError> {
    drop_bounding_and_ambient();
    set_no_new_privs()?;
    match level {
        JailLevel::Full => set_capabilities(1 << CAP_KILL),
        _ => set_capabilities(0),
    }
}

/// Refuses a directory for the VMM that is not a directory of `user`'s own: a symlink, a file,
/// another user's. The jail gives nothing away; whoever made the directory gave it.
fn check_own_dir(dir: &Path, user: u32) -> Result<(), JailError> {
    let meta = std::fs::symlink_metadata(dir).map_err(step(format!("find {}", dir.display())))?;
    if !meta.is_dir() {
        return Err(JailError::NotADir(dir.to_owned()));
    }
    if meta.uid() != user {
        return Err(JailError::NotTheVmmsDir {
            path: dir.to_owned(),
            owner: meta.uid(),
            user,
        });
    }
    Ok(())
}

/// Enters a new user namespace in which the caller's own user and group are mapped to
/// themselves and nothing else (no supplementary groups): the rootless jail's first step, which
/// gives the process the capabilities to build the rest inside it and no power outside it.
fn enter_user_namespace() -> Result<(), JailError> {
    // SAFETY: getuid and getgid have no preconditions and cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    // SAFETY: unshare takes flags only.
    check(unsafe { libc::unshare(libc::CLONE_NEWUSER) }).map_err(JailError::NoUserNamespace)?;
    let write = |file: &str, text: String| {
        std::fs::write(format!("/proc/self/{file}"), text)
            .map_err(step(format!("write /proc/self/{file}")))
    };
    // Without this, an unprivileged process may not map groups.
    write("setgroups", "deny".into())?;
    write("uid_map", format!("{uid} {uid} 1"))?;
    write("gid_map", format!("{gid} {gid} 1"))
}

/// The supervisor: passes stop signals on to the VMM, waits for it, and returns the status to
/// exit with: the VMM's own, or 128 + the signal that killed it.
fn supervise(child: libc::pid_t, forwarded: &libc::sigset_t) -> i32 {
    CHILD.store(child, Ordering::SeqCst);
    for signal in FORWARDED_SIGNALS {
        // SAFETY: sigaction is plain data, zeroed then filled; `forward` is async-signal-safe
        // (it only reads an atomic and calls kill).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = forward as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
    // SAFETY: `forwarded` is a valid signal set; signals that came meanwhile are delivered now.
    unsafe { libc::sigprocmask(libc::SIG_UNBLOCK, forwarded, std::ptr::null_mut()) };
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid out pointer.
        let rc = unsafe { libc::waitpid(child, &mut status, 0) };
        if rc == child {
            return exit_status(status);
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return EXIT_LOST;
        }
    }
}

/// The VMM's pid, for the supervisor's signal handler.
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(signal: libc::c_int) {
    let child = CHILD.load(Ordering::SeqCst);
    if child > 0 {
        // SAFETY: kill is async-signal-safe and takes integers only.
        unsafe { libc::kill(child, signal) };
    }
}

/// What a shell would report for a `waitpid` status.
fn exit_status(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        EXIT_LOST
    }
}

fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for &signal in signals {
        // SAFETY: `set` is valid and `signal` a real signal number.
        unsafe { libc::sigaddset(&mut set, signal) };
    }
    set
}

/// Builds the new root on a tmpfs at `root`, puts what the plan names at its own path in it,
/// and pivots.
fn private_root(plan: &JailPlan, root: &Path, level: JailLevel) -> Result<(), JailError> {
    // Nothing mounted from here on propagates back to the host.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )
    .map_err(step("make the mounts private"))?;
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID,
        Some(ROOT_TMPFS),
    )
    .map_err(step("mount the jail's root"))?;
    for dir in &plan.dirs {
        let inside = inside(root, dir)?;
        std::fs::create_dir_all(&inside).map_err(step(format!("create {}", inside.display())))?;
        bind(dir, &inside, false)?;
    }
    // A file in a bound directory is there already (and is the real file: never touched).
    for file in plan
        .read_only
        .iter()
        .filter(|f| !plan.dirs.iter().any(|d| f.starts_with(d)))
    {
        let inside = inside(root, file)?;
        mount_point(&inside)?;
        bind(file, &inside, true)?;
    }
    for dir in &plan.read_only_dirs {
        let inside = inside(root, dir)?;
        std::fs::create_dir_all(&inside).map_err(step(format!("create {}", inside.display())))?;
        bind(dir, &inside, true)?;
    }
    for device in &plan.devices {
        let inside = inside(root, device)?;
        match level {
            JailLevel::Full => make_device(device, &inside, plan.ids)?,
            // No mknod in a user namespace: the host's node is bound in, unchanged.
            _ => {
                check_device(device)?;
                mount_point(&inside)?;
                bind(device, &inside, false)?;
            }
        }
    }
    enter_root(root)?;
    // The root itself read-only: nothing new can be created outside the bind mounts.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
        Some(ROOT_TMPFS),
    )
    .map_err(step("make the jail's root read-only"))?;
    Ok(())
}

/// A new, empty file at `path` on the jail's tmpfs to bind something over; anything already
/// there is a mistake.
fn mount_point(path: &Path) -> Result<(), JailError> {
    create_parent(path)?;
    std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(step(format!("create the mount point {}", path.display())))?;
    Ok(())
}

fn check_device(host: &Path) -> Result<std::fs::Metadata, JailError> {
    let meta = std::fs::metadata(host).map_err(step(format!("find {}", host.display())))?;
    if !meta.file_type().is_char_device() {
        return Err(JailError::NotADevice(host.to_owned()));
    }
    Ok(meta)
}

fn create_parent(path: &Path) -> Result<(), JailError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(step(format!("create {}", parent.display())))?;
    }
    Ok(())
}

/// A node at `inside` for the host's character device `host`, owned by the jail's user alone:
/// the jail's user gets the device without the host's node changing.
fn make_device(host: &Path, inside: &Path, ids: Ids) -> Result<(), JailError> {
    let meta = check_device(host)?;
    create_parent(inside)?;
    let path = cstring(inside)?;
    // SAFETY: a NUL-terminated path, a mode and a device number.
    check(unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | DEVICE_MODE, meta.rdev()) })
        .map_err(step(format!("create {} in the jail", host.display())))?;
    std::os::unix::fs::chown(inside, Some(ids.uid), Some(ids.gid))
        .map_err(step(format!("give {} to the jail's user", host.display())))
}

/// Makes `root` the process's root: `pivot_root` and detach the host's root; or, on an initial
/// ramfs, move `root` over `/` and chroot.
fn enter_root(root: &Path) -> Result<(), JailError> {
    let old = root.join(".old-root");
    std::fs::create_dir(&old).map_err(step("create the old root's mount point"))?;
    let (new_c, old_c) = (cstring(root)?, cstring(&old)?);
    // SAFETY: both pointers are NUL-terminated paths that live across the call.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, new_c.as_ptr(), old_c.as_ptr()) };
    match check(rc as libc::c_int) {
        Ok(()) => {
            std::env::set_current_dir("/").map_err(step("enter the jail's root"))?;
            let old_inside = cstring(Path::new("/.old-root"))?;
            // SAFETY: a NUL-terminated path and flags.
            check(unsafe { libc::umount2(old_inside.as_ptr(), libc::MNT_DETACH) })
                .map_err(step("unmount the host's root"))?;
            std::fs::remove_dir("/.old-root").map_err(step("remove the old root's mount point"))?;
        }
        // A root on the initial ramfs cannot be pivoted away from (hosts that boot from an
        // initramfs, such as the carrier): move the new root over it and chroot instead. The
        // host's root stays mounted beneath, out of reach of a process without CAP_SYS_CHROOT,
        // which the jail drops, and with no directory of it open.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            std::fs::remove_dir(&old).map_err(step("remove the old root's mount point"))?;
            std::env::set_current_dir(root).map_err(step("enter the jail's root"))?;
            mount_from(Path::new("."), Path::new("/"), libc::MS_MOVE)
                .map_err(step("move the jail's root over /"))?;
            let dot = cstring(Path::new("."))?;
            // SAFETY: a NUL-terminated path.
            check(unsafe { libc::chroot(dot.as_ptr()) }).map_err(step("chroot into the jail"))?;
            std::env::set_current_dir("/").map_err(step("enter the jail's root"))?;
        }
        Err(e) => return Err(step("pivot_root into the jail")(e)),
    }
    Ok(())
}

/// `path` (absolute) under `root`.
fn inside(root: &Path, path: &Path) -> Result<PathBuf, JailError> {
    let relative = path
        .strip_prefix("/")
        .map_err(|_| JailError::BadPath(path.to_owned()))?;
    if relative.as_os_str().is_empty()
        || relative
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(JailError::BadPath(path.to_owned()));
    }
    Ok(root.join(relative))
}

fn bind(from: &Path, to: &Path, read_only: bool) -> Result<(), JailError> {
    mount_from(from, to, libc::MS_BIND)
        .map_err(step(format!("bind {} into the jail", from.display())))?;
    if read_only {
        // A remount must keep the flags the source's mount has (in a user namespace they are
        // locked, and dropping one is refused); read-only and nosuid are added.
        let kept = mount_flags(from).map_err(step(format!("look at {}", from.display())))?;
        mount_from(
            from,
            to,
            kept | libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
        )
        .map_err(step(format!("make {} read-only", from.display())))?;
    }
    Ok(())
}

/// The `nodev`, `noexec` and access-time flags of the mount that holds `path`.
fn mount_flags(path: &Path) -> io::Result<libc::c_ulong> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs is plain data, filled in by the call.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out pointer.
    check(unsafe { libc::statvfs(c.as_ptr(), &mut stat) })?;
    let pairs = [
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ];
    Ok(pairs
        .iter()
        .filter(|(st, _)| stat.f_flag & st != 0)
        .fold(0, |flags, (_, ms)| flags | ms))
}

fn mount_from(from: &Path, to: &Path, flags: libc::c_ulong) -> io::Result<()> {
    mount_raw(Some(from.as_os_str().as_bytes()), to, None, flags, None)
}

fn mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    mount_raw(source.map(str::as_bytes), target, fstype, flags, data)
}

fn mount_raw(
    source: Option<&[u8]>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let invalid = |_| io::Error::from(io::ErrorKind::InvalidInput);
    let source = source.map(CString::new).transpose().map_err(invalid)?;
    let target = CString::new(target.as_os_str().as_bytes()).map_err(invalid)?;
    let fstype = fstype.map(CString::new).transpose().map_err(invalid)?;
    let data = data.map(CString::new).transpose().map_err(invalid)?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    check(unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    })
}

/// No core dumps (they would hold guest memory), bounded open files and file sizes; a write past
/// the size bound fails instead of killing the VMM.
fn limit(max_file_bytes: u64, locked_memory_bytes: u64) -> Result<(), JailError> {
    for (resource, value, what) in [
        (libc::RLIMIT_CORE, 0, "core dumps"),
        (libc::RLIMIT_NOFILE, MAX_OPEN_FILES, "open files"),
        (libc::RLIMIT_FSIZE, max_file_bytes, "file sizes"),
        (libc::RLIMIT_MEMLOCK, locked_memory_bytes, "locked memory"),
    ] {
        let limit = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: `limit` is a valid rlimit.
        check(unsafe { libc::setrlimit(resource, &limit) })
            .map_err(step(format!("limit {what}")))?;
    }
    // SAFETY: ignoring SIGXFSZ installs no handler code.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    Ok(())
}

fn set_no_new_privs() -> Result<(), JailError> {
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes integers only.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
        .map_err(step("set no_new_privs"))
}

/// Becomes `ids`, with no supplementary groups. Leaving uid 0 also empties the effective and
/// permitted capability sets.
fn switch_ids(ids: Ids) -> Result<(), JailError> {
    // SAFETY: an empty list: no pointer is read.
    check(unsafe { libc::setgroups(0, std::ptr::null()) })
        .map_err(step("drop the supplementary groups"))?;
    // SAFETY: setresgid and setresuid take integers only.
    check(unsafe { libc::setresgid(ids.gid, ids.gid, ids.gid) })
        .map_err(step(format!("become group {}", ids.gid)))?;
    // SAFETY: as above.
    check(unsafe { libc::setresuid(ids.uid, ids.uid, ids.uid) })
        .map_err(step(format!("become user {}", ids.uid)))
}

/// Makes `cmd` run as a container that dropped every capability runs its processes: its
/// bounding set emptied before it execs, so even as root it holds no capability. `agentos eval`
/// and the tests start agentos that way to see the jail fail closed.
pub fn without_capabilities(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and makes only prctl calls, which are
    // async-signal-safe and touch no memory of the parent's.
    unsafe {
        cmd.pre_exec(|| {
            drop_bounding_and_ambient();
            Ok(())
        })
    };
}

/// Empties the bounding and ambient capability sets.
fn drop_bounding_and_ambient() {
    // The kernel refuses numbers past its last capability; stop there.
    for cap in 0..64 {
        // SAFETY: prctl with integers only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            break;
        }
    }
    // SAFETY: prctl with integers only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
}

/// Empties the effective, permitted and inheritable capability sets.
fn clear_capabilities() -> Result<(), JailError> {
    set_capabilities(0)
}

/// Sets the effective and permitted capability sets to `kept` (capabilities 0 to 31) and
/// empties the inheritable set.
fn set_capabilities(kept: u32) -> Result<(), JailError> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    data[0].effective = kept;
    data[0].permitted = kept;
    // SAFETY: capset reads a v3 header and two data structs, which these are.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    check(rc as libc::c_int).map_err(step("drop the capabilities"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_inside_the_root_keep_their_place_and_refuse_escapes() {
        let root = Path::new("/run/x/jail");
        assert_eq!(
            inside(root, Path::new("/dev/kvm")).unwrap(),
            Path::new("/run/x/jail/dev/kvm")
        );
        for bad in ["relative", "/", "/a/../etc"] {
            assert!(inside(root, Path::new(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_supervisor_exits_as_a_shell_reports_its_vmm() {
        // Wait statuses as the kernel encodes them: exit code in the second byte, or the signal.
        assert_eq!(exit_status(0), 0);
        assert_eq!(exit_status(2 << 8), 2);
        assert_eq!(exit_status(libc::SIGKILL), 128 + libc::SIGKILL);
        assert_eq!(exit_status(libc::SIGSEGV | 0x80), 128 + libc::SIGSEGV);
    }

    #[test]
    fn a_relative_chroot_base_is_refused() {
        assert!(matches!(
            chroot_dir(Path::new("jails")),
            Err(JailError::BadPath(_))
        ));
    }
}
