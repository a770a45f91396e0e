//! The virtio-blk device: the request queue, request parsing and checks, positioned I/O on
//! the backing file, activation/reset and the event-loop subscriber.
//!
//! The device runs on the VM's block I/O thread (see [`super::attach`]), woken by its queue
//! EventFd (a KVM ioeventfd). Each request is handled to completion before the next one is
//! popped: the data descriptors are turned into an iovec array pointing straight into guest
//! memory and read or written with one `preadv`/`pwritev` (no copy, no allocation per
//! request).
//!
//! What a guest mistake costs (never a host panic):
//! - the request fails with status IOERR: header descriptor device-writable or shorter than
//!   16 bytes, header or data outside guest memory, data descriptors in the wrong direction,
//!   data length not a multiple of 512 or above [`MAX_REQUEST_BYTES`], sector arithmetic
//!   overflowing, a range past the disk's end, a write to a read-only disk, a host I/O error;
//!   unknown request types get UNSUPP;
//! - the chain is returned with used length 0 and no status (there is nowhere to put one):
//!   fewer than two descriptors, more than [`MAX_CHAIN_DESCS`] (a looping chain is cut at the
//!   queue size and lands here), a last descriptor that is not device-writable, a status
//!   byte outside guest memory;
//! - the device marks itself DEVICE_NEEDS_RESET and stops until the driver resets it: an
//!   available index more than the queue size ahead, a head index beyond the queue, a used
//!   ring it cannot write.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use sha2::{Digest, Sha256};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    BlockError, DiskConfig, DiskIdentity, ID_BYTES, MAX_CHAIN_DESCS, MAX_REQUEST_BYTES,
    QUEUE_MAX_SIZE, SECTOR_SIZE, SEG_MAX, SIZE_MAX, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_ID_BLOCK,
};
use crate::virtio::{ActivateError, GuestMem, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

/// Requests handled per wake-up before the device yields the I/O thread to other disks
/// (it re-arms itself through its queue EventFd).
const MAX_REQUESTS_PER_WAKE: usize = 256;
/// Avail ring flag: the driver does not want interrupts for now.
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Size of the request header (type, reserved, sector).
const HEADER_BYTES: usize = 16;
/// Bytes of the config space we expose (capacity .. num_queues).
const CONFIG_BYTES: usize = 36;
/// Read buffer for hashing a backing file.
const HASH_CHUNK: usize = 1 << 20;

/// Counters (diagnostics and tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlockStats {
    /// IN requests completed OK.
    pub reads: u64,
    /// OUT requests completed OK.
    pub writes: u64,
    /// FLUSH requests completed OK.
    pub flushes: u64,
    /// GET_ID requests completed OK.
    pub get_ids: u64,
    /// Bytes read into the guest.
    pub read_bytes: u64,
    /// Bytes written from the guest.
    pub written_bytes: u64,
    /// Requests answered IOERR (any reason).
    pub io_errors: u64,
    /// Writes refused because the disk is read-only (also counted in `io_errors`).
    pub read_only_refused: u64,
    /// Requests past the end of the disk or with overflowing sector arithmetic (also in
    /// `io_errors`).
    pub out_of_range: u64,
    /// Requests answered UNSUPP.
    pub unsupported: u64,
    /// Chains returned with used length 0 and no status.
    pub bad_chains: u64,
    /// Times the device marked itself DEVICE_NEEDS_RESET.
    pub needs_reset: u64,
    /// Used-buffer interrupts skipped because the driver set VRING_AVAIL_F_NO_INTERRUPT.
    pub suppressed_interrupts: u64,
}

/// One descriptor of a request chain, as read from the queue.
#[derive(Debug, Clone, Copy)]
struct Seg {
    addr: u64,
    len: u32,
    write: bool,
}

/// The backing file and what request handling needs (kept apart from the queue so a request
/// can be handled while the queue is borrowed).
#[derive(Debug)]
struct Disk {
    path: PathBuf,
    file: File,
    read_only: bool,
    verify_hash: bool,
    /// Capacity in sectors.
    capacity: u64,
    id: [u8; ID_BYTES],
    /// Descriptors of the request being handled (capacity `MAX_CHAIN_DESCS`, reused).
    segs: Vec<Seg>,
    stats: BlockStats,
}

#[derive(Debug)]
struct Active {
    mem: GuestMem,
    queue: Queue,
}

/// The virtio-blk device of one disk.
#[derive(Debug)]
pub struct BlockDevice {
    disk: Disk,
    cfg: DiskConfig,
    interrupt: Arc<Interrupt>,
    queue_evt: EventFd,
    active: Option<Active>,
    acked_features: u64,
    broken: bool,
    queue_max_sizes: [u16; 1],
}

fn os_err(what: &'static str) -> impl FnOnce(io::Error) -> BlockError {
    move |source| BlockError::Os { what, source }
}

impl BlockDevice {
    /// Opens the backing file of `cfg` (disk number `index`, which names the default id),
    /// with its own queue and interrupt EventFds.
    pub fn open(index: usize, cfg: &DiskConfig) -> Result<Self, BlockError> {
        let queue_evt = EventFd::new(EFD_NONBLOCK).map_err(os_err("creating the queue eventfd"))?;
        let irq = EventFd::new(EFD_NONBLOCK).map_err(os_err("creating the interrupt eventfd"))?;
        Self::with_eventfds(index, cfg, queue_evt, irq)
    }

    /// Opens the backing file of `cfg` and uses EventFds the VM registered: `queue_evt` as
    /// the KVM ioeventfd on QueueNotify, `irq` as the KVM irqfd. The file is opened read-only
    /// for a read-only disk.
    pub fn with_eventfds(
        index: usize,
        cfg: &DiskConfig,
        queue_evt: EventFd,
        irq: EventFd,
    ) -> Result<Self, BlockError> {
        cfg.validate().map_err(BlockError::Config)?;
        let file = OpenOptions::new()
            .read(true)
            .write(!cfg.read_only)
            .open(&cfg.path)
            .map_err(|source| BlockError::Open {
                path: cfg.path.clone(),
                mode: if cfg.read_only {
                    "read-only"
                } else {
                    "read-write"
                },
                source,
            })?;
        let meta = file.metadata().map_err(|source| BlockError::Backing {
            path: cfg.path.clone(),
            op: "fstat",
            source,
        })?;
        if !meta.is_file() {
            return Err(BlockError::NotAFile {
                path: cfg.path.clone(),
            });
        }
        Ok(BlockDevice {
            disk: Disk {
                path: cfg.path.clone(),
                file,
                read_only: cfg.read_only,
                verify_hash: cfg.verify_hash,
                capacity: meta.len() / SECTOR_SIZE,
                id: cfg.id_bytes(index),
                segs: Vec::with_capacity(MAX_CHAIN_DESCS),
                stats: BlockStats::default(),
            },
            cfg: cfg.clone(),
            interrupt: Interrupt::with_eventfd(irq),
            queue_evt,
            active: None,
            acked_features: 0,
            broken: false,
            queue_max_sizes: [QUEUE_MAX_SIZE],
        })
    }

    /// The disk's configuration.
    pub fn config(&self) -> &DiskConfig {
        &self.cfg
    }

    /// The backing file path.
    pub fn path(&self) -> &Path {
        &self.disk.path
    }

    /// Capacity in 512-byte sectors (the file size at open, rounded down).
    pub fn capacity(&self) -> u64 {
        self.disk.capacity
    }

    /// Whether the disk is read-only.
    pub fn read_only(&self) -> bool {
        self.disk.read_only
    }

    /// Whether the backing file descriptor was opened read-only (O_RDONLY).
    pub fn backing_opened_read_only(&self) -> bool {
        // SAFETY: F_GETFL on a descriptor we own reads its flags; no memory is involved.
        let fl = unsafe { libc::fcntl(self.disk.file.as_raw_fd(), libc::F_GETFL) };
        fl >= 0 && fl & libc::O_ACCMODE == libc::O_RDONLY
    }

    /// Whether the driver activated the device.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Counters.
    pub fn stats(&self) -> BlockStats {
        self.disk.stats
    }

    /// The queue EventFd (tests drive the device without an event loop).
    pub fn queue_evt(&self) -> &EventFd {
        &self.queue_evt
    }

    /// The backing file's identity now (size, mtime, and the SHA-256 with `verify_hash`),
    /// read from the open descriptor. Call with the device quiescent (snapshot).
    pub fn identity(&self) -> Result<DiskIdentity, BlockError> {
        let err = |op| {
            let path = self.disk.path.clone();
            move |source| BlockError::Backing { path, op, source }
        };
        let meta = self.disk.file.metadata().map_err(err("fstat"))?;
        let sha256 = if self.disk.verify_hash {
            let mut h = Sha256::new();
            let mut buf = vec![0u8; HASH_CHUNK];
            let mut off = 0u64;
            loop {
                let n = match self.disk.file.read_at(&mut buf, off) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(err("read for hashing")(e)),
                };
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                off += n as u64;
            }
            Some(h.finalize().into())
        } else {
            None
        };
        Ok(DiskIdentity {
            size: meta.len(),
            mtime_sec: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            sha256,
        })
    }

    /// Refuses a backing file whose identity differs from `saved` (restore).
    pub fn check_identity(&self, saved: &DiskIdentity) -> Result<(), BlockError> {
        let now = self.identity()?;
        let changed = |what, saved: String, found: String| BlockError::BackingChanged {
            path: self.disk.path.clone(),
            what,
            saved,
            found,
        };
        if now.size != saved.size {
            return Err(changed(
                "size",
                saved.size.to_string(),
                now.size.to_string(),
            ));
        }
        if (now.mtime_sec, now.mtime_nsec) != (saved.mtime_sec, saved.mtime_nsec) {
            let t = |s: i64, ns: i64| format!("{s}.{ns:09}");
            return Err(changed(
                "mtime",
                t(saved.mtime_sec, saved.mtime_nsec),
                t(now.mtime_sec, now.mtime_nsec),
            ));
        }
        if let (Some(a), Some(b)) = (saved.sha256, now.sha256) {
            if a != b {
                let hex = |d: [u8; 32]| d.iter().map(|b| format!("{b:02x}")).collect();
                return Err(changed("sha256", hex(a), hex(b)));
            }
        }
        Ok(())
    }

    /// Handle a queue notification: drain the request queue (bounded per call).
    pub fn process_queue(&mut self) {
        if self.broken {
            return;
        }
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mem = &a.mem;
        let q = &mut a.queue;
        let mut used = false;
        let mut fatal = None;
        let mut handled = 0;
        // The guest need not kick while we drain (VRING_USED_F_NO_NOTIFY); re-enabling
        // reports chains that arrived meanwhile.
        if let Err(e) = q.disable_notification(mem) {
            fatal = Some(format!("used flags: {e}"));
        }
        while fatal.is_none() {
            if handled >= MAX_REQUESTS_PER_WAKE {
                // Come back through the eventfd after the other disks had their turn.
                let _ = q.enable_notification(mem);
                if let Err(e) = self.queue_evt.write(1) {
                    tracing::warn!(error = %e, "virtio-blk: cannot re-arm the queue eventfd");
                }
                break;
            }
            let chain = match pop(q, mem) {
                Ok(Some(c)) => c,
                Ok(None) => match q.enable_notification(mem) {
                    Ok(true) => {
                        let _ = q.disable_notification(mem);
                        continue;
                    }
                    Ok(false) => break,
                    Err(e) => {
                        fatal = Some(format!("used flags: {e}"));
                        break;
                    }
                },
                Err(e) => {
                    fatal = Some(format!("request queue: {e}"));
                    break;
                }
            };
            let head = chain.head_index();
            if head >= q.size() {
                fatal = Some(format!("head index {head} out of range"));
                break;
            }
            let len = self.disk.handle(mem, chain);
            if let Err(e) = q.add_used(mem, head, len) {
                fatal = Some(format!("used ring: {e}"));
                break;
            }
            used = true;
            handled += 1;
        }
        if used {
            signal(q, mem, &self.interrupt, &mut self.disk.stats);
        }
        if let Some(why) = fatal {
            tracing::warn!(path = %self.disk.path.display(), why, "virtio-blk: device needs reset");
            self.broken = true;
            self.disk.stats.needs_reset += 1;
            self.interrupt.set_needs_reset();
        }
    }
}

/// Pop the next chain: Ok(None) when the ring is empty, Err on a corrupt avail index.
fn pop<'m>(
    q: &mut Queue,
    mem: &'m GuestMem,
) -> Result<Option<DescriptorChain<&'m GuestMem>>, virtio_queue::Error> {
    Ok(q.iter(mem)?.next())
}

/// Raise the used-buffer interrupt unless the driver suppressed it.
fn signal(q: &mut Queue, mem: &GuestMem, irq: &Interrupt, stats: &mut BlockStats) {
    // `needs_notification` orders our used-ring writes before the reads below.
    let needed = match q.needs_notification(mem) {
        Ok(false) => false,
        // Without EVENT_IDX the driver suppresses interrupts with VRING_AVAIL_F_NO_INTERRUPT
        // while it polls the used ring itself (and re-checks it after clearing the flag).
        _ if !q.event_idx_enabled() => {
            let flags: Result<u16, _> = mem.load(
                GuestAddress(q.avail_ring()),
                std::sync::atomic::Ordering::Acquire,
            );
            flags.map_or(true, |f| u16::from_le(f) & VRING_AVAIL_F_NO_INTERRUPT == 0)
        }
        _ => true,
    };
    if needed {
        irq.signal_used_queue();
    } else {
        stats.suppressed_interrupts += 1;
    }
}

/// Positioned vectored I/O over `iov` starting at file offset `off`, until every byte is
/// transferred. A zero-byte transfer (end of file) is an error.
fn positioned_io(
    file: &File,
    iov: &mut [libc::iovec],
    mut off: u64,
    write: bool,
) -> io::Result<()> {
    let mut start = 0;
    while start < iov.len() {
        let rest = &iov[start..];
        let off_t =
            libc::off_t::try_from(off).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // IOV_MAX is 1024; we pass at most SEG_MAX (126) entries.
        let cnt = rest.len() as libc::c_int;
        // SAFETY: every iovec points into guest memory that `mem` (borrowed by the caller for
        // the whole call) keeps mapped, with a length checked by `get_slice` to lie inside one
        // region. The kernel reads or writes only those ranges; the guest may touch them
        // concurrently, which affects only the guest's own data.
        let r = unsafe {
            if write {
                libc::pwritev(file.as_raw_fd(), rest.as_ptr(), cnt, off_t)
            } else {
                libc::preadv(file.as_raw_fd(), rest.as_ptr(), cnt, off_t)
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut n = r as usize;
        off += n as u64;
        while start < iov.len() && n >= iov[start].iov_len {
            n -= iov[start].iov_len;
            start += 1;
        }
        if n > 0 {
            let v = &mut iov[start];
            // SAFETY: n < v.iov_len, so the new base stays inside the same guest buffer.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
        }
    }
    Ok(())
}

impl Disk {
    /// Handle one request chain; returns the used length (data bytes written to the guest
    /// plus the status byte, or 0 when no status could be written).
    fn handle(&mut self, mem: &GuestMem, chain: DescriptorChain<&GuestMem>) -> u32 {
        self.segs.clear();
        let mut too_long = false;
        for d in chain {
            if self.segs.len() == MAX_CHAIN_DESCS {
                too_long = true;
                break;
            }
            self.segs.push(Seg {
                addr: d.addr().0,
                len: d.len(),
                write: d.is_write_only(),
            });
        }
        let n = self.segs.len();
        if too_long || n < 2 {
            self.stats.bad_chains += 1;
            return 0;
        }
        let status = self.segs[n - 1];
        let status_addr = match u64::from(status.len)
            .checked_sub(1)
            .and_then(|l| status.addr.checked_add(l))
        {
            Some(a) if status.write => a,
            _ => {
                self.stats.bad_chains += 1;
                return 0;
            }
        };
        let (st, data_len) = self.execute(mem, n);
        match st {
            VIRTIO_BLK_S_IOERR => self.stats.io_errors += 1,
            VIRTIO_BLK_S_UNSUPP => self.stats.unsupported += 1,
            _ => {}
        }
        if mem.write_obj(st, GuestAddress(status_addr)).is_err() {
            self.stats.bad_chains += 1;
            return 0;
        }
        data_len + 1
    }

    /// Execute the request in `self.segs[..n]` (header, data..., status). Returns the status
    /// and the bytes written into guest buffers.
    fn execute(&mut self, mem: &GuestMem, n: usize) -> (u8, u32) {
        const IOERR: (u8, u32) = (VIRTIO_BLK_S_IOERR, 0);
        let hdr = self.segs[0];
        if hdr.write || (hdr.len as usize) < HEADER_BYTES {
            return IOERR;
        }
        let mut h = [0u8; HEADER_BYTES];
        if mem.read_slice(&mut h, GuestAddress(hdr.addr)).is_err() {
            return IOERR;
        }
        let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = h;
        let type_ = u32::from_le_bytes([t0, t1, t2, t3]);
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        let data = 1..n - 1;
        match type_ {
            VIRTIO_BLK_T_IN => match self.rw(mem, data, sector, false) {
                Some(len) => {
                    self.stats.reads += 1;
                    self.stats.read_bytes += u64::from(len);
                    (VIRTIO_BLK_S_OK, len)
                }
                None => IOERR,
            },
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    self.stats.read_only_refused += 1;
                    return IOERR;
                }
                match self.rw(mem, data, sector, true) {
                    Some(len) => {
                        self.stats.writes += 1;
                        self.stats.written_bytes += u64::from(len);
                        (VIRTIO_BLK_S_OK, 0)
                    }
                    None => IOERR,
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.read_only {
                    if let Err(e) = self.file.sync_data() {
                        tracing::warn!(path = %self.path.display(), error = %e, "virtio-blk: flush failed");
                        return IOERR;
                    }
                }
                self.stats.flushes += 1;
                (VIRTIO_BLK_S_OK, 0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let mut written = 0usize;
                for s in &self.segs[data] {
                    if !s.write {
                        return IOERR;
                    }
                    let k = (s.len as usize).min(ID_BYTES - written);
                    if k > 0
                        && mem
                            .write_slice(&self.id[written..written + k], GuestAddress(s.addr))
                            .is_err()
                    {
                        return IOERR;
                    }
                    written += k;
                }
                if written == 0 {
                    return IOERR;
                }
                self.stats.get_ids += 1;
                (VIRTIO_BLK_S_OK, written as u32)
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }

    /// Read (`write` false: file -> guest) or write the data descriptors `data` at `sector`.
    /// Returns the byte count, or `None` if the request must fail (IOERR).
    fn rw(
        &mut self,
        mem: &GuestMem,
        data: std::ops::Range<usize>,
        sector: u64,
        write: bool,
    ) -> Option<u32> {
        let segs = &self.segs[data];
        // Device-writable buffers for a read, device-readable ones for a write.
        if segs.iter().any(|s| s.write == write) {
            return None;
        }
        let total: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
        if total > MAX_REQUEST_BYTES || total % SECTOR_SIZE != 0 {
            return None;
        }
        let in_range = sector.checked_mul(SECTOR_SIZE).filter(|off| {
            off.checked_add(total)
                .is_some_and(|end| end <= self.capacity * SECTOR_SIZE)
        });
        let Some(off) = in_range else {
            self.stats.out_of_range += 1;
            return None;
        };
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; SEG_MAX as usize];
        let mut cnt = 0;
        for s in segs.iter().filter(|s| s.len > 0) {
            // One region only: a buffer crossing into unmapped space or another region fails.
            let slice = mem.get_slice(GuestAddress(s.addr), s.len as usize).ok()?;
            iov[cnt] = libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            };
            cnt += 1;
        }
        if let Err(e) = positioned_io(&self.file, &mut iov[..cnt], off, write) {
            tracing::debug!(path = %self.path.display(), error = %e, write, sector, total, "virtio-blk: I/O failed");
            return None;
        }
        // total <= MAX_REQUEST_BYTES < 4 GiB.
        u32::try_from(total).ok()
    }

    /// The config space: capacity, size_max, seg_max, geometry (0), blk_size, topology (0),
    /// writeback (0), num_queues (1).
    fn config_space(&self) -> [u8; CONFIG_BYTES] {
        let mut c = [0u8; CONFIG_BYTES];
        c[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c[34..36].copy_from_slice(&1u16.to_le_bytes());
        c
    }
}

impl VirtioDevice for BlockDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn avail_features(&self) -> u64 {
        let ro = if self.disk.read_only {
            VIRTIO_BLK_F_RO
        } else {
            0
        };
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_FLUSH | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.disk.config_space();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| cfg.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(
            offset,
            "virtio-blk: ignoring write to read-only config space"
        );
    }

    fn queue_events(&self) -> io::Result<Vec<EventFd>> {
        Ok(vec![self.queue_evt.try_clone()?])
    }

    fn interrupt(&self) -> Arc<Interrupt> {
        self.interrupt.clone()
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        mut queues: Vec<Queue>,
        acked_features: u64,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive { device: "block" });
        }
        let (Some(queue), true) = (queues.pop(), queues.is_empty()) else {
            return Err(ActivateError::QueueCount {
                device: "block",
                expected: 1,
                got: queues.len() + 1,
            });
        };
        self.acked_features = acked_features;
        self.active = Some(Active { mem, queue });
        self.broken = false;
        // Requests made available before a snapshot but not yet seen get picked up.
        if let Err(e) = self.queue_evt.write(1) {
            tracing::warn!(error = %e, "virtio-blk: cannot kick the queue eventfd");
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.broken = false;
        self.acked_features = 0;
    }

    fn queue_next_indices(&self) -> Option<Vec<u16>> {
        self.active.as_ref().map(|a| vec![a.queue.next_used()])
    }
}

impl MutEventSubscriber for BlockDevice {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_evt, EventSet::IN)) {
            tracing::error!(error = ?e, path = %self.disk.path.display(), "virtio-blk: cannot watch the queue eventfd");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // EAGAIN just means it was already drained.
        let _ = self.queue_evt.read();
        self.process_queue();
    }
}
