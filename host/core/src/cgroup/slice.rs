//! An agent's slice of the host (CPU quota, weight, cpuset, memory, pids) and the cgroup files
//! that express it in each version.

use super::layout::{Controller, Version};

/// The period of CPU quotas: 100 ms, the kernel's default.
pub const CPU_PERIOD_US: u64 = 100_000;
/// The kernel refuses quotas below 1 ms.
const MIN_QUOTA_US: u64 = 1_000;
/// cgroup v2 weights span 1..=10000 (default 100); v1 shares default to 1024.
pub const MAX_WEIGHT: u32 = 10_000;
const V1_SHARES_PER_WEIGHT: u64 = 1024;
const DEFAULT_WEIGHT: u64 = 100;

/// How urgently an agent needs the CPU when agents compete for it; a class is a CPU weight.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PriorityClass {
    /// Answers people: weight 10000, so that against batch agents (100) it gets 99 % of a CPU it
    /// shares with one of them, and 97 % against three.
    Interactive,
    /// The default weight, 100.
    Batch,
    /// Runs on what is left: weight 1.
    Idle,
}

impl PriorityClass {
    pub fn weight(self) -> u32 {
        match self {
            Self::Interactive => MAX_WEIGHT,
            Self::Batch => DEFAULT_WEIGHT as u32,
            Self::Idle => 1,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Slice {
    /// CPU time as a number of CPUs (0.5 = half of one CPU per period).
    pub cpus: Option<f64>,
    /// Relative CPU weight, 1..=10000 (100 is the default).
    pub weight: Option<u32>,
    /// The CPUs the agent may run on, in the kernel's list format ("0-1,3").
    pub cpuset: Option<String>,
    /// Hard memory limit for the VMM process: guest RAM and the VMM's own.
    pub memory_bytes: Option<u64>,
    /// Limit on the VMM's threads.
    pub pids: Option<u64>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SliceError {
    #[error("cpus must be a number of CPUs above 0.01 (e.g. 0.5), not {0}")]
    Cpus(f64),
    #[error("weight must be between 1 and {MAX_WEIGHT}, not {0}")]
    Weight(u32),
    #[error("cpuset must list CPUs like `0-1,3`, not `{0}`")]
    Cpuset(String),
    #[error("cpuset {asked}: CPU {cpu} is not online here (online: {online})")]
    CpuOffline {
        asked: String,
        cpu: u32,
        online: String,
    },
}

impl Slice {
    pub fn validate(&self) -> Result<(), SliceError> {
        if let Some(cpus) = self.cpus.filter(|c| !(0.01..=4096.0).contains(c)) {
            return Err(SliceError::Cpus(cpus));
        }
        if let Some(weight) = self.weight.filter(|w| !(1..=MAX_WEIGHT).contains(w)) {
            return Err(SliceError::Weight(weight));
        }
        if let Some(set) = &self.cpuset {
            parse_cpu_list(set).ok_or_else(|| SliceError::Cpuset(set.clone()))?;
        }
        Ok(())
    }

    /// Checks the cpuset against the CPUs online on this machine (`online` in the kernel's list
    /// format, as in /sys/devices/system/cpu/online).
    pub fn check_online(&self, online: &str) -> Result<(), SliceError> {
        let (Some(asked), Some(available)) = (&self.cpuset, parse_cpu_list(online)) else {
            return Ok(());
        };
        for cpu in parse_cpu_list(asked).unwrap_or_default() {
            if !available.contains(&cpu) {
                return Err(SliceError::CpuOffline {
                    asked: asked.clone(),
                    cpu,
                    online: online.trim().to_string(),
                });
            }
        }
        Ok(())
    }

    /// The controllers this slice sets a value in.
    pub fn controllers(&self) -> Vec<Controller> {
        let mut used = Vec::new();
        if self.cpus.is_some() || self.weight.is_some() {
            used.push(Controller::Cpu);
        }
        if self.cpuset.is_some() {
            used.push(Controller::Cpuset);
        }
        if self.memory_bytes.is_some() {
            used.push(Controller::Memory);
        }
        if self.pids.is_some() {
            used.push(Controller::Pids);
        }
        used
    }

    /// The files to write, in order, for `controller` in a hierarchy of `version`.
    pub fn files(&self, controller: Controller, version: Version) -> Vec<(&'static str, String)> {
        let mut files = Vec::new();
        match (controller, version) {
            (Controller::Cpu, Version::V2) => {
                if let Some(quota) = self.quota_us() {
                    files.push(("cpu.max", format!("{quota} {CPU_PERIOD_US}")));
                }
                if let Some(weight) = self.weight {
                    files.push(("cpu.weight", weight.to_string()));
                }
            }
            (Controller::Cpu, Version::V1) => {
                if let Some(quota) = self.quota_us() {
                    files.push(("cpu.cfs_period_us", CPU_PERIOD_US.to_string()));
                    files.push(("cpu.cfs_quota_us", quota.to_string()));
                }
                if let Some(weight) = self.weight {
                    let shares = (u64::from(weight) * V1_SHARES_PER_WEIGHT / DEFAULT_WEIGHT).max(2);
                    files.push(("cpu.shares", shares.to_string()));
                }
            }
            (Controller::Cpuset, _) => {
                if let Some(set) = &self.cpuset {
                    files.push(("cpuset.cpus", set.clone()));
                }
            }
            (Controller::Memory, Version::V2) => {
                if let Some(bytes) = self.memory_bytes {
                    files.push(("memory.max", bytes.to_string()));
                }
            }
            (Controller::Memory, Version::V1) => {
                if let Some(bytes) = self.memory_bytes {
                    files.push(("memory.limit_in_bytes", bytes.to_string()));
                }
            }
            (Controller::Pids, _) => {
                if let Some(max) = self.pids {
                    files.push(("pids.max", max.to_string()));
                }
            }
            (Controller::Freezer | Controller::Cpuacct, _) => {}
        }
        files
    }

    fn quota_us(&self) -> Option<u64> {
        self.cpus
            .map(|cpus| ((cpus * CPU_PERIOD_US as f64).round() as u64).max(MIN_QUOTA_US))
    }
}

/// The CPUs online on this machine, as the kernel lists them (`0-3,6`); empty if unreadable.
pub fn online_cpu_list() -> String {
    std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default()
}

/// Parses a kernel CPU list ("0-3,6"), returning the CPUs in it.
pub fn parse_cpu_list(list: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in list.trim().split(',') {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?),
            None => {
                let cpu = part.parse::<u32>().ok()?;
                (cpu, cpu)
            }
        };
        if first > last || last >= 4096 {
            return None;
        }
        cpus.extend(first..=last);
    }
    Some(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_weights_in_both_versions() {
        assert_eq!(PriorityClass::Interactive.weight(), 10_000);
        assert_eq!(PriorityClass::Batch.weight(), 100);
        assert_eq!(PriorityClass::Idle.weight(), 1);
        let interactive = Slice {
            weight: Some(PriorityClass::Interactive.weight()),
            ..Slice::default()
        };
        assert_eq!(
            interactive.files(Controller::Cpu, Version::V2),
            [("cpu.weight", "10000".to_owned())]
        );
        assert_eq!(
            interactive.files(Controller::Cpu, Version::V1),
            [("cpu.shares", "102400".to_owned())]
        );
        let idle = Slice {
            weight: Some(PriorityClass::Idle.weight()),
            ..Slice::default()
        };
        assert_eq!(
            idle.files(Controller::Cpu, Version::V1),
            [("cpu.shares", "10".to_owned())]
        );
    }

    fn slice() -> Slice {
        Slice {
            cpus: Some(0.5),
            weight: Some(200),
            cpuset: Some("0".into()),
            memory_bytes: Some(320 << 20),
            pids: Some(40),
        }
    }

    #[test]
    fn v2_files_carry_quota_and_period_together() {
        let s = slice();
        assert_eq!(
            s.files(Controller::Cpu, Version::V2),
            [
                ("cpu.max", "50000 100000".to_string()),
                ("cpu.weight", "200".into())
            ]
        );
        assert_eq!(
            s.files(Controller::Memory, Version::V2),
            [("memory.max", (320u64 << 20).to_string())]
        );
        assert_eq!(
            s.files(Controller::Pids, Version::V2),
            [("pids.max", "40".into())]
        );
    }

    #[test]
    fn v1_files_use_the_old_names_and_shares() {
        let s = slice();
        assert_eq!(
            s.files(Controller::Cpu, Version::V1),
            [
                ("cpu.cfs_period_us", "100000".to_string()),
                ("cpu.cfs_quota_us", "50000".into()),
                ("cpu.shares", "2048".into())
            ]
        );
        assert_eq!(
            s.files(Controller::Memory, Version::V1),
            [("memory.limit_in_bytes", (320u64 << 20).to_string())]
        );
    }

    #[test]
    fn tiny_quotas_are_raised_to_the_kernel_minimum() {
        let s = Slice {
            cpus: Some(0.001),
            ..Default::default()
        };
        assert_eq!(
            s.files(Controller::Cpu, Version::V2),
            [("cpu.max", "1000 100000".to_string())]
        );
        assert_eq!(s.validate(), Err(SliceError::Cpus(0.001)));
    }

    #[test]
    fn bad_values_are_refused() {
        let bad = |s: Slice| s.validate().unwrap_err().to_string();
        assert!(
            bad(Slice {
                weight: Some(0),
                ..Default::default()
            })
            .contains("between 1 and 10000")
        );
        assert!(
            bad(Slice {
                cpus: Some(f64::NAN),
                ..Default::default()
            })
            .starts_with("cpus must be")
        );
        assert!(
            bad(Slice {
                cpuset: Some("1-0".into()),
                ..Default::default()
            })
            .starts_with("cpuset must list")
        );
        assert!(slice().validate().is_ok());
    }

    #[test]
    fn cpu_lists_parse_like_the_kernel_writes_them() {
        assert_eq!(parse_cpu_list("0-3,6\n"), Some(vec![0, 1, 2, 3, 6]));
        assert_eq!(parse_cpu_list("2"), Some(vec![2]));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("a"), None);
        assert_eq!(parse_cpu_list("0-99999"), None);
    }

    #[test]
    fn cpusets_must_name_online_cpus() {
        let s = Slice {
            cpuset: Some("1-2".into()),
            ..Default::default()
        };
        assert!(s.check_online("0-3\n").is_ok());
        let err = s.check_online("0-1\n").unwrap_err().to_string();
        assert_eq!(err, "cpuset 1-2: CPU 2 is not online here (online: 0-1)");
        assert!(Slice::default().check_online("0").is_ok());
    }

    #[test]
    fn only_the_controllers_with_values_are_used() {
        let s = Slice {
            memory_bytes: Some(1),
            ..Default::default()
        };
        assert_eq!(s.controllers(), [Controller::Memory]);
        assert_eq!(slice().controllers().len(), 4);
    }
}
