//! The QEMU carrier is itself confined: QEMU's seccomp filter, and, started by root, a user
//! without privileges once it has opened its files.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentos_image::{self as image, CARRIER_IMAGE};

/// How long the carrier's QEMU gets to appear and confine itself.
const START_LIMIT: Duration = Duration::from_secs(120);

fn status_field(pid: u32, field: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// The QEMU process `agentos` (`parent`) started.
fn qemu_child(parent: u32) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()));
            ppid == Some(parent) && stat.contains("(qemu-system-x86")
        })
}

#[test]
fn the_carriers_qemu_runs_under_its_seccomp_filter_and_not_as_root() {
    image::find_image(&image::default_cache_dir(), CARRIER_IMAGE)
        .expect("no carrier image: run scripts/setup");
    let mut agentos = Command::new(env!("CARGO_BIN_EXE_agentos"))
        .args(["carrier", "--", "/bin/sh", "-c", "sleep 600"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let deadline = Instant::now() + START_LIMIT;
    let seen = loop {
        let confined = qemu_child(agentos.id()).and_then(|qemu| {
            let seccomp = status_field(qemu, "Seccomp")?;
            let uid = status_field(qemu, "Uid")?;
            (seccomp == "2" && (!root || uid == "65534 65534 65534 65534"))
                .then_some((seccomp, uid))
        });
        if confined.is_some() || Instant::now() >= deadline {
            break confined;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let last =
        qemu_child(agentos.id()).map(|q| (status_field(q, "Seccomp"), status_field(q, "Uid")));
    // SAFETY: kill takes integers only; the pid is our unreaped child.
    unsafe { libc::kill(agentos.id() as libc::pid_t, libc::SIGTERM) };
    let _ = agentos.wait();
    assert!(
        seen.is_some(),
        "the carrier's QEMU was not confined within {} s: {last:?}",
        START_LIMIT.as_secs()
    );
}
