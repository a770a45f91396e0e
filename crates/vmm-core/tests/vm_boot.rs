//! Tier 2: the VMM on the host's /dev/kvm with the bare-metal test guest
//! (boots through PVH like a vmlinux; see crates/vmm-core/test-guest/guest.S).

// Test helpers outside #[test] fns may unwrap too.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use kiln_vmm::memory::{e820_map, E820_RAM};
use kiln_vmm::test_guest::{self, Action};
use kiln_vmm::vcpu::VcpuState;
use kiln_vmm::{ExitReason, Vm, VmConfig, VmError, VmErrorKind};
use vm_memory::{Bytes, GuestAddress};

fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap())
}

fn guest() -> PathBuf {
    test_guest::write_to(dir().path()).unwrap()
}

/// The fd/thread leak test counts process-wide resources: keep other tests out meanwhile.
fn serial_lock() -> MutexGuard<'static, ()> {
    static L: Mutex<()> = Mutex::new(());
    L.lock().unwrap_or_else(|p| p.into_inner())
}

fn cfg(name: &str, action: Action) -> VmConfig {
    let mut c = VmConfig::new(name, guest());
    c.cmdline_extra = action.cmdline().into();
    c
}

const T: Duration = Duration::from_secs(10);

fn deadline() -> Instant {
    Instant::now() + T
}

#[test]
fn boots_to_ready_and_reports_shutdown() {
    let _l = serial_lock();
    let vm = Vm::start(cfg("boot", Action::Shutdown)).unwrap();
    vm.wait_for_serial(test_guest::READY, deadline()).unwrap();
    let r = vm.wait_exit(T).unwrap();
    assert_eq!(r, ExitReason::Shutdown { vcpu: 0 });
    assert!(r.is_guest_shutdown());
    assert_eq!(vm.serial_tail(100), "READY\n");
    assert!(matches!(
        vm.vcpu_states()[0],
        VcpuState::Exited(ExitReason::Shutdown { .. })
    ));
    assert_eq!(vm.stop(), ExitReason::Shutdown { vcpu: 0 });
}

#[test]
fn i8042_reset_is_an_exit_reason() {
    let _l = serial_lock();
    let vm = Vm::start(cfg("reset", Action::Reset)).unwrap();
    assert_eq!(vm.wait_exit(T).unwrap(), ExitReason::I8042Reset { vcpu: 0 });
}

#[test]
fn waiting_for_output_that_never_comes_reports_the_exit() {
    let _l = serial_lock();
    let vm = Vm::start(cfg("noline", Action::Shutdown)).unwrap();
    let e = vm.wait_for_serial("NEVER-PRINTED", deadline());
    let name = e.as_ref().err().map(|e| e.vm().to_owned());
    match e.map_err(VmError::into_kind) {
        Err(VmErrorKind::Exited {
            reason,
            serial_tail,
            ..
        }) => {
            assert_eq!(name.as_deref(), Some("noline"));
            assert_eq!(reason, ExitReason::Shutdown { vcpu: 0 });
            assert!(serial_tail.contains("READY"), "{serial_tail}");
        }
        other => panic!("expected Exited, got {other:?}"),
    }
}

#[test]
fn spinning_guest_times_out_then_stops_with_a_reason() {
    let _l = serial_lock();
    let vm = Vm::start(cfg("spin", Action::Spin)).unwrap();
    vm.wait_for_serial(test_guest::READY, deadline()).unwrap();
    let e = vm.wait_exit(Duration::from_millis(300));
    let name = e.as_ref().err().map(|e| e.vm().to_owned());
    match e.map_err(VmError::into_kind) {
        Err(VmErrorKind::Timeout { serial_tail, .. }) => {
            assert_eq!(name.as_deref(), Some("spin"));
            assert!(serial_tail.contains("READY"));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(vm.vcpu_states(), vec![VcpuState::Running]);
    // Pause kicks the vCPU out of guest mode; resume lets it spin again.
    vm.pause(T).unwrap();
    assert_eq!(vm.vcpu_states(), vec![VcpuState::Paused]);
    vm.resume();
    let ctl_deadline = deadline();
    while vm.vcpu_states() != vec![VcpuState::Running] {
        assert!(Instant::now() < ctl_deadline, "vCPU did not resume");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(vm.exit_reason(), None);
    assert_eq!(vm.stop(), ExitReason::Stopped);
}

#[test]
fn halted_smp_guest_is_stopped_out_of_kvm_run() {
    let _l = serial_lock();
    let mut c = cfg("halt", Action::Halt);
    c.vcpus = 2;
    let vm = Vm::start(c).unwrap();
    vm.wait_for_serial(test_guest::READY, deadline()).unwrap();
    assert!(vm.wait_exit(Duration::from_millis(100)).is_err());
    // vCPU 0 sits in hlt, vCPU 1 waits for INIT/SIPI: both are blocked inside KVM_RUN.
    let t = Instant::now();
    assert_eq!(vm.stop(), ExitReason::Stopped);
    assert!(t.elapsed() < T, "stop took {:?}", t.elapsed());
}

fn parse_hex(s: &str, key: &str) -> u64 {
    let v = s
        .split(key)
        .nth(1)
        .unwrap_or_else(|| panic!("{key} missing in {s:?}"))
        .split(|c: char| !c.is_ascii_hexdigit())
        .next()
        .unwrap();
    u64::from_str_radix(v, 16).unwrap()
}

#[test]
fn guest_sees_mp_table_cpus_memory_map_and_cmdline() {
    let _l = serial_lock();
    // 4608 MiB puts 1 GiB above the MMIO hole (second memory slot, e820 entry at 4 GiB).
    for (vcpus, mem_mib) in [(1u8, 32u64), (2, 128), (4, 4608), (8, 64)] {
        let mut c = cfg(&format!("info{vcpus}"), Action::Info);
        c.vcpus = vcpus;
        c.mem_mib = mem_mib;
        let vm = Vm::start(c).unwrap();
        assert_eq!(vm.wait_exit(T).unwrap(), ExitReason::Shutdown { vcpu: 0 });
        let out = vm.serial_tail(4096);
        assert!(!out.contains("ERR:"), "{out}");
        assert_eq!(parse_hex(&out, "cpus="), u64::from(vcpus), "{out}");
        let ram_kib: u64 = e820_map(mem_mib)
            .iter()
            .filter(|e| e.2 == E820_RAM)
            .map(|e| e.1)
            .sum::<u64>()
            >> 10;
        assert_eq!(parse_hex(&out, "memkib="), ram_kib, "{out}");
        assert!(
            out.contains("cmdline=console=ttyS0 reboot=t panic=-1 kiln.test=info\n"),
            "{out}"
        );
        assert_eq!(
            vm.cmdline(),
            "console=ttyS0 reboot=t panic=-1 kiln.test=info"
        );
    }
}

#[test]
fn initramfs_is_loaded_and_announced_through_pvh() {
    let _l = serial_lock();
    let initrd = dir().path().join("initrd.bin");
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&initrd, &data).unwrap();
    let mut c = cfg("initrd", Action::Halt);
    c.initramfs = Some(initrd);
    c.mem_mib = 64;
    let vm = Vm::start(c).unwrap();
    vm.wait_for_serial(test_guest::READY, deadline()).unwrap();
    let mem = vm.memory().unwrap();
    // hvm_start_info at 0x6000: nr_modules @12, modlist_paddr @16.
    let nr: u32 = mem.read_obj(GuestAddress(0x6000 + 12)).unwrap();
    let modlist: u64 = mem.read_obj(GuestAddress(0x6000 + 16)).unwrap();
    assert_eq!(nr, 1);
    let paddr: u64 = mem.read_obj(GuestAddress(modlist)).unwrap();
    let size: u64 = mem.read_obj(GuestAddress(modlist + 8)).unwrap();
    assert_eq!(size, data.len() as u64);
    assert_eq!(paddr % 4096, 0);
    assert!(paddr + size <= 64 << 20);
    let mut back = vec![0u8; data.len()];
    mem.read_slice(&mut back, GuestAddress(paddr)).unwrap();
    assert!(back == data, "initramfs bytes differ");
    vm.stop();
}

fn count_dir(p: &str) -> usize {
    std::fs::read_dir(p).unwrap().count()
}

#[test]
fn create_destroy_cycles_leave_no_fd_or_thread_behind() {
    let _l = serial_lock();
    // Warm up process-wide state (the /dev/kvm fd, the signal handler, CPUID cache).
    Vm::start(cfg("warm", Action::Shutdown)).unwrap().stop();
    let fds = count_dir("/proc/self/fd");
    let threads = count_dir("/proc/self/task");
    for i in 0..200 {
        let action = [Action::Shutdown, Action::Spin, Action::Halt][i % 3];
        let mut c = cfg(&format!("cycle{i}"), action);
        c.vcpus = 1 + (i % 3) as u8;
        let vm = Vm::start(c).unwrap();
        if i % 2 == 0 {
            vm.wait_for_serial(test_guest::READY, deadline()).unwrap();
        }
        if i % 5 == 0 {
            drop(vm);
        } else {
            vm.stop();
        }
    }
    assert_eq!(count_dir("/proc/self/fd"), fds, "fds leaked");
    assert_eq!(count_dir("/proc/self/task"), threads, "threads leaked");
}

#[test]
fn bad_configs_are_typed_errors_naming_the_problem() {
    let _l = serial_lock();
    let check = |c: VmConfig, want: &str| {
        let e = Vm::start(c).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("VM bad"), "{msg}");
        assert!(msg.contains(want), "{msg} should mention {want}");
        e.into_kind()
    };
    let base = || VmConfig::new("bad", guest());
    let mut c = base();
    c.vcpus = 0;
    assert!(matches!(check(c, "vcpus = 0"), VmErrorKind::Config { .. }));
    let mut c = base();
    c.vcpus = 9;
    assert!(matches!(check(c, "vcpus = 9"), VmErrorKind::Config { .. }));
    let mut c = base();
    c.mem_mib = 0;
    assert!(matches!(
        check(c, "mem_mib = 0"),
        VmErrorKind::Config { .. }
    ));
    let mut c = base();
    c.serial_ring_bytes = 0;
    check(c, "serial_ring_bytes");
    let mut c = base();
    c.vsock_cid = Some(2);
    check(c, "vsock_cid");
    let c = VmConfig::new("bad", "/nonexistent/vmlinux");
    assert!(matches!(
        check(c, "kernel file /nonexistent/vmlinux"),
        VmErrorKind::FileMissing { what: "kernel", .. }
    ));
    let mut c = base();
    c.initramfs = Some("/nonexistent/initrd".into());
    check(c, "initramfs file /nonexistent/initrd");
    let junk = dir().path().join("junk-kernel");
    std::fs::write(&junk, vec![0u8; 4096]).unwrap();
    assert!(matches!(
        check(VmConfig::new("bad", &junk), "junk-kernel"),
        VmErrorKind::Boot { .. }
    ));
    let mut c = base();
    c.cmdline_extra = "x".repeat(4096);
    assert!(matches!(check(c, "command line"), VmErrorKind::Boot { .. }));
}

#[test]
fn guest_mmio_reads_reach_the_device_bus() {
    let _l = serial_lock();
    // With the vsock device: the transport answers at the first slot (virtio-mmio magic
    // "virt", version 2, device id 19 = vsock).
    let mut c = cfg("mmio-dev", Action::Mmio);
    c.vsock_cid = Some(3);
    let vm = Vm::start(c).unwrap();
    assert_eq!(vm.wait_exit(T).unwrap(), ExitReason::Shutdown { vcpu: 0 });
    let out = vm.serial_tail(4096);
    assert!(
        out.contains("mmio magic=74726976 version=2 devid=13\n"),
        "{out}"
    );
    // Without a device the window reads as all-ones (unhandled access), and the VM goes on.
    let vm = Vm::start(cfg("mmio-none", Action::Mmio)).unwrap();
    assert_eq!(vm.wait_exit(T).unwrap(), ExitReason::Shutdown { vcpu: 0 });
    let out = vm.serial_tail(4096);
    assert!(
        out.contains("mmio magic=ffffffff version=ffffffff devid=ffffffff\n"),
        "{out}"
    );
}

#[test]
fn string_port_io_is_split_into_device_accesses() {
    let _l = serial_lock();
    let vm = Vm::start(cfg("outs", Action::Outs)).unwrap();
    assert_eq!(vm.wait_exit(T).unwrap(), ExitReason::Shutdown { vcpu: 0 });
    assert_eq!(vm.serial_tail(4096), "READY\nrep outsb OK\n");
}
