//! virtio-vsock packets as the device takes them from the guest. The fuzz bytes lay out a
//! descriptor table (any address, length, flags and next index: outside memory, in the hole
//! between regions, zero and huge lengths, loops, indirect tables) and the bytes its buffers hold;
//! one chain is offered, checked as the device checks it (a chain with an indirect descriptor is
//! refused: the device does not offer them), then parsed as a transmit packet and filled as a
//! receive buffer. A chain the check lets through must end within the queue's size.
//!
//! Input, little-endian: queue size (1 byte, 2^(b % 9)), chain head (2), descriptor count (1),
//! that many 16-byte descriptors (addr u64, len u32, flags u16, next u16), then the bytes placed
//! at `DATA` (0x2000), which are also the payload written into the receive buffer.

#![no_main]

use agentos_fuzz::OfferedChain;
use agentos_vmm::devices::virtio::vsock::packet::{
    HEADER_SIZE, Header, MAX_PAYLOAD, OP_RW, RxBuffer, TYPE_STREAM, read_tx_packet, refuse_indirect,
};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestAddress;

/// Where the buffer bytes go.
const DATA: u64 = 0x2000;

fuzz_target!(|data: &[u8]| {
    let OfferedChain {
        mem, layout, bytes, ..
    } = OfferedChain::new(data, DATA);

    let mut queue = layout.queue();
    let chain = queue
        .pop_descriptor_chain(&mem)
        .expect("one chain is offered");
    let desc_table = GuestAddress(layout.desc_table);
    if refuse_indirect(&mem, desc_table, layout.size, chain.head_index()).is_err() {
        return;
    }
    // Without an indirect table, virtio-queue reads at most one descriptor per queue entry.
    let walked = chain.clone().take(usize::from(layout.size) + 1).count();
    assert!(
        walked <= usize::from(layout.size),
        "{walked} descriptors in a direct chain"
    );
    if let Ok(pkt) = read_tx_packet(&mem, chain) {
        assert_eq!(pkt.payload.len(), pkt.hdr.len as usize);
        assert!(pkt.payload.len() <= MAX_PAYLOAD);
    }

    // The same chain again, as the receive queue would see it.
    queue.go_to_previous_position();
    let chain = queue
        .pop_descriptor_chain(&mem)
        .expect("one chain is offered");
    if let Ok(buffer) = RxBuffer::new(&mem, chain) {
        let capacity = buffer.payload_capacity();
        assert!(capacity <= MAX_PAYLOAD);
        let hdr = Header {
            type_: TYPE_STREAM,
            op: OP_RW,
            ..Header::default()
        };
        if let Ok(written) = buffer.write(hdr, bytes) {
            assert_eq!(written as usize, HEADER_SIZE + bytes.len().min(capacity));
        }
    }
});
