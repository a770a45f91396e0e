//! The virtio-vsock device: queue processing, activation/reset, and the event-loop
//! subscriber.
//!
//! The device runs on the VM's device event-loop thread. It waits on the three queue-notify
//! EventFds (ioeventfds), the host wake EventFd (host handles have data, credit, or requests)
//! and a TimerFd (close deadlines). Guest mistakes never panic the host:
//! - malformed chains (too short, wrong direction, too many descriptors, loops, oversize
//!   `len`, memory outside the guest) are returned to the guest unused, and the connection
//!   they belong to (if the header was readable) is reset;
//! - an available index that jumps by more than the queue size, or a used ring we cannot
//!   write, marks the device DEVICE_NEEDS_RESET and stops it until the driver resets it.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::Bytes;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::host::{CloseReason, HostShared, VsockHost};
use super::muxer::{Muxer, MuxerStats};
use super::packet::{Header, EVENT_TRANSPORT_RESET, HDR_SIZE};
use super::{
    VsockConfig, VsockError, EVQ, MAX_CHAIN_DESCS, MAX_PKT_DATA, QUEUE_MAX_SIZE, RXQ, TXQ,
    VIRTIO_ID_VSOCK,
};
use crate::virtio::mmio::lock;
use crate::virtio::{ActivateError, GuestMem, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

/// Rounds of TX/RX processing per wake-up before yielding to other event sources.
const MAX_ROUNDS: usize = 64;
/// Avail ring flag: the driver does not want interrupts for now.
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Longest time host connects are held back after a TRANSPORT_RESET event was delivered,
/// waiting for the guest to show (by refilling its event queue) that it handled the event.
pub const RESET_SETTLE_MAX: Duration = Duration::from_millis(500);

/// Event sources of the device (the `data` of its epoll registrations).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceEvent {
    /// The guest added RX buffers.
    RxQueue,
    /// The guest sent packets.
    TxQueue,
    /// The guest added event buffers.
    EventQueue,
    /// A host handle needs service.
    HostWake,
    /// A close deadline passed.
    Timer,
}

impl DeviceEvent {
    fn from_data(d: u32) -> Option<Self> {
        Some(match d {
            0 => DeviceEvent::RxQueue,
            1 => DeviceEvent::TxQueue,
            2 => DeviceEvent::EventQueue,
            3 => DeviceEvent::HostWake,
            4 => DeviceEvent::Timer,
            _ => return None,
        })
    }
}

/// Counters (diagnostics and tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStats {
    /// TX chains dropped as malformed.
    pub bad_tx_chains: u64,
    /// RX chains returned unused as malformed.
    pub bad_rx_chains: u64,
    /// Event chains returned unused as malformed.
    pub bad_evq_chains: u64,
    /// TRANSPORT_RESET events delivered.
    pub transport_resets: u64,
    /// Times the device marked itself DEVICE_NEEDS_RESET.
    pub needs_reset: u64,
    /// Used-buffer interrupts skipped because the driver set VRING_AVAIL_F_NO_INTERRUPT.
    pub suppressed_interrupts: u64,
    /// Muxer counters.
    pub muxer: MuxerStats,
}

#[derive(Debug)]
struct Active {
    mem: GuestMem,
    queues: Vec<Queue>,
}

/// The virtio-vsock device.
#[derive(Debug)]
pub struct VsockDevice {
    cfg: VsockConfig,
    host: Arc<HostShared>,
    muxer: Muxer,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<EventFd>,
    timer: TimerFd,
    timer_armed_for: Option<Instant>,
    active: Option<Active>,
    acked_features: u64,
    evq_pending: bool,
    /// After delivering TRANSPORT_RESET: the event queue's avail index then, and the deadline.
    /// Host connects wait until the guest refilled the queue (it handled the event, so it
    /// will not reset the new connections) or the deadline passes.
    settle: Option<(u16, Instant)>,
    broken: bool,
    stats: DeviceStats,
    queue_max_sizes: [u16; 3],
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> VsockError {
    move |source| VsockError::Io { what, source }
}

impl VsockDevice {
    /// A vsock device for a guest with `cfg.guest_cid`, not yet activated, with its own
    /// queue-notify and interrupt EventFds.
    pub fn new(cfg: VsockConfig) -> Result<Self, VsockError> {
        let queue_evts = (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()
            .map_err(io_err("creating queue eventfds"))?;
        let irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("creating the interrupt eventfd"))?;
        Self::with_eventfds(cfg, queue_evts, irq)
    }

    /// A vsock device using EventFds the VM already registered: `queue_evts` (RX, TX, event
    /// queue) as KVM ioeventfds on the QueueNotify register, `irq` as a KVM irqfd.
    pub fn with_eventfds(
        cfg: VsockConfig,
        queue_evts: Vec<EventFd>,
        irq: EventFd,
    ) -> Result<Self, VsockError> {
        if queue_evts.len() != 3 {
            return Err(VsockError::Config(format!(
                "vsock needs 3 queue eventfds, got {}",
                queue_evts.len()
            )));
        }
        if cfg.guest_cid < 3 || cfg.guest_cid > u64::from(u32::MAX) {
            return Err(VsockError::Config(format!(
                "guest cid {} must be in 3..=u32::MAX",
                cfg.guest_cid
            )));
        }
        if cfg.conn_buffer_size < 4096 || cfg.max_connections == 0 {
            return Err(VsockError::Config(
                "conn_buffer_size must be >= 4096 and max_connections > 0".into(),
            ));
        }
        let host = HostShared::new(cfg.clone())?;
        Ok(VsockDevice {
            muxer: Muxer::new(host.clone()),
            host,
            interrupt: Interrupt::with_eventfd(irq),
            queue_evts,
            timer: TimerFd::new()
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))
                .map_err(io_err("creating the close timer"))?,
            timer_armed_for: None,
            active: None,
            acked_features: 0,
            evq_pending: false,
            settle: None,
            broken: false,
            stats: DeviceStats::default(),
            queue_max_sizes: [QUEUE_MAX_SIZE; 3],
            cfg,
        })
    }

    /// The host endpoint of this device.
    pub fn host(&self) -> VsockHost {
        VsockHost::new(self.host.clone())
    }

    /// The guest CID.
    pub fn guest_cid(&self) -> u64 {
        self.cfg.guest_cid
    }

    /// Whether the driver activated the device.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Counters.
    pub fn stats(&self) -> DeviceStats {
        let mut s = self.stats;
        s.muxer = self.muxer.stats();
        s
    }

    /// Override the close timeout (tests).
    pub fn set_close_timeout(&mut self, t: Duration) {
        self.muxer.set_close_timeout(t);
    }

    /// Send VIRTIO_VSOCK_EVENT_TRANSPORT_RESET to the guest and drop every connection (host
    /// handles see `ConnectionAborted`). Needed after a snapshot restore; listeners stay.
    pub fn transport_reset(&mut self) {
        self.muxer.reset_all(CloseReason::TransportReset);
        self.evq_pending = true;
        self.settle = None;
        self.process_all();
    }

    /// Handle one event source (what the event loop calls).
    pub fn handle_event(&mut self, ev: DeviceEvent) {
        match ev {
            DeviceEvent::RxQueue | DeviceEvent::TxQueue | DeviceEvent::EventQueue => {
                let idx = match ev {
                    DeviceEvent::RxQueue => RXQ,
                    DeviceEvent::TxQueue => TXQ,
                    _ => EVQ,
                };
                // EAGAIN just means it was already drained.
                let _ = self.queue_evts[idx].read();
            }
            DeviceEvent::HostWake => {
                // Drain the eventfd first, then clear the flag: a handle that sets the flag
                // after this point writes the eventfd again, and one that found it still set
                // made its change before we poll below.
                let _ = self.host.wake.read();
                self.host.wake_pending.store(false, Ordering::SeqCst);
                self.poll_host();
            }
            DeviceEvent::Timer => {
                // Only a timer we armed and that has expired is readable; reading it clears
                // the readiness (otherwise the level-triggered epoll would spin on it).
                if self.timer_armed_for.is_none() || self.timer.is_armed().unwrap_or(true) {
                    return;
                }
                if let Err(e) = self.timer.wait() {
                    tracing::warn!(error = %e, "vsock: reading the close timer failed");
                }
                self.timer_armed_for = None;
                self.muxer.sweep(Instant::now());
            }
        }
        if self.settle.is_some() && self.check_settled() {
            self.poll_host();
        }
        self.process_all();
    }

    /// Pick up host-side requests (connects, closes, transport reset).
    fn poll_host(&mut self) {
        if self.active.is_none() {
            return;
        }
        let accept_connects = self.settle.is_none() || self.check_settled();
        if self.muxer.poll_host(Instant::now(), accept_connects) {
            self.evq_pending = true;
            self.settle = None;
        }
    }

    /// Whether the guest handled the last TRANSPORT_RESET (or we stopped waiting).
    fn check_settled(&mut self) -> bool {
        let Some((idx, deadline)) = self.settle else {
            return true;
        };
        let refilled = self.active.as_ref().is_some_and(|a| {
            a.queues[EVQ]
                .avail_idx(&a.mem, std::sync::atomic::Ordering::Acquire)
                .is_ok_and(|i| i.0 != idx)
        });
        if refilled || Instant::now() >= deadline {
            self.settle = None;
            return true;
        }
        false
    }

    /// Process every queue until no more progress (bounded), then re-arm the close timer.
    pub fn process_all(&mut self) {
        if self.active.is_none() || self.broken {
            return;
        }
        let mut rounds = 0;
        loop {
            let tx = self.process_tx();
            let rx = self.process_rx();
            if self.broken || (!tx && !rx) {
                break;
            }
            rounds += 1;
            if rounds >= MAX_ROUNDS {
                // Let other devices run; come back through the wake fd.
                self.host.wake_device();
                break;
            }
        }
        if self.evq_pending && !self.broken {
            self.process_evq();
        }
        self.arm_timer();
    }

    fn arm_timer(&mut self) {
        let settle = self.settle.map(|(_, d)| d);
        let Some(next) = [self.muxer.next_deadline(), settle]
            .into_iter()
            .flatten()
            .min()
        else {
            return;
        };
        if self.timer_armed_for.is_some_and(|t| t <= next) {
            return;
        }
        let wait = next
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        match self.timer.reset(wait, None) {
            Ok(()) => self.timer_armed_for = Some(next),
            Err(e) => tracing::warn!(error = %e, "vsock: cannot arm the close timer"),
        }
    }

    fn mark_broken(&mut self, why: &str) {
        tracing::warn!(cid = self.cfg.guest_cid, why, "vsock: device needs reset");
        self.broken = true;
        self.stats.needs_reset += 1;
        self.interrupt.set_needs_reset();
    }

    fn signal(&mut self, qidx: usize) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let q = &mut a.queues[qidx];
        // `needs_notification` orders our used-ring writes before the reads below.
        let needed = match q.needs_notification(&a.mem) {
            Ok(false) => false,
            // Without EVENT_IDX the driver suppresses interrupts with
            // VRING_AVAIL_F_NO_INTERRUPT while it polls the used ring itself (and re-checks
            // the ring after clearing the flag), so skipping them then is safe.
            _ if !q.event_idx_enabled() => {
                let flags: Result<u16, _> = a.mem.load(
                    vm_memory::GuestAddress(q.avail_ring()),
                    std::sync::atomic::Ordering::Acquire,
                );
                flags.map_or(true, |f| u16::from_le(f) & VRING_AVAIL_F_NO_INTERRUPT == 0)
            }
            _ => true,
        };
        if needed {
            self.interrupt.signal_used_queue();
        } else {
            self.stats.suppressed_interrupts += 1;
        }
    }

    /// Pop the next chain: Ok(None) when the ring is empty, Err on a corrupt avail index.
    fn pop<'m>(
        q: &mut Queue,
        mem: &'m GuestMem,
    ) -> Result<Option<DescriptorChain<&'m GuestMem>>, virtio_queue::Error> {
        Ok(q.iter(mem)?.next())
    }

    /// Drain the TX queue. Returns whether any chain was consumed.
    fn process_tx(&mut self) -> bool {
        let Some(a) = self.active.as_mut() else {
            return false;
        };
        let mem = &a.mem;
        let q = &mut a.queues[TXQ];
        let mut used = false;
        let mut fatal = None;
        // The guest need not kick while we drain (VRING_USED_F_NO_NOTIFY); re-enabling
        // reports chains that arrived meanwhile.
        if let Err(e) = q.disable_notification(mem) {
            fatal = Some(format!("tx used flags: {e}"));
        }
        while fatal.is_none() {
            if self.muxer.rst_queue_full() {
                // Paused until RX drains the RST queue; process_all comes back here.
                let _ = q.enable_notification(mem);
                break;
            }
            let mut chain = match Self::pop(q, mem) {
                Ok(Some(c)) => c,
                Ok(None) => match q.enable_notification(mem) {
                    Ok(true) => {
                        let _ = q.disable_notification(mem);
                        continue;
                    }
                    Ok(false) => break,
                    Err(e) => {
                        fatal = Some(format!("tx used flags: {e}"));
                        break;
                    }
                },
                Err(e) => {
                    fatal = Some(format!("tx queue: {e}"));
                    break;
                }
            };
            let head = chain.head_index();
            if head >= q.size() {
                fatal = Some(format!("tx queue: head index {head} out of range"));
                break;
            }
            let ndesc = chain.clone().take(MAX_CHAIN_DESCS + 1).count();
            let parsed = if ndesc > MAX_CHAIN_DESCS {
                None
            } else {
                VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA).ok()
            };
            match parsed {
                Some(pkt) => {
                    let hdr = Header::from_packet(&pkt);
                    self.muxer.handle_tx(&hdr, pkt.data_slice());
                }
                None => {
                    self.stats.bad_tx_chains += 1;
                    if let Some(hdr) = read_raw_header(mem, head, q) {
                        self.muxer.handle_malformed(&hdr);
                    }
                }
            }
            if let Err(e) = q.add_used(mem, head, 0) {
                fatal = Some(format!("tx used ring: {e}"));
                break;
            }
            used = true;
        }
        if let Some(why) = fatal {
            self.mark_broken(&why);
        }
        if used {
            self.signal(TXQ);
        }
        used
    }

    /// Fill RX buffers with pending packets. Returns whether any buffer was used.
    fn process_rx(&mut self) -> bool {
        let Some(a) = self.active.as_mut() else {
            return false;
        };
        let mem = &a.mem;
        let q = &mut a.queues[RXQ];
        let mut used = false;
        let mut fatal = None;
        while self.muxer.has_rx() {
            let mut chain = match Self::pop(q, mem) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    fatal = Some(format!("rx queue: {e}"));
                    break;
                }
            };
            let head = chain.head_index();
            if head >= q.size() {
                fatal = Some(format!("rx queue: head index {head} out of range"));
                break;
            }
            let ndesc = chain.clone().take(MAX_CHAIN_DESCS + 1).count();
            let pkt = if ndesc > MAX_CHAIN_DESCS {
                None
            } else {
                VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA).ok()
            };
            let len = match pkt {
                None => {
                    self.stats.bad_rx_chains += 1;
                    0
                }
                Some(mut pkt) => match self.muxer.fill_rx(pkt.data_slice(), MAX_PKT_DATA) {
                    None => {
                        // Nothing to send after all: give the buffer back to the ring.
                        q.go_to_previous_position();
                        break;
                    }
                    Some((hdr, n)) => match pkt.set_header_from_raw(&hdr.to_bytes()) {
                        Ok(()) => HDR_SIZE as u32 + n,
                        Err(e) => {
                            tracing::warn!(error = %e, "vsock: cannot write rx header");
                            0
                        }
                    },
                },
            };
            if let Err(e) = q.add_used(mem, head, len) {
                fatal = Some(format!("rx used ring: {e}"));
                break;
            }
            used = true;
        }
        if let Some(why) = fatal {
            self.mark_broken(&why);
        }
        if used {
            self.signal(RXQ);
        }
        used
    }

    /// Deliver a pending TRANSPORT_RESET event.
    fn process_evq(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mem = &a.mem;
        let q = &mut a.queues[EVQ];
        let mut used = false;
        let mut fatal = None;
        while self.evq_pending {
            let mut chain = match Self::pop(q, mem) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    fatal = Some(format!("event queue: {e}"));
                    break;
                }
            };
            let head = chain.head_index();
            if head >= q.size() {
                fatal = Some(format!("event queue: head index {head} out of range"));
                break;
            }
            let mut len = 0;
            if let Some(d) = chain.next() {
                if d.is_write_only()
                    && d.len() >= 4
                    && mem
                        .write_obj(EVENT_TRANSPORT_RESET.to_le(), d.addr())
                        .is_ok()
                {
                    len = 4;
                }
            }
            if len == 4 {
                self.evq_pending = false;
                self.stats.transport_resets += 1;
                let idx = q
                    .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
                    .map_or(0, |i| i.0);
                self.settle = Some((idx, Instant::now() + RESET_SETTLE_MAX));
            } else {
                self.stats.bad_evq_chains += 1;
            }
            if let Err(e) = q.add_used(mem, head, len) {
                fatal = Some(format!("event used ring: {e}"));
                break;
            }
            used = true;
        }
        if let Some(why) = fatal {
            self.mark_broken(&why);
        }
        if used {
            self.signal(EVQ);
        }
    }

    /// Number of connections the device tracks.
    pub fn connection_count(&self) -> usize {
        self.muxer.conn_count()
    }

    /// The host wake EventFd (tests drive the device without an event loop).
    pub fn host_wake_evt(&self) -> &EventFd {
        &self.host.wake
    }
}

/// Read the header of a chain we could not parse, if its head descriptor holds one.
fn read_raw_header(mem: &GuestMem, head: u16, q: &Queue) -> Option<Header> {
    // Re-read the head descriptor from the table (the chain iterator was consumed).
    let table = vm_memory::GuestAddress(q.desc_table());
    let addr = table.0.checked_add(u64::from(head) * 16)?;
    let desc: virtio_queue::desc::split::Descriptor =
        mem.read_obj(vm_memory::GuestAddress(addr)).ok()?;
    if desc.is_write_only() || (desc.len() as usize) < HDR_SIZE || desc.refers_to_indirect_table() {
        return None;
    }
    let mut b = [0u8; HDR_SIZE];
    mem.read_slice(&mut b, desc.addr()).ok()?;
    Some(Header::from_bytes(&b))
}

impl VirtioDevice for VsockDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.cfg.guest_cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| cfg.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(offset, "vsock: ignoring write to read-only config space");
    }

    fn queue_events(&self) -> io::Result<Vec<EventFd>> {
        self.queue_evts.iter().map(|e| e.try_clone()).collect()
    }

    fn interrupt(&self) -> Arc<Interrupt> {
        self.interrupt.clone()
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        queues: Vec<Queue>,
        acked_features: u64,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive { device: "vsock" });
        }
        if queues.len() != 3 {
            return Err(ActivateError::QueueCount {
                device: "vsock",
                expected: 3,
                got: queues.len(),
            });
        }
        self.acked_features = acked_features;
        self.active = Some(Active { mem, queues });
        self.broken = false;
        // Pending host connects and listeners get served on the event-loop thread.
        self.host.wake_device();
        Ok(())
    }

    fn queue_next_indices(&self) -> Option<Vec<u16>> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(|q| q.next_used()).collect())
    }

    fn reset(&mut self) {
        self.muxer.reset_all(CloseReason::DeviceReset);
        self.active = None;
        self.evq_pending = false;
        self.settle = None;
        self.broken = false;
        self.acked_features = 0;
    }
}

impl MutEventSubscriber for VsockDevice {
    fn init(&mut self, ops: &mut EventOps) {
        let fds = [
            self.queue_evts[RXQ].as_raw_fd(),
            self.queue_evts[TXQ].as_raw_fd(),
            self.queue_evts[EVQ].as_raw_fd(),
            self.host.wake.as_raw_fd(),
            self.timer.as_raw_fd(),
        ];
        for (i, fd) in fds.into_iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data_raw(fd, i as u32, EventSet::IN)) {
                tracing::error!(error = ?e, "vsock: cannot register event source {i}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match DeviceEvent::from_data(events.data()) {
            Some(ev) => self.handle_event(ev),
            None => tracing::warn!(data = events.data(), "vsock: unknown event source"),
        }
    }
}

impl Drop for VsockDevice {
    fn drop(&mut self) {
        self.muxer.reset_all(CloseReason::DeviceGone);
        let (connects, listeners) = {
            let mut reg = self.host.registry();
            reg.device_gone = true;
            (
                std::mem::take(&mut reg.connects),
                std::mem::take(&mut reg.listeners),
            )
        };
        for c in connects {
            c.lock().close(CloseReason::DeviceGone);
            c.cond.notify_all();
        }
        for (_, l) in listeners {
            lock(&l.state).closed = true;
            l.cond.notify_all();
        }
    }
}
