//! `agentos-vmm` and its jail, with the tiny guest on this host's KVM: a jail that cannot be
//! built stops the VMM, and so does a cgroup it cannot join; the VMM's directory must be its
//! user's own; the files it writes outside it are opened as the caller, never through a symlink,
//! and nothing changes owner.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use agentos_core::testing::{is_root, skip};
use agentos_tiny_guest::{BANNER, TINY_GUEST_ELF, VIRTIO_FOUND};

/// The user the VMM runs as unless told otherwise.
const NOBODY: u32 = 65534;

/// The tiny guest in a directory anyone may read (the jail binds it in for the VMM's user).
struct Guest {
    dir: tempfile::TempDir,
}

impl Guest {
    /// None (the test skips, or fails under AGENTOS_TEST_NO_SKIP) without root and /dev/kvm.
    fn new() -> Option<Self> {
        if !is_root("enter the full jail") {
            return None;
        }
        if !Path::new("/dev/kvm").exists() {
            skip("no /dev/kvm");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.path().join("tiny.elf"), TINY_GUEST_ELF).unwrap();
        Some(Self { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A directory for the VMM's sockets, owned by `owner`.
    fn socket_dir(&self, name: &str, owner: u32) -> PathBuf {
        let dir = self.path(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&dir, Some(owner), Some(owner)).unwrap();
        dir
    }

    /// `agentos-vmm` for the tiny guest, with `args` added, from `cwd`.
    fn vmm(&self, args: &[&str], cwd: &Path) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentos-vmm"));
        cmd.current_dir(cwd)
            .arg("--kernel")
            .arg(self.path("tiny.elf"))
            .args(["--memory", "16", "--console"])
            .args(args);
        cmd
    }
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The VMM exited with status 1, saying each of `said` on stderr, and the guest never ran.
fn refused_before_the_guest_ran(out: &Output, said: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", describe(out));
    assert!(said.iter().all(|s| stderr.contains(s)), "{}", describe(out));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(BANNER),
        "the guest ran: {}",
        describe(out)
    );
}

/// A VMM that cannot join the cgroup it is given does not run: it never runs outside the
/// limits its starter set. Nor does one given another file than a `cgroup.procs`, which it
/// leaves as it was.
#[test]
fn a_cgroup_the_vmm_cannot_join_stops_it_before_the_guest_runs() {
    let Some(guest) = Guest::new() else {
        return;
    };
    let missing = guest.path("no-such-cgroup").join("cgroup.procs");
    let other = guest.path("notes.txt");
    std::fs::write(&other, "kept").unwrap();
    for (procs, error) in [
        (&missing, "cannot join the cgroup through"),
        (&other, "takes a cgroup's `cgroup.procs` file"),
    ] {
        let out = guest
            .vmm(
                &["--cgroup-procs", procs.to_str().unwrap()],
                guest.dir.path(),
            )
            .output()
            .unwrap();
        refused_before_the_guest_ran(&out, &[error, procs.to_str().unwrap()]);
    }
    assert_eq!(std::fs::read_to_string(&other).unwrap(), "kept");
}

/// Root without a single capability (an empty bounding set, as in a container that drops them
/// all) cannot create namespaces: the VMM must refuse to run rather than run unconfined.
#[test]
fn the_jail_fails_closed_when_a_layer_cannot_be_applied() {
    let Some(guest) = Guest::new() else {
        return;
    };
    let without_capabilities = |extra: &[&str]| {
        let mut vmm = guest.vmm(extra, guest.dir.path());
        agentos_jail::without_capabilities(&mut vmm);
        vmm.output().unwrap()
    };
    let out = without_capabilities(&[]);
    refused_before_the_guest_ran(&out, &["cannot jail the VMM", "PID namespace"]);
    // Asked for explicitly, the same VMM runs unconfined.
    let out = without_capabilities(&["--no-jail"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(BANNER));
}

#[test]
fn the_vmms_socket_directory_must_be_its_users_own() {
    let Some(guest) = Guest::new() else {
        return;
    };
    let cwd = guest.dir.path();
    let roots = guest.socket_dir("roots", 0);
    let out = guest
        .vmm(
            &["--vsock-uds", &roots.join("v.sock").display().to_string()],
            cwd,
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("belongs to user 0, not to the VMM's user 65534"),
        "{}",
        describe(&out)
    );
    assert_eq!(std::fs::metadata(&roots).unwrap().uid(), 0, "chowned");
    // A symlink to the VMM's own directory is not that directory.
    let own = guest.socket_dir("own", NOBODY);
    std::os::unix::fs::symlink(&own, guest.path("link")).unwrap();
    let out = guest
        .vmm(
            &[
                "--vsock-uds",
                &guest.path("link").join("v.sock").display().to_string(),
            ],
            cwd,
        )
        .output()
        .unwrap();
    // The path is resolved first; what the jail checks and binds is the real directory.
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    // Its own directory: the guest finds its vsock device.
    let out = guest
        .vmm(
            &["--vsock-uds", &own.join("v.sock").display().to_string()],
            cwd,
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(console.contains(VIRTIO_FOUND), "{}", describe(&out));
}

/// `--report ./r.json` in a directory of the caller's: the directory keeps its owner and mode
/// (the VMM's user is given nothing), and a report or console log that is a symlink is refused
/// without touching what it points to.
#[test]
fn the_report_and_console_log_are_opened_as_the_caller_and_nothing_changes_owner() {
    let Some(guest) = Guest::new() else {
        return;
    };
    let home = guest.path("home");
    std::fs::create_dir(&home).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o750)).unwrap();
    let before = std::fs::metadata(&home).unwrap();
    let out = guest
        .vmm(&["--report", "./r.json", "--console-log", "c.log"], &home)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let after = std::fs::metadata(&home).unwrap();
    assert_eq!(
        (after.uid(), after.gid(), after.mode()),
        (before.uid(), before.gid(), before.mode())
    );
    for file in ["r.json", "c.log"] {
        let meta = std::fs::metadata(home.join(file)).unwrap();
        assert_eq!(meta.uid(), 0, "{file} belongs to someone else");
        assert_eq!(meta.mode() & 0o777, 0o600, "{file}");
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(home.join("r.json")).unwrap()).unwrap();
    assert_eq!(report["outcome"], "shutdown", "{report}");
    assert_eq!(report["jail"], "full", "{report}");
    // The jailed VMM reads its own peak memory under its seccomp filter: a few MiB.
    let peak = report["peak_rss_kib"].as_u64().unwrap_or(0);
    assert!((512..32 * 1024).contains(&peak), "{report}");
    assert!(
        std::fs::read_to_string(home.join("c.log"))
            .unwrap()
            .starts_with(BANNER)
    );

    let precious = guest.path("precious");
    std::fs::write(&precious, "keep").unwrap();
    for flag in ["--report", "--console-log"] {
        let link = home.join(format!("link{flag}"));
        std::os::unix::fs::symlink(&precious, &link).unwrap();
        let out = guest
            .vmm(&[flag, &link.display().to_string()], &home)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{flag}: {}", describe(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("a symlink is refused"),
            "{}",
            describe(&out)
        );
        assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep");
    }
}
