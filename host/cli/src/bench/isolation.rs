//! Isolation: the inference latency of an interactive agent alone, beside three agents that burn
//! CPU with the same weight, and beside the same three as batch agents (the interactive agent's
//! class weighs 10000 against their 100). The target: p99 beside batch neighbours within 10 % of
//! alone.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use agentos_protocol::{InferOptions, InferRequest, Task};
use anyhow::{Context, bail};
use serde::Serialize;

use super::{percentile, ratio, round};
use agentos_core::agent::spec::AgentRequest;
use agentos_core::agent::vm::AgentVm;
use agentos_core::cgroup::PriorityClass;
use agentos_image::model::{Bundle, ModelDisks, ModelStore, carrier_copies, model_disks};
use agentos_image::{self as image, AGENT_IMAGE, BuiltImage};

/// The interactive agent's model and task.
pub const MODEL: &str = "sentiment";
const NEIGHBOURS: usize = 3;
const HOG_MEMORY_MIB: u64 = 128;
/// p99 beside batch neighbours / p99 alone.
const TARGET_RATIO: f64 = 1.10;
const TEXT: &str = "The service was quick and the staff were friendly, I would come back.";

#[derive(Debug, Serialize)]
pub struct IsolationResult {
    pub requests: u32,
    pub neighbours: usize,
    pub alone: Latency,
    /// Neighbours with the interactive agent's own weight: what no policy gives.
    pub same_weight: Latency,
    /// Neighbours in the batch class, the agent in the interactive class.
    pub batch_neighbours: Latency,
    pub p99_ratio: f64,
    pub target_p99_ratio: f64,
    pub within_target: bool,
}

#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl Latency {
    fn of(ms: &[f64]) -> Self {
        Self {
            p50_ms: round(percentile(ms, 0.50), 2),
            p99_ms: round(percentile(ms, 0.99), 2),
        }
    }
}

/// The agent image, the model store and bundle, and the disks a VM running it gets.
fn model_parts() -> anyhow::Result<(BuiltImage, ModelStore, Bundle, ModelDisks)> {
    let cache = image::default_cache_dir();
    let store = ModelStore::new(&cache);
    let img = image::find_image(&cache, AGENT_IMAGE).context("the agent image is missing")?;
    let bundle = store.find(MODEL)?;
    let disk = model_disks(&store, &bundle, &img.manifest.libraries)?;
    Ok((img, store, bundle, disk))
}

/// Files a carrier needs for this measurement.
pub fn carrier_files() -> anyhow::Result<Vec<PathBuf>> {
    let (_, store, bundle, disk) = model_parts()?;
    Ok(carrier_copies(&store, &disk, &bundle))
}

pub fn measure(requests: u32) -> anyhow::Result<IsolationResult> {
    let opts = super::agent_options(AgentRequest {
        model: Some(MODEL.to_owned()),
        class: Some(PriorityClass::Interactive),
        ..Default::default()
    })?;
    let mut agent = AgentVm::boot(&opts).context("the interactive agent did not boot")?;
    let cgroup = agent
        .cgroup()
        .context("agents get no cgroup on this host")?;
    // The first request loads the model.
    latencies(&mut agent, 1)?;

    eprintln!("agentos bench sched: isolation: alone");
    let alone = latencies(&mut agent, requests)?;

    eprintln!("agentos bench sched: isolation: {NEIGHBOURS} neighbours, same weight");
    cgroup.set_weight(PriorityClass::Batch.weight())?;
    let same_weight = beside_hogs(&mut agent, requests)?;

    eprintln!("agentos bench sched: isolation: {NEIGHBOURS} batch neighbours");
    cgroup.set_weight(PriorityClass::Interactive.weight())?;
    let batch = beside_hogs(&mut agent, requests)?;
    drop(cgroup);
    agent.shutdown();

    let (alone, same_weight, batch) = (
        Latency::of(&alone),
        Latency::of(&same_weight),
        Latency::of(&batch),
    );
    let p99_ratio = ratio(batch.p99_ms, alone.p99_ms);
    Ok(IsolationResult {
        requests,
        neighbours: NEIGHBOURS,
        within_target: p99_ratio <= TARGET_RATIO,
        p99_ratio,
        target_p99_ratio: TARGET_RATIO,
        alone,
        same_weight,
        batch_neighbours: batch,
    })
}

/// `requests` inference latencies, in milliseconds, measured from the host.
fn latencies(agent: &mut AgentVm, requests: u32) -> anyhow::Result<Vec<f64>> {
    let mut ms = Vec::new();
    for _ in 0..requests {
        let started = Instant::now();
        agent.conn().infer(InferRequest {
            id: 0,
            model: MODEL.into(),
            task: Task::Classify,
            inputs: vec![TEXT.into()],
            options: InferOptions::default(),
        })?;
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(ms)
}

/// Latencies while `NEIGHBOURS` batch agents burn CPU; they are stopped afterwards.
fn beside_hogs(agent: &mut AgentVm, requests: u32) -> anyhow::Result<Vec<f64>> {
    let opts = super::agent_options(AgentRequest {
        memory_mib: Some(HOG_MEMORY_MIB),
        class: Some(PriorityClass::Batch),
        ..Default::default()
    })?;
    let mut hogs = Vec::new();
    for booted in AgentVm::boot_all(&vec![opts; NEIGHBOURS]) {
        hogs.push(booted.context("a neighbour did not boot")?);
    }
    let pids: Vec<u32> = hogs.iter().filter_map(AgentVm::vmm_pid).collect();
    let burners: Vec<_> = hogs
        .into_iter()
        .map(|mut vm| {
            std::thread::spawn(move || {
                // Ended from outside: the VMM is told to stop once the measurement is done.
                let _ = super::burner::burn(&mut vm, 3600);
                vm.shutdown();
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let measured = latencies(agent, requests);
    for pid in pids {
        // SAFETY: kill has no memory-safety preconditions; the pid is a VMM we started and
        // have not reaped (its thread reaps it after this signal ends it).
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    for burner in burners {
        if burner.join().is_err() {
            bail!("a neighbour's thread panicked");
        }
    }
    measured
}
