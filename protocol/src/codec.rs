//! Length-prefixed JSON framing, with a hard bound on frame size.

use std::io::{self, Read, Write};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest frame either side accepts. Output chunks are far smaller; the bound exists so that a
/// hostile peer cannot make the other side allocate without limit.
pub const MAX_FRAME_BYTES: usize = 1 << 20;

const LEN_BYTES: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("i/o error on the frame stream")]
    Io(#[from] io::Error),
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_BYTES} bytes")]
    TooLarge(usize),
    #[error("frame is not a valid message")]
    Json(#[from] serde_json::Error),
    #[error("stream ended inside a frame")]
    Truncated,
}

/// Serialises `msg` into a complete frame (length prefix included).
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; LEN_BYTES];
    serde_json::to_writer(&mut buf, msg)?;
    let body_len = buf.len() - LEN_BYTES;
    if body_len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(body_len));
    }
    // The bound above keeps the length within u32.
    buf[..LEN_BYTES].copy_from_slice(&(body_len as u32).to_be_bytes());
    Ok(buf)
}

/// Writes one frame and flushes it.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let frame = encode_frame(msg)?;
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// Reads frames from a byte stream.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: Vec::new(),
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Reads the next frame. Returns `Ok(None)` when the stream ends cleanly between frames.
    pub fn read<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        let mut len_bytes = [0u8; LEN_BYTES];
        if !self.fill(&mut len_bytes, true)? {
            return Ok(None);
        }
        let len = u32::from_be_bytes(len_bytes) as usize;
        if len > MAX_FRAME_BYTES {
            return Err(FrameError::TooLarge(len));
        }
        self.buf.resize(len, 0);
        let mut body = std::mem::take(&mut self.buf);
        let filled = self.fill(&mut body, false);
        let parsed = filled.and_then(|_| serde_json::from_slice(&body).map_err(FrameError::from));
        self.buf = body;
        parsed.map(Some)
    }

    /// Fills `dst` completely. With `eof_ok`, an end of stream before the first byte is a clean end
    /// (`Ok(false)`); anywhere else it is a truncated frame.
    fn fill(&mut self, dst: &mut [u8], eof_ok: bool) -> Result<bool, FrameError> {
        let mut done = 0;
        while done < dst.len() {
            match self.inner.read(&mut dst[done..]) {
                Ok(0) if done == 0 && eof_ok => return Ok(false),
                Ok(0) => return Err(FrameError::Truncated),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HostMessage;

    #[test]
    fn round_trips_a_frame() {
        let frame = encode_frame(&HostMessage::Ping { id: 7 }).unwrap();
        let mut reader = FrameReader::new(&frame[..]);
        assert_eq!(
            reader.read::<HostMessage>().unwrap(),
            Some(HostMessage::Ping { id: 7 })
        );
        assert_eq!(reader.read::<HostMessage>().unwrap(), None);
    }

    #[test]
    fn refuses_a_frame_over_the_limit_before_allocating() {
        let len = (MAX_FRAME_BYTES as u32 + 1).to_be_bytes();
        let mut reader = FrameReader::new(&len[..]);
        assert!(matches!(
            reader.read::<HostMessage>(),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn reports_truncation_inside_length_and_body() {
        let mut reader = FrameReader::new(&[0u8, 0][..]);
        assert!(matches!(
            reader.read::<HostMessage>(),
            Err(FrameError::Truncated)
        ));
        let mut frame = encode_frame(&HostMessage::Ping { id: 1 }).unwrap();
        frame.pop();
        let mut reader = FrameReader::new(&frame[..]);
        assert!(matches!(
            reader.read::<HostMessage>(),
            Err(FrameError::Truncated)
        ));
    }

    #[test]
    fn rejects_garbage_and_unknown_operations() {
        for body in [
            &b"not json"[..],
            br#"{"op":"format_disk","id":1}"#,
            br#"{"id":1}"#,
        ] {
            let mut frame = (body.len() as u32).to_be_bytes().to_vec();
            frame.extend_from_slice(body);
            let mut reader = FrameReader::new(&frame[..]);
            assert!(matches!(
                reader.read::<HostMessage>(),
                Err(FrameError::Json(_))
            ));
        }
    }
}
