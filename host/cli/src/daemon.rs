//! The commands that talk to a running daemon: spawn, ps, exec, infer, logs, stop, rm, metrics,
//! snapshot, pool.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use agentos_protocol::{InferOptions, InferReply, Program, Task};
use agentos_vmm::config::MAX_VCPUS;
use anyhow::Context;

use crate::processes;
use agentos::daemon::SocketArg;
use agentos::daemon::api::{
    AgentInfo, ErrorKind, ExecCall, ExecReply, GroupInputRequest, GroupRequest, GroupUpReply,
    GroupUpRequest, InferCall, LogsReply, LogsRequest, MAX_BOOT_TIMEOUT_S, MAX_TIMEOUT_S,
    MetricsReply, NameRequest, PoolCreateRequest, PoolRequest, PsReply, Request, RestartPolicy,
    RmRequest, SnapshotReply, SnapshotRequest, SpawnRequest,
};
use agentos::daemon::client::{Client, ClientError};
use agentos::group::report::GroupReport;
use agentos_core::signals;

/// The most standard input `exec --stdin` sends.
const MAX_STDIN_BYTES: u64 = 512 * 1024;
/// How often `logs --follow` asks for more.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(500);

#[derive(clap::Args, Debug)]
pub struct SpawnArgs {
    /// The agent's name: 1 to 64 letters, digits, `-`, `_`, `.`.
    #[arg(long)]
    pub name: String,
    /// An installed model bundle the agent carries (`agentos model ls`).
    #[arg(long)]
    pub model: Option<String>,
    /// What the agent has beyond the agent image: `base` gives it GNU bash at /bin/bash and
    /// python3 with its standard library.
    #[arg(long, value_name = "NAME")]
    pub template: Option<String>,
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=i64::from(MAX_VCPUS)))]
    pub vcpus: Option<u8>,
    /// Guest memory in MiB (default 256).
    #[arg(long)]
    pub memory: Option<u64>,
    #[command(flatten)]
    pub slice: crate::flags::SliceArgs,
    #[command(flatten)]
    pub devices: crate::flags::DeviceArgs,
    /// When its VM ends: never boot it again, on-failure (crash or hang), or always.
    #[arg(long, value_enum, default_value_t = RestartPolicy::OnFailure)]
    pub restart: RestartPolicy,
    /// Seconds the guest agent has to come up.
    #[arg(
        long,
        value_name = "SECS",
        value_parser = clap::value_parser!(u64).range(1..=MAX_BOOT_TIMEOUT_S),
    )]
    pub boot_timeout: Option<u64>,
    /// Restore the agent saved in this directory (`agentos snapshot`, or `agentos run
    /// --snapshot-to`) instead of booting one; vCPUs and memory are the snapshot's.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["model", "template", "vcpus", "memory"])]
    pub from: Option<PathBuf>,
    /// Take an agent from this warm pool (`agentos pool create`): up at once when the pool has
    /// one ready, restored from the pool's snapshot otherwise.
    #[arg(long, value_name = "POOL", conflicts_with_all = ["from", "model", "template", "vcpus", "memory"])]
    pub pool: Option<String>,
    /// Return at once instead of waiting until the agent is up.
    #[arg(long)]
    pub detach: bool,
    /// Print the agent as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(clap::Args, Debug)]
pub struct PsArgs {
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    /// The agent.
    pub name: String,
    /// Send this command's standard input to the program (up to 512 KiB with --json).
    #[arg(long, short = 'i', conflicts_with = "detach")]
    pub stdin: bool,
    /// Run the program on a terminal the size of this one (raw mode here meanwhile), with this
    /// command's standard input: `-it` for a shell.
    #[arg(long, short = 't', conflicts_with_all = ["detach", "json"])]
    pub tty: bool,
    /// The user to run the program as (from the agent's /etc/passwd; its home is the working
    /// directory unless --cwd says otherwise).
    #[arg(long, short = 'u')]
    pub user: Option<String>,
    /// Leave the program running in the agent and print its process id (see `agentos
    /// processes`, `attach`, `kill`).
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// A name to find the program by among the agent's running programs.
    #[arg(long)]
    pub tag: Option<String>,
    /// Kill the program after this many seconds (with --json: an hour unless given; otherwise
    /// none: a streamed program ends with this command, a detached one when it ends).
    #[arg(
        long,
        value_name = "SECS",
        value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_S),
    )]
    pub timeout: Option<u64>,
    /// Environment variable for the program, NAME=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_parser = crate::flags::parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory of the program in the guest.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Wait for the program's end and print the result (exit code, output up to 256 KiB per
    /// stream, time) as JSON; without it, its output is streamed as it comes.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub socket: SocketArg,
    /// The program and its arguments.
    #[arg(last = true, required = true, value_name = "PROGRAM")]
    pub command: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub struct InferArgs {
    /// The agent (spawned with --model).
    pub name: String,
    /// embed, classify, token-classify, summarize or translate.
    #[arg(long)]
    pub task: Task,
    /// Text to run the model on (repeat for a batch).
    #[arg(long, value_name = "TEXT")]
    pub input: Vec<String>,
    /// File whose whole text is one input (`-`: standard input).
    #[arg(long, value_name = "FILE", conflicts_with = "input")]
    pub input_file: Option<PathBuf>,
    /// summarize: how many sentences to keep.
    #[arg(long)]
    pub sentences: Option<u32>,
    /// classify: how many labels to print, best first.
    #[arg(long)]
    pub top_k: Option<u32>,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    /// The agent.
    pub name: String,
    /// Keep printing what the agent writes, until interrupted.
    #[arg(long, short = 'f')]
    pub follow: bool,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(clap::Args, Debug)]
pub struct StopArgs {
    /// The agent.
    pub name: String,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(clap::Args, Debug)]
pub struct RmArgs {
    /// The agent.
    pub name: String,
    /// Stop it first if it runs.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub socket: SocketArg,
}

/// `agentos pool ...`: warm pools of agents restored from a snapshot ahead of need.
#[derive(clap::Subcommand, Debug)]
pub enum PoolCommand {
    /// Keep SIZE agents restored from the snapshot in DIR ready for `spawn --pool NAME`.
    Create {
        /// The pool's name.
        name: String,
        /// The snapshot directory (`agentos snapshot`, or `agentos run --snapshot-to`).
        #[arg(long, value_name = "DIR")]
        from: PathBuf,
        /// Agents kept ready (1 to 64).
        #[arg(long, default_value_t = 2)]
        size: u32,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Remove a pool and shut its ready agents down (agents taken from it stay).
    Rm {
        name: String,
        #[command(flatten)]
        socket: SocketArg,
    },
}

pub fn pool(cmd: &PoolCommand) -> anyhow::Result<i32> {
    match cmd {
        PoolCommand::Create {
            name,
            from,
            size,
            socket,
        } => {
            let _: serde_json::Value =
                client(socket)?.call(&Request::PoolCreate(PoolCreateRequest {
                    name: name.clone(),
                    from: absolute(from)?,
                    size: *size,
                }))?;
            println!("pool {name}: filling to {size} (see `agentos ps`)");
        }
        PoolCommand::Rm { name, socket } => {
            let _: serde_json::Value =
                client(socket)?.call(&Request::PoolRm(PoolRequest { name: name.clone() }))?;
            println!("pool {name}: removed");
        }
    }
    Ok(0)
}

#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    /// The agent.
    pub name: String,
    /// The directory to save it to (it must exist; its `memory` and `vm.state` are replaced).
    #[arg(long, value_name = "DIR")]
    pub to: PathBuf,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(clap::Args, Debug)]
pub struct MetricsArgs {
    #[command(flatten)]
    pub socket: SocketArg,
}

fn client(socket: &SocketArg) -> anyhow::Result<Client> {
    Ok(Client::connect(&socket.client_path()?)?)
}

pub fn spawn(args: &SpawnArgs) -> anyhow::Result<i32> {
    let request = Request::Spawn(SpawnRequest {
        name: args.name.clone(),
        model: args.model.clone(),
        template: args.template.clone(),
        vcpus: args.vcpus,
        memory_mib: args.memory,
        cpus: args.slice.cpus,
        cpuset: args.slice.cpuset.clone(),
        pin: args.slice.pin,
        weight: args.slice.weight,
        class: args.slice.class,
        restart: args.restart,
        boot_timeout_s: args.boot_timeout,
        wait: !args.detach,
        queue: args.slice.wait,
        from: args.from.as_deref().map(absolute).transpose()?,
        pool: args.pool.clone(),
        devices: args.devices.devices.clone(),
        gpus: args.devices.gpus,
    });
    let info: AgentInfo = client(&args.socket)?.call(&request)?;
    if args.json {
        println!("{}", serde_json::to_string(&info)?);
    } else if let Some(ms) = info.boot_ms {
        println!(
            "{}: {} (booted in {:.1} s)",
            info.name,
            info.state.as_str(),
            ms as f64 / 1e3
        );
    } else {
        println!("{}: {}", info.name, info.state.as_str());
    }
    Ok(0)
}

pub fn ps(args: &PsArgs) -> anyhow::Result<i32> {
    let reply: PsReply = client(&args.socket)?.call(&Request::Ps)?;
    if args.json {
        println!("{}", serde_json::to_string(&reply)?);
        return Ok(0);
    }
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "{:<20} {:<11} {:>8} {:>5} {:>7} {:>8} {:>8} {:<8}  {:<12} WHY",
        "NAME", "STATE", "FOR", "VCPU", "MEM", "RESTARTS", "PID", "JAIL", "MODEL"
    )?;
    for p in &reply.pools {
        writeln!(
            out,
            "pool {:<15} {}/{} ready, {} taken, {} failed to start, from {}{}",
            p.name,
            p.ready,
            p.size,
            p.claims,
            p.failures,
            p.from,
            p.last_error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        )?;
    }
    for a in &reply.agents {
        writeln!(
            out,
            "{:<20} {:<11} {:>7}s {:>5} {:>6}M {:>8} {:>8} {:<8}  {:<12} {}",
            a.name,
            if a.paused { "paused" } else { a.state.as_str() },
            a.for_s,
            a.vcpus,
            a.memory_mib,
            a.restarts,
            a.vmm_pid.map_or("-".to_owned(), |p| p.to_string()),
            a.jail.map_or("-", |j| j.as_str()),
            a.model.as_deref().unwrap_or("-"),
            a.last_error.as_deref().unwrap_or(""),
        )?;
        if !a.devices.is_empty() {
            writeln!(out, "{:<20} devices: {}", "", a.devices.join(", "))?;
        }
    }
    Ok(0)
}

pub fn exec(args: &ExecArgs) -> anyhow::Result<i32> {
    if args.command.is_empty() {
        anyhow::bail!("give the program to run after `--`");
    }
    let run = Program {
        user: args.user.clone(),
        ..crate::flags::program(&args.command, &args.env, args.cwd.as_deref(), args.timeout)
    };
    if args.detach {
        return processes::exec_detached(
            &args.socket,
            &args.name,
            run,
            args.tag.clone(),
            args.json,
        );
    }
    if !args.json {
        return processes::exec_streamed(
            &args.socket,
            &args.name,
            run,
            args.stdin,
            args.tty,
            args.tag.clone(),
        );
    }
    if args.tag.is_some() {
        anyhow::bail!("--tag is for programs streamed or detached, not --json");
    }
    let stdin = if args.stdin {
        let mut bytes = Vec::new();
        io::stdin()
            .take(MAX_STDIN_BYTES + 1)
            .read_to_end(&mut bytes)
            .context("cannot read standard input")?;
        if bytes.len() as u64 > MAX_STDIN_BYTES {
            anyhow::bail!(
                "standard input is longer than {MAX_STDIN_BYTES} bytes; copy large inputs in another way"
            );
        }
        Some(String::from_utf8(bytes).context("standard input is not UTF-8 text")?)
    } else {
        None
    };
    let request = Request::Exec(ExecCall {
        name: args.name.clone(),
        run,
        stdin,
    });
    let reply: ExecReply = client(&args.socket)?.call(&request)?;
    if args.json {
        println!("{}", serde_json::to_string(&reply)?);
    } else {
        io::stdout().write_all(reply.stdout.as_bytes())?;
        io::stderr().write_all(reply.stderr.as_bytes())?;
        if reply.truncated {
            eprintln!(
                "agentos: the output was cut (at 256 KiB per stream, less when much of it is control characters or quotes)"
            );
        }
        if reply.timed_out {
            eprintln!("agentos: the program ran past its timeout and was killed");
        }
    }
    Ok(match (reply.code, reply.signal) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    })
}

pub fn infer(args: &InferArgs) -> anyhow::Result<i32> {
    let inputs = crate::infer::read_inputs(&args.input, args.input_file.as_deref())?;
    let request = Request::Infer(InferCall {
        name: args.name.clone(),
        model: None,
        task: args.task,
        inputs,
        options: InferOptions {
            sentences: args.sentences,
            top_k: args.top_k,
        },
    });
    let reply: InferReply = client(&args.socket)?.call(&request)?;
    if args.json {
        println!("{}", serde_json::to_string(&reply)?);
    } else {
        crate::infer::print_reply(&mut io::stdout().lock(), &reply)?;
    }
    Ok(0)
}

pub fn logs(args: &LogsArgs) -> anyhow::Result<i32> {
    let mut client = client(&args.socket)?;
    let mut offset = 0;
    let mut out = io::stdout().lock();
    loop {
        let chunk: LogsReply = client.call(&Request::Logs(LogsRequest {
            name: args.name.clone(),
            offset,
        }))?;
        out.write_all(chunk.text.as_bytes())?;
        out.flush()?;
        let more = chunk.next_offset > offset && !chunk.text.is_empty();
        offset = chunk.next_offset;
        if more {
            continue;
        }
        if !args.follow {
            return Ok(0);
        }
        if signals::interrupted() {
            return Ok(signals::exit_code());
        }
        std::thread::sleep(FOLLOW_INTERVAL);
    }
}

pub fn stop(args: &StopArgs) -> anyhow::Result<i32> {
    let info: AgentInfo = client(&args.socket)?.call(&Request::Stop(NameRequest {
        name: args.name.clone(),
    }))?;
    println!("{}: {}", info.name, info.state.as_str());
    Ok(0)
}

pub fn rm(args: &RmArgs) -> anyhow::Result<i32> {
    let _: serde_json::Value = client(&args.socket)?.call(&Request::Rm(RmRequest {
        name: args.name.clone(),
        force: args.force,
    }))?;
    println!("{}: removed", args.name);
    Ok(0)
}

/// `path` made absolute (the daemon resolves paths on its own host, from its own directory).
fn absolute(path: &Path) -> anyhow::Result<String> {
    let path = std::fs::canonicalize(path)
        .with_context(|| format!("{}: no such directory", path.display()))?;
    Ok(path.display().to_string())
}

pub fn snapshot(args: &SnapshotArgs) -> anyhow::Result<i32> {
    let reply: SnapshotReply = client(&args.socket)?.call(&Request::Snapshot(SnapshotRequest {
        name: args.name.clone(),
        to: absolute(&args.to)?,
    }))?;
    println!(
        "{}: saved to {} ({:.1} MB of memory), stopped",
        reply.name,
        reply.to,
        reply.memory_bytes as f64 / 1e6
    );
    Ok(0)
}

pub fn metrics(args: &MetricsArgs) -> anyhow::Result<i32> {
    let reply: MetricsReply = client(&args.socket)?.call(&Request::Metrics)?;
    print!("{}", reply.text);
    Ok(0)
}

#[derive(clap::Args, Debug)]
pub struct GroupUpArgs {
    /// The group file (TOML).
    pub file: PathBuf,
    /// Return at once instead of waiting until every agent is up.
    #[arg(long)]
    pub detach: bool,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(clap::Args, Debug)]
pub struct GroupDownArgs {
    /// The group's name (from its file).
    pub name: String,
    #[command(flatten)]
    pub socket: SocketArg,
}

pub fn group_up(args: &GroupUpArgs) -> anyhow::Result<i32> {
    // Checked here first, so that a bad file is named by its path on this host.
    let (_, text) = agentos::group::file::load_with_text(&args.file)?;
    let reply: GroupUpReply = client(&args.socket)?.call(&Request::GroupUp(GroupUpRequest {
        file: args.file.display().to_string(),
        text,
        wait: !args.detach,
    }))?;
    if args.json {
        println!("{}", serde_json::to_string(&reply)?);
        return Ok(0);
    }
    println!("group {}: {} agents", reply.group, reply.members.len());
    for m in &reply.members {
        match m.boot_ms {
            Some(ms) => println!(
                "  {:<24} {} (booted in {:.1} s)",
                m.name,
                m.state.as_str(),
                ms as f64 / 1e3
            ),
            None => println!("  {:<24} {}", m.name, m.state.as_str()),
        }
    }
    Ok(0)
}

pub fn group_down(args: &GroupDownArgs) -> anyhow::Result<i32> {
    let reply: serde_json::Value =
        client(&args.socket)?.call(&Request::GroupDown(GroupRequest {
            group: args.name.clone(),
        }))?;
    println!(
        "group {}: {} agents stopped",
        args.name,
        reply["stopped"].as_u64().unwrap_or(0)
    );
    Ok(0)
}

/// Gives group `group` the input when a daemon runs it; `None` when no daemon answers at
/// `socket` or it does not run that group.
pub fn group_input(
    socket: &SocketArg,
    group: &str,
    text: &str,
    timeout_s: u64,
) -> anyhow::Result<Option<GroupReport>> {
    let mut client = match Client::connect(&socket.client_path()?) {
        Ok(client) => client,
        Err(ClientError::Connect { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let request = Request::GroupInput(GroupInputRequest {
        group: group.to_owned(),
        text: text.to_owned(),
        timeout_s: Some(timeout_s),
    });
    match client.call::<GroupReport>(&request) {
        Ok(report) => {
            eprintln!("agentos: group `{group}` runs under the daemon; the input went there");
            Ok(Some(report))
        }
        Err(ClientError::Api(e)) if e.kind == ErrorKind::UnknownGroup => Ok(None),
        Err(e) => Err(e.into()),
    }
}
