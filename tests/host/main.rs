//! Host tests: each starts `agentos` on this host as a user would, whatever its KVM can boot, and
//! checks what a client of it sees. Unlike the VM tests, they do not run inside a carrier
//! (`scripts/test` runs them here): on a host whose KVM cannot boot Linux, the command under test
//! starts the carrier itself.

mod daemon;
