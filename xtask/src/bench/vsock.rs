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

use std::time::Duration;

use anyhow::{bail, Result};
use serde::Deserialize;

use super::{metric_stats as stats, read_samples, report, samples_file, Format};
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
    let exe = util::cargo_build(
        "the vsock_throughput example",
        &[
            "build",
            "--release",
            "-p",
            "kiln-vmm",
            "--example",
            "vsock_throughput",
        ],
        util::target_dir()
            .join("release")
            .join("examples")
            .join("vsock_throughput"),
    )?;
    let out = samples_file("vsock.json")?;
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
    let status = util::run_here_or_in_harness(
        "bench vsock: ",
        " (software-emulation numbers: compare ratios)",
        argv,
        util::guest_env(&k.vmlinux, &g.initramfs),
        Some(TIMEOUT),
    )?;
    if status != 0 {
        bail!("vsock_throughput failed with status {status}");
    }
    let s: Samples = read_samples(&out)?;
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
