//! VM snapshots: save a paused VM to a directory and build new VMs from it.
//!
//! A snapshot directory holds two files:
//! - [`STATE_FILE`] (`vm.state`): header (magic, format version, Kiln version, KVM kind, CPU
//!   vendor, SHA-256) and the [`state::VmSnapshot`] payload — vCPU registers, LAPIC, MSRs,
//!   events, irqchips, PIT, clock, serial and virtio-mmio registers ([`format`]);
//! - [`MEMORY_FILE`] (`memory.bin`): guest RAM after a header page, zero pages left as
//!   holes ([`memory_file`]).
//!
//! [`crate::Vm::snapshot`] pauses the vCPUs, completes pending I/O, reads all state inside
//! the vCPU threads, locks the devices, writes memory then state (the state file is written
//! to a temporary name and renamed, so a crash never leaves a state file without its memory
//! file) and resumes. [`crate::Vm::restore`] validates everything first ([`load`]), then maps
//! the memory file `MAP_PRIVATE`, creates the VM, loads the state, sends the vsock
//! TRANSPORT_RESET and starts the vCPUs. See docs/SNAPSHOT.md.

pub mod format;
pub mod kvm_state;
pub mod memory_file;
pub mod state;

use std::path::{Path, PathBuf};
use std::time::Duration;

/// A restore prepared ahead of time ([`crate::Vm::prepare_restore`]).
pub use crate::vm::PreparedRestore;
pub use format::{FormatError, KvmKind};
pub use kvm_state::KvmStateError;
pub use memory_file::MemFileError;
pub use state::VmSnapshot;

/// Name of the state file inside a snapshot directory.
pub const STATE_FILE: &str = "vm.state";
/// Name of the memory file inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory.bin";
/// How long snapshotting waits for the vCPUs to park or answer.
pub const VCPU_TIMEOUT: Duration = Duration::from_secs(5);

/// An error of [`crate::Vm::snapshot`] or a restore ([`crate::Vm::restore`] and friends): the
/// VM's name, added here and nowhere below, and what failed ([`SnapshotErrorKind`], causes
/// kept as [`source`](std::error::Error::source)s). Displays as `VM <name>: <kind>`; a layer
/// above that names the VM itself (a sandbox) wraps [`kind`](Self::kind) instead.
#[derive(Debug, thiserror::Error)]
#[error("VM {vm}: {kind}")]
pub struct SnapshotError {
    vm: String,
    #[source]
    kind: SnapshotErrorKind,
}

impl SnapshotError {
    /// `kind` of the VM called `vm`.
    pub fn new(vm: impl Into<String>, kind: SnapshotErrorKind) -> Self {
        Self {
            vm: vm.into(),
            kind,
        }
    }

    /// The VM's name.
    pub fn vm(&self) -> &str {
        &self.vm
    }

    /// What failed.
    pub fn kind(&self) -> &SnapshotErrorKind {
        &self.kind
    }

    /// What failed, without the VM's name (for a caller that names the VM itself).
    pub fn into_kind(self) -> SnapshotErrorKind {
        self.kind
    }
}

/// What failed creating or restoring a snapshot (the VM is named once, by
/// [`SnapshotError`]); file errors say which file.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotErrorKind {
    /// A file or directory operation failed.
    #[error("snapshot {path}: {op}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The state file was refused (foreign version or KVM kind, truncated, corrupted).
    #[error("snapshot state file {path}: {source}")]
    StateFile {
        /// The state file.
        path: PathBuf,
        /// Why.
        #[source]
        source: FormatError,
    },
    /// The memory file was refused or could not be written / mapped.
    #[error(transparent)]
    MemoryFile(#[from] MemFileError),
    /// This host has no usable KVM.
    #[error("snapshot: this host has no usable KVM")]
    NoKvm,
    /// Reading or loading KVM state failed.
    #[error("snapshot {what}: {source}")]
    KvmState {
        /// vCPU n, or "VM state".
        what: String,
        /// Cause.
        #[source]
        source: KvmStateError,
    },
    /// Building or driving the VM failed.
    #[error(transparent)]
    Vm(#[from] crate::vm::VmErrorKind),
    /// The VM cannot be snapshotted in its current state.
    #[error("cannot snapshot: {what}")]
    NotSnapshottable {
        /// Why.
        what: String,
    },
    /// A disk's backing file could not be identified, or changed since the snapshot.
    #[error("snapshot disk {index}: {source}")]
    Disk {
        /// Position of the disk.
        index: usize,
        /// Cause.
        #[source]
        source: Box<crate::virtio::block::BlockError>,
    },
    /// A live fork was asked of a VM with a read-write disk (children would share and
    /// corrupt it; give them read-only disks).
    #[error("cannot fork: disk {index} ({path}) is read-write; only read-only disks are shared with children")]
    ReadWriteDisk {
        /// Position of the disk.
        index: usize,
        /// Its backing file.
        path: PathBuf,
    },
    /// Freezing or mapping a live fork's memory layers failed.
    #[error(transparent)]
    ForkMemory(crate::fork::ForkMemError),
    /// A device's saved state does not fit the device being restored.
    #[error("restore device {device}: {what}")]
    Device {
        /// Device.
        device: &'static str,
        /// What is wrong.
        what: String,
    },
    /// A device refused its saved state, or could not be set up for the restored guest.
    #[error("restore device {device}: {source}")]
    DeviceRestore {
        /// Device.
        device: &'static str,
        /// Cause (the device's own error type).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl SnapshotErrorKind {
    /// Device `device` failed with `source` while being restored (for `map_err`).
    pub fn device_restore<E: std::error::Error + Send + Sync + 'static>(
        device: &'static str,
    ) -> impl FnOnce(E) -> Self {
        move |source| Self::DeviceRestore {
            device,
            source: Box::new(source),
        }
    }
}

/// What [`crate::Vm::snapshot`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// Size of the state file.
    pub state_bytes: u64,
    /// Guest RAM size (the memory file's apparent size minus its header page).
    pub guest_bytes: u64,
    /// Bytes of guest RAM actually written (non-zero pages).
    pub written_bytes: u64,
    /// How long the vCPUs were paused for the snapshot.
    pub paused_for: Duration,
}

/// How a VM restored from a snapshot is set up; everything else comes from the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreConfig {
    /// Name of the new VM (thread names, logs, errors).
    pub name: String,
    /// Bytes of serial output kept.
    pub serial_ring_bytes: usize,
    /// Also log guest serial lines through `tracing`.
    pub serial_log: bool,
    /// A different guest CID for the vsock device (the guest re-reads it on the
    /// TRANSPORT_RESET sent at restore); `None` keeps the snapshot's.
    pub vsock_cid: Option<u64>,
    /// seccomp filters on the restored VM's threads (default: `$KILN_SECCOMP`).
    pub seccomp: crate::seccomp::SeccompMode,
}

impl RestoreConfig {
    /// Defaults for a VM called `name` (64 KiB serial ring, snapshot's CID).
    pub fn new(name: impl Into<String>) -> Self {
        RestoreConfig {
            name: name.into(),
            serial_ring_bytes: 64 * 1024,
            serial_log: false,
            vsock_cid: None,
            seccomp: crate::seccomp::SeccompMode::from_env(),
        }
    }
}

/// Paths of the two files of the snapshot in `dir`.
pub fn paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join(STATE_FILE), dir.join(MEMORY_FILE))
}

/// The origin this process requires of state files (errors without KVM).
pub fn current_origin() -> Result<format::Origin, SnapshotErrorKind> {
    let kind = KvmKind::current().ok_or(SnapshotErrorKind::NoKvm)?;
    Ok(format::Origin::current(kind))
}

/// Reads and fully checks the state file in `dir` against this host (version, KVM kind, CPU
/// vendor, length, checksum, payload bounds). Creates nothing.
pub fn load(dir: &Path) -> Result<VmSnapshot, SnapshotErrorKind> {
    let origin = current_origin()?;
    load_with_origin(dir, &origin)
}

/// [`load`] against an explicit origin (tests, tools).
pub fn load_with_origin(
    dir: &Path,
    origin: &format::Origin,
) -> Result<VmSnapshot, SnapshotErrorKind> {
    let (state_path, _) = paths(dir);
    let bytes = read_bounded(&state_path)?;
    format::decode(&bytes, origin).map_err(|source| SnapshotErrorKind::StateFile {
        path: state_path,
        source,
    })
}

/// Reads a state file, refusing files larger than any valid one.
fn read_bounded(path: &Path) -> Result<Vec<u8>, SnapshotErrorKind> {
    use std::io::Read;
    let io = |op| {
        move |source| SnapshotErrorKind::Io {
            path: path.to_owned(),
            op,
            source,
        }
    };
    let f = std::fs::File::open(path).map_err(io("open"))?;
    let limit = format::HEADER_LEN as u64 + format::MAX_PAYLOAD + 1;
    let mut buf = Vec::with_capacity(64 * 1024);
    f.take(limit).read_to_end(&mut buf).map_err(io("read"))?;
    if buf.len() as u64 == limit {
        return Err(SnapshotErrorKind::StateFile {
            path: path.to_owned(),
            source: FormatError::TooLarge {
                len: buf.len() as u64,
            },
        });
    }
    Ok(buf)
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SnapshotErrorKind> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let io = |op, p: &Path| {
        let p = p.to_owned();
        move |source| SnapshotErrorKind::Io {
            path: p,
            op,
            source,
        }
    };
    std::fs::write(&tmp, bytes).map_err(io("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename", path))
}

/// A fresh random snapshot id.
pub fn new_snapshot_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    // getrandom never fails for 16 bytes on Linux >= 3.17 once the pool is initialised; fall
    // back to time and pid otherwise (the id only has to differ between snapshots).
    // SAFETY: `id` is a valid writable buffer of 16 bytes.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != 16 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        id[..16].copy_from_slice(&(t ^ u128::from(std::process::id())).to_le_bytes());
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_files_are_bounded_and_written_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(STATE_FILE);
        write_atomic(&p, b"hello").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"hello");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(format::MAX_PAYLOAD + 4096).unwrap();
        assert!(matches!(
            read_bounded(&p),
            Err(SnapshotErrorKind::StateFile {
                source: FormatError::TooLarge { .. },
                ..
            })
        ));
        let e = load_with_origin(
            &dir.path().join("nope"),
            &format::Origin::current(KvmKind::Pvm),
        )
        .unwrap_err();
        assert!(matches!(e, SnapshotErrorKind::Io { op: "open", .. }), "{e}");
        assert_ne!(new_snapshot_id(), new_snapshot_id());
    }
}
