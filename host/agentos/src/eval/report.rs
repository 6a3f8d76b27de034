//! What `agentos eval` prints: every case with its checks and evidence, and `N passed, M failed`.

use std::io::{self, Write};

use serde::Serialize;
use serde_json::{Map, Value};

/// One thing a case expected, and what was found.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub what: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub found: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Passed,
    Failed,
}

/// One case's result.
#[derive(Debug, Serialize)]
pub struct CaseReport {
    pub suite: String,
    pub name: String,
    /// `FILE:LINE` of the case.
    pub source: String,
    pub tries: String,
    pub expects: String,
    pub outcome: Outcome,
    pub checks: Vec<Check>,
    /// Counters, exit reasons and output excerpts the checks looked at.
    pub evidence: Map<String, Value>,
    pub ms: u64,
}

impl CaseReport {
    pub fn new(suite: &str, name: &str, source: &str, tries: &str, expects: &str) -> Self {
        Self {
            suite: suite.to_owned(),
            name: name.to_owned(),
            source: source.to_owned(),
            tries: tries.to_owned(),
            expects: expects.to_owned(),
            outcome: Outcome::Passed,
            checks: Vec::new(),
            evidence: Map::new(),
            ms: 0,
        }
    }

    /// Records a check; a failed one fails the case.
    pub fn check(&mut self, what: impl Into<String>, ok: bool, found: impl Into<String>) {
        if !ok {
            self.outcome = Outcome::Failed;
        }
        self.checks.push(Check {
            what: what.into(),
            ok,
            found: found.into(),
        });
    }

    pub fn evidence(&mut self, key: &str, value: impl Into<Value>) {
        self.evidence.insert(key.to_owned(), value.into());
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub cases: Vec<CaseReport>,
    pub passed: usize,
    pub failed: usize,
    pub summary: String,
    pub ms: u64,
}

impl Report {
    pub fn new(cases: Vec<CaseReport>, ms: u64) -> Self {
        let passed = cases
            .iter()
            .filter(|c| c.outcome == Outcome::Passed)
            .count();
        let failed = cases.len() - passed;
        Self {
            cases,
            passed,
            failed,
            summary: format!("{passed} passed, {failed} failed"),
            ms,
        }
    }

    /// The report as one JSON line on `out`, the summary line on stderr.
    pub fn write_json(&self, out: &mut dyn Write) -> io::Result<()> {
        serde_json::to_writer(&mut *out, self)?;
        writeln!(out)?;
        eprintln!("{}", self.summary);
        Ok(())
    }

    /// One line per case, the failed checks under it, then the summary.
    pub fn write_text(&self, out: &mut dyn Write) -> io::Result<()> {
        for case in &self.cases {
            let mark = match case.outcome {
                Outcome::Passed => "PASS",
                Outcome::Failed => "FAIL",
            };
            writeln!(
                out,
                "{mark} {}/{} ({:.1} s): {}",
                case.suite,
                case.name,
                case.ms as f64 / 1000.0,
                case.tries
            )?;
            for check in case.checks.iter().filter(|c| !c.ok) {
                writeln!(out, "     expected {}; found {}", check.what, check.found)?;
            }
        }
        writeln!(out, "{}", self.summary)
    }
}

/// The start and the end of a long output, for evidence.
pub fn excerpt(text: &str) -> String {
    const HEAD: usize = 1200;
    const TAIL: usize = 600;
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= HEAD + TAIL {
        return text.to_owned();
    }
    let head: String = chars[..HEAD].iter().collect();
    let tail: String = chars[chars.len() - TAIL..].iter().collect();
    format!(
        "{head}\n[... {} characters ...]\n{tail}",
        chars.len() - HEAD - TAIL
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_check_fails_the_case_and_the_summary_counts_it() {
        let mut a = CaseReport::new("s", "a", "f:1", "t", "e");
        a.check("x", true, "");
        let mut b = CaseReport::new("s", "b", "f:5", "t", "e");
        b.check("y", false, "z");
        let report = Report::new(vec![a, b], 10);
        assert_eq!(report.summary, "1 passed, 1 failed");
        let mut text = Vec::new();
        report.write_text(&mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("FAIL s/b"), "{text}");
        assert!(text.contains("expected y; found z"), "{text}");
        assert!(text.ends_with("1 passed, 1 failed\n"), "{text}");
    }

    #[test]
    fn long_output_is_cut_in_the_middle() {
        let long = "a".repeat(5000);
        let cut = excerpt(&long);
        assert!(cut.len() < 2000 && cut.contains("[... 3200 characters ...]"));
    }
}
