//! Per-sandbox limit accounting: concurrent connections (RAII permits), total bytes, and a
//! token bucket for new upstream connections per second.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::policy::Limits;

/// Which limit was hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    /// Too many connections at once.
    Connections(usize),
    /// The total byte budget is used up.
    Bytes(u64),
    /// Too many new connections per second.
    Rate(u32),
}

impl LimitHit {
    /// The log's rule text for this limit.
    pub fn rule(&self) -> String {
        match self {
            Self::Connections(n) => format!("limit: max_connections = {n}"),
            Self::Bytes(n) => format!("limit: max_total_bytes = {n}"),
            Self::Rate(n) => format!("limit: max_new_connections_per_sec = {n}"),
        }
    }
}

impl fmt::Display for LimitHit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.rule())
    }
}

/// The counters of one sandbox.
#[derive(Debug)]
pub struct Limiter {
    limits: Limits,
    active: AtomicUsize,
    bytes: AtomicU64,
    exhausted: std::sync::atomic::AtomicBool,
    bucket: Mutex<(f64, Instant)>,
}

/// One admitted connection; dropping it frees the slot.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<Limiter>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limiter.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Limiter {
    /// Counters for `limits`.
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            active: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
            exhausted: std::sync::atomic::AtomicBool::new(false),
            bucket: Mutex::new((
                f64::from(limits.max_new_connections_per_sec),
                Instant::now(),
            )),
        })
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Admits one more concurrent connection.
    pub fn admit(self: &Arc<Self>) -> Result<Permit, LimitHit> {
        let max = self.limits.max_connections;
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| LimitHit::Connections(max))?;
        Ok(Permit {
            limiter: self.clone(),
        })
    }

    /// Connections admitted now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Takes a token for one new upstream connection.
    pub fn new_connection(&self) -> Result<(), LimitHit> {
        let rate = self.limits.max_new_connections_per_sec;
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(b.1).as_secs_f64() * f64::from(rate);
        b.0 = (b.0 + refill).min(f64::from(rate));
        b.1 = now;
        if b.0 >= 1.0 {
            b.0 -= 1.0;
            Ok(())
        } else {
            Err(LimitHit::Rate(rate))
        }
    }

    /// Charges `n` bytes against the budget; fails (charging nothing) when that would exceed it.
    pub fn charge(&self, n: u64) -> Result<(), LimitHit> {
        match self.limits.max_total_bytes {
            None => {
                self.bytes.fetch_add(n, Ordering::AcqRel);
                Ok(())
            }
            Some(max) => self
                .bytes
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                    b.checked_add(n).filter(|&t| t <= max)
                })
                .map(|_| ())
                .map_err(|_| {
                    self.exhausted.store(true, Ordering::Release);
                    LimitHit::Bytes(max)
                }),
        }
    }

    /// Fails when the byte budget is used up (or a transfer was already cut by it) (no new connection is opened then).
    pub fn check_budget(&self) -> Result<(), LimitHit> {
        match self.limits.max_total_bytes {
            Some(max) if self.bytes() >= max || self.exhausted.load(Ordering::Acquire) => {
                Err(LimitHit::Bytes(max))
            }
            _ => Ok(()),
        }
    }

    /// Bytes charged so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_bytes_rate() {
        let l = Limiter::new(Limits {
            max_connections: 2,
            max_total_bytes: Some(10),
            max_new_connections_per_sec: 3,
        });
        let a = l.admit().unwrap();
        let _b = l.admit().unwrap();
        assert_eq!(l.admit().unwrap_err(), LimitHit::Connections(2));
        drop(a);
        assert!(l.admit().is_ok());
        assert!(l.charge(6).is_ok());
        assert!(l.charge(5).is_err());
        assert!(l.charge(4).is_ok());
        assert_eq!(l.bytes(), 10);
        for _ in 0..3 {
            l.new_connection().unwrap();
        }
        assert!(l.new_connection().is_err());
    }
}
