//! API requests as any local client may send them (a buggy one, or a program that opened the
//! daemon's socket by mistake): a method, a path, a query and a body, each arbitrary, read into a
//! request as the daemon routes what hyper has parsed (`routes::route`).
//!
//! A request it refuses must get an error of a kind a client can act on (`bad_request`,
//! `not_found`, `method_not_allowed`, or `invalid` for a duration out of its range) whose message
//! is one line of at most `MAX_ERROR_BYTES` (and a bit for the ellipsis), whatever the request
//! quoted. A request it accepts must be one of the documented operations, and written again as
//! the client writes it (`routes::call`), be read back as the same request.

#![no_main]

use agentos::daemon::api::{ApiError, ErrorKind, MAX_ERROR_BYTES, Request};
use agentos::daemon::routes::{call, route};
use hyper::Method;
use libfuzzer_sys::fuzz_target;

/// The operations docs/api.md documents.
const OPS: [&str; 17] = [
    "version",
    "spawn",
    "ps",
    "inspect",
    "models",
    "exec",
    "infer",
    "logs",
    "stop",
    "rm",
    "metrics",
    "group_up",
    "group_down",
    "group_input",
    "snapshot",
    "pool_create",
    "pool_rm",
];

const METHODS: [Method; 5] = [
    Method::GET,
    Method::POST,
    Method::DELETE,
    Method::PUT,
    Method::PATCH,
];

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let method = &METHODS[usize::from(which) % METHODS.len()];
    // The target's text up to the first zero byte, the body after it.
    let (target, body) = match rest.iter().position(|&b| b == 0) {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (rest, &[][..]),
    };
    let target = String::from_utf8_lossy(target);
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (&*target, None),
    };
    match route(method, path, query, body) {
        Ok(request) => accepted(&request),
        Err(error) => refused(error),
    }
});

fn accepted(request: &Request) {
    let op = request.op();
    assert!(OPS.contains(&op), "undocumented op `{op}`");
    let again = call(request);
    let (path, query) = match again.target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (again.target.as_str(), None),
    };
    let back = route(
        &again.method,
        path,
        query,
        again.body.as_deref().unwrap_or_default(),
    );
    assert!(
        back.as_ref().is_ok_and(|back| back == request),
        "{again:?} reads as {back:?}"
    );
}

fn refused(error: ApiError) {
    assert!(
        matches!(
            error.kind,
            ErrorKind::BadRequest
                | ErrorKind::Invalid
                | ErrorKind::NotFound
                | ErrorKind::MethodNotAllowed
        ),
        "{error:?}"
    );
    assert!(!error.message.trim().is_empty(), "{error:?}");
    assert!(!error.message.contains(['\n', '\r']), "{error:?}");
    assert!(error.message.len() <= MAX_ERROR_BYTES + 3, "{error:?}");
}
