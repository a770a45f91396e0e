//! Virtio devices: the virtio-mmio transport ([`mmio`]), the virtio-vsock device ([`vsock`])
//! and the virtio-blk device ([`block`]).
//!
//! This module owns the contract between a transport and a device ([`VirtioDevice`]), the
//! interrupt line a device raises towards the guest ([`Interrupt`]), and the virtio constants
//! shared by both (device status bits, feature bits).
//!
//! Threading model: the transport is driven by vCPU threads (MMIO exits) and holds the device
//! behind an `Arc<Mutex<_>>` only for configuration work (features, config space, activation,
//! reset). Queue processing happens on the VM's device event-loop thread, woken by the
//! queue-notify EventFds (registered as KVM ioeventfds by the VM), and the device raises its
//! interrupt through an EventFd (registered as a KVM irqfd).

pub mod block;
pub mod mmio;
pub mod vsock;

/// The tier-1 mock guest; public only with the `fuzzing` feature (the fuzz/ targets).
#[cfg(any(test, feature = "fuzzing"))]
#[allow(missing_debug_implementations, clippy::new_without_default)]
pub mod testutil;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The guest memory type every virtio device works on.
pub type GuestMem = vm_memory::GuestMemoryMmap;

/// Device status bit: the guest noticed the device.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
/// Device status bit: the guest has a driver for the device.
pub const STATUS_DRIVER: u32 = 2;
/// Device status bit: the driver is set up and ready to drive the device.
pub const STATUS_DRIVER_OK: u32 = 4;
/// Device status bit: feature negotiation is complete.
pub const STATUS_FEATURES_OK: u32 = 8;
/// Device status bit: the device hit an error it cannot recover from without a reset.
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;
/// Device status bit: the guest gave up on the device.
pub const STATUS_FAILED: u32 = 0x80;

/// Feature bit: the device complies with virtio 1.x (mandatory for virtio-mmio version 2).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Feature bit: the device and driver use the `used_event`/`avail_event` suppression scheme.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Interrupt status bit: the device used a buffer in at least one virtqueue.
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: the device configuration (or status) changed.
pub const INT_CONFIG: u32 = 2;

/// The interrupt line of one virtio-mmio device: an interrupt-status word shared by the
/// transport (the guest reads and acknowledges it) and the device (which sets it), plus the
/// EventFd that injects the interrupt (a KVM irqfd on the device's GSI).
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    evt: EventFd,
}

impl Interrupt {
    /// Create an interrupt line with a fresh non-blocking EventFd.
    pub fn new() -> io::Result<Arc<Self>> {
        Ok(Self::with_eventfd(EventFd::new(EFD_NONBLOCK)?))
    }

    /// Create an interrupt line raising `evt` (e.g. an EventFd already registered as irqfd).
    pub fn with_eventfd(evt: EventFd) -> Arc<Self> {
        Arc::new(Interrupt {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            evt,
        })
    }

    /// The EventFd to register as an irqfd on the device's GSI.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Current interrupt status (`INT_VRING` / `INT_CONFIG` bits).
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// The guest acknowledged the given interrupt-status bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Raise the used-buffer interrupt.
    pub fn signal_used_queue(&self) {
        self.raise(INT_VRING);
    }

    /// Raise the configuration-change interrupt.
    pub fn signal_config(&self) {
        self.raise(INT_CONFIG);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::AcqRel);
        if let Err(e) = self.evt.write(1) {
            tracing::warn!(error = %e, "virtio: failed to signal the interrupt eventfd");
        }
    }

    /// The device hit an unrecoverable guest error: report DEVICE_NEEDS_RESET in the status
    /// register and raise a configuration interrupt so the driver notices.
    pub fn set_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::AcqRel) {
            self.signal_config();
        }
    }

    /// Whether the device asked for a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// Restore interrupt status and the needs-reset flag (snapshot restore; no injection).
    pub fn restore(&self, status: u32, needs_reset: bool) {
        self.status.store(status, Ordering::Release);
        self.needs_reset.store(needs_reset, Ordering::Release);
    }

    /// Clear everything on device reset.
    pub fn reset(&self) {
        self.status.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
    }
}

/// Why a device refused activation.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver handed over the wrong number of queues.
    #[error("{device}: expected {expected} queues, got {got}")]
    QueueCount {
        /// Device name.
        device: &'static str,
        /// Queues the device has.
        expected: usize,
        /// Queues handed over.
        got: usize,
    },
    /// The device was already active.
    #[error("{device}: already activated")]
    AlreadyActive {
        /// Device name.
        device: &'static str,
    },
}

/// What a virtio device offers a transport.
pub trait VirtioDevice: Send {
    /// Virtio device id (19 for vsock).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers.
    fn avail_features(&self) -> u64;
    /// Read device configuration space at `offset`; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write device configuration space (devices may ignore writes).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// EventFds the device waits on for each queue's notification (clones; same order as
    /// `queue_max_sizes`). The VM registers them as ioeventfds; the transport signals them on
    /// a trapped QueueNotify write.
    fn queue_events(&self) -> io::Result<Vec<EventFd>>;
    /// The device's interrupt line.
    fn interrupt(&self) -> Arc<Interrupt>;
    /// The driver set DRIVER_OK: start processing with these validated queues.
    fn activate(
        &mut self,
        mem: GuestMem,
        queues: Vec<Queue>,
        acked_features: u64,
    ) -> Result<(), ActivateError>;
    /// The driver wrote 0 to the status register: drop all queue state.
    fn reset(&mut self);
    /// Next avail (= next used, at rest) index of each queue while active (snapshots).
    fn queue_next_indices(&self) -> Option<Vec<u16>>;
}
