//! Snapshots: a paused VM's whole state in two files, so that it can run again in another VMM
//! process, or in many.
//!
//! `vm.state` is one line of JSON (the header: format, VMM version, the body's length and
//! SHA-256) and then the body: the machine's shape, KVM's state of the VM and of every vCPU, and
//! every device's registers and queues. `memory` is guest RAM, its ranges end to end, with holes
//! where pages were zero. The state is checked whole before anything is built from it; the
//! memory is checked for its size only: it is the guest's own data, which the host never trusts
//! anyway, and reading all of it would undo what mapping it lazily gains.

use std::fs::File;
use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::devices::legacy::serial::SavedSerial;
use crate::devices::virtio::mmio::TransportState;
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::VmState;

/// The file names in a snapshot directory.
pub const STATE_FILE: &str = "vm.state";
pub const MEMORY_FILE: &str = "memory";

const MAGIC: &str = "agentos-vm-snapshot";
/// Bumped whenever the body changes shape.
pub const FORMAT_VERSION: u32 = 3;
/// The VMM that wrote a snapshot is the only one that restores it.
pub const VMM_VERSION: &str = env!("CARGO_PKG_VERSION");
/// The most a state file may hold: 64 vCPUs of about 40 KiB of JSON each, and devices.
const MAX_STATE_BYTES: u64 = 16 << 20;
const MAX_HEADER_BYTES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read the snapshot's state")]
    Read(#[source] std::io::Error),
    #[error("cannot write the snapshot's state")]
    Write(#[source] std::io::Error),
    #[error("the snapshot's state is empty: the VM ended before a snapshot was taken")]
    Empty,
    #[error("the snapshot's state is larger than {MAX_STATE_BYTES} bytes")]
    TooLarge,
    #[error("not an agentos snapshot (no header)")]
    NoHeader,
    #[error("the snapshot is of format {found}; this VMM reads format {FORMAT_VERSION}")]
    Format { found: u32 },
    #[error("the snapshot was written by VMM {found}; this is VMM {VMM_VERSION}")]
    Version { found: String },
    #[error("the snapshot's state is cut short: {found} of {expected} bytes")]
    Truncated { found: u64, expected: u64 },
    #[error("the snapshot's state does not match its checksum (corrupt)")]
    Checksum,
    #[error("the snapshot's state cannot be parsed")]
    Parse(#[source] serde_json::Error),
}

#[derive(Serialize, Deserialize)]
struct Header {
    magic: String,
    format: u32,
    vmm_version: String,
    body_bytes: u64,
    body_sha256: String,
}

/// A disk as the snapshot remembers it: the restored VM must be given the same.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SavedDisk {
    pub id: String,
    pub bytes: u64,
}

/// A pmem region as the snapshot remembers it: the restored VM must be given a file of the
/// same size, which goes at the same guest address.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SavedPmem {
    pub start: u64,
    pub bytes: u64,
}

/// Everything of a VM but its memory.
#[derive(Serialize, Deserialize)]
pub struct VmSnapshot {
    pub memory_mib: u64,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SavedSerial,
    /// The guest status port's last value.
    pub status: Option<u8>,
    /// The vsock device's CID and transport, when the VM had one.
    pub vsock: Option<(u64, TransportState)>,
    pub disks: Vec<(SavedDisk, TransportState)>,
    pub pmem: Vec<(SavedPmem, TransportState)>,
}

impl VmSnapshot {
    /// Writes the header and body to `file` (from its start) and syncs it.
    pub fn write_to(&self, mut file: &File) -> Result<(), SnapshotError> {
        let body = serde_json::to_vec(self).map_err(SnapshotError::Parse)?;
        let header = Header {
            magic: MAGIC.into(),
            format: FORMAT_VERSION,
            vmm_version: VMM_VERSION.into(),
            body_bytes: body.len() as u64,
            body_sha256: hex(&Sha256::digest(&body)),
        };
        let mut out = serde_json::to_vec(&header).map_err(SnapshotError::Parse)?;
        out.push(b'\n');
        out.extend_from_slice(&body);
        file.set_len(0).map_err(SnapshotError::Write)?;
        file.write_all(&out).map_err(SnapshotError::Write)?;
        file.sync_data().map_err(SnapshotError::Write)
    }

    /// Reads and checks a state file: header, version, length and checksum, then the body.
    pub fn read_from(file: &File) -> Result<Self, SnapshotError> {
        let mut bytes = Vec::new();
        file.take(MAX_STATE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(SnapshotError::Read)?;
        Self::parse(&bytes)
    }

    fn parse(bytes: &[u8]) -> Result<Self, SnapshotError> {
        if bytes.is_empty() {
            return Err(SnapshotError::Empty);
        }
        if bytes.len() as u64 > MAX_STATE_BYTES {
            return Err(SnapshotError::TooLarge);
        }
        let newline = bytes
            .iter()
            .take(MAX_HEADER_BYTES)
            .position(|&b| b == b'\n')
            .ok_or(SnapshotError::NoHeader)?;
        let header: Header =
            serde_json::from_slice(&bytes[..newline]).map_err(|_| SnapshotError::NoHeader)?;
        if header.magic != MAGIC {
            return Err(SnapshotError::NoHeader);
        }
        if header.format != FORMAT_VERSION {
            return Err(SnapshotError::Format {
                found: header.format,
            });
        }
        if header.vmm_version != VMM_VERSION {
            return Err(SnapshotError::Version {
                found: header.vmm_version,
            });
        }
        let body = &bytes[newline + 1..];
        if body.len() as u64 != header.body_bytes {
            return Err(SnapshotError::Truncated {
                found: body.len() as u64,
                expected: header.body_bytes,
            });
        }
        if hex(&Sha256::digest(body)) != header.body_sha256 {
            return Err(SnapshotError::Checksum);
        }
        serde_json::from_slice(body).map_err(SnapshotError::Parse)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests;
