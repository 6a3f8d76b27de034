//! `agentos run`: boot an agent VM, run one program in it with the caller's standard I/O, shut the
//! VM down, and exit with the program's status.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentos_protocol::ExecRequest;
use agentos_vmm::snapshot::{MEMORY_FILE, STATE_FILE};
use anyhow::{Context, bail};
use serde::Serialize;

use crate::flags::{DeviceArgs, VmArgs, parse_env};
use agentos::carrier;
use agentos::daemon::api::MAX_TIMEOUT_S;
use agentos::placement::{self, Placement};
use agentos_core::agent::connection::{ConnectionError, ExecIo};
use agentos_core::agent::snapshot::{
    AGENT_FILE, check_snapshot_target, model_disks_of, snapshot_shape,
};
use agentos_core::agent::vm::{AgentVm, VmError};
use agentos_core::signals;
use agentos_image::template;

/// What a shell returns when it cannot run a command.
const EXIT_CANNOT_RUN: i32 = 127;
/// How much longer than `--timeout` the host waits for the guest to report the program's end.
const HOST_TIMEOUT_GRACE: Duration = Duration::from_secs(10);

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
    pub infer: crate::infer::InferArgs,
    /// Restore the agent saved in this snapshot directory (see --snapshot-to) instead of
    /// booting one: the program runs in the agent as it was saved, programs it had running
    /// and files it had written included. vCPUs and memory are the snapshot's.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd", "memory", "vcpus", "kernel_args", "model", "template"])]
    pub from: Option<PathBuf>,
    /// Once the program has ended, save the agent to this directory (it must exist; its
    /// `memory` and `vm.state` are replaced) instead of shutting it down.
    #[arg(long, value_name = "DIR", conflicts_with = "model")]
    pub snapshot_to: Option<PathBuf>,
    #[command(flatten)]
    pub devices: DeviceArgs,
    /// The program and its arguments.
    #[arg(
        last = true,
        required_unless_present = "model",
        conflicts_with = "model",
        value_name = "PROGRAM"
    )]
    pub command: Vec<String>,
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

pub fn run(args: &RunArgs, started: Instant) -> anyhow::Result<i32> {
    args.infer.validate()?;
    if args.infer.model.is_some() {
        return crate::infer::run(&args.vm, &args.infer, args.json, started);
    }
    let spec = args.vm.validate(args.from.as_deref(), &args.devices)?;
    if let Some(dir) = &args.from {
        // Refused here, before a carrier would be started for it.
        snapshot_shape(dir)?;
    }
    if let Some(dir) = &args.snapshot_to {
        if args.devices.any() {
            bail!(
                "--snapshot-to with --device or --gpu: a VM with a passed-through device cannot be saved"
            );
        }
        check_snapshot_target(dir, args.from.as_deref())?;
    }
    if placement::decide(args.vm.carrier)? == Placement::Carrier {
        if args.devices.any() {
            bail!(
                "--device and --gpu need a host whose KVM boots Linux; here agents run in a carrier, which has no PCI device to pass unless started with one: run `agentos carrier --pci-test-device -- agentos run --device ...`"
            );
        }
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
        if spec.template().is_some() {
            files.extend(template::carrier_files(&agentos_image::default_cache_dir()));
        }
        if let Some(dir) = &args.from {
            files.extend([STATE_FILE, MEMORY_FILE].map(|name| dir.join(name)));
            if let Some(disks) = model_disks_of(dir)? {
                files.extend([disks.runtime, disks.bundle, dir.join(AGENT_FILE)]);
            }
        }
        return Ok(carrier::rerun_inside(files)?);
    }
    let mut opts = args.vm.boot_options(&spec)?;
    opts.snapshot_to = args.snapshot_to.clone();
    opts.pci_devices = agentos::pci::assign(
        spec.devices(),
        spec.gpus(),
        &[],
        Path::new(agentos::pci::SYSFS_PCI_DEVICES),
    )?;
    let mut vm = match AgentVm::boot(&opts) {
        Ok(vm) => vm,
        Err(VmError::Interrupted) => return Ok(signals::exit_code()),
        Err(e) => return Err(e).context("the agent VM did not boot"),
    };
    let boot_ms = started.elapsed().as_millis() as u64;
    let jail = vm.jail();
    let hello = vm.conn().hello().clone();
    let request = ExecRequest {
        run: crate::flags::program(&args.command, &args.env, args.cwd.as_deref(), args.timeout),
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
        let err = cli
            .run
            .vm
            .validate(None, &cli.run.devices)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("memory 64 MiB: use 128 to"), "{err}");
    }

    #[test]
    fn the_flags_make_the_agent_request() {
        let cli = Cli::parse_from([
            "t",
            "--vcpus",
            "2",
            "--memory",
            "512",
            "--disk",
            "/d.img",
            "--kernel-args",
            "quiet",
            "--cpuset",
            "0",
            "--",
            "true",
        ]);
        let request = cli.run.vm.request(None);
        assert_eq!(request.vcpus, Some(2));
        assert_eq!(request.memory_mib, Some(512));
        assert_eq!(request.disks, [PathBuf::from("/d.img")]);
        assert_eq!(request.kernel_args.as_deref(), Some("quiet"));
        assert_eq!(request.cpuset.as_deref(), Some("0"));
        // A restored agent's vCPUs are its snapshot's, whatever the default says.
        let cli = Cli::parse_from(["t", "--from", "/s", "--", "true"]);
        let request = cli.run.vm.request(cli.run.from.as_deref());
        assert_eq!(request.vcpus, None);
        assert_eq!(request.from, Some(PathBuf::from("/s")));
        let err = cli
            .run
            .vm
            .validate(Some(std::path::Path::new("/s")), &cli.run.devices);
        assert!(err.is_ok(), "{err:?}");
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
        let spec = cli.run.vm.validate(None, &cli.run.devices).unwrap();
        assert_eq!(spec.cpu().weight, Some(10_000));
        let cli = Cli::parse_from(["t", "--weight", "300", "--", "true"]);
        let spec = cli.run.vm.validate(None, &cli.run.devices).unwrap();
        assert_eq!(spec.cpu().weight, Some(300));
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
