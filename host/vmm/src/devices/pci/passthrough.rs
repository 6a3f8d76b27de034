//! Host PCI functions given to the guest: each opened through VFIO, reset, its BARs placed and
//! mapped, on the guest's root bus; the guest's RAM mapped for their DMA; the bus's
//! configuration windows on the VM's buses.

use std::path::Path;
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO};
use vfio_bindings::bindings::vfio::{VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd, VfioError, VfioOps};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::intx::IntxLine;
use super::msi::MsiRoutes;
use super::msix::Msix;
use super::vfio::{
    BarAllocator, BarWindows, Msi, MsixTableBar, TrappedBar, VfioPci, VfioPciError, map_bar,
    standard_config,
};
use super::{
    CONFIG_IO_LEN, CONFIG_IO_PORT, ConfigPorts, ECAM_BUS_SIZE, EcamWindow, PassedDevice,
    PciAddress, PciBus, PciMetrics,
};
use crate::acpi::{IntxRoute, PciRoot};
use crate::arch::x86_64::layout::{
    PCI_ECAM_START, PCI_INTX_GSIS, PCI_MMIO32_END, PCI_MMIO32_START, PCI_MMIO64_END,
    PCI_MMIO64_START,
};
use crate::devices::bus::{Bus, BusError};
use crate::vstate::memory::GuestMemory;
use crate::vstate::vm::{Vm, VmError};

/// Where the kernel lists PCI functions; VFIO finds a function's IOMMU group there.
pub const SYSFS_PCI_DEVICES: &str = "/sys/bus/pci/devices";

#[derive(Debug, thiserror::Error)]
pub enum PassthroughError {
    #[error("cannot create KVM's VFIO device")]
    KvmDevice(#[source] kvm_ioctls::Error),
    #[error("cannot open the VFIO container (/dev/vfio/vfio)")]
    Container(#[source] VfioError),
    #[error("{address} is in use by another VM (a device goes to one VM at a time)")]
    Busy { address: PciAddress },
    #[error(
        "cannot open {address} through VFIO (is it bound to vfio-pci, and is its IOMMU group viable? see `agentos doctor`)"
    )]
    Device {
        address: PciAddress,
        #[source]
        source: VfioError,
    },
    #[error("{address}")]
    Bars {
        address: PciAddress,
        #[source]
        source: VfioPciError,
    },
    #[error("the guest's PCI bus is full")]
    BusFull,
    #[error("cannot wire {address}'s interrupts")]
    Interrupts {
        address: PciAddress,
        #[source]
        source: std::io::Error,
    },
    #[error("guest memory reaches the 64-bit PCI window")]
    MemoryOverlapsWindow,
    #[error("cannot map guest memory for the devices' DMA (RLIMIT_MEMLOCK too low?)")]
    Dma(#[source] VfioError),
    #[error("cannot give the guest a BAR")]
    Slot(#[from] VmError),
    #[error("cannot place the PCI configuration windows")]
    Bus(#[from] BusError),
}

/// What a VM with passed-through devices keeps until it ends: dropping it releases the devices
/// (after the VM, whose memory slots map their BARs).
pub struct Passthrough {
    pub devices: Vec<Arc<VfioDevice>>,
    pub container: Arc<VfioContainer>,
    pub metrics: Arc<PciMetrics>,
    /// How the ACPI tables describe the bus.
    pub root: PciRoot,
}

/// Opens `passed` through VFIO and puts them on a new root bus reached through `io_bus` and
/// `mmio_bus`; BARs that may be mapped (unless the device is to have them trapped) become KVM
/// memory slots from `first_slot` on.
pub fn attach(
    vm: &Vm,
    mem: &GuestMemory,
    io_bus: &mut Bus,
    mmio_bus: &mut Bus,
    passed: &[PassedDevice],
    first_slot: u32,
) -> Result<Passthrough, PassthroughError> {
    let mut kvm_vfio = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
        fd: 0,
        flags: 0,
    };
    let kvm_vfio = vm
        .fd()
        .create_device(&mut kvm_vfio)
        .map_err(PassthroughError::KvmDevice)?;
    let container = Arc::new(
        VfioContainer::new(Some(Arc::new(VfioDeviceFd::new_from_kvm(kvm_vfio))))
            .map_err(PassthroughError::Container)?,
    );
    let metrics = Arc::new(PciMetrics::default());
    let mut bus = PciBus::new(metrics.clone());
    if mem.last_addr().0 >= PCI_MMIO64_START {
        return Err(PassthroughError::MemoryOverlapsWindow);
    }
    let mut bars = BarWindows {
        low: BarAllocator::new(PCI_MMIO32_START, PCI_MMIO32_END),
        high: BarAllocator::new(PCI_MMIO64_START, PCI_MMIO64_END),
    };
    let mut slot = first_slot;
    let mut devices = Vec::with_capacity(passed.len());
    let mut routes = Vec::new();
    let msi_routes = Arc::new(Mutex::new(MsiRoutes::new(vm.shared_fd())));
    for &PassedDevice { address, map_bars } in passed {
        let sysfs = Path::new(SYSFS_PCI_DEVICES).join(address.to_string());
        let ops: Arc<dyn VfioOps> = container.clone();
        let device = Arc::new(VfioDevice::new(&sysfs, ops, false).map_err(|source| {
            if busy(&source) {
                PassthroughError::Busy { address }
            } else {
                PassthroughError::Device { address, source }
            }
        })?);
        // What the last user left in the device goes before this guest sees it.
        device.reset();
        let bars_error = |source| PassthroughError::Bars { address, source };
        let function =
            VfioPci::new(device.clone(), &mut bars, metrics.clone()).map_err(bars_error)?;
        let msix = Msix::of(
            device.clone(),
            &standard_config(&device),
            msi_routes.clone(),
            vm.shared_fd(),
            metrics.clone(),
        )
        .map(|m| Arc::new(Mutex::new(m)));
        let msix_cap = msix
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()).cap);
        for bar in function.bars() {
            // The MSI-X table is the VMM's to emulate: its BAR is trapped whole.
            let holds_msix = msix_cap.is_some_and(|cap| cap.in_bar(bar.index));
            let mapped = bar.mappable && map_bars && !holds_msix;
            if mapped {
                let host = map_bar(&device, &bar).map_err(bars_error)?;
                // SAFETY: `host` maps the whole BAR, shared, and is never unmapped: the
                // mapping lasts as long as this process, past the VM.
                unsafe {
                    vm.register_device_region(slot, GuestAddress(bar.guest_addr), bar.size, host)?
                };
                slot += 1;
            } else {
                let trapped = TrappedBar {
                    device: device.clone(),
                    bar,
                    metrics: metrics.clone(),
                    msix: msix
                        .clone()
                        .zip(msix_cap)
                        .filter(|(_, cap)| cap.table.0 == bar.index)
                        .map(|(msix, cap)| MsixTableBar {
                            msix,
                            span: cap.table_span(),
                        }),
                };
                mmio_bus.insert(bar.guest_addr, bar.size, Arc::new(Mutex::new(trapped)))?;
            }
            tracing::info!(%address, bar = bar.index, at = bar.guest_addr, size = bar.size, mapped, "BAR placed");
        }
        if let Some(rom) = function.rom() {
            let trapped = TrappedBar {
                device: device.clone(),
                bar: rom,
                metrics: metrics.clone(),
                msix: None,
            };
            mmio_bus.insert(rom.guest_addr, rom.size, Arc::new(Mutex::new(trapped)))?;
            tracing::info!(%address, at = rom.guest_addr, size = rom.size, "expansion ROM placed");
        }
        let function = Arc::new(Mutex::new(function));
        let pci_slot = bus.add(function.clone()).ok_or(PassthroughError::BusFull)?;
        let interrupts = |source| PassthroughError::Interrupts { address, source };
        let line = wire_intx(vm, &device, pci_slot).map_err(interrupts)?;
        let msi = Msi::of(&device, &msi_routes, vm.shared_fd()).map_err(interrupts)?;
        let mut function = function.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((route, line)) = line {
            routes.push(route);
            function.intx = Some(line);
        }
        function.set_msi(msi);
        function.set_msix(msix);
        drop(function);
        devices.push(device);
    }
    // The devices' DMA addresses are guest-physical: the guest's RAM is mapped at them.
    // SAFETY: every region of `mem` stays mapped for as long as the VMM runs.
    unsafe { container.vfio_map_guest_memory(mem) }.map_err(PassthroughError::Dma)?;
    let bus = Arc::new(bus);
    io_bus.insert(
        u64::from(CONFIG_IO_PORT),
        u64::from(CONFIG_IO_LEN),
        Arc::new(Mutex::new(ConfigPorts::new(bus.clone()))),
    )?;
    mmio_bus.insert(
        PCI_ECAM_START,
        ECAM_BUS_SIZE,
        Arc::new(Mutex::new(EcamWindow(bus))),
    )?;
    Ok(Passthrough {
        devices,
        container,
        metrics,
        root: PciRoot {
            ecam: PCI_ECAM_START,
            ecam_size: ECAM_BUS_SIZE,
            bars: (PCI_MMIO32_START, PCI_MMIO32_END),
            bars64: (PCI_MMIO64_START, PCI_MMIO64_END),
            intx: routes,
        },
    })
}

/// Wires the device's INTx pin, if it has one, to an IOAPIC pin: VFIO signals an eventfd that
/// KVM turns into a level interrupt, and when the guest acknowledges it KVM signals the
/// resample eventfd, which makes VFIO unmask the device's line (VFIO masks it on each
/// interrupt). None when the device has no INTx.
fn wire_intx(
    vm: &Vm,
    device: &VfioDevice,
    slot: u8,
) -> Result<Option<(IntxRoute, IntxLine)>, std::io::Error> {
    let mut config = [0u8; 4];
    // Register 15: interrupt line, then pin (1 for INTA to 4 for INTD, 0 for none).
    device.region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut config, 0x3c);
    let pin = config[1];
    let lines = device
        .get_irq_info(VFIO_PCI_INTX_IRQ_INDEX)
        .map_or(0, |irq| irq.count);
    if !(1..=4).contains(&pin) || lines == 0 {
        return Ok(None);
    }
    let pin = pin - 1;
    let gsi = PCI_INTX_GSIS[(usize::from(slot) + usize::from(pin)) % PCI_INTX_GSIS.len()];
    let trigger = EventFd::new(EFD_NONBLOCK)?;
    let resample = EventFd::new(EFD_NONBLOCK)?;
    vm.fd()
        .register_irqfd_with_resample(&trigger, &resample, gsi)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    let vfio = |e: VfioError| std::io::Error::other(e.to_string());
    device
        .enable_irq(VFIO_PCI_INTX_IRQ_INDEX, vec![&trigger])
        .map_err(vfio)?;
    device
        .set_irq_resample_fd(VFIO_PCI_INTX_IRQ_INDEX, vec![&resample])
        .map_err(vfio)?;
    Ok(Some((
        IntxRoute { slot, pin, gsi },
        IntxLine { trigger, resample },
    )))
}

/// Whether VFIO refused because another process holds the device's group (`EBUSY`).
fn busy(error: &VfioError) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if e.downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            == Some(libc::EBUSY)
        {
            return true;
        }
        cause = e.source();
    }
    false
}
