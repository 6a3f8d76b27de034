//! The host's PCI devices as sysfs shows them, for passing devices to agents with VFIO: each
//! device's ids, class, driver and IOMMU group, and whether its group can be handed to a VM
//! (the kernel's rule: every device in it bound to `vfio-pci` or `pci-stub`, unbound, or a
//! bridge).

use std::fs;
use std::io;
use std::path::Path;

use agentos_vmm::devices::pci::{BadPassedDevice, PassedDevice, PciAddress};
use serde::Serialize;

pub use agentos_vmm::devices::pci::passthrough::SYSFS_PCI_DEVICES;
/// The driver a device must be bound to before a VM can have it.
pub const VFIO_DRIVER: &str = "vfio-pci";
/// Drivers besides [`VFIO_DRIVER`] that the kernel accepts in a group handed to a VM.
const HARMLESS_DRIVERS: &[&str] = &["pci-stub"];
/// PCI class 0x03: display controllers (VGA, 3D, others), what `--gpu` looks for.
pub const DISPLAY_CLASS: u8 = 0x03;
/// At most this many devices are read: a sysfs with more is not a real machine's.
const MAX_DEVICES: usize = 4096;

/// One PCI function.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PciDevice {
    /// Domain:bus:device.function, `0000:00:03.0`.
    pub address: String,
    pub vendor: u16,
    pub device: u16,
    /// Base class, sub-class and programming interface, `0x030000` for VGA.
    pub class: u32,
    /// The driver bound to it, if any.
    pub driver: Option<String>,
    /// Its IOMMU group; none while the IOMMU is off.
    pub iommu_group: Option<u32>,
    /// A bridge (a header type other than 0): the kernel lets one stay with its driver.
    pub bridge: bool,
}

impl PciDevice {
    pub fn base_class(&self) -> u8 {
        (self.class >> 16) as u8
    }

    pub fn bound_to_vfio(&self) -> bool {
        self.driver.as_deref() == Some(VFIO_DRIVER)
    }

    /// Whether this device leaves its group usable by a VM.
    fn harmless_in_group(&self) -> bool {
        match self.driver.as_deref() {
            None => true,
            Some(driver) => {
                driver == VFIO_DRIVER || HARMLESS_DRIVERS.contains(&driver) || self.bridge
            }
        }
    }
}

/// Why a device cannot go to a VM as it stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum Unready {
    /// The IOMMU is off (no groups): nothing can be passed.
    NoIommu,
    /// The device is not bound to `vfio-pci`.
    NotBound { driver: Option<String> },
    /// Another device of its group is bound to a driver that keeps the group from a VM.
    GroupNotViable { sibling: String, driver: String },
}

impl Unready {
    /// A one-line account with what to do.
    pub fn describe(&self, dev: &PciDevice) -> String {
        match self {
            Unready::NoIommu => "the IOMMU is off: enable VT-d or AMD-Vi in the firmware and boot with intel_iommu=on (or amd_iommu=on) iommu=pt".into(),
            Unready::NotBound { driver } => format!(
                "{} to vfio-pci: {}echo {:04x} {:04x} > /sys/bus/pci/drivers/vfio-pci/new_id (after modprobe vfio-pci)",
                match driver {
                    Some(d) => format!("bound to {d}, not"),
                    None => "not bound".into(),
                },
                match driver {
                    Some(_) => format!(
                        "echo {0} > /sys/bus/pci/devices/{0}/driver/unbind; ",
                        dev.address
                    ),
                    None => String::new(),
                },
                dev.vendor,
                dev.device
            ),
            Unready::GroupNotViable { sibling, driver } => format!(
                "its IOMMU group is not viable: {sibling} in the same group is bound to {driver}; unbind it or bind it to vfio-pci too"
            ),
        }
    }
}

/// The PCI devices under `root` (normally [`SYSFS_PCI_DEVICES`]), sorted by address. A missing
/// directory (no PCI bus) gives none.
pub fn devices(root: &Path) -> io::Result<Vec<PciDevice>> {
    let entries = match fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found = Vec::new();
    for entry in entries.take(MAX_DEVICES) {
        let entry = entry?;
        let address = entry.file_name().to_string_lossy().into_owned();
        if !is_address(&address) {
            continue;
        }
        found.push(read_device(&entry.path(), address)?);
    }
    found.sort_by(|a, b| a.address.cmp(&b.address));
    Ok(found)
}

/// Whether `text` is a PCI address as sysfs names devices: `0000:00:03.0`.
pub fn is_address(text: &str) -> bool {
    text.parse::<PciAddress>().is_ok()
}

fn read_device(dir: &Path, address: String) -> io::Result<PciDevice> {
    let hex = |name: &str| -> io::Result<u32> {
        let text = fs::read_to_string(dir.join(name))?;
        let digits = text.trim().trim_start_matches("0x");
        u32::from_str_radix(digits, 16).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: not a hexadecimal number: {text:?}",
                    dir.join(name).display()
                ),
            )
        })
    };
    let id16 = |name: &str| -> io::Result<u16> {
        u16::try_from(hex(name)?).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: more than 16 bits", dir.join(name).display()),
            )
        })
    };
    // The header type is in the first 64 bytes of config space, which anyone may read.
    let bridge = match fs::read(dir.join("config")) {
        Ok(config) => config.get(0x0e).is_some_and(|h| h & 0x7f != 0),
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    Ok(PciDevice {
        vendor: id16("vendor")?,
        device: id16("device")?,
        class: hex("class")? & 0xff_ffff,
        driver: link_name(&dir.join("driver"))?,
        iommu_group: link_name(&dir.join("iommu_group"))?.and_then(|g| g.parse().ok()),
        bridge,
        address,
    })
}

/// The last component of the symbolic link at `path`, if there is one.
fn link_name(path: &Path) -> io::Result<Option<String>> {
    match fs::read_link(path) {
        Ok(target) => Ok(target.file_name().map(|n| n.to_string_lossy().into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether `dev` can be handed to a VM now, among `all` (the devices of the host).
pub fn readiness(dev: &PciDevice, all: &[PciDevice]) -> Result<(), Unready> {
    let Some(group) = dev.iommu_group else {
        return Err(Unready::NoIommu);
    };
    if !dev.bound_to_vfio() {
        return Err(Unready::NotBound {
            driver: dev.driver.clone(),
        });
    }
    match all
        .iter()
        .find(|other| other.iommu_group == Some(group) && !other.harmless_in_group())
    {
        Some(other) => Err(Unready::GroupNotViable {
            sibling: other.address.clone(),
            driver: other.driver.clone().unwrap_or_default(),
        }),
        None => Ok(()),
    }
}

/// Why a device given as `vfio:ADDRESS` cannot go to an agent, in one line with what to do.
#[derive(Debug, thiserror::Error)]
pub enum PassthroughError {
    #[error(
        "{0:?}: give a device as vfio:ADDRESS, with the address as sysfs names it, like vfio:0000:01:00.0"
    )]
    Syntax(String),
    #[error("{0}")]
    Option(String),
    #[error("{0}: no such PCI device on this host (`agentos doctor` lists them)")]
    Absent(String),
    #[error("{address}: {why}")]
    Unready { address: String, why: String },
    #[error(
        "{address}: in use by agent `{holder}`{}; `agentos rm {holder}` frees it",
        if *.shared_group { " (its IOMMU group, which goes to one VM at a time)" } else { "" }
    )]
    InUse {
        address: String,
        holder: String,
        shared_group: bool,
    },
    #[error(
        "{asked} GPU(s) asked for; this host has {ready} ready to pass (PCI class display, bound to vfio-pci, group viable), {in_use} of them in use by other agents; `agentos doctor` says what the others need"
    )]
    NotEnoughGpus {
        asked: u32,
        ready: usize,
        in_use: usize,
    },
    #[error("cannot read {}", SYSFS_PCI_DEVICES)]
    Sysfs(#[source] io::Error),
}

/// A device given as `vfio:ADDRESS[,mmap=off]`, checked against the devices under `root`: it
/// exists, is bound to vfio-pci, and its IOMMU group is viable.
pub fn ready_for_passthrough(spec: &str, root: &Path) -> Result<PassedDevice, PassthroughError> {
    let syntax = || PassthroughError::Syntax(spec.to_owned());
    let passed = PassedDevice::from_spec(spec).map_err(|e| match e {
        BadPassedDevice::Kind(_) | BadPassedDevice::Address(_) => syntax(),
        option @ BadPassedDevice::Option(_) => PassthroughError::Option(option.to_string()),
    })?;
    let all = devices(root).map_err(PassthroughError::Sysfs)?;
    check_ready(&passed, &all)?;
    Ok(passed)
}

/// `passed` is among `all`, bound to vfio-pci, its group viable.
fn check_ready<'a>(
    passed: &PassedDevice,
    all: &'a [PciDevice],
) -> Result<&'a PciDevice, PassthroughError> {
    let address = passed.address.to_string();
    let dev = all
        .iter()
        .find(|d| d.address == address)
        .ok_or_else(|| PassthroughError::Absent(address.clone()))?;
    readiness(dev, all).map_err(|why| PassthroughError::Unready {
        address,
        why: why.describe(dev),
    })?;
    Ok(dev)
}

/// A device another agent holds: its address and that agent's name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub address: String,
    pub holder: String,
}

/// What an agent asking for `named` devices and `gpus` GPUs gets on the host whose devices
/// are under `root`, beside the devices other agents hold (`held`): each named device, ready
/// and free, and the first `gpus` ready display devices that are free and not named. A
/// device is not free when another agent holds it or a device of its IOMMU group, which VFIO
/// gives to one VM at a time.
pub fn assign(
    named: &[PassedDevice],
    gpus: u32,
    held: &[Held],
    root: &Path,
) -> Result<Vec<PassedDevice>, PassthroughError> {
    if named.is_empty() && gpus == 0 {
        return Ok(Vec::new());
    }
    let all = devices(root).map_err(PassthroughError::Sysfs)?;
    let group_of = |address: &str| {
        all.iter()
            .find(|d| d.address == address)
            .and_then(|d| d.iommu_group)
    };
    let holder_of = |dev: &PciDevice| {
        held.iter().find(|h| {
            h.address == dev.address
                || (dev.iommu_group.is_some() && group_of(&h.address) == dev.iommu_group)
        })
    };
    let mut assigned = Vec::with_capacity(named.len());
    for passed in named {
        let dev = check_ready(passed, &all)?;
        if let Some(h) = holder_of(dev) {
            return Err(PassthroughError::InUse {
                address: dev.address.clone(),
                holder: h.holder.clone(),
                shared_group: h.address != dev.address,
            });
        }
        assigned.push(*passed);
    }
    if gpus > 0 {
        let ready: Vec<&PciDevice> = all
            .iter()
            .filter(|d| d.base_class() == DISPLAY_CLASS && readiness(d, &all).is_ok())
            .collect();
        let free: Vec<&PciDevice> = ready
            .iter()
            .copied()
            .filter(|d| holder_of(d).is_none())
            .filter(|d| !named.iter().any(|n| n.address.to_string() == d.address))
            .collect();
        if free.len() < gpus as usize {
            return Err(PassthroughError::NotEnoughGpus {
                asked: gpus,
                ready: ready.len(),
                in_use: ready.len() - free.len(),
            });
        }
        for dev in free.into_iter().take(gpus as usize) {
            let address = dev.address.parse().map_err(|_| {
                PassthroughError::Sysfs(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: not a PCI address", dev.address),
                ))
            })?;
            assigned.push(PassedDevice {
                address,
                map_bars: true,
            });
        }
    }
    Ok(assigned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn fake(
        root: &Path,
        address: &str,
        ids: (u16, u16, u32),
        driver: Option<&str>,
        group: Option<u32>,
        header: u8,
    ) {
        let dir = root.join(address);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("vendor"), format!("0x{:04x}\n", ids.0)).unwrap();
        fs::write(dir.join("device"), format!("0x{:04x}\n", ids.1)).unwrap();
        fs::write(dir.join("class"), format!("0x{:06x}\n", ids.2)).unwrap();
        let mut config = vec![0u8; 64];
        config[0x0e] = header;
        fs::write(dir.join("config"), config).unwrap();
        if let Some(d) = driver {
            symlink(format!("../../../bus/pci/drivers/{d}"), dir.join("driver")).unwrap();
        }
        if let Some(g) = group {
            symlink(
                format!("../../../kernel/iommu_groups/{g}"),
                dir.join("iommu_group"),
            )
            .unwrap();
        }
    }

    #[test]
    fn devices_are_read_with_ids_class_driver_and_group() {
        let root = tempfile::tempdir().unwrap();
        fake(
            root.path(),
            "0000:00:04.0",
            (0x1234, 0x11e8, 0x00ff00),
            None,
            Some(3),
            0,
        );
        fake(
            root.path(),
            "0000:00:00.0",
            (0x8086, 0x29c0, 0x060000),
            None,
            Some(0),
            0,
        );
        fs::create_dir(root.path().join("not-a-device")).unwrap();
        let found = devices(root.path()).unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(found[1].address, "0000:00:04.0");
        assert_eq!((found[1].vendor, found[1].device), (0x1234, 0x11e8));
        assert_eq!(found[1].class, 0x00ff00);
        assert_eq!(found[1].iommu_group, Some(3));
        assert_eq!(found[1].driver, None);
        assert!(devices(&root.path().join("absent")).unwrap().is_empty());
    }

    #[test]
    fn a_group_is_viable_only_when_every_other_member_is_harmless() {
        let root = tempfile::tempdir().unwrap();
        let gpu = (0x10de, 0x2331, 0x030200);
        fake(
            root.path(),
            "0000:01:00.0",
            gpu,
            Some("vfio-pci"),
            Some(7),
            0,
        );
        fake(
            root.path(),
            "0000:01:00.1",
            (0x10de, 0x22a3, 0x040300),
            Some("snd_hda_intel"),
            Some(7),
            0,
        );
        fake(
            root.path(),
            "0000:00:01.0",
            (0x8086, 0x1901, 0x060400),
            Some("pcieport"),
            Some(7),
            1,
        );
        fake(root.path(), "0000:02:00.0", gpu, Some("nvidia"), Some(8), 0);
        fake(
            root.path(),
            "0000:03:00.0",
            gpu,
            Some("vfio-pci"),
            Some(9),
            0,
        );
        fake(
            root.path(),
            "0000:03:00.1",
            (0x10de, 0x22a3, 0x040300),
            None,
            Some(9),
            0,
        );
        let all = devices(root.path()).unwrap();
        let by = |a: &str| all.iter().find(|d| d.address == a).unwrap();
        assert_eq!(
            readiness(by("0000:01:00.0"), &all),
            Err(Unready::GroupNotViable {
                sibling: "0000:01:00.1".into(),
                driver: "snd_hda_intel".into()
            })
        );
        assert_eq!(
            readiness(by("0000:02:00.0"), &all),
            Err(Unready::NotBound {
                driver: Some("nvidia".into())
            })
        );
        // An unbound sibling and a bridge with its driver leave a group usable.
        assert_eq!(readiness(by("0000:03:00.0"), &all), Ok(()));
        assert_eq!(by("0000:03:00.0").base_class(), DISPLAY_CLASS);
        let line = Unready::NotBound {
            driver: Some("nvidia".into()),
        }
        .describe(by("0000:02:00.0"));
        assert!(
            line.contains("echo 0000:02:00.0 > /sys/bus/pci/devices/0000:02:00.0/driver/unbind"),
            "{line}"
        );
        assert!(
            line.contains("echo 10de 2331 > /sys/bus/pci/drivers/vfio-pci/new_id"),
            "{line}"
        );
    }

    #[test]
    fn without_groups_the_iommu_is_off() {
        let root = tempfile::tempdir().unwrap();
        fake(
            root.path(),
            "0000:00:04.0",
            (0x1234, 0x11e8, 0x00ff00),
            Some("vfio-pci"),
            None,
            0,
        );
        let all = devices(root.path()).unwrap();
        assert_eq!(readiness(&all[0], &all), Err(Unready::NoIommu));
    }

    #[test]
    fn a_device_for_an_agent_must_exist_be_bound_and_have_a_viable_group() {
        let root = tempfile::tempdir().unwrap();
        fake(
            root.path(),
            "0000:00:04.0",
            (0x1234, 0x11e8, 0x00ff00),
            Some("vfio-pci"),
            Some(3),
            0,
        );
        fake(
            root.path(),
            "0000:00:05.0",
            (0x1234, 0x11e8, 0x00ff00),
            None,
            Some(4),
            0,
        );
        assert_eq!(
            ready_for_passthrough("vfio:0000:00:04.0", root.path())
                .unwrap()
                .to_string(),
            "0000:00:04.0"
        );
        let trapped = ready_for_passthrough("vfio:0000:00:04.0,mmap=off", root.path()).unwrap();
        assert!(!trapped.map_bars);
        let refused = |spec: &str| {
            ready_for_passthrough(spec, root.path())
                .unwrap_err()
                .to_string()
        };
        assert!(refused("0000:00:04.0").contains("give a device as vfio:ADDRESS"));
        assert!(refused("vfio:../../../etc").contains("give a device as vfio:ADDRESS"));
        assert!(refused("vfio:0000:00:04.0,mmap=no").contains("unknown device option"));
        assert!(refused("vfio:0000:00:06.0").contains("no such PCI device"));
        assert!(refused("vfio:0000:00:05.0").contains("not bound to vfio-pci"));
    }

    #[test]
    fn agents_get_free_devices_and_gpus_one_vm_per_group() {
        let root = tempfile::tempdir().unwrap();
        let vga = (0x10de, 0x2330, 0x030000);
        let bound = Some("vfio-pci");
        fake(root.path(), "0000:01:00.0", vga, bound, Some(1), 0);
        // A GPU and its audio function share a group.
        fake(root.path(), "0000:02:00.0", vga, bound, Some(2), 0);
        fake(
            root.path(),
            "0000:02:00.1",
            (0x10de, 0x22bb, 0x040300),
            bound,
            Some(2),
            0,
        );
        fake(root.path(), "0000:03:00.0", vga, None, Some(3), 0);
        fake(
            root.path(),
            "0000:04:00.0",
            (0x1234, 0x11e8, 0x00ff00),
            bound,
            Some(4),
            0,
        );
        let dev = |a: &str| PassedDevice {
            address: a.parse().unwrap(),
            map_bars: true,
        };
        let held = |address: &str, holder: &str| Held {
            address: address.into(),
            holder: holder.into(),
        };
        let names = |v: Vec<PassedDevice>| v.iter().map(|d| d.to_string()).collect::<Vec<_>>();
        let got = assign(&[dev("0000:04:00.0")], 2, &[], root.path()).unwrap();
        assert_eq!(names(got), ["0000:04:00.0", "0000:01:00.0", "0000:02:00.0"]);
        // The unbound GPU is never picked; a held one is skipped.
        let got = assign(&[], 1, &[held("0000:01:00.0", "a")], root.path()).unwrap();
        assert_eq!(names(got), ["0000:02:00.0"]);
        let short = assign(&[], 2, &[held("0000:01:00.0", "a")], root.path())
            .unwrap_err()
            .to_string();
        assert!(
            short.starts_with("2 GPU(s) asked for; this host has 2 ready"),
            "{short}"
        );
        assert!(short.contains("1 of them in use"), "{short}");
        let busy = assign(
            &[dev("0000:04:00.0")],
            0,
            &[held("0000:04:00.0", "b")],
            root.path(),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            busy,
            "0000:04:00.0: in use by agent `b`; `agentos rm b` frees it"
        );
        // Its group-mate is held: the GPU goes to no other VM.
        let mate = assign(
            &[dev("0000:02:00.0")],
            0,
            &[held("0000:02:00.1", "c")],
            root.path(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            mate.contains("in use by agent `c` (its IOMMU group"),
            "{mate}"
        );
        let got = assign(&[], 2, &[held("0000:02:00.1", "c")], root.path());
        assert!(got.is_err(), "the GPU whose group is held is not free");
        assert!(
            assign(&[dev("0000:03:00.0")], 0, &[], root.path())
                .unwrap_err()
                .to_string()
                .contains("not bound to vfio-pci")
        );
        assert_eq!(assign(&[], 0, &[], Path::new("/nonexistent")).unwrap(), []);
    }

    #[test]
    fn addresses_are_checked() {
        assert!(is_address("0000:00:03.0"));
        assert!(is_address("abcd:ff:1f.7"));
        for bad in [
            "0000:00:03.8",
            "0000:00:03",
            "../../etc",
            "0000:0g:03.0",
            "00000:00:03.0",
        ] {
            assert!(!is_address(bad), "{bad}");
        }
    }
}
