//! What every VM test needs: the agentos binary, a private run directory, and a check that a
//! test left nothing behind.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use agentos_core::agent::vm::VMM_BINARY;

/// How long one `agentos` command in a test may take before the test stops it and fails with
/// what its VMs were doing: `AGENTOS_TEST_COMMAND_LIMIT` seconds, by default 600 (generous: VMs
/// boot slowly under emulation and when many share a CPU).
pub fn command_limit() -> Duration {
    let secs = std::env::var("AGENTOS_TEST_COMMAND_LIMIT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    Duration::from_secs(secs)
}

/// Most tests boot one VM and may run side by side; a test that boots many at once takes the
/// machine for itself, so that its VMs and everyone else's do not starve each other of CPU.
static MACHINE: RwLock<()> = RwLock::new(());

pub fn share_machine() -> RwLockReadGuard<'static, ()> {
    MACHINE.read().unwrap_or_else(|e| e.into_inner())
}

pub fn take_machine() -> RwLockWriteGuard<'static, ()> {
    MACHINE.write().unwrap_or_else(|e| e.into_inner())
}

/// The agentos binary under test: `$AGENTOS_BIN`, or the workspace's release build.
pub fn agentos_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("AGENTOS_BIN") {
        return PathBuf::from(bin);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/agentos")
}

/// VM tests need /dev/kvm. Without it they are skipped, unless every test must run
/// (`AGENTOS_TEST_NO_SKIP`, as `scripts/test` sets): then a missing KVM is a failure.
pub fn vm_available() -> bool {
    Path::new("/dev/kvm").exists() || agentos_core::testing::skip("no /dev/kvm")
}

/// A snapshot of an agent as `agentos run` boots one by default, saved after it ran a program:
/// made once per test process by the first test that asks for it, and removed when the process
/// exits. Tests that need a booted agent but not a boot restore it (`run --from`), which takes a
/// small part of a cold boot's time (see docs/snapshots.md).
pub fn booted_snapshot() -> &'static str {
    static SNAPSHOT: OnceLock<String> = OnceLock::new();
    SNAPSHOT.get_or_init(|| {
        let dir = booted_snapshot_dir();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // SAFETY: registers a function without arguments that only removes a directory.
        unsafe { libc::atexit(remove_booted_snapshot) };
        let dir = dir.into_os_string().into_string().unwrap();
        let t = Scratch::new("booted-snapshot");
        let out = t.output(&["run", "--snapshot-to", &dir, "--", "/bin/true"], b"");
        assert!(
            out.status.success(),
            "the snapshot that tests restore was not made: {}",
            describe(&out)
        );
        t.assert_nothing_left();
        dir
    })
}

/// Where [`booted_snapshot`] saves: this test process's own directory.
fn booted_snapshot_dir() -> PathBuf {
    std::env::temp_dir().join(format!("agentos-test-snapshot-{}", std::process::id()))
}

extern "C" fn remove_booted_snapshot() {
    let _ = std::fs::remove_dir_all(booted_snapshot_dir());
}

/// One test's scratch space: VMs it starts keep their run directories here, so that the test
/// can check they are gone afterwards.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("agentos-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self { dir }
    }

    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// `agentos ARGS...` with this test's run directory.
    /// `agentos-vmm`, beside the agentos binary under test, with the test's run directory.
    pub fn vmm(&self) -> Command {
        let mut cmd = Command::new(agentos_bin().with_file_name(VMM_BINARY));
        cmd.env("AGENTOS_RUN_DIR", self.run_dir());
        cmd
    }

    pub fn agentos(&self) -> Command {
        let mut cmd = Command::new(agentos_bin());
        cmd.env("AGENTOS_RUN_DIR", self.run_dir());
        cmd
    }

    /// Runs `agentos ARGS...` to completion, feeding `stdin`.
    pub fn output(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut child = self
            .agentos()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start agentos");
        let mut input = child.stdin.take().unwrap();
        let data = stdin.to_vec();
        let feeder = std::thread::spawn(move || {
            let _ = input.write_all(&data);
        });
        let out = self.finish(child, command_limit());
        feeder.join().unwrap();
        out
    }

    /// Waits for `child` (started by [`Scratch::spawn`]) to end and collects its output. If it is
    /// still running after `limit`, the test fails with the state of every process and VM
    /// console under this test's run directory, then the child is killed.
    pub fn finish(&self, mut child: Child, limit: Duration) -> Output {
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.try_wait().expect("cannot wait for agentos") {
                break status;
            }
            if Instant::now() >= deadline {
                let report = self.hang_report(child.id());
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "agentos still running after {}s:\n{report}",
                    limit.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Output {
            status,
            stdout: stdout.join().unwrap(),
            stderr: stderr.join().unwrap(),
        }
    }

    /// What `agentos` (`pid`) and every VMM under this test's run directory are doing: thread
    /// states and kernel wait channels, and the tail of each VM's console and VMM log.
    pub fn hang_report(&self, pid: u32) -> String {
        let mut report = String::new();
        let marker = self.run_dir().display().to_string();
        let mut pids = processes_mentioning(&marker);
        pids.insert(0, pid);
        for pid in pids {
            report.push_str(&format!("process {pid}: {}\n", cmdline(pid)));
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|d| d.filter_map(Result::ok).collect::<Vec<_>>())
                .unwrap_or_default();
            for task in tasks {
                let path = task.path();
                let read = |f: &str| std::fs::read_to_string(path.join(f)).unwrap_or_default();
                let stat = read("stat");
                // The state is the field after the parenthesised command name.
                let state = stat
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .split_whitespace()
                    .next();
                report.push_str(&format!(
                    "  thread {} {} state {} wchan {}\n",
                    task.file_name().to_string_lossy(),
                    read("comm").trim(),
                    state.unwrap_or("?"),
                    read("wchan").trim()
                ));
                for frame in read("stack").lines().take(8) {
                    report.push_str(&format!("    {frame}\n"));
                }
            }
        }
        let vms = std::fs::read_dir(self.run_dir())
            .map(|d| d.filter_map(Result::ok).collect::<Vec<_>>())
            .unwrap_or_default();
        for vm in vms {
            for log in ["console.log", "vmm.log"] {
                let text = std::fs::read_to_string(vm.path().join(log)).unwrap_or_default();
                report.push_str(&format!(
                    "--- {} ---\n{}\n",
                    vm.path().join(log).display(),
                    tail(&text)
                ));
            }
        }
        report
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        self.agentos()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start agentos")
    }

    /// Fails when a VMM process or anything in a run directory outlives the test (the base's
    /// lock files stay: they are the base's own).
    pub fn assert_nothing_left(&self) {
        let run_dir = self.run_dir();
        let leftovers: Vec<String> = std::fs::read_dir(&run_dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| !e.file_name().to_string_lossy().ends_with(".lock"))
                    .map(|e| e.path().display().to_string())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            leftovers.is_empty(),
            "left in the run directory: {leftovers:?}"
        );
        let marker = run_dir.display().to_string();
        let processes: Vec<String> = processes_mentioning(&marker)
            .into_iter()
            .map(cmdline)
            .collect();
        assert!(
            processes.is_empty(),
            "processes left running: {processes:?}"
        );
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reads a child's pipe to its end on a thread of its own, so that the child never blocks on a
/// full pipe while the test waits for it.
fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

/// The `agentos-vmm` process whose command line mentions `marker` and that runs the guest, if
/// one runs. A jailed VMM is two processes with the same command line: a supervisor and its
/// child, PID 1 of its own PID namespace, which runs the guest; while the child does not exist
/// yet, the supervisor is returned.
pub fn vmm_process(marker: &str) -> Option<u32> {
    let vmms: Vec<u32> = processes_mentioning(marker)
        .into_iter()
        .filter(|pid| is_vmm(*pid))
        .collect();
    vmms.iter()
        .copied()
        .find(|pid| parent_of(*pid).is_some_and(|p| vmms.contains(&p)))
        .or_else(|| vmms.first().copied())
}

/// Every `agentos-vmm` process under `marker` that runs a guest: the jailed children (or
/// unjailed VMMs).
pub fn vmm_processes(marker: &str) -> Vec<u32> {
    let vmms: Vec<u32> = processes_mentioning(marker)
        .into_iter()
        .filter(|pid| is_vmm(*pid))
        .collect();
    vmms.iter()
        .copied()
        .filter(|pid| !vmms.iter().any(|child| parent_of(*child) == Some(*pid)))
        .collect()
}

/// The process that runs the guest of the VMM started as `pid` (what the daemon reports as
/// `vmm_pid`): its jailed child, or `pid` itself when it has none (`--no-jail`, not root).
pub fn guest_runner(pid: u32) -> u32 {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|child| parent_of(*child) == Some(pid) && is_vmm(*child))
        .unwrap_or(pid)
}

/// Whether `pid` runs the `agentos-vmm` binary.
pub fn is_vmm(pid: u32) -> bool {
    cmdline(pid)
        .split(' ')
        .next()
        .is_some_and(|program| Path::new(program).file_name() == Some(VMM_BINARY.as_ref()))
}

/// The parent of `pid`, from the field after the parenthesised command name in its `stat`.
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Processes whose command line contains `marker`.
fn processes_mentioning(marker: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| cmdline(*pid).contains(marker))
        .collect()
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_default()
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A readable account of a finished command, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        tail(&text(&out.stdout)),
        tail(&text(&out.stderr))
    )
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
