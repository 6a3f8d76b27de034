//! Assembles `tiny.S` into a PVH-bootable ELF with the system's GNU binutils (`as`, `ld`).

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?} ({e}): install binutils (scripts/setup does)")
    });
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let obj = out.join("tiny.o");
    let elf = out.join("tiny.elf");
    run(Command::new("as")
        .args(["--64", "-o"])
        .arg(&obj)
        .arg("tiny.S"));
    run(Command::new("ld")
        .args([
            "-m",
            "elf_x86_64",
            "-static",
            "-nostdlib",
            "-Ttext=0x100000",
            "-e",
            "_start",
            "-o",
        ])
        .arg(&elf)
        .arg(&obj));
    println!("cargo::rerun-if-changed=tiny.S");
}
