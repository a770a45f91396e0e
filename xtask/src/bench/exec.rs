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

use std::time::Duration;

use anyhow::{bail, Result};
use serde::Deserialize;

use super::{
    build_kiln_release, metric_stats as stats, read_samples, report, samples_file, Format,
    PeerRatio, Stats,
};
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

/// Runs the exec benchmark and reports each metric in `format`.
pub fn run(format: Format) -> Result<()> {
    let k = kernel::ensure()?;
    let g = build_guest::ensure()?;
    let kiln = build_kiln_release("bench exec: ")?;
    let out = samples_file("exec-kiln.json")?;

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
    let status = util::run_here_or_in_harness(
        "bench exec: ",
        " (numbers are software-emulation numbers: compare ratios, not absolute values)",
        argv,
        util::guest_env(&k.vmlinux, &g.initramfs),
        Some(TIMEOUT),
    )?;
    if status != 0 {
        bail!("kiln bench-exec failed with status {status}");
    }
    let s: Samples = read_samples(&out)?;

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
