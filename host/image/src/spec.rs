//! What goes into an image, and the guest agent's boot configuration that the image carries.

use std::collections::BTreeMap;

use agentos_protocol::{AGENT_CONTROL_PORT, AGENT_LISTEN_PORT, CARRIER_PORT_NAME};
use serde::{Deserialize, Serialize};

/// The image every agent VM boots.
pub const AGENT_IMAGE: &str = "agent";
/// The image of the QEMU carrier VM, for hosts whose own KVM cannot boot Linux.
pub const CARRIER_IMAGE: &str = "carrier";

/// Where the guest agent reads its [`InitConfig`].
pub const INIT_CONFIG_PATH: &str = "/etc/agentos/init.json";
/// Where modules sit in the initramfs: flat, since the guest loads them by path, not by name.
pub const MODULES_DIR: &str = "/lib/modules";

const KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";
const BUSYBOX_PACKAGE: &str = "busybox-static";

/// The virtio-mmio vsock stack, in the order that was verified to bring up `/dev/vsock`, the
/// virtio-blk driver for the disks an agent is given (`/dev/vda` onwards), the pmem stack for
/// the model disks (`/dev/pmem0` onwards: the namespace driver before the device's, so that a
/// region is claimed as it appears), erofs, their file system, and the generic userspace I/O
/// driver, which an agent binds a passed-through PCI device to (`new_id`) to wait for its
/// interrupts without a driver of its own (it binds nothing by itself).
const AGENT_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "virtio_blk",
    "nd_pmem",
    "virtio_pmem",
    "erofs",
    "uio_pci_generic",
];

/// KVM for the nested guests, virtio-pci with a console for the control port, a network card for
/// a daemon in the carrier to serve its API to the host (QEMU's user-mode network, which forwards
/// one host port in and lets nothing out), and VFIO for a carrier given a PCI device to pass to
/// its agents (`agentos carrier --pci-test-device`; the modules load without an IOMMU too, and
/// bind nothing by themselves). The carrier's CPU is
/// QEMU's software one, which emulates AMD's SVM and not Intel's VMX: `kvm-intel` would fail to
/// load, and the guest agent stops at a module that fails.
const CARRIER_MODULES: &[&str] = &[
    "irqbypass",
    "kvm",
    "kvm-amd",
    "virtio_ring",
    "virtio",
    "virtio_pci",
    "virtio_console",
    "virtio_net",
    "vfio",
    "vfio_iommu_type1",
    "vfio-pci",
];

/// The directories a guest needs before anything is mounted on them.
const BASE_DIRS: &[(&str, u32)] = &[
    ("/dev", 0o755),
    ("/etc", 0o755),
    ("/home", 0o755),
    ("/proc", 0o555),
    ("/root", 0o700),
    ("/run", 0o755),
    ("/sys", 0o555),
    ("/tmp", 0o1777),
];

/// Where guests look for programs.
pub const GUEST_PATH: &str = "/bin:/sbin:/usr/bin:/usr/sbin";

/// The guest's accounts: root, and `user`, whom programs may run as (`run.user`); the guest
/// agent makes the homes of the accounts other than root at boot, owned by them.
const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n";
const GROUP: &str = "root:x:0:\nuser:x:1000:\n";

/// Everything that decides an image's contents apart from the package files and the guest agent
/// binary. It is hashed into the image's inputs key, so any change here rebuilds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSpec {
    pub name: String,
    /// Debian package holding the kernel, or a meta package depending on it.
    pub kernel_package: String,
    /// Debian package holding a static `/bin/busybox`.
    pub busybox_package: String,
    /// Modules to load at boot; their dependencies are added.
    pub modules: Vec<String>,
    pub transport: Transport,
    /// The vsock port the guest agent listens on; vsock transport only.
    pub listen_port: Option<u32>,
    pub hostname: String,
    pub env: BTreeMap<String, String>,
    /// Empty directories and their modes.
    pub dirs: Vec<(String, u32)>,
    /// Small text files (the accounts), by path; mode 0644.
    pub files: BTreeMap<String, String>,
    /// Also keep the ELF kernel unpacked from the bzImage, which agentos boots without the guest
    /// decompressing itself. The carrier, which QEMU boots, does without.
    pub unpack_kernel: bool,
}

/// How the guest agent reaches the host. Serialised as `{"vsock": {"port": 1024}}` or
/// `{"serial": {"name": "agentos.ctl"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    Vsock { port: u32 },
    Serial { name: String },
}

/// The guest agent's `/etc/agentos/init.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitConfig {
    /// Module files in load order, dependencies first.
    pub modules: Vec<String>,
    pub transport: Transport,
    /// The guest agent refuses this field next to a serial transport.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_port: Option<u32>,
    pub hostname: String,
    pub env: BTreeMap<String, String>,
}

impl ImageSpec {
    pub fn agent() -> Self {
        Self {
            unpack_kernel: true,
            ..Self::base(
                AGENT_IMAGE,
                AGENT_MODULES,
                Transport::Vsock {
                    port: AGENT_CONTROL_PORT,
                },
                Some(AGENT_LISTEN_PORT),
            )
        }
    }

    pub fn carrier() -> Self {
        Self::base(
            CARRIER_IMAGE,
            CARRIER_MODULES,
            Transport::Serial {
                name: CARRIER_PORT_NAME.to_owned(),
            },
            None,
        )
    }

    /// The spec of a known image by its name (`agent` or `carrier`).
    pub fn named(name: &str) -> Option<Self> {
        match name {
            AGENT_IMAGE => Some(Self::agent()),
            CARRIER_IMAGE => Some(Self::carrier()),
            _ => None,
        }
    }

    fn base(name: &str, modules: &[&str], transport: Transport, listen_port: Option<u32>) -> Self {
        Self {
            name: name.to_owned(),
            kernel_package: KERNEL_PACKAGE.to_owned(),
            busybox_package: BUSYBOX_PACKAGE.to_owned(),
            modules: modules.iter().map(|m| (*m).to_owned()).collect(),
            transport,
            listen_port,
            hostname: name.to_owned(),
            env: BTreeMap::from([("PATH".to_owned(), GUEST_PATH.to_owned())]),
            dirs: BASE_DIRS
                .iter()
                .map(|(path, mode)| ((*path).to_owned(), *mode))
                .collect(),
            files: BTreeMap::from([
                ("/etc/passwd".to_owned(), PASSWD.to_owned()),
                ("/etc/group".to_owned(), GROUP.to_owned()),
            ]),
            unpack_kernel: false,
        }
    }

    /// The guest agent's configuration, given the module files in load order.
    pub fn init_config(&self, module_files: &[String]) -> InitConfig {
        InitConfig {
            modules: module_files
                .iter()
                .map(|file| format!("{MODULES_DIR}/{file}"))
                .collect(),
            transport: self.transport.clone(),
            listen_port: self.listen_port,
            hostname: self.hostname.clone(),
            env: self.env.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_config_has_the_agreed_json_shape() {
        let config = ImageSpec::agent().init_config(&["virtio_ring.ko".to_owned()]);
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "modules": ["/lib/modules/virtio_ring.ko"],
                "transport": {"vsock": {"port": 1024}},
                "listen_port": 52,
                "hostname": "agent",
                "env": {"PATH": "/bin:/sbin:/usr/bin:/usr/sbin"},
            })
        );
        let carrier = serde_json::to_value(ImageSpec::carrier().init_config(&[])).unwrap();
        assert_eq!(
            carrier,
            serde_json::json!({
                "modules": [],
                "transport": {"serial": {"name": "agentos.ctl"}},
                "hostname": "carrier",
                "env": {"PATH": "/bin:/sbin:/usr/bin:/usr/sbin"},
            })
        );
    }

    #[test]
    fn known_images_are_found_by_name() {
        assert_eq!(ImageSpec::named("agent"), Some(ImageSpec::agent()));
        assert_eq!(ImageSpec::named("carrier"), Some(ImageSpec::carrier()));
        assert_eq!(ImageSpec::named("other"), None);
    }
}
