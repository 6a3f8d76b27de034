//! The seccomp filters, on real threads: each case runs in a child process (this test binary
//! again), since a filter cannot be taken off a thread and a refused call ends the process.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use agentos_tiny_guest::{BANNER, TINY_GUEST_ELF, VIRTIO_FOUND};
use agentos_vmm::builder::build_vm;
use agentos_vmm::config::{ConsoleConfig, VmConfig, VsockConfig};
use agentos_vmm::seccomp::{EXIT_BAD_SYSCALL, Role, SeccompFilters};

/// Names the case a child process runs.
const CASE_ENV: &str = "AGENTOS_SECCOMP_CASE";

/// Runs `case` in a child process and returns its exit code and stderr.
fn in_child(test: &str, case: &str) -> (Option<i32>, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads", "1"])
        .env(CASE_ENV, case)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn case() -> Option<String> {
    std::env::var(CASE_ENV).ok()
}

fn filtered(role: Role) {
    SeccompFilters::new().unwrap().install(role).unwrap();
}

#[test]
fn a_call_outside_a_threads_filter_ends_the_vmm_and_names_the_call_and_thread() {
    match case().as_deref() {
        Some("vcpu-socket") => {
            filtered(Role::Vcpu);
            // SAFETY: a plain socket call; the filter refuses it before it runs.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            std::process::exit(0);
        }
        Some("vmm-inet-socket") => {
            filtered(Role::Vmm);
            // SAFETY: as above. The VMM thread may open Unix stream sockets only.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            std::process::exit(0);
        }
        Some("vmm-open") => {
            filtered(Role::Vmm);
            let _ = std::fs::File::open("/etc/passwd");
            std::process::exit(0);
        }
        Some("signals-ioctl") => {
            filtered(Role::Signals);
            // SAFETY: winsize is plain data; zeroed is a valid value.
            let mut size: libc::winsize = unsafe { std::mem::zeroed() };
            // SAFETY: TIOCGWINSZ on stderr with a valid out pointer.
            unsafe { libc::ioctl(2, libc::TIOCGWINSZ, &mut size) };
            std::process::exit(0);
        }
        Some("vcpu-mmap-exec") => {
            filtered(Role::Vcpu);
            // SAFETY: an anonymous mapping; the filter refuses it for PROT_EXEC before it runs.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            std::process::exit(0);
        }
        Some("vmm-mprotect-exec") => {
            let page = vec![0u8; 8192];
            let aligned = (page.as_ptr() as usize).next_multiple_of(4096);
            filtered(Role::Vmm);
            // SAFETY: a page inside a buffer we own; the filter refuses the call before it runs.
            unsafe {
                libc::mprotect(
                    aligned as *mut libc::c_void,
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                )
            };
            std::process::exit(0);
        }
        Some(other) => panic!("unknown case {other}"),
        None => {}
    }
    let test = "a_call_outside_a_threads_filter_ends_the_vmm_and_names_the_call_and_thread";
    for (case, line) in [
        ("vcpu-socket", "system call 41 (socket) on the vcpu thread"),
        (
            "vmm-inet-socket",
            "system call 41 (socket) on the vmm thread",
        ),
        ("vmm-open", "(openat) on the vmm thread"),
        (
            "signals-ioctl",
            "system call 16 (ioctl) on the signals thread",
        ),
        ("vcpu-mmap-exec", "system call 9 (mmap) on the vcpu thread"),
        (
            "vmm-mprotect-exec",
            "system call 10 (mprotect) on the vmm thread",
        ),
    ] {
        let (code, stderr) = in_child(test, case);
        assert_eq!(code, Some(EXIT_BAD_SYSCALL), "{case}: {stderr}");
        assert!(
            stderr.contains("agentos-vmm: killed by its seccomp filter: ") && stderr.contains(line),
            "{case}: {stderr}"
        );
    }
}

#[test]
fn calls_a_thread_needs_pass_its_filter() {
    match case().as_deref() {
        Some("vmm-unix-socket") => {
            filtered(Role::Vmm);
            // SAFETY: the socket the vsock device opens for a guest connection.
            let fd = unsafe {
                libc::socket(
                    libc::AF_UNIX,
                    libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    0,
                )
            };
            assert!(fd >= 0);
            // SAFETY: `fd` is ours.
            unsafe { libc::close(fd) };
            eprintln!("still here");
            std::process::exit(0);
        }
        Some(other) => panic!("unknown case {other}"),
        None => {}
    }
    let (code, stderr) = in_child("calls_a_thread_needs_pass_its_filter", "vmm-unix-socket");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("still here"), "{stderr}");
}

/// The whole VMM under its filters: every vCPU thread and the VMM thread install theirs before
/// the guest runs, and the tiny guest boots on two vCPUs, finds its vsock device, prints and
/// resets as without them; the VMM removes its vsock socket at the end.
#[test]
fn the_tiny_guest_runs_with_every_thread_filtered() {
    const DIR_ENV: &str = "AGENTOS_SECCOMP_DIR";
    if let Some(dir) = std::env::var_os(DIR_ENV) {
        let dir = PathBuf::from(dir);
        let kernel = dir.join("tiny.elf");
        std::fs::write(&kernel, TINY_GUEST_ELF).unwrap();
        let config = VmConfig {
            vcpus: 2,
            memory_mib: 16,
            kernel,
            initrd: Vec::new(),
            cmdline: String::new(),
            console: ConsoleConfig {
                log: Some(append(&dir.join("console.log"))),
                stdout: false,
            },
            vsock: Some(VsockConfig {
                guest_cid: 3,
                uds_path: dir.join("vsock.sock"),
            }),
            disks: Vec::new(),
            pmem: Vec::new(),
            pci_devices: Vec::new(),
            snapshot_to: None,
        };
        let vmm = build_vm(&config).unwrap();
        let report = vmm
            .with_seccomp(Arc::new(SeccompFilters::new().unwrap()))
            .run(None)
            .unwrap();
        eprintln!("outcome: {:?}", report.outcome);
        std::process::exit(0);
    }
    if !std::path::Path::new("/dev/kvm").exists() {
        assert!(
            std::env::var_os("AGENTOS_TEST_NO_SKIP").is_none(),
            "AGENTOS_TEST_NO_SKIP is set but /dev/kvm does not exist"
        );
        eprintln!("skipping: no /dev/kvm");
        return;
    }
    let dir = std::env::temp_dir().join(format!("agentos-vmm-seccomp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "the_tiny_guest_runs_with_every_thread_filtered",
            "--exact",
            "--nocapture",
        ])
        .env(DIR_ENV, &dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let console = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
    let socket_left = dir.join("vsock.sock").exists();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("outcome: Shutdown"), "{stderr}");
    assert!(console.starts_with(BANNER), "{console}");
    assert!(console.contains(VIRTIO_FOUND), "{console}");
    assert!(!socket_left, "the VMM left its vsock socket behind");
}

/// A console log, opened for appending as the VMM's callers open it.
fn append(path: &std::path::Path) -> std::fs::File {
    std::fs::File::options()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
}
