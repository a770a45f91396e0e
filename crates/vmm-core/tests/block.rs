//! Tier 2: virtio-blk disks attached to a real KVM VM with the bare-metal test guest: their
//! windows and command-line entries, the block I/O thread, typed errors for bad disks,
//! snapshot/restore reopening the backing files and refusing changed ones, and no fd or
//! thread left behind. (The guest does not drive the disks; request handling is tier 1,
//! a Linux guest reading a disk is tier 4.)

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_vmm::snapshot::{self, RestoreConfig, SnapshotError, SnapshotErrorKind};
use kiln_vmm::test_guest::{self, counter_values, Action};
use kiln_vmm::virtio::block::{BlockError, DiskConfig};
use kiln_vmm::{ExitReason, Vm, VmError, VmErrorKind};

mod common;
use common::{cfg, dir, serial_lock, T};

/// A backing file of `len` bytes of `byte`.
fn disk(name: &str, len: usize, byte: u8) -> PathBuf {
    let p = dir().path().join(name);
    std::fs::write(&p, vec![byte; len]).unwrap();
    p
}

fn count_dir(p: &str) -> usize {
    std::fs::read_dir(p).unwrap().count()
}

fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .map(|s| s.trim().to_owned())
        .collect()
}

fn wait_counter(vm: &Vm, min: u64) -> u64 {
    let deadline = Instant::now() + T;
    loop {
        if let Some(&l) = counter_values(&vm.serial_tail(1 << 20)).last() {
            if l >= min {
                return l;
            }
        }
        assert!(Instant::now() < deadline, "{}", vm.serial_tail(400));
        assert!(vm.exit_reason().is_none(), "{}", vm.serial_tail(400));
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn disks_get_windows_after_vsock_and_an_io_thread() {
    let _l = serial_lock();
    let a = disk("win-a.img", 1 << 20, 1);
    let b = disk("win-b.img", 4096, 2);
    // Without vsock the first window is disk 0: the guest reads virtio-blk's device id.
    let mut c = cfg("blk-mmio", Action::Mmio);
    c.disks = vec![DiskConfig::new(&a, false), DiskConfig::new(&b, true)];
    let vm = Vm::start(c).unwrap();
    assert!(
        vm.cmdline()
            .contains("virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"),
        "{}",
        vm.cmdline()
    );
    assert_eq!(vm.wait_exit(T).unwrap(), ExitReason::Shutdown { vcpu: 0 });
    let out = vm.serial_tail(4096);
    assert!(
        out.contains("mmio magic=74726976 version=2 devid=2\n"),
        "{out}"
    );
    vm.stop();

    // With vsock: vsock keeps the first window, the disks follow; one block thread.
    let mut c = cfg("blkv", Action::Spin);
    c.vsock_cid = Some(3);
    c.disks = vec![DiskConfig::new(&a, false), DiskConfig::new(&b, true)];
    let vm = Vm::start(c).unwrap();
    assert!(
        vm.cmdline().contains(
            "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 \
             virtio_mmio.device=4K@0xd0002000:7"
        ),
        "{}",
        vm.cmdline()
    );
    // A new thread names itself when it first runs (std sets the name on the thread), so
    // wait for that rather than read the names right after `Vm::start` returns.
    let deadline = Instant::now() + T;
    let names = loop {
        let names = thread_names();
        if names.iter().any(|n| n == "blkv-blk") || Instant::now() > deadline {
            break names;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(
        names.iter().filter(|n| *n == "blkv-blk").count(),
        1,
        "{names:?}"
    );
    assert_eq!(vm.disk_stats().len(), 2);
    vm.stop();
    assert!(!thread_names().iter().any(|n| n == "blkv-blk"));
}

#[test]
fn bad_disks_are_typed_errors() {
    let _l = serial_lock();
    let ok = disk("ok.img", 4096, 0);
    let mut c = cfg("bad", Action::Shutdown);
    c.disks = vec![
        DiskConfig::new(&ok, true),
        DiskConfig::new("/nonexistent/disk.img", false),
    ];
    let e = Vm::start(c).unwrap_err();
    match e.kind() {
        VmErrorKind::Disk {
            index: 1, source, ..
        } => {
            assert!(matches!(**source, BlockError::Open { .. }), "{e}")
        }
        _ => panic!("{e}"),
    }
    assert!(e.to_string().contains("/nonexistent/disk.img"), "{e}");

    let mut c = cfg("bad", Action::Shutdown);
    c.disks = vec![DiskConfig::new(&ok, true); 9];
    assert!(matches!(
        Vm::start(c).map_err(VmError::into_kind),
        Err(VmErrorKind::Config { .. })
    ));
    let mut c = cfg("bad", Action::Shutdown);
    let mut d = DiskConfig::new(&ok, true);
    d.id = Some("much-too-long-for-a-virtio-id".into());
    c.disks = vec![d];
    let e = Vm::start(c).unwrap_err();
    assert!(e.to_string().contains("disk 0"), "{e}");
}

fn disk_snapshot(name: &str, disks: Vec<DiskConfig>, dir: &Path) {
    let mut c = cfg(name, Action::Count);
    c.disks = disks;
    let vm = Vm::start(c).unwrap();
    wait_counter(&vm, 3);
    vm.snapshot(dir).unwrap();
    vm.stop();
}

fn disk_error(r: Result<Vm, SnapshotError>) -> (usize, BlockError) {
    match r.map_err(SnapshotError::into_kind) {
        Err(SnapshotErrorKind::Disk { index, source, .. }) => (index, *source),
        Err(e) => panic!("expected a disk error, got {e}"),
        Ok(_) => panic!("restore succeeded"),
    }
}

#[test]
fn restore_reopens_the_disks_and_refuses_changed_ones() {
    let _l = serial_lock();
    let rw = disk("snap-rw.img", 1 << 20, 1);
    let ro = disk("snap-ro.img", 64 << 10, 2);
    let d = dir().path().join("snap");
    let mut hashed = DiskConfig::new(&ro, true);
    hashed.verify_hash = true;
    hashed.id = Some("ro-disk".into());
    disk_snapshot("snapblk", vec![DiskConfig::new(&rw, false), hashed], &d);

    let s = snapshot::load(&d).unwrap();
    assert_eq!(s.blocks.len(), 2);
    assert_eq!(
        (s.blocks[0].path.as_path(), s.blocks[0].read_only),
        (rw.as_path(), false)
    );
    assert_eq!(
        (s.blocks[1].path.as_path(), s.blocks[1].read_only),
        (ro.as_path(), true)
    );
    assert_eq!(s.blocks[0].backing.size, 1 << 20);
    assert_eq!(s.blocks[0].capacity, 2048);
    assert!(s.blocks[0].backing.sha256.is_none());
    assert!(s.blocks[1].backing.sha256.is_some());
    assert_eq!(s.blocks[1].id.as_deref(), Some("ro-disk"));
    assert_eq!((s.blocks[0].gsi, s.blocks[1].gsi), (5, 6));

    // Unchanged files: the restore works and the guest continues.
    let vm = Vm::restore(&d, RestoreConfig::new("snapblk-r")).unwrap();
    let c = wait_counter(&vm, 0);
    wait_counter(&vm, c + 2);
    assert_eq!(vm.disk_stats().len(), 2);
    assert!(vm.cmdline().contains("0xd0001000:6"));
    vm.stop();

    let fds = count_dir("/proc/self/fd");
    let threads = count_dir("/proc/self/task");
    // A touched read-write disk (same size, new mtime).
    let f = std::fs::OpenOptions::new().write(true).open(&rw).unwrap();
    let old = f.metadata().unwrap().modified().unwrap();
    f.set_modified(old + Duration::from_secs(5)).unwrap();
    let (i, e) = disk_error(Vm::restore(&d, RestoreConfig::new("r1")));
    assert_eq!(i, 0);
    assert!(
        matches!(e, BlockError::BackingChanged { what: "mtime", .. }),
        "{e}"
    );
    f.set_modified(old).unwrap();
    drop(f);
    // A read-only disk whose content changed but whose size and mtime were put back: the
    // recorded hash catches it.
    let f = std::fs::OpenOptions::new().write(true).open(&ro).unwrap();
    let old = f.metadata().unwrap().modified().unwrap();
    std::os::unix::fs::FileExt::write_at(&f, b"X", 100).unwrap();
    f.set_modified(old).unwrap();
    let (i, e) = disk_error(Vm::restore(&d, RestoreConfig::new("r2")));
    assert_eq!(i, 1);
    assert!(
        matches!(e, BlockError::BackingChanged { what: "sha256", .. }),
        "{e}"
    );
    // A grown file.
    f.set_len(128 << 10).unwrap();
    let (_, e) = disk_error(Vm::restore(&d, RestoreConfig::new("r3")));
    assert!(
        matches!(e, BlockError::BackingChanged { what: "size", .. }),
        "{e}"
    );
    drop(f);
    // A missing one.
    std::fs::remove_file(&ro).unwrap();
    match Vm::restore(&d, RestoreConfig::new("r4")).map_err(SnapshotError::into_kind) {
        Err(SnapshotErrorKind::Vm(VmErrorKind::Disk {
            index: 1, source, ..
        })) => {
            assert!(matches!(*source, BlockError::Open { .. }))
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("restored without its disk"),
    }
    assert_eq!(count_dir("/proc/self/fd"), fds, "fds leaked");
    assert_eq!(count_dir("/proc/self/task"), threads, "threads leaked");
}

#[test]
fn create_destroy_with_disks_leaves_no_fd_or_thread_behind() {
    let _l = serial_lock();
    let a = disk("cyc-a.img", 1 << 20, 0);
    let b = disk("cyc-b.img", 1 << 20, 0);
    let mk = |i: usize| {
        let mut c = cfg(&format!("cyc{i}"), Action::Spin);
        c.disks = vec![DiskConfig::new(&a, false), DiskConfig::new(&b, true)];
        c
    };
    Vm::start(mk(99)).unwrap().stop();
    let fds = count_dir("/proc/self/fd");
    let threads = count_dir("/proc/self/task");
    for i in 0..20 {
        let vm = Vm::start(mk(i)).unwrap();
        if i % 2 == 0 {
            vm.wait_for_serial(test_guest::READY, Instant::now() + T)
                .unwrap();
            drop(vm);
        } else {
            vm.stop();
        }
    }
    assert_eq!(count_dir("/proc/self/fd"), fds, "fds leaked");
    assert_eq!(count_dir("/proc/self/task"), threads, "threads leaked");
}
