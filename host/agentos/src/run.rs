//! `agentos run`: boot an agent VM, run one program in it with the caller's standard I/O, shut the
//! VM down, and exit with the program's status.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use agentos_protocol::ExecRequest;
use agentos_vmm::config::{MAX_DISKS, MAX_VCPUS};
use agentos_vmm::devices::virtio::block::disk_size;
use agentos_vmm::snapshot::{MEMORY_FILE, STATE_FILE};
use anyhow::{Context, bail};
use serde::Serialize;

use crate::carrier::{self, CarrierChoice};
use crate::daemon::api::{MAX_BOOT_TIMEOUT_S, MAX_TIMEOUT_S};
use agentos_core::agent::connection::{ConnectionError, ExecIo};
use agentos_core::agent::snapshot::{
    AGENT_FILE, check_snapshot_target, model_disks_of, snapshot_shape,
};
use agentos_core::agent::vm::{AgentVm, BootOptions, CpuSlice, DEFAULT_MEMORY_MIB, VmError};
use agentos_core::cgroup::PriorityClass;
use agentos_core::signals;
use agentos_image::{self as image, AGENT_IMAGE};

/// Below this the stock kernel and the initramfs do not fit comfortably.
pub const MIN_MEMORY_MIB: u64 = 128;
pub const MAX_MEMORY_MIB: u64 = 64 * 1024;
/// What a shell returns when it cannot run a command.
const EXIT_CANNOT_RUN: i32 = 127;
/// How much longer than `--timeout` the host waits for the guest to report the program's end.
const HOST_TIMEOUT_GRACE: Duration = Duration::from_secs(10);

/// The CPU slice and admission flags of an agent, as `run` and `spawn` take them.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SliceArgs {
    /// CPU time the VM may use, in CPUs (0.5 = half of one CPU), enforced by its cgroup.
    #[arg(long, value_name = "CPUS")]
    pub cpus: Option<f64>,
    /// The host CPUs the VM may run on, e.g. `1` or `0-1,3`.
    #[arg(long, value_name = "LIST", conflicts_with = "pin")]
    pub cpuset: Option<String>,
    /// Pin the VM to the one host CPU that pinned agents load least (the daemon moves its
    /// pinned agents when others leave).
    #[arg(long)]
    pub pin: bool,
    /// CPU weight against other agents, 1..=10000 (default 100).
    #[arg(long, conflicts_with = "class")]
    pub weight: Option<u32>,
    /// Priority class, a CPU weight: interactive (10000), batch (100, the default), idle (1);
    /// under the daemon, batch agents also pause while an interactive one works.
    #[arg(long, value_enum)]
    pub class: Option<PriorityClass>,
    /// When the VM's memory or CPU slice does not fit beside the running agents, wait for room
    /// instead of failing.
    #[arg(long)]
    pub wait: bool,
}

impl SliceArgs {
    /// The CPU part of the slice these flags ask for.
    pub fn cpu(&self) -> CpuSlice {
        CpuSlice {
            cpus: self.cpus,
            weight: self.weight.or(self.class.map(PriorityClass::weight)),
            cpuset: self.cpuset.clone(),
            pin: self.pin,
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct VmArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=i64::from(MAX_VCPUS)))]
    pub vcpus: u8,
    /// Guest memory in MiB, at least 128 (default 256).
    #[arg(long)]
    pub memory: Option<u64>,
    /// Guest kernel, a bzImage or an ELF with a PVH entry (default: the agent image's unpacked ELF,
    /// else its bzImage).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Guest initramfs (default: the agent image's).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Give the guest a read-only disk over this file (a whole number of 512-byte sectors):
    /// /dev/vda, then /dev/vdb... in the order given (at most 8). In a carrier, the file is
    /// copied in: give it outside /tmp.
    #[arg(long, value_name = "PATH")]
    pub disk: Vec<PathBuf>,
    /// Extra kernel command line arguments, appended to agentos's own.
    #[arg(long, value_name = "ARGS")]
    pub kernel_args: Option<String>,
    /// Copy the guest's serial console to stderr.
    #[arg(long)]
    pub console: bool,
    /// Seconds the guest agent has to come up (at most an hour).
    #[arg(
        long,
        default_value_t = 300,
        value_parser = clap::value_parser!(u64).range(1..=MAX_BOOT_TIMEOUT_S),
    )]
    pub boot_timeout: u64,
    #[command(flatten)]
    pub slice: SliceArgs,
    /// Where the VM runs: directly on this host's KVM, or in a QEMU carrier VM (`auto` asks
    /// `agentos doctor`'s probe whether this host's KVM boots Linux).
    #[arg(long, value_enum, default_value_t = CarrierChoice::Auto)]
    pub carrier: CarrierChoice,
    /// Run the VMM without its jail (namespaces, private root, no capabilities, limits). UNSAFE:
    /// a guest that breaks out of KVM then reaches this host with the VMM's privileges. For
    /// debugging only.
    #[arg(long)]
    pub no_jail: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// Print a JSON result (exit code, output, timings) instead of passing the output through.
    #[arg(long)]
    pub json: bool,
    /// Kill the program after this many seconds (at most a day).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_S))]
    pub timeout: Option<u64>,
    /// Environment variable for the program, NAME=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory of the program in the guest.
    #[arg(long)]
    pub cwd: Option<String>,
    #[command(flatten)]
    pub infer: crate::infer_run::InferArgs,
    /// Restore the agent saved in this snapshot directory (see --snapshot-to) instead of
    /// booting one: the program runs in the agent as it was saved, programs it had running
    /// and files it had written included. vCPUs and memory are the snapshot's.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd", "memory", "vcpus", "kernel_args", "model"])]
    pub from: Option<PathBuf>,
    /// Once the program has ended, save the agent to this directory (it must exist; its
    /// `memory` and `vm.state` are replaced) instead of shutting it down.
    #[arg(long, value_name = "DIR", conflicts_with = "model")]
    pub snapshot_to: Option<PathBuf>,
    /// The program and its arguments.
    #[arg(
        last = true,
        required_unless_present = "model",
        conflicts_with = "model",
        value_name = "PROGRAM"
    )]
    pub command: Vec<String>,
}

/// `NAME=VALUE`, for `--env`.
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
        _ => Err(format!("`{s}` is not NAME=VALUE")),
    }
}

#[derive(Serialize)]
struct JsonResult {
    exit_code: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    signal: Option<i32>,
    timed_out: bool,
    stdout: String,
    stderr: String,
    /// From process start to the guest agent's hello.
    boot_ms: u64,
    /// From process start to the end of the command.
    total_ms: u64,
    /// The jail the VMM ran in: `full`, `rootless` or `none`.
    jail: agentos_jail::JailLevel,
    /// What the guest reported about its own boot (milliseconds of guest uptime).
    guest: GuestBoot,
}

#[derive(Serialize)]
struct GuestBoot {
    kernel: String,
    init_ms: u64,
    ready_ms: u64,
}

impl VmArgs {
    /// Checks what a user can get wrong, before anything is started.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.no_jail {
            eprintln!(
                "agentos: WARNING: --no-jail runs the VMM unconfined (no namespaces, private root or capability drop); a guest that breaks out of KVM reaches this host with the VMM's privileges. Use it for debugging only."
            );
        }
        let memory = self.memory.unwrap_or(DEFAULT_MEMORY_MIB);
        if memory < MIN_MEMORY_MIB {
            bail!(
                "--memory {memory} MiB is too small: an agent VM needs at least {MIN_MEMORY_MIB} MiB"
            );
        }
        if memory > MAX_MEMORY_MIB {
            bail!("--memory {memory} MiB is more than the {MAX_MEMORY_MIB} MiB limit");
        }
        let cpu = self.slice.cpu();
        agentos_core::cgroup::Slice {
            cpus: cpu.cpus,
            weight: cpu.weight,
            cpuset: cpu.cpuset,
            ..Default::default()
        }
        .validate()?;
        for path in [&self.kernel, &self.initrd].into_iter().flatten() {
            if !path.is_file() {
                bail!("{} does not exist or is not a file", path.display());
            }
        }
        if self.disk.len() > MAX_DISKS {
            bail!(
                "{} disks given; a VM has at most {MAX_DISKS}",
                self.disk.len()
            );
        }
        for path in &self.disk {
            let file = std::fs::File::open(path)
                .with_context(|| format!("cannot open the disk {}", path.display()))?;
            disk_size(&file).with_context(|| format!("{} cannot be a disk", path.display()))?;
        }
        Ok(())
    }

    /// Kernel and initrd: given, or the agent image's.
    pub fn boot_options(&self) -> anyhow::Result<BootOptions> {
        let (kernel, initrd) = match (&self.kernel, &self.initrd) {
            (Some(k), Some(i)) => (k.clone(), i.clone()),
            (kernel, initrd) => {
                let cache = image::default_cache_dir();
                let img = image::find_image(&cache, AGENT_IMAGE).map_err(|e| {
                    anyhow::anyhow!(
                        "{e}; run `scripts/setup` (or `agentos image build`) to build the guest image"
                    )
                })?;
                (
                    kernel
                        .clone()
                        .unwrap_or_else(|| img.boot_kernel().to_owned()),
                    initrd.clone().unwrap_or(img.initrd),
                )
            }
        };
        Ok(self.boot_options_with(kernel, initrd))
    }

    /// The VM these flags ask for, booting `kernel` and `initrd`.
    pub fn boot_options_with(&self, kernel: PathBuf, initrd: PathBuf) -> BootOptions {
        BootOptions {
            vcpus: self.vcpus,
            memory_mib: self.memory.unwrap_or(DEFAULT_MEMORY_MIB),
            kernel,
            initrd,
            extra_initrds: Vec::new(),
            disks: self.disk.clone(),
            model_disks: None,
            extra_cmdline: self.kernel_args.clone(),
            console: self.console,
            boot_timeout: Duration::from_secs(self.boot_timeout),
            cpu: self.slice.cpu(),
            wait_for_room: self.slice.wait,
            console_log: None,
            abort: None,
            no_jail: self.no_jail,
            from: None,
            snapshot_to: None,
        }
    }
}

/// Checks that /dev/kvm can be opened, with an explanation a user can act on.
pub fn check_kvm_access() -> anyhow::Result<()> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
            "/dev/kvm does not exist: this host has no KVM (enable virtualisation, load kvm_intel or kvm_amd, or run on a machine with KVM)"
        ),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => bail!(
            "no permission to open /dev/kvm: add your user to the group that owns it (usually `kvm`) and log in again"
        ),
        Err(e) => Err(e).context("cannot open /dev/kvm"),
    }
}

pub fn run(args: &RunArgs, started: Instant) -> anyhow::Result<i32> {
    args.vm.validate()?;
    args.infer.validate()?;
    if args.infer.model.is_some() {
        return crate::infer_run::run(args, started);
    }
    let from = args.from.as_deref().map(snapshot_shape).transpose()?;
    if let Some(dir) = &args.snapshot_to {
        check_snapshot_target(dir, args.from.as_deref())?;
    }
    if carrier::should_use(args.vm.carrier)? {
        if args.snapshot_to.is_some() {
            bail!(
                "--snapshot-to needs a host whose KVM boots Linux; here agents run in a carrier, whose files are gone when it ends: run `agentos carrier -- agentos run --snapshot-to ...` to save and restore inside one"
            );
        }
        let mut files: Vec<PathBuf> = [&args.vm.kernel, &args.vm.initrd]
            .into_iter()
            .flatten()
            .chain(&args.vm.disk)
            .cloned()
            .collect();
        if let Some(dir) = &args.from {
            files.extend([STATE_FILE, MEMORY_FILE].map(|name| dir.join(name)));
            if let Some(disks) = model_disks_of(dir)? {
                files.extend([disks.runtime, disks.bundle, dir.join(AGENT_FILE)]);
            }
        }
        return carrier::rerun_inside(files);
    }
    check_kvm_access()?;
    let mut opts = args.vm.boot_options()?;
    if let (Some(dir), Some((vcpus, memory_mib))) = (&args.from, from) {
        opts.from = Some(dir.clone());
        opts.model_disks = model_disks_of(dir)?;
        opts.vcpus = vcpus;
        opts.memory_mib = memory_mib;
    }
    opts.snapshot_to = args.snapshot_to.clone();
    let mut vm = match AgentVm::boot(&opts) {
        Ok(vm) => vm,
        Err(VmError::Interrupted) => return Ok(signals::exit_code()),
        Err(e) => return Err(e).context("the agent VM did not boot"),
    };
    let boot_ms = started.elapsed().as_millis() as u64;
    let jail = vm.jail();
    let hello = vm.conn().hello().clone();
    let request = ExecRequest {
        program: args.command[0].clone(),
        args: args.command[1..].to_vec(),
        env: args.env.iter().cloned().collect::<BTreeMap<_, _>>(),
        cwd: args.cwd.clone(),
        timeout_ms: args.timeout.map(|s| s.saturating_mul(1000)),
        ..Default::default()
    };

    let (mut out_buf, mut err_buf) = (Vec::new(), Vec::new());
    let (stdout, stderr) = (io::stdout(), io::stderr());
    let (mut out_lock, mut err_lock) = (stdout.lock(), stderr.lock());
    let io = if args.json {
        ExecIo {
            stdin: None,
            stdout: &mut out_buf,
            stderr: &mut err_buf,
        }
    } else {
        ExecIo {
            stdin: Some(Box::new(io::stdin())),
            stdout: &mut out_lock,
            stderr: &mut err_lock,
        }
    };
    // The guest enforces the timeout; the host gives it a little longer before it gives up on a
    // guest that no longer answers.
    let deadline = args.timeout.and_then(|secs| {
        Instant::now().checked_add(Duration::from_secs(secs).saturating_add(HOST_TIMEOUT_GRACE))
    });
    vm.conn().set_deadline(deadline);
    let status = vm.conn().exec(request, io);
    drop((out_lock, err_lock));
    let status = match status {
        Ok(status) => status,
        Err(_) if signals::interrupted() => return Ok(signals::exit_code()),
        Err(ConnectionError::Refused(why)) => {
            vm.shutdown();
            eprintln!("agentos: {why}");
            return Ok(EXIT_CANNOT_RUN);
        }
        Err(e) => {
            let end = vm.shutdown();
            if let Some(crash) = end.report.and_then(|r| r.error) {
                bail!("the VM crashed while running the program: {crash}");
            }
            return Err(e).context("the program did not complete");
        }
    };
    match &args.snapshot_to {
        Some(dir) => {
            vm.snapshot()
                .context("the program ended but the agent could not be saved")?;
            eprintln!("agentos: saved the agent to {}", dir.display());
        }
        None => {
            vm.shutdown();
        }
    }
    let code = status.shell_code();
    if args.json {
        let result = JsonResult {
            exit_code: code,
            signal: status.signal,
            timed_out: status.timed_out,
            stdout: String::from_utf8_lossy(&out_buf).into_owned(),
            stderr: String::from_utf8_lossy(&err_buf).into_owned(),
            boot_ms,
            total_ms: started.elapsed().as_millis() as u64,
            jail,
            guest: GuestBoot {
                kernel: hello.kernel,
                init_ms: hello.boot.init_ms,
                ready_ms: hello.boot.ready_ms,
            },
        };
        let mut out = io::stdout().lock();
        serde_json::to_writer(&mut out, &result)?;
        writeln!(out)?;
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    #[test]
    fn env_pairs_parse() {
        assert_eq!(parse_env("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert!(parse_env("=x").is_err());
        assert!(parse_env("novalue").is_err());
    }

    #[test]
    fn too_little_memory_is_refused_with_the_minimum() {
        let cli = Cli::parse_from(["t", "--memory", "64", "--", "true"]);
        let err = cli.run.vm.validate().unwrap_err().to_string();
        assert!(err.contains("at least 128 MiB"), "{err}");
    }

    #[test]
    fn disks_that_cannot_be_disks_are_refused_before_boot() {
        let dir = std::env::temp_dir().join(format!("agentos-run-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let odd = dir.join("odd.img");
        std::fs::write(&odd, [0u8; 1000]).unwrap();
        let empty = dir.join("empty.img");
        std::fs::write(&empty, []).unwrap();
        let good = dir.join("good.img");
        std::fs::write(&good, [0u8; 1024]).unwrap();
        let refusal = |disk: &std::path::Path| {
            let cli = Cli::parse_from(["t", "--disk", disk.to_str().unwrap(), "--", "true"]);
            format!("{:#}", cli.run.vm.validate().unwrap_err())
        };
        let err = refusal(&odd);
        assert!(err.contains("odd.img cannot be a disk"), "{err}");
        assert!(
            err.contains("1000 bytes, is not a whole number of 512-byte sectors"),
            "{err}"
        );
        assert!(refusal(&empty).contains("the disk file is empty"));
        assert!(refusal(&dir.join("missing.img")).contains("cannot open the disk"));
        assert!(refusal(&dir).contains("not a regular file"));
        let good = good.to_str().unwrap();
        let nine: Vec<&str> = ["t"]
            .into_iter()
            .chain(std::iter::repeat_n(["--disk", good], 9).flatten())
            .chain(["--", "true"])
            .collect();
        let err = Cli::parse_from(nine)
            .run
            .vm
            .validate()
            .unwrap_err()
            .to_string();
        assert_eq!(err, "9 disks given; a VM has at most 8");
        let cli = Cli::parse_from(["t", "--disk", good, "--", "true"]);
        cli.run.vm.validate().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn inference_flags_need_a_model() {
        let cli = Cli::parse_from(["t", "--task", "embed", "--", "true"]);
        let err = cli.run.infer.validate().unwrap_err().to_string();
        assert_eq!(err, "--task needs --model NAME (see `agentos model ls`)");
        let cli = Cli::parse_from(["t", "--model", "m", "--input", "x"]);
        cli.run.infer.validate().unwrap();
        assert!(cli.run.command.is_empty());
        assert!(Cli::try_parse_from(["t", "--model", "m", "--", "true"]).is_err());
    }

    #[test]
    fn a_class_is_a_weight_and_excludes_one() {
        let cli = Cli::parse_from(["t", "--class", "interactive", "--", "true"]);
        let opts = cli.run.vm.boot_options_with(PathBuf::new(), PathBuf::new());
        assert_eq!(opts.cpu.weight, Some(10_000));
        let cli = Cli::parse_from(["t", "--weight", "300", "--", "true"]);
        let opts = cli.run.vm.boot_options_with(PathBuf::new(), PathBuf::new());
        assert_eq!(opts.cpu.weight, Some(300));
        assert!(Cli::try_parse_from(["t", "--class", "idle", "--weight", "5", "--", "x"]).is_err());
        assert!(Cli::try_parse_from(["t", "--class", "urgent", "--", "x"]).is_err());
    }

    #[test]
    fn the_program_comes_after_the_separator() {
        let cli = Cli::parse_from(["t", "--vcpus", "2", "--", "/bin/sh", "-c", "exit 7"]);
        assert_eq!(cli.run.command, ["/bin/sh", "-c", "exit 7"]);
        assert_eq!(cli.run.vm.vcpus, 2);
        assert!(Cli::try_parse_from(["t", "--vcpus", "0", "--", "x"]).is_err());
    }

    #[test]
    fn timeouts_past_what_an_instant_holds_are_refused() {
        for (flag, value) in [
            ("--timeout", "18446744073709551615"),
            ("--timeout", "0"),
            ("--timeout", "86401"),
            ("--boot-timeout", "18446744073709551615"),
            ("--boot-timeout", "3601"),
        ] {
            let parsed = Cli::try_parse_from(["t", flag, value, "--", "x"]);
            assert!(parsed.is_err(), "{flag} {value}");
        }
        let cli = Cli::parse_from([
            "t",
            "--timeout",
            "86400",
            "--boot-timeout",
            "3600",
            "--",
            "x",
        ]);
        assert_eq!(
            (cli.run.timeout, cli.run.vm.boot_timeout),
            (Some(86400), 3600)
        );
    }
}
