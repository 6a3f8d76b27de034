//! `agentos group run FILE --input TEXT-FILE`: boot a group's agents, each in its own microVM,
//! connect them through a router, give the entry agent the input, print the group's results and
//! the trace of how they were made, and stop every VM.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use agentos_protocol::peer::{Handler, MAX_PEER_BODY_BYTES};
use anyhow::{Context, bail};

use agentos::carrier::{self, CarrierRun};
use agentos::daemon::agent::{Agent, AgentConfig};
use agentos::daemon::api::AgentState;
use agentos::daemon::api::{MAX_BOOT_TIMEOUT_S, MAX_TIMEOUT_S};
use agentos::daemon::devices;
use agentos::group::file::{self, GroupSpec, MAX_RESTARTS, OUTPUT};
use agentos::group::member::{MemberHooks, member_name};
use agentos::group::report::{AgentReport, GroupReport, groups_dir, trace_path};
use agentos::group::router::{GroupResult, PendingInput, Router};
use agentos::group::trace::{self, TraceLog};
use agentos::placement::{self, CarrierChoice, Placement};
use agentos_core::agent::vm::BootOptions;
use agentos_core::rundir::RunDir;
use agentos_core::signals;
use agentos_image::model::{ModelStore, carrier_copies};
use agentos_image::{self as image};

/// The carrier's memory beyond its agents' VMs: its own system, and the images it holds.
const CARRIER_BASE_MIB: u64 = 2048;
const CARRIER_MIN_MIB: u64 = 4096;
/// How long a run that has all its results waits for messages still in flight.
const QUIET_GRACE: Duration = Duration::from_secs(30);
/// How often the agents of a running group are looked at.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// A guest agent that leaves a ping unanswered this long counts as hung (its VM as crashed).
const HANG_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(clap::Args, Debug, Clone)]
pub struct GroupRunArgs {
    /// The group file (TOML): agents, their models or programs, and the channels between them.
    pub file: PathBuf,
    /// The text given to the group's entry agent (`-`: standard input).
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,
    /// Print the whole report (results, counters, trace) as JSON.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for the group's results once the input is given (at most a day).
    #[arg(
        long,
        default_value_t = 600,
        value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_S),
    )]
    pub timeout: u64,
    /// Seconds each agent has to boot (at most an hour).
    #[arg(
        long,
        default_value_t = 300,
        value_parser = clap::value_parser!(u64).range(1..=MAX_BOOT_TIMEOUT_S),
    )]
    pub boot_timeout: u64,
    /// Where the VMs run (see `agentos run --help`).
    #[arg(long, value_enum, default_value_t = CarrierChoice::Auto)]
    pub carrier: CarrierChoice,
    /// Copy the agents' serial consoles to stderr.
    #[arg(long)]
    pub console: bool,
    /// Print the report as one JSON line for the caller (used inside a carrier).
    #[arg(long, hide = true)]
    pub report: bool,
    /// An initramfs archive loaded into every agent's VM besides its own (`agentos eval` gives
    /// its agents its probe this way); may be given more than once.
    #[arg(long, hide = true, value_name = "FILE")]
    pub extra_initrd: Vec<PathBuf>,
    /// The daemon to look for the group in (it runs there when it is up, see `group up`).
    #[command(flatten)]
    pub socket: agentos::daemon::SocketArg,
}

pub fn run(args: &GroupRunArgs) -> anyhow::Result<i32> {
    let started = Instant::now();
    let spec = file::load(&args.file)?;
    let input = read_input(&args.input)?;
    let cache = image::default_cache_dir();
    // A group that is up under the daemon takes the input there; otherwise it boots here.
    let (report, in_daemon) =
        match crate::daemon::group_input(&args.socket, &spec.name, &input, args.timeout)? {
            Some(report) => (report, true),
            None => match boot_and_run(args, &spec, input, &cache, started)? {
                Some(report) => (report, false),
                None => return Ok(signals::exit_code()),
            },
        };

    if args.report {
        serde_json::to_writer(io::stdout().lock(), &report)?;
        println!();
        return Ok(0);
    }
    // The daemon writes the trace of a group it runs as it goes.
    let saved = if in_daemon {
        Ok(trace_path(&cache, &report.group))
    } else {
        save_trace(&cache, &report)
    };
    let mut out = io::stdout().lock();
    if args.json {
        serde_json::to_writer(&mut out, &report)?;
        writeln!(out)?;
    } else {
        print_report(&mut out, &report)?;
        match &saved {
            Ok(path) => writeln!(
                out,
                "\n(trace saved to {}; show it again with `agentos trace {}`)",
                path.display(),
                report.group
            )?,
            Err(e) => writeln!(out, "\n(the trace could not be saved: {e:#})")?,
        }
    }
    if report.results.len() < report.expected_results {
        eprintln!(
            "agentos: only {} of {} results came within {} s{}",
            report.results.len(),
            report.expected_results,
            args.timeout,
            describe_stuck(&report)
        );
        return Ok(1);
    }
    Ok(0)
}

/// Boots the group here (or in a carrier), runs `input` through it and stops it. `None`:
/// interrupted.
fn boot_and_run(
    args: &GroupRunArgs,
    spec: &GroupSpec,
    input: String,
    cache: &Path,
    started: Instant,
) -> anyhow::Result<Option<GroupReport>> {
    let store = ModelStore::new(cache);
    // Each agent's options, its model's disks built here (also for a carrier's copies).
    let mut opts_of: BTreeMap<String, BootOptions> = BTreeMap::new();
    let mut carrier_files = Vec::new();
    for agent in &spec.agents {
        if let Some(Handler::Infer { model, task, .. }) = &agent.handler {
            let bundle = store
                .find(model)
                .with_context(|| format!("agent `{}`", agent.name))?;
            if !bundle.manifest.tasks.contains(task) {
                bail!(
                    "agent `{}`: model `{model}` does not do {task} (see `agentos model ls`)",
                    agent.name
                );
            }
        }
        let mut opts = agent
            .vm
            .boot_options(cache)
            .with_context(|| format!("agent `{}`", agent.name))?;
        if let (Some(disks), Some(model)) = (&opts.model_disks, &agent.model) {
            carrier_files.extend(carrier_copies(&store, disks, &store.find(model)?));
        }
        opts.console = args.console;
        opts.boot_timeout = Duration::from_secs(args.boot_timeout);
        opts.extra_initrds.extend(args.extra_initrd.iter().cloned());
        opts_of.insert(agent.name.clone(), opts);
    }

    let report = if placement::decide(args.carrier)? == Placement::Carrier {
        carrier_files.sort();
        carrier_files.dedup();
        run_in_carrier(args, spec, &input, carrier_files)?
    } else {
        match run_here(spec, input, &opts_of, started, args)? {
            Some(report) => report,
            None => return Ok(None),
        }
    };
    Ok(Some(report))
}

fn read_input(path: &Path) -> anyhow::Result<String> {
    let mut text = String::new();
    let limit = MAX_PEER_BODY_BYTES as u64 + 1;
    if path.as_os_str() == "-" {
        io::stdin()
            .take(limit)
            .read_to_string(&mut text)
            .context("cannot read the input from standard input")?;
    } else {
        std::fs::File::open(path)
            .and_then(|f| f.take(limit).read_to_string(&mut text))
            .with_context(|| format!("cannot read the input {}", path.display()))?;
    }
    if text.len() > MAX_PEER_BODY_BYTES {
        bail!("the input is larger than {MAX_PEER_BODY_BYTES} bytes; give a shorter text");
    }
    if text.trim().is_empty() {
        bail!("the input is empty; give the group some text");
    }
    Ok(text)
}

/// Runs this group run again inside a carrier and reads its report back.
fn run_in_carrier(
    args: &GroupRunArgs,
    spec: &GroupSpec,
    input: &str,
    mut files: Vec<PathBuf>,
) -> anyhow::Result<GroupReport> {
    // The input travels as a file, whatever it was read from; the carrier's /tmp is its own.
    let dir = groups_dir(&image::default_cache_dir()).join(&spec.name);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let input_path = dir.join("input.txt");
    std::fs::write(&input_path, input).context("cannot write the input for the carrier")?;
    let group_file = std::path::absolute(&args.file).context("cannot resolve the group file")?;
    files.push(group_file.clone());
    files.push(input_path.clone());
    files.extend(carrier::agent_image_files());
    let exe = std::env::current_exe().context("cannot find the agentos binary")?;
    let mut argv = vec![
        exe.display().to_string(),
        "group".into(),
        "run".into(),
        group_file.display().to_string(),
        "--input".into(),
        input_path.display().to_string(),
        "--timeout".into(),
        args.timeout.to_string(),
        "--boot-timeout".into(),
        args.boot_timeout.to_string(),
        "--report".into(),
    ];
    if args.console {
        argv.push("--console".into());
    }
    for initrd in &args.extra_initrd {
        let initrd = std::path::absolute(initrd).context("cannot resolve an extra initrd")?;
        argv.push("--extra-initrd".into());
        argv.push(initrd.display().to_string());
        files.push(initrd);
    }
    let vm_memory: u64 = spec
        .members()
        .iter()
        .map(|(_, a)| a.vm.memory_mib() + agentos_core::agent::vm::VMM_MEMORY_ALLOWANCE_MIB)
        .sum();
    let spec = CarrierRun {
        argv,
        env: BTreeMap::new(),
        files,
        memory_mib: (vm_memory + CARRIER_BASE_MIB).max(CARRIER_MIN_MIB),
        cpus: carrier::DEFAULT_CPUS,
        console: false,
        pci_test_device: false,
    };
    let mut out = Vec::new();
    let status = carrier::run(&spec, &mut out)?;
    if status.shell_code() != 0 {
        if signals::interrupted() {
            bail!("interrupted");
        }
        bail!(
            "the group did not run in the carrier (exit status {})",
            status.shell_code()
        );
    }
    let line = out
        .split(|b| *b == b'\n')
        .rfind(|l| l.starts_with(b"{"))
        .context("the group run in the carrier printed no report")?;
    serde_json::from_slice(line).context("the group run in the carrier printed a malformed report")
}

/// Boots the agents here, each kept by its own supervisor (as the daemon keeps its agents:
/// restarted by its policy, a hung guest counted as a crash, joining the group after each
/// boot), runs the input through them and stops them. `None`: interrupted.
fn run_here(
    spec: &GroupSpec,
    input: String,
    opts_of: &BTreeMap<String, BootOptions>,
    started: Instant,
    args: &GroupRunArgs,
) -> anyhow::Result<Option<GroupReport>> {
    let trace_dir = RunDir::create("trace").context("cannot create a run directory")?;
    let trace_path = trace_dir.join("trace.jsonl");
    let spec = Arc::new(spec.clone());
    let router = Arc::new(Router::with_members(
        &spec.member_roles(),
        &spec.channels,
        TraceLog::create(&trace_path)?,
    ));

    // Every agent boots at once, each on its supervisor's thread; each VM is its own process.
    let mut agents = Vec::new();
    let mut held = Vec::new();
    for (member, agent) in spec.members() {
        let opts = opts_of
            .get(&agent.name)
            .cloned()
            .context("a member of the group has no options")?;
        let mut config = AgentConfig {
            name: member_name(&spec.name, &member),
            model: agent.model.clone(),
            template: agent.vm.template().map(|t| t.name().to_owned()),
            restart: agent.restart,
            opts,
            log: trace_dir.join(format!("{member}.log").as_str()),
            hang_timeout: HANG_TIMEOUT,
            group: Some(spec.name.clone()),
            class: agent.vm.class(),
            max_restarts: Some(MAX_RESTARTS),
            hooks: Some(Arc::new(MemberHooks {
                spec: spec.clone(),
                router: router.clone(),
                member: member.clone(),
            })),
            devices: agent.vm.devices().to_vec(),
            gpus: agent.vm.gpus(),
        };
        devices::admit_beside(&held, &mut config)
            .map_err(|e| anyhow::anyhow!("agent `{member}`: {}", e.message))?;
        held.extend(devices::held_by(std::iter::once(&config)));
        agents.push((
            member,
            Agent::spawn(config).context("cannot start an agent")?,
        ));
    }
    let boot_ms = match all_up(&agents)? {
        Some(boot_ms) => boot_ms,
        None => return Ok(None),
    };
    let ready_ms = started.elapsed().as_millis() as u64;
    let results = router
        .inject(spec.entry(), input)
        .map_err(|e| anyhow::anyhow!("the input was not taken: {e}"))
        .map(|input| collect(&spec, &router, &agents, &input, args))?;
    let interrupted = signals::interrupted();
    let reports: Vec<AgentReport> = agents
        .iter()
        .map(|(member, agent)| AgentReport {
            name: member.clone(),
            model: agent.config().model.clone(),
            boot_ms: boot_ms.get(member).copied().unwrap_or(0),
            restarts: agent.info().restarts,
        })
        .collect();
    stop_all(agents);
    if interrupted {
        return Ok(None);
    }
    Ok(Some(GroupReport {
        group: spec.name.clone(),
        agents: reports,
        results,
        expected_results: spec.results_per_input(),
        counters: router.counters(),
        unacknowledged: router.unacknowledged(),
        trace: trace::read(&trace_path)?,
        ready_ms,
        total_ms: started.elapsed().as_millis() as u64,
    }))
}

/// Waits for every agent's first VM to be up and in the group; returns their boot times.
/// `None`: interrupted. An agent that failed before it was ever up fails the run.
fn all_up(agents: &[(String, Agent)]) -> anyhow::Result<Option<BTreeMap<String, u64>>> {
    let mut boot_ms = BTreeMap::new();
    while boot_ms.len() < agents.len() {
        if signals::interrupted() {
            return Ok(None);
        }
        for (member, agent) in agents {
            if boot_ms.contains_key(member) {
                continue;
            }
            let info = agent.info();
            match info.state {
                AgentState::Booting => {}
                AgentState::Running => {
                    boot_ms.insert(member.clone(), info.boot_ms.unwrap_or(0));
                }
                _ => bail!(
                    "agent `{member}` did not boot: {}",
                    info.last_error.as_deref().unwrap_or(info.state.as_str())
                ),
            }
        }
        thread::sleep(POLL_INTERVAL);
    }
    Ok(Some(boot_ms))
}

/// Waits for the results of `input`, then for the group to go quiet (an agent that is coming
/// back after a crash is waited for). Returns the results.
fn collect(
    spec: &GroupSpec,
    router: &Router,
    agents: &[(String, Agent)],
    input: &PendingInput,
    args: &GroupRunArgs,
) -> Vec<GroupResult> {
    let deadline = agentos_core::deadline::from_now(Duration::from_secs(args.timeout));
    let expected = spec.results_per_input();
    // Once every result is in, messages still on their way (to agents that do not answer
    // `output`) get a moment to arrive, so that the run ends with the group quiet.
    let mut quiet_from: Option<Instant> = None;
    let mut results = Vec::new();
    loop {
        // Once all came, one more is waited for: a result past the expected ones is printed too.
        results.extend(input.take(
            expected.saturating_sub(results.len()).max(1),
            (Instant::now() + POLL_INTERVAL).min(deadline),
            &signals::interrupted,
        ));
        let now = Instant::now();
        if signals::interrupted() || now >= deadline {
            return results;
        }
        let coming_back = agents.iter().any(|(_, agent)| {
            matches!(agent.state(), AgentState::Booting | AgentState::Restarting)
        });
        if coming_back {
            // A restarted agent gets the grace again to catch up.
            quiet_from = None;
            continue;
        }
        if results.len() >= expected {
            let since = *quiet_from.get_or_insert(now);
            if router.unacknowledged().is_empty() || now - since > QUIET_GRACE {
                return results;
            }
        }
    }
}

/// Stops every agent at once and waits for them.
fn stop_all(agents: Vec<(String, Agent)>) {
    for (_, agent) in &agents {
        agent.request_stop();
    }
    let stops: Vec<_> = agents
        .into_iter()
        .map(|(_, agent)| thread::spawn(move || drop(agent)))
        .collect();
    for stop in stops {
        let _ = stop.join();
    }
}

fn save_trace(cache: &Path, report: &GroupReport) -> anyhow::Result<PathBuf> {
    let path = trace_path(cache, &report.group);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let log = TraceLog::create(&path)?;
    for event in &report.trace {
        log.append(event);
    }
    Ok(path)
}

fn print_report(out: &mut dyn Write, report: &GroupReport) -> io::Result<()> {
    writeln!(
        out,
        "group {}: {} agents",
        report.group,
        report.agents.len()
    )?;
    for agent in &report.agents {
        let restarts = match agent.restarts {
            0 => String::new(),
            n => format!(", restarted {n} times"),
        };
        writeln!(
            out,
            "  {:<12} {:<20} booted in {:.1} s{restarts}",
            agent.name,
            agent.model.as_deref().unwrap_or("(no model)"),
            agent.boot_ms as f64 / 1000.0
        )?;
    }
    for result in &report.results {
        let made = match (&result.model, result.infer_ms) {
            (Some(model), Some(ms)) => format!(", {model} ran {:.1} s", ms / 1000.0),
            _ => String::new(),
        };
        writeln!(out, "\n== {} (from {}{made})", result.kind, result.from)?;
        writeln!(out, "{}", result.body.trim_end())?;
    }
    writeln!(out, "\n== trace")?;
    trace::render(&report.trace, out)?;
    let c = &report.counters;
    writeln!(
        out,
        "router: {} accepted, {} delivered, {} acknowledged, {} redelivered; refused: {} without a channel, {} queue full, {} invalid, {} forged trace ids; {} forged sender claims; connections refused: {} over the limit, {} over the rate",
        c.accepted,
        c.delivered,
        c.acknowledged,
        c.redelivered,
        c.refused_no_channel,
        c.refused_queue_full,
        c.refused_invalid,
        c.forged_trace,
        c.forged_sender,
        c.connections_refused,
        c.connections_rate_limited
    )?;
    writeln!(
        out,
        "all agents ready after {:.1} s; total {:.1} s",
        report.ready_ms as f64 / 1000.0,
        report.total_ms as f64 / 1000.0
    )
}

fn describe_stuck(report: &GroupReport) -> String {
    if report.unacknowledged.is_empty() {
        return String::new();
    }
    let waiting: Vec<String> = report
        .unacknowledged
        .iter()
        .map(|(agent, n)| format!("{agent} ({n})"))
        .collect();
    format!(
        "; messages still waiting at: {} (see the trace; results go to `{OUTPUT}`)",
        waiting.join(", ")
    )
}

/// `agentos trace GROUP|FILE`: the saved trace of a group's last run.
#[derive(clap::Args, Debug, Clone)]
pub struct TraceArgs {
    /// A group's name (its last run's trace), or a trace file.
    pub group: String,
    /// Print the events as JSON lines instead.
    #[arg(long)]
    pub json: bool,
}

pub fn show_trace(args: &TraceArgs) -> anyhow::Result<i32> {
    let as_path = Path::new(&args.group);
    let path = if as_path.is_file() {
        as_path.to_path_buf()
    } else if agentos_protocol::peer::valid_peer_name(&args.group) {
        let path = trace_path(&image::default_cache_dir(), &args.group);
        if !path.is_file() {
            bail!(
                "no trace for group `{}` (run it with `agentos group run FILE --input TEXT`)",
                args.group
            );
        }
        path
    } else {
        bail!("`{}` is neither a group name nor a trace file", args.group);
    };
    let events = trace::read(&path)?;
    let mut out = io::stdout().lock();
    if args.json {
        for event in &events {
            serde_json::to_writer(&mut out, event)?;
            writeln!(out)?;
        }
    } else {
        trace::render(&events, &mut out)?;
    }
    Ok(0)
}
