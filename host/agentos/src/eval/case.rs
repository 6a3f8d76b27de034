//! The case files of `agentos eval`: one TOML file per suite (`eval/cases/SUITE.toml`), each
//! `[[case]]` naming what it tries, what it expects, and how to check it. Problems are reported
//! as `FILE:LINE: what is wrong`.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::toml_file;

#[derive(Debug, thiserror::Error)]
pub enum CaseError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: {problem}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        problem: String,
    },
    #[error("no case files (*.toml) in {0}")]
    Empty(PathBuf),
    #[error("no suite named `{name}` (suites: {known})")]
    UnknownSuite { name: String, known: String },
}

/// The VM a case (or a suite's shared VM) runs in.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Guest memory in MiB (default 128).
    pub memory: Option<u64>,
    /// CPU quota in CPUs, enforced by the VMM's cgroup.
    pub cpus: Option<f64>,
    /// Appended to the guest kernel's command line.
    pub kernel_args: Option<String>,
}

/// How the case attacks.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A script run by the guest's /bin/sh, in the suite's VM or its own.
    #[default]
    Guest,
    /// A group file run with `agentos group run`: agents attacking the router and each other.
    Group,
    /// Requests to a daemon's API, with an agent running under it.
    Api,
    /// An attack on the host side itself, built into the harness and named by `attack` (see
    /// [`HOST_ATTACKS`]): what a local user or a taken-over VMM would try.
    Host,
}

/// The host attacks the harness knows (see `eval::host_attacks`).
pub const HOST_ATTACKS: [&str; 5] = [
    "run-dir-taken-first",
    "symlinks-in-the-vmms-directory",
    "vmm-report-through-a-symlink",
    "planted-admission-lock",
    "jail-without-capabilities",
];

/// What a harness listening on a guest's port does with a connection that says a proper hello.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ListenRequest {
    /// Runs a program through it, as `agentos run` and the daemon do.
    Exec,
    /// Runs an inference through it.
    Infer,
}

/// One request an `api` case sends, and the reply it expects.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiRequest {
    /// The HTTP method, as is (e.g. `GET`, `POST`).
    pub method: String,
    /// The path and query, as is.
    pub path: String,
    /// The body, sent as is.
    #[serde(default)]
    pub body: String,
    /// The declared length (`Content-Length`), when it should lie about the body's (default:
    /// the body's length).
    pub length: Option<u64>,
    /// The error kind expected back, or `ok`.
    pub reply: String,
    /// Text the error's message must have.
    pub message_has: Option<String>,
    /// Fields an `ok` reply must have, with these values (e.g. `{ code = 3, truncated = true }`).
    #[serde(default)]
    pub ok_fields: BTreeMap<String, serde_json::Value>,
    /// Seconds within which the reply must arrive.
    pub within: Option<u64>,
}

/// Clients an `api` case sets on agents of its own (`eval-flood-0`, `eval-flood-1`, ...), each
/// running a program, before it sends its requests (which may stop those agents); each client
/// must be answered.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Flood {
    pub agents: usize,
    /// Spread over the agents in turn.
    pub clients: usize,
    pub program: String,
    #[serde(default)]
    pub args: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    name: Spanned<String>,
    tries: String,
    expects: String,
    #[serde(default)]
    kind: Kind,
    script: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    input: Option<String>,
    /// Seconds the guest agent gives the script (its whole process group is killed after).
    timeout: Option<u64>,
    exit_code: Option<i32>,
    timed_out: Option<bool>,
    #[serde(default)]
    stdout_has: Vec<String>,
    #[serde(default)]
    stdout_lacks: Vec<String>,
    /// Lines the guest's serial console must show, waited for up to `settle` seconds (for
    /// programs that outlive the script and the guest's vsock).
    #[serde(default)]
    console_has: Vec<String>,
    /// Whether the guest agent must still answer afterwards (default true).
    agent_alive: Option<bool>,
    /// The VMM's outcome when the case's own VM ended (`crashed`, `shutdown`, `stopped`).
    vm_end: Option<String>,
    /// Seconds to wait after the script before looking at the VM.
    settle: Option<u64>,
    vm: Option<VmSpec>,
    #[serde(default)]
    metrics_min: BTreeMap<String, u64>,
    #[serde(default)]
    metrics_max: BTreeMap<String, u64>,
    /// The VMM's cgroup must have been throttled, holding it to its quota.
    #[serde(default)]
    throttled: bool,
    #[serde(default)]
    counters_min: BTreeMap<String, u64>,
    results_min: Option<usize>,
    #[serde(default)]
    requests: Vec<ApiRequest>,
    /// Clients that race to spawn the same agent name: exactly one must win.
    race_spawn: Option<usize>,
    /// Seconds within which the daemon must drop clients that stall (one silent, two inside a
    /// frame), while the case's requests are answered.
    slow_clients: Option<u64>,
    flood: Option<Flood>,
    /// Read the agent's log to its end after the requests: every chunk must arrive and move on.
    #[serde(default)]
    read_logs: bool,
    /// A host vsock port the harness listens on during the script, reading every connection
    /// with the host's protocol decoder; each must be refused.
    listen: Option<u32>,
    /// Group cases: the most milliseconds messages on a channel (`"FROM -> TO"`) may wait in
    /// the router (their trace's `queued_ms`).
    #[serde(default)]
    queued_ms_max: BTreeMap<String, u64>,
    /// What the listener asks of a connection that passes the handshake (default: nothing,
    /// such a connection is taken as accepted): its answers must be refused too.
    listen_request: Option<ListenRequest>,
    /// The host attack a `host` case runs.
    attack: Option<Spanned<String>>,
}

/// A bound on how long a channel's messages wait in the router.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueBound {
    pub from: String,
    pub to: String,
    pub max_ms: u64,
}

/// `"FROM -> TO"` with two valid names, as a group file writes a channel.
fn channel_of(text: &str) -> Option<(String, String)> {
    let (from, to) = text.split_once("->")?;
    let (from, to) = (from.trim(), to.trim());
    let valid = agentos_protocol::peer::valid_peer_name;
    (valid(from) && valid(to)).then(|| (from.to_owned(), to.to_owned()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSuite {
    vm: Option<VmSpec>,
    #[serde(default)]
    case: Vec<RawCase>,
}

/// One case, ready to run.
#[derive(Clone, Debug)]
pub struct Case {
    pub suite: String,
    pub name: String,
    pub tries: String,
    pub expects: String,
    pub kind: Kind,
    /// `file:line` of the case, for the report.
    pub source: String,
    /// The guest script's text (`guest` cases), or the group file (`group` cases).
    pub script: Option<String>,
    pub group_file: Option<PathBuf>,
    pub input: String,
    pub timeout_s: u64,
    pub exit_code: Option<i32>,
    pub timed_out: Option<bool>,
    pub stdout_has: Vec<String>,
    pub stdout_lacks: Vec<String>,
    pub console_has: Vec<String>,
    pub agent_alive: bool,
    pub vm_end: Option<String>,
    pub settle_s: u64,
    /// A VM of its own; `None` runs in the suite's shared VM.
    pub own_vm: Option<VmSpec>,
    pub metrics_min: BTreeMap<String, u64>,
    pub metrics_max: BTreeMap<String, u64>,
    pub throttled: bool,
    pub counters_min: BTreeMap<String, u64>,
    pub results_min: usize,
    pub requests: Vec<ApiRequest>,
    pub race_spawn: usize,
    pub slow_clients_s: Option<u64>,
    pub flood: Option<Flood>,
    pub read_logs: bool,
    pub listen: Option<u32>,
    pub queued_ms_max: Vec<QueueBound>,
    pub listen_request: Option<ListenRequest>,
    pub attack: Option<String>,
}

/// The cases of one file, in file order.
#[derive(Clone, Debug)]
pub struct Suite {
    pub name: String,
    pub path: PathBuf,
    /// The VM the suite's `guest` cases without a VM of their own share.
    pub vm: VmSpec,
    pub cases: Vec<Case>,
    /// The files the cases read (scripts, group files), for copying into a carrier.
    pub files: Vec<PathBuf>,
}

/// Seconds a guest script gets unless its case says otherwise, and the most it may get.
const DEFAULT_TIMEOUT_S: u64 = 60;
const MAX_TIMEOUT_S: u64 = 86_400;
/// The most seconds an api case may give a reply or the daemon to drop a client (the harness
/// waits that long).
const MAX_API_WAIT_S: u64 = 600;
/// The most clients a flood may have (fewer than the daemon's 256 connections), and agents.
const MAX_FLOOD_CLIENTS: usize = 200;
const MAX_FLOOD_AGENTS: usize = 8;
const VM_OUTCOMES: [&str; 3] = ["crashed", "shutdown", "stopped"];

/// Loads every `*.toml` in `dir` (sorted by name), keeping only the suite `only` if given.
pub fn load_dir(dir: &Path, only: Option<&str>) -> Result<Vec<Suite>, CaseError> {
    let read_err = |source| CaseError::Read {
        path: dir.to_owned(),
        source,
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read_err)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(CaseError::Empty(dir.to_owned()));
    }
    let suites = paths
        .iter()
        .map(|p| load_file(p))
        .collect::<Result<Vec<_>, _>>()?;
    match only {
        None => Ok(suites),
        Some(name) => {
            let known: Vec<String> = suites.iter().map(|s| s.name.clone()).collect();
            let chosen: Vec<Suite> = suites.into_iter().filter(|s| s.name == name).collect();
            if chosen.is_empty() {
                return Err(CaseError::UnknownSuite {
                    name: name.to_owned(),
                    known: known.join(", "),
                });
            }
            Ok(chosen)
        }
    }
}

/// Reads one suite file; its name is the file's stem.
pub fn load_file(path: &Path) -> Result<Suite, CaseError> {
    let text = toml_file::read(path).map_err(|source| CaseError::Read {
        path: path.to_owned(),
        source,
    })?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, &name, base)
        .map_err(|(line, problem)| CaseError::Invalid {
            path: path.to_owned(),
            line,
            problem,
        })
        .map(|mut suite| {
            suite.path = path.to_owned();
            for case in &mut suite.cases {
                case.source = format!("{}:{}", path.display(), case.source);
            }
            suite
        })
}

/// Parses a suite's text; files it names are read relative to `base`. An error is the line it
/// is on and what is wrong.
pub fn parse(text: &str, suite: &str, base: &Path) -> Result<Suite, (usize, String)> {
    let line_of = |span: Range<usize>| toml_file::line_of(text, span);
    let raw: RawSuite = toml_file::parse(text)?;
    if raw.case.is_empty() {
        return Err((1, "the file has no cases; add a [[case]] table".to_owned()));
    }
    let mut cases = Vec::new();
    let mut files = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for rc in raw.case {
        let line = line_of(rc.name.span());
        let at = |problem: String| (line, problem);
        let name = rc.name.get_ref().clone();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(at(format!(
                "case name `{name}` must be letters, digits, `-` or `_`"
            )));
        }
        if !names.insert(name.clone()) {
            return Err(at(format!(
                "a case named `{name}` comes earlier in the file"
            )));
        }
        let read = |field: &Spanned<String>| -> Result<(PathBuf, String), (usize, String)> {
            let path = base.join(field.get_ref());
            // Resolved, so that the path can be copied into a carrier as it is.
            std::fs::canonicalize(&path)
                .and_then(|p| toml_file::read(&p).map(|t| (p, t)))
                .map_err(|e| {
                    (
                        line_of(field.span()),
                        format!("cannot read {}: {e}", path.display()),
                    )
                })
        };
        let (script, group_file) = match rc.kind {
            Kind::Guest => {
                let Some(field) = &rc.script else {
                    return Err(at("a guest case needs `script = \"FILE\"`".to_owned()));
                };
                let (path, text) = read(field)?;
                files.push(path);
                (Some(text), None)
            }
            Kind::Group => {
                let Some(field) = &rc.group else {
                    return Err(at("a group case needs `group = \"FILE.toml\"`".to_owned()));
                };
                let (path, _) = read(field)?;
                files.push(path.clone());
                (None, Some(path))
            }
            Kind::Api => {
                if rc.requests.is_empty()
                    && rc.race_spawn.is_none()
                    && rc.slow_clients.is_none()
                    && rc.flood.is_none()
                    && !rc.read_logs
                {
                    return Err(at(
                        "an api case needs `requests`, `race_spawn`, `slow_clients`, `flood` or `read_logs`"
                            .to_owned(),
                    ));
                }
                check_api_fields(&rc).map_err(at)?;
                (None, None)
            }
            Kind::Host => (None, None),
        };
        if rc.kind != Kind::Api && (rc.slow_clients.is_some() || rc.flood.is_some() || rc.read_logs)
        {
            return Err(at(
                "`slow_clients`, `flood` and `read_logs` are for api cases: add kind = \"api\""
                    .to_owned(),
            ));
        }
        if let Some(timeout) = rc.timeout
            && !(1..=MAX_TIMEOUT_S).contains(&timeout)
        {
            return Err(at(format!(
                "timeout {timeout}: use 1 to {MAX_TIMEOUT_S} seconds"
            )));
        }
        if let Some(end) = &rc.vm_end {
            if !VM_OUTCOMES.contains(&end.as_str()) {
                return Err(at(format!(
                    "vm_end `{end}` must be one of {}",
                    VM_OUTCOMES.join(", ")
                )));
            }
            if rc.vm.is_none() {
                return Err(at(
                    "vm_end needs a VM of the case's own: add a [case.vm] table".to_owned(),
                ));
            }
        }
        if rc.listen_request.is_some() && rc.listen.is_none() {
            return Err(at("`listen_request` needs a `listen` port".to_owned()));
        }
        match (&rc.kind, &rc.attack) {
            (Kind::Host, None) => {
                return Err(at(format!(
                    "a host case names its `attack`: one of {}",
                    HOST_ATTACKS.join(", ")
                )));
            }
            (Kind::Host, Some(attack)) if !HOST_ATTACKS.contains(&attack.get_ref().as_str()) => {
                return Err((
                    line_of(attack.span()),
                    format!(
                        "no host attack `{}`: use one of {}",
                        attack.get_ref(),
                        HOST_ATTACKS.join(", ")
                    ),
                ));
            }
            (kind, Some(_)) if *kind != Kind::Host => {
                return Err(at("`attack` is for host cases (kind = \"host\")".to_owned()));
            }
            _ => {}
        }
        let needs_own = !rc.metrics_min.is_empty()
            || !rc.metrics_max.is_empty()
            || rc.throttled
            || !rc.console_has.is_empty();
        if needs_own && rc.vm.is_none() {
            return Err(at(
                "metrics, throttling and the console are checked on a VM of the case's own: add a [case.vm] table"
                    .to_owned(),
            ));
        }
        if !rc.queued_ms_max.is_empty() && rc.kind != Kind::Group {
            return Err(at(
                "queued_ms_max bounds a group's channels: it needs kind = \"group\"".to_owned(),
            ));
        }
        let mut queued_ms_max = Vec::new();
        for (channel, max_ms) in &rc.queued_ms_max {
            let Some((from, to)) = channel_of(channel) else {
                return Err(at(format!(
                    "queued_ms_max: `{channel}` is not a channel (\"FROM -> TO\")"
                )));
            };
            queued_ms_max.push(QueueBound {
                from,
                to,
                max_ms: *max_ms,
            });
        }
        if rc.throttled && rc.vm.as_ref().is_none_or(|v| v.cpus.is_none()) {
            return Err(at(
                "`throttled` needs a CPU quota: set cpus in [case.vm]".to_owned()
            ));
        }
        cases.push(Case {
            suite: suite.to_owned(),
            name,
            tries: rc.tries,
            expects: rc.expects,
            kind: rc.kind,
            source: line.to_string(),
            script,
            group_file,
            input: rc.input.unwrap_or_else(|| "hello\n".to_owned()),
            timeout_s: rc.timeout.unwrap_or(DEFAULT_TIMEOUT_S),
            exit_code: rc.exit_code,
            timed_out: rc.timed_out,
            stdout_has: rc.stdout_has,
            stdout_lacks: rc.stdout_lacks,
            console_has: rc.console_has,
            agent_alive: rc.agent_alive.unwrap_or(rc.vm_end.is_none()),
            vm_end: rc.vm_end,
            settle_s: rc.settle.unwrap_or(0),
            own_vm: rc.vm,
            metrics_min: rc.metrics_min,
            metrics_max: rc.metrics_max,
            throttled: rc.throttled,
            counters_min: rc.counters_min,
            results_min: rc.results_min.unwrap_or(0),
            requests: rc.requests,
            race_spawn: rc.race_spawn.unwrap_or(0),
            slow_clients_s: rc.slow_clients,
            flood: rc.flood,
            read_logs: rc.read_logs,
            listen: rc.listen,
            queued_ms_max,
            listen_request: rc.listen_request,
            attack: rc.attack.map(Spanned::into_inner),
        });
    }
    Ok(Suite {
        name: suite.to_owned(),
        path: PathBuf::new(),
        vm: raw.vm.unwrap_or_default(),
        cases,
        files,
    })
}

/// What an api case's own fields must say; the problem in a line.
fn check_api_fields(rc: &RawCase) -> Result<(), String> {
    let wait = |what: &str, secs: u64| {
        if (1..=MAX_API_WAIT_S).contains(&secs) {
            Ok(())
        } else {
            Err(format!("{what} {secs}: use 1 to {MAX_API_WAIT_S} seconds"))
        }
    };
    if let Some(secs) = rc.slow_clients {
        wait("slow_clients", secs)?;
    }
    if let Some(flood) = &rc.flood {
        if !(1..=MAX_FLOOD_CLIENTS).contains(&flood.clients) {
            return Err(format!(
                "flood clients {}: use 1 to {MAX_FLOOD_CLIENTS}",
                flood.clients
            ));
        }
        if !(1..=MAX_FLOOD_AGENTS).contains(&flood.agents) {
            return Err(format!(
                "flood agents {}: use 1 to {MAX_FLOOD_AGENTS}",
                flood.agents
            ));
        }
    }
    for req in &rc.requests {
        let what = excerpt(&req.body);
        if let Some(secs) = req.within {
            wait(&format!("`{what}`: within"), secs)?;
        }
        if req.reply == "ok" && req.message_has.is_some() {
            return Err(format!(
                "`{what}`: message_has needs an error reply, not `ok`"
            ));
        }
        if req.reply != "ok" && !req.ok_fields.is_empty() {
            return Err(format!("`{what}`: ok_fields needs reply = \"ok\""));
        }
    }
    Ok(())
}

/// The start of a request's body, to name it in a problem.
fn excerpt(body: &str) -> String {
    body.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s.sh"), "echo hi\n").unwrap();
        dir
    }

    #[test]
    fn a_guest_case_reads_its_script() {
        let dir = scratch();
        let text = "[vm]\nmemory = 160\n\n[[case]]\nname = \"a\"\ntries = \"t\"\nexpects = \"e\"\nscript = \"s.sh\"\nstdout_has = [\"hi\"]\n";
        let suite = parse(text, "guest", dir.path()).unwrap();
        assert_eq!(suite.vm.memory, Some(160));
        let case = &suite.cases[0];
        assert_eq!(case.script.as_deref(), Some("echo hi\n"));
        assert_eq!(case.source, "5");
        assert!(case.agent_alive);
        assert_eq!(case.timeout_s, DEFAULT_TIMEOUT_S);
    }

    #[test]
    fn problems_name_their_line() {
        let dir = scratch();
        let missing =
            "[[case]]\nname = \"a\"\ntries = \"t\"\nexpects = \"e\"\nscript = \"nope.sh\"\n";
        let (line, problem) = parse(missing, "g", dir.path()).unwrap_err();
        assert_eq!(line, 5, "{problem}");
        assert!(problem.contains("cannot read"), "{problem}");
        let unknown = "[[case]]\nname = \"a\"\ntries = \"t\"\nexpects = \"e\"\nscript = \"s.sh\"\nbogus = 1\n";
        let (line, problem) = parse(unknown, "g", dir.path()).unwrap_err();
        assert_eq!(line, 6, "{problem}");
        let twice = "[[case]]\nname = \"a\"\ntries = \"t\"\nexpects = \"e\"\nscript = \"s.sh\"\n[[case]]\nname = \"a\"\ntries = \"t\"\nexpects = \"e\"\nscript = \"s.sh\"\n";
        let (line, problem) = parse(twice, "g", dir.path()).unwrap_err();
        assert_eq!((line, problem.contains("earlier")), (7, true));
    }

    #[test]
    fn metrics_need_a_vm_of_the_case_own() {
        let dir = scratch();
        let text = "[[case]]\nname = \"a\"\ntries = \"t\"\nexpects = \"e\"\nscript = \"s.sh\"\nmetrics_min = { unhandled_io = 1 }\n";
        let (line, problem) = parse(text, "g", dir.path()).unwrap_err();
        assert_eq!(line, 2);
        assert!(problem.contains("[case.vm]"), "{problem}");
        let console = "[[case]]\nname = \"a\"\ntries = \"t\"\nexpects = \"e\"\nscript = \"s.sh\"\nconsole_has = [\"done\"]\n";
        let (_, problem) = parse(console, "g", dir.path()).unwrap_err();
        assert!(problem.contains("[case.vm]"), "{problem}");
        let own = format!("{console}[case.vm]\n");
        let suite = parse(&own, "g", dir.path()).unwrap();
        assert_eq!(suite.cases[0].console_has, ["done"]);
    }

    const API_CASE: &str =
        "[[case]]\nname = \"a\"\nkind = \"api\"\ntries = \"t\"\nexpects = \"e\"\n";

    #[test]
    fn api_cases_read_their_clients_and_reply_checks() {
        let dir = scratch();
        let text = format!(
            "{API_CASE}slow_clients = 45\nread_logs = true\nflood = {{ agents = 3, clients = 100, program = \"/bin/sleep\", args = [\"600\"] }}\nrequests = [\n  {{ method = \"GET\", path = \"/agents\", reply = \"ok\", within = 10, ok_fields = {{ truncated = true, code = 3 }} }},\n  {{ method = \"POST\", path = \"/agents\", body = '{{}}', reply = \"invalid\", message_has = \"timeout_s\" }},\n]\n"
        );
        let suite = parse(&text, "api", dir.path()).unwrap();
        let case = &suite.cases[0];
        assert_eq!(case.slow_clients_s, Some(45));
        assert!(case.read_logs);
        let flood = case.flood.as_ref().unwrap();
        assert_eq!(
            (flood.agents, flood.clients, flood.args.as_slice()),
            (3, 100, &["600".to_owned()][..])
        );
        let ps = &case.requests[0];
        assert_eq!(
            (ps.method.as_str(), ps.path.as_str(), ps.body.as_str()),
            ("GET", "/agents", "")
        );
        assert_eq!(ps.within, Some(10));
        assert_eq!(ps.ok_fields["truncated"], serde_json::json!(true));
        assert_eq!(ps.ok_fields["code"], serde_json::json!(3));
        assert_eq!(case.requests[1].message_has.as_deref(), Some("timeout_s"));
    }

    #[test]
    fn api_fields_out_of_place_or_range_are_refused_on_the_case_line() {
        let dir = scratch();
        for (extra, problem) in [
            ("slow_clients = 0\n", "slow_clients 0: use 1 to 600 seconds"),
            (
                "flood = { agents = 1, clients = 1000, program = \"/bin/true\" }\n",
                "flood clients 1000",
            ),
            (
                "requests = [{ method = \"GET\", path = \"/\", body = 'x', reply = \"ok\", within = 100000 }]\n",
                "within 100000",
            ),
            (
                "requests = [{ method = \"GET\", path = \"/\", body = 'x', reply = \"ok\", message_has = \"y\" }]\n",
                "message_has needs an error reply",
            ),
            (
                "requests = [{ method = \"GET\", path = \"/\", body = 'x', reply = \"invalid\", ok_fields = { code = 1 } }]\n",
                "ok_fields needs reply",
            ),
            ("read_logs = false\n", "an api case needs"),
        ] {
            let (line, found) =
                parse(&format!("{API_CASE}{extra}"), "api", dir.path()).unwrap_err();
            assert_eq!(line, 2, "{found}");
            assert!(found.contains(problem), "{found}");
        }
        let guest = "[[case]]\nname = \"a\"\ntries = \"t\"\nexpects = \"e\"\nscript = \"s.sh\"\n";
        let (_, found) = parse(&format!("{guest}read_logs = true\n"), "g", dir.path()).unwrap_err();
        assert!(found.contains("for api cases"), "{found}");
        let (_, found) = parse(
            &format!("{guest}timeout = 18446744073709551615\n"),
            "g",
            dir.path(),
        )
        .unwrap_err();
        assert!(found.contains("use 1 to 86400 seconds"), "{found}");
    }

    /// Every shipped case file parses, and together they hold at least 30 cases (a full run
    /// adds `host-unchanged`).
    #[test]
    fn queue_bounds_name_a_channel_of_a_group_case() {
        let dir = scratch();
        std::fs::write(dir.path().join("g.toml"), "name = \"g\"\n").unwrap();
        let case = "[[case]]\nname = \"a\"\ntries = \"t\"\nexpects = \"e\"\nkind = \"group\"\ngroup = \"g.toml\"\n";
        let good = format!("{case}queued_ms_max = {{ \"calm -> sink\" = 10000 }}\n");
        let suite = parse(&good, "g", dir.path()).unwrap();
        assert_eq!(
            suite.cases[0].queued_ms_max,
            [QueueBound {
                from: "calm".into(),
                to: "sink".into(),
                max_ms: 10000
            }]
        );
        for bad in ["calm sink", "calm -> ", "../x -> sink", "a -> b -> c"] {
            let text = format!("{case}queued_ms_max = {{ \"{bad}\" = 1 }}\n");
            let (line, problem) = parse(&text, "g", dir.path()).unwrap_err();
            assert_eq!(line, 2, "{problem}");
            assert!(problem.contains("is not a channel"), "{bad}: {problem}");
        }
        let guest = "[[case]]\nname = \"a\"\ntries = \"t\"\nexpects = \"e\"\nscript = \"s.sh\"\nqueued_ms_max = { \"a -> b\" = 1 }\n";
        let (_, problem) = parse(guest, "g", dir.path()).unwrap_err();
        assert!(problem.contains("kind = \"group\""), "{problem}");
    }

    #[test]
    fn the_shipped_cases_parse_and_number_at_least_thirty() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../eval/cases");
        let suites = load_dir(&dir, None).unwrap();
        let count: usize = suites.iter().map(|s| s.cases.len()).sum();
        assert!(count >= 30, "{count} cases");
        let host: Vec<&str> = suites
            .iter()
            .flat_map(|s| &s.cases)
            .filter_map(|c| c.attack.as_deref())
            .collect();
        assert_eq!(host, HOST_ATTACKS, "every host attack has a case");
    }

    #[test]
    fn a_host_case_names_a_known_attack() {
        let dir = tempfile::tempdir().unwrap();
        for (toml, problem) in [
            (
                "[[case]]\nname = \"h\"\nkind = \"host\"\ntries = \"t\"\nexpects = \"e\"\n",
                "a host case names its `attack`",
            ),
            (
                "[[case]]\nname = \"h\"\nkind = \"host\"\nattack = \"nope\"\ntries = \"t\"\nexpects = \"e\"\n",
                "no host attack `nope`",
            ),
            (
                "[[case]]\nname = \"g\"\nscript = \"s.sh\"\nlisten_request = \"exec\"\ntries = \"t\"\nexpects = \"e\"\n",
                "`listen_request` needs a `listen` port",
            ),
        ] {
            std::fs::write(dir.path().join("s.sh"), "true").unwrap();
            let (_, found) = parse(toml, "s", dir.path()).unwrap_err();
            assert!(found.contains(problem), "{found}");
        }
    }
}
