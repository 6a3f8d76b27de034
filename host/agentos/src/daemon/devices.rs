//! Which agent holds which host PCI device. Admission gives an agent the devices it asked for
//! by address and the GPUs it asked for, from those no other agent of this daemon holds (nor a
//! device of their IOMMU groups); an agent holds its devices for as long as it is listed,
//! restarts included, until `rm`.

use std::collections::BTreeMap;
use std::path::Path;

use super::agent::{Agent, AgentConfig};
use super::api::{ApiError, ErrorKind};
use crate::pci::{self, Held, PassthroughError, SYSFS_PCI_DEVICES};

/// Gives `config` its devices (into its boot options) beside those the `agents` hold; run with
/// the agents' lock held, so that two agents cannot be admitted to the same device.
pub fn admit(agents: &BTreeMap<String, Agent>, config: &mut AgentConfig) -> Result<(), ApiError> {
    admit_beside(&held_by(agents.values().map(Agent::config)), config)
}

/// As [`admit`], beside the devices `held` (admitting several agents at once adds each one's).
pub fn admit_beside(held: &[Held], config: &mut AgentConfig) -> Result<(), ApiError> {
    let assigned = pci::assign(
        &config.devices,
        config.gpus,
        held,
        Path::new(SYSFS_PCI_DEVICES),
    )
    .map_err(|e| {
        let kind = match e {
            PassthroughError::InUse { .. } | PassthroughError::NotEnoughGpus { .. } => {
                ErrorKind::NoRoom
            }
            PassthroughError::Sysfs(_) => ErrorKind::Failed,
            _ => ErrorKind::Invalid,
        };
        ApiError::new(kind, agentos_protocol::error_chain(&e))
    })?;
    config.opts.pci_devices = assigned;
    Ok(())
}

/// The devices the agents of `configs` hold.
pub fn held_by<'a>(configs: impl Iterator<Item = &'a AgentConfig>) -> Vec<Held> {
    configs
        .flat_map(|config| {
            config.opts.pci_devices.iter().map(|device| Held {
                address: device.address.to_string(),
                holder: config.name.clone(),
            })
        })
        .collect()
}
