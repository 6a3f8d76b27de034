//! agentos-guest: PID 1 of every agent microVM, and of the carrier VM.
//!
//! As PID 1 it mounts the basic file systems, loads the kernel modules its image names, opens the
//! transport to the host and serves the host's requests; a `shutdown` request or a fatal error
//! turns the VM off. Not as PID 1 (tests, a run on a developer's machine) it only serves.

/// Writes one line to the console. A PID 1 must not die because its console went away, so write
/// errors are ignored.
macro_rules! console {
    ($($arg:tt)*) => {
        $crate::console_line(format_args!($($arg)*))
    };
}

mod base_disk;
mod config;
mod edu;
mod exec;
mod files;
mod infer;
mod init;
mod model_disks;
mod outbox;
mod peer;
mod processes;
mod reaper;
mod restore;
mod server;
mod stdin;
mod system;
mod transport;
mod users;
mod watch;

use std::fmt;
use std::io::{self, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use agentos_protocol::{BOOT_MARKER, error_chain as describe, status};

use crate::config::{Config, ConfigError, Transport};
use crate::init::{InitError, PowerOff};
use crate::reaper::Reaper;
use crate::server::{Context, Ended, Role, ServeError};
use crate::transport::{Connection, TransportError, VsockListener};

/// Pause between the end of a control session that lasted less than this and the next, so that a
/// host that keeps closing the connection cannot spin the agent.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

/// Pause after a failed `accept`, e.g. when descriptors run out.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Connections the host may hold open to the listening port at once.
const MAX_ACCEPTED: usize = 16;

/// Host-supplied text quoted in our messages is cut to this many bytes.
const MAX_QUOTED_BYTES: usize = 256;

#[derive(Debug, thiserror::Error)]
enum Fatal {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Init(#[from] InitError),
    #[error(transparent)]
    ModelDisks(#[from] model_disks::ModelDisksError),
    #[error(transparent)]
    BaseDisk(#[from] base_disk::BaseDiskError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("cannot start a thread")]
    Thread(#[source] io::Error),
    #[error("cannot duplicate the serial port")]
    SerialClone(#[source] io::Error),
    #[error("no connection to the host is left to serve")]
    Abandoned,
}

/// What ends the agent.
enum Event {
    Shutdown,
    Fatal(Fatal),
}

fn main() -> ExitCode {
    let pid1 = std::process::id() == 1;
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Not as PID 1, the binary is also the tool guest programs message their peers with, and
    // the one `agentos bench vfio` times a passed-through test device with.
    if !pid1 {
        let tool = match args.first().map(String::as_str) {
            Some("ping") => Some(("ping", peer::ping_command(&args[1..]))),
            Some("edu") => Some(("edu", edu::command(&args[1..]))),
            Some("send") => Some((
                "send",
                peer::send_command(&args[1..]).map(|id| format!("accepted {id}")),
            )),
            _ => None,
        };
        if let Some((name, outcome)) = tool {
            return match outcome {
                Ok(line) => {
                    println!("{line}");
                    ExitCode::SUCCESS
                }
                Err(problem) => {
                    eprintln!("agentos-guest {name}: {problem}");
                    ExitCode::FAILURE
                }
            };
        }
    }

    match run(pid1) {
        Ok(()) => {
            if pid1 {
                init::power_off(PowerOff::Requested);
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            console!("fatal: {}", describe(&err));
            if pid1 {
                init::power_off(PowerOff::Failed);
            }
            ExitCode::FAILURE
        }
    }
}

/// Returns when the host asked for a shutdown.
fn run(pid1: bool) -> Result<(), Fatal> {
    if pid1 {
        init::report(status::INIT_STARTED);
        init::mount_proc()?;
    }
    let init_ms = system::uptime_ms().unwrap_or(0);
    if pid1 {
        init::mount_file_systems()?;
        // Benchmarks time a boot to this line, under any VMM (see `BOOT_MARKER`).
        let _ = writeln!(
            io::stderr().lock(),
            "{BOOT_MARKER} (version {})",
            env!("CARGO_PKG_VERSION")
        );
    }
    let config = Config::load()?;
    if pid1 {
        init::configure(&config)?;
        model_disks::mount_given()?;
        base_disk::mount_given()?;
    }
    let reaper = if pid1 {
        Reaper::all_children().map_err(Fatal::Thread)?
    } else {
        Reaper::own_children()
    };
    let ctx = Arc::new(Context::new(pid1, config.env, reaper, init_ms));
    let (events, happened) = mpsc::channel();
    let transport = config.transport;
    thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            let served = match transport {
                Transport::Vsock { port, listen_port } => {
                    serve_vsock(port, listen_port, &ctx, &events)
                }
                Transport::Serial { name } => serve_serial(&name, &ctx),
            };
            let _ = events.send(match served {
                Ok(()) => Event::Shutdown,
                Err(err) => Event::Fatal(err),
            });
        })
        .map_err(Fatal::Thread)?;
    match happened.recv() {
        Ok(Event::Shutdown) => Ok(()),
        Ok(Event::Fatal(err)) => Err(err),
        Err(_) => Err(Fatal::Abandoned),
    }
}

/// Dials the host and serves that connection, dialling again whenever it ends; accepts the host's
/// own connections on `listen_port` meanwhile. Returns when the host asks for a shutdown.
fn serve_vsock(
    port: u32,
    listen_port: u32,
    ctx: &Arc<Context>,
    events: &Sender<Event>,
) -> Result<(), Fatal> {
    let mut listening = false;
    loop {
        let conn = transport::connect_vsock(port)?;
        if !listening {
            // Bound once the dial has proved that vsock is up.
            let listener = VsockListener::bind(listen_port)?;
            let (ctx, events) = (Arc::clone(ctx), events.clone());
            thread::Builder::new()
                .name("listener".into())
                .spawn(move || accept_forever(&listener, &ctx, &events))
                .map_err(Fatal::Thread)?;
            listening = true;
        }
        let session = Instant::now();
        if shutdown_requested(server::serve(conn, ctx, Role::Control)) {
            return Ok(());
        }
        // A session that lasted is not a host closing on us: dial again at once, and quietly. A
        // restored VM's session ends that way (its transport was reset), and the host waits for
        // the next.
        if session.elapsed() < RECONNECT_PAUSE {
            console!("the control connection ended at once; dialling the host again");
            thread::sleep(RECONNECT_PAUSE);
        }
    }
}

fn accept_forever(listener: &VsockListener, ctx: &Arc<Context>, events: &Sender<Event>) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let conn = match listener.accept() {
            Ok(conn) => conn,
            Err(err) => {
                console!("accepting a host connection failed: {err}");
                thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
        };
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_ACCEPTED {
            open.fetch_sub(1, Ordering::SeqCst);
            console!("refusing a host connection: {MAX_ACCEPTED} are open");
            continue;
        }
        if let Err(err) = serve_accepted(conn, ctx, events, &open) {
            open.fetch_sub(1, Ordering::SeqCst);
            console!("cannot serve a host connection: {err}");
        }
    }
}

fn serve_accepted(
    conn: Connection,
    ctx: &Arc<Context>,
    events: &Sender<Event>,
    open: &Arc<AtomicUsize>,
) -> io::Result<()> {
    let (ctx, events, open) = (Arc::clone(ctx), events.clone(), Arc::clone(open));
    thread::Builder::new()
        .name("accepted".into())
        .spawn(move || {
            let served = server::serve(conn, &ctx, Role::Accepted);
            open.fetch_sub(1, Ordering::SeqCst);
            if shutdown_requested(served) {
                let _ = events.send(Event::Shutdown);
            }
        })?;
    Ok(())
}

/// Serves the virtio-serial port, one session after another: when the host end closes, the next
/// session starts with a new `hello` once it opens again. Returns when the host asks for a
/// shutdown.
fn serve_serial(name: &str, ctx: &Context) -> Result<(), Fatal> {
    let port = transport::open_serial(name)?;
    loop {
        port.wait_for_peer();
        let conn = port.try_clone().map_err(Fatal::SerialClone)?;
        if shutdown_requested(server::serve(conn, ctx, Role::Control)) {
            return Ok(());
        }
        console!("the serial session ended; waiting for the host");
        thread::sleep(RECONNECT_PAUSE);
    }
}

fn shutdown_requested(served: Result<Ended, ServeError>) -> bool {
    match served {
        Ok(ended) => matches!(ended, Ended::Shutdown | Ended::Unrefreshed),
        Err(err) => {
            console!("serving a connection failed: {}", describe(&err));
            false
        }
    }
}

fn console_line(args: fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr().lock(), "agentos-guest: {args}");
}

/// Locks `mutex`. A poisoned lock only means another thread panicked while holding it, and the
/// release build aborts on panic anyway; the data is still the best there is.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Host-supplied text, cut so that a message quoting it stays far below the frame limit.
fn clip(text: &str) -> String {
    agentos_protocol::clip(text, MAX_QUOTED_BYTES)
}
