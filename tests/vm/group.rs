//! `agentos group run`: agents in their own microVMs exchange messages through the router, which
//! knows each sender from its socket and allows only declared channels.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{Scratch, command_limit, describe, take_machine, vm_available};

/// `a` gets the input and pings `b` from a program (claiming to be `c`, and also trying `c`,
/// to which it has no channel); `b` answers pings with the sender it saw; `a` passes the answer
/// to the output.
const PING_PONG: &str = r#"name = "pingpong"
channels = ["input -> a", "a -> b", "b -> a", "a -> output", "c -> b"]

[[agent]]
name = "a"
exec = ["/bin/sh", "-c", '''
if [ "$AGENTOS_FROM" = input ]; then
  /init send b --kind ping --from c > /dev/null
  echo sneaky | /init send c || true
else
  echo "a got $AGENTOS_KIND from $AGENTOS_FROM: $(cat)"
fi
''']

[[agent]]
name = "b"
exec = ["/bin/sh", "-c", '''
if [ "$AGENTOS_KIND" = ping ]; then echo "pong for $AGENTOS_FROM: $(cat)"; fi
''']

[[agent]]
name = "c"
"#;

/// Starts `agentos group run` on a group file holding `toml` with a small input, plus `extra`
/// arguments.
fn start_group(t: &Scratch, toml: &str, extra: &[&str]) -> std::process::Child {
    let file = t.dir.join("group.toml");
    std::fs::write(&file, toml).unwrap();
    let input = t.dir.join("input.txt");
    std::fs::write(&input, "hello b\n").unwrap();
    let mut args = vec![
        "group",
        "run",
        file.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    t.spawn(&args)
}

/// The JSON report of a `group run --json` that must have succeeded.
fn report_of(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", describe(out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", describe(out)))
}

#[test]
fn agents_exchange_messages_along_declared_channels_only() {
    if !vm_available() {
        return;
    }
    let _machine = take_machine();
    let t = Scratch::new("group-pingpong");
    let child = start_group(&t, PING_PONG, &["--json", "--timeout", "300"]);
    let report = report_of(&t.finish(child, command_limit()));
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "{report}");
    // Both ways: a -> b (ping), b -> a (pong), and b saw `a`, not the `c` that a claimed.
    assert_eq!(
        results[0]["body"], "a got text from b: pong for a: hello b",
        "{report}"
    );
    let counters = &report["counters"];
    assert_eq!(counters["refused_no_channel"], 1, "{report}");
    assert_eq!(counters["forged_sender"], 1, "{report}");
    let trace = report["trace"].as_array().unwrap();
    let refused = trace
        .iter()
        .find(|e| e["event"] == "refused")
        .unwrap_or_else(|| panic!("no refusal traced: {report}"));
    assert_eq!(
        (&refused["from"], &refused["to"]),
        (&"a".into(), &"c".into())
    );
    let ping = trace
        .iter()
        .find(|e| e["event"] == "message" && e["kind"] == "ping")
        .unwrap_or_else(|| panic!("no ping traced: {report}"));
    assert_eq!(ping["from"], "a", "{report}");
    assert_eq!(ping["claimed_from"], "c", "{report}");
    assert!(
        report["unacknowledged"].as_object().unwrap().is_empty(),
        "{report}"
    );
    t.assert_nothing_left();
}

#[test]
fn a_bad_group_file_is_named_with_its_line() {
    let t = Scratch::new("group-bad-file");
    let file = t.dir.join("bad.toml");
    std::fs::write(&file, PING_PONG.replace("\"c -> b\"", "\"c -> d\"")).unwrap();
    let input = t.dir.join("input.txt");
    std::fs::write(&input, "x").unwrap();
    let out = t.output(
        &[
            "group",
            "run",
            file.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml:2: channel to `d`: no agent has that name"),
        "{err}"
    );
}

/// `sender` sends six messages to `receiver`, which takes a second over each; its VMM is killed
/// after two results. The router keeps what was not acknowledged, the agent is booted again,
/// and every message's result arrives.
const RESTART: &str = r#"name = "restart"
channels = ["input -> sender", "sender -> receiver", "receiver -> output"]

[[agent]]
name = "sender"
exec = ["/bin/sh", "-c", '''
for i in 1 2 3 4 5 6; do echo "m$i" | /init send receiver --kind item > /dev/null; done
''']

[[agent]]
name = "receiver"
memory = 200
exec = ["/bin/sh", "-c", 'body=$(cat); sleep 1; echo "got $body"']
"#;

#[test]
fn a_receiver_killed_mid_stream_is_restarted_and_gets_every_message() {
    if !vm_available() {
        return;
    }
    let _machine = take_machine();
    let t = Scratch::new("group-restart");
    let child = start_group(&t, RESTART, &["--json", "--timeout", "400"]);
    // Two results in the trace, then the receiver's VMM (the one VM of 200 MiB) is killed.
    let deadline = Instant::now() + Duration::from_secs(400);
    loop {
        assert!(Instant::now() < deadline, "no results came");
        if results_in_trace(&t.run_dir()) >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let receiver = vmm_with(&t.run_dir(), "--memory 200").expect("the receiver's VMM");
    // SAFETY: kill has no memory-safety preconditions; the pid is a VMM this test started.
    assert_eq!(unsafe { libc::kill(receiver, libc::SIGKILL) }, 0);

    let report = report_of(&t.finish(child, command_limit()));
    let bodies: Vec<&str> = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["body"].as_str().unwrap())
        .collect();
    let distinct: BTreeSet<&str> = bodies.iter().copied().collect();
    let expected: BTreeSet<String> = (1..=6).map(|i| format!("got m{i}")).collect();
    assert_eq!(
        distinct,
        expected.iter().map(String::as_str).collect(),
        "{report}"
    );
    // Only a message handled but not acknowledged before the kill may be handled twice.
    let redelivered = report["counters"]["redelivered"].as_u64().unwrap();
    assert!(
        (bodies.len() - distinct.len()) as u64 <= redelivered,
        "{report}"
    );
    let agents = report["agents"].as_array().unwrap();
    let restarted = agents.iter().find(|a| a["name"] == "receiver").unwrap();
    assert_eq!(restarted["restarts"], 1, "{report}");
    let events: Vec<&str> = report["trace"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["from"] == "receiver")
        .filter_map(|e| e["event"].as_str())
        .collect();
    assert!(
        events.contains(&"crashed") && events.contains(&"restarted"),
        "{report}"
    );
    assert!(
        report["unacknowledged"].as_object().unwrap().is_empty(),
        "{report}"
    );
    t.assert_nothing_left();
}

/// Results from `receiver` in the trace a group run writes under `run_dir`.
fn results_in_trace(run_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read_to_string(e.path().join("trace.jsonl")).ok())
        .flat_map(|text| {
            text.lines()
                .filter(|l| l.contains(r#""event":"result""#) && l.contains(r#""from":"receiver""#))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .count()
}

/// The pid of the process running the guest of the VMM under `run_dir` whose command line
/// contains `marker`.
fn vmm_with(run_dir: &Path, marker: &str) -> Option<i32> {
    let run_dir = run_dir.display().to_string();
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            crate::common::is_vmm(*pid as u32)
                && cmdline.contains(&run_dir)
                && cmdline.contains(marker)
        })
        .map(|pid| crate::common::guest_runner(pid as u32) as i32)
}

/// A group whose worker takes its time, so that it can be watched.
const WATCHED: &str = r#"name = "watched"
channels = ["input -> worker", "worker -> output"]

[[agent]]
name = "worker"
exec = ["/bin/sh", "-c", 'cat > /dev/null; sleep 20; echo done']

[[agent]]
name = "idle"
class = "idle"
"#;

#[test]
fn top_and_stats_show_a_running_group_by_agent_name() {
    if !vm_available() {
        return;
    }
    let _machine = take_machine();
    let t = Scratch::new("group-top");
    let child = start_group(&t, WATCHED, &[]);
    let deadline = Instant::now() + Duration::from_secs(400);
    let top = loop {
        assert!(Instant::now() < deadline, "the group never showed in top");
        let out = t.output(&["top", "--once", "--interval", "0.5"], b"");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("watched/worker") && text.contains("watched/idle") {
            break text;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(top.contains("running"), "{top}");
    let out = t.output(&["stats", "watched/worker", "--json"], b"");
    assert!(out.status.success(), "{}", describe(&out));
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(stats["cpu_usage_us"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["memory_bytes"].as_u64().unwrap() > 1 << 20, "{stats}");

    let out = t.finish(child, command_limit());
    assert!(out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("done"));
    t.assert_nothing_left();
}

/// `flooder` tells `calm` to go, then sends `sink` message after message as fast as the router
/// takes them; `sink` is slow. `calm` sends one message to `sink`, which reports how many flood
/// messages it had handled before.
const FLOOD: &str = r#"name = "flood"
channels = ["input -> flooder", "flooder -> calm", "flooder -> sink", "calm -> sink", "sink -> output"]

[[agent]]
name = "flooder"
exec = ["/bin/sh", "-c", '''
echo go | /init send calm > /dev/null
i=0
while [ $i -lt 60 ]; do echo "flood $i" | /init send sink > /dev/null; i=$((i+1)); done
''']

[[agent]]
name = "calm"
exec = ["/bin/sh", "-c", "sleep 2; echo 'from calm' | /init send sink > /dev/null"]

[[agent]]
name = "sink"
exec = ["/bin/sh", "-c", '''
if [ "$AGENTOS_FROM" = calm ]; then
  echo "calm after $(cat /tmp/flood 2>/dev/null || echo 0) flood messages"
else
  echo $(( $(cat /tmp/flood 2>/dev/null || echo 0) + 1 )) > /tmp/flood
  sleep 1
fi
''']
"#;

#[test]
fn a_flood_is_held_back_and_does_not_starve_another_channel() {
    if !vm_available() {
        return;
    }
    let _machine = take_machine();
    let t = Scratch::new("group-flood");
    let child = start_group(&t, FLOOD, &["--json", "--timeout", "400"]);
    let report = report_of(&t.finish(child, command_limit()));
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "{report}");
    let body = results[0]["body"].as_str().unwrap();
    let before: u32 = body
        .strip_prefix("calm after ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected result {body:?}"));
    // Channels into an agent are served in turn: calm's message waits for the flood messages
    // handled before it was sent and those already delivered (the window of 4), not for the
    // flood's queue of 16.
    assert!(
        before <= 10,
        "calm's message waited for {before} flood messages: {report}"
    );
    // The flood was held back by the bounded queue (the sender was told to retry), not stored.
    assert!(
        report["counters"]["refused_queue_full"].as_u64().unwrap() > 0,
        "the flood never filled its queue: {report}"
    );
    t.assert_nothing_left();
}
