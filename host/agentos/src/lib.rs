//! agentos: every AI agent in its own KVM microVM.
//!
//! The `agentos` binary is the command line; each VM runs in an `agentos-vmm` process (see
//! `agentos_vmm_process`).
//! This library holds what the commands are made of, so that tests drive the same code.

pub mod bench;
pub mod carrier;
pub mod control;
pub mod daemon;
pub mod doctor;
pub mod eval;
pub mod group;
pub mod image_cmd;
pub mod infer_run;
pub mod model_cmd;
pub mod qemu;
pub mod run;
pub mod toml_file;
