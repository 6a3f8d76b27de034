//! What wakes a virtio device: its queues' notifications (ioeventfds, or MMIO writes the
//! transport passes on) and a descriptor the VMM's event loop watches, whose work runs with the
//! device's transport locked.

use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::VirtioDevice;
use super::mmio::{MmioTransport, QueueNotifier};
use crate::event_loop::EventSource;

/// A device whose work the event loop starts.
pub trait Polled: VirtioDevice {
    /// One eventfd per queue, for the guest's notifications (registered as ioeventfds).
    fn queue_events(&self) -> &[EventFd];
    /// Passes on notifications that reach the transport as MMIO writes.
    fn notifier(&self) -> io::Result<Box<dyn QueueNotifier>> {
        let events = self
            .queue_events()
            .iter()
            .map(EventFd::try_clone)
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Box::new(EventNotifier(events)))
    }
    /// Readable when [`Polled::on_ready`] has work.
    fn poll_fd(&self) -> RawFd;
    fn on_ready(&mut self);
}

/// Signals queue eventfds for notifications that arrive as MMIO writes.
struct EventNotifier(Vec<EventFd>);

impl QueueNotifier for EventNotifier {
    fn notify(&self, index: u32) {
        if let Some(evt) = usize::try_from(index).ok().and_then(|i| self.0.get(i)) {
            let _ = evt.write(1);
        }
    }
}

pub struct DeviceEvents<D: Polled> {
    transport: Arc<Mutex<MmioTransport<D>>>,
    fd: RawFd,
}

impl<D: Polled> DeviceEvents<D> {
    pub fn new(transport: Arc<Mutex<MmioTransport<D>>>) -> Self {
        let fd = transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .device()
            .poll_fd();
        Self { transport, fd }
    }
}

impl<D: Polled + 'static> EventSource for DeviceEvents<D> {
    fn fd(&self) -> RawFd {
        self.fd
    }

    fn on_ready(&mut self) {
        self.transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .device_mut()
            .on_ready();
    }
}
