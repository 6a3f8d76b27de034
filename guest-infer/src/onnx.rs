//! Bundles run with ONNX Runtime: a BERT-style encoder fed token ids, with the task read from one
//! of its outputs.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use agentos_protocol::bundle::{BundleManifest, MODEL_FILE, TOKENIZER_FILE};
use agentos_protocol::{InferRequest, InferResult, InferTimings, Task};
use ort::environment::Environment;
use ort::ep::ExecutionProviderDispatch;
use ort::session::Session;
use ort::value::Tensor;
use tokenizers::Tokenizer;

use crate::backend::{Backend, InferError, Results, micros, unsupported};
use crate::decode::{self, TokenScores};
use crate::gpu;

/// ONNX Runtime, loaded from the image once; a failure is kept, so every request reports it.
static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();

pub fn environment(library: &Path) -> Result<&'static Environment, InferError> {
    if !library.is_file() {
        return Err(InferError::NoRuntime(library.to_owned()));
    }
    ENVIRONMENT
        .get_or_init(|| {
            ort::init_from(library)
                .map_err(|e| e.to_string())?
                .with_name("agentos")
                .with_telemetry(false)
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| InferError::Runtime(e.clone()))
}

/// A bundle's tokenizer, set to neither pad nor cut: inputs are checked against `max_tokens`,
/// never cut silently, and padding is per batch.
pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer, String> {
    let mut tokenizer =
        Tokenizer::from_file(dir.join(TOKENIZER_FILE)).map_err(|e| e.to_string())?;
    tokenizer.with_padding(None);
    tokenizer.with_truncation(None).map_err(|e| e.to_string())?;
    Ok(tokenizer)
}

/// A session on `threads` intra-op threads and one inter-op thread, on `providers` (none: the
/// CPU).
pub fn load_session(
    env: &Environment,
    model: &Path,
    threads: usize,
    providers: &[ExecutionProviderDispatch],
) -> Result<Session, String> {
    Session::builder(env)
        .and_then(|b| b.with_intra_threads(threads).map_err(Into::into))
        .and_then(|b| b.with_inter_threads(1).map_err(Into::into))
        .and_then(|b| b.with_execution_providers(providers).map_err(Into::into))
        .and_then(|mut b| b.commit_from_file(model))
        .map_err(|e| e.to_string())
}

/// A tensor's dimensions as sizes; a dynamic (negative) one counts as 0, which no check accepts.
pub fn dims_of(shape: &[i64]) -> Vec<usize> {
    shape
        .iter()
        .map(|&d| usize::try_from(d).unwrap_or(0))
        .collect()
}

/// What the model wants in each of its inputs.
#[derive(Clone, Copy)]
enum Feed {
    Ids,
    Mask,
    TypeIds,
}

pub struct Model {
    manifest: BundleManifest,
    session: Session,
    tokenizer: Tokenizer,
    feeds: Vec<(String, Feed)>,
    output: String,
}

/// A batch of encoded texts, padded to the longest.
struct Batch {
    rows: usize,
    len: usize,
    ids: Vec<i64>,
    mask: Vec<i64>,
    type_ids: Vec<i64>,
    /// Per text: byte spans of its tokens, `(0, 0)` for special tokens and padding.
    offsets: Vec<Vec<(usize, usize)>>,
}

impl Model {
    pub fn load(
        dir: &Path,
        manifest: BundleManifest,
        runtime: &Path,
        threads: usize,
    ) -> Result<Self, InferError> {
        let name = manifest.name.clone();
        let env = environment(runtime)?;
        let load_error = |file: &str, detail: String| InferError::Load {
            name: name.clone(),
            file: file.to_owned(),
            detail,
        };
        let providers = gpu::providers(&manifest, Path::new(gpu::SYSFS_PCI_DEVICES))?;
        let tokenizer = load_tokenizer(dir).map_err(|e| load_error(TOKENIZER_FILE, e))?;
        let session = load_session(env, &dir.join(MODEL_FILE), threads, &providers)
            .map_err(|e| load_error(MODEL_FILE, e))?;
        let mut feeds = Vec::new();
        for input in session.inputs() {
            let feed = match input.name() {
                "input_ids" => Feed::Ids,
                "attention_mask" => Feed::Mask,
                "token_type_ids" => Feed::TypeIds,
                other => {
                    return Err(load_error(
                        MODEL_FILE,
                        format!(
                            "it takes an input `{other}`; agentos feeds input_ids, attention_mask and token_type_ids"
                        ),
                    ));
                }
            };
            feeds.push((input.name().to_owned(), feed));
        }
        let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        let output = match &manifest.output {
            Some(wanted) if outputs.contains(&wanted.as_str()) => wanted.clone(),
            Some(wanted) => {
                return Err(load_error(
                    MODEL_FILE,
                    format!("it has no output `{wanted}`; it has {}", outputs.join(", ")),
                ));
            }
            None => outputs
                .first()
                .map(|s| s.to_string())
                .ok_or_else(|| load_error(MODEL_FILE, "it has no outputs".into()))?,
        };
        Ok(Self {
            manifest,
            session,
            tokenizer,
            feeds,
            output,
        })
    }

    fn model_error(&self, detail: impl Into<String>) -> InferError {
        InferError::Model {
            model: self.manifest.name.clone(),
            detail: detail.into(),
        }
    }

    /// The request's inputs as one batch; an input over `max_tokens` is refused.
    fn encode_inputs(
        &self,
        req: &InferRequest,
        timings: &mut InferTimings,
    ) -> Result<Batch, InferError> {
        let texts: Vec<&str> = req.inputs.iter().map(String::as_str).collect();
        self.encode(&texts, timings, |input, tokens, max, model| {
            InferError::TooLong {
                input,
                tokens,
                max,
                model,
            }
        })
    }

    fn encode(
        &self,
        texts: &[&str],
        timings: &mut InferTimings,
        too_long: impl Fn(usize, usize, u32, String) -> InferError,
    ) -> Result<Batch, InferError> {
        let started = Instant::now();
        let max = self.manifest.max_tokens;
        let mut encodings = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            let enc = self
                .tokenizer
                .encode(*text, true)
                .map_err(|e| self.model_error(format!("cannot tokenize input {}: {e}", i + 1)))?;
            if enc.len() > max as usize {
                return Err(too_long(i + 1, enc.len(), max, self.manifest.name.clone()));
            }
            encodings.push(enc);
        }
        let rows = encodings.len();
        let len = encodings.iter().map(|e| e.len()).max().unwrap_or(0).max(1);
        let mut batch = Batch {
            rows,
            len,
            ids: vec![0; rows * len],
            mask: vec![0; rows * len],
            type_ids: vec![0; rows * len],
            offsets: Vec::with_capacity(rows),
        };
        for (r, enc) in encodings.iter().enumerate() {
            let row = r * len;
            for (j, ((&id, &m), &t)) in enc
                .get_ids()
                .iter()
                .zip(enc.get_attention_mask())
                .zip(enc.get_type_ids())
                .enumerate()
            {
                batch.ids[row + j] = i64::from(id);
                batch.mask[row + j] = i64::from(m);
                batch.type_ids[row + j] = i64::from(t);
            }
            let mut offsets: Vec<(usize, usize)> = enc
                .get_offsets()
                .iter()
                .zip(enc.get_special_tokens_mask())
                .map(|(&span, &special)| if special == 1 { (0, 0) } else { span })
                .collect();
            offsets.resize(len, (0, 0));
            batch.offsets.push(offsets);
        }
        timings.tokenize_us += micros(started);
        timings.tokens += encodings.iter().map(|e| e.len() as u64).sum::<u64>();
        Ok(batch)
    }

    /// Runs the model on `batch`; the output's shape and values.
    fn forward(
        &mut self,
        batch: &Batch,
        timings: &mut InferTimings,
    ) -> Result<(Vec<usize>, Vec<f32>), InferError> {
        let started = Instant::now();
        let shape = [batch.rows, batch.len];
        let mut inputs = Vec::with_capacity(self.feeds.len());
        for (name, feed) in &self.feeds {
            let data = match feed {
                Feed::Ids => batch.ids.clone(),
                Feed::Mask => batch.mask.clone(),
                Feed::TypeIds => batch.type_ids.clone(),
            };
            let tensor =
                Tensor::from_array((shape, data)).map_err(|e| self.model_error(e.to_string()))?;
            inputs.push((name.clone(), tensor.into_dyn()));
        }
        let name = self.manifest.name.clone();
        let error = |detail: String| InferError::Model {
            model: name.clone(),
            detail,
        };
        let outputs = self.session.run(inputs).map_err(|e| error(e.to_string()))?;
        let value = outputs
            .get(&self.output)
            .ok_or_else(|| error(format!("output `{}` is missing", self.output)))?;
        let (dims, data) = value
            .try_extract_tensor::<f32>()
            .map_err(|e| error(format!("output `{}`: {e}", self.output)))?;
        let dims = dims_of(dims);
        let expected: usize = dims.iter().product();
        if dims.first() != Some(&batch.rows) || expected != data.len() {
            return Err(error(format!(
                "output `{}` has shape {dims:?}, not one row per input",
                self.output
            )));
        }
        let data = data.to_vec();
        timings.run_us += micros(started);
        Ok((dims, data))
    }

    /// One normalised vector per row: the output itself when it is `[batch, dim]`, the masked
    /// mean of its token vectors when it is `[batch, seq, dim]`.
    fn vectors(
        &mut self,
        batch: &Batch,
        timings: &mut InferTimings,
    ) -> Result<Vec<Vec<f32>>, InferError> {
        let (dims, data) = self.forward(batch, timings)?;
        let started = Instant::now();
        let vectors = match dims.as_slice() {
            [_, dim] if *dim > 0 => data.chunks_exact(*dim).map(<[f32]>::to_vec).collect(),
            [_, seq, dim] if *seq == batch.len && *dim > 0 => data
                .chunks_exact(seq * dim)
                .enumerate()
                .map(|(r, tokens)| {
                    decode::mean_pool(tokens, &batch.mask[r * seq..(r + 1) * seq], *dim)
                })
                .collect(),
            _ => {
                return Err(self.model_error(format!(
                    "output `{}` has shape {dims:?}; embeddings need [batch, dim] or [batch, seq, dim]",
                    self.output
                )));
            }
        };
        timings.decode_us += micros(started);
        Ok(vectors)
    }

    fn classify(
        &mut self,
        req: &InferRequest,
        timings: &mut InferTimings,
    ) -> Result<Results, InferError> {
        let batch = self.encode_inputs(req, timings)?;
        let (dims, mut data) = self.forward(&batch, timings)?;
        let started = Instant::now();
        let labels = &self.manifest.labels;
        if dims.as_slice() != [batch.rows, labels.len()] {
            return Err(self.model_error(format!(
                "output `{}` has shape {dims:?}; {} labels need [batch, {}]",
                self.output,
                labels.len(),
                labels.len()
            )));
        }
        let probabilities = self.output == "probabilities";
        let results = data
            .chunks_exact_mut(labels.len())
            .map(|scores| {
                if !probabilities {
                    decode::softmax(scores);
                }
                InferResult::Labels {
                    labels: decode::ranked_labels(scores, labels, req.options.top_k),
                }
            })
            .collect();
        timings.decode_us += micros(started);
        Ok(results)
    }

    fn token_classify(
        &mut self,
        req: &InferRequest,
        timings: &mut InferTimings,
    ) -> Result<Results, InferError> {
        let batch = self.encode_inputs(req, timings)?;
        let (dims, mut data) = self.forward(&batch, timings)?;
        let started = Instant::now();
        let labels = &self.manifest.labels;
        if dims.as_slice() != [batch.rows, batch.len, labels.len()] {
            return Err(self.model_error(format!(
                "output `{}` has shape {dims:?}; token labels need [batch, seq, {}]",
                self.output,
                labels.len()
            )));
        }
        let probabilities = self.output == "probabilities";
        let n = labels.len();
        let mut results = Vec::with_capacity(batch.rows);
        for (r, rows) in data.chunks_exact_mut(batch.len * n).enumerate() {
            if !probabilities {
                rows.chunks_exact_mut(n).for_each(decode::softmax);
            }
            let tokens: Vec<TokenScores<'_>> = rows
                .chunks_exact(n)
                .zip(&batch.offsets[r])
                .map(|(probs, &(start, end))| TokenScores { start, end, probs })
                .collect();
            results.push(InferResult::Entities {
                entities: decode::merge_entities(&req.inputs[r], &tokens, labels),
            });
        }
        timings.decode_us += micros(started);
        Ok(results)
    }

    fn summarize(
        &mut self,
        req: &InferRequest,
        timings: &mut InferTimings,
    ) -> Result<Results, InferError> {
        let mut results = Vec::with_capacity(req.inputs.len());
        for (i, text) in req.inputs.iter().enumerate() {
            let spans = decode::split_sentences(text);
            let sentences: Vec<&str> = spans.iter().map(|&(a, b)| &text[a..b]).collect();
            let keep = req.options.sentences.map_or_else(
                || decode::default_keep(sentences.len()),
                |k| k.max(1) as usize,
            );
            let chosen = if sentences.len() <= keep {
                (0..sentences.len()).collect()
            } else {
                let mut vectors = Vec::with_capacity(sentences.len());
                // Batches bound the memory of one run, whatever the document's length.
                for (c, chunk) in sentences.chunks(32).enumerate() {
                    let batch = self.encode(chunk, timings, |sentence, tokens, max, model| {
                        InferError::SentenceTooLong {
                            input: i + 1,
                            sentence: c * 32 + sentence,
                            tokens,
                            max,
                            model,
                        }
                    })?;
                    vectors.extend(self.vectors(&batch, timings)?);
                }
                decode::central_sentences(&vectors, keep)
            };
            let text = chosen
                .iter()
                .map(|&k| sentences[k])
                .collect::<Vec<_>>()
                .join(" ");
            results.push(InferResult::Summary {
                text,
                sentences: chosen.iter().map(|&k| k as u32).collect(),
            });
        }
        Ok(results)
    }
}

impl Backend for Model {
    fn manifest(&self) -> &BundleManifest {
        &self.manifest
    }

    fn run(
        &mut self,
        req: &InferRequest,
        timings: &mut InferTimings,
    ) -> Result<Results, InferError> {
        match req.task {
            Task::Embed => {
                let batch = self.encode_inputs(req, timings)?;
                let vectors = self.vectors(&batch, timings)?;
                Ok(vectors
                    .into_iter()
                    .map(|vector| InferResult::Embedding { vector })
                    .collect())
            }
            Task::Classify => self.classify(req, timings),
            Task::TokenClassify => self.token_classify(req, timings),
            Task::Summarize => self.summarize(req, timings),
            Task::Translate => Err(unsupported(&self.manifest, req.task)),
        }
    }
}
