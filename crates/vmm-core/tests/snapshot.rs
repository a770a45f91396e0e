//! Tier 2: snapshots on the host's /dev/kvm with the bare-metal test guest in its `count`
//! mode (prints `C=<hex>` lines, counter in guest memory): a restored guest continues where
//! it was, forks are independent, restores leak nothing, bad state files are refused.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_vmm::snapshot::{
    self, FormatError, MemFileError, RestoreConfig, SnapshotError, SnapshotErrorKind,
};
use kiln_vmm::test_guest::{self, counter_values, Action};
use kiln_vmm::vcpu::VcpuState;
use kiln_vmm::Vm;

mod common;
use common::{cfg, dir, serial_lock, wait_counter, T};

fn snap_dir(name: &str) -> PathBuf {
    let d = dir().path().join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Snapshots a counting VM with a vsock device of guest CID `cid` into `dir` once it printed
/// counter `count`, then stops it.
fn vsock_snapshot(name: &str, cid: u64, count: u64, dir: &Path) {
    let mut c = cfg(name, Action::Count);
    c.vsock_cid = Some(cid);
    let vm = Vm::start(c).unwrap();
    wait_counter(&vm, count);
    vm.snapshot(dir).unwrap();
    vm.stop();
}

fn counting_snapshot(name: &str, vcpus: u8, dir: &Path) -> u64 {
    let mut c = cfg(name, Action::Count);
    c.vcpus = vcpus;
    let vm = Vm::start(c).unwrap();
    wait_counter(&vm, 3);
    vm.pause(T).unwrap();
    let last = *counter_values(&vm.serial_tail(1 << 20)).last().unwrap();
    let info = vm.snapshot(dir).unwrap();
    // A paused VM stays paused.
    assert!(vm.vcpu_states().iter().all(|s| *s == VcpuState::Paused));
    assert_eq!(info.guest_bytes, 128 << 20);
    assert!(
        info.written_bytes > 0 && info.written_bytes < 4 << 20,
        "{info:?}"
    );
    assert!(info.state_bytes > 0);
    vm.stop();
    last
}

fn assert_consecutive(v: &[u64]) {
    assert!(
        v.windows(2).all(|w| w[1] == w[0] + 1),
        "not consecutive: {v:?}"
    );
}

#[test]
fn restored_guest_continues_its_counter_and_forks_are_independent() {
    let _l = serial_lock();
    for vcpus in [1u8, 2] {
        let d = snap_dir(&format!("count{vcpus}"));
        let last = counting_snapshot(&format!("count{vcpus}"), vcpus, &d);
        let mem_before = std::fs::read(d.join(snapshot::MEMORY_FILE)).unwrap();

        let a = Vm::restore(&d, RestoreConfig::new(format!("fork-a{vcpus}"))).unwrap();
        let b = Vm::restore(&d, RestoreConfig::new(format!("fork-b{vcpus}"))).unwrap();
        let va = wait_counter(&a, last + 4);
        let vb = wait_counter(&b, last + 4);
        for v in [&va, &vb] {
            // It continues from where it was (the line being printed at the pause is
            // finished first, so the first complete line is last + 1 or last + 2).
            assert!(
                v[0] == last + 1 || v[0] == last + 2,
                "snapshot at {last}, restored printed {v:?}"
            );
            assert_consecutive(v);
        }
        assert_eq!(a.exit_reason(), None);
        // Independent: stopping one does not stop the other, which keeps counting.
        let va_end = *va.last().unwrap();
        a.stop();
        let vb2 = wait_counter(&b, vb.last().unwrap() + 2);
        assert_consecutive(&vb2);
        assert!(va_end >= last + 4);
        b.stop();
        // Forks write to private copies: the memory file is unchanged.
        assert!(
            std::fs::read(d.join(snapshot::MEMORY_FILE)).unwrap() == mem_before,
            "memory file changed"
        );
    }
}

#[test]
fn snapshot_of_a_running_vm_resumes_it_and_can_be_taken_again_from_a_restored_vm() {
    let _l = serial_lock();
    let vm = Vm::start(cfg("running", Action::Count)).unwrap();
    wait_counter(&vm, 2);
    let d1 = snap_dir("running1");
    vm.snapshot(&d1).unwrap();
    // Resumed: keeps counting.
    let before = *counter_values(&vm.serial_tail(1 << 20)).last().unwrap();
    wait_counter(&vm, before + 3);
    vm.stop();

    // A restored VM (file-backed memory) can be snapshotted again, and that restores too.
    let r1 = Vm::restore(&d1, RestoreConfig::new("gen1")).unwrap();
    let v1 = wait_counter(&r1, 0);
    let g1 = *wait_counter(&r1, v1[0] + 3).last().unwrap();
    let d2 = snap_dir("running2");
    r1.pause(T).unwrap();
    let at = *counter_values(&r1.serial_tail(1 << 20)).last().unwrap();
    r1.snapshot(&d2).unwrap();
    r1.stop();
    let r2 = Vm::restore(&d2, RestoreConfig::new("gen2")).unwrap();
    let v2 = wait_counter(&r2, at + 2);
    assert!(
        v2[0] > g1 - 1 && (v2[0] == at + 1 || v2[0] == at + 2),
        "{at} {v2:?}"
    );
    assert_consecutive(&v2);
    r2.stop();
}

#[test]
fn memory_file_is_sparse() {
    let _l = serial_lock();
    let d = snap_dir("sparse");
    let mut c = cfg("sparse", Action::Halt);
    c.mem_mib = 1024;
    let vm = Vm::start(c).unwrap();
    vm.wait_for_serial(test_guest::READY, Instant::now() + T)
        .unwrap();
    let info = vm.snapshot(&d).unwrap();
    vm.stop();
    let m = std::fs::metadata(d.join(snapshot::MEMORY_FILE)).unwrap();
    assert_eq!(m.len(), 4096 + (1024 << 20));
    let allocated = m.blocks() * 512;
    assert!(
        allocated < 4 << 20,
        "1 GiB guest, {allocated} bytes allocated ({info:?})"
    );
    // SEEK_HOLE finds a hole well before the end.
    let f = std::fs::File::open(d.join(snapshot::MEMORY_FILE)).unwrap();
    // SAFETY: plain lseek on an fd we own.
    let hole = unsafe { libc::lseek(std::os::fd::AsRawFd::as_raw_fd(&f), 0, libc::SEEK_HOLE) };
    assert!(
        hole > 0 && (hole as u64) < m.len() / 2,
        "first hole at {hole}"
    );
    // The halted guest restores (it stays halted: nothing to print, but it is not exited).
    let r = Vm::restore(&d, RestoreConfig::new("sparse-r")).unwrap();
    assert!(r.wait_exit(Duration::from_millis(200)).is_err());
    assert_eq!(r.stop(), kiln_vmm::ExitReason::Stopped);
}

fn count_dir(p: &str) -> usize {
    std::fs::read_dir(p).unwrap().count()
}

#[test]
fn hundred_restores_leave_no_fd_or_thread_behind() {
    let _l = serial_lock();
    let d = snap_dir("leak");
    let last = counting_snapshot("leak", 1, &d);
    // Warm-up restore (process-wide state: MSR list, signal handler).
    Vm::restore(&d, RestoreConfig::new("leak-warm"))
        .unwrap()
        .stop();
    let fds = count_dir("/proc/self/fd");
    let threads = count_dir("/proc/self/task");
    for i in 0..100 {
        let vm = Vm::restore(&d, RestoreConfig::new(format!("leak{i}"))).unwrap();
        if i % 10 == 0 {
            let v = wait_counter(&vm, last + 2);
            assert!(v[0] <= last + 2, "{v:?}");
        }
        if i % 3 == 0 {
            drop(vm);
        } else {
            vm.stop();
        }
    }
    assert_eq!(count_dir("/proc/self/fd"), fds, "fds leaked");
    assert_eq!(count_dir("/proc/self/task"), threads, "threads leaked");
}

fn copy_snapshot(from: &Path, name: &str) -> PathBuf {
    let to = snap_dir(name);
    for f in [snapshot::STATE_FILE, snapshot::MEMORY_FILE] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
    to
}

fn patch(path: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

#[test]
fn corrupted_truncated_or_foreign_snapshots_are_refused_without_leaving_anything() {
    let _l = serial_lock();
    let good = snap_dir("good");
    counting_snapshot("good", 1, &good);
    let other = snap_dir("other");
    counting_snapshot("other", 1, &other);
    Vm::restore(&good, RestoreConfig::new("warm"))
        .unwrap()
        .stop();
    let fds = count_dir("/proc/self/fd");
    let threads = count_dir("/proc/self/task");
    let state = |d: &Path| d.join(snapshot::STATE_FILE);
    let restore = |d: &Path| Vm::restore(d, RestoreConfig::new("bad")).unwrap_err();
    let state_err = |e: SnapshotError| match e.into_kind() {
        SnapshotErrorKind::StateFile { source, path } => {
            assert!(path.ends_with(snapshot::STATE_FILE));
            source
        }
        e => panic!("expected a state file error, got {e:?}"),
    };

    // Truncated.
    let d = copy_snapshot(&good, "trunc");
    let len = std::fs::metadata(state(&d)).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(state(&d))
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let e = restore(&d);
    assert!(e.to_string().contains("truncated"), "{e}");
    assert!(matches!(state_err(e), FormatError::Truncated { .. }));
    // Checksum mismatch (a payload byte flipped).
    let d = copy_snapshot(&good, "flip");
    patch(&state(&d), len - 100, &[0x5a]);
    assert_eq!(state_err(restore(&d)), FormatError::Checksum);
    // Another Kiln version (the version field of the header).
    let d = copy_snapshot(&good, "version");
    patch(&state(&d), 16, b"0.0.1\0\0\0\0\0\0\0");
    let e = restore(&d);
    assert!(e.to_string().contains("written by Kiln 0.0.1"), "{e}");
    assert!(matches!(state_err(e), FormatError::KilnVersion { .. }));
    // Another format version.
    let d = copy_snapshot(&good, "format");
    patch(&state(&d), 8, &7u32.to_le_bytes());
    assert!(matches!(
        state_err(restore(&d)),
        FormatError::FormatVersion { found: 7, .. }
    ));
    // Another KVM kind (hardware <-> PVM).
    let d = copy_snapshot(&good, "kind");
    let mut kind = [0u8];
    std::fs::File::open(state(&d))
        .unwrap()
        .read_exact_at(&mut kind, 48)
        .unwrap();
    patch(&state(&d), 48, &[if kind[0] == 1 { 2 } else { 1 }]);
    let e = restore(&d);
    assert!(e.to_string().contains("taken on"), "{e}");
    assert!(matches!(state_err(e), FormatError::KvmKind { .. }));
    // Not a snapshot at all.
    let d = copy_snapshot(&good, "junk");
    std::fs::write(state(&d), b"this is not a Kiln snapshot state file").unwrap();
    assert!(matches!(state_err(restore(&d)), FormatError::BadMagic));
    // Memory file of another snapshot, truncated memory file, missing memory file.
    let d = copy_snapshot(&good, "mixed");
    std::fs::copy(
        other.join(snapshot::MEMORY_FILE),
        d.join(snapshot::MEMORY_FILE),
    )
    .unwrap();
    let e = restore(&d);
    assert!(
        matches!(
            e.kind(),
            SnapshotErrorKind::MemoryFile(MemFileError::Mismatch { .. })
        ),
        "{e:?}"
    );
    let d = copy_snapshot(&good, "memtrunc");
    let m = d.join(snapshot::MEMORY_FILE);
    let mlen = std::fs::metadata(&m).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&m)
        .unwrap()
        .set_len(mlen / 2)
        .unwrap();
    let e = restore(&d);
    assert!(e.to_string().contains("truncated"), "{e}");
    std::fs::remove_file(&m).unwrap();
    assert!(matches!(
        restore(&d).into_kind(),
        SnapshotErrorKind::MemoryFile(MemFileError::Io { op: "open", .. })
    ));
    // Nothing was left behind by any refused restore.
    assert_eq!(count_dir("/proc/self/fd"), fds, "fds leaked");
    assert_eq!(count_dir("/proc/self/task"), threads, "threads leaked");
    // And the good one still restores.
    Vm::restore(&good, RestoreConfig::new("good-again"))
        .unwrap()
        .stop();
}

#[test]
fn vsock_device_state_round_trips_and_cid_can_change() {
    let _l = serial_lock();
    let d = snap_dir("vsock");
    vsock_snapshot("vsock", 9, 2, &d);
    let r = Vm::restore(&d, RestoreConfig::new("vsock-r")).unwrap();
    assert_eq!(r.vsock().unwrap().guest_cid(), 9);
    assert!(
        r.cmdline().contains("virtio_mmio.device="),
        "{}",
        r.cmdline()
    );
    wait_counter(&r, 0);
    r.stop();
    let mut rc = RestoreConfig::new("vsock-r2");
    rc.vsock_cid = Some(12);
    let r = Vm::restore(&d, rc).unwrap();
    assert_eq!(r.vsock().unwrap().guest_cid(), 12);
    r.stop();
    // A CID for a snapshot without vsock is refused.
    let d2 = snap_dir("novsock");
    counting_snapshot("novsock", 1, &d2);
    let mut rc = RestoreConfig::new("x");
    rc.vsock_cid = Some(5);
    assert!(matches!(
        Vm::restore(&d2, rc).unwrap_err().into_kind(),
        SnapshotErrorKind::Device { .. }
    ));
}

#[test]
fn exited_vm_cannot_be_snapshotted() {
    let _l = serial_lock();
    let vm = Vm::start(cfg("exited", Action::Shutdown)).unwrap();
    vm.wait_exit(T).unwrap();
    let e = vm.snapshot(&snap_dir("exited")).unwrap_err();
    assert!(
        matches!(e.kind(), SnapshotErrorKind::NotSnapshottable { .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("VM exited"), "{e}");
}

#[test]
fn restore_with_runs_its_hook_before_the_vcpus_start() {
    let _l = serial_lock();
    let d = snap_dir("hook");
    vsock_snapshot("hook", 3, 1, &d);
    let (r, listener) = Vm::restore_with(&d, RestoreConfig::new("hook-r"), |vm| {
        // Not started yet: nothing printed, no vCPU ran.
        assert_eq!(vm.serial_tail(100), "");
        Ok(vm.vsock().unwrap().listen(1024).unwrap())
    })
    .unwrap();
    wait_counter(&r, 0);
    assert!(matches!(
        r.vsock().unwrap().listen(1024),
        Err(kiln_vmm::virtio::vsock::VsockError::PortInUse { port: 1024 })
    ));
    drop(listener);
    r.stop();
    // A failing hook: the error comes back and nothing is left running.
    let threads = count_dir("/proc/self/task");
    let e = Vm::restore_with(&d, RestoreConfig::new("hook-fail"), |_| -> Result<(), _> {
        Err(SnapshotErrorKind::NotSnapshottable {
            what: "test hook refused".into(),
        })
    })
    .unwrap_err();
    assert!(e.to_string().contains("test hook refused"), "{e}");
    // The restore names the VM, once.
    assert_eq!(e.vm(), "hook-fail");
    assert_eq!(e.to_string().matches("hook-fail").count(), 1, "{e}");
    assert_eq!(count_dir("/proc/self/task"), threads);
}

#[test]
fn prepared_restores_start_later_and_unused_ones_leave_nothing() {
    let _l = serial_lock();
    let d = snap_dir("prepared");
    let last = counting_snapshot("prepared", 2, &d);
    Vm::prepare_restore(&d, RestoreConfig::new("prep-warm"))
        .unwrap()
        .start()
        .unwrap()
        .stop();
    let fds = count_dir("/proc/self/fd");
    let threads = count_dir("/proc/self/task");
    let p = Vm::prepare_restore(&d, RestoreConfig::new("prep")).unwrap();
    assert_eq!(p.name(), "prep");
    // Nothing runs before start().
    std::thread::sleep(Duration::from_millis(50));
    let vm = p.start().unwrap();
    let v = wait_counter(&vm, last + 3);
    assert!(v[0] == last + 1 || v[0] == last + 2, "{last} {v:?}");
    assert_consecutive(&v);
    vm.stop();
    // Prepared but never started: dropping frees everything.
    for i in 0..10 {
        drop(Vm::prepare_restore(&d, RestoreConfig::new(format!("prep{i}"))).unwrap());
    }
    assert_eq!(count_dir("/proc/self/fd"), fds, "fds leaked");
    assert_eq!(count_dir("/proc/self/task"), threads, "threads leaked");
}
