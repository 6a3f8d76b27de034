//! Model disks: read-only erofs images an agent with a model gets as virtio-pmem regions, which
//! its guest maps from the host's page cache (`dax`), so that the host holds one copy of each
//! however many agents use it and the guests hold none (see [`layout`]).
//!
//! - The runtime disk holds the inference worker, ONNX Runtime and the shared libraries they
//!   need beyond the agent image's; the guest mounts it at `/opt/agentos`. One for all agents.
//! - A bundle's disk holds the bundle (and, in `.libs/`, the libraries its programs need beyond
//!   the agent image's); the guest mounts it at `/opt/agentos/models/<name>`. One per bundle, so
//!   adding a bundle builds its disk alone.
//!
//! ```text
//! <cache>/packed/runtime-<key>.img        the runtime disk, named by what went into it
//! <cache>/packed/runtime.json             which runtime disk is current
//! <cache>/packed/model-<name>-<key>.img   a bundle's disk
//! ```
//!
//! Images are never rewritten: new inputs (another worker, another manifest) give a new name,
//! and the image replaced loses its name only. VMs running on it keep it open; snapshots hold
//! a link of their own.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::UNIX_EPOCH;

use agentos_protocol::bundle::{
    GUEST_INFER_WORKER, GUEST_LIBRARY_DIR, GUEST_MODELS_DIR, GUEST_ONNXRUNTIME, GUEST_RUNTIME_DIR,
    MANIFEST_FILE, MODEL_LIBRARY_DIR, Runtime,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Bundle, ModelError, ModelStore, hex, verify};

mod layout;
use crate::needed_libraries;

/// Bumped when the images' layout changes, so old ones are rebuilt.
const DISK_FORMAT: &str = "model-disks-3";
const RUNTIME_INDEX: &str = "runtime.json";
const RUNTIME_PREFIX: &str = "runtime-";
const IMAGE_SUFFIX: &str = ".img";
/// The most of an index or a stamp that is read: they are a few lines.
const MAX_INDEX_BYTES: u64 = 64 * 1024;
const DATA_MODE: u32 = 0o644;
const EXEC_MODE: u32 = 0o755;
/// The program that writes images (Debian's erofs-utils).
pub const MKFS: &str = "mkfs.erofs";

/// The disks an agent running one bundle gets, in this order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelDisks {
    pub runtime: PathBuf,
    pub bundle: PathBuf,
    /// The bundle's name: where the guest mounts its disk.
    pub name: String,
    /// How the VM gets them.
    pub device: DiskDevice,
}

/// How a VM gets the model disks. The same images serve both (see [`layout`]): a pmem region's
/// device starts at the file system, and a disk's first partition is it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskDevice {
    /// virtio-pmem regions the guest maps from the host's page cache (`dax`): no copy in the
    /// guest. What agents get.
    #[default]
    Pmem,
    /// virtio-blk disks the guest reads into its own page cache: what `agentos bench start`
    /// compares pmem with.
    Block,
}

/// Which runtime disk is current.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct RuntimeIndex {
    key: String,
    /// File name of the image, beside the index.
    image: String,
    /// Whether it holds ONNX Runtime.
    onnx: bool,
}

/// The disks for an agent running `bundle`, each built first when missing or stale.
pub fn model_disks(
    store: &ModelStore,
    bundle: &Bundle,
    base_libraries: &[String],
) -> Result<ModelDisks, ModelError> {
    disks_with_worker(store, bundle, base_libraries, &worker_path())
}

fn disks_with_worker(
    store: &ModelStore,
    bundle: &Bundle,
    base_libraries: &[String],
    worker: &Path,
) -> Result<ModelDisks, ModelError> {
    let onnx = bundle.manifest.runtime == Runtime::Onnx;
    let disks = ModelDisks {
        runtime: runtime_disk(store, onnx, base_libraries, worker)?,
        bundle: bundle_disk(store, bundle, base_libraries)?,
        name: bundle.manifest.name.clone(),
        device: DiskDevice::Pmem,
    };
    check_image(&disks.runtime)?;
    check_image(&disks.bundle)?;
    Ok(disks)
}

/// What a carrier needs to give agents of `bundle` the `disks` as they are: the images, the
/// runtime's index, and the bundle's manifest (the store finds the bundle by it).
pub fn carrier_copies(store: &ModelStore, disks: &ModelDisks, bundle: &Bundle) -> Vec<PathBuf> {
    vec![
        disks.runtime.clone(),
        Stamp::path(&disks.runtime),
        store.packed_dir().join(RUNTIME_INDEX),
        disks.bundle.clone(),
        Stamp::path(&disks.bundle),
        bundle.dir.join(MANIFEST_FILE),
    ]
}

/// What a carrier needs so that agents with a model work inside it: every installed bundle's
/// disks (built here if stale) and manifest, and the program that builds a disk for a bundle
/// added inside. Nothing when no bundle is installed.
pub fn carrier_files(
    store: &ModelStore,
    base_libraries: &[String],
) -> Result<Vec<PathBuf>, ModelError> {
    let (bundles, _) = store.list();
    let mut files = Vec::new();
    for bundle in &bundles {
        let disks = model_disks(store, bundle, base_libraries)?;
        files.extend(carrier_copies(store, &disks, bundle));
    }
    if !files.is_empty()
        && let Some(mkfs) = find_program(MKFS)
    {
        files.push(mkfs);
    }
    files.sort();
    files.dedup();
    Ok(files)
}

/// The inference worker, `agentos-infer`, next to this binary.
fn worker_path() -> PathBuf {
    std::env::current_exe()
        .map(|exe| exe.with_file_name("agentos-infer"))
        .unwrap_or_else(|_| PathBuf::from("agentos-infer"))
}

fn find_program(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// The runtime disk: the current one when it is up to date (or when this host lacks what it is
/// built from, as a carrier does, and it has what `onnx` needs), else a new one.
fn runtime_disk(
    store: &ModelStore,
    onnx: bool,
    base_libraries: &[String],
    worker: &Path,
) -> Result<PathBuf, ModelError> {
    let packed = store.packed_dir();
    let library = store.runtime_library();
    let usable = |index: &RuntimeIndex| (index.onnx || !onnx) && built(&packed.join(&index.image));
    let as_it_is = |missing: ModelError| match read_index(&packed) {
        Some(index) if usable(&index) => Ok(packed.join(index.image)),
        _ => Err(missing),
    };
    if !worker.is_file() {
        return as_it_is(ModelError::NoWorker {
            path: worker.to_owned(),
        });
    }
    let runtime = library.is_file().then_some(library.as_path());
    if onnx && runtime.is_none() {
        return as_it_is(ModelError::NoRuntime { path: library });
    }
    let mut key = key_start(base_libraries);
    for program in [Some(worker), runtime].into_iter().flatten() {
        key.update(program.as_os_str().as_encoded_bytes());
        let meta = fs::metadata(program).ok();
        key.update(meta.as_ref().map_or(0, fs::Metadata::len).to_le_bytes());
        key.update(meta.as_ref().map_or(0, mtime_ns).to_le_bytes());
    }
    let key = hex(&key.finalize());
    let current = |index: Option<RuntimeIndex>| {
        index.filter(|index| index.key == key && built(&packed.join(&index.image)))
    };
    if let Some(index) = current(read_index(&packed)) {
        return Ok(packed.join(index.image));
    }
    let failed = |source: PackError| ModelError::Pack {
        what: "the runtime disk".to_owned(),
        source,
    };
    let _lock = BuildLock::take(&packed).map_err(failed)?;
    if let Some(index) = current(read_index(&packed)) {
        return Ok(packed.join(index.image));
    }
    let image = format!("{RUNTIME_PREFIX}{}{IMAGE_SUFFIX}", &key[..16]);
    build(&packed, &image, |staging| {
        let mut programs = vec![worker.to_owned()];
        place(worker, &in_disk(staging, GUEST_INFER_WORKER)?, EXEC_MODE)?;
        if let Some(runtime) = runtime {
            place(runtime, &in_disk(staging, GUEST_ONNXRUNTIME)?, EXEC_MODE)?;
            programs.push(runtime.to_owned());
        }
        // Where the guest mounts the bundles' disks.
        fs::create_dir_all(in_disk(staging, GUEST_MODELS_DIR)?)?;
        place_libraries(
            &programs,
            base_libraries,
            &in_disk(staging, GUEST_LIBRARY_DIR)?,
        )
    })
    .map_err(|e| match e {
        DiskError::Bundle(e) => e,
        DiskError::Pack(e) => failed(e),
    })?;
    let index = RuntimeIndex {
        key,
        image: image.clone(),
        onnx: runtime.is_some(),
    };
    let text = serde_json::to_vec_pretty(&index)
        .map_err(|e| failed(PackError::Io(io::Error::other(e))))?;
    let index_path = packed.join(RUNTIME_INDEX);
    crate::write_atomic(&index_path, &text)
        .map_err(|source| failed(PackError::path("write", &index_path, source)))?;
    remove_replaced(&packed, RUNTIME_PREFIX, &image);
    remove_archives(&packed);
    Ok(packed.join(image))
}

/// `bundle`'s disk, named by its manifest (which lists the SHA-256 of every file) and the agent
/// image's libraries: built when no disk of that name exists.
fn bundle_disk(
    store: &ModelStore,
    bundle: &Bundle,
    base_libraries: &[String],
) -> Result<PathBuf, ModelError> {
    let packed = store.packed_dir();
    let name = &bundle.manifest.name;
    let manifest_path = bundle.dir.join(MANIFEST_FILE);
    let manifest = fs::read(&manifest_path).map_err(|source| ModelError::Read {
        path: manifest_path,
        source,
    })?;
    let mut key = key_start(base_libraries);
    key.update(&manifest);
    let key = hex(&key.finalize());
    let prefix = bundle_prefix(name);
    let image = format!("{prefix}{}{IMAGE_SUFFIX}", &key[..16]);
    if built(&packed.join(&image)) {
        return Ok(packed.join(image));
    }
    let failed = |source: PackError| ModelError::Pack {
        what: format!("the disk of model `{name}`"),
        source,
    };
    let _lock = BuildLock::take(&packed).map_err(failed)?;
    if built(&packed.join(&image)) {
        return Ok(packed.join(image));
    }
    build(&packed, &image, |staging| {
        verify(&bundle.dir).map_err(DiskError::Bundle)?;
        let mut programs = Vec::new();
        for file in bundle
            .manifest
            .files
            .keys()
            .map(String::as_str)
            .chain([MANIFEST_FILE])
        {
            let source = bundle.dir.join(file);
            let program = file.starts_with("bin/");
            let mode = if program { EXEC_MODE } else { DATA_MODE };
            place(&source, &staging.join(file), mode)?;
            if program {
                programs.push(source);
            }
        }
        if !programs.is_empty() {
            place_libraries(&programs, base_libraries, &staging.join(MODEL_LIBRARY_DIR))?;
        }
        Ok(())
    })
    .map_err(|e| match e {
        DiskError::Bundle(e) => e,
        DiskError::Pack(e) => failed(e),
    })?;
    remove_replaced(&packed, &prefix, &image);
    Ok(packed.join(image))
}

/// Removes every disk of bundle `name` (when the bundle is removed).
pub fn remove_bundle_disks(store: &ModelStore, name: &str) {
    remove_replaced(&store.packed_dir(), &bundle_prefix(name), "");
}

/// Bundle names are letters, digits, `-`, `_` and `.`; the key is hex after the last `-`.
fn bundle_prefix(name: &str) -> String {
    format!("model-{name}-")
}

fn key_start(base_libraries: &[String]) -> Sha256 {
    let mut key = Sha256::new();
    key.update(DISK_FORMAT);
    key.update(base_libraries.join("\n"));
    key.update("\0");
    key
}

/// The JSON file at `path` (at most [`MAX_INDEX_BYTES`] read), if it reads as a `T`.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    use std::io::Read;
    let mut text = Vec::new();
    fs::File::open(path)
        .ok()?
        .take(MAX_INDEX_BYTES)
        .read_to_end(&mut text)
        .ok()?;
    serde_json::from_slice(&text).ok()
}

fn read_index(packed: &Path) -> Option<RuntimeIndex> {
    let index: RuntimeIndex = read_json(&packed.join(RUNTIME_INDEX))?;
    // The image is a file beside the index, nothing else.
    let plain = index.image.starts_with(RUNTIME_PREFIX)
        && index.image.ends_with(IMAGE_SUFFIX)
        && !index.image.contains('/');
    plain.then_some(index)
}

/// An exclusive lock on `<packed>/.disks.lock`, held while a disk is built.
pub(crate) struct BuildLock {
    _file: fs::File,
}

impl BuildLock {
    pub(crate) fn take(packed: &Path) -> Result<Self, PackError> {
        use std::os::fd::AsRawFd;
        fs::create_dir_all(packed).map_err(|e| PackError::path("create", packed, e))?;
        let path = packed.join(".disks.lock");
        let file = fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| PackError::path("open", &path, e))?;
        // SAFETY: flock only acts on the descriptor, which `file` keeps open.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(PackError::path("lock", &path, io::Error::last_os_error()));
        }
        Ok(Self { _file: file })
    }
}

/// Why a model disk could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("cannot {what} {}", .path.display())]
    Path {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot copy {} to {}", .from.display(), .to.display())]
    Copy {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot find the libraries of {}", .0.display())]
    Libraries(PathBuf, #[source] crate::LibsError),
    #[error("{} names no file", .0.display())]
    NoFileName(PathBuf),
    #[error("two libraries are called {name}: {} and {}", .first.display(), .second.display())]
    SameName {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("{0} is not under {GUEST_RUNTIME_DIR}")]
    NotInRuntime(String),
    #[error("{MKFS} is not installed; run `scripts/setup` (it installs erofs-utils)")]
    NoMkfs,
    #[error("cannot run {MKFS}")]
    Mkfs(#[source] io::Error),
    #[error("{MKFS} failed ({status}): {stderr}")]
    MkfsFailed { status: String, stderr: String },
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl PackError {
    fn path(what: &'static str, path: &Path, source: io::Error) -> Self {
        Self::Path {
            what,
            path: path.to_owned(),
            source,
        }
    }
}

pub(crate) enum DiskError {
    /// A bundle that fails its check: the store's own error.
    Bundle(ModelError),
    Pack(PackError),
}

impl<E: Into<PackError>> From<E> for DiskError {
    fn from(e: E) -> Self {
        Self::Pack(e.into())
    }
}

/// Lays the files out with `lay_out` in a staging directory, writes the image beside its final
/// name and renames it in. Whatever fails leaves nothing behind.
pub(crate) fn build<E: From<PackError>>(
    packed: &Path,
    image: &str,
    lay_out: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    crate::remove_stale_temporaries(packed, ".stage-");
    crate::remove_stale_temporaries(packed, &format!(".{image}.tmp-"));
    let pid = std::process::id();
    let staging = packed.join(format!(".stage-{pid}"));
    let partial = packed.join(format!(".{image}.tmp-{pid}"));
    let built = (|| -> Result<(), E> {
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging).map_err(PackError::from)?;
        lay_out(&staging)?;
        write_image(&staging, &partial)?;
        let stamp = Stamp::of(&partial).map_err(PackError::from)?;
        fs::rename(&partial, packed.join(image)).map_err(PackError::from)?;
        stamp.write(&packed.join(image)).map_err(PackError::from)?;
        Ok(())
    })();
    let _ = fs::remove_dir_all(&staging);
    if built.is_err() {
        let _ = fs::remove_file(&partial);
    }
    built
}

/// The libraries `programs` need beyond `base_libraries`, copied into `dir` by file name.
fn place_libraries(
    programs: &[PathBuf],
    base_libraries: &[String],
    dir: &Path,
) -> Result<(), DiskError> {
    let base: BTreeSet<&str> = base_libraries.iter().map(String::as_str).collect();
    let mut libraries = BTreeSet::new();
    for program in programs {
        let needed =
            needed_libraries(program).map_err(|e| PackError::Libraries(program.clone(), e))?;
        libraries.extend(
            needed
                .into_iter()
                .filter(|l| l.to_str().is_some_and(|l| !base.contains(l))),
        );
    }
    fs::create_dir_all(dir)?;
    let mut names = BTreeMap::new();
    for library in &libraries {
        let name = library
            .file_name()
            .ok_or_else(|| PackError::NoFileName(library.clone()))?;
        if let Some(other) = names.insert(name.to_owned(), library) {
            return Err(PackError::SameName {
                name: name.to_string_lossy().into_owned(),
                first: other.clone(),
                second: library.clone(),
            }
            .into());
        }
        place(library, &dir.join(name), DATA_MODE)?;
    }
    Ok(())
}

/// Where the guest path `guest` (under `/opt/agentos`) is in `staging`.
fn in_disk(staging: &Path, guest: &str) -> Result<PathBuf, PackError> {
    let relative = Path::new(guest)
        .strip_prefix(GUEST_RUNTIME_DIR)
        .map_err(|_| PackError::NotInRuntime(guest.to_owned()))?;
    Ok(staging.join(relative))
}

/// Copies `source` (through symlinks) to `to` with `mode`.
fn place(source: &Path, to: &Path, mode: u32) -> Result<(), PackError> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).map_err(|e| PackError::path("create", parent, e))?;
    }
    fs::copy(source, to).map_err(|e| PackError::Copy {
        from: source.to_owned(),
        to: to.to_owned(),
        source: e,
    })?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
        .map_err(|e| PackError::path("set the mode of", to, e))
}

/// Writes `dir` as a pmem region at `image` holding an uncompressed erofs image: files owned by
/// root, every time stamp zero, no extended attributes, so the same inputs give the same image.
fn write_image(dir: &Path, image: &Path) -> Result<(), PackError> {
    let mut fs_image = image.as_os_str().to_owned();
    fs_image.push(".fs");
    let fs_image = PathBuf::from(fs_image);
    let written = write_filesystem(dir, &fs_image).and_then(|()| {
        write_region(&fs_image, image)
            .map_err(|e| PackError::path("write the disk image", image, e))
    });
    let _ = fs::remove_file(&fs_image);
    written
}

/// Lays the erofs image `fs_image` out as a pmem region at `image`: the partition table, the
/// info block, the file system at its data offset, zeros to a whole number of subsections. The
/// region is named by the file system's SHA-256, taken as it is copied.
fn write_region(fs_image: &Path, image: &Path) -> io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::FileExt;

    /// Writes to the image and hashes what it writes.
    struct Hashed<'a>(&'a mut fs::File, Sha256);
    impl Write for Hashed<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = self.0.write(buf)?;
            self.1.update(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.0.flush()
        }
    }

    let mut out = fs::File::create(image)?;
    out.seek(SeekFrom::Start(layout::DATA_OFFSET))?;
    let mut hashed = Hashed(&mut out, Sha256::new());
    let fs_bytes = io::copy(&mut fs::File::open(fs_image)?, &mut hashed)?;
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&hashed.1.finalize()[..16]);
    let region = layout::region_bytes(fs_bytes);
    out.write_all_at(&layout::partition_table(region), 0)?;
    out.write_all_at(&layout::info_block(region, uuid), layout::INFO_OFFSET)?;
    out.set_len(region)?;
    out.sync_all()
}

/// Writes `dir` as an erofs image at `fs_image` with `mkfs.erofs`.
fn write_filesystem(dir: &Path, fs_image: &Path) -> Result<(), PackError> {
    let output = Command::new(MKFS)
        // No file's tail packed into its inode: erofs maps only wholly block-laid files with DAX,
        // and every other file would be read into each guest's page cache.
        .args(["--quiet", "--all-root", "-T0", "-x-1", "-Enoinline_data"])
        .arg(fs_image)
        .arg(dir)
        .output()
        .map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                PackError::NoMkfs
            } else {
                PackError::Mkfs(e)
            }
        })?;
    if !output.status.success() {
        return Err(PackError::MkfsFailed {
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// What an image was when it was built: its SHA-256 and size, and the modification time at
/// which its contents were last seen to hash to that, in `<image>.sha256` beside it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Stamp {
    sha256: String,
    size: u64,
    mtime_ns: u128,
}

impl Stamp {
    fn of(image: &Path) -> io::Result<Self> {
        let mut hasher = Sha256::new();
        let size = io::copy(&mut fs::File::open(image)?, &mut hasher)?;
        Ok(Self {
            sha256: hex(&hasher.finalize()),
            size,
            mtime_ns: mtime_ns(&fs::metadata(image)?),
        })
    }

    pub(crate) fn path(image: &Path) -> PathBuf {
        let mut name = image.as_os_str().to_owned();
        name.push(".sha256");
        PathBuf::from(name)
    }

    fn read(image: &Path) -> Option<Self> {
        read_json(&Self::path(image))
    }

    fn write(&self, image: &Path) -> io::Result<()> {
        let text = serde_json::to_vec(self).map_err(io::Error::other)?;
        crate::write_atomic(&Self::path(image), &text)
    }
}

fn mtime_ns(meta: &fs::Metadata) -> u128 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos())
}

/// Whether `image` was built whole: it and its stamp are there.
pub(crate) fn built(image: &Path) -> bool {
    image.is_file() && Stamp::path(image).is_file()
}

/// erofs's superblock: its magic, little-endian, at this offset.
const EROFS_MAGIC: u32 = 0xe0f5_e1e2;
const EROFS_SUPERBLOCK_OFFSET: u64 = 1024;
const EROFS_BLOCK: u64 = 4096;

/// Checks a disk image before a VM gets it: a pmem region (a whole number of 2 MiB
/// subsections, a valid info block) holding an erofs file system at its data offset.
pub fn check_filesystem(image: &Path) -> Result<(), ModelError> {
    use std::os::unix::fs::FileExt;
    let bad = |why: String| ModelError::BadDisk {
        path: image.to_owned(),
        why,
    };
    let file = fs::File::open(image).map_err(|source| ModelError::Read {
        path: image.to_owned(),
        source,
    })?;
    let size = file.metadata().map_or(0, |m| m.len());
    if size < layout::DATA_OFFSET + EROFS_BLOCK || !size.is_multiple_of(layout::REGION_ALIGN) {
        return Err(bad(format!(
            "{size} bytes is not a whole number of 2 MiB subsections holding a file system"
        )));
    }
    let mut info = [0u8; layout::INFO_BYTES];
    file.read_exact_at(&mut info, layout::INFO_OFFSET)
        .map_err(|e| bad(e.to_string()))?;
    if !layout::is_valid(&info) {
        return Err(bad("it has no valid pmem info block".to_owned()));
    }
    let mut magic = [0u8; 4];
    file.read_exact_at(&mut magic, layout::DATA_OFFSET + EROFS_SUPERBLOCK_OFFSET)
        .map_err(|e| bad(e.to_string()))?;
    if u32::from_le_bytes(magic) != EROFS_MAGIC {
        return Err(bad("it holds no erofs file system".to_owned()));
    }
    Ok(())
}

/// The least a model disk is (for tests of what holds one): one page of file system past the
/// data offset, with the info block and the erofs magic.
pub fn least_image() -> Vec<u8> {
    let size = layout::region_bytes(EROFS_BLOCK);
    let mut bytes = vec![0u8; size as usize];
    bytes[layout::INFO_OFFSET as usize..][..layout::INFO_BYTES]
        .copy_from_slice(&layout::info_block(size, [1; 16]));
    let magic = (layout::DATA_OFFSET + EROFS_SUPERBLOCK_OFFSET) as usize;
    bytes[magic..magic + 4].copy_from_slice(&EROFS_MAGIC.to_le_bytes());
    bytes
}

/// Checks a disk image of the store against the stamp written when it was built: its size, its
/// file system, and (when it was modified since it was last hashed) its SHA-256.
pub(crate) fn check_image(image: &Path) -> Result<(), ModelError> {
    let bad = |why: String| ModelError::BadDisk {
        path: image.to_owned(),
        why,
    };
    let stamp = Stamp::read(image).ok_or_else(|| bad("its .sha256 stamp is unreadable".into()))?;
    let meta = fs::metadata(image).map_err(|source| ModelError::Read {
        path: image.to_owned(),
        source,
    })?;
    if meta.len() != stamp.size {
        return Err(bad(format!(
            "it holds {} bytes, {} when it was built",
            meta.len(),
            stamp.size
        )));
    }
    check_filesystem(image)?;
    if mtime_ns(&meta) != stamp.mtime_ns {
        // Copied (a carrier's copies have no time stamps) or changed: hash it whole.
        let now = Stamp::of(image).map_err(|source| ModelError::Read {
            path: image.to_owned(),
            source,
        })?;
        if now.sha256 != stamp.sha256 {
            return Err(bad(format!(
                "its SHA-256 is {}, {} when it was built",
                now.sha256, stamp.sha256
            )));
        }
        // Hashed whole now: later uses need not.
        let _ = now.write(image);
    }
    Ok(())
}

/// Removes the cpio archives (and their `.key` files) that agents with a model booted with before
/// they had disks.
fn remove_archives(packed: &Path) {
    let Ok(entries) = fs::read_dir(packed) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let archive = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("cpio" | "key")
        );
        if archive && entry.file_type().is_ok_and(|t| t.is_file()) {
            let _ = fs::remove_file(path);
        }
    }
}

/// Removes the images named `<prefix>...img` other than `current`.
pub(crate) fn remove_replaced(packed: &Path, prefix: &str, current: &str) {
    let Ok(entries) = fs::read_dir(packed) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let key = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(IMAGE_SUFFIX));
        // The key is hex: `model-a-` must not take the disks of `model-a-b`.
        let ours = key.is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_hexdigit()));
        if ours && name != current {
            let _ = fs::remove_file(Stamp::path(&entry.path()));
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests;
