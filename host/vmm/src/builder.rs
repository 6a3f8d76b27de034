//! From a [`VmConfig`] to a VM ready to run, in one linear pass:
//! memory → KVM VM → devices → kernel and initrd → ACPI and boot parameters → vCPUs.

use std::fs::File;
use std::sync::{Arc, Mutex};

use agentos_protocol::status;
use linux_loader::cmdline::Cmdline;
use tracing::info;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::acpi::{AcpiConfig, AcpiDevice, AcpiError, write_acpi_tables};
use crate::arch::x86_64::boot::{self, BootError};
use crate::arch::x86_64::cpuid::missing_features;
use crate::arch::x86_64::layout::{
    CMDLINE_MAX_SIZE, FIRST_VIRTIO_IRQ, I8042_PORT_BASE, I8042_PORT_LEN, MAX_MMIO_DEVICES,
    MMIO_DEVICE_SIZE, MMIO_DEVICES_START, SERIAL_IRQ, SERIAL_PORT_BASE, SERIAL_PORT_LEN,
};
use crate::arch::x86_64::msr::{MsrError, boot_msrs};
use crate::arch::x86_64::regs::{RegsError, write_boot_tables};
use crate::config::{
    ConfigError, ConsoleConfig, DiskConfig, PmemConfig, RestoreConfig, VmConfig, VsockConfig,
};
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::IrqLine;
use crate::devices::legacy::console::Console;
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::{SavedSerial, SerialDevice, SerialStateError};
use crate::devices::legacy::status::{GuestStatus, StatusPort};
use crate::devices::pci::passthrough::{self, PassthroughError};
use crate::devices::virtio::VirtioInterrupt;
use crate::devices::virtio::block::metrics::BlockMetrics;
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::events::{DeviceEvents, Polled};
use crate::devices::virtio::mmio::{
    MmioMetrics, MmioTransport, SavedSlot, TransportRestoreError, queue_notify_address,
};
use crate::devices::virtio::pmem::metrics::PmemMetrics;
use crate::devices::virtio::pmem::{Pmem, PmemError, map_region, region_size};
use crate::devices::virtio::vsock::metrics::VsockMetrics;
use crate::devices::virtio::vsock::muxer::{MuxerError, UnixMuxer};
use crate::devices::virtio::vsock::{Vsock, VsockError};
use crate::event_loop::{EventLoop, EventLoopError};
use crate::exit::ExitSignal;
use crate::snapshot::{SavedDisk, SavedPmem, SnapshotError, VmSnapshot};
use crate::vmm::{Machine, SnapshotTarget, Vmm, VmmMetrics};
use crate::vstate::memory::{
    GuestMemory, MemoryError, create_guest_memory, map_guest_memory, pmem_addresses,
};
use crate::vstate::vcpu::{Vcpu, VcpuError, VcpuMetrics};
use crate::vstate::vm::{Vm, VmError};

/// The status port is one byte wide.
const STATUS_PORT_LEN: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("invalid VM configuration")]
    Config(#[from] ConfigError),
    #[error("cannot set up guest memory")]
    Memory(#[from] MemoryError),
    #[error("cannot create the KVM VM")]
    Vm(#[from] VmError),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot open {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot place a device")]
    Bus(#[from] BusError),
    #[error("cannot load the kernel or initrd")]
    Boot(#[from] BootError),
    #[error("the kernel command line is too long or invalid")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("cannot write the ACPI tables")]
    Acpi(#[from] AcpiError),
    #[error("cannot write the boot tables")]
    Regs(#[from] RegsError),
    #[error("cannot prepare the boot MSRs")]
    Msr(#[from] MsrError),
    #[error("cannot set up a vCPU")]
    Vcpu(#[from] VcpuError),
    #[error("cannot set up the vsock device")]
    Vsock(#[from] VsockError),
    #[error("cannot set up the vsock host sockets")]
    VsockHost(#[from] MuxerError),
    #[error("cannot set up the event loop")]
    EventLoop(#[from] EventLoopError),
    #[error("virtio-mmio slot {0} is past the last one")]
    Slots(u64),
    #[error("cannot set up disk {index} ({id})")]
    Disk {
        index: usize,
        id: String,
        #[source]
        source: BlockError,
    },
    #[error("cannot set up pmem region {index}")]
    Pmem {
        index: usize,
        #[source]
        source: PmemError,
    },
    #[error("cannot read the snapshot")]
    Snapshot(#[from] SnapshotError),
    #[error("the snapshot needs CPU features this host's KVM lacks ({0})")]
    CpuFeatures(String),
    #[error("the snapshot has {saved} vCPUs and this VMM runs at most {max}")]
    SnapshotVcpus { saved: usize, max: u8 },
    #[error("the snapshot {0}; restore it with the same devices")]
    Devices(String),
    #[error("cannot restore a device of the snapshot")]
    Transport(#[from] TransportRestoreError),
    #[error("cannot restore the serial port")]
    Serial(#[from] SerialStateError),
    #[error("the snapshot would be written over the memory file the VM is restored from")]
    SnapshotOverSource,
    #[error("cannot pass a PCI device to the guest")]
    Passthrough(#[from] PassthroughError),
}

fn open(path: &std::path::Path) -> Result<File, BuildError> {
    File::open(path).map_err(|source| BuildError::Open {
        path: path.display().to_string(),
        source,
    })
}

/// Builds the VM described by `config`. Nothing runs until [`Vmm::run`].
pub fn build_vm(config: &VmConfig) -> Result<Vmm, BuildError> {
    config.validate()?;
    let mem = create_guest_memory(config.memory_mib)?;
    let disks = config
        .disks
        .iter()
        .map(disk_shape)
        .collect::<Result<Vec<_>, _>>()?;
    let pmem = pmem_shapes(config.memory_mib, &config.pmem)?;
    let machine = Machine {
        vcpus: config.vcpus,
        memory_mib: config.memory_mib,
        vsock_cid: config.vsock.as_ref().map(|v| v.guest_cid),
        disks,
        pmem,
    };
    let assembled = assemble(
        &machine,
        &mem,
        &config.console,
        config.vsock.as_ref(),
        &Files {
            disks: &config.disks,
            pmem: &config.pmem,
        },
        None,
    )?;
    let mut assembled = assembled;
    if !config.pci_devices.is_empty() {
        let first_slot = (mem.num_regions() + config.pmem.len()) as u32;
        let attached = passthrough::attach(
            &assembled.vm,
            &mem,
            &mut assembled.io_bus,
            &mut assembled.mmio_bus,
            &config.pci_devices,
            first_slot,
        )?;
        assembled.metrics.pci = Some(attached.metrics.clone());
        assembled.passthrough = Some(attached);
    }
    info!("devices ready");
    let kernel = boot::load_kernel(&mem, &mut open(&config.kernel)?)?;
    info!(end = kernel.end.0, "kernel loaded");
    let initrd = if config.initrd.is_empty() {
        None
    } else {
        let mut parts = config
            .initrd
            .iter()
            .map(|path| open(path))
            .collect::<Result<Vec<_>, _>>()?;
        Some(boot::load_initrd(&mem, &kernel, &mut parts)?)
    };
    info!("initrd loaded");
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BuildError::Cmdline)?;
    if !config.cmdline.is_empty() {
        cmdline
            .insert_str(&config.cmdline)
            .map_err(BuildError::Cmdline)?;
    }
    let pci = assembled.passthrough.as_ref().map(|p| p.root.clone());
    let reserved: Vec<(u64, u64)> = pci.iter().map(|r| (r.ecam, r.ecam_size)).collect();
    let rsdp = write_acpi_tables(
        &mem,
        &AcpiConfig {
            vcpus: config.vcpus,
            devices: assembled.acpi_devices.clone(),
            pci,
        },
    )?;
    boot::write_boot_params(&mem, &kernel, &cmdline, initrd, rsdp, &reserved)?;
    write_boot_tables(&mem, kernel.entry)?;

    let vm = &assembled.vm;
    let msrs = boot_msrs(vm.kvm())?;
    let vcpus = (0..config.vcpus)
        .map(|index| {
            let vcpu = Vcpu::new(vm, index)?;
            vcpu.configure(vm, config.vcpus, &msrs, kernel.entry)?;
            Ok(vcpu)
        })
        .collect::<Result<Vec<_>, VcpuError>>()?;
    info!(vcpus = config.vcpus, "VM built");
    let snapshot_to = open_target(config.snapshot_to.as_ref(), None)?;
    Ok(assembled.into_vmm(mem, vcpus, machine, snapshot_to))
}

/// Builds a VM from a snapshot: its memory mapped from the snapshot's memory file, KVM's state
/// and every device's put back as they were. The caller gives the same kind of devices: a vsock
/// device if the snapshot had one (its CID comes from the snapshot), and the same disks.
pub fn restore_vm(config: &RestoreConfig) -> Result<Vmm, BuildError> {
    let snapshot = VmSnapshot::read_from(&config.state)?;
    let count = snapshot.vcpus.len();
    let vcpus = u8::try_from(count)
        .ok()
        .filter(|n| (1..=crate::config::MAX_VCPUS).contains(n))
        .ok_or(BuildError::SnapshotVcpus {
            saved: count,
            max: crate::config::MAX_VCPUS,
        })?;
    let disks = config
        .disks
        .iter()
        .map(disk_shape)
        .collect::<Result<Vec<_>, _>>()?;
    same_devices("disk", &snapshot.disks, &disks, |d| {
        format!("{} of {} bytes", d.id, d.bytes)
    })?;
    let vsock = match (&snapshot.vsock, &config.vsock_uds) {
        (Some((cid, _)), Some(uds_path)) => Some(VsockConfig {
            guest_cid: *cid,
            uds_path: uds_path.clone(),
        }),
        (None, None) => None,
        (Some(_), None) => return Err(BuildError::Devices("had a vsock device".into())),
        (None, Some(_)) => return Err(BuildError::Devices("had no vsock device".into())),
    };
    let pmem = pmem_shapes(snapshot.memory_mib, &config.pmem)?;
    same_devices("pmem region", &snapshot.pmem, &pmem, |p| {
        format!("{} bytes at {:#x}", p.bytes, p.start)
    })?;
    let mem = map_guest_memory(snapshot.memory_mib, &config.memory)?;
    let machine = Machine {
        vcpus,
        memory_mib: snapshot.memory_mib,
        vsock_cid: vsock.as_ref().map(|v| v.guest_cid),
        disks,
        pmem,
    };
    let assembled = assemble(
        &machine,
        &mem,
        &config.console,
        vsock.as_ref(),
        &Files {
            disks: &config.disks,
            pmem: &config.pmem,
        },
        Some(&snapshot.serial),
    )?;
    let vm = &assembled.vm;
    for state in &snapshot.vcpus {
        if let Some(missing) = missing_features(&state.cpuid, vm.supported_cpuid(), vm.host_caps())
        {
            return Err(BuildError::CpuFeatures(missing));
        }
    }
    vm.restore_state(&snapshot.vm)?;
    let vcpus = snapshot
        .vcpus
        .iter()
        .enumerate()
        .map(|(index, state)| {
            let vcpu = Vcpu::new(vm, index as u8)?;
            vcpu.restore_state(state)?;
            Ok(vcpu)
        })
        .collect::<Result<Vec<_>, VcpuError>>()?;
    assembled.status.restore_last(snapshot.status);
    if let (Some(slot), Some((_, state))) = (&assembled.vsock_slot, &snapshot.vsock) {
        lock(slot).restore(state)?;
    }
    for (slot, (_, state)) in assembled.disk_slots.iter().zip(&snapshot.disks) {
        lock(slot).restore(state)?;
    }
    for (slot, (_, state)) in assembled.pmem_slots.iter().zip(&snapshot.pmem) {
        lock(slot).restore(state)?;
    }
    info!(
        vcpus = count,
        memory_mib = snapshot.memory_mib,
        "VM restored"
    );
    let snapshot_to = open_target(config.snapshot_to.as_ref(), Some(&config.memory))?;
    Ok(assembled.into_vmm(mem, vcpus, machine, snapshot_to))
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Refuses a restore given other devices of `kind` than the snapshot had (`saved`, each with
/// its transport's state), naming what it had.
fn same_devices<T: PartialEq, S>(
    kind: &str,
    saved: &[(T, S)],
    given: &[T],
    describe: impl Fn(&T) -> String,
) -> Result<(), BuildError> {
    if saved.len() == given.len() && saved.iter().zip(given).all(|((s, _), g)| s == g) {
        return Ok(());
    }
    let had: Vec<String> = saved.iter().map(|(d, _)| describe(d)).collect();
    Err(BuildError::Devices(format!(
        "had {} {kind}(s) ({}), and {} are given",
        saved.len(),
        had.join(", "),
        given.len()
    )))
}

/// The pmem regions' sizes (checked) and where they go in a guest of `memory_mib`.
fn pmem_shapes(memory_mib: u64, pmem: &[PmemConfig]) -> Result<Vec<SavedPmem>, BuildError> {
    let sizes = pmem
        .iter()
        .enumerate()
        .map(|(index, p)| region_size(&p.file).map_err(|source| BuildError::Pmem { index, source }))
        .collect::<Result<Vec<_>, _>>()?;
    let starts = pmem_addresses(memory_mib, &sizes)?;
    Ok(starts
        .into_iter()
        .zip(sizes)
        .map(|(start, bytes)| SavedPmem {
            start: start.0,
            bytes,
        })
        .collect())
}

fn disk_shape(disk: &DiskConfig) -> Result<SavedDisk, BuildError> {
    let bytes = disk
        .file
        .metadata()
        .map_err(|source| BuildError::Open {
            path: format!("disk {}", disk.id),
            source,
        })?
        .len();
    Ok(SavedDisk {
        id: disk.id.clone(),
        bytes,
    })
}

/// The snapshot files a VM may be saved to, refused when they are the memory file it runs
/// from (saving would read pages from the file it overwrites).
fn open_target(
    target: Option<&crate::config::SnapshotFiles>,
    source_memory: Option<&File>,
) -> Result<Option<SnapshotTarget>, BuildError> {
    use std::os::unix::fs::MetadataExt;
    let Some(target) = target else {
        return Ok(None);
    };
    let id = |f: &File| f.metadata().map(|m| (m.dev(), m.ino())).ok();
    if let Some(source) = source_memory
        && id(source).is_some()
        && id(source) == id(&target.memory)
    {
        return Err(BuildError::SnapshotOverSource);
    }
    let clone = |f: &File| {
        f.try_clone().map_err(|source| BuildError::Open {
            path: "a snapshot file".into(),
            source,
        })
    };
    Ok(Some(SnapshotTarget {
        state: clone(&target.state)?,
        memory: clone(&target.memory)?,
    }))
}

/// What [`assemble`] builds: the KVM VM with its devices wired, before any guest state.
struct Assembled {
    vm: Vm,
    io_bus: Bus,
    mmio_bus: Bus,
    event_loop: EventLoop,
    exit: Arc<ExitSignal>,
    console: Console,
    status: GuestStatus,
    metrics: VmmMetrics,
    acpi_devices: Vec<AcpiDevice>,
    serial: Arc<Mutex<SerialDevice>>,
    vsock_slot: Option<Arc<Mutex<dyn SavedSlot>>>,
    disk_slots: Vec<Arc<Mutex<dyn SavedSlot>>>,
    pmem_slots: Vec<Arc<Mutex<dyn SavedSlot>>>,
    pmem_regions: Vec<vm_memory::mmap::MmapRegion>,
    passthrough: Option<passthrough::Passthrough>,
}

/// The host files behind a VM's disks and pmem regions.
struct Files<'a> {
    disks: &'a [DiskConfig],
    pmem: &'a [PmemConfig],
}

impl Assembled {
    /// The VMM of these devices, `mem` and `vcpus`, ready to run.
    fn into_vmm(
        self,
        mem: GuestMemory,
        vcpus: Vec<Vcpu>,
        machine: Machine,
        snapshot_to: Option<SnapshotTarget>,
    ) -> Vmm {
        Vmm::new(crate::vmm::VmmParts {
            vm: self.vm,
            mem,
            vcpus,
            io_bus: Arc::new(self.io_bus),
            mmio_bus: Arc::new(self.mmio_bus),
            event_loop: self.event_loop,
            exit: self.exit,
            console: self.console,
            status: self.status,
            metrics: self.metrics,
            machine,
            serial: self.serial,
            vsock_slot: self.vsock_slot,
            disk_slots: self.disk_slots,
            pmem_slots: self.pmem_slots,
            pmem_regions: self.pmem_regions,
            passthrough: self.passthrough,
            snapshot_to,
        })
    }
}

/// Creates the KVM VM over `mem` and its devices: the legacy ports (the serial port in
/// `serial`'s state when restoring) and the virtio-mmio slots.
fn assemble(
    machine: &Machine,
    mem: &GuestMemory,
    console: &ConsoleConfig,
    vsock: Option<&VsockConfig>,
    files: &Files<'_>,
    serial: Option<&SavedSerial>,
) -> Result<Assembled, BuildError> {
    let disks = files.disks;
    let vm = Vm::new(machine.vcpus)?;
    vm.register_memory(mem)?;

    let exit = Arc::new(ExitSignal::new().map_err(BuildError::EventFd)?);
    let console_log = match &console.log {
        Some(file) => Some(file.try_clone().map_err(|source| BuildError::Open {
            path: "the console log".into(),
            source,
        })?),
        None => None,
    };
    let console = Console::new(console_log, console.stdout);
    let status = GuestStatus::default();

    let mut io_bus = Bus::default();
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)?;
    let serial = Arc::new(Mutex::new(match serial {
        Some(saved) => SerialDevice::restored(saved, IrqLine(serial_irq), console.clone())?,
        None => SerialDevice::new(IrqLine(serial_irq), console.clone()),
    }));
    io_bus.insert(
        u64::from(SERIAL_PORT_BASE),
        u64::from(SERIAL_PORT_LEN),
        serial.clone(),
    )?;
    io_bus.insert(
        u64::from(I8042_PORT_BASE),
        u64::from(I8042_PORT_LEN),
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
    )?;
    io_bus.insert(
        u64::from(status::PORT),
        STATUS_PORT_LEN,
        Arc::new(Mutex::new(StatusPort(status.clone()))),
    )?;

    let mut mmio_bus = Bus::default();
    let mut event_loop = EventLoop::new()?;
    let mmio_metrics = Arc::new(MmioMetrics::default());
    let mut vsock_metrics = None;
    // The i8042 is left out of the tables on purpose: the guest's driver would probe it for
    // nothing (it only exists for its reset line, which `reboot=k` pulses without a driver).
    let mut acpi_devices = vec![AcpiDevice::Serial {
        port: SERIAL_PORT_BASE,
        len: SERIAL_PORT_LEN,
        gsi: SERIAL_IRQ,
    }];
    let mut virtio = VirtioDevices {
        vm: &vm,
        mem,
        bus: &mut mmio_bus,
        event_loop: &mut event_loop,
        acpi: &mut acpi_devices,
        metrics: &mmio_metrics,
    };
    let mut vsock_slot = None;
    if let Some(vsock) = vsock {
        let slot = virtio.slot(0)?;
        let metrics = Arc::new(VsockMetrics::default());
        let backend = UnixMuxer::new(&vsock.uds_path, metrics.clone())?;
        let device = Vsock::new(
            vsock.guest_cid,
            backend,
            slot.interrupt.clone(),
            metrics.clone(),
        )?;
        vsock_slot = Some(virtio.attach(slot, device)?);
        vsock_metrics = Some(metrics);
    }
    // Disks take the slots after the vsock device's, in order: the guest names them vda, vdb...
    let mut disk_metrics = Vec::with_capacity(disks.len());
    let mut disk_slots = Vec::with_capacity(disks.len());
    for (index, disk) in disks.iter().enumerate() {
        let slot = virtio.slot(1 + index as u64)?;
        let metrics = Arc::new(BlockMetrics::default());
        let disk_error = |source| BuildError::Disk {
            index,
            id: disk.id.clone(),
            source,
        };
        let file = disk
            .file
            .try_clone()
            .map_err(|e| disk_error(BlockError::File(e)))?;
        let device = Block::new(file, &disk.id, slot.interrupt.clone(), metrics.clone())
            .map_err(disk_error)?;
        disk_slots.push(virtio.attach(slot, device)?);
        disk_metrics.push(metrics);
    }
    // pmem regions take the slots after the disks', in order (the guest's pmem0, pmem1...), and
    // the memory slots after the RAM's.
    let mut pmem_metrics = Vec::with_capacity(files.pmem.len());
    let mut pmem_slots = Vec::with_capacity(files.pmem.len());
    let mut pmem_regions = Vec::with_capacity(files.pmem.len());
    for (index, (config, shape)) in files.pmem.iter().zip(&machine.pmem).enumerate() {
        let pmem_error = |source| BuildError::Pmem { index, source };
        let region = map_region(&config.file, shape.bytes).map_err(pmem_error)?;
        let start = GuestAddress(shape.start);
        vm.register_readonly_region((mem.num_regions() + index) as u32, start, &region)?;
        pmem_regions.push(region);
        let slot = virtio.slot(1 + (disks.len() + index) as u64)?;
        let metrics = Arc::new(PmemMetrics::default());
        let device = Pmem::new(start, shape.bytes, slot.interrupt.clone(), metrics.clone())
            .map_err(pmem_error)?;
        pmem_slots.push(virtio.attach(slot, device)?);
        pmem_metrics.push(metrics);
    }
    Ok(Assembled {
        vm,
        io_bus,
        mmio_bus,
        event_loop,
        exit,
        console,
        status,
        metrics: VmmMetrics {
            vcpu: Arc::new(VcpuMetrics::default()),
            mmio: mmio_metrics,
            vsock: vsock_metrics,
            disks: disk_metrics,
            pmem: pmem_metrics,
            pci: None,
        },
        acpi_devices,
        serial,
        vsock_slot,
        disk_slots,
        pmem_slots,
        pmem_regions,
        passthrough: None,
    })
}

/// Where virtio-mmio devices go as they are built: the VM, its memory, the MMIO bus, the event
/// loop and the ACPI tables.
struct VirtioDevices<'a> {
    vm: &'a Vm,
    mem: &'a GuestMemory,
    bus: &'a mut Bus,
    event_loop: &'a mut EventLoop,
    acpi: &'a mut Vec<AcpiDevice>,
    metrics: &'a Arc<MmioMetrics>,
}

/// One virtio-mmio slot: its registers' address and its interrupt line, wired to KVM.
struct MmioSlot {
    base: u64,
    gsi: u32,
    interrupt: Arc<VirtioInterrupt>,
}

impl VirtioDevices<'_> {
    /// Slot `index` (at most [`MAX_MMIO_DEVICES`] - 1, the layout's limit), its interrupt
    /// registered with KVM.
    fn slot(&self, index: u64) -> Result<MmioSlot, BuildError> {
        if index >= MAX_MMIO_DEVICES {
            return Err(BuildError::Slots(index));
        }
        let gsi = FIRST_VIRTIO_IRQ + index as u32;
        let irq = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
        self.vm.register_irqfd(&irq, gsi)?;
        Ok(MmioSlot {
            base: MMIO_DEVICES_START + index * MMIO_DEVICE_SIZE,
            gsi,
            interrupt: Arc::new(VirtioInterrupt::new(irq)),
        })
    }

    /// Puts `device` in `slot`: its queue notifications as ioeventfds, its transport on the
    /// bus, its work in the event loop and its description in the ACPI tables. Returns the
    /// transport, for snapshots.
    fn attach<D: Polled + 'static>(
        &mut self,
        slot: MmioSlot,
        device: D,
    ) -> Result<Arc<Mutex<dyn SavedSlot>>, BuildError> {
        for (queue, event) in device.queue_events().iter().enumerate() {
            self.vm.register_ioevent(
                event,
                queue_notify_address(GuestAddress(slot.base)),
                queue as u32,
            )?;
        }
        let notifier = device.notifier().map_err(BuildError::EventFd)?;
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            device,
            self.mem.clone(),
            slot.interrupt,
            notifier,
            self.metrics.clone(),
        )));
        self.bus
            .insert(slot.base, MMIO_DEVICE_SIZE, transport.clone())?;
        self.event_loop
            .add(Box::new(DeviceEvents::new(transport.clone())))?;
        self.acpi.push(AcpiDevice::VirtioMmio {
            base: slot.base,
            size: MMIO_DEVICE_SIZE,
            gsi: slot.gsi,
        });
        Ok(transport)
    }
}
