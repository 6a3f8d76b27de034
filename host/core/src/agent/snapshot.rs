//! Snapshot directories as the host side sees them: what a snapshot holds before it is
//! restored, where one may be written, moving one into place, and what the host keeps beside
//! the VM's files (`agent.json`: the agent's model).

use std::io;
use std::path::{Path, PathBuf};

use agentos_image::model::{ModelDisks, ModelError};
use agentos_vmm::config::MAX_VCPUS;
use agentos_vmm::snapshot::{MEMORY_FILE, STATE_FILE, SnapshotError, VmSnapshot};
use serde::{Deserialize, Serialize};

/// What the host knows of a saved agent beyond its VM, beside the VM's files.
pub const AGENT_FILE: &str = "agent.json";
/// The disks a saved agent with a model had mounted: links to the images it booted with (whose
/// blocks its guest's page cache and file systems hold), so that the snapshot restores with
/// those images whatever the store holds later.
pub const RUNTIME_DISK_FILE: &str = "runtime.img";
pub const MODEL_DISK_FILE: &str = "model.img";
/// The disk of a saved agent's template (see [`agentos_image::template`]), kept the same way.
pub const BASE_DISK_FILE: &str = "base.img";
/// The most of an agent file that is read.
const MAX_AGENT_FILE_BYTES: u64 = 64 * 1024;

/// The agent a snapshot holds, as the daemon saw it.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SavedAgent {
    /// The model bundle it carries (loaded, if it ran).
    #[serde(default)]
    pub model: Option<String>,
    /// The template it was spawned with, whose disk is [`BASE_DISK_FILE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
}

impl SavedAgent {
    /// Writes `agent.json` in `dir` (replacing it, never through a symlink).
    pub fn write(&self, dir: &Path) -> io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(AGENT_FILE);
        let _ = std::fs::remove_file(&path);
        let mut file = std::fs::File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)?;
        file.write_all(&serde_json::to_vec(self).map_err(io::Error::other)?)
    }

    /// The agent of the snapshot in `dir`: none written (a snapshot of `agentos run`) is an
    /// agent without a model.
    pub fn read(dir: &Path) -> Result<Self, SnapshotDirError> {
        use std::io::Read;
        let path = dir.join(AGENT_FILE);
        let unreadable = |source| SnapshotDirError::AgentFile {
            path: path.clone(),
            source,
        };
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(unreadable(e)),
        };
        let mut text = Vec::new();
        file.take(MAX_AGENT_FILE_BYTES)
            .read_to_end(&mut text)
            .map_err(unreadable)?;
        serde_json::from_slice(&text).map_err(|source| SnapshotDirError::AgentFileInvalid {
            path: path.clone(),
            source,
        })
    }
}

/// Why a snapshot directory cannot be restored or written to.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotDirError {
    #[error("cannot read {}", .path.display())]
    AgentFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not valid", .path.display())]
    AgentFileInvalid {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{} is not a snapshot: cannot open {}", .dir.display(), .state.display())]
    NotASnapshot {
        dir: PathBuf,
        state: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} cannot be restored", .0.display())]
    State(PathBuf, #[source] SnapshotError),
    #[error("{} cannot be restored: {why}", .dir.display())]
    Unrestorable { dir: PathBuf, why: String },
    #[error("{} cannot be restored", .0.display())]
    ModelDisk(PathBuf, #[source] Box<ModelError>),
    #[error("--snapshot-to {}: no such directory (create it first)", .0.display())]
    NoTarget(PathBuf),
    #[error("--snapshot-to {} is the snapshot restored from: give another directory", .0.display())]
    TargetIsSource(PathBuf),
}

/// The vCPUs and memory of the agent saved in `dir`, whose state is read and checked whole (a
/// snapshot that cannot be restored is refused before anything starts).
pub fn snapshot_shape(dir: &Path) -> Result<(u8, u64), SnapshotDirError> {
    let unrestorable = |why: String| SnapshotDirError::Unrestorable {
        dir: dir.to_owned(),
        why,
    };
    let state = dir.join(STATE_FILE);
    let file = std::fs::File::open(&state).map_err(|source| SnapshotDirError::NotASnapshot {
        dir: dir.to_owned(),
        state: state.clone(),
        source,
    })?;
    let snapshot =
        VmSnapshot::read_from(&file).map_err(|e| SnapshotDirError::State(dir.to_owned(), e))?;
    let memory = dir.join(MEMORY_FILE);
    let expected = snapshot
        .memory_mib
        .checked_mul(1 << 20)
        .ok_or_else(|| unrestorable("its memory size is absurd".into()))?;
    match std::fs::metadata(&memory) {
        Ok(m) if m.len() == expected => {}
        Ok(m) => {
            return Err(unrestorable(format!(
                "its memory file holds {} bytes, not {expected}",
                m.len()
            )));
        }
        Err(e) => {
            return Err(unrestorable(format!(
                "its memory file {} is missing ({e})",
                memory.display()
            )));
        }
    }
    let vcpus = u8::try_from(snapshot.vcpus.len())
        .ok()
        .filter(|n| (1..=MAX_VCPUS).contains(n))
        .ok_or_else(|| unrestorable("it has no vCPUs this VMM can run".into()))?;
    Ok((vcpus, snapshot.memory_mib))
}

/// A directory a snapshot may be written to: it exists, and is not the one restored from.
pub fn check_snapshot_target(dir: &Path, from: Option<&Path>) -> Result<(), SnapshotDirError> {
    if !dir.is_dir() {
        return Err(SnapshotDirError::NoTarget(dir.to_owned()));
    }
    if let Some(from) = from
        && std::fs::canonicalize(from).ok() == std::fs::canonicalize(dir).ok()
    {
        return Err(SnapshotDirError::TargetIsSource(dir.to_owned()));
    }
    Ok(())
}

/// The model disks of the snapshot in `dir`, when it was saved with a model (its `agent.json`
/// names the bundle).
pub fn model_disks_of(dir: &Path) -> Result<Option<ModelDisks>, SnapshotDirError> {
    let Some(name) = SavedAgent::read(dir)?.model else {
        return Ok(None);
    };
    let file = |name: &str| {
        let path = dir.join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() => {
                agentos_image::model::check_filesystem(&path)
                    .map_err(|e| SnapshotDirError::ModelDisk(dir.to_owned(), Box::new(e)))?;
                Ok(path)
            }
            _ => Err(SnapshotDirError::Unrestorable {
                dir: dir.to_owned(),
                why: format!(
                    "it was saved with a model, but {} is missing",
                    path.display()
                ),
            }),
        }
    };
    Ok(Some(ModelDisks {
        runtime: file(RUNTIME_DISK_FILE)?,
        bundle: file(MODEL_DISK_FILE)?,
        name,
        device: agentos_image::model::DiskDevice::Pmem,
    }))
}

/// The template disk of the snapshot in `dir`, when it was saved with a template (its
/// `agent.json` names it).
pub fn base_disk_of(dir: &Path) -> Result<Option<PathBuf>, SnapshotDirError> {
    let Some(name) = SavedAgent::read(dir)?.template else {
        return Ok(None);
    };
    if name.parse::<agentos_image::template::Template>().is_err() {
        return Err(SnapshotDirError::Unrestorable {
            dir: dir.to_owned(),
            why: format!(
                "it was saved with the template `{}`, which this host does not know",
                agentos_protocol::clip(&name, 40)
            ),
        });
    }
    let path = dir.join(BASE_DISK_FILE);
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.is_file() => {
            agentos_image::model::check_filesystem(&path)
                .map_err(|e| SnapshotDirError::ModelDisk(dir.to_owned(), Box::new(e)))?;
            Ok(Some(path))
        }
        _ => Err(SnapshotDirError::Unrestorable {
            dir: dir.to_owned(),
            why: format!(
                "it was saved with the template `{name}`, but {} is missing",
                path.display()
            ),
        }),
    }
}

/// Moves the snapshot in `from` into the directory `to` (replacing what is there, never through
/// a symlink, never rewriting a file in place): the memory file first, then links to the
/// agent's model disks and template disk (or copies, on another file system), and the state
/// last, so that `to` holds a whole snapshot or none. Returns what the memory file takes on
/// disk.
pub fn move_snapshot(
    from: &Path,
    to: &Path,
    disks: Option<&ModelDisks>,
    base: Option<&Path>,
) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    for name in [MEMORY_FILE, RUNTIME_DISK_FILE, STATE_FILE] {
        if name == RUNTIME_DISK_FILE {
            place_disk(disks.map(|d| d.runtime.as_path()), to, RUNTIME_DISK_FILE)?;
            place_disk(disks.map(|d| d.bundle.as_path()), to, MODEL_DISK_FILE)?;
            place_disk(base, to, BASE_DISK_FILE)?;
            continue;
        }
        let (src, dst) = (from.join(name), to.join(name));
        if let Ok(meta) = std::fs::symlink_metadata(&dst)
            && !meta.is_file()
        {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} is not a regular file", dst.display()),
            ));
        }
        if name == MEMORY_FILE {
            // A state left from an earlier snapshot must not pair with this memory.
            let _ = std::fs::remove_file(to.join(STATE_FILE));
        }
        match std::fs::rename(&src, &dst) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                // Copied beside, then renamed over: VMs restored from the old file map it, and
                // truncating it under them would fault their guests' memory away.
                let part = to.join(format!("{name}.part"));
                let _ = std::fs::remove_file(&part);
                std::fs::copy(&src, &part)?;
                std::fs::rename(&part, &dst)?;
                std::fs::remove_file(&src)?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(std::fs::metadata(to.join(MEMORY_FILE))?.blocks() * 512)
}

/// `to/<name>`: a hard link to `disk` (images are never rewritten, so the link is the same
/// bytes), or a copy renamed in when `to` is on another file system; none without a disk.
fn place_disk(disk: Option<&Path>, to: &Path, name: &str) -> io::Result<()> {
    let dst = to.join(name);
    let same_file = |a: &std::fs::Metadata, b: &std::fs::Metadata| {
        use std::os::unix::fs::MetadataExt;
        (a.dev(), a.ino()) == (b.dev(), b.ino())
    };
    // `dst` itself, never what a symlink there points to.
    if let (Some(disk), Ok(there)) = (disk, std::fs::symlink_metadata(&dst))
        && std::fs::metadata(disk).is_ok_and(|d| same_file(&d, &there))
    {
        // Saved again where it was restored from: the link is there already.
        return Ok(());
    }
    if let Ok(meta) = std::fs::symlink_metadata(&dst) {
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} is not a regular file", dst.display()),
            ));
        }
        std::fs::remove_file(&dst)?;
    }
    let Some(disk) = disk else {
        return Ok(());
    };
    match std::fs::hard_link(disk, &dst) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let part = to.join(format!("{name}.part"));
            let _ = std::fs::remove_file(&part);
            std::fs::copy(disk, &part)?;
            std::fs::rename(&part, &dst)
        }
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("cannot link the disk {}: {e}", disk.display()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("agentos-snapshot-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_moved_snapshot_replaces_the_old_one_whole() {
        let (from, to) = (scratch("from"), scratch("to"));
        std::fs::write(from.join(MEMORY_FILE), b"new memory").unwrap();
        std::fs::write(from.join(STATE_FILE), b"new state").unwrap();
        std::fs::write(to.join(MEMORY_FILE), b"old memory").unwrap();
        std::fs::write(to.join(STATE_FILE), b"old state").unwrap();
        move_snapshot(&from, &to, None, None).unwrap();
        assert_eq!(std::fs::read(to.join(MEMORY_FILE)).unwrap(), b"new memory");
        assert_eq!(std::fs::read(to.join(STATE_FILE)).unwrap(), b"new state");
        assert!(!from.join(MEMORY_FILE).exists());

        // A symlink where a file goes is refused, and nothing is moved through it.
        std::fs::write(from.join(MEMORY_FILE), b"m").unwrap();
        std::fs::write(from.join(STATE_FILE), b"s").unwrap();
        std::fs::remove_file(to.join(MEMORY_FILE)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", to.join(MEMORY_FILE)).unwrap();
        assert!(move_snapshot(&from, &to, None, None).is_err());
        assert!(from.join(MEMORY_FILE).exists());
        for dir in [from, to] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn a_snapshot_with_a_model_links_its_disks_and_finds_them_again() {
        use std::os::unix::fs::MetadataExt;
        let (from, to, images) = (
            scratch("disks-from"),
            scratch("disks-to"),
            scratch("images"),
        );
        let disks = ModelDisks {
            runtime: images.join("runtime-1.img"),
            bundle: images.join("model-m-1.img"),
            name: "m".into(),
            device: agentos_image::model::DiskDevice::Pmem,
        };
        // The least a model disk is, told apart by its last bytes.
        let image = |tag: &[u8]| {
            let mut bytes = agentos_image::model::least_image();
            let end = bytes.len();
            bytes[end - tag.len()..].copy_from_slice(tag);
            bytes
        };
        let tag = |path: &Path| {
            let bytes = std::fs::read(path).unwrap();
            bytes[bytes.len() - 6..].to_vec()
        };
        std::fs::write(&disks.runtime, image(b"runtim")).unwrap();
        std::fs::write(&disks.bundle, image(b"bundle")).unwrap();
        let save = |disks: Option<&ModelDisks>| {
            std::fs::write(from.join(MEMORY_FILE), b"memory").unwrap();
            std::fs::write(from.join(STATE_FILE), b"state").unwrap();
            move_snapshot(&from, &to, disks, None).unwrap();
        };
        save(Some(&disks));
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        assert_eq!(ino(&to.join(RUNTIME_DISK_FILE)), ino(&disks.runtime));
        assert_eq!(ino(&to.join(MODEL_DISK_FILE)), ino(&disks.bundle));
        // Without the bundle's name in agent.json the disks are not the snapshot's.
        assert_eq!(model_disks_of(&to).unwrap(), None);
        SavedAgent {
            model: Some("m".into()),
            template: None,
        }
        .write(&to)
        .unwrap();
        let found = model_disks_of(&to).unwrap().unwrap();
        assert_eq!(found.runtime, to.join(RUNTIME_DISK_FILE));
        assert_eq!(found.name, "m");
        // The store may drop its images: the snapshot keeps its own links.
        std::fs::remove_dir_all(&images).unwrap();
        assert_eq!(tag(&found.bundle), b"bundle");
        // Saved again where it was restored from: the links stay as they are.
        save(Some(&found));
        assert_eq!(tag(&to.join(MODEL_DISK_FILE)), b"bundle");
        // A disk that is no file system is refused before anything starts.
        std::fs::write(to.join("other.img"), vec![0u8; 4 << 20]).unwrap();
        std::fs::rename(to.join("other.img"), to.join(MODEL_DISK_FILE)).unwrap();
        let err = agentos_protocol::error_chain(&model_disks_of(&to).unwrap_err());
        assert!(err.contains("has no valid pmem info block"), "{err}");
        // A later snapshot without a model leaves no disks behind.
        save(None);
        assert!(!to.join(RUNTIME_DISK_FILE).exists() && !to.join(MODEL_DISK_FILE).exists());
        let err = agentos_protocol::error_chain(&model_disks_of(&to).unwrap_err());
        assert!(err.contains("runtime.img is missing"), "{err}");
        for dir in [from, to] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn a_snapshot_with_a_template_keeps_its_disk() {
        use std::os::unix::fs::MetadataExt;
        let (from, to, images) = (
            scratch("base-from"),
            scratch("base-to"),
            scratch("base-images"),
        );
        let disk = images.join("base-1.img");
        std::fs::write(&disk, agentos_image::model::least_image()).unwrap();
        std::fs::write(from.join(MEMORY_FILE), b"memory").unwrap();
        std::fs::write(from.join(STATE_FILE), b"state").unwrap();
        move_snapshot(&from, &to, None, Some(&disk)).unwrap();
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        assert_eq!(
            ino(&to.join(BASE_DISK_FILE)),
            ino(&disk),
            "a link, not a copy"
        );
        assert_eq!(
            base_disk_of(&to).unwrap(),
            None,
            "agent.json names no template"
        );
        let saved = |template: &str| {
            SavedAgent {
                model: None,
                template: Some(template.into()),
            }
            .write(&to)
            .unwrap()
        };
        saved("base");
        assert_eq!(base_disk_of(&to).unwrap(), Some(to.join(BASE_DISK_FILE)));
        saved("desktop");
        let err = agentos_protocol::error_chain(&base_disk_of(&to).unwrap_err());
        assert!(err.contains("does not know"), "{err}");
        saved("base");
        std::fs::remove_file(to.join(BASE_DISK_FILE)).unwrap();
        let err = agentos_protocol::error_chain(&base_disk_of(&to).unwrap_err());
        assert!(err.contains("base.img is missing"), "{err}");
        for dir in [from, to, images] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn the_saved_agent_reads_back_and_defaults_to_no_model() {
        let dir = scratch("agent");
        assert_eq!(SavedAgent::read(&dir).unwrap(), SavedAgent::default());
        let agent = SavedAgent {
            model: Some("sentiment".into()),
            template: None,
        };
        agent.write(&dir).unwrap();
        agent.write(&dir).unwrap();
        assert_eq!(SavedAgent::read(&dir).unwrap(), agent);
        std::fs::write(dir.join(AGENT_FILE), b"{\"model\":1}").unwrap();
        assert!(SavedAgent::read(&dir).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn what_is_not_a_snapshot_is_refused_with_why() {
        let dir = scratch("shape");
        let err = agentos_protocol::error_chain(&snapshot_shape(&dir).unwrap_err());
        assert!(err.contains("is not a snapshot"), "{err}");
        std::fs::write(dir.join(STATE_FILE), b"").unwrap();
        let err = agentos_protocol::error_chain(&snapshot_shape(&dir).unwrap_err());
        assert!(err.contains("before a snapshot was taken"), "{err}");
        assert!(check_snapshot_target(&dir.join("missing"), None).is_err());
        let err = check_snapshot_target(&dir, Some(&dir))
            .unwrap_err()
            .to_string();
        assert!(err.contains("restored from"), "{err}");
        assert!(check_snapshot_target(&dir, None).is_ok());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
