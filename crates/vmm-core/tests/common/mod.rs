//! Set-up shared by the tier-2 tests that boot the bare-metal test guest (snapshot.rs,
//! block.rs): a deadline, one temporary directory per test process, the lock that keeps the
//! process-wide fd/thread leak checks apart, and a VM configured to run one guest action.

use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use kiln_vmm::test_guest::{self, Action};
use kiln_vmm::VmConfig;

/// Deadline for every wait of these tests.
pub const T: Duration = Duration::from_secs(10);

/// The test process's temporary directory (the test guest binary, disks, snapshots).
pub fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap())
}

/// The leak checks count process-wide fds and threads: keep other tests out meanwhile.
pub fn serial_lock() -> MutexGuard<'static, ()> {
    static L: Mutex<()> = Mutex::new(());
    L.lock().unwrap_or_else(|p| p.into_inner())
}

/// A VM booting the test guest with `action`, with a serial ring large enough for counters.
pub fn cfg(name: &str, action: Action) -> VmConfig {
    let mut c = VmConfig::new(name, test_guest::write_to(dir().path()).unwrap());
    c.cmdline_extra = action.cmdline().into();
    c.serial_ring_bytes = 1 << 20;
    c
}
