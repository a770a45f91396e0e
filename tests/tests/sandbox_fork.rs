//! Tier-4: live fork of a running Linux guest through `Sandbox::fork_live` (issue 14, item 6):
//! a file and a running counter process in the parent show up in each child and the counter
//! keeps counting there; exec works in every child right after the fork; the children's
//! random streams differ (from each other and from the parent) and their clocks are set from
//! the host (the parent's deliberately wrong clock is not inherited). One parent, two
//! children, every assertion on them.

// Test helpers outside #[test] fns may unwrap too.
#![allow(clippy::unwrap_used)]

mod sandbox_common;

use std::time::{Duration, Instant};

use kiln::Sandbox;
use sandbox_common::sandbox;

/// `sh -c script` in `sb`; must exit 0; returns stdout.
fn sh(sb: &Sandbox, script: &str) -> String {
    let r = sb.exec(&["sh", "-c", script]).unwrap();
    assert_eq!(r.status.code, Some(0), "{script}: {r:?}");
    String::from_utf8_lossy(&r.stdout).into_owned()
}

/// The counter the parent's background loop writes.
fn counter(sb: &Sandbox) -> u64 {
    let text = sh(sb, "cat /tmp/counter");
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("counter {text:?}: {e}"))
}

/// Waits (bounded) until `sb`'s counter is above `above`; returns it.
fn counter_above(sb: &Sandbox, above: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = counter(sb);
        if c > above {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "{}: counter stuck at {c} (wanted > {above})",
            sb.name()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn urandom(sb: &Sandbox) -> String {
    sh(sb, "head -c 32 /dev/urandom | od -An -tx1")
}

fn host_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The parent's clock is set to this (2001-09-09): a child that inherited it unrefreshed
/// would show it.
const WRONG_CLOCK: u64 = 1_000_000_000;

#[test]
fn a_running_guest_forks_its_files_processes_and_gets_fresh_clock_and_rng() {
    kiln_tests::require_tier4();
    let parent = sandbox("lfork", 256, 1);
    sh(&parent, "echo parent-state > /tmp/state.txt");
    // A running counter: a background loop that outlives its exec.
    sh(
        &parent,
        "(i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.1; done) \
         </dev/null >/dev/null 2>&1 &",
    );
    let before = counter_above(&parent, 2);
    sh(&parent, &format!("date -s @{WRONG_CLOCK} >/dev/null"));

    let t0 = Instant::now();
    let children = parent.fork_live(2).unwrap();
    eprintln!("fork_live(2) took {:?}", t0.elapsed());
    assert_eq!(children.len(), 2);

    // exec works in every child right after the fork (the first thing each one does).
    let mut at_fork = Vec::new();
    for (i, c) in children.iter().enumerate() {
        assert_eq!(c.name(), format!("lfork-fork{i}"));
        let r = c.exec(&["cat", "/tmp/state.txt"]).unwrap();
        assert_eq!(r.status.code, Some(0), "{r:?}");
        assert_eq!(r.stdout, b"parent-state\n", "{r:?}");
        // The counter as of the fork (or a little later: it runs on in the child).
        let n = counter(c);
        assert!(
            n >= before,
            "{}: counter {n} < {before} before the fork",
            c.name()
        );
        at_fork.push(n);
    }
    // The counter process itself was forked: it keeps counting in each child.
    for (c, n) in children.iter().zip(&at_fork) {
        let later = counter_above(c, n + 3);
        eprintln!("{}: counter {n} -> {later}", c.name());
        assert!(
            sh(c, "ps").contains("sleep"),
            "no counter loop in {}",
            c.name()
        );
    }
    // A write in one child is invisible to the other and to the parent.
    sh(&children[0], "echo child0 > /tmp/state.txt");
    assert_eq!(sh(&children[1], "cat /tmp/state.txt"), "parent-state\n");
    assert_eq!(sh(&parent, "cat /tmp/state.txt"), "parent-state\n");

    // Random streams differ: each child's RNG was reseeded at the fork.
    let r: Vec<String> = children.iter().map(urandom).collect();
    let rp = urandom(&parent);
    assert_ne!(r[0], r[1], "children read the same /dev/urandom bytes");
    assert_ne!(r[0], rp);
    assert_ne!(r[1], rp);

    // Clocks: the children's were set from the host at the fork; the parent's stays wrong.
    let now = host_time();
    for c in &children {
        let t: u64 = sh(c, "date +%s").trim().parse().unwrap();
        assert!(
            t + 10 >= now && t <= now + 10,
            "{}: guest clock {t}, host {now}",
            c.name()
        );
    }
    let tp: u64 = sh(&parent, "date +%s").trim().parse().unwrap();
    assert!(tp < WRONG_CLOCK + 3600, "parent clock {tp}");

    for sb in children {
        sb.shutdown().unwrap();
    }
    parent.shutdown().unwrap();
}
