//! VM tests: each boots real agentos microVMs (a stock Debian kernel with our guest agent as PID 1)
//! on this host's KVM, and checks what a user of `agentos` sees.

mod cgroup;
mod common;
mod daemon;
mod e2b;
mod eval;
mod group;
mod infer;
mod jail;
mod run;
mod snapshot;
mod template;
mod vfio;
mod vsock;
