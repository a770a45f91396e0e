//! Helpers shared by the xtask flows: locating the repository and the assets directory,
//! installing missing Debian packages with apt-get, running commands with their output sent to
//! a log file while a progress line is shown, hashing, and atomic file placement.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

/// The repository root (the parent of the xtask crate).
pub fn repo_root() -> PathBuf {
    // `cargo run` sets CARGO_MANIFEST_DIR for the process too; fall back to the build-time value.
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest.parent().map(Path::to_path_buf).unwrap_or(manifest)
}

/// The cargo target directory of the workspace (`$CARGO_TARGET_DIR` or `<repo>/target`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                repo_root().join(dir)
            }
        }
        _ => repo_root().join("target"),
    }
}

/// Kiln's assets directory (see docs/ARCHITECTURE.md "Assets"), created if missing.
pub fn assets_dir() -> Result<PathBuf> {
    let dir = kiln::assets::assets_dir()?;
    fs::create_dir_all(&dir).with_context(|| format!("creating assets dir {}", dir.display()))?;
    Ok(dir)
}

/// POSIX shell single-quoting: `s` as one word for `sh`.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Renders a command line for messages.
pub fn display_cmd(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    // `$CARGO` is a long toolchain path; "cargo" says the same.
    let mut s = if program.file_name().is_some_and(|n| n == "cargo") {
        "cargo".to_string()
    } else {
        program.to_string_lossy().into_owned()
    };
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs `cmd` with inherited stdio and fails with the command line if it does not succeed.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("starting `{}`", display_cmd(cmd)))?;
    if !status.success() {
        bail!("`{}` failed: {status}", display_cmd(cmd));
    }
    Ok(())
}

/// Runs `cargo <args>` in the repository (the `$CARGO` that runs us, if any) with inherited
/// stdio, then checks that it produced `artifact`, which it returns; `what` names the artifact
/// in messages ("the kiln CLI").
pub fn cargo_build(what: &str, args: &[&str], artifact: PathBuf) -> Result<PathBuf> {
    run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(repo_root())
            .args(args),
    )
    .with_context(|| format!("building {what}"))?;
    if !artifact.is_file() {
        bail!("cargo built {what} but {} is missing", artifact.display());
    }
    Ok(artifact)
}

/// The environment that points a `kiln` process at the guest kernel and initramfs.
pub fn guest_env(vmlinux: &Path, initramfs: &Path) -> Vec<(String, String)> {
    vec![
        ("KILN_KERNEL".to_string(), vmlinux.display().to_string()),
        (
            "KILN_INITRAMFS".to_string(),
            initramfs.display().to_string(),
        ),
    ]
}

/// Runs `argv` with `env` on top of ours: directly where this host boots Linux guests, elsewhere
/// inside the emulated-virtualization harness (give up after `timeout`; `None` = the harness
/// default). Says which on stderr, each line starting with `tag` ("bench exec: " or ""), plus
/// `harness_note` after the harness line. Returns the command's exit code (128 when a signal
/// ended it directly on this host).
pub fn run_here_or_in_harness(
    tag: &str,
    harness_note: &str,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    timeout: Option<Duration>,
) -> Result<i32> {
    let Some((program, args)) = argv.split_first() else {
        bail!("{tag}no command to run");
    };
    let kind = kiln_vmm::host::detect();
    if kind.runs_linux_guests() {
        eprintln!("{tag}running directly on this host ({kind})");
        let status = Command::new(program)
            .args(args)
            .envs(env)
            .status()
            .with_context(|| format!("starting {program}"))?;
        return Ok(status.code().unwrap_or(128));
    }
    eprintln!(
        "{tag}this host cannot boot Linux guests ({kind}); running inside the \
         emulated-virtualization harness{harness_note}"
    );
    crate::harness::run(&crate::harness::HarnessOptions {
        command: argv,
        timeout,
        env,
        idle_timeout: None,
    })
}

/// Runs `cmd` and returns its stdout (trimmed); stderr is passed through to ours.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting `{}`", display_cmd(cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", display_cmd(cmd), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Runs `cmd` with stdout and stderr appended to `log`; every stdout line is passed to
/// `on_line` (e.g. to update a progress bar). On failure the error names the log file and
/// the last lines of it are printed.
pub fn run_logged(cmd: &mut Command, log: &Path, mut on_line: impl FnMut(&str)) -> Result<()> {
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log {}", log.display()))?;
    let file = Arc::new(Mutex::new(file));
    {
        let mut f = lock(&file);
        writeln!(f, "$ {}", display_cmd(cmd))
            .with_context(|| format!("writing {}", log.display()))?;
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{}`", display_cmd(cmd)))?;
    let stderr = child.stderr.take();
    let err_file = Arc::clone(&file);
    let err_thread = std::thread::spawn(move || {
        if let Some(stderr) = stderr {
            copy_lines(stderr, &err_file, |_| {});
        }
    });
    if let Some(stdout) = child.stdout.take() {
        copy_lines(stdout, &file, &mut on_line);
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{}`", display_cmd(cmd)))?;
    // The stderr thread ends when the pipe closes; a panic there only loses log lines.
    let _ = err_thread.join();
    check_logged(status, cmd, log)
}

use kiln_sync::lock;

fn copy_lines(src: impl Read, log: &Mutex<File>, mut on_line: impl FnMut(&str)) {
    let mut reader = BufReader::new(src);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                // Logging is best effort: a full disk must not hide the command's own result.
                let _ = lock(log).write_all(&buf);
                on_line(String::from_utf8_lossy(&buf).trim_end());
            }
        }
    }
}

fn check_logged(status: ExitStatus, cmd: &Command, log: &Path) -> Result<()> {
    if status.success() {
        return Ok(());
    }
    let tail = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = tail.lines().collect();
    eprintln!("---- last lines of {} ----", log.display());
    for line in &lines[lines.len().saturating_sub(30)..] {
        eprintln!("{line}");
    }
    eprintln!("----");
    bail!(
        "`{}` failed: {status}; full log: {}",
        display_cmd(cmd),
        log.display()
    )
}

/// A spinner with a message, ticking on its own.
pub fn spinner(msg: impl Into<String>) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner:.green} [{elapsed_precise}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.set_message(msg.into());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// A bar of `len` steps with a message.
pub fn bar(len: u64, msg: impl Into<String>) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner:.green} [{elapsed_precise}] [{bar:30.cyan/blue}] {pos}/{len} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(msg.into());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Whether the file behind `entry` was last modified more than `age` ago (false when that
/// cannot be told).
pub fn modified_longer_ago(entry: &fs::DirEntry, age: Duration) -> bool {
    entry
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|elapsed| elapsed > age)
}

/// Points the symlink `link` at `target`, replacing whatever is there atomically.
pub fn replace_symlink(target: &Path, link: &Path) -> Result<()> {
    if let Some(parent) = link.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let tmp = link.with_extension(format!("tmp-link-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)
        .with_context(|| format!("creating symlink {}", tmp.display()))?;
    fs::rename(&tmp, link).with_context(|| format!("replacing {}", link.display()))?;
    Ok(())
}

/// Holds an exclusive advisory lock on a file until dropped (serialises concurrent xtask runs
/// that write the same part of the assets directory).
#[derive(Debug)]
pub struct DirLock {
    _lock: nix::fcntl::Flock<File>,
}

/// Takes an exclusive lock on `path` (created if missing), saying so if it has to wait.
pub fn lock_file(path: &Path) -> Result<DirLock> {
    use nix::fcntl::{Flock, FlockArg};
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let open = || {
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening lock file {}", path.display()))
    };
    match Flock::lock(open()?, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(DirLock { _lock: lock }),
        Err(_) => {
            eprintln!(
                "waiting for another xtask holding {} to finish ...",
                path.display()
            );
            let lock = Flock::lock(open()?, FlockArg::LockExclusive)
                .map_err(|(_, errno)| errno)
                .with_context(|| format!("locking {}", path.display()))?;
            Ok(DirLock { _lock: lock })
        }
    }
}

static APT_UPDATED: AtomicBool = AtomicBool::new(false);

/// Which of `packages` dpkg does not report as installed.
pub fn missing_packages(packages: &[&str]) -> Result<Vec<String>> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Status}\n"])
        .args(packages)
        .stderr(Stdio::null())
        .output()
        .context("running dpkg-query (is this a Debian-based host?)")?;
    // dpkg-query exits 1 when some package is unknown; its stdout still lists the known ones.
    let text = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = text
        .lines()
        .filter_map(|line| {
            let (name, status) = line.split_once(' ')?;
            (status.trim() == "installed").then_some(name)
        })
        .collect();
    Ok(packages
        .iter()
        .filter(|p| {
            !installed
                .iter()
                .any(|i| i == *p || i.split(':').next() == Some(**p))
        })
        .map(|p| p.to_string())
        .collect())
}

/// Installs those of `packages` that are missing with apt-get (running `apt-get update` once
/// per process before the first install). Fails with the package names if that is impossible.
pub fn ensure_packages(packages: &[&str]) -> Result<()> {
    let missing = missing_packages(packages)?;
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing missing Debian packages: {}", missing.join(" "));
    let sudo = !nix::unistd::geteuid().is_root();
    let apt = |args: &[&str]| -> Result<()> {
        let mut cmd = if sudo {
            let mut c = Command::new("sudo");
            c.args(["-n", "--preserve-env=DEBIAN_FRONTEND", "apt-get"]);
            c
        } else {
            Command::new("apt-get")
        };
        cmd.args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null());
        run(&mut cmd)
    };
    if !APT_UPDATED.swap(true, Ordering::SeqCst) {
        apt(&["update", "-q"]).context("apt-get update")?;
    }
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(missing.iter().map(String::as_str));
    apt(&args).with_context(|| {
        format!(
            "could not install the Debian packages {} (as root, or with passwordless sudo)",
            missing.join(" ")
        )
    })?;
    let still = missing_packages(packages)?;
    if !still.is_empty() {
        bail!(
            "apt-get ran but these packages are still missing: {}",
            still.join(" ")
        );
    }
    Ok(())
}

/// The installed version of a Debian package.
pub fn package_version(package: &str) -> Result<String> {
    let v = output(Command::new("dpkg-query").args(["-W", "-f=${Version}", package]))?;
    if v.is_empty() {
        bail!("dpkg-query reports no version for {package}");
    }
    Ok(v)
}

/// Number of CPUs to build with.
pub fn jobs() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Makes the venv `venv` (`python3 -m venv`) unless it exists, then pip-installs
/// `requirements` into it unless `installed(python)` says they are there; `what` names the
/// venv in messages. Returns the venv's python.
pub fn ensure_venv(
    what: &str,
    venv: &Path,
    requirements: &[&str],
    installed: impl Fn(&Path) -> bool,
) -> Result<PathBuf> {
    let python = venv.join("bin").join("python");
    if !python.is_file() {
        eprintln!("{what}: creating the venv {}", venv.display());
        run(Command::new("python3").args(["-m", "venv"]).arg(venv)).with_context(|| {
            format!("creating the {what} venv (needs python3 with the venv module)")
        })?;
    }
    if !installed(&python) {
        eprintln!("{what}: installing {} from PyPI", requirements.join(", "));
        run(Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(requirements))
        .with_context(|| {
            format!(
                "installing {} into the {what} venv",
                requirements.join(", ")
            )
        })?;
    }
    Ok(python)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_input() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn symlink_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("sub/link");
        replace_symlink(Path::new("/a"), &link).unwrap();
        replace_symlink(Path::new("/b"), &link).unwrap();
        assert_eq!(fs::read_link(&link).unwrap(), PathBuf::from("/b"));
    }

    #[test]
    fn dpkg_reports_unknown_package_missing() {
        let missing = missing_packages(&["dpkg", "kiln-no-such-package"]).unwrap();
        assert_eq!(missing, vec!["kiln-no-such-package".to_string()]);
    }

    #[test]
    fn run_logged_captures_output_and_reports_failure() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let mut seen = Vec::new();
        run_logged(
            Command::new("sh").args(["-c", "echo one; echo two >&2; echo three"]),
            &log,
            |l| seen.push(l.to_string()),
        )
        .unwrap();
        assert_eq!(seen, vec!["one", "three"]);
        let text = fs::read_to_string(&log).unwrap();
        assert!(text.contains("two"));
        let err = run_logged(Command::new("sh").args(["-c", "exit 3"]), &log, |_| {}).unwrap_err();
        assert!(err.to_string().contains(&log.display().to_string()));
    }
}
