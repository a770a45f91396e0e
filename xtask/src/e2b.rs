//! The venv of the tier-4 `kiln serve` test (tests/tests/serve_e2b.rs): `<target>/kiln-e2b/venv`
//! with the real `e2b` SDK from PyPI (the version docs/SERVER.md is written against) and
//! pytest, created once on the host before tier 4 (the harness has no network).

use std::path::PathBuf;
use std::process::Command;

use anyhow::Result;

use crate::util;

/// PyPI requirements of the e2b test venv.
const REQUIREMENTS: &[&str] = &["e2b==2.63.0", "pytest>=8,<10"];

/// Creates the venv and installs the requirements (once). Returns its python.
pub fn ensure() -> Result<PathBuf> {
    let dir = util::target_dir().join("kiln-e2b");
    let _lock = util::lock_file(&dir.join(".lock"))?;
    util::ensure_venv("e2b", &dir.join("venv"), REQUIREMENTS, |python| {
        Command::new(python)
            .args([
                "-c",
                "import importlib.metadata as m, pytest; assert m.version('e2b') == '2.63.0'",
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// PyPI requirements of the schemathesis venv (the `/kiln/v1` OpenAPI check of
/// tests/tests/serve_e2b.rs).
const SCHEMATHESIS: &[&str] = &["schemathesis==4.32.5"];

/// Creates `<target>/kiln-schemathesis/venv` with schemathesis (once). Returns its python.
pub fn ensure_schemathesis() -> Result<PathBuf> {
    let dir = util::target_dir().join("kiln-schemathesis");
    let _lock = util::lock_file(&dir.join(".lock"))?;
    util::ensure_venv("schemathesis", &dir.join("venv"), SCHEMATHESIS, |python| {
        Command::new(python)
            .args([
                "-c",
                "import importlib.metadata as m; assert m.version('schemathesis') == '4.32.5'",
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}
