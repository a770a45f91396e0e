//! `kiln pool bench`: warms a [`SandboxPool`] and measures acquire + exec `true` + release
//! with real sandboxes (the real-sandbox half of `cargo xtask bench pool`).
//!
//! Before each iteration it waits, untimed, until the pool is full again (`size` idle), so every
//! measured acquire is a hit (a miss — none idle — would measure a cold boot instead; misses
//! are counted and reported) and no background refill competes with the measured path. Samples are milliseconds: `acquire`, `exec` (`exec(["true"])`),
//! `release` (dropping the handle) and `total` (the three together), plus `boot` (how long each
//! sandbox handed out took to boot — or, with `--reset-mode restore` (the default), to be
//! restored from the pool's pristine snapshot — paid in the background by the pool's refill).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use kiln::{
    ExecOptions, PoolConfig, PoolStats, ResetMode, SandboxConfig, SandboxError, SandboxPool,
    SandboxPoolError,
};
use serde::Serialize;

use super::{exit, parse_secs};

/// The prototype Kiln replaces: pool acquire + echo + release, P50 on real hardware.
pub const PROTOTYPE_REFERENCE_US: f64 = 773.0;

/// `kiln pool` arguments.
#[derive(Debug, Args)]
pub struct PoolArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: PoolCommand,
}

/// `kiln pool` subcommands.
#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Warm a sandbox pool and measure acquire + exec `true` + release (min/median/p99).
    Bench(PoolBenchArgs),
}

/// `kiln pool bench` arguments.
#[derive(Debug, Args)]
pub struct PoolBenchArgs {
    /// Sandboxes kept warm (the pool's min_size and max_size).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub size: u32,
    /// Measured iterations.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub iterations: u32,
    /// Unmeasured iterations first.
    #[arg(long, default_value_t = 3)]
    pub warmup: u32,
    /// vCPUs per sandbox.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Guest memory per sandbox in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u32,
    /// How returned sandboxes are replaced: `restore` (from a pristine snapshot of the first
    /// sandbox) or `reboot` (a fresh boot each).
    #[arg(long, value_enum, default_value_t = ModeArg::Restore)]
    pub reset_mode: ModeArg,
    /// Boot deadline of each sandbox, and the longest wait for the pool to refill.
    #[arg(long, default_value = "300", value_parser = parse_secs)]
    pub boot_timeout: Duration,
    /// Deadline of each `exec(["true"])` (a guest that stops answering fails the bench
    /// instead of hanging it).
    #[arg(long, default_value = "120", value_parser = parse_secs)]
    pub exec_timeout: Duration,
    /// One line per iteration on stderr (phase timings, pool stats).
    #[arg(short, long)]
    pub verbose: bool,
    /// Print the raw samples as one JSON document instead of a summary.
    #[arg(long)]
    pub json: bool,
    /// Write the JSON document to this file (implies --json for the file; the summary still
    /// goes to stdout).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// `--reset-mode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// `ResetMode::Restore`.
    Restore,
    /// `ResetMode::Reboot`.
    Reboot,
}

impl From<ModeArg> for ResetMode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Restore => ResetMode::Restore,
            ModeArg::Reboot => ResetMode::Reboot,
        }
    }
}

/// The samples, in milliseconds, and the pool's counters at the end.
#[derive(Debug, Serialize)]
pub struct PoolBenchSamples {
    /// How returned sandboxes are replaced (`reboot` or `restore`).
    pub reset_mode: String,
    /// The pool's min_size and max_size.
    pub size: u32,
    /// Whether it ran inside the emulated-virtualization harness (software emulation).
    pub emulated: bool,
    /// `warm(size)`: booting the pool in the caller's thread.
    pub warm_ms: f64,
    /// `acquire()` (hits only, see `misses`).
    pub acquire_ms: Vec<f64>,
    /// `exec(["true"])` in the acquired sandbox.
    pub exec_ms: Vec<f64>,
    /// Dropping the handle (reset or hand-off to the reaper).
    pub release_ms: Vec<f64>,
    /// acquire + exec + release.
    pub total_ms: Vec<f64>,
    /// Boot (reboot mode) or restore (restore mode) time of each sandbox handed out, paid by
    /// the pool in the background.
    pub boot_ms: Vec<f64>,
    /// Untimed waits for the pool to be full again before an iteration.
    pub refill_wait_ms: Vec<f64>,
    /// Measured acquires served by an idle sandbox.
    pub hits: u64,
    /// Measured acquires that had to boot (should be 0).
    pub misses: u64,
    /// The pool's counters at the end.
    pub stats: StatsJson,
}

/// [`PoolStats`] as JSON.
#[derive(Debug, Serialize)]
pub struct StatsJson {
    hit_count: u64,
    miss_count: u64,
    evict_count: u64,
    dead_count: u64,
    idle_count: usize,
    in_use_count: usize,
    created_count: u64,
    create_failed_count: u64,
    destroyed_count: u64,
}

impl From<PoolStats> for StatsJson {
    fn from(s: PoolStats) -> Self {
        StatsJson {
            hit_count: s.hit_count,
            miss_count: s.miss_count,
            evict_count: s.evict_count,
            dead_count: s.dead_count,
            idle_count: s.idle_count,
            in_use_count: s.in_use_count,
            created_count: s.created_count,
            create_failed_count: s.create_failed_count,
            destroyed_count: s.destroyed_count,
        }
    }
}

/// Why the benchmark failed.
#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error(transparent)]
    Pool(#[from] SandboxPoolError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("`true` exited with {0:?} in {1}")]
    TrueFailed(kiln::ExitStatus, String),
    #[error("the pool did not refill within {0:?} (stats: {1:?})")]
    RefillTimeout(Duration, PoolStats),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("encoding the samples: {0}")]
    Json(#[from] serde_json::Error),
}

impl BenchError {
    fn exit_code(&self) -> i32 {
        match self {
            BenchError::Pool(SandboxPoolError::Create(e)) | BenchError::Sandbox(e) => {
                exit::for_error(e)
            }
            BenchError::Pool(SandboxPoolError::SandboxConfig(_)) => exit::ASSETS,
            BenchError::RefillTimeout(..) => exit::BOOT,
            _ => exit::INTERNAL,
        }
    }
}

/// `kiln pool ...`; returns the exit code.
pub fn pool(args: &PoolArgs) -> i32 {
    match &args.command {
        PoolCommand::Bench(a) => match bench(a) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("kiln: error: {e}");
                e.exit_code()
            }
        },
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Waits until the pool has `n` idle sandboxes; returns how long that took.
fn wait_idle(pool: &SandboxPool, n: usize, limit: Duration) -> Result<Duration, BenchError> {
    let t = Instant::now();
    loop {
        let s = pool.stats();
        if s.idle_count >= n {
            return Ok(t.elapsed());
        }
        if t.elapsed() >= limit {
            return Err(BenchError::RefillTimeout(limit, s));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn bench(args: &PoolBenchArgs) -> Result<(), BenchError> {
    let size = args.size as usize;
    let pool = SandboxPool::with_reset_mode(
        SandboxConfig::new()
            .name("pool-bench")
            .vcpus(args.vcpus)
            .memory_mib(args.memory)
            .boot_timeout(args.boot_timeout),
        PoolConfig {
            min_size: size,
            max_size: size,
            max_idle_duration: None,
            health_check_interval: 1,
            ..PoolConfig::default()
        },
        args.reset_mode.into(),
    )?;
    let t = Instant::now();
    pool.warm(size)?;
    let warm_ms = ms(t.elapsed());
    eprintln!(
        "kiln pool bench: {size} sandbox(es) warm in {warm_ms:.0} ms (reset mode {:?}); \
         {} warmup + {} measured iterations",
        pool.reset_mode(),
        args.warmup,
        args.iterations
    );

    let n = args.iterations as usize;
    let mut s = PoolBenchSamples {
        reset_mode: format!("{:?}", pool.reset_mode()).to_lowercase(),
        size: args.size,
        emulated: std::env::var_os("KILN_HARNESS_L1").is_some(),
        warm_ms,
        acquire_ms: Vec::with_capacity(n),
        exec_ms: Vec::with_capacity(n),
        release_ms: Vec::with_capacity(n),
        total_ms: Vec::with_capacity(n),
        boot_ms: Vec::with_capacity(n),
        refill_wait_ms: Vec::with_capacity(n),
        hits: 0,
        misses: 0,
        stats: pool.stats().into(),
    };
    for i in 0..args.warmup + args.iterations {
        let measured = i >= args.warmup;
        let waited = wait_idle(&pool, size, args.boot_timeout)?;
        let before = pool.stats();

        let t0 = Instant::now();
        let sb = pool.acquire()?;
        let t1 = Instant::now();
        let r = sb.exec_with_options(&["true"], ExecOptions::new().timeout(args.exec_timeout))?;
        let t2 = Instant::now();
        let boot = sb.boot_timings().ready;
        let name = sb.name().to_owned();
        drop(sb);
        let t3 = Instant::now();

        if args.verbose {
            eprintln!(
                "kiln pool bench: iteration {i} ({name}): waited {:.1} ms, acquire {:.3} ms, \
                 exec {:.1} ms, release {:.3} ms; {:?}",
                ms(waited),
                ms(t1 - t0),
                ms(t2 - t1),
                ms(t3 - t2),
                pool.stats()
            );
        }
        if !r.success() {
            return Err(BenchError::TrueFailed(r.status, name));
        }
        if !measured {
            continue;
        }
        if pool.stats().hit_count > before.hit_count {
            s.hits += 1;
        } else {
            s.misses += 1;
        }
        s.acquire_ms.push(ms(t1 - t0));
        s.exec_ms.push(ms(t2 - t1));
        s.release_ms.push(ms(t3 - t2));
        s.total_ms.push(ms(t3 - t0));
        s.boot_ms.push(ms(boot));
        s.refill_wait_ms.push(ms(waited));
    }
    s.stats = pool.stats().into();
    pool.shutdown();

    let json = serde_json::to_string(&s)?;
    if let Some(path) = &args.out {
        std::fs::write(path, format!("{json}\n")).map_err(|source| BenchError::Write {
            path: path.clone(),
            source,
        })?;
    }
    if args.json {
        println!("{json}");
    } else {
        print_summary(&s);
    }
    Ok(())
}

/// (min, median, p99 nearest rank) of `v`; `None` when empty.
fn summarize(v: &[f64]) -> Option<(f64, f64, f64)> {
    if v.is_empty() || v.iter().any(|x| x.is_nan()) {
        return None;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    let rank = (n * 99).div_ceil(100).max(1);
    Some((v[0], median, v[rank - 1]))
}

fn print_summary(s: &PoolBenchSamples) {
    let row = |name: &str, v: &[f64]| {
        if let Some((min, med, p99)) = summarize(v) {
            println!(
                "{name:<28} n={:<4} min={min:>10.3} median={med:>10.3} p99={p99:>10.3} ms",
                v.len()
            );
        }
    };
    row("acquire+exec true+release", &s.total_ms);
    row("  acquire", &s.acquire_ms);
    row("  exec true", &s.exec_ms);
    row("  release", &s.release_ms);
    row("boot/restore (background)", &s.boot_ms);
    println!(
        "hits {} misses {} (reset mode {}, pool size {}); pool stats: {:?}",
        s.hits, s.misses, s.reset_mode, s.size, s.stats
    );
    println!(
        "reference: the prototype Kiln replaces reported {PROTOTYPE_REFERENCE_US:.0} µs \
         (0.773 ms) P50 for pool acquire + echo + release on real hardware"
    );
    if s.emulated {
        println!(
            "note: measured inside the emulated-virtualization harness (QEMU software \
             emulation, nested KVM): far slower than hardware; compare ratios, not absolute \
             values"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_is_min_median_p99() {
        assert_eq!(summarize(&[3.0, 1.0, 2.0]), Some((1.0, 2.0, 3.0)));
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(summarize(&v), Some((1.0, 100.5, 198.0)));
        assert_eq!(summarize(&[]), None);
    }
}
