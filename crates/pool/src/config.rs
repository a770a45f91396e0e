//! [`PoolConfig`]: the pool's sizes, timeouts and intervals, and their validation
//! ([`ConfigError`] names the offending field).

use std::time::Duration;

/// How a [`Pool`](crate::Pool) sizes itself. Build it with struct update syntax:
///
/// ```
/// use std::time::Duration;
/// use kiln_pool::PoolConfig;
///
/// let config = PoolConfig {
///     min_size: 2,
///     max_size: 8,
///     max_in_use: 32,
///     acquire_timeout: Duration::from_secs(5),
///     ..PoolConfig::default()
/// };
/// assert!(config.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Idle resources the background thread keeps ready ("warm"). 0: no prewarming.
    /// Must be ≤ `max_size`.
    pub min_size: usize,
    /// Most idle resources kept. When a returned (or warmed) resource would exceed it, the least
    /// recently used idle resource is evicted. Must be ≥ 1.
    pub max_size: usize,
    /// Idle resources *beyond `min_size`* that have been idle longer than this are evicted by the
    /// background thread (the `min_size` most recently used ones stay warm). `None`: never.
    /// `Some(0)` is invalid.
    pub max_idle_duration: Option<Duration>,
    /// Health-check a resource on every Nth release of that resource (1: on every release,
    /// 0: never).
    pub health_check_interval: u32,
    /// Most resources handed out at once (including ones being created for an `acquire()`).
    /// `acquire()` waits up to `acquire_timeout` for a slot beyond it. Must be ≥ 1;
    /// `usize::MAX`: no cap.
    pub max_in_use: usize,
    /// How long `acquire()` waits for an in-use slot before failing with
    /// [`PoolError::TimedOut`](crate::PoolError::TimedOut). Zero: fail at once when at the cap.
    pub acquire_timeout: Duration,
    /// How often the background thread wakes to apply `max_idle_duration` and retry refills
    /// that failed. It is also woken whenever the idle count drops below `min_size`. Must be
    /// > 0.
    pub maintenance_interval: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            min_size: 0,
            max_size: 8,
            max_idle_duration: Some(Duration::from_secs(300)),
            health_check_interval: 1,
            max_in_use: usize::MAX,
            acquire_timeout: Duration::from_secs(30),
            maintenance_interval: Duration::from_secs(1),
        }
    }
}

/// A [`PoolConfig`] field holds an unusable value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid pool config: {field}: {reason}")]
pub struct ConfigError {
    /// The offending field, e.g. `"min_size"`.
    pub field: &'static str,
    /// Why, with the values involved.
    pub reason: String,
}

impl ConfigError {
    fn new(field: &'static str, reason: String) -> Self {
        Self { field, reason }
    }
}

impl PoolConfig {
    /// Checks every rule documented on the fields; the first broken one is reported.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_size == 0 {
            return Err(ConfigError::new(
                "max_size",
                "must be at least 1 (a pool that keeps nothing idle never hits)".into(),
            ));
        }
        if self.min_size > self.max_size {
            return Err(ConfigError::new(
                "min_size",
                format!(
                    "{} exceeds max_size {}: the pool could never keep that many idle",
                    self.min_size, self.max_size
                ),
            ));
        }
        if self.max_idle_duration == Some(Duration::ZERO) {
            return Err(ConfigError::new(
                "max_idle_duration",
                "must be > 0 (use None to never expire idle resources)".into(),
            ));
        }
        if self.max_in_use == 0 {
            return Err(ConfigError::new(
                "max_in_use",
                "must be at least 1 (no acquire could ever succeed)".into(),
            ));
        }
        if self.maintenance_interval.is_zero() {
            return Err(ConfigError::new(
                "maintenance_interval",
                "must be > 0 (the background thread would spin)".into(),
            ));
        }
        Ok(())
    }
}
