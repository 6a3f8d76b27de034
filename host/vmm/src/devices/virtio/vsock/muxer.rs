//! The host side of vsock: Unix sockets, as Firecracker's hybrid vsock.
//!
//! - Host → guest: a client connects to the listener at `uds_path` and writes `CONNECT <port>\n`;
//!   once the guest accepts, it reads `OK <hostport>\n` and then talks to the guest's port.
//! - Host, asking: a client that writes `METRICS\n` instead reads one JSON line with the
//!   device's counters and the muxer's tables, and is closed (the socket is the host's alone).
//! - Guest → host: a guest connection to host port `P` is connected to `<uds_path>_<P>`, where
//!   whoever serves that port listens. The path is fixed but for the number, so the guest can reach
//!   nothing else on the host.
//!
//! All sockets are non-blocking and watched by one edge-triggered epoll set, which the device's
//! event loop polls. Every table and queue is bounded.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::VsockBackend;
use super::connection::{
    ConnKey, ConnState, Connection, GUEST_ANSWER_TIMEOUT, TxError, reset_header,
};
use super::metrics::VsockMetrics;
use super::packet::{
    Header, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN, TxPacket,
};
use crate::devices::virtio::DeviceStateError;

/// Connections per VM, either direction.
pub const MAX_CONNECTIONS: usize = 256;
/// Host clients that have connected but not yet sent their `CONNECT` line.
pub const MAX_PENDING_CONNECTS: usize = 32;
/// Resets waiting for receive buffers; more are dropped (and counted).
pub const MAX_QUEUED_RESETS: usize = 256;
/// `CONNECT 4294967295\n` is 19 bytes; anything longer without a newline is garbage.
const MAX_CONNECT_LINE: usize = 32;
/// Host ports for host-initiated connections are numbered from here.
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;
const LISTENER_TOKEN: u64 = u64::MAX;
const TIMER_TOKEN: u64 = u64::MAX - 1;
/// How often connections waiting for the guest are checked, while there are any.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
const MAX_EVENTS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    #[error("cannot listen on {path}")]
    Listen {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up the vsock epoll set")]
    Epoll(#[source] io::Error),
}

struct PendingConnect {
    stream: UnixStream,
}

/// How full the muxer's tables are, for tests and fuzzers to hold against the bounds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MuxerTables {
    pub connections: usize,
    /// Sockets known by descriptor: one per connection.
    pub sockets: usize,
    pub pending_connects: usize,
    /// Entries of the receive work list, and the connections marked as being on it: each such
    /// connection is on it exactly once, and nothing else is.
    pub rx_work: usize,
    pub queued_connections: usize,
    /// Entries whose connection is gone or not marked.
    pub stale_rx_work: usize,
    pub resets: usize,
}

impl MuxerTables {
    /// Whether every table is within its bound and the work list holds no stale or repeated key.
    pub fn within_bounds(&self) -> bool {
        self.connections <= MAX_CONNECTIONS
            && self.sockets == self.connections
            && self.pending_connects <= MAX_PENDING_CONNECTS
            && self.rx_work == self.queued_connections
            && self.stale_rx_work == 0
            && self.rx_work <= self.connections
            && self.resets <= MAX_QUEUED_RESETS
    }
}

pub struct UnixMuxer {
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    /// Ticks while some connection waits for the guest, so that a guest that never answers
    /// cannot hold a connection (and its host client) forever.
    sweep_timer: TimerFd,
    sweep_armed: bool,
    answer_timeout: Duration,
    conns: HashMap<ConnKey, Connection>,
    /// Which connection a socket belongs to.
    by_fd: HashMap<RawFd, ConnKey>,
    pending: HashMap<RawFd, PendingConnect>,
    rx_work: VecDeque<ConnKey>,
    resets: VecDeque<ConnKey>,
    next_local_port: u32,
    metrics: Arc<VsockMetrics>,
}

impl UnixMuxer {
    /// Listens at `uds_path` (which must not exist) for host-initiated connections.
    pub fn new(uds_path: &Path, metrics: Arc<VsockMetrics>) -> Result<Self, MuxerError> {
        let listen_err = |source| MuxerError::Listen {
            path: uds_path.display().to_string(),
            source,
        };
        let listener = UnixListener::bind(uds_path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let epoll = Epoll::new().map_err(MuxerError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )
            .map_err(MuxerError::Epoll)?;
        let sweep_timer = TimerFd::new()
            .map_err(|e| MuxerError::Epoll(io::Error::from_raw_os_error(e.errno())))?;
        epoll
            .ctl(
                ControlOperation::Add,
                sweep_timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TIMER_TOKEN),
            )
            .map_err(MuxerError::Epoll)?;
        Ok(Self {
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll,
            sweep_timer,
            sweep_armed: false,
            answer_timeout: GUEST_ANSWER_TIMEOUT,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            pending: HashMap::new(),
            rx_work: VecDeque::new(),
            resets: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            metrics,
        })
    }

    /// Changes how long a connection may wait for the guest (see [`GUEST_ANSWER_TIMEOUT`]).
    pub fn set_answer_timeout(&mut self, timeout: Duration) {
        self.answer_timeout = timeout;
    }

    /// Path a guest connection to host `port` is forwarded to.
    pub fn guest_port_path(&self, port: u32) -> PathBuf {
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{port}"));
        PathBuf::from(path)
    }

    fn watch(&self, fd: RawFd) -> bool {
        let events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        self.epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(events, fd as u64),
            )
            .is_ok()
    }

    fn unwatch(&self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }

    /// How full every table is now.
    pub fn tables(&self) -> MuxerTables {
        let live = |key: &ConnKey| self.conns.get(key).is_some_and(|c| c.queued);
        MuxerTables {
            connections: self.conns.len(),
            sockets: self.by_fd.len(),
            pending_connects: self.pending.len(),
            rx_work: self.rx_work.len(),
            queued_connections: self.conns.values().filter(|c| c.queued).count(),
            stale_rx_work: self.rx_work.iter().filter(|k| !live(k)).count(),
            resets: self.resets.len(),
        }
    }

    fn queue_rx(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key)
            && !conn.queued
            && conn.has_rx()
        {
            conn.queued = true;
            self.rx_work.push_back(key);
            VsockMetrics::peak(&self.metrics.rx_work_peak, self.rx_work.len() as u64);
        }
    }

    fn queue_reset(&mut self, key: ConnKey) {
        if self.resets.len() >= MAX_QUEUED_RESETS {
            VsockMetrics::inc(&self.metrics.resets_dropped);
            return;
        }
        self.resets.push_back(key);
    }

    /// Drops a connection and, unless the guest already knows, tells it with a reset.
    fn close(&mut self, key: ConnKey, reset_guest: bool) {
        if let Some(conn) = self.conns.remove(&key) {
            // Its key leaves the work list with it: a new connection under the same key (a
            // guest looping on REQUEST and RST) would be listed again, and a guest that gives
            // no receive buffers never drains the list.
            if conn.queued {
                self.rx_work.retain(|k| *k != key);
            }
            let fd = conn.stream.as_raw_fd();
            self.unwatch(fd);
            self.by_fd.remove(&fd);
            VsockMetrics::inc(&self.metrics.connections_closed);
            self.arm_sweep();
        }
        if reset_guest {
            self.queue_reset(key);
        }
    }

    fn insert(&mut self, conn: Connection) -> bool {
        let fd = conn.stream.as_raw_fd();
        if !self.watch(fd) {
            return false;
        }
        let key = conn.key;
        self.by_fd.insert(fd, key);
        self.conns.insert(key, conn);
        VsockMetrics::inc(&self.metrics.connections_opened);
        self.arm_sweep();
        self.queue_rx(key);
        true
    }

    /// A guest asked to connect to host port `key.local_port`.
    fn connect_for_guest(&mut self, key: ConnKey, request: &Header) {
        if self.conns.contains_key(&key) {
            // The guest has no socket for this connection any more (Linux resets a connection
            // on a second request too), so neither should the host.
            VsockMetrics::inc(&self.metrics.connections_refused);
            self.close(key, true);
            return;
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            VsockMetrics::inc(&self.metrics.connections_refused);
            self.queue_reset(key);
            return;
        }
        let path = self.guest_port_path(key.local_port);
        let stream = match connect_nonblocking(&path) {
            Ok(stream) => stream,
            Err(e) => {
                debug!(port = key.local_port, error = %e, "no host listener for guest connection");
                VsockMetrics::inc(&self.metrics.connections_refused);
                self.queue_reset(key);
                return;
            }
        };
        if !self.insert(Connection::from_guest(key, stream, request)) {
            self.queue_reset(key);
        }
    }

    fn accept_host_clients(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!(error = %e, "vsock listener accept failed");
                    return;
                }
            };
            let fd = stream.as_raw_fd();
            if self.pending.len() >= MAX_PENDING_CONNECTS
                || stream.set_nonblocking(true).is_err()
                || !self.watch(fd)
            {
                VsockMetrics::inc(&self.metrics.bad_host_connects);
                continue;
            }
            self.pending.insert(fd, PendingConnect { stream });
            self.read_connect_line(fd);
        }
    }

    /// Reads the `CONNECT <port>\n` line of a host client, and nothing past it: bytes after the
    /// newline are data for the guest and stay in the socket.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(pending) = self.pending.get(&fd) else {
            return;
        };
        let mut peek = [0u8; MAX_CONNECT_LINE];
        let peeked = match peek_bytes(&pending.stream, &mut peek) {
            Ok(0) => None,
            Ok(n) => Some(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(_) => None,
        };
        let Some(peeked) = peeked else {
            self.drop_pending(fd);
            return;
        };
        let Some(newline) = peek[..peeked].iter().position(|&b| b == b'\n') else {
            if peeked == MAX_CONNECT_LINE {
                VsockMetrics::inc(&self.metrics.bad_host_connects);
                self.drop_pending(fd);
            }
            return;
        };
        let asked = parse_host_line(&peek[..newline]);
        let Some(PendingConnect { mut stream }) = self.remove_pending(fd) else {
            return;
        };
        let mut line = vec![0u8; newline + 1];
        let (Some(asked), Ok(())) = (asked, stream.read_exact(&mut line)) else {
            VsockMetrics::inc(&self.metrics.bad_host_connects);
            return;
        };
        let port = match asked {
            HostLine::Connect(port) => port,
            HostLine::Metrics => {
                self.answer_metrics(stream);
                return;
            }
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            VsockMetrics::inc(&self.metrics.bad_host_connects);
            return;
        }
        let key = ConnKey {
            local_port: self.allocate_local_port(port),
            peer_port: port,
        };
        let mut conn = Connection::from_host(key, stream);
        // Bytes may already wait behind the line; the edge that announced them is spent.
        conn.rx_ready = true;
        self.insert(conn);
    }

    /// Writes the counters and tables as one JSON line and closes the client. The line is a
    /// few hundred bytes, which a fresh socket takes at once; a client that cannot take them
    /// gets nothing.
    fn answer_metrics(&self, mut stream: UnixStream) {
        let tables = self.tables();
        let report = MetricsLine {
            vsock: self.metrics.snapshot(),
            tables,
            within_bounds: tables.within_bounds(),
        };
        if let Ok(mut line) = serde_json::to_vec(&report) {
            line.push(b'\n');
            let _ = stream.write_all(&line);
        }
    }

    fn remove_pending(&mut self, fd: RawFd) -> Option<PendingConnect> {
        let pending = self.pending.remove(&fd)?;
        self.unwatch(fd);
        Some(pending)
    }

    fn drop_pending(&mut self, fd: RawFd) {
        self.remove_pending(fd);
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.conns.contains_key(&key) {
                return port;
            }
        }
    }

    fn on_socket_event(&mut self, fd: RawFd, events: EventSet) {
        if self.pending.contains_key(&fd) {
            self.read_connect_line(fd);
            // A client that hung up before finishing its line never will; peeking would keep
            // finding the same partial line.
            if events.intersects(EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR) {
                self.drop_pending(fd);
            }
            return;
        }
        let Some(&key) = self.by_fd.get(&fd) else {
            return;
        };
        let readable = EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR;
        if events.intersects(readable)
            && let Some(conn) = self.conns.get_mut(&key)
        {
            conn.rx_ready = true;
        }
        if events.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
            self.flush(key);
        }
        self.queue_rx(key);
    }

    /// Resets connections whose guest did not answer in time: the host client sees its socket
    /// close, the guest gets a reset.
    fn sweep_overdue(&mut self) {
        let _ = self.sweep_timer.wait();
        let now = Instant::now();
        let overdue: Vec<ConnKey> = self
            .conns
            .values()
            .filter(|c| c.guest_answer_overdue(now, self.answer_timeout))
            .map(|c| c.key)
            .collect();
        for key in overdue {
            debug!(?key, "vsock connection reset: the guest did not answer");
            VsockMetrics::inc(&self.metrics.guest_answer_timeouts);
            self.close(key, true);
        }
    }

    /// Keeps the sweep timer ticking exactly while some connection waits for the guest.
    fn arm_sweep(&mut self) {
        let interval = SWEEP_INTERVAL.min(self.answer_timeout);
        let wanted = self.conns.values().any(Connection::awaits_guest);
        if wanted == self.sweep_armed {
            return;
        }
        let armed = if wanted {
            self.sweep_timer.reset(interval, Some(interval))
        } else {
            self.sweep_timer.clear()
        };
        if armed.is_ok() {
            self.sweep_armed = wanted;
        }
    }

    fn flush(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        match conn.flush_tx() {
            Ok(n) => VsockMetrics::add(&self.metrics.tx_bytes, n as u64),
            Err(_) => self.close(key, true),
        }
    }

    /// Reads host data for the guest from `key`'s socket into `buf`.
    fn read_data(&mut self, key: ConnKey, buf: &mut [u8]) -> Option<(Header, usize)> {
        let conn = self.conns.get_mut(&key)?;
        let limit = buf.len().min(conn.peer_credit() as usize);
        match conn.stream.read(&mut buf[..limit]) {
            Ok(0) => {
                conn.rx_ready = false;
                conn.on_host_eof();
                self.arm_sweep();
                let conn = self.conns.get_mut(&key)?;
                let hdr = conn.next_control();
                hdr.map(|h| (h, 0))
            }
            Ok(n) => {
                conn.sent_data(n);
                Some((conn.header(OP_RW, 0), n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                conn.rx_ready = false;
                None
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
            Err(_) => {
                self.close(key, false);
                Some((reset_header(key), 0))
            }
        }
    }
}

impl VsockBackend for UnixMuxer {
    fn send(&mut self, pkt: TxPacket) {
        let hdr = pkt.hdr;
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if hdr.op == OP_REQUEST {
            self.connect_for_guest(key, &hdr);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if hdr.op != OP_RST {
                self.queue_reset(key);
            }
            return;
        };
        conn.update_peer_credit(&hdr);
        match hdr.op {
            OP_RESPONSE => {
                if !conn.on_response() {
                    self.close(key, true);
                    return;
                }
                self.arm_sweep();
                let Some(conn) = self.conns.get_mut(&key) else {
                    return;
                };
                let ok = format!("OK {}\n", key.local_port);
                // The socket is fresh and empty, so a failure to take a dozen bytes means it is gone.
                if conn.stream.write_all(ok.as_bytes()).is_err() {
                    self.close(key, true);
                    return;
                }
            }
            OP_RW => {
                if conn.state != ConnState::Established {
                    self.close(key, true);
                    return;
                }
                match conn.push_tx(&pkt.payload) {
                    Ok(n) => VsockMetrics::add(&self.metrics.tx_bytes, n as u64),
                    Err(TxError::CreditViolation) => {
                        VsockMetrics::inc(&self.metrics.credit_violations);
                        self.close(key, true);
                        return;
                    }
                    Err(TxError::Broken) => {
                        self.close(key, true);
                        return;
                    }
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => conn.request_credit_update(),
            OP_SHUTDOWN => {
                conn.on_shutdown(hdr.flags);
                if conn.peer_fully_shut() {
                    let _ = conn.flush_tx();
                    self.close(key, true);
                    return;
                }
                let _ = conn.flush_tx();
            }
            OP_RST => {
                self.close(key, false);
                return;
            }
            _ => {
                VsockMetrics::inc(&self.metrics.bad_packets);
                self.close(key, true);
                return;
            }
        }
        self.queue_rx(key);
    }

    fn has_rx(&self) -> bool {
        !self.resets.is_empty() || !self.rx_work.is_empty()
    }

    fn next_rx(&mut self, buf: &mut [u8]) -> Option<(Header, usize)> {
        if let Some(key) = self.resets.pop_front() {
            VsockMetrics::inc(&self.metrics.resets_sent);
            return Some((reset_header(key), 0));
        }
        // Each connection is looked at once: one that keeps work it cannot hand over now (data
        // but no room for it in `buf`) goes to the back of the list rather than round again.
        for _ in 0..self.rx_work.len() {
            let key = self.rx_work.pop_front()?;
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.queued = false;
            let packet = match conn.next_control() {
                Some(hdr) => Some((hdr, 0)),
                // Reading into an empty buffer returns 0, which would look like the host's EOF.
                None if conn.can_send_data() && !buf.is_empty() => self.read_data(key, buf),
                None => None,
            };
            self.queue_rx(key);
            if packet.is_some() {
                return packet;
            }
        }
        None
    }

    fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn on_host_ready(&mut self) {
        let mut events = [EpollEvent::default(); MAX_EVENTS];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!(error = %e, "vsock epoll wait failed");
                    return;
                }
            };
            for event in &events[..n] {
                match event.data() {
                    LISTENER_TOKEN => self.accept_host_clients(),
                    TIMER_TOKEN => self.sweep_overdue(),
                    fd => self.on_socket_event(fd as RawFd, event.event_set()),
                }
            }
            if n < MAX_EVENTS {
                return;
            }
        }
    }

    fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.close(key, false);
        }
        let fds: Vec<RawFd> = self.pending.keys().copied().collect();
        for fd in fds {
            self.drop_pending(fd);
        }
        self.rx_work.clear();
        self.resets.clear();
    }

    fn next_host_port(&self) -> Option<u32> {
        Some(self.next_local_port)
    }

    fn number_host_ports_from(&mut self, port: u32) -> Result<(), DeviceStateError> {
        if port < FIRST_LOCAL_PORT {
            return Err(DeviceStateError::HostPortBelowRange {
                port,
                first: FIRST_LOCAL_PORT,
            });
        }
        self.next_local_port = port;
        Ok(())
    }
}

impl Drop for UnixMuxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

/// What a host client's first line asks.
#[derive(Debug, PartialEq, Eq)]
enum HostLine {
    /// `CONNECT <port>`: a connection to the guest's port.
    Connect(u32),
    /// `METRICS`: the counters, once.
    Metrics,
}

/// The answer to `METRICS`.
#[derive(serde::Serialize)]
struct MetricsLine {
    vsock: super::metrics::VsockMetricsSnapshot,
    tables: MuxerTables,
    within_bounds: bool,
}

fn parse_host_line(line: &[u8]) -> Option<HostLine> {
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    if line == "METRICS" {
        return Some(HostLine::Metrics);
    }
    let port = line.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok().map(HostLine::Connect)
}

fn peek_bytes(stream: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes and the fd is owned by `stream`.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Connects to a Unix socket without ever blocking the event loop: a listener whose backlog is
/// full refuses instead of stalling every other connection of the VM.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; zeroed is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket creation; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket we own; wrapping it closes it on every path below.
    let stream = unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes.
    let rc = unsafe { libc::connect(stream.as_raw_fd(), std::ptr::from_ref(&addr).cast(), len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

#[cfg(test)]
mod tests;
