//! agentos: every AI agent in its own KVM microVM.
//!
//! The `agentos` binary is the command line; each VM runs in an `agentos-vmm` process (see
//! `agentos_vmm_process`).
//! This library holds what the commands are made of, so that tests drive the same code.

pub mod admission;
pub mod agent;
pub mod bench;
pub mod carrier;
pub mod cgroup;
pub mod control;
pub mod daemon;
pub mod deadline;
pub mod doctor;
pub mod eval;
pub mod group;
pub mod image;
pub mod image_cmd;
pub mod infer_run;
pub mod log_tail;
pub mod model;
pub mod model_cmd;
pub mod programs;
pub mod qemu;
pub mod run;
pub mod rundir;
pub mod signals;
pub mod testing;
pub mod toml_file;
