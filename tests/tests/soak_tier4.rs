//! Tier-4 soak: sandbox create -> exec -> destroy cycles of a real Linux guest in one process
//! (the library, in-process VMM), with the process's fd count, thread count and RSS sampled
//! along the way and checked against a stated bound (docs/SECURITY.md "Soak").
//!
//! The cycle count is `KILN_SOAK_CYCLES` (default 8, what `cargo xtask test` runs: a boot
//! under the harness's software emulation takes seconds, and CI time is bounded);
//! `cargo xtask soak --tier4` runs the 500 cycles.

// Test support: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod sandbox_common;

use std::time::{Duration, Instant};

use sandbox_common::config;

/// Cycles `cargo xtask test` runs when `KILN_SOAK_CYCLES` is unset.
const DEFAULT_CYCLES: usize = 8;
/// Allowed RSS growth between the baseline and any later sample, KiB.
const RSS_NOISE_KIB: u64 = 16 * 1024;
/// How long a sample waits for threads of a dropped sandbox to finish ending.
const SETTLE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sample {
    fds: usize,
    threads: usize,
    rss_kib: u64,
}

fn count_dir(p: &str) -> usize {
    std::fs::read_dir(p)
        .unwrap_or_else(|e| panic!("reading {p}: {e}"))
        .count()
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/self/status")
}

fn sample() -> Sample {
    Sample {
        fds: count_dir("/proc/self/fd"),
        threads: count_dir("/proc/self/task"),
        rss_kib: rss_kib(),
    }
}

/// A sample once fds and threads are back at `base` (threads of the sandbox just dropped may
/// take a moment to return), or the last one taken after [`SETTLE`].
fn settled_sample(base: Sample) -> Sample {
    let deadline = Instant::now() + SETTLE;
    loop {
        let s = sample();
        if (s.fds <= base.fds && s.threads <= base.threads) || Instant::now() >= deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One cycle: boot, run a command whose output names the cycle, check it, destroy.
fn cycle(i: usize) {
    let name = format!("soak4-{}", i % 100);
    let sb = kiln::Sandbox::create(config(&name, 256))
        .unwrap_or_else(|e| panic!("cycle {i}: creating the sandbox: {e}"));
    let r = sb
        .exec(&[
            "sh",
            "-c",
            &format!("echo cycle {i}; cat /proc/uptime >/dev/null"),
        ])
        .unwrap_or_else(|e| panic!("cycle {i}: exec: {e}"));
    assert!(r.success(), "cycle {i}: {r:?}");
    assert_eq!(r.stdout_str().trim(), format!("cycle {i}"), "cycle {i}");
    if i % 2 == 0 {
        sb.shutdown()
            .unwrap_or_else(|e| panic!("cycle {i}: shutdown: {e}"));
    } else {
        drop(sb);
    }
}

#[test]
fn soak_tier4_create_exec_destroy_leaks_nothing() {
    kiln_tests::require_tier4();
    let n: usize = match std::env::var("KILN_SOAK_CYCLES") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("KILN_SOAK_CYCLES={v:?} is not a count")),
        Err(_) => DEFAULT_CYCLES,
    };
    assert!(n >= 2, "KILN_SOAK_CYCLES must be at least 2");
    let every = (n / 10).max(1);
    // Warm-up: lazily created process-wide state (thread pools, caches) is not a leak.
    cycle(0);
    let base = settled_sample(sample());
    println!("SOAK4 baseline: {base:?}");
    let started = Instant::now();
    let mut samples = vec![base];
    for i in 1..=n {
        cycle(i);
        if i % every == 0 || i == n {
            let s = settled_sample(base);
            println!(
                "SOAK4 {i:>4}: fds {} threads {} rss {} KiB ({:+} KiB) [{:.1}s]",
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
        assert!(s.fds <= base.fds, "fds grew by sample {k}: {samples:?}");
        assert!(
            s.threads <= base.threads,
            "threads grew by sample {k}: {samples:?}"
        );
        assert!(
            s.rss_kib <= base.rss_kib + RSS_NOISE_KIB,
            "RSS grew by more than {RSS_NOISE_KIB} KiB by sample {k}: {samples:?}"
        );
    }
    println!(
        "SOAK4 done: {n} create/exec/destroy cycles in {:.1}s ({:.2} s per cycle), fds and \
         threads back at the baseline, RSS within +{RSS_NOISE_KIB} KiB",
        started.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64() / n as f64
    );
}
