//! COM1: a 16550 UART whose output is the guest console.

use vm_superio::Serial;
use vm_superio::serial::NoEvents;

use super::IrqLine;
use super::console::Console;
use crate::devices::bus::BusDevice;

pub struct SerialDevice(Serial<IrqLine, NoEvents, Console>);

impl SerialDevice {
    pub fn new(irq: IrqLine, console: Console) -> Self {
        Self(Serial::new(irq, console))
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            *byte = self.0.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            // Raising the interrupt can only fail if the eventfd counter overflows; the guest then
            // already has an interrupt pending.
            let _ = self.0.write(offset, *byte);
        }
    }
}
