//! Group files: the agents of a group and the channels between them, in TOML.
//!
//! ```toml
//! name = "digest"
//! channels = ["input -> summarizer", "summarizer -> output"]
//!
//! [[agent]]
//! name = "summarizer"
//! model = "minilm"
//! task = "summarize"
//! ```
//!
//! `input` and `output` are the group's two ends: the one channel from `input` names the agent
//! that receives the group's input, and every message sent to `output` is part of its result.
//! Every problem is reported with the file and line it is on.

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::{Path, PathBuf};

use agentos_protocol::peer::{Handler, MAX_PEER_NAME_BYTES, valid_peer_name};
use agentos_protocol::{InferOptions, Task};
use serde::Deserialize;
use toml::Spanned;

use crate::toml_file;
use agentos_core::agent::spec::{AgentRequest, AgentSpec};
use agentos_core::agent::supervision::RestartPolicy;
use agentos_core::cgroup::PriorityClass;
use agentos_protocol::error_chain;

/// The sender of the group's input, and the receiver of its results.
pub const INPUT: &str = "input";
pub const OUTPUT: &str = "output";

/// Agents one group may declare.
pub const MAX_AGENTS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum GroupFileError {
    #[error("cannot read group file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {problem}")]
    Invalid {
        path: PathBuf,
        line: usize,
        problem: String,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct GroupSpec {
    pub name: String,
    pub agents: Vec<GroupAgent>,
    /// `(from, to)` pairs, `input` and `output` included.
    pub channels: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct GroupAgent {
    pub name: String,
    pub handler: Option<Handler>,
    /// The model bundle the VM needs (that of an `infer` handler).
    pub model: Option<String>,
    /// Its VM: vCPUs, memory, CPU slice, model (checked as every agent is).
    pub vm: AgentSpec,
    /// When its VM ends while the group runs (the host never stops a member then, so any end
    /// is a failure): booted again up to [`MAX_RESTARTS`] times, waiting 1, 2, 4 s before each.
    pub restart: RestartPolicy,
    /// Replicas of this agent, each its own VM: `NAME-1` ... `NAME-N` when more than one. A
    /// message to `NAME` goes to the replica with the fewest messages waiting.
    pub count: u32,
}

/// Restarts of one agent while its group runs.
pub const MAX_RESTARTS: u32 = 3;

impl GroupSpec {
    /// The agent that receives the group's input.
    pub fn entry(&self) -> &str {
        self.channels
            .iter()
            .find(|(from, _)| from == INPUT)
            .map(|(_, to)| to.as_str())
            .unwrap_or_default()
    }

    /// Where the results of `agent` go.
    pub fn outputs_of(&self, agent: &str) -> Vec<String> {
        self.channels
            .iter()
            .filter(|(from, _)| from == agent)
            .map(|(_, to)| to.clone())
            .collect()
    }

    /// Every VM of the group: its name and the agent it is a replica of.
    pub fn members(&self) -> Vec<(String, &GroupAgent)> {
        let mut members = Vec::new();
        for agent in &self.agents {
            if agent.count <= 1 {
                members.push((agent.name.clone(), agent));
            } else {
                for i in 1..=agent.count {
                    members.push((format!("{}-{i}", agent.name), agent));
                }
            }
        }
        members
    }

    /// Every VM's name with the agent it is a replica of, as the router takes them.
    pub fn member_roles(&self) -> Vec<(String, String)> {
        self.members()
            .into_iter()
            .map(|(member, agent)| (member, agent.name.clone()))
            .collect()
    }

    /// The agent `member` is (a replica of).
    pub fn agent_of(&self, member: &str) -> Option<&GroupAgent> {
        self.members()
            .into_iter()
            .find(|(m, _)| m == member)
            .map(|(_, agent)| agent)
    }

    /// How many results one input makes: one per channel into `output`.
    pub fn results_per_input(&self) -> usize {
        self.channels.iter().filter(|(_, to)| to == OUTPUT).count()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: Spanned<String>,
    #[serde(default)]
    channels: Vec<Spanned<String>>,
    #[serde(default)]
    agent: Vec<Spanned<RawAgent>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    name: Spanned<String>,
    model: Option<String>,
    task: Option<Spanned<String>>,
    sentences: Option<u32>,
    top_k: Option<u32>,
    exec: Option<Spanned<Vec<String>>>,
    vcpus: Option<u8>,
    memory: Option<u64>,
    cpus: Option<f64>,
    cpuset: Option<String>,
    weight: Option<u32>,
    class: Option<PriorityClass>,
    #[serde(default)]
    restart: RestartPolicy,
    count: Option<u32>,
    /// Host PCI devices, `vfio:ADDRESS[,mmap=off]` (see `agentos run --device`).
    #[serde(default)]
    devices: Vec<String>,
    gpus: Option<u32>,
}

/// Reads and checks the group file at `path`; returns it with its text.
pub fn load_with_text(path: &Path) -> Result<(GroupSpec, String), GroupFileError> {
    let text = toml_file::read(path).map_err(|source| GroupFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let spec = parse(&text).map_err(|(line, problem)| GroupFileError::Invalid {
        path: path.to_owned(),
        line,
        problem,
    })?;
    Ok((spec, text))
}

/// Reads and checks the group file at `path`.
pub fn load(path: &Path) -> Result<GroupSpec, GroupFileError> {
    load_with_text(path).map(|(spec, _)| spec)
}

/// Parses a group file; an error is the line it is on and what is wrong.
pub fn parse(text: &str) -> Result<GroupSpec, (usize, String)> {
    let line_of = |span: Range<usize>| toml_file::line_of(text, span);
    let at = |span: Range<usize>, problem: String| (line_of(span), problem);
    let raw: RawGroup = toml_file::parse(text)?;

    let name = raw.name.get_ref();
    if !valid_peer_name(name) {
        return Err(at(
            raw.name.span(),
            format!("group name `{name}` must be 1-64 letters, digits, `-`, `_` or `.`"),
        ));
    }
    if raw.agent.is_empty() {
        return Err((
            1,
            "the group has no agents; add an [[agent]] table".to_owned(),
        ));
    }
    if raw.agent.len() > MAX_AGENTS {
        return Err((
            line_of(raw.agent[MAX_AGENTS].span()),
            format!("a group has at most {MAX_AGENTS} agents"),
        ));
    }

    let mut agents = Vec::new();
    let mut names = BTreeSet::new();
    for raw_agent in &raw.agent {
        let agent = agent_spec(raw_agent.get_ref(), &at)?;
        if !names.insert(agent.name.clone()) {
            return Err(at(
                raw_agent.get_ref().name.span(),
                format!("agent `{}` is declared twice", agent.name),
            ));
        }
        agents.push(agent);
    }
    let replicas: u32 = agents.iter().map(|a| a.count).sum();
    if replicas as usize > MAX_AGENTS {
        return Err(at(
            raw.agent[0].span(),
            format!(
                "the group's agents have {replicas} replicas in all; a group has at most {MAX_AGENTS} VMs"
            ),
        ));
    }
    for (raw_agent, agent) in raw.agent.iter().zip(&agents) {
        if agent.count > 1 {
            let taken = (1..=agent.count)
                .map(|i| format!("{}-{i}", agent.name))
                .find(|replica| names.contains(replica));
            if let Some(replica) = taken {
                return Err(at(
                    raw_agent.get_ref().name.span(),
                    format!(
                        "agent `{}`'s replica `{replica}` has the name of another agent",
                        agent.name
                    ),
                ));
            }
        }
    }

    let mut channels = Vec::new();
    for channel in &raw.channels {
        let problem = |p: String| at(channel.span(), p);
        let Some((from, to)) = channel.get_ref().split_once("->") else {
            return Err(problem(format!(
                "channel `{}` is not of the form `from -> to`",
                channel.get_ref()
            )));
        };
        let (from, to) = (from.trim(), to.trim());
        if from != INPUT && !names.contains(from) {
            return Err(problem(format!(
                "channel from `{from}`: no agent has that name (agents: {})",
                join(&names)
            )));
        }
        if to != OUTPUT && !names.contains(to) {
            return Err(problem(format!(
                "channel to `{to}`: no agent has that name (agents: {})",
                join(&names)
            )));
        }
        if from == to {
            return Err(problem(format!(
                "channel from `{from}` to itself; an agent cannot send to itself"
            )));
        }
        if from == INPUT && to == OUTPUT {
            return Err(problem("the input must go to an agent".to_owned()));
        }
        let pair = (from.to_owned(), to.to_owned());
        if channels.contains(&pair) {
            return Err(problem(format!(
                "channel `{from} -> {to}` is declared twice"
            )));
        }
        if from == INPUT && channels.iter().any(|(f, _)| f == INPUT) {
            return Err(problem(
                "a second channel from `input`; the input goes to one agent".to_owned(),
            ));
        }
        channels.push(pair);
    }
    let spec = GroupSpec {
        name: name.clone(),
        agents,
        channels,
    };
    if spec.entry().is_empty() {
        return Err((
            line_of(raw.name.span()),
            "no channel from `input`; add one such as \"input -> AGENT\"".to_owned(),
        ));
    }
    Ok(spec)
}

fn agent_spec(
    raw: &RawAgent,
    at: &dyn Fn(Range<usize>, String) -> (usize, String),
) -> Result<GroupAgent, (usize, String)> {
    let name = raw.name.get_ref();
    let here = |p: String| at(raw.name.span(), p);
    if !valid_peer_name(name) || name == INPUT || name == OUTPUT {
        return Err(here(format!(
            "agent name `{name}` must be 1-64 letters, digits, `-`, `_` or `.`, and not `input` or `output`"
        )));
    }
    let task = match &raw.task {
        Some(task) => Some(task.get_ref().parse::<Task>().map_err(|e| {
            at(
                task.span(),
                format!("agent `{name}`: {e}; use one of {}", task_names()),
            )
        })?),
        None => None,
    };
    let handler = match (&raw.model, task, &raw.exec) {
        (Some(_), _, Some(exec)) => {
            return Err(at(
                exec.span(),
                format!("agent `{name}` has both a model and `exec`; give one"),
            ));
        }
        (Some(model), Some(task), None) => Some(Handler::Infer {
            model: model.clone(),
            task,
            options: InferOptions {
                sentences: raw.sentences,
                top_k: raw.top_k,
            },
        }),
        (Some(_), None, None) => {
            return Err(here(format!(
                "agent `{name}` has a model but no `task`; add task = one of {}",
                task_names()
            )));
        }
        (None, Some(_), _) => {
            return Err(here(format!("agent `{name}` has a `task` but no `model`")));
        }
        (None, None, Some(exec)) => {
            let Some((program, args)) = exec.get_ref().split_first() else {
                return Err(at(
                    exec.span(),
                    format!("agent `{name}`: `exec` needs a program"),
                ));
            };
            Some(Handler::Exec {
                program: program.clone(),
                args: args.to_vec(),
            })
        }
        (None, None, None) => None,
    };
    let vm = AgentRequest {
        vcpus: raw.vcpus,
        memory_mib: raw.memory,
        cpus: raw.cpus,
        weight: raw.weight,
        class: raw.class,
        cpuset: raw.cpuset.clone(),
        model: raw.model.clone(),
        devices: raw.devices.clone(),
        gpus: raw.gpus,
        ..Default::default()
    }
    .validate()
    .map_err(|e| here(format!("agent `{name}`: {}", error_chain(&e))))?;
    let count = raw.count.unwrap_or(1);
    if count > 1 && !raw.devices.is_empty() {
        return Err(here(format!(
            "agent `{name}`: replicas cannot share `devices` (a device goes to one VM); give `gpus` instead, or one agent per device"
        )));
    }
    if !(1..=MAX_AGENTS as u32).contains(&count) {
        return Err(here(format!(
            "agent `{name}`: count = {count}; give 1 to {MAX_AGENTS} replicas"
        )));
    }
    if count > 1 && name.len() + 3 > MAX_PEER_NAME_BYTES {
        return Err(here(format!(
            "agent `{name}`: a replicated agent's name must leave room for `-N`"
        )));
    }
    Ok(GroupAgent {
        name: name.clone(),
        handler,
        model: raw.model.clone(),
        vm,
        restart: raw.restart,
        count,
    })
}

fn join(names: &BTreeSet<String>) -> String {
    names.iter().cloned().collect::<Vec<_>>().join(", ")
}

fn task_names() -> String {
    Task::ALL
        .iter()
        .map(|t| t.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = r#"name = "digest"
channels = [
  "input -> summarizer",
  "summarizer -> translator",
  "summarizer -> output",
  "translator -> output",
]

[[agent]]
name = "summarizer"
model = "minilm"
task = "summarize"
sentences = 2

[[agent]]
name = "translator"
exec = ["/bin/sh", "-c", "cat"]
memory = 256
restart = "never"
class = "interactive"
"#;

    #[test]
    fn parses_agents_channels_and_ends() {
        let spec = parse(DIGEST).unwrap();
        assert_eq!(spec.name, "digest");
        assert_eq!(spec.entry(), "summarizer");
        assert_eq!(spec.results_per_input(), 2);
        assert_eq!(spec.outputs_of("summarizer"), ["translator", "output"]);
        let summarizer = &spec.agents[0];
        assert_eq!(summarizer.model.as_deref(), Some("minilm"));
        assert!(matches!(
            &summarizer.handler,
            Some(Handler::Infer { task: Task::Summarize, options, .. }) if options.sentences == Some(2)
        ));
        let translator = &spec.agents[1];
        assert_eq!(translator.vm.memory_mib(), 256);
        assert_eq!(translator.restart, RestartPolicy::Never);
        assert_eq!(translator.vm.cpu().weight, Some(10_000));
        assert_eq!(summarizer.restart, RestartPolicy::OnFailure);
        assert!(matches!(
            &translator.handler,
            Some(Handler::Exec { program, args }) if program == "/bin/sh" && args.len() == 2
        ));
    }

    fn error(text: &str) -> (usize, String) {
        parse(text).unwrap_err()
    }

    #[test]
    fn errors_name_the_line_and_the_problem() {
        let unknown = DIGEST.replace("translator -> output", "translator -> nobody");
        let (line, problem) = error(&unknown);
        assert_eq!(line, 6, "{problem}");
        assert!(problem.contains("no agent has that name"), "{problem}");

        let bad_task = DIGEST.replace("\"summarize\"", "\"sumarize\"");
        let (line, problem) = error(&bad_task);
        assert_eq!(line, 12, "{problem}");
        assert!(problem.contains("unknown task `sumarize`"), "{problem}");

        let twice = DIGEST.replace("name = \"translator\"", "name = \"summarizer\"");
        let (line, problem) = error(&twice);
        assert_eq!(line, 16, "{problem}");
        assert!(problem.contains("declared twice"), "{problem}");

        let unknown_key = DIGEST.replace("memory = 256", "memroy = 256");
        let (line, problem) = error(&unknown_key);
        assert_eq!(line, 18, "{problem}");
        assert!(problem.contains("memroy"), "{problem}");

        let syntax = DIGEST.replace("sentences = 2", "sentences = ");
        assert_eq!(error(&syntax).0, 13);
    }

    #[test]
    fn refuses_what_cannot_run() {
        let cases = [
            (
                DIGEST.replace("  \"input -> summarizer\",\n", ""),
                "no channel from `input`",
            ),
            (
                DIGEST.replace("summarizer -> translator", "summarizer -> summarizer"),
                "to itself",
            ),
            (DIGEST.replace("task = \"summarize\"", ""), "no `task`"),
            (
                DIGEST.replace("memory = 256", "model = \"x\""),
                "both a model and `exec`",
            ),
            (
                DIGEST.replace("[\"/bin/sh\", \"-c\", \"cat\"]", "[]"),
                "needs a program",
            ),
            (
                DIGEST.replace("name = \"digest\"", "name = \"../x\""),
                "group name",
            ),
            (
                DIGEST.replace("name = \"translator\"", "name = \"output\""),
                "not `input` or `output`",
            ),
            (
                DIGEST.replace(
                    "\"translator -> output\",",
                    "\"translator -> output\", \"input -> translator\",",
                ),
                "the input goes to one agent",
            ),
            ("name = \"g\"\nchannels = []\n".to_owned(), "no agents"),
            (
                DIGEST.replace("memory = 256", "weight = 5"),
                "give a weight or a class, not both",
            ),
            (
                DIGEST.replace("memory = 256", "cpuset = \"one\""),
                "cpuset must list CPUs like `0-1,3`, not `one`",
            ),
            (
                DIGEST.replace("memory = 256", "count = 0"),
                "give 1 to 16 replicas",
            ),
            (
                DIGEST.replace("memory = 256", "count = 16"),
                "17 replicas in all",
            ),
            (
                DIGEST
                    .replace("memory = 256", "count = 2")
                    .replace("name = \"summarizer\"", "name = \"translator-2\"")
                    .replace("input -> summarizer", "input -> translator-2")
                    .replace("summarizer ->", "translator-2 ->"),
                "replica `translator-2` has the name of another agent",
            ),
        ];
        for (text, expected) in cases {
            let (_, problem) = error(&text);
            assert!(problem.contains(expected), "{expected}: {problem}");
        }
    }

    #[test]
    fn replicas_are_members_named_after_their_agent() {
        let spec = parse(&DIGEST.replace("memory = 256", "count = 3\ncpuset = \"0\"")).unwrap();
        assert_eq!(spec.agents[1].count, 3);
        assert_eq!(spec.agents[1].vm.cpu().cpuset.as_deref(), Some("0"));
        let members: Vec<(String, &str)> = spec
            .members()
            .into_iter()
            .map(|(member, agent)| (member, agent.name.as_str()))
            .collect();
        assert_eq!(
            members,
            [
                ("summarizer".to_owned(), "summarizer"),
                ("translator-1".to_owned(), "translator"),
                ("translator-2".to_owned(), "translator"),
                ("translator-3".to_owned(), "translator"),
            ]
        );
    }

    #[test]
    fn agents_ask_for_devices_and_gpus_and_replicas_only_for_gpus() {
        let spec = parse(&DIGEST.replace(
            "memory = 256",
            "devices = [\"vfio:0000:00:01.0\"]\ngpus = 1",
        ))
        .unwrap();
        assert_eq!(spec.agents[1].vm.devices()[0].to_string(), "0000:00:01.0");
        assert_eq!(spec.agents[1].vm.gpus(), 1);
        let gpus = parse(&DIGEST.replace("memory = 256", "count = 2\ngpus = 1")).unwrap();
        assert_eq!(gpus.agents[1].vm.gpus(), 1);
        let (_, problem) = error(&DIGEST.replace(
            "memory = 256",
            "count = 2\ndevices = [\"vfio:0000:00:01.0\"]",
        ));
        assert!(
            problem.contains("replicas cannot share `devices`"),
            "{problem}"
        );
        let (_, problem) = error(&DIGEST.replace("memory = 256", "devices = [\"0000:00:01.0\"]"));
        assert!(
            problem.contains("give a device as vfio:ADDRESS"),
            "{problem}"
        );
    }

    #[test]
    fn load_reports_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.toml");
        std::fs::write(&path, "name = 1\n").unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}:1: ", path.display())), "{err}");
        let err = load(&dir.path().join("missing.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read group file"), "{err}");
    }
}
