//! E2B's `filesystem.Filesystem` service (stat, list, make a directory, move, remove, watch) and
//! its plain `/files` (a file's bytes out; files in, as multipart form parts or as the body
//! itself), each translated into the daemon's own file requests.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap};
use hyper::{Method, StatusCode};
use serde::Deserialize;
use tokio::sync::mpsc;

use agentos_e2b_proto::Timestamp;
use agentos_e2b_proto::filesystem::{self as pb, EntryInfo, FileType, watch_dir_response};
use agentos_protocol::files::{Entry, EntryKind, FsOp};

use super::super::api::{
    ApiError, ErrorKind, FileRequest, FsCall, ListReply, Request, WatchLine, WatchRequest,
    WriteFileRequest,
};
use super::connect::{self, parse};
use super::watchers::filesystem_event;
use super::{Api, Call, Reply, Translate, relay};

/// How long each piece of an upload may take to come.
const UPLOAD_STEP: Duration = Duration::from_secs(10);
/// Pieces of an upload in flight to the guest.
const UPLOAD_CHUNKS: usize = 4;
/// The deepest listing a client may ask for (the guest's own bound).
const MAX_DEPTH: u32 = 64;

/// Answers a call of `filesystem.Filesystem`.
pub async fn serve(
    call: &Call<'_, impl Api>,
    method: &str,
    message: &[u8],
) -> Result<Reply, ApiError> {
    match method {
        "Stat" => {
            let request: pb::StatRequest = parse(message)?;
            let path = call.path(&request.path);
            let entry = fs(call, FsOp::Stat { path: path.clone() }).await?;
            let entry = if entry.kind == EntryKind::Symlink {
                // As E2B's: a link is described by what it leads to, and where that is.
                let (target, resolved) = follow_links(call, &path).await?;
                EntryInfo {
                    symlink_target: Some(resolved),
                    ..entry_info(&Entry {
                        name: entry.name,
                        path: entry.path,
                        ..target
                    })
                }
            } else {
                entry_info(&entry)
            };
            Ok(Reply::json(
                StatusCode::OK,
                &pb::StatResponse { entry: Some(entry) },
            ))
        }
        "ListDir" => {
            let request: pb::ListDirRequest = parse(message)?;
            // protobuf's default, 0, is a listing of the directory itself, as 1.
            let depth = request.depth.clamp(1, MAX_DEPTH);
            let value = call
                .api
                .call(Request::Fs(FsCall {
                    name: call.sandbox.id.clone(),
                    op: FsOp::List {
                        path: call.path(&request.path),
                        depth,
                    },
                }))
                .await?;
            let listed: ListReply = serde_json::from_value(value)
                .map_err(|e| ApiError::new(ErrorKind::Failed, e.to_string()))?;
            let entries = listed.entries.iter().map(entry_info).collect();
            Ok(Reply::json(
                StatusCode::OK,
                &pb::ListDirResponse { entries },
            ))
        }
        "MakeDir" => {
            let request: pb::MakeDirRequest = parse(message)?;
            let entry = fs(
                call,
                FsOp::MakeDir {
                    path: call.path(&request.path),
                    user: Some(call.user.clone()),
                },
            )
            .await?;
            Ok(Reply::json(
                StatusCode::OK,
                &pb::MakeDirResponse {
                    entry: Some(entry_info(&entry)),
                },
            ))
        }
        "Move" => {
            let request: pb::MoveRequest = parse(message)?;
            let op = FsOp::Move {
                from: call.path(&request.source),
                to: call.path(&request.destination),
            };
            let entry = fs(call, op).await?;
            Ok(Reply::json(
                StatusCode::OK,
                &pb::MoveResponse {
                    entry: Some(entry_info(&entry)),
                },
            ))
        }
        "Remove" => {
            let request: pb::RemoveRequest = parse(message)?;
            let removed = call
                .api
                .call(Request::Fs(FsCall {
                    name: call.sandbox.id.clone(),
                    op: FsOp::Remove {
                        path: call.path(&request.path),
                    },
                }))
                .await;
            match removed {
                // As E2B's: what is not there is removed already.
                Ok(_) => {}
                Err(e) if e.kind == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            Ok(Reply::json(StatusCode::OK, &pb::RemoveResponse {}))
        }
        "WatchDir" => {
            let request: pb::WatchDirRequest = parse(message)?;
            let path = call.path(&request.path);
            let chunks = call
                .api
                .open(Request::Watch(WatchRequest {
                    name: call.sandbox.id.clone(),
                    path: path.clone(),
                    recursive: request.recursive,
                }))
                .await?;
            let events = WatchEvents {
                root: path,
                ended: false,
            };
            Ok(Reply::stream(
                connect::STREAM_JSON,
                relay(chunks, events, call.keepalive),
            ))
        }
        "CreateWatcher" => {
            let request: pb::CreateWatcherRequest = parse(message)?;
            let path = call.path(&request.path);
            let registry = call.api.registry();
            registry.check_watcher_room(&call.sandbox.id)?;
            let chunks = call
                .api
                .open(Request::Watch(WatchRequest {
                    name: call.sandbox.id.clone(),
                    path: path.clone(),
                    recursive: request.recursive,
                }))
                .await?;
            let id = super::random_text(16)?;
            registry.add_watcher(&id, &call.sandbox.id, path, chunks)?;
            Ok(Reply::json(
                StatusCode::OK,
                &pb::CreateWatcherResponse { watcher_id: id },
            ))
        }
        "GetWatcherEvents" => {
            let request: pb::GetWatcherEventsRequest = parse(message)?;
            let events = call
                .api
                .registry()
                .watcher_events(&request.watcher_id, &call.sandbox.id)?;
            Ok(Reply::json(
                StatusCode::OK,
                &pb::GetWatcherEventsResponse { events },
            ))
        }
        "RemoveWatcher" => {
            let request: pb::RemoveWatcherRequest = parse(message)?;
            call.api
                .registry()
                .remove_watcher(&request.watcher_id, &call.sandbox.id)?;
            Ok(Reply::json(StatusCode::OK, &pb::RemoveWatcherResponse {}))
        }
        _ => Err(ApiError::new(
            ErrorKind::MethodNotAllowed,
            format!(
                "filesystem.Filesystem/{} is not served",
                agentos_protocol::clip(method, 60)
            ),
        )),
    }
}

/// The most links followed from one path, as the kernel's own bound.
const MAX_LINKS: usize = 40;

/// What the symbolic link `path` leads to, and its absolute path, following links that lead to
/// links.
async fn follow_links(call: &Call<'_, impl Api>, path: &str) -> Result<(Entry, String), ApiError> {
    let mut at = path.to_owned();
    for _ in 0..MAX_LINKS {
        let entry = fs(call, FsOp::Stat { path: at.clone() }).await?;
        let target = match (&entry.kind, &entry.target) {
            (EntryKind::Symlink, Some(target)) => target.clone(),
            _ => return Ok((entry, at)),
        };
        at = if target.starts_with('/') {
            target
        } else {
            let parent = at.rsplit_once('/').map_or("", |(parent, _)| parent);
            normalize(&format!("{parent}/{target}"))
        };
    }
    Err(ApiError::new(
        ErrorKind::Invalid,
        format!("{path}: more than {MAX_LINKS} symbolic links in a row"),
    ))
}

/// `path` without `.` and `..` parts (lexically, as links are resolved one at a time here).
fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    format!("/{}", parts.join("/"))
}

/// An operation answered with an entry.
async fn fs(call: &Call<'_, impl Api>, op: FsOp) -> Result<Entry, ApiError> {
    let value = call
        .api
        .call(Request::Fs(FsCall {
            name: call.sandbox.id.clone(),
            op,
        }))
        .await?;
    serde_json::from_value(value).map_err(|e| ApiError::new(ErrorKind::Failed, e.to_string()))
}

/// An entry as E2B's `EntryInfo`.
fn entry_info(entry: &Entry) -> EntryInfo {
    let kind = match entry.kind {
        EntryKind::File => FileType::File,
        EntryKind::Dir => FileType::Directory,
        EntryKind::Symlink => FileType::Symlink,
        EntryKind::Other => FileType::Unspecified,
    };
    let modified_ms = entry.modified_ms.max(0);
    EntryInfo {
        name: entry.name.clone(),
        r#type: kind.into(),
        path: entry.path.clone(),
        size: i64::try_from(entry.size).unwrap_or(i64::MAX),
        mode: entry.mode,
        permissions: permissions(entry.kind, entry.mode),
        owner: account(entry.uid),
        group: account(entry.gid),
        modified_time: Some(Timestamp {
            seconds: modified_ms / 1000,
            // Below 1,000,000,000: the remainder of a division by 1000, in nanoseconds.
            nanos: i32::try_from(modified_ms % 1000).unwrap_or(0) * 1_000_000,
        }),
        symlink_target: entry.target.clone(),
        metadata: Default::default(),
    }
}

/// The names agent images give their accounts (`/etc/passwd`, `/etc/group`).
fn account(id: u32) -> String {
    match id {
        0 => "root".to_owned(),
        1000 => "user".to_owned(),
        id => id.to_string(),
    }
}

/// Permissions as `ls -l` shows them: `drwxr-xr-x`.
fn permissions(kind: EntryKind, mode: u32) -> String {
    let first = match kind {
        EntryKind::Dir => 'd',
        EntryKind::Symlink => 'l',
        EntryKind::File | EntryKind::Other => '-',
    };
    let mut text = String::from(first);
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        text.push(if bits & 4 != 0 { 'r' } else { '-' });
        text.push(if bits & 2 != 0 { 'w' } else { '-' });
        text.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    text
}

/// The daemon's watch lines as E2B's `WatchDirResponse`s.
struct WatchEvents {
    root: String,
    ended: bool,
}

fn watch_message(event: watch_dir_response::Event) -> Bytes {
    connect::envelope(&pb::WatchDirResponse { event: Some(event) })
}

impl Translate for WatchEvents {
    fn line(&mut self, line: &[u8]) -> Vec<Bytes> {
        let Ok(line) = serde_json::from_slice::<WatchLine>(line) else {
            return Vec::new();
        };
        match line {
            WatchLine::Watching { .. } => vec![watch_message(watch_dir_response::Event::Start(
                watch_dir_response::StartEvent {},
            ))],
            WatchLine::Change(change) => vec![watch_message(
                watch_dir_response::Event::Filesystem(filesystem_event(&self.root, &change)),
            )],
            WatchLine::Error(error) => {
                self.ended = true;
                vec![connect::end_of_stream(Some(&error))]
            }
        }
    }

    fn keepalive(&self) -> Bytes {
        watch_message(watch_dir_response::Event::Keepalive(
            watch_dir_response::KeepAlive {},
        ))
    }

    fn end(&mut self) -> Vec<Bytes> {
        if self.ended {
            Vec::new()
        } else {
            vec![connect::end_of_stream(None)]
        }
    }
}

#[derive(Deserialize, Default)]
struct FilesQuery {
    #[serde(default)]
    path: Option<String>,
    /// Older SDKs name the user here.
    #[serde(default)]
    username: Option<String>,
}

/// `GET /files?path=`: the file's bytes; `POST /files[?path=]`: files written from multipart
/// `file` parts (each named by its file name, or the one by `path`) or from the body itself
/// (`application/octet-stream`, with `path`). With `true` when the connection must close (the
/// body was not read whole).
pub async fn files<A: Api>(
    call: &Call<'_, A>,
    head: &hyper::http::request::Parts,
    body: Incoming,
) -> (Result<Reply, ApiError>, bool) {
    let query: FilesQuery = match serde_urlencoded::from_str(head.uri.query().unwrap_or("")) {
        Ok(query) => query,
        Err(e) => {
            let error = ApiError::new(
                ErrorKind::BadRequest,
                format!("the query is not valid: {e}"),
            );
            return (Err(error), true);
        }
    };
    if let Some(user) = &query.username
        && user != &call.user
    {
        let error = ApiError::new(
            ErrorKind::BadRequest,
            "name the user with `Authorization: Basic`, not `username`",
        );
        return (Err(error), true);
    }
    match head.method {
        Method::GET => (read(call, query.path).await, true),
        Method::POST => {
            let written = write(call, &head.headers, query.path, body).await;
            let close = written.is_err();
            (written, close)
        }
        _ => (
            Err(ApiError::new(
                ErrorKind::MethodNotAllowed,
                "/files takes GET and POST",
            )),
            true,
        ),
    }
}

async fn read(call: &Call<'_, impl Api>, path: Option<String>) -> Result<Reply, ApiError> {
    let Some(path) = path else {
        return Err(ApiError::new(
            ErrorKind::BadRequest,
            "name the file with `?path=`",
        ));
    };
    let chunks = call
        .api
        .open(Request::ReadFile(FileRequest {
            name: call.sandbox.id.clone(),
            path: call.path(&path),
        }))
        .await?;
    Ok(Reply::stream(
        "application/octet-stream",
        super::ChunkBody(chunks),
    ))
}

/// Refuses, before a byte of it is read, an upload whose declared length is more than the
/// sandbox's memory, where its files live (one that is not declared, or that the guest finds no
/// room for on the way, ends `no_space`, the part written removed).
async fn check_room(call: &Call<'_, impl Api>, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(declared) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
    else {
        return Ok(());
    };
    let (_, agent) = super::sandboxes::find(call.api, &call.sandbox.id).await?;
    let memory = agent.memory_mib.saturating_mul(1 << 20);
    if declared > memory {
        return Err(ApiError::new(
            ErrorKind::TooLarge,
            format!(
                "an upload of {declared} bytes is more than the sandbox's memory ({} MiB), where its files live",
                agent.memory_mib
            ),
        ));
    }
    Ok(())
}

async fn write(
    call: &Call<'_, impl Api>,
    headers: &HeaderMap,
    path: Option<String>,
    body: Incoming,
) -> Result<Reply, ApiError> {
    let gzip = match headers.get(header::CONTENT_ENCODING).map(|v| v.as_bytes()) {
        None | Some(b"identity") => false,
        Some(b"gzip") => true,
        Some(_) => {
            return Err(ApiError::new(
                ErrorKind::BadRequest,
                "an upload's `Content-Encoding` is `gzip` or none",
            ));
        }
    };
    check_room(call, headers).await?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if gzip && content_type.starts_with("multipart/form-data") {
        return Err(ApiError::new(
            ErrorKind::BadRequest,
            "a compressed upload is one file as the body (`application/octet-stream`), not multipart",
        ));
    }
    let mut written = Vec::new();
    if content_type.starts_with("multipart/form-data") {
        let boundary = multer::parse_boundary(content_type).map_err(|e| {
            ApiError::new(
                ErrorKind::BadRequest,
                format!("the multipart body has no boundary: {e}"),
            )
        })?;
        let mut parts = multer::Multipart::new(body.into_data_stream(), boundary);
        let mut named = path;
        loop {
            let field = tokio::time::timeout(UPLOAD_STEP, parts.next_field())
                .await
                .map_err(|_| cut_off("the next part did not come in time".into()))?
                .map_err(|e| cut_off(e.to_string()))?;
            let Some(mut field) = field else {
                break;
            };
            if field.name() != Some("file") {
                continue;
            }
            let Some(path) = named
                .take()
                .or_else(|| field.file_name().map(str::to_owned))
            else {
                return Err(ApiError::new(
                    ErrorKind::BadRequest,
                    "a `file` part has no file name and the request no `?path=`",
                ));
            };
            written.push(write_one(call, call.path(&path), Part(&mut field)).await?);
        }
    } else {
        let Some(path) = path else {
            return Err(ApiError::new(
                ErrorKind::BadRequest,
                "name the file with `?path=`",
            ));
        };
        let path = call.path(&path);
        let one = if gzip {
            write_one(call, path, Gunzip::new(body)).await?
        } else {
            write_one(call, path, body).await?
        };
        written.push(one);
    }
    if written.is_empty() {
        return Err(ApiError::new(
            ErrorKind::BadRequest,
            "the body holds no `file` part",
        ));
    }
    Ok(Reply::json(StatusCode::OK, &written))
}

fn cut_off(why: String) -> ApiError {
    ApiError::new(
        ErrorKind::BadRequest,
        format!("the upload was cut off or malformed ({why}); nothing of that part was written"),
    )
}

/// Where an upload's bytes come from, piece by piece (`None` at its end).
trait Pieces {
    fn next(&mut self) -> impl Future<Output = io::Result<Option<Bytes>>>;
}

/// A request's body.
impl Pieces for Incoming {
    async fn next(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            match self.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(io::Error::other(e)),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }
}

/// A part of a multipart body.
struct Part<'a, 'b>(&'a mut multer::Field<'b>);

impl Pieces for Part<'_, '_> {
    async fn next(&mut self) -> io::Result<Option<Bytes>> {
        self.0.chunk().await.map_err(io::Error::other)
    }
}

/// Compressed input fed to the decoder at a time: deflate expands a byte to 1,032 at most, so
/// one step's output stays near 4 MiB whatever the input.
const GUNZIP_STEP: usize = 4096;
/// Decompressed bytes handed on at a time.
const GUNZIP_OUT: usize = 256 * 1024;

/// Pieces of a gzip stream, decompressed as they come.
struct Gunzip<P> {
    inner: P,
    decoder: flate2::write::GzDecoder<Vec<u8>>,
    /// Compressed bytes not fed to the decoder yet.
    pending: Bytes,
    ended: bool,
}

impl<P: Pieces> Gunzip<P> {
    fn new(inner: P) -> Self {
        Self {
            inner,
            decoder: flate2::write::GzDecoder::new(Vec::new()),
            pending: Bytes::new(),
            ended: false,
        }
    }
}

impl<P: Pieces> Pieces for Gunzip<P> {
    async fn next(&mut self) -> io::Result<Option<Bytes>> {
        use std::io::Write;
        loop {
            while !self.pending.is_empty() && self.decoder.get_ref().len() < GUNZIP_OUT {
                let step = self.pending.split_to(self.pending.len().min(GUNZIP_STEP));
                self.decoder.write_all(&step)?;
            }
            if !self.decoder.get_ref().is_empty() {
                return Ok(Some(Bytes::from(std::mem::take(self.decoder.get_mut()))));
            }
            if self.ended {
                return Ok(None);
            }
            match self.inner.next().await? {
                Some(data) => self.pending = data,
                None => {
                    self.decoder.try_finish()?;
                    self.ended = true;
                }
            }
        }
    }
}

/// Writes one file from `pieces`, each within [`UPLOAD_STEP`]; E2B's `WriteInfo` of it.
async fn write_one(
    call: &Call<'_, impl Api>,
    path: String,
    mut pieces: impl Pieces,
) -> Result<serde_json::Value, ApiError> {
    let (tx, rx) = mpsc::channel(UPLOAD_CHUNKS);
    let pump = async move {
        loop {
            match tokio::time::timeout(UPLOAD_STEP, pieces.next()).await {
                Ok(Ok(Some(data))) => {
                    if !data.is_empty() && tx.send(Ok(data)).await.is_err() {
                        return;
                    }
                }
                Ok(Ok(None)) => {
                    let _ = tx.send(Ok(Bytes::new())).await;
                    return;
                }
                Ok(Err(e)) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                Err(_) => {
                    let why = format!("no part of the body came for {} s", UPLOAD_STEP.as_secs());
                    let _ = tx
                        .send(Err(io::Error::new(io::ErrorKind::TimedOut, why)))
                        .await;
                    return;
                }
            }
        }
    };
    let request = WriteFileRequest {
        name: call.sandbox.id.clone(),
        path: path.clone(),
        mode: None,
        user: Some(call.user.clone()),
        // As E2B's: the file is written where it is, so a watcher sees it written.
        in_place: true,
    };
    let ((), written) = tokio::join!(pump, call.api.write_file(request, rx));
    written?;
    let name = path.rsplit('/').next().unwrap_or_default().to_owned();
    Ok(serde_json::json!({ "name": name, "type": "file", "path": path }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_shown_as_e2b_shows_them() {
        let entry = Entry {
            name: "x".into(),
            path: "/home/user/x".into(),
            kind: EntryKind::File,
            size: 12,
            mode: 0o644,
            uid: 1000,
            gid: 1000,
            modified_ms: 1_500,
            target: None,
        };
        let info = serde_json::to_value(entry_info(&entry)).unwrap();
        assert_eq!(info["type"], "FILE_TYPE_FILE");
        assert_eq!(info["size"], "12");
        assert_eq!(info["mode"], 0o644);
        assert_eq!(info["permissions"], "-rw-r--r--");
        assert_eq!(info["owner"], "user");
        let modified = info["modifiedTime"].as_str().unwrap();
        assert!(modified.starts_with("1970-01-01T00:00:01.5"), "{modified}");
        assert!(info.get("symlinkTarget").is_none());
        assert_eq!(permissions(EntryKind::Dir, 0o755), "drwxr-xr-x");
        assert_eq!(account(0), "root");
        assert_eq!(normalize("/home/user/d/./../x//y"), "/home/user/x/y");
        assert_eq!(normalize("/.."), "/");
        assert_eq!(account(42), "42");
    }

    /// Pieces from a list.
    struct Given(std::collections::VecDeque<Bytes>);

    impl Pieces for Given {
        async fn next(&mut self) -> io::Result<Option<Bytes>> {
            Ok(self.0.pop_front())
        }
    }

    async fn gunzipped(compressed: &[u8], piece: usize) -> io::Result<Vec<u8>> {
        let pieces = compressed
            .chunks(piece)
            .map(Bytes::copy_from_slice)
            .collect();
        let mut gunzip = Gunzip::new(Given(pieces));
        let mut out = Vec::new();
        while let Some(data) = gunzip.next().await? {
            assert!(
                data.len() <= GUNZIP_OUT + GUNZIP_STEP * 1032,
                "{}",
                data.len()
            );
            out.extend_from_slice(&data);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn gzip_bodies_are_decompressed_a_bounded_piece_at_a_time() {
        use std::io::Write;
        // Zeros compress about a thousandfold: a small body that decompresses large.
        let data: Vec<u8> = (0..8u32 << 20)
            .map(|i| if i % 4096 == 0 { i as u8 } else { 0 })
            .collect();
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(&data).unwrap();
        let compressed = encoder.finish().unwrap();
        assert!(compressed.len() < data.len() / 100);
        for piece in [1, 1000, compressed.len()] {
            assert!(
                gunzipped(&compressed, piece).await.unwrap() == data,
                "piece {piece}"
            );
        }
        let cut = &compressed[..compressed.len() / 2];
        assert!(
            gunzipped(cut, 512).await.is_err(),
            "a stream cut short is an error"
        );
        assert!(gunzipped(b"not gzip at all", 4).await.is_err());
    }

    #[test]
    fn watch_changes_are_named_from_the_watched_directory() {
        let mut events = WatchEvents {
            root: "/home/user/d".into(),
            ended: false,
        };
        let line = serde_json::to_vec(&WatchLine::Change(agentos_protocol::files::Change {
            kind: agentos_protocol::files::ChangeKind::Create,
            path: "/home/user/d/sub/f".into(),
        }))
        .unwrap();
        let out = events.line(&line);
        let value: serde_json::Value = serde_json::from_slice(&out[0][5..]).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"filesystem": {"name": "sub/f", "type": "EVENT_TYPE_CREATE"}})
        );
        assert_eq!(&events.keepalive()[5..], br#"{"keepalive":{}}"#);
        assert_eq!(events.end().len(), 1, "the stream ends");
    }
}
