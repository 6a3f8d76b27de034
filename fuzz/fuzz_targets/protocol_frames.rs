//! Frames as a guest (or a group peer) writes them: arbitrary bytes read as a stream of
//! length-prefixed JSON frames, decoded as every message type either side accepts, until the
//! stream ends or a frame is refused. Each decoded message is encoded again, as the host does
//! when it forwards or records one.

#![no_main]

use agentos_protocol::peer::{PeerRequest, RouterMessage};
use agentos_protocol::{FrameReader, GuestMessage, HostMessage, encode_frame, error_chain};
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The length prefix of every frame: each frame read consumes at least this many bytes.
const LEN_BYTES: usize = 4;

fuzz_target!(|data: &[u8]| {
    read_all::<HostMessage>(data, |msg| {
        msg.id();
    });
    read_all::<GuestMessage>(data, |_| {});
    read_all::<PeerRequest>(data, |_| {});
    read_all::<RouterMessage>(data, |_| {});
});

/// Reads frames of `T` off `data` until the end or an error, bounded: a reader that kept
/// yielding frames past the end of its input would be a bug.
fn read_all<T: DeserializeOwned + Serialize>(data: &[u8], mut inspect: impl FnMut(&T)) {
    let mut reader = FrameReader::new(data);
    for _ in 0..=data.len() / LEN_BYTES {
        match reader.read::<T>() {
            Ok(Some(msg)) => {
                inspect(&msg);
                if let Err(e) = encode_frame(&msg) {
                    error_chain(&e);
                }
            }
            Ok(None) => return,
            Err(e) => {
                error_chain(&e);
                return;
            }
        }
    }
    panic!("more frames than a {}-byte input can hold", data.len());
}
