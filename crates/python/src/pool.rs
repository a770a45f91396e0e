//! `kiln.SandboxPool`: a prewarm pool of sandboxes (`kiln::SandboxPool`), and `PoolStats`.
//!
//! `acquire()` hands out a `kiln.Sandbox` whose `shutdown()` (or the end of its `with`
//! block) returns it to the pool; the next user gets a pristine sandbox.

use pyo3::prelude::*;

use kiln::{PoolConfig, ResetMode};

use crate::convert;
use crate::errors;
use crate::sandbox::{config_from_kwargs, Holder, PySandbox};

/// A pool of warm sandboxes. Keywords: the pool's `min_size` (kept warm in the
/// background), `max_size` (idle kept), `max_in_use` (`acquire()` waits beyond it),
/// `acquire_timeout` (seconds), `reset_mode` (`"restore"`: new sandboxes are restored from a
/// pristine snapshot; `"reboot"`: cold boots), plus every `Sandbox` keyword for the
/// sandboxes.
#[pyclass(module = "kiln", name = "SandboxPool", frozen)]
pub struct PySandboxPool {
    pool: kiln::SandboxPool,
}

impl std::fmt::Debug for PySandboxPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxPool").finish_non_exhaustive()
    }
}

fn reset_mode(py: Python<'_>, s: &str) -> PyResult<ResetMode> {
    match s {
        "restore" => Ok(ResetMode::Restore),
        "reboot" => Ok(ResetMode::Reboot),
        other => Err(errors::config_err(
            py,
            "reset_mode",
            format!("{other:?} is not \"restore\" or \"reboot\""),
        )),
    }
}

fn count(py: Python<'_>, field: &'static str, v: Option<i64>, default: usize) -> PyResult<usize> {
    match v {
        None => Ok(default),
        Some(v) => usize::try_from(v)
            .map_err(|_| errors::config_err(py, field, format!("{v} is negative"))),
    }
}

#[pymethods]
impl PySandboxPool {
    #[new]
    #[pyo3(signature = (*, min_size=None, max_size=None, max_in_use=None, acquire_timeout=None,
        reset_mode="restore", name=None, vcpus=None, memory_mib=None, kernel=None,
        initramfs=None, extra_cmdline=None, quiet_kernel=None, boot_timeout=None,
        request_timeout=None, consumer_deadline=None, image=None, overlay_size_mib=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        min_size: Option<i64>,
        max_size: Option<i64>,
        max_in_use: Option<i64>,
        acquire_timeout: Option<&Bound<'_, PyAny>>,
        reset_mode: &str,
        name: Option<String>,
        vcpus: Option<i64>,
        memory_mib: Option<i64>,
        kernel: Option<&Bound<'_, PyAny>>,
        initramfs: Option<&Bound<'_, PyAny>>,
        extra_cmdline: Option<String>,
        quiet_kernel: Option<bool>,
        boot_timeout: Option<&Bound<'_, PyAny>>,
        request_timeout: Option<&Bound<'_, PyAny>>,
        consumer_deadline: Option<&Bound<'_, PyAny>>,
        image: Option<String>,
        overlay_size_mib: Option<i64>,
    ) -> PyResult<PySandboxPool> {
        let sandbox = config_from_kwargs(
            py,
            name,
            vcpus,
            memory_mib,
            kernel,
            initramfs,
            extra_cmdline,
            quiet_kernel,
            boot_timeout,
            request_timeout,
            consumer_deadline,
            image,
            overlay_size_mib,
        )?;
        let d = PoolConfig::default();
        let mut pc = PoolConfig {
            min_size: count(py, "min_size", min_size, d.min_size)?,
            max_size: count(py, "max_size", max_size, d.max_size)?,
            max_in_use: count(py, "max_in_use", max_in_use, d.max_in_use)?,
            ..d
        };
        if let Some(s) = convert::extract_seconds(acquire_timeout, "acquire_timeout")? {
            pc.acquire_timeout = convert::seconds("acquire_timeout", s, false)
                .map_err(|r| errors::config_err(py, "acquire_timeout", r))?;
        }
        let mode = self::reset_mode(py, reset_mode)?;
        let pool = py
            .detach(|| kiln::SandboxPool::with_reset_mode(sandbox, pc, mode))
            .map_err(|e| errors::pool_err(py, &e))?;
        Ok(PySandboxPool { pool })
    }

    /// A sandbox from the pool (idle, or booted now); waits up to `timeout` seconds
    /// (default `acquire_timeout`) when `max_in_use` are out. Use it as a context manager:
    /// leaving the block (or `shutdown()`) returns it.
    #[pyo3(signature = (timeout=None))]
    fn acquire(&self, py: Python<'_>, timeout: Option<&Bound<'_, PyAny>>) -> PyResult<PySandbox> {
        let t = convert::extract_timeout(timeout, "timeout")?;
        let sb = py
            .detach(|| match t {
                Some(t) => self.pool.acquire_timeout(t),
                None => self.pool.acquire(),
            })
            .map_err(|e| errors::pool_err(py, &e))?;
        Ok(PySandbox::wrap(Holder::Pooled(sb)))
    }

    /// Boots up to `n` idle sandboxes now (never beyond `max_size` idle); returns how many.
    fn warm(&self, py: Python<'_>, n: usize) -> PyResult<usize> {
        py.detach(|| self.pool.warm(n))
            .map_err(|e| errors::pool_err(py, &e))
    }

    /// The pool's counters.
    fn stats(&self) -> PoolStats {
        let s = self.pool.stats();
        PoolStats {
            hit_count: s.hit_count,
            miss_count: s.miss_count,
            evict_count: s.evict_count,
            dead_count: s.dead_count,
            idle_count: s.idle_count,
            in_use_count: s.in_use_count,
            waiting_count: s.waiting_count,
            created_count: s.created_count,
            create_failed_count: s.create_failed_count,
            destroyed_count: s.destroyed_count,
        }
    }

    /// `"restore"` or `"reboot"`.
    #[getter]
    fn reset_mode(&self) -> &'static str {
        match self.pool.reset_mode() {
            ResetMode::Reboot => "reboot",
            _ => "restore",
        }
    }

    /// Stops the idle sandboxes and the pool's threads; later `acquire()` raises
    /// `PoolClosedError`. Sandboxes still out keep working and stop when returned.
    fn shutdown(&self, py: Python<'_>) {
        py.detach(|| self.pool.shutdown());
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.shutdown(py);
        false
    }
}

/// `SandboxPool.stats()`: the pool's counters at one moment.
#[pyclass(module = "kiln", name = "PoolStats", frozen)]
#[derive(Debug, Clone, Copy)]
pub struct PoolStats {
    /// `acquire()` calls served by an idle sandbox.
    #[pyo3(get)]
    hit_count: u64,
    /// `acquire()` calls that booted one.
    #[pyo3(get)]
    miss_count: u64,
    /// Sandboxes destroyed instead of reused (other than by shutdown).
    #[pyo3(get)]
    evict_count: u64,
    /// Idle sandboxes found dead.
    #[pyo3(get)]
    dead_count: u64,
    #[pyo3(get)]
    idle_count: usize,
    #[pyo3(get)]
    in_use_count: usize,
    #[pyo3(get)]
    waiting_count: usize,
    #[pyo3(get)]
    created_count: u64,
    #[pyo3(get)]
    create_failed_count: u64,
    #[pyo3(get)]
    destroyed_count: u64,
}

#[pymethods]
impl PoolStats {
    fn __repr__(&self) -> String {
        format!(
            "PoolStats(hit_count={}, miss_count={}, evict_count={}, idle_count={}, in_use_count={}, created_count={}, destroyed_count={})",
            self.hit_count,
            self.miss_count,
            self.evict_count,
            self.idle_count,
            self.in_use_count,
            self.created_count,
            self.destroyed_count
        )
    }
}
