//! Tests that boot real agentos microVMs live in `vm/`; `scripts/test` runs them (in the QEMU
//! carrier on hosts whose KVM cannot boot Linux).
//! Tests of commands started on the host as a user would (`agentos daemon`, which starts a carrier
//! of its own where it needs one) live in `host/`; `scripts/test` runs them on the host.
