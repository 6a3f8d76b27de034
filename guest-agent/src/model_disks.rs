//! The disks an agent with a model gets: the runtime disk (the inference worker, ONNX Runtime
//! and their libraries) and one disk per bundle, read-only erofs images on virtio-pmem regions
//! (or the first partitions of virtio disks) that the host names on the kernel command line
//! (`agentos.runtime=pmem0 agentos.model=pmem1:sentiment`). PID 1 mounts them before anything
//! runs, pmem with `dax` (the guest maps the host's pages instead of copying them into its page
//! cache): the runtime at `/opt/agentos`, a tmpfs on its `models/`, and each bundle at
//! `/opt/agentos/models/<name>`.

use std::ffi::CString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use agentos_protocol::bundle::{
    GUEST_MODELS_DIR, GUEST_RUNTIME_DIR, MODEL_DISK_FSTYPE, MODEL_DISK_PARAM, RUNTIME_DISK_PARAM,
    check_name,
};

/// Mount options of a pmem device: the guest reads the region's pages in place.
const PMEM_OPTIONS: &std::ffi::CStr = c"dax=always";

/// The kernel's command line is at most a few KiB; more is not a command line.
const MAX_CMDLINE_BYTES: u64 = 64 * 1024;
/// How long a disk's device node may take to appear after its driver loaded.
const DEVICE_WAIT: Duration = Duration::from_secs(5);
const DEVICE_POLL: Duration = Duration::from_millis(5);
/// Bundles a VM may be given.
const MAX_MODELS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum ModelDisksError {
    #[error("cannot read /proc/cmdline")]
    Cmdline(#[source] io::Error),
    #[error("{param}={value:?}: {why}")]
    Param {
        param: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("{MODEL_DISK_PARAM} given without {RUNTIME_DISK_PARAM}")]
    NoRuntime,
    #[error("the disk /dev/{0} did not appear")]
    NoDevice(String),
    #[error("cannot mount {what} on {target}")]
    Mount {
        what: String,
        target: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What the command line asks to mount.
#[derive(Debug, Default, PartialEq, Eq)]
struct Asked {
    runtime: Option<String>,
    /// (device, bundle name)
    models: Vec<(String, String)>,
}

/// Mounts the disks the command line names, if any.
pub fn mount_given() -> Result<(), ModelDisksError> {
    let asked = parse(&read_cmdline().map_err(ModelDisksError::Cmdline)?)?;
    let Some(runtime) = asked.runtime else {
        return Ok(());
    };
    mount_disk(&runtime, Path::new(GUEST_RUNTIME_DIR))?;
    if asked.models.is_empty() {
        return Ok(());
    }
    let models = Path::new(GUEST_MODELS_DIR);
    mount(
        c"tmpfs",
        models,
        c"tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some(c"mode=0755,size=64k"),
    )
    .map_err(|source| ModelDisksError::Mount {
        what: "tmpfs".to_owned(),
        target: models.to_owned(),
        source,
    })?;
    for (device, name) in &asked.models {
        mount_disk(device, &models.join(name))?;
    }
    Ok(())
}

pub(crate) fn read_cmdline() -> io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    fs::File::open("/proc/cmdline")?
        .take(MAX_CMDLINE_BYTES)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// The runtime (the last one given) and bundle disks of `cmdline`, every value checked.
fn parse(cmdline: &str) -> Result<Asked, ModelDisksError> {
    let mut asked = Asked::default();
    for word in cmdline.split_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        let bad = |param, why| ModelDisksError::Param {
            param,
            value: value.to_owned(),
            why,
        };
        if key == RUNTIME_DISK_PARAM {
            if !is_disk(value) {
                return Err(bad(
                    RUNTIME_DISK_PARAM,
                    "not a pmem device (pmem0 to pmem9) or a disk's first partition (vda1 to vdz1)",
                ));
            }
            asked.runtime = Some(value.to_owned());
        } else if key == MODEL_DISK_PARAM {
            let Some((device, name)) = value.split_once(':') else {
                return Err(bad(MODEL_DISK_PARAM, "give DISK:NAME"));
            };
            if !is_disk(device) {
                return Err(bad(
                    MODEL_DISK_PARAM,
                    "not a pmem device (pmem0 to pmem9) or a disk's first partition (vda1 to vdz1)",
                ));
            }
            if check_name(name).is_err() {
                return Err(bad(MODEL_DISK_PARAM, "not a bundle name"));
            }
            if asked.models.iter().any(|(_, n)| n == name) {
                return Err(bad(MODEL_DISK_PARAM, "the bundle is given twice"));
            }
            if asked.models.len() == MAX_MODELS {
                return Err(bad(MODEL_DISK_PARAM, "too many bundles"));
            }
            asked.models.push((device.to_owned(), name.to_owned()));
        }
    }
    if asked.runtime.is_none() && !asked.models.is_empty() {
        return Err(ModelDisksError::NoRuntime);
    }
    Ok(asked)
}

/// A pmem device (`pmem0` to `pmem9`), or the first partition of a virtio disk (`vda1` to
/// `vdz1`).
pub(crate) fn is_disk(name: &str) -> bool {
    is_pmem(name)
        || matches!(name.as_bytes(), [b'v', b'd', letter, b'1'] if letter.is_ascii_lowercase())
}

fn is_pmem(name: &str) -> bool {
    matches!(name.as_bytes(), [b'p', b'm', b'e', b'm', digit] if digit.is_ascii_digit())
}

/// Mounts `/dev/<device>` read-only on `target` (a pmem device with its pages mapped from the
/// host), once its node is there.
pub(crate) fn mount_disk(device: &str, target: &Path) -> Result<(), ModelDisksError> {
    let node = PathBuf::from(format!("/dev/{device}"));
    let deadline = Instant::now() + DEVICE_WAIT;
    while !node.exists() {
        if Instant::now() >= deadline {
            return Err(ModelDisksError::NoDevice(device.to_owned()));
        }
        thread::sleep(DEVICE_POLL);
    }
    let error = |source| ModelDisksError::Mount {
        what: node.display().to_string(),
        target: target.to_owned(),
        source,
    };
    let invalid = |_| error(io::Error::from(io::ErrorKind::InvalidInput));
    let source = CString::new(node.as_os_str().as_encoded_bytes()).map_err(invalid)?;
    let fstype = CString::new(MODEL_DISK_FSTYPE).map_err(invalid)?;
    mount(
        &source,
        target,
        &fstype,
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        is_pmem(device).then_some(PMEM_OPTIONS),
    )
    .map_err(error)
}

fn mount(
    source: &std::ffi::CStr,
    target: &Path,
    fstype: &std::ffi::CStr,
    flags: libc::c_ulong,
    data: Option<&std::ffi::CStr>,
) -> io::Result<()> {
    fs::create_dir_all(target)?;
    let target = CString::new(target.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    crate::init::mount_at(source, &target, fstype, flags, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_names_disks_and_bundles() {
        assert_eq!(parse("console=ttyS0 quiet").unwrap(), Asked::default());
        assert_eq!(
            parse("quiet agentos.runtime=pmem0 agentos.model=pmem1:sentiment panic=-1").unwrap(),
            Asked {
                runtime: Some("pmem0".into()),
                models: vec![("pmem1".into(), "sentiment".into())],
            }
        );
        assert_eq!(
            parse("agentos.runtime=pmem3").unwrap().runtime.as_deref(),
            Some("pmem3")
        );
        assert_eq!(parse("agentos.runtimex=pmem0").unwrap(), Asked::default());
        assert_eq!(
            parse("agentos.runtime=vdb1 agentos.model=vdc1:m").unwrap(),
            Asked {
                runtime: Some("vdb1".into()),
                models: vec![("vdc1".into(), "m".into())],
            }
        );
    }

    #[test]
    fn bad_values_are_refused() {
        for bad in [
            "agentos.runtime=vda",
            "agentos.runtime=vda2",
            "agentos.runtime=vdA1",
            "agentos.runtime=pmem",
            "agentos.runtime=pmem10",
            "agentos.runtime=pmemx",
            "agentos.runtime=../pmem0",
            "agentos.runtime=pmem0 agentos.model=pmem1",
            "agentos.runtime=pmem0 agentos.model=vdc:m",
            "agentos.runtime=pmem0 agentos.model=pmem1:../etc",
            "agentos.runtime=pmem0 agentos.model=pmem1:",
            "agentos.runtime=pmem0 agentos.model=pmem1:m agentos.model=pmem2:m",
            "agentos.model=pmem1:m",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was taken");
        }
    }
}
