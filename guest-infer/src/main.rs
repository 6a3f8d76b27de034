//! agentos-infer: the inference worker. The guest agent starts it on an agent's first `infer`
//! request and keeps it for the VM's life; benchmarks run the very same binary on the host.
//! ONNX Runtime, the tokenizers and the models live in this process, not in PID 1: a model that
//! crashes the runtime takes this worker down, and the agent reports it and starts another.
//!
//! ```text
//! agentos-infer --models DIR --runtime LIBONNXRUNTIME [--threads N]
//! ```
//!
//! Reads one JSON `infer` request per line on standard input and writes one JSON line per
//! request, in order: the reply, or `{"id": N, "error": "..."}`.

mod apertium;
mod backend;
mod decode;
mod gpu;
mod models;
mod onnx;
mod seq2seq;
#[cfg(test)]
mod tests;

use std::process::ExitCode;

use std::io::{self, BufRead, Write};
use std::path::PathBuf;

use agentos_protocol::{InferRequest, error_chain as describe};

use crate::models::Models;

const USAGE: &str =
    "usage: agentos-guest infer --models DIR --runtime LIBONNXRUNTIME [--threads N]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match serve(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("agentos-infer: {err}");
            ExitCode::from(2)
        }
    }
}

fn serve(args: &[String]) -> Result<(), String> {
    let mut models = None;
    let mut runtime = None;
    let mut threads = 1usize;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .cloned()
                .ok_or_else(|| format!("{arg} needs a value; {USAGE}"))
        };
        match arg.as_str() {
            "--models" => models = Some(PathBuf::from(value()?)),
            "--runtime" => runtime = Some(PathBuf::from(value()?)),
            "--threads" => {
                threads = value()?
                    .parse()
                    .map_err(|_| format!("--threads takes a number; {USAGE}"))?
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => return Err(format!("unknown argument `{other}`; {USAGE}")),
        }
    }
    let (Some(models), Some(runtime)) = (models, runtime) else {
        return Err(USAGE.to_owned());
    };
    let models = Models::at(&models, &runtime, threads);
    let stdout = io::stdout();
    for line in io::stdin().lock().lines() {
        let line = line.map_err(|e| format!("cannot read standard input: {e}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let answer = match serde_json::from_str::<InferRequest>(&line) {
            Ok(req) => match models.infer(&req) {
                Ok(reply) => serde_json::to_value(reply).unwrap_or_default(),
                Err(err) => serde_json::json!({"id": req.id, "error": describe(&err)}),
            },
            Err(err) => serde_json::json!({"error": format!("not an infer request: {err}")}),
        };
        let mut out = stdout.lock();
        writeln!(out, "{answer}")
            .and_then(|()| out.flush())
            .map_err(|e| format!("cannot write standard output: {e}"))?;
    }
    Ok(())
}
