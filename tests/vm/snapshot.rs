//! Snapshots: `agentos run --snapshot-to` saves an agent, `agentos run --from` restores it (many
//! times: each restore is a clone of one saved agent), and a snapshot that cannot be restored is
//! refused before anything starts.

use std::path::Path;

use crate::common::{Scratch, command_limit, describe, share_machine, text, vm_available};

/// A program that outlives the command that started it: a counter the guest bumps five times a
/// second, in a session of its own so that the end of the command does not end it.
const START_COUNTER: &str = "echo before > /tmp/x; \
    setsid sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.2; done' \
    </dev/null >/dev/null 2>&1 & sleep 1; echo started";
/// Reads the counter twice, a second apart, a file written before the snapshot, random bytes
/// and the wall clock.
const READ_BACK: &str = "cat /tmp/x; a=$(cat /tmp/counter); sleep 1; b=$(cat /tmp/counter); \
    echo $a $b; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'; echo; date +%s";

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn copy_snapshot(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for name in ["vm.state", "memory"] {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }
}

#[test]
fn a_saved_agent_restores_with_its_files_and_programs_as_many_clones() {
    if !vm_available() {
        return;
    }
    let _machine = share_machine();
    let t = Scratch::new("snapshot");
    let saved = t.dir.join("saved");
    std::fs::create_dir_all(&saved).unwrap();
    let out = t.output(
        &[
            "run",
            "--snapshot-to",
            saved.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            START_COUNTER,
        ],
        b"",
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(text(&out.stdout).trim(), "started", "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("saved the agent to"),
        "{}",
        describe(&out)
    );
    let memory = std::fs::metadata(saved.join("memory")).unwrap();
    assert_eq!(memory.len(), 256 << 20, "the memory file is guest RAM");

    // Two clones of the one saved agent at once, each with the file and the running program,
    // random bytes of its own and the wall clock of now, not of the save.
    std::thread::sleep(std::time::Duration::from_secs(5));
    let clones: Vec<_> = (0..2)
        .map(|_| {
            t.agentos()
                .args(["run", "--from", saved.to_str().unwrap(), "--"])
                .args(["/bin/sh", "-c", READ_BACK])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("cannot start agentos")
        })
        .collect();
    let mut random = Vec::new();
    for clone in clones {
        let out = t.finish(clone, command_limit());
        assert!(out.status.success(), "{}", describe(&out));
        let stdout = text(&out.stdout);
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.first(), Some(&"before"), "{}", describe(&out));
        let counts: Vec<u64> = lines
            .get(1)
            .map(|l| {
                l.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            counts.len() == 2 && counts[0] >= 5 && counts[1] > counts[0],
            "the counter started before the snapshot still runs: {}",
            describe(&out)
        );
        let bytes = lines.get(2).copied().unwrap_or_default().to_owned();
        assert_eq!(bytes.len(), 32, "{}", describe(&out));
        random.push(bytes);
        let guest_time: i64 = lines
            .get(3)
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("no date: {}", describe(&out)));
        assert!(
            (guest_time - unix_now()).abs() <= 3,
            "the restored guest's clock is {guest_time}, the host's {}",
            unix_now()
        );
    }
    assert_ne!(
        random[0], random[1],
        "two clones read the same random bytes"
    );

    // A restored agent can be saved again, and that snapshot restores too.
    let again = t.dir.join("again");
    std::fs::create_dir_all(&again).unwrap();
    let out = t.output(
        &[
            "run",
            "--from",
            saved.to_str().unwrap(),
            "--snapshot-to",
            again.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            "echo second > /tmp/y",
        ],
        b"",
    );
    assert!(out.status.success(), "{}", describe(&out));
    let out = t.output(
        &[
            "run",
            "--from",
            again.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            "cat /tmp/x /tmp/y",
        ],
        b"",
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(text(&out.stdout), "before\nsecond\n", "{}", describe(&out));

    // Snapshots that cannot be restored: each refused with what is wrong, nothing started.
    let refusal = |dir: &Path| {
        let out = t.output(
            &["run", "--from", dir.to_str().unwrap(), "--", "/bin/true"],
            b"",
        );
        assert!(!out.status.success(), "{}", describe(&out));
        text(&out.stderr)
    };
    let truncated = t.dir.join("truncated");
    copy_snapshot(&saved, &truncated);
    let state = std::fs::read(saved.join("vm.state")).unwrap();
    std::fs::write(truncated.join("vm.state"), &state[..state.len() - 100]).unwrap();
    let err = refusal(&truncated);
    assert!(err.contains("cut short"), "{err}");

    let corrupt = t.dir.join("corrupt");
    copy_snapshot(&saved, &corrupt);
    let mut bytes = state.clone();
    let at = bytes.len() - 50;
    bytes[at] = if bytes[at] == b'1' { b'2' } else { b'1' };
    std::fs::write(corrupt.join("vm.state"), &bytes).unwrap();
    let err = refusal(&corrupt);
    assert!(err.contains("does not match its checksum"), "{err}");

    let other_version = t.dir.join("other-version");
    copy_snapshot(&saved, &other_version);
    let header_end = state.iter().position(|&b| b == b'\n').unwrap();
    let header = String::from_utf8(state[..header_end].to_vec()).unwrap();
    let old = header.replacen("\"vmm_version\":\"", "\"vmm_version\":\"0.0.0-", 1);
    let mut rewritten = old.into_bytes();
    rewritten.extend_from_slice(&state[header_end..]);
    std::fs::write(other_version.join("vm.state"), rewritten).unwrap();
    let err = refusal(&other_version);
    assert!(err.contains("written by VMM 0.0.0-"), "{err}");

    let no_memory = t.dir.join("no-memory");
    copy_snapshot(&saved, &no_memory);
    std::fs::remove_file(no_memory.join("memory")).unwrap();
    let err = refusal(&no_memory);
    assert!(err.contains("memory file"), "{err}");
    assert!(err.contains("missing"), "{err}");

    let not_a_snapshot = t.dir.join("empty");
    std::fs::create_dir_all(&not_a_snapshot).unwrap();
    let err = refusal(&not_a_snapshot);
    assert!(err.contains("is not a snapshot"), "{err}");
    t.assert_nothing_left();
}
