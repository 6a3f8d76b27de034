//! The agentos status port: one byte the guest writes at milestones (see
//! `agentos_protocol::status`). The VMM timestamps each new value, which gives a boot timeline
//! measured by the host, and uses the last value to tell a clean shutdown from a crash.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::devices::bus::BusDevice;

/// Status values recorded with their first arrival; later repeats only update `last`.
const MAX_MILESTONES: usize = 16;

#[derive(Default)]
struct StatusLog {
    last: Option<u8>,
    milestones: Vec<(u8, Instant)>,
}

#[derive(Clone, Default)]
pub struct GuestStatus(Arc<Mutex<StatusLog>>);

impl GuestStatus {
    fn log(&self) -> std::sync::MutexGuard<'_, StatusLog> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, value: u8) {
        let mut log = self.log();
        log.last = Some(value);
        if log.milestones.len() < MAX_MILESTONES && !log.milestones.iter().any(|(v, _)| *v == value)
        {
            tracing::info!(status = value, "guest status");
            log.milestones.push((value, Instant::now()));
        }
    }

    /// The last value the guest wrote.
    pub fn last(&self) -> Option<u8> {
        self.log().last
    }

    /// The status a restored guest had written last, before this VMM ran it.
    pub fn restore_last(&self, value: Option<u8>) {
        self.log().last = value;
    }

    /// When the guest first wrote `value`.
    pub fn first_seen(&self, value: u8) -> Option<Instant> {
        self.log()
            .milestones
            .iter()
            .find(|(v, _)| *v == value)
            .map(|(_, t)| *t)
    }
}

pub struct StatusPort(pub GuestStatus);

impl BusDevice for StatusPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let [value] = data {
            self.0.record(*value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_last_value_and_first_arrivals() {
        let status = GuestStatus::default();
        let mut port = StatusPort(status.clone());
        port.write(0, &[1]);
        port.write(0, &[2]);
        let ready = status.first_seen(2).unwrap();
        port.write(0, &[2]);
        port.write(0, &[1, 2]);
        assert_eq!(status.last(), Some(2));
        assert_eq!(status.first_seen(2), Some(ready));
        assert!(status.first_seen(1).unwrap() <= ready);
        assert_eq!(status.first_seen(3), None);
    }

    #[test]
    fn milestones_are_bounded() {
        let status = GuestStatus::default();
        let mut port = StatusPort(status.clone());
        for v in 0..=255u8 {
            port.write(0, &[v]);
        }
        assert_eq!(status.log().milestones.len(), MAX_MILESTONES);
        assert_eq!(status.last(), Some(255));
    }
}
