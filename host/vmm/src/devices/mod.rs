//! Emulated devices and the buses that route guest port and MMIO accesses to them.

pub mod bus;
pub mod legacy;
pub mod pci;
pub mod virtio;
