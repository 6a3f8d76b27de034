//! `newc` cpio archives, the format the kernel unpacks into its initramfs.
//!
//! Every entry has uid, gid and mtime 0 and inode numbers count up from 1, so the same entries
//! give the same bytes. [`CpioWriter`] streams entries in the order it is given them;
//! [`CpioTree`] collects them first and writes them sorted by path, so the order in which an image
//! builder adds things does not change the archive.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";
const HEADER_BYTES: u64 = 110;
const ALIGN: u64 = 4;

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const PERMISSION_BITS: u32 = 0o7777;
const PARENT_DIR_MODE: u32 = 0o755;

#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("cannot write the cpio archive")]
    Write(#[source] io::Error),
    #[error("cannot read {path} for the cpio archive")]
    ReadHost {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} changed size while it was being archived; rebuild the image")]
    SizeChanged { path: String },
    #[error(
        "{path:?} is not a usable archive path (it must be a relative or absolute UTF-8 path without `.` or `..`)"
    )]
    BadPath { path: String },
    #[error("{path} is added to the archive twice")]
    Duplicate { path: String },
    #[error("{path} is not a directory, so nothing can be put below it")]
    NotADirectory { path: String },
    #[error(
        "{path} was already created as a directory with mode {existing:o}, not {wanted:o}; add a directory before its contents"
    )]
    DirMode {
        path: String,
        existing: u32,
        wanted: u32,
    },
    #[error("{path} is {len} bytes, more than a newc cpio entry can hold")]
    TooLarge { path: String, len: u64 },
}

/// Writes a `newc` archive entry by entry. Missing parent directories are created (mode 0755) the
/// first time a path below them is added.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_inode: u32,
    /// Every path written so far, with the mode of those that are directories.
    paths: BTreeMap<String, Option<u32>>,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_inode: 1,
            paths: BTreeMap::new(),
        }
    }

    /// A directory. Adding one that exists with the same mode does nothing.
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<(), CpioError> {
        let path = archive_path(path)?;
        let mode = mode & PERMISSION_BITS;
        match self.paths.get(&path) {
            Some(Some(existing)) if *existing == mode => Ok(()),
            Some(Some(existing)) => Err(CpioError::DirMode {
                existing: *existing,
                wanted: mode,
                path,
            }),
            Some(None) => Err(CpioError::Duplicate { path }),
            None => {
                self.parents(&path)?;
                self.header(&path, S_IFDIR | mode, 2, 0)?;
                self.paths.insert(path, Some(mode));
                Ok(())
            }
        }
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<(), CpioError> {
        self.file_from_reader(path, mode, &mut &*data, data.len() as u64)
    }

    /// A regular file of exactly `len` bytes read from `reader`, streamed without buffering it.
    pub fn file_from_reader(
        &mut self,
        path: &str,
        mode: u32,
        reader: &mut dyn Read,
        len: u64,
    ) -> Result<(), CpioError> {
        let path = self.new_entry(path)?;
        self.header(&path, S_IFREG | (mode & PERMISSION_BITS), 1, len)?;
        let copied = io::copy(&mut reader.take(len), &mut self.out).map_err(CpioError::Write)?;
        self.written += copied;
        if copied != len {
            return Err(CpioError::SizeChanged { path });
        }
        self.pad()?;
        self.paths.insert(path, None);
        Ok(())
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        let path = self.new_entry(path)?;
        self.header(&path, S_IFLNK | 0o777, 1, target.len() as u64)?;
        self.put(target.as_bytes())?;
        self.pad()?;
        self.paths.insert(path, None);
        Ok(())
    }

    /// Writes the trailer and hands back the output.
    pub fn finish(mut self) -> Result<W, CpioError> {
        self.header(TRAILER, 0, 1, 0)?;
        self.out.flush().map_err(CpioError::Write)?;
        Ok(self.out)
    }

    fn new_entry(&mut self, path: &str) -> Result<String, CpioError> {
        let path = archive_path(path)?;
        if self.paths.contains_key(&path) {
            return Err(CpioError::Duplicate { path });
        }
        self.parents(&path)?;
        Ok(path)
    }

    fn parents(&mut self, path: &str) -> Result<(), CpioError> {
        let mut end = 0;
        while let Some(slash) = path[end..].find('/') {
            end += slash;
            let parent = &path[..end];
            match self.paths.get(parent) {
                Some(Some(_)) => {}
                Some(None) => {
                    return Err(CpioError::NotADirectory {
                        path: parent.to_owned(),
                    });
                }
                None => {
                    self.header(parent, S_IFDIR | PARENT_DIR_MODE, 2, 0)?;
                    self.paths.insert(parent.to_owned(), Some(PARENT_DIR_MODE));
                }
            }
            end += 1;
        }
        Ok(())
    }

    fn header(&mut self, name: &str, mode: u32, links: u32, size: u64) -> Result<(), CpioError> {
        let size = u32::try_from(size).map_err(|_| CpioError::TooLarge {
            path: name.to_owned(),
            len: size,
        })?;
        let inode = if name == TRAILER { 0 } else { self.next_inode };
        self.next_inode += 1;
        // namesize counts the terminating NUL.
        let name_size = name.len() + 1;
        let fields = [
            inode,
            mode,
            0,
            0,
            links,
            0,
            size,
            0,
            0,
            0,
            0,
            name_size as u32,
            0,
        ];
        let mut header = String::with_capacity(HEADER_BYTES as usize);
        header.push_str(MAGIC);
        for field in fields {
            header.push_str(&format!("{field:08x}"));
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), CpioError> {
        self.out.write_all(bytes).map_err(CpioError::Write)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<(), CpioError> {
        let padding = (ALIGN - self.written % ALIGN) % ALIGN;
        self.put(&[0; ALIGN as usize][..padding as usize])
    }
}

/// An archive's entries collected by path and written in path order, component by component:
/// every directory comes before its contents, and its contents right after it.
#[derive(Default)]
pub struct CpioTree {
    /// Keyed by the archive path with `/` replaced by NUL, the one byte that sorts before all
    /// others and that archive paths never contain.
    entries: BTreeMap<String, Node>,
}

enum Node {
    Dir { mode: u32 },
    Bytes { mode: u32, data: Vec<u8> },
    HostFile { mode: u32, source: PathBuf },
    Symlink { target: String },
}

impl CpioTree {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn contains(&self, path: &str) -> bool {
        archive_path(path).is_ok_and(|p| self.entries.contains_key(&sort_key(&p)))
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> Result<(), CpioError> {
        let path = archive_path(path)?;
        let mode = mode & PERMISSION_BITS;
        match self.entries.get(&sort_key(&path)) {
            Some(Node::Dir { mode: existing }) if *existing == mode => Ok(()),
            Some(Node::Dir { mode: existing }) => Err(CpioError::DirMode {
                existing: *existing,
                wanted: mode,
                path,
            }),
            Some(_) => Err(CpioError::Duplicate { path }),
            None => {
                self.entries.insert(sort_key(&path), Node::Dir { mode });
                Ok(())
            }
        }
    }

    /// Adds the directories above `path` that are not there yet, mode 0755: what an archive
    /// appended to another needs so that its files can be unpacked at host-like paths.
    pub fn parent_dirs(&mut self, path: &Path) -> Result<(), CpioError> {
        let mut parents: Vec<&Path> = path.ancestors().skip(1).collect();
        parents.reverse();
        for dir in parents {
            let Some(name) = dir.to_str().filter(|d| *d != "/" && !d.is_empty()) else {
                continue;
            };
            if !self.contains(name) {
                self.dir(name, 0o755)?;
            }
        }
        Ok(())
    }

    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) -> Result<(), CpioError> {
        self.insert(path, Node::Bytes { mode, data })
    }

    /// A file whose bytes are read from `source` on the host when the archive is written.
    pub fn host_file(&mut self, path: &str, mode: u32, source: &Path) -> Result<(), CpioError> {
        self.insert(
            path,
            Node::HostFile {
                mode,
                source: source.to_owned(),
            },
        )
    }

    /// A host file at its own absolute path, with its own permissions; a symlink is followed and
    /// its target's bytes stored under the link's name, which is the path a loader will open.
    pub fn host_file_at_same_path(&mut self, source: &Path) -> Result<(), CpioError> {
        let path = source.to_str().ok_or_else(|| CpioError::BadPath {
            path: source.display().to_string(),
        })?;
        let metadata = std::fs::metadata(source).map_err(|e| CpioError::ReadHost {
            path: source.to_owned(),
            source: e,
        })?;
        self.host_file(path, metadata.permissions().mode(), source)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        self.insert(
            path,
            Node::Symlink {
                target: target.to_owned(),
            },
        )
    }

    /// Writes every entry and the trailer, and hands back the output.
    pub fn write<W: Write>(&self, out: W) -> Result<W, CpioError> {
        let mut writer = CpioWriter::new(out);
        for (key, node) in &self.entries {
            let path = &key.replace('\0', "/");
            match node {
                Node::Dir { mode } => writer.dir(path, *mode)?,
                Node::Bytes { mode, data } => writer.file(path, *mode, data)?,
                Node::Symlink { target } => writer.symlink(path, target)?,
                Node::HostFile { mode, source } => {
                    let read_error = |e| CpioError::ReadHost {
                        path: source.clone(),
                        source: e,
                    };
                    let mut file = File::open(source).map_err(read_error)?;
                    let len = file.metadata().map_err(read_error)?.len();
                    writer.file_from_reader(path, *mode, &mut file, len)?;
                }
            }
        }
        writer.finish()
    }

    fn insert(&mut self, path: &str, node: Node) -> Result<(), CpioError> {
        let path = archive_path(path)?;
        let key = sort_key(&path);
        if self.entries.contains_key(&key) {
            return Err(CpioError::Duplicate { path });
        }
        self.entries.insert(key, node);
        Ok(())
    }
}

fn sort_key(archive_path: &str) -> String {
    archive_path.replace('/', "\0")
}

/// The name an entry gets inside the archive: relative, `/`-separated, no empty, `.` or `..`
/// components (the kernel would resolve those against the initramfs root, or refuse them).
fn archive_path(path: &str) -> Result<String, CpioError> {
    let relative = path.trim_start_matches('/');
    let bad = || CpioError::BadPath {
        path: path.to_owned(),
    };
    if relative.is_empty() || relative == TRAILER || relative.contains('\0') {
        return Err(bad());
    }
    if relative
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad());
    }
    Ok(relative.to_owned())
}

#[cfg(test)]
pub mod testing {
    /// One entry read back from a `newc` archive.
    #[derive(Debug, PartialEq, Eq)]
    pub struct Entry {
        pub name: String,
        pub mode: u32,
        pub inode: u32,
        pub uid: u32,
        pub mtime: u32,
        pub data: Vec<u8>,
    }

    /// A strict reader for the archives our writer produces: checks magic, alignment and trailer.
    pub fn read_newc(bytes: &[u8]) -> Vec<Entry> {
        let mut entries = Vec::new();
        let mut at = 0;
        loop {
            assert_eq!(at % 4, 0, "entry not aligned");
            assert_eq!(&bytes[at..at + 6], b"070701");
            let field = |i: usize| {
                let s = std::str::from_utf8(&bytes[at + 6 + i * 8..at + 14 + i * 8]).unwrap();
                u32::from_str_radix(s, 16).unwrap()
            };
            let (inode, mode, uid, mtime, size, name_size) =
                (field(0), field(1), field(2), field(5), field(6), field(11));
            let name_at = at + 110;
            let name_end = name_at + name_size as usize;
            assert_eq!(bytes[name_end - 1], 0, "name not NUL-terminated");
            let name = std::str::from_utf8(&bytes[name_at..name_end - 1])
                .unwrap()
                .to_owned();
            let data_at = name_end.next_multiple_of(4);
            let data_end = data_at + size as usize;
            at = data_end.next_multiple_of(4);
            if name == "TRAILER!!!" {
                assert_eq!(at, bytes.len(), "bytes after the trailer");
                return entries;
            }
            entries.push(Entry {
                name,
                mode,
                inode,
                uid,
                mtime,
                data: bytes[data_at..data_end].to_vec(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::read_newc;
    use super::*;

    #[test]
    fn writer_output_reads_back_with_parents_first() {
        let mut writer = CpioWriter::new(Vec::new());
        writer.dir("/tmp", 0o1777).unwrap();
        writer.file("/etc/agentos/init.json", 0o644, b"{}").unwrap();
        writer.symlink("bin/sh", "/bin/busybox").unwrap();
        writer
            .file_from_reader("/init", 0o755, &mut &b"\x7fELF..."[..], 7)
            .unwrap();
        let bytes = writer.finish().unwrap();
        let entries = read_newc(&bytes);
        let summary: Vec<(&str, u32)> = entries.iter().map(|e| (e.name.as_str(), e.mode)).collect();
        assert_eq!(
            summary,
            [
                ("tmp", 0o041777),
                ("etc", 0o040755),
                ("etc/agentos", 0o040755),
                ("etc/agentos/init.json", 0o100644),
                ("bin", 0o040755),
                ("bin/sh", 0o120777),
                ("init", 0o100755),
            ]
        );
        assert_eq!(entries[3].data, b"{}");
        assert_eq!(entries[5].data, b"/bin/busybox");
        assert!(entries.iter().all(|e| e.uid == 0 && e.mtime == 0));
        let inodes: Vec<u32> = entries.iter().map(|e| e.inode).collect();
        assert_eq!(inodes, (1..=7).collect::<Vec<_>>());
    }

    #[test]
    fn system_cpio_lists_what_we_wrote() {
        let mut tree = CpioTree::new();
        tree.symlink("/bin/sh", "busybox").unwrap();
        tree.file("/etc/hostname", 0o644, b"agent\n".to_vec())
            .unwrap();
        tree.dir("/proc", 0o555).unwrap();
        let bytes = tree.write(Vec::new()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.cpio");
        std::fs::write(&archive, &bytes).unwrap();
        let cpio = crate::programs::find("cpio").unwrap_or_else(|e| panic!("{e}"));
        let output = std::process::Command::new(cpio)
            .args(["-t", "-F"])
            .arg(&archive)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            "bin\nbin/sh\netc\netc/hostname\nproc\n"
        );
    }

    #[test]
    fn tree_order_does_not_depend_on_insertion_order() {
        type AddEntry = Box<dyn Fn(&mut CpioTree)>;
        let build = |reverse: bool| {
            let mut steps: Vec<AddEntry> = vec![
                Box::new(|t| t.dir("/tmp", 0o1777).unwrap()),
                Box::new(|t| t.file("/a/b/c", 0o600, vec![1, 2, 3]).unwrap()),
                Box::new(|t| t.symlink("/bin/ls", "/bin/busybox").unwrap()),
                Box::new(|t| t.file("/bin-tools/x", 0o755, vec![]).unwrap()),
            ];
            if reverse {
                steps.reverse();
            }
            let mut tree = CpioTree::new();
            steps.iter().for_each(|step| step(&mut tree));
            tree.write(Vec::new()).unwrap()
        };
        assert_eq!(build(false), build(true));
        let names: Vec<String> = read_newc(&build(false))
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(
            names,
            [
                "a",
                "a/b",
                "a/b/c",
                "bin",
                "bin/ls",
                "bin-tools",
                "bin-tools/x",
                "tmp"
            ]
        );
    }

    #[test]
    fn host_files_land_at_their_own_paths() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("lib").join("libdemo.so.1");
        std::fs::create_dir_all(source.parent().unwrap()).unwrap();
        std::fs::write(&source, b"library bytes").unwrap();
        std::fs::set_permissions(&source, std::fs::Permissions::from_mode(0o640)).unwrap();
        let link = dir.path().join("lib").join("libdemo.so");
        std::os::unix::fs::symlink("libdemo.so.1", &link).unwrap();

        let mut tree = CpioTree::new();
        tree.host_file_at_same_path(&source).unwrap();
        tree.host_file_at_same_path(&link).unwrap();
        let entries = read_newc(&tree.write(Vec::new()).unwrap());
        let expected = source.to_str().unwrap().trim_start_matches('/');
        let file = entries.iter().find(|e| e.name == expected).unwrap();
        assert_eq!(
            (file.mode, file.data.as_slice()),
            (0o100640, &b"library bytes"[..])
        );
        let linked = expected.replace("libdemo.so.1", "libdemo.so");
        let file = entries.iter().find(|e| e.name == linked).unwrap();
        assert_eq!(file.data, b"library bytes");
        // Each ancestor directory of the temporary dir is created exactly once.
        let dirs = entries.iter().filter(|e| e.mode & 0o170_000 == S_IFDIR);
        let mut names: Vec<&str> = dirs.map(|e| e.name.as_str()).collect();
        let count = names.len();
        names.dedup();
        assert_eq!(names.len(), count);
    }

    #[test]
    fn bad_and_duplicate_paths_are_refused() {
        let mut tree = CpioTree::new();
        for bad in ["", "/", "a/../b", "./a", "a//b", "TRAILER!!!"] {
            assert!(
                matches!(tree.dir(bad, 0o755), Err(CpioError::BadPath { .. })),
                "{bad}"
            );
        }
        tree.file("/x", 0o644, vec![]).unwrap();
        assert!(matches!(
            tree.symlink("x", "y"),
            Err(CpioError::Duplicate { .. })
        ));

        let mut writer = CpioWriter::new(Vec::new());
        writer.file("/a/b", 0o644, b"").unwrap();
        assert!(matches!(
            writer.dir("/a", 0o700),
            Err(CpioError::DirMode { .. })
        ));
        assert!(matches!(
            writer.file("/a/b/c", 0o644, b""),
            Err(CpioError::NotADirectory { .. })
        ));
    }

    #[test]
    fn a_reader_shorter_than_promised_is_an_error() {
        let mut writer = CpioWriter::new(Vec::new());
        let err = writer
            .file_from_reader("/f", 0o644, &mut &b"abc"[..], 10)
            .unwrap_err();
        assert!(matches!(err, CpioError::SizeChanged { .. }));
    }
}
