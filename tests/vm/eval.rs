//! `agentos eval`: the security harness runs every shipped case against real microVMs, a suite
//! per test (so that the suites run side by side in the VM test lanes), every case passes, and
//! each run leaves the host as it found it (its last case, `host-unchanged`).

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use crate::common::{Scratch, describe, share_machine, take_machine, text, vm_available};

/// How long one suite may take: its VMs boot one after the other under emulation.
const SUITE_LIMIT: Duration = Duration::from_secs(1500);

/// Runs `agentos eval --json` of `suite` in `cases`: its output and its JSON report.
fn eval(t: &Scratch, suite: &str, cases: &Path) -> (Output, serde_json::Value) {
    let child = t.spawn(&[
        "eval",
        "--json",
        "--suite",
        suite,
        "--cases",
        cases.to_str().unwrap(),
    ]);
    let out = t.finish(child, SUITE_LIMIT);
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", describe(&out)));
    (out, report)
}

fn suite_holds(suite: &str) {
    if !vm_available() {
        return;
    }
    let _machine = take_machine();
    let t = Scratch::new(&format!("eval-{suite}"));
    // The source tree's cases (the carrier that runs the VM tests copies them at this path).
    let top = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_owned();
    let (out, report) = eval(&t, suite, &top.join("eval/cases"));
    let cases = report["cases"].as_array().expect("no cases");
    let failed: Vec<String> = cases
        .iter()
        .filter(|c| c["outcome"] != "passed")
        .map(|c| c.to_string())
        .collect();
    assert!(failed.is_empty(), "failed cases:\n{}", failed.join("\n"));
    assert!(cases.len() >= 2, "{report}");
    let last = cases.last().unwrap();
    assert_eq!(last["name"], "host-unchanged", "{report}");
    let summary = format!("{} passed, 0 failed", cases.len());
    assert_eq!(report["summary"], summary, "{report}");
    assert!(text(&out.stderr).contains(&summary), "{}", describe(&out));
    assert!(out.status.success(), "{}", describe(&out));
    t.assert_nothing_left();
}

#[test]
fn the_api_suite_holds() {
    suite_holds("api");
}

#[test]
fn the_group_suite_holds() {
    suite_holds("group");
}

#[test]
fn the_guest_suite_holds() {
    suite_holds("guest");
}

#[test]
fn the_host_suite_holds() {
    suite_holds("host");
}

#[test]
fn the_vm_suite_holds() {
    suite_holds("vm");
}

/// A VM that the suite's cases share and that ends inside a case (its kernel made to panic, in a
/// case that expects the guest to go on): the case fails, and its evidence says how the VM ended
/// and what its console said last, which is all there is to explain it by once it is gone.
#[test]
fn a_shared_vm_that_ends_inside_a_case_is_explained_by_the_evidence() {
    if !vm_available() {
        return;
    }
    let _machine = share_machine();
    let t = Scratch::new("eval-ends");
    let cases = t.dir.join("cases");
    std::fs::create_dir_all(&cases).unwrap();
    std::fs::write(cases.join("panic.sh"), "echo c > /proc/sysrq-trigger\n").unwrap();
    std::fs::write(
        cases.join("ends.toml"),
        r#"
[[case]]
name = "vm-ends"
tries = "to crash the guest kernel of the VM the suite's cases share"
expects = "the guest agent still answers"
script = "panic.sh"
timeout = 30
"#,
    )
    .unwrap();
    let (out, report) = eval(&t, "ends", &cases);
    assert!(!out.status.success(), "{}", describe(&out));
    let case = report["cases"]
        .as_array()
        .and_then(|cases| cases.iter().find(|c| c["name"] == "vm-ends"))
        .unwrap_or_else(|| panic!("no case `vm-ends`: {report}"));
    assert_eq!(case["outcome"], "failed", "{case}");
    let evidence = &case["evidence"];
    let end = evidence["vm_end"].as_str().unwrap_or_default();
    assert!(end.starts_with("crashed"), "{case}");
    let console = evidence["vm_console"].as_str().unwrap_or_default();
    assert!(console.contains("Kernel panic"), "{case}");
    t.assert_nothing_left();
}
