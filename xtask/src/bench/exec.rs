//! `cargo xtask bench exec [--json]`: command execution in a warm Linux guest, Kiln side by
//! side with QEMU microvm running the same guest.
//!
//! Builds the guest assets and the release `kiln-bench` (crates/bench), then runs
//! `kiln-bench exec --peer qemu` (directly on a hardware-virtualization host, elsewhere inside
//! the emulated-virtualization harness) which writes raw samples to
//! `<target>/bench/exec-kiln.json`. Metrics (ms), each Kiln row with its ratio Kiln / QEMU
//! (medians) and the QEMU row right below it:
//! - `exec.kiln.exec_true` / `exec.qemu_microvm.exec_true`: exec round trip of `true` in a warm
//!   guest (`Sandbox::exec(["true"])`; on QEMU the same kiln-proto request from the same client);
//! - `exec.kiln.ping` / `exec.qemu_microvm.ping`: ping round trip;
//! - `exec.kiln.boot_to_handshake` / `exec.qemu_microvm.boot_to_handshake`: cold boot until
//!   the agent's `Hello` (Kiln: `Sandbox::create`; QEMU: process launch);
//! - `exec.qemu_microvm.boot_to_ready`: QEMU launch until the agent's READY console line.
//!
//! The QEMU peer is the same kernel + initramfs under `-M microvm,acpi=off -accel kvm` with a
//! `vhost-vsock-device`: the agent reaches the bench process over AF_VSOCK through the kernel's
//! vhost-vsock (the harness's L1 loads `vhost_vsock`). Same warm-up and sample counts as Kiln;
//! both warm guests run at once and take turns in blocks of calls, and the cold boots
//! alternate, so drifting host load hits both sides alike.

use std::time::Duration;

use anyhow::{bail, Result};
use kiln_testkit::bench::ExecSamples as Samples;

use super::{
    build_kiln_bench, format_row, metric_stats as stats, read_samples, samples_file, Format,
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

/// The QEMU peer's name in ratios.
const PEER: &str = "qemu-microvm";

/// Runs the exec benchmark and reports each metric in `format`.
pub fn run(format: Format) -> Result<()> {
    let k = kernel::ensure()?;
    let g = build_guest::ensure()?;
    let kiln = build_kiln_bench("bench exec: ")?;
    let out = samples_file("exec-kiln.json")?;

    let argv: Vec<String> = vec![
        kiln.display().to_string(),
        "exec".into(),
        "--iterations".into(),
        ITERATIONS.to_string(),
        "--warmup".into(),
        WARMUP.to_string(),
        "--boots".into(),
        BOOTS.to_string(),
        "--peer".into(),
        "qemu".into(),
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
        bail!("kiln-bench exec failed with status {status}");
    }
    let s: Samples = read_samples(&out)?;
    for row in rows(&s, format)? {
        println!("{row}");
    }
    match &s.qemu_error {
        Some(e) => eprintln!("bench exec: QEMU microvm peer incomplete: {e}"),
        None if s.qemu_exec_true_ms.is_empty() => {
            eprintln!("bench exec: QEMU microvm peer not measured")
        }
        None => {}
    }
    Ok(())
}

/// The report: each Kiln metric with its ratio against the QEMU peer (medians), then the
/// peer's row when it was measured.
fn rows(s: &Samples, format: Format) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut boots = s.boot_samples_ms.clone();
    boots.push(s.boot_ms);
    let pairs: [(&str, &[f64], &[f64]); 3] = [
        ("exec_true", &s.exec_true_ms, &s.qemu_exec_true_ms),
        ("ping", &s.ping_ms, &s.qemu_ping_ms),
        ("boot_to_handshake", &boots, &s.qemu_microvm_handshake_ms),
    ];
    for (name, kiln, peer) in pairs {
        let ours = stats(name, kiln)?;
        let theirs = Stats::from_samples(peer);
        let ratio = theirs.as_ref().map(|q| PeerRatio {
            peer: PEER.into(),
            ratio: ours.median / q.median,
        });
        out.push(format_row(
            &format!("exec.kiln.{name}"),
            "ms",
            &ours,
            ratio.as_ref(),
            format,
        ));
        if let Some(q) = &theirs {
            out.push(format_row(
                &format!("exec.qemu_microvm.{name}"),
                "ms",
                q,
                None,
                format,
            ));
        }
    }
    if let Some(q) = Stats::from_samples(&s.qemu_microvm_ready_ms) {
        out.push(format_row(
            "exec.qemu_microvm.boot_to_ready",
            "ms",
            &q,
            None,
            format,
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(json: &str) -> Samples {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn kiln_rows_carry_the_qemu_ratio_and_the_peer_row_follows() {
        let s = samples(
            r#"{"vmm":"kiln","boot_ms":100.0,"exec_true_ms":[1.0,2.0,3.0],"ping_ms":[0.5],
                "boot_samples_ms":[300.0,200.0],"qemu_exec_true_ms":[4.0,4.0,4.0],
                "qemu_ping_ms":[0.25],"qemu_microvm_handshake_ms":[400.0],
                "qemu_microvm_ready_ms":[390.0],"qemu_error":null}"#,
        );
        let json = rows(&s, Format::Json).unwrap();
        let v: Vec<serde_json::Value> = json
            .iter()
            .map(|r| serde_json::from_str(r).unwrap())
            .collect();
        let names: Vec<&str> = v.iter().map(|r| r["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "exec.kiln.exec_true",
                "exec.qemu_microvm.exec_true",
                "exec.kiln.ping",
                "exec.qemu_microvm.ping",
                "exec.kiln.boot_to_handshake",
                "exec.qemu_microvm.boot_to_handshake",
                "exec.qemu_microvm.boot_to_ready",
            ]
        );
        assert_eq!(v[0]["ratio_vs"], 0.5);
        assert_eq!(v[0]["peer"], PEER);
        assert_eq!(v[2]["ratio_vs"], 2.0);
        // The warm sandbox's boot counts as a boot sample: median of 100, 200, 300.
        assert_eq!(v[4]["median"], 200.0);
        assert_eq!(v[4]["ratio_vs"], 0.5);
        assert!(v[1].get("ratio_vs").is_none());
        for r in &v {
            assert_eq!(r["unit"], "ms");
        }
    }

    #[test]
    fn without_the_peer_only_kiln_rows_and_no_ratio() {
        let s = samples(
            r#"{"boot_ms":100.0,"exec_true_ms":[1.0],"ping_ms":[0.5],"boot_samples_ms":[],
                "qemu_error":"/dev/vhost-vsock is missing"}"#,
        );
        let human = rows(&s, Format::Human).unwrap();
        assert_eq!(human.len(), 3, "{human:#?}");
        assert!(human.iter().all(|r| r.starts_with("exec.kiln.")));
        assert!(human.iter().all(|r| !r.contains("qemu")), "{human:#?}");
        // A Kiln metric without samples is an error, not a row of NaNs.
        let s = samples(r#"{"boot_ms":1.0,"exec_true_ms":[],"ping_ms":[],"boot_samples_ms":[]}"#);
        assert!(rows(&s, Format::Json).is_err());
    }
}
