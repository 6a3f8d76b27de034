//! `agentos run --model M --task T --input TEXT`: boot an agent with a model bundle, run one
//! inference, print the result, stop the VM.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use agentos_protocol::bundle::BundleManifest;
use agentos_protocol::{InferOptions, InferReply, InferRequest, InferResult, Task};
use anyhow::{Context, bail};
use serde::Serialize;

use crate::flags::VmArgs;
use agentos::carrier;
use agentos::placement::{self, Placement};
use agentos_core::agent::spec::AgentRequest;
use agentos_core::agent::vm::{AgentVm, VmError};
use agentos_core::signals;
use agentos_image::model::{ModelStore, carrier_copies};
use agentos_image::{self as image};

#[derive(clap::Args, Debug, Clone, Default)]
pub struct InferArgs {
    /// Run a model instead of a program: the name of an installed bundle (`agentos model ls`).
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
    /// What to do with the input: embed, classify, token-classify, summarize, translate
    /// (default: the model's first task).
    #[arg(long, requires = "model")]
    pub task: Option<Task>,
    /// Text to run the model on (repeat for a batch).
    #[arg(long, value_name = "TEXT", requires = "model")]
    pub input: Vec<String>,
    /// File whose whole text is one input (`-`: standard input).
    #[arg(
        long,
        value_name = "FILE",
        requires = "model",
        conflicts_with = "input"
    )]
    pub input_file: Option<PathBuf>,
    /// summarize: how many sentences to keep.
    #[arg(long, requires = "model")]
    pub sentences: Option<u32>,
    /// classify: how many labels to print, best first.
    #[arg(long, requires = "model")]
    pub top_k: Option<u32>,
}

impl InferArgs {
    /// The inference flags only mean something with `--model`.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.model.is_none() {
            let given = [
                (self.task.is_some(), "--task"),
                (!self.input.is_empty(), "--input"),
                (self.input_file.is_some(), "--input-file"),
                (self.sentences.is_some(), "--sentences"),
                (self.top_k.is_some(), "--top-k"),
            ];
            if let Some((_, flag)) = given.iter().find(|(set, _)| *set) {
                bail!("{flag} needs --model NAME (see `agentos model ls`)");
            }
        }
        Ok(())
    }
}

#[derive(Serialize)]
struct JsonInference<'a> {
    model: &'a str,
    task: Task,
    results: &'a [InferResult],
    timings: agentos_protocol::InferTimings,
    /// From process start to the guest agent's hello.
    boot_ms: u64,
    /// From process start to the answer.
    total_ms: u64,
}

/// `agentos run --model NAME`: `vm` and `infer` are the flags of `run`; `json` its `--json`.
pub fn run(
    vm_args: &VmArgs,
    infer: &InferArgs,
    json: bool,
    started: Instant,
) -> anyhow::Result<i32> {
    let vm = vm_args;
    let name = infer.model.as_deref().context("no --model given")?;
    let cache = image::default_cache_dir();
    let store = ModelStore::new(&cache);
    let bundle = store.find(name)?;
    let task = match infer.task {
        Some(task) if bundle.manifest.tasks.contains(&task) => task,
        Some(task) => bail!(
            "model `{name}` does not do {task}; it does {} (see `agentos model ls`)",
            tasks_of(&bundle.manifest)
        ),
        None => bundle.manifest.tasks[0],
    };
    let inputs = read_inputs(&infer.input, infer.input_file.as_deref())?;

    let spec = AgentRequest {
        model: Some(name.to_owned()),
        ..vm.request(None)
    };
    let spec = spec.validate()?;
    // The model's disks are built here, on the host, also for a carrier that takes copies.
    let opts = vm_args.boot_options(&spec)?;
    let disks = opts
        .model_disks
        .clone()
        .context("an agent with a model has its disks")?;

    if placement::decide(vm.carrier)? == Placement::Carrier {
        let mut files = carrier_copies(&store, &disks, &bundle);
        files.extend(
            infer
                .input_file
                .iter()
                .filter(|f| f.as_os_str() != "-")
                .cloned(),
        );
        files.extend([&vm.kernel, &vm.initrd].into_iter().flatten().cloned());
        return Ok(carrier::rerun_inside(files)?);
    }
    let mut vm = match AgentVm::boot(&opts) {
        Ok(vm) => vm,
        Err(VmError::Interrupted) => return Ok(signals::exit_code()),
        Err(e) => return Err(e).context("the agent VM did not boot"),
    };
    let boot_ms = started.elapsed().as_millis() as u64;
    let request = InferRequest {
        id: 0,
        model: name.to_owned(),
        task,
        inputs,
        options: InferOptions {
            sentences: infer.sentences,
            top_k: infer.top_k,
        },
    };
    let answer = vm.conn().infer(request);
    let end = vm.shutdown();
    let reply = match answer {
        Ok(reply) => reply,
        Err(_) if signals::interrupted() => return Ok(signals::exit_code()),
        Err(agentos_core::agent::connection::ConnectionError::Refused(why)) => bail!("{why}"),
        Err(e) => {
            if let Some(crash) = end.report.and_then(|r| r.error) {
                bail!("the VM crashed while running the model: {crash}");
            }
            return Err(e).context("the inference did not complete");
        }
    };
    let mut out = io::stdout().lock();
    if json {
        let json = JsonInference {
            model: &reply.model,
            task: reply.task,
            results: &reply.results,
            timings: reply.timings,
            boot_ms,
            total_ms: started.elapsed().as_millis() as u64,
        };
        serde_json::to_writer(&mut out, &json)?;
        writeln!(out)?;
    } else {
        print_reply(&mut out, &reply)?;
    }
    Ok(0)
}

fn tasks_of(manifest: &BundleManifest) -> String {
    manifest
        .tasks
        .iter()
        .map(|t| t.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The texts given by `--input` (repeated) or `--input-file FILE|-`, none of them empty.
pub fn read_inputs(input: &[String], input_file: Option<&Path>) -> anyhow::Result<Vec<String>> {
    let inputs = match input_file {
        Some(path) if path.as_os_str() == "-" => {
            let mut text = String::new();
            io::stdin()
                .read_to_string(&mut text)
                .context("cannot read standard input")?;
            vec![text]
        }
        Some(path) => vec![
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?,
        ],
        None => input.to_vec(),
    };
    if inputs.is_empty() {
        bail!("give the text to run the model on with --input TEXT or --input-file FILE");
    }
    if let Some(i) = inputs.iter().position(|t| t.trim().is_empty()) {
        bail!("input {} is empty; give the model some text", i + 1);
    }
    Ok(inputs)
}

/// One block per input: labels with scores, entities with spans, or the text produced.
pub fn print_reply(out: &mut dyn Write, reply: &InferReply) -> io::Result<()> {
    let many = reply.results.len() > 1;
    for (i, result) in reply.results.iter().enumerate() {
        if many {
            writeln!(out, "# input {}", i + 1)?;
        }
        match result {
            InferResult::Labels { labels } => {
                for l in labels {
                    writeln!(out, "{}\t{:.4}", l.label, l.score)?;
                }
            }
            InferResult::Entities { entities } => {
                if entities.is_empty() {
                    writeln!(out, "(no entities)")?;
                }
                for e in entities {
                    writeln!(
                        out,
                        "{}\t{}\t{}..{}\t{:.4}",
                        e.label, e.text, e.start, e.end, e.score
                    )?;
                }
            }
            InferResult::Embedding { vector } => {
                let values: Vec<String> = vector.iter().map(|v| format!("{v:.6}")).collect();
                writeln!(out, "[{}]", values.join(", "))?;
            }
            InferResult::Summary { text, .. } | InferResult::Translation { text } => {
                writeln!(out, "{text}")?;
            }
        }
    }
    Ok(())
}
