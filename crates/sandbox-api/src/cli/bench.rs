//! The hidden `kiln bench-exec`: boots one sandbox, warms it up, then measures exec round
//! trips of `true` and ping round trips, and prints the raw samples as one JSON document
//! (`cargo xtask bench exec` summarises them). Speed is measured here, never asserted.
//!
//! With `--boots N` it also measures N cold boots (create until the agent's handshake), and
//! with `--qemu-boots N` N boots of the same kernel + initramfs under QEMU `-M microvm`
//! (launch until the agent's `KILN-AGENT-READY` console line, which it prints just before
//! connecting). Exec and ping round trips have no QEMU counterpart here: the same agent would
//! need a vhost-vsock device, which the harness's L1 does not load.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Args;
use kiln::{Sandbox, SandboxConfig};
use serde::Serialize;

use super::exit;

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
    /// Boots of the same guest under QEMU microvm (KVM) to measure, launch until READY.
    #[arg(long, default_value_t = 0)]
    pub qemu_boots: usize,
    /// Write the JSON here instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// Deadline of one QEMU boot.
const QEMU_TIMEOUT: Duration = Duration::from_secs(180);
/// The agent's readiness line (docs/ARCHITECTURE.md).
const READY_LINE: &str = "KILN-AGENT-READY";

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
    /// QEMU microvm boots of the same guest, launch until `KILN-AGENT-READY`.
    pub qemu_microvm_ready_ms: Vec<f64>,
    /// Why the QEMU measurement failed, if it did (the Kiln samples stay valid).
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

fn measure(args: &BenchExecArgs) -> Result<BenchSamples, kiln::SandboxError> {
    let t0 = Instant::now();
    let sb = Sandbox::create(
        SandboxConfig::new()
            .name("bench-exec")
            .vcpus(args.vcpus)
            .memory_mib(args.memory),
    )?;
    let boot_ms = ms(t0.elapsed());
    for _ in 0..args.warmup {
        sb.exec(&["true"])?;
        sb.ping()?;
    }
    let mut exec_true_ms = Vec::with_capacity(args.iterations);
    for _ in 0..args.iterations {
        let t = Instant::now();
        let r = sb.exec(&["true"])?;
        exec_true_ms.push(ms(t.elapsed()));
        if !r.success() {
            return Err(kiln::SandboxError::Protocol {
                vm: sb.name().to_owned(),
                op: "bench exec",
                message: format!("`true` exited with {:?}", r.status),
            });
        }
    }
    let mut ping_ms = Vec::with_capacity(args.iterations);
    for _ in 0..args.iterations {
        let t = Instant::now();
        sb.ping()?;
        ping_ms.push(ms(t.elapsed()));
    }
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
    let mut qemu_microvm_ready_ms = Vec::with_capacity(args.qemu_boots);
    let mut qemu_error = None;
    if args.qemu_boots > 0 {
        let resolved = SandboxConfig::new().validate()?;
        for _ in 0..args.qemu_boots {
            match qemu_boot(&resolved, args) {
                Ok(d) => qemu_microvm_ready_ms.push(ms(d)),
                Err(e) => {
                    qemu_error = Some(e);
                    break;
                }
            }
        }
    }
    Ok(BenchSamples {
        vmm: "kiln",
        boot_ms,
        exec_true_ms,
        ping_ms,
        boot_samples_ms,
        qemu_microvm_ready_ms,
        qemu_error,
    })
}

/// Boots the guest under QEMU microvm with KVM; returns launch -> READY line.
fn qemu_boot(cfg: &kiln::ResolvedConfig, args: &BenchExecArgs) -> Result<Duration, String> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "microvm", "-accel", "kvm", "-cpu", "host"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-monitor", "none", "-serial", "stdio", "-no-reboot"])
        .args(["-m", &args.memory.to_string()])
        .args(["-smp", &args.vcpus.to_string()])
        .arg("-kernel")
        .arg(&cfg.kernel)
        .arg("-initrd")
        .arg(&cfg.initramfs)
        .args(["-append", "console=ttyS0 reboot=t panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let launched = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting qemu-system-x86_64: {e}"))?;
    let Some(stdout) = child.stdout.take() else {
        let _ = child.kill();
        let _ = child.wait();
        return Err("qemu's stdout is not piped".into());
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = stdout;
        // A bounded window over the console: the READY line can straddle two reads.
        let mut window: Vec<u8> = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(None);
                    return;
                }
                Ok(n) => {
                    window.extend_from_slice(&buf[..n]);
                    if window
                        .windows(READY_LINE.len())
                        .any(|w| w == READY_LINE.as_bytes())
                    {
                        let _ = tx.send(Some(Instant::now()));
                        return;
                    }
                    let keep = READY_LINE.len();
                    if window.len() > keep {
                        window.drain(..window.len() - keep);
                    }
                }
            }
        }
    });
    let res = match rx.recv_timeout(QEMU_TIMEOUT) {
        Ok(Some(at)) => Ok(at.saturating_duration_since(launched)),
        Ok(None) => Err("qemu exited before the READY line".to_string()),
        Err(_) => Err(format!("no READY line from qemu within {QEMU_TIMEOUT:?}")),
    };
    let _ = child.kill();
    let _ = child.wait();
    res
}
