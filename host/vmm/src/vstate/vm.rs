//! The KVM VM: its file descriptor, guest memory slots and in-kernel interrupt controllers.

use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_clock_data, kvm_irqchip, kvm_pit_config,
    kvm_pit_state2, kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::memory::GuestMemory;
use crate::arch::x86_64::cpuid::HostCaps;
use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

/// KVM capabilities the VMM cannot do without.
const REQUIRED_CAPS: [(Cap, &str); 6] = [
    (Cap::Irqchip, "in-kernel interrupt controller"),
    (Cap::Ioeventfd, "ioeventfd"),
    (Cap::Irqfd, "irqfd"),
    (Cap::UserMemory, "user memory regions"),
    (Cap::SetTssAddr, "TSS address"),
    (Cap::Pit2, "in-kernel PIT"),
];

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM lacks a capability the VMM needs: {0}")]
    MissingCap(&'static str),
    #[error("KVM refused to create a VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("KVM refused guest memory slot {slot}")]
    MemorySlot {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM refused to set up the {0}")]
    Setup(&'static str, #[source] kvm_ioctls::Error),
    #[error("this host supports at most {max} vCPUs per VM")]
    TooManyVcpus { max: usize },
    #[error("cannot {action} the VM's {what}")]
    State {
        action: &'static str,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// What KVM holds of the VM beyond its vCPUs: the interrupt controllers, the PIT and the clock.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

pub struct Vm {
    kvm: Kvm,
    fd: std::sync::Arc<VmFd>,
    supported_cpuid: CpuId,
    host_caps: HostCaps,
    msr_indices: Vec<u32>,
}

impl Vm {
    /// Opens `/dev/kvm` and creates an empty VM with an in-kernel irqchip and PIT.
    pub fn new(vcpus: u8) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        for (cap, what) in REQUIRED_CAPS {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(what));
            }
        }
        let max = kvm.get_max_vcpus();
        if usize::from(vcpus) > max {
            return Err(VmError::TooManyVcpus { max });
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Setup("CPUID list", e))?;
        let host_caps = HostCaps {
            tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
            amd: crate::arch::x86_64::cpuid::is_amd(&supported_cpuid),
        };
        let msr_indices = crate::arch::x86_64::msr::saved_msr_indices(&kvm)
            .map_err(|e| VmError::Setup("MSR list", e))?;
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(|e| VmError::Setup("TSS address", e))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(|e| VmError::Setup("identity map address", e))?;
        fd.create_irq_chip()
            .map_err(|e| VmError::Setup("interrupt controller", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(|e| VmError::Setup("PIT", e))?;
        Ok(Self {
            kvm,
            fd: std::sync::Arc::new(fd),
            supported_cpuid,
            host_caps,
            msr_indices,
        })
    }

    /// The MSRs a snapshot saves: those KVM lists, and those it emulates without listing.
    pub fn msr_indices(&self) -> &[u32] {
        &self.msr_indices
    }

    /// Reads the interrupt controllers, the PIT and the clock; the vCPUs must not be running.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let get = |what| {
            move |source| VmError::State {
                action: "read",
                what,
                source,
            }
        };
        let chip = |id, what| {
            let mut chip = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd.get_irqchip(&mut chip).map_err(get(what))?;
            Ok::<_, VmError>(chip)
        };
        let mut clock = self.fd.get_clock().map_err(get("clock"))?;
        // KVM_SET_CLOCK takes no flags but KVM_CLOCK_REALTIME, which is not used here.
        clock.flags = 0;
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER, "master PIC")?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE, "slave PIC")?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC, "IOAPIC")?,
            pit: self.fd.get_pit2().map_err(get("PIT"))?,
            clock,
        })
    }

    /// Puts saved interrupt controllers, PIT and clock back, before any vCPU runs.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        let set = |what| {
            move |source| VmError::State {
                action: "restore",
                what,
                source,
            }
        };
        let mut clock = state.clock;
        clock.flags = 0;
        self.fd.set_pit2(&state.pit).map_err(set("PIT"))?;
        self.fd.set_clock(&clock).map_err(set("clock"))?;
        for (chip, what, id) in [
            (&state.pic_master, "master PIC", KVM_IRQCHIP_PIC_MASTER),
            (&state.pic_slave, "slave PIC", KVM_IRQCHIP_PIC_SLAVE),
            (&state.ioapic, "IOAPIC", KVM_IRQCHIP_IOAPIC),
        ] {
            // A saved chip is put back only where it was taken from.
            let mut chip = *chip;
            chip.chip_id = id;
            self.fd.set_irqchip(&chip).map_err(set(what))?;
        }
        Ok(())
    }

    /// The VM's file descriptor, for a device that changes interrupt routes as the guest runs.
    pub fn shared_fd(&self) -> std::sync::Arc<VmFd> {
        self.fd.clone()
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    pub fn host_caps(&self) -> HostCaps {
        self.host_caps
    }

    /// Gives every region of `mem` to KVM as a memory slot.
    pub fn register_memory(&self, mem: &GuestMemory) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let slot = slot as u32;
            let host =
                mem.get_host_address(region.start_addr())
                    .map_err(|_| VmError::MemorySlot {
                        slot,
                        source: kvm_ioctls::Error::new(libc::EFAULT),
                    })?;
            let region = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which outlives the VM: the
            // builder keeps both in the `Vmm` and drops the VM file descriptor first.
            unsafe { self.fd.set_user_memory_region(region) }
                .map_err(|source| VmError::MemorySlot { slot, source })?;
        }
        Ok(())
    }

    /// Gives the guest `region` read-only at `start`, in memory slot `slot` (past the RAM's):
    /// its writes there exit to the VMM as MMIO.
    pub fn register_readonly_region(
        &self,
        slot: u32,
        start: GuestAddress,
        region: &vm_memory::mmap::MmapRegion,
    ) -> Result<(), VmError> {
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: start.0,
            memory_size: region.size() as u64,
            userspace_addr: region.as_ptr() as u64,
            flags: kvm_bindings::KVM_MEM_READONLY,
        };
        // SAFETY: the region is a live mapping that the `Vmm` keeps until after the VM file
        // descriptor is closed; KVM only reads through it (the slot is read-only).
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(|source| VmError::MemorySlot { slot, source })
    }

    /// Gives the guest `size` bytes of a device's memory, mapped into this process at `host`,
    /// at `start` in memory slot `slot` (past the RAM's and the pmem regions'): its accesses
    /// there go to the device without leaving the guest.
    ///
    /// # Safety
    /// `host` must be a live shared mapping of at least `size` bytes that stays mapped until
    /// the VM file descriptor is closed.
    pub unsafe fn register_device_region(
        &self,
        slot: u32,
        start: GuestAddress,
        size: u64,
        host: *mut u8,
    ) -> Result<(), VmError> {
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: start.0,
            memory_size: size,
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the caller keeps the mapping alive for as long as the VM exists.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(|source| VmError::MemorySlot { slot, source })
    }

    /// Routes writes of `event` to interrupt line `gsi`.
    pub fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(event, gsi)
            .map_err(|e| VmError::Setup("interrupt eventfd", e))
    }

    /// Makes a 32-bit guest write of `value` to MMIO `addr` signal `event` without a VM exit.
    pub fn register_ioevent(&self, event: &EventFd, addr: u64, value: u32) -> Result<(), VmError> {
        self.fd
            .register_ioevent(event, &IoEventAddress::Mmio(addr), value)
            .map_err(|e| VmError::Setup("notification eventfd", e))
    }
}
