//! Tier-4: the `kiln` Python package (crates/python) in a real Kiln guest. Each test runs one
//! file of `tests/python` with pytest in the venv that `cargo xtask python` builds
//! (`<target>/kiln-python/venv`; `cargo xtask test` builds it before tier 4) and asserts that
//! pytest passed: run/stream/errors/threads/asyncio, files, the pool, snapshot/restore/fork,
//! a sandbox from the python image, and the checks that need no VM.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Deadline of one pytest run (the runner gives each tier-4 test 5 minutes).
const PYTEST_TIMEOUT: Duration = Duration::from_secs(280);

/// `$KILN_PYTHON`, else `<target>/kiln-python/venv/bin/python` next to this test executable.
fn venv_python() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_PYTHON").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // <target>/<profile>/deps/<test>-<hash>
    let target = exe
        .ancestors()
        .nth(3)
        .map(PathBuf::from)
        .unwrap_or_default();
    target.join("kiln-python/venv/bin/python")
}

/// Runs `pytest -q tests/python/<file>` and fails the test with its output unless it passed.
fn pytest(file: &str) {
    kiln_tests::require_tier4();
    let python = venv_python();
    assert!(
        python.is_file(),
        "no Python venv with the kiln package at {} (build it with `cargo xtask python`; \
         `cargo xtask test` does before tier 4)",
        python.display()
    );
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python");
    let mut cmd = Command::new(&python);
    cmd.current_dir(&dir)
        .args(["-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", file])
        // The source tree is read-only inside the harness.
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let run = kiln_tests::run_collecting(&mut cmd, PYTEST_TIMEOUT);
    let (stdout, stderr) = (&run.stdout, &run.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    kiln_tests::assert_pytest_passed(file, &run, PYTEST_TIMEOUT);
}

#[test]
fn python_sdk_run_stream_errors_threads() {
    pytest("test_run.py");
}

#[test]
fn python_sdk_files() {
    pytest("test_files.py");
}

#[test]
fn python_sdk_pool_is_pristine_between_users() {
    pytest("test_pool.py");
}

#[test]
fn python_sdk_snapshot_restore_fork() {
    pytest("test_snapshot.py");
}

#[test]
fn python_sdk_no_vm_checks() {
    pytest("test_novm.py");
}

#[test]
fn python_sdk_image() {
    pytest("test_image.py");
}
