//! One vsock stream connection between a guest port and a host Unix socket: its state, the
//! credit-based flow control of both directions, and the control packets it owes the guest.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::packet::{
    Header, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, SHUTDOWN_RCV,
    SHUTDOWN_SEND,
};

/// Receive buffer we grant the guest per connection: the most guest data we ever hold for a host
/// socket that is not reading.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// How long a connection may wait for the guest in [`ConnState::Requesting`] or
/// [`ConnState::Closing`] before it is reset. Generous, because a guest on a software-emulated CPU
/// under load can take seconds to answer.
pub const GUEST_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Tell the guest about freed buffer space once this much of it has been forwarded.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;

/// Host side port, guest side port.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: waiting for the guest's answer to our request.
    Requesting,
    Established,
    /// The host side is gone; we told the guest and wait for its reset.
    Closing,
}

/// Control packets owed to the guest, sent before any data.
#[derive(Default, Debug)]
struct Owed {
    request: bool,
    response: bool,
    shutdown: bool,
    credit_update: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum TxError {
    /// The guest sent more than the credit we granted.
    CreditViolation,
    /// The host socket failed; the connection must be reset.
    Broken,
}

pub struct Connection {
    pub key: ConnKey,
    pub stream: UnixStream,
    pub state: ConnState,
    /// When `state` last changed.
    state_since: Instant,
    owed: Owed,
    /// Guest data waiting for the host socket to accept it.
    tx_buf: VecDeque<u8>,
    /// Guest data handed to the host socket (our `fwd_cnt`).
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Half-close the host socket once `tx_buf` drains.
    shutdown_write_pending: bool,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    peer_shutdown: u32,
    /// The host socket may have data (an edge was seen and it was not read dry since).
    pub rx_ready: bool,
    /// Queued in the muxer's receive work list.
    pub queued: bool,
}

impl Connection {
    /// A connection the guest asked for, already connected on the host side.
    pub fn from_guest(key: ConnKey, stream: UnixStream, request: &Header) -> Self {
        let mut conn = Self::new(key, stream, ConnState::Established);
        conn.update_peer_credit(request);
        conn.owed.response = true;
        conn
    }

    /// A connection a host client asked for; the guest has yet to accept it.
    pub fn from_host(key: ConnKey, stream: UnixStream) -> Self {
        let mut conn = Self::new(key, stream, ConnState::Requesting);
        conn.owed.request = true;
        conn
    }

    fn new(key: ConnKey, stream: UnixStream, state: ConnState) -> Self {
        Self {
            key,
            stream,
            state,
            state_since: Instant::now(),
            owed: Owed::default(),
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            shutdown_write_pending: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_shutdown: 0,
            rx_ready: false,
            queued: false,
        }
    }

    /// Every guest packet carries its receive buffer size and what it has consumed.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// Bytes we may still send the guest. A guest reporting more consumed than we sent gets none.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    pub fn request_credit_update(&mut self) {
        self.owed.credit_update = true;
    }

    /// The guest accepted our request.
    pub fn on_response(&mut self) -> bool {
        if self.state != ConnState::Requesting {
            return false;
        }
        self.state = ConnState::Established;
        self.state_since = Instant::now();
        true
    }

    pub fn on_shutdown(&mut self, flags: u32) {
        self.peer_shutdown |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
        if flags & SHUTDOWN_SEND != 0 {
            self.shutdown_write_pending = true;
        }
    }

    /// Whether the guest will neither send nor receive any more.
    pub fn peer_fully_shut(&self) -> bool {
        self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND
    }

    /// Accepts guest data for the host socket, within the credit we granted, and forwards what
    /// the socket takes now; returns the bytes forwarded.
    pub fn push_tx(&mut self, data: &[u8]) -> Result<usize, TxError> {
        if self.tx_buf.len() + data.len() > CONN_BUF_ALLOC as usize {
            return Err(TxError::CreditViolation);
        }
        self.tx_buf.extend(data);
        self.flush_tx()
    }

    /// Writes buffered guest data to the host socket without blocking; returns the bytes written.
    pub fn flush_tx(&mut self) -> Result<usize, TxError> {
        let mut written = 0;
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(TxError::Broken),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    written += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return Err(TxError::Broken),
            }
        }
        self.fwd_cnt += Wrapping(written as u32);
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.owed.credit_update = true;
        }
        if self.tx_buf.is_empty() && self.shutdown_write_pending {
            self.shutdown_write_pending = false;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Ok(written)
    }

    /// The host side ended; the guest must be told.
    pub fn on_host_eof(&mut self) {
        if self.state != ConnState::Closing {
            self.state = ConnState::Closing;
            self.state_since = Instant::now();
            self.owed.shutdown = true;
        }
    }

    /// Whether the connection waits for an answer from the guest.
    pub fn awaits_guest(&self) -> bool {
        matches!(self.state, ConnState::Requesting | ConnState::Closing)
    }

    /// Whether the guest has taken longer than `timeout` to answer.
    pub fn guest_answer_overdue(&self, now: Instant, timeout: Duration) -> bool {
        self.awaits_guest() && now.saturating_duration_since(self.state_since) > timeout
    }

    /// Whether this connection has a packet for the guest right now.
    pub fn has_rx(&self) -> bool {
        self.has_control() || self.can_send_data()
    }

    fn has_control(&self) -> bool {
        let o = &self.owed;
        o.request || o.response || o.shutdown || o.credit_update
    }

    /// Data may flow to the guest: the host socket may have some, and the guest has room.
    pub fn can_send_data(&self) -> bool {
        self.state == ConnState::Established
            && self.rx_ready
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    /// The next control packet owed to the guest, if any.
    pub fn next_control(&mut self) -> Option<Header> {
        let o = &mut self.owed;
        let (op, flags) = if std::mem::take(&mut o.request) {
            (OP_REQUEST, 0)
        } else if std::mem::take(&mut o.response) {
            (OP_RESPONSE, 0)
        } else if std::mem::take(&mut o.shutdown) {
            (OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND)
        } else if std::mem::take(&mut o.credit_update) {
            (OP_CREDIT_UPDATE, 0)
        } else {
            return None;
        };
        Some(self.header(op, flags))
    }

    /// A header from this connection to the guest, carrying our credit.
    pub fn header(&mut self, op: u16, flags: u32) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        Header {
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            op,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
            ..Default::default()
        }
    }

    /// Records `n` bytes sent to the guest.
    pub fn sent_data(&mut self, n: usize) {
        self.rx_cnt += Wrapping(n as u32);
    }
}

/// A reset for a connection we have no state for (or are dropping).
pub fn reset_header(key: ConnKey) -> Header {
    Header {
        src_port: key.local_port,
        dst_port: key.peer_port,
        op: OP_RST,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn pair() -> (Connection, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let key = ConnKey {
            local_port: 1024,
            peer_port: 5000,
        };
        let hdr = Header {
            buf_alloc: 1000,
            ..Default::default()
        };
        (Connection::from_guest(key, ours, &hdr), theirs)
    }

    #[test]
    fn guest_connection_owes_a_response_first() {
        let (mut conn, _peer) = pair();
        let hdr = conn.next_control().unwrap();
        assert_eq!(
            (hdr.op, hdr.src_port, hdr.dst_port),
            (OP_RESPONSE, 1024, 5000)
        );
        assert_eq!(hdr.buf_alloc, CONN_BUF_ALLOC);
        assert!(conn.next_control().is_none());
    }

    #[test]
    fn peer_credit_follows_sent_and_consumed_bytes() {
        let (mut conn, _peer) = pair();
        assert_eq!(conn.peer_credit(), 1000);
        conn.sent_data(600);
        assert_eq!(conn.peer_credit(), 400);
        conn.update_peer_credit(&Header {
            buf_alloc: 1000,
            fwd_cnt: 500,
            ..Default::default()
        });
        assert_eq!(conn.peer_credit(), 900);
        // A guest claiming to have consumed more than we sent gets no extra credit.
        conn.update_peer_credit(&Header {
            buf_alloc: 1000,
            fwd_cnt: 700,
            ..Default::default()
        });
        assert_eq!(conn.peer_credit(), 0);
    }

    #[test]
    fn data_beyond_granted_credit_is_a_violation() {
        let (mut conn, _peer) = pair();
        // The peer never reads: the socket buffer fills, then our buffer up to the grant.
        let chunk = vec![7u8; 64 * 1024];
        let mut result = Ok(0);
        for _ in 0..64 {
            result = conn.push_tx(&chunk);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(TxError::CreditViolation));
        assert!(conn.tx_buf.len() <= CONN_BUF_ALLOC as usize);
    }

    #[test]
    fn forwarded_data_triggers_a_credit_update() {
        let (mut conn, mut peer) = pair();
        conn.next_control();
        conn.push_tx(&vec![1u8; CREDIT_UPDATE_THRESHOLD as usize])
            .unwrap();
        let hdr = conn.next_control().unwrap();
        assert_eq!(
            (hdr.op, hdr.fwd_cnt),
            (OP_CREDIT_UPDATE, CREDIT_UPDATE_THRESHOLD)
        );
        let mut buf = vec![0u8; CREDIT_UPDATE_THRESHOLD as usize];
        peer.read_exact(&mut buf).unwrap();
    }

    #[test]
    fn guest_shutdown_of_sending_half_closes_host_socket_after_flush() {
        let (mut conn, mut peer) = pair();
        conn.push_tx(b"bye").unwrap();
        conn.on_shutdown(SHUTDOWN_SEND);
        conn.flush_tx().unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"bye");
        assert!(!conn.peer_fully_shut());
    }

    #[test]
    fn only_waiting_states_become_overdue() {
        let (mut conn, _peer) = pair();
        let later = Instant::now() + GUEST_ANSWER_TIMEOUT * 2;
        assert!(!conn.guest_answer_overdue(later, GUEST_ANSWER_TIMEOUT));
        conn.on_host_eof();
        assert!(!conn.guest_answer_overdue(Instant::now(), GUEST_ANSWER_TIMEOUT));
        assert!(conn.guest_answer_overdue(later, GUEST_ANSWER_TIMEOUT));
    }

    #[test]
    fn host_eof_owes_one_shutdown() {
        let (mut conn, _peer) = pair();
        conn.next_control();
        conn.on_host_eof();
        conn.on_host_eof();
        let hdr = conn.next_control().unwrap();
        assert_eq!(
            (hdr.op, hdr.flags),
            (OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND)
        );
        assert!(conn.next_control().is_none());
        assert!(!conn.can_send_data());
    }
}
