//! Guest images: Debian's stock cloud kernel plus an initramfs whose `/init` is the guest agent;
//! the model store and the read-only disks agents with a model map ([`model`]); the host
//! programs agentos starts ([`programs`]); the templates agents may be spawned with and the
//! disk the `base` one gives them ([`template`]).
//!
//! An image is built from Debian packages fetched with apt (never installed), into a cache
//! directory:
//!
//! ```text
//! <cache>/downloads/          .deb files and pins.json (apt.rs)
//! <cache>/packages/<deb>/     extracted packages (apt.rs)
//! <cache>/images/<name>/      vmlinuz, initrd.cpio, manifest.json (build.rs, manifest.rs)
//! ```
//!
//! The initrd is an uncompressed `newc` cpio: decompressing it costs more boot time than reading
//! the extra bytes, most of all under software emulation.

mod apt;
mod build;
pub mod cpio;
mod elf;
mod kmod;
mod libs;
pub use libs::{LibsError, needed_libraries};
pub mod manifest;
pub mod model;
pub mod programs;
mod spec;
pub mod template;
pub mod vmlinux;

use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub use build::{BuildOptions, BuiltImage, ImageError, Step, build_image};
pub use spec::{AGENT_IMAGE, CARRIER_IMAGE, GUEST_PATH, ImageSpec};

/// Where images are cached: `$AGENTOS_HOME`, else `$XDG_CACHE_HOME/agentos`, else
/// `$HOME/.cache/agentos`.
pub fn default_cache_dir() -> PathBuf {
    cache_dir_from(|name| std::env::var_os(name))
}

fn cache_dir_from(var: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    let set = |name| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(home) = set("AGENTOS_HOME") {
        return home;
    }
    // The XDG spec says to ignore a relative value.
    if let Some(cache) = set("XDG_CACHE_HOME").filter(|p| p.is_absolute()) {
        return cache.join("agentos");
    }
    match set("HOME") {
        Some(home) => home.join(".cache").join("agentos"),
        None => std::env::temp_dir().join("agentos"),
    }
}

/// A built image, checked to be complete: its manifest reads and its files have the recorded
/// sizes.
pub fn find_image(cache: &Path, name: &str) -> Result<BuiltImage, ImageError> {
    build::load_image(&build::image_dir(cache, name), name)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A name next to `path` for writing its new contents before renaming them into place. It holds
/// our pid, so concurrent builds do not collide and [`remove_stale_temporaries`] can tell ours
/// from those of a build that was killed.
fn temporary_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Replaces `path` with `bytes` in one step: readers see the old contents or the new, never a
/// part.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let temporary = temporary_path(path);
    let result = (|| {
        let mut file = fs::File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temporary, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    result
}

/// Removes entries of `dir` named `<prefix>...-<pid>` whose process is gone: what a killed build
/// left. Best effort; an entry that cannot be removed is only wasted space.
pub(crate) fn remove_stale_temporaries(dir: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.rsplit('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        tracing::debug!(path = %entry.path().display(), "removing what an interrupted build left");
        let path = entry.path();
        let _ = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache_dir(vars: &[(&str, &str)]) -> PathBuf {
        cache_dir_from(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| OsString::from(v))
        })
    }

    #[test]
    fn cache_dir_prefers_agentos_home_then_xdg_then_home() {
        let all = [
            ("AGENTOS_HOME", "/a"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(cache_dir(&all), Path::new("/a"));
        assert_eq!(cache_dir(&all[1..]), Path::new("/x/agentos"));
        assert_eq!(cache_dir(&all[2..]), Path::new("/h/.cache/agentos"));
        assert_eq!(
            cache_dir(&[
                ("AGENTOS_HOME", ""),
                ("XDG_CACHE_HOME", "rel"),
                ("HOME", "/h")
            ]),
            Path::new("/h/.cache/agentos")
        );
    }

    #[test]
    fn default_cache_dir_reads_this_process_environment() {
        let from_env = cache_dir_from(|name| std::env::var_os(name));
        assert_eq!(default_cache_dir(), from_env);
    }

    #[test]
    fn stale_temporaries_of_dead_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mine = dir
            .path()
            .join(format!(".extract-pkg-{}", std::process::id()));
        let dead = dir.path().join(format!(".extract-pkg-{}", u32::MAX));
        let dead_file = dir.path().join(format!(".initrd.cpio.tmp-{}", u32::MAX));
        let other = dir.path().join(".extract-notapid");
        for d in [&mine, &dead, &other] {
            fs::create_dir(d).unwrap();
        }
        fs::write(&dead_file, b"").unwrap();
        remove_stale_temporaries(dir.path(), ".extract-");
        remove_stale_temporaries(dir.path(), ".");
        assert!(mine.exists() && other.exists());
        assert!(!dead.exists() && !dead_file.exists());
    }

    #[test]
    fn atomic_write_replaces_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
