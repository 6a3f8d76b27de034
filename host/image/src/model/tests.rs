use std::fs;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::*;

fn sha(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A bundle directory named `name` with a model and a tokenizer.
fn bundle_dir(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(format!("src-{name}"));
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("model.onnx"), b"model bytes").unwrap();
    fs::write(dir.join("tokenizer.json"), b"{}").unwrap();
    fs::write(
        dir.join(MANIFEST_FILE),
        format!(
            "name = \"{name}\"\ntasks = [\"embed\"]\n[files]\n\"model.onnx\" = \"{}\"\n\"tokenizer.json\" = \"{}\"\n",
            sha(b"model bytes"),
            sha(b"{}")
        ),
    )
    .unwrap();
    dir
}

#[test]
fn a_bundle_is_added_listed_and_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ModelStore::new(&tmp.path().join("cache"));
    let src = bundle_dir(tmp.path(), "enc");
    let added = store.add(&src).unwrap();
    assert_eq!(added.manifest.name, "enc");
    assert!(added.dir.join("model.onnx").is_file());
    let (bundles, broken) = store.list();
    assert_eq!(bundles.len(), 1);
    assert!(broken.is_empty());
    let err = store.add(&src).unwrap_err().to_string();
    assert!(err.contains("already installed"), "{err}");
    store.remove("enc").unwrap();
    let err = store.find("enc").unwrap_err().to_string();
    assert!(err.contains("model `enc` is not installed"), "{err}");
}

#[test]
fn a_file_that_does_not_match_its_checksum_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ModelStore::new(&tmp.path().join("cache"));
    let src = bundle_dir(tmp.path(), "enc");
    fs::write(src.join("model.onnx"), b"changed").unwrap();
    let err = store.add(&src).unwrap_err().to_string();
    assert!(err.contains("`model.onnx` has SHA-256"), "{err}");
    fs::remove_file(src.join("model.onnx")).unwrap();
    let err = store.add(&src).unwrap_err().to_string();
    assert!(err.contains("`model.onnx` is listed"), "{err}");
    assert!(store.list().0.is_empty(), "nothing half-added");
}
