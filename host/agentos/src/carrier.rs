//! The QEMU carrier: a software-emulated VM (TCG, with AMD SVM emulated) whose own KVM can boot
//! Linux, for hosts whose KVM cannot (PVM sandboxes, CI runners without nested virtualisation).
//!
//! The carrier boots the carrier image (Debian's kernel, the KVM modules, our guest agent as PID 1
//! speaking the agentos protocol over a virtio-serial port). Files the command needs (the agentos
//! binary, the guest images, test binaries, with their shared libraries) are appended to its
//! initramfs at their own absolute paths, so the command runs inside with the same paths as here.
//! Nothing of the host is shared with the carrier but those copies and the control socket, and,
//! for a carrier that serves (see [`Forward`]), one TCP port of the host's loopback forwarded in.

use std::collections::BTreeMap;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use agentos_protocol::{CARRIER_PORT_NAME, ExecRequest, ExitStatus, Program};

use crate::qemu;
use agentos_core::agent::connection::{AgentConnection, ConnectionError, ExecIo, Keepalive};
use agentos_core::agent::vm::{ChildWait, VmError, first_hello};
use agentos_core::rundir::{RunDir, RunDirError};
use agentos_core::signals;
use agentos_image::cpio::{CpioError, CpioTree};
use agentos_image::{self as image, CARRIER_IMAGE, ImageError};

/// Set in the environment of commands run inside a carrier: they run VMs directly.
pub const IN_CARRIER_ENV: &str = "AGENTOS_IN_CARRIER";
/// Where to put the carrier's QEMU monitor socket (debugging aid; off by default).
const MONITOR_ENV: &str = "AGENTOS_CARRIER_MONITOR";
/// A carrier's memory unless a command asks for more.
pub const DEFAULT_MEMORY_MIB: u64 = 4096;
/// One vCPU, emulated on one host thread. With two (QEMU's multi-threaded TCG), the carrier's
/// kernel crashed twice in about 70 nested boots (eight VMs at a time), and booting guests
/// triple-faulted twice; with one, 41 boots under the same load went through without a fault.
/// A single boot is as fast either way; only VMs booting side by side share the one CPU.
pub const DEFAULT_CPUS: u8 = 1;
/// Where the carrier's guest agent mounts a tmpfs of its own.
const CARRIER_TMP: &str = "/tmp";
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// The carrier's guest agent answers pings from a thread of its own, even when the command it runs
/// is busy or silent; no answer for this long means the carrier itself stopped.
const CARRIER_KEEPALIVE: Keepalive = Keepalive {
    interval: Duration::from_secs(10),
    limit: Duration::from_secs(60),
};
/// Exit status of `agentos carrier` when the carrier stopped responding and was killed: a
/// temporary failure (EX_TEMPFAIL); running the command again usually works.
pub const EXIT_CARRIER_STALLED: i32 = 75;
/// How often a carrier is looked at while it may be ending.
const EXIT_POLL: Duration = Duration::from_millis(50);
/// Combined initramfs files kept in the cache (one per distinct payload).
const KEEP_COMBINED: usize = 4;

/// The carrier's kernel command line. `idle=poll` keeps its idle CPU spinning instead of halting:
/// with eight VMs booting at once, a halted carrier CPU (QEMU 7.2 and 10 alike) was seen to stay
/// halted for good, interrupts enabled and a timer interrupt pending in its local APIC, not woken
/// even by an NMI. Spinning costs one host core while the carrier runs.
const CARRIER_CMDLINE: &str = "console=ttyS0 panic=-1 quiet idle=poll";
/// QEMU's own seccomp filter: no obsolete system calls, no new processes, no changes to CPU
/// affinity or scheduling. Started by root, QEMU then becomes [`CARRIER_ID`] (`-run-with`), so
/// it may change ids once; started by anyone else it may not at all.
const CARRIER_SANDBOX: &str = "on,obsolete=deny,spawn=deny,resourcecontrol=deny";
const CARRIER_SANDBOX_UNPRIVILEGED: &str =
    "on,obsolete=deny,spawn=deny,resourcecontrol=deny,elevateprivileges=deny";
/// The user and group QEMU runs as once it has opened its files, when root starts it: `nobody`,
/// which owns nothing (the change of ids leaves the process not dumpable, so other processes of
/// that user cannot trace it).
const CARRIER_ID: u32 = 65534;
/// Everything QEMU can emulate (SVM with nested paging included) but the virtual GIF, so that the
/// carrier's KVM gates interrupts with plain CLGI/STGI. This alone did not prevent the halt
/// above; the combination with `idle=poll` is what the VM test suite runs on.
const CARRIER_CPU: &str = "max,vgif=off";

/// The carrier's PCI test devices: Intel's IOMMU emulated with interrupt remapping (which the
/// split irqchip allows) and `caching-mode`, which makes QEMU see every mapping its guest's
/// VFIO sets up, and behind it, each in an IOMMU group of its own, QEMU's `edu` device
/// (1234:11e8: registers, a DMA engine, MSI), its `bochs-display` (1234:1111, PCI class
/// display: what `--gpu` takes) with an expansion ROM (`rom`, see [`test_rom`]), as a GPU's
/// VBIOS, an `ivshmem-plain` (1af4:1110) whose 512 MiB of memory is a 64-bit prefetchable BAR,
/// as a GPU's is, an `igb` network function (8086:10c9, not connected) for its MSI-X, which a
/// GPU's driver uses, and, behind a PCI bridge, a second edu whose IOMMU group is not viable.
/// Enough to pass a device to an agent exactly as a GPU on a host with an IOMMU, and to test
/// it.
pub fn pci_test_device_args(rom: &Path) -> Vec<String> {
    [
        "-device",
        "intel-iommu,intremap=on,caching-mode=on",
        "-device",
        "edu",
        "-device",
        &format!("bochs-display,romfile={}", rom.display()),
        "-object",
        "memory-backend-ram,id=pci-test-memory,size=512M,share=on",
        "-device",
        "ivshmem-plain,memdev=pci-test-memory",
        "-device",
        "igb",
        // Behind a conventional PCI bridge, whose devices share an IOMMU group: a second edu
        // with a sibling the carrier's virtio-pci driver takes, a group no VM can have.
        "-device",
        "pci-bridge,id=pci-test-bridge,chassis_nr=1",
        "-device",
        "edu,bus=pci-test-bridge,addr=1",
        "-device",
        "virtio-rng-pci,bus=pci-test-bridge,addr=2",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// What the test display device's expansion ROM says after its header, for tests to find.
pub const TEST_ROM_MARKER: &str = "agentos test ROM";
/// The test ROM's size: 4 KiB, eight 512-byte units.
const TEST_ROM_BYTES: usize = 4096;

/// A PCI option ROM image as firmware expects one (and Linux checks before it shows the ROM):
/// the 0x55 0xAA signature and size, a PCI data structure (`PCIR`) with the display device's
/// ids and class, marked the last image and as EFI code (so that the carrier's BIOS, which runs
/// the x86 ROMs of display devices at boot, leaves it alone; its entry point returns at once
/// all the same), then [`TEST_ROM_MARKER`], and a checksum byte that makes the bytes sum to
/// zero.
pub fn test_rom() -> Vec<u8> {
    let mut rom = vec![0u8; TEST_ROM_BYTES];
    let units = (TEST_ROM_BYTES / 512) as u16;
    rom[0] = 0x55;
    rom[1] = 0xaa;
    rom[2] = units as u8;
    // The entry point: a far return.
    rom[3] = 0xcb;
    let pcir = 0x1c;
    rom[0x18..0x1a].copy_from_slice(&(pcir as u16).to_le_bytes());
    let (vendor, device) = PCI_TEST_DISPLAY_IDS;
    rom[pcir..pcir + 4].copy_from_slice(b"PCIR");
    rom[pcir + 4..pcir + 6].copy_from_slice(&vendor.to_le_bytes());
    rom[pcir + 6..pcir + 8].copy_from_slice(&device.to_le_bytes());
    rom[pcir + 0xa..pcir + 0xc].copy_from_slice(&0x18u16.to_le_bytes());
    // Class code, low byte first: display, other (0x038000).
    rom[pcir + 0xd..pcir + 0x10].copy_from_slice(&[0x00, 0x80, 0x03]);
    rom[pcir + 0x10..pcir + 0x12].copy_from_slice(&units.to_le_bytes());
    // Code type 3 (EFI), the last image.
    rom[pcir + 0x14] = 0x03;
    rom[pcir + 0x15] = 0x80;
    rom[0x100..0x100 + TEST_ROM_MARKER.len()].copy_from_slice(TEST_ROM_MARKER.as_bytes());
    let sum = rom.iter().fold(0u8, |sum, b| sum.wrapping_add(*b));
    rom[TEST_ROM_BYTES - 1] = 0u8.wrapping_sub(sum);
    rom
}
/// The carrier kernel's part: the IOMMU on, host devices (the carrier's own virtio ones) kept on
/// identity mappings.
const PCI_TEST_CMDLINE: &str = "intel_iommu=on iommu=pt";
/// The test device's vendor and device ids.
pub const PCI_TEST_DEVICE_IDS: (u16, u16) = (0x1234, 0x11e8);
/// The test display device's (`bochs-display`).
pub const PCI_TEST_DISPLAY_IDS: (u16, u16) = (0x1234, 0x1111);
/// The test device with a 64-bit BAR (`ivshmem-plain`).
pub const PCI_TEST_WIDE_BAR_IDS: (u16, u16) = (0x1af4, 0x1110);
/// The test device with MSI-X (`igb`).
pub const PCI_TEST_MSIX_IDS: (u16, u16) = (0x8086, 0x10c9);

/// Why a carrier did not run a command.
#[derive(Debug, thiserror::Error)]
pub enum CarrierError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{} does not run: {}", qemu::QEMU, qemu::INSTALL_HINT)]
    NoQemu,
    #[error("cannot find the agentos binary")]
    NoExe(#[source] io::Error),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(
        "cannot copy {} into the carrier: it mounts a fresh tmpfs on {CARRIER_TMP}, which would hide it; move it elsewhere",
        .0.display()
    )]
    UnderTmp(PathBuf),
    #[error("cannot copy {} into the carrier: no such file", .0.display())]
    NoFile(PathBuf),
    #[error("cannot read {}", .0.display())]
    Read(PathBuf, #[source] io::Error),
    #[error("cannot create {}", .0.display())]
    Create(PathBuf, #[source] io::Error),
    #[error("cannot add {} to the carrier", .0.display())]
    Add(PathBuf, #[source] CpioError),
    #[error("cannot write the carrier's initramfs")]
    Initramfs(#[source] io::Error),
    #[error("cannot create the carrier's run directory")]
    RunDir(#[from] RunDirError),
    #[error("cannot listen for the carrier")]
    Listen(#[source] io::Error),
    #[error("cannot start {}", qemu::QEMU)]
    Spawn(#[source] io::Error),
    #[error("cannot forward {0} to the carrier: another process took that port")]
    PortTaken(SocketAddrV4),
    #[error("the carrier did not come up ({0})")]
    NotUp(String),
    #[error("the carrier's guest agent did not answer")]
    Handshake(#[source] ConnectionError),
    #[error("the command in the carrier did not complete{console}")]
    Command {
        console: String,
        #[source]
        source: ConnectionError,
    },
}

/// Runs this very command line again inside a carrier, with the agent image and `files` copied
/// in, and returns its exit status.
pub fn rerun_inside(mut files: Vec<PathBuf>) -> Result<i32, CarrierError> {
    let argv: Vec<String> = std::env::args().collect();
    files.extend(agent_image_files());
    let spec = CarrierRun {
        argv,
        env: BTreeMap::new(),
        files,
        memory_mib: DEFAULT_MEMORY_MIB,
        cpus: DEFAULT_CPUS,
        console: false,
        pci_test_device: false,
    };
    Ok(run(&spec, &mut io::stdout().lock())?.shell_code())
}

/// The agent image's files, when it is built (commands inside report it missing otherwise).
pub fn agent_image_files() -> Vec<PathBuf> {
    let cache = image::default_cache_dir();
    match image::find_image(&cache, image::AGENT_IMAGE) {
        Ok(img) => [Some(img.vmlinuz), img.vmlinux, Some(img.initrd)]
            .into_iter()
            .flatten()
            .chain([img.dir.join("manifest.json")])
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// A command to run in a fresh carrier.
pub struct CarrierRun {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Host files to copy in (the agentos and agentos-vmm binaries always come along).
    pub files: Vec<PathBuf>,
    pub memory_mib: u64,
    pub cpus: u8,
    pub console: bool,
    /// Give the carrier an emulated IOMMU and a PCI device to pass to its agents with VFIO
    /// (see [`pci_test_device_args`]).
    pub pci_test_device: bool,
}

/// Boots a carrier, runs `spec.argv` in it with our stdin and stderr and its stdout going to
/// `stdout`, and tears it down.
pub fn run(spec: &CarrierRun, stdout: &mut dyn io::Write) -> Result<ExitStatus, CarrierError> {
    let machine = CarrierMachine {
        files: spec.files.clone(),
        memory_mib: spec.memory_mib,
        cpus: spec.cpus,
        console: spec.console,
        pci_test_device: spec.pci_test_device,
        forward: None,
    };
    let Some((mut carrier, mut conn)) = Carrier::boot(&machine, None)? else {
        return Ok(interrupted_status());
    };
    let request = carrier.request(&spec.argv, &spec.env);
    let stderr = io::stderr();
    let result = conn.exec(
        request,
        ExecIo {
            stdin: Some(Box::new(io::stdin())),
            stdout,
            stderr: &mut stderr.lock(),
        },
    );
    carrier.stop();
    match result {
        Ok(status) => Ok(status),
        Err(_) if signals::interrupted() => Ok(interrupted_status()),
        Err(ConnectionError::Stalled(quiet)) => {
            eprintln!(
                "agentos: the carrier stopped responding (no answer for {} s) and was stopped (QEMU has been seen to stop delivering the carrier's interrupts when many VMs boot at once); run the command again (exit status {EXIT_CARRIER_STALLED}){}",
                quiet.as_secs(),
                carrier.console_tail()
            );
            Ok(ExitStatus {
                code: Some(EXIT_CARRIER_STALLED),
                ..Default::default()
            })
        }
        Err(source) => Err(CarrierError::Command {
            console: carrier.console_tail(),
            source,
        }),
    }
}

/// A port of the carrier reachable from the host: QEMU listens on `host` and forwards each
/// connection to `guest_port` of the carrier's network card (at [`CARRIER_ADDRESS`]), on a
/// user-mode network that lets nothing out of the carrier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forward {
    pub host: SocketAddrV4,
    pub guest_port: u16,
}

/// The carrier's address on its user-mode network (QEMU's default for its guest).
pub const CARRIER_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The prefix length of that network.
pub const CARRIER_PREFIX: u8 = 24;
/// The name the carrier's kernel gives its one network card.
pub const CARRIER_NIC: &str = "eth0";

/// The machine a carrier is: what it carries and how big it is.
pub struct CarrierMachine {
    /// Host files to copy in (the agentos and agentos-vmm binaries always come along).
    pub files: Vec<PathBuf>,
    pub memory_mib: u64,
    pub cpus: u8,
    /// Copy its console to stderr.
    pub console: bool,
    /// See [`CarrierRun::pci_test_device`].
    pub pci_test_device: bool,
    /// A network card with one port forwarded from the host; none without.
    pub forward: Option<Forward>,
}

/// A carrier whose guest agent answered. QEMU is killed when it is dropped (or [`stop`]ped);
/// its run directory (and console log) is removed when it is dropped.
///
/// [`stop`]: Carrier::stop
pub struct Carrier {
    qemu: Qemu,
    run_dir: RunDir,
    cache: PathBuf,
    /// What was copied in; the agentos binary first.
    files: Vec<PathBuf>,
}

impl Carrier {
    /// Boots a carrier and waits for its guest agent's hello: the carrier and its connection,
    /// or None when interrupted (a signal, or `abort` set) first.
    pub fn boot(
        machine: &CarrierMachine,
        abort: Option<&AtomicBool>,
    ) -> Result<Option<(Self, AgentConnection)>, CarrierError> {
        let started = Instant::now();
        let cache = image::default_cache_dir();
        let carrier = image::find_image(&cache, CARRIER_IMAGE)?;
        let qemu_major = which_qemu()?;
        let exe = std::env::current_exe().map_err(CarrierError::NoExe)?;
        let mut files = vec![exe, agentos_core::agent::vm::vmm_binary()?];
        files.extend(machine.files.iter().cloned());
        if let Some(hidden) = files.iter().find(|f| f.starts_with(CARRIER_TMP)) {
            return Err(CarrierError::UnderTmp(hidden.clone()));
        }
        let initrd = combined_initrd(&cache, &carrier.initrd, &files)?;

        let run_dir = RunDir::create("carrier")?;
        let pci_test_rom = if machine.pci_test_device {
            let path = run_dir.join("test-rom.bin");
            std::fs::write(&path, test_rom()).map_err(|e| CarrierError::Create(path.clone(), e))?;
            Some(path)
        } else {
            None
        };
        let control_path = run_dir.join("ctl.sock");
        let control = UnixListener::bind(&control_path)
            .and_then(|l| l.set_nonblocking(true).map(|_| l))
            .map_err(CarrierError::Listen)?;
        let console_log = run_dir.join("console.log");
        let qemu = Qemu::spawn(&QemuConfig {
            qemu_major,
            kernel: &carrier.vmlinuz,
            initrd: &initrd,
            memory_mib: machine.memory_mib,
            cpus: machine.cpus,
            control: &control_path,
            console_log: &console_log,
            console: machine.console,
            pci_test_rom: pci_test_rom.as_deref(),
            forward: machine.forward,
        })?;
        let mut carrier = Self {
            qemu,
            run_dir,
            cache,
            files,
        };
        let deadline = started + BOOT_TIMEOUT;
        let handshake = match first_hello(&control, &mut carrier.qemu.child, deadline, abort) {
            Ok(handshake) => handshake,
            Err(ChildWait::Interrupted) => return Ok(None),
            Err(ChildWait::Exited(_))
                if let Some(forward) = machine.forward
                    && std::net::TcpListener::bind(forward.host).is_err() =>
            {
                return Err(CarrierError::PortTaken(forward.host));
            }
            Err(why) => {
                return Err(CarrierError::NotUp(format!(
                    "{}{}",
                    why.describe(BOOT_TIMEOUT),
                    carrier.console_tail()
                )));
            }
        };
        let mut conn = handshake.map_err(CarrierError::Handshake)?;
        conn.set_keepalive(Some(CARRIER_KEEPALIVE));
        tracing::info!(ms = started.elapsed().as_millis() as u64, "carrier ready");
        Ok(Some((carrier, conn)))
    }

    /// The request that runs `argv` in this carrier with `extra` added to its environment
    /// (see [`carrier_env`]), in our working directory when the carrier has it.
    pub fn request(&self, argv: &[String], extra: &BTreeMap<String, String>) -> ExecRequest {
        let cwd = std::env::current_dir()
            .ok()
            .filter(|d| files_cover(&self.files, d))
            .map(|d| d.display().to_string());
        let (program, args) = argv.split_first().map_or(("", &[][..]), |(p, a)| (p, a));
        ExecRequest {
            run: Program {
                env: carrier_env(&self.cache, extra, &self.files[0]),
                cwd,
                ..Program::new(program).with_args(args)
            },
            ..Default::default()
        }
    }

    /// The agentos binary as the carrier has it.
    pub fn agentos(&self) -> &Path {
        &self.files[0]
    }

    /// How QEMU ended, if it does within `within` (and was not killed by [`Carrier::stop`]).
    pub fn ended_within(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while !self.qemu.ended {
            match self.qemu.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(EXIT_POLL),
                _ => return None,
            }
        }
        None
    }

    /// Kills QEMU and waits for it to end.
    pub fn stop(&mut self) {
        self.qemu.kill();
    }

    /// The last lines of the carrier's console, as a paragraph to append to a message.
    pub fn console_tail(&self) -> String {
        console_tail(&self.run_dir.join("console.log"))
    }
}

fn interrupted_status() -> ExitStatus {
    ExitStatus {
        code: Some(signals::exit_code()),
        ..Default::default()
    }
}

/// Whether `dir` will exist inside the carrier (some file we copy lives under it).
fn files_cover(files: &[PathBuf], dir: &Path) -> bool {
    files.iter().any(|f| f.starts_with(dir))
}

/// The command's environment: ours for agentos itself, `agentos` (`exe`, copied in at its own
/// path) found by name first, plus what the caller asked.
fn carrier_env(
    cache: &Path,
    extra: &BTreeMap<String, String>,
    exe: &Path,
) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| {
            (k.starts_with("AGENTOS_") || k.starts_with("RUST_")) && k != "AGENTOS_RUN_DIR"
        })
        .collect();
    env.insert("AGENTOS_HOME".into(), cache.display().to_string());
    env.insert(IN_CARRIER_ENV.into(), "1".into());
    env.insert("HOME".into(), "/root".into());
    if let Some(dir) = exe.parent() {
        env.insert(
            "PATH".into(),
            format!("{}:{}", dir.display(), image::GUEST_PATH),
        );
    }
    env.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// QEMU's major version (0 when its banner says none), or what to install.
fn which_qemu() -> Result<u32, CarrierError> {
    match qemu::version() {
        Some(line) => Ok(qemu::major_version(&line).unwrap_or(0)),
        None => Err(CarrierError::NoQemu),
    }
}

/// The carrier image's initramfs with `files` (and their shared libraries) appended, cached by
/// the identity of its inputs so that repeated runs reuse it.
fn combined_initrd(cache: &Path, base: &Path, files: &[PathBuf]) -> Result<PathBuf, CarrierError> {
    let mut all = Vec::new();
    for file in files {
        // The path as given, not resolved: a program looks for a symlink by its own name.
        let file = std::path::absolute(file)
            .ok()
            .filter(|f| f.is_file())
            .ok_or_else(|| CarrierError::NoFile(file.clone()))?;
        if let Ok(libs) = image::needed_libraries(&file) {
            all.extend(libs);
        }
        all.push(file);
    }
    all.sort();
    all.dedup();

    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for path in std::iter::once(base).chain(all.iter().map(PathBuf::as_path)) {
        let meta = fs::metadata(path).map_err(|e| CarrierError::Read(path.to_owned(), e))?;
        path.hash(&mut hasher);
        meta.len().hash(&mut hasher);
        meta.modified().ok().hash(&mut hasher);
    }
    let dir = cache.join("carrier");
    fs::create_dir_all(&dir).map_err(|e| CarrierError::Create(dir.clone(), e))?;
    let combined = dir.join(format!("initrd-{:016x}.cpio", hasher.finish()));
    if combined.is_file() {
        return Ok(combined);
    }

    let mut tree = CpioTree::new();
    for path in &all {
        tree.parent_dirs(path)
            .and_then(|()| tree.host_file_at_same_path(path))
            .map_err(|e| CarrierError::Add(path.clone(), e))?;
    }
    let tmp = dir.join(format!(".initrd-{}.tmp", std::process::id()));
    let result = (|| -> io::Result<()> {
        let mut out = io::BufWriter::new(fs::File::create(&tmp)?);
        io::copy(&mut fs::File::open(base)?, &mut out)?;
        let mut out = tree.write(out).map_err(io::Error::other)?;
        io::Write::flush(&mut out)?;
        fs::rename(&tmp, &combined)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(CarrierError::Initramfs(e));
    }
    prune_combined(&dir, &combined);
    Ok(combined)
}

/// Keeps the newest few combined initramfs files.
fn prune_combined(dir: &Path, keep: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p != keep
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("initrd-"))
        })
        .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    found.sort();
    let excess = found.len().saturating_sub(KEEP_COMBINED - 1);
    for (_, path) in found.into_iter().take(excess) {
        let _ = fs::remove_file(path);
    }
}

fn console_tail(path: &Path) -> String {
    let text = agentos_core::log_tail::read_tail(path, 64 * 1024).unwrap_or_default();
    let lines = agentos_core::log_tail::last_lines(&text, 15);
    if lines.is_empty() {
        return String::new();
    }
    format!(
        "\n--- last lines of the carrier console ---\n{}",
        lines.join("\n")
    )
}

struct QemuConfig<'a> {
    /// QEMU's major version: its options for dropping privileges changed.
    qemu_major: u32,
    kernel: &'a Path,
    initrd: &'a Path,
    memory_mib: u64,
    cpus: u8,
    control: &'a Path,
    console_log: &'a Path,
    console: bool,
    /// The PCI test devices, with this file as the display device's ROM.
    pci_test_rom: Option<&'a Path>,
    forward: Option<Forward>,
}

/// A running QEMU, killed when dropped.
struct Qemu {
    child: Child,
    /// Killed and waited for already.
    ended: bool,
}

impl Qemu {
    fn spawn(cfg: &QemuConfig<'_>) -> Result<Self, CarrierError> {
        let serial = if cfg.console {
            "stdio".to_string()
        } else {
            format!("file:{}", cfg.console_log.display())
        };
        let mut cmd = qemu::command();
        let (machine, cmdline) = if cfg.pci_test_rom.is_some() {
            (
                "q35,kernel-irqchip=split",
                format!("{CARRIER_CMDLINE} {PCI_TEST_CMDLINE}"),
            )
        } else {
            ("q35", CARRIER_CMDLINE.to_owned())
        };
        cmd.args([
            "-machine",
            machine,
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            CARRIER_CPU,
        ])
        .args(["-smp", &cfg.cpus.to_string()])
        .args(["-m", &cfg.memory_mib.to_string()])
        .args(["-monitor", &monitor(), "-serial", &serial])
        .arg("-kernel")
        .arg(cfg.kernel)
        .arg("-initrd")
        .arg(cfg.initrd)
        .args(["-append", &cmdline])
        .args(confinement(euid(), cfg.qemu_major))
        .args(
            cfg.pci_test_rom
                .map(pci_test_device_args)
                .unwrap_or_default(),
        )
        .args(cfg.forward.map(network_args).unwrap_or_default())
        .args(["-device", "virtio-serial-pci"])
        .arg("-chardev")
        .arg(format!("socket,id=ctl,path={}", cfg.control.display()))
        .args([
            "-device",
            &format!("virtserialport,chardev=ctl,name={CARRIER_PORT_NAME}"),
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
        if cfg.console {
            cmd.stdout(Stdio::from(io::stderr()));
        } else {
            cmd.stdout(Stdio::null());
        }
        let child = cmd.spawn().map_err(CarrierError::Spawn)?;
        signals::watch_child(child.id());
        Ok(Self {
            child,
            ended: false,
        })
    }
}

/// A virtio network card on QEMU's user-mode network with `forward` its only way in, and no
/// way out (`restrict=on`: no packet of the carrier's leaves, whatever it is addressed to).
fn network_args(forward: Forward) -> Vec<String> {
    vec![
        "-netdev".into(),
        format!(
            "user,id=net,restrict=on,hostfwd=tcp:{}:{}-{CARRIER_ADDRESS}:{}",
            forward.host.ip(),
            forward.host.port(),
            forward.guest_port
        ),
        "-device".into(),
        "virtio-net-pci,netdev=net".into(),
    ]
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// QEMU's own confinement (its seccomp filter, and for root a user without privileges) as
/// arguments for QEMU `major`; see docs/security.md for what the carrier boundary is.
fn confinement(euid: u32, major: u32) -> Vec<String> {
    match euid {
        0 if major >= RUN_WITH_USER_QEMU => vec![
            "-sandbox".into(),
            CARRIER_SANDBOX.into(),
            "-run-with".into(),
            format!("user={CARRIER_ID}:{CARRIER_ID}"),
        ],
        // Older QEMUs take a user name; `nobody` is 65534 everywhere.
        0 => vec![
            "-sandbox".into(),
            CARRIER_SANDBOX.into(),
            "-runas".into(),
            "nobody".into(),
        ],
        _ => vec!["-sandbox".into(), CARRIER_SANDBOX_UNPRIVILEGED.into()],
    }
}

/// The first QEMU with `-run-with user=` (which replaced `-runas`).
const RUN_WITH_USER_QEMU: u32 = 10;

/// QEMU's human monitor: none, or on the Unix socket `AGENTOS_CARRIER_MONITOR` names, to look
/// into a stuck carrier (`info registers`, `info lapic`).
fn monitor() -> String {
    match std::env::var_os(MONITOR_ENV) {
        Some(path) => format!("unix:{},server,nowait", Path::new(&path).display()),
        None => "none".into(),
    }
}

impl Qemu {
    /// Kills QEMU and waits for it (once; later calls do nothing).
    fn kill(&mut self) {
        if self.ended {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        signals::forget_child(self.child.id());
        self.ended = true;
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agentos_is_found_by_name_in_the_carrier() {
        let env = carrier_env(
            Path::new("/cache"),
            &BTreeMap::new(),
            Path::new("/work/x/target/release/agentos"),
        );
        assert_eq!(
            env["PATH"],
            format!("/work/x/target/release:{}", image::GUEST_PATH)
        );
        let asked = BTreeMap::from([("PATH".to_owned(), "/mine".to_owned())]);
        let env = carrier_env(Path::new("/cache"), &asked, Path::new("/a/agentos"));
        assert_eq!(env["PATH"], "/mine", "the caller's own PATH wins");
    }

    #[test]
    fn qemu_is_confined_by_its_filter_and_leaves_root() {
        let root = confinement(0, 10).join(" ");
        assert_eq!(
            root,
            "-sandbox on,obsolete=deny,spawn=deny,resourcecontrol=deny -run-with user=65534:65534"
        );
        assert!(confinement(0, 8).join(" ").ends_with("-runas nobody"));
        let user = confinement(1000, 10).join(" ");
        assert!(user.contains("elevateprivileges=deny"), "{user}");
        assert!(!user.contains("-run-with"), "{user}");
    }

    #[test]
    fn a_forwarded_port_is_the_carriers_only_network_and_nothing_goes_out() {
        let args = network_args(Forward {
            host: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 40001),
            guest_port: 7070,
        });
        assert_eq!(
            args.join(" "),
            "-netdev user,id=net,restrict=on,hostfwd=tcp:127.0.0.1:40001-10.0.2.15:7070 -device virtio-net-pci,netdev=net"
        );
    }

    #[test]
    fn the_test_rom_is_an_option_rom_image_that_sums_to_zero() {
        let rom = test_rom();
        assert_eq!(rom.len(), 4096);
        assert_eq!(&rom[..3], [0x55, 0xaa, 8]);
        let pcir = usize::from(u16::from_le_bytes([rom[0x18], rom[0x19]]));
        assert_eq!(&rom[pcir..pcir + 4], b"PCIR");
        assert_eq!(&rom[pcir + 4..pcir + 8], [0x34, 0x12, 0x11, 0x11]);
        assert_eq!(u16::from_le_bytes([rom[pcir + 0x10], rom[pcir + 0x11]]), 8);
        assert_eq!(rom[pcir + 0x15] & 0x80, 0x80, "the last image");
        assert_eq!(
            rom[pcir + 0x14],
            3,
            "not x86 code, which the BIOS would run"
        );
        assert!(
            rom.windows(TEST_ROM_MARKER.len())
                .any(|w| w == TEST_ROM_MARKER.as_bytes())
        );
        assert_eq!(rom.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        let args = pci_test_device_args(Path::new("/run/x/test-rom.bin")).join(" ");
        assert!(
            args.contains("bochs-display,romfile=/run/x/test-rom.bin"),
            "{args}"
        );
    }
}
