//! The server's state: the live sandboxes (id, template, metadata, env vars, deadline, access
//! token, the guest handle) and each sandbox's process table (the processes started through
//! envd's `Start`, their subscribers, stdin and signaller). Also the reaper that kills
//! sandboxes at their deadline and forgets those whose VM died.

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

use crate::backend::{Guest, Launcher, Signaller};
use crate::config::{ServerConfig, TemplateConfig};

/// Locks a mutex, tolerating poison (a panicking holder cannot wedge the server).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An encoded Connect frame sent to one stream subscriber.
pub type Frame = Vec<u8>;

/// What a process was started with (`List` reports it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcConfig {
    /// Program.
    pub cmd: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Request env vars.
    pub envs: BTreeMap<String, String>,
    /// Working directory.
    pub cwd: Option<String>,
}

/// One running process.
pub struct Proc {
    /// Guest pid.
    pub pid: u32,
    /// The client's tag.
    pub tag: Option<String>,
    /// Its configuration.
    pub config: ProcConfig,
    /// Signals it.
    pub signaller: Option<Signaller>,
    /// Its stdin (None: not enabled or closed).
    pub stdin: Mutex<Option<SyncSender<Vec<u8>>>>,
    /// Extra subscribers (`Connect`), fed with `try_send`.
    pub subscribers: Mutex<Vec<mpsc::Sender<Frame>>>,
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proc")
            .field("pid", &self.pid)
            .field("tag", &self.tag)
            .field("config", &self.config)
            .finish()
    }
}

/// One live sandbox.
pub struct SandboxEntry {
    /// Its id (`sandboxID`).
    pub id: String,
    /// Template name.
    pub template_id: String,
    /// The template's settings.
    pub template: TemplateConfig,
    /// Client metadata.
    pub metadata: BTreeMap<String, String>,
    /// Env vars applied to every command.
    pub env_vars: BTreeMap<String, String>,
    /// The envd access token.
    pub access_token: String,
    /// Creation time.
    pub started_at: SystemTime,
    /// Deadline.
    pub end_at: Mutex<SystemTime>,
    /// SHA-256 hex of the API key that made it (the per-key quota counts it).
    pub owner: String,
    /// The VM.
    pub guest: Arc<dyn Guest>,
    /// Running processes by pid.
    pub procs: Mutex<HashMap<u32, Arc<Proc>>>,
}

impl std::fmt::Debug for SandboxEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxEntry")
            .field("id", &self.id)
            .field("template_id", &self.template_id)
            .finish()
    }
}

impl SandboxEntry {
    /// The deadline.
    pub fn end_at(&self) -> SystemTime {
        *lock(&self.end_at)
    }

    /// Sets the deadline to `now + secs`.
    pub fn set_timeout(&self, secs: u64) {
        *lock(&self.end_at) = SystemTime::now() + Duration::from_secs(secs);
    }
}

/// Shared server state.
pub struct AppState {
    /// Configuration.
    pub config: ServerConfig,
    /// Makes sandboxes.
    pub launcher: Arc<dyn Launcher>,
    /// Live sandboxes by id.
    pub sandboxes: Mutex<HashMap<String, Arc<SandboxEntry>>>,
    /// Creates in flight (counted against `max_sandboxes`).
    pub creating: Mutex<usize>,
    /// `/kiln/v1` state: pools, snapshots, metrics.
    pub kiln: crate::kiln_v1::KilnState,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("sandboxes", &lock(&self.sandboxes).len())
            .finish()
    }
}

impl AppState {
    /// New state.
    pub fn new(config: ServerConfig, launcher: Arc<dyn Launcher>) -> Arc<Self> {
        let kiln = crate::kiln_v1::KilnState::new(&config.templates, config.snapshot_dir.clone());
        Arc::new(Self {
            kiln,
            config,
            launcher,
            sandboxes: Mutex::new(HashMap::new()),
            creating: Mutex::new(0),
        })
    }

    /// The live sandbox `id`, if its VM still runs (a dead one is forgotten and killed).
    pub fn get(&self, id: &str) -> Option<Arc<SandboxEntry>> {
        let e = lock(&self.sandboxes).get(id).cloned()?;
        if e.guest.is_running() {
            Some(e)
        } else {
            self.remove(id);
            None
        }
    }

    /// Forgets sandbox `id` and stops its VM (on a blocking thread); true when it existed.
    pub fn remove(&self, id: &str) -> bool {
        let e = lock(&self.sandboxes).remove(id);
        match e {
            Some(e) => {
                self.kiln.watchers.forget_sandbox(id);
                let guest = Arc::clone(&e.guest);
                let _ = std::thread::Builder::new()
                    .name("kiln-serve-kill".into())
                    .spawn(move || guest.kill());
                tracing::info!(sandbox = %id, "sandbox removed");
                true
            }
            None => false,
        }
    }

    /// Every live sandbox, oldest first.
    pub fn list(&self) -> Vec<Arc<SandboxEntry>> {
        let mut v: Vec<_> = lock(&self.sandboxes).values().cloned().collect();
        v.sort_by(|a, b| a.started_at.cmp(&b.started_at).then(a.id.cmp(&b.id)));
        v
    }

    /// Kills sandboxes past their deadline and forgets dead ones; returns how many went.
    pub fn reap(&self) -> usize {
        let now = SystemTime::now();
        let gone: Vec<String> = lock(&self.sandboxes)
            .values()
            .filter(|e| e.end_at() <= now || !e.guest.is_running())
            .map(|e| e.id.clone())
            .collect();
        for id in &gone {
            tracing::info!(sandbox = %id, "sandbox timed out or died");
            self.remove(id);
        }
        gone.len()
    }

    /// Stops every sandbox (server shutdown).
    pub fn shutdown(&self) {
        let all: Vec<_> = lock(&self.sandboxes).drain().map(|(_, e)| e).collect();
        for e in all {
            e.guest.kill();
        }
        self.kiln.shutdown();
    }
}

/// A random hex string of `bytes` random bytes.
pub fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// RFC 3339 UTC with microseconds (`2026-12-03T07:40:45.038404Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    rfc3339_ns(d.as_secs() as i64, d.subsec_nanos())
}

/// RFC 3339 of seconds + nanoseconds since the epoch.
pub fn rfc3339_ns(secs: i64, nanos: u32) -> String {
    let days = secs.div_euclid(86400);
    let sod = secs.rem_euclid(86400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60,
        nanos / 1000
    )
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats() {
        assert_eq!(rfc3339_ns(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339_ns(1_796_283_645, 38_404_000),
            "2026-12-03T07:40:45.038404Z"
        );
        assert_eq!(rfc3339_ns(951_782_400, 0), "2000-02-29T00:00:00.000000Z");
    }

    #[test]
    fn random_hex_is_hex() {
        let a = random_hex(8);
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, random_hex(8));
    }
}
