//! The block device fed hostile queues: requests laid out in guest memory by hand, over a real
//! file.

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use vm_memory::{Bytes, GuestAddress};

use std::sync::atomic::Ordering;

use super::request::{HEADER_SIZE, RequestHeader, S_IOERR, S_OK, S_UNSUPP};
use super::*;
use crate::devices::virtio::INTERRUPT_USED_RING;
use crate::devices::virtio::test_queue::GuestQueue;
use crate::vstate::memory::GuestMemory;
use vmm_sys_util::eventfd::EFD_NONBLOCK;

const MEM_SIZE: usize = 0x80_0000;
const HEADER: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x7f_0000;
const DISK_SECTORS: u64 = 64;

struct Harness {
    mem: GuestMemory,
    device: Block,
    metrics: Arc<BlockMetrics>,
    interrupt: Arc<VirtioInterrupt>,
    queue: GuestQueue,
    _disk: tempfile_like::Disk,
}

/// A disk file whose every byte tells where it is: byte `i` holds `i % 251`.
mod tempfile_like {
    use std::path::PathBuf;

    pub struct Disk(pub PathBuf);

    impl Disk {
        pub fn new(len: u64) -> (Self, std::fs::File) {
            let path = std::env::temp_dir().join(format!(
                "agentos-vmm-block-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            std::fs::write(&path, bytes).unwrap();
            let file = std::fs::File::open(&path).unwrap();
            (Self(path), file)
        }
    }

    impl Drop for Disk {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
}

fn expected(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|i| (i % 251) as u8)
        .collect()
}

impl Harness {
    fn new() -> Self {
        Self::with_disk(DISK_SECTORS * SECTOR_SIZE)
    }

    fn with_disk(len: u64) -> Self {
        let (disk, file) = tempfile_like::Disk::new(len);
        let metrics = Arc::new(BlockMetrics::default());
        let interrupt = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let mut device = Block::new(file, "models", interrupt.clone(), metrics.clone()).unwrap();
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let queue = GuestQueue::new(0);
        device
            .activate(Activation {
                mem: mem.clone(),
                queues: vec![queue.queue()],
                acked_features: 1 << VIRTIO_F_VERSION_1,
            })
            .unwrap();
        Self {
            mem,
            device,
            metrics,
            interrupt,
            queue,
            _disk: disk,
        }
    }

    fn header(&self, type_: u32, sector: u64) {
        let header = RequestHeader {
            type_: type_.into(),
            reserved: 0.into(),
            sector: sector.into(),
        };
        self.mem.write_obj(header, GuestAddress(HEADER)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Offers a request of the usual shape: header, one data buffer of `len`, status.
    fn request(&mut self, type_: u32, sector: u64, len: u32) -> u16 {
        self.header(type_, sector);
        let mut descs = vec![(HEADER, HEADER_SIZE as u32, false)];
        if len > 0 {
            descs.push((DATA, len, true));
        }
        descs.push((STATUS, 1, true));
        self.queue.add_chain(&self.mem, &descs)
    }

    fn run(&mut self) {
        self.device.process();
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn data(&self, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        buf
    }

    fn last_used(&self) -> (u32, u32) {
        let idx = self.queue.used_idx(&self.mem);
        self.queue.used_elem(&self.mem, idx.wrapping_sub(1))
    }
}

#[test]
fn the_config_space_gives_the_capacity_in_sectors_and_the_disk_is_read_only() {
    let h = Harness::new();
    let mut capacity = [0u8; 8];
    h.device.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), DISK_SECTORS);
    let mut seg_max = [0u8; 4];
    h.device.read_config(12, &mut seg_max);
    assert_eq!(u32::from_le_bytes(seg_max), SEG_MAX);
    // Past the end, and at offsets that overflow, reads are zero.
    let mut far = [0xffu8; 4];
    h.device.read_config(u64::MAX - 1, &mut far);
    assert_eq!(far, [0; 4]);
    assert_ne!(h.device.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(h.device.device_type(), VIRTIO_ID_BLOCK);
}

#[test]
fn a_read_copies_the_sectors_asked_for_into_guest_memory() {
    let mut h = Harness::new();
    let head = h.request(T_IN, 3, 4 * 512);
    h.run();
    assert_eq!(h.status(), S_OK);
    assert_eq!(h.data(4 * 512), expected(3 * 512, 4 * 512));
    assert_eq!(h.last_used(), (u32::from(head), 4 * 512 + 1));
    assert_eq!(h.metrics.reads.load(Ordering::Relaxed), 1);
    assert_eq!(h.metrics.read_bytes.load(Ordering::Relaxed), 2048);
    assert_eq!(
        h.interrupt.status() & INTERRUPT_USED_RING,
        INTERRUPT_USED_RING
    );
}

#[test]
fn a_read_spread_over_several_buffers_fills_them_in_order() {
    let mut h = Harness::new();
    h.header(T_IN, 1);
    h.queue.add_chain(
        &h.mem,
        &[
            (HEADER, HEADER_SIZE as u32, false),
            (DATA, 512, true),
            (DATA + 0x1000, 1024, true),
            (STATUS, 1, true),
        ],
    );
    h.run();
    assert_eq!(h.status(), S_OK);
    assert_eq!(h.data(512), expected(512, 512));
    let mut second = vec![0; 1024];
    h.mem
        .read_slice(&mut second, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(second, expected(1024, 1024));
}

#[test]
fn a_read_larger_than_a_chunk_arrives_whole() {
    let mut h = Harness::with_disk(1 << 20);
    let len = 3 * CHUNK_BYTES + 512;
    h.request(T_IN, 8, len as u32);
    h.run();
    assert_eq!(h.status(), S_OK);
    assert_eq!(h.data(len), expected(8 * 512, len));
}

#[test]
fn reads_past_the_end_of_partial_sectors_or_too_large_are_io_errors_and_counted() {
    let mut h = Harness::new();
    for (sector, len) in [
        (DISK_SECTORS, 512),
        (DISK_SECTORS - 1, 1024),
        (u64::MAX / 512, 512),
        (u64::MAX, 512),
        (0, 100),
    ] {
        h.request(T_IN, sector, len);
        h.run();
        assert_eq!(h.status(), S_IOERR, "sector {sector}, {len} bytes");
        // Only the status byte was written.
        assert_eq!(h.last_used().1, 1);
    }
    assert_eq!(h.metrics.bad_ranges.load(Ordering::Relaxed), 5);
    assert_eq!(h.metrics.reads.load(Ordering::Relaxed), 0);
    // A read as large as the guest's memory allows, over the per-request bound.
    h.request(T_IN, 0, (MAX_REQUEST_BYTES + 512) as u32);
    h.run();
    assert_eq!(h.status(), S_IOERR);
    assert_eq!(h.metrics.bad_ranges.load(Ordering::Relaxed), 6);
}

#[test]
fn writes_are_refused_and_the_file_is_untouched() {
    let mut h = Harness::new();
    h.mem.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
    h.header(T_OUT, 0);
    h.queue.add_chain(
        &h.mem,
        &[
            (HEADER, HEADER_SIZE as u32, false),
            (DATA, 512, false),
            (STATUS, 1, true),
        ],
    );
    h.run();
    assert_eq!(h.status(), S_IOERR);
    assert_eq!(h.metrics.writes_refused.load(Ordering::Relaxed), 1);
    let on_disk = std::fs::read(&h._disk.0).unwrap();
    assert_eq!(&on_disk[..512], &expected(0, 512)[..]);
}

#[test]
fn get_id_flush_and_unknown_requests_are_answered() {
    let mut h = Harness::new();
    h.request(T_GET_ID, 0, 20);
    h.run();
    assert_eq!(h.status(), S_OK);
    assert_eq!(&h.data(20)[..6], b"models");
    assert_eq!(h.data(20)[6..], [0; 14]);
    h.request(T_FLUSH, 0, 0);
    h.run();
    assert_eq!(h.status(), S_OK);
    // Discard (11) and write zeroes (13) are not served.
    for type_ in [11, 13, 0xdead_beef] {
        h.request(type_, 0, 512);
        h.run();
        assert_eq!(h.status(), S_UNSUPP);
    }
    let m = h.metrics.snapshot();
    assert_eq!((m.get_ids, m.flushes, m.unsupported), (1, 1, 3));
}

#[test]
fn chains_without_a_header_or_a_status_or_outside_memory_are_returned_empty() {
    let mut h = Harness::new();
    // A header of 8 bytes.
    h.header(T_IN, 0);
    h.queue
        .add_chain(&h.mem, &[(HEADER, 8, false), (STATUS, 1, true)]);
    // No writable byte at all.
    h.queue
        .add_chain(&h.mem, &[(HEADER, HEADER_SIZE as u32, false)]);
    // A data buffer past the end of guest memory.
    h.queue.add_chain(
        &h.mem,
        &[
            (HEADER, HEADER_SIZE as u32, false),
            (MEM_SIZE as u64 - 256, 512, true),
            (STATUS, 1, true),
        ],
    );
    h.run();
    assert_eq!(h.queue.used_idx(&h.mem), 3);
    for n in 0..3 {
        assert_eq!(h.queue.used_elem(&h.mem, n).1, 0, "chain {n}");
    }
    assert_eq!(h.metrics.bad_chains.load(Ordering::Relaxed), 3);
    assert_eq!(h.metrics.reads.load(Ordering::Relaxed), 0);
}

#[test]
fn an_indirect_chain_is_refused_without_being_followed() {
    let mut h = Harness::new();
    let indirect = VRING_DESC_F_INDIRECT as u16;
    h.queue.write_desc(
        &h.mem,
        0,
        SplitDescriptor::new(0x40_0000, 16 * 4, indirect, 0),
    );
    h.queue.offer(&h.mem, 0);
    h.run();
    assert_eq!(h.queue.used_idx(&h.mem), 1);
    assert_eq!(h.metrics.indirect_chains.load(Ordering::Relaxed), 1);
    assert_eq!(h.metrics.bad_chains.load(Ordering::Relaxed), 1);
}

#[test]
fn a_chain_that_loops_ends_at_the_queue_size() {
    let mut h = Harness::new();
    h.header(T_IN, 0);
    let next = VRING_DESC_F_NEXT as u16;
    h.queue.write_desc(
        &h.mem,
        0,
        SplitDescriptor::new(HEADER, HEADER_SIZE as u32, next, 1),
    );
    h.queue.write_desc(
        &h.mem,
        1,
        SplitDescriptor::new(HEADER, HEADER_SIZE as u32, next, 0),
    );
    h.queue.offer(&h.mem, 0);
    h.run();
    assert_eq!(h.queue.used_idx(&h.mem), 1);
    assert_eq!(h.queue.used_elem(&h.mem, 0).1, 0);
}

#[test]
fn a_corrupt_available_index_ends_the_drain() {
    let mut h = Harness::new();
    h.queue.set_avail_idx(&h.mem, 1000);
    h.run();
    assert_eq!(h.queue.used_idx(&h.mem), 0);
    assert_eq!(h.metrics.bad_chains.load(Ordering::Relaxed), 1);
}

#[test]
fn a_file_that_shrank_is_an_io_error_not_a_panic() {
    let mut h = Harness::new();
    std::fs::File::options()
        .write(true)
        .open(&h._disk.0)
        .unwrap()
        .set_len(512)
        .unwrap();
    h.request(T_IN, 4, 512);
    h.run();
    assert_eq!(h.status(), S_IOERR);
    assert_eq!(h.metrics.io_errors.load(Ordering::Relaxed), 1);
}

#[test]
fn disks_that_are_empty_or_not_whole_sectors_or_with_long_ids_are_refused() {
    let interrupt = || Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let metrics = || Arc::new(BlockMetrics::default());
    let (_empty, file) = tempfile_like::Disk::new(0);
    assert!(matches!(
        Block::new(file, "x", interrupt(), metrics()),
        Err(BlockError::Empty)
    ));
    let (_odd, file) = tempfile_like::Disk::new(1000);
    assert!(matches!(
        Block::new(file, "x", interrupt(), metrics()),
        Err(BlockError::NotSectors(1000))
    ));
    let (_ok, file) = tempfile_like::Disk::new(512);
    assert!(matches!(
        Block::new(file, "an-id-of-twenty-one-b", interrupt(), metrics()),
        Err(BlockError::IdTooLong(_))
    ));
    let dir = std::fs::File::open(std::env::temp_dir()).unwrap();
    assert!(matches!(
        Block::new(dir, "x", interrupt(), metrics()),
        Err(BlockError::NotAFile)
    ));
}
