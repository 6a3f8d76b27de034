//! E2B's API on the daemon, spoken on the wire as E2B's SDKs speak it (the SDK itself runs on the
//! host, see scripts/test-e2b-sdk): sandboxes created with metadata, listed, given time, timed
//! out and killed; processes started and streamed as Connect envelopes, fed, listed, signalled;
//! files in and out whole, as multipart parts and as the body; two sandboxes apart; bad keys and
//! unknown sandboxes refused in E2B's shapes.

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use agentos::daemon::client::raw;
use serde_json::{Value, json};

use crate::common::{Scratch, take_machine, vm_available};
use crate::daemon::Daemon;

/// A client of the daemon's E2B API on TCP, with the API's token as the API key.
struct E2b {
    address: String,
    key: String,
}

/// An in-sandbox request's sandbox, as the SDK names it.
struct Sandbox<'a> {
    e2b: &'a E2b,
    id: String,
    token: String,
}

impl E2b {
    fn send(&self, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> TcpStream {
        let mut stream = self.send_head(method, target, headers, body.len() as u64);
        stream.write_all(body).unwrap();
        stream
    }

    /// A request's head alone, declaring a body of `len` bytes.
    fn send_head(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        len: u64,
    ) -> TcpStream {
        let mut stream = TcpStream::connect(&self.address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let mut head = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nContent-Length: {len}\r\n",
            self.address
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        stream
    }

    fn call(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> raw::Reply {
        let stream = self.send(method, target, headers, body);
        raw::read_reply(&mut BufReader::new(stream)).unwrap()
    }

    /// A control-plane call with the API key.
    fn control(&self, method: &str, target: &str, body: Value) -> raw::Reply {
        let body = if body.is_null() {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        self.call(
            method,
            target,
            &[
                ("X-API-KEY", &self.key),
                ("Content-Type", "application/json"),
            ],
            &body,
        )
    }

    fn create(&self, metadata: Value) -> Sandbox<'_> {
        let reply = self.control(
            "POST",
            "/v2/sandboxes",
            json!({"templateID": "base", "metadata": metadata, "envVars": {"FROM_CREATE": "yes"}}),
        );
        assert_eq!(reply.status, 201, "{reply:?}");
        let created = reply.json();
        for field in [
            "templateID",
            "sandboxID",
            "clientID",
            "envdVersion",
            "envdAccessToken",
        ] {
            assert!(created[field].is_string(), "no {field} in {created}");
        }
        let id = created["sandboxID"].as_str().unwrap().to_owned();
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "{id}"
        );
        Sandbox {
            e2b: self,
            id,
            token: created["envdAccessToken"].as_str().unwrap().to_owned(),
        }
    }
}

/// The messages of a Connect stream: each envelope's flags and JSON.
fn envelopes(mut body: &[u8]) -> Vec<(u8, Value)> {
    let mut out = Vec::new();
    while body.len() >= 5 {
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        out.push((body[0], serde_json::from_slice(&body[5..5 + len]).unwrap()));
        body = &body[5 + len..];
    }
    assert!(body.is_empty(), "bytes past the last envelope");
    out
}

/// A repeated field of a message: protobuf's JSON form leaves out an empty one.
fn repeated<'a>(message: &'a Value, field: &str) -> &'a [Value] {
    match message.get(field) {
        None => &[],
        Some(values) => values
            .as_array()
            .unwrap_or_else(|| panic!("`{field}` is no list: {message}")),
    }
}

/// An `end` event's exit code: protobuf's JSON form leaves out a 0, as every default value.
fn exit_code(end: &Value) -> i64 {
    match end.get("exitCode") {
        None => 0,
        Some(code) => code.as_i64().unwrap_or_else(|| panic!("exitCode {code}")),
    }
}

fn envelope(message: &Value) -> Vec<u8> {
    let text = message.to_string();
    let mut out = vec![0];
    out.extend_from_slice(&(text.len() as u32).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
    out
}

/// What a finished process printed, and its end event.
struct Ran {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    end: Value,
}

impl Sandbox<'_> {
    fn headers<'h>(&'h self, extra: &[(&'h str, &'h str)]) -> Vec<(&'h str, &'h str)> {
        let mut headers = vec![
            ("E2b-Sandbox-Id", self.id.as_str()),
            ("E2b-Sandbox-Port", "49983"),
            ("X-Access-Token", self.token.as_str()),
        ];
        headers.extend_from_slice(extra);
        headers
    }

    /// A unary RPC.
    fn rpc(&self, method: &str, message: Value) -> raw::Reply {
        self.e2b.call(
            "POST",
            &format!("/{method}"),
            &self.headers(&[
                ("Content-Type", "application/json"),
                ("Connect-Protocol-Version", "1"),
            ]),
            message.to_string().as_bytes(),
        )
    }

    fn ok(&self, method: &str, message: Value) -> Value {
        let reply = self.rpc(method, message);
        assert_eq!(reply.status, 200, "{method}: {reply:?}");
        reply.json()
    }

    /// Starts a process (with a timeout, as the SDK's default) and reads its stream to the end.
    fn run(&self, process: Value) -> Ran {
        let stream = self.e2b.send(
            "POST",
            "/process.Process/Start",
            &self.headers(&[
                ("Content-Type", "application/connect+json"),
                ("Connect-Timeout-Ms", "60000"),
            ]),
            &envelope(&json!({"process": process, "stdin": false})),
        );
        let reply = raw::read_reply(&mut BufReader::new(stream)).unwrap();
        assert_eq!(
            (reply.status, reply.content_type.as_str()),
            (200, "application/connect+json"),
            "{reply:?}"
        );
        let messages = envelopes(&reply.body);
        assert!(
            messages[0].1["event"]["start"]["pid"].as_u64().is_some(),
            "{messages:?}"
        );
        let mut ran = Ran {
            stdout: Vec::new(),
            stderr: Vec::new(),
            end: Value::Null,
        };
        for (flags, message) in &messages[1..] {
            let event = &message["event"];
            if let Some(data) = event["data"]["stdout"].as_str() {
                ran.stdout.extend(base64(data));
            } else if let Some(data) = event["data"]["stderr"].as_str() {
                ran.stderr.extend(base64(data));
            } else if event.get("end").is_some() {
                ran.end = event["end"].clone();
            } else {
                assert_eq!((*flags, message), (2, &json!({})), "{messages:?}");
            }
        }
        assert_eq!(
            messages.last().unwrap().0,
            2,
            "no end of stream: {messages:?}"
        );
        ran
    }

    fn sh(&self, script: &str) -> String {
        let ran = self.run(json!({"cmd": "/bin/sh", "args": ["-c", script]}));
        assert_eq!(
            exit_code(&ran.end),
            0,
            "{script}: {}",
            String::from_utf8_lossy(&ran.stderr)
        );
        String::from_utf8(ran.stdout).unwrap()
    }

    fn pids(&self) -> Vec<u64> {
        repeated(&self.ok("process.Process/List", json!({})), "processes")
            .iter()
            .map(|p| p["pid"].as_u64().unwrap())
            .collect()
    }

    /// Starts a process and leaves once it started, its stream still open.
    fn start_and_hold(&self, script: &str, timeout: Option<&str>) -> (TcpStream, u64) {
        let mut headers = self.headers(&[("Content-Type", "application/connect+json")]);
        if let Some(ms) = timeout {
            headers.push(("Connect-Timeout-Ms", ms));
        }
        let mut stream = self.e2b.send(
            "POST",
            "/process.Process/Start",
            &headers,
            &envelope(&json!({"process": {"cmd": "/bin/sh", "args": ["-c", script]}})),
        );
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let pid = loop {
            let n = stream.read(&mut buf).unwrap();
            assert!(
                n > 0,
                "the stream ended before its start: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&seen);
            if let Some(at) = text.find("{\"event\":{\"start\":{\"pid\":") {
                let rest = &text[at + 25..];
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                if !rest[digits.len()..].is_empty() {
                    break digits.parse().unwrap();
                }
            }
        };
        (stream, pid)
    }
}

/// Reads `stream` until what came holds `needle`; what came.
fn read_until(stream: &mut TcpStream, seen: &mut Vec<u8>, needle: &str) {
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(seen).contains(needle) {
        let n = stream.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "the stream ended without {needle}: {}",
            String::from_utf8_lossy(seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
}

fn base64(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

fn sha256_hex(bytes: &[u8]) -> String {
    crate::daemon::sha256_hex(bytes)
}

fn wait_for(limit: Duration, what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "waited {} s for {what}",
            limit.as_secs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn sandboxes_of_e2b_s_api_run_commands_and_keep_files_apart() {
    if !vm_available() {
        return;
    }
    let _machine = take_machine();
    let t = Scratch::new("e2b");
    let d = Daemon::start_with(&t, &["--listen", "127.0.0.1:0"]);
    let (address, key) = d.tcp_site();
    let e2b = E2b { address, key };

    // Keys: none or a wrong one is 401 in E2B's shape.
    for wrong in [vec![], vec![("X-API-KEY", "nope")]] {
        let reply = e2b.call("GET", "/v2/sandboxes", &wrong, b"");
        assert_eq!(reply.status, 401, "{reply:?}");
        assert_eq!(reply.json()["code"], 401, "{reply:?}");
        assert!(reply.json()["message"].is_string());
    }
    let one = e2b.create(json!({"owner": "test", "n": "1"}));
    let two = e2b.create(json!({"owner": "test", "n": "2"}));

    // Commands: output on both streams, the exit code, as the default user in its home.
    let ran = one.run(
        json!({"cmd": "/bin/sh", "args": ["-c", "echo hi; echo oops >&2; id -u; pwd; exit 3"]}),
    );
    assert_eq!(
        String::from_utf8_lossy(&ran.stdout),
        "hi\n1000\n/home/user\n"
    );
    assert_eq!(String::from_utf8_lossy(&ran.stderr), "oops\n");
    assert_eq!(
        (&ran.end["exitCode"], &ran.end["error"]),
        (&json!(3), &json!("exit status 3"))
    );
    // The environment of the sandbox and of the command; a directory relative to home.
    one.ok("filesystem.Filesystem/MakeDir", json!({"path": "work"}));
    let ran = one.run(json!({
        "cmd": "/bin/sh", "args": ["-c", "pwd; echo $FOO $FROM_CREATE"],
        "envs": {"FOO": "bar"}, "cwd": "work"
    }));
    assert_eq!(
        String::from_utf8_lossy(&ran.stdout),
        "/home/user/work\nbar yes\n"
    );
    // As root, named as the SDK names a user.
    let root = one.e2b.call(
        "POST",
        "/process.Process/Start",
        &one.headers(&[
            ("Content-Type", "application/connect+json"),
            ("Authorization", "Basic cm9vdDo="),
        ]),
        &envelope(&json!({"process": {"cmd": "/bin/sh", "args": ["-c", "id -u"]}})),
    );
    let events = envelopes(&root.body);
    assert_eq!(events[1].1["event"]["data"]["stdout"], "MAo=", "{events:?}");

    // Standard input, fed and closed by process id from other requests.
    let (held, pid) = one.start_and_hold("read line; echo got $line; sleep 60", None);
    drop(held);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        one.pids().contains(&pid),
        "a process without a timeout runs on without its stream"
    );
    let (stdin_stream, cat) = {
        let mut headers = one.headers(&[("Content-Type", "application/connect+json")]);
        headers.push(("Connect-Timeout-Ms", "60000"));
        let stream = e2b.send(
            "POST",
            "/process.Process/Start",
            &headers,
            &envelope(&json!({"process": {"cmd": "/bin/cat"}, "stdin": true, "tag": "cat"})),
        );
        std::thread::sleep(Duration::from_secs(2));
        let listed = one.ok("process.Process/List", json!({}));
        let cat = listed["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["tag"] == "cat")
            .unwrap_or_else(|| panic!("no tagged process in {listed}"))["pid"]
            .as_u64()
            .unwrap();
        (stream, cat)
    };
    one.ok(
        "process.Process/SendInput",
        json!({"process": {"pid": cat}, "input": {"stdin": "aGVsbG8K"}}),
    );
    one.ok(
        "process.Process/CloseStdin",
        json!({"process": {"tag": "cat"}}),
    );
    let reply = raw::read_reply(&mut BufReader::new(stdin_stream)).unwrap();
    let events = envelopes(&reply.body);
    assert_eq!(
        events[1].1["event"]["data"]["stdout"], "aGVsbG8K",
        "{events:?}"
    );
    assert_eq!(exit_code(&events[2].1["event"]["end"]), 0, "{events:?}");
    // A signal ends the one left running.
    one.ok(
        "process.Process/SendSignal",
        json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
    );
    wait_for(Duration::from_secs(10), "the killed process to go", || {
        !one.pids().contains(&pid)
    });
    // A command with a timeout ends when its client goes.
    let (held, pid) = one.start_and_hold("sleep 60", Some("60000"));
    assert!(one.pids().contains(&pid));
    drop(held);
    wait_for(
        Duration::from_secs(10),
        "the abandoned command to end",
        || !one.pids().contains(&pid),
    );
    let reply = one.rpc(
        "process.Process/SendSignal",
        json!({"process": {"pid": 999_999}, "signal": "SIGNAL_SIGKILL"}),
    );
    assert_eq!(reply.status, 404, "{reply:?}");
    assert_eq!(reply.json()["code"], "not_found", "{reply:?}");
    let reply = e2b.call(
        "POST",
        "/process.Process/Connect",
        &one.headers(&[("Content-Type", "application/connect+json")]),
        &envelope(&json!({"process": {"pid": 999_999}})),
    );
    assert_eq!(
        (reply.status, reply.json()["code"].clone()),
        (404, json!("not_found")),
        "{reply:?}"
    );

    // Files: 3 MiB of every byte value in as the body, out whole; two as multipart parts.
    let blob: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let reply = e2b.call(
        "POST",
        "/files?path=data%2Fblob",
        &one.headers(&[("Content-Type", "application/octet-stream")]),
        &blob,
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.json(),
        json!([{"name": "blob", "type": "file", "path": "/home/user/data/blob"}])
    );
    // What the default user writes and makes is the user's own.
    assert_eq!(
        one.sh("stat -c %u data data/blob work"),
        "1000\n1000\n1000\n"
    );
    assert_eq!(
        one.sh("sha256sum data/blob | cut -d' ' -f1"),
        format!("{}\n", sha256_hex(&blob))
    );
    let back = e2b.call(
        "GET",
        "/files?path=%2Fhome%2Fuser%2Fdata%2Fblob",
        &one.headers(&[]),
        b"",
    );
    assert_eq!(back.status, 200);
    assert!(back.body == blob, "the file came back different");
    let boundary = "b0undary";
    let mut form = Vec::new();
    for (name, content) in [
        ("/home/user/a.txt", &b"first\n"[..]),
        ("b.bin", &[0u8, 255, 1][..]),
    ] {
        form.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
        );
        form.extend_from_slice(content);
        form.extend_from_slice(b"\r\n");
    }
    form.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let content_type = format!("multipart/form-data; boundary={boundary}");
    let reply = e2b.call(
        "POST",
        "/files",
        &one.headers(&[("Content-Type", &content_type)]),
        &form,
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()[1]["path"], "/home/user/b.bin");
    assert_eq!(
        one.sh("cat a.txt; od -An -tu1 b.bin | tr -s ' '"),
        "first\n 0 255 1\n"
    );

    // Looking at and changing files.
    let stat = one.ok("filesystem.Filesystem/Stat", json!({"path": "data/blob"}));
    assert_eq!(
        (
            &stat["entry"]["type"],
            &stat["entry"]["size"],
            &stat["entry"]["path"]
        ),
        (
            &json!("FILE_TYPE_FILE"),
            &json!((3u64 << 20).to_string()),
            &json!("/home/user/data/blob")
        ),
        "{stat}"
    );
    let listed = one.ok(
        "filesystem.Filesystem/ListDir",
        json!({"path": "/home/user", "depth": 2}),
    );
    let names: Vec<&str> = listed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    for want in [
        "/home/user/data",
        "/home/user/data/blob",
        "/home/user/work",
        "/home/user/a.txt",
    ] {
        assert!(names.contains(&want), "{want} not in {names:?}");
    }
    let again = one.rpc("filesystem.Filesystem/MakeDir", json!({"path": "work"}));
    assert_eq!(
        (again.status, again.json()["code"].clone()),
        (409, json!("already_exists"))
    );
    let moved = one.ok(
        "filesystem.Filesystem/Move",
        json!({"source": "a.txt", "destination": "work/a.txt"}),
    );
    assert_eq!(moved["entry"]["path"], "/home/user/work/a.txt");
    one.ok("filesystem.Filesystem/Remove", json!({"path": "work"}));
    let gone = one.rpc("filesystem.Filesystem/Stat", json!({"path": "work/a.txt"}));
    assert_eq!(
        (gone.status, gone.json()["code"].clone()),
        (404, json!("not_found"))
    );
    let missing = e2b.call("GET", "/files?path=nothing", &one.headers(&[]), b"");
    assert_eq!(
        (missing.status, missing.json()["code"].clone()),
        (404, json!(404))
    );
    // An upload larger than the sandbox's memory is refused before a byte of it is read.
    let huge = e2b.send_head(
        "POST",
        "/files?path=huge.bin",
        &one.headers(&[("Content-Type", "application/octet-stream")]),
        64 << 30,
    );
    let refused = raw::read_reply(&mut BufReader::new(huge)).unwrap();
    assert_eq!(
        (refused.status, refused.json()["code"].clone()),
        (413, json!(413)),
        "{refused:?}"
    );
    let absent = one.rpc("filesystem.Filesystem/Stat", json!({"path": "huge.bin"}));
    assert_eq!(absent.status, 404, "nothing was written: {absent:?}");

    // A streamed watch: its start, keep-alives while nothing happens, then the change.
    one.ok("filesystem.Filesystem/MakeDir", json!({"path": "watched"}));
    let mut watch = e2b.send(
        "POST",
        "/filesystem.Filesystem/WatchDir",
        &one.headers(&[
            ("Content-Type", "application/connect+json"),
            ("Keepalive-Ping-Interval", "1"),
        ]),
        &envelope(&json!({"path": "watched", "recursive": false})),
    );
    let mut seen = Vec::new();
    // A `WatchDirResponse`'s oneof is inlined, as protobuf's JSON form has it.
    read_until(&mut watch, &mut seen, r#"{"start":{}}"#);
    read_until(&mut watch, &mut seen, r#"{"keepalive":{}}"#);
    one.sh("touch watched/streamed.txt");
    read_until(
        &mut watch,
        &mut seen,
        r#"{"filesystem":{"name":"streamed.txt","type":"EVENT_TYPE_CREATE"}}"#,
    );
    drop(watch);

    // A polled watcher sees a file made after it began, until it is removed.
    let watcher = one.ok(
        "filesystem.Filesystem/CreateWatcher",
        json!({"path": "watched", "recursive": true}),
    )["watcherId"]
        .as_str()
        .unwrap()
        .to_owned();
    one.sh("echo x > watched/new.txt");
    let poll = json!({"watcherId": watcher});
    wait_for(Duration::from_secs(10), "the watcher's event", || {
        repeated(
            &one.ok("filesystem.Filesystem/GetWatcherEvents", poll.clone()),
            "events",
        )
        .iter()
        .any(|e| e["name"] == "new.txt" && e["type"] == "EVENT_TYPE_CREATE")
    });
    one.ok("filesystem.Filesystem/RemoveWatcher", poll.clone());
    let gone = one.rpc("filesystem.Filesystem/GetWatcherEvents", poll);
    assert_eq!(gone.status, 404, "{gone:?}");

    // Two sandboxes do not see each other's files; a sandbox's token opens only its own.
    let other = two.rpc(
        "filesystem.Filesystem/Stat",
        json!({"path": "/home/user/data/blob"}),
    );
    assert_eq!(other.status, 404, "{other:?}");
    let crossed = e2b.call(
        "GET",
        "/files?path=data%2Fblob",
        &[
            ("E2b-Sandbox-Id", one.id.as_str()),
            ("X-Access-Token", two.token.as_str()),
        ],
        b"",
    );
    assert_eq!(crossed.status, 401, "{crossed:?}");

    // The control plane: details, listing by metadata and pages, time given and run out, kill.
    let info = e2b
        .control("GET", &format!("/sandboxes/{}", one.id), Value::Null)
        .json();
    assert_eq!(
        (&info["state"], &info["metadata"]["n"]),
        (&json!("running"), &json!("1")),
        "{info}"
    );
    for field in [
        "startedAt",
        "endAt",
        "cpuCount",
        "memoryMB",
        "diskSizeMB",
        "envdVersion",
    ] {
        assert!(!info[field].is_null(), "no {field} in {info}");
    }
    let listed = e2b
        .control("GET", "/v2/sandboxes?metadata=n%3D2", Value::Null)
        .json();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["sandboxID"], two.id.as_str());
    let page = e2b.control(
        "GET",
        "/v2/sandboxes?metadata=owner%3Dtest&limit=1",
        Value::Null,
    );
    assert_eq!(page.json().as_array().unwrap().len(), 1);
    let health = e2b.call("GET", "/health", &two.headers(&[]), b"");
    assert_eq!(health.status, 204, "{health:?}");
    // Paused: saved to disk (its VM gone), not timing out, answering nothing inside until
    // connected to again, then restored with its files and its running programs.
    two.sh("echo before > kept.txt");
    let (held, sleeper) = two.start_and_hold("sleep 600", None);
    drop(held);
    let pause = format!("/sandboxes/{}/pause", two.id);
    assert_eq!(e2b.control("POST", &pause, json!({})).status, 204);
    assert_eq!(d.agent(&two.id)["state"], "stopped", "its VM ended");
    assert_eq!(
        e2b.control("POST", &pause, json!({})).status,
        409,
        "paused already"
    );
    let info = e2b
        .control("GET", &format!("/sandboxes/{}", two.id), Value::Null)
        .json();
    assert_eq!(info["state"], "paused", "{info}");
    assert_eq!(
        e2b.call("GET", "/health", &two.headers(&[]), b"").status,
        502
    );
    let refused = two.rpc("process.Process/List", json!({}));
    assert_eq!(refused.json()["code"], "unavailable", "{refused:?}");
    let resumed = e2b.control(
        "POST",
        &format!("/v2/sandboxes/{}/connect", two.id),
        json!({"timeout": 60}),
    );
    assert_eq!(resumed.status, 201, "{resumed:?}");
    assert_eq!(two.sh("echo up; cat kept.txt"), "up\nbefore\n");
    assert!(
        two.pids().contains(&sleeper),
        "a program running when it was paused runs on"
    );
    // Saved again from the restored VM (into a directory of its own), and back once more.
    assert_eq!(e2b.control("POST", &pause, json!({})).status, 204);
    let again = e2b.control(
        "POST",
        &format!("/sandboxes/{}/resume", two.id),
        json!({"timeout": 60}),
    );
    assert_eq!(again.status, 201, "{again:?}");
    assert_eq!(two.sh("cat kept.txt"), "before\n");
    let reply = e2b.control(
        "POST",
        &format!("/sandboxes/{}/timeout", two.id),
        json!({"timeout": 2}),
    );
    assert_eq!(reply.status, 204, "{reply:?}");
    wait_for(Duration::from_secs(30), "the sandbox to time out", || {
        e2b.control("GET", &format!("/sandboxes/{}", two.id), Value::Null)
            .status
            == 404
    });
    wait_for(Duration::from_secs(30), "its agent to go", || {
        !d.ok(&["ps", "--json"]).contains(&two.id)
    });
    let health = e2b.call("GET", "/health", &two.headers(&[]), b"");
    assert_eq!(health.status, 502, "{health:?}");
    let reply = e2b.control("DELETE", &format!("/sandboxes/{}", one.id), Value::Null);
    assert_eq!(reply.status, 204, "{reply:?}");
    let reply = e2b.control("DELETE", &format!("/sandboxes/{}", one.id), Value::Null);
    assert_eq!(
        (reply.status, reply.json()["code"].clone()),
        (404, json!(404))
    );
    let reply = one.rpc("process.Process/List", json!({}));
    assert_eq!(
        (reply.status, reply.json()["code"].clone()),
        (404, json!("not_found"))
    );
    assert!(!d.ok(&["ps", "--json"]).contains(&one.id));
}
