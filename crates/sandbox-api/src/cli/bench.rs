//! The hidden `kiln bench-exec`: boots one sandbox, warms it up, then measures exec round
//! trips of `true` and ping round trips, and prints the raw samples as one JSON document
//! (`cargo xtask bench exec` summarises them). Speed is measured here, never asserted.
//!
//! With `--boots N` it also measures N cold boots (create until the agent's handshake).
//!
//! With `--peer qemu` it measures the same on QEMU microvm ([`qemu`]): the same kernel +
//! initramfs under `-M microvm,acpi=off -accel kvm` with a vhost-vsock device; the same agent
//! connects to AF_VSOCK port 1024 of this host and the same kiln-proto client drives it. One
//! warm QEMU guest gets the same warm-up and measured exec/ping round trips as Kiln's, then
//! `--qemu-boots N` more cold boots are measured (launch until the agent's `Hello`, and until
//! its `KILN-AGENT-READY` console line). A QEMU failure is recorded in `qemu_error` and does
//! not void the Kiln samples.

mod qemu;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use kiln::{Sandbox, SandboxConfig, DEFAULT_OUTPUT_CAP};
use kiln_proto::ExecRequest;
use serde::Serialize;

use super::exit;
use qemu::{QemuGuest, QemuPeer, QemuPeerError};

/// A comparison peer for `kiln bench-exec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Peer {
    /// QEMU `-M microvm` with KVM and vhost-vsock, the same guest.
    Qemu,
}

/// `kiln bench-exec` arguments.
#[derive(Debug, Args)]
pub struct BenchExecArgs {
    /// Measured iterations of each round trip.
    #[arg(long, default_value_t = 100)]
    pub iterations: usize,
    /// Unmeasured iterations first.
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u32,
    /// Extra cold boots to measure (create until the handshake).
    #[arg(long, default_value_t = 0)]
    pub boots: usize,
    /// Also measure this peer with the same guest, warm-up and iterations.
    #[arg(long, value_enum)]
    pub peer: Option<Peer>,
    /// Extra cold boots of the QEMU peer (launch until the agent's Hello and READY line).
    #[arg(long, default_value_t = 0, requires = "peer")]
    pub qemu_boots: usize,
    /// The QEMU binary of the QEMU peer.
    #[arg(long, default_value = "qemu-system-x86_64", requires = "peer")]
    pub qemu: PathBuf,
    /// vsock CID of the QEMU peer's guest (unique on this host).
    #[arg(long, default_value_t = 3, requires = "peer")]
    pub qemu_cid: u32,
    /// Write the JSON here instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// Deadline of one QEMU boot (launch until the agent's Hello).
const QEMU_BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// The samples, in milliseconds.
#[derive(Debug, Serialize)]
pub struct BenchSamples {
    /// Which implementation produced them.
    pub vmm: &'static str,
    /// `Sandbox::create` until the agent's handshake.
    pub boot_ms: f64,
    /// `exec(["true"])` round trips.
    pub exec_true_ms: Vec<f64>,
    /// `ping()` round trips.
    pub ping_ms: Vec<f64>,
    /// Cold boots, create until the agent's handshake.
    pub boot_samples_ms: Vec<f64>,
    /// The QEMU peer's exec `true` round trips in its warm guest.
    pub qemu_exec_true_ms: Vec<f64>,
    /// The QEMU peer's ping round trips in its warm guest.
    pub qemu_ping_ms: Vec<f64>,
    /// QEMU boots (the warm guest's first), launch until the agent's `Hello`.
    pub qemu_microvm_handshake_ms: Vec<f64>,
    /// QEMU boots, launch until `KILN-AGENT-READY` on the console.
    pub qemu_microvm_ready_ms: Vec<f64>,
    /// Why the QEMU measurement failed or stopped early, if it did (the Kiln samples and
    /// the QEMU samples taken before stay valid).
    pub qemu_error: Option<String>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs the benchmark; returns the exit code.
pub fn bench_exec(args: &BenchExecArgs) -> i32 {
    match measure(args) {
        Ok(samples) => {
            let json = match serde_json::to_string(&samples) {
                Ok(j) => j,
                Err(e) => {
                    eprintln!("kiln: error: encoding samples: {e}");
                    return exit::INTERNAL;
                }
            };
            match &args.out {
                Some(path) => {
                    if let Err(e) = std::fs::write(path, json + "\n") {
                        eprintln!("kiln: error: writing {}: {e}", path.display());
                        return exit::INTERNAL;
                    }
                }
                None => println!("{json}"),
            }
            0
        }
        Err(e) => {
            eprintln!("kiln: error: {e}");
            exit::for_error(&e)
        }
    }
}

/// Warm-up (`warmup` of each, interleaved), then `iterations` measured calls of `exec`, then
/// of `ping`; returns their durations in ms.
fn round_trips<E>(
    warmup: usize,
    iterations: usize,
    mut exec: impl FnMut() -> Result<(), E>,
    mut ping: impl FnMut() -> Result<(), E>,
) -> Result<(Vec<f64>, Vec<f64>), E> {
    for _ in 0..warmup {
        exec()?;
        ping()?;
    }
    let mut exec_ms = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t = Instant::now();
        exec()?;
        exec_ms.push(ms(t.elapsed()));
    }
    let mut ping_ms = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t = Instant::now();
        ping()?;
        ping_ms.push(ms(t.elapsed()));
    }
    Ok((exec_ms, ping_ms))
}

fn measure(args: &BenchExecArgs) -> Result<BenchSamples, kiln::SandboxError> {
    let t0 = Instant::now();
    let sb = Sandbox::create(
        SandboxConfig::new()
            .name("bench-exec")
            .vcpus(args.vcpus)
            .memory_mib(args.memory),
    )?;
    let boot_ms = ms(t0.elapsed());
    let (exec_true_ms, ping_ms) = round_trips(
        args.warmup,
        args.iterations,
        || {
            let r = sb.exec(&["true"])?;
            if r.success() {
                Ok(())
            } else {
                Err(kiln::SandboxError::Protocol {
                    vm: sb.name().to_owned(),
                    op: "bench exec",
                    message: format!("`true` exited with {:?}", r.status),
                })
            }
        },
        || sb.ping(),
    )?;
    drop(sb);
    let mut boot_samples_ms = Vec::with_capacity(args.boots);
    for i in 0..args.boots {
        let t = Instant::now();
        let sb = Sandbox::create(
            SandboxConfig::new()
                .name(format!("bench-boot-{i}"))
                .vcpus(args.vcpus)
                .memory_mib(args.memory),
        )?;
        boot_samples_ms.push(ms(t.elapsed()));
        drop(sb);
    }
    let mut samples = BenchSamples {
        vmm: "kiln",
        boot_ms,
        exec_true_ms,
        ping_ms,
        boot_samples_ms,
        qemu_exec_true_ms: Vec::new(),
        qemu_ping_ms: Vec::new(),
        qemu_microvm_handshake_ms: Vec::new(),
        qemu_microvm_ready_ms: Vec::new(),
        qemu_error: None,
    };
    if args.peer == Some(Peer::Qemu) {
        let resolved = SandboxConfig::new().validate()?;
        let peer = QemuPeer {
            qemu: args.qemu.clone(),
            kernel: resolved.kernel,
            initramfs: resolved.initramfs,
            vcpus: args.vcpus,
            memory_mib: args.memory,
            cid: args.qemu_cid,
            extra_cmdline: resolved.extra_cmdline,
            boot_timeout: QEMU_BOOT_TIMEOUT,
        };
        if let Err(e) = measure_qemu(&peer, args, &mut samples) {
            eprintln!("kiln: QEMU peer: {e}");
            samples.qemu_error = Some(e.to_string());
        }
    }
    Ok(samples)
}

/// Boots `peer` once warm (round trips as for Kiln), then `--qemu-boots` more times cold;
/// samples are added to `out` as they are taken.
fn measure_qemu(
    peer: &QemuPeer,
    args: &BenchExecArgs,
    out: &mut BenchSamples,
) -> Result<(), QemuPeerError> {
    peer.check_host()?;
    let record_boot = |guest: &QemuGuest, out: &mut BenchSamples| {
        out.qemu_microvm_handshake_ms
            .push(ms(guest.handshake_after()));
        if let Some(ready) = guest.ready_after(Duration::from_secs(2)) {
            out.qemu_microvm_ready_ms.push(ms(ready));
        }
    };
    let mut guest = peer.boot()?;
    record_boot(&guest, out);
    let client = guest.client()?.clone();
    let result = round_trips(
        args.warmup,
        args.iterations,
        || {
            let mut req = ExecRequest::new(["true"]);
            // As `Sandbox::exec` sends it.
            req.output_cap = Some(DEFAULT_OUTPUT_CAP);
            let r = client.exec(req).map_err(|e| ("exec", e.to_string()))?;
            if r.status.code == Some(0) {
                Ok(())
            } else {
                Err(("exec", format!("`true` exited with {:?}", r.status)))
            }
        },
        || client.ping().map_err(|e| ("ping", e.to_string())),
    );
    let (exec_ms, ping_ms) = result.map_err(|(op, e)| guest.request_error(op, e))?;
    out.qemu_exec_true_ms = exec_ms;
    out.qemu_ping_ms = ping_ms;
    drop(client);
    drop(guest);
    for _ in 0..args.qemu_boots {
        let guest = peer.boot()?;
        record_boot(&guest, out);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<BenchExecArgs, clap::Error> {
        let mut argv = vec!["kiln", "bench-exec"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)?.command {
            Command::BenchExec(a) => Ok(a),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn qemu_options_need_the_peer() {
        let a = parse(&[]).unwrap();
        assert_eq!((a.peer, a.qemu_boots, a.qemu_cid), (None, 0, 3));
        assert!(parse(&["--qemu-boots", "2"]).is_err());
        assert!(parse(&["--qemu-cid", "9"]).is_err());
        let a = parse(&["--peer", "qemu", "--qemu-boots", "2", "--qemu-cid", "9"]).unwrap();
        assert_eq!((a.peer, a.qemu_boots, a.qemu_cid), (Some(Peer::Qemu), 2, 9));
        assert!(parse(&["--peer", "firecracker"]).is_err());
    }

    #[test]
    fn round_trips_warm_up_then_time_each_kind() {
        let (mut execs, mut pings) = (0, 0);
        let (e, p) = round_trips::<()>(
            3,
            5,
            || {
                execs += 1;
                Ok(())
            },
            || {
                pings += 1;
                Ok(())
            },
        )
        .unwrap();
        assert_eq!((e.len(), p.len()), (5, 5));
        assert_eq!((execs, pings), (8, 8));
        // The first failure ends the measurement.
        let mut n = 0;
        let r = round_trips(
            0,
            5,
            || {
                n += 1;
                if n == 2 {
                    Err("stalled")
                } else {
                    Ok(())
                }
            },
            || Ok(()),
        );
        assert_eq!(r, Err("stalled"));
        assert_eq!(n, 2);
    }
}
