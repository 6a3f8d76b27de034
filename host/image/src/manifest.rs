//! `manifest.json`: what a built image holds and what it was built from.
//!
//! The manifest is written last, after the kernel and initrd are in place, so an image directory
//! with a readable manifest whose files have the recorded sizes is complete.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::spec::ImageSpec;
use super::{hex, write_atomic};

pub const MANIFEST_FILE: &str = "manifest.json";

/// Version of the manifest's shape.
pub const MANIFEST_FORMAT: u32 = 1;

/// Version of what the builder makes from given inputs; bump it whenever the same inputs should
/// give a different image (layout, modes, a new file), so existing images are rebuilt.
const BUILDER_VERSION: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a valid image manifest; rebuild the image")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{path} has manifest format {found}, this agentos reads {MANIFEST_FORMAT}; rebuild the image"
    )]
    Format { path: PathBuf, found: u32 },
    #[error("cannot encode the image manifest")]
    Encode(#[source] serde_json::Error),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub name: String,
    /// Hash of everything the image is built from; see [`inputs_key`].
    pub inputs_key: String,
    pub kernel: KernelPackage,
    pub busybox: Package,
    pub guest_agent: FileDigest,
    /// Kernel module names in load order.
    pub modules: Vec<String>,
    /// Shared libraries of the guest agent, at their paths in the initramfs.
    pub libraries: Vec<String>,
    pub vmlinuz: FileDigest,
    /// The ELF kernel unpacked from `vmlinuz`, where the spec asks for it and its compression
    /// can be unpacked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmlinux: Option<FileDigest>,
    pub initrd: FileDigest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelPackage {
    /// The versioned package (`linux-image-6.1.0-56-cloud-amd64`), not the meta package.
    pub package: String,
    pub version: String,
    /// `uname -r` of the kernel (`6.1.0-56-cloud-amd64`).
    pub release: String,
    pub deb: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    pub package: String,
    pub version: String,
    pub deb: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub size: u64,
    pub sha256: String,
}

impl FileDigest {
    pub fn of(bytes: &[u8]) -> Self {
        Self {
            size: bytes.len() as u64,
            sha256: hex(&Sha256::digest(bytes)),
        }
    }
}

impl Manifest {
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let bytes = fs::read(path).map_err(|source| ManifestError::Read {
            path: path.to_owned(),
            source,
        })?;
        let manifest: Self =
            serde_json::from_slice(&bytes).map_err(|source| ManifestError::Parse {
                path: path.to_owned(),
                source,
            })?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(ManifestError::Format {
                path: path.to_owned(),
                found: manifest.format,
            });
        }
        Ok(manifest)
    }

    /// Replaces the file at `path` in one step.
    pub fn store(&self, path: &Path) -> Result<(), ManifestError> {
        let mut json = serde_json::to_vec_pretty(self).map_err(ManifestError::Encode)?;
        json.push(b'\n');
        write_atomic(path, &json).map_err(|source| ManifestError::Write {
            path: path.to_owned(),
            source,
        })
    }
}

/// The hash that decides whether an image must be rebuilt: the builder version, the spec, the
/// package files (their names carry name, version and architecture) and the guest agent's bytes.
pub fn inputs_key(
    spec: &ImageSpec,
    kernel_deb: &str,
    busybox_deb: &str,
    guest_agent: &FileDigest,
) -> Result<String, ManifestError> {
    let spec_json = serde_json::to_string(spec).map_err(ManifestError::Encode)?;
    let mut hasher = Sha256::new();
    for part in [
        format!("agentos-image-builder {BUILDER_VERSION}"),
        spec_json,
        kernel_deb.to_owned(),
        busybox_deb.to_owned(),
        guest_agent.sha256.clone(),
    ] {
        // Length-prefixed so that no two different input lists hash the same bytes.
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    Ok(hex(&hasher.finalize()))
}

#[cfg(test)]
pub mod testing {
    use super::*;

    pub fn sample_manifest() -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            name: "agent".to_owned(),
            inputs_key: "ab".repeat(32),
            kernel: KernelPackage {
                package: "linux-image-6.1.0-56-cloud-amd64".to_owned(),
                version: "6.1.192-2".to_owned(),
                release: "6.1.0-56-cloud-amd64".to_owned(),
                deb: "linux-image-6.1.0-56-cloud-amd64_6.1.192-2_amd64.deb".to_owned(),
            },
            busybox: Package {
                package: "busybox-static".to_owned(),
                version: "1:1.35.0-4+deb12u1+b1".to_owned(),
                deb: "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb".to_owned(),
            },
            guest_agent: FileDigest::of(b"agent"),
            modules: vec!["virtio_ring".to_owned(), "virtio".to_owned()],
            libraries: vec!["/lib/x86_64-linux-gnu/libc.so.6".to_owned()],
            vmlinuz: FileDigest::of(b"kernel"),
            vmlinux: None,
            initrd: FileDigest::of(b"initrd"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::sample_manifest;
    use super::*;

    #[test]
    fn manifest_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MANIFEST_FILE);
        let manifest = sample_manifest();
        manifest.store(&path).unwrap();
        assert_eq!(Manifest::load(&path).unwrap(), manifest);
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary file left behind");
    }

    #[test]
    fn another_format_or_garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MANIFEST_FILE);
        let mut manifest = sample_manifest();
        manifest.format = MANIFEST_FORMAT + 1;
        manifest.store(&path).unwrap();
        assert!(matches!(
            Manifest::load(&path),
            Err(ManifestError::Format { .. })
        ));
        fs::write(&path, b"{\"format\": 1").unwrap();
        assert!(matches!(
            Manifest::load(&path),
            Err(ManifestError::Parse { .. })
        ));
    }

    #[test]
    fn sha256_of_known_bytes() {
        assert_eq!(
            FileDigest::of(b"abc").sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn inputs_key_changes_with_every_input() {
        let spec = ImageSpec::agent();
        let agent = FileDigest::of(b"agent v1");
        let key = |spec: &ImageSpec, kernel: &str, busybox: &str, agent: &FileDigest| {
            inputs_key(spec, kernel, busybox, agent).unwrap()
        };
        let base = key(&spec, "k_1_amd64.deb", "b_1_amd64.deb", &agent);
        assert_eq!(base, key(&spec, "k_1_amd64.deb", "b_1_amd64.deb", &agent));
        assert_ne!(
            base,
            key(
                &ImageSpec::carrier(),
                "k_1_amd64.deb",
                "b_1_amd64.deb",
                &agent
            )
        );
        assert_ne!(base, key(&spec, "k_2_amd64.deb", "b_1_amd64.deb", &agent));
        assert_ne!(base, key(&spec, "k_1_amd64.deb", "b_2_amd64.deb", &agent));
        assert_ne!(
            base,
            key(
                &spec,
                "k_1_amd64.deb",
                "b_1_amd64.deb",
                &FileDigest::of(b"v2")
            )
        );
        assert_ne!(base, key(&spec, "k_1_amd64.debb", "_1_amd64.deb", &agent));
    }
}
