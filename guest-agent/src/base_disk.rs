//! The `base` template's disk: GNU bash and CPython from Debian's packages, on a read-only erofs
//! image (a virtio-pmem region) that the host names on the kernel command line
//! (`agentos.base=pmem2`). PID 1 mounts it at `/opt/base` before anything runs, pages mapped from
//! the host (`dax`), and links what it holds into the root file system: each entry of the disk
//! becomes a symbolic link at the same path where the root has nothing of that name, and where
//! both have a directory the links are made inside it. The image's own files win, so the guest
//! agent's libc and busybox stay what they are, and `/bin/bash`, `/usr/bin/python3`,
//! `/usr/lib/python3.11` and the libraries the programs load are where Debian put them.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::model_disks::{ModelDisksError, is_disk, mount_disk, read_cmdline};

/// The kernel parameter naming the disk (the host's `agentos_image::template::BASE_DISK_PARAM`).
const BASE_DISK_PARAM: &str = "agentos.base";
/// Where the disk is mounted (the host's `agentos_image::template::GUEST_BASE_DIR`).
const BASE_DIR: &str = "/opt/base";
/// How deep links are made: the disk's tree is a few levels deep where it meets the image's.
const MAX_DEPTH: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum BaseDiskError {
    #[error("cannot read /proc/cmdline")]
    Cmdline(#[source] io::Error),
    #[error(
        "{BASE_DISK_PARAM}={0:?}: not a pmem device (pmem0 to pmem9) or a disk's first partition (vda1 to vdz1)"
    )]
    Param(String),
    #[error(transparent)]
    Mount(#[from] ModelDisksError),
    #[error("cannot link {} into the root file system", .0.display())]
    Link(PathBuf, #[source] io::Error),
}

/// Mounts the base disk and links its tree into the root, when the command line names one.
pub fn mount_given() -> Result<(), BaseDiskError> {
    let cmdline = read_cmdline().map_err(BaseDiskError::Cmdline)?;
    let Some(device) = parse(&cmdline)? else {
        return Ok(());
    };
    let dir = Path::new(BASE_DIR);
    mount_disk(&device, dir)?;
    link_tree(dir, Path::new("/"), 0)
}

/// The device the command line names for the disk (the last one given), checked.
fn parse(cmdline: &str) -> Result<Option<String>, BaseDiskError> {
    let mut device = None;
    for word in cmdline.split_whitespace() {
        if let Some(value) = word
            .strip_prefix(BASE_DISK_PARAM)
            .and_then(|rest| rest.strip_prefix('='))
        {
            if !is_disk(value) {
                return Err(BaseDiskError::Param(value.to_owned()));
            }
            device = Some(value.to_owned());
        }
    }
    Ok(device)
}

/// Links each entry of `from` at the same name in `into` where `into` has none, and descends
/// where both have a directory.
fn link_tree(from: &Path, into: &Path, depth: usize) -> Result<(), BaseDiskError> {
    let entries = fs::read_dir(from).map_err(|e| BaseDiskError::Link(from.to_owned(), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| BaseDiskError::Link(from.to_owned(), e))?;
        let source = entry.path();
        let target = into.join(entry.file_name());
        match fs::symlink_metadata(&target) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::os::unix::fs::symlink(&source, &target)
                    .map_err(|e| BaseDiskError::Link(source.clone(), e))?;
            }
            Ok(meta) if meta.is_dir() && depth < MAX_DEPTH => {
                let is_dir = entry
                    .file_type()
                    .map_err(|e| BaseDiskError::Link(source.clone(), e))?
                    .is_dir();
                if is_dir {
                    link_tree(&source, &target, depth + 1)?;
                }
            }
            // The image's own file (or an error reading it) wins.
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_names_the_disk() {
        assert_eq!(parse("console=ttyS0 quiet").unwrap(), None);
        assert_eq!(
            parse("agentos.runtime=pmem0 agentos.base=pmem2 panic=-1").unwrap(),
            Some("pmem2".to_owned())
        );
        assert_eq!(parse("agentos.basex=pmem0").unwrap(), None);
        for bad in [
            "agentos.base=",
            "agentos.base=pmem",
            "agentos.base=../x",
            "agentos.base=vda",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_tree_is_linked_where_the_root_has_nothing_and_the_root_wins() {
        let disk = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        for dir in ["bin", "lib/x86_64-linux-gnu", "usr/lib/python3.11"] {
            fs::create_dir_all(disk.path().join(dir)).unwrap();
        }
        fs::write(disk.path().join("bin/bash"), b"bash").unwrap();
        fs::write(disk.path().join("bin/sh"), b"not busybox").unwrap();
        fs::write(disk.path().join("lib/x86_64-linux-gnu/libtinfo.so.6"), b"").unwrap();
        fs::write(disk.path().join("usr/lib/python3.11/os.py"), b"").unwrap();
        fs::create_dir_all(root.path().join("bin")).unwrap();
        fs::create_dir_all(root.path().join("lib/x86_64-linux-gnu")).unwrap();
        fs::create_dir_all(root.path().join("usr")).unwrap();
        fs::write(root.path().join("bin/sh"), b"busybox").unwrap();

        link_tree(disk.path(), root.path(), 0).unwrap();
        let r = |p: &str| root.path().join(p);
        assert_eq!(fs::read(r("bin/bash")).unwrap(), b"bash");
        assert_eq!(fs::read(r("bin/sh")).unwrap(), b"busybox");
        assert!(fs::symlink_metadata(r("bin")).unwrap().is_dir());
        assert!(r("lib/x86_64-linux-gnu/libtinfo.so.6").exists());
        assert_eq!(
            fs::read_link(r("usr/lib")).unwrap(),
            disk.path().join("usr/lib")
        );
        assert!(r("usr/lib/python3.11/os.py").exists());
    }
}
