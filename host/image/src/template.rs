//! Templates: what an agent gets beyond the agent image, named when it is spawned.
//!
//! `base` gives an agent GNU bash and CPython with its standard library, from Debian's own
//! packages (pinned by apt like the image's kernel), on one read-only erofs disk that every base
//! agent maps from the host's page cache (a virtio-pmem region with DAX, laid out like the model
//! disks): one copy on the host however many agents use it, none in the guests, and nothing
//! added to the boot of an agent without the template. The guest agent mounts the disk at
//! [`GUEST_BASE_DIR`] and links what it holds into the root file system wherever the image has
//! nothing of that name (`/bin/bash`, `/usr/bin/python3`, `/usr/lib/python3.11`, the libraries
//! in `/lib/x86_64-linux-gnu`): every file is at the path Debian built it for, so the programs
//! and their loader find them without a search path.
//!
//! ```text
//! <cache>/packed/base-<key>.img   the disk, named by its packages and the agent image's initrd
//! <cache>/packed/base.json        which disk is current
//! ```
//!
//! The image's glibc comes from the host that built it, so the disk leaves glibc out and takes
//! the glibc libraries its programs need beyond `libc.so.6` (`libm.so.6`) from the same host:
//! they must match the image's `libc.so.6` exactly. That is why the initrd's digest is part of
//! the key. The standard library is compiled once, at build time, into `.pyc` files that are
//! never checked against their sources (the disk is read-only and its time stamps are zero).

use std::collections::{BTreeSet, VecDeque};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::apt::{AptError, Deb, Packages};
use crate::elf::Elf;
use crate::hex;
use crate::manifest::Manifest;
use crate::model::disk::{
    BuildLock, PackError, Stamp, build, built, check_image, read_json, remove_replaced,
};
use crate::model::{ModelError, ModelStore};

/// The template with bash and python3.
pub const BASE_TEMPLATE: &str = "base";
/// Every template an agent may be spawned with.
pub const TEMPLATES: &[&str] = &[BASE_TEMPLATE];
/// Where the guest agent mounts the base disk.
pub const GUEST_BASE_DIR: &str = "/opt/base";
/// The guest's kernel parameter naming the base disk's device (`agentos.base=pmem0`).
pub const BASE_DISK_PARAM: &str = "agentos.base";

/// Bumped when the disk's layout changes, so old ones are rebuilt.
const DISK_FORMAT: &str = "base-disk-1";
const INDEX: &str = "base.json";
const IMAGE_PREFIX: &str = "base-";
const IMAGE_SUFFIX: &str = ".img";

/// bash and CPython 3.11 with the libraries their programs and the standard library's modules
/// load, as Debian 12 splits them; glibc is the image's (see the module's note). `nis` is the
/// one module left out: its libraries (`libnsl2`, `libtirpc3`) pull in Kerberos.
const BASE_PACKAGES: &[&str] = &[
    "bash",
    "libtinfo6",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "python3-minimal",
    "python-is-python3",
    "media-types",
    "libexpat1",
    "zlib1g",
    "libssl3",
    "libffi8",
    "libbz2-1.0",
    "liblzma5",
    "libsqlite3-0",
    "libreadline8",
    "readline-common",
    "libncursesw6",
    "libuuid1",
    "libcrypt1",
    "libdb5.3",
];

/// What the packages hold that no program reads.
const PRUNED: &[&str] = &[
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/lintian",
    "usr/share/locale",
    "usr/share/bug",
    "usr/share/menu",
];

/// The Python that compiles the standard library, and the directory it compiles.
const PYTHON: &str = "usr/bin/python3.11";
const STDLIB: &str = "usr/lib/python3.11";

/// Where the guest's loader looks for libraries (it has no cache): the disk's own, then these,
/// where this host's glibc is.
const LIBRARY_DIRS: &[&str] = &["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"];
const HOST_LIBRARY_DIRS: &[&str] = &["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu"];

/// glibc's libraries besides `libc.so.6` and the loader: taken from this host, like the image's.
const GLIBC_LIBRARIES: &[&str] = &[
    "libm.so.6",
    "libmvec.so.1",
    "libresolv.so.2",
    "libpthread.so.0",
    "libdl.so.2",
    "librt.so.1",
    "libutil.so.1",
    "libanl.so.1",
    "libBrokenLocale.so.1",
    "libnss_files.so.2",
    "libnss_dns.so.2",
];

/// Where programs are, whose every library must be found.
const PROGRAM_DIRS: &[&str] = &["bin/", "usr/bin/", "sbin/", "usr/sbin/"];

/// A template an agent may be spawned with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Template {
    /// bash, python3 and the `user` account.
    Base,
}

impl Template {
    pub fn name(self) -> &'static str {
        match self {
            Self::Base => BASE_TEMPLATE,
        }
    }
}

impl FromStr for Template {
    type Err = TemplateError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            BASE_TEMPLATE => Ok(Self::Base),
            _ => Err(TemplateError::Unknown {
                name: agentos_protocol::clip(name, 80),
            }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("unknown template `{name}`; the known templates are: {}", TEMPLATES.join(", "))]
    Unknown { name: String },
    #[error("cannot get the Debian packages of the `base` template")]
    Packages(#[from] AptError),
    #[error("cannot build the disk of the `base` template")]
    Pack(#[from] PackError),
    #[error(
        "{program} needs {library}, which neither the `base` template's packages nor the agent image hold"
    )]
    NoLibrary { program: String, library: String },
    #[error("cannot compile Python's standard library with {}: {why}", .python.display())]
    Compile { python: PathBuf, why: String },
    #[error(
        "the `base` template's disk is not built; run `scripts/setup` or `agentos image build --image base`"
    )]
    NotBuilt,
    #[error(transparent)]
    Disk(Box<ModelError>),
}

/// Which base disk is current.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct Index {
    key: String,
    /// File name of the image, beside the index.
    image: String,
}

/// Builds the base disk for agents of `image` (the agent image's manifest), or does nothing when
/// it is up to date; `refresh` asks apt for its newest packages instead of the pinned ones.
pub fn build_base_disk(
    cache: &Path,
    image: &Manifest,
    refresh: bool,
) -> Result<PathBuf, TemplateError> {
    let mut packages = Packages::open(cache)?;
    let debs = packages.locate_all(BASE_PACKAGES, refresh)?;
    up_to_date(cache, &mut packages, &debs, image)
}

/// The base disk for agents of `image`: the current one, rebuilt first when it is stale and the
/// pinned packages are here (never asking apt), or the one there is as it is on a host without
/// them (a carrier, which gets a copy).
pub fn base_disk(cache: &Path, image: &Manifest) -> Result<PathBuf, TemplateError> {
    let packed = ModelStore::new(cache).packed_dir();
    let pinned = Packages::open(cache)
        .ok()
        .and_then(|packages| Some((packages.pinned_all(BASE_PACKAGES)?, packages)));
    if let Some((debs, mut packages)) = pinned {
        return up_to_date(cache, &mut packages, &debs, image);
    }
    let index = read_index(&packed).ok_or(TemplateError::NotBuilt)?;
    let path = packed.join(index.image);
    if !built(&path) {
        return Err(TemplateError::NotBuilt);
    }
    check_image(&path).map_err(|e| TemplateError::Disk(Box::new(e)))?;
    Ok(path)
}

/// What a carrier needs so that base agents work inside it: the disk (brought up to date first)
/// with its stamp and index. Nothing when the agent image or the disk was never built here.
pub fn carrier_files(cache: &Path) -> Vec<PathBuf> {
    let Ok(img) = crate::find_image(cache, crate::AGENT_IMAGE) else {
        return Vec::new();
    };
    match base_disk(cache, &img.manifest) {
        Ok(disk) => vec![
            Stamp::path(&disk),
            disk,
            ModelStore::new(cache).packed_dir().join(INDEX),
        ],
        Err(err) => {
            tracing::debug!("no base disk for the carrier: {err}");
            Vec::new()
        }
    }
}

fn read_index(packed: &Path) -> Option<Index> {
    let index: Index = read_json(&packed.join(INDEX))?;
    // The image is a file beside the index, nothing else.
    let plain = index.image.starts_with(IMAGE_PREFIX)
        && index.image.ends_with(IMAGE_SUFFIX)
        && !index.image.contains('/');
    plain.then_some(index)
}

/// The disk of `debs` for `image`, built when the current one is of other inputs.
fn up_to_date(
    cache: &Path,
    packages: &mut Packages,
    debs: &[Deb],
    image: &Manifest,
) -> Result<PathBuf, TemplateError> {
    let packed = ModelStore::new(cache).packed_dir();
    let key = disk_key(debs, image);
    let current = || {
        read_index(&packed)
            .filter(|index| index.key == key && built(&packed.join(&index.image)))
            .map(|index| packed.join(index.image))
    };
    let checked = |path: PathBuf| {
        check_image(&path).map_err(|e| TemplateError::Disk(Box::new(e)))?;
        Ok(path)
    };
    if let Some(path) = current() {
        return checked(path);
    }
    let _lock = BuildLock::take(&packed)?;
    if let Some(path) = current() {
        return checked(path);
    }
    packages.download_all(debs)?;
    let name = format!("{IMAGE_PREFIX}{}{IMAGE_SUFFIX}", &key[..16]);
    tracing::info!(disk = name, "building the base template's disk");
    build(&packed, &name, |staging| {
        lay_out(packages, debs, staging, &image.libraries)
    })?;
    let index = serde_json::to_vec_pretty(&Index {
        key,
        image: name.clone(),
    })
    .map_err(|e| PackError::Io(io::Error::other(e)))?;
    let index_path = packed.join(INDEX);
    crate::write_atomic(&index_path, &index).map_err(|source| PackError::Path {
        what: "write",
        path: index_path,
        source,
    })?;
    remove_replaced(&packed, IMAGE_PREFIX, &name);
    Ok(packed.join(name))
}

/// Named by the disk's format, the package files and the agent image's initrd (whose glibc the
/// disk's glibc libraries must match).
fn disk_key(debs: &[Deb], image: &Manifest) -> String {
    let mut key = Sha256::new();
    key.update(DISK_FORMAT);
    for deb in debs {
        key.update(deb.file_name());
        key.update("\n");
    }
    key.update(&image.initrd.sha256);
    key.update(image.libraries.join("\n"));
    hex(&key.finalize())
}

/// The disk's tree in `staging`: the packages unpacked over each other, what no program reads
/// taken out, the glibc libraries they need from this host, the standard library compiled.
fn lay_out(
    packages: &Packages,
    debs: &[Deb],
    staging: &Path,
    image_libraries: &[String],
) -> Result<(), TemplateError> {
    for deb in debs {
        packages.extract_into(deb, staging)?;
    }
    for dir in PRUNED {
        if let Err(e) = fs::remove_dir_all(staging.join(dir))
            && e.kind() != io::ErrorKind::NotFound
        {
            return Err(PackError::Io(e).into());
        }
    }
    supply_libraries(staging, image_libraries)?;
    compile_stdlib(staging)
}

/// Copies into the disk the glibc libraries its objects need from this host, and checks that
/// every program finds all it needs in the disk or the image. A module of the standard library
/// that needs what neither holds is taken out (Python then says there is no such module).
fn supply_libraries(staging: &Path, image_libraries: &[String]) -> Result<(), TemplateError> {
    let target = staging.join(LIBRARY_DIRS[0]);
    fs::create_dir_all(&target).map_err(PackError::Io)?;
    let mut have: BTreeSet<String> = image_libraries
        .iter()
        .filter_map(|l| Path::new(l).file_name()?.to_str().map(str::to_owned))
        .collect();
    for dir in LIBRARY_DIRS {
        if let Ok(entries) = fs::read_dir(staging.join(dir)) {
            have.extend(
                entries
                    .filter_map(Result::ok)
                    .filter_map(|e| e.file_name().into_string().ok()),
            );
        }
    }
    let mut queue: VecDeque<PathBuf> = elf_files(staging)?.into();
    while let Some(object) = queue.pop_front() {
        let bytes = fs::read(&object).map_err(PackError::Io)?;
        let Ok(needed) = Elf::parse(&bytes).and_then(|elf| elf.dynamic()) else {
            continue;
        };
        for library in needed.needed {
            if have.contains(&library) {
                continue;
            }
            let host = GLIBC_LIBRARIES
                .contains(&library.as_str())
                .then(|| {
                    HOST_LIBRARY_DIRS
                        .iter()
                        .map(|dir| Path::new(dir).join(&library))
                        .find(|path| path.is_file())
                })
                .flatten();
            if let Some(host) = host {
                let copy = target.join(&library);
                fs::copy(&host, &copy).map_err(|source| PackError::Copy {
                    from: host,
                    to: copy.clone(),
                    source,
                })?;
                have.insert(library);
                queue.push_back(copy);
                continue;
            }
            let relative = object.strip_prefix(staging).unwrap_or(&object);
            let shown = relative.display().to_string();
            if PROGRAM_DIRS.iter().any(|dir| shown.starts_with(dir)) {
                return Err(TemplateError::NoLibrary {
                    program: format!("/{shown}"),
                    library,
                });
            }
            tracing::debug!(object = shown, library, "left out: a library is missing");
            fs::remove_file(&object).map_err(PackError::Io)?;
            break;
        }
    }
    Ok(())
}

/// The regular files under `dir` that start as ELF files do.
fn elf_files(dir: &Path) -> Result<Vec<PathBuf>, PackError> {
    use std::io::Read;
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(dir) = dirs.pop() {
        let mut entries: Vec<_> = fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(fs::DirEntry::file_name);
        for entry in entries {
            let kind = entry.file_type()?;
            if kind.is_dir() {
                dirs.push(entry.path());
            } else if kind.is_file() {
                let mut magic = [0u8; 4];
                let is_elf = fs::File::open(entry.path())
                    .and_then(|mut f| f.read_exact(&mut magic))
                    .is_ok()
                    && magic == *b"\x7fELF";
                if is_elf {
                    found.push(entry.path());
                }
            }
        }
    }
    Ok(found)
}

/// Compiles the standard library with the disk's own Python, into `.pyc` files checked by
/// nothing but their presence, their paths in tracebacks the guest's.
fn compile_stdlib(staging: &Path) -> Result<(), TemplateError> {
    let python = staging.join(PYTHON);
    let failed = |why: String| TemplateError::Compile {
        python: python.clone(),
        why,
    };
    let library_path = LIBRARY_DIRS
        .iter()
        .map(|dir| staging.join(dir).display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let output = Command::new(&python)
        .env_clear()
        .env("LD_LIBRARY_PATH", library_path)
        .args(["-E", "-s", "-m", "compileall", "-q", "-j0"])
        .args(["--invalidation-mode", "unchecked-hash", "-s"])
        .arg(staging)
        .args(["-p", "/"])
        .arg(staging.join(STDLIB))
        .output()
        .map_err(|e| failed(e.to_string()))?;
    if !output.status.success() {
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        let last = text.lines().rev().find(|l| !l.trim().is_empty());
        return Err(failed(format!(
            "{} ({})",
            last.unwrap_or("no message"),
            output.status
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_known_by_name_and_others_refused_with_the_known_ones() {
        assert_eq!("base".parse::<Template>().unwrap(), Template::Base);
        assert_eq!(Template::Base.name(), "base");
        let err = "ubuntu".parse::<Template>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown template `ubuntu`; the known templates are: base"
        );
        assert!("Base".parse::<Template>().is_err());
        assert!("".parse::<Template>().is_err());
    }

    #[test]
    fn the_index_names_only_a_disk_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let write = |image: &str| {
            let text = serde_json::json!({"key": "k", "image": image}).to_string();
            fs::write(dir.path().join(INDEX), text).unwrap();
        };
        write("base-0123.img");
        assert_eq!(read_index(dir.path()).unwrap().image, "base-0123.img");
        for bad in ["../base-0123.img", "base-0123.img/x.img", "runtime-0.img"] {
            write(bad);
            assert_eq!(read_index(dir.path()), None, "{bad}");
        }
    }

    #[test]
    fn a_carrier_without_the_disk_or_its_packages_is_told_how_to_build_it() {
        let cache = tempfile::tempdir().unwrap();
        let image: Manifest = serde_json::from_value(serde_json::json!({
            "format": 1, "name": "agent", "inputs_key": "k",
            "kernel": {"package": "k", "version": "1", "release": "r", "deb": "k_1_amd64.deb"},
            "busybox": {"package": "b", "version": "1", "deb": "b_1_amd64.deb"},
            "guest_agent": {"size": 1, "sha256": "00"},
            "modules": [], "libraries": [],
            "vmlinuz": {"size": 1, "sha256": "00"},
            "initrd": {"size": 1, "sha256": "00"},
        }))
        .unwrap();
        let err = base_disk(cache.path(), &image).unwrap_err();
        assert!(matches!(err, TemplateError::NotBuilt), "{err}");
        assert!(err.to_string().contains("agentos image build --image base"));
    }

    #[test]
    fn elf_files_are_found_by_their_magic() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("usr/lib")).unwrap();
        fs::write(dir.path().join("usr/lib/a.so"), b"\x7fELF....").unwrap();
        fs::write(dir.path().join("usr/lib/b.py"), b"print(1)").unwrap();
        fs::write(dir.path().join("c"), b"\x7fEL").unwrap();
        std::os::unix::fs::symlink("a.so", dir.path().join("usr/lib/d.so")).unwrap();
        assert_eq!(
            elf_files(dir.path()).unwrap(),
            [dir.path().join("usr/lib/a.so")]
        );
    }
}
