//! Why a VM stops, and the one-shot signal that tells the event loop.

use std::sync::Mutex;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// The first reason to stop wins; later ones are ignored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine through the i8042 (how our guests shut down).
    GuestReset,
    /// A vCPU hit a triple fault; where it was, for the report.
    TripleFault { vcpu: u8, state: String },
    /// KVM reported a system event (shutdown, reset, crash) of this type.
    SystemEvent(u32),
    /// A vCPU could not go on: KVM failed or reported an error.
    VcpuFailed { vcpu: u8, error: String },
    /// The VMM was asked to stop (signal or caller).
    Stopped,
    /// The VMM was asked to save the VM to its snapshot files and stop.
    Snapshot,
}

pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    event: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            event: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless another came first, and wakes the event loop.
    pub fn request(&self, reason: ExitReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
        // A full counter still wakes the loop, so a failed write loses nothing.
        let _ = self.event.write(1);
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn event(&self) -> &EventFd {
        &self.event
    }
}
