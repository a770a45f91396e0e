//! Device-side state of one vsock connection: the connection state machine and credit
//! accounting in both directions.
//!
//! States (see docs/VSOCK.md):
//! - `LocalInit`: the host asked to connect; REQUEST queued or sent, waiting for RESPONSE.
//! - `Established`: data flows. Entered on the guest's RESPONSE, or when we accept a guest
//!   REQUEST (our RESPONSE is queued).
//! - `Closing`: the host dropped its last handle; we flush what the host wrote, send
//!   SHUTDOWN(RCV|SEND) and wait (bounded by a deadline) for the guest's RST.
//! - `Done`: finished (RST sent or received, an abandoned connect the guest never heard of);
//!   the muxer removes it.
//!
//! Control packets owed to the guest (REQUEST, RESPONSE, CREDIT_UPDATE, RST) are a typed
//! [`PendingRx`] set, drained by [`Conn::fill_rx`] in a fixed priority order.
//!
//! Credit: we never send the guest more RW payload than `peer_buf_alloc - (tx_cnt -
//! peer_fwd_cnt)`; we advertise our `buf_alloc` (= the host receive buffer) and `fwd_cnt`
//! in every packet, and the guest may never have more than `buf_alloc` bytes in flight.

use std::num::Wrapping;
use std::sync::Arc;
use std::time::Instant;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use super::host::{CloseReason, ConnShared, ConnState, Phase};
use super::packet::{
    Header, HOST_CID, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// Connection state machine states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CsmState {
    /// Host-initiated, waiting for RESPONSE.
    LocalInit,
    /// Data flows.
    Established,
    /// Host closed; waiting for the guest's RST until the deadline.
    Closing {
        /// When we stop waiting and send RST ourselves.
        deadline: Instant,
    },
    /// Finished; the muxer removes it.
    Done,
}

/// A control packet owed to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    /// REQUEST (host-initiated connect).
    Request = 1 << 0,
    /// RESPONSE (we accept the guest's REQUEST).
    Response = 1 << 1,
    /// CREDIT_UPDATE (the guest asked, or we freed enough buffer).
    CreditUpdate = 1 << 2,
    /// RST, after which the connection is done.
    Rst = 1 << 3,
}

/// The set of [`Reply`]s owed to the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PendingRx(u8);

impl PendingRx {
    /// Adds `r`.
    pub fn insert(&mut self, r: Reply) {
        self.0 |= r as u8;
    }

    /// Removes `r`.
    pub fn remove(&mut self, r: Reply) {
        self.0 &= !(r as u8);
    }

    /// Whether `r` is owed.
    pub fn contains(self, r: Reply) -> bool {
        self.0 & r as u8 != 0
    }

    /// Whether nothing is owed.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// What a guest packet did to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Keep the connection.
    Keep,
    /// Remove it without replying (the guest sent RST).
    Remove,
    /// Reset it: send RST and remove.
    Reset,
}

/// Device-side connection.
#[derive(Debug)]
pub struct Conn {
    /// Shared state with the host handles.
    pub shared: Arc<ConnShared>,
    /// State machine state.
    state: CsmState,
    /// Control packets owed to the guest.
    pending: PendingRx,
    /// Guest's receive buffer size.
    peer_buf_alloc: u32,
    /// Bytes the guest consumed.
    peer_fwd_cnt: Wrapping<u32>,
    /// RW payload bytes we sent to the guest.
    tx_cnt: Wrapping<u32>,
    /// RW payload bytes we received from the guest.
    rx_cnt: Wrapping<u32>,
    /// Our buffer size (advertised `buf_alloc`).
    buf_alloc: u32,
    /// We asked the guest for credit and have not heard back.
    credit_requested: bool,
    /// SHUTDOWN flags already sent.
    shutdown_sent: u32,
}

impl Conn {
    /// A host-initiated connection (REQUEST pending).
    pub fn new_local(shared: Arc<ConnShared>, buf_alloc: u32) -> Self {
        let mut c = Self::base(shared, buf_alloc, CsmState::LocalInit);
        c.pending.insert(Reply::Request);
        c
    }

    /// A guest-initiated connection we accept (RESPONSE pending).
    pub fn new_peer(shared: Arc<ConnShared>, buf_alloc: u32, req: &Header) -> Self {
        let mut c = Self::base(shared, buf_alloc, CsmState::Established);
        c.pending.insert(Reply::Response);
        c.peer_buf_alloc = req.buf_alloc;
        c.peer_fwd_cnt = Wrapping(req.fwd_cnt);
        c
    }

    fn base(shared: Arc<ConnShared>, buf_alloc: u32, state: CsmState) -> Self {
        Conn {
            shared,
            state,
            pending: PendingRx::default(),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            buf_alloc,
            credit_requested: false,
            shutdown_sent: 0,
        }
    }

    /// The state machine's state.
    pub fn state(&self) -> CsmState {
        self.state
    }

    /// The control packets owed to the guest.
    pub fn pending(&self) -> PendingRx {
        self.pending
    }

    /// Whether the connection is finished and must be removed.
    pub fn is_done(&self) -> bool {
        self.state == CsmState::Done
    }

    /// Host-side port.
    pub fn local_port(&self) -> u32 {
        self.shared.local_port
    }

    /// Guest-side port.
    pub fn peer_port(&self) -> u32 {
        self.shared.peer_port
    }

    /// How many payload bytes the guest can take right now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Mark for reset: RST goes out next, then removal. Host handles see `reason`.
    pub fn reset(&mut self, reason: CloseReason) {
        self.pending.insert(Reply::Rst);
        self.close_shared(reason);
    }

    /// Close the host-visible side with `reason` and wake blocked handles.
    pub fn close_shared(&self, reason: CloseReason) {
        self.shared.lock().close(reason);
        self.shared.cond.notify_all();
    }

    /// Handle a packet from the guest addressed to this connection. `data` is the RW payload.
    pub fn on_guest_packet<B: BitmapSlice>(
        &mut self,
        hdr: &Header,
        data: Option<&VolatileSlice<'_, B>>,
        scratch: &mut Vec<u8>,
    ) -> Outcome {
        // Every packet carries the guest's credit information.
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        // Fresh credit information: a new CREDIT_REQUEST may go out if still needed.
        self.credit_requested = false;
        let mut st = self.shared.lock();
        let outcome = match (self.state, hdr.op) {
            (_, OP_RST) => {
                let reason = if self.state == CsmState::LocalInit {
                    CloseReason::Refused
                } else {
                    st.peer_eof = true;
                    CloseReason::Reset
                };
                st.close(reason);
                Outcome::Remove
            }
            (CsmState::LocalInit, OP_RESPONSE) => {
                self.state = CsmState::Established;
                if st.is_closed() {
                    // The host gave up on the connect meanwhile.
                    Outcome::Reset
                } else {
                    st.phase = Phase::Established;
                    Outcome::Keep
                }
            }
            (CsmState::LocalInit, _) => {
                st.close(CloseReason::Protocol);
                Outcome::Reset
            }
            (_, OP_RW) => {
                let len = data.map_or(0, |d| d.len());
                let len32 = len as u32;
                let buffered = (self.rx_cnt - st.fwd_cnt).0;
                if u64::from(buffered) + len as u64 > u64::from(self.buf_alloc) {
                    tracing::debug!(
                        peer_port = self.peer_port(),
                        len,
                        buffered,
                        "vsock: guest overran its credit; resetting connection"
                    );
                    st.close(CloseReason::Protocol);
                    Outcome::Reset
                } else {
                    self.rx_cnt += Wrapping(len32);
                    if let Some(d) = data {
                        if st.host_rd_shut || st.handles == 0 || st.is_closed() {
                            // Nobody will read it: consume immediately so credit keeps flowing.
                            st.fwd_cnt += Wrapping(len32);
                        } else {
                            scratch.resize(len, 0);
                            let n = d.copy_to(&mut scratch[..len]);
                            st.rx_buf.extend(&scratch[..n]);
                        }
                    }
                    Outcome::Keep
                }
            }
            (_, OP_CREDIT_UPDATE) => {
                self.credit_requested = false;
                Outcome::Keep
            }
            (_, OP_CREDIT_REQUEST) => {
                self.pending.insert(Reply::CreditUpdate);
                Outcome::Keep
            }
            (_, OP_SHUTDOWN) => {
                if hdr.flags & SHUTDOWN_SEND != 0 {
                    st.peer_eof = true;
                }
                if hdr.flags & SHUTDOWN_RCV != 0 {
                    st.peer_rcv_closed = true;
                    st.tx_discarded |= !st.tx_buf.is_empty();
                    st.tx_buf.clear();
                }
                if st.peer_eof && st.peer_rcv_closed {
                    // Full close from the guest: it waits for our RST.
                    st.close(CloseReason::Local);
                    Outcome::Reset
                } else {
                    Outcome::Keep
                }
            }
            // REQUEST or RESPONSE on an existing connection, or an unknown op.
            _ => {
                tracing::debug!(
                    op = hdr.op,
                    "vsock: unexpected op on a connection; resetting"
                );
                st.close(CloseReason::Protocol);
                Outcome::Reset
            }
        };
        drop(st);
        self.shared.cond.notify_all();
        match outcome {
            Outcome::Keep => {}
            Outcome::Reset => self.pending.insert(Reply::Rst),
            Outcome::Remove => self.state = CsmState::Done,
        }
        outcome
    }

    /// Look at host-side changes (handles dropped, shutdowns, abandoned connect, consumed
    /// data) and update what must be sent. Returns whether there is something for the RX queue.
    pub fn poll_host(&mut self, now: Instant, close_timeout: std::time::Duration) -> bool {
        let st = self.shared.lock();
        if self.is_done() {
            return false;
        }
        if st.handles == 0 {
            match self.state {
                CsmState::LocalInit => {
                    // Connect abandoned (timeout): tell the guest if it heard of us.
                    if self.pending.contains(Reply::Request) {
                        self.state = CsmState::Done;
                        return false;
                    }
                    self.pending.insert(Reply::Rst);
                }
                CsmState::Established => {
                    self.state = CsmState::Closing {
                        deadline: now + close_timeout,
                    };
                }
                CsmState::Closing { .. } | CsmState::Done => {}
            }
        }
        if (st.fwd_cnt - st.last_fwd_sent).0 >= self.buf_alloc / 4 {
            self.pending.insert(Reply::CreditUpdate);
        }
        self.has_rx_work(&st)
    }

    /// Whether a packet is waiting to go to the guest.
    pub fn has_rx_work(&self, st: &ConnState) -> bool {
        self.next_op(st).is_some()
    }

    fn next_op(&self, st: &ConnState) -> Option<(u16, u32)> {
        if self.is_done() {
            return None;
        }
        if self.pending.contains(Reply::Rst) {
            return Some((OP_RST, 0));
        }
        if self.state == CsmState::LocalInit {
            return self
                .pending
                .contains(Reply::Request)
                .then_some((OP_REQUEST, 0));
        }
        if self.pending.contains(Reply::Response) {
            return Some((OP_RESPONSE, 0));
        }
        let can_send = !st.peer_rcv_closed && !st.tx_buf.is_empty();
        if can_send && self.peer_credit() > 0 {
            return Some((OP_RW, 0));
        }
        if self.pending.contains(Reply::CreditUpdate) {
            return Some((OP_CREDIT_UPDATE, 0));
        }
        if can_send && !self.credit_requested {
            return Some((OP_CREDIT_REQUEST, 0));
        }
        let closing = matches!(self.state, CsmState::Closing { .. });
        let mut want = 0;
        if (st.host_wr_shut || closing) && st.tx_buf.is_empty() {
            want |= SHUTDOWN_SEND;
        }
        if st.host_rd_shut || closing {
            want |= SHUTDOWN_RCV;
        }
        if want & !self.shutdown_sent != 0 {
            return Some((OP_SHUTDOWN, want | self.shutdown_sent));
        }
        None
    }

    /// The header of a packet to the guest with our credit fields.
    fn header(&self, guest_cid: u64, op: u16, fwd_cnt: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port(),
            dst_port: self.peer_port(),
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: self.buf_alloc,
            fwd_cnt,
        }
    }

    /// Produce the next packet for the guest into an RX buffer whose payload area is `data`
    /// (`None`: header only). Returns the header written and the payload length, or `None` when
    /// nothing is pending. Payload is copied from the host send buffer straight into guest
    /// memory, bounded by the guest's credit, the buffer size and `max_data`.
    pub fn fill_rx<B: BitmapSlice>(
        &mut self,
        guest_cid: u64,
        data: Option<&VolatileSlice<'_, B>>,
        max_data: u32,
    ) -> Option<(Header, u32)> {
        let mut st = self.shared.lock();
        let (op, flags) = self.next_op(&st)?;
        let mut hdr = self.header(guest_cid, op, st.fwd_cnt.0);
        st.last_fwd_sent = st.fwd_cnt;
        let mut notify = false;
        match op {
            OP_RST => {
                self.pending.remove(Reply::Rst);
                self.state = CsmState::Done;
            }
            OP_REQUEST => self.pending.remove(Reply::Request),
            OP_RESPONSE => self.pending.remove(Reply::Response),
            OP_RW => {
                let room = data.map_or(0, |d| d.len());
                let n = (st.tx_buf.len())
                    .min(self.peer_credit() as usize)
                    .min(room)
                    .min(max_data as usize);
                if n == 0 {
                    // Header-only RX buffer: send the credit information instead.
                    hdr.op = OP_CREDIT_UPDATE;
                } else if let Some(d) = data {
                    let (a, b) = st.tx_buf.as_slices();
                    let na = n.min(a.len());
                    let ok = d
                        .subslice(0, na)
                        .map(|s| s.copy_from(&a[..na]))
                        .and_then(|()| {
                            if n > na {
                                d.subslice(na, n - na).map(|s| s.copy_from(&b[..n - na]))
                            } else {
                                Ok(())
                            }
                        });
                    if ok.is_err() {
                        // Cannot happen: n <= d.len(). Send credit info instead of bad data.
                        hdr.op = OP_CREDIT_UPDATE;
                    } else {
                        st.tx_buf.drain(..n);
                        self.tx_cnt += Wrapping(n as u32);
                        hdr.len = n as u32;
                        notify = true;
                    }
                }
                self.pending.remove(Reply::CreditUpdate);
            }
            OP_CREDIT_UPDATE => self.pending.remove(Reply::CreditUpdate),
            OP_CREDIT_REQUEST => self.credit_requested = true,
            OP_SHUTDOWN => {
                hdr.flags = flags;
                self.shutdown_sent = flags;
            }
            _ => {}
        }
        drop(st);
        if notify {
            self.shared.cond.notify_all();
        }
        let len = hdr.len;
        Some((hdr, len))
    }

    /// The close deadline passed (or is still ahead).
    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            CsmState::Closing { deadline } => Some(deadline),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_replies_are_a_set() {
        let mut p = PendingRx::default();
        assert!(p.is_empty());
        p.insert(Reply::Response);
        p.insert(Reply::Rst);
        p.insert(Reply::Rst);
        assert!(p.contains(Reply::Response) && p.contains(Reply::Rst));
        assert!(!p.contains(Reply::Request) && !p.contains(Reply::CreditUpdate));
        p.remove(Reply::Rst);
        assert!(!p.contains(Reply::Rst) && p.contains(Reply::Response));
        p.remove(Reply::Response);
        assert!(p.is_empty());
    }
}
