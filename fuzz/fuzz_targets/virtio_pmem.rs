//! The read-only virtio-pmem device's flush queue as a guest drives it. The fuzz bytes lay out a
//! descriptor table (any address, length, flags and next index) and the bytes its buffers hold
//! (a request word where the chain starts, for a well-formed one); one chain is offered and the
//! device serves it. It must not panic, must return the chain (unless its head is past the
//! queue: then it counts it), and must write at most its four-byte answer.
//!
//! Input: as for `virtio_block` (queue size, chain head, descriptors, then the bytes placed at
//! `DATA`, 0x2000).

#![no_main]

use std::sync::Arc;
use std::sync::atomic::Ordering;

use agentos_fuzz::OfferedChain;
use agentos_vmm::devices::virtio::pmem::metrics::PmemMetrics;
use agentos_vmm::devices::virtio::pmem::{PMEM_ALIGN, Pmem};
use agentos_vmm::devices::virtio::{Activation, VirtioDevice, VirtioInterrupt};
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const DATA: u64 = 0x2000;

fuzz_target!(|data: &[u8]| {
    let offered = OfferedChain::new(data, DATA);
    let (mem, layout, head) = (&offered.mem, &offered.layout, offered.head);

    let metrics = Arc::new(PmemMetrics::default());
    let interrupt = Arc::new(VirtioInterrupt::new(
        EventFd::new(EFD_NONBLOCK).expect("an eventfd"),
    ));
    let mut device = Pmem::new(
        GuestAddress(1 << 32),
        PMEM_ALIGN,
        interrupt,
        metrics.clone(),
    )
    .expect("the device is built");
    device
        .activate(Activation {
            mem: mem.clone(),
            queues: vec![layout.queue()],
            acked_features: 0,
        })
        .expect("the queue is valid");
    device.process();

    if head >= layout.size {
        assert!(metrics.bad_chains.load(Ordering::Relaxed) >= 1);
        return;
    }
    assert!(
        matches!(offered.returned_len(), 0 | 4),
        "wrote more than the answer"
    );
});
