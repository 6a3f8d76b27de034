//! Ctrl-C and SIGTERM for the commands that run VMs: the signal is taken by one thread, which
//! records it and kills the VMs (or carrier) this process started, so that the main thread
//! unwinds normally and every run directory is removed. (Children start with the default signal
//! mask: `std::process::Command` resets it.)

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// Child processes to kill when interrupted.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

const HANDLED: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// The exit status a shell reports for the signal that interrupted us.
pub fn exit_code() -> i32 {
    128 + SIGNAL.load(Ordering::SeqCst)
}

pub fn watch_child(pid: u32) {
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).push(pid);
    if interrupted() {
        kill_children();
    }
}

pub fn forget_child(pid: u32) {
    CHILDREN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|&p| p != pid);
}

fn kill_children() {
    for &pid in CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        // SAFETY: kill has no memory-safety preconditions; a stale pid at worst gets ESRCH.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
}

/// Blocks the handled signals in this thread (and so in every thread spawned after) and starts
/// the thread that waits for them. Call once, early in `main`.
pub fn install() -> std::io::Result<()> {
    // SAFETY: sigset_t is plain data and initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are real.
    unsafe {
        libc::sigemptyset(&mut set);
        for signal in HANDLED {
            libc::sigaddset(&mut set, signal);
        }
    }
    // SAFETY: `set` is valid; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            loop {
                let mut signal = 0;
                // SAFETY: `set` is a valid signal set and `signal` a valid out pointer.
                if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
                    return;
                }
                SIGNAL.store(signal, Ordering::SeqCst);
                INTERRUPTED.store(true, Ordering::SeqCst);
                kill_children();
            }
        })?;
    Ok(())
}
