//! What every VM test needs: the agentos binary, a private run directory, and a check that a
//! test left nothing behind.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

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

/// VM tests need /dev/kvm. Without it they are skipped, unless `AGENTOS_REQUIRE_KVM` is set
/// (as `scripts/test` does wherever /dev/kvm exists), which makes a missing KVM a failure.
pub fn vm_available() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    assert!(
        std::env::var_os("AGENTOS_REQUIRE_KVM").is_none(),
        "AGENTOS_REQUIRE_KVM is set but there is no /dev/kvm"
    );
    eprintln!("skipping: no /dev/kvm");
    false
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
        let out = child.wait_with_output().expect("agentos did not finish");
        feeder.join().unwrap();
        out
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

    /// Fails when a VMM process or anything in a run directory outlives the test.
    pub fn assert_nothing_left(&self) {
        let run_dir = self.run_dir();
        let leftovers: Vec<String> = std::fs::read_dir(&run_dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path().display().to_string())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            leftovers.is_empty(),
            "left in the run directory: {leftovers:?}"
        );
        let marker = run_dir.display().to_string();
        let processes: Vec<String> = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(Result::ok)
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(&marker))
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
