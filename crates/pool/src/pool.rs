//! The pool itself: [`Pool`] (acquire, warm, stats, shutdown), the RAII handle [`Pooled`] that
//! returns its resource on drop, and the background maintenance thread (evicting dead and
//! idle-TTL-expired resources, keeping `min_size` warm).
//!
//! Locking: one `Mutex<State>` guards the idle deque, the counters and the flags; a `Condvar`
//! wakes `acquire()` callers waiting for an in-use slot. Every [`Manager`] call happens with the
//! lock released, except `Manager::is_alive` in the background pass (documented on the trait).
//! The hot path (hit + release) touches the lock twice, allocates nothing, and only wakes the
//! background thread when the idle count falls below `min_size`.

use std::collections::VecDeque;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::config::PoolConfig;
use crate::error::PoolError;
use crate::manager::Manager;
use crate::stats::PoolStats;

/// The name of the background thread (visible in `top -H`, debuggers, and to a `Manager`).
pub const MAINTENANCE_THREAD_NAME: &str = "kiln-pool-maint";

/// Caps the up-front reservation of the idle deque (so `max_size: usize::MAX` does not try to
/// allocate everything at once).
const MAX_PREALLOCATED_IDLE: usize = 1024;

/// An idle resource with what the pool knows about it.
struct Entry<R> {
    resource: R,
    /// Completed uses (releases) of this resource, for `health_check_interval`.
    uses: u32,
    /// When it became idle, for `max_idle_duration`.
    idle_since: Instant,
}

/// Everything guarded by the pool's lock.
struct State<R> {
    /// Idle resources: front = least recently used, back = most recently used.
    idle: VecDeque<Entry<R>>,
    /// Slots taken by handles out plus `acquire()` calls creating a resource.
    in_use: usize,
    /// Creations in flight that will land in `idle` (background refill, `warm()`).
    creating_idle: usize,
    /// `acquire()` callers blocked on the condvar.
    waiters: usize,
    /// The background thread was asked to refill and has not reported it done.
    refill_requested: bool,
    shut_down: bool,
    hit_count: u64,
    miss_count: u64,
    evict_count: u64,
    dead_count: u64,
    created_count: u64,
    create_failed_count: u64,
    destroyed_count: u64,
}

impl<R> State<R> {
    /// Whether the idle count (with creations in flight) is below `min_size` and nobody has
    /// asked the background thread to refill yet. Marks the request as made.
    fn take_refill_request(&mut self, min_size: usize) -> bool {
        if self.shut_down
            || self.refill_requested
            || self.idle.len() + self.creating_idle >= min_size
        {
            return false;
        }
        self.refill_requested = true;
        true
    }
}

/// What `Pool` and every `Pooled` share.
struct Shared<M: Manager> {
    manager: M,
    config: PoolConfig,
    state: Mutex<State<M::Resource>>,
    /// Signalled when an in-use slot frees up (or on shutdown).
    slot_freed: Condvar,
    /// Mirrors `State::shut_down` so a handle returned after shutdown skips health check/reset.
    closed: AtomicBool,
    /// Wakes the background thread (capacity 1: wake-ups coalesce, sending never blocks).
    wake: Sender<()>,
}

impl<M: Manager> Shared<M> {
    fn lock(&self) -> MutexGuard<'_, State<M::Resource>> {
        // No Manager code runs under the lock and our own critical sections do not panic, so a
        // poisoned lock still guards consistent state: keep going.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake_maintainer(&self) {
        // Full means a wake-up is already pending; disconnected means the thread is gone
        // (shutdown). Neither needs anything from us.
        let _ = self.wake.try_send(());
    }

    /// Hands a resource back: the release rules of the crate docs.
    fn release(&self, mut resource: M::Resource, uses: u32) {
        // Dropped during unwinding if a Manager hook panics: frees the slot anyway.
        let slot = SlotGuard {
            shared: self,
            armed: true,
            kind: SlotKind::Release,
        };
        let verdict = if self.closed.load(Ordering::Acquire) {
            Verdict::Destroy(Discard::ShutDown)
        } else if !self.manager.is_reusable(&resource) {
            Verdict::Destroy(Discard::NotReusable)
        } else if self.health_check_due(uses) && self.health_check_fails(&mut resource) {
            Verdict::Destroy(Discard::HealthCheck)
        } else if let Err(error) = self.manager.reset(&mut resource) {
            tracing::debug!(%error, "kiln-pool: reset failed; destroying instead of pooling");
            Verdict::Destroy(Discard::Reset)
        } else {
            Verdict::Keep
        };
        let idle_since = Instant::now();
        let mut to_destroy = None;
        let mut state = self.lock();
        state.in_use -= 1;
        match verdict {
            Verdict::Keep if !state.shut_down => {
                state.idle.push_back(Entry {
                    resource,
                    uses,
                    idle_since,
                });
                if state.idle.len() > self.config.max_size {
                    // LRU: the front is the least recently used.
                    to_destroy = state.idle.pop_front().map(|e| e.resource);
                    state.evict_count += 1;
                    state.destroyed_count += 1;
                }
            }
            Verdict::Keep | Verdict::Destroy(Discard::ShutDown) => {
                state.destroyed_count += 1;
                to_destroy = Some(resource);
            }
            Verdict::Destroy(reason) => {
                tracing::trace!(?reason, "kiln-pool: destroying a returned resource");
                state.evict_count += 1;
                state.destroyed_count += 1;
                to_destroy = Some(resource);
            }
        }
        let notify = state.waiters > 0;
        let refill = state.take_refill_request(self.config.min_size);
        slot.disarm(state);
        if notify {
            self.slot_freed.notify_one();
        }
        if refill {
            self.wake_maintainer();
        }
        if let Some(resource) = to_destroy {
            self.manager.destroy(resource);
        }
    }

    fn health_check_due(&self, uses: u32) -> bool {
        let n = self.config.health_check_interval;
        n != 0 && uses % n == 0
    }

    fn health_check_fails(&self, resource: &mut M::Resource) -> bool {
        match self.manager.health_check(resource) {
            Ok(()) => false,
            Err(error) => {
                tracing::debug!(%error, "kiln-pool: health check failed; evicting");
                true
            }
        }
    }

    /// Creates one resource destined for the idle deque (refill or `warm()`); the caller has
    /// already counted it in `creating_idle`. Returns whether it was pooled.
    fn create_idle(&self) -> Result<bool, M::Error> {
        let guard = CreateGuard {
            shared: self,
            kind: CreateKind::Idle,
            armed: true,
        };
        let resource = self.manager.create()?;
        guard.disarm();
        let mut state = self.lock();
        state.creating_idle -= 1;
        state.created_count += 1;
        if state.shut_down || state.idle.len() >= self.config.max_size {
            state.destroyed_count += 1;
            drop(state);
            self.manager.destroy(resource);
            return Ok(false);
        }
        state.idle.push_back(Entry {
            resource,
            uses: 0,
            idle_since: Instant::now(),
        });
        Ok(true)
    }

    /// One pass of the background thread. Returns `false` once the pool is shut down.
    fn maintain(&self) -> bool {
        let mut expired = Vec::new();
        let mut dead = Vec::new();
        {
            let mut state = self.lock();
            if state.shut_down {
                return false;
            }
            // Dead idle resources: `is_alive` runs under the lock (see its docs). Find them all
            // first, then take them out, so a panicking `is_alive` leaves the state untouched.
            let mut dead_at = Vec::new();
            for (i, entry) in state.idle.iter().enumerate() {
                if !self.manager.is_alive(&entry.resource) {
                    dead_at.push(i);
                }
            }
            for &i in dead_at.iter().rev() {
                if let Some(entry) = state.idle.remove(i) {
                    dead.push(entry.resource);
                }
            }
            let n = dead.len() as u64;
            state.evict_count += n;
            state.dead_count += n;
            state.destroyed_count += n;
            if let Some(ttl) = self.config.max_idle_duration {
                let now = Instant::now();
                while state.idle.len() > self.config.min_size {
                    let oldest_is_expired = state
                        .idle
                        .front()
                        .is_some_and(|e| now.saturating_duration_since(e.idle_since) >= ttl);
                    if !oldest_is_expired {
                        break;
                    }
                    if let Some(entry) = state.idle.pop_front() {
                        expired.push(entry.resource);
                    }
                }
                let n = expired.len() as u64;
                state.evict_count += n;
                state.destroyed_count += n;
            }
        }
        if !dead.is_empty() {
            tracing::debug!(
                count = dead.len(),
                "kiln-pool: evicting idle resources that are no longer alive"
            );
        }
        for resource in dead {
            self.manager.destroy(resource);
        }
        if !expired.is_empty() {
            tracing::debug!(
                count = expired.len(),
                "kiln-pool: evicting idle resources past max_idle_duration"
            );
        }
        for resource in expired {
            self.manager.destroy(resource);
        }
        // Refill to min_size, one creation at a time so a shutdown is noticed between them.
        loop {
            {
                let mut state = self.lock();
                if state.shut_down {
                    return false;
                }
                if state.idle.len() + state.creating_idle >= self.config.min_size {
                    state.refill_requested = false;
                    return true;
                }
                state.creating_idle += 1;
            }
            if let Err(error) = self.create_idle() {
                // Leave refill_requested set: the next tick retries; acquires do not re-wake us.
                tracing::warn!(%error, "kiln-pool: creating a resource to keep min_size warm failed; retrying next tick");
                return true;
            }
        }
    }
}

/// Why a returned resource is destroyed instead of pooled.
#[derive(Debug, Clone, Copy)]
enum Discard {
    ShutDown,
    NotReusable,
    HealthCheck,
    Reset,
}

enum Verdict {
    Keep,
    Destroy(Discard),
}

/// What an in-use slot was doing when a `Manager` hook panicked.
#[derive(Clone, Copy)]
enum SlotKind {
    /// A handle being returned (`is_reusable`, `health_check`, `reset`): the resource is
    /// dropped by the unwinding; count it as evicted.
    Release,
    /// A hit being validated (`is_alive`): as `Release`, and the hit is rolled back.
    Hit,
    /// An `acquire()` destroying an idle resource found dead (`destroy`), already counted.
    DestroyingDead,
}

/// Frees an in-use slot if a `Manager` hook panics while the slot's thread runs it.
struct SlotGuard<'a, M: Manager> {
    shared: &'a Shared<M>,
    armed: bool,
    kind: SlotKind,
}

impl<'a, M: Manager> SlotGuard<'a, M> {
    /// The release completed normally; unlocks.
    fn disarm(mut self, state: MutexGuard<'a, State<M::Resource>>) {
        self.armed = false;
        drop(state);
    }

    /// The guarded hook returned (no lock held).
    fn disarm_unlocked(mut self) {
        self.armed = false;
    }
}

impl<M: Manager> Drop for SlotGuard<'_, M> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut state = self.shared.lock();
        state.in_use -= 1;
        if matches!(self.kind, SlotKind::Hit) {
            state.hit_count -= 1;
        }
        if matches!(self.kind, SlotKind::Release | SlotKind::Hit) {
            // The resource was dropped by the unwinding, not by Manager::destroy.
            state.evict_count += 1;
            state.destroyed_count += 1;
        }
        let notify = state.waiters > 0;
        drop(state);
        if notify {
            self.shared.slot_freed.notify_one();
        }
    }
}

#[derive(Clone, Copy)]
enum CreateKind {
    /// A miss in `acquire()`: undo the in-use slot and the miss.
    Acquire,
    /// A refill or `warm()` creation: undo `creating_idle`.
    Idle,
}

/// Rolls the counters of a creation back unless disarmed: on `create()` failure and on panic.
struct CreateGuard<'a, M: Manager> {
    shared: &'a Shared<M>,
    kind: CreateKind,
    armed: bool,
}

impl<M: Manager> CreateGuard<'_, M> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl<M: Manager> Drop for CreateGuard<'_, M> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut state = self.shared.lock();
        state.create_failed_count += 1;
        let mut notify = false;
        match self.kind {
            CreateKind::Acquire => {
                state.in_use -= 1;
                state.miss_count -= 1;
                notify = state.waiters > 0;
            }
            CreateKind::Idle => state.creating_idle -= 1,
        }
        drop(state);
        if notify {
            self.shared.slot_freed.notify_one();
        }
    }
}

/// A prewarm pool of `M::Resource`s. Share it between threads with `Arc<Pool<M>>` (it is
/// `Sync`). Dropping it shuts it down (see [`Pool::shutdown`]).
pub struct Pool<M: Manager> {
    shared: Arc<Shared<M>>,
    maintainer: Mutex<Option<JoinHandle<()>>>,
}

impl<M: Manager> fmt::Debug for Pool<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("config", &self.shared.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl<M: Manager> Pool<M> {
    /// Validates `config`, starts the background thread and, when `min_size > 0`, asks it to
    /// warm `min_size` resources (in the background: this returns at once; use
    /// [`Pool::warm`] to wait for them).
    pub fn new(manager: M, config: PoolConfig) -> Result<Self, PoolError<M::Error>> {
        config.validate()?;
        let (wake, wake_rx) = crossbeam_channel::bounded(1);
        let interval = config.maintenance_interval;
        let state = State {
            idle: VecDeque::with_capacity(
                config.max_size.saturating_add(1).min(MAX_PREALLOCATED_IDLE),
            ),
            in_use: 0,
            creating_idle: 0,
            waiters: 0,
            refill_requested: false,
            shut_down: false,
            hit_count: 0,
            miss_count: 0,
            evict_count: 0,
            dead_count: 0,
            created_count: 0,
            create_failed_count: 0,
            destroyed_count: 0,
        };
        let shared = Arc::new(Shared {
            manager,
            config,
            state: Mutex::new(state),
            slot_freed: Condvar::new(),
            closed: AtomicBool::new(false),
            wake,
        });
        let weak = Arc::downgrade(&shared);
        let handle = thread::Builder::new()
            .name(MAINTENANCE_THREAD_NAME.into())
            .spawn(move || maintenance_loop(weak, wake_rx, interval))
            .map_err(PoolError::Spawn)?;
        if shared.lock().take_refill_request(shared.config.min_size) {
            shared.wake_maintainer();
        }
        Ok(Self {
            shared,
            maintainer: Mutex::new(Some(handle)),
        })
    }

    /// Takes a resource, waiting up to `PoolConfig::acquire_timeout` for an in-use slot.
    ///
    /// A hit pops the most recently used idle resource (LIFO keeps caches warm); a miss creates
    /// one in this thread, outside the pool's lock.
    pub fn acquire(&self) -> Result<Pooled<M>, PoolError<M::Error>> {
        self.acquire_timeout(self.shared.config.acquire_timeout)
    }

    /// [`Pool::acquire`] with an explicit wait limit for an in-use slot.
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<Pooled<M>, PoolError<M::Error>> {
        let shared = &*self.shared;
        let max_in_use = shared.config.max_in_use;
        let mut state = shared.lock();
        // Computed only when we have to wait, keeping clock reads off the hot path.
        let mut started: Option<(Instant, Option<Instant>)> = None;
        loop {
            if state.shut_down {
                return Err(PoolError::ShutDown);
            }
            if state.in_use < max_in_use {
                break;
            }
            let now = Instant::now();
            let (start, deadline) = *started.get_or_insert_with(|| (now, now.checked_add(timeout)));
            if deadline.is_some_and(|deadline| now >= deadline) {
                return Err(PoolError::TimedOut {
                    waited: now.saturating_duration_since(start),
                    in_use: state.in_use,
                    max_in_use,
                });
            }
            state.waiters += 1;
            match deadline {
                Some(deadline) => {
                    state = shared
                        .slot_freed
                        .wait_timeout(state, deadline - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                None => {
                    state = shared
                        .slot_freed
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            }
            state.waiters -= 1;
        }
        state.in_use += 1;
        while let Some(entry) = state.idle.pop_back() {
            state.hit_count += 1;
            let refill = state.take_refill_request(shared.config.min_size);
            drop(state);
            if refill {
                shared.wake_maintainer();
            }
            // Validated outside the lock; a panic frees the slot and uncounts the hit.
            let guard = SlotGuard {
                shared,
                armed: true,
                kind: SlotKind::Hit,
            };
            let alive = shared.manager.is_alive(&entry.resource);
            guard.disarm_unlocked();
            if alive {
                return Ok(Pooled {
                    shared: Arc::clone(&self.shared),
                    resource: Some(entry.resource),
                    uses: entry.uses,
                });
            }
            // Died while idle: destroy it and try the next idle one (or create).
            tracing::debug!("kiln-pool: an idle resource is no longer alive; evicting it");
            state = shared.lock();
            state.hit_count -= 1;
            state.evict_count += 1;
            state.dead_count += 1;
            state.destroyed_count += 1;
            drop(state);
            let guard = SlotGuard {
                shared,
                armed: true,
                kind: SlotKind::DestroyingDead,
            };
            shared.manager.destroy(entry.resource);
            guard.disarm_unlocked();
            state = shared.lock();
            if state.shut_down {
                state.in_use -= 1;
                let notify = state.waiters > 0;
                drop(state);
                if notify {
                    shared.slot_freed.notify_one();
                }
                return Err(PoolError::ShutDown);
            }
        }
        state.miss_count += 1;
        let refill = state.take_refill_request(shared.config.min_size);
        drop(state);
        if refill {
            shared.wake_maintainer();
        }
        let guard = CreateGuard {
            shared,
            kind: CreateKind::Acquire,
            armed: true,
        };
        let resource = shared.manager.create().map_err(PoolError::Create)?;
        guard.disarm();
        shared.lock().created_count += 1;
        Ok(Pooled {
            shared: Arc::clone(&self.shared),
            resource: Some(resource),
            uses: 0,
        })
    }

    /// Creates up to `n` idle resources now, in this thread, stopping when the idle count (with
    /// creations in flight) reaches `max_size`. Returns how many were added to the pool.
    pub fn warm(&self, n: usize) -> Result<usize, PoolError<M::Error>> {
        let shared = &*self.shared;
        let mut added = 0;
        for _ in 0..n {
            {
                let mut state = shared.lock();
                if state.shut_down {
                    return Err(PoolError::ShutDown);
                }
                if state.idle.len() + state.creating_idle >= shared.config.max_size {
                    break;
                }
                state.creating_idle += 1;
            }
            if shared.create_idle().map_err(PoolError::Create)? {
                added += 1;
            }
        }
        Ok(added)
    }

    /// A consistent snapshot of the counters.
    pub fn stats(&self) -> PoolStats {
        let state = self.shared.lock();
        PoolStats {
            hit_count: state.hit_count,
            miss_count: state.miss_count,
            evict_count: state.evict_count,
            dead_count: state.dead_count,
            idle_count: state.idle.len(),
            in_use_count: state.in_use,
            waiting_count: state.waiters,
            created_count: state.created_count,
            create_failed_count: state.create_failed_count,
            destroyed_count: state.destroyed_count,
        }
    }

    /// The configuration the pool runs with.
    pub fn config(&self) -> &PoolConfig {
        &self.shared.config
    }

    /// The manager (e.g. to read its own counters).
    pub fn manager(&self) -> &M {
        &self.shared.manager
    }

    /// Whether [`Pool::shutdown`] has been called.
    pub fn is_shut_down(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Destroys every idle resource, fails waiting and later `acquire()`/`warm()` calls with
    /// [`PoolError::ShutDown`], and stops the background thread (waiting for a creation it has
    /// in flight). Handles still out stay usable; they are destroyed when dropped. Idempotent.
    pub fn shutdown(&self) {
        let drained: Vec<Entry<M::Resource>> = {
            let mut state = self.shared.lock();
            state.shut_down = true;
            self.shared.closed.store(true, Ordering::Release);
            let drained: Vec<_> = state.idle.drain(..).collect();
            state.destroyed_count += drained.len() as u64;
            drained
        };
        self.shared.slot_freed.notify_all();
        self.shared.wake_maintainer();
        for entry in drained {
            self.shared.manager.destroy(entry.resource);
        }
        let handle = self
            .maintainer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            if handle.thread().id() != thread::current().id() && handle.join().is_err() {
                tracing::error!("kiln-pool: the maintenance thread panicked");
            }
        }
    }
}

impl<M: Manager> Drop for Pool<M> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The background thread: wakes on request or every `interval`, evicts expired idle resources
/// and refills to `min_size`. Holds only a weak reference so it never keeps the pool alive.
fn maintenance_loop<M: Manager>(weak: Weak<Shared<M>>, wake: Receiver<()>, interval: Duration) {
    loop {
        match wake.recv_timeout(interval) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let Some(shared) = weak.upgrade() else {
            return;
        };
        match panic::catch_unwind(AssertUnwindSafe(|| shared.maintain())) {
            Ok(true) => {}
            Ok(false) => return,
            Err(_) => tracing::error!(
                "kiln-pool: a Manager hook panicked in the maintenance thread; continuing"
            ),
        }
    }
}

/// A resource on loan from a [`Pool`]. Derefs to the resource; dropping it returns the
/// resource to the pool (see the crate docs for the release rules).
pub struct Pooled<M: Manager> {
    shared: Arc<Shared<M>>,
    /// `None` only after `detach()` or during drop.
    resource: Option<M::Resource>,
    /// Completed uses before this one.
    uses: u32,
}

impl<M: Manager> Pooled<M> {
    /// How many times this resource was used (and returned) before this loan.
    pub fn previous_uses(&self) -> u32 {
        self.uses
    }

    /// Takes the resource out of the pool for good: it is neither returned nor destroyed by the
    /// pool, and its in-use slot is freed.
    pub fn detach(mut self) -> M::Resource {
        let resource = self.take();
        let mut state = self.shared.lock();
        state.in_use -= 1;
        let notify = state.waiters > 0;
        drop(state);
        if notify {
            self.shared.slot_freed.notify_one();
        }
        resource
    }

    fn take(&mut self) -> M::Resource {
        match self.resource.take() {
            Some(resource) => resource,
            None => unreachable!("kiln-pool: Pooled resource taken twice"),
        }
    }
}

impl<M: Manager> Deref for Pooled<M> {
    type Target = M::Resource;

    fn deref(&self) -> &M::Resource {
        match &self.resource {
            Some(resource) => resource,
            None => unreachable!("kiln-pool: Pooled used after its resource was taken"),
        }
    }
}

impl<M: Manager> DerefMut for Pooled<M> {
    fn deref_mut(&mut self) -> &mut M::Resource {
        match &mut self.resource {
            Some(resource) => resource,
            None => unreachable!("kiln-pool: Pooled used after its resource was taken"),
        }
    }
}

impl<M: Manager> Drop for Pooled<M> {
    fn drop(&mut self) {
        if let Some(resource) = self.resource.take() {
            self.shared.release(resource, self.uses.wrapping_add(1));
        }
    }
}

impl<M: Manager> fmt::Debug for Pooled<M>
where
    M::Resource: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pooled")
            .field("resource", &self.resource)
            .field("previous_uses", &self.uses)
            .finish()
    }
}
