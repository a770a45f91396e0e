//! The connection log: one entry per guest connection or host request (time, name, address,
//! port, bytes each way, verdict, rule), kept in a bounded ring shared by every clone.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Entries kept by default; older ones are dropped (and counted).
pub const DEFAULT_LOG_CAPACITY: usize = 10_000;

/// How the connection reached the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnKind {
    /// An absolute-form HTTP/1.1 proxy request.
    Http,
    /// A CONNECT tunnel, bytes relayed untouched.
    Connect,
    /// A CONNECT or transparent connection to a secret host, TLS intercepted.
    Intercepted,
    /// A transparent (raw TCP) connection to NAME:PORT.
    Raw,
    /// `http_request` made by the host on the sandbox's behalf.
    HostRequest,
    /// A connection that never named a destination (bad request, limit hit first).
    Invalid,
}

/// Allowed or denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The policy allowed it (it may still have failed later: see `detail`).
    Allowed,
    /// Denied by a rule, a built-in check or a limit.
    Denied,
}

/// One logged connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// When it started.
    pub time: SystemTime,
    /// How it reached the proxy.
    pub kind: ConnKind,
    /// The destination name (or IP literal) as the guest gave it; empty when none.
    pub name: String,
    /// The address connected to (or the one denied), if any.
    pub addr: Option<IpAddr>,
    /// The destination port (0 when none).
    pub port: u16,
    /// Bytes sent towards the destination (guest to upstream).
    pub bytes_up: u64,
    /// Bytes sent back to the guest (upstream to guest).
    pub bytes_down: u64,
    /// The verdict.
    pub verdict: Verdict,
    /// The rule that decided (`allow RULE`, `deny RULE`, `default deny`, `builtin: ..`,
    /// `limit: ..`, `bad request`).
    pub rule: String,
    /// What went wrong after the verdict, or why it was denied.
    pub detail: Option<String>,
}

#[derive(Debug)]
struct Ring {
    entries: VecDeque<LogEntry>,
    capacity: usize,
    dropped: u64,
}

/// The shared, bounded connection log of one sandbox.
#[derive(Debug, Clone)]
pub struct EgressLog {
    ring: Arc<Mutex<Ring>>,
}

impl Default for EgressLog {
    fn default() -> Self {
        Self::new(DEFAULT_LOG_CAPACITY)
    }
}

impl EgressLog {
    /// A log keeping at most `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        Self {
            ring: Arc::new(Mutex::new(Ring {
                entries: VecDeque::new(),
                capacity: capacity.max(1),
                dropped: 0,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends an entry (dropping the oldest when full).
    pub fn push(&self, entry: LogEntry) {
        tracing::debug!(?entry, "egress");
        let mut r = self.lock();
        if r.entries.len() >= r.capacity {
            r.entries.pop_front();
            r.dropped += 1;
        }
        r.entries.push_back(entry);
    }

    /// A copy of the entries, oldest first.
    pub fn entries(&self) -> Vec<LogEntry> {
        self.lock().entries.iter().cloned().collect()
    }

    /// Entries dropped because the log was full.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// Removes and returns the entries.
    pub fn drain(&self) -> Vec<LogEntry> {
        self.lock().entries.drain(..).collect()
    }
}
