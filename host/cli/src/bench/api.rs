//! `agentos bench api`: E2B's API on the daemon, as E2B's SDKs use it over TCP: the time from
//! asking for a sandbox to its first command's first output, beside `agentos run` of the same
//! command (a process that boots an agent, runs it and stops it); and a file written into a
//! sandbox and read back through `/files`, beside the same bytes through a host Unix socket pair.

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use serde_json::json;

use super::files::{mb_per_s, pattern, rounded, through_socket_pair};
use super::{Stats, ratio, round};
use agentos::carrier;
use agentos::daemon::client::raw;
use agentos::placement::{self, CarrierChoice, Placement};

/// How long the daemon may take to listen.
const DAEMON_START: Duration = Duration::from_secs(60);
/// How long any one reply may take (a boot included).
const REPLY_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(clap::Args, Debug)]
pub struct ApiBenchArgs {
    /// Sandboxes created (and `agentos run`s) each, alternating.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub runs: u32,
    /// Size of the file, in MiB (the sandbox's memory holds it: its files live in RAM).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub mib: u32,
    /// Where the VMs run (see `agentos run --help`).
    #[arg(long, value_enum, default_value_t = CarrierChoice::Auto)]
    pub carrier: CarrierChoice,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct ApiBench {
    placement: &'static str,
    runs: u32,
    /// ms from `POST /v2/sandboxes` to the first output of a command started in the sandbox.
    e2b_create_to_first_output_ms: Stats,
    /// ms from starting `agentos run -- /bin/echo` to its first output.
    agentos_run_to_first_output_ms: Stats,
    /// E2B / `agentos run` (medians).
    ratio_create: f64,
    mib: u32,
    /// MB/s of a file written with `POST /files` (the body as is).
    e2b_upload: Stats,
    /// MB/s of the file read with `GET /files`.
    e2b_download: Stats,
    /// MB/s of the same bytes through a host Unix socket pair.
    unix_socket: Stats,
    /// unix socket / upload, unix socket / download (medians).
    ratio_in: f64,
    ratio_out: f64,
}

pub fn run(args: &ApiBenchArgs) -> anyhow::Result<i32> {
    let placement = placement::decide(args.carrier)?;
    if placement == Placement::Carrier {
        let cache = agentos_image::default_cache_dir();
        return Ok(carrier::rerun_inside(
            agentos_image::template::carrier_files(&cache),
        )?);
    }
    let work = tempdir()?;
    let daemon = Daemon::start(&work)?;
    let measured = measure(&daemon, args);
    drop(daemon);
    let _ = std::fs::remove_dir_all(&work);
    let (create, runs, upload, download) = measured?;
    let data_len = args.mib as usize * 1024 * 1024;
    let socket = (0..args.runs)
        .map(|_| through_socket_pair(&pattern(data_len)))
        .collect::<anyhow::Result<Vec<f64>>>()?;
    let (create, runs) = (rounded(&create), rounded(&runs));
    let (upload, download, socket) = (rounded(&upload), rounded(&download), rounded(&socket));
    let report = ApiBench {
        placement: placement.label(),
        runs: args.runs,
        ratio_create: ratio(create.median, runs.median),
        e2b_create_to_first_output_ms: create,
        agentos_run_to_first_output_ms: runs,
        mib: args.mib,
        ratio_in: ratio(socket.median, upload.median),
        ratio_out: ratio(socket.median, download.median),
        e2b_upload: upload,
        e2b_download: download,
        unix_socket: socket,
    };
    let mut stdout = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut stdout, &report)?;
        writeln!(stdout)?;
    } else {
        writeln!(
            stdout,
            "create to first output: E2B API {:.0} ms, agentos run {:.0} ms (ratio {:.2}); {} MiB through /files: in {:.1} MB/s, out {:.1} MB/s, unix socket pair {:.1} MB/s (ratios {:.1} in, {:.1} out)",
            report.e2b_create_to_first_output_ms.median,
            report.agentos_run_to_first_output_ms.median,
            report.ratio_create,
            report.mib,
            report.e2b_upload.median,
            report.e2b_download.median,
            report.unix_socket.median,
            report.ratio_in,
            report.ratio_out
        )?;
    }
    Ok(0)
}

type Measured = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);

fn measure(daemon: &Daemon, args: &ApiBenchArgs) -> anyhow::Result<Measured> {
    let (mut create, mut runs) = (Vec::new(), Vec::new());
    for run in 1..=args.runs {
        eprintln!("agentos bench api: start run {run} of {}", args.runs);
        let started = Instant::now();
        let sandbox = daemon.create()?;
        daemon.first_output(&sandbox)?;
        create.push(ms(started.elapsed()));
        daemon.kill(&sandbox)?;
        runs.push(ms(agentos_run_first_output()?));
    }
    let data = pattern(args.mib as usize * 1024 * 1024);
    let sandbox = daemon.create()?;
    let (mut upload, mut download) = (Vec::new(), Vec::new());
    for run in 1..=args.runs {
        eprintln!("agentos bench api: file run {run} of {}", args.runs);
        let started = Instant::now();
        daemon.upload(&sandbox, &data)?;
        upload.push(mb_per_s(data.len() as u64, started.elapsed()));
        let started = Instant::now();
        let back = daemon.download(&sandbox)?;
        download.push(mb_per_s(back.len() as u64, started.elapsed()));
        anyhow::ensure!(back == data, "the file came back different");
        // Each run starts with no file: the sandbox's memory holds one copy at most.
        daemon.remove(&sandbox)?;
    }
    daemon.kill(&sandbox)?;
    Ok((create, runs, upload, download))
}

fn ms(took: Duration) -> f64 {
    round(took.as_secs_f64() * 1000.0, 1)
}

/// How long `agentos run -- /bin/echo` takes to print.
fn agentos_run_first_output() -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut child = Command::new(std::env::current_exe()?)
        .args(["run", "--", "/bin/echo", "hi"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start `agentos run`")?;
    let mut first = [0u8; 1];
    let read = child.stdout.take().map(|mut out| out.read(&mut first));
    let took = started.elapsed();
    let status = child.wait()?;
    anyhow::ensure!(
        matches!(read, Some(Ok(1))) && status.success(),
        "`agentos run -- /bin/echo hi` failed ({status})"
    );
    Ok(took)
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("agentos-bench-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// A daemon serving TCP for the benchmark, stopped when dropped.
struct Daemon {
    child: Child,
    address: String,
    key: String,
}

/// A sandbox: its id and in-sandbox token.
struct Sandbox {
    id: String,
    token: String,
}

impl Daemon {
    fn start(work: &Path) -> anyhow::Result<Self> {
        let log = work.join("daemon.log");
        let child = Command::new(std::env::current_exe()?)
            .args(["daemon", "--listen", "127.0.0.1:0", "--socket"])
            .arg(work.join("api.sock"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("cannot start the daemon")?;
        let mut daemon = Self {
            child,
            address: String::new(),
            key: String::new(),
        };
        let deadline = Instant::now() + DAEMON_START;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains("listening on http://")) {
                let address = line
                    .split("http://")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next());
                let token = line
                    .split("(token in ")
                    .nth(1)
                    .and_then(|r| r.strip_suffix(')'))
                    .map(std::fs::read_to_string);
                if let (Some(address), Some(Ok(token))) = (address, token) {
                    daemon.address = address.to_owned();
                    daemon.key = token.trim().to_owned();
                    return Ok(daemon);
                }
            }
            if let Some(status) = daemon.child.try_wait()? {
                anyhow::bail!("the daemon ended ({status}):\n{text}");
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the daemon did not listen:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn send(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> anyhow::Result<TcpStream> {
        let mut stream = TcpStream::connect(&self.address)?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let mut head = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n",
            self.address,
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        // A refusal may come before the body is all sent: the reply says why.
        if let Err(e) = stream.write_all(body) {
            let reply = raw::read_reply(&mut BufReader::new(&stream))
                .map(|r| format!("{} {}", r.status, String::from_utf8_lossy(&r.body)))
                .unwrap_or_default();
            anyhow::bail!("{method} {target}: {e} {reply}");
        }
        Ok(stream)
    }

    fn call(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> anyhow::Result<raw::Reply> {
        let stream = self.send(method, target, headers, body)?;
        let reply = raw::read_reply(&mut BufReader::new(stream))?;
        anyhow::ensure!(
            (200..300).contains(&reply.status),
            "{method} {target}: {} {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        );
        Ok(reply)
    }

    fn create(&self) -> anyhow::Result<Sandbox> {
        // `base`, as E2B's SDKs ask by default.
        let body = json!({"templateID": "base"}).to_string();
        let reply = self.call(
            "POST",
            "/v2/sandboxes",
            &[
                ("X-API-KEY", &self.key),
                ("Content-Type", "application/json"),
            ],
            body.as_bytes(),
        )?;
        let created = reply.json();
        Ok(Sandbox {
            id: created["sandboxID"]
                .as_str()
                .context("no sandboxID")?
                .to_owned(),
            token: created["envdAccessToken"]
                .as_str()
                .context("no envdAccessToken")?
                .to_owned(),
        })
    }

    fn kill(&self, sandbox: &Sandbox) -> anyhow::Result<()> {
        self.call(
            "DELETE",
            &format!("/sandboxes/{}", sandbox.id),
            &[("X-API-KEY", &self.key)],
            b"",
        )?;
        Ok(())
    }

    fn in_sandbox<'a>(
        &self,
        sandbox: &'a Sandbox,
        extra: &[(&'a str, &'a str)],
    ) -> Vec<(&'a str, &'a str)> {
        let mut headers = vec![
            ("E2b-Sandbox-Id", sandbox.id.as_str()),
            ("X-Access-Token", sandbox.token.as_str()),
        ];
        headers.extend_from_slice(extra);
        headers
    }

    /// Starts `/bin/echo` as E2B's `commands.run` does and waits for its first output.
    fn first_output(&self, sandbox: &Sandbox) -> anyhow::Result<()> {
        let message =
            json!({"process": {"cmd": "/bin/echo", "args": ["hi"]}, "stdin": false}).to_string();
        let mut body = vec![0];
        body.extend_from_slice(&(message.len() as u32).to_be_bytes());
        body.extend_from_slice(message.as_bytes());
        let headers = self.in_sandbox(
            sandbox,
            &[
                ("Content-Type", "application/connect+json"),
                ("Connect-Timeout-Ms", "60000"),
            ],
        );
        let mut stream = self.send("POST", "/process.Process/Start", &headers, &body)?;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("{\"event\":{\"data\"") {
            let n = stream.read(&mut buf)?;
            anyhow::ensure!(
                n > 0,
                "the command's stream ended without output: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
        Ok(())
    }

    fn upload(&self, sandbox: &Sandbox, data: &[u8]) -> anyhow::Result<()> {
        let headers = self.in_sandbox(sandbox, &[("Content-Type", "application/octet-stream")]);
        self.call("POST", "/files?path=bench.bin", &headers, data)?;
        Ok(())
    }

    fn remove(&self, sandbox: &Sandbox) -> anyhow::Result<()> {
        let headers = self.in_sandbox(sandbox, &[("Content-Type", "application/json")]);
        let body = json!({"path": "bench.bin"}).to_string();
        self.call(
            "POST",
            "/filesystem.Filesystem/Remove",
            &headers,
            body.as_bytes(),
        )?;
        Ok(())
    }

    fn download(&self, sandbox: &Sandbox) -> anyhow::Result<Vec<u8>> {
        Ok(self
            .call(
                "GET",
                "/files?path=bench.bin",
                &self.in_sandbox(sandbox, &[]),
                b"",
            )?
            .body)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
