//! The API's resources: which method and path ask for which [`Request`], both ways (the server
//! reads a request's method, path, query and JSON body into a [`Request`]; the client writes one
//! as a method, a path and a body), and the HTTP status of each error kind. `docs/openapi.json`
//! describes the same routes; a test keeps the two alike.

use hyper::{Method, StatusCode};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use agentos_protocol::files::FsOp;
use agentos_protocol::process::Control;
use agentos_protocol::{PtySize, StreamData};

use super::api::{
    ApiError, ControlCall, ErrorKind, FileRequest, FsCall, GroupInputRequest, GroupRequest,
    LogsRequest, NameRequest, PoolRequest, ProcessRequest, Request, RmRequest, WatchRequest,
    WriteFileRequest,
};

/// The OpenAPI document of these routes, served at [`OPENAPI_PATH`].
pub const OPENAPI: &str = include_str!("../../../../docs/openapi.json");
pub const OPENAPI_PATH: &str = "/openapi.json";

/// What a path segment keeps unescaped when the client writes a name into a path.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_');

/// A request as HTTP: what the client sends for a [`Request`].
#[derive(Debug, PartialEq, Eq)]
pub struct HttpCall {
    pub method: Method,
    /// The path and its query, escaped.
    pub target: String,
    /// JSON, for the requests that carry a body.
    pub body: Option<Vec<u8>>,
}

/// Reads `method` on `path` (escaped, without its query) with `query` and `body` as the request
/// they ask for.
pub fn route(
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: &[u8],
) -> Result<Request, ApiError> {
    let segments: Vec<String> = path
        .strip_prefix('/')
        .unwrap_or(path)
        .split('/')
        .map(decode)
        .collect::<Result<_, _>>()?;
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let resource = match segments.as_slice() {
        ["version"] => Resource::Version,
        ["metrics"] => Resource::Metrics,
        ["models"] => Resource::Models,
        ["agents"] => Resource::Agents,
        ["agents", name] => Resource::Agent(name),
        ["agents", name, "files"] => Resource::AgentFiles(name),
        ["agents", name, "processes"] => Resource::Processes(name),
        ["agents", name, "processes", pid, action] => {
            Resource::Process(name, process_id(pid)?, action)
        }
        ["agents", name, "files", action] => Resource::AgentFilesAction(name, action),
        ["agents", name, action] => Resource::AgentAction(name, action),
        ["groups"] => Resource::Groups,
        ["groups", group] => Resource::Group(group),
        ["groups", group, "input"] => Resource::GroupInput(group),
        ["pools"] => Resource::Pools,
        ["pools", name] => Resource::Pool(name),
        _ => return Err(not_found(path)),
    };
    let wrong_method = |allowed: &str| {
        ApiError::new(
            ErrorKind::MethodNotAllowed,
            format!("{path} takes {allowed}, not {method} (see /openapi.json)"),
        )
    };
    let request = match (resource, method.clone()) {
        (Resource::Version, Method::GET) => no_input(Request::Version, query, body)?,
        (Resource::Version, _) => return Err(wrong_method("GET")),
        (Resource::Metrics, Method::GET) => no_input(Request::Metrics, query, body)?,
        (Resource::Metrics, _) => return Err(wrong_method("GET")),
        (Resource::Models, Method::GET) => no_input(Request::Models, query, body)?,
        (Resource::Models, _) => return Err(wrong_method("GET")),
        (Resource::Agents, Method::GET) => no_input(Request::Ps, query, body)?,
        (Resource::Agents, Method::POST) => Request::Spawn(json(no_query(query, body)?, None)?),
        (Resource::Agents, _) => return Err(wrong_method("GET or POST")),
        (Resource::Agent(name), Method::DELETE) => {
            let RmQuery { force } = from_query(query)?;
            no_body(body)?;
            Request::Rm(RmRequest {
                name: name.to_owned(),
                force,
            })
        }
        (Resource::Agent(name), Method::GET) => no_input(
            Request::Inspect(NameRequest {
                name: name.to_owned(),
            }),
            query,
            body,
        )?,
        (Resource::Agent(_), _) => return Err(wrong_method("GET or DELETE")),
        (Resource::AgentAction(name, "logs"), Method::GET) => {
            let LogsQuery { offset } = from_query(query)?;
            no_body(body)?;
            Request::Logs(LogsRequest {
                name: name.to_owned(),
                offset,
            })
        }
        (Resource::AgentAction(_, "logs"), _) => return Err(wrong_method("GET")),
        (Resource::AgentAction(name, action), Method::POST) => {
            let body = no_query(query, body)?;
            let named = Some(("name", name));
            match action {
                "stop" => Request::Stop(json::<NameRequest>(body, named)?),
                "pause" => Request::Pause(json::<NameRequest>(body, named)?),
                "resume" => Request::Resume(json::<NameRequest>(body, named)?),
                "exec" => Request::Exec(json(body, named)?),
                "infer" => Request::Infer(json(body, named)?),
                "snapshot" => Request::Snapshot(json(body, named)?),
                _ => return Err(not_found(path)),
            }
        }
        (
            Resource::AgentAction(_, "stop" | "pause" | "resume" | "exec" | "infer" | "snapshot"),
            _,
        ) => {
            return Err(wrong_method("POST"));
        }
        (Resource::AgentAction(..), _) => return Err(not_found(path)),
        (Resource::Processes(name), Method::GET) => no_input(
            Request::Processes(NameRequest {
                name: name.to_owned(),
            }),
            query,
            body,
        )?,
        (Resource::Processes(name), Method::POST) => {
            Request::Start(json(no_query(query, body)?, Some(("name", name)))?)
        }
        (Resource::Processes(_), _) => return Err(wrong_method("GET or POST")),
        (Resource::Process(name, pid, "output"), Method::GET) => no_input(
            Request::Attach(ProcessRequest {
                name: name.to_owned(),
                pid,
            }),
            query,
            body,
        )?,
        (Resource::Process(_, _, "output"), _) => return Err(wrong_method("GET")),
        (Resource::Process(name, pid, action), Method::POST) => {
            let body = no_query(query, body)?;
            let control = match action {
                // The bytes as they are: no JSON around them.
                "stdin" => Control::Stdin {
                    data: StreamData(body.to_vec()),
                },
                "close_stdin" => {
                    no_body(body)?;
                    Control::CloseStdin
                }
                "signal" => {
                    let SignalBody { signal } = json(body, None)?;
                    Control::Signal { signal }
                }
                "resize" => {
                    let PtySize { cols, rows } = json(body, None)?;
                    Control::Resize { cols, rows }
                }
                _ => return Err(not_found(path)),
            };
            Request::Control(ControlCall {
                name: name.to_owned(),
                pid,
                control,
            })
        }
        (Resource::Process(_, _, "stdin" | "close_stdin" | "signal" | "resize"), _) => {
            return Err(wrong_method("POST"));
        }
        (Resource::Process(..), _) => return Err(not_found(path)),
        (Resource::AgentFiles(name), Method::GET) => {
            let PathQuery { path } = from_query(query)?;
            no_body(body)?;
            Request::ReadFile(FileRequest {
                name: name.to_owned(),
                path,
            })
        }
        (Resource::AgentFiles(name), Method::PUT) => {
            let WriteQuery {
                path,
                mode,
                user,
                in_place,
            } = from_query(query)?;
            Request::WriteFile(WriteFileRequest {
                name: name.to_owned(),
                path,
                mode: mode.as_deref().map(octal_mode).transpose()?,
                user,
                in_place,
            })
        }
        (Resource::AgentFiles(name), Method::DELETE) => {
            let PathQuery { path } = from_query(query)?;
            no_body(body)?;
            fs(name, FsOp::Remove { path })
        }
        (Resource::AgentFiles(_), _) => return Err(wrong_method("GET, PUT or DELETE")),
        (Resource::AgentFilesAction(name, "stat"), Method::GET) => {
            let PathQuery { path } = from_query(query)?;
            no_body(body)?;
            fs(name, FsOp::Stat { path })
        }
        (Resource::AgentFilesAction(name, "list"), Method::GET) => {
            let ListQuery { path, depth } = from_query(query)?;
            no_body(body)?;
            fs(name, FsOp::List { path, depth })
        }
        (Resource::AgentFilesAction(name, "watch"), Method::GET) => {
            let WatchQuery { path, recursive } = from_query(query)?;
            no_body(body)?;
            Request::Watch(WatchRequest {
                name: name.to_owned(),
                path,
                recursive,
            })
        }
        (Resource::AgentFilesAction(_, "stat" | "list" | "watch"), _) => {
            return Err(wrong_method("GET"));
        }
        (Resource::AgentFilesAction(name, "mkdir"), Method::POST) => {
            let MakeDirBody { path, user } = json(no_query(query, body)?, None)?;
            fs(name, FsOp::MakeDir { path, user })
        }
        (Resource::AgentFilesAction(name, "move"), Method::POST) => {
            let MoveBody { from, to } = json(no_query(query, body)?, None)?;
            fs(name, FsOp::Move { from, to })
        }
        (Resource::AgentFilesAction(_, "mkdir" | "move"), _) => return Err(wrong_method("POST")),
        (Resource::AgentFilesAction(..), _) => return Err(not_found(path)),
        (Resource::Groups, Method::POST) => Request::GroupUp(json(no_query(query, body)?, None)?),
        (Resource::Groups, _) => return Err(wrong_method("POST")),
        (Resource::Group(group), Method::DELETE) => {
            no_input((), query, body)?;
            Request::GroupDown(GroupRequest {
                group: group.to_owned(),
            })
        }
        (Resource::Group(_), _) => return Err(wrong_method("DELETE")),
        (Resource::GroupInput(group), Method::POST) => {
            Request::GroupInput(json::<GroupInputRequest>(
                no_query(query, body)?,
                Some(("group", group)),
            )?)
        }
        (Resource::GroupInput(_), _) => return Err(wrong_method("POST")),
        (Resource::Pools, Method::POST) => Request::PoolCreate(json(no_query(query, body)?, None)?),
        (Resource::Pools, _) => return Err(wrong_method("POST")),
        (Resource::Pool(name), Method::DELETE) => {
            no_input((), query, body)?;
            Request::PoolRm(PoolRequest {
                name: name.to_owned(),
            })
        }
        (Resource::Pool(_), _) => return Err(wrong_method("DELETE")),
    };
    super::api::check_durations(&request)?;
    Ok(request)
}

/// The query of `DELETE /agents/{name}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RmQuery {
    #[serde(default)]
    force: bool,
}

/// The query of `GET /agents/{name}/logs`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    #[serde(default)]
    offset: u64,
}

/// The body of `POST /agents/{name}/processes/{pid}/signal`.
#[derive(serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct SignalBody {
    signal: i32,
}

/// A process id in a path.
fn process_id(segment: &str) -> Result<u32, ApiError> {
    segment
        .parse()
        .map_err(|_| bad(format!("`{segment}` is not a process id")))
}

/// A path in an agent: the query of the file routes that take one, and the body of `mkdir`.
#[derive(serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct PathQuery {
    path: String,
}

/// The query of `PUT /agents/{name}/files`.
#[derive(serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct WriteQuery {
    path: String,
    /// Octal permission bits, as `chmod` takes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mode: Option<String>,
    /// The guest account that owns a new file and the directories made for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    /// Write into the file as the bytes come instead of replacing it once whole.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    in_place: bool,
}

/// The body of `POST /agents/{name}/files/mkdir`.
#[derive(serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct MakeDirBody {
    path: String,
    /// The guest account that owns the directories made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user: Option<String>,
}

/// The query of `GET /agents/{name}/files/list`.
#[derive(serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    path: String,
    #[serde(default = "one")]
    depth: u32,
}

fn one() -> u32 {
    1
}

/// The query of `GET /agents/{name}/files/watch`.
#[derive(serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct WatchQuery {
    path: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    recursive: bool,
}

/// The body of `POST /agents/{name}/files/move`.
#[derive(serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct MoveBody {
    from: String,
    to: String,
}

fn fs(name: &str, op: FsOp) -> Request {
    Request::Fs(FsCall {
        name: name.to_owned(),
        op,
    })
}

/// Permission bits written in octal (`644`, `0600`).
fn octal_mode(text: &str) -> Result<u32, ApiError> {
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|mode| *mode <= 0o7777 && !text.is_empty() && text.len() <= 5)
        .ok_or_else(|| {
            bad(format!(
                "`mode` is {text:?}: give octal permission bits, 0 to 7777"
            ))
        })
}

/// What a path names, its names decoded.
enum Resource<'a> {
    Version,
    Metrics,
    Models,
    Agents,
    Agent(&'a str),
    AgentAction(&'a str, &'a str),
    AgentFiles(&'a str),
    AgentFilesAction(&'a str, &'a str),
    Processes(&'a str),
    Process(&'a str, u32, &'a str),
    Groups,
    Group(&'a str),
    GroupInput(&'a str),
    Pools,
    Pool(&'a str),
}

/// Writes `request` as the client sends it.
pub fn call(request: &Request) -> HttpCall {
    let (method, target, body) = match request {
        Request::Version => (Method::GET, "/version".to_owned(), None),
        Request::Metrics => (Method::GET, "/metrics".to_owned(), None),
        Request::Ps => (Method::GET, "/agents".to_owned(), None),
        Request::Models => (Method::GET, "/models".to_owned(), None),
        Request::Inspect(one) => (Method::GET, format!("/agents/{}", segment(&one.name)), None),
        Request::Spawn(spawn) => (Method::POST, "/agents".to_owned(), Some(body(spawn, None))),
        Request::Rm(rm) => (
            Method::DELETE,
            format!(
                "/agents/{}{}",
                segment(&rm.name),
                if rm.force { "?force=true" } else { "" }
            ),
            None,
        ),
        Request::Logs(logs) => (
            Method::GET,
            format!(
                "/agents/{}/logs?offset={}",
                segment(&logs.name),
                logs.offset
            ),
            None,
        ),
        Request::Stop(stop) => agent_action(&stop.name, "stop", stop),
        Request::Pause(pause) => agent_action(&pause.name, "pause", pause),
        Request::Resume(resume) => agent_action(&resume.name, "resume", resume),
        Request::Exec(exec) => agent_action(&exec.name, "exec", exec),
        Request::Infer(infer) => agent_action(&infer.name, "infer", infer),
        Request::Snapshot(snapshot) => agent_action(&snapshot.name, "snapshot", snapshot),
        Request::GroupUp(up) => (Method::POST, "/groups".to_owned(), Some(body(up, None))),
        Request::GroupDown(down) => (
            Method::DELETE,
            format!("/groups/{}", segment(&down.group)),
            None,
        ),
        Request::GroupInput(input) => (
            Method::POST,
            format!("/groups/{}/input", segment(&input.group)),
            Some(body(input, Some("group"))),
        ),
        Request::PoolCreate(pool) => (Method::POST, "/pools".to_owned(), Some(body(pool, None))),
        Request::PoolRm(pool) => (
            Method::DELETE,
            format!("/pools/{}", segment(&pool.name)),
            None,
        ),
        Request::Watch(watch) => (
            Method::GET,
            files_target(
                &watch.name,
                "/watch",
                &WatchQuery {
                    path: watch.path.clone(),
                    recursive: watch.recursive,
                },
            ),
            None,
        ),
        Request::Start(start) => (
            Method::POST,
            format!("/agents/{}/processes", segment(&start.name)),
            Some(body(start, Some("name"))),
        ),
        Request::Processes(agent) => (
            Method::GET,
            format!("/agents/{}/processes", segment(&agent.name)),
            None,
        ),
        Request::Attach(process) => (
            Method::GET,
            format!(
                "/agents/{}/processes/{}/output",
                segment(&process.name),
                process.pid
            ),
            None,
        ),
        Request::Control(ControlCall { name, pid, control }) => {
            let target =
                |action: &str| format!("/agents/{}/processes/{pid}/{action}", segment(name));
            match control {
                Control::Stdin { data } => (Method::POST, target("stdin"), Some(data.0.clone())),
                Control::CloseStdin => (Method::POST, target("close_stdin"), None),
                Control::Signal { signal } => (
                    Method::POST,
                    target("signal"),
                    Some(body(&SignalBody { signal: *signal }, None)),
                ),
                Control::Resize { cols, rows } => (
                    Method::POST,
                    target("resize"),
                    Some(body(
                        &PtySize {
                            cols: *cols,
                            rows: *rows,
                        },
                        None,
                    )),
                ),
            }
        }
        Request::ReadFile(file) => (
            Method::GET,
            files_target(
                &file.name,
                "",
                &PathQuery {
                    path: file.path.clone(),
                },
            ),
            None,
        ),
        Request::WriteFile(file) => (
            Method::PUT,
            files_target(
                &file.name,
                "",
                &WriteQuery {
                    path: file.path.clone(),
                    mode: file.mode.map(|mode| format!("{mode:o}")),
                    user: file.user.clone(),
                    in_place: file.in_place,
                },
            ),
            None,
        ),
        Request::Fs(FsCall { name, op }) => match op {
            FsOp::Stat { path } => (
                Method::GET,
                files_target(name, "/stat", &PathQuery { path: path.clone() }),
                None,
            ),
            FsOp::List { path, depth } => (
                Method::GET,
                files_target(
                    name,
                    "/list",
                    &ListQuery {
                        path: path.clone(),
                        depth: *depth,
                    },
                ),
                None,
            ),
            FsOp::Remove { path } => (
                Method::DELETE,
                files_target(name, "", &PathQuery { path: path.clone() }),
                None,
            ),
            FsOp::MakeDir { path, user } => (
                Method::POST,
                format!("/agents/{}/files/mkdir", segment(name)),
                Some(body(
                    &MakeDirBody {
                        path: path.clone(),
                        user: user.clone(),
                    },
                    None,
                )),
            ),
            FsOp::Move { from, to } => (
                Method::POST,
                format!("/agents/{}/files/move", segment(name)),
                Some(body(
                    &MoveBody {
                        from: from.clone(),
                        to: to.clone(),
                    },
                    None,
                )),
            ),
        },
    };
    HttpCall {
        method,
        target,
        body,
    }
}

/// `/agents/{name}/files{action}?{query}`.
fn files_target(name: &str, action: &str, query: &impl Serialize) -> String {
    format!(
        "/agents/{}/files{action}?{}",
        segment(name),
        serde_urlencoded::to_string(query).unwrap_or_default()
    )
}

fn agent_action<T: Serialize>(
    name: &str,
    action: &str,
    request: &T,
) -> (Method, String, Option<Vec<u8>>) {
    (
        Method::POST,
        format!("/agents/{}/{action}", segment(name)),
        Some(body(request, Some("name"))),
    )
}

/// `request` as a JSON body, without the field the path carries.
fn body<T: Serialize>(request: &T, in_path: Option<&str>) -> Vec<u8> {
    let mut value = serde_json::to_value(request).unwrap_or_default();
    if let (Some(key), Some(fields)) = (in_path, value.as_object_mut()) {
        fields.remove(key);
    }
    serde_json::to_vec(&value).unwrap_or_default()
}

fn segment(name: &str) -> String {
    utf8_percent_encode(name, SEGMENT).to_string()
}

/// The HTTP status an error of `kind` is answered with.
pub fn status(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
        ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorKind::NotFound | ErrorKind::UnknownAgent | ErrorKind::UnknownGroup => {
            StatusCode::NOT_FOUND
        }
        ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::DuplicateName
        | ErrorKind::NotRunning
        | ErrorKind::AlreadyExists
        | ErrorKind::IsADirectory
        | ErrorKind::NotADirectory => StatusCode::CONFLICT,
        ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorKind::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
        ErrorKind::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::Busy => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::NoRoom | ErrorKind::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Failed => StatusCode::BAD_GATEWAY,
        ErrorKind::TimedOut => StatusCode::GATEWAY_TIMEOUT,
    }
}

/// The status a successful `request` is answered with: created for what makes a resource.
pub fn success(request: &Request) -> StatusCode {
    match request {
        Request::Spawn(_)
        | Request::GroupUp(_)
        | Request::PoolCreate(_)
        | Request::WriteFile(_)
        | Request::Start(_)
        | Request::Fs(FsCall {
            op: FsOp::MakeDir { .. },
            ..
        }) => StatusCode::CREATED,
        _ => StatusCode::OK,
    }
}

fn not_found(path: &str) -> ApiError {
    ApiError::new(
        ErrorKind::NotFound,
        format!("no resource at {path} (the API's paths are in /openapi.json and docs/api.md)"),
    )
}

fn bad(why: String) -> ApiError {
    ApiError::new(ErrorKind::BadRequest, format!("{why} (see docs/api.md)"))
}

fn decode(segment: &str) -> Result<String, ApiError> {
    percent_decode_str(segment)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| {
            bad(format!(
                "the path segment `{segment}` is not UTF-8 once unescaped"
            ))
        })
}

fn no_query<'b>(query: Option<&str>, body: &'b [u8]) -> Result<&'b [u8], ApiError> {
    match query.filter(|q| !q.is_empty()) {
        Some(query) => Err(bad(format!("this request takes no query, found `{query}`"))),
        None => Ok(body),
    }
}

fn no_body(body: &[u8]) -> Result<(), ApiError> {
    if body.is_empty() {
        Ok(())
    } else {
        Err(bad(format!(
            "this request takes no body, found {} bytes",
            body.len()
        )))
    }
}

fn no_input<T>(request: T, query: Option<&str>, body: &[u8]) -> Result<T, ApiError> {
    no_body(no_query(query, body)?)?;
    Ok(request)
}

fn from_query<T: DeserializeOwned>(query: Option<&str>) -> Result<T, ApiError> {
    serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|e| bad(format!("not a query this request takes: {e}")))
}

/// Reads `body` as a JSON object (an empty body is `{}`) and, with `in_path`, sets the field
/// the path carries; the body may not set it itself.
fn json<T: DeserializeOwned>(body: &[u8], in_path: Option<(&str, &str)>) -> Result<T, ApiError> {
    let mut value: serde_json::Value = if body.is_empty() {
        serde_json::Value::Object(Default::default())
    } else {
        serde_json::from_slice(body).map_err(|e| bad(format!("the body is not JSON: {e}")))?
    };
    let fields = value
        .as_object_mut()
        .ok_or_else(|| bad("the body is not a JSON object".into()))?;
    if let Some((key, name)) = in_path {
        if fields.contains_key(key) {
            return Err(bad(format!("`{key}` is in the path, not in the body")));
        }
        fields.insert(key.into(), serde_json::Value::String(name.into()));
    }
    serde_json::from_value(value).map_err(|e| bad(format!("not a request this path takes: {e}")))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::daemon::api::{
        ExecCall, GroupUpRequest, InferCall, PoolCreateRequest, SnapshotRequest, SpawnRequest,
        StartCall,
    };
    use agentos_protocol::{Program, Task};

    pub(in crate::daemon) fn every_request() -> Vec<Request> {
        let odd = "a b/../é%".to_owned();
        vec![
            Request::Version,
            Request::Metrics,
            Request::Ps,
            Request::Models,
            Request::Inspect(NameRequest { name: odd.clone() }),
            Request::Spawn(SpawnRequest {
                name: "a".into(),
                memory_mib: Some(256),
                wait: true,
                ..SpawnRequest::default()
            }),
            Request::Rm(RmRequest {
                name: odd.clone(),
                force: true,
            }),
            Request::Rm(RmRequest {
                name: "a".into(),
                force: false,
            }),
            Request::Logs(LogsRequest {
                name: "a".into(),
                offset: 77,
            }),
            Request::Stop(NameRequest { name: odd.clone() }),
            Request::Pause(NameRequest { name: odd.clone() }),
            Request::Resume(NameRequest { name: "a".into() }),
            Request::Exec(ExecCall {
                name: "a".into(),
                run: Program::new("/bin/echo"),
                stdin: Some("in".into()),
            }),
            Request::Infer(InferCall {
                name: "a".into(),
                model: None,
                task: Task::Classify,
                inputs: vec!["x".into()],
                options: Default::default(),
            }),
            Request::Snapshot(SnapshotRequest {
                name: "a".into(),
                to: "/snap".into(),
            }),
            Request::GroupUp(GroupUpRequest {
                file: "g.toml".into(),
                text: "name = \"g\"".into(),
                wait: false,
            }),
            Request::GroupDown(GroupRequest { group: odd.clone() }),
            Request::GroupInput(GroupInputRequest {
                group: "g".into(),
                text: "hi".into(),
                timeout_s: Some(5),
            }),
            Request::PoolCreate(PoolCreateRequest {
                name: "p".into(),
                from: "/snap".into(),
                size: 2,
            }),
            Request::PoolRm(PoolRequest { name: odd.clone() }),
            Request::ReadFile(FileRequest {
                name: odd.clone(),
                path: "/home/a b/&?=é%.txt".into(),
            }),
            Request::WriteFile(WriteFileRequest {
                name: "a".into(),
                path: "/x".into(),
                mode: Some(0o4755),
                user: Some("user".into()),
                in_place: true,
            }),
            Request::WriteFile(WriteFileRequest {
                name: "a".into(),
                path: "/x".into(),
                mode: None,
                user: None,
                in_place: false,
            }),
            fs("a", FsOp::Stat { path: "/".into() }),
            fs(
                &odd,
                FsOp::List {
                    path: "/a&b".into(),
                    depth: 3,
                },
            ),
            fs(
                "a",
                FsOp::MakeDir {
                    path: "/d".into(),
                    user: Some("user".into()),
                },
            ),
            fs(
                "a",
                FsOp::Move {
                    from: "/a".into(),
                    to: "/b".into(),
                },
            ),
            fs("a", FsOp::Remove { path: "/r".into() }),
            Request::Start(StartCall {
                name: odd.clone(),
                run: Program::new("/bin/cat"),
                stdin: true,
                detach: false,
                keep: true,
                tag: Some("t".into()),
                pty: Some(PtySize { cols: 80, rows: 24 }),
            }),
            Request::Control(ControlCall {
                name: "a".into(),
                pid: 7,
                control: Control::Resize { cols: 1, rows: 2 },
            }),
            Request::Processes(NameRequest { name: "a".into() }),
            Request::Watch(WatchRequest {
                name: "a".into(),
                path: "/w".into(),
                recursive: true,
            }),
            Request::Watch(WatchRequest {
                name: "a".into(),
                path: "/w".into(),
                recursive: false,
            }),
            Request::Attach(ProcessRequest {
                name: "a".into(),
                pid: 7,
            }),
            Request::Control(ControlCall {
                name: "a".into(),
                pid: 7,
                control: Control::Stdin {
                    data: StreamData(vec![0, 255, b'{']),
                },
            }),
            Request::Control(ControlCall {
                name: "a".into(),
                pid: 7,
                control: Control::CloseStdin,
            }),
            Request::Control(ControlCall {
                name: "a".into(),
                pid: 7,
                control: Control::Signal { signal: 15 },
            }),
        ]
    }

    fn read_back(call: &HttpCall) -> Result<Request, ApiError> {
        let (path, query) = match call.target.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (call.target.as_str(), None),
        };
        route(
            &call.method,
            path,
            query,
            call.body.as_deref().unwrap_or_default(),
        )
    }

    #[test]
    fn every_request_reads_back_as_itself() {
        for request in every_request() {
            let call = call(&request);
            assert_eq!(read_back(&call).unwrap(), request, "{call:?}");
        }
    }

    #[test]
    fn paths_and_bodies_are_checked() {
        let cases: &[(Method, &str, Option<&str>, &str, ErrorKind)] = &[
            (Method::GET, "/nowhere", None, "", ErrorKind::NotFound),
            (Method::GET, "/agents/a/b/c", None, "", ErrorKind::NotFound),
            (
                Method::POST,
                "/agents/a/launch",
                None,
                "{}",
                ErrorKind::NotFound,
            ),
            (
                Method::PUT,
                "/agents",
                None,
                "",
                ErrorKind::MethodNotAllowed,
            ),
            (
                Method::GET,
                "/agents/a/exec",
                None,
                "",
                ErrorKind::MethodNotAllowed,
            ),
            (
                Method::GET,
                "/version",
                Some("x=1"),
                "",
                ErrorKind::BadRequest,
            ),
            (Method::GET, "/version", None, "{}", ErrorKind::BadRequest),
            (
                Method::POST,
                "/agents",
                None,
                "{not json",
                ErrorKind::BadRequest,
            ),
            (Method::POST, "/agents", None, "[1]", ErrorKind::BadRequest),
            (
                Method::POST,
                "/agents",
                None,
                r#"{"name":7}"#,
                ErrorKind::BadRequest,
            ),
            (
                Method::POST,
                "/agents",
                None,
                r#"{"name":"a","memroy_mib":1}"#,
                ErrorKind::BadRequest,
            ),
            (
                Method::POST,
                "/agents/a/exec",
                None,
                "{}",
                ErrorKind::BadRequest,
            ),
            (
                Method::POST,
                "/agents/a/exec",
                None,
                r#"{"name":"b","run":{"program":"p"}}"#,
                ErrorKind::BadRequest,
            ),
            (
                Method::DELETE,
                "/agents/a",
                Some("force=maybe"),
                "",
                ErrorKind::BadRequest,
            ),
            (
                Method::DELETE,
                "/agents/a",
                Some("forse=true"),
                "",
                ErrorKind::BadRequest,
            ),
            (
                Method::GET,
                "/agents/%ff/logs",
                None,
                "",
                ErrorKind::BadRequest,
            ),
            (
                Method::POST,
                "/agents/a/exec",
                None,
                r#"{"run":{"program":"p","timeout_ms":0}}"#,
                ErrorKind::Invalid,
            ),
            (
                Method::GET,
                "/agents/a/files",
                None,
                "",
                ErrorKind::BadRequest,
            ),
            (
                Method::GET,
                "/agents/a/files",
                Some("path=/x&depth=2"),
                "",
                ErrorKind::BadRequest,
            ),
            (
                Method::PUT,
                "/agents/a/files",
                Some("path=/x&mode=8"),
                "",
                ErrorKind::BadRequest,
            ),
            (
                Method::PUT,
                "/agents/a/files",
                Some("path=/x&mode=17777"),
                "",
                ErrorKind::BadRequest,
            ),
            (
                Method::POST,
                "/agents/a/files",
                None,
                "",
                ErrorKind::MethodNotAllowed,
            ),
            (
                Method::GET,
                "/agents/a/files/list",
                Some("path=/&depth=-1"),
                "",
                ErrorKind::BadRequest,
            ),
            (
                Method::POST,
                "/agents/a/files/move",
                None,
                r#"{"from":"/a"}"#,
                ErrorKind::BadRequest,
            ),
            (
                Method::GET,
                "/agents/a/files/mkdir",
                Some("path=/d"),
                "",
                ErrorKind::MethodNotAllowed,
            ),
            (
                Method::GET,
                "/agents/a/files/chmod",
                None,
                "",
                ErrorKind::NotFound,
            ),
            (
                Method::GET,
                "/agents/a/processes/x/output",
                None,
                "",
                ErrorKind::BadRequest,
            ),
            (
                Method::POST,
                "/agents/a/processes/7/signal",
                None,
                r#"{"signal":"TERM"}"#,
                ErrorKind::BadRequest,
            ),
            (
                Method::POST,
                "/agents/a/processes/7/close_stdin",
                None,
                "x",
                ErrorKind::BadRequest,
            ),
            (
                Method::GET,
                "/agents/a/processes/7/stdin",
                None,
                "",
                ErrorKind::MethodNotAllowed,
            ),
            (
                Method::POST,
                "/agents/a/processes",
                None,
                r#"{"run":{"program":"p","timeout_ms":0}}"#,
                ErrorKind::Invalid,
            ),
        ];
        for (method, path, query, body, kind) in cases {
            let error = route(method, path, *query, body.as_bytes()).unwrap_err();
            assert_eq!(error.kind, *kind, "{method} {path}: {}", error.message);
        }
        // Names are unescaped: traversal reaches the daemon as a name, which it refuses.
        assert_eq!(
            route(&Method::DELETE, "/agents/..%2F..%2Fetc", None, b"").unwrap(),
            Request::Rm(RmRequest {
                name: "../../etc".into(),
                force: false
            })
        );
    }

    /// Each route's method and path pattern, as docs/openapi.json writes them.
    fn routes_of(request: &Request) -> (String, String) {
        let call = call(request);
        let path = call.target.split('?').next().unwrap_or_default();
        let segments: Vec<&str> = path.split('/').collect();
        let pattern = match segments.as_slice() {
            ["", "agents", _] => "/agents/{name}".to_owned(),
            ["", "agents", _, action] => format!("/agents/{{name}}/{action}"),
            ["", "agents", _, "files", action] => format!("/agents/{{name}}/files/{action}"),
            ["", "agents", _, "processes", _, action] => {
                format!("/agents/{{name}}/processes/{{pid}}/{action}")
            }
            ["", "groups", _] => "/groups/{group}".to_owned(),
            ["", "groups", _, "input"] => "/groups/{group}/input".to_owned(),
            ["", "pools", _] => "/pools/{name}".to_owned(),
            _ => path.to_owned(),
        };
        (call.method.as_str().to_lowercase(), pattern)
    }

    #[test]
    fn the_openapi_document_has_every_route_and_no_other() {
        let document: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let mut documented: Vec<(String, String)> = document["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, operations)| {
                operations
                    .as_object()
                    .unwrap()
                    .keys()
                    .filter(|key| *key != "parameters")
                    .map(move |method| (method.clone(), path.clone()))
            })
            .collect();
        let mut routed: Vec<(String, String)> = every_request().iter().map(routes_of).collect();
        routed.push(("get".into(), OPENAPI_PATH.into()));
        for list in [&mut documented, &mut routed] {
            list.sort();
            list.dedup();
        }
        assert_eq!(documented, routed);
    }
}
