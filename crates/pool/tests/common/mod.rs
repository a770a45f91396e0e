//! The mock resource and manager shared by kiln-pool's tests: counters for every hook,
//! injectable failures (create, health check, reset, reusability, panics), deaths of idle
//! resources (`kill`: `is_alive` then says no), a gate that holds the background thread inside
//! `create`, and a registry proving no resource has two holders.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use kiln_pool::{Manager, PoolConfig, MAINTENANCE_THREAD_NAME};

#[derive(Debug, thiserror::Error)]
#[error("mock failure: {0}")]
pub struct MockError(pub &'static str);

/// A pooled mock. Tests flip its flags through the handle to inject failures at release.
#[derive(Debug)]
pub struct MockRes {
    pub id: u64,
    /// Set by a "user"; `reset` clears it. Seen set on acquire = reset was skipped.
    pub dirty: bool,
    /// `health_check` fails while false.
    pub healthy: bool,
    /// `reset` fails while true.
    pub fail_reset: bool,
    /// `reset` panics while true.
    pub panic_reset: bool,
    /// `is_reusable` answer.
    pub reusable: bool,
}

/// Counters and switches, shared with the test through an `Arc` so they outlive the pool.
#[derive(Debug, Default)]
pub struct Counters {
    pub next_id: AtomicU64,
    pub created: AtomicU64,
    pub destroyed: AtomicU64,
    pub health_checks: AtomicU64,
    pub resets: AtomicU64,
    pub reusable_checks: AtomicU64,
    /// `is_alive` calls, and how many of them answered "dead".
    pub alive_checks: AtomicU64,
    pub found_dead: AtomicU64,
    /// Ids `kill`ed: `is_alive` says no for them (like a VM whose guest died while idle).
    pub dead: Mutex<HashSet<u64>>,
    /// Ids `is_alive` said "dead" for (the pool must never hand them out afterwards).
    pub found_dead_ids: Mutex<HashSet<u64>>,
    /// Panic in the next `is_alive`.
    pub panic_next_alive: AtomicBool,
    /// Panic in the next `destroy` (the resource is dropped uncounted).
    pub panic_next_destroy: AtomicBool,
    /// Fail this many upcoming creates.
    pub fail_creates: AtomicU64,
    /// Fail every Nth create attempt (0: never).
    pub fail_every_nth_create: AtomicU64,
    pub create_attempts: AtomicU64,
    pub create_failures: AtomicU64,
    /// Panic in the next create.
    pub panic_next_create: AtomicBool,
    /// Busy-wait this many spins in every `reset` (widens race windows in stress tests).
    pub reset_spins: AtomicU64,
    /// Resources alive (created, not yet destroyed); `max_alive` is the high-water mark.
    pub alive: AtomicUsize,
    pub max_alive: AtomicUsize,
    /// Ids handed to `destroy`, in order.
    pub destroyed_ids: Mutex<Vec<u64>>,
    /// Ids currently held by a test "user" (see `hold`/`unhold`).
    pub held: Mutex<HashSet<u64>>,
    /// While closed (true), creates on the maintenance thread block.
    pub gate_closed: Mutex<bool>,
    pub gate_cv: Condvar,
    /// Maintenance-thread creates currently blocked at the gate.
    pub blocked_at_gate: AtomicUsize,
}

impl Counters {
    pub fn close_gate(&self) {
        *self.gate_closed.lock().unwrap() = true;
    }

    pub fn open_gate(&self) {
        *self.gate_closed.lock().unwrap() = false;
        self.gate_cv.notify_all();
    }

    /// Registers `id` as held; panics if someone already holds it.
    pub fn hold(&self, id: u64) {
        assert!(
            self.held.lock().unwrap().insert(id),
            "resource {id} handed to two holders at once"
        );
    }

    pub fn unhold(&self, id: u64) {
        assert!(self.held.lock().unwrap().remove(&id));
    }

    /// The resource `id` dies (wherever it is: idle, in use or gone).
    pub fn kill(&self, id: u64) {
        self.dead.lock().unwrap().insert(id);
    }

    /// Whether `is_alive` ever answered "dead" for `id`.
    pub fn was_found_dead(&self, id: u64) -> bool {
        self.found_dead_ids.lock().unwrap().contains(&id)
    }

    pub fn destroyed_ids(&self) -> Vec<u64> {
        self.destroyed_ids.lock().unwrap().clone()
    }

    pub fn get(&self, counter: &AtomicU64) -> u64 {
        counter.load(SeqCst)
    }
}

#[derive(Debug, Clone, Default)]
pub struct MockManager {
    pub c: Arc<Counters>,
}

impl MockManager {
    pub fn new() -> (Self, Arc<Counters>) {
        let m = Self::default();
        let c = Arc::clone(&m.c);
        (m, c)
    }
}

impl Manager for MockManager {
    type Resource = MockRes;
    type Error = MockError;

    fn create(&self) -> Result<MockRes, MockError> {
        let c = &self.c;
        if thread::current().name() == Some(MAINTENANCE_THREAD_NAME) {
            let mut closed = c.gate_closed.lock().unwrap();
            if *closed {
                c.blocked_at_gate.fetch_add(1, SeqCst);
                while *closed {
                    closed = c.gate_cv.wait(closed).unwrap();
                }
                c.blocked_at_gate.fetch_sub(1, SeqCst);
            }
        }
        if c.panic_next_create.swap(false, SeqCst) {
            panic!("mock create panics (injected)");
        }
        let attempt = c.create_attempts.fetch_add(1, SeqCst) + 1;
        let nth = c.fail_every_nth_create.load(SeqCst);
        let injected = c
            .fail_creates
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if injected || (nth != 0 && attempt % nth == 0) {
            c.create_failures.fetch_add(1, SeqCst);
            return Err(MockError("create"));
        }
        c.created.fetch_add(1, SeqCst);
        let alive = c.alive.fetch_add(1, SeqCst) + 1;
        c.max_alive.fetch_max(alive, SeqCst);
        Ok(MockRes {
            id: c.next_id.fetch_add(1, SeqCst),
            dirty: false,
            healthy: true,
            fail_reset: false,
            panic_reset: false,
            reusable: true,
        })
    }

    fn health_check(&self, r: &mut MockRes) -> Result<(), MockError> {
        self.c.health_checks.fetch_add(1, SeqCst);
        if r.healthy {
            Ok(())
        } else {
            Err(MockError("health check"))
        }
    }

    fn reset(&self, r: &mut MockRes) -> Result<(), MockError> {
        self.c.resets.fetch_add(1, SeqCst);
        for _ in 0..self.c.reset_spins.load(SeqCst) {
            std::hint::spin_loop();
        }
        if r.panic_reset {
            panic!("mock reset panics (injected)");
        }
        if r.fail_reset {
            return Err(MockError("reset"));
        }
        r.dirty = false;
        Ok(())
    }

    fn is_reusable(&self, r: &MockRes) -> bool {
        self.c.reusable_checks.fetch_add(1, SeqCst);
        r.reusable
    }

    fn is_alive(&self, r: &MockRes) -> bool {
        self.c.alive_checks.fetch_add(1, SeqCst);
        if self.c.panic_next_alive.swap(false, SeqCst) {
            panic!("mock is_alive panics (injected)");
        }
        let alive = !self.c.dead.lock().unwrap().contains(&r.id);
        if !alive {
            self.c.found_dead.fetch_add(1, SeqCst);
            self.c.found_dead_ids.lock().unwrap().insert(r.id);
        }
        alive
    }

    fn destroy(&self, r: MockRes) {
        if self.c.panic_next_destroy.swap(false, SeqCst) {
            panic!("mock destroy panics (injected)");
        }
        self.c.destroyed.fetch_add(1, SeqCst);
        self.c.alive.fetch_sub(1, SeqCst);
        self.c.destroyed_ids.lock().unwrap().push(r.id);
    }
}

/// A config with no prewarming, no TTL and a fast background tick: tests override fields.
pub fn config() -> PoolConfig {
    PoolConfig {
        min_size: 0,
        max_size: 4,
        max_idle_duration: None,
        health_check_interval: 1,
        max_in_use: 64,
        acquire_timeout: Duration::from_secs(10),
        maintenance_interval: Duration::from_millis(5),
    }
}

/// Polls `cond` every millisecond until it holds or 10 s pass; returns whether it held.
pub fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(1));
    }
    cond()
}
