//! vsock data-plane measurement used by `cargo xtask bench vsock`: boots the Kiln guest
//! (`$KILN_KERNEL`, `$KILN_INITRAMFS`, both required: the VMM takes paths, `cargo xtask`
//! passes them) with `kiln.echo=1` and, over the agent's echo server on
//! guest port 5000, measures connect latency and echo throughput (host->guest and
//! guest->host concurrently). Writes raw samples as one JSON object to `--out`.
//!
//! Usage: vsock_throughput --out <file> [--mib <n>] [--runs <n>] [--connects <n>]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use kiln_vmm::virtio::vsock::{VsockError, VsockHost};
use kiln_vmm::{Vm, VmConfig};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_owned())
}

/// The path in environment variable `name` (set by `cargo xtask bench vsock`).
fn env_path(name: &str) -> Res<std::path::PathBuf> {
    match std::env::var_os(name) {
        Some(v) if !v.is_empty() => Ok(v.into()),
        _ => Err(format!("{name} is not set (run through `cargo xtask bench vsock`)").into()),
    }
}

fn connect(host: &VsockHost) -> Res<kiln_vmm::virtio::vsock::VsockStream> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match host.connect(5000, Duration::from_secs(10)) {
            Ok(s) => return Ok(s),
            Err(VsockError::ConnectionRefused { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Echo `bytes` through one connection; returns (seconds until the host wrote everything,
/// seconds until everything came back).
fn echo_run(host: &VsockHost, bytes: usize) -> Res<(f64, f64)> {
    let s = connect(host)?;
    let mut r = s.try_clone()?;
    r.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut w = s;
    w.set_write_timeout(Some(Duration::from_secs(120)))?;
    let t0 = Instant::now();
    let writer = std::thread::spawn(move || -> std::io::Result<f64> {
        let chunk: Vec<u8> = (0..256 * 1024).map(|i| (i % 253) as u8).collect();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            w.write_all(&chunk[..n])?;
            left -= n;
        }
        w.flush()?;
        let wrote = t0.elapsed().as_secs_f64();
        w.shutdown(Shutdown::Write)?;
        Ok(wrote)
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0usize;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let back = t0.elapsed().as_secs_f64();
    let wrote = writer.join().map_err(|_| "writer thread panicked")??;
    if got != bytes {
        return Err(format!("echoed {got} of {bytes} bytes").into());
    }
    Ok((wrote, back))
}

fn list(v: &[f64]) -> String {
    let items: Vec<String> = v.iter().map(|x| format!("{x:.6}")).collect();
    format!("[{}]", items.join(","))
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let out = arg(&args, "--out", "vsock-throughput.json");
    let mib: usize = arg(&args, "--mib", "32").parse()?;
    let runs: usize = arg(&args, "--runs", "3").parse()?;
    let connects: usize = arg(&args, "--connects", "50").parse()?;

    let mut cfg = VmConfig::new("vsock-bench", env_path("KILN_KERNEL")?);
    cfg.initramfs = Some(env_path("KILN_INITRAMFS")?);
    cfg.mem_mib = 256;
    cfg.vsock_cid = Some(kiln_proto::GUEST_CID.into());
    cfg.cmdline_extra = "kiln.echo=1".into();
    let vm = Vm::start(cfg)?;
    vm.wait_for_serial(
        kiln_proto::READY_LINE,
        Instant::now() + Duration::from_secs(180),
    )?;
    let host = vm.vsock().ok_or("no vsock device")?.clone();
    drop(connect(&host)?); // warm-up: the echo server is listening

    let mut connect_ms = Vec::new();
    for _ in 0..connects {
        let t = Instant::now();
        let s = connect(&host)?;
        connect_ms.push(t.elapsed().as_secs_f64() * 1e3);
        drop(s);
    }
    let bytes = mib << 20;
    let (mut h2g, mut g2h) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let (wrote, back) = echo_run(&host, bytes)?;
        let m = mib as f64;
        eprintln!(
            "run {i}: {mib} MiB echoed: host->guest {:.1} MiB/s, guest->host {:.1} MiB/s",
            m / wrote,
            m / back
        );
        h2g.push(m / wrote);
        g2h.push(m / back);
    }
    vm.stop();
    let json = format!(
        "{{\"mib\":{mib},\"connect_ms\":{},\"h2g_mib_s\":{},\"g2h_mib_s\":{}}}\n",
        list(&connect_ms),
        list(&h2g),
        list(&g2h)
    );
    std::fs::write(&out, json)?;
    Ok(())
}
