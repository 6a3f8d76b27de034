//! `agentos group run`: agents in their own microVMs exchange messages through the router, which
//! knows each sender from its socket and allows only declared channels.

use crate::common::{Scratch, describe, take_machine, vm_available};

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

#[test]
fn agents_exchange_messages_along_declared_channels_only() {
    if !vm_available() {
        return;
    }
    let _machine = take_machine();
    let t = Scratch::new("group-pingpong");
    let file = t.dir.join("pingpong.toml");
    std::fs::write(&file, PING_PONG).unwrap();
    let input = t.dir.join("input.txt");
    std::fs::write(&input, "hello b\n").unwrap();
    let out = t.output(
        &[
            "group",
            "run",
            file.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--json",
            "--timeout",
            "300",
        ],
        b"",
    );
    assert!(out.status.success(), "{}", describe(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", describe(&out)));
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
