//! QEMU as agentos uses it: the carrier (`carrier`) and the side-by-side benchmark (`bench`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const QEMU: &str = "qemu-system-x86_64";

/// What to tell a user who has no QEMU.
pub const INSTALL_HINT: &str =
    "install qemu-system-x86 (on Debian 12 from bookworm-backports; scripts/setup does this)";

/// A QEMU command with nothing but what we add: no default devices or config, no display, no
/// reboot (a guest reset ends QEMU).
pub fn command() -> Command {
    let mut cmd = Command::new(QEMU);
    cmd.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    cmd
}

/// The first line of `qemu-system-x86_64 --version`, or None when QEMU cannot run.
pub fn version() -> Option<String> {
    let out = Command::new(QEMU)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()?
            .to_string(),
    )
}

/// `QEMU emulator version 10.0.2 (...)` → 10.
pub fn major_version(version_line: &str) -> Option<u32> {
    version_line
        .strip_prefix("QEMU emulator version ")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// Where a program is on `$PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn major_version_is_read_from_the_banner() {
        assert_eq!(
            major_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)"),
            Some(10)
        );
        assert_eq!(major_version("QEMU emulator version 7.2.19"), Some(7));
        assert_eq!(major_version("something else"), None);
    }
}
