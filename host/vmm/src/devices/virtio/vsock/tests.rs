//! The vsock device fed hostile queues: descriptor chains laid out in guest memory by hand, a
//! backend that records what reaches it.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::packet::{HEADER_SIZE, OP_REQUEST, OP_RW, VsockHeader};
use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::INTERRUPT_USED_RING;
use crate::devices::virtio::mmio::{MmioMetrics, MmioTransport};
use crate::devices::virtio::test_queue::{GuestQueue, QUEUE_LEN};

const GUEST_CID: u64 = 3;
const MEM_SIZE: usize = 0x40_0000;
/// Where each queue's descriptor table, available ring and used ring live.
const QUEUE_BASES: [u64; 3] = [0x0, 0x1000, 0x2000];
/// Packet buffers start here; each test buffer gets its own 128 KiB slot.
const BUFFERS: u64 = 0x10_0000;
const SLOT: u64 = 0x2_0000;
const DEADLINE: Duration = Duration::from_secs(2);
/// For the notification storm: a million system calls, in a debug build.
const STORM_DEADLINE: Duration = Duration::from_secs(60);

fn slot(n: u64) -> u64 {
    BUFFERS + n * SLOT
}

/// What the device did to the backend, and what the test wants the backend to hand out.
#[derive(Default)]
struct BackendLog {
    sent: Vec<TxPacket>,
    rx: VecDeque<(Header, Vec<u8>)>,
    /// Claim to have packets for the guest even when `rx` is empty.
    spurious_rx: bool,
    /// Length of the buffer of every `next_rx` call.
    capacities: Vec<usize>,
    resets: usize,
}

struct FakeBackend {
    log: Arc<Mutex<BackendLog>>,
    ready: EventFd,
}

impl VsockBackend for FakeBackend {
    fn send(&mut self, pkt: TxPacket) {
        self.log.lock().unwrap().sent.push(pkt);
    }

    fn has_rx(&self) -> bool {
        let log = self.log.lock().unwrap();
        log.spurious_rx || !log.rx.is_empty()
    }

    fn next_rx(&mut self, buf: &mut [u8]) -> Option<(Header, usize)> {
        let mut log = self.log.lock().unwrap();
        log.capacities.push(buf.len());
        let (hdr, payload) = log.rx.pop_front()?;
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
        self.log.lock().unwrap().resets += 1;
    }
}

struct Harness {
    mem: GuestMemory,
    device: Vsock<FakeBackend>,
    log: Arc<Mutex<BackendLog>>,
    metrics: Arc<VsockMetrics>,
    interrupt: Arc<VirtioInterrupt>,
    rxq: GuestQueue,
    txq: GuestQueue,
}

fn guest_memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

struct Parts {
    device: Vsock<FakeBackend>,
    log: Arc<Mutex<BackendLog>>,
    metrics: Arc<VsockMetrics>,
    interrupt: Arc<VirtioInterrupt>,
}

fn device() -> Parts {
    let log = Arc::new(Mutex::new(BackendLog::default()));
    let backend = FakeBackend {
        log: log.clone(),
        ready: EventFd::new(EFD_NONBLOCK).unwrap(),
    };
    let metrics = Arc::new(VsockMetrics::default());
    let interrupt = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let device = Vsock::new(GUEST_CID, backend, interrupt.clone(), metrics.clone()).unwrap();
    Parts {
        device,
        log,
        metrics,
        interrupt,
    }
}

impl Harness {
    /// A device with its queues laid out but not yet activated.
    fn inactive() -> Self {
        let Parts {
            device,
            log,
            metrics,
            interrupt,
        } = device();
        Self {
            mem: guest_memory(),
            device,
            log,
            metrics,
            interrupt,
            rxq: GuestQueue::new(QUEUE_BASES[RX_QUEUE]),
            txq: GuestQueue::new(QUEUE_BASES[TX_QUEUE]),
        }
    }

    fn new() -> Self {
        let mut h = Self::inactive();
        h.activate(1 << VIRTIO_F_VERSION_1);
        h
    }

    fn activate(&mut self, acked_features: u64) {
        let queues = QUEUE_BASES
            .iter()
            .map(|&base| GuestQueue::new(base).queue())
            .collect();
        self.device
            .activate(Activation {
                mem: self.mem.clone(),
                queues,
                acked_features,
            })
            .unwrap();
    }

    fn kick_tx(&mut self) {
        self.device.queue_events()[TX_QUEUE].write(1).unwrap();
        self.device.process();
    }

    fn kick_rx(&mut self) {
        self.device.queue_events()[RX_QUEUE].write(1).unwrap();
        self.device.process();
    }

    fn write_header(&self, addr: u64, hdr: Header) {
        self.mem
            .write_obj(VsockHeader::from(hdr), GuestAddress(addr))
            .unwrap();
    }

    fn read_header(&self, addr: u64) -> Header {
        self.mem
            .read_obj::<VsockHeader>(GuestAddress(addr))
            .unwrap()
            .into()
    }

    /// Offers a one-descriptor TX chain holding `hdr` and `payload`.
    fn offer_tx(&mut self, slot_addr: u64, hdr: Header, payload: &[u8]) {
        self.write_header(slot_addr, hdr);
        self.mem
            .write_slice(payload, GuestAddress(slot_addr + HEADER_SIZE as u64))
            .unwrap();
        let len = (HEADER_SIZE + payload.len()) as u32;
        self.txq.add_chain(&self.mem, &[(slot_addr, len, false)]);
    }

    fn sent(&self) -> Vec<TxPacket> {
        std::mem::take(&mut self.log.lock().unwrap().sent)
    }

    fn queue_rx(&self, hdr: Header, payload: &[u8]) {
        self.log
            .lock()
            .unwrap()
            .rx
            .push_back((hdr, payload.to_vec()));
    }

    fn pending_rx(&self) -> usize {
        self.log.lock().unwrap().rx.len()
    }

    fn capacities(&self) -> Vec<usize> {
        self.log.lock().unwrap().capacities.clone()
    }
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// A packet from the guest to host port 1024.
fn tx_header(op: u16, len: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: 5000,
        dst_port: 1024,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 4096,
        fwd_cnt: 7,
    }
}

/// A packet the backend has for the guest; the device must fix its addressing.
fn rx_header(op: u16) -> Header {
    Header {
        src_cid: 77,
        dst_cid: 88,
        src_port: 1024,
        dst_port: 5000,
        len: 0xdead,
        type_: 9,
        op,
        flags: 0,
        buf_alloc: 1 << 18,
        fwd_cnt: 11,
    }
}

/// Runs `test` on its own thread and fails if it has not finished by the deadline, so that a
/// device that loops forever fails the test instead of hanging the suite.
fn within_deadline(test: impl FnOnce() + Send + 'static) {
    within(DEADLINE, test);
}

fn within(deadline: Duration, test: impl FnOnce() + Send + 'static) {
    let (done, finished) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        test();
        let _ = done.send(());
    });
    match finished.recv_timeout(deadline) {
        Ok(()) => handle.join().unwrap(),
        // The test panicked: report its panic.
        Err(mpsc::RecvTimeoutError::Disconnected) => handle.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("the device did not return in time"),
    }
}

// ---- transmit ----

#[test]
fn good_rw_packet_reaches_backend_with_its_header_and_payload() {
    let mut h = Harness::new();
    let hdr = tx_header(OP_RW, 5);
    h.offer_tx(slot(0), hdr, b"hello");
    h.kick_tx();
    assert_eq!(
        h.sent(),
        vec![TxPacket {
            hdr,
            payload: b"hello".to_vec()
        }]
    );
    assert_eq!(load(&h.metrics.tx_packets), 1);
    assert_eq!(h.txq.used_idx(&h.mem), 1);
    assert_eq!(h.txq.used_elem(&h.mem, 0), (0, 0));
    assert_eq!(h.interrupt.status(), INTERRUPT_USED_RING);
}

#[test]
fn request_packet_reaches_backend() {
    let mut h = Harness::new();
    let hdr = tx_header(OP_REQUEST, 0);
    h.offer_tx(slot(0), hdr, b"");
    h.kick_tx();
    let sent = h.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].hdr, hdr);
    assert!(sent[0].payload.is_empty());
}

#[test]
fn header_and_payload_split_across_descriptors_are_reassembled() {
    let mut h = Harness::new();
    let hdr = tx_header(OP_RW, 6);
    // The header straddles two descriptors in different places; the payload straddles two more.
    let mut bytes = VsockHeader::from(hdr).as_slice().to_vec();
    bytes.extend_from_slice(b"abcdef");
    let parts = [(slot(0), 10), (slot(1), 34), (slot(2), 2), (slot(3), 4)];
    let mut offset = 0;
    for &(addr, len) in &parts {
        h.mem
            .write_slice(&bytes[offset..offset + len], GuestAddress(addr))
            .unwrap();
        offset += len;
    }
    let descs: Vec<_> = parts
        .iter()
        .map(|&(addr, len)| (addr, len as u32, false))
        .collect();
    h.txq.add_chain(&h.mem, &descs);
    h.kick_tx();
    assert_eq!(
        h.sent(),
        vec![TxPacket {
            hdr,
            payload: b"abcdef".to_vec()
        }]
    );
}

/// Offers the chain `descs` and checks it was refused as a bad chain yet returned to the guest.
fn assert_bad_tx_chain(h: &mut Harness, descs: &[(u64, u32, bool)]) {
    let used_before = h.txq.used_idx(&h.mem);
    let bad_before = load(&h.metrics.tx_bad_chains);
    h.txq.add_chain(&h.mem, descs);
    h.kick_tx();
    assert!(h.sent().is_empty());
    assert_eq!(load(&h.metrics.tx_bad_chains), bad_before + 1);
    assert_eq!(h.txq.used_idx(&h.mem), used_before.wrapping_add(1));
}

#[test]
fn header_in_a_descriptor_shorter_than_44_bytes_is_a_bad_chain() {
    let mut h = Harness::new();
    h.write_header(slot(0), tx_header(OP_RW, 0));
    assert_bad_tx_chain(&mut h, &[(slot(0), HEADER_SIZE as u32 - 1, false)]);
    assert_bad_tx_chain(&mut h, &[(slot(0), 0, false)]);
}

#[test]
fn write_only_tx_descriptors_are_not_read() {
    let mut h = Harness::new();
    h.write_header(slot(0), tx_header(OP_RW, 0));
    assert_bad_tx_chain(&mut h, &[(slot(0), HEADER_SIZE as u32, true)]);
}

#[test]
fn payload_length_over_64_kib_is_a_bad_chain() {
    let mut h = Harness::new();
    let len = MAX_PAYLOAD as u32 + 1;
    h.write_header(slot(0), tx_header(OP_RW, len));
    // The chain really holds that many bytes: only the limit refuses it.
    assert_bad_tx_chain(
        &mut h,
        &[(slot(0), HEADER_SIZE as u32, false), (slot(1), len, false)],
    );
    h.write_header(slot(0), tx_header(OP_RW, u32::MAX));
    assert_bad_tx_chain(&mut h, &[(slot(0), HEADER_SIZE as u32, false)]);
}

#[test]
fn payload_length_beyond_the_chain_is_a_bad_chain() {
    let mut h = Harness::new();
    h.write_header(slot(0), tx_header(OP_RW, 100));
    assert_bad_tx_chain(&mut h, &[(slot(0), HEADER_SIZE as u32 + 99, false)]);
}

#[test]
fn descriptor_outside_guest_memory_is_a_bad_chain() {
    let mut h = Harness::new();
    let end = MEM_SIZE as u64;
    assert_bad_tx_chain(&mut h, &[(end, HEADER_SIZE as u32, false)]);
    assert_bad_tx_chain(&mut h, &[(end - 20, HEADER_SIZE as u32, false)]);
    assert_bad_tx_chain(&mut h, &[(u64::MAX - 10, HEADER_SIZE as u32, false)]);
    h.write_header(slot(0), tx_header(OP_RW, 8));
    assert_bad_tx_chain(
        &mut h,
        &[(slot(0), HEADER_SIZE as u32, false), (1 << 40, 8, false)],
    );
}

#[test]
fn descriptor_loop_does_not_hang_and_is_returned() {
    within_deadline(|| {
        let mut h = Harness::new();
        h.write_header(slot(0), tx_header(OP_RW, 1000));
        // Descriptors 0 and 1 point at each other.
        let flags = VRING_DESC_F_NEXT as u16;
        let len = HEADER_SIZE as u32;
        h.txq
            .write_desc(&h.mem, 0, SplitDescriptor::new(slot(0), len, flags, 1));
        h.txq
            .write_desc(&h.mem, 1, SplitDescriptor::new(slot(0), len, flags, 0));
        h.txq.offer(&h.mem, 0);
        h.kick_tx();
        // The chain ends after one pass over the table: 16 × 44 bytes cannot hold 1000 more.
        assert!(h.sent().is_empty());
        assert_eq!(load(&h.metrics.tx_bad_chains), 1);
        assert_eq!(h.txq.used_idx(&h.mem), 1);
    });
}

/// Writes a table of `descs` at `table` in guest memory, as a driver lays out an indirect one.
fn write_table(mem: &GuestMemory, table: u64, descs: &[SplitDescriptor]) {
    for (i, desc) in descs.iter().enumerate() {
        let addr = GuestAddress(table + 16 * i as u64);
        mem.write_obj(RawDescriptor::from(*desc), addr).unwrap();
    }
}

#[test]
fn indirect_transmit_chains_are_refused_as_the_feature_is_not_offered() {
    let mut h = Harness::new();
    h.write_header(slot(0), tx_header(OP_RW, 2));
    h.mem
        .write_slice(b"hi", GuestAddress(slot(0) + HEADER_SIZE as u64))
        .unwrap();
    // A table holding a good packet, reached from the head...
    let table = slot(1);
    let len = HEADER_SIZE as u32 + 2;
    write_table(&h.mem, table, &[SplitDescriptor::new(slot(0), len, 0, 0)]);
    let indirect = VRING_DESC_F_INDIRECT as u16;
    h.txq
        .write_desc(&h.mem, 0, SplitDescriptor::new(table, 16, indirect, 0));
    h.txq.offer(&h.mem, 0);
    // ...and from the middle of a chain, after a descriptor of nothing.
    let next = VRING_DESC_F_NEXT as u16;
    h.txq
        .write_desc(&h.mem, 1, SplitDescriptor::new(slot(2), 0, next, 2));
    h.txq
        .write_desc(&h.mem, 2, SplitDescriptor::new(table, 16, indirect, 0));
    h.txq.offer(&h.mem, 1);
    h.kick_tx();
    assert!(h.sent().is_empty());
    assert_eq!(load(&h.metrics.indirect_chains), 2);
    assert_eq!(load(&h.metrics.tx_bad_chains), 2);
    assert_eq!(h.txq.used_idx(&h.mem), 2);
    // The same packet in a direct chain goes through.
    h.offer_tx(slot(3), tx_header(OP_RW, 2), b"hi");
    h.kick_tx();
    assert_eq!(h.sent().len(), 1);
}

#[test]
fn an_indirect_flag_past_the_end_of_a_chain_is_not_part_of_it() {
    let mut h = Harness::new();
    h.offer_tx(slot(0), tx_header(OP_RW, 1), b"x");
    // Descriptor 1, which the chain does not reach, is indirect.
    let indirect = VRING_DESC_F_INDIRECT as u16;
    h.txq
        .write_desc(&h.mem, 1, SplitDescriptor::new(slot(1), 16, indirect, 0));
    h.kick_tx();
    assert_eq!(h.sent().len(), 1);
    assert_eq!(load(&h.metrics.indirect_chains), 0);
}

#[test]
fn chain_head_beyond_the_queue_is_counted_and_skipped() {
    within_deadline(|| {
        let mut h = Harness::new();
        h.txq.offer(&h.mem, QUEUE_LEN + 3);
        h.offer_tx(slot(0), tx_header(OP_RW, 2), b"ok");
        h.kick_tx();
        assert!(load(&h.metrics.tx_bad_chains) >= 1);
        assert_eq!(h.sent().len(), 1);
    });
}

#[test]
fn forged_source_cid_is_bad_addressing() {
    let mut h = Harness::new();
    for src_cid in [HOST_CID, GUEST_CID + 1, 0, u64::MAX] {
        let hdr = Header {
            src_cid,
            ..tx_header(OP_RW, 0)
        };
        h.offer_tx(slot(0), hdr, b"");
    }
    h.kick_tx();
    assert!(h.sent().is_empty());
    assert_eq!(load(&h.metrics.bad_addressing), 4);
    assert_eq!(h.txq.used_idx(&h.mem), 4);
}

#[test]
fn destination_other_than_the_host_is_bad_addressing() {
    let mut h = Harness::new();
    for dst_cid in [GUEST_CID, 1, 0, u64::MAX] {
        let hdr = Header {
            dst_cid,
            ..tx_header(OP_REQUEST, 0)
        };
        h.offer_tx(slot(0), hdr, b"");
    }
    h.kick_tx();
    assert!(h.sent().is_empty());
    assert_eq!(load(&h.metrics.bad_addressing), 4);
}

#[test]
fn non_stream_packet_is_a_bad_packet() {
    let mut h = Harness::new();
    for type_ in [0, 2, u16::MAX] {
        let hdr = Header {
            type_,
            ..tx_header(OP_RW, 0)
        };
        h.offer_tx(slot(0), hdr, b"");
    }
    h.kick_tx();
    assert!(h.sent().is_empty());
    assert_eq!(load(&h.metrics.bad_packets), 3);
}

#[test]
fn every_tx_chain_is_returned_even_when_bad() {
    let mut h = Harness::new();
    h.offer_tx(slot(0), tx_header(OP_RW, 1), b"a");
    h.txq.add_chain(&h.mem, &[(slot(1), 3, false)]);
    h.offer_tx(
        slot(2),
        Header {
            type_: 2,
            ..tx_header(OP_RW, 0)
        },
        b"",
    );
    h.offer_tx(
        slot(3),
        Header {
            src_cid: 9,
            ..tx_header(OP_RW, 0)
        },
        b"",
    );
    h.txq.add_chain(&h.mem, &[(1 << 40, 64, false)]);
    h.offer_tx(slot(4), tx_header(OP_RW, 1), b"b");
    h.kick_tx();
    let payloads: Vec<_> = h.sent().into_iter().map(|p| p.payload).collect();
    assert_eq!(payloads, vec![b"a".to_vec(), b"b".to_vec()]);
    assert_eq!(h.txq.used_idx(&h.mem), 6);
    for n in 0..6 {
        assert_eq!(h.txq.used_elem(&h.mem, n).1, 0);
    }
}

#[test]
fn tx_queue_wraps_around_the_ring() {
    let mut h = Harness::new();
    for round in 0..3 * u32::from(QUEUE_LEN) {
        h.offer_tx(slot(0), tx_header(OP_RW, 4), &round.to_le_bytes());
        h.kick_tx();
    }
    assert_eq!(h.sent().len(), 3 * usize::from(QUEUE_LEN));
    assert_eq!(h.txq.used_idx(&h.mem), 3 * QUEUE_LEN);
}

#[test]
fn available_index_beyond_the_queue_size_does_not_hang_tx() {
    within_deadline(|| {
        let mut h = Harness::new();
        h.txq.set_avail_idx(&h.mem, QUEUE_LEN + 1);
        h.kick_tx();
        assert!(h.sent().is_empty());
        assert_eq!(load(&h.metrics.tx_bad_chains), 1);
    });
}

#[test]
fn a_million_notifications_of_every_queue_number_cost_one_pass_per_wake() {
    // Notifications only add to an eventfd's counter: however many come, the device walks its
    // queues once per wake of the event loop, and numbers of queues it lacks are dropped.
    within(STORM_DEADLINE, || {
        let mut h = Harness::new();
        let notifier = h.device.notifier().unwrap();
        h.offer_tx(slot(0), tx_header(OP_REQUEST, 0), &[]);
        for i in 0..250_000u32 {
            for queue in [TX_QUEUE as u32, RX_QUEUE as u32, 2, 3, u32::MAX] {
                notifier.notify(queue);
            }
            if i % 10_000 == 0 {
                h.device.process();
            }
        }
        h.device.process();
        assert_eq!(h.sent().len(), 1, "the one packet is sent once");
        assert_eq!(h.txq.used_idx(&h.mem), 1);
        assert_eq!(load(&h.metrics.tx_bad_chains), 0);
        assert_eq!(load(&h.metrics.rx_bad_buffers), 0);
    });
}

/// A guest that adds a transmit buffer for every packet the device takes, so that its transmit
/// queue is never empty.
struct RefillingBackend {
    mem: GuestMemory,
    txq: GuestQueue,
    sent: Arc<AtomicUsize>,
    ready: EventFd,
}

impl VsockBackend for RefillingBackend {
    fn send(&mut self, _pkt: TxPacket) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        self.txq
            .add_chain(&self.mem, &[(slot(0), HEADER_SIZE as u32, false)]);
    }

    fn has_rx(&self) -> bool {
        false
    }

    fn next_rx(&mut self, _buf: &mut [u8]) -> Option<(Header, usize)> {
        None
    }

    fn fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }

    fn on_host_ready(&mut self) {}

    fn reset(&mut self) {}
}

#[test]
fn a_guest_that_keeps_adding_transmit_buffers_gets_one_budget_per_wake() {
    within_deadline(|| {
        let mem = guest_memory();
        mem.write_obj(
            VsockHeader::from(tx_header(OP_RW, 0)),
            GuestAddress(slot(0)),
        )
        .unwrap();
        let mut txq = GuestQueue::new(QUEUE_BASES[TX_QUEUE]);
        txq.add_chain(&mem, &[(slot(0), HEADER_SIZE as u32, false)]);
        let sent = Arc::new(AtomicUsize::new(0));
        let backend = RefillingBackend {
            mem: mem.clone(),
            txq,
            sent: sent.clone(),
            ready: EventFd::new(EFD_NONBLOCK).unwrap(),
        };
        let metrics = Arc::new(VsockMetrics::default());
        let interrupt = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let mut device = Vsock::new(GUEST_CID, backend, interrupt, metrics.clone()).unwrap();
        let queues = QUEUE_BASES
            .iter()
            .map(|&base| GuestQueue::new(base).queue())
            .collect();
        device
            .activate(Activation {
                mem,
                queues,
                acked_features: 1 << VIRTIO_F_VERSION_1,
            })
            .unwrap();
        // Activation wakes the device once; it serves one budget and wakes itself again.
        device.process();
        assert_eq!(sent.load(Ordering::Relaxed), TX_CHAINS_PER_WAKE);
        assert_eq!(load(&metrics.tx_budget_spent), 1);
        device.process();
        assert_eq!(sent.load(Ordering::Relaxed), 2 * TX_CHAINS_PER_WAKE);
        assert_eq!(load(&metrics.tx_budget_spent), 2);
    });
}

#[test]
fn tx_before_activation_is_ignored_then_processed_on_activation() {
    let mut h = Harness::inactive();
    h.offer_tx(slot(0), tx_header(OP_RW, 2), b"hi");
    h.kick_tx();
    assert!(h.sent().is_empty());
    h.activate(1 << VIRTIO_F_VERSION_1);
    // Activation (on a vCPU thread) only wakes the event loop, which does the work.
    assert!(h.sent().is_empty());
    h.device.process();
    assert_eq!(h.sent().len(), 1);
}

#[test]
fn event_idx_lets_the_guest_defer_interrupts() {
    let mut h = Harness::inactive();
    h.activate((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX));
    // `used_event` follows the available ring: interrupt once the third chain is used.
    let used_event = h.txq.avail + 4 + 2 * u64::from(QUEUE_LEN);
    h.mem
        .write_obj(2u16.to_le(), GuestAddress(used_event))
        .unwrap();
    h.offer_tx(slot(0), tx_header(OP_RW, 1), b"a");
    h.kick_tx();
    assert_eq!(h.interrupt.status(), 0);
    h.offer_tx(slot(0), tx_header(OP_RW, 1), b"b");
    h.offer_tx(slot(0), tx_header(OP_RW, 1), b"c");
    h.kick_tx();
    assert_eq!(h.interrupt.status(), INTERRUPT_USED_RING);
    assert_eq!(h.sent().len(), 3);
}

// ---- receive ----

#[test]
fn backend_packet_is_written_to_the_guest_with_device_addressing() {
    let mut h = Harness::new();
    h.rxq.add_chain(&h.mem, &[(slot(0), 4096, true)]);
    h.queue_rx(rx_header(OP_RW), b"from host");
    h.kick_rx();
    let hdr = h.read_header(slot(0));
    assert_eq!(
        hdr,
        Header {
            src_cid: HOST_CID,
            dst_cid: GUEST_CID,
            type_: TYPE_STREAM,
            len: 9,
            ..rx_header(OP_RW)
        }
    );
    let mut payload = [0u8; 9];
    h.mem
        .read_slice(&mut payload, GuestAddress(slot(0) + HEADER_SIZE as u64))
        .unwrap();
    assert_eq!(&payload, b"from host");
    assert_eq!(h.rxq.used_idx(&h.mem), 1);
    assert_eq!(h.rxq.used_elem(&h.mem, 0), (0, HEADER_SIZE as u32 + 9));
    assert_eq!(load(&h.metrics.rx_packets), 1);
    assert_eq!(load(&h.metrics.rx_bytes), 9);
    assert_eq!(h.interrupt.status(), INTERRUPT_USED_RING);
}

#[test]
fn rx_header_and_payload_split_across_descriptors() {
    let mut h = Harness::new();
    h.rxq
        .add_chain(&h.mem, &[(slot(0), 20, true), (slot(1), 4096, true)]);
    h.queue_rx(rx_header(OP_RW), b"xyz");
    h.kick_rx();
    let mut bytes = [0u8; HEADER_SIZE + 3];
    h.mem
        .read_slice(&mut bytes[..20], GuestAddress(slot(0)))
        .unwrap();
    h.mem
        .read_slice(&mut bytes[20..], GuestAddress(slot(1)))
        .unwrap();
    let hdr = Header::from(
        VsockHeader::from_slice(&bytes[..HEADER_SIZE])
            .copied()
            .unwrap(),
    );
    assert_eq!((hdr.op, hdr.len, hdr.dst_cid), (OP_RW, 3, GUEST_CID));
    assert_eq!(&bytes[HEADER_SIZE..], b"xyz");
    assert_eq!(h.rxq.used_elem(&h.mem, 0).1, HEADER_SIZE as u32 + 3);
}

/// Offers the receive chain `descs` and checks it was refused and returned empty while the
/// backend's packet stays for a good buffer.
fn assert_bad_rx_buffer(descs: &[(u64, u32, bool)]) {
    let mut h = Harness::new();
    h.queue_rx(rx_header(OP_RW), b"data");
    h.rxq.add_chain(&h.mem, descs);
    h.kick_rx();
    assert_eq!(load(&h.metrics.rx_bad_buffers), 1);
    assert_eq!(h.rxq.used_idx(&h.mem), 1);
    assert_eq!(h.rxq.used_elem(&h.mem, 0), (0, 0));
    assert_eq!(h.pending_rx(), 1);
    assert!(h.capacities().is_empty());

    let head = h.rxq.add_chain(&h.mem, &[(slot(5), 4096, true)]);
    h.kick_rx();
    assert_eq!(h.pending_rx(), 0);
    assert_eq!(
        h.rxq.used_elem(&h.mem, 1),
        (u32::from(head), HEADER_SIZE as u32 + 4)
    );
}

#[test]
fn rx_buffer_smaller_than_a_header_is_counted_and_returned_empty() {
    assert_bad_rx_buffer(&[(slot(0), HEADER_SIZE as u32 - 1, true)]);
}

#[test]
fn read_only_rx_buffer_is_counted_and_returned_empty() {
    assert_bad_rx_buffer(&[(slot(0), 4096, false)]);
}

#[test]
fn rx_buffer_outside_guest_memory_is_counted_and_returned_empty() {
    assert_bad_rx_buffer(&[(MEM_SIZE as u64 - 8, 4096, true)]);
}

#[test]
fn indirect_receive_buffer_is_counted_and_returned_empty() {
    let mut h = Harness::new();
    let table = slot(1);
    let writable = VRING_DESC_F_WRITE as u16;
    write_table(
        &h.mem,
        table,
        &[SplitDescriptor::new(slot(0), 4096, writable, 0)],
    );
    let indirect = VRING_DESC_F_INDIRECT as u16;
    h.rxq
        .write_desc(&h.mem, 0, SplitDescriptor::new(table, 16, indirect, 0));
    h.rxq.offer(&h.mem, 0);
    h.queue_rx(rx_header(OP_RW), b"data");
    h.kick_rx();
    assert_eq!(load(&h.metrics.indirect_chains), 1);
    assert_eq!(load(&h.metrics.rx_bad_buffers), 1);
    assert_eq!(h.rxq.used_elem(&h.mem, 0), (0, 0));
    assert_eq!(h.pending_rx(), 1);
}

#[test]
fn payload_larger_than_the_buffer_is_truncated_to_it() {
    let mut h = Harness::new();
    h.rxq
        .add_chain(&h.mem, &[(slot(0), HEADER_SIZE as u32 + 10, true)]);
    h.queue_rx(rx_header(OP_RW), &[0x5a; 100]);
    h.kick_rx();
    assert_eq!(h.capacities(), vec![10]);
    assert_eq!(h.read_header(slot(0)).len, 10);
    assert_eq!(h.rxq.used_elem(&h.mem, 0).1, HEADER_SIZE as u32 + 10);
}

#[test]
fn backend_is_never_offered_more_than_64_kib() {
    let mut h = Harness::new();
    h.rxq.add_chain(
        &h.mem,
        &[
            (slot(0), HEADER_SIZE as u32, true),
            (slot(1), MAX_PAYLOAD as u32, true),
            (slot(2), 4096, true),
        ],
    );
    h.queue_rx(rx_header(OP_RW), &vec![1; MAX_PAYLOAD + 100]);
    h.kick_rx();
    assert_eq!(h.capacities(), vec![MAX_PAYLOAD]);
    assert_eq!(
        h.rxq.used_elem(&h.mem, 0).1,
        (HEADER_SIZE + MAX_PAYLOAD) as u32
    );
}

#[test]
fn header_only_buffer_takes_a_control_packet() {
    let mut h = Harness::new();
    h.rxq
        .add_chain(&h.mem, &[(slot(0), HEADER_SIZE as u32, true)]);
    h.queue_rx(rx_header(OP_REQUEST), b"");
    h.kick_rx();
    assert_eq!(h.capacities(), vec![0]);
    assert_eq!(h.read_header(slot(0)).op, OP_REQUEST);
    assert_eq!(h.rxq.used_elem(&h.mem, 0).1, HEADER_SIZE as u32);
}

#[test]
fn rx_chain_is_put_back_when_the_backend_has_nothing() {
    let mut h = Harness::new();
    let head = h.rxq.add_chain(&h.mem, &[(slot(0), 4096, true)]);
    h.log.lock().unwrap().spurious_rx = true;
    h.kick_rx();
    assert_eq!(h.rxq.used_idx(&h.mem), 0);
    h.log.lock().unwrap().spurious_rx = false;
    h.queue_rx(rx_header(OP_RW), b"late");
    h.kick_rx();
    assert_eq!(h.rxq.used_idx(&h.mem), 1);
    assert_eq!(
        h.rxq.used_elem(&h.mem, 0),
        (u32::from(head), HEADER_SIZE as u32 + 4)
    );
}

#[test]
fn rx_without_guest_buffers_keeps_the_packets() {
    within_deadline(|| {
        let mut h = Harness::new();
        h.queue_rx(rx_header(OP_RW), b"wait");
        h.kick_rx();
        assert_eq!(h.pending_rx(), 1);
        assert_eq!(h.interrupt.status(), 0);
        h.rxq.add_chain(&h.mem, &[(slot(0), 4096, true)]);
        h.kick_rx();
        assert_eq!(h.pending_rx(), 0);
    });
}

#[test]
fn available_index_beyond_the_queue_size_does_not_hang_rx() {
    within_deadline(|| {
        let mut h = Harness::new();
        h.queue_rx(rx_header(OP_RW), b"stuck");
        h.rxq.set_avail_idx(&h.mem, QUEUE_LEN + 1);
        h.kick_rx();
        assert_eq!(h.pending_rx(), 1);
        assert_eq!(load(&h.metrics.rx_bad_buffers), 1);
    });
}

#[test]
fn many_rx_packets_fill_every_offered_buffer() {
    let mut h = Harness::new();
    for n in 0..4 {
        h.rxq.add_chain(&h.mem, &[(slot(n), 4096, true)]);
    }
    for n in 0..6u8 {
        h.queue_rx(rx_header(OP_RW), &[n]);
    }
    h.kick_rx();
    assert_eq!(h.rxq.used_idx(&h.mem), 4);
    assert_eq!(h.pending_rx(), 2);
}

// ---- lifecycle ----

#[test]
fn reset_drops_the_active_state_and_resets_the_backend() {
    let mut h = Harness::new();
    h.device.reset();
    assert!(h.device.active.is_none());
    assert_eq!(h.log.lock().unwrap().resets, 1);
    h.offer_tx(slot(0), tx_header(OP_RW, 1), b"x");
    h.kick_tx();
    assert!(h.sent().is_empty());
    h.rxq.add_chain(&h.mem, &[(slot(1), 4096, true)]);
    h.queue_rx(rx_header(OP_RW), b"y");
    h.kick_rx();
    assert_eq!(h.rxq.used_idx(&h.mem), 0);
    assert_eq!(h.txq.used_idx(&h.mem), 0);
}

#[test]
fn activation_with_the_wrong_number_of_queues_fails() {
    let mut device = device().device;
    let queues = vec![GuestQueue::new(QUEUE_BASES[0]).queue()];
    let result = device.activate(Activation {
        mem: guest_memory(),
        queues,
        acked_features: 1 << VIRTIO_F_VERSION_1,
    });
    assert!(matches!(result, Err(ActivateError::BadQueue(1))));
    assert!(device.active.is_none());
}

#[test]
fn config_space_holds_the_guest_cid_and_zeros_past_it() {
    let device = device().device;
    let mut data = [0xffu8; 8];
    device.read_config(0, &mut data);
    assert_eq!(u64::from_le_bytes(data), GUEST_CID);
    let mut data = [0xffu8; 4];
    device.read_config(6, &mut data);
    assert_eq!(data, [0; 4]);
    let mut data = [0xffu8; 4];
    device.read_config(8, &mut data);
    assert_eq!(data, [0; 4]);
    let mut data = [0xffu8; 4];
    device.read_config(u64::MAX, &mut data);
    assert_eq!(data, [0; 4]);
    assert_eq!(device.device_type(), VIRTIO_ID_VSOCK);
    assert_eq!(device.queue_max_sizes().len(), 3);
}

#[test]
fn driver_init_through_mmio_activates_vsock_and_notify_reaches_tx() {
    let Parts { device, log, .. } = device();
    let notifier = device.notifier().unwrap();
    let mem = guest_memory();
    let interrupt = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let metrics = Arc::new(MmioMetrics::default());
    let mut transport = MmioTransport::new(device, mem.clone(), interrupt, notifier, metrics);
    let mut write = |offset: u64, value: u32| transport.write(offset, &value.to_le_bytes());
    write(0x070, 1);
    write(0x070, 1 | 2);
    write(0x024, 1);
    write(0x020, 1);
    write(0x070, 1 | 2 | 8);
    for (index, &base) in QUEUE_BASES.iter().enumerate() {
        let q = GuestQueue::new(base);
        write(0x030, index as u32);
        write(0x038, u32::from(QUEUE_LEN));
        write(0x080, q.desc as u32);
        write(0x090, q.avail as u32);
        write(0x0a0, q.used as u32);
        write(0x044, 1);
    }
    write(0x070, 1 | 2 | 8 | 4);
    assert!(transport.device().active.is_some());

    let mut txq = GuestQueue::new(QUEUE_BASES[TX_QUEUE]);
    mem.write_obj(
        VsockHeader::from(tx_header(OP_REQUEST, 0)),
        GuestAddress(slot(0)),
    )
    .unwrap();
    txq.add_chain(&mem, &[(slot(0), HEADER_SIZE as u32, false)]);
    transport.write(0x050, &(TX_QUEUE as u32).to_le_bytes());
    transport.device_mut().process();
    assert_eq!(log.lock().unwrap().sent.len(), 1);

    let mut config = [0u8; 8];
    transport.read(0x100, &mut config);
    assert_eq!(u64::from_le_bytes(config), GUEST_CID);
}
