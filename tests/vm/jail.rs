//! The VMM's jail: its own namespaces (PID included), a root holding only what the VM needs, a
//! user of its own per VM, no capabilities, `no_new_privs`, no core dumps; a supervisor holding
//! only `CAP_KILL`; the rootless jail of a VMM started by another user; run directories that a
//! directory made by someone else cannot take over; and `--no-jail`, which says loudly what it
//! gives up.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentos_image::{self as image, AGENT_IMAGE};

use crate::common::{Scratch, agentos_bin, describe, share_machine, text, vm_available};

/// The process that runs the guest of the `vmm` with `marker` on its command line, once it has
/// entered its jail: it is in a PID namespace of its own (its `NSpid` has two entries; its
/// supervisor's, one) and has set `no_new_privs`, the jail's last step but one.
fn jailed_vmm_pid(marker: &str, deadline: Instant) -> u32 {
    loop {
        if let Some(pid) = crate::common::vmm_process(marker)
            && try_status_field(pid, "NSpid").is_some_and(|n| n.split_whitespace().count() == 2)
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

/// The user id the jailed VMM `pid` runs as, checked to be one of the VMM range's.
fn vmm_id(pid: u32) -> u32 {
    let uid: u32 = status_field(pid, "Uid")
        .split_whitespace()
        .next()
        .and_then(|u| u.parse().ok())
        .unwrap();
    let (first, last) = agentos_core::rundir::vmm_ids().unwrap();
    assert!(
        (first..=last).contains(&uid),
        "uid {uid} not in {first}-{last}"
    );
    uid
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
    // A user and group of its own from the VMM range, real, effective, saved and fs ids.
    let id = vmm_id(pid);
    let own = vec![id.to_string(); 4].join("\t");
    assert_eq!(status_field(pid, "Uid"), own);
    assert_eq!(status_field(pid, "Gid"), own);
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

    // What the VMM can see: its own directory in its run directory, /dev/kvm, and the image's
    // kernel and initrd.
    let img = image::find_image(&image::default_cache_dir(), AGENT_IMAGE)
        .expect("no agent image: run scripts/setup");
    let image_files: Vec<PathBuf> = [img.boot_kernel(), &img.initrd]
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
    let in_vmm_dir = |f: &Path| {
        f.strip_prefix(run_rel).is_ok_and(|rel| {
            let mut parts = rel.components();
            parts.next();
            parts.next().is_some_and(|c| c.as_os_str() == "vmm")
        })
    };
    let strays: Vec<&PathBuf> = files
        .iter()
        .filter(|f| !in_vmm_dir(f) && *f != Path::new("dev/kvm") && !image_files.contains(f))
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

/// The jailed VMMs running under `marker` (the processes that run guests), once there are
/// `count` of them with their ids changed.
fn jailed_vmms(marker: &str, count: usize, deadline: Instant) -> Vec<u32> {
    loop {
        let vmms: Vec<u32> = crate::common::vmm_processes(marker)
            .into_iter()
            .filter(|pid| {
                try_status_field(*pid, "CapEff").as_deref() == Some("0000000000000000")
                    && try_status_field(*pid, "NoNewPrivs").as_deref() == Some("1")
            })
            .collect();
        if vmms.len() >= count {
            return vmms;
        }
        assert!(
            Instant::now() < deadline,
            "{count} jailed VMMs did not appear: {vmms:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Signal 0 (a check, nothing delivered) to `pid` from user `uid`, in a child process that
/// drops to that user alone; the errno of the attempt (0: it may signal it).
fn signal_as(uid: u32, pid: u32) -> i32 {
    // SAFETY: the child makes only async-signal-safe system calls (setgroups, setresgid,
    // setresuid, kill, _exit).
    let child = unsafe { libc::fork() };
    if child == 0 {
        // SAFETY: as above.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(uid, uid, uid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                libc::_exit(255);
            }
            let rc = libc::kill(pid as libc::pid_t, 0);
            libc::_exit(if rc == 0 {
                0
            } else {
                *libc::__errno_location()
            });
        }
    }
    let mut status = 0;
    // SAFETY: waits for our own child with a valid out pointer.
    assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
    assert!(libc::WIFEXITED(status), "the signalling child died");
    libc::WEXITSTATUS(status)
}

/// Connects to the Unix socket `path` as user `uid` (in a child process, which drops to that
/// user alone) and returns the errno of the attempt (0: connected).
fn connect_as(uid: u32, path: &Path) -> i32 {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    assert!(bytes.len() < addr.sun_path.len());
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: the child makes only async-signal-safe system calls (setgroups, setresgid,
    // setresuid, socket, connect, _exit) on memory prepared before the fork.
    let child = unsafe { libc::fork() };
    if child == 0 {
        // SAFETY: as above.
        unsafe {
            let errno = || *libc::__errno_location();
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(uid, uid, uid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                libc::_exit(255);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            let rc = libc::connect(fd, std::ptr::from_ref(&addr).cast(), len);
            libc::_exit(if rc == 0 { 0 } else { errno() });
        }
    }
    let mut status = 0;
    // SAFETY: waits for our own child with a valid out pointer.
    assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
    assert!(libc::WIFEXITED(status), "the connecting child died");
    libc::WEXITSTATUS(status)
}

#[test]
fn each_vm_runs_as_a_user_of_its_own_that_cannot_reach_another_vms_sockets() {
    if !vm_available() {
        return;
    }
    let _machine = share_machine();
    let t = Scratch::new("jail-ids");
    let marker = t.run_dir().display().to_string();
    let a = t.spawn(&["run", "--", "/bin/sh", "-c", "sleep 8; echo a"]);
    let b = t.spawn(&["run", "--", "/bin/sh", "-c", "sleep 8; echo b"]);
    let vmms = jailed_vmms(&marker, 2, Instant::now() + Duration::from_secs(180));
    let ids: Vec<u32> = vmms.iter().map(|pid| vmm_id(*pid)).collect();
    assert_ne!(ids[0], ids[1], "two VMs share a user");
    // One VMM's user may not signal (nor trace) the other VMM; its own user may.
    assert_eq!(signal_as(ids[0], vmms[1]), libc::EPERM, "{ids:?} {vmms:?}");
    assert_eq!(signal_as(ids[1], vmms[0]), libc::EPERM, "{ids:?} {vmms:?}");
    assert_eq!(signal_as(ids[0], vmms[0]), 0, "{ids:?} {vmms:?}");
    // Each VM's own directory belongs to its user; the other's user is refused there.
    let dirs: Vec<PathBuf> = std::fs::read_dir(t.run_dir())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path().join("vmm"))
        .filter(|d| d.is_dir())
        .collect();
    assert_eq!(dirs.len(), 2, "{dirs:?}");
    // A VMM is jailed before it builds its VM and binds its socket: wait for both sockets.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dirs.iter().all(|d| d.join("vsock.sock").exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for dir in &dirs {
        use std::os::unix::fs::MetadataExt;
        let owner = std::fs::metadata(dir).unwrap().uid();
        assert!(ids.contains(&owner), "{} belongs to {owner}", dir.display());
        let other = *ids.iter().find(|id| **id != owner).unwrap();
        for socket in ["vsock.sock", "vsock.sock_1024"] {
            let errno = connect_as(other, &dir.join(socket));
            assert_eq!(
                errno,
                libc::EACCES,
                "user {other} reached {}",
                dir.join(socket).display()
            );
        }
        // The VMM's own socket is there and listening: root gets through the run directories
        // (a client that says nothing is dropped by the VMM). The control socket is left alone:
        // a connection there would be taken for the guest agent's.
        assert_eq!(connect_as(0, &dir.join("vsock.sock")), 0);
    }
    for (child, word) in [(a, "a\n"), (b, "b\n")] {
        let out = t.finish(child, crate::common::command_limit());
        assert!(out.status.success(), "{}", describe(&out));
        assert_eq!(text(&out.stdout), word);
    }
    t.assert_nothing_left();
}

/// Root without XDG_RUNTIME_DIR used `/tmp/agentos-0`: anyone could make it first and receive
/// root's sockets, or have root write through symlinks planted in it. Root's runs use
/// `/run/agentos` now and never look at a `/tmp/agentos-0` someone else made.
#[test]
fn a_run_by_root_neither_uses_nor_writes_into_a_tmp_directory_another_user_made() {
    if !vm_available() {
        return;
    }
    let _machine = share_machine();
    let theirs = std::env::temp_dir().join("agentos-0");
    if theirs.exists() {
        agentos_core::testing::skip(&format!("{} exists already", theirs.display()));
        return;
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::fs::create_dir(&theirs).unwrap();
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", theirs.join("label")).unwrap();
    std::fs::write(theirs.join("daemon.sock"), "planted").unwrap();
    std::os::unix::fs::chown(theirs.join("daemon.sock"), Some(65534), Some(65534)).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let listing = |dir: &Path| {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let before = (
        listing(&theirs),
        std::fs::metadata(&theirs).unwrap().mtime(),
    );
    let passwd = std::fs::read("/etc/passwd").ok();
    let out = std::process::Command::new(agentos_bin())
        .env_remove("AGENTOS_RUN_DIR")
        .env_remove("XDG_RUNTIME_DIR")
        .args(["run", "--", "/bin/echo", "root's run"])
        .output()
        .unwrap();
    let after = (
        listing(&theirs),
        std::fs::metadata(&theirs).unwrap().mtime(),
    );
    let _ = std::fs::remove_dir_all(&theirs);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(text(&out.stdout), "root's run\n");
    assert_eq!(before, after, "agentos touched {}", theirs.display());
    assert_eq!(std::fs::read("/etc/passwd").ok(), passwd);
}

/// A VMM started by another user than root runs in the rootless jail: a user namespace that
/// maps only that user, its own namespaces and root, no capabilities.
#[test]
fn a_run_by_another_user_is_jailed_rootless() {
    if !vm_available() {
        return;
    }
    let _machine = share_machine();
    let t = Scratch::new("rootless");
    let user: u32 = 65534;
    let kvm = KvmAccess::grant(user);
    // The agent image, where that user can read it.
    let home = t.dir.join("home");
    let img = image::find_image(&image::default_cache_dir(), AGENT_IMAGE)
        .expect("no agent image: run scripts/setup");
    let images = home.join("images").join(AGENT_IMAGE);
    std::fs::create_dir_all(&images).unwrap();
    let files = [Some(&img.vmlinuz), img.vmlinux.as_ref(), Some(&img.initrd)];
    for file in files
        .into_iter()
        .flatten()
        .chain([&img.dir.join("manifest.json")])
    {
        std::fs::copy(file, images.join(file.file_name().unwrap())).unwrap();
    }
    // The home is the user's, so that its first command can cache its KVM probe there.
    std::os::unix::fs::chown(&home, Some(user), Some(user)).unwrap();
    // A directory of that user's for its run directories.
    let runs = t.dir.join("user");
    std::fs::create_dir(&runs).unwrap();
    std::os::unix::fs::chown(&runs, Some(user), Some(user)).unwrap();
    let marker = runs.display().to_string();
    use std::os::unix::process::CommandExt;
    let as_user = || {
        let mut cmd = std::process::Command::new(agentos_bin());
        cmd.uid(user)
            .gid(user)
            .env("AGENTOS_HOME", &home)
            .env("AGENTOS_RUN_DIR", runs.join("run"))
            .env("HOME", &runs);
        cmd
    };
    // The first command of a new home probes whether this KVM boots Linux, with a VMM of its
    // own that ends at once; doctor does it now, so the only VMM below is the run's.
    let doctor = as_user().arg("doctor").output().unwrap();
    assert!(
        home.join("kvm-probe.json").is_file(),
        "doctor left no KVM probe: {}",
        describe(&doctor)
    );
    let child = as_user()
        .args([
            "run",
            "--json",
            "--",
            "/bin/sh",
            "-c",
            "sleep 5; echo inside",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = jailed_vmm_pid(&marker, Instant::now() + Duration::from_secs(180));
    // The VMM enters its namespaces one after another: wait until it is in all of them.
    let namespaces = ["user", "mnt", "net", "ipc", "uts", "pid"];
    let shared = |ns: &str| {
        std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).ok()
            == std::fs::read_link(format!("/proc/self/ns/{ns}")).ok()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while namespaces.iter().any(|ns| shared(ns)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    let id = user.to_string();
    assert_eq!(
        status_field(pid, "Uid")
            .split_whitespace()
            .collect::<Vec<_>>(),
        [id.as_str(); 4]
    );
    for ns in namespaces {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "the rootless VMM shares our {ns} namespace");
    }
    let out = t.finish(child, crate::common::command_limit());
    drop(kvm);
    assert!(out.status.success(), "{}", describe(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["jail"], "rootless", "{report}");
    assert_eq!(report["stdout"], "inside\n", "{report}");
}

/// Lets `user` open /dev/kvm for the length of a test: in the carrier (which no one else uses)
/// by opening the device's mode, and back when dropped.
struct KvmAccess {
    mode: u32,
}

impl KvmAccess {
    fn grant(user: u32) -> Self {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata("/dev/kvm").unwrap();
        let mode = meta.mode() & 0o7777;
        let others_may = mode & 0o006 == 0o006;
        let in_carrier = std::env::var_os(agentos::carrier::IN_CARRIER_ENV).is_some();
        assert!(
            others_may || in_carrier || meta.uid() == user,
            "user {user} cannot open /dev/kvm (mode {mode:o}) and this is no carrier whose device may be opened up"
        );
        if !others_may {
            std::fs::set_permissions("/dev/kvm", std::fs::Permissions::from_mode(0o666)).unwrap();
        }
        Self { mode }
    }
}

impl Drop for KvmAccess {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions("/dev/kvm", std::fs::Permissions::from_mode(self.mode));
    }
}
