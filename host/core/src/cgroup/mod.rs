//! Each agent's VMM, with all its threads, in a cgroup of its own under an `agentos` parent:
//! CPU quota and weight, cpuset, memory and pids limits. Every controller is used in the
//! hierarchy the host mounts it in (v2 or v1, see [`layout`]); the VMM joins its cgroup before
//! it starts a thread (`agentos-vmm --cgroup-procs`), so that no vCPU ever runs outside it.

pub mod layout;
pub mod slice;

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

pub use self::layout::{Controller, Layout, Version};
pub use self::slice::{PriorityClass, Slice, SliceError};

/// The directory, in every hierarchy, that holds the agents' cgroups.
pub const PARENT: &str = "agentos";
/// How long removal waits for a cgroup's last task to be gone.
const REMOVE_PATIENCE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "the {0} cgroup controller is not available on this host (mount it as cgroup v1 or enable it in cgroup2; see `agentos doctor`)"
    )]
    NoController(Controller),
    #[error("cannot create cgroup {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write `{value}` to {path}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("no running agent is called `{0}` (see `agentos top`)")]
    NoAgent(String),
}

impl CgroupError {
    /// Whether the host simply does not let us manage cgroups (not root, read-only mount).
    pub fn is_not_permitted(&self) -> bool {
        let source = match self {
            CgroupError::NoController(_) | CgroupError::NoAgent(_) => return false,
            CgroupError::Create { source, .. } | CgroupError::Write { source, .. } => source,
        };
        source.kind() == io::ErrorKind::PermissionDenied
            || source.raw_os_error() == Some(libc::EROFS)
            || source.raw_os_error() == Some(libc::EPERM)
    }
}

/// How long a freeze may take to reach every task before it counts as failed.
const FREEZE_PATIENCE: Duration = Duration::from_secs(5);

/// One agent's cgroup: a directory per hierarchy, removed when dropped.
#[derive(Debug)]
pub struct AgentCgroup {
    /// Each controller's version and directory for this cgroup.
    placed: Vec<(Controller, Version, PathBuf)>,
    /// Created by us (removed when dropped), or only opened to watch or pause it.
    owned: bool,
}

/// What the cgroup files say about an agent's use of the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct CgroupStats {
    /// CPU time used by every task in the cgroup, in microseconds.
    pub cpu_usage_us: u64,
    /// Periods in which the quota ran out, and the time spent throttled.
    pub nr_throttled: u64,
    pub throttled_us: u64,
    pub memory_bytes: u64,
    pub memory_peak_bytes: u64,
}

impl AgentCgroup {
    /// Creates `agentos/NAME` in every hierarchy that hosts one of our controllers and writes
    /// `slice` into it. Fails if the slice needs a controller the host does not have.
    pub fn create(layout: &Layout, name: &str, slice: &Slice) -> Result<Self, CgroupError> {
        if let Some(missing) = slice
            .controllers()
            .into_iter()
            .find(|c| layout.hierarchy(*c).is_none())
        {
            return Err(CgroupError::NoController(missing));
        }
        let mut cgroup = AgentCgroup {
            placed: Vec::new(),
            owned: true,
        };
        for (hierarchy, controllers) in layout.hierarchies() {
            let parent = hierarchy.mount.join(PARENT);
            prepare_parent(&hierarchy.mount, &parent, hierarchy.version, &controllers)?;
            let dir = parent.join(name);
            create_dir(&dir)?;
            // Recorded at once, so that a failure below still removes it.
            cgroup.place_all(hierarchy.version, &dir, &controllers);
            if hierarchy.version == Version::V1 && controllers.contains(&Controller::Cpuset) {
                inherit_cpuset(&parent, &dir)?;
            }
            for controller in &controllers {
                for (file, value) in slice.files(*controller, hierarchy.version) {
                    write_file(&dir.join(file), &value)?;
                }
            }
        }
        debug!(dirs = ?cgroup.dirs(), "agent cgroup created");
        Ok(cgroup)
    }

    /// The running agent cgroup NAME, to watch or pause (it stays when dropped).
    pub fn open(layout: &Layout, name: &str) -> Result<Self, CgroupError> {
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        let mut cgroup = AgentCgroup {
            placed: Vec::new(),
            owned: false,
        };
        for (hierarchy, controllers) in layout.hierarchies() {
            let dir = hierarchy.mount.join(PARENT).join(name);
            if valid && dir.is_dir() {
                cgroup.place_all(hierarchy.version, &dir, &controllers);
            }
        }
        if cgroup.placed.is_empty() {
            return Err(CgroupError::NoAgent(name.to_string()));
        }
        Ok(cgroup)
    }

    /// The names of the agent cgroups on this host.
    pub fn list(layout: &Layout) -> Vec<String> {
        let mut names: Vec<String> = layout
            .hierarchies()
            .keys()
            .filter_map(|h| std::fs::read_dir(h.mount.join(PARENT)).ok())
            .flat_map(|d| d.filter_map(Result::ok))
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    fn place_all(&mut self, version: Version, dir: &Path, controllers: &[Controller]) {
        self.placed
            .extend(controllers.iter().map(|c| (*c, version, dir.to_owned())));
    }

    /// The cgroup's directories, one per hierarchy.
    pub fn dirs(&self) -> Vec<&Path> {
        let mut dirs: Vec<&Path> = Vec::new();
        for (_, _, dir) in &self.placed {
            if !dirs.contains(&dir.as_path()) {
                dirs.push(dir);
            }
        }
        dirs
    }

    /// Every `cgroup.procs` of the cgroup: a process that writes `0` to them joins it.
    pub fn procs_paths(&self) -> Vec<PathBuf> {
        self.dirs()
            .into_iter()
            .map(|dir| dir.join("cgroup.procs"))
            .collect()
    }

    fn place(&self, controller: Controller) -> Result<(Version, &Path), CgroupError> {
        self.placed
            .iter()
            .find(|(c, _, _)| *c == controller)
            .map(|(_, v, dir)| (*v, dir.as_path()))
            .ok_or(CgroupError::NoController(controller))
    }

    /// Changes the CPU weight of the running agent (its priority class).
    pub fn set_weight(&self, weight: u32) -> Result<(), CgroupError> {
        self.apply(
            Controller::Cpu,
            &Slice {
                weight: Some(weight),
                ..Slice::default()
            },
        )
    }

    /// Changes the memory limit of the running agent.
    pub fn set_memory_max(&self, bytes: u64) -> Result<(), CgroupError> {
        self.apply(
            Controller::Memory,
            &Slice {
                memory_bytes: Some(bytes),
                ..Slice::default()
            },
        )
    }

    /// Writes what `slice` sets for `controller` into the running agent's cgroup.
    fn apply(&self, controller: Controller, slice: &Slice) -> Result<(), CgroupError> {
        let (version, dir) = self.place(controller)?;
        for (file, value) in slice.files(controller, version) {
            write_file(&dir.join(file), &value)?;
        }
        Ok(())
    }

    /// Moves the running agent to the CPUs of `cpus` (a list such as `1` or `0-1`).
    pub fn set_cpuset(&self, cpus: &str) -> Result<(), CgroupError> {
        let (_, dir) = self.place(Controller::Cpuset)?;
        write_file(&dir.join("cpuset.cpus"), cpus)
    }

    /// Stops every task of the cgroup, and returns once all are stopped.
    pub fn freeze(&self) -> Result<(), CgroupError> {
        self.set_frozen(true)
    }

    /// Lets the tasks of a frozen cgroup run again.
    pub fn thaw(&self) -> Result<(), CgroupError> {
        self.set_frozen(false)
    }

    fn set_frozen(&self, frozen: bool) -> Result<(), CgroupError> {
        let (version, dir) = self.place(Controller::Freezer)?;
        let (file, value) = match (version, frozen) {
            (Version::V2, true) => ("cgroup.freeze", "1"),
            (Version::V2, false) => ("cgroup.freeze", "0"),
            (Version::V1, true) => ("freezer.state", "FROZEN"),
            (Version::V1, false) => ("freezer.state", "THAWED"),
        };
        write_file(&dir.join(file), value)?;
        let deadline = Instant::now() + FREEZE_PATIENCE;
        while !freeze_reached(version, dir, frozen) {
            if Instant::now() >= deadline {
                return Err(CgroupError::Write {
                    path: dir.join(file),
                    value: value.into(),
                    source: io::Error::new(io::ErrorKind::TimedOut, "tasks did not follow"),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Whether the cgroup is frozen (paused), or being frozen.
    pub fn is_frozen(&self) -> bool {
        match self.place(Controller::Freezer) {
            Ok((Version::V2, dir)) => {
                std::fs::read_to_string(dir.join("cgroup.freeze")).is_ok_and(|s| s.trim() == "1")
            }
            Ok((Version::V1, dir)) => std::fs::read_to_string(dir.join("freezer.state"))
                .is_ok_and(|s| s.trim() != "THAWED"),
            Err(_) => false,
        }
    }

    /// What the agent holds of the host, read back from its limits: CPU quota (in CPUs), cpuset
    /// and memory limit. Missing or unlimited values are None.
    pub fn held(&self) -> Slice {
        let mut held = Slice::default();
        if let Ok((version, dir)) = self.place(Controller::Cpu) {
            let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
            let (quota, period) = match version {
                Version::V2 => {
                    let max = read("cpu.max");
                    let mut parts = max.split_whitespace();
                    (
                        parts.next().and_then(|q| q.parse::<i64>().ok()),
                        parts.next().and_then(|p| p.parse::<i64>().ok()),
                    )
                }
                Version::V1 => (
                    read("cpu.cfs_quota_us").trim().parse().ok(),
                    read("cpu.cfs_period_us").trim().parse().ok(),
                ),
            };
            held.cpus = match (quota, period) {
                (Some(q), Some(p)) if q > 0 && p > 0 => Some(q as f64 / p as f64),
                _ => None,
            };
        }
        if let Ok((_, dir)) = self.place(Controller::Cpuset) {
            held.cpuset = std::fs::read_to_string(dir.join("cpuset.cpus"))
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty());
        }
        if let Ok((version, dir)) = self.place(Controller::Memory) {
            let file = match version {
                Version::V2 => "memory.max",
                Version::V1 => "memory.limit_in_bytes",
            };
            // "max" (v2) or a huge number (v1) mean no limit.
            held.memory_bytes =
                Some(read_number(&dir.join(file))).filter(|b| *b > 0 && *b < 1 << 60);
        }
        held
    }

    /// CPU and memory use, from the cgroup's accounting files (0 where a figure is missing).
    pub fn stats(&self) -> CgroupStats {
        let mut stats = CgroupStats::default();
        if let Ok((version, dir)) = self.place(Controller::Cpuacct) {
            let cpu_stat = read_keyed(&dir.join("cpu.stat"));
            stats.cpu_usage_us = match version {
                Version::V2 => cpu_stat("usage_usec"),
                Version::V1 => read_number(&dir.join("cpuacct.usage")) / 1000,
            };
        }
        if let Ok((version, dir)) = self.place(Controller::Cpu) {
            let cpu_stat = read_keyed(&dir.join("cpu.stat"));
            stats.nr_throttled = cpu_stat("nr_throttled");
            stats.throttled_us = match version {
                Version::V2 => cpu_stat("throttled_usec"),
                Version::V1 => cpu_stat("throttled_time") / 1000,
            };
        }
        if let Ok((version, dir)) = self.place(Controller::Memory) {
            let (current, peak) = match version {
                Version::V2 => ("memory.current", "memory.peak"),
                Version::V1 => ("memory.usage_in_bytes", "memory.max_usage_in_bytes"),
            };
            stats.memory_bytes = read_number(&dir.join(current));
            stats.memory_peak_bytes = read_number(&dir.join(peak));
        }
        stats
    }
}

/// Whether every task of the cgroup in `dir` has followed a freeze (or thaw).
fn freeze_reached(version: Version, dir: &Path, frozen: bool) -> bool {
    match version {
        Version::V1 => std::fs::read_to_string(dir.join("freezer.state"))
            .is_ok_and(|s| s.trim() == if frozen { "FROZEN" } else { "THAWED" }),
        // `cgroup.events` never says `frozen 1` while the cgroup holds kernel threads, and
        // KVM puts its per-VM workers in the VM creator's cgroup: look at the user tasks.
        Version::V2 if frozen => {
            let threads = std::fs::read_to_string(dir.join("cgroup.threads")).unwrap_or_default();
            threads
                .lines()
                .all(|tid| is_kernel_thread(tid) || in_freezer_trap(tid))
        }
        Version::V2 => true,
    }
}

/// PF_KTHREAD in the flags of /proc/TID/stat.
const PF_KTHREAD: u64 = 0x0020_0000;

fn is_kernel_thread(tid: &str) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{tid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name: state, ppid, pgrp, session, tty, tpgid, flags.
    stat.rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().nth(6))
        .and_then(|flags| flags.parse::<u64>().ok())
        .is_some_and(|flags| flags & PF_KTHREAD != 0)
}

/// A task frozen by the v2 freezer waits in `do_freezer_trap` (which the compiler may fold into
/// `get_signal`); a task that is gone counts too.
fn in_freezer_trap(tid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{tid}/wchan")) {
        Ok(wchan) => matches!(wchan.trim(), "do_freezer_trap" | "get_signal"),
        Err(_) => true,
    }
}

fn read_number(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// A `key value` per line file (cpu.stat), as a lookup returning 0 for missing keys.
fn read_keyed(path: &Path) -> impl Fn(&str) -> u64 + use<> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    move |key| {
        text.lines()
            .filter_map(|l| l.split_once(' '))
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for AgentCgroup {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        for dir in self.dirs().into_iter().rev() {
            if let Err(e) = remove_dir(dir) {
                warn!(dir = %dir.display(), error = %e, "cannot remove an agent cgroup");
            }
        }
    }
}

/// Removes the cgroups of agents whose owner process is gone (a run or daemon that was killed),
/// with anything left in them. Names are `LABEL-PID-N`, PID being the owner's.
pub fn remove_stale(layout: &Layout) {
    for name in AgentCgroup::list(layout) {
        let Some(owner) = owner_pid(&name) else {
            continue;
        };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        if let Ok(mut stale) = AgentCgroup::open(layout, &name) {
            debug!(name, "removing a stale agent cgroup");
            // Owned from here: dropping it removes it.
            stale.owned = true;
        }
    }
}

/// The owner's pid in a cgroup name `LABEL-PID-N`.
pub fn owner_pid(name: &str) -> Option<u32> {
    let mut parts = name.rsplitn(3, '-');
    let _n: u32 = parts.next()?.parse().ok()?;
    let pid = parts.next()?.parse().ok()?;
    parts.next().filter(|label| !label.is_empty())?;
    Some(pid)
}

/// Creates the `agentos` parent and lets its children use our controllers.
fn prepare_parent(
    root: &Path,
    parent: &Path,
    version: Version,
    controllers: &[Controller],
) -> Result<(), CgroupError> {
    create_dir(parent)?;
    match version {
        Version::V1 => {
            if controllers.contains(&Controller::Cpuset) {
                inherit_cpuset(root, parent)?;
            }
        }
        Version::V2 => {
            for dir in [root, parent] {
                for c in controllers.iter().filter(|c| !c.is_v2_core()) {
                    let file = dir.join("cgroup.subtree_control");
                    write_file(&file, &format!("+{}", c.name()))?;
                }
            }
        }
    }
    Ok(())
}

/// A new v1 cpuset has no CPUs and no memory nodes, and takes no task until it has both.
fn inherit_cpuset(from: &Path, to: &Path) -> Result<(), CgroupError> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let current = std::fs::read_to_string(to.join(file)).unwrap_or_default();
        if current.trim().is_empty() {
            let value = std::fs::read_to_string(from.join(file)).unwrap_or_default();
            write_file(&to.join(file), value.trim())?;
        }
    }
    Ok(())
}

fn create_dir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Create {
            path: path.to_owned(),
            source,
        }),
    }
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|source| CgroupError::Write {
            path: path.to_owned(),
            value: value.to_string(),
            source,
        })
}

/// Removes a cgroup directory once its tasks are gone, killing any that linger.
fn remove_dir(dir: &Path) -> io::Result<()> {
    let deadline = Instant::now() + REMOVE_PATIENCE;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => {
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                for pid in procs
                    .lines()
                    .filter_map(|l| l.trim().parse::<i32>().ok())
                    .filter(|pid| *pid > 0)
                {
                    // SAFETY: kill has no memory-safety preconditions; these are the lingering
                    // tasks of an agent cgroup that is being removed.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[cfg(test)]
mod tests;
