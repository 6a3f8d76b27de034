//! virtio devices over the virtio-mmio transport.

pub mod mmio;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::memory::GuestMemory;

/// Feature bits every device offers.
pub const VIRTIO_F_VERSION_1: u32 = 32;
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Interrupt status bits of the virtio-mmio transport.
pub const INTERRUPT_USED_RING: u32 = 1;

/// The interrupt line of one virtio device and the status register the guest reads to learn why
/// it fired.
pub struct VirtioInterrupt {
    status: AtomicU32,
    irq: EventFd,
}

impl VirtioInterrupt {
    pub fn new(irq: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irq,
        }
    }

    /// Tells the guest that used rings have new entries.
    pub fn signal_used_ring(&self) {
        self.status.fetch_or(INTERRUPT_USED_RING, Ordering::SeqCst);
        // An overflowing eventfd counter means an interrupt is already pending.
        let _ = self.irq.write(1);
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

/// What a device receives when the driver sets DRIVER_OK.
pub struct Activation {
    pub mem: GuestMemory,
    pub queues: Vec<Queue>,
    pub acked_features: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is not usable (bad size or addresses)")]
    BadQueue(usize),
    #[error("the device cannot start: {0}")]
    Device(String),
}

/// A virtio device as the transport sees it.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    fn queue_max_sizes(&self) -> &[u16];
    fn avail_features(&self) -> u64;
    /// Reads the device configuration space; out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to the configuration space; devices with a read-only one ignore it.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the queues the driver set up.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Returns to the state before activation, dropping queues and in-flight work.
    fn reset(&mut self);
}
