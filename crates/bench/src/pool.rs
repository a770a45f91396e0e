//! `kiln-bench pool`: warms a [`SandboxPool`] and measures acquire + exec `true` + release
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

use clap::{Args, ValueEnum};
use kiln::{
    ExecOptions, PoolConfig, PoolStats, ResetMode, SandboxConfig, SandboxError, SandboxPool,
    SandboxPoolError,
};
use kiln_testkit::bench::{PoolCounters, PoolSamples as PoolBenchSamples};
use kiln_testkit::stats::ms;
use kiln_testkit::Stats;

use super::{exit, parse_secs};

/// The prototype Kiln replaces: pool acquire + echo + release, P50 on real hardware.
pub const PROTOTYPE_REFERENCE_US: f64 = 773.0;

/// `kiln-bench pool` arguments.
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

/// [`PoolStats`] as the sample document's counters.
fn counters(s: PoolStats) -> PoolCounters {
    PoolCounters {
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

/// `kiln-bench pool`; returns the exit code.
pub fn pool_bench(args: &PoolBenchArgs) -> i32 {
    match bench(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("kiln: error: {e}");
            e.exit_code()
        }
    }
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
        stats: counters(pool.stats()),
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
    s.stats = counters(pool.stats());
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

fn print_summary(s: &PoolBenchSamples) {
    let row = |name: &str, v: &[f64]| {
        if let Some(Stats {
            n,
            min,
            median,
            p99,
        }) = Stats::from_samples(v)
        {
            println!(
                "{name:<28} n={n:<4} min={min:>10.3} median={median:>10.3} p99={p99:>10.3} ms"
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
