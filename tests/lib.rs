//! Tests that boot real agentos microVMs live in `vm/`; `scripts/test` runs them (in the QEMU
//! carrier on hosts whose KVM cannot boot Linux).
