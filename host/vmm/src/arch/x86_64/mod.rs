//! x86_64: memory layout, boot protocols, CPUID, MSRs, registers and interrupt controllers.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod msr;
pub mod regs;
