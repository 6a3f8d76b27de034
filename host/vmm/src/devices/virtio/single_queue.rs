//! What the devices with one request queue (block, pmem) share: the queue's notification
//! eventfd, the queue and guest memory once the driver activated them, and the serving of one
//! wake's worth of chains with every refusal a malformed ring can cause counted.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::AtomicU64;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{
    ActivateError, Activation, Chain, VIRTIO_RING_F_EVENT_IDX, VirtioInterrupt, count_refusal,
    drain_queue, uses_indirect,
};
use crate::vstate::memory::GuestMemory;

/// Where a device counts the chains refused before it sees them.
pub struct Refusals<'a> {
    /// The device's name in the log.
    pub device: &'static str,
    pub bad_chains: &'a AtomicU64,
    /// Chains with an indirect descriptor, also counted in `bad_chains`, if the device keeps
    /// them apart.
    pub indirect_chains: Option<&'a AtomicU64>,
}

impl Refusals<'_> {
    fn refuse(&self, what: &str) {
        count_refusal(self.device, self.bad_chains, what);
    }
}

pub struct SingleQueue {
    event: EventFd,
    active: Option<(GuestMemory, Queue)>,
}

impl SingleQueue {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            event: EventFd::new(EFD_NONBLOCK)?,
            active: None,
        })
    }

    /// Takes the queue the driver set up (exactly one), with notification suppression if the
    /// driver acked it, and has the event loop look at it: the guest may have queued requests
    /// before its notification was seen (this runs on a vCPU thread, which leaves device work to
    /// the loop).
    pub fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation {
            mem,
            queues,
            acked_features,
        } = activation;
        let Ok([mut queue]) = <[Queue; 1]>::try_from(queues) else {
            return Err(ActivateError::BadQueue(1));
        };
        queue.set_event_idx(acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        self.active = Some((mem, queue));
        let _ = self.event.write(1);
        Ok(())
    }

    pub fn queues(&self) -> Option<&[Queue]> {
        self.active.as_ref().map(|(_, q)| std::slice::from_ref(q))
    }

    pub fn reset(&mut self) {
        self.active = None;
    }

    pub fn events(&self) -> &[EventFd] {
        std::slice::from_ref(&self.event)
    }

    pub fn poll_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    /// Serves the chains the guest queued, up to `budget`: each one without an indirect
    /// descriptor goes to `serve`, which returns the bytes it wrote into it. Returns whether the
    /// budget was spent; the eventfd then stays readable, so that the event loop comes back to
    /// the queue after its other work.
    pub fn serve(
        &mut self,
        interrupt: &VirtioInterrupt,
        budget: usize,
        refusals: &Refusals<'_>,
        mut serve: impl FnMut(&GuestMemory, Chain<'_>) -> u32,
    ) -> bool {
        // Reading resets the counter; a spurious wake-up reads EAGAIN.
        let _ = self.event.read();
        let Some((mem, queue)) = self.active.as_mut() else {
            return false;
        };
        let mem = &*mem;
        let desc_table = GuestAddress(queue.desc_table());
        let size = queue.size();
        let drained = drain_queue(queue, mem, interrupt, budget, |chain| {
            if uses_indirect(mem, desc_table, size, chain.head_index()) {
                if let Some(counter) = refusals.indirect_chains {
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                refusals.refuse(
                    "descriptor chain uses an indirect table, which the device does not offer",
                );
                return 0;
            }
            serve(mem, chain)
        });
        if drained.ring_corrupt {
            refusals.refuse("available ring index beyond the queue size");
        }
        for _ in 0..drained.unreturned {
            refusals.refuse("cannot return a request's buffers");
        }
        if drained.budget_spent {
            let _ = self.event.write(1);
        }
        drained.budget_spent
    }
}
