//! `agentos bench infer`: inference in a VM, beside the very same worker binary
//! (`agentos-infer`) run as an ordinary process, same model, same requests, one thread each.
//!
//! Per task it reports the time the agent spent on each request (tokenize + run + decode, as
//! the agent measures it, so transport is left out) at p50 and p99, requests per second from
//! that time, the round trip seen from the host, the model's load time, and the VMM's resident
//! memory once the model ran. The ratio VM/native of the p50 and p99 is the figure of merit
//! (target: at most 1.10).
//!
//! Runs where Linux guests run here; in a QEMU carrier both sides run in the carrier, so both
//! pay its emulation alike.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use agentos_protocol::bundle::{MANIFEST_FILE, Runtime};
use agentos_protocol::{InferOptions, InferReply, InferRequest, Task};
use anyhow::{Context, bail};
use serde::Serialize;

use super::ratio;
use super::{percentile, round};
use agentos::carrier;
use agentos::placement::{self, CarrierChoice, Placement};
use agentos_core::agent::spec::AgentRequest;
use agentos_core::agent::vm::{AgentVm, BootOptions};
use agentos_image::model::{ModelStore, carrier_files};
use agentos_image::{self as image, AGENT_IMAGE};

/// Target of the VM/native ratio of latencies.
const TARGET_RATIO: f64 = 1.10;
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// The texts every model is run on, in turn.
const SENTENCES: &[&str] = &[
    "I love this, it works perfectly.",
    "This is the worst service I have ever had.",
    "Hi, I am John Smith; email me at john.smith@example.com or call +1 415-555-0132.",
    "The package arrived on time and the battery lasts two full days.",
    "The council will vote on the new budget for schools and parks next week.",
    "Please send the invoice to Maria Garcia at 221 Baker Street, Springfield.",
    "Shares dropped sharply on Wall Street this afternoon after the report.",
    "The film was long, slow and boring, and the ending made no sense at all.",
];

const DOCUMENT: &str = "The city council met on Monday to discuss the new budget. \
    The budget includes more money for schools and parks. Several residents spoke about rising \
    rents and asked for more housing. The council will vote on the budget next week. The weather \
    was sunny all day. The mayor said the plan balances growth and fairness. Critics said the \
    plan does too little for transport.";

/// What each default bundle is measured on.
const CASES: &[(&str, Task)] = &[
    ("sentiment", Task::Classify),
    ("ner", Task::TokenClassify),
    ("minilm", Task::Embed),
    ("minilm", Task::Summarize),
];

#[derive(clap::Args, Debug)]
pub struct InferBenchArgs {
    /// Requests per task and side, after the one that loads the model.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub requests: u32,
    /// Where the VMs run (see `agentos run --help`).
    #[arg(long, value_enum, default_value_t = CarrierChoice::Auto)]
    pub carrier: CarrierChoice,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct InferBench {
    placement: &'static str,
    requests: u32,
    threads: u32,
    target_ratio: f64,
    /// An agent booted without any model, for what a model costs the boot.
    no_model: Baseline,
    tasks: Vec<TaskResult>,
}

#[derive(Debug, Serialize)]
struct Baseline {
    boot_ms: f64,
    rss_mib: f64,
}

#[derive(Debug, Serialize)]
struct TaskResult {
    model: String,
    task: Task,
    vm: Side,
    native: Side,
    /// VM / native, agent-measured time per request.
    ratio_p50: f64,
    ratio_p99: f64,
    within_target: bool,
}

#[derive(Debug, Serialize)]
struct Side {
    /// VM side: from start to the agent's hello, with the model's disks.
    #[serde(skip_serializing_if = "Option::is_none")]
    boot_ms: Option<f64>,
    load_ms: f64,
    /// Agent-measured time per request (tokenize + run + decode), milliseconds.
    p50_ms: f64,
    p99_ms: f64,
    /// Requests per second from that time.
    per_s: f64,
    /// Request to answer as the host sees it, median, milliseconds.
    round_trip_p50_ms: f64,
    /// Resident memory of the VMM (VM side) or of the process (native side) after the runs.
    rss_mib: f64,
}

pub fn run(args: &InferBenchArgs) -> anyhow::Result<i32> {
    let cache = image::default_cache_dir();
    let store = ModelStore::new(&cache);
    let img = image::find_image(&cache, AGENT_IMAGE)?;
    let worker = std::env::current_exe()
        .context("cannot find the agentos binary")?
        .with_file_name("agentos-infer");
    if !worker.is_file() {
        bail!("{} is missing: run `scripts/setup`", worker.display());
    }
    let placement = placement::decide(args.carrier)?;
    if placement == Placement::Carrier {
        // Both sides run in the carrier: the models disk for the VMs, the bundles and ONNX
        // Runtime themselves for the native side.
        let mut files = carrier_files(&store, &img.manifest.libraries)?;
        files.push(worker.clone());
        files.push(store.runtime_library());
        for (name, _) in CASES {
            let bundle = store.find(name)?;
            files.extend(bundle.manifest.files.keys().map(|f| bundle.dir.join(f)));
            files.push(bundle.dir.join(MANIFEST_FILE));
        }
        files.sort();
        files.dedup();
        return Ok(carrier::rerun_inside(files)?);
    }
    let placement = placement.label();
    eprintln!("agentos bench infer: an agent without a model");
    let no_model = measure_baseline()?;
    let mut tasks = Vec::new();
    for &(name, task) in CASES {
        let bundle = store.find(name)?;
        if bundle.manifest.runtime != Runtime::Onnx {
            bail!("model `{name}` is not an ONNX bundle");
        }
        eprintln!("agentos bench infer: {name} {task}: native");
        let native = measure_native(&worker, &store, name, task, args.requests)?;
        eprintln!("agentos bench infer: {name} {task}: VM");
        let vm = measure_vm(name, task, args.requests)?;
        let ratio_p50 = ratio(vm.p50_ms, native.p50_ms);
        let ratio_p99 = ratio(vm.p99_ms, native.p99_ms);
        tasks.push(TaskResult {
            model: name.to_owned(),
            task,
            within_target: ratio_p50 <= TARGET_RATIO && ratio_p99 <= TARGET_RATIO,
            ratio_p50,
            ratio_p99,
            vm,
            native,
        });
    }
    let results = InferBench {
        placement,
        requests: args.requests,
        threads: 1,
        target_ratio: TARGET_RATIO,
        no_model,
        tasks,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        for t in &results.tasks {
            println!(
                "{:<10} {:<15} VM p50 {:>8.2} ms p99 {:>8.2} ms | native p50 {:>8.2} ms p99 {:>8.2} ms | ratio {:.3} / {:.3} (target <= {TARGET_RATIO}) {}",
                t.model,
                t.task.as_str(),
                t.vm.p50_ms,
                t.vm.p99_ms,
                t.native.p50_ms,
                t.native.p99_ms,
                t.ratio_p50,
                t.ratio_p99,
                if t.within_target { "ok" } else { "MISSED" }
            );
        }
    }
    Ok(0)
}

fn request(id: u64, model: &str, task: Task, i: usize) -> InferRequest {
    let input = if task == Task::Summarize {
        DOCUMENT.to_owned()
    } else {
        SENTENCES[i % SENTENCES.len()].to_owned()
    };
    InferRequest {
        id,
        model: model.to_owned(),
        task,
        inputs: vec![input],
        options: InferOptions {
            sentences: (task == Task::Summarize).then_some(2),
            top_k: None,
        },
    }
}

/// Runs `requests` requests (after a first one that loads the model) through `infer`.
fn measure(
    model: &str,
    task: Task,
    requests: u32,
    mut infer: impl FnMut(InferRequest) -> anyhow::Result<InferReply>,
) -> anyhow::Result<(f64, Vec<f64>, Vec<f64>)> {
    let first = infer(request(0, model, task, 0))?;
    let load_ms = first.timings.load_us as f64 / 1000.0;
    let mut agent = Vec::new();
    let mut round_trip = Vec::new();
    for i in 0..requests as usize {
        let started = Instant::now();
        let reply = infer(request(i as u64 + 1, model, task, i))?;
        round_trip.push(started.elapsed().as_secs_f64() * 1000.0);
        let t = reply.timings;
        agent.push((t.tokenize_us + t.run_us + t.decode_us) as f64 / 1000.0);
    }
    Ok((load_ms, agent, round_trip))
}

fn side(load_ms: f64, agent: &[f64], round_trip: &[f64], rss_mib: f64) -> Side {
    let mean = agent.iter().sum::<f64>() / agent.len().max(1) as f64;
    Side {
        boot_ms: None,
        load_ms: round2(load_ms),
        p50_ms: round2(percentile(agent, 0.50)),
        p99_ms: round2(percentile(agent, 0.99)),
        per_s: round2(if mean > 0.0 { 1000.0 / mean } else { 0.0 }),
        round_trip_p50_ms: round2(percentile(round_trip, 0.50)),
        rss_mib: round2(rss_mib),
    }
}

fn round2(x: f64) -> f64 {
    round(x, 2)
}

/// An agent with `model` (or none), up to [`BOOT_TIMEOUT`] to come up.
fn boot_options(model: Option<&str>) -> anyhow::Result<BootOptions> {
    let mut opts = super::agent_options(AgentRequest {
        model: model.map(str::to_owned),
        ..Default::default()
    })?;
    opts.boot_timeout = BOOT_TIMEOUT;
    Ok(opts)
}

fn measure_baseline() -> anyhow::Result<Baseline> {
    let vm = AgentVm::boot(&boot_options(None)?).context("the agent VM did not boot")?;
    let boot_ms = vm.boot_time().as_secs_f64() * 1000.0;
    let rss = vm.vmm_pid().map_or(0.0, rss_mib);
    vm.shutdown();
    Ok(Baseline {
        boot_ms: round2(boot_ms),
        rss_mib: round2(rss),
    })
}

fn measure_vm(model: &str, task: Task, requests: u32) -> anyhow::Result<Side> {
    let mut vm = AgentVm::boot(&boot_options(Some(model))?).context("the agent VM did not boot")?;
    let boot_ms = vm.boot_time().as_secs_f64() * 1000.0;
    let measured = measure(model, task, requests, |req| {
        vm.conn().infer(req).context("the agent did not answer")
    });
    let rss = vm.vmm_pid().map_or(0.0, rss_mib);
    vm.shutdown();
    let (load_ms, agent, round_trip) = measured?;
    Ok(Side {
        boot_ms: Some(round2(boot_ms)),
        ..side(load_ms, &agent, &round_trip, rss)
    })
}

/// `agentos-infer` (the guest's inference worker) on this machine, fed one JSON request per line.
struct Native {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Native {
    fn start(worker: &Path, store: &ModelStore) -> anyhow::Result<Self> {
        let mut child = Command::new(worker)
            .arg("--models")
            .arg(store.models_dir())
            .arg("--runtime")
            .arg(store.runtime_library())
            .args(["--threads", "1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", worker.display()))?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("no stdout")?);
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    fn infer(&mut self, req: InferRequest) -> anyhow::Result<InferReply> {
        serde_json::to_writer(&mut self.stdin, &req)?;
        self.stdin.write_all(b"\n")?;
        self.stdin.flush()?;
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("agentos-infer ended early");
        }
        let value: serde_json::Value = serde_json::from_str(&line)?;
        if let Some(err) = value.get("error") {
            bail!("native inference failed: {err}");
        }
        Ok(serde_json::from_value(value)?)
    }
}

impl Drop for Native {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn measure_native(
    worker: &Path,
    store: &ModelStore,
    model: &str,
    task: Task,
    requests: u32,
) -> anyhow::Result<Side> {
    let mut native = Native::start(worker, store)?;
    let measured = measure(model, task, requests, |req| native.infer(req));
    let rss = rss_mib(native.child.id());
    let (load_ms, agent, round_trip) = measured?;
    Ok(side(load_ms, &agent, &round_trip, rss))
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[3.0], 0.99), 3.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
