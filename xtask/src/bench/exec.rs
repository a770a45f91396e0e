//! `cargo xtask bench exec [--json]`: command execution in a warm Linux guest.
//!
//! Builds the guest assets and the release `kiln` CLI, then runs its hidden `kiln bench-exec`
//! (directly on a hardware-virtualization host, elsewhere inside the emulated-virtualization
//! harness) which writes raw samples to `<target>/bench/exec-kiln.json`. Metrics (ms):
//! - `exec.kiln.exec_true`: `Sandbox::exec(["true"])` round trip in a warm guest;
//! - `exec.kiln.ping`: `Sandbox::ping()` round trip;
//! - `exec.kiln.boot_to_handshake`: cold `Sandbox::create` until the agent's `Hello`;
//! - `exec.qemu_microvm.boot_to_ready`: the same kernel + initramfs under QEMU `-M microvm`
//!   with KVM, launch until the agent's READY line, side by side (ratio = Kiln / QEMU).
//!
//! Exec and ping round trips have no QEMU counterpart: the agent reaches the host over
//! virtio-vsock, which under QEMU needs vhost-vsock in L1, which the harness does not load.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kiln_vmm::host;
use serde::Deserialize;

use super::{report, Format, PeerRatio, Stats};
use crate::harness::{self, HarnessOptions};
use crate::{build_guest, kernel, util};

/// Measured iterations of each round trip.
const ITERATIONS: usize = 200;
/// Unmeasured iterations first.
const WARMUP: usize = 20;
/// Cold boots of each VMM.
const BOOTS: usize = 5;
/// Deadline of the whole measurement in the harness.
const TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// What `kiln bench-exec` writes (see crates/sandbox-api/src/cli/bench.rs).
#[derive(Debug, Deserialize)]
struct Samples {
    exec_true_ms: Vec<f64>,
    ping_ms: Vec<f64>,
    boot_ms: f64,
    boot_samples_ms: Vec<f64>,
    qemu_microvm_ready_ms: Vec<f64>,
    qemu_error: Option<String>,
}

/// Builds the release `kiln` CLI and returns its path.
fn build_kiln_release() -> Result<PathBuf> {
    eprintln!("bench exec: building the kiln CLI (release)");
    util::run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(util::repo_root())
            .args(["build", "--release", "-p", "kiln", "--bin", "kiln"]),
    )
    .context("building the kiln CLI")?;
    let kiln = util::target_dir().join("release").join("kiln");
    if !kiln.is_file() {
        bail!("cargo built the kiln CLI but {} is missing", kiln.display());
    }
    Ok(kiln)
}

/// Runs the exec benchmark and reports each metric in `format`.
pub fn run(format: Format) -> Result<()> {
    let k = kernel::ensure()?;
    let g = build_guest::ensure()?;
    let kiln = build_kiln_release()?;
    let out_dir = util::target_dir().join("bench");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let out = out_dir.join("exec-kiln.json");
    // A stale file must never be reported as this run's result.
    let _ = fs::remove_file(&out);

    let argv: Vec<String> = vec![
        kiln.display().to_string(),
        "bench-exec".into(),
        "--iterations".into(),
        ITERATIONS.to_string(),
        "--warmup".into(),
        WARMUP.to_string(),
        "--boots".into(),
        BOOTS.to_string(),
        "--qemu-boots".into(),
        BOOTS.to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    let env = vec![
        ("KILN_KERNEL".to_string(), k.vmlinux.display().to_string()),
        (
            "KILN_INITRAMFS".to_string(),
            g.initramfs.display().to_string(),
        ),
    ];
    let kind = host::detect();
    let status = if kind.runs_linux_guests() {
        eprintln!("bench exec: running directly on this host ({kind})");
        Command::new(&argv[0])
            .args(&argv[1..])
            .envs(env)
            .status()
            .with_context(|| format!("starting {}", kiln.display()))?
            .code()
            .unwrap_or(128)
    } else {
        eprintln!(
            "bench exec: this host cannot boot Linux guests ({kind}); measuring inside the \
             emulated-virtualization harness (numbers are software-emulation numbers: compare \
             ratios, not absolute values)"
        );
        harness::run(&HarnessOptions {
            command: argv,
            timeout: Some(TIMEOUT),
            env,
        })?
    };
    if status != 0 {
        bail!("kiln bench-exec failed with status {status}");
    }
    let text = fs::read_to_string(&out)
        .with_context(|| format!("reading the samples from {}", out.display()))?;
    let s: Samples =
        serde_json::from_str(text.trim()).with_context(|| format!("parsing {}", out.display()))?;

    let stats = |name: &str, v: &[f64]| {
        Stats::from_samples(v).with_context(|| format!("metric {name} has no usable samples"))
    };
    report(
        "exec.kiln.exec_true",
        "ms",
        &stats("exec_true", &s.exec_true_ms)?,
        None,
        format,
    );
    report(
        "exec.kiln.ping",
        "ms",
        &stats("ping", &s.ping_ms)?,
        None,
        format,
    );
    let mut boots = s.boot_samples_ms.clone();
    boots.push(s.boot_ms);
    let kiln_boot = stats("boot", &boots)?;
    let qemu = Stats::from_samples(&s.qemu_microvm_ready_ms);
    let peer = qemu.as_ref().map(|q| PeerRatio {
        peer: "qemu-microvm".into(),
        ratio: kiln_boot.median / q.median,
    });
    report(
        "exec.kiln.boot_to_handshake",
        "ms",
        &kiln_boot,
        peer.as_ref(),
        format,
    );
    match (&qemu, &s.qemu_error) {
        (Some(q), _) => report("exec.qemu_microvm.boot_to_ready", "ms", q, None, format),
        (None, Some(e)) => eprintln!("bench exec: QEMU microvm not measured: {e}"),
        (None, None) => eprintln!("bench exec: QEMU microvm not measured"),
    }
    eprintln!(
        "bench exec: exec/ping round trips have no QEMU microvm counterpart here (the agent \
         needs vhost-vsock in L1, which the harness does not load)"
    );
    Ok(())
}
