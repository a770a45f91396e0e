//! The pool's hot path: acquire + release of an idle resource with a trivial manager, so the
//! numbers are the pool's own overhead. Built with the bench (release) profile.
//!
//! `cargo bench -p kiln-pool --bench pool [-- --samples N --ops N --threads N --raw-json]`
//! Each sample times `ops` acquire+release pairs; a sample's value is nanoseconds per pair.
//! Without `--raw-json` it prints a min/median/p99 summary; with it, one JSON line per metric
//! (`{"name","unit","samples":[...]}`) for `cargo xtask bench pool` to summarise and report.

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Instant;

use kiln_pool::{Manager, Pool, PoolConfig};

/// A resource whose hooks cost next to nothing.
struct Trivial;

impl Manager for Trivial {
    type Resource = [u64; 8];
    type Error = Infallible;

    fn create(&self) -> Result<[u64; 8], Infallible> {
        Ok([0; 8])
    }

    fn health_check(&self, r: &mut [u64; 8]) -> Result<(), Infallible> {
        black_box(r);
        Ok(())
    }

    fn reset(&self, r: &mut [u64; 8]) -> Result<(), Infallible> {
        r[0] = 0;
        Ok(())
    }
}

struct Opts {
    samples: usize,
    ops: usize,
    threads: usize,
    raw_json: bool,
}

fn parse_opts() -> Result<Opts, String> {
    let mut opts = Opts {
        samples: 30,
        ops: 10_000,
        threads: 2,
        raw_json: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> Result<usize, String> {
            let v = args.next().ok_or(format!("{name} needs a value"))?;
            match v.parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("{name}: expected a positive integer, got {v:?}")),
            }
        };
        match arg.as_str() {
            "--samples" => opts.samples = number("--samples")?,
            "--ops" => opts.ops = number("--ops")?,
            "--threads" => opts.threads = number("--threads")?,
            "--raw-json" => opts.raw_json = true,
            "--bench" => {} // passed by `cargo bench`
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(opts)
}

fn config(health_check_interval: u32) -> PoolConfig {
    PoolConfig {
        min_size: 1,
        max_size: 64,
        health_check_interval,
        max_in_use: 1024,
        ..PoolConfig::default()
    }
}

fn new_pool(health_check_interval: u32) -> Result<Pool<Trivial>, String> {
    let pool = Pool::new(Trivial, config(health_check_interval)).map_err(|e| e.to_string())?;
    pool.warm(8).map_err(|e| e.to_string())?;
    Ok(pool)
}

/// Nanoseconds per acquire+release, one thread, `samples` samples (after one warm-up).
fn single_thread(pool: &Pool<Trivial>, opts: &Opts) -> Result<Vec<f64>, String> {
    let mut out = Vec::with_capacity(opts.samples);
    for i in 0..=opts.samples {
        let start = Instant::now();
        for _ in 0..opts.ops {
            let mut h = pool.acquire().map_err(|e| e.to_string())?;
            h[1] = h[1].wrapping_add(1);
            drop(black_box(h));
        }
        let ns = start.elapsed().as_nanos() as f64 / opts.ops as f64;
        if i > 0 {
            out.push(ns);
        }
    }
    Ok(out)
}

/// Nanoseconds per acquire+release as each of `threads` threads sees it while all run at once
/// (each thread times its own loop; a sample is the mean over the threads).
fn contended(pool: &Arc<Pool<Trivial>>, opts: &Opts) -> Result<Vec<f64>, String> {
    let mut out = Vec::with_capacity(opts.samples);
    for i in 0..=opts.samples {
        let barrier = Arc::new(Barrier::new(opts.threads));
        let workers: Vec<_> = (0..opts.threads)
            .map(|_| {
                let (pool, barrier, ops) = (Arc::clone(pool), Arc::clone(&barrier), opts.ops);
                thread::spawn(move || -> Result<f64, String> {
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..ops {
                        let h = pool.acquire().map_err(|e| e.to_string())?;
                        drop(black_box(h));
                    }
                    Ok(start.elapsed().as_nanos() as f64 / ops as f64)
                })
            })
            .collect();
        let mut total = 0.0;
        for w in workers {
            total += w
                .join()
                .map_err(|_| "bench thread panicked".to_string())??;
        }
        if i > 0 {
            out.push(total / opts.threads as f64);
        }
    }
    Ok(out)
}

fn summary(samples: &[f64]) -> (f64, f64, f64) {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    let rank = (n * 99).div_ceil(100).max(1);
    (v[0], median, v[rank - 1])
}

fn emit(opts: &Opts, name: &str, samples: &[f64]) {
    if opts.raw_json {
        let list: Vec<String> = samples.iter().map(|s| format!("{s:.3}")).collect();
        println!(
            "{{\"name\":\"{name}\",\"unit\":\"ns/op\",\"samples\":[{}]}}",
            list.join(",")
        );
    } else {
        let (min, median, p99) = summary(samples);
        println!(
            "{name:<40} n={:<3} min={min:>9.1} median={median:>9.1} p99={p99:>9.1} ns/op",
            samples.len()
        );
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench pool: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let opts = parse_opts()?;

    // Health check on every 1000th release: the common production setting's cost profile.
    let pool = new_pool(1000)?;
    emit(
        &opts,
        "pool.mock.acquire_release",
        &single_thread(&pool, &opts)?,
    );
    drop(pool);

    // A health check on every release (the Manager's check is trivial: pool overhead only).
    let pool = new_pool(1)?;
    emit(
        &opts,
        "pool.mock.acquire_release.health_check_every_release",
        &single_thread(&pool, &opts)?,
    );
    drop(pool);

    let pool = Arc::new(new_pool(1000)?);
    let name = format!("pool.mock.acquire_release.{}_threads", opts.threads);
    emit(&opts, &name, &contended(&pool, &opts)?);
    let stats = pool.stats();
    if stats.in_use_count != 0 || stats.idle_count > 64 {
        return Err(format!("pool left inconsistent: {stats:?}"));
    }
    // Keep the pool alive until here so its maintenance thread's start-up is not measured.
    drop(pool);
    Ok(())
}
