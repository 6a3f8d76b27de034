//! `agentos run --model`: the default bundles answer in real VMs, and broken bundles get clear
//! errors.

use crate::common::{Scratch, describe, share_machine, text, vm_available};

fn infer_json(t: &Scratch, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["run", "--json"];
    all.extend_from_slice(args);
    let out = t.output(&all, b"");
    assert!(out.status.success(), "{}", describe(&out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", describe(&out)))
}

#[test]
fn sentiment_tells_positive_from_negative() {
    if !vm_available() {
        return;
    }
    let _machine = share_machine();
    let t = Scratch::new("infer-sentiment");
    let result = infer_json(
        &t,
        &[
            "--model",
            "sentiment",
            "--task",
            "classify",
            "--input",
            "I love this, it works perfectly",
            "--input",
            "This is the worst service I have ever had. Terrible.",
        ],
    );
    let best = |i: usize| {
        result["results"][i]["labels"][0]["label"]
            .as_str()
            .unwrap_or("")
    };
    assert_eq!(best(0), "positive", "{result}");
    assert_eq!(best(1), "negative", "{result}");
    let score = result["results"][0]["labels"][0]["score"].as_f64().unwrap();
    assert!(score > 0.8, "{result}");
    assert!(
        result["timings"]["load_us"].as_u64().unwrap() > 0,
        "{result}"
    );
    assert!(
        result["timings"]["tokens"].as_u64().unwrap() > 10,
        "{result}"
    );
    t.assert_nothing_left();
}

#[test]
fn entities_are_found_with_their_spans() {
    if !vm_available() {
        return;
    }
    let _machine = share_machine();
    let t = Scratch::new("infer-ner");
    let input = "Hi, I am John Smith. Email me at john.smith@example.com or call +1 415-555-0132.";
    let result = infer_json(&t, &["--model", "ner", "--input", input]);
    let entities = result["results"][0]["entities"].as_array().unwrap();
    let found: Vec<(&str, &str)> = entities
        .iter()
        .map(|e| (e["label"].as_str().unwrap(), e["text"].as_str().unwrap()))
        .collect();
    for expected in [
        ("GIVEN_NAME", "John"),
        ("SURNAME", "Smith"),
        ("EMAIL", "john.smith@example.com"),
        ("PHONE", "+1 415-555-0132"),
    ] {
        assert!(found.contains(&expected), "{expected:?} not in {found:?}");
    }
    for e in entities {
        let (start, end) = (
            e["start"].as_u64().unwrap() as usize,
            e["end"].as_u64().unwrap() as usize,
        );
        assert_eq!(&input[start..end], e["text"].as_str().unwrap());
    }
    t.assert_nothing_left();
}

#[test]
fn a_summary_is_made_of_the_documents_sentences() {
    if !vm_available() {
        return;
    }
    let _machine = share_machine();
    let t = Scratch::new("infer-summary");
    let document = "The city council met on Monday to discuss the new budget. \
        The budget includes more money for schools and parks. \
        Several residents spoke about rising rents. \
        The council will vote on the budget next week. \
        The weather was sunny all day. \
        The mayor said the plan balances growth and fairness.";
    let path = t.dir.join("document.txt");
    std::fs::write(&path, document).unwrap();
    let result = infer_json(
        &t,
        &[
            "--model",
            "minilm",
            "--task",
            "summarize",
            "--sentences",
            "2",
            "--input-file",
            path.to_str().unwrap(),
        ],
    );
    let summary = &result["results"][0];
    let picked = summary["sentences"].as_array().unwrap();
    assert_eq!(picked.len(), 2, "{result}");
    let sentences: Vec<&str> = document.split_inclusive(". ").map(str::trim).collect();
    let text = summary["text"].as_str().unwrap();
    for index in picked {
        let sentence = sentences[index.as_u64().unwrap() as usize];
        assert!(
            text.contains(sentence.trim_end_matches(' ')),
            "{sentence:?} not in {text:?}"
        );
    }
    assert!(
        !text.contains("weather"),
        "the off-topic sentence was picked: {text}"
    );
    t.assert_nothing_left();
}

#[test]
fn a_corrupt_model_is_a_clear_error() {
    if !vm_available() {
        return;
    }
    let _machine = share_machine();
    let t = Scratch::new("infer-corrupt");
    let name = format!("corrupt-{}", std::process::id());
    let bundle = t.dir.join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    let model = b"this is not an ONNX model";
    let tokenizer = b"{}";
    std::fs::write(bundle.join("model.onnx"), model).unwrap();
    std::fs::write(bundle.join("tokenizer.json"), tokenizer).unwrap();
    let sha = |bytes: &[u8]| {
        use sha2::Digest;
        sha2::Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    std::fs::write(
        bundle.join("agentos-model.toml"),
        format!(
            "name = \"{name}\"\ntasks = [\"embed\"]\n[files]\n\"model.onnx\" = \"{}\"\n\"tokenizer.json\" = \"{}\"\n",
            sha(model),
            sha(tokenizer)
        ),
    )
    .unwrap();
    let added = t.output(&["model", "add", bundle.to_str().unwrap()], b"");
    assert!(added.status.success(), "{}", describe(&added));
    let out = t.output(&["run", "--model", &name, "--input", "hello"], b"");
    let _ = t.output(&["model", "rm", &name], b"");
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("model `{name}`: cannot load")),
        "{}",
        describe(&out)
    );
    t.assert_nothing_left();
}

#[test]
fn apertium_translates_english_to_spanish() {
    if !vm_available() {
        return;
    }
    let _machine = share_machine();
    let t = Scratch::new("infer-translate");
    let out = t.output(
        &[
            "run",
            "--model",
            "translate-eng-spa",
            "--input",
            "The cat is on the table. I love this house.",
        ],
        b"",
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        text(&out.stdout),
        "El gato es en la mesa. Quiero esta casa.\n"
    );
    t.assert_nothing_left();
}

/// The encoder-decoder bundle of `tests/data/seq2seq` (made by its `make.py`): greedy decoding
/// gives the input's words in reverse order, so the decode loop's output is known exactly.
const SEQ2SEQ_FILES: &[(&str, &[u8])] = &[
    (
        "encoder.onnx",
        include_bytes!("../data/seq2seq/encoder.onnx"),
    ),
    (
        "decoder.onnx",
        include_bytes!("../data/seq2seq/decoder.onnx"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../data/seq2seq/tokenizer.json"),
    ),
    (
        "agentos-model.toml",
        include_bytes!("../data/seq2seq/agentos-model.toml"),
    ),
];

#[test]
fn a_seq2seq_bundle_decodes_greedily() {
    if !vm_available() {
        return;
    }
    let _machine = share_machine();
    let t = Scratch::new("infer-seq2seq");
    let name = format!("test-reverse-{}", std::process::id());
    let bundle = t.dir.join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    for (file, bytes) in SEQ2SEQ_FILES {
        let bytes = if *file == "agentos-model.toml" {
            String::from_utf8_lossy(bytes)
                .replace("name = \"test-reverse\"", &format!("name = \"{name}\""))
                .into_bytes()
        } else {
            bytes.to_vec()
        };
        std::fs::write(bundle.join(file), bytes).unwrap();
    }
    let added = t.output(&["model", "add", bundle.to_str().unwrap()], b"");
    assert!(added.status.success(), "{}", describe(&added));
    let out = t.output(
        &[
            "run",
            "--model",
            &name,
            "--input",
            "hello agent a b c world",
            "--input",
            "z",
        ],
        b"",
    );
    let _ = t.output(&["model", "rm", &name], b"");
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        text(&out.stdout),
        "# input 1\nworld c b a agent hello\n# input 2\nz\n"
    );
    t.assert_nothing_left();
}
