use std::fs;
use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

use super::*;

fn sha(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A bundle source directory named `name` whose model holds `model`.
fn bundle_dir(root: &Path, name: &str, model: &[u8]) -> PathBuf {
    let dir = root.join(format!("src-{name}"));
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("model.onnx"), model).unwrap();
    fs::write(dir.join("tokenizer.json"), b"{}").unwrap();
    fs::write(
        dir.join(MANIFEST_FILE),
        format!(
            "name = \"{name}\"\ntasks = [\"embed\"]\n[files]\n\"model.onnx\" = \"{}\"\n\"tokenizer.json\" = \"{}\"\n",
            sha(model),
            sha(b"{}")
        ),
    )
    .unwrap();
    dir
}

/// A store with bundle `enc`, a runtime and a worker (dynamically linked programs of this host,
/// so that their libraries are looked up as the real ones are).
fn store_with_bundle(root: &Path) -> (ModelStore, Bundle, PathBuf) {
    let store = ModelStore::new(&root.join("cache"));
    let bundle = store.add(&bundle_dir(root, "enc", b"model bytes")).unwrap();
    let runtime = store.runtime_library();
    fs::create_dir_all(runtime.parent().unwrap()).unwrap();
    fs::copy("/bin/true", &runtime).unwrap();
    let worker = root.join("agentos-infer");
    fs::copy("/bin/cat", &worker).unwrap();
    (store, bundle, worker)
}

/// The image's files, extracted by erofs-utils' own checker from the file system past the pmem
/// region's data offset.
fn extract(image: &Path, into: &Path) {
    let bytes = fs::read(image).unwrap();
    let mut info = [0u8; layout::INFO_BYTES];
    info.copy_from_slice(&bytes[layout::INFO_OFFSET as usize..][..layout::INFO_BYTES]);
    assert!(layout::is_valid(&info));
    let fs_image = into.with_extension("erofs");
    fs::write(&fs_image, &bytes[layout::DATA_OFFSET as usize..]).unwrap();
    let out = Command::new("fsck.erofs")
        .arg(format!("--extract={}", into.display()))
        .arg(&fs_image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fsck.erofs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_disks_hold_the_worker_the_runtime_the_bundle_and_their_libraries() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, bundle, worker) = store_with_bundle(tmp.path());
    let disks = disks_with_worker(&store, &bundle, &[], &worker).unwrap();
    assert_eq!(disks.name, "enc");
    let runtime = tmp.path().join("runtime");
    extract(&disks.runtime, &runtime);
    assert_eq!(
        fs::read(runtime.join("bin/agentos-infer")).unwrap(),
        fs::read(&worker).unwrap()
    );
    assert_eq!(
        fs::read(runtime.join("onnxruntime/libonnxruntime.so")).unwrap(),
        fs::read("/bin/true").unwrap()
    );
    assert!(runtime.join("models").is_dir(), "where bundles are mounted");
    assert!(
        runtime.join("lib/libc.so.6").is_file(),
        "the programs' C library"
    );
    let model = tmp.path().join("model");
    extract(&disks.bundle, &model);
    assert_eq!(fs::read(model.join("model.onnx")).unwrap(), b"model bytes");
    assert!(model.join(MANIFEST_FILE).is_file());
    assert!(
        !model.join(MODEL_LIBRARY_DIR).exists(),
        "no programs, no libraries"
    );
    // With the C library in the agent image, it stays out of the disk.
    let libc = needed_libraries(Path::new("/bin/cat"))
        .unwrap()
        .into_iter()
        .map(|l| l.display().to_string())
        .collect::<Vec<_>>();
    let lean = disks_with_worker(&store, &bundle, &libc, &worker).unwrap();
    assert_ne!(lean.runtime, disks.runtime, "other inputs, another image");
    let files = tmp.path().join("lean");
    extract(&lean.runtime, &files);
    assert!(!files.join("lib/libc.so.6").exists());
}

#[test]
fn a_bundles_programs_bring_their_libraries() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ModelStore::new(&tmp.path().join("cache"));
    let src = tmp.path().join("src-tool");
    fs::create_dir_all(src.join("bin")).unwrap();
    fs::copy("/bin/cat", src.join("bin/cat")).unwrap();
    let cat = fs::read(src.join("bin/cat")).unwrap();
    fs::write(
        src.join(MANIFEST_FILE),
        format!(
            "name = \"tool\"\nruntime = \"apertium\"\nmode = \"x\"\ntasks = [\"translate\"]\n[files]\n\"bin/cat\" = \"{}\"\n",
            sha(&cat)
        ),
    )
    .unwrap();
    let bundle = store.add(&src).unwrap();
    let worker = tmp.path().join("agentos-infer");
    fs::copy("/bin/cat", &worker).unwrap();
    // No ONNX Runtime is needed, and none is installed.
    let disks = disks_with_worker(&store, &bundle, &[], &worker).unwrap();
    let model = tmp.path().join("model");
    extract(&disks.bundle, &model);
    assert!(model.join("bin/cat").is_file());
    assert!(model.join(MODEL_LIBRARY_DIR).join("libc.so.6").is_file());
    let runtime = tmp.path().join("runtime");
    extract(&disks.runtime, &runtime);
    assert!(!runtime.join("onnxruntime").exists());
    // An ONNX bundle cannot use that runtime disk.
    let onnx = store.add(&bundle_dir(tmp.path(), "enc", b"m")).unwrap();
    let err = disks_with_worker(&store, &onnx, &[], &worker)
        .unwrap_err()
        .to_string();
    assert!(err.contains("ONNX Runtime is not installed"), "{err}");
}

#[test]
fn disks_are_reused_until_their_inputs_change_and_replaced_ones_are_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, bundle, worker) = store_with_bundle(tmp.path());
    let inode = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(p).unwrap().ino()
    };
    let first = disks_with_worker(&store, &bundle, &[], &worker).unwrap();
    let inodes = (inode(&first.runtime), inode(&first.bundle));
    let again = disks_with_worker(&store, &bundle, &[], &worker).unwrap();
    assert_eq!(again, first);
    assert_eq!((inode(&again.runtime), inode(&again.bundle)), inodes);

    // Another bundle gets a disk of its own; the first bundle's is untouched.
    let other = store
        .add(&bundle_dir(tmp.path(), "enc-2", b"other model"))
        .unwrap();
    let second = disks_with_worker(&store, &other, &[], &worker).unwrap();
    assert_eq!(second.runtime, first.runtime);
    assert_ne!(second.bundle, first.bundle);
    assert!(first.bundle.is_file(), "`enc-2` is not `enc`'s");
    let files = tmp.path().join("second");
    extract(&second.bundle, &files);
    assert_eq!(fs::read(files.join("model.onnx")).unwrap(), b"other model");

    // A new worker builds a new runtime disk and removes the old one, and the archives agents
    // booted with before there were disks.
    let archive = store.packed_dir().join("onnxruntime.cpio");
    fs::write(&archive, b"070701").unwrap();
    fs::write(archive.with_extension("key"), b"k").unwrap();
    fs::write(&worker, fs::read("/bin/true").unwrap()).unwrap();
    let third = disks_with_worker(&store, &bundle, &[], &worker).unwrap();
    assert_ne!(third.runtime, first.runtime);
    assert!(!first.runtime.exists());
    assert!(!archive.exists() && !archive.with_extension("key").exists());
    assert!(third.runtime.is_file() && third.bundle.is_file());

    // Removing a bundle removes its disks only.
    store.remove("enc").unwrap();
    assert!(!first.bundle.exists());
    assert!(second.bundle.is_file());
}

#[test]
fn a_bundle_changed_behind_its_manifest_builds_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, bundle, worker) = store_with_bundle(tmp.path());
    fs::write(bundle.dir.join("model.onnx"), b"tampered").unwrap();
    let err = disks_with_worker(&store, &bundle, &[], &worker)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`model.onnx` has SHA-256"), "{err}");
    let left: Vec<_> = fs::read_dir(store.packed_dir())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with(RUNTIME_PREFIX) && n != RUNTIME_INDEX && n != ".disks.lock")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn without_its_sources_the_runtime_disk_is_used_as_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, bundle, worker) = store_with_bundle(tmp.path());
    let disks = disks_with_worker(&store, &bundle, &[], &worker).unwrap();
    // As inside a carrier: no worker, no runtime.
    let gone = tmp.path().join("gone");
    fs::remove_file(store.runtime_library()).unwrap();
    assert_eq!(
        disks_with_worker(&store, &bundle, &[], &gone).unwrap(),
        disks
    );
    // With no runtime disk either, the worker is what is missing.
    fs::remove_file(&disks.runtime).unwrap();
    let err = disks_with_worker(&store, &bundle, &[], &gone)
        .unwrap_err()
        .to_string();
    assert!(err.contains("the inference worker is missing"), "{err}");
}

#[test]
fn a_damaged_disk_is_refused_before_any_vm_gets_it() {
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().unwrap();
    let (store, bundle, worker) = store_with_bundle(tmp.path());
    let disks = disks_with_worker(&store, &bundle, &[], &worker).unwrap();
    let image = disks.bundle.clone();
    let pristine = fs::read(&image).unwrap();
    let restore = || {
        fs::write(&image, &pristine).unwrap();
        // Copied back: another time stamp, the same bytes, accepted after a hash.
        assert_eq!(
            disks_with_worker(&store, &bundle, &[], &worker).unwrap(),
            disks
        );
    };
    let refusal = || {
        disks_with_worker(&store, &bundle, &[], &worker)
            .unwrap_err()
            .to_string()
    };

    // A byte changed where the file system keeps its data.
    let file = fs::File::options().write(true).open(&image).unwrap();
    file.write_all_at(b"X", pristine.len() as u64 - 1).unwrap();
    drop(file);
    let err = refusal();
    assert!(err.contains("is damaged: its SHA-256 is"), "{err}");
    restore();

    // Cut short.
    fs::write(&image, &pristine[..pristine.len() - 4096]).unwrap();
    let err = refusal();
    assert!(err.contains("when it was built"), "{err}");
    restore();

    // Not a pmem region at all (of the size it had).
    fs::write(&image, vec![0u8; pristine.len()]).unwrap();
    let err = refusal();
    assert!(err.contains("has no valid pmem info block"), "{err}");
    restore();

    // A region whose file system is gone.
    let mut no_fs = pristine.clone();
    no_fs[layout::DATA_OFFSET as usize..].fill(0);
    fs::write(&image, &no_fs).unwrap();
    let err = refusal();
    assert!(err.contains("holds no erofs file system"), "{err}");
    restore();

    // Its stamp gone: built again.
    fs::remove_file(Stamp::path(&disks.runtime)).unwrap();
    disks_with_worker(&store, &bundle, &[], &worker).unwrap();
    assert!(Stamp::path(&disks.runtime).is_file());
}
