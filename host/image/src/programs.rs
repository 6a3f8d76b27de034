//! The programs agentos, its tests and its scripts start on the host, with the Debian package of
//! each: one list (`scripts/programs`) that `scripts/setup` installs from and that a test holds
//! the code to.

use std::path::{Path, PathBuf};

/// `scripts/programs`: a program and its package (`-` when apt does not provide it) per line.
const LIST: &str = include_str!("../../../scripts/programs");

/// One listed program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Program {
    pub name: &'static str,
    /// The Debian package that provides it; None when it comes from elsewhere (rustup).
    pub package: Option<&'static str>,
}

/// Every listed program.
pub fn listed() -> impl Iterator<Item = Program> {
    LIST.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let name = words.next()?;
            let package = words.next().filter(|p| *p != "-");
            Some(Program { name, package })
        })
}

/// A program that is not on PATH.
#[derive(Debug, thiserror::Error)]
#[error("`{name}` is not installed (not found on PATH){}; run scripts/setup, which installs what agentos and its tests need", from_package(.package))]
pub struct MissingProgram {
    pub name: String,
    pub package: Option<&'static str>,
}

fn from_package(package: &Option<&'static str>) -> String {
    package.map_or_else(String::new, |p| {
        format!(": it comes with Debian's {p} package")
    })
}

/// The path of `name` on PATH, or what to do to get it.
pub fn find(name: &str) -> Result<PathBuf, MissingProgram> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| MissingProgram {
            name: name.to_owned(),
            package: listed().find(|p| p.name == name).and_then(|p| p.package),
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod scan;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_names_each_program_once_with_a_package_or_a_dash() {
        let names: Vec<_> = listed().map(|p| p.name).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(names.len(), sorted.len(), "a program is listed twice");
        assert!(names.contains(&"cpio") && names.contains(&"qemu-system-x86_64"));
        for line in LIST
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        {
            assert_eq!(
                line.split_whitespace().count(),
                2,
                "`{line}`: program package"
            );
        }
    }

    #[test]
    fn a_missing_program_is_named_with_its_package_and_the_setup_step() {
        let err = find("cpio-that-is-not-there").unwrap_err();
        assert!(
            err.to_string()
                .contains("`cpio-that-is-not-there` is not installed")
        );
        assert!(err.to_string().contains("scripts/setup"));
        let err = MissingProgram {
            name: "cpio".into(),
            package: Some("cpio"),
        };
        assert!(err.to_string().contains("Debian's cpio package"), "{err}");
        assert!(find("sh").is_ok());
    }

    /// Every program the code, the scripts and the build scripts start is on the list.
    #[test]
    fn every_program_the_project_starts_is_listed() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let started = scan::workspace(&root).unwrap();
        // The scan finds what it should: a failure below is a real omission, not a blind scan.
        for known in [
            "qemu-system-x86_64",
            "dpkg-deb",
            "cpio",
            "timeout",
            "apt-get",
        ] {
            assert!(
                started.iter().any(|s| s.program == known),
                "the scan no longer sees {known}"
            );
        }
        let listed: Vec<_> = listed().map(|p| p.name).collect();
        let missing: Vec<String> = started
            .iter()
            .filter(|s| !listed.contains(&s.program.as_str()))
            .map(|s| format!("{} ({})", s.program, s.at))
            .collect();
        assert!(
            missing.is_empty(),
            "programs started but not in scripts/programs (add each with its Debian package): {}",
            missing.join(", ")
        );
    }
}
