//! [`PoolError`]: every way a pool operation fails.

use std::time::Duration;

use crate::config::ConfigError;

/// Why [`Pool::new`](crate::Pool::new), [`Pool::acquire`](crate::Pool::acquire) or
/// [`Pool::warm`](crate::Pool::warm) failed. `E` is the [`Manager::Error`](crate::Manager::Error).
#[derive(Debug, thiserror::Error)]
pub enum PoolError<E: std::error::Error + 'static> {
    /// The [`PoolConfig`](crate::PoolConfig) was rejected; the error names the field.
    #[error(transparent)]
    InvalidConfig(#[from] ConfigError),
    /// [`Manager::create`](crate::Manager::create) failed; the pool's counters were rolled back.
    #[error("creating a pooled resource failed")]
    Create(#[source] E),
    /// No in-use slot freed up within the acquire timeout.
    #[error("timed out after {waited:?} waiting for a resource: {in_use} in use, max_in_use is {max_in_use}")]
    TimedOut {
        /// How long `acquire()` waited.
        waited: Duration,
        /// Resources in use when it gave up.
        in_use: usize,
        /// The configured cap.
        max_in_use: usize,
    },
    /// [`Pool::shutdown`](crate::Pool::shutdown) was called (or the pool was dropped).
    #[error("the pool is shut down")]
    ShutDown,
    /// The background maintenance thread could not be started.
    #[error("spawning the pool's maintenance thread failed")]
    Spawn(#[source] std::io::Error),
}
