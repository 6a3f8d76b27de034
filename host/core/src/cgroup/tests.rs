//! These tests create real cgroups in the hierarchies this host mounts (v1, v2 or both), so they
//! need root; elsewhere they say why they skip.

use std::process::{Child, Command};
use std::time::Duration;

use super::*;

/// The layout, when this process may create cgroups in it.
fn writable_layout() -> Option<Layout> {
    let layout = Layout::discover();
    let writable = layout.hierarchies().keys().all(|h| {
        let probe = h.mount.join(PARENT);
        create_dir(&probe).is_ok()
    });
    if layout.hierarchies().is_empty() || !writable {
        crate::testing::skip("no cgroup hierarchy this process may write to");
        return None;
    }
    Some(layout)
}

/// Moves `child` into every hierarchy's cgroup, as the VMM moves itself.
fn move_into(cgroup: &AgentCgroup, child: &Child) {
    for procs in cgroup.procs_paths() {
        std::fs::write(&procs, child.id().to_string()).unwrap();
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap().trim().to_string()
}

#[test]
fn a_process_moved_in_runs_under_the_slice_and_nothing_is_left() {
    let Some(layout) = writable_layout() else {
        return;
    };
    let name = format!("test-{}-1", std::process::id());
    let slice = Slice {
        cpus: layout.hierarchy(Controller::Cpu).map(|_| 0.25),
        weight: layout.hierarchy(Controller::Cpu).map(|_| 300),
        memory_bytes: layout.hierarchy(Controller::Memory).map(|_| 96 << 20),
        pids: layout.hierarchy(Controller::Pids).map(|_| 16),
        cpuset: None,
    };
    let cgroup = AgentCgroup::create(&layout, &name, &slice).unwrap();
    // What admission reads back is what was written.
    let held = cgroup.held();
    assert_eq!(held.cpus, slice.cpus);
    assert_eq!(held.memory_bytes, slice.memory_bytes);
    let mut child = Command::new("sleep").arg("30").spawn().unwrap();
    move_into(&cgroup, &child);

    for dir in cgroup.dirs() {
        let procs = read(&dir.join("cgroup.procs"));
        assert_eq!(procs, child.id().to_string(), "{}", dir.display());
    }
    for (controller, version, file, want) in [
        (Controller::Cpu, Version::V2, "cpu.max", "25000 100000"),
        (Controller::Cpu, Version::V2, "cpu.weight", "300"),
        (Controller::Cpu, Version::V1, "cpu.cfs_quota_us", "25000"),
        (Controller::Cpu, Version::V1, "cpu.shares", "3072"),
        (Controller::Memory, Version::V2, "memory.max", "100663296"),
        (
            Controller::Memory,
            Version::V1,
            "memory.limit_in_bytes",
            "100663296",
        ),
        (Controller::Pids, Version::V2, "pids.max", "16"),
        (Controller::Pids, Version::V1, "pids.max", "16"),
    ] {
        let Some(h) = layout.hierarchy(controller) else {
            continue;
        };
        if h.version == version {
            let path = h.mount.join(PARENT).join(&name).join(file);
            assert_eq!(read(&path), want, "{}", path.display());
        }
    }

    child.kill().unwrap();
    child.wait().unwrap();
    let dirs: Vec<PathBuf> = cgroup.dirs().into_iter().map(Path::to_owned).collect();
    drop(cgroup);
    for dir in dirs {
        assert!(!dir.exists(), "{} is left", dir.display());
    }
}

#[test]
fn a_slice_needing_a_missing_controller_is_refused_before_anything_is_created() {
    let slice = Slice {
        cpus: Some(1.0),
        ..Default::default()
    };
    let err = AgentCgroup::create(&Layout::default(), "x-1-0", &slice).unwrap_err();
    assert!(matches!(err, CgroupError::NoController(Controller::Cpu)));
    assert!(err.to_string().contains("agentos doctor"));
}

#[test]
fn cgroups_of_dead_owners_are_removed_and_live_ones_kept() {
    let Some(layout) = writable_layout() else {
        return;
    };
    // Above the kernel's largest pid_max: no such process can exist.
    let dead = format!("vm-{}-0", 4_194_305 + std::process::id() % 1000);
    let live = format!("vm-{}-99", std::process::id());
    let created: Vec<_> = [&dead, &live]
        .iter()
        .map(|name| AgentCgroup::create(&layout, name, &Slice::default()).unwrap())
        .collect();
    let dead_dirs: Vec<PathBuf> = created[0].dirs().into_iter().map(Path::to_owned).collect();
    let live_dirs: Vec<PathBuf> = created[1].dirs().into_iter().map(Path::to_owned).collect();
    // Forget them, as a killed owner would.
    created.into_iter().for_each(std::mem::forget);

    remove_stale(&layout);
    for dir in &dead_dirs {
        assert!(!dir.exists(), "stale {} is left", dir.display());
    }
    for dir in &live_dirs {
        assert!(dir.exists(), "live {} was removed", dir.display());
        remove_dir(dir).unwrap();
    }
}

#[test]
fn owner_pids_come_from_the_name() {
    assert_eq!(owner_pid("vm-1234-0"), Some(1234));
    assert_eq!(owner_pid("agent-x-77-3"), Some(77));
    assert_eq!(owner_pid("vm-1234"), None);
    assert_eq!(owner_pid("-1234-0"), None);
    assert_eq!(owner_pid("agentos"), None);
}

#[test]
fn a_frozen_cgroup_uses_no_cpu_until_thawed() {
    let Some(layout) = writable_layout() else {
        return;
    };
    if layout.hierarchy(Controller::Freezer).is_none()
        || layout.hierarchy(Controller::Cpuacct).is_none()
    {
        crate::testing::skip("no freezer or CPU accounting here");
        return;
    }
    let name = format!("test-{}-2", std::process::id());
    let cgroup = AgentCgroup::create(&layout, &name, &Slice::default()).unwrap();
    let mut child = Command::new("sh")
        .args(["-c", "while :; do :; done"])
        .spawn()
        .unwrap();
    move_into(&cgroup, &child);
    let burn = Duration::from_millis(300);

    std::thread::sleep(burn);
    let running = cgroup.stats().cpu_usage_us;
    assert!(running > 0, "a busy loop used no CPU");

    cgroup.freeze().unwrap();
    let frozen_at = cgroup.stats().cpu_usage_us;
    std::thread::sleep(burn);
    let frozen_for = cgroup.stats().cpu_usage_us - frozen_at;
    assert!(frozen_for < 5_000, "{frozen_for} us of CPU while frozen");

    cgroup.thaw().unwrap();
    let thawed_at = cgroup.stats().cpu_usage_us;
    std::thread::sleep(burn);
    assert!(
        cgroup.stats().cpu_usage_us - thawed_at > 10_000,
        "no CPU used after thawing"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
