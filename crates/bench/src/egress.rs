//! `kiln-bench egress`: egress throughput and connection latency (for `cargo xtask bench
//! egress`), the proxy path against a raw vsock path in the same run.
//!
//! Two warm sandboxes of the same guest, the same guest clients (busybox `wget` through
//! `http_proxy=http://127.0.0.1:3128`, busybox `nc`), the same agent forwarder (guest TCP ->
//! vsock to host port `EGRESS_PORT`); only the host side differs:
//! - **proxy**: the sandbox's `EgressProxy` (policy check, name resolution, HTTP parsing,
//!   byte accounting, log) relaying to servers on host loopback TCP;
//! - **raw vsock**: a sandbox without egress, whose `EGRESS_PORT` this program listens on
//!   itself ([`Sandbox::egress_raw_listener`]) and answers the same requests straight from
//!   the vsock stream (no proxy, no host TCP hop).
//!
//! Measured, runs of both sides alternating:
//! - download: `wget -O /dev/null` of `--mib` MiB (`GET` through the proxy), wall time of the
//!   exec on the host;
//! - upload: `head -c N /dev/zero | nc` into a `CONNECT` tunnel; time from the first to the
//!   last byte at the receiving host end;
//! - connect: `--connects` sequential `wget`s of a 5-byte body in one exec (connection setup,
//!   one request and the answer, and the `wget` process), per request.
//!
//! Writes one JSON [`EgressSamples`] document to `--out` (or stdout).

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, TcpListener};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::Args;
use kiln::egress::StaticResolver;
use kiln::{ExecOptions, Policy, Sandbox, SandboxConfig, SandboxError};
use serde::Serialize;

use super::exit;

/// `kiln-bench egress` arguments.
#[derive(Debug, Args)]
pub struct EgressBenchArgs {
    /// MiB per download run.
    #[arg(long, default_value_t = 256)]
    pub mib: u64,
    /// MiB per upload run.
    #[arg(long, default_value_t = 64)]
    pub upload_mib: u64,
    /// Measured runs of each transfer on each side.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Sequential requests of the connect measurement (per side).
    #[arg(long, default_value_t = 20)]
    pub connects: usize,
    /// Guest memory (MiB) of each sandbox.
    #[arg(long, default_value_t = 256)]
    pub memory: u32,
    /// Write the samples here instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// The samples (read back by `cargo xtask bench egress`).
#[derive(Debug, Default, Serialize)]
pub struct EgressSamples {
    /// MiB/s of each download through the proxy.
    pub download_proxy_mib_s: Vec<f64>,
    /// MiB/s of each download from the raw vsock server.
    pub download_raw_mib_s: Vec<f64>,
    /// MiB/s of each upload through the proxy's CONNECT tunnel.
    pub upload_proxy_mib_s: Vec<f64>,
    /// MiB/s of each upload into the raw vsock server.
    pub upload_raw_mib_s: Vec<f64>,
    /// ms per request of the connect loop, through the proxy (one sample per request: the
    /// loop's time / its count, repeated per run).
    pub connect_proxy_ms: Vec<f64>,
    /// ms per request of the connect loop, raw vsock.
    pub connect_raw_ms: Vec<f64>,
}

/// Errors of the egress bench.
#[derive(Debug, thiserror::Error)]
pub enum EgressBenchError {
    /// A sandbox call failed.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// A local server could not start.
    #[error("egress bench: {op}: {source}")]
    Io {
        /// What failed.
        op: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A guest command failed or a transfer was incomplete.
    #[error("egress bench: {0}")]
    Failed(String),
}

/// `kiln-bench egress`: measures and writes the samples; returns the exit code.
pub fn bench_egress(args: &EgressBenchArgs) -> i32 {
    let samples = match measure(args) {
        Ok(s) => s,
        Err(EgressBenchError::Sandbox(e)) => {
            eprintln!("kiln: error: {e}");
            return exit::for_error(&e);
        }
        Err(e) => {
            eprintln!("kiln: error: {e}");
            return exit::INTERNAL;
        }
    };
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

/// Bytes the servers write per call.
const CHUNK: usize = 256 * 1024;
/// Deadline of every server read/write and of each guest command.
const IO_TIMEOUT: Duration = Duration::from_secs(600);
/// The names the guest asks for (the proxy's resolver maps both to 127.0.0.1).
const ORIGIN: &str = "origin.bench";
const SINK: &str = "sink.bench";

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> EgressBenchError {
    move |source| EgressBenchError::Io { op, source }
}

/// Reads a request head (up to 16 KiB); returns it, or `None` at end of stream.
fn read_head(s: &mut impl Read) -> Option<String> {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if buf.len() > 16 * 1024 || !matches!(s.read(&mut b), Ok(1)) {
            return None;
        }
        buf.push(b[0]);
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// Answers one HTTP request: `GET /big/N` (N zero bytes) or anything else (`hello`).
fn answer_get(s: &mut impl Write, head: &str) {
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let n: u64 = path
        .rsplit_once("/big/")
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(0);
    if n == 0 {
        let _ =
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello");
        return;
    }
    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n");
    if s.write_all(head.as_bytes()).is_err() {
        return;
    }
    let chunk = vec![0u8; CHUNK];
    let mut left = n;
    while left > 0 {
        let k = left.min(CHUNK as u64) as usize;
        if s.write_all(&chunk[..k]).is_err() {
            return;
        }
        left -= k as u64;
    }
    let _ = s.flush();
}

/// Reads until end of stream; sends (bytes, seconds from the first to the last byte).
fn sink(s: &mut impl Read, done: &mpsc::Sender<(u64, f64)>) {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                first.get_or_insert_with(Instant::now);
                total += n as u64;
                last = Instant::now();
            }
        }
    }
    let secs = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
    let _ = done.send((total, secs));
}

/// The proxy side's servers on host loopback: the HTTP origin and the upload sink. Returns
/// (origin port, sink port).
fn start_tcp_servers(done: mpsc::Sender<(u64, f64)>) -> Result<(u16, u16), EgressBenchError> {
    let origin = TcpListener::bind("127.0.0.1:0").map_err(io_err("binding the origin"))?;
    let sinkl = TcpListener::bind("127.0.0.1:0").map_err(io_err("binding the sink"))?;
    let op = origin
        .local_addr()
        .map_err(io_err("origin address"))?
        .port();
    let sp = sinkl.local_addr().map_err(io_err("sink address"))?.port();
    thread::spawn(move || {
        for mut s in origin.incoming().flatten() {
            thread::spawn(move || {
                let _ = s.set_read_timeout(Some(IO_TIMEOUT));
                let _ = s.set_write_timeout(Some(IO_TIMEOUT));
                if let Some(head) = read_head(&mut s) {
                    answer_get(&mut s, &head);
                }
                let _ = s.shutdown(Shutdown::Both);
            });
        }
    });
    thread::spawn(move || {
        for mut s in sinkl.incoming().flatten() {
            let done = done.clone();
            thread::spawn(move || {
                let _ = s.set_read_timeout(Some(IO_TIMEOUT));
                sink(&mut s, &done);
            });
        }
    });
    Ok((op, sp))
}

/// The raw side: serves the agent's forwarded connections straight from vsock: `CONNECT`
/// (200, then a sink) or a proxied `GET` (answered as the origin would).
fn start_raw_server(sb: &Sandbox, done: mpsc::Sender<(u64, f64)>) -> Result<(), SandboxError> {
    let listener = sb.egress_raw_listener()?;
    thread::spawn(move || loop {
        match listener.accept(Duration::from_secs(1)) {
            Ok(mut s) => {
                let done = done.clone();
                thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
                    let Some(head) = read_head(&mut s) else {
                        return;
                    };
                    if head.starts_with("CONNECT ") {
                        if s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                            .is_ok()
                        {
                            sink(&mut s, &done);
                        }
                    } else {
                        answer_get(&mut s, &head);
                    }
                    let _ = s.shutdown(Shutdown::Both);
                });
            }
            Err(kiln_vmm::virtio::vsock::VsockError::AcceptTimeout { .. }) => {}
            Err(_) => return,
        }
    });
    Ok(())
}

/// One side of the comparison.
struct Side<'a> {
    sb: &'a Sandbox,
    /// Extra exec env (the raw side sets the proxy variable itself).
    env: Vec<(String, String)>,
    /// Upload results of this side's sink.
    done: mpsc::Receiver<(u64, f64)>,
}

impl Side<'_> {
    fn sh(&self, script: &str) -> Result<Duration, EgressBenchError> {
        let mut opts = ExecOptions::new().timeout(IO_TIMEOUT);
        for (k, v) in &self.env {
            opts = opts.env(k, v);
        }
        let t = Instant::now();
        let r = self.sb.exec_with_options(&["sh", "-c", script], opts)?;
        let took = t.elapsed();
        if !r.success() {
            return Err(EgressBenchError::Failed(format!(
                "{script:?} in {}: {:?}: {}{}",
                self.sb.name(),
                r.status,
                r.stdout_str(),
                String::from_utf8_lossy(&r.stderr)
            )));
        }
        Ok(took)
    }

    fn download(&self, origin: u16, mib: u64) -> Result<f64, EgressBenchError> {
        let n = mib << 20;
        // `wc -c` checks the length (a cut transfer must not count as fast).
        let script =
            format!("test $(wget -q -O - http://{ORIGIN}:{origin}/big/{n} | wc -c) -eq {n}");
        let took = self.sh(&script)?;
        Ok(mib as f64 / took.as_secs_f64())
    }

    fn upload(&self, sink: u16, mib: u64) -> Result<f64, EgressBenchError> {
        let n = mib << 20;
        let script = format!(
            "(printf 'CONNECT {SINK}:{sink} HTTP/1.1\\r\\nHost: {SINK}:{sink}\\r\\n\\r\\n'; \
             head -c {n} /dev/zero) | nc 127.0.0.1 3128 >/dev/null"
        );
        self.sh(&script)?;
        let (bytes, secs) = self
            .done
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| EgressBenchError::Failed("the upload sink reported nothing".into()))?;
        if bytes != n || secs <= 0.0 {
            return Err(EgressBenchError::Failed(format!(
                "upload in {}: {bytes} of {n} bytes arrived",
                self.sb.name()
            )));
        }
        Ok(mib as f64 / secs)
    }

    fn connects(&self, origin: u16, k: usize) -> Result<f64, EgressBenchError> {
        let script = format!(
            "for i in $(seq {k}); do wget -q -O /dev/null http://{ORIGIN}:{origin}/hello || exit 1; done"
        );
        let took = self.sh(&script)?;
        Ok(took.as_secs_f64() * 1000.0 / k as f64)
    }
}

fn measure(args: &EgressBenchArgs) -> Result<EgressSamples, EgressBenchError> {
    let (proxy_done_tx, proxy_done) = mpsc::channel();
    let (raw_done_tx, raw_done) = mpsc::channel();
    let (origin, sink_port) = start_tcp_servers(proxy_done_tx)?;
    let lo: IpAddr = IpAddr::from([127, 0, 0, 1]);
    let mut policy = Policy::from_rules(
        &[
            format!("{ORIGIN}:{origin}"),
            format!("{SINK}:{sink_port}"),
            format!("127.0.0.1:{origin}"),
            format!("127.0.0.1:{sink_port}"),
        ],
        &[] as &[String],
    )
    .map_err(|e| EgressBenchError::Failed(format!("policy: {e}")))?;
    policy.limits.max_total_bytes = Some(u64::MAX / 2);
    policy.limits.max_new_connections_per_sec = 1000;
    let resolver = StaticResolver::new().with(ORIGIN, &[lo]).with(SINK, &[lo]);
    let base = |name: &str| SandboxConfig::new().name(name).memory_mib(args.memory);
    eprintln!("kiln-bench egress: booting the proxy and the raw sandboxes");
    let proxied = Sandbox::create(
        base("bench-egress-proxy")
            .egress(policy)
            .egress_resolver(Arc::new(resolver)),
    )?;
    let raw = Sandbox::create(base("bench-egress-raw"))?;
    start_raw_server(&raw, raw_done_tx)?;
    let sides = [
        Side {
            sb: &proxied,
            env: Vec::new(),
            done: proxy_done,
        },
        Side {
            sb: &raw,
            env: vec![("http_proxy".into(), "http://127.0.0.1:3128".into())],
            done: raw_done,
        },
    ];
    let mut s = EgressSamples::default();
    // Warm-up: one small transfer and request each.
    for side in &sides {
        side.download(origin, 1)?;
        side.connects(origin, 1)?;
    }
    for run in 0..args.runs {
        eprintln!("kiln-bench egress: run {}/{}", run + 1, args.runs);
        // Alternate which side goes first so drifting host load hits both alike.
        let order: [usize; 2] = if run % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let side = &sides[i];
            let d = side.download(origin, args.mib)?;
            let u = side.upload(sink_port, args.upload_mib)?;
            let c = side.connects(origin, args.connects)?;
            let (dl, ul, cn) = if i == 0 {
                (
                    &mut s.download_proxy_mib_s,
                    &mut s.upload_proxy_mib_s,
                    &mut s.connect_proxy_ms,
                )
            } else {
                (
                    &mut s.download_raw_mib_s,
                    &mut s.upload_raw_mib_s,
                    &mut s.connect_raw_ms,
                )
            };
            dl.push(d);
            ul.push(u);
            cn.push(c);
        }
    }
    let log = proxied.egress_log();
    if log
        .iter()
        .any(|e| e.verdict != kiln::egress::Verdict::Allowed)
    {
        return Err(EgressBenchError::Failed(format!(
            "a proxied connection was denied: {log:?}"
        )));
    }
    Ok(s)
}
