//! E2B's polled watchers (`CreateWatcher`, `GetWatcherEvents`, `RemoveWatcher`, which E2B's
//! synchronous SDKs use to watch a directory): each is a watch of the guest's directory whose
//! events are kept here, a bounded number, until the client asks for them.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use agentos_e2b_proto::filesystem::{EventType, FilesystemEvent};
use agentos_protocol::files::{Change, ChangeKind};

use super::super::api::{ApiError, ErrorKind, WatchLine};
use super::super::link::Chunks;

/// Watchers one sandbox may keep.
const MAX_PER_SANDBOX: usize = 8;
/// Watchers of all sandboxes: each holds a turn of the daemon's work lane while it lives.
const MAX_WATCHERS: usize = 16;
/// Events a watcher keeps between two polls; older ones are dropped past it.
const MAX_EVENTS: usize = 10_000;

struct Watcher {
    sandbox: String,
    events: Arc<Mutex<VecDeque<FilesystemEvent>>>,
    task: tokio::task::AbortHandle,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // The watch's stream goes with its task, which ends the guest's watch.
        self.task.abort();
    }
}

#[derive(Default)]
pub struct Watchers {
    watchers: Mutex<BTreeMap<String, Watcher>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unknown(id: &str) -> ApiError {
    ApiError::new(
        ErrorKind::NotFound,
        format!("no watcher {}", agentos_protocol::clip(id, 40)),
    )
}

impl Watchers {
    /// Refuses one more watcher for `sandbox` past the bounds.
    pub fn check_room(&self, sandbox: &str) -> Result<(), ApiError> {
        let watchers = lock(&self.watchers);
        let mine = watchers.values().filter(|w| w.sandbox == sandbox).count();
        if mine >= MAX_PER_SANDBOX || watchers.len() >= MAX_WATCHERS {
            return Err(ApiError::new(
                ErrorKind::Busy,
                format!(
                    "a sandbox keeps at most {MAX_PER_SANDBOX} watchers and the daemon {MAX_WATCHERS}; remove one (RemoveWatcher) or watch with WatchDir"
                ),
            ));
        }
        Ok(())
    }

    /// Keeps the events of the watch `chunks` of `root` for `sandbox`, as watcher `id`.
    pub fn add(&self, id: &str, sandbox: &str, root: String, mut chunks: Chunks) {
        let events: Arc<Mutex<VecDeque<FilesystemEvent>>> = Arc::default();
        let kept = events.clone();
        let task = tokio::spawn(async move {
            let mut pending: Vec<u8> = Vec::new();
            while let Some(Ok(data)) = chunks.recv().await {
                pending.extend_from_slice(&data);
                while let Some(at) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=at).collect();
                    match serde_json::from_slice::<WatchLine>(&line) {
                        Ok(WatchLine::Change(change)) => {
                            let mut events = lock(&kept);
                            if events.len() == MAX_EVENTS {
                                events.pop_front();
                            }
                            events.push_back(filesystem_event(&root, &change));
                        }
                        Ok(WatchLine::Watching { .. }) => {}
                        Ok(WatchLine::Error(_)) | Err(_) => return,
                    }
                }
                if pending.len() > MAX_EVENTS * 64 {
                    return;
                }
            }
        })
        .abort_handle();
        lock(&self.watchers).insert(
            id.to_owned(),
            Watcher {
                sandbox: sandbox.to_owned(),
                events,
                task,
            },
        );
    }

    /// The events of watcher `id` of `sandbox` since the last time.
    pub fn take_events(&self, id: &str, sandbox: &str) -> Result<Vec<FilesystemEvent>, ApiError> {
        let watchers = lock(&self.watchers);
        let watcher = watchers
            .get(id)
            .filter(|w| w.sandbox == sandbox)
            .ok_or_else(|| unknown(id))?;
        let events = lock(&watcher.events).drain(..).collect();
        Ok(events)
    }

    pub fn remove(&self, id: &str, sandbox: &str) -> Result<(), ApiError> {
        let mut watchers = lock(&self.watchers);
        if watchers.get(id).is_none_or(|w| w.sandbox != sandbox) {
            return Err(unknown(id));
        }
        watchers.remove(id);
        Ok(())
    }

    /// Removes every watcher of `sandbox`.
    pub fn remove_sandbox(&self, sandbox: &str) {
        lock(&self.watchers).retain(|_, w| w.sandbox != sandbox);
    }
}

/// A change under the watched directory `root` as E2B's `FilesystemEvent`.
pub fn filesystem_event(root: &str, change: &Change) -> FilesystemEvent {
    let kind = match change.kind {
        ChangeKind::Create => EventType::Create,
        ChangeKind::Write => EventType::Write,
        ChangeKind::Remove => EventType::Remove,
        ChangeKind::Rename => EventType::Rename,
        ChangeKind::Chmod => EventType::Chmod,
    };
    let name = change
        .path
        .strip_prefix(root)
        .map(|rest| rest.trim_start_matches('/'))
        .unwrap_or(&change.path);
    FilesystemEvent {
        name: name.to_owned(),
        r#type: kind.into(),
        entry: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn line(line: &WatchLine) -> Result<Bytes, std::io::Error> {
        let mut bytes = serde_json::to_vec(line).unwrap();
        bytes.push(b'\n');
        Ok(Bytes::from(bytes))
    }

    #[tokio::test]
    async fn events_are_kept_until_asked_for_by_their_own_sandbox() {
        let watchers = Watchers::default();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        watchers.add("w1", "s1", "/home/user".into(), rx);
        tx.send(line(&WatchLine::Watching {
            path: "/home/user".into(),
        }))
        .await
        .unwrap();
        tx.send(line(&WatchLine::Change(Change {
            kind: ChangeKind::Create,
            path: "/home/user/f".into(),
        })))
        .await
        .unwrap();
        let mut got = Vec::new();
        for _ in 0..100 {
            got = watchers.take_events("w1", "s1").unwrap();
            if !got.is_empty() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(
            serde_json::to_value(&got).unwrap(),
            serde_json::json!([{"name": "f", "type": "EVENT_TYPE_CREATE"}])
        );
        assert!(
            watchers.take_events("w1", "s1").unwrap().is_empty(),
            "taken once"
        );
        assert_eq!(
            watchers.take_events("w1", "s2").unwrap_err().kind,
            ErrorKind::NotFound
        );
        assert!(watchers.remove("w1", "s2").is_err());
        for n in 0..MAX_PER_SANDBOX - 1 {
            let (_tx, rx) = tokio::sync::mpsc::channel(1);
            watchers.add(&format!("x{n}"), "s1", "/".into(), rx);
        }
        assert_eq!(watchers.check_room("s1").unwrap_err().kind, ErrorKind::Busy);
        assert!(watchers.check_room("s2").is_ok());
        watchers.remove_sandbox("s1");
        assert!(watchers.take_events("w1", "s1").is_err());
        for _ in 0..100 {
            if tx.is_closed() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(tx.is_closed(), "the watch's stream was dropped with it");
    }
}
