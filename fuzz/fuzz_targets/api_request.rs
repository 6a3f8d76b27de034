//! API requests as any local client writes them (a buggy one, or a program that opened the
//! daemon's socket by mistake): arbitrary bytes read as the daemon reads a connection, a 4-byte
//! big-endian length and that many bytes of body, frame after frame, until the bytes end, a frame
//! is cut short (the daemon's read fails and the connection ends) or a length is over
//! `MAX_REQUEST_BYTES` (answered `too_large` with the body unread, and the connection closed).
//! Each body goes to `parse_request`, as the daemon hands it over.
//!
//! A body it refuses must get a `bad_request` error (or `invalid`, for a duration out of its
//! range) whose message is one line of at most `MAX_ERROR_BYTES` (and a bit for the ellipsis),
//! whatever the body quoted, so that the reply always encodes. A body it accepts must be one of
//! the documented ops, encode under that `op` as the client encodes it, and parse back to the
//! same request.

#![no_main]

use agentos::daemon::api::{
    ApiError, ErrorKind, MAX_ERROR_BYTES, MAX_REQUEST_BYTES, Reply, Request, parse_request,
};
use agentos_protocol::{FrameError, MAX_FRAME_BYTES, encode_frame};
use libfuzzer_sys::fuzz_target;

/// The length prefix of every frame.
const LEN_BYTES: usize = 4;

/// The ops docs/api.md documents.
const OPS: [&str; 12] = [
    "version",
    "spawn",
    "ps",
    "exec",
    "infer",
    "logs",
    "stop",
    "rm",
    "metrics",
    "group_up",
    "group_down",
    "group_input",
];

/// Bytes a request may grow by when encoded again: the optional fields it left out, written as
/// `null` or their default, and a float written with a fraction.
const ENCODING_SLACK: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    // Fewer than LEN_BYTES left is the end of the connection, cut inside a length or not.
    while let Some((prefix, after)) = rest.split_first_chunk::<LEN_BYTES>() {
        let len = u32::from_be_bytes(*prefix) as usize;
        if len > MAX_REQUEST_BYTES {
            let error = ApiError::new(
                ErrorKind::TooLarge,
                format!("a request of {len} bytes is over the limit of {MAX_REQUEST_BYTES} bytes"),
            );
            encode_frame(&Reply::Error(error)).expect("a too_large reply encodes");
            return;
        }
        let Some((body, after)) = after.split_at_checked(len) else {
            return;
        };
        request(body);
        rest = after;
    }
});

/// What the daemon does with one body, up to handling the request.
fn request(body: &[u8]) {
    match parse_request(body) {
        Ok(request) => accepted(body, &request),
        Err(error) => refused(body, error),
    }
}

fn accepted(body: &[u8], request: &Request) {
    let op = request.op();
    assert!(OPS.contains(&op), "undocumented op `{op}`");
    let frame = match encode_frame(request) {
        Ok(frame) => frame,
        Err(FrameError::TooLarge(_)) if body.len() > MAX_REQUEST_BYTES - ENCODING_SLACK => return,
        Err(e) => panic!("{request:?} does not encode: {e}"),
    };
    let (prefix, again) = frame.split_first_chunk::<LEN_BYTES>().unwrap();
    assert_eq!(u32::from_be_bytes(*prefix) as usize, again.len());
    let tag = format!(r#"{{"op":"{op}""#);
    assert!(
        again.starts_with(tag.as_bytes()),
        "{request:?} encodes as {}",
        String::from_utf8_lossy(again)
    );
    let back = parse_request(again);
    assert!(
        back.as_ref().is_ok_and(|back| back == request),
        "{} parses as {back:?}",
        String::from_utf8_lossy(again)
    );
}

fn refused(body: &[u8], error: ApiError) {
    assert!(
        matches!(error.kind, ErrorKind::BadRequest | ErrorKind::Invalid),
        "{error:?}"
    );
    assert!(!error.message.trim().is_empty(), "{error:?}");
    assert!(!error.message.contains(['\n', '\r']), "{error:?}");
    assert!(error.message.len() <= MAX_ERROR_BYTES + 3, "{error:?}");
    let frame = encode_frame(&Reply::Error(error)).unwrap_or_else(|e| {
        panic!(
            "the reply to a {}-byte body does not encode: {e}",
            body.len()
        )
    });
    assert!(frame.len() - LEN_BYTES <= MAX_FRAME_BYTES);
}
