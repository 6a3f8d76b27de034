//! Counters of a virtio device, declared once: the atomics the device bumps and a plain copy
//! of them for reports.

/// Declares `$metrics` (one `AtomicU64` per name) and `$snapshot` (their values at one moment,
/// serializable), with `$metrics::snapshot`.
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
        }
    };
}

pub(crate) use device_metrics;
