//! What wakes the vsock device: its epoll set, watched by the VMM's event loop.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use super::{Vsock, VsockBackend};
use crate::devices::virtio::mmio::MmioTransport;
use crate::event_loop::EventSource;

pub struct VsockEvents<B: VsockBackend> {
    transport: Arc<Mutex<MmioTransport<Vsock<B>>>>,
    fd: RawFd,
}

impl<B: VsockBackend> VsockEvents<B> {
    pub fn new(transport: Arc<Mutex<MmioTransport<Vsock<B>>>>) -> Self {
        let fd = transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .device()
            .epoll_fd();
        Self { transport, fd }
    }
}

impl<B: VsockBackend + 'static> EventSource for VsockEvents<B> {
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
