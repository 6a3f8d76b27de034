//! Group membership: the agent's connection to the host's router, and the handler that turns each
//! message it receives into a result for its outputs.
//!
//! A `join` request opens the connection (vsock to the host on [`PEER_PORT`]) and says `listen`.
//! One thread reads the router's frames: deliveries go to the handler thread through a short
//! queue (the router never has more than a few unacknowledged messages out per agent), answers to
//! sends go to whoever waits for them. The handler runs each new message, sends the result to
//! every output and only then acknowledges it, so a message whose result was not passed on is
//! delivered again. Messages seen before (the router sent them again) are acknowledged unread.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use agentos_protocol::peer::{
    Delivery, Handler, JoinRequest, MAX_PEER_BODY_BYTES, PEER_PORT, PeerRequest, PeerSend,
    RouterMessage, valid_peer_name,
};
use agentos_protocol::{
    FrameError, FrameReader, GuestMessage, InferReply, InferRequest, InferResult, Task, write_frame,
};

use crate::infer::Inference;
use crate::outbox::Outbox;
use crate::reaper::{Reaper, Waited};
use crate::transport::{self, Connection};
use crate::{clip, describe, lock};

/// Deliveries waiting for the handler.
const WORK_QUEUE: usize = 16;
/// Message ids remembered for deduplication.
const REMEMBERED_IDS: usize = 4096;
/// How long a send waits for the router's answer.
const SEND_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a refused-but-retryable send keeps being tried.
const SEND_PATIENCE: Duration = Duration::from_secs(120);
const RETRY_FIRST: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// How long a handler (model or program) may take for one message.
const HANDLER_TIMEOUT: Duration = Duration::from_secs(300);

/// The group this agent belongs to, once it joined one.
#[derive(Default)]
pub struct Membership(Mutex<Option<String>>);

/// What a handler needs from the agent.
pub struct HandlerEnv {
    pub inference: Arc<Inference>,
    pub reaper: Arc<Reaper>,
    pub base_env: BTreeMap<String, String>,
}

impl Membership {
    /// Joins the group `req` names; an error says why not, for the host.
    pub fn join(&self, req: JoinRequest, env: Arc<HandlerEnv>) -> Result<(), String> {
        let mut current = lock(&self.0);
        if let Some(group) = current.as_ref() {
            return Err(format!("this agent is already a member of group `{group}`"));
        }
        for name in std::iter::once(&req.group)
            .chain(std::iter::once(&req.name))
            .chain(&req.outputs)
        {
            if !valid_peer_name(name) {
                return Err(format!("`{}` is not a valid name", clip(name)));
            }
        }
        let conn = transport::connect_vsock(PEER_PORT).map_err(|e| describe(&e))?;
        let (link, reader) =
            Link::open(conn).map_err(|e| format!("cannot reach the router: {e}"))?;
        let (work, deliveries) = mpsc::sync_channel::<Delivery>(WORK_QUEUE);
        let reader_link = Arc::clone(&link);
        thread::Builder::new()
            .name("peer-reader".into())
            .spawn(move || reader_link.read_forever(reader, &work))
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        let group = req.group.clone();
        let member = Member { req, link, env };
        thread::Builder::new()
            .name("peer-handler".into())
            .spawn(move || {
                let mut seen = SeenIds::default();
                for delivery in deliveries {
                    if seen.insert(delivery.message) {
                        member.handle(&delivery);
                    }
                    if member
                        .link
                        .write(&PeerRequest::Ack {
                            message: delivery.message,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
            })
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        *current = Some(group);
        Ok(())
    }
}

/// The connection to the router.
struct Link {
    writer: Mutex<Connection>,
    waiting: Mutex<HashMap<u64, SyncSender<RouterMessage>>>,
    next_seq: AtomicU64,
}

impl Link {
    /// The link, listening, and the connection's reading end for [`Link::read_forever`].
    fn open(conn: Connection) -> Result<(Arc<Self>, Connection), FrameError> {
        let reader = conn.try_clone()?;
        let link = Arc::new(Self {
            writer: Mutex::new(conn),
            waiting: Mutex::default(),
            next_seq: AtomicU64::new(1),
        });
        link.write(&PeerRequest::Listen)?;
        Ok((link, reader))
    }

    fn write(&self, req: &PeerRequest) -> Result<(), FrameError> {
        let mut writer = lock(&self.writer);
        write_frame(&mut *writer, req)?;
        writer.flush()?;
        Ok(())
    }

    fn read_forever(&self, conn: Connection, work: &SyncSender<Delivery>) {
        let mut frames = FrameReader::new(conn);
        loop {
            match frames.read::<RouterMessage>() {
                Ok(Some(RouterMessage::Deliver(delivery))) => {
                    if work.send(delivery).is_err() {
                        return;
                    }
                }
                Ok(Some(answer)) => {
                    let seq = match &answer {
                        RouterMessage::Accepted { seq, .. }
                        | RouterMessage::Refused { seq, .. } => *seq,
                        RouterMessage::Deliver(_) => continue,
                    };
                    if let Some(waiter) = lock(&self.waiting).remove(&seq) {
                        let _ = waiter.try_send(answer);
                    }
                }
                Ok(None) => {
                    console!("the router closed the group connection");
                    return;
                }
                Err(err) => {
                    console!("the group connection failed: {}", describe(&err));
                    return;
                }
            }
        }
    }

    /// Sends `msg` and waits for the router's answer, trying again while the receiver is busy.
    fn send(&self, mut msg: PeerSend) -> Result<u64, String> {
        let deadline = Instant::now() + SEND_PATIENCE;
        let mut pause = RETRY_FIRST;
        loop {
            let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
            msg.seq = seq;
            let (tx, rx) = mpsc::sync_channel(1);
            lock(&self.waiting).insert(seq, tx);
            if let Err(err) = self.write(&PeerRequest::Send(msg.clone())) {
                lock(&self.waiting).remove(&seq);
                return Err(format!("cannot send: {}", describe(&err)));
            }
            let answer = rx.recv_timeout(SEND_ANSWER_TIMEOUT);
            lock(&self.waiting).remove(&seq);
            match answer {
                Ok(RouterMessage::Accepted { message, .. }) => return Ok(message),
                Ok(RouterMessage::Refused {
                    retry: true,
                    reason,
                    ..
                }) => {
                    if Instant::now() + pause > deadline {
                        return Err(reason);
                    }
                    thread::sleep(pause);
                    pause = (pause * 2).min(RETRY_MAX);
                }
                Ok(RouterMessage::Refused { reason, .. }) => return Err(reason),
                Ok(RouterMessage::Deliver(_)) | Err(_) => {
                    return Err("the router did not answer".to_owned());
                }
            }
        }
    }
}

struct Member {
    req: JoinRequest,
    link: Arc<Link>,
    env: Arc<HandlerEnv>,
}

/// A handler's result: what to send on, and what made it.
struct Outcome {
    kind: String,
    body: String,
    model: Option<String>,
    infer_us: Option<u64>,
}

impl Member {
    fn handle(&self, delivery: &Delivery) {
        let Some(handler) = &self.req.handler else {
            return;
        };
        let outcome = match handler {
            Handler::Infer {
                model,
                task,
                options,
            } => self.infer(model, *task, options.clone(), &delivery.body),
            Handler::Exec { program, args } => self.exec(program, args, delivery),
            Handler::Echo => Ok(Outcome {
                kind: delivery.kind.clone(),
                body: delivery.body.clone(),
                model: None,
                infer_us: None,
            }),
        };
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(problem) => Outcome {
                kind: "error".to_owned(),
                body: format!("{}: {problem}", self.req.name),
                model: None,
                infer_us: None,
            },
        };
        if outcome.body.is_empty() {
            return;
        }
        for to in &self.req.outputs {
            let msg = PeerSend {
                seq: 0,
                to: to.clone(),
                kind: outcome.kind.clone(),
                body: outcome.body.clone(),
                trace: Some(delivery.trace),
                model: outcome.model.clone(),
                infer_us: outcome.infer_us,
                from: None,
            };
            if let Err(reason) = self.link.send(msg) {
                console!(
                    "a result for `{}` was not taken: {}",
                    clip(to),
                    clip(&reason)
                );
            }
        }
    }

    fn infer(
        &self,
        model: &str,
        task: Task,
        options: agentos_protocol::InferOptions,
        body: &str,
    ) -> Result<Outcome, String> {
        let (outbox, answers) = Outbox::collector();
        let req = InferRequest {
            id: 1,
            model: model.to_owned(),
            task,
            inputs: vec![body.to_owned()],
            options,
        };
        self.env.inference.submit(req, &outbox)?;
        let reply: InferReply = match answers.recv_timeout(HANDLER_TIMEOUT) {
            Some(GuestMessage::Inferred(reply)) => reply,
            Some(GuestMessage::Error { message, .. }) => return Err(message),
            _ => return Err("the model did not answer in time".to_owned()),
        };
        let t = reply.timings;
        Ok(Outcome {
            kind: result_kind(task).to_owned(),
            body: reply.results.first().map(result_text).unwrap_or_default(),
            model: Some(model.to_owned()),
            infer_us: Some(t.load_us + t.tokenize_us + t.run_us + t.decode_us),
        })
    }

    fn exec(&self, program: &str, args: &[String], delivery: &Delivery) -> Result<Outcome, String> {
        let started = Instant::now();
        let path = self.env.base_env.get("PATH").map(String::as_str);
        let mut command = Command::new(crate::exec::resolve(program, path));
        command
            .arg0(program)
            .args(args)
            .env_clear()
            .envs(&self.env.base_env)
            .env("AGENTOS_FROM", &delivery.from)
            .env("AGENTOS_KIND", &delivery.kind)
            .env("AGENTOS_TRACE", delivery.trace.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .process_group(0);
        let (mut child, pid) = self
            .env
            .reaper
            .spawn(&mut command)
            .map_err(|e| format!("cannot start {}: {e}", clip(program)))?;
        // The whole process group goes when the time is up, also when something it started
        // still holds its output open.
        let (done, finished) = mpsc::channel::<()>();
        let _ = thread::Builder::new()
            .name("peer-deadline".into())
            .spawn(move || {
                if finished.recv_timeout(HANDLER_TIMEOUT).is_err() {
                    // SAFETY: kill has no memory-safety preconditions; -pid names the group
                    // this handler's program leads.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                }
            });
        if let Some(mut stdin) = child.stdin.take() {
            let body = delivery.body.clone().into_bytes();
            // A program that does not read its input must not hold the handler.
            let _ = thread::Builder::new()
                .name("peer-stdin".into())
                .spawn(move || stdin.write_all(&body));
        }
        let mut out = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            let _ = stdout
                .take(MAX_PEER_BODY_BYTES as u64 + 1)
                .read_to_end(&mut out);
        }
        let too_long = out.len() > MAX_PEER_BODY_BYTES;
        if too_long {
            let _ = child.kill();
        }
        let waited = self
            .env
            .reaper
            .wait(pid, Some(started + HANDLER_TIMEOUT))
            .map_err(|e| e.to_string());
        let _ = done.send(());
        let status = match waited? {
            Waited::Exited(status) if started.elapsed() < HANDLER_TIMEOUT => status,
            Waited::Exited(_) | Waited::DeadlinePassed => {
                let _ = child.kill();
                return Err(format!(
                    "{} ran longer than {} s",
                    clip(program),
                    HANDLER_TIMEOUT.as_secs()
                ));
            }
        };
        if too_long {
            return Err(format!(
                "{} wrote more than {MAX_PEER_BODY_BYTES} bytes",
                clip(program)
            ));
        }
        if status.shell_code() != 0 {
            return Err(format!(
                "{} exited with status {}",
                clip(program),
                status.shell_code()
            ));
        }
        let text = String::from_utf8_lossy(&out);
        Ok(Outcome {
            kind: "text".to_owned(),
            body: text.trim_end_matches('\n').to_owned(),
            model: None,
            infer_us: None,
        })
    }
}

/// The kind of message a task's result travels as.
fn result_kind(task: Task) -> &'static str {
    match task {
        Task::Embed => "embedding",
        Task::Classify => "labels",
        Task::TokenClassify => "entities",
        Task::Summarize => "summary",
        Task::Translate => "translation",
    }
}

/// A result as the text a peer receives: plain text, or one line per label or entity.
fn result_text(result: &InferResult) -> String {
    match result {
        InferResult::Summary { text, .. } | InferResult::Translation { text } => text.clone(),
        InferResult::Labels { labels } => labels
            .iter()
            .map(|l| format!("{} {:.4}", l.label, l.score))
            .collect::<Vec<_>>()
            .join("\n"),
        InferResult::Entities { entities } => entities
            .iter()
            .map(|e| format!("{} {}", e.label, e.text))
            .collect::<Vec<_>>()
            .join("\n"),
        InferResult::Embedding { vector } => serde_json::to_string(vector).unwrap_or_default(),
    }
}

/// The ids of the last [`REMEMBERED_IDS`] messages handled.
#[derive(Default)]
struct SeenIds {
    order: VecDeque<u64>,
    ids: HashSet<u64>,
}

impl SeenIds {
    /// Whether `id` is new (and remembers it).
    fn insert(&mut self, id: u64) -> bool {
        if !self.ids.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > REMEMBERED_IDS
            && let Some(old) = self.order.pop_front()
        {
            self.ids.remove(&old);
        }
        true
    }
}

/// `agentos-guest send TO [KIND]`: sends standard input to a peer through the router, for
/// programs in the guest. Prints the message id, or the refusal.
pub fn send_command(args: &[String]) -> Result<u64, String> {
    let mut to = None;
    let mut kind = "text".to_owned();
    let mut from = None;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--kind" => kind = rest.next().cloned().ok_or("--kind needs a value")?,
            // Claims another sender; the router must not believe it (used by the security tests).
            "--from" => from = Some(rest.next().cloned().ok_or("--from needs a value")?),
            name if to.is_none() && !name.starts_with('-') => to = Some(name.to_owned()),
            other => {
                return Err(format!(
                    "unexpected argument `{other}`; usage: send TO [--kind K]"
                ));
            }
        }
    }
    let to = to.ok_or("usage: send TO [--kind K] < BODY")?;
    let mut body = String::new();
    std::io::stdin()
        .take(MAX_PEER_BODY_BYTES as u64 + 1)
        .read_to_string(&mut body)
        .map_err(|e| format!("cannot read standard input: {e}"))?;
    let conn = transport::connect_vsock(PEER_PORT).map_err(|e| describe(&e))?;
    let mut writer = conn.try_clone().map_err(|e| e.to_string())?;
    // A handler's program continues the path of the input it was given.
    let trace = std::env::var("AGENTOS_TRACE")
        .ok()
        .and_then(|t| t.parse().ok());
    let msg = PeerRequest::Send(PeerSend {
        seq: 1,
        to,
        kind,
        body,
        trace,
        model: None,
        infer_us: None,
        from,
    });
    write_frame(&mut writer, &msg).map_err(|e| describe(&e))?;
    let mut frames = FrameReader::new(conn);
    match frames.read::<RouterMessage>() {
        Ok(Some(RouterMessage::Accepted { message, .. })) => Ok(message),
        Ok(Some(RouterMessage::Refused { reason, .. })) => Err(format!("refused: {reason}")),
        Ok(_) => Err("the router closed the connection".to_owned()),
        Err(err) => Err(describe(&err)),
    }
}

/// Most round trips one `ping` measures.
const MAX_PINGS: u64 = 10_000;

/// `agentos-guest ping TO [--count N] [--size BYTES]`: sends N messages of BYTES to a peer that
/// echoes them back, one at a time, and prints each round trip in microseconds as JSON. This
/// connection takes over the agent's deliveries while it runs.
pub fn ping_command(args: &[String]) -> Result<String, String> {
    let mut to = None;
    let mut count: u64 = 100;
    let mut size: usize = 64;
    let mut rest = args.iter();
    let number = |v: Option<&String>, flag: &str| -> Result<u64, String> {
        v.and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{flag} needs a number"))
    };
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--count" => count = number(rest.next(), "--count")?.clamp(1, MAX_PINGS),
            "--size" => {
                size = usize::try_from(number(rest.next(), "--size")?)
                    .unwrap_or(usize::MAX)
                    .min(MAX_PEER_BODY_BYTES)
            }
            name if to.is_none() && !name.starts_with('-') => to = Some(name.to_owned()),
            other => return Err(format!("unexpected argument `{other}`")),
        }
    }
    let to = to.ok_or("usage: ping TO [--count N] [--size BYTES]")?;
    let conn = transport::connect_vsock(PEER_PORT).map_err(|e| describe(&e))?;
    let mut writer = conn.try_clone().map_err(|e| e.to_string())?;
    let mut frames = FrameReader::new(conn);
    let mut write = |req: &PeerRequest| write_frame(&mut writer, req).map_err(|e| describe(&e));
    write(&PeerRequest::Listen)?;
    let body = "x".repeat(size);
    let mut rtt_us = Vec::new();
    for seq in 1..=count {
        let started = Instant::now();
        let mut pause = RETRY_FIRST;
        loop {
            write(&PeerRequest::Send(PeerSend {
                seq,
                to: to.clone(),
                kind: "ping".to_owned(),
                body: body.clone(),
                trace: None,
                model: None,
                infer_us: None,
                from: None,
            }))?;
            match frames.read::<RouterMessage>().map_err(|e| describe(&e))? {
                Some(RouterMessage::Accepted { .. }) => break,
                Some(RouterMessage::Refused { retry: true, .. }) => {
                    thread::sleep(pause);
                    pause = (pause * 2).min(RETRY_MAX);
                }
                Some(RouterMessage::Refused { reason, .. }) => return Err(reason),
                Some(RouterMessage::Deliver(_)) => {
                    return Err("a message came before the answer to a send".to_owned());
                }
                None => return Err("the router closed the connection".to_owned()),
            }
        }
        match frames.read::<RouterMessage>().map_err(|e| describe(&e))? {
            Some(RouterMessage::Deliver(echo)) => {
                write(&PeerRequest::Ack {
                    message: echo.message,
                })?;
                if echo.body.len() != size {
                    return Err(format!(
                        "the echo has {} bytes, not {size}",
                        echo.body.len()
                    ));
                }
            }
            _ => return Err("no echo came back".to_owned()),
        }
        rtt_us.push(started.elapsed().as_micros() as u64);
    }
    Ok(serde_json::json!({ "to": to, "size": size, "rtt_us": rtt_us }).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_ids_forget_the_oldest() {
        let mut seen = SeenIds::default();
        assert!(seen.insert(1));
        assert!(!seen.insert(1));
        for id in 2..=REMEMBERED_IDS as u64 + 1 {
            assert!(seen.insert(id));
        }
        assert!(seen.insert(1), "the oldest id is forgotten");
        assert!(!seen.insert(REMEMBERED_IDS as u64 + 1));
    }

    #[test]
    fn results_read_as_text() {
        let labels = InferResult::Labels {
            labels: vec![
                agentos_protocol::LabelScore {
                    label: "positive".into(),
                    score: 0.98,
                },
                agentos_protocol::LabelScore {
                    label: "negative".into(),
                    score: 0.02,
                },
            ],
        };
        assert_eq!(result_text(&labels), "positive 0.9800\nnegative 0.0200");
        let t = InferResult::Translation {
            text: "hola".into(),
        };
        assert_eq!(result_text(&t), "hola");
    }
}
