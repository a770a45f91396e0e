//! kiln-python: the `kiln` Python package's native module (`kiln._native`), which embeds Kiln
//! in the Python process (docs/PYTHON.md).
//!
//! Modules: [`convert`] (Python arguments -> Kiln types), [`errors`] (the exception hierarchy
//! and the one mapping from Kiln's Rust errors), [`sandbox`] (`Sandbox` and its value
//! classes), [`pool`] (`SandboxPool`). The pure-Python part of the package (`kiln.aio`, type
//! stubs) is in `python/kiln/`; maturin builds both into one abi3 wheel.

pub mod convert;
pub mod errors;
pub mod pool;
pub mod sandbox;

use pyo3::prelude::*;

/// The native half of the `kiln` package.
#[pymodule]
mod _native {
    use pyo3::prelude::*;

    #[pymodule_export]
    use crate::pool::{PoolStats, PySandboxPool};
    #[pymodule_export]
    use crate::sandbox::{
        _bench_exec_rust, DirEntry, Event, ExecResult, ExecStream, FileStat, PySandbox,
        SnapshotInfo,
    };

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        let py = m.py();
        for ((class, ..), t) in crate::errors::CLASSES
            .iter()
            .zip(crate::errors::classes(py)?)
        {
            m.add(class.name(), t.bind(py))?;
        }
        m.add("DEFAULT_OUTPUT_CAP", kiln::DEFAULT_OUTPUT_CAP)?;
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        Ok(())
    }
}
