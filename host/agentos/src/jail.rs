//! The VMM's jail, entered by `agentos vmm` before it opens anything of the guest's or starts a
//! thread: its own mount, network, IPC and UTS namespaces; a private root (a small tmpfs, then
//! `pivot_root`) in which only the kernel and initrds (read-only), the console log, `/dev/kvm`
//! and the VM's run directory exist, at the paths they had; no core dumps, bounded open files and
//! file sizes; `no_new_privs`; and every capability dropped. A guest that takes over its VMM then
//! holds a process that sees one run directory, has no network, cannot gain privileges and holds
//! no capability.
//!
//! Namespaces and mounts need root (CAP_SYS_ADMIN). Without it the VMM says so and runs with
//! the parts that need no privilege (limits, `no_new_privs`).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Open files the VMM may hold: its devices, guest connections and logs.
const MAX_OPEN_FILES: u64 = 4096;
/// The largest file the VMM may write (its console log is bounded below this).
const MAX_FILE_BYTES: u64 = 64 << 20;
/// Size of the tmpfs that becomes the root: directories and empty mount points only.
const ROOT_TMPFS: &str = "size=1m,mode=0755";

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
}

/// What the VMM needs to see inside its jail.
#[derive(Clone, Debug, Default)]
pub struct JailPlan {
    /// Files visible read-only (kernel, initrds).
    pub read_only: Vec<PathBuf>,
    /// Files visible read-write (console log, `/dev/kvm`).
    pub read_write: Vec<PathBuf>,
    /// Directories visible read-write (the run directory: vsock sockets, report).
    pub dirs: Vec<PathBuf>,
}

/// Where the new root is mounted before the pivot: a directory every Linux host has, that holds
/// nothing the jail binds, and that the VMM's own mount namespace may cover (the host's `/proc`
/// is untouched). Using it, the jail leaves no directory behind on the host.
const ROOT_MOUNT_POINT: &str = "/proc";

/// How far the jail went.
#[derive(Debug, PartialEq, Eq)]
pub enum Jailed {
    /// Namespaces, private root, limits, no capabilities.
    Fully,
    /// Limits and `no_new_privs` only: the process may not create namespaces (not root).
    Unprivileged,
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

/// Enters the jail. Call while the process has one thread: mount namespace and root are per
/// process only then.
pub fn enter(plan: &JailPlan) -> Result<Jailed, JailError> {
    let namespaces =
        libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    // SAFETY: unshare takes flags only.
    let jailed = match check(unsafe { libc::unshare(namespaces) }) {
        Ok(()) => {
            private_root(plan)?;
            let name = b"agentos-vmm";
            // SAFETY: the pointer and length describe `name`.
            check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
                .map_err(step("set the jail's host name"))?;
            Jailed::Fully
        }
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Jailed::Unprivileged,
        Err(e) => return Err(step("create the jail's namespaces")(e)),
    };
    limit()?;
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes integers only.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
        .map_err(step("set no_new_privs"))?;
    if jailed == Jailed::Fully {
        drop_capabilities()?;
    }
    Ok(jailed)
}

/// Builds the new root on a tmpfs, bind-mounts what the plan names at its own path, and pivots.
fn private_root(plan: &JailPlan) -> Result<(), JailError> {
    // Nothing mounted from here on propagates back to the host.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )
    .map_err(step("make the mounts private"))?;
    let root = Path::new(ROOT_MOUNT_POINT);
    if let Some(bad) = plan
        .dirs
        .iter()
        .chain(&plan.read_only)
        .chain(&plan.read_write)
        .find(|p| p.starts_with(root))
    {
        return Err(JailError::BadPath(bad.clone()));
    }
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
    for (files, read_only) in [(&plan.read_only, true), (&plan.read_write, false)] {
        // A file in a bound directory is there already (and is the real file: never touched).
        for file in files
            .iter()
            .filter(|f| !plan.dirs.iter().any(|d| f.starts_with(d)))
        {
            let inside = inside(root, file)?;
            if let Some(parent) = inside.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(step(format!("create {}", parent.display())))?;
            }
            // A new, empty mount point on the tmpfs; anything already there is a mistake.
            std::fs::File::options()
                .write(true)
                .create_new(true)
                .open(&inside)
                .map_err(step(format!("create the mount point {}", inside.display())))?;
            bind(file, &inside, read_only)?;
        }
    }
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
        mount_from(
            from,
            to,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
        )
        .map_err(step(format!("make {} read-only", from.display())))?;
    }
    Ok(())
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
fn limit() -> Result<(), JailError> {
    for (resource, value, what) in [
        (libc::RLIMIT_CORE, 0, "core dumps"),
        (libc::RLIMIT_NOFILE, MAX_OPEN_FILES, "open files"),
        (libc::RLIMIT_FSIZE, MAX_FILE_BYTES, "file sizes"),
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

/// Empties the bounding, ambient, effective, permitted and inheritable capability sets.
fn drop_capabilities() -> Result<(), JailError> {
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
    let data = [Data::default(); 2];
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
}
