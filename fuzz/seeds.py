#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/corpus/<target>/: small inputs that each mean something (a valid
frame, a valid group file, a packet in one descriptor or split over several, a loop, an indirect
table (which the device refuses), a buffer outside guest memory, a muxer's connection from open to
close, a request of each API route), so that fuzzing starts from the interesting shapes.

Run from anywhere: python3 fuzz/seeds.py. The layouts below mirror fuzz/src/lib.rs and the
targets' doc comments; the files it writes are committed, the script is how they were made.
"""

import json
import struct
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
CORPUS = FUZZ / "corpus"

# virtio split-ring descriptor flags.
NEXT, WRITE, INDIRECT = 1, 2, 4

# virtio-vsock.
HOST_CID, GUEST_CID = 2, 3
TYPE_STREAM = 1
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW = 1, 2, 3, 4, 5
OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = 6, 7
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2
HEADER_SIZE = 44


def write(target, name, data):
    directory = CORPUS / target
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (directory / name).write_bytes(data)


# ---- protocol_frames: 4-byte big-endian length, then one JSON object ----


def frame(msg):
    body = msg.encode() if isinstance(msg, str) else json.dumps(msg, separators=(",", ":")).encode()
    return struct.pack(">I", len(body)) + body


def protocol_frames():
    seeds = {
        "host_ping": [{"op": "ping", "id": 1}],
        "host_exec": [
            {
                "op": "exec",
                "id": 3,
                "run": {
                    "program": "/bin/sh",
                    "args": ["-c", "echo hi"],
                    "env": {"A": "1"},
                    "cwd": "/tmp",
                    "timeout_ms": 500,
                },
                "stdin": True,
            },
            {"op": "stdin", "id": 3, "data": "aGkK"},
            {"op": "close_stdin", "id": 3},
            {"op": "signal", "id": 3, "signal": 15},
            {"op": "shutdown", "id": 4},
        ],
        "host_infer": [
            {
                "op": "infer",
                "id": 5,
                "model": "sentiment",
                "task": "classify",
                "inputs": ["I love this"],
                "options": {"top_k": 2},
            }
        ],
        "host_join": [
            {
                "op": "join",
                "id": 6,
                "group": "digest",
                "name": "summarizer",
                "handler": {
                    "kind": "infer",
                    "model": "minilm",
                    "task": "summarize",
                    "options": {"sentences": 2},
                },
                "outputs": ["translator", "output"],
            }
        ],
        "guest_session": [
            {
                "type": "hello",
                "protocol": 3,
                "agent": "agentos-guest 0.1.0",
                "kernel": "6.1.0",
                "vcpus": 2,
                "memory_kib": 1024,
                "boot": {"init_ms": 10, "ready_ms": 20},
            },
            {"type": "pong", "id": 1},
            {"type": "started", "id": 3, "pid": 42},
            {"type": "stdout", "id": 3, "data": "aGkK"},
            {"type": "stderr", "id": 3, "data": ""},
            {"type": "exited", "id": 3, "status": {"signal": 9, "timed_out": True}},
            {"type": "error", "id": 7, "message": "no such program"},
            {"type": "shutting_down", "id": 4},
            {"type": "joined", "id": 6},
        ],
        "guest_inferred": [
            {
                "type": "inferred",
                "id": 5,
                "model": "ner",
                "task": "token-classify",
                "results": [
                    {"kind": "labels", "labels": [{"label": "positive", "score": 0.98}]},
                    {"kind": "embedding", "vector": [0.5, -1.25, 3e-5]},
                    {
                        "kind": "entities",
                        "entities": [
                            {"label": "PER", "text": "John", "start": 5, "end": 9, "score": 0.9}
                        ],
                    },
                    {"kind": "summary", "text": "A cat.", "sentences": [0]},
                    {"kind": "translation", "text": "Un gato."},
                ],
                "timings": {
                    "load_us": 1,
                    "tokenize_us": 2,
                    "run_us": 3,
                    "decode_us": 4,
                    "tokens": 5,
                },
            }
        ],
        "peer_requests": [
            {"op": "listen"},
            {
                "op": "send",
                "seq": 1,
                "to": "translator",
                "kind": "summary",
                "body": "hi",
                "trace": 7,
                "model": None,
                "infer_us": None,
                "from": None,
            },
            {"op": "send", "seq": 2, "to": "output", "kind": "k", "body": ""},
            {"op": "ack", "message": 9},
        ],
        "router_messages": [
            {"type": "accepted", "seq": 1, "message": 9},
            {"type": "refused", "seq": 2, "reason": "queue full", "retry": True},
            {
                "type": "deliver",
                "message": 9,
                "from": "input",
                "kind": "text",
                "body": "The cat is on the table.",
                "trace": 1,
            },
        ],
        "not_json": ["not json"],
        "unknown_op": [{"op": "format_disk", "id": 1}],
    }
    for name, messages in seeds.items():
        write("protocol_frames", name, b"".join(frame(m) for m in messages))
    # A length prefix one over the 1 MiB limit, and a frame cut short inside its body.
    write("protocol_frames", "over_limit", struct.pack(">I", (1 << 20) + 1) + b"{}")
    write("protocol_frames", "truncated", struct.pack(">I", 100) + b'{"op":"pi')


# ---- group_file: TOML text ----

DIGEST = """name = "digest"
channels = [
  "input -> summarizer",
  "summarizer -> translator",
  "summarizer -> output",
  "translator -> output",
]

[[agent]]
name = "summarizer"
model = "minilm"
task = "summarize"
sentences = 2

[[agent]]
name = "translator"
exec = ["/bin/sh", "-c", "cat"]
memory = 256
restart = "never"
class = "interactive"
"""

ECHO = """name = "echo"
channels = ["input -> a", "a -> b", "b -> output"]

[[agent]]
name = "a"
vcpus = 2
cpus = 0.5
weight = 200

[[agent]]
name = "b"
model = "sentiment"
task = "classify"
top_k = 3
restart = "on-failure"
"""

BROKEN = """name = "digest"
channels = ["input -> summarizer", "summarizer -> nobody"]

[[agent]]
name = "summarizer"
task = "sumarize"
sentences =
"""


def group_file():
    write("group_file", "digest_test", DIGEST)
    write("group_file", "digest_example", (FUZZ.parent / "examples" / "digest.toml").read_text())
    write("group_file", "exec_and_limits", ECHO)
    write("group_file", "broken", BROKEN)
    write("group_file", "no_agents", 'name = "g"\nchannels = []\n')


# ---- virtio: descriptors, vsock headers ----


def desc(addr, length, flags=0, next_index=0):
    return struct.pack("<QIHH", addr, length, flags, next_index)


def vsock_header(length, op=OP_RW, src_cid=GUEST_CID, dst_cid=HOST_CID, type_=TYPE_STREAM):
    return struct.pack(
        "<QQIIIHHIII", src_cid, dst_cid, 5000, 1024, length, type_, op, 0, 4096, 7
    )


def place(image, addr, data):
    """Writes `data` at `addr` of a bytearray standing for guest RAM from some base."""
    end = addr + len(data)
    if len(image) < end:
        image.extend(bytes(end - len(image)))
    image[addr:end] = data


# vsock_packet: queue size exponent, head (u16), descriptor count, descriptors, data at DATA.
DATA = 0x2000


def vsock_packet_seed(size_exp, head, descs, data_at_data):
    return struct.pack("<BHB", size_exp, head, len(descs)) + b"".join(descs) + bytes(data_at_data)


def vsock_packet():
    hello = vsock_header(5) + b"hello"
    seeds = {
        # A packet in one readable descriptor.
        "one_descriptor": vsock_packet_seed(4, 0, [desc(DATA, len(hello))], hello),
        # The header split 10 + 34 over two descriptors, the payload in a third.
        "split_header": vsock_packet_seed(
            4,
            0,
            [desc(DATA, 10, NEXT, 1), desc(DATA + 10, 34, NEXT, 2), desc(DATA + 44, 5)],
            hello,
        ),
        # A receive buffer: one device-writable descriptor.
        "rx_buffer": vsock_packet_seed(4, 0, [desc(DATA, 4096, WRITE)], b"from host"),
        # Readable header then writable payload, as a driver must order them.
        "read_then_write": vsock_packet_seed(
            4, 0, [desc(DATA, 44, NEXT, 1), desc(DATA + 64, 64, WRITE)], vsock_header(0)
        ),
        # Descriptors 0 and 1 point at each other.
        "loop": vsock_packet_seed(
            4, 0, [desc(DATA, 44, NEXT, 1), desc(DATA, 44, NEXT, 0)], vsock_header(1000)
        ),
        # A chain head past the queue size, and a next index past it.
        "head_out_of_range": vsock_packet_seed(4, 300, [desc(DATA, 44)], hello),
        "next_out_of_range": vsock_packet_seed(4, 0, [desc(DATA, 44, NEXT, 200)], hello),
        # Buffers past the end of RAM, in the hole, and at the top of the address space.
        "outside_memory": vsock_packet_seed(
            4,
            0,
            [desc(0x1_0FF0, 44, NEXT, 1), desc(0x3_0000, 8, NEXT, 2), desc(2**64 - 10, 44)],
            b"",
        ),
        # Across the boundary of two adjacent regions.
        "across_regions": vsock_packet_seed(4, 0, [desc(0xFFF0, 64)], b""),
        # Zero and huge lengths; a header claiming more than 64 KiB.
        "zero_length": vsock_packet_seed(4, 0, [desc(DATA, 0, NEXT, 1), desc(DATA, 49)], hello),
        "huge_length": vsock_packet_seed(4, 0, [desc(DATA, 0xFFFF_FFFF)], hello),
        "payload_over_limit": vsock_packet_seed(
            4, 0, [desc(DATA, 44)], vsock_header(64 * 1024 + 1)
        ),
        # A queue of 256 and of 1.
        "queue_256": vsock_packet_seed(8, 0, [desc(DATA, len(hello))], hello),
        "queue_1": vsock_packet_seed(0, 0, [desc(DATA, len(hello))], hello),
    }
    # An indirect table at DATA + 0x100 holding the header and the payload descriptors.
    table = desc(DATA, 44, NEXT, 1) + desc(DATA + 44, 5)
    data = bytearray(hello)
    place(data, 0x100, table)
    seeds["indirect"] = vsock_packet_seed(4, 0, [desc(DATA + 0x100, len(table), INDIRECT)], data)
    # An indirect descriptor inside an indirect table, and a table of a length not a multiple of 16.
    nested = bytearray(hello)
    place(nested, 0x100, desc(DATA + 0x100, 16, INDIRECT))
    seeds["nested_indirect"] = vsock_packet_seed(4, 0, [desc(DATA + 0x100, 16, INDIRECT)], nested)
    seeds["indirect_bad_length"] = vsock_packet_seed(
        4, 0, [desc(DATA + 0x100, 17, INDIRECT)], data
    )
    for name, seed in seeds.items():
        write("vsock_packet", name, seed)


# virtio_queue: features, tx and rx size exponents, backend byte, packets (op u16, len u16), RAM.


class Layout:
    """A queue packed at `base` as fuzz/src/lib.rs QueueLayout::packed_at lays it out."""

    def __init__(self, base, size):
        self.size = size
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) // 4 * 4
        self.end = (self.used + 6 + 8 * size + 15) // 16 * 16

    def offer(self, ram, heads, idx=None):
        """Puts `heads` in the available ring; the index says how many (or `idx` if given)."""
        for i, head in enumerate(heads):
            place(ram, self.avail + 4 + 2 * (i % self.size), struct.pack("<H", head))
        place(ram, self.avail + 2, struct.pack("<H", len(heads) if idx is None else idx))

    def set_desc(self, ram, index, d):
        place(ram, self.desc + 16 * index, d)

    def set_used_event(self, ram, value):
        place(ram, self.avail + 4 + 2 * self.size, struct.pack("<H", value))


BUFFERS = 0x800


def queue_seed(features, tx_exp, rx_exp, backend, packets, build):
    tx = Layout(0, 1 << tx_exp)
    rx = Layout(tx.end, 1 << rx_exp)
    ram = bytearray()
    build(ram, tx, rx)
    count = (backend & 0x80) | len(packets)
    head = struct.pack("<BBBB", features, tx_exp, rx_exp, count)
    return head + b"".join(struct.pack("<HH", op, n) for op, n in packets) + bytes(ram)


def virtio_queue():
    def good(ram, tx, rx):
        place(ram, BUFFERS, vsock_header(5) + b"hello")
        tx.set_desc(ram, 0, desc(BUFFERS, 49))
        tx.offer(ram, [0])
        rx.set_desc(ram, 0, desc(BUFFERS + 0x100, 4096, WRITE))
        rx.set_desc(ram, 1, desc(BUFFERS + 0x1100, 44, WRITE))
        rx.offer(ram, [0, 1])

    def many(ram, tx, rx):
        # Request, data split over descriptors, a forged CID, a non-stream packet, shutdown.
        packets = [
            vsock_header(0, OP_REQUEST),
            vsock_header(6) + b"abcdef",
            vsock_header(0, src_cid=HOST_CID),
            vsock_header(0, type_=2),
            vsock_header(0, OP_SHUTDOWN),
        ]
        heads = []
        index = 0
        for n, pkt in enumerate(packets):
            addr = BUFFERS + 0x80 * n
            place(ram, addr, pkt)
            heads.append(index)
            if len(pkt) > 44:
                tx.set_desc(ram, index, desc(addr, 20, NEXT, index + 1))
                tx.set_desc(ram, index + 1, desc(addr + 20, len(pkt) - 20))
                index += 2
            else:
                tx.set_desc(ram, index, desc(addr, len(pkt)))
                index += 1
        tx.offer(ram, heads)
        rx.set_desc(ram, 0, desc(BUFFERS + 0x400, 20, NEXT | WRITE, 1))
        rx.set_desc(ram, 1, desc(BUFFERS + 0x500, 200, WRITE))
        rx.offer(ram, [0])
        tx.set_used_event(ram, 2)
        rx.set_used_event(ram, 0)

    def hostile(ram, tx, rx):
        # A loop, a head past the queue, a buffer outside memory, an indirect table.
        place(ram, BUFFERS, vsock_header(1000))
        tx.set_desc(ram, 0, desc(BUFFERS, 44, NEXT, 1))
        tx.set_desc(ram, 1, desc(BUFFERS, 44, NEXT, 0))
        tx.set_desc(ram, 2, desc(0x3_0000, 44))
        place(ram, BUFFERS + 0x100, desc(BUFFERS + 0x200, 44, NEXT, 1) + desc(BUFFERS + 0x200, 0))
        place(ram, BUFFERS + 0x200, vsock_header(0, OP_RST))
        tx.set_desc(ram, 3, desc(BUFFERS + 0x100, 32, INDIRECT))
        tx.offer(ram, [0, 40, 2, 3])
        rx.set_desc(ram, 0, desc(2**64 - 8, 4096, WRITE))
        rx.set_desc(ram, 1, desc(BUFFERS, 4096))
        rx.offer(ram, [0, 1, 7])

    def corrupt_index(ram, tx, rx):
        # Available indices beyond the queue size on both queues.
        tx.offer(ram, [], idx=tx.size + 1)
        rx.offer(ram, [], idx=0xFFFF)

    seeds = {
        "good": queue_seed(0, 4, 4, 1, [(OP_RW, 9)], good),
        "many_event_idx": queue_seed(1, 4, 2, 2, [(OP_RESPONSE, 0), (OP_RW, 65535)], many),
        "hostile": queue_seed(0, 2, 1, 0x80 | 1, [(OP_RW, 100)], hostile),
        "corrupt_index": queue_seed(0, 4, 4, 0x80, [], corrupt_index),
        "queue_256": queue_seed(1, 8, 8, 1, [(OP_RW, 9)], good),
    }
    for name, seed in seeds.items():
        write("virtio_queue", name, seed)


# ---- vsock_muxer: operations on one muxer, as fuzz_targets/vsock_muxer.rs reads them ----

# Indices into the target's port tables.
SERVICE, SERVICE_2, NO_SERVICE, FIRST_LOCAL = 0, 1, 2, 3
GUEST_PORT, GUEST_PORT_2 = 0, 1


def mux_packet(op, guest=GUEST_PORT, host=SERVICE, flags=0, buf_alloc=64 * 1024, fwd_cnt=0,
               length=0, fill=0):
    return struct.pack("<BBBBBIIHB", 0, op, guest, host, flags, buf_alloc, fwd_cnt, length, fill)


def mux_take(size=4096):
    return struct.pack("<BH", 1, size)


MUX_READY, MUX_ACCEPT, MUX_RESET = bytes([2]), bytes([3]), bytes([9])


def mux_service_write(index, length, fill=0x41):
    return struct.pack("<BBHB", 4, index, length, fill)


def mux_service_close(index):
    return struct.pack("<BB", 5, index)


def mux_client(kind=0, guest=GUEST_PORT):
    return struct.pack("<BBB", 6, kind, guest)


def mux_client_write(index, length, fill=0x42):
    return struct.pack("<BBHB", 7, index, length, fill)


def mux_client_close(index):
    return struct.pack("<BB", 8, index)


def vsock_muxer():
    timeout = bytes([0])
    seeds = {
        # The guest connects to a service, both sides write, the service closes, the guest
        # shuts down and resets.
        "guest_connection": [
            mux_packet(OP_REQUEST),
            MUX_ACCEPT,
            mux_take(),
            mux_packet(OP_RW, length=100, fill=0x61),
            mux_service_write(0, 200),
            MUX_READY,
            mux_take(64),
            mux_take(),
            mux_packet(OP_CREDIT_UPDATE, fwd_cnt=200),
            mux_packet(OP_CREDIT_REQUEST),
            mux_take(),
            mux_service_close(0),
            MUX_READY,
            mux_take(),
            mux_packet(OP_SHUTDOWN, flags=SHUTDOWN_RCV | SHUTDOWN_SEND),
            mux_take(),
            mux_packet(OP_RST),
        ],
        # A host client dials the guest, which accepts; data both ways; the client leaves.
        "host_connection": [
            mux_client(0, GUEST_PORT),
            MUX_READY,
            mux_take(),
            mux_packet(OP_RESPONSE, host=FIRST_LOCAL),
            mux_client_write(0, 300),
            MUX_READY,
            mux_take(),
            mux_packet(OP_RW, host=FIRST_LOCAL, length=50, fill=0x62),
            mux_client_close(0),
            MUX_READY,
            mux_take(),
            mux_take(),
        ],
        # Bad CONNECT lines, a line cut short, an over-long one.
        "bad_clients": [mux_client(k) for k in (1, 2, 3)] + [MUX_READY, mux_take()],
        # Requests and resets in a loop, the guest never taking a packet.
        "request_reset_loop": [
            mux_packet(OP_REQUEST) + MUX_ACCEPT + mux_packet(OP_RST) for _ in range(100)
        ] + [mux_packet(OP_REQUEST), mux_packet(OP_REQUEST)],
        # A request to a port nobody serves, packets for connections that do not exist, unknown
        # operations.
        "refused": [
            mux_packet(OP_REQUEST, host=NO_SERVICE),
            mux_packet(OP_RW, guest=GUEST_PORT_2, length=10),
            mux_packet(0),
            mux_packet(8),
            mux_take(),
            mux_take(0),
        ],
        # More guest data than the credit granted: the connection is reset.
        "credit_violation": [mux_packet(OP_REQUEST), MUX_ACCEPT]
        + [mux_packet(OP_RW, length=0xFFFF, fill=0x63) for _ in range(6)]
        + [mux_take()],
        # The driver resets the device with connections of both kinds open.
        "reset": [
            mux_packet(OP_REQUEST),
            mux_client(0),
            MUX_READY,
            mux_packet(OP_RW, length=10),
            MUX_RESET,
            mux_packet(OP_REQUEST),
            mux_take(),
        ],
    }
    for name, ops in seeds.items():
        write("vsock_muxer", name, timeout + b"".join(ops))


# ---- api_request: the daemon's HTTP requests as the fuzz target reads them: a byte choosing the
# method (index into GET, POST, DELETE, PUT, PATCH), the target (path and query), a zero byte,
# the body ----

METHODS = {"GET": 0, "POST": 1, "DELETE": 2, "PUT": 3, "PATCH": 4}


def http_request(method, target, body=b""):
    if not isinstance(body, bytes):
        body = json.dumps(body).encode() if not isinstance(body, str) else body.encode()
    return bytes([METHODS[method]]) + target.encode() + b"\0" + body


def api_request():
    seeds = {
        "version": ("GET", "/version", b""),
        "spawn": (
            "POST",
            "/agents",
            {
                "name": "summarizer",
                "model": "minilm",
                "vcpus": 2,
                "memory_mib": 512,
                "cpus": 1.5,
                "cpuset": "0-1",
                "weight": 200,
                "class": "interactive",
                "restart": "always",
                "boot_timeout_s": 120,
                "wait": True,
            },
        ),
        "spawn_defaults": ("POST", "/agents", {"name": "w", "class": None, "restart": "never"}),
        "spawn_from": ("POST", "/agents", {"name": "w", "from": "/var/snap/w", "devices": ["vfio:0000:00:01.0"]}),
        "ps": ("GET", "/agents", b""),
        "exec": (
            "POST",
            "/agents/w/exec",
            {
                "run": {
                    "program": "/bin/sh",
                    "args": ["-c", "cat; echo $K"],
                    "env": {"K": "V", "LANG": "C.UTF-8"},
                    "cwd": "/tmp",
                    "timeout_ms": 30000,
                },
                "stdin": "line one\nline \u00e9\n",
            },
        ),
        "infer": (
            "POST",
            "/agents/w/infer",
            {
                "model": "sentiment",
                "task": "classify",
                "inputs": ["I love this", "meh"],
                "options": {"top_k": 2, "sentences": 3},
            },
        ),
        "infer_summarize": ("POST", "/agents/w/infer", {"task": "summarize", "inputs": ["A cat. A mat."]}),
        "logs": ("GET", "/agents/w/logs?offset=5120", b""),
        "stop": ("POST", "/agents/w/stop", b""),
        "rm": ("DELETE", "/agents/w?force=true", b""),
        "snapshot": ("POST", "/agents/w/snapshot", {"to": "/var/snap/w"}),
        "metrics": ("GET", "/metrics", b""),
        "group_up": (
            "POST",
            "/groups",
            {
                "file": "digest.toml",
                "text": (FUZZ.parent / "examples" / "digest.toml").read_text(),
                "wait": True,
            },
        ),
        "group_down": ("DELETE", "/groups/digest", b""),
        "group_input": ("POST", "/groups/digest/input", {"text": "The cat is on the mat.", "timeout_s": 60}),
        "pool_create": ("POST", "/pools", {"name": "warm", "from": "/var/snap/w", "size": 4}),
        "pool_rm": ("DELETE", "/pools/warm", b""),
        "escaped_name": ("DELETE", "/agents/..%2F..%2Fetc", b""),
        "not_json": ("POST", "/agents", "not json"),
        "empty_body": ("POST", "/agents", b""),
        "unknown_path": ("POST", "/agents/w/launch", {}),
        "wrong_method": ("PUT", "/agents", {}),
        "name_twice": ("POST", "/agents/w/exec", {"name": "v", "run": {"program": "p"}}),
        "unknown_field": ("POST", "/agents", {"name": "w", "memroy_mib": 256}),
        "unknown_query": ("GET", "/agents/w/logs?ofset=1", b""),
        "missing_field": ("POST", "/agents/w/exec", {}),
        "wrong_types": ("POST", "/agents", {"name": 7, "vcpus": "two"}),
        "bad_query": ("DELETE", "/agents/w?force=yes", b""),
        "huge_timeout": ("POST", "/agents/w/exec", {"run": {"program": "p", "timeout_ms": 18446744073709551615}}),
        # A name with an escaped line break, which the error message quotes decoded.
        "escaped_newline": ("POST", "/agents/w%0Ax/stop", b""),
        "bad_escape": ("GET", "/agents/%ff/logs", b""),
    }
    for name, (method, target, body) in seeds.items():
        write("api_request", name, http_request(method, target, body))


# virtio_block: the layout of vsock_packet; a request header at DATA, its buffers after it.
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8


def block_header(type_, sector):
    return struct.pack("<IIQ", type_, 0, sector)


def virtio_block():
    data, status = DATA + 0x100, DATA + 0x1000

    def request(type_, sector, data_len, extra=b""):
        descs = [desc(DATA, 16, NEXT, 1)]
        if data_len:
            descs.append(desc(data, data_len, NEXT | WRITE, 2))
        descs.append(desc(status, 1, WRITE))
        return vsock_packet_seed(4, 0, descs, block_header(type_, sector) + extra)

    seeds = {
        "read": request(T_IN, 1, 1024),
        "read_last_sector": request(T_IN, 127, 512),
        "read_past_the_end": request(T_IN, 127, 1024),
        "read_partial_sector": request(T_IN, 0, 100),
        "read_huge_sector": request(T_IN, 2**64 - 1, 512),
        "get_id": request(T_GET_ID, 0, 20),
        "flush": request(T_FLUSH, 0, 0),
        "write": vsock_packet_seed(
            4,
            0,
            [desc(DATA, 16, NEXT, 1), desc(data, 512, NEXT, 2), desc(status, 1, WRITE)],
            block_header(T_OUT, 0),
        ),
        "discard": request(11, 0, 16),
        # No writable byte for the status; a header split over two descriptors.
        "no_status": vsock_packet_seed(4, 0, [desc(DATA, 16)], block_header(T_IN, 0)),
        "split_header": vsock_packet_seed(
            4,
            0,
            [desc(DATA, 6, NEXT, 1), desc(DATA + 6, 10, NEXT, 2), desc(status, 1, WRITE)],
            block_header(T_FLUSH, 0),
        ),
        # A data buffer outside memory, a loop, an indirect table.
        "outside_memory": vsock_packet_seed(
            4,
            0,
            [desc(DATA, 16, NEXT, 1), desc(2**64 - 10, 512, NEXT | WRITE, 2), desc(status, 1, WRITE)],
            block_header(T_IN, 0),
        ),
        "loop": vsock_packet_seed(
            4, 0, [desc(DATA, 16, NEXT, 1), desc(DATA, 16, NEXT, 0)], block_header(T_IN, 0)
        ),
        "indirect": vsock_packet_seed(4, 0, [desc(DATA + 0x200, 48, INDIRECT)], block_header(T_IN, 0)),
    }
    for name, data_bytes in seeds.items():
        write("virtio_block", name, data_bytes)


# virtio_pmem: the layout of vsock_packet; a request word at DATA, the answer after it.
def virtio_pmem():
    answer = DATA + 0x100

    def request(type_, answer_len):
        descs = [desc(DATA, 4, NEXT, 1), desc(answer, answer_len, WRITE)]
        return vsock_packet_seed(4, 0, descs, struct.pack("<I", type_))

    seeds = {
        "flush": request(0, 4),
        "unknown_type": request(9, 4),
        "short_answer": request(0, 2),
        "no_answer": vsock_packet_seed(4, 0, [desc(DATA, 4)], struct.pack("<I", 0)),
        "short_request": vsock_packet_seed(
            4, 0, [desc(DATA, 2, NEXT, 1), desc(answer, 4, WRITE)], struct.pack("<I", 0)
        ),
        "answer_outside_memory": vsock_packet_seed(
            4, 0, [desc(DATA, 4, NEXT, 1), desc(2**64 - 2, 4, WRITE)], struct.pack("<I", 0)
        ),
        "loop": vsock_packet_seed(4, 0, [desc(DATA, 4, NEXT, 1), desc(DATA, 4, NEXT, 0)], b""),
        "indirect": vsock_packet_seed(4, 0, [desc(DATA + 0x200, 48, INDIRECT)], b""),
    }
    for name, data_bytes in seeds.items():
        write("virtio_pmem", name, data_bytes)


if __name__ == "__main__":
    protocol_frames()
    group_file()
    vsock_packet()
    virtio_queue()
    virtio_block()
    virtio_pmem()
    vsock_muxer()
    api_request()
