//! The envd API, served on the host for every sandbox and routed by the `E2b-Sandbox-Id`
//! header: `process.Process` (Start, Connect, List, SendInput, SendSignal, CloseStdin) with
//! streamed output, `filesystem.Filesystem` (Stat, ListDir, MakeDir, Move, Remove),
//! `GET`/`POST /files` and `/health`. Every call goes to the Kiln agent through the `kiln`
//! library ([`crate::backend::Guest`]); blocking calls run on `spawn_blocking` or on one
//! dedicated thread per process.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{Read, Write};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use kiln::{ExecEvent, ExitStatus, FileKind};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::backend::{Entry, ExecSpec, Fail, FailKind, Guest, Stat};
use crate::connect::{self, json_response, Code, RpcError};
use crate::state::{lock, rfc3339_ns, AppState, Frame, Proc, ProcConfig, SandboxEntry};

/// The envd port the SDK names in `E2b-Sandbox-Port`.
pub const ENVD_PORT: u16 = 49983;

/// Frames buffered per stream subscriber.
const STREAM_BUFFER: usize = 64;

/// Stdin chunks buffered per process.
const STDIN_BUFFER: usize = 64;

/// Most directory levels `ListDir` walks.
const MAX_DEPTH: u64 = 16;

/// Most entries `ListDir` returns.
const MAX_ENTRIES: usize = 10_000;

/// The 502 E2B's edge answers for a sandbox that is gone (the SDK matches "was not found").
pub fn sandbox_gone(id: &str) -> Response {
    json_response(
        StatusCode::BAD_GATEWAY,
        &json!({"sandboxId": id, "code": 502, "message": format!("The sandbox {id} was not found")}),
    )
}

/// Which kind of route asks (their error bodies differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plane {
    Rpc,
    Http,
}

/// Finds the sandbox of an envd request and checks its access token (the error is the
/// response to send; returned by value on the cold path).
#[allow(clippy::result_large_err)]
fn resolve(
    state: &AppState,
    headers: &HeaderMap,
    plane: Plane,
) -> Result<Arc<SandboxEntry>, Response> {
    let id = headers
        .get("e2b-sandbox-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if id.is_empty() {
        return Err(json_response(
            StatusCode::BAD_REQUEST,
            &json!({"code": 400, "message": "missing E2b-Sandbox-Id header"}),
        ));
    }
    if let Some(port) = headers
        .get("e2b-sandbox-port")
        .and_then(|v| v.to_str().ok())
    {
        if port != ENVD_PORT.to_string() {
            return Err(json_response(
                StatusCode::BAD_GATEWAY,
                &json!({"sandboxId": id, "code": 502,
                        "message": format!("The sandbox is running but port is not open: {port}")}),
            ));
        }
    }
    let Some(entry) = state.get(id) else {
        return Err(sandbox_gone(id));
    };
    let token = headers
        .get("x-access-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !constant_time_eq(token.as_bytes(), entry.access_token.as_bytes()) {
        let msg = "invalid or missing access token for this sandbox";
        return Err(match plane {
            Plane::Rpc => RpcError::new(Code::Unauthenticated, msg).into_response(),
            Plane::Http => json_response(
                StatusCode::UNAUTHORIZED,
                &json!({"code": 401, "message": msg}),
            ),
        });
    }
    Ok(entry)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The user of an RPC: `Authorization: Basic base64("<user>:")`, else the template's.
fn rpc_user(entry: &SandboxEntry, headers: &HeaderMap) -> Option<String> {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| B64.decode(b.trim()).ok())
        .and_then(|d| String::from_utf8(d).ok())
        .map(|s| s.split(':').next().unwrap_or("").to_string())
        .filter(|u| !u.is_empty());
    basic.or_else(|| entry.template.user.clone())
}

/// The home directory of `user` in this sandbox.
fn home_of(entry: &SandboxEntry, user: Option<&str>) -> String {
    match user {
        None | Some("root") => "/root".into(),
        Some(u) if Some(u) == entry.template.user.as_deref() => entry.template.home.clone(),
        Some(u) => format!("/home/{u}"),
    }
}

/// Resolves a client path against the user's home; refuses empty paths and NULs.
fn resolve_path(path: &str, home: &str) -> Result<String, Fail> {
    if path.is_empty() {
        return Err(Fail::new(FailKind::InvalidArgument, "path is empty"));
    }
    if path.contains('\0') {
        return Err(Fail::new(FailKind::InvalidArgument, "path contains NUL"));
    }
    if path.starts_with('/') {
        Ok(path.to_string())
    } else if let Some(rest) = path.strip_prefix("~/") {
        Ok(format!("{}/{rest}", home.trim_end_matches('/')))
    } else {
        Ok(format!("{}/{path}", home.trim_end_matches('/')))
    }
}

fn rpc_error(f: &Fail) -> RpcError {
    let code = match f.kind {
        FailKind::NotFound => Code::NotFound,
        FailKind::AlreadyExists => Code::AlreadyExists,
        FailKind::InvalidArgument => Code::InvalidArgument,
        FailKind::PermissionDenied => Code::PermissionDenied,
        FailKind::Dead => Code::Unavailable,
        FailKind::Timeout => Code::DeadlineExceeded,
        FailKind::Unsupported => Code::Unimplemented,
        FailKind::Other => Code::Internal,
    };
    RpcError::new(code, f.message.clone())
}

/// Runs a blocking backend call.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Fail> + Send + 'static,
) -> Result<T, Fail> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(Fail::new(FailKind::Other, format!("worker failed: {e}"))))
}

// ---------------------------------------------------------------------------------------------
// health

/// `GET /health`: 204 while the sandbox runs, 502 "was not found" after.
pub async fn health(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    match resolve(&state, &headers, Plane::Http) {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => r,
    }
}

// ---------------------------------------------------------------------------------------------
// process.Process

/// `POST /process.Process/{method}`.
pub async fn process_rpc(
    State(state): State<Arc<AppState>>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let streaming = matches!(method.as_str(), "Start" | "Connect");
    let entry = match resolve(&state, &headers, Plane::Rpc) {
        Ok(e) => e,
        Err(r) => return r,
    };
    let req = if streaming {
        connect::stream_request(&body)
    } else {
        connect::parse_json(&body)
    };
    let req = match req {
        Ok(r) => r,
        Err(e) if streaming => return connect::stream_error(&e),
        Err(e) => return e.into_response(),
    };
    match method.as_str() {
        "Start" => process_start(&state, entry, &headers, &req),
        "Connect" => match process_connect(&entry, &req) {
            Ok(r) => r,
            Err(e) => connect::stream_error(&e),
        },
        "List" => connect::unary_ok(&process_list(&entry)),
        "SendSignal" => unary(process_signal(entry, &req).await),
        "SendInput" => unary(process_input(entry, &req).await),
        "CloseStdin" => unary(process_close_stdin(&entry, &req)),
        other => RpcError::new(
            Code::Unimplemented,
            format!("process.Process/{other} is not implemented"),
        )
        .into_response(),
    }
}

fn unary(r: Result<Value, RpcError>) -> Response {
    match r {
        Ok(v) => connect::unary_ok(&v),
        Err(e) => e.into_response(),
    }
}

/// A Start request's `process` config.
#[derive(Debug, Default, Deserialize)]
struct ProcessConfigJson {
    #[serde(default)]
    cmd: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    envs: BTreeMap<String, String>,
    #[serde(default)]
    cwd: Option<String>,
}

fn bad(msg: impl Into<String>) -> RpcError {
    RpcError::new(Code::InvalidArgument, msg)
}

/// The process environment envd gives: HOME/USER/LOGNAME of the user, the sandbox's env
/// vars, then the request's (later wins).
fn process_env(
    entry: &SandboxEntry,
    user: Option<&str>,
    home: &str,
    req_envs: &BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let name = user.unwrap_or("root").to_string();
    let mut env = vec![
        ("HOME".to_string(), home.to_string()),
        ("USER".to_string(), name.clone()),
        ("LOGNAME".to_string(), name),
    ];
    env.extend(entry.env_vars.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend(req_envs.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// Reads the connect timeout header (ms).
fn connect_timeout(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get("connect-timeout-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
}

fn process_start(
    state: &Arc<AppState>,
    entry: Arc<SandboxEntry>,
    headers: &HeaderMap,
    req: &Value,
) -> Response {
    let cfg: ProcessConfigJson = match req.get("process") {
        Some(p) => match serde_json::from_value(p.clone()) {
            Ok(c) => c,
            Err(e) => return connect::stream_error(&bad(format!("process: {e}"))),
        },
        None => return connect::stream_error(&bad("process is required")),
    };
    if cfg.cmd.is_empty() {
        return connect::stream_error(&bad("process.cmd is empty"));
    }
    if req.get("pty").is_some_and(|p| !p.is_null()) {
        return connect::stream_error(&RpcError::new(
            Code::Unimplemented,
            "pty processes are not supported by kiln serve",
        ));
    }
    let user = rpc_user(&entry, headers);
    let home = home_of(&entry, user.as_deref());
    let cwd = match &cfg.cwd {
        Some(c) if !c.is_empty() => match resolve_path(c, &home) {
            Ok(p) => p,
            Err(f) => return connect::stream_error(&rpc_error(&f)),
        },
        _ => home.clone(),
    };
    let mut argv = vec![cfg.cmd.clone()];
    argv.extend(cfg.args.iter().cloned());
    let spec = ExecSpec {
        argv,
        env: process_env(&entry, user.as_deref(), &home, &cfg.envs),
        cwd: Some(cwd.clone()),
        user,
        timeout: connect_timeout(headers),
    };
    let want_stdin = req.get("stdin").and_then(Value::as_bool).unwrap_or(false);
    let (stdin_tx, stdin_rx) = if want_stdin {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(STDIN_BUFFER);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let tag = req.get("tag").and_then(Value::as_str).map(str::to_string);
    let config = ProcConfig {
        cmd: cfg.cmd,
        args: cfg.args,
        envs: cfg.envs,
        cwd: Some(cwd),
    };
    let (tx, rx) = mpsc::channel::<Frame>(STREAM_BUFFER);
    let state = Arc::clone(state);
    let spawned = std::thread::Builder::new()
        .name("kiln-serve-proc".into())
        .spawn(move || {
            let t0 = std::time::Instant::now();
            crate::metrics::Metrics::inc(&state.kiln.metrics.execs);
            run_process(
                entry,
                spec,
                stdin_rx.map(ChannelReader::boxed),
                stdin_tx,
                tag,
                config,
                tx,
            );
            state.kiln.metrics.exec.observe(t0.elapsed());
        });
    if let Err(e) = spawned {
        return connect::stream_error(&RpcError::new(
            Code::ResourceExhausted,
            format!("spawning the process thread: {e}"),
        ));
    }
    connect::stream_response(frames_body(rx))
}

/// The response body over a frame channel.
fn frames_body(rx: mpsc::Receiver<Frame>) -> Body {
    let s = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|f| (Ok::<_, Infallible>(Bytes::from(f)), rx))
    });
    Body::from_stream(s)
}

/// Feeds a process's stdin from `SendInput` calls; EOF when every sender is gone.
struct ChannelReader {
    rx: Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl ChannelReader {
    fn boxed(rx: Receiver<Vec<u8>>) -> Box<dyn Read + Send> {
        Box::new(Self {
            rx,
            buf: Vec::new(),
            pos: 0,
        })
    }
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.buf.len() {
            match self.rx.recv() {
                Ok(b) => {
                    self.buf = b;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn event_frame(event: Value) -> Frame {
    connect::message_frame(&json!({ "event": event }))
}

fn data_frame(stream: &str, data: &[u8]) -> Frame {
    event_frame(json!({"data": { stream: B64.encode(data) }}))
}

/// The `end` event of an exit status, as envd fills it from Go's `ProcessState`.
pub fn end_event(s: &ExitStatus) -> Value {
    match (s.code, s.signal) {
        (Some(code), _) => {
            let status = format!("exit status {code}");
            let mut v = json!({"exitCode": code, "exited": true, "status": status});
            if code != 0 {
                v["error"] = json!(status);
            }
            json!({ "end": v })
        }
        (None, sig) => {
            let status = match sig {
                Some(9) | None => "signal: killed".to_string(),
                Some(15) => "signal: terminated".to_string(),
                Some(2) => "signal: interrupt".to_string(),
                Some(n) => format!("signal: {n}"),
            };
            json!({"end": {"exitCode": -1, "exited": false, "status": status, "error": status}})
        }
    }
}

/// Sends to the primary stream (with back-pressure) and to the extra subscribers (dropped
/// when full or gone).
fn broadcast(primary: &mut Option<mpsc::Sender<Frame>>, proc: Option<&Proc>, frame: &Frame) {
    if let Some(p) = primary {
        if p.blocking_send(frame.clone()).is_err() {
            *primary = None; // the client went away; the process keeps running
        }
    }
    if let Some(proc) = proc {
        lock(&proc.subscribers).retain(|s| s.try_send(frame.clone()).is_ok());
    }
}

/// One process's thread: starts it, registers it, streams its events to the subscribers.
fn run_process(
    entry: Arc<SandboxEntry>,
    spec: ExecSpec,
    stdin: Option<Box<dyn Read + Send>>,
    stdin_tx: Option<SyncSender<Vec<u8>>>,
    tag: Option<String>,
    config: ProcConfig,
    tx: mpsc::Sender<Frame>,
) {
    let mut primary = Some(tx);
    let fail = |primary: &mut Option<mpsc::Sender<Frame>>, f: &Fail| {
        if let Some(p) = primary.take() {
            let _ = p.blocking_send(connect::end_frame(Some(&rpc_error(f))));
        }
    };
    tracing::debug!(argv = ?spec.argv, timeout = ?spec.timeout, "process start");
    let mut process = match entry.guest.start(&spec, stdin) {
        Ok(p) => p,
        Err(f) => {
            tracing::debug!(error = %f, "process start failed");
            return fail(&mut primary, &f);
        }
    };
    let mut proc: Option<Arc<Proc>> = None;
    let mut pending_stdin = Some(Mutex::new(stdin_tx));
    loop {
        let ev = match process.next_event() {
            Ok(Some(ev)) => ev,
            Ok(None) => break,
            Err(f) => {
                tracing::debug!(pid = ?proc.as_ref().map(|p| p.pid), error = %f, "process stream failed");
                let e = rpc_error(&f);
                broadcast(&mut primary, proc.as_deref(), &connect::end_frame(Some(&e)));
                break;
            }
        };
        match ev {
            ExecEvent::Started { pid } => {
                let signaller = process.signaller().ok().flatten();
                tracing::debug!(pid, signaller = signaller.is_some(), "process started");
                let p = Arc::new(Proc {
                    pid,
                    tag: tag.clone(),
                    config: config.clone(),
                    signaller,
                    stdin: pending_stdin.take().unwrap_or_default(),
                    subscribers: Mutex::new(Vec::new()),
                });
                lock(&entry.procs).insert(pid, Arc::clone(&p));
                broadcast(
                    &mut primary,
                    None,
                    &event_frame(json!({"start": {"pid": pid}})),
                );
                proc = Some(p);
            }
            ExecEvent::Stdout(d) => {
                broadcast(&mut primary, proc.as_deref(), &data_frame("stdout", &d))
            }
            ExecEvent::Stderr(d) => {
                broadcast(&mut primary, proc.as_deref(), &data_frame("stderr", &d))
            }
            ExecEvent::Exit(s) => {
                tracing::debug!(pid = ?proc.as_ref().map(|p| p.pid), status = ?s, "process exited");
                if proc.is_none() {
                    // It never started: report like envd does for a failed start.
                    broadcast(
                        &mut primary,
                        None,
                        &connect::end_frame(Some(&bad("the process could not be started"))),
                    );
                    break;
                }
                if let Some(p) = &proc {
                    lock(&entry.procs).remove(&p.pid);
                }
                broadcast(&mut primary, proc.as_deref(), &event_frame(end_event(&s)));
                broadcast(&mut primary, proc.as_deref(), &connect::end_frame(None));
                break;
            }
        }
    }
    if let Some(p) = proc {
        lock(&entry.procs).remove(&p.pid);
        lock(&p.subscribers).clear();
        *lock(&p.stdin) = None;
    }
}

/// A `ProcessSelector`: `{"pid": N}` or `{"tag": "..."}`.
fn select(entry: &SandboxEntry, req: &Value) -> Result<Arc<Proc>, RpcError> {
    let sel = req
        .get("process")
        .ok_or_else(|| bad("process selector is required"))?;
    let procs = lock(&entry.procs);
    let found = if let Some(pid) = sel.get("pid") {
        let pid = pid
            .as_u64()
            .or_else(|| pid.as_str().and_then(|s| s.parse().ok()))
            .ok_or_else(|| bad("process.pid must be a number"))?;
        procs.get(&(pid as u32)).cloned()
    } else if let Some(tag) = sel.get("tag").and_then(Value::as_str) {
        procs
            .values()
            .find(|p| p.tag.as_deref() == Some(tag))
            .cloned()
    } else {
        return Err(bad("process selector needs pid or tag"));
    };
    found.ok_or_else(|| RpcError::new(Code::NotFound, "process not found"))
}

fn process_connect(entry: &SandboxEntry, req: &Value) -> Result<Response, RpcError> {
    let p = select(entry, req)?;
    let (tx, rx) = mpsc::channel::<Frame>(STREAM_BUFFER * 4);
    let _ = tx.try_send(event_frame(json!({"start": {"pid": p.pid}})));
    lock(&p.subscribers).push(tx);
    Ok(connect::stream_response(frames_body(rx)))
}

fn process_list(entry: &SandboxEntry) -> Value {
    let procs = lock(&entry.procs);
    let mut v: Vec<_> = procs.values().cloned().collect();
    v.sort_by_key(|p| p.pid);
    let list: Vec<Value> = v
        .iter()
        .map(|p| {
            let mut o = json!({
                "config": {"cmd": p.config.cmd, "args": p.config.args, "envs": p.config.envs,
                           "cwd": p.config.cwd},
                "pid": p.pid,
            });
            if let Some(t) = &p.tag {
                o["tag"] = json!(t);
            }
            o
        })
        .collect();
    json!({ "processes": list })
}

/// A `Signal` enum value: name or number.
fn parse_signal(v: Option<&Value>) -> Result<i32, RpcError> {
    match v {
        Some(Value::String(s)) => match s.as_str() {
            "SIGNAL_SIGKILL" => Ok(9),
            "SIGNAL_SIGTERM" => Ok(15),
            other => Err(bad(format!("unknown signal {other}"))),
        },
        Some(Value::Number(n)) => match n.as_i64() {
            Some(9) => Ok(9),
            Some(15) => Ok(15),
            _ => Err(bad(format!("unknown signal {n}"))),
        },
        _ => Err(bad("signal is required")),
    }
}

async fn process_signal(entry: Arc<SandboxEntry>, req: &Value) -> Result<Value, RpcError> {
    let sig = parse_signal(req.get("signal"))?;
    let p = select(&entry, req)?;
    let pid = p.pid;
    tracing::debug!(pid, sig, "signal requested");
    let r = blocking(move || match &p.signaller {
        Some(s) => s(sig),
        None => Err(Fail::new(FailKind::NotFound, "process not found")),
    })
    .await;
    tracing::debug!(pid, sig, ok = r.is_ok(), "signal sent");
    r.map_err(|f| rpc_error(&f))?;
    Ok(json!({}))
}

async fn process_input(entry: Arc<SandboxEntry>, req: &Value) -> Result<Value, RpcError> {
    let p = select(&entry, req)?;
    let input = req.get("input").ok_or_else(|| bad("input is required"))?;
    let b64 = input
        .get("stdin")
        .or_else(|| input.get("pty"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let data = B64
        .decode(b64)
        .map_err(|e| bad(format!("input is not base64: {e}")))?;
    let tx = lock(&p.stdin)
        .clone()
        .ok_or_else(|| RpcError::new(Code::FailedPrecondition, "stdin not enabled or closed"))?;
    if data.is_empty() {
        return Ok(json!({}));
    }
    blocking(move || {
        tx.send(data)
            .map_err(|_| Fail::new(FailKind::InvalidArgument, "stdin not enabled or closed"))
    })
    .await
    .map_err(|f| RpcError::new(Code::FailedPrecondition, f.message))?;
    Ok(json!({}))
}

fn process_close_stdin(entry: &SandboxEntry, req: &Value) -> Result<Value, RpcError> {
    let p = select(entry, req)?;
    *lock(&p.stdin) = None;
    Ok(json!({}))
}

// ---------------------------------------------------------------------------------------------
// filesystem.Filesystem

fn file_type(k: FileKind) -> &'static str {
    match k {
        FileKind::File => "FILE_TYPE_FILE",
        FileKind::Dir => "FILE_TYPE_DIRECTORY",
        FileKind::Symlink => "FILE_TYPE_SYMLINK",
        FileKind::Other => "FILE_TYPE_UNSPECIFIED",
    }
}

/// `ls -l` style permissions.
fn permissions(kind: FileKind, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(match kind {
        FileKind::Dir => 'd',
        FileKind::Symlink => 'l',
        _ => '-',
    });
    for shift in [6u32, 3, 0] {
        let b = (mode >> shift) & 7;
        s.push(if b & 4 != 0 { 'r' } else { '-' });
        s.push(if b & 2 != 0 { 'w' } else { '-' });
        s.push(if b & 1 != 0 { 'x' } else { '-' });
    }
    s
}

fn base_name(path: &str) -> String {
    let t = path.trim_end_matches('/');
    match t.rsplit_once('/') {
        Some((_, n)) if !n.is_empty() => n.to_string(),
        _ => t.to_string(),
    }
}

fn parent_dir(path: &str) -> Option<&str> {
    let t = path.trim_end_matches('/');
    match t.rsplit_once('/') {
        Some(("", _)) => Some("/"),
        Some((p, _)) => Some(p),
        None => None,
    }
}

/// An `EntryInfo` message.
pub fn entry_info(path: &str, st: &Stat) -> Value {
    let nanos = st.mtime_ns.rem_euclid(1_000_000_000) as u32;
    let secs = st.mtime_ns.div_euclid(1_000_000_000);
    json!({
        "name": base_name(path),
        "type": file_type(st.kind),
        "path": path,
        "size": st.size.to_string(),
        "mode": st.mode & 0o777,
        "permissions": permissions(st.kind, st.mode),
        "modifiedTime": rfc3339_ns(secs, nanos),
    })
}

fn path_field(req: &Value, key: &str) -> Result<String, RpcError> {
    req.get(key)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| bad(format!("{key} is required")))
}

/// `POST /filesystem.Filesystem/{method}`.
pub async fn filesystem_rpc(
    State(state): State<Arc<AppState>>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let entry = match resolve(&state, &headers, Plane::Rpc) {
        Ok(e) => e,
        Err(r) => return r,
    };
    let req = match connect::parse_json(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let user = rpc_user(&entry, &headers);
    let home = home_of(&entry, user.as_deref());
    let guest = Arc::clone(&entry.guest);
    let r = match method.as_str() {
        "Stat" => fs_stat(guest, &req, &home).await,
        "ListDir" => fs_list(guest, &req, &home).await,
        "MakeDir" => fs_mkdir(guest, &req, &home).await,
        "Move" => fs_move(guest, &req, &home).await,
        "Remove" => fs_remove(guest, &req, &home).await,
        "CreateWatcher" => fs_create_watcher(&state, &entry, &req, &home).await,
        "GetWatcherEvents" => fs_watcher_events(&state, &entry, &req).await,
        "RemoveWatcher" => watcher_id(&req).and_then(|w| {
            state
                .kiln
                .watchers
                .remove(&entry.id, &w)
                .map(|()| json!({}))
                .map_err(|f| rpc_error(&f))
        }),
        other => Err(RpcError::new(
            Code::Unimplemented,
            format!("filesystem.Filesystem/{other} is not implemented"),
        )),
    };
    unary(r)
}

fn watcher_id(req: &Value) -> Result<String, RpcError> {
    req.get("watcherId")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| bad("watcherId is required"))
}

/// `CreateWatcher`: a polling watcher (crate::watch) of a directory.
async fn fs_create_watcher(
    state: &Arc<AppState>,
    entry: &Arc<SandboxEntry>,
    req: &Value,
    home: &str,
) -> Result<Value, RpcError> {
    if req.get("recursive").and_then(Value::as_bool) == Some(true) {
        return Err(RpcError::new(
            Code::Unimplemented,
            "recursive watching is not supported by kiln serve",
        ));
    }
    let path = resolve_rpc_path(req, "path", home)?;
    let (s, e) = (Arc::clone(state), Arc::clone(entry));
    let id = blocking(move || s.kiln.watchers.create(&e.id, e.guest.as_ref(), &path))
        .await
        .map_err(|f| rpc_error(&f))?;
    Ok(json!({ "watcherId": id }))
}

/// `GetWatcherEvents`: the changes since the last call.
async fn fs_watcher_events(
    state: &Arc<AppState>,
    entry: &Arc<SandboxEntry>,
    req: &Value,
) -> Result<Value, RpcError> {
    let w = watcher_id(req)?;
    let (s, e) = (Arc::clone(state), Arc::clone(entry));
    let events = blocking(move || s.kiln.watchers.events(&e.id, e.guest.as_ref(), &w))
        .await
        .map_err(|f| rpc_error(&f))?;
    Ok(json!({ "events": events }))
}

fn resolve_rpc_path(req: &Value, key: &str, home: &str) -> Result<String, RpcError> {
    resolve_path(&path_field(req, key)?, home).map_err(|f| rpc_error(&f))
}

async fn fs_stat(guest: Arc<dyn Guest>, req: &Value, home: &str) -> Result<Value, RpcError> {
    let path = resolve_rpc_path(req, "path", home)?;
    let p = path.clone();
    let st = blocking(move || guest.stat(&p))
        .await
        .map_err(|f| rpc_error(&f))?;
    Ok(json!({"entry": entry_info(&path, &st)}))
}

fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// Lists `root` down to `depth` levels (breadth first, bounded).
fn walk(guest: &dyn Guest, root: &str, depth: u64) -> Result<Vec<Value>, Fail> {
    let st = guest.stat(root)?;
    if st.kind != FileKind::Dir {
        return Err(Fail::new(
            FailKind::InvalidArgument,
            format!("path '{root}' is not a directory"),
        ));
    }
    let mut out = Vec::new();
    let mut level = vec![root.to_string()];
    for _ in 0..depth {
        let mut next = Vec::new();
        for dir in &level {
            let entries: Vec<Entry> = match guest.list_dir(dir) {
                Ok(e) => e,
                Err(f) if dir != root && f.kind != FailKind::Dead => continue,
                Err(f) => return Err(f),
            };
            for e in entries {
                if out.len() >= MAX_ENTRIES {
                    return Ok(out);
                }
                let path = join(dir, &e.name);
                let st = guest.stat(&path).unwrap_or(Stat {
                    kind: e.kind,
                    size: e.size,
                    mode: 0,
                    mtime_ns: 0,
                });
                if st.kind == FileKind::Dir {
                    next.push(path.clone());
                }
                out.push(entry_info(&path, &st));
            }
        }
        if next.is_empty() {
            break;
        }
        level = next;
    }
    Ok(out)
}

async fn fs_list(guest: Arc<dyn Guest>, req: &Value, home: &str) -> Result<Value, RpcError> {
    let path = resolve_rpc_path(req, "path", home)?;
    let depth = req
        .get("depth")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .clamp(1, MAX_DEPTH);
    let entries = blocking(move || walk(guest.as_ref(), &path, depth))
        .await
        .map_err(|f| rpc_error(&f))?;
    Ok(json!({ "entries": entries }))
}

async fn fs_mkdir(guest: Arc<dyn Guest>, req: &Value, home: &str) -> Result<Value, RpcError> {
    let path = resolve_rpc_path(req, "path", home)?;
    let p = path.clone();
    blocking(move || match guest.stat(&p) {
        Ok(st) if st.kind == FileKind::Dir => Err(Fail::new(
            FailKind::AlreadyExists,
            format!("directory '{p}' already exists"),
        )),
        Ok(_) => Err(Fail::new(
            FailKind::InvalidArgument,
            format!("path '{p}' already exists and is not a directory"),
        )),
        Err(f) if f.kind == FailKind::NotFound => guest.mkdir(&p),
        Err(f) => Err(f),
    })
    .await
    .map_err(|f| rpc_error(&f))?;
    Ok(json!({"entry": {"name": base_name(&path), "type": "FILE_TYPE_DIRECTORY", "path": path}}))
}

async fn fs_move(guest: Arc<dyn Guest>, req: &Value, home: &str) -> Result<Value, RpcError> {
    let from = resolve_rpc_path(req, "source", home)?;
    let to = resolve_rpc_path(req, "destination", home)?;
    let t = to.clone();
    let st = blocking(move || {
        guest.rename(&from, &t)?;
        guest.stat(&t)
    })
    .await
    .map_err(|f| rpc_error(&f))?;
    Ok(json!({"entry": entry_info(&to, &st)}))
}

async fn fs_remove(guest: Arc<dyn Guest>, req: &Value, home: &str) -> Result<Value, RpcError> {
    let path = resolve_rpc_path(req, "path", home)?;
    blocking(move || match guest.remove_all(&path) {
        Err(f) if f.kind == FailKind::NotFound => Ok(()),
        r => r,
    })
    .await
    .map_err(|f| rpc_error(&f))?;
    Ok(json!({}))
}

// ---------------------------------------------------------------------------------------------
// /files

/// Query of `/files`.
#[derive(Debug, Deserialize)]
pub struct FilesQuery {
    path: Option<String>,
    username: Option<String>,
}

fn http_error(id: &str, f: &Fail) -> Response {
    let status = match f.kind {
        FailKind::NotFound => StatusCode::NOT_FOUND,
        FailKind::InvalidArgument | FailKind::AlreadyExists => StatusCode::BAD_REQUEST,
        FailKind::PermissionDenied => StatusCode::FORBIDDEN,
        FailKind::Dead => return sandbox_gone(id),
        FailKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        FailKind::Unsupported => StatusCode::NOT_IMPLEMENTED,
        FailKind::Other => StatusCode::INTERNAL_SERVER_ERROR,
    };
    json_response(
        status,
        &json!({"code": status.as_u16(), "message": f.message}),
    )
}

fn files_user(entry: &SandboxEntry, q: &FilesQuery) -> Option<String> {
    q.username
        .clone()
        .filter(|u| !u.is_empty())
        .or_else(|| entry.template.user.clone())
}

/// Sends `write`s of the reading thread into the response body.
struct ChannelWriter {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tx
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `GET /files?path=...`: the file's bytes, streamed.
pub async fn files_get(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<FilesQuery>,
) -> Response {
    let entry = match resolve(&state, &headers, Plane::Http) {
        Ok(e) => e,
        Err(r) => return r,
    };
    let user = files_user(&entry, &q);
    let home = home_of(&entry, user.as_deref());
    let path = match resolve_path(q.path.as_deref().unwrap_or(""), &home) {
        Ok(p) => p,
        Err(f) => return http_error(&entry.id, &f),
    };
    let guest = Arc::clone(&entry.guest);
    let p = path.clone();
    let st = match blocking(move || guest.stat(&p)).await {
        Ok(st) => st,
        Err(f) if f.kind == FailKind::NotFound => {
            return http_error(
                &entry.id,
                &Fail::new(FailKind::NotFound, format!("path '{path}' does not exist")),
            )
        }
        Err(f) => return http_error(&entry.id, &f),
    };
    if st.kind == FileKind::Dir {
        return http_error(
            &entry.id,
            &Fail::new(
                FailKind::InvalidArgument,
                format!("path '{path}' is a directory"),
            ),
        );
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let guest = Arc::clone(&entry.guest);
    tokio::task::spawn_blocking(move || {
        let mut w = ChannelWriter { tx: tx.clone() };
        if let Err(f) = guest.read_file_to(&path, &mut w) {
            tracing::warn!(path = %path, error = %f, "reading a file failed mid-stream");
            let _ = tx.blocking_send(Err(std::io::Error::other(f.message)));
        }
    });
    let s =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    let mut r = Response::new(Body::from_stream(s));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    r
}

async fn write_one(entry: &SandboxEntry, path: String, data: Bytes) -> Result<Value, Fail> {
    let guest = Arc::clone(&entry.guest);
    let p = path.clone();
    blocking(move || {
        if let Some(parent) = parent_dir(&p) {
            if parent != "/" {
                guest.mkdir(parent)?;
            }
        }
        let mut r: &[u8] = &data;
        guest.write_file_from(&p, &mut r).map(|_| ())
    })
    .await?;
    Ok(json!({"name": base_name(&path), "type": "file", "path": path}))
}

/// `POST /files`: multipart (field `file`, filename = destination) or a raw body.
pub async fn files_post(
    State(state): State<Arc<AppState>>,
    Query(q): Query<FilesQuery>,
    req: Request,
) -> Response {
    let headers = req.headers().clone();
    let entry = match resolve(&state, &headers, Plane::Http) {
        Ok(e) => e,
        Err(r) => return r,
    };
    let user = files_user(&entry, &q);
    let home = home_of(&entry, user.as_deref());
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut written = Vec::new();
    if ctype.starts_with("multipart/form-data") {
        let mut mp = match Multipart::from_request(req, &state).await {
            Ok(m) => m,
            Err(e) => {
                return http_error(
                    &entry.id,
                    &Fail::new(FailKind::InvalidArgument, e.body_text()),
                )
            }
        };
        let mut first = true;
        loop {
            let field = match mp.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    return http_error(
                        &entry.id,
                        &Fail::new(FailKind::InvalidArgument, format!("multipart: {e}")),
                    )
                }
            };
            if field.name() != Some("file") {
                continue;
            }
            let target = match (&q.path, first) {
                (Some(p), true) if !p.is_empty() => p.clone(),
                _ => field.file_name().unwrap_or("").to_string(),
            };
            first = false;
            let path = match resolve_path(&target, &home) {
                Ok(p) => p,
                Err(f) => return http_error(&entry.id, &f),
            };
            let data = match field.bytes().await {
                Ok(d) => d,
                Err(e) => {
                    return http_error(
                        &entry.id,
                        &Fail::new(FailKind::InvalidArgument, format!("multipart: {e}")),
                    )
                }
            };
            match write_one(&entry, path, data).await {
                Ok(v) => written.push(v),
                Err(f) => return http_error(&entry.id, &f),
            }
        }
    } else {
        let path = match resolve_path(q.path.as_deref().unwrap_or(""), &home) {
            Ok(p) => p,
            Err(f) => return http_error(&entry.id, &f),
        };
        let data = match axum::body::to_bytes(req.into_body(), state.config.max_upload_bytes).await
        {
            Ok(d) => d,
            Err(e) => {
                return http_error(
                    &entry.id,
                    &Fail::new(FailKind::InvalidArgument, format!("reading the body: {e}")),
                )
            }
        };
        match write_one(&entry, path, data).await {
            Ok(v) => written.push(v),
            Err(f) => return http_error(&entry.id, &f),
        }
    }
    if written.is_empty() {
        return http_error(
            &entry.id,
            &Fail::new(FailKind::InvalidArgument, "no file in the request"),
        );
    }
    connect::unary_ok(&written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_events_follow_envd() {
        let ok = end_event(&ExitStatus {
            code: Some(0),
            ..Default::default()
        });
        assert_eq!(ok["end"]["exitCode"], 0);
        assert_eq!(ok["end"]["exited"], true);
        assert!(ok["end"].get("error").is_none());
        let bad = end_event(&ExitStatus {
            code: Some(3),
            ..Default::default()
        });
        assert_eq!(bad["end"]["error"], "exit status 3");
        let killed = end_event(&ExitStatus {
            signal: Some(9),
            ..Default::default()
        });
        assert_eq!(killed["end"]["exitCode"], -1);
        assert_eq!(killed["end"]["status"], "signal: killed");
    }

    #[test]
    fn paths_resolve_against_home() {
        assert_eq!(resolve_path("a/b", "/home/user").unwrap(), "/home/user/a/b");
        assert_eq!(resolve_path("~/x", "/home/user/").unwrap(), "/home/user/x");
        assert_eq!(resolve_path("/tmp/x", "/root").unwrap(), "/tmp/x");
        assert!(resolve_path("", "/root").is_err());
        assert_eq!(parent_dir("/tmp/a/b.txt"), Some("/tmp/a"));
        assert_eq!(parent_dir("/x"), Some("/"));
        assert_eq!(base_name("/tmp/a/"), "a");
        assert_eq!(permissions(FileKind::Dir, 0o755), "drwxr-xr-x");
        assert_eq!(permissions(FileKind::File, 0o640), "-rw-r-----");
    }

    #[test]
    fn signals_parse() {
        assert_eq!(parse_signal(Some(&json!("SIGNAL_SIGKILL"))).unwrap(), 9);
        assert_eq!(parse_signal(Some(&json!(15))).unwrap(), 15);
        assert!(parse_signal(Some(&json!("SIGNAL_SIGHUP"))).is_err());
        assert!(parse_signal(None).is_err());
    }
}
