//! The attacks of `host` cases: what a local user, or a VMM its guest took over, would try
//! against agentos's side of the host. Each runs real `agentos` commands (or a real VM) and
//! checks what they did, the way the other cases do.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::report::{CaseReport, excerpt};
use super::runner::{Env, agentos, boot_default, finish};
use agentos_image::{self as image, AGENT_IMAGE};

/// Another user on the host: `nobody`, which owns nothing.
const OTHER_USER: u32 = 65534;
/// How long one command of an attack may take.
const COMMAND_LIMIT: Duration = Duration::from_secs(300);
/// How long `agentos run` may take beside a lock someone else holds: a boot, not a wait for
/// the lock.
const RUN_LIMIT: Duration = Duration::from_secs(240);

pub fn run(attack: &str, env: &Env, report: &mut CaseReport) {
    let scratch = env.scratch.join(attack);
    let _ = std::fs::remove_dir_all(&scratch);
    if let Err(e) = std::fs::create_dir_all(&scratch) {
        report.check(
            "the attack's scratch directory is made",
            false,
            e.to_string(),
        );
        return;
    }
    match attack {
        "run-dir-taken-first" => run_dir_taken_first(&scratch, report),
        "symlinks-in-the-vmms-directory" => symlinks_in_the_vmms_directory(&scratch, env, report),
        "vmm-report-through-a-symlink" => vmm_report_through_a_symlink(&scratch, report),
        "planted-admission-lock" => planted_admission_lock(&scratch, report),
        "jail-without-capabilities" => jail_without_capabilities(report),
        other => report.check(format!("a host attack `{other}` exists"), false, ""),
    }
    let _ = std::fs::remove_dir_all(&scratch);
}

/// A file whose contents must not change: what a planted symlink points at.
fn canary(dir: &Path) -> PathBuf {
    let path = dir.join("canary");
    let _ = std::fs::write(&path, "untouched");
    path
}

fn canary_untouched(path: &Path, report: &mut CaseReport) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    report.check(
        "the file the symlinks point at is untouched",
        text == "untouched",
        excerpt(&text),
    );
}

/// Names in `dir` and their kinds, sorted: what someone else's directory held.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| {
                    let kind = e.file_type().map_or("?", |t| {
                        if t.is_symlink() {
                            "symlink"
                        } else if t.is_dir() {
                            "dir"
                        } else {
                            "file"
                        }
                    });
                    format!("{} ({kind})", e.file_name().to_string_lossy())
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Another user made the run-directory base first (as anyone can make a name in /tmp), with a
/// socket where the daemon's would be and a symlink where a label would be written. agentos
/// must neither use it nor write into it, and a client must not talk to the planted socket.
fn run_dir_taken_first(scratch: &Path, report: &mut CaseReport) {
    let canary = canary(scratch);
    let taken = scratch.join("taken");
    let planted = (|| -> std::io::Result<std::os::unix::net::UnixListener> {
        std::fs::create_dir(&taken)?;
        std::fs::set_permissions(&taken, std::fs::Permissions::from_mode(0o777))?;
        std::os::unix::fs::symlink(&canary, taken.join("label"))?;
        let listener = std::os::unix::net::UnixListener::bind(taken.join("daemon.sock"))?;
        listener.set_nonblocking(true)?;
        std::os::unix::fs::chown(
            taken.join("daemon.sock"),
            Some(OTHER_USER),
            Some(OTHER_USER),
        )?;
        std::os::unix::fs::chown(&taken, Some(OTHER_USER), Some(OTHER_USER))?;
        Ok(listener)
    })();
    let planted = match planted {
        Ok(listener) => listener,
        Err(e) => {
            report.check("the taken directory is planted", false, e.to_string());
            return;
        }
    };
    let before = (listing(&taken), mtime(&taken));
    let mut outcomes = Vec::new();
    for args in [
        &["run", "--", "/bin/true"][..],
        &["exec", "victim", "--", "/bin/true"][..],
        &["ps"][..],
    ] {
        let child = agentos()
            .env(agentos_core::rundir::RUN_DIR_ENV, &taken)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let Ok(child) = child else {
            report.check("agentos starts", false, "");
            return;
        };
        let (code, _, stderr) = finish(child, COMMAND_LIMIT);
        report.check(
            format!("`agentos {}` refuses the directory", args[0]),
            code.is_some_and(|c| c != 0) && stderr.contains("belongs to user 65534, not to you"),
            format!("{code:?}: {}", excerpt(&stderr)),
        );
        outcomes.push(format!("{}: {}", args[0], excerpt(&stderr)));
    }
    report.evidence("refusals", outcomes);
    let after = (listing(&taken), mtime(&taken));
    report.evidence("taken_directory", after.0.clone());
    report.check(
        "nothing was written into the taken directory",
        before == after,
        format!("{before:?} -> {after:?}"),
    );
    report.check(
        "no client connected to the planted daemon socket",
        planted.accept().is_err(),
        "",
    );
    canary_untouched(&canary, report);
}

fn mtime(path: &Path) -> i64 {
    std::fs::symlink_metadata(path).map_or(0, |m| m.mtime())
}

/// A VMM its guest took over owns its directory and may put symlinks there, at the names of the
/// sockets agentos will bind for it. Binding must replace the symlinks, never follow them.
fn symlinks_in_the_vmms_directory(scratch: &Path, env: &Env, report: &mut CaseReport) {
    let canary = canary(scratch);
    let Some(mut vm) = boot_default(env, report) else {
        return;
    };
    let ports = [1025u32, 2000];
    let mut planted = true;
    for port in ports {
        planted &= std::os::unix::fs::symlink(&canary, vm.host_socket(port)).is_ok();
    }
    report.check("symlinks are planted in the VMM's directory", planted, "");
    let mut bound = Vec::new();
    for port in ports {
        let socket = vm.host_socket(port);
        match vm.listen_for_guest(port) {
            Ok(listener) => {
                let is_socket = std::fs::symlink_metadata(&socket)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
                report.check(
                    format!("port {port}: the symlink was replaced by the socket"),
                    is_socket,
                    socket.display().to_string(),
                );
                bound.push(listener);
            }
            Err(e) => report.check(format!("port {port} is listened on"), false, e.to_string()),
        }
    }
    drop(bound);
    canary_untouched(&canary, report);
    let alive = vm.conn().ping().is_ok();
    report.check("the guest agent still answers", alive, "");
    vm.shutdown();
}

/// `agentos-vmm --report` and `--console-log` pointing at a symlink (to a file of root's):
/// refused, the file untouched.
fn vmm_report_through_a_symlink(scratch: &Path, report: &mut CaseReport) {
    let canary = canary(scratch);
    let Ok(img) = image::find_image(&image::default_cache_dir(), AGENT_IMAGE) else {
        report.check("the agent image exists", false, "run scripts/setup");
        return;
    };
    for flag in ["--report", "--console-log"] {
        let link = scratch.join(format!("link{flag}"));
        if std::os::unix::fs::symlink(&canary, &link).is_err() {
            report.check("the symlink is planted", false, "");
            return;
        }
        let Ok(vmm) = agentos_core::agent::vm::vmm_binary() else {
            report.check("the VMM binary exists", false, "");
            return;
        };
        let child = Command::new(vmm)
            .arg("--kernel")
            .arg(img.boot_kernel())
            .arg(flag)
            .arg(&link)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let Ok(child) = child else {
            report.check("agentos-vmm starts", false, "");
            return;
        };
        let (code, _, stderr) = finish(child, COMMAND_LIMIT);
        report.check(
            format!("`agentos-vmm {flag} SYMLINK` is refused"),
            code == Some(1) && stderr.contains("a symlink is refused"),
            format!("{code:?}: {}", excerpt(&stderr)),
        );
    }
    canary_untouched(&canary, report);
}

/// Another user holds a lock where agentos once took its admission lock (`/tmp`, anyone's):
/// agents must start as if it were not there.
fn planted_admission_lock(scratch: &Path, report: &mut CaseReport) {
    let lock = std::env::temp_dir().join("agentos-admission.lock");
    let existed = lock.exists();
    let holder = hold_lock_as(OTHER_USER, &lock);
    let Some(mut holder) = holder else {
        if !existed {
            let _ = std::fs::remove_file(&lock);
        }
        report.check(
            "another user holds the lock",
            false,
            lock.display().to_string(),
        );
        return;
    };
    let started = Instant::now();
    let child = agentos()
        .env(agentos_core::rundir::RUN_DIR_ENV, scratch.join("run"))
        .args(["run", "--", "/bin/echo", "started"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let outcome = child.map(|c| finish(c, RUN_LIMIT));
    let took = started.elapsed();
    let _ = holder.kill();
    let _ = holder.wait();
    if !existed {
        let _ = std::fs::remove_file(&lock);
    }
    let Ok((code, stdout, stderr)) = outcome else {
        report.check("agentos starts", false, "");
        return;
    };
    report.evidence("run_s", took.as_secs_f64());
    report.check(
        "`agentos run` starts its agent beside the planted lock",
        code == Some(0) && stdout == "started\n",
        format!("{code:?}: {} {}", excerpt(&stdout), excerpt(&stderr)),
    );
}

/// A process of `user` that holds an exclusive lock on `path` until killed: the file made as
/// that user's, locked by a child that became that user and then runs `sleep`, keeping the
/// locked descriptor across the exec.
fn hold_lock_as(user: u32, path: &Path) -> Option<std::process::Child> {
    use std::os::unix::process::CommandExt;
    if !path.exists() {
        std::fs::write(path, "").ok()?;
        std::os::unix::fs::chown(path, Some(user), Some(user)).ok()?;
    }
    let file = std::fs::File::open(path).ok()?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    let mut cmd = Command::new("sleep");
    cmd.arg("600")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: the closure runs between fork and exec and makes only setgroups, setresgid,
    // setresuid, flock and fcntl calls, all async-signal-safe, on a descriptor the parent keeps
    // open until the child is spawned; the child's copy of it loses close-on-exec, so `sleep`
    // holds the lock.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(user, user, user) != 0
                || libc::setresuid(user, user, user) != 0
                || libc::flock(fd, libc::LOCK_EX) != 0
                || libc::fcntl(fd, libc::F_SETFD, 0) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let mut child = cmd.spawn().ok()?;
    drop(file);
    // The lock is held once the child's flock returned: probe it from here.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let probe = std::fs::File::open(path).ok()?;
        // SAFETY: flock on a descriptor we own.
        let free = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&probe),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } == 0;
        if !free {
            return Some(child);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Root without a single capability (a container that dropped them all) cannot build the jail:
/// the agent must not start rather than start unconfined.
fn jail_without_capabilities(report: &mut CaseReport) {
    let mut cmd = agentos();
    cmd.args(["run", "--", "/bin/echo", "unconfined"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    agentos_jail::without_capabilities(&mut cmd);
    let Ok(child) = cmd.spawn() else {
        report.check("agentos starts", false, "");
        return;
    };
    let (code, stdout, stderr) = finish(child, COMMAND_LIMIT);
    report.evidence("stderr", excerpt(&stderr));
    report.check(
        "the agent does not start unconfined",
        code.is_some_and(|c| c != 0) && !stdout.contains("unconfined"),
        format!("{code:?}: {}", excerpt(&stdout)),
    );
    report.check(
        "the error says the jail could not be built",
        stderr.contains("cannot jail the VMM"),
        excerpt(&stderr),
    );
}
