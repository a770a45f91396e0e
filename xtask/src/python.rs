//! `cargo xtask python [--bench]`: builds the `kiln` Python package (crates/python) as an abi3
//! wheel with maturin and installs it into a venv under the target directory, together with
//! pytest; then runs the tests that need no VM (`tests/python/test_novm.py`) on this host.
//! `--bench` then measures exec `true` round trips from Python against the same loop in Rust,
//! in one sandbox, directly or inside the harness (`crates/python/bench/exec_roundtrip.py`).
//!
//! Layout: `<target>/kiln-python/venv` (`python3 -m venv`; maturin and pytest from PyPI via
//! pip, installed once), `<target>/kiln-python/wheels/` (the last wheel built). The tier-4
//! tests (`tests/tests/python_sdk.rs`) run `<venv>/bin/python -m pytest tests/python`;
//! `cargo xtask test` builds the venv before tier 4 ([`ensure`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::{build_guest, kernel, util};

/// PyPI requirements installed into the venv.
const REQUIREMENTS: &[&str] = &["maturin>=1.9.4,<2", "pytest>=8,<10"];

/// `cargo xtask python` arguments.
#[derive(Debug, Args)]
pub struct PythonArgs {
    /// Also run the exec round-trip benchmark (Python vs Rust, one sandbox).
    #[arg(long)]
    pub bench: bool,
    /// Round trips per side for `--bench`.
    #[arg(long, default_value_t = 200)]
    pub iterations: u32,
}

/// The built Python environment.
#[derive(Debug)]
pub struct PythonEnv {
    /// `<venv>/bin/python`, with `kiln` and pytest installed.
    pub python: PathBuf,
}

/// `<target>/kiln-python`.
pub fn python_dir() -> PathBuf {
    util::target_dir().join("kiln-python")
}

/// Creates the venv (once), installs maturin and pytest (once), builds the wheel (release,
/// abi3) and installs it. Returns the venv's python.
pub fn ensure() -> Result<PythonEnv> {
    let dir = python_dir();
    let _lock = util::lock_file(&dir.join(".lock"))?;
    let venv = dir.join("venv");
    let python = util::ensure_venv("python", &venv, REQUIREMENTS, |python| {
        venv.join("bin").join("maturin").is_file()
            && Command::new(python)
                .args(["-c", "import pytest"])
                .output()
                .is_ok_and(|o| o.status.success())
    })?;
    let wheels = dir.join("wheels");
    let _ = fs::remove_dir_all(&wheels);
    let manifest = util::repo_root().join("crates/python/Cargo.toml");
    eprintln!("python: building the kiln wheel (maturin, release, abi3)");
    util::run(
        Command::new(venv.join("bin").join("maturin"))
            .current_dir(util::repo_root())
            .args(["build", "--release", "--quiet", "-m"])
            .arg(&manifest)
            .arg("-i")
            .arg(&python)
            .arg("--out")
            .arg(&wheels),
    )
    .context("building the wheel")?;
    let wheel = newest_wheel(&wheels)?;
    eprintln!("python: installing {}", wheel.display());
    util::run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--force-reinstall",
            ])
            .arg(&wheel),
    )
    .context("installing the wheel")?;
    Ok(PythonEnv { python })
}

fn newest_wheel(dir: &Path) -> Result<PathBuf> {
    let mut wheels: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    wheels.sort();
    match wheels.pop() {
        Some(w) => Ok(w),
        None => bail!("maturin built no wheel in {}", dir.display()),
    }
}

/// `cargo xtask python`.
pub fn cmd_python(args: &PythonArgs) -> Result<i32> {
    let env = ensure()?;
    eprintln!("python: the tests that need no VM (tests/python/test_novm.py)");
    util::run(
        Command::new(&env.python)
            .current_dir(util::repo_root())
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .arg("tests/python/test_novm.py"),
    )?;
    eprintln!("python: ready: {}", env.python.display());
    if !args.bench {
        return Ok(0);
    }
    let k = kernel::ensure()?;
    let g = build_guest::ensure()?;
    let script = util::repo_root().join("crates/python/bench/exec_roundtrip.py");
    let argv = vec![
        env.python.display().to_string(),
        script.display().to_string(),
        "--iterations".into(),
        args.iterations.to_string(),
    ];
    let mut guest_env = util::guest_env(&k.vmlinux, &g.initramfs);
    guest_env.push(("PYTHONDONTWRITEBYTECODE".into(), "1".into()));
    util::run_here_or_in_harness("python bench: ", "", argv, guest_env, None)
}
