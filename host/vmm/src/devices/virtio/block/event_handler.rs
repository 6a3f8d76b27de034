//! What wakes the block device: its queue's eventfd, watched by the VMM's event loop.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use super::Block;
use crate::devices::virtio::mmio::MmioTransport;
use crate::event_loop::EventSource;

pub struct BlockEvents {
    transport: Arc<Mutex<MmioTransport<Block>>>,
    fd: RawFd,
}

impl BlockEvents {
    pub fn new(transport: Arc<Mutex<MmioTransport<Block>>>) -> Self {
        let fd = transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .device()
            .queue_event()
            .as_raw_fd();
        Self { transport, fd }
    }
}

impl EventSource for BlockEvents {
    fn fd(&self) -> RawFd {
        self.fd
    }

    fn on_ready(&mut self) {
        self.transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .device_mut()
            .process();
    }
}
