//! Test-only guest driver: a split-virtqueue driver and a scripted virtio-vsock guest that
//! talks to the real transport and device through guest memory (tier-1 tests, no KVM).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_queue::desc::split::{Descriptor as SplitDescriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress};

use super::mmio::{regs, MmioTransport};
use super::vsock::device::DeviceEvent;
use super::vsock::packet::{Header, HDR_SIZE, HOST_CID, TYPE_STREAM};
use super::vsock::{VsockConfig, VsockDevice, VsockHost, RXQ, TXQ};
use super::{GuestMem, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK};

pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;

/// Guest memory for tests: 64 MiB at 0.
pub fn test_mem() -> GuestMem {
    GuestMem::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
}

/// Driver side of one split virtqueue. Layout: descriptor table at `base`, avail ring at
/// `base + 0x1000`, used ring at `base + 0x2000` (size <= 256).
#[derive(Debug)]
pub struct GuestQueue {
    pub base: u64,
    pub size: u16,
    free: Vec<u16>,
    avail_idx: u16,
    used_seen: u16,
    chains: HashMap<u16, Vec<u16>>,
}

impl GuestQueue {
    pub fn new(mem: &GuestMem, base: u64, size: u16) -> Self {
        // Zero the rings.
        mem.write_slice(&vec![0u8; 0x3000], GuestAddress(base))
            .unwrap();
        GuestQueue {
            base,
            size,
            free: (0..size).rev().collect(),
            avail_idx: 0,
            used_seen: 0,
            chains: HashMap::new(),
        }
    }
    pub fn desc_addr(&self) -> u64 {
        self.base
    }
    pub fn avail_addr(&self) -> u64 {
        self.base + 0x1000
    }
    pub fn used_addr(&self) -> u64 {
        self.base + 0x2000
    }
    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    /// Write a raw descriptor at `idx` (malformed-chain tests).
    pub fn write_desc(&self, mem: &GuestMem, idx: u16, d: SplitDescriptor) {
        mem.write_obj(
            RawDescriptor::from(d),
            GuestAddress(self.base + u64::from(idx) * 16),
        )
        .unwrap();
    }

    /// Put `head` in the avail ring and bump the avail index.
    pub fn publish(&mut self, mem: &GuestMem, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(self.avail_addr() + 4 + slot * 2))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail_addr() + 2))
            .unwrap();
    }

    /// Force the avail index (corruption tests).
    pub fn set_avail_idx(&mut self, mem: &GuestMem, idx: u16) {
        self.avail_idx = idx;
        mem.write_obj(idx, GuestAddress(self.avail_addr() + 2))
            .unwrap();
    }

    /// Add a chain of (addr, len, device-writable) buffers. Returns the head index.
    pub fn add_chain(&mut self, mem: &GuestMem, bufs: &[(u64, u32, bool)]) -> Option<u16> {
        if self.free.len() < bufs.len() || bufs.is_empty() {
            return None;
        }
        let idxs: Vec<u16> = (0..bufs.len()).map(|_| self.free.pop().unwrap()).collect();
        for (i, &(addr, len, w)) in bufs.iter().enumerate() {
            let mut flags = if w { VRING_DESC_F_WRITE } else { 0 };
            let next = if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT;
                idxs[i + 1]
            } else {
                0
            };
            self.write_desc(mem, idxs[i], SplitDescriptor::new(addr, len, flags, next));
        }
        let head = idxs[0];
        self.chains.insert(head, idxs);
        self.publish(mem, head);
        Some(head)
    }

    /// Reserve a descriptor index without publishing anything (malformed-chain tests).
    pub fn take_index(&mut self) -> u16 {
        self.free.pop().unwrap()
    }

    /// Register a hand-built chain so its indices are freed when used.
    pub fn track(&mut self, head: u16, idxs: Vec<u16>) {
        self.chains.insert(head, idxs);
    }

    /// Write hand-built descriptors `(index, descriptor)` and make the chain that starts at the
    /// first one available (no notify). The caller picks every flag and `next`, so this also
    /// builds malformed chains.
    pub fn publish_descs(&mut self, mem: &GuestMem, descs: &[(u16, SplitDescriptor)]) {
        for &(idx, d) in descs {
            self.write_desc(mem, idx, d);
        }
        let head = descs[0].0;
        self.track(head, descs.iter().map(|&(idx, _)| idx).collect());
        self.publish(mem, head);
    }

    pub fn used_idx(&self, mem: &GuestMem) -> u16 {
        mem.read_obj(GuestAddress(self.used_addr() + 2)).unwrap()
    }

    /// Next used element, freeing its descriptors.
    pub fn pop_used(&mut self, mem: &GuestMem) -> Option<(u16, u32)> {
        if self.used_idx(mem) == self.used_seen {
            return None;
        }
        let slot = u64::from(self.used_seen % self.size);
        let e: VirtqUsedElem = mem
            .read_obj(GuestAddress(self.used_addr() + 4 + slot * 8))
            .unwrap();
        self.used_seen = self.used_seen.wrapping_add(1);
        let id = e.id() as u16;
        if let Some(idxs) = self.chains.remove(&id) {
            self.free.extend(idxs);
        }
        Some((id, e.len()))
    }
}

pub const RXQ_BASE: u64 = 0x1_0000;
pub const TXQ_BASE: u64 = 0x2_0000;
pub const EVQ_BASE: u64 = 0x3_0000;
pub const EV_BUF: u64 = 0x4_0000;
pub const RX_BUF: u64 = 0x10_0000;
pub const TX_BUF: u64 = 0x200_0000;
pub const SLOT: u64 = 0x1_0000;
pub const QSIZE: u16 = 256;

/// A scripted vsock guest on top of the real transport and device. In "direct" mode the test
/// thread runs the device too (`pump`); otherwise an event loop thread does.
pub struct TestGuest {
    pub mem: GuestMem,
    pub dev: Arc<Mutex<VsockDevice>>,
    pub transport: MmioTransport<VsockDevice>,
    pub host: VsockHost,
    pub rx: GuestQueue,
    pub tx: GuestQueue,
    pub ev: GuestQueue,
    pub cid: u64,
    pub rx_data_len: u32,
    pub direct: bool,
    /// Buf alloc the guest advertises.
    pub buf_alloc: u32,
    /// Per guest port: bytes the guest consumed (its fwd_cnt).
    pub fwd_cnt: HashMap<u32, u32>,
    rx_heads: HashMap<u16, u64>,
}

impl TestGuest {
    pub fn new() -> Self {
        Self::with_config(VsockConfig::default())
    }

    pub fn with_config(cfg: VsockConfig) -> Self {
        let mem = test_mem();
        let cid = cfg.guest_cid;
        let dev = VsockDevice::new(cfg).unwrap();
        let host = dev.host();
        let dev = Arc::new(Mutex::new(dev));
        let transport = MmioTransport::new(mem.clone(), dev.clone()).unwrap();
        let rx = GuestQueue::new(&mem, RXQ_BASE, QSIZE);
        let tx = GuestQueue::new(&mem, TXQ_BASE, QSIZE);
        let ev = GuestQueue::new(&mem, EVQ_BASE, 16);
        let mut g = TestGuest {
            mem,
            dev,
            transport,
            host,
            rx,
            tx,
            ev,
            cid,
            rx_data_len: 4096,
            direct: true,
            buf_alloc: 256 * 1024,
            fwd_cnt: HashMap::new(),
            rx_heads: HashMap::new(),
        };
        g.init_transport();
        g
    }

    pub fn w32(&mut self, off: u64, v: u32) {
        self.transport.write(off, &v.to_le_bytes());
    }

    pub fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// The Linux driver's initialisation sequence.
    pub fn init_transport(&mut self) {
        self.w32(regs::STATUS, STATUS_ACKNOWLEDGE);
        self.w32(regs::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.w32(regs::DRIVER_FEATURES_SEL, 1);
        self.w32(regs::DRIVER_FEATURES, 1);
        self.w32(regs::DRIVER_FEATURES_SEL, 0);
        self.w32(regs::DRIVER_FEATURES, 0);
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.w32(regs::STATUS, s);
        assert_eq!(self.r32(regs::STATUS), s);
        let qs = [
            (
                self.rx.desc_addr(),
                self.rx.avail_addr(),
                self.rx.used_addr(),
                self.rx.size,
            ),
            (
                self.tx.desc_addr(),
                self.tx.avail_addr(),
                self.tx.used_addr(),
                self.tx.size,
            ),
            (
                self.ev.desc_addr(),
                self.ev.avail_addr(),
                self.ev.used_addr(),
                self.ev.size,
            ),
        ];
        for (i, (d, a, u, n)) in qs.into_iter().enumerate() {
            self.w32(regs::QUEUE_SEL, i as u32);
            self.w32(regs::QUEUE_NUM, u32::from(n));
            self.w32(regs::QUEUE_DESC_LOW, d as u32);
            self.w32(regs::QUEUE_DESC_HIGH, (d >> 32) as u32);
            self.w32(regs::QUEUE_AVAIL_LOW, a as u32);
            self.w32(regs::QUEUE_AVAIL_HIGH, (a >> 32) as u32);
            self.w32(regs::QUEUE_USED_LOW, u as u32);
            self.w32(regs::QUEUE_USED_HIGH, (u >> 32) as u32);
            self.w32(regs::QUEUE_READY, 1);
        }
        self.w32(regs::STATUS, s | STATUS_DRIVER_OK);
        assert!(self.transport.is_activated());
        for i in 0..4u64 {
            self.ev
                .add_chain(&self.mem, &[(EV_BUF + i * 8, 8, true)])
                .unwrap();
        }
        self.pump();
    }

    /// Run the device for every event source (direct mode only).
    pub fn pump(&mut self) {
        if !self.direct {
            return;
        }
        let mut d = self.dev.lock().unwrap();
        for ev in [
            DeviceEvent::HostWake,
            DeviceEvent::TxQueue,
            DeviceEvent::RxQueue,
            DeviceEvent::EventQueue,
        ] {
            d.handle_event(ev);
        }
    }

    pub fn notify(&mut self, q: usize) {
        self.w32(regs::QUEUE_NOTIFY, q as u32);
        if self.direct {
            let ev = match q {
                RXQ => DeviceEvent::RxQueue,
                TXQ => DeviceEvent::TxQueue,
                _ => DeviceEvent::EventQueue,
            };
            self.dev.lock().unwrap().handle_event(ev);
        }
    }

    /// Post `n` RX buffers (header and data descriptors).
    pub fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            if self.rx.free_count() < 2 {
                break;
            }
            let head = self.rx.take_index();
            let didx = self.rx.take_index();
            let slot = RX_BUF + u64::from(head) * SLOT;
            self.rx.publish_descs(
                &self.mem,
                &[
                    (
                        head,
                        SplitDescriptor::new(
                            slot,
                            HDR_SIZE as u32,
                            VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                            didx,
                        ),
                    ),
                    (
                        didx,
                        SplitDescriptor::new(slot + 0x100, self.rx_data_len, VRING_DESC_F_WRITE, 0),
                    ),
                ],
            );
            self.rx_heads.insert(head, slot);
        }
        self.notify(RXQ);
    }

    /// Receive one packet from the RX used ring (reposting the buffer).
    pub fn recv(&mut self) -> Option<(Header, Vec<u8>)> {
        let (id, len) = self.rx.pop_used(&self.mem)?;
        let slot = self.rx_heads.remove(&id).expect("unknown rx head");
        let mut hb = [0u8; HDR_SIZE];
        self.mem.read_slice(&mut hb, GuestAddress(slot)).unwrap();
        let hdr = Header::from_bytes(&hb);
        assert!(
            len as usize >= HDR_SIZE,
            "used len {len} shorter than a header"
        );
        assert_eq!(
            len as usize,
            HDR_SIZE + hdr.len as usize,
            "used len vs header len"
        );
        let mut data = vec![0u8; hdr.len as usize];
        self.mem
            .read_slice(&mut data, GuestAddress(slot + 0x100))
            .unwrap();
        Some((hdr, data))
    }

    /// Receive everything currently in the RX used ring, reposting as many buffers.
    pub fn recv_all(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(p) = self.recv() {
            out.push(p);
        }
        if !out.is_empty() {
            self.post_rx(out.len());
        }
        out
    }

    /// Wait (threaded mode) or pump (direct mode) until a packet arrives.
    pub fn recv_wait(&mut self, timeout: Duration) -> Option<(Header, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        loop {
            self.pump();
            if let Some(p) = self.recv() {
                self.post_rx(1);
                return Some(p);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// A header from the guest to the host.
    pub fn hdr(&self, op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: self.buf_alloc,
            fwd_cnt: *self.fwd_cnt.get(&src_port).unwrap_or(&0),
        }
    }

    /// Put a packet on the TX queue (header and data in separate descriptors) and notify.
    pub fn send_hdr(&mut self, mut hdr: Header, data: &[u8]) {
        self.reclaim_tx();
        hdr.len = data.len() as u32;
        let idx = self.tx.take_index();
        let slot = TX_BUF + u64::from(idx) * SLOT;
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(slot))
            .unwrap();
        if data.is_empty() {
            self.tx.publish_descs(
                &self.mem,
                &[(idx, SplitDescriptor::new(slot, HDR_SIZE as u32, 0, 0))],
            );
        } else {
            let didx = self.tx.take_index();
            self.mem
                .write_slice(data, GuestAddress(slot + 0x100))
                .unwrap();
            self.tx.publish_descs(
                &self.mem,
                &[
                    (
                        idx,
                        SplitDescriptor::new(slot, HDR_SIZE as u32, VRING_DESC_F_NEXT, didx),
                    ),
                    (
                        didx,
                        SplitDescriptor::new(slot + 0x100, data.len() as u32, 0, 0),
                    ),
                ],
            );
        }
        self.notify(TXQ);
    }

    /// Send a packet built from `op`, ports and data.
    pub fn send(&mut self, op: u16, src_port: u32, dst_port: u32, data: &[u8]) {
        let h = self.hdr(op, src_port, dst_port);
        self.send_hdr(h, data);
    }

    /// Free TX descriptors the device is done with. Returns the used lengths.
    pub fn reclaim_tx(&mut self) -> Vec<(u16, u32)> {
        let mut v = Vec::new();
        while let Some(u) = self.tx.pop_used(&self.mem) {
            v.push(u);
        }
        v
    }

    /// Mark `n` bytes consumed by the guest app on guest port `port`.
    pub fn consume(&mut self, port: u32, n: u32) {
        let e = self.fwd_cnt.entry(port).or_insert(0);
        *e = e.wrapping_add(n);
    }

    /// Event ids delivered on the event queue; like Linux, each consumed buffer is posted
    /// again and the queue kicked (which tells the device the guest handled the events).
    pub fn events(&mut self) -> Vec<u32> {
        let v = self.events_no_refill();
        for _ in 0..v.len() {
            self.ev.add_chain(&self.mem, &[(EV_BUF, 8, true)]).unwrap();
        }
        if !v.is_empty() {
            self.notify(super::vsock::EVQ);
        }
        v
    }

    /// Event ids delivered on the event queue, without reposting buffers.
    pub fn events_no_refill(&mut self) -> Vec<u32> {
        let mut v = Vec::new();
        while let Some((id, len)) = self.ev.pop_used(&self.mem) {
            assert_eq!(len, 4);
            let d: RawDescriptor = self
                .mem
                .read_obj(GuestAddress(self.ev.base + u64::from(id) * 16))
                .unwrap();
            let addr = SplitDescriptor::from(d).addr();
            v.push(self.mem.read_obj::<u32>(addr).unwrap());
        }
        v
    }
}
