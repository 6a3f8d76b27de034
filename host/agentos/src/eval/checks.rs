//! What `agentos eval` looks at on the host: a snapshot of what agentos can leave behind
//! (processes, cgroups, run directories, mounts, sockets, files), compared before and after the
//! cases, and the VMM's metrics.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

use agentos_core::cgroup::{AgentCgroup, Layout};
use agentos_core::rundir;
use agentos_image as image;

/// What agentos could leave on the host, one line per item.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostSnapshot {
    items: BTreeSet<String>,
}

impl HostSnapshot {
    pub fn take() -> Self {
        let mut items = BTreeSet::new();
        let me = std::process::id();
        for pid in pids() {
            let cmdline = cmdline(pid);
            if pid != me && cmdline.contains("agentos") {
                items.insert(format!("process {pid}: {cmdline}"));
            }
        }
        for name in AgentCgroup::list(&Layout::discover()) {
            items.insert(format!("cgroup agentos/{name}"));
        }
        // The base's lock files are its own, made once and kept by design.
        let mut run_dirs = BTreeSet::new();
        list_dir(&rundir::base_path(), "run directory entry", &mut run_dirs);
        items.extend(run_dirs.into_iter().filter(|i| !i.ends_with(".lock")));
        list_dir(
            &image::default_cache_dir().join("groups"),
            "group state",
            &mut items,
        );
        // The run directories' base (its entries are listed above) is agentos's own, created
        // once and kept by design.
        let base = rundir::base_path();
        if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("agentos") && entry.path() != base {
                    items.insert(format!("temporary file {}", entry.path().display()));
                }
            }
        }
        // Field 5 of mountinfo is the mount point.
        if let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") {
            for line in text.lines() {
                if let Some(point) = line.split(' ').nth(4) {
                    items.insert(format!("mount {point}"));
                }
            }
        }
        // The last field of /proc/net/unix is the socket's path, when it has one.
        if let Ok(text) = std::fs::read_to_string("/proc/net/unix") {
            for line in text.lines().skip(1) {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.len() >= 8 && fields[7].starts_with('/') {
                    items.insert(format!("socket {}", fields[7]));
                }
            }
        }
        Self { items }
    }

    /// What is here now and was not before.
    pub fn added_since(&self, before: &HostSnapshot) -> Vec<String> {
        self.items.difference(&before.items).cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

fn list_dir(dir: &Path, what: &str, items: &mut BTreeSet<String>) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            items.insert(format!("{what} {}", entry.path().display()));
        }
    }
}

fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            String::from_utf8_lossy(&c)
                .replace('\0', " ")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

/// The number at `path` (dotted: `vsock.tx_bad_chains`) in the VMM's metrics.
pub fn metric(metrics: &Value, path: &str) -> Option<u64> {
    path.split('.')
        .try_fold(metrics, |v, key| v.get(key))
        .and_then(Value::as_u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_found_by_dotted_path() {
        let m = serde_json::json!({"unhandled_io": 3, "vsock": {"bad_packets": 2}});
        assert_eq!(metric(&m, "unhandled_io"), Some(3));
        assert_eq!(metric(&m, "vsock.bad_packets"), Some(2));
        assert_eq!(metric(&m, "vsock.nothing"), None);
    }

    #[test]
    fn a_snapshot_sees_what_was_added() {
        let before = HostSnapshot::take();
        let dir = std::env::temp_dir().join(format!("agentos-snapshot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let after = HostSnapshot::take();
        std::fs::remove_dir_all(&dir).unwrap();
        let added = after.added_since(&before);
        assert!(
            added.iter().any(|a| a.contains(&dir.display().to_string())),
            "{added:?}"
        );
    }
}
