//! The pool itself: [`Pool`] (acquire, warm, stats, shutdown), the RAII handle [`Pooled`] that
//! returns its resource on drop, and the background maintenance thread (evicting dead and
//! idle-TTL-expired resources, keeping `min_size` warm).
//!
//! Layout (docs/POOL.md, "State and locking"): the idle set is [`SHARDS`] shards, each a
//! `VecDeque` behind a [`ShardLock`] (one swap to take, a plain store to release, never parks)
//! on its own cache lines; a thread pushes to and pops from its *home* shard (assigned
//! round-robin on first use), takes one from another shard when its own is empty, and uses
//! `try_lock` first so a shard whose holder was preempted is skipped rather than waited for.
//! The limits are one atomic word beside the shards (`Hot::word`): `in_use` (grown by CAS
//! against `max_in_use`) and `idle` (changed only under a shard lock together with the push or
//! pop, grown by CAS against `max_size`, so it equals the shards' total whenever every shard is
//! locked); a hit takes its slot and its idle resource, a release gives both back, in one CAS.
//! Operations that need the whole idle set (LRU eviction at `max_size`, the background pass,
//! shutdown) lock every shard in index order. Every [`Manager`] call happens with no lock
//! held, except `Manager::is_alive` in the background pass (documented on the trait). The hot
//! path (hit + release) is one uncontended shard lock and one CAS each way, allocates nothing
//! once the shard's deque has grown, makes no syscall, and only wakes the background thread
//! when the idle count falls below `min_size`.

use std::array;
use std::cell::{Cell, UnsafeCell};
use std::collections::VecDeque;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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

/// Shards of the idle set. More shards than runnable threads keeps most threads on a shard of
/// their own; 16 costs 2 KiB per pool.
const SHARDS: usize = 16;

/// Every counter below uses sequentially consistent operations: the slot/waiter handshake is
/// a store-load (Dekker) pattern that needs them, and on x86 an RMW costs the same either way.
const SC: Ordering = Ordering::SeqCst;

/// An idle resource with what the pool knows about it.
struct Entry<R> {
    resource: R,
    /// Completed uses (releases) of this resource, for `health_check_interval`.
    uses: u32,
    /// When it became idle, for `max_idle_duration` and LRU.
    idle_since: Instant,
}

/// One shard of the idle set, alone on its cache lines (128: adjacent-line prefetchers pair
/// lines) so threads on different shards never contend.
#[repr(align(128))]
struct Shard<R> {
    /// Front = least recently used, back = most recently used.
    idle: ShardLock<VecDeque<Entry<R>>>,
    /// Hits served from this shard. Written only under `idle`'s lock (a plain load + store).
    hits: AtomicU64,
    /// `idle`'s length, written under its lock: lets a thread looking for an idle resource
    /// skip empty shards without locking them.
    len: AtomicUsize,
}

/// The counters every acquire and release touches, on their own cache lines.
#[repr(align(128))]
struct Hot {
    /// Two counts in one word, so that a hit can take its in-use slot and its idle resource,
    /// and a release give both back, in one CAS:
    /// - high 32 bits, `in_use`: slots taken by handles out plus `acquire()` calls creating or
    ///   validating a resource; grown only by CAS against `max_in_use`, so never above it;
    /// - low 32 bits, `idle`: idle resources; changed only while holding the lock of the shard
    ///   pushed to or popped from (grown before the push, shrunk after the pop), grown only by
    ///   CAS against `max_size`: never above it, never below the shards' total, and equal to it
    ///   whenever every shard is locked.
    word: AtomicU64,
    /// `acquire()` callers blocked on `slot_freed`.
    waiters: AtomicUsize,
}

/// One in-use slot in `Hot::word`.
const IN_USE_ONE: u64 = 1 << 32;
/// The idle count's bits in `Hot::word`.
const IDLE_MASK: u64 = IN_USE_ONE - 1;

fn in_use_of(word: u64) -> usize {
    (word >> 32) as usize
}

fn idle_of(word: u64) -> usize {
    (word & IDLE_MASK) as usize
}

/// A limit as it applies to a 32-bit count (a pool never holds 4 billion resources).
fn cap32(limit: usize) -> usize {
    limit.min(u32::MAX as usize)
}

/// Who puts a resource into the idle set.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// A handle's release: its in-use slot is freed with the push (after it, at the latest),
    /// and at `max_size` it replaces the least recently used idle resource.
    Release,
    /// A creation for the idle set (`warm()`, refill): no slot; at `max_size` it is refused.
    Create,
}

/// Counters and flags of the cold paths (misses, evictions, creation, the background thread).
#[derive(Default)]
struct Cold {
    /// Creations in flight that will land in the idle set (background refill, `warm()`).
    creating_idle: AtomicUsize,
    /// The background thread was asked to refill and has not reported it done.
    refill_requested: AtomicBool,
    /// Hits counted by a shard and then rolled back (found dead, `is_alive` panicked).
    hits_rolled_back: AtomicU64,
    miss_count: AtomicU64,
    evict_count: AtomicU64,
    dead_count: AtomicU64,
    created_count: AtomicU64,
    create_failed_count: AtomicU64,
    destroyed_count: AtomicU64,
}

/// Adds one to a counter.
fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, SC);
}

thread_local! {
    /// This thread's home shard (`usize::MAX` until first used). Const-initialised and without
    /// destructor: reading it never allocates.
    static HOME: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Hands out home shards round-robin, across all pools.
static NEXT_HOME: AtomicUsize = AtomicUsize::new(0);

/// The calling thread's home shard.
fn home_shard() -> usize {
    HOME.try_with(|home| match home.get() {
        usize::MAX => {
            let shard = NEXT_HOME.fetch_add(1, Ordering::Relaxed) % SHARDS;
            home.set(shard);
            shard
        }
        shard => shard,
    })
    // Thread-local storage already torn down (a handle dropped by a TLS destructor).
    .unwrap_or(0)
}

/// Every shard's deque, locked in index order (the only order in which two shard locks are
/// ever held, so this cannot deadlock).
type AllShards<'a, R> = [ShardGuard<'a, VecDeque<Entry<R>>>; SHARDS];

/// Where a returned or new resource went.
enum Put<R> {
    /// Into the idle set.
    Pooled,
    /// Into the idle set, which was full: this least recently used one was taken out (counted
    /// as evicted and destroyed) and must be destroyed.
    Evicted(R),
    /// The pool is shut down (counted as destroyed): destroy it.
    Closed(R),
    /// The idle set is full and the resource is new (`warm`/refill): destroy it.
    Full(R),
}

/// What `Pool` and every `Pooled` share.
struct Shared<M: Manager> {
    manager: M,
    config: PoolConfig,
    hot: Hot,
    shards: [Shard<M::Resource>; SHARDS],
    cold: Cold,
    /// Mirrors "shut down"; set while every shard is locked, so a push that sees it unset
    /// under its shard lock lands before shutdown's drain.
    closed: AtomicBool,
    /// Held by an `acquire()` between checking for a slot and waiting on `slot_freed`, and by
    /// whoever notifies, so a notification cannot slip in between.
    wait_lock: Mutex<()>,
    /// Signalled when an in-use slot frees up (or on shutdown).
    slot_freed: Condvar,
    /// Wakes the background thread (capacity 1: wake-ups coalesce, sending never blocks).
    wake: Sender<()>,
}

/// Locks a mutex, recovering from poisoning: no critical section of ours can leave the guarded
/// data half-updated (the only Manager code run under a lock, `is_alive` in the background
/// pass, runs before anything is changed).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The lock of one shard. Taking it is one atomic swap and releasing it a plain store: it never
/// parks a thread, so there is no waiter bookkeeping and no futex call on either side (a
/// `std::sync::Mutex` unlock is an atomic swap, to learn whether to wake someone). Waiting is
/// rare — every shard busy, or a whole-set operation running — and spins briefly, then yields
/// the CPU between attempts, so a descheduled holder gets to run and finish.
struct ShardLock<T> {
    locked: AtomicBool,
    data: UnsafeCell<T>,
}

// SAFETY: `data` is only reached through a `ShardGuard`, and at most one guard exists at a time
// (`locked` is swapped false -> true to create one and reset by its drop), so sharing the lock
// hands the value from thread to thread, one at a time: sound when `T` may be sent.
unsafe impl<T: Send> Sync for ShardLock<T> {}

impl<T> ShardLock<T> {
    fn new(data: T) -> Self {
        Self {
            locked: AtomicBool::new(false),
            data: UnsafeCell::new(data),
        }
    }

    /// The lock if it is free right now.
    fn try_lock(&self) -> Option<ShardGuard<'_, T>> {
        // A plain load first: a busy shard's line is not pulled over for an RMW.
        if self.locked.load(Ordering::Relaxed) || self.locked.swap(true, Ordering::Acquire) {
            return None;
        }
        Some(ShardGuard { lock: self })
    }

    /// The lock, waiting for it (spinning, then yielding).
    fn lock(&self) -> ShardGuard<'_, T> {
        let mut spins = 0u32;
        loop {
            if let Some(guard) = self.try_lock() {
                return guard;
            }
            if spins < 100 {
                spins += 1;
                std::hint::spin_loop();
            } else {
                thread::yield_now();
            }
        }
    }
}

/// Holds a [`ShardLock`]; releases it on drop (also when unwinding: the data is never left
/// half-updated by our critical sections, see `lock`).
struct ShardGuard<'a, T> {
    lock: &'a ShardLock<T>,
}

impl<T> Deref for ShardGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: this guard is the only one (see `ShardLock`), so no `&mut` to the data exists
        // elsewhere while it lives.
        unsafe { &*self.lock.data.get() }
    }
}

impl<T> DerefMut for ShardGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes this the only reference through the guard.
        unsafe { &mut *self.lock.data.get() }
    }
}

impl<T> Drop for ShardGuard<'_, T> {
    fn drop(&mut self) {
        // Release: our writes to the data happen-before the next holder's Acquire swap.
        self.lock.locked.store(false, Ordering::Release);
    }
}

impl<M: Manager> Shared<M> {
    fn wake_maintainer(&self) {
        // Full means a wake-up is already pending; disconnected means the thread is gone
        // (shutdown). Neither needs anything from us.
        let _ = self.wake.try_send(());
    }

    /// Asks the background thread to refill when the idle count (with creations in flight) is
    /// below `min_size` and nobody asked yet.
    fn request_refill_if_low(&self) {
        let min_size = self.config.min_size;
        if min_size == 0
            || self.closed.load(SC)
            || self.idle() + self.cold.creating_idle.load(SC) >= min_size
            || self.cold.refill_requested.swap(true, SC)
        {
            return;
        }
        self.wake_maintainer();
    }

    fn idle(&self) -> usize {
        idle_of(self.hot.word.load(SC))
    }

    /// Takes an in-use slot if one is free.
    fn try_reserve_slot(&self) -> bool {
        let max = cap32(self.config.max_in_use);
        self.hot
            .word
            .fetch_update(SC, SC, |w| (in_use_of(w) < max).then_some(w + IN_USE_ONE))
            .is_ok()
    }

    /// Takes an in-use slot and one idle resource at once, if a slot is free. Call only while
    /// holding the lock of a non-empty shard (so the idle count is at least one).
    fn try_reserve_slot_for_hit(&self) -> bool {
        let max = cap32(self.config.max_in_use);
        self.hot
            .word
            .fetch_update(SC, SC, |w| {
                (in_use_of(w) < max && idle_of(w) > 0).then_some(w + IN_USE_ONE - 1)
            })
            .is_ok()
    }

    /// Takes an in-use slot, waiting up to `timeout` for one.
    fn reserve_slot(&self, timeout: Duration) -> Result<(), PoolError<M::Error>> {
        if self.closed.load(SC) {
            return Err(PoolError::ShutDown);
        }
        if self.try_reserve_slot() {
            return Ok(());
        }
        let max_in_use = self.config.max_in_use;
        let start = Instant::now();
        let deadline = start.checked_add(timeout);
        let mut guard = lock(&self.wait_lock);
        loop {
            // Registered before the re-check: a `free_slot` after our check sees us and
            // notifies under `wait_lock`, which we hold until `wait` releases it.
            self.hot.waiters.fetch_add(1, SC);
            if self.closed.load(SC) {
                self.hot.waiters.fetch_sub(1, SC);
                return Err(PoolError::ShutDown);
            }
            if self.try_reserve_slot() {
                self.hot.waiters.fetch_sub(1, SC);
                return Ok(());
            }
            let now = Instant::now();
            if deadline.is_some_and(|deadline| now >= deadline) {
                self.hot.waiters.fetch_sub(1, SC);
                return Err(PoolError::TimedOut {
                    waited: now.saturating_duration_since(start),
                    in_use: in_use_of(self.hot.word.load(SC)),
                    max_in_use,
                });
            }
            guard = match deadline {
                Some(deadline) => {
                    self.slot_freed
                        .wait_timeout(guard, deadline - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => self
                    .slot_freed
                    .wait(guard)
                    .unwrap_or_else(PoisonError::into_inner),
            };
            self.hot.waiters.fetch_sub(1, SC);
        }
    }

    /// Gives an in-use slot back and wakes one waiter, if any.
    fn free_slot(&self) {
        self.hot.word.fetch_sub(IN_USE_ONE, SC);
        self.notify_waiter();
    }

    /// Wakes one `acquire()` waiting for a slot, if any (after a slot was freed).
    fn notify_waiter(&self) {
        if self.hot.waiters.load(SC) > 0 {
            let _guard = lock(&self.wait_lock);
            self.slot_freed.notify_one();
        }
    }

    /// The hot half of `acquire()`: when the home shard has an idle resource and is free,
    /// takes it and an in-use slot in one CAS. `None`: go the general way.
    fn try_fast_hit(&self) -> Option<Entry<M::Resource>> {
        let shard = &self.shards[home_shard()];
        if shard.len.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut idle = shard.idle.try_lock()?;
        let entry = idle.pop_back()?;
        if !self.try_reserve_slot_for_hit() {
            // At the in-use cap: put it back where it was.
            idle.push_back(entry);
            return None;
        }
        shard.len.store(idle.len(), Ordering::Relaxed);
        shard
            .hits
            .store(shard.hits.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        Some(entry)
    }

    /// Pops an idle entry: the most recently used of the home shard, else of the first other
    /// shard (from the home shard on) that has one. Counts the hit. `None` (a miss) only when
    /// the idle count is zero or every shard was found empty under its lock.
    fn pop_idle(&self) -> Option<Entry<M::Resource>> {
        if self.idle() == 0 {
            return None;
        }
        let home = home_shard();
        // First pass: shards that look non-empty and are free right now.
        for k in 0..SHARDS {
            let shard = &self.shards[(home + k) % SHARDS];
            if shard.len.load(Ordering::Relaxed) == 0 {
                continue;
            }
            if let Some(mut idle) = shard.idle.try_lock() {
                if let Some(entry) = self.pop_locked(shard, &mut idle) {
                    return Some(entry);
                }
            }
        }
        // Second pass: wait for each shard in turn (one whose holder was preempted, or whose
        // length we read stale), as long as something is idle.
        for k in 0..SHARDS {
            if self.idle() == 0 {
                return None;
            }
            let shard = &self.shards[(home + k) % SHARDS];
            let mut idle = shard.idle.lock();
            if let Some(entry) = self.pop_locked(shard, &mut idle) {
                return Some(entry);
            }
        }
        None
    }

    /// Pops the back of a locked shard, keeping `idle`, `len` and `hits` in step.
    fn pop_locked(
        &self,
        shard: &Shard<M::Resource>,
        idle: &mut VecDeque<Entry<M::Resource>>,
    ) -> Option<Entry<M::Resource>> {
        let entry = idle.pop_back()?;
        self.hot.word.fetch_sub(1, SC);
        shard.len.store(idle.len(), Ordering::Relaxed);
        shard
            .hits
            .store(shard.hits.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        Some(entry)
    }

    /// Counts one more idle resource if that stays within `max_size` — and, for a release,
    /// frees its in-use slot in the same CAS. Call only while holding the lock of the shard the
    /// resource goes to, just before pushing it.
    fn try_grow_idle(&self, origin: Origin) -> bool {
        let max = cap32(self.config.max_size);
        let delta = match origin {
            Origin::Release => 1u64.wrapping_sub(IN_USE_ONE),
            Origin::Create => 1,
        };
        self.hot
            .word
            .fetch_update(SC, SC, |w| {
                (idle_of(w) < max).then_some(w.wrapping_add(delta))
            })
            .is_ok()
    }

    /// Frees a release's in-use slot when `try_grow_idle` did not.
    fn free_slot_of(&self, origin: Origin) {
        if origin == Origin::Release {
            self.hot.word.fetch_sub(IN_USE_ONE, SC);
        }
    }

    /// Locks every shard, in index order.
    fn lock_all(&self) -> AllShards<'_, M::Resource> {
        array::from_fn(|i| self.shards[i].idle.lock())
    }

    /// Refreshes every shard's length hint (while all are locked).
    fn store_lens(&self, all: &AllShards<'_, M::Resource>) {
        for (shard, idle) in self.shards.iter().zip(all.iter()) {
            shard.len.store(idle.len(), Ordering::Relaxed);
        }
    }

    /// Puts an entry into the idle set, as the most recently used of a shard (the home shard
    /// when it is free, else the first free one, else the home shard once it is). When the set
    /// is full, a returned resource replaces the least recently used idle one (the oldest of
    /// the shards' oldest); a new one is handed back as `Full`. A release's in-use slot is
    /// freed here, with the push or after it (never before: a waiter that gets the slot must
    /// find the resource idle); waiters are not notified (the caller does that).
    fn put_idle(&self, entry: Entry<M::Resource>, origin: Origin) -> Put<M::Resource> {
        let home = home_shard();
        let mut target = None;
        for k in 0..SHARDS {
            let i = (home + k) % SHARDS;
            if let Some(idle) = self.shards[i].idle.try_lock() {
                target = Some((i, idle));
                break;
            }
        }
        let (i, mut idle) = match target {
            Some(target) => target,
            None => (home, self.shards[home].idle.lock()),
        };
        if self.closed.load(SC) {
            drop(idle);
            self.free_slot_of(origin);
            bump(&self.cold.destroyed_count);
            return Put::Closed(entry.resource);
        }
        if self.try_grow_idle(origin) {
            idle.push_back(entry);
            self.shards[i].len.store(idle.len(), Ordering::Relaxed);
            return Put::Pooled;
        }
        drop(idle);
        if origin == Origin::Create {
            bump(&self.cold.destroyed_count);
            return Put::Full(entry.resource);
        }
        // Full: with every shard locked the idle count is exact.
        let mut all = self.lock_all();
        if self.closed.load(SC) {
            drop(all);
            self.free_slot_of(origin);
            bump(&self.cold.destroyed_count);
            return Put::Closed(entry.resource);
        }
        if self.try_grow_idle(origin) {
            all[i].push_back(entry);
            self.store_lens(&all);
            return Put::Pooled;
        }
        let evicted = oldest_shard(&all).and_then(|oldest| all[oldest].pop_front());
        let put = match evicted {
            Some(old) => {
                // One out, one in: the idle count stays at max_size.
                all[i].push_back(entry);
                self.store_lens(&all);
                Put::Evicted(old.resource)
            }
            // Unreachable: the count is max_size ≥ 1 and equals the shards' total. Should it
            // ever happen, evicting the returned resource keeps every limit.
            None => Put::Evicted(entry.resource),
        };
        drop(all);
        self.free_slot_of(origin);
        bump(&self.cold.evict_count);
        bump(&self.cold.destroyed_count);
        put
    }

    /// Hands a resource back: the release rules of the crate docs.
    fn release(&self, mut resource: M::Resource, uses: u32) {
        // Dropped during unwinding if a Manager hook panics: frees the slot anyway.
        let slot = SlotGuard {
            shared: self,
            armed: true,
            kind: SlotKind::Release,
        };
        let verdict = if self.closed.load(SC) {
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
        let to_destroy = match verdict {
            Verdict::Keep => {
                let entry = Entry {
                    resource,
                    uses,
                    idle_since: Instant::now(),
                };
                // No Manager call from here on: the slot is freed by put_idle.
                slot.disarm();
                match self.put_idle(entry, Origin::Release) {
                    Put::Pooled => None,
                    Put::Evicted(resource) | Put::Closed(resource) | Put::Full(resource) => {
                        Some(resource)
                    }
                }
            }
            Verdict::Destroy(reason) => {
                if matches!(reason, Discard::ShutDown) {
                    bump(&self.cold.destroyed_count);
                } else {
                    tracing::trace!(?reason, "kiln-pool: destroying a returned resource");
                    bump(&self.cold.evict_count);
                    bump(&self.cold.destroyed_count);
                }
                slot.disarm();
                self.hot.word.fetch_sub(IN_USE_ONE, SC);
                Some(resource)
            }
        };
        self.notify_waiter();
        self.request_refill_if_low();
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

    /// Reserves a creation destined for the idle set if idle + creating stays below `limit`.
    fn reserve_idle_creation(&self, limit: usize) -> bool {
        self.cold
            .creating_idle
            .fetch_update(SC, SC, |c| (self.idle() + c < limit).then_some(c + 1))
            .is_ok()
    }

    /// Creates one resource destined for the idle set (refill or `warm()`); the caller has
    /// already counted it in `creating_idle`. Returns whether it was pooled.
    fn create_idle(&self) -> Result<bool, M::Error> {
        let guard = CreateGuard {
            shared: self,
            kind: CreateKind::Idle,
            armed: true,
        };
        let resource = self.manager.create()?;
        guard.disarm();
        bump(&self.cold.created_count);
        let entry = Entry {
            resource,
            uses: 0,
            idle_since: Instant::now(),
        };
        // Pushed (or refused) before the reservation is dropped, so idle + creating never
        // undercounts.
        let put = self.put_idle(entry, Origin::Create);
        self.cold.creating_idle.fetch_sub(1, SC);
        match put {
            Put::Pooled => Ok(true),
            Put::Evicted(resource) | Put::Closed(resource) | Put::Full(resource) => {
                self.manager.destroy(resource);
                Ok(false)
            }
        }
    }

    /// One pass of the background thread. Returns `false` once the pool is shut down.
    fn maintain(&self) -> bool {
        let mut expired = Vec::new();
        let mut dead = Vec::new();
        {
            let mut all = self.lock_all();
            if self.closed.load(SC) {
                return false;
            }
            // Dead idle resources: `is_alive` runs under the locks (see its docs). Find them all
            // first, then take them out, so a panicking `is_alive` leaves the state untouched.
            let mut dead_at = Vec::new();
            for (s, idle) in all.iter().enumerate() {
                for (i, entry) in idle.iter().enumerate() {
                    if !self.manager.is_alive(&entry.resource) {
                        dead_at.push((s, i));
                    }
                }
            }
            // Back to front, so the indices still to remove stay valid.
            for &(s, i) in dead_at.iter().rev() {
                if let Some(entry) = all[s].remove(i) {
                    dead.push(entry.resource);
                }
            }
            let n = dead.len();
            // Counters first: whoever sees the idle count drop sees them.
            self.cold.evict_count.fetch_add(n as u64, SC);
            self.cold.dead_count.fetch_add(n as u64, SC);
            self.cold.destroyed_count.fetch_add(n as u64, SC);
            self.hot.word.fetch_sub(n as u64, SC);
            if let Some(ttl) = self.config.max_idle_duration {
                let now = Instant::now();
                // Exact while every shard is locked.
                let mut idle_now = self.idle();
                while idle_now > self.config.min_size {
                    let Some(oldest) = oldest_shard(&all) else {
                        break;
                    };
                    let oldest_is_expired = all[oldest]
                        .front()
                        .is_some_and(|e| now.saturating_duration_since(e.idle_since) >= ttl);
                    if !oldest_is_expired {
                        break;
                    }
                    if let Some(entry) = all[oldest].pop_front() {
                        expired.push(entry.resource);
                        idle_now -= 1;
                    }
                }
                let n = expired.len();
                self.cold.evict_count.fetch_add(n as u64, SC);
                self.cold.destroyed_count.fetch_add(n as u64, SC);
                self.hot.word.fetch_sub(n as u64, SC);
            }
            self.store_lens(&all);
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
            if self.closed.load(SC) {
                return false;
            }
            // Cleared before the check: an acquire that drops the idle count after the check
            // sees the flag clear and wakes us again.
            self.cold.refill_requested.store(false, SC);
            if !self.reserve_idle_creation(self.config.min_size) {
                return true;
            }
            self.cold.refill_requested.store(true, SC);
            if let Err(error) = self.create_idle() {
                // Leave refill_requested set: the next tick retries; acquires do not re-wake us.
                tracing::warn!(%error, "kiln-pool: creating a resource to keep min_size warm failed; retrying next tick");
                return true;
            }
        }
    }
}

/// The shard whose least recently used entry is the oldest (`None`: all empty).
fn oldest_shard<R>(all: &AllShards<'_, R>) -> Option<usize> {
    all.iter()
        .enumerate()
        .filter_map(|(i, idle)| idle.front().map(|e| (i, e.idle_since)))
        .min_by_key(|&(_, since)| since)
        .map(|(i, _)| i)
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

impl<M: Manager> SlotGuard<'_, M> {
    /// The guarded hook returned.
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl<M: Manager> Drop for SlotGuard<'_, M> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let cold = &self.shared.cold;
        if matches!(self.kind, SlotKind::Hit) {
            bump(&cold.hits_rolled_back);
        }
        if matches!(self.kind, SlotKind::Release | SlotKind::Hit) {
            // The resource was dropped by the unwinding, not by Manager::destroy.
            bump(&cold.evict_count);
            bump(&cold.destroyed_count);
        }
        self.shared.free_slot();
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
        let cold = &self.shared.cold;
        bump(&cold.create_failed_count);
        match self.kind {
            CreateKind::Acquire => {
                cold.miss_count.fetch_sub(1, SC);
                self.shared.free_slot();
            }
            CreateKind::Idle => {
                cold.creating_idle.fetch_sub(1, SC);
            }
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
        // Each shard can hold the whole idle set up to a small bound without growing, so a
        // release that lands on another shard than its acquire (a busy home shard) does not
        // allocate on the hot path.
        let shard_capacity = config.max_size.min(64);
        let shared = Arc::new(Shared {
            manager,
            config,
            hot: Hot {
                word: AtomicU64::new(0),
                waiters: AtomicUsize::new(0),
            },
            shards: array::from_fn(|_| Shard {
                idle: ShardLock::new(VecDeque::with_capacity(shard_capacity)),
                hits: AtomicU64::new(0),
                len: AtomicUsize::new(0),
            }),
            cold: Cold::default(),
            closed: AtomicBool::new(false),
            wait_lock: Mutex::new(()),
            slot_freed: Condvar::new(),
            wake,
        });
        let weak = Arc::downgrade(&shared);
        let handle = thread::Builder::new()
            .name(MAINTENANCE_THREAD_NAME.into())
            .spawn(move || maintenance_loop(weak, wake_rx, interval))
            .map_err(PoolError::Spawn)?;
        shared.request_refill_if_low();
        Ok(Self {
            shared,
            maintainer: Mutex::new(Some(handle)),
        })
    }

    /// Takes a resource, waiting up to `PoolConfig::acquire_timeout` for an in-use slot.
    ///
    /// A hit pops the most recently used idle resource of this thread's shard (LIFO keeps
    /// caches warm; a single thread, or threads that each return what they took, see strict
    /// LIFO), else the most recently used of another shard; a miss creates one in this thread,
    /// outside every lock.
    pub fn acquire(&self) -> Result<Pooled<M>, PoolError<M::Error>> {
        self.acquire_timeout(self.shared.config.acquire_timeout)
    }

    /// [`Pool::acquire`] with an explicit wait limit for an in-use slot.
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<Pooled<M>, PoolError<M::Error>> {
        let shared = &*self.shared;
        let mut fast = None;
        if !shared.closed.load(SC) {
            fast = shared.try_fast_hit();
        }
        if fast.is_none() {
            shared.reserve_slot(timeout)?;
        }
        while let Some(entry) = fast.take().or_else(|| shared.pop_idle()) {
            shared.request_refill_if_low();
            // Validated outside the lock; a panic frees the slot and uncounts the hit.
            let guard = SlotGuard {
                shared,
                armed: true,
                kind: SlotKind::Hit,
            };
            let alive = shared.manager.is_alive(&entry.resource);
            guard.disarm();
            if alive {
                return Ok(Pooled {
                    shared: Arc::clone(&self.shared),
                    resource: Some(entry.resource),
                    uses: entry.uses,
                });
            }
            // Died while idle: destroy it and try the next idle one (or create).
            tracing::debug!("kiln-pool: an idle resource is no longer alive; evicting it");
            let cold = &shared.cold;
            bump(&cold.hits_rolled_back);
            bump(&cold.evict_count);
            bump(&cold.dead_count);
            bump(&cold.destroyed_count);
            let guard = SlotGuard {
                shared,
                armed: true,
                kind: SlotKind::DestroyingDead,
            };
            shared.manager.destroy(entry.resource);
            guard.disarm();
            if shared.closed.load(SC) {
                shared.free_slot();
                return Err(PoolError::ShutDown);
            }
        }
        if shared.closed.load(SC) {
            shared.free_slot();
            return Err(PoolError::ShutDown);
        }
        bump(&shared.cold.miss_count);
        shared.request_refill_if_low();
        let guard = CreateGuard {
            shared,
            kind: CreateKind::Acquire,
            armed: true,
        };
        let resource = shared.manager.create().map_err(PoolError::Create)?;
        guard.disarm();
        bump(&shared.cold.created_count);
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
            if shared.closed.load(SC) {
                return Err(PoolError::ShutDown);
            }
            if !shared.reserve_idle_creation(shared.config.max_size) {
                break;
            }
            if shared.create_idle().map_err(PoolError::Create)? {
                added += 1;
            }
        }
        Ok(added)
    }

    /// A snapshot of the counters. Each is exact, and `idle_count ≤ max_size`,
    /// `in_use_count ≤ max_in_use` hold in every snapshot; the counters are read one after
    /// the other without stopping the pool, so a snapshot taken while other threads acquire
    /// and release may mix instants a few operations apart (one taken while nothing else runs
    /// is exact as a whole).
    pub fn stats(&self) -> PoolStats {
        let shared = &*self.shared;
        let cold = &shared.cold;
        let rolled_back = cold.hits_rolled_back.load(SC);
        let word = shared.hot.word.load(SC);
        let hits: u64 = shared.shards.iter().map(|s| s.hits.load(SC)).sum();
        PoolStats {
            hit_count: hits.saturating_sub(rolled_back),
            miss_count: cold.miss_count.load(SC),
            evict_count: cold.evict_count.load(SC),
            dead_count: cold.dead_count.load(SC),
            idle_count: idle_of(word),
            in_use_count: in_use_of(word),
            waiting_count: shared.hot.waiters.load(SC),
            created_count: cold.created_count.load(SC),
            create_failed_count: cold.create_failed_count.load(SC),
            destroyed_count: cold.destroyed_count.load(SC),
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
        self.shared.closed.load(SC)
    }

    /// Destroys every idle resource, fails waiting and later `acquire()`/`warm()` calls with
    /// [`PoolError::ShutDown`], and stops the background thread (waiting for a creation it has
    /// in flight). Handles still out stay usable; they are destroyed when dropped. Idempotent.
    pub fn shutdown(&self) {
        let shared = &*self.shared;
        let drained: Vec<Entry<M::Resource>> = {
            let mut all = shared.lock_all();
            shared.closed.store(true, SC);
            let drained: Vec<_> = all.iter_mut().flat_map(|idle| idle.drain(..)).collect();
            shared
                .cold
                .destroyed_count
                .fetch_add(drained.len() as u64, SC);
            shared.hot.word.fetch_sub(drained.len() as u64, SC);
            shared.store_lens(&all);
            drained
        };
        {
            let _guard = lock(&shared.wait_lock);
            shared.slot_freed.notify_all();
        }
        shared.wake_maintainer();
        for entry in drained {
            shared.manager.destroy(entry.resource);
        }
        let handle = lock(&self.maintainer).take();
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
        self.shared.free_slot();
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Four threads increment a plain counter under a `ShardLock`, half of the time through
    /// `try_lock`: any overlap of two holders would lose increments.
    #[test]
    fn shard_lock_excludes() {
        const PER_THREAD: u64 = 100_000;
        let lock = Arc::new(ShardLock::new(0u64));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let lock = Arc::clone(&lock);
                thread::spawn(move || {
                    for i in 0..PER_THREAD {
                        let mut guard = if (i + t) % 2 == 0 {
                            lock.lock()
                        } else {
                            loop {
                                if let Some(guard) = lock.try_lock() {
                                    break guard;
                                }
                                std::hint::spin_loop();
                            }
                        };
                        *guard += 1;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*lock.lock(), 4 * PER_THREAD);
        let held = lock.lock();
        assert!(lock.try_lock().is_none(), "a held lock is not free");
        drop(held);
        assert!(lock.try_lock().is_some(), "a released lock is free");
    }
}
