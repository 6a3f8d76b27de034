//! COM1: a 16550 UART whose output is the guest console.

use serde::{Deserialize, Serialize};
use vm_superio::Serial;
use vm_superio::serial::{NoEvents, SerialState};

use super::IrqLine;
use super::console::Console;
use crate::devices::bus::BusDevice;

pub struct SerialDevice(Serial<IrqLine, NoEvents, Console>);

/// The 16550's registers and unread input, as a snapshot keeps them.
#[derive(Serialize, Deserialize)]
pub struct SavedSerial {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
#[error("the saved serial port holds more input than its FIFO")]
pub struct SerialStateError;

impl SerialDevice {
    pub fn new(irq: IrqLine, console: Console) -> Self {
        Self(Serial::new(irq, console))
    }

    /// A serial port in a saved state.
    pub fn restored(
        saved: &SavedSerial,
        irq: IrqLine,
        console: Console,
    ) -> Result<Self, SerialStateError> {
        let state = SerialState {
            baud_divisor_low: saved.baud_divisor_low,
            baud_divisor_high: saved.baud_divisor_high,
            interrupt_enable: saved.interrupt_enable,
            interrupt_identification: saved.interrupt_identification,
            line_control: saved.line_control,
            line_status: saved.line_status,
            modem_control: saved.modem_control,
            modem_status: saved.modem_status,
            scratch: saved.scratch,
            in_buffer: saved.in_buffer.clone(),
        };
        Serial::from_state(&state, irq, NoEvents, console)
            .map(Self)
            .map_err(|_| SerialStateError)
    }

    pub fn save(&self) -> SavedSerial {
        let s = self.0.state();
        SavedSerial {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
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
