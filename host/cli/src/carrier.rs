//! `agentos carrier -- COMMAND...`: run a command in a QEMU carrier whose KVM boots Linux.

use std::io;
use std::path::{Path, PathBuf};

use agentos::carrier::{CarrierRun, DEFAULT_CPUS, DEFAULT_MEMORY_MIB, agent_image_files, run};
use agentos_image as image;
use anyhow::Context;

use crate::flags::parse_env;

/// At most this many carrier vCPUs (QEMU's, emulated one thread each).
const MAX_CPUS: i64 = 64;

#[derive(clap::Args, Debug, Clone)]
pub struct CarrierArgs {
    /// Host file to copy into the carrier at the same path, with its shared libraries
    /// (repeatable).
    #[arg(long = "file", value_name = "PATH")]
    pub files: Vec<PathBuf>,
    /// Carrier memory in MiB.
    #[arg(long, default_value_t = DEFAULT_MEMORY_MIB)]
    pub memory: u64,
    /// Carrier vCPUs. More than one makes QEMU emulate them on several threads, which was seen to
    /// crash the carrier's kernel now and then with many VMs running.
    #[arg(long, default_value_t = DEFAULT_CPUS, value_parser = clap::value_parser!(u8).range(1..=MAX_CPUS))]
    pub cpus: u8,
    /// Copy the carrier's console to stderr.
    #[arg(long)]
    pub console: bool,
    /// Also copy in the disks of every installed model bundle (and the program that builds
    /// them) and of the `base` template, so that `agentos run --model` and `--template base`
    /// work inside.
    #[arg(long)]
    pub models: bool,
    /// Give the carrier an emulated Intel IOMMU with QEMU's `edu` PCI device (1234:11e8), its
    /// `bochs-display` (1234:1111, a display device for `--gpu`), an `ivshmem-plain`
    /// (1af4:1110, a 512 MiB 64-bit BAR) and an `igb` (8086:10c9, MSI-X), each in an IOMMU
    /// group of its own, its kernel booted with `intel_iommu=on iommu=pt` and the VFIO modules loaded:
    /// devices to pass to agents with VFIO. Bind one inside with
    /// `echo 1234 11e8 > /sys/bus/pci/drivers/vfio-pci/new_id`; `agentos doctor` shows them.
    #[arg(long)]
    pub pci_test_device: bool,
    /// Environment variable for the command, NAME=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// The command to run in the carrier, and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// `agentos carrier -- COMMAND...`
pub fn run_command(args: &CarrierArgs) -> anyhow::Result<i32> {
    let mut files = args.files.clone();
    files.extend(agent_image_files());
    if args.models {
        let cache = image::default_cache_dir();
        let img = image::find_image(&cache, image::AGENT_IMAGE)
            .context("--models needs the agent image; run `scripts/setup`")?;
        files.extend(agentos_image::model::carrier_files(
            &agentos_image::model::ModelStore::new(&cache),
            &img.manifest.libraries,
        )?);
        files.extend(agentos_image::template::carrier_files(&cache));
    }
    // So that `agentos eval` runs in any carrier, its suites and probe come along.
    files.extend(agentos::eval::carrier_files());
    let program = Path::new(&args.command[0]);
    if program.is_absolute() && program.is_file() {
        files.push(program.to_path_buf());
    }
    let spec = CarrierRun {
        argv: args.command.clone(),
        env: args.env.iter().cloned().collect(),
        files,
        memory_mib: args.memory,
        cpus: args.cpus,
        console: args.console,
        pci_test_device: args.pci_test_device,
    };
    Ok(run(&spec, &mut io::stdout().lock())?.shell_code())
}
