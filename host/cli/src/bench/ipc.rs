//! `agentos bench ipc`: round trips between two agents through the router, beside the same
//! exchange of frames over a host Unix socket pair (the floor: no VM, no vsock, no router).
//!
//! Agent `a` runs `/init ping b` in its guest: each message goes guest -> vsock -> a's VMM ->
//! router -> b's VMM -> vsock -> b's guest agent, whose echo handler sends it back the same way;
//! the program times each round trip. Small messages measure latency and messages per second,
//! 64 KiB messages throughput.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Instant;

use agentos_protocol::peer::{
    Delivery, Handler, JoinRequest, PEER_PORT, PeerRequest, PeerSend, RouterMessage,
};
use agentos_protocol::{ExecRequest, FrameReader, Program, write_frame};
use anyhow::{Context, bail};
use serde::Serialize;

use super::{percentile, ratio, round};
use agentos::carrier;
use agentos::group::router::Router;
use agentos::group::trace::TraceLog;
use agentos::placement::{self, CarrierChoice, Placement};
use agentos_core::agent::connection::ExecIo;
use agentos_core::agent::spec::AgentRequest;
use agentos_core::agent::vm::AgentVm;
use agentos_core::rundir::RunDir;

const SMALL_BYTES: usize = 64;
const LARGE_BYTES: usize = 64 * 1024;

#[derive(clap::Args, Debug)]
pub struct IpcBenchArgs {
    /// Round trips per message size and side.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub round_trips: u32,
    /// Where the VMs run (see `agentos run --help`).
    #[arg(long, value_enum, default_value_t = CarrierChoice::Auto)]
    pub carrier: CarrierChoice,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct IpcBench {
    placement: &'static str,
    round_trips: u32,
    sizes: Vec<SizeResult>,
}

#[derive(Debug, Serialize)]
struct SizeResult {
    bytes: usize,
    agents: Side,
    unix_socket: Side,
    /// agents / socket pair; for throughput socket pair / agents, so that above 1 means slower.
    ratio_p50: f64,
    ratio_p99: f64,
    ratio_mb_per_s: f64,
}

#[derive(Debug, Serialize)]
struct Side {
    p50_us: f64,
    p99_us: f64,
    /// Messages each way, both directions counted.
    messages_per_s: f64,
    mb_per_s: f64,
}

impl Side {
    fn of(rtt_us: &[f64], bytes: usize) -> Self {
        let total_s: f64 = rtt_us.iter().sum::<f64>() / 1e6;
        let messages = 2.0 * rtt_us.len() as f64;
        let per_s = if total_s > 0.0 {
            messages / total_s
        } else {
            0.0
        };
        Self {
            p50_us: round(percentile(rtt_us, 0.50), 1),
            p99_us: round(percentile(rtt_us, 0.99), 1),
            messages_per_s: round(per_s, 1),
            mb_per_s: round(per_s * bytes as f64 / 1e6, 3),
        }
    }
}

pub fn run(args: &IpcBenchArgs) -> anyhow::Result<i32> {
    let placement = placement::decide(args.carrier)?;
    if placement == Placement::Carrier {
        return Ok(carrier::rerun_inside(Vec::new())?);
    }
    let placement = placement.label();

    let base = super::agent_options(AgentRequest::default())?;
    eprintln!("agentos bench ipc: booting two agents");
    let mut vms = Vec::new();
    for booted in AgentVm::boot_all(&[base.clone(), base]) {
        vms.push(booted.context("an agent did not boot")?);
    }
    let result = measure(&mut vms, args.round_trips);
    for vm in vms {
        vm.shutdown();
    }
    let sizes = result?;
    let report = IpcBench {
        placement,
        round_trips: args.round_trips,
        sizes,
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        for s in &report.sizes {
            writeln!(
                out,
                "{:>6} B: agents p50 {:.0} us p99 {:.0} us, {:.0} msg/s, {:.2} MB/s; unix socket pair p50 {:.1} us, {:.0} msg/s, {:.1} MB/s; ratio p50 {:.1}, p99 {:.1}, MB/s {:.1}",
                s.bytes,
                s.agents.p50_us,
                s.agents.p99_us,
                s.agents.messages_per_s,
                s.agents.mb_per_s,
                s.unix_socket.p50_us,
                s.unix_socket.messages_per_s,
                s.unix_socket.mb_per_s,
                s.ratio_p50,
                s.ratio_p99,
                s.ratio_mb_per_s
            )?;
        }
    }
    Ok(0)
}

fn measure(vms: &mut [AgentVm], round_trips: u32) -> anyhow::Result<Vec<SizeResult>> {
    let names = ["a".to_owned(), "b".to_owned()];
    let channels = [
        ("a".to_owned(), "b".to_owned()),
        ("b".to_owned(), "a".to_owned()),
    ];
    let trace_dir = RunDir::create("trace").context("cannot create a run directory")?;
    let router = Router::new(
        &names,
        &channels,
        TraceLog::create(&trace_dir.join("trace.jsonl"))?,
    );
    let [a, b] = vms else {
        bail!("two agents are needed");
    };
    router.attach("a", &a.host_socket(PEER_PORT))?;
    router.attach("b", &b.host_socket(PEER_PORT))?;
    b.conn().join(JoinRequest {
        id: 0,
        group: "bench".into(),
        name: "b".into(),
        handler: Some(Handler::Echo),
        outputs: vec!["a".into()],
    })?;
    let mut sizes = Vec::new();
    for bytes in [SMALL_BYTES, LARGE_BYTES] {
        eprintln!("agentos bench ipc: {round_trips} round trips of {bytes} bytes");
        let agents = ping_in_guest(a, bytes, round_trips)?;
        let floor = ping_socket_pair(bytes, round_trips)?;
        let (agents, unix_socket) = (Side::of(&agents, bytes), Side::of(&floor, bytes));
        sizes.push(SizeResult {
            bytes,
            ratio_p50: ratio(agents.p50_us, unix_socket.p50_us),
            ratio_p99: ratio(agents.p99_us, unix_socket.p99_us),
            ratio_mb_per_s: ratio(unix_socket.mb_per_s, agents.mb_per_s),
            agents,
            unix_socket,
        });
    }
    Ok(sizes)
}

/// Round trips measured by `/init ping` in agent `a`, in microseconds.
fn ping_in_guest(a: &mut AgentVm, bytes: usize, round_trips: u32) -> anyhow::Result<Vec<f64>> {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let status = a.conn().exec(
        ExecRequest {
            run: Program::new("/init").with_args([
                "ping",
                "b",
                "--count",
                &round_trips.to_string(),
                "--size",
                &bytes.to_string(),
            ]),
            ..Default::default()
        },
        ExecIo {
            stdin: None,
            stdout: &mut stdout,
            stderr: &mut stderr,
        },
    )?;
    if status.shell_code() != 0 {
        bail!(
            "the ping in the guest failed (status {}): {}",
            status.shell_code(),
            String::from_utf8_lossy(&stderr).trim()
        );
    }
    let report: serde_json::Value =
        serde_json::from_slice(&stdout).context("the ping in the guest printed no report")?;
    let rtt: Vec<f64> = report["rtt_us"]
        .as_array()
        .context("the ping report has no round trips")?
        .iter()
        .filter_map(serde_json::Value::as_f64)
        .collect();
    if rtt.len() != round_trips as usize {
        bail!(
            "the ping measured {} round trips, not {round_trips}",
            rtt.len()
        );
    }
    Ok(rtt)
}

/// The same frames over a host socket pair: a thread answers each send with a delivery of the
/// same body, as the router and the echoing agent do.
fn ping_socket_pair(bytes: usize, round_trips: u32) -> anyhow::Result<Vec<f64>> {
    let (mut near, far) = UnixStream::pair().context("cannot create a socket pair")?;
    let echo = thread::spawn(move || -> anyhow::Result<()> {
        let mut writer = far.try_clone()?;
        let mut frames = FrameReader::new(far);
        while let Some(req) = frames.read::<PeerRequest>()? {
            if let PeerRequest::Send(send) = req {
                write_frame(
                    &mut writer,
                    &RouterMessage::Accepted {
                        seq: send.seq,
                        message: send.seq,
                    },
                )?;
                write_frame(
                    &mut writer,
                    &RouterMessage::Deliver(Delivery {
                        message: send.seq,
                        from: "b".into(),
                        kind: send.kind,
                        body: send.body,
                        trace: 0,
                    }),
                )?;
            }
        }
        Ok(())
    });
    let mut frames = FrameReader::new(near.try_clone()?);
    let body = "x".repeat(bytes);
    let mut rtt = Vec::new();
    for seq in 1..=u64::from(round_trips) {
        let started = Instant::now();
        write_frame(
            &mut near,
            &PeerRequest::Send(PeerSend {
                seq,
                to: "b".into(),
                kind: "ping".into(),
                body: body.clone(),
                trace: None,
                model: None,
                infer_us: None,
                from: None,
            }),
        )?;
        let _accepted = frames.read::<RouterMessage>()?;
        let Some(RouterMessage::Deliver(d)) = frames.read::<RouterMessage>()? else {
            bail!("the socket pair's echo broke");
        };
        write_frame(&mut near, &PeerRequest::Ack { message: d.message })?;
        rtt.push(started.elapsed().as_secs_f64() * 1e6);
    }
    drop(near);
    drop(frames);
    echo.join()
        .map_err(|_| anyhow::anyhow!("the echo thread panicked"))??;
    Ok(rtt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_pair_floor_echoes_every_size() {
        for bytes in [SMALL_BYTES, LARGE_BYTES] {
            let rtt = ping_socket_pair(bytes, 5).unwrap();
            assert_eq!(rtt.len(), 5);
            assert!(rtt.iter().all(|us| *us > 0.0));
        }
    }

    #[test]
    fn sides_count_both_directions() {
        let side = Side::of(&[1000.0, 1000.0], 1000);
        // Two round trips in 2 ms: four messages, 2000 messages/s, 2 MB/s.
        assert_eq!(side.messages_per_s, 2000.0);
        assert_eq!(side.mb_per_s, 2.0);
        assert_eq!(side.p50_us, 1000.0);
    }
}
