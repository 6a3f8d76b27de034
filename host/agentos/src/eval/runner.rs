//! Runs the cases of a suite: guest scripts in a shared VM or one of their own, group files
//! through `agentos group run`, requests against a daemon. Every case ends with checks and the
//! evidence they looked at.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentos_protocol::{ExecRequest, InferRequest, Program, Task};
use serde_json::{Value, json};

use super::case::{ApiRequest, Case, Flood, ListenRequest, VmSpec};
use super::checks;
use super::report::{CaseReport, excerpt};
use crate::daemon::api::{ExecCall, LogsRequest, Request, RestartPolicy, RmRequest, SpawnRequest};
use crate::daemon::client::raw;
use crate::daemon::routes;
use agentos_core::agent::connection::{AgentConnection, CappedOutput, ExecIo};
use agentos_core::agent::spec::AgentRequest;
use agentos_core::agent::vm::{AgentVm, BootOptions, VmEnd};
use agentos_image::{self as image};
use agentos_vmm_process::ReportOutcome;

/// What the harness keeps of a guest script's stdout and of its stderr (the guest is the
/// attacker; the rest is dropped).
const MAX_SCRIPT_OUTPUT_BYTES: usize = 1 << 20;
/// Guest memory of an eval VM unless its case or suite says otherwise.
const DEFAULT_MEMORY_MIB: u64 = 128;
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a guest agent has to answer the ping that proves it survived a case.
const ALIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a guest agent that need not have survived gets to answer that ping.
const GONE_TIMEOUT: Duration = Duration::from_secs(10);
/// Beyond a script's own timeout, how long the host waits for its end.
const EXEC_GRACE: Duration = Duration::from_secs(30);
/// How long a connection to a host port the harness listens on gets to say hello.
const LISTEN_HANDSHAKE: Duration = Duration::from_secs(5);
/// How often a case waiting for console lines looks again, and how many lines of the console
/// its report keeps.
const CONSOLE_POLL: Duration = Duration::from_millis(500);
const CONSOLE_EVIDENCE_LINES: usize = 40;
/// How long a VM whose guest no longer answers gets to end by itself.
const END_WAIT: Duration = Duration::from_secs(20);
/// How long `group run` and the daemon's requests may take.
const COMMAND_LIMIT: Duration = Duration::from_secs(600);

/// What the cases share.
pub struct Env {
    /// A cpio archive carrying the probe, loaded into every eval VM.
    pub probe_initrd: PathBuf,
    /// The harness's private directory.
    pub scratch: PathBuf,
}

fn boot_options(spec: &VmSpec, env: &Env) -> Result<BootOptions, String> {
    let mut opts = AgentRequest {
        memory_mib: Some(spec.memory.unwrap_or(DEFAULT_MEMORY_MIB)),
        cpus: spec.cpus,
        kernel_args: spec.kernel_args.clone(),
        ..Default::default()
    }
    .validate()
    .and_then(|agent| agent.boot_options(&image::default_cache_dir()))
    .map_err(|e| agentos_protocol::error_chain(&e))?;
    opts.extra_initrds = vec![env.probe_initrd.clone()];
    opts.boot_timeout = BOOT_TIMEOUT;
    Ok(opts)
}

/// A VM as the suites' shared VMs are by default.
pub(super) fn boot_default(env: &Env, report: &mut CaseReport) -> Option<AgentVm> {
    boot(&VmSpec::default(), env, report)
}

fn boot(spec: &VmSpec, env: &Env, report: &mut CaseReport) -> Option<AgentVm> {
    let booted = boot_options(spec, env)
        .and_then(|opts| AgentVm::boot(&opts).map_err(|e| agentos_protocol::error_chain(&e)));
    match booted {
        Ok(vm) => {
            report.evidence("boot_ms", vm.boot_time().as_millis() as u64);
            Some(vm)
        }
        Err(why) => {
            report.check("the VM boots", false, why);
            None
        }
    }
}

pub(super) fn shared_vm_case(
    case: &Case,
    spec: &VmSpec,
    env: &Env,
    shared: &mut Option<AgentVm>,
    report: &mut CaseReport,
) {
    if shared.is_none() {
        *shared = boot(spec, env, report);
    }
    let Some(vm) = shared.as_mut() else {
        return;
    };
    let alive = guest_script(case, vm, report);
    check_vmm_bounds(vm, spec, report);
    if !alive {
        // A guest that no longer answers is no use to the next case: a fresh VM serves it.
        if let Some(vm) = shared.take() {
            end_vm(vm, report);
        }
    }
}

/// Descriptors a VMM holds with its guest agent's connection open and nothing else: KVM, the
/// VM and its vCPU, eventfds, epoll sets, a timer and a few sockets, with room to spare. A
/// connection a case opened and the host closed must not stay behind.
const MAX_VMM_FDS: usize = 64;

/// Host-side vsock connections a shared VM may hold between cases: the guest agent's control
/// connection, and one the case's listener has not seen closed yet.
const MAX_IDLE_VSOCK_CONNECTIONS: u64 = 2;
/// How long the connections a case ended get to close.
const VSOCK_SETTLE: Duration = Duration::from_secs(15);

/// The VMM of a shared VM after a case: its open descriptors and resident memory within bounds,
/// and its vsock tables within theirs with no connection left behind (a case that leaked
/// connections or grew the VMM's tables would show here).
fn check_vmm_bounds(vm: &AgentVm, spec: &VmSpec, report: &mut CaseReport) {
    // Connections the case ended close as their resets go through the guest: give them a moment.
    let deadline = Instant::now() + VSOCK_SETTLE;
    let metrics = loop {
        let metrics = vm.vsock_metrics();
        let settled = metrics.as_ref().is_ok_and(|m| {
            m["tables"]["connections"]
                .as_u64()
                .is_some_and(|n| n <= MAX_IDLE_VSOCK_CONNECTIONS)
        });
        if settled || Instant::now() >= deadline {
            break metrics;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    match metrics {
        Ok(metrics) => {
            let open = metrics["tables"]["connections"].as_u64();
            report.evidence("vmm_vsock", metrics.clone());
            report.check(
                "the VMM's vsock tables are within their bounds",
                metrics["within_bounds"] == true,
                metrics["tables"].to_string(),
            );
            report.check(
                format!("at most {MAX_IDLE_VSOCK_CONNECTIONS} vsock connections stay open"),
                open.is_some_and(|n| n <= MAX_IDLE_VSOCK_CONNECTIONS),
                format!("{open:?}"),
            );
        }
        Err(e) => report.check("the VMM reports its vsock counters", false, e.to_string()),
    }
    let Some(pid) = vm.vmm_pid().map(guest_runner) else {
        return;
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count());
    let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        });
    let memory_mib = spec.memory.unwrap_or(DEFAULT_MEMORY_MIB);
    let rss_limit_kib = (memory_mib + agentos_core::agent::vm::VMM_MEMORY_ALLOWANCE_MIB) << 10;
    report.evidence("vmm_open_fds", fds.as_ref().ok().copied());
    report.evidence("vmm_rss_kib", rss_kib);
    report.check(
        format!("the VMM holds at most {MAX_VMM_FDS} descriptors"),
        fds.as_ref().is_ok_and(|n| *n <= MAX_VMM_FDS),
        format!("{fds:?}"),
    );
    report.check(
        format!("the VMM's resident memory is within guest RAM + the VMM allowance ({rss_limit_kib} KiB)"),
        rss_kib.is_some_and(|kib| kib <= rss_limit_kib),
        format!("{rss_kib:?} KiB"),
    );
}

/// The process that runs the guest of the VMM started as `pid`: its jailed child, or `pid`
/// itself when it has none.
fn guest_runner(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()
        .and_then(|c| c.split_whitespace().next()?.parse().ok())
        .unwrap_or(pid)
}

pub(super) fn own_vm_case(case: &Case, spec: &VmSpec, env: &Env, report: &mut CaseReport) {
    let Some(mut vm) = boot(spec, env, report) else {
        return;
    };
    let cgroup = vm.cgroup();
    let before = cgroup.as_ref().map(|c| (c.stats(), Instant::now()));
    let alive = guest_script(case, &mut vm, report);
    if case.throttled {
        check_throttled(spec, cgroup.as_deref(), before, report);
    }
    let end = if alive {
        vm.shutdown()
    } else {
        end_vm(vm, report)
    };
    let Some(vmm) = &end.report else {
        report.check("the VMM writes its report", false, "no report");
        return;
    };
    report.evidence("vm_outcome", vmm.outcome.as_str());
    if let Some(error) = &vmm.error {
        report.evidence("vm_error", error.clone());
    }
    report.evidence("vmm_metrics", vmm.metrics.clone());
    report.check(
        "the VMM did not fail (its own error, not the guest's)",
        vmm.outcome != ReportOutcome::Failed,
        end.describe(),
    );
    if let Some(expected) = &case.vm_end {
        report.check(
            format!("the VM ended as `{expected}`"),
            vmm.outcome.as_str() == expected,
            end.describe(),
        );
    }
    for (path, min) in &case.metrics_min {
        let found = checks::metric(&vmm.metrics, path);
        report.check(
            format!("VMM metric {path} >= {min}"),
            found.is_some_and(|v| v >= *min),
            format!("{found:?}"),
        );
    }
    for (path, max) in &case.metrics_max {
        let found = checks::metric(&vmm.metrics, path);
        report.check(
            format!("VMM metric {path} <= {max}"),
            found.is_some_and(|v| v <= *max),
            format!("{found:?}"),
        );
    }
}

/// A VM whose guest may no longer answer: waits for it to end by itself, else stops its VMM
/// (SIGTERM, so that it writes its report), and reaps it. The case's evidence says how it ended
/// and what its console said last: a VM that ended inside a case that expected it to go on is
/// explained by these alone.
fn end_vm(mut vm: AgentVm, report: &mut CaseReport) -> VmEnd {
    let deadline = Instant::now() + END_WAIT;
    while !vm.ended() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if !vm.ended() {
        report.evidence("vm_stopped_by_harness", true);
        if let Some(pid) = vm.vmm_pid() {
            // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
    }
    let end = vm.shutdown();
    report.evidence("vm_end", end.describe());
    if let Some(vmm) = &end.report {
        let lines = &vmm.console_tail;
        let last = &lines[lines.len().saturating_sub(CONSOLE_EVIDENCE_LINES)..];
        report.evidence("vm_console", last.join("\n"));
    }
    end
}

/// Runs the case's script in `vm` and checks what came back; returns whether the guest agent
/// still answers.
fn guest_script(case: &Case, vm: &mut AgentVm, report: &mut CaseReport) -> bool {
    let listener = case
        .listen
        .map(|port| HostListener::start(&vm.host_socket(port), case.listen_request));
    let mut out = CappedOutput::new(MAX_SCRIPT_OUTPUT_BYTES);
    let mut err = CappedOutput::new(MAX_SCRIPT_OUTPUT_BYTES);
    let request = ExecRequest {
        run: Program {
            timeout_ms: Some(case.timeout_s * 1000),
            ..Program::new("/bin/sh").with_args(["-c", case.script.as_deref().unwrap_or_default()])
        },
        ..Default::default()
    };
    let conn = vm.conn();
    conn.set_deadline(Some(agentos_core::deadline::from_now(
        Duration::from_secs(case.timeout_s).saturating_add(EXEC_GRACE),
    )));
    let status = conn.exec(
        request,
        ExecIo {
            stdin: None,
            stdout: &mut out,
            stderr: &mut err,
        },
    );
    let stdout = String::from_utf8_lossy(&out.bytes).into_owned();
    report.evidence("stdout", excerpt(&stdout));
    report.evidence("stderr", excerpt(&String::from_utf8_lossy(&err.bytes)));
    match &status {
        Ok(status) => {
            report.evidence("exit_code", status.shell_code());
            report.evidence("timed_out", status.timed_out);
        }
        Err(e) => report.evidence("exec_error", agentos_protocol::error_chain(e)),
    }
    if let Some(code) = case.exit_code {
        let found = status.as_ref().map(|s| s.shell_code());
        report.check(
            format!("the script exits {code}"),
            found.as_ref().is_ok_and(|c| *c == code),
            format!("{found:?}"),
        );
    }
    if let Some(timed_out) = case.timed_out {
        let found = status.as_ref().map(|s| s.timed_out);
        report.check(
            format!("timed_out is {timed_out}"),
            found.as_ref().is_ok_and(|t| *t == timed_out),
            format!("{found:?}"),
        );
    }
    for text in &case.stdout_has {
        report.check(
            format!("output has `{text}`"),
            stdout.contains(text.as_str()),
            "",
        );
    }
    for text in &case.stdout_lacks {
        let found = stdout
            .lines()
            .find(|l| l.contains(text.as_str()))
            .unwrap_or_default();
        report.check(
            format!("output lacks `{text}`"),
            !stdout.contains(text.as_str()),
            found,
        );
    }
    let settle = Duration::from_secs(case.settle_s);
    if case.console_has.is_empty() {
        std::thread::sleep(settle);
    } else {
        check_console(case, vm.console_log(), Instant::now() + settle, report);
    }
    if let Some(listener) = listener {
        listener.check(report);
    }
    // A guest expected to be gone gets a short look only.
    let patience = if case.agent_alive {
        ALIVE_TIMEOUT
    } else {
        GONE_TIMEOUT
    };
    let conn = vm.conn();
    conn.set_deadline(Some(Instant::now() + patience));
    let alive = !vm.ended() && vm.conn().ping().is_ok();
    report.evidence("agent_alive_after", alive);
    if case.agent_alive {
        report.check(
            "the guest agent still answers",
            alive,
            "no answer to a ping",
        );
    }
    alive
}

/// Waits until the guest's console shows every line the case names, or `until`; checks each.
fn check_console(case: &Case, log: &Path, until: Instant, report: &mut CaseReport) {
    let console = loop {
        let console = agentos_core::log_tail::read_tail(log, MAX_SCRIPT_OUTPUT_BYTES as u64)
            .unwrap_or_default();
        let all = case
            .console_has
            .iter()
            .all(|t| console.contains(t.as_str()));
        if all || Instant::now() >= until {
            break console;
        }
        std::thread::sleep(CONSOLE_POLL);
    };
    report.evidence(
        "console",
        agentos_core::log_tail::last_lines(&console, CONSOLE_EVIDENCE_LINES).join("\n"),
    );
    for text in &case.console_has {
        report.check(
            format!("the console has `{text}`"),
            console.contains(text.as_str()),
            "",
        );
    }
}

/// The CPU the VMM's cgroup used while the script ran, against its quota.
fn check_throttled(
    spec: &VmSpec,
    cgroup: Option<&agentos_core::cgroup::AgentCgroup>,
    before: Option<(agentos_core::cgroup::CgroupStats, Instant)>,
    report: &mut CaseReport,
) {
    let (Some(cgroup), Some((before, since))) = (cgroup, before) else {
        report.check("the VMM has a cgroup", false, "no cgroup on this host");
        return;
    };
    let after = cgroup.stats();
    let wall_us = since.elapsed().as_micros() as f64;
    let used_us = after.cpu_usage_us.saturating_sub(before.cpu_usage_us) as f64;
    let quota = spec.cpus.unwrap_or(1.0);
    let share = used_us / wall_us.max(1.0);
    report.evidence("cpu_share", (share * 1000.0).round() / 1000.0);
    report.evidence("cpu_quota", quota);
    report.evidence(
        "throttled_periods",
        after.nr_throttled.saturating_sub(before.nr_throttled),
    );
    report.check(
        "the cgroup throttled the VMM",
        after.nr_throttled > before.nr_throttled,
        format!("{} periods", after.nr_throttled - before.nr_throttled),
    );
    // A tenth of a CPU of slack: the quota is enforced per 100 ms period, plus the VMM's own
    // threads between periods.
    report.check(
        format!("CPU use within the quota of {quota}"),
        share <= quota + 0.1,
        format!("{share:.3} CPUs"),
    );
}

/// A host-side listener on one of a VM's vsock ports that reads each connection with the
/// host's own protocol decoder (the code that reads the guest agent's control connection).
struct HostListener {
    path: PathBuf,
    seen: Arc<Mutex<Connections>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the listener saw: counts of every connection, the first few outcomes in words (a guest
/// may connect without end).
#[derive(Default)]
struct Connections {
    refused: u64,
    accepted: u64,
    outcomes: Vec<String>,
}

/// Outcomes a listener keeps in words.
const LISTEN_OUTCOMES_KEPT: usize = 32;

impl Connections {
    fn note(&mut self, refused: bool, what: String) {
        if refused {
            self.refused += 1;
        } else {
            self.accepted += 1;
        }
        if self.outcomes.len() < LISTEN_OUTCOMES_KEPT {
            self.outcomes.push(what);
        }
    }
}

/// How long the harness waits for the answer to what it asks a connection that passed the
/// handshake, what it keeps of the output, and how much later than that its wait may end.
const LISTEN_REQUEST_LIMIT: Duration = Duration::from_secs(5);
const LISTEN_OUTPUT_BYTES: usize = 64 * 1024;
const LISTEN_DEADLINE_SLACK: Duration = Duration::from_secs(2);

/// Asks `request` of a connection that passed the handshake, as the daemon would (a deadline,
/// output kept up to a bound); whether the host refused what came back, and how it went.
fn ask(mut conn: AgentConnection, request: ListenRequest) -> (bool, String) {
    let started = Instant::now();
    conn.set_deadline(Some(agentos_core::deadline::from_now(LISTEN_REQUEST_LIMIT)));
    let answer = match request {
        ListenRequest::Exec => {
            let mut out = CappedOutput::new(LISTEN_OUTPUT_BYTES);
            let mut err = CappedOutput::new(LISTEN_OUTPUT_BYTES);
            let status = conn.exec(
                ExecRequest {
                    run: Program::new("/bin/true"),
                    ..Default::default()
                },
                ExecIo {
                    stdin: None,
                    stdout: &mut out,
                    stderr: &mut err,
                },
            );
            status.map(|s| format!("exited {s:?}, {} bytes kept", out.bytes.len()))
        }
        ListenRequest::Infer => conn
            .infer(InferRequest {
                id: 0,
                model: "eval".into(),
                task: Task::Classify,
                inputs: vec!["text".into()],
                options: Default::default(),
            })
            .map(|reply| excerpt(&format!("{reply:?}"))),
    };
    let took = started.elapsed();
    match answer {
        Ok(what) => (false, format!("answered as a guest agent: {what}")),
        // Ending later than the deadline means a guest could hold the host.
        Err(e) if took > LISTEN_REQUEST_LIMIT + LISTEN_DEADLINE_SLACK => (
            false,
            format!(
                "held the host {:.1} s, past its deadline: {}",
                took.as_secs_f64(),
                agentos_protocol::error_chain(&e)
            ),
        ),
        Err(e) => (
            true,
            format!(
                "refused after the hello in {:.1} s: {}",
                took.as_secs_f64(),
                agentos_protocol::error_chain(&e)
            ),
        ),
    }
}

impl HostListener {
    fn start(path: &Path, request: Option<ListenRequest>) -> Self {
        let _ = std::fs::remove_file(path);
        let seen = Arc::new(Mutex::new(Connections::default()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Made as the daemon makes its sockets: the jailed VMM (another uid) may connect.
        let listener = agentos_core::rundir::listen(path).and_then(|l| {
            l.set_nonblocking(true)?;
            Ok(l)
        });
        let (seen_by_thread, s) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let note = |refused, what| {
                if let Ok(mut seen) = seen_by_thread.lock() {
                    seen.note(refused, what);
                }
            };
            let Ok(listener) = listener else {
                note(false, "cannot listen".to_owned());
                return;
            };
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        match AgentConnection::handshake(stream, LISTEN_HANDSHAKE) {
                            Ok(conn) => match request {
                                Some(request) => {
                                    let (refused, what) = ask(conn, request);
                                    note(refused, what);
                                }
                                None => note(false, "accepted as a guest agent".to_owned()),
                            },
                            Err(e) => note(
                                true,
                                format!("refused: {}", agentos_protocol::error_chain(&e)),
                            ),
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self {
            path: path.to_owned(),
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn check(mut self, report: &mut CaseReport) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let Ok(seen) = self.seen.lock() else {
            return;
        };
        report.evidence("host_decoder", seen.outcomes.clone());
        report.evidence("host_decoder_refused", seen.refused);
        report.check(
            "the host's decoder refused every connection",
            seen.refused > 0 && seen.accepted == 0,
            format!(
                "{} refused, {} not: {}",
                seen.refused,
                seen.accepted,
                seen.outcomes.join("; ")
            ),
        );
    }
}

impl Drop for HostListener {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `agentos ARGS` with our binary, VMs run directly (we are where they can boot).
pub(super) fn agentos() -> Command {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("agentos"));
    let mut cmd = Command::new(exe);
    cmd.env(crate::carrier::IN_CARRIER_ENV, "1");
    cmd
}

/// Waits for `child` to end within `limit` (killing it past that) and returns its output. A
/// pipe that a descendant of the child still holds open is read for [`PIPE_GRACE`] more, then
/// left: the case goes on with what arrived.
pub(super) fn finish(mut child: Child, limit: Duration) -> (Option<i32>, String, String) {
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    // Kept up to a bound: a group's results carry what its guests wrote.
    let read = |pipe: Option<Box<dyn Read + Send>>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut kept = CappedOutput::new(MAX_SCRIPT_OUTPUT_BYTES);
            if let Some(mut pipe) = pipe {
                let _ = std::io::copy(&mut pipe, &mut kept);
            }
            let _ = tx.send(String::from_utf8_lossy(&kept.bytes).into_owned());
        });
        rx
    };
    let out = read(stdout.map(|p| Box::new(p) as Box<dyn Read + Send>));
    let err = read(stderr.map(|p| Box::new(p) as Box<dyn Read + Send>));
    let deadline = Instant::now() + limit;
    let code = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status.code(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let collect = |rx: std::sync::mpsc::Receiver<String>| {
        rx.recv_timeout(PIPE_GRACE)
            .unwrap_or_else(|_| "(output still held open by a process the command left)".into())
    };
    (code, collect(out), collect(err))
}

/// How long a command's pipes are read after it ended.
const PIPE_GRACE: Duration = Duration::from_secs(10);

pub(super) fn group_case(case: &Case, env: &Env, report: &mut CaseReport) {
    let Some(file) = &case.group_file else {
        return;
    };
    let name = crate::group::file::load(file).map(|g| g.name);
    let state = name
        .as_ref()
        .ok()
        .map(|n| image::default_cache_dir().join("groups").join(n));
    let state_existed = state.as_ref().is_some_and(|s| s.exists());
    let input = env.scratch.join(format!("{}.input", case.name));
    if let Err(e) = std::fs::write(&input, &case.input) {
        report.check("the input is written", false, e.to_string());
        return;
    }
    let child = agentos()
        .args(["group", "run", "--json", "--carrier", "never", "--timeout"])
        .arg(case.timeout_s.to_string())
        .arg("--input")
        .arg(&input)
        .arg("--socket")
        .arg(env.scratch.join("no-daemon.sock"))
        .arg("--extra-initrd")
        .arg(&env.probe_initrd)
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let (code, stdout, stderr) = match child {
        Ok(child) => finish(child, COMMAND_LIMIT),
        Err(e) => {
            report.check("`agentos group run` starts", false, e.to_string());
            return;
        }
    };
    if let (Some(state), false) = (&state, state_existed) {
        let _ = std::fs::remove_dir_all(state);
    }
    report.evidence("exit_code", code);
    report.evidence("stderr", excerpt(&stderr));
    let Ok(run) = serde_json::from_str::<Value>(&stdout) else {
        report.check("`group run` prints its report", false, excerpt(&stdout));
        return;
    };
    let counters = run["counters"].clone();
    let results: Vec<Value> = run["results"].as_array().cloned().unwrap_or_default();
    report.evidence("router_counters", counters.clone());
    report.evidence(
        "results",
        results
            .iter()
            .map(|r| json!({"from": r["from"], "body": excerpt(r["body"].as_str().unwrap_or(""))}))
            .collect::<Vec<_>>(),
    );
    let refusals: Vec<Value> = run["trace"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter(|e| e["event"] == "refused" || e.get("claimed_from").is_some())
                .take(10)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    report.evidence("trace_refusals_and_claims", refusals);
    for (counter, min) in &case.counters_min {
        let found = checks::metric(&counters, counter);
        report.check(
            format!("router counter {counter} >= {min}"),
            found.is_some_and(|v| v >= *min),
            format!("{found:?}"),
        );
    }
    report.check(
        format!("at least {} result(s) reach the output", case.results_min),
        results.len() >= case.results_min,
        format!("{}", results.len()),
    );
    check_queued(case, &run["trace"], report);
    let bodies: String = results
        .iter()
        .filter_map(|r| r["body"].as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for text in &case.stdout_has {
        report.check(
            format!("a result has `{text}`"),
            bodies.contains(text.as_str()),
            "",
        );
    }
    for text in &case.stdout_lacks {
        report.check(
            format!("no result has `{text}`"),
            !bodies.contains(text.as_str()),
            "",
        );
    }
}

/// Checks that the messages on each channel the case bounds waited at most their bound in the
/// router (the `queued_ms` of their `message` events in the trace); a channel whose messages
/// were never traced fails.
fn check_queued(case: &Case, trace: &Value, report: &mut CaseReport) {
    let events = trace.as_array().map(Vec::as_slice).unwrap_or_default();
    for bound in &case.queued_ms_max {
        let waits: Vec<f64> = events
            .iter()
            .filter(|e| e["event"] == "message" && e["from"] == bound.from && e["to"] == bound.to)
            .filter_map(|e| e["queued_ms"].as_f64())
            .collect();
        let longest = waits.iter().copied().reduce(f64::max);
        report.evidence(
            &format!("queued_ms {} -> {}", bound.from, bound.to),
            waits.clone(),
        );
        report.check(
            format!(
                "messages {} -> {} waited at most {} ms in the router",
                bound.from, bound.to, bound.max_ms
            ),
            longest.is_some_and(|ms| ms <= bound.max_ms as f64),
            match longest {
                Some(ms) => format!("{ms:.0} ms at most, of {} messages", waits.len()),
                None => "no message traced on that channel".to_owned(),
            },
        );
    }
}

/// One HTTP request (`body` as is, its length declared as `length`, the body's own unless given)
/// and the reply, if one came: `{"ok": BODY}` for a success, the error's body otherwise.
fn api_call_within(
    socket: &Path,
    method: &str,
    target: &str,
    body: &[u8],
    length: Option<u64>,
    limit: Duration,
) -> Result<Value, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(limit))
        .map_err(|e| e.to_string())?;
    let _ = stream.write_all(&raw::request(method, target, body, length));
    match raw::read_reply(&mut std::io::BufReader::new(stream)) {
        Ok(reply) if reply.kind() == "ok" => Ok(json!({ "ok": reply.json() })),
        Ok(reply) => match reply.json() {
            Value::Null => Err(format!("status {} without an error body", reply.status)),
            error => Ok(error),
        },
        Err(e) => Err(format!("no usable reply: {e}")),
    }
}

/// `request` as the daemon's clients send it, and the reply.
fn request(socket: &Path, request: &Request) -> Result<Value, String> {
    request_within(socket, request, COMMAND_LIMIT)
}

fn request_within(socket: &Path, request: &Request, limit: Duration) -> Result<Value, String> {
    let call = routes::call(request);
    api_call_within(
        socket,
        call.method.as_str(),
        &call.target,
        call.body.as_deref().unwrap_or_default(),
        None,
        limit,
    )
}

/// A spawn of `name` with the harness's memory, never restarted.
fn spawn_request(name: &str, wait: bool) -> Request {
    Request::Spawn(SpawnRequest {
        name: name.to_owned(),
        memory_mib: Some(DEFAULT_MEMORY_MIB),
        restart: RestartPolicy::Never,
        wait,
        ..SpawnRequest::default()
    })
}

fn rm_request(name: &str) -> Request {
    Request::Rm(RmRequest {
        name: name.to_owned(),
        force: true,
    })
}

/// `ok`, or the error kind of a reply.
fn reply_kind(reply: &Result<Value, String>) -> String {
    match reply {
        Ok(v) if v.get("ok").is_some() => "ok".to_owned(),
        Ok(v) => v["error"]["kind"].as_str().unwrap_or("?").to_owned(),
        Err(e) => format!("({e})"),
    }
}

/// A daemon of the harness's own, on a socket in its scratch directory, stopped when dropped.
struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Daemon {
    fn start(env: &Env) -> Result<Self, String> {
        let socket = env.scratch.join("daemon.sock");
        let log =
            std::fs::File::create(env.scratch.join("daemon.log")).map_err(|e| e.to_string())?;
        let child = agentos()
            .arg("daemon")
            .arg("--socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut daemon = Self { child, socket };
        let deadline = Instant::now() + Duration::from_secs(60);
        while request(&daemon.socket, &Request::Version).is_err() {
            if Instant::now() >= deadline || matches!(daemon.child.try_wait(), Ok(Some(_))) {
                return Err("the daemon did not come up".to_owned());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(daemon)
    }

    /// SIGTERM, and the daemon's exit status.
    fn stop(mut self) -> Option<i32> {
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.code(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return None;
                }
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Name of the agent an `api` case keeps running while it sends its requests.
const API_AGENT: &str = "eval-target";

pub(super) fn api_case(case: &Case, env: &Env, report: &mut CaseReport) {
    let daemon = match Daemon::start(env) {
        Ok(d) => d,
        Err(why) => {
            report.check("the daemon starts", false, why);
            return;
        }
    };
    let socket = daemon.socket.clone();
    let up = request(&socket, &spawn_request(API_AGENT, true));
    report.check(
        "an agent runs under the daemon",
        reply_kind(&up) == "ok",
        format!("{up:?}"),
    );
    let slow = case
        .slow_clients_s
        .map(|secs| SlowClients::start(&socket, Duration::from_secs(secs)));
    let flood = case
        .flood
        .as_ref()
        .and_then(|flood| FloodClients::start(&socket, flood, report));
    let replies: Vec<Value> = case
        .requests
        .iter()
        .map(|req| api_request(&socket, req, report))
        .collect();
    report.evidence("replies", replies);
    if let Some(flood) = flood {
        flood.check(&socket, report);
    }
    match slow {
        Some(Ok(slow)) => slow.check(report),
        Some(Err(why)) => report.check("the stalling clients connect", false, why),
        None => {}
    }
    if case.race_spawn > 0 {
        race_spawn(&socket, case.race_spawn, report);
    }
    if case.read_logs {
        read_logs_to_end(&socket, API_AGENT, report);
    }
    let exec = request(
        &socket,
        &Request::Exec(ExecCall {
            name: API_AGENT.into(),
            run: Program::new("/bin/echo").with_args(["still here"]),
            stdin: None,
        }),
    );
    report.check(
        "the agent still runs programs afterwards",
        exec.as_ref()
            .is_ok_and(|r| r["ok"]["stdout"] == "still here\n"),
        format!("{exec:?}"),
    );
    let code = daemon.stop();
    report.evidence("daemon_exit", code);
    report.check(
        "the daemon stops cleanly",
        code == Some(0),
        format!("{code:?}"),
    );
}

/// Sends one of a case's requests and checks its reply; returns it as evidence.
fn api_request(socket: &Path, req: &ApiRequest, report: &mut CaseReport) -> Value {
    let limit = req.within.map_or(COMMAND_LIMIT, Duration::from_secs);
    let asked = Instant::now();
    let reply = api_call_within(
        socket,
        &req.method,
        &req.path,
        req.body.as_bytes(),
        req.length,
        limit,
    );
    let took = asked.elapsed();
    let kind = reply_kind(&reply);
    let message = reply
        .as_ref()
        .ok()
        .and_then(|r| r["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let request = excerpt_line(&format!("{} {} {}", req.method, req.path, req.body));
    report.check(
        format!("`{request}` is answered `{}`", req.reply),
        kind == req.reply,
        format!("{kind}: {message}"),
    );
    if let Some(secs) = req.within {
        report.check(
            format!("`{request}` is answered within {secs} s"),
            reply.is_ok() && took <= Duration::from_secs(secs),
            format!("{:.1} s", took.as_secs_f64()),
        );
    }
    if let Some(text) = &req.message_has {
        report.check(
            format!("the message to `{request}` has `{text}`"),
            message.contains(text.as_str()),
            message.clone(),
        );
    }
    for (field, expected) in &req.ok_fields {
        let found = reply.as_ref().ok().map(|r| &r["ok"][field.as_str()]);
        report.check(
            format!("`{request}` answers {field} = {expected}"),
            found == Some(expected),
            format!("{found:?}"),
        );
    }
    json!({
        "request": request,
        "reply": kind,
        "message": message,
        "ms": took.as_millis() as u64,
    })
}

/// Clients that stall: one says nothing, one sends part of a request's head, one a head and part
/// of its body. The daemon must drop each within `limit` of their start.
struct SlowClients {
    started: Instant,
    limit: Duration,
    clients: Vec<(&'static str, UnixStream)>,
}

impl SlowClients {
    fn start(socket: &Path, limit: Duration) -> Result<Self, String> {
        let started = Instant::now();
        let stalls: [(&'static str, &[u8]); 3] = [
            ("a client that says nothing", b""),
            (
                "a client that stops inside a request's head",
                b"GET /agents HTTP/1.1\r\nHo",
            ),
            (
                "a client that stops inside a request's body",
                b"POST /agents HTTP/1.1\r\nHost: a\r\nContent-Length: 64\r\n\r\n{\"name\":",
            ),
        ];
        let clients = stalls
            .into_iter()
            .map(|(what, sent)| {
                let mut stream = UnixStream::connect(socket).map_err(|e| e.to_string())?;
                stream.write_all(sent).map_err(|e| e.to_string())?;
                Ok((what, stream))
            })
            .collect::<Result<_, String>>()?;
        Ok(Self {
            started,
            limit,
            clients,
        })
    }

    fn check(self, report: &mut CaseReport) {
        let mut seen = Vec::new();
        for (what, mut stream) in self.clients {
            let left = self
                .limit
                .saturating_sub(self.started.elapsed())
                .max(Duration::from_millis(1));
            let mut sink = Vec::new();
            let closed = stream
                .set_read_timeout(Some(left))
                .and_then(|()| stream.read_to_end(&mut sink))
                .is_ok();
            let after = self.started.elapsed().as_secs_f64();
            seen.push(json!({"client": what, "closed": closed, "after_s": after}));
            report.check(
                format!("the daemon drops {what} within {} s", self.limit.as_secs()),
                closed,
                format!("{after:.1} s: {}", excerpt(&String::from_utf8_lossy(&sink))),
            );
        }
        report.evidence("slow_clients", seen);
    }
}

/// The agents a flood's clients run programs in are named this, then a number from 0.
const FLOOD_AGENT: &str = "eval-flood";
/// How long the flood's clients get to reach the daemon before the case's requests.
const FLOOD_SETTLE: Duration = Duration::from_secs(2);
/// How long each flooding client waits for its reply.
const FLOOD_REPLY_LIMIT: Duration = Duration::from_secs(180);

/// Clients that each run a program in one of the flood's agents at once: each agent runs one
/// and queues 31 (the rest are refused), and each of those holds a connection.
struct FloodClients {
    agents: Vec<String>,
    clients: Vec<std::thread::JoinHandle<String>>,
}

impl FloodClients {
    fn start(socket: &Path, flood: &Flood, report: &mut CaseReport) -> Option<Self> {
        let agents: Vec<String> = (0..flood.agents)
            .map(|i| format!("{FLOOD_AGENT}-{i}"))
            .collect();
        for agent in &agents {
            let up = request(socket, &spawn_request(agent, true));
            report.check(
                format!("agent `{agent}` runs, for the flood"),
                reply_kind(&up) == "ok",
                format!("{up:?}"),
            );
            if reply_kind(&up) != "ok" {
                return None;
            }
        }
        let clients = (0..flood.clients)
            .map(|i| {
                let exec = Request::Exec(ExecCall {
                    name: agents[i % agents.len()].clone(),
                    run: Program::new(flood.program.as_str()).with_args(flood.args.iter()),
                    stdin: None,
                });
                let socket = socket.to_owned();
                std::thread::spawn(move || {
                    reply_kind(&request_within(&socket, &exec, FLOOD_REPLY_LIMIT))
                })
            })
            .collect();
        std::thread::sleep(FLOOD_SETTLE);
        Some(Self { agents, clients })
    }

    /// Removes the flood's agents (which ends the programs of those still running); every
    /// flooding client must have been answered.
    fn check(self, socket: &Path, report: &mut CaseReport) {
        for agent in &self.agents {
            let rm = request(socket, &rm_request(agent));
            report.check(
                format!("the flood's agent `{agent}` is removed"),
                reply_kind(&rm) == "ok",
                format!("{rm:?}"),
            );
        }
        let kinds: Vec<String> = self
            .clients
            .into_iter()
            .map(|c| c.join().unwrap_or_else(|_| "(thread failed)".to_owned()))
            .collect();
        let mut counts = std::collections::BTreeMap::<&str, usize>::new();
        for kind in &kinds {
            *counts.entry(kind.as_str()).or_default() += 1;
        }
        report.evidence("flood_replies", json!(counts));
        // A kind in parentheses is the harness's own failure: no usable reply came.
        let unanswered = kinds.iter().filter(|k| k.starts_with('(')).count();
        report.check(
            format!(
                "every one of the {} flooding clients is answered",
                kinds.len()
            ),
            unanswered == 0,
            format!("{counts:?}"),
        );
    }
}

/// The most `logs` reads a log can need (32 MiB of control bytes at 75 KiB a reply is 440).
const MAX_LOG_READS: usize = 10_000;

/// Reads `agent`'s log to its end as `agentos logs` does: every reply must arrive and move
/// `next_offset` on.
fn read_logs_to_end(socket: &Path, agent: &str, report: &mut CaseReport) {
    let mut offset = 0;
    let mut chunks = 0;
    let failure = loop {
        if chunks >= MAX_LOG_READS {
            break Some(format!("{MAX_LOG_READS} reads did not reach the end"));
        }
        let reply = request(
            socket,
            &Request::Logs(LogsRequest {
                name: agent.to_owned(),
                offset,
            }),
        );
        let chunk = match &reply {
            Ok(r) if r.get("ok").is_some() => &r["ok"],
            _ => {
                break Some(format!(
                    "at offset {offset}: {} {}",
                    reply_kind(&reply),
                    reply
                        .as_ref()
                        .map(|r| r["error"]["message"].to_string())
                        .unwrap_or_default()
                ));
            }
        };
        let next = chunk["next_offset"].as_u64().unwrap_or(0);
        if chunk["text"].as_str().is_none_or(str::is_empty) {
            break None;
        }
        if next <= offset {
            break Some(format!("next_offset {next} did not move past {offset}"));
        }
        offset = next;
        chunks += 1;
    };
    report.evidence("log_chunks", chunks);
    report.evidence("log_bytes", offset);
    report.check(
        "the log reads to its end, every reply moving forward",
        failure.is_none(),
        failure.unwrap_or_default(),
    );
    report.check(
        "the log took more than one reply",
        chunks > 1,
        format!("{chunks} replies"),
    );
}

/// `clients` connections spawn the same name at once: one wins, the others are told the name
/// is taken; the winner is then removed.
fn race_spawn(socket: &Path, clients: usize, report: &mut CaseReport) {
    let spawn = spawn_request("eval-race", false);
    let barrier = Arc::new(std::sync::Barrier::new(clients));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (socket, spawn, barrier) = (socket.to_owned(), spawn.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                reply_kind(&request(&socket, &spawn))
            })
        })
        .collect();
    let kinds: Vec<String> = threads
        .into_iter()
        .map(|t| t.join().unwrap_or_else(|_| "(thread failed)".to_owned()))
        .collect();
    report.evidence("race_replies", kinds.clone());
    let won = kinds.iter().filter(|k| *k == "ok").count();
    let lost = kinds.iter().filter(|k| *k == "duplicate_name").count();
    report.check(
        format!("of {clients} racing spawns one wins, the others get duplicate_name"),
        won == 1 && lost == clients - 1,
        kinds.join(", "),
    );
    let rm = request(socket, &rm_request("eval-race"));
    report.check(
        "the winner is removed",
        reply_kind(&rm) == "ok",
        format!("{rm:?}"),
    );
}

fn excerpt_line(text: &str) -> String {
    let line: String = text.chars().take(80).collect();
    line.replace('\n', " ")
}
