//! `cargo xtask bench egress [--json]`: egress through the host proxy against a raw vsock
//! path, in the same run (docs/EGRESS.md "Benchmark").
//!
//! Builds the guest assets and the release `kiln-bench`, runs `kiln-bench egress` (directly on
//! a hardware-virtualization host, elsewhere inside the emulated-virtualization harness),
//! which boots two sandboxes running the same guest clients through the same agent forwarder:
//! one served by its `EgressProxy` relaying to loopback servers, one whose egress vsock port
//! `kiln-bench` answers itself. Metrics:
//! - `egress.throughput_proxy` (MiB/s): 256 MiB `wget` download through the proxy, with its
//!   ratio to `egress.throughput_raw_vsock` (goal >= 0.8);
//! - `egress.throughput_raw_vsock` (MiB/s): the same download from the raw vsock server;
//! - `egress.throughput_proxy.upload` / `egress.throughput_raw_vsock.upload` (MiB/s): 64 MiB
//!   into a `CONNECT` tunnel, timed at the receiving end;
//! - `egress.connect` (ms): one `wget` of a 5-byte body through the proxy (connection setup,
//!   CONNECT-free HTTP proxy round trip, the `wget` process), with its ratio to
//!   `egress.connect_raw_vsock`.
//!
//! In the harness these are software-emulation numbers: compare ratios, not absolute values.

use std::time::Duration;

use anyhow::{bail, Result};
use serde::Deserialize;

use super::{
    build_kiln_bench, format_row, metric_stats as stats, read_samples, samples_file, Format,
    PeerRatio,
};
use crate::{build_guest, kernel, util};

/// MiB per download run.
const MIB: u64 = 256;
/// MiB per upload run.
const UPLOAD_MIB: u64 = 64;
/// Measured runs per side.
const RUNS: usize = 3;
/// Sequential requests per connect sample.
const CONNECTS: usize = 20;
/// Deadline of the whole measurement in the harness.
const TIMEOUT: Duration = Duration::from_secs(40 * 60);

/// What `kiln-bench egress` writes.
#[derive(Debug, Deserialize)]
struct Samples {
    download_proxy_mib_s: Vec<f64>,
    download_raw_mib_s: Vec<f64>,
    upload_proxy_mib_s: Vec<f64>,
    upload_raw_mib_s: Vec<f64>,
    connect_proxy_ms: Vec<f64>,
    connect_raw_ms: Vec<f64>,
}

/// Runs the egress benchmark and reports each metric in `format`.
pub fn run(format: Format) -> Result<()> {
    let k = kernel::ensure()?;
    let g = build_guest::ensure()?;
    let exe = build_kiln_bench("bench egress: ")?;
    let out = samples_file("egress.json")?;
    let argv: Vec<String> = vec![
        exe.display().to_string(),
        "egress".into(),
        "--mib".into(),
        MIB.to_string(),
        "--upload-mib".into(),
        UPLOAD_MIB.to_string(),
        "--runs".into(),
        RUNS.to_string(),
        "--connects".into(),
        CONNECTS.to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    let status = util::run_here_or_in_harness(
        "bench egress: ",
        " (software-emulation numbers: compare ratios)",
        argv,
        util::guest_env(&k.vmlinux, &g.initramfs),
        Some(TIMEOUT),
    )?;
    if status != 0 {
        bail!("kiln-bench egress failed with status {status}");
    }
    let s: Samples = read_samples(&out)?;
    for row in rows(&s, format)? {
        println!("{row}");
    }
    Ok(())
}

/// One compared metric: (proxy name, raw name, unit, proxy samples, raw samples).
type Pair<'a> = (&'a str, &'a str, &'a str, &'a [f64], &'a [f64]);

/// The rows: each proxy metric with its ratio to the raw vsock one (medians), then the raw.
fn rows(s: &Samples, format: Format) -> Result<Vec<String>> {
    let pairs: [Pair; 3] = [
        (
            "egress.throughput_proxy",
            "egress.throughput_raw_vsock",
            "MiB/s",
            &s.download_proxy_mib_s,
            &s.download_raw_mib_s,
        ),
        (
            "egress.throughput_proxy.upload",
            "egress.throughput_raw_vsock.upload",
            "MiB/s",
            &s.upload_proxy_mib_s,
            &s.upload_raw_mib_s,
        ),
        (
            "egress.connect",
            "egress.connect_raw_vsock",
            "ms",
            &s.connect_proxy_ms,
            &s.connect_raw_ms,
        ),
    ];
    let mut out = Vec::new();
    for (name, raw_name, unit, proxy, raw) in pairs {
        let p = stats(name, proxy)?;
        let r = stats(raw_name, raw)?;
        let ratio = PeerRatio {
            peer: "raw_vsock".into(),
            ratio: p.median / r.median,
        };
        out.push(format_row(name, unit, &p, Some(&ratio), format));
        out.push(format_row(raw_name, unit, &r, None, format));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_rows_carry_the_raw_ratio() {
        let s: Samples = serde_json::from_str(
            r#"{"download_proxy_mib_s":[80.0,90.0,100.0],"download_raw_mib_s":[100.0,100.0,100.0],
                "upload_proxy_mib_s":[50.0],"upload_raw_mib_s":[100.0],
                "connect_proxy_ms":[3.0],"connect_raw_ms":[2.0]}"#,
        )
        .unwrap();
        let v: Vec<serde_json::Value> = rows(&s, Format::Json)
            .unwrap()
            .iter()
            .map(|r| serde_json::from_str(r).unwrap())
            .collect();
        let names: Vec<&str> = v.iter().map(|r| r["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "egress.throughput_proxy",
                "egress.throughput_raw_vsock",
                "egress.throughput_proxy.upload",
                "egress.throughput_raw_vsock.upload",
                "egress.connect",
                "egress.connect_raw_vsock",
            ]
        );
        assert_eq!(v[0]["ratio_vs"], 0.9);
        assert_eq!(v[0]["peer"], "raw_vsock");
        assert_eq!(v[2]["ratio_vs"], 0.5);
        assert_eq!(v[4]["ratio_vs"], 1.5);
        assert_eq!(v[4]["unit"], "ms");
        assert!(v[1].get("ratio_vs").is_none());
    }

    #[test]
    fn missing_samples_are_an_error() {
        let s: Samples = serde_json::from_str(
            r#"{"download_proxy_mib_s":[],"download_raw_mib_s":[1.0],"upload_proxy_mib_s":[1.0],
                "upload_raw_mib_s":[1.0],"connect_proxy_ms":[1.0],"connect_raw_ms":[1.0]}"#,
        )
        .unwrap();
        assert!(rows(&s, Format::Human).is_err());
    }
}
