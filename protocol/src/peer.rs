//! Messages between agents of a group, through the host's router.
//!
//! A guest reaches the router by connecting to the host (CID 2) on [`PEER_PORT`]; its VMM turns
//! that into a connection to a Unix socket the router listens on for that agent alone, so the
//! router knows the sender from the socket and never from anything the guest writes. On that
//! connection the guest sends [`PeerRequest`]s and the router answers with [`RouterMessage`]s,
//! framed as on the control connection.
//!
//! Delivery is at least once: the router keeps a message until the receiver acknowledges it, and
//! hands it out again when the receiver's connection comes back. Message ids are unique within a
//! group run, so a receiver drops a message it has already handled.

use serde::{Deserialize, Serialize};

use crate::infer::{InferOptions, Task};

/// Port of the router on the host, as the guest dials it.
pub const PEER_PORT: u32 = 1025;

/// Largest message body, in bytes; a frame carrying one stays well under the frame limit.
pub const MAX_PEER_BODY_BYTES: usize = 256 * 1024;

/// Longest agent, group or kind name.
pub const MAX_PEER_NAME_BYTES: usize = 64;

/// Tells an agent which group it is part of and what to do with the messages it receives.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub id: u64,
    pub group: String,
    /// The agent's name in the group.
    pub name: String,
    /// What the agent does with each message; without one it only sends.
    #[serde(default)]
    pub handler: Option<Handler>,
    /// Where the handler's results go: the peers the group's channels lead to from this agent.
    #[serde(default)]
    pub outputs: Vec<String>,
}

/// What an agent does with a message it receives. Its result (the answer's text) goes to every
/// output; an empty result goes nowhere.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Handler {
    /// Run a model on the message's body.
    Infer {
        model: String,
        task: Task,
        #[serde(default)]
        options: InferOptions,
    },
    /// Pass the body on unchanged, under the same kind (for tests and `agentos bench ipc`).
    Echo,
    /// Run a program with the body on its standard input; its standard output is the result. It
    /// sees `AGENTOS_FROM`, `AGENTOS_KIND` and `AGENTOS_TRACE` in its environment.
    Exec {
        program: String,
        #[serde(default)]
        args: Vec<String>,
    },
}

/// What a guest sends to the router.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum PeerRequest {
    /// This connection receives the agent's messages from now on (the previous one, if any, no
    /// longer does, and what it had not acknowledged comes again here).
    Listen,
    /// Send a message; answered with `accepted` or `refused` carrying `seq` back.
    Send(PeerSend),
    /// The message `message` has been handled; the router forgets it.
    Ack { message: u64 },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSend {
    /// Chosen by the sender to match the answer.
    pub seq: u64,
    /// The peer's name in the group, or `output` for the group's result.
    pub to: String,
    /// What the body is (`summary`, `translation`, ...), for the receiver and the trace.
    pub kind: String,
    pub body: String,
    /// The input this message descends from, as given in the delivery that caused it.
    #[serde(default)]
    pub trace: Option<u64>,
    /// The model that made the body, and how long it ran, for the trace.
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub infer_us: Option<u64>,
    /// A sender name the guest claims. The router never believes it: it records the claim when
    /// it differs from the sender it knows.
    #[serde(default)]
    pub from: Option<String>,
}

/// What the router sends to a guest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RouterMessage {
    /// The router holds the message and will deliver it.
    Accepted { seq: u64, message: u64 },
    /// The message was not taken; `retry` says whether sending it again later can work (the
    /// receiver's queue was full).
    Refused {
        seq: u64,
        reason: String,
        #[serde(default)]
        retry: bool,
    },
    /// A message for this agent; acknowledge it once handled.
    Deliver(Delivery),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delivery {
    pub message: u64,
    /// The sender as the router knows it (`input` for the group's input).
    pub from: String,
    pub kind: String,
    pub body: String,
    pub trace: u64,
}

/// Whether `name` may name an agent, group or kind: short, and only letters, digits, `-`, `_`,
/// `.`, not starting with `.` (names become directory and socket names).
pub fn valid_peer_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_PEER_NAME_BYTES
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_stable() {
        let send = PeerRequest::Send(PeerSend {
            seq: 1,
            to: "translator".into(),
            kind: "summary".into(),
            body: "hi".into(),
            trace: Some(7),
            model: None,
            infer_us: None,
            from: None,
        });
        assert_eq!(
            serde_json::to_string(&send).unwrap(),
            r#"{"op":"send","seq":1,"to":"translator","kind":"summary","body":"hi","trace":7,"model":null,"infer_us":null,"from":null}"#
        );
        let minimal: PeerRequest =
            serde_json::from_str(r#"{"op":"send","seq":2,"to":"a","kind":"k","body":""}"#).unwrap();
        assert!(matches!(
            minimal,
            PeerRequest::Send(PeerSend { trace: None, .. })
        ));
        let handler: Handler =
            serde_json::from_str(r#"{"kind":"infer","model":"sentiment","task":"classify"}"#)
                .unwrap();
        assert!(matches!(handler, Handler::Infer { .. }));
        assert!(serde_json::from_str::<PeerRequest>(r#"{"op":"claim","name":"a"}"#).is_err());
    }

    #[test]
    fn names_are_directory_safe() {
        for good in ["summarizer", "agent-1", "a_b.c"] {
            assert!(valid_peer_name(good), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(!valid_peer_name(bad), "{bad:?}");
        }
    }
}
