//! The driver's side of a split virtqueue, for device tests: descriptor chains laid out in
//! guest memory by hand, as a guest (well-behaved or not) would.

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::vstate::memory::GuestMemory;

pub const QUEUE_LEN: u16 = 16;

/// The driver's side of one split virtqueue.
pub struct GuestQueue {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_desc: u16,
    pub avail_idx: u16,
}

impl GuestQueue {
    pub fn new(base: u64) -> Self {
        Self {
            desc: base,
            avail: base + 0x400,
            used: base + 0x800,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// The device's view of this queue, as the transport would hand it over.
    pub fn queue(&self) -> Queue {
        let mut queue = Queue::new(QUEUE_LEN).unwrap();
        queue.set_size(QUEUE_LEN);
        queue.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        queue.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        queue.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        queue.set_ready(true);
        queue
    }

    pub fn write_desc(&self, mem: &GuestMemory, index: u16, desc: SplitDescriptor) {
        let addr = GuestAddress(self.desc + 16 * u64::from(index));
        mem.write_obj(RawDescriptor::from(desc), addr).unwrap();
    }

    /// Writes a chain of `(address, length, device-writable)` descriptors and offers it.
    pub fn add_chain(&mut self, mem: &GuestMemory, descs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in descs.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % QUEUE_LEN;
            let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            let desc = SplitDescriptor::new(addr, len, flags as u16, self.next_desc);
            self.write_desc(mem, index, desc);
        }
        self.offer(mem, head);
        head
    }

    /// Puts `head` in the available ring, whatever it points to.
    pub fn offer(&mut self, mem: &GuestMemory, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % QUEUE_LEN);
        mem.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(mem, self.avail_idx);
    }

    pub fn set_avail_idx(&self, mem: &GuestMemory, idx: u16) {
        mem.write_obj(idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
    }

    pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
        u16::from_le(mem.read_obj(GuestAddress(self.used + 2)).unwrap())
    }

    /// The `n`th used element: chain head and length written.
    pub fn used_elem(&self, mem: &GuestMemory, n: u16) -> (u32, u32) {
        let addr = self.used + 4 + 8 * u64::from(n % QUEUE_LEN);
        let id: u32 = mem.read_obj(GuestAddress(addr)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(addr + 4)).unwrap();
        (u32::from_le(id), u32::from_le(len))
    }
}
