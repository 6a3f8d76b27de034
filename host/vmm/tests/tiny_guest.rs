//! Boots the tiny bare-metal guest on this host's /dev/kvm: the vCPU loop, port and MMIO exits,
//! the serial console, the status port and the i8042 reset, in milliseconds, without Linux.

use std::path::PathBuf;
use std::time::Instant;

use agentos_tiny_guest::{BANNER, TINY_GUEST_ELF, VIRTIO_FOUND, VIRTIO_NONE};
use agentos_vmm::builder::build_vm;
use agentos_vmm::config::{ConsoleConfig, VmConfig, VsockConfig};
use agentos_vmm::vmm::Outcome;

fn kvm_available() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    assert!(
        std::env::var_os("AGENTOS_TEST_NO_SKIP").is_none(),
        "AGENTOS_TEST_NO_SKIP is set but /dev/kvm does not exist"
    );
    eprintln!("skipping: no /dev/kvm");
    false
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("agentos-vmm-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tiny_config(scratch: &Scratch, vcpus: u8) -> VmConfig {
    let kernel = scratch.0.join("tiny.elf");
    std::fs::write(&kernel, TINY_GUEST_ELF).unwrap();
    VmConfig {
        vcpus,
        memory_mib: 16,
        kernel,
        initrd: Vec::new(),
        cmdline: String::new(),
        console: ConsoleConfig {
            log: Some(append(&scratch.0.join("console.log"))),
            stdout: false,
        },
        vsock: None,
        disks: Vec::new(),
        pmem: Vec::new(),
        pci_devices: Vec::new(),
        snapshot_to: None,
    }
}

#[test]
fn tiny_guest_prints_and_shuts_down_through_the_i8042() {
    if !kvm_available() {
        return;
    }
    let scratch = Scratch::new("tiny");
    let start = Instant::now();
    let vmm = build_vm(&tiny_config(&scratch, 1)).expect("build");
    let report = vmm.run(None).expect("run");
    let elapsed = start.elapsed();
    assert_eq!(
        report.outcome,
        Outcome::Shutdown,
        "{:?}",
        report.console_tail
    );
    let log = std::fs::read_to_string(scratch.0.join("console.log")).unwrap();
    assert_eq!(log, format!("{BANNER}{VIRTIO_NONE}"));
    assert!(report.init_started_ms.is_some());
    eprintln!("tiny guest: build + run in {elapsed:?}");
}

#[test]
fn application_processors_are_stopped_when_the_boot_cpu_resets() {
    if !kvm_available() {
        return;
    }
    let scratch = Scratch::new("tiny-smp");
    let report = build_vm(&tiny_config(&scratch, 4))
        .expect("build")
        .run(None)
        .expect("run");
    assert_eq!(report.outcome, Outcome::Shutdown);
}

#[test]
fn tiny_guest_finds_the_virtio_device_through_an_mmio_exit() {
    if !kvm_available() {
        return;
    }
    let scratch = Scratch::new("tiny-virtio");
    let uds_path = scratch.0.join("vsock.sock");
    let mut config = tiny_config(&scratch, 1);
    config.vsock = Some(VsockConfig {
        guest_cid: 3,
        uds_path: uds_path.clone(),
    });
    let report = build_vm(&config).expect("build").run(None).expect("run");
    assert_eq!(report.outcome, Outcome::Shutdown);
    let log = std::fs::read_to_string(scratch.0.join("console.log")).unwrap();
    assert_eq!(log, format!("{BANNER}{VIRTIO_FOUND}"));
    // The device was never set up by the guest, and its host socket is gone with the VM.
    let vsock = report.metrics.vsock.expect("vsock metrics");
    assert_eq!(vsock.tx_packets, 0);
    assert!(!uds_path.exists(), "the vsock socket outlived the VM");
}

/// A console log, opened for appending as the VMM's callers open it.
fn append(path: &std::path::Path) -> std::fs::File {
    std::fs::File::options()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
}
