//! `agentos bench vfio`: QEMU's `edu` test device used by an agent it is passed to, beside the
//! same operations done by the host itself through VFIO, as a VMM does: register reads through
//! the BAR (mapped into the guest, and trapped by the VMM with `mmap=off`, beside a mapped read
//! and a VFIO region read on the host), DMA round trips (4 KiB from memory into the device's
//! buffer and back), and the time from asking the device for an interrupt to a program
//! waiting for it (INTx). On a host whose agents run in a carrier, it all runs in a carrier
//! started with the test device, and "host" is that carrier.
//!
//! In the guest the measuring program is `/init edu` (the guest agent's tool); here it is
//! [`HostEdu`].

use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentos_protocol::{ExecRequest, Program};
use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use vfio_bindings::bindings::vfio::{VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps};
use vmm_sys_util::eventfd::EventFd;

use super::{Stats, percentile, ratio, round};
use agentos::carrier::{self, CarrierRun, PCI_TEST_DEVICE_IDS};
use agentos::pci::{self, SYSFS_PCI_DEVICES, VFIO_DRIVER};
use agentos::placement::{self, CarrierChoice, Placement};
use agentos_core::agent::connection::ExecIo;
use agentos_core::agent::spec::AgentRequest;
use agentos_core::agent::vm::AgentVm;
use agentos_vmm::devices::pci::PassedDevice;

/// Two pages of the agent's RAM its kernel leaves alone, for the device's DMA: below the
/// device's 28-bit DMA limit, reached in the guest through /dev/mem.
const GUEST_DMA_PAGES: &str = "0x7000000";
const RESERVE_GUEST_DMA_PAGES: &str = "memmap=8K$0x7000000";
/// Where the host maps its buffer in the device's I/O address space (below 28 bits too).
const HOST_DMA_IOVA: u64 = 0x10_0000;

/// The device's registers (QEMU's docs/specs/edu.rst), as `/init edu` uses them.
const EDU_ID: u32 = 0x0100_00ed;
const REG_RAISE: u64 = 0x60;
const REG_ACK: u64 = 0x64;
const REG_DMA_SOURCE: u64 = 0x80;
const REG_DMA_DEST: u64 = 0x88;
const REG_DMA_COUNT: u64 = 0x90;
const REG_DMA_COMMAND: u64 = 0x98;
const DMA_START: u64 = 1;
const DMA_TO_RAM: u64 = 2;
const EDU_BUFFER: u64 = 0x40000;
const EDU_BUFFER_BYTES: usize = 4096;
const PAGE: usize = 4096;
/// PCI command register: memory space and bus master.
const COMMAND: u64 = 4;
const COMMAND_ENABLE: u16 = 0x6;
const READS_PER_BATCH: u32 = 100;
const WAIT: Duration = Duration::from_secs(10);

#[derive(clap::Args, Debug)]
pub struct VfioBenchArgs {
    /// The edu device (1234:11e8) to use, as sysfs names it; default: the one on this host.
    /// Bound to vfio-pci first if no driver has it.
    #[arg(long, value_name = "ADDRESS")]
    pub device: Option<String>,
    /// Batches of 100 register reads, per side.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub read_batches: u32,
    /// DMA round trips per side (the device's DMA engine takes 100 ms of its clock per
    /// transfer, so this bounds throughput on both sides alike).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub dma: u32,
    /// Interrupts per side.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub interrupts: u32,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What one side measured (the JSON `/init edu` prints).
#[derive(Debug, Default, Deserialize)]
struct Times {
    read_ns: Vec<f64>,
    /// The VMM's count of the guest's accesses it forwarded (set by [`in_agent`]).
    #[serde(skip)]
    trapped_bar_accesses: u64,
    #[serde(default)]
    dma_round_trip_us: Vec<f64>,
    #[serde(default)]
    interrupt_us: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct VfioBench {
    device: String,
    /// Where "host" measured: this machine, or the carrier the benchmark ran in.
    host: &'static str,
    /// Nanoseconds per register read (over batches of 100).
    register_read_ns: Reads,
    /// Guest accesses to the BAR the VMM forwarded, in each agent (its report's count).
    trapped_bar_accesses: TrappedCounts,
    /// One round trip moves 4 KiB into the device and 4 KiB back.
    dma_round_trip_ms: Sides<Stats>,
    dma_mb_per_s: Sides<f64>,
    interrupt_us: Sides<Percentiles>,
    ratios: Ratios,
}

#[derive(Debug, Serialize)]
struct Reads {
    /// The host reading the BAR it mapped from VFIO.
    host_mapped: Stats,
    /// The host reading through VFIO's region read, as a VMM does for a trapped BAR.
    host_vfio_read: Stats,
    /// The guest reading its BAR, mapped into it as memory.
    vm_mapped: Stats,
    /// The guest reading its BAR, trapped by the VMM (`mmap=off`).
    vm_trapped: Stats,
}

#[derive(Debug, Serialize)]
struct TrappedCounts {
    vm_mapped: u64,
    vm_trapped: u64,
}

#[derive(Debug, Serialize)]
struct Sides<T> {
    host: T,
    vm: T,
}

#[derive(Debug, Serialize)]
struct Percentiles {
    p50: f64,
    p99: f64,
}

impl Percentiles {
    fn of(us: &[f64]) -> Self {
        Self {
            p50: round(percentile(us, 0.50), 1),
            p99: round(percentile(us, 0.99), 1),
        }
    }
}

/// VM / host, so that above 1 means the VM is slower.
#[derive(Debug, Serialize)]
struct Ratios {
    read_mapped: f64,
    read_trapped: f64,
    /// The VM's trapped read beside its mapped one: what mapping the BAR saves.
    read_trapped_vs_mapped: f64,
    dma: f64,
    interrupt_p50: f64,
}

pub fn run(args: &VfioBenchArgs) -> anyhow::Result<i32> {
    if placement::decide(CarrierChoice::Auto)? == Placement::Carrier {
        eprintln!("agentos bench vfio: in a carrier with the PCI test device");
        let spec = CarrierRun {
            argv: std::env::args().collect(),
            env: Default::default(),
            files: carrier::agent_image_files(),
            memory_mib: carrier::DEFAULT_MEMORY_MIB,
            cpus: carrier::DEFAULT_CPUS,
            console: false,
            pci_test_device: true,
        };
        return Ok(carrier::run(&spec, &mut std::io::stdout().lock())?.shell_code());
    }
    let address = test_device(args.device.as_deref())?;
    let device =
        pci::ready_for_passthrough(&format!("vfio:{address}"), Path::new(SYSFS_PCI_DEVICES))?;

    eprintln!("agentos bench vfio: {address} from the host through VFIO");
    let host = HostEdu::open(&address)?.measure(args)?;
    let host_vfio_read = HostEdu::open(&address)?.vfio_reads(args.read_batches);

    eprintln!("agentos bench vfio: {address} in an agent, its BAR mapped");
    let vm = in_agent(device, args, true)?;
    eprintln!("agentos bench vfio: {address} in an agent, its BAR trapped");
    let trapped = pci::ready_for_passthrough(
        &format!("vfio:{address},mmap=off"),
        Path::new(SYSFS_PCI_DEVICES),
    )?;
    let vm_trapped = in_agent(trapped, args, false)?;

    let reads = Reads {
        host_mapped: rounded(&host.read_ns, 1),
        host_vfio_read: rounded(&host_vfio_read, 1),
        vm_mapped: rounded(&vm.read_ns, 1),
        vm_trapped: rounded(&vm_trapped.read_ns, 1),
    };
    let dma = |t: &Times| {
        let ms: Vec<f64> = t.dma_round_trip_us.iter().map(|us| us / 1000.0).collect();
        rounded(&ms, 2)
    };
    let mb_per_s = |s: &Stats| {
        if s.median > 0.0 {
            round((2 * EDU_BUFFER_BYTES) as f64 / (s.median / 1000.0) / 1e6, 4)
        } else {
            0.0
        }
    };
    let (host_dma, vm_dma) = (dma(&host), dma(&vm));
    let report = VfioBench {
        device: address,
        host: if std::env::var_os(carrier::IN_CARRIER_ENV).is_some() {
            "carrier"
        } else {
            "this machine"
        },
        ratios: Ratios {
            read_mapped: ratio(reads.vm_mapped.median, reads.host_mapped.median),
            read_trapped: ratio(reads.vm_trapped.median, reads.host_vfio_read.median),
            read_trapped_vs_mapped: ratio(reads.vm_trapped.median, reads.vm_mapped.median),
            dma: ratio(vm_dma.median, host_dma.median),
            interrupt_p50: ratio(
                percentile(&vm.interrupt_us, 0.5),
                percentile(&host.interrupt_us, 0.5),
            ),
        },
        register_read_ns: reads,
        trapped_bar_accesses: TrappedCounts {
            vm_mapped: vm.trapped_bar_accesses,
            vm_trapped: vm_trapped.trapped_bar_accesses,
        },
        dma_mb_per_s: Sides {
            host: mb_per_s(&host_dma),
            vm: mb_per_s(&vm_dma),
        },
        dma_round_trip_ms: Sides {
            host: host_dma,
            vm: vm_dma,
        },
        interrupt_us: Sides {
            host: Percentiles::of(&host.interrupt_us),
            vm: Percentiles::of(&vm.interrupt_us),
        },
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
    } else {
        let r = &report.register_read_ns;
        write!(
            out,
            "register read: host {:.0} ns mapped, {:.0} ns through VFIO; agent {:.0} ns mapped ({:.2}x), {:.0} ns trapped ({:.2}x)\n\
             DMA round trip (8 KiB): host {:.1} ms, agent {:.1} ms ({:.2}x)\n\
             interrupt: host p50 {:.0} us, agent p50 {:.0} us ({:.2}x)",
            r.host_mapped.median,
            r.host_vfio_read.median,
            r.vm_mapped.median,
            report.ratios.read_mapped,
            r.vm_trapped.median,
            report.ratios.read_trapped,
            report.dma_round_trip_ms.host.median,
            report.dma_round_trip_ms.vm.median,
            report.ratios.dma,
            report.interrupt_us.host.p50,
            report.interrupt_us.vm.p50,
            report.ratios.interrupt_p50,
        )?;
    }
    writeln!(out)?;
    Ok(0)
}

fn rounded(values: &[f64], decimals: i32) -> Stats {
    let s = Stats::of(values);
    Stats {
        median: round(s.median, decimals),
        min: round(s.min, decimals),
        max: round(s.max, decimals),
    }
}

/// The edu device to use, bound to vfio-pci (binding it when no driver has it).
fn test_device(asked: Option<&str>) -> anyhow::Result<String> {
    let root = Path::new(SYSFS_PCI_DEVICES);
    let all = pci::devices(root).with_context(|| format!("cannot read {SYSFS_PCI_DEVICES}"))?;
    let (vendor, device) = PCI_TEST_DEVICE_IDS;
    let edu = match asked {
        Some(address) => all
            .iter()
            .find(|d| d.address == address)
            .with_context(|| format!("{address}: no such PCI device (`agentos doctor` lists them)"))?,
        None => all
            .iter()
            .find(|d| (d.vendor, d.device) == (vendor, device))
            .with_context(|| format!("no edu device ({vendor:04x}:{device:04x}) on this host: `agentos carrier --pci-test-device` gives a carrier one"))?,
    };
    if (edu.vendor, edu.device) != (vendor, device) {
        bail!(
            "{}: this benchmark times QEMU's edu test device ({vendor:04x}:{device:04x}), not {:04x}:{:04x}",
            edu.address,
            edu.vendor,
            edu.device
        );
    }
    match edu.driver.as_deref() {
        Some(VFIO_DRIVER) => {}
        Some(other) => bail!(
            "{}: bound to {other}; unbind it first (echo {} > /sys/bus/pci/drivers/{other}/unbind)",
            edu.address,
            edu.address
        ),
        None => {
            let drivers = Path::new("/sys/bus/pci/drivers").join(VFIO_DRIVER);
            if fs::write(drivers.join("bind"), &edu.address).is_err() {
                fs::write(drivers.join("new_id"), format!("{vendor:04x} {device:04x}"))
                    .with_context(|| format!("cannot bind {} to vfio-pci", edu.address))?;
            }
        }
    }
    Ok(edu.address.clone())
}

/// Boots an agent with `device` and runs `/init edu` in it: everything when `all`, else reads.
fn in_agent(device: PassedDevice, args: &VfioBenchArgs, all: bool) -> anyhow::Result<Times> {
    let mut opts = super::agent_options(AgentRequest::default())?;
    opts.pci_devices = vec![device];
    opts.extra_cmdline = Some(RESERVE_GUEST_DMA_PAGES.to_owned());
    let mut vm = AgentVm::boot(&opts).context("the agent with the device did not boot")?;
    let mut argv = vec![
        "edu".to_owned(),
        "--read-batches".to_owned(),
        args.read_batches.to_string(),
    ];
    if all {
        argv.extend([
            "--dma".to_owned(),
            args.dma.to_string(),
            "--dma-page".to_owned(),
            GUEST_DMA_PAGES.to_owned(),
            "--interrupts".to_owned(),
            args.interrupts.to_string(),
        ]);
    }
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let status = vm.conn().exec(
        ExecRequest {
            run: Program::new("/init").with_args(argv),
            ..Default::default()
        },
        ExecIo {
            stdin: None,
            stdout: &mut stdout,
            stderr: &mut stderr,
        },
    );
    let end = vm.shutdown();
    let status = status.context("`/init edu` in the agent did not complete")?;
    if status.shell_code() != 0 {
        bail!(
            "`/init edu` in the agent failed: {}",
            String::from_utf8_lossy(&stderr).trim()
        );
    }
    let mut times: Times = serde_json::from_slice(&stdout).with_context(|| {
        format!(
            "`/init edu` printed no results: {}",
            String::from_utf8_lossy(&stdout)
        )
    })?;
    let metrics = end
        .report
        .as_ref()
        .map(|r| r.metrics.clone())
        .unwrap_or_default();
    times.trapped_bar_accesses = metrics["pci"]["trapped_bar_accesses"]
        .as_u64()
        .with_context(|| {
            format!(
                "the agent's VMM reported no PCI counters: {metrics} {:?} {:?}",
                end.status, end.last_words
            )
        })?;
    Ok(times)
}

/// The edu device opened through VFIO by this process, its BAR 0 mapped.
struct HostEdu {
    device: VfioDevice,
    container: Arc<VfioContainer>,
    bar: *mut u8,
    bar_len: usize,
}

impl HostEdu {
    fn open(address: &str) -> anyhow::Result<Self> {
        let container = Arc::new(VfioContainer::new(None).context("cannot open /dev/vfio/vfio")?);
        let ops: Arc<dyn VfioOps> = container.clone();
        let device = VfioDevice::new(&Path::new(SYSFS_PCI_DEVICES).join(address), ops, false)
            .with_context(|| format!("cannot open {address} through VFIO"))?;
        device.reset();
        let bar_len = usize::try_from(device.get_region_size(0))?;
        let offset = libc::off_t::try_from(device.get_region_offset(0))?;
        if bar_len < PAGE {
            bail!("{address}: BAR 0 is {bar_len} bytes");
        }
        // SAFETY: a new shared mapping of the device's BAR 0 at an address the kernel picks;
        // checked before use, unmapped on drop.
        let bar = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bar_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                device.as_raw_fd(),
                offset,
            )
        };
        if bar == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("cannot map BAR 0");
        }
        let edu = Self {
            device,
            container,
            bar: bar.cast(),
            bar_len,
        };
        let mut command = [0u8; 2];
        edu.device
            .region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut command, COMMAND);
        let command = u16::from_le_bytes(command) | COMMAND_ENABLE;
        edu.device.region_write(
            VFIO_PCI_CONFIG_REGION_INDEX,
            &command.to_le_bytes(),
            COMMAND,
        );
        if edu.read::<u32>(0) != EDU_ID {
            bail!("{address}: the id register reads {:#x}", edu.read::<u32>(0));
        }
        Ok(edu)
    }

    /// The register of type `T` at `offset` of BAR 0: within the mapping and aligned.
    fn register<T>(&self, offset: u64) -> *mut T {
        let offset = offset as usize;
        assert!(
            offset + std::mem::size_of::<T>() <= self.bar_len
                && offset.is_multiple_of(std::mem::align_of::<T>())
        );
        // SAFETY: within the mapping (checked above).
        unsafe { self.bar.add(offset).cast() }
    }

    fn read<T: Copy>(&self, offset: u64) -> T {
        // SAFETY: a register within the mapped BAR, aligned (see `register`).
        unsafe { self.register::<T>(offset).read_volatile() }
    }

    fn write<T: Copy>(&self, offset: u64, value: T) {
        // SAFETY: as in `read`.
        unsafe { self.register::<T>(offset).write_volatile(value) }
    }

    /// Reads as `/init edu` does them, DMA round trips and interrupts.
    fn measure(&self, args: &VfioBenchArgs) -> anyhow::Result<Times> {
        let read_ns = per_read_ns(args.read_batches, || {
            self.read::<u32>(0);
        });
        Ok(Times {
            read_ns,
            dma_round_trip_us: self.dma_round_trips(args.dma)?,
            interrupt_us: self.interrupts(args.interrupts)?,
            trapped_bar_accesses: 0,
        })
    }

    /// Reads of the id register through VFIO's region read, as a VMM serves a trapped BAR.
    fn vfio_reads(&self, batches: u32) -> Vec<f64> {
        let mut value = [0u8; 4];
        per_read_ns(batches, || self.device.region_read(0, &mut value, 0))
    }

    fn dma_round_trips(&self, rounds: u32) -> anyhow::Result<Vec<f64>> {
        let buffer = DmaBuffer::new(2 * PAGE)?;
        // SAFETY: the buffer is this process's own anonymous mapping, touched only through
        // volatile accesses while mapped for DMA, and unmapped from the IOMMU before it is
        // freed (the unmap below, then its drop).
        unsafe {
            self.container
                .vfio_dma_map(HOST_DMA_IOVA, buffer.len, buffer.at)
                .context("cannot map the DMA buffer")?;
        }
        let result = (|| {
            let mut us = Vec::new();
            for round in 0..rounds {
                for word in 0..EDU_BUFFER_BYTES / 4 {
                    buffer.write32(word, round.wrapping_mul(0x9e37_79b9) ^ word as u32);
                    buffer.write32(PAGE / 4 + word, 0);
                }
                let started = Instant::now();
                self.dma(HOST_DMA_IOVA, EDU_BUFFER, DMA_START)?;
                self.dma(
                    EDU_BUFFER,
                    HOST_DMA_IOVA + PAGE as u64,
                    DMA_START | DMA_TO_RAM,
                )?;
                us.push(started.elapsed().as_secs_f64() * 1e6);
                if (0..EDU_BUFFER_BYTES / 4)
                    .any(|w| buffer.read32(w) != buffer.read32(PAGE / 4 + w))
                {
                    bail!("DMA round {round}: the data came back different");
                }
            }
            Ok(us)
        })();
        if let Err(e) = self.container.vfio_dma_unmap(HOST_DMA_IOVA, buffer.len) {
            // The device may still reach it: never freed.
            std::mem::forget(buffer);
            return Err(e).context("cannot unmap the DMA buffer");
        }
        result
    }

    fn dma(&self, source: u64, dest: u64, command: u64) -> anyhow::Result<()> {
        self.write::<u64>(REG_DMA_SOURCE, source);
        self.write::<u64>(REG_DMA_DEST, dest);
        self.write::<u64>(REG_DMA_COUNT, EDU_BUFFER_BYTES as u64);
        self.write::<u64>(REG_DMA_COMMAND, command);
        let started = Instant::now();
        while self.read::<u64>(REG_DMA_COMMAND) & DMA_START != 0 {
            if started.elapsed() > WAIT {
                bail!("a DMA did not finish");
            }
            std::thread::yield_now();
        }
        Ok(())
    }

    /// INTx through an eventfd, as a VMM gets it; VFIO masks the line on each interrupt and
    /// the program unmasks it once the device is acknowledged.
    fn interrupts(&self, count: u32) -> anyhow::Result<Vec<f64>> {
        let trigger = EventFd::new(libc::EFD_NONBLOCK).context("eventfd")?;
        self.device
            .enable_irq(VFIO_PCI_INTX_IRQ_INDEX, vec![&trigger])
            .context("cannot enable INTx")?;
        let result = (|| {
            let mut us = Vec::new();
            for _ in 0..count {
                let started = Instant::now();
                self.write::<u32>(REG_RAISE, 1);
                wait_readable(trigger.as_raw_fd())?;
                trigger.read().context("eventfd")?;
                us.push(started.elapsed().as_secs_f64() * 1e6);
                self.write::<u32>(REG_ACK, 1);
                self.device
                    .unmask_irq(VFIO_PCI_INTX_IRQ_INDEX)
                    .context("cannot unmask INTx")?;
            }
            Ok(us)
        })();
        let _ = self.device.disable_irq(VFIO_PCI_INTX_IRQ_INDEX);
        result
    }
}

impl Drop for HostEdu {
    fn drop(&mut self) {
        // SAFETY: the mapping `open` made, not used after this.
        unsafe { libc::munmap(self.bar.cast(), self.bar_len) };
    }
}

/// Anonymous memory the device reads and writes by DMA; accessed only with volatile accesses.
struct DmaBuffer {
    at: *mut u8,
    len: usize,
}

impl DmaBuffer {
    fn new(len: usize) -> anyhow::Result<Self> {
        // SAFETY: a new private anonymous mapping; checked before use.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("cannot allocate the DMA buffer");
        }
        Ok(Self { at: at.cast(), len })
    }

    fn read32(&self, word: usize) -> u32 {
        assert!((word + 1) * 4 <= self.len);
        // SAFETY: within the buffer and aligned.
        unsafe { self.at.cast::<u32>().add(word).read_volatile() }
    }

    fn write32(&self, word: usize, value: u32) {
        assert!((word + 1) * 4 <= self.len);
        // SAFETY: within the buffer and aligned.
        unsafe { self.at.cast::<u32>().add(word).write_volatile(value) }
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        // SAFETY: the mapping `new` made, no longer mapped for DMA (see its user).
        unsafe { libc::munmap(self.at.cast(), self.len) };
    }
}

/// Nanoseconds per `read`, over each of `batches` batches of [`READS_PER_BATCH`].
fn per_read_ns(batches: u32, mut read: impl FnMut()) -> Vec<f64> {
    (0..batches)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..READS_PER_BATCH {
                read();
            }
            started.elapsed().as_nanos() as f64 / f64::from(READS_PER_BATCH)
        })
        .collect()
}

fn wait_readable(fd: i32) -> anyhow::Result<()> {
    let mut fds = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd that lives across the call.
    match unsafe { libc::poll(&mut fds, 1, WAIT.as_millis() as libc::c_int) } {
        1 => Ok(()),
        0 => bail!("the interrupt did not come"),
        _ => Err(std::io::Error::last_os_error()).context("poll"),
    }
}
