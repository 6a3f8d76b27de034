//! `agentos daemon` started on the host serves its API there (the socket and `--listen`), also
//! where its agents run in a carrier (then the daemon runs in that carrier and this one relays).

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use agentos::daemon::client::raw::{self, Reply};
use sha2::{Digest, Sha256};

/// How long the daemon may take to listen: a carrier boots in 20 to 40 s, more on a busy host.
const LISTEN_LIMIT: Duration = Duration::from_secs(300);
/// How long one client command may take.
const COMMAND_LIMIT: Duration = Duration::from_secs(300);
/// How long the daemon may take to stop once told.
const STOP_LIMIT: Duration = Duration::from_secs(60);
/// The file moved in and out of the agent.
const FILE_BYTES: usize = 4 << 20;

/// The agentos binary under test: `$AGENTOS_BIN`, or the workspace's release build.
fn agentos_bin() -> PathBuf {
    match std::env::var_os("AGENTOS_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/agentos"),
    }
}

/// A daemon started for a test, with a scratch directory of its own (its socket, token, log,
/// and the run directories of its VMs or carrier); killed if the test fails before stopping it.
struct Daemon {
    dir: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    child: Child,
}

impl Daemon {
    fn start(listen: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("agentos-host-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("daemon.sock");
        let log = dir.join("daemon.log");
        let child = Command::new(agentos_bin())
            .env("AGENTOS_RUN_DIR", dir.join("run"))
            .env_remove("AGENTOS_API_TOKEN")
            .args(["daemon", "--listen", listen, "--socket"])
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("cannot start the daemon");
        Self {
            dir,
            socket,
            log,
            child,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the line that says the daemon serves its socket.
    fn wait_until_listening(&mut self) -> Duration {
        let started = Instant::now();
        let line = format!(
            "agentos daemon: listening on {} (pid ",
            self.socket.display()
        );
        while !self.log().contains(&line) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "the daemon ended ({status}) before it listened:\n{}",
                    self.log()
                );
            }
            assert!(
                started.elapsed() < LISTEN_LIMIT,
                "the daemon did not listen within {} s:\n{}",
                LISTEN_LIMIT.as_secs(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        started.elapsed()
    }

    /// `agentos ARGS...` against this daemon, to its end.
    fn cli(&self, args: &[&str]) -> Output {
        let mut child = Command::new(agentos_bin())
            .env("AGENTOS_SOCKET", &self.socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start agentos");
        let deadline = Instant::now() + COMMAND_LIMIT;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!("`agentos {}` did not end:\n{}", args.join(" "), self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    }

    /// One request on the socket, its whole answer.
    fn call(&self, method: &str, target: &str, body: &str) -> Reply {
        let mut stream = UnixStream::connect(&self.socket).unwrap();
        stream.set_read_timeout(Some(COMMAND_LIMIT)).unwrap();
        stream
            .write_all(&raw::request(method, target, body.as_bytes(), None))
            .unwrap();
        raw::read_reply(&mut BufReader::new(stream)).unwrap()
    }

    /// Processes whose command line names this test's run directory: the VMMs, or the carrier.
    fn processes(&self) -> Vec<String> {
        let marker = self.dir.join("run").display().to_string();
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(&marker))
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// A request over TCP with `Authorization: Bearer TOKEN` when given.
fn tcp_call(address: &str, target: &str, token: Option<&str>) -> Reply {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(COMMAND_LIMIT)).unwrap();
    let authorization = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {target} HTTP/1.1\r\nHost: agentos\r\n{authorization}Content-Length: 0\r\n\r\n"
    )
    .unwrap();
    raw::read_reply(&mut BufReader::new(stream)).unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn a_daemon_started_on_the_host_serves_agents_on_its_socket_and_port_and_leaves_nothing() {
    if !Path::new("/dev/kvm").exists() && !agentos_core::testing::skip("no /dev/kvm") {
        return;
    }
    let started = Instant::now();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut daemon = Daemon::start(&listen);
    let up = daemon.wait_until_listening();
    let mode = std::fs::metadata(&daemon.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the socket is its user's only");

    // Spawned over HTTP, answered once it is up.
    let spawned = daemon.call("POST", "/agents", r#"{"name":"h1","wait":true}"#);
    assert_eq!(spawned.kind(), "ok", "{spawned:?}\n{}", daemon.log());
    assert_eq!(spawned.json()["state"], "running", "{spawned:?}");

    let out = daemon.cli(&["exec", "h1", "--", "/bin/echo", "hi"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(text(&out.stdout), "hi\n");

    // The program's output streams as NDJSON, one event a line.
    let run = daemon.call(
        "POST",
        "/agents/h1/processes",
        r#"{"run":{"program":"/bin/echo","args":["hi"]}}"#,
    );
    assert_eq!(run.kind(), "ok", "{run:?}");
    let events: Vec<serde_json::Value> = text(&run.body)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert!(events.iter().any(|e| e["stdout"] == "aGkK"), "{events:?}");
    assert_eq!(events.last().unwrap()["exited"]["code"], 0, "{events:?}");

    // A file of a few MiB in and out, the same bytes.
    let data: Vec<u8> = (0..FILE_BYTES).map(|i| (i * 7 % 251) as u8).collect();
    let local = daemon.dir.join("data.bin");
    std::fs::write(&local, &data).unwrap();
    let out = daemon.cli(&["cp", &local.display().to_string(), "h1:/tmp/data.bin"]);
    assert!(out.status.success(), "{}", describe(&out));
    let back = daemon.dir.join("back.bin");
    let out = daemon.cli(&["cp", "h1:/tmp/data.bin", &back.display().to_string()]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(sha256(&std::fs::read(&back).unwrap()), sha256(&data));

    // TCP: the token, or nothing.
    let refused = tcp_call(&listen, "/version", None);
    assert_eq!(refused.status, 401, "{refused:?}");
    assert_eq!(refused.kind(), "unauthorized");
    let token_file = daemon.socket.with_extension("token");
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert!(
        daemon.log().contains(&token_file.display().to_string()),
        "the token's file is named:\n{}",
        daemon.log()
    );
    let version = tcp_call(&listen, "/version", Some(token.trim()));
    assert_eq!(version.status, 200, "{version:?}");
    let agents = tcp_call(&listen, "/agents", Some(token.trim()));
    assert!(text(&agents.body).contains("\"h1\""), "{agents:?}");

    assert!(!daemon.processes().is_empty(), "no VM or carrier ran here");
    // SAFETY: kill has no memory-safety preconditions; the child is ours and not yet waited for.
    unsafe { libc::kill(daemon.child.id() as libc::pid_t, libc::SIGTERM) };
    let stopping = Instant::now();
    let status = loop {
        if let Some(status) = daemon.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            stopping.elapsed() < STOP_LIMIT,
            "the daemon did not stop within {} s:\n{}",
            STOP_LIMIT.as_secs(),
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}:\n{}", daemon.log());
    assert!(!daemon.socket.exists(), "the socket is removed");
    assert!(!token_file.exists(), "the token's file is removed");
    let left = daemon.processes();
    assert!(left.is_empty(), "left running: {left:?}");
    eprintln!(
        "listening after {:.1} s, everything done after {:.1} s",
        up.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
