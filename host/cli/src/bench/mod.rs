//! `agentos bench`: measurements that print JSON, compared side by side in one run because these
//! machines are shared and noisy.

pub mod api;
pub mod boot;
mod burner;
pub mod files;
pub mod infer;
pub mod ipc;
pub mod isolation;
pub mod sched;
pub mod start;
pub mod vfio;

use agentos_core::agent::spec::AgentRequest;
use agentos_core::agent::vm::BootOptions;
use serde::{Deserialize, Serialize};

#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// E2B's API on the daemon over TCP: sandbox creation to a command's first output beside
    /// `agentos run`, and a file in and out through `/files` beside a host Unix socket pair.
    Api(api::ApiBenchArgs),
    /// Boot times of agentos beside QEMU microvm (Linux guest and the tiny guest).
    Boot(boot::BootBenchArgs),
    /// How well cgroups enforce agents' CPU slices: quotas, weights, pause and resume.
    Sched(sched::SchedBenchArgs),
    /// Inference in a VM beside the same code run natively: latency, throughput, load, memory.
    Infer(infer::InferBenchArgs),
    /// A file written into an agent and read back out (the guest agent's file protocol over
    /// vsock, as the daemon's file API uses), beside the same bytes through a host Unix socket
    /// pair: MB/s each way, with ratios.
    Files(files::FilesBenchArgs),
    /// Messages between two agents through the router, beside the same exchange over a host
    /// Unix socket pair: round trip latency, messages/s, MB/s.
    Ipc(ipc::IpcBenchArgs),
    /// Agents started cold, restored from a snapshot and claimed from a warm pool, one at a time
    /// and many at once, with and without a model (its disks as pmem regions and as virtio-blk
    /// disks): time to the first exec reply (or inference) and host memory per idle agent, with
    /// ratios.
    Start(start::StartBenchArgs),
    /// A PCI device passed to an agent with VFIO (QEMU's edu test device) beside the same
    /// operations done by the host through VFIO: register reads (BAR mapped and trapped), DMA
    /// round trips, interrupt latency, with VM / host ratios.
    Vfio(vfio::VfioBenchArgs),
}

/// The options of a benchmark's agent: `request` checked as every agent's is, with this host's
/// guest image and models.
fn agent_options(request: AgentRequest) -> anyhow::Result<BootOptions> {
    Ok(request
        .validate()?
        .boot_options(&agentos_image::default_cache_dir())?)
}

pub fn run(cmd: &BenchCommand) -> anyhow::Result<i32> {
    match cmd {
        BenchCommand::Api(args) => api::run(args),
        BenchCommand::Boot(args) => boot::run(args),
        BenchCommand::Sched(args) => sched::run(args),
        BenchCommand::Infer(args) => infer::run(args),
        BenchCommand::Ipc(args) => ipc::run(args),
        BenchCommand::Files(args) => files::run(args),
        BenchCommand::Start(args) => start::run(args),
        BenchCommand::Vfio(args) => vfio::run(args),
    }
}

/// Runs a benchmark inside a carrier (`spec`) and reads the JSON results it prints.
pub fn results_from_carrier<T: serde::de::DeserializeOwned>(
    spec: &agentos::carrier::CarrierRun,
) -> anyhow::Result<T> {
    use anyhow::Context;
    let mut out = Vec::new();
    let status = agentos::carrier::run(spec, &mut out)?;
    if status.shell_code() != 0 {
        anyhow::bail!(
            "the benchmark in the carrier failed (status {})",
            status.shell_code()
        );
    }
    serde_json::from_slice(&out).context("the carrier's benchmark printed no results")
}

/// Median, min and max of a set of measurements.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(values: &[f64]) -> Self {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return Self::default();
        }
        let mid = v.len() / 2;
        let median = if v.len().is_multiple_of(2) {
            (v[mid - 1] + v[mid]) / 2.0
        } else {
            v[mid]
        };
        Self {
            median,
            min: v[0],
            max: v[v.len() - 1],
        }
    }
}

/// Nearest-rank percentile (0 for no values).
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// `x` to `decimals` decimal places, for reports.
pub fn round(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

/// a / b to three decimals (0 when b is 0).
pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        (a / b * 1000.0).round() / 1000.0
    } else {
        0.0
    }
}
