//! A built VM and the loop that runs it to its end.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use agentos_protocol::status;
use serde::Serialize;
use tracing::info;

use crate::devices::bus::Bus;
use crate::devices::legacy::console::Console;
use crate::devices::legacy::serial::SerialDevice;
use crate::devices::legacy::status::GuestStatus;
use crate::devices::pci::{PciMetrics, PciMetricsSnapshot};
use crate::devices::virtio::block::metrics::{BlockMetrics, BlockMetricsSnapshot};
use crate::devices::virtio::mmio::{MmioMetrics, SavedSlot};
use crate::devices::virtio::pmem::metrics::{PmemMetrics, PmemMetricsSnapshot};
use crate::devices::virtio::vsock::metrics::{VsockMetrics, VsockMetricsSnapshot};
use crate::event_loop::{EventLoop, EventLoopError};
use crate::exit::{ExitReason, ExitSignal};
use crate::seccomp::{Role, SeccompError, SeccompFilters};
use crate::snapshot::{SavedDisk, SavedPmem, SnapshotError, VmSnapshot};
use crate::vstate::memory::{GuestMemory, MemoryError, save_memory};
use crate::vstate::vcpu::{StartGate, Vcpu, VcpuContext, VcpuError, VcpuHandle, VcpuMetrics};
use crate::vstate::vm::{Vm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot start the vCPUs")]
    Vcpu(#[from] VcpuError),
    #[error("the device event loop failed")]
    EventLoop(#[from] EventLoopError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

/// Why a snapshot could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("a vCPU thread did not stop")]
    VcpuStuck,
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    State(#[from] SnapshotError),
}

/// How the guest ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest agent shut the VM down on request.
    Shutdown,
    /// The guest died: kernel panic, agent failure, triple fault, unexpected reset.
    Crashed(String),
    /// The VMM could not keep the guest running (KVM error, emulation failure).
    Failed(String),
    /// The VMM was told to stop.
    Stopped,
    /// The VM was saved to its snapshot files, and stopped.
    Snapshotted,
}

pub struct RunReport {
    pub outcome: Outcome,
    /// The last lines of the guest console.
    pub console_tail: Vec<String>,
    /// Milliseconds from VMM start to the guest agent's milestones, when they happened.
    pub init_started_ms: Option<u64>,
    pub ready_ms: Option<u64>,
    pub metrics: MetricsSnapshot,
    /// The most memory this process held at once, in KiB (`getrusage`). In the jail the VMM is
    /// a child that never ran `exec`, so this is its own; without the jail it also covers the
    /// memory of the process that ran `exec` to start it.
    pub peak_rss_kib: Option<u64>,
}

/// Everything the builder hands over.
pub struct VmmParts {
    pub vm: Vm,
    pub mem: GuestMemory,
    pub vcpus: Vec<Vcpu>,
    pub io_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub event_loop: EventLoop,
    pub exit: Arc<ExitSignal>,
    pub console: Console,
    pub status: GuestStatus,
    pub metrics: VmmMetrics,
    pub machine: Machine,
    pub serial: Arc<std::sync::Mutex<SerialDevice>>,
    pub vsock_slot: Option<Arc<std::sync::Mutex<dyn SavedSlot>>>,
    pub disk_slots: Vec<Arc<std::sync::Mutex<dyn SavedSlot>>>,
    pub pmem_slots: Vec<Arc<std::sync::Mutex<dyn SavedSlot>>>,
    /// The pmem files' mappings, which KVM reads through: dropped after `vm`.
    pub pmem_regions: Vec<vm_memory::mmap::MmapRegion>,
    /// Passed-through PCI devices and their VFIO container, released when the VM is.
    pub passthrough: Option<crate::devices::pci::passthrough::Passthrough>,
    pub snapshot_to: Option<SnapshotTarget>,
}

/// The VM's shape, which a snapshot records and a restore must match.
#[derive(Clone, Debug)]
pub struct Machine {
    pub vcpus: u8,
    pub memory_mib: u64,
    pub vsock_cid: Option<u64>,
    pub disks: Vec<SavedDisk>,
    pub pmem: Vec<SavedPmem>,
}

/// Where the VM is saved when asked to.
pub struct SnapshotTarget {
    pub state: std::fs::File,
    pub memory: std::fs::File,
}

/// The VMM's counters, shared with the devices that update them.
#[derive(Clone)]
pub struct VmmMetrics {
    pub vcpu: Arc<VcpuMetrics>,
    pub mmio: Arc<MmioMetrics>,
    pub vsock: Option<Arc<VsockMetrics>>,
    pub disks: Vec<Arc<BlockMetrics>>,
    pub pmem: Vec<Arc<PmemMetrics>>,
    pub pci: Option<Arc<PciMetrics>>,
}

/// A copy of the counters at one moment, for reports.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MetricsSnapshot {
    pub unhandled_io: u64,
    pub unhandled_mmio: u64,
    pub unexpected_exits: u64,
    pub virtio_bad_access: u64,
    pub virtio_out_of_sequence: u64,
    pub virtio_bad_queue: u64,
    pub virtio_activations: u64,
    pub virtio_resets: u64,
    pub vsock: Option<VsockMetricsSnapshot>,
    /// One per disk, in order; absent without disks.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<BlockMetricsSnapshot>,
    /// One per pmem region, in order; absent without them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pmem: Vec<PmemMetricsSnapshot>,
    /// The PCI bus's refusals; absent without PCI devices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pci: Option<PciMetricsSnapshot>,
}

impl VmmMetrics {
    pub fn snapshot(&self) -> MetricsSnapshot {
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            unhandled_io: load(&self.vcpu.unhandled_io),
            unhandled_mmio: load(&self.vcpu.unhandled_mmio),
            unexpected_exits: load(&self.vcpu.unexpected_exits),
            virtio_bad_access: load(&self.mmio.bad_access_width),
            virtio_out_of_sequence: load(&self.mmio.out_of_sequence),
            virtio_bad_queue: load(&self.mmio.bad_queue),
            virtio_activations: load(&self.mmio.activations),
            virtio_resets: load(&self.mmio.resets),
            vsock: self.vsock.as_ref().map(|m| m.snapshot()),
            disks: self.disks.iter().map(|m| m.snapshot()).collect(),
            pmem: self.pmem.iter().map(|m| m.snapshot()).collect(),
            pci: self.pci.as_ref().map(|m| m.snapshot()),
        }
    }
}

pub struct Vmm {
    parts: VmmParts,
    created: Instant,
    seccomp: Option<Arc<SeccompFilters>>,
}

impl Vmm {
    pub fn new(parts: VmmParts) -> Self {
        Self {
            parts,
            created: Instant::now(),
            seccomp: None,
        }
    }

    /// Runs every vCPU thread and the calling thread under their seccomp filters: each installs
    /// its own before the guest runs.
    pub fn with_seccomp(mut self, filters: Arc<SeccompFilters>) -> Self {
        self.seccomp = Some(filters);
        self
    }

    /// A handle that stops the VM from another thread (or a signal-waiting thread).
    pub fn exit_signal(&self) -> Arc<ExitSignal> {
        self.parts.exit.clone()
    }

    /// Whether the VM can be saved ([`ExitReason::Snapshot`]): it was given snapshot files.
    pub fn can_snapshot(&self) -> bool {
        self.parts.snapshot_to.is_some()
    }

    pub fn console(&self) -> &Console {
        &self.parts.console
    }

    pub fn metrics(&self) -> &VmmMetrics {
        &self.parts.metrics
    }

    /// Runs the guest until it shuts down, crashes, fails or is stopped. `started` is the instant
    /// boot timings are measured from (e.g. the start of the VMM process).
    pub fn run(mut self, started: Option<Instant>) -> Result<RunReport, VmmError> {
        let started = started.unwrap_or(self.created);
        let start = Arc::new(StartGate::default());
        let ctx = VcpuContext {
            io_bus: self.parts.io_bus.clone(),
            mmio_bus: self.parts.mmio_bus.clone(),
            exit: self.parts.exit.clone(),
            metrics: self.parts.metrics.vcpu.clone(),
            seccomp: self.seccomp.clone(),
            start: start.clone(),
        };
        let mut handles = Vec::with_capacity(self.parts.vcpus.len());
        let stop_all = |handles: Vec<VcpuHandle>| {
            start.open();
            handles.into_iter().for_each(|h| {
                h.stop();
            });
        };
        for vcpu in std::mem::take(&mut self.parts.vcpus) {
            match vcpu.start(ctx.clone()) {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    stop_all(handles);
                    return Err(e.into());
                }
            }
        }
        if let Some(filters) = &self.seccomp
            && let Err(e) = filters.install(Role::Vmm)
        {
            stop_all(handles);
            return Err(e.into());
        }
        start.open();
        let reason = self.parts.event_loop.run(&self.parts.exit);
        let vcpus: Vec<Option<Vcpu>> = handles.into_iter().map(VcpuHandle::stop).collect();
        // Passed-through devices are released by the kernel when this process exits (closing
        // a device resets the function): VFIO's own teardown needs system calls this thread's
        // filter does not allow, and would kill the VMM before it reports.
        std::mem::forget(self.parts.passthrough.take());
        let reason = reason?;
        self.parts.console.flush_line();

        let console_tail = self.parts.console.tail();
        let outcome = match reason {
            ExitReason::Snapshot => match self.save(vcpus) {
                Ok(()) => Outcome::Snapshotted,
                Err(e) => Outcome::Failed(format!(
                    "cannot save the snapshot: {}",
                    agentos_protocol::error_chain(&e)
                )),
            },
            _ => classify(&reason, self.parts.status.last(), &console_tail),
        };
        info!(?reason, ?outcome, "VM ended");
        let since_start = |value| {
            self.parts
                .status
                .first_seen(value)
                .map(|t| t.saturating_duration_since(started).as_millis() as u64)
        };
        Ok(RunReport {
            outcome,
            init_started_ms: since_start(status::INIT_STARTED),
            ready_ms: since_start(status::READY),
            console_tail,
            metrics: self.parts.metrics.snapshot(),
            peak_rss_kib: peak_rss_kib(),
        })
    }
}

fn peak_rss_kib() -> Option<u64> {
    // SAFETY: rusage is plain data, valid zeroed; getrusage fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid out pointer.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    (rc == 0).then(|| u64::try_from(usage.ru_maxrss).unwrap_or(0))
}

impl Vmm {
    /// Writes the stopped VM to its snapshot files: memory first, the state last, so that a
    /// state file is only ever there for a whole snapshot.
    fn save(&self, vcpus: Vec<Option<Vcpu>>) -> Result<(), SaveError> {
        let started = Instant::now();
        let Some(target) = &self.parts.snapshot_to else {
            return Err(SaveError::State(SnapshotError::Empty));
        };
        let vcpus = vcpus
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or(SaveError::VcpuStuck)?;
        let vm = &self.parts.vm;
        let vcpu_states = vcpus
            .iter()
            .map(|v| v.save_state(vm.msr_indices()))
            .collect::<Result<Vec<_>, _>>()?;
        let vm_state = vm.save_state()?;
        let lock = |m: &Arc<std::sync::Mutex<dyn SavedSlot>>| {
            m.lock().unwrap_or_else(|e| e.into_inner()).save()
        };
        let machine = &self.parts.machine;
        let snapshot = VmSnapshot {
            memory_mib: machine.memory_mib,
            vm: vm_state,
            vcpus: vcpu_states,
            serial: self
                .parts
                .serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .save(),
            status: self.parts.status.last(),
            vsock: machine
                .vsock_cid
                .zip(self.parts.vsock_slot.as_ref().map(lock)),
            disks: machine
                .disks
                .iter()
                .cloned()
                .zip(self.parts.disk_slots.iter().map(lock))
                .collect(),
            pmem: machine
                .pmem
                .iter()
                .cloned()
                .zip(self.parts.pmem_slots.iter().map(lock))
                .collect(),
        };
        target.state.set_len(0).map_err(SnapshotError::Write)?;
        let bytes = save_memory(&self.parts.mem, &target.memory)?;
        snapshot.write_to(&target.state)?;
        info!(
            memory_bytes = bytes,
            ms = started.elapsed().as_millis() as u64,
            "VM saved"
        );
        Ok(())
    }
}

/// Tells a clean shutdown from a crash, with the best explanation the console offers.
fn classify(reason: &ExitReason, last_status: Option<u8>, console_tail: &[String]) -> Outcome {
    let find = |needle: &str| console_tail.iter().find(|l| l.contains(needle)).cloned();
    match reason {
        ExitReason::Stopped | ExitReason::Snapshot => Outcome::Stopped,
        ExitReason::VcpuFailed { vcpu, error } => Outcome::Failed(format!("vCPU {vcpu}: {error}")),
        ExitReason::GuestReset | ExitReason::SystemEvent(_)
            if last_status == Some(status::SHUTDOWN) =>
        {
            Outcome::Shutdown
        }
        _ => {
            let what = match reason {
                ExitReason::TripleFault { vcpu, state } => {
                    format!("vCPU {vcpu} of the guest triple-faulted ({state})")
                }
                ExitReason::SystemEvent(kind) => format!("the guest raised system event {kind}"),
                _ => "the guest reset without shutting down".to_string(),
            };
            let why = find("Kernel panic")
                .or_else(|| find("agentos-guest: fatal"))
                .map(|line| format!(": {}", line.trim()))
                .unwrap_or_default();
            Outcome::Crashed(format!("{what}{why}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_after_shutdown_status_is_clean() {
        let outcome = classify(&ExitReason::GuestReset, Some(status::SHUTDOWN), &[]);
        assert_eq!(outcome, Outcome::Shutdown);
    }

    #[test]
    fn reset_without_shutdown_explains_a_panic() {
        let tail = vec![
            "[    1.0] something".to_string(),
            "[    1.2] Kernel panic - not syncing: Attempted to kill init!".to_string(),
        ];
        let Outcome::Crashed(why) = classify(&ExitReason::GuestReset, Some(status::READY), &tail)
        else {
            panic!("not a crash")
        };
        assert!(why.contains("Kernel panic - not syncing"), "{why}");
    }

    #[test]
    fn triple_fault_is_a_crash_even_after_shutdown_status() {
        assert!(matches!(
            classify(
                &ExitReason::TripleFault {
                    vcpu: 0,
                    state: String::new()
                },
                Some(status::SHUTDOWN),
                &[]
            ),
            Outcome::Crashed(_)
        ));
    }
}
