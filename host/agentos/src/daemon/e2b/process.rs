//! E2B's `process.Process` service: programs started and followed (a stream of `start`, `data`
//! and `end` events), followed again, listed, fed, signalled and resized, each translated into
//! the daemon's own program requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use hyper::StatusCode;

use agentos_e2b_proto::process::{
    self as pb, ProcessEvent, ProcessSelector, process_event::Event, process_input,
    process_selector, stream_input_request,
};
use agentos_protocol::process::{Control, ProcessInfo};
use agentos_protocol::{ExitStatus, Program, PtySize, StreamData};

use super::super::api::{
    ApiError, ControlCall, ErrorKind, MAX_TIMEOUT_S, NameRequest, ProcessRequest, ProcessesReply,
    ProgramLine, Request, StartCall,
};
use super::connect::{self, parse};
use super::{Api, Call, Reply, Translate, relay};

/// Answers a call of `process.Process`; `body` is the request's whole body (a client stream's
/// envelopes, for `StreamInput`).
pub async fn serve(
    call: &Call<'_, impl Api>,
    method: &str,
    message: &[u8],
    body: &[u8],
) -> Result<Reply, ApiError> {
    match method {
        "Start" => start(call, parse(message)?).await,
        "Connect" => {
            let request: pb::ConnectRequest = parse(message)?;
            let pid = pid_of(call, request.process).await?;
            follow(
                call,
                Request::Attach(ProcessRequest {
                    name: call.sandbox.id.clone(),
                    pid,
                }),
                Some(pid),
                false,
            )
            .await
        }
        "List" => list(call).await,
        "SendInput" => {
            let request: pb::SendInputRequest = parse(message)?;
            let pid = pid_of(call, request.process).await?;
            send_input(call, pid, request.input).await?;
            Ok(Reply::json(StatusCode::OK, &pb::SendInputResponse {}))
        }
        "StreamInput" => stream_input(call, body).await,
        "CloseStdin" => {
            let request: pb::CloseStdinRequest = parse(message)?;
            let pid = pid_of(call, request.process).await?;
            control(call, pid, Control::CloseStdin).await?;
            Ok(Reply::json(StatusCode::OK, &pb::CloseStdinResponse {}))
        }
        "SendSignal" => {
            let request: pb::SendSignalRequest = parse(message)?;
            let signal = signal_of(request.signal)?;
            let pid = pid_of(call, request.process).await?;
            control(call, pid, Control::Signal { signal }).await?;
            Ok(Reply::json(StatusCode::OK, &pb::SendSignalResponse {}))
        }
        "Update" => {
            let request: pb::UpdateRequest = parse(message)?;
            let size = pty_size(request.pty)?;
            let pid = pid_of(call, request.process).await?;
            if let Some(PtySize { cols, rows }) = size {
                control(call, pid, Control::Resize { cols, rows }).await?;
            }
            Ok(Reply::json(StatusCode::OK, &pb::UpdateResponse {}))
        }
        _ => Err(ApiError::new(
            ErrorKind::MethodNotAllowed,
            format!(
                "process.Process/{} is not served",
                agentos_protocol::clip(method, 60)
            ),
        )),
    }
}

/// A PTY's size, checked: the guest's terminals count columns and rows in 16 bits.
fn pty_size(pty: Option<pb::Pty>) -> Result<Option<PtySize>, ApiError> {
    let Some(size) = pty.and_then(|p| p.size) else {
        return Ok(None);
    };
    match (u16::try_from(size.cols), u16::try_from(size.rows)) {
        (Ok(cols), Ok(rows)) => Ok(Some(PtySize { cols, rows })),
        _ => Err(ApiError::new(
            ErrorKind::BadRequest,
            format!(
                "a PTY of {} columns and {} rows is too large (at most 65535 each)",
                size.cols, size.rows
            ),
        )),
    }
}

async fn start(call: &Call<'_, impl Api>, request: pb::StartRequest) -> Result<Reply, ApiError> {
    let config = request.process.ok_or_else(|| {
        ApiError::new(
            ErrorKind::BadRequest,
            "`process` (its `cmd`, `args`, `envs`, `cwd`) is missing",
        )
    })?;
    let mut env = call.sandbox.env.clone();
    env.extend(config.envs);
    let timeout_ms = call.timeout_ms.map(|ms| ms.min(MAX_TIMEOUT_S * 1000));
    let pty = pty_size(request.pty)?;
    let start = StartCall {
        name: call.sandbox.id.clone(),
        run: Program {
            program: config.cmd,
            args: config.args,
            env,
            cwd: config.cwd.map(|cwd| call.path(&cwd)),
            timeout_ms,
            user: Some(call.user.clone()),
        },
        stdin: request.stdin.unwrap_or(false),
        detach: false,
        // A process with no time limit was asked to run on by itself (E2B's `timeout=0`): it
        // outlives its stream; any other ends with it.
        keep: timeout_ms.is_none(),
        tag: request.tag,
        pty,
    };
    let pty = start.pty.is_some();
    follow(call, Request::Start(start), None, pty).await
}

async fn follow(
    call: &Call<'_, impl Api>,
    request: Request,
    attached: Option<u32>,
    pty: bool,
) -> Result<Reply, ApiError> {
    let chunks = call.api.open(request).await?;
    let events = Events {
        started: false,
        ended: false,
        attached,
        pty,
        sandbox_ending: Arc::clone(&call.sandbox.ending),
    };
    Ok(Reply::stream(
        connect::STREAM_JSON,
        relay(chunks, events, call.keepalive),
    ))
}

/// The daemon's program lines as E2B's process events.
struct Events {
    started: bool,
    ended: bool,
    /// A followed process's id (a `Connect` call): its stream begins with a `start` event too.
    attached: Option<u32>,
    /// Output comes as `pty` data.
    pty: bool,
    /// Set once the sandbox is being killed or timed out: a process ending then ends with it,
    /// and its stream ends as cut off (as E2B's does when its sandbox goes), not with an exit.
    sandbox_ending: Arc<AtomicBool>,
}

impl Events {
    /// One event as the call's response message: `ConnectResponse` for a followed process,
    /// `StartResponse` for a started one.
    fn message(&self, event: Event) -> Bytes {
        let event = Some(ProcessEvent { event: Some(event) });
        if self.attached.is_some() {
            connect::envelope(&pb::ConnectResponse { event })
        } else {
            connect::envelope(&pb::StartResponse { event })
        }
    }

    fn begin(&mut self, out: &mut Vec<Bytes>) {
        if !self.started {
            self.started = true;
            if let Some(pid) = self.attached {
                out.push(self.message(Event::Start(pb::process_event::StartEvent { pid })));
            }
        }
    }

    fn data(&self, output: Output, data: Vec<u8>) -> Bytes {
        use pb::process_event::data_event::Output as Out;
        let output = match output {
            _ if self.pty => Out::Pty(data),
            Output::Stdout => Out::Stdout(data),
            Output::Stderr => Out::Stderr(data),
        };
        self.message(Event::Data(pb::process_event::DataEvent {
            output: Some(output),
        }))
    }
}

#[derive(Clone, Copy)]
enum Output {
    Stdout,
    Stderr,
}

impl Translate for Events {
    fn line(&mut self, line: &[u8]) -> Vec<Bytes> {
        let mut out = Vec::new();
        let Ok(line) = serde_json::from_slice::<ProgramLine>(line) else {
            return out;
        };
        match line {
            ProgramLine::Started { pid } => {
                self.started = true;
                out.push(self.message(Event::Start(pb::process_event::StartEvent { pid })));
            }
            ProgramLine::Stdout(StreamData(data)) => {
                self.begin(&mut out);
                out.push(self.data(Output::Stdout, data));
            }
            ProgramLine::Stderr(StreamData(data)) => {
                self.begin(&mut out);
                out.push(self.data(Output::Stderr, data));
            }
            ProgramLine::Exited(_) if self.sandbox_ending.load(Ordering::SeqCst) => {
                self.ended = true;
                out.push(connect::end_of_stream(Some(&ApiError::new(
                    ErrorKind::NotRunning,
                    "the sandbox ended (killed, or its time was up) while the process ran",
                ))));
            }
            ProgramLine::Exited(status) => {
                self.begin(&mut out);
                self.ended = true;
                out.push(self.message(Event::End(end_event(&status))));
                out.push(connect::end_of_stream(None));
            }
            ProgramLine::Error(error) => {
                self.ended = true;
                out.push(connect::end_of_stream(Some(&error)));
            }
        }
        out
    }

    fn keepalive(&self) -> Bytes {
        self.message(Event::Keepalive(pb::process_event::KeepAlive {}))
    }

    fn end(&mut self) -> Vec<Bytes> {
        if self.ended {
            return Vec::new();
        }
        let error = ApiError::new(
            ErrorKind::NotRunning,
            "the process's stream ended before the process did (the sandbox stopped?)",
        );
        vec![connect::end_of_stream(Some(&error))]
    }
}

/// E2B's `end` event for how a process ended.
fn end_event(status: &ExitStatus) -> pb::process_event::EndEvent {
    let (code, text) = match (status.code, status.signal) {
        (Some(code), _) => (code, format!("exit status {code}")),
        (None, Some(signal)) => (-1, format!("signal: {}", signal_name(signal))),
        (None, None) => (-1, "exited".to_owned()),
    };
    pb::process_event::EndEvent {
        exit_code: code,
        exited: status.code.is_some(),
        error: (code != 0).then(|| text.clone()),
        status: text,
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGKILL => "killed",
        libc::SIGTERM => "terminated",
        libc::SIGINT => "interrupt",
        libc::SIGHUP => "hangup",
        libc::SIGPIPE => "broken pipe",
        _ => "other",
    }
}

/// E2B's `Signal` as a signal number: only the ones it defines.
fn signal_of(signal: i32) -> Result<i32, ApiError> {
    match pb::Signal::try_from(signal) {
        Ok(pb::Signal::Sigkill) => Ok(libc::SIGKILL),
        Ok(pb::Signal::Sigterm) => Ok(libc::SIGTERM),
        Ok(pb::Signal::Unspecified) | Err(_) => Err(ApiError::new(
            ErrorKind::BadRequest,
            "`signal` is missing: send SIGNAL_SIGKILL or SIGNAL_SIGTERM",
        )),
    }
}

/// The process a selector names: by id, or by tag among the running ones.
async fn pid_of(
    call: &Call<'_, impl Api>,
    selector: Option<ProcessSelector>,
) -> Result<u32, ApiError> {
    match selector.and_then(|s| s.selector) {
        Some(process_selector::Selector::Pid(pid)) => Ok(pid),
        Some(process_selector::Selector::Tag(tag)) => processes(call)
            .await?
            .into_iter()
            .find(|p| p.tag.as_deref() == Some(tag.as_str()))
            .map(|p| p.pid)
            .ok_or_else(|| {
                ApiError::new(
                    ErrorKind::NotFound,
                    format!(
                        "no running process has the tag `{}`",
                        agentos_protocol::clip(&tag, 80)
                    ),
                )
            }),
        None => Err(ApiError::new(
            ErrorKind::BadRequest,
            "name the process by `pid` or `tag`",
        )),
    }
}

async fn processes(call: &Call<'_, impl Api>) -> Result<Vec<ProcessInfo>, ApiError> {
    let value = call
        .api
        .call(Request::Processes(NameRequest {
            name: call.sandbox.id.clone(),
        }))
        .await?;
    let reply: ProcessesReply = serde_json::from_value(value)
        .map_err(|e| ApiError::new(ErrorKind::Failed, e.to_string()))?;
    Ok(reply.processes)
}

async fn list(call: &Call<'_, impl Api>) -> Result<Reply, ApiError> {
    let processes = processes(call)
        .await?
        .into_iter()
        .map(|p| pb::ProcessInfo {
            config: Some(pb::ProcessConfig {
                cmd: p.run.program,
                args: p.run.args,
                envs: p.run.env,
                cwd: p.run.cwd,
            }),
            pid: p.pid,
            tag: p.tag,
        })
        .collect();
    Ok(Reply::json(StatusCode::OK, &pb::ListResponse { processes }))
}

async fn control(call: &Call<'_, impl Api>, pid: u32, control: Control) -> Result<(), ApiError> {
    call.api
        .call(Request::Control(ControlCall {
            name: call.sandbox.id.clone(),
            pid,
            control,
        }))
        .await?;
    Ok(())
}

async fn send_input(
    call: &Call<'_, impl Api>,
    pid: u32,
    input: Option<pb::ProcessInput>,
) -> Result<(), ApiError> {
    let data = match input.and_then(|i| i.input) {
        Some(process_input::Input::Stdin(data) | process_input::Input::Pty(data)) => data,
        None => return Ok(()),
    };
    if data.is_empty() {
        return Ok(());
    }
    control(
        call,
        pid,
        Control::Stdin {
            data: StreamData(data),
        },
    )
    .await
}

/// `StreamInput`: a client stream of `start{process}`, then `data{input}` and `keepalive`
/// messages, each passed on in order.
async fn stream_input(call: &Call<'_, impl Api>, mut body: &[u8]) -> Result<Reply, ApiError> {
    let mut pid = None;
    while !body.is_empty() {
        let message = connect::unenvelope(body)?;
        let consumed = 5 + message.len();
        let flags = body[0];
        body = &body[consumed..];
        if flags & 2 != 0 {
            break;
        }
        let request: pb::StreamInputRequest = parse(message)?;
        match request.event {
            Some(stream_input_request::Event::Start(start)) => {
                pid = Some(pid_of(call, start.process).await?);
            }
            Some(stream_input_request::Event::Data(data)) => {
                let Some(pid) = pid else {
                    return Err(ApiError::new(
                        ErrorKind::BadRequest,
                        "StreamInput sent data before `start` named the process",
                    ));
                };
                send_input(call, pid, data.input).await?;
            }
            Some(stream_input_request::Event::Keepalive(_)) | None => {}
        }
    }
    Ok(Reply::json(StatusCode::OK, &pb::StreamInputResponse {}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(events: &mut Events, lines: &[ProgramLine]) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for line in lines {
            out.extend(events.line(&serde_json::to_vec(line).unwrap()));
        }
        out.extend(events.end());
        out.iter()
            .map(|bytes| {
                let mut value: serde_json::Value = serde_json::from_slice(&bytes[5..]).unwrap();
                if bytes[0] == 2 {
                    value = serde_json::json!({ "end_of_stream": value });
                }
                value
            })
            .collect()
    }

    #[test]
    fn program_lines_become_process_events_and_the_stream_ends_once() {
        let mut events = Events {
            started: false,
            ended: false,
            attached: None,
            pty: false,
            sandbox_ending: Arc::default(),
        };
        let out = lines(
            &mut events,
            &[
                ProgramLine::Started { pid: 7 },
                ProgramLine::Stdout(StreamData(b"hi\n".to_vec())),
                ProgramLine::Stderr(StreamData(b"oops".to_vec())),
                ProgramLine::Exited(ExitStatus {
                    code: Some(3),
                    ..Default::default()
                }),
            ],
        );
        assert_eq!(out[0], serde_json::json!({"event": {"start": {"pid": 7}}}));
        assert_eq!(
            out[1],
            serde_json::json!({"event": {"data": {"stdout": "aGkK"}}})
        );
        assert_eq!(
            out[2],
            serde_json::json!({"event": {"data": {"stderr": "b29wcw=="}}})
        );
        assert_eq!(out[3]["event"]["end"]["exitCode"], 3);
        assert_eq!(out[3]["event"]["end"]["error"], "exit status 3");
        assert_eq!(out[4], serde_json::json!({"end_of_stream": {}}));
        assert_eq!(out.len(), 5, "{out:?}");
    }

    #[test]
    fn a_followed_process_starts_with_its_id_and_a_cut_stream_ends_with_an_error() {
        let mut events = Events {
            started: false,
            ended: false,
            attached: Some(9),
            pty: true,
            sandbox_ending: Arc::default(),
        };
        let out = lines(
            &mut events,
            &[ProgramLine::Stdout(StreamData(b"x".to_vec()))],
        );
        assert_eq!(out[0], serde_json::json!({"event": {"start": {"pid": 9}}}));
        assert_eq!(
            out[1],
            serde_json::json!({"event": {"data": {"pty": "eA=="}}})
        );
        assert_eq!(out[2]["end_of_stream"]["error"]["code"], "unavailable");
    }

    #[test]
    fn a_process_that_ends_with_its_sandbox_has_its_stream_cut_off() {
        let mut events = Events {
            started: false,
            ended: false,
            attached: None,
            pty: false,
            sandbox_ending: Arc::new(AtomicBool::new(true)),
        };
        let out = lines(
            &mut events,
            &[
                ProgramLine::Started { pid: 7 },
                ProgramLine::Exited(ExitStatus {
                    signal: Some(libc::SIGKILL),
                    ..Default::default()
                }),
            ],
        );
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[1]["end_of_stream"]["error"]["code"], "unavailable");
    }

    #[test]
    fn ends_say_how_the_process_ended() {
        let killed = end_event(&ExitStatus {
            signal: Some(libc::SIGKILL),
            ..Default::default()
        });
        assert_eq!(killed.exit_code, -1);
        assert_eq!(killed.status, "signal: killed");
        assert!(!killed.exited);
        let fine = end_event(&ExitStatus {
            code: Some(0),
            ..Default::default()
        });
        assert!(fine.error.is_none());
        let named: pb::SendSignalRequest =
            parse(br#"{"process":{"pid":4},"signal":"SIGNAL_SIGKILL"}"#).unwrap();
        assert_eq!(signal_of(named.signal).unwrap(), 9);
        assert_eq!(signal_of(15).unwrap(), 15);
        assert!(signal_of(0).is_err(), "unspecified");
        assert!(signal_of(19).is_err());
        assert!(parse::<pb::SendSignalRequest>(br#"{"signal":"SIGNAL_SIGSTOP"}"#).is_err());
    }

    #[test]
    fn keep_alives_and_stream_input_are_shaped_as_e2b_s_messages() {
        let events = Events {
            started: true,
            ended: false,
            attached: None,
            pty: false,
            sandbox_ending: Arc::default(),
        };
        let keepalive = events.keepalive();
        assert_eq!(&keepalive[5..], br#"{"event":{"keepalive":{}}}"#);
        let request: pb::StreamInputRequest =
            parse(br#"{"data":{"input":{"stdin":"aGk="}}}"#).unwrap();
        let Some(stream_input_request::Event::Data(data)) = request.event else {
            panic!("{request:?}");
        };
        assert_eq!(
            data.input.and_then(|i| i.input),
            Some(process_input::Input::Stdin(b"hi".to_vec()))
        );
        assert!(
            pty_size(Some(pb::Pty {
                size: Some(pb::pty::Size {
                    cols: 70_000,
                    rows: 24
                })
            }))
            .is_err()
        );
    }
}
