//! A small blocking client for the agent, generic over any `Read` + `Write` stream pair.
//!
//! [`Client::connect`] reads the agent's `Hello`, checks the protocol version and starts one
//! reader thread that demultiplexes responses by request id to the callers waiting on them.
//! Frames are written under a mutex, so a `Client` (cheap to clone) can be used from many
//! threads at once. Non-exec requests wait at most [`ClientConfig::request_timeout`]; an exec
//! with a timeout waits at most that timeout plus the same slack; an exec without a timeout
//! waits until it ends or the connection dies.
//!
//! Each request's responses wait for their caller in a bounded per-request queue
//! ([`ClientConfig::max_buffered_bytes`], [`ClientConfig::max_buffered_messages`]). When a
//! queue is full the reader thread stops reading the connection (back-pressure: the guest is
//! throttled by the transport's flow control, e.g. vsock credit) until the caller makes room.
//! If it does not within [`ClientConfig::consumer_deadline`], that request fails with
//! [`ClientError::ConsumerTooSlow`], its later responses are dropped and the reader goes on
//! serving the other requests. Responses for a caller that went away (dropped its stream,
//! timed out) are discarded without blocking. So nothing the guest sends can make host memory
//! grow without bound.
//!
//! The reader thread ends when the stream reports end of file or an error; to stop it, shut
//! the underlying transport down (e.g. `UnixStream::shutdown`).

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
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
    /// The caller of request `id` did not take its responses: the request's buffer stayed
    /// full for `after` ([`ClientConfig::consumer_deadline`]). The request is abandoned, its
    /// later responses are dropped.
    #[error(
        "{op} (request {id}): the caller did not consume the responses within {after:?} \
         (per-request buffer full); the request was abandoned"
    )]
    ConsumerTooSlow {
        op: &'static str,
        id: u64,
        after: Duration,
    },
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
    /// Responses of one request buffered until its caller takes them, in bytes (payload plus
    /// [`RESPONSE_OVERHEAD`] per response). A response is always accepted into an empty
    /// buffer, so one frame fits whatever the setting.
    pub max_buffered_bytes: usize,
    /// Responses of one request buffered until its caller takes them, in messages.
    pub max_buffered_messages: usize,
    /// How long the reader thread waits for a caller to make room in its full buffer before
    /// the request fails with [`ClientError::ConsumerTooSlow`]. Meanwhile the connection is
    /// not read, so responses of other requests wait too.
    pub consumer_deadline: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            max_buffered_bytes: 16 << 20,
            max_buffered_messages: 8192,
            consumer_deadline: Duration::from_secs(30),
        }
    }
}

/// Bytes a buffered response is counted for on top of its payload (the enum, the queue slot,
/// allocation headers), so that many empty chunks are bounded by bytes too.
pub const RESPONSE_OVERHEAD: usize = 128;

/// The bytes a response is counted for in its request's buffer.
fn response_cost(r: &Response) -> usize {
    let payload = match r {
        Response::Stdout(d) | Response::Stderr(d) | Response::Data { data: d, .. } => d.len(),
        Response::Error { message, .. } => message.len(),
        Response::DirEntries { entries, .. } => entries
            .iter()
            .map(|e| e.name.len().saturating_add(std::mem::size_of::<DirEntry>()))
            .fold(0usize, usize::saturating_add),
        Response::Pong
        | Response::Ok
        | Response::ExecStarted { .. }
        | Response::Exit(_)
        | Response::Written { .. }
        | Response::Stat(_)
        | Response::Bool(_) => 0,
    };
    payload.saturating_add(RESPONSE_OVERHEAD)
}

/// How a request's queue ended.
#[derive(Debug, Clone)]
enum QueueEnd {
    /// The connection closed (queued responses are still delivered first).
    Closed(String),
    /// The caller did not make room in time; queued responses were dropped.
    TooSlow(Duration),
}

#[derive(Default)]
struct QueueState {
    items: VecDeque<(Response, usize)>,
    bytes: usize,
    end: Option<QueueEnd>,
    /// The caller went away (dropped its receiver or timed out).
    abandoned: bool,
}

/// The bounded queue between the reader thread and the caller of one request.
struct Queue {
    state: Mutex<QueueState>,
    /// Signalled on every change (one producer, one consumer).
    changed: Condvar,
    /// Bytes buffered in all queues of the client.
    total: Arc<AtomicUsize>,
}

/// What happened to a response handed to a request's queue.
enum Push {
    Queued,
    /// The caller went away or the request already ended: dropped.
    Dropped,
    /// The queue stayed full past the consumer deadline: the request failed now.
    TooSlow,
}

/// What [`ResponseRx::recv`] got.
enum Recv {
    Response(Response),
    Timeout,
    End(QueueEnd),
}

impl Queue {
    fn new(total: Arc<AtomicUsize>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(QueueState::default()),
            changed: Condvar::new(),
            total,
        })
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // Every critical section leaves the state consistent, so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drop everything queued (the caller will never read it).
    fn clear(&self, st: &mut QueueState) {
        st.items.clear();
        self.total.fetch_sub(st.bytes, Ordering::Relaxed);
        st.bytes = 0;
    }

    /// Queue `r` for the caller; waits (back-pressure) while the queue is full, at most
    /// `config.consumer_deadline`.
    fn push(&self, r: Response, config: &ClientConfig) -> Push {
        let cost = response_cost(&r);
        let mut st = self.lock();
        // Set when the queue is first found full; `None` inside = beyond `Instant`'s range.
        let mut deadline: Option<Option<Instant>> = None;
        loop {
            if st.abandoned || st.end.is_some() {
                return Push::Dropped;
            }
            let fits = st.items.is_empty()
                || (st.items.len() < config.max_buffered_messages
                    && st.bytes.saturating_add(cost) <= config.max_buffered_bytes);
            if fits {
                st.items.push_back((r, cost));
                st.bytes += cost;
                self.total.fetch_add(cost, Ordering::Relaxed);
                self.changed.notify_all();
                return Push::Queued;
            }
            let now = Instant::now();
            let d = *deadline.get_or_insert_with(|| now.checked_add(config.consumer_deadline));
            st = match d {
                Some(d) if now >= d => {
                    self.clear(&mut st);
                    st.end = Some(QueueEnd::TooSlow(config.consumer_deadline));
                    self.changed.notify_all();
                    return Push::TooSlow;
                }
                Some(d) => {
                    self.changed
                        .wait_timeout(st, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => self.changed.wait(st).unwrap_or_else(|p| p.into_inner()),
            };
        }
    }

    /// The connection closed: wake the caller once the queue is drained.
    fn close(&self, reason: &str) {
        let mut st = self.lock();
        if st.end.is_none() {
            st.end = Some(QueueEnd::Closed(reason.to_owned()));
        }
        self.changed.notify_all();
    }

    /// The caller went away: free the queue and never block the reader on it again.
    fn abandon(&self) {
        let mut st = self.lock();
        st.abandoned = true;
        self.clear(&mut st);
        self.changed.notify_all();
    }
}

/// The caller's end of a request's queue; dropping it abandons the request.
struct ResponseRx {
    queue: Arc<Queue>,
}

impl ResponseRx {
    /// The next response; waits until `deadline` (`None` = no deadline).
    fn recv(&self, deadline: Option<Instant>) -> Recv {
        let q = &self.queue;
        let mut st = q.lock();
        loop {
            if let Some((r, cost)) = st.items.pop_front() {
                st.bytes -= cost;
                q.total.fetch_sub(cost, Ordering::Relaxed);
                q.changed.notify_all();
                return Recv::Response(r);
            }
            if let Some(end) = &st.end {
                return Recv::End(end.clone());
            }
            st = match deadline {
                None => q.changed.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Recv::Timeout;
                    }
                    q.changed
                        .wait_timeout(st, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    /// The next response if one is queued, without waiting.
    fn try_recv(&self) -> Option<Recv> {
        let q = &self.queue;
        let mut st = q.lock();
        if let Some((r, cost)) = st.items.pop_front() {
            st.bytes -= cost;
            q.total.fetch_sub(cost, Ordering::Relaxed);
            q.changed.notify_all();
            return Some(Recv::Response(r));
        }
        st.end.clone().map(Recv::End)
    }
}

impl Drop for ResponseRx {
    fn drop(&mut self) {
        self.queue.abandon();
    }
}

struct Waiter {
    queue: Arc<Queue>,
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
    /// Bytes buffered in all request queues.
    buffered: Arc<AtomicUsize>,
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
        let reason = p.closed.clone().unwrap_or_default();
        for (_, w) in p.waiters.drain() {
            w.queue.close(&reason);
        }
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
            buffered: Arc::new(AtomicUsize::new(0)),
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

    /// Bytes of responses currently buffered for callers, over all requests (each request's
    /// share is bounded by [`ClientConfig::max_buffered_bytes`]).
    pub fn buffered_bytes(&self) -> usize {
        self.shared.buffered.load(Ordering::Relaxed)
    }

    fn send(
        &self,
        op: &'static str,
        body: Request,
        streaming: bool,
    ) -> Result<(u64, ResponseRx), ClientError> {
        body.validate().map_err(ProtoError::from)?;
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_frame(&Message::Request { id, body })?;
        let queue = Queue::new(Arc::clone(&self.shared.buffered));
        let rx = ResponseRx {
            queue: Arc::clone(&queue),
        };
        {
            let mut p = self.shared.pending();
            if let Some(reason) = &p.closed {
                return Err(ClientError::Closed {
                    op,
                    reason: reason.clone(),
                });
            }
            p.waiters.insert(id, Waiter { queue, streaming });
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
        rx: &ResponseRx,
        deadline: Option<Instant>,
    ) -> Result<Response, ClientError> {
        self.received(op, id, rx, rx.recv(deadline))
    }

    /// Turns what a queue yielded into the caller's result.
    fn received(
        &self,
        op: &'static str,
        id: u64,
        rx: &ResponseRx,
        r: Recv,
    ) -> Result<Response, ClientError> {
        match r {
            Recv::Response(r) => Ok(r),
            Recv::Timeout => {
                self.shared.pending().waiters.remove(&id);
                rx.queue.abandon();
                Err(ClientError::Timeout {
                    op,
                    after: self.shared.config.request_timeout,
                })
            }
            Recv::End(QueueEnd::Closed(reason)) => Err(ClientError::Closed { op, reason }),
            Recv::End(QueueEnd::TooSlow(after)) => {
                Err(ClientError::ConsumerTooSlow { op, id, after })
            }
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
        let mut inflight: VecDeque<(u64, u64, ResponseRx, u64)> = VecDeque::new();
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
        let mut inflight: VecDeque<(u64, ResponseRx, usize)> = VecDeque::new();
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
        inflight: &mut VecDeque<(u64, ResponseRx, usize)>,
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
                // Unknown id: a request that ended or was abandoned, or id 0 (a
                // connection-level error): dropped.
                let Some((queue, streaming)) = shared
                    .pending()
                    .waiters
                    .get(&id)
                    .map(|w| (Arc::clone(&w.queue), w.streaming))
                else {
                    continue;
                };
                let terminal =
                    !streaming || matches!(body, Response::Exit(_) | Response::Error { .. });
                // Not under the `pending` lock: this may wait for the caller (back-pressure).
                let done = match queue.push(body, &shared.config) {
                    Push::Queued => terminal,
                    Push::Dropped | Push::TooSlow => true,
                };
                if done {
                    shared.pending().waiters.remove(&id);
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
    rx: ResponseRx,
    deadline: Option<Instant>,
    /// The request's `output_cap`, enforced on the host too (the guest is not trusted).
    cap: Option<u64>,
    received: u64,
    /// Events taken off the queue early (by `started`, or while `signal` waits), and the
    /// bytes they are counted for ([`event_cost`]).
    buffered: VecDeque<ExecEvent>,
    buffered_bytes: usize,
    /// An error met while taking events off early, reported after `buffered`.
    failed: Option<ClientError>,
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
        rx: ResponseRx,
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
            buffered_bytes: 0,
            failed: None,
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
        self.event(r).map(Some)
    }

    /// Takes the next response if one is already queued, keeping its event in `buffered`
    /// (an error goes to `failed`). Returns whether it took one.
    fn pull_queued(&mut self) -> bool {
        if self.done || self.failed.is_some() {
            return false;
        }
        let Some(r) = self.rx.try_recv() else {
            return false;
        };
        match self
            .client
            .received(self.op, self.id, &self.rx, r)
            .and_then(|r| self.event(r))
        {
            Ok(ev) => self.keep(ev),
            Err(e) => {
                self.done = true;
                self.failed = Some(e);
            }
        }
        true
    }

    fn keep(&mut self, ev: ExecEvent) {
        self.buffered_bytes += event_cost(&ev);
        self.buffered.push_back(ev);
    }

    fn event(&mut self, r: Response) -> Result<ExecEvent, ClientError> {
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
        Ok(ev)
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
            self.buffered_bytes -= event_cost(&ev);
            return Ok(Some(ev));
        }
        if let Some(e) = self.failed.take() {
            return Err(e);
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
            self.keep(ev);
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
    ///
    /// The answer may be queued behind this exec's own output, which nobody reads while the
    /// caller waits here: so meanwhile the output is moved aside (at most
    /// [`ClientConfig::max_buffered_bytes`] more) and returned later by
    /// [`next_event`](Self::next_event). Signalling a stream whose buffer is full (a
    /// `SIGPIPE` after the reader of its output went away) does not wait for the consumer
    /// deadline.
    pub fn signal(&mut self, signal: i32) -> Result<(), ClientError> {
        const OP: &str = "signal";
        let Some((exec_id, _)) = self.started()? else {
            return Err(ClientError::Usage {
                op: OP,
                message: "the command did not start".into(),
            });
        };
        let client = self.client.clone();
        let (id, rx) = client.send(OP, Request::Signal { exec_id, signal }, false)?;
        let deadline = Instant::now().checked_add(client.shared.config.request_timeout);
        let limit = client.shared.config.max_buffered_bytes;
        let r = loop {
            if let Some(r) = rx.try_recv() {
                break r;
            }
            if self.buffered_bytes < limit && self.pull_queued() {
                continue;
            }
            // Nothing to move aside: wait a little for either queue.
            let tick = Instant::now().checked_add(Duration::from_millis(5));
            let wait_until = match (tick, deadline) {
                (Some(t), Some(d)) => Some(t.min(d)),
                (t, d) => t.or(d),
            };
            match rx.recv(wait_until) {
                Recv::Timeout if deadline.is_none_or(|d| Instant::now() < d) => {}
                r => break r,
            }
        };
        match client.received(OP, id, &rx, r)? {
            Response::Ok => Ok(()),
            r => Err(unexpected(OP, r)),
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
                ..Default::default()
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

/// The bytes an event kept in an [`ExecStream`] is counted for (like [`response_cost`]).
fn event_cost(ev: &ExecEvent) -> usize {
    match ev {
        ExecEvent::Stdout(d) | ExecEvent::Stderr(d) => d.len() + RESPONSE_OVERHEAD,
        ExecEvent::Started { .. } | ExecEvent::Exit(_) => RESPONSE_OVERHEAD,
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
    use std::sync::mpsc;

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
            ..ClientConfig::default()
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
        respond(&mut agent, id, exit0());
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
            ..ClientConfig::default()
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

    fn exit0() -> Response {
        Response::Exit(ExitStatus {
            code: Some(0),
            signal: None,
            timed_out: false,
            truncated: false,
            ..Default::default()
        })
    }

    /// Output chunk `i` of `len` bytes, distinct per index (checks order and loss).
    fn chunk(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|k| ((i * 31 + k) % 251) as u8).collect()
    }

    /// A fake agent's single writer: sends `n` stdout chunks for `exec_id` (answering any
    /// request id pushed to the returned channel with `Ok` / `Pong` in between), then `Exit`.
    /// The flag turns true once everything was written.
    fn stream_writer(
        mut agent: UnixStream,
        id: u64,
        n: usize,
        len: usize,
    ) -> (
        mpsc::Sender<(u64, Response)>,
        Arc<std::sync::atomic::AtomicBool>,
        thread::JoinHandle<()>,
    ) {
        let (tx, rx) = mpsc::channel::<(u64, Response)>();
        let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f2 = Arc::clone(&finished);
        let t = thread::spawn(move || {
            for i in 0..n {
                while let Ok((rid, body)) = rx.try_recv() {
                    respond(&mut agent, rid, body);
                }
                respond(&mut agent, id, Response::Stdout(chunk(i, len)));
            }
            while let Ok((rid, body)) = rx.try_recv() {
                respond(&mut agent, rid, body);
            }
            respond(&mut agent, id, exit0());
            f2.store(true, Ordering::SeqCst);
            // Late answers (after the output).
            while let Ok((rid, body)) = rx.recv_timeout(Duration::from_secs(5)) {
                respond(&mut agent, rid, body);
            }
        });
        (tx, finished, t)
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_slow_consumer_is_throttled_and_gets_every_byte_in_order() {
        const LEN: usize = 64 * 1024;
        const N: usize = 64; // 4 MiB, far more than the buffer plus the socket's.
        let limit = 4 * (LEN + RESPONSE_OVERHEAD);
        let (c, mut agent) = pair(ClientConfig {
            max_buffered_bytes: limit,
            consumer_deadline: Duration::from_secs(20),
            ..ClientConfig::default()
        });
        let c = c.unwrap();
        let mut s = c.exec_stream(ExecRequest::new(["yes"])).unwrap();
        let (id, _) = next_request(&mut agent);
        let (_tx, finished, writer) = stream_writer(agent, id, N, LEN);

        // Nobody reads: the buffer fills up to its bound and the agent is held back.
        wait_for("a full buffer", || {
            c.buffered_bytes() + LEN + RESPONSE_OVERHEAD > limit
        });
        thread::sleep(Duration::from_millis(300));
        assert!(c.buffered_bytes() <= limit, "{}", c.buffered_bytes());
        assert!(
            !finished.load(Ordering::SeqCst),
            "the agent wrote 4 MiB although the client buffers {limit} bytes"
        );

        // A slow consumer gets everything, in order, and the buffer never exceeds its bound.
        let mut i = 0;
        let mut max_seen = 0;
        while let Some(ev) = s.next_event().unwrap() {
            max_seen = max_seen.max(c.buffered_bytes());
            match ev {
                ExecEvent::Stdout(d) => {
                    assert_eq!(d, chunk(i, LEN), "chunk {i}");
                    i += 1;
                    thread::sleep(Duration::from_millis(2));
                }
                ExecEvent::Exit(st) => assert!(st.success()),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(i, N);
        assert!(max_seen <= limit, "{max_seen} > {limit}");
        assert_eq!(c.buffered_bytes(), 0);
        writer.join().unwrap();
    }

    #[test]
    fn a_consumer_that_never_drains_fails_after_the_deadline_and_others_go_on() {
        const LEN: usize = 16 * 1024;
        let (c, mut agent) = pair(ClientConfig {
            max_buffered_messages: 8,
            consumer_deadline: Duration::from_millis(300),
            ..ClientConfig::default()
        });
        let c = c.unwrap();
        let mut s = c.exec_stream(ExecRequest::new(["yes"])).unwrap();
        let (exec, _) = next_request(&mut agent);
        let c1 = c.clone();
        let ping = thread::spawn(move || c1.ping());
        let (ping_id, _) = next_request(&mut agent);
        // Output for the exec (8 chunks fit), the ping's answer among it, more output.
        let (tx, finished, writer) = stream_writer(agent, exec, 200, LEN);
        thread::sleep(Duration::from_millis(50));
        tx.send((ping_id, Response::Pong)).unwrap();
        let started = Instant::now();
        ping.join().unwrap().unwrap();
        wait_for("the agent to finish", || finished.load(Ordering::SeqCst));
        assert!(started.elapsed() < Duration::from_secs(15));

        // The stalled request failed with the typed error naming it; its output was dropped.
        let err = s.next_event().unwrap_err();
        assert!(
            matches!(err, ClientError::ConsumerTooSlow { op: "exec", id, after }
                if id == exec && after == Duration::from_millis(300)),
            "{err}"
        );
        assert!(
            err.to_string().contains(&format!("request {exec}")),
            "{err}"
        );
        assert_eq!(c.buffered_bytes(), 0);
        // The connection still serves other requests.
        let c2 = c.clone();
        let ping = thread::spawn(move || c2.ping());
        wait_for("the second ping", || c.shared.pending().waiters.len() == 1);
        let id = *c.shared.pending().waiters.keys().next().unwrap();
        tx.send((id, Response::Pong)).unwrap();
        ping.join().unwrap().unwrap();
        drop(tx);
        writer.join().unwrap();
    }

    #[test]
    fn dropped_receivers_never_block_the_reader() {
        const LEN: usize = 64 * 1024;
        // A deadline far beyond the test: any wait on a dead receiver would show.
        let (c, mut agent) = pair(ClientConfig {
            max_buffered_bytes: 2 * (LEN + RESPONSE_OVERHEAD),
            consumer_deadline: Duration::from_secs(600),
            ..ClientConfig::default()
        });
        let c = c.unwrap();
        // Dropped before any output and dropped while the reader waits on its full buffer.
        let early = c.exec_stream(ExecRequest::new(["yes"])).unwrap();
        let (id1, _) = next_request(&mut agent);
        drop(early);
        let late = c.exec_stream(ExecRequest::new(["yes"])).unwrap();
        let (id2, _) = next_request(&mut agent);
        let c1 = c.clone();
        let ping = thread::spawn(move || c1.ping_within(Duration::from_secs(20)));
        let (ping_id, _) = next_request(&mut agent);
        let mut w = agent.try_clone().unwrap();
        let writer = thread::spawn(move || {
            for i in 0..32 {
                respond(&mut w, id1, Response::Stdout(chunk(i, LEN)));
            }
            for i in 0..32 {
                respond(&mut w, id2, Response::Stdout(chunk(i, LEN)));
            }
            respond(&mut w, ping_id, Response::Pong);
        });
        wait_for("the late stream's buffer to fill", || {
            c.buffered_bytes() + LEN + RESPONSE_OVERHEAD > 2 * (LEN + RESPONSE_OVERHEAD)
        });
        drop(late);
        let started = Instant::now();
        ping.join().unwrap().unwrap();
        assert!(started.elapsed() < Duration::from_secs(20));
        writer.join().unwrap();
        assert_eq!(c.buffered_bytes(), 0);
        // The reader forgets each request once done with it (the ping's right after its answer).
        wait_for("no requests left", || c.shared.pending().waiters.is_empty());
    }

    #[test]
    fn signalling_a_stream_with_a_full_buffer_does_not_wait_for_the_deadline() {
        const LEN: usize = 16 * 1024;
        const N: usize = 256; // 4 MiB
        let limit = 64 * (LEN + RESPONSE_OVERHEAD); // ~1 MiB, more than the socket holds
        let (c, mut agent) = pair(ClientConfig {
            max_buffered_bytes: limit,
            consumer_deadline: Duration::from_secs(600),
            ..ClientConfig::default()
        });
        let c = c.unwrap();
        let mut s = c.exec_stream(ExecRequest::new(["yes"])).unwrap();
        let (id, _) = next_request(&mut agent);
        respond(&mut agent, id, Response::ExecStarted { exec_id: 3, pid: 4 });
        let mut reader = agent.try_clone().unwrap();
        let (tx, _finished, writer) = stream_writer(agent, id, N, LEN);
        wait_for("a full buffer", || {
            c.buffered_bytes() + LEN + RESPONSE_OVERHEAD > limit
        });
        // The fake agent answers the signal inline, behind the output it already sent.
        let answerer = thread::spawn(move || match next_request(&mut reader) {
            (
                sid,
                Request::Signal {
                    exec_id: 3,
                    signal: 13,
                },
            ) => {
                tx.send((sid, Response::Ok)).unwrap();
            }
            other => panic!("unexpected {other:?}"),
        });
        let started = Instant::now();
        s.signal(13).unwrap();
        assert!(started.elapsed() < Duration::from_secs(20));
        answerer.join().unwrap();
        // Nothing was lost: the output moved aside comes first, in order.
        let mut i = 0;
        while let Some(ev) = s.next_event().unwrap() {
            match ev {
                ExecEvent::Started { exec_id: 3, pid: 4 } => {}
                ExecEvent::Stdout(d) => {
                    assert_eq!(d, chunk(i, LEN), "chunk {i}");
                    i += 1;
                }
                ExecEvent::Exit(st) => assert!(st.success()),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(i, N);
        writer.join().unwrap();
    }

    #[test]
    fn collecting_stays_bounded_by_the_output_cap_with_small_buffers() {
        // The per-request buffer does not limit a collecting exec: it drains as it goes.
        let (c, mut agent) = pair(ClientConfig {
            max_buffered_messages: 2,
            consumer_deadline: Duration::from_secs(20),
            ..ClientConfig::default()
        });
        let c = c.unwrap();
        let mut req = ExecRequest::new(["yes"]);
        req.output_cap = Some(100 * 1000);
        let c1 = c.clone();
        let t = thread::spawn(move || c1.exec(req));
        let (id, _) = next_request(&mut agent);
        let (_tx, _f, writer) = stream_writer(agent, id, 100, 1000);
        let out = t.join().unwrap().unwrap();
        assert_eq!(out.stdout.len(), 100 * 1000);
        assert_eq!(&out.stdout[1000..2000], &chunk(1, 1000)[..]);
        writer.join().unwrap();
    }
}
