//! `agentos bench sched`: does the host enforce the CPU slices agents are given?
//!
//! - **Quota**: an agent burning CPU with `--cpus 0.25`, `0.5` and `1.0` should get that share of
//!   a CPU (target ±5 %), measured from its cgroup's CPU time over a fixed window.
//! - **Weights**: two CPU-bound agents pinned to the same CPU with weights 100 and 300 should
//!   split it 1:3 (the heavier one's share 0.75 ±5 %).
//! - **Pause and resume**: how long freezing and thawing a running agent's cgroup takes, and that
//!   a frozen agent uses no CPU.
//! - **Isolation**: inference latency of an interactive agent alone and beside CPU-burning
//!   neighbours (see [`super::isolation`]).
//!
//! Runs where Linux guests run here: directly, or inside the QEMU carrier (whose single vCPU is
//! then the CPU being shared).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use super::burner;
use super::isolation::{self, IsolationResult};
use super::{Stats, round};
use agentos::carrier;
use agentos::placement::{self, CarrierChoice, Placement};
use agentos_core::agent::spec::AgentRequest;
use agentos_core::agent::vm::{AgentVm, BootOptions, CpuSlice};
use agentos_core::cgroup::{AgentCgroup, CgroupStats};

const QUOTAS: [f64; 3] = [0.25, 0.5, 1.0];
const WEIGHTS: [u32; 2] = [100, 300];
/// Relative error allowed by the targets.
const TOLERANCE: f64 = 0.05;
/// Time for a burner to get going before the window opens.
const WARM_UP: Duration = Duration::from_secs(2);
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const MEMORY_MIB: u64 = 128;

#[derive(clap::Args, Debug)]
pub struct SchedBenchArgs {
    /// Length of each measurement window, in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub window: u64,
    /// Inference requests per isolation phase.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub requests: u32,
    /// Freeze/thaw cycles for the pause and resume latency.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub cycles: u32,
    /// Where the agents run (see `agentos run --help`).
    #[arg(long, value_enum, default_value_t = CarrierChoice::Auto)]
    pub carrier: CarrierChoice,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct SchedResults {
    /// `direct` or `carrier`.
    placement: &'static str,
    window_s: u64,
    quota: Vec<QuotaResult>,
    weights: WeightResult,
    pause_resume: PauseResult,
    isolation: IsolationResult,
    /// Whether every measured value met its target.
    all_within_target: bool,
}

#[derive(Debug, Serialize)]
struct QuotaResult {
    cpus: f64,
    /// CPU time used / wall time.
    share: f64,
    target: f64,
    error_pct: f64,
    within_target: bool,
    throttled_periods: u64,
}

#[derive(Debug, Serialize)]
struct WeightResult {
    weights: [u32; 2],
    /// Each agent's part of the CPU time the two used.
    shares: [f64; 2],
    target_shares: [f64; 2],
    error_pct: f64,
    within_target: bool,
}

#[derive(Debug, Serialize)]
struct PauseResult {
    cycles: u32,
    pause_ms: Stats,
    resume_ms: Stats,
    /// CPU time the burning agent used while frozen, over all cycles.
    cpu_us_while_paused: u64,
}

pub fn run(args: &SchedBenchArgs) -> anyhow::Result<i32> {
    let placement = placement::decide(args.carrier)?;
    if placement == Placement::Carrier {
        return Ok(carrier::rerun_inside(isolation::carrier_files()?)?);
    }
    let window = Duration::from_secs(args.window);
    let placement = placement.label();

    let mut quota = Vec::new();
    for cpus in QUOTAS {
        eprintln!("agentos bench sched: quota {cpus} CPU");
        quota.push(measure_quota(cpus, window)?);
    }
    eprintln!("agentos bench sched: weights {WEIGHTS:?} on one CPU");
    let weights = measure_weights(window)?;
    eprintln!("agentos bench sched: pause and resume");
    let pause_resume = measure_pause(args.cycles)?;
    let isolation = isolation::measure(args.requests)?;
    let all_within_target = quota.iter().all(|q| q.within_target)
        && weights.within_target
        && pause_resume.cpu_us_while_paused == 0
        && isolation.within_target;
    let results = SchedResults {
        placement,
        window_s: args.window,
        quota,
        weights,
        pause_resume,
        isolation,
        all_within_target,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        print_summary(&results);
    }
    Ok(0)
}

fn print_summary(r: &SchedResults) {
    let mark = |ok: bool| if ok { "ok" } else { "MISSED" };
    println!("CPU slices ({}, {} s windows):", r.placement, r.window_s);
    for q in &r.quota {
        println!(
            "  quota {:>4} CPU: share {:.3} (target {} ±5%, error {:.1}%) {}",
            q.cpus,
            q.share,
            q.target,
            q.error_pct,
            mark(q.within_target)
        );
    }
    let w = &r.weights;
    println!(
        "  weights {:?} on one CPU: shares {:?} (target {:?} ±5%, error {:.1}%) {}",
        w.weights,
        w.shares,
        w.target_shares,
        w.error_pct,
        mark(w.within_target)
    );
    let p = &r.pause_resume;
    println!(
        "  pause {:.2} ms, resume {:.2} ms (medians of {}); CPU used while paused {} us (target 0) {}",
        p.pause_ms.median,
        p.resume_ms.median,
        p.cycles,
        p.cpu_us_while_paused,
        mark(p.cpu_us_while_paused == 0)
    );
    let i = &r.isolation;
    println!(
        "  isolation ({} requests of {}): p50/p99 alone {:.0}/{:.0} ms, beside {} same-weight agents {:.0}/{:.0} ms, beside {} batch agents {:.0}/{:.0} ms; p99 ratio {:.3} (target <= {}) {}",
        i.requests,
        isolation::MODEL,
        i.alone.p50_ms,
        i.alone.p99_ms,
        i.neighbours,
        i.same_weight.p50_ms,
        i.same_weight.p99_ms,
        i.neighbours,
        i.batch_neighbours.p50_ms,
        i.batch_neighbours.p99_ms,
        i.p99_ratio,
        i.target_p99_ratio,
        mark(i.within_target)
    );
}

/// How the benchmark's agents boot: the agent image, one vCPU, `cpu` as their slice.
fn boot_options(cpu: CpuSlice) -> anyhow::Result<BootOptions> {
    let mut opts = super::agent_options(AgentRequest {
        memory_mib: Some(MEMORY_MIB),
        cpus: cpu.cpus,
        weight: cpu.weight,
        cpuset: cpu.cpuset,
        pin: cpu.pin,
        ..Default::default()
    })?;
    opts.boot_timeout = BOOT_TIMEOUT;
    Ok(opts)
}

fn boot(cpu: CpuSlice) -> anyhow::Result<AgentVm> {
    let vm = AgentVm::boot(&boot_options(cpu)?).context("the agent VM did not boot")?;
    if vm.cgroup().is_none() {
        bail!("agents get no cgroup on this host (see `agentos doctor`)");
    }
    Ok(vm)
}

/// The CPU share each cgroup gets over `window`, while the burners run.
fn shares(cgroups: &[Arc<AgentCgroup>], window: Duration) -> (Vec<f64>, Vec<CgroupStats>) {
    std::thread::sleep(WARM_UP);
    let before: Vec<_> = cgroups.iter().map(|c| c.stats()).collect();
    let started = Instant::now();
    std::thread::sleep(window);
    let after: Vec<_> = cgroups.iter().map(|c| c.stats()).collect();
    let wall_us = started.elapsed().as_micros() as f64;
    let shares = before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.cpu_usage_us.saturating_sub(b.cpu_usage_us) as f64 / wall_us)
        .collect();
    let deltas = before
        .iter()
        .zip(&after)
        .map(|(b, a)| CgroupStats {
            nr_throttled: a.nr_throttled.saturating_sub(b.nr_throttled),
            ..*a
        })
        .collect();
    (shares, deltas)
}

/// Runs `burn` on every VM on threads of their own while the CPU shares are measured.
fn burn_and_measure(
    vms: Vec<AgentVm>,
    window: Duration,
) -> anyhow::Result<(Vec<f64>, Vec<CgroupStats>)> {
    let cgroups: Vec<_> = vms.iter().filter_map(AgentVm::cgroup).collect();
    let secs = (WARM_UP + window).as_secs() + 2;
    let burners: Vec<_> = vms
        .into_iter()
        .map(|mut vm| {
            std::thread::spawn(move || {
                let result = burner::burn(&mut vm, secs);
                vm.shutdown();
                result
            })
        })
        .collect();
    let measured = shares(&cgroups, window);
    drop(cgroups);
    for burner in burners {
        burner
            .join()
            .map_err(|_| anyhow::anyhow!("a burner thread panicked"))??;
    }
    Ok(measured)
}

fn measure_quota(cpus: f64, window: Duration) -> anyhow::Result<QuotaResult> {
    let vm = boot(CpuSlice {
        cpus: Some(cpus),
        ..Default::default()
    })?;
    let (shares, stats) = burn_and_measure(vec![vm], window)?;
    let share = shares[0];
    let error = (share - cpus).abs() / cpus;
    Ok(QuotaResult {
        cpus,
        share: round(share, 3),
        target: cpus,
        error_pct: round(error * 100.0, 3),
        within_target: error <= TOLERANCE,
        throttled_periods: stats[0].nr_throttled,
    })
}

fn measure_weights(window: Duration) -> anyhow::Result<WeightResult> {
    let vms = WEIGHTS
        .iter()
        .map(|w| {
            boot(CpuSlice {
                weight: Some(*w),
                cpuset: Some("0".into()),
                ..Default::default()
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (used, _) = burn_and_measure(vms, window)?;
    let total: f64 = used.iter().sum();
    if total <= 0.0 {
        bail!("the burners used no CPU");
    }
    let shares = [used[0] / total, used[1] / total];
    let weight_total = f64::from(WEIGHTS[0] + WEIGHTS[1]);
    let target_shares = [
        f64::from(WEIGHTS[0]) / weight_total,
        f64::from(WEIGHTS[1]) / weight_total,
    ];
    let error = (shares[1] - target_shares[1]).abs() / target_shares[1];
    Ok(WeightResult {
        weights: WEIGHTS,
        shares: shares.map(|s| round(s, 3)),
        target_shares,
        error_pct: round(error * 100.0, 3),
        within_target: error <= TOLERANCE,
    })
}

fn measure_pause(cycles: u32) -> anyhow::Result<PauseResult> {
    let vm = boot(CpuSlice::default())?;
    let cgroup = vm.cgroup().context("no cgroup")?;
    // Long enough for every cycle: each pauses for 100 ms.
    let secs = u64::from(cycles) / 5 + 10;
    let burner = std::thread::spawn(move || {
        let mut vm = vm;
        let result = burner::burn(&mut vm, secs);
        vm.shutdown();
        result
    });
    std::thread::sleep(WARM_UP);
    let (mut pause, mut resume) = (Vec::new(), Vec::new());
    let mut paused_cpu = 0;
    let cycled = (0..cycles).try_for_each(|_| {
        let t = Instant::now();
        cgroup.freeze()?;
        pause.push(t.elapsed().as_secs_f64() * 1000.0);
        let frozen_at = cgroup.stats().cpu_usage_us;
        std::thread::sleep(Duration::from_millis(100));
        paused_cpu += cgroup.stats().cpu_usage_us.saturating_sub(frozen_at);
        let t = Instant::now();
        cgroup.thaw()?;
        resume.push(t.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(50));
        Ok::<_, agentos_core::cgroup::CgroupError>(())
    });
    // Whatever happened, the agent must not stay frozen: its burner ends and shuts it down.
    let _ = cgroup.thaw();
    drop(cgroup);
    burner
        .join()
        .map_err(|_| anyhow::anyhow!("the burner thread panicked"))??;
    cycled.context("pause and resume failed")?;
    Ok(PauseResult {
        cycles,
        pause_ms: Stats::of(&pause),
        resume_ms: Stats::of(&resume),
        cpu_us_while_paused: paused_cpu,
    })
}
