//! `agentos daemon` on a host whose KVM cannot boot Linux: the daemon runs inside one long-lived
//! QEMU carrier (see [`crate::carrier`]) and serves the API on TCP on the carrier's user-mode
//! network, of which QEMU forwards one port of the host's loopback in and lets nothing out. This
//! process keeps the carrier and serves the API on the host (the socket, `--metrics`,
//! `--listen`) through the [`relay`], with a token for the daemon inside that is made here and
//! never leaves this process and the carrier.
//!
//! The carrier is this process's child: a signal that stops the daemon kills it (and the agents
//! in it) at once; a carrier that ends by itself ends the daemon with an error.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch};

use super::relay::{self, Gate, Relay, with_causes};
use super::server::{Listener, Scope, Site};
use super::{DaemonArgs, DaemonError, Listeners, SIGNAL_POLL, remove_files};
use crate::carrier::{
    self, CARRIER_ADDRESS, CARRIER_NIC, CARRIER_PREFIX, Carrier, CarrierError, CarrierMachine,
    DEFAULT_CPUS, DEFAULT_MEMORY_MIB, Forward,
};
use agentos_core::agent::connection::{AgentConnection, ExecIo};
use agentos_core::signals;
use agentos_image as image;

/// The port the daemon in the carrier listens on, on the carrier's own network.
const GUEST_API_PORT: u16 = 7070;
/// The daemon's socket inside the carrier (nobody uses it; the relay speaks TCP).
const GUEST_SOCKET: &str = "/run/agentos/daemon.sock";
/// Boots tried, each with another free host port, when the one picked was taken before QEMU
/// could listen on it.
const PORT_ATTEMPTS: u32 = 3;
/// How long the daemon in a carrier that is up has to answer `GET /version`.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one such question may take (a carrier whose network is not up yet leaves it
/// unanswered).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often it is asked meanwhile.
const READY_POLL: Duration = Duration::from_millis(250);
/// How long QEMU may take to end once the carrier's connection closed, for its status to be
/// told.
const QEMU_END: Duration = Duration::from_secs(1);
/// What the daemon prints when it listens; the host's lines replace the carrier's.
const LISTENING: &[u8] = b"agentos daemon: listening on ";

/// What the carrier's thread tells the event loop.
enum CarrierEvent {
    /// The carrier is up; the daemon in it will answer at this host address.
    Up(SocketAddrV4),
    /// The carrier ended (or never came up), for this reason.
    Ended(String),
}

/// Serves the API of a daemon run in a carrier; see the module's documentation.
pub(super) fn run(args: &DaemonArgs) -> Result<i32, DaemonError> {
    let inner_token = random_token().map_err(|e| DaemonError::Start("its inner token", e))?;
    let (gate, gate_seen) = watch::channel(Gate::Booting);
    let relay = Arc::new(
        Relay::new(gate_seen, &inner_token)
            .map_err(|e| DaemonError::Start("its relay", io::Error::other(e)))?,
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DaemonError::Start("its event loop", e))?;
    let listeners = Listeners::bind(args)?;
    let (events, mut carrier_events) = mpsc::unbounded_channel();
    let stop = Arc::new(AtomicBool::new(false));
    let job = CarrierJob {
        files: carrier_files(),
        hang_timeout: args.hang_timeout,
        token: inner_token,
        stop: stop.clone(),
    };
    let carrier_thread = match std::thread::Builder::new()
        .name("carrier".into())
        .spawn(move || job.run(&events))
    {
        Ok(thread) => thread,
        Err(e) => {
            remove_files(&listeners.files);
            return Err(DaemonError::Start("its carrier thread", e));
        }
    };

    let outcome = runtime.block_on(async {
        let sites = sites(&listeners).map_err(|e| DaemonError::Start("its listeners", e))?;
        let (stopped, stopping) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(relay::serve(sites, relay.clone(), async {
            let _ = stopping.await;
        }));
        let outcome = watch_carrier(&mut carrier_events, &gate, &relay, &listeners).await;
        let why = match &outcome {
            Ok(()) => "the daemon is stopping".to_owned(),
            Err(e) => e.to_string(),
        };
        let _ = gate.send(Gate::Down(Arc::from(why)));
        let _ = stopped.send(());
        let _ = serving.await;
        outcome
    });
    stop.store(true, Ordering::SeqCst);
    let _ = carrier_thread.join();
    remove_files(&listeners.files);
    outcome?;
    eprintln!("agentos daemon: the carrier and every agent in it stopped; exiting");
    Ok(0)
}

/// Follows the carrier until the daemon is told to stop (Ok) or the carrier ends (the error):
/// opens the gate once the daemon inside answers, and says so.
async fn watch_carrier(
    events: &mut mpsc::UnboundedReceiver<CarrierEvent>,
    gate: &watch::Sender<Gate>,
    relay: &Relay,
    listeners: &Listeners,
) -> Result<(), DaemonError> {
    let mut tick = tokio::time::interval(SIGNAL_POLL);
    let mut ready_by: Option<(SocketAddr, Instant)> = None;
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(CarrierEvent::Up(address)) => {
                    ready_by = Some((SocketAddr::V4(address), Instant::now() + READY_TIMEOUT));
                }
                Some(CarrierEvent::Ended(_)) | None if signals::interrupted() => return Ok(()),
                Some(CarrierEvent::Ended(why)) => return Err(DaemonError::CarrierEnded(why)),
                None => return Err(DaemonError::CarrierEnded("its thread ended".into())),
            },
            _ = tick.tick() => {
                if signals::interrupted() {
                    return Ok(());
                }
            }
        }
        let Some((address, deadline)) = ready_by else {
            continue;
        };
        let answered = tokio::time::timeout(PROBE_TIMEOUT, relay.answers(address)).await;
        if answered.unwrap_or(false) {
            ready_by = None;
            let _ = gate.send(Gate::Up(address));
            listeners.announce();
        } else if Instant::now() >= deadline {
            return Err(DaemonError::CarrierEnded(format!(
                "the daemon in it did not answer within {} s",
                READY_TIMEOUT.as_secs()
            )));
        } else {
            tokio::time::sleep(READY_POLL).await;
        }
    }
}

/// The host's listeners as the relay's sites (each a copy, so that `listeners` can still say
/// where they are).
fn sites(listeners: &Listeners) -> io::Result<Vec<Site>> {
    let mut sites = vec![Site {
        listener: Listener::Unix(UnixListener::from_std(listeners.api.try_clone()?)?),
        scope: Scope::Api,
    }];
    if let Some(metrics) = &listeners.metrics {
        sites.push(Site {
            listener: Listener::Unix(UnixListener::from_std(metrics.try_clone()?)?),
            scope: Scope::Metrics,
        });
    }
    if let Some((listener, token)) = &listeners.tcp {
        sites.push(Site {
            listener: Listener::Tcp(
                TcpListener::from_std(listener.try_clone()?)?,
                token.token.clone(),
            ),
            scope: Scope::Api,
        });
    }
    Ok(sites)
}

/// A carrier up, its guest agent's connection, and the host address of the daemon it will run.
struct Booted {
    carrier: Carrier,
    conn: AgentConnection,
    address: SocketAddrV4,
}

/// What the carrier's thread needs.
struct CarrierJob {
    files: Vec<PathBuf>,
    hang_timeout: u64,
    token: String,
    /// Set when the daemon stops: the carrier is then killed.
    stop: Arc<AtomicBool>,
}

impl CarrierJob {
    /// Boots the carrier, runs the daemon in it until either ends, and says what happened.
    fn run(self, events: &mpsc::UnboundedSender<CarrierEvent>) {
        let why = match self.boot() {
            Ok(Some(Booted {
                mut carrier,
                conn,
                address,
            })) => {
                let _ = events.send(CarrierEvent::Up(address));
                let served = self.serve(&carrier, conn);
                let ended = if self.stop.load(Ordering::SeqCst) {
                    None
                } else {
                    carrier.ended_within(QEMU_END)
                };
                let why = match ended {
                    Some(status) => format!("QEMU ended ({status})"),
                    None => served,
                };
                carrier.stop();
                format!("{why}{}", carrier.console_tail())
            }
            Ok(None) => "it was stopped while it booted".into(),
            Err(e) => with_causes(&e),
        };
        let _ = events.send(CarrierEvent::Ended(why));
    }

    /// A carrier with a free host port forwarded to [`GUEST_API_PORT`].
    fn boot(&self) -> Result<Option<Booted>, CarrierError> {
        let mut attempt = 1;
        loop {
            let host = free_port().map_err(CarrierError::Listen)?;
            let machine = CarrierMachine {
                files: self.files.clone(),
                memory_mib: DEFAULT_MEMORY_MIB,
                cpus: DEFAULT_CPUS,
                console: false,
                pci_test_device: false,
                forward: Some(Forward {
                    host,
                    guest_port: GUEST_API_PORT,
                }),
            };
            match Carrier::boot(&machine, Some(&self.stop)) {
                Ok(booted) => {
                    return Ok(booted.map(|(carrier, conn)| Booted {
                        carrier,
                        conn,
                        address: host,
                    }));
                }
                Err(CarrierError::PortTaken(port)) if attempt < PORT_ATTEMPTS => {
                    tracing::info!(%port, "the forwarded port was taken; trying another");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs the daemon in `carrier` until it ends or the daemon here stops; says why it ended.
    fn serve(&self, carrier: &Carrier, mut conn: AgentConnection) -> String {
        let argv = daemon_command(carrier, self.hang_timeout);
        let env = BTreeMap::from([("AGENTOS_API_TOKEN".to_owned(), self.token.clone())]);
        let stop = self.stop.clone();
        conn.set_cancel_check(Some(Box::new(move || {
            stop.load(Ordering::SeqCst) || signals::interrupted()
        })));
        let mut stdout = WithoutListening::new(io::stderr());
        let mut stderr = WithoutListening::new(io::stderr());
        let result = conn.exec(
            carrier.request(&argv, &env),
            ExecIo {
                stdin: None,
                stdout: &mut stdout,
                stderr: &mut stderr,
            },
        );
        let _ = stdout.finish();
        let _ = stderr.finish();
        match result {
            Ok(status) => format!("the daemon in it ended with status {}", status.shell_code()),
            Err(e) => format!("it stopped: {}", with_causes(&e)),
        }
    }
}

/// The command that runs the daemon in the carrier: its network card up at
/// [`CARRIER_ADDRESS`], then `agentos daemon` listening there.
fn daemon_command(carrier: &Carrier, hang_timeout: u64) -> Vec<String> {
    let script = format!(
        "ip link set lo up && ip addr add {CARRIER_ADDRESS}/{CARRIER_PREFIX} dev {CARRIER_NIC} && ip link set {CARRIER_NIC} up && exec \"$@\""
    );
    [
        "/bin/sh",
        "-c",
        &script,
        "sh",
        &carrier.agentos().display().to_string(),
        "daemon",
        "--socket",
        GUEST_SOCKET,
        "--listen",
        &SocketAddrV4::new(CARRIER_ADDRESS, GUEST_API_PORT).to_string(),
        "--hang-timeout",
        &hang_timeout.to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// What the carrier carries: the agent image, the `base` template's disk when it is built, and
/// the disks of every installed model bundle (so that agents with a template or a model can be
/// spawned). Models that cannot be prepared are left out, with a warning.
fn carrier_files() -> Vec<PathBuf> {
    let mut files = carrier::agent_image_files();
    let cache = image::default_cache_dir();
    files.extend(image::template::carrier_files(&cache));
    if let Ok(agent) = image::find_image(&cache, image::AGENT_IMAGE) {
        match image::model::carrier_files(
            &image::model::ModelStore::new(&cache),
            &agent.manifest.libraries,
        ) {
            Ok(models) => files.extend(models),
            Err(e) => tracing::warn!(
                error = %with_causes(&e),
                "the model bundles stay out of the carrier; agents with a model will not start"
            ),
        }
    }
    files
}

/// A port of the host's loopback free now (QEMU listens on it next; see [`PORT_ATTEMPTS`]).
fn free_port() -> io::Result<SocketAddrV4> {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    match listener.local_addr()? {
        SocketAddr::V4(address) => Ok(address),
        SocketAddr::V6(_) => Err(io::Error::other("an IPv6 address for 127.0.0.1")),
    }
}

/// 32 random bytes in hex.
fn random_token() -> io::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The daemon's output from the carrier, less the lines that say where it listens there (this
/// process says where it listens here).
struct WithoutListening<W: Write> {
    out: W,
    /// The start of a line not complete yet.
    line: Vec<u8>,
}

impl<W: Write> WithoutListening<W> {
    fn new(out: W) -> Self {
        Self {
            out,
            line: Vec::new(),
        }
    }

    /// Passes on the last line, when it has no end.
    fn finish(&mut self) -> io::Result<()> {
        if !self.line.is_empty() && !self.line.starts_with(LISTENING) {
            self.out.write_all(&self.line)?;
        }
        self.line.clear();
        self.out.flush()
    }
}

impl<W: Write> Write for WithoutListening<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.line.extend_from_slice(buf);
        while let Some(end) = self.line.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.line.drain(..=end).collect();
            if !line.starts_with(LISTENING) {
                self.out.write_all(&line)?;
            }
        }
        Ok(buf.len())
    }

    /// Passes on what came, but not the start of a line: the guest agent flushes after every
    /// piece, and a line cut in two would pass.
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_carriers_listening_lines_are_left_out_and_the_rest_passes() {
        let mut out = WithoutListening::new(Vec::new());
        for piece in [
            &b"agentos daemon: listening on "[..],
            b"/run/agentos/daemon.sock (pid 7)\nagentos: sp",
            b"awned a\nagentos daemon: listening on http://10.0.2.15:7070 (token: ...)\nlast",
        ] {
            // The guest agent's output comes in pieces, each flushed.
            out.write_all(piece).unwrap();
            out.flush().unwrap();
        }
        out.finish().unwrap();
        assert_eq!(
            String::from_utf8(out.out).unwrap(),
            "agentos: spawned a\nlast"
        );
    }
}
