//! Tier 2: the vsock device wired into a real KVM VM (bare-metal test guest, which has no
//! virtio driver): MMIO window and cmdline entry, host endpoint lifetime, clean teardown.

#![allow(clippy::unwrap_used)]

use std::sync::OnceLock;
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

#[test]
fn vsock_device_is_announced_and_host_endpoint_outlives_vm() {
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
    let vm = Vm::start(cfg("vsock-info", Action::Info, Some(3))).unwrap();
    vm.wait_exit(Duration::from_secs(10)).unwrap();
    let tail = vm.serial_tail(4096);
    assert!(tail.contains("virtio_mmio.device="), "serial: {tail}");
    assert!(vm.vsock().is_some());
}

#[test]
fn no_vsock_without_cid() {
    let vm = Vm::start(cfg("vsock-none", Action::Halt, None)).unwrap();
    assert!(vm.vsock().is_none());
    assert!(!vm.cmdline().contains("virtio_mmio"));
}
