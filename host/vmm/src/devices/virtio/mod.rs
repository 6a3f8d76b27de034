//! virtio devices over the virtio-mmio transport.

pub mod block;
pub mod events;
mod metrics;
pub mod mmio;
pub mod pmem;
mod single_queue;
#[cfg(test)]
mod test_queue;
pub mod vsock;

pub(crate) use metrics::{count_refusal, device_metrics};

use std::num::Wrapping;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
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

    /// Adds status bits a restored device had pending (the interrupt itself is in the saved
    /// interrupt controller).
    pub fn set_status(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
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
    /// The queues of an activated device, for a snapshot.
    fn active_queues(&self) -> Option<&[Queue]>;
    /// Called once a device restored from a snapshot is active again: the host side it had
    /// (connections, open requests) is gone, and the device tells the guest if it must.
    fn restored(&mut self) {}
    /// What the device keeps beyond its transport's registers and queues, for a snapshot.
    fn save_state(&self) -> Option<DeviceState> {
        None
    }
    /// Takes back what [`VirtioDevice::save_state`] gave, before the device starts again. A
    /// snapshot is host input: a state the device cannot take is refused, with the reason.
    fn restore_state(&mut self, state: Option<&DeviceState>) -> Result<(), DeviceStateError> {
        state.map_or(Ok(()), |state| {
            Err(DeviceStateError::NotKept(state.clone()))
        })
    }
}

/// Why a device cannot take the state a snapshot gives it.
#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    #[error("the device keeps no state of its own, and the snapshot gives it {0:?}")]
    NotKept(DeviceState),
    #[error("host ports are numbered from {first}, and the snapshot's numbering stood at {port}")]
    HostPortBelowRange { port: u32, first: u32 },
}

/// A device's own state in a snapshot, by kind of device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    /// The vsock device: where its numbering of the host's connections stood.
    Vsock { next_host_port: u32 },
}

/// Bytes of one descriptor in a split queue's table.
const DESCRIPTOR_BYTES: u64 = std::mem::size_of::<Descriptor>() as u64;

/// Whether the chain at `head` of a queue of `queue_size` whose table is at `desc_table` has
/// an indirect descriptor.
///
/// No device here offers `VIRTIO_RING_F_INDIRECT_DESC`, yet virtio-queue's chains follow an
/// indirect descriptor by themselves, into a table of up to 65,535 more. So the chain is walked
/// here first, as virtio-queue will walk it: from its head along `NEXT`, at most `queue_size`
/// descriptors, ending where it would end (an index past the queue, a descriptor outside guest
/// memory). A guest that rewrites a descriptor between this walk and the parse can still have
/// one chain followed through one table; virtio-queue bounds that walk (65,535 descriptors, no
/// table inside a table).
pub fn uses_indirect(
    mem: &GuestMemory,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> bool {
    let mut index = head;
    for _ in 0..queue_size {
        if index >= queue_size {
            return false;
        }
        let Some(addr) = desc_table.checked_add(u64::from(index) * DESCRIPTOR_BYTES) else {
            return false;
        };
        let Ok(desc) = mem.read_obj::<Descriptor>(addr) else {
            return false;
        };
        if desc.refers_to_indirect_table() {
            return true;
        }
        if !desc.has_next() {
            return false;
        }
        index = desc.next();
    }
    false
}

/// Whether the driver claims more new buffers than the queue holds. Such a queue yields no
/// chains yet keeps reporting new ones, so draining it would never end.
pub fn avail_ring_corrupt(queue: &Queue, mem: &GuestMemory) -> bool {
    !queue
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .is_ok_and(|idx| (idx - Wrapping(queue.next_avail())).0 <= queue.size())
}

/// Reads bytes of a configuration space laid out in `config`, from `offset`: bytes past its end
/// (or at offsets that overflow) read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// A descriptor chain popped from a device's queue.
pub type Chain<'m> = virtio_queue::DescriptorChain<&'m GuestMemory>;

/// What one [`drain_queue`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// The available index claimed more chains than the queue holds; nothing more was taken.
    pub ring_corrupt: bool,
    /// Chains that could not be put in the used ring (a head past the queue).
    pub unreturned: usize,
    /// `budget` chains were served: more may be waiting.
    pub budget_spent: bool,
}

/// Serves the chains the driver made available, at most `budget` of them: each goes to `serve`,
/// which returns how many bytes it wrote into the chain, then back to the driver in the used
/// ring; the driver is interrupted once at the end, if it asked to be. Notifications are off
/// while the queue is drained and back on, then checked once more, when it is empty.
pub fn drain_queue<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemory,
    interrupt: &VirtioInterrupt,
    budget: usize,
    mut serve: impl FnMut(Chain<'m>) -> u32,
) -> Drained {
    let mut drained = Drained::default();
    let mut served = 0;
    'drain: loop {
        if avail_ring_corrupt(queue, mem) {
            drained.ring_corrupt = true;
            break;
        }
        if queue.disable_notification(mem).is_err() {
            break;
        }
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let written = serve(chain);
            if queue.add_used(mem, head, written).is_err() {
                drained.unreturned += 1;
            }
            served += 1;
            if served == budget {
                drained.budget_spent = true;
                break 'drain;
            }
        }
        if !queue.enable_notification(mem).unwrap_or(false) {
            break;
        }
    }
    if served > 0 && queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used_ring();
    }
    drained
}
