//! The vsock muxer (`UnixMuxer`) between a hostile guest and host programs, step by step: the
//! fuzz bytes are a sequence of operations, each applied to one muxer with real Unix sockets in a
//! private directory (services listening on two host ports, a third port with none, host clients
//! dialling the guest), and after every step each of the muxer's tables must be within its bound
//! (`UnixMuxer::tables`). Nothing may panic, block or grow without bound, whatever the guest sends
//! and whenever it takes its packets.
//!
//! Input: the answer timeout (1 byte: 1 to 4 ms, so that sweeps of unanswered connections
//! happen), then operations until the input ends (at most `MAX_OPS`), each a tag byte (`% 10`)
//! and its fields, little-endian:
//!
//! | tag | operation | fields |
//! |---|---|---|
//! | 0 | a guest packet | op (1: `% 9`, 0 and 8 unknown), guest port (1: index), host port (1: index), flags (1), buf_alloc (4), fwd_cnt (4), payload length (2), fill byte (1) |
//! | 1 | the guest takes a packet (`next_rx`) | buffer size (2: at most 64 KiB) |
//! | 2 | host sockets are ready (`on_host_ready`) | |
//! | 3 | the services accept their waiting connections | |
//! | 4 | a service writes | stream (1: index), length (2), fill byte (1) |
//! | 5 | a service closes | stream (1: index) |
//! | 6 | a host client dials the guest | line (1: `% 4` good, garbage, cut short, over-long), guest port (1: index) |
//! | 7 | a host client writes | client (1: index), length (2), fill byte (1) |
//! | 8 | a host client closes | client (1: index) |
//! | 9 | the driver resets the device (`reset`) | |

#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use agentos_fuzz::Input;
use agentos_vmm::devices::virtio::vsock::VsockBackend;
use agentos_vmm::devices::virtio::vsock::metrics::VsockMetrics;
use agentos_vmm::devices::virtio::vsock::muxer::{FIRST_LOCAL_PORT, MuxerTables, UnixMuxer};
use agentos_vmm::devices::virtio::vsock::packet::{
    Header, MAX_PAYLOAD, OP_RW, TYPE_STREAM, TxPacket,
};
use libfuzzer_sys::fuzz_target;

/// Operations one input may perform: enough for every state of several connections, few enough
/// that an input runs in milliseconds.
const MAX_OPS: usize = 512;
/// Host ports a guest packet may name: two with a service, one without, the first ports the
/// muxer gives host-initiated connections, and the extremes.
const HOST_PORTS: [u32; 8] = [
    1024,
    1025,
    1026,
    FIRST_LOCAL_PORT,
    FIRST_LOCAL_PORT + 1,
    FIRST_LOCAL_PORT + 2,
    0,
    u32::MAX,
];
/// Host ports with a service listening.
const SERVICE_PORTS: [u32; 2] = [1024, 1025];
const GUEST_PORTS: [u32; 4] = [5000, 5001, 5002, u32::MAX];
const GUEST_CID: u64 = 3;
const HOST_CID: u64 = 2;
/// Host-side streams kept (services' each), and host clients dialled in one run: a client's
/// connect blocks once the muxer's backlog is full (clients it has not accepted yet stay there
/// even when closed), so they stay well under it.
const MAX_STREAMS: usize = 32;

/// A directory of its own for each run, removed at its end.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("agentos-fuzz-mux-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).expect("cannot create a scratch directory");
        Self(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The host side: services on their ports, their accepted streams, clients dialling the guest.
struct Host {
    services: Vec<UnixListener>,
    accepted: Vec<UnixStream>,
    clients: Vec<UnixStream>,
    dialled: usize,
}

fn pick<T: Copy>(items: &[T], byte: u8) -> T {
    items[usize::from(byte) % items.len()]
}

/// Writes `len` bytes of `fill` without blocking; a full or closed socket takes what it takes.
fn write_some(stream: &mut UnixStream, len: u16, fill: u8) {
    let _ = stream.write(&vec![fill; usize::from(len)]);
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let scratch = Scratch::new();
    let uds = scratch.0.join("vsock.sock");
    let metrics = Arc::new(VsockMetrics::default());
    let mut muxer = UnixMuxer::new(&uds, metrics).expect("the muxer listens");
    muxer.set_answer_timeout(Duration::from_millis(1 + u64::from(input.u8() % 4)));
    let mut host = Host {
        services: SERVICE_PORTS
            .iter()
            .map(|&port| {
                let listener =
                    UnixListener::bind(muxer.guest_port_path(port)).expect("a service listens");
                listener.set_nonblocking(true).expect("non-blocking");
                listener
            })
            .collect(),
        accepted: Vec::new(),
        clients: Vec::new(),
        dialled: 0,
    };
    let mut buf = vec![0u8; MAX_PAYLOAD];

    for step in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 10 {
            0 => {
                let op = u16::from(input.u8() % 9);
                let src_port = pick(&GUEST_PORTS, input.u8());
                let dst_port = pick(&HOST_PORTS, input.u8());
                let flags = u32::from(input.u8());
                let buf_alloc = input.u32();
                let fwd_cnt = input.u32();
                let len = usize::from(input.u16()).min(MAX_PAYLOAD);
                let payload = vec![input.u8(); len];
                let hdr = Header {
                    src_cid: GUEST_CID,
                    dst_cid: HOST_CID,
                    src_port,
                    dst_port,
                    len: len as u32,
                    type_: TYPE_STREAM,
                    op,
                    flags,
                    buf_alloc,
                    fwd_cnt,
                };
                muxer.send(TxPacket { hdr, payload });
            }
            1 => {
                let size = usize::from(input.u16()).min(MAX_PAYLOAD);
                let has_rx = muxer.has_rx();
                if let Some((hdr, n)) = muxer.next_rx(&mut buf[..size]) {
                    assert!(has_rx, "a packet came while none was announced");
                    assert!(n <= size, "{n} payload bytes in a {size}-byte buffer");
                    assert!(n == 0 || hdr.op == OP_RW, "payload on op {}", hdr.op);
                }
            }
            2 => muxer.on_host_ready(),
            3 => {
                for service in &host.services {
                    while let Ok((stream, _)) = service.accept() {
                        if host.accepted.len() >= MAX_STREAMS {
                            break;
                        }
                        stream.set_nonblocking(true).expect("non-blocking");
                        host.accepted.push(stream);
                    }
                }
            }
            4 => {
                let index = input.u8();
                let (len, fill) = (input.u16(), input.u8());
                if !host.accepted.is_empty() {
                    let i = usize::from(index) % host.accepted.len();
                    write_some(&mut host.accepted[i], len, fill);
                }
            }
            5 => {
                let index = input.u8();
                if !host.accepted.is_empty() {
                    host.accepted
                        .swap_remove(usize::from(index) % host.accepted.len());
                }
            }
            6 => {
                let kind = input.u8() % 4;
                let port = pick(&GUEST_PORTS, input.u8());
                if host.dialled < MAX_STREAMS
                    && let Ok(mut client) = UnixStream::connect(&uds)
                {
                    host.dialled += 1;
                    let line = match kind {
                        0 => format!("CONNECT {port}\n"),
                        1 => "HELLO\n".to_owned(),
                        2 => "CONN".to_owned(),
                        _ => "9".repeat(40),
                    };
                    client.set_nonblocking(true).expect("non-blocking");
                    let _ = client.write(line.as_bytes());
                    host.clients.push(client);
                }
            }
            7 => {
                let index = input.u8();
                let (len, fill) = (input.u16(), input.u8());
                if !host.clients.is_empty() {
                    let i = usize::from(index) % host.clients.len();
                    write_some(&mut host.clients[i], len, fill);
                }
            }
            8 => {
                let index = input.u8();
                if !host.clients.is_empty() {
                    host.clients
                        .swap_remove(usize::from(index) % host.clients.len());
                }
            }
            _ => {
                muxer.reset();
                assert_eq!(muxer.tables(), MuxerTables::default(), "step {step}");
                assert!(!muxer.has_rx(), "step {step}: packets left after a reset");
            }
        }
        let tables = muxer.tables();
        assert!(tables.within_bounds(), "step {step}: {tables:?}");
    }
});
