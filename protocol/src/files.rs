//! Files in the guest: what the host may ask of them, and how the guest answers.
//!
//! A file moves in chunks, each its own frame, so that a file of any size crosses a connection
//! in bounded memory on both sides: a read is answered with `file_chunk` frames and one
//! `file_end`; a write is a `write_file`, `file_chunk` frames and one `file_end`, answered with
//! `file_written`. The other operations (stat, list, make a directory, move, remove) are one
//! `fs` request each. Every failure is a `file_error` that says what kind of failure it was.

use serde::{Deserialize, Serialize};

/// Most bytes one `file_chunk` frame carries (about 171 KiB of base64, far below the frame
/// limit).
pub const FILE_CHUNK_BYTES: usize = 128 * 1024;

/// Most entries one `listed` frame carries; a listing of more comes in several frames.
pub const LISTED_BATCH: usize = 256;

/// Most entries one listing may have, whatever its depth.
pub const MAX_LISTED_ENTRIES: usize = 100_000;

/// Deepest listing: a depth of 1 lists a directory's own entries.
pub const MAX_LIST_DEPTH: u32 = 64;

/// Longest path the guest takes, in bytes (the kernel's `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;

/// One operation on the guest's file tree. Paths are absolute.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "do", rename_all = "snake_case", deny_unknown_fields)]
pub enum FsOp {
    /// What `path` is (a symbolic link is described, not followed); answered with `fs_done`
    /// carrying the entry.
    Stat { path: String },
    /// The entries under the directory `path`, `depth` levels down (1: its own entries);
    /// answered with `listed` frames. Symbolic links are listed, not followed.
    List { path: String, depth: u32 },
    /// Makes the directory `path` and any missing parents, owned by `user` (of the guest's
    /// `/etc/passwd`; root when absent); answered with `fs_done` carrying the new directory, or
    /// `already_exists` when it was there.
    MakeDir {
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    /// Renames `from` to `to`, making `to`'s missing parents; answered with `fs_done` carrying
    /// the entry at `to`.
    Move { from: String, to: String },
    /// Removes `path`, a directory with everything in it; answered with `fs_done` (no entry).
    Remove { path: String },
}

impl FsOp {
    /// What the operation does, for messages.
    pub fn verb(&self) -> &'static str {
        match self {
            Self::Stat { .. } => "stat",
            Self::List { .. } => "list",
            Self::MakeDir { .. } => "make directory",
            Self::Move { .. } => "move",
            Self::Remove { .. } => "remove",
        }
    }
}

/// What happened to a watched path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// Made, or moved in.
    Create,
    /// Written to.
    Write,
    /// Removed.
    Remove,
    /// Moved away (its new name, if under the watched directory, comes as a `create`).
    Rename,
    /// Its mode, owner or times changed.
    Chmod,
}

/// One change under a watched directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    pub kind: ChangeKind,
    /// The path that changed (names that are not UTF-8 are shown with U+FFFD).
    pub path: String,
}

/// Most directories one recursive watch follows.
pub const MAX_WATCHED_DIRS: usize = 8192;

/// What an entry of the file tree is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// A device, socket or pipe.
    Other,
}

/// One entry of the guest's file tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The last part of its path (names that are not UTF-8 are shown with U+FFFD).
    pub name: String,
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    /// Permission bits (`0o7777` at most).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Last modification, in milliseconds since the Unix epoch.
    pub modified_ms: i64,
    /// Where a symbolic link points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// Why a file request failed, as a client can act on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileErrorKind {
    NotFound,
    AlreadyExists,
    PermissionDenied,
    NotADirectory,
    IsADirectory,
    /// The request itself is wrong: a relative path, a depth of 0, a device to read, too many
    /// entries.
    Invalid,
    /// The guest's file system is full (or the user's quota spent).
    NoSpace,
    /// Anything else (the disk is full, an I/O error).
    Failed,
}

impl FileErrorKind {
    /// The kind of an I/O error.
    pub fn of(e: &std::io::Error) -> Self {
        use std::io::ErrorKind as Io;
        match e.kind() {
            Io::NotFound => Self::NotFound,
            Io::AlreadyExists => Self::AlreadyExists,
            Io::PermissionDenied | Io::ReadOnlyFilesystem => Self::PermissionDenied,
            Io::NotADirectory => Self::NotADirectory,
            Io::IsADirectory | Io::DirectoryNotEmpty => Self::IsADirectory,
            Io::InvalidInput | Io::InvalidFilename => Self::Invalid,
            Io::StorageFull | Io::QuotaExceeded => Self::NoSpace,
            _ => Self::Failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GuestMessage, HostMessage, StreamData};

    /// The wire format is a contract with guests built earlier.
    #[test]
    fn wire_format_is_stable() {
        let op = HostMessage::Fs {
            id: 2,
            fs: FsOp::List {
                path: "/home".into(),
                depth: 2,
            },
        };
        assert_eq!(
            serde_json::to_string(&op).unwrap(),
            r#"{"op":"fs","id":2,"fs":{"do":"list","path":"/home","depth":2}}"#
        );
        let write = HostMessage::WriteFile {
            id: 3,
            path: "/a".into(),
            mode: Some(0o600),
            user: None,
            in_place: false,
        };
        assert_eq!(
            serde_json::to_string(&write).unwrap(),
            r#"{"op":"write_file","id":3,"path":"/a","mode":384}"#
        );
        let chunk = HostMessage::FileChunk {
            id: 3,
            data: StreamData(vec![0, 255]),
        };
        assert_eq!(
            serde_json::to_string(&chunk).unwrap(),
            r#"{"op":"file_chunk","id":3,"data":"AP8="}"#
        );
        let failed = GuestMessage::FileError {
            id: 3,
            kind: FileErrorKind::NotADirectory,
            message: "no".into(),
        };
        assert_eq!(
            serde_json::to_string(&failed).unwrap(),
            r#"{"type":"file_error","id":3,"kind":"not_a_directory","message":"no"}"#
        );
        let entry = Entry {
            name: "a".into(),
            path: "/a".into(),
            kind: EntryKind::Symlink,
            size: 1,
            mode: 0o777,
            uid: 0,
            gid: 0,
            modified_ms: 5,
            target: Some("/b".into()),
        };
        let done = GuestMessage::FsDone {
            id: 4,
            entry: Some(entry),
        };
        let text = serde_json::to_string(&done).unwrap();
        assert_eq!(
            text,
            r#"{"type":"fs_done","id":4,"entry":{"name":"a","path":"/a","kind":"symlink","size":1,"mode":511,"uid":0,"gid":0,"modified_ms":5,"target":"/b"}}"#
        );
        assert_eq!(serde_json::from_str::<GuestMessage>(&text).unwrap(), done);
    }

    #[test]
    fn io_errors_map_to_kinds() {
        use std::io::{Error, ErrorKind};
        let kind = |k| FileErrorKind::of(&Error::from(k));
        assert_eq!(kind(ErrorKind::NotFound), FileErrorKind::NotFound);
        assert_eq!(kind(ErrorKind::AlreadyExists), FileErrorKind::AlreadyExists);
        assert_eq!(
            kind(ErrorKind::PermissionDenied),
            FileErrorKind::PermissionDenied
        );
        assert_eq!(
            FileErrorKind::of(&Error::from_raw_os_error(20)),
            FileErrorKind::NotADirectory
        );
        assert_eq!(
            FileErrorKind::of(&Error::from_raw_os_error(21)),
            FileErrorKind::IsADirectory
        );
        assert_eq!(kind(ErrorKind::OutOfMemory), FileErrorKind::Failed);
        assert_eq!(
            FileErrorKind::of(&Error::from_raw_os_error(28)),
            FileErrorKind::NoSpace
        );
    }
}
