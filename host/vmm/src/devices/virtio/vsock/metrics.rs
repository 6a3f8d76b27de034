//! Counters of the vsock device; every error a guest can cause has one.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::devices::virtio::device_metrics;

device_metrics! {
    VsockMetrics, VsockMetricsSnapshot;
    /// Packets the guest sent and we accepted.
    tx_packets,
    /// Payload bytes from the guest delivered to host sockets.
    tx_bytes,
    /// Packets placed in the guest's receive queue.
    rx_packets,
    rx_bytes,
    /// Transmit chains that were malformed, too short, too long or outside guest memory.
    tx_bad_chains,
    /// Receive buffers the guest gave that could not hold a packet.
    rx_bad_buffers,
    /// Packets with a source CID other than the guest's, or for a CID other than the host.
    bad_addressing,
    /// Packets of a type other than stream, or with an unknown operation.
    bad_packets,
    /// Data sent beyond the credit we granted (the connection is reset).
    credit_violations,
    /// Connections opened (either side) and closed.
    connections_opened,
    connections_closed,
    /// Guest connection requests to host ports nobody listens on, or over the limit.
    connections_refused,
    /// Host clients that sent a bad `CONNECT` line, or came over the limit.
    bad_host_connects,
    /// Connections reset because the guest left a request or a shutdown unanswered.
    guest_answer_timeouts,
    /// Resets sent to the guest.
    resets_sent,
    /// Resets dropped because the reset queue was full (a guest flooding bad packets).
    resets_dropped,
    /// The most connections waiting at once to send the guest something (a high-water mark,
    /// bounded by the connection limit).
    rx_work_peak,
    /// Chains that use an indirect descriptor, which the device does not offer; each is also
    /// counted in `tx_bad_chains` or `rx_bad_buffers`.
    indirect_chains,
    /// Times the transmit queue had more chains than one wake of the event loop serves, so the
    /// device came back to it after the loop's other work.
    tx_budget_spent,
}

impl VsockMetrics {
    /// Raises a high-water mark to `value`.
    pub fn peak(counter: &AtomicU64, value: u64) {
        counter.fetch_max(value, Ordering::Relaxed);
    }
}
