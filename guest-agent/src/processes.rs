//! The programs the guest runs, as every connection finds them: by process id or tag, with
//! whoever follows each one's output. A program is followed by the request that started it
//! and by any that attached to it since; each gets its output and its end under its own
//! request id. One started with `keep` runs on when nobody follows it (its output then goes
//! nowhere); any other is killed once nobody does.

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use agentos_protocol::process::{ProcessInfo, Selector};
use agentos_protocol::{ExitStatus, GuestMessage};

use crate::lock;
use crate::outbox::Outbox;
use crate::stdin::StdinQueue;

/// Called once with the program's final status, after its last output.
pub type Finish = Box<dyn FnOnce(ExitStatus) + Send>;

/// Names watchers apart, so that a connection can stop following what it followed.
static WATCHERS: AtomicU64 = AtomicU64::new(1);

/// One request following a program: where its frames go, under which id.
pub struct Watcher {
    key: u64,
    id: u64,
    outbox: Outbox,
    finish: Finish,
}

impl Watcher {
    /// A watcher for request `id` of the connection of `outbox`; `finish` is told the end.
    pub fn new(id: u64, outbox: Outbox, finish: Finish) -> Self {
        Self {
            key: WATCHERS.fetch_add(1, Ordering::Relaxed),
            id,
            outbox,
            finish,
        }
    }

    pub fn key(&self) -> u64 {
        self.key
    }
}

struct Watchers {
    list: Vec<Watcher>,
    ended: bool,
}

/// A running program.
pub struct Process {
    info: ProcessInfo,
    stdin: Option<Arc<StdinQueue>>,
    /// The near end of its terminal, if it runs on one.
    terminal: Option<File>,
    watchers: Mutex<Watchers>,
}

/// Whether a program's output still has somewhere to go.
#[derive(Debug, PartialEq, Eq)]
pub enum Heard {
    Yes,
    /// Nobody follows it, and it was kept: its output is dropped.
    Dropped,
    /// Nobody follows it and it was not kept: it should end.
    Abandoned,
}

impl Process {
    /// A program just started, followed by nobody yet: it is put in the table first, then
    /// followed (see [`Self::watch`]), so that whoever hears its process id finds it there.
    pub fn new(info: ProcessInfo, stdin: Option<Arc<StdinQueue>>, terminal: Option<File>) -> Self {
        Self {
            info,
            stdin,
            terminal,
            watchers: Mutex::new(Watchers {
                list: Vec::new(),
                ended: false,
            }),
        }
    }

    pub fn pid(&self) -> u32 {
        self.info.pid
    }

    pub fn info(&self) -> &ProcessInfo {
        &self.info
    }

    pub fn stdin(&self) -> Option<&Arc<StdinQueue>> {
        self.stdin.as_ref()
    }

    pub fn terminal(&self) -> Option<&File> {
        self.terminal.as_ref()
    }

    /// Sends each follower the frame `make` builds with its request id; those whose
    /// connection is gone stop following.
    pub fn tell(&self, make: impl Fn(u64) -> GuestMessage) -> Heard {
        let mut watchers = lock(&self.watchers);
        // `retain` keeps the order: followers get frames in the order they were made.
        watchers
            .list
            .retain(|watcher| watcher.outbox.send(make(watcher.id)).is_ok());
        if !watchers.list.is_empty() {
            Heard::Yes
        } else if self.info.keep {
            Heard::Dropped
        } else {
            Heard::Abandoned
        }
    }

    /// Follows the program from now on: `started` goes to the watcher first. Refused once the
    /// program has ended.
    pub fn watch(&self, watcher: Watcher) -> Result<(), String> {
        let mut watchers = lock(&self.watchers);
        if watchers.ended {
            return Err(format!("process {} has ended", self.info.pid));
        }
        let started = GuestMessage::Started {
            id: watcher.id,
            pid: self.info.pid,
        };
        if watcher.outbox.send(started).is_ok() {
            watchers.list.push(watcher);
        }
        Ok(())
    }

    /// Stops following through watcher `key`; whether anyone still follows.
    pub fn unwatch(&self, key: u64) -> bool {
        let mut watchers = lock(&self.watchers);
        watchers.list.retain(|watcher| watcher.key != key);
        !watchers.list.is_empty()
    }

    /// Tells every follower the program's end; nobody can follow it after this.
    pub fn finish(&self, status: ExitStatus) {
        let list = {
            let mut watchers = lock(&self.watchers);
            watchers.ended = true;
            std::mem::take(&mut watchers.list)
        };
        for watcher in list {
            (watcher.finish)(status);
        }
        if let Some(stdin) = &self.stdin {
            stdin.abandon();
        }
    }
}

/// Every program the guest runs for the host, by process id.
#[derive(Default)]
pub struct Processes(Mutex<HashMap<u32, Arc<Process>>>);

impl Processes {
    /// Refuses a tag a running program carries already.
    pub fn check_tag(&self, tag: Option<&str>) -> Result<(), String> {
        let Some(tag) = tag else {
            return Ok(());
        };
        if lock(&self.0)
            .values()
            .any(|p| p.info.tag.as_deref() == Some(tag))
        {
            return Err(format!("a running program is tagged {tag:?} already"));
        }
        Ok(())
    }

    pub fn insert(&self, process: Arc<Process>) {
        lock(&self.0).insert(process.pid(), process);
    }

    pub fn remove(&self, pid: u32) {
        lock(&self.0).remove(&pid);
    }

    pub fn find(&self, selector: &Selector) -> Option<Arc<Process>> {
        let processes = lock(&self.0);
        match selector {
            Selector::Pid(pid) => processes.get(pid).cloned(),
            Selector::Tag(tag) => processes
                .values()
                .find(|p| p.info.tag.as_ref() == Some(tag))
                .cloned(),
        }
    }

    /// What runs, by process id.
    pub fn list(&self) -> Vec<ProcessInfo> {
        let mut list: Vec<ProcessInfo> = lock(&self.0).values().map(|p| p.info.clone()).collect();
        list.sort_by_key(|info| info.pid);
        list
    }
}
