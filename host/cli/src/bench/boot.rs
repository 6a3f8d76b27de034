//! `agentos bench boot`: boot times, side by side with QEMU's microvm machine in the same run.
//!
//! - **Linux**: the agent image's kernel and initramfs, booted by agentos and by
//!   `qemu-system-x86_64 -M microvm` (its bzImage) with the same command line, timed from spawning
//!   the VMM to the guest agent's first console line ([`BOOT_MARKER`]); for agentos also to the
//!   agent's `hello` over vsock and to the VMM's exit after a shutdown. agentos boots the kernel
//!   agents boot: the image's ELF `vmlinux` (through its PVH entry) where the image has one, and
//!   then the bzImage too, to show what the guest's own decompression costs. Runs where Linux
//!   guests run here: directly, or inside the QEMU carrier (all VMMs then run in the same carrier).
//! - **Firecracker** (with `--firecracker PATH`): the same initramfs, command line and devices (a
//!   vsock device), and the ELF kernel (the only kind Firecracker boots on x86_64; unpacked from
//!   the bzImage if the image has none).
//! - **Tiny guest**: the bare-metal test guest, directly on this host's KVM, timed from spawn to
//!   its first serial byte, with the peak resident memory of the VMM process.
//!
//! Runs of the VMMs alternate, each run in the next order of a balanced design (every VMM
//! directly follows every other equally often: a boot inherits what the one before left in the
//! carrier), and results are medians with their min and max, because these machines are shared
//! and noisy. The top-level
//! `ratio` is agentos / QEMU for the Linux boot.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use agentos_protocol::{AGENT_CONTROL_PORT, BOOT_MARKER};
use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use super::{Stats, ratio};
use agentos::carrier::{self, CarrierRun};
use agentos::placement::{self, CarrierChoice, Placement};
use agentos::qemu;
use agentos_core::agent::vm::{AGENT_CMDLINE, ChildWait, first_hello};
use agentos_core::rundir::RunDir;
use agentos_image::{self as image, AGENT_IMAGE, vmlinux};
use agentos_jail::JailLevel;

/// Files QEMU's microvm machine loads besides its binary (its firmware), wherever this QEMU's
/// packaging keeps them: QEMU searches both directories.
const QEMU_DATA: &[&str] = &[
    "/usr/share/qemu/bios-microvm.bin",
    "/usr/share/seabios/bios-microvm.bin",
    "/usr/share/qemu/qboot.rom",
    "/usr/share/qemu/linuxboot_dma.bin",
];
const LINUX_TIMEOUT: Duration = Duration::from_secs(300);
const TINY_TIMEOUT: Duration = Duration::from_secs(20);
const TINY_MEMORY_MIB: u64 = 16;

#[derive(clap::Args, Debug)]
pub struct BootBenchArgs {
    /// Boots per VMM and guest.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub runs: u32,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
    /// Guest memory of the Linux boots, in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u64,
    /// Where the Linux boots run (see `agentos run --help`).
    #[arg(long, value_enum, default_value_t = CarrierChoice::Auto)]
    pub carrier: CarrierChoice,
    /// A Firecracker binary to boot the same kernel and initramfs beside agentos and QEMU (copied
    /// into the carrier where the Linux boots run there).
    #[arg(long, value_name = "PATH")]
    pub firecracker: Option<PathBuf>,
    /// Only the Linux part, as JSON (what runs inside a carrier).
    #[arg(long, hide = true)]
    pub linux_only: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LinuxResults {
    /// `direct` or `carrier`.
    pub placement: String,
    pub kernel: String,
    pub memory_mib: u64,
    /// What agents boot: `elf` (the image's unpacked kernel) or `bzimage`.
    pub agentos_kernel: String,
    pub agentos: LinuxAgentos,
    /// The same agent booting the bzImage, where agents boot the ELF.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agentos_bzimage: Option<LinuxAgentos>,
    /// QEMU's microvm machine booting the bzImage.
    pub qemu_microvm: FirstLine,
    /// With `--firecracker`: Firecracker booting the ELF kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firecracker: Option<FirstLine>,
    /// agentos / QEMU, medians of the time to the guest agent's first line.
    pub ratio: f64,
    /// agentos / Firecracker, the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firecracker_ratio: Option<f64>,
    /// agentos (as agents boot) / agentos booting the bzImage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bzimage_ratio: Option<f64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LinuxAgentos {
    pub to_init_ms: Stats,
    pub to_hello_ms: Stats,
    pub to_exit_ms: Stats,
}

impl LinuxAgentos {
    fn of(boots: &[LinuxBoot]) -> Self {
        let stats = |f: fn(&LinuxBoot) -> f64| Stats::of(&boots.iter().map(f).collect::<Vec<_>>());
        Self {
            to_init_ms: stats(|b| b.to_init_ms),
            to_hello_ms: stats(|b| b.to_hello_ms),
            to_exit_ms: stats(|b| b.to_exit_ms),
        }
    }
}

/// A VMM timed to the guest agent's first console line only.
#[derive(Debug, Serialize, Deserialize)]
pub struct FirstLine {
    pub to_init_ms: Stats,
}

#[derive(Debug, Serialize)]
pub struct TinyResults {
    pub agentos: TinyVmm,
    pub qemu_microvm: TinyVmm,
    /// agentos / QEMU.
    pub first_byte_ratio: f64,
    pub max_rss_ratio: f64,
}

#[derive(Debug, Serialize)]
pub struct TinyVmm {
    pub first_byte_ms: Stats,
    pub max_rss_kib: Stats,
}

#[derive(Debug, Serialize)]
struct BootResults {
    runs: u32,
    linux: LinuxResults,
    tiny: Option<TinyResults>,
    /// agentos / QEMU microvm, Linux boot to the guest agent's first line (medians).
    ratio: f64,
}

pub fn run(args: &BootBenchArgs) -> anyhow::Result<i32> {
    let firecracker = args
        .firecracker
        .as_deref()
        .map(|path| {
            path.canonicalize()
                .ok()
                .filter(|p| p.is_file())
                .with_context(|| format!("--firecracker {}: no such file", path.display()))
        })
        .transpose()?;
    if args.linux_only {
        let linux = linux_bench(args.runs, args.memory, "direct", firecracker.as_deref())?;
        println!("{}", serde_json::to_string(&linux)?);
        return Ok(0);
    }
    let tiny = if Path::new("/dev/kvm").exists() {
        Some(tiny_bench(args.runs)?)
    } else {
        eprintln!("agentos bench: no /dev/kvm here; skipping the tiny-guest comparison");
        None
    };
    let linux = if placement::decide(args.carrier)? == Placement::Carrier {
        linux_bench_in_carrier(args, firecracker.as_deref())?
    } else {
        linux_bench(args.runs, args.memory, "direct", firecracker.as_deref())?
    };
    let results = BootResults {
        runs: args.runs,
        ratio: linux.ratio,
        linux,
        tiny,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        print_table(&results);
    }
    Ok(0)
}

fn print_table(r: &BootResults) {
    let row = |name: &str, s: &Stats, unit: &str| {
        println!(
            "  {name:<34} median {:>9.1} {unit}  (min {:.1}, max {:.1})",
            s.median, s.min, s.max
        );
    };
    let l = &r.linux;
    println!(
        "Linux guest ({}, {} MiB, kernel {}), {} runs each:",
        l.placement, l.memory_mib, l.kernel, r.runs
    );
    let a = &l.agentos;
    row("agentos: spawn to agent's first line", &a.to_init_ms, "ms");
    row("agentos: spawn to agent's hello", &a.to_hello_ms, "ms");
    row("agentos: spawn to VMM exit", &a.to_exit_ms, "ms");
    println!("  (agentos booted the {} kernel)", l.agentos_kernel);
    if let Some(b) = &l.agentos_bzimage {
        row("agentos, bzImage: to first line", &b.to_init_ms, "ms");
    }
    let q = &l.qemu_microvm.to_init_ms;
    row("QEMU microvm, bzImage: to first line", q, "ms");
    if let Some(f) = &l.firecracker {
        row("Firecracker, ELF: to first line", &f.to_init_ms, "ms");
    }
    println!("  ratio agentos/QEMU: {}", l.ratio);
    if let Some(r) = l.firecracker_ratio {
        println!("  ratio agentos/Firecracker: {r}");
    }
    if let Some(r) = l.bzimage_ratio {
        println!("  ratio agentos ELF/bzImage: {r}");
    }
    if let Some(t) = &r.tiny {
        println!("Tiny guest, directly on this host's KVM:");
        row(
            "agentos: spawn to first byte",
            &t.agentos.first_byte_ms,
            "ms",
        );
        row(
            "QEMU microvm: spawn to first byte",
            &t.qemu_microvm.first_byte_ms,
            "ms",
        );
        row("agentos: peak RSS", &t.agentos.max_rss_kib, "KiB");
        row("QEMU microvm: peak RSS", &t.qemu_microvm.max_rss_kib, "KiB");
        println!(
            "  ratios agentos/QEMU: first byte {}, peak RSS {}",
            t.first_byte_ratio, t.max_rss_ratio
        );
    }
}

/// Runs the Linux part inside a carrier, with QEMU and its firmware copied in too.
fn linux_bench_in_carrier(
    args: &BootBenchArgs,
    firecracker: Option<&Path>,
) -> anyhow::Result<LinuxResults> {
    let qemu_bin = qemu::which(qemu::QEMU)
        .with_context(|| format!("{} is not installed: {}", qemu::QEMU, qemu::INSTALL_HINT))?;
    let mut files = vec![qemu_bin];
    files.extend(QEMU_DATA.iter().map(PathBuf::from).filter(|p| p.is_file()));
    files.extend(carrier::agent_image_files());
    let mut argv = vec![
        std::env::current_exe()?.display().to_string(),
        "bench".into(),
        "boot".into(),
        "--linux-only".into(),
        "--runs".into(),
        args.runs.to_string(),
        "--memory".into(),
        args.memory.to_string(),
    ];
    if let Some(fc) = firecracker {
        files.push(fc.to_path_buf());
        argv.extend(["--firecracker".into(), fc.display().to_string()]);
    }
    let spec = CarrierRun {
        argv,
        env: Default::default(),
        files,
        memory_mib: 4096,
        cpus: carrier::DEFAULT_CPUS,
        console: false,
        pci_test_device: false,
    };
    let mut linux: LinuxResults = super::results_from_carrier(&spec)?;
    linux.placement = "carrier".into();
    Ok(linux)
}

/// The boots each Linux run makes.
#[derive(Clone, Copy)]
enum Kind {
    Agentos,
    AgentosBzImage,
    Qemu,
    Firecracker,
}

fn linux_bench(
    runs: u32,
    memory_mib: u64,
    placement: &str,
    firecracker: Option<&Path>,
) -> anyhow::Result<LinuxResults> {
    let cache = image::default_cache_dir();
    let img = image::find_image(&cache, AGENT_IMAGE)?;
    qemu::which(qemu::QEMU)
        .with_context(|| format!("{} is not installed: {}", qemu::QEMU, qemu::INSTALL_HINT))?;
    let dir = RunDir::create("bench-linux")?;
    let kernel = img.boot_kernel();
    let elf = img.vmlinux.is_some();
    // Firecracker's kernel: the image's ELF, else one unpacked here.
    let firecracker = match firecracker {
        Some(binary) => Some((binary, elf_kernel(&img, &dir)?)),
        None => None,
    };
    let (mut agentos, mut bzimage, mut qemu, mut fc) = (vec![], vec![], vec![], vec![]);
    let mut kinds = vec![Kind::Agentos, Kind::Qemu];
    if elf {
        kinds.insert(1, Kind::AgentosBzImage);
    }
    if firecracker.is_some() {
        kinds.push(Kind::Firecracker);
    }
    // A boot inherits what the one before it left in the carrier: a boot right after QEMU's was
    // seen to be faster by a third, for any VMM. Each run therefore takes the next order of a
    // balanced design, so that every VMM follows every other equally often.
    let orders = balanced_orders(kinds.len());
    for i in 0..runs {
        let run = i + 1;
        let mut line = Vec::new();
        for kind in orders[i as usize % orders.len()].iter().map(|&k| &kinds[k]) {
            match kind {
                Kind::Agentos => {
                    let a = agentos_linux_boot(kernel, &img.initrd, memory_mib)
                        .with_context(|| format!("agentos boot {run}"))?;
                    line.push(format!("agentos {:.0} ms", a.to_init_ms));
                    agentos.push(a);
                }
                Kind::AgentosBzImage => {
                    let b = agentos_linux_boot(&img.vmlinuz, &img.initrd, memory_mib)
                        .with_context(|| format!("agentos bzImage boot {run}"))?;
                    line.push(format!("agentos (bzImage) {:.0} ms", b.to_init_ms));
                    bzimage.push(b);
                }
                Kind::Qemu => {
                    let q = qemu_linux_boot(&img.vmlinuz, &img.initrd, memory_mib)
                        .with_context(|| format!("QEMU boot {run}"))?;
                    line.push(format!("QEMU {q:.0} ms"));
                    qemu.push(q);
                }
                Kind::Firecracker => {
                    if let Some((binary, vmlinux)) = &firecracker {
                        let f =
                            firecracker_linux_boot(binary, &dir, vmlinux, &img.initrd, memory_mib)
                                .with_context(|| format!("Firecracker boot {run}"))?;
                        line.push(format!("Firecracker {f:.0} ms"));
                        fc.push(f);
                    }
                }
            }
        }
        eprintln!(
            "agentos bench: run {run}/{runs}: {} to the agent's first line",
            line.join(", ")
        );
    }
    let agentos = LinuxAgentos::of(&agentos);
    let bzimage = elf.then(|| LinuxAgentos::of(&bzimage));
    let qemu = FirstLine {
        to_init_ms: Stats::of(&qemu),
    };
    let firecracker = firecracker.map(|_| FirstLine {
        to_init_ms: Stats::of(&fc),
    });
    let median = agentos.to_init_ms.median;
    Ok(LinuxResults {
        placement: placement.into(),
        kernel: img.manifest.kernel.release.clone(),
        memory_mib,
        agentos_kernel: if elf { "elf" } else { "bzimage" }.into(),
        ratio: ratio(median, qemu.to_init_ms.median),
        firecracker_ratio: firecracker
            .as_ref()
            .map(|f| ratio(median, f.to_init_ms.median)),
        bzimage_ratio: bzimage.as_ref().map(|b| ratio(median, b.to_init_ms.median)),
        agentos,
        agentos_bzimage: bzimage,
        qemu_microvm: qemu,
        firecracker,
    })
}

/// Orders of `n` things in which each one directly follows each other one equally often
/// (Williams' design: a Latin square whose first row is 0, 1, n-1, 2, n-2, ..., each next row
/// that one plus one, modulo n; for an odd n, the rows reversed as well).
fn balanced_orders(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return Vec::new();
    }
    let first: Vec<usize> = (0..n)
        .map(|j| {
            if j % 2 == 1 {
                j.div_ceil(2)
            } else {
                (n - j / 2) % n
            }
        })
        .collect();
    let mut orders: Vec<Vec<usize>> = (0..n)
        .map(|row| first.iter().map(|&k| (k + row) % n).collect())
        .collect();
    if n % 2 == 1 {
        let reversed: Vec<Vec<usize>> = orders
            .iter()
            .map(|o| o.iter().rev().copied().collect())
            .collect();
        orders.extend(reversed);
    }
    orders
}

/// The image's ELF kernel, or one unpacked from its bzImage into `dir`.
fn elf_kernel(img: &image::BuiltImage, dir: &RunDir) -> anyhow::Result<PathBuf> {
    if let Some(path) = &img.vmlinux {
        return Ok(path.clone());
    }
    let path = dir.join("vmlinux");
    vmlinux::unpack_file(&img.vmlinuz, &path)?;
    Ok(path)
}

struct LinuxBoot {
    to_init_ms: f64,
    to_hello_ms: f64,
    to_exit_ms: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Watches a console stream on a thread and reports when `marker` shows up in it.
fn watch_console(
    stream: impl Read + Send + 'static,
    marker: &'static str,
) -> mpsc::Receiver<Instant> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            if String::from_utf8_lossy(&line).contains(marker) {
                let _ = tx.send(Instant::now());
            }
            line.clear();
        }
    });
    rx
}

fn agentos_linux_boot(kernel: &Path, initrd: &Path, memory_mib: u64) -> anyhow::Result<LinuxBoot> {
    let run_dir = RunDir::create("bench")?;
    // As `agentos run` boots an agent: the VMM's own directory, for a user of its own.
    let vmm_dir = run_dir.vmm_dir(JailLevel::for_this_process(false) == JailLevel::Full)?;
    let control = vmm_dir.listen(&format!("vsock.sock_{AGENT_CONTROL_PORT}"))?;
    control.set_nonblocking(true)?;
    let ids: Vec<String> = vmm_dir
        .id()
        .map(|id| {
            [
                "--uid".into(),
                id.to_string(),
                "--gid".into(),
                id.to_string(),
            ]
        })
        .into_iter()
        .flatten()
        .collect();
    let start = Instant::now();
    let mut child = Command::new(agentos_core::agent::vm::vmm_binary()?)
        .args(&ids)
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args([
            "--memory",
            &memory_mib.to_string(),
            "--cmdline",
            AGENT_CMDLINE,
            "--console",
        ])
        .arg("--vsock-uds")
        .arg(vmm_dir.join("vsock.sock"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let guard = KillOnDrop(&mut child);
    let marker = watch_console(
        guard.0.stdout.take().context("no console pipe")?,
        BOOT_MARKER,
    );
    let mut conn = match first_hello(&control, guard.0, start + LINUX_TIMEOUT, None) {
        Ok(handshake) => handshake?,
        Err(why) => bail!("the guest agent did not dial the host: {}", describe(&why)),
    };
    let to_hello = start.elapsed();
    let to_init = marker
        .recv_timeout(Duration::from_secs(5))
        .context("the guest agent's first line never came")?
        .duration_since(start);
    conn.shutdown()?;
    let status = guard.0.wait()?;
    let to_exit = start.elapsed();
    drop(guard);
    if !status.success() {
        bail!("the VMM exited with {status}");
    }
    Ok(LinuxBoot {
        to_init_ms: ms(to_init),
        to_hello_ms: ms(to_hello),
        to_exit_ms: ms(to_exit),
    })
}

fn describe(why: &ChildWait) -> String {
    why.describe(LINUX_TIMEOUT)
}

/// qboot, QEMU's minimal firmware for microvm, where installed: it starts a guest in tens of
/// milliseconds where the default (SeaBIOS's microvm build in QEMU 10) takes seconds here.
const QBOOT: &str = "/usr/share/qemu/qboot.rom";

fn microvm_firmware() -> Vec<String> {
    if Path::new(QBOOT).is_file() {
        vec!["-bios".into(), QBOOT.into()]
    } else {
        Vec::new()
    }
}

fn qemu_linux_boot(kernel: &Path, initrd: &Path, memory_mib: u64) -> anyhow::Result<f64> {
    let mut cmd = qemu::command();
    cmd.args(["-machine", "microvm", "-accel", "kvm", "-cpu", "host"])
        .args(microvm_firmware())
        .args(["-m", &memory_mib.to_string(), "-smp", "1"])
        .args(["-serial", "stdio", "-kernel"])
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", AGENT_CMDLINE]);
    time_to_first_line(cmd, "QEMU")
}

/// Spawns a VMM whose console is its stdout and returns the time to the guest agent's first
/// line; the VMM is killed then (or when the line never comes).
fn time_to_first_line(mut cmd: Command, vmm: &str) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {vmm} ({:?})", cmd.get_program()))?;
    let guard = KillOnDrop(&mut child);
    let marker = watch_console(
        guard.0.stdout.take().context("no console pipe")?,
        BOOT_MARKER,
    );
    let at = marker
        .recv_timeout(LINUX_TIMEOUT)
        .with_context(|| format!("{vmm}'s guest never printed the agent's first line"))?;
    Ok(ms(at.duration_since(start)))
}

/// Boots `kernel` (an ELF) under Firecracker, configured from a file (no API socket), and
/// returns the time from spawn to the guest agent's first line. The agent then waits for a host
/// that is not there, so Firecracker is killed.
fn firecracker_linux_boot(
    firecracker: &Path,
    dir: &RunDir,
    kernel: &Path,
    initrd: &Path,
    memory_mib: u64,
) -> anyhow::Result<f64> {
    let config = dir.join("firecracker.json");
    // The devices agentos gives the guest: a vsock device (whose probe is part of the boot).
    let vsock = dir.join("firecracker-vsock.sock");
    match std::fs::remove_file(&vsock) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    let json = serde_json::json!({
        "boot-source": {
            "kernel_image_path": kernel,
            "initrd_path": initrd,
            "boot_args": AGENT_CMDLINE,
        },
        "drives": [],
        "machine-config": { "vcpu_count": 1, "mem_size_mib": memory_mib },
        "vsock": { "guest_cid": 3, "uds_path": vsock },
    });
    std::fs::write(&config, serde_json::to_vec(&json)?)?;
    let mut cmd = Command::new(firecracker);
    cmd.args(["--no-api", "--level", "Error", "--config-file"])
        .arg(&config);
    time_to_first_line(cmd, "Firecracker")
}

/// Kills a child that is still running when the measurement is abandoned or done.
struct KillOnDrop<'a>(&'a mut Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tiny_bench(runs: u32) -> anyhow::Result<TinyResults> {
    let run_dir = RunDir::create("bench-tiny")?;
    let elf = run_dir.join("tiny.elf");
    std::fs::write(&elf, agentos_tiny_guest::TINY_GUEST_ELF)?;
    let vmm = agentos_core::agent::vm::vmm_binary()?;
    let report = run_dir.join("report.json");
    let (mut a_byte, mut a_rss, mut q_byte, mut q_rss) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let mut cmd = Command::new(&vmm);
        cmd.arg("--kernel")
            .arg(&elf)
            .args(["--memory", &TINY_MEMORY_MIB.to_string(), "--console"])
            .arg("--report")
            .arg(&report);
        let (byte, _) = first_byte(cmd, false)?;
        a_byte.push(byte);
        // What the VMM process itself held: the peak `wait4` reports for a child also counts
        // the memory of this process, which its `exec` replaced.
        let text = std::fs::read_to_string(&report).context("the VMM wrote no report")?;
        let written: agentos_vmm_process::VmmReport =
            serde_json::from_str(&text).context("the VMM's report is not JSON")?;
        a_rss.push(
            written
                .peak_rss_kib
                .context("the VMM's report has no peak memory")? as f64,
        );
        let mut cmd = qemu::command();
        cmd.args(["-machine", "microvm", "-accel", "kvm"])
            .args(microvm_firmware())
            .args(["-m", &TINY_MEMORY_MIB.to_string()])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .args(["-serial", "stdio", "-kernel"])
            .arg(&elf);
        let (byte, rss) = first_byte(cmd, true)?;
        q_byte.push(byte);
        q_rss.push(rss);
    }
    let agentos = TinyVmm {
        first_byte_ms: Stats::of(&a_byte),
        max_rss_kib: Stats::of(&a_rss),
    };
    let qemu = TinyVmm {
        first_byte_ms: Stats::of(&q_byte),
        max_rss_kib: Stats::of(&q_rss),
    };
    Ok(TinyResults {
        first_byte_ratio: ratio(agentos.first_byte_ms.median, qemu.first_byte_ms.median),
        max_rss_ratio: ratio(agentos.max_rss_kib.median, qemu.max_rss_kib.median),
        agentos,
        qemu_microvm: qemu,
    })
}

/// Spawns a VMM with the tiny guest, times its first console byte, lets it print the banner,
/// then ends it (`kill`: QEMU's microvm machine has no i8042 to reset through) and returns the
/// time and its peak resident memory: read just before the kill, or else as `wait4` reports it
/// (which also counts this process's memory, that the child's `exec` replaced).
fn first_byte(mut cmd: Command, kill: bool) -> anyhow::Result<(f64, f64)> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    let mut out = child.stdout.take().context("no console pipe")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        if out.read_exact(&mut byte).is_ok() {
            let _ = tx.send(Instant::now());
        }
        let mut rest = Vec::new();
        let _ = out.read_to_end(&mut rest);
    });
    let at = match rx.recv_timeout(TINY_TIMEOUT) {
        Ok(at) => at,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{:?} printed nothing", cmd.get_program());
        }
    };
    if kill {
        // Let it finish the banner before it is measured and stopped.
        std::thread::sleep(Duration::from_millis(20));
        let peak = peak_of(child.id());
        let _ = child.kill();
        wait_rusage(&mut child)?;
        return Ok((
            ms(at.duration_since(start)),
            peak.context("cannot read the VMM's peak memory")?,
        ));
    }
    let rss = wait_rusage(&mut child)?;
    Ok((ms(at.duration_since(start)), rss))
}

/// The peak resident set of the live process `pid` in KiB (`VmHWM`: its own memory since its
/// `exec`, unlike `wait4`'s, which also counts the memory the process had before).
fn peak_of(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Reaps `child` and returns its peak resident set in KiB.
fn wait_rusage(child: &mut Child) -> anyhow::Result<f64> {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data; zeroed is valid and wait4 fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let deadline = Instant::now() + TINY_TIMEOUT;
    loop {
        // SAFETY: `status` and `usage` are valid out pointers; `pid` is our own child.
        let rc = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if rc == pid {
            return Ok(usage.ru_maxrss as f64);
        }
        if rc < 0 {
            bail!(
                "cannot wait for the VMM: {}",
                std::io::Error::last_os_error()
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_vmm_follows_every_other_equally_often() {
        for n in 1..=5 {
            let orders = balanced_orders(n);
            let mut follows = std::collections::HashMap::new();
            for order in &orders {
                let mut sorted = order.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "{n}: {order:?}");
                for pair in order.windows(2) {
                    *follows.entry((pair[0], pair[1])).or_insert(0) += 1;
                }
            }
            let counts: std::collections::HashSet<_> = follows.values().collect();
            assert_eq!(follows.len(), n * (n - 1), "{n}: {orders:?}");
            assert!(counts.len() <= 1, "{n}: {follows:?}");
        }
        assert_eq!(balanced_orders(4)[0], vec![0, 1, 3, 2]);
    }

    #[test]
    fn stats_take_the_middle_of_sorted_values() {
        let s = Stats::of(&[5.0, 1.0, 3.0]);
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 5.0));
        assert_eq!(Stats::of(&[4.0, 1.0, 3.0, 2.0]).median, 2.5);
        assert_eq!(Stats::of(&[]).median, 0.0);
    }

    #[test]
    fn ratios_are_rounded_and_safe_against_zero() {
        assert_eq!(ratio(1.0, 3.0), 0.333);
        assert_eq!(ratio(1.0, 0.0), 0.0);
    }
}
