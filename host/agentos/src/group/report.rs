//! What a run of a group produced, and where its trace is kept.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::router::{Counters, GroupResult};
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

/// Where groups keep their traces and inputs, one directory each.
pub fn groups_dir(cache: &Path) -> PathBuf {
    cache.join("groups")
}

/// Where the last trace of group `name` is kept.
pub fn trace_path(cache: &Path, name: &str) -> PathBuf {
    groups_dir(cache).join(name).join("trace.jsonl")
}
