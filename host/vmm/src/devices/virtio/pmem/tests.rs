//! The pmem device fed hostile queues, and the checks on its file.

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::test_queue::GuestQueue;
use vmm_sys_util::eventfd::EFD_NONBLOCK;

const MEM_SIZE: usize = 0x40_0000;
const REQUEST: u64 = 0x10_0000;
const ANSWER: u64 = 0x20_0000;

struct Harness {
    mem: GuestMemory,
    device: Pmem,
    metrics: Arc<PmemMetrics>,
    queue: GuestQueue,
}

impl Harness {
    fn new() -> Self {
        let metrics = Arc::new(PmemMetrics::default());
        let interrupt = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let mut device = Pmem::new(
            GuestAddress(0x1_0000_0000),
            PMEM_ALIGN,
            interrupt,
            metrics.clone(),
        )
        .unwrap();
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
            queue,
        }
    }

    /// Offers a request of `type_` with an answer buffer of `answer_len` bytes and returns the
    /// used length and the answer word.
    fn request(&mut self, type_: u32, answer_len: u32) -> (u32, u32) {
        self.mem
            .write_obj(type_.to_le(), GuestAddress(REQUEST))
            .unwrap();
        self.mem
            .write_obj(0xdead_beef_u32, GuestAddress(ANSWER))
            .unwrap();
        let mut descs = vec![(REQUEST, 4, false)];
        if answer_len > 0 {
            descs.push((ANSWER, answer_len, true));
        }
        let n = self.queue.used_idx(&self.mem);
        self.queue.add_chain(&self.mem, &descs);
        self.device.process();
        assert_eq!(self.queue.used_idx(&self.mem), n.wrapping_add(1));
        let (_, len) = self.queue.used_elem(&self.mem, n);
        let answer: u32 = self.mem.read_obj(GuestAddress(ANSWER)).unwrap();
        (len, u32::from_le(answer))
    }
}

#[test]
fn a_flush_is_answered_at_once() {
    let mut h = Harness::new();
    assert_eq!(h.request(REQ_FLUSH, 4), (4, RESP_OK));
    assert_eq!(h.metrics.snapshot().flushes, 1);
}

#[test]
fn an_unknown_request_is_refused_and_counted() {
    let mut h = Harness::new();
    assert_eq!(h.request(7, 4), (4, RESP_EIO));
    assert_eq!(h.metrics.snapshot().unsupported, 1);
}

#[test]
fn a_chain_without_room_for_the_answer_is_counted() {
    let mut h = Harness::new();
    assert_eq!(h.request(REQ_FLUSH, 0), (0, 0xdead_beef));
    assert_eq!(h.request(REQ_FLUSH, 2), (0, 0xdead_beef));
    assert_eq!(h.metrics.snapshot().bad_chains, 2);
    assert_eq!(h.metrics.snapshot().flushes, 0);
}

#[test]
fn the_configuration_space_holds_start_and_size() {
    let h = Harness::new();
    let mut config = [0u8; 16];
    h.device.read_config(0, &mut config);
    assert_eq!(
        u64::from_le_bytes(config[..8].try_into().unwrap()),
        0x1_0000_0000
    );
    assert_eq!(
        u64::from_le_bytes(config[8..].try_into().unwrap()),
        PMEM_ALIGN
    );
    let mut past = [1u8; 4];
    h.device.read_config(u64::MAX, &mut past);
    assert_eq!(past, [0; 4]);
}

#[test]
fn a_region_file_must_be_whole_subsections() {
    let path = std::env::temp_dir().join(format!("agentos-vmm-pmem-test-{}", std::process::id()));
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    assert!(matches!(region_size(&file), Err(PmemError::BadSize(0))));
    file.set_len(PMEM_ALIGN + 4096).unwrap();
    assert!(matches!(region_size(&file), Err(PmemError::BadSize(_))));
    file.set_len(2 * PMEM_ALIGN).unwrap();
    assert_eq!(region_size(&file).unwrap(), 2 * PMEM_ALIGN);
    let region = map_region(&file, 2 * PMEM_ALIGN).unwrap();
    assert_eq!(region.size() as u64, 2 * PMEM_ALIGN);
    std::fs::remove_file(&path).unwrap();
    let dir = File::open(std::env::temp_dir()).unwrap();
    assert!(matches!(region_size(&dir), Err(PmemError::NotAFile)));
}
