//! Set-up shared by the tier-2 tests that boot the bare-metal test guest (snapshot.rs,
//! block.rs, fork.rs): a deadline, one temporary directory per test process, the lock that keeps the
//! process-wide fd/thread leak checks apart, and a VM configured to run one guest action.

use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use kiln_vmm::test_guest::{self, counter_values, Action};
use kiln_vmm::{Vm, VmConfig};

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

/// Waits (up to `wait`) until the guest printed a complete counter line >= `min`; returns
/// every counter value printed so far. Fails the test at the deadline or if the VM ended.
#[allow(dead_code)] // not every test file that includes this module waits on a counter
pub fn wait_counter_for(vm: &Vm, min: u64, wait: Duration) -> Vec<u64> {
    let deadline = Instant::now() + wait;
    loop {
        let v = counter_values(&vm.serial_tail(1 << 20));
        if v.last().is_some_and(|&l| l >= min) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{}: no counter >= {min}; serial: {}",
            vm.name(),
            vm.serial_tail(400)
        );
        assert!(
            vm.exit_reason().is_none(),
            "{}: {:?}: {}",
            vm.name(),
            vm.exit_reason(),
            vm.serial_tail(400)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// [`wait_counter_for`] with the tests' deadline [`T`].
#[allow(dead_code)] // not every test file that includes this module waits on a counter
pub fn wait_counter(vm: &Vm, min: u64) -> Vec<u64> {
    wait_counter_for(vm, min, T)
}
