//! Groups under the daemon: `group up` starts a group file's agents (each replica its own VM,
//! named `GROUP/MEMBER`) and the router between them, and keeps them running, restarted by their
//! policy, each member joining the group again after a restart; `group input` gives the group's
//! entry agent a text and waits for the results; `group down` stops them all.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::agent::{Agent, AgentConfig};
use super::api::{
    AgentState, ApiError, DEFAULT_INPUT_TIMEOUT_S, ErrorKind, GroupInputRequest, GroupUpReply,
    GroupUpRequest,
};
use super::devices;
use super::{Daemon, configure, to_value, unknown_agent};
use crate::group::file::{self, GroupSpec, MAX_RESTARTS};
use crate::group::member::{MemberHooks, member_name};
use crate::group::report::{AgentReport, GroupReport, trace_path};
use crate::group::router::Router;
use crate::group::trace::{self, TraceLog};
use agentos_image as image;

/// A group the daemon runs.
pub struct GroupEntry {
    spec: Arc<GroupSpec>,
    router: Arc<Router>,
    /// The daemon's names of its members (`GROUP/MEMBER`), in the file's order.
    members: Vec<String>,
    trace: PathBuf,
}

fn unknown_group(group: &str, groups: &BTreeMap<String, GroupEntry>) -> ApiError {
    let up: Vec<&str> = groups.keys().map(String::as_str).collect();
    ApiError::new(
        ErrorKind::UnknownGroup,
        if up.is_empty() {
            format!("no group `{group}` is up: none is (start one with `agentos group up FILE`)")
        } else {
            format!("no group `{group}` is up (groups: {})", up.join(", "))
        },
    )
}

impl Daemon {
    fn lock_groups(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, GroupEntry>> {
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) async fn group_up(
        &self,
        request: GroupUpRequest,
        deadline: Instant,
    ) -> Result<serde_json::Value, ApiError> {
        let spec = file::parse(&request.text).map_err(|(line, problem)| {
            ApiError::new(
                ErrorKind::Invalid,
                format!("{}:{line}: {problem}", request.file),
            )
        })?;
        let group = spec.name.clone();
        if self.lock_groups().contains_key(&group) {
            return Err(ApiError::new(
                ErrorKind::DuplicateName,
                format!("group `{group}` is up already; `agentos group down {group}` first"),
            ));
        }
        let trace = trace_path(&image::default_cache_dir(), &group);
        if let Some(dir) = trace.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                ApiError::new(
                    ErrorKind::Failed,
                    format!("cannot create {}: {e}", dir.display()),
                )
            })?;
        }
        let log = TraceLog::create(&trace)
            .map_err(|e| ApiError::new(ErrorKind::Failed, e.to_string()))?;
        let spec = Arc::new(spec);
        let router = Arc::new(Router::with_members(
            &spec.member_roles(),
            &spec.channels,
            log,
        ));
        let configs = {
            let spec = spec.clone();
            let router = router.clone();
            let state = self.state.path().to_path_buf();
            let hang_timeout = self.hang_timeout;
            tokio::task::spawn_blocking(move || {
                member_configs(&spec, &router, &state, hang_timeout)
            })
            .await
            .map_err(|e| ApiError::new(ErrorKind::Failed, e.to_string()))??
        };
        let members: Vec<String> = configs.iter().map(|c| c.name.clone()).collect();
        {
            let mut groups = self.lock_groups();
            let mut agents = self.lock_agents();
            if groups.contains_key(&group) {
                return Err(ApiError::new(
                    ErrorKind::DuplicateName,
                    format!("group `{group}` is up already"),
                ));
            }
            if let Some(taken) = members.iter().find(|m| agents.contains_key(*m)) {
                return Err(ApiError::new(
                    ErrorKind::DuplicateName,
                    format!("an agent named `{taken}` exists already"),
                ));
            }
            if agents.len() + members.len() > super::MAX_AGENTS {
                return Err(ApiError::new(
                    ErrorKind::Invalid,
                    format!(
                        "this daemon keeps at most {} agents; `agentos rm` some",
                        super::MAX_AGENTS
                    ),
                ));
            }
            let mut configs = configs;
            let mut held = devices::held_by(agents.values().map(Agent::config));
            for config in &mut configs {
                devices::admit_beside(&held, config).map_err(|e| {
                    ApiError::new(e.kind, format!("agent `{}`: {}", config.name, e.message))
                })?;
                held.extend(devices::held_by(std::iter::once(&*config)));
            }
            for config in configs {
                let name = config.name.clone();
                let _ = std::fs::remove_file(&config.log);
                let agent = Agent::spawn(config).map_err(|e| {
                    ApiError::new(ErrorKind::Failed, format!("cannot start an agent: {e}"))
                })?;
                agents.insert(name, agent);
            }
            groups.insert(
                group.clone(),
                GroupEntry {
                    spec,
                    router,
                    members: members.clone(),
                    trace,
                },
            );
        }
        tracing::info!(group, members = members.len(), "group up");
        if request.wait {
            // A member still booting at the deadline counts as one that did not come up.
            self.wait_until_booted(&members, deadline).await;
            let failed: Vec<String> = {
                let agents = self.lock_agents();
                members
                    .iter()
                    .filter_map(|m| agents.get(m))
                    .map(Agent::info)
                    .filter(|i| i.state != AgentState::Running)
                    .map(|i| {
                        format!(
                            "`{}` {}",
                            i.name,
                            i.last_error.unwrap_or_else(|| i.state.as_str().to_owned())
                        )
                    })
                    .collect()
            };
            if !failed.is_empty() {
                self.take_down(&group).await;
                return Err(ApiError::new(
                    ErrorKind::Failed,
                    format!(
                        "group `{group}` did not come up, and was stopped: {}",
                        failed.join("; ")
                    ),
                ));
            }
        }
        let agents = self.lock_agents();
        to_value(&GroupUpReply {
            group,
            members: members
                .iter()
                .filter_map(|m| agents.get(m).map(Agent::info))
                .collect(),
        })
    }

    pub(super) async fn group_down(&self, group: &str) -> Result<serde_json::Value, ApiError> {
        if !self.lock_groups().contains_key(group) {
            return Err(unknown_group(group, &self.lock_groups()));
        }
        let stopped = self.take_down(group).await;
        to_value(&serde_json::json!({ "group": group, "stopped": stopped }))
    }

    /// Stops a group's agents and forgets them and it; returns how many agents it had.
    async fn take_down(&self, group: &str) -> usize {
        let Some(entry) = self.lock_groups().remove(group) else {
            return 0;
        };
        let agents: Vec<Agent> = {
            let mut all = self.lock_agents();
            entry.members.iter().filter_map(|m| all.remove(m)).collect()
        };
        for agent in &agents {
            agent.request_stop();
        }
        let count = agents.len();
        let logs: Vec<PathBuf> = agents.iter().map(|a| a.config().log.clone()).collect();
        let router = entry.router;
        let _ = tokio::task::spawn_blocking(move || {
            drop(agents);
            drop(router);
            for log in logs {
                let _ = std::fs::remove_file(log);
            }
        })
        .await;
        tracing::info!(group, "group down");
        count
    }

    pub(super) async fn group_input(
        &self,
        request: GroupInputRequest,
        deadline: Instant,
    ) -> Result<serde_json::Value, ApiError> {
        let started = Instant::now();
        let (spec, router, members, trace_file) = {
            let groups = self.lock_groups();
            let Some(entry) = groups.get(&request.group) else {
                return Err(unknown_group(&request.group, &groups));
            };
            (
                entry.spec.clone(),
                entry.router.clone(),
                entry.members.clone(),
                entry.trace.clone(),
            )
        };
        if request.text.trim().is_empty() {
            return Err(ApiError::new(
                ErrorKind::Invalid,
                "the input is empty; give the group some text",
            ));
        }
        if request.text.len() > agentos_protocol::peer::MAX_PEER_BODY_BYTES {
            return Err(ApiError::new(
                ErrorKind::Invalid,
                format!(
                    "the input is larger than {} bytes; give a shorter text",
                    agentos_protocol::peer::MAX_PEER_BODY_BYTES
                ),
            ));
        }
        let input = router.inject(spec.entry(), request.text).map_err(|why| {
            ApiError::new(ErrorKind::Failed, format!("the input was not taken: {why}"))
        })?;
        let id = input.trace();
        let timeout = Duration::from_secs(request.timeout_s.unwrap_or(DEFAULT_INPUT_TIMEOUT_S));
        // parse_request bounds the timeout; the request's deadline bounds the wait anyway.
        let until = started
            .checked_add(timeout)
            .map_or(deadline, |until| until.min(deadline));
        let expected = spec.results_per_input();
        // The input is dropped with the wait: its results leave the router, and later ones for
        // it are not kept.
        let results = tokio::task::spawn_blocking(move || {
            input.take(expected, until, &|| agentos_core::signals::interrupted())
        })
        .await
        .map_err(|e| ApiError::new(ErrorKind::Failed, e.to_string()))?;
        let events = trace::read_where(&trace_file, |e| e.trace == id).unwrap_or_default();
        let agents: Vec<AgentReport> = {
            let all = self.lock_agents();
            members
                .iter()
                .filter_map(|m| all.get(m).map(Agent::info))
                .map(|info| AgentReport {
                    name: info
                        .name
                        .strip_prefix(&format!("{}/", spec.name))
                        .unwrap_or(&info.name)
                        .to_owned(),
                    model: info.model,
                    boot_ms: info.boot_ms.unwrap_or(0),
                    restarts: info.restarts,
                })
                .collect()
        };
        to_value(&GroupReport {
            group: spec.name.clone(),
            agents,
            results,
            expected_results: expected,
            counters: router.counters(),
            trace: events,
            unacknowledged: router.unacknowledged(),
            ready_ms: 0,
            total_ms: started.elapsed().as_millis() as u64,
        })
    }

    /// Refuses to stop or remove one member of a group by itself.
    pub(super) fn check_not_member(&self, name: &str, verb: &str) -> Result<(), ApiError> {
        let group = {
            let agents = self.lock_agents();
            match agents.get(name) {
                Some(agent) => agent.config().group.clone(),
                None => return Err(unknown_agent(name, &agents)),
            }
        };
        match group {
            Some(group) => Err(ApiError::new(
                ErrorKind::Invalid,
                format!(
                    "agent `{name}` belongs to group `{group}`, which {verb}s it; `agentos group down {group}` instead"
                ),
            )),
            None => Ok(()),
        }
    }
}

/// The boot options of each member, and how it joins the group after each boot.
fn member_configs(
    spec: &Arc<GroupSpec>,
    router: &Arc<Router>,
    state: &std::path::Path,
    hang_timeout: Duration,
) -> Result<Vec<AgentConfig>, ApiError> {
    let mut configs = Vec::new();
    for (member, agent) in spec.members() {
        let name = member_name(&spec.name, &member);
        // `+` is in no name: the log of `a/b` cannot be that of another member.
        let log = state.join(format!("{}+{member}.log", spec.name));
        let mut config = configure(name.clone(), &agent.vm, agent.restart, log, hang_timeout)
            .map_err(|e| ApiError::new(e.kind, format!("agent `{member}`: {}", e.message)))?;
        config.group = Some(spec.name.clone());
        config.max_restarts = Some(MAX_RESTARTS);
        config.hooks = Some(Arc::new(MemberHooks {
            spec: spec.clone(),
            router: router.clone(),
            member,
        }));
        configs.push(config);
    }
    Ok(configs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentos_core::rundir::RunDir;

    const ECHO: &str = r#"name = "echo"
channels = ["input -> echo", "echo -> output"]

[[agent]]
name = "echo"
exec = ["/bin/cat"]
"#;

    #[tokio::test]
    async fn an_input_timeout_past_what_the_clock_holds_waits_until_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = Daemon::new(
            RunDir::create("daemon-test").unwrap(),
            Duration::from_secs(60),
        )
        .unwrap();
        let spec = Arc::new(file::parse(ECHO).unwrap());
        let trace = dir.path().join("trace.jsonl");
        let router = Router::with_members(
            &spec.member_roles(),
            &spec.channels,
            TraceLog::create(&trace).unwrap(),
        );
        daemon.lock_groups().insert(
            "echo".into(),
            GroupEntry {
                spec,
                router: Arc::new(router),
                members: Vec::new(),
                trace,
            },
        );
        // Past parse_request's check, as a bug might let through.
        let request = GroupInputRequest {
            group: "echo".into(),
            text: "hi".into(),
            timeout_s: Some(u64::MAX),
        };
        let asked = Instant::now();
        let report = daemon
            .group_input(request, asked + Duration::from_millis(300))
            .await
            .unwrap();
        assert_eq!(report["results"], serde_json::json!([]), "{report}");
        assert!(asked.elapsed() < Duration::from_secs(5));
    }
}
