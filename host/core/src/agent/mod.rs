//! The host side of agent VMs: starting one, and talking to its guest agent.

pub mod connection;
pub mod pool;
pub mod snapshot;
pub mod spec;
pub mod supervision;
pub mod vm;
