//! `infer` requests, handed to the inference worker (`agentos-infer`, which the VM gets with its
//! first model) over a pipe.
//!
//! The worker starts with the first request and serves every connection after it, so each model
//! is loaded once per VM. ONNX Runtime, the tokenizers and the models live in the worker, not in
//! PID 1: a model that crashes the runtime ends the worker, every request it held gets an error
//! saying so, and the next request starts a new one. Requests carry worker-wide ids, mapped back
//! to each connection's own when the answer comes.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;

use agentos_protocol::bundle::{
    GUEST_INFER_WORKER, GUEST_LIBRARY_DIR, GUEST_MODELS_DIR, GUEST_ONNXRUNTIME, MODEL_LIBRARY_DIR,
};
use agentos_protocol::{GuestMessage, InferReply, InferRequest, MAX_FRAME_BYTES, encode_frame};

use crate::lock;
use crate::outbox::Outbox;
use crate::reaper::{Reaper, Waited};

/// Requests the worker may hold at once, all connections together.
const MAX_PENDING: usize = 64;

pub struct Inference {
    reaper: Arc<Reaper>,
    threads: usize,
    worker: Mutex<Option<Worker>>,
}

struct Worker {
    stdin: ChildStdin,
    shared: Arc<Mutex<Shared>>,
}

#[derive(Default)]
struct Shared {
    /// Worker id -> who asked, and under which id.
    pending: HashMap<u64, (u64, Outbox)>,
    next_id: u64,
    /// The worker's output ended: it is gone, and takes no more requests.
    gone: bool,
}

impl Inference {
    pub fn new(reaper: Arc<Reaper>, threads: usize) -> Self {
        Self {
            reaper,
            threads: threads.max(1),
            worker: Mutex::new(None),
        }
    }

    /// Hands `req` to the worker; the answer goes to `outbox`. An error is the reason the
    /// request could not be handed over, for the caller to send back.
    pub fn submit(&self, mut req: InferRequest, outbox: &Outbox) -> Result<(), String> {
        let mut worker = lock(&self.worker);
        if worker.as_ref().is_some_and(|w| lock(&w.shared).gone) {
            // Dropping its input lets a worker that stopped answering exit.
            *worker = None;
        }
        let current = match worker.as_mut() {
            Some(current) => current,
            None => worker.insert(self.start()?),
        };
        let id = {
            let mut shared = lock(&current.shared);
            if shared.pending.len() >= MAX_PENDING {
                return Err(format!(
                    "{MAX_PENDING} inference requests are already waiting; send fewer at once"
                ));
            }
            shared.next_id += 1;
            let id = shared.next_id;
            shared.pending.insert(id, (req.id, outbox.clone()));
            id
        };
        req.id = id;
        let mut line = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
        line.push(b'\n');
        if let Err(err) = current
            .stdin
            .write_all(&line)
            .and_then(|()| current.stdin.flush())
        {
            lock(&current.shared).pending.remove(&id);
            *worker = None;
            return Err(format!(
                "the inference worker is gone ({err}); send the request again"
            ));
        }
        Ok(())
    }

    fn start(&self) -> Result<Worker, String> {
        if !Path::new(GUEST_INFER_WORKER).is_file() {
            return Err(format!(
                "this VM has no models ({GUEST_INFER_WORKER} is missing); start the agent with a model"
            ));
        }
        let mut command = Command::new(GUEST_INFER_WORKER);
        command
            .args(["--models", GUEST_MODELS_DIR, "--runtime", GUEST_ONNXRUNTIME])
            .args(["--threads", &self.threads.to_string()])
            .env("LD_LIBRARY_PATH", library_path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let (mut child, pid) = self
            .reaper
            .spawn(&mut command)
            .map_err(|e| format!("cannot start {GUEST_INFER_WORKER}: {e}"))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            return Err("the inference worker has no pipes".to_owned());
        };
        let shared = Arc::new(Mutex::new(Shared::default()));
        let reader_shared = Arc::clone(&shared);
        let reaper = Arc::clone(&self.reaper);
        let spawned = thread::Builder::new()
            .name("infer-reader".into())
            .spawn(move || {
                read_answers(stdout, &reader_shared);
                let orphans: Vec<(u64, Outbox)> = {
                    let mut shared = lock(&reader_shared);
                    shared.gone = true;
                    shared.pending.drain().map(|(_, who)| who).collect()
                };
                for (id, outbox) in orphans {
                    let _ = outbox.send(GuestMessage::Error {
                        id,
                        message: "the inference worker stopped while running this request (the model may have crashed it); the next request starts a new one".to_owned(),
                    });
                }
                // It exits once its input closes, which the next request's new worker does.
                if let Ok(Waited::Exited(status)) = reaper.wait(pid, None)
                    && status.code != Some(0)
                {
                    console!("the inference worker ended: {status:?}");
                }
            });
        if let Err(err) = spawned {
            let _ = child.kill();
            return Err(format!("cannot start a thread: {err}"));
        }
        Ok(Worker { stdin, shared })
    }
}

/// Routes each answer line of the worker to the connection that asked, until its output ends.
fn read_answers(stdout: ChildStdout, shared: &Mutex<Shared>) {
    let mut lines = BufReader::new(stdout);
    let mut line = Vec::new();
    loop {
        line.clear();
        let limit = MAX_FRAME_BYTES as u64 + 1;
        match (&mut lines).take(limit).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line.len() as u64 >= limit => {
                console!("the inference worker wrote an answer too large for a frame; stopping it");
                return;
            }
            Ok(_) => {}
        }
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(&line) else {
            continue;
        };
        let Some(worker_id) = value.get("id").and_then(serde_json::Value::as_u64) else {
            continue;
        };
        let Some((id, outbox)) = lock(shared).pending.remove(&worker_id) else {
            continue;
        };
        let message = match value.get("error") {
            Some(error) => GuestMessage::Error {
                id,
                message: error.as_str().unwrap_or("inference failed").to_owned(),
            },
            None => match serde_json::from_value::<InferReply>(value) {
                Ok(mut reply) => {
                    reply.id = id;
                    GuestMessage::Inferred(reply)
                }
                Err(err) => GuestMessage::Error {
                    id,
                    message: format!("the inference worker's answer is malformed: {err}"),
                },
            },
        };
        // A reply that cannot become a frame would be dropped by the writer and leave the host
        // waiting: answer with an error instead.
        let message = match encode_frame(&message) {
            Ok(_) => message,
            Err(err) => GuestMessage::Error {
                id,
                message: format!(
                    "the answer is too large to send ({err}); send fewer or shorter inputs"
                ),
            },
        };
        let _ = outbox.send(message);
    }
}

/// Where the worker and the programs it starts find the libraries the model disks carry: the
/// runtime disk's, then each bundle's own.
fn library_path() -> String {
    let mut dirs = vec![GUEST_LIBRARY_DIR.to_owned()];
    if let Ok(entries) = std::fs::read_dir(GUEST_MODELS_DIR) {
        let mut own: Vec<String> = entries
            .filter_map(Result::ok)
            .map(|e| e.path().join(MODEL_LIBRARY_DIR))
            .filter(|dir| dir.is_dir())
            .filter_map(|dir| dir.to_str().map(str::to_owned))
            .collect();
        own.sort();
        dirs.extend(own);
    }
    dirs.join(":")
}
