//! Builds one image: packages → kernel, modules, busybox and guest agent → `vmlinuz`,
//! `initrd.cpio` and `manifest.json` in `<cache>/images/<name>/`.
//!
//! A build first computes the image's inputs key (spec, package files, guest agent bytes); when the
//! manifest already there records the same key and its files are intact, nothing else happens.
//! Otherwise the new files are written under temporary names, the old manifest is removed, the
//! files are renamed into place, and the new manifest is written last: at every moment the
//! directory holds either a complete image or no manifest at all.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::apt::{AptError, Deb, Packages};
use super::cpio::{CpioError, CpioTree};
use super::kmod::{KmodError, Module, ModuleTree};
use super::libs::{self, LibsError};
use super::manifest::{
    FileDigest, KernelPackage, MANIFEST_FILE, MANIFEST_FORMAT, Manifest, ManifestError, Package,
    inputs_key,
};
use super::spec::{INIT_CONFIG_PATH, ImageSpec, MODULES_DIR};
use super::vmlinux;
use super::{hex, remove_stale_temporaries, temporary_path};

pub const VMLINUZ_FILE: &str = "vmlinuz";
/// The ELF kernel unpacked from `vmlinuz`, in images whose spec asks for it.
pub const VMLINUX_FILE: &str = "vmlinux";
pub const INITRD_FILE: &str = "initrd.cpio";
const IMAGES_DIR: &str = "images";

const INIT_PATH: &str = "/init";
const BUSYBOX_PATH: &str = "/bin/busybox";
const EXECUTABLE_MODE: u32 = 0o755;
const DATA_MODE: u32 = 0o644;
const MIB: f64 = 1024.0 * 1024.0;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "cannot read the guest agent binary {path}; build it with `cargo build -p agentos-guest`"
    )]
    GuestAgent {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot get the image's Debian packages")]
    Packages(#[from] AptError),
    #[error(
        "package {package} holds no boot/vmlinuz-<release> with lib/modules/<release>; name a Debian kernel image package in the image spec"
    )]
    NoKernel { package: String },
    #[error("cannot collect the kernel modules of the {image} image")]
    Modules {
        image: String,
        #[source]
        source: KmodError,
    },
    #[error("cannot collect the shared libraries of the guest agent")]
    Libraries(#[from] LibsError),
    #[error("cannot run {path} --list-full to list busybox applets")]
    Applets {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} --list-full failed ({status}); delete the extracted busybox package and build again"
    )]
    AppletsFailed { path: PathBuf, status: String },
    #[error("cannot encode the guest agent's init.json")]
    InitConfig(#[source] serde_json::Error),
    #[error("cannot assemble the initrd")]
    Initrd(#[from] CpioError),
    #[error(
        "cannot copy the kernel from {from}; delete the extracted kernel package and build again"
    )]
    CopyKernel {
        from: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(
        "the {name} image is not built in {dir}; run `scripts/setup` or `agentos image build {name}`"
    )]
    NotBuilt { name: String, dir: PathBuf },
    #[error(
        "the {name} image in {dir} is incomplete ({file} is missing or has the wrong size); run `agentos image build {name}`"
    )]
    Incomplete {
        name: String,
        dir: PathBuf,
        file: String,
    },
}

pub struct BuildOptions {
    /// The guest agent binary; it becomes `/init`, and its shared libraries come along.
    pub guest_agent: PathBuf,
    /// Ask apt for its newest packages instead of reusing the ones an earlier build pinned.
    pub refresh_packages: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    pub dir: PathBuf,
    pub vmlinuz: PathBuf,
    /// The unpacked ELF kernel, when the image has one.
    pub vmlinux: Option<PathBuf>,
    pub initrd: PathBuf,
    pub manifest: Manifest,
    /// False when the image was already up to date and nothing was written.
    pub rebuilt: bool,
}

/// Progress of a build, for the CLI to print one line each (`Display` gives `[3/6] extracting …`).
/// Steps of one kind may repeat (one download per package); an up-to-date image goes from the
/// first step straight to the last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Resolving {
        packages: Vec<String>,
    },
    Downloading {
        package: String,
        version: String,
        cached: bool,
    },
    Extracting {
        package: String,
        cached: bool,
    },
    Collecting {
        kernel_release: String,
    },
    Writing {
        path: PathBuf,
    },
    Built {
        image: String,
        vmlinuz_bytes: u64,
        initrd_bytes: u64,
    },
    UpToDate {
        image: String,
    },
}

impl Step {
    pub const COUNT: usize = 6;

    pub fn number(&self) -> usize {
        match self {
            Step::Resolving { .. } => 1,
            Step::Downloading { .. } => 2,
            Step::Extracting { .. } => 3,
            Step::Collecting { .. } => 4,
            Step::Writing { .. } => 5,
            Step::Built { .. } | Step::UpToDate { .. } => 6,
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}/{}] ", self.number(), Self::COUNT)?;
        match self {
            Step::Resolving { packages } => write!(f, "resolving {}", packages.join(" and ")),
            Step::Downloading {
                package,
                version,
                cached: false,
            } => write!(f, "downloading {package} {version}"),
            Step::Downloading {
                package, version, ..
            } => write!(f, "{package} {version} is already downloaded"),
            Step::Extracting {
                package,
                cached: false,
            } => write!(f, "extracting {package}"),
            Step::Extracting { package, .. } => write!(f, "{package} is already extracted"),
            Step::Collecting { kernel_release } => write!(
                f,
                "collecting modules for kernel {kernel_release}, busybox applets and libraries"
            ),
            Step::Writing { path } => write!(f, "writing {}", path.display()),
            Step::Built {
                image,
                vmlinuz_bytes,
                initrd_bytes,
            } => write!(
                f,
                "{image} image built: kernel {:.1} MiB, initrd {:.1} MiB",
                *vmlinuz_bytes as f64 / MIB,
                *initrd_bytes as f64 / MIB
            ),
            Step::UpToDate { image } => write!(f, "{image} image is up to date"),
        }
    }
}

pub fn image_dir(cache: &Path, name: &str) -> PathBuf {
    cache.join(IMAGES_DIR).join(name)
}

/// Builds the image `spec` describes into `cache`, or does nothing when it is up to date.
pub fn build_image(
    spec: &ImageSpec,
    cache: &Path,
    options: &BuildOptions,
    progress: &mut dyn FnMut(&Step),
) -> Result<BuiltImage, ImageError> {
    let started = Instant::now();
    let agent = fs::read(&options.guest_agent).map_err(|source| ImageError::GuestAgent {
        path: options.guest_agent.clone(),
        source,
    })?;
    let agent_digest = FileDigest::of(&agent);

    progress(&Step::Resolving {
        packages: vec![spec.kernel_package.clone(), spec.busybox_package.clone()],
    });
    let mut packages = Packages::open(cache)?;
    let kernel_deb = packages.locate_kernel(&spec.kernel_package, options.refresh_packages)?;
    let busybox_deb = packages.locate(&spec.busybox_package, options.refresh_packages)?;
    let key = inputs_key(
        spec,
        kernel_deb.file_name(),
        busybox_deb.file_name(),
        &agent_digest,
    )?;
    let dir = image_dir(cache, &spec.name);
    if let Some(image) = up_to_date(&dir, &spec.name, &key) {
        tracing::debug!(image = spec.name, elapsed = ?started.elapsed(), "up to date");
        progress(&Step::UpToDate {
            image: spec.name.clone(),
        });
        return Ok(image);
    }

    for deb in [&kernel_deb, &busybox_deb] {
        progress(&Step::Downloading {
            package: deb.package.clone(),
            version: deb.version.clone(),
            cached: deb.is_downloaded(),
        });
        packages.download(deb)?;
    }
    let mut extract = |deb: &Deb| {
        progress(&Step::Extracting {
            package: deb.package.clone(),
            cached: packages.is_extracted(deb),
        });
        packages.extract(deb)
    };
    let kernel_root = extract(&kernel_deb)?;
    let busybox_root = extract(&busybox_deb)?;
    let kernel = KernelFiles::find(&kernel_root).ok_or_else(|| ImageError::NoKernel {
        package: kernel_deb.package.clone(),
    })?;

    progress(&Step::Collecting {
        kernel_release: kernel.release.clone(),
    });
    let modules_error = |source| ImageError::Modules {
        image: spec.name.clone(),
        source,
    };
    let modules = ModuleTree::open(&kernel.modules_dir)
        .and_then(|tree| tree.closure(&spec.modules))
        .map_err(modules_error)?;
    let libraries = libs::needed_libraries(&options.guest_agent)?;
    let busybox = busybox_root.join(BUSYBOX_PATH.trim_start_matches('/'));
    let applets = busybox_applets(&busybox)?;
    let tree = initrd_tree(
        spec,
        InitrdContents {
            agent,
            libraries: &libraries,
            modules: &modules,
            busybox: &busybox,
            applets: &applets,
        },
    )?;

    fs::create_dir_all(&dir).map_err(|source| write_error(&dir, source))?;
    remove_stale_temporaries(&dir, ".");
    let initrd_path = dir.join(INITRD_FILE);
    progress(&Step::Writing {
        path: initrd_path.clone(),
    });
    let initrd = Staged::new(&initrd_path);
    let initrd_digest = initrd.fill(|out| tree.write(out).map_err(ImageError::from))?;
    let vmlinuz = Staged::new(&dir.join(VMLINUZ_FILE));
    let vmlinuz_digest = vmlinuz.fill(|mut out| {
        let copy_error = |source| ImageError::CopyKernel {
            from: kernel.vmlinuz.clone(),
            source,
        };
        let mut source = File::open(&kernel.vmlinuz).map_err(copy_error)?;
        io::copy(&mut source, &mut out).map_err(copy_error)?;
        Ok(out)
    })?;
    let vmlinux = spec
        .unpack_kernel
        .then(|| Staged::new(&dir.join(VMLINUX_FILE)));
    let vmlinux_digest = match &vmlinux {
        Some(staged) => unpack_kernel(&kernel.vmlinuz, staged)?,
        None => None,
    };

    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: spec.name.clone(),
        inputs_key: key,
        kernel: KernelPackage {
            package: kernel_deb.package.clone(),
            version: kernel_deb.version.clone(),
            release: kernel.release,
            deb: kernel_deb.file_name().to_owned(),
        },
        busybox: Package {
            package: busybox_deb.package.clone(),
            version: busybox_deb.version.clone(),
            deb: busybox_deb.file_name().to_owned(),
        },
        guest_agent: agent_digest,
        modules: modules.iter().map(|m| m.name.clone()).collect(),
        libraries: libraries.iter().map(|l| l.display().to_string()).collect(),
        vmlinuz: vmlinuz_digest,
        vmlinux: vmlinux_digest,
        initrd: initrd_digest,
    };
    let manifest_path = dir.join(MANIFEST_FILE);
    remove_if_present(&manifest_path)?;
    vmlinuz.commit()?;
    match (vmlinux, &manifest.vmlinux) {
        (Some(staged), Some(_)) => staged.commit()?,
        _ => remove_if_present(&dir.join(VMLINUX_FILE))?,
    }
    initrd.commit()?;
    manifest.store(&manifest_path)?;

    tracing::info!(image = spec.name, elapsed = ?started.elapsed(), "image built");
    progress(&Step::Built {
        image: spec.name.clone(),
        vmlinuz_bytes: manifest.vmlinuz.size,
        initrd_bytes: manifest.initrd.size,
    });
    Ok(BuiltImage {
        vmlinuz: dir.join(VMLINUZ_FILE),
        vmlinux: manifest.vmlinux.as_ref().map(|_| dir.join(VMLINUX_FILE)),
        initrd: initrd_path,
        dir,
        manifest,
        rebuilt: true,
    })
}

impl BuiltImage {
    /// The kernel agents boot: the unpacked ELF where there is one (the guest then skips
    /// decompressing itself, seconds under emulation), else the bzImage.
    pub fn boot_kernel(&self) -> &Path {
        self.vmlinux.as_deref().unwrap_or(&self.vmlinuz)
    }
}

/// Writes the ELF kernel inside `bzimage` into `staged`; `None` (the image then boots the
/// bzImage) when its compression cannot be unpacked here.
fn unpack_kernel(bzimage: &Path, staged: &Staged) -> Result<Option<FileDigest>, ImageError> {
    let bytes = fs::read(bzimage).map_err(|source| ImageError::CopyKernel {
        from: bzimage.to_owned(),
        source,
    })?;
    let elf = match vmlinux::unpack(&bytes) {
        Ok(elf) => elf,
        Err(why) => {
            tracing::warn!("agents will boot the compressed kernel: {why}");
            return Ok(None);
        }
    };
    let digest = staged.fill(|mut out| {
        out.write_all(&elf)
            .map_err(|e| write_error(&staged.temporary, e))?;
        Ok(out)
    })?;
    Ok(Some(digest))
}

fn remove_if_present(path: &Path) -> Result<(), ImageError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(write_error(path, source)),
    }
}

/// The image in `dir` if it is intact and was built from inputs with this key.
fn up_to_date(dir: &Path, name: &str, key: &str) -> Option<BuiltImage> {
    load_image(dir, name)
        .ok()
        .filter(|image| image.manifest.inputs_key == key)
}

/// The image in `dir`, if its manifest reads and its files have the recorded sizes. Checking
/// sizes rather than hashes keeps this fast; the hashes are there for whoever wants to verify.
pub fn load_image(dir: &Path, name: &str) -> Result<BuiltImage, ImageError> {
    let manifest_path = dir.join(MANIFEST_FILE);
    if !manifest_path.is_file() {
        return Err(ImageError::NotBuilt {
            name: name.to_owned(),
            dir: dir.to_owned(),
        });
    }
    let manifest = Manifest::load(&manifest_path)?;
    let files = [
        (VMLINUZ_FILE, Some(&manifest.vmlinuz)),
        (VMLINUX_FILE, manifest.vmlinux.as_ref()),
        (INITRD_FILE, Some(&manifest.initrd)),
    ];
    for (file, digest) in files.into_iter().filter_map(|(f, d)| Some((f, d?))) {
        let size = fs::metadata(dir.join(file)).map(|m| m.len()).ok();
        if size != Some(digest.size) {
            return Err(ImageError::Incomplete {
                name: name.to_owned(),
                dir: dir.to_owned(),
                file: file.to_owned(),
            });
        }
    }
    Ok(BuiltImage {
        vmlinuz: dir.join(VMLINUZ_FILE),
        vmlinux: manifest.vmlinux.as_ref().map(|_| dir.join(VMLINUX_FILE)),
        initrd: dir.join(INITRD_FILE),
        dir: dir.to_owned(),
        manifest,
        rebuilt: false,
    })
}

/// The kernel inside an extracted kernel image package.
struct KernelFiles {
    vmlinuz: PathBuf,
    release: String,
    modules_dir: PathBuf,
}

impl KernelFiles {
    fn find(root: &Path) -> Option<Self> {
        let mut kernels: Vec<(PathBuf, String)> = fs::read_dir(root.join("boot"))
            .ok()?
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let release = name.strip_prefix("vmlinuz-")?.to_owned();
                Some((entry.path(), release))
            })
            .collect();
        // One kernel per package is the rule; sorting keeps the choice stable if not.
        kernels.sort();
        let (vmlinuz, release) = kernels.into_iter().next()?;
        // Newer Debian releases ship modules under usr/ only.
        let modules_dir = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|base| root.join(base).join(&release))
            .find(|dir| dir.is_dir())?;
        Some(Self {
            vmlinuz,
            release,
            modules_dir,
        })
    }
}

/// Everything that goes into the initrd besides what the spec itself says.
struct InitrdContents<'a> {
    agent: Vec<u8>,
    libraries: &'a [PathBuf],
    modules: &'a [Module],
    busybox: &'a Path,
    applets: &'a [String],
}

fn initrd_tree(spec: &ImageSpec, contents: InitrdContents<'_>) -> Result<CpioTree, ImageError> {
    let mut tree = CpioTree::new();
    for (dir, mode) in &spec.dirs {
        tree.dir(dir, *mode)?;
    }
    for (path, text) in &spec.files {
        tree.file(path, DATA_MODE, text.as_bytes().to_vec())?;
    }
    tree.file(INIT_PATH, EXECUTABLE_MODE, contents.agent)?;
    for library in contents.libraries {
        tree.host_file_at_same_path(library)?;
    }
    tree.host_file(BUSYBOX_PATH, EXECUTABLE_MODE, contents.busybox)?;
    // What `busybox --install -s` would do at boot, done once here.
    for applet in contents.applets {
        if !tree.contains(applet) {
            tree.symlink(applet, BUSYBOX_PATH)?;
        }
    }
    let mut module_files = Vec::new();
    for module in contents.modules {
        let file = module.file_name().to_owned();
        tree.host_file(&format!("{MODULES_DIR}/{file}"), DATA_MODE, &module.path)?;
        module_files.push(file);
    }
    let config = spec.init_config(&module_files);
    let mut json = serde_json::to_vec_pretty(&config).map_err(ImageError::InitConfig)?;
    json.push(b'\n');
    tree.file(INIT_CONFIG_PATH, DATA_MODE, json)?;
    Ok(tree)
}

/// Applet paths, absolute, as `busybox --list-full` prints them (`bin/sh`, `usr/bin/awk`, ...).
fn busybox_applets(busybox: &Path) -> Result<Vec<String>, ImageError> {
    let output = Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(|source| ImageError::Applets {
            path: busybox.to_owned(),
            source,
        })?;
    if !output.status.success() {
        return Err(ImageError::AppletsFailed {
            path: busybox.to_owned(),
            status: output.status.to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(|line| format!("/{}", line.trim_start_matches('/')))
        .collect())
}

/// A file written under a temporary name and renamed over its target by [`Staged::commit`];
/// dropped uncommitted, it is removed.
struct Staged {
    temporary: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl Staged {
    fn new(target: &Path) -> Self {
        Self {
            temporary: temporary_path(target),
            target: target.to_owned(),
            committed: false,
        }
    }

    /// Creates the temporary file, lets `write` fill it, syncs it, and returns its digest.
    fn fill(
        &self,
        write: impl FnOnce(Hashing<BufWriter<File>>) -> Result<Hashing<BufWriter<File>>, ImageError>,
    ) -> Result<FileDigest, ImageError> {
        let error = |source| write_error(&self.temporary, source);
        let file = File::create(&self.temporary).map_err(error)?;
        let hashing = write(Hashing::new(BufWriter::new(file)))?;
        let (buffered, digest) = hashing.finish();
        let file = buffered.into_inner().map_err(|e| error(e.into_error()))?;
        file.sync_all().map_err(error)?;
        Ok(digest)
    }

    fn commit(mut self) -> Result<(), ImageError> {
        fs::rename(&self.temporary, &self.target).map_err(|e| write_error(&self.target, e))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.temporary);
        }
    }
}

/// Hashes what passes through, so a file's digest costs no second read.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Hashing<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    fn finish(self) -> (W, FileDigest) {
        let digest = FileDigest {
            size: self.bytes,
            sha256: hex(&self.hasher.finalize()),
        };
        (self.inner, digest)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.hasher.update(&buf[..written]);
        self.bytes += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn write_error(path: &Path, source: io::Error) -> ImageError {
    ImageError::Write {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    use super::super::cpio::testing::read_newc;
    use super::super::elf::testing::elf_with_sections;
    use super::{INITRD_FILE, MANIFEST_FILE, load_image, up_to_date};
    use crate::manifest::Manifest;
    use crate::{
        AGENT_IMAGE, BuildOptions, BuiltImage, CARRIER_IMAGE, ImageError, ImageSpec, Step,
        build_image, find_image,
    };
    use std::fs;
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::time::Instant;

    use super::super::manifest::FileDigest;
    use super::super::vmlinux;

    const ELF_KERNEL: &[u8] = b"\x7fELF, as far as the image builder looks";
    const KERNEL_DEB: &str = "linux-image-6.1.0-99-cloud-amd64_6.1.999-1_amd64.deb";
    const BUSYBOX_DEB: &str = "busybox-static_1%3a1.35.0-4_amd64.deb";
    const RELEASE: &str = "6.1.0-99-cloud-amd64";

    /// A cache whose packages are already pinned, downloaded and extracted, so a build needs
    /// neither apt nor dpkg: a fake kernel with fake modules and a shell script as busybox.
    fn prepared_cache() -> tempfile::TempDir {
        let cache = tempfile::tempdir().unwrap();
        let downloads = cache.path().join("downloads");
        fs::create_dir_all(&downloads).unwrap();
        for deb in [KERNEL_DEB, BUSYBOX_DEB] {
            fs::write(downloads.join(deb), b"").unwrap();
        }
        let pins = serde_json::json!({
            "linux-image-cloud-amd64": KERNEL_DEB,
            "busybox-static": BUSYBOX_DEB,
        });
        fs::write(downloads.join("pins.json"), pins.to_string()).unwrap();

        let kernel = cache
            .path()
            .join("packages")
            .join(KERNEL_DEB.trim_end_matches(".deb"));
        fs::create_dir_all(kernel.join("boot")).unwrap();
        fs::write(
            kernel.join("boot").join(format!("vmlinuz-{RELEASE}")),
            vmlinux::test_bzimage(ELF_KERNEL),
        )
        .unwrap();
        let modules = kernel.join("lib/modules").join(RELEASE).join("kernel");
        let fake_modules: &[(&str, &str)] = &[
            ("irqbypass", ""),
            ("kvm", "irqbypass"),
            ("kvm-amd", "kvm"),
            ("virtio_pci_modern_dev", ""),
            ("virtio_pci_legacy_dev", ""),
            (
                "virtio_pci",
                "virtio_ring,virtio_pci_modern_dev,virtio_pci_legacy_dev,virtio",
            ),
            ("virtio_console", "virtio,virtio_ring"),
            ("failover", ""),
            ("net_failover", "failover"),
            ("virtio_net", "net_failover,virtio,virtio_ring"),
            ("virtio_ring", ""),
            ("virtio", ""),
            ("virtio_mmio", "virtio,virtio_ring"),
            ("vsock", ""),
            (
                "vmw_vsock_virtio_transport_common",
                "vsock,virtio,virtio_ring",
            ),
            (
                "vmw_vsock_virtio_transport",
                "virtio,vmw_vsock_virtio_transport_common,virtio_ring,vsock",
            ),
            ("virtio_blk", "virtio,virtio_ring"),
            ("libnvdimm", ""),
            ("nd_btt", "libnvdimm"),
            ("nd_pmem", "libnvdimm,nd_btt"),
            ("nd_virtio", "virtio,libnvdimm"),
            ("virtio_pmem", "virtio,libnvdimm,nd_virtio"),
            ("erofs", ""),
            ("uio", ""),
            ("uio_pci_generic", "uio"),
            ("vfio", ""),
            ("vfio_iommu_type1", "vfio"),
            ("vfio_virqfd", ""),
            ("vfio-pci-core", "vfio,vfio_virqfd,irqbypass"),
            ("vfio-pci", "vfio-pci-core,vfio"),
        ];
        fs::create_dir_all(&modules).unwrap();
        for (name, depends) in fake_modules {
            let modinfo = format!("depends={depends}\0name={name}\0");
            let elf = elf_with_sections(&[(".modinfo", modinfo.as_bytes())]);
            fs::write(modules.join(format!("{name}.ko")), elf).unwrap();
        }

        let busybox = cache
            .path()
            .join("packages")
            .join(BUSYBOX_DEB.trim_end_matches(".deb"));
        fs::create_dir_all(busybox.join("bin")).unwrap();
        let script = busybox.join("bin/busybox");
        fs::write(
            &script,
            "#!/bin/sh\nprintf 'bin/sh\\nusr/bin/awk\\nlinuxrc\\n'\n",
        )
        .unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        cache
    }

    fn options() -> BuildOptions {
        BuildOptions {
            guest_agent: PathBuf::from("/bin/true"),
            refresh_packages: false,
        }
    }

    #[test]
    fn builds_from_a_prepared_cache_then_does_nothing_the_second_time() {
        let cache = prepared_cache();
        let spec = ImageSpec::agent();
        let mut steps = Vec::new();
        let image = build_image(&spec, cache.path(), &options(), &mut |s| {
            steps.push(s.clone())
        })
        .unwrap();
        assert!(image.rebuilt);
        let numbers: Vec<usize> = steps.iter().map(Step::number).collect();
        assert_eq!(numbers, [1, 2, 2, 3, 3, 4, 5, 6]);
        assert_eq!(
            steps[3].to_string(),
            "[3/6] linux-image-6.1.0-99-cloud-amd64 is already extracted"
        );

        let manifest = &image.manifest;
        assert_eq!(manifest.kernel.package, "linux-image-6.1.0-99-cloud-amd64");
        assert_eq!(manifest.kernel.version, "6.1.999-1");
        assert_eq!(manifest.kernel.release, RELEASE);
        assert_eq!(manifest.busybox.version, "1:1.35.0-4");
        assert_eq!(
            manifest.modules.first().map(String::as_str),
            Some("virtio_ring")
        );
        let bzimage = vmlinux::test_bzimage(ELF_KERNEL);
        assert_eq!(fs::read(&image.vmlinuz).unwrap(), bzimage);
        assert_eq!(manifest.vmlinuz, FileDigest::of(&bzimage));
        // Agents boot the kernel unpacked from it.
        let elf = image.vmlinux.as_deref().expect("no unpacked kernel");
        assert_eq!(fs::read(elf).unwrap(), ELF_KERNEL);
        assert_eq!(manifest.vmlinux, Some(FileDigest::of(ELF_KERNEL)));
        assert_eq!(image.boot_kernel(), elf);
        let initrd = fs::read(&image.initrd).unwrap();
        assert_eq!(manifest.initrd, FileDigest::of(&initrd));
        assert_eq!(find_image_in(&cache), image.manifest);

        let entries = read_newc(&initrd);
        let entry = |name: &str| entries.iter().find(|e| e.name == name);
        assert_eq!(entry("init").unwrap().data, fs::read("/bin/true").unwrap());
        assert_eq!(entry("init").unwrap().mode, 0o100755);
        assert_eq!(entry("tmp").unwrap().mode, 0o041777);
        assert_eq!(entry("bin/sh").unwrap().data, b"/bin/busybox");
        assert_eq!(entry("usr/bin/awk").unwrap().data, b"/bin/busybox");
        assert!(entry("lib64/ld-linux-x86-64.so.2").is_some());
        assert!(entry("lib/modules/vmw_vsock_virtio_transport.ko").is_some());
        let config: serde_json::Value =
            serde_json::from_slice(&entry("etc/agentos/init.json").unwrap().data).unwrap();
        assert_eq!(config["modules"].as_array().unwrap().len(), 15);
        assert_eq!(config["modules"][0], "/lib/modules/virtio_ring.ko");
        assert_eq!(config["transport"]["vsock"]["port"], 1024);

        let started = Instant::now();
        let mut steps = Vec::new();
        let again = build_image(&spec, cache.path(), &options(), &mut |s| {
            steps.push(s.clone())
        })
        .unwrap();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(!again.rebuilt);
        assert_eq!(again.manifest, image.manifest);
        assert_eq!(
            steps.last().unwrap().to_string(),
            "[6/6] agent image is up to date"
        );
        let names: Vec<String> = fs::read_dir(&image.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 4, "{names:?}");
    }

    fn find_image_in(cache: &tempfile::TempDir) -> Manifest {
        find_image(cache.path(), AGENT_IMAGE).unwrap().manifest
    }

    #[test]
    fn the_carrier_image_talks_over_serial_and_loads_kvm() {
        let cache = prepared_cache();
        let spec = ImageSpec::named(CARRIER_IMAGE).unwrap();
        let image: BuiltImage = build_image(&spec, cache.path(), &options(), &mut |_| {}).unwrap();
        assert_eq!(image.vmlinux, None, "QEMU boots the carrier's bzImage");
        assert_eq!(image.boot_kernel(), image.vmlinuz);
        assert_eq!(
            image.manifest.modules,
            [
                "irqbypass",
                "kvm",
                "kvm_amd",
                "virtio_ring",
                "virtio",
                "virtio_pci_modern_dev",
                "virtio_pci_legacy_dev",
                "virtio_pci",
                "virtio_console",
                "failover",
                "net_failover",
                "virtio_net",
                "vfio",
                "vfio_iommu_type1",
                "vfio_virqfd",
                "vfio_pci_core",
                "vfio_pci",
            ]
        );
        let entries = read_newc(&fs::read(&image.initrd).unwrap());
        let config = entries
            .iter()
            .find(|e| e.name == "etc/agentos/init.json")
            .unwrap();
        let config: serde_json::Value = serde_json::from_slice(&config.data).unwrap();
        assert_eq!(config["transport"]["serial"]["name"], "agentos.ctl");
        assert_eq!(config["modules"][2], "/lib/modules/kvm-amd.ko");
        assert!(config.get("listen_port").is_none());
        // The agent image in the same cache is a separate directory.
        assert!(matches!(
            find_image(cache.path(), AGENT_IMAGE),
            Err(ImageError::NotBuilt { .. })
        ));
    }

    #[test]
    fn an_image_is_reused_only_when_its_key_matches_and_files_are_intact() {
        let cache = prepared_cache();
        let image =
            build_image(&ImageSpec::agent(), cache.path(), &options(), &mut |_| {}).unwrap();
        let key = image.manifest.inputs_key.clone();
        assert!(up_to_date(&image.dir, "agent", &key).is_some());
        assert!(up_to_date(&image.dir, "agent", "another key").is_none());

        let initrd = fs::read(&image.initrd).unwrap();
        fs::write(&image.initrd, &initrd[..initrd.len() / 2]).unwrap();
        assert!(up_to_date(&image.dir, "agent", &key).is_none());
        assert!(matches!(
            load_image(&image.dir, "agent"),
            Err(ImageError::Incomplete { ref file, .. }) if file == INITRD_FILE
        ));
        let rebuilt =
            build_image(&ImageSpec::agent(), cache.path(), &options(), &mut |_| {}).unwrap();
        assert!(rebuilt.rebuilt);
        assert_eq!(fs::read(&image.initrd).unwrap(), initrd);

        fs::remove_file(image.dir.join(MANIFEST_FILE)).unwrap();
        let err = load_image(&image.dir, "agent").unwrap_err();
        assert!(
            err.to_string().contains("agentos image build agent"),
            "{err}"
        );
    }

    #[test]
    fn the_same_inputs_give_the_same_bytes() {
        let cache = prepared_cache();
        let first =
            build_image(&ImageSpec::agent(), cache.path(), &options(), &mut |_| {}).unwrap();
        let other = prepared_cache();
        let second =
            build_image(&ImageSpec::agent(), other.path(), &options(), &mut |_| {}).unwrap();
        assert_eq!(first.manifest, second.manifest);
    }

    #[test]
    fn a_missing_guest_agent_says_how_to_build_it() {
        let cache = prepared_cache();
        let options = BuildOptions {
            guest_agent: cache.path().join("nothing-here"),
            refresh_packages: false,
        };
        let err =
            build_image(&ImageSpec::agent(), cache.path(), &options, &mut |_| {}).unwrap_err();
        assert!(
            err.to_string().contains("cargo build -p agentos-guest"),
            "{err}"
        );
    }

    /// Builds the real agent image with apt into a fresh cache. Needs the Debian archive:
    /// `cargo test -p agentos image -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn builds_the_real_agent_image() {
        let cache = tempfile::tempdir().unwrap();
        let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target");
        let guest_agent = ["release", "debug"]
            .iter()
            .map(|profile| target.join(profile).join("agentos-guest"))
            .find(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("/bin/true"));
        let options = BuildOptions {
            guest_agent,
            refresh_packages: false,
        };
        let started = Instant::now();
        let image = build_image(&ImageSpec::agent(), cache.path(), &options, &mut |step| {
            println!("{step}");
        })
        .unwrap();
        let cold = started.elapsed();
        let started = Instant::now();
        let again = build_image(&ImageSpec::agent(), cache.path(), &options, &mut |_| {}).unwrap();
        let warm = started.elapsed();
        println!(
            "guest agent {}: cold build {cold:?}, warm rebuild {warm:?}, initrd {} bytes, vmlinuz {} bytes",
            options.guest_agent.display(),
            image.manifest.initrd.size,
            image.manifest.vmlinuz.size
        );
        assert!(!again.rebuilt);
        assert!(warm < Duration::from_secs(1));

        let cpio = crate::programs::find("cpio").unwrap_or_else(|e| panic!("{e}"));
        let listing = Command::new(cpio)
            .args(["-t", "-F"])
            .arg(&image.initrd)
            .output()
            .unwrap();
        assert!(listing.status.success());
        let listing = String::from_utf8(listing.stdout).unwrap();
        for expected in [
            "init",
            "bin/busybox",
            "bin/sh",
            "etc/agentos/init.json",
            "lib64/ld-linux-x86-64.so.2",
            "lib/x86_64-linux-gnu/libc.so.6",
            "lib/modules/virtio_mmio.ko",
            "lib/modules/vmw_vsock_virtio_transport.ko",
            "proc",
            "tmp",
        ] {
            assert!(listing.lines().any(|l| l == expected), "{expected} missing");
        }
        assert_eq!(
            image.manifest.modules,
            [
                "virtio_ring",
                "virtio",
                "virtio_mmio",
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport",
                "virtio_blk",
                "erofs",
            ]
        );
    }
}
