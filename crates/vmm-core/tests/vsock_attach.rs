//! Tier 2: the vsock device wired into a real KVM VM (bare-metal test guest, which has no
//! virtio driver): MMIO window and cmdline entry, host endpoint lifetime, clean teardown.

#![allow(clippy::unwrap_used)]

use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use kiln_vmm::test_guest::{self, Action};
use kiln_vmm::virtio::vsock::VsockError;
use kiln_vmm::{Vm, VmConfig};

fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap())
}

fn cfg(name: &str, action: Action, cid: Option<u64>) -> VmConfig {
    let mut c = VmConfig::new(name, test_guest::write_to(dir().path()).unwrap());
    c.cmdline_extra = action.cmdline().into();
    c.vsock_cid = cid;
    c
}

/// The leak test counts process-wide fds and threads: keep the other tests out meanwhile.
fn serial() -> MutexGuard<'static, ()> {
    static L: Mutex<()> = Mutex::new(());
    L.lock().unwrap_or_else(|p| p.into_inner())
}

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

#[test]
fn create_destroy_cycles_with_vsock_leave_nothing_behind() {
    let _l = serial();
    let cycle = |i: usize| {
        let vm = Vm::start(cfg(&format!("vsock-cycle-{i}"), Action::Halt, Some(3))).unwrap();
        let host = vm.vsock().unwrap().clone();
        let l = host.listen(1024).unwrap();
        drop(vm);
        assert!(matches!(
            l.accept(Duration::from_secs(1)),
            Err(VsockError::DeviceGone { .. })
        ));
    };
    cycle(0); // warm-up: lazily created process-wide state
    let (f0, t0) = (fds(), threads());
    for i in 1..=30 {
        cycle(i);
    }
    assert_eq!(fds(), f0, "fds leaked");
    assert_eq!(threads(), t0, "threads leaked");
}

#[test]
fn vsock_device_is_announced_and_host_endpoint_outlives_vm() {
    let _l = serial();
    let vm = Vm::start(cfg("vsock-attach", Action::Halt, Some(7))).unwrap();
    assert!(
        vm.cmdline().contains("virtio_mmio.device=4K@0x"),
        "cmdline: {}",
        vm.cmdline()
    );
    let host = vm.vsock().expect("vsock host endpoint").clone();
    assert_eq!(host.guest_cid(), 7);
    vm.wait_for_serial(test_guest::READY, Instant::now() + Duration::from_secs(10))
        .unwrap();
    // No driver in this guest: the connect must honour its deadline.
    let t0 = Instant::now();
    let r = host.connect(5000, Duration::from_millis(100));
    assert!(matches!(r, Err(VsockError::ConnectTimeout { .. })), "{r:?}");
    assert!(t0.elapsed() < Duration::from_secs(2));
    let l = host.listen(1024).unwrap();
    vm.stop();
    // The device is gone with the VM; handles fail fast instead of hanging.
    assert!(matches!(
        host.connect(5000, Duration::from_secs(5)),
        Err(VsockError::DeviceGone { cid: 7 })
    ));
    assert!(matches!(
        l.accept(Duration::from_secs(5)),
        Err(VsockError::DeviceGone { .. })
    ));
}

#[test]
fn guest_sees_the_virtio_mmio_cmdline_entry() {
    let _l = serial();
    let vm = Vm::start(cfg("vsock-info", Action::Info, Some(3))).unwrap();
    vm.wait_exit(Duration::from_secs(10)).unwrap();
    let tail = vm.serial_tail(4096);
    assert!(tail.contains("virtio_mmio.device="), "serial: {tail}");
    assert!(vm.vsock().is_some());
}

#[test]
fn no_vsock_without_cid() {
    let _l = serial();
    let vm = Vm::start(cfg("vsock-none", Action::Halt, None)).unwrap();
    assert!(vm.vsock().is_none());
    assert!(!vm.cmdline().contains("virtio_mmio"));
}
