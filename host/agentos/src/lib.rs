//! agentos: every AI agent in its own KVM microVM.
//!
//! What the `agentos` command line (crate `agentos-cli`) drives beyond the agent core
//! (`agentos_core`): the daemon and its API, process groups with their router and trace, the
//! QEMU carrier and the decision to use it, the security evaluation and the benchmarks. Each VM
//! runs in an `agentos-vmm` process (see `agentos_vmm_process`).

pub mod carrier;
pub mod daemon;
pub mod doctor;
pub mod eval;
pub mod group;
pub mod pci;
pub mod placement;
pub mod qemu;
pub mod toml_file;
