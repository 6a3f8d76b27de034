//! `agentos daemon` and its clients: long-lived agents in their own microVMs, watched (a crash
//! and a hang are both noticed and healed by a restart), and an API that answers bad requests
//! with clear errors and carries on.

use agentos::daemon::client::raw;
use agentos_core::agent::vm::connect_through_vmm;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{Scratch, describe, take_machine, text, vm_available};

const HANG_TIMEOUT_S: &str = "10";

pub(crate) struct Daemon<'a> {
    t: &'a Scratch,
    socket: PathBuf,
    child: Child,
    log: PathBuf,
}

impl<'a> Daemon<'a> {
    pub(crate) fn start(t: &'a Scratch) -> Self {
        Self::start_with(t, &[])
    }

    pub(crate) fn start_with(t: &'a Scratch, extra: &[&str]) -> Self {
        let socket = t.dir.join("daemon.sock");
        let log = t.dir.join("daemon.log");
        let child = t
            .agentos()
            .args(["daemon", "--hang-timeout", HANG_TIMEOUT_S])
            .args(extra)
            .arg("--socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("cannot start the daemon");
        let mut daemon = Self {
            t,
            socket,
            child,
            log,
        };
        daemon.wait_until(Duration::from_secs(30), "the daemon to listen", |d| {
            UnixStream::connect(&d.socket).is_ok()
        });
        daemon
    }

    pub(crate) fn cli(&self, args: &[&str]) -> Output {
        let mut cmd: Command = self.t.agentos();
        cmd.args(args)
            .env("AGENTOS_SOCKET", &self.socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().expect("cannot start agentos");
        self.t.finish(child, crate::common::command_limit())
    }

    pub(crate) fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "agentos {args:?}: {}\n--- daemon ---\n{}",
            describe(&out),
            self.log_text()
        );
        text(&out.stdout)
    }

    /// A command that must fail with one line on stderr containing `why`.
    pub(crate) fn refused(&self, args: &[&str], why: &str) {
        let out = self.cli(args);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "agentos {args:?} succeeded");
        assert_eq!(stderr.lines().count(), 1, "{}", describe(&out));
        assert!(stderr.contains(why), "{}", describe(&out));
    }

    pub(crate) fn agent(&self, name: &str) -> serde_json::Value {
        let ps: serde_json::Value = serde_json::from_str(&self.ok(&["ps", "--json"])).unwrap();
        ps["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no agent {name} in {ps}"))
    }

    fn wait_until(&mut self, limit: Duration, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + limit;
        while !done(self) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the daemon ended ({status}) waiting for {what}:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "waited {} s for {what}:\n{}",
                limit.as_secs(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Where a daemon started with `--listen` serves TCP, and its token (from the file it named,
    /// which only its user reads).
    pub(crate) fn tcp_site(&self) -> (String, String) {
        let log = self.log_text();
        let line = log
            .lines()
            .find(|l| l.contains("listening on http://"))
            .unwrap_or_else(|| panic!("no TCP address in the daemon's log:\n{log}"));
        let address = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap();
        let token_file = line
            .split("(token in ")
            .nth(1)
            .and_then(|rest| rest.strip_suffix(')'))
            .unwrap_or_else(|| panic!("no token file in {line}"));
        assert_eq!(mode_of(Path::new(token_file)), 0o600);
        let token = std::fs::read_to_string(token_file).unwrap();
        let token = token.trim();
        assert_eq!(token.len(), 64, "{token}");
        (address.to_owned(), token.to_owned())
    }

    /// Sends `signal` and waits for the daemon to exit.
    pub(crate) fn signal_and_wait(mut self, signal: i32) -> std::process::ExitStatus {
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not exit:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// One raw HTTP request (`body` as is, its length declared as `length` unless that is the
/// body's) and the reply, if the daemon sent one.
fn raw_call(
    socket: &Path,
    method: &str,
    target: &str,
    body: &[u8],
    length: Option<u64>,
) -> Option<raw::Reply> {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let _ = stream.write_all(&raw::request(method, target, body, length));
    raw::read_reply(&mut std::io::BufReader::new(stream)).ok()
}

/// A request and its reply's body (`{"error": ...}` for an error).
fn json_call(socket: &Path, method: &str, target: &str, body: &str) -> serde_json::Value {
    raw_call(socket, method, target, body.as_bytes(), None)
        .expect("no reply")
        .json()
}

/// The permission bits of `path`.
fn mode_of(path: &Path) -> u32 {
    let metadata = std::fs::metadata(path).unwrap();
    std::os::unix::fs::PermissionsExt::mode(&metadata.permissions()) & 0o777
}

/// The API on TCP (`--listen`): the daemon says where, and where its generated token is (a file
/// only its user reads); a request without the token, or with another, is `unauthorized`.
fn over_tcp_with_the_token_only(d: &Daemon<'_>) {
    let (address, token) = d.tcp_site();
    let address = address.as_str();
    let token = token.as_str();
    let ask = |authorization: &str| {
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let head = format!("GET /agents HTTP/1.1\r\nHost: a\r\n{authorization}\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        raw::read_reply(&mut std::io::BufReader::new(stream)).unwrap()
    };
    for wrong in ["", "Authorization: Bearer nope\r\n"] {
        let reply = ask(wrong);
        assert_eq!((reply.status, reply.kind().as_str()), (401, "unauthorized"));
    }
    let reply = ask(&format!("Authorization: Bearer {token}\r\n"));
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(reply.json()["agents"].is_array(), "{reply:?}");
}

/// The process that runs agent `name`'s guest: the child of the VMM the daemon started, when
/// the VMM is jailed in its own PID namespace.
fn vmm_of(d: &Daemon<'_>, name: &str) -> u64 {
    let pid = d.agent(name)["vmm_pid"].as_u64().unwrap();
    u64::from(crate::common::guest_runner(pid as u32))
}

fn alive(pid: u64) -> bool {
    // Zombies are gone as far as a VM goes.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

#[test]
fn the_daemon_keeps_agents_running_through_crashes_and_hangs_and_answers_bad_requests() {
    if !vm_available() {
        return;
    }
    let _machine = take_machine();
    let t = Scratch::new("daemon");
    let mut d = Daemon::start_with(&t, &["--listen", "127.0.0.1:0"]);
    assert_eq!(mode_of(&d.socket), 0o600);
    over_tcp_with_the_token_only(&d);

    // Bad requests get an error each, and the daemon carries on.
    let bad = json_call(&d.socket, "POST", "/agents", "{not json");
    assert_eq!(bad["error"]["kind"], "bad_request", "{bad}");
    let unknown = json_call(&d.socket, "POST", "/agents/a/launch", "{}");
    assert_eq!(unknown["error"]["kind"], "not_found", "{unknown}");
    let too_large = raw_call(&d.socket, "POST", "/agents", b"{}", Some(64 << 20))
        .expect("no reply to a large body");
    assert_eq!(
        (too_large.status, too_large.kind().as_str()),
        (413, "too_large")
    );
    let nobody = json_call(
        &d.socket,
        "POST",
        "/agents/nobody/exec",
        r#"{"run":{"program":"/bin/true"}}"#,
    );
    assert_eq!(nobody["error"]["kind"], "unknown_agent", "{nobody}");
    let traversal = json_call(&d.socket, "POST", "/agents", r#"{"name":"../../etc"}"#);
    assert_eq!(traversal["error"]["kind"], "invalid", "{traversal}");
    // The models the daemon's agents may carry, as `agentos model ls` lists them.
    let models = json_call(&d.socket, "GET", "/models", "");
    assert!(
        models["models"].as_array().is_some_and(|m| m
            .iter()
            .any(|m| m["name"] == "sentiment" && m["tasks"].is_array())),
        "{models}"
    );
    d.refused(&["logs", "nobody"], "no agent named `nobody`");

    // An agent with a model: exec and infer through the daemon.
    let up = d.ok(&["spawn", "--name", "w", "--model", "sentiment", "--json"]);
    let up: serde_json::Value = serde_json::from_str(&up).unwrap();
    assert_eq!(up["state"], "running", "{up}");
    let one = json_call(&d.socket, "GET", "/agents/w", "");
    assert_eq!(
        (one["name"].as_str(), one["state"].as_str()),
        (Some("w"), Some("running")),
        "{one}"
    );
    d.refused(
        &["spawn", "--name", "w"],
        "an agent named `w` exists already",
    );
    let out = d.cli(&[
        "exec",
        "w",
        "--",
        "/bin/sh",
        "-c",
        "echo hi; echo oops >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert_eq!(text(&out.stdout), "hi\n");
    assert_eq!(text(&out.stderr), "oops\n");
    let sentiment = d.ok(&[
        "infer",
        "w",
        "--task",
        "classify",
        "--input",
        "I love this, it works perfectly",
    ]);
    assert!(sentiment.starts_with("positive\t0."), "{sentiment}");
    // The model came on two read-only pmem regions, the runtime's and the bundle's, whose
    // pages the guest maps in place.
    let mounts = d.ok(&["exec", "w", "--", "/bin/cat", "/proc/mounts"]);
    for (expected, device) in [
        ("/dev/pmem0 /opt/agentos erofs ro,", "pmem0"),
        (
            "/dev/pmem1 /opt/agentos/models/sentiment erofs ro,",
            "pmem1",
        ),
    ] {
        let line = mounts
            .lines()
            .find(|l| l.starts_with(expected))
            .unwrap_or_else(|| panic!("no `{expected}` in:\n{mounts}"));
        assert!(
            line.contains(",dax=always"),
            "{device} is not mapped in place: {line}"
        );
    }
    let kernel = d.ok(&["exec", "w", "--", "/bin/dmesg"]);
    assert!(kernel.contains("erofs: DAX enabled"), "{kernel}");
    // Every file on them is mapped in place, not only the mount: the worker that ran the model
    // maps its weights file, and neither they (22 MB) nor ONNX Runtime (26 MB) went into the
    // guest's page cache, which holds only the guest's RAM file systems (shared memory).
    let maps = d.ok(&[
        "exec",
        "w",
        "--",
        "/bin/sh",
        "-c",
        "cat /proc/$(pidof agentos-infer)/maps",
    ]);
    assert!(
        maps.contains("/opt/agentos/models/sentiment/model.onnx.data"),
        "the worker does not map the model's weights:\n{maps}"
    );
    let meminfo = d.ok(&["exec", "w", "--", "/bin/cat", "/proc/meminfo"]);
    let kib = |field: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|l| {
                l.strip_prefix(field)?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no {field} in:\n{meminfo}"))
    };
    let file_cache_kib = kib("Cached:").saturating_sub(kib("Shmem:"));
    assert!(
        file_cache_kib < 8 * 1024,
        "the guest copied {file_cache_kib} KiB of files into its page cache:\n{meminfo}"
    );
    let write = d.cli(&[
        "exec",
        "w",
        "--",
        "/bin/sh",
        "-c",
        "echo x > /opt/agentos/models/sentiment/model.onnx",
    ]);
    assert_ne!(write.status.code(), Some(0), "{}", describe(&write));
    assert!(
        text(&write.stderr).contains("Read-only file system"),
        "{}",
        describe(&write)
    );
    // Under the file system, the guest writes its region's first page and reads it back once its
    // caches are dropped: the region is the host's page cache, mapped read-only, so the write
    // went nowhere.
    let page = "dd if=/dev/pmem1 bs=4096 count=1 2>/dev/null | sha256sum";
    let overwrite = format!(
        "{page}; dd if=/dev/zero of=/dev/pmem1 bs=4096 count=1 2>/dev/null; sync; \
         echo 3 > /proc/sys/vm/drop_caches; {page}"
    );
    let sums = d.ok(&["exec", "w", "--", "/bin/sh", "-c", &overwrite]);
    let sums: Vec<&str> = sums.lines().collect();
    assert_eq!(sums.len(), 2, "{sums:?}");
    assert_eq!(sums[0], sums[1], "the guest changed its model region");
    assert!(!sums[0].starts_with(ZERO_PAGE_SHA256), "{sums:?}");

    // A crash (the process running the guest killed) is seen and healed.
    let first = vmm_of(&d, "w");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(first as i32, libc::SIGKILL) };
    d.wait_until(Duration::from_secs(300), "a restart after the crash", |d| {
        let a = d.agent("w");
        a["restarts"] == 1 && a["state"] == "running"
    });
    let second = vmm_of(&d, "w");
    assert_ne!(first, second);

    // A hang (the process running the guest stopped: no answer to pings) is seen, its VM killed,
    // and healed.
    // SAFETY: as above.
    unsafe { libc::kill(second as i32, libc::SIGSTOP) };
    d.wait_until(Duration::from_secs(300), "a restart after the hang", |d| {
        let a = d.agent("w");
        a["restarts"] == 2 && a["state"] == "running"
    });
    assert!(!alive(second), "the hung VMM {second} was left running");
    let logs = d.ok(&["logs", "w"]);
    assert!(
        logs.contains("] ended: crashed") || logs.contains("] ended: "),
        "{logs}"
    );
    assert!(
        logs.contains("hung: the guest agent did not answer a ping"),
        "{logs}"
    );
    assert_eq!(logs.matches("] up, booted in").count(), 3, "{logs}");
    let metrics = d.ok(&["metrics"]);
    for line in [
        "agentos_agent_restarts_total{agent=\"w\"} 2",
        "agentos_agent_state{agent=\"w\",state=\"running\"} 1",
        "agentos_api_errors_total{kind=\"unknown_agent\"} 2",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line} in\n{metrics}"
        );
    }
    assert!(
        metrics.contains("agentos_agent_cpu_seconds_total{agent=\"w\"} "),
        "{metrics}"
    );

    // Stop and remove.
    d.refused(&["rm", "w"], "`agentos stop w` first");
    assert_eq!(d.ok(&["stop", "w"]), "w: stopped\n");
    d.refused(&["exec", "w", "--", "/bin/true"], "agent `w` is stopped");
    d.ok(&["rm", "w"]);
    assert_eq!(d.ok(&["ps", "--json"]), "{\"agents\":[],\"pools\":[]}\n");

    // A daemon killed outright takes its VMs with it; the next one cleans up after it.
    d.ok(&["spawn", "--name", "x", "--restart", "never"]);
    let orphan = d.agent("x")["vmm_pid"].as_u64().unwrap();
    d.signal_and_wait(libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(orphan) {
        assert!(
            Instant::now() < deadline,
            "VMM {orphan} outlived its daemon"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let d = Daemon::start(&t);
    assert_eq!(d.ok(&["ps", "--json"]), "{\"agents\":[],\"pools\":[]}\n");
    // The killed daemon's token went with its socket.
    assert!(
        !t.dir.join("daemon.token").exists(),
        "a stale token was left"
    );

    // Stopping the daemon stops its agents and leaves nothing behind.
    d.ok(&["spawn", "--name", "y"]);
    let status = d.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "the daemon exited with {status}");
    assert!(!t.dir.join("daemon.sock").exists(), "the socket was left");
    t.assert_nothing_left();
}

/// Two replicas of `w` behind the group's input; each says which it is.
const POOL: &str = r#"name = "pool"
channels = ["input -> w", "w -> output"]

[[agent]]
name = "w"
count = 2
exec = ["/bin/sh", "-c", 'echo "handled: $(cat)"']
"#;

#[test]
fn a_group_runs_under_the_daemon_with_replicas_that_share_the_work() {
    if !vm_available() {
        return;
    }
    let _machine = take_machine();
    let t = Scratch::new("daemon-group");
    let mut d = Daemon::start(&t);
    let file = t.dir.join("pool.toml");
    std::fs::write(&file, POOL).unwrap();
    let file = file.to_str().unwrap();
    let input = t.dir.join("input.txt");
    std::fs::write(&input, "job\n").unwrap();
    let input = input.to_str().unwrap();

    let up = d.ok(&["group", "up", file]);
    assert!(up.starts_with("group pool: 2 agents"), "{up}");
    for member in ["pool/w-1", "pool/w-2"] {
        assert_eq!(d.agent(member)["state"], "running");
    }
    d.refused(&["group", "up", file], "group `pool` is up already");
    d.refused(&["stop", "pool/w-1"], "belongs to group `pool`");

    // Two inputs: the idle replicas take one each.
    let mut froms = Vec::new();
    for _ in 0..2 {
        let out = d.ok(&["group", "run", file, "--input", input]);
        assert!(out.contains("\nhandled: job\n"), "{out}");
        let from = out
            .lines()
            .find_map(|l| l.strip_prefix("== text (from "))
            .unwrap_or_else(|| panic!("no result in {out}"));
        froms.push(from.trim_end_matches(')').to_owned());
    }
    froms.sort();
    assert_eq!(froms, ["w-1", "w-2"]);

    // A replica that crashes is booted again and joins the group again.
    let pid = vmm_of(&d, "pool/w-1");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    d.wait_until(Duration::from_secs(300), "the replica's restart", |d| {
        let a = d.agent("pool/w-1");
        a["restarts"] == 1 && a["state"] == "running"
    });
    for _ in 0..2 {
        let out = d.ok(&["group", "run", file, "--input", input, "--json"]);
        let report: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(report["results"][0]["body"], "handled: job", "{report}");
        let events = report["trace"].as_array().unwrap();
        assert!(
            events.iter().any(|e| e["event"] == "result"),
            "no result in this input's trace: {report}"
        );
    }

    let down = d.ok(&["group", "down", "pool"]);
    assert_eq!(down, "group pool: 2 agents stopped\n");
    assert_eq!(d.ok(&["ps", "--json"]), "{\"agents\":[],\"pools\":[]}\n");
    d.refused(&["group", "down", "pool"], "no group `pool` is up");
    let status = d.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "the daemon exited with {status}");
    t.assert_nothing_left();
}

#[test]
fn batch_agents_pause_while_an_interactive_agent_works() {
    if !vm_available() {
        return;
    }
    let _machine = take_machine();
    let t = Scratch::new("daemon-classes");
    let mut d = Daemon::start(&t);
    d.ok(&["spawn", "--name", "bg", "--class", "batch"]);
    d.ok(&["spawn", "--name", "fg", "--class", "interactive"]);
    // Admission: more memory than the host has room for is refused, and the name stays free.
    d.refused(
        &["spawn", "--name", "big", "--memory", "65536"],
        "not enough memory for this agent",
    );
    assert_eq!(
        json_call(&d.socket, "GET", "/agents/big/logs", "")["error"]["kind"],
        "unknown_agent"
    );
    let with_socket = |args: &[&str]| {
        let mut cmd = t.agentos();
        cmd.args(args)
            .env("AGENTOS_SOCKET", &d.socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn().unwrap()
    };
    // The batch agent burns CPU until it is stopped.
    let burner = with_socket(&["exec", "bg", "--", "/bin/sh", "-c", "while :; do :; done"]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        d.agent("bg")["paused"],
        false,
        "paused with nothing interactive running"
    );

    // While the interactive agent works, the batch one is frozen; then it runs again.
    let work = with_socket(&[
        "exec",
        "fg",
        "--",
        "/bin/sh",
        "-c",
        "end=$(( $(date +%s) + 8 )); while [ $(date +%s) -lt $end ]; do :; done; echo done",
    ]);
    d.wait_until(Duration::from_secs(120), "the batch agent's pause", |d| {
        d.agent("bg")["paused"] == true
    });
    let out = t.finish(work, Duration::from_secs(300));
    assert_eq!(text(&out.stdout), "done\n", "{}", describe(&out));
    d.wait_until(Duration::from_secs(60), "the batch agent's resume", |d| {
        d.agent("bg")["paused"] == false
    });
    let logs = d.ok(&["logs", "bg"]);
    assert!(
        logs.contains("] paused: interactive agent `fg` is using"),
        "{logs}"
    );
    assert!(
        logs.contains("] resumed: no interactive agent needs the CPU"),
        "{logs}"
    );
    assert_eq!(
        d.agent("bg")["restarts"],
        0,
        "the pause was taken for a hang"
    );

    // A stop does not wait for a program that never ends.
    assert_eq!(d.ok(&["stop", "bg"]), "bg: stopped\n");
    let burned = t.finish(burner, Duration::from_secs(60));
    assert!(!burned.status.success(), "{}", describe(&burned));
    let status = d.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "the daemon exited with {status}");
    t.assert_nothing_left();
}

#[test]
fn an_agent_the_daemon_saved_runs_again_from_its_snapshot() {
    if !vm_available() {
        return;
    }
    let _machine = take_machine();
    let t = Scratch::new("daemon-snapshot");
    let mut d = Daemon::start(&t);
    d.ok(&["spawn", "--name", "first", "--model", "sentiment"]);
    let infer = |d: &Daemon<'_>, name: &str| -> serde_json::Value {
        let out = d.ok(&[
            "infer",
            name,
            "--task",
            "classify",
            "--input",
            "I love this, it works perfectly",
            "--json",
        ]);
        serde_json::from_str(&out).unwrap()
    };
    let first = infer(&d, "first");
    assert!(first["timings"]["load_us"].as_u64().unwrap() > 0, "{first}");
    d.ok(&["exec", "first", "--", "/bin/sh", "-c", "echo kept > /tmp/k"]);
    // A host connection open when the agent is saved: the restored guest still holds its socket
    // (reset) until its program closes it, so no connection after the restore may take its port.
    let (_held, held_port) = connect_by_hand(&t);
    let saved = t.dir.join("saved");
    std::fs::create_dir_all(&saved).unwrap();
    let saved_arg = saved.to_str().unwrap();
    let out = d.ok(&["snapshot", "first", "--to", saved_arg]);
    assert!(out.contains("saved to"), "{out}");
    assert!(saved.join("memory").is_file() && saved.join("vm.state").is_file());
    // With the disks the agent booted with (linked, or copied from another file system).
    assert!(saved.join("runtime.img").is_file() && saved.join("model.img").is_file());
    assert_eq!(d.agent("first")["state"], "stopped");
    d.refused(
        &["snapshot", "first", "--to", saved_arg],
        "agent `first` is stopped",
    );

    d.ok(&["spawn", "--name", "second", "--from", saved_arg]);
    let (_after, port) = connect_by_hand(&t);
    assert!(
        port > held_port,
        "the restored VMM gave a host connection port {port}, the saved guest's had {held_port}"
    );
    assert_eq!(
        d.ok(&["exec", "second", "--", "/bin/cat", "/tmp/k"]),
        "kept\n"
    );
    let empty = t.dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    d.refused(
        &[
            "spawn",
            "--name",
            "third",
            "--from",
            empty.to_str().unwrap(),
        ],
        "is not a snapshot",
    );
    let sized = json_call(
        &d.socket,
        "POST",
        "/agents",
        &format!(r#"{{"name":"third","from":"{saved_arg}","memory_mib":512}}"#),
    );
    assert_eq!(sized["error"]["kind"], "invalid", "{sized}");
    // A warm pool of that snapshot: an agent taken from it is up at once, and the pool refills.
    d.ok(&["pool", "create", "warm", "--from", saved_arg, "--size", "1"]);
    let ready = |d: &Daemon<'_>| -> u64 {
        let ps: serde_json::Value = serde_json::from_str(&d.ok(&["ps", "--json"])).unwrap();
        ps["pools"][0]["ready"].as_u64().unwrap_or(0)
    };
    d.wait_until(Duration::from_secs(300), "the pool to fill", |d| {
        ready(d) == 1
    });
    let taken = d.ok(&["spawn", "--name", "pooled", "--pool", "warm", "--json"]);
    let taken: serde_json::Value = serde_json::from_str(&taken).unwrap();
    assert_eq!(taken["state"], "running", "{taken}");
    assert_eq!(
        d.ok(&["exec", "pooled", "--", "/bin/cat", "/tmp/k"]),
        "kept\n"
    );
    assert_eq!(infer(&d, "pooled")["timings"]["load_us"], 0);
    d.wait_until(Duration::from_secs(300), "the pool to refill", |d| {
        ready(d) == 1
    });
    let metrics = d.ok(&["metrics"]);
    assert!(
        metrics.contains("agentos_pool_claims_total{pool=\"warm\"} 1"),
        "{metrics}"
    );
    d.refused(
        &["spawn", "--name", "x", "--pool", "cold"],
        "no pool named `cold`",
    );
    d.ok(&["pool", "rm", "warm"]);
    d.ok(&["rm", "--force", "pooled"]);
    d.ok(&["rm", "--force", "second"]);
    d.ok(&["rm", "first"]);
    let status = d.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "{status}");
    t.assert_nothing_left();
}

/// Opens a connection to the guest agent of the one VM the test's run directory holds, through
/// its VMM's socket: the connection and the host port the VMM gave it.
fn connect_by_hand(t: &Scratch) -> (UnixStream, u32) {
    let sockets: Vec<PathBuf> = std::fs::read_dir(t.run_dir())
        .unwrap()
        .flatten()
        .map(|entry| entry.path().join("vmm/vsock.sock"))
        .filter(|socket| socket.exists())
        .collect();
    assert_eq!(sockets.len(), 1, "one VM runs: {sockets:?}");
    connect_through_vmm(
        &sockets[0],
        agentos_protocol::AGENT_LISTEN_PORT,
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("cannot connect to the guest agent: {e}"))
}

/// SHA-256 of a page of zeros.
const ZERO_PAGE_SHA256: &str = "ad7facb2586fc6e966c004d7d1d16b024f5805ff7cb47c7a85dabd8b48892ca7";

/// SHA-256 of `bytes`, in hexadecimal as `sha256sum` prints it.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn files_go_in_and_out_of_an_agent_whole() {
    if !vm_available() {
        return;
    }
    let _machine = take_machine();
    let t = Scratch::new("daemon-files");
    let d = Daemon::start(&t);
    d.ok(&["spawn", "--name", "f"]);
    // 8 MiB of every byte value (eight times the API's limit on a JSON body).
    let blob: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let local = t.dir.join("blob");
    std::fs::write(&local, &blob).unwrap();
    std::fs::set_permissions(&local, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    d.ok(&["cp", local.to_str().unwrap(), "f:/home/data/blob"]);
    let inside = d.ok(&[
        "exec",
        "f",
        "--",
        "/bin/sh",
        "-c",
        "sha256sum /home/data/blob; stat -c %a /home/data/blob",
    ]);
    assert_eq!(
        inside,
        format!("{}  /home/data/blob\n640\n", sha256_hex(&blob))
    );
    let back = t.dir.join("back");
    d.ok(&["cp", "f:/home/data/blob", back.to_str().unwrap()]);
    assert!(
        std::fs::read(&back).unwrap() == blob,
        "the copy out differs"
    );
    let into = t.dir.join("into");
    std::fs::create_dir(&into).unwrap();
    d.ok(&["cp", "f:/home/data/blob", into.to_str().unwrap()]);
    assert!(std::fs::read(into.join("blob")).unwrap() == blob);
    d.ok(&[
        "exec",
        "f",
        "--",
        "/bin/sh",
        "-c",
        "echo -n hi > /home/data/small",
    ]);
    assert_eq!(d.ok(&["cp", "f:/home/data/small", "-"]), "hi");

    // Looking and changing, over HTTP.
    let socket = &d.socket;
    let stat = json_call(
        socket,
        "GET",
        "/agents/f/files/stat?path=/home/data/blob",
        "",
    );
    assert_eq!(
        (&stat["kind"], &stat["size"], &stat["mode"]),
        (&"file".into(), &(8u64 << 20).into(), &0o640.into()),
        "{stat}"
    );
    let made = raw_call(
        socket,
        "POST",
        "/agents/f/files/mkdir",
        br#"{"path":"/home/data/a/b"}"#,
        None,
    )
    .unwrap();
    assert_eq!((made.status, &made.json()["kind"]), (201, &"dir".into()));
    let again = json_call(
        socket,
        "POST",
        "/agents/f/files/mkdir",
        r#"{"path":"/home/data/a/b"}"#,
    );
    assert_eq!(again["error"]["kind"], "already_exists", "{again}");
    let moved = json_call(
        socket,
        "POST",
        "/agents/f/files/move",
        r#"{"from":"/home/data/blob","to":"/home/data/a/b/moved"}"#,
    );
    assert_eq!(moved["path"], "/home/data/a/b/moved", "{moved}");
    let listed = json_call(
        socket,
        "GET",
        "/agents/f/files/list?path=/home/data&depth=3",
        "",
    );
    let paths: Vec<&str> = listed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "/home/data/a",
            "/home/data/a/b",
            "/home/data/a/b/moved",
            "/home/data/small"
        ],
        "{listed}"
    );
    for (method, target, kind, status) in [
        (
            "GET",
            "/agents/f/files?path=/home/data/blob",
            "not_found",
            404,
        ),
        ("GET", "/agents/f/files?path=/home", "is_a_directory", 409),
        (
            "PUT",
            "/agents/f/files?path=/home/data/small/x",
            "not_a_directory",
            409,
        ),
        ("GET", "/agents/f/files/stat?path=home", "invalid", 422),
        ("GET", "/agents/nobody/files?path=/x", "unknown_agent", 404),
    ] {
        let reply = raw_call(socket, method, target, b"", None).expect("no reply");
        assert_eq!(
            (reply.kind(), reply.status),
            (kind.to_owned(), status),
            "{target}"
        );
    }

    // A watch sees changes below it as they happen.
    {
        use std::io::Read;
        let mut watch = UnixStream::connect(socket).unwrap();
        watch
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        watch
            .write_all(&raw::request(
                "GET",
                "/agents/f/files/watch?path=/home/data&recursive=true",
                b"",
                None,
            ))
            .unwrap();
        let mut seen = Vec::new();
        let mut read_until = |watch: &mut UnixStream, what: &str| {
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&seen).contains(what) {
                let n = watch.read(&mut buf).expect("the watch went quiet");
                assert!(n > 0, "the watch ended: {}", String::from_utf8_lossy(&seen));
                seen.extend_from_slice(&buf[..n]);
            }
        };
        read_until(&mut watch, r#"{"watching":{"path":"/home/data"}}"#);
        d.ok(&[
            "exec",
            "f",
            "--",
            "/bin/sh",
            "-c",
            // The new directory is watched once the guest has seen it made: files keep
            // coming in it for a while.
            "mkdir /home/data/a/new && for i in 1 2 3 4 5; do sleep 1; echo x > /home/data/a/new/f$i; done",
        ]);
        read_until(
            &mut watch,
            r#"{"change":{"kind":"create","path":"/home/data/a/new/f"#,
        );
    }

    // A write cut off halfway changes nothing and leaves nothing beside the file.
    {
        let mut cut = UnixStream::connect(socket).unwrap();
        cut.write_all(&raw::request(
            "PUT",
            "/agents/f/files?path=/home/data/a/b/moved",
            &blob[..1 << 20],
            Some(4 << 20),
        ))
        .unwrap();
        std::thread::sleep(Duration::from_millis(500));
    }
    let entries = |d: &Daemon<'_>| {
        json_call(
            &d.socket,
            "GET",
            "/agents/f/files/list?path=/home/data/a/b",
            "",
        )["entries"]
            .as_array()
            .map_or(0, Vec::len)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while entries(&d) != 1 {
        assert!(Instant::now() < deadline, "the cut-off write left a file");
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = d.ok(&["exec", "f", "--", "sha256sum", "/home/data/a/b/moved"]);
    assert!(after.starts_with(&sha256_hex(&blob)), "{after}");

    let removed = raw_call(
        socket,
        "DELETE",
        "/agents/f/files?path=/home/data",
        b"",
        None,
    )
    .unwrap();
    assert_eq!(removed.status, 200);
    let gone = json_call(socket, "GET", "/agents/f/files/stat?path=/home/data", "");
    assert_eq!(gone["error"]["kind"], "not_found", "{gone}");
    d.refused(&["cp", "f:/home/data/blob", "-"], "No such file");

    d.ok(&["rm", "--force", "f"]);
    let status = d.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "{status}");
    t.assert_nothing_left();
}

#[test]
fn programs_stream_run_on_and_are_found_followed_and_signalled() {
    if !vm_available() {
        return;
    }
    let _machine = take_machine();
    let t = Scratch::new("daemon-processes");
    let d = Daemon::start(&t);
    d.ok(&["spawn", "--name", "p"]);

    // Output streamed without a cap, both streams, the exit code.
    let out = d.cli(&[
        "exec",
        "p",
        "--",
        "/bin/sh",
        "-c",
        "head -c 3000000 /dev/zero | tr '\\0' x; echo err >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert_eq!(out.stdout.len(), 3_000_000);
    assert!(out.stdout.iter().all(|&b| b == b'x'));
    assert_eq!(text(&out.stderr), "err\n");

    // Standard input of any size, passed on as it is read.
    let input: Vec<u8> = (0..2u32 << 20).map(|i| (i % 251) as u8).collect();
    let mut child = t
        .agentos()
        .args(["exec", "p", "--stdin", "--", "sha256sum"])
        .env("AGENTOS_SOCKET", &d.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let fed = input.clone();
    let feeder = std::thread::spawn(move || stdin.write_all(&fed));
    let out = t.finish(child, crate::common::command_limit());
    feeder.join().unwrap().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(text(&out.stdout), format!("{}  -\n", sha256_hex(&input)));

    // Over HTTP: one JSON object per line.
    let reply = raw_call(
        &d.socket,
        "POST",
        "/agents/p/processes",
        br#"{"run":{"program":"echo","args":["hi"]}}"#,
        None,
    )
    .unwrap();
    assert_eq!(reply.content_type, "application/x-ndjson");
    let lines: Vec<serde_json::Value> = text(&reply.body)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines[0]["started"]["pid"].as_u64().unwrap() > 1);
    assert_eq!(lines[1]["stdout"], "aGkK");
    assert_eq!(lines[2]["exited"]["code"], 0);

    // As another user, in its home; on a terminal (80x24 when ours is none).
    assert_eq!(
        d.ok(&[
            "exec",
            "p",
            "--user",
            "user",
            "--",
            "/bin/sh",
            "-c",
            "id -u; pwd; touch mine"
        ]),
        "1000\n/home/user\n"
    );
    assert_eq!(
        d.ok(&["exec", "p", "-t", "--", "/bin/stty", "size"]),
        "24 80\r\n"
    );
    d.refused(
        &["exec", "p", "--user", "nobody", "--", "/bin/true"],
        "no user \"nobody\"",
    );

    // Detached: it runs on, is listed with its tag, followed again and signalled.
    let pid = d.ok(&[
        "exec",
        "p",
        "--detach",
        "--tag",
        "sleeper",
        "--",
        "/bin/sh",
        "-c",
        "while :; do echo tick; sleep 1; done",
    ]);
    let pid = pid.trim().to_owned();
    let pid_number: u64 = pid.parse().unwrap();
    let listed: serde_json::Value =
        serde_json::from_str(&d.ok(&["processes", "p", "--json"])).unwrap();
    let sleeper = listed["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == pid_number)
        .unwrap_or_else(|| panic!("{pid} not in {listed}"))
        .clone();
    assert_eq!(
        (&sleeper["tag"], &sleeper["keep"]),
        (&"sleeper".into(), &true.into())
    );
    let mut attached = t
        .agentos()
        .args(["attach", "p", &pid])
        .env("AGENTOS_SOCKET", &d.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its output reaches the new follower: it is attached.
    {
        use std::io::Read;
        let mut tick = [0u8; 5];
        attached
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut tick)
            .expect("no output came to the attached client");
        assert_eq!(&tick, b"tick\n");
    }
    d.ok(&["kill", "p", &pid]);
    let out = t.finish(attached, crate::common::command_limit());
    assert_eq!(out.status.code(), Some(128 + 15), "{}", describe(&out));
    d.refused(&["kill", "p", &pid], "no process");

    // A program that was not detached ends when its client goes.
    let mut client = t
        .agentos()
        .args(["exec", "p", "--tag", "orphan", "--", "/bin/sleep", "600"])
        .env("AGENTOS_SOCKET", &d.socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let running = |d: &Daemon<'_>| {
        let listed: serde_json::Value =
            serde_json::from_str(&d.ok(&["processes", "p", "--json"])).unwrap();
        listed["processes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["tag"] == "orphan")
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !running(&d) {
        assert!(Instant::now() < deadline, "the program never showed");
        std::thread::sleep(Duration::from_millis(200));
    }
    client.kill().unwrap();
    client.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while running(&d) {
        assert!(Instant::now() < deadline, "the program outlived its client");
        std::thread::sleep(Duration::from_millis(200));
    }

    d.ok(&["rm", "--force", "p"]);
    let status = d.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "{status}");
    t.assert_nothing_left();
}
