//! The model bundles of this VM, each loaded on first use and kept for the worker's life, and the
//! dispatch of a request to its bundle.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use agentos_protocol::bundle::{BundleManifest, MANIFEST_FILE, Runtime, check_name};
use agentos_protocol::{
    InferReply, InferRequest, InferTimings, MAX_INFER_INPUT_BYTES, MAX_INFER_INPUTS,
};

use crate::backend::{Backend, InferError, micros, unsupported};
use crate::{apertium, onnx, seq2seq};

/// A bundle's place: empty until its first request loads it; one request at a time holds it.
type Slot = Arc<Mutex<Option<Box<dyn Backend>>>>;

/// The bundles of this VM, each loaded once.
pub struct Models {
    dir: PathBuf,
    runtime: PathBuf,
    threads: usize,
    loaded: Mutex<HashMap<String, Slot>>,
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
        let manifest = loaded.manifest();
        if !manifest.tasks.contains(&req.task) {
            return Err(unsupported(manifest, req.task));
        }
        let results = loaded.run(req, &mut timings)?;
        Ok(InferReply {
            id: req.id,
            model: req.model.clone(),
            task: req.task,
            results,
            timings,
        })
    }

    fn load(&self, name: &str) -> Result<Box<dyn Backend>, InferError> {
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
        Ok(match manifest.runtime {
            Runtime::Onnx => match manifest.seq2seq.clone() {
                Some(config) => Box::new(seq2seq::Translator::load(
                    &dir,
                    manifest,
                    config,
                    &self.runtime,
                    self.threads,
                )?),
                None => Box::new(onnx::Model::load(
                    &dir,
                    manifest,
                    &self.runtime,
                    self.threads,
                )?),
            },
            Runtime::Apertium => Box::new(apertium::Translator::load(&dir, manifest)?),
        })
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
