//! `agentos bench files`: a file written into an agent and read back out through the guest
//! agent's file protocol (a connection of its own over vsock, as the daemon's file API uses),
//! beside the same bytes through a host Unix socket pair in chunks of the same size (the
//! floor: no VM, no vsock, no framing).

use std::io::{Cursor, Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use agentos_protocol::files::{FILE_CHUNK_BYTES, FsOp};
use anyhow::Context;
use serde::Serialize;

use super::{Stats, ratio, round};
use agentos::carrier;
use agentos::placement::{self, CarrierChoice, Placement};
use agentos_core::agent::connection::FileWrite;
use agentos_core::agent::spec::AgentRequest;
use agentos_core::agent::vm::{AgentVm, connect_to_agent};

/// Where the file goes in the guest.
const GUEST_PATH: &str = "/root/agentos-bench-file";
/// How long opening a connection to the guest agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(clap::Args, Debug)]
pub struct FilesBenchArgs {
    /// Size of the file, in MiB (the agent's memory holds it: its files live in RAM).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=128))]
    pub mib: u32,
    /// Transfers each way.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub runs: u32,
    /// Where the VM runs (see `agentos run --help`).
    #[arg(long, value_enum, default_value_t = CarrierChoice::Auto)]
    pub carrier: CarrierChoice,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct FilesBench {
    placement: &'static str,
    mib: u32,
    runs: u32,
    chunk_bytes: usize,
    /// MB/s of a file written into the agent.
    into_agent: Stats,
    /// MB/s of the file read out of the agent.
    out_of_agent: Stats,
    /// MB/s of the same bytes through a host Unix socket pair.
    unix_socket: Stats,
    /// unix socket / into the agent (medians): how many times slower the agent's path is.
    ratio_in: f64,
    /// unix socket / out of the agent (medians).
    ratio_out: f64,
}

pub fn run(args: &FilesBenchArgs) -> anyhow::Result<i32> {
    let placement = placement::decide(args.carrier)?;
    if placement == Placement::Carrier {
        return Ok(carrier::rerun_inside(Vec::new())?);
    }
    let data = pattern(args.mib as usize * 1024 * 1024);
    let options = super::agent_options(AgentRequest::default())?;
    eprintln!("agentos bench files: booting an agent");
    let vm = AgentVm::boot(&options).context("the agent did not boot")?;
    let measured = measure(&vm, &data, args.runs);
    vm.shutdown();
    let (into, out) = measured?;
    let socket = (0..args.runs)
        .map(|_| through_socket_pair(&data))
        .collect::<anyhow::Result<Vec<f64>>>()?;
    let (into, out, socket) = (rounded(&into), rounded(&out), rounded(&socket));
    let report = FilesBench {
        placement: placement.label(),
        mib: args.mib,
        runs: args.runs,
        chunk_bytes: FILE_CHUNK_BYTES,
        ratio_in: ratio(socket.median, into.median),
        ratio_out: ratio(socket.median, out.median),
        into_agent: into,
        out_of_agent: out,
        unix_socket: socket,
    };
    let mut stdout = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut stdout, &report)?;
        writeln!(stdout)?;
    } else {
        writeln!(
            stdout,
            "{} MiB: into the agent {:.1} MB/s, out of it {:.1} MB/s, unix socket pair {:.1} MB/s (ratios {:.1} in, {:.1} out)",
            report.mib,
            report.into_agent.median,
            report.out_of_agent.median,
            report.unix_socket.median,
            report.ratio_in,
            report.ratio_out
        )?;
    }
    Ok(0)
}

/// MB/s of each write into the agent and each read out of it.
fn measure(vm: &AgentVm, data: &[u8], runs: u32) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let (mut into, mut out) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        eprintln!("agentos bench files: run {run} of {runs}");
        let mut conn = connect_to_agent(&vm.guest_socket(), CONNECT_TIMEOUT)?;
        let started = Instant::now();
        let written = conn.write_file(GUEST_PATH, FileWrite::default(), &mut Cursor::new(data))?;
        into.push(mb_per_s(written, started.elapsed()));
        let started = Instant::now();
        let mut read = 0u64;
        conn.read_file(GUEST_PATH, &mut |chunk| {
            read += chunk.len() as u64;
            Ok(())
        })?;
        out.push(mb_per_s(read, started.elapsed()));
        anyhow::ensure!(
            written == data.len() as u64 && read == written,
            "wrote {written} and read {read} of {} bytes",
            data.len()
        );
        // Each run starts with no file: the guest's memory holds one copy at most.
        conn.fs(FsOp::Remove {
            path: GUEST_PATH.to_owned(),
        })?;
    }
    Ok((into, out))
}

/// `bytes` bytes that do not compress or repeat: a cheap generator, not the OS's entropy.
pub(super) fn pattern(bytes: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    (0..bytes)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// MB/s of `data` sent through a Unix socket pair in chunks of the file protocol's size.
pub(super) fn through_socket_pair(data: &[u8]) -> anyhow::Result<f64> {
    let (mut sender, mut receiver) = UnixStream::pair()?;
    let total = data.len();
    let started = Instant::now();
    let reader = thread::spawn(move || -> std::io::Result<usize> {
        let mut buf = vec![0u8; FILE_CHUNK_BYTES];
        let mut got = 0;
        while got < total {
            match receiver.read(&mut buf)? {
                0 => break,
                n => got += n,
            }
        }
        Ok(got)
    });
    for chunk in data.chunks(FILE_CHUNK_BYTES) {
        sender.write_all(chunk)?;
    }
    let got = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the socket reader failed"))??;
    anyhow::ensure!(
        got == total,
        "the socket pair carried {got} of {total} bytes"
    );
    Ok(mb_per_s(total as u64, started.elapsed()))
}

pub(super) fn mb_per_s(bytes: u64, took: Duration) -> f64 {
    round(bytes as f64 / 1e6 / took.as_secs_f64().max(1e-9), 1)
}

/// The median, min and max of `values`, to a tenth.
pub(super) fn rounded(values: &[f64]) -> Stats {
    let stats = Stats::of(values);
    Stats {
        median: round(stats.median, 1),
        min: round(stats.min, 1),
        max: round(stats.max, 1),
    }
}
