//! The agentos VMM: one KVM microVM per process.
//!
//! [`builder::build_vm`] turns a [`config::VmConfig`] into a running VM in one linear pass
//! (memory → KVM VM → devices → kernel and initrd → ACPI and boot parameters → vCPUs), and
//! [`vmm::Vmm::run`] drives it until the guest shuts down, crashes or the VMM is told to stop.
//! [`builder::restore_vm`] builds one from a [`snapshot`] instead, which a running VM writes when
//! it is asked to ([`exit::ExitReason::Snapshot`]).
//! Threads: one per vCPU, and the caller's thread for the device event loop; each can run under
//! its own seccomp filter ([`seccomp`]).

pub mod acpi;
pub mod arch;
pub mod builder;
pub mod config;
pub mod devices;
pub mod event_loop;
pub mod exit;
pub mod seccomp;
pub mod snapshot;
pub mod vmm;
pub mod vstate;
