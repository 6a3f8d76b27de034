//! Model bundles: a directory holding a model and its `agentos-model.toml`, which the host checks
//! and packs and the guest agent loads.
//!
//! ```toml
//! name = "sentiment"
//! tasks = ["classify"]
//! max_tokens = 256
//! output = "probabilities"        # the model output the task reads
//! labels = ["negative", "positive"]
//!
//! [files]                         # every file of the bundle, with its SHA-256
//! "model.onnx" = "9f2c..."
//! "tokenizer.json" = "41d0..."
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::infer::Task;

/// The manifest's file name inside a bundle directory.
pub const MANIFEST_FILE: &str = "agentos-model.toml";
/// Where bundles are in the guest: `<dir>/<name>/`.
pub const GUEST_MODELS_DIR: &str = "/opt/agentos/models";
/// The inference worker in the guest (`agentos-infer`), which the guest agent starts.
pub const GUEST_INFER_WORKER: &str = "/opt/agentos/bin/agentos-infer";
/// Where ONNX Runtime is in the guest.
pub const GUEST_ONNXRUNTIME: &str = "/opt/agentos/onnxruntime/libonnxruntime.so";
/// Where the runtime disk is mounted in the guest: the worker and ONNX Runtime at the paths
/// above, in `lib/` the shared libraries they need beyond the agent image's, and `models/`,
/// where each bundle's own disk is mounted.
pub const GUEST_RUNTIME_DIR: &str = "/opt/agentos";
/// The runtime disk's libraries; the worker looks there first.
pub const GUEST_LIBRARY_DIR: &str = "/opt/agentos/lib";
/// Inside a bundle's disk: the libraries the bundle's programs (`bin/`) need beyond the agent
/// image's.
pub const MODEL_LIBRARY_DIR: &str = ".libs";
/// The kernel command-line parameter naming the runtime disk's device (`agentos.runtime=pmem0`).
pub const RUNTIME_DISK_PARAM: &str = "agentos.runtime";
/// The parameter naming a bundle's disk and the bundle (`agentos.model=pmem1:sentiment`).
pub const MODEL_DISK_PARAM: &str = "agentos.model";
/// The file system of the runtime and bundle disks.
pub const MODEL_DISK_FSTYPE: &str = "erofs";
/// The model file of an `onnx` bundle.
pub const MODEL_FILE: &str = "model.onnx";
/// The tokenizer of an `onnx` bundle, in the Hugging Face `tokenizers` format.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

const MAX_NAME: usize = 64;
const MAX_LABELS: usize = 4096;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Runtime {
    /// `model.onnx` and `tokenizer.json`, run with ONNX Runtime.
    #[default]
    Onnx,
    /// Apertium's rule-based translator, with the language pair's data in the bundle.
    Apertium,
}

/// Where an ONNX bundle's models run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExecutionProvider {
    /// ONNX Runtime's CPU kernels.
    #[default]
    Cpu,
    /// ONNX Runtime's CUDA execution provider, on an NVIDIA GPU passed to the agent.
    Cuda,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleManifest {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub licence: String,
    #[serde(default)]
    pub runtime: Runtime,
    /// Where its ONNX models run (`cpu` by default); a bundle that asks for a GPU is refused,
    /// saying why, by an agent that has none or whose ONNX Runtime cannot use it.
    #[serde(default)]
    pub execution_provider: ExecutionProvider,
    pub tasks: Vec<Task>,
    /// Longest input, in tokens including the special ones, the model takes.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    /// The output the task reads: `[batch, n]` pooled vectors or class scores, `[batch, seq, n]`
    /// token scores. Scores named `probabilities` are used as they are, others get a softmax.
    #[serde(default)]
    pub output: Option<String>,
    /// Class names, in the order of the output's last dimension.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Apertium: the mode to run, e.g. `eng-spa`.
    #[serde(default)]
    pub mode: Option<String>,
    /// An encoder-decoder pair for `translate` (e.g. Marian exported with optimum).
    #[serde(default)]
    pub seq2seq: Option<Seq2Seq>,
    /// Free-form: what built the bundle.
    #[serde(default)]
    pub build: String,
    /// Free-form: how well the model does, and on what.
    #[serde(default)]
    pub evaluation: BTreeMap<String, toml::Value>,
    /// Every file of the bundle, relative to its directory, with its SHA-256 in hex.
    pub files: BTreeMap<String, String>,
}

fn default_max_tokens() -> u32 {
    512
}

/// An encoder-decoder model decoded greedily: the encoder takes `input_ids` and
/// `attention_mask` and gives `[batch, src, hidden]`; the decoder takes `input_ids` (the tokens
/// so far), `encoder_hidden_states` and `encoder_attention_mask` and gives `logits`
/// `[batch, tgt, vocab]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seq2Seq {
    pub encoder: String,
    pub decoder: String,
    /// The token decoding starts from.
    pub decoder_start: u32,
    /// The token that ends the output.
    pub eos: u32,
    /// Output tokens at most, per input.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: u32,
}

fn default_max_new_tokens() -> u32 {
    256
}

/// The largest `max_new_tokens` a bundle may ask for.
pub const MAX_NEW_TOKENS: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{MANIFEST_FILE}: {0}")]
    Parse(#[from] toml::de::Error),
    #[error(
        "bundle name `{0}` is not valid: use 1 to {MAX_NAME} letters, digits, `-`, `_` or `.`, not starting with `.`"
    )]
    Name(String),
    #[error(
        "{MANIFEST_FILE}: `tasks` is empty; list what the model does, e.g. tasks = [\"embed\"]"
    )]
    NoTasks,
    #[error(
        "{MANIFEST_FILE}: file name `{0}` must be a plain name or a relative path inside the bundle"
    )]
    FileName(String),
    #[error("{MANIFEST_FILE}: `{0}` is not a SHA-256 in hex")]
    Checksum(String),
    #[error("{MANIFEST_FILE}: a {runtime} bundle needs `{file}` in [files]")]
    MissingFile { runtime: &'static str, file: String },
    #[error("{MANIFEST_FILE}: task {task} needs `labels`")]
    NoLabels { task: Task },
    #[error("{MANIFEST_FILE}: {0} labels is too many (at most {MAX_LABELS})")]
    TooManyLabels(usize),
    #[error("{MANIFEST_FILE}: task {task} is not something {runtime} bundles do")]
    Unsupported { task: Task, runtime: &'static str },
    #[error("{MANIFEST_FILE}: an apertium bundle needs `mode`, e.g. mode = \"eng-spa\"")]
    NoMode,
    #[error("{MANIFEST_FILE}: max_tokens must be at least 3")]
    MaxTokens,
    #[error(
        "{MANIFEST_FILE}: a [seq2seq] bundle does translate only, and translate by onnx needs [seq2seq]"
    )]
    Seq2SeqTasks,
    #[error("{MANIFEST_FILE}: seq2seq max_new_tokens must be 1 to {MAX_NEW_TOKENS}")]
    MaxNewTokens,
}

impl BundleManifest {
    /// Parses and checks a manifest: everything that can be known without the files.
    pub fn parse(text: &str) -> Result<Self, BundleError> {
        let manifest: Self = toml::from_str(text)?;
        manifest.validate()?;
        Ok(manifest)
    }

    pub fn validate(&self) -> Result<(), BundleError> {
        check_name(&self.name)?;
        if self.tasks.is_empty() {
            return Err(BundleError::NoTasks);
        }
        if self.max_tokens < 3 {
            return Err(BundleError::MaxTokens);
        }
        if self.labels.len() > MAX_LABELS {
            return Err(BundleError::TooManyLabels(self.labels.len()));
        }
        for (file, sum) in &self.files {
            check_relative(file)?;
            if sum.len() != 64 || !sum.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(BundleError::Checksum(sum.clone()));
            }
        }
        let runtime = self.runtime_name();
        let needs: Vec<&str> = match (self.runtime, &self.seq2seq) {
            (Runtime::Onnx, None) => vec![MODEL_FILE, TOKENIZER_FILE],
            (Runtime::Onnx, Some(s)) => vec![&s.encoder, &s.decoder, TOKENIZER_FILE],
            (Runtime::Apertium, _) => vec![],
        };
        for file in needs {
            if !self.files.contains_key(file) {
                return Err(BundleError::MissingFile {
                    runtime,
                    file: file.to_owned(),
                });
            }
        }
        if self.runtime == Runtime::Onnx {
            let translates = self.tasks.contains(&Task::Translate);
            match &self.seq2seq {
                Some(_) if self.tasks != [Task::Translate] => {
                    return Err(BundleError::Seq2SeqTasks);
                }
                None if translates => return Err(BundleError::Seq2SeqTasks),
                Some(s) if !(1..=MAX_NEW_TOKENS).contains(&s.max_new_tokens) => {
                    return Err(BundleError::MaxNewTokens);
                }
                _ => {}
            }
        }
        for &task in &self.tasks {
            let supported = match self.runtime {
                Runtime::Onnx => true,
                Runtime::Apertium => task == Task::Translate,
            };
            if !supported {
                return Err(BundleError::Unsupported { task, runtime });
            }
            if matches!(task, Task::Classify | Task::TokenClassify) && self.labels.is_empty() {
                return Err(BundleError::NoLabels { task });
            }
        }
        if self.runtime == Runtime::Apertium && self.mode.is_none() {
            return Err(BundleError::NoMode);
        }
        Ok(())
    }

    pub fn runtime_name(&self) -> &'static str {
        match self.runtime {
            Runtime::Onnx => "onnx",
            Runtime::Apertium => "apertium",
        }
    }
}

/// Bundle names become directory names on the host and in the guest.
pub fn check_name(name: &str) -> Result<(), BundleError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(BundleError::Name(name.to_owned()))
    }
}

fn check_relative(file: &str) -> Result<(), BundleError> {
    let ok = !file.is_empty()
        && !file.starts_with('/')
        && file.len() <= 255
        && file
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
        && !file.contains('\0');
    if ok {
        Ok(())
    } else {
        Err(BundleError::FileName(file.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUM: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    fn onnx(extra: &str) -> String {
        format!(
            "name = \"m\"\ntasks = [\"classify\"]\n{extra}\n[files]\n\"model.onnx\" = \"{SUM}\"\n\"tokenizer.json\" = \"{SUM}\"\n"
        )
    }

    #[test]
    fn a_classifier_needs_labels() {
        let err = BundleManifest::parse(&onnx("")).unwrap_err().to_string();
        assert!(err.contains("task classify needs `labels`"), "{err}");
        let ok = BundleManifest::parse(&onnx("labels = [\"a\", \"b\"]")).unwrap();
        assert_eq!(ok.max_tokens, 512);
        assert_eq!(ok.runtime, Runtime::Onnx);
    }

    #[test]
    fn file_names_stay_inside_the_bundle() {
        for bad in ["../x", "/etc/passwd", "a/../b", "", "a//b"] {
            let text = format!("name = \"m\"\ntasks = [\"embed\"]\n[files]\n{bad:?} = \"{SUM}\"\n");
            let err = BundleManifest::parse(&text).unwrap_err().to_string();
            assert!(err.contains("must be a plain name"), "{bad}: {err}");
        }
    }

    #[test]
    fn names_are_directory_safe() {
        for bad in ["", ".x", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        check_name("minilm-l6_v2.int8").unwrap();
    }

    #[test]
    fn unknown_tasks_and_fields_are_refused() {
        let text = onnx("labels = [\"a\"]").replace("classify", "sentiment");
        let err = BundleManifest::parse(&text).unwrap_err().to_string();
        assert!(err.contains("unknown variant `sentiment`"), "{err}");
        let err = BundleManifest::parse(&onnx("labels = [\"a\"]\ncolour = 1"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `colour`"), "{err}");
    }

    #[test]
    fn runtimes_do_their_own_tasks() {
        let text =
            "name = \"t\"\nruntime = \"apertium\"\ntasks = [\"translate\"]\n[files]\n".to_owned();
        let err = BundleManifest::parse(&text).unwrap_err().to_string();
        assert!(err.contains("needs `mode`"), "{err}");
        BundleManifest::parse(&text.replace("[files]", "mode = \"eng-spa\"\n[files]")).unwrap();
        let err = BundleManifest::parse(&onnx("").replace("classify", "translate"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("translate by onnx needs [seq2seq]"), "{err}");
        let err = BundleManifest::parse(
            &text
                .replace("\"translate\"", "\"embed\"")
                .replace("[files]", "mode = \"x\"\n[files]"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not something apertium bundles do"), "{err}");
    }

    #[test]
    fn a_seq2seq_bundle_names_its_two_models() {
        let text = format!(
            "name = \"t\"\ntasks = [\"translate\"]\n[seq2seq]\nencoder = \"enc.onnx\"\ndecoder = \"dec.onnx\"\ndecoder_start = 0\neos = 1\n[files]\n\"enc.onnx\" = \"{SUM}\"\n\"tokenizer.json\" = \"{SUM}\"\n"
        );
        let err = BundleManifest::parse(&text).unwrap_err().to_string();
        assert!(err.contains("needs `dec.onnx`"), "{err}");
        let ok = text.replace("[files]\n", &format!("[files]\n\"dec.onnx\" = \"{SUM}\"\n"));
        let manifest = BundleManifest::parse(&ok).unwrap();
        assert_eq!(manifest.seq2seq.unwrap().max_new_tokens, 256);
        let err =
            BundleManifest::parse(&ok.replace("[\"translate\"]", "[\"translate\", \"embed\"]"))
                .unwrap_err()
                .to_string();
        assert!(err.contains("does translate only"), "{err}");
    }

    #[test]
    fn checksums_are_hex_sha256() {
        let err = BundleManifest::parse(&onnx("labels = [\"a\"]").replacen(SUM, "abc", 1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`abc` is not a SHA-256"), "{err}");
    }
}
