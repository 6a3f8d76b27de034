//! Flags several commands share: an agent VM's shape and slice, and `--env`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agentos::daemon::api::MAX_BOOT_TIMEOUT_S;
use agentos::placement::CarrierChoice;
use agentos_core::agent::spec::{AgentRequest, AgentSpec};
use agentos_core::agent::vm::BootOptions;
use agentos_core::cgroup::PriorityClass;
use agentos_protocol::Program;
use agentos_vmm::config::MAX_VCPUS;

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

/// Host PCI devices for an agent, as `run` and `spawn` take them.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DeviceArgs {
    /// Pass a host PCI device to the agent with VFIO: vfio:ADDRESS, the address as sysfs names
    /// it (vfio:0000:01:00.0), the device bound to vfio-pci and its IOMMU group viable (`agentos
    /// doctor` says what is missing). Repeatable. `vfio:ADDRESS,mmap=off` traps every access to
    /// the device's BARs instead of mapping them into the guest (slower). Needs a host whose
    /// KVM boots Linux; elsewhere run it inside a carrier that has the device (`agentos carrier
    /// --pci-test-device -- ...` gives one a test device).
    #[arg(long = "device", value_name = "vfio:ADDRESS[,mmap=off]")]
    pub devices: Vec<String>,
    /// Pass N GPUs: devices of PCI class display bound to vfio-pci, groups viable, that no
    /// other agent holds.
    #[arg(long = "gpu", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=31))]
    pub gpus: Option<u32>,
}

impl DeviceArgs {
    pub fn any(&self) -> bool {
        !self.devices.is_empty() || self.gpus.is_some()
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
    /// What the agent has beyond the agent image: `base` gives it GNU bash at /bin/bash and
    /// python3 with its standard library (from a read-only disk all such agents share).
    #[arg(long, value_name = "NAME")]
    pub template: Option<String>,
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

/// The program a command line names (`PROGRAM ARGS...`), with its `--env`, `--cwd` and
/// `--timeout` (seconds).
pub fn program(
    command: &[String],
    env: &[(String, String)],
    cwd: Option<&str>,
    timeout_s: Option<u64>,
) -> Program {
    let (program, args) = command
        .split_first()
        .map_or(("", &[][..]), |(p, a)| (p.as_str(), a));
    Program {
        env: env.iter().cloned().collect(),
        cwd: cwd.map(str::to_owned),
        timeout_ms: timeout_s.map(|s| s.saturating_mul(1000)),
        ..Program::new(program).with_args(args)
    }
}

/// `NAME=VALUE`, for `--env`.
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
        _ => Err(format!("`{s}` is not NAME=VALUE")),
    }
}

impl VmArgs {
    /// The agent these flags ask for, restored `from` a snapshot when one is given (clap keeps
    /// the flags that a snapshot decides from being given beside it).
    pub fn request(&self, from: Option<&Path>) -> AgentRequest {
        AgentRequest {
            vcpus: Some(self.vcpus).filter(|_| from.is_none()),
            memory_mib: self.memory,
            cpus: self.slice.cpus,
            weight: self.slice.weight,
            class: self.slice.class,
            cpuset: self.slice.cpuset.clone(),
            pin: self.slice.pin,
            model: None,
            template: self.template.clone(),
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            disks: self.disk.clone(),
            kernel_args: self.kernel_args.clone(),
            from: from.map(Path::to_owned),
            devices: Vec::new(),
            gpus: None,
        }
    }

    /// Checks what a user can get wrong, before anything is started (the agent given `devices`
    /// too); warns of `--no-jail`.
    pub fn validate(&self, from: Option<&Path>, devices: &DeviceArgs) -> anyhow::Result<AgentSpec> {
        if self.no_jail {
            eprintln!(
                "agentos: WARNING: --no-jail runs the VMM unconfined (no namespaces, private root or capability drop); a guest that breaks out of KVM reaches this host with the VMM's privileges. Use it for debugging only."
            );
        }
        Ok(AgentRequest {
            devices: devices.devices.clone(),
            gpus: devices.gpus,
            ..self.request(from)
        }
        .validate()?)
    }

    /// The VMM's options for `spec`, run as these flags say: console, boot timeout, jail, and
    /// waiting for room.
    pub fn boot_options(&self, spec: &AgentSpec) -> anyhow::Result<BootOptions> {
        let mut opts = spec.boot_options(&agentos_image::default_cache_dir())?;
        opts.console = self.console;
        opts.boot_timeout = Duration::from_secs(self.boot_timeout);
        opts.wait_for_room = self.slice.wait;
        opts.no_jail = self.no_jail;
        Ok(opts)
    }
}
