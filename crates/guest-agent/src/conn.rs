//! Serving one kiln-proto connection: send `Hello`, then read frames and dispatch requests.
//!
//! One reader (the calling thread) decodes frames; cheap, non-blocking requests (ping,
//! signal, stdin, wait, post-restore) are answered inline, execs and file operations run on
//! worker threads. Every response goes through the connection's single [`ConnWriter`], which
//! serialises whole frames under a mutex. A malformed frame gets an `Error { Malformed }`
//! response (with the request id when it can be recovered); a frame that breaks the framing
//! itself (oversized length, truncation) ends the connection. Nothing a peer sends panics or
//! stops the agent.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use kiln_proto::{
    read_frame, ErrorKind, Hello, Message, ProtoError, Request, Response, PROTOCOL_VERSION,
};

use crate::exec::ExecContext;
use crate::files;
use crate::sys::Mode;
use crate::writer::ConnWriter;

/// Most requests running on worker threads at once, per agent.
const MAX_WORKERS: usize = 512;

/// Agent-wide state shared by all connections.
#[derive(Debug)]
pub struct Agent {
    pub exec: ExecContext,
    pub mode: Mode,
    workers: AtomicUsize,
}

impl Agent {
    pub fn new(exec: ExecContext, mode: Mode) -> Self {
        Self {
            exec,
            mode,
            workers: AtomicUsize::new(0),
        }
    }
}

/// Capabilities announced in `Hello`.
pub const CAPABILITIES: &[&str] = &[
    "exec",
    "stdin-stream",
    "background",
    "signal",
    "files",
    "post-restore",
];

struct WorkerSlot<'a>(&'a AtomicUsize);

impl Drop for WorkerSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serve one connection until it closes. `restored` goes into the `Hello`.
pub fn serve(
    agent: &Arc<Agent>,
    mut reader: impl Read,
    writer: Box<dyn Write + Send>,
    restored: bool,
) {
    let conn = Arc::new(ConnWriter::new(writer));
    let hello = Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        capabilities: CAPABILITIES.iter().map(|s| (*s).to_owned()).collect(),
        restored,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    });
    if !conn.send_msg(&hello) {
        return;
    }
    loop {
        match read_frame(&mut reader) {
            Ok(Message::Request { id, body }) => {
                if let Err(e) = body.validate() {
                    conn.send(id, Response::error(ErrorKind::TooLarge, e.to_string()));
                    continue;
                }
                dispatch(agent, &conn, id, body);
            }
            Ok(other) => {
                let what = match other {
                    Message::Hello(_) => "Hello",
                    _ => "Response",
                };
                conn.send(
                    0,
                    Response::error(
                        ErrorKind::InvalidRequest,
                        format!("the host sent a {what}; only requests are accepted"),
                    ),
                );
            }
            Err(ProtoError::Closed) => break,
            Err(e) => {
                let id = match &e {
                    ProtoError::Decode { request_id, .. }
                    | ProtoError::TrailingBytes { request_id, .. } => request_id.unwrap_or(0),
                    _ => 0,
                };
                conn.send(id, Response::error(ErrorKind::Malformed, e.to_string()));
                if e.is_fatal() {
                    break;
                }
            }
        }
    }
    conn.mark_dead();
}

fn dispatch(agent: &Arc<Agent>, conn: &Arc<ConnWriter>, id: u64, body: Request) {
    let exec = &agent.exec;
    match body {
        Request::Ping => {
            conn.send(id, Response::Pong);
        }
        Request::Signal { exec_id, signal } => {
            let r = exec.signal(exec_id, signal);
            conn.send(id, r.map_or_else(|e| e.response(), |()| Response::Ok));
        }
        Request::StdinData { exec_id, data } => {
            if let Err(e) = exec.stdin(exec_id, Some(data), conn, id) {
                conn.send(id, e.response());
            }
        }
        Request::StdinEof { exec_id } => {
            if let Err(e) = exec.stdin(exec_id, None, conn, id) {
                conn.send(id, e.response());
            }
        }
        Request::Wait { exec_id } => {
            if let Err(e) = exec.wait(exec_id, conn, id) {
                conn.send(id, e.response());
            }
        }
        Request::PostRestore { unix_time_ns, seed } => {
            let r = crate::sys::post_restore(agent.mode, unix_time_ns, &seed);
            conn.send(
                id,
                r.map_or_else(
                    |e| Response::error(ErrorKind::from_io(&e), format!("post-restore: {e}")),
                    |()| Response::Ok,
                ),
            );
        }
        Request::Shutdown => {
            conn.send(id, Response::Ok);
            crate::sys::shutdown(agent.mode);
        }
        body => spawn_worker(agent, conn, id, body),
    }
}

fn spawn_worker(agent: &Arc<Agent>, conn: &Arc<ConnWriter>, id: u64, body: Request) {
    if agent.workers.fetch_add(1, Ordering::AcqRel) >= MAX_WORKERS {
        agent.workers.fetch_sub(1, Ordering::AcqRel);
        conn.send(
            id,
            Response::error(
                ErrorKind::TooLarge,
                format!("too many requests in progress (limit {MAX_WORKERS})"),
            ),
        );
        return;
    }
    let name = body.name();
    let a2 = Arc::clone(agent);
    let c2 = Arc::clone(conn);
    let spawned = thread::Builder::new()
        .name(format!("req-{id}"))
        .spawn(move || {
            let _slot = WorkerSlot(&a2.workers);
            let c3 = Arc::clone(&c2);
            let exec = &a2.exec;
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || match body {
                Request::Exec(req) => exec.run(req, c3, id),
                other => {
                    let r = files::handle(&other);
                    c3.send(id, r);
                }
            }));
            if ran.is_err() {
                // A bug, not the peer's fault: still answer, so the host does not wait forever.
                c2.send(
                    id,
                    Response::error(ErrorKind::Io, format!("{name}: internal agent error")),
                );
            }
        });
    if let Err(e) = spawned {
        agent.workers.fetch_sub(1, Ordering::AcqRel);
        conn.send(
            id,
            Response::error(ErrorKind::Io, format!("{name}: cannot start a worker: {e}")),
        );
    }
}
