//! Architecture-specific boot and CPU setup.

pub mod x86_64;
