//! Where things live in a guest's physical address space.
//!
//! ```text
//! 0x0000_0500  GDT                     0x000e_0000  RSDP, then the other ACPI tables
//! 0x0000_0520  IDT (empty)             0x0010_0000  kernel (protected-mode part of the bzImage)
//! 0x0000_7000  boot_params (zero page) ...          RAM up to min(size, 3 GiB)
//! 0x0000_8ff0  boot stack top          0xc000_0000  PCI BARs of passed-through devices
//! 0x0000_9000  PML4, PDPT, PD          0xd000_0000  virtio-mmio slots, 4 KiB each
//! 0x0002_0000  kernel command line     0xe000_0000  PCI configuration space (ECAM, bus 0)
//! 0x0009_fc00  end of low RAM (EBDA)   0xfec0_0000  IOAPIC
//!                                      0xfee0_0000  local APICs
//!                                      0x1_0000_0000 RAM above 3 GiB continues here
//!                                      0x20_0000_0000 64-bit PCI BARs (128 GiB-256 GiB)
//! ```

/// Global descriptor table used to enter long mode.
pub const BOOT_GDT_START: u64 = 0x500;
/// Interrupt descriptor table (empty: the kernel installs its own before enabling interrupts).
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapped page tables covering the first GiB with 2 MiB pages.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line and its size limit (the x86 kernel's `COMMAND_LINE_SIZE`).
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area: usable low memory ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables: the kernel scans 0xe0000..0x100000 for the RSDP; the other tables follow it.
pub const RSDP_START: u64 = 0xe0000;
pub const ACPI_TABLES_END: u64 = 0x100000;
/// Where the kernel is loaded, and the first byte of "high" memory in the boot protocol's sense.
pub const HIMEM_START: u64 = 0x100000;

/// Guest RAM below 4 GiB ends here at most; the rest of it continues at [`RAM_64BIT_START`].
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
pub const RAM_64BIT_START: u64 = MMIO_GAP_END;

/// pmem regions start at the first GiB boundary above RAM and 4 GiB, each at a 128 MiB
/// boundary (a memory section, the unit in which Linux adds device memory).
pub const PMEM_START_ALIGN: u64 = 1 << 30;
pub const PMEM_REGION_ALIGN: u64 = 128 << 20;

/// PCI: the window the VMM places BARs of passed-through devices in (below the virtio-mmio
/// slots), and the ECAM window of bus 0 (1 MiB; the MCFG table points at it, and the memory map
/// marks it reserved, which the guest checks before it uses ECAM).
pub const PCI_MMIO32_START: u64 = MMIO_GAP_START;
pub const PCI_MMIO32_END: u64 = MMIO_DEVICES_START;
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// The window for 64-bit BARs (a GPU's memory, often many GiB): 128 GiB to 256 GiB, above the
/// most RAM and pmem a VM gets, and below 2^39, the fewest physical address bits x86-64 CPUs
/// have had for years (so that the guest and KVM can reach it).
pub const PCI_MMIO64_START: u64 = 1 << 37;
pub const PCI_MMIO64_END: u64 = 1 << 38;
/// IOAPIC pins for PCI INTx, shared by the slots (each slot's pins rotated over them, as PCI
/// bridges swizzle): those past the virtio-mmio slots'.
pub const PCI_INTX_GSIS: [u32; 3] = [21, 22, 23];
const _: () = assert!(FIRST_VIRTIO_IRQ + MAX_MMIO_DEVICES as u32 <= PCI_INTX_GSIS[0]);

/// virtio-mmio device slots.
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
pub const MAX_MMIO_DEVICES: u64 = 16;

/// Default addresses of KVM's in-kernel IOAPIC and the local APICs.
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM needs three pages for the TSS and one for the identity map (Intel), inside the gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Interrupt lines (IOAPIC pins). The first sixteen follow the ISA convention.
pub const SERIAL_IRQ: u32 = 4;
pub const FIRST_VIRTIO_IRQ: u32 = 5;
pub const IOAPIC_PINS: u32 = 24;

/// Legacy I/O ports.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
pub const SERIAL_PORT_LEN: u16 = 8;
pub const I8042_PORT_BASE: u16 = 0x60;
pub const I8042_PORT_LEN: u16 = 5;
