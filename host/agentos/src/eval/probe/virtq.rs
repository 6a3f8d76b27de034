//! `probe descriptors BASE`: drives the virtio-vsock device at guest-physical `BASE` directly,
//! as a hostile guest kernel could, and hands it malformed descriptor chains.
//!
//! The probe takes the device away from the guest's own driver: it resets it through the
//! virtio-mmio registers (mapped from `/dev/mem`, which the case's kernel allows with
//! `iomem=relaxed`), lays out its own queues in pages of its own memory (locked, their physical
//! addresses read from `/proc/self/pagemap`) and negotiates again. Each attack starts from a
//! fresh reset, puts one chain in a queue, notifies, and prints what came back in the used ring.
//! The guest's vsock is gone afterwards; the VMM's counters tell the host what it refused.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::ptr::NonNull;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

const PAGE: usize = 4096;
/// Three queues (receive, transmit, event) of three pages each, then data pages.
const PAGES: usize = 16;
const DATA_PAGE: usize = 9;
/// Entries per queue: small, a power of two, under the device's maximum.
const QUEUE_SIZE: u16 = 16;
const RX: usize = 0;
const TX: usize = 1;
/// How long an attack waits for the device to return its chain.
const USED_WAIT: Duration = Duration::from_millis(500);
/// How long the notification storm lasts.
const STORM: Duration = Duration::from_secs(3);
/// A host port nobody listens on: a connection request to it is answered with a reset.
const CLOSED_PORT: u32 = 9;
const HOST_CID: u64 = 2;
const HEADER_BYTES: u32 = 44;
const OP_RST: u16 = 3;

mod reg {
    pub const MAGIC: usize = 0x000;
    pub const DRIVER_FEATURES: usize = 0x020;
    pub const DRIVER_FEATURES_SEL: usize = 0x024;
    pub const QUEUE_SEL: usize = 0x030;
    pub const QUEUE_NUM: usize = 0x038;
    pub const QUEUE_READY: usize = 0x044;
    pub const QUEUE_NOTIFY: usize = 0x050;
    pub const STATUS: usize = 0x070;
    pub const QUEUE_DESC: usize = 0x080;
    pub const QUEUE_AVAIL: usize = 0x090;
    pub const QUEUE_USED: usize = 0x0a0;
    pub const CONFIG: usize = 0x100;
}

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// One descriptor as the probe writes it.
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// An mmap'd region, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn anonymous_locked(len: usize) -> Result<Self, String> {
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_LOCKED | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        Self::checked(ptr, len, "locked memory")
    }

    fn device(mem: &File, base: u64) -> Result<Self, String> {
        let offset = libc::off_t::try_from(base).map_err(|_| "BASE is out of range")?;
        // SAFETY: maps one page of /dev/mem; the kernel checks the range and our rights to it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                mem.as_raw_fd(),
                offset,
            )
        };
        Self::checked(ptr, PAGE, "the device's registers through /dev/mem")
    }

    fn checked(ptr: *mut libc::c_void, len: usize, what: &str) -> Result<Self, String> {
        if ptr == libc::MAP_FAILED {
            return Err(format!(
                "cannot map {what}: {}",
                std::io::Error::last_os_error()
            ));
        }
        let ptr = NonNull::new(ptr.cast()).ok_or("mmap returned null")?;
        Ok(Self { ptr, len })
    }

    /// A volatile write of `value` at byte `offset` (in bounds, aligned for `T`).
    fn write<T: Copy>(&self, offset: usize, value: T) {
        assert!(offset + size_of::<T>() <= self.len && offset.is_multiple_of(align_of::<T>()));
        // SAFETY: in bounds and aligned (asserted); the mapping lives as long as `self`.
        unsafe {
            self.ptr
                .as_ptr()
                .add(offset)
                .cast::<T>()
                .write_volatile(value)
        }
    }

    fn read<T: Copy>(&self, offset: usize) -> T {
        assert!(offset + size_of::<T>() <= self.len && offset.is_multiple_of(align_of::<T>()));
        // SAFETY: as in `write`.
        unsafe { self.ptr.as_ptr().add(offset).cast::<T>().read_volatile() }
    }

    fn zero(&self) {
        // SAFETY: the whole mapping, which is ours and writable.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr(), 0, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `mmap` gave us; nothing refers to it after drop.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The device's registers, the probe's queue memory, and the physical address of each page.
struct Device {
    regs: Mapping,
    mem: Mapping,
    phys: Vec<u64>,
    guest_cid: u64,
}

impl Device {
    fn open(base: u64) -> Result<Self, String> {
        let dev_mem = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_SYNC)
            .open("/dev/mem")
            .map_err(|e| format!("cannot open /dev/mem: {e}"))?;
        let regs = Mapping::device(&dev_mem, base)?;
        let magic: u32 = regs.read(reg::MAGIC);
        if magic != 0x7472_6976 {
            return Err(format!(
                "no virtio-mmio device at {base:#x} (magic {magic:#x})"
            ));
        }
        let mem = Mapping::anonymous_locked(PAGES * PAGE)?;
        let phys = physical_pages(&mem)?;
        let low: u32 = regs.read(reg::CONFIG);
        let high: u32 = regs.read(reg::CONFIG + 4);
        let guest_cid = u64::from(low) | (u64::from(high) << 32);
        Ok(Self {
            regs,
            mem,
            phys,
            guest_cid,
        })
    }

    fn reg(&self, offset: usize, value: u32) {
        self.regs.write(offset, value);
    }

    fn page(&self, index: usize) -> u64 {
        self.phys[index]
    }

    /// Offsets (in `mem`) of queue `q`'s descriptor table, available ring and used ring.
    fn layout(q: usize) -> (usize, usize, usize) {
        (3 * q * PAGE, (3 * q + 1) * PAGE, (3 * q + 2) * PAGE)
    }

    fn data(&self, offset: usize) -> u64 {
        self.page(DATA_PAGE) + offset as u64
    }

    /// Resets the device and sets it up again on the probe's own queues.
    fn reset_and_setup(&self) -> Result<(), String> {
        self.reg(reg::STATUS, 0);
        self.mem.zero();
        self.reg(reg::STATUS, 1);
        self.reg(reg::STATUS, 3);
        self.reg(reg::DRIVER_FEATURES_SEL, 1);
        self.reg(reg::DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1 (bit 32)
        self.reg(reg::DRIVER_FEATURES_SEL, 0);
        self.reg(reg::DRIVER_FEATURES, 0);
        self.reg(reg::STATUS, 0xb);
        let status: u32 = self.regs.read(reg::STATUS);
        if status & 8 == 0 {
            return Err(format!(
                "the device refused the features (status {status:#x})"
            ));
        }
        for q in 0..3 {
            let (desc, avail, used) = Self::layout(q);
            self.reg(reg::QUEUE_SEL, q as u32);
            self.reg(reg::QUEUE_NUM, u32::from(QUEUE_SIZE));
            for (register, offset) in [
                (reg::QUEUE_DESC, desc),
                (reg::QUEUE_AVAIL, avail),
                (reg::QUEUE_USED, used),
            ] {
                let addr = self.page(offset / PAGE);
                self.reg(register, addr as u32);
                self.reg(register + 4, (addr >> 32) as u32);
            }
            self.reg(reg::QUEUE_READY, 1);
        }
        self.reg(reg::STATUS, 0xf);
        let status: u32 = self.regs.read(reg::STATUS);
        if status & 0x4 == 0 || status & 0xc0 != 0 {
            return Err(format!("the device did not start (status {status:#x})"));
        }
        Ok(())
    }

    fn write_desc(&self, q: usize, index: u16, d: Desc) {
        let at = Self::layout(q).0 + usize::from(index) * 16;
        self.mem.write(at, d.addr);
        self.mem.write(at + 8, d.len);
        self.mem.write(at + 12, d.flags);
        self.mem.write(at + 14, d.next);
    }

    /// Offers `heads` in queue `q`'s available ring, with its index set to `idx`.
    fn offer(&self, q: usize, heads: &[u16], idx: u16) {
        let avail = Self::layout(q).1;
        for (slot, head) in heads.iter().enumerate() {
            self.mem.write(avail + 4 + 2 * slot, *head);
        }
        fence(Ordering::SeqCst);
        self.mem.write(avail + 2, idx);
        fence(Ordering::SeqCst);
        self.reg(reg::QUEUE_NOTIFY, q as u32);
    }

    /// Offers `heads` in queue `q`'s available ring after the `first` entries offered so far;
    /// returns the new available index.
    fn offer_after(&self, q: usize, first: u16, heads: &[u16]) -> u16 {
        let avail = Self::layout(q).1;
        let mut idx = first;
        for head in heads {
            let slot = usize::from(idx % QUEUE_SIZE);
            self.mem.write(avail + 4 + 2 * slot, *head);
            idx = idx.wrapping_add(1);
        }
        fence(Ordering::SeqCst);
        self.mem.write(avail + 2, idx);
        fence(Ordering::SeqCst);
        self.reg(reg::QUEUE_NOTIFY, q as u32);
        idx
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.mem.read(Self::layout(q).2 + 2)
    }

    /// Waits for queue `q`'s used index to reach `want`; describes what came back.
    fn wait_used(&self, q: usize, want: u16) -> String {
        let started = Instant::now();
        while started.elapsed() < USED_WAIT {
            let idx = self.used_idx(q);
            if idx >= want && idx != 0 {
                let used = Self::layout(q).2;
                let last = usize::from(idx - 1) % usize::from(QUEUE_SIZE);
                let id: u32 = self.mem.read(used + 4 + 8 * last);
                let len: u32 = self.mem.read(used + 8 + 8 * last);
                return format!("returned (used idx {idx}, id {id}, len {len})");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        format!("not returned (used idx {})", self.used_idx(q))
    }

    /// A vsock header at `offset` in the data page.
    fn header(&self, offset: usize, h: &Header) {
        let at = DATA_PAGE * PAGE + offset;
        self.mem.write(at, h.src_cid);
        self.mem.write(at + 8, HOST_CID);
        self.mem.write(at + 16, h.src_port);
        self.mem.write(at + 20, h.dst_port);
        self.mem.write(at + 24, h.len);
        self.mem.write(at + 28, h.type_);
        self.mem.write(at + 30, h.op);
        self.mem.write(at + 32, 0u32);
        self.mem.write(at + 36, 64 * 1024u32);
        self.mem.write(at + 40, 0u32);
    }

    /// A well-formed connection request to a closed host port, which the host answers with
    /// a reset on the receive queue.
    fn request(&self) -> Header {
        Header {
            src_cid: self.guest_cid,
            src_port: 4000,
            dst_port: CLOSED_PORT,
            len: 0,
            type_: 1,
            op: 1,
        }
    }
}

struct Header {
    src_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
}

/// Physical addresses of each page of `mem`, from `/proc/self/pagemap` (root only).
fn physical_pages(mem: &Mapping) -> Result<Vec<u64>, String> {
    let mut pagemap =
        File::open("/proc/self/pagemap").map_err(|e| format!("cannot open pagemap: {e}"))?;
    let first = mem.ptr.as_ptr() as u64 / PAGE as u64;
    let mut phys = Vec::with_capacity(mem.len / PAGE);
    for page in 0..(mem.len / PAGE) as u64 {
        let mut entry = [0u8; 8];
        pagemap
            .seek(SeekFrom::Start((first + page) * 8))
            .and_then(|_| pagemap.read_exact(&mut entry))
            .map_err(|e| format!("cannot read pagemap: {e}"))?;
        let entry = u64::from_le_bytes(entry);
        let pfn = entry & ((1 << 55) - 1);
        if entry >> 63 == 0 || pfn == 0 {
            return Err("pagemap shows no physical page (not root?)".into());
        }
        phys.push(pfn * PAGE as u64);
    }
    Ok(phys)
}

/// One attack: the chain's descriptors (head first, at index 0 onwards) and its queue.
struct Attack {
    name: &'static str,
    queue: usize,
    descs: Vec<Desc>,
    /// The available ring's index after the offer (1 for one chain; more lies about it).
    avail_idx: u16,
    /// The head the available ring names (0 normally).
    head: u16,
}

fn attacks(dev: &Device) -> Vec<Attack> {
    let data = dev.data(0);
    let tx_desc_table = dev.page(Device::layout(TX).0 / PAGE);
    let rx_used_ring = dev.page(Device::layout(RX).2 / PAGE);
    let one = |name, queue, descs: Vec<Desc>| Attack {
        name,
        queue,
        descs,
        avail_idx: 1,
        head: 0,
    };
    let d = |addr, len, flags, next| Desc {
        addr,
        len,
        flags,
        next,
    };
    vec![
        one(
            "tx-descriptor-loop",
            TX,
            vec![d(data, 44, F_NEXT, 1), d(data + 44, 8, F_NEXT, 0)],
        ),
        one("tx-self-loop", TX, vec![d(data, HEADER_BYTES, F_NEXT, 0)]),
        one("tx-next-out-of-range", TX, vec![d(data, 20, F_NEXT, 200)]),
        one(
            "tx-outside-guest-ram",
            TX,
            vec![d(0xffff_f000_0000, 4096, 0, 0)],
        ),
        one("tx-address-wraps", TX, vec![d(u64::MAX - 15, 64, 0, 0)]),
        one("tx-zero-length", TX, vec![d(data, 0, 0, 0)]),
        one("tx-huge-length", TX, vec![d(data, u32::MAX, 0, 0)]),
        one(
            "tx-header-split-then-huge",
            TX,
            vec![d(data, 20, F_NEXT, 1), d(data + 20, u32::MAX, 0, 0)],
        ),
        one(
            "tx-header-claims-more-than-chain",
            TX,
            vec![d(data + 64, HEADER_BYTES, 0, 0)],
        ),
        one(
            "tx-payload-over-limit",
            TX,
            vec![d(data + 128, HEADER_BYTES, 0, 0)],
        ),
        one(
            "tx-writable-descriptor",
            TX,
            vec![d(data + 192, HEADER_BYTES, F_WRITE, 0)],
        ),
        one(
            "tx-indirect-not-negotiated",
            TX,
            vec![d(data + 1024, 32, F_INDIRECT, 0)],
        ),
        one(
            "tx-indirect-after-a-good-descriptor",
            TX,
            vec![d(data, 20, F_NEXT, 1), d(data + 1024, 16, F_INDIRECT, 0)],
        ),
        one(
            "tx-chain-reads-its-own-table",
            TX,
            vec![d(tx_desc_table, 256, 0, 0)],
        ),
        one("tx-wrong-type", TX, vec![d(data + 256, HEADER_BYTES, 0, 0)]),
        one("tx-unknown-op", TX, vec![d(data + 320, HEADER_BYTES, 0, 0)]),
        one("tx-forged-cid", TX, vec![d(data + 384, HEADER_BYTES, 0, 0)]),
        Attack {
            name: "tx-avail-index-far-ahead",
            queue: TX,
            descs: vec![d(data + 448, HEADER_BYTES, 0, 0)],
            avail_idx: 1000,
            head: 0,
        },
        Attack {
            name: "tx-avail-head-out-of-range",
            queue: TX,
            descs: vec![d(data + 448, HEADER_BYTES, 0, 0)],
            avail_idx: 1,
            head: 99,
        },
        one("rx-read-only-buffer", RX, vec![d(data + 2048, 256, 0, 0)]),
        one(
            "rx-buffer-too-small",
            RX,
            vec![d(data + 2048, 8, F_WRITE, 0)],
        ),
        one(
            "rx-buffer-outside-guest-ram",
            RX,
            vec![d(0xffff_f000_0000, 4096, F_WRITE, 0)],
        ),
        one(
            "rx-buffer-over-the-used-ring",
            RX,
            vec![d(rx_used_ring, 256, F_WRITE, 0)],
        ),
        one(
            "rx-indirect-not-negotiated",
            RX,
            vec![d(data + 1536, 16, F_INDIRECT | F_WRITE, 0)],
        ),
        one(
            "rx-descriptor-loop",
            RX,
            vec![
                d(data + 2048, 16, F_WRITE | F_NEXT, 1),
                d(data + 2064, 16, F_WRITE | F_NEXT, 0),
            ],
        ),
    ]
}

/// Writes the packet headers the attacks above point at.
fn write_packets(dev: &Device) {
    let good = dev.request();
    // Claims 60,000 payload bytes; the chain holds none.
    dev.header(
        64,
        &Header {
            len: 60_000,
            ..dev.request()
        },
    );
    // Claims a 1 MiB payload, over the 64 KiB limit.
    dev.header(
        128,
        &Header {
            len: 1 << 20,
            ..dev.request()
        },
    );
    dev.header(192, &dev.request());
    dev.header(
        256,
        &Header {
            type_: 2,
            ..dev.request()
        },
    );
    dev.header(
        320,
        &Header {
            op: 99,
            ..dev.request()
        },
    );
    dev.header(
        384,
        &Header {
            src_cid: HOST_CID,
            ..dev.request()
        },
    );
    dev.header(448, &good);
    dev.header(0, &good);
    // An indirect table that loops on itself.
    let table = DATA_PAGE * PAGE + 1024;
    dev.mem.write(table, dev.data(0));
    dev.mem.write(table + 8, 20u32);
    dev.mem.write(table + 12, F_NEXT);
    dev.mem.write(table + 14, 0u16);
    dev.mem.write(table + 16, dev.data(1024));
    dev.mem.write(table + 24, 32u32);
    dev.mem.write(table + 28, F_INDIRECT);
    dev.mem.write(table + 30, 0u16);
    // An indirect table holding one good receive buffer.
    let rx_table = DATA_PAGE * PAGE + 1536;
    dev.mem.write(rx_table, dev.data(2048));
    dev.mem.write(rx_table + 8, 256u32);
    dev.mem.write(rx_table + 12, F_WRITE);
    dev.mem.write(rx_table + 14, 0u16);
}

/// Makes the host send to the guest: a connection request to a closed port, which is answered
/// with a reset that needs a receive buffer.
fn provoke_rx(dev: &Device) {
    dev.header(512, &dev.request());
    dev.write_desc(
        TX,
        0,
        Desc {
            addr: dev.data(512),
            len: HEADER_BYTES,
            flags: 0,
            next: 0,
        },
    );
    dev.offer(TX, &[0], 1);
}

pub fn descriptors_command(args: &[String]) -> Result<(), String> {
    let base = args
        .first()
        .map(|a| a.trim_start_matches("0x"))
        .and_then(|a| u64::from_str_radix(a, 16).ok())
        .ok_or("BASE must be a hex address")?;
    let dev = Device::open(base)?;
    println!(
        "descriptors: device at {base:#x}, guest cid {}",
        dev.guest_cid
    );
    let attacks = attacks(&dev);
    for attack in &attacks {
        dev.reset_and_setup()?;
        write_packets(&dev);
        for (i, desc) in attack.descs.iter().enumerate() {
            dev.write_desc(attack.queue, i as u16, *desc);
        }
        dev.offer(attack.queue, &[attack.head], attack.avail_idx);
        if attack.queue == RX {
            provoke_rx(&dev);
        }
        println!("{}: {}", attack.name, dev.wait_used(attack.queue, 1));
    }

    // A notification storm on a queue with nothing in it, and on queues that do not exist.
    dev.reset_and_setup()?;
    let started = Instant::now();
    let mut notified = 0u64;
    while started.elapsed() < STORM {
        for q in [TX as u32, RX as u32, 2, 7, u32::MAX] {
            dev.reg(reg::QUEUE_NOTIFY, q);
        }
        notified += 5;
    }
    println!(
        "notify-storm: {notified} notifications in {} s",
        STORM.as_secs()
    );

    // The device still works: a good request comes back as a reset in a good receive buffer.
    dev.reset_and_setup()?;
    dev.write_desc(
        RX,
        0,
        Desc {
            addr: dev.data(2048),
            len: 256,
            flags: F_WRITE,
            next: 0,
        },
    );
    dev.offer(RX, &[0], 1);
    provoke_rx(&dev);
    let tx = dev.wait_used(TX, 1);
    let rx = dev.wait_used(RX, 1);
    let op: u16 = dev.mem.read(DATA_PAGE * PAGE + 2048 + 30);
    println!("after-the-attacks: request {tx}; answer {rx}, op {op}");
    println!("descriptors: done, {} attacks", attacks.len());
    Ok(())
}

/// `probe rst-storm BASE PORT SECONDS`: takes the device over as `descriptors` does and, for
/// SECONDS, asks it to connect to host PORT and resets the connection at once, again and again,
/// without ever giving it a receive buffer: what the host owes the guest for each connection
/// (its answer) piles up unless the device's tables are bounded. Then a request to a closed port
/// must still be answered, with a reset, in a receive buffer given at last.
pub fn rst_storm_command(args: &[String]) -> Result<(), String> {
    let base = args
        .first()
        .map(|a| a.trim_start_matches("0x"))
        .and_then(|a| u64::from_str_radix(a, 16).ok())
        .ok_or("BASE must be a hex address")?;
    let port = super::number(args.get(1), "PORT")?;
    let secs = super::number(args.get(2), "SECONDS")?;
    let dev = Device::open(base)?;
    dev.reset_and_setup()?;
    let request = Header {
        dst_port: port,
        ..dev.request()
    };
    let reset = Header {
        op: OP_RST,
        ..request
    };
    dev.header(0, &request);
    dev.header(64, &reset);
    for (index, offset) in [(0u16, 0), (1, 64)] {
        dev.write_desc(
            TX,
            index,
            Desc {
                addr: dev.data(offset),
                len: HEADER_BYTES,
                flags: 0,
                next: 0,
            },
        );
    }
    // Each cycle offers the request and the reset, then waits for both to come back before
    // using the two descriptors again.
    let end = Instant::now() + Duration::from_secs(u64::from(secs));
    let (mut idx, mut cycles, mut stalled) = (0u16, 0u64, false);
    while Instant::now() < end && !stalled {
        idx = dev.offer_after(TX, idx, &[0, 1]);
        let offered = Instant::now();
        while dev.used_idx(TX) != idx {
            if offered.elapsed() > USED_WAIT {
                stalled = true;
                break;
            }
            std::hint::spin_loop();
        }
        cycles += u64::from(!stalled);
    }
    let stall = if stalled {
        ", then the device stopped returning them"
    } else {
        ""
    };
    println!("rst-storm: {cycles} request/reset cycles to port {port} in {secs} s{stall}");

    // A receive buffer at last, and a request to a closed port: the reset must come back in it.
    dev.write_desc(
        RX,
        0,
        Desc {
            addr: dev.data(2048),
            len: 256,
            flags: F_WRITE,
            next: 0,
        },
    );
    dev.offer(RX, &[0], 1);
    dev.header(512, &dev.request());
    dev.write_desc(
        TX,
        2,
        Desc {
            addr: dev.data(512),
            len: HEADER_BYTES,
            flags: 0,
            next: 0,
        },
    );
    dev.offer_after(TX, idx, &[2]);
    let rx = dev.wait_used(RX, 1);
    let op: u16 = dev.mem.read(DATA_PAGE * PAGE + 2048 + 30);
    println!("rst-storm: a receive buffer afterwards: {rx}, op {op}");
    println!("rst-storm: done");
    Ok(())
}
