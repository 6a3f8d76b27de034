//! Where a bundle's ONNX models run: on the CPU, or, when its manifest asks for it, on ONNX
//! Runtime's CUDA execution provider, which needs an NVIDIA GPU passed to the agent and an ONNX
//! Runtime built with the provider. A bundle that asks for a GPU the agent cannot give it is
//! refused when it loads, saying which of the two is missing, rather than run slowly on the CPU.

use std::fs;
use std::path::Path;

use agentos_protocol::bundle::{BundleManifest, ExecutionProvider};
use ort::ep::{CUDA, ExecutionProvider as _, ExecutionProviderDispatch};

use crate::backend::InferError;

/// Where the guest's PCI devices are.
pub const SYSFS_PCI_DEVICES: &str = "/sys/bus/pci/devices";
const NVIDIA_VENDOR: &str = "0x10de";
/// PCI class 0x03: display controllers.
const DISPLAY_CLASS_PREFIX: &str = "0x03";

/// The execution providers `manifest` asks for: none for the CPU (ONNX Runtime's default),
/// CUDA's for a bundle that asks for it, once the agent has an NVIDIA GPU (under `pci`) and
/// ONNX Runtime offers the provider.
pub fn providers(
    manifest: &BundleManifest,
    pci: &Path,
) -> Result<Vec<ExecutionProviderDispatch>, InferError> {
    match manifest.execution_provider {
        ExecutionProvider::Cpu => Ok(Vec::new()),
        ExecutionProvider::Cuda => {
            check_gpu(manifest, pci)?;
            let available = CUDA::is_available().map_err(|e| InferError::NoGpuProvider {
                name: manifest.name.clone(),
                detail: e.to_string(),
            })?;
            if !available {
                return Err(InferError::NoGpuProvider {
                    name: manifest.name.clone(),
                    detail: "this agent's ONNX Runtime has no CUDA execution provider (the image carries ONNX Runtime's CPU build)".to_owned(),
                });
            }
            Ok(vec![CUDA::default().build().error_on_failure()])
        }
    }
}

/// Whether the agent has an NVIDIA GPU among the devices under `pci`; if not, what it has.
pub fn check_gpu(manifest: &BundleManifest, pci: &Path) -> Result<(), InferError> {
    let displays = display_devices(pci);
    if displays.iter().any(|(vendor, _)| vendor == NVIDIA_VENDOR) {
        return Ok(());
    }
    let found = if displays.is_empty() {
        "no GPU".to_owned()
    } else {
        let ids: Vec<String> = displays
            .iter()
            .map(|(vendor, device)| format!("{}:{}", &vendor[2..], &device[2..]))
            .collect();
        format!(
            "no NVIDIA GPU (it has {}, which CUDA cannot use)",
            ids.join(", ")
        )
    };
    Err(InferError::NoGpu {
        name: manifest.name.clone(),
        found,
    })
}

/// The vendor and device ids (`0x10de`, `0x2330`) of each display controller under `pci`.
fn display_devices(pci: &Path) -> Vec<(String, String)> {
    let read = |dir: &Path, name: &str| {
        fs::read_to_string(dir.join(name))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let Ok(entries) = fs::read_dir(pci) else {
        return Vec::new();
    };
    let mut found: Vec<(String, String)> = entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|dir| read(dir, "class").starts_with(DISPLAY_CLASS_PREFIX))
        .map(|dir| (read(&dir, "vendor"), read(&dir, "device")))
        .filter(|(vendor, device)| vendor.len() == 6 && device.len() == 6)
        .collect();
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bundle's manifest, with `provider` (a manifest line, or nothing for the default).
    fn manifest(provider: &str) -> BundleManifest {
        BundleManifest::parse(&format!(
            "name = \"big\"\n{provider}tasks = [\"embed\"]\n[files]\n\"model.onnx\" = \"0000000000000000000000000000000000000000000000000000000000000000\"\n\"tokenizer.json\" = \"0000000000000000000000000000000000000000000000000000000000000000\"\n"
        ))
        .unwrap()
    }

    const CUDA_LINE: &str = "execution_provider = \"cuda\"\n";

    fn device(root: &Path, address: &str, vendor: &str, device: &str, class: &str) {
        let dir = root.join(address);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("vendor"), format!("{vendor}\n")).unwrap();
        fs::write(dir.join("device"), format!("{device}\n")).unwrap();
        fs::write(dir.join("class"), format!("{class}\n")).unwrap();
    }

    #[test]
    fn a_bundle_for_cuda_needs_an_nvidia_gpu_and_says_what_the_agent_has() {
        let root = tempfile::tempdir().unwrap();
        let cuda = manifest(CUDA_LINE);
        assert_eq!(cuda.execution_provider, ExecutionProvider::Cuda);
        let refused = |root: &Path| check_gpu(&cuda, root).unwrap_err().to_string();
        assert_eq!(
            refused(root.path()),
            "model `big` runs on CUDA, and this agent has no GPU: start it with one (`--gpu 1`, a GPU bound to vfio-pci on the host; `agentos doctor` lists them)"
        );
        device(root.path(), "0000:00:01.0", "0x1234", "0x11e8", "0x00ff00");
        device(root.path(), "0000:00:02.0", "0x1234", "0x1111", "0x038000");
        let other = refused(root.path());
        assert!(
            other.contains("no NVIDIA GPU (it has 1234:1111, which CUDA cannot use)"),
            "{other}"
        );
        device(root.path(), "0000:00:03.0", "0x10de", "0x2330", "0x030200");
        check_gpu(&cuda, root.path()).unwrap();
        let cpu = manifest("");
        assert_eq!(cpu.execution_provider, ExecutionProvider::Cpu);
        assert!(
            providers(&cpu, Path::new("/nonexistent"))
                .unwrap()
                .is_empty()
        );
    }
}
