//! The model bundles of this VM, each loaded on first use and kept for the worker's life, and the
//! dispatch of a request to its bundle.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use agentos_protocol::bundle::{BundleManifest, MANIFEST_FILE, Runtime, check_name};
use agentos_protocol::{
    InferReply, InferRequest, InferResult, InferTimings, MAX_INFER_INPUT_BYTES, MAX_INFER_INPUTS,
    Task,
};

use crate::{apertium, onnx, seq2seq};

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error("request has no inputs")]
    NoInputs,
    #[error("input {0} is empty")]
    EmptyInput(usize),
    #[error("{count} inputs is too many; send at most {MAX_INFER_INPUTS} per request")]
    TooManyInputs { count: usize },
    #[error("inputs total {bytes} bytes; send at most {MAX_INFER_INPUT_BYTES} per request")]
    TooMuchText { bytes: usize },
    #[error("{0}")]
    BadName(#[from] agentos_protocol::bundle::BundleError),
    #[error("model `{name}` is not in this VM (looked in {dir}); start the agent with it")]
    NoModel { name: String, dir: PathBuf },
    #[error("model `{name}`: cannot read {path}: {source}")]
    Read {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("model `{name}`: {detail}")]
    Manifest { name: String, detail: String },
    #[error("model `{name}` does not do {task}; it does {tasks}")]
    Unsupported {
        name: String,
        task: Task,
        tasks: String,
    },
    #[error("ONNX Runtime is missing ({0}); start the agent with an ONNX model")]
    NoRuntime(PathBuf),
    #[error("cannot load ONNX Runtime: {0}")]
    Runtime(String),
    #[error("model `{name}`: cannot load {file}: {detail}")]
    Load {
        name: String,
        file: String,
        detail: String,
    },
    #[error(
        "input {input} is {tokens} tokens long; model `{model}` takes at most {max}: split the text, or summarize it first"
    )]
    TooLong {
        input: usize,
        tokens: usize,
        max: u32,
        model: String,
    },
    #[error(
        "sentence {sentence} of input {input} is {tokens} tokens long; model `{model}` takes at most {max}"
    )]
    SentenceTooLong {
        input: usize,
        sentence: usize,
        tokens: usize,
        max: u32,
        model: String,
    },
    #[error("model `{model}`: {detail}")]
    Model { model: String, detail: String },
    #[error("translator `{model}`: {detail}")]
    Translate { model: String, detail: String },
}

/// A bundle, loaded.
enum Loaded {
    Onnx(Box<onnx::Model>),
    Apertium(Box<apertium::Translator>),
    Seq2Seq(Box<seq2seq::Translator>),
}

/// The bundles of this VM, each loaded once.
pub struct Models {
    dir: PathBuf,
    runtime: PathBuf,
    threads: usize,
    loaded: Mutex<HashMap<String, Arc<Mutex<Option<Loaded>>>>>,
}

impl Models {
    pub fn at(dir: &Path, runtime: &Path, threads: usize) -> Self {
        Self {
            dir: dir.to_owned(),
            runtime: runtime.to_owned(),
            threads: threads.max(1),
            loaded: Mutex::default(),
        }
    }

    pub fn infer(&self, req: &InferRequest) -> Result<InferReply, InferError> {
        check_inputs(&req.inputs)?;
        check_name(&req.model)?;
        let slot = Arc::clone(lock(&self.loaded).entry(req.model.clone()).or_default());
        // One request at a time per model: a session is not shared between runs.
        let mut slot = lock(&slot);
        let mut timings = InferTimings::default();
        let loaded = match slot.as_mut() {
            Some(loaded) => loaded,
            None => {
                let started = Instant::now();
                let loaded = slot.insert(self.load(&req.model)?);
                timings.load_us = micros(started);
                loaded
            }
        };
        let manifest = match loaded {
            Loaded::Onnx(model) => model.manifest(),
            Loaded::Apertium(translator) => translator.manifest(),
            Loaded::Seq2Seq(translator) => translator.manifest(),
        };
        if !manifest.tasks.contains(&req.task) {
            return Err(unsupported(manifest, req.task));
        }
        let results = match loaded {
            Loaded::Onnx(model) => model.run(req, &mut timings)?,
            Loaded::Apertium(translator) => translator.run(req, &mut timings)?,
            Loaded::Seq2Seq(translator) => translator.run(req, &mut timings)?,
        };
        Ok(InferReply {
            id: req.id,
            model: req.model.clone(),
            task: req.task,
            results,
            timings,
        })
    }

    fn load(&self, name: &str) -> Result<Loaded, InferError> {
        let dir = self.dir.join(name);
        let manifest_path = dir.join(MANIFEST_FILE);
        if !manifest_path.is_file() {
            return Err(InferError::NoModel {
                name: name.to_owned(),
                dir: self.dir.clone(),
            });
        }
        let text = fs::read_to_string(&manifest_path).map_err(|source| InferError::Read {
            name: name.to_owned(),
            path: manifest_path.clone(),
            source,
        })?;
        let manifest = BundleManifest::parse(&text).map_err(|e| InferError::Manifest {
            name: name.to_owned(),
            detail: e.to_string(),
        })?;
        if manifest.name != name {
            return Err(InferError::Manifest {
                name: name.to_owned(),
                detail: format!("its manifest names it `{}`", manifest.name),
            });
        }
        match manifest.runtime {
            Runtime::Onnx => match manifest.seq2seq.clone() {
                Some(config) => {
                    seq2seq::Translator::load(&dir, manifest, config, &self.runtime, self.threads)
                        .map(|t| Loaded::Seq2Seq(Box::new(t)))
                }
                None => onnx::Model::load(&dir, manifest, &self.runtime, self.threads)
                    .map(|m| Loaded::Onnx(Box::new(m))),
            },
            Runtime::Apertium => {
                apertium::Translator::load(&dir, manifest).map(|t| Loaded::Apertium(Box::new(t)))
            }
        }
    }
}

fn check_inputs(inputs: &[String]) -> Result<(), InferError> {
    if inputs.is_empty() {
        return Err(InferError::NoInputs);
    }
    if inputs.len() > MAX_INFER_INPUTS {
        return Err(InferError::TooManyInputs {
            count: inputs.len(),
        });
    }
    let bytes: usize = inputs.iter().map(String::len).sum();
    if bytes > MAX_INFER_INPUT_BYTES {
        return Err(InferError::TooMuchText { bytes });
    }
    if let Some(i) = inputs.iter().position(|t| t.trim().is_empty()) {
        return Err(InferError::EmptyInput(i + 1));
    }
    Ok(())
}

pub fn unsupported(manifest: &BundleManifest, task: Task) -> InferError {
    InferError::Unsupported {
        name: manifest.name.clone(),
        task,
        tasks: manifest
            .tasks
            .iter()
            .map(|t| t.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// The result type every task produces per input.
pub type Results = Vec<InferResult>;
