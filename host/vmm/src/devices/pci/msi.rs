//! Message-signalled interrupts of passed-through devices: the guest programs a device's MSI
//! capability (an address and data, which name a local APIC and a vector), and KVM turns the
//! device's eventfd into that message through a route of the VM's GSI routing table.
//!
//! Setting the table replaces it whole, so every push carries KVM's default routes (interrupt
//! lines 0-23 to the IOAPIC, 0-15 to the PICs as well, which the VMM's own devices use) with the
//! MSI routes after them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KvmIrqRouting, kvm_irq_routing_entry,
};
use kvm_ioctls::VmFd;

use crate::arch::x86_64::layout::IOAPIC_PINS;

/// The first GSI past the IOAPIC's pins, where MSI routes go.
const FIRST_MSI_GSI: u32 = IOAPIC_PINS;
/// MSI routes a VM may have: one per function with MSI, one per unmasked MSI-X vector.
pub const MAX_MSI_ROUTES: u32 = 256;
/// Interrupt lines the PICs serve.
const PIC_LINES: u32 = 16;

/// The message a device sends for an interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// The VM's MSI routes, pushed to KVM on every change.
pub struct MsiRoutes {
    vm: Arc<VmFd>,
    taken: BTreeSet<u32>,
    routes: BTreeMap<u32, MsiMessage>,
}

impl MsiRoutes {
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            taken: BTreeSet::new(),
            routes: BTreeMap::new(),
        }
    }

    /// A GSI of its own for a device's vector; none past [`MAX_MSI_ROUTES`] taken at once.
    pub fn allocate(&mut self) -> Option<u32> {
        let gsi =
            (FIRST_MSI_GSI..FIRST_MSI_GSI + MAX_MSI_ROUTES).find(|g| !self.taken.contains(g))?;
        self.taken.insert(gsi);
        Some(gsi)
    }

    /// Removes `gsi`'s route and gives the GSI back.
    pub fn release(&mut self, gsi: u32) -> Result<(), kvm_ioctls::Error> {
        self.taken.remove(&gsi);
        if self.routes.contains_key(&gsi) {
            self.set(gsi, None)
        } else {
            Ok(())
        }
    }

    /// Routes `gsi` to `message`, or removes its route, and gives KVM the new table.
    pub fn set(&mut self, gsi: u32, message: Option<MsiMessage>) -> Result<(), kvm_ioctls::Error> {
        match message {
            Some(m) => self.routes.insert(gsi, m),
            None => self.routes.remove(&gsi),
        };
        let entries = table(&self.routes);
        let mut routing =
            KvmIrqRouting::new(entries.len()).map_err(|_| kvm_ioctls::Error::new(libc::ENOMEM))?;
        routing.as_mut_slice().copy_from_slice(&entries);
        self.vm.set_gsi_routing(&routing)
    }
}

/// KVM's default routes, then one per MSI route.
fn table(routes: &BTreeMap<u32, MsiMessage>) -> Vec<kvm_irq_routing_entry> {
    let irqchip = |gsi: u32, chip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = chip;
        e.u.irqchip.pin = pin;
        e
    };
    let mut entries = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        if gsi < PIC_LINES {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            entries.push(irqchip(gsi, chip, gsi % 8));
        }
        entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    for (&gsi, m) in routes {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = m.address as u32;
        e.u.msi.address_hi = (m.address >> 32) as u32;
        e.u.msi.data = m.data;
        entries.push(e);
    }
    entries
}

/// The byte offset of capability `id` in `config` (the first 256 bytes), its first four bytes
/// within them; the list is followed at most as many steps as there is room for capabilities,
/// so that a looping list ends.
pub(super) fn capability(config: &[u8], id: u8) -> Option<usize> {
    let mut at = usize::from(*config.get(CAP_POINTER)?) & !3;
    for _ in 0..STANDARD_CONFIG / 4 {
        if at < 0x40 || at + 4 > STANDARD_CONFIG.min(config.len()) {
            return None;
        }
        if config[at] == id {
            return Some(at);
        }
        at = usize::from(config[at + 1]) & !3;
    }
    None
}

/// Where a function's MSI capability sits in its configuration space, and its layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiCapability {
    /// Byte offset of the capability (its id byte).
    pub offset: usize,
    /// 64-bit message address: the data follows the upper address half.
    pub wide: bool,
}

/// Capability ids in the standard list.
const MSI_CAP_ID: u8 = 0x05;
/// The list starts at the byte register 0x34 points at, within the first 256 bytes.
const CAP_POINTER: usize = 0x34;
const STANDARD_CONFIG: usize = 0x100;
const MSI_64BIT: u16 = 1 << 7;
pub const MSI_ENABLE: u16 = 1;

impl MsiCapability {
    /// Finds the MSI capability in `config` (the first 256 bytes), following the list at most
    /// as many steps as there is room for capabilities, so that a looping list ends.
    pub fn find(config: &[u8]) -> Option<Self> {
        let at = capability(config, MSI_CAP_ID)?;
        let control = u16::from_le_bytes([config[at + 2], config[at + 3]]);
        let cap = Self {
            offset: at,
            wide: control & MSI_64BIT != 0,
        };
        (at + cap.span() <= STANDARD_CONFIG).then_some(cap)
    }

    /// The bytes the capability spans (control, address, data).
    pub fn span(&self) -> usize {
        if self.wide { 14 } else { 10 }
    }

    /// Whether the guest enabled it, and its message, read from the capability's bytes.
    pub fn decode(&self, cap: &[u8]) -> Option<(bool, MsiMessage)> {
        let word = |at: usize| Some(u16::from_le_bytes([*cap.get(at)?, *cap.get(at + 1)?]));
        let dword = |at: usize| {
            Some(u32::from_le_bytes([
                *cap.get(at)?,
                *cap.get(at + 1)?,
                *cap.get(at + 2)?,
                *cap.get(at + 3)?,
            ]))
        };
        let control = word(2)?;
        let low = u64::from(dword(4)?);
        let (address, data) = if self.wide {
            (u64::from(dword(8)?) << 32 | low, word(12)?)
        } else {
            (low, word(8)?)
        };
        Some((
            control & MSI_ENABLE != 0,
            MsiMessage {
                address,
                data: u32::from(data),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with(caps: &[(usize, u8, u8, u16)]) -> Vec<u8> {
        let mut config = vec![0u8; 256];
        config[CAP_POINTER] = caps.first().map_or(0, |c| c.0 as u8);
        for &(at, id, next, control) in caps {
            config[at] = id;
            config[at + 1] = next;
            config[at + 2..at + 4].copy_from_slice(&control.to_le_bytes());
        }
        config
    }

    #[test]
    fn the_msi_capability_is_found_along_the_list() {
        let config = config_with(&[(0x40, 0x01, 0x50, 0), (0x50, MSI_CAP_ID, 0, MSI_64BIT)]);
        assert_eq!(
            MsiCapability::find(&config),
            Some(MsiCapability {
                offset: 0x50,
                wide: true
            })
        );
        // No list, a list into the header, a loop: none.
        assert_eq!(MsiCapability::find(&config_with(&[])), None);
        assert_eq!(
            MsiCapability::find(&config_with(&[(0x40, 0x01, 0x10, 0)])),
            None
        );
        assert_eq!(
            MsiCapability::find(&config_with(&[(0x40, 0x01, 0x40, 0)])),
            None
        );
        assert_eq!(
            MsiCapability::find(&config_with(&[(0xf8, MSI_CAP_ID, 0, 0)])),
            None
        );
    }

    #[test]
    fn a_capability_decodes_to_its_message() {
        let wide = MsiCapability {
            offset: 0x40,
            wide: true,
        };
        let mut cap = vec![MSI_CAP_ID, 0, 0x81, 0];
        cap.extend_from_slice(&0xfee0_0000u32.to_le_bytes());
        cap.extend_from_slice(&1u32.to_le_bytes());
        cap.extend_from_slice(&0x00e0u16.to_le_bytes());
        assert_eq!(
            wide.decode(&cap),
            Some((
                true,
                MsiMessage {
                    address: 0x1_fee0_0000,
                    data: 0xe0
                }
            ))
        );
        let narrow = MsiCapability {
            offset: 0x40,
            wide: false,
        };
        assert_eq!(narrow.decode(&cap[..10]).unwrap().1.data, 1);
        assert_eq!(wide.decode(&cap[..10]), None);
    }

    #[test]
    fn the_table_keeps_the_default_routes() {
        let mut routes = BTreeMap::new();
        routes.insert(
            24,
            MsiMessage {
                address: 0xfee0_0000,
                data: 0x41,
            },
        );
        let entries = table(&routes);
        assert_eq!(entries.len(), 16 + 24 + 1);
        let msi = entries.last().unwrap();
        assert_eq!((msi.gsi, msi.type_), (24, KVM_IRQ_ROUTING_MSI));
        // SAFETY: an MSI entry's union holds its msi member.
        let (lo, data) = unsafe { (msi.u.msi.address_lo, msi.u.msi.data) };
        assert_eq!((lo, data), (0xfee0_0000, 0x41));
        assert!(
            entries
                .iter()
                .any(|e| e.gsi == 4 && e.type_ == KVM_IRQ_ROUTING_IRQCHIP)
        );
    }
}
