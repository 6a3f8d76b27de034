//! What an agent is, whoever asks for it. Every front end (the command line's flags, the
//! daemon's spawn requests, group files, eval cases, benchmarks, doctor) fills in an
//! [`AgentRequest`]; [`AgentRequest::validate`] checks it once, with the same limits and the same
//! words everywhere, into an [`AgentSpec`]; and only [`AgentSpec::boot_options`] turns a spec into
//! the VMM's [`BootOptions`] (the guest image looked up, model disks built, a snapshot read).
//! What a front end adds afterwards is how it runs the VM: console, timeouts, logs, jail.

use std::fs::File;
use std::path::{Path, PathBuf};

use agentos_image::model::{ModelError, ModelStore, model_disks};
use agentos_image::template::{Template, TemplateError, base_disk};
use agentos_image::{AGENT_IMAGE, BuiltImage, ImageError};
use agentos_vmm::config::{MAX_DISKS, MAX_PCI_DEVICES, MAX_VCPUS};
use agentos_vmm::devices::pci::PassedDevice;
use agentos_vmm::devices::virtio::block::{BlockError, disk_size};

use super::snapshot::{SavedAgent, SnapshotDirError, base_disk_of, model_disks_of, snapshot_shape};
use super::vm::{BootOptions, CpuSlice, DEFAULT_MEMORY_MIB, MAX_MEMORY_MIB, MIN_MEMORY_MIB};
use crate::cgroup::{PriorityClass, Slice, SliceError};

/// An agent as a front end asks for it: what is left out takes the default (one vCPU,
/// [`DEFAULT_MEMORY_MIB`], no slice beyond memory, the agent image, no model, no template).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentRequest {
    pub vcpus: Option<u8>,
    pub memory_mib: Option<u64>,
    /// CPU time in CPUs (0.5 = half of one).
    pub cpus: Option<f64>,
    pub weight: Option<u32>,
    /// A priority class: a weight (give one or the other).
    pub class: Option<PriorityClass>,
    pub cpuset: Option<String>,
    /// Pin to the CPU that pinned agents load least (instead of a cpuset).
    pub pin: bool,
    /// A model bundle of the store: its disks are given to the VM.
    pub model: Option<String>,
    /// A template by name (`base`: bash and python3; see [`agentos_image::template`]): its disk
    /// is given to the VM.
    pub template: Option<String>,
    /// A kernel and an initrd instead of the agent image's.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// Read-only disks of the user's.
    pub disks: Vec<PathBuf>,
    /// Appended to the guest's command line.
    pub kernel_args: Option<String>,
    /// Restore the agent saved in this snapshot directory: vCPUs, memory and model are the
    /// snapshot's.
    pub from: Option<PathBuf>,
    /// Host PCI devices passed to the agent with VFIO, `vfio:ADDRESS[,mmap=off]`. Whether they
    /// exist, are bound to vfio-pci and free is for the front end that places the agent.
    pub devices: Vec<String>,
    /// Devices of PCI class display (GPUs) bound to vfio-pci, picked by the front end from
    /// those no other agent has.
    pub gpus: Option<u32>,
}

/// A checked [`AgentRequest`].
#[derive(Clone, Debug, PartialEq)]
pub struct AgentSpec {
    vcpus: u8,
    memory_mib: u64,
    cpu: CpuSlice,
    class: Option<PriorityClass>,
    model: Option<String>,
    template: Option<Template>,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    disks: Vec<PathBuf>,
    kernel_args: Option<String>,
    from: Option<PathBuf>,
    devices: Vec<PassedDevice>,
    gpus: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("vcpus {0}: use 1 to {MAX_VCPUS}")]
    Vcpus(u8),
    #[error("memory {0} MiB: use {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB} MiB")]
    Memory(u64),
    #[error("give a weight or a class, not both (a class is a weight)")]
    WeightAndClass,
    #[error("give a cpuset or pin, not both")]
    CpusetAndPin,
    #[error(transparent)]
    Slice(#[from] SliceError),
    #[error("{0} does not exist or is not a file")]
    NotAFile(PathBuf),
    #[error("{0} disks given; a VM has at most {MAX_DISKS}")]
    TooManyDisks(usize),
    #[error("cannot open the disk {}", .path.display())]
    DiskOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} cannot be a disk", .path.display())]
    Disk {
        path: PathBuf,
        #[source]
        source: BlockError,
    },
    #[error(
        "an agent restored from a snapshot has the snapshot's vCPUs, memory, kernel, model and template; give none"
    )]
    RestoreShape,
    #[error(
        "{0:?}: give a device as vfio:ADDRESS, with the address as sysfs names it, like vfio:0000:01:00.0 (`,mmap=off` after it traps its BARs)"
    )]
    Device(String),
    #[error("{0} is given twice")]
    DeviceTwice(String),
    #[error("{0} PCI devices asked for (GPUs included); a VM has at most {MAX_PCI_DEVICES}")]
    TooManyDevices(usize),
    #[error(
        "an agent restored from a snapshot cannot be given PCI devices (a VM with one cannot be saved)"
    )]
    RestoreWithDevices,
    #[error(transparent)]
    Snapshot(#[from] SnapshotDirError),
    /// Its message says how to build the image.
    #[error(transparent)]
    NoImage(Box<ImageError>),
    #[error(transparent)]
    Model(Box<ModelError>),
    #[error("the snapshot's model: {0}")]
    SnapshotModel(Box<ModelError>),
    /// An unknown name (the request's fault), or the template's disk not built.
    #[error(transparent)]
    Template(Box<TemplateError>),
    #[error("cannot prepare the disks of model `{name}`")]
    ModelDisks {
        name: String,
        #[source]
        source: Box<ModelError>,
    },
}

impl SpecError {
    /// Whether the request itself is at fault (rather than this host: its image missing, a
    /// model's disks not built).
    pub fn is_bad_request(&self) -> bool {
        match self {
            Self::NoImage(_) | Self::ModelDisks { .. } => false,
            Self::Template(e) => matches!(**e, TemplateError::Unknown { .. }),
            _ => true,
        }
    }
}

impl AgentRequest {
    /// Checks the request: counts and sizes within the VMM's limits, one of weight and class,
    /// one of cpuset and pin, the slice's numbers, kernel, initrd and disks usable, nothing
    /// beside a snapshot that the snapshot decides.
    pub fn validate(&self) -> Result<AgentSpec, SpecError> {
        if self.from.is_some()
            && (self.vcpus.is_some()
                || self.memory_mib.is_some()
                || self.model.is_some()
                || self.template.is_some()
                || self.kernel.is_some()
                || self.initrd.is_some()
                || self.kernel_args.is_some())
        {
            return Err(SpecError::RestoreShape);
        }
        let vcpus = self.vcpus.unwrap_or(1);
        if !(1..=MAX_VCPUS).contains(&vcpus) {
            return Err(SpecError::Vcpus(vcpus));
        }
        let memory_mib = self.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB);
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory_mib) {
            return Err(SpecError::Memory(memory_mib));
        }
        if self.weight.is_some() && self.class.is_some() {
            return Err(SpecError::WeightAndClass);
        }
        if self.pin && self.cpuset.is_some() {
            return Err(SpecError::CpusetAndPin);
        }
        let cpu = CpuSlice {
            cpus: self.cpus,
            weight: self.weight.or(self.class.map(PriorityClass::weight)),
            cpuset: self.cpuset.clone(),
            pin: self.pin,
        };
        Slice {
            cpus: cpu.cpus,
            weight: cpu.weight,
            cpuset: cpu.cpuset.clone(),
            ..Default::default()
        }
        .validate()?;
        for path in [&self.kernel, &self.initrd].into_iter().flatten() {
            if !path.is_file() {
                return Err(SpecError::NotAFile(path.clone()));
            }
        }
        if self.disks.len() > MAX_DISKS {
            return Err(SpecError::TooManyDisks(self.disks.len()));
        }
        for path in &self.disks {
            let file = File::open(path).map_err(|source| SpecError::DiskOpen {
                path: path.clone(),
                source,
            })?;
            disk_size(&file).map_err(|source| SpecError::Disk {
                path: path.clone(),
                source,
            })?;
        }
        let devices = self.passed_devices()?;
        let template = self
            .template
            .as_deref()
            .map(str::parse::<Template>)
            .transpose()
            .map_err(|e| SpecError::Template(Box::new(e)))?;
        Ok(AgentSpec {
            vcpus,
            memory_mib,
            cpu,
            class: self.class,
            model: self.model.clone(),
            template,
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            disks: self.disks.clone(),
            kernel_args: self.kernel_args.clone(),
            from: self.from.clone(),
            devices,
            gpus: self.gpus.unwrap_or(0),
        })
    }

    /// The devices asked for, each once, within the VMM's limit with the GPUs; none beside a
    /// snapshot.
    fn passed_devices(&self) -> Result<Vec<PassedDevice>, SpecError> {
        let gpus = self.gpus.unwrap_or(0) as usize;
        if self.from.is_some() && (!self.devices.is_empty() || gpus > 0) {
            return Err(SpecError::RestoreWithDevices);
        }
        let asked = self.devices.len().saturating_add(gpus);
        if asked > MAX_PCI_DEVICES {
            return Err(SpecError::TooManyDevices(asked));
        }
        let mut devices: Vec<PassedDevice> = Vec::with_capacity(self.devices.len());
        for text in &self.devices {
            let device =
                PassedDevice::from_spec(text).map_err(|_| SpecError::Device(text.clone()))?;
            if devices.iter().any(|d| d.address == device.address) {
                return Err(SpecError::DeviceTwice(device.address.to_string()));
            }
            devices.push(device);
        }
        Ok(devices)
    }
}

impl Default for AgentSpec {
    /// The agent the commands boot when asked for nothing: one vCPU, [`DEFAULT_MEMORY_MIB`],
    /// the agent image, no model, no slice beyond memory.
    fn default() -> Self {
        AgentRequest::default()
            .validate()
            .unwrap_or_else(|e| unreachable!("the default agent is valid: {e}"))
    }
}

impl AgentSpec {
    /// vCPUs asked for (a restored agent has its snapshot's).
    pub fn vcpus(&self) -> u8 {
        self.vcpus
    }

    /// Guest memory asked for (a restored agent has its snapshot's).
    pub fn memory_mib(&self) -> u64 {
        self.memory_mib
    }

    pub fn cpu(&self) -> &CpuSlice {
        &self.cpu
    }

    pub fn class(&self) -> Option<PriorityClass> {
        self.class
    }

    /// The model asked for (a restored agent's is its snapshot's, see [`BootOptions`]'s
    /// `model_disks`).
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// The template asked for.
    pub fn template(&self) -> Option<Template> {
        self.template
    }

    /// The snapshot the agent is restored from.
    pub fn from(&self) -> Option<&Path> {
        self.from.as_deref()
    }

    /// The PCI devices asked for by address.
    pub fn devices(&self) -> &[PassedDevice] {
        &self.devices
    }

    /// How many GPUs the agent is to be given besides [`Self::devices`].
    pub fn gpus(&self) -> u32 {
        self.gpus
    }

    /// The VMM's boot options for this agent, with images and models from `cache`: the agent
    /// image (unless a kernel and an initrd were both given to an agent without a model or a
    /// template), the model's disks (built when missing or stale), the template's disk, or the
    /// snapshot's shape and model disks.
    pub fn boot_options(&self, cache: &Path) -> Result<BootOptions, SpecError> {
        let image = || {
            agentos_image::find_image(cache, AGENT_IMAGE)
                .map_err(|e| SpecError::NoImage(Box::new(e)))
        };
        if let Some(dir) = &self.from {
            return restore_options(&image()?, dir, cache);
        }
        let own_kernel = self.model.is_none() && self.template.is_none();
        let (kernel, initrd, img) = match (&self.kernel, &self.initrd) {
            (Some(k), Some(i)) if own_kernel => (k.clone(), i.clone(), None),
            (kernel, initrd) => {
                let img = image()?;
                (
                    kernel
                        .clone()
                        .unwrap_or_else(|| img.boot_kernel().to_owned()),
                    initrd.clone().unwrap_or_else(|| img.initrd.clone()),
                    Some(img),
                )
            }
        };
        let model_disks = match (&self.model, &img) {
            (Some(name), Some(img)) => {
                let store = ModelStore::new(cache);
                let bundle = store
                    .find(name)
                    .map_err(|e| SpecError::Model(Box::new(e)))?;
                let disks =
                    model_disks(&store, &bundle, &img.manifest.libraries).map_err(|source| {
                        SpecError::ModelDisks {
                            name: name.clone(),
                            source: Box::new(source),
                        }
                    })?;
                Some(disks)
            }
            _ => None,
        };
        let base_disk = match (self.template, &img) {
            (Some(Template::Base), Some(img)) => Some(
                base_disk(cache, &img.manifest).map_err(|e| SpecError::Template(Box::new(e)))?,
            ),
            _ => None,
        };
        Ok(BootOptions {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            kernel,
            initrd,
            disks: self.disks.clone(),
            model_disks,
            base_disk,
            extra_cmdline: self.kernel_args.clone(),
            cpu: self.cpu.clone(),
            pci_devices: self.devices.clone(),
            ..BootOptions::blank()
        })
    }
}

/// A restored agent's options: the snapshot's vCPUs, memory and model disks (its model still one
/// this host knows, for requests to name it), the image's kernel for the record.
fn restore_options(img: &BuiltImage, dir: &Path, cache: &Path) -> Result<BootOptions, SpecError> {
    let (vcpus, memory_mib) = snapshot_shape(dir)?;
    if let Some(model) = SavedAgent::read(dir)?.model {
        ModelStore::new(cache)
            .find(&model)
            .map_err(|e| SpecError::SnapshotModel(Box::new(e)))?;
    }
    Ok(BootOptions {
        vcpus,
        memory_mib,
        kernel: img.boot_kernel().to_owned(),
        initrd: img.initrd.clone(),
        model_disks: model_disks_of(dir)?,
        base_disk: base_disk_of(dir)?,
        from: Some(dir.to_owned()),
        ..BootOptions::blank()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(request: AgentRequest) -> String {
        agentos_protocol::error_chain(&request.validate().unwrap_err())
    }

    #[test]
    fn the_default_is_one_vcpu_of_the_default_memory_without_a_slice() {
        let spec = AgentSpec::default();
        assert_eq!((spec.vcpus(), spec.memory_mib()), (1, DEFAULT_MEMORY_MIB));
        assert_eq!(spec.cpu(), &CpuSlice::default());
        assert_eq!(spec.model(), None);
    }

    #[test]
    fn counts_and_sizes_stay_within_the_vmm_limits() {
        let vcpus = |n| AgentRequest {
            vcpus: Some(n),
            ..Default::default()
        };
        assert_eq!(refused(vcpus(0)), format!("vcpus 0: use 1 to {MAX_VCPUS}"));
        assert!(refused(vcpus(MAX_VCPUS + 1)).starts_with("vcpus 65:"));
        assert_eq!(vcpus(MAX_VCPUS).validate().unwrap().vcpus(), MAX_VCPUS);
        let memory = |m| AgentRequest {
            memory_mib: Some(m),
            ..Default::default()
        };
        assert_eq!(refused(memory(64)), "memory 64 MiB: use 128 to 65536 MiB");
        assert!(refused(memory(MAX_MEMORY_MIB + 1)).starts_with("memory 65537 MiB"));
        memory(MIN_MEMORY_MIB).validate().unwrap();
    }

    #[test]
    fn a_class_is_a_weight_and_excludes_one() {
        let spec = AgentRequest {
            class: Some(PriorityClass::Interactive),
            ..Default::default()
        }
        .validate()
        .unwrap();
        assert_eq!(spec.cpu().weight, Some(10_000));
        assert_eq!(spec.class(), Some(PriorityClass::Interactive));
        let both = AgentRequest {
            class: Some(PriorityClass::Idle),
            weight: Some(5),
            ..Default::default()
        };
        assert!(refused(both).starts_with("give a weight or a class, not both"));
        let pinned = AgentRequest {
            pin: true,
            cpuset: Some("0".into()),
            ..Default::default()
        };
        assert_eq!(refused(pinned), "give a cpuset or pin, not both");
        let bad_cpuset = AgentRequest {
            cpuset: Some("one".into()),
            ..Default::default()
        };
        assert!(refused(bad_cpuset).contains("not `one`"));
    }

    #[test]
    fn a_restore_takes_its_shape_from_the_snapshot() {
        for request in [
            AgentRequest {
                vcpus: Some(2),
                ..Default::default()
            },
            AgentRequest {
                memory_mib: Some(512),
                ..Default::default()
            },
            AgentRequest {
                model: Some("sentiment".into()),
                ..Default::default()
            },
        ] {
            let request = AgentRequest {
                from: Some("/snapshots/a".into()),
                ..request
            };
            assert!(matches!(request.validate(), Err(SpecError::RestoreShape)));
        }
    }

    #[test]
    fn disks_that_cannot_be_disks_are_refused_before_boot() {
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join("odd.img");
        std::fs::write(&odd, [0u8; 1000]).unwrap();
        let empty = dir.path().join("empty.img");
        std::fs::write(&empty, []).unwrap();
        let good = dir.path().join("good.img");
        std::fs::write(&good, [0u8; 1024]).unwrap();
        let with_disks = |disks: Vec<PathBuf>| AgentRequest {
            disks,
            ..Default::default()
        };
        let err = refused(with_disks(vec![odd]));
        assert!(err.contains("odd.img cannot be a disk"), "{err}");
        assert!(
            err.contains("1000 bytes, is not a whole number of 512-byte sectors"),
            "{err}"
        );
        assert!(refused(with_disks(vec![empty])).contains("the disk file is empty"));
        let missing = refused(with_disks(vec![dir.path().join("missing.img")]));
        assert!(missing.contains("cannot open the disk"), "{missing}");
        assert!(refused(with_disks(vec![dir.path().to_owned()])).contains("not a regular file"));
        let nine = with_disks(vec![good.clone(); MAX_DISKS + 1]);
        assert_eq!(refused(nine), "9 disks given; a VM has at most 8");
        with_disks(vec![good]).validate().unwrap();
        let kernel = AgentRequest {
            kernel: Some(dir.path().join("vmlinuz")),
            ..Default::default()
        };
        assert!(refused(kernel).ends_with("vmlinuz does not exist or is not a file"));
    }

    #[test]
    fn devices_are_given_as_vfio_addresses_each_once_and_not_beside_a_snapshot() {
        let with = |devices: &[&str], gpus: Option<u32>| AgentRequest {
            devices: devices.iter().map(|d| d.to_string()).collect(),
            gpus,
            ..Default::default()
        };
        let spec = with(
            &["vfio:0000:00:01.0", "vfio:0000:00:02.0,mmap=off"],
            Some(2),
        )
        .validate()
        .unwrap();
        assert_eq!(spec.devices().len(), 2);
        assert!(!spec.devices()[1].map_bars);
        assert_eq!(spec.gpus(), 2);
        assert!(refused(with(&["0000:00:01.0"], None)).contains("give a device as vfio:ADDRESS"));
        assert!(refused(with(&["vfio:0000:00:01.0,mmap=no"], None)).contains("give a device"));
        assert_eq!(
            refused(with(
                &["vfio:0000:00:01.0", "vfio:0000:00:01.0,mmap=off"],
                None
            )),
            "0000:00:01.0 is given twice"
        );
        assert!(refused(with(&["vfio:0000:00:01.0"], Some(31))).starts_with("32 PCI devices"));
        let restored = AgentRequest {
            from: Some(PathBuf::from("/nowhere")),
            gpus: Some(1),
            ..Default::default()
        };
        assert!(refused(restored).contains("cannot be given PCI devices"));
    }

    #[test]
    fn a_missing_image_says_how_to_build_it_and_is_the_host_at_fault() {
        let cache = tempfile::tempdir().unwrap();
        let err = AgentSpec::default().boot_options(cache.path()).unwrap_err();
        assert!(!err.is_bad_request());
        assert!(
            err.to_string()
                .ends_with("run `scripts/setup` or `agentos image build agent`"),
            "{err}"
        );
    }
}
