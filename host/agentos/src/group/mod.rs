//! Process groups: agents declared together in a file, each in its own microVM, exchanging
//! messages through a router that knows every sender, allows only declared channels and writes
//! a trace of how each result was made.

pub mod file;
pub mod member;
pub mod report;
pub mod router;
pub mod trace;
