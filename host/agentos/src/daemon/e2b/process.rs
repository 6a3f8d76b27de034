//! E2B's `process.Process` service: programs started and followed (a stream of `start`, `data`
//! and `end` events), followed again, listed, fed, signalled and resized, each translated into
//! the daemon's own program requests.

use std::collections::BTreeMap;

use bytes::Bytes;
use hyper::StatusCode;
use serde::{Deserialize, Serialize};

use agentos_protocol::process::{Control, ProcessInfo};
use agentos_protocol::{ExitStatus, Program, PtySize, StreamData};

use super::super::api::{
    ApiError, ControlCall, ErrorKind, MAX_TIMEOUT_S, NameRequest, ProcessRequest, ProcessesReply,
    ProgramLine, Request, StartCall,
};
use super::connect::{self, base64_bytes, parse};
use super::{Api, Call, Reply, Translate, relay};

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ProcessConfig {
    cmd: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    envs: BTreeMap<String, String>,
    #[serde(default)]
    cwd: Option<String>,
}

#[derive(Deserialize, Default, Clone, Copy)]
struct Size {
    cols: u16,
    rows: u16,
}

#[derive(Deserialize, Default)]
struct Pty {
    #[serde(default)]
    size: Option<Size>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StartRequest {
    process: ProcessConfig,
    #[serde(default)]
    pty: Option<Pty>,
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    stdin: Option<bool>,
}

/// A process by its id or its tag.
#[derive(Deserialize, Default)]
struct Selector {
    #[serde(default)]
    pid: Option<u32>,
    #[serde(default)]
    tag: Option<String>,
}

#[derive(Deserialize)]
struct ProcessOnly {
    process: Selector,
}

#[derive(Deserialize, Default)]
struct Input {
    #[serde(default, with = "base64_bytes")]
    stdin: Vec<u8>,
    #[serde(default, with = "base64_bytes")]
    pty: Vec<u8>,
}

#[derive(Deserialize)]
struct SendInputRequest {
    process: Selector,
    #[serde(default)]
    input: Input,
}

#[derive(Deserialize)]
struct SendSignalRequest {
    process: Selector,
    signal: serde_json::Value,
}

#[derive(Deserialize)]
struct UpdateRequest {
    process: Selector,
    #[serde(default)]
    pty: Option<Pty>,
}

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
            let request: ProcessOnly = parse(message)?;
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
            let request: SendInputRequest = parse(message)?;
            let pid = pid_of(call, request.process).await?;
            send_input(call, pid, request.input).await?;
            Ok(Reply::json(StatusCode::OK, &serde_json::json!({})))
        }
        "StreamInput" => stream_input(call, body).await,
        "CloseStdin" => {
            let request: ProcessOnly = parse(message)?;
            let pid = pid_of(call, request.process).await?;
            control(call, pid, Control::CloseStdin).await
        }
        "SendSignal" => {
            let request: SendSignalRequest = parse(message)?;
            let signal = signal_of(&request.signal)?;
            let pid = pid_of(call, request.process).await?;
            control(call, pid, Control::Signal { signal }).await
        }
        "Update" => {
            let request: UpdateRequest = parse(message)?;
            let pid = pid_of(call, request.process).await?;
            match request.pty.and_then(|p| p.size) {
                Some(Size { cols, rows }) => {
                    control(call, pid, Control::Resize { cols, rows }).await
                }
                None => Ok(Reply::json(StatusCode::OK, &serde_json::json!({}))),
            }
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

async fn start(call: &Call<'_, impl Api>, request: StartRequest) -> Result<Reply, ApiError> {
    let config = request.process;
    let mut env = call.sandbox.env.clone();
    env.extend(config.envs);
    let timeout_ms = call.timeout_ms.map(|ms| ms.min(MAX_TIMEOUT_S * 1000));
    let pty = request
        .pty
        .and_then(|p| p.size)
        .map(|Size { cols, rows }| PtySize { cols, rows });
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
    /// A followed process's id: its stream begins with a `start` event too.
    attached: Option<u32>,
    /// Output comes as `pty` data.
    pty: bool,
}

#[derive(Serialize)]
struct Event<T: Serialize> {
    event: T,
}

impl Events {
    fn begin(&mut self, out: &mut Vec<Bytes>) {
        if !self.started {
            self.started = true;
            if let Some(pid) = self.attached {
                out.push(connect::envelope(&Event {
                    event: serde_json::json!({ "start": { "pid": pid } }),
                }));
            }
        }
    }

    fn data(&self, stream: &str, data: &[u8]) -> Bytes {
        #[derive(Serialize)]
        struct Data<'a> {
            #[serde(with = "base64_bytes")]
            data: &'a [u8],
        }
        let key = if self.pty { "pty" } else { stream };
        let encoded = serde_json::to_value(Data { data }).unwrap_or_default();
        connect::envelope(&Event {
            event: serde_json::json!({ "data": { key: encoded["data"] } }),
        })
    }
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
                out.push(connect::envelope(&Event {
                    event: serde_json::json!({ "start": { "pid": pid } }),
                }));
            }
            ProgramLine::Stdout(StreamData(data)) => {
                self.begin(&mut out);
                out.push(self.data("stdout", &data));
            }
            ProgramLine::Stderr(StreamData(data)) => {
                self.begin(&mut out);
                out.push(self.data("stderr", &data));
            }
            ProgramLine::Exited(status) => {
                self.begin(&mut out);
                self.ended = true;
                out.push(connect::envelope(&Event {
                    event: serde_json::json!({ "end": end_event(&status) }),
                }));
                out.push(connect::end_of_stream(None));
            }
            ProgramLine::Error(error) => {
                self.ended = true;
                out.push(connect::end_of_stream(Some(&error)));
            }
        }
        out
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
fn end_event(status: &ExitStatus) -> serde_json::Value {
    let (code, text) = match (status.code, status.signal) {
        (Some(code), _) => (code, format!("exit status {code}")),
        (None, Some(signal)) => (-1, format!("signal: {}", signal_name(signal))),
        (None, None) => (-1, "exited".to_owned()),
    };
    let mut end = serde_json::json!({
        "exitCode": code,
        "exited": status.code.is_some(),
        "status": text,
    });
    if code != 0 {
        end["error"] = serde_json::Value::String(text);
    }
    end
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

/// E2B's `Signal` (a name or its number) as a signal number; only the ones it defines.
fn signal_of(value: &serde_json::Value) -> Result<i32, ApiError> {
    let signal = match value {
        serde_json::Value::String(name) => match name.as_str() {
            "SIGNAL_SIGKILL" => libc::SIGKILL,
            "SIGNAL_SIGTERM" => libc::SIGTERM,
            _ => 0,
        },
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(9) => libc::SIGKILL,
            Some(15) => libc::SIGTERM,
            _ => 0,
        },
        _ => 0,
    };
    if signal == 0 {
        return Err(ApiError::new(
            ErrorKind::BadRequest,
            format!("`signal` {value} is not one of SIGNAL_SIGKILL, SIGNAL_SIGTERM"),
        ));
    }
    Ok(signal)
}

/// The process a selector names: by id, or by tag among the running ones.
async fn pid_of(call: &Call<'_, impl Api>, selector: Selector) -> Result<u32, ApiError> {
    match selector {
        Selector { pid: Some(pid), .. } => Ok(pid),
        Selector { tag: Some(tag), .. } => processes(call)
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
        _ => Err(ApiError::new(
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
    let listed: Vec<serde_json::Value> = processes(call)
        .await?
        .into_iter()
        .map(|p| {
            let mut info = serde_json::json!({
                "pid": p.pid,
                "config": {
                    "cmd": p.run.program,
                    "args": p.run.args,
                    "envs": p.run.env,
                    "cwd": p.run.cwd,
                },
            });
            if let Some(tag) = p.tag {
                info["tag"] = serde_json::Value::String(tag);
            }
            info
        })
        .collect();
    Ok(Reply::json(
        StatusCode::OK,
        &serde_json::json!({ "processes": listed }),
    ))
}

async fn control(call: &Call<'_, impl Api>, pid: u32, control: Control) -> Result<Reply, ApiError> {
    call.api
        .call(Request::Control(ControlCall {
            name: call.sandbox.id.clone(),
            pid,
            control,
        }))
        .await?;
    Ok(Reply::json(StatusCode::OK, &serde_json::json!({})))
}

async fn send_input(call: &Call<'_, impl Api>, pid: u32, input: Input) -> Result<(), ApiError> {
    let data = if input.pty.is_empty() {
        input.stdin
    } else {
        input.pty
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
    .await?;
    Ok(())
}

/// `StreamInput`: a client stream of `start{process}`, then `data{input}` and `keepalive`
/// messages, each passed on in order.
async fn stream_input(call: &Call<'_, impl Api>, mut body: &[u8]) -> Result<Reply, ApiError> {
    #[derive(Deserialize)]
    struct Message {
        #[serde(default)]
        start: Option<ProcessOnly>,
        #[serde(default)]
        data: Option<DataMessage>,
    }
    #[derive(Deserialize)]
    struct DataMessage {
        #[serde(default)]
        input: Input,
    }
    let mut pid = None;
    while !body.is_empty() {
        let message = connect::unenvelope(body)?;
        let consumed = 5 + message.len();
        let flags = body[0];
        body = &body[consumed..];
        if flags & 2 != 0 {
            break;
        }
        let Ok(message) = serde_json::from_slice::<serde_json::Value>(message) else {
            return Err(ApiError::new(
                ErrorKind::BadRequest,
                "a StreamInput message is not JSON",
            ));
        };
        let Some(event) = message.get("event") else {
            continue;
        };
        let event: Message = serde_json::from_value(event.clone())
            .map_err(|e| ApiError::new(ErrorKind::BadRequest, e.to_string()))?;
        if let Some(start) = event.start {
            pid = Some(pid_of(call, start.process).await?);
        } else if let Some(data) = event.data {
            let Some(pid) = pid else {
                return Err(ApiError::new(
                    ErrorKind::BadRequest,
                    "StreamInput sent data before `start` named the process",
                ));
            };
            send_input(call, pid, data.input).await?;
        }
    }
    Ok(Reply::json(StatusCode::OK, &serde_json::json!({})))
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
    fn ends_say_how_the_process_ended() {
        let killed = end_event(&ExitStatus {
            signal: Some(libc::SIGKILL),
            ..Default::default()
        });
        assert_eq!(killed["exitCode"], -1);
        assert_eq!(killed["status"], "signal: killed");
        assert_eq!(killed["exited"], false);
        let fine = end_event(&ExitStatus {
            code: Some(0),
            ..Default::default()
        });
        assert!(fine.get("error").is_none());
        assert_eq!(signal_of(&serde_json::json!("SIGNAL_SIGKILL")).unwrap(), 9);
        assert_eq!(signal_of(&serde_json::json!(15)).unwrap(), 15);
        assert!(signal_of(&serde_json::json!("SIGNAL_SIGSTOP")).is_err());
        assert!(signal_of(&serde_json::json!(19)).is_err());
    }
}
