//! The daemon's figures in the Prometheus text format: per agent, what its cgroup counts (CPU,
//! throttling, memory) and what the daemon knows (state, restarts); and the API's requests and
//! errors.

use std::collections::BTreeMap;

use agentos_core::agent::pool::PoolInfo;
use std::fmt::Write;

use super::api::{AgentInfo, AgentState};
use agentos_core::cgroup::CgroupStats;

pub struct AgentRow {
    pub info: AgentInfo,
    /// None while the agent has no VM.
    pub stats: Option<CgroupStats>,
}

/// A family read from the cgroup: name, type, help, and how to get the value.
type StatFamily = (
    &'static str,
    &'static str,
    &'static str,
    fn(&CgroupStats) -> f64,
);

const STATES: [AgentState; 6] = [
    AgentState::Booting,
    AgentState::Running,
    AgentState::Restarting,
    AgentState::Exited,
    AgentState::Failed,
    AgentState::Stopped,
];

/// A metric of every pool: name, type, help and its value for one pool.
type PoolFamily = (
    &'static str,
    &'static str,
    &'static str,
    fn(&PoolInfo) -> u64,
);

pub fn render(
    agents: &[AgentRow],
    pools: &[PoolInfo],
    requests: &BTreeMap<&'static str, u64>,
    errors: &BTreeMap<&'static str, u64>,
) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "agentos_agent_state",
        "gauge",
        "1 for the state the agent is in.",
    );
    for row in agents {
        for state in STATES {
            let _ = writeln!(
                out,
                "agentos_agent_state{{agent=\"{}\",state=\"{}\"}} {}",
                row.info.name,
                state.as_str(),
                u8::from(row.info.state == state)
            );
        }
    }
    family(
        &mut out,
        "agentos_agent_restarts_total",
        "counter",
        "Times the agent's VM was booted again.",
    );
    for row in agents {
        let _ = writeln!(
            out,
            "agentos_agent_restarts_total{{agent=\"{}\"}} {}",
            row.info.name, row.info.restarts
        );
    }
    let stats: [StatFamily; 5] = [
        (
            "agentos_agent_cpu_seconds_total",
            "counter",
            "CPU time of the agent's VMM, vCPUs included.",
            |s| s.cpu_usage_us as f64 / 1e6,
        ),
        (
            "agentos_agent_throttled_seconds_total",
            "counter",
            "Time the agent's CPU quota held it back.",
            |s| s.throttled_us as f64 / 1e6,
        ),
        (
            "agentos_agent_throttled_periods_total",
            "counter",
            "Quota periods in which the agent was held back.",
            |s| s.nr_throttled as f64,
        ),
        (
            "agentos_agent_memory_bytes",
            "gauge",
            "Memory the agent's VMM uses, guest RAM included.",
            |s| s.memory_bytes as f64,
        ),
        (
            "agentos_agent_memory_peak_bytes",
            "gauge",
            "The most memory the agent's VMM used.",
            |s| s.memory_peak_bytes as f64,
        ),
    ];
    for (name, kind, help, value) in stats {
        family(&mut out, name, kind, help);
        for row in agents {
            if let Some(s) = &row.stats {
                let _ = writeln!(out, "{name}{{agent=\"{}\"}} {}", row.info.name, value(s));
            }
        }
    }
    let pool_families: [PoolFamily; 4] = [
        (
            "agentos_pool_size",
            "gauge",
            "Agents a warm pool keeps ready.",
            |p| u64::from(p.size),
        ),
        (
            "agentos_pool_ready",
            "gauge",
            "Agents of a warm pool ready now.",
            |p| u64::from(p.ready),
        ),
        (
            "agentos_pool_claims_total",
            "counter",
            "Agents taken from a warm pool.",
            |p| p.claims,
        ),
        (
            "agentos_pool_failures_total",
            "counter",
            "Agents of a warm pool that did not start.",
            |p| p.failures,
        ),
    ];
    for (name, kind, help, value) in pool_families {
        family(&mut out, name, kind, help);
        for pool in pools {
            let _ = writeln!(out, "{name}{{pool=\"{}\"}} {}", pool.name, value(pool));
        }
    }
    family(
        &mut out,
        "agentos_api_requests_total",
        "counter",
        "API requests, by operation.",
    );
    for (op, n) in requests {
        let _ = writeln!(out, "agentos_api_requests_total{{op=\"{op}\"}} {n}");
    }
    family(
        &mut out,
        "agentos_api_errors_total",
        "counter",
        "API requests answered with an error, by kind.",
    );
    for (kind, n) in errors {
        let _ = writeln!(out, "agentos_api_errors_total{{kind=\"{kind}\"}} {n}");
    }
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::api::RestartPolicy;

    #[test]
    fn renders_every_family_with_agent_labels() {
        let info = AgentInfo {
            name: "a".into(),
            state: AgentState::Running,
            model: None,
            vcpus: 1,
            memory_mib: 256,
            restart: RestartPolicy::OnFailure,
            restarts: 2,
            vmm_pid: Some(7),
            boot_ms: Some(100),
            for_s: 3,
            last_error: None,
            paused: false,
            jail: None,
            devices: Vec::new(),
        };
        let stats = CgroupStats {
            cpu_usage_us: 1_500_000,
            memory_bytes: 1 << 20,
            ..CgroupStats::default()
        };
        let rows = [AgentRow {
            info,
            stats: Some(stats),
        }];
        let requests = BTreeMap::from([("ps", 4)]);
        let errors = BTreeMap::from([("unknown_agent", 1)]);
        let pools = [PoolInfo {
            name: "warm".into(),
            from: "/var/snap".into(),
            size: 3,
            ready: 2,
            claims: 5,
            failures: 0,
            last_error: None,
        }];
        let text = render(&rows, &pools, &requests, &errors);
        assert!(
            text.contains("agentos_pool_ready{pool=\"warm\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("agentos_pool_claims_total{pool=\"warm\"} 5"),
            "{text}"
        );
        for line in [
            "agentos_agent_state{agent=\"a\",state=\"running\"} 1",
            "agentos_agent_state{agent=\"a\",state=\"booting\"} 0",
            "agentos_agent_restarts_total{agent=\"a\"} 2",
            "agentos_agent_cpu_seconds_total{agent=\"a\"} 1.5",
            "agentos_agent_memory_bytes{agent=\"a\"} 1048576",
            "agentos_api_requests_total{op=\"ps\"} 4",
            "agentos_api_errors_total{kind=\"unknown_agent\"} 1",
            "# TYPE agentos_agent_cpu_seconds_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
    }
}
