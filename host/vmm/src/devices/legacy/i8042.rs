//! The i8042 keyboard controller, emulated only as far as its CPU reset line: our guests shut
//! down by rebooting with `reboot=k`, which pulses it.

use std::sync::Arc;

use vm_superio::I8042Device;

use crate::devices::bus::BusDevice;
use crate::exit::{ExitReason, ExitSignal};

/// The controller's data port is 0x60 and its command port 0x64: offsets 0 and 4 from the base.
const COMMAND_OFFSET: u64 = 4;

pub struct ResetLine(pub Arc<ExitSignal>);

impl vm_superio::Trigger for ResetLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.request(ExitReason::GuestReset);
        Ok(())
    }
}

pub struct I8042(I8042Device<ResetLine>);

impl I8042 {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self(I8042Device::new(ResetLine(exit)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let [byte] = data {
            *byte = match offset {
                0 | COMMAND_OFFSET => self.0.read(offset as u8),
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([byte], 0 | COMMAND_OFFSET) = (data, offset) {
            let _ = self.0.write(offset as u8, *byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_requests_a_guest_reset() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = I8042::new(exit.clone());
        dev.write(COMMAND_OFFSET, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestReset));
    }

    #[test]
    fn other_ports_and_widths_are_ignored() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = I8042::new(exit.clone());
        dev.write(2, &[0xfe]);
        dev.write(COMMAND_OFFSET, &[0xfe, 0]);
        assert_eq!(exit.reason(), None);
    }
}
