//! The [`Manager`] trait: how the pool creates, checks, resets and destroys the resources it
//! keeps. This is the only thing a user of the crate implements.

/// The factory and life-cycle hooks of a pooled resource.
///
/// The pool calls these methods **outside its locks** (except [`is_alive`](Manager::is_alive)
/// in the background pass), so they may be slow (booting a VM,
/// restoring a snapshot) without blocking other threads' `acquire()` of idle resources. They are
/// called from three kinds of thread:
///
/// - the thread calling [`Pool::acquire`](crate::Pool::acquire) (`is_alive` on a hit,
///   `create` on a miss, `destroy` of an idle resource found dead),
/// - the thread dropping a [`Pooled`](crate::Pooled) handle (`is_reusable`, `health_check`,
///   `reset`, `destroy`),
/// - the pool's background thread `kiln-pool-maint` (`is_alive` on idle resources — with the
///   pool's idle set locked, see [`is_alive`](Manager::is_alive) —, `create` to keep `min_size` warm,
///   `destroy` for idle-TTL and dead evictions), and the caller of
///   [`Pool::warm`](crate::Pool::warm) / [`Pool::shutdown`](crate::Pool::shutdown).
///
/// Order on release: `is_reusable` → (`health_check` when due) → `reset` → back to idle. Any
/// "no" or error destroys the resource instead of pooling it. On a hit: `is_alive` → handed
/// out, or destroyed and the next idle one tried.
///
/// # Example
///
/// ```
/// use kiln_pool::{Manager, Pool, PoolConfig};
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("connect failed")]
/// struct ConnectError;
///
/// struct Conn { buffer: Vec<u8>, broken: bool }
///
/// struct ConnManager;
///
/// impl Manager for ConnManager {
///     type Resource = Conn;
///     type Error = ConnectError;
///
///     fn create(&self) -> Result<Conn, ConnectError> {
///         Ok(Conn { buffer: Vec::new(), broken: false })
///     }
///     fn reset(&self, c: &mut Conn) -> Result<(), ConnectError> {
///         c.buffer.clear(); // the next user must not see this user's data
///         Ok(())
///     }
///     fn is_reusable(&self, c: &Conn) -> bool {
///         !c.broken
///     }
/// }
///
/// let pool = Pool::new(ConnManager, PoolConfig::default()).unwrap();
/// {
///     let mut conn = pool.acquire().unwrap();
///     conn.buffer.extend_from_slice(b"secret");
/// } // returned to the pool here, after reset()
/// assert!(pool.acquire().unwrap().buffer.is_empty());
/// assert_eq!(pool.stats().hit_count, 1);
/// ```
pub trait Manager: Send + Sync + 'static {
    /// The pooled thing (a sandbox, a connection, a buffer).
    type Resource: Send + 'static;
    /// What `create`, `health_check` and `reset` fail with.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Makes a new resource. Failures reach the caller of `acquire()`/`warm()` as
    /// [`PoolError::Create`](crate::PoolError::Create); the background thread logs them and
    /// retries on its next tick.
    fn create(&self) -> Result<Self::Resource, Self::Error>;

    /// Checks that a returned resource still works. Called on every Nth release of a resource
    /// (`PoolConfig::health_check_interval`). An error evicts and destroys it. Default: healthy.
    fn health_check(&self, _resource: &mut Self::Resource) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Makes a returned resource pristine for the next user (nothing of the previous user may
    /// remain visible). An error destroys it instead of pooling it. Default: nothing to reset.
    fn reset(&self, _resource: &mut Self::Resource) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Whether a returned resource may be reused at all (cheap, no I/O: e.g. a "poisoned" flag
    /// the user set, or a use counter). `false` destroys it. Default: `true`.
    fn is_reusable(&self, _resource: &Self::Resource) -> bool {
        true
    }

    /// Whether an **idle** resource is still alive: a cheap validation run before the pool
    /// hands it out, for resources that can die while nobody holds them (a VM whose guest
    /// crashed, a child process that exited, a connection the peer closed). Default: `true`.
    ///
    /// Called
    /// - on every hit, in the thread calling `acquire()`, outside the pool's locks, just before
    ///   the idle resource is handed out. `false` destroys it (counted in `evict_count` and
    ///   `dead_count`; the hit is not counted) and `acquire()` goes on with the next idle
    ///   resource, or creates one (a miss) when none is left; the background thread refills
    ///   `min_size`;
    /// - by the background thread, on every idle resource in each maintenance pass (every
    ///   `PoolConfig::maintenance_interval` and whenever it is woken), so a dead idle resource is
    ///   replaced before anyone asks for it. This call is made **with the idle set locked**
    ///   (taking the resources out of the idle list to check them would make concurrent
    ///   `acquire()`s miss): it is the one hook that does.
    ///
    /// So it must be cheap and must not block: read a state the resource already has (an exit
    /// status, a "closed" flag, a VM's run state), no I/O, no round trip, and never call back
    /// into the pool. A check that needs a round trip belongs in
    /// [`health_check`](Self::health_check) (run on release). A panic counts as "dead" on a
    /// hit (the slot is freed and the resource dropped) and is logged by the background
    /// thread, which keeps the resource until its next pass.
    fn is_alive(&self, _resource: &Self::Resource) -> bool {
        true
    }

    /// Releases a resource for good. Must not panic; errors are the implementation's to log.
    /// Default: drop it.
    fn destroy(&self, resource: Self::Resource) {
        drop(resource);
    }
}
