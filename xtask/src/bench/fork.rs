//! `cargo xtask bench fork`: live fork of a running VM (the bare-metal test guest) on the
//! host's /dev/kvm, driven through `kiln-bench fork` (release build, crates/bench).
//!
//! Metrics:
//! - `fork.per_child` (ms): `ForkSource::spawn` of one child (vCPUs started) from a running
//!   128 MiB parent's fork source;
//! - `fork.children_1000` (ms): one source -> 1,000 children started, total;
//! - `fork.shell.per_child`, `fork.shell.children_1000` (ms): the same with the children's
//!   VMs built ahead of time (`Vm::fork_shell`, untimed), only `ForkSource::spawn_shell` timed;
//! - `fork.pause.first_1gib_512mib` (ms): the parent's pause window (`ForkInfo::paused_for`)
//!   of the first fork of a 1 GiB guest with 512 MiB written (state capture + memfd freeze
//!   + remap; nothing copied);
//! - `fork.pause.stacked_1gib_512mib` (ms): a second fork after writing the 512 MiB again
//!   (the written pages are copied into a new layer); `fork.flatten_copy_512mib` (ms): what a
//!   full copy of the same memory into a new memfd costs (the flatten alternative);
//! - `fork.child.rss_kib`, `fork.child.touched_kib`, `fork.child.rss_beyond_touched_kib`,
//!   `fork.child.pss_kib` (KiB): the process's memory growth per idle child, the guest pages
//!   each child's mapping has present, and the difference;
//! - `fork.child.stop` (ms): `Vm::stop` of an idle child (teardown).
//!
//! The published peer figures (issue 14) are printed as labelled references, not measured.

use std::process::Command;

use anyhow::{Context, Result};
use kiln_testkit::bench::ForkSamples;

use super::{build_kiln_bench, command_json, metric_stats, note, report, Format};
use crate::util::target_dir;

/// Targets (issue 14), printed beside the figures.
const TARGETS: &str = "targets: per child p50 <= 0.5 ms, p99 <= 1.5 ms; 1,000 children <= \
                       0.5 s; RSS per idle child <= 100 KiB beyond touched pages; pause <= 5 ms \
                       (1 GiB guest, 512 MiB touched)";
/// Published peer figures (issue 14), not measured here.
const PEERS: &[&str] = &[
    "Zeroboot: 0.79 ms p50 per fork, ~265 KB per sandbox, 1,000 forks in 815 ms",
    "forkd: pauses a 1.5 GiB source 56 ms p50",
    "CodeSandbox live fork: ~0.5 s",
    "E2B: forks up to 100 at once; microsandbox: `branch`",
];

/// Runs the fork benchmark and reports each metric in `format`.
pub fn run(format: Format) -> Result<()> {
    let kiln = build_kiln_bench("bench fork: ")?;
    let dir = target_dir().join("kiln-bench/fork");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let note = |line: String| note(format, "bench fork: ", &line);
    let out = command_json::<ForkSamples>(Command::new(&kiln).args(["fork", "--dir"]).arg(&dir))
        .context("kiln-bench fork")?;

    let ms_rows: [(&str, &[f64]); 8] = [
        ("fork.per_child", &out.per_child_ms),
        ("fork.children_1000", &out.children_1000_ms),
        ("fork.shell.per_child", &out.per_child_shell_ms),
        ("fork.shell.children_1000", &out.children_1000_shell_ms),
        ("fork.pause.first_1gib_512mib", &out.pause_first_ms),
        ("fork.pause.stacked_1gib_512mib", &out.pause_stacked_ms),
        ("fork.flatten_copy_512mib", &out.flatten_copy_ms),
        ("fork.child.stop", &out.stop_ms),
    ];
    for (name, samples) in ms_rows {
        report(name, "ms", &metric_stats(name, samples)?, None, format);
    }
    let beyond = out.rss_kib_per_child - out.touched_kib_per_child;
    let kib_rows = [
        ("fork.child.rss_kib", out.rss_kib_per_child),
        ("fork.child.touched_kib", out.touched_kib_per_child),
        ("fork.child.rss_beyond_touched_kib", beyond),
        ("fork.child.pss_kib", out.pss_kib_per_child),
    ];
    for (name, v) in kib_rows {
        report(name, "KiB", &metric_stats(name, &[v])?, None, format);
    }
    note(format!(
        "  {} idle children held; the stacked fork copied {} MiB",
        out.idle_children,
        out.stacked_copied_bytes >> 20
    ));
    note(TARGETS.into());
    for p in PEERS {
        note(format!("reference (published, not measured here): {p}"));
    }
    Ok(())
}
