//! What a run of a group produced, where its trace is kept, and how a member joins its group.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use agentos_core::agent::vm::AgentVm;
use agentos_protocol::peer::{JoinRequest, PEER_PORT};
use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::file::GroupSpec;
use super::router::{Counters, GroupResult, Router};
use super::trace::TraceEvent;

/// Everything a group run produced.
#[derive(Debug, Serialize, Deserialize)]
pub struct GroupReport {
    pub group: String,
    pub agents: Vec<AgentReport>,
    /// What reached `output`, in the order it came.
    pub results: Vec<GroupResult>,
    /// How many results one input makes (one per channel into `output`).
    pub expected_results: usize,
    pub counters: Counters,
    pub trace: Vec<TraceEvent>,
    /// Messages accepted and never acknowledged, per receiver (empty when all went through).
    pub unacknowledged: BTreeMap<String, usize>,
    /// From the start to every agent listening.
    pub ready_ms: u64,
    pub total_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AgentReport {
    pub name: String,
    pub model: Option<String>,
    pub boot_ms: u64,
    /// Times its VM ended and was booted again during the run.
    pub restarts: u32,
}

/// Labels member `name`'s VM, attaches it to the router, then tells it to join.
pub fn join_member(
    spec: &GroupSpec,
    router: &Router,
    name: &str,
    vm: &mut AgentVm,
) -> anyhow::Result<()> {
    let _ = vm.set_label(&format!("{}/{name}", spec.name));
    router
        .attach(name, &vm.host_socket(PEER_PORT))
        .with_context(|| format!("cannot listen for agent `{name}`"))?;
    let agent = spec.agent_of(name).context("an agent left the group")?;
    vm.conn()
        .join(JoinRequest {
            id: 0,
            group: spec.name.clone(),
            name: name.to_owned(),
            handler: agent.handler.clone(),
            outputs: spec.outputs_of(&agent.name),
        })
        .with_context(|| format!("agent `{name}` did not join the group"))?;
    Ok(())
}

/// Where groups keep their traces and inputs, one directory each.
pub fn groups_dir(cache: &Path) -> PathBuf {
    cache.join("groups")
}

/// Where the last trace of group `name` is kept.
pub fn trace_path(cache: &Path, name: &str) -> PathBuf {
    groups_dir(cache).join(name).join("trace.jsonl")
}
