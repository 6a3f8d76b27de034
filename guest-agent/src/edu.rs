//! `agentos-guest edu`: times QEMU's `edu` test device from inside an agent it was passed to
//! (`agentos bench vfio` runs it, and does the same from the host through VFIO): register reads
//! through the device's BAR, DMA round trips into guest RAM (a reserved page, or a program's
//! locked page at the guest-physical address /proc/self/pagemap gives), and the time
//! from asking the device for an interrupt to a program waiting for it (INTx, through the
//! kernel's generic userspace I/O driver). Prints one JSON object.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The device's ids, its id register's value and registers (QEMU's docs/specs/edu.rst).
const EDU_IDS: (&str, &str) = ("0x1234", "0x11e8");
const EDU_ID: u32 = 0x0100_00ed;
const REG_ID: usize = 0x00;
const REG_RAISE: usize = 0x60;
const REG_ACK: usize = 0x64;
const REG_DMA_SOURCE: usize = 0x80;
const REG_DMA_DEST: usize = 0x88;
const REG_DMA_COUNT: usize = 0x90;
const REG_DMA_COMMAND: usize = 0x98;
/// DMA command bits: start, and the direction "from the device's buffer to RAM".
const DMA_START: u64 = 1;
const DMA_TO_RAM: u64 = 2;
/// The device's own buffer, as its DMA engine addresses it, and its size.
pub const EDU_BUFFER: u64 = 0x40000;
pub const EDU_BUFFER_BYTES: usize = 4096;
/// PCI command register: memory space, bus master, INTx disabled.
const COMMAND: u64 = 4;
const COMMAND_ENABLE: u16 = 0x6;
const COMMAND_INTX_DISABLE: u16 = 0x400;

const PAGE: usize = 4096;
/// Register reads per timed batch.
const READS_PER_BATCH: u32 = 100;
/// The longest wait for a DMA or an interrupt: the device's DMA takes 100 ms of its clock.
const WAIT: Duration = Duration::from_secs(10);
/// Most of each measurement one run takes.
const MAX_COUNT: u32 = 10_000;

struct Options {
    batches: u32,
    dma: u32,
    interrupts: u32,
    /// Where the DMA goes: two pages of guest RAM the kernel leaves alone (`memmap=8K$ADDRESS`),
    /// or two pages of this program's own memory, locked, found through /proc/self/pagemap.
    dma_to: Option<DmaPages>,
}

#[derive(Clone, Copy)]
enum DmaPages {
    Reserved(u64),
    Locked,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut options = Options {
        batches: 20,
        dma: 0,
        interrupts: 0,
        dma_to: None,
    };
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        if flag == "--dma-locked" {
            options.dma_to = Some(DmaPages::Locked);
            continue;
        }
        let value = rest.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let count = || -> Result<u32, String> {
            value
                .parse::<u32>()
                .ok()
                .filter(|n| *n <= MAX_COUNT)
                .ok_or_else(|| format!("{flag} needs a number up to {MAX_COUNT}"))
        };
        match flag.as_str() {
            "--read-batches" => options.batches = count()?,
            "--dma" => options.dma = count()?,
            "--interrupts" => options.interrupts = count()?,
            "--dma-page" => {
                let hex = value.trim_start_matches("0x");
                let page = u64::from_str_radix(hex, 16)
                    .ok()
                    .filter(|p| p.is_multiple_of(PAGE as u64))
                    .ok_or("--dma-page needs a page-aligned hexadecimal address")?;
                options.dma_to = Some(DmaPages::Reserved(page));
            }
            other => return Err(format!("unexpected argument `{other}`")),
        }
    }
    if options.dma > 0 && options.dma_to.is_none() {
        return Err("--dma needs --dma-page ADDRESS or --dma-locked".to_owned());
    }
    Ok(options)
}

/// A shared mapping of device registers or reserved RAM, unmapped on drop.
struct Mapping {
    at: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(file: &File, offset: u64, len: usize) -> Result<Self, String> {
        let offset = libc::off_t::try_from(offset).map_err(|_| "offset out of range")?;
        // SAFETY: a new shared mapping at an address the kernel picks; checked below.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        Ok(Self { at: at.cast(), len })
    }

    /// The value of type `T` at `offset`: within the mapping and aligned.
    fn place<T>(&self, offset: usize) -> *mut T {
        assert!(
            offset + std::mem::size_of::<T>() <= self.len
                && offset.is_multiple_of(std::mem::align_of::<T>())
        );
        // SAFETY: within the mapping (checked above).
        unsafe { self.at.add(offset).cast() }
    }

    fn read<T: Copy>(&self, offset: usize) -> T {
        // SAFETY: within the mapping and aligned (see `place`).
        unsafe { self.place::<T>(offset).read_volatile() }
    }

    fn write<T: Copy>(&self, offset: usize, value: T) {
        // SAFETY: as in `read`.
        unsafe { self.place::<T>(offset).write_volatile(value) }
    }
}

impl Mapping {
    /// `len` bytes of this process's memory, present and locked, so that their physical pages
    /// stay where the device writes.
    fn locked(len: usize) -> Result<Self, String> {
        // SAFETY: a new private anonymous mapping at an address the kernel picks; checked below.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | libc::MAP_LOCKED,
                -1,
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        let mapping = Self { at: at.cast(), len };
        // SAFETY: the mapping just made, whole.
        if unsafe { libc::mlock(at, len) } != 0 {
            return Err(format!("mlock: {}", std::io::Error::last_os_error()));
        }
        Ok(mapping)
    }
}

/// The physical address of the page at `virt`, from /proc/self/pagemap (bit 63: present; bits
/// 0-54: the frame number, which only root sees).
fn physical(virt: *mut u8) -> Result<u64, String> {
    let pagemap = File::open("/proc/self/pagemap").map_err(|e| format!("pagemap: {e}"))?;
    let mut entry = [0u8; 8];
    pagemap
        .read_exact_at(&mut entry, (virt as u64 / PAGE as u64) * 8)
        .map_err(|e| format!("pagemap: {e}"))?;
    let entry = u64::from_le_bytes(entry);
    let frame = entry & ((1 << 55) - 1);
    if entry & (1 << 63) == 0 || frame == 0 {
        return Err("the locked page is not present, or its frame is hidden".to_owned());
    }
    Ok(frame * PAGE as u64)
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping this value made, not used after this.
        unsafe { libc::munmap(self.at.cast(), self.len) };
    }
}

/// The device's directory under /sys/bus/pci/devices.
fn find_edu() -> Result<PathBuf, String> {
    let read = |dir: &Path, name: &str| fs::read_to_string(dir.join(name)).unwrap_or_default();
    fs::read_dir("/sys/bus/pci/devices")
        .map_err(|e| format!("/sys/bus/pci/devices: {e}"))?
        .flatten()
        .map(|entry| entry.path())
        .find(|dir| {
            read(dir, "vendor").trim() == EDU_IDS.0 && read(dir, "device").trim() == EDU_IDS.1
        })
        .ok_or_else(|| "no edu device on this PCI bus".to_owned())
}

fn set_command(config: &File, set: u16, clear: u16) -> Result<(), String> {
    let mut bytes = [0u8; 2];
    config
        .read_exact_at(&mut bytes, COMMAND)
        .map_err(|e| format!("config: {e}"))?;
    let command = (u16::from_le_bytes(bytes) | set) & !clear;
    config
        .write_all_at(&command.to_le_bytes(), COMMAND)
        .map_err(|e| format!("config: {e}"))
}

/// `agentos-guest edu [--read-batches N] [--dma N (--dma-page ADDRESS | --dma-locked)]
/// [--interrupts N]`.
pub fn command(args: &[String]) -> Result<String, String> {
    let options = parse(args)?;
    let dir = find_edu()?;
    let config = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("config"))
        .map_err(|e| format!("config: {e}"))?;
    set_command(&config, COMMAND_ENABLE, 0)?;
    let bar_file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("resource0"))
        .map_err(|e| format!("resource0: {e}"))?;
    let bar = Mapping::new(&bar_file, 0, PAGE)?;
    if bar.read::<u32>(REG_ID) != EDU_ID {
        return Err(format!(
            "the id register reads {:#x}",
            bar.read::<u32>(REG_ID)
        ));
    }

    let mut read_ns = Vec::new();
    for _ in 0..options.batches {
        let started = Instant::now();
        for _ in 0..READS_PER_BATCH {
            bar.read::<u32>(REG_ID);
        }
        read_ns.push(started.elapsed().as_nanos() as f64 / f64::from(READS_PER_BATCH));
    }

    let mut dma_us = Vec::new();
    if let Some(to) = options.dma_to {
        let (ram, addresses) = match to {
            DmaPages::Reserved(page) => {
                let mem = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/mem")
                    .map_err(|e| format!("/dev/mem: {e}"))?;
                (
                    Mapping::new(&mem, page, 2 * PAGE)?,
                    [page, page + PAGE as u64],
                )
            }
            DmaPages::Locked => {
                let ram = Mapping::locked(2 * PAGE)?;
                let addresses = [physical(ram.at)?, physical(ram.at.wrapping_add(PAGE))?];
                (ram, addresses)
            }
        };
        let [page, second] = addresses;
        for round in 0..options.dma {
            for word in 0..EDU_BUFFER_BYTES / 4 {
                ram.write::<u32>(word * 4, round.wrapping_mul(0x9e37_79b9) ^ word as u32);
                ram.write::<u32>(PAGE + word * 4, 0);
            }
            let started = Instant::now();
            dma(&bar, page, EDU_BUFFER, DMA_START)?;
            dma(&bar, EDU_BUFFER, second, DMA_START | DMA_TO_RAM)?;
            dma_us.push(started.elapsed().as_secs_f64() * 1e6);
            if let Some(word) = (0..EDU_BUFFER_BYTES / 4)
                .find(|w| ram.read::<u32>(w * 4) != ram.read::<u32>(PAGE + w * 4))
            {
                return Err(format!(
                    "DMA round {round}: word {word} came back different"
                ));
            }
        }
    }

    let mut interrupt_us = Vec::new();
    if options.interrupts > 0 {
        let mut uio = open_uio(&dir)?;
        for _ in 0..options.interrupts {
            let started = Instant::now();
            bar.write::<u32>(REG_RAISE, 1);
            wait_readable(&uio)?;
            let mut count = [0u8; 4];
            uio.read_exact(&mut count)
                .map_err(|e| format!("/dev/uio: {e}"))?;
            interrupt_us.push(started.elapsed().as_secs_f64() * 1e6);
            bar.write::<u32>(REG_ACK, 1);
            // The generic driver masks the line on each interrupt; a program unmasks it.
            set_command(&config, 0, COMMAND_INTX_DISABLE)?;
        }
    }
    Ok(serde_json::json!({
        "read_ns": read_ns,
        "dma_round_trip_us": dma_us,
        "dma_round_trip_bytes": 2 * EDU_BUFFER_BYTES,
        "interrupt_us": interrupt_us,
    })
    .to_string())
}

/// One transfer of the device's whole buffer, waited for.
fn dma(bar: &Mapping, source: u64, dest: u64, command: u64) -> Result<(), String> {
    bar.write::<u64>(REG_DMA_SOURCE, source);
    bar.write::<u64>(REG_DMA_DEST, dest);
    bar.write::<u64>(REG_DMA_COUNT, EDU_BUFFER_BYTES as u64);
    bar.write::<u64>(REG_DMA_COMMAND, command);
    let started = Instant::now();
    while bar.read::<u64>(REG_DMA_COMMAND) & DMA_START != 0 {
        if started.elapsed() > WAIT {
            return Err("a DMA did not finish".to_owned());
        }
        std::thread::yield_now();
    }
    Ok(())
}

/// The device bound to the generic userspace I/O driver, and its `/dev/uioN`.
fn open_uio(dir: &Path) -> Result<File, String> {
    let uio_dir = dir.join("uio");
    if !uio_dir.exists() {
        let ids = format!("{} {}", &EDU_IDS.0[2..], &EDU_IDS.1[2..]);
        fs::write("/sys/bus/pci/drivers/uio_pci_generic/new_id", ids)
            .map_err(|e| format!("binding uio_pci_generic: {e}"))?;
    }
    let name = fs::read_dir(&uio_dir)
        .map_err(|e| format!("{}: {e}", uio_dir.display()))?
        .flatten()
        .map(|e| e.file_name())
        .next()
        .ok_or("the device has no uio node")?;
    File::open(Path::new("/dev").join(name)).map_err(|e| format!("/dev/uio: {e}"))
}

fn wait_readable(file: &File) -> Result<(), String> {
    let mut fds = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd that lives across the call.
    let ready = unsafe { libc::poll(&mut fds, 1, WAIT.as_millis() as libc::c_int) };
    match ready {
        1 => Ok(()),
        0 => Err("the interrupt did not come".to_owned()),
        _ => Err(format!("poll: {}", std::io::Error::last_os_error())),
    }
}
