//! `agentos-eval-probe`: the guest side of `agentos eval`'s vsock cases. `agentos eval` copies it
//! into the VMs it attacks from (with an extra initramfs) at `/eval/probe`; the case scripts
//! run it. It speaks raw AF_VSOCK, which the guest's busybox cannot, and prints one line per
//! attempt so that the host can check what the boundary did.
//!
//! ```text
//! probe connect CID PORT...      try to open each port; prints `cid C port P: connected|refused (...)`
//! probe frames PORT              malformed and oversized frames, one connection each
//! probe flood PORT SECONDS       open connections and write as fast as possible
//! probe churn PORT SECONDS       open and close connections as fast as possible, writing nothing
//! probe descriptors BASE         malformed descriptor chains to the virtio-mmio device at BASE
//! probe rst-storm BASE PORT SECONDS
//!                                connection requests and resets to PORT through the device at
//!                                BASE, with no receive buffers
//! probe agent PORT malformed     a lying guest agent: a proper hello, then malformed answers
//! probe agent PORT flood SECONDS a lying guest agent that answers with output without end
//! probe range CID FIRST LAST STEP  every STEP-th port from FIRST to LAST; a summary line
//! probe sockets                  raw and packet sockets: every interface, every frame seen
//! ```

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// The host, as a guest addresses it.
const HOST_CID: u32 = 2;
/// How long the probe waits for the host to answer or close a connection.
const ANSWER_WAIT: Duration = Duration::from_secs(10);
/// One write of the flood.
const FLOOD_CHUNK_BYTES: usize = 64 * 1024;
/// Declared length of the oversized frame: twice the protocol's 1 MiB limit.
const OVERSIZED_FRAME_BYTES: u32 = 2 << 20;

mod agent;
mod escape;
mod virtq;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match args.first().map(String::as_str) {
        Some("connect") => connect_command(&args[1..]),
        Some("frames") => frames_command(&args[1..]),
        Some("flood") => flood_command(&args[1..]),
        Some("churn") => churn_command(&args[1..]),
        Some("descriptors") => virtq::descriptors_command(&args[1..]),
        Some("rst-storm") => virtq::rst_storm_command(&args[1..]),
        Some("agent") => agent::agent_command(&args[1..]),
        Some("range") => escape::range_command(&args[1..]),
        Some("sockets") => escape::sockets_command(),
        _ => Err(
            "usage: probe connect CID PORT... | frames PORT | flood PORT SECONDS | churn PORT SECONDS | descriptors BASE | rst-storm BASE PORT SECONDS | agent PORT MODE | range CID FIRST LAST STEP | sockets"
                .into(),
        ),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("probe: {why}");
            ExitCode::FAILURE
        }
    }
}

fn number(arg: Option<&String>, what: &str) -> Result<u32, String> {
    arg.and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("{what} must be a number"))
}

/// A connected vsock stream to `cid`:`port`.
fn connect(cid: u32, port: u32) -> io::Result<UnixStream> {
    // SAFETY: socket(2) takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket(2) just returned this descriptor and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = libc::sockaddr_vm {
        svm_family: libc::AF_VSOCK as libc::sa_family_t,
        svm_reserved1: 0,
        svm_port: port,
        svm_cid: cid,
        svm_zero: [0; 4],
    };
    let len = size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `addr` is a live sockaddr_vm and `len` is its size.
    let rc = unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // A stream socket: std's Unix stream gives it read/write and timeouts, which is all we use.
    Ok(UnixStream::from(fd))
}

fn connect_command(args: &[String]) -> Result<(), String> {
    let cid = number(args.first(), "CID")?;
    if args.len() < 2 {
        return Err("connect needs at least one PORT".into());
    }
    for port in &args[1..] {
        let port = number(Some(port), "PORT")?;
        match connect(cid, port) {
            Ok(_) => println!("cid {cid} port {port}: connected"),
            Err(e) => println!("cid {cid} port {port}: refused ({e})"),
        }
    }
    Ok(())
}

/// What the host did with a connection after we wrote `bytes` to it.
fn send_and_watch(port: u32, what: &str, bytes: &[u8]) -> Result<(), String> {
    let mut stream = connect(HOST_CID, port).map_err(|e| format!("cannot connect: {e}"))?;
    stream
        .set_read_timeout(Some(ANSWER_WAIT))
        .map_err(|e| e.to_string())?;
    let written = stream.write_all(bytes);
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    let ending = loop {
        match stream.read(&mut buf) {
            Ok(0) => break "closed by the host".to_string(),
            Ok(n) => reply.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                break format!("still open after {} s", ANSWER_WAIT.as_secs());
            }
            Err(e) => break format!("ended: {e}"),
        }
    };
    let reply = String::from_utf8_lossy(reply.get(4..).unwrap_or_default());
    let reply: String = reply.chars().take(160).collect();
    let written = match written {
        Ok(()) => "written".to_string(),
        Err(e) => format!("write failed ({e})"),
    };
    println!("frame {what}: {written}; {ending}; reply {reply:?}");
    Ok(())
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

fn frames_command(args: &[String]) -> Result<(), String> {
    let port = number(args.first(), "PORT")?;
    let mut oversized = OVERSIZED_FRAME_BYTES.to_be_bytes().to_vec();
    oversized.extend(std::iter::repeat_n(b'x', 64 * 1024));
    let garbage: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let cases: [(&str, Vec<u8>); 6] = [
        ("length-4GiB", u32::MAX.to_be_bytes().to_vec()),
        ("oversized-2MiB", oversized),
        ("not-json", frame(b"this is not json")),
        ("unknown-op", frame(br#"{"op":"become_root","as":"host"}"#)),
        ("truncated", {
            let mut f = 100u32.to_be_bytes().to_vec();
            f.extend_from_slice(b"{\"op\":");
            f
        }),
        ("random-bytes", garbage),
    ];
    for (what, bytes) in &cases {
        send_and_watch(port, what, bytes)?;
    }
    Ok(())
}

fn flood_command(args: &[String]) -> Result<(), String> {
    let port = number(args.first(), "PORT")?;
    let secs = number(args.get(1), "SECONDS")?;
    let end = Instant::now() + Duration::from_secs(u64::from(secs));
    let chunk = vec![0xa5u8; FLOOD_CHUNK_BYTES];
    let (mut opened, mut refused, mut bytes) = (0u64, 0u64, 0u64);
    while Instant::now() < end {
        match connect(HOST_CID, port) {
            Ok(mut stream) => {
                opened += 1;
                let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
                for _ in 0..16 {
                    match stream.write(&chunk) {
                        Ok(n) => bytes += n as u64,
                        Err(_) => break,
                    }
                }
            }
            Err(_) => refused += 1,
        }
    }
    println!("flood port {port}: {opened} connections, {refused} refused, {bytes} bytes written");
    Ok(())
}

/// Opens and closes connections to host `PORT` as fast as possible for `SECONDS`, writing
/// nothing: each one costs the host whatever it spends on a connection.
fn churn_command(args: &[String]) -> Result<(), String> {
    let port = number(args.first(), "PORT")?;
    let secs = number(args.get(1), "SECONDS")?;
    let end = Instant::now() + Duration::from_secs(u64::from(secs));
    let (mut opened, mut refused) = (0u64, 0u64);
    while Instant::now() < end {
        match connect(HOST_CID, port) {
            Ok(stream) => {
                opened += 1;
                drop(stream);
            }
            Err(_) => refused += 1,
        }
    }
    println!("churn port {port}: {opened} connections, {refused} refused in {secs} s");
    Ok(())
}
