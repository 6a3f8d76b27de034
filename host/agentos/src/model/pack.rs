//! Packing bundles and ONNX Runtime into cpio archives for a VM's initramfs.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use agentos_protocol::bundle::{
    GUEST_INFER_WORKER, GUEST_MODELS_DIR, GUEST_ONNXRUNTIME, MANIFEST_FILE, Runtime,
};
use anyhow::Context;
use sha2::{Digest, Sha256};

use super::{Bundle, ModelError, ModelStore, hex, verify};
use crate::image::cpio::CpioTree;
use crate::image::needed_libraries;

/// Bumped when the layout of packed archives changes, so old ones are rebuilt.
const PACK_FORMAT: &str = "pack-1";
const DATA_MODE: u32 = 0o644;
const EXEC_MODE: u32 = 0o755;

/// The archive holding `bundle` at `/opt/agentos/models/<name>/`, built when missing or stale.
/// Programs under the bundle's `bin/` come with the shared libraries they need, except those in
/// `base_libraries` (what the agent image has already).
pub fn packed_model(
    store: &ModelStore,
    bundle: &Bundle,
    base_libraries: &[String],
) -> Result<PathBuf, ModelError> {
    let name = &bundle.manifest.name;
    let manifest_path = bundle.dir.join(MANIFEST_FILE);
    let manifest_text = fs::read(&manifest_path).map_err(|source| ModelError::Read {
        path: manifest_path.clone(),
        source,
    })?;
    let mut key = Sha256::new();
    key.update(PACK_FORMAT);
    key.update(&manifest_text);
    key.update(base_libraries.join("\n"));
    let key = hex(&key.finalize());
    let archive = store.packed_dir().join(format!("model-{name}.cpio"));
    if up_to_date(&archive, &key) {
        return Ok(archive);
    }
    verify(&bundle.dir)?;
    let pack_error = |source: anyhow::Error| ModelError::Pack {
        what: format!("model `{name}`"),
        source,
    };
    let base: BTreeSet<&str> = base_libraries.iter().map(String::as_str).collect();
    let mut tree = CpioTree::new();
    let root = format!("{GUEST_MODELS_DIR}/{name}");
    let mut libraries = BTreeSet::new();
    for file in bundle
        .manifest
        .files
        .keys()
        .map(String::as_str)
        .chain([MANIFEST_FILE])
    {
        let guest = format!("{root}/{file}");
        tree.parent_dirs(Path::new(&guest))
            .map_err(|e| pack_error(e.into()))?;
        let source = bundle.dir.join(file);
        let program = file.starts_with("bin/");
        tree.host_file(&guest, if program { EXEC_MODE } else { DATA_MODE }, &source)
            .map_err(|e| pack_error(e.into()))?;
        if program {
            let needed = needed_libraries(&source).map_err(|e| pack_error(e.into()))?;
            libraries.extend(
                needed
                    .into_iter()
                    .filter(|l| l.to_str().is_some_and(|l| !base.contains(l))),
            );
        }
    }
    add_host_files(&mut tree, &libraries).map_err(pack_error)?;
    write_archive(&tree, &archive, &key).map_err(pack_error)?;
    Ok(archive)
}

/// Every archive a VM running `bundle` needs after the agent image: the worker, ONNX Runtime
/// when the bundle uses it, and the bundle.
pub fn vm_archives(
    store: &ModelStore,
    bundle: &Bundle,
    base_libraries: &[String],
) -> Result<Vec<PathBuf>, ModelError> {
    let mut archives = vec![packed_worker(store, base_libraries)?];
    if bundle.manifest.runtime == Runtime::Onnx {
        archives.push(packed_runtime(store, base_libraries)?);
    }
    archives.push(packed_model(store, bundle, base_libraries)?);
    Ok(archives)
}

/// What a carrier needs to use `archives` of `bundle` as they are: each with its key, and the
/// bundle's manifest (the store finds the bundle by it).
pub fn carrier_copies(archives: &[PathBuf], bundle: &Bundle) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for archive in archives {
        files.push(archive.clone());
        files.push(archive.with_extension("key"));
    }
    files.push(bundle.dir.join(MANIFEST_FILE));
    files
}

/// The archive holding ONNX Runtime at its guest path and the libraries it needs beyond
/// `base_libraries`.
pub fn packed_runtime(
    store: &ModelStore,
    base_libraries: &[String],
) -> Result<PathBuf, ModelError> {
    let library = store.runtime_library();
    packed_program(
        store,
        &library,
        GUEST_ONNXRUNTIME,
        "onnxruntime",
        base_libraries,
    )
    .map_err(|e| e.unwrap_or(ModelError::NoRuntime { path: library }))
}

/// The archive holding the inference worker (`agentos-infer`, next to this binary) and the
/// libraries it needs beyond `base_libraries`.
pub fn packed_worker(store: &ModelStore, base_libraries: &[String]) -> Result<PathBuf, ModelError> {
    let worker = std::env::current_exe()
        .map(|exe| exe.with_file_name("agentos-infer"))
        .unwrap_or_else(|_| PathBuf::from("agentos-infer"));
    packed_program(
        store,
        &worker,
        GUEST_INFER_WORKER,
        "infer-worker",
        base_libraries,
    )
    .map_err(|e| e.unwrap_or(ModelError::NoWorker { path: worker }))
}

/// `<packed>/<name>.cpio`: `source` at `guest` with its libraries, rebuilt when `source` changes.
/// Inside a carrier only archives are copied in, not their sources: there an existing archive
/// is used as it is. `Err(None)`: neither the source nor an archive is there.
fn packed_program(
    store: &ModelStore,
    source: &Path,
    guest: &str,
    name: &str,
    base_libraries: &[String],
) -> Result<PathBuf, Option<ModelError>> {
    let archive = store.packed_dir().join(format!("{name}.cpio"));
    let meta = match fs::metadata(source) {
        Ok(meta) => meta,
        Err(_) if archive.is_file() && key_path(&archive).is_file() => return Ok(archive),
        Err(_) => return Err(None),
    };
    let mut key = Sha256::new();
    key.update(PACK_FORMAT);
    key.update(guest);
    key.update(meta.len().to_le_bytes());
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    key.update(mtime.to_le_bytes());
    key.update(base_libraries.join("\n"));
    let key = hex(&key.finalize());
    if up_to_date(&archive, &key) {
        return Ok(archive);
    }
    let pack_error = |source: anyhow::Error| {
        Some(ModelError::Pack {
            what: name.to_owned(),
            source,
        })
    };
    let base: BTreeSet<&str> = base_libraries.iter().map(String::as_str).collect();
    let needed: BTreeSet<PathBuf> = needed_libraries(source)
        .map_err(|e| pack_error(e.into()))?
        .into_iter()
        .filter(|l| l.to_str().is_some_and(|l| !base.contains(l)))
        .collect();
    let mut tree = CpioTree::new();
    tree.parent_dirs(Path::new(guest))
        .map_err(|e| pack_error(e.into()))?;
    tree.host_file(guest, EXEC_MODE, source)
        .map_err(|e| pack_error(e.into()))?;
    add_host_files(&mut tree, &needed).map_err(pack_error)?;
    write_archive(&tree, &archive, &key).map_err(pack_error)?;
    Ok(archive)
}

fn key_path(archive: &Path) -> PathBuf {
    archive.with_extension("key")
}

fn up_to_date(archive: &Path, key: &str) -> bool {
    archive.is_file() && fs::read_to_string(key_path(archive)).is_ok_and(|k| k.trim() == key)
}

fn add_host_files(tree: &mut CpioTree, files: &BTreeSet<PathBuf>) -> anyhow::Result<()> {
    for file in files {
        tree.parent_dirs(file)?;
        tree.host_file_at_same_path(file)?;
    }
    Ok(())
}

/// Writes the archive next to its final place, then renames it in, then records its key.
fn write_archive(tree: &CpioTree, archive: &Path, key: &str) -> anyhow::Result<()> {
    let dir = archive.parent().context("archive path has no directory")?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = archive.with_extension(format!("tmp-{}", std::process::id()));
    let written = (|| -> anyhow::Result<()> {
        let _ = fs::remove_file(key_path(archive));
        let out = io::BufWriter::new(fs::File::create(&tmp)?);
        let mut out = tree.write(out)?;
        out.flush()?;
        fs::rename(&tmp, archive)?;
        fs::write(key_path(archive), format!("{key}\n"))?;
        Ok(())
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.with_context(|| format!("cannot write {}", archive.display()))
}
