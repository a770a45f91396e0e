//! Tier-1 tests of the virtio-blk device through the real MMIO transport and guest memory,
//! with a scripted guest driver over a split virtqueue (`virtio::testutil`) and temporary
//! backing files.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::mmio::{regs, MmioTransport};
use crate::virtio::testutil::*;
use crate::virtio::{
    GuestMem, STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
};

const QBASE: u64 = 0x1_0000;
const HDR_BASE: u64 = 0x10_0000;
const STATUS_BASE: u64 = 0x18_0000;
const DATA: u64 = 0x100_0000;
/// Backing file size in the tests: 1 MiB (2048 sectors).
const DISK_BYTES: usize = 1 << 20;

/// Deterministic file content: byte i is a function of i.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

fn disk_file(seed: u8) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&pattern(DISK_BYTES, seed)).unwrap();
    f.flush().unwrap();
    f
}

/// A guest driving one block device through its transport.
struct BlkGuest {
    mem: GuestMem,
    dev: Arc<Mutex<BlockDevice>>,
    transport: MmioTransport<BlockDevice>,
    q: GuestQueue,
    slot: u64,
    cfg: DiskConfig,
}

impl BlkGuest {
    fn new(cfg: DiskConfig) -> Self {
        Self::with_mem(test_mem(), 0, cfg, QBASE)
    }

    fn with_mem(mem: GuestMem, index: usize, cfg: DiskConfig, qbase: u64) -> Self {
        let dev = Arc::new(Mutex::new(BlockDevice::open(index, &cfg).unwrap()));
        let transport = MmioTransport::new(mem.clone(), dev.clone()).unwrap();
        let q = GuestQueue::new(&mem, qbase, 256);
        let mut g = BlkGuest {
            mem,
            dev,
            transport,
            q,
            slot: 0,
            cfg,
        };
        g.init();
        g
    }

    fn w32(&mut self, off: u64, v: u32) {
        self.transport.write(off, &v.to_le_bytes());
    }

    fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn device_features(&mut self) -> u64 {
        self.w32(regs::DEVICE_FEATURES_SEL, 0);
        let lo = self.r32(regs::DEVICE_FEATURES);
        self.w32(regs::DEVICE_FEATURES_SEL, 1);
        let hi = self.r32(regs::DEVICE_FEATURES);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// The Linux driver's initialisation: accept every offered feature, one queue.
    fn init(&mut self) {
        self.w32(regs::STATUS, STATUS_ACKNOWLEDGE);
        self.w32(regs::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        let f = self.device_features();
        self.w32(regs::DRIVER_FEATURES_SEL, 0);
        self.w32(regs::DRIVER_FEATURES, f as u32);
        self.w32(regs::DRIVER_FEATURES_SEL, 1);
        self.w32(regs::DRIVER_FEATURES, (f >> 32) as u32);
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.w32(regs::STATUS, s);
        assert_eq!(self.r32(regs::STATUS), s);
        let (d, a, u, n) = (
            self.q.desc_addr(),
            self.q.avail_addr(),
            self.q.used_addr(),
            self.q.size,
        );
        self.w32(regs::QUEUE_SEL, 0);
        self.w32(regs::QUEUE_NUM, u32::from(n));
        self.w32(regs::QUEUE_DESC_LOW, d as u32);
        self.w32(regs::QUEUE_DESC_HIGH, 0);
        self.w32(regs::QUEUE_AVAIL_LOW, a as u32);
        self.w32(regs::QUEUE_AVAIL_HIGH, 0);
        self.w32(regs::QUEUE_USED_LOW, u as u32);
        self.w32(regs::QUEUE_USED_HIGH, 0);
        self.w32(regs::QUEUE_READY, 1);
        self.w32(regs::STATUS, s | STATUS_DRIVER_OK);
        assert!(self.transport.is_activated());
        // The activation kick.
        assert_eq!(self.dev.lock().unwrap().queue_evt().read().unwrap(), 1);
    }

    /// QueueNotify through the transport, then let the device run (as the I/O thread would).
    fn kick(&mut self) {
        self.w32(regs::QUEUE_NOTIFY, 0);
        let mut d = self.dev.lock().unwrap();
        assert_eq!(
            d.queue_evt().read().unwrap(),
            1,
            "notify reached the eventfd"
        );
        d.process_queue();
    }

    /// Writes a request header in a fresh slot; returns (header addr, status addr).
    fn header(&mut self, type_: u32, sector: u64) -> (u64, u64) {
        let slot = self.slot;
        self.slot = (self.slot + 1) % 256;
        let hdr = HDR_BASE + slot * 32;
        let st = STATUS_BASE + slot * 16;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&type_.to_le_bytes());
        h[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        self.mem.write_obj(0xaau8, GuestAddress(st)).unwrap();
        (hdr, st)
    }

    /// Sends a well-framed request (header, `data`, status) and returns (status, used len).
    fn req(&mut self, type_: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u8, u32) {
        let (hdr, st) = self.header(type_, sector);
        let mut bufs = vec![(hdr, 16, false)];
        bufs.extend_from_slice(data);
        bufs.push((st, 1, true));
        let head = self.q.add_chain(&self.mem, &bufs).unwrap();
        self.kick();
        let (id, len) = self.q.pop_used(&self.mem).expect("request not completed");
        assert_eq!(id, head);
        (self.mem.read_obj::<u8>(GuestAddress(st)).unwrap(), len)
    }

    /// Publishes hand-built descriptors, kicks, and returns the used length.
    fn raw(&mut self, descs: &[(u16, SplitDescriptor)]) -> u32 {
        self.q.publish_descs(&self.mem, descs);
        self.kick();
        let (id, len) = self.q.pop_used(&self.mem).expect("chain not returned");
        assert_eq!(id, descs[0].0);
        len
    }

    fn read(&mut self, sector: u64, len: u32) -> (u8, Vec<u8>) {
        self.mem
            .write_slice(&vec![0x55; len as usize], GuestAddress(DATA))
            .unwrap();
        let (st, used) = self.req(VIRTIO_BLK_T_IN, sector, &[(DATA, len, true)]);
        if st == VIRTIO_BLK_S_OK {
            assert_eq!(used, len + 1);
        }
        let mut out = vec![0u8; len as usize];
        self.mem.read_slice(&mut out, GuestAddress(DATA)).unwrap();
        (st, out)
    }

    fn write(&mut self, sector: u64, data: &[u8]) -> u8 {
        self.mem.write_slice(data, GuestAddress(DATA)).unwrap();
        let (st, used) = self.req(
            VIRTIO_BLK_T_OUT,
            sector,
            &[(DATA, data.len() as u32, false)],
        );
        assert_eq!(used, 1);
        st
    }

    fn file_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.cfg.path).unwrap()
    }

    fn stats(&self) -> BlockStats {
        self.dev.lock().unwrap().stats()
    }

    fn status_reg(&mut self) -> u32 {
        self.r32(regs::STATUS)
    }
}

fn rw_guest() -> (tempfile::NamedTempFile, BlkGuest) {
    let f = disk_file(0);
    let g = BlkGuest::new(DiskConfig::new(f.path(), false));
    (f, g)
}

fn ro_guest() -> (tempfile::NamedTempFile, BlkGuest) {
    let f = disk_file(0);
    let g = BlkGuest::new(DiskConfig::new(f.path(), true));
    (f, g)
}

#[test]
fn features_and_config_space() {
    let (_f, mut g) = rw_guest();
    let f = g.device_features();
    assert_eq!(
        f,
        crate::virtio::VIRTIO_F_VERSION_1
            | VIRTIO_BLK_F_SIZE_MAX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_FLUSH
    );
    assert_eq!(g.r32(regs::DEVICE_ID), VIRTIO_ID_BLOCK);
    let mut cap = [0u8; 8];
    g.transport.read(regs::CONFIG, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), (DISK_BYTES / 512) as u64);
    assert_eq!(g.r32(regs::CONFIG + 8), SIZE_MAX);
    assert_eq!(g.r32(regs::CONFIG + 12), SEG_MAX);
    assert_eq!(g.r32(regs::CONFIG + 20), 512, "blk_size");
    assert_eq!(g.r32(regs::CONFIG + 0x100), 0, "past the config space");
    // Config writes are ignored.
    g.transport.write(regs::CONFIG, &[0xff; 8]);
    g.transport.read(regs::CONFIG, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), (DISK_BYTES / 512) as u64);

    let (_f, mut ro) = ro_guest();
    assert_ne!(ro.device_features() & VIRTIO_BLK_F_RO, 0);
}

#[test]
fn capacity_rounds_down_to_whole_sectors() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&[1u8; 1000]).unwrap();
    let d = BlockDevice::open(0, &DiskConfig::new(f.path(), true)).unwrap();
    assert_eq!(d.capacity(), 1);
}

#[test]
fn read_returns_the_file_bytes() {
    let (f, mut g) = rw_guest();
    let want = pattern(DISK_BYTES, 0);
    let (st, got) = g.read(3, 8 * 512);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(got, want[3 * 512..11 * 512]);
    // The last sector.
    let (st, got) = g.read(2047, 512);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(got, want[DISK_BYTES - 512..]);
    // Multi-descriptor read scattered across guest memory, including an empty descriptor.
    let parts = [
        (DATA, 512u32),
        (DATA + 0x10_000, 0),
        (DATA + 0x20_000, 3 * 512),
    ];
    let data: Vec<_> = parts.iter().map(|&(a, l)| (a, l, true)).collect();
    let (st, used) = g.req(VIRTIO_BLK_T_IN, 100, &data);
    assert_eq!((st, used), (VIRTIO_BLK_S_OK, 4 * 512 + 1));
    let mut a = vec![0u8; 512];
    let mut b = vec![0u8; 3 * 512];
    g.mem.read_slice(&mut a, GuestAddress(DATA)).unwrap();
    g.mem
        .read_slice(&mut b, GuestAddress(DATA + 0x20_000))
        .unwrap();
    assert_eq!(a, want[100 * 512..101 * 512]);
    assert_eq!(b, want[101 * 512..104 * 512]);
    let s = g.stats();
    assert_eq!((s.reads, s.read_bytes, s.io_errors), (3, 13 * 512, 0));
    drop(f);
}

#[test]
fn a_large_read_uses_every_segment() {
    // SEG_MAX descriptors of 64 KiB: the largest request a driver may send.
    let mut f = tempfile::NamedTempFile::new().unwrap();
    let want = pattern(MAX_REQUEST_BYTES as usize, 9);
    f.write_all(&want).unwrap();
    let mut g = BlkGuest::new(DiskConfig::new(f.path(), true));
    let data: Vec<_> = (0..u64::from(SEG_MAX))
        .map(|i| (DATA + i * u64::from(SIZE_MAX), SIZE_MAX, true))
        .collect();
    let (st, used) = g.req(VIRTIO_BLK_T_IN, 0, &data);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(u64::from(used), MAX_REQUEST_BYTES + 1);
    let mut got = vec![0u8; want.len()];
    g.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got == want, "bytes differ");
}

#[test]
fn write_reaches_the_file_and_reads_back() {
    let (_f, mut g) = rw_guest();
    let data = pattern(4096, 77);
    assert_eq!(g.write(10, &data), VIRTIO_BLK_S_OK);
    let file = g.file_bytes();
    assert_eq!(file[10 * 512..10 * 512 + 4096], data[..]);
    assert_eq!(file[..10 * 512], pattern(DISK_BYTES, 0)[..10 * 512]);
    assert_eq!(file.len(), DISK_BYTES, "no growth");
    let (st, back) = g.read(10, 4096);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(back, data);
    // Two readable data descriptors.
    g.mem
        .write_slice(&[1u8; 512], GuestAddress(DATA + 0x8000))
        .unwrap();
    g.mem
        .write_slice(&[2u8; 1024], GuestAddress(DATA + 0x9000))
        .unwrap();
    let (st, used) = g.req(
        VIRTIO_BLK_T_OUT,
        0,
        &[(DATA + 0x8000, 512, false), (DATA + 0x9000, 1024, false)],
    );
    assert_eq!((st, used), (VIRTIO_BLK_S_OK, 1));
    let file = g.file_bytes();
    assert!(file[..512].iter().all(|&b| b == 1));
    assert!(file[512..1536].iter().all(|&b| b == 2));
    assert_eq!(g.stats().writes, 2);
    assert_eq!(g.stats().written_bytes, 4096 + 1536);
}

#[test]
fn flush_and_get_id() {
    let (_f, mut g) = rw_guest();
    assert_eq!(g.req(VIRTIO_BLK_T_FLUSH, 0, &[]), (VIRTIO_BLK_S_OK, 1));
    assert_eq!(g.stats().flushes, 1);
    g.mem.write_slice(&[0xee; 32], GuestAddress(DATA)).unwrap();
    let (st, used) = g.req(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, true)]);
    assert_eq!((st, used), (VIRTIO_BLK_S_OK, 21));
    let mut id = [0u8; 21];
    g.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..10], b"kiln-disk0");
    assert!(id[10..20].iter().all(|&b| b == 0), "NUL padded: {id:?}");
    assert_eq!(id[20], 0xee, "nothing past 20 bytes");

    let f = disk_file(1);
    let mut cfg = DiskConfig::new(f.path(), true);
    cfg.id = Some("serial-0123456789abc".into());
    let mut g = BlkGuest::new(cfg);
    // A short buffer gets a prefix.
    let (st, used) = g.req(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 6, true)]);
    assert_eq!((st, used), (VIRTIO_BLK_S_OK, 7));
    let mut id = [0u8; 6];
    g.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"serial");
    // FLUSH on a read-only disk succeeds (nothing to flush).
    assert_eq!(g.req(VIRTIO_BLK_T_FLUSH, 0, &[]).0, VIRTIO_BLK_S_OK);
    // GET_ID without a buffer, or into a device-readable one, fails.
    assert_eq!(g.req(VIRTIO_BLK_T_GET_ID, 0, &[]).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(
        g.req(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, false)]).0,
        VIRTIO_BLK_S_IOERR
    );
}

#[test]
fn bad_ids_are_refused() {
    for id in ["x".repeat(21), "tab\there".into(), "é".into()] {
        let mut c = DiskConfig::new("/nonexistent", true);
        c.id = Some(id.clone());
        assert!(c.validate().is_err(), "{id:?}");
        assert!(matches!(
            BlockDevice::open(0, &c),
            Err(BlockError::Config(_))
        ));
    }
}

#[test]
fn read_only_disk_refuses_writes_and_opens_the_file_read_only() {
    let (_f, mut g) = ro_guest();
    assert!(g.dev.lock().unwrap().backing_opened_read_only());
    assert_eq!(g.write(0, &[9u8; 512]), VIRTIO_BLK_S_IOERR);
    assert_eq!(g.file_bytes(), pattern(DISK_BYTES, 0));
    let s = g.stats();
    assert_eq!((s.read_only_refused, s.io_errors, s.writes), (1, 1, 0));
    // Reads still work.
    assert_eq!(g.read(0, 512).0, VIRTIO_BLK_S_OK);

    let (_f, g) = rw_guest();
    assert!(!g.dev.lock().unwrap().backing_opened_read_only());
}

#[test]
fn open_errors_name_the_file() {
    let e = BlockDevice::open(0, &DiskConfig::new("/nonexistent/disk.img", false)).unwrap_err();
    assert!(
        matches!(
            e,
            BlockError::Open {
                mode: "read-write",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("/nonexistent/disk.img"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let e = BlockDevice::open(0, &DiskConfig::new(dir.path(), true)).unwrap_err();
    assert!(matches!(e, BlockError::NotAFile { .. }), "{e}");
}

#[test]
fn out_of_range_sectors_fail() {
    let (_f, mut g) = rw_guest();
    let cap = (DISK_BYTES / 512) as u64;
    assert_eq!(g.read(cap, 512).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(g.read(cap - 1, 1024).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(g.write(cap, &[0u8; 512]), VIRTIO_BLK_S_IOERR);
    assert_eq!(g.read(cap - 1, 512).0, VIRTIO_BLK_S_OK);
    assert_eq!(
        g.file_bytes().len(),
        DISK_BYTES,
        "a refused write must not grow the file"
    );
    assert_eq!(g.stats().out_of_range, 3);
}

#[test]
fn sector_overflow_fails() {
    let (_f, mut g) = rw_guest();
    for sector in [u64::MAX, u64::MAX / 512, u64::MAX / 512 + 1, 1 << 55] {
        assert_eq!(g.read(sector, 512).0, VIRTIO_BLK_S_IOERR, "sector {sector}");
        assert_eq!(g.write(sector, &[0u8; 512]), VIRTIO_BLK_S_IOERR);
    }
    // offset fits but offset + len overflows.
    let (st, _) = g.read(u64::MAX / 512, 512);
    assert_eq!(st, VIRTIO_BLK_S_IOERR);
    assert_eq!(g.stats().out_of_range, 9);
    assert_eq!(g.file_bytes().len(), DISK_BYTES);
}

#[test]
fn oversize_and_unaligned_lengths_fail() {
    let (_f, mut g) = rw_guest();
    // Three 4 MiB descriptors: 12 MiB > MAX_REQUEST_BYTES (never touched: refused first).
    let big: Vec<_> = (0..3u64)
        .map(|i| (DATA + i * (4 << 20), 4 << 20, true))
        .collect();
    assert_eq!(g.req(VIRTIO_BLK_T_IN, 0, &big).0, VIRTIO_BLK_S_IOERR);
    // Lengths whose sum wraps u32: the queue ends the chain there, so the last descriptor
    // seen is the 4 GiB one, which cannot be a status byte: returned unused.
    let wrap = [(DATA, u32::MAX, true), (DATA, 512 + 1, true)];
    assert_eq!(g.req(VIRTIO_BLK_T_IN, 0, &wrap), (0xaa, 0));
    // Not a multiple of 512.
    assert_eq!(g.read(0, 100).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(g.write(0, &[0u8; 513]), VIRTIO_BLK_S_IOERR);
    assert_eq!(g.file_bytes(), pattern(DISK_BYTES, 0));
    assert_eq!(g.stats().reads, 0);
}

#[test]
fn wrong_direction_and_memory_outside_the_guest_fail() {
    let (_f, mut g) = rw_guest();
    // IN with a device-readable data buffer; OUT with a device-writable one.
    assert_eq!(
        g.req(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, false)]).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        g.req(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, true)]).0,
        VIRTIO_BLK_S_IOERR
    );
    // Data past the end of guest memory (64 MiB), and straddling it.
    assert_eq!(
        g.req(VIRTIO_BLK_T_IN, 0, &[(1 << 40, 512, true)]).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        g.req(VIRTIO_BLK_T_IN, 0, &[((64 << 20) - 256, 512, true)])
            .0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        g.req(VIRTIO_BLK_T_OUT, 0, &[((64 << 20) - 256, 512, false)])
            .0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(g.file_bytes(), pattern(DISK_BYTES, 0));
    // Unknown request types.
    for t in [2u32, 11, 13, 0xffff_ffff] {
        assert_eq!(g.req(t, 0, &[]), (VIRTIO_BLK_S_UNSUPP, 1), "type {t}");
    }
    assert_eq!(g.stats().unsupported, 4);
}

#[test]
fn write_only_or_short_header_fails_the_request() {
    let (_f, mut g) = rw_guest();
    let (hdr, st) = g.header(VIRTIO_BLK_T_IN, 0);
    let head =
        g.q.add_chain(&g.mem, &[(hdr, 16, true), (DATA, 512, true), (st, 1, true)])
            .unwrap();
    g.kick();
    assert_eq!(g.q.pop_used(&g.mem), Some((head, 1)));
    assert_eq!(
        g.mem.read_obj::<u8>(GuestAddress(st)).unwrap(),
        VIRTIO_BLK_S_IOERR
    );
    let (hdr, st) = g.header(VIRTIO_BLK_T_IN, 0);
    g.q.add_chain(&g.mem, &[(hdr, 8, false), (DATA, 512, true), (st, 1, true)])
        .unwrap();
    g.kick();
    assert_eq!(g.q.pop_used(&g.mem).map(|u| u.1), Some(1));
    assert_eq!(
        g.mem.read_obj::<u8>(GuestAddress(st)).unwrap(),
        VIRTIO_BLK_S_IOERR
    );
    // Header outside guest memory.
    let (_, st) = g.header(VIRTIO_BLK_T_IN, 0);
    g.q.add_chain(&g.mem, &[(1 << 40, 16, false), (st, 1, true)])
        .unwrap();
    g.kick();
    assert_eq!(g.q.pop_used(&g.mem).map(|u| u.1), Some(1));
    assert_eq!(
        g.mem.read_obj::<u8>(GuestAddress(st)).unwrap(),
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(g.stats().io_errors, 3);
    assert_eq!(g.read(0, 512).0, VIRTIO_BLK_S_OK, "device still works");
}

#[test]
fn missing_status_descriptor_returns_the_chain_unused() {
    let (_f, mut g) = rw_guest();
    // Header and a readable data descriptor, nothing writable at the end.
    let (hdr, _) = g.header(VIRTIO_BLK_T_OUT, 0);
    g.mem.write_slice(&[7u8; 512], GuestAddress(DATA)).unwrap();
    g.q.add_chain(&g.mem, &[(hdr, 16, false), (DATA, 512, false)])
        .unwrap();
    g.kick();
    assert_eq!(g.q.pop_used(&g.mem).map(|u| u.1), Some(0));
    // A lone header.
    let (hdr, _) = g.header(VIRTIO_BLK_T_FLUSH, 0);
    g.q.add_chain(&g.mem, &[(hdr, 16, false)]).unwrap();
    g.kick();
    assert_eq!(g.q.pop_used(&g.mem).map(|u| u.1), Some(0));
    // A zero-length status descriptor.
    let (hdr, st) = g.header(VIRTIO_BLK_T_FLUSH, 0);
    g.q.add_chain(&g.mem, &[(hdr, 16, false), (st, 0, true)])
        .unwrap();
    g.kick();
    assert_eq!(g.q.pop_used(&g.mem).map(|u| u.1), Some(0));
    assert_eq!(g.mem.read_obj::<u8>(GuestAddress(st)).unwrap(), 0xaa);
    // A status byte outside guest memory.
    let (hdr, _) = g.header(VIRTIO_BLK_T_FLUSH, 0);
    g.q.add_chain(&g.mem, &[(hdr, 16, false), (1 << 40, 1, true)])
        .unwrap();
    g.kick();
    assert_eq!(g.q.pop_used(&g.mem).map(|u| u.1), Some(0));
    assert_eq!(g.stats().bad_chains, 4);
    assert_eq!(g.stats().writes, 0, "nothing was executed");
    assert_eq!(g.file_bytes(), pattern(DISK_BYTES, 0));
    assert_eq!(g.status_reg() & STATUS_DEVICE_NEEDS_RESET, 0);
    assert_eq!(g.read(0, 512).0, VIRTIO_BLK_S_OK);
}

#[test]
fn too_many_descriptors_return_the_chain_unused() {
    let (_f, mut g) = rw_guest();
    let (hdr, st) = g.header(VIRTIO_BLK_T_IN, 0);
    let mut bufs = vec![(hdr, 16, false)];
    bufs.extend((0..u64::from(SEG_MAX) + 1).map(|i| (DATA + i * 512, 512, true)));
    bufs.push((st, 1, true));
    assert_eq!(bufs.len(), MAX_CHAIN_DESCS + 1);
    g.q.add_chain(&g.mem, &bufs).unwrap();
    g.kick();
    assert_eq!(g.q.pop_used(&g.mem).map(|u| u.1), Some(0));
    assert_eq!(
        g.mem.read_obj::<u8>(GuestAddress(st)).unwrap(),
        0xaa,
        "status untouched"
    );
    assert_eq!(g.stats().bad_chains, 1);
    assert_eq!(g.stats().reads, 0);
    // Exactly the maximum is fine.
    let data: Vec<_> = (0..u64::from(SEG_MAX))
        .map(|i| (DATA + i * 512, 512, true))
        .collect();
    assert_eq!(g.req(VIRTIO_BLK_T_IN, 0, &data).0, VIRTIO_BLK_S_OK);
}

#[test]
fn looping_chains_are_returned_unused() {
    let (_f, mut g) = rw_guest();
    let (hdr, st) = g.header(VIRTIO_BLK_T_IN, 0);
    // head -> data -> head -> ...: cut at the queue size (256 > MAX_CHAIN_DESCS).
    let a = g.q.take_index();
    let b = g.q.take_index();
    let nf = VRING_DESC_F_NEXT;
    let len = g.raw(&[
        (a, SplitDescriptor::new(hdr, 16, nf, b)),
        (
            b,
            SplitDescriptor::new(DATA, 512, nf | VRING_DESC_F_WRITE, a),
        ),
    ]);
    assert_eq!(len, 0);
    // A descriptor pointing to itself.
    let c = g.q.take_index();
    let len = g.raw(&[(c, SplitDescriptor::new(st, 1, nf | VRING_DESC_F_WRITE, c))]);
    assert_eq!(len, 0);
    // An indirect table that loops onto itself (200 entries, each -> 0).
    let table = DATA + 0x10_0000;
    for i in 0..200u64 {
        let d = SplitDescriptor::new(st, 1, nf | VRING_DESC_F_WRITE, 0);
        g.mem
            .write_obj(
                virtio_queue::desc::RawDescriptor::from(d),
                GuestAddress(table + i * 16),
            )
            .unwrap();
    }
    let d = g.q.take_index();
    let len = g.raw(&[(d, SplitDescriptor::new(table, 200 * 16, 4, 0))]);
    assert_eq!(len, 0);
    assert_eq!(g.stats().bad_chains, 3);
    assert_eq!(g.stats().reads, 0);
    assert_eq!(g.status_reg() & STATUS_DEVICE_NEEDS_RESET, 0);
    assert_eq!(g.read(1, 512).0, VIRTIO_BLK_S_OK, "device still works");
}

#[test]
fn corrupt_rings_need_reset_and_reset_recovers() {
    let (_f, mut g) = rw_guest();
    assert_eq!(g.read(0, 512).0, VIRTIO_BLK_S_OK);
    // Avail index far ahead of the used index.
    let idx = g.q.used_idx(&g.mem);
    g.q.set_avail_idx(&g.mem, idx.wrapping_add(1000));
    g.kick();
    assert_ne!(g.status_reg() & STATUS_DEVICE_NEEDS_RESET, 0);
    assert_eq!(g.stats().needs_reset, 1);
    // Stopped until reset: further kicks do nothing.
    g.kick();
    assert_eq!(g.stats().needs_reset, 1);
    // Reset (status 0), re-initialise on fresh rings: works again.
    g.w32(regs::STATUS, 0);
    assert_eq!(g.status_reg(), 0);
    assert!(!g.dev.lock().unwrap().is_active());
    g.q = GuestQueue::new(&g.mem, QBASE, 256);
    g.init();
    assert_eq!(g.read(5, 512).0, VIRTIO_BLK_S_OK);

    // A head index beyond the queue.
    g.q.publish(&g.mem, 300);
    g.kick();
    assert_ne!(g.status_reg() & STATUS_DEVICE_NEEDS_RESET, 0);
    assert_eq!(g.stats().needs_reset, 2);
}

#[test]
fn device_reset_drops_the_queue_and_reinit_works() {
    let (_f, mut g) = rw_guest();
    assert_eq!(g.read(0, 512).0, VIRTIO_BLK_S_OK);
    g.w32(regs::STATUS, 0);
    assert!(!g.transport.is_activated());
    assert!(!g.dev.lock().unwrap().is_active());
    // A notify while reset does nothing.
    g.dev.lock().unwrap().process_queue();
    g.q = GuestQueue::new(&g.mem, QBASE, 256);
    g.init();
    let (st, got) = g.read(7, 1024);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(got, pattern(DISK_BYTES, 0)[7 * 512..9 * 512]);
    assert_eq!(g.q.used_idx(&g.mem), 1, "fresh ring");
}

#[test]
fn yields_after_a_bounded_number_of_requests() {
    let (_f, mut g) = rw_guest();
    // 128 two-descriptor flushes: under the per-wake-up budget, no re-arm.
    for _ in 0..128 {
        let (hdr, st) = g.header(VIRTIO_BLK_T_FLUSH, 0);
        g.q.add_chain(&g.mem, &[(hdr, 16, false), (st, 1, true)])
            .unwrap();
    }
    g.kick();
    let mut n = 0;
    while g.q.pop_used(&g.mem).is_some() {
        n += 1;
    }
    assert_eq!(n, 128);
    assert!(
        g.dev.lock().unwrap().queue_evt().read().is_err(),
        "no re-arm"
    );
    // 256 one-descriptor chains (each refused): the budget is reached, the device re-arms
    // its eventfd to come back after the other disks.
    for _ in 0..256 {
        let (hdr, _) = g.header(VIRTIO_BLK_T_FLUSH, 0);
        g.q.add_chain(&g.mem, &[(hdr, 16, false)]).unwrap();
    }
    g.kick();
    let mut n = 0;
    while g.q.pop_used(&g.mem).is_some() {
        n += 1;
    }
    assert_eq!(n, 256);
    assert_eq!(
        g.dev.lock().unwrap().queue_evt().read().unwrap(),
        1,
        "re-armed"
    );
    assert_eq!(g.stats().bad_chains, 256);
}

#[test]
fn several_disks_are_independent() {
    let mem = test_mem();
    let fa = disk_file(1);
    let fb = disk_file(2);
    let mut a = BlkGuest::with_mem(mem.clone(), 0, DiskConfig::new(fa.path(), false), QBASE);
    let mut b = BlkGuest::with_mem(mem, 1, DiskConfig::new(fb.path(), true), 0x5_0000);
    b.slot = 128; // separate header/status slots in the shared memory
    let (sa, da) = a.read(0, 1024);
    assert_eq!(sa, VIRTIO_BLK_S_OK);
    assert_eq!(da, pattern(DISK_BYTES, 1)[..1024]);
    let (sb, db) = b.read(0, 1024);
    assert_eq!(sb, VIRTIO_BLK_S_OK);
    assert_eq!(db, pattern(DISK_BYTES, 2)[..1024]);
    assert_eq!(a.write(0, &[3u8; 512]), VIRTIO_BLK_S_OK);
    assert_eq!(b.write(0, &[3u8; 512]), VIRTIO_BLK_S_IOERR);
    assert_eq!(std::fs::read(fb.path()).unwrap(), pattern(DISK_BYTES, 2));
    assert!(std::fs::read(fa.path()).unwrap()[..512]
        .iter()
        .all(|&x| x == 3));
    let id = |g: &mut BlkGuest| {
        g.req(VIRTIO_BLK_T_GET_ID, 0, &[(DATA + 0x1000, 20, true)]);
        let mut id = [0u8; 10];
        g.mem
            .read_slice(&mut id, GuestAddress(DATA + 0x1000))
            .unwrap();
        id
    };
    assert_eq!(&id(&mut a), b"kiln-disk0");
    assert_eq!(&id(&mut b), b"kiln-disk1");
    assert_eq!(a.stats().writes, 1);
    assert_eq!(b.stats().read_only_refused, 1);
}

#[test]
fn transport_state_round_trips_and_the_queue_continues() {
    let (f, mut g) = rw_guest();
    for s in 0..5 {
        assert_eq!(g.read(s, 512).0, VIRTIO_BLK_S_OK);
    }
    // A request made available (and kicked) but not yet handled when the snapshot is taken.
    let (hdr, st) = g.header(VIRTIO_BLK_T_IN, 20);
    let pending =
        g.q.add_chain(
            &g.mem,
            &[(hdr, 16, false), (DATA, 512, true), (st, 1, true)],
        )
        .unwrap();
    let saved = g.transport.save_state();
    assert_eq!(saved.queues[0].next_index, 5);
    let (capacity, backing) = {
        let d = g.dev.lock().unwrap();
        (d.capacity(), d.identity().unwrap())
    };
    let snap = BlockSnapshot {
        path: f.path().to_owned(),
        read_only: false,
        id: None,
        capacity,
        backing,
        mmio_base: crate::memory::MMIO_START,
        gsi: 5,
        transport: saved,
    };
    snap.validate().unwrap();
    let bytes = postcard::to_stdvec(&snap).unwrap();
    let back: BlockSnapshot = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back, snap);

    // Restore into a fresh device and transport over the same memory.
    let dev = Arc::new(Mutex::new(
        BlockDevice::open(0, &back.disk_config()).unwrap(),
    ));
    dev.lock().unwrap().check_identity(&back.backing).unwrap();
    let mut t = MmioTransport::new(g.mem.clone(), dev.clone()).unwrap();
    t.restore_state(&back.transport).unwrap();
    assert!(t.is_activated());
    g.dev = dev;
    g.transport = t;
    // The activation kick makes the device look at the queue: the pending request runs.
    {
        let mut d = g.dev.lock().unwrap();
        assert_eq!(d.queue_evt().read().unwrap(), 1);
        d.process_queue();
    }
    assert_eq!(g.q.pop_used(&g.mem), Some((pending, 513)));
    assert_eq!(
        g.mem.read_obj::<u8>(GuestAddress(st)).unwrap(),
        VIRTIO_BLK_S_OK
    );
    let (s, got) = g.read(30, 512);
    assert_eq!(s, VIRTIO_BLK_S_OK);
    assert_eq!(got, pattern(DISK_BYTES, 0)[30 * 512..31 * 512]);
    assert_eq!(g.q.used_idx(&g.mem), 7);
}

#[test]
fn identity_detects_changed_backing_files() {
    let f = disk_file(0);
    let d = BlockDevice::open(0, &DiskConfig::new(f.path(), false)).unwrap();
    let id = d.identity().unwrap();
    assert_eq!(id.size, DISK_BYTES as u64);
    assert!(id.sha256.is_none());
    d.check_identity(&id).unwrap();
    // Size.
    let mut other = id.clone();
    other.size += 512;
    let e = d.check_identity(&other).unwrap_err();
    assert!(
        matches!(e, BlockError::BackingChanged { what: "size", .. }),
        "{e}"
    );
    // mtime.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(f.path())
        .unwrap();
    let t = std::time::UNIX_EPOCH + std::time::Duration::new(1_000_000, 5);
    file.set_modified(t).unwrap();
    let e = d.check_identity(&id).unwrap_err();
    assert!(
        matches!(e, BlockError::BackingChanged { what: "mtime", .. }),
        "{e}"
    );
    assert!(e.to_string().contains(&f.path().display().to_string()));

    // Content with the same size and mtime: only the hash notices.
    let mut cfg = DiskConfig::new(f.path(), true);
    cfg.verify_hash = true;
    let d = BlockDevice::open(0, &cfg).unwrap();
    let id = d.identity().unwrap();
    let sha = id.sha256.expect("hash recorded");
    let want: [u8; 32] =
        <sha2::Sha256 as sha2::Digest>::digest(std::fs::read(f.path()).unwrap()).into();
    assert_eq!(sha, want);
    file.write_at(&[0xffu8; 1], 4096).unwrap();
    file.set_modified(t).unwrap();
    let e = d.check_identity(&id).unwrap_err();
    assert!(
        matches!(e, BlockError::BackingChanged { what: "sha256", .. }),
        "{e}"
    );
}

#[test]
fn snapshot_state_bounds() {
    let f = disk_file(0);
    let d = BlockDevice::open(0, &DiskConfig::new(f.path(), false)).unwrap();
    let mem = test_mem();
    let dev = Arc::new(Mutex::new(d));
    let t = MmioTransport::new(mem, dev.clone()).unwrap();
    let backing = dev.lock().unwrap().identity().unwrap();
    let good = BlockSnapshot {
        path: f.path().to_owned(),
        read_only: false,
        id: None,
        capacity: 2048,
        backing,
        mmio_base: crate::memory::MMIO_START + 0x1000,
        gsi: 6,
        transport: t.save_state(),
    };
    good.validate().unwrap();
    let mut s = good.clone();
    s.transport.queues.push(s.transport.queues[0]);
    assert!(s.validate().unwrap_err().contains("queues"));
    let mut s = good.clone();
    s.gsi = 40;
    assert!(s.validate().unwrap_err().contains("GSI"));
    let mut s = good.clone();
    s.id = Some("x".repeat(30));
    assert!(s.validate().is_err());
    let mut vm = crate::snapshot::state::tests::sample(128, 1);
    vm.blocks = vec![good.clone(); MAX_DISKS + 1];
    assert!(vm.validate().unwrap_err().contains("disks"));
    vm.blocks = vec![good; 2];
    vm.validate().unwrap();
}

#[test]
fn random_descriptor_tables_never_panic_or_grow_the_file() {
    let (_f, mut g) = rw_guest();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    // Guest memory the random descriptors point at: random bytes, so headers have random
    // types and sectors (some valid IN/OUT/FLUSH/GET_ID with small sectors).
    let mut junk = vec![0u8; 1 << 20];
    for (i, b) in junk.iter_mut().enumerate() {
        *b = (rnd() >> (i % 7)) as u8;
    }
    for i in (0..junk.len()).step_by(64) {
        junk[i] = (rnd() % 10) as u8; // type byte: mostly known types
        junk[i + 1..i + 4].fill(0);
        junk[i + 8..i + 16].copy_from_slice(&(rnd() % 4096).to_le_bytes());
    }
    g.mem.write_slice(&junk, GuestAddress(DATA)).unwrap();
    let mut resets = 0;
    for round in 0..300 {
        for idx in 0..g.q.size {
            let addr = match rnd() % 4 {
                0 => rnd(),
                1 => DATA + (rnd() % (1 << 20)) / 64 * 64,
                _ => DATA + rnd() % (1 << 20),
            };
            let len = match rnd() % 4 {
                0 => rnd() as u32,
                1 => 16,
                2 => 512 * (1 + (rnd() % 8) as u32),
                _ => 1,
            };
            let flags = match rnd() % 8 {
                0 => 4, // INDIRECT
                1..=3 => VRING_DESC_F_NEXT,
                4 | 5 => VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
                _ => VRING_DESC_F_WRITE,
            };
            let next = if rnd() % 4 == 0 {
                (rnd() % 300) as u16
            } else {
                idx.wrapping_add(1)
            };
            g.q.write_desc(&g.mem, idx, SplitDescriptor::new(addr, len, flags, next));
        }
        for _ in 0..(1 + rnd() % 8) {
            g.q.publish(&g.mem, (rnd() % 260) as u16);
        }
        g.kick();
        if g.status_reg() & STATUS_DEVICE_NEEDS_RESET != 0 || round % 50 == 49 {
            resets += 1;
            g.w32(regs::STATUS, 0);
            g.q = GuestQueue::new(&g.mem, QBASE, 256);
            g.init();
        }
    }
    assert_eq!(g.file_bytes().len(), DISK_BYTES, "the file never grows");
    let s = g.stats();
    assert!(s.reads + s.writes + s.flushes + s.get_ids > 0, "{s:?}");
    assert!(s.bad_chains + s.io_errors + s.unsupported > 0, "{s:?}");
    assert!(resets > 0);
    // Still a working device after a final reset.
    g.w32(regs::STATUS, 0);
    g.q = GuestQueue::new(&g.mem, QBASE, 256);
    g.init();
    assert_eq!(g.read(0, 512).0, VIRTIO_BLK_S_OK);
}
