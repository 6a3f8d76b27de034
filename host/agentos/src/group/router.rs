//! The router of a group: carries messages between its agents, along declared channels only.
//!
//! Each agent gets its own Unix socket (the one its VMM connects to when the guest dials the
//! host on [`PEER_PORT`]), so every connection arriving on it speaks for that agent and nobody
//! else. A message is accepted only on a declared channel, with a valid body, and while the
//! receiver's queue for that channel has room: a full queue refuses with `retry`, so a flooding
//! sender is slowed down instead of growing memory, and each channel into an agent has its own
//! queue, served in turn, so one busy channel cannot starve another. An accepted message stays
//! with the router until the receiver acknowledges it; when the receiver's connection comes back
//! (the agent restarted) what it had not acknowledged is delivered again. Every message, refusal
//! and result is written to the trace.
//!
//! What the guest writes is believed no further than the socket allows: a trace id continues an
//! input only if the router gave that input to this agent, results are held only for a caller
//! that waits for them (and only within each sender's share), and an agent opens connections at
//! a bounded rate, each costing the router two threads.
//!
//! [`PEER_PORT`]: agentos_protocol::peer::PEER_PORT

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::{self, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use agentos_protocol::peer::{
    Delivery, MAX_PEER_BODY_BYTES, MAX_PEER_NAME_BYTES, PeerRequest, PeerSend, RouterMessage,
    valid_peer_name,
};
use agentos_protocol::{FrameReader, write_frame};
use serde::Serialize;

use super::file::{INPUT, OUTPUT};
use super::trace::{EventKind, TraceEvent, TraceLog};

/// Messages waiting on one channel before its sender is told to retry.
pub const CHANNEL_QUEUE: usize = 16;
/// Messages delivered to an agent and not yet acknowledged.
const DELIVERY_WINDOW: usize = 4;
/// Frames waiting for one connection's writer; a guest that reads none of them is disconnected.
const CONNECTION_QUEUE: usize = 64;
/// Connections one agent may hold open to the router.
const MAX_CONNECTIONS: usize = 8;
/// New connections one agent may open at once, and how many more it may open per second: each
/// one costs the router a reader and a writer thread, so a connect-and-close loop is held to
/// this rate (the guest's `send` opens one connection per message).
const CONNECT_BURST: f64 = 32.0;
const CONNECTS_PER_SECOND: f64 = 16.0;
/// Messages one input may cause, all agents together: a loop between agents ends here.
const MAX_MESSAGES_PER_INPUT: u32 = 1024;
/// Inputs whose message counts are kept (the oldest are forgotten first): a group that stays up
/// takes inputs without end.
const MAX_COUNTED_INPUTS: usize = 4096;
/// Results held for the callers waiting for them, and their bytes, all senders together; each
/// sender may hold its share (these divided by the group's members), so that one member cannot
/// fill them for everybody.
const MAX_RESULTS: usize = 1024;
const MAX_RESULT_BYTES: usize = 16 << 20;
/// Results one input may have: past this its waiter gets no more.
const MAX_RESULTS_PER_INPUT: usize = 64;
/// Inputs remembered per agent as given to it (the oldest are forgotten first): the trace ids
/// it may send under.
const MAX_GIVEN_TRACES: usize = 1024;
/// Bytes of messages held for one agent (queued or unacknowledged); with the per-channel bound
/// this caps the router's memory at agents x 8 MiB.
const MAX_QUEUED_BYTES: usize = 8 << 20;
/// Refusals written to the trace (all are counted).
const MAX_TRACED_REFUSALS: u32 = 1000;
const ACCEPT_POLL: Duration = Duration::from_millis(50);

/// What the router counted, for reports and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Counters {
    pub accepted: u64,
    pub delivered: u64,
    pub acknowledged: u64,
    /// Sent again to a receiver whose connection came back.
    pub redelivered: u64,
    pub refused_no_channel: u64,
    pub refused_queue_full: u64,
    pub refused_invalid: u64,
    /// Sends that claimed a sender other than the one the router knows.
    pub forged_sender: u64,
    /// Sends under the trace id of an input the router did not give the sender (refused).
    pub forged_trace: u64,
    /// Results of inputs nobody waits for any more (written to the trace, not kept).
    pub results_unclaimed: u64,
    /// Connections served, each by a reader and a writer thread.
    pub connections_served: u64,
    /// Connections refused because the agent held its most at once.
    pub connections_refused: u64,
    /// Connections refused because the agent opened them faster than its rate.
    pub connections_rate_limited: u64,
}

/// A message that reached `output`.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct GroupResult {
    pub trace: u64,
    pub from: String,
    pub kind: String,
    pub body: String,
    pub model: Option<String>,
    pub infer_ms: Option<f64>,
    /// Since the router started.
    pub t_ms: f64,
}

pub struct Router {
    shared: Arc<Shared>,
}

/// An input given to the group, and the wait for its results. The router holds the input's
/// results only while this lives and until [`PendingInput::take`] takes them: once it is
/// dropped (its caller has what it wanted, gave up or timed out) results that come for the
/// input are written to the trace and not kept.
pub struct PendingInput {
    shared: Arc<Shared>,
    trace: u64,
}

struct Shared {
    state: Mutex<State>,
    results_changed: Condvar,
    trace: TraceLog,
    started: Instant,
    stopping: AtomicBool,
}

#[derive(Default)]
struct State {
    channels: HashSet<(String, String)>,
    mailboxes: BTreeMap<String, Mailbox>,
    next_message: u64,
    next_trace: u64,
    next_connection: u64,
    /// Messages each input caused, for the most recent inputs.
    per_input: BTreeMap<u64, u32>,
    /// Inputs someone waits for, with the results not taken yet.
    awaited: HashMap<u64, Awaited>,
    /// Results held for waiters, per sender: what counts against its share.
    held: HashMap<String, Held>,
    traced_refusals: u32,
    counters: Counters,
    /// The agent each member is a replica of, and the replicas of each agent.
    role_of: HashMap<String, String>,
    replicas: HashMap<String, Vec<String>>,
    /// Turns among equally loaded replicas.
    next_pick: usize,
}

#[derive(Default)]
struct Awaited {
    results: Vec<GroupResult>,
    /// Results that came for this input, taken or not.
    received: usize,
}

/// Results held for waiters from one sender, and their body bytes.
#[derive(Clone, Copy, Default)]
struct Held {
    results: usize,
    bytes: usize,
}

/// The inputs an agent was given (a delivery of theirs reached it), the most recent
/// [`MAX_GIVEN_TRACES`] of them.
#[derive(Default)]
struct GivenTraces {
    /// Trace id → when it was last given (a running count), and the reverse, oldest first.
    stamp_of: HashMap<u64, u64>,
    by_stamp: BTreeMap<u64, u64>,
    next_stamp: u64,
}

/// A token bucket for an agent's new connections.
struct ConnectBudget {
    tokens: f64,
    refilled: Instant,
}

#[derive(Default)]
struct Mailbox {
    /// One queue per sending peer, served in turn.
    queues: BTreeMap<String, VecDeque<Pending>>,
    /// The sender served last.
    last_served: Option<String>,
    /// Delivered, waiting for the acknowledgement.
    in_flight: BTreeMap<u64, Pending>,
    listener: Option<ConnectionHandle>,
    connections: usize,
    /// Body bytes queued or unacknowledged.
    queued_bytes: usize,
    /// Counts attachments: an accept loop whose socket was replaced ends.
    socket_generation: u64,
    given: GivenTraces,
    connects: ConnectBudget,
}

#[derive(Clone)]
struct ConnectionHandle {
    id: u64,
    frames: SyncSender<RouterMessage>,
}

#[derive(Clone)]
struct Pending {
    delivery: Delivery,
    model: Option<String>,
    infer_us: Option<u64>,
    claimed_from: Option<String>,
    accepted_at: Instant,
    delivered_at: Option<Instant>,
}

impl Router {
    /// A router for `agents` with `channels`, writing its trace to `trace`.
    pub fn new(agents: &[String], channels: &[(String, String)], trace: TraceLog) -> Self {
        let members: Vec<(String, String)> =
            agents.iter().map(|a| (a.clone(), a.clone())).collect();
        Self::with_members(&members, channels, trace)
    }

    /// A router for `members`, each `(name, agent)`: replicas of one agent share its channels,
    /// and a message to the agent goes to the replica with the fewest messages waiting.
    pub fn with_members(
        members: &[(String, String)],
        channels: &[(String, String)],
        trace: TraceLog,
    ) -> Self {
        let mut state = State {
            channels: channels.iter().cloned().collect(),
            next_message: 1,
            next_trace: 1,
            ..Default::default()
        };
        for (member, role) in members {
            state.mailboxes.insert(member.clone(), Mailbox::default());
            state.role_of.insert(member.clone(), role.clone());
            state
                .replicas
                .entry(role.clone())
                .or_default()
                .push(member.clone());
        }
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                results_changed: Condvar::new(),
                trace,
                started: Instant::now(),
                stopping: AtomicBool::new(false),
            }),
        }
    }

    /// Listens on `socket` for the connections of agent `name` (instead of the socket it had,
    /// when the agent was restarted).
    pub fn attach(&self, name: &str, socket: &Path) -> io::Result<()> {
        let listener = agentos_core::rundir::listen(socket)?;
        listener.set_nonblocking(true)?;
        let generation = {
            let mut state = self.shared.lock();
            let mailbox = state
                .mailboxes
                .get_mut(name)
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such agent"))?;
            mailbox.socket_generation += 1;
            mailbox.socket_generation
        };
        let shared = Arc::clone(&self.shared);
        let name = name.to_owned();
        thread::Builder::new()
            .name(format!("router-{name}"))
            .spawn(move || shared.accept_loop(&name, &listener, generation))?;
        Ok(())
    }

    /// Writes an event about agent `name` itself (it crashed, it was restarted) to the trace.
    pub fn note(&self, name: &str, event: EventKind, summary: String) {
        self.shared.trace.append(&TraceEvent {
            t_ms: self.elapsed_ms(),
            event,
            from: name.to_owned(),
            summary,
            ..TraceEvent::default()
        });
    }

    /// Gives `body` to the group's entry agent as a new input; its results are held for the
    /// [`PendingInput`] returned, until it is dropped.
    pub fn inject(&self, entry: &str, body: String) -> Result<PendingInput, String> {
        let mut state = self.shared.lock();
        let trace = state.next_trace;
        state.next_trace += 1;
        state.awaited.insert(trace, Awaited::default());
        let send = PeerSend {
            seq: 0,
            to: entry.to_owned(),
            kind: "text".to_owned(),
            body,
            trace: Some(trace),
            model: None,
            infer_us: None,
            from: None,
        };
        let refused = match self.shared.accept(&mut state, INPUT, send) {
            RouterMessage::Accepted { .. } => None,
            RouterMessage::Refused { reason, .. } => Some(reason),
            RouterMessage::Deliver(_) => Some("unexpected delivery".to_owned()),
        };
        if let Some(reason) = refused {
            state.awaited.remove(&trace);
            return Err(reason);
        }
        Ok(PendingInput {
            shared: Arc::clone(&self.shared),
            trace,
        })
    }

    pub fn counters(&self) -> Counters {
        self.shared.lock().counters.clone()
    }

    /// Messages accepted and not yet acknowledged, per receiver.
    pub fn unacknowledged(&self) -> BTreeMap<String, usize> {
        let state = self.shared.lock();
        state
            .mailboxes
            .iter()
            .map(|(name, mb)| {
                let queued: usize = mb.queues.values().map(VecDeque::len).sum();
                (name.clone(), queued + mb.in_flight.len())
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    fn elapsed_ms(&self) -> f64 {
        self.shared.started.elapsed().as_secs_f64() * 1000.0
    }
}

impl PendingInput {
    /// The input's trace id.
    pub fn trace(&self) -> u64 {
        self.trace
    }

    /// Waits until `count` results came since the last call, or `deadline` passed, or
    /// `give_up` says so; returns those results, which the router no longer holds.
    pub fn take(
        &self,
        count: usize,
        deadline: Instant,
        give_up: &dyn Fn() -> bool,
    ) -> Vec<GroupResult> {
        let mut got = Vec::new();
        let mut state = self.shared.lock();
        loop {
            got.extend(state.take_results(self.trace));
            let now = Instant::now();
            if got.len() >= count || now >= deadline || give_up() {
                return got;
            }
            let wait = (deadline - now).min(Duration::from_millis(200));
            state = self
                .shared
                .results_changed
                .wait_timeout(state, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for PendingInput {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        let left = state.take_results(self.trace).len() as u64;
        state.counters.results_unclaimed += left;
        state.awaited.remove(&self.trace);
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        let mut state = self.shared.lock();
        for mailbox in state.mailboxes.values_mut() {
            mailbox.listener = None;
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn ms(&self, at: Instant) -> f64 {
        at.duration_since(self.started).as_secs_f64() * 1000.0
    }

    fn accept_loop(self: Arc<Self>, name: &str, listener: &UnixListener, generation: u64) {
        while !self.stopping.load(Ordering::Relaxed) {
            let current = self.lock().mailboxes.get(name).map(|m| m.socket_generation);
            if current != Some(generation) {
                return;
            }
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    thread::sleep(ACCEPT_POLL);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(agent = name, "accepting a router connection failed: {e}");
                    thread::sleep(ACCEPT_POLL);
                    continue;
                }
            };
            if let Err(e) = Arc::clone(&self).serve(name, stream) {
                tracing::warn!(agent = name, "cannot serve a router connection: {e}");
            }
        }
    }

    fn serve(self: Arc<Self>, name: &str, stream: UnixStream) -> io::Result<()> {
        stream.set_nonblocking(false)?;
        let id = {
            let mut state = self.lock();
            let Some(mailbox) = state.mailboxes.get_mut(name) else {
                return Ok(());
            };
            // Refused before any thread is started: the guest sees its connection close.
            if !mailbox.connects.take(Instant::now()) {
                state.counters.connections_rate_limited += 1;
                return Ok(());
            }
            if mailbox.connections >= MAX_CONNECTIONS {
                state.counters.connections_refused += 1;
                return Ok(());
            }
            mailbox.connections += 1;
            state.counters.connections_served += 1;
            state.next_connection += 1;
            state.next_connection
        };
        let (frames, outgoing) = mpsc::sync_channel::<RouterMessage>(CONNECTION_QUEUE);
        let mut writer = stream.try_clone()?;
        let handle = ConnectionHandle { id, frames };
        thread::Builder::new()
            .name(format!("router-w-{name}"))
            .spawn(move || {
                for msg in outgoing {
                    if write_frame(&mut writer, &msg)
                        .and_then(|()| writer.flush().map_err(Into::into))
                        .is_err()
                    {
                        let _ = writer.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                }
            })?;
        let name = name.to_owned();
        thread::Builder::new()
            .name(format!("router-r-{name}"))
            .spawn(move || {
                self.read_connection(&name, &handle, stream);
                let mut state = self.lock();
                if let Some(mailbox) = state.mailboxes.get_mut(&name) {
                    mailbox.connections -= 1;
                    if mailbox.listener.as_ref().is_some_and(|l| l.id == handle.id) {
                        mailbox.listener = None;
                    }
                }
            })?;
        Ok(())
    }

    fn read_connection(&self, name: &str, conn: &ConnectionHandle, stream: UnixStream) {
        let shutdown = stream.try_clone().ok();
        let mut frames = FrameReader::new(stream);
        loop {
            let request = match frames.read::<PeerRequest>() {
                Ok(Some(request)) => request,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(agent = name, "dropping a router connection: {e}");
                    let mut state = self.lock();
                    state.counters.refused_invalid += 1;
                    return;
                }
            };
            let mut state = self.lock();
            match request {
                PeerRequest::Listen => {
                    self.listen(&mut state, name, conn.clone());
                }
                PeerRequest::Send(send) => {
                    let seq = send.seq;
                    let mut answer = self.accept(&mut state, name, send);
                    if let RouterMessage::Accepted { seq: s, .. }
                    | RouterMessage::Refused { seq: s, .. } = &mut answer
                    {
                        *s = seq;
                    }
                    if conn.frames.try_send(answer).is_err() {
                        drop(state);
                        if let Some(s) = &shutdown {
                            let _ = s.shutdown(std::net::Shutdown::Both);
                        }
                        return;
                    }
                }
                PeerRequest::Ack { message } => self.acknowledge(&mut state, name, message),
            }
        }
    }

    fn listen(&self, state: &mut State, name: &str, conn: ConnectionHandle) {
        let Some(mailbox) = state.mailboxes.get_mut(name) else {
            return;
        };
        mailbox.listener = Some(conn);
        // What the previous connection had not acknowledged goes out again, first.
        let again: Vec<Pending> = std::mem::take(&mut mailbox.in_flight)
            .into_values()
            .collect();
        let count = again.len() as u64;
        for pending in again.into_iter().rev() {
            let from = pending.delivery.from.clone();
            mailbox.queues.entry(from).or_default().push_front(pending);
        }
        state.counters.redelivered += count;
        self.pump(state, name);
    }

    /// Takes a message from `from` (known from its socket), or says why not.
    fn accept(&self, state: &mut State, from: &str, send: PeerSend) -> RouterMessage {
        let now = Instant::now();
        let bytes = send.body.len();
        // Kept with the message and written to the trace: no longer than a name.
        let mut send = send;
        send.model = send.model.as_deref().map(clip);
        send.from = send.from.as_deref().map(clip);
        // The input this message continues: none, one the router gave `from`, or a forgery.
        let trace = match send.trace {
            None | Some(0) => Ok(0),
            Some(t) if from == INPUT || state.was_given(from, t) => Ok(t),
            Some(t) => Err(t),
        };
        // Refusals are traced under a trace id the sender may use, never under a forged one.
        let traced_as = trace.unwrap_or(0);
        let refuse = |state: &mut State, reason: String, retry: bool, send: &PeerSend| {
            // Back-pressure is counted, not traced (a flood would fill the trace), and so are
            // refusals past a bound: a guest cannot grow the trace without end.
            if retry {
                state.counters.refused_queue_full += 1;
            } else if state.traced_refusals < MAX_TRACED_REFUSALS {
                state.traced_refusals += 1;
                self.trace.append(&TraceEvent {
                    t_ms: self.ms(now),
                    trace: traced_as,
                    event: EventKind::Refused,
                    from: from.to_owned(),
                    to: clip(&send.to),
                    kind: clip(&send.kind),
                    bytes: send.body.len(),
                    summary: reason.clone(),
                    claimed_from: send.from.as_deref().map(clip),
                    ..TraceEvent::default()
                });
            }
            RouterMessage::Refused {
                seq: send.seq,
                reason,
                retry,
            }
        };
        if let Some(claimed) = send.from.as_deref()
            && claimed != from
        {
            state.counters.forged_sender += 1;
        }
        if !valid_peer_name(&send.to) || !valid_peer_name(&send.kind) {
            state.counters.refused_invalid += 1;
            return refuse(
                state,
                "invalid receiver or kind name".to_owned(),
                false,
                &send,
            );
        }
        if send.body.len() > MAX_PEER_BODY_BYTES {
            state.counters.refused_invalid += 1;
            return refuse(
                state,
                format!("the body is larger than {MAX_PEER_BODY_BYTES} bytes"),
                false,
                &send,
            );
        }
        let from_role = state.role(from).to_owned();
        let to_role = state.role(&send.to).to_owned();
        if from != INPUT && !state.channels.contains(&(from_role, to_role)) {
            state.counters.refused_no_channel += 1;
            let reason = format!("no channel from `{from}` to `{}`", send.to);
            return refuse(state, reason, false, &send);
        }
        // A trace id the router did not give this agent (another caller's input, or one never
        // handed out) would attach the message to a path it is not on.
        let trace = match trace {
            Ok(trace) => trace,
            Err(forged) => {
                state.counters.forged_trace += 1;
                let reason = format!("trace {forged} is not an input `{from}` was given");
                return refuse(state, reason, false, &send);
            }
        };
        let caused = state.per_input.get(&trace).copied().unwrap_or(0);
        if caused >= MAX_MESSAGES_PER_INPUT {
            state.counters.refused_invalid += 1;
            let reason = format!(
                "input {trace} already caused {MAX_MESSAGES_PER_INPUT} messages (a loop between agents?)"
            );
            return refuse(state, reason, false, &send);
        }
        let message = state.next_message;
        if send.to == OUTPUT {
            let kept = match state.result_room(from, trace, bytes) {
                Ok(kept) => kept,
                Err((reason, retry)) => {
                    if !retry {
                        state.counters.refused_invalid += 1;
                    }
                    return refuse(state, reason, retry, &send);
                }
            };
            state.count_message(trace);
            state.next_message += 1;
            state.counters.accepted += 1;
            let result = GroupResult {
                trace,
                from: from.to_owned(),
                kind: send.kind.clone(),
                body: send.body.clone(),
                model: send.model.clone(),
                infer_ms: send.infer_us.map(|us| us as f64 / 1000.0),
                t_ms: self.ms(now),
            };
            self.trace.append(&TraceEvent {
                t_ms: result.t_ms,
                trace,
                event: EventKind::Result,
                message: Some(message),
                from: from.to_owned(),
                to: OUTPUT.to_owned(),
                kind: send.kind.clone(),
                bytes: send.body.len(),
                model: send.model.clone(),
                infer_ms: result.infer_ms,
                summary: summary(&send.body),
                claimed_from: send.from.clone().filter(|c| c != from),
                ..TraceEvent::default()
            });
            if kept {
                state.hold(result);
                self.results_changed.notify_all();
            } else {
                state.counters.results_unclaimed += 1;
            }
            return RouterMessage::Accepted {
                seq: send.seq,
                message,
            };
        }
        let receiver = state.pick(&send.to);
        let Some(mailbox) = state.mailboxes.get_mut(&receiver) else {
            state.counters.refused_invalid += 1;
            let reason = format!("no agent `{}` in this group", send.to);
            return refuse(state, reason, false, &send);
        };
        if mailbox.queued_bytes + bytes > MAX_QUEUED_BYTES {
            let reason = format!(
                "`{receiver}` has {} KiB of messages waiting; send again later",
                mailbox.queued_bytes >> 10
            );
            return refuse(state, reason, true, &send);
        }
        let queue = mailbox.queues.entry(from.to_owned()).or_default();
        if queue.len() >= CHANNEL_QUEUE {
            let reason = format!(
                "`{receiver}` has {CHANNEL_QUEUE} messages from `{from}` waiting; send again later"
            );
            return refuse(state, reason, true, &send);
        }
        mailbox.queued_bytes += bytes;
        queue.push_back(Pending {
            delivery: Delivery {
                message,
                from: from.to_owned(),
                kind: send.kind.clone(),
                body: send.body,
                trace,
            },
            model: send.model,
            infer_us: send.infer_us,
            claimed_from: send.from.filter(|c| c != from),
            accepted_at: now,
            delivered_at: None,
        });
        state.count_message(trace);
        state.next_message += 1;
        state.counters.accepted += 1;
        if from == INPUT {
            self.trace.append(&TraceEvent {
                t_ms: self.ms(now),
                trace,
                event: EventKind::Input,
                message: Some(message),
                from: INPUT.to_owned(),
                to: receiver.clone(),
                kind: send.kind.clone(),
                bytes,
                ..TraceEvent::default()
            });
        }
        self.pump(state, &receiver);
        RouterMessage::Accepted {
            seq: send.seq,
            message,
        }
    }

    /// Moves messages for `name` from its queues to its connection, up to the window.
    fn pump(&self, state: &mut State, name: &str) {
        let Some(mailbox) = state.mailboxes.get_mut(name) else {
            return;
        };
        let Some(listener) = mailbox.listener.clone() else {
            return;
        };
        let mut delivered = 0;
        while mailbox.in_flight.len() < DELIVERY_WINDOW {
            let Some(from) = mailbox.next_sender() else {
                break;
            };
            let Some(queue) = mailbox.queues.get_mut(&from) else {
                break;
            };
            let Some(mut pending) = queue.pop_front() else {
                break;
            };
            match listener
                .frames
                .try_send(RouterMessage::Deliver(pending.delivery.clone()))
            {
                Ok(()) => {
                    pending.delivered_at = Some(Instant::now());
                    mailbox.given.insert(pending.delivery.trace);
                    mailbox.last_served = Some(from);
                    mailbox.in_flight.insert(pending.delivery.message, pending);
                    delivered += 1;
                }
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                    queue.push_front(pending);
                    break;
                }
            }
        }
        state.counters.delivered += delivered;
    }

    fn acknowledge(&self, state: &mut State, name: &str, message: u64) {
        let Some(mailbox) = state.mailboxes.get_mut(name) else {
            return;
        };
        let Some(pending) = mailbox.in_flight.remove(&message) else {
            // Not this agent's, or acknowledged before: nothing to forget.
            state.counters.refused_invalid += 1;
            return;
        };
        mailbox.queued_bytes = mailbox
            .queued_bytes
            .saturating_sub(pending.delivery.body.len());
        state.counters.acknowledged += 1;
        let now = Instant::now();
        let delivered_at = pending.delivered_at.unwrap_or(now);
        if pending.delivery.from != INPUT {
            self.trace.append(&TraceEvent {
                t_ms: self.ms(pending.accepted_at),
                trace: pending.delivery.trace,
                event: EventKind::Message,
                message: Some(message),
                from: pending.delivery.from.clone(),
                to: name.to_owned(),
                kind: pending.delivery.kind.clone(),
                bytes: pending.delivery.body.len(),
                model: pending.model.clone(),
                infer_ms: pending.infer_us.map(|us| us as f64 / 1000.0),
                queued_ms: Some(ms_between(pending.accepted_at, delivered_at)),
                handled_ms: Some(ms_between(delivered_at, now)),
                summary: summary(&pending.delivery.body),
                claimed_from: pending.claimed_from.clone(),
            });
        } else {
            self.trace.append(&TraceEvent {
                t_ms: self.ms(now),
                trace: pending.delivery.trace,
                event: EventKind::Handled,
                message: Some(message),
                from: INPUT.to_owned(),
                to: name.to_owned(),
                kind: pending.delivery.kind.clone(),
                bytes: pending.delivery.body.len(),
                queued_ms: Some(ms_between(pending.accepted_at, delivered_at)),
                handled_ms: Some(ms_between(delivered_at, now)),
                ..TraceEvent::default()
            });
        }
        self.pump(state, name);
    }
}

impl State {
    /// Whether the router gave agent `name` a message of input `trace`.
    fn was_given(&self, name: &str, trace: u64) -> bool {
        self.mailboxes
            .get(name)
            .is_some_and(|m| m.given.contains(trace))
    }

    /// Counts a message against input `trace`, forgetting the oldest input's count past
    /// [`MAX_COUNTED_INPUTS`] (the untraced count, 0, stays).
    fn count_message(&mut self, trace: u64) {
        *self.per_input.entry(trace).or_default() += 1;
        if self.per_input.len() > MAX_COUNTED_INPUTS
            && let Some(&oldest) = self.per_input.range(1..).next().map(|(t, _)| t)
        {
            self.per_input.remove(&oldest);
        }
    }

    /// Whether a result of `bytes` from `from` for input `trace` is kept for its waiter
    /// (`false`: nobody waits), or why it is refused and whether sending it again can work.
    fn result_room(&self, from: &str, trace: u64, bytes: usize) -> Result<bool, (String, bool)> {
        let Some(awaited) = self.awaited.get(&trace) else {
            return Ok(false);
        };
        if awaited.received >= MAX_RESULTS_PER_INPUT {
            return Err((
                format!("input {trace} has its {MAX_RESULTS_PER_INPUT} results already"),
                false,
            ));
        }
        let members = self.mailboxes.len().max(1);
        let held = self.held.get(from).copied().unwrap_or_default();
        if held.results >= MAX_RESULTS / members || held.bytes + bytes > MAX_RESULT_BYTES / members
        {
            return Err((
                format!(
                    "`{from}` has {} results ({} KiB) its callers have not taken yet; send again later",
                    held.results,
                    held.bytes >> 10
                ),
                true,
            ));
        }
        Ok(true)
    }

    /// Keeps `result` for the waiter of its input, against its sender's share.
    fn hold(&mut self, result: GroupResult) {
        let Some(awaited) = self.awaited.get_mut(&result.trace) else {
            return;
        };
        let held = self.held.entry(result.from.clone()).or_default();
        held.results += 1;
        held.bytes += result.body.len();
        awaited.received += 1;
        awaited.results.push(result);
    }

    /// Hands over the results held for input `trace`; they no longer count against their
    /// senders.
    fn take_results(&mut self, trace: u64) -> Vec<GroupResult> {
        let Some(awaited) = self.awaited.get_mut(&trace) else {
            return Vec::new();
        };
        let taken = std::mem::take(&mut awaited.results);
        for result in &taken {
            if let Some(held) = self.held.get_mut(&result.from) {
                held.results = held.results.saturating_sub(1);
                held.bytes = held.bytes.saturating_sub(result.body.len());
            }
        }
        taken
    }

    /// The agent `name` is a replica of (itself for an agent, `input` and `output`).
    fn role<'a>(&'a self, name: &'a str) -> &'a str {
        self.role_of.get(name).map_or(name, String::as_str)
    }

    /// The member a message to `to` goes to: `to` itself when it is a member, else the replica
    /// of agent `to` with the fewest messages waiting (in turn among equals).
    fn pick(&mut self, to: &str) -> String {
        let Some(replicas) = self
            .replicas
            .get(to)
            .filter(|_| !self.mailboxes.contains_key(to))
        else {
            return to.to_owned();
        };
        let load = |name: &String| {
            self.mailboxes.get(name).map_or(usize::MAX, |mb| {
                mb.queues.values().map(VecDeque::len).sum::<usize>() + mb.in_flight.len()
            })
        };
        let n = replicas.len();
        let start = self.next_pick % n.max(1);
        let chosen = (0..n)
            .map(|i| &replicas[(start + i) % n])
            .min_by_key(|name| load(name))
            .cloned()
            .unwrap_or_else(|| to.to_owned());
        self.next_pick = self.next_pick.wrapping_add(1);
        chosen
    }
}

impl GivenTraces {
    /// Records that input `trace` was given (again), forgetting the least recently given past
    /// [`MAX_GIVEN_TRACES`].
    fn insert(&mut self, trace: u64) {
        if trace == 0 {
            return;
        }
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        if let Some(old) = self.stamp_of.insert(trace, stamp) {
            self.by_stamp.remove(&old);
        }
        self.by_stamp.insert(stamp, trace);
        if self.by_stamp.len() > MAX_GIVEN_TRACES
            && let Some((_, oldest)) = self.by_stamp.pop_first()
        {
            self.stamp_of.remove(&oldest);
        }
    }

    fn contains(&self, trace: u64) -> bool {
        self.stamp_of.contains_key(&trace)
    }
}

impl Default for ConnectBudget {
    fn default() -> Self {
        Self {
            tokens: CONNECT_BURST,
            refilled: Instant::now(),
        }
    }
}

impl ConnectBudget {
    /// Takes one connection's token at `now`, if the bucket has one.
    fn take(&mut self, now: Instant) -> bool {
        let earned =
            now.saturating_duration_since(self.refilled).as_secs_f64() * CONNECTS_PER_SECOND;
        self.tokens = (self.tokens + earned).min(CONNECT_BURST);
        self.refilled = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

impl Mailbox {
    /// The next sender with a waiting message, after the one served last.
    fn next_sender(&self) -> Option<String> {
        let waiting = self
            .queues
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(from, _)| from);
        let after = self.last_served.as_deref();
        let mut first = None;
        for from in waiting {
            if first.is_none() {
                first = Some(from.clone());
            }
            if after.is_some_and(|last| from.as_str() > last) {
                return Some(from.clone());
            }
        }
        first
    }
}

fn ms_between(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64() * 1000.0
}

/// The start of a body, on one line, for the trace.
fn summary(body: &str) -> String {
    let line = body.split_whitespace().collect::<Vec<_>>().join(" ");
    agentos_protocol::clip(&line, 80)
}

/// A name the guest wrote, cut for the trace.
fn clip(text: &str) -> String {
    agentos_protocol::clip(text, MAX_PEER_NAME_BYTES)
}

#[cfg(test)]
mod tests;
