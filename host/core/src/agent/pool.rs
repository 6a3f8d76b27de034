//! Warm pools: agents restored from a snapshot ahead of need, so that asking for one is taking
//! one that is up already (its guest agent connected, reseeded and clocked, and one program run
//! in it: see [`warm_up`]).
//!
//! One thread, the [`Spawner`], starts every pool's VMs and lives as long as its owner: a VMM
//! ends when the thread that started it ends, and a claimed agent must outlive its pool.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use agentos_protocol::{ExecRequest, Program};

use super::connection::ExecIo;
use super::vm::{AgentVm, BootOptions, VmError};

/// Largest pool: each ready agent holds a VMM and what its guest touched.
pub const MAX_POOL_SIZE: u32 = 64;
/// How long the spawner waits after a pool's agent failed to start before it tries again.
const FAILURE_PAUSE: Duration = Duration::from_secs(5);
/// How often an idle spawner looks again (a stop or a claim wakes it at once).
const IDLE_TICK: Duration = Duration::from_secs(1);

/// How long a pool's new agent has to run its warm-up program.
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// The program a pool's new agent runs before it is ready.
const WARM_UP_PROGRAM: &str = "/bin/true";

/// Runs one program in a freshly restored agent before anyone claims it. A restored guest's
/// memory is the snapshot file's pages, mapped in on first touch, each touch an exit to the VMM;
/// starting a program touches many (the new process's, the guest agent's own on that path), and
/// the claimer's first program would pay for them. The agent also takes the answer to
/// `restored` here, so that a guest that could not refresh never reaches a pool.
fn warm_up(mut vm: AgentVm) -> Result<AgentVm, VmError> {
    let conn = vm.conn();
    conn.set_deadline(Some(Instant::now() + WARM_UP_TIMEOUT));
    let status = conn.exec(
        ExecRequest {
            run: Program::new(WARM_UP_PROGRAM),
            ..ExecRequest::default()
        },
        ExecIo {
            stdin: None,
            stdout: &mut std::io::sink(),
            stderr: &mut std::io::sink(),
        },
    );
    conn.set_deadline(None);
    match status {
        Ok(status) if status.code == Some(0) => Ok(vm),
        Ok(status) => {
            vm.shutdown();
            Err(VmError::WarmUp(format!(
                "{WARM_UP_PROGRAM} ended with {status:?}"
            )))
        }
        Err(e) => {
            vm.shutdown();
            Err(e.into())
        }
    }
}

/// What `ps` and the metrics show of a pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolInfo {
    pub name: String,
    /// The snapshot its agents are restored from.
    pub from: String,
    pub size: u32,
    pub ready: u32,
    /// Agents taken from it.
    pub claims: u64,
    /// Agents that did not start.
    pub failures: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

struct Pool {
    opts: BootOptions,
    size: u32,
    ready: VecDeque<AgentVm>,
    claims: u64,
    failures: u64,
    last_error: Option<String>,
    /// No new start before this, after a failure.
    paused_until: Option<Instant>,
}

#[derive(Default)]
struct Pools {
    pools: BTreeMap<String, Pool>,
    stop: bool,
}

/// The pools and the thread that fills them.
pub struct Spawner {
    shared: Arc<(Mutex<Pools>, Condvar)>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stopping: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("a pool named `{0}` exists already")]
    Exists(String),
    #[error("no pool named `{0}`")]
    Unknown(String),
    #[error("a pool holds 1 to {MAX_POOL_SIZE} agents, not {0}")]
    Size(u32),
}

fn lock(m: &Mutex<Pools>) -> MutexGuard<'_, Pools> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Spawner {
    pub fn start() -> std::io::Result<Self> {
        let shared = Arc::new((Mutex::new(Pools::default()), Condvar::new()));
        let stopping = Arc::new(AtomicBool::new(false));
        let (filler, filler_stop) = (shared.clone(), stopping.clone());
        let thread = thread::Builder::new()
            .name("pools".into())
            .spawn(move || fill(&filler, &filler_stop))?;
        Ok(Self {
            shared,
            thread: Mutex::new(Some(thread)),
            stopping,
        })
    }

    /// Adds a pool of `size` agents restored with `opts` (whose `from` is the snapshot).
    pub fn create(&self, name: &str, opts: BootOptions, size: u32) -> Result<(), PoolError> {
        if !(1..=MAX_POOL_SIZE).contains(&size) {
            return Err(PoolError::Size(size));
        }
        let (pools, wake) = &*self.shared;
        let mut pools = lock(pools);
        if pools.pools.contains_key(name) {
            return Err(PoolError::Exists(name.to_owned()));
        }
        pools.pools.insert(
            name.to_owned(),
            Pool {
                opts,
                size,
                ready: VecDeque::new(),
                claims: 0,
                failures: 0,
                last_error: None,
                paused_until: None,
            },
        );
        wake.notify_all();
        Ok(())
    }

    /// Removes a pool and shuts its ready agents down (claimed ones are not its any more).
    pub fn remove(&self, name: &str) -> Result<(), PoolError> {
        let pool = lock(&self.shared.0)
            .pools
            .remove(name)
            .ok_or_else(|| PoolError::Unknown(name.to_owned()))?;
        for vm in pool.ready {
            vm.shutdown();
        }
        Ok(())
    }

    /// A ready agent of the pool, if it has one (else the caller restores one itself, with
    /// [`Spawner::options`]); either way the claim is counted and the pool refilled.
    pub fn claim(&self, name: &str) -> Result<Option<AgentVm>, PoolError> {
        let (pools, wake) = &*self.shared;
        let mut pools = lock(pools);
        let pool = pools
            .pools
            .get_mut(name)
            .ok_or_else(|| PoolError::Unknown(name.to_owned()))?;
        pool.claims += 1;
        wake.notify_all();
        while let Some(mut vm) = pool.ready.pop_front() {
            // One that ended while it waited is no use.
            if !vm.ended() {
                return Ok(Some(vm));
            }
        }
        Ok(None)
    }

    /// The options the pool's agents are restored with.
    pub fn options(&self, name: &str) -> Result<BootOptions, PoolError> {
        lock(&self.shared.0)
            .pools
            .get(name)
            .map(|p| p.opts.clone())
            .ok_or_else(|| PoolError::Unknown(name.to_owned()))
    }

    pub fn info(&self) -> Vec<PoolInfo> {
        lock(&self.shared.0)
            .pools
            .iter()
            .map(|(name, pool)| PoolInfo {
                name: name.clone(),
                from: pool
                    .opts
                    .from
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                size: pool.size,
                ready: pool.ready.len() as u32,
                claims: pool.claims,
                failures: pool.failures,
                last_error: pool.last_error.clone(),
            })
            .collect()
    }

    /// Stops filling, and shuts every ready agent down.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let (pools, wake) = &*self.shared;
        let drained: Vec<AgentVm> = {
            let mut pools = lock(pools);
            pools.stop = true;
            wake.notify_all();
            pools
                .pools
                .values_mut()
                .flat_map(|p| p.ready.drain(..))
                .collect()
        };
        for vm in drained {
            vm.shutdown();
        }
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The pool that most lacks a ready agent and may start one now: its name and options.
fn next_to_fill(pools: &Pools, now: Instant) -> Option<(String, BootOptions)> {
    pools
        .pools
        .iter()
        .filter(|(_, p)| (p.ready.len() as u32) < p.size)
        .filter(|(_, p)| p.paused_until.is_none_or(|t| now >= t))
        .max_by_key(|(_, p)| p.size - p.ready.len() as u32)
        .map(|(name, p)| (name.clone(), p.opts.clone()))
}

/// Starts agents for the pools, one at a time, until told to stop (which also gives up a start
/// under way).
fn fill(shared: &(Mutex<Pools>, Condvar), stopping: &Arc<AtomicBool>) {
    let (pools, wake) = shared;
    loop {
        let next = {
            let mut guard = lock(pools);
            loop {
                if guard.stop {
                    return;
                }
                if let Some(next) = next_to_fill(&guard, Instant::now()) {
                    break next;
                }
                guard = wake
                    .wait_timeout(guard, IDLE_TICK)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
        };
        let (name, mut opts) = next;
        opts.abort = Some(stopping.clone());
        let started = AgentVm::boot(&opts).and_then(warm_up);
        if stopping.load(Ordering::SeqCst) {
            if let Ok(vm) = started {
                vm.shutdown();
            }
            return;
        }
        let mut guard = lock(pools);
        match (guard.pools.get_mut(&name), started) {
            (Some(pool), Ok(vm)) => {
                let _ = vm.set_label(&format!("pool {name}"));
                pool.ready.push_back(vm);
                pool.last_error = None;
            }
            (Some(pool), Err(e)) => {
                tracing::warn!(pool = name, error = %e, "a pool's agent did not start");
                pool.failures += 1;
                pool.last_error = Some(agentos_protocol::error_chain(&e));
                pool.paused_until = Some(Instant::now() + FAILURE_PAUSE);
            }
            // The pool went meanwhile.
            (None, Ok(vm)) => {
                drop(guard);
                vm.shutdown();
            }
            (None, Err(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_are_named_sized_and_known() {
        let pools = Spawner::start().unwrap();
        let img_less = BootOptions {
            vcpus: 1,
            memory_mib: 256,
            kernel: "/nonexistent/vmlinux".into(),
            initrd: "/nonexistent/initrd".into(),
            extra_initrds: Vec::new(),
            disks: Vec::new(),
            model_disks: None,
            base_disk: None,
            extra_cmdline: None,
            console: false,
            boot_timeout: Duration::from_secs(1),
            cpu: Default::default(),
            wait_for_room: false,
            console_log: None,
            abort: None,
            no_jail: false,
            from: Some("/nonexistent".into()),
            snapshot_to: None,
            pci_devices: Vec::new(),
        };
        assert!(matches!(
            pools.create("p", img_less.clone(), 0),
            Err(PoolError::Size(0))
        ));
        assert!(matches!(
            pools.create("p", img_less, MAX_POOL_SIZE + 1),
            Err(PoolError::Size(_))
        ));
        assert!(pools.info().is_empty());
        assert!(matches!(pools.claim("p"), Err(PoolError::Unknown(_))));
        assert!(matches!(pools.options("p"), Err(PoolError::Unknown(_))));
        assert!(matches!(pools.remove("p"), Err(PoolError::Unknown(_))));
        pools.stop();
    }
}
