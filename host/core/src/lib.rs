//! The agent core: what every front end of agentos (the command line, the daemon, groups, eval,
//! benchmarks) is made of. An agent's VM from boot to end ([`agent::vm`]) and the connection to
//! its guest agent ([`agent::connection`]), snapshots and warm pools, the cgroup slice a VM runs
//! in ([`cgroup`]) and the admission that keeps slices within the host ([`admission`]), and the
//! run directories VMs and daemons keep their sockets and logs in ([`rundir`]).

pub mod admission;
pub mod agent;
pub mod cgroup;
pub mod deadline;
pub mod log_tail;
pub mod rundir;
pub mod signals;
pub mod testing;
