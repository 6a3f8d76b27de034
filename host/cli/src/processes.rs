//! Programs in a daemon's agents as they run: `exec` streaming its output, `exec --detach`,
//! `processes`, `attach` and `kill`.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use agentos::daemon::SocketArg;
use agentos::daemon::api::{
    ControlCall, NameRequest, ProcessRequest, ProcessesReply, ProgramLine, Request, StartCall,
    StartedReply,
};
use agentos::daemon::client::{Client, ClientError};
use agentos_protocol::process::Control;
use agentos_protocol::{ExitStatus, Program, PtySize, StreamData};
use anyhow::Context;

use crate::terminal;

/// How long input that could not be passed on waits to learn whether its program ended (then
/// nothing is said).
const END_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// Standard input goes to the program in pieces of this size.
const STDIN_PIECE: usize = 64 * 1024;

fn client(socket: &SocketArg) -> anyhow::Result<Client> {
    Ok(Client::connect(&socket.client_path()?)?)
}

/// How often the local terminal's size is looked at, to pass a change on.
const RESIZE_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// Starts `run` in agent `name` and follows it: its output goes to ours as it comes, our
/// standard input (with `stdin`, or `tty`) to it; with `tty` it runs on a terminal of our
/// terminal's size, ours in raw mode meanwhile. The program's exit status, as a shell gives it.
pub fn exec_streamed(
    socket: &SocketArg,
    name: &str,
    run: Program,
    stdin: bool,
    tty: bool,
    tag: Option<String>,
) -> anyhow::Result<i32> {
    let pty = tty.then(|| {
        terminal::size(libc::STDOUT_FILENO)
            .or_else(|| terminal::size(libc::STDIN_FILENO))
            .unwrap_or(PtySize { cols: 80, rows: 24 })
    });
    let stdin = stdin || tty;
    let request = Request::Start(StartCall {
        keep: false,
        name: name.to_owned(),
        run,
        stdin,
        detach: false,
        tag,
        pty,
    });
    let _raw = if tty {
        terminal::RawMode::enter(libc::STDIN_FILENO)
            .context("cannot put the terminal in raw mode")?
    } else {
        None
    };
    let socket_path = socket.client_path()?;
    let agent = name.to_owned();
    // A program that ends before it read all its input is no failure of ours.
    let ended = Arc::new(AtomicBool::new(false));
    let feeder_ended = Arc::clone(&ended);
    let code = follow(socket, &request, move |pid| {
        if let Some(mut size) = pty {
            let (socket_path, agent, ended) = (
                socket_path.clone(),
                agent.clone(),
                Arc::clone(&feeder_ended),
            );
            // Passes on changes of our terminal's size while the program runs.
            let _ = std::thread::Builder::new()
                .name("resize".into())
                .spawn(move || {
                    let Ok(mut client) = Client::connect(&socket_path) else {
                        return;
                    };
                    while !ended.load(Ordering::SeqCst) {
                        std::thread::sleep(RESIZE_POLL);
                        match terminal::size(libc::STDOUT_FILENO) {
                            Some(now) if now != size => {
                                size = now;
                                let resize = Request::Control(ControlCall {
                                    name: agent.clone(),
                                    pid,
                                    control: Control::Resize {
                                        cols: now.cols,
                                        rows: now.rows,
                                    },
                                });
                                let _ = client.call::<serde_json::Value>(&resize);
                            }
                            _ => {}
                        }
                    }
                });
        }
        if stdin {
            let (socket_path, agent) = (socket_path.clone(), agent.clone());
            let ended = Arc::clone(&feeder_ended);
            // Detached: it ends at our input's end or with the process.
            let _ = std::thread::Builder::new()
                .name("stdin".into())
                .spawn(move || {
                    if let Err(e) = feed_stdin(&socket_path, &agent, pid) {
                        // Its end may be on its way to us.
                        std::thread::sleep(END_PATIENCE);
                        if !ended.load(Ordering::SeqCst) {
                            eprintln!("agentos: standard input was not passed on whole: {e}");
                        }
                    }
                });
        }
    });
    ended.store(true, Ordering::SeqCst);
    code
}

/// Sends our standard input to program `pid`, then closes its input.
fn feed_stdin(socket: &std::path::Path, name: &str, pid: u32) -> anyhow::Result<()> {
    let mut client = Client::connect(socket)?;
    let mut buf = vec![0u8; STDIN_PIECE];
    let mut input = io::stdin().lock();
    let control = |control| {
        Request::Control(ControlCall {
            name: name.to_owned(),
            pid,
            control,
        })
    };
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("cannot read standard input"),
        };
        client.call::<serde_json::Value>(&control(Control::Stdin {
            data: StreamData(buf[..n].to_vec()),
        }))?;
    }
    client.call::<serde_json::Value>(&control(Control::CloseStdin))?;
    Ok(())
}

/// Follows a program's lines to its end: output to ours, `started` to `on_start`.
fn follow(
    socket: &SocketArg,
    request: &Request,
    mut on_start: impl FnMut(u32),
) -> anyhow::Result<i32> {
    let mut status: Option<ExitStatus> = None;
    let (mut out, mut err) = (io::stdout().lock(), io::stderr().lock());
    client(socket)?.follow(request, &mut |line| {
        let written = match line {
            ProgramLine::Started { pid } => {
                on_start(pid);
                Ok(())
            }
            ProgramLine::Stdout(data) => out.write_all(&data.0).and_then(|()| out.flush()),
            ProgramLine::Stderr(data) => err.write_all(&data.0),
            ProgramLine::Exited(exited) => {
                status = Some(exited);
                Ok(())
            }
            ProgramLine::Error(e) => return Err(ClientError::Api(e)),
        };
        written.map_err(ClientError::Local)
    })?;
    let status = status.context("the program's stream ended before it did")?;
    if status.timed_out {
        eprintln!("agentos: the program ran past its timeout and was killed");
    }
    Ok(status.shell_code())
}

/// Starts `run` in agent `name` to run on by itself; prints its process id.
pub fn exec_detached(
    socket: &SocketArg,
    name: &str,
    run: Program,
    tag: Option<String>,
    json: bool,
) -> anyhow::Result<i32> {
    let reply: StartedReply = client(socket)?.call(&Request::Start(StartCall {
        keep: false,
        name: name.to_owned(),
        run,
        stdin: false,
        detach: true,
        tag,
        pty: None,
    }))?;
    if json {
        println!("{}", serde_json::to_string(&reply)?);
    } else {
        println!("{}", reply.pid);
    }
    Ok(0)
}

#[derive(clap::Args, Debug)]
pub struct ProcessesArgs {
    /// The agent.
    pub name: String,
    /// Print them as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub socket: SocketArg,
}

pub fn processes(args: &ProcessesArgs) -> anyhow::Result<i32> {
    let reply: ProcessesReply = client(&args.socket)?.call(&Request::Processes(NameRequest {
        name: args.name.clone(),
    }))?;
    if args.json {
        println!("{}", serde_json::to_string(&reply)?);
        return Ok(0);
    }
    println!("{:>7}  {:<12} {:<5} COMMAND", "PID", "TAG", "KEPT");
    for process in &reply.processes {
        let command = std::iter::once(process.run.program.as_str())
            .chain(process.run.args.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ");
        println!(
            "{:>7}  {:<12} {:<5} {command}",
            process.pid,
            process.tag.as_deref().unwrap_or("-"),
            if process.keep { "yes" } else { "no" },
        );
    }
    Ok(0)
}

#[derive(clap::Args, Debug)]
pub struct AttachArgs {
    /// The agent.
    pub name: String,
    /// The program's process id (see `agentos processes`).
    pub pid: u32,
    #[command(flatten)]
    pub socket: SocketArg,
}

pub fn attach(args: &AttachArgs) -> anyhow::Result<i32> {
    let request = Request::Attach(ProcessRequest {
        name: args.name.clone(),
        pid: args.pid,
    });
    follow(&args.socket, &request, |_| {})
}

#[derive(clap::Args, Debug)]
pub struct KillArgs {
    /// The agent.
    pub name: String,
    /// The program's process id (see `agentos processes`).
    pub pid: u32,
    /// The signal's number.
    #[arg(long, short = 's', default_value_t = libc::SIGTERM,
          value_parser = clap::value_parser!(i32).range(1..=64))]
    pub signal: i32,
    #[command(flatten)]
    pub socket: SocketArg,
}

pub fn kill(args: &KillArgs) -> anyhow::Result<i32> {
    client(&args.socket)?.call::<serde_json::Value>(&Request::Control(ControlCall {
        name: args.name.clone(),
        pid: args.pid,
        control: Control::Signal {
            signal: args.signal,
        },
    }))?;
    Ok(0)
}
