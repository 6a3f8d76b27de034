//! `agentos eval`: the security evaluation harness. It runs adversarial workloads in real
//! microVMs (fork bombs, memory and disk exhaustion, CPU hogs, reads of host files, network and
//! vsock attempts, malformed frames and virtio register abuse, kernel panics) and against the
//! host's interfaces (the daemon's API, the group router), and checks that the boundary held.
//!
//! The cases are data: `eval/cases/SUITE.toml` (see [`case`]), with the guest scripts and group
//! files they name; `--cases DIR` runs a directory of one's own. Guest scripts find the
//! `agentos-eval-probe` program at `/eval/probe` (raw vsock and raw virtio queues, see `probe/main.rs`).

pub mod case;
pub mod checks;
mod host_attacks;
pub mod report;
mod runner;

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::carrier;
use crate::carrier::CarrierError;
use crate::placement::{self, CarrierChoice, Placement, PlacementError};
use agentos_core::signals;
use agentos_image::cpio::CpioTree;
use checks::HostSnapshot;
use report::{CaseReport, Report};

/// Where a guest script finds the probe.
pub const PROBE_IN_GUEST: &str = "/eval/probe";
/// The probe's file name, next to the agentos binary.
const PROBE_NAME: &str = "agentos-eval-probe";
/// How long the host gets to settle (VMMs reaped, cgroups removed) before "host unchanged" fails.
const SETTLE: Duration = Duration::from_secs(15);

#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// Run only this suite (a case file's name without `.toml`, e.g. `guest`).
    #[arg(long, value_name = "NAME")]
    pub suite: Option<String>,
    /// Print the report as JSON (the summary line goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// The directory of case files (default: `eval/cases` of the agentos source tree, or
    /// `$AGENTOS_EVAL_CASES`).
    #[arg(long, value_name = "DIR")]
    pub cases: Option<PathBuf>,
    /// Where the VMs run: directly on this host's KVM, or in a QEMU carrier VM.
    #[arg(long, value_enum, default_value_t = CarrierChoice::Auto)]
    pub carrier: CarrierChoice,
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(
        "cannot find the case files: pass --cases DIR or set AGENTOS_EVAL_CASES (the source tree has them in eval/cases)"
    )]
    NoCases,
    #[error(
        "cannot find {0}, the guest side of the vsock cases; build it with `cargo build --release -p agentos`"
    )]
    NoProbe(PathBuf),
    #[error("cannot build the initramfs that carries the probe")]
    ProbeInitrd(#[source] agentos_image::cpio::CpioError),
    #[error("cannot prepare the harness's scratch directory")]
    Scratch(#[source] io::Error),
    #[error(transparent)]
    Cases(#[from] case::CaseError),
    #[error(transparent)]
    Placement(#[from] PlacementError),
    #[error(transparent)]
    Carrier(#[from] CarrierError),
    #[error("cannot write the report")]
    Report(#[source] io::Error),
}

/// The case directory: given, from the environment, or `eval/cases` above the binary
/// (`target/release/agentos`) or the current directory.
fn cases_dir(args: &EvalArgs) -> Result<PathBuf, EvalError> {
    if let Some(dir) = args
        .cases
        .clone()
        .or_else(|| std::env::var_os("AGENTOS_EVAL_CASES").map(PathBuf::from))
    {
        return Ok(std::path::absolute(&dir).unwrap_or(dir));
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        candidates.extend(exe.ancestors().skip(1).map(|d| d.join("eval/cases")));
    }
    if let Ok(cwd) = std::env::current_dir() {
        candidates.push(cwd.join("eval/cases"));
    }
    candidates
        .into_iter()
        .find(|d| d.is_dir())
        .ok_or(EvalError::NoCases)
}

/// What a carrier needs for `agentos eval` to run inside it: the probe and the shipped cases
/// (every file under the source tree's `eval/`), where they are found.
pub fn carrier_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = probe_path().into_iter().collect();
    let args = EvalArgs {
        suite: None,
        json: false,
        cases: None,
        carrier: CarrierChoice::Never,
    };
    if let Some(top) = cases_dir(&args)
        .ok()
        .and_then(|d| d.parent().map(Path::to_path_buf))
    {
        let mut dirs = vec![top];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                match entry.file_type() {
                    Ok(t) if t.is_dir() => dirs.push(path),
                    Ok(t) if t.is_file() => files.push(path),
                    _ => {}
                }
            }
        }
    }
    files
}

fn probe_path() -> Result<PathBuf, EvalError> {
    let exe = std::env::current_exe().map_err(EvalError::Scratch)?;
    let probe = exe.with_file_name(PROBE_NAME);
    if probe.is_file() {
        Ok(probe)
    } else {
        Err(EvalError::NoProbe(probe))
    }
}

pub fn run(args: &EvalArgs) -> Result<i32, EvalError> {
    let dir = cases_dir(args)?;
    let suites = case::load_dir(&dir, args.suite.as_deref())?;
    let probe = probe_path()?;
    if placement::decide(args.carrier)? == Placement::Carrier {
        let mut files = carrier_files();
        files.push(probe);
        for suite in &suites {
            files.push(suite.path.clone());
            files.extend(suite.files.iter().cloned());
        }
        files.sort();
        files.dedup();
        return Ok(carrier::rerun_inside(files)?);
    }
    let started = Instant::now();
    let before = HostSnapshot::take();
    let scratch = Scratch::create()?;
    let initrd = scratch.path.join("probe.cpio");
    probe_initrd(&probe, &initrd)?;
    let env = runner::Env {
        probe_initrd: initrd,
        scratch: scratch.path.clone(),
    };
    let mut cases = Vec::new();
    for suite in &suites {
        tracing::info!(suite = suite.name, cases = suite.cases.len(), "suite");
        cases.extend(run_suite(suite, &env));
        if signals::interrupted() {
            break;
        }
    }
    drop(scratch);
    cases.push(host_unchanged(&before));
    let report = Report::new(cases, started.elapsed().as_millis() as u64);
    let mut out = io::stdout().lock();
    if args.json {
        report.write_json(&mut out)
    } else {
        report.write_text(&mut out)
    }
    .map_err(EvalError::Report)?;
    if signals::interrupted() {
        return Ok(signals::exit_code());
    }
    Ok(if report.failed == 0 { 0 } else { 1 })
}

/// The last case: nothing the cases started is left on the host.
fn host_unchanged(before: &HostSnapshot) -> CaseReport {
    let mut case = CaseReport::new(
        "host",
        "host-unchanged",
        "agentos eval",
        "leave anything behind after every case: processes, cgroups, run directories, mounts, sockets, files",
        "the host's processes, agentos cgroups, run directories, mounts, Unix sockets and agentos files are as before",
    );
    let started = Instant::now();
    let deadline = started + SETTLE;
    let added = loop {
        let added = HostSnapshot::take().added_since(before);
        if added.is_empty() || Instant::now() >= deadline {
            break added;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    case.evidence("items_before", before.len());
    case.evidence("left_behind", added.clone());
    case.check(
        "nothing new on the host",
        added.is_empty(),
        added.join("; "),
    );
    case.ms = started.elapsed().as_millis() as u64;
    case
}

/// The probe as `/eval/probe` in a cpio archive the VMs load after their image.
fn probe_initrd(probe: &Path, out: &Path) -> Result<(), EvalError> {
    let mut tree = CpioTree::new();
    tree.dir("/eval", 0o755).map_err(EvalError::ProbeInitrd)?;
    tree.host_file(PROBE_IN_GUEST, 0o755, probe)
        .map_err(EvalError::ProbeInitrd)?;
    let file = std::fs::File::create(out).map_err(EvalError::Scratch)?;
    tree.write(io::BufWriter::new(file))
        .and_then(|mut w| io::Write::flush(&mut w).map_err(agentos_image::cpio::CpioError::Write))
        .map_err(EvalError::ProbeInitrd)
}

/// A private directory for the harness's files, removed at the end.
struct Scratch {
    path: PathBuf,
}

impl Scratch {
    fn create() -> Result<Self, EvalError> {
        let path = std::env::temp_dir().join(format!("agentos-eval-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).map_err(EvalError::Scratch)?;
        Ok(Self { path })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Runs the cases of `suite` in order, guest cases without a VM of their own sharing one.
fn run_suite(suite: &case::Suite, env: &runner::Env) -> Vec<report::CaseReport> {
    let mut shared: Option<agentos_core::agent::vm::AgentVm> = None;
    let mut reports = Vec::new();
    for case in &suite.cases {
        if agentos_core::signals::interrupted() {
            break;
        }
        let started = Instant::now();
        let mut report = CaseReport::new(
            &case.suite,
            &case.name,
            &case.source,
            &case.tries,
            &case.expects,
        );
        match case.kind {
            case::Kind::Guest => match &case.own_vm {
                Some(spec) => runner::own_vm_case(case, spec, env, &mut report),
                None => runner::shared_vm_case(case, &suite.vm, env, &mut shared, &mut report),
            },
            case::Kind::Group => runner::group_case(case, env, &mut report),
            case::Kind::Api => runner::api_case(case, env, &mut report),
            case::Kind::Host => {
                host_attacks::run(case.attack.as_deref().unwrap_or_default(), env, &mut report)
            }
        }
        report.ms = started.elapsed().as_millis() as u64;
        eprintln!(
            "agentos eval: {}/{}: {:?} ({:.1} s)",
            case.suite,
            case.name,
            report.outcome,
            report.ms as f64 / 1000.0
        );
        reports.push(report);
    }
    if let Some(vm) = shared {
        vm.shutdown();
    }
    reports
}
