//! The server driven over a socket pair, as a host would drive it over vsock.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use agentos_protocol::{
    ExecRequest, ExitStatus, FrameReader, GuestMessage, Hello, HostMessage, MAX_FRAME_BYTES,
    PROTOCOL_VERSION, Program, StreamData, write_frame,
};

use super::{Context, Ended, Role, serve};
use crate::config::DEFAULT_PATH;
use crate::exec::OUTPUT_CHUNK_BYTES;
use crate::reaper::Reaper;
use crate::transport::Connection;

/// Long enough for any test here; a hung server fails the test instead of hanging it.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

struct Host {
    frames: FrameReader<UnixStream>,
    out: UnixStream,
    server: JoinHandle<Ended>,
    hello: Hello,
}

fn context() -> Arc<Context> {
    let env = BTreeMap::from([("PATH".to_owned(), DEFAULT_PATH.to_owned())]);
    Arc::new(Context::new(false, env, Reaper::own_children(), 0))
}

impl Host {
    fn connect() -> Self {
        Self::connect_to(context())
    }

    /// A connection to a guest agent whose other connections share `ctx`.
    fn connect_to(ctx: Arc<Context>) -> Self {
        let (host, guest) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        let server = thread::spawn(move || {
            serve(Connection::socket(guest.into()), &ctx, Role::Control).unwrap()
        });
        let out = host.try_clone().unwrap();
        let mut frames = FrameReader::new(host);
        let Some(GuestMessage::Hello(hello)) = frames.read().unwrap() else {
            panic!("the first frame is not a hello");
        };
        Self {
            frames,
            out,
            server,
            hello,
        }
    }

    fn send(&mut self, msg: HostMessage) {
        write_frame(&mut self.out, &msg).unwrap();
    }

    fn recv(&mut self) -> GuestMessage {
        self.frames
            .read()
            .unwrap()
            .expect("the guest closed the connection")
    }

    fn exec(&mut self, req: ExecRequest) {
        self.send(HostMessage::Exec(req));
    }

    fn expect_started(&mut self, id: u64) {
        match self.recv() {
            GuestMessage::Started { id: got, pid } if got == id && pid > 0 => {}
            other => panic!("expected started for {id}, got {other:?}"),
        }
    }

    /// Collects the output of request `id` up to its `exited`; no other request may interleave.
    fn run_to_exit(&mut self, id: u64) -> Output {
        self.expect_started(id);
        let mut output = Output::default();
        loop {
            match self.recv() {
                GuestMessage::Stdout { id: got, data } if got == id => {
                    output.largest_chunk = output.largest_chunk.max(data.0.len());
                    output.stdout.extend(data.0);
                }
                GuestMessage::Stderr { id: got, data } if got == id => {
                    output.stderr.extend(data.0);
                }
                GuestMessage::Exited { id: got, status } if got == id => {
                    output.status = status;
                    return output;
                }
                other => panic!("unexpected frame while running {id}: {other:?}"),
            }
        }
    }

    fn expect_error(&mut self, id: u64) -> String {
        match self.recv() {
            GuestMessage::Error { id: got, message } if got == id => message,
            other => panic!("expected an error for {id}, got {other:?}"),
        }
    }

    /// The guest must close the connection and end the server. Programs it killed on the way
    /// may still report their end first.
    fn expect_closed(mut self) -> Ended {
        loop {
            match self.frames.read::<GuestMessage>() {
                Ok(None) => break,
                Ok(Some(GuestMessage::Exited { .. })) => {}
                other => panic!("expected the connection to close, got {other:?}"),
            }
        }
        self.server.join().unwrap()
    }
}

#[derive(Default)]
struct Output {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: ExitStatus,
    largest_chunk: usize,
}

fn sh(id: u64, script: &str) -> ExecRequest {
    run(id, "/bin/sh", &["-c", script])
}

fn run(id: u64, program: &str, args: &[&str]) -> ExecRequest {
    ExecRequest {
        id,
        run: Program {
            program: program.into(),
            args: args.iter().map(|a| (*a).into()).collect(),
            ..Program::default()
        },
        stdin: false,
        ..Default::default()
    }
}

fn exited_with(code: i32) -> ExitStatus {
    ExitStatus {
        code: Some(code),
        ..ExitStatus::default()
    }
}

#[test]
fn hello_comes_first_with_the_protocol_version() {
    let host = Host::connect();
    assert_eq!(host.hello.protocol, PROTOCOL_VERSION);
    assert!(host.hello.agent.starts_with("agentos-guest "));
    assert!(!host.hello.kernel.is_empty());
    assert!(host.hello.vcpus > 0 && host.hello.memory_kib > 0);
    assert!(host.hello.boot.ready_ms > 0);
}

#[test]
fn every_connection_gets_the_hello_made_for_the_first() {
    let ctx = context();
    let first = Host::connect_to(Arc::clone(&ctx));
    let made = std::ptr::from_ref(ctx.hello());
    let second = Host::connect_to(Arc::clone(&ctx));
    assert!(std::ptr::eq(made, ctx.hello()), "the hello was made again");
    assert_eq!(second.hello, first.hello);
}

#[test]
fn ping_is_answered_with_pong() {
    let mut host = Host::connect();
    host.send(HostMessage::Ping { id: 41 });
    assert_eq!(host.recv(), GuestMessage::Pong { id: 41 });
}

#[test]
fn exec_streams_stdout_and_reports_the_exit_code() {
    let mut host = Host::connect();
    host.exec(sh(1, "echo hi; exit 7"));
    let output = host.run_to_exit(1);
    assert_eq!(output.stdout, b"hi\n");
    assert!(output.stderr.is_empty());
    assert_eq!(output.status, exited_with(7));
}

#[test]
fn exec_applies_environment_and_working_directory() {
    let mut host = Host::connect();
    let mut request = sh(1, r#"echo "$GREETING"; pwd; echo "$PATH""#);
    request.run.env = BTreeMap::from([("GREETING".into(), "hello".into())]);
    request.run.cwd = Some("/tmp".into());
    host.exec(request);
    let output = host.run_to_exit(1);
    let expected = format!("hello\n/tmp\n{DEFAULT_PATH}\n");
    assert_eq!(String::from_utf8(output.stdout).unwrap(), expected);
}

#[test]
fn stderr_is_kept_apart_from_stdout() {
    let mut host = Host::connect();
    host.exec(sh(1, "echo out; echo err >&2"));
    let output = host.run_to_exit(1);
    assert_eq!(output.stdout, b"out\n");
    assert_eq!(output.stderr, b"err\n");
    assert_eq!(output.status, exited_with(0));
}

#[test]
fn a_signal_from_the_host_ends_the_program_and_is_reported() {
    let mut host = Host::connect();
    host.exec(run(1, "sleep", &["30"]));
    host.expect_started(1);
    host.send(HostMessage::Signal {
        id: 1,
        signal: libc::SIGTERM,
    });
    let GuestMessage::Exited { id: 1, status } = host.recv() else {
        panic!("expected exited");
    };
    assert_eq!(status.signal, Some(libc::SIGTERM));
    assert_eq!(status.code, None);
    assert!(!status.timed_out);
}

#[test]
fn stdin_passes_through_until_closed() {
    let mut host = Host::connect();
    host.exec(ExecRequest {
        stdin: true,
        ..run(1, "cat", &[])
    });
    for part in [&b"first "[..], b"second\n"] {
        host.send(HostMessage::Stdin {
            id: 1,
            data: StreamData(part.to_vec()),
        });
    }
    host.send(HostMessage::CloseStdin { id: 1 });
    let output = host.run_to_exit(1);
    assert_eq!(output.stdout, b"first second\n");
    assert_eq!(output.status, exited_with(0));
}

#[test]
fn large_output_arrives_whole_in_order_and_in_bounded_chunks() {
    let mut host = Host::connect();
    let lines = 700_000;
    host.exec(run(1, "seq", &["1", &lines.to_string()]));
    let output = host.run_to_exit(1);
    let expected: String = (1..=lines).map(|n| format!("{n}\n")).collect();
    assert!(expected.len() > 4 << 20);
    assert!(output.stdout == expected.as_bytes(), "output differs");
    assert!(output.largest_chunk <= OUTPUT_CHUNK_BYTES);
    assert_eq!(output.status, exited_with(0));
}

#[test]
fn timeout_kills_the_whole_group_and_says_so() {
    let mut host = Host::connect();
    let began = Instant::now();
    // The background sleep keeps stdout open: only a kill of the whole group ends the exec.
    let mut request = sh(1, "sleep 30 & sleep 30");
    request.run.timeout_ms = Some(200);
    host.exec(request);
    let output = host.run_to_exit(1);
    assert_eq!(
        output.status,
        ExitStatus {
            code: None,
            signal: Some(libc::SIGKILL),
            timed_out: true,
        }
    );
    assert!(began.elapsed() < Duration::from_secs(5));
}

#[test]
fn two_programs_run_at_once_on_one_connection() {
    let mut host = Host::connect();
    host.exec(ExecRequest {
        stdin: true,
        ..run(1, "cat", &[])
    });
    host.expect_started(1);
    // The second program runs to its end while the first still waits for input.
    host.exec(sh(2, "echo two"));
    let output = host.run_to_exit(2);
    assert_eq!(output.stdout, b"two\n");
    host.send(HostMessage::Stdin {
        id: 1,
        data: StreamData(b"one\n".to_vec()),
    });
    host.send(HostMessage::CloseStdin { id: 1 });
    assert_eq!(
        host.recv(),
        GuestMessage::Stdout {
            id: 1,
            data: StreamData(b"one\n".to_vec())
        }
    );
    assert_eq!(
        host.recv(),
        GuestMessage::Exited {
            id: 1,
            status: exited_with(0)
        }
    );
}

#[test]
fn a_missing_program_is_an_error() {
    let mut host = Host::connect();
    host.exec(run(5, "/nonexistent/program", &[]));
    let message = host.expect_error(5);
    assert!(message.contains("/nonexistent/program"), "{message}");
    // The connection carries on.
    host.send(HostMessage::Ping { id: 6 });
    assert_eq!(host.recv(), GuestMessage::Pong { id: 6 });
}

#[test]
fn requests_for_unknown_or_unsuitable_programs_are_errors() {
    let mut host = Host::connect();
    host.send(HostMessage::Stdin {
        id: 9,
        data: StreamData(b"x".to_vec()),
    });
    host.expect_error(9);
    host.send(HostMessage::CloseStdin { id: 9 });
    host.expect_error(9);
    host.send(HostMessage::Signal { id: 9, signal: 15 });
    host.expect_error(9);

    host.exec(run(1, "sleep", &["30"]));
    host.expect_started(1);
    host.send(HostMessage::Stdin {
        id: 1,
        data: StreamData(b"x".to_vec()),
    });
    host.expect_error(1);
    host.exec(sh(1, "true"));
    host.expect_error(1);
    host.send(HostMessage::Signal { id: 1, signal: 0 });
    host.expect_error(1);
    let mut request = sh(2, "true");
    request.run.env = BTreeMap::from([("A=B".into(), "1".into())]);
    host.exec(request);
    host.expect_error(2);
}

#[test]
fn shutdown_is_answered_and_ends_the_server() {
    let mut host = Host::connect();
    host.exec(sh(1, "sleep 30"));
    host.expect_started(1);
    host.send(HostMessage::Shutdown { id: 2 });
    assert_eq!(host.recv(), GuestMessage::ShuttingDown { id: 2 });
    assert!(matches!(host.expect_closed(), Ended::Shutdown));
}

#[test]
fn a_garbage_frame_closes_the_connection() {
    let mut host = Host::connect();
    let body = b"this is not json";
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    host.out.write_all(&frame).unwrap();
    assert!(matches!(host.expect_closed(), Ended::Broken(_)));
}

#[test]
fn an_oversized_length_prefix_is_refused() {
    let mut host = Host::connect();
    let len = u32::try_from(MAX_FRAME_BYTES + 1).unwrap();
    host.out.write_all(&len.to_be_bytes()).unwrap();
    assert!(matches!(host.expect_closed(), Ended::Broken(_)));
}

#[test]
fn closing_the_connection_kills_running_programs() {
    let mut host = Host::connect();
    host.exec(sh(1, "echo $$; exec sleep 30"));
    host.expect_started(1);
    let GuestMessage::Stdout { data, .. } = host.recv() else {
        panic!("expected the pid");
    };
    let pid: i32 = String::from_utf8(data.0).unwrap().trim().parse().unwrap();
    host.out.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(matches!(host.server.join().unwrap(), Ended::HostClosed));
    let began = Instant::now();
    // SAFETY: kill with signal 0 only probes whether the process exists.
    while unsafe { libc::kill(pid, 0) } == 0 {
        assert!(began.elapsed() < READ_TIMEOUT, "program {pid} survived");
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_bare_program_name_is_found_in_path_and_keeps_its_name() {
    let mut host = Host::connect();
    // argv[0] as the host gave it, although the agent spawned the program by its full path.
    host.exec(run(1, "sh", &["-c", "head -c 3 /proc/$$/cmdline"]));
    let output = host.run_to_exit(1);
    assert_eq!(output.status, exited_with(0));
    assert_eq!(output.stdout, b"sh\0");
}

#[test]
fn a_restored_agent_that_cannot_refresh_runs_nothing_more() {
    let mut host = Host::connect();
    let marker = tempfile::tempdir().unwrap().keep().join("ran");
    // The host sends its next request without waiting for the answer to `restored`.
    host.send(HostMessage::Restored {
        id: 1,
        entropy: StreamData(Vec::new()),
        unix_time_ns: 0,
    });
    host.exec(sh(2, &format!("touch {}", marker.display())));
    let message = host.expect_error(1);
    assert!(message.contains("cannot refresh"), "{message}");
    // Closed with the exec still unread: a reset, or an end.
    match host.frames.read::<GuestMessage>() {
        Ok(None) => {}
        Err(agentos_protocol::FrameError::Io(e))
            if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the connection to close, got {other:?}"),
    }
    assert!(matches!(host.server.join().unwrap(), Ended::Unrefreshed));
    assert!(!marker.exists());
}

#[test]
fn files_cross_the_connection_and_unfinished_writes_leave_nothing() {
    use agentos_protocol::files::{FileErrorKind, FsOp};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f").to_string_lossy().into_owned();
    let mut host = Host::connect();
    host.send(HostMessage::WriteFile {
        id: 1,
        path: path.clone(),
        mode: None,
        user: None,
        in_place: false,
    });
    for part in [&b"one "[..], b"two"] {
        host.send(HostMessage::FileChunk {
            id: 1,
            data: StreamData(part.to_vec()),
        });
    }
    host.send(HostMessage::FileEnd { id: 1 });
    assert_eq!(host.recv(), GuestMessage::FileWritten { id: 1, size: 7 });
    host.send(HostMessage::ReadFile {
        id: 2,
        path: path.clone(),
    });
    assert_eq!(
        host.recv(),
        GuestMessage::FileChunk {
            id: 2,
            data: StreamData(b"one two".to_vec())
        }
    );
    assert_eq!(host.recv(), GuestMessage::FileEnd { id: 2, size: 7 });
    host.send(HostMessage::Fs {
        id: 3,
        fs: FsOp::List {
            path: dir.path().to_string_lossy().into_owned(),
            depth: 1,
        },
    });
    match host.recv() {
        GuestMessage::Listed {
            id: 3,
            entries,
            last: true,
        } => {
            assert_eq!(entries.len(), 1);
            assert_eq!(entries[0].path, path);
        }
        other => panic!("expected a listing, got {other:?}"),
    }
    host.send(HostMessage::Fs {
        id: 4,
        fs: FsOp::Stat {
            path: format!("{path}/below"),
        },
    });
    assert!(matches!(
        host.recv(),
        GuestMessage::FileError {
            id: 4,
            kind: FileErrorKind::NotADirectory,
            ..
        }
    ));
    // A write the host never finishes: its temporary file goes with the connection.
    host.send(HostMessage::WriteFile {
        id: 5,
        path: dir.path().join("g").to_string_lossy().into_owned(),
        mode: None,
        user: None,
        in_place: false,
    });
    host.send(HostMessage::FileChunk {
        id: 5,
        data: StreamData(b"partial".to_vec()),
    });
    host.send(HostMessage::Ping { id: 6 });
    assert_eq!(host.recv(), GuestMessage::Pong { id: 6 });
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    drop(host.out);
    drop(host.frames);
    host.server.join().unwrap();
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["f"]);
}

#[test]
fn a_kept_program_outlives_its_connection_and_is_found_by_others() {
    use agentos_protocol::process::{Control, Selector};
    let ctx = context();
    let mut first = Host::connect_to(Arc::clone(&ctx));
    first.exec(ExecRequest {
        keep: true,
        tag: Some("cat".into()),
        stdin: true,
        ..run(1, "/bin/cat", &[])
    });
    let pid = match first.recv() {
        GuestMessage::Started { id: 1, pid } => pid,
        other => panic!("expected started, got {other:?}"),
    };
    // A second program with that tag is refused while the first runs.
    first.exec(ExecRequest {
        tag: Some("cat".into()),
        ..run(2, "/bin/true", &[])
    });
    assert!(first.expect_error(2).contains("tagged"));
    drop(first.out);
    drop(first.frames);
    first.server.join().unwrap();

    let mut second = Host::connect_to(Arc::clone(&ctx));
    second.send(HostMessage::ListProcesses { id: 3 });
    match second.recv() {
        GuestMessage::Processes { id: 3, processes } => {
            assert_eq!(processes.len(), 1, "{processes:?}");
            assert_eq!((processes[0].pid, processes[0].keep), (pid, true));
        }
        other => panic!("expected processes, got {other:?}"),
    }
    second.send(HostMessage::Attach {
        id: 4,
        process: Selector::Tag("cat".into()),
    });
    assert_eq!(second.recv(), GuestMessage::Started { id: 4, pid });
    let control = |control| HostMessage::Control {
        id: 5,
        pid,
        control,
    };
    // The answer to a control and what the program does next may come in either order.
    let next_two = |host: &mut Host| {
        let frames = [host.recv(), host.recv()];
        let done = GuestMessage::Done { id: 5 };
        assert!(frames.contains(&done), "{frames:?}");
        frames.into_iter().find(|f| *f != done).unwrap()
    };
    second.send(control(Control::Stdin {
        data: StreamData(b"fed\n".to_vec()),
    }));
    assert_eq!(
        next_two(&mut second),
        GuestMessage::Stdout {
            id: 4,
            data: StreamData(b"fed\n".to_vec())
        }
    );
    second.send(control(Control::CloseStdin));
    assert_eq!(
        next_two(&mut second),
        GuestMessage::Exited {
            id: 4,
            status: exited_with(0)
        }
    );
    second.send(HostMessage::Attach {
        id: 6,
        process: Selector::Pid(pid),
    });
    assert!(second.expect_error(6).contains("no process"));
}

#[test]
fn a_program_not_kept_ends_with_its_connection_even_when_another_follows_it() {
    use agentos_protocol::process::Selector;
    let ctx = context();
    let mut owner = Host::connect_to(Arc::clone(&ctx));
    owner.exec(run(1, "/bin/sleep", &["30"]));
    let pid = match owner.recv() {
        GuestMessage::Started { id: 1, pid } => pid,
        other => panic!("expected started, got {other:?}"),
    };
    let mut follower = Host::connect_to(Arc::clone(&ctx));
    follower.send(HostMessage::Attach {
        id: 9,
        process: Selector::Pid(pid),
    });
    assert_eq!(follower.recv(), GuestMessage::Started { id: 9, pid });
    drop(owner.out);
    drop(owner.frames);
    owner.server.join().unwrap();
    match follower.recv() {
        GuestMessage::Exited { id: 9, status } => assert_eq!(status.signal, Some(9)),
        other => panic!("expected exited, got {other:?}"),
    }
}

#[test]
fn a_program_on_a_terminal_has_one_of_the_size_asked_and_it_can_be_resized() {
    use agentos_protocol::PtySize;
    use agentos_protocol::process::Control;
    let mut host = Host::connect();
    // Prints its terminal's size whenever it is told it changed, and ends at its input's end.
    let script =
        "trap 'stty size' WINCH; stty size; tty; until read line; do :; done; echo got $line";
    host.exec(ExecRequest {
        pty: Some(PtySize {
            cols: 100,
            rows: 30,
        }),
        ..sh(1, script)
    });
    let pid = match host.recv() {
        GuestMessage::Started { id: 1, pid } => pid,
        other => panic!("expected started, got {other:?}"),
    };
    let mut seen = String::new();
    let mut wait_for = |host: &mut Host, what: &str| {
        while !seen.contains(what) {
            match host.recv() {
                GuestMessage::Stdout { id: 1, data } => {
                    seen.push_str(&String::from_utf8_lossy(&data.0))
                }
                GuestMessage::Done { .. } => {}
                other => panic!("unexpected {other:?} waiting for {what:?} in {seen:?}"),
            }
        }
    };
    wait_for(&mut host, "30 100");
    wait_for(&mut host, "/dev/pts/");
    host.send(HostMessage::Control {
        id: 2,
        pid,
        control: Control::Resize { cols: 90, rows: 20 },
    });
    wait_for(&mut host, "20 90");
    host.send(HostMessage::Stdin {
        id: 1,
        data: StreamData(b"hello\n".to_vec()),
    });
    wait_for(&mut host, "got hello");
    loop {
        match host.recv() {
            GuestMessage::Exited { id: 1, status } => {
                assert_eq!(status, exited_with(0));
                break;
            }
            GuestMessage::Stdout { .. } | GuestMessage::Done { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn a_watched_directory_reports_changes_below_it_as_they_happen() {
    use agentos_protocol::files::{Change, ChangeKind};
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_string_lossy().into_owned();
    let mut host = Host::connect();
    host.send(HostMessage::Watch {
        id: 1,
        path: base.clone(),
        recursive: true,
    });
    assert_eq!(host.recv(), GuestMessage::Watching { id: 1 });
    std::fs::write(dir.path().join("a"), b"x").unwrap();
    std::fs::create_dir(dir.path().join("d")).unwrap();
    // The new directory is watched once its creation is seen; give that a moment.
    thread::sleep(Duration::from_millis(300));
    std::fs::write(dir.path().join("d/inner"), b"y").unwrap();
    std::fs::remove_file(dir.path().join("a")).unwrap();
    let mut seen: Vec<Change> = Vec::new();
    let wanted = Change {
        kind: ChangeKind::Remove,
        path: format!("{base}/a"),
    };
    while !seen.contains(&wanted) {
        match host.recv() {
            GuestMessage::Changes { id: 1, changes } => seen.extend(changes),
            other => panic!("unexpected {other:?}"),
        }
    }
    let has = |kind, path: &str| seen.iter().any(|c| c.kind == kind && c.path == path);
    assert!(has(ChangeKind::Create, &format!("{base}/a")), "{seen:?}");
    assert!(has(ChangeKind::Write, &format!("{base}/a")), "{seen:?}");
    assert!(has(ChangeKind::Create, &format!("{base}/d")), "{seen:?}");
    assert!(
        has(ChangeKind::Create, &format!("{base}/d/inner")),
        "{seen:?}"
    );
    host.send(HostMessage::Watch {
        id: 2,
        path: format!("{base}/missing"),
        recursive: false,
    });
    loop {
        match host.recv() {
            GuestMessage::FileError { id: 2, kind, .. } => {
                assert_eq!(kind, agentos_protocol::files::FileErrorKind::NotFound);
                break;
            }
            GuestMessage::Changes { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn watches_have_sent_what_a_request_changed_before_it_is_answered() {
    use agentos_protocol::files::{Change, ChangeKind, FsOp};
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_string_lossy().into_owned();
    let ctx = context();
    let mut watch = Host::connect_to(ctx.clone());
    let mut files = Host::connect_to(ctx);
    watch.send(HostMessage::Watch {
        id: 1,
        path: base.clone(),
        recursive: true,
    });
    assert_eq!(watch.recv(), GuestMessage::Watching { id: 1 });
    // A directory made and, right after its answer, a file written into it in place: the
    // watch took the new directory in before the answer, so it sees the file too.
    files.send(HostMessage::Fs {
        id: 2,
        fs: FsOp::MakeDir {
            path: format!("{base}/d"),
            user: None,
        },
    });
    assert!(matches!(files.recv(), GuestMessage::FsDone { id: 2, .. }));
    files.send(HostMessage::WriteFile {
        id: 3,
        path: format!("{base}/d/f"),
        mode: None,
        user: None,
        in_place: true,
    });
    files.send(HostMessage::FileChunk {
        id: 3,
        data: StreamData(b"data".to_vec()),
    });
    files.send(HostMessage::FileEnd { id: 3 });
    assert_eq!(files.recv(), GuestMessage::FileWritten { id: 3, size: 4 });
    // Everything was queued for the watch's connection before that answer.
    watch
        .frames
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut seen: Vec<Change> = Vec::new();
    while let Ok(Some(frame)) = watch.frames.read() {
        match frame {
            GuestMessage::Changes { id: 1, changes } => seen.extend(changes),
            other => panic!("unexpected {other:?}"),
        }
    }
    let change = |kind, path: &str| Change {
        kind,
        path: format!("{base}/{path}"),
    };
    assert_eq!(
        seen,
        [
            change(ChangeKind::Create, "d"),
            change(ChangeKind::Create, "d/f"),
            change(ChangeKind::Write, "d/f"),
        ],
        "the file is written where it is: no temporary name, as a program's write"
    );
}
