//! The Connect protocol as E2B's in-sandbox API speaks it, with the JSON codec only: unary calls
//! are a JSON body each way; server streams are enveloped messages (a flag byte, a big-endian
//! length, the message), the last one flagged as the end of the stream. Errors carry Connect's
//! codes as strings. The messages themselves are E2B's (`agentos-e2b-proto`).

use bytes::{BufMut, Bytes, BytesMut};
use hyper::StatusCode;
use serde::Serialize;

use super::super::api::{ApiError, ErrorKind};

/// A message of a stream.
const FLAG_MESSAGE: u8 = 0;
/// The message is compressed (never here: the SDK asks for `identity`).
const FLAG_COMPRESSED: u8 = 1;
/// The last message of a stream: `{}` or `{"error": ...}`.
const FLAG_END: u8 = 2;
/// Bytes before an envelope's message.
const PREFIX: usize = 5;
/// The longest message a client may send in a stream (a request's body is bounded anyway).
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// What a unary call's or a stream's request body is sent as.
pub const JSON: &str = "application/json";
pub const STREAM_JSON: &str = "application/connect+json";

/// One message of a stream, enveloped.
pub fn envelope(message: &impl Serialize) -> Bytes {
    let body = serde_json::to_vec(message).unwrap_or_else(|_| b"{}".to_vec());
    enveloped(FLAG_MESSAGE, &body)
}

/// The end of a stream: `{}`, or the error it ended with.
pub fn end_of_stream(error: Option<&ApiError>) -> Bytes {
    let body = match error {
        None => b"{}".to_vec(),
        Some(error) => {
            serde_json::to_vec(&serde_json::json!({ "error": ConnectError::from(error) }))
                .unwrap_or_else(|_| b"{}".to_vec())
        }
    };
    enveloped(FLAG_END, &body)
}

fn enveloped(flag: u8, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(PREFIX + body.len());
    out.put_u8(flag);
    out.put_u32(u32::try_from(body.len()).unwrap_or(u32::MAX));
    out.put_slice(body);
    out.freeze()
}

/// The one message of a server stream's request body (an envelope).
pub fn unenvelope(body: &[u8]) -> Result<&[u8], ApiError> {
    let bad = |why: &str| {
        ApiError::new(
            ErrorKind::BadRequest,
            format!("a Connect stream request {why}"),
        )
    };
    if body.len() < PREFIX {
        return Err(bad("has no envelope (5 bytes: flags, big-endian length)"));
    }
    let flags = body[0];
    if flags & FLAG_COMPRESSED != 0 {
        return Err(bad(
            "is compressed; send it with `connect-content-encoding: identity`",
        ));
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if len > MAX_MESSAGE_BYTES || body.len() - PREFIX < len {
        return Err(bad("envelope says more bytes than the body has"));
    }
    Ok(&body[PREFIX..PREFIX + len])
}

/// A request's message (an empty one is `{}`, as protobuf's JSON form allows).
pub fn parse<'a, T: serde::Deserialize<'a>>(message: &'a [u8]) -> Result<T, ApiError> {
    let message = if message.is_empty() {
        b"{}".as_slice()
    } else {
        message
    };
    serde_json::from_slice(message).map_err(|e| {
        ApiError::new(
            ErrorKind::BadRequest,
            format!("the request is not valid: {e}"),
        )
    })
}

/// A Connect error's body.
#[derive(Debug, Serialize)]
pub struct ConnectError {
    pub code: &'static str,
    pub message: String,
}

impl From<&ApiError> for ConnectError {
    fn from(error: &ApiError) -> Self {
        Self {
            code: code(error.kind),
            message: error.message.clone(),
        }
    }
}

/// Connect's code for what went wrong.
pub fn code(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::BadRequest | ErrorKind::Invalid | ErrorKind::TooLarge => "invalid_argument",
        ErrorKind::IsADirectory | ErrorKind::NotADirectory => "invalid_argument",
        ErrorKind::Unauthorized => "unauthenticated",
        ErrorKind::NotFound | ErrorKind::UnknownAgent | ErrorKind::UnknownGroup => "not_found",
        ErrorKind::MethodNotAllowed => "unimplemented",
        ErrorKind::DuplicateName | ErrorKind::AlreadyExists => "already_exists",
        ErrorKind::PermissionDenied => "permission_denied",
        ErrorKind::NoSpace | ErrorKind::NoRoom | ErrorKind::Busy => "resource_exhausted",
        ErrorKind::NotRunning | ErrorKind::ShuttingDown => "unavailable",
        ErrorKind::TimedOut => "deadline_exceeded",
        ErrorKind::Failed => "internal",
    }
}

/// The HTTP status a Connect error with `code` is sent with.
pub fn status(code: &str) -> StatusCode {
    match code {
        "invalid_argument" => StatusCode::BAD_REQUEST,
        "unauthenticated" => StatusCode::UNAUTHORIZED,
        "permission_denied" => StatusCode::FORBIDDEN,
        "not_found" => StatusCode::NOT_FOUND,
        "already_exists" => StatusCode::CONFLICT,
        "resource_exhausted" => StatusCode::TOO_MANY_REQUESTS,
        "unimplemented" => StatusCode::NOT_IMPLEMENTED,
        "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        "deadline_exceeded" => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_are_a_flag_a_big_endian_length_and_the_message() {
        let bytes = envelope(&serde_json::json!({"event": {"start": {"pid": 100}}}));
        assert_eq!(&bytes[..5], [0, 0, 0, 0, 0x1f]);
        assert_eq!(&bytes[5..], br#"{"event":{"start":{"pid":100}}}"#);
        assert_eq!(&end_of_stream(None)[..], [2, 0, 0, 0, 2, b'{', b'}']);
        let failed = end_of_stream(Some(&ApiError::new(ErrorKind::UnknownAgent, "gone")));
        assert_eq!(failed[0], 2);
        let body: serde_json::Value = serde_json::from_slice(&failed[5..]).unwrap();
        assert_eq!(body["error"]["code"], "not_found");
    }

    #[test]
    fn a_request_envelope_is_checked_before_it_is_read() {
        let mut good = vec![0, 0, 0, 0, 2];
        good.extend_from_slice(b"{}");
        assert_eq!(unenvelope(&good).unwrap(), b"{}");
        assert!(unenvelope(&[0, 0, 0]).is_err(), "too short");
        assert!(
            unenvelope(&[0, 0, 0, 0, 9, b'{']).is_err(),
            "longer than the body"
        );
        assert!(
            unenvelope(&[0, 0xff, 0xff, 0xff, 0xff]).is_err(),
            "past the limit"
        );
        assert!(unenvelope(&[1, 0, 0, 0, 0]).is_err(), "compressed");
    }
}
