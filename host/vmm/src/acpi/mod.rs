//! ACPI tables that describe the VM to the guest.
//!
//! The stock guest kernel cannot take virtio-mmio devices from its command line, so the VMM
//! describes its vCPUs, interrupt controller and devices the way firmware would:
//!
//! ```text
//! RSDP (0xe0000) ─▶ XSDT ─┬▶ FADT (hardware-reduced) ─▶ DSDT (\_SB_ devices, AML)
//!                         ├▶ MADT (local APICs, IOAPIC)
//!                         └▶ MCFG (the PCI configuration window; only with PCI devices)
//! ```
//!
//! The tables sit back to back from [`layout::RSDP_START`], each 8-byte aligned: the RSDP, then
//! DSDT, MADT, FADT and XSDT, each after the tables it points to. They must end before
//! [`layout::ACPI_TABLES_END`]. Everything is assembled on the host first, so a configuration
//! that does not fit leaves guest memory untouched.

mod dsdt;
mod madt;
#[cfg(test)]
mod tests;

use acpi_tables::Aml;
use acpi_tables::fadt::{FADT, FADTBuilder, Flags};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use crate::arch::x86_64::layout;

/// Names us as the maker of every table (the guest logs it next to each table it finds).
const OEM_ID: [u8; 6] = *b"AGNTOS";
/// One revision for all tables: they are generated, so they change together.
const OEM_REVISION: u32 = 1;

/// Tables carry 64-bit fields; starting each on an 8-byte boundary keeps those aligned.
const TABLE_ALIGNMENT: usize = 8;

/// IA-PC boot architecture flags (FADT `IAPC_BOOT_ARCH`, ACPI 6.5 table 5.11).
/// There is no display; probing VGA ports would only cost exits.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
/// Without PCI devices, devices interrupt through IOAPIC pins and nothing would answer an
/// MSI write.
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
/// The VMM emulates no RTC; this keeps the guest from registering one.
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// What the guest is told about the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs; vCPU `i` has local APIC id `i`.
    pub vcpus: u8,
    /// Devices in the order the guest should find them: virtio devices are probed in this order,
    /// so the first block device here becomes `/dev/vda`.
    pub devices: Vec<AcpiDevice>,
    /// The PCI root bus, when the VM has PCI devices.
    pub pci: Option<PciRoot>,
}

/// Where the guest finds the PCI root bus's configuration space and its BARs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciRoot {
    /// The ECAM window of bus 0, and its size.
    pub ecam: u64,
    pub ecam_size: u64,
    /// The windows BARs are placed in: start, end (exclusive); the first below 4 GiB, the
    /// second, for 64-bit BARs, above it.
    pub bars: (u64, u64),
    pub bars64: (u64, u64),
    /// The interrupt routing of the slots' INTx pins (`_PRT`).
    pub intx: Vec<IntxRoute>,
}

/// A slot's INTx pin wired to an IOAPIC pin (level-triggered, active low, as PCI's are).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntxRoute {
    pub slot: u8,
    /// 0 for INTA to 3 for INTD.
    pub pin: u8,
    pub gsi: u32,
}

/// A device the guest should find in the DSDT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcpiDevice {
    /// virtio-mmio transport: "LNRO0005", 32-bit fixed memory + one interrupt in _CRS
    VirtioMmio { base: u64, size: u64, gsi: u32 },
    /// 16550 UART: "PNP0501", I/O port range + interrupt
    Serial { port: u16, len: u16, gsi: u32 },
    /// i8042 keyboard controller: "PNP0303", ports 0x60 and 0x64
    I8042,
}

/// Why the tables could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("the VM needs at least one vCPU")]
    NoVcpus,
    #[error("virtio-mmio window {base:#x} (+{size:#x} bytes) does not lie below 4 GiB")]
    MmioWindowAbove4G { base: u64, size: u64 },
    #[error("the 64-bit PCI window at {base:#x} is empty")]
    EmptyWindow { base: u64 },
    #[error("interrupt {gsi} has no IOAPIC pin (the IOAPIC has {pins})")]
    GsiWithoutPin { gsi: u32, pins: u32 },
    #[error("serial port range {port:#x} (+{len} ports) is empty, too long or past port 0xffff")]
    InvalidPortRange { port: u16, len: u16 },
    #[error("too many {kind} devices to give each a name in the DSDT")]
    TooManyDevices { kind: &'static str },
    #[error(
        "the ACPI tables need {needed} bytes but only {available} fit between the RSDP and {:#x}",
        layout::ACPI_TABLES_END
    )]
    TablesTooLarge { needed: u64, available: u64 },
    #[error("cannot write the ACPI tables to guest memory")]
    GuestMemory(#[source] GuestMemoryError),
}

/// Writes RSDP, XSDT, FADT, MADT and DSDT for `cfg` into guest memory and returns where the RSDP
/// is, for `boot_params.acpi_rsdp_addr`.
pub fn write_acpi_tables<M: GuestMemory>(
    mem: &M,
    cfg: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    if cfg.vcpus == 0 {
        return Err(AcpiError::NoVcpus);
    }
    // Each table goes in after the ones it points to, so every address is known when needed.
    let mut image = TableImage::new();
    let dsdt_addr = image.append(&dsdt::build(&cfg.devices, cfg.pci.as_ref())?);
    let madt_addr = image.append(&madt::build(cfg.vcpus));
    let fadt_addr = image.append(&fadt(dsdt_addr, cfg.pci.is_some()));
    let mut tables = vec![fadt_addr, madt_addr];
    if let Some(root) = &cfg.pci {
        let mut mcfg = MCFG::new(OEM_ID, *b"AGNTMCFG", OEM_REVISION);
        mcfg.add_ecam(root.ecam, 0, 0, 0);
        tables.push(image.append(&mcfg));
    }
    let xsdt_addr = image.append(&xsdt(&tables));
    image.set_rsdp(&Rsdp::new(OEM_ID, xsdt_addr));

    let available = layout::ACPI_TABLES_END - layout::RSDP_START;
    let needed = image.bytes.len() as u64;
    if needed > available {
        return Err(AcpiError::TablesTooLarge { needed, available });
    }
    mem.write_slice(&image.bytes, GuestAddress(layout::RSDP_START))
        .map_err(AcpiError::GuestMemory)?;

    tracing::debug!(
        bytes = needed,
        vcpus = cfg.vcpus,
        devices = cfg.devices.len(),
        "ACPI tables written"
    );
    Ok(GuestAddress(layout::RSDP_START))
}

/// The FADT; `msi` when the VM has PCI devices, whose MSI the VMM routes.
fn fadt(dsdt_addr: u64, msi: bool) -> FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"AGNTFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        // No fixed-feature power or sleep button: a button, if ever, is a device in the DSDT.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    // The 8042 flag stays clear: the guest then skips probing for a PS/2 controller, which costs
    // boot time and buys nothing, while the reset through port 0x64 (`reboot=k`) needs no driver.
    let no_msi = if msi { 0 } else { IAPC_MSI_NOT_SUPPORTED };
    fadt.iapc_boot_arch = (IAPC_VGA_NOT_PRESENT | no_msi | IAPC_CMOS_RTC_NOT_PRESENT).into();
    fadt.finalize()
}

fn xsdt(tables: &[u64]) -> XSDT {
    let mut xsdt = XSDT::new(OEM_ID, *b"AGNTXSDT", OEM_REVISION);
    for &addr in tables {
        xsdt.add_entry(addr);
    }
    xsdt
}

/// The bytes from [`layout::RSDP_START`] on, assembled on the host before one guest write.
struct TableImage {
    bytes: Vec<u8>,
}

impl TableImage {
    /// Starts with room for the RSDP: its place is fixed, its content comes last.
    fn new() -> Self {
        Self {
            bytes: vec![0; Rsdp::len()],
        }
    }

    /// Appends `table` at the next aligned offset and returns its guest address.
    fn append(&mut self, table: &dyn Aml) -> u64 {
        let start = self.bytes.len().next_multiple_of(TABLE_ALIGNMENT);
        self.bytes.resize(start, 0);
        table.to_aml_bytes(&mut self.bytes);
        layout::RSDP_START + start as u64
    }

    fn set_rsdp(&mut self, rsdp: &Rsdp) {
        let mut bytes = Vec::with_capacity(Rsdp::len());
        rsdp.to_aml_bytes(&mut bytes);
        self.bytes[..bytes.len()].copy_from_slice(&bytes);
    }
}
