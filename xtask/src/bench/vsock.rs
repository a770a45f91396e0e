//! `cargo xtask bench vsock [--json]`: the virtio-vsock data plane with a Linux guest.
//!
//! Builds the guest assets and the release `vsock_throughput` example of kiln-vmm, runs it
//! (directly on a hardware-virtualization host, elsewhere inside the emulated-virtualization
//! harness) and reports, over the agent's echo server on guest port 5000:
//! - `vsock.connect` (ms): host connect to the guest port until established;
//! - `vsock.echo.host_to_guest` (MiB/s): bytes written by the host / time until all of them
//!   were delivered into the guest;
//! - `vsock.echo.guest_to_host` (MiB/s): bytes / time until all came back (both directions
//!   run concurrently through the echo).
//!
//! In the harness these are software-emulation numbers: compare ratios, not absolute values.

use std::fs;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kiln_vmm::host;
use serde::Deserialize;

use super::{report, Format, Stats};
use crate::harness::{self, HarnessOptions};
use crate::{build_guest, kernel, util};

/// MiB echoed per run.
const MIB: usize = 32;
/// Measured echo runs.
const RUNS: usize = 5;
/// Measured connects.
const CONNECTS: usize = 50;
/// Deadline of the whole measurement in the harness.
const TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// What the example writes.
#[derive(Debug, Deserialize)]
struct Samples {
    connect_ms: Vec<f64>,
    h2g_mib_s: Vec<f64>,
    g2h_mib_s: Vec<f64>,
}

/// Runs the vsock benchmark and reports each metric in `format`.
pub fn run(format: Format) -> Result<()> {
    let k = kernel::ensure()?;
    let g = build_guest::ensure()?;
    eprintln!("bench vsock: building the vsock_throughput example (release)");
    util::run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(util::repo_root())
            .args([
                "build",
                "--release",
                "-p",
                "kiln-vmm",
                "--example",
                "vsock_throughput",
            ]),
    )
    .context("building the vsock_throughput example")?;
    let exe = util::target_dir()
        .join("release")
        .join("examples")
        .join("vsock_throughput");
    if !exe.is_file() {
        bail!("cargo built the example but {} is missing", exe.display());
    }
    let out_dir = util::target_dir().join("bench");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let out = out_dir.join("vsock.json");
    let _ = fs::remove_file(&out);
    let argv: Vec<String> = vec![
        exe.display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--mib".into(),
        MIB.to_string(),
        "--runs".into(),
        RUNS.to_string(),
        "--connects".into(),
        CONNECTS.to_string(),
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
        eprintln!("bench vsock: running directly on this host ({kind})");
        Command::new(&argv[0])
            .args(&argv[1..])
            .envs(env)
            .status()
            .with_context(|| format!("starting {}", exe.display()))?
            .code()
            .unwrap_or(128)
    } else {
        eprintln!(
            "bench vsock: this host cannot boot Linux guests ({kind}); measuring inside the \
             emulated-virtualization harness (software-emulation numbers: compare ratios)"
        );
        harness::run(&HarnessOptions {
            command: argv,
            timeout: Some(TIMEOUT),
            env,
        })?
    };
    if status != 0 {
        bail!("vsock_throughput failed with status {status}");
    }
    let text = fs::read_to_string(&out)
        .with_context(|| format!("reading the samples from {}", out.display()))?;
    let s: Samples =
        serde_json::from_str(text.trim()).with_context(|| format!("parsing {}", out.display()))?;
    let stats = |name: &str, v: &[f64]| {
        Stats::from_samples(v).with_context(|| format!("metric {name} has no usable samples"))
    };
    report(
        "vsock.connect",
        "ms",
        &stats("connect", &s.connect_ms)?,
        None,
        format,
    );
    report(
        "vsock.echo.host_to_guest",
        "MiB/s",
        &stats("host_to_guest", &s.h2g_mib_s)?,
        None,
        format,
    );
    report(
        "vsock.echo.guest_to_host",
        "MiB/s",
        &stats("guest_to_host", &s.g2h_mib_s)?,
        None,
        format,
    );
    Ok(())
}
