use super::*;
use crate::devices::virtio::DeviceState;
use crate::devices::virtio::mmio::SavedQueue;

fn sample() -> VmSnapshot {
    let vcpu = VcpuState {
        cpuid: vec![kvm_bindings::kvm_cpuid_entry2 {
            function: 1,
            ecx: 0x8000_0001,
            ..Default::default()
        }],
        mp_state: Default::default(),
        regs: kvm_bindings::kvm_regs {
            rip: 0x1234,
            ..Default::default()
        },
        sregs: Default::default(),
        xsave: Default::default(),
        xcrs: Default::default(),
        debug_regs: Default::default(),
        lapic: Default::default(),
        msrs: vec![kvm_bindings::kvm_msr_entry {
            index: 0x10,
            data: 99,
            ..Default::default()
        }],
        events: Default::default(),
    };
    let transport = TransportState {
        device_type: 19,
        status: 15,
        features_select: 0,
        acked_features_select: 1,
        acked_features: 1 << 32,
        queue_select: 2,
        queues: vec![SavedQueue {
            max_size: 256,
            next_avail: 7,
            next_used: 7,
            event_idx_enabled: true,
            size: 256,
            ready: true,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
        }],
        bad_sizes: vec![false],
        interrupt_status: 1,
        config_generation: 0,
        device: Some(DeviceState::Vsock {
            next_host_port: (1 << 30) + 5,
        }),
    };
    VmSnapshot {
        memory_mib: 256,
        vm: VmState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        },
        vcpus: vec![vcpu],
        serial: SavedSerial {
            baud_divisor_low: 12,
            baud_divisor_high: 0,
            interrupt_enable: 0,
            interrupt_identification: 1,
            line_control: 3,
            line_status: 0x60,
            modem_control: 8,
            modem_status: 0,
            scratch: 0,
            in_buffer: vec![],
        },
        status: Some(2),
        vsock: Some((3, transport)),
        disks: vec![],
        pmem: vec![],
    }
}

fn written() -> Vec<u8> {
    let path = std::env::temp_dir().join(format!("agentos-snap-test-{}", std::process::id()));
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    sample().write_to(&file).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    bytes
}

#[test]
fn a_written_state_reads_back() {
    let back = VmSnapshot::parse(&written()).unwrap();
    assert_eq!(back.memory_mib, 256);
    assert_eq!(back.vcpus[0].regs.rip, 0x1234);
    assert_eq!(back.vcpus[0].msrs[0].data, 99);
    assert_eq!(back.vcpus[0].cpuid[0].ecx, 0x8000_0001);
    assert_eq!(back.status, Some(2));
    let (cid, transport) = back.vsock.unwrap();
    assert_eq!(cid, 3);
    assert_eq!(transport.queues[0].next_avail, 7);
}

#[test]
fn an_empty_state_says_no_snapshot_was_taken() {
    assert!(matches!(VmSnapshot::parse(b""), Err(SnapshotError::Empty)));
}

#[test]
fn a_truncated_state_is_refused() {
    let bytes = written();
    let cut = &bytes[..bytes.len() - 10];
    assert!(matches!(
        VmSnapshot::parse(cut),
        Err(SnapshotError::Truncated { .. })
    ));
}

#[test]
fn a_corrupt_state_is_refused() {
    let mut bytes = written();
    let last = bytes.len() - 20;
    bytes[last] ^= 0x01;
    assert!(matches!(
        VmSnapshot::parse(&bytes),
        Err(SnapshotError::Checksum)
    ));
}

#[test]
fn a_state_of_another_version_or_format_is_refused() {
    let bytes = written();
    let text = String::from_utf8(bytes).unwrap();
    let other_vmm = text.replacen(
        &format!("\"vmm_version\":\"{VMM_VERSION}\""),
        "\"vmm_version\":\"0.0.1\"",
        1,
    );
    let Err(err) = VmSnapshot::parse(other_vmm.as_bytes()) else {
        panic!("another VMM's snapshot was read");
    };
    assert!(matches!(err, SnapshotError::Version { .. }), "{err}");
    assert!(err.to_string().contains("0.0.1"), "{err}");
    let other_format = text.replacen(&format!("\"format\":{FORMAT_VERSION}"), "\"format\":99", 1);
    assert!(matches!(
        VmSnapshot::parse(other_format.as_bytes()),
        Err(SnapshotError::Format { found: 99 })
    ));
}

#[test]
fn a_file_that_is_no_snapshot_is_refused() {
    assert!(matches!(
        VmSnapshot::parse(b"hello world\n{}"),
        Err(SnapshotError::NoHeader)
    ));
    assert!(matches!(
        VmSnapshot::parse(&[b'x'; 8192]),
        Err(SnapshotError::NoHeader)
    ));
}
