//! The transport driven the way a guest driver would, and the ways a hostile one would not.

use std::sync::{Arc, Mutex};

use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::*;
use crate::devices::virtio::{ActivateError, INTERRUPT_USED_RING};

const DEVICE_TYPE: u32 = 42;
const QUEUE_MAX: [u16; 2] = [16, 8];
const MEM_SIZE: usize = 0x10_0000;
/// Feature bits the dummy offers besides VERSION_1.
const FEATURE_LOW: u64 = 1 << 0;
const FEATURE_HIGH: u64 = 1 << 35;
const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const OFFERED: u64 = VERSION_1 | FEATURE_LOW | FEATURE_HIGH;
const CONFIG: [u8; 4] = [0xa1, 0xa2, 0xa3, 0xa4];

/// What the transport did to the dummy device.
#[derive(Default)]
struct Calls {
    /// Acked features and queue sizes of each activation.
    activations: Vec<(u64, Vec<u16>)>,
    resets: usize,
    notified: Vec<u32>,
}

struct DummyDevice {
    calls: Arc<Mutex<Calls>>,
    fail_activation: bool,
    queues: Option<Vec<Queue>>,
    restored: bool,
}

impl VirtioDevice for DummyDevice {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_MAX
    }

    fn avail_features(&self) -> u64 {
        OFFERED
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio::read_config_bytes(&CONFIG, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        if self.fail_activation {
            return Err(ActivateError::Device("refused by the test".into()));
        }
        let sizes = activation.queues.iter().map(QueueT::size).collect();
        self.calls
            .lock()
            .unwrap()
            .activations
            .push((activation.acked_features, sizes));
        self.queues = Some(activation.queues);
        Ok(())
    }

    fn reset(&mut self) {
        self.queues = None;
        self.calls.lock().unwrap().resets += 1;
    }

    fn active_queues(&self) -> Option<&[Queue]> {
        self.queues.as_deref()
    }

    fn restored(&mut self) {
        self.restored = true;
    }
}

struct RecordingNotifier(Arc<Mutex<Calls>>);

impl QueueNotifier for RecordingNotifier {
    fn notify(&self, index: u32) {
        self.0.lock().unwrap().notified.push(index);
    }
}

struct Harness {
    transport: MmioTransport<DummyDevice>,
    calls: Arc<Mutex<Calls>>,
    metrics: Arc<MmioMetrics>,
    interrupt: Arc<VirtioInterrupt>,
}

fn harness() -> Harness {
    harness_with(false)
}

fn harness_with(fail_activation: bool) -> Harness {
    let calls = Arc::new(Mutex::new(Calls::default()));
    let metrics = Arc::new(MmioMetrics::default());
    let interrupt = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let device = DummyDevice {
        calls: calls.clone(),
        fail_activation,
        queues: None,
        restored: false,
    };
    let transport = MmioTransport::new(
        device,
        mem,
        interrupt.clone(),
        Box::new(RecordingNotifier(calls.clone())),
        metrics.clone(),
    );
    Harness {
        transport,
        calls,
        metrics,
        interrupt,
    }
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

impl Harness {
    fn read(&mut self, offset: u64) -> u32 {
        let mut data = [0xffu8; 4];
        self.transport.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    fn status(&mut self) -> u32 {
        self.read(reg::STATUS)
    }

    fn add_status(&mut self, bit: u32) {
        let value = self.status() | bit;
        self.write(reg::STATUS, value);
    }

    fn ack_features(&mut self, features: u64) {
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, features as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, (features >> 32) as u32);
    }

    /// ACKNOWLEDGE, DRIVER, the features, FEATURES_OK.
    fn negotiate(&mut self, features: u64) {
        self.add_status(status::ACKNOWLEDGE);
        self.add_status(status::DRIVER);
        self.ack_features(features);
        self.add_status(status::FEATURES_OK);
    }

    /// Lays queue `index` out in its own page of guest memory and marks it ready.
    fn setup_queue(&mut self, index: u32, size: u32) {
        let base = 0x1000 * u64::from(index + 1);
        self.setup_queue_at(index, size, base);
    }

    fn setup_queue_at(&mut self, index: u32, size: u32, base: u64) {
        self.write(reg::QUEUE_SEL, index);
        self.write(reg::QUEUE_NUM, size);
        for (low, high, addr) in [
            (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, base),
            (reg::QUEUE_AVAIL_LOW, reg::QUEUE_AVAIL_HIGH, base + 0x400),
            (reg::QUEUE_USED_LOW, reg::QUEUE_USED_HIGH, base + 0x800),
        ] {
            self.write(low, addr as u32);
            self.write(high, (addr >> 32) as u32);
        }
        self.write(reg::QUEUE_READY, 1);
    }

    fn setup_all_queues(&mut self) {
        for (index, &max) in QUEUE_MAX.iter().enumerate() {
            self.setup_queue(index as u32, u32::from(max));
        }
    }

    /// The whole driver init sequence, ending with DRIVER_OK.
    fn init(&mut self, features: u64) {
        self.negotiate(features);
        self.setup_all_queues();
        self.add_status(status::DRIVER_OK);
    }

    fn activations(&self) -> Vec<(u64, Vec<u16>)> {
        self.calls.lock().unwrap().activations.clone()
    }

    fn resets(&self) -> usize {
        self.calls.lock().unwrap().resets
    }

    fn notified(&self) -> Vec<u32> {
        self.calls.lock().unwrap().notified.clone()
    }
}

const SETUP_DONE: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;

#[test]
fn driver_init_sequence_activates_device_with_acked_features() {
    let mut h = harness();
    h.init(OFFERED);
    assert_eq!(h.status(), SETUP_DONE | status::DRIVER_OK);
    assert_eq!(h.activations(), vec![(OFFERED, QUEUE_MAX.to_vec())]);
    assert_eq!(load(&h.metrics.activations), 1);
    assert_eq!(load(&h.metrics.out_of_sequence), 0);
    assert_eq!(load(&h.metrics.bad_queue), 0);
}

#[test]
fn smaller_queue_sizes_chosen_by_the_driver_reach_the_device() {
    let mut h = harness();
    h.negotiate(VERSION_1);
    h.setup_queue(0, 4);
    h.setup_queue(1, 8);
    h.add_status(status::DRIVER_OK);
    assert_eq!(h.activations(), vec![(VERSION_1, vec![4, 8])]);
}

#[test]
fn identity_registers_read_magic_version_and_device_id() {
    let mut h = harness();
    assert_eq!(h.read(reg::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(h.read(reg::VERSION), 2);
    assert_eq!(h.read(reg::DEVICE_ID), DEVICE_TYPE);
    assert_eq!(h.read(reg::VENDOR_ID), 0);
    assert_eq!(h.read(reg::STATUS), 0);
}

#[test]
fn device_features_are_paged_by_select() {
    let mut h = harness();
    h.write(reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(h.read(reg::DEVICE_FEATURES), OFFERED as u32);
    h.write(reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(h.read(reg::DEVICE_FEATURES), (OFFERED >> 32) as u32);
    h.write(reg::DEVICE_FEATURES_SEL, 2);
    assert_eq!(h.read(reg::DEVICE_FEATURES), 0);
    h.write(reg::DEVICE_FEATURES_SEL, u32::MAX);
    assert_eq!(h.read(reg::DEVICE_FEATURES), 0);
}

#[test]
fn features_the_device_does_not_offer_are_masked() {
    let mut h = harness();
    h.init(u64::MAX);
    assert_eq!(h.status() & status::FEATURES_OK, status::FEATURES_OK);
    assert_eq!(h.activations(), vec![(OFFERED, QUEUE_MAX.to_vec())]);
}

#[test]
fn driver_feature_page_out_of_range_is_ignored_and_counted() {
    let mut h = harness();
    h.add_status(status::ACKNOWLEDGE);
    h.add_status(status::DRIVER);
    h.ack_features(VERSION_1);
    h.write(reg::DRIVER_FEATURES_SEL, 7);
    h.write(reg::DRIVER_FEATURES, u32::MAX);
    assert_eq!(load(&h.metrics.out_of_sequence), 1);
    h.add_status(status::FEATURES_OK);
    h.setup_all_queues();
    h.add_status(status::DRIVER_OK);
    assert_eq!(h.activations()[0].0, VERSION_1);
}

#[test]
fn features_written_outside_negotiation_are_ignored_and_counted() {
    let mut h = harness();
    h.ack_features(OFFERED);
    assert_eq!(load(&h.metrics.out_of_sequence), 2);
    h.negotiate(VERSION_1);
    h.ack_features(OFFERED);
    assert_eq!(load(&h.metrics.out_of_sequence), 4);
    h.setup_all_queues();
    h.add_status(status::DRIVER_OK);
    assert_eq!(h.activations()[0].0, VERSION_1);
}

#[test]
fn features_ok_is_refused_without_version_1() {
    let mut h = harness();
    h.negotiate(FEATURE_LOW | FEATURE_HIGH);
    assert_eq!(h.status(), status::ACKNOWLEDGE | status::DRIVER);
    assert_eq!(load(&h.metrics.out_of_sequence), 1);
    // Without FEATURES_OK neither queue setup nor DRIVER_OK is accepted.
    h.setup_all_queues();
    h.add_status(status::DRIVER_OK);
    assert!(h.activations().is_empty());
    assert_eq!(h.status() & status::DRIVER_OK, 0);
}

#[test]
fn status_bits_set_out_of_order_are_ignored_and_counted() {
    let mut h = harness();
    for (value, expected) in [
        (status::DRIVER, 0),
        (status::FEATURES_OK, 0),
        (status::DRIVER_OK, 0),
        (status::NEEDS_RESET, 0),
        (status::ACKNOWLEDGE | status::DRIVER, 0),
        (status::ACKNOWLEDGE, status::ACKNOWLEDGE),
        (
            status::ACKNOWLEDGE | status::FEATURES_OK,
            status::ACKNOWLEDGE,
        ),
        (status::ACKNOWLEDGE | status::DRIVER_OK, status::ACKNOWLEDGE),
    ] {
        h.write(reg::STATUS, value);
        assert_eq!(h.status(), expected, "after writing {value:#x}");
    }
    assert_eq!(load(&h.metrics.out_of_sequence), 7);
    assert_eq!(h.resets(), 0);
}

#[test]
fn clearing_status_bits_without_reset_is_ignored_and_counted() {
    let mut h = harness();
    h.init(VERSION_1);
    h.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    assert_eq!(h.status(), SETUP_DONE | status::DRIVER_OK);
    assert_eq!(load(&h.metrics.out_of_sequence), 1);
    assert_eq!(h.resets(), 0);
    assert_eq!(h.activations().len(), 1);
}

#[test]
fn driver_ok_after_failed_is_refused() {
    let mut h = harness();
    h.negotiate(VERSION_1);
    h.setup_all_queues();
    h.add_status(status::FAILED);
    h.add_status(status::DRIVER_OK);
    assert_eq!(h.status() & status::DRIVER_OK, 0);
    assert!(h.activations().is_empty());
    assert_eq!(load(&h.metrics.out_of_sequence), 1);
}

#[test]
fn writing_zero_status_resets_device_queues_and_interrupts() {
    let mut h = harness();
    h.init(OFFERED);
    h.interrupt.signal_used_ring();
    assert_ne!(h.read(reg::INTERRUPT_STATUS), 0);

    h.write(reg::STATUS, 0);
    assert_eq!(h.resets(), 1);
    assert_eq!(load(&h.metrics.resets), 1);
    assert_eq!(h.status(), 0);
    assert_eq!(h.read(reg::INTERRUPT_STATUS), 0);
    for (index, &max) in QUEUE_MAX.iter().enumerate() {
        h.write(reg::QUEUE_SEL, index as u32);
        assert_eq!(h.read(reg::QUEUE_NUM_MAX), u32::from(max));
        assert_eq!(h.read(reg::QUEUE_READY), 0);
    }
    // Features and queues start over: a second init activates again with what it acks.
    h.init(VERSION_1);
    assert_eq!(
        h.activations(),
        vec![
            (OFFERED, QUEUE_MAX.to_vec()),
            (VERSION_1, QUEUE_MAX.to_vec())
        ]
    );
}

#[test]
fn queue_registers_report_the_selected_queue() {
    let mut h = harness();
    h.write(reg::QUEUE_SEL, 1);
    assert_eq!(h.read(reg::QUEUE_NUM_MAX), u32::from(QUEUE_MAX[1]));
    h.write(reg::QUEUE_SEL, QUEUE_MAX.len() as u32);
    assert_eq!(h.read(reg::QUEUE_NUM_MAX), 0);
    assert_eq!(h.read(reg::QUEUE_READY), 0);
    h.negotiate(VERSION_1);
    h.setup_queue(0, 16);
    h.write(reg::QUEUE_SEL, 0);
    assert_eq!(h.read(reg::QUEUE_READY), 1);
}

#[test]
fn queue_setup_before_features_ok_is_ignored_and_counted() {
    let mut h = harness();
    h.add_status(status::ACKNOWLEDGE);
    h.add_status(status::DRIVER);
    h.setup_queue(0, 16);
    // Size, three addresses of two halves each, ready.
    assert_eq!(load(&h.metrics.out_of_sequence), 8);
    h.write(reg::QUEUE_SEL, 0);
    assert_eq!(h.read(reg::QUEUE_READY), 0);
}

#[test]
fn queue_setup_after_driver_ok_is_ignored_and_counted() {
    let mut h = harness();
    h.init(VERSION_1);
    let before = load(&h.metrics.out_of_sequence);
    h.setup_queue_at(0, 4, 0x8000);
    assert_eq!(load(&h.metrics.out_of_sequence) - before, 8);
    assert_eq!(h.activations().len(), 1);
}

#[test]
fn queue_setup_beyond_device_queues_is_ignored_and_counted() {
    let mut h = harness();
    h.negotiate(VERSION_1);
    h.setup_queue(QUEUE_MAX.len() as u32, 16);
    h.setup_queue_at(u32::MAX, 16, 0x8000);
    let ignored = load(&h.metrics.bad_queue) + load(&h.metrics.out_of_sequence);
    assert_eq!(ignored, 16);
    h.setup_all_queues();
    h.add_status(status::DRIVER_OK);
    assert_eq!(h.activations().len(), 1);
}

#[test]
fn ready_queue_cannot_be_reconfigured() {
    let mut h = harness();
    h.negotiate(VERSION_1);
    h.setup_queue(0, 16);
    h.write(reg::QUEUE_NUM, 2);
    h.write(reg::QUEUE_DESC_LOW, 0x9000);
    assert_eq!(load(&h.metrics.bad_queue), 2);
    h.setup_queue(1, 8);
    h.add_status(status::DRIVER_OK);
    assert_eq!(h.activations(), vec![(VERSION_1, QUEUE_MAX.to_vec())]);
}

/// DRIVER_OK with queue 0 set up by `setup` must leave the device idle and ask for a reset.
fn assert_refused_activation(setup: impl FnOnce(&mut Harness)) {
    let mut h = harness();
    h.negotiate(VERSION_1);
    setup(&mut h);
    h.setup_queue(1, u32::from(QUEUE_MAX[1]));
    h.add_status(status::DRIVER_OK);
    assert!(h.activations().is_empty());
    assert_eq!(h.status() & status::NEEDS_RESET, status::NEEDS_RESET);
    assert!(load(&h.metrics.bad_queue) >= 1);
    assert_eq!(load(&h.metrics.activations), 0);
    // A reset brings the device back to a clean slate.
    h.write(reg::STATUS, 0);
    h.init(VERSION_1);
    assert_eq!(h.activations().len(), 1);
}

#[test]
fn queue_size_above_max_prevents_activation() {
    assert_refused_activation(|h| h.setup_queue(0, u32::from(QUEUE_MAX[0]) * 2));
}

#[test]
fn queue_size_beyond_16_bits_prevents_activation() {
    assert_refused_activation(|h| h.setup_queue(0, 0x1_0010));
}

#[test]
fn queue_size_not_a_power_of_two_prevents_activation() {
    assert_refused_activation(|h| h.setup_queue(0, 12));
}

#[test]
fn queue_size_zero_prevents_activation() {
    assert_refused_activation(|h| h.setup_queue(0, 0));
}

#[test]
fn corrected_queue_size_is_accepted() {
    let mut h = harness();
    h.negotiate(VERSION_1);
    h.write(reg::QUEUE_SEL, 0);
    h.write(reg::QUEUE_NUM, 12);
    h.setup_all_queues();
    h.add_status(status::DRIVER_OK);
    assert_eq!(h.activations(), vec![(VERSION_1, QUEUE_MAX.to_vec())]);
}

#[test]
fn queue_not_ready_prevents_activation() {
    assert_refused_activation(|h| {
        h.setup_queue(0, 16);
        h.write(reg::QUEUE_SEL, 0);
        h.write(reg::QUEUE_READY, 0);
    });
}

#[test]
fn queue_outside_guest_memory_prevents_activation() {
    assert_refused_activation(|h| h.setup_queue_at(0, 16, MEM_SIZE as u64 - 0x100));
}

#[test]
fn queue_above_4_gib_outside_guest_memory_prevents_activation() {
    assert_refused_activation(|h| h.setup_queue_at(0, 16, 1 << 40));
}

#[test]
fn device_activation_failure_sets_needs_reset() {
    let mut h = harness_with(true);
    h.init(VERSION_1);
    assert_eq!(h.status() & status::NEEDS_RESET, status::NEEDS_RESET);
    assert_eq!(load(&h.metrics.activations), 0);
    // A notification for a device that never started goes nowhere harmful.
    h.write(reg::QUEUE_NOTIFY, 0);
}

#[test]
fn register_accesses_of_wrong_width_or_alignment_are_counted_and_read_zero() {
    let mut h = harness();
    let mut one = [0xffu8; 1];
    h.transport.read(reg::MAGIC_VALUE, &mut one);
    assert_eq!(one, [0]);
    let mut two = [0xffu8; 2];
    h.transport.read(reg::MAGIC_VALUE, &mut two);
    assert_eq!(two, [0; 2]);
    let mut eight = [0xffu8; 8];
    h.transport.read(reg::MAGIC_VALUE, &mut eight);
    assert_eq!(eight, [0; 8]);
    let mut four = [0xffu8; 4];
    h.transport.read(reg::MAGIC_VALUE + 1, &mut four);
    assert_eq!(four, [0; 4]);
    let mut empty = [0u8; 0];
    h.transport.read(reg::STATUS, &mut empty);
    assert_eq!(load(&h.metrics.bad_access_width), 5);

    h.transport.write(reg::STATUS, &[status::ACKNOWLEDGE as u8]);
    h.transport
        .write(reg::STATUS, &(status::ACKNOWLEDGE as u16).to_le_bytes());
    h.transport
        .write(reg::STATUS, &u64::from(status::ACKNOWLEDGE).to_le_bytes());
    h.transport
        .write(reg::STATUS + 2, &status::ACKNOWLEDGE.to_le_bytes());
    h.transport.write(reg::STATUS, &[]);
    assert_eq!(load(&h.metrics.bad_access_width), 10);
    assert_eq!(h.status(), 0);
}

#[test]
fn unknown_and_write_only_registers_read_zero_and_are_counted() {
    let mut h = harness();
    for offset in [
        reg::QUEUE_NOTIFY,
        reg::INTERRUPT_ACK,
        reg::QUEUE_DESC_LOW,
        0x0f8,
    ] {
        assert_eq!(h.read(offset), 0, "register {offset:#x}");
    }
    h.write(reg::MAGIC_VALUE, 0);
    h.write(0x0f8, 1);
    assert_eq!(load(&h.metrics.bad_access_width), 6);
    assert_eq!(h.read(reg::MAGIC_VALUE), 0x7472_6976);
}

#[test]
fn config_space_reads_past_the_end_return_zeros() {
    let mut h = harness();
    assert_eq!(h.read(reg::CONFIG), u32::from_le_bytes(CONFIG));
    let mut data = [0xffu8; 4];
    h.transport.read(reg::CONFIG + 2, &mut data);
    assert_eq!(data, [CONFIG[2], CONFIG[3], 0, 0]);
    let mut data = [0xffu8; 8];
    h.transport.read(reg::CONFIG + 0x100, &mut data);
    assert_eq!(data, [0; 8]);
    let mut data = [0xffu8; 4];
    h.transport.read(u64::MAX - 1, &mut data);
    assert_eq!(data, [0; 4]);
}

#[test]
fn config_writes_bump_the_generation() {
    let mut h = harness();
    let before = h.read(reg::CONFIG_GENERATION);
    h.transport.write(reg::CONFIG, &[1, 2]);
    assert_ne!(h.read(reg::CONFIG_GENERATION), before);
    assert_eq!(h.read(reg::CONFIG), u32::from_le_bytes(CONFIG));
}

#[test]
fn queue_notify_reaches_the_device_only_after_activation() {
    let mut h = harness();
    h.write(reg::QUEUE_NOTIFY, 1);
    h.negotiate(VERSION_1);
    h.setup_all_queues();
    h.write(reg::QUEUE_NOTIFY, 1);
    assert!(h.notified().is_empty());
    h.add_status(status::DRIVER_OK);
    h.write(reg::QUEUE_NOTIFY, 1);
    h.write(reg::QUEUE_NOTIFY, 0);
    // An index the device does not have is the notifier's to ignore.
    h.write(reg::QUEUE_NOTIFY, u32::MAX);
    assert_eq!(h.notified(), vec![1, 0, u32::MAX]);
    h.write(reg::STATUS, 0);
    h.write(reg::QUEUE_NOTIFY, 1);
    assert_eq!(h.notified().len(), 3);
}

#[test]
fn interrupt_ack_clears_only_the_acknowledged_bits() {
    let mut h = harness();
    h.interrupt.signal_used_ring();
    assert_eq!(h.read(reg::INTERRUPT_STATUS), INTERRUPT_USED_RING);
    h.write(reg::INTERRUPT_ACK, 2);
    assert_eq!(h.read(reg::INTERRUPT_STATUS), INTERRUPT_USED_RING);
    h.write(reg::INTERRUPT_ACK, INTERRUPT_USED_RING);
    assert_eq!(h.read(reg::INTERRUPT_STATUS), 0);
}

#[test]
fn notify_address_is_the_queue_notify_register() {
    assert_eq!(queue_notify_address(GuestAddress(0xd000_0000)), 0xd000_0050);
}

#[test]
fn a_saved_running_transport_restores_running_with_its_queues() {
    let mut h = harness();
    h.negotiate(OFFERED);
    h.setup_queue(0, 4);
    h.setup_queue(1, 8);
    h.add_status(status::DRIVER_OK);
    h.interrupt.signal_used_ring();
    let saved = h.transport.save();
    assert_eq!(saved.queues[0].size, 4);
    assert_eq!(saved.queues[0].desc_table, 0x1000);

    let mut fresh = harness();
    fresh.transport.restore(&saved).unwrap();
    assert_eq!(fresh.status(), SETUP_DONE | status::DRIVER_OK);
    assert_eq!(fresh.activations(), vec![(OFFERED, vec![4, 8])]);
    assert!(fresh.transport.device().restored);
    assert_eq!(fresh.read(reg::INTERRUPT_STATUS), INTERRUPT_USED_RING);
    let again = fresh.transport.save();
    assert_eq!(again.queues[1].used_ring, saved.queues[1].used_ring);
    assert_eq!(again.acked_features, OFFERED);
}

#[test]
fn a_saved_transport_that_does_not_fit_the_device_is_refused() {
    let mut h = harness();
    h.init(OFFERED);
    let saved = h.transport.save();

    let mut other_type = saved.clone();
    other_type.device_type = 7;
    let mut unoffered = saved.clone();
    unoffered.acked_features |= 1 << 40;
    let mut fewer_queues = saved.clone();
    fewer_queues.queues.pop();
    let mut bad_queue = saved.clone();
    bad_queue.queues[0].size = 3;
    let mut outside_memory = saved.clone();
    outside_memory.queues[1].used_ring = MEM_SIZE as u64 * 2;
    let mut foreign_state = saved.clone();
    foreign_state.device = Some(DeviceState::Vsock {
        next_host_port: 1 << 30,
    });
    for (what, state) in [
        ("device type", other_type),
        ("features", unoffered),
        ("queue count", fewer_queues),
        ("queue size", bad_queue),
        ("ring outside memory", outside_memory),
        ("a state the device does not keep", foreign_state),
    ] {
        let mut fresh = harness();
        assert!(fresh.transport.restore(&state).is_err(), "{what}");
        assert!(fresh.transport.device().active_queues().is_none(), "{what}");
    }
}
