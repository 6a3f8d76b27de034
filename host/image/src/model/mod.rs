//! Model bundles on the host: the store under the cache, checking a bundle against its manifest,
//! and the disks that give agents the bundles, ONNX Runtime and the inference worker.
//!
//! ```text
//! <cache>/models/<name>/             bundles: agentos-model.toml and the files it lists
//! <cache>/runtime/onnxruntime/       libonnxruntime.so (scripts/setup)
//! <cache>/packed/                    the disks agents with a model get (see `disk`)
//! ```
//!
//! Every file of a bundle is hashed when it is added and again when its disk is built,
//! so a bundle changed behind its manifest's back is refused.

pub(crate) mod disk;

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use agentos_protocol::bundle::{BundleError, BundleManifest, MANIFEST_FILE, check_name};
use sha2::{Digest, Sha256};

use crate::hex;

pub use disk::least_image;
pub use disk::{
    DiskDevice, ModelDisks, PackError, carrier_copies, carrier_files, check_filesystem,
    model_disks, remove_bundle_disks,
};

const MODELS_DIR: &str = "models";
const PACKED_DIR: &str = "packed";
const RUNTIME_LIBRARY: &str = "runtime/onnxruntime/libonnxruntime.so";

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(
        "model `{name}` is not installed (bundles are in {dir}); `agentos model ls` lists them, `scripts/setup` builds the default ones"
    )]
    NotFound { name: String, dir: PathBuf },
    #[error("{path}: {source}")]
    Manifest {
        path: PathBuf,
        #[source]
        source: BundleError,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{dir}: `{file}` is listed in {MANIFEST_FILE} but missing")]
    MissingFile { dir: PathBuf, file: String },
    #[error(
        "{dir}: `{file}` has SHA-256 {actual}, but {MANIFEST_FILE} says {expected}; the file changed or the manifest is wrong"
    )]
    Checksum {
        dir: PathBuf,
        file: String,
        expected: String,
        actual: String,
    },
    #[error("{path}: a bundle file must be a regular file, not a link or a directory")]
    NotRegular { path: PathBuf },
    #[error("model `{0}` is already installed; remove it first (`agentos model rm {0}`)")]
    Exists(String),
    #[error("ONNX Runtime is not installed ({path} is missing); run `scripts/setup` to fetch it")]
    NoRuntime { path: PathBuf },
    #[error(
        "the inference worker is missing ({path}); build it with `cargo build --release` (scripts/setup does)"
    )]
    NoWorker { path: PathBuf },
    #[error("the disk image {path} is damaged: {why}; remove it (agentos builds it again)")]
    BadDisk { path: PathBuf, why: String },
    #[error("cannot build {what}")]
    Pack {
        what: String,
        #[source]
        source: PackError,
    },
}

/// A bundle in the store.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: BundleManifest,
}

/// The bundles and their disks under one cache directory.
#[derive(Debug, Clone)]
pub struct ModelStore {
    cache: PathBuf,
}

impl ModelStore {
    pub fn new(cache: &Path) -> Self {
        Self {
            cache: cache.to_owned(),
        }
    }

    pub fn models_dir(&self) -> PathBuf {
        self.cache.join(MODELS_DIR)
    }

    pub fn packed_dir(&self) -> PathBuf {
        self.cache.join(PACKED_DIR)
    }

    pub fn runtime_library(&self) -> PathBuf {
        self.cache.join(RUNTIME_LIBRARY)
    }

    /// Every bundle whose manifest reads, sorted by name; broken ones are reported beside them.
    pub fn list(&self) -> (Vec<Bundle>, Vec<ModelError>) {
        let mut bundles = Vec::new();
        let mut broken = Vec::new();
        let Ok(entries) = fs::read_dir(self.models_dir()) else {
            return (bundles, broken);
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        for name in names {
            match self.find(&name) {
                Ok(bundle) => bundles.push(bundle),
                Err(err) => broken.push(err),
            }
        }
        (bundles, broken)
    }

    /// The bundle called `name`, its manifest read and checked (the files are checked when
    /// its disk is built).
    pub fn find(&self, name: &str) -> Result<Bundle, ModelError> {
        let not_found = || ModelError::NotFound {
            name: name.to_owned(),
            dir: self.models_dir(),
        };
        check_name(name).map_err(|_| not_found())?;
        let dir = self.models_dir().join(name);
        if !dir.join(MANIFEST_FILE).is_file() {
            return Err(not_found());
        }
        let manifest = read_manifest(&dir)?;
        Ok(Bundle { dir, manifest })
    }

    /// Checks the bundle in `src` (manifest, every file and its checksum) and copies it into
    /// the store under its manifest's name.
    pub fn add(&self, src: &Path) -> Result<Bundle, ModelError> {
        let manifest = verify(src)?;
        let models = self.models_dir();
        let dest = models.join(&manifest.name);
        if dest.exists() {
            return Err(ModelError::Exists(manifest.name));
        }
        fs::create_dir_all(&models).map_err(|source| ModelError::Write {
            path: models.clone(),
            source,
        })?;
        let staging = models.join(format!(".{}.tmp-{}", manifest.name, std::process::id()));
        let copied = (|| {
            let _ = fs::remove_dir_all(&staging);
            for file in manifest
                .files
                .keys()
                .map(String::as_str)
                .chain([MANIFEST_FILE])
            {
                let to = staging.join(file);
                if let Some(parent) = to.parent() {
                    fs::create_dir_all(parent).map_err(|source| ModelError::Write {
                        path: parent.to_owned(),
                        source,
                    })?;
                }
                fs::copy(src.join(file), &to)
                    .map_err(|source| ModelError::Write { path: to, source })?;
            }
            fs::rename(&staging, &dest).map_err(|source| ModelError::Write {
                path: dest.clone(),
                source,
            })
        })();
        if let Err(err) = copied {
            let _ = fs::remove_dir_all(&staging);
            return Err(err);
        }
        Ok(Bundle {
            dir: dest,
            manifest,
        })
    }

    /// Removes bundle `name` and its disks.
    pub fn remove(&self, name: &str) -> Result<(), ModelError> {
        let bundle = self.find(name)?;
        let trash = self
            .models_dir()
            .join(format!(".{name}.rm-{}", std::process::id()));
        fs::rename(&bundle.dir, &trash).map_err(|source| ModelError::Write {
            path: bundle.dir.clone(),
            source,
        })?;
        let _ = fs::remove_dir_all(&trash);
        remove_bundle_disks(self, name);
        Ok(())
    }
}

fn read_manifest(dir: &Path) -> Result<BundleManifest, ModelError> {
    let path = dir.join(MANIFEST_FILE);
    let text = fs::read_to_string(&path).map_err(|source| ModelError::Read {
        path: path.clone(),
        source,
    })?;
    BundleManifest::parse(&text).map_err(|source| ModelError::Manifest { path, source })
}

/// Reads the bundle in `dir` and checks every file its manifest lists against its checksum.
pub fn verify(dir: &Path) -> Result<BundleManifest, ModelError> {
    let manifest = read_manifest(dir)?;
    for (file, expected) in &manifest.files {
        let actual = file_sha256(dir, file)?;
        if !actual.eq_ignore_ascii_case(expected) {
            return Err(ModelError::Checksum {
                dir: dir.to_owned(),
                file: file.clone(),
                expected: expected.clone(),
                actual,
            });
        }
    }
    Ok(manifest)
}

fn file_sha256(dir: &Path, file: &str) -> Result<String, ModelError> {
    let path = dir.join(file);
    let meta = fs::symlink_metadata(&path).map_err(|_| ModelError::MissingFile {
        dir: dir.to_owned(),
        file: file.to_owned(),
    })?;
    if !meta.file_type().is_file() {
        return Err(ModelError::NotRegular { path });
    }
    let mut reader = fs::File::open(&path).map_err(|source| ModelError::Read {
        path: path.clone(),
        source,
    })?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).map_err(|source| ModelError::Read {
            path: path.clone(),
            source,
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests;
