//! The tables are read back from guest memory the way a guest finds them: from the RSDP on.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{AcpiConfig, AcpiDevice, AcpiError, IntxRoute, PciRoot, write_acpi_tables};
use crate::arch::x86_64::layout;

const MEMORY_BYTES: usize = 4 << 20;
const SDT_HEADER_LEN: usize = 36;

const FADT_IAPC_BOOT_ARCH_OFFSET: usize = 109;
const FADT_FLAGS_OFFSET: usize = 112;
const FADT_DSDT_OFFSET: usize = 40;
const FADT_X_DSDT_OFFSET: usize = 140;
const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
const MADT_ENTRIES_OFFSET: usize = 44;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEMORY_BYTES)]).unwrap()
}

fn virtio(slot: u64) -> AcpiDevice {
    AcpiDevice::VirtioMmio {
        base: layout::MMIO_DEVICES_START + slot * layout::MMIO_DEVICE_SIZE,
        size: layout::MMIO_DEVICE_SIZE,
        gsi: layout::FIRST_VIRTIO_IRQ + slot as u32,
    }
}

fn serial() -> AcpiDevice {
    AcpiDevice::Serial {
        port: layout::SERIAL_PORT_BASE,
        len: layout::SERIAL_PORT_LEN,
        gsi: layout::SERIAL_IRQ,
    }
}

/// What a VM of this project looks like: serial, i8042 and a few virtio devices.
fn typical_config(vcpus: u8, virtio_devices: u64) -> AcpiConfig {
    let mut devices = vec![serial(), AcpiDevice::I8042];
    devices.extend((0..virtio_devices).map(virtio));
    AcpiConfig {
        vcpus,
        devices,
        pci: None,
    }
}

fn u16_at(bytes: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes(bytes[offset..offset + 2].try_into().unwrap())
}

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
}

fn byte_sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b))
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
    bytes
}

/// Reads the system description table at `addr`, checking what every such table must satisfy.
fn sdt(mem: &GuestMemoryMmap, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
    assert!(
        addr >= layout::RSDP_START && addr.is_multiple_of(8),
        "{signature:?} at {addr:#x}"
    );
    let header = read(mem, addr, SDT_HEADER_LEN);
    assert_eq!(&header[..4], signature);
    let len = u32_at(&header, 4) as usize;
    assert!(len >= SDT_HEADER_LEN);
    assert!(addr + len as u64 <= layout::ACPI_TABLES_END);
    let table = read(mem, addr, len);
    assert_eq!(byte_sum(&table), 0, "{signature:?} checksum");
    assert_eq!(&table[10..16], b"AGNTOS");
    table
}

struct Tables {
    rsdp: Vec<u8>,
    xsdt: Vec<u8>,
    fadt: Vec<u8>,
    madt: Vec<u8>,
    dsdt: Vec<u8>,
    /// Guest address and length of each table, RSDP included.
    mcfg: Option<Vec<u8>>,
    extents: Vec<(u64, usize)>,
}

/// Follows RSDP → XSDT → FADT/MADT → DSDT.
fn follow(mem: &GuestMemoryMmap, rsdp_addr: GuestAddress) -> Tables {
    let rsdp_addr = rsdp_addr.0;
    let rsdp = read(mem, rsdp_addr, 36);
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(byte_sum(&rsdp[..20]), 0, "RSDP checksum");
    assert_eq!(byte_sum(&rsdp), 0, "RSDP extended checksum");
    assert_eq!(&rsdp[9..15], b"AGNTOS");
    assert_eq!(rsdp[15], 2, "RSDP revision");
    assert_eq!(u32_at(&rsdp, 20), 36, "RSDP length");

    let xsdt_addr = u64_at(&rsdp, 24);
    let xsdt = sdt(mem, xsdt_addr, b"XSDT");
    assert!(
        [2, 3].map(|n| SDT_HEADER_LEN + n * 8).contains(&xsdt.len()),
        "XSDT holds FADT and MADT, and MCFG with PCI"
    );
    let mcfg_addr =
        (xsdt.len() == SDT_HEADER_LEN + 3 * 8).then(|| u64_at(&xsdt, SDT_HEADER_LEN + 16));
    let mcfg = mcfg_addr.map(|addr| sdt(mem, addr, b"MCFG"));
    let fadt_addr = u64_at(&xsdt, SDT_HEADER_LEN);
    let madt_addr = u64_at(&xsdt, SDT_HEADER_LEN + 8);
    let fadt = sdt(mem, fadt_addr, b"FACP");
    let madt = sdt(mem, madt_addr, b"APIC");
    let dsdt_addr = u64_at(&fadt, FADT_X_DSDT_OFFSET);
    let dsdt = sdt(mem, dsdt_addr, b"DSDT");

    let mut extents = vec![
        (rsdp_addr, rsdp.len()),
        (xsdt_addr, xsdt.len()),
        (fadt_addr, fadt.len()),
        (madt_addr, madt.len()),
        (dsdt_addr, dsdt.len()),
    ];
    if let (Some(addr), Some(table)) = (mcfg_addr, &mcfg) {
        extents.push((addr, table.len()));
    }
    Tables {
        rsdp,
        xsdt,
        fadt,
        madt,
        dsdt,
        mcfg,
        extents,
    }
}

fn write_and_follow(cfg: &AcpiConfig) -> Tables {
    let mem = memory();
    let rsdp = write_acpi_tables(&mem, cfg).unwrap();
    assert_eq!(rsdp, GuestAddress(layout::RSDP_START));
    follow(&mem, rsdp)
}

#[test]
fn tables_chain_from_the_rsdp_and_are_laid_out_back_to_back() {
    for cfg in [
        AcpiConfig {
            vcpus: 1,
            pci: None,
            devices: Vec::new(),
        },
        typical_config(2, 1),
        typical_config(u8::MAX, layout::MAX_MMIO_DEVICES),
    ] {
        let tables = write_and_follow(&cfg);
        let mut extents = tables.extents.clone();
        extents.sort();
        assert_eq!(extents[0].0, layout::RSDP_START, "the RSDP comes first");
        for pair in extents.windows(2) {
            let ((prev, prev_len), (next, _)) = (pair[0], pair[1]);
            let gap = next - (prev + prev_len as u64);
            assert!(gap < 8, "{prev:#x}+{prev_len} then {next:#x}");
        }
        let (last, last_len) = extents[extents.len() - 1];
        assert!(last + last_len as u64 <= layout::ACPI_TABLES_END);
        assert_eq!(tables.rsdp.len(), 36);
        assert_eq!(tables.xsdt[8], 1, "XSDT revision");
    }
}

#[test]
fn fadt_is_hardware_reduced_and_points_at_the_dsdt_through_x_dsdt() {
    let tables = write_and_follow(&typical_config(1, 1));
    let fadt = &tables.fadt;
    assert_eq!(fadt.len(), 276, "revision 6 length");
    assert_eq!(fadt[8], 6, "FADT revision");
    assert_ne!(u32_at(fadt, FADT_FLAGS_OFFSET) & FADT_HW_REDUCED_ACPI, 0);
    assert_eq!(u32_at(fadt, FADT_DSDT_OFFSET), 0, "only X_DSDT is set");
    assert_eq!(u64_at(fadt, FADT_X_DSDT_OFFSET), tables.extents[4].0);
    let boot_arch = u16_at(fadt, FADT_IAPC_BOOT_ARCH_OFFSET);
    assert_eq!(
        boot_arch,
        (1 << 2) | (1 << 3) | (1 << 5),
        "no VGA, MSI, RTC"
    );
}

#[test]
fn madt_has_one_enabled_local_apic_per_vcpu_and_one_ioapic() {
    for vcpus in [1u8, 4, u8::MAX] {
        let madt = write_and_follow(&typical_config(vcpus, 1)).madt;
        assert_eq!(u32_at(&madt, 36) as u64, layout::APIC_START);
        assert_eq!(u32_at(&madt, 40), 1, "PCAT_COMPAT");

        let mut local_apics = Vec::new();
        let mut ioapics = Vec::new();
        let mut offset = MADT_ENTRIES_OFFSET;
        while offset < madt.len() {
            let (kind, len) = (madt[offset], madt[offset + 1] as usize);
            let entry = &madt[offset..offset + len];
            match kind {
                0 => {
                    assert_eq!(len, 8);
                    local_apics.push((entry[2], entry[3], u32_at(entry, 4)));
                }
                1 => {
                    assert_eq!(len, 12);
                    ioapics.push((entry[2], u32_at(entry, 4), u32_at(entry, 8)));
                }
                other => panic!("unexpected MADT entry type {other}"),
            }
            offset += len;
        }
        assert_eq!(offset, madt.len());

        let expected: Vec<_> = (0..vcpus).map(|id| (id, id, 1)).collect();
        assert_eq!(
            local_apics, expected,
            "processor id = APIC id = index, enabled"
        );
        assert_eq!(ioapics, [(0, layout::IOAPIC_START as u32, 0)]);
    }
}

#[test]
fn a_pci_root_gets_an_mcfg_entry_and_a_root_device() {
    let root = PciRoot {
        ecam: layout::PCI_ECAM_START,
        ecam_size: 1 << 20,
        bars: (layout::PCI_MMIO32_START, layout::PCI_MMIO32_END),
        bars64: (layout::PCI_MMIO64_START, layout::PCI_MMIO64_END),
        intx: vec![IntxRoute {
            slot: 1,
            pin: 0,
            gsi: 22,
        }],
    };
    let mut cfg = typical_config(1, 1);
    let without = write_and_follow(&cfg);
    assert!(without.mcfg.is_none());
    cfg.pci = Some(root.clone());
    let tables = write_and_follow(&cfg);
    let mcfg = tables.mcfg.expect("MCFG in the XSDT");
    // After the header and 8 reserved bytes: base, segment, first and last bus.
    assert_eq!(mcfg.len(), SDT_HEADER_LEN + 8 + 16);
    assert_eq!(u64_at(&mcfg, SDT_HEADER_LEN + 8), layout::PCI_ECAM_START);
    assert_eq!(u16_at(&mcfg, SDT_HEADER_LEN + 16), 0);
    assert_eq!(&mcfg[SDT_HEADER_LEN + 18..SDT_HEADER_LEN + 20], [0, 0]);
    let find = |needle: &[u8]| tables.dsdt.windows(needle.len()).any(|w| w == needle);
    assert!(find(b"PC00"), "the root device");
    // PNP0A08 as an EISA id, and the ECAM window as a fixed 32-bit memory range.
    assert!(find(&[0x41, 0xd0, 0x0a, 0x08]));
    let mut ecam = vec![0x86, 0x09, 0x00, 0x01];
    ecam.extend_from_slice(&(layout::PCI_ECAM_START as u32).to_le_bytes());
    ecam.extend_from_slice(&(1u32 << 20).to_le_bytes());
    assert!(find(&ecam), "ECAM in _CRS");
    // The 64-bit window: a QWord memory descriptor (0x8a), cacheable, with its minimum and
    // maximum.
    let qword = tables
        .dsdt
        .windows(3)
        .position(|w| w[0] == 0x8a && w[1] == 0x2b && w[2] == 0x00)
        .expect("a QWord address space in _CRS");
    let at = qword + 3 + 3 + 8;
    assert_eq!(u64_at(&tables.dsdt, at), layout::PCI_MMIO64_START);
    assert_eq!(u64_at(&tables.dsdt, at + 8), layout::PCI_MMIO64_END - 1);
    // _PRT: Package(1) { Package(4) { 0x0001ffff, 0 (INTA), 0, 22 } }.
    assert!(find(b"_PRT"));
    assert!(find(&[
        0x12, 0x0b, 0x04, 0x0c, 0xff, 0xff, 0x01, 0x00, 0x00, 0x00, 0x0a, 0x16
    ]));
    // A window above 4 GiB cannot be described as 32-bit.
    cfg.pci = Some(PciRoot {
        bars: (0xffff_0000, 0x1_0001_0000),
        ..root.clone()
    });
    assert!(matches!(
        write_acpi_tables(&memory(), &cfg),
        Err(AcpiError::MmioWindowAbove4G { .. })
    ));
    cfg.pci = Some(PciRoot {
        intx: vec![IntxRoute {
            slot: 1,
            pin: 0,
            gsi: 24,
        }],
        ..root
    });
    assert!(matches!(
        write_acpi_tables(&memory(), &cfg),
        Err(AcpiError::GsiWithoutPin { .. })
    ));
}

#[test]
fn dsdt_has_one_device_per_configured_device_in_order() {
    let cfg = AcpiConfig {
        vcpus: 2,
        pci: None,
        devices: vec![serial(), virtio(0), AcpiDevice::I8042, virtio(1)],
    };
    let devices = aml::devices(&write_and_follow(&cfg).dsdt);
    let summary: Vec<_> = devices
        .iter()
        .map(|d| (d.name.as_str(), d.hid.as_str(), d.uid, d.cca))
        .collect();
    assert_eq!(
        summary,
        [
            ("COM1", "PNP0501", 0, None),
            ("V000", "LNRO0005", 0, Some(1)),
            ("KBD0", "PNP0303", 0, None),
            ("V001", "LNRO0005", 1, Some(1)),
        ]
    );
}

#[test]
fn virtio_crs_decodes_to_its_window_and_an_edge_triggered_exclusive_interrupt() {
    let devices = aml::devices(&write_and_follow(&typical_config(1, 3)).dsdt);
    let virtio: Vec<_> = devices.iter().filter(|d| d.hid == "LNRO0005").collect();
    assert_eq!(virtio.len(), 3);
    for (slot, device) in virtio.iter().enumerate() {
        let slot = slot as u64;
        assert_eq!(
            device.crs,
            [
                aml::Resource::Memory32Fixed {
                    writable: true,
                    base: (layout::MMIO_DEVICES_START + slot * layout::MMIO_DEVICE_SIZE) as u32,
                    len: layout::MMIO_DEVICE_SIZE as u32,
                },
                aml::Resource::Interrupt {
                    consumer: true,
                    edge: true,
                    active_low: false,
                    shared: false,
                    gsi: layout::FIRST_VIRTIO_IRQ + slot as u32,
                },
            ]
        );
    }
}

#[test]
fn virtio_device_matches_hand_assembled_aml() {
    let cfg = AcpiConfig {
        vcpus: 1,
        pci: None,
        devices: vec![AcpiDevice::VirtioMmio {
            base: 0xd000_0000,
            size: 0x1000,
            gsi: 5,
        }],
    };
    let dsdt = write_and_follow(&cfg).dsdt;
    #[rustfmt::skip]
    let device: &[u8] = &[
        0x5b, 0x82, 0x41, 0x04, b'V', b'0', b'0', b'0', // Device (V000), PkgLength 65
        0x08, b'_', b'H', b'I', b'D', 0x0d, b'L', b'N', b'R', b'O', b'0', b'0', b'0', b'5', 0x00,
        0x08, b'_', b'U', b'I', b'D', 0x00, // Zero
        0x08, b'_', b'C', b'C', b'A', 0x01, // One
        0x08, b'_', b'C', b'R', b'S', 0x11, 0x1a, 0x0a, 0x17, // Buffer (23 bytes)
        0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x10, 0x00, 0x00, // Memory32Fixed
        0x89, 0x06, 0x00, 0x03, 0x01, 0x05, 0x00, 0x00, 0x00, // Interrupt, consumer + edge
        0x79, 0x00, // EndTag
    ];
    #[rustfmt::skip]
    let scope: &[u8] = &[0x10, 0x4a, 0x04, b'\\', b'_', b'S', b'B', b'_']; // Scope, PkgLength 74
    assert_eq!(&dsdt[SDT_HEADER_LEN..], [scope, device].concat());
}

#[test]
fn serial_and_i8042_resources_decode_to_their_ports() {
    let devices = aml::devices(&write_and_follow(&typical_config(1, 0)).dsdt);
    assert_eq!(devices.len(), 2);
    assert_eq!(
        devices[0].crs,
        [
            aml::Resource::Io {
                min: layout::SERIAL_PORT_BASE,
                max: layout::SERIAL_PORT_BASE,
                align: 1,
                len: layout::SERIAL_PORT_LEN as u8,
            },
            aml::Resource::Interrupt {
                consumer: true,
                edge: true,
                active_low: false,
                shared: false,
                gsi: layout::SERIAL_IRQ,
            },
        ]
    );
    let port = |p| aml::Resource::Io {
        min: p,
        max: p,
        align: 1,
        len: 1,
    };
    assert_eq!(devices[1].crs, [port(0x60), port(0x64)]);
}

#[test]
fn tables_too_large_for_the_acpi_area_are_an_error_and_leave_memory_untouched() {
    // Each virtio device takes some 70 bytes of AML; 2000 of them pass the 128 KiB area.
    let cfg = AcpiConfig {
        vcpus: u8::MAX,
        pci: None,
        devices: vec![virtio(0); 2000],
    };
    let mem = memory();
    let err = write_acpi_tables(&mem, &cfg).unwrap_err();
    assert!(
        matches!(err, AcpiError::TablesTooLarge { needed, available }
            if needed > available && available == layout::ACPI_TABLES_END - layout::RSDP_START),
        "{err:?}"
    );
    let area = (layout::ACPI_TABLES_END - layout::RSDP_START) as usize;
    assert!(read(&mem, layout::RSDP_START, area).iter().all(|&b| b == 0));
}

#[test]
fn devices_the_guest_could_not_use_are_rejected() {
    let mem = memory();
    let with = |device| AcpiConfig {
        vcpus: 1,
        pci: None,
        devices: vec![device],
    };
    let mmio = |base, size| AcpiDevice::VirtioMmio { base, size, gsi: 5 };
    let uart = |port, len| AcpiDevice::Serial { port, len, gsi: 4 };
    let cases = [
        (with(mmio(1 << 32, 0x1000)), "MmioWindowAbove4G"),
        (with(mmio(0xffff_f000, 0x2000)), "MmioWindowAbove4G"),
        (with(mmio(0, 1 << 32)), "MmioWindowAbove4G"),
        (with(mmio(u64::MAX, 2)), "MmioWindowAbove4G"),
        (
            with(AcpiDevice::VirtioMmio {
                base: 0xd000_0000,
                size: 0x1000,
                gsi: layout::IOAPIC_PINS,
            }),
            "GsiWithoutPin",
        ),
        (with(uart(0x3f8, 0)), "InvalidPortRange"),
        (with(uart(0x3f8, 256)), "InvalidPortRange"),
        (with(uart(0xfffc, 8)), "InvalidPortRange"),
        (
            AcpiConfig {
                vcpus: 0,
                pci: None,
                devices: Vec::new(),
            },
            "NoVcpus",
        ),
        (
            AcpiConfig {
                vcpus: 1,
                pci: None,
                devices: vec![virtio(0); 0x1001],
            },
            "TooManyDevices",
        ),
    ];
    for (cfg, expected) in cases {
        let err = write_acpi_tables(&mem, &cfg).unwrap_err();
        assert!(format!("{err:?}").starts_with(expected), "{err:?}");
    }
    // The last window a 32-bit descriptor can hold is accepted.
    write_acpi_tables(&mem, &with(mmio(0xffff_f000, 0x1000))).unwrap();
}

#[test]
fn guest_memory_without_the_acpi_area_is_an_error() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    let err = write_acpi_tables(&mem, &typical_config(1, 1)).unwrap_err();
    assert!(matches!(err, AcpiError::GuestMemory(_)), "{err:?}");
}

/// Just enough of an AML reader to take apart the DSDT this module writes.
mod aml {
    #[derive(Debug, PartialEq, Eq)]
    pub enum Resource {
        Memory32Fixed {
            writable: bool,
            base: u32,
            len: u32,
        },
        Io {
            min: u16,
            max: u16,
            align: u8,
            len: u8,
        },
        Interrupt {
            consumer: bool,
            edge: bool,
            active_low: bool,
            shared: bool,
            gsi: u32,
        },
    }

    #[derive(Debug)]
    pub struct Device {
        pub name: String,
        pub hid: String,
        pub uid: u64,
        pub cca: Option<u64>,
        pub crs: Vec<Resource>,
    }

    enum Object {
        Integer(u64),
        String(String),
        Buffer(Vec<u8>),
    }

    struct Reader<'a> {
        bytes: &'a [u8],
        pos: usize,
    }

    impl<'a> Reader<'a> {
        fn byte(&mut self) -> u8 {
            self.pos += 1;
            self.bytes[self.pos - 1]
        }

        fn take(&mut self, n: usize) -> &'a [u8] {
            self.pos += n;
            &self.bytes[self.pos - n..self.pos]
        }

        fn uint(&mut self, n: usize) -> u64 {
            let mut le = [0u8; 8];
            le[..n].copy_from_slice(self.take(n));
            u64::from_le_bytes(le)
        }

        /// Reads a PkgLength and returns the offset where the package ends.
        fn package_end(&mut self) -> usize {
            let start = self.pos;
            let lead = self.byte();
            let follow = usize::from(lead >> 6);
            let mut len = if follow == 0 {
                usize::from(lead & 0x3f)
            } else {
                usize::from(lead & 0x0f)
            };
            for i in 0..follow {
                len |= usize::from(self.byte()) << (4 + 8 * i);
            }
            start + len
        }

        fn name_seg(&mut self) -> String {
            String::from_utf8(self.take(4).to_vec()).unwrap()
        }

        fn object(&mut self) -> Object {
            match self.byte() {
                0x00 => Object::Integer(0),
                0x01 => Object::Integer(1),
                0x0a => Object::Integer(self.uint(1)),
                0x0b => Object::Integer(self.uint(2)),
                0x0c => Object::Integer(self.uint(4)),
                0x0e => Object::Integer(self.uint(8)),
                0x0d => {
                    let len = self.bytes[self.pos..].iter().position(|&b| b == 0).unwrap();
                    let s = String::from_utf8(self.take(len).to_vec()).unwrap();
                    assert_eq!(self.byte(), 0);
                    Object::String(s)
                }
                0x11 => {
                    let end = self.package_end();
                    let Object::Integer(len) = self.object() else {
                        panic!("buffer size is not an integer");
                    };
                    let data = self.take(len as usize).to_vec();
                    assert_eq!(self.pos, end, "buffer length");
                    Object::Buffer(data)
                }
                op => panic!("unexpected data object opcode {op:#x}"),
            }
        }
    }

    /// The devices in `Scope (\_SB_)`, which must be the DSDT's only content.
    pub fn devices(dsdt: &[u8]) -> Vec<Device> {
        let mut r = Reader {
            bytes: dsdt,
            pos: 36,
        };
        assert_eq!(r.byte(), 0x10, "ScopeOp");
        let scope_end = r.package_end();
        assert_eq!(scope_end, dsdt.len());
        assert_eq!(r.take(5), b"\\_SB_");

        let mut devices = Vec::new();
        while r.pos < scope_end {
            assert_eq!(r.take(2), [0x5b, 0x82], "DeviceOp");
            let end = r.package_end();
            let mut device = Device {
                name: r.name_seg(),
                hid: String::new(),
                uid: u64::MAX,
                cca: None,
                crs: Vec::new(),
            };
            while r.pos < end {
                assert_eq!(r.byte(), 0x08, "NameOp");
                let name = r.name_seg();
                match (name.as_str(), r.object()) {
                    ("_HID", Object::String(hid)) => device.hid = hid,
                    ("_HID", Object::Integer(eisa)) => device.hid = eisa_id(eisa as u32),
                    ("_UID", Object::Integer(uid)) => device.uid = uid,
                    ("_CCA", Object::Integer(cca)) => device.cca = Some(cca),
                    ("_CRS", Object::Buffer(crs)) => device.crs = resources(&crs),
                    (other, _) => panic!("unexpected object {other}"),
                }
            }
            assert_eq!(r.pos, end, "device length");
            devices.push(device);
        }
        devices
    }

    fn eisa_id(value: u32) -> String {
        let v = value.swap_bytes();
        let letter = |shift: u32| char::from(b'@' + ((v >> shift) & 0x1f) as u8);
        format!(
            "{}{}{}{:04X}",
            letter(26),
            letter(21),
            letter(16),
            v & 0xffff
        )
    }

    fn resources(template: &[u8]) -> Vec<Resource> {
        let mut r = Reader {
            bytes: template,
            pos: 0,
        };
        let mut resources = Vec::new();
        loop {
            match r.byte() {
                0x79 => {
                    assert_eq!(r.byte(), 0, "EndTag checksum");
                    assert_eq!(r.pos, template.len(), "bytes after EndTag");
                    return resources;
                }
                0x47 => {
                    assert_eq!(r.byte(), 1, "16-bit decode");
                    resources.push(Resource::Io {
                        min: r.uint(2) as u16,
                        max: r.uint(2) as u16,
                        align: r.byte(),
                        len: r.byte(),
                    });
                }
                0x86 => {
                    assert_eq!(r.uint(2), 9);
                    resources.push(Resource::Memory32Fixed {
                        writable: r.byte() == 1,
                        base: r.uint(4) as u32,
                        len: r.uint(4) as u32,
                    });
                }
                0x89 => {
                    assert_eq!(r.uint(2), 6);
                    let flags = r.byte();
                    assert_eq!(r.byte(), 1, "one interrupt");
                    resources.push(Resource::Interrupt {
                        consumer: flags & 1 != 0,
                        edge: flags & 2 != 0,
                        active_low: flags & 4 != 0,
                        shared: flags & 8 != 0,
                        gsi: r.uint(4) as u32,
                    });
                }
                tag => panic!("unexpected resource descriptor {tag:#x}"),
            }
        }
    }
}
