//! The vsock muxer: routes packets from the guest to connections, accepts guest connections
//! for host listeners, picks up host-initiated connects, and decides which packet goes into
//! the next RX buffer.
//!
//! Packets to unknown connections or ports get an RST (queued in a bounded queue; TX
//! processing pauses while it is full, so a guest cannot make us buffer without bound).
//! Connections needing RX service are kept in a round-robin ready queue so no connection
//! starves another.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use super::connection::{Conn, CsmState, Outcome, Reply};
use super::host::{CloseReason, ConnShared, HostShared, Phase, VsockStream};
use super::packet::{Header, HOST_CID, OP_REQUEST, OP_RST, TYPE_STREAM};
use super::{CLOSE_TIMEOUT, RST_QUEUE_MAX};
use crate::virtio::mmio::lock;

/// Connection key: (host port, guest port).
pub type ConnKey = (u32, u32);

/// Counters for diagnostics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MuxerStats {
    /// RSTs sent for packets that matched no connection or listener.
    pub rst_unknown: u64,
    /// Packets dropped for a bad source/destination CID or socket type.
    pub dropped_bad_addr: u64,
    /// Connections reset for a protocol violation.
    pub protocol_resets: u64,
    /// Guest connection requests refused because of the connection cap or a full backlog.
    pub refused_cap: u64,
}

/// The muxer.
#[derive(Debug)]
pub struct Muxer {
    host: Arc<HostShared>,
    conns: HashMap<ConnKey, Conn>,
    rst_queue: VecDeque<Header>,
    ready: VecDeque<ConnKey>,
    in_ready: HashSet<ConnKey>,
    scratch: Vec<u8>,
    close_timeout: Duration,
    stats: MuxerStats,
}

impl Muxer {
    /// A muxer serving the host endpoint `host`.
    pub fn new(host: Arc<HostShared>) -> Self {
        Muxer {
            host,
            conns: HashMap::new(),
            rst_queue: VecDeque::new(),
            ready: VecDeque::new(),
            in_ready: HashSet::new(),
            scratch: Vec::new(),
            close_timeout: CLOSE_TIMEOUT,
            stats: MuxerStats::default(),
        }
    }

    /// Override the close timeout (tests).
    pub fn set_close_timeout(&mut self, t: Duration) {
        self.close_timeout = t;
    }

    /// Counters.
    pub fn stats(&self) -> MuxerStats {
        self.stats
    }

    /// Number of tracked connections.
    pub fn conn_count(&self) -> usize {
        self.conns.len()
    }

    fn guest_cid(&self) -> u64 {
        self.host.cfg.guest_cid
    }

    /// Whether TX processing must pause until RX drains the RST queue.
    pub fn rst_queue_full(&self) -> bool {
        self.rst_queue.len() >= RST_QUEUE_MAX
    }

    /// Whether anything is waiting for an RX buffer.
    pub fn has_rx(&self) -> bool {
        !self.rst_queue.is_empty() || !self.ready.is_empty()
    }

    fn mark_ready(&mut self, key: ConnKey) {
        if self.in_ready.insert(key) {
            self.ready.push_back(key);
        }
    }

    fn queue_rst(&mut self, to: &Header) {
        if self.rst_queue_full() {
            return;
        }
        self.rst_queue.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid(),
            src_port: to.dst_port,
            dst_port: to.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        });
    }

    /// Handle one packet the guest sent on the TX queue.
    pub fn handle_tx<B: BitmapSlice>(&mut self, hdr: &Header, data: Option<&VolatileSlice<'_, B>>) {
        if hdr.src_cid != self.guest_cid() || hdr.dst_cid != HOST_CID {
            tracing::debug!(
                src = hdr.src_cid,
                dst = hdr.dst_cid,
                "vsock: dropping packet with a bad address"
            );
            self.stats.dropped_bad_addr += 1;
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.type_ != TYPE_STREAM {
            self.stats.dropped_bad_addr += 1;
            if hdr.op != OP_RST {
                self.queue_rst(hdr);
            }
            return;
        }
        if let Some(conn) = self.conns.get_mut(&key) {
            match conn.on_guest_packet(hdr, data, &mut self.scratch) {
                Outcome::Keep => {
                    if conn.has_rx_work(&conn.shared.lock()) {
                        self.mark_ready(key);
                    }
                }
                Outcome::Remove => self.remove(key),
                Outcome::Reset => {
                    if hdr.op != super::packet::OP_SHUTDOWN {
                        self.stats.protocol_resets += 1;
                    }
                    self.mark_ready(key);
                }
            }
            return;
        }
        match hdr.op {
            OP_RST => {}
            OP_REQUEST => self.accept_guest(hdr, key),
            _ => {
                self.stats.rst_unknown += 1;
                self.queue_rst(hdr);
            }
        }
    }

    /// A packet we could not parse but whose header was readable: reset its connection.
    pub fn handle_malformed(&mut self, hdr: &Header) {
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.src_cid != self.guest_cid() || hdr.dst_cid != HOST_CID {
            self.stats.dropped_bad_addr += 1;
            return;
        }
        self.stats.protocol_resets += 1;
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.reset(CloseReason::Protocol);
            self.mark_ready(key);
        } else if hdr.op != OP_RST {
            self.queue_rst(hdr);
        }
    }

    fn accept_guest(&mut self, hdr: &Header, key: ConnKey) {
        let listener = {
            let reg = self.host.registry();
            if self.conns.len() + reg.connects.len() >= self.host.cfg.max_connections {
                None
            } else {
                reg.listeners.get(&hdr.dst_port).cloned()
            }
        };
        let Some(listener) = listener else {
            self.stats.rst_unknown += 1;
            self.queue_rst(hdr);
            return;
        };
        let shared = Arc::new(ConnShared::new(
            hdr.dst_port,
            hdr.src_port,
            false,
            Phase::Established,
        ));
        {
            let mut l = lock(&listener.state);
            if l.closed || l.backlog.len() >= self.host.cfg.listen_backlog {
                drop(l);
                self.stats.refused_cap += 1;
                self.queue_rst(hdr);
                return;
            }
            l.backlog
                .push_back(VsockStream::from_parts(shared.clone(), self.host.clone()));
        }
        listener.cond.notify_all();
        let conn = Conn::new_peer(shared, self.host.cfg.conn_buffer_size, hdr);
        self.conns.insert(key, conn);
        self.host.registry().device_conns = self.conns.len();
        self.mark_ready(key);
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            conn.close_shared(CloseReason::Local);
            let mut reg = self.host.registry();
            if conn.shared.host_initiated {
                reg.ephemeral_ports.remove(&conn.local_port());
            }
            reg.device_conns = self.conns.len();
        }
        if self.in_ready.remove(&key) {
            self.ready.retain(|k| *k != key);
        }
    }

    /// Pick up host requests: new connects, transport reset, and per-connection host-side
    /// changes. Returns true if a transport reset was requested (the device must send the
    /// event).
    ///
    /// With `accept_connects` false (right after a transport reset, until the guest has
    /// handled the event) new host connects stay queued in the registry.
    pub fn poll_host(&mut self, now: Instant, accept_connects: bool) -> bool {
        let (connects, reset) = {
            let mut reg = self.host.registry();
            let reset = std::mem::take(&mut reg.transport_reset_requested);
            let connects = if accept_connects && !reset {
                std::mem::take(&mut reg.connects)
            } else {
                VecDeque::new()
            };
            (connects, reset)
        };
        if reset {
            self.reset_all(CloseReason::TransportReset);
        }
        for shared in connects {
            let key = (shared.local_port, shared.peer_port);
            if shared.lock().is_closed() {
                self.host
                    .registry()
                    .ephemeral_ports
                    .remove(&shared.local_port);
                continue;
            }
            let conn = Conn::new_local(shared, self.host.cfg.conn_buffer_size);
            self.conns.insert(key, conn);
            self.mark_ready(key);
        }
        self.host.registry().device_conns = self.conns.len();
        let timeout = self.close_timeout;
        let mut ready = Vec::new();
        let mut gone = Vec::new();
        for (key, conn) in self.conns.iter_mut() {
            if conn.poll_host(now, timeout) {
                ready.push(*key);
            }
            if conn.is_done() {
                gone.push(*key);
            }
        }
        for k in gone {
            self.remove(k);
        }
        for k in ready {
            self.mark_ready(k);
        }
        reset
    }

    /// Reset connections whose close deadline passed. Returns the next deadline, if any.
    pub fn sweep(&mut self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut expired = Vec::new();
        for (key, conn) in self.conns.iter_mut() {
            if let Some(d) = conn.deadline() {
                if d <= now {
                    if !conn.pending().contains(Reply::Rst) {
                        conn.reset(CloseReason::Local);
                        expired.push(*key);
                    }
                } else {
                    next = Some(next.map_or(d, |n| n.min(d)));
                }
            }
        }
        for k in expired {
            self.mark_ready(k);
        }
        next
    }

    /// Earliest close deadline among connections.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns.values().filter_map(|c| c.deadline()).min()
    }

    /// Drop every connection (transport reset, device reset, device gone).
    pub fn reset_all(&mut self, reason: CloseReason) {
        let keys: Vec<_> = self.conns.keys().copied().collect();
        for k in keys {
            if let Some(c) = self.conns.get(&k) {
                c.close_shared(reason);
            }
            self.remove(k);
        }
        self.rst_queue.clear();
        self.ready.clear();
        self.in_ready.clear();
    }

    /// Write the next pending packet into an RX buffer. Returns the header and payload length
    /// (the caller writes the header), or `None` if nothing is pending.
    pub fn fill_rx<B: BitmapSlice>(
        &mut self,
        data: Option<&VolatileSlice<'_, B>>,
        max_data: u32,
    ) -> Option<(Header, u32)> {
        if let Some(h) = self.rst_queue.pop_front() {
            return Some((h, 0));
        }
        let cid = self.guest_cid();
        while let Some(key) = self.ready.pop_front() {
            self.in_ready.remove(&key);
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let Some(out) = conn.fill_rx(cid, data, max_data) else {
                continue;
            };
            if conn.is_done() {
                self.remove(key);
            } else if conn.has_rx_work(&conn.shared.lock()) {
                self.mark_ready(key);
            }
            return Some(out);
        }
        None
    }

    /// State of a connection (tests and diagnostics).
    pub fn conn_state(&self, key: ConnKey) -> Option<CsmState> {
        self.conns.get(&key).map(Conn::state)
    }
}
