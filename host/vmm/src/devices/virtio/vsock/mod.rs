//! A userspace virtio-vsock device (device type 19).
//!
//! The device moves packets between the guest's queues and a [`VsockBackend`]: the real one is
//! [`muxer::UnixMuxer`] (Unix sockets on the host); tests and fuzzers plug in their own. Queue
//! notifications (ioeventfds) and the backend's readiness are gathered in one epoll set that the
//! VMM's event loop watches.

pub mod connection;
pub mod metrics;
pub mod muxer;
pub mod packet;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use agentos_protocol::HOST_CID;
use tracing::warn;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use self::metrics::VsockMetrics;
use self::packet::{
    Header, MAX_PAYLOAD, PacketError, RxBuffer, TYPE_STREAM, TxPacket, read_tx_packet,
    refuse_indirect,
};
use super::events::Polled;
use super::{
    ActivateError, Activation, DeviceState, DeviceStateError, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VirtioDevice, VirtioInterrupt, avail_ring_corrupt, count_refusal,
    drain_queue, read_config_bytes,
};
use crate::vstate::memory::GuestMemory;

pub const VIRTIO_ID_VSOCK: u32 = 19;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const EVENT_QUEUE: usize = 2;
/// `virtio_vsock_event.id` telling the driver every connection is gone (virtio 1.2, 5.10.6.7).
const EVENT_TRANSPORT_RESET: u32 = 0;
const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
const BACKEND_TOKEN: u64 = 3;
const MAX_EVENTS: usize = 8;
/// Transmit chains served per wake of the event loop: a full ring. A guest that keeps adding
/// buffers would otherwise keep the loop, and every other device and socket, in one call.
pub const TX_CHAINS_PER_WAKE: usize = QUEUE_SIZE as usize;

/// The host side of the device.
pub trait VsockBackend: Send {
    /// Takes a packet from the guest; its type and addresses are already checked.
    fn send(&mut self, pkt: TxPacket);
    /// Whether a packet for the guest is (probably) ready.
    fn has_rx(&self) -> bool;
    /// The next packet for the guest, its payload written to the start of `buf` (whose length is
    /// the most the guest's buffer can take). Source and destination CIDs and the type are filled
    /// in by the device.
    fn next_rx(&mut self, buf: &mut [u8]) -> Option<(Header, usize)>;
    /// Readable when [`VsockBackend::on_host_ready`] has work.
    fn fd(&self) -> RawFd;
    fn on_host_ready(&mut self);
    /// The driver reset the device: forget every connection.
    fn reset(&mut self);
    /// The host port the next connection the host opens will take, for a snapshot; `None` for
    /// a backend that numbers none.
    fn next_host_port(&self) -> Option<u32> {
        None
    }
    /// Numbers the host's connections from `port` on, as a snapshot's backend stood: a restored
    /// guest may still hold sockets of the connections before it (reset, but open until its
    /// programs close them), and a new connection under one of their port pairs would be
    /// refused by the guest's kernel.
    fn number_host_ports_from(&mut self, port: u32) -> Result<(), DeviceStateError> {
        Err(DeviceStateError::NotKept(DeviceState::Vsock {
            next_host_port: port,
        }))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("cannot create the vsock queue eventfds or epoll set")]
    Setup(#[source] std::io::Error),
}

struct Active {
    mem: GuestMemory,
    queues: Vec<Queue>,
}

pub struct Vsock<B: VsockBackend> {
    cid: u64,
    backend: B,
    queue_events: Vec<EventFd>,
    epoll: Epoll,
    interrupt: Arc<VirtioInterrupt>,
    metrics: Arc<VsockMetrics>,
    active: Option<Active>,
    rx_buf: Vec<u8>,
}

impl<B: VsockBackend> Vsock<B> {
    pub fn new(
        cid: u64,
        backend: B,
        interrupt: Arc<VirtioInterrupt>,
        metrics: Arc<VsockMetrics>,
    ) -> Result<Self, VsockError> {
        let queue_events = (0..QUEUE_SIZES.len())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(VsockError::Setup)?;
        let epoll = Epoll::new().map_err(VsockError::Setup)?;
        for (token, event) in queue_events.iter().enumerate() {
            epoll
                .ctl(
                    ControlOperation::Add,
                    event.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, token as u64),
                )
                .map_err(VsockError::Setup)?;
        }
        epoll
            .ctl(
                ControlOperation::Add,
                backend.fd(),
                EpollEvent::new(EventSet::IN, BACKEND_TOKEN),
            )
            .map_err(VsockError::Setup)?;
        Ok(Self {
            cid,
            backend,
            queue_events,
            epoll,
            interrupt,
            metrics,
            active: None,
            rx_buf: vec![0; MAX_PAYLOAD],
        })
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The descriptor the VMM's event loop watches.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Handles everything that is ready: queue notifications and host sockets.
    pub fn process(&mut self) {
        let mut events = [EpollEvent::default(); MAX_EVENTS];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    warn!(error = %e, "vsock epoll wait failed");
                }
                return;
            }
        };
        for event in &events[..n] {
            match event.data() {
                BACKEND_TOKEN => self.backend.on_host_ready(),
                token => {
                    if let Some(evt) = self.queue_events.get(token as usize) {
                        // Reading resets the counter; a spurious wake-up reads EAGAIN.
                        let _ = evt.read();
                    }
                    if token as usize == TX_QUEUE {
                        self.process_tx();
                    }
                }
            }
        }
        self.process_rx();
    }

    /// Moves the packets the guest queued for transmission to the backend, up to
    /// [`TX_CHAINS_PER_WAKE`]; past that the device wakes itself again, so that the event loop
    /// serves everything else first.
    fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.queues[TX_QUEUE];
        let desc_table = GuestAddress(queue.desc_table());
        let size = queue.size();
        let (cid, metrics, backend) = (self.cid, &self.metrics, &mut self.backend);
        let drained = drain_queue(queue, mem, &self.interrupt, TX_CHAINS_PER_WAKE, |chain| {
            let packet = refuse_indirect(mem, desc_table, size, chain.head_index())
                .and_then(|()| read_tx_packet(mem, chain));
            match packet {
                Ok(pkt) if pkt.hdr.type_ != TYPE_STREAM => {
                    count(&metrics.bad_packets, "non-stream packet");
                }
                Ok(pkt) if !(pkt.hdr.src_cid == cid && pkt.hdr.dst_cid == HOST_CID) => {
                    count(
                        &metrics.bad_addressing,
                        "packet with a forged or foreign CID",
                    );
                }
                Ok(pkt) => {
                    VsockMetrics::inc(&metrics.tx_packets);
                    backend.send(pkt);
                }
                Err(e) => refused_chain(metrics, &metrics.tx_bad_chains, &e),
            }
            // A used entry with length 0: transmit buffers are only read.
            0
        });
        if drained.ring_corrupt {
            count(&self.metrics.tx_bad_chains, AVAIL_RING_CORRUPT);
        }
        for _ in 0..drained.unreturned {
            count(
                &self.metrics.tx_bad_chains,
                "cannot return a transmit buffer",
            );
        }
        if drained.budget_spent {
            VsockMetrics::inc(&self.metrics.tx_budget_spent);
            // The eventfd keeps the device's epoll set readable: the event loop comes back here
            // after the other events it has.
            let _ = self.queue_events[TX_QUEUE].write(1);
        }
    }

    /// Fills the guest's receive buffers with what the backend has for it.
    fn process_rx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.queues[RX_QUEUE];
        let desc_table = GuestAddress(queue.desc_table());
        let size = queue.size();
        let mut used = false;
        'refill: loop {
            if self.backend.has_rx() && avail_ring_corrupt(queue, mem) {
                count(&self.metrics.rx_bad_buffers, AVAIL_RING_CORRUPT);
                break;
            }
            if queue.disable_notification(mem).is_err() {
                break;
            }
            while self.backend.has_rx() {
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    break;
                };
                let head = chain.head_index();
                let buffer = refuse_indirect(mem, desc_table, size, head)
                    .and_then(|()| RxBuffer::new(mem, chain));
                let buffer = match buffer {
                    Ok(buffer) => buffer,
                    Err(e) => {
                        refused_chain(&self.metrics, &self.metrics.rx_bad_buffers, &e);
                        let _ = queue.add_used(mem, head, 0);
                        used = true;
                        continue;
                    }
                };
                let capacity = buffer.payload_capacity();
                let Some((mut hdr, len)) = self.backend.next_rx(&mut self.rx_buf[..capacity])
                else {
                    queue.go_to_previous_position();
                    break 'refill;
                };
                hdr.src_cid = HOST_CID;
                hdr.dst_cid = self.cid;
                hdr.type_ = TYPE_STREAM;
                match buffer.write(hdr, &self.rx_buf[..len]) {
                    Ok(written) => {
                        VsockMetrics::inc(&self.metrics.rx_packets);
                        VsockMetrics::add(&self.metrics.rx_bytes, len as u64);
                        let _ = queue.add_used(mem, head, written);
                    }
                    Err(e) => {
                        count(&self.metrics.rx_bad_buffers, &e.to_string());
                        let _ = queue.add_used(mem, head, 0);
                    }
                }
                used = true;
            }
            if !self.backend.has_rx() || !queue.enable_notification(mem).unwrap_or(false) {
                break;
            }
        }
        if used && queue.needs_notification(mem).unwrap_or(true) {
            self.interrupt.signal_used_ring();
        }
    }
}

const AVAIL_RING_CORRUPT: &str = "available ring index beyond the queue size";

fn count(counter: &AtomicU64, what: &str) {
    count_refusal("vsock", counter, what);
}

/// Counts a chain refused for `error` in `counter`, and an indirect one also as such.
fn refused_chain(metrics: &VsockMetrics, counter: &AtomicU64, error: &PacketError) {
    if *error == PacketError::Indirect {
        VsockMetrics::inc(&metrics.indirect_chains);
    }
    count(counter, &error.to_string());
}

impl<B: VsockBackend> VirtioDevice for Vsock<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation {
            mem,
            mut queues,
            acked_features,
        } = activation;
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::BadQueue(queues.len()));
        }
        let event_idx = acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for queue in &mut queues {
            queue.set_event_idx(event_idx);
        }
        self.active = Some(Active { mem, queues });
        // The guest may have queued packets before its notification was seen: have the event
        // loop look at the queues (this runs on a vCPU thread, which leaves device work to it).
        let _ = self.queue_events[TX_QUEUE].write(1);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.backend.reset();
    }

    fn active_queues(&self) -> Option<&[Queue]> {
        self.active.as_ref().map(|a| a.queues.as_slice())
    }

    fn save_state(&self) -> Option<DeviceState> {
        self.backend
            .next_host_port()
            .map(|next_host_port| DeviceState::Vsock { next_host_port })
    }

    fn restore_state(&mut self, state: Option<&DeviceState>) -> Result<(), DeviceStateError> {
        match state {
            Some(DeviceState::Vsock { next_host_port }) => {
                self.backend.number_host_ports_from(*next_host_port)
            }
            None => Ok(()),
        }
    }

    /// The connections the guest had ended with the VMM that saved it: a transport-reset event
    /// makes the driver drop them (its sockets see a reset) and read the CID again.
    fn restored(&mut self) {
        self.backend.reset();
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.queues[EVENT_QUEUE];
        let desc_table = GuestAddress(queue.desc_table());
        let size = queue.size();
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            warn!("the guest left no event buffer for the vsock transport reset");
            return;
        };
        let head = chain.head_index();
        let event = EVENT_TRANSPORT_RESET.to_le_bytes();
        let written = refuse_indirect(mem, desc_table, size, head)
            .ok()
            .and_then(|()| {
                chain
                    .writable()
                    .find(|d| d.len() as usize >= event.len())
                    .and_then(|d| mem.write_slice(&event, d.addr()).ok())
            })
            .map_or(0, |()| event.len() as u32);
        if written == 0 {
            count(&self.metrics.rx_bad_buffers, "unusable vsock event buffer");
        }
        let _ = queue.add_used(mem, head, written);
        self.interrupt.signal_used_ring();
    }
}

impl<B: VsockBackend> Polled for Vsock<B> {
    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn poll_fd(&self) -> RawFd {
        self.epoll_fd()
    }

    fn on_ready(&mut self) {
        self.process();
    }
}

#[cfg(test)]
mod tests;
