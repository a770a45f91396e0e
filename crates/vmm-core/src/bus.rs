//! Address-range dispatch for guest MMIO and port I/O exits.
//!
//! A device registers a `[base, base + len)` range on a [`Bus`] and implements [`BusDevice`]
//! (alias [`MmioDevice`]). vCPU threads look the exit address up and call the device with the
//! offset inside its range. Accesses that hit no device read as all-ones and are ignored on
//! write, as on real hardware; they are counted so tests and diagnostics can see them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A device on the MMIO or PIO bus. Called from vCPU threads, so it must be `Send`; the bus
/// serialises calls to one device with its mutex.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset` inside the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset` inside the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// The MMIO name of [`BusDevice`] (virtio-mmio devices implement this).
pub use self::BusDevice as MmioDevice;

/// A shared, lockable device as stored on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors from bus registration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range is empty or wraps around the address space.
    #[error("bus range {base:#x}+{len:#x} is empty or overflows")]
    BadRange {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// The new range overlaps a device already registered.
    #[error("bus range {base:#x}+{len:#x} overlaps the device at {other_base:#x}+{other_len:#x}")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
        /// Start of the existing range.
        other_base: u64,
        /// Length of the existing range.
        other_len: u64,
    },
}

#[derive(Clone)]
struct Entry {
    base: u64,
    len: u64,
    dev: SharedDevice,
}

/// A sorted set of non-overlapping device ranges.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
    unhandled: AtomicU64,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<(u64, u64)> = self.entries.iter().map(|e| (e.base, e.len)).collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `dev` for `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, dev: SharedDevice) -> Result<(), BusError> {
        let end = match base.checked_add(len) {
            Some(end) if len > 0 => end,
            _ => return Err(BusError::BadRange { base, len }),
        };
        if let Some(e) = self
            .entries
            .iter()
            .find(|e| base < e.base + e.len && e.base < end)
        {
            return Err(BusError::Overlap {
                base,
                len,
                other_base: e.base,
                other_len: e.len,
            });
        }
        let pos = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(pos, Entry { base, len, dev });
        Ok(())
    }

    /// The device covering `addr` and the offset of `addr` inside its range.
    fn find(&self, addr: u64) -> Option<(&Entry, u64)> {
        let idx = self.entries.partition_point(|e| e.base <= addr);
        let e = self.entries.get(idx.checked_sub(1)?)?;
        let off = addr - e.base;
        (off < e.len).then_some((e, off))
    }

    /// Dispatches a guest read; returns false (and fills `data` with 0xff) if no device
    /// covers `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((e, off)) => {
                lock(&e.dev).read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                self.unhandled.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Dispatches a guest write; returns false if no device covers `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((e, off)) => {
                lock(&e.dev).write(off, data);
                true
            }
            None => {
                self.unhandled.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// How many accesses hit no device so far.
    pub fn unhandled_count(&self) -> u64 {
        self.unhandled.load(Ordering::Relaxed)
    }
}

/// Locks a device; a device whose previous user panicked is still used (its state is plain
/// register state, and refusing would wedge the vCPU).
fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    kiln_sync::lock(dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Rec {
        writes: Vec<(u64, Vec<u8>)>,
    }
    impl BusDevice for Rec {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlap() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Rec::default()));
        let b = Arc::new(Mutex::new(Rec::default()));
        bus.insert(0x1000, 0x100, a.clone()).unwrap();
        bus.insert(0x3000, 0x1000, b.clone()).unwrap();
        assert!(matches!(
            bus.insert(0x10ff, 2, b.clone()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0x2fff, 2, b.clone()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, b.clone()),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(5, 0, b.clone()),
            Err(BusError::BadRange { .. })
        ));
        bus.insert(0x1100, 0x10, b.clone()).unwrap();

        let mut d = [0u8; 4];
        assert!(bus.read(0x1004, &mut d));
        assert_eq!(d, [4; 4]);
        assert!(bus.write(0x3ff0, &[1, 2]));
        assert_eq!(b.lock().unwrap().writes, vec![(0xff0, vec![1, 2])]);
        assert!(!bus.read(0x1200, &mut d));
        assert_eq!(d, [0xff; 4]);
        assert!(!bus.write(0x4000, &[1]));
        assert!(!bus.write(0xfff, &[1]));
        assert_eq!(bus.unhandled_count(), 3);
        assert!(a.lock().unwrap().writes.is_empty());
    }
}
