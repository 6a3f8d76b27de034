//! Where this host mounts each cgroup controller: in the unified (v2) hierarchy, or in a v1
//! hierarchy of its own. Hosts mix both (e.g. cpu, memory and pids on v1, cgroup2 beside them),
//! so the choice is made per controller.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

/// The controllers agentos uses for an agent's slice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Controller {
    Cpu,
    Cpuset,
    Memory,
    Pids,
    Freezer,
    /// CPU time accounting: its own controller in v1, `cpu.stat` of every cgroup in v2.
    Cpuacct,
}

impl Controller {
    pub const ALL: [Controller; 6] = [
        Controller::Cpu,
        Controller::Cpuset,
        Controller::Memory,
        Controller::Pids,
        Controller::Freezer,
        Controller::Cpuacct,
    ];

    /// Part of every cgroup in v2, not a controller to enable.
    pub fn is_v2_core(self) -> bool {
        matches!(self, Controller::Freezer | Controller::Cpuacct)
    }

    pub fn name(self) -> &'static str {
        match self {
            Controller::Cpu => "cpu",
            Controller::Cpuset => "cpuset",
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Freezer => "freezer",
            Controller::Cpuacct => "cpuacct",
        }
    }
}

impl fmt::Display for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V1,
    V2,
}

/// One mounted hierarchy that hosts some of our controllers.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Hierarchy {
    pub version: Version,
    pub mount: PathBuf,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Layout {
    placement: BTreeMap<Controller, Hierarchy>,
}

impl Layout {
    /// The layout of the hierarchies this process sees.
    pub fn discover() -> Layout {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        Layout::from_mountinfo(&mountinfo, |mount| {
            std::fs::read_to_string(mount.join("cgroup.controllers")).ok()
        })
    }

    /// Builds the layout from `/proc/self/mountinfo` text; `controllers_of` reads the
    /// `cgroup.controllers` file at the root of a cgroup2 mount.
    pub fn from_mountinfo(
        mountinfo: &str,
        controllers_of: impl Fn(&Path) -> Option<String>,
    ) -> Layout {
        let mut unified: Option<PathBuf> = None;
        let mut v1: BTreeMap<Controller, PathBuf> = BTreeMap::new();
        for line in mountinfo.lines() {
            // Fields: id parent major:minor root mount-point options [optional...] - fstype source super-options
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let Some(mount) = left.split(' ').nth(4) else {
                continue;
            };
            let mount = PathBuf::from(unescape(mount));
            let mut right = right.split(' ');
            let fstype = right.next().unwrap_or("");
            let super_options = right.nth(1).unwrap_or("");
            match fstype {
                "cgroup2" if unified.is_none() => unified = Some(mount),
                "cgroup" => {
                    for option in super_options.split(',') {
                        if let Some(c) = Controller::ALL.iter().find(|c| c.name() == option) {
                            v1.entry(*c).or_insert_with(|| mount.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        let unified_controllers: BTreeSet<String> = unified
            .as_deref()
            .and_then(&controllers_of)
            .map(|text| text.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default();
        let mut placement = BTreeMap::new();
        for c in Controller::ALL {
            if let Some(mount) = v1.get(&c) {
                placement.insert(
                    c,
                    Hierarchy {
                        version: Version::V1,
                        mount: mount.clone(),
                    },
                );
            } else if let Some(mount) = &unified
                && (c.is_v2_core() || unified_controllers.contains(c.name()))
            {
                placement.insert(
                    c,
                    Hierarchy {
                        version: Version::V2,
                        mount: mount.clone(),
                    },
                );
            }
        }
        Layout { placement }
    }

    /// The hierarchy that hosts `controller`, if any does.
    pub fn hierarchy(&self, controller: Controller) -> Option<&Hierarchy> {
        self.placement.get(&controller)
    }

    /// Every hierarchy in use, each with the controllers it hosts for us.
    pub fn hierarchies(&self) -> BTreeMap<Hierarchy, Vec<Controller>> {
        let mut by_hierarchy: BTreeMap<Hierarchy, Vec<Controller>> = BTreeMap::new();
        for (c, h) in &self.placement {
            by_hierarchy.entry(h.clone()).or_default().push(*c);
        }
        by_hierarchy
    }

    /// One line per controller: where it is, for `agentos doctor`.
    pub fn describe(&self) -> Vec<String> {
        Controller::ALL
            .iter()
            .map(|c| match self.hierarchy(*c) {
                Some(h) => format!(
                    "{c}: {} at {}",
                    match h.version {
                        Version::V1 => "v1",
                        Version::V2 => "v2",
                    },
                    h.mount.display()
                ),
                None => format!("{c}: not mounted"),
            })
            .collect()
    }
}

/// Mount points in mountinfo escape space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) if bytes[i] == b'\\' => {
                let value = d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This kind of host: cpu, cpuset, memory, pids and freezer on v1, cgroup2 beside them.
    const MIXED: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    const UNIFIED: &str = "25 20 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";

    #[test]
    fn mixed_hosts_use_v1_for_the_controllers_it_mounts() {
        let layout = Layout::from_mountinfo(MIXED, |_| Some("hugetlb\n".into()));
        for c in Controller::ALL {
            let h = layout.hierarchy(c).unwrap();
            assert_eq!(h.version, Version::V1, "{c}");
            assert_eq!(h.mount, Path::new("/sys/fs/cgroup").join(c.name()));
        }
        assert_eq!(layout.hierarchies().len(), 6);
    }

    #[test]
    fn unified_hosts_use_v2_for_enabled_controllers_and_the_freezer() {
        let layout = Layout::from_mountinfo(UNIFIED, |p| {
            assert_eq!(p, Path::new("/sys/fs/cgroup"));
            Some("cpu memory pids\n".into())
        });
        let hierarchies = layout.hierarchies();
        assert_eq!(hierarchies.len(), 1);
        let (h, controllers) = hierarchies.iter().next().unwrap();
        assert_eq!(h.version, Version::V2);
        assert_eq!(
            controllers,
            &[
                Controller::Cpu,
                Controller::Memory,
                Controller::Pids,
                Controller::Freezer,
                Controller::Cpuacct
            ]
        );
        assert!(layout.hierarchy(Controller::Cpuset).is_none());
    }

    #[test]
    fn co_mounted_v1_controllers_share_one_hierarchy() {
        let info = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n";
        let layout = Layout::from_mountinfo(info, |_| None);
        assert_eq!(
            layout.hierarchy(Controller::Cpu).unwrap().mount,
            Path::new("/sys/fs/cgroup/cpu,cpuacct")
        );
        assert!(layout.hierarchy(Controller::Memory).is_none());
    }

    #[test]
    fn no_cgroup_mounts_means_no_controllers() {
        let layout = Layout::from_mountinfo("1 0 0:1 / / rw - ext4 /dev/sda rw\n", |_| None);
        assert!(layout.hierarchies().is_empty());
    }

    #[test]
    fn escaped_mount_points_are_decoded() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/end\04"), r"/end\04");
    }
}
