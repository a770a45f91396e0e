//! The venv of the tier-4 `kiln serve` test (tests/tests/serve_e2b.rs): `<target>/kiln-e2b/venv`
//! with the real `e2b` SDK from PyPI (the version docs/SERVER.md is written against) and
//! pytest, created once on the host before tier 4 (the harness has no network).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use crate::util;

/// PyPI requirements of the e2b test venv.
const REQUIREMENTS: &[&str] = &["e2b==2.63.0", "pytest>=8,<10"];

/// `<target>/kiln-e2b/venv/bin/python`.
pub fn venv_python() -> PathBuf {
    util::target_dir()
        .join("kiln-e2b")
        .join("venv")
        .join("bin")
        .join("python")
}

/// Creates the venv and installs the requirements (once). Returns its python.
pub fn ensure() -> Result<PathBuf> {
    let dir = util::target_dir().join("kiln-e2b");
    let _lock = util::lock_file(&dir.join(".lock"))?;
    let venv = dir.join("venv");
    let python = venv_python();
    if !python.is_file() {
        eprintln!("e2b: creating the venv {}", venv.display());
        util::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
            .context("creating the e2b venv (needs python3 with the venv module)")?;
    }
    let have = Command::new(&python)
        .args([
            "-c",
            "import importlib.metadata as m, pytest; assert m.version('e2b') == '2.63.0'",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        eprintln!("e2b: installing {} from PyPI", REQUIREMENTS.join(", "));
        util::run(
            Command::new(&python)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .args(REQUIREMENTS),
        )
        .context("installing the e2b SDK and pytest into the venv")?;
    }
    Ok(python)
}
