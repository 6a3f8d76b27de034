//! An agent microVM seen from the host: a child `agentos-vmm` process, its run directory and the
//! control connection its guest agent dials when it is ready.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use agentos_protocol::bundle::{MODEL_DISK_PARAM, RUNTIME_DISK_PARAM};
use agentos_protocol::{AGENT_CONTROL_PORT, FrameError};
use agentos_vmm::config::MAX_DISKS;
use agentos_vmm::devices::pci::PassedDevice;

use super::connection::{AgentConnection, ConnectionError, poll_readable};
use crate::admission::{AdmissionLock, HostModel, Refusal};
use crate::cgroup::{self, AgentCgroup, CgroupError, Layout, Slice, SliceError};
use crate::rundir::{RunDir, RunDirError, VmmDir};
use crate::signals;
use agentos_image::model::{DiskDevice, ModelDisks};
use agentos_image::template::BASE_DISK_PARAM;
use agentos_jail::JailLevel;
use agentos_vmm_process::{ReportOutcome, VmmReport};

/// Kernel command line of agent VMs. `reboot=k` makes a guest reboot reset through the i8042,
/// which ends the VMM; `panic=-1` turns a panic into an immediate reset; `quiet` matters because
/// every console byte is a VM exit.
pub const AGENT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off quiet";
/// The command line of an agent given PCI devices: [`AGENT_CMDLINE`] with the PCI bus on.
pub const AGENT_CMDLINE_WITH_PCI: &str = "console=ttyS0 reboot=k panic=-1 quiet";
/// How long a VMM gets to exit after the guest agent acknowledged a shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long a VMM gets to write a snapshot (guest memory included) and exit.
const SNAPSHOT_GRACE: Duration = Duration::from_secs(300);
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// How long a VMM told to stop gets to write its report before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// Guest memory of an agent unless asked otherwise.
/// Below this the stock kernel and the initramfs do not fit comfortably.
pub const MIN_MEMORY_MIB: u64 = 128;
pub const MAX_MEMORY_MIB: u64 = 64 * 1024;
pub const DEFAULT_MEMORY_MIB: u64 = 256;
/// How long an agent has to say hello unless asked otherwise.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Memory the VMM may use beyond guest RAM: its own heap, stacks and the kernel's per-VM state.
pub const VMM_MEMORY_ALLOWANCE_MIB: u64 = 64;
/// How often an agent waiting for room checks again.
const ADMISSION_RETRY: Duration = Duration::from_secs(1);
/// Threads of a VMM beyond its vCPUs: main, event loop, and room for the runtime's own.
const VMM_EXTRA_THREADS: u64 = 16;
/// The VMM's report and its stderr, in the run directory.
const REPORT_FILE: &str = "report.json";
const VMM_LOG: &str = "vmm.log";
/// The most of a report that is read: its console tail and counters take a few KiB.
const MAX_REPORT_BYTES: u64 = 1 << 20;
/// The VMM's own socket in its directory, and what a `METRICS` answer may take.
const VMM_SOCKET: &str = "vsock.sock";
/// The VMM's binary, beside `agentos`.
pub const VMM_BINARY: &str = "agentos-vmm";
const METRICS_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_METRICS_BYTES: u64 = 64 * 1024;

#[derive(Clone, Debug)]
pub struct BootOptions {
    pub vcpus: u8,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// cpio archives loaded after `initrd` (model bundles, ONNX Runtime).
    pub extra_initrds: Vec<PathBuf>,
    /// Read-only disks: the guest's /dev/vda onwards.
    pub disks: Vec<PathBuf>,
    /// The runtime and bundle disks of an agent with a model (see [`agentos_image::model::model_disks`]):
    /// given after `disks`, and named to a booting guest on its command line, so that it mounts
    /// them.
    pub model_disks: Option<ModelDisks>,
    /// The `base` template's disk (see [`agentos_image::template`]): a pmem region after the
    /// model disks', named to a booting guest on its command line, so that it mounts it.
    pub base_disk: Option<PathBuf>,
    /// Appended to [`AGENT_CMDLINE`].
    pub extra_cmdline: Option<String>,
    /// Copy the guest console to our stdout.
    pub console: bool,
    /// From process start to the agent's hello.
    pub boot_timeout: Duration,
    /// CPU quota, weight and cpuset asked for; memory and pids limits follow from the VM's size.
    pub cpu: CpuSlice,
    /// When the slice does not fit beside the running agents: wait for room instead of failing.
    pub wait_for_room: bool,
    /// Where the serial console is appended (default: `console.log` in the run directory, which
    /// goes with the VM).
    pub console_log: Option<PathBuf>,
    /// Set from another thread to give up a boot under way.
    pub abort: Option<Arc<AtomicBool>>,
    /// Run the VMM without its jail (see [`agentos_jail`]): unsafe, for debugging.
    pub no_jail: bool,
    /// Restore the agent saved in this snapshot directory instead of booting `kernel`: vCPUs
    /// and memory are the snapshot's (and must be given here as they were saved).
    pub from: Option<PathBuf>,
    /// Let [`AgentVm::snapshot`] save the agent to this directory (which must exist).
    pub snapshot_to: Option<PathBuf>,
    /// Host PCI functions passed to the agent with VFIO (`ADDRESS[,mmap=off]`, addresses as
    /// sysfs names them).
    pub pci_devices: Vec<PassedDevice>,
}

/// The CPU part of an agent's slice (see [`crate::cgroup::Slice`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CpuSlice {
    pub cpus: Option<f64>,
    pub weight: Option<u32>,
    pub cpuset: Option<String>,
    /// Pin to the CPU that pinned agents load least (instead of a given cpuset).
    pub pin: bool,
}

impl BootOptions {
    /// Options without a kernel or an initrd yet: one vCPU, [`DEFAULT_MEMORY_MIB`], no model,
    /// no slice beyond memory, five minutes to come up (an agent spec fills them in).
    pub(crate) fn blank() -> Self {
        Self {
            vcpus: 1,
            memory_mib: DEFAULT_MEMORY_MIB,
            kernel: PathBuf::new(),
            initrd: PathBuf::new(),
            extra_initrds: Vec::new(),
            disks: Vec::new(),
            model_disks: None,
            base_disk: None,
            extra_cmdline: None,
            console: false,
            boot_timeout: DEFAULT_BOOT_TIMEOUT,
            cpu: CpuSlice::default(),
            wait_for_room: false,
            console_log: None,
            abort: None,
            no_jail: false,
            from: None,
            snapshot_to: None,
            pci_devices: Vec::new(),
        }
    }

    /// The slice the VMM's cgroup gets: guest RAM plus the VMM allowance, a thread limit, and
    /// the CPU share asked for.
    pub fn slice(&self) -> Slice {
        Slice {
            cpus: self.cpu.cpus,
            weight: self.cpu.weight,
            cpuset: self.cpu.cpuset.clone(),
            memory_bytes: Some((self.memory_mib + VMM_MEMORY_ALLOWANCE_MIB) << 20),
            pids: Some(u64::from(self.vcpus) + VMM_EXTRA_THREADS),
        }
    }

    /// Whether the caller asked for a CPU slice, which then must be enforced.
    fn cpu_slice_asked(&self) -> bool {
        self.cpu.cpus.is_some()
            || self.cpu.weight.is_some()
            || self.cpu.cpuset.is_some()
            || self.cpu.pin
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot prepare the VM's run directory")]
    RunDir(#[source] io::Error),
    #[error(transparent)]
    RunDirBase(#[from] RunDirError),
    #[error("{} is missing: the VMM binary sits beside agentos (`cargo build --release` builds both)", .0.display())]
    NoVmmBinary(PathBuf),
    #[error("cannot start the VMM ({path})")]
    Spawn {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("the VM ended during boot: {why}{console}")]
    BootFailed { why: String, console: String },
    #[error("the guest agent did not answer within {secs} s ({progress}){console}")]
    BootTimeout {
        secs: u64,
        progress: String,
        console: String,
    },
    #[error("interrupted")]
    Interrupted,
    #[error("cannot talk to the guest agent")]
    Connection(#[from] ConnectionError),
    #[error("the restored agent's first program failed: {0}")]
    WarmUp(String),
    #[error("cannot give the VM its CPU and memory slice")]
    Cgroup(#[source] CgroupError),
    #[error(transparent)]
    Slice(SliceError),
    #[error(transparent)]
    Refused(Refusal),
    #[error("cannot admit the agent")]
    AdmissionLock(#[from] crate::admission::LockError),
    #[error("a VM has at most {MAX_DISKS} disks, the model disks included")]
    TooManyDisks,
    #[error("the agent was started without a snapshot directory")]
    NoSnapshotTarget,
    #[error("the agent was not saved: {0}")]
    SnapshotFailed(String),
}

/// How a VM ended: the VMM's report, when it wrote one; otherwise how the VMM process ended and
/// its last line on stderr (e.g. the system call its seccomp filter refused).
#[derive(Debug, Default)]
pub struct VmEnd {
    pub report: Option<VmmReport>,
    pub status: Option<std::process::ExitStatus>,
    pub last_words: Option<String>,
}

impl VmEnd {
    /// The VMM's account of the end, in a line.
    pub fn describe(&self) -> String {
        match &self.report {
            None => {
                let mut why = "the VMM ended without a report".to_owned();
                if let Some(status) = self.status {
                    why.push_str(&format!(" ({status})"));
                }
                if let Some(words) = &self.last_words {
                    why.push_str(": ");
                    why.push_str(words);
                }
                why
            }
            Some(r) => match &r.error {
                Some(error) => format!("{}: {error}", r.outcome.as_str()),
                None => r.outcome.as_str().to_owned(),
            },
        }
    }

    /// Whether the guest powered off by itself, which is no failure.
    pub fn is_clean(&self) -> bool {
        self.report
            .as_ref()
            .is_some_and(|r| r.outcome == ReportOutcome::Shutdown && r.error.is_none())
    }
}

pub struct AgentVm {
    child: Option<Child>,
    snapshot_to: Option<PathBuf>,
    /// The VMM's memory limit while it writes a snapshot: the pages of the memory file it
    /// writes are charged to its cgroup, and on a tmpfs they cannot be reclaimed.
    snapshot_memory_max: Option<u64>,
    /// Dropped before the run directory it lives in.
    vmm_dir: VmmDir,
    run_dir: RunDir,
    jail: JailLevel,
    conn: AgentConnection,
    boot_time: Duration,
    /// Removed (dropped) after the VMM is gone.
    cgroup: Option<Arc<AgentCgroup>>,
    console_log: PathBuf,
}

/// A VMM that has been started and whose guest agent has not said hello yet.
struct Starting {
    started: Instant,
    snapshot_to: Option<PathBuf>,
    /// The VMM's memory limit while it writes a snapshot (see [`AgentVm::snapshot`]).
    snapshot_memory_max: Option<u64>,
    /// The VM runs from a snapshot: its agent is told so once it says hello.
    restored: bool,
    child: Child,
    vmm_dir: VmmDir,
    run_dir: RunDir,
    jail: JailLevel,
    control: UnixListener,
    cgroup: Option<Arc<AgentCgroup>>,
    boot_timeout: Duration,
    abort: Option<Arc<AtomicBool>>,
    console_log: PathBuf,
}

impl Starting {
    fn spawn(opts: &BootOptions) -> Result<Self, VmError> {
        let started = Instant::now();
        let run_dir = RunDir::create("vm")?;
        let jail = JailLevel::for_this_process(opts.no_jail);
        // A jailed VMM started by root runs as a user of its own, which owns this directory.
        let vmm_dir = run_dir.vmm_dir(jail == JailLevel::Full)?;
        let control = vmm_dir
            .listen(&format!("vsock.sock_{AGENT_CONTROL_PORT}"))
            .and_then(|l| l.set_nonblocking(true).map(|_| l))
            .map_err(VmError::RunDir)?;
        let cgroup = create_cgroup(opts, &run_dir)?.map(Arc::new);
        let child = spawn_vmm(opts, &run_dir, &vmm_dir, cgroup.as_deref())?;
        signals::watch_child(child.id());
        let console_log = console_log_path(opts, &run_dir);
        Ok(Self {
            started,
            snapshot_to: opts.snapshot_to.clone(),
            snapshot_memory_max: opts.snapshot_to.as_ref().and_then(|_| {
                let slice = opts.slice().memory_bytes?;
                slice.checked_add(opts.memory_mib.checked_mul(1 << 20)?)
            }),
            restored: opts.from.is_some(),
            child,
            vmm_dir,
            run_dir,
            jail,
            control,
            cgroup,
            boot_timeout: opts.boot_timeout,
            abort: opts.abort.clone(),
            console_log,
        })
    }

    fn wait(self) -> Result<AgentVm, VmError> {
        let Self {
            started,
            snapshot_to,
            snapshot_memory_max,
            restored,
            mut child,
            vmm_dir,
            run_dir,
            jail,
            control,
            cgroup,
            boot_timeout,
            abort,
            console_log,
        } = self;
        let deadline = crate::deadline::after(started, boot_timeout);
        let handshake = match first_hello(&control, &mut child, deadline, abort.as_deref()) {
            Ok(handshake) => handshake,
            Err(why) => {
                stop_vmm(&mut child);
                signals::forget_child(child.id());
                return Err(boot_failure(why, &run_dir, boot_timeout));
            }
        };
        drop(control);
        let handshake = handshake.and_then(|mut conn| {
            if restored {
                conn.restored()?;
            }
            Ok(conn)
        });
        let conn = match handshake {
            Ok(conn) => conn,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                signals::forget_child(child.id());
                return Err(e.into());
            }
        };
        Ok(AgentVm {
            child: Some(child),
            snapshot_to,
            snapshot_memory_max,
            vmm_dir,
            run_dir,
            jail,
            conn,
            boot_time: started.elapsed(),
            cgroup,
            console_log,
        })
    }
}

impl AgentVm {
    /// Starts a VM and waits for its guest agent to say hello.
    pub fn boot(opts: &BootOptions) -> Result<Self, VmError> {
        Starting::spawn(opts)?.wait()
    }

    /// Boots several VMs at once: every VMM is started from the calling thread (a VMM stops
    /// when the thread that started it ends), then all are waited for side by side.
    pub fn boot_all(opts: &[BootOptions]) -> Vec<Result<Self, VmError>> {
        let started: Vec<Result<Starting, VmError>> = opts.iter().map(Starting::spawn).collect();
        let waits: Vec<_> = started
            .into_iter()
            .map(|s| s.map(|s| thread::spawn(move || s.wait())))
            .collect();
        waits
            .into_iter()
            .map(|w| {
                w.and_then(|h| {
                    h.join().unwrap_or(Err(VmError::BootFailed {
                        why: "the boot thread failed".to_owned(),
                        console: String::new(),
                    }))
                })
            })
            .collect()
    }

    /// The VMM's cgroup (none when the host gives us no cgroups).
    /// The VMM's process id, while it runs.
    pub fn vmm_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Names the agent for `agentos top`, `stats`, `pause` and `resume` (e.g. `group/agent`).
    pub fn set_label(&self, label: &str) -> io::Result<()> {
        self.run_dir.set_label(label)
    }

    /// The Unix socket the VMM connects to when the guest dials the host on `port`; whoever
    /// listens there serves that port for this VM alone.
    pub fn host_socket(&self, port: u32) -> PathBuf {
        self.vmm_dir.join(&format!("vsock.sock_{port}"))
    }

    /// Listens on the socket the VMM connects to when the guest dials the host on `port` (see
    /// [`VmmDir::listen`]).
    pub fn listen_for_guest(&self, port: u32) -> io::Result<UnixListener> {
        self.vmm_dir.listen(&format!("vsock.sock_{port}"))
    }

    /// The jail its VMM runs in.
    pub fn jail(&self) -> JailLevel {
        self.jail
    }

    /// The VMM's socket, through which the host opens connections to the guest (see
    /// [`connect_to_agent`]).
    pub fn guest_socket(&self) -> PathBuf {
        self.vmm_dir.join(VMM_SOCKET)
    }

    /// The vsock device's counters and its host side's tables, as the running VMM reports them
    /// (`METRICS` on its socket; see `agentos_vmm`'s muxer).
    pub fn vsock_metrics(&self) -> io::Result<serde_json::Value> {
        use std::io::{Read, Write};
        let mut stream = std::os::unix::net::UnixStream::connect(self.vmm_dir.join(VMM_SOCKET))?;
        stream.set_read_timeout(Some(METRICS_TIMEOUT))?;
        stream.write_all(b"METRICS\n")?;
        let mut text = String::new();
        stream.take(MAX_METRICS_BYTES).read_to_string(&mut text)?;
        serde_json::from_str(text.trim_end()).map_err(io::Error::other)
    }

    /// Where the guest's serial console is appended.
    pub fn console_log(&self) -> &Path {
        &self.console_log
    }

    pub fn cgroup(&self) -> Option<Arc<AgentCgroup>> {
        self.cgroup.clone()
    }

    pub fn conn(&mut self) -> &mut AgentConnection {
        &mut self.conn
    }

    /// From spawning the VMM to the agent's hello.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// Whether the VMM has exited (the guest crashed, powered off, or the VMM was killed).
    pub fn ended(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|child| !matches!(child.try_wait(), Ok(None)))
    }

    /// Shuts the guest down and waits for the VMM to exit. When the connection is already gone
    /// (the guest crashed or is rebooting) this still gives the VMM time to end on its own and
    /// write its report, which says what happened.
    pub fn shutdown(mut self) -> VmEnd {
        let _ = self.conn.shutdown();
        self.reap(Instant::now() + SHUTDOWN_GRACE)
    }

    /// The directory its VMM saves it to when asked ([`AgentVm::snapshot`]), if it was given one.
    pub fn snapshot_dir(&self) -> Option<&Path> {
        self.snapshot_to.as_deref()
    }

    /// Saves the agent to the snapshot directory it was started with and ends its VM: the VMM
    /// pauses the guest, writes its memory and state, and exits. The guest agent's connection
    /// ends with it; an agent restored from the snapshot dials the host again.
    pub fn snapshot(mut self) -> Result<VmEnd, VmError> {
        let Some(dir) = self.snapshot_to.clone() else {
            return Err(VmError::NoSnapshotTarget);
        };
        if let (Some(cgroup), Some(max)) = (&self.cgroup, self.snapshot_memory_max)
            && let Err(e) = cgroup.set_memory_max(max)
        {
            tracing::warn!(error = %e, "cannot make room for the snapshot's memory file");
        }
        if let Some(child) = &self.child {
            // SAFETY: kill has no memory-safety preconditions; the pid is our own unreaped
            // child (the VMM's supervisor, which passes the signal on).
            unsafe {
                libc::kill(
                    child.id() as libc::pid_t,
                    agentos_vmm_process::SNAPSHOT_SIGNAL,
                )
            };
        }
        let end = self.reap(Instant::now() + SNAPSHOT_GRACE);
        match &end.report {
            Some(r) if r.outcome == ReportOutcome::Snapshotted => {
                tracing::info!(dir = %dir.display(), "agent saved");
                Ok(end)
            }
            _ => Err(VmError::SnapshotFailed(end.describe())),
        }
    }

    /// Waits for the VMM until `deadline`, then kills it.
    fn reap(&mut self, deadline: Instant) -> VmEnd {
        let Some(mut child) = self.child.take() else {
            return VmEnd::default();
        };
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL_INTERVAL),
                _ => {
                    let _ = child.kill();
                    break child.wait().ok();
                }
            }
        };
        signals::forget_child(child.id());
        let report = read_report(&self.run_dir);
        tracing::info!(?status, report = report.is_some(), "VMM ended");
        let last_words = match report {
            None => last_line(&self.run_dir.join(VMM_LOG)),
            Some(_) => None,
        };
        VmEnd {
            report,
            status,
            last_words,
        }
    }
}

impl Drop for AgentVm {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.reap(Instant::now());
        }
    }
}

/// The VM's cgroup, named after its run directory. Without a CPU slice asked for, a host that
/// does not let us manage cgroups (not root, no controllers) still runs the VM, without limits.
fn create_cgroup(opts: &BootOptions, run_dir: &RunDir) -> Result<Option<AgentCgroup>, VmError> {
    let layout = Layout::discover();
    let name = run_dir
        .path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut slice = opts.slice();
    slice
        .check_online(&cgroup::slice::online_cpu_list())
        .map_err(VmError::Slice)?;
    // Memory and thread limits apply where the host has those controllers.
    slice.memory_bytes = slice
        .memory_bytes
        .filter(|_| has(&layout, cgroup::Controller::Memory));
    slice.pids = slice
        .pids
        .filter(|_| has(&layout, cgroup::Controller::Pids));
    let _lock = admit(&layout, &mut slice, opts)?;
    match AgentCgroup::create(&layout, &name, &slice) {
        Ok(cgroup) => Ok(Some(cgroup)),
        Err(e)
            if !opts.cpu_slice_asked()
                && (e.is_not_permitted() || layout.hierarchies().is_empty()) =>
        {
            tracing::info!(error = %e, "running the VM without a cgroup");
            Ok(None)
        }
        Err(e) => Err(VmError::Cgroup(e)),
    }
}

/// Waits until `slice` fits beside the running agents (or fails at once without `wait`), places
/// it on the least loaded CPU with `pin`, and returns the admission lock, to be held until the
/// VM's cgroup exists.
fn admit(layout: &Layout, slice: &mut Slice, opts: &BootOptions) -> Result<AdmissionLock, VmError> {
    let (pin, wait) = (opts.cpu.pin, opts.wait_for_room);
    let mut announced = false;
    loop {
        let lock = AdmissionLock::take()?;
        cgroup::remove_stale(layout);
        let model = HostModel::read(layout);
        let refusal = match model.admit(slice) {
            Ok(()) => {
                if pin {
                    slice.cpuset = Some(model.least_loaded_cpu().to_string());
                }
                return Ok(lock);
            }
            Err(refusal) => refusal,
        };
        if !wait {
            return Err(VmError::Refused(refusal));
        }
        drop(lock);
        if !announced {
            eprintln!("agentos: waiting for room: {refusal}");
            announced = true;
        }
        if signals::interrupted()
            || opts
                .abort
                .as_ref()
                .is_some_and(|a| a.load(Ordering::SeqCst))
        {
            return Err(VmError::Interrupted);
        }
        std::thread::sleep(ADMISSION_RETRY);
    }
}

fn has(layout: &Layout, controller: cgroup::Controller) -> bool {
    layout.hierarchy(controller).is_some()
}

/// The file the VMM appends the guest's console to: the one asked for, or `console.log` in the
/// run directory.
fn console_log_path(opts: &BootOptions, run_dir: &RunDir) -> PathBuf {
    opts.console_log
        .clone()
        .unwrap_or_else(|| run_dir.join("console.log"))
}

fn spawn_vmm(
    opts: &BootOptions,
    run_dir: &RunDir,
    vmm_dir: &VmmDir,
    cgroup: Option<&AgentCgroup>,
) -> Result<Child, VmError> {
    let exe = vmm_binary()?;
    let mut cmdline = if opts.pci_devices.is_empty() {
        AGENT_CMDLINE
    } else {
        AGENT_CMDLINE_WITH_PCI
    }
    .to_string();
    if let Some(extra) = &opts.extra_cmdline {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    if let Some(model) = &opts.model_disks {
        // The devices in the order given below: the VMM's pmem regions, or its disks after the
        // agent's own (the file system is each disk's first partition).
        let (runtime, bundle) = match model.device {
            DiskDevice::Pmem => ("pmem0".to_owned(), "pmem1".to_owned()),
            DiskDevice::Block => {
                let device = |index| disk_device(index).ok_or(VmError::TooManyDisks);
                (
                    format!("{}1", device(opts.disks.len())?),
                    format!("{}1", device(opts.disks.len() + 1)?),
                )
            }
        };
        cmdline.push_str(&format!(
            " {RUNTIME_DISK_PARAM}={runtime} {MODEL_DISK_PARAM}={bundle}:{}",
            model.name
        ));
    }
    if opts.base_disk.is_some() {
        // After the model's regions, when it has them.
        let before = opts
            .model_disks
            .as_ref()
            .filter(|model| model.device == DiskDevice::Pmem)
            .map_or(0, |_| 2);
        cmdline.push_str(&format!(" {BASE_DISK_PARAM}=pmem{before}"));
    }
    let vmm_log = run_dir.create_file(VMM_LOG).map_err(VmError::RunDir)?;
    let mut cmd = Command::new(&exe);
    match &opts.from {
        Some(dir) => {
            cmd.arg("--from").arg(dir);
        }
        None => {
            cmd.arg("--kernel")
                .arg(&opts.kernel)
                .arg("--initrd")
                .arg(&opts.initrd);
            for extra in &opts.extra_initrds {
                cmd.arg("--initrd").arg(extra);
            }
            cmd.args(["--vcpus", &opts.vcpus.to_string()])
                .args(["--memory", &opts.memory_mib.to_string()])
                .args(["--cmdline", &cmdline]);
        }
    }
    for disk in &opts.disks {
        cmd.arg("--disk").arg(disk);
    }
    if let Some(model) = &opts.model_disks {
        let flag = match model.device {
            DiskDevice::Pmem => "--pmem",
            DiskDevice::Block => "--disk",
        };
        for image in [&model.runtime, &model.bundle] {
            cmd.arg(flag).arg(image);
        }
    }
    if let Some(disk) = &opts.base_disk {
        cmd.arg("--pmem").arg(disk);
    }
    if let Some(dir) = &opts.snapshot_to {
        cmd.arg("--snapshot-to").arg(dir);
    }
    for address in &opts.pci_devices {
        cmd.arg("--device").arg(format!("vfio:{address}"));
    }
    cmd.arg("--vsock-uds")
        .arg(vmm_dir.join(VMM_SOCKET))
        .arg("--console-log")
        .arg(console_log_path(opts, run_dir))
        .arg("--report")
        .arg(run_dir.join(REPORT_FILE))
        .args(opts.no_jail.then_some("--no-jail"));
    if let Some(id) = vmm_dir.id() {
        cmd.args(["--uid", &id.to_string(), "--gid", &id.to_string()]);
    }
    cmd.stdin(Stdio::null()).stderr(vmm_log);
    if opts.console {
        cmd.arg("--console").stdout(Stdio::from(io::stderr()));
    } else {
        cmd.stdout(Stdio::null());
    }
    // The VMM joins its cgroup first thing, before it starts a thread or maps guest memory.
    // Joining between fork and exec instead would make every start fork this process, page
    // tables and all, where a spawn can vfork.
    for procs in cgroup.map(AgentCgroup::procs_paths).unwrap_or_default() {
        cmd.arg("--cgroup-procs").arg(procs);
    }
    cmd.spawn().map_err(|source| VmError::Spawn {
        path: exe.display().to_string(),
        source,
    })
}

/// Longest answer the VMM gives to `CONNECT` (`OK <port>\n`).
const MAX_CONNECT_ANSWER: usize = 32;

/// Opens a connection of its own to a running agent: through its VMM's socket `socket` (see
/// [`AgentVm::guest_socket`]) to the guest agent's listening port, and reads its hello, all
/// within `timeout`. The guest agent serves each such connection apart from the others (what
/// one runs does not wait for another's), and ends what it started there when it closes.
pub fn connect_to_agent(
    socket: &Path,
    timeout: Duration,
) -> Result<AgentConnection, ConnectionError> {
    let deadline = Instant::now() + timeout;
    let (stream, _) = connect_through_vmm(socket, agentos_protocol::AGENT_LISTEN_PORT, timeout)?;
    AgentConnection::handshake(stream, deadline.saturating_duration_since(Instant::now()))
}

/// Opens a connection through a VMM's socket `socket` to the guest's vsock port `port`, within
/// `timeout`: the stream once the VMM answered `OK`, and the host port the VMM gave it. Nothing
/// after the VMM's line is read: that is the guest's.
pub fn connect_through_vmm(
    socket: &Path,
    port: u32,
    timeout: Duration,
) -> Result<(std::os::unix::net::UnixStream, u32), ConnectionError> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).map_err(FrameError::Io)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(FrameError::Io)?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(FrameError::Io)?;
    // Byte by byte: what follows the line is the guest's, and not to be read here.
    let mut answer = Vec::with_capacity(MAX_CONNECT_ANSWER);
    let mut byte = [0u8; 1];
    while answer.last() != Some(&b'\n') {
        match stream.read(&mut byte) {
            Ok(0) => return Err(ConnectionError::Closed),
            Ok(_) if answer.len() < MAX_CONNECT_ANSWER => answer.push(byte[0]),
            Ok(_) => {
                return Err(ConnectionError::Refused(
                    "the VMM's answer to CONNECT is too long".into(),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(ConnectionError::TimedOut);
            }
            Err(e) => return Err(FrameError::Io(e).into()),
        }
    }
    let host_port = std::str::from_utf8(&answer)
        .ok()
        .and_then(|line| line.strip_prefix("OK "))
        .and_then(|port| port.trim_end().parse().ok());
    match host_port {
        Some(host_port) => Ok((stream, host_port)),
        None => Err(ConnectionError::Refused(format!(
            "the VMM answered CONNECT with {:?}",
            String::from_utf8_lossy(&answer)
        ))),
    }
}

/// The program each VM runs in: `agentos-vmm`, the VMM alone (jail and seccomp included), beside
/// this program's binary.
pub fn vmm_binary() -> Result<PathBuf, VmError> {
    let exe = std::env::current_exe().map_err(|source| VmError::Spawn {
        path: VMM_BINARY.into(),
        source,
    })?;
    let vmm = exe.with_file_name(VMM_BINARY);
    if vmm.is_file() {
        Ok(vmm)
    } else {
        Err(VmError::NoVmmBinary(vmm))
    }
}

/// The guest's name of its disk number `index` (`vda` for 0), within the VM's limit.
fn disk_device(index: usize) -> Option<String> {
    let letter = u8::try_from(index)
        .ok()
        .filter(|&i| usize::from(i) < MAX_DISKS)?;
    Some(format!("vd{}", char::from(b'a' + letter)))
}

/// Waits for a connection on `control` (non-blocking) from what `child` runs, while watching that
/// the child is still alive and that we were not interrupted (nor told to `abort`).
pub fn wait_for_connection(
    control: &UnixListener,
    child: &mut Child,
    deadline: Instant,
    abort: Option<&AtomicBool>,
) -> Result<std::os::unix::net::UnixStream, ChildWait> {
    loop {
        match control.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).map_err(ChildWait::Io)?;
                return Ok(stream);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(ChildWait::Io(e)),
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(ChildWait::Exited(status.code()));
        }
        if signals::interrupted() || abort.is_some_and(|a| a.load(Ordering::SeqCst)) {
            return Err(ChildWait::Interrupted);
        }
        if Instant::now() >= deadline {
            return Err(ChildWait::Timeout);
        }
        poll_readable(control.as_raw_fd(), POLL_INTERVAL);
    }
}

/// Waits for the guest agent's connection on `control` and its hello. A connection that closes
/// before the hello is not the end: a guest whose connect timed out while the host was slow to
/// answer (the guest kernel's default patience is 2 s) closes it and dials again, so the next
/// one is waited for, until `deadline`.
pub fn first_hello(
    control: &UnixListener,
    child: &mut Child,
    deadline: Instant,
    abort: Option<&AtomicBool>,
) -> Result<Result<AgentConnection, ConnectionError>, ChildWait> {
    loop {
        let stream = wait_for_connection(control, child, deadline, abort)?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        match AgentConnection::handshake(stream, remaining.max(POLL_INTERVAL)) {
            Err(ConnectionError::Closed) if Instant::now() < deadline => {
                tracing::debug!("the guest agent's connection closed before its hello");
            }
            handshake => return Ok(handshake),
        }
    }
}

/// Why no connection came.
pub enum ChildWait {
    Exited(Option<i32>),
    Timeout,
    Interrupted,
    Io(io::Error),
}

impl ChildWait {
    pub fn describe(&self, timeout: Duration) -> String {
        match self {
            ChildWait::Exited(code) => format!("it exited with status {code:?}"),
            ChildWait::Timeout => format!("no answer within {} s", timeout.as_secs()),
            ChildWait::Interrupted => "interrupted".into(),
            ChildWait::Io(e) => e.to_string(),
        }
    }
}

fn boot_failure(why: ChildWait, run_dir: &RunDir, timeout: Duration) -> VmError {
    let report = read_report(run_dir);
    let console = console_excerpt(run_dir, report.as_ref());
    match why {
        ChildWait::Timeout => VmError::BootTimeout {
            secs: timeout.as_secs(),
            progress: match report.as_ref().map(|r| (r.init_started_ms, r.ready_ms)) {
                Some((_, Some(ready))) => format!(
                    "the agent was ready {ready} ms after the VMM started, but its connection never came"
                ),
                Some((Some(init), None)) => {
                    format!("the guest reached its init {init} ms after the VMM started")
                }
                Some((None, None)) => "the guest never reached its init".into(),
                None => "the VMM wrote no report".into(),
            },
            console,
        },
        ChildWait::Io(e) => VmError::RunDir(e),
        ChildWait::Interrupted => VmError::Interrupted,
        ChildWait::Exited(code) => {
            let why = report
                .as_ref()
                .and_then(|r| r.error.clone())
                .or_else(|| last_line(&run_dir.join(VMM_LOG)))
                .unwrap_or_else(|| format!("the VMM exited with status {code:?}"));
            VmError::BootFailed { why, console }
        }
    }
}

/// Asks the VMM to stop (it then writes its report), and kills it if it does not.
fn stop_vmm(child: &mut Child) {
    // SAFETY: kill has no memory-safety preconditions; the pid is our own unreaped child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The VMM's report, as it wrote it: it ran the guest, so the report is read as any input from
/// it, bounded and never through a symlink.
fn read_report(run_dir: &RunDir) -> Option<VmmReport> {
    let bytes = run_dir.read_file(REPORT_FILE, MAX_REPORT_BYTES).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// How much of the end of the VMM's stderr is read for its last line, and of the guest console
/// for an error message.
const LAST_LINE_BYTES: u64 = 4096;
const CONSOLE_EXCERPT_BYTES: u64 = 64 * 1024;

fn last_line(path: &std::path::Path) -> Option<String> {
    let text = crate::log_tail::read_tail(path, LAST_LINE_BYTES).ok()?;
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim_start_matches("agentos: ").to_string())
}

/// The end of the guest console, for error messages.
fn console_excerpt(run_dir: &RunDir, report: Option<&VmmReport>) -> String {
    const LINES: usize = 12;
    let text = match report {
        Some(r) if !r.console_tail.is_empty() => r.console_tail.join("\n"),
        _ => crate::log_tail::read_tail(&run_dir.join("console.log"), CONSOLE_EXCERPT_BYTES)
            .unwrap_or_default(),
    };
    let lines = crate::log_tail::last_lines(&text, LINES);
    if lines.is_empty() {
        return String::new();
    }
    format!(
        "\n--- last lines of the guest console ---\n{}",
        lines.join("\n")
    )
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    #[test]
    fn a_vmm_killed_by_its_seccomp_filter_is_described_with_its_last_words() {
        let end = VmEnd {
            report: None,
            status: Some(std::process::ExitStatus::from_raw(159 << 8)),
            last_words: Some(
                "agentos-vmm: killed by its seccomp filter: system call 41 (socket) on the vcpu thread"
                    .into(),
            ),
        };
        assert_eq!(
            end.describe(),
            "the VMM ended without a report (exit status: 159): agentos-vmm: killed by its \
             seccomp filter: system call 41 (socket) on the vcpu thread"
        );
        assert!(!end.is_clean());
    }

    #[test]
    fn a_connection_closed_before_the_hello_is_followed_by_the_next() {
        use agentos_protocol::{GuestMessage, Hello, PROTOCOL_VERSION, write_frame};

        let dir = std::env::temp_dir().join(format!("agentos-first-hello-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        let control = UnixListener::bind(&path).unwrap();
        control.set_nonblocking(true).unwrap();
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let guest = thread::spawn(move || {
            // The first dial gives up at once, as a guest whose connect timed out does.
            drop(std::os::unix::net::UnixStream::connect(&path).unwrap());
            thread::sleep(Duration::from_millis(50));
            let mut stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
            let hello = Hello {
                protocol: PROTOCOL_VERSION,
                agent: "test".into(),
                ..Default::default()
            };
            write_frame(&mut stream, &GuestMessage::Hello(hello)).unwrap();
            stream
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let conn = first_hello(&control, &mut child, deadline, None);
        let _stream = guest.join().unwrap();
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&dir);
        let conn = match conn {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => panic!("no hello: {e}"),
            Err(why) => panic!("no connection: {}", why.describe(Duration::from_secs(10))),
        };
        assert_eq!(conn.hello().agent, "test");
    }
}
