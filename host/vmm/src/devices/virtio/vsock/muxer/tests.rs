//! The muxer between a scripted guest and real Unix sockets in a private temporary directory.

use std::io::ErrorKind;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use super::*;
use crate::devices::virtio::vsock::connection::CONN_BUF_ALLOC;
use crate::devices::virtio::vsock::metrics::VsockMetricsSnapshot;
use crate::devices::virtio::vsock::packet::{
    MAX_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

const GUEST_CID: u64 = 3;
const HOST_CID: u64 = 2;
const HOST_PORT: u32 = 1024;
const GUEST_PORT: u32 = 5000;
const DEADLINE: Duration = Duration::from_secs(2);

/// A directory of its own under the system temp dir, removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("agentos-mux-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(1));
    }
}

/// A guest packet from `guest_port` to host `host_port`.
fn guest(op: u16, guest_port: u32, host_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

type Packet = (Header, Vec<u8>);

fn ops(packets: &[Packet]) -> Vec<u16> {
    packets.iter().map(|(hdr, _)| hdr.op).collect()
}

fn read_timeout(stream: &UnixStream) {
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
}

/// Whether the peer closed `stream` (reads EOF, or a reset).
fn sees_eof(stream: &mut UnixStream) -> bool {
    read_timeout(stream);
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

struct Host {
    muxer: UnixMuxer,
    metrics: Arc<VsockMetrics>,
    uds: PathBuf,
    // Dropped last: the sockets live in it.
    _dir: TempDir,
}

impl Host {
    fn new() -> Self {
        let dir = TempDir::new();
        let uds = dir.0.join("v.sock");
        let metrics = Arc::new(VsockMetrics::default());
        let muxer = UnixMuxer::new(&uds, metrics.clone()).unwrap();
        Self {
            muxer,
            metrics,
            uds,
            _dir: dir,
        }
    }

    fn stats(&self) -> VsockMetricsSnapshot {
        self.metrics.snapshot()
    }

    /// A service listening where guest connections to host `port` go.
    fn listen(&self, port: u32) -> UnixListener {
        let listener = UnixListener::bind(self.muxer.guest_port_path(port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        listener
    }

    fn send(&mut self, hdr: Header, payload: &[u8]) {
        let hdr = Header {
            len: payload.len() as u32,
            ..hdr
        };
        self.muxer.send(TxPacket {
            hdr,
            payload: payload.to_vec(),
        });
    }

    /// The next packet for the guest, taken into a buffer of `capacity` payload bytes, after
    /// looking at the host sockets.
    fn poll_with(&mut self, capacity: usize) -> Option<Packet> {
        self.muxer.on_host_ready();
        let mut buf = vec![0u8; capacity];
        let (hdr, n) = self.muxer.next_rx(&mut buf)?;
        assert!(n <= capacity);
        buf.truncate(n);
        Some((hdr, buf))
    }

    fn poll(&mut self) -> Option<Packet> {
        self.poll_with(MAX_PAYLOAD)
    }

    fn wait_packet(&mut self) -> Packet {
        let mut packet = None;
        wait_until("a packet for the guest", || {
            packet = self.poll();
            packet.is_some()
        });
        packet.unwrap()
    }

    /// Checks that nothing comes for the guest, giving the sockets a moment.
    fn assert_quiet(&mut self) {
        for _ in 0..5 {
            assert_eq!(self.poll(), None);
            sleep(Duration::from_millis(2));
        }
    }

    /// Takes every packet the muxer has queued, without looking at the sockets again.
    fn drain(&mut self) -> Vec<Packet> {
        let mut buf = vec![0u8; MAX_PAYLOAD];
        let mut packets = Vec::new();
        while let Some((hdr, n)) = self.muxer.next_rx(&mut buf) {
            packets.push((hdr, buf[..n].to_vec()));
        }
        packets
    }

    /// Opens a guest connection from `guest_port` to `listener` with the guest's receive buffer
    /// `buf_alloc`; returns the host's end.
    fn connect_guest(
        &mut self,
        listener: &UnixListener,
        guest_port: u32,
        buf_alloc: u32,
    ) -> UnixStream {
        let hdr = Header {
            buf_alloc,
            ..guest(OP_REQUEST, guest_port, HOST_PORT)
        };
        self.send(hdr, b"");
        let mut accepted = None;
        wait_until("the host to accept", || {
            accepted = listener.accept().ok();
            accepted.is_some()
        });
        let (stream, _) = accepted.unwrap();
        read_timeout(&stream);
        let (hdr, _) = self.wait_packet();
        assert_eq!(
            (hdr.op, hdr.src_port, hdr.dst_port),
            (OP_RESPONSE, HOST_PORT, guest_port)
        );
        stream
    }

    /// A host client that wrote `line` to the muxer's listener.
    fn client(&self, line: &[u8]) -> UnixStream {
        let mut client = UnixStream::connect(&self.uds).unwrap();
        read_timeout(&client);
        client.write_all(line).unwrap();
        client
    }

    /// A host client whose `CONNECT port` reached the guest as a request; returns the client and
    /// the host port the muxer picked.
    fn connect_host(&mut self, guest_port: u32, extra: &[u8]) -> (UnixStream, u32) {
        let mut line = format!("CONNECT {guest_port}\n").into_bytes();
        line.extend_from_slice(extra);
        let client = self.client(&line);
        let (hdr, payload) = self.wait_packet();
        assert_eq!((hdr.op, hdr.dst_port), (OP_REQUEST, guest_port));
        assert!(payload.is_empty());
        (client, hdr.src_port)
    }
}

// ---- guest-initiated connections ----

#[test]
fn guest_request_to_a_listening_port_is_connected_and_answered() {
    let mut h = Host::new();
    let listener = h.listen(HOST_PORT);
    let _stream = h.connect_guest(&listener, GUEST_PORT, 4096);
    assert_eq!(h.stats().connections_opened, 1);
    assert_eq!(h.muxer.conns.len(), 1);
}

#[test]
fn response_carries_the_credit_we_grant() {
    let mut h = Host::new();
    let _listener = h.listen(HOST_PORT);
    h.send(guest(OP_REQUEST, GUEST_PORT, HOST_PORT), b"");
    let (hdr, _) = h.wait_packet();
    assert_eq!(
        (hdr.op, hdr.buf_alloc, hdr.fwd_cnt),
        (OP_RESPONSE, CONN_BUF_ALLOC, 0)
    );
}

#[test]
fn guest_request_to_a_port_nobody_listens_on_is_reset() {
    let mut h = Host::new();
    h.send(guest(OP_REQUEST, GUEST_PORT, 7777), b"");
    let (hdr, _) = h.wait_packet();
    assert_eq!(
        (hdr.op, hdr.src_port, hdr.dst_port),
        (OP_RST, 7777, GUEST_PORT)
    );
    assert_eq!(h.stats().connections_refused, 1);
    assert_eq!(h.stats().resets_sent, 1);
    assert!(h.muxer.conns.is_empty());
    h.assert_quiet();
}

#[test]
fn guest_can_reach_only_the_numbered_path() {
    let h = Host::new();
    let mut expected = h.uds.clone().into_os_string();
    expected.push("_4294967295");
    assert_eq!(h.muxer.guest_port_path(u32::MAX), PathBuf::from(expected));
}

#[test]
fn duplicate_request_resets_the_existing_connection() {
    let mut h = Host::new();
    let listener = h.listen(HOST_PORT);
    let mut stream = h.connect_guest(&listener, GUEST_PORT, 4096);
    h.send(guest(OP_REQUEST, GUEST_PORT, HOST_PORT), b"");
    let (hdr, _) = h.wait_packet();
    assert_eq!(hdr.op, OP_RST);
    assert!(h.muxer.conns.is_empty());
    assert!(sees_eof(&mut stream));
    // The guest port is free again.
    let _again = h.connect_guest(&listener, GUEST_PORT, 4096);
}

#[test]
fn guest_data_arrives_on_the_host_socket() {
    let mut h = Host::new();
    let listener = h.listen(HOST_PORT);
    let mut stream = h.connect_guest(&listener, GUEST_PORT, 4096);
    h.send(guest(OP_RW, GUEST_PORT, HOST_PORT), b"hello ");
    h.send(guest(OP_RW, GUEST_PORT, HOST_PORT), b"host");
    let mut got = [0u8; 10];
    stream.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello host");
    assert_eq!(h.stats().tx_bytes, 10);
}

#[test]
fn host_data_comes_back_as_rw_packets() {
    let mut h = Host::new();
    let listener = h.listen(HOST_PORT);
    let mut stream = h.connect_guest(&listener, GUEST_PORT, 4096);
    stream.write_all(b"from the host").unwrap();
    let (hdr, payload) = h.wait_packet();
    assert_eq!(
        (hdr.op, hdr.src_port, hdr.dst_port),
        (OP_RW, HOST_PORT, GUEST_PORT)
    );
    assert_eq!(payload, b"from the host");
    h.assert_quiet();
}

#[test]
fn host_data_is_bounded_by_the_guest_credit() {
    let mut h = Host::new();
    let listener = h.listen(HOST_PORT);
    let mut stream = h.connect_guest(&listener, GUEST_PORT, 10);
    stream.write_all(&[7u8; 100]).unwrap();
    let (hdr, payload) = h.wait_packet();
    assert_eq!((hdr.op, payload.len()), (OP_RW, 10));
    // The guest's buffer is full until it says it consumed something.
    h.assert_quiet();
    let update = Header {
        buf_alloc: 10,
        fwd_cnt: 4,
        ..guest(OP_CREDIT_UPDATE, GUEST_PORT, HOST_PORT)
    };
    h.send(update, b"");
    let (_, payload) = h.wait_packet();
    assert_eq!(payload.len(), 4);
    h.assert_quiet();
    // A guest claiming to have consumed more than it was sent gains nothing.
    let lie = Header {
        buf_alloc: 10,
        fwd_cnt: 1000,
        ..guest(OP_CREDIT_UPDATE, GUEST_PORT, HOST_PORT)
    };
    h.send(lie, b"");
    h.assert_quiet();
}

#[test]
fn host_data_is_bounded_by_the_receive_buffer() {
    let mut h = Host::new();
    let listener = h.listen(HOST_PORT);
    let mut stream = h.connect_guest(&listener, GUEST_PORT, 4096);
    stream.write_all(&[1u8; 100]).unwrap();
    let mut packet = None;
    wait_until("data for the guest", || {
        packet = h.poll_with(30);
        packet.is_some()
    });
    assert_eq!(packet.unwrap().1.len(), 30);
    let (_, rest) = h.wait_packet();
    assert_eq!(rest.len(), 70);
}

#[test]
fn zero_guest_buffer_means_nothing_is_read() {
    let mut h = Host::new();
    let listener = h.listen(HOST_PORT);
    let mut stream = h.connect_guest(&listener, GUEST_PORT, 0);
    stream.write_all(b"held").unwrap();
    h.assert_quiet();
    let update = Header {
        buf_alloc: 100,
        ..guest(OP_CREDIT_UPDATE, GUEST_PORT, HOST_PORT)
    };
    h.send(update, b"");
    let (hdr, payload) = h.wait_packet();
    assert_eq!((hdr.op, payload.as_slice()), (OP_RW, &b"held"[..]));
}

#[test]
fn receive_buffer_with_no_room_for_payload_is_not_taken_for_eof() {
    let mut h = Host::new();
    let listener = h.listen(HOST_PORT);
    let mut stream = h.connect_guest(&listener, GUEST_PORT, 4096);
    stream.write_all(b"data").unwrap();
    // Header-only receive buffers: no data fits, and no data must be lost or taken for EOF.
    for _ in 0..5 {
        if let Some((hdr, payload)) = h.poll_with(0) {
            assert!(payload.is_empty());
            assert_ne!(hdr.op, OP_SHUTDOWN);
            assert_ne!(hdr.op, OP_RST);
        }
        sleep(Duration::from_millis(2));
    }
    let (hdr, payload) = h.wait_packet();
    assert_eq!((hdr.op, payload.as_slice()), (OP_RW, &b"data"[..]));
}

#[test]
fn credit_request_is_answered_with_a_credit_update() {
    let mut h = Host::new();
    let listener = h.listen(HOST_PORT);
    let _stream = h.connect_guest(&listener, GUEST_PORT, 4096);
    h.send(guest(OP_CREDIT_REQUEST, GUEST_PORT, HOST_PORT), b"");
    let (hdr, _) = h.wait_packet();
    assert_eq!((hdr.op, hdr.buf_alloc), (OP_CREDIT_UPDATE, CONN_BUF_ALLOC));
}

#[test]
fn data_beyond_the_granted_credit_resets_the_connection() {
    let mut h = Host::new();
    let listener = h.listen(HOST_PORT);
    let mut stream = h.connect_guest(&listener, GUEST_PORT, 4096);
    // The host never reads: its socket fills, then what we hold for it, then the grant is spent.
    let chunk = vec![9u8; MAX_PAYLOAD];
    let mut sent = 0;
    while h.stats().credit_violations == 0 {
        assert!(
            sent < 64 * MAX_PAYLOAD,
            "no credit violation after {sent} bytes"
        );
        h.send(guest(OP_RW, GUEST_PORT, HOST_PORT), &chunk);
        sent += chunk.len();
    }
    assert!(sent > CONN_BUF_ALLOC as usize);
    let packets = h.drain();
    assert_eq!(ops(&packets), vec![OP_RST]);
    assert!(h.muxer.conns.is_empty());
    assert!(sees_eof(&mut stream));
}

// ---- host-initiated connections ----

#[test]
fn host_connect_line_becomes_a_request_and_the_response_an_ok_line() {
    let mut h = Host::new();
    let (mut client, local_port) = h.connect_host(52, b"");
    assert!(local_port >= FIRST_LOCAL_PORT);
    h.send(guest(OP_RESPONSE, 52, local_port), b"");
    let mut line = vec![0u8; format!("OK {local_port}\n").len()];
    client.read_exact(&mut line).unwrap();
    assert_eq!(line, format!("OK {local_port}\n").into_bytes());

    client.write_all(b"ping").unwrap();
    let (hdr, payload) = h.wait_packet();
    assert_eq!(
        (hdr.op, hdr.dst_port, payload.as_slice()),
        (OP_RW, 52, &b"ping"[..])
    );
    h.send(guest(OP_RW, 52, local_port), b"pong");
    let mut reply = [0u8; 4];
    client.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"pong");
}

#[test]
fn host_connections_get_distinct_local_ports() {
    let mut h = Host::new();
    let (_a, port_a) = h.connect_host(52, b"");
    let (_b, port_b) = h.connect_host(52, b"");
    assert_ne!(port_a, port_b);
}

#[test]
fn a_restored_muxer_numbers_host_connections_on_from_where_the_saved_one_stood() {
    let mut saved = Host::new();
    let (_a, first) = saved.connect_host(52, b"");
    let (_b, second) = saved.connect_host(52, b"");
    let next = saved.muxer.next_host_port().unwrap();

    // The restored guest may still hold sockets of both: the next connection takes neither port.
    let mut restored = Host::new();
    restored.muxer.number_host_ports_from(next).unwrap();
    let (_c, port) = restored.connect_host(52, b"");
    assert!(
        port > first.max(second),
        "{port} after {first} and {second}"
    );
    assert!(matches!(
        restored.muxer.number_host_ports_from(FIRST_LOCAL_PORT - 1),
        Err(DeviceStateError::HostPortBelowRange { .. })
    ));
}

#[test]
fn data_written_right_after_the_connect_line_is_delivered_after_the_response() {
    let mut h = Host::new();
    let (mut client, local_port) = h.connect_host(52, b"early bytes");
    // Nothing flows before the guest accepts.
    h.assert_quiet();
    h.send(guest(OP_RESPONSE, 52, local_port), b"");
    let (hdr, payload) = h.wait_packet();
    assert_eq!((hdr.op, payload.as_slice()), (OP_RW, &b"early bytes"[..]));
    let mut line = vec![0u8; format!("OK {local_port}\n").len()];
    client.read_exact(&mut line).unwrap();
}

#[test]
fn connect_line_split_across_writes_is_assembled() {
    let mut h = Host::new();
    let mut client = h.client(b"CONN");
    h.assert_quiet();
    client.write_all(b"ECT 9\n").unwrap();
    let (hdr, _) = h.wait_packet();
    assert_eq!((hdr.op, hdr.dst_port), (OP_REQUEST, 9));
}

#[test]
fn bad_connect_lines_close_the_client_and_are_counted() {
    let lines: [&[u8]; 7] = [
        b"CONNECT abc\n",
        b"HELLO\n",
        &[b'x'; 40],
        b"CONNECT 99999999999\n",
        b"CONNECT \n",
        b"CONNECT -1\n",
        b"connect 52\n",
    ];
    let mut h = Host::new();
    for (n, line) in lines.iter().enumerate() {
        let mut client = h.client(line);
        wait_until("the bad line to be noticed", || {
            h.muxer.on_host_ready();
            h.stats().bad_host_connects == n as u64 + 1
        });
        assert!(sees_eof(&mut client), "client of {line:?} still open");
    }
    assert!(h.muxer.pending.is_empty());
    assert!(h.muxer.conns.is_empty());
    assert_eq!(h.poll(), None);
}

#[test]
fn a_metrics_line_is_answered_with_the_counters_and_the_client_closed() {
    let mut h = Host::new();
    let mut bad = h.client(b"CONNECT x\n");
    wait_until("the bad line to be counted", || {
        h.muxer.on_host_ready();
        h.stats().bad_host_connects == 1
    });
    assert!(sees_eof(&mut bad));
    let mut client = h.client(b"METRICS\n");
    let mut answer = String::new();
    wait_until("the metrics line", || {
        h.muxer.on_host_ready();
        let mut buf = [0u8; 4096];
        if let Ok(n) = client.read(&mut buf) {
            answer.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        answer.ends_with('\n')
    });
    let report: serde_json::Value = serde_json::from_str(answer.trim_end()).unwrap();
    assert_eq!(report["vsock"]["bad_host_connects"], 1, "{report}");
    assert_eq!(report["tables"]["connections"], 0, "{report}");
    assert_eq!(report["within_bounds"], true, "{report}");
    assert!(sees_eof(&mut client));
    // It opened no connection to the guest.
    assert_eq!(h.poll(), None);
    assert!(h.muxer.conns.is_empty());
}

#[test]
fn client_leaving_before_its_connect_line_is_forgotten() {
    let mut h = Host::new();
    drop(h.client(b"CONN"));
    wait_until("the pending client to be dropped", || {
        h.muxer.on_host_ready();
        h.muxer.pending.is_empty()
    });
    assert_eq!(h.poll(), None);
}

#[test]
fn clients_that_never_send_a_line_are_bounded() {
    let mut h = Host::new();
    let clients: Vec<_> = (0..MAX_PENDING_CONNECTS + 3)
        .map(|_| h.client(b""))
        .collect();
    wait_until("the excess clients to be refused", || {
        h.muxer.on_host_ready();
        h.stats().bad_host_connects == 3
    });
    assert_eq!(h.muxer.pending.len(), MAX_PENDING_CONNECTS);
    drop(clients);
}

#[test]
fn guest_refusing_a_host_connection_closes_the_client() {
    let mut h = Host::new();
    let (mut client, local_port) = h.connect_host(52, b"");
    h.send(guest(OP_RST, 52, local_port), b"");
    assert!(sees_eof(&mut client));
    assert!(h.muxer.conns.is_empty());
    h.assert_quiet();
}

#[test]
fn a_host_connection_the_guest_never_answers_is_reset() {
    let mut h = Host::new();
    h.muxer.set_answer_timeout(Duration::from_millis(50));
    let (mut client, local_port) = h.connect_host(52, b"");
    let mut reset = None;
    wait_until("the unanswered request to be reset", || {
        reset = h.poll();
        reset.is_some()
    });
    let (hdr, _) = reset.unwrap();
    assert_eq!(
        (hdr.op, hdr.src_port, hdr.dst_port),
        (OP_RST, local_port, 52)
    );
    assert!(sees_eof(&mut client));
    assert!(h.muxer.conns.is_empty());
    assert_eq!(h.stats().guest_answer_timeouts, 1);
}

#[test]
fn data_before_the_guest_accepts_resets_the_connection() {
    let mut h = Host::new();
    let (mut client, local_port) = h.connect_host(52, b"");
    h.send(guest(OP_RW, 52, local_port), b"too soon");
    assert_eq!(ops(&h.drain()), vec![OP_RST]);
    assert!(sees_eof(&mut client));
}

#[test]
fn response_to_a_guest_initiated_connection_resets_it() {
    let mut h = Host::new();
    let listener = h.listen(HOST_PORT);
    let mut stream = h.connect_guest(&listener, GUEST_PORT, 4096);
    h.send(guest(OP_RESPONSE, GUEST_PORT, HOST_PORT), b"");
    assert_eq!(ops(&h.drain()), vec![OP_RST]);
    assert!(sees_eof(&mut stream));
}

// ---- closing ----

#[test]
fn host_closing_its_socket_sends_the_guest_a_shutdown() {
    let mut h = Host::new();
    let listener = h.listen(HOST_PORT);
    let stream = h.connect_guest(&listener, GUEST_PORT, 4096);
    drop(stream);
    let (hdr, _) = h.wait_packet();
    assert_eq!(
        (hdr.op, hdr.flags, hdr.dst_port),
        (OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, GUEST_PORT)
    );
    h.assert_quiet();
    // The guest's answering reset ends the connection.
    h.send(guest(OP_RST, GUEST_PORT, HOST_PORT), b"");
    assert!(h.muxer.conns.is_empty());
    h.assert_quiet();
}

#[test]
fn a_shutdown_the_guest_never_answers_ends_in_a_reset() {
    let mut h = Host::new();
    h.muxer.set_answer_timeout(Duration::from_millis(50));
    let listener = h.listen(HOST_PORT);
    let stream = h.connect_guest(&listener, GUEST_PORT, 4096);
    drop(stream);
    assert_eq!(h.wait_packet().0.op, OP_SHUTDOWN);
    let (hdr, _) = h.wait_packet();
    assert_eq!(hdr.op, OP_RST);
    assert!(h.muxer.conns.is_empty());
    // With nothing left to wait for, the sweep timer stops.
    assert!(!h.muxer.sweep_armed);
}

#[test]
fn host_data_before_close_reaches_the_guest_before_the_shutdown() {
    let mut h = Host::new();
    let listener = h.listen(HOST_PORT);
    let mut stream = h.connect_guest(&listener, GUEST_PORT, 4096);
    stream.write_all(b"last words").unwrap();
    drop(stream);
    let (hdr, payload) = h.wait_packet();
    assert_eq!((hdr.op, payload.as_slice()), (OP_RW, &b"last words"[..]));
    let (hdr, _) = h.wait_packet();
    assert_eq!(hdr.op, OP_SHUTDOWN);
}

#[test]
fn guest_shutdown_of_both_directions_closes_the_host_socket_and_resets() {
    let mut h = Host::new();
    let listener = h.listen(HOST_PORT);
    let mut stream = h.connect_guest(&listener, GUEST_PORT, 4096);
    h.send(guest(OP_RW, GUEST_PORT, HOST_PORT), b"bye");
    let shutdown = Header {
        flags: SHUTDOWN_RCV | SHUTDOWN_SEND,
        ..guest(OP_SHUTDOWN, GUEST_PORT, HOST_PORT)
    };
    h.send(shutdown, b"");
    let mut got = Vec::new();
    stream.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"bye");
    assert_eq!(ops(&h.drain()), vec![OP_RST]);
    assert!(h.muxer.conns.is_empty());
    assert_eq!(h.stats().connections_closed, 1);
}

#[test]
fn guest_shutdown_of_its_sending_half_leaves_the_host_able_to_reply() {
    let mut h = Host::new();
    let listener = h.listen(HOST_PORT);
    let mut stream = h.connect_guest(&listener, GUEST_PORT, 4096);
    h.send(guest(OP_RW, GUEST_PORT, HOST_PORT), b"question");
    let shutdown = Header {
        flags: SHUTDOWN_SEND,
        ..guest(OP_SHUTDOWN, GUEST_PORT, HOST_PORT)
    };
    h.send(shutdown, b"");
    let mut got = Vec::new();
    stream.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"question");
    stream.write_all(b"answer").unwrap();
    let (hdr, payload) = h.wait_packet();
    assert_eq!((hdr.op, payload.as_slice()), (OP_RW, &b"answer"[..]));
}

#[test]
fn guest_reset_removes_the_connection() {
    let mut h = Host::new();
    let listener = h.listen(HOST_PORT);
    let mut stream = h.connect_guest(&listener, GUEST_PORT, 4096);
    h.send(guest(OP_RST, GUEST_PORT, HOST_PORT), b"");
    assert!(h.muxer.conns.is_empty());
    assert!(h.muxer.by_fd.is_empty());
    assert!(sees_eof(&mut stream));
    assert_eq!(h.stats().connections_closed, 1);
    h.assert_quiet();
}

#[test]
fn unknown_operation_resets_the_connection() {
    let mut h = Host::new();
    let listener = h.listen(HOST_PORT);
    let mut stream = h.connect_guest(&listener, GUEST_PORT, 4096);
    h.send(guest(99, GUEST_PORT, HOST_PORT), b"");
    assert_eq!(h.stats().bad_packets, 1);
    assert_eq!(ops(&h.drain()), vec![OP_RST]);
    assert!(sees_eof(&mut stream));
}

#[test]
fn packets_for_unknown_connections_are_reset_but_resets_are_not() {
    let mut h = Host::new();
    for op in [
        OP_RW,
        OP_RESPONSE,
        OP_SHUTDOWN,
        OP_CREDIT_UPDATE,
        OP_CREDIT_REQUEST,
        99,
    ] {
        h.send(guest(op, GUEST_PORT, HOST_PORT), b"x");
        let (hdr, _) = h.wait_packet();
        assert_eq!(
            (hdr.op, hdr.src_port, hdr.dst_port),
            (OP_RST, HOST_PORT, GUEST_PORT),
            "answer to op {op}"
        );
    }
    h.send(guest(OP_RST, GUEST_PORT, HOST_PORT), b"");
    h.assert_quiet();
}

// ---- limits ----

#[test]
fn requests_beyond_the_connection_limit_are_refused() {
    let mut h = Host::new();
    let listener = h.listen(HOST_PORT);
    let excess = 20;
    for port in 0..(MAX_CONNECTIONS + excess) as u32 {
        h.send(guest(OP_REQUEST, 10_000 + port, HOST_PORT), b"");
        // Accept as we go so the listener's backlog never refuses for us; the host end is not
        // needed.
        while listener.accept().is_ok() {}
    }
    assert_eq!(h.muxer.conns.len(), MAX_CONNECTIONS);
    assert_eq!(h.stats().connections_opened, MAX_CONNECTIONS as u64);
    assert_eq!(h.stats().connections_refused, excess as u64);
    let packets = h.drain();
    let resets = packets.iter().filter(|(hdr, _)| hdr.op == OP_RST).count();
    let responses = packets
        .iter()
        .filter(|(hdr, _)| hdr.op == OP_RESPONSE)
        .count();
    assert_eq!((resets, responses), (excess, MAX_CONNECTIONS));

    // Host clients are turned away too.
    let mut client = h.client(b"CONNECT 52\n");
    wait_until("the client to be refused", || {
        h.muxer.on_host_ready();
        h.stats().bad_host_connects == 1
    });
    assert!(sees_eof(&mut client));
}

#[test]
fn reset_queue_is_bounded_when_the_guest_takes_nothing() {
    let mut h = Host::new();
    let flood = 4 * MAX_QUEUED_RESETS;
    for port in 0..flood as u32 {
        h.send(guest(OP_RW, port, HOST_PORT), b"junk");
    }
    assert_eq!(h.muxer.resets.len(), MAX_QUEUED_RESETS);
    assert_eq!(h.stats().resets_dropped, (flood - MAX_QUEUED_RESETS) as u64);
    let packets = h.drain();
    assert_eq!(packets.len(), MAX_QUEUED_RESETS);
    assert!(packets.iter().all(|(hdr, _)| hdr.op == OP_RST));
    assert_eq!(h.stats().resets_sent, MAX_QUEUED_RESETS as u64);
}

#[test]
fn a_million_request_reset_cycles_without_receive_buffers_keep_every_table_bounded() {
    // A guest that opens and resets connections and never gives a receive buffer: nothing
    // drains what the muxer owes it, so only the tables' own bounds hold it.
    const CYCLES: u32 = 1_000_000;
    let mut h = Host::new();
    let listener = h.listen(HOST_PORT);
    for cycle in 0..CYCLES {
        let port = GUEST_PORT + cycle % 8;
        h.send(guest(OP_REQUEST, port, HOST_PORT), b"");
        // The service takes every connection, so that each request connects.
        while listener.accept().is_ok() {}
        if cycle % 3 == 0 {
            // A second request for the same key resets it (and owes the guest a reset).
            h.send(guest(OP_REQUEST, port, HOST_PORT), b"");
        }
        h.send(guest(OP_RST, port, HOST_PORT), b"");
        let tables = h.muxer.tables();
        assert!(tables.within_bounds(), "after {cycle} cycles: {tables:?}");
    }
    let stats = h.stats();
    assert_eq!(stats.connections_opened, u64::from(CYCLES));
    assert!(
        stats.rx_work_peak <= MAX_CONNECTIONS as u64,
        "{}",
        stats.rx_work_peak
    );
    assert_eq!(h.muxer.resets.len(), MAX_QUEUED_RESETS);
    // What is left for the guest is the bounded reset queue and nothing else.
    assert_eq!(h.drain().len(), MAX_QUEUED_RESETS);
    assert!(!h.muxer.has_rx());
}

#[test]
fn reset_closes_every_connection_and_pending_client() {
    let mut h = Host::new();
    let listener = h.listen(HOST_PORT);
    let mut guest_side = h.connect_guest(&listener, GUEST_PORT, 4096);
    let (mut host_side, _) = h.connect_host(52, b"");
    let mut pending = h.client(b"CONN");
    wait_until("the pending client", || {
        h.muxer.on_host_ready();
        h.muxer.pending.len() == 1
    });
    h.send(guest(OP_RW, 1, 2), b"unknown");
    guest_side.write_all(b"unread").unwrap();

    h.muxer.reset();
    assert!(h.muxer.conns.is_empty());
    assert!(h.muxer.by_fd.is_empty());
    assert!(h.muxer.pending.is_empty());
    assert!(!h.muxer.has_rx());
    assert!(sees_eof(&mut guest_side));
    assert!(sees_eof(&mut host_side));
    assert!(sees_eof(&mut pending));
    h.assert_quiet();

    // The muxer still works afterwards.
    let _again = h.connect_guest(&listener, GUEST_PORT, 4096);
}

#[test]
fn dropping_the_muxer_removes_its_socket() {
    let h = Host::new();
    let uds = h.uds.clone();
    assert!(uds.exists());
    drop(h.muxer);
    assert!(!uds.exists());
}
