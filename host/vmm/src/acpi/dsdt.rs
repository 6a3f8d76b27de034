//! DSDT: one AML `Device` under `\_SB_` for each device the guest should find.

use acpi_tables::Aml;
use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, IO, Interrupt, Memory32Fixed,
    Name, Package, Path, ResourceTemplate, Scope,
};
use acpi_tables::sdt::Sdt;

use super::{AcpiDevice, AcpiError, OEM_ID, OEM_REVISION, PciRoot};
use crate::arch::x86_64::layout;

/// From revision 2 on, AML integers are 64 bits wide.
const REVISION: u8 = 2;
const HEADER_LEN: u32 = 36;

const VIRTIO_MMIO_HID: &str = "LNRO0005";
const SERIAL_HID: &str = "PNP0501";
const I8042_HID: &str = "PNP0303";
/// A PCI Express root bridge, and the plain PCI root it is compatible with.
const PCIE_ROOT_HID: &str = "PNP0A08";
const PCI_ROOT_CID: &str = "PNP0A03";

const I8042_DATA_PORT: u16 = layout::I8042_PORT_BASE;
const I8042_COMMAND_PORT: u16 = layout::I8042_PORT_BASE + 4;

/// A `Memory32Fixed` window must end at or below this address.
const FOUR_GIB: u64 = 1 << 32;

pub(super) fn build(devices: &[AcpiDevice], pci: Option<&PciRoot>) -> Result<Sdt, AcpiError> {
    let mut body = Vec::new();
    if let Some(root) = pci {
        pci_root(root, &mut body)?;
    }
    // Devices are numbered per kind: the number is their `_UID` and part of their AML name.
    let (mut virtio, mut serial, mut i8042) = (0u32, 0u32, 0u32);
    for device in devices {
        match *device {
            AcpiDevice::VirtioMmio { base, size, gsi } => {
                virtio_mmio(virtio, base, size, gsi, &mut body)?;
                virtio += 1;
            }
            AcpiDevice::Serial { port, len, gsi } => {
                uart(serial, port, len, gsi, &mut body)?;
                serial += 1;
            }
            AcpiDevice::I8042 => {
                keyboard_controller(i8042, &mut body)?;
                i8042 += 1;
            }
        }
    }

    let mut dsdt = Sdt::new(
        *b"DSDT",
        HEADER_LEN,
        REVISION,
        OEM_ID,
        *b"AGNTDSDT",
        OEM_REVISION,
    );
    dsdt.append_slice(&Scope::raw("\\_SB_".into(), body));
    Ok(dsdt)
}

fn virtio_mmio(
    index: u32,
    base: u64,
    size: u64,
    gsi: u32,
    sink: &mut Vec<u8>,
) -> Result<(), AcpiError> {
    let below_4g = base.checked_add(size).is_some_and(|end| end <= FOUR_GIB);
    let (Ok(base32), Ok(size32), true) = (u32::try_from(base), u32::try_from(size), below_4g)
    else {
        return Err(AcpiError::MmioWindowAbove4G { base, size });
    };
    let name = name_seg("V", index, "virtio-mmio")?;
    Device::new(
        name,
        vec![
            &Name::new("_HID".into(), &VIRTIO_MMIO_HID),
            &Name::new("_UID".into(), &index),
            // The device reads and writes guest memory from the host's CPUs: coherent DMA.
            &Name::new("_CCA".into(), &aml::ONE),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![
                    &Memory32Fixed::new(true, base32, size32),
                    &interrupt(gsi)?,
                ]),
            ),
        ],
    )
    .to_aml_bytes(sink);
    Ok(())
}

/// The root bus: segment 0, bus 0, the legacy configuration ports (so that the guest does not
/// hand them out), the ECAM window, the BAR window, and all I/O ports but the configuration
/// ones for devices to decode.
fn pci_root(root: &PciRoot, sink: &mut Vec<u8>) -> Result<(), AcpiError> {
    let window = |start: u64, end: u64| -> Result<(u32, u32), AcpiError> {
        let size = end.saturating_sub(start);
        match (u32::try_from(start), end.checked_sub(1).map(u32::try_from)) {
            (Ok(min), Some(Ok(max))) if size > 0 => Ok((min, max)),
            _ => Err(AcpiError::MmioWindowAbove4G { base: start, size }),
        }
    };
    let (ecam, _) = window(root.ecam, root.ecam + root.ecam_size)?;
    let ecam_size = u32::try_from(root.ecam_size).map_err(|_| AcpiError::MmioWindowAbove4G {
        base: root.ecam,
        size: root.ecam_size,
    })?;
    let (bar_min, bar_max) = window(root.bars.0, root.bars.1)?;
    let (bar64_min, bar64_max) = match root.bars64.1.checked_sub(1) {
        Some(max) if max >= root.bars64.0 => (root.bars64.0, max),
        _ => {
            return Err(AcpiError::EmptyWindow {
                base: root.bars64.0,
            });
        }
    };
    for route in &root.intx {
        if route.gsi >= layout::IOAPIC_PINS {
            return Err(AcpiError::GsiWithoutPin {
                gsi: route.gsi,
                pins: layout::IOAPIC_PINS,
            });
        }
    }
    // Each entry: the slot (any function), its pin, no link device, the global interrupt.
    let entries: Vec<(u32, u8, u32)> = root
        .intx
        .iter()
        .map(|r| (u32::from(r.slot) << 16 | 0xffff, r.pin, r.gsi))
        .collect();
    let packages: Vec<Package> = entries
        .iter()
        .map(|(address, pin, gsi)| Package::new(vec![address, pin, &aml::ZERO, gsi]))
        .collect();
    let routes = Package::new(packages.iter().map(|p| p as &dyn Aml).collect());
    Device::new(
        Path::new("PC00"),
        vec![
            &Name::new("_HID".into(), &EISAName::new(PCIE_ROOT_HID)),
            &Name::new("_CID".into(), &EISAName::new(PCI_ROOT_CID)),
            &Name::new("_ADR".into(), &aml::ZERO),
            &Name::new("_SEG".into(), &aml::ZERO),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_BBN".into(), &aml::ZERO),
            &Name::new("_CCA".into(), &aml::ONE),
            &Name::new("_PRT".into(), &routes),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![
                    &AddressSpace::new_bus_number(0u16, 0u16),
                    &IO::new(
                        crate::devices::pci::CONFIG_IO_PORT,
                        crate::devices::pci::CONFIG_IO_PORT,
                        1,
                        crate::devices::pci::CONFIG_IO_LEN as u8,
                    ),
                    &Memory32Fixed::new(true, ecam, ecam_size),
                    &AddressSpace::new_memory(
                        AddressSpaceCacheable::NotCacheable,
                        true,
                        bar_min,
                        bar_max,
                        None,
                    ),
                    // 64-bit BARs are prefetchable memory (a GPU's VRAM), hence cacheable.
                    &AddressSpace::new_memory(
                        AddressSpaceCacheable::Cacheable,
                        true,
                        bar64_min,
                        bar64_max,
                        None,
                    ),
                    &AddressSpace::new_io(0u16, 0x0cf7u16, None),
                    &AddressSpace::new_io(0x0d00u16, 0xffffu16, None),
                ]),
            ),
        ],
    )
    .to_aml_bytes(sink);
    Ok(())
}

fn uart(index: u32, port: u16, len: u16, gsi: u32, sink: &mut Vec<u8>) -> Result<(), AcpiError> {
    let last_port = len.checked_sub(1).and_then(|n| port.checked_add(n));
    let (Some(_), Ok(len8)) = (last_port, u8::try_from(len)) else {
        return Err(AcpiError::InvalidPortRange { port, len });
    };
    // Numbered from 1, as PC firmware names serial ports.
    let name = name_seg("COM", index + 1, "serial")?;
    Device::new(
        name,
        vec![
            &Name::new("_HID".into(), &EISAName::new(SERIAL_HID)),
            &Name::new("_UID".into(), &index),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![&IO::new(port, port, 1, len8), &interrupt(gsi)?]),
            ),
        ],
    )
    .to_aml_bytes(sink);
    Ok(())
}

fn keyboard_controller(index: u32, sink: &mut Vec<u8>) -> Result<(), AcpiError> {
    let name = name_seg("KBD", index, "i8042")?;
    Device::new(
        name,
        vec![
            &Name::new("_HID".into(), &EISAName::new(I8042_HID)),
            &Name::new("_UID".into(), &index),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![
                    &IO::new(I8042_DATA_PORT, I8042_DATA_PORT, 1, 1),
                    &IO::new(I8042_COMMAND_PORT, I8042_COMMAND_PORT, 1, 1),
                ]),
            ),
        ],
    )
    .to_aml_bytes(sink);
    Ok(())
}

/// The VMM raises a line by pulsing it (irqfd), so the guest must program the IOAPIC pin
/// edge-triggered and active-high; no two devices share a line.
fn interrupt(gsi: u32) -> Result<Interrupt, AcpiError> {
    if gsi >= layout::IOAPIC_PINS {
        return Err(AcpiError::GsiWithoutPin {
            gsi,
            pins: layout::IOAPIC_PINS,
        });
    }
    Ok(Interrupt::new(true, true, false, false, gsi))
}

/// AML names are exactly four characters: `prefix`, then `number` in zero-padded hex.
fn name_seg(prefix: &str, number: u32, kind: &'static str) -> Result<Path, AcpiError> {
    let digits = 4 - prefix.len();
    let name = format!("{prefix}{number:0digits$X}");
    if name.len() != 4 {
        return Err(AcpiError::TooManyDevices { kind });
    }
    Ok(Path::new(&name))
}
