//! Tier 2: live fork on the host's /dev/kvm with the bare-metal test guest in its `count`
//! mode (prints `C=<hex>` lines, counter in guest memory). Children see the parent's memory
//! as of the fork and continue its counter; the parent's later writes are invisible to them,
//! each child's writes invisible to the others and the parent; forks of forks stack (and
//! flatten) layers; 100 children run; 1,000 forks leave no fd or thread behind; read-write
//! disks are refused; a fork saves as a snapshot directory that restores.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use kiln_vmm::snapshot::{RestoreConfig, SnapshotErrorKind};
use kiln_vmm::test_guest::{counter_values, Action};
use kiln_vmm::virtio::block::DiskConfig;
use kiln_vmm::vm_memory::{Bytes, GuestAddress};
use kiln_vmm::Vm;

mod common;
use common::{cfg, dir, serial_lock, wait_counter, wait_counter_for, T};

/// A guest address the test guest never touches (its image and stack sit below 2 MiB).
const MARK: GuestAddress = GuestAddress(32 << 20);
/// Another one, several pages up.
const MARK2: GuestAddress = GuestAddress((32 << 20) + 0x10_000);

fn last_counter(vm: &Vm) -> u64 {
    *counter_values(&vm.serial_tail(1 << 20)).last().unwrap()
}

fn read(vm: &Vm, at: GuestAddress) -> u64 {
    vm.memory().unwrap().read_obj::<u64>(at).unwrap()
}

fn write(vm: &Vm, at: GuestAddress, v: u64) {
    vm.memory().unwrap().write_obj(v, at).unwrap()
}

fn count_dir(p: &str) -> usize {
    std::fs::read_dir(p).unwrap().count()
}

#[test]
fn children_see_the_parent_as_of_the_fork_and_writes_stay_private() {
    let _l = serial_lock();
    for vcpus in [1u8, 2] {
        let mut c = cfg(&format!("parent{vcpus}"), Action::Count);
        c.vcpus = vcpus;
        let parent = Vm::start(c).unwrap();
        wait_counter(&parent, 3);
        write(&parent, MARK, 0xaaaa);
        parent.pause(T).unwrap();
        let at = last_counter(&parent);
        let (src, kids) = parent.fork(3, &format!("kid{vcpus}-")).unwrap();
        // A paused parent stays paused; no copy of guest memory on a first fork.
        assert!(parent
            .vcpu_states()
            .iter()
            .all(|s| *s == kiln_vmm::vcpu::VcpuState::Paused));
        assert_eq!(src.info().copied_bytes, 0, "{:?}", src.info());
        assert_eq!(src.info().depth, 1);
        parent.resume();

        for k in &kids {
            assert_eq!(
                read(k, MARK),
                0xaaaa,
                "{} sees the parent's memory",
                k.name()
            );
            // It continues the parent's counter from the fork point.
            let v = wait_counter(k, at + 3);
            assert!(
                v[0] == at + 1 || v[0] == at + 2,
                "fork at {at}, child {v:?}"
            );
        }
        // The parent keeps running and its later writes are invisible to the children.
        wait_counter(&parent, at + 3);
        write(&parent, MARK, 0xbbbb);
        write(&parent, MARK2, 0xcccc);
        for k in &kids {
            assert_eq!(read(k, MARK), 0xaaaa);
            assert_eq!(read(k, MARK2), 0);
        }
        // Each child's writes are invisible to the others and the parent.
        write(&kids[0], MARK, 0x1111);
        write(&kids[1], MARK2, 0x2222);
        assert_eq!(read(&kids[0], MARK), 0x1111);
        assert_eq!(read(&kids[1], MARK), 0xaaaa);
        assert_eq!(read(&kids[2], MARK), 0xaaaa);
        assert_eq!(read(&kids[0], MARK2), 0);
        assert_eq!(read(&kids[2], MARK2), 0);
        assert_eq!(read(&parent, MARK), 0xbbbb);
        assert_eq!(read(&parent, MARK2), 0xcccc);
        // The guests' own counters diverge independently: stopping one leaves the others.
        let k0 = last_counter(&kids[0]);
        let mut kids = kids;
        kids.remove(0).stop();
        for k in &kids {
            wait_counter(k, k0 + 2);
        }
        wait_counter(&parent, last_counter(&parent) + 2);
        for k in kids {
            k.stop();
        }
        parent.stop();
    }
}

#[test]
fn forks_of_forks_stack_layers_and_see_their_own_parent() {
    let _l = serial_lock();
    let parent = Vm::start(cfg("gen0", Action::Count)).unwrap();
    wait_counter(&parent, 2);
    write(&parent, MARK, 1);
    let (_s0, mut g1) = parent.fork(1, "gen1-").unwrap();
    let child = g1.remove(0);
    write(&child, MARK, 2);
    write(&child, MARK2, 22);
    let at = *wait_counter(&child, 0).last().unwrap();
    // The child forks in turn: its private pages become a layer over the parent's base.
    let (s1, mut g2) = child.fork(2, "gen2-").unwrap();
    assert_eq!(s1.info().depth, 2, "{:?}", s1.info());
    assert!(s1.info().copied_bytes > 0 && s1.info().copied_bytes < 16 << 20);
    for g in &g2 {
        assert_eq!(read(g, MARK), 2);
        assert_eq!(read(g, MARK2), 22);
        wait_counter(g, at + 2);
    }
    assert_eq!(read(&parent, MARK), 1);
    assert_eq!(read(&parent, MARK2), 0);
    write(&g2[0], MARK, 3);
    assert_eq!(read(&g2[1], MARK), 2);
    assert_eq!(read(&child, MARK), 2);
    // The parent forks again: its writes since the first fork are the new layer.
    write(&parent, MARK2, 11);
    let (s2, p2) = parent.fork(1, "gen1b-").unwrap();
    assert_eq!(s2.info().depth, 2);
    assert_eq!(read(&p2[0], MARK), 1);
    assert_eq!(read(&p2[0], MARK2), 11);
    assert_eq!(read(&g2[1], MARK2), 22);
    // Many generations: the stack is flattened before it gets deep.
    let mut cur = g2.remove(1);
    for i in 0..12u64 {
        write(&cur, MARK, 100 + i);
        let (s, mut next) = cur.fork(1, &format!("deep{i}-")).unwrap();
        assert!(
            s.info().depth <= kiln_vmm::fork::MAX_LAYERS,
            "{:?}",
            s.info()
        );
        cur.stop();
        cur = next.remove(0);
        assert_eq!(read(&cur, MARK), 100 + i);
        assert_eq!(read(&cur, MARK2), 22);
    }
    let c = *wait_counter(&cur, 0).last().unwrap();
    wait_counter(&cur, c + 2);
}

#[test]
fn a_hundred_children_run() {
    let _l = serial_lock();
    let parent = Vm::start(cfg("hundred", Action::Count)).unwrap();
    wait_counter(&parent, 2);
    parent.pause(T).unwrap();
    let at = last_counter(&parent);
    let (src, kids) = parent.fork(100, "h").unwrap();
    parent.stop();
    assert_eq!(kids.len(), 100);
    assert!(src.info().paused_for < Duration::from_secs(1));
    // Every child runs the guest on: each prints counter lines past the fork point (100
    // busy vCPUs share this host's cores, hence the longer wait).
    for k in &kids {
        let v = wait_counter_for(k, at + 2, Duration::from_secs(60));
        assert!(v[0] <= at + 2, "{v:?}");
    }
    for k in kids {
        k.stop();
    }
}

#[test]
fn a_thousand_forks_leave_no_fd_or_thread_behind() {
    let _l = serial_lock();
    // Warm-up fork (process-wide state: MSR list, signal handler).
    let warm = Vm::start(cfg("leakw", Action::Count)).unwrap();
    wait_counter(&warm, 1);
    warm.fork(1, "warm").unwrap().1.remove(0).stop();
    warm.stop();
    let fds = count_dir("/proc/self/fd");
    let threads = count_dir("/proc/self/task");
    // The parent holds one fd per frozen layer while it lives: counted after it stops.
    let parent = Vm::start(cfg("leakp", Action::Count)).unwrap();
    wait_counter(&parent, 2);
    for round in 0..10u64 {
        write(&parent, MARK, round);
        parent.pause(T).unwrap();
        let at = last_counter(&parent);
        let src = parent.fork_source().unwrap();
        parent.resume();
        for i in 0..100 {
            let k = src
                .spawn(RestoreConfig::new(format!("l{round}-{i}")))
                .unwrap();
            if i % 25 == 0 {
                assert_eq!(read(&k, MARK), round);
                wait_counter(&k, at + 1);
            }
            if i % 3 == 0 {
                drop(k);
            } else {
                k.stop();
            }
        }
    }
    parent.stop();
    assert_eq!(count_dir("/proc/self/fd"), fds, "fds leaked");
    assert_eq!(count_dir("/proc/self/task"), threads, "threads leaked");
}

#[test]
fn read_write_disks_are_refused_and_read_only_ones_shared() {
    let _l = serial_lock();
    let img = dir().path().join("fork-disk.img");
    std::fs::write(&img, vec![7u8; 1 << 20]).unwrap();
    let mut c = cfg("rw", Action::Count);
    c.disks = vec![DiskConfig::new(&img, false)];
    let vm = Vm::start(c).unwrap();
    wait_counter(&vm, 1);
    let e = vm.fork_source().unwrap_err();
    assert!(
        matches!(e.kind(), SnapshotErrorKind::ReadWriteDisk { index: 0, .. }),
        "{e}"
    );
    // Refused before pausing: the VM runs on.
    wait_counter(&vm, last_counter(&vm) + 2);
    vm.stop();

    let mut c = cfg("ro", Action::Count);
    c.disks = vec![DiskConfig::new(&img, true)];
    let vm = Vm::start(c).unwrap();
    wait_counter(&vm, 1);
    let (_src, kids) = vm.fork(2, "ro-").unwrap();
    for k in &kids {
        assert_eq!(k.disk_stats().len(), 1);
        wait_counter(k, last_counter(&vm).saturating_sub(3));
    }
}

#[test]
fn a_fork_saves_as_a_snapshot_directory_that_restores() {
    let _l = serial_lock();
    let vm = Vm::start(cfg("saved", Action::Count)).unwrap();
    wait_counter(&vm, 2);
    write(&vm, MARK, 0x5a5a);
    vm.pause(T).unwrap();
    let at = last_counter(&vm);
    let src = vm.fork_source().unwrap();
    vm.resume();
    write(&vm, MARK, 0x7777);
    let d = dir().path().join("fork-saved");
    let info = src.save(&d).unwrap();
    assert_eq!(info.guest_bytes, 128 << 20);
    assert!(
        info.written_bytes > 0 && info.written_bytes < 4 << 20,
        "{info:?}"
    );
    let r = Vm::restore(&d, RestoreConfig::new("saved-r")).unwrap();
    assert_eq!(read(&r, MARK), 0x5a5a);
    let v = wait_counter(&r, at + 2);
    assert!(
        v[0] == at + 1 || v[0] == at + 2,
        "fork at {at}, restored {v:?}"
    );
    // The forked parent's own snapshot (memory over layers) is complete too.
    let d2 = dir().path().join("fork-parent-saved");
    vm.snapshot(&d2).unwrap();
    let r2 = Vm::restore(&d2, RestoreConfig::new("saved-r2")).unwrap();
    assert_eq!(read(&r2, MARK), 0x7777);
    wait_counter(&r2, at + 2);
}

#[test]
fn children_with_vsock_get_a_transport_reset_and_take_new_connections() {
    let _l = serial_lock();
    let mut c = cfg("vs", Action::Count);
    c.vsock_cid = Some(3);
    let vm = Vm::start(c).unwrap();
    wait_counter(&vm, 1);
    let (_src, kids) = vm.fork(2, "vs-").unwrap();
    for k in &kids {
        // The child has its own vsock device: a listener on it works.
        let host = k.vsock().unwrap();
        assert_eq!(host.guest_cid(), 3);
        host.listen(1024).unwrap();
        wait_counter(k, 2);
    }
}

#[test]
fn children_start_in_shells_built_ahead_of_time() {
    let _l = serial_lock();
    let mut c = cfg("shellp", Action::Count);
    c.vsock_cid = Some(3);
    let parent = Vm::start(c).unwrap();
    wait_counter(&parent, 2);
    let shells: Vec<_> = (0..3)
        .map(|i| {
            parent
                .fork_shell(RestoreConfig::new(format!("shell{i}")))
                .unwrap()
        })
        .collect();
    write(&parent, MARK, 0x4242);
    parent.pause(T).unwrap();
    let at = last_counter(&parent);
    let src = parent.fork_source().unwrap();
    parent.resume();
    write(&parent, MARK, 0x4343);
    for s in shells {
        let (k, ()) = src.spawn_shell(s, |_| Ok(())).unwrap();
        assert_eq!(read(&k, MARK), 0x4242);
        let v = wait_counter(&k, at + 2);
        assert!(
            v[0] == at + 1 || v[0] == at + 2,
            "fork at {at}, child {v:?}"
        );
        write(&k, MARK, 1);
        assert_eq!(read(&parent, MARK), 0x4343);
    }
    // An unused shell frees everything when dropped.
    drop(parent.fork_shell(RestoreConfig::new("unused")).unwrap());
}
