//! Per-VM run directories: the sockets, console log and report of one VM, private to the user and
//! removed when the VM is done.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Unix socket paths must fit in 108 bytes, so run directories live under a short base.
pub fn runtime_base() -> PathBuf {
    if let Some(dir) = std::env::var_os("AGENTOS_RUN_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(dir).join("agentos");
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    std::env::temp_dir().join(format!("agentos-{uid}"))
}

/// A file in a run directory naming what runs there for people (`group/agent`).
const LABEL_FILE: &str = "label";

/// The label of the VM whose run directory (and cgroup) is named `name`, if it has one.
pub fn label_of(name: &str) -> Option<String> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return None;
    }
    let text = std::fs::read_to_string(runtime_base().join(name).join(LABEL_FILE)).ok()?;
    let label = text.trim();
    (!label.is_empty()).then(|| label.to_owned())
}

/// Removes the run directories of processes that are gone (a run or daemon that was killed);
/// returns how many.
pub fn remove_stale() -> usize {
    let Ok(entries) = std::fs::read_dir(runtime_base()) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(owner) = crate::cgroup::owner_pid(&name) else {
            continue;
        };
        if !entry.file_type().is_ok_and(|t| t.is_dir())
            || Path::new(&format!("/proc/{owner}")).exists()
        {
            continue;
        }
        if std::fs::remove_dir_all(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Listens on a Unix socket in a run directory for a VMM's connections. The jailed VMM runs as
/// another user (see [`crate::jail`]), and connecting needs write permission on the socket: it is
/// made 0666, which opens it to no one else, as the run directory (mode 0700, given to the VMM's
/// user) and its base (mode 0700) let only root and that VMM through.
pub fn listen(path: &Path) -> io::Result<UnixListener> {
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(VMM_SOCKET_MODE))?;
    Ok(listener)
}

/// Mode of the sockets a VMM connects to (see [`listen`]).
const VMM_SOCKET_MODE: u32 = 0o666;

pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// Creates a fresh, empty directory (mode 0700) for one VM of this process.
    pub fn create(label: &str) -> io::Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let base = runtime_base();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&base)?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = base.join(format!("{label}-{}-{n}", std::process::id()));
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Names what runs here, for `agentos top` and friends.
    pub fn set_label(&self, label: &str) -> io::Result<()> {
        std::fs::write(self.join(LABEL_FILE), label)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_read_back_by_directory_name() {
        let dir = RunDir::create("t").unwrap();
        let name = dir.path().file_name().unwrap().to_str().unwrap().to_owned();
        assert_eq!(label_of(&name), None);
        dir.set_label("digest/summarizer\n").unwrap();
        assert_eq!(label_of(&name).as_deref(), Some("digest/summarizer"));
        assert_eq!(label_of("../etc"), None);
    }

    #[test]
    fn run_dirs_are_private_unique_and_removed() {
        use std::os::unix::fs::PermissionsExt;
        let a = RunDir::create("t").unwrap();
        let b = RunDir::create("t").unwrap();
        assert_ne!(a.path(), b.path());
        let mode = std::fs::metadata(a.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let path = a.path().to_path_buf();
        std::fs::write(a.join("f"), b"x").unwrap();
        drop(a);
        assert!(!path.exists());
    }
}
