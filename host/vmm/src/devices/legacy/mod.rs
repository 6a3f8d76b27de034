//! Legacy PC devices: the 16550 serial console, the i8042 (for its reset line) and the agentos
//! status port.

pub mod console;
pub mod i8042;
pub mod serial;
pub mod status;

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line raised by writing to an eventfd registered with KVM as an irqfd.
pub struct IrqLine(pub EventFd);

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
