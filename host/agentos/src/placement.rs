//! Where a command runs its agent VMs: on this host's KVM, or, when that KVM cannot boot Linux,
//! in a QEMU carrier (see [`crate::carrier`]) whose KVM can. Every command that boots agents asks
//! [`decide`] once, before it starts anything.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::carrier::IN_CARRIER_ENV;
use crate::doctor::{self, LinuxKvm};

/// Whether to use a carrier, as a user chooses it (`--carrier`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CarrierChoice {
    /// Use the carrier when this host's KVM cannot boot Linux.
    Auto,
    /// Always run VMs directly on this host's KVM.
    Never,
    /// Always run VMs in a carrier.
    Always,
}

/// Where VMs go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// On this host's KVM, which was checked to be open to us.
    Direct,
    /// On the KVM of the carrier this process runs in (checked too).
    InCarrier,
    /// Not here: the command is to run again inside a carrier.
    Carrier,
}

impl Placement {
    /// How reports name where their VMs ran: `direct` or `carrier`.
    pub fn label(self) -> &'static str {
        match self {
            Placement::Direct => "direct",
            Placement::InCarrier | Placement::Carrier => "carrier",
        }
    }
}

/// Why VMs can go nowhere.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error(
        "cannot tell whether this host's KVM boots Linux: {0}; pass --carrier never or --carrier always"
    )]
    Unknown(String),
    #[error(
        "/dev/kvm does not exist: this host has no KVM (enable virtualisation, load kvm_intel or kvm_amd, or run on a machine with KVM)"
    )]
    NoKvm,
    #[error(
        "no permission to open /dev/kvm: add your user to the group that owns it (usually `kvm`) and log in again"
    )]
    KvmPermission,
    #[error("cannot open /dev/kvm")]
    KvmOpen(#[source] io::Error),
}

/// Decides where VMs go for `choice`, saying so once when `auto` picks the carrier; VMs that
/// are to run here find /dev/kvm open to them or get an error a user can act on.
pub fn decide(choice: CarrierChoice) -> Result<Placement, PlacementError> {
    static ANNOUNCED: AtomicBool = AtomicBool::new(false);
    if std::env::var_os(IN_CARRIER_ENV).is_some() {
        check_kvm_access()?;
        return Ok(Placement::InCarrier);
    }
    let carrier = match choice {
        CarrierChoice::Never => false,
        CarrierChoice::Always => true,
        CarrierChoice::Auto => {
            match doctor::linux_kvm(&agentos_image::default_cache_dir(), false) {
                LinuxKvm::Usable { .. } => false,
                LinuxKvm::Unusable { reason } => {
                    if !ANNOUNCED.swap(true, Ordering::Relaxed) {
                        eprintln!(
                            "agentos: this host's KVM cannot boot Linux ({reason}); running VMs in a QEMU carrier (see `agentos doctor`)"
                        );
                    }
                    true
                }
                LinuxKvm::Unknown { reason } => return Err(PlacementError::Unknown(reason)),
            }
        }
    };
    if carrier {
        return Ok(Placement::Carrier);
    }
    check_kvm_access()?;
    Ok(Placement::Direct)
}

/// Checks that /dev/kvm can be opened, with an explanation a user can act on.
pub fn check_kvm_access() -> Result<(), PlacementError> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(PlacementError::NoKvm),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Err(PlacementError::KvmPermission),
        Err(e) => Err(PlacementError::KvmOpen(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chosen_carrier_is_taken_and_running_here_needs_kvm() {
        if std::env::var_os(IN_CARRIER_ENV).is_some() {
            assert_eq!(decide(CarrierChoice::Always).unwrap(), Placement::InCarrier);
            return;
        }
        assert_eq!(decide(CarrierChoice::Always).unwrap(), Placement::Carrier);
        assert_eq!(Placement::Carrier.label(), "carrier");
        match (decide(CarrierChoice::Never), check_kvm_access()) {
            (Ok(placement), Ok(())) => assert_eq!(placement, Placement::Direct),
            (Err(e), Err(_)) => assert!(e.to_string().contains("/dev/kvm"), "{e}"),
            (placed, kvm) => panic!("placed {placed:?} while /dev/kvm gave {kvm:?}"),
        }
    }
}
