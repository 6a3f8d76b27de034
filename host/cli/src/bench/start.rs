//! `agentos bench start`: how long an agent takes from the request to its first exec reply,
//! started three ways side by side in one run: a cold boot, a restore from a snapshot, and a
//! claim from a warm pool (an agent restored ahead of need); cold boots and restores also many
//! at once (`--at-once 1,10`: a run per number, agents the host has no room for refused and
//! counted); and how much host memory each idle agent holds (PSS, `--pss-agents` up together,
//! so that pages clones share with one another and with the snapshot count once). Agents with a model (its
//! runtime and bundle disks) are timed beside agents without one, and their memory, with the
//! model loaded, beside that of plain agents: cold, and restored from a snapshot taken after
//! the model was loaded; all of that twice, the model disks as pmem regions (what agents get)
//! and as virtio-blk disks, with the pmem / block ratios.
//!
//! Runs where Linux guests run here: directly, or inside the QEMU carrier. The top-level `ratio`
//! is restore / cold boot, medians.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use agentos_protocol::{ExecRequest, InferOptions, InferRequest, Program};
use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use super::{Stats, percentile, ratio, round};
use agentos::carrier::{self, CarrierRun};
use agentos::placement::{self, CarrierChoice, Placement};
use agentos_core::agent::connection::ExecIo;
use agentos_core::agent::pool::Spawner;
use agentos_core::agent::spec::AgentRequest;
use agentos_core::agent::vm::{AgentVm, BootOptions, VmError};
use agentos_image::model::{DiskDevice, ModelStore, carrier_copies};
use agentos_image::{self as image};

/// At most this many agents started at once, or up together, in one measurement.
const MAX_AGENTS_AT_ONCE: i64 = 64;

#[derive(clap::Args, Debug)]
pub struct StartBenchArgs {
    /// Starts of each kind, one at a time.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub runs: u32,
    /// How many agents start at once, each way, for the concurrent runs: one run per number
    /// (comma-separated). Agents the host has no room for are refused and counted, not waited
    /// for; those it cannot boot within the boot timeout (5 min) are counted too.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 10], value_parser = clap::value_parser!(u32).range(1..=MAX_AGENTS_AT_ONCE))]
    pub at_once: Vec<u32>,
    /// Agents up together, each way, for the memory figures.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=MAX_AGENTS_AT_ONCE))]
    pub pss_agents: u32,
    /// Guest memory of each agent, in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u64,
    /// The model of the agents with a model (see `agentos model ls`).
    #[arg(long, default_value = "sentiment")]
    pub model: String,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
    /// Where the agents run (see `agentos run --help`).
    #[arg(long, value_enum, default_value_t = CarrierChoice::Auto)]
    pub carrier: CarrierChoice,
    /// Run here and print JSON (what runs inside a carrier).
    #[arg(long, hide = true)]
    pub here: bool,
}

/// Milliseconds from the request to the first exec reply.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct StartTimes {
    pub ms: Stats,
    pub p99_ms: f64,
}

impl StartTimes {
    fn of(values: &[f64]) -> Self {
        Self {
            ms: Stats::of(values),
            p99_ms: round(percentile(values, 0.99), 1),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct StartResults {
    /// `direct` or `carrier`.
    pub placement: String,
    pub memory_mib: u64,
    pub runs: u32,
    /// What saving the template agent wrote: guest memory (holes for zero pages excluded).
    pub snapshot_memory_bytes: u64,
    pub cold: StartTimes,
    pub restore: StartTimes,
    /// Taking a ready agent from a warm pool of the snapshot (the pool refilled between runs).
    pub pool: StartTimes,
    /// Agents started together, each timed from the common start, one entry per number asked.
    pub at_once: Vec<AtOnce>,
    /// Agents up together for the memory figures.
    pub pss_agents: u32,
    /// Proportional set size of each idle agent's VMM, KiB, `pss_agents` up together.
    pub cold_pss_kib: Stats,
    pub restore_pss_kib: Stats,
    /// restore / cold, medians (one at a time).
    pub ratio: f64,
    /// pool claim / cold, medians.
    pub pool_ratio: f64,
    /// restore / cold, median PSS per agent.
    pub pss_ratio: f64,
    /// Agents with the model on pmem regions (what agents get), then on virtio-blk disks, and
    /// pmem / block.
    pub model: ModelResults,
    pub model_block: ModelResults,
    pub pmem_vs_block: DeviceRatios,
}

/// pmem / block, medians: the model disks mapped in place against read into the guest.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeviceRatios {
    pub cold: f64,
    pub first_infer: f64,
    pub restore_infer: f64,
    pub cold_pss: f64,
    pub restore_pss: f64,
}

impl DeviceRatios {
    fn of(pmem: &ModelResults, block: &ModelResults) -> Self {
        Self {
            cold: ratio(pmem.cold.ms.median, block.cold.ms.median),
            first_infer: ratio(pmem.first_infer_ms.median, block.first_infer_ms.median),
            restore_infer: ratio(pmem.restore_infer.ms.median, block.restore_infer.ms.median),
            cold_pss: ratio(pmem.cold_pss_kib.median, block.cold_pss_kib.median),
            restore_pss: ratio(pmem.restore_pss_kib.median, block.restore_pss_kib.median),
        }
    }
}

/// `agents` started together each way.
#[derive(Debug, Serialize, Deserialize)]
pub struct AtOnce {
    pub agents: u32,
    /// Of those, how many the host refused for want of room (not timed).
    pub cold_refused: u32,
    pub restore_refused: u32,
    /// Of those, how many did not come up within the boot timeout (not timed).
    #[serde(default)]
    pub cold_timed_out: u32,
    #[serde(default)]
    pub restore_timed_out: u32,
    /// Of those, how many failed otherwise (not timed), and the first such failure.
    #[serde(default)]
    pub cold_failed: u32,
    #[serde(default)]
    pub restore_failed: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_failure: Option<String>,
    pub cold: StartTimes,
    pub restore: StartTimes,
    /// restore / cold, medians.
    pub ratio: f64,
}

/// Agents with a model beside agents without one.
#[derive(Debug, Serialize, Deserialize)]
pub struct ModelResults {
    pub name: String,
    /// How the agents got the model disks.
    pub device: DiskDevice,
    /// The runtime and bundle disks, bytes: what the host holds once for every agent.
    pub disk_bytes: u64,
    /// A cold boot of an agent with the model's disks, to its first exec reply.
    pub cold: StartTimes,
    /// Its first request, which loads the model.
    pub first_infer_ms: Stats,
    /// A restore of an agent saved with the model loaded, to its first inference reply.
    pub restore_infer: StartTimes,
    /// PSS of each idle agent, `pss_agents` up together, after one request: cold booted, and
    /// restored from the snapshot with the model loaded.
    pub cold_pss_kib: Stats,
    pub restore_pss_kib: Stats,
    /// One copy of the model: its disks (`disk_bytes`), which the host holds once for every
    /// agent.
    pub model_copy_kib: f64,
    /// What an idle cold model agent holds beyond a plain one: median cold model PSS - median
    /// cold plain PSS.
    pub extra_pss_kib: f64,
    /// Model agent boot / plain agent boot, medians (goal <= 1.1).
    pub boot_ratio: f64,
    /// `pss_agents` idle model agents / (as many plain agents + one model copy), summed PSS: cold
    /// boots and restored clones (goal <= 1.2).
    pub memory_ratio_cold: f64,
    pub memory_ratio_restored: f64,
    /// 16 GiB / median PSS of an idle restored agent with the model loaded: how many fit in a
    /// 16 GiB host by what they use (admission counts each agent's declared memory instead).
    pub agents_per_16gib: u64,
}

pub fn run(args: &StartBenchArgs) -> anyhow::Result<i32> {
    let results = if !args.here && placement::decide(args.carrier)? == Placement::Carrier {
        in_carrier(args)?
    } else {
        measure(args, "direct")?
    };
    if args.json || args.here {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        println!(
            "Agents of {} MiB ({}), request to first exec reply:",
            results.memory_mib, results.placement
        );
        row("cold boot", &results.cold);
        row("restore", &results.restore);
        row("warm pool claim", &results.pool);
        for level in &results.at_once {
            row(&format!("cold boot, {} at once", level.agents), &level.cold);
            row(
                &format!("restore, {} at once", level.agents),
                &level.restore,
            );
            if level.cold_refused + level.restore_refused > 0 {
                println!(
                    "  refused for want of room: {} cold, {} restored",
                    level.cold_refused, level.restore_refused
                );
            }
            if level.cold_timed_out + level.restore_timed_out > 0 {
                println!(
                    "  not up within the boot timeout: {} cold, {} restored",
                    level.cold_timed_out, level.restore_timed_out
                );
            }
            if let Some(failure) = &level.first_failure {
                println!(
                    "  failed: {} cold, {} restored; the first: {failure}",
                    level.cold_failed, level.restore_failed
                );
            }
        }
        println!(
            "  PSS per idle agent, {} up: cold {:.0} KiB, restored {:.0} KiB",
            results.pss_agents, results.cold_pss_kib.median, results.restore_pss_kib.median
        );
        println!(
            "  ratios restore/cold: {} (one at a time), {} (at once), PSS {}; pool claim/cold: {}",
            results.ratio,
            results
                .at_once
                .iter()
                .map(|l| format!("{} ({} at once)", l.ratio, l.agents))
                .collect::<Vec<_>>()
                .join(", "),
            results.pss_ratio,
            results.pool_ratio
        );
        for model in [&results.model, &results.model_block] {
            print_model(model);
        }
        let r = &results.pmem_vs_block;
        println!(
            "  pmem/block: cold boot {}, first inference {}, restore to inference {}, PSS cold {}, restored {}",
            r.cold, r.first_infer, r.restore_infer, r.cold_pss, r.restore_pss
        );
    }
    Ok(0)
}

fn row(name: &str, t: &StartTimes) {
    println!(
        "  {name:<30} median {:>8.1} ms  (min {:.1}, max {:.1}, p99 {:.1})",
        t.ms.median, t.ms.min, t.ms.max, t.p99_ms
    );
}

fn print_model(model: &ModelResults) {
    println!(
        "Agents with model `{}` on {:?} (disks {:.1} MB, shared):",
        model.name,
        model.device,
        model.disk_bytes as f64 / 1e6
    );
    row("cold boot", &model.cold);
    row("restore, to the first inference", &model.restore_infer);
    println!(
        "  first inference after a cold boot: median {:.1} ms",
        model.first_infer_ms.median
    );
    println!(
        "  PSS per idle agent, model loaded: cold {:.0} KiB ({:.0} KiB more than a plain agent), restored {:.0} KiB; one model copy {:.0} KiB",
        model.cold_pss_kib.median,
        model.extra_pss_kib,
        model.restore_pss_kib.median,
        model.model_copy_kib
    );
    println!(
        "  ratios: boot model/plain {}; memory model agents/(plain agents + one copy): cold {}, restored {}; {} restored agents per 16 GiB",
        model.boot_ratio,
        model.memory_ratio_cold,
        model.memory_ratio_restored,
        model.agents_per_16gib
    );
}

fn in_carrier(args: &StartBenchArgs) -> anyhow::Result<StartResults> {
    let argv = vec![
        std::env::current_exe()?.display().to_string(),
        "bench".into(),
        "start".into(),
        "--here".into(),
        "--runs".into(),
        args.runs.to_string(),
        "--at-once".into(),
        args.at_once
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(","),
        "--pss-agents".into(),
        args.pss_agents.to_string(),
        "--memory".into(),
        args.memory.to_string(),
    ];
    // Room for the snapshot, the agents and their clones.
    let most = args.at_once.iter().copied().chain([args.pss_agents]).max();
    let memory_mib = (4096 + 2 * u64::from(most.unwrap_or(1)) * (args.memory + 64)).min(16384);
    let store = ModelStore::new(&image::default_cache_dir());
    let bundle = store.find(&args.model)?;
    let model = super::agent_options(AgentRequest {
        model: Some(args.model.clone()),
        ..Default::default()
    })?;
    let disks = model
        .model_disks
        .context("an agent with a model has its disks")?;
    let mut files = carrier::agent_image_files();
    files.extend(carrier_copies(&store, &disks, &bundle));
    let spec = CarrierRun {
        argv: argv
            .into_iter()
            .chain(["--model".into(), args.model.clone()])
            .collect(),
        env: Default::default(),
        files,
        memory_mib,
        cpus: carrier::DEFAULT_CPUS,
        console: false,
        pci_test_device: false,
    };
    let mut results: StartResults = super::results_from_carrier(&spec)?;
    results.placement = "carrier".into();
    Ok(results)
}

/// A snapshot directory removed when dropped.
struct SnapshotDir(std::path::PathBuf);

impl Drop for SnapshotDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn measure(args: &StartBenchArgs, placement: &str) -> anyhow::Result<StartResults> {
    let cold = super::agent_options(AgentRequest {
        memory_mib: Some(args.memory),
        ..Default::default()
    })?;
    let (dir, restore) = save_template(&cold, "bench-start", &exec_true)?;
    let snapshot_memory_bytes = allocated_bytes(&dir.0.join(agentos_vmm::snapshot::MEMORY_FILE));

    let (mut cold_ms, mut restore_ms) = (Vec::new(), Vec::new());
    for _ in 0..args.runs {
        cold_ms.push(start_one(&cold)?);
        restore_ms.push(start_one(&restore)?);
    }
    let pool_ms = claims(&restore, args.runs)?;
    let mut at_once = Vec::new();
    for &agents in &args.at_once {
        let n = agents as usize;
        let cold_started = start_many(&vec![cold.clone(); n], None)?;
        let restore_started = start_many(&vec![restore.clone(); n], None)?;
        let (cold, restore) = (
            StartTimes::of(&cold_started.ms),
            StartTimes::of(&restore_started.ms),
        );
        at_once.push(AtOnce {
            agents,
            cold_refused: cold_started.refused,
            restore_refused: restore_started.refused,
            cold_timed_out: cold_started.timed_out,
            restore_timed_out: restore_started.timed_out,
            cold_failed: cold_started.failed,
            restore_failed: restore_started.failed,
            first_failure: cold_started.first_failure.or(restore_started.first_failure),
            ratio: ratio(restore.ms.median, cold.ms.median),
            cold,
            restore,
        });
    }
    let n = args.pss_agents as usize;
    let cold_pss = start_many(&vec![cold.clone(); n], None)?.pss_kib;
    let restore_pss = start_many(&vec![restore; n], None)?.pss_kib;
    let plain = Plain {
        ms: &cold_ms,
        pss: (&cold_pss, &restore_pss),
    };
    let model = measure_model(args, &plain, DiskDevice::Pmem)?;
    let model_block = measure_model(args, &plain, DiskDevice::Block)?;
    let cold = StartTimes::of(&cold_ms);
    let restore = StartTimes::of(&restore_ms);
    let pool = StartTimes::of(&pool_ms);
    let cold_pss_kib = Stats::of(&cold_pss);
    let restore_pss_kib = Stats::of(&restore_pss);
    Ok(StartResults {
        placement: placement.into(),
        memory_mib: args.memory,
        runs: args.runs,
        snapshot_memory_bytes,
        ratio: ratio(restore.ms.median, cold.ms.median),
        pool_ratio: ratio(pool.ms.median, cold.ms.median),
        pss_ratio: ratio(restore_pss_kib.median, cold_pss_kib.median),
        cold,
        restore,
        pool,
        at_once,
        pss_agents: args.pss_agents,
        cold_pss_kib,
        restore_pss_kib,
        pmem_vs_block: DeviceRatios::of(&model, &model_block),
        model,
        model_block,
    })
}

/// Plain agents as they were measured: their cold boot times and idle PSS (cold, restored).
struct Plain<'a> {
    ms: &'a [f64],
    pss: (&'a [f64], &'a [f64]),
}

/// Agents with `args.model` on `device`, started the ways `plain` agents were.
fn measure_model(
    args: &StartBenchArgs,
    plain: &Plain<'_>,
    device: DiskDevice,
) -> anyhow::Result<ModelResults> {
    let (plain_ms, plain_pss) = (plain.ms, plain.pss);
    let store = ModelStore::new(&image::default_cache_dir());
    let bundle = store.find(&args.model)?;
    let task = *bundle
        .manifest
        .tasks
        .first()
        .context("the model's manifest names no task")?;
    let mut cold = super::agent_options(AgentRequest {
        memory_mib: Some(args.memory),
        model: Some(args.model.clone()),
        ..Default::default()
    })?;
    let disks = cold
        .model_disks
        .as_mut()
        .context("an agent with a model has its disks")?;
    disks.device = device;
    let disk_bytes = [&disks.runtime, &disks.bundle]
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum();
    let request = InferRequest {
        id: 0,
        model: args.model.clone(),
        task,
        inputs: vec!["The first light of the morning.".into()],
        options: InferOptions::default(),
    };
    let infer = |vm: &mut AgentVm| -> anyhow::Result<f64> {
        let started = Instant::now();
        vm.conn()
            .infer(request.clone())
            .context("the model agent did not answer")?;
        Ok(started.elapsed().as_secs_f64() * 1000.0)
    };

    let (mut cold_ms, mut first_infer_ms) = (Vec::new(), Vec::new());
    for _ in 0..args.runs {
        let started = Instant::now();
        let mut vm = AgentVm::boot(&cold).context("a model agent did not start")?;
        exec_true(&mut vm)?;
        cold_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        first_infer_ms.push(infer(&mut vm)?);
        vm.shutdown();
    }

    // The template: booted, the model loaded by a request, then saved.
    let (_dir, restore) = save_template(&cold, &format!("bench-start-model-{device:?}"), &|vm| {
        infer(vm).map(drop)
    })?;

    let mut restore_infer_ms = Vec::new();
    for _ in 0..args.runs {
        let started = Instant::now();
        let mut vm = AgentVm::boot(&restore).context("a model agent did not restore")?;
        infer(&mut vm)?;
        restore_infer_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        vm.shutdown();
    }
    let n = args.pss_agents as usize;
    let loaded = |vm: &mut AgentVm| infer(vm).map(drop);
    let cold_pss = start_many(&vec![cold; n], Some(&loaded))?.pss_kib;
    let restore_pss = start_many(&vec![restore; n], Some(&loaded))?.pss_kib;

    let cold_pss_kib = Stats::of(&cold_pss);
    let restore_pss_kib = Stats::of(&restore_pss);
    let extra_pss_kib = (cold_pss_kib.median - Stats::of(plain_pss.0).median).max(0.0);
    let model_copy_kib = disk_bytes as f64 / 1024.0;
    let sum = |v: &[f64]| v.iter().sum::<f64>();
    let memory_ratio =
        |model: &[f64], plain: &[f64]| ratio(sum(model), sum(plain) + model_copy_kib);
    Ok(ModelResults {
        name: args.model.clone(),
        device,
        disk_bytes,
        boot_ratio: ratio(Stats::of(&cold_ms).median, Stats::of(plain_ms).median),
        memory_ratio_cold: memory_ratio(&cold_pss, plain_pss.0),
        memory_ratio_restored: memory_ratio(&restore_pss, plain_pss.1),
        agents_per_16gib: if restore_pss_kib.median > 0.0 {
            (16.0 * 1024.0 * 1024.0 / restore_pss_kib.median) as u64
        } else {
            0
        },
        cold: StartTimes::of(&cold_ms),
        first_infer_ms: Stats::of(&first_infer_ms),
        restore_infer: StartTimes::of(&restore_infer_ms),
        cold_pss_kib,
        restore_pss_kib,
        model_copy_kib: round(model_copy_kib, 0),
        extra_pss_kib: round(extra_pss_kib, 0),
    })
}

/// Boots an agent of `opts`, `prepare`s it and saves it into `<cache>/<name>-<pid>`: that
/// directory (removed when dropped) and the options that restore from it. The snapshot lives
/// beside the image cache, on disk, where restores read it through the page cache (a tmpfs
/// would hold it in RAM twice).
fn save_template(
    opts: &BootOptions,
    name: &str,
    prepare: Prepare,
) -> anyhow::Result<(SnapshotDir, BootOptions)> {
    let cache = image::default_cache_dir();
    let dir = SnapshotDir(cache.join(format!("{name}-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)
        .with_context(|| format!("cannot create {}", dir.0.display()))?;
    let mut template = opts.clone();
    template.snapshot_to = Some(dir.0.clone());
    let mut vm = AgentVm::boot(&template).context("the template agent did not boot")?;
    prepare(&mut vm)?;
    vm.snapshot().context("the template agent was not saved")?;
    let mut restore = opts.clone();
    restore.from = Some(dir.0.clone());
    Ok((dir, restore))
}

/// Runs `true` in the agent: its first exec reply.
fn exec_true(vm: &mut AgentVm) -> anyhow::Result<()> {
    let request = ExecRequest {
        run: Program::new("/bin/true"),
        ..Default::default()
    };
    let status = vm.conn().exec(
        request,
        ExecIo {
            stdin: None,
            stdout: &mut io::sink(),
            stderr: &mut io::sink(),
        },
    )?;
    if status.shell_code() != 0 {
        bail!("/bin/true in the agent exited with {}", status.shell_code());
    }
    Ok(())
}

/// Milliseconds from asking for an agent to its first exec reply; the agent is then shut down.
fn start_one(opts: &BootOptions) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut vm = AgentVm::boot(opts).context("an agent did not start")?;
    exec_true(&mut vm)?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    vm.shutdown();
    Ok(ms)
}

/// Milliseconds from claiming a ready agent of a warm pool of `restore`'s snapshot to its first
/// exec reply, `runs` times; the pool refills between claims, unmeasured.
fn claims(restore: &BootOptions, runs: u32) -> anyhow::Result<Vec<f64>> {
    const POOL: &str = "bench";
    let pools = Spawner::start()?;
    pools.create(POOL, restore.clone(), 1)?;
    let mut times = Vec::new();
    for _ in 0..runs {
        let filled = Instant::now();
        while pools.info().first().is_none_or(|p| p.ready == 0) {
            if let Some(e) = pools.info().first().and_then(|p| p.last_error.clone()) {
                bail!("the warm pool's agent did not start: {e}");
            }
            if filled.elapsed() > POOL_FILL_LIMIT {
                bail!(
                    "the warm pool did not fill in {} s",
                    POOL_FILL_LIMIT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let started = Instant::now();
        let mut vm = pools
            .claim(POOL)?
            .context("the warm pool had no agent ready")?;
        exec_true(&mut vm)?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        vm.shutdown();
    }
    pools.stop();
    Ok(times)
}

/// How long a warm pool may take to restore its agent.
const POOL_FILL_LIMIT: Duration = Duration::from_secs(120);

/// What is done to each agent once it answered, before its memory is read.
type Prepare<'a> = &'a dyn Fn(&mut AgentVm) -> anyhow::Result<()>;

/// Agents started together.
struct Started {
    /// Milliseconds from the common start to each one's first exec reply.
    ms: Vec<f64>,
    /// Each idle VMM's PSS, KiB, once all were up.
    pss_kib: Vec<f64>,
    /// How many the host refused for want of room.
    refused: u32,
    /// How many did not come up within their boot timeout.
    timed_out: u32,
    /// How many failed otherwise, and the first failure.
    failed: u32,
    first_failure: Option<String>,
}

/// Starts one agent per entry of `opts` at once (those the host has no room for are refused,
/// those it cannot boot within the boot timeout time out; both are counted), times each to its first exec reply, `prepare`s each, and reads their memory.
fn start_many(opts: &[BootOptions], prepare: Option<Prepare>) -> anyhow::Result<Started> {
    let started = Instant::now();
    let booted = AgentVm::boot_all(opts);
    let mut vms = Vec::with_capacity(booted.len());
    let mut times = Vec::with_capacity(booted.len());
    let (mut refused, mut timed_out, mut failed) = (0, 0, 0);
    let mut first_failure = None;
    for vm in booted {
        let mut vm = match vm {
            Err(VmError::Refused(_)) => {
                refused += 1;
                continue;
            }
            // The host's CPUs could not boot this many in the boot timeout: counted, as what
            // the host held is what is measured.
            Err(VmError::BootTimeout { .. }) => {
                timed_out += 1;
                continue;
            }
            // Whatever else went wrong with one agent of many is counted and shown, not fatal
            // to the run.
            Err(e) => {
                failed += 1;
                first_failure.get_or_insert_with(|| format!("{:#}", anyhow::Error::new(e)));
                continue;
            }
            Ok(vm) => vm,
        };
        if let Err(e) = exec_true(&mut vm) {
            failed += 1;
            first_failure.get_or_insert_with(|| format!("{e:#}"));
            vm.shutdown();
            continue;
        }
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        vms.push(vm);
    }
    if let Some(prepare) = prepare {
        for vm in &mut vms {
            prepare(vm)?;
        }
    }
    // Idle a moment, so that what the boot touched and let go is gone.
    std::thread::sleep(Duration::from_secs(1));
    let pss = vms
        .iter()
        .filter_map(|vm| vm.vmm_pid())
        .map(|pid| vmm_pss_kib(pid) as f64)
        .collect();
    for vm in vms {
        vm.shutdown();
    }
    Ok(Started {
        ms: times,
        pss_kib: pss,
        refused,
        timed_out,
        failed,
        first_failure,
    })
}

/// The PSS of the VMM under the supervisor `pid` (the jailed VMM is its child), or of `pid`.
fn vmm_pss_kib(pid: u32) -> u64 {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|c| c.parse::<u32>().ok())
        .chain(std::iter::once(pid))
        .map(pss_kib)
        .sum()
}

fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Bytes a file takes on disk (a sparse file's data, not its length).
fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}
