//! What the fuzz targets share: a cursor that turns fuzz bytes into fields, and the guest memory
//! and queues the virtio targets lay out from them.

use agentos_vmm::vstate::memory::GuestMemory;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Low RAM, where the targets put descriptor tables, rings and buffers.
pub const LOW_RAM_BYTES: usize = 0x1_0000;
/// A region right after low RAM: a buffer may run from one region into the next.
pub const NEXT_RAM_START: u64 = LOW_RAM_BYTES as u64;
pub const NEXT_RAM_BYTES: usize = 0x1000;
/// A region after a hole: a buffer may start, end or lie in the hole.
pub const FAR_RAM_START: u64 = 0x2_0000;
pub const FAR_RAM_BYTES: usize = 0x1000;

/// The vsock device's queue size: the most a driver may choose.
pub const MAX_QUEUE_SIZE: u16 = 256;

/// 68 KiB of guest RAM in three regions, two adjacent and one after a hole.
pub fn guest_memory() -> GuestMemory {
    GuestMemory::from_ranges(&[
        (GuestAddress(0), LOW_RAM_BYTES),
        (GuestAddress(NEXT_RAM_START), NEXT_RAM_BYTES),
        (GuestAddress(FAR_RAM_START), FAR_RAM_BYTES),
    ])
    .expect("cannot map 68 KiB of guest memory")
}

/// A queue size a driver may choose, from one fuzz byte: a power of two from 1 to 256.
pub fn queue_size(byte: u8) -> u16 {
    1 << (byte % 9)
}

/// Where a split virtqueue of some size lives in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct QueueLayout {
    pub size: u16,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl QueueLayout {
    /// A queue of `size` entries whose descriptor table starts at `base` (16-byte aligned), its
    /// rings right after it, as a driver packs them.
    pub fn packed_at(base: u64, size: u16) -> Self {
        let n = u64::from(size);
        let desc_table = base;
        let avail_ring = desc_table + 16 * n;
        // flags, idx, ring[size], used_event; the used ring is 4-byte aligned.
        let used_ring = (avail_ring + 6 + 2 * n).next_multiple_of(4);
        Self {
            size,
            desc_table,
            avail_ring,
            used_ring,
        }
    }

    /// The first 16-byte aligned address past the used ring (flags, idx, ring[size], avail_event).
    pub fn end(&self) -> u64 {
        (self.used_ring + 6 + 8 * u64::from(self.size)).next_multiple_of(16)
    }

    /// The device's view of this queue, set up as the virtio-mmio transport would.
    pub fn queue(&self) -> Queue {
        let mut queue = Queue::new(MAX_QUEUE_SIZE).expect("256 is a valid queue size");
        queue.set_size(self.size);
        let split = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
        let (lo, hi) = split(self.desc_table);
        queue.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.avail_ring);
        queue.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used_ring);
        queue.set_used_ring_address(lo, hi);
        queue.set_ready(true);
        queue
    }
}

/// Fields read off the front of the fuzz input, little-endian; zeros once it runs out, so that
/// every input means something.
pub struct Input<'a> {
    bytes: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    /// Up to `n` bytes.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.bytes.split_at(n.min(self.bytes.len()));
        self.bytes = tail;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let head = self.take(N);
        out[..head.len()].copy_from_slice(head);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// Whether every byte has been read.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Everything not read yet.
    pub fn rest(self) -> &'a [u8] {
        self.bytes
    }
}

/// Size of one descriptor in a split queue's table.
const DESC_BYTES: usize = 16;

/// One chain offered in a queue at 0, laid out from fuzz input: queue size (1 byte, 2^(b % 9)),
/// chain head (2), descriptor count (1), that many 16-byte descriptors (addr u64, len u32,
/// flags u16, next u16), then the bytes placed at `data_at`. Descriptors past the queue size
/// land under the rings, where only an indirect table can reach them; descriptors that point
/// elsewhere than `data_at` read whatever is there (zeros).
pub struct OfferedChain<'a> {
    pub mem: GuestMemory,
    pub layout: QueueLayout,
    pub head: u16,
    /// The bytes after the descriptors (also placed at `data_at`, as far as low RAM goes).
    pub bytes: &'a [u8],
}

impl<'a> OfferedChain<'a> {
    pub fn new(data: &'a [u8], data_at: u64) -> Self {
        let mut input = Input::new(data);
        let layout = QueueLayout::packed_at(0, queue_size(input.u8()));
        let head = input.u16();
        let count = usize::from(input.u8());
        let table = input.take(count * DESC_BYTES);
        let bytes = input.rest();
        let mem = guest_memory();
        mem.write_slice(table, GuestAddress(layout.desc_table))
            .expect("the descriptor table fits in low RAM");
        let room = LOW_RAM_BYTES - data_at as usize;
        mem.write_slice(&bytes[..bytes.len().min(room)], GuestAddress(data_at))
            .expect("the data fits in low RAM");
        // `head` as the available ring's only entry.
        let ring = [0u16, 1, head].map(u16::to_le_bytes).concat();
        mem.write_slice(&ring, GuestAddress(layout.avail_ring))
            .expect("the available ring is in low RAM");
        Self {
            mem,
            layout,
            head,
            bytes,
        }
    }

    /// The length the device wrote into the offered chain, after checking that it came back
    /// (the used ring holds exactly one entry; the device keeps its own used index from 0,
    /// whatever the table wrote over the ring).
    pub fn returned_len(&self) -> u32 {
        let used_idx: u16 = self
            .mem
            .read_obj(GuestAddress(self.layout.used_ring + 2))
            .expect("the used ring is in low RAM");
        assert_eq!(u16::from_le(used_idx), 1, "the chain was not returned");
        let used_len: u32 = self
            .mem
            .read_obj(GuestAddress(self.layout.used_ring + 8))
            .expect("the used ring is in low RAM");
        u32::from_le(used_len)
    }
}
