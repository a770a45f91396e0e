//! Tier 2: the leak soak (issue 15 item 6) on the host's /dev/kvm with the bare-metal test
//! guest: many create -> READY -> destroy cycles (with a vsock device) and many restores of
//! one snapshot in one process, with the process's fd count, thread count and RSS sampled
//! every [`SAMPLE_EVERY`] cycles. The bound: after a warm-up, the fd and thread counts at
//! every sample equal the baseline exactly, and RSS grows by at most [`RSS_NOISE_KIB`] over
//! the whole run (allocator and page-cache noise; a leak of one guest's memory or of a few
//! KiB per cycle exceeds it).
//!
//! `soak_short` (1,000 cycles, 100 restores) runs in `cargo xtask test --tier 2`;
//! `soak_full` (10,000 cycles, 1,000 restores) is `#[ignore]`d and run by `cargo xtask soak`,
//! which prints the samples (`SOAK` lines).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Instant;

use kiln_vmm::snapshot::RestoreConfig;
use kiln_vmm::test_guest::{self, Action};
use kiln_vmm::Vm;

mod common;
use common::{cfg, dir, serial_lock, T};

/// Cycles between two samples.
const SAMPLE_EVERY: usize = 1_000;
/// Allowed RSS growth between the baseline and any later sample, KiB.
const RSS_NOISE_KIB: u64 = 16 * 1024;

/// One measurement of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sample {
    fds: usize,
    threads: usize,
    rss_kib: u64,
}

fn count_dir(p: &str) -> usize {
    std::fs::read_dir(p).unwrap().count()
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn sample() -> Sample {
    Sample {
        fds: count_dir("/proc/self/fd"),
        threads: count_dir("/proc/self/task"),
        rss_kib: rss_kib(),
    }
}

/// Runs `n` cycles of `one`, sampling every [`SAMPLE_EVERY`] (and printing each sample), and
/// checks every sample against the baseline taken after the warm-up cycle.
fn soak(what: &str, n: usize, mut one: impl FnMut(usize)) -> Vec<Sample> {
    one(usize::MAX);
    let base = sample();
    let started = Instant::now();
    println!("SOAK {what} baseline: {base:?}");
    let mut samples = vec![base];
    for i in 1..=n {
        one(i);
        if i % SAMPLE_EVERY == 0 || i == n {
            let s = sample();
            println!(
                "SOAK {what} {i:>6}: fds {} threads {} rss {} KiB ({:+} KiB) [{:.1}s]",
                s.fds,
                s.threads,
                s.rss_kib,
                s.rss_kib as i64 - base.rss_kib as i64,
                started.elapsed().as_secs_f64()
            );
            samples.push(s);
        }
    }
    for (k, s) in samples.iter().enumerate() {
        assert_eq!(
            s.fds, base.fds,
            "{what}: fds grew by sample {k}: {samples:?}"
        );
        assert_eq!(
            s.threads, base.threads,
            "{what}: threads grew by sample {k}: {samples:?}"
        );
        assert!(
            s.rss_kib <= base.rss_kib + RSS_NOISE_KIB,
            "{what}: RSS grew by more than {RSS_NOISE_KIB} KiB by sample {k}: {samples:?}"
        );
    }
    println!(
        "SOAK {what} done: {n} cycles in {:.1}s, within bounds (fds and threads equal, RSS +{RSS_NOISE_KIB} KiB at most)",
        started.elapsed().as_secs_f64()
    );
    samples
}

/// create -> READY -> destroy, `n` times; every other VM is dropped instead of stopped.
fn create_destroy(n: usize) -> Vec<Sample> {
    soak("create/READY/destroy", n, |i| {
        let mut c = cfg(&format!("soak{}", i % 1000), Action::Halt);
        c.vsock_cid = Some(3);
        let vm = Vm::start(c).unwrap();
        vm.wait_for_serial(test_guest::READY, Instant::now() + T)
            .unwrap();
        if i % 2 == 0 {
            drop(vm);
        } else {
            vm.stop();
        }
    })
}

/// Snapshots a guest that printed READY into `d`.
fn ready_snapshot(d: &Path) {
    std::fs::create_dir_all(d).unwrap();
    let mut c = cfg("soak-snap", Action::Count);
    c.vsock_cid = Some(3);
    let vm = Vm::start(c).unwrap();
    vm.wait_for_serial("C=", Instant::now() + T).unwrap();
    vm.snapshot(d).unwrap();
    vm.stop();
}

/// `n` restores of one snapshot, each waiting until the restored guest prints again.
fn restores(n: usize) -> Vec<Sample> {
    let d = dir().path().join(format!("soak-snap-{n}"));
    ready_snapshot(&d);
    soak("restore", n, |i| {
        let vm = Vm::restore(&d, RestoreConfig::new(format!("soak-r{}", i % 1000))).unwrap();
        let before = vm.serial_tail(1 << 16).matches("C=").count();
        let deadline = Instant::now() + T;
        while vm.serial_tail(1 << 16).matches("C=").count() <= before {
            assert!(Instant::now() < deadline, "restored guest {i} does not run");
            assert!(vm.exit_reason().is_none(), "{:?}", vm.exit_reason());
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        if i % 2 == 0 {
            drop(vm);
        } else {
            vm.stop();
        }
    })
}

#[test]
fn soak_short_1000_cycles_and_100_restores_leak_nothing() {
    let _l = serial_lock();
    let s = create_destroy(1_000);
    assert_eq!(s.len(), 2);
    let r = restores(100);
    assert_eq!(r.len(), 2);
}

#[test]
#[ignore = "long (minutes): run by `cargo xtask soak`"]
fn soak_full_10000_cycles_and_1000_restores_leak_nothing() {
    let _l = serial_lock();
    let s = create_destroy(10_000);
    assert_eq!(s.len(), 11);
    let r = restores(1_000);
    assert_eq!(r.len(), 2);
}
