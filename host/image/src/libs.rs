//! The shared libraries a dynamically linked binary loads, found the way the guest's loader will
//! find them.
//!
//! An initramfs has no `ld.so.cache`, so the guest's glibc loader looks in the binary's
//! RUNPATH/RPATH and then in its built-in system directories only. We search the same places on
//! the host and copy each library to the path where it was found: the guest loader then opens
//! exactly that file. Reading the ELF ourselves (rather than running `ldd`) never executes the
//! binary and gives the same answer for any binary of the guest's architecture.

use std::collections::{BTreeSet, VecDeque};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::elf::{Elf, ElfError};

/// glibc's trusted directories on Debian x86_64, searched in this order when there is no cache.
const SYSTEM_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib",
    "/usr/lib",
];

const EM_X86_64: u16 = 62;

#[derive(Debug, thiserror::Error)]
pub enum LibsError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the ELF headers of {path}")]
    Elf {
        path: PathBuf,
        #[source]
        source: ElfError,
    },
    #[error(
        "{library}, needed by {needed_by}, is in none of {searched}; install it, or put it in one of those directories"
    )]
    NotFound {
        library: String,
        needed_by: PathBuf,
        searched: String,
    },
}

/// The interpreter and every library `binary` needs, directly or through other libraries, as
/// absolute paths (symlinks not resolved). Empty for a static binary.
pub fn needed_libraries(binary: &Path) -> Result<Vec<PathBuf>, LibsError> {
    let bytes = read(binary)?;
    let elf = Elf::parse(&bytes).map_err(|source| elf_error(binary, source))?;
    let mut found = Vec::new();
    let mut seen = BTreeSet::new();
    if let Some(interpreter) = elf
        .interpreter()
        .map_err(|source| elf_error(binary, source))?
    {
        let interpreter = PathBuf::from(interpreter);
        // The loader is itself loaded under its soname, its file name: a library that needs it
        // (libc does) gets that copy, not a second one found by searching.
        if let Some(name) = interpreter.file_name().and_then(|n| n.to_str()) {
            seen.insert(name.to_owned());
        }
        found.push(interpreter);
    }

    let mut queue = VecDeque::from([(binary.to_owned(), bytes)]);
    while let Some((object, bytes)) = queue.pop_front() {
        let elf = Elf::parse(&bytes).map_err(|source| elf_error(&object, source))?;
        let dynamic = elf.dynamic().map_err(|source| elf_error(&object, source))?;
        let dirs = search_dirs(&object, dynamic.search_path.as_deref());
        for library in dynamic.needed {
            if !seen.insert(library.clone()) {
                continue;
            }
            let (path, bytes) = locate(&library, &dirs).ok_or_else(|| LibsError::NotFound {
                library: library.clone(),
                needed_by: object.clone(),
                searched: dirs.join(", "),
            })?;
            if !found.contains(&path) {
                found.push(path.clone());
            }
            queue.push_back((path, bytes));
        }
    }
    Ok(found)
}

/// The needing object's RUNPATH (or RPATH) with `$ORIGIN` expanded, then the system directories.
/// glibc also searches the RPATH of the objects that loaded this one; the binaries we package do
/// not rely on that.
fn search_dirs(object: &Path, search_path: Option<&str>) -> Vec<String> {
    let origin = object
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    search_path
        .into_iter()
        .flat_map(|p| p.split(':'))
        .filter(|d| !d.is_empty())
        .map(|d| lexically_normal(&d.replace("${ORIGIN}", &origin).replace("$ORIGIN", &origin)))
        .chain(SYSTEM_DIRS.iter().map(|d| (*d).to_owned()))
        .collect()
}

/// `a/bin/../lib` as `a/lib`: the archive holds no `..`, and `$ORIGIN/../lib` is the usual form.
fn lexically_normal(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            _ => parts.push(part),
        }
    }
    let joined = parts.join("/");
    if path.starts_with('/') {
        format!("/{joined}")
    } else {
        joined
    }
}

/// The first candidate the loader would accept: a readable 64-bit x86_64 ELF file. Like the
/// loader, we skip files of another class or machine and keep looking.
fn locate(library: &str, dirs: &[String]) -> Option<(PathBuf, Vec<u8>)> {
    let candidates: Vec<PathBuf> = if library.contains('/') {
        vec![PathBuf::from(library)]
    } else {
        dirs.iter().map(|d| Path::new(d).join(library)).collect()
    };
    candidates.into_iter().find_map(|path| {
        let bytes = fs::read(&path).ok()?;
        let elf = Elf::parse(&bytes).ok()?;
        (elf.machine() == Some(EM_X86_64)).then_some((path, bytes))
    })
}

fn read(path: &Path) -> Result<Vec<u8>, LibsError> {
    fs::read(path).map_err(|source| LibsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn elf_error(path: &Path, source: ElfError) -> LibsError {
    LibsError::Elf {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::super::elf::testing::elf_dynamic;
    use super::*;

    #[test]
    fn ls_needs_libc_and_the_interpreter() {
        let libs = needed_libraries(Path::new("/bin/ls")).unwrap();
        assert!(
            libs.contains(&PathBuf::from("/lib64/ld-linux-x86-64.so.2")),
            "{libs:?}"
        );
        assert!(
            libs.iter()
                .any(|p| p.file_name().is_some_and(|n| n == "libc.so.6")),
            "{libs:?}"
        );
        assert!(libs.iter().all(|p| p.is_absolute() && p.exists()));
    }

    #[test]
    fn runpath_with_origin_is_searched_before_the_system() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        let lib = dir.path().join("lib");
        fs::create_dir_all(&bin).unwrap();
        fs::create_dir_all(&lib).unwrap();
        // The program's RUNPATH does not apply to what its libraries need, so this copy of libc
        // must not be chosen for libextra.
        fs::write(lib.join("libc.so.6"), elf_dynamic("/unused", &[], None)).unwrap();
        fs::write(
            lib.join("libextra.so"),
            elf_dynamic("/unused", &["libc.so.6"], None),
        )
        .unwrap();
        let program = bin.join("program");
        let image = elf_dynamic(
            "/lib64/ld-linux-x86-64.so.2",
            &["libextra.so"],
            Some("$ORIGIN/../lib"),
        );
        fs::write(&program, image).unwrap();

        let libs = needed_libraries(&program).unwrap();
        assert_eq!(
            libs,
            [
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
                lib.join("libextra.so"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
            ]
        );
    }

    #[test]
    fn a_static_binary_needs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut image = elf_dynamic("/x", &[], None);
        // No program headers at all: what a plain static link produces.
        image[0x38..0x3a].copy_from_slice(&0u16.to_le_bytes());
        let path = dir.path().join("static");
        fs::write(&path, image).unwrap();
        assert!(needed_libraries(&path).unwrap().is_empty());
    }

    #[test]
    fn a_missing_library_names_the_binary_that_needs_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("program");
        fs::write(
            &path,
            elf_dynamic("/lib64/ld.so", &["libnowhere.so.9"], None),
        )
        .unwrap();
        let err = needed_libraries(&path).unwrap_err();
        assert!(
            matches!(err, LibsError::NotFound { ref library, ref needed_by, .. }
            if library == "libnowhere.so.9" && needed_by == &path)
        );
    }
}
