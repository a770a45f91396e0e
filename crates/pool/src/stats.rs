//! [`PoolStats`]: the pool's counters, read without stopping the pool (each exact; see
//! [`Pool::stats`](crate::Pool::stats) for what a snapshot taken under concurrency means).

/// A snapshot of a pool's counters ([`Pool::stats`](crate::Pool::stats)).
///
/// Invariants (checked by the tests):
/// - `hit_count + miss_count` = successful `acquire()` calls (a failed creation rolls its miss
///   back and counts in `create_failed_count` instead; an idle resource found dead on a hit
///   rolls its hit back and counts in `dead_count` instead);
/// - `dead_count ≤ evict_count`;
/// - `idle_count ≤ max_size`, `in_use_count ≤ max_in_use`;
/// - `created_count - destroyed_count` = resources alive (idle, in use or being destroyed),
///   minus detached ones; after `shutdown()` with every handle returned, `created_count =
///   destroyed_count`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// `acquire()` calls served by an idle resource (counted when popped; rolled back if
    /// [`Manager::is_alive`](crate::Manager::is_alive) then finds it dead).
    pub hit_count: u64,
    /// `acquire()` calls that created a resource (successfully, or still creating).
    pub miss_count: u64,
    /// Resources destroyed instead of reused, other than by shutdown: LRU at `max_size`,
    /// idle TTL, failed health check, failed reset, not reusable, found dead.
    pub evict_count: u64,
    /// Idle resources that [`Manager::is_alive`](crate::Manager::is_alive) found dead (on a hit
    /// or in the background pass) and that were destroyed instead of handed out. Each is also
    /// counted in `evict_count`.
    pub dead_count: u64,
    /// Idle resources ready to hand out.
    pub idle_count: usize,
    /// Resources handed out, plus `acquire()` calls creating one (or validating an idle one
    /// with `Manager::is_alive`).
    pub in_use_count: usize,
    /// `acquire()` calls waiting for an in-use slot (`max_in_use` reached).
    pub waiting_count: usize,
    /// Successful `Manager::create` calls (misses, refills, `warm()`).
    pub created_count: u64,
    /// Failed `Manager::create` calls.
    pub create_failed_count: u64,
    /// Resources handed to `Manager::destroy` (evictions plus shutdown).
    pub destroyed_count: u64,
}
