//! Percentile statistics of benchmark samples: [`Stats`] (n, min, median, nearest-rank p99),
//! the one summary every Kiln benchmark reports.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Summary of one metric's samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Number of samples.
    pub n: usize,
    /// Smallest sample.
    pub min: f64,
    /// Median (mean of the two middle samples when n is even).
    pub median: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
}

impl Stats {
    /// Summarises `samples`; `None` when there are none (or any is NaN).
    pub fn from_samples(samples: &[f64]) -> Option<Stats> {
        if samples.is_empty() || samples.iter().any(|s| s.is_nan()) {
            return None;
        }
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        // Nearest-rank percentile: the smallest sample with at least 99% of samples <= it.
        let rank = (n * 99).div_ceil(100).max(1);
        Some(Stats {
            n,
            min: v[0],
            median,
            p99: v[rank - 1],
        })
    }

    /// Summarises durations in milliseconds.
    pub fn from_durations_ms(samples: &[Duration]) -> Option<Stats> {
        let ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        Stats::from_samples(&ms)
    }
}

/// A duration in milliseconds, the unit of most samples.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_odd_and_even_samples() {
        let s = Stats::from_samples(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!((s.n, s.min, s.median, s.p99), (3, 1.0, 3.0, 5.0));
        let s = Stats::from_samples(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!((s.n, s.min, s.median, s.p99), (4, 1.0, 2.5, 4.0));
    }

    #[test]
    fn p99_is_nearest_rank() {
        let samples: Vec<f64> = (1..=200).map(f64::from).collect();
        let s = Stats::from_samples(&samples).unwrap();
        assert_eq!(s.p99, 198.0);
        assert_eq!(s.median, 100.5);
        let one = Stats::from_samples(&[7.0]).unwrap();
        assert_eq!((one.min, one.median, one.p99), (7.0, 7.0, 7.0));
    }

    #[test]
    fn summary_is_min_median_p99() {
        // (from `kiln pool bench`'s own summary, which this replaces)
        let s = Stats::from_samples(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.min, s.median, s.p99), (1.0, 2.0, 3.0));
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        let s = Stats::from_samples(&v).unwrap();
        assert_eq!((s.min, s.median, s.p99), (1.0, 100.5, 198.0));
    }

    #[test]
    fn empty_or_nan_samples_have_no_stats() {
        assert!(Stats::from_samples(&[]).is_none());
        assert!(Stats::from_samples(&[1.0, f64::NAN]).is_none());
    }

    #[test]
    fn durations_are_reported_in_ms() {
        let s = Stats::from_durations_ms(&[Duration::from_micros(1500)]).unwrap();
        assert!((s.median - 1.5).abs() < 1e-9);
        assert!((ms(Duration::from_micros(250)) - 0.25).abs() < 1e-12);
    }
}
