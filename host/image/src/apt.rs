//! Debian packages, fetched with `apt-get download` and unpacked with `dpkg-deb -x`: nothing is
//! installed on the host.
//!
//! Layout under the cache directory:
//! - `downloads/*.deb`: packages as apt names them; a file there is complete (apt writes into a
//!   private `.partial-<pid>` directory and we move the result in).
//! - `downloads/pins.json`: which `.deb` each requested package name resolved to. A later build
//!   reuses it without asking apt (asking costs a second or more, and would let a new upload change
//!   the image behind the user's back); [`Packages::locate`] with `refresh` asks again.
//! - `packages/<deb file stem>/`: the extracted tree, moved into place once complete.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::{remove_stale_temporaries, write_atomic};

const APT_LISTS: &str = "/var/lib/apt/lists";
const KERNEL_IMAGE_PREFIX: &str = "linux-image-";
const PINS_FILE: &str = "pins.json";
const PARTIAL_PREFIX: &str = ".partial-";
const EXTRACT_PREFIX: &str = ".extract-";

#[derive(Debug, thiserror::Error)]
pub enum AptError {
    #[error(
        "cannot run `{command}`: guest kernels come from Debian packages, so apt-get and dpkg-deb must be installed"
    )]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("apt knows no package {package}; run `apt-get update` as root, and check the name")]
    UnknownPackage { package: String },
    #[error(
        "`{command}` failed for {package}: {detail}; run `apt-get update` as root and check that the Debian archive is reachable"
    )]
    Failed {
        command: String,
        package: String,
        detail: String,
    },
    #[error("apt's package lists are missing; run `apt-get update` as root")]
    NoLists,
    #[error(
        "`apt-get update` failed: {detail}; run it as root and check that the Debian archive is reachable"
    )]
    Update { detail: String },
    #[error("`{command}` gave no usable answer for {package}: {detail}")]
    Unexpected {
        command: String,
        package: String,
        detail: String,
    },
    #[error("cannot use {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the package pins in {path} are unreadable; delete the file to resolve packages afresh"
    )]
    Pins {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// A package file, downloaded or not yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deb {
    pub package: String,
    pub version: String,
    pub path: PathBuf,
}

impl Deb {
    /// Reads package and version from a file name as apt writes it, `name_version_arch.deb`, where
    /// the version's `:` is written `%3a`.
    fn from_file_name(dir: &Path, file_name: &str) -> Option<Self> {
        let stem = file_name.strip_suffix(".deb")?;
        let mut fields = stem.split('_');
        let (package, version, _arch) = (fields.next()?, fields.next()?, fields.next()?);
        if package.is_empty() || version.is_empty() || fields.next().is_some() {
            return None;
        }
        Some(Self {
            package: package.to_owned(),
            version: percent_decode(version)?,
            path: dir.join(file_name),
        })
    }

    pub fn file_name(&self) -> &str {
        self.path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
    }

    pub fn is_downloaded(&self) -> bool {
        self.path.is_file()
    }
}

/// The package cache of one cache directory.
pub struct Packages {
    downloads: PathBuf,
    extracted: PathBuf,
    pins: BTreeMap<String, String>,
    lists_updated: bool,
}

impl Packages {
    pub fn open(cache: &Path) -> Result<Self, AptError> {
        let downloads = cache.join("downloads");
        let extracted = cache.join("packages");
        for dir in [&downloads, &extracted] {
            fs::create_dir_all(dir).map_err(|source| io_error(dir, source))?;
        }
        let pins_path = downloads.join(PINS_FILE);
        let pins = match fs::read(&pins_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| AptError::Pins {
                path: pins_path.clone(),
                source,
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(io_error(&pins_path, source)),
        };
        Ok(Self {
            downloads,
            extracted,
            pins,
            lists_updated: false,
        })
    }

    /// The `.deb` that `package` stands for: the pinned one while its file is here and `refresh`
    /// is false, otherwise apt's current candidate, which becomes the new pin.
    pub fn locate(&mut self, package: &str, refresh: bool) -> Result<Deb, AptError> {
        if let Some(deb) = self.pinned(package, refresh) {
            return Ok(deb);
        }
        let deb = self.candidate(package)?;
        self.pin(package, &deb)?;
        Ok(deb)
    }

    /// [`Self::locate`] for several packages, asking apt once for all those not pinned.
    pub fn locate_all(&mut self, packages: &[&str], refresh: bool) -> Result<Vec<Deb>, AptError> {
        let unpinned: Vec<&str> = packages
            .iter()
            .copied()
            .filter(|p| self.pinned(p, refresh).is_none())
            .collect();
        let mut fresh = if unpinned.is_empty() {
            Vec::new()
        } else {
            self.candidates(&unpinned)?
        }
        .into_iter();
        let mut found = Vec::with_capacity(packages.len());
        for package in packages {
            let deb = match self.pinned(package, refresh) {
                Some(deb) => deb,
                // `candidates` answers one file for each package asked, in order.
                None => {
                    let deb = match fresh.next() {
                        Some(deb) => deb,
                        None => self.candidate(package)?,
                    };
                    self.pin(package, &deb)?;
                    deb
                }
            };
            found.push(deb);
        }
        Ok(found)
    }

    /// The pinned `.deb` of each of `packages`, when every one is pinned and here: what a build
    /// that must not ask apt can use.
    pub fn pinned_all(&self, packages: &[&str]) -> Option<Vec<Deb>> {
        packages.iter().map(|p| self.pinned(p, false)).collect()
    }

    /// Like [`Self::locate`], for a kernel: a meta package (`linux-image-cloud-amd64`) is followed
    /// to the versioned package it depends on, which holds the kernel.
    pub fn locate_kernel(&mut self, package: &str, refresh: bool) -> Result<Deb, AptError> {
        if let Some(deb) = self.pinned(package, refresh) {
            return Ok(deb);
        }
        let meta = self.candidate(package)?;
        self.download(&meta)?;
        let image = self
            .depends(&meta)?
            .into_iter()
            .find(|name| name.starts_with(KERNEL_IMAGE_PREFIX));
        let deb = match image {
            Some(name) => {
                tracing::debug!(
                    meta = package,
                    kernel = name,
                    "following the kernel meta package"
                );
                self.candidate(&name)?
            }
            None => meta,
        };
        self.pin(package, &deb)?;
        Ok(deb)
    }

    /// Fetches `deb` unless it is already here.
    pub fn download(&mut self, deb: &Deb) -> Result<(), AptError> {
        if deb.is_downloaded() {
            return Ok(());
        }
        remove_stale_temporaries(&self.downloads, PARTIAL_PREFIX);
        let partial = self
            .downloads
            .join(format!("{PARTIAL_PREFIX}{}", std::process::id()));
        fs::create_dir_all(&partial).map_err(|source| io_error(&partial, source))?;
        let wanted = format!("{}={}", deb.package, deb.version);
        let result = self
            .apt(&["download", &wanted], &partial, &deb.package)
            .and_then(|_| {
                let fetched = partial.join(deb.file_name());
                fs::rename(&fetched, &deb.path).map_err(|source| io_error(&fetched, source))
            });
        // Best effort: the directory is ours alone and removed again by the next download if this
        // fails.
        let _ = fs::remove_dir_all(&partial);
        result
    }

    /// Fetches those of `debs` that are not here yet, asking apt once for all of them.
    pub fn download_all(&mut self, debs: &[Deb]) -> Result<(), AptError> {
        let missing: Vec<&Deb> = debs.iter().filter(|d| !d.is_downloaded()).collect();
        if missing.is_empty() {
            return Ok(());
        }
        remove_stale_temporaries(&self.downloads, PARTIAL_PREFIX);
        let partial = self
            .downloads
            .join(format!("{PARTIAL_PREFIX}{}", std::process::id()));
        fs::create_dir_all(&partial).map_err(|source| io_error(&partial, source))?;
        let wanted: Vec<String> = missing
            .iter()
            .map(|d| format!("{}={}", d.package, d.version))
            .collect();
        let mut args = vec!["download"];
        args.extend(wanted.iter().map(String::as_str));
        let names = missing
            .iter()
            .map(|d| d.package.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        let result = self.apt(&args, &partial, &names).and_then(|_| {
            missing.iter().try_for_each(|deb| {
                let fetched = partial.join(deb.file_name());
                fs::rename(&fetched, &deb.path).map_err(|source| io_error(&fetched, source))
            })
        });
        let _ = fs::remove_dir_all(&partial);
        result
    }

    /// Unpacks `deb` into `dir`, over what is there (`dpkg-deb -x`).
    pub fn extract_into(&self, deb: &Deb, dir: &Path) -> Result<(), AptError> {
        let command = format!("dpkg-deb -x {} {}", deb.path.display(), dir.display());
        let output = run(
            Command::new("dpkg-deb").arg("-x").arg(&deb.path).arg(dir),
            &command,
        )?;
        if !output.status.success() {
            return Err(AptError::Failed {
                command,
                package: deb.package.clone(),
                detail: format!(
                    "{}; delete {} and build again",
                    last_line(&output.stderr),
                    deb.path.display()
                ),
            });
        }
        Ok(())
    }

    /// The names in the package's `Depends` field (first of each set of alternatives).
    pub fn depends(&self, deb: &Deb) -> Result<Vec<String>, AptError> {
        let path = deb.path.display().to_string();
        let output = run(
            Command::new("dpkg-deb").args(["-f", &path, "Depends"]),
            &format!("dpkg-deb -f {path} Depends"),
        )?;
        if !output.status.success() {
            return Err(AptError::Unexpected {
                command: format!("dpkg-deb -f {path} Depends"),
                package: deb.package.clone(),
                detail: last_line(&output.stderr),
            });
        }
        Ok(parse_depends(&String::from_utf8_lossy(&output.stdout)))
    }

    pub fn is_extracted(&self, deb: &Deb) -> bool {
        self.extracted_dir(deb).is_dir()
    }

    /// The package's files, extracted once into `packages/<deb file stem>/`.
    pub fn extract(&self, deb: &Deb) -> Result<PathBuf, AptError> {
        let target = self.extracted_dir(deb);
        if target.is_dir() {
            return Ok(target);
        }
        let stem = deb.file_name().trim_end_matches(".deb");
        remove_stale_temporaries(&self.extracted, EXTRACT_PREFIX);
        let temporary = self
            .extracted
            .join(format!("{EXTRACT_PREFIX}{stem}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&temporary);
        let command = format!("dpkg-deb -x {} {}", deb.path.display(), temporary.display());
        let output = run(
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(&deb.path)
                .arg(&temporary),
            &command,
        )?;
        if !output.status.success() {
            let _ = fs::remove_dir_all(&temporary);
            return Err(AptError::Failed {
                command,
                package: deb.package.clone(),
                detail: format!(
                    "{}; delete {} and build again",
                    last_line(&output.stderr),
                    deb.path.display()
                ),
            });
        }
        match fs::rename(&temporary, &target) {
            Ok(()) => Ok(target),
            // Another build finished the same extraction first; its tree is as good as ours.
            Err(_) if target.is_dir() => {
                let _ = fs::remove_dir_all(&temporary);
                Ok(target)
            }
            Err(source) => Err(io_error(&target, source)),
        }
    }

    fn extracted_dir(&self, deb: &Deb) -> PathBuf {
        self.extracted
            .join(deb.file_name().trim_end_matches(".deb"))
    }

    fn pinned(&self, package: &str, refresh: bool) -> Option<Deb> {
        if refresh {
            return None;
        }
        let deb = Deb::from_file_name(&self.downloads, self.pins.get(package)?)?;
        deb.is_downloaded().then_some(deb)
    }

    fn pin(&mut self, package: &str, deb: &Deb) -> Result<(), AptError> {
        self.pins
            .insert(package.to_owned(), deb.file_name().to_owned());
        let path = self.downloads.join(PINS_FILE);
        let json = serde_json::to_vec_pretty(&self.pins).map_err(|source| AptError::Pins {
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, &json).map_err(|source| io_error(&path, source))
    }

    /// apt's candidate for `package`, from `apt-get download --print-uris`. That prints nothing for
    /// files already in its working directory, so it runs in an empty one.
    fn candidate(&mut self, package: &str) -> Result<Deb, AptError> {
        let query_dir = self.downloads.join(".query");
        fs::create_dir_all(&query_dir).map_err(|source| io_error(&query_dir, source))?;
        let stdout = self.apt(&["download", "--print-uris", package], &query_dir, package)?;
        let prefix = format!("{package}_");
        // Each line: 'URL' FILE-NAME SIZE HASH
        stdout
            .lines()
            .filter_map(|line| line.split_whitespace().nth(1))
            .find(|file| file.starts_with(&prefix))
            .and_then(|file| Deb::from_file_name(&self.downloads, file))
            .ok_or_else(|| AptError::Unexpected {
                command: format!("apt-get download --print-uris {package}"),
                package: package.to_owned(),
                detail: format!("no package file in {stdout:?}"),
            })
    }

    /// apt's candidates for `packages`, in their order, from one `apt-get download
    /// --print-uris` (see [`Self::candidate`]).
    fn candidates(&mut self, packages: &[&str]) -> Result<Vec<Deb>, AptError> {
        let query_dir = self.downloads.join(".query");
        fs::create_dir_all(&query_dir).map_err(|source| io_error(&query_dir, source))?;
        let names = packages.join(" ");
        let mut args = vec!["download", "--print-uris"];
        args.extend_from_slice(packages);
        let stdout = self.apt(&args, &query_dir, &names)?;
        let files: Vec<&str> = stdout
            .lines()
            .filter_map(|line| line.split_whitespace().nth(1))
            .collect();
        packages
            .iter()
            .map(|package| {
                let prefix = format!("{package}_");
                files
                    .iter()
                    .find(|file| file.starts_with(&prefix))
                    .and_then(|file| Deb::from_file_name(&self.downloads, file))
                    .ok_or_else(|| AptError::Unexpected {
                        command: format!("apt-get download --print-uris {names}"),
                        package: (*package).to_owned(),
                        detail: "no package file for it in apt's answer".to_owned(),
                    })
            })
            .collect()
    }

    /// Runs apt-get; when it fails because the package lists were never fetched, fetches them once
    /// (as root) and tries again.
    fn apt(&mut self, args: &[&str], cwd: &Path, package: &str) -> Result<String, AptError> {
        let command = format!("apt-get {}", args.join(" "));
        loop {
            let output = run(apt_get().args(args).current_dir(cwd), &command)?;
            if output.status.success() {
                return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
            }
            let stderr = String::from_utf8_lossy(&output.stderr);
            let unknown = stderr.contains("Unable to locate package")
                || stderr.contains("has no installation candidate");
            if !unknown {
                return Err(AptError::Failed {
                    command,
                    package: package.to_owned(),
                    detail: last_line(&output.stderr),
                });
            }
            if self.lists_updated || have_package_lists() {
                return Err(AptError::UnknownPackage {
                    package: package.to_owned(),
                });
            }
            self.update_lists()?;
        }
    }

    fn update_lists(&mut self) -> Result<(), AptError> {
        let running_as_root = fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        if !running_as_root {
            return Err(AptError::NoLists);
        }
        tracing::info!("apt has no package lists; running apt-get update");
        let output = run(apt_get().arg("update"), "apt-get update")?;
        if !output.status.success() {
            return Err(AptError::Update {
                detail: last_line(&output.stderr),
            });
        }
        self.lists_updated = true;
        Ok(())
    }
}

fn apt_get() -> Command {
    let mut command = Command::new("apt-get");
    // Messages we match on are English; -q keeps progress meters out of the captured output.
    command.env("LC_ALL", "C").arg("-q");
    command
}

fn run(command: &mut Command, shown: &str) -> Result<Output, AptError> {
    tracing::debug!(command = shown, "running");
    command.output().map_err(|source| AptError::Spawn {
        command: shown.to_owned(),
        source,
    })
}

fn have_package_lists() -> bool {
    fs::read_dir(APT_LISTS).is_ok_and(|entries| {
        entries
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
    })
}

/// `a (>= 1), b | c, d:any` → `[a, b, d]`.
fn parse_depends(field: &str) -> Vec<String> {
    field
        .split(',')
        .filter_map(|group| group.split('|').next())
        .filter_map(|alternative| alternative.split_whitespace().next())
        .map(|name| name.split(':').next().unwrap_or(name).to_owned())
        .filter(|name| !name.is_empty())
        .collect()
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn last_line(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    text.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.contains("unsandboxed"))
        .unwrap_or("no error message")
        .to_owned()
}

fn io_error(path: &Path, source: io::Error) -> AptError {
    AptError::Io {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb_file_names_give_package_and_version() {
        let deb = Deb::from_file_name(
            Path::new("/d"),
            "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb",
        )
        .unwrap();
        assert_eq!(deb.package, "busybox-static");
        assert_eq!(deb.version, "1:1.35.0-4+deb12u1+b1");
        assert_eq!(
            deb.file_name(),
            "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb"
        );
        for bad in [
            "x.deb",
            "a_b.deb",
            "a_b_c_d.deb",
            "a_1%zz_amd64.deb",
            "a_1_amd64.tar",
        ] {
            assert!(Deb::from_file_name(Path::new("/d"), bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn depends_takes_the_first_alternative_without_versions() {
        assert_eq!(
            parse_depends(
                "kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool"
            ),
            ["kmod", "linux-base", "initramfs-tools"]
        );
        assert_eq!(
            parse_depends("linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\n"),
            ["linux-image-6.1.0-56-cloud-amd64"]
        );
        assert!(parse_depends("").is_empty());
    }

    #[test]
    fn pins_are_used_only_while_their_file_exists() {
        let cache = tempfile::tempdir().unwrap();
        let mut packages = Packages::open(cache.path()).unwrap();
        let deb =
            Deb::from_file_name(&packages.downloads, "busybox-static_1%3a1.35_amd64.deb").unwrap();
        packages.pin("busybox-static", &deb).unwrap();

        let packages = Packages::open(cache.path()).unwrap();
        assert_eq!(packages.pinned("busybox-static", false), None);
        fs::write(&deb.path, b"").unwrap();
        assert_eq!(packages.pinned("busybox-static", false), Some(deb));
        assert_eq!(packages.pinned("busybox-static", true), None);
    }
}
