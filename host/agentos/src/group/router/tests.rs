//! The router over real Unix sockets, with test code in the guests' place.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use agentos_protocol::peer::{PeerRequest, PeerSend, RouterMessage};
use agentos_protocol::{FrameReader, write_frame};

use super::*;
use crate::group::trace;

struct Fixture {
    router: Router,
    dir: tempfile::TempDir,
}

fn fixture(channels: &[(&str, &str)]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let agents: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
    let channels: Vec<(String, String)> = channels
        .iter()
        .map(|(f, t)| ((*f).to_owned(), (*t).to_owned()))
        .collect();
    let log = TraceLog::create(&dir.path().join("trace.jsonl")).unwrap();
    let router = Router::new(&agents, &channels, log);
    for agent in &agents {
        router.attach(agent, &socket(&dir, agent)).unwrap();
    }
    Fixture { router, dir }
}

fn socket(dir: &tempfile::TempDir, agent: &str) -> PathBuf {
    dir.path().join(format!("{agent}.sock"))
}

/// One guest-side connection.
struct Peer {
    writer: UnixStream,
    frames: FrameReader<UnixStream>,
}

impl Peer {
    fn connect(f: &Fixture, agent: &str) -> Self {
        let stream = UnixStream::connect(socket(&f.dir, agent)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        Self {
            writer: stream.try_clone().unwrap(),
            frames: FrameReader::new(stream),
        }
    }

    fn request(&mut self, req: &PeerRequest) {
        write_frame(&mut self.writer, req).unwrap();
    }

    fn send(&mut self, seq: u64, to: &str, body: &str, from: Option<&str>) -> RouterMessage {
        self.request(&PeerRequest::Send(PeerSend {
            seq,
            to: to.into(),
            kind: "text".into(),
            body: body.into(),
            trace: None,
            model: None,
            infer_us: None,
            from: from.map(String::from),
        }));
        self.next()
    }

    /// Sends `body` to `to` as part of input `trace`; returns the router's answer.
    fn send_traced(&mut self, seq: u64, to: &str, body: &str, trace: u64) -> RouterMessage {
        self.request(&PeerRequest::Send(PeerSend {
            seq,
            to: to.into(),
            kind: "text".into(),
            body: body.into(),
            trace: Some(trace),
            model: None,
            infer_us: None,
            from: None,
        }));
        self.next()
    }

    fn next(&mut self) -> RouterMessage {
        self.frames.read().unwrap().expect("the router closed")
    }

    fn delivery(&mut self) -> Delivery {
        match self.next() {
            RouterMessage::Deliver(d) => d,
            other => panic!("expected a delivery, got {other:?}"),
        }
    }
}

/// A deadline for waits that should end at once.
fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn delivers_along_channels_and_knows_the_sender_from_its_socket() {
    let f = fixture(&[("a", "b"), ("b", "output")]);
    let mut b = Peer::connect(&f, "b");
    b.request(&PeerRequest::Listen);
    let mut a = Peer::connect(&f, "a");
    // `a` claims to be `c`: the router delivers it as from `a` and counts the claim.
    let RouterMessage::Accepted { seq: 7, message } = a.send(7, "b", "hello", Some("c")) else {
        panic!("not accepted")
    };
    let got = b.delivery();
    assert_eq!(
        (got.message, got.from.as_str(), got.body.as_str()),
        (message, "a", "hello")
    );
    b.request(&PeerRequest::Ack { message });
    assert!(matches!(
        b.send(1, "output", "done", None),
        RouterMessage::Accepted { .. }
    ));

    // No channel from b to a, nor from a to output.
    let RouterMessage::Refused { reason, retry, .. } = b.send(2, "a", "back", None) else {
        panic!("an undeclared channel was accepted")
    };
    assert!(
        reason.contains("no channel from `b` to `a`") && !retry,
        "{reason}"
    );
    assert!(matches!(
        a.send(8, "output", "x", None),
        RouterMessage::Refused { .. }
    ));
    assert!(matches!(
        a.send(9, "../b", "x", None),
        RouterMessage::Refused { .. }
    ));

    wait_for("the acknowledgement", || {
        f.router.counters().acknowledged == 1
    });
    let counters = f.router.counters();
    assert_eq!(counters.forged_sender, 1);
    assert_eq!(counters.refused_no_channel, 2);
    assert_eq!(counters.refused_invalid, 1);
    let events = trace::read(&f.dir.path().join("trace.jsonl")).unwrap();
    let message = events
        .iter()
        .find(|e| e.event == EventKind::Message)
        .unwrap();
    assert_eq!((message.from.as_str(), message.to.as_str()), ("a", "b"));
    assert_eq!(message.claimed_from.as_deref(), Some("c"));
    assert_eq!(
        events
            .iter()
            .filter(|e| e.event == EventKind::Refused)
            .count(),
        3
    );
}

#[test]
fn a_flood_is_refused_with_retry_and_does_not_starve_another_channel() {
    let f = fixture(&[("a", "c"), ("b", "c")]);
    let mut a = Peer::connect(&f, "a");
    let mut accepted = 0;
    let mut refused = 0;
    for seq in 0..200 {
        match a.send(seq, "c", &"x".repeat(1000), None) {
            RouterMessage::Accepted { .. } => accepted += 1,
            RouterMessage::Refused { retry: true, .. } => refused += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(accepted, CHANNEL_QUEUE);
    assert_eq!(refused, 200 - CHANNEL_QUEUE);
    let mut b = Peer::connect(&f, "b");
    assert!(matches!(
        b.send(1, "c", "from b", None),
        RouterMessage::Accepted { .. }
    ));
    // `c` starts listening: `b`'s one message comes within the first two deliveries.
    let mut c = Peer::connect(&f, "c");
    c.request(&PeerRequest::Listen);
    let first = c.delivery();
    let second = c.delivery();
    assert!(
        first.from == "b" || second.from == "b",
        "{} then {}",
        first.from,
        second.from
    );
    assert_eq!(
        f.router.counters().refused_queue_full,
        200 - CHANNEL_QUEUE as u64
    );
}

#[test]
fn unacknowledged_messages_come_again_to_a_new_connection() {
    let f = fixture(&[("a", "b")]);
    let mut a = Peer::connect(&f, "a");
    let mut b = Peer::connect(&f, "b");
    b.request(&PeerRequest::Listen);
    let mut ids = Vec::new();
    for seq in 0..3 {
        let RouterMessage::Accepted { message, .. } = a.send(seq, "b", &format!("m{seq}"), None)
        else {
            panic!("not accepted")
        };
        ids.push(message);
    }
    let first = b.delivery();
    b.request(&PeerRequest::Ack {
        message: first.message,
    });
    let _ = b.delivery();
    // The receiver goes away (its agent restarted) with two messages unacknowledged.
    drop(b);
    wait_for("the acknowledgement", || {
        f.router.counters().acknowledged == 1
    });
    let mut again = Peer::connect(&f, "b");
    again.request(&PeerRequest::Listen);
    let mut seen: Vec<u64> = (0..2).map(|_| again.delivery().message).collect();
    seen.sort_unstable();
    assert_eq!(seen, ids[1..]);
    assert!(f.router.counters().redelivered >= 1);
    for id in seen {
        again.request(&PeerRequest::Ack { message: id });
    }
    wait_for("every acknowledgement", || {
        f.router.counters().acknowledged == 3
    });
    assert!(f.router.unacknowledged().is_empty());
}

#[test]
fn input_reaches_the_entry_and_results_are_collected() {
    let f = fixture(&[("a", "output")]);
    let mut a = Peer::connect(&f, "a");
    a.request(&PeerRequest::Listen);
    let input = f.router.inject("a", "the input".into()).unwrap();
    let trace = input.trace();
    let got = a.delivery();
    assert_eq!((got.from.as_str(), got.trace), ("input", trace));
    a.request(&PeerRequest::Send(PeerSend {
        seq: 1,
        to: "output".into(),
        kind: "summary".into(),
        body: "short".into(),
        trace: Some(trace),
        model: Some("minilm".into()),
        infer_us: Some(2500),
        from: None,
    }));
    let results = input.take(1, soon(), &|| false);
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].body, "short");
    assert_eq!(results[0].infer_ms, Some(2.5));
}

#[test]
fn an_agent_holds_at_most_its_byte_budget() {
    let f = fixture(&[("a", "c"), ("b", "c"), ("input", "c")]);
    let big = "x".repeat(MAX_PEER_BODY_BYTES);
    for sender in ["a", "b"] {
        let mut peer = Peer::connect(&f, sender);
        for seq in 0..CHANNEL_QUEUE as u64 {
            assert!(matches!(
                peer.send(seq, "c", &big, None),
                RouterMessage::Accepted { .. }
            ));
        }
    }
    // 32 bodies of 256 KiB fill the 8 MiB budget: one more, on any channel, must wait.
    let Err(err) = f.router.inject("c", "one more".into()) else {
        panic!("the input was taken")
    };
    assert!(err.contains("KiB of messages waiting"), "{err}");
    assert_eq!(f.router.counters().refused_queue_full, 1);
    let events = trace::read(&f.dir.path().join("trace.jsonl")).unwrap();
    assert!(
        events.iter().all(|e| e.event != EventKind::Refused),
        "back-pressure is not traced"
    );
}

#[test]
fn replicas_share_their_agents_channels_and_take_messages_in_turn() {
    let dir = tempfile::tempdir().unwrap();
    let members: Vec<(String, String)> = [("a", "a"), ("w-1", "w"), ("w-2", "w")]
        .map(|(m, r)| (m.to_owned(), r.to_owned()))
        .to_vec();
    let channels = vec![
        ("a".to_owned(), "w".to_owned()),
        ("w".to_owned(), "output".to_owned()),
    ];
    let log = TraceLog::create(&dir.path().join("trace.jsonl")).unwrap();
    let router = Router::with_members(&members, &channels, log);
    for (member, _) in &members {
        router.attach(member, &socket(&dir, member)).unwrap();
    }
    let f = Fixture { router, dir };
    let mut w1 = Peer::connect(&f, "w-1");
    w1.request(&PeerRequest::Listen);
    let mut w2 = Peer::connect(&f, "w-2");
    w2.request(&PeerRequest::Listen);
    let mut a = Peer::connect(&f, "a");
    // Equally loaded replicas take turns; a busy one is passed over.
    assert!(matches!(
        a.send(1, "w", "one", None),
        RouterMessage::Accepted { .. }
    ));
    assert!(matches!(
        a.send(2, "w", "two", None),
        RouterMessage::Accepted { .. }
    ));
    let (one, two) = (w1.delivery(), w2.delivery());
    assert_eq!((one.body.as_str(), two.body.as_str()), ("one", "two"));
    w2.request(&PeerRequest::Ack {
        message: two.message,
    });
    wait_for("the ack", || f.router.counters().acknowledged == 1);
    assert!(matches!(
        a.send(3, "w", "three", None),
        RouterMessage::Accepted { .. }
    ));
    assert_eq!(w2.delivery().body, "three");
    // A replica sends on its agent's channels, as itself.
    let input = f.router.inject("a", "x".into()).unwrap();
    let mut a_listens = Peer::connect(&f, "a");
    a_listens.request(&PeerRequest::Listen);
    let given = a_listens.delivery();
    // The input goes on to w-1 (named, on the agent's channel), which may then answer for it.
    assert!(matches!(
        a_listens.send_traced(8, "w-1", "for w", given.trace),
        RouterMessage::Accepted { .. }
    ));
    let for_w = w1.delivery();
    assert_eq!((for_w.body.as_str(), for_w.trace), ("for w", input.trace()));
    w1.request(&PeerRequest::Send(PeerSend {
        seq: 9,
        to: "output".into(),
        kind: "text".into(),
        body: "done".into(),
        trace: Some(input.trace()),
        model: None,
        infer_us: None,
        from: None,
    }));
    assert!(matches!(w1.next(), RouterMessage::Accepted { seq: 9, .. }));
    let results = input.take(1, soon(), &|| false);
    assert_eq!(results[0].from, "w-1");
    // A replica can be named directly, and has no channel of its own beyond its agent's.
    assert!(matches!(
        a.send(4, "w-1", "direct", None),
        RouterMessage::Accepted { .. }
    ));
    assert_eq!(w1.delivery().body, "direct");
    let mut w1_send = Peer::connect(&f, "w-1");
    assert!(matches!(
        w1_send.send(5, "a", "back", None),
        RouterMessage::Refused { retry: false, .. }
    ));
}

/// Answers every input delivered to `peer` with one result to `output`, and acknowledges it.
fn answer(peer: &mut Peer, seq: u64) -> RouterMessage {
    let got = peer.delivery();
    let answer = peer.send_traced(seq, "output", &format!("result {seq}"), got.trace);
    peer.request(&PeerRequest::Ack {
        message: got.message,
    });
    answer
}

#[test]
fn a_group_that_stays_up_answers_every_input_and_holds_no_result_taken() {
    // More inputs than the router ever holds results: each input's caller takes its result,
    // and it leaves the router.
    let f = fixture(&[("a", "output")]);
    let mut a = Peer::connect(&f, "a");
    a.request(&PeerRequest::Listen);
    let inputs = 3 * MAX_RESULTS as u64;
    for seq in 0..inputs {
        let input = f.router.inject("a", format!("input {seq}")).unwrap();
        let answered = answer(&mut a, seq);
        assert!(
            matches!(answered, RouterMessage::Accepted { .. }),
            "input {seq}: {answered:?}"
        );
        let results = input.take(1, soon(), &|| false);
        assert_eq!(results.len(), 1, "input {seq} got no result");
        assert_eq!(results[0].body, format!("result {seq}"));
    }
    let state = f.router.shared.lock();
    assert!(state.awaited.is_empty());
    assert!(state.held.values().all(|h| h.results == 0 && h.bytes == 0));
    assert_eq!(state.counters.refused_queue_full, 0);
}

#[test]
fn results_of_an_input_nobody_waits_for_are_counted_not_kept() {
    let f = fixture(&[("a", "output")]);
    let mut a = Peer::connect(&f, "a");
    a.request(&PeerRequest::Listen);
    // The caller gives up before the result comes (it timed out, or left).
    let input = f.router.inject("a", "x".into()).unwrap();
    drop(input);
    assert!(matches!(answer(&mut a, 1), RouterMessage::Accepted { .. }));
    // One that came but was not taken goes with its waiter too.
    let input = f.router.inject("a", "y".into()).unwrap();
    assert!(matches!(answer(&mut a, 2), RouterMessage::Accepted { .. }));
    wait_for("the second result", || {
        f.router
            .shared
            .lock()
            .held
            .get("a")
            .is_some_and(|h| h.results == 1)
    });
    drop(input);
    let state = f.router.shared.lock();
    assert_eq!(state.counters.results_unclaimed, 2);
    assert!(state.awaited.is_empty());
    assert!(state.held.values().all(|h| h.results == 0 && h.bytes == 0));
}

#[test]
fn one_member_cannot_fill_the_results_for_everybody() {
    let f = fixture(&[("a", "output"), ("b", "output")]);
    let mut a = Peer::connect(&f, "a");
    a.request(&PeerRequest::Listen);
    let mut b = Peer::connect(&f, "b");
    b.request(&PeerRequest::Listen);
    // `a` is given two inputs and answers them with the largest bodies until refused; nobody
    // takes its results meanwhile.
    let first = f.router.inject("a", "one".into()).unwrap();
    let second = f.router.inject("a", "two".into()).unwrap();
    let traces = [a.delivery().trace, a.delivery().trace];
    let big = "r".repeat(MAX_PEER_BODY_BYTES);
    let mut kept = 0;
    let refusal = loop {
        match a.send_traced(kept, "output", &big, traces[kept as usize % 2]) {
            RouterMessage::Accepted { .. } => kept += 1,
            other => break other,
        }
        assert!(kept <= 2 * MAX_RESULTS_PER_INPUT as u64, "never refused");
    };
    let RouterMessage::Refused { retry, reason, .. } = refusal else {
        panic!("{refusal:?}")
    };
    assert!(retry && reason.contains("not taken yet"), "{reason}");
    let members = 3;
    assert_eq!(
        kept as usize,
        MAX_RESULT_BYTES / members / MAX_PEER_BODY_BYTES
    );
    // `b`'s result for its own input is still taken.
    let third = f.router.inject("b", "three".into()).unwrap();
    assert!(matches!(answer(&mut b, 1), RouterMessage::Accepted { .. }));
    assert_eq!(third.take(1, soon(), &|| false)[0].from, "b");
    // Once its callers take `a`'s results, `a` has room again.
    let taken = first.take(1, soon(), &|| false).len() + second.take(1, soon(), &|| false).len();
    assert_eq!(taken as u64, kept);
    assert!(matches!(
        a.send_traced(99, "output", &big, traces[0]),
        RouterMessage::Accepted { .. }
    ));
}

#[test]
fn a_member_cannot_attach_results_to_an_input_it_was_not_given() {
    let f = fixture(&[("a", "output"), ("b", "output")]);
    let mut a = Peer::connect(&f, "a");
    a.request(&PeerRequest::Listen);
    let input = f.router.inject("a", "for a".into()).unwrap();
    let victim = input.trace();
    // `b` was given nothing: neither the caller's input, nor one never handed out, is its.
    let mut b = Peer::connect(&f, "b");
    for (seq, trace) in [(1, victim), (2, victim + 1), (3, u64::MAX)] {
        let RouterMessage::Refused { retry, reason, .. } =
            b.send_traced(seq, "output", "stolen", trace)
        else {
            panic!("trace {trace} was taken from `b`")
        };
        assert!(
            !retry && reason.contains("not an input `b` was given"),
            "{reason}"
        );
    }
    // Without a trace, `b` still sends; its result belongs to no input.
    assert!(matches!(
        b.send(4, "output", "untraced", None),
        RouterMessage::Accepted { .. }
    ));
    assert!(matches!(answer(&mut a, 5), RouterMessage::Accepted { .. }));
    let results = input.take(2, Instant::now() + Duration::from_millis(300), &|| false);
    let bodies: Vec<&str> = results.iter().map(|r| r.body.as_str()).collect();
    assert_eq!(bodies, ["result 5"]);
    let counters = f.router.counters();
    assert_eq!(counters.forged_trace, 3);
    assert_eq!(counters.results_unclaimed, 1);
    // The refusals are traced, but not under the caller's input.
    let events = trace::read(&f.dir.path().join("trace.jsonl")).unwrap();
    let refused: Vec<&TraceEvent> = events
        .iter()
        .filter(|e| e.event == EventKind::Refused)
        .collect();
    assert_eq!(refused.len(), 3);
    assert!(refused.iter().all(|e| e.trace == 0 && e.from == "b"));
}

#[test]
fn the_inputs_an_agent_was_given_are_remembered_up_to_a_bound() {
    let mut given = GivenTraces::default();
    for trace in 1..=MAX_GIVEN_TRACES as u64 {
        given.insert(trace);
    }
    // Given again, the first is now the most recent; the second is the oldest.
    given.insert(1);
    given.insert(MAX_GIVEN_TRACES as u64 + 1);
    assert!(given.contains(1));
    assert!(!given.contains(2));
    assert!(given.contains(MAX_GIVEN_TRACES as u64 + 1));
    given.insert(0);
    assert!(!given.contains(0));
    assert_eq!(given.stamp_of.len(), MAX_GIVEN_TRACES);
    assert_eq!(given.by_stamp.len(), MAX_GIVEN_TRACES);
}

#[test]
fn the_connection_budget_allows_a_burst_then_its_rate() {
    let start = Instant::now();
    let mut budget = ConnectBudget {
        tokens: CONNECT_BURST,
        refilled: start,
    };
    let burst = CONNECT_BURST as usize;
    assert_eq!((0..2 * burst).filter(|_| budget.take(start)).count(), burst);
    let later = start + Duration::from_secs(1);
    assert_eq!(
        (0..2 * burst).filter(|_| budget.take(later)).count(),
        CONNECTS_PER_SECOND as usize
    );
    // A long pause earns no more than the burst.
    let much_later = later + Duration::from_secs(3600);
    assert_eq!(
        (0..2 * burst).filter(|_| budget.take(much_later)).count(),
        burst
    );
}

#[test]
fn a_connect_and_close_storm_is_held_to_the_rate_and_the_agent_still_sends() {
    let f = fixture(&[("a", "output")]);
    let started = Instant::now();
    let storm = 200;
    for _ in 0..storm {
        drop(UnixStream::connect(socket(&f.dir, "a")).unwrap());
    }
    wait_for("every connection of the storm to be taken", || {
        let c = f.router.counters();
        c.connections_served + c.connections_refused + c.connections_rate_limited == storm
    });
    let elapsed = started.elapsed().as_secs_f64();
    let counters = f.router.counters();
    let allowed = CONNECT_BURST + CONNECTS_PER_SECOND * elapsed;
    assert!(
        (counters.connections_served + counters.connections_refused) as f64 <= allowed,
        "{counters:?} in {elapsed:.2} s"
    );
    assert!(counters.connections_rate_limited > 0, "{counters:?}");
    // The rate refills: the agent's next send, a moment later, goes through.
    thread::sleep(Duration::from_secs_f64(1.0 / CONNECTS_PER_SECOND));
    let mut a = Peer::connect(&f, "a");
    assert!(matches!(
        a.send(1, "output", "after the storm", None),
        RouterMessage::Accepted { .. }
    ));
}

#[test]
fn an_input_has_at_most_its_results() {
    let f = fixture(&[("a", "output")]);
    let mut a = Peer::connect(&f, "a");
    a.request(&PeerRequest::Listen);
    let input = f.router.inject("a", "x".into()).unwrap();
    let trace = a.delivery().trace;
    for seq in 0..MAX_RESULTS_PER_INPUT as u64 {
        assert!(matches!(
            a.send_traced(seq, "output", "r", trace),
            RouterMessage::Accepted { .. }
        ));
    }
    let RouterMessage::Refused { retry, reason, .. } = a.send_traced(99, "output", "r", trace)
    else {
        panic!("a result past the input's bound was taken")
    };
    assert!(!retry && reason.contains("results already"), "{reason}");
    let results = input.take(usize::MAX, Instant::now(), &|| false);
    assert_eq!(results.len(), MAX_RESULTS_PER_INPUT);
}
