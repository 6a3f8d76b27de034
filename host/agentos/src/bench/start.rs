//! `agentos bench start`: how long an agent takes from the request to its first exec reply,
//! started three ways side by side in one run: a cold boot, a restore from a snapshot, and a
//! claim from a warm pool (an agent restored ahead of need); cold boots and restores also many
//! at once (`--at-once N`); and how much host memory each idle agent holds (PSS, so that pages
//! clones share with one another and with the snapshot count once).
//!
//! Runs where Linux guests run here: directly, or inside the QEMU carrier. The top-level `ratio`
//! is restore / cold boot, medians.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use agentos_protocol::ExecRequest;
use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use super::{Stats, percentile, ratio, round};
use crate::agent::connection::ExecIo;
use crate::agent::pool::Spawner;
use crate::agent::vm::{AgentVm, BootOptions};
use crate::carrier::{self, CarrierChoice, CarrierRun};
use crate::image::{self, AGENT_IMAGE};

#[derive(clap::Args, Debug)]
pub struct StartBenchArgs {
    /// Starts of each kind, one at a time.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub runs: u32,
    /// Agents started at once, each way, for the concurrent runs and the memory figures.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub at_once: u32,
    /// Guest memory of each agent, in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u64,
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
    pub at_once: u32,
    /// What saving the template agent wrote: guest memory (holes for zero pages excluded).
    pub snapshot_memory_bytes: u64,
    pub cold: StartTimes,
    pub restore: StartTimes,
    /// Taking a ready agent from a warm pool of the snapshot (the pool refilled between runs).
    pub pool: StartTimes,
    /// `at_once` agents started together, each timed from the common start.
    pub cold_at_once: StartTimes,
    pub restore_at_once: StartTimes,
    /// Proportional set size of each idle agent's VMM, KiB, `at_once` agents up together.
    pub cold_pss_kib: Stats,
    pub restore_pss_kib: Stats,
    /// restore / cold, medians (one at a time).
    pub ratio: f64,
    /// pool claim / cold, medians.
    pub pool_ratio: f64,
    pub ratio_at_once: f64,
    /// restore / cold, median PSS per agent.
    pub pss_ratio: f64,
}

pub fn run(args: &StartBenchArgs) -> anyhow::Result<i32> {
    let results = if !args.here && carrier::should_use(args.carrier)? {
        in_carrier(args)?
    } else {
        measure(args, "direct")?
    };
    if args.json || args.here {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        let row = |name: &str, t: &StartTimes| {
            println!(
                "  {name:<30} median {:>8.1} ms  (min {:.1}, max {:.1}, p99 {:.1})",
                t.ms.median, t.ms.min, t.ms.max, t.p99_ms
            );
        };
        println!(
            "Agents of {} MiB ({}), request to first exec reply:",
            results.memory_mib, results.placement
        );
        row("cold boot", &results.cold);
        row("restore", &results.restore);
        row("warm pool claim", &results.pool);
        row(
            &format!("cold boot, {} at once", results.at_once),
            &results.cold_at_once,
        );
        row(
            &format!("restore, {} at once", results.at_once),
            &results.restore_at_once,
        );
        println!(
            "  PSS per idle agent: cold {:.0} KiB, restored {:.0} KiB",
            results.cold_pss_kib.median, results.restore_pss_kib.median
        );
        println!(
            "  ratios restore/cold: {} (one at a time), {} (at once), PSS {}; pool claim/cold: {}",
            results.ratio, results.ratio_at_once, results.pss_ratio, results.pool_ratio
        );
    }
    Ok(0)
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
        args.at_once.to_string(),
        "--memory".into(),
        args.memory.to_string(),
    ];
    // Room for the snapshot, the agents and their clones.
    let memory_mib = (4096 + 2 * u64::from(args.at_once) * (args.memory + 64)).min(16384);
    let spec = CarrierRun {
        argv,
        env: Default::default(),
        files: carrier::agent_image_files(),
        memory_mib,
        cpus: carrier::DEFAULT_CPUS,
        console: false,
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
    let cache = image::default_cache_dir();
    let img = image::find_image(&cache, AGENT_IMAGE)
        .map_err(|e| anyhow::anyhow!("{e}; run `scripts/setup` to build the guest image"))?;
    let mut cold = BootOptions::of_image(&img);
    cold.memory_mib = args.memory;
    // The snapshot lives beside the image cache: on disk, where restores read it through the
    // page cache (a tmpfs would hold it in RAM twice).
    let dir = SnapshotDir(cache.join(format!("bench-start-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)
        .with_context(|| format!("cannot create {}", dir.0.display()))?;
    let mut template = cold.clone();
    template.snapshot_to = Some(dir.0.clone());
    let mut vm = AgentVm::boot(&template).context("the template agent did not boot")?;
    exec_true(&mut vm)?;
    vm.snapshot().context("the template agent was not saved")?;
    let snapshot_memory_bytes = allocated_bytes(&dir.0.join(agentos_vmm::snapshot::MEMORY_FILE));
    let mut restore = cold.clone();
    restore.from = Some(dir.0.clone());

    let (mut cold_ms, mut restore_ms) = (Vec::new(), Vec::new());
    for _ in 0..args.runs {
        cold_ms.push(start_one(&cold)?);
        restore_ms.push(start_one(&restore)?);
    }
    let pool_ms = claims(&restore, args.runs)?;
    let n = args.at_once as usize;
    let (cold_at_once, cold_pss) = start_many(&vec![cold; n])?;
    let (restore_at_once, restore_pss) = start_many(&vec![restore; n])?;
    let cold = StartTimes::of(&cold_ms);
    let restore = StartTimes::of(&restore_ms);
    let pool = StartTimes::of(&pool_ms);
    let cold_at_once = StartTimes::of(&cold_at_once);
    let restore_at_once = StartTimes::of(&restore_at_once);
    let cold_pss_kib = Stats::of(&cold_pss);
    let restore_pss_kib = Stats::of(&restore_pss);
    Ok(StartResults {
        placement: placement.into(),
        memory_mib: args.memory,
        runs: args.runs,
        at_once: args.at_once,
        snapshot_memory_bytes,
        ratio: ratio(restore.ms.median, cold.ms.median),
        pool_ratio: ratio(pool.ms.median, cold.ms.median),
        ratio_at_once: ratio(restore_at_once.ms.median, cold_at_once.ms.median),
        pss_ratio: ratio(restore_pss_kib.median, cold_pss_kib.median),
        cold,
        restore,
        pool,
        cold_at_once,
        restore_at_once,
        cold_pss_kib,
        restore_pss_kib,
    })
}

/// Runs `true` in the agent: its first exec reply.
fn exec_true(vm: &mut AgentVm) -> anyhow::Result<()> {
    let request = ExecRequest {
        program: "/bin/true".into(),
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

/// Starts one agent per entry of `opts` at once: the milliseconds from the common start to each
/// one's first exec reply, and each idle VMM's PSS once all are up.
fn start_many(opts: &[BootOptions]) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let started = Instant::now();
    let booted = AgentVm::boot_all(opts);
    let mut vms = Vec::with_capacity(booted.len());
    let mut times = Vec::with_capacity(booted.len());
    for vm in booted {
        let mut vm = vm.context("an agent did not start")?;
        exec_true(&mut vm)?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        vms.push(vm);
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
    Ok((times, pss))
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
