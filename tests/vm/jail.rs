//! The VMM's jail: its own namespaces (PID included), a root holding only what the VM needs, an
//! unprivileged user, no capabilities, `no_new_privs`, no core dumps; a supervisor holding only
//! `CAP_KILL`; and `--no-jail`, which says loudly what it gives up.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentos::image::{self, AGENT_IMAGE};

use crate::common::{Scratch, describe, share_machine, text, vm_available};

/// The process that runs the guest of the `vmm` with `marker` on its command line, once it has
/// entered its jail (set `no_new_privs`, the jail's last step but one).
fn jailed_vmm_pid(marker: &str, deadline: Instant) -> u32 {
    loop {
        if let Some(pid) = crate::common::vmm_process(marker)
            && try_status_field(pid, "NoNewPrivs").as_deref() == Some("1")
        {
            return pid;
        }
        assert!(Instant::now() < deadline, "no jailed VMM process appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn try_status_field(pid: u32, field: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_owned())
}

fn status_field(pid: u32, field: &str) -> String {
    try_status_field(pid, field).unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Every file (not directory) under `dir`, as a path relative to it.
fn files_under(dir: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir.join(rel)) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let rel = rel.join(entry.file_name());
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            files_under(dir, &rel, out);
        } else {
            out.push(rel);
        }
    }
}

#[test]
fn the_vmm_runs_jailed_without_capabilities_and_sees_only_what_its_vm_needs() {
    if !vm_available() {
        return;
    }
    let _machine = share_machine();
    let t = Scratch::new("jail");
    let run_dir = t.run_dir();
    let child = t.spawn(&["run", "--", "/bin/sh", "-c", "sleep 5; echo inside"]);
    // The jail is entered before the VM is built; give the VMM a moment to get there.
    let pid = jailed_vmm_pid(
        &run_dir.display().to_string(),
        Instant::now() + Duration::from_secs(120),
    );
    // Capabilities go last; wait for the effective set to empty.
    let deadline = Instant::now() + Duration::from_secs(60);
    while status_field(pid, "CapEff") != "0000000000000000" {
        assert!(Instant::now() < deadline, "the VMM kept its capabilities");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(status_field(pid, "CapPrm"), "0000000000000000");
    assert_eq!(status_field(pid, "CapBnd"), "0000000000000000");
    // An unprivileged user and group (the default 65534), real, effective, saved and fs ids.
    let unprivileged = ["65534"; 4].join("\t");
    assert_eq!(status_field(pid, "Uid"), unprivileged);
    assert_eq!(status_field(pid, "Gid"), unprivileged);
    assert_eq!(status_field(pid, "Groups"), "");
    // PID 1 of a PID namespace of its own: NSpid lists its pid in each namespace, ours first.
    let nspid = status_field(pid, "NSpid");
    assert_eq!(
        nspid.split_whitespace().collect::<Vec<_>>(),
        [pid.to_string().as_str(), "1"],
        "NSpid {nspid}"
    );
    // Its supervisor, outside the namespaces, keeps only CAP_KILL (to pass stop signals on to
    // a process of another user) and cannot regain the rest.
    let supervisor = crate::common::parent_of(pid).expect("the VMM has no supervisor");
    while status_field(supervisor, "CapEff") != "0000000000000020" {
        assert!(
            Instant::now() < deadline,
            "the supervisor kept capabilities: {}",
            status_field(supervisor, "CapEff")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(status_field(supervisor, "CapPrm"), "0000000000000020");
    assert_eq!(status_field(supervisor, "CapBnd"), "0000000000000000");
    assert_eq!(status_field(supervisor, "NoNewPrivs"), "1");
    for ns in ["mnt", "net", "ipc", "uts", "pid"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "the VMM shares our {ns} namespace");
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(core.split_whitespace().nth(4), Some("0"), "{core}");

    // What the VMM can see: its run directory, /dev/kvm, and the image's kernel and initrd.
    let img = image::find_image(&image::default_cache_dir(), AGENT_IMAGE)
        .expect("no agent image: run scripts/setup");
    let image_files: Vec<PathBuf> = [&img.vmlinuz, &img.initrd]
        .into_iter()
        .map(|p| {
            std::fs::canonicalize(p)
                .unwrap()
                .strip_prefix("/")
                .unwrap()
                .to_path_buf()
        })
        .collect();
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut files = Vec::new();
    files_under(&root, Path::new(""), &mut files);
    let run_rel = run_dir.strip_prefix("/").unwrap();
    let strays: Vec<&PathBuf> = files
        .iter()
        .filter(|f| {
            !f.starts_with(run_rel) && *f != Path::new("dev/kvm") && !image_files.contains(f)
        })
        .collect();
    assert!(
        strays.is_empty(),
        "the jail shows {strays:?} (all: {files:?})"
    );
    assert!(files.iter().any(|f| f == Path::new("dev/kvm")), "{files:?}");
    for file in &image_files {
        assert!(
            files.contains(file),
            "no {} in the jail: {files:?}",
            file.display()
        );
    }
    for absent in ["etc/passwd", "usr", "proc/1", "sbin"] {
        assert!(!root.join(absent).exists(), "the jail has /{absent}");
    }

    let out = t.finish(child, crate::common::command_limit());
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(text(&out.stdout), "inside\n");
    t.assert_nothing_left();
}

#[test]
fn no_jail_runs_and_says_it_is_unsafe() {
    if !vm_available() {
        return;
    }
    let _machine = share_machine();
    let t = Scratch::new("no-jail");
    let out = t.output(&["run", "--no-jail", "--", "/bin/echo", "unconfined"], b"");
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(text(&out.stdout), "unconfined\n");
    assert!(
        text(&out.stderr).contains("WARNING: --no-jail runs the VMM unconfined"),
        "{}",
        describe(&out)
    );
    t.assert_nothing_left();
}
