//! `agentos eval`: the security harness runs every shipped case against real microVMs, every
//! case passes, and the host is left as it was.

use crate::common::{Scratch, describe, take_machine, text, vm_available};

#[test]
fn every_shipped_eval_case_holds_and_the_host_is_left_unchanged() {
    if !vm_available() {
        return;
    }
    let _machine = take_machine();
    let t = Scratch::new("eval");
    // The source tree's cases (the carrier that runs the VM tests copies them at this path).
    let top = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_owned();
    let cases = top.join("eval/cases");
    let out = t.output(&["eval", "--json", "--cases", cases.to_str().unwrap()], b"");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", describe(&out)));
    let cases = report["cases"].as_array().expect("no cases");
    let failed: Vec<String> = cases
        .iter()
        .filter(|c| c["outcome"] != "passed")
        .map(|c| c.to_string())
        .collect();
    assert!(failed.is_empty(), "failed cases:\n{}", failed.join("\n"));
    assert!(cases.len() >= 15, "{report}");
    let last = cases.last().unwrap();
    assert_eq!(last["name"], "host-unchanged", "{report}");
    let summary = format!("{} passed, 0 failed", cases.len());
    assert_eq!(report["summary"], summary, "{report}");
    assert!(text(&out.stderr).contains(&summary), "{}", describe(&out));
    assert!(out.status.success(), "{}", describe(&out));
    t.assert_nothing_left();
}
