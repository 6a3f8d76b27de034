//! Counters of a virtio device, declared once: the atomics the device bumps and a plain copy
//! of them for reports.

/// Declares `$metrics` (one `AtomicU64` per name) and `$snapshot` (their values at one moment,
/// serializable), with `$metrics::snapshot`, `inc` and `add`.
macro_rules! device_metrics {
    ($metrics:ident, $snapshot:ident; $($(#[$doc:meta])* $name:ident),* $(,)?) => {
        #[derive(Default)]
        pub struct $metrics {
            $($(#[$doc])* pub $name: ::std::sync::atomic::AtomicU64,)*
        }

        /// A copy of the counters at one moment.
        #[derive(Clone, Debug, Default, PartialEq, Eq, ::serde::Serialize)]
        pub struct $snapshot {
            $(pub $name: u64,)*
        }

        impl $metrics {
            pub fn snapshot(&self) -> $snapshot {
                $snapshot {
                    $($name: self.$name.load(::std::sync::atomic::Ordering::Relaxed),)*
                }
            }

            /// Adds one; returns the count before.
            pub fn inc(counter: &::std::sync::atomic::AtomicU64) -> u64 {
                counter.fetch_add(1, ::std::sync::atomic::Ordering::Relaxed)
            }

            pub fn add(counter: &::std::sync::atomic::AtomicU64, n: u64) {
                counter.fetch_add(n, ::std::sync::atomic::Ordering::Relaxed);
            }
        }
    };
}

pub(crate) use device_metrics;

/// Counts something a guest did wrong in `counter` and logs it: a warning the first time, then
/// at debug level (a guest repeating itself must not flood the log).
pub fn count_refusal(device: &str, counter: &std::sync::atomic::AtomicU64, what: &str) {
    if counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 {
        tracing::warn!("{device}: {what}");
    } else {
        tracing::debug!("{device}: {what}");
    }
}
