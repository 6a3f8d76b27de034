//! The read-only virtio-blk device as a guest drives it. The fuzz bytes lay out a descriptor
//! table (any address, length, flags and next index) and the bytes its buffers hold (a request
//! header where the chain starts, for a well-formed one); one chain is offered and the device
//! serves it over a 64 KiB disk file. It must not panic, must return the chain (unless its head
//! is past the queue: then it counts it), must write no
//! more than the data it may read plus the status byte, and must never change the disk.
//!
//! Input, little-endian: queue size (1 byte, 2^(b % 9)), chain head (2), descriptor count (1),
//! that many 16-byte descriptors (addr u64, len u32, flags u16, next u16), then the bytes placed
//! at `DATA` (0x2000).

#![no_main]

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use agentos_fuzz::OfferedChain;
use agentos_vmm::devices::virtio::block::metrics::BlockMetrics;
use agentos_vmm::devices::virtio::block::{Block, MAX_REQUEST_BYTES};
use agentos_vmm::devices::virtio::{Activation, VirtioDevice, VirtioInterrupt};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const DATA: u64 = 0x2000;
const DISK_BYTES: usize = 64 << 10;

/// The disk: every byte its offset modulo 251, in a file made once per fuzzing process and
/// unlinked at once (its open descriptor keeps it), so that nothing is left behind.
fn disk() -> std::fs::File {
    static FILE: OnceLock<std::fs::File> = OnceLock::new();
    FILE.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("agentos-fuzz-disk-{}", std::process::id()));
        let bytes: Vec<u8> = (0..DISK_BYTES).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, bytes).expect("the disk file is written");
        let file = std::fs::File::open(&path).expect("the disk file opens");
        std::fs::remove_file(&path).expect("the disk file is unlinked");
        file
    })
    .try_clone()
    .expect("the disk file's descriptor is duplicated")
}

fuzz_target!(|data: &[u8]| {
    let offered = OfferedChain::new(data, DATA);
    let (mem, layout, head) = (&offered.mem, &offered.layout, offered.head);

    let file = disk();
    let metrics = Arc::new(BlockMetrics::default());
    let interrupt = Arc::new(VirtioInterrupt::new(
        EventFd::new(EFD_NONBLOCK).expect("an eventfd"),
    ));
    let mut device =
        Block::new(file, "fuzz", interrupt, metrics.clone()).expect("the disk is valid");
    device
        .activate(Activation {
            mem: mem.clone(),
            queues: vec![layout.queue()],
            acked_features: 0,
        })
        .expect("the queue is valid");
    device.process();

    // The chain came back, with at most a read's worth of data and the status; a head past
    // the queue cannot be returned (it is counted instead).
    if head >= layout.size {
        assert!(metrics.bad_chains.load(Ordering::Relaxed) >= 1);
        return;
    }
    assert!(offered.returned_len() as usize <= MAX_REQUEST_BYTES + 1);
    assert!(metrics.read_bytes.load(Ordering::Relaxed) <= DISK_BYTES as u64);
    let mut on_disk = vec![0; DISK_BYTES];
    std::os::unix::fs::FileExt::read_exact_at(&disk(), &mut on_disk, 0)
        .expect("the disk file reads");
    assert!(
        on_disk
            .iter()
            .enumerate()
            .all(|(i, &b)| b == (i % 251) as u8),
        "the disk changed"
    );
});
