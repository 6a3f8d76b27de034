//! `agentos vmm`: one VMM process running one microVM until it ends.
//!
//! Exit status: 0 when the guest shut down (or the VMM was stopped by SIGINT/SIGTERM), 2 when the
//! guest crashed (kernel panic, agent failure, unexpected reset), 1 when the VMM failed. With
//! `--report`, a JSON report of the run is written on exit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use agentos_vmm::builder::build_vm;
use agentos_vmm::config::{ConsoleConfig, VmConfig, VsockConfig};
use agentos_vmm::exit::{ExitReason, ExitSignal};
use agentos_vmm::vmm::{MetricsSnapshot, Outcome, RunReport};
use anyhow::Context;

use crate::jail::{self, JailPlan, Jailed};
use serde::{Deserialize, Serialize};

/// Exit statuses of `agentos vmm`.
pub const EXIT_CRASHED: i32 = 2;
pub const EXIT_FAILED: i32 = 1;

#[derive(clap::Args, Debug, Clone)]
pub struct VmmArgs {
    /// Guest kernel: a bzImage, or an ELF with a PVH entry note.
    #[arg(long)]
    pub kernel: PathBuf,
    /// Initial ramdisk; repeat to append more cpio archives (loaded end to end).
    #[arg(long)]
    pub initrd: Vec<PathBuf>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u64,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Append the serial console to this file.
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// Copy the serial console to stdout.
    #[arg(long)]
    pub console: bool,
    /// Give the guest a vsock device whose host side is Unix sockets at this path.
    #[arg(long)]
    pub vsock_uds: Option<PathBuf>,
    /// The guest's vsock CID.
    #[arg(long, default_value_t = 3)]
    pub cid: u64,
    /// Write a JSON report of the run here when the VM ends.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Run without the jail (namespaces, private root, no capabilities): UNSAFE, for debugging.
    #[arg(long)]
    pub no_jail: bool,
}

/// What `--report` contains.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmmReport {
    /// `shutdown`, `crashed`, `failed` or `stopped`.
    pub outcome: String,
    /// Why the guest crashed or the VMM failed.
    pub error: Option<String>,
    /// Milliseconds from VMM start to the guest agent's milestones.
    pub init_started_ms: Option<u64>,
    pub ready_ms: Option<u64>,
    pub console_tail: Vec<String>,
    #[serde(default)]
    pub metrics: serde_json::Value,
}

impl VmmArgs {
    fn vm_config(&self) -> VmConfig {
        VmConfig {
            vcpus: self.vcpus,
            memory_mib: self.memory,
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            console: ConsoleConfig {
                log: self.console_log.clone(),
                stdout: self.console,
            },
            vsock: self.vsock_uds.clone().map(|uds_path| VsockConfig {
                guest_cid: self.cid,
                uds_path,
            }),
        }
    }
}

/// Signals that stop the VM cleanly. They are blocked in every thread and taken by one thread
/// with `sigwait`, so a vCPU thread is never interrupted by them.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn stop_signal_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for signal in STOP_SIGNALS {
        // SAFETY: `set` is valid and `signal` a real signal number.
        unsafe { libc::sigaddset(&mut set, signal) };
    }
    set
}

fn spawn_signal_thread(exit: Arc<ExitSignal>) -> anyhow::Result<()> {
    let set = stop_signal_set();
    // SAFETY: blocks the stop signals in this thread; threads spawned later inherit the mask.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    anyhow::ensure!(rc == 0, "cannot block stop signals");
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut signal = 0;
            // SAFETY: `set` is a valid signal set and `signal` a valid out pointer.
            if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
                exit.request(ExitReason::Stopped);
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

pub fn run(args: &VmmArgs, started: Instant) -> anyhow::Result<i32> {
    // The VMM must not outlive whoever started it.
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number; no memory is involved.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
    let args = &absolute(args)?;
    if args.no_jail {
        tracing::warn!("running without the jail (--no-jail): unsafe, for debugging only");
    } else {
        // Still one thread here, as entering the jail needs.
        match jail::enter(&jail_plan(args))
            .context("cannot jail the VMM (`--no-jail` runs it unconfined, unsafely)")?
        {
            Jailed::Fully => tracing::info!("jailed"),
            Jailed::Unprivileged => tracing::warn!(
                "not root: running without namespaces or a private root, with limits and no_new_privs only"
            ),
        }
    }
    let vmm = build_vm(&args.vm_config()).context("cannot build the VM")?;
    spawn_signal_thread(vmm.exit_signal())?;
    let report = vmm.run(Some(started)).context("the VM failed")?;
    let code = exit_code(&report.outcome);
    if let Some(path) = &args.report {
        write_report(path, &report)?;
    }
    match &report.outcome {
        Outcome::Crashed(why) => eprintln!("agentos vmm: guest crashed: {why}"),
        Outcome::Failed(why) => eprintln!("agentos vmm: VM failed: {why}"),
        Outcome::Shutdown | Outcome::Stopped => {}
    }
    Ok(code)
}

/// The arguments with every path made absolute and resolved, as the jail binds them; the
/// console log is created so that it can be bound.
fn absolute(args: &VmmArgs) -> anyhow::Result<VmmArgs> {
    let resolve = |path: &Path| {
        std::fs::canonicalize(path).with_context(|| format!("cannot find {}", path.display()))
    };
    let in_dir = |path: &Path| -> anyhow::Result<PathBuf> {
        let name = path
            .file_name()
            .with_context(|| format!("{} names no file", path.display()))?;
        let dir = match path.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(dir) => resolve(dir)?,
            None => resolve(Path::new("."))?,
        };
        Ok(dir.join(name))
    };
    let mut out = args.clone();
    out.kernel = resolve(&args.kernel)?;
    out.initrd = args
        .initrd
        .iter()
        .map(|p| resolve(p))
        .collect::<Result<_, _>>()?;
    if let Some(log) = &args.console_log {
        std::fs::File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        out.console_log = Some(resolve(log)?);
    }
    out.vsock_uds = args.vsock_uds.as_deref().map(in_dir).transpose()?;
    out.report = args.report.as_deref().map(in_dir).transpose()?;
    Ok(out)
}

/// What the VMM sees in its jail: the kernel and initrds (read-only), the console log and
/// `/dev/kvm`, and the directory of its sockets and report (its run directory).
fn jail_plan(args: &VmmArgs) -> JailPlan {
    let mut dirs: Vec<PathBuf> = [&args.vsock_uds, &args.report]
        .into_iter()
        .flatten()
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .collect();
    dirs.dedup();
    let mut read_only = vec![args.kernel.clone()];
    read_only.extend(args.initrd.iter().cloned());
    let mut read_write = vec![PathBuf::from("/dev/kvm")];
    read_write.extend(args.console_log.iter().cloned());
    JailPlan {
        read_only,
        read_write,
        dirs,
    }
}

fn exit_code(outcome: &Outcome) -> i32 {
    match outcome {
        Outcome::Shutdown | Outcome::Stopped => 0,
        Outcome::Crashed(_) => EXIT_CRASHED,
        Outcome::Failed(_) => EXIT_FAILED,
    }
}

fn write_report(path: &std::path::Path, report: &RunReport) -> anyhow::Result<()> {
    let (outcome, error) = match &report.outcome {
        Outcome::Shutdown => ("shutdown", None),
        Outcome::Stopped => ("stopped", None),
        Outcome::Crashed(why) => ("crashed", Some(why.clone())),
        Outcome::Failed(why) => ("failed", Some(why.clone())),
    };
    let metrics: &MetricsSnapshot = &report.metrics;
    let out = VmmReport {
        outcome: outcome.into(),
        error,
        init_started_ms: report.init_started_ms,
        ready_ms: report.ready_ms,
        console_tail: report.console_tail.clone(),
        metrics: serde_json::to_value(metrics)?,
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&out)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
