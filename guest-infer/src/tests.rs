//! The inference path end to end on real ONNX Runtime, outside a VM: errors one after another,
//! then a good request to the same `Models`, which must still serve.

use std::fs;
use std::path::PathBuf;

use agentos_protocol::{InferOptions, InferRequest, InferResult, Task};

use crate::models::Models;

const SEQ2SEQ: &[(&str, &[u8])] = &[
    (
        "encoder.onnx",
        include_bytes!("../../tests/data/seq2seq/encoder.onnx"),
    ),
    (
        "decoder.onnx",
        include_bytes!("../../tests/data/seq2seq/decoder.onnx"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../../tests/data/seq2seq/tokenizer.json"),
    ),
    (
        "agentos-model.toml",
        include_bytes!("../../tests/data/seq2seq/agentos-model.toml"),
    ),
];

/// ONNX Runtime as `scripts/setup` installs it, or `$AGENTOS_ONNXRUNTIME`.
fn runtime() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("AGENTOS_ONNXRUNTIME") {
        return Some(PathBuf::from(path));
    }
    let cache = std::env::var_os("AGENTOS_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/agentos")))?;
    Some(cache.join("runtime/onnxruntime/libonnxruntime.so")).filter(|p| p.is_file())
}

fn request(model: &str, task: Task, input: &str) -> InferRequest {
    InferRequest {
        id: 1,
        model: model.into(),
        task,
        inputs: vec![input.into()],
        options: InferOptions::default(),
    }
}

/// Writes the seq2seq test bundle as `name`, with `change` applied to each (file, bytes).
fn bundle(root: &std::path::Path, name: &str, change: impl Fn(&str, Vec<u8>) -> Option<Vec<u8>>) {
    let dir = root.join(name);
    fs::create_dir_all(&dir).unwrap();
    for (file, bytes) in SEQ2SEQ {
        let bytes = if *file == "agentos-model.toml" {
            String::from_utf8_lossy(bytes)
                .replace("name = \"test-reverse\"", &format!("name = \"{name}\""))
                .into_bytes()
        } else {
            bytes.to_vec()
        };
        if let Some(bytes) = change(file, bytes) {
            fs::write(dir.join(file), bytes).unwrap();
        }
    }
}

#[test]
fn bad_requests_get_clear_errors_and_the_models_keep_serving() {
    let Some(runtime) = runtime() else {
        eprintln!("skipped: no ONNX Runtime (run scripts/setup, or set AGENTOS_ONNXRUNTIME)");
        return;
    };
    let root = tempfile::tempdir().unwrap();
    bundle(root.path(), "good", |_, b| Some(b));
    bundle(root.path(), "corrupt", |f, b| {
        Some(if f == "decoder.onnx" {
            b"not onnx".to_vec()
        } else {
            b
        })
    });
    bundle(root.path(), "no-tokenizer", |f, b| {
        (f != "tokenizer.json").then_some(b)
    });
    let models = Models::at(root.path(), &runtime, 1);
    let error = |req: InferRequest| models.infer(&req).unwrap_err().to_string();

    let err = error(request("corrupt", Task::Translate, "a b"));
    assert!(
        err.contains("model `corrupt`: cannot load decoder.onnx"),
        "{err}"
    );
    let err = error(request("no-tokenizer", Task::Translate, "a b"));
    assert!(
        err.contains("model `no-tokenizer`: cannot load tokenizer.json"),
        "{err}"
    );
    let err = error(request("good", Task::Summarize, "a b"));
    assert!(
        err.contains("model `good` does not do summarize; it does translate"),
        "{err}"
    );
    let err = error(request("good", Task::Translate, "  "));
    assert_eq!(err, "input 1 is empty");
    let err = error(request("absent", Task::Translate, "a"));
    assert!(err.contains("model `absent` is not in this VM"), "{err}");
    let err = error(request("../good", Task::Translate, "a"));
    assert!(err.contains("is not valid"), "{err}");

    let reply = models
        .infer(&request("good", Task::Translate, "hello a b"))
        .unwrap();
    assert_eq!(
        reply.results,
        [InferResult::Translation {
            text: "b a hello".into()
        }]
    );
    let again = models
        .infer(&request("good", Task::Translate, "c"))
        .unwrap();
    assert_eq!(again.timings.load_us, 0, "the model is loaded once");
}
