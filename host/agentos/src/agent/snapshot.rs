//! Snapshot directories as the host side sees them: what a snapshot holds before it is
//! restored, where one may be written, moving one into place, and what the host keeps beside
//! the VM's files (`agent.json`: the agent's model).

use std::io;
use std::path::Path;

use agentos_vmm::config::MAX_VCPUS;
use agentos_vmm::snapshot::{MEMORY_FILE, STATE_FILE, VmSnapshot};
use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// What the host knows of a saved agent beyond its VM, beside the VM's files.
pub const AGENT_FILE: &str = "agent.json";
/// The most of an agent file that is read.
const MAX_AGENT_FILE_BYTES: u64 = 64 * 1024;

/// The agent a snapshot holds, as the daemon saw it.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SavedAgent {
    /// The model bundle it carries (loaded, if it ran).
    #[serde(default)]
    pub model: Option<String>,
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
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        use std::io::Read;
        let path = dir.join(AGENT_FILE);
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
        };
        let mut text = Vec::new();
        file.take(MAX_AGENT_FILE_BYTES).read_to_end(&mut text)?;
        serde_json::from_slice(&text).with_context(|| format!("{} is not valid", path.display()))
    }
}

/// The vCPUs and memory of the agent saved in `dir`, whose state is read and checked whole (a
/// snapshot that cannot be restored is refused before anything starts).
pub fn snapshot_shape(dir: &Path) -> anyhow::Result<(u8, u64)> {
    let state = dir.join(STATE_FILE);
    let file = std::fs::File::open(&state).with_context(|| {
        format!(
            "{} is not a snapshot: cannot open {}",
            dir.display(),
            state.display()
        )
    })?;
    let snapshot = VmSnapshot::read_from(&file)
        .with_context(|| format!("{} cannot be restored", dir.display()))?;
    let memory = dir.join(MEMORY_FILE);
    let expected = snapshot.memory_mib.checked_mul(1 << 20).with_context(|| {
        format!(
            "{} cannot be restored: its memory size is absurd",
            dir.display()
        )
    })?;
    match std::fs::metadata(&memory) {
        Ok(m) if m.len() == expected => {}
        Ok(m) => bail!(
            "{} cannot be restored: its memory file holds {} bytes, not {expected}",
            dir.display(),
            m.len()
        ),
        Err(e) => bail!(
            "{} cannot be restored: its memory file {} is missing ({e})",
            dir.display(),
            memory.display()
        ),
    }
    let vcpus = u8::try_from(snapshot.vcpus.len())
        .ok()
        .filter(|n| (1..=MAX_VCPUS).contains(n))
        .with_context(|| format!("{} has no vCPUs this VMM can run", dir.display()))?;
    Ok((vcpus, snapshot.memory_mib))
}

/// A directory a snapshot may be written to: it exists, and is not the one restored from.
pub fn check_snapshot_target(dir: &Path, from: Option<&Path>) -> anyhow::Result<()> {
    if !dir.is_dir() {
        bail!(
            "--snapshot-to {}: no such directory (create it first)",
            dir.display()
        );
    }
    if let Some(from) = from
        && std::fs::canonicalize(from).ok() == std::fs::canonicalize(dir).ok()
    {
        bail!(
            "--snapshot-to {} is the snapshot restored from: give another directory",
            dir.display()
        );
    }
    Ok(())
}

/// Moves the snapshot in `from` into the directory `to` (replacing what is there, never through
/// a symlink, never rewriting a file in place): the memory file first and the state last, so
/// that `to` holds a whole snapshot or none. Returns what the memory file takes on disk.
pub fn move_snapshot(from: &Path, to: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    for name in [MEMORY_FILE, STATE_FILE] {
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
        move_snapshot(&from, &to).unwrap();
        assert_eq!(std::fs::read(to.join(MEMORY_FILE)).unwrap(), b"new memory");
        assert_eq!(std::fs::read(to.join(STATE_FILE)).unwrap(), b"new state");
        assert!(!from.join(MEMORY_FILE).exists());

        // A symlink where a file goes is refused, and nothing is moved through it.
        std::fs::write(from.join(MEMORY_FILE), b"m").unwrap();
        std::fs::write(from.join(STATE_FILE), b"s").unwrap();
        std::fs::remove_file(to.join(MEMORY_FILE)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", to.join(MEMORY_FILE)).unwrap();
        assert!(move_snapshot(&from, &to).is_err());
        assert!(from.join(MEMORY_FILE).exists());
        for dir in [from, to] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn the_saved_agent_reads_back_and_defaults_to_no_model() {
        let dir = scratch("agent");
        assert_eq!(SavedAgent::read(&dir).unwrap(), SavedAgent::default());
        let agent = SavedAgent {
            model: Some("sentiment".into()),
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
        let err = format!("{:#}", snapshot_shape(&dir).unwrap_err());
        assert!(err.contains("is not a snapshot"), "{err}");
        std::fs::write(dir.join(STATE_FILE), b"").unwrap();
        let err = format!("{:#}", snapshot_shape(&dir).unwrap_err());
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
