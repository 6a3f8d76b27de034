use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::time::Duration;

use agentos_protocol::GuestMessage;
use agentos_protocol::files::{EntryKind, FileErrorKind, FsOp, LISTED_BATCH};

use super::*;
use crate::outbox::Outbox;

fn path_in(dir: &tempfile::TempDir, name: &str) -> String {
    dir.path().join(name).to_string_lossy().into_owned()
}

/// Reads a file through [`Reads`] and what it sent.
fn read_back(path: &str) -> (Vec<u8>, Vec<GuestMessage>) {
    let (outbox, frames) = Outbox::collector();
    Reads::default().start(7, path, &outbox).unwrap();
    let (mut bytes, mut seen) = (Vec::new(), Vec::new());
    loop {
        let msg = frames
            .recv_timeout(Duration::from_secs(10))
            .expect("no frame");
        match &msg {
            GuestMessage::FileChunk { id: 7, data } => bytes.extend_from_slice(&data.0),
            GuestMessage::FileEnd { id: 7, .. } | GuestMessage::FileError { id: 7, .. } => {
                seen.push(msg);
                return (bytes, seen);
            }
            other => panic!("unexpected {other:?}"),
        }
        seen.push(msg);
    }
}

#[test]
fn a_file_is_read_whole_in_bounded_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let path = path_in(&dir, "blob");
    let content: Vec<u8> = (0..3 * FILE_CHUNK_BYTES + 5)
        .map(|i| (i * 7) as u8)
        .collect();
    fs::write(&path, &content).unwrap();
    let (bytes, seen) = read_back(&path);
    assert_eq!(bytes, content);
    assert_eq!(seen.len(), 5, "4 chunks and the end");
    assert!(matches!(
        seen.last(),
        Some(GuestMessage::FileEnd { size, .. }) if *size == content.len() as u64
    ));
}

#[test]
fn reads_refuse_what_is_not_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let (outbox, _frames) = Outbox::collector();
    let reads = Reads::default();
    let kind = |path: &str| reads.start(1, path, &outbox).unwrap_err().kind;
    assert_eq!(kind(&path_in(&dir, "missing")), FileErrorKind::NotFound);
    assert_eq!(
        kind(&dir.path().to_string_lossy()),
        FileErrorKind::IsADirectory
    );
    assert_eq!(kind("relative/path"), FileErrorKind::Invalid);
    let fifo = path_in(&dir, "fifo");
    let c = std::ffi::CString::new(fifo.clone()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    assert_eq!(
        kind(&fifo),
        FileErrorKind::Invalid,
        "a pipe must not block the read"
    );
}

#[test]
fn a_write_replaces_the_file_only_once_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = path_in(&dir, "deep/er/file");
    let mut writes = Writes::default();
    writes.begin(1, &path, Some(0o600), None, false).unwrap();
    writes.write(1, b"hello ").unwrap();
    assert!(fs::metadata(&path).is_err(), "not in place before its end");
    writes.write(1, b"world").unwrap();
    assert_eq!(writes.end(1).unwrap(), Some(11));
    assert_eq!(fs::read(&path).unwrap(), b"hello world");
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // A second write keeps the file's mode and, cut off, leaves it as it was.
    writes.begin(2, &path, None, None, false).unwrap();
    writes.write(2, b"partial").unwrap();
    drop(writes);
    assert_eq!(fs::read(&path).unwrap(), b"hello world");
    let left: Vec<_> = fs::read_dir(dir.path().join("deep/er")).unwrap().collect();
    assert_eq!(left.len(), 1, "the temporary file is gone");

    let mut writes = Writes::default();
    writes.begin(3, &path, None, None, false).unwrap();
    assert_eq!(writes.end(3).unwrap(), Some(0));
    assert_eq!(fs::read(&path).unwrap(), b"");
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn a_write_in_place_goes_into_the_file_itself() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = path_in(&dir, "file");
    fs::write(&path, b"old content").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
    let inode = fs::metadata(&path).unwrap().ino();
    let mut writes = Writes::default();
    writes.begin(1, &path, None, None, true).unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"", "truncated at once");
    writes.write(1, b"new").unwrap();
    assert_eq!(writes.end(1).unwrap(), Some(3));
    let meta = fs::metadata(&path).unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"new");
    assert_eq!(
        (meta.ino(), meta.permissions().mode() & 0o777),
        (inode, 0o640),
        "the same file, its mode kept"
    );
    let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1, "no temporary file");

    // Cut off: a file the write made goes, a file that was there keeps what came.
    let made = path_in(&dir, "made");
    writes.begin(2, &made, None, None, true).unwrap();
    writes.write(2, b"part").unwrap();
    writes.begin(3, &path, None, None, true).unwrap();
    writes.write(3, b"part").unwrap();
    let link = path_in(&dir, "link");
    symlink("target", &link).unwrap();
    writes.begin(4, &link, None, None, true).unwrap();
    writes.write(4, b"part").unwrap();
    assert_eq!(fs::read(path_in(&dir, "target")).unwrap(), b"part");
    drop(writes);
    assert!(fs::metadata(&made).is_err());
    assert_eq!(fs::read(&path).unwrap(), b"part");
    assert!(
        fs::symlink_metadata(&link).is_ok() && fs::metadata(path_in(&dir, "target")).is_err(),
        "the file the link led to is removed, not the link"
    );

    // A pipe is no file to write into, and must not hang the agent.
    let fifo = path_in(&dir, "fifo");
    let c = std::ffi::CString::new(fifo.clone()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut writes = Writes::default();
    let refused = writes.begin(4, &fifo, None, None, true).unwrap_err();
    assert_eq!(refused.kind, FileErrorKind::Invalid, "{refused:?}");
}

#[test]
fn writes_refuse_directories_and_unknown_requests() {
    let dir = tempfile::tempdir().unwrap();
    let mut writes = Writes::default();
    let err = writes
        .begin(1, &dir.path().to_string_lossy(), None, None, false)
        .unwrap_err();
    assert_eq!(err.kind, FileErrorKind::IsADirectory);
    assert_eq!(
        writes.write(9, b"x").unwrap_err().kind,
        FileErrorKind::Invalid
    );
    assert_eq!(writes.end(9).unwrap_err().kind, FileErrorKind::Invalid);
    let file = path_in(&dir, "file");
    fs::write(&file, b"").unwrap();
    let under_a_file = format!("{file}/below");
    assert_eq!(
        writes
            .begin(2, &under_a_file, None, None, false)
            .unwrap_err()
            .kind,
        FileErrorKind::NotADirectory
    );
}

#[test]
fn an_unknown_owner_is_refused_before_anything_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let made = apply(&FsOp::MakeDir {
        path: path_in(&dir, "a/b"),
        user: Some("no-such-account".into()),
    });
    assert_eq!(made.unwrap_err().kind, FileErrorKind::Invalid);
    assert!(!dir.path().join("a").exists());
    let mut writes = Writes::default();
    let refused = writes.begin(
        1,
        &path_in(&dir, "x/f"),
        None,
        Some("no-such-account"),
        false,
    );
    assert_eq!(refused.unwrap_err().kind, FileErrorKind::Invalid);
    assert!(!dir.path().join("x").exists());
}

#[test]
fn stat_make_dir_move_and_remove() {
    let dir = tempfile::tempdir().unwrap();
    let made = apply(&FsOp::MakeDir {
        path: path_in(&dir, "a/b/c"),
        user: None,
    })
    .unwrap()
    .unwrap();
    assert_eq!((made.name.as_str(), made.kind), ("c", EntryKind::Dir));
    let again = apply(&FsOp::MakeDir {
        path: path_in(&dir, "a/b/c"),
        user: None,
    });
    assert_eq!(again.unwrap_err().kind, FileErrorKind::AlreadyExists);

    fs::write(path_in(&dir, "a/f"), b"12345").unwrap();
    symlink("f", path_in(&dir, "a/link")).unwrap();
    let link = stat(&path_in(&dir, "a/link")).unwrap();
    assert_eq!(link.kind, EntryKind::Symlink);
    assert_eq!(link.target.as_deref(), Some("f"));
    let file = stat(&path_in(&dir, "a/f")).unwrap();
    assert_eq!((file.kind, file.size), (EntryKind::File, 5));
    assert!(file.modified_ms > 1_600_000_000_000);

    let moved = apply(&FsOp::Move {
        from: path_in(&dir, "a/f"),
        to: path_in(&dir, "x/y/g"),
    })
    .unwrap()
    .unwrap();
    assert_eq!((moved.name.as_str(), moved.size), ("g", 5));
    assert_eq!(
        stat(&path_in(&dir, "a/f")).unwrap_err().kind,
        FileErrorKind::NotFound
    );

    assert_eq!(
        apply(&FsOp::Remove {
            path: path_in(&dir, "a")
        })
        .unwrap(),
        None
    );
    assert_eq!(
        stat(&path_in(&dir, "a/b")).unwrap_err().kind,
        FileErrorKind::NotFound
    );
    let gone = apply(&FsOp::Remove {
        path: path_in(&dir, "a"),
    });
    assert_eq!(gone.unwrap_err().kind, FileErrorKind::NotFound);
    let root = apply(&FsOp::Remove { path: "/".into() });
    assert_eq!(root.unwrap_err().kind, FileErrorKind::Invalid);
}

fn listing(path: &str, depth: u32) -> Result<Vec<(Vec<String>, bool)>, Failure> {
    let mut batches = Vec::new();
    let listed = list(path, depth, |entries, last| {
        batches.push((entries.into_iter().map(|e| e.path).collect(), last));
        Ok(())
    })
    .unwrap();
    listed.map(|()| batches)
}

#[test]
fn lists_go_as_deep_as_asked_in_batches() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("d/e")).unwrap();
    fs::write(dir.path().join("d/e/deep"), b"").unwrap();
    fs::write(dir.path().join("top"), b"").unwrap();
    let base = dir.path().to_string_lossy().into_owned();
    let one = listing(&base, 1).unwrap();
    assert_eq!(
        one,
        vec![(vec![format!("{base}/d"), format!("{base}/top")], true)]
    );
    let three = listing(&base, 3).unwrap();
    assert_eq!(
        three[0].0,
        vec![
            format!("{base}/d"),
            format!("{base}/d/e"),
            format!("{base}/d/e/deep"),
            format!("{base}/top")
        ]
    );

    for i in 0..LISTED_BATCH + 3 {
        fs::write(dir.path().join(format!("d/many-{i:04}")), b"").unwrap();
    }
    let many = listing(&format!("{base}/d"), 1).unwrap();
    assert_eq!(many.len(), 2);
    assert_eq!((many[0].0.len(), many[0].1), (LISTED_BATCH, false));
    assert_eq!((many[1].0.len(), many[1].1), (4, true));

    assert_eq!(listing(&base, 0).unwrap_err().kind, FileErrorKind::Invalid);
    let file = format!("{base}/top");
    assert_eq!(
        listing(&file, 1).unwrap_err().kind,
        FileErrorKind::NotADirectory
    );
}
