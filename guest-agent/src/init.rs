//! The duties of PID 1: file systems, host name, loopback, kernel modules, the status port,
//! power-off.

use std::ffi::{CStr, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use agentos_protocol::status;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("cannot mount {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open a console for standard input and output")]
    Stdio(#[source] io::Error),
    #[error("cannot set the host name")]
    Hostname(#[source] io::Error),
    #[error("cannot load kernel module {path}")]
    Module {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

struct Mount {
    fstype: &'static CStr,
    target: &'static CStr,
    flags: libc::c_ulong,
    data: &'static CStr,
}

const NOSUID_NODEV_NOEXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

const PROC: Mount = Mount {
    fstype: c"proc",
    target: c"/proc",
    flags: NOSUID_NODEV_NOEXEC,
    data: c"",
};

/// In order: later targets live inside earlier ones.
const FILE_SYSTEMS: [Mount; 6] = [
    Mount {
        fstype: c"sysfs",
        target: c"/sys",
        flags: NOSUID_NODEV_NOEXEC,
        data: c"",
    },
    Mount {
        fstype: c"devtmpfs",
        target: c"/dev",
        flags: libc::MS_NOSUID,
        data: c"mode=0755",
    },
    Mount {
        fstype: c"devpts",
        target: c"/dev/pts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: c"mode=0620,ptmxmode=0666",
    },
    Mount {
        fstype: c"tmpfs",
        target: c"/dev/shm",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: c"mode=1777",
    },
    Mount {
        fstype: c"tmpfs",
        target: c"/tmp",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: c"mode=1777",
    },
    Mount {
        fstype: c"tmpfs",
        target: c"/run",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: c"mode=0755",
    },
];

/// Optional: programs run fine without it, only resource control inside the guest is lost.
/// `favordynmods` makes moving a process between cgroups cheap (no RCU grace period per move)
/// for a few more instructions per fork and exit. A carrier moves every VMM it starts into a
/// cgroup of its own: each start waited 20-28 ms on that without it (docs/scheduler.md).
const CGROUP2: Mount = Mount {
    fstype: c"cgroup2",
    target: c"/sys/fs/cgroup",
    flags: NOSUID_NODEV_NOEXEC,
    data: c"favordynmods",
};

/// The same, for a kernel that does not know `favordynmods` (before 6.0).
const CGROUP2_PLAIN: Mount = Mount {
    data: c"",
    ..CGROUP2
};

/// Mounts `/proc`, first of all, so that boot timings can be read.
pub fn mount_proc() -> Result<(), InitError> {
    mount(&PROC)
}

/// Mounts the other file systems and makes sure the standard descriptors are open.
pub fn mount_file_systems() -> Result<(), InitError> {
    for fs in &FILE_SYSTEMS {
        mount(fs)?;
    }
    if let Err(err) = mount(&CGROUP2).or_else(|_| mount(&CGROUP2_PLAIN)) {
        console!("continuing without cgroups: {}", crate::describe(&err));
    }
    ensure_stdio()
}

/// Applies the configuration: host name, the loopback interface, then kernel modules in order.
pub fn configure(config: &Config) -> Result<(), InitError> {
    if let Some(name) = &config.hostname {
        set_hostname(name)?;
    }
    // Programs talk to themselves over 127.0.0.1 (a server and its client, a listening daemon);
    // a guest without it still runs everything else.
    if let Err(err) = loopback_up() {
        console!("the loopback interface stays down: {err}");
    }
    for module in &config.modules {
        load_module(module)?;
    }
    make_homes();
    Ok(())
}

/// Makes the missing home directories of the accounts other than root, owned by them: the
/// image holds only root's files.
fn make_homes() {
    let Ok(passwd) = std::fs::read_to_string("/etc/passwd") else {
        return;
    };
    for account in crate::users::accounts(&passwd).filter(|a| a.uid != 0) {
        if account.home.exists() || !account.home.is_absolute() {
            continue;
        }
        let made = std::fs::create_dir_all(&account.home).and_then(|()| {
            std::os::unix::fs::chown(&account.home, Some(account.uid), Some(account.gid))
        });
        if let Err(err) = made {
            console!("cannot make {}: {err}", account.home.display());
        }
    }
}

fn mount(fs: &Mount) -> Result<(), InitError> {
    let target = Path::new(OsStr::from_bytes(fs.target.to_bytes()));
    let error = |source| InitError::Mount {
        fstype: fs.fstype.to_str().unwrap_or_default(),
        target: target.to_owned(),
        source,
    };
    fs::create_dir_all(target).map_err(error)?;
    mount_at(fs.fstype, fs.target, fs.fstype, fs.flags, Some(fs.data)).map_err(error)
}

/// mount(2): `source` of type `fstype` on the existing directory `target`.
pub fn mount_at(
    source: &CStr,
    target: &CStr,
    fstype: &CStr,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> io::Result<()> {
    // SAFETY: every pointer is a NUL-terminated string that outlives the call (or null for no
    // options); mount(2) only reads them.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel opens `/dev/console` as fds 0-2 of init, but leaves them closed when the initramfs
/// has no `/dev/console`. A closed fd 2 would let the next socket take its number, and console logs
/// would then corrupt the protocol stream.
fn ensure_stdio() -> Result<(), InitError> {
    for fd in 0..=2 {
        // SAFETY: F_GETFD only inspects the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1 {
            continue;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/console")
            .or_else(|_| OpenOptions::new().read(true).write(true).open("/dev/null"))
            .map_err(InitError::Stdio)?;
        // Deliberately leaked: lower fds are open and nothing else runs yet, so open(2) handed out
        // exactly `fd`, which must stay open for the life of the agent.
        let _ = file.into_raw_fd();
    }
    Ok(())
}

/// Sets `lo` up: the kernel creates it down.
fn loopback_up() -> io::Result<()> {
    // SAFETY: socket(2) with constant arguments; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a descriptor socket(2) just returned, owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero bytes are a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (to, from) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *to = *from as libc::c_char;
    }
    // SAFETY: `request` is a live ifreq naming an interface; SIOCGIFFLAGS writes its flags.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the union's flags member, which is read and written here.
    unsafe { request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above; SIOCSIFFLAGS reads the ifreq.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_hostname(name: &str) -> Result<(), InitError> {
    // SAFETY: the pointer and length describe a live byte slice that the kernel copies.
    let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if rc != 0 {
        return Err(InitError::Hostname(io::Error::last_os_error()));
    }
    Ok(())
}

fn load_module(path: &Path) -> Result<(), InitError> {
    let error = |source| InitError::Module {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(error)?;
    // SAFETY: finit_module reads the module through a descriptor we own; the parameter string is an
    // empty NUL-terminated static.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), c"".as_ptr(), 0) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EEXIST) {
            return Err(error(err));
        }
    }
    Ok(())
}

/// Writes one byte to the VMM's status port. Outside a VM that has the port the write goes nowhere.
#[cfg(target_arch = "x86_64")]
pub fn report(value: u8) {
    let port = libc::c_ulong::from(status::PORT);
    // SAFETY: ioperm only changes this thread's I/O permission bitmap.
    if unsafe { libc::ioperm(port, 1, 1) } != 0 {
        return;
    }
    // SAFETY: ioperm just granted this thread the port, so `out` cannot fault; it touches no memory.
    unsafe {
        std::arch::asm!(
            "out dx, al",
            in("dx") status::PORT,
            in("al") value,
            options(nomem, nostack, preserves_flags),
        );
    }
    // SAFETY: as above. Revoking keeps programs spawned from this thread from inheriting the port.
    unsafe { libc::ioperm(port, 1, 0) };
}

#[cfg(not(target_arch = "x86_64"))]
pub fn report(_value: u8) {}

/// Why PID 1 turns the VM off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerOff {
    Requested,
    Failed,
}

/// Resets the VM (`reboot=k` makes it an i8042 reset, which ends the VMM). Returns only if the
/// kernel refused; the caller then exits, which panics the kernel and ends the VM all the same.
pub fn power_off(why: PowerOff) {
    if why == PowerOff::Requested {
        // SAFETY: kill takes no pointers; -1 reaches every process but PID 1 itself.
        unsafe { libc::kill(-1, libc::SIGKILL) };
    }
    // SAFETY: sync takes no arguments.
    unsafe { libc::sync() };
    report(match why {
        PowerOff::Requested => status::SHUTDOWN,
        PowerOff::Failed => status::FAILED,
    });
    // SAFETY: reboot takes no pointers; RB_AUTOBOOT restarts without touching our memory.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    console!("reboot refused: {}", io::Error::last_os_error());
}
