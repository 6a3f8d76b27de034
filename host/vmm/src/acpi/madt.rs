//! MADT: the vCPUs' local APICs and KVM's in-kernel IOAPIC.

use acpi_tables::Aml;
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::sdt::Sdt;

use super::{OEM_ID, OEM_REVISION};
use crate::arch::x86_64::layout;

/// MADT header: the standard table header, the local APIC address and the flags.
const HEADER_LEN: u32 = 44;
const LOCAL_APIC_ADDRESS_OFFSET: usize = 36;
const FLAGS_OFFSET: usize = 40;
/// KVM_CREATE_IRQCHIP emulates the two 8259 PICs next to the IOAPIC, and this flag says so.
const PCAT_COMPAT: u32 = 1;
/// Revision of ACPI 6.5, whose layout for these entries we follow.
const REVISION: u8 = 6;

const _: () = assert!(layout::APIC_START <= u32::MAX as u64);
const _: () = assert!(layout::IOAPIC_START <= u32::MAX as u64);

/// One enabled Processor Local APIC entry per vCPU (processor id = APIC id = index) and one
/// IOAPIC whose pins are GSIs from 0. No interrupt source overrides: ISA IRQ n is GSI n, as in
/// KVM's default routing.
pub(super) fn build(vcpus: u8) -> Sdt {
    // The crate's MADT builder cannot set PCAT_COMPAT, so the header is written by hand.
    let mut madt = Sdt::new(
        *b"APIC",
        HEADER_LEN,
        REVISION,
        OEM_ID,
        *b"AGNTMADT",
        OEM_REVISION,
    );
    madt.write_u32(LOCAL_APIC_ADDRESS_OFFSET, layout::APIC_START as u32);
    madt.write_u32(FLAGS_OFFSET, PCAT_COMPAT);

    let mut entries = Vec::new();
    for id in 0..vcpus {
        ProcessorLocalApic::new(id, id, EnabledStatus::Enabled).to_aml_bytes(&mut entries);
    }
    IoApic::new(0, layout::IOAPIC_START as u32, 0).to_aml_bytes(&mut entries);
    madt.append_slice(&entries);
    madt
}
