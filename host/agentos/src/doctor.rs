//! `agentos doctor`: what this host offers agentos, each finding with what to do about it; and
//! the probe that decides whether this host's KVM can boot Linux guests or a carrier is needed.

use std::fs;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::pci::{self, PciDevice};
use crate::qemu;
use agentos_core::agent::spec::AgentSpec;
use agentos_core::agent::vm::AgentVm;
use agentos_core::cgroup::{Controller, Layout};
use agentos_image::{self as image, AGENT_IMAGE, CARRIER_IMAGE};
use agentos_jail::JailLevel;

/// A Linux guest that is not up by then is taken as not booting.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
const PROBE_FILE: &str = "kvm-probe.json";
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// Print the findings as JSON.
    #[arg(long)]
    pub json: bool,
    /// Boot a Linux guest on this host's KVM even when a cached or known answer exists.
    #[arg(long)]
    pub probe: bool,
    /// Print only where VMs run here: `direct`, `carrier` or `unknown` (for scripts).
    #[arg(long, conflicts_with = "json")]
    pub placement: bool,
}

/// Whether this host's KVM boots the agent image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "linux_guests", rename_all = "snake_case")]
pub enum LinuxKvm {
    Usable { boot_ms: u64 },
    Unusable { reason: String },
    Unknown { reason: String },
}

#[derive(Serialize, Deserialize)]
struct CachedProbe {
    boot_id: String,
    result: LinuxKvm,
}

fn boot_id() -> String {
    fs::read_to_string(BOOT_ID)
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The answer for this host, probed at most once per host boot (cached in `cache`).
pub fn linux_kvm(cache: &Path, force_probe: bool) -> LinuxKvm {
    let kvm = Path::new("/dev/kvm");
    if !kvm.exists() {
        return LinuxKvm::Unusable {
            reason: "there is no /dev/kvm".into(),
        };
    }
    if let Err(e) = fs::OpenOptions::new().read(true).write(true).open(kvm) {
        return LinuxKvm::Unknown {
            reason: format!(
                "cannot open /dev/kvm ({e}): add your user to its group (usually `kvm`)"
            ),
        };
    }
    let cache_file = cache.join(PROBE_FILE);
    let boot_id = boot_id();
    if !force_probe
        && let Ok(bytes) = fs::read(&cache_file)
        && let Ok(cached) = serde_json::from_slice::<CachedProbe>(&bytes)
        && cached.boot_id == boot_id
    {
        return cached.result;
    }
    let result = if !force_probe && Path::new("/sys/module/kvm_pvm").exists() {
        LinuxKvm::Unusable {
            reason:
                "its KVM is kvm_pvm, whose instruction emulation cannot run a stock Linux kernel"
                    .into(),
        }
    } else {
        probe_linux(cache)
    };
    if !matches!(result, LinuxKvm::Unknown { .. }) {
        let cached = CachedProbe {
            boot_id,
            result: result.clone(),
        };
        if let Ok(bytes) = serde_json::to_vec(&cached) {
            let _ = fs::create_dir_all(cache);
            let _ = fs::write(&cache_file, bytes);
        }
    }
    result
}

/// Boots the agent image directly on this host's KVM and waits for its agent.
fn probe_linux(cache: &Path) -> LinuxKvm {
    let mut opts = match AgentSpec::default().boot_options(cache) {
        Ok(opts) => opts,
        Err(_) => {
            return LinuxKvm::Unknown {
                reason: "no agent image to probe with: run `scripts/setup`".into(),
            };
        }
    };
    opts.boot_timeout = PROBE_TIMEOUT;
    match AgentVm::boot(&opts) {
        Ok(vm) => {
            let boot_ms = vm.boot_time().as_millis() as u64;
            vm.shutdown();
            LinuxKvm::Usable { boot_ms }
        }
        Err(e) => LinuxKvm::Unusable {
            reason: format!("a probe boot failed: {}", first_line(&format!("{e:#}"))),
        },
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

#[derive(Serialize)]
struct Finding {
    what: &'static str,
    ok: bool,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

fn finding(what: &'static str, ok: bool, detail: String, fix: Option<&str>) -> Finding {
    Finding {
        what,
        ok,
        detail,
        fix: fix.map(str::to_string),
    }
}

fn kvm_finding() -> Finding {
    let modules: Vec<&str> = ["kvm_intel", "kvm_amd", "kvm_pvm"]
        .into_iter()
        .filter(|m| Path::new("/sys/module").join(m).exists())
        .collect();
    let present = Path::new("/dev/kvm").exists();
    let detail = if present {
        format!(
            "/dev/kvm present (module: {})",
            if modules.is_empty() {
                "built in".into()
            } else {
                modules.join(", ")
            }
        )
    } else {
        "no /dev/kvm".into()
    };
    finding("kvm", present, detail, (!present).then_some("enable virtualisation in the BIOS or the cloud instance type, and load kvm_intel or kvm_amd; without it agentos runs VMs in the QEMU carrier"))
}

fn linux_finding(cache: &Path, force: bool) -> (Finding, LinuxKvm) {
    let result = linux_kvm(cache, force);
    let f = match &result {
        LinuxKvm::Usable { boot_ms } => finding(
            "linux_guests",
            true,
            format!(
                "this host's KVM boots Linux guests (probe booted in {boot_ms} ms); VMs run directly"
            ),
            None,
        ),
        LinuxKvm::Unusable { reason } => finding(
            "linux_guests",
            true,
            format!(
                "this host's KVM cannot boot Linux: {reason}; VMs run in the QEMU carrier (software CPU, much slower)"
            ),
            Some("for full speed, run on bare metal or a cloud VM with nested virtualisation"),
        ),
        LinuxKvm::Unknown { reason } => finding(
            "linux_guests",
            false,
            reason.clone(),
            Some("run `scripts/setup`, then `agentos doctor` again"),
        ),
    };
    (f, result)
}

fn cgroup_findings() -> Vec<Finding> {
    let layout = Layout::discover();
    let missing: Vec<&str> = [Controller::Cpu, Controller::Memory]
        .into_iter()
        .filter(|c| layout.hierarchy(*c).is_none())
        .map(Controller::name)
        .collect();
    vec![finding(
        "cgroups",
        missing.is_empty(),
        format!(
            "agent slices use {}",
            layout.describe().join(", ")
        ),
        (!missing.is_empty()).then_some(
            "mount cgroup2 (mount -t cgroup2 none /sys/fs/cgroup) or the v1 cpu and memory controllers; without them --cpus and --weight are refused",
        ),
    )]
}

fn vsock_finding() -> Finding {
    let vhost = Path::new("/dev/vhost-vsock").exists();
    finding(
        "vsock",
        true,
        format!(
            "the VMM's own userspace virtio-vsock is used (host side: Unix sockets); /dev/vhost-vsock {}",
            if vhost {
                "present (not needed)"
            } else {
                "absent (not needed)"
            }
        ),
        None,
    )
}

/// Where run directories go, and whether agentos may use it.
fn run_dir_finding() -> Finding {
    match agentos_core::rundir::base() {
        Ok(base) => finding(
            "run_dir",
            true,
            format!("{} (yours, mode 0700)", base.path().display()),
            None,
        ),
        Err(e) => finding("run_dir", false, e.to_string(), None),
    }
}

/// The jail a VMM started by this user gets: full as root, rootless (user namespaces) for
/// others; a VMM whose jail cannot be built does not start.
fn jail_finding() -> Finding {
    if JailLevel::for_this_process(false) == JailLevel::Full {
        return match agentos_core::rundir::vmm_ids() {
            Ok((first, last)) => finding(
                "jail",
                true,
                format!(
                    "full: each VMM in its own namespaces and private root, as a user of its own (ids {first}-{last}, {})",
                    agentos_core::rundir::VMM_IDS_ENV
                ),
                None,
            ),
            Err(e) => finding("jail", false, e.to_string(), None),
        };
    }
    match user_namespaces() {
        Ok(()) => finding(
            "jail",
            true,
            "rootless: each VMM in a user namespace of its own, with its own namespaces and private root".into(),
            None,
        ),
        Err(e) => finding(
            "jail",
            false,
            format!("user namespaces are not available to this user ({e}): VMs will not start"),
            Some(
                "run agentos as root, or allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces); --no-jail runs VMMs unconfined",
            ),
        ),
    }
}

/// Whether this user may create a user namespace with mount and PID namespaces in it, as the
/// rootless jail does: tried in a child process, which this one cannot be turned into.
fn user_namespaces() -> std::io::Result<()> {
    // SAFETY: the child calls only unshare and _exit, which are async-signal-safe, so forking a
    // process that may have threads is sound.
    let child = unsafe { libc::fork() };
    if child == 0 {
        let flags = libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_NEWPID;
        // SAFETY: unshare takes flags; __errno_location returns this thread's errno; _exit ends
        // the child at once.
        unsafe {
            let code = if libc::unshare(flags) == 0 {
                0
            } else {
                *libc::__errno_location()
            };
            libc::_exit(code.clamp(0, 255));
        }
    }
    if child < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut status = 0;
    // SAFETY: waits for our own child with a valid out pointer.
    if unsafe { libc::waitpid(child, &mut status, 0) } != child {
        return Err(std::io::Error::last_os_error());
    }
    match libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)) {
        Some(0) => Ok(()),
        Some(errno) => Err(std::io::Error::from_raw_os_error(errno)),
        None => Err(std::io::Error::other("the probe process was killed")),
    }
}

fn image_finding(cache: &Path, name: &'static str, what: &'static str) -> Finding {
    match image::find_image(cache, name) {
        Ok(img) => finding(
            what,
            true,
            format!(
                "{} (kernel {}, initrd {:.1} MiB)",
                img.dir.display(),
                img.manifest.kernel.release,
                img.manifest.initrd.size as f64 / (1 << 20) as f64
            ),
            None,
        ),
        Err(e) => finding(
            what,
            false,
            format!("{e}"),
            Some("run `scripts/setup` (or `agentos image build`)"),
        ),
    }
}

/// The oldest QEMU whose SVM emulation carried many VMs without crashing.
/// A PCI device as `doctor` reports it: what passing it to an agent still needs.
#[derive(Serialize)]
struct PciReport {
    #[serde(flatten)]
    device: PciDevice,
    ready: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<String>,
}

/// The IOMMU, VFIO, and every PCI device with what passing it to an agent needs. Optional: a host
/// without an IOMMU runs agents on CPU slices, so these findings never fail.
fn pci_findings() -> (Vec<Finding>, Vec<PciReport>) {
    let devices = match pci::devices(Path::new(pci::SYSFS_PCI_DEVICES)) {
        Ok(devices) => devices,
        Err(e) => {
            let f = finding(
                "iommu",
                true,
                format!("cannot read {}: {e}", pci::SYSFS_PCI_DEVICES),
                None,
            );
            return (vec![f], Vec::new());
        }
    };
    let mut groups: Vec<u32> = devices.iter().filter_map(|d| d.iommu_group).collect();
    groups.sort_unstable();
    groups.dedup();
    let iommu = if groups.is_empty() {
        finding(
            "iommu",
            true,
            "off or absent (no IOMMU groups): PCI devices cannot be passed to agents".into(),
            Some(
                "for PCI passthrough, enable VT-d or AMD-Vi in the firmware and boot with intel_iommu=on (or amd_iommu=on) iommu=pt",
            ),
        )
    } else {
        finding(
            "iommu",
            true,
            format!(
                "on: {} IOMMU groups, {} PCI devices",
                groups.len(),
                devices.len()
            ),
            None,
        )
    };
    let container = Path::new("/dev/vfio/vfio").exists();
    let driver = Path::new("/sys/bus/pci/drivers")
        .join(pci::VFIO_DRIVER)
        .exists();
    let reports: Vec<PciReport> = devices
        .iter()
        .map(|d| {
            let problem = pci::readiness(d, &devices).err().map(|why| why.describe(d));
            PciReport {
                device: d.clone(),
                ready: problem.is_none(),
                problem,
            }
        })
        .collect();
    let bound: Vec<String> = reports
        .iter()
        .filter(|r| r.device.bound_to_vfio())
        .map(|r| {
            format!(
                "{} ({})",
                r.device.address,
                if r.ready { "ready" } else { "not ready" }
            )
        })
        .collect();
    let vfio = if container && driver {
        finding(
            "vfio",
            true,
            format!(
                "/dev/vfio/vfio and the vfio-pci driver present; bound to vfio-pci: {}",
                if bound.is_empty() {
                    "none".to_string()
                } else {
                    bound.join(", ")
                }
            ),
            None,
        )
    } else {
        finding(
            "vfio",
            true,
            format!(
                "{}: PCI devices cannot be passed to agents",
                if container {
                    "the vfio-pci driver is not loaded"
                } else {
                    "no /dev/vfio/vfio"
                }
            ),
            Some("for PCI passthrough, modprobe vfio-pci (on a host with an IOMMU)"),
        )
    };
    (vec![iommu, vfio], reports)
}

const MIN_CARRIER_QEMU: u32 = 8;

fn qemu_finding() -> Finding {
    match qemu::version() {
        Some(line) => {
            let old = qemu::major_version(&line).is_some_and(|major| major < MIN_CARRIER_QEMU);
            let fix = format!(
                "QEMU older than {MIN_CARRIER_QEMU} was seen to crash the carrier's kernel with several VMs running: {}",
                qemu::INSTALL_HINT
            );
            finding("qemu", true, line, old.then_some(fix.as_str()))
        }
        None => finding(
            "qemu",
            false,
            format!(
                "{} not found (needed for the carrier and for `agentos bench`)",
                qemu::QEMU
            ),
            Some(qemu::INSTALL_HINT),
        ),
    }
}

pub fn run(args: &DoctorArgs) -> serde_json::Result<i32> {
    let cache = image::default_cache_dir();
    if args.placement {
        let (word, code) = match linux_kvm(&cache, args.probe) {
            LinuxKvm::Usable { .. } => ("direct", 0),
            LinuxKvm::Unusable { .. } => ("carrier", 0),
            LinuxKvm::Unknown { .. } => ("unknown", 1),
        };
        println!("{word}");
        return Ok(code);
    }
    let (linux, _) = linux_finding(&cache, args.probe);
    let mut findings = vec![kvm_finding(), linux];
    findings.extend(cgroup_findings());
    findings.push(run_dir_finding());
    findings.push(jail_finding());
    findings.push(vsock_finding());
    findings.push(image_finding(&cache, AGENT_IMAGE, "agent_image"));
    findings.push(image_finding(&cache, CARRIER_IMAGE, "carrier_image"));
    findings.push(qemu_finding());
    let (pci, devices) = pci_findings();
    findings.extend(pci);
    if args.json {
        let doc =
            serde_json::json!({ "cache": cache, "findings": findings, "pci_devices": devices });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        for f in &findings {
            println!(
                "{:<14} {:<4} {}",
                f.what,
                if f.ok { "ok" } else { "FAIL" },
                f.detail
            );
            if let Some(fix) = &f.fix {
                println!("{:<14} {:<4} -> {}", "", "", fix);
            }
        }
        // The devices worth a line: those bound for passthrough and GPUs.
        for r in devices
            .iter()
            .filter(|r| r.device.bound_to_vfio() || r.device.base_class() == pci::DISPLAY_CLASS)
        {
            let d = &r.device;
            println!(
                "{:<14} {:<4} {} {:04x}:{:04x} class {:06x} group {}: {}",
                "pci_device",
                if r.ready { "ok" } else { "--" },
                d.address,
                d.vendor,
                d.device,
                d.class,
                d.iommu_group.map_or("-".into(), |g| g.to_string()),
                r.problem
                    .as_deref()
                    .unwrap_or("ready to be passed to an agent")
            );
        }
    }
    Ok(if findings.iter().all(|f| f.ok) { 0 } else { 1 })
}
