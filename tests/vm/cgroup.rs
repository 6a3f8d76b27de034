//! The VMM's cgroup: created with the slice asked for before the guest runs, holding every VMM
//! thread, and removed when the VM ends.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use agentos_core::cgroup::slice::{online_cpu_list, parse_cpu_list};
use agentos_core::cgroup::{Controller, Layout, PARENT, Version};

use crate::common::{
    Scratch, command_limit, describe, share_machine, take_machine, text, vm_available,
};

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .trim()
        .to_string()
}

/// The threads of the one process whose command line mentions `marker` and runs `vmm`.
fn vmm_threads(marker: &str) -> (u32, Vec<String>) {
    let pid = crate::common::vmm_process(marker).expect("no VMM process");
    let tids = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    (pid, tids)
}

#[test]
fn the_vmm_runs_with_all_its_threads_in_a_cgroup_with_its_slice_which_goes_with_it() {
    if !vm_available() {
        return;
    }
    let layout = Layout::discover();
    let Some(cpu) = layout.hierarchy(Controller::Cpu).cloned() else {
        panic!("no cpu controller on a host with /dev/kvm; see `agentos doctor`");
    };
    let _machine = share_machine();
    let t = Scratch::new("cgroup");
    let child = start_waiting(&t, &["--cpus", "0.5", "--weight", "200", "--memory", "192"]);

    let name = format!("vm-{}-0", child.id());
    let dirs: Vec<PathBuf> = layout
        .hierarchies()
        .keys()
        .map(|h| h.mount.join(PARENT).join(&name))
        .collect();
    let (vmm, threads) = vmm_threads(&t.run_dir().display().to_string());
    assert!(threads.len() >= 2, "a VMM has a vCPU thread and a main one");
    for dir in &dirs {
        // KVM attaches its per-VM kernel workers (kvm-pit, kvm-nx-lpage-recovery) to the cgroup
        // of the process that made the VM: their CPU time is the agent's too.
        let procs = read(&dir.join("cgroup.procs"));
        assert!(
            procs.lines().any(|p| p == vmm.to_string()),
            "the VMM is not in {}",
            dir.display()
        );
        // The jail's supervisor (the VMM's parent, which waits for it) is there too.
        let supervisor = crate::common::parent_of(vmm).unwrap_or(0).to_string();
        for pid in procs
            .lines()
            .filter(|p| *p != vmm.to_string() && *p != supervisor)
        {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            assert!(
                comm.starts_with("kvm"),
                "{} holds process {pid} ({comm})",
                dir.display()
            );
        }
        let members = ["cgroup.threads", "tasks"]
            .iter()
            .find_map(|f| std::fs::read_to_string(dir.join(f)).ok())
            .unwrap();
        for tid in &threads {
            assert!(
                members.lines().any(|l| l == tid),
                "thread {tid} is not in {}",
                dir.display()
            );
        }
    }
    let cpu_dir = cpu.mount.join(PARENT).join(&name);
    match cpu.version {
        Version::V2 => {
            assert_eq!(read(&cpu_dir.join("cpu.max")), "50000 100000");
            assert_eq!(read(&cpu_dir.join("cpu.weight")), "200");
        }
        Version::V1 => {
            assert_eq!(read(&cpu_dir.join("cpu.cfs_quota_us")), "50000");
            assert_eq!(read(&cpu_dir.join("cpu.shares")), "2048");
        }
    }
    if let Some(memory) = layout.hierarchy(Controller::Memory) {
        let file = match memory.version {
            Version::V2 => "memory.max",
            Version::V1 => "memory.limit_in_bytes",
        };
        let limit = read(&memory.mount.join(PARENT).join(&name).join(file));
        assert_eq!(
            limit,
            ((192u64 + 64) << 20).to_string(),
            "guest RAM + VMM allowance"
        );
    }

    watch_pause_and_resume(&t, &name);

    stop(&t, child);
    for dir in &dirs {
        assert!(!dir.exists(), "{} outlived its VM", dir.display());
    }
    t.assert_nothing_left();
}

#[test]
fn a_cpuset_outside_the_online_cpus_is_refused_in_one_line() {
    assert_refused_in_one_line(
        "cpuset",
        &["--cpuset", "4095"],
        "cpuset 4095: CPU 4095 is not online here",
    );
}

/// `agentos run ARGS -- true` fails with status 1 and one line of stderr containing `why`.
fn assert_refused_in_one_line(label: &str, args: &[&str], why: &str) {
    if !vm_available() {
        return;
    }
    let _machine = share_machine();
    let t = Scratch::new(label);
    let mut argv = vec!["run"];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["--", "true"]);
    let out = t.output(&argv, b"");
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(why), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    t.assert_nothing_left();
}

/// `agentos stats NAME --json`, parsed.
fn stats(t: &Scratch, name: &str) -> serde_json::Value {
    let out = t.output(&["stats", name, "--json"], b"");
    assert!(out.status.success(), "{}", describe(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `agentos top`, `stats`, `pause` and `resume` on a running agent.
fn watch_pause_and_resume(t: &Scratch, name: &str) {
    let top = t.output(&["top", "--once", "--interval", "0.2"], b"");
    assert!(top.status.success(), "{}", describe(&top));
    let line = String::from_utf8_lossy(&top.stdout)
        .lines()
        .find(|l| l.starts_with(name))
        .map(str::to_string);
    assert!(
        line.is_some_and(|l| l.contains("running")),
        "{}",
        describe(&top)
    );

    let before = stats(t, name);
    assert_eq!(before["paused"], false);
    assert!(before["cpu_usage_us"].as_u64().unwrap() > 0, "{before}");
    assert!(
        before["memory_bytes"].as_u64().unwrap() > 1 << 20,
        "{before}"
    );

    let out = t.output(&["pause", name], b"");
    assert!(out.status.success(), "{}", describe(&out));
    let paused = stats(t, name);
    assert_eq!(paused["paused"], true);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        stats(t, name)["cpu_usage_us"],
        paused["cpu_usage_us"],
        "a paused agent used CPU"
    );

    let out = t.output(&["resume", name], b"");
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(stats(t, name)["paused"], false);
}

/// CPUs online where the VMs run (inside the carrier, the carrier's).
fn online_cpus() -> Vec<u32> {
    parse_cpu_list(&online_cpu_list()).expect("no online CPU list")
}

#[test]
fn an_agent_whose_slice_does_not_fit_is_refused_with_what_is_short() {
    assert_refused_in_one_line(
        "refused",
        &["--cpus", "4000"],
        "not enough CPU for this agent: it asks for --cpus 4000",
    );
}

#[test]
fn an_agent_told_to_wait_starts_when_the_running_one_leaves_room() {
    if !vm_available() {
        return;
    }
    let _machine = take_machine();
    let t = Scratch::new("wait");
    let cpus = online_cpus().len() as f64;
    let first_quota = format!("{}", cpus - 0.25);
    let mut first = t
        .agentos()
        .args(["run", "--cpus", &first_quota, "--", "/bin/sh", "-c"])
        .arg("echo ready; read line; echo bye")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let first_in = first.stdin.take().unwrap();
    let mut line = String::new();
    BufReader::new(first.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "ready\n");

    let mut second = t.spawn(&["run", "--cpus", "0.5", "--wait", "--", "echo", "second"]);
    let mut waiting = String::new();
    let mut second_err = BufReader::new(second.stderr.take().unwrap());
    second_err.read_line(&mut waiting).unwrap();
    assert!(
        waiting.contains("waiting for room: not enough CPU"),
        "{waiting}"
    );

    // The first agent ends; the second gets its slice and runs.
    drop(first_in);
    let first = t.finish(first, command_limit());
    assert!(first.status.success(), "{}", describe(&first));
    let second = t.finish(second, command_limit());
    assert!(second.status.success(), "{}", describe(&second));
    assert_eq!(String::from_utf8_lossy(&second.stdout), "second\n");
    t.assert_nothing_left();
}

/// Starts `agentos run ARGS -- sh -c 'echo ready; exec sleep 600'` and waits for `ready`.
fn start_waiting(t: &Scratch, args: &[&str]) -> std::process::Child {
    let mut argv = vec!["run"];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["--", "/bin/sh", "-c", "echo ready; exec sleep 600"]);
    let mut child = t.spawn(&argv);
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    if line != "ready\n" {
        let out = t.finish(child, command_limit());
        panic!("the VM did not start: {}", describe(&out));
    }
    child
}

fn stop(t: &Scratch, child: std::process::Child) {
    // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let out = t.finish(child, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(130), "{}", describe(&out));
}

#[test]
fn pinned_agents_are_placed_on_the_least_loaded_cpus() {
    if !vm_available() {
        return;
    }
    let layout = Layout::discover();
    let Some(cpuset) = layout.hierarchy(Controller::Cpuset).cloned() else {
        agentos_core::testing::skip("no cpuset controller here");
        return;
    };
    let _machine = take_machine();
    let t = Scratch::new("pin");
    let cpus = online_cpus();
    let placed = |child: &std::process::Child| {
        read(
            &cpuset
                .mount
                .join(PARENT)
                .join(format!("vm-{}-0", child.id()))
                .join("cpuset.cpus"),
        )
    };
    let first = start_waiting(&t, &["--pin"]);
    assert_eq!(placed(&first), cpus[0].to_string());
    if cpus.len() > 1 {
        let second = start_waiting(&t, &["--pin"]);
        assert_eq!(placed(&second), cpus[1].to_string());
        stop(&t, second);
    }
    stop(&t, first);
    t.assert_nothing_left();
}

/// A guest that allocates past its memory meets its own kernel's OOM killer: the program dies,
/// the guest agent and the VM go on, and an agent running beside it is not touched. The VMM
/// cannot take more than guest RAM plus its allowance: that is its cgroup's memory limit.
#[test]
fn memory_exhaustion_stays_inside_the_guest() {
    if !vm_available() {
        return;
    }
    let _machine = take_machine();
    let t = Scratch::new("cgroup-oom");
    let neighbour = t.spawn(&[
        "run",
        "--memory",
        "128",
        "--",
        "/bin/sh",
        "-c",
        "sleep 25; echo neighbour alive",
    ]);
    // The string doubles until the guest has no memory left for it.
    let out = t.output(
        &[
            "run",
            "--memory",
            "128",
            "--",
            "/bin/sh",
            "-c",
            r#"awk 'BEGIN { s = "x"; while (1) s = s s }'; echo "awk ended: $?"; echo agent alive"#,
        ],
        b"",
    );
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("awk ended: 137") && stdout.contains("agent alive"),
        "{}",
        describe(&out)
    );
    let neighbour = t.finish(neighbour, command_limit());
    assert!(neighbour.status.success(), "{}", describe(&neighbour));
    assert!(text(&neighbour.stdout).contains("neighbour alive"));
    t.assert_nothing_left();
}
