//! Templates: a `base` agent has GNU bash and CPython from the template's shared read-only disk,
//! for root and for `user` alike; an agent without it has neither.

use crate::common::{Scratch, take_machine, vm_available};
use crate::daemon::Daemon;

#[test]
fn a_base_agent_runs_bash_and_python3_as_root_and_as_user() {
    if !vm_available() {
        return;
    }
    let _machine = take_machine();
    let t = Scratch::new("template-base");
    let d = Daemon::start(&t);
    d.refused(
        &["spawn", "--name", "x", "--template", "ubuntu"],
        "unknown template `ubuntu`; the known templates are: base",
    );
    d.ok(&["spawn", "--name", "b", "--template", "base"]);
    d.ok(&["spawn", "--name", "plain"]);

    // How the e2b SDK runs every command: a login shell, as `user`, in its home.
    let bash = ["/bin/bash", "-l", "-c"];
    let as_user = |script: &str| {
        let mut args = vec!["exec", "b", "--user", "user", "--"];
        args.extend(bash);
        args.push(script);
        d.ok(&args)
    };
    let version = as_user("echo $BASH_VERSION; id -u; pwd");
    let lines: Vec<&str> = version.lines().collect();
    assert!(
        lines.len() == 3 && lines[0].starts_with("5.") && lines[0].ends_with("-release"),
        "{version}"
    );
    assert_eq!(&lines[1..], ["1000", "/home/user"]);
    let hash = "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881";
    let python = r#"python3 -c 'import hashlib,json;print(hashlib.sha256(b"x").hexdigest())'"#;
    assert_eq!(as_user(python), format!("{hash}\n"));
    // The standard library whole: modules in C with libraries of their own, subprocesses.
    assert_eq!(
        as_user(
            "python3 -c 'import json, os, subprocess, ssl, sqlite3, ctypes, lzma, bz2, zlib, decimal, readline; \
             print(subprocess.run([\"id\", \"-u\"], capture_output=True, text=True).stdout.strip())'"
        ),
        "1000\n"
    );
    // As root too, and `python` is python3.
    assert_eq!(
        d.ok(&[
            "exec",
            "b",
            "--",
            "/bin/bash",
            "-l",
            "-c",
            "id -u; python -c 'import sys; print(sys.version_info[0])'"
        ]),
        "0\n3\n"
    );
    // The disk is read-only: nothing of the template can be changed by an agent.
    let out = d.cli(&[
        "exec",
        "b",
        "--",
        "/bin/sh",
        "-c",
        "touch /usr/lib/python3.11/x",
    ]);
    assert!(!out.status.success());

    // Without the template there is no bash and no python3.
    assert_eq!(
        d.ok(&[
            "exec",
            "plain",
            "--",
            "/bin/sh",
            "-c",
            "test -e /bin/bash || echo no bash; command -v python3 || echo no python3"
        ]),
        "no bash\nno python3\n"
    );

    d.ok(&["rm", "--force", "b"]);
    d.ok(&["rm", "--force", "plain"]);
    let status = d.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "{status:?}");
    t.assert_nothing_left();
}
