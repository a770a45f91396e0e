//! `kiln-bench exec`: boots one sandbox, warms it up, then measures exec round
//! trips of `true` and ping round trips, and prints the raw samples as one JSON document
//! (`cargo xtask bench exec` summarises them). Speed is measured here, never asserted.
//!
//! With `--boots N` it also measures N cold boots (create until the agent's handshake).
//!
//! With `--peer qemu` it measures the same on QEMU microvm ([`qemu`]): the same kernel +
//! initramfs under `-M microvm,acpi=off -accel kvm` with a vhost-vsock device; the same agent
//! connects to AF_VSOCK port 1024 of this host and the same kiln-proto client drives it. A
//! warm QEMU guest runs beside the warm sandbox and gets the same warm-up and measured
//! exec/ping round trips, the two taking turns in blocks of [`BLOCK`] calls so that both see
//! the same host load; then the cold boots alternate too (`--qemu-boots N`: launch until the
//! agent's `Hello`, and until its `KILN-AGENT-READY` console line). A QEMU failure is recorded
//! in `qemu_error` and does not void the Kiln samples.

pub(crate) mod qemu;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use kiln::{Sandbox, SandboxConfig, DEFAULT_OUTPUT_CAP};
use kiln_proto::ExecRequest;
use kiln_testkit::bench::ExecSamples as BenchSamples;
use kiln_testkit::stats::ms;

use super::exit;
use qemu::{QemuGuest, QemuPeer, QemuPeerError};

/// A comparison peer for `kiln-bench exec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Peer {
    /// QEMU `-M microvm` with KVM and vhost-vsock, the same guest.
    Qemu,
}

/// `kiln-bench exec` arguments.
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

/// Measured calls of one kind per turn before the other side takes its turn.
const BLOCK: usize = 10;

/// What a round trip measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Exec,
    Ping,
}

/// One side of the comparison: its exec and ping calls and their samples (ms).
struct Side<'a, E> {
    exec: Box<dyn FnMut() -> Result<(), E> + 'a>,
    ping: Box<dyn FnMut() -> Result<(), E> + 'a>,
    exec_ms: Vec<f64>,
    ping_ms: Vec<f64>,
}

impl<'a, E> Side<'a, E> {
    fn new(
        exec: impl FnMut() -> Result<(), E> + 'a,
        ping: impl FnMut() -> Result<(), E> + 'a,
    ) -> Self {
        Side {
            exec: Box::new(exec),
            ping: Box::new(ping),
            exec_ms: Vec::new(),
            ping_ms: Vec::new(),
        }
    }

    /// One exec and one ping, not timed.
    fn warm_up(&mut self) -> Result<(), E> {
        (self.exec)()?;
        (self.ping)()
    }

    /// `n` timed calls of `kind`.
    fn measure(&mut self, kind: Kind, n: usize) -> Result<(), E> {
        let (call, out) = match kind {
            Kind::Exec => (&mut self.exec, &mut self.exec_ms),
            Kind::Ping => (&mut self.ping, &mut self.ping_ms),
        };
        for _ in 0..n {
            let t = Instant::now();
            call()?;
            out.push(ms(t.elapsed()));
        }
        Ok(())
    }
}

/// Warm-up (`warmup` exec + ping pairs on each side), then `iterations` timed exec round
/// trips, then as many pings, the two sides taking turns in blocks of [`BLOCK`] calls so both
/// see the same host load (under nested emulation it drifts within a run). An error of `ours`
/// ends the measurement; an error of `peer` only ends the peer's part, and is returned with
/// the peer's samples taken so far.
fn interleaved<E, P>(
    warmup: usize,
    iterations: usize,
    ours: &mut Side<'_, E>,
    mut peer: Option<&mut Side<'_, P>>,
) -> Result<Option<P>, E> {
    let mut peer_error = None;
    let mut turn = |peer: &mut Option<&mut Side<'_, P>>,
                    f: &dyn Fn(&mut Side<'_, P>) -> Result<(), P>| {
        if let Some(p) = peer.as_deref_mut() {
            if let Err(e) = f(p) {
                peer_error = Some(e);
                *peer = None;
            }
        }
    };
    for _ in 0..warmup {
        ours.warm_up()?;
        turn(&mut peer, &|p| p.warm_up());
    }
    for kind in [Kind::Exec, Kind::Ping] {
        let mut done = 0;
        while done < iterations {
            let n = BLOCK.min(iterations - done);
            ours.measure(kind, n)?;
            turn(&mut peer, &|p| p.measure(kind, n));
            done += n;
        }
    }
    Ok(peer_error)
}

fn sandbox_config(args: &BenchExecArgs, name: String) -> SandboxConfig {
    SandboxConfig::new()
        .name(name)
        .vcpus(args.vcpus)
        .memory_mib(args.memory)
}

fn measure(args: &BenchExecArgs) -> Result<BenchSamples, kiln::SandboxError> {
    let mut out = BenchSamples {
        vmm: "kiln".into(),
        boot_ms: 0.0,
        exec_true_ms: Vec::new(),
        ping_ms: Vec::new(),
        boot_samples_ms: Vec::with_capacity(args.boots),
        qemu_exec_true_ms: Vec::new(),
        qemu_ping_ms: Vec::new(),
        qemu_microvm_handshake_ms: Vec::new(),
        qemu_microvm_ready_ms: Vec::new(),
        qemu_error: None,
    };
    let t0 = Instant::now();
    let sb = Sandbox::create(sandbox_config(args, "bench-exec".into()))?;
    out.boot_ms = ms(t0.elapsed());

    let peer = match args.peer {
        Some(Peer::Qemu) => {
            let resolved = SandboxConfig::new().validate()?;
            Some(QemuPeer {
                qemu: args.qemu.clone(),
                kernel: resolved.kernel,
                initramfs: resolved.initramfs,
                vcpus: args.vcpus,
                memory_mib: args.memory,
                cid: args.qemu_cid,
                extra_cmdline: resolved.extra_cmdline,
                boot_timeout: QEMU_BOOT_TIMEOUT,
                extra_args: Vec::new(),
            })
        }
        None => None,
    };
    let mut guest = match &peer {
        Some(p) => match p.check_host().and_then(|()| p.boot()) {
            Ok(mut g) => {
                record_qemu_boot(&mut g, &mut out);
                Some(g)
            }
            Err(e) => {
                qemu_failed(&mut out, e);
                None
            }
        },
        None => None,
    };

    // Warm round trips, Kiln and QEMU taking turns.
    let mut kiln_side = Side::new(
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
    );
    let client = match guest.as_ref().map(QemuGuest::client) {
        Some(Ok(c)) => Some(c.clone()),
        _ => None,
    };
    let mut qemu_side = client.as_ref().map(|c| {
        Side::new(
            move || {
                let mut req = ExecRequest::new(["true"]);
                // As `Sandbox::exec` sends it.
                req.output_cap = Some(DEFAULT_OUTPUT_CAP);
                let r = c.exec(req).map_err(|e| ("exec", e.to_string()))?;
                if r.status.code == Some(0) {
                    Ok(())
                } else {
                    Err(("exec", format!("`true` exited with {:?}", r.status)))
                }
            },
            move || c.ping().map_err(|e| ("ping", e.to_string())),
        )
    });
    let peer_error = interleaved(
        args.warmup,
        args.iterations,
        &mut kiln_side,
        qemu_side.as_mut(),
    )?;
    out.exec_true_ms = std::mem::take(&mut kiln_side.exec_ms);
    out.ping_ms = std::mem::take(&mut kiln_side.ping_ms);
    drop(kiln_side);
    if let Some(q) = qemu_side.as_mut() {
        out.qemu_exec_true_ms = std::mem::take(&mut q.exec_ms);
        out.qemu_ping_ms = std::mem::take(&mut q.ping_ms);
    }
    drop(qemu_side);
    drop(client);
    if let (Some((op, e)), Some(g)) = (peer_error, guest.as_mut()) {
        let err = g.request_error(op, e);
        qemu_failed(&mut out, err);
    }
    drop(guest);
    drop(sb);

    // Cold boots, alternating between Kiln and QEMU.
    let mut peer = if out.qemu_error.is_none() { peer } else { None };
    for i in 0..args.boots.max(args.qemu_boots) {
        if i < args.boots {
            let t = Instant::now();
            let sb = Sandbox::create(sandbox_config(args, format!("bench-boot-{i}")))?;
            out.boot_samples_ms.push(ms(t.elapsed()));
            drop(sb);
        }
        if i < args.qemu_boots {
            if let Some(p) = &peer {
                match p.boot() {
                    Ok(mut g) => record_qemu_boot(&mut g, &mut out),
                    Err(e) => {
                        qemu_failed(&mut out, e);
                        peer = None;
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Records why the QEMU peer stopped (the samples taken so far stay).
fn qemu_failed(out: &mut BenchSamples, e: QemuPeerError) {
    eprintln!("kiln: QEMU peer: {e}");
    out.qemu_error = Some(e.to_string());
}

/// Adds a QEMU guest's boot times (launch until `Hello`, and until READY) to `out`.
fn record_qemu_boot(guest: &mut QemuGuest, out: &mut BenchSamples) {
    out.qemu_microvm_handshake_ms
        .push(ms(guest.handshake_after()));
    if let Some(ready) = guest.ready_after(Duration::from_secs(2)) {
        out.qemu_microvm_ready_ms.push(ms(ready));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command};
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<BenchExecArgs, clap::Error> {
        let mut argv = vec!["kiln-bench", "exec"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Exec(a) => Ok(a),
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
    fn sides_take_turns_in_blocks() {
        let log = std::cell::RefCell::new(Vec::new());
        let call = |who: &'static str| {
            let log = &log;
            move || -> Result<(), &'static str> {
                log.borrow_mut().push(who);
                Ok(())
            }
        };
        let mut ours = Side::new(call("k-exec"), call("k-ping"));
        let mut peer = Side::new(call("q-exec"), call("q-ping"));
        let err = interleaved(1, BLOCK + 2, &mut ours, Some(&mut peer)).unwrap();
        assert!(err.is_none());
        assert_eq!(
            (ours.exec_ms.len(), ours.ping_ms.len()),
            (BLOCK + 2, BLOCK + 2)
        );
        assert_eq!(
            (peer.exec_ms.len(), peer.ping_ms.len()),
            (BLOCK + 2, BLOCK + 2)
        );
        drop((ours, peer));
        let log = log.into_inner();
        // Warm-up pair on each side, then blocks of BLOCK exec calls, then the rest, then pings.
        assert_eq!(log[..4], ["k-exec", "k-ping", "q-exec", "q-ping"]);
        assert!(log[4..4 + BLOCK].iter().all(|c| *c == "k-exec"));
        assert!(log[4 + BLOCK..4 + 2 * BLOCK].iter().all(|c| *c == "q-exec"));
        assert_eq!(
            log[4 + 2 * BLOCK..4 + 2 * BLOCK + 4],
            ["k-exec", "k-exec", "q-exec", "q-exec"]
        );
        assert_eq!(log[4 + 2 * BLOCK + 4], "k-ping");
        assert_eq!(log.len(), 4 + 4 * (BLOCK + 2));
    }

    #[test]
    fn a_failing_peer_drops_out_and_ours_goes_on() {
        let mut n = 0;
        let mut ours = Side::new(|| Ok::<(), &str>(()), || Ok(()));
        let mut peer = Side::new(
            || {
                n += 1;
                if n == 3 {
                    Err("stalled")
                } else {
                    Ok(())
                }
            },
            || Ok(()),
        );
        let err = interleaved(0, 3 * BLOCK, &mut ours, Some(&mut peer)).unwrap();
        assert_eq!(err, Some("stalled"));
        assert_eq!(ours.exec_ms.len(), 3 * BLOCK);
        assert_eq!(ours.ping_ms.len(), 3 * BLOCK);
        assert_eq!(peer.exec_ms.len(), 2);
        assert!(peer.ping_ms.is_empty());
        // An error of ours ends everything.
        let mut ours = Side::new(|| Err::<(), &str>("dead"), || Ok(()));
        assert_eq!(interleaved::<_, ()>(0, 1, &mut ours, None), Err("dead"));
    }
}
