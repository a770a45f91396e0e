//! The virtio-blk device (virtio device id 2): disks backed by host files.
//!
//! - [`device`]: [`BlockDevice`], the virtio device: one request queue, request parsing and
//!   the positioned I/O on the backing file, activation and reset, the event-loop subscriber.
//! - [`attach`]: wiring a VM's disks (MMIO windows, irqfds, ioeventfds, the block I/O thread,
//!   the `virtio_mmio.device=` command-line entries).
//!
//! This module owns the disk configuration ([`DiskConfig`]), the error type ([`BlockError`])
//! and what a snapshot records about a disk ([`BlockSnapshot`], [`DiskIdentity`]).
//! See docs/VMM.md ("virtio-blk") for the request rules and docs/SNAPSHOT.md for the state.

pub mod attach;
pub mod device;

#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use device::{BlockDevice, BlockStats};

use crate::snapshot::state::MmioSnapshot;

/// Virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Size of the request queue the device offers.
pub const QUEUE_MAX_SIZE: u16 = 256;
/// Sector size of the virtio-blk protocol (capacity and `sector` are in these units).
pub const SECTOR_SIZE: u64 = 512;
/// Most data segments per request (advertised as `seg_max`).
pub const SEG_MAX: u32 = 126;
/// Largest data segment (advertised as `size_max`).
pub const SIZE_MAX: u32 = 64 * 1024;
/// Most data bytes in one request: what a driver honouring `seg_max` / `size_max` can send.
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Most descriptors in one request chain: header, `SEG_MAX` data segments, status. Longer
/// chains (including looping ones, which the queue cuts at the queue size) are refused.
pub const MAX_CHAIN_DESCS: usize = SEG_MAX as usize + 2;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;
/// Most disks per VM.
pub const MAX_DISKS: usize = 8;

/// Feature bit: `size_max` in the config space is valid.
pub const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
/// Feature bit: `seg_max` in the config space is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// Feature bit: the disk is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// Feature bit: the device accepts FLUSH.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

/// Request type: read (device writes the data).
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Request type: write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Request type: flush the write cache.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Request type: device id string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: the request failed.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: the request type is not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// One disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Backing file (a regular file; its size, rounded down to 512 bytes, is the capacity).
    pub path: PathBuf,
    /// Open the file read-only, advertise VIRTIO_BLK_F_RO and refuse writes.
    pub read_only: bool,
    /// What GET_ID answers (at most 20 bytes, printable ASCII); `None`: `kiln-disk<index>`.
    pub id: Option<String>,
    /// Record the file's SHA-256 in snapshots and check it on restore (reads the whole file
    /// both times), besides the size and mtime that are always checked.
    pub verify_hash: bool,
}

impl DiskConfig {
    /// A disk backed by `path`, read-only or read-write, with the default id.
    pub fn new(path: impl Into<PathBuf>, read_only: bool) -> Self {
        DiskConfig {
            path: path.into(),
            read_only,
            id: None,
            verify_hash: false,
        }
    }

    /// Checks the id; the message says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(id) = &self.id {
            if id.len() > ID_BYTES || !id.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
                return Err(format!(
                    "disk id {id:?} must be at most {ID_BYTES} printable ASCII characters"
                ));
            }
        }
        Ok(())
    }

    /// The GET_ID answer for the disk at `index`: the id NUL-padded to 20 bytes.
    pub fn id_bytes(&self, index: usize) -> [u8; ID_BYTES] {
        let s = self
            .id
            .clone()
            .unwrap_or_else(|| format!("kiln-disk{index}"));
        let mut out = [0u8; ID_BYTES];
        for (o, b) in out.iter_mut().zip(s.bytes()) {
            *o = b;
        }
        out
    }
}

/// What identifies a backing file's content for a snapshot: a restore refuses a file whose
/// identity differs from the recorded one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskIdentity {
    /// File size in bytes.
    pub size: u64,
    /// Modification time, seconds since the epoch.
    pub mtime_sec: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: i64,
    /// SHA-256 of the whole file, when the disk has `verify_hash`.
    pub sha256: Option<[u8; 32]>,
}

/// A disk as a snapshot stores it: configuration, backing identity, place and transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockSnapshot {
    /// Backing file path (reopened on restore).
    pub path: PathBuf,
    /// Read-only disk.
    pub read_only: bool,
    /// GET_ID string as configured (`None`: the default).
    pub id: Option<String>,
    /// Capacity in 512-byte sectors the guest saw.
    pub capacity: u64,
    /// The backing file when the snapshot was taken.
    pub backing: DiskIdentity,
    /// MMIO window base.
    pub mmio_base: u64,
    /// GSI.
    pub gsi: u32,
    /// Transport registers and queue position.
    pub transport: MmioSnapshot,
}

impl BlockSnapshot {
    /// The disk configuration a restore reopens.
    pub fn disk_config(&self) -> DiskConfig {
        DiskConfig {
            path: self.path.clone(),
            read_only: self.read_only,
            id: self.id.clone(),
            verify_hash: self.backing.sha256.is_some(),
        }
    }

    /// Bounds a restore relies on; the message says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        self.disk_config().validate()?;
        if self.path.as_os_str().len() > crate::snapshot::state::MAX_STRING {
            return Err("disk path too long".into());
        }
        if self.transport.queues.len() != 1 {
            return Err(format!(
                "block transport has {} queues",
                self.transport.queues.len()
            ));
        }
        if !(crate::memory::MMIO_START..crate::memory::MMIO_DEVICES_END).contains(&self.mmio_base)
            || !(crate::vm::FIRST_DEVICE_GSI..=crate::vm::LAST_DEVICE_GSI).contains(&self.gsi)
        {
            return Err(format!(
                "disk window {:#x} / GSI {} outside the device ranges",
                self.mmio_base, self.gsi
            ));
        }
        Ok(())
    }
}

/// Errors of the virtio-blk device. Each names the backing file where there is one.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The backing file could not be opened.
    #[error("cannot open backing file {path} ({mode}): {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// "read-only" or "read-write".
        mode: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The backing file is not a regular file.
    #[error("backing file {path} is not a regular file")]
    NotAFile {
        /// The file.
        path: PathBuf,
    },
    /// Reading the backing file's metadata or content (for its identity) failed.
    #[error("backing file {path}: {op}: {source}")]
    Backing {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A restore found the backing file changed since the snapshot.
    #[error("backing file {path} changed since the snapshot: {what} was {saved}, is {found}")]
    BackingChanged {
        /// The file.
        path: PathBuf,
        /// "size", "mtime" or "sha256".
        what: &'static str,
        /// Recorded value.
        saved: String,
        /// Current value.
        found: String,
    },
    /// Invalid disk configuration.
    #[error("invalid disk configuration: {0}")]
    Config(String),
    /// Creating an EventFd or the I/O thread failed.
    #[error("{what}: {source}")]
    Os {
        /// What was being created.
        what: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
}
