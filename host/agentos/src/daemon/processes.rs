//! An agent's programs through the API, beyond `exec`: started and followed as they run (their
//! output streamed as it comes, without a cap), left running, listed, followed again, fed and
//! signalled by process id. Each request is a connection of its own to the guest agent (see
//! [`super::link`]); a followed program that was not left running ends when its client goes.

use std::time::Duration;

use bytes::Bytes;

use agentos_core::agent::connection::{
    AgentConnection, ConnectionError, Follow, Keepalive, ProgramEvent,
};
use agentos_protocol::process::{Control, Selector};
use agentos_protocol::{ExecRequest, StreamData};

use super::api::{ApiError, ErrorKind, ProcessesReply, ProgramLine, StartCall, StartedReply};
use super::link::{Chunks, Emit, GuestLink};

/// How often a quiet followed program's guest agent is pinged, and how long it may stay silent.
const KEEPALIVE: Keepalive = Keepalive {
    interval: Duration::from_secs(10),
    limit: Duration::from_secs(30),
};

impl GuestLink {
    /// Starts `call`'s program and follows it: the stream of its lines, once it started.
    pub async fn start_followed(self, call: StartCall) -> Result<Chunks, ApiError> {
        self.follow(Follow::Start(exec_request(call))).await
    }

    /// Follows the running program `pid` from now on.
    pub async fn attach(self, pid: u32) -> Result<Chunks, ApiError> {
        self.follow(Follow::Attach(Selector::Pid(pid))).await
    }

    async fn follow(self, what: Follow) -> Result<Chunks, ApiError> {
        let attached = match &what {
            Follow::Attach(Selector::Pid(pid)) => Some(*pid),
            _ => None,
        };
        self.stream(move |link, emit| {
            let mut conn = link.connect()?;
            conn.set_keepalive(Some(KEEPALIVE));
            conn.set_cancel_check(Some(emit.gone_check()));
            let followed = conn.follow(what, &mut |event| {
                let line = match event {
                    ProgramEvent::Started { pid } => ProgramLine::Started { pid },
                    ProgramEvent::Stdout(data) => ProgramLine::Stdout(StreamData(data.to_vec())),
                    ProgramEvent::Stderr(data) => ProgramLine::Stderr(StreamData(data.to_vec())),
                };
                send_line(emit, &line)
            });
            match followed {
                Ok(status) => {
                    let _ = send_line(emit, &ProgramLine::Exited(status));
                    Ok(())
                }
                // The client went: the connection closes, and with it a program not kept.
                Err(ConnectionError::Transfer(_)) => Ok(()),
                Err(e) => {
                    let error = match (attached, e) {
                        (Some(pid), ConnectionError::Refused(why)) => {
                            refused(link, &mut conn, pid, why)
                        }
                        (_, e) => link.error(e),
                    };
                    // Once the stream started, the failure is its last line.
                    if emit.started() {
                        let _ = send_line(emit, &ProgramLine::Error(error));
                        Ok(())
                    } else {
                        Err(error)
                    }
                }
            }
        })
        .await
    }

    /// Starts `call`'s program to run on by itself; its process id.
    pub async fn start_detached(self, call: StartCall) -> Result<serde_json::Value, ApiError> {
        self.blocking(move |link| {
            let mut conn = link.connect()?;
            let request = ExecRequest {
                run: call.run,
                stdin: call.stdin,
                tag: call.tag,
                pty: call.pty,
                ..ExecRequest::default()
            };
            let pid = conn.start_kept(request).map_err(|e| link.error(e))?;
            to_value(&StartedReply { pid })
        })
        .await
    }

    pub async fn processes(self) -> Result<serde_json::Value, ApiError> {
        self.blocking(|link| {
            let processes = link.connect()?.processes().map_err(|e| link.error(e))?;
            to_value(&ProcessesReply { processes })
        })
        .await
    }

    pub async fn control(self, pid: u32, control: Control) -> Result<serde_json::Value, ApiError> {
        self.blocking(move |link| {
            let mut conn = link.connect()?;
            match conn.control(pid, control) {
                Ok(()) => Ok(serde_json::json!({})),
                Err(ConnectionError::Refused(why)) => Err(refused(link, &mut conn, pid, why)),
                Err(e) => Err(link.error(e)),
            }
        })
        .await
    }
}

/// Why the guest refused a request about program `pid`: `not_found` when no such program runs
/// (as far as a look at the guest's table tells), its own words otherwise.
fn refused(link: &GuestLink, conn: &mut AgentConnection, pid: u32, why: String) -> ApiError {
    match conn.processes() {
        Ok(running) if !running.iter().any(|p| p.pid == pid) => ApiError::new(
            ErrorKind::NotFound,
            format!("agent `{}`: no process {pid} runs there", link.name),
        ),
        _ => link.error(ConnectionError::Refused(why)),
    }
}

/// What the guest agent is asked to start for `call` (the connection sets `keep` when it is
/// detached).
fn exec_request(call: StartCall) -> ExecRequest {
    ExecRequest {
        run: call.run,
        stdin: call.stdin,
        keep: call.keep,
        tag: call.tag,
        pty: call.pty,
        ..ExecRequest::default()
    }
}

fn send_line(emit: &mut Emit, line: &ProgramLine) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(line).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    emit.send(Bytes::from(bytes))
}

fn to_value(value: &impl serde::Serialize) -> Result<serde_json::Value, ApiError> {
    serde_json::to_value(value).map_err(|e| ApiError::new(ErrorKind::Failed, e.to_string()))
}
