//! What every kind of model bundle offers the worker: a backend that runs the tasks its bundle
//! does, and the errors of a request.

use std::path::PathBuf;
use std::time::Instant;

use agentos_protocol::bundle::BundleManifest;
use agentos_protocol::{
    InferRequest, InferResult, InferTimings, MAX_INFER_INPUT_BYTES, MAX_INFER_INPUTS, Task,
};

/// A loaded bundle: ONNX models, a seq2seq translator, Apertium.
pub trait Backend: Send {
    fn manifest(&self) -> &BundleManifest;

    /// Runs `req`, whose task the bundle does (the caller checked), adding to `timings`.
    fn run(
        &mut self,
        req: &InferRequest,
        timings: &mut InferTimings,
    ) -> Result<Results, InferError>;
}

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
    #[error(
        "model `{name}` runs on CUDA, and this agent has {found}: start it with one (`--gpu 1`, a GPU bound to vfio-pci on the host; `agentos doctor` lists them)"
    )]
    NoGpu { name: String, found: String },
    #[error("model `{name}` runs on CUDA: {detail}")]
    NoGpuProvider { name: String, detail: String },
    #[error("model `{model}`: {detail}")]
    Model { model: String, detail: String },
    #[error("translator `{model}`: {detail}")]
    Translate { model: String, detail: String },
}

/// The result type every task produces per input.
pub type Results = Vec<InferResult>;

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

pub fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}
