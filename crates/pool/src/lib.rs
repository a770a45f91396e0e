//! kiln-pool: a generic, thread-safe prewarm pool, vendorable on its own (it depends on no other
//! Kiln crate: only std, thiserror, crossbeam-channel and tracing).
//!
//! You implement [`Manager`] (create, health check, reset, is-reusable, destroy) for your
//! resource; [`Pool`] keeps some of them idle and hands them out as [`Pooled`] handles that
//! return themselves on drop. Kiln's `SandboxPool` is this pool over microVM sandboxes.
//!
//! # Rules
//! - **acquire**: a *hit* pops the most recently used idle resource of the calling thread's
//!   shard of the idle set (LIFO, for cache warmth; a single thread sees strict LIFO), or, when
//!   that shard is empty, the most recently used of another shard, and hands it out if
//!   [`Manager::is_alive`] says so; an idle resource found dead is destroyed
//!   (counted in `evict_count` and `dead_count`, not as a hit) and the next idle one is tried. A
//!   *miss* (nothing idle, or only dead ones) creates one in the calling thread, outside every
//!   lock. When `max_in_use` resources are
//!   out, `acquire()` waits up to `acquire_timeout`, then fails with [`PoolError::TimedOut`].
//!   A failed creation rolls the counters back and surfaces as [`PoolError::Create`].
//! - **release** (dropping a [`Pooled`]): not [`Manager::is_reusable`] → destroyed; on every Nth
//!   release of a resource (`health_check_interval`) [`Manager::health_check`] runs, and a
//!   failure evicts and destroys it; then [`Manager::reset`] runs, and a failure destroys it
//!   instead of pooling it; otherwise it becomes the most recently used idle resource.
//! - **LRU eviction**: when the idle count would exceed `max_size`, the least recently used idle
//!   resource (across all shards) is destroyed.
//! - **idle TTL**: the background thread destroys idle resources beyond `min_size` that have been
//!   idle longer than `max_idle_duration`.
//! - **dead idle resources**: each background pass also destroys every idle resource that
//!   [`Manager::is_alive`] says is dead, and refills `min_size` in the same pass, so a resource
//!   that died while idle is usually replaced before anyone asks for it (the check on a hit
//!   catches the rest).
//! - **warm**: the background thread keeps `min_size` resources idle, creating them outside the
//!   locks, so `acquire()` never waits for it; it is woken only when the idle count falls below
//!   `min_size`. [`Pool::warm`] creates resources now, in the caller's thread.
//! - **shutdown**: destroys all idle resources, fails later acquires with
//!   [`PoolError::ShutDown`]; handles returned afterwards are destroyed.
//! - **stats**: [`PoolStats`] (hit, miss, evict, dead, idle, in use, created, create failed,
//!   destroyed).
//!
//! Every `Manager` call runs outside the pool's locks — except `is_alive` in the background
//! pass, which must therefore be cheap (a state read, no I/O); a panicking hook frees its slot
//! and the pool carries on.
//!
//! The hot path (hit + release) scales across threads: the idle set is sharded (each thread
//! has a home shard, busy shards are skipped with `try_lock`), and the `max_size` /
//! `max_in_use` limits are one atomic word, so a hit or a release is one uncontended shard lock
//! plus one CAS, with no syscall and no allocation (docs/POOL.md, "State and locking").

mod config;
mod error;
mod manager;
mod pool;
mod stats;

pub use config::{ConfigError, PoolConfig};
pub use error::PoolError;
pub use manager::Manager;
pub use pool::{Pool, Pooled, MAINTENANCE_THREAD_NAME};
pub use stats::PoolStats;

/// Compiles and runs the README's example as a doctest, so it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
