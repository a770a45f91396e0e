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

/// A random pause: nothing, a short spin, a yield or a sleep of a few microseconds (so holders
/// get preempted in every phase of acquire and release).
fn pause(rng: &mut Rng) {
    match rng.next() % 8 {
        0..=2 => {}
        3..=4 => {
            for _ in 0..rng.next() % 200 {
                std::hint::spin_loop();
            }
        }
        5..=6 => thread::yield_now(),
        _ => thread::sleep(Duration::from_micros(rng.next() % 50)),
    }
}

fn rng_for(t: usize) -> Rng {
    Rng(0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407))
}

/// No injected failures, so every count is predictable: 16 threads with random delays on a
/// small pool (the idle set is full most of the time: LRU eviction across shards) and an
/// in-use cap (acquires wait). No resource has two holders, the limits hold in every
/// snapshot, and at the end nothing is lost: the manager's live resources are exactly the
/// idle ones, and `created == destroyed` after shutdown.
#[test]
fn random_delays_keep_counts_exact_and_lose_nothing() {
    const MAX_SIZE: usize = 3;
    const MAX_IN_USE: usize = 8;
    const ITERATIONS: usize = 3000;
    let (m, c) = MockManager::new();
    let pool = Arc::new(
        Pool::new(
            m,
            PoolConfig {
                min_size: 1,
                max_size: MAX_SIZE,
                max_idle_duration: None,
                health_check_interval: 5,
                max_in_use: MAX_IN_USE,
                acquire_timeout: Duration::from_secs(60),
                maintenance_interval: Duration::from_millis(1),
            },
        )
        .unwrap(),
    );
    let holders = Arc::new(AtomicU64::new(0));
    let max_holders = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let monitor = {
        let (pool, done) = (Arc::clone(&pool), Arc::clone(&done));
        thread::spawn(move || {
            let mut bad = 0u64;
            while !done.load(SeqCst) {
                let s = pool.stats();
                if s.idle_count > MAX_SIZE || s.in_use_count > MAX_IN_USE {
                    eprintln!("limit broken: {s:?}");
                    bad += 1;
                }
                thread::yield_now();
            }
            bad
        })
    };
    let start = Arc::new(Barrier::new(THREADS));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (pool, c, start) = (Arc::clone(&pool), Arc::clone(&c), Arc::clone(&start));
            let (holders, max_holders) = (Arc::clone(&holders), Arc::clone(&max_holders));
            thread::spawn(move || {
                let mut rng = rng_for(t);
                start.wait();
                for _ in 0..ITERATIONS {
                    pause(&mut rng);
                    let mut h = pool.acquire().unwrap();
                    let now = holders.fetch_add(1, SeqCst) + 1;
                    max_holders.fetch_max(now, SeqCst);
                    c.hold(h.id);
                    assert!(!h.dirty, "resource {} handed out without reset", h.id);
                    h.dirty = true;
                    pause(&mut rng);
                    c.unhold(h.id);
                    holders.fetch_sub(1, SeqCst);
                    // Sometimes returned by another thread than the one that took it.
                    if rng.one_in(8) {
                        thread::spawn(move || drop(h)).join().unwrap();
                    } else {
                        drop(h);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    done.store(true, SeqCst);
    assert_eq!(monitor.join().unwrap(), 0, "a snapshot broke a limit");
    assert!(max_holders.load(SeqCst) as usize <= MAX_IN_USE);

    let s = pool.stats();
    let acquires = (THREADS * ITERATIONS) as u64;
    assert_eq!(s.hit_count + s.miss_count, acquires, "{s:?}");
    assert!(s.hit_count > 0 && s.miss_count > 0, "{s:?}");
    assert!(s.evict_count > 0, "LRU eviction was exercised: {s:?}");
    assert_eq!(s.dead_count, 0);
    assert_eq!((s.in_use_count, s.waiting_count), (0, 0), "{s:?}");
    assert!(s.idle_count <= MAX_SIZE);
    assert_eq!(s.created_count, c.get(&c.created));
    assert_eq!(s.destroyed_count, c.get(&c.destroyed));
    assert_eq!(s.create_failed_count, 0);
    // Nothing lost or duplicated: what the manager has alive is exactly what is idle.
    assert_eq!(
        c.alive.load(SeqCst),
        s.idle_count,
        "resources alive vs idle: {s:?}"
    );
    assert_eq!(s.created_count - s.destroyed_count, s.idle_count as u64);
    assert!(c.held.lock().unwrap().is_empty());
    assert!(c.max_alive.load(SeqCst) <= MAX_SIZE + MAX_IN_USE + THREADS);
    pool.shutdown();
    let s = pool.stats();
    assert_eq!(s.idle_count, 0);
    assert_eq!(s.created_count, s.destroyed_count, "{s:?}");
    assert_eq!(c.alive.load(SeqCst), 0);
}

/// `max_in_use` 1 and 16 threads: every acquire but the first waits for the one slot, and
/// since a release makes its resource idle before it frees the slot, every later acquire is a
/// hit on that one resource, whichever shard it went to.
#[test]
fn a_single_slot_is_handed_over_without_a_miss() {
    const ITERATIONS: usize = 500;
    let (m, c) = MockManager::new();
    let pool = Arc::new(
        Pool::new(
            m,
            PoolConfig {
                max_in_use: 1,
                acquire_timeout: Duration::from_secs(60),
                ..common::config()
            },
        )
        .unwrap(),
    );
    let start = Arc::new(Barrier::new(THREADS));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (pool, c, start) = (Arc::clone(&pool), Arc::clone(&c), Arc::clone(&start));
            thread::spawn(move || {
                let mut rng = rng_for(t);
                start.wait();
                for _ in 0..ITERATIONS {
                    let h = pool.acquire().unwrap();
                    c.hold(h.id);
                    assert_eq!(pool.stats().in_use_count, 1);
                    if rng.one_in(4) {
                        pause(&mut rng);
                    }
                    c.unhold(h.id);
                    drop(h);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let s = pool.stats();
    assert_eq!(
        (s.hit_count, s.miss_count),
        ((THREADS * ITERATIONS) as u64 - 1, 1),
        "{s:?}"
    );
    assert_eq!((s.created_count, s.idle_count, s.in_use_count), (1, 1, 0));
    assert_eq!((s.waiting_count, s.evict_count), (0, 0));
}

/// Shutdown while 16 threads acquire and release: nothing is left idle, nothing leaks, and
/// every acquire either succeeded before or failed with `ShutDown`.
#[test]
fn shutdown_under_load_destroys_everything() {
    for round in 0..20 {
        let (m, c) = MockManager::new();
        // Releases spend a while in `reset`, after their first look at the shutdown flag, so
        // the shutdown often lands between that look and the push.
        c.reset_spins.store(2000, SeqCst);
        let pool = Arc::new(
            Pool::new(
                m,
                PoolConfig {
                    min_size: 2,
                    max_size: 6,
                    max_in_use: 10,
                    ..common::config()
                },
            )
            .unwrap(),
        );
        let start = Arc::new(Barrier::new(THREADS + 1));
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let (pool, c, start) = (Arc::clone(&pool), Arc::clone(&c), Arc::clone(&start));
                thread::spawn(move || {
                    let mut rng = rng_for(t + 100 * round);
                    start.wait();
                    let mut ok = 0u64;
                    loop {
                        match pool.acquire() {
                            Ok(h) => {
                                ok += 1;
                                c.hold(h.id);
                                pause(&mut rng);
                                c.unhold(h.id);
                                drop(h);
                            }
                            Err(PoolError::ShutDown) => return ok,
                            Err(e) => panic!("unexpected acquire error: {e}"),
                        }
                    }
                })
            })
            .collect();
        start.wait();
        thread::sleep(Duration::from_millis(5 + 5 * (round % 4) as u64));
        pool.shutdown();
        let ok: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
        let s = pool.stats();
        assert!(ok > 0);
        assert_eq!(s.hit_count + s.miss_count, ok, "{s:?}");
        assert_eq!((s.idle_count, s.in_use_count, s.waiting_count), (0, 0, 0));
        assert_eq!(s.created_count, s.destroyed_count, "{s:?}");
        assert_eq!(c.alive.load(SeqCst), 0, "round {round}: {s:?}");
    }
}
