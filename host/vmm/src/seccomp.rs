//! System-call filters: each VMM thread may make only the system calls its work needs, so that a
//! guest that takes over a thread (through a device bug) holds a thread that can do little else.
//!
//! Three roles, each with its own allowlist, installed by the thread itself before the guest
//! runs: a vCPU thread (runs `KVM_RUN` and the device code of port and MMIO exits), the VMM
//! thread (the device event loop: vsock sockets, interrupts, the console; then the report), and
//! the signal thread (waits for a stop signal). A call outside the list raises `SIGSYS`; its
//! handler writes one line naming the call and the thread to stderr and ends the process with
//! [`EXIT_BAD_SYSCALL`], so whoever started the VMM can say why it died. The lists and the
//! reason for each call are in `docs/security.md`.

use std::cell::Cell;
use std::collections::BTreeMap;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_irq_routing, kvm_irqchip, kvm_irqfd,
    kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave,
};
use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

/// How a VMM killed by its filter exits: 128 + SIGSYS, as a shell reports a death by `SIGSYS`.
pub const EXIT_BAD_SYSCALL: i32 = 128 + libc::SIGSYS;

const KVMIO: u32 = 0xAE;
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
// What a snapshot reads of the stopped vCPUs and of the VM.
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
// What a vCPU thread of a VM with passed-through devices does when the guest turns MSI on or
// off: the VM's routes, an irqfd, the device's interrupts (VFIO's `_IO(';', 100 + 10)`).
ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);
ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, 0x3b, 110);

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot compile the {0} thread's seccomp filter")]
    Compile(&'static str, #[source] BackendError),
    #[error("cannot install the {0} thread's seccomp filter")]
    Install(&'static str, #[source] seccompiler::Error),
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
}

/// Which thread a filter is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The VMM's own thread: device event loop, then the report.
    Vmm = 1,
    /// A vCPU thread.
    Vcpu = 2,
    /// The thread that waits for stop signals.
    Signals = 3,
}

impl Role {
    /// The role stored by [`Role`] `as u8` (for the SIGSYS handler, which reads a thread-local).
    fn from_u8(value: u8) -> Option<Self> {
        [Role::Vmm, Role::Vcpu, Role::Signals]
            .into_iter()
            .find(|r| *r as u8 == value)
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Vmm => "vmm",
            Role::Vcpu => "vcpu",
            Role::Signals => "signals",
        }
    }
}

/// The compiled filters of every role.
pub struct SeccompFilters {
    vmm: BpfProgram,
    vcpu: BpfProgram,
    signals: BpfProgram,
}

impl SeccompFilters {
    /// Compiles the filters for this process (the VMM thread may signal only its own threads):
    /// call it in the process that runs the VM.
    pub fn new() -> Result<Self, SeccompError> {
        Self::for_vm(false)
    }

    /// The filters for a VM with passed-through PCI devices (`passthrough`) or without: the
    /// vCPU threads of the former also read and write the devices' configuration space and
    /// trapped BARs through VFIO ([`VCPU_PASSTHROUGH`]).
    pub fn for_vm(passthrough: bool) -> Result<Self, SeccompError> {
        Ok(Self {
            vmm: compile(Role::Vmm, passthrough)?,
            vcpu: compile(Role::Vcpu, passthrough)?,
            signals: compile(Role::Signals, passthrough)?,
        })
    }

    /// Installs `role`'s filter on the calling thread (and `no_new_privs`, which it needs). Threads
    /// the caller starts afterwards inherit it.
    pub fn install(&self, role: Role) -> Result<(), SeccompError> {
        install_bad_syscall_handler()?;
        let program = match role {
            Role::Vmm => &self.vmm,
            Role::Vcpu => &self.vcpu,
            Role::Signals => &self.signals,
        };
        THREAD_ROLE.with(|r| r.set(role as u8));
        seccompiler::apply_filter(program).map_err(|e| SeccompError::Install(role.name(), e))
    }
}

/// Calls every thread makes: memory for its heap (glibc grows a thread's arena with `mprotect`;
/// `mmap` and `mprotect` are allowed only without `PROT_EXEC`, see [`no_exec`]), locks, the time when the vDSO cannot give it, returning from signal handlers (the vCPU kick,
/// SIGSYS) and resuming a timed wait a freeze (`agentos pause`) interrupted, the alternate
/// signal stack Rust sets up and removes per thread, lines logged on stderr, and the end of the
/// thread or process.
const EVERY_THREAD: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_clock_gettime,
    libc::SYS_rt_sigreturn,
    libc::SYS_restart_syscall,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_write,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The vCPU thread: `KVM_RUN`; the registers of a vCPU that died, for the report; and the device
/// code a port or MMIO exit runs: eventfd and console writes (in [`EVERY_THREAD`]), and a virtio
/// reset, which closes the device's host connections (`close`, `epoll_ctl` delete, `timerfd`).
const VCPU: &[i64] = &[libc::SYS_close, libc::SYS_timerfd_settime];

/// vCPU threads of a VM with passed-through PCI devices: a guest access to a device's
/// configuration space or to a BAR that is not mapped into the guest is a read or write at an
/// offset of the device's VFIO file.
const VCPU_PASSTHROUGH: &[i64] = &[libc::SYS_pread64, libc::SYS_pwrite64];

/// The VMM thread: the event loop, the block devices and the vsock device's host side. It waits
/// (`epoll_wait`), reads eventfds, timers and host sockets (`read`, `recvfrom`; writes with
/// `write`, `sendto`), reads disk files at an offset (`pread64`),
/// accepts host clients (`accept4`, then `FIONBIO`),
/// connects guest-initiated connections to `<uds>_<port>` sockets (`socket` of `AF_UNIX` streams
/// only, `connect`), half-closes and closes them, watches them (`epoll_ctl`), arms the sweep
/// timer; at the end it stops the vCPU threads (a signal to each, `tgkill` of this process with
/// the kick signal only, after glibc's `getpid`; waiting a little between kicks), removes its
/// listening socket, reads its own peak memory (`getrusage` of itself) and writes the report to
/// a file opened before the filter. Asked for a
/// snapshot, it reads the stopped vCPUs' and the VM's state (`KVM_GET_*` ioctls, read-only) and
/// writes the snapshot files opened before the filter (`pwrite64`, `ftruncate`, `fdatasync`).
const VMM: &[i64] = &[
    libc::SYS_pwrite64,
    libc::SYS_ftruncate,
    libc::SYS_fdatasync,
    libc::SYS_getpid,
    libc::SYS_clock_nanosleep,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
    // The block devices read their host files at the guest's sector offsets.
    libc::SYS_pread64,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_shutdown,
    libc::SYS_close,
    libc::SYS_timerfd_settime,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_unlink,
];

/// The signal thread: it only waits for a stop signal, then wakes the VMM thread.
const SIGNALS: &[i64] = &[libc::SYS_rt_sigtimedwait];

fn rules(role: Role, passthrough: bool) -> Result<BTreeMap<i64, Vec<SeccompRule>>, BackendError> {
    let only = |index: u8, value: u64| -> Result<SeccompRule, BackendError> {
        SeccompRule::new(vec![SeccompCondition::new(
            index,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            value,
        )?])
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        EVERY_THREAD.iter().map(|&nr| (nr, Vec::new())).collect();
    let unconditional = match role {
        Role::Vcpu => VCPU,
        Role::Vmm => VMM,
        Role::Signals => SIGNALS,
    };
    rules.extend(unconditional.iter().map(|&nr| (nr, Vec::new())));
    if passthrough && role == Role::Vcpu {
        rules.extend(VCPU_PASSTHROUGH.iter().map(|&nr| (nr, Vec::new())));
    }
    for call in [libc::SYS_mmap, libc::SYS_mprotect] {
        rules.insert(call, vec![no_exec()?]);
    }
    // Rust's standard library, built with debug assertions, checks that a descriptor it closes
    // is open (`fcntl(F_GETFD)`); the vCPU and VMM threads close descriptors.
    if role != Role::Signals {
        rules.insert(libc::SYS_fcntl, vec![only(1, libc::F_GETFD as u64)?]);
    }
    match role {
        Role::Vcpu => {
            let mut ioctls = vec![KVM_RUN(), KVM_GET_REGS(), KVM_GET_SREGS()];
            if passthrough {
                ioctls.extend([KVM_SET_GSI_ROUTING(), KVM_IRQFD(), VFIO_DEVICE_SET_IRQS()]);
            }
            rules.insert(
                libc::SYS_ioctl,
                ioctls
                    .iter()
                    .map(|&request| only(1, u64::from(request as u32)))
                    .collect::<Result<_, _>>()?,
            );
            rules.insert(
                libc::SYS_epoll_ctl,
                vec![only(1, libc::EPOLL_CTL_DEL as u64)?],
            );
        }
        Role::Vmm => {
            let snapshot_reads = [
                KVM_GET_REGS(),
                KVM_GET_SREGS(),
                KVM_GET_MP_STATE(),
                KVM_GET_XSAVE(),
                KVM_GET_XCRS(),
                KVM_GET_DEBUGREGS(),
                KVM_GET_LAPIC(),
                KVM_GET_CPUID2(),
                KVM_GET_MSRS(),
                KVM_GET_VCPU_EVENTS(),
                KVM_GET_IRQCHIP(),
                KVM_GET_PIT2(),
                KVM_GET_CLOCK(),
            ];
            let mut ioctls = vec![only(1, libc::FIONBIO)?];
            for request in snapshot_reads {
                ioctls.push(only(1, u64::from(request as u32))?);
            }
            rules.insert(libc::SYS_ioctl, ioctls);
            let unix_stream = SeccompRule::new(vec![
                SeccompCondition::new(
                    0,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    libc::AF_UNIX as u64,
                )?,
                SeccompCondition::new(
                    1,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    (libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as u64,
                )?,
            ])?;
            rules.insert(libc::SYS_socket, vec![unix_stream]);
            // SAFETY: getpid has no preconditions.
            let pid = unsafe { libc::getpid() };
            let kick_own_thread = SeccompRule::new(vec![
                SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, pid as u64)?,
                SeccompCondition::new(
                    2,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    libc::SIGRTMIN() as u64,
                )?,
            ])?;
            rules.insert(libc::SYS_tgkill, vec![kick_own_thread]);
            // The report gives the process's peak memory (its own usage only).
            rules.insert(
                libc::SYS_getrusage,
                vec![only(0, libc::RUSAGE_SELF as u64)?],
            );
        }
        Role::Signals => {}
    }
    Ok(rules)
}

/// Memory protection without `PROT_EXEC` (the third argument of `mmap` and `mprotect`): once
/// the guest runs, no thread maps new code, so code injected into a data page can never run.
fn no_exec() -> Result<SeccompRule, BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
        0,
    )?])
}

fn compile(role: Role, passthrough: bool) -> Result<BpfProgram, SeccompError> {
    let compile = || -> Result<BpfProgram, BackendError> {
        SeccompFilter::new(
            rules(role, passthrough)?,
            SeccompAction::Trap,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )?
        .try_into()
    };
    compile().map_err(|e| SeccompError::Compile(role.name(), e))
}

thread_local! {
    /// The role whose filter this thread runs under, for the SIGSYS handler's message.
    static THREAD_ROLE: Cell<u8> = const { Cell::new(0) };
}

fn install_bad_syscall_handler() -> Result<(), SeccompError> {
    static INSTALLED: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        // SAFETY: sigaction is plain data; zeroed is a valid empty mask and no flags.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_bad_syscall as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        // SAFETY: installs a handler for SIGSYS; `action` is valid and the old action is not read.
        let rc = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        }
    });
    result.map_err(|errno| SeccompError::Handler(std::io::Error::from_raw_os_error(errno)))
}

/// `si_code` of a `SIGSYS` raised by a seccomp filter.
const SYS_SECCOMP: libc::c_int = 1;

/// The `SIGSYS` fields of `siginfo_t` on x86_64: after signo, errno, code and padding come the
/// address of the call, its number and the architecture.
#[repr(C)]
struct SigsysInfo {
    _signo: libc::c_int,
    _errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    _call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    _arch: libc::c_uint,
}

/// A line assembled without allocating, as a signal handler must.
struct Line {
    buf: [u8; 192],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let room = self.buf.len() - self.len;
        let n = bytes.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, mut value: u32) {
        let mut digits = [0u8; 10];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

extern "C" fn on_bad_syscall(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel hands a SIGSYS handler a valid siginfo_t, whose SIGSYS fields are laid
    // out as `SigsysInfo` on x86_64.
    let info = unsafe { &*(info as *const SigsysInfo) };
    let role = THREAD_ROLE.with(Cell::get);
    let mut line = Line {
        buf: [0; 192],
        len: 0,
    };
    if info.code == SYS_SECCOMP {
        line.push(b"agentos-vmm: killed by its seccomp filter: system call ");
        line.push_number(info.syscall as u32);
        if let Some(name) = syscall_name(i64::from(info.syscall)) {
            line.push(b" (");
            line.push(name.as_bytes());
            line.push(b")");
        }
    } else {
        line.push(b"agentos-vmm: killed by a SIGSYS sent to it");
    }
    line.push(b" on the ");
    line.push(
        Role::from_u8(role)
            .map_or("unfiltered", Role::name)
            .as_bytes(),
    );
    line.push(b" thread\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `line.buf` holds `line.len` bytes.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(EXIT_BAD_SYSCALL);
    }
}

/// Names of the calls a compromised VMM would most likely try, for the handler's message.
fn syscall_name(nr: i64) -> Option<&'static str> {
    Some(match nr {
        libc::SYS_read => "read",
        libc::SYS_open => "open",
        libc::SYS_openat => "openat",
        libc::SYS_openat2 => "openat2",
        libc::SYS_stat => "stat",
        libc::SYS_newfstatat => "newfstatat",
        libc::SYS_statx => "statx",
        libc::SYS_socket => "socket",
        libc::SYS_connect => "connect",
        libc::SYS_bind => "bind",
        libc::SYS_listen => "listen",
        libc::SYS_accept4 => "accept4",
        libc::SYS_sendto => "sendto",
        libc::SYS_recvfrom => "recvfrom",
        libc::SYS_sendmsg => "sendmsg",
        libc::SYS_recvmsg => "recvmsg",
        libc::SYS_ioctl => "ioctl",
        libc::SYS_clone => "clone",
        libc::SYS_clone3 => "clone3",
        libc::SYS_fork => "fork",
        libc::SYS_vfork => "vfork",
        libc::SYS_execve => "execve",
        libc::SYS_execveat => "execveat",
        libc::SYS_kill => "kill",
        libc::SYS_tgkill => "tgkill",
        libc::SYS_ptrace => "ptrace",
        libc::SYS_mount => "mount",
        libc::SYS_umount2 => "umount2",
        libc::SYS_unshare => "unshare",
        libc::SYS_setns => "setns",
        libc::SYS_chdir => "chdir",
        libc::SYS_mkdir => "mkdir",
        libc::SYS_mkdirat => "mkdirat",
        libc::SYS_unlink => "unlink",
        libc::SYS_unlinkat => "unlinkat",
        libc::SYS_rename => "rename",
        libc::SYS_renameat2 => "renameat2",
        libc::SYS_prctl => "prctl",
        libc::SYS_setuid => "setuid",
        libc::SYS_setgid => "setgid",
        libc::SYS_getrandom => "getrandom",
        libc::SYS_process_vm_readv => "process_vm_readv",
        libc::SYS_process_vm_writev => "process_vm_writev",
        libc::SYS_bpf => "bpf",
        libc::SYS_perf_event_open => "perf_event_open",
        libc::SYS_io_uring_setup => "io_uring_setup",
        libc::SYS_userfaultfd => "userfaultfd",
        libc::SYS_memfd_create => "memfd_create",
        libc::SYS_mknodat => "mknodat",
        libc::SYS_chmod => "chmod",
        libc::SYS_fchmodat => "fchmodat",
        libc::SYS_fchownat => "fchownat",
        libc::SYS_epoll_ctl => "epoll_ctl",
        libc::SYS_epoll_wait => "epoll_wait",
        libc::SYS_nanosleep => "nanosleep",
        libc::SYS_clock_nanosleep => "clock_nanosleep",
        libc::SYS_close => "close",
        libc::SYS_mmap => "mmap",
        libc::SYS_mprotect => "mprotect",
        _ => return None,
    })
}
