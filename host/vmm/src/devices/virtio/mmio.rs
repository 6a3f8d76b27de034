//! The virtio-mmio transport (virtio 1.x, "version 2" register layout): the register file the
//! guest driver programs, its status state machine, and the hand-over of queues to the device.
//!
//! Every access is guest-controlled. Accesses of the wrong width, writes out of sequence and bad
//! queue settings are counted and ignored; the device is never activated with an unusable queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestAddress;

use super::{
    Activation, DeviceState, DeviceStateError, VIRTIO_F_VERSION_1, VirtioDevice, VirtioInterrupt,
};
use crate::devices::bus::BusDevice;
use crate::vstate::memory::GuestMemory;

const MAGIC_VALUE: u32 = 0x7472_6976;
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;

mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (virtio 1.x, 2.1).
mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// Counters of what the driver got wrong.
#[derive(Default)]
pub struct MmioMetrics {
    pub bad_access_width: AtomicU64,
    pub out_of_sequence: AtomicU64,
    pub bad_queue: AtomicU64,
    pub activations: AtomicU64,
    pub resets: AtomicU64,
}

/// One queue as a snapshot keeps it (virtio-queue's `QueueState`, field for field).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedQueue {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for SavedQueue {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<&SavedQueue> for QueueState {
    fn from(q: &SavedQueue) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// A transport's registers and queues, as a snapshot keeps them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub status: u32,
    pub features_select: u32,
    pub acked_features_select: u32,
    pub acked_features: u64,
    pub queue_select: u32,
    pub queues: Vec<SavedQueue>,
    pub bad_sizes: Vec<bool>,
    pub interrupt_status: u32,
    pub config_generation: u32,
    /// The device's own state, if it keeps any.
    pub device: Option<DeviceState>,
}

/// Why a saved transport cannot be put back: a snapshot is host input and checked as a guest's
/// register writes are.
#[derive(Debug, thiserror::Error)]
pub enum TransportRestoreError {
    #[error("the snapshot has a device of type {saved} where this VM has one of type {here}")]
    DeviceType { saved: u32, here: u32 },
    #[error("the snapshot's device of type {0} has a different number of queues")]
    QueueCount(u32),
    #[error("the snapshot's device of type {0} acked features it does not offer")]
    Features(u32),
    #[error("queue {queue} of the snapshot's device of type {device} is invalid")]
    Queue { device: u32, queue: usize },
    #[error("the snapshot's device of type {0} was running but cannot start again")]
    Activate(u32),
    #[error("the snapshot's device of type {device} cannot be put back: {why}")]
    DeviceState { device: u32, why: DeviceStateError },
}

/// A virtio-mmio slot as the snapshot code sees it, whatever its device.
pub trait SavedSlot: Send {
    fn save(&self) -> TransportState;
    fn restore(&mut self, state: &TransportState) -> Result<(), TransportRestoreError>;
}

/// Notifies the device that queue `index` has new buffers (used when the guest's notify write
/// reaches the transport instead of an ioeventfd).
pub trait QueueNotifier: Send {
    fn notify(&self, index: u32);
}

pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemory,
    interrupt: Arc<VirtioInterrupt>,
    notifier: Box<dyn QueueNotifier>,
    metrics: Arc<MmioMetrics>,
    status: u32,
    features_select: u32,
    acked_features_select: u32,
    acked_features: u64,
    queue_select: u32,
    queues: Vec<Queue>,
    /// Queues whose last QueueNum was refused. `Queue` keeps its old size then, so without this
    /// the device would start with a ring of a size the driver never laid out.
    bad_sizes: Vec<bool>,
    config_generation: u32,
}

fn new_queues(max_sizes: &[u16]) -> Vec<Queue> {
    max_sizes
        .iter()
        .filter_map(|&max| Queue::new(max).ok())
        .collect()
}

impl<D: VirtioDevice> MmioTransport<D> {
    pub fn new(
        device: D,
        mem: GuestMemory,
        interrupt: Arc<VirtioInterrupt>,
        notifier: Box<dyn QueueNotifier>,
        metrics: Arc<MmioMetrics>,
    ) -> Self {
        let queues = new_queues(device.queue_max_sizes());
        let bad_sizes = vec![false; queues.len()];
        Self {
            device,
            mem,
            interrupt,
            notifier,
            metrics,
            status: 0,
            features_select: 0,
            acked_features_select: 0,
            acked_features: 0,
            queue_select: 0,
            queues,
            bad_sizes,
            config_generation: 0,
        }
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    fn activated(&self) -> bool {
        self.status & status::DRIVER_OK != 0
    }

    fn count(&self, counter: &AtomicU64, what: &str) {
        if counter.fetch_add(1, Ordering::Relaxed) == 0 {
            warn!(device = self.device.device_type(), "virtio-mmio: {what}");
        } else {
            debug!(device = self.device.device_type(), "virtio-mmio: {what}");
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue settings may change only while the driver is setting the device up.
    fn queue_config_allowed(&self) -> bool {
        let s = self.status;
        s & status::FEATURES_OK != 0 && s & (status::DRIVER_OK | status::FAILED) == 0
    }

    fn update_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if !self.queue_config_allowed() {
            self.count(
                &self.metrics.out_of_sequence,
                "queue setup outside setup phase",
            );
            return;
        }
        match self.selected_queue() {
            Some(queue) if !queue.ready() => f(queue),
            _ => self.count(&self.metrics.bad_queue, "setup of a missing or ready queue"),
        }
    }

    fn reset(&mut self) {
        self.metrics.resets.fetch_add(1, Ordering::Relaxed);
        self.device.reset();
        self.status = 0;
        self.features_select = 0;
        self.acked_features_select = 0;
        self.acked_features = 0;
        self.queue_select = 0;
        self.queues = new_queues(self.device.queue_max_sizes());
        self.bad_sizes = vec![false; self.queues.len()];
        self.interrupt.clear();
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // The driver only ever adds bits; anything else is a protocol error.
        if value & old != old {
            self.count(
                &self.metrics.out_of_sequence,
                "status bits cleared without reset",
            );
            return;
        }
        let added = value & !old;
        let ordered = match added {
            status::ACKNOWLEDGE => old == 0,
            status::DRIVER => old == status::ACKNOWLEDGE,
            status::FEATURES_OK => old == status::ACKNOWLEDGE | status::DRIVER,
            status::DRIVER_OK => old & status::FEATURES_OK != 0 && old & status::FAILED == 0,
            status::FAILED => true,
            0 => true,
            _ => false,
        };
        if !ordered {
            self.count(&self.metrics.out_of_sequence, "status set out of order");
            return;
        }
        if added == status::FEATURES_OK && !self.features_acceptable() {
            // Leaving FEATURES_OK clear tells the driver its feature set was refused.
            self.count(&self.metrics.out_of_sequence, "unacceptable feature set");
            return;
        }
        self.status = value;
        if added == status::DRIVER_OK {
            self.activate();
        }
    }

    fn features_acceptable(&self) -> bool {
        let version_1 = 1u64 << VIRTIO_F_VERSION_1;
        self.acked_features & version_1 != 0
            && self.acked_features & !self.device.avail_features() == 0
    }

    fn activate(&mut self) {
        let usable = self
            .queues
            .iter()
            .zip(&self.bad_sizes)
            .enumerate()
            .find(|(_, (q, bad_size))| **bad_size || !q.ready() || !q.is_valid(&self.mem));
        if let Some((index, _)) = usable {
            self.count(&self.metrics.bad_queue, "activation with an unusable queue");
            debug!(queue = index, "unusable queue at DRIVER_OK");
            self.status |= status::NEEDS_RESET;
            return;
        }
        let queues = std::mem::take(&mut self.queues);
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            acked_features: self.acked_features,
        };
        match self.device.activate(activation) {
            Ok(()) => {
                self.metrics.activations.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                warn!(error = %e, "virtio device failed to activate");
                self.status |= status::NEEDS_RESET;
            }
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.features_select {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                self.count(
                    &self.metrics.bad_access_width,
                    "read of a write-only or unknown register",
                );
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.features_select = value,
            reg::DRIVER_FEATURES_SEL => self.acked_features_select = value,
            reg::DRIVER_FEATURES => {
                if self.status != status::ACKNOWLEDGE | status::DRIVER {
                    self.count(
                        &self.metrics.out_of_sequence,
                        "features written outside negotiation",
                    );
                    return;
                }
                let offered = self.device.avail_features();
                match self.acked_features_select {
                    0 => {
                        self.acked_features = (self.acked_features & !0xffff_ffff)
                            | (u64::from(value) & offered & 0xffff_ffff);
                    }
                    1 => {
                        self.acked_features = (self.acked_features & 0xffff_ffff)
                            | ((u64::from(value) << 32) & offered);
                    }
                    _ => self.count(&self.metrics.out_of_sequence, "feature page out of range"),
                }
            }
            reg::QUEUE_SEL => self.queue_select = value,
            reg::QUEUE_NUM => {
                let mut accepted = None;
                self.update_queue(|q| {
                    accepted =
                        Some(u16::try_from(value).is_ok_and(|size| q.try_set_size(size).is_ok()));
                });
                // `accepted` is set only if the selected queue exists, so its flag does too.
                if let Some(accepted) = accepted
                    && let Some(bad_size) = self.bad_sizes.get_mut(self.queue_select as usize)
                {
                    *bad_size = !accepted;
                    if !accepted {
                        self.count(&self.metrics.bad_queue, "queue size out of range");
                    }
                }
            }
            reg::QUEUE_READY => {
                let allowed = self.queue_config_allowed();
                match self.selected_queue() {
                    Some(queue) if allowed => queue.set_ready(value == 1),
                    _ => self.count(&self.metrics.out_of_sequence, "queue ready outside setup"),
                }
            }
            reg::QUEUE_DESC_LOW => {
                self.update_queue(|q| q.set_desc_table_address(Some(value), None))
            }
            reg::QUEUE_DESC_HIGH => {
                self.update_queue(|q| q.set_desc_table_address(None, Some(value)))
            }
            reg::QUEUE_AVAIL_LOW => {
                self.update_queue(|q| q.set_avail_ring_address(Some(value), None))
            }
            reg::QUEUE_AVAIL_HIGH => {
                self.update_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            reg::QUEUE_USED_LOW => {
                self.update_queue(|q| q.set_used_ring_address(Some(value), None))
            }
            reg::QUEUE_USED_HIGH => {
                self.update_queue(|q| q.set_used_ring_address(None, Some(value)))
            }
            reg::QUEUE_NOTIFY => {
                if self.activated() {
                    self.notifier.notify(value);
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.acknowledge(value),
            reg::STATUS => self.set_status(value),
            _ => self.count(
                &self.metrics.bad_access_width,
                "write to a read-only or unknown register",
            ),
        }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.count(
                &self.metrics.bad_access_width,
                "register read not 32-bit aligned",
            );
            data.fill(0);
            return;
        }
        let value = self.read_register(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.count(
                &self.metrics.bad_access_width,
                "register write not 32 bits wide",
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            self.count(&self.metrics.bad_access_width, "register write not aligned");
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

impl<D: VirtioDevice> SavedSlot for MmioTransport<D> {
    fn save(&self) -> TransportState {
        let queues = self.device.active_queues().unwrap_or(&self.queues);
        TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            features_select: self.features_select,
            acked_features_select: self.acked_features_select,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            queues: queues.iter().map(|q| q.state().into()).collect(),
            bad_sizes: self.bad_sizes.clone(),
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            device: self.device.save_state(),
        }
    }

    /// Puts the registers and queues back and, if the driver had started the device, starts it
    /// again with those queues; then the device learns it was restored.
    fn restore(&mut self, state: &TransportState) -> Result<(), TransportRestoreError> {
        let here = self.device.device_type();
        if state.device_type != here {
            return Err(TransportRestoreError::DeviceType {
                saved: state.device_type,
                here,
            });
        }
        let max_sizes = self.device.queue_max_sizes();
        if state.queues.len() != max_sizes.len() || state.bad_sizes.len() != max_sizes.len() {
            return Err(TransportRestoreError::QueueCount(here));
        }
        if state.acked_features & !self.device.avail_features() != 0 {
            return Err(TransportRestoreError::Features(here));
        }
        let queues = state
            .queues
            .iter()
            .zip(max_sizes)
            .enumerate()
            .map(|(queue, (saved, &max))| {
                let bad = || TransportRestoreError::Queue {
                    device: here,
                    queue,
                };
                if saved.max_size != max {
                    return Err(bad());
                }
                Queue::try_from(QueueState::from(saved)).map_err(|_| bad())
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.device
            .restore_state(state.device.as_ref())
            .map_err(|why| TransportRestoreError::DeviceState { device: here, why })?;
        self.status = state.status;
        self.features_select = state.features_select;
        self.acked_features_select = state.acked_features_select;
        self.acked_features = state.acked_features;
        self.queue_select = state.queue_select;
        self.queues = queues;
        self.bad_sizes = state.bad_sizes.clone();
        self.config_generation = state.config_generation;
        self.interrupt.clear();
        self.interrupt.set_status(state.interrupt_status);
        if state.status & status::DRIVER_OK != 0 && state.status & status::NEEDS_RESET == 0 {
            self.activate();
            if self.device.active_queues().is_none() {
                return Err(TransportRestoreError::Activate(here));
            }
            self.device.restored();
        }
        Ok(())
    }
}

/// Guest-physical address of a queue's notify register, for ioeventfd registration.
pub fn queue_notify_address(base: GuestAddress) -> u64 {
    base.0 + reg::QUEUE_NOTIFY
}

#[cfg(test)]
mod tests;
