//! Encoder-decoder bundles (`[seq2seq]`): `translate` by greedy decoding.
//!
//! The encoder runs once per input; the decoder runs once per output token on all the tokens so
//! far (no cache of past keys and values: simple, and fine for the short outputs of sentence
//! translation), and the highest-scoring token of the last position is appended until the end
//! token or `max_new_tokens`.

use std::path::Path;
use std::time::Instant;

use agentos_protocol::bundle::{BundleManifest, Seq2Seq, TOKENIZER_FILE};
use agentos_protocol::{InferRequest, InferResult, InferTimings};
use ort::session::{Session, SessionInputValue};
use ort::value::Tensor;
use tokenizers::Tokenizer;

use crate::backend::{Backend, InferError, Results, micros};
use crate::gpu;
use crate::onnx::{dims_of, environment, load_session, load_tokenizer};

pub struct Translator {
    manifest: BundleManifest,
    config: Seq2Seq,
    encoder: Session,
    decoder: Session,
    tokenizer: Tokenizer,
}

impl Translator {
    pub fn load(
        dir: &Path,
        manifest: BundleManifest,
        config: Seq2Seq,
        runtime: &Path,
        threads: usize,
    ) -> Result<Self, InferError> {
        let env = environment(runtime)?;
        let name = manifest.name.clone();
        let load_error = |file: &str, detail: String| InferError::Load {
            name: name.clone(),
            file: file.to_owned(),
            detail,
        };
        let providers = gpu::providers(&manifest, Path::new(gpu::SYSFS_PCI_DEVICES))?;
        let tokenizer = load_tokenizer(dir).map_err(|e| load_error(TOKENIZER_FILE, e))?;
        let session = |file: &str| {
            load_session(env, &dir.join(file), threads, &providers).map_err(|e| load_error(file, e))
        };
        let encoder = session(&config.encoder)?;
        let decoder = session(&config.decoder)?;
        for (session, file, wanted) in [
            (
                &encoder,
                &config.encoder,
                &["input_ids", "attention_mask"][..],
            ),
            (
                &decoder,
                &config.decoder,
                &[
                    "input_ids",
                    "encoder_hidden_states",
                    "encoder_attention_mask",
                ][..],
            ),
        ] {
            for input in session.inputs() {
                if !wanted.contains(&input.name()) {
                    return Err(load_error(
                        file,
                        format!(
                            "it takes an input `{}`; agentos feeds {}",
                            input.name(),
                            wanted.join(", ")
                        ),
                    ));
                }
            }
            if session.outputs().is_empty() {
                return Err(load_error(file, "it has no outputs".into()));
            }
        }
        Ok(Self {
            manifest,
            config,
            encoder,
            decoder,
            tokenizer,
        })
    }

    fn error(&self, detail: String) -> InferError {
        InferError::Model {
            model: self.manifest.name.clone(),
            detail,
        }
    }

    /// Greedy decoding of one input; the output tokens without the start and end tokens.
    fn decode(&mut self, ids: &[i64]) -> Result<Vec<u32>, InferError> {
        let len = ids.len().max(1);
        let ids = if ids.is_empty() {
            vec![0]
        } else {
            ids.to_vec()
        };
        let mask = vec![1i64; len];
        let name = self.manifest.name.clone();
        let error = |detail: String| InferError::Model {
            model: name.clone(),
            detail,
        };
        let tensor = |shape: [usize; 2], data: Vec<i64>| {
            Tensor::from_array((shape, data))
                .map(|t| t.into_dyn())
                .map_err(|e| error(e.to_string()))
        };
        let encoded = self
            .encoder
            .run(vec![
                ("input_ids", tensor([1, len], ids)?),
                ("attention_mask", tensor([1, len], mask.clone())?),
            ])
            .map_err(|e| error(format!("encoder: {e}")))?;
        let (shape, hidden) = encoded[0]
            .try_extract_tensor::<f32>()
            .map_err(|e| error(format!("encoder output: {e}")))?;
        let shape = dims_of(shape);
        if shape.len() != 3
            || shape[0] != 1
            || shape[1] != len
            || shape.iter().product::<usize>() != hidden.len()
        {
            return Err(error(format!(
                "encoder output has shape {shape:?}, not [1, {len}, hidden]"
            )));
        }
        // The encoder's output and the mask are the same for every step: made once, lent to each.
        let hidden = Tensor::from_array((shape, hidden.to_vec()))
            .map(|t| t.into_dyn())
            .map_err(|e| error(e.to_string()))?;
        drop(encoded);
        let mask = tensor([1, len], mask)?;

        let mut tokens = vec![i64::from(self.config.decoder_start)];
        let eos = i64::from(self.config.eos);
        for _ in 0..self.config.max_new_tokens {
            let steps = tokens.len();
            let inputs: Vec<(&str, SessionInputValue<'_>)> = vec![
                ("input_ids", tensor([1, steps], tokens.clone())?.into()),
                ("encoder_hidden_states", (&hidden).into()),
                ("encoder_attention_mask", (&mask).into()),
            ];
            let out = self
                .decoder
                .run(inputs)
                .map_err(|e| error(format!("decoder: {e}")))?;
            let (dims, logits) = out[0]
                .try_extract_tensor::<f32>()
                .map_err(|e| error(format!("decoder output: {e}")))?;
            let dims = dims_of(dims);
            let vocab = dims.last().copied().unwrap_or(0);
            if dims.len() != 3
                || dims[1] != steps
                || vocab == 0
                || dims.iter().product::<usize>() != logits.len()
            {
                return Err(error(format!(
                    "decoder output has shape {dims:?}, not [1, {steps}, vocab]"
                )));
            }
            let last = &logits[(steps - 1) * vocab..steps * vocab];
            let next = last
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(eos, |(i, _)| i as i64);
            if next == eos {
                break;
            }
            tokens.push(next);
        }
        Ok(tokens[1..].iter().map(|&t| t as u32).collect())
    }
}

impl Backend for Translator {
    fn manifest(&self) -> &BundleManifest {
        &self.manifest
    }

    fn run(
        &mut self,
        req: &InferRequest,
        timings: &mut InferTimings,
    ) -> Result<Results, InferError> {
        let mut results = Vec::with_capacity(req.inputs.len());
        for (i, text) in req.inputs.iter().enumerate() {
            let started = Instant::now();
            let enc = self
                .tokenizer
                .encode(text.as_str(), true)
                .map_err(|e| self.error(format!("cannot tokenize input {}: {e}", i + 1)))?;
            if enc.len() > self.manifest.max_tokens as usize {
                return Err(InferError::TooLong {
                    input: i + 1,
                    tokens: enc.len(),
                    max: self.manifest.max_tokens,
                    model: self.manifest.name.clone(),
                });
            }
            let ids: Vec<i64> = enc.get_ids().iter().map(|&id| i64::from(id)).collect();
            timings.tokenize_us += micros(started);
            timings.tokens += ids.len() as u64;

            let started = Instant::now();
            let output = self.decode(&ids)?;
            timings.run_us += micros(started);

            let started = Instant::now();
            let text = self
                .tokenizer
                .decode(&output, true)
                .map_err(|e| self.error(format!("cannot detokenize the output: {e}")))?;
            timings.decode_us += micros(started);
            results.push(InferResult::Translation { text });
        }
        Ok(results)
    }
}
