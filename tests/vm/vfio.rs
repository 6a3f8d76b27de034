//! The carrier's PCI test device (`agentos carrier --pci-test-device`, which `scripts/test` gives
//! this module's carrier): the IOMMU is on, QEMU's `edu` device sits in an IOMMU group of its
//! own, and `agentos doctor` says what passing it to an agent needs, before and after it is
//! bound to vfio-pci.

use std::path::Path;

use agentos::carrier::PCI_TEST_DEVICE_IDS;
use agentos::pci;

use crate::common::{Scratch, describe};

/// `agentos doctor --json`'s findings by name, and its PCI devices.
fn doctor(scratch: &Scratch) -> (serde_json::Value, Vec<serde_json::Value>) {
    let out = scratch.output(&["doctor", "--json"], b"");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor --json: {e}: {}", describe(&out)));
    let findings = doc["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["what"].as_str().unwrap().to_owned(), f.clone()))
        .collect::<serde_json::Map<_, _>>();
    let devices = doc["pci_devices"].as_array().unwrap().clone();
    (serde_json::Value::Object(findings), devices)
}

fn test_device(devices: &[serde_json::Value]) -> serde_json::Value {
    let (vendor, device) = PCI_TEST_DEVICE_IDS;
    devices
        .iter()
        .find(|d| d["vendor"] == vendor && d["device"] == device)
        .unwrap_or_else(|| {
            panic!(
                "no {vendor:04x}:{device:04x} device: this module runs in a carrier started with --pci-test-device (scripts/test does); devices: {devices:?}"
            )
        })
        .clone()
}

#[test]
fn doctor_shows_the_test_device_and_what_it_needs_until_bound_to_vfio() {
    let scratch = Scratch::new("vfio-doctor");
    let (findings, devices) = doctor(&scratch);
    assert!(
        findings["iommu"]["detail"]
            .as_str()
            .unwrap()
            .starts_with("on: "),
        "{findings}"
    );
    let edu = test_device(&devices);
    let group = edu["iommu_group"].as_u64().expect("edu has an IOMMU group");
    let members: Vec<_> = devices
        .iter()
        .filter(|d| d["iommu_group"] == group)
        .map(|d| d["address"].clone())
        .collect();
    assert_eq!(members, [edu["address"].clone()], "edu's group is its own");
    let address = edu["address"].as_str().unwrap().to_owned();
    assert!(pci::is_address(&address), "{address}");

    if edu["driver"].is_null() {
        assert_eq!(edu["ready"], false, "{edu}");
        let problem = edu["problem"].as_str().unwrap();
        assert!(
            problem.contains("not bound to vfio-pci")
                && problem.contains("echo 1234 11e8 > /sys/bus/pci/drivers/vfio-pci/new_id"),
            "{problem}"
        );
        // What the problem says to do.
        std::fs::write("/sys/bus/pci/drivers/vfio-pci/new_id", "1234 11e8")
            .expect("binding edu to vfio-pci");
    }

    let (findings, devices) = doctor(&scratch);
    let edu = test_device(&devices);
    assert_eq!(edu["driver"], pci::VFIO_DRIVER, "{edu}");
    assert_eq!(edu["ready"], true, "{edu}");
    assert!(edu.get("problem").is_none(), "{edu}");
    let vfio = findings["vfio"]["detail"].as_str().unwrap();
    assert!(vfio.contains(&format!("{address} (ready)")), "{vfio}");
    let node = pci::group_node(u32::try_from(group).unwrap());
    assert!(
        Path::new(&node).exists(),
        "{} after binding",
        node.display()
    );
    let text = scratch.output(&["doctor"], b"");
    assert!(
        describe(&text).contains(&format!(
            "{address} 1234:11e8 class 00ff00 group {group}: ready"
        )),
        "{}",
        describe(&text)
    );
}
