//! The vsock device's queues as a hostile driver sets them: the fuzz bytes are guest RAM from
//! address 0, holding the transmit and receive queues' descriptor tables and rings (available
//! index, ring entries, `used_event`) and the buffers; a backend has packets for the guest. The
//! device is activated and kicked as the VMM would, which walks every chain on both queues:
//! loops, out-of-range heads and indices, indirect tables and corrupt available indices must end
//! in counted errors, never in a hang or a panic.
//!
//! Before the device runs, the queues are walked directly with virtio-queue, bounded, to check
//! what the device relies on: a queue yields at most its size in chains, and every chain ends.
//!
//! Input, little-endian: features (1 byte: bit 0 event index), transmit and receive queue sizes
//! (1 byte each, 2^(b % 9)), backend packets (1 byte: count in bits 0-1, bit 7 "claims to have a
//! packet even when it has none"), per packet its op and payload length (2 + 2), then guest RAM.

#![no_main]

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use agentos_fuzz::{Input, LOW_RAM_BYTES, MAX_QUEUE_SIZE, QueueLayout, guest_memory, queue_size};
use agentos_protocol::HOST_CID;
use agentos_vmm::devices::virtio::events::Polled;
use agentos_vmm::devices::virtio::vsock::metrics::VsockMetrics;
use agentos_vmm::devices::virtio::vsock::packet::{Header, MAX_PAYLOAD, TYPE_STREAM, TxPacket};
use agentos_vmm::devices::virtio::vsock::{Vsock, VsockBackend};
use agentos_vmm::devices::virtio::{
    Activation, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VirtioDevice, VirtioInterrupt,
};
use agentos_vmm::vstate::memory::GuestMemory;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const GUEST_CID: u64 = 3;
/// Kicks of both queues after activation (which processes them once by itself).
const KICKS: usize = 2;
/// The event queue, which the device never reads, out of the way at the top of low RAM.
const EVENT_QUEUE_BASE: u64 = 0xe000;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let features = input.u8();
    let tx_size = queue_size(input.u8());
    let rx_size = queue_size(input.u8());
    let backend_byte = input.u8();
    let packets: VecDeque<_> = (0..backend_byte & 3)
        .map(|_| {
            let hdr = Header {
                op: input.u16(),
                // Whatever the backend says; the device writes the length it copies.
                len: u32::MAX,
                buf_alloc: 1 << 16,
                ..Header::default()
            };
            (hdr, vec![0x5a; usize::from(input.u16())])
        })
        .collect();
    let ram = input.rest();

    // Queues packed as a driver lays them out, transmit first: with small queues the whole
    // layout is in the first few hundred bytes of the input.
    let tx = QueueLayout::packed_at(0, tx_size);
    let rx = QueueLayout::packed_at(tx.end(), rx_size);
    let event = QueueLayout::packed_at(EVENT_QUEUE_BASE, MAX_QUEUE_SIZE);
    let mem = guest_memory();
    mem.write_slice(&ram[..ram.len().min(LOW_RAM_BYTES)], GuestAddress(0))
        .expect("the image fits in low RAM");
    mem.write_slice(&[0; 4], GuestAddress(event.avail_ring))
        .expect("the event queue is in low RAM");

    walk(&tx, &mem);
    walk(&rx, &mem);

    let backend = FuzzBackend {
        rx: packets,
        claims_rx: backend_byte & 0x80 != 0,
        sent: Vec::new(),
        ready: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
    };
    let interrupt = Arc::new(VirtioInterrupt::new(
        EventFd::new(EFD_NONBLOCK).expect("eventfd"),
    ));
    let metrics = Arc::new(VsockMetrics::default());
    let mut device =
        Vsock::new(GUEST_CID, backend, interrupt, metrics).expect("vsock device setup");
    let mut acked_features = 1 << VIRTIO_F_VERSION_1;
    if features & 1 != 0 {
        acked_features |= 1 << VIRTIO_RING_F_EVENT_IDX;
    }
    // In the device's queue order: receive, transmit, event.
    let queues = [rx, tx, event].iter().map(QueueLayout::queue).collect();
    device
        .activate(Activation {
            mem: mem.clone(),
            queues,
            acked_features,
        })
        .expect("three queues activate");
    for _ in 0..KICKS {
        for kick in device.queue_events() {
            kick.write(1).expect("eventfd write");
        }
        device.process();
    }

    for pkt in &device.backend().sent {
        assert_eq!(pkt.hdr.type_, TYPE_STREAM);
        assert_eq!((pkt.hdr.src_cid, pkt.hdr.dst_cid), (GUEST_CID, HOST_CID));
        assert_eq!(pkt.payload.len(), pkt.hdr.len as usize);
        assert!(pkt.payload.len() <= MAX_PAYLOAD);
    }
});

/// Walks every chain the driver offers on the queue, with bounds the walk must stay within.
fn walk(layout: &QueueLayout, mem: &GuestMemory) {
    let mut queue = layout.queue();
    let size = usize::from(queue.size());
    // A chain is at most the queue's size long, plus one indirect table of at most 2^16 - 1.
    let longest = size + usize::from(u16::MAX);
    let Ok(chains) = queue.iter(mem) else {
        return;
    };
    for (n, chain) in chains.take(size + 1).enumerate() {
        assert!(n < size, "more than {size} chains offered at once");
        let len = chain.take(longest + 1).count();
        assert!(len <= longest, "a descriptor chain does not end");
    }
}

/// A host side that takes every packet and has the fuzz input's packets for the guest.
struct FuzzBackend {
    rx: VecDeque<(Header, Vec<u8>)>,
    claims_rx: bool,
    sent: Vec<TxPacket>,
    ready: EventFd,
}

impl VsockBackend for FuzzBackend {
    fn send(&mut self, pkt: TxPacket) {
        self.sent.push(pkt);
    }

    fn has_rx(&self) -> bool {
        self.claims_rx || !self.rx.is_empty()
    }

    fn next_rx(&mut self, buf: &mut [u8]) -> Option<(Header, usize)> {
        assert!(
            buf.len() <= MAX_PAYLOAD,
            "offered a {}-byte buffer",
            buf.len()
        );
        let (hdr, payload) = self.rx.pop_front()?;
        let n = payload.len().min(buf.len());
        buf[..n].copy_from_slice(&payload[..n]);
        Some((hdr, n))
    }

    fn fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }

    fn on_host_ready(&mut self) {
        let _ = self.ready.read();
    }

    fn reset(&mut self) {
        self.rx.clear();
    }
}
