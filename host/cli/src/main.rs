//! `agentos`: the command line. Each VM runs in an `agentos-vmm` process (`agentos vmm` runs the
//! same code in this binary).

use std::process::ExitCode;
use std::time::Instant;

mod bench;
mod carrier;
mod control;
mod daemon;
mod files;
mod flags;
mod group;
mod group_run;
mod image;
mod infer;
mod model;
mod processes;
mod run;
mod terminal;

use agentos::{doctor, eval};
use agentos_core::signals;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "agentos",
    version,
    about = "Run every AI agent in its own KVM microVM",
    after_help = "Images live in $AGENTOS_HOME (default ~/.cache/agentos); build them with `scripts/setup`.\nLogs: AGENTOS_LOG=info|debug."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot an agent VM, run a program in it with your stdin/stdout/stderr, and exit with its status;
    /// or, with --model, run a model on a text and print the result.
    #[command(
        after_help = "Examples:\n  agentos run -- /bin/uname -a\n  agentos run --model sentiment --task classify --input \"I love this, it works perfectly\"\n  agentos run --model minilm --task summarize --input-file article.txt --json"
    )]
    Run(run::RunArgs),
    /// Run the agent daemon: it keeps agents running and serves the commands below on a socket.
    #[command(
        after_help = "Stopping it (Ctrl-C, SIGTERM) stops every agent. On a host whose KVM cannot boot Linux, it runs\nthe daemon in one QEMU carrier and serves its API here (socket and --listen) all the same; the\ncarrier, and every agent in it, stops with it (see docs/api.md)."
    )]
    Daemon(agentos::daemon::DaemonArgs),
    /// Start a long-lived agent under the daemon.
    #[command(
        after_help = "Examples:\n  agentos spawn --name worker\n  agentos spawn --name sentiment --model sentiment --restart always"
    )]
    Spawn(daemon::SpawnArgs),
    /// List the daemon's agents and their states.
    Ps(daemon::PsArgs),
    /// Run a program in a daemon's agent, its output streamed as it comes, and exit with its
    /// status; or leave it running (--detach).
    #[command(
        after_help = "Without --json the output comes as the program writes it, with no cap, and the program is killed\nif this command ends first (Ctrl-C). Examples:\n  agentos exec worker -- /bin/uname -a\n  tar c src | agentos exec worker --stdin -- tar x -C /home\n  agentos exec -it worker -- /bin/sh\n  agentos exec worker --detach --tag web -- httpd -f -p 8080"
    )]
    Exec(daemon::ExecArgs),
    /// The programs running in a daemon's agent.
    Processes(processes::ProcessesArgs),
    /// Follow a running program of a daemon's agent from now on, and exit with its status.
    Attach(processes::AttachArgs),
    /// Send a signal to a running program of a daemon's agent (TERM unless told).
    Kill(processes::KillArgs),
    /// Copy a file into or out of a daemon's agent (any size, any bytes).
    #[command(
        after_help = "One side is AGENT:PATH (an absolute path in the agent), the other a local path or `-`.\nA file written into an agent replaces the old one only once whole; missing directories are made.\nExamples:\n  agentos cp data.bin worker:/home/data.bin\n  agentos cp worker:/var/log/app.log .\n  tar c src | agentos cp - worker:/tmp/src.tar"
    )]
    Cp(files::CpArgs),
    /// Run a daemon agent's model on texts.
    #[command(
        after_help = "Example:\n  agentos infer sentiment --task classify --input \"I love this\""
    )]
    Infer(daemon::InferArgs),
    /// Print a daemon agent's serial console and the daemon's notes about it.
    Logs(daemon::LogsArgs),
    /// Stop a daemon agent's VM (it stays listed until `agentos rm`).
    Stop(daemon::StopArgs),
    /// Save a daemon agent to a directory and stop it; `spawn --from DIR` runs it again
    /// (see docs/snapshots.md).
    Snapshot(daemon::SnapshotArgs),
    /// Warm pools of daemon agents restored from a snapshot ahead of need (`spawn --pool`).
    #[command(subcommand)]
    Pool(daemon::PoolCommand),
    /// Remove a stopped agent from the daemon.
    Rm(daemon::RmArgs),
    /// The daemon's figures (agents' CPU, memory, restarts; API requests) as Prometheus text.
    Metrics(daemon::MetricsArgs),
    /// Groups of agents that work together: run one on an input, keep one up under the daemon,
    /// check a group file.
    #[command(subcommand)]
    Group(group::GroupCommand),
    /// Show how a group's inputs went through its agents, and where the time went.
    Trace(group_run::TraceArgs),
    /// The model bundles agents run: list, add, verify, remove.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Show the agents running on this host: CPU, throttling, memory (from their cgroups).
    Top(control::TopArgs),
    /// One agent's CPU and memory figures.
    Stats(control::StatsArgs),
    /// Stop an agent's VM from running (freeze its cgroup) until `agentos resume`.
    Pause(control::NameArg),
    /// Let a paused agent run again.
    Resume(control::NameArg),
    /// Run a command inside a QEMU carrier VM (for hosts whose KVM cannot boot Linux).
    #[command(
        after_help = "Exit status: the command's; 75 when the carrier stopped responding and was stopped (run the command again).\nAGENTOS_CARRIER_MONITOR=PATH opens QEMU's monitor on a Unix socket, to look into a carrier that seems stuck."
    )]
    Carrier(carrier::CarrierArgs),
    /// Attack agentos and check that the boundary held: adversarial workloads in real microVMs
    /// (fork bombs, exhaustion, host files, network, vsock, malformed frames, virtio abuse,
    /// panics) and bad requests to its interfaces; prints each case and `N passed, M failed`.
    #[command(
        after_help = "The cases are data: eval/cases/SUITE.toml in the agentos source tree (one file per suite), with the
guest scripts (eval/guest/) and group files (eval/groups/) they name; --cases DIR runs your own.
Guest scripts find a raw-vsock probe at /eval/probe. Exit status: 0 when every case passed
(the last, host-unchanged, checks that nothing was left behind), 1 otherwise.
Examples:
  agentos eval
  agentos eval --suite guest --json"
    )]
    Eval(eval::EvalArgs),
    /// Tell what this host offers: KVM, cgroups, vsock, images, QEMU.
    Doctor(doctor::DoctorArgs),
    /// Measure agentos: boot times beside QEMU's microvm machine, and how CPU slices hold.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Build the guest images.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Run one microVM in this process, as `agentos-vmm` does (what the other commands start,
    /// one per VM).
    Vmm(agentos_vmm_process::VmmArgs),
}

fn dispatch(command: &Command, started: Instant) -> anyhow::Result<i32> {
    // The VMM handles its own signals (they stop the VM cleanly); the other commands kill the VMs
    // they started when interrupted.
    if !matches!(command, Command::Vmm(_)) {
        signals::install()?;
    }
    match command {
        Command::Run(args) => run::run(args, started),
        Command::Top(args) => control::top(args),
        Command::Stats(args) => control::stats(args),
        Command::Daemon(args) => Ok(agentos::daemon::run(args)?),
        Command::Spawn(args) => daemon::spawn(args),
        Command::Ps(args) => daemon::ps(args),
        Command::Exec(args) => daemon::exec(args),
        Command::Cp(args) => files::cp(args),
        Command::Processes(args) => processes::processes(args),
        Command::Attach(args) => processes::attach(args),
        Command::Kill(args) => processes::kill(args),
        Command::Infer(args) => daemon::infer(args),
        Command::Logs(args) => daemon::logs(args),
        Command::Stop(args) => daemon::stop(args),
        Command::Snapshot(args) => daemon::snapshot(args),
        Command::Pool(cmd) => daemon::pool(cmd),
        Command::Rm(args) => daemon::rm(args),
        Command::Metrics(args) => daemon::metrics(args),
        Command::Pause(args) => control::pause(args),
        Command::Resume(args) => control::resume(args),
        Command::Carrier(args) => carrier::run_command(args),
        Command::Doctor(args) => Ok(doctor::run(args)?),
        Command::Eval(args) => Ok(eval::run(args)?),
        Command::Image(cmd) => image::run(cmd),
        Command::Model(cmd) => model::run(cmd),
        Command::Group(cmd) => group::run_command(cmd),
        Command::Trace(args) => group_run::show_trace(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Vmm(args) => Ok(agentos_vmm_process::run(args, started)?),
    }
}

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    agentos_vmm_process::init_logging();
    let result = dispatch(&cli.command, started);
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("agentos: {e:#}");
            ExitCode::FAILURE
        }
    }
}
