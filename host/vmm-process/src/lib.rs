//! `agentos-vmm`: one VMM process running one microVM until it ends. The binary holds the VMM,
//! its jail and its seccomp filters and nothing else (no daemon, image builder or benchmarks):
//! it is the process a guest that broke out of KVM would hold. `agentos vmm` runs the same code.
//!
//! Exit status: 0 when the guest shut down (or the VMM was stopped by SIGINT/SIGTERM), 2 when the
//! guest crashed (kernel panic, agent failure, unexpected reset), 1 when the VMM failed, 128 + N
//! when the jailed VMM was killed by signal N (its supervisor, this process, reports it as a shell
//! would), 159 (128 + SIGSYS) when a VMM thread made a system call outside its seccomp filter
//! (the VMM's last line on stderr names the call and the thread). With `--report`, a JSON report
//! of the run is written on exit.
//!
//! The files the VMM writes outside its own directory, the console log and the report, are
//! opened here before the jail, as whoever started the VMM, and never through a symlink;
//! the jail then holds only the directory of `--vsock-uds`, which must be the VMM's user's own.
//!
//! Snapshots: with `--snapshot-to DIR`, SIGUSR1 makes the VMM pause the guest, write it to
//! `DIR/memory` and `DIR/vm.state` (both opened here, before the jail), and end with the outcome
//! `snapshotted` (exit status 0). `--from DIR` runs a VM from such a snapshot instead of booting
//! a kernel.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use agentos_jail::JailError;
use agentos_jail::{self as jail, JailLevel, JailPlan};
use agentos_vmm::builder::BuildError;
use agentos_vmm::builder::{build_vm, restore_vm};
use agentos_vmm::config::{
    ConsoleConfig, DiskConfig, PmemConfig, RestoreConfig, SnapshotFiles, VmConfig, VsockConfig,
};
use agentos_vmm::devices::pci::passthrough::SYSFS_PCI_DEVICES;
use agentos_vmm::devices::pci::{PassedDevice, PciAddress};
use agentos_vmm::exit::{ExitReason, ExitSignal};
use agentos_vmm::seccomp::SeccompError;
use agentos_vmm::seccomp::{Role, SeccompFilters};
use agentos_vmm::snapshot::{MEMORY_FILE, STATE_FILE};
use agentos_vmm::vmm::VmmError;
use agentos_vmm::vmm::{MetricsSnapshot, Outcome, RunReport};

use serde::{Deserialize, Serialize};

/// Why the VMM process did not run its VM to the end.
#[derive(Debug, thiserror::Error)]
pub enum VmmProcessError {
    #[error("cannot open {} (is {} a snapshot directory?)", .path.display(), .dir.display())]
    SnapshotFile {
        path: PathBuf,
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("give --kernel, or --from a snapshot")]
    NoKernel,
    #[error("cannot join the cgroup through {}", .0.display())]
    Cgroup(PathBuf, #[source] io::Error),
    #[error("--cgroup-procs takes a cgroup's `cgroup.procs` file, not {}", .0.display())]
    NotCgroupProcs(PathBuf),
    #[error("cannot block stop signals")]
    SignalMask,
    #[error("cannot start the signal thread")]
    SignalThread(#[source] io::Error),
    #[error(
        "--snapshot-to {} is the snapshot the VM is restored from: give another directory",
        .0.display()
    )]
    SnapshotToSource(PathBuf),
    #[error("--snapshot-to {}: no such directory", .0.display())]
    NoSnapshotDir(PathBuf),
    #[error("cannot replace {}", .0.display())]
    Replace(PathBuf, #[source] io::Error),
    #[error("cannot open the disk {}", .0.display())]
    Disk(PathBuf, #[source] io::Error),
    #[error("cannot open the pmem file {}", .0.display())]
    Pmem(PathBuf, #[source] io::Error),
    #[error("cannot find {}", .0.display())]
    Find(PathBuf, #[source] io::Error),
    #[error("{} names no file", .0.display())]
    NoFileName(PathBuf),
    #[error("cannot create {}", .0.display())]
    Create(PathBuf, #[source] io::Error),
    #[error("cannot open {} (a symlink is refused)", .0.display())]
    Open(PathBuf, #[source] io::Error),
    #[error(
        "{address}: no such PCI device here, or it has no IOMMU group (is the IOMMU on? see `agentos doctor`)"
    )]
    PciGroup {
        address: PciAddress,
        #[source]
        source: io::Error,
    },
    #[error("cannot jail the VMM (`--no-jail` runs it unconfined, unsafely)")]
    Jail(#[source] JailError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error("cannot build the VM")]
    Build(#[source] BuildError),
    #[error("cannot restore the snapshot")]
    Restore(#[source] BuildError),
    #[error("the VM failed")]
    Run(#[source] VmmError),
    #[error("cannot write the report")]
    Report(#[source] io::Error),
}

/// Logs to stderr as `AGENTOS_LOG` says (default `warn`, without `vfio-ioctls`' warning about
/// each optional interrupt kind a device lacks), each line with the process's uptime: how
/// `agentos-vmm` and `agentos` log.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AGENTOS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,vfio_ioctls=error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_timer(tracing_subscriber::fmt::time::uptime())
        .init();
}

/// Exit statuses of `agentos-vmm`.
pub const EXIT_CRASHED: i32 = 2;
pub const EXIT_FAILED: i32 = 1;

/// The device the VMM opens to create its VM.
const KVM_DEVICE: &str = "/dev/kvm";
/// The VFIO container a VM with passed-through devices opens.
const VFIO_CONTAINER: &str = "/dev/vfio/vfio";

#[derive(clap::Args, Debug, Clone)]
pub struct VmmArgs {
    /// Guest kernel: a bzImage, or an ELF with a PVH entry note.
    #[arg(long, required_unless_present = "from")]
    pub kernel: Option<PathBuf>,
    /// Run the VM saved in this snapshot directory (see --snapshot-to) instead of booting a
    /// kernel: its vCPUs, memory and devices come from the snapshot; give it the same --disk
    /// files, the same --pmem files and a --vsock-uds if it had a vsock device.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd", "cmdline", "vcpus", "memory"])]
    pub from: Option<PathBuf>,
    /// On SIGUSR1, save the VM to DIR (`memory` and `vm.state`, created here before the jail,
    /// never through a symlink) and end. DIR must exist; the files are empty until then.
    #[arg(long, value_name = "DIR")]
    pub snapshot_to: Option<PathBuf>,
    /// Initial ramdisk; repeat to append more cpio archives (loaded end to end).
    #[arg(long)]
    pub initrd: Vec<PathBuf>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u64,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Append the serial console to this file (opened before the jail, never through a symlink).
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// Copy the serial console to stdout.
    #[arg(long)]
    pub console: bool,
    /// Give the guest a vsock device whose host side is Unix sockets at this path. Its directory
    /// is the one the jail keeps: it must belong to the VMM's user (--uid), or to you when not
    /// root.
    #[arg(long)]
    pub vsock_uds: Option<PathBuf>,
    /// The guest's vsock CID.
    #[arg(long, default_value_t = 3)]
    pub cid: u64,
    /// Give the guest a read-only disk over this file (a whole number of 512-byte sectors,
    /// opened before the jail): the first is the guest's /dev/vda with serial `disk0`, the
    /// next /dev/vdb with `disk1`, and so on. Repeat for more, at most 8.
    #[arg(long, value_name = "PATH")]
    pub disk: Vec<PathBuf>,
    /// Give the guest a read-only virtio-pmem region over this file (a non-zero multiple of
    /// 2 MiB, opened before the jail), mapped from the host's page cache: the first is the
    /// guest's /dev/pmem0, the next /dev/pmem1, and so on. Repeat for more, at most 4.
    #[arg(long, value_name = "PATH")]
    pub pmem: Vec<PathBuf>,
    /// Pass the host PCI function at ADDRESS (as sysfs names it, `vfio:0000:01:00.0`) to the
    /// guest, on its PCI bus: bound to vfio-pci, its IOMMU group viable (see `agentos doctor`).
    /// Repeat for more. `vfio:ADDRESS,mmap=off` traps every access to the function's BARs
    /// instead of mapping them into the guest. The jail holds /dev/vfio/vfio, the function's group node and its sysfs
    /// directory (read-only), and may lock the guest's memory, which the device's DMA pins.
    #[arg(long = "device", value_name = "vfio:ADDRESS[,mmap=off]", value_parser = parse_device, conflicts_with = "from")]
    pub devices: Vec<PassedDevice>,
    /// Write a JSON report of the run here when the VM ends (the file is opened before the jail,
    /// never through a symlink).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Run without the jail (PID and other namespaces, private root, unprivileged user, no
    /// capabilities): UNSAFE, for debugging. Without it, a jail that cannot be built stops the
    /// VMM.
    #[arg(long)]
    pub no_jail: bool,
    /// The user the VMM runs as in the full jail (root only; 65534: `nobody`). It owns the
    /// directory of --vsock-uds and gets a /dev/kvm node of its own inside the jail. `agentos
    /// run` and the daemon give each VM a user of its own.
    #[arg(long, default_value_t = jail::DEFAULT_ID)]
    pub uid: u32,
    /// The group the VMM runs as in the full jail (65534: `nogroup`), with no supplementary
    /// groups.
    #[arg(long, default_value_t = jail::DEFAULT_ID)]
    pub gid: u32,
    /// Build the jail's root in DIR/<pid> (removed when the VMM ends) instead of over /proc in
    /// the VMM's own mount namespace (the default, which leaves nothing on the host).
    #[arg(long, value_name = "DIR")]
    pub chroot_base: Option<PathBuf>,
    /// Run without the seccomp filters (each VMM thread limited to the system calls it needs):
    /// UNSAFE, for debugging.
    #[arg(long)]
    pub no_seccomp: bool,
    /// A cgroup's `cgroup.procs` to move this process into first, before it starts a thread or
    /// maps guest memory (repeatable: one per hierarchy). Every thread of the VMM, its vCPUs
    /// included, then runs in that cgroup.
    #[arg(long, value_name = "FILE")]
    pub cgroup_procs: Vec<PathBuf>,
}

/// How a VM ended, as a report says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportOutcome {
    /// The guest powered off.
    Shutdown,
    /// The guest crashed: kernel panic, agent failure, unexpected reset.
    Crashed,
    /// The VMM failed.
    Failed,
    /// SIGINT, SIGTERM or SIGHUP stopped the VM.
    Stopped,
    /// The VM was saved to its `--snapshot-to` directory.
    Snapshotted,
}

impl ReportOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Shutdown => "shutdown",
            Self::Crashed => "crashed",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
            Self::Snapshotted => "snapshotted",
        }
    }
}

/// What `--report` contains.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmmReport {
    pub outcome: ReportOutcome,
    /// Why the guest crashed or the VMM failed.
    pub error: Option<String>,
    /// Milliseconds from VMM start to the guest agent's milestones.
    pub init_started_ms: Option<u64>,
    pub ready_ms: Option<u64>,
    pub console_tail: Vec<String>,
    #[serde(default)]
    pub metrics: serde_json::Value,
    /// The most memory the VMM process held at once, in KiB (see `RunReport::peak_rss_kib`).
    #[serde(default)]
    pub peak_rss_kib: Option<u64>,
    /// The jail the VMM ran in (absent in reports of older VMMs).
    #[serde(default)]
    pub jail: Option<JailLevel>,
}

/// What the VMM runs: a kernel to boot, or a snapshot to restore; with the files opened before
/// the jail.
enum Start {
    Boot(VmConfig),
    Restore(RestoreConfig),
}

impl VmmArgs {
    fn start(
        &self,
        console_log: Option<std::fs::File>,
        devices: Devices,
        snapshot_to: Option<SnapshotFiles>,
    ) -> Result<Start, VmmProcessError> {
        let Devices { disks, pmem } = devices;
        let console = ConsoleConfig {
            log: console_log,
            stdout: self.console,
        };
        if let Some(dir) = &self.from {
            let open = |name: &str| {
                let path = dir.join(name);
                std::fs::File::open(&path).map_err(|source| VmmProcessError::SnapshotFile {
                    path: path.clone(),
                    dir: dir.clone(),
                    source,
                })
            };
            return Ok(Start::Restore(RestoreConfig {
                state: open(STATE_FILE)?,
                memory: open(MEMORY_FILE)?,
                console,
                vsock_uds: self.vsock_uds.clone(),
                disks,
                pmem,
                snapshot_to,
            }));
        }
        let kernel = self.kernel.clone().ok_or(VmmProcessError::NoKernel)?;
        Ok(Start::Boot(VmConfig {
            vcpus: self.vcpus,
            memory_mib: self.memory,
            kernel,
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            console,
            vsock: self.vsock_uds.clone().map(|uds_path| VsockConfig {
                guest_cid: self.cid,
                uds_path,
            }),
            disks,
            pmem,
            pci_devices: self.devices.clone(),
            snapshot_to,
        }))
    }
}

/// `vfio:ADDRESS[,mmap=off]`, the one kind of device there is.
fn parse_device(text: &str) -> Result<PassedDevice, String> {
    PassedDevice::from_spec(text).map_err(|e| e.to_string())
}

/// The IOMMU group of each passed-through function (its node is `/dev/vfio/<group>`).
fn iommu_groups(devices: &[PassedDevice]) -> Result<Vec<u32>, VmmProcessError> {
    devices
        .iter()
        .map(|&PassedDevice { address, .. }| {
            let link = Path::new(SYSFS_PCI_DEVICES)
                .join(address.to_string())
                .join("iommu_group");
            let bad = |source| VmmProcessError::PciGroup { address, source };
            let target = std::fs::read_link(&link).map_err(bad)?;
            target
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| bad(io::Error::from(io::ErrorKind::InvalidData)))
        })
        .collect()
}

/// Signals that stop the VM cleanly. They are blocked in every thread and taken by one thread
/// with `sigwait`, so a vCPU thread is never interrupted by them.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
/// The signal that saves the VM to its `--snapshot-to` directory and ends it.
pub const SNAPSHOT_SIGNAL: libc::c_int = libc::SIGUSR1;

fn stop_signal_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for signal in STOP_SIGNALS.into_iter().chain([SNAPSHOT_SIGNAL]) {
        // SAFETY: `set` is valid and `signal` a real signal number.
        unsafe { libc::sigaddset(&mut set, signal) };
    }
    set
}

fn spawn_signal_thread(
    exit: Arc<ExitSignal>,
    can_snapshot: bool,
    filters: Option<Arc<SeccompFilters>>,
) -> Result<(), VmmProcessError> {
    let set = stop_signal_set();
    // SAFETY: blocks the stop signals in this thread; threads spawned later inherit the mask.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(VmmProcessError::SignalMask);
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(filters) = filters
                && let Err(e) = filters.install(Role::Signals)
            {
                tracing::error!("{e}");
                exit.request(ExitReason::Stopped);
                return;
            }
            loop {
                let mut signal = 0;
                // SAFETY: `set` is a valid signal set and `signal` a valid out pointer.
                if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
                    return;
                }
                match signal {
                    SNAPSHOT_SIGNAL if can_snapshot => exit.request(ExitReason::Snapshot),
                    SNAPSHOT_SIGNAL => {
                        tracing::warn!("asked for a snapshot, but no --snapshot-to was given")
                    }
                    _ => return exit.request(ExitReason::Stopped),
                }
            }
        })
        .map_err(VmmProcessError::SignalThread)?;
    Ok(())
}

pub fn run(args: &VmmArgs, started: Instant) -> Result<i32, VmmProcessError> {
    // Still one thread, so the whole process moves.
    join_cgroups(&args.cgroup_procs)?;
    // The VMM must not outlive whoever started it.
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number; no memory is involved.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
    let args = &absolute(args)?;
    // Opened before the jail, as whoever started us: the VMM's user is given nothing but its
    // own directory.
    let console_log = args
        .console_log
        .as_deref()
        .map(|path| open_nofollow(path, libc::O_APPEND))
        .transpose()?;
    let report_file = args
        .report
        .as_deref()
        .map(|path| open_nofollow(path, libc::O_TRUNC))
        .transpose()?;
    let devices = Devices {
        disks: open_disks(&args.disk)?,
        pmem: open_pmem(&args.pmem)?,
    };
    if let (Some(from), Some(to)) = (&args.from, &args.snapshot_to)
        && std::fs::canonicalize(from).ok() == std::fs::canonicalize(to).ok()
    {
        return Err(VmmProcessError::SnapshotToSource(to.clone()));
    }
    let snapshot_to = args
        .snapshot_to
        .as_deref()
        .map(open_snapshot_files)
        .transpose()?;
    let groups = iommu_groups(&args.devices)?;
    let start = args.start(console_log, devices, snapshot_to)?;
    let jail = if args.no_jail {
        tracing::warn!("running without the jail (--no-jail): unsafe, for debugging only");
        JailLevel::None
    } else {
        // Still one thread here, as entering the jail needs. This process stays outside as the
        // VMM's supervisor and only the VMM, its child, returns; any layer that cannot be
        // applied is an error, and the VMM does not run.
        let level = jail::enter(&jail_plan(args, &groups)).map_err(VmmProcessError::Jail)?;
        tracing::info!(%level, "jailed");
        level
    };
    let filters = if args.no_seccomp {
        tracing::warn!(
            "running without seccomp filters (--no-seccomp): unsafe, for debugging only"
        );
        None
    } else {
        Some(Arc::new(SeccompFilters::for_vm(!args.devices.is_empty())?))
    };
    let vmm = match &start {
        Start::Boot(config) => build_vm(config).map_err(VmmProcessError::Build)?,
        Start::Restore(config) => restore_vm(config).map_err(VmmProcessError::Restore)?,
    };
    drop(start);
    spawn_signal_thread(vmm.exit_signal(), vmm.can_snapshot(), filters.clone())?;
    let vmm = match filters {
        Some(filters) => vmm.with_seccomp(filters),
        None => vmm,
    };
    let report = vmm.run(Some(started)).map_err(VmmProcessError::Run)?;
    let code = exit_code(&report.outcome);
    if let Some(file) = report_file {
        write_report(file, &report, jail)?;
    }
    match &report.outcome {
        Outcome::Crashed(why) => eprintln!("agentos-vmm: guest crashed: {why}"),
        Outcome::Failed(why) => eprintln!("agentos-vmm: VM failed: {why}"),
        Outcome::Shutdown | Outcome::Stopped | Outcome::Snapshotted => {}
    }
    Ok(code)
}

/// Moves this process into the cgroups of `procs` (writing `0` to a `cgroup.procs` moves the
/// writer).
fn join_cgroups(procs: &[PathBuf]) -> Result<(), VmmProcessError> {
    for path in procs {
        // Anything else would be some file of the caller's with a `0` written into it.
        if path.file_name() != Some(std::ffi::OsStr::new("cgroup.procs")) {
            return Err(VmmProcessError::NotCgroupProcs(path.clone()));
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|mut file| file.write_all(b"0"))
            .map_err(|e| VmmProcessError::Cgroup(path.clone(), e))?;
    }
    Ok(())
}

/// Creates the snapshot files in `dir` anew, never through a symlink.
fn open_snapshot_files(dir: &Path) -> Result<SnapshotFiles, VmmProcessError> {
    if !dir.is_dir() {
        return Err(VmmProcessError::NoSnapshotDir(dir.to_owned()));
    }
    // Unlinked and made anew, never truncated: VMs restored from an earlier snapshot here map
    // its memory file, and truncating it would fault their guests' memory away.
    let fresh = |name: &str| {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(VmmProcessError::Replace(path, e)),
        }
        open_nofollow(&path, libc::O_EXCL)
    };
    Ok(SnapshotFiles {
        state: fresh(STATE_FILE)?,
        memory: fresh(MEMORY_FILE)?,
    })
}

/// Opens the disks read-only, as whoever started us, each named for the guest by its place (the
/// VM's configuration bounds how many).
fn open_disks(paths: &[PathBuf]) -> Result<Vec<DiskConfig>, VmmProcessError> {
    paths
        .iter()
        .enumerate()
        .map(|(index, path)| {
            let file =
                std::fs::File::open(path).map_err(|e| VmmProcessError::Disk(path.clone(), e))?;
            Ok(DiskConfig {
                file,
                id: format!("disk{index}"),
            })
        })
        .collect()
}

/// Opens the pmem files read-only, as whoever started us.
fn open_pmem(paths: &[PathBuf]) -> Result<Vec<PmemConfig>, VmmProcessError> {
    paths
        .iter()
        .map(|path| {
            let file =
                std::fs::File::open(path).map_err(|e| VmmProcessError::Pmem(path.clone(), e))?;
            Ok(PmemConfig { file })
        })
        .collect()
}

/// The disks and pmem regions, their files open.
struct Devices {
    disks: Vec<DiskConfig>,
    pmem: Vec<PmemConfig>,
}

/// The arguments with every path the jail binds made absolute and resolved.
fn absolute(args: &VmmArgs) -> Result<VmmArgs, VmmProcessError> {
    let resolve = |path: &Path| {
        std::fs::canonicalize(path).map_err(|e| VmmProcessError::Find(path.to_owned(), e))
    };
    let in_dir = |path: &Path| -> Result<PathBuf, VmmProcessError> {
        let name = path
            .file_name()
            .ok_or_else(|| VmmProcessError::NoFileName(path.to_owned()))?;
        let dir = match path.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(dir) => resolve(dir)?,
            None => resolve(Path::new("."))?,
        };
        Ok(dir.join(name))
    };
    let mut out = args.clone();
    out.kernel = args.kernel.as_deref().map(resolve).transpose()?;
    out.initrd = args
        .initrd
        .iter()
        .map(|p| resolve(p))
        .collect::<Result<_, _>>()?;
    if let Some(base) = &args.chroot_base {
        std::fs::create_dir_all(base).map_err(|e| VmmProcessError::Create(base.clone(), e))?;
        out.chroot_base = Some(resolve(base)?);
    }
    out.vsock_uds = args.vsock_uds.as_deref().map(in_dir).transpose()?;
    Ok(out)
}

/// Opens `path` for writing (made with mode 0600 if missing), never through a symlink, with
/// `extra` flags (append, or truncate).
fn open_nofollow(path: &Path, extra: libc::c_int) -> Result<std::fs::File, VmmProcessError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::File::options();
    options
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | extra);
    if extra & libc::O_APPEND != 0 {
        options.append(true);
    }
    options
        .open(path)
        .map_err(|e| VmmProcessError::Open(path.to_owned(), e))
}

/// What the VMM sees in its jail: the kernel and initrds (read-only), its own `/dev/kvm`, and
/// its own directory (that of `--vsock-uds`: its sockets); and as whom, and where the jail's
/// root is built.
fn jail_plan(args: &VmmArgs, iommu_groups: &[u32]) -> JailPlan {
    let mut read_only: Vec<PathBuf> = args.kernel.iter().cloned().collect();
    read_only.extend(args.initrd.iter().cloned());
    let mut devices = vec![PathBuf::from(KVM_DEVICE)];
    if !iommu_groups.is_empty() {
        devices.push(PathBuf::from(VFIO_CONTAINER));
        devices.extend(
            iommu_groups
                .iter()
                .map(|g| PathBuf::from(format!("/dev/vfio/{g}"))),
        );
    }
    JailPlan {
        read_only,
        dirs: args
            .vsock_uds
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .into_iter()
            .collect(),
        devices,
        ids: jail::Ids {
            uid: args.uid,
            gid: args.gid,
        },
        chroot_base: args.chroot_base.clone(),
        max_file_bytes: max_file_bytes(args),
        read_only_dirs: args
            .devices
            .iter()
            .map(|d| Path::new(SYSFS_PCI_DEVICES).join(d.address.to_string()))
            .collect(),
        // VFIO pins every page of guest RAM for the devices' DMA.
        locked_memory_bytes: if args.devices.is_empty() {
            0
        } else {
            args.memory.saturating_mul(1 << 20)
        },
    }
}

/// What the VMM may write: a snapshot's memory file is the size of guest RAM (that of the
/// snapshot it was restored from, or --memory).
fn max_file_bytes(args: &VmmArgs) -> u64 {
    if args.snapshot_to.is_none() {
        return jail::MAX_FILE_BYTES;
    }
    let memory = match &args.from {
        Some(dir) => std::fs::metadata(dir.join(MEMORY_FILE)).map_or(0, |m| m.len()),
        None => args.memory.saturating_mul(1 << 20),
    };
    memory.max(jail::MAX_FILE_BYTES)
}

fn exit_code(outcome: &Outcome) -> i32 {
    match outcome {
        Outcome::Shutdown | Outcome::Stopped | Outcome::Snapshotted => 0,
        Outcome::Crashed(_) => EXIT_CRASHED,
        Outcome::Failed(_) => EXIT_FAILED,
    }
}

fn write_report(
    mut file: std::fs::File,
    report: &RunReport,
    jail: JailLevel,
) -> Result<(), VmmProcessError> {
    let (outcome, error) = match &report.outcome {
        Outcome::Shutdown => (ReportOutcome::Shutdown, None),
        Outcome::Stopped => (ReportOutcome::Stopped, None),
        Outcome::Snapshotted => (ReportOutcome::Snapshotted, None),
        Outcome::Crashed(why) => (ReportOutcome::Crashed, Some(why.clone())),
        Outcome::Failed(why) => (ReportOutcome::Failed, Some(why.clone())),
    };
    let metrics: &MetricsSnapshot = &report.metrics;
    let out = VmmReport {
        outcome,
        error,
        init_started_ms: report.init_started_ms,
        ready_ms: report.ready_ms,
        console_tail: report.console_tail.clone(),
        metrics: serde_json::to_value(metrics).map_err(|e| VmmProcessError::Report(e.into()))?,
        peak_rss_kib: report.peak_rss_kib,
        jail: Some(jail),
    };
    // Readers look at the report once the VMM has exited; one that finds it empty or cut short
    // (the VMM died writing it) treats it as missing.
    let bytes = serde_json::to_vec_pretty(&out).map_err(|e| VmmProcessError::Report(e.into()))?;
    file.write_all(&bytes).map_err(VmmProcessError::Report)
}
