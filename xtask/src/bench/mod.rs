//! `cargo xtask bench <name> [--json]`: benchmark scaffolding shared by every benchmark.
//!
//! [`Stats`] (kiln-testkit) summarises samples (n, min, median, p99); [`report`] prints one
//! metric either as a human table row or, with `--json`, as one [`BenchRecord`] JSON line:
//! `{"name","unit","n","min","median","p99"}` plus optional `"ratio_vs"`/`"peer"` for a
//! comparison against a peer (e.g. Firecracker). The benchmarks themselves live in
//! `bench/<name>.rs`; the measuring programs they run are `kiln-bench` (crates/bench, whose
//! sample documents are `kiln_testkit::bench`'s), kiln-pool's bench and kiln-vmm's
//! `vsock_throughput` example.

// The reporting helpers are for the benchmark modules, which are still placeholders.
#![allow(dead_code)]

mod egress;
mod exec;
mod fork;
mod image;
mod launch;
mod pool;
mod snapshot;
mod vmm;
mod vsock;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde::de::DeserializeOwned;

use crate::util;
pub use kiln_testkit::{BenchRecord, Stats};

/// Which benchmark to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchName {
    /// VMM-level: launch to READY of the bare-metal guest, vs Firecracker.
    Vmm,
    /// Command execution round trips in a Linux guest.
    Exec,
    /// Pool acquire / release.
    Pool,
    /// Snapshot create / restore.
    Snapshot,
    /// virtio-vsock connect latency and echo throughput with a Linux guest.
    Vsock,
    /// Live fork of a running VM (bare-metal guest): per child, 1,000 children, pause
    /// window, memory per idle child.
    Fork,
    /// Guest images: python image vs initramfs boot, `python3 -c pass`, sequential disk read
    /// vs QEMU's virtio-blk, build (warm, cold) and pull times.
    Image,
    /// Egress through the host proxy vs a raw vsock path: download/upload throughput and
    /// connection latency with a Linux guest.
    Egress,
}

/// `cargo xtask bench` arguments.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The benchmark to run.
    pub name: BenchName,
    /// One JSON object per metric per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// `bench image`: also measure both image formats (ext4, EROFS) on the same tree.
    #[arg(long)]
    pub formats: bool,
}

/// Output format of [`report`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Aligned human-readable rows.
    Human,
    /// One JSON object per line.
    Json,
}

/// A comparison of our median against a peer's (e.g. Firecracker).
#[derive(Debug, Clone, PartialEq)]
pub struct PeerRatio {
    /// The peer's name.
    pub peer: String,
    /// our median / peer median.
    pub ratio: f64,
}

/// Formats one metric as a line (without newline).
pub fn format_row(
    name: &str,
    unit: &str,
    stats: &Stats,
    peer: Option<&PeerRatio>,
    format: Format,
) -> String {
    match format {
        Format::Json => {
            BenchRecord::new(name, unit, stats, peer.map(|p| (p.peer.as_str(), p.ratio)))
                .to_json_line()
        }
        Format::Human => {
            let mut s = format!(
                "{name:<36} n={:<5} min={:>10.3} median={:>10.3} p99={:>10.3} {unit}",
                stats.n, stats.min, stats.median, stats.p99
            );
            if let Some(p) = peer {
                s.push_str(&format!("  ({:.2}x {})", p.ratio, p.peer));
            }
            s
        }
    }
}

/// Prints one metric to stdout.
pub fn report(name: &str, unit: &str, stats: &Stats, peer: Option<&PeerRatio>, format: Format) {
    println!("{}", format_row(name, unit, stats, peer, format));
}

/// Prints a line that is not a metric (a reference figure, a remark): with the table on
/// stdout, as JSON rows go there, on stderr prefixed by `tag` ("bench vmm: ").
pub fn note(format: Format, tag: &str, line: &str) {
    match format {
        Format::Human => println!("{line}"),
        Format::Json => eprintln!("{tag}{line}"),
    }
}

/// [`Stats::from_samples`], or an error naming the metric when it has no usable samples.
pub fn metric_stats(name: &str, samples: &[f64]) -> Result<Stats> {
    Stats::from_samples(samples).with_context(|| format!("metric {name} has no usable samples"))
}

/// Builds the release `kiln-bench` (crates/bench) and returns its path; `tag` prefixes the
/// progress line.
pub fn build_kiln_bench(tag: &str) -> Result<PathBuf> {
    eprintln!("{tag}building kiln-bench (release)");
    util::cargo_build(
        "kiln-bench",
        &[
            "build",
            "--release",
            "-p",
            "kiln-bench",
            "--bin",
            "kiln-bench",
        ],
        util::target_dir().join("release").join("kiln-bench"),
    )
}

/// `<target>/bench/<file>` for a benchmark program to write its samples to: the directory is
/// created and a stale file removed (it must never be reported as this run's result).
pub fn samples_file(file: &str) -> Result<PathBuf> {
    let dir = util::target_dir().join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let out = dir.join(file);
    let _ = fs::remove_file(&out);
    Ok(out)
}

/// Reads the JSON samples a benchmark program wrote to `path`.
pub fn read_samples<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("reading the samples from {}", path.display()))?;
    serde_json::from_str(text.trim()).with_context(|| format!("parsing {}", path.display()))
}

/// Runs `cmd` (stderr passed through), which prints one JSON document on stdout, and parses it.
pub fn command_json<T: DeserializeOwned>(cmd: &mut Command) -> Result<T> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "parsing the output of {cmd:?}: {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `cargo xtask bench <name>`.
pub fn cmd_bench(args: &BenchArgs) -> Result<()> {
    let format = if args.json {
        Format::Json
    } else {
        Format::Human
    };
    match args.name {
        BenchName::Vmm => vmm::run(format),
        BenchName::Exec => exec::run(format),
        BenchName::Pool => pool::run(format),
        BenchName::Snapshot => snapshot::run(format),
        BenchName::Vsock => vsock::run(format),
        BenchName::Fork => fork::run(format),
        BenchName::Image => image::run(format, args.formats),
        BenchName::Egress => egress::run(format),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_rows_carry_every_field() {
        let s = Stats::from_samples(&[1.0, 2.0, 3.0]).unwrap();
        let line = format_row("boot", "ms", &s, None, Format::Json);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["name"], "boot");
        assert_eq!(v["unit"], "ms");
        assert_eq!(v["n"], 3);
        assert_eq!(v["min"], 1.0);
        assert_eq!(v["median"], 2.0);
        assert_eq!(v["p99"], 3.0);
        assert!(v.get("peer").is_none() && v.get("ratio_vs").is_none());
        // The reader's type is the writer's.
        assert_eq!(BenchRecord::from_json_line(&line).unwrap().stats(), s);

        let peer = PeerRatio {
            peer: "firecracker".into(),
            ratio: 1.25,
        };
        let line = format_row("boot", "ms", &s, Some(&peer), Format::Json);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["peer"], "firecracker");
        assert_eq!(v["ratio_vs"], 1.25);
    }

    #[test]
    fn human_rows_name_the_metric_and_peer() {
        let s = Stats::from_samples(&[1.0]).unwrap();
        let peer = PeerRatio {
            peer: "firecracker".into(),
            ratio: 0.5,
        };
        let line = format_row("restore", "ms", &s, Some(&peer), Format::Human);
        assert!(line.starts_with("restore"));
        assert!(line.contains("median="));
        assert!(line.contains("0.50x firecracker"));
    }
}
