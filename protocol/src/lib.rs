//! The host/guest protocol of agentos.
//!
//! A connection carries frames in both directions. A frame is a 4-byte big-endian length followed by
//! that many bytes of one JSON object. The guest speaks first, with a [`GuestMessage::Hello`] that
//! carries its protocol version and boot timings; after that the host sends [`HostMessage`]s, each with
//! an `id` that the guest's answers carry back. Several requests may be in flight on one connection.
//!
//! The same frames run over vsock between host and agent, and over a virtio-serial port between the
//! host and a carrier VM.

pub mod bundle;
mod codec;
pub mod files;
mod infer;
mod message;
pub mod peer;
pub mod process;

pub use codec::{FrameError, FrameReader, MAX_FRAME_BYTES, encode_frame, write_frame};
pub use infer::{
    Entity, InferOptions, InferReply, InferRequest, InferResult, InferTimings, LabelScore,
    MAX_INFER_INPUT_BYTES, MAX_INFER_INPUTS, Task, UnknownTask,
};
pub use message::{
    BootTimings, ExecRequest, ExitStatus, GuestMessage, Hello, HostMessage, MAX_RESTORE_ENTROPY,
    Program, PtySize, StreamData,
};

/// `text` cut to at most `max` bytes (at a character boundary) with `...` appended when cut:
/// for quoting text that came from the other side in messages, logs and traces.
pub fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// An error and its causes on one line, as guest consoles and `error` frames show them.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut cause = err.source();
    while let Some(err) = cause {
        line.push_str(": ");
        line.push_str(&err.to_string());
        cause = err.source();
    }
    line
}

/// Version of the message set. A guest whose version differs from the host's is refused.
pub const PROTOCOL_VERSION: u32 = 6;

/// The well-known CID of the host in vsock addressing.
pub const HOST_CID: u64 = 2;

/// vsock port on the host that a guest agent dials once it is ready to serve.
pub const AGENT_CONTROL_PORT: u32 = 1024;

/// vsock port the guest agent listens on for connections the host opens.
pub const AGENT_LISTEN_PORT: u32 = 52;

/// The first line the guest agent prints on the serial console as PID 1, once its file systems
/// are mounted: the same point of a boot under any VMM, which is what boot benchmarks time.
pub const BOOT_MARKER: &str = "agentos-guest: started";

/// Name of the virtio-serial port that carries frames between the host and a carrier VM.
pub const CARRIER_PORT_NAME: &str = "agentos.ctl";

/// A one-byte status channel from the guest to its VMM, below vsock: an I/O port the guest agent
/// writes to. The VMM timestamps each write and, when the guest resets, tells a clean shutdown
/// (last status [`status::SHUTDOWN`]) from a crash.
pub mod status {
    /// The I/O port.
    pub const PORT: u16 = 0x550;
    /// The agent runs as PID 1 (written before anything else it does).
    pub const INIT_STARTED: u8 = 1;
    /// The agent is connected and serving.
    pub const READY: u8 = 2;
    /// The agent is powering the VM off on request.
    pub const SHUTDOWN: u8 = 3;
    /// The agent hit a fatal error (it said why on the console) and is powering the VM off.
    pub const FAILED: u8 = 4;
}

#[cfg(test)]
mod tests {
    use super::clip;

    #[test]
    fn clip_cuts_at_a_character_boundary() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("abcdef", 3), "abc...");
        assert_eq!(clip("aé", 2), "a...");
    }
}
