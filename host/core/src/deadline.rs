//! Deadlines from durations that someone else chose (a flag, a request, a case file): adding
//! them to an `Instant` must never overflow, which would panic, and with `panic = "abort"` end
//! the process and the VMs it watches.

use std::time::{Duration, Instant};

/// The furthest deadline handed out: far beyond any wait, and far from any overflow.
const FURTHEST: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `from + after`, or the furthest deadline when that is later (or not representable).
pub fn after(from: Instant, after: Duration) -> Instant {
    from.checked_add(after.min(FURTHEST))
        .unwrap_or_else(|| from + Duration::from_secs(365 * 24 * 3600))
}

/// `after` from now (see [`after`]).
pub fn from_now(wait: Duration) -> Instant {
    after(Instant::now(), wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_durations_give_a_far_deadline_instead_of_a_panic() {
        let now = Instant::now();
        assert!(after(now, Duration::MAX) > now + Duration::from_secs(365 * 24 * 3600));
        assert!(from_now(Duration::from_secs(u64::MAX)) > now);
        assert_eq!(
            after(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
    }
}
