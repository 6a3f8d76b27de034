//! Programs the guest runs, as the host finds and drives them beyond the request that started
//! them: any connection may list them, follow one's output, feed its input or signal it, by
//! its process id. A program started with `keep` outlives the connection that started it.

use serde::{Deserialize, Serialize};

use crate::{Program, StreamData};

/// Longest tag a program may carry, in bytes.
pub const MAX_TAG_BYTES: usize = 256;

/// Which running program a request means.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Selector {
    Pid(u32),
    /// The tag it was started with.
    Tag(String),
}

/// What to do to a running program.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "do", rename_all = "snake_case", deny_unknown_fields)]
pub enum Control {
    /// Bytes for its standard input (it was started with `stdin`).
    Stdin { data: StreamData },
    /// End its standard input.
    CloseStdin,
    /// Send a signal to its process group.
    Signal { signal: i32 },
    /// Change the size of its terminal (it was started with `pty`).
    Resize { cols: u16, rows: u16 },
}

/// A program running in the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessInfo {
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    pub run: Program,
    /// Whether it outlives the connection that started it.
    pub keep: bool,
    /// Whether its standard input is open to the host.
    pub stdin: bool,
    /// Whether it runs on a terminal.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pty: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GuestMessage, HostMessage};

    /// The wire format is a contract with guests built earlier.
    #[test]
    fn wire_format_is_stable() {
        let attach = HostMessage::Attach {
            id: 1,
            process: Selector::Tag("web".into()),
        };
        assert_eq!(
            serde_json::to_string(&attach).unwrap(),
            r#"{"op":"attach","id":1,"process":{"tag":"web"}}"#
        );
        let control = HostMessage::Control {
            id: 2,
            pid: 40,
            control: Control::Signal { signal: 15 },
        };
        assert_eq!(
            serde_json::to_string(&control).unwrap(),
            r#"{"op":"control","id":2,"pid":40,"control":{"do":"signal","signal":15}}"#
        );
        let listed = GuestMessage::Processes {
            id: 3,
            processes: vec![ProcessInfo {
                pid: 40,
                tag: None,
                run: Program::new("sleep"),
                keep: true,
                stdin: false,
                pty: false,
            }],
        };
        let text = serde_json::to_string(&listed).unwrap();
        assert_eq!(
            text,
            r#"{"type":"processes","id":3,"processes":[{"pid":40,"run":{"program":"sleep","args":[],"env":{},"cwd":null,"timeout_ms":null},"keep":true,"stdin":false}]}"#
        );
        assert_eq!(serde_json::from_str::<GuestMessage>(&text).unwrap(), listed);
    }
}
