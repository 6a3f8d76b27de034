//! vCPUs: creation, boot state, and the thread that runs each one.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::Msrs;
use kvm_ioctls::{VcpuExit, VcpuFd};
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
}

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
}

impl Vcpu {
    pub fn new(vm: &Vm, index: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|e| VcpuError::Create(index, e))?;
        Ok(Self { index, fd })
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

    fn run(mut self, ctx: &VcpuContext, stop: &AtomicBool) {
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
    thread: JoinHandle<()>,
    stop: Arc<AtomicBool>,
}

impl VcpuHandle {
    /// Stops the vCPU thread and waits for it. A thread blocked in `KVM_RUN` is kicked out with a
    /// signal, repeatedly, since a kick that lands just before it re-enters the guest is lost.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        for _ in 0..STOP_KICK_ATTEMPTS {
            if self.thread.is_finished() {
                break;
            }
            let _ = self.thread.kill(SIGRTMIN());
            std::thread::sleep(STOP_KICK_INTERVAL);
        }
        if self.thread.is_finished() {
            let _ = self.thread.join();
        } else {
            warn!("a vCPU thread did not stop; leaving it to process exit");
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
