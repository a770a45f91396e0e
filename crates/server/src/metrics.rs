//! The server's Prometheus metrics (`GET /metrics`, text exposition format 0.0.4, written by
//! hand): live sandboxes, creates, pool hits and misses, and latency histograms of boots,
//! restores/forks and execs. Everything is lock-free atomics updated on the request paths.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// A cumulative latency histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (b, le) in self.buckets.iter().zip(BUCKETS) {
            if s <= le {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, le) in self.buckets.iter().zip(BUCKETS) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{le}\"}} {}",
                b.load(Ordering::Relaxed)
            );
        }
        let n = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {n}");
    }
}

/// Every counter and histogram of the server.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Successful creates (E2B create, restore and fork children).
    pub creates: AtomicU64,
    /// Failed creates.
    pub create_failures: AtomicU64,
    /// Creates served from a warm pool.
    pub pool_hits: AtomicU64,
    /// Creates of a pooled template that had to boot.
    pub pool_misses: AtomicU64,
    /// Processes started through envd `Start`.
    pub execs: AtomicU64,
    /// Sandbox boots (create of a fresh VM).
    pub boot: Histogram,
    /// Restores from a snapshot and live forks (per child).
    pub restore: Histogram,
    /// `Start` to the process's end.
    pub exec: Histogram,
}

fn counter(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
    );
}

impl Metrics {
    /// Increments a counter.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text of every metric; `live` is the number of live sandboxes, `pooled`
    /// the warm sandboxes waiting in pools.
    pub fn render(&self, live: usize, pooled: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP kiln_serve_sandboxes_live Sandboxes running for clients.\n\
             # TYPE kiln_serve_sandboxes_live gauge\nkiln_serve_sandboxes_live {live}"
        );
        let _ = writeln!(
            out,
            "# HELP kiln_serve_pool_ready Warm sandboxes waiting in the pools.\n\
             # TYPE kiln_serve_pool_ready gauge\nkiln_serve_pool_ready {pooled}"
        );
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        counter(
            &mut out,
            "kiln_serve_creates_total",
            "Sandboxes created (create, restore, fork).",
            load(&self.creates),
        );
        counter(
            &mut out,
            "kiln_serve_create_failures_total",
            "Sandbox creates that failed.",
            load(&self.create_failures),
        );
        counter(
            &mut out,
            "kiln_serve_pool_hits_total",
            "Creates served by a warm pool.",
            load(&self.pool_hits),
        );
        counter(
            &mut out,
            "kiln_serve_pool_misses_total",
            "Creates of a pooled template that found its pool empty.",
            load(&self.pool_misses),
        );
        counter(
            &mut out,
            "kiln_serve_execs_total",
            "Processes started through envd Start.",
            load(&self.execs),
        );
        self.boot.write(
            &mut out,
            "kiln_serve_boot_seconds",
            "Time to boot a fresh sandbox.",
        );
        self.restore.write(
            &mut out,
            "kiln_serve_restore_seconds",
            "Time to restore a sandbox from a snapshot or fork one (per sandbox).",
        );
        self.exec.write(
            &mut out,
            "kiln_serve_exec_seconds",
            "Time from a process Start to its end.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(300));
        h.observe(Duration::from_secs(500));
        let mut s = String::new();
        h.write(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"0.005\"} 1\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"0.5\"} 2\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"120\"} 2\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 3\n"), "{s}");
        assert!(s.contains("x_count 3\n"), "{s}");
        assert!(s.contains("x_sum 500.303\n"), "{s}");
    }

    #[test]
    fn render_has_every_family() {
        let m = Metrics::default();
        Metrics::inc(&m.creates);
        Metrics::inc(&m.pool_hits);
        let s = m.render(2, 1);
        for want in [
            "kiln_serve_sandboxes_live 2\n",
            "kiln_serve_pool_ready 1\n",
            "kiln_serve_creates_total 1\n",
            "kiln_serve_pool_hits_total 1\n",
            "kiln_serve_pool_misses_total 0\n",
            "# TYPE kiln_serve_boot_seconds histogram\n",
            "# TYPE kiln_serve_restore_seconds histogram\n",
            "kiln_serve_exec_seconds_count 0\n",
        ] {
            assert!(s.contains(want), "missing {want:?} in\n{s}");
        }
    }
}
