//! 16 threads acquire and release concurrently, with injected create, health-check, reset and
//! reusability failures, while a killer thread makes resources die (idle or in use) and a
//! monitor samples the pool's invariants.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use common::MockManager;
use kiln_pool::{Pool, PoolConfig, PoolError};

const THREADS: usize = 16;
const ITERATIONS: usize = 5000;
const MAX_SIZE: usize = 4;
const MAX_IN_USE: usize = 6;

/// xorshift64: a tiny deterministic generator per thread.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// True with probability 1/n.
    fn one_in(&mut self, n: u64) -> bool {
        self.next() % n == 0
    }
}

#[test]
fn sixteen_threads_keep_the_invariants() {
    let (m, c) = MockManager::new();
    c.fail_every_nth_create.store(7, SeqCst);
    let cfg = PoolConfig {
        min_size: 2,
        max_size: MAX_SIZE,
        max_idle_duration: Some(Duration::from_millis(2)),
        health_check_interval: 3,
        max_in_use: MAX_IN_USE,
        acquire_timeout: Duration::from_secs(30),
        maintenance_interval: Duration::from_millis(1),
    };
    let pool = Arc::new(Pool::new(m, cfg).unwrap());
    let done = Arc::new(AtomicBool::new(false));
    let violations = Arc::new(AtomicU64::new(0));

    let monitor = {
        let (pool, done, violations) = (
            Arc::clone(&pool),
            Arc::clone(&done),
            Arc::clone(&violations),
        );
        thread::spawn(move || {
            let mut samples = 0u64;
            while !done.load(SeqCst) {
                let s = pool.stats();
                if s.idle_count > MAX_SIZE || s.in_use_count > MAX_IN_USE {
                    violations.fetch_add(1, SeqCst);
                    eprintln!("invariant broken: {s:?}");
                }
                samples += 1;
                thread::yield_now();
            }
            samples
        })
    };

    // Kills one of the most recently created resources every ~50 µs (idle or in use: a death
    // while in use is the holder's problem; the pool must catch it once the resource is idle).
    let killer = {
        let (c, done) = (Arc::clone(&c), Arc::clone(&done));
        thread::spawn(move || {
            let mut rng = Rng(0xD1B5_4A32_D192_ED03);
            let mut kills = 0u64;
            while !done.load(SeqCst) {
                let next = c.next_id.load(SeqCst);
                if next > 0 {
                    c.kill(next.saturating_sub(1 + rng.next() % 8));
                    kills += 1;
                }
                thread::sleep(Duration::from_micros(50));
            }
            kills
        })
    };

    let start = Arc::new(Barrier::new(THREADS));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (pool, c, start) = (Arc::clone(&pool), Arc::clone(&c), Arc::clone(&start));
            thread::spawn(move || {
                let mut rng =
                    Rng(0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
                let (mut ok, mut create_failed) = (0u64, 0u64);
                start.wait();
                for _ in 0..ITERATIONS {
                    let mut h = match pool.acquire() {
                        Ok(h) => h,
                        Err(PoolError::Create(_)) => {
                            create_failed += 1;
                            continue;
                        }
                        Err(e) => panic!("unexpected acquire error: {e}"),
                    };
                    ok += 1;
                    c.hold(h.id);
                    // Once `is_alive` said "dead", the resource must never be handed out.
                    assert!(
                        !c.was_found_dead(h.id),
                        "resource {} handed out after is_alive found it dead",
                        h.id
                    );
                    assert!(!h.dirty, "resource {} handed out without reset", h.id);
                    let s = pool.stats();
                    assert!(s.in_use_count >= 1 && s.in_use_count <= MAX_IN_USE, "{s:?}");
                    assert!(s.idle_count <= MAX_SIZE, "{s:?}");
                    h.dirty = true;
                    if rng.one_in(4) {
                        thread::yield_now();
                    }
                    match rng.next() % 40 {
                        0 => h.healthy = false,
                        1 => h.fail_reset = true,
                        2 => h.reusable = false,
                        _ => {}
                    }
                    c.unhold(h.id);
                    drop(h);
                }
                (ok, create_failed)
            })
        })
        .collect();

    let (mut ok, mut create_failed) = (0u64, 0u64);
    for w in workers {
        let (o, f) = w.join().unwrap();
        ok += o;
        create_failed += f;
    }
    done.store(true, SeqCst);
    let samples = monitor.join().unwrap();
    let kills = killer.join().unwrap();
    assert!(kills > 0);
    assert!(samples > 0);
    assert_eq!(violations.load(SeqCst), 0);

    let s = pool.stats();
    assert_eq!(s.in_use_count, 0);
    assert_eq!(s.waiting_count, 0);
    assert_eq!(
        s.hit_count + s.miss_count,
        ok,
        "every successful acquire is a hit or a miss"
    );
    assert!(s.hit_count > 0 && s.miss_count > 0, "{s:?}");
    assert!(
        create_failed > 0,
        "the injected create failures were exercised"
    );
    assert!(s.evict_count > 0);
    assert!(
        s.dead_count > 0,
        "dead idle resources were exercised: {s:?}"
    );
    assert!(s.dead_count <= s.evict_count, "{s:?}");
    assert_eq!(
        s.dead_count,
        c.get(&c.found_dead),
        "every \"dead\" answer destroyed exactly one idle resource"
    );
    assert_eq!(s.created_count, c.get(&c.created));
    assert_eq!(s.create_failed_count, c.get(&c.create_failures));
    // Alive resources never exceeded what the limits allow: idle + creating ≤ max_size,
    // in use ≤ max_in_use, plus ones in the middle of being destroyed (one per thread at most).
    let bound = MAX_SIZE + MAX_IN_USE + THREADS + 1;
    assert!(
        c.max_alive.load(SeqCst) <= bound,
        "max alive {}",
        c.max_alive.load(SeqCst)
    );
    assert!(c.held.lock().unwrap().is_empty());

    pool.shutdown();
    let s = pool.stats();
    assert_eq!(s.idle_count, 0);
    assert_eq!(s.created_count, s.destroyed_count, "{s:?}");
    assert_eq!(c.get(&c.created), c.get(&c.destroyed));
    eprintln!("stress: {ok} acquires, {create_failed} create failures, {kills} kills, {s:?}");
}
