//! Counters of the block device; every error a guest can cause has one.

use crate::devices::virtio::device_metrics;

device_metrics! {
    BlockMetrics, BlockMetricsSnapshot;
    /// Read requests served, and the bytes they carried to the guest.
    reads,
    read_bytes,
    /// Identity and flush requests answered.
    get_ids,
    flushes,
    /// Chains that were malformed, outside guest memory, without a status byte or with a
    /// header too short; answered with nothing (no status to write) or an I/O error.
    bad_chains,
    /// Chains that use an indirect descriptor, which the device does not offer; each is also
    /// counted in `bad_chains`.
    indirect_chains,
    /// Reads past the disk's end, not a whole number of sectors, or larger than one request
    /// may be.
    bad_ranges,
    /// Writes to the read-only disk.
    writes_refused,
    /// Requests of a type the device does not serve (discard, write zeroes, ...).
    unsupported,
    /// Reads the host file failed (it shrank, or the disk under it failed).
    io_errors,
    /// Times the queue had more requests than one wake of the event loop serves, so the device
    /// came back to it after the loop's other work.
    budget_spent,
}
