//! What a VM is made of, as the caller describes it.

use std::fs::File;
use std::path::PathBuf;

/// Largest VM the VMM builds; the MADT and the topology leaves number vCPUs in a byte.
pub const MAX_VCPUS: u8 = 64;

pub use crate::devices::pci::{PassedDevice, PciAddress};
pub use crate::devices::virtio::block::MAX_DISKS;
pub use crate::devices::virtio::pmem::MAX_PMEM;

#[derive(Debug)]
pub struct VmConfig {
    pub vcpus: u8,
    pub memory_mib: u64,
    /// A bzImage, or an ELF with a PVH entry note.
    pub kernel: PathBuf,
    /// Initramfs parts, loaded end to end; the kernel unpacks each cpio archive in turn, later
    /// files replacing earlier ones.
    pub initrd: Vec<PathBuf>,
    pub cmdline: String,
    pub console: ConsoleConfig,
    pub vsock: Option<VsockConfig>,
    /// Read-only virtio-blk disks, `/dev/vda` onwards in the guest.
    pub disks: Vec<DiskConfig>,
    /// Read-only virtio-pmem regions, `/dev/pmem0` onwards in the guest.
    pub pmem: Vec<PmemConfig>,
    /// Host PCI functions passed to the guest with VFIO, each bound to `vfio-pci`.
    pub pci_devices: Vec<PassedDevice>,
    /// Where the VM is saved when it is asked to ([`crate::exit::ExitReason::Snapshot`]).
    pub snapshot_to: Option<SnapshotFiles>,
}

/// At most this many PCI functions per VM (the root bus has 32 slots, one the host bridge's).
pub const MAX_PCI_DEVICES: usize = crate::devices::pci::MAX_SLOTS - 1;

/// A VM to build from a snapshot (see [`crate::snapshot`]).
#[derive(Debug)]
pub struct RestoreConfig {
    /// The snapshot's state file, open for reading.
    pub state: File,
    /// Its memory file, open for reading: guest RAM is mapped from it, private to this VM.
    pub memory: File,
    pub console: ConsoleConfig,
    /// The vsock device's host side, when the snapshot has one (its CID is the snapshot's).
    pub vsock_uds: Option<PathBuf>,
    /// The disks the snapshot had, in order, of the same sizes.
    pub disks: Vec<DiskConfig>,
    /// The pmem regions the snapshot had, in order, of the same sizes.
    pub pmem: Vec<PmemConfig>,
    /// Where this VM is saved in turn when it is asked to.
    pub snapshot_to: Option<SnapshotFiles>,
}

/// The two files a snapshot is written to, opened (for writing) by the caller, so that a VMM
/// confined to a jail writes where its jail cannot reach.
#[derive(Debug)]
pub struct SnapshotFiles {
    pub state: File,
    pub memory: File,
}

#[derive(Debug, Default)]
pub struct ConsoleConfig {
    /// An open file the serial console is appended to. The caller opens it (for appending), so
    /// that a VMM confined to a jail writes where its jail cannot reach.
    pub log: Option<File>,
    /// Also copy the console to the VMM's stdout.
    pub stdout: bool,
}

/// A virtio-vsock device whose host side is Unix sockets (see `devices::virtio::vsock`).
#[derive(Clone, Debug)]
pub struct VsockConfig {
    pub guest_cid: u64,
    /// Host-initiated connections arrive here; guest-initiated ones go to `<uds_path>_<port>`.
    pub uds_path: PathBuf,
}

/// A read-only virtio-blk disk over a host file (see `devices::virtio::block`).
#[derive(Debug)]
pub struct DiskConfig {
    /// The file, opened by the caller (read-only), so that a VMM confined to a jail reads what
    /// its jail cannot reach and nothing else.
    pub file: File,
    /// What the guest reads as the disk's serial number (at most 20 bytes).
    pub id: String,
}

/// A read-only virtio-pmem region over a host file (see `devices::virtio::pmem`): the guest
/// reads the file's pages, the host's page cache, as memory.
#[derive(Debug)]
pub struct PmemConfig {
    /// The file, opened by the caller (read-only); its size is a non-zero multiple of 2 MiB.
    pub file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("a VM needs 1 to {MAX_VCPUS} vCPUs, not {0}")]
    Vcpus(u8),
    #[error("guest CID {0} is reserved; use 3 or more")]
    ReservedCid(u64),
    #[error("a VM has at most {MAX_DISKS} disks, not {0}")]
    Disks(usize),
    #[error("a VM has at most {MAX_PMEM} pmem regions, not {0}")]
    Pmem(usize),
    #[error("a VM has at most {MAX_PCI_DEVICES} PCI devices, not {0}")]
    PciDevices(usize),
    #[error("{0} is given twice")]
    PciDeviceTwice(PciAddress),
    #[error(
        "a VM with a passed-through PCI device cannot be snapshotted (the device's state is not the VMM's to save)"
    )]
    SnapshotWithPciDevices,
}

impl VmConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if let Some(vsock) = &self.vsock
            && vsock.guest_cid < 3
        {
            return Err(ConfigError::ReservedCid(vsock.guest_cid));
        }
        if self.disks.len() > MAX_DISKS {
            return Err(ConfigError::Disks(self.disks.len()));
        }
        if self.pmem.len() > MAX_PMEM {
            return Err(ConfigError::Pmem(self.pmem.len()));
        }
        if self.pci_devices.len() > MAX_PCI_DEVICES {
            return Err(ConfigError::PciDevices(self.pci_devices.len()));
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(twice) = self.pci_devices.iter().find(|d| !seen.insert(d.address)) {
            return Err(ConfigError::PciDeviceTwice(twice.address));
        }
        if !self.pci_devices.is_empty() && self.snapshot_to.is_some() {
            return Err(ConfigError::SnapshotWithPciDevices);
        }
        Ok(())
    }
}
