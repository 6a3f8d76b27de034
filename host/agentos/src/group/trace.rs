//! A group's trace: one JSON line per event (an input, a message between agents, a result, a
//! refusal), and the view `agentos trace` prints from it: the path each input took through the
//! agents and where its time went.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The group's input, given to its entry agent.
    Input,
    /// The entry agent finished with the input.
    Handled,
    /// A message from one agent to another, written once the receiver finished with it.
    #[default]
    Message,
    /// A message to `output`: part of the group's answer.
    Result,
    /// A send the router did not take.
    Refused,
    /// An agent's VM ended while the group ran (`summary` says how).
    Crashed,
    /// An agent was booted again after a crash; what it had not acknowledged comes again.
    Restarted,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TraceEvent {
    /// Since the group's router started.
    pub t_ms: f64,
    /// The input this event descends from (0: none the router knows).
    pub trace: u64,
    pub event: EventKind,
    pub message: Option<u64>,
    pub from: String,
    pub to: String,
    pub kind: String,
    pub bytes: usize,
    /// The model the sender ran to make this message, and for how long.
    pub model: Option<String>,
    pub infer_ms: Option<f64>,
    /// From accepted by the router to handed to the receiver.
    pub queued_ms: Option<f64>,
    /// From handed to the receiver to its acknowledgement (its handler ran, its results left).
    pub handled_ms: Option<f64>,
    /// The body's start, or the reason for a refusal.
    pub summary: String,
    /// A sender the guest claimed that is not the one the router knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_from: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot open trace {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}:{line}: not a trace event: {problem}")]
    Malformed {
        path: PathBuf,
        line: usize,
        problem: String,
    },
}

/// Appends events to a trace file, one line each, flushed as written.
pub struct TraceLog {
    file: Mutex<Option<File>>,
}

impl TraceLog {
    /// Starts a new trace at `path` (an existing one is replaced).
    pub fn create(path: &Path) -> Result<Self, TraceError> {
        // Appending: every event lands at the end even if someone else truncated the file.
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|f| f.set_len(0).map(|()| f))
            .map_err(|source| TraceError::Open {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            file: Mutex::new(Some(file)),
        })
    }

    pub fn append(&self, event: &TraceEvent) {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let Some(out) = file.as_mut() else {
            return;
        };
        let mut line = serde_json::to_vec(event).unwrap_or_default();
        line.push(b'\n');
        if let Err(e) = out.write_all(&line) {
            tracing::warn!("the trace cannot be written any more: {e}");
            *file = None;
        }
    }
}

/// Reads every event of the trace at `path`. A last line without its newline is an event still
/// being written (the group is running) and is left out.
pub fn read(path: &Path) -> Result<Vec<TraceEvent>, TraceError> {
    read_where(path, |_| true)
}

/// Reads the events of the trace at `path` that `keep` wants, a line at a time: a long-lived
/// group's trace is read for one input without holding the others.
pub fn read_where(
    path: &Path,
    keep: impl Fn(&TraceEvent) -> bool,
) -> Result<Vec<TraceEvent>, TraceError> {
    let open_error = |source| TraceError::Open {
        path: path.to_owned(),
        source,
    };
    let mut lines = BufReader::new(File::open(path).map_err(open_error)?);
    let mut line = String::new();
    let mut events = Vec::new();
    for n in 1.. {
        line.clear();
        if lines.read_line(&mut line).map_err(open_error)? == 0 {
            break;
        }
        let Some(text) = line.strip_suffix('\n') else {
            break;
        };
        if text.trim().is_empty() {
            continue;
        }
        let event: TraceEvent = serde_json::from_str(text).map_err(|e| TraceError::Malformed {
            path: path.to_owned(),
            line: n,
            problem: e.to_string(),
        })?;
        if keep(&event) {
            events.push(event);
        }
    }
    Ok(events)
}

/// The trace as people read it: per input, each step in time order, then where the time went.
pub fn render(events: &[TraceEvent], out: &mut dyn Write) -> io::Result<()> {
    let mut by_input: BTreeMap<u64, Vec<&TraceEvent>> = BTreeMap::new();
    for event in events {
        by_input.entry(event.trace).or_default().push(event);
    }
    for (trace, mut steps) in by_input {
        steps.sort_by(|a, b| a.t_ms.total_cmp(&b.t_ms));
        let start = steps.first().map_or(0.0, |e| e.t_ms);
        let end = steps
            .iter()
            .map(|e| e.t_ms + e.queued_ms.unwrap_or(0.0) + e.handled_ms.unwrap_or(0.0))
            .fold(start, f64::max);
        if trace == 0 {
            writeln!(out, "messages outside any input")?;
        } else {
            writeln!(
                out,
                "input {trace}: {} events over {:.1} s",
                steps.len(),
                (end - start) / 1000.0
            )?;
        }
        writeln!(
            out,
            "  {:>8}  {:<9} {:<12} {:<12} {:<12} {:>7}  {:>9}  {:>8}  {:>9}  what",
            "t (s)", "event", "from", "to", "kind", "bytes", "model ms", "queue ms", "handle ms",
        )?;
        // One model run may feed several messages; each run counts once.
        let mut model_runs: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
        let mut handle_time: BTreeMap<String, f64> = BTreeMap::new();
        let mut queue_time = 0.0;
        for e in &steps {
            let what = match (&e.claimed_from, e.event) {
                (Some(claim), _) => format!("(claimed to be `{claim}`) {}", e.summary),
                (None, _) => e.summary.clone(),
            };
            writeln!(
                out,
                "  {:>8.3}  {:<9} {:<12} {:<12} {:<12} {:>7}  {:>9}  {:>8}  {:>9}  {}",
                (e.t_ms - start) / 1000.0,
                event_name(e.event),
                e.from,
                e.to,
                e.kind,
                e.bytes,
                opt_ms(e.infer_ms),
                opt_ms(e.queued_ms),
                opt_ms(e.handled_ms),
                what
            )?;
            if let (Some(model), Some(ms)) = (&e.model, e.infer_ms)
                && e.event != EventKind::Refused
            {
                let runs = model_runs
                    .entry((e.from.clone(), model.clone()))
                    .or_default();
                if !runs.contains(&ms) {
                    runs.push(ms);
                }
            }
            if let Some(ms) = e.handled_ms {
                *handle_time.entry(e.to.clone()).or_default() += ms;
            }
            queue_time += e.queued_ms.unwrap_or(0.0);
        }
        writeln!(out, "  where the time went:")?;
        for ((agent, model), runs) in &model_runs {
            let ms: f64 = runs.iter().sum();
            writeln!(out, "    {agent:<12} ran {model} for {:.1} s", ms / 1000.0)?;
        }
        for (agent, ms) in &handle_time {
            writeln!(
                out,
                "    {agent:<12} took {:.1} s from receiving to passing its results on",
                ms / 1000.0
            )?;
        }
        writeln!(
            out,
            "    router       queued messages for {queue_time:.1} ms in all"
        )?;
    }
    Ok(())
}

fn event_name(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Input => "input",
        EventKind::Handled => "handled",
        EventKind::Message => "message",
        EventKind::Result => "result",
        EventKind::Refused => "refused",
        EventKind::Crashed => "crashed",
        EventKind::Restarted => "restarted",
    }
}

fn opt_ms(ms: Option<f64>) -> String {
    ms.map_or_else(|| "-".to_owned(), |ms| format!("{ms:.1}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(t_ms: f64, kind: EventKind, from: &str, to: &str) -> TraceEvent {
        TraceEvent {
            t_ms,
            trace: 1,
            event: kind,
            message: Some(1),
            from: from.into(),
            to: to.into(),
            kind: "summary".into(),
            bytes: 10,
            model: Some("minilm".into()),
            infer_ms: Some(1500.0),
            queued_ms: Some(0.5),
            handled_ms: Some(200.0),
            summary: "A short text".into(),
            claimed_from: None,
        }
    }

    #[test]
    fn written_events_read_back_and_render() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.jsonl");
        let log = TraceLog::create(&path).unwrap();
        let first = event(10.0, EventKind::Message, "summarizer", "translator");
        let same_run = event(11.0, EventKind::Result, "summarizer", "output");
        let mut forged = event(20.0, EventKind::Refused, "mallory", "translator");
        forged.claimed_from = Some("summarizer".into());
        log.append(&first);
        log.append(&same_run);
        log.append(&forged);
        // An event still being written is not read yet.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"t_ms\":3")
            .unwrap();
        let events = read(&path).unwrap();
        assert_eq!(events, [first, same_run, forged]);
        let mut text = Vec::new();
        render(&events, &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("input 1: 3 events"), "{text}");
        assert!(text.contains("summarizer   ran minilm for 1.5 s"), "{text}");
        assert!(text.contains("(claimed to be `summarizer`)"), "{text}");
    }

    #[test]
    fn a_malformed_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.jsonl");
        std::fs::write(&path, "{}\n").unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(err.contains("trace.jsonl:1: not a trace event"), "{err}");
    }
}
