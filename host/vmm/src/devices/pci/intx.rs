//! A passed-through device's INTx line, as VFIO and KVM share it.

use vfio_bindings::bindings::vfio::VFIO_PCI_INTX_IRQ_INDEX;
use vfio_ioctls::VfioDevice;
use vmm_sys_util::eventfd::EventFd;

/// A device's INTx line: the eventfd VFIO signals on an interrupt, and the one KVM signals
/// when the guest has acknowledged it.
pub struct IntxLine {
    pub trigger: EventFd,
    pub resample: EventFd,
}

/// Gives the device's INTx back to `line` (after MSI or MSI-X went off).
pub fn intx_on(device: &VfioDevice, line: &IntxLine) -> Result<(), String> {
    device
        .enable_irq(VFIO_PCI_INTX_IRQ_INDEX, vec![&line.trigger])
        .map_err(|e| format!("INTx on: {e}"))?;
    device
        .set_irq_resample_fd(VFIO_PCI_INTX_IRQ_INDEX, vec![&line.resample])
        .map_err(|e| format!("INTx resample: {e}"))
}
