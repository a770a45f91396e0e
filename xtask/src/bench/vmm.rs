//! `cargo xtask bench vmm`: VMM create -> READY with the bare-metal test guest
//! (`kiln_vmm::test_guest`, booted through PVH) on the host's /dev/kvm.
//!
//! Metrics (milliseconds, ≥ 30 runs each):
//! - `vmm.in_process.create_to_ready`: `Vm::start` until READY on the serial console, VMs
//!   booted one after another in one warm `kiln-bench boot --repeat` process (release build);
//! - `vmm.fresh_process.launch_to_ready`: spawning `kiln-bench boot --until-serial READY` until its
//!   READY line arrives on our end of its stdout (process start, dynamic linking, /dev/kvm
//!   open, VM build, guest boot) — the figure comparable with Firecracker's launch -> READY;
//! - `vmm.fresh_process.ready_to_gone.drop` / `.handoff`: a `kiln-bench boot --exit drop|handoff`
//!   process that exits by itself after READY, from its READY line until `wait` reaps it —
//!   the teardown on the critical path: `drop` stops the VM in the process (closing the VM fd
//!   is the slow part), `handoff` leaves the fds to a forked helper (`Vm::exit_process`,
//!   docs/VMM.md "Teardown"); runs of the two alternate, so both see the same host load;
//! - `vmm.peer.qemu_microvm.launch_to_ready`: the same guest under
//!   `qemu-system-x86_64 -accel kvm -M microvm` measured the same way, when QEMU runs here.
//!
//! Firecracker v1.16.1's 8.4 ms min / 8.7 ms median (DESIGN.md: same guest kind, this machine
//! kind) is printed as a labelled reference; it is not measured here. The host's load average
//! is printed too: on a shared 2-core machine it moves the medians (docs/VMM.md).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use kiln_testkit::QemuCommand;

use super::launch::{measured_runs, time_line_and_exit, time_to_line, AfterLine, LineMatch};
use super::{build_kiln_bench, command_json, note, report, Format, PeerRatio, Stats};
use crate::util::target_dir;

/// Measured runs per metric.
const RUNS: usize = 40;
/// Unmeasured runs first (page cache, CPU frequency).
const WARMUP: usize = 3;
/// Per-run deadline.
const RUN_TIMEOUT: Duration = Duration::from_secs(20);
/// Firecracker v1.16.1 launch -> READY on this machine kind (DESIGN.md), min / median ms.
const FIRECRACKER_REF: (f64, f64) = (8.4, 8.7);

/// `kiln-bench boot --exit` modes timed READY -> process gone.
const EXIT_MODES: [&str; 2] = ["drop", "handoff"];
/// Firecracker v1.16.1 READY -> process gone, median ms (issue 14, this machine kind).
const FIRECRACKER_GONE_MS: f64 = 1.24;

/// Runs the vmm benchmark and reports each metric in `format`.
pub fn run(format: Format) -> Result<()> {
    let kiln = build_kiln_bench("bench vmm: ")?;
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
    .context("in-process `kiln-bench boot --repeat`")?;
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
    .context("fresh `kiln-bench boot` processes")?;
    let fresh = Stats::from_durations_ms(&fresh).context("no fresh-process samples")?;

    // READY -> process gone, in-process teardown and handoff alternating.
    let mut gone: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for i in 0..(WARMUP + RUNS) * 2 {
        let mode = EXIT_MODES[i % 2];
        let mut c = Command::new(&kiln);
        c.args(["boot", "--kernel"])
            .arg(&guest)
            .args(["--until-serial", ready, "--exit", mode]);
        let (_, g) = time_line_and_exit(c, ready, RUN_TIMEOUT)
            .with_context(|| format!("READY -> gone, --exit {mode}, run {i}"))?;
        if i / 2 >= WARMUP {
            gone[i % 2].push(g);
        }
    }
    for (mode, samples) in EXIT_MODES.iter().zip(&gone) {
        let s = Stats::from_durations_ms(samples).context("no READY -> gone samples")?;
        report(
            &format!("vmm.fresh_process.ready_to_gone.{mode}"),
            "ms",
            &s,
            None,
            format,
        );
    }
    let line = format!(
        "reference (not measured here): Firecracker v1.16.1 READY -> process gone median \
         {FIRECRACKER_GONE_MS} ms (issue 14); target <= 1.5 ms"
    );
    note(format, "bench vmm: ", &line);

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

/// WARMUP + RUNS launches; returns the measured RUNS.
/// Each launch is timed to the first stdout line containing `needle`, then killed (stderr stays
/// with the caller's unless `make` redirected it: a failing run says why).
fn launch_samples(needle: &str, make: impl Fn() -> Command) -> Result<Vec<Duration>> {
    measured_runs(WARMUP, RUNS, |i| {
        time_to_line(
            make(),
            needle,
            LineMatch::Contains,
            AfterLine::Kill,
            RUN_TIMEOUT,
        )
        .with_context(|| format!("run {i}"))
    })
}

fn qemu_samples(guest: &Path, needle: &str) -> Result<Stats> {
    let make = || {
        let mut c = QemuCommand::new(guest)
            .machine("microvm,x-option-roms=off,rtc=off")
            .accel("kvm")
            .cpu("host")
            .smp(1)
            .memory_mib(128)
            .command();
        c.stderr(Stdio::null());
        c
    };
    let samples = launch_samples(needle, make)?;
    Stats::from_durations_ms(&samples).context("no QEMU samples")
}
