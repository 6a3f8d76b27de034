//! `agentos-guest infer`: the agent's inference code run as an ordinary program, on the host or
//! anywhere, for benchmarks that compare it with the same code in a VM.
//!
//! ```text
//! agentos-guest infer --models DIR --runtime LIBONNXRUNTIME [--threads N]
//! ```
//!
//! Reads one JSON `infer` request per line on standard input and writes one JSON line per
//! request: the reply, or `{"id": N, "error": "..."}`.

use std::io::{self, BufRead, Write};
use std::path::PathBuf;

use agentos_protocol::InferRequest;

use super::Models;
use crate::describe;

const USAGE: &str =
    "usage: agentos-guest infer --models DIR --runtime LIBONNXRUNTIME [--threads N]";

pub fn main(args: &[String]) -> Result<(), String> {
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
