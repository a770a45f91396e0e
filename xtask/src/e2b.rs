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

/// The `e2b` npm package of the JS check (tests/e2b/js_check.cjs).
const E2B_NPM: &str = "e2b@2.51.0";

/// Installs the `e2b` npm package into `<assets>/npm-e2b/node_modules` (once), with the
/// system's `npm`. Returns that directory.
pub fn ensure_npm() -> Result<PathBuf> {
    let dir = util::assets_dir()?.join("npm-e2b");
    std::fs::create_dir_all(&dir)?;
    let _lock = util::lock_file(&dir.join(".lock"))?;
    let want = E2B_NPM.trim_start_matches("e2b@");
    let installed = std::fs::read_to_string(dir.join("node_modules/e2b/package.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .is_some_and(|v| v["version"] == want);
    if !installed {
        eprintln!(
            "e2b-js: installing {E2B_NPM} from npm into {}",
            dir.display()
        );
        std::fs::write(dir.join("package.json"), "{\"private\": true}\n")?;
        util::run(
            Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--silent", E2B_NPM])
                .current_dir(&dir),
        )?;
    }
    Ok(dir)
}
