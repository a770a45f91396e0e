//! The in-process host side of vsock: [`VsockHost`], [`VsockStream`], [`VsockListener`].
//!
//! The host side talks to the device thread through shared state only: each connection is a
//! [`ConnShared`] (a mutex-protected pair of bounded byte buffers plus flags, and a condvar),
//! listeners and pending host-initiated connects live in the [`Registry`], and the host wakes
//! the device thread through one EventFd (`HostShared::wake`). Every blocking call has a
//! deadline (connect/accept take one; streams have optional read/write timeouts).
//!
//! Buffers are bounded: the guest->host buffer by the `buf_alloc` we advertise (the guest
//! cannot overrun it without being reset), the host->guest buffer by `conn_buffer_size`
//! (writers block until the device has moved bytes into the guest's RX queue).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{VsockConfig, VsockError, EPHEMERAL_PORT_BASE};
use crate::virtio::mmio::lock;

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The guest answered our REQUEST with RST.
    Refused,
    /// The guest reset the connection.
    Reset,
    /// The guest broke the protocol (credit overrun, bad packet); we reset it.
    Protocol,
    /// A vsock transport reset dropped every connection.
    TransportReset,
    /// The driver reset the device.
    DeviceReset,
    /// The device was dropped (VM stopped).
    DeviceGone,
    /// The host closed it (all handles dropped) or the connect was abandoned.
    Local,
    /// Connect timed out.
    TimedOut,
}

impl CloseReason {
    fn io_error(self, port: u32) -> io::Error {
        let kind = match self {
            CloseReason::Refused => io::ErrorKind::ConnectionRefused,
            CloseReason::Reset | CloseReason::Protocol => io::ErrorKind::ConnectionReset,
            CloseReason::TimedOut => io::ErrorKind::TimedOut,
            _ => io::ErrorKind::ConnectionAborted,
        };
        io::Error::new(
            kind,
            format!("vsock connection (guest port {port}): {self:?}"),
        )
    }
}

/// Connection phase as seen by the host handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Host-initiated, waiting for the guest's RESPONSE.
    Connecting,
    /// Data may flow.
    Established,
    /// Gone; buffered received data can still be read.
    Closed(CloseReason),
}

/// State shared between the stream handles and the device thread for one connection.
#[derive(Debug)]
pub struct ConnState {
    /// Phase.
    pub phase: Phase,
    /// Guest->host bytes not yet read by the host (bounded by our `buf_alloc`).
    pub rx_buf: VecDeque<u8>,
    /// Bytes the host consumed (wrapping), advertised to the guest as `fwd_cnt`.
    pub fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` we last told the guest.
    pub last_fwd_sent: Wrapping<u32>,
    /// The guest will send no more data (SHUTDOWN SEND, or closed after it).
    pub peer_eof: bool,
    /// The guest will receive no more data (SHUTDOWN RCV).
    pub peer_rcv_closed: bool,
    /// Host->guest bytes waiting for RX buffers and credit (bounded by `conn_buffer_size`).
    pub tx_buf: VecDeque<u8>,
    /// Written bytes were discarded undelivered (the guest shut down its receive side).
    pub tx_discarded: bool,
    /// The host shut down its write side.
    pub host_wr_shut: bool,
    /// The host shut down its read side.
    pub host_rd_shut: bool,
    /// Live `VsockStream` handles; 0 means the host closed the connection.
    pub handles: usize,
}

impl ConnState {
    fn new(phase: Phase) -> Self {
        ConnState {
            phase,
            rx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_sent: Wrapping(0),
            peer_eof: false,
            peer_rcv_closed: false,
            tx_buf: VecDeque::new(),
            tx_discarded: false,
            host_wr_shut: false,
            host_rd_shut: false,
            handles: 1,
        }
    }

    /// Close with `reason` unless already closed.
    pub fn close(&mut self, reason: CloseReason) {
        if !matches!(self.phase, Phase::Closed(_)) {
            self.phase = Phase::Closed(reason);
        }
    }

    /// Whether the phase is `Closed`.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed(_))
    }
}

/// One connection's shared state.
#[derive(Debug)]
pub struct ConnShared {
    /// Host-side port.
    pub local_port: u32,
    /// Guest-side port.
    pub peer_port: u32,
    /// Whether the host initiated the connection (its local port came from the ephemeral range).
    pub host_initiated: bool,
    /// The state.
    pub state: Mutex<ConnState>,
    /// Signalled on any state change (data, credit, phase).
    pub cond: Condvar,
}

impl ConnShared {
    pub(crate) fn new(local_port: u32, peer_port: u32, host_initiated: bool, phase: Phase) -> Self {
        ConnShared {
            local_port,
            peer_port,
            host_initiated,
            state: Mutex::new(ConnState::new(phase)),
            cond: Condvar::new(),
        }
    }

    /// Lock the state.
    pub fn lock(&self) -> MutexGuard<'_, ConnState> {
        lock(&self.state)
    }
}

/// A listener's accept queue.
#[derive(Debug, Default)]
pub struct ListenerState {
    /// Connections the device accepted for this port, waiting for `accept`.
    pub backlog: VecDeque<VsockStream>,
    /// The listener was dropped or the device is gone.
    pub closed: bool,
}

/// Shared state of one listener.
#[derive(Debug, Default)]
pub struct ListenerShared {
    /// The accept queue.
    pub state: Mutex<ListenerState>,
    /// Signalled when a connection is queued or the listener closes.
    pub cond: Condvar,
}

/// Host endpoint registry: listeners, pending connects, ports in use, requests to the device.
#[derive(Debug, Default)]
pub struct Registry {
    /// Listening host ports.
    pub listeners: HashMap<u32, Arc<ListenerShared>>,
    /// Host-initiated connections the device has not picked up yet.
    pub connects: VecDeque<Arc<ConnShared>>,
    /// Ephemeral host ports in use by host-initiated connections.
    pub ephemeral_ports: HashSet<u32>,
    /// Next ephemeral port to try.
    pub next_port: u32,
    /// Connections the device currently tracks.
    pub device_conns: usize,
    /// `VsockHost::transport_reset` was called.
    pub transport_reset_requested: bool,
    /// The device was dropped.
    pub device_gone: bool,
}

/// Everything the host handles share with the device.
#[derive(Debug)]
pub struct HostShared {
    /// Device settings.
    pub cfg: VsockConfig,
    /// The registry.
    pub reg: Mutex<Registry>,
    /// Wakes the device thread.
    pub wake: EventFd,
    /// A wake is already pending (avoids one syscall per write).
    pub wake_pending: AtomicBool,
}

impl HostShared {
    pub(crate) fn new(cfg: VsockConfig) -> Result<Arc<Self>, VsockError> {
        Ok(Arc::new(HostShared {
            cfg,
            reg: Mutex::new(Registry {
                next_port: EPHEMERAL_PORT_BASE,
                ..Registry::default()
            }),
            wake: EventFd::new(EFD_NONBLOCK).map_err(|source| VsockError::Io {
                what: "creating the host wake eventfd",
                source,
            })?,
            wake_pending: AtomicBool::new(false),
        }))
    }

    /// Wake the device thread (coalesced).
    pub fn wake_device(&self) {
        if !self.wake_pending.swap(true, Ordering::SeqCst) {
            if let Err(e) = self.wake.write(1) {
                tracing::warn!(error = %e, "vsock: failed to wake the device thread");
            }
        }
    }

    /// Lock the registry.
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        lock(&self.reg)
    }
}

/// Handle to a VM's vsock host endpoint. Cheap to clone; usable from any thread.
#[derive(Debug, Clone)]
pub struct VsockHost {
    shared: Arc<HostShared>,
}

impl VsockHost {
    pub(crate) fn new(shared: Arc<HostShared>) -> Self {
        VsockHost { shared }
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.shared.cfg.guest_cid
    }

    /// The seccomp mode for threads that serve this endpoint (the VM's).
    pub(crate) fn seccomp_mode(&self) -> crate::seccomp::SeccompMode {
        self.shared.cfg.seccomp
    }

    /// Connect to `port` in the guest. Fails with `ConnectionRefused` if the guest answers RST
    /// (nothing listening) and `ConnectTimeout` if it does not answer within `timeout`.
    pub fn connect(&self, port: u32, timeout: Duration) -> Result<VsockStream, VsockError> {
        let cid = self.guest_cid();
        let conn = {
            let mut reg = self.shared.registry();
            if reg.device_gone {
                return Err(VsockError::DeviceGone { cid });
            }
            let limit = self.shared.cfg.max_connections;
            if reg.device_conns + reg.connects.len() >= limit {
                return Err(VsockError::TooManyConnections { cid, limit });
            }
            let local_port = allocate_port(&mut reg);
            let conn = Arc::new(ConnShared::new(local_port, port, true, Phase::Connecting));
            reg.connects.push_back(conn.clone());
            conn
        };
        self.shared.wake_device();
        let deadline = Instant::now() + timeout;
        let mut st = conn.lock();
        loop {
            match st.phase {
                Phase::Established => break,
                Phase::Closed(reason) => {
                    st.handles = 0;
                    return Err(match reason {
                        CloseReason::Refused => VsockError::ConnectionRefused { cid, port },
                        CloseReason::DeviceGone => VsockError::DeviceGone { cid },
                        other => VsockError::ConnectionReset {
                            cid,
                            port,
                            reason: format!("{other:?}"),
                        },
                    });
                }
                Phase::Connecting => {}
            }
            let now = Instant::now();
            if now >= deadline {
                st.close(CloseReason::TimedOut);
                st.handles = 0;
                drop(st);
                self.shared.wake_device();
                return Err(VsockError::ConnectTimeout { cid, port, timeout });
            }
            st = conn
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(st);
        Ok(VsockStream::from_parts(conn, self.shared.clone()))
    }

    /// Listen on host `port` for guest-initiated connections (the guest connects to CID 2).
    pub fn listen(&self, port: u32) -> Result<VsockListener, VsockError> {
        let mut reg = self.shared.registry();
        if reg.device_gone {
            return Err(VsockError::DeviceGone {
                cid: self.guest_cid(),
            });
        }
        if reg.listeners.contains_key(&port) || reg.ephemeral_ports.contains(&port) {
            return Err(VsockError::PortInUse { port });
        }
        let l = Arc::new(ListenerShared::default());
        reg.listeners.insert(port, l.clone());
        Ok(VsockListener {
            port,
            shared: l,
            host: self.shared.clone(),
        })
    }

    /// Ask the device to send VIRTIO_VSOCK_EVENT_TRANSPORT_RESET to the guest and drop every
    /// connection (after a snapshot restore). Listeners stay. Asynchronous: done by the
    /// device thread.
    pub fn transport_reset(&self) {
        self.shared.registry().transport_reset_requested = true;
        self.shared.wake_device();
    }

    /// Number of connections the device currently tracks.
    pub fn connection_count(&self) -> usize {
        self.shared.registry().device_conns
    }
}

fn allocate_port(reg: &mut Registry) -> u32 {
    loop {
        let p = reg.next_port;
        reg.next_port = if p == u32::MAX {
            EPHEMERAL_PORT_BASE
        } else {
            p + 1
        };
        // At most `max_connections` ports are taken, so this terminates quickly.
        if !reg.ephemeral_ports.contains(&p) && !reg.listeners.contains_key(&p) {
            reg.ephemeral_ports.insert(p);
            return p;
        }
    }
}

/// Accepts guest-initiated connections to one host port. Dropping it stops listening; queued
/// connections that were never accepted are closed.
#[derive(Debug)]
pub struct VsockListener {
    port: u32,
    shared: Arc<ListenerShared>,
    host: Arc<HostShared>,
}

impl VsockListener {
    /// The host port.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Wait up to `timeout` for a guest connection.
    pub fn accept(&self, timeout: Duration) -> Result<VsockStream, VsockError> {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.shared.state);
        loop {
            if let Some(s) = st.backlog.pop_front() {
                return Ok(s);
            }
            if st.closed {
                return Err(VsockError::DeviceGone {
                    cid: self.host.cfg.guest_cid,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(VsockError::AcceptTimeout {
                    port: self.port,
                    timeout,
                });
            }
            st = self
                .shared
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Drop for VsockListener {
    fn drop(&mut self) {
        {
            let mut reg = self.host.registry();
            if reg
                .listeners
                .get(&self.port)
                .is_some_and(|l| Arc::ptr_eq(l, &self.shared))
            {
                reg.listeners.remove(&self.port);
            }
        }
        let pending = {
            let mut st = lock(&self.shared.state);
            st.closed = true;
            std::mem::take(&mut st.backlog)
        };
        // Dropping the queued streams closes them (outside every lock).
        drop(pending);
    }
}

/// A connected vsock stream. `Read + Write`; clone it with [`VsockStream::try_clone`] to read
/// and write from different threads. Reads and writes block until progress, end of stream,
/// error, or the handle's timeout (`io::ErrorKind::TimedOut`). Dropping the last handle closes
/// the connection (SHUTDOWN, then RST).
#[derive(Debug)]
pub struct VsockStream {
    conn: Arc<ConnShared>,
    host: Arc<HostShared>,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
}

impl VsockStream {
    /// Wrap a connection whose `handles` count already includes this handle.
    pub(crate) fn from_parts(conn: Arc<ConnShared>, host: Arc<HostShared>) -> Self {
        VsockStream {
            conn,
            host,
            read_timeout: None,
            write_timeout: None,
        }
    }

    /// The host-side port.
    pub fn local_port(&self) -> u32 {
        self.conn.local_port
    }

    /// The guest-side port.
    pub fn peer_port(&self) -> u32 {
        self.conn.peer_port
    }

    /// Another handle to the same connection (timeouts are per handle).
    pub fn try_clone(&self) -> io::Result<VsockStream> {
        self.conn.lock().handles += 1;
        Ok(VsockStream {
            conn: self.conn.clone(),
            host: self.host.clone(),
            read_timeout: self.read_timeout,
            write_timeout: self.write_timeout,
        })
    }

    /// Read timeout of this handle (`None` blocks until data, EOF or error).
    pub fn set_read_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        if t == Some(Duration::ZERO) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "zero read timeout",
            ));
        }
        self.read_timeout = t;
        Ok(())
    }

    /// Write timeout of this handle.
    pub fn set_write_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        if t == Some(Duration::ZERO) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "zero write timeout",
            ));
        }
        self.write_timeout = t;
        Ok(())
    }

    /// Shut down one or both directions. Shutting down `Write` sends the guest a SHUTDOWN
    /// (SEND) once buffered data is delivered: the guest reads end-of-stream.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        {
            let mut st = self.conn.lock();
            if matches!(how, Shutdown::Write | Shutdown::Both) {
                st.host_wr_shut = true;
            }
            if matches!(how, Shutdown::Read | Shutdown::Both) {
                st.host_rd_shut = true;
                let n = st.rx_buf.len();
                st.rx_buf.clear();
                st.fwd_cnt += Wrapping(n as u32);
            }
        }
        self.conn.cond.notify_all();
        self.host.wake_device();
        Ok(())
    }

    /// Bytes received from the guest and not yet read.
    pub fn available(&self) -> usize {
        self.conn.lock().rx_buf.len()
    }

    fn wait<'a>(
        &'a self,
        st: MutexGuard<'a, ConnState>,
        deadline: Option<Instant>,
    ) -> io::Result<MutexGuard<'a, ConnState>> {
        match deadline {
            None => Ok(self.conn.cond.wait(st).unwrap_or_else(|e| e.into_inner())),
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "vsock stream to guest port {}: timed out",
                            self.conn.peer_port
                        ),
                    ));
                }
                Ok(self
                    .conn
                    .cond
                    .wait_timeout(st, d - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0)
            }
        }
    }

    /// Wait until every written byte was handed to the guest (or the deadline passes).
    fn flush_inner(&self) -> io::Result<()> {
        let deadline = self.write_timeout.map(|t| Instant::now() + t);
        let mut st = self.conn.lock();
        loop {
            if st.tx_discarded {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "vsock: guest shut down its receive side; written data was discarded",
                ));
            }
            if st.tx_buf.is_empty() {
                return Ok(());
            }
            if let Phase::Closed(r) = st.phase {
                return Err(r.io_error(self.conn.peer_port));
            }
            if st.peer_rcv_closed {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "vsock: guest shut down its receive side",
                ));
            }
            st = self.wait(st, deadline)?;
        }
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let deadline = self.read_timeout.map(|t| Instant::now() + t);
        let mut st = self.conn.lock();
        loop {
            if !st.rx_buf.is_empty() {
                let n = buf.len().min(st.rx_buf.len());
                let (a, b) = st.rx_buf.as_slices();
                let na = n.min(a.len());
                buf[..na].copy_from_slice(&a[..na]);
                buf[na..n].copy_from_slice(&b[..n - na]);
                st.rx_buf.drain(..n);
                st.fwd_cnt += Wrapping(n as u32);
                let unsent = (st.fwd_cnt - st.last_fwd_sent).0;
                let threshold = self.host.cfg.conn_buffer_size / 4;
                drop(st);
                if unsent >= threshold {
                    self.host.wake_device();
                }
                return Ok(n);
            }
            if st.host_rd_shut || st.peer_eof {
                return Ok(0);
            }
            if let Phase::Closed(r) = st.phase {
                return match r {
                    CloseReason::Local => Ok(0),
                    r => Err(r.io_error(self.conn.peer_port)),
                };
            }
            st = self.wait(st, deadline)?;
        }
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let cap = self.host.cfg.conn_buffer_size as usize;
        let deadline = self.write_timeout.map(|t| Instant::now() + t);
        let mut st = self.conn.lock();
        loop {
            if let Phase::Closed(r) = st.phase {
                return Err(match r {
                    CloseReason::Local => {
                        io::Error::new(io::ErrorKind::BrokenPipe, "vsock: connection closed")
                    }
                    r => r.io_error(self.conn.peer_port),
                });
            }
            if st.host_wr_shut || st.peer_rcv_closed {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    format!(
                        "vsock stream to guest port {}: write side shut down",
                        self.conn.peer_port
                    ),
                ));
            }
            let space = cap.saturating_sub(st.tx_buf.len());
            if space > 0 {
                let n = space.min(buf.len());
                st.tx_buf.extend(&buf[..n]);
                drop(st);
                self.host.wake_device();
                return Ok(n);
            }
            st = self.wait(st, deadline)?;
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_inner()
    }
}

impl Drop for VsockStream {
    fn drop(&mut self) {
        let last = {
            let mut st = self.conn.lock();
            st.handles = st.handles.saturating_sub(1);
            st.handles == 0
        };
        if last {
            self.host.wake_device();
        }
    }
}
