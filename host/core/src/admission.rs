//! Admission control: an agent starts only if its slice fits beside the agents already running.
//!
//! The host model is read from the machine itself: online CPUs and memory from /proc and /sys,
//! and what each running agent holds from its cgroup under `agentos/` (the cgroups are the
//! record, so every agentos process on the host sees the same agents). Checks and cgroup
//! creation happen under one lock (in the run-directory base: one per user, and only root can
//! create cgroups), so two agents starting at once cannot both take the last slice. Placement (`--pin`) uses the same model: the agent goes to the online CPU that
//! pinned agents load least.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::cgroup::slice::{online_cpu_list, parse_cpu_list};
use crate::cgroup::{AgentCgroup, Layout, Slice};
use crate::rundir;

/// Memory kept for the host itself: the larger of this and a tenth of its RAM.
const HOST_RESERVE_BYTES: u64 = 512 << 20;

/// What the host has, and what the running agents hold of it.
#[derive(Clone, Debug, PartialEq)]
pub struct HostModel {
    pub online_cpus: u32,
    /// Load on each online CPU from the agents pinned to some of the CPUs: an agent's quota
    /// (1 CPU without one) spread evenly over its cpuset.
    pub pinned_load: BTreeMap<u32, f64>,
    pub memory_bytes: u64,
    /// Sum of the running agents' memory limits.
    pub agents_memory_bytes: u64,
    /// Sum of the running agents' CPU quotas, in CPUs.
    pub agents_cpus: f64,
    pub agents: usize,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Refusal {
    #[error(
        "not enough memory for this agent: it needs {need_mib} MiB (guest RAM + VMM), but {agents} running agent(s) hold {held_mib} of the {usable_mib} MiB agents may use here; stop an agent, ask for less --memory, or pass --wait"
    )]
    Memory {
        need_mib: u64,
        held_mib: u64,
        usable_mib: u64,
        agents: usize,
    },
    #[error(
        "not enough CPU for this agent: it asks for --cpus {need}, but {agents} running agent(s) hold {held} of the {online} CPU(s) here; stop an agent, ask for fewer --cpus, or pass --wait"
    )]
    Cpu {
        need: f64,
        held: f64,
        online: u32,
        agents: usize,
    },
}

impl HostModel {
    /// The model of this host, with the agents found in `layout`'s `agentos/` cgroups.
    pub fn read(layout: &Layout) -> HostModel {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let online = parse_cpu_list(&online_cpu_list()).unwrap_or_else(|| vec![0]);
        let mut model = HostModel {
            online_cpus: online.len() as u32,
            pinned_load: online.iter().map(|cpu| (*cpu, 0.0)).collect(),
            memory_bytes: mem_total(&meminfo),
            agents_memory_bytes: 0,
            agents_cpus: 0.0,
            agents: 0,
        };
        for name in AgentCgroup::list(layout) {
            let Ok(agent) = AgentCgroup::open(layout, &name) else {
                continue;
            };
            let held = agent.held();
            let quota = held.cpus.unwrap_or(0.0);
            model.agents += 1;
            model.agents_memory_bytes += held.memory_bytes.unwrap_or(0);
            model.agents_cpus += quota;
            let pinned = held.cpuset.as_deref().and_then(parse_cpu_list);
            model.add_pinned(pinned.as_deref().unwrap_or_default(), quota);
        }
        model
    }

    /// Counts an agent pinned to `cpus` with `quota` CPUs (0: no quota, counted as one CPU). An
    /// empty set or one spanning every online CPU is not a pin.
    fn add_pinned(&mut self, cpus: &[u32], quota: f64) {
        let pinned: Vec<u32> = cpus
            .iter()
            .copied()
            .filter(|c| self.pinned_load.contains_key(c))
            .collect();
        if pinned.is_empty() || pinned.len() == self.pinned_load.len() {
            return;
        }
        let load = if quota > 0.0 { quota } else { 1.0 };
        for cpu in &pinned {
            if let Some(l) = self.pinned_load.get_mut(cpu) {
                *l += load / pinned.len() as f64;
            }
        }
    }

    /// The online CPU pinned agents load least (the lowest-numbered among equals).
    pub fn least_loaded_cpu(&self) -> u32 {
        self.pinned_load
            .iter()
            .min_by(|a, b| a.1.total_cmp(b.1).then(a.0.cmp(b.0)))
            .map_or(0, |(cpu, _)| *cpu)
    }

    /// Memory agents may hold in all.
    pub fn usable_memory_bytes(&self) -> u64 {
        let reserve = HOST_RESERVE_BYTES.max(self.memory_bytes / 10);
        self.memory_bytes.saturating_sub(reserve)
    }

    /// Whether `slice` fits beside the running agents.
    pub fn admit(&self, slice: &Slice) -> Result<(), Refusal> {
        if let Some(need) = slice.memory_bytes {
            let usable = self.usable_memory_bytes();
            if self.agents_memory_bytes.saturating_add(need) > usable {
                return Err(Refusal::Memory {
                    need_mib: need >> 20,
                    held_mib: self.agents_memory_bytes >> 20,
                    usable_mib: usable >> 20,
                    agents: self.agents,
                });
            }
        }
        if let Some(need) = slice.cpus {
            // A little slack for rounding of the quotas read back.
            if self.agents_cpus + need > f64::from(self.online_cpus) + 1e-6 {
                return Err(Refusal::Cpu {
                    need,
                    held: (self.agents_cpus * 100.0).round() / 100.0,
                    online: self.online_cpus,
                    agents: self.agents,
                });
            }
        }
        Ok(())
    }
}

/// A lock held while an agent is admitted and its cgroup created, in this user's run-directory
/// base (a file no one else may touch: see [`crate::rundir`]), taken with a timeout.
pub struct AdmissionLock {
    _lock: rundir::FileLock,
}

/// The lock file, in the run-directory base.
const LOCK_FILE: &str = "admission.lock";
/// How long an agent waits for another agentos process to finish admitting its own.
const LOCK_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(transparent)]
    RunDir(#[from] rundir::RunDirError),
    #[error("cannot lock {}", .0.display())]
    Lock(PathBuf, #[source] std::io::Error),
    #[error(
        "another agentos process held {} for {} s while admitting an agent; if none runs, remove that file",
        .0.display(),
        LOCK_TIMEOUT.as_secs()
    )]
    TimedOut(PathBuf),
}

impl AdmissionLock {
    pub fn take() -> Result<Self, LockError> {
        let base = rundir::base()?;
        let path = base.path().join(LOCK_FILE);
        let file = base.open_file(LOCK_FILE)?;
        match rundir::lock_with_timeout(file, LOCK_TIMEOUT) {
            Ok(lock) => Ok(Self { _lock: lock }),
            Err(rundir::LockError::TimedOut) => Err(LockError::TimedOut(path)),
            Err(rundir::LockError::Io(e)) => Err(LockError::Lock(path, e)),
        }
    }
}

/// A pinned agent that may be moved to another CPU: where it is and the load it brings there.
#[derive(Clone, Debug, PartialEq)]
pub struct Pinned {
    pub cpu: u32,
    /// Its quota in CPUs (1 without one), as [`HostModel::pinned_load`] counts it.
    pub load: f64,
}

/// Moves that even out the pinned load after agents left: each takes one of `movable` from the
/// most loaded CPU to the least loaded one, as long as that lowers the higher of the two (the
/// agent's load is less than their difference). Returns `(index in movable, new CPU)`, at most
/// one per agent.
pub fn plan_rebalance(loads: &BTreeMap<u32, f64>, movable: &[Pinned]) -> Vec<(usize, u32)> {
    let mut loads = loads.clone();
    let mut at: Vec<u32> = movable.iter().map(|m| m.cpu).collect();
    let mut moved = vec![false; movable.len()];
    loop {
        let most = loads
            .iter()
            .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(a.0)));
        let least = loads
            .iter()
            .min_by(|a, b| a.1.total_cmp(b.1).then(a.0.cmp(b.0)));
        let (Some((&from, &high)), Some((&to, &low))) = (most, least) else {
            break;
        };
        // The largest agent on the busiest CPU that still makes things better.
        let candidate = (0..movable.len())
            .filter(|&i| !moved[i] && at[i] == from && movable[i].load < high - low - 1e-9)
            .max_by(|&a, &b| movable[a].load.total_cmp(&movable[b].load).then(b.cmp(&a)));
        let Some(i) = candidate else {
            break;
        };
        let load = movable[i].load;
        *loads.entry(from).or_default() -= load;
        *loads.entry(to).or_default() += load;
        at[i] = to;
        moved[i] = true;
    }
    (0..movable.len())
        .filter(|&i| moved[i] && at[i] != movable[i].cpu)
        .map(|i| (i, at[i]))
        .collect()
}

/// Evens out the pinned load by moving the agents of `cgroups` that are pinned to one CPU (the
/// daemon's `--pin` agents), under the admission lock; returns the moves made.
pub fn rebalance(layout: &Layout, cgroups: &[&AgentCgroup]) -> Vec<(usize, u32)> {
    // Moves are made under the lock, or not this time.
    let _lock = match AdmissionLock::take() {
        Ok(lock) => lock,
        Err(e) => {
            tracing::warn!(error = %e, "not moving pinned agents now");
            return Vec::new();
        }
    };
    let model = HostModel::read(layout);
    let mut index = Vec::new();
    let mut movable = Vec::new();
    for (i, cgroup) in cgroups.iter().enumerate() {
        let held = cgroup.held();
        let Some(cpus) = held.cpuset.as_deref().and_then(parse_cpu_list) else {
            continue;
        };
        if let [cpu] = cpus[..] {
            index.push(i);
            movable.push(Pinned {
                cpu,
                load: held.cpus.filter(|c| *c > 0.0).unwrap_or(1.0),
            });
        }
    }
    plan_rebalance(&model.pinned_load, &movable)
        .into_iter()
        .filter_map(|(m, cpu)| {
            let i = index[m];
            match cgroups[i].set_cpuset(&cpu.to_string()) {
                Ok(()) => Some((i, cpu)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot move a pinned agent");
                    None
                }
            }
        })
        .collect()
}

fn mem_total(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib << 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebalancing_moves_pinned_agents_off_the_busiest_cpu_while_it_helps() {
        let pinned = |cpu, load| Pinned { cpu, load };
        // Two agents left CPU 1: of the three on CPU 0, one moves.
        let loads: BTreeMap<u32, f64> = [(0, 3.0), (1, 0.0)].into();
        let movable = [pinned(0, 1.0), pinned(0, 1.0), pinned(0, 1.0)];
        assert_eq!(plan_rebalance(&loads, &movable), [(0, 1)]);
        // Balanced already, or a move would only swap the imbalance: nothing.
        let loads: BTreeMap<u32, f64> = [(0, 1.0), (1, 1.0)].into();
        assert!(plan_rebalance(&loads, &[pinned(0, 1.0), pinned(1, 1.0)]).is_empty());
        let loads: BTreeMap<u32, f64> = [(0, 1.0), (1, 0.0)].into();
        assert!(plan_rebalance(&loads, &[pinned(0, 1.0)]).is_empty());
        // Load from agents that may not move counts; the smaller quota moves when the larger
        // would overshoot.
        let loads: BTreeMap<u32, f64> = [(0, 2.5), (1, 0.5), (2, 1.0)].into();
        let movable = [pinned(0, 2.0), pinned(0, 0.5)];
        assert_eq!(plan_rebalance(&loads, &movable), [(1, 1)]);
        // Four CPUs, four agents on one: they spread.
        let loads: BTreeMap<u32, f64> = [(0, 4.0), (1, 0.0), (2, 0.0), (3, 0.0)].into();
        let movable = [
            pinned(0, 1.0),
            pinned(0, 1.0),
            pinned(0, 1.0),
            pinned(0, 1.0),
        ];
        let mut to: Vec<u32> = plan_rebalance(&loads, &movable)
            .into_iter()
            .map(|(_, cpu)| cpu)
            .collect();
        to.sort();
        assert_eq!(to, [1, 2, 3]);
    }

    /// Real cgroups (root, a cpuset controller and two CPUs needed): two agents pinned to one
    /// CPU are spread over two.
    #[test]
    fn rebalance_moves_a_real_cgroup() {
        let layout = Layout::discover();
        let online = parse_cpu_list(&online_cpu_list()).unwrap_or_default();
        if layout
            .hierarchy(crate::cgroup::Controller::Cpuset)
            .is_none()
            || online.len() < 2
        {
            crate::testing::skip("no cpuset controller or one CPU");
            return;
        }
        let slice = Slice {
            cpuset: Some(online[0].to_string()),
            ..Slice::default()
        };
        let pid = std::process::id();
        let create = |n| AgentCgroup::create(&layout, &format!("test-{pid}-{n}"), &slice);
        let (a, b) = match (create(20), create(21)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => {
                crate::testing::skip(&format!("cannot create cgroups here: {e}"));
                return;
            }
        };
        let moves = rebalance(&layout, &[&a, &b]);
        assert_eq!(moves.len(), 1, "{moves:?}");
        let (moved, cpu) = moves[0];
        assert_ne!(cpu, online[0]);
        let cpus = [&a, &b].map(|c| c.held().cpuset.unwrap());
        assert_eq!(cpus[moved], cpu.to_string());
        assert_eq!(cpus[1 - moved], online[0].to_string());
    }

    fn host() -> HostModel {
        HostModel {
            online_cpus: 2,
            pinned_load: [(0, 0.0), (1, 0.0)].into(),
            memory_bytes: 4 << 30,
            agents_memory_bytes: 3 << 30,
            agents_cpus: 1.5,
            agents: 3,
        }
    }

    #[test]
    fn memory_beyond_what_agents_may_use_is_refused_with_the_numbers() {
        let slice = Slice {
            memory_bytes: Some(320 << 20),
            ..Default::default()
        };
        // 4 GiB less the 512 MiB reserve: 3584 MiB usable, 3072 held, 320 more fits.
        assert!(host().admit(&slice).is_ok());
        let big = Slice {
            memory_bytes: Some(600 << 20),
            ..Default::default()
        };
        let err = host().admit(&big).unwrap_err();
        assert_eq!(
            err,
            Refusal::Memory {
                need_mib: 600,
                held_mib: 3072,
                usable_mib: 3584,
                agents: 3
            }
        );
        assert!(err.to_string().contains("--wait"));
    }

    #[test]
    fn cpu_quotas_beyond_the_online_cpus_are_refused() {
        let half = Slice {
            cpus: Some(0.5),
            ..Default::default()
        };
        assert!(host().admit(&half).is_ok());
        let one = Slice {
            cpus: Some(1.0),
            ..Default::default()
        };
        let err = host().admit(&one).unwrap_err().to_string();
        assert!(err.contains("hold 1.5 of the 2 CPU(s)"), "{err}");
        // Agents without a quota share CPUs by weight and reserve none.
        assert!(host().admit(&Slice::default()).is_ok());
    }

    #[test]
    fn pinned_agents_go_to_the_least_loaded_cpu() {
        let mut model = HostModel {
            online_cpus: 4,
            pinned_load: (0..4).map(|c| (c, 0.0)).collect(),
            ..host()
        };
        assert_eq!(model.least_loaded_cpu(), 0);
        model.add_pinned(&[0], 0.5);
        model.add_pinned(&[1], 0.0);
        assert_eq!(model.least_loaded_cpu(), 2);
        model.add_pinned(&[2, 3], 1.0);
        // CPUs 2 and 3 carry 0.5 each, like CPU 0: the lowest of them wins.
        assert_eq!(model.least_loaded_cpu(), 0);
        // Sets of every CPU, and CPUs that are not online, pin nothing.
        model.add_pinned(&[0, 1, 2, 3], 1.0);
        model.add_pinned(&[9], 1.0);
        assert_eq!(model.pinned_load[&0], 0.5);
    }

    #[test]
    fn large_hosts_keep_a_tenth_of_their_memory() {
        let model = HostModel {
            memory_bytes: 100 << 30,
            ..host()
        };
        assert_eq!(model.usable_memory_bytes(), 90 << 30);
    }

    #[test]
    fn meminfo_total_is_read_in_bytes() {
        assert_eq!(
            mem_total("MemTotal:       24683520 kB\nMemFree: 1 kB\n"),
            24683520 << 10
        );
        assert_eq!(mem_total(""), 0);
    }
}
