//! `agentos top`, `stats`, `pause` and `resume`: watch and control the agents running on this
//! host through their cgroups (named like their run directories, `vm-PID-N`).

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use agentos_core::cgroup::{AgentCgroup, CgroupStats, Layout};
use agentos_core::{rundir, signals};

#[derive(clap::Args, Debug)]
pub struct TopArgs {
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    /// Print one sample and exit.
    #[arg(long)]
    pub once: bool,
}

#[derive(clap::Args, Debug)]
pub struct StatsArgs {
    /// The agent, by the name or label `agentos top` shows.
    pub name: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct NameArg {
    /// The agent, by the name or label `agentos top` shows.
    pub name: String,
}

#[derive(Serialize)]
struct AgentStats<'a> {
    name: &'a str,
    paused: bool,
    #[serde(flatten)]
    stats: CgroupStats,
}

/// The cgroup name of the agent called `name`: its cgroup's own name, or its label.
fn resolve(layout: &Layout, name: &str) -> String {
    let names = AgentCgroup::list(layout);
    if names.iter().any(|n| n == name) {
        return name.to_owned();
    }
    names
        .into_iter()
        .find(|n| rundir::label_of(n).as_deref() == Some(name))
        .unwrap_or_else(|| name.to_owned())
}

pub fn stats(args: &StatsArgs) -> anyhow::Result<i32> {
    let layout = Layout::discover();
    let cgroup = AgentCgroup::open(&layout, &resolve(&layout, &args.name))?;
    let stats = AgentStats {
        name: &args.name,
        paused: cgroup.is_frozen(),
        stats: cgroup.stats(),
    };
    if args.json {
        println!("{}", serde_json::to_string(&stats)?);
    } else {
        let s = &stats.stats;
        println!("name            {}", stats.name);
        println!("state           {}", state(stats.paused));
        println!("cpu time        {:.3} s", s.cpu_usage_us as f64 / 1e6);
        println!(
            "throttled       {:.3} s in {} periods",
            s.throttled_us as f64 / 1e6,
            s.nr_throttled
        );
        println!("memory          {:.1} MiB", mib(s.memory_bytes));
        println!("memory peak     {:.1} MiB", mib(s.memory_peak_bytes));
    }
    Ok(0)
}

pub fn pause(args: &NameArg) -> anyhow::Result<i32> {
    set_paused(&args.name, true)
}

pub fn resume(args: &NameArg) -> anyhow::Result<i32> {
    set_paused(&args.name, false)
}

fn set_paused(name: &str, paused: bool) -> anyhow::Result<i32> {
    let layout = Layout::discover();
    let cgroup = AgentCgroup::open(&layout, &resolve(&layout, name))?;
    let started = Instant::now();
    let (done, verb) = if paused {
        (cgroup.freeze(), "pause")
    } else {
        (cgroup.thaw(), "resume")
    };
    done.with_context(|| format!("cannot {verb} {name}"))?;
    eprintln!(
        "{verb}d {name} in {:.2} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
    Ok(0)
}

pub fn top(args: &TopArgs) -> anyhow::Result<i32> {
    if !(0.1..=3600.0).contains(&args.interval) {
        anyhow::bail!(
            "--interval must be between 0.1 and 3600 seconds, not {}",
            args.interval
        );
    }
    let interval = Duration::from_secs_f64(args.interval);
    let layout = Layout::discover();
    let mut previous = sample(&layout);
    let mut last = Instant::now();
    loop {
        std::thread::sleep(interval);
        if signals::interrupted() {
            return Ok(0);
        }
        let current = sample(&layout);
        let elapsed_us = last.elapsed().as_micros().max(1) as f64;
        last = Instant::now();
        let mut out = std::io::stdout().lock();
        if !args.once {
            // Clear the screen and go home, as top does.
            write!(out, "\x1b[2J\x1b[H")?;
        }
        writeln!(
            out,
            "{:<20} {:<24} {:<8} {:>6} {:>10} {:>11} {:>9} {:>9}",
            "AGENT", "LABEL", "STATE", "CPU%", "CPU s", "THROTTLED s", "MEM MiB", "PEAK MiB"
        )?;
        for (name, paused, stats) in &current {
            let before = previous
                .iter()
                .find(|(n, _, _)| n == name)
                .map_or(stats.cpu_usage_us, |(_, _, s)| s.cpu_usage_us);
            let cpu_pct = stats.cpu_usage_us.saturating_sub(before) as f64 / elapsed_us * 100.0;
            writeln!(
                out,
                "{:<20} {:<24} {:<8} {:>6.1} {:>10.2} {:>11.2} {:>9.1} {:>9.1}",
                name,
                rundir::label_of(name).unwrap_or_else(|| "-".to_owned()),
                state(*paused),
                cpu_pct,
                stats.cpu_usage_us as f64 / 1e6,
                stats.throttled_us as f64 / 1e6,
                mib(stats.memory_bytes),
                mib(stats.memory_peak_bytes)
            )?;
        }
        if current.is_empty() {
            writeln!(out, "(no agents running on this host)")?;
        }
        out.flush()?;
        if args.once {
            return Ok(0);
        }
        previous = current;
    }
}

fn sample(layout: &Layout) -> Vec<(String, bool, CgroupStats)> {
    AgentCgroup::list(layout)
        .into_iter()
        .filter_map(|name| {
            let cgroup = AgentCgroup::open(layout, &name).ok()?;
            Some((name, cgroup.is_frozen(), cgroup.stats()))
        })
        .collect()
}

fn state(paused: bool) -> &'static str {
    if paused { "paused" } else { "running" }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
