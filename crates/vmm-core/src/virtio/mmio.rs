//! The virtio-mmio transport (virtio 1.x, MMIO register layout version 2).
//!
//! [`MmioTransport`] owns the register file of one device window: feature negotiation with
//! selectors, per-queue configuration (size, ready, ring addresses), interrupt status and
//! acknowledge, the device status state machine with reset, and the device configuration
//! space at offset 0x100. It keeps the guest's queue configuration as raw values and only
//! builds (and validates) `virtio_queue::Queue`s when the driver sets DRIVER_OK; any invalid
//! configuration (queue size not a power of two or above the maximum, misaligned ring, ring
//! outside guest memory, queue not ready) makes the device report DEVICE_NEEDS_RESET instead
//! of activating. Nothing the guest writes here can panic or allocate.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::snapshot::state::{MmioSnapshot, QueueSnapshot};

use super::{
    GuestMem, Interrupt, VirtioDevice, STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK, VIRTIO_F_VERSION_1,
};

/// Size of one virtio-mmio device window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The modern (virtio 1.x) register layout.
pub const MMIO_VERSION: u32 = 2;
/// Vendor id reported by Kiln devices ("KILN" in ASCII-ish form).
pub const MMIO_VENDOR_ID: u32 = 0x4b49_4c4e;

/// Register offsets of the virtio-mmio layout.
pub mod regs {
    /// Magic value register.
    pub const MAGIC: u64 = 0x000;
    /// Version register.
    pub const VERSION: u64 = 0x004;
    /// Device id register.
    pub const DEVICE_ID: u64 = 0x008;
    /// Vendor id register.
    pub const VENDOR_ID: u64 = 0x00c;
    /// Device features (32 bits selected by DEVICE_FEATURES_SEL).
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Device features word selector.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// Driver features (32 bits selected by DRIVER_FEATURES_SEL).
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Driver features word selector.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Queue selector.
    pub const QUEUE_SEL: u64 = 0x030;
    /// Maximum size of the selected queue.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Size of the selected queue.
    pub const QUEUE_NUM: u64 = 0x038;
    /// Ready bit of the selected queue.
    pub const QUEUE_READY: u64 = 0x044;
    /// Queue notifier.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Interrupt status.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Interrupt acknowledge.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status.
    pub const STATUS: u64 = 0x070;
    /// Descriptor table address, low 32 bits.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// Descriptor table address, high 32 bits.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Available ring address, low 32 bits.
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    /// Available ring address, high 32 bits.
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    /// Used ring address, low 32 bits.
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    /// Used ring address, high 32 bits.
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    /// Shared memory region selector (no regions are offered).
    pub const SHM_SEL: u64 = 0x0ac;
    /// Shared memory region length, low.
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// Shared memory region base, high (end of the SHM block).
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// Configuration generation counter.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// Errors restoring a transport from a saved state.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The saved state does not match this device's queues.
    #[error("virtio-mmio restore: {0}")]
    Mismatch(String),
    /// The saved queue configuration is invalid for this guest memory.
    #[error("virtio-mmio restore: invalid queue configuration: {0}")]
    Queue(String),
    /// The device refused activation.
    #[error("virtio-mmio restore: {0}")]
    Activate(#[from] super::ActivateError),
}

/// The guest's configuration of one queue, kept raw until activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct QueueConfig {
    max_size: u16,
    size: u32,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        QueueConfig {
            max_size,
            size: u32::from(max_size),
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }
}

fn set_low(v: &mut u64, low: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(low);
}

fn set_high(v: &mut u64, high: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(high) << 32);
}

/// Lock a mutex, recovering the data if another thread panicked while holding it (the device
/// state stays usable; the panic itself is reported by that thread).
pub(crate) use kiln_sync::lock;

/// One virtio-mmio device window.
#[derive(Debug)]
pub struct MmioTransport<D: VirtioDevice> {
    device: Arc<Mutex<D>>,
    mem: GuestMem,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<EventFd>,
    device_type: u32,
    avail_features: u64,
    queues: Vec<QueueConfig>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    bad_driver_features: bool,
    status: u32,
    activated: bool,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Build the transport for `device` over guest memory `mem`.
    pub fn new(mem: GuestMem, device: Arc<Mutex<D>>) -> std::io::Result<Self> {
        let (device_type, avail_features, queues, queue_evts, interrupt) = {
            let d = lock(&device);
            (
                d.device_type(),
                d.avail_features(),
                d.queue_max_sizes()
                    .iter()
                    .map(|&m| QueueConfig::new(m))
                    .collect::<Vec<_>>(),
                d.queue_events()?,
                d.interrupt(),
            )
        };
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            queue_evts,
            device_type,
            avail_features,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            bad_driver_features: false,
            status: 0,
            activated: false,
        })
    }

    /// The device behind this window.
    pub fn device(&self) -> &Arc<Mutex<D>> {
        &self.device
    }

    /// The queue-notify EventFds, in queue order. Register each as a KVM ioeventfd at
    /// `window_base + regs::QUEUE_NOTIFY` with datamatch = its queue index.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The interrupt EventFd; register it as a KVM irqfd on the device's GSI.
    pub fn interrupt_evt(&self) -> &EventFd {
        self.interrupt.eventfd()
    }

    /// Current value of the status register.
    pub fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | STATUS_DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// Whether the device was activated (DRIVER_OK accepted).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Features the driver acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.driver_features
    }

    /// Save the register file, as a snapshot stores it (call with the vCPUs paused).
    pub fn save_state(&self) -> MmioSnapshot {
        let next = lock(&self.device).queue_next_indices().unwrap_or_default();
        MmioSnapshot {
            queues: self
                .queues
                .iter()
                .enumerate()
                .map(|(i, q)| QueueSnapshot {
                    max_size: q.max_size,
                    size: q.size,
                    ready: q.ready,
                    desc: q.desc,
                    avail: q.avail,
                    used: q.used,
                    next_index: next.get(i).copied().unwrap_or(0),
                })
                .collect(),
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            bad_driver_features: self.bad_driver_features,
            status: self.status,
            activated: self.activated,
            interrupt_status: self.interrupt.status(),
            needs_reset: self.interrupt.needs_reset(),
        }
    }

    /// Load a saved register file into this fresh transport and, if the device was active,
    /// re-activate it with the saved queues positioned at their saved indices. Everything is
    /// validated as at DRIVER_OK; on error the transport is left reset.
    pub fn restore_state(&mut self, st: &MmioSnapshot) -> Result<(), MmioError> {
        if st.queues.len() != self.queues.len() {
            return Err(MmioError::Mismatch(format!(
                "{} queues saved, device has {}",
                st.queues.len(),
                self.queues.len()
            )));
        }
        for (i, (s, q)) in st.queues.iter().zip(&self.queues).enumerate() {
            if s.max_size != q.max_size {
                return Err(MmioError::Mismatch(format!(
                    "queue {i}: max size {} saved, device has {}",
                    s.max_size, q.max_size
                )));
            }
        }
        self.reset();
        for (s, q) in st.queues.iter().zip(self.queues.iter_mut()) {
            *q = QueueConfig {
                max_size: s.max_size,
                size: s.size,
                ready: s.ready,
                desc: s.desc,
                avail: s.avail,
                used: s.used,
            };
        }
        self.queue_sel = st.queue_sel;
        self.device_features_sel = st.device_features_sel;
        self.driver_features_sel = st.driver_features_sel;
        self.driver_features = st.driver_features;
        self.bad_driver_features = st.bad_driver_features;
        self.status = st.status & !STATUS_DEVICE_NEEDS_RESET;
        if st.activated && !st.needs_reset {
            let mut queues = match self.build_queues() {
                Ok(q) => q,
                Err(e) => {
                    self.reset();
                    return Err(MmioError::Queue(e));
                }
            };
            for (q, s) in queues.iter_mut().zip(&st.queues) {
                q.set_next_avail(s.next_index);
                q.set_next_used(s.next_index);
            }
            let res = lock(&self.device).activate(self.mem.clone(), queues, self.driver_features);
            if let Err(e) = res {
                self.reset();
                return Err(e.into());
            }
            self.activated = true;
        }
        self.interrupt.restore(st.interrupt_status, st.needs_reset);
        Ok(())
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn queue_config_writable(&self) -> bool {
        // Queue registers may only change after feature negotiation and before the device is
        // live.
        self.status & STATUS_FEATURES_OK != 0 && self.status & STATUS_DRIVER_OK == 0
    }

    /// Handle a guest read of `data.len()` bytes at `offset` within the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= regs::CONFIG {
            let d = lock(&self.device);
            d.read_config(offset - regs::CONFIG, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio: bad register read width"
            );
            return;
        }
        let v: u32 = match offset {
            regs::MAGIC => MMIO_MAGIC,
            regs::VERSION => MMIO_VERSION,
            regs::DEVICE_ID => self.device_type,
            regs::VENDOR_ID => MMIO_VENDOR_ID,
            regs::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.avail_features as u32,
                1 => (self.avail_features >> 32) as u32,
                _ => 0,
            },
            regs::QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size)),
            regs::QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready)),
            regs::INTERRUPT_STATUS => self.interrupt.status(),
            regs::STATUS => self.status(),
            // No shared memory regions: length reads as all ones (v1.2 "no region").
            regs::SHM_LEN_LOW..=regs::SHM_BASE_HIGH => u32::MAX,
            regs::CONFIG_GENERATION => 0,
            _ => {
                tracing::debug!(
                    offset,
                    "virtio-mmio: read of unknown or write-only register"
                );
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// Handle a guest write of `data` at `offset` within the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= regs::CONFIG {
            if self.status & STATUS_DRIVER_OK == 0 || self.activated {
                lock(&self.device).write_config(offset - regs::CONFIG, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio: bad register write width"
            );
            return;
        };
        if offset % 4 != 0 {
            return;
        }
        let v = u32::from_le_bytes(bytes);
        match offset {
            regs::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            regs::DRIVER_FEATURES => {
                if self.status & STATUS_DRIVER == 0 || self.status & STATUS_FEATURES_OK != 0 {
                    tracing::debug!("virtio-mmio: driver features written in the wrong state");
                    return;
                }
                match self.driver_features_sel {
                    0 => set_low(&mut self.driver_features, v),
                    1 => set_high(&mut self.driver_features, v),
                    // Words past 64 bits: we offer nothing there; anything set is refused.
                    _ => self.bad_driver_features |= v != 0,
                }
            }
            regs::QUEUE_SEL => self.queue_sel = v,
            regs::QUEUE_NUM => {
                if self.queue_config_writable() {
                    if let Some(q) = self.selected_queue().filter(|q| !q.ready) {
                        q.size = v;
                    }
                }
            }
            regs::QUEUE_READY => {
                if self.queue_config_writable() {
                    if let Some(q) = self.selected_queue() {
                        q.ready = v == 1;
                    }
                }
            }
            regs::QUEUE_DESC_LOW
            | regs::QUEUE_DESC_HIGH
            | regs::QUEUE_AVAIL_LOW
            | regs::QUEUE_AVAIL_HIGH
            | regs::QUEUE_USED_LOW
            | regs::QUEUE_USED_HIGH => {
                if !self.queue_config_writable() {
                    return;
                }
                let Some(q) = self.selected_queue().filter(|q| !q.ready) else {
                    return;
                };
                match offset {
                    regs::QUEUE_DESC_LOW => set_low(&mut q.desc, v),
                    regs::QUEUE_DESC_HIGH => set_high(&mut q.desc, v),
                    regs::QUEUE_AVAIL_LOW => set_low(&mut q.avail, v),
                    regs::QUEUE_AVAIL_HIGH => set_high(&mut q.avail, v),
                    regs::QUEUE_USED_LOW => set_low(&mut q.used, v),
                    _ => set_high(&mut q.used, v),
                }
            }
            regs::QUEUE_NOTIFY => {
                // Only reached when the VM did not register an ioeventfd for this queue.
                if self.activated {
                    if let Some(evt) = self.queue_evts.get(v as usize) {
                        if let Err(e) = evt.write(1) {
                            tracing::warn!(error = %e, "virtio-mmio: queue notify failed");
                        }
                    }
                }
            }
            regs::INTERRUPT_ACK => self.interrupt.ack(v),
            regs::STATUS => self.write_status(v),
            regs::SHM_SEL => {}
            _ => tracing::debug!(
                offset,
                "virtio-mmio: write to unknown or read-only register"
            ),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        if v & STATUS_FAILED != 0 {
            self.status |= STATUS_FAILED;
            return;
        }
        // The driver may only add bits, never clear them (except by writing 0).
        if v & self.status != self.status {
            tracing::debug!(
                old = self.status,
                new = v,
                "virtio-mmio: status bits cleared"
            );
            return;
        }
        let added = v & !self.status;
        let mut new = self.status;
        if added & STATUS_ACKNOWLEDGE != 0 {
            new |= STATUS_ACKNOWLEDGE;
        }
        if added & STATUS_DRIVER != 0 && new & STATUS_ACKNOWLEDGE != 0 {
            new |= STATUS_DRIVER;
        }
        if added & STATUS_FEATURES_OK != 0 && new & STATUS_DRIVER != 0 {
            let unknown = self.driver_features & !self.avail_features;
            if unknown == 0
                && !self.bad_driver_features
                && self.driver_features & VIRTIO_F_VERSION_1 != 0
            {
                new |= STATUS_FEATURES_OK;
            } else {
                tracing::warn!(
                    driver = self.driver_features,
                    device = self.avail_features,
                    "virtio-mmio: refusing FEATURES_OK (feature not offered or VERSION_1 missing)"
                );
            }
        }
        self.status = new;
        if added & STATUS_DRIVER_OK != 0 && new & STATUS_FEATURES_OK != 0 {
            self.status |= STATUS_DRIVER_OK;
            self.activate();
        }
    }

    fn build_queues(&self) -> Result<Vec<Queue>, String> {
        let mut out = Vec::with_capacity(self.queues.len());
        for (i, c) in self.queues.iter().enumerate() {
            let mut q = Queue::new(c.max_size).map_err(|e| format!("queue {i}: {e}"))?;
            if !c.ready {
                return Err(format!("queue {i} not ready"));
            }
            let size = u16::try_from(c.size).map_err(|_| format!("queue {i}: size {}", c.size))?;
            q.try_set_size(size)
                .map_err(|e| format!("queue {i}: size {size}: {e}"))?;
            q.try_set_desc_table_address(GuestAddress(c.desc))
                .map_err(|e| format!("queue {i}: descriptor table {:#x}: {e}", c.desc))?;
            q.try_set_avail_ring_address(GuestAddress(c.avail))
                .map_err(|e| format!("queue {i}: avail ring {:#x}: {e}", c.avail))?;
            q.try_set_used_ring_address(GuestAddress(c.used))
                .map_err(|e| format!("queue {i}: used ring {:#x}: {e}", c.used))?;
            q.set_ready(true);
            if !q.is_valid(&self.mem) {
                return Err(format!("queue {i}: rings outside guest memory"));
            }
            out.push(q);
        }
        Ok(out)
    }

    fn activate(&mut self) {
        if self.activated {
            return;
        }
        let queues = match self.build_queues() {
            Ok(q) => q,
            Err(e) => {
                tracing::warn!(error = %e, "virtio-mmio: invalid queue configuration");
                self.interrupt.set_needs_reset();
                return;
            }
        };
        let res = lock(&self.device).activate(self.mem.clone(), queues, self.driver_features);
        match res {
            Ok(()) => self.activated = true,
            Err(e) => {
                tracing::warn!(error = %e, "virtio-mmio: device activation failed");
                self.interrupt.set_needs_reset();
            }
        }
    }

    fn reset(&mut self) {
        lock(&self.device).reset();
        self.interrupt.reset();
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.bad_driver_features = false;
        self.status = 0;
        self.activated = false;
    }
}

impl<D: VirtioDevice> crate::bus::BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::virtio::testutil::{test_mem, GuestQueue};
    use crate::virtio::vsock::{VsockConfig, VsockDevice, QUEUE_MAX_SIZE};
    use crate::virtio::{INT_CONFIG, INT_VRING};

    fn transport() -> MmioTransport<VsockDevice> {
        let cfg = VsockConfig {
            guest_cid: 0x8765_4321,
            ..VsockConfig::default()
        };
        let dev = Arc::new(Mutex::new(VsockDevice::new(cfg).unwrap()));
        MmioTransport::new(test_mem(), dev).unwrap()
    }

    fn r32(t: &mut MmioTransport<VsockDevice>, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(t: &mut MmioTransport<VsockDevice>, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Negotiate VERSION_1 and reach FEATURES_OK.
    fn features_ok(t: &mut MmioTransport<VsockDevice>) {
        w32(t, regs::STATUS, STATUS_ACKNOWLEDGE);
        w32(t, regs::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w32(t, regs::DRIVER_FEATURES_SEL, 1);
        w32(t, regs::DRIVER_FEATURES, 1);
        w32(
            t,
            regs::STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_ne!(r32(t, regs::STATUS) & STATUS_FEATURES_OK, 0);
    }

    fn setup_queue(t: &mut MmioTransport<VsockDevice>, i: u32, q: &GuestQueue) {
        w32(t, regs::QUEUE_SEL, i);
        w32(t, regs::QUEUE_NUM, u32::from(q.size));
        w32(t, regs::QUEUE_DESC_LOW, q.desc_addr() as u32);
        w32(t, regs::QUEUE_DESC_HIGH, 0);
        w32(t, regs::QUEUE_AVAIL_LOW, q.avail_addr() as u32);
        w32(t, regs::QUEUE_AVAIL_HIGH, 0);
        w32(t, regs::QUEUE_USED_LOW, q.used_addr() as u32);
        w32(t, regs::QUEUE_USED_HIGH, 0);
        w32(t, regs::QUEUE_READY, 1);
    }

    fn setup_all(t: &mut MmioTransport<VsockDevice>) {
        let mem = t.mem.clone();
        for i in 0..3u32 {
            let q = GuestQueue::new(&mem, 0x10_0000 + u64::from(i) * 0x1_0000, 64);
            setup_queue(t, i, &q);
        }
    }

    const ALL_OK: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

    #[test]
    fn identification_registers() {
        let mut t = transport();
        assert_eq!(r32(&mut t, regs::MAGIC), 0x7472_6976);
        assert_eq!(r32(&mut t, regs::VERSION), 2);
        assert_eq!(r32(&mut t, regs::DEVICE_ID), 19);
        assert_eq!(r32(&mut t, regs::VENDOR_ID), MMIO_VENDOR_ID);
        assert_eq!(r32(&mut t, regs::CONFIG_GENERATION), 0);
        assert_eq!(r32(&mut t, regs::SHM_LEN_LOW), u32::MAX);
    }

    #[test]
    fn device_features_are_selected_by_word() {
        let mut t = transport();
        w32(&mut t, regs::DEVICE_FEATURES_SEL, 0);
        assert_eq!(r32(&mut t, regs::DEVICE_FEATURES), 0);
        w32(&mut t, regs::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r32(&mut t, regs::DEVICE_FEATURES), 1, "VIRTIO_F_VERSION_1");
        w32(&mut t, regs::DEVICE_FEATURES_SEL, 7);
        assert_eq!(r32(&mut t, regs::DEVICE_FEATURES), 0);
    }

    /// ACKNOWLEDGE, DRIVER, the register writes in `writes`, then FEATURES_OK: the device
    /// must refuse FEATURES_OK.
    fn expect_features_refused(writes: &[(u64, u32)]) {
        let mut t = transport();
        w32(&mut t, regs::STATUS, STATUS_ACKNOWLEDGE);
        w32(&mut t, regs::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        for &(reg, value) in writes {
            w32(&mut t, reg, value);
        }
        w32(
            &mut t,
            regs::STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r32(&mut t, regs::STATUS) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn features_ok_requires_version_1() {
        expect_features_refused(&[]);
    }

    #[test]
    fn features_ok_refused_for_feature_not_offered() {
        expect_features_refused(&[
            (regs::DRIVER_FEATURES_SEL, 1),
            (regs::DRIVER_FEATURES, 1),
            (regs::DRIVER_FEATURES_SEL, 0),
            (regs::DRIVER_FEATURES, 1 << 29), // EVENT_IDX: not offered
        ]);
        // Bits past 64 are refused too.
        expect_features_refused(&[
            (regs::DRIVER_FEATURES_SEL, 1),
            (regs::DRIVER_FEATURES, 1),
            (regs::DRIVER_FEATURES_SEL, 2),
            (regs::DRIVER_FEATURES, 1),
        ]);
    }

    #[test]
    fn driver_features_ignored_outside_negotiation() {
        let mut t = transport();
        // Before DRIVER.
        w32(&mut t, regs::DRIVER_FEATURES_SEL, 1);
        w32(&mut t, regs::DRIVER_FEATURES, 1);
        assert_eq!(t.acked_features(), 0);
        features_ok(&mut t);
        // After FEATURES_OK.
        w32(&mut t, regs::DRIVER_FEATURES_SEL, 0);
        w32(&mut t, regs::DRIVER_FEATURES, 0xffff_ffff);
        assert_eq!(t.acked_features(), VIRTIO_F_VERSION_1);
    }

    #[test]
    fn status_bits_cannot_be_cleared_or_skipped() {
        let mut t = transport();
        // DRIVER without ACKNOWLEDGE is not accepted.
        w32(&mut t, regs::STATUS, STATUS_DRIVER);
        assert_eq!(r32(&mut t, regs::STATUS), 0);
        features_ok(&mut t);
        w32(&mut t, regs::STATUS, STATUS_ACKNOWLEDGE);
        assert_eq!(
            r32(&mut t, regs::STATUS),
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
        );
        // DRIVER_OK without FEATURES_OK is not accepted.
        let mut t = transport();
        w32(&mut t, regs::STATUS, STATUS_ACKNOWLEDGE);
        w32(&mut t, regs::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER_OK);
        assert_eq!(r32(&mut t, regs::STATUS), STATUS_ACKNOWLEDGE);
        assert!(!t.is_activated());
    }

    #[test]
    fn queue_registers() {
        let mut t = transport();
        w32(&mut t, regs::QUEUE_SEL, 0);
        assert_eq!(r32(&mut t, regs::QUEUE_NUM_MAX), u32::from(QUEUE_MAX_SIZE));
        w32(&mut t, regs::QUEUE_SEL, 3);
        assert_eq!(r32(&mut t, regs::QUEUE_NUM_MAX), 0, "no fourth queue");
        w32(&mut t, regs::QUEUE_READY, 1);
        assert_eq!(r32(&mut t, regs::QUEUE_READY), 0);
        // Queue config before FEATURES_OK is ignored.
        w32(&mut t, regs::QUEUE_SEL, 0);
        w32(&mut t, regs::QUEUE_READY, 1);
        assert_eq!(r32(&mut t, regs::QUEUE_READY), 0);
        features_ok(&mut t);
        w32(&mut t, regs::QUEUE_READY, 1);
        assert_eq!(r32(&mut t, regs::QUEUE_READY), 1);
    }

    #[test]
    fn driver_ok_activates_valid_queues() {
        let mut t = transport();
        features_ok(&mut t);
        setup_all(&mut t);
        w32(&mut t, regs::STATUS, ALL_OK);
        assert_eq!(r32(&mut t, regs::STATUS), ALL_OK);
        assert!(t.is_activated());
        assert!(t.device().lock().unwrap().is_active());
    }

    fn expect_needs_reset(t: &mut MmioTransport<VsockDevice>) {
        w32(t, regs::STATUS, ALL_OK);
        assert!(!t.is_activated());
        assert!(!t.device().lock().unwrap().is_active());
        assert_ne!(r32(t, regs::STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
        assert_ne!(r32(t, regs::INTERRUPT_STATUS) & INT_CONFIG, 0);
        assert_eq!(t.interrupt_evt().read().unwrap(), 1);
    }

    /// Configures every queue, then reopens queue `sel`, writes `value` to `reg` and marks the
    /// queue ready again: DRIVER_OK must then be refused with DEVICE_NEEDS_RESET.
    fn bad_queue_config_needs_reset(sel: u32, reg: u64, value: u32) {
        let mut t = transport();
        features_ok(&mut t);
        setup_all(&mut t);
        w32(&mut t, regs::QUEUE_SEL, sel);
        w32(&mut t, regs::QUEUE_READY, 0);
        w32(&mut t, reg, value);
        w32(&mut t, regs::QUEUE_READY, 1);
        expect_needs_reset(&mut t);
    }

    #[test]
    fn queue_size_not_power_of_two_needs_reset() {
        bad_queue_config_needs_reset(1, regs::QUEUE_NUM, 100);
    }

    #[test]
    fn queue_size_above_max_or_zero_needs_reset() {
        for bad in [512u32, 0, 0x1_0000] {
            bad_queue_config_needs_reset(0, regs::QUEUE_NUM, bad);
        }
    }

    #[test]
    fn ring_outside_guest_memory_needs_reset() {
        bad_queue_config_needs_reset(2, regs::QUEUE_USED_HIGH, 0x10); // 64 GiB up
    }

    #[test]
    fn ring_straddling_end_of_memory_needs_reset() {
        bad_queue_config_needs_reset(0, regs::QUEUE_DESC_LOW, (64 << 20) - 16);
    }

    #[test]
    fn misaligned_ring_needs_reset() {
        bad_queue_config_needs_reset(1, regs::QUEUE_DESC_LOW, 0x10_0008);
    }

    #[test]
    fn queue_not_ready_needs_reset() {
        let mut t = transport();
        features_ok(&mut t);
        setup_all(&mut t);
        w32(&mut t, regs::QUEUE_SEL, 2);
        w32(&mut t, regs::QUEUE_READY, 0);
        expect_needs_reset(&mut t);
    }

    #[test]
    fn reset_clears_everything_and_allows_reinit() {
        let mut t = transport();
        features_ok(&mut t);
        setup_all(&mut t);
        w32(&mut t, regs::STATUS, ALL_OK);
        assert!(t.is_activated());
        t.interrupt.signal_used_queue();
        assert_eq!(t.interrupt_evt().read().unwrap(), 1);
        w32(&mut t, regs::STATUS, 0);
        assert_eq!(r32(&mut t, regs::STATUS), 0);
        assert_eq!(r32(&mut t, regs::INTERRUPT_STATUS), 0);
        assert_eq!(t.acked_features(), 0);
        assert!(!t.is_activated());
        assert!(!t.device().lock().unwrap().is_active());
        for i in 0..3 {
            w32(&mut t, regs::QUEUE_SEL, i);
            assert_eq!(r32(&mut t, regs::QUEUE_READY), 0);
        }
        // A needs-reset state is cleared by reset too.
        features_ok(&mut t);
        expect_needs_reset(&mut t);
        w32(&mut t, regs::STATUS, 0);
        assert_eq!(r32(&mut t, regs::STATUS), 0);
        features_ok(&mut t);
        setup_all(&mut t);
        w32(&mut t, regs::STATUS, ALL_OK);
        assert!(t.is_activated());
    }

    #[test]
    fn queue_config_frozen_after_driver_ok() {
        let mut t = transport();
        features_ok(&mut t);
        setup_all(&mut t);
        w32(&mut t, regs::STATUS, ALL_OK);
        w32(&mut t, regs::QUEUE_SEL, 0);
        w32(&mut t, regs::QUEUE_READY, 0);
        assert_eq!(r32(&mut t, regs::QUEUE_READY), 1);
        w32(&mut t, regs::QUEUE_NUM, 2);
        assert_eq!(t.queues[0].size, 64);
    }

    #[test]
    fn interrupt_status_and_ack() {
        let mut t = transport();
        t.interrupt.signal_used_queue();
        t.interrupt.signal_config();
        assert_eq!(r32(&mut t, regs::INTERRUPT_STATUS), INT_VRING | INT_CONFIG);
        w32(&mut t, regs::INTERRUPT_ACK, INT_VRING);
        assert_eq!(r32(&mut t, regs::INTERRUPT_STATUS), INT_CONFIG);
        w32(&mut t, regs::INTERRUPT_ACK, INT_CONFIG);
        assert_eq!(r32(&mut t, regs::INTERRUPT_STATUS), 0);
        assert_eq!(t.interrupt_evt().read().unwrap(), 2);
    }

    #[test]
    fn config_space_is_the_guest_cid() {
        let mut t = transport();
        let mut b8 = [0u8; 8];
        t.read(regs::CONFIG, &mut b8);
        assert_eq!(u64::from_le_bytes(b8), 0x8765_4321);
        assert_eq!(r32(&mut t, regs::CONFIG), 0x8765_4321);
        assert_eq!(r32(&mut t, regs::CONFIG + 4), 0);
        let mut b1 = [0u8; 1];
        t.read(regs::CONFIG + 1, &mut b1);
        assert_eq!(b1[0], 0x43);
        assert_eq!(r32(&mut t, regs::CONFIG + 8), 0, "past the config space");
        let mut far = [0xaau8; 4];
        t.read(u64::MAX - 1, &mut far);
        assert_eq!(far, [0; 4]);
        // Read-only.
        t.write(regs::CONFIG, &[0xff; 8]);
        t.read(regs::CONFIG, &mut b8);
        assert_eq!(u64::from_le_bytes(b8), 0x8765_4321);
    }

    #[test]
    fn bad_access_widths_are_ignored() {
        let mut t = transport();
        let mut b2 = [0xaau8; 2];
        t.read(regs::MAGIC, &mut b2);
        assert_eq!(b2, [0, 0]);
        let mut b4 = [0xaau8; 4];
        t.read(regs::MAGIC + 1, &mut b4);
        assert_eq!(b4, [0; 4]);
        t.write(regs::STATUS, &[1]);
        assert_eq!(r32(&mut t, regs::STATUS), 0);
        t.write(regs::STATUS, &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(r32(&mut t, regs::STATUS), 0);
        // Unknown registers.
        assert_eq!(r32(&mut t, 0x0f0), 0);
        w32(&mut t, 0x0f0, 5);
    }

    #[test]
    fn queue_notify_signals_the_queue_eventfd() {
        let mut t = transport();
        features_ok(&mut t);
        setup_all(&mut t);
        // Before activation: ignored.
        w32(&mut t, regs::QUEUE_NOTIFY, 1);
        assert!(
            t.queue_events()[1].read().is_err(),
            "no event before DRIVER_OK"
        );
        w32(&mut t, regs::STATUS, ALL_OK);
        w32(&mut t, regs::QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_events()[1].read().unwrap(), 1);
        assert!(t.queue_events()[0].read().is_err());
        // Out-of-range queue index: ignored.
        w32(&mut t, regs::QUEUE_NOTIFY, 9);
    }
}
