//! vCPUs: creation, boot state, and the thread that runs each one.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    CpuId, Msrs, kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use super::vm::Vm;
use crate::arch::x86_64::cpuid::adjust_cpuid;
use crate::arch::x86_64::msr::{MsrError, set_boot_msrs};
use crate::arch::x86_64::regs::{BootEntry, RegsError, setup_boot_registers};
use crate::devices::bus::Bus;
use crate::exit::{ExitReason, ExitSignal};
use crate::seccomp::{Role, SeccompFilters};

/// Local APIC register offsets and delivery modes for the LINT pins.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;
/// How long to keep kicking a vCPU thread out of `KVM_RUN` before giving up on it.
const STOP_KICK_INTERVAL: Duration = Duration::from_millis(5);
const STOP_KICK_ATTEMPTS: u32 = 400;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM refused to create vCPU {0}")]
    Create(u8, #[source] kvm_ioctls::Error),
    #[error("KVM refused the CPUID of vCPU {0}")]
    Cpuid(u8, #[source] kvm_ioctls::Error),
    #[error("cannot set the MSRs of vCPU {0}")]
    Msrs(u8, #[source] MsrError),
    #[error("cannot set the registers of vCPU {0}")]
    Regs(u8, #[source] RegsError),
    #[error("cannot set the local APIC of vCPU {0}")]
    Lapic(u8, #[source] kvm_ioctls::Error),
    #[error("cannot start the thread of vCPU {0}")]
    Spawn(u8, #[source] std::io::Error),
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error("cannot {action} the {what} of vCPU {index}")]
    State {
        index: u8,
        action: &'static str,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM took {set} of the {wanted} saved MSRs of vCPU {index}")]
    PartialMsrs {
        index: u8,
        set: usize,
        wanted: usize,
    },
    #[error("the saved state of vCPU {0} does not fit KVM's structures")]
    Malformed(u8),
}

/// Everything KVM holds of one vCPU, as a snapshot keeps it.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM could read, the TSC among them.
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

/// System-segment types of a 64-bit TSS.
const TSS_AVAILABLE_64: u8 = 9;
const TSS_BUSY_64: u8 = 11;

/// Most CPUID entries a saved vCPU may carry (KVM's own limit).
const MAX_CPUID_ENTRIES: usize = kvm_bindings::KVM_MAX_CPUID_ENTRIES;
/// MSRs read or written per ioctl (KVM's own limit is 4096 per call).
const MSR_CHUNK: usize = 256;

/// Counters of guest behaviour seen by the vCPUs.
#[derive(Default)]
pub struct VcpuMetrics {
    /// Port or MMIO accesses where no device lives.
    pub unhandled_io: AtomicU64,
    pub unhandled_mmio: AtomicU64,
    /// VM exits of kinds the VMM does not expect.
    pub unexpected_exits: AtomicU64,
}

pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    /// The host CPU is AMD's (KVM runs guests with SVM).
    amd: bool,
}

impl Vcpu {
    pub fn new(vm: &Vm, index: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|e| VcpuError::Create(index, e))?;
        Ok(Self {
            index,
            fd,
            amd: vm.host_caps().amd,
        })
    }

    /// Sets CPUID, MSRs, registers and the local APIC's LINT pins (as a PC wires them).
    pub fn configure(
        &self,
        vm: &Vm,
        count: u8,
        msrs: &Msrs,
        entry: BootEntry,
    ) -> Result<(), VcpuError> {
        let index = self.index;
        let mut cpuid = vm.supported_cpuid().clone();
        adjust_cpuid(&mut cpuid, index, count, vm.host_caps());
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| VcpuError::Cpuid(index, e))?;
        set_boot_msrs(&self.fd, msrs).map_err(|e| VcpuError::Msrs(index, e))?;
        setup_boot_registers(&self.fd, entry).map_err(|e| VcpuError::Regs(index, e))?;

        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(|e| VcpuError::Lapic(index, e))?;
        set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        self.fd
            .set_lapic(&lapic)
            .map_err(|e| VcpuError::Lapic(index, e))
    }

    /// Reads the vCPU's whole state; the vCPU must not be running. `msr_indices` are the MSRs
    /// to try (those KVM lists, and those it emulates without listing): any it cannot read are
    /// left out.
    pub fn save_state(&self, msr_indices: &[u32]) -> Result<VcpuState, VcpuError> {
        let index = self.index;
        let get = |what: &'static str| {
            move |source| VcpuError::State {
                index,
                action: "read",
                what,
                source,
            }
        };
        // KVM_GET_MP_STATE may accept pending APIC events, changing what the others read: first.
        let mp_state = self.fd.get_mp_state().map_err(get("MP state"))?;
        let regs = self.fd.get_regs().map_err(get("registers"))?;
        let sregs = self.fd.get_sregs().map_err(get("special registers"))?;
        let xsave = self.fd.get_xsave().map_err(get("XSAVE area"))?;
        let xcrs = self.fd.get_xcrs().map_err(get("XCRs"))?;
        let debug_regs = self.fd.get_debug_regs().map_err(get("debug registers"))?;
        let lapic = self.fd.get_lapic().map_err(get("local APIC"))?;
        let cpuid = self
            .fd
            .get_cpuid2(MAX_CPUID_ENTRIES)
            .map_err(get("CPUID"))?
            .as_slice()
            .to_vec();
        let msrs = self.read_msrs(msr_indices)?;
        let events = self.fd.get_vcpu_events().map_err(get("pending events"))?;
        Ok(VcpuState {
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            events,
        })
    }

    /// Reads every MSR of `indices` that KVM will give: KVM stops a batch at the first MSR it
    /// cannot read, which is then skipped.
    fn read_msrs(&self, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuError> {
        let index = self.index;
        let mut out = Vec::with_capacity(indices.len());
        let mut rest = indices;
        while !rest.is_empty() {
            let batch = &rest[..rest.len().min(MSR_CHUNK)];
            let entries: Vec<kvm_msr_entry> = batch
                .iter()
                .map(|&i| kvm_msr_entry {
                    index: i,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Malformed(index))?;
            let read = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(|source| VcpuError::State {
                    index,
                    action: "read",
                    what: "MSRs",
                    source,
                })?;
            out.extend_from_slice(&msrs.as_slice()[..read.min(batch.len())]);
            // The one KVM stopped at is skipped.
            rest = &rest[(read + 1).min(rest.len())..];
        }
        Ok(out)
    }

    /// Puts a saved state back, in the order KVM needs: CPUID before the rest, the local APIC
    /// before the MSRs and the pending events that depend on it.
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), VcpuError> {
        let index = self.index;
        let set = |what: &'static str| {
            move |source| VcpuError::State {
                index,
                action: "restore",
                what,
                source,
            }
        };
        if state.cpuid.len() > MAX_CPUID_ENTRIES {
            return Err(VcpuError::Malformed(index));
        }
        let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| VcpuError::Malformed(index))?;
        self.fd.set_cpuid2(&cpuid).map_err(set("CPUID"))?;
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(set("MP state"))?;
        self.fd.set_regs(&state.regs).map_err(set("registers"))?;
        let mut sregs = state.sregs;
        if self.amd && sregs.tr.type_ == TSS_BUSY_64 {
            // KVM reports an SVM guest's TR as busy, which SVM itself never checks; an emulated
            // AMD CPU (QEMU's, in a carrier) checks I/O permissions only against an available
            // TSS and would refuse every port the guest's programs were allowed.
            sregs.tr.type_ = TSS_AVAILABLE_64;
        }
        self.fd
            .set_sregs(&sregs)
            .map_err(set("special registers"))?;
        // SAFETY: `state.xsave` is a whole legacy-sized XSAVE area, which KVM_SET_XSAVE reads;
        // the VM was never given a larger one (no KVM_CAP_XSAVE2 state is saved).
        unsafe { self.fd.set_xsave(&state.xsave) }.map_err(set("XSAVE area"))?;
        self.fd.set_xcrs(&state.xcrs).map_err(set("XCRs"))?;
        self.fd
            .set_debug_regs(&state.debug_regs)
            .map_err(set("debug registers"))?;
        self.fd.set_lapic(&state.lapic).map_err(set("local APIC"))?;
        for batch in state.msrs.chunks(MSR_CHUNK) {
            let msrs = Msrs::from_entries(batch).map_err(|_| VcpuError::Malformed(index))?;
            let written = self.fd.set_msrs(&msrs).map_err(set("MSRs"))?;
            if written != batch.len() {
                return Err(VcpuError::PartialMsrs {
                    index,
                    set: written,
                    wanted: batch.len(),
                });
            }
        }
        self.fd
            .set_vcpu_events(&state.events)
            .map_err(set("pending events"))
    }

    /// Runs the vCPU on its own thread until the VM exits or [`VcpuHandle::stop`] is called.
    pub fn start(self, ctx: VcpuContext) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler()?;
        let index = self.index;
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || self.run(&ctx, &thread_stop))
            .map_err(|e| VcpuError::Spawn(index, e))?;
        Ok(VcpuHandle { thread, stop })
    }

    /// The registers that say where a guest died.
    fn describe_state(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip {:#x} rsp {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x}",
                r.rip, r.rsp, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
            ),
            _ => "registers unavailable".into(),
        }
    }

    /// Runs the guest; returns the vCPU when stopped or when the guest ends, with any exit it
    /// was handling completed in KVM, so that its state can be saved.
    fn run(mut self, ctx: &VcpuContext, stop: &AtomicBool) -> Self {
        self.run_until_exit(ctx, stop);
        self.complete_pending_exit();
        self
    }

    /// KVM finishes an I/O or MMIO read only on the next `KVM_RUN`; an immediate exit does that
    /// without entering the guest.
    fn complete_pending_exit(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
    }

    fn run_until_exit(&mut self, ctx: &VcpuContext, stop: &AtomicBool) {
        let index = self.index;
        if let Some(filters) = &ctx.seccomp
            && let Err(e) = filters.install(Role::Vcpu)
        {
            ctx.exit.request(ExitReason::VcpuFailed {
                vcpu: index,
                error: e.to_string(),
            });
            return;
        }
        ctx.start.wait();
        while !stop.load(Ordering::Acquire) {
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                Err(e) if matches!(e.errno(), libc::EINTR | libc::EAGAIN) => continue,
                Err(e) => {
                    ctx.exit.request(ExitReason::VcpuFailed {
                        vcpu: index,
                        error: format!("KVM_RUN failed: {e}"),
                    });
                    return;
                }
            };
            match exit {
                VcpuExit::IoOut(port, data) => {
                    if !ctx.io_bus.write(u64::from(port), data) {
                        ctx.metrics.unhandled_io.fetch_add(1, Ordering::Relaxed);
                    }
                }
                VcpuExit::IoIn(port, data) => {
                    if !ctx.io_bus.read(u64::from(port), data) {
                        data.fill(0xff);
                        ctx.metrics.unhandled_io.fetch_add(1, Ordering::Relaxed);
                    }
                }
                VcpuExit::MmioWrite(addr, data) => {
                    if !ctx.mmio_bus.write(addr, data) {
                        ctx.metrics.unhandled_mmio.fetch_add(1, Ordering::Relaxed);
                    }
                }
                VcpuExit::MmioRead(addr, data) => {
                    if !ctx.mmio_bus.read(addr, data) {
                        data.fill(0xff);
                        ctx.metrics.unhandled_mmio.fetch_add(1, Ordering::Relaxed);
                    }
                }
                VcpuExit::Shutdown => {
                    ctx.exit.request(ExitReason::TripleFault {
                        vcpu: index,
                        state: self.describe_state(),
                    });
                    return;
                }
                VcpuExit::SystemEvent(kind, _) => {
                    ctx.exit.request(ExitReason::SystemEvent(kind));
                    return;
                }
                VcpuExit::Hlt => {
                    // With the in-kernel LAPIC, HLT only reaches us when the guest can never wake.
                    ctx.exit.request(ExitReason::VcpuFailed {
                        vcpu: index,
                        error: "halted with interrupts disabled".into(),
                    });
                    return;
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    ctx.exit.request(ExitReason::VcpuFailed {
                        vcpu: index,
                        error: format!(
                            "KVM could not enter the guest (reason {reason:#x}, cpu {cpu})"
                        ),
                    });
                    return;
                }
                VcpuExit::InternalError => {
                    let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or_default();
                    ctx.exit.request(ExitReason::VcpuFailed {
                        vcpu: index,
                        error: format!(
                            "KVM internal error (instruction emulation failed at {rip:#x})"
                        ),
                    });
                    return;
                }
                other => {
                    ctx.metrics.unexpected_exits.fetch_add(1, Ordering::Relaxed);
                    debug!(vcpu = index, exit = ?other, "unexpected VM exit");
                }
            }
        }
    }
}

/// What a running vCPU thread shares with the rest of the VMM.
#[derive(Clone)]
pub struct VcpuContext {
    pub io_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub exit: Arc<ExitSignal>,
    pub metrics: Arc<VcpuMetrics>,
    /// Installed by each vCPU thread on itself before it enters the guest.
    pub seccomp: Option<Arc<SeccompFilters>>,
    /// Opened once the VMM thread is ready (its own filter installed): no vCPU enters the guest
    /// before.
    pub start: Arc<StartGate>,
}

/// Holds vCPU threads back until it is opened.
#[derive(Default)]
pub struct StartGate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl StartGate {
    pub fn open(&self) {
        *self.open.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.opened.notify_all();
    }

    fn wait(&self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        while !*open {
            open = self.opened.wait(open).unwrap_or_else(|e| e.into_inner());
        }
    }
}

pub struct VcpuHandle {
    thread: JoinHandle<Vcpu>,
    stop: Arc<AtomicBool>,
}

impl VcpuHandle {
    /// Stops the vCPU thread and waits for it. A thread blocked in `KVM_RUN` is kicked out with a
    /// signal, repeatedly, since a kick that lands just before it re-enters the guest is lost.
    /// Returns the vCPU, out of the guest, unless its thread would not stop.
    pub fn stop(self) -> Option<Vcpu> {
        self.stop.store(true, Ordering::Release);
        for _ in 0..STOP_KICK_ATTEMPTS {
            if self.thread.is_finished() {
                break;
            }
            let _ = self.thread.kill(SIGRTMIN());
            std::thread::sleep(STOP_KICK_INTERVAL);
        }
        if self.thread.is_finished() {
            self.thread.join().ok()
        } else {
            warn!("a vCPU thread did not stop; leaving it to process exit");
            None
        }
    }
}

fn set_lvt_mode(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(&regs[offset..offset + 4]) {
        *b = *r as u8;
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (r, b) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *r = b as std::os::raw::c_char;
    }
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The kick signal only has to interrupt `KVM_RUN`; its handler does nothing.
fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = register_signal_handler(SIGRTMIN(), on_kick).map_err(VcpuError::Signal);
    });
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_mode_replaces_only_delivery_mode_bits() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0] = 0x30;
        regs[APIC_LVT0 + 1] = 0x05;
        regs[APIC_LVT0 + 2] = 0x01;
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(
            [regs[APIC_LVT0], regs[APIC_LVT0 + 1], regs[APIC_LVT0 + 2]],
            [0x30, 0x07, 0x01]
        );
    }
}
