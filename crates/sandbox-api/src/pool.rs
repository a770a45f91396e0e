//! [`SandboxPool`]: a prewarm pool of [`Sandbox`]es, built on the generic `kiln-pool` crate.
//!
//! This module owns the sandbox side of pooling: [`SandboxManager`] (the `kiln_pool::Manager`
//! whose resource is a [`Sandbox`]), the background reaper that stops returned VMs off the
//! caller's thread, and the pool's error type [`SandboxPoolError`].
//!
//! **Pristine between users.** No file, process, environment variable, mount or other guest
//! change made by one user may be visible to the next. A returned sandbox is therefore never
//! reused in place: `is_reusable` says no, its VM is stopped (on the reaper thread, so dropping
//! a handle is cheap) and the pool's background thread makes a new one to keep `min_size` warm.
//! How the new one is made is the [`ResetMode`]:
//! - [`ResetMode::Reboot`]: a cold boot per use (seconds under software emulation);
//! - [`ResetMode::Restore`]: the pool's first sandbox is snapshotted right after it booted,
//!   before any user touched it, and every later one is restored from that pristine snapshot
//!   (`sandbox/snapshot.rs`; memory shared copy-on-write).
//!
//! Either cost is paid in the background as long as the pool is not drained faster than it
//! refills; an `acquire()` that finds the pool empty creates in the caller's thread (a miss).
//!
//! Health check: a ping that must answer within [`HEALTH_CHECK_TIMEOUT`].
//!
//! **Dead idle sandboxes.** A sandbox waiting in the pool can die without anyone touching it
//! (kernel panic, OOM of PID 1, a guest timer that reboots): `is_alive` is
//! [`Sandbox::is_running`], the VM's recorded exit state — no guest round trip — checked by
//! the pool on every hit and on every idle sandbox in each background pass. A dead one is
//! stopped (counted in `evict_count` and `dead_count`) and replaced; `acquire()` hands out the
//! next idle one or creates one. A guest that hangs without ending its VM is not detected here
//! (that needs a round trip); its first request fails at its deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Mutex;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use kiln_pool::{Manager, Pool, PoolConfig, PoolError, PoolStats, Pooled};

use crate::config::{ConfigError, SandboxConfig};
use crate::error::SandboxError;
use crate::sandbox::Sandbox;

/// How long a health-check ping may take before the sandbox counts as unhealthy.
pub const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Returned sandboxes queued for the reaper before `destroy` stops them inline instead.
const REAPER_QUEUE: usize = 64;

/// How long `SandboxPool::shutdown` waits for the reaper to stop the returned VMs.
const REAPER_CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest sandbox name ([`SandboxConfig::validate`] rejects longer ones).
const MAX_NAME_LEN: usize = 64;

/// A sandbox on loan from a [`SandboxPool`]: derefs to [`Sandbox`]; dropping it returns the
/// sandbox to the pool, which makes it pristine (or replaces it) for the next user.
pub type PooledSandbox = Pooled<SandboxManager>;

/// How a returned sandbox is made pristine for the next user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResetMode {
    /// The returned sandbox is destroyed (never reused); the pool boots fresh ones. Each use
    /// costs one cold boot, in the background while the pool keeps up.
    Reboot,
    /// The pool's first sandbox is snapshotted right after it boots (pristine); a returned
    /// sandbox is destroyed and every new one is restored from that snapshot (milliseconds
    /// instead of a boot; forks share the snapshot's memory copy-on-write). docs/SNAPSHOT.md.
    Restore,
}

/// Errors of [`SandboxPool`].
#[derive(Debug, thiserror::Error)]
pub enum SandboxPoolError {
    /// The sandbox configuration is invalid or a guest asset is missing.
    #[error("sandbox pool: {0}")]
    SandboxConfig(#[from] ConfigError),
    /// The pool configuration was rejected (the error names the field).
    #[error("sandbox pool: invalid pool configuration: {0}")]
    PoolConfig(#[from] kiln_pool::ConfigError),
    /// Booting a sandbox for an `acquire()` or `warm()` failed.
    #[error("sandbox pool: creating a sandbox failed: {0}")]
    Create(#[source] SandboxError),
    /// No sandbox came back within the acquire timeout while `max_in_use` were out.
    #[error(
        "sandbox pool: timed out after {waited:?} waiting for a sandbox ({in_use} in use, \
         max_in_use {max_in_use})"
    )]
    TimedOut {
        /// How long `acquire()` waited.
        waited: Duration,
        /// Sandboxes in use when it gave up.
        in_use: usize,
        /// The configured cap.
        max_in_use: usize,
    },
    /// The pool was shut down.
    #[error("sandbox pool: the pool is shut down")]
    ShutDown,
    /// A thread of the pool (maintenance or reaper) could not be started.
    #[error("sandbox pool: spawning the {thread} thread: {source}")]
    Spawn {
        /// Which thread.
        thread: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl From<PoolError<SandboxError>> for SandboxPoolError {
    fn from(e: PoolError<SandboxError>) -> Self {
        match e {
            PoolError::InvalidConfig(c) => SandboxPoolError::PoolConfig(c),
            PoolError::Create(source) => SandboxPoolError::Create(source),
            PoolError::TimedOut {
                waited,
                in_use,
                max_in_use,
            } => SandboxPoolError::TimedOut {
                waited,
                in_use,
                max_in_use,
            },
            PoolError::ShutDown => SandboxPoolError::ShutDown,
            PoolError::Spawn(source) => SandboxPoolError::Spawn {
                thread: kiln_pool::MAINTENANCE_THREAD_NAME,
                source,
            },
        }
    }
}

/// Stops returned sandboxes on a thread of its own, so releasing a handle never waits for a
/// VM to be torn down.
struct Reaper {
    tx: Mutex<Option<SyncSender<Sandbox>>>,
    handle: Mutex<Option<JoinHandle<()>>>,
    /// Disconnected when the reaper thread ends (it holds the sender).
    done: Mutex<Option<mpsc::Receiver<()>>>,
}

// The guarded values (an Option of a sender or a handle) cannot be left half-updated.
use kiln_sync::lock;

impl Reaper {
    fn start() -> Result<Reaper, SandboxPoolError> {
        let (tx, rx) = mpsc::sync_channel::<Sandbox>(REAPER_QUEUE);
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let handle = thread::Builder::new()
            .name("kiln-pool-reaper".into())
            .spawn(move || {
                let _done = done_tx;
                for sandbox in rx {
                    tracing::debug!(vm = sandbox.name(), "sandbox pool: stopping a returned VM");
                    drop(sandbox);
                }
            })
            .map_err(|source| SandboxPoolError::Spawn {
                thread: "kiln-pool-reaper",
                source,
            })?;
        Ok(Reaper {
            tx: Mutex::new(Some(tx)),
            handle: Mutex::new(Some(handle)),
            done: Mutex::new(Some(done_rx)),
        })
    }

    /// Queues `sandbox` to be stopped; stops it here when the reaper is closed or busy.
    fn stop(&self, sandbox: Sandbox) {
        let tx = lock(&self.tx).clone();
        let Some(tx) = tx else {
            drop(sandbox);
            return;
        };
        match tx.try_send(sandbox) {
            Ok(()) => {}
            Err(TrySendError::Full(sandbox) | TrySendError::Disconnected(sandbox)) => drop(sandbox),
        }
    }

    /// Stops taking work and waits (at most [`REAPER_CLOSE_TIMEOUT`]) until every queued
    /// sandbox is stopped; past the deadline the reaper thread is left to finish on its own.
    /// Idempotent.
    fn close(&self) {
        drop(lock(&self.tx).take());
        let handle = lock(&self.handle).take();
        let done = lock(&self.done).take();
        let (Some(handle), Some(done)) = (handle, done) else {
            return;
        };
        if handle.thread().id() == thread::current().id() {
            return;
        }
        match done.recv_timeout(REAPER_CLOSE_TIMEOUT) {
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                if handle.join().is_err() {
                    tracing::error!("sandbox pool: the reaper thread panicked");
                }
            }
            // Nothing is ever sent: only the timeout remains.
            Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => tracing::error!(
                "sandbox pool: returned VMs still stopping after {REAPER_CLOSE_TIMEOUT:?}; \
                 not waiting longer"
            ),
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.close();
    }
}

/// The `kiln_pool::Manager` of a [`SandboxPool`]: boots sandboxes from one [`SandboxConfig`],
/// health-checks them with a short ping, never hands out one whose VM has ended
/// (`is_alive`) and stops them on the reaper thread.
pub struct SandboxManager {
    config: SandboxConfig,
    next: AtomicU64,
    reaper: Reaper,
    health_check_timeout: Duration,
    /// How returned sandboxes are replaced (snapshots).
    mode: ResetMode,
    /// ResetMode::Restore: the pristine snapshot, once taken (snapshots).
    pristine: Mutex<Option<crate::sandbox::snapshot::PristineSnapshot>>,
}

impl std::fmt::Debug for SandboxManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxManager")
            .field("config", &self.config)
            .field("created", &self.next.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl SandboxManager {
    #[cfg(test)]
    fn new(config: SandboxConfig) -> Result<SandboxManager, SandboxPoolError> {
        Self::with_mode(config, ResetMode::Reboot)
    }

    fn with_mode(
        config: SandboxConfig,
        mode: ResetMode,
    ) -> Result<SandboxManager, SandboxPoolError> {
        Ok(SandboxManager {
            config,
            next: AtomicU64::new(0),
            reaper: Reaper::start()?,
            health_check_timeout: HEALTH_CHECK_TIMEOUT,
            mode,
            pristine: Mutex::new(None),
        })
    }

    /// The configuration every sandbox of the pool is created from.
    pub fn sandbox_config(&self) -> &SandboxConfig {
        &self.config
    }

    /// How returned sandboxes are made pristine.
    pub fn reset_mode(&self) -> ResetMode {
        self.mode
    }

    /// The configuration of the next sandbox: a configured name gets a `-p<N>` suffix so every
    /// sandbox of the pool has its own (no name: the default, already unique).
    fn next_config(&self) -> SandboxConfig {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut cfg = self.config.clone();
        if let Some(base) = &cfg.name {
            cfg.name = Some(pooled_name(base, n));
        }
        cfg
    }
}

/// `<base>-p<n>`, cutting `base` so the result stays within the name length limit.
fn pooled_name(base: &str, n: u64) -> String {
    let suffix = format!("-p{n}");
    let keep = MAX_NAME_LEN.saturating_sub(suffix.len());
    // Valid names are ASCII, so any byte index is a char boundary; be safe anyway.
    let mut cut = base.len().min(keep);
    while !base.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{suffix}", &base[..cut])
}

impl Manager for SandboxManager {
    type Resource = Sandbox;
    type Error = SandboxError;

    fn create(&self) -> Result<Sandbox, SandboxError> {
        let sb = match self.mode {
            ResetMode::Reboot => Sandbox::create(self.next_config())?,
            ResetMode::Restore => {
                crate::sandbox::snapshot::pooled_sandbox(&self.pristine, self.next_config())?
            }
        };
        tracing::debug!(vm = sb.name(), ready = ?sb.boot_timings().ready, "sandbox pool: booted");
        Ok(sb)
    }

    fn health_check(&self, sandbox: &mut Sandbox) -> Result<(), SandboxError> {
        sandbox.ping_timeout(self.health_check_timeout)
    }

    fn reset(&self, sandbox: &mut Sandbox) -> Result<(), SandboxError> {
        // Unreachable while `is_reusable` says no; refuse rather than hand a used sandbox on.
        Err(SandboxError::InvalidArgument {
            vm: sandbox.name().to_owned(),
            op: "reset",
            message: "a sandbox is never reset in place; destroying it".into(),
        })
    }

    fn is_alive(&self, sandbox: &Sandbox) -> bool {
        // Cheap (two uncontended mutexes, no guest round trip): called on every hit and, under
        // the pool's lock, on every idle sandbox in each background pass.
        let running = sandbox.is_running();
        if !running {
            tracing::debug!(
                vm = sandbox.name(),
                "sandbox pool: an idle sandbox's VM has ended; replacing it"
            );
        }
        running
    }

    fn is_reusable(&self, _sandbox: &Sandbox) -> bool {
        // Both reset modes: a used sandbox is never handed to another user; the pool makes a
        // new one (boot or restore from the pristine snapshot) instead.
        false
    }

    fn destroy(&self, sandbox: Sandbox) {
        self.reaper.stop(sandbox);
    }
}

/// A prewarm pool of [`Sandbox`]es. `Sync`: share it between threads with an `Arc`.
///
/// ```no_run
/// use kiln::{PoolConfig, SandboxConfig, SandboxPool};
///
/// let pool = SandboxPool::new(
///     SandboxConfig::new().memory_mib(256),
///     PoolConfig { min_size: 2, max_size: 4, ..PoolConfig::default() },
/// )?;
/// pool.warm(2)?;                              // boot two now (the background thread keeps 2)
/// {
///     let sb = pool.acquire()?;               // derefs to Sandbox
///     let r = sb.exec(&["echo", "hi"])?;
///     assert_eq!(r.stdout, b"hi\n");
/// }                                           // returned: the next user gets a pristine one
/// println!("{:?}", pool.stats());
/// pool.shutdown();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct SandboxPool {
    pool: Pool<SandboxManager>,
}

impl std::fmt::Debug for SandboxPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxPool")
            .field("pool", &self.pool)
            .finish()
    }
}

impl SandboxPool {
    /// Validates both configurations (a missing guest asset fails here, not on the first
    /// acquire), starts the pool's threads and, when `pool.min_size > 0`, starts warming
    /// `min_size` sandboxes in the background (use [`warm`](Self::warm) to wait for them).
    /// Reset mode [`ResetMode::Restore`]: the first sandbox boots, later ones are restored from
    /// its pristine snapshot.
    pub fn new(sandbox: SandboxConfig, pool: PoolConfig) -> Result<SandboxPool, SandboxPoolError> {
        Self::with_reset_mode(sandbox, pool, ResetMode::Restore)
    }

    /// [`new`](Self::new) with an explicit [`ResetMode`] (`Restore`: sandboxes after the first
    /// are restored from a pristine snapshot of it).
    pub fn with_reset_mode(
        sandbox: SandboxConfig,
        pool: PoolConfig,
        mode: ResetMode,
    ) -> Result<SandboxPool, SandboxPoolError> {
        sandbox.validate()?;
        pool.validate()?;
        let manager = SandboxManager::with_mode(sandbox, mode)?;
        Ok(SandboxPool {
            pool: Pool::new(manager, pool)?,
        })
    }

    /// Takes a sandbox: an idle one (hit) or one booted now in this thread (miss). Waits up to
    /// the pool's `acquire_timeout` when `max_in_use` sandboxes are out.
    pub fn acquire(&self) -> Result<PooledSandbox, SandboxPoolError> {
        Ok(self.pool.acquire()?)
    }

    /// [`acquire`](Self::acquire) with an explicit wait limit for an in-use slot.
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<PooledSandbox, SandboxPoolError> {
        Ok(self.pool.acquire_timeout(timeout)?)
    }

    /// Boots up to `n` idle sandboxes now, in this thread, never beyond `max_size` idle.
    /// Returns how many were added.
    pub fn warm(&self, n: usize) -> Result<usize, SandboxPoolError> {
        Ok(self.pool.warm(n)?)
    }

    /// The pool's counters (hits, misses, evictions, idle, in use, created...).
    pub fn stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// How returned sandboxes are made pristine.
    pub fn reset_mode(&self) -> ResetMode {
        self.pool.manager().reset_mode()
    }

    /// The configuration every sandbox is created from.
    pub fn sandbox_config(&self) -> &SandboxConfig {
        self.pool.manager().sandbox_config()
    }

    /// The pool's configuration.
    pub fn pool_config(&self) -> &PoolConfig {
        self.pool.config()
    }

    /// Stops every idle sandbox and the pool's threads, and waits until their VMs are stopped.
    /// Later `acquire()`/`warm()` calls fail with [`SandboxPoolError::ShutDown`]; sandboxes
    /// still on loan keep working and are stopped when their handle drops. Idempotent.
    pub fn shutdown(&self) {
        self.pool.shutdown();
        self.pool.manager().reaper.close();
    }
}

impl Drop for SandboxPool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_names_are_unique_and_bounded() {
        assert_eq!(pooled_name("web", 0), "web-p0");
        assert_eq!(pooled_name("web", 12), "web-p12");
        let long = "x".repeat(64);
        let n = pooled_name(&long, 123);
        assert_eq!(n.len(), 64);
        assert!(n.ends_with("-p123"));
        assert_eq!(pooled_name("", 1), "-p1");
    }

    #[test]
    fn configured_names_get_suffixes_and_defaults_stay_unnamed() {
        let m = SandboxManager::new(SandboxConfig::new().name("job")).unwrap();
        assert_eq!(m.next_config().name.as_deref(), Some("job-p0"));
        assert_eq!(m.next_config().name.as_deref(), Some("job-p1"));
        let m = SandboxManager::new(SandboxConfig::new()).unwrap();
        assert_eq!(m.next_config().name, None);
        assert_eq!(m.reset_mode(), ResetMode::Reboot);
    }

    #[test]
    fn invalid_configurations_fail_before_anything_starts() {
        let e = SandboxPool::new(SandboxConfig::new().vcpus(0), PoolConfig::default()).unwrap_err();
        assert!(matches!(e, SandboxPoolError::SandboxConfig(_)), "{e}");
        assert!(e.to_string().contains("vcpus"), "{e}");

        // Valid sandbox configuration (stand-in asset files), invalid pool configuration.
        let dir = tempfile::tempdir().unwrap();
        let (kernel, initramfs) = (dir.path().join("vmlinux"), dir.path().join("initrd"));
        std::fs::write(&kernel, b"k").unwrap();
        std::fs::write(&initramfs, b"i").unwrap();
        let sandbox = SandboxConfig::new().kernel(kernel).initramfs(initramfs);
        let e = SandboxPool::new(
            sandbox.clone(),
            PoolConfig {
                max_size: 0,
                ..PoolConfig::default()
            },
        )
        .unwrap_err();
        assert!(matches!(e, SandboxPoolError::PoolConfig(_)), "{e}");
        assert!(e.to_string().contains("max_size"), "{e}");

        // Both valid: nothing boots until the first acquire (min_size 0).
        let pool = SandboxPool::new(sandbox, PoolConfig::default()).unwrap();
        assert_eq!(pool.stats(), PoolStats::default());
        assert_eq!(pool.reset_mode(), ResetMode::Restore);
        pool.shutdown();
        assert!(matches!(pool.acquire(), Err(SandboxPoolError::ShutDown)));
    }

    #[test]
    fn pool_errors_map_to_pool_variants() {
        let e: SandboxPoolError = PoolError::<SandboxError>::ShutDown.into();
        assert!(matches!(e, SandboxPoolError::ShutDown));
        let e: SandboxPoolError = PoolError::<SandboxError>::TimedOut {
            waited: Duration::from_secs(1),
            in_use: 2,
            max_in_use: 2,
        }
        .into();
        assert!(e.to_string().contains("max_in_use 2"), "{e}");
    }
}
