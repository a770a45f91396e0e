//! `cargo xtask bench vmm`: VMM create -> READY with the bare-metal test guest
//! (`kiln_vmm::test_guest`, booted through PVH) on the host's /dev/kvm.
//!
//! Metrics (milliseconds, ≥ 30 runs each):
//! - `vmm.in_process.create_to_ready`: `Vm::start` until READY on the serial console, VMs
//!   booted one after another in one warm `kiln boot --repeat` process (release build);
//! - `vmm.fresh_process.launch_to_ready`: spawning `kiln boot --until-serial READY` until its
//!   READY line arrives on our end of its stdout (process start, dynamic linking, /dev/kvm
//!   open, VM build, guest boot) — the figure comparable with Firecracker's launch -> READY;
//! - `vmm.peer.qemu_microvm.launch_to_ready`: the same guest under
//!   `qemu-system-x86_64 -accel kvm -M microvm` measured the same way, when QEMU runs here.
//!
//! Firecracker v1.16.1's 8.4 ms min / 8.7 ms median (DESIGN.md: same guest kind, this machine
//! kind) is printed as a labelled reference; it is not measured here. The host's load average
//! is printed too: on a shared 2-core machine it moves the medians (docs/VMM.md).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{build_kiln_release, command_json, note, report, Format, PeerRatio, Stats};
use crate::util::target_dir;

/// Measured runs per metric.
const RUNS: usize = 40;
/// Unmeasured runs first (page cache, CPU frequency).
const WARMUP: usize = 3;
/// Per-run deadline.
const RUN_TIMEOUT: Duration = Duration::from_secs(20);
/// Firecracker v1.16.1 launch -> READY on this machine kind (DESIGN.md), min / median ms.
const FIRECRACKER_REF: (f64, f64) = (8.4, 8.7);

/// Runs the vmm benchmark and reports each metric in `format`.
pub fn run(format: Format) -> Result<()> {
    let kiln = build_kiln_release("bench vmm: ")?;
    let dir = target_dir().join("kiln-bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let guest = kiln_vmm::test_guest::write_to(&dir)
        .with_context(|| format!("writing the test guest to {}", dir.display()))?;
    let ready = kiln_vmm::test_guest::READY;

    // In-process: one kiln process boots WARMUP + RUNS VMs back to back.
    let samples: Vec<f64> = command_json(
        Command::new(&kiln)
            .args(["boot", "--kernel"])
            .arg(&guest)
            .args(["--until-serial", ready, "--repeat"])
            .arg((WARMUP + RUNS).to_string()),
    )
    .context("in-process `kiln boot --repeat`")?;
    let in_process = Stats::from_samples(samples.get(WARMUP..).unwrap_or_default())
        .context("no in-process samples")?;
    report(
        "vmm.in_process.create_to_ready",
        "ms",
        &in_process,
        None,
        format,
    );

    // Fresh process per VM.
    let fresh = launch_samples(ready, || {
        let mut c = Command::new(&kiln);
        c.args(["boot", "--kernel"])
            .arg(&guest)
            .args(["--until-serial", ready]);
        c
    })
    .context("fresh `kiln boot` processes")?;
    let fresh = Stats::from_durations_ms(&fresh).context("no fresh-process samples")?;

    // Peer: QEMU microvm with KVM, same guest, if it runs here.
    let qemu = qemu_samples(&guest, ready);
    let peer = match &qemu {
        Ok(s) => Some(PeerRatio {
            peer: "qemu-microvm (measured)".into(),
            ratio: fresh.median / s.median,
        }),
        Err(_) => None,
    };
    report(
        "vmm.fresh_process.launch_to_ready",
        "ms",
        &fresh,
        peer.as_ref(),
        format,
    );
    match &qemu {
        Ok(s) => report(
            "vmm.peer.qemu_microvm.launch_to_ready",
            "ms",
            s,
            None,
            format,
        ),
        Err(e) => eprintln!("bench vmm: QEMU peer not measured: {e:#}"),
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!(
        "bench vmm: load average during the run: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let (fc_min, fc_median) = FIRECRACKER_REF;
    let line = format!(
        "reference (not measured here): Firecracker v1.16.1 launch -> READY min {fc_min} / \
         median {fc_median} ms (DESIGN.md); kiln fresh-process median is {:.2}x that",
        fresh.median / fc_median
    );
    note(format, "bench vmm: ", &line);
    Ok(())
}

/// Kills and reaps a child (it may already be gone).
fn finish(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Spawns `cmd` with stdout piped and returns the time from spawn until a stdout line
/// containing `needle`; the child is then killed and reaped.
fn time_to_line(mut cmd: Command, needle: &str) -> Result<Duration> {
    // stderr stays with the caller's unless `make` redirected it: a failing run says why.
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let stdout = child.stdout.take().context("child has no stdout")?;
    let (tx, rx) = mpsc::channel();
    let needle_owned = needle.to_owned();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(None);
                    return;
                }
                Ok(_) => {
                    if String::from_utf8_lossy(&line).contains(&needle_owned) {
                        let _ = tx.send(Some(Instant::now()));
                        // Drain the rest so the child never blocks on a full pipe.
                        let _ = std::io::copy(&mut r, &mut std::io::sink());
                        return;
                    }
                }
            }
        }
    });
    let got = rx.recv_timeout(RUN_TIMEOUT);
    finish(child);
    let _ = reader.join();
    match got {
        Ok(Some(at)) => Ok(at - t0),
        Ok(None) => bail!("{cmd:?} ended without printing {needle:?}"),
        Err(_) => bail!("{cmd:?} did not print {needle:?} within {RUN_TIMEOUT:?}"),
    }
}

/// WARMUP + RUNS launches; returns the measured RUNS.
fn launch_samples(needle: &str, make: impl Fn() -> Command) -> Result<Vec<Duration>> {
    let mut v = Vec::with_capacity(RUNS);
    for i in 0..WARMUP + RUNS {
        let d = time_to_line(make(), needle).with_context(|| format!("run {i}"))?;
        if i >= WARMUP {
            v.push(d);
        }
    }
    Ok(v)
}

fn qemu_samples(guest: &Path, needle: &str) -> Result<Stats> {
    let make = || {
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-accel", "kvm", "-cpu", "host", "-smp", "1", "-m", "128"])
            .args(["-M", "microvm,x-option-roms=off,rtc=off"])
            .args(["-nographic", "-nodefaults", "-no-user-config", "-no-reboot"])
            .args(["-serial", "stdio", "-kernel"])
            .arg(guest)
            .stderr(Stdio::null());
        c
    };
    let samples = launch_samples(needle, make)?;
    Stats::from_durations_ms(&samples).context("no QEMU samples")
}
