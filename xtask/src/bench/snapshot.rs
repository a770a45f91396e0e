//! `cargo xtask bench snapshot`: snapshot restore and create with the bare-metal test guest
//! (`kiln_vmm::test_guest`) on the host's /dev/kvm, driven through
//! `kiln-bench vm-snapshot` (release build, crates/bench).
//!
//! Metrics:
//! - `snapshot.in_process.restore_to_running` (ms): `Vm::restore` start until the restored
//!   guest wrote its first complete serial line (the `fastcount` guest prints without pause),
//!   restores one after another in one warm `kiln-bench vm-snapshot restore --repeat` process;
//!   `snapshot.in_process.restore_call` is the `Vm::restore` call alone (vCPUs started);
//! - `snapshot.prepared.start_call` / `start_to_running` (ms): the same with each restore
//!   prepared first (`Vm::prepare_restore`, untimed: what a pool refill does ahead of time)
//!   and only `PreparedRestore::start` timed;
//! - `snapshot.fresh_process.restore_to_running` (ms): spawning `kiln-bench vm-snapshot restore`
//!   until its `RUNNING` line reaches us (process start, /dev/kvm open, restore, guest output)
//!   — comparable with Firecracker's "new process -> resumed";
//! - `snapshot.create.<size>.<kind>` (ms): `Vm::snapshot` of a paused guest of 128 MiB and
//!   1 GiB, idle (only the test guest's pages used: the sparse memory file skips the rest)
//!   and filled (every page non-zero, the whole RAM written), on disk and on tmpfs;
//! - `snapshot.forks.*` (KiB per fork): memory of one process holding 100 idle (halted)
//!   restored forks, per fork: RssAnon (private memory, including guest pages the guests
//!   wrote), PSS (shared memory-file pages divided among the forks) and RSS.
//!
//! Firecracker v1.16.1's restore (new process -> resumed) of 8.7 ms min / 13.2 ms median on
//! this machine kind (DESIGN.md) is printed as a labelled reference; it is not measured here.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use kiln_testkit::bench::{
    VmCreateSamples as CreateOut, VmForksSamples as ForksOut, VmRestoreSamples as RestoreOut,
};

use super::launch::{measured_runs, time_to_line, AfterLine, LineMatch};
use super::{build_kiln_bench, command_json, note, report, Format, PeerRatio, Stats};
use crate::util::target_dir;

/// Measured restores per metric.
const RUNS: usize = 40;
/// Unmeasured runs first.
const WARMUP: usize = 3;
/// Snapshots per create metric (the 1 GiB filled ones write 1 GiB each).
const CREATE_RUNS: usize = 10;
/// Forks held at once for the memory metric.
const FORKS: usize = 100;
/// Per-run deadline.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);
/// Firecracker v1.16.1 snapshot restore (new process -> resumed), min / median ms (DESIGN.md).
const FIRECRACKER_RESTORE: (f64, f64) = (8.7, 13.2);
/// Firecracker snapshot create of 128 MiB on tmpfs / on disk, ms (DESIGN.md).
const FIRECRACKER_CREATE: (f64, f64) = (90.0, 233.0);

/// Runs the snapshot benchmark and reports each metric in `format`.
pub fn run(format: Format) -> Result<()> {
    let kiln = build_kiln_bench("bench snapshot: ")?;
    let dir = target_dir().join("kiln-bench/snapshot");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let guest = kiln_vmm::test_guest::write_to(&dir)
        .with_context(|| format!("writing the test guest to {}", dir.display()))?;
    let note = |line: String| note(format, "bench snapshot: ", &line);

    // The snapshot every restore starts from: a guest printing counter lines non-stop.
    let fast = dir.join("fastcount");
    create(&kiln, &guest, "kiln.test=fastcount", 128, false, &fast, 1)?;

    // In-process restores.
    let out = command_json::<RestoreOut>(
        Command::new(&kiln)
            .args(["vm-snapshot", "restore", "--dir"])
            .arg(&fast)
            .args(["--repeat", &(WARMUP + RUNS).to_string()]),
    )
    .context("in-process restores")?;
    let call = Stats::from_samples(out.restore_ms.get(WARMUP..).unwrap_or_default())
        .context("no restore samples")?;
    let running = Stats::from_samples(out.running_ms.get(WARMUP..).unwrap_or_default())
        .context("no restore samples")?;
    report(
        "snapshot.in_process.restore_call",
        "ms",
        &call,
        None,
        format,
    );
    report(
        "snapshot.in_process.restore_to_running",
        "ms",
        &running,
        None,
        format,
    );

    // Prepared restores: kernel objects, devices and memory mapping done ahead of time (as a
    // pool refill would), only loading the state and starting the threads timed.
    let out = command_json::<RestoreOut>(
        Command::new(&kiln)
            .args(["vm-snapshot", "restore", "--prepared", "--dir"])
            .arg(&fast)
            .args(["--repeat", &(WARMUP + RUNS).to_string()]),
    )
    .context("prepared restores")?;
    let call = Stats::from_samples(out.restore_ms.get(WARMUP..).unwrap_or_default())
        .context("no prepared restore samples")?;
    let running = Stats::from_samples(out.running_ms.get(WARMUP..).unwrap_or_default())
        .context("no prepared restore samples")?;
    report("snapshot.prepared.start_call", "ms", &call, None, format);
    report(
        "snapshot.prepared.start_to_running",
        "ms",
        &running,
        None,
        format,
    );

    // Fresh process per restore.
    let fresh = measured_runs(WARMUP, RUNS, |i| {
        let mut c = Command::new(&kiln);
        c.args(["vm-snapshot", "restore", "--dir"])
            .arg(&fast)
            .stderr(Stdio::inherit());
        // The restored guest runs to its end: wait for the process, its exit status counts.
        time_to_line(
            c,
            "RUNNING",
            LineMatch::StartsWith,
            AfterLine::Wait,
            RUN_TIMEOUT,
        )
        .with_context(|| format!("fresh restore {i}"))
    })?;
    let fresh = Stats::from_durations_ms(&fresh).context("no fresh-process samples")?;
    let (fc_min, fc_median) = FIRECRACKER_RESTORE;
    let fc = PeerRatio {
        peer: "firecracker v1.16.1 reference (not measured)".into(),
        ratio: fresh.median / fc_median,
    };
    report(
        "snapshot.fresh_process.restore_to_running",
        "ms",
        &fresh,
        Some(&fc),
        format,
    );
    note(format!(
        "reference (not measured here): Firecracker v1.16.1 snapshot restore, new process -> \
         resumed, min {fc_min} / median {fc_median} ms (DESIGN.md); goal: median <= 4 ms"
    ));

    // Snapshot create.
    let tmpfs = Path::new("/dev/shm");
    let mut places = vec![("disk", dir.join("create"))];
    if tmpfs.is_dir() {
        places.push((
            "tmpfs",
            tmpfs.join(format!("kiln-bench-snapshot-{}", std::process::id())),
        ));
    }
    for (place, base) in &places {
        for (mib, label) in [(128u64, "128mib"), (1024, "1gib")] {
            for fill in [false, true] {
                let kind = if fill { "filled" } else { "idle" };
                let d = base.join(format!("{label}-{kind}"));
                let out = create(&kiln, &guest, "kiln.test=halt", mib, fill, &d, CREATE_RUNS)
                    .with_context(|| format!("create {label} {kind} on {place}"))?;
                let s = Stats::from_samples(&out.create_ms).context("no create samples")?;
                report(
                    &format!("snapshot.create.{label}.{kind}.{place}"),
                    "ms",
                    &s,
                    None,
                    format,
                );
                note(format!(
                    "  {label} {kind} on {place}: {} MiB of {} MiB guest RAM written",
                    out.written_bytes >> 20,
                    out.guest_bytes >> 20
                ));
                let _ = std::fs::remove_dir_all(&d);
            }
        }
    }
    if let Some((_, t)) = places.iter().find(|(p, _)| *p == "tmpfs") {
        let _ = std::fs::remove_dir_all(t);
    }
    let (fc_tmpfs, fc_disk) = FIRECRACKER_CREATE;
    note(format!(
        "reference (not measured here): Firecracker v1.16.1 snapshot create (128 MiB) \
         {fc_tmpfs} ms on tmpfs, {fc_disk} ms on disk (DESIGN.md)"
    ));

    // Memory per idle fork.
    let halt = dir.join("halt");
    create(&kiln, &guest, "kiln.test=halt", 128, false, &halt, 1)?;
    let f = command_json::<ForksOut>(
        Command::new(&kiln)
            .args(["vm-snapshot", "forks", "--dir"])
            .arg(&halt)
            .args(["--count", &FORKS.to_string()]),
    )
    .context("forks")?;
    for (name, v) in [
        ("snapshot.forks.rss_anon_per_fork", f.rss_anon_kib_per_fork),
        ("snapshot.forks.pss_per_fork", f.pss_kib_per_fork),
        ("snapshot.forks.rss_per_fork", f.rss_kib_per_fork),
    ] {
        let s = Stats::from_samples(&[v]).context("no fork sample")?;
        report(name, "KiB", &s, None, format);
    }
    note(format!(
        "  {} idle forks in one process: {:.1} threads and {:.1} fds each; goal: <= 3 MiB \
         (3072 KiB) per fork beyond the pages the guest touched (KVM's kernel memory is not \
         in these figures)",
        f.count, f.threads_per_fork, f.fds_per_fork
    ));
    Ok(())
}

/// `kiln-bench vm-snapshot create` of the test guest; returns its samples.
fn create(
    kiln: &Path,
    guest: &Path,
    cmdline: &str,
    mib: u64,
    fill: bool,
    dir: &Path,
    repeat: usize,
) -> Result<CreateOut> {
    let mut c = Command::new(kiln);
    c.args(["vm-snapshot", "create", "--kernel"])
        .arg(guest)
        .args(["--cmdline", cmdline, "--memory", &mib.to_string()])
        .arg("--until-serial")
        // A counting guest runs a little first, so the snapshot is taken mid-flight.
        .arg(if cmdline.contains("count") {
            "C=3"
        } else {
            kiln_vmm::test_guest::READY
        })
        .arg("--dir")
        .arg(dir)
        .args(["--repeat", &repeat.to_string()]);
    if fill {
        c.arg("--fill");
    }
    command_json(&mut c)
}
