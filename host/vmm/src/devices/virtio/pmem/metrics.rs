//! Counters of the pmem device; every error a guest can cause has one.

use crate::devices::virtio::device_metrics;

device_metrics! {
    PmemMetrics, PmemMetricsSnapshot;
    /// Flush requests answered.
    flushes,
    /// Chains that were malformed, outside guest memory, without room for the answer, or that
    /// use an indirect descriptor (which the device does not offer).
    bad_chains,
    /// Requests of a type the device does not serve.
    unsupported,
}
