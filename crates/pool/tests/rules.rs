//! One test (or more) per pool rule, against the mock manager in `common`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{config, wait_until, MockManager};
use kiln_pool::{Pool, PoolConfig, PoolError};

fn pool(cfg: PoolConfig) -> (Pool<MockManager>, Arc<common::Counters>) {
    pool_after(cfg, |_| {})
}

/// Like `pool`, with `setup` run on the counters before the pool (and its background thread)
/// starts: failures injected here hit the very first creates.
fn pool_after(
    cfg: PoolConfig,
    setup: impl FnOnce(&common::Counters),
) -> (Pool<MockManager>, Arc<common::Counters>) {
    let (m, c) = MockManager::new();
    setup(&c);
    (Pool::new(m, cfg).unwrap(), c)
}

/// `config()` with at most one resource in use.
fn one_in_use() -> PoolConfig {
    PoolConfig {
        max_in_use: 1,
        ..config()
    }
}

/// `config()` with `min_size` resources kept warm.
fn min_size(min_size: usize) -> PoolConfig {
    PoolConfig {
        min_size,
        ..config()
    }
}

/// A pool with `min_size` `n`, once the background thread has prewarmed all `n`.
fn prewarmed(n: usize) -> (Pool<MockManager>, Arc<common::Counters>) {
    let (pool, c) = pool(min_size(n));
    assert!(wait_until(|| pool.stats().idle_count == n), "prewarm {n}");
    (pool, c)
}

/// An `acquire` on another thread, returned once it waits for an in-use slot.
fn spawn_waiter(
    pool: &Arc<Pool<MockManager>>,
) -> thread::JoinHandle<Result<u64, PoolError<common::MockError>>> {
    let p = Arc::clone(pool);
    let waiter = thread::spawn(move || p.acquire().map(|h| h.id));
    assert!(wait_until(|| pool.stats().waiting_count == 1));
    waiter
}

/// `f` panics (the pool's state afterwards is what the caller checks).
fn assert_panics<R>(f: impl FnOnce() -> R) {
    assert!(panic::catch_unwind(AssertUnwindSafe(f)).is_err());
}

#[test]
fn hits_and_misses_are_counted() {
    let (pool, c) = pool(config());
    let a = pool.acquire().unwrap(); // miss: nothing idle
    drop(a);
    let b = pool.acquire().unwrap(); // hit
    let d = pool.acquire().unwrap(); // miss: the only idle one is out
    let s = pool.stats();
    assert_eq!((s.hit_count, s.miss_count), (1, 2));
    assert_eq!((s.created_count, s.in_use_count, s.idle_count), (2, 2, 0));
    assert_eq!(c.get(&c.created), 2);
    drop((b, d));
    let s = pool.stats();
    assert_eq!((s.in_use_count, s.idle_count, s.evict_count), (0, 2, 0));
}

#[test]
fn hit_pops_the_most_recently_used() {
    let (pool, _c) = pool(config());
    assert_eq!(pool.warm(3).unwrap(), 3);
    // Warmed in id order 0, 1, 2: the last one is the most recently used.
    let a = pool.acquire().unwrap();
    assert_eq!(a.id, 2);
    let b = pool.acquire().unwrap();
    assert_eq!(b.id, 1);
    drop(b);
    drop(a);
    // a (id 2) was returned last.
    assert_eq!(pool.acquire().unwrap().id, 2);
}

#[test]
fn reset_runs_between_users() {
    let (pool, c) = pool(config());
    let mut a = pool.acquire().unwrap();
    a.dirty = true;
    let id = a.id;
    drop(a);
    assert_eq!(c.get(&c.resets), 1);
    let b = pool.acquire().unwrap();
    assert_eq!(b.id, id);
    assert!(!b.dirty, "the next user sees the previous user's state");
    assert_eq!(b.previous_uses(), 1);
}

#[test]
fn lru_evicts_at_capacity() {
    let (pool, c) = pool(PoolConfig {
        max_size: 2,
        ..config()
    });
    let a = pool.acquire().unwrap();
    let b = pool.acquire().unwrap();
    let d = pool.acquire().unwrap();
    let (ida, idb, idd) = (a.id, b.id, d.id);
    drop(a);
    drop(b);
    assert_eq!(pool.stats().evict_count, 0);
    drop(d); // three idle > max_size 2: a, returned first, is least recently used
    let s = pool.stats();
    assert_eq!((s.idle_count, s.evict_count, s.destroyed_count), (2, 1, 1));
    assert_eq!(c.destroyed_ids(), vec![ida]);
    assert_eq!(pool.acquire().unwrap().id, idd);
    let _d = pool.acquire().unwrap();
    let _b = pool.acquire().unwrap();
    assert_eq!(_b.id, idb);
}

#[test]
fn idle_ttl_evicts_expired_resources() {
    let (pool, c) = pool(PoolConfig {
        max_idle_duration: Some(Duration::from_millis(30)),
        ..config()
    });
    assert_eq!(pool.warm(3).unwrap(), 3);
    assert!(wait_until(|| pool.stats().idle_count == 0));
    let s = pool.stats();
    assert_eq!((s.evict_count, s.destroyed_count), (3, 3));
    assert_eq!(c.get(&c.destroyed), 3);
}

#[test]
fn idle_ttl_keeps_the_min_size_most_recent() {
    let (pool, c) = pool(PoolConfig {
        min_size: 2,
        max_idle_duration: Some(Duration::from_millis(30)),
        ..config()
    });
    assert!(
        wait_until(|| pool.stats().idle_count == 2),
        "min_size prewarm"
    );
    let first_two = { c.next_id.load(SeqCst) };
    assert_eq!(first_two, 2);
    assert_eq!(pool.warm(2).unwrap(), 2); // ids 2, 3: now the most recently used
    assert!(wait_until(|| pool.stats().evict_count == 2));
    let mut destroyed = c.destroyed_ids();
    destroyed.sort_unstable();
    assert_eq!(
        destroyed,
        vec![0, 1],
        "the least recently used expire first"
    );
    // The remaining min_size stay warm: no churn of evict-and-recreate.
    thread::sleep(Duration::from_millis(150));
    let s = pool.stats();
    assert_eq!((s.idle_count, s.evict_count, s.created_count), (2, 2, 4));
}

#[test]
fn min_size_is_prewarmed_in_the_background() {
    let (pool, c) = prewarmed(3);
    let s = pool.stats();
    assert_eq!((s.created_count, s.miss_count), (3, 0));
    let _a = pool.acquire().unwrap();
    assert_eq!(pool.stats().hit_count, 1);
    // The hit dropped idle below min_size: the background thread refills.
    assert!(wait_until(|| pool.stats().idle_count == 3));
    assert_eq!(c.get(&c.created), 4);
}

#[test]
fn background_refill_does_not_block_acquire() {
    // The maintenance thread will block inside create().
    let (pool, c) = pool_after(min_size(2), |c| c.close_gate());
    let pool = Arc::new(pool);
    assert!(wait_until(|| c.blocked_at_gate.load(SeqCst) == 1));
    let (tx, rx) = mpsc::channel();
    let p = Arc::clone(&pool);
    let t = thread::spawn(move || {
        let r = p.acquire().map(|h| h.id);
        tx.send(r).unwrap();
    });
    let got = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("acquire() blocked behind the background creation");
    assert!(got.is_ok());
    t.join().unwrap();
    assert_eq!(pool.stats().miss_count, 1);
    c.open_gate();
    // The returned resource plus the background creation that was held at the gate.
    assert!(wait_until(|| pool.stats().idle_count == 2));
    assert_eq!(pool.stats().created_count, 2);
}

#[test]
fn failed_health_check_evicts_and_replenishes() {
    let (pool, c) = prewarmed(1);
    let mut h = pool.acquire().unwrap();
    let id = h.id;
    h.healthy = false;
    drop(h);
    assert_eq!(c.get(&c.health_checks), 1);
    assert_eq!(c.destroyed_ids(), vec![id]);
    assert_eq!(c.get(&c.resets), 0, "an unhealthy resource is not reset");
    assert!(
        wait_until(|| {
            let s = pool.stats();
            s.idle_count == 1 && s.created_count == 2
        }),
        "the background thread refills to min_size"
    );
    let s = pool.stats();
    assert_eq!((s.evict_count, s.destroyed_count), (1, 1));
    assert_ne!(pool.acquire().unwrap().id, id);
}

/// A config whose background pass never runs on its own (min_size 0: never woken; the tick is
/// an hour), so only the check on a hit can find dead resources.
fn hit_check_only() -> PoolConfig {
    PoolConfig {
        maintenance_interval: Duration::from_secs(3600),
        ..config()
    }
}

#[test]
fn a_dead_idle_resource_is_never_handed_out() {
    let (pool, c) = pool(PoolConfig {
        max_in_use: 1,
        ..hit_check_only()
    });
    assert_eq!(pool.warm(2).unwrap(), 2); // ids 0, 1; 1 is the most recently used
    c.kill(1);
    let a = pool.acquire_timeout(Duration::ZERO).unwrap();
    assert_eq!(a.id, 0, "the dead most recently used one was skipped");
    let s = pool.stats();
    assert_eq!((s.hit_count, s.miss_count), (1, 0), "{s:?}");
    assert_eq!((s.evict_count, s.dead_count, s.destroyed_count), (1, 1, 1));
    assert_eq!((s.idle_count, s.in_use_count), (0, 1));
    assert_eq!(c.destroyed_ids(), vec![1]);
    assert_eq!(c.get(&c.alive_checks), 2);

    // The only idle one dies after its return: the next acquire creates (a miss) within the
    // same in-use slot (max_in_use 1, no wait).
    drop(a);
    c.kill(0);
    let b = pool.acquire_timeout(Duration::ZERO).unwrap();
    assert_eq!(b.id, 2);
    assert!(!c.was_found_dead(b.id));
    let s = pool.stats();
    assert_eq!((s.hit_count, s.miss_count), (1, 1), "{s:?}");
    assert_eq!((s.evict_count, s.dead_count, s.destroyed_count), (2, 2, 2));
    assert_eq!((s.created_count, s.in_use_count, s.idle_count), (3, 1, 0));
    assert_eq!(c.destroyed_ids(), vec![1, 0]);
    assert_eq!(c.get(&c.found_dead), 2);

    // Alive ones are handed out as before; is_alive runs on every hit.
    drop(b);
    let checks = c.get(&c.alive_checks);
    drop(pool.acquire().unwrap());
    assert_eq!(c.get(&c.alive_checks), checks + 1);
    assert_eq!(pool.stats().hit_count, 2);

    pool.shutdown();
    let s = pool.stats();
    assert_eq!(s.created_count, s.destroyed_count, "{s:?}");
}

#[test]
fn several_dead_idle_resources_are_all_skipped() {
    let (pool, c) = pool(hit_check_only());
    assert_eq!(pool.warm(4).unwrap(), 4); // ids 0..4
    for id in [3, 2, 0] {
        c.kill(id);
    }
    // 3 and 2 (most recently used first) are found dead, 1 is handed out; 0 stays idle.
    let h = pool.acquire().unwrap();
    assert_eq!(h.id, 1);
    let s = pool.stats();
    assert_eq!(
        (s.hit_count, s.miss_count, s.dead_count),
        (1, 0, 2),
        "{s:?}"
    );
    assert_eq!(s.idle_count, 1);
    // The last idle one is dead too: a miss.
    let h2 = pool.acquire().unwrap();
    assert_eq!(h2.id, 4);
    let s = pool.stats();
    assert_eq!(
        (s.hit_count, s.miss_count, s.dead_count),
        (1, 1, 3),
        "{s:?}"
    );
    assert_eq!(s.hit_count + s.miss_count, 2, "two successful acquires");
    assert_eq!(c.destroyed_ids(), vec![3, 2, 0]);
}

#[test]
fn dead_idle_resources_are_replaced_in_the_background() {
    let (pool, c) = prewarmed(2);
    c.kill(0);
    c.kill(1);
    // No acquire: the background pass finds both dead and refills min_size.
    assert!(
        wait_until(|| {
            let s = pool.stats();
            s.dead_count == 2 && s.idle_count == 2
        }),
        "{:?}",
        pool.stats()
    );
    let s = pool.stats();
    assert_eq!((s.hit_count, s.miss_count), (0, 0), "{s:?}");
    assert_eq!(
        (s.evict_count, s.destroyed_count, s.created_count),
        (2, 2, 4)
    );
    let mut destroyed = c.destroyed_ids();
    destroyed.sort_unstable();
    assert_eq!(destroyed, vec![0, 1]);
    let h = pool.acquire().unwrap();
    assert!(h.id >= 2, "a replacement, not a dead one: {}", h.id);
    assert_eq!(pool.stats().hit_count, 1);
}

#[test]
fn panicking_is_alive_on_a_hit_frees_its_slot() {
    let (pool, c) = pool(PoolConfig {
        max_in_use: 1,
        ..hit_check_only()
    });
    assert_eq!(pool.warm(1).unwrap(), 1);
    c.panic_next_alive.store(true, SeqCst);
    assert_panics(|| pool.acquire());
    let s = pool.stats();
    assert_eq!((s.in_use_count, s.idle_count), (0, 0), "{s:?}");
    assert_eq!(
        (s.hit_count, s.miss_count),
        (0, 0),
        "the hit was rolled back"
    );
    assert_eq!((s.evict_count, s.destroyed_count), (1, 1));
    // The slot is free again.
    let h = pool.acquire_timeout(Duration::ZERO).unwrap();
    assert_eq!(h.id, 1);
}

#[test]
fn panicking_destroy_of_a_dead_idle_resource_frees_its_slot() {
    let (pool, c) = pool(PoolConfig {
        max_in_use: 1,
        ..hit_check_only()
    });
    assert_eq!(pool.warm(1).unwrap(), 1);
    c.kill(0);
    c.panic_next_destroy.store(true, SeqCst);
    assert_panics(|| pool.acquire());
    let s = pool.stats();
    assert_eq!((s.in_use_count, s.idle_count), (0, 0), "{s:?}");
    assert_eq!((s.hit_count, s.miss_count), (0, 0), "{s:?}");
    assert_eq!((s.dead_count, s.evict_count, s.destroyed_count), (1, 1, 1));
    assert_eq!(pool.acquire_timeout(Duration::ZERO).unwrap().id, 1);
}

#[test]
fn panicking_is_alive_in_the_background_keeps_the_thread_alive() {
    let (pool, c) = prewarmed(1);
    c.panic_next_alive.store(true, SeqCst);
    assert!(wait_until(|| !c.panic_next_alive.load(SeqCst)));
    // The panicking pass changed nothing; later passes still find and replace dead ones.
    let s = pool.stats();
    assert_eq!(
        (s.idle_count, s.evict_count, s.dead_count),
        (1, 0, 0),
        "{s:?}"
    );
    c.kill(0);
    assert!(wait_until(|| {
        let s = pool.stats();
        s.dead_count == 1 && s.idle_count == 1
    }));
    assert_eq!(pool.acquire().unwrap().id, 1);
}

#[test]
fn health_check_runs_every_nth_release() {
    let (pool, c) = pool(PoolConfig {
        health_check_interval: 3,
        ..config()
    });
    for use_no in 0..7u32 {
        let h = pool.acquire().unwrap();
        assert_eq!(h.previous_uses(), use_no);
    }
    // Releases 3 and 6 of the one resource were checked; all 7 were reset.
    assert_eq!(c.get(&c.health_checks), 2);
    assert_eq!(c.get(&c.resets), 7);
    assert_eq!(pool.stats().created_count, 1);
}

#[test]
fn health_check_interval_zero_never_checks() {
    let (pool, c) = pool(PoolConfig {
        health_check_interval: 0,
        ..config()
    });
    for _ in 0..5 {
        let mut h = pool.acquire().unwrap();
        h.healthy = false;
    }
    assert_eq!(c.get(&c.health_checks), 0);
    assert_eq!(pool.stats().created_count, 1);
}

#[test]
fn failed_create_rolls_counters_back() {
    let (pool, c) = pool(one_in_use());
    c.fail_creates.store(1, SeqCst);
    match pool.acquire() {
        Err(PoolError::Create(e)) => assert_eq!(e.0, "create"),
        other => panic!("expected Create error, got {other:?}"),
    }
    let s = pool.stats();
    assert_eq!(
        (
            s.miss_count,
            s.in_use_count,
            s.created_count,
            s.create_failed_count
        ),
        (0, 0, 0, 1)
    );
    // The in-use slot was given back: the only slot is free at once.
    let h = pool.acquire_timeout(Duration::ZERO).unwrap();
    assert_eq!(h.id, 0);
    let s = pool.stats();
    assert_eq!((s.miss_count, s.in_use_count, s.created_count), (1, 1, 1));
}

#[test]
fn failed_create_error_has_a_source() {
    let (pool, c) = pool(config());
    c.fail_creates.store(1, SeqCst);
    let err = pool.acquire().unwrap_err();
    let source = std::error::Error::source(&err).expect("Create carries the manager's error");
    assert_eq!(source.to_string(), "mock failure: create");
}

#[test]
fn failed_background_create_rolls_back_and_retries() {
    let (pool, _c) = pool_after(min_size(1), |c| c.fail_creates.store(2, SeqCst));
    // Two failed attempts (retried on later ticks), then success.
    assert!(wait_until(|| pool.stats().idle_count == 1));
    let s = pool.stats();
    assert_eq!((s.create_failed_count, s.created_count), (2, 1));
}

#[test]
fn reset_failure_destroys_instead_of_pooling() {
    let (pool, c) = pool(config());
    let mut h = pool.acquire().unwrap();
    h.fail_reset = true;
    let id = h.id;
    drop(h);
    let s = pool.stats();
    assert_eq!((s.idle_count, s.in_use_count), (0, 0));
    assert_eq!((s.evict_count, s.destroyed_count), (1, 1));
    assert_eq!(c.destroyed_ids(), vec![id]);
    assert_eq!(pool.acquire().unwrap().id, id + 1, "next acquire is a miss");
}

#[test]
fn not_reusable_is_destroyed_without_reset() {
    let (pool, c) = pool(config());
    let mut h = pool.acquire().unwrap();
    h.reusable = false;
    drop(h);
    assert_eq!(c.get(&c.destroyed), 1);
    assert_eq!(c.get(&c.resets), 0);
    assert_eq!(c.get(&c.health_checks), 0);
    assert_eq!(pool.stats().idle_count, 0);
}

#[test]
fn acquire_times_out_at_the_in_use_cap() {
    let (pool, _c) = pool(PoolConfig {
        max_in_use: 2,
        acquire_timeout: Duration::from_millis(50),
        ..config()
    });
    let _a = pool.acquire().unwrap();
    let _b = pool.acquire().unwrap();
    let start = Instant::now();
    match pool.acquire() {
        Err(PoolError::TimedOut {
            waited,
            in_use,
            max_in_use,
        }) => {
            assert_eq!((in_use, max_in_use), (2, 2));
            assert!(waited >= Duration::from_millis(50), "{waited:?}");
        }
        other => panic!("expected TimedOut, got {other:?}"),
    }
    assert!(start.elapsed() >= Duration::from_millis(50));
    assert!(matches!(
        pool.acquire_timeout(Duration::ZERO),
        Err(PoolError::TimedOut { .. })
    ));
    let s = pool.stats();
    assert_eq!((s.in_use_count, s.waiting_count, s.miss_count), (2, 0, 2));
}

#[test]
fn waiter_gets_the_released_resource() {
    let (pool, _c) = pool(one_in_use());
    let pool = Arc::new(pool);
    let h = pool.acquire().unwrap();
    let id = h.id;
    let waiter = spawn_waiter(&pool);
    drop(h);
    assert_eq!(waiter.join().unwrap().unwrap(), id);
    assert_eq!(pool.stats().hit_count, 1);
}

#[test]
fn shutdown_while_handles_are_out() {
    let (pool, c) = pool(config());
    assert_eq!(pool.warm(3).unwrap(), 3);
    let mut a = pool.acquire().unwrap();
    let b = pool.acquire().unwrap();
    pool.shutdown();
    assert!(pool.is_shut_down());
    let s = pool.stats();
    assert_eq!((s.idle_count, s.in_use_count, s.destroyed_count), (0, 2, 1));
    assert!(matches!(pool.acquire(), Err(PoolError::ShutDown)));
    assert!(matches!(pool.warm(1), Err(PoolError::ShutDown)));
    // Handles still work after shutdown...
    a.dirty = true;
    assert!(a.dirty);
    // ...and are destroyed, not reset, when returned.
    drop(a);
    drop(b);
    assert_eq!(c.get(&c.resets), 0);
    let s = pool.stats();
    assert_eq!((s.in_use_count, s.idle_count), (0, 0));
    assert_eq!((s.created_count, s.destroyed_count), (3, 3));
    assert_eq!(c.get(&c.destroyed), 3);
    pool.shutdown(); // idempotent
}

#[test]
fn shutdown_fails_waiting_acquires() {
    let (pool, _c) = pool(one_in_use());
    let pool = Arc::new(pool);
    let _h = pool.acquire().unwrap();
    let waiter = spawn_waiter(&pool);
    pool.shutdown();
    assert!(matches!(waiter.join().unwrap(), Err(PoolError::ShutDown)));
}

#[test]
fn dropping_the_pool_destroys_idle_resources() {
    let (pool, c) = prewarmed(2);
    let h = pool.acquire().unwrap();
    drop(pool);
    assert_eq!(c.get(&c.destroyed), c.get(&c.created) - 1);
    drop(h);
    assert_eq!(c.get(&c.destroyed), c.get(&c.created));
}

#[test]
fn warm_creates_n_bounded_by_max_size() {
    let (pool, c) = pool(PoolConfig {
        max_size: 3,
        ..config()
    });
    assert_eq!(pool.warm(2).unwrap(), 2);
    assert_eq!(pool.stats().idle_count, 2);
    assert_eq!(pool.warm(5).unwrap(), 1);
    assert_eq!(pool.warm(1).unwrap(), 0);
    let s = pool.stats();
    assert_eq!((s.idle_count, s.created_count, s.miss_count), (3, 3, 0));
    assert_eq!(c.get(&c.created), 3);
}

#[test]
fn warm_reports_create_failure_and_rolls_back() {
    let (pool, c) = pool(PoolConfig {
        max_size: 2,
        ..config()
    });
    c.fail_creates.store(1, SeqCst);
    assert!(matches!(pool.warm(2), Err(PoolError::Create(_))));
    let s = pool.stats();
    assert_eq!((s.idle_count, s.create_failed_count), (0, 1));
    // The failed creation's reservation was released: both slots can be warmed.
    assert_eq!(pool.warm(2).unwrap(), 2);
}

#[test]
fn detach_takes_the_resource_out_of_the_pool() {
    let (pool, c) = pool(one_in_use());
    let h = pool.acquire().unwrap();
    let r = h.detach();
    assert_eq!(r.id, 0);
    let s = pool.stats();
    assert_eq!((s.in_use_count, s.idle_count, s.destroyed_count), (0, 0, 0));
    assert_eq!(c.get(&c.destroyed), 0);
    assert!(pool.acquire_timeout(Duration::ZERO).is_ok());
}

#[test]
fn panicking_create_frees_its_slot() {
    let (pool, c) = pool(one_in_use());
    c.panic_next_create.store(true, SeqCst);
    assert_panics(|| pool.acquire());
    let s = pool.stats();
    assert_eq!(
        (s.in_use_count, s.miss_count, s.create_failed_count),
        (0, 0, 1)
    );
    assert!(pool.acquire_timeout(Duration::ZERO).is_ok());
}

#[test]
fn panicking_reset_frees_its_slot() {
    let (pool, _c) = pool(one_in_use());
    let mut h = pool.acquire().unwrap();
    h.panic_reset = true;
    assert_panics(move || drop(h));
    let s = pool.stats();
    assert_eq!((s.in_use_count, s.idle_count, s.evict_count), (0, 0, 1));
    assert!(pool.acquire_timeout(Duration::ZERO).is_ok());
}

#[test]
fn panicking_background_create_keeps_the_thread_alive() {
    let (pool, _c) = pool_after(min_size(1), |c| c.panic_next_create.store(true, SeqCst));
    assert!(wait_until(|| pool.stats().idle_count == 1));
    assert_eq!(pool.stats().create_failed_count, 1);
}

#[test]
fn invalid_configs_name_the_field() {
    let cases: Vec<(PoolConfig, &str)> = vec![
        (
            PoolConfig {
                max_size: 0,
                ..config()
            },
            "max_size",
        ),
        (
            PoolConfig {
                min_size: 5,
                max_size: 4,
                ..config()
            },
            "min_size",
        ),
        (
            PoolConfig {
                max_idle_duration: Some(Duration::ZERO),
                ..config()
            },
            "max_idle_duration",
        ),
        (
            PoolConfig {
                max_in_use: 0,
                ..config()
            },
            "max_in_use",
        ),
        (
            PoolConfig {
                maintenance_interval: Duration::ZERO,
                ..config()
            },
            "maintenance_interval",
        ),
    ];
    for (cfg, field) in cases {
        assert_eq!(cfg.validate().unwrap_err().field, field);
        let (m, c) = MockManager::new();
        match Pool::new(m, cfg) {
            Err(PoolError::InvalidConfig(e)) => {
                assert_eq!(e.field, field);
                assert!(e.to_string().contains(field), "{e}");
            }
            other => panic!("{field}: expected InvalidConfig, got {other:?}"),
        }
        assert_eq!(c.get(&c.created), 0);
    }
    assert!(PoolConfig::default().validate().is_ok());
    assert!(config().validate().is_ok());
}

/// Runs `f` on a new thread (so it has a home shard of its own, or shares one) and waits.
fn on_thread<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    thread::spawn(f).join().unwrap()
}

#[test]
fn a_hit_takes_what_another_thread_returned() {
    let (pool, _c) = pool(config());
    let pool = Arc::new(pool);
    let p = Arc::clone(&pool);
    let id = on_thread(move || p.acquire().unwrap().id); // a miss, returned by that thread
    assert_eq!(
        pool.acquire().unwrap().id,
        id,
        "idle in another shard is still a hit"
    );
    let s = pool.stats();
    assert_eq!((s.hit_count, s.miss_count, s.created_count), (1, 1, 1));
}

#[test]
fn lru_eviction_is_global_across_threads() {
    let (pool, c) = pool(PoolConfig {
        max_size: 2,
        ..config()
    });
    let pool = Arc::new(pool);
    let handles: Vec<_> = (0..3).map(|_| pool.acquire().unwrap()).collect();
    let ids: Vec<u64> = handles.iter().map(|h| h.id).collect();
    // Each returned by its own thread, oldest first.
    for h in handles {
        on_thread(move || drop(h));
    }
    let s = pool.stats();
    assert_eq!((s.idle_count, s.evict_count), (2, 1), "{s:?}");
    assert_eq!(
        c.destroyed_ids(),
        vec![ids[0]],
        "the least recently used one"
    );
    let held: Vec<_> = (0..2).map(|_| pool.acquire().unwrap()).collect();
    let mut left: Vec<u64> = held.iter().map(|h| h.id).collect();
    left.sort_unstable();
    assert_eq!(left, vec![ids[1], ids[2]]);
}
