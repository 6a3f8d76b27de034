//! `agentos run`: boot, exec, exit statuses, standard I/O, read-only disks, crashes,
//! concurrency, Ctrl-C. Tests of what runs in a booted agent restore one from a snapshot
//! ([`booted_snapshot`]) instead of booting it: they hold for restored agents too, and the boot
//! itself is tested by the others.

use std::io::{BufRead, BufReader};
use std::process::Output;
use std::time::{Duration, Instant};

use crate::common::{
    Scratch, booted_snapshot, command_limit, describe, share_machine, take_machine, text,
    vm_available,
};

#[test]
fn runs_a_command_with_the_requested_vcpus_and_memory() {
    if !vm_available() {
        return;
    }
    let _machine = share_machine();
    let t = Scratch::new("basic");
    // Also what the guest kernel found in the machine the VMM gave it: MTRRs on (so it sets up
    // PAT, with write-combining) and a TSC-deadline local APIC timer; and the cgroup2 mount of
    // the guest agent's init (a carrier's too), made for cheap moves between cgroups.
    let script = "echo hi; nproc; grep MemTotal /proc/meminfo; \
                  grep -c tsc_deadline_timer /proc/cpuinfo; \
                  grep -c '^cgroup2 /sys/fs/cgroup .*favordynmods' /proc/mounts; \
                  dmesg | grep -e MTRR -e x86/PAT";
    let out = t.output(
        &[
            "run", "--vcpus", "2", "--memory", "256", "--", "/bin/sh", "-c", script,
        ],
        b"",
    );
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[..2], ["hi", "2"], "{}", describe(&out));
    let mem_kib: u64 = lines[2]
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {stdout}"));
    // The kernel keeps some memory for itself; what is left must be most of the 256 MiB.
    assert!(
        (200 * 1024..=256 * 1024).contains(&mem_kib),
        "MemTotal {mem_kib} kB"
    );
    assert_eq!(
        lines.get(3),
        Some(&"2"),
        "TSC deadline timer on both vCPUs: {stdout}"
    );
    assert_eq!(
        lines.get(4),
        Some(&"1"),
        "cgroup2 mounted with favordynmods: {stdout}"
    );
    let pat = &lines[5..];
    assert!(
        pat.iter()
            .any(|l| l.contains("x86/PAT: Configuration") && l.contains(" WC ")),
        "PAT set up with write-combining: {stdout}"
    );
    assert!(
        !pat.iter()
            .any(|l| l.contains("MTRRs disabled") || l.contains("all blank")),
        "MTRRs left off: {stdout}"
    );
    t.assert_nothing_left();
}

/// `agentos run ARGS...` of the agent in [`booted_snapshot`], restored.
fn restored<'a>(args: &[&'a str]) -> Vec<&'a str> {
    [&["run", "--from", booted_snapshot()], args].concat()
}

fn run_restored(t: &Scratch, args: &[&str], stdin: &[u8]) -> Output {
    t.output(&restored(args), stdin)
}

#[test]
fn exit_code_and_output_come_back_as_json() {
    if !vm_available() {
        return;
    }
    let _machine = share_machine();
    let t = Scratch::new("json");
    let script = "echo out; echo err >&2; exit 7";
    let out = run_restored(&t, &["--json", "--", "/bin/sh", "-c", script], b"");
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", describe(&out)));
    assert_eq!(result["exit_code"], 7);
    assert_eq!(result["stdout"], "out\n");
    assert_eq!(result["stderr"], "err\n");
    let boot_ms = result["boot_ms"].as_u64().unwrap();
    let total_ms = result["total_ms"].as_u64().unwrap();
    assert!(boot_ms > 0 && total_ms >= boot_ms, "{result}");
    t.assert_nothing_left();
}

#[test]
fn a_program_killed_by_a_signal_exits_128_plus_the_signal() {
    if !vm_available() {
        return;
    }
    let _machine = share_machine();
    let t = Scratch::new("signal");
    let out = run_restored(&t, &["--", "/bin/sh", "-c", "kill -KILL $$"], b"");
    assert_eq!(out.status.code(), Some(128 + 9), "{}", describe(&out));
    t.assert_nothing_left();
}

#[test]
fn a_missing_program_is_reported_with_status_127() {
    if !vm_available() {
        return;
    }
    let _machine = share_machine();
    let t = Scratch::new("missing");
    let out = run_restored(&t, &["--", "/no/such/program"], b"");
    assert_eq!(out.status.code(), Some(127), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("/no/such/program"),
        "{}",
        describe(&out)
    );
    t.assert_nothing_left();
}

#[test]
fn stdin_passes_through_byte_for_byte() {
    if !vm_available() {
        return;
    }
    let _machine = share_machine();
    let t = Scratch::new("stdin");
    // Every byte value, many times over, and no trailing newline.
    let input: Vec<u8> = (0..256 * 1024).map(|i| (i * 7 % 256) as u8).collect();
    let out = run_restored(&t, &["--", "/bin/cat"], &input);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        out.stdout == input,
        "stdout differs from stdin ({} bytes back)",
        out.stdout.len()
    );
    t.assert_nothing_left();
}

#[test]
fn four_mib_of_stdout_arrive_whole_and_in_order() {
    if !vm_available() {
        return;
    }
    let _machine = share_machine();
    let t = Scratch::new("stream");
    let out = run_restored(&t, &["--", "/bin/sh", "-c", "seq 1 620000"], b"");
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        out.stdout.len() >= 4 << 20,
        "only {} bytes",
        out.stdout.len()
    );
    let stdout = text(&out.stdout);
    for (expected, line) in (1..).zip(stdout.lines()) {
        assert_eq!(line, expected.to_string(), "line {expected}");
    }
    assert_eq!(stdout.lines().count(), 620_000);
    t.assert_nothing_left();
}

/// A disk file whose every sector says which it is: `sector N`, padded to 512 bytes.
fn sector_disk(path: &std::path::Path, sectors: usize, tag: &str) -> Vec<u8> {
    let bytes: Vec<u8> = (0..sectors)
        .flat_map(|n| format!("{:<511}\n", format!("{tag} sector {n}")).into_bytes())
        .collect();
    std::fs::write(path, &bytes).unwrap();
    bytes
}

#[test]
fn read_only_disks_read_back_every_byte_and_refuse_writes() {
    if !vm_available() {
        return;
    }
    let _machine = share_machine();
    let t = Scratch::new("disk");
    let (first, second) = (t.dir.join("first.img"), t.dir.join("second.img"));
    let first_bytes = sector_disk(&first, 8192, "a");
    let second_bytes = sector_disk(&second, 16, "b");
    // The whole first disk on stdout; what the guest knows of both, and a write, on stderr.
    let script = "cat /dev/vda; { cat /sys/block/vda/ro; echo $(cat /sys/block/vda/serial); \
        echo $(cat /sys/block/vdb/serial); cat /sys/block/vdb/size; head -c 14 /dev/vdb; echo; \
        dd if=/dev/zero of=/dev/vda count=1 2>/dev/null; echo write=$?; } >&2";
    let out = t.output(
        &[
            "run",
            "--disk",
            first.to_str().unwrap(),
            "--disk",
            second.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            script,
        ],
        b"",
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(out.stdout.len(), first_bytes.len(), "{}", text(&out.stderr));
    assert!(out.stdout == first_bytes, "the disk read back differs");
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines,
        ["1", "disk0", "disk1", "16", "b sector 0    ", "write=1"],
        "{}",
        describe(&out)
    );
    assert!(
        std::fs::read(&first).unwrap() == first_bytes,
        "the disk file changed"
    );
    assert!(std::fs::read(&second).unwrap() == second_bytes);
    t.assert_nothing_left();
}

#[test]
fn a_guest_kernel_panic_is_reported_as_an_error() {
    if !vm_available() {
        return;
    }
    let _machine = share_machine();
    let t = Scratch::new("panic");
    let out = run_restored(
        &t,
        &["--", "/bin/sh", "-c", "echo c > /proc/sysrq-trigger"],
        b"",
    );
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("Kernel panic"), "{}", describe(&out));
    t.assert_nothing_left();
}

#[test]
fn eight_vms_boot_at_once() {
    if !vm_available() {
        return;
    }
    let _machine = take_machine();
    let t = Scratch::new("eight");
    let children: Vec<_> = (0..8)
        .map(|i| {
            let script = format!("echo vm-{i}");
            t.spawn(&[
                "run",
                "--memory",
                "128",
                "--boot-timeout",
                "900",
                "--",
                "/bin/sh",
                "-c",
                &script,
            ])
        })
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        let out = t.finish(child, 2 * command_limit());
        assert!(out.status.success(), "VM {i}: {}", describe(&out));
        assert_eq!(text(&out.stdout), format!("vm-{i}\n"));
    }
    t.assert_nothing_left();
}

#[test]
fn ctrl_c_stops_the_vm_and_leaves_nothing_behind() {
    if !vm_available() {
        return;
    }
    let _machine = share_machine();
    let t = Scratch::new("ctrlc");
    let mut child = t.spawn(&restored(&[
        "--",
        "/bin/sh",
        "-c",
        "echo ready; exec sleep 600",
    ]));
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "agentos run did not stop after SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(130));
    t.assert_nothing_left();
}
