//! A small blocking client for the agent, generic over any `Read` + `Write` stream pair.
//!
//! [`Client::connect`] reads the agent's `Hello`, checks the protocol version and starts one
//! reader thread that demultiplexes responses by request id to the callers waiting on them.
//! Frames are written under a mutex, so a `Client` (cheap to clone) can be used from many
//! threads at once. Non-exec requests wait at most [`ClientConfig::request_timeout`]; an exec
//! with a timeout waits at most that timeout plus the same slack; an exec without a timeout
//! waits until it ends or the connection dies.
//!
//! The reader thread ends when the stream reports end of file or an error; to stop it, shut
//! the underlying transport down (e.g. `UnixStream::shutdown`).

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::frame::{encode_frame, read_frame, ProtoError};
use crate::limits::{MAX_CHUNK, PROTOCOL_VERSION};
use crate::msg::{
    DirEntry, ErrorKind, ExecRequest, ExitStatus, FileStat, Hello, Message, Request, Response,
    Stdin,
};

/// Requests kept in flight by the chunked file transfers.
const FILE_WINDOW: usize = 4;

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Framing, encoding, handshake or transport failure.
    #[error(transparent)]
    Proto(#[from] ProtoError),
    /// The connection is gone (the reader thread saw end of stream or an error).
    #[error("connection to the agent closed during {op}: {reason}")]
    Closed { op: &'static str, reason: String },
    /// No answer within the deadline.
    #[error("{op}: no response from the agent within {after:?}")]
    Timeout { op: &'static str, after: Duration },
    /// The agent answered with an error.
    #[error("{op} failed in the agent ({kind:?}): {message}")]
    Remote {
        op: &'static str,
        kind: ErrorKind,
        message: String,
    },
    /// The agent answered with a response that does not fit the request.
    #[error("{op}: unexpected response {got} from the agent")]
    Unexpected { op: &'static str, got: &'static str },
    /// The caller asked for something the client cannot do.
    #[error("{op}: {message}")]
    Usage { op: &'static str, message: String },
}

impl ClientError {
    /// The agent's error kind, for [`ClientError::Remote`].
    pub fn remote_kind(&self) -> Option<ErrorKind> {
        match self {
            Self::Remote { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

fn unexpected(op: &'static str, r: Response) -> ClientError {
    match r {
        Response::Error { kind, message } => ClientError::Remote { op, kind, message },
        other => ClientError::Unexpected {
            op,
            got: other.name(),
        },
    }
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Deadline for every non-exec request, and slack added to an exec's own timeout.
    pub request_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
        }
    }
}

struct Waiter {
    tx: Sender<Response>,
    /// Streaming requests end with `Exit` or `Error`; others with their first response.
    streaming: bool,
}

#[derive(Default)]
struct Pending {
    waiters: HashMap<u64, Waiter>,
    closed: Option<String>,
}

struct Shared {
    writer: Mutex<Box<dyn Write + Send>>,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    config: ClientConfig,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        // A poisoned lock only means another thread panicked while holding it; the map itself
        // stays consistent (every operation on it is a single insert/remove).
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn close(&self, reason: String) {
        let mut p = self.pending();
        if p.closed.is_none() {
            p.closed = Some(reason);
        }
        p.waiters.clear();
    }
}

/// A connection to one agent. Clones share the connection.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
    hello: Hello,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("hello", &self.hello)
            .finish()
    }
}

impl Client {
    /// Read the agent's `Hello` from `reader`, check its version and start serving.
    pub fn connect<R, W>(
        mut reader: R,
        writer: W,
        config: ClientConfig,
    ) -> Result<Self, ClientError>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let hello = match read_frame(&mut reader)? {
            Message::Hello(h) => h,
            Message::Request { body, .. } => {
                return Err(ProtoError::NoHandshake { got: body.name() }.into())
            }
            Message::Response { body, .. } => {
                return Err(ProtoError::NoHandshake { got: body.name() }.into())
            }
        };
        hello.validate().map_err(ProtoError::from)?;
        Self::from_hello(hello, reader, writer, config)
    }

    /// Start serving on a stream whose `Hello` the caller has already read.
    pub fn from_hello<R, W>(
        hello: Hello,
        reader: R,
        writer: W,
        config: ClientConfig,
    ) -> Result<Self, ClientError>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        if hello.version != PROTOCOL_VERSION {
            return Err(ProtoError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: hello.version,
            }
            .into());
        }
        let shared = Arc::new(Shared {
            writer: Mutex::new(Box::new(writer)),
            pending: Mutex::new(Pending::default()),
            next_id: AtomicU64::new(1),
            config,
        });
        let s2 = Arc::clone(&shared);
        thread::Builder::new()
            .name("kiln-proto-reader".into())
            .spawn(move || reader_loop(reader, &s2))
            .map_err(ProtoError::Io)?;
        Ok(Self { shared, hello })
    }

    /// The agent's handshake.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Why the connection closed, if it did.
    pub fn closed_reason(&self) -> Option<String> {
        self.shared.pending().closed.clone()
    }

    fn send(
        &self,
        op: &'static str,
        body: Request,
        streaming: bool,
    ) -> Result<(u64, Receiver<Response>), ClientError> {
        body.validate().map_err(ProtoError::from)?;
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_frame(&Message::Request { id, body })?;
        let (tx, rx) = mpsc::channel();
        {
            let mut p = self.shared.pending();
            if let Some(reason) = &p.closed {
                return Err(ClientError::Closed {
                    op,
                    reason: reason.clone(),
                });
            }
            p.waiters.insert(id, Waiter { tx, streaming });
        }
        let res = {
            let mut w = self.shared.writer.lock().unwrap_or_else(|p| p.into_inner());
            w.write_all(&frame).and_then(|()| w.flush())
        };
        if let Err(e) = res {
            self.shared.pending().waiters.remove(&id);
            return Err(ProtoError::Io(e).into());
        }
        Ok((id, rx))
    }

    fn recv(
        &self,
        op: &'static str,
        id: u64,
        rx: &Receiver<Response>,
        deadline: Option<Instant>,
    ) -> Result<Response, ClientError> {
        let r = match deadline {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
        };
        match r {
            Ok(r) => Ok(r),
            Err(RecvTimeoutError::Timeout) => {
                self.shared.pending().waiters.remove(&id);
                Err(ClientError::Timeout {
                    op,
                    after: self.shared.config.request_timeout,
                })
            }
            Err(RecvTimeoutError::Disconnected) => Err(ClientError::Closed {
                op,
                reason: self
                    .closed_reason()
                    .unwrap_or_else(|| "request dropped".into()),
            }),
        }
    }

    /// Send one request and wait for its single response (an `Error` becomes `Remote`).
    pub fn call(&self, op: &'static str, body: Request) -> Result<Response, ClientError> {
        let (id, rx) = self.send(op, body, false)?;
        let deadline = Instant::now().checked_add(self.shared.config.request_timeout);
        match self.recv(op, id, &rx, deadline)? {
            Response::Error { kind, message } => Err(ClientError::Remote { op, kind, message }),
            r => Ok(r),
        }
    }

    fn call_ok(&self, op: &'static str, body: Request) -> Result<(), ClientError> {
        match self.call(op, body)? {
            Response::Ok => Ok(()),
            r => Err(unexpected(op, r)),
        }
    }

    /// Round trip a `Ping`.
    pub fn ping(&self) -> Result<(), ClientError> {
        match self.call("ping", Request::Ping)? {
            Response::Pong => Ok(()),
            r => Err(unexpected("ping", r)),
        }
    }

    /// Round trip a `Ping` that must be answered within `timeout` instead of the configured
    /// request timeout (a pool's health check).
    pub fn ping_within(&self, timeout: Duration) -> Result<(), ClientError> {
        let (id, rx) = self.send("ping", Request::Ping, false)?;
        match self.recv("ping", id, &rx, Instant::now().checked_add(timeout)) {
            Ok(Response::Pong) => Ok(()),
            Ok(r) => Err(unexpected("ping", r)),
            Err(ClientError::Timeout { op, .. }) => {
                Err(ClientError::Timeout { op, after: timeout })
            }
            Err(e) => Err(e),
        }
    }

    /// Start a foreground exec and return its event stream.
    pub fn exec_stream(&self, req: ExecRequest) -> Result<ExecStream, ClientError> {
        if req.background {
            return Err(ClientError::Usage {
                op: "exec",
                message: "background execs start with Client::spawn".into(),
            });
        }
        let deadline = req.timeout_ms.and_then(|t| {
            Instant::now()
                .checked_add(Duration::from_millis(t))?
                .checked_add(self.shared.config.request_timeout)
        });
        let cap = req.output_cap;
        let (id, rx) = self.send("exec", Request::Exec(req), true)?;
        Ok(ExecStream::new(self.clone(), "exec", id, rx, deadline, cap))
    }

    /// Run a command to completion, collecting its output. Stdin must be `Null` or `Bytes`.
    pub fn exec(&self, req: ExecRequest) -> Result<ExecOutput, ClientError> {
        if req.stdin == Stdin::Stream {
            return Err(ClientError::Usage {
                op: "exec",
                message: "streamed stdin needs Client::exec_stream".into(),
            });
        }
        self.exec_stream(req)?.collect_output()
    }

    /// Start a background exec; returns `(exec_id, pid)`.
    pub fn spawn(&self, mut req: ExecRequest) -> Result<(u64, u32), ClientError> {
        req.background = true;
        match self.call("spawn", Request::Exec(req))? {
            Response::ExecStarted { exec_id, pid } => Ok((exec_id, pid)),
            r => Err(unexpected("spawn", r)),
        }
    }

    /// Attach to a background exec: its buffered, then live, output and its exit.
    pub fn wait_stream(&self, exec_id: u64) -> Result<ExecStream, ClientError> {
        let (id, rx) = self.send("wait", Request::Wait { exec_id }, true)?;
        Ok(ExecStream::new(self.clone(), "wait", id, rx, None, None))
    }

    /// Wait for a background exec to end, collecting its output.
    pub fn wait(&self, exec_id: u64) -> Result<ExecOutput, ClientError> {
        let mut out = self.wait_stream(exec_id)?.collect_output()?;
        out.exec_id.get_or_insert(exec_id);
        Ok(out)
    }

    /// Send `signal` to the process group of exec `exec_id`.
    pub fn signal(&self, exec_id: u64, signal: i32) -> Result<(), ClientError> {
        self.call_ok("signal", Request::Signal { exec_id, signal })
    }

    /// A writer for the streamed stdin of exec `exec_id`.
    pub fn stdin(&self, exec_id: u64) -> StdinWriter {
        StdinWriter {
            client: self.clone(),
            exec_id,
        }
    }

    /// Read `len` bytes (or to end of file) from `offset`; `None` = to end of file.
    pub fn read_file_range(
        &self,
        path: &str,
        offset: u64,
        len: Option<u64>,
    ) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        self.read_file_to(path, offset, len, &mut out)?;
        Ok(out)
    }

    /// Read a whole file.
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>, ClientError> {
        self.read_file_range(path, 0, None)
    }

    /// Stream a file range into `out` in chunks, keeping a few requests in flight; returns the
    /// bytes copied.
    pub fn read_file_to(
        &self,
        path: &str,
        offset: u64,
        len: Option<u64>,
        out: &mut dyn Write,
    ) -> Result<u64, ClientError> {
        const OP: &str = "read_file";
        let end = len.map(|l| offset.saturating_add(l));
        let mut next = offset;
        let mut inflight: VecDeque<(u64, u64, Receiver<Response>, u64)> = VecDeque::new();
        let mut copied = 0u64;
        let mut done = false;
        loop {
            while !done && inflight.len() < FILE_WINDOW && end.is_none_or(|e| next < e) {
                let want = end.map_or(MAX_CHUNK as u64, |e| (e - next).min(MAX_CHUNK as u64));
                let (id, rx) = self.send(
                    OP,
                    Request::ReadFile {
                        path: path.to_owned(),
                        offset: next,
                        len: want,
                    },
                    false,
                )?;
                inflight.push_back((id, next, rx, want));
                next += want;
            }
            let Some((id, _off, rx, want)) = inflight.pop_front() else {
                break;
            };
            let deadline = Instant::now().checked_add(self.shared.config.request_timeout);
            match self.recv(OP, id, &rx, deadline)? {
                Response::Data { data, eof } => {
                    if data.len() as u64 > want {
                        return Err(ClientError::Unexpected {
                            op: OP,
                            got: "Data larger than requested",
                        });
                    }
                    if !done {
                        out.write_all(&data).map_err(ProtoError::Io)?;
                        copied += data.len() as u64;
                        if eof || (data.len() as u64) < want {
                            done = true;
                        }
                    }
                }
                r => return Err(unexpected(OP, r)),
            }
        }
        Ok(copied)
    }

    /// Write `data` as the whole content of `path` (created or truncated), in chunks.
    pub fn write_file(
        &self,
        path: &str,
        data: &[u8],
        mode: Option<u32>,
    ) -> Result<(), ClientError> {
        self.write_file_from(path, &mut &data[..], mode).map(|_| ())
    }

    /// Write everything `src` yields as the whole content of `path`; returns the bytes written.
    pub fn write_file_from(
        &self,
        path: &str,
        src: &mut dyn Read,
        mode: Option<u32>,
    ) -> Result<u64, ClientError> {
        const OP: &str = "write_file";
        let mut offset = 0u64;
        let mut first = true;
        let mut inflight: VecDeque<(u64, Receiver<Response>, usize)> = VecDeque::new();
        loop {
            let mut buf = vec![0u8; MAX_CHUNK];
            let mut n = 0;
            while n < buf.len() {
                match src.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(ProtoError::Io(e).into()),
                }
            }
            buf.truncate(n);
            if n == 0 && !first {
                break;
            }
            let req = Request::WriteFile {
                path: path.to_owned(),
                offset,
                data: buf,
                create: true,
                truncate: first,
                mode,
            };
            let (id, rx) = self.send(OP, req, false)?;
            inflight.push_back((id, rx, n));
            offset += n as u64;
            // The first chunk (create + truncate) completes before any other chunk is sent.
            while inflight.len() >= FILE_WINDOW || (first && !inflight.is_empty()) {
                self.finish_write(&mut inflight)?;
            }
            first = false;
            if n < MAX_CHUNK {
                break;
            }
        }
        while !inflight.is_empty() {
            self.finish_write(&mut inflight)?;
        }
        Ok(offset)
    }

    fn finish_write(
        &self,
        inflight: &mut VecDeque<(u64, Receiver<Response>, usize)>,
    ) -> Result<(), ClientError> {
        const OP: &str = "write_file";
        let Some((id, rx, n)) = inflight.pop_front() else {
            return Ok(());
        };
        let deadline = Instant::now().checked_add(self.shared.config.request_timeout);
        match self.recv(OP, id, &rx, deadline)? {
            Response::Written { len } if len == n as u64 => Ok(()),
            Response::Written { .. } => Err(ClientError::Unexpected {
                op: OP,
                got: "short Written",
            }),
            r => Err(unexpected(OP, r)),
        }
    }

    /// List a directory (all pages), sorted by name.
    pub fn list_dir(&self, path: &str) -> Result<Vec<DirEntry>, ClientError> {
        let mut all = Vec::new();
        loop {
            let r = self.call(
                "list_dir",
                Request::ListDir {
                    path: path.to_owned(),
                    start: all.len() as u64,
                },
            )?;
            match r {
                Response::DirEntries { entries, more } => {
                    let empty = entries.is_empty();
                    all.extend(entries);
                    if !more || empty {
                        return Ok(all);
                    }
                }
                r => return Err(unexpected("list_dir", r)),
            }
        }
    }

    /// Stat a path (without following a final symlink).
    pub fn stat(&self, path: &str) -> Result<FileStat, ClientError> {
        match self.call(
            "stat",
            Request::Stat {
                path: path.to_owned(),
            },
        )? {
            Response::Stat(s) => Ok(s),
            r => Err(unexpected("stat", r)),
        }
    }

    /// Create a directory (and its parents with `parents`).
    pub fn mkdir(&self, path: &str, parents: bool) -> Result<(), ClientError> {
        self.call_ok(
            "mkdir",
            Request::Mkdir {
                path: path.to_owned(),
                parents,
                mode: None,
            },
        )
    }

    /// Remove a file or directory (a non-empty directory needs `recursive`).
    pub fn remove(&self, path: &str, recursive: bool) -> Result<(), ClientError> {
        self.call_ok(
            "remove",
            Request::Remove {
                path: path.to_owned(),
                recursive,
            },
        )
    }

    /// Rename `from` to `to`.
    pub fn rename(&self, from: &str, to: &str) -> Result<(), ClientError> {
        self.call_ok(
            "rename",
            Request::Rename {
                from: from.to_owned(),
                to: to.to_owned(),
            },
        )
    }

    /// Whether `path` exists (a dangling symlink counts as existing).
    pub fn exists(&self, path: &str) -> Result<bool, ClientError> {
        match self.call(
            "exists",
            Request::Exists {
                path: path.to_owned(),
            },
        )? {
            Response::Bool(b) => Ok(b),
            r => Err(unexpected("exists", r)),
        }
    }

    /// After a snapshot restore: set the guest clock and reseed its RNG.
    pub fn post_restore(&self, unix_time_ns: u64, seed: Vec<u8>) -> Result<(), ClientError> {
        self.call_ok("post_restore", Request::PostRestore { unix_time_ns, seed })
    }

    /// Ask the agent to end the VM (or, in host mode, to exit). The connection closing before
    /// the `Ok` arrives also counts as success: the VM may end before the answer gets out.
    pub fn shutdown(&self) -> Result<(), ClientError> {
        match self.call_ok("shutdown", Request::Shutdown) {
            Err(ClientError::Closed { .. }) => Ok(()),
            r => r,
        }
    }
}

fn reader_loop<R: Read>(mut reader: R, shared: &Shared) {
    let reason = loop {
        let msg = match read_frame(&mut reader) {
            Ok(m) => m,
            Err(ProtoError::Closed) => break "agent closed the connection".to_owned(),
            Err(e) => break format!("reading from the agent: {e}"),
        };
        if let Err(e) = msg.validate() {
            break format!("agent sent an out-of-bounds message: {e}");
        }
        match msg {
            Message::Response { id, body } => {
                let mut p = shared.pending();
                let terminal = match p.waiters.get(&id) {
                    Some(w) => {
                        let terminal = !w.streaming
                            || matches!(body, Response::Exit(_) | Response::Error { .. });
                        // A waiter that gave up (timeout) has dropped its receiver.
                        let _ = w.tx.send(body);
                        terminal
                    }
                    // Unknown id: a request that timed out, or id 0 (connection-level error).
                    None => false,
                };
                if terminal {
                    p.waiters.remove(&id);
                }
            }
            Message::Hello(_) => {}
            Message::Request { body, .. } => {
                break format!("agent sent a request ({}), not a response", body.name())
            }
        }
    };
    shared.close(reason);
}

/// Events of an exec, in order: `Started` (absent when the command could not be started),
/// output chunks, then exactly one `Exit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Started { exec_id: u64, pid: u32 },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(ExitStatus),
}

/// Collected result of an exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub exec_id: Option<u64>,
    pub pid: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
}

/// The live events of one exec (or of a `Wait`). Also an `Iterator`.
pub struct ExecStream {
    client: Client,
    op: &'static str,
    id: u64,
    rx: Receiver<Response>,
    deadline: Option<Instant>,
    /// The request's `output_cap`, enforced on the host too (the guest is not trusted).
    cap: Option<u64>,
    received: u64,
    buffered: VecDeque<ExecEvent>,
    exec_id: Option<u64>,
    done: bool,
}

impl std::fmt::Debug for ExecStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecStream")
            .field("op", &self.op)
            .field("request_id", &self.id)
            .field("exec_id", &self.exec_id)
            .field("done", &self.done)
            .finish()
    }
}

impl ExecStream {
    fn new(
        client: Client,
        op: &'static str,
        id: u64,
        rx: Receiver<Response>,
        deadline: Option<Instant>,
        cap: Option<u64>,
    ) -> Self {
        Self {
            client,
            op,
            id,
            rx,
            deadline,
            cap,
            received: 0,
            buffered: VecDeque::new(),
            exec_id: None,
            done: false,
        }
    }

    fn pull(&mut self) -> Result<Option<ExecEvent>, ClientError> {
        if self.done {
            return Ok(None);
        }
        let r = self
            .client
            .recv(self.op, self.id, &self.rx, self.deadline)?;
        let ev = match r {
            Response::ExecStarted { exec_id, pid } => {
                self.exec_id = Some(exec_id);
                ExecEvent::Started { exec_id, pid }
            }
            Response::Stdout(d) => ExecEvent::Stdout(self.count(d)?),
            Response::Stderr(d) => ExecEvent::Stderr(self.count(d)?),
            Response::Exit(s) => {
                self.done = true;
                ExecEvent::Exit(s)
            }
            other => {
                self.done = true;
                return Err(unexpected(self.op, other));
            }
        };
        Ok(Some(ev))
    }

    fn count(&mut self, d: Vec<u8>) -> Result<Vec<u8>, ClientError> {
        self.received = self.received.saturating_add(d.len() as u64);
        if self.cap.is_some_and(|c| self.received > c) {
            self.done = true;
            return Err(ClientError::Unexpected {
                op: self.op,
                got: "output beyond the exec's output_cap",
            });
        }
        Ok(d)
    }

    /// The next event; `Ok(None)` after `Exit`.
    pub fn next_event(&mut self) -> Result<Option<ExecEvent>, ClientError> {
        if let Some(ev) = self.buffered.pop_front() {
            return Ok(Some(ev));
        }
        self.pull()
    }

    /// Wait until the exec has started; returns its exec id and pid, or `None` when the
    /// command could not be started (its `Exit` then follows). Events read meanwhile stay
    /// queued for [`next_event`](Self::next_event).
    pub fn started(&mut self) -> Result<Option<(u64, u32)>, ClientError> {
        for ev in &self.buffered {
            if let ExecEvent::Started { exec_id, pid } = ev {
                return Ok(Some((*exec_id, *pid)));
            }
        }
        while let Some(ev) = self.pull()? {
            let found = match ev {
                ExecEvent::Started { exec_id, pid } => Some((exec_id, pid)),
                _ => None,
            };
            let exit = matches!(ev, ExecEvent::Exit(_));
            self.buffered.push_back(ev);
            if found.is_some() {
                return Ok(found);
            }
            if exit {
                return Ok(None);
            }
        }
        Ok(None)
    }

    /// The exec id, once `Started` has been seen.
    pub fn exec_id(&self) -> Option<u64> {
        self.exec_id
    }

    /// A writer for this exec's streamed stdin (waits for `Started`).
    pub fn stdin(&mut self) -> Result<StdinWriter, ClientError> {
        match self.started()? {
            Some((exec_id, _)) => Ok(self.client.stdin(exec_id)),
            None => Err(ClientError::Usage {
                op: "stdin",
                message: "the command did not start".into(),
            }),
        }
    }

    /// Send `signal` to the exec's process group (waits for `Started`).
    pub fn signal(&mut self, signal: i32) -> Result<(), ClientError> {
        match self.started()? {
            Some((exec_id, _)) => self.client.signal(exec_id, signal),
            None => Err(ClientError::Usage {
                op: "signal",
                message: "the command did not start".into(),
            }),
        }
    }

    /// Read every remaining event and collect the output.
    pub fn collect_output(mut self) -> Result<ExecOutput, ClientError> {
        let mut out = ExecOutput {
            exec_id: None,
            pid: None,
            stdout: Vec::new(),
            stderr: Vec::new(),
            status: ExitStatus {
                code: None,
                signal: None,
                timed_out: false,
                truncated: false,
            },
        };
        while let Some(ev) = self.next_event()? {
            match ev {
                ExecEvent::Started { exec_id, pid } => {
                    out.exec_id = Some(exec_id);
                    out.pid = Some(pid);
                }
                ExecEvent::Stdout(d) => out.stdout.extend_from_slice(&d),
                ExecEvent::Stderr(d) => out.stderr.extend_from_slice(&d),
                ExecEvent::Exit(s) => {
                    out.status = s;
                    return Ok(out);
                }
            }
        }
        Err(ClientError::Unexpected {
            op: self.op,
            got: "end of events without Exit",
        })
    }
}

impl Iterator for ExecStream {
    type Item = Result<ExecEvent, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_event().transpose()
    }
}

/// Streams stdin to an exec started with `Stdin::Stream`. Each chunk is acknowledged by the
/// agent once written to the pipe, which is the flow control.
#[derive(Debug, Clone)]
pub struct StdinWriter {
    client: Client,
    exec_id: u64,
}

impl StdinWriter {
    /// Send all of `data` (in chunks of at most `MAX_CHUNK`).
    pub fn send(&self, data: &[u8]) -> Result<(), ClientError> {
        for chunk in data.chunks(MAX_CHUNK) {
            self.client.call_ok(
                "stdin",
                Request::StdinData {
                    exec_id: self.exec_id,
                    data: chunk.to_vec(),
                },
            )?;
        }
        Ok(())
    }

    /// Close the exec's stdin (end of file).
    pub fn close(&self) -> Result<(), ClientError> {
        self.client.call_ok(
            "stdin_eof",
            Request::StdinEof {
                exec_id: self.exec_id,
            },
        )
    }
}

impl Write for StdinWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(MAX_CHUNK);
        self.send(&buf[..n]).map_err(std::io::Error::other)?;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::write_frame;
    use std::os::unix::net::UnixStream;

    fn hello(version: u32) -> Message {
        Message::Hello(Hello {
            version,
            capabilities: vec!["exec".into()],
            restored: false,
            agent_version: "test".into(),
        })
    }

    /// A client connected to a scripted fake agent (the other end of a socket pair).
    fn pair(config: ClientConfig) -> (Result<Client, ClientError>, UnixStream) {
        let (a, mut b) = UnixStream::pair().unwrap();
        write_frame(&mut b, &hello(PROTOCOL_VERSION)).unwrap();
        let c = Client::connect(a.try_clone().unwrap(), a, config);
        (c, b)
    }

    fn next_request(s: &mut UnixStream) -> (u64, Request) {
        match read_frame(s).unwrap() {
            Message::Request { id, body } => (id, body),
            other => panic!("expected a request, got {other:?}"),
        }
    }

    fn respond(s: &mut UnixStream, id: u64, body: Response) {
        write_frame(s, &Message::Response { id, body }).unwrap();
    }

    #[test]
    fn version_mismatch_and_missing_hello_are_refused() {
        let (a, mut b) = UnixStream::pair().unwrap();
        write_frame(&mut b, &hello(PROTOCOL_VERSION + 1)).unwrap();
        let err = Client::connect(a.try_clone().unwrap(), a, ClientConfig::default()).unwrap_err();
        assert!(matches!(
            err,
            ClientError::Proto(ProtoError::VersionMismatch { theirs, .. }) if theirs == PROTOCOL_VERSION + 1
        ));
        let (a, mut b) = UnixStream::pair().unwrap();
        respond(&mut b, 1, Response::Pong);
        let err = Client::connect(a.try_clone().unwrap(), a, ClientConfig::default()).unwrap_err();
        assert!(matches!(
            err,
            ClientError::Proto(ProtoError::NoHandshake { got: "Pong" })
        ));
    }

    #[test]
    fn responses_are_routed_by_id_out_of_order() {
        let (c, mut agent) = pair(ClientConfig::default());
        let c = c.unwrap();
        let c1 = c.clone();
        let t1 = thread::spawn(move || c1.exists("/one"));
        let c2 = c.clone();
        let t2 = thread::spawn(move || c2.exists("/two"));
        let (ida, ra) = next_request(&mut agent);
        let (idb, rb) = next_request(&mut agent);
        let answer = |r: &Request| matches!(r, Request::Exists { path } if path == "/one");
        // Answer in reverse order of arrival.
        respond(&mut agent, idb, Response::Bool(answer(&rb)));
        respond(&mut agent, ida, Response::Bool(answer(&ra)));
        assert!(t1.join().unwrap().unwrap());
        assert!(!t2.join().unwrap().unwrap());
    }

    #[test]
    fn remote_errors_timeouts_and_closing() {
        let (c, mut agent) = pair(ClientConfig {
            request_timeout: Duration::from_millis(200),
        });
        let c = c.unwrap();
        let c1 = c.clone();
        let t = thread::spawn(move || c1.stat("/x"));
        let (id, _) = next_request(&mut agent);
        respond(
            &mut agent,
            id,
            Response::error(ErrorKind::NotFound, "stat /x: gone"),
        );
        let err = t.join().unwrap().unwrap_err();
        assert_eq!(err.remote_kind(), Some(ErrorKind::NotFound));
        assert!(err.to_string().contains("stat /x: gone"));

        // Unanswered: times out.
        let err = c.ping().unwrap_err();
        assert!(
            matches!(err, ClientError::Timeout { op: "ping", .. }),
            "{err}"
        );
        let _ = next_request(&mut agent);

        // The agent goes away: pending and later calls fail as Closed.
        let c2 = c.clone();
        let t = thread::spawn(move || c2.exec(ExecRequest::new(["sleep", "9"])));
        let _ = next_request(&mut agent);
        drop(agent);
        let err = t.join().unwrap().unwrap_err();
        assert!(matches!(err, ClientError::Closed { .. }), "{err}");
        assert!(matches!(c.ping(), Err(ClientError::Closed { .. })));
        assert!(c.closed_reason().is_some());
    }

    #[test]
    fn out_of_bounds_responses_close_the_connection() {
        let (c, mut agent) = pair(ClientConfig::default());
        let c = c.unwrap();
        let c1 = c.clone();
        let t = thread::spawn(move || c1.read_file_range("/f", 0, Some(10)));
        let (id, _) = next_request(&mut agent);
        respond(
            &mut agent,
            id,
            Response::Data {
                data: vec![0; crate::limits::MAX_CHUNK + 1],
                eof: true,
            },
        );
        let err = t.join().unwrap().unwrap_err();
        assert!(matches!(err, ClientError::Closed { .. }), "{err}");
        assert!(c.closed_reason().unwrap().contains("out-of-bounds"));
    }

    #[test]
    fn output_beyond_the_cap_is_refused_on_the_host() {
        let (c, mut agent) = pair(ClientConfig::default());
        let c = c.unwrap();
        let mut req = ExecRequest::new(["yes"]);
        req.output_cap = Some(10);
        let c1 = c.clone();
        let t = thread::spawn(move || c1.exec(req));
        let (id, _) = next_request(&mut agent);
        respond(&mut agent, id, Response::Stdout(vec![b'y'; 8]));
        respond(&mut agent, id, Response::Stderr(vec![b'y'; 8]));
        let err = t.join().unwrap().unwrap_err();
        assert!(
            matches!(err, ClientError::Unexpected { got, .. } if got.contains("output_cap")),
            "{err}"
        );
    }

    #[test]
    fn exec_stream_events_and_stdin() {
        let (c, mut agent) = pair(ClientConfig::default());
        let c = c.unwrap();
        let mut req = ExecRequest::new(["cat"]);
        req.stdin = Stdin::Stream;
        let mut s = c.exec_stream(req).unwrap();
        let (id, _) = next_request(&mut agent);
        respond(
            &mut agent,
            id,
            Response::ExecStarted {
                exec_id: 7,
                pid: 99,
            },
        );
        let stdin = s.stdin().unwrap();
        let feeder = thread::spawn(move || stdin.send(b"abc"));
        match next_request(&mut agent) {
            (sid, Request::StdinData { exec_id: 7, data }) => {
                assert_eq!(data, b"abc");
                respond(&mut agent, sid, Response::Ok);
            }
            other => panic!("unexpected {other:?}"),
        }
        feeder.join().unwrap().unwrap();
        respond(&mut agent, id, Response::Stdout(b"abc".to_vec()));
        respond(
            &mut agent,
            id,
            Response::Exit(ExitStatus {
                code: Some(0),
                signal: None,
                timed_out: false,
                truncated: false,
            }),
        );
        let out = s.collect_output().unwrap();
        assert_eq!((out.exec_id, out.pid), (Some(7), Some(99)));
        assert_eq!(out.stdout, b"abc");
        assert!(out.status.success());
    }

    #[test]
    fn ping_within_has_its_own_deadline() {
        // A long configured request timeout: the short ping deadline must win.
        let (c, mut agent) = pair(ClientConfig {
            request_timeout: Duration::from_secs(60),
        });
        let c = c.unwrap();
        let c1 = c.clone();
        let t = thread::spawn(move || c1.ping_within(Duration::from_secs(30)));
        let (id, body) = next_request(&mut agent);
        assert!(matches!(body, Request::Ping));
        respond(&mut agent, id, Response::Pong);
        t.join().unwrap().unwrap();

        let started = Instant::now();
        let err = c.ping_within(Duration::from_millis(100)).unwrap_err();
        assert!(
            matches!(err, ClientError::Timeout { op: "ping", after } if after == Duration::from_millis(100)),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(30));
        let _ = next_request(&mut agent);
    }
}
