//! `cargo xtask bench pool`: the kiln-pool hot path (acquire + release of an idle resource with
//! a trivial mock manager; goal ≤ 1 µs median).
//!
//! The measuring loop lives in `crates/pool/benches/pool.rs` so it is compiled with the bench
//! (release) profile — xtask itself runs unoptimised. This runs it with `--raw-json`, summarises
//! each metric's samples with [`Stats`] and reports them. Metrics (ns per acquire+release pair,
//! 30 samples of 10 000 pairs):
//! - `pool.mock.acquire_release`: one thread, health check every 1000th release;
//! - `pool.mock.acquire_release.health_check_every_release`: one thread, check on every release;
//! - `pool.mock.acquire_release.2_threads`: two threads at once (lock contention).
//!
//! The real-sandbox half (acquire + exec `true` + release in the harness) belongs to the
//! `SandboxPool` integration and is added here when `kiln::SandboxPool` exists.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::{report, Format, Stats};

/// Samples per metric and acquire+release pairs per sample.
const SAMPLES: usize = 30;
const OPS_PER_SAMPLE: usize = 10_000;

/// One line of the bench binary's `--raw-json` output.
#[derive(Debug, Deserialize)]
struct RawMetric {
    name: String,
    unit: String,
    samples: Vec<f64>,
}

/// Runs the pool benchmark and reports each metric in `format`.
pub fn run(format: Format) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")?;
    eprintln!("bench pool: building and running crates/pool/benches/pool.rs (release profile)...");
    let output = Command::new(cargo)
        .current_dir(root)
        .args(["bench", "-q", "-p", "kiln-pool", "--bench", "pool", "--"])
        .args(["--samples", &SAMPLES.to_string()])
        .args(["--ops", &OPS_PER_SAMPLE.to_string()])
        .arg("--raw-json")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running `cargo bench -p kiln-pool --bench pool`")?;
    if !output.status.success() {
        bail!(
            "`cargo bench -p kiln-pool --bench pool` failed: {}",
            output.status
        );
    }
    let metrics = parse_raw(&String::from_utf8_lossy(&output.stdout))?;
    for m in &metrics {
        let stats = Stats::from_samples(&m.samples)
            .with_context(|| format!("metric {} has no usable samples", m.name))?;
        report(&m.name, &m.unit, &stats, None, format);
    }
    eprintln!(
        "bench pool: the real-sandbox part (acquire + exec `true` + release) needs \
         kiln::SandboxPool and is not measured yet"
    );
    Ok(())
}

/// Parses the bench binary's JSON lines; every non-empty line must be a metric.
fn parse_raw(stdout: &str) -> Result<Vec<RawMetric>> {
    let metrics = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str::<RawMetric>(l)
                .with_context(|| format!("unexpected bench output line {l:?}"))
        })
        .collect::<Result<Vec<_>>>()?;
    if metrics.is_empty() {
        bail!("the pool bench printed no metrics");
    }
    Ok(metrics)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_raw_metrics_and_rejects_garbage() {
        let out = "{\"name\":\"a\",\"unit\":\"ns/op\",\"samples\":[3.0,1.0,2.0]}\n\n";
        let m = parse_raw(out).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!((m[0].name.as_str(), m[0].unit.as_str()), ("a", "ns/op"));
        let s = Stats::from_samples(&m[0].samples).unwrap();
        assert_eq!((s.n, s.min, s.median), (3, 1.0, 2.0));
        assert!(parse_raw("").is_err());
        assert!(parse_raw("compiling...\n").is_err());
    }
}
