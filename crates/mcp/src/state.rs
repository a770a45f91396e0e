//! The sandboxes the MCP server owns ([`Sandboxes`]): in-process `kiln::Sandbox`es by MCP id,
//! at most `max_sandboxes` live or booting at once, each with a deadline after which the
//! reaper kills it, and all killed when the server ends. Every method that touches a VM
//! blocks: the tool layer calls them on `spawn_blocking`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln::{Sandbox, SandboxConfig, SandboxError};

use crate::error::ToolError;

/// The server's settings (`kiln mcp` flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McpConfig {
    /// Image of `create_sandbox` without `image` (`None`: the bare Kiln guest, busybox only).
    pub default_image: Option<String>,
    /// Guest RAM of `create_sandbox` without `memory_mib`.
    pub memory_mib: u32,
    /// vCPUs of every sandbox.
    pub vcpus: u32,
    /// Most sandboxes live (or booting) at once.
    pub max_sandboxes: usize,
    /// Lifetime of a sandbox without `timeout_secs`.
    pub sandbox_timeout: Duration,
    /// VM start to the agent's handshake.
    pub boot_timeout: Duration,
}

/// Default `--max-sandboxes`.
pub const DEFAULT_MAX_SANDBOXES: usize = 4;
/// Default guest RAM.
pub const DEFAULT_MEMORY_MIB: u32 = 512;
/// Default sandbox lifetime.
pub const DEFAULT_SANDBOX_TIMEOUT: Duration = Duration::from_secs(3600);
/// Longest sandbox lifetime a client may ask for.
pub const MAX_SANDBOX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

impl Default for McpConfig {
    fn default() -> Self {
        Self {
            default_image: None,
            memory_mib: DEFAULT_MEMORY_MIB,
            vcpus: 1,
            max_sandboxes: DEFAULT_MAX_SANDBOXES,
            sandbox_timeout: DEFAULT_SANDBOX_TIMEOUT,
            boot_timeout: Duration::from_secs(60),
        }
    }
}

/// What `create_sandbox` asks for, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateSpec {
    /// Image name, reference or path (`None`: bare guest).
    pub image: Option<String>,
    /// Guest RAM.
    pub memory_mib: u32,
    /// Lifetime.
    pub timeout: Duration,
}

/// One live sandbox. The VM sits behind a lock so that `kill` can drop it while a command
/// still streams from it (that command then ends with an error).
#[derive(Debug)]
pub struct Entry {
    /// MCP id (`sb-N`).
    pub id: String,
    /// The image it booted (`None`: bare guest).
    pub image: Option<String>,
    /// Guest RAM.
    pub memory_mib: u32,
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
    deadline: Mutex<Instant>,
    sb: RwLock<Option<Sandbox>>,
}

impl Entry {
    /// Runs `f` on the sandbox (under a read lock: keep `f` short; stream long work).
    pub fn with<T>(
        &self,
        f: impl FnOnce(&Sandbox) -> Result<T, SandboxError>,
    ) -> Result<T, ToolError> {
        let g = self.sb.read().unwrap_or_else(|p| p.into_inner());
        match g.as_ref() {
            Some(sb) => f(sb).map_err(|source| ToolError::Sandbox {
                id: self.id.clone(),
                source: Box::new(source),
            }),
            None => Err(ToolError::UnknownSandbox {
                id: self.id.clone(),
                hint: "it was killed".into(),
            }),
        }
    }

    /// Whether the VM still runs.
    pub fn is_running(&self) -> bool {
        self.sb
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|sb| sb.is_running())
    }

    /// Seconds until the reaper kills it.
    pub fn expires_in(&self) -> Duration {
        lock(&self.deadline).saturating_duration_since(Instant::now())
    }

    /// Stops the VM now (idempotent; never waits on the guest).
    fn kill(&self) {
        let sb = self.sb.write().unwrap_or_else(|p| p.into_inner()).take();
        drop(sb);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Default)]
struct Inner {
    live: BTreeMap<u64, Arc<Entry>>,
    /// Creates that hold a slot but have not finished booting.
    booting: usize,
    /// Set by `kill_all`: no more creates.
    closed: bool,
}

/// The sandbox registry.
#[derive(Debug)]
pub struct Sandboxes {
    config: McpConfig,
    next: AtomicU64,
    inner: Mutex<Inner>,
}

/// A reserved slot; released on drop unless the create registered its sandbox.
#[derive(Debug)]
pub struct Slot<'a> {
    owner: &'a Sandboxes,
    n: u64,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut g = lock(&self.owner.inner);
        g.booting = g.booting.saturating_sub(1);
    }
}

impl Slot<'_> {
    /// The id this slot's sandbox gets.
    pub fn id(&self) -> String {
        format!("sb-{}", self.n)
    }
}

/// Parses an MCP id `sb-N`.
pub fn parse_id(id: &str) -> Option<u64> {
    let n: u64 = id.strip_prefix("sb-")?.parse().ok()?;
    // One spelling per id: no sign, no leading zeros.
    (format!("sb-{n}") == id).then_some(n)
}

impl Sandboxes {
    /// An empty registry.
    pub fn new(config: McpConfig) -> Self {
        Self {
            config,
            next: AtomicU64::new(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The settings.
    pub fn config(&self) -> &McpConfig {
        &self.config
    }

    /// Takes a slot under the bound, or says why not.
    pub fn reserve(&self) -> Result<Slot<'_>, ToolError> {
        let mut g = lock(&self.inner);
        if g.closed {
            return Err(ToolError::Internal("the server is shutting down".into()));
        }
        let live = g.live.len() + g.booting;
        if live >= self.config.max_sandboxes {
            return Err(ToolError::TooManySandboxes {
                live,
                max: self.config.max_sandboxes,
            });
        }
        g.booting += 1;
        Ok(Slot {
            owner: self,
            n: self.next.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// The library configuration of a create.
    pub fn sandbox_config(&self, slot_n: u64, spec: &CreateSpec) -> SandboxConfig {
        let mut cfg = SandboxConfig::new()
            .name(format!("kiln-mcp-{}-{slot_n}", std::process::id()))
            .vcpus(self.config.vcpus)
            .memory_mib(spec.memory_mib)
            .boot_timeout(self.config.boot_timeout);
        if let Some(image) = &spec.image {
            cfg = cfg.image(image);
        }
        cfg
    }

    /// Boots a sandbox (blocks for the boot) and registers it.
    pub fn create(&self, spec: &CreateSpec) -> Result<Arc<Entry>, ToolError> {
        let slot = self.reserve()?;
        let id = slot.id();
        let sb = Sandbox::create(self.sandbox_config(slot.n, spec)).map_err(|source| {
            ToolError::Sandbox {
                id: id.clone(),
                source: Box::new(source),
            }
        })?;
        let entry = Arc::new(Entry {
            id,
            image: spec.image.clone(),
            memory_mib: spec.memory_mib,
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            deadline: Mutex::new(Instant::now() + spec.timeout),
            sb: RwLock::new(Some(sb)),
        });
        self.register(slot, Arc::clone(&entry));
        Ok(entry)
    }

    /// Adds a booted sandbox under its slot (the slot's booting count moves to live). A
    /// registry closed meanwhile kills it instead.
    fn register(&self, slot: Slot<'_>, entry: Arc<Entry>) {
        let mut g = lock(&self.inner);
        if g.closed {
            drop(g);
            entry.kill();
            return;
        }
        g.live.insert(slot.n, entry);
        // The slot's drop decrements `booting`; the sandbox now counts as live.
        drop(g);
        drop(slot);
    }

    /// The live sandbox `id`.
    pub fn get(&self, id: &str) -> Result<Arc<Entry>, ToolError> {
        let g = lock(&self.inner);
        parse_id(id)
            .and_then(|n| g.live.get(&n).cloned())
            .ok_or_else(|| ToolError::UnknownSandbox {
                id: id.to_string(),
                hint: hint(&g),
            })
    }

    /// Removes and kills `id`.
    pub fn kill(&self, id: &str) -> Result<Arc<Entry>, ToolError> {
        let e = {
            let mut g = lock(&self.inner);
            let found = parse_id(id).and_then(|n| g.live.remove(&n));
            match found {
                Some(e) => e,
                None => {
                    return Err(ToolError::UnknownSandbox {
                        id: id.to_string(),
                        hint: hint(&g),
                    })
                }
            }
        };
        e.kill();
        Ok(e)
    }

    /// The live sandboxes, oldest first.
    pub fn list(&self) -> Vec<Arc<Entry>> {
        lock(&self.inner).live.values().cloned().collect()
    }

    /// Sets `id`'s lifetime to `timeout` from now.
    pub fn set_timeout(&self, id: &str, timeout: Duration) -> Result<(), ToolError> {
        let e = self.get(id)?;
        *lock(&e.deadline) = Instant::now() + timeout;
        Ok(())
    }

    /// Kills the sandboxes past their deadline or whose VM ended; returns their ids.
    pub fn reap(&self) -> Vec<String> {
        let now = Instant::now();
        let gone: Vec<Arc<Entry>> = {
            let mut g = lock(&self.inner);
            let ids: Vec<u64> = g
                .live
                .iter()
                .filter(|(_, e)| *lock(&e.deadline) <= now || !e.is_running())
                .map(|(n, _)| *n)
                .collect();
            ids.iter().filter_map(|n| g.live.remove(n)).collect()
        };
        for e in &gone {
            tracing::info!(id = %e.id, "sandbox expired or its VM ended; killed");
            e.kill();
        }
        gone.iter().map(|e| e.id.clone()).collect()
    }

    /// Kills every sandbox and refuses new ones (server exit).
    pub fn kill_all(&self) {
        let all: Vec<Arc<Entry>> = {
            let mut g = lock(&self.inner);
            g.closed = true;
            std::mem::take(&mut g.live).into_values().collect()
        };
        for e in all {
            e.kill();
        }
    }
}

fn hint(g: &Inner) -> String {
    if g.live.is_empty() {
        "no sandbox is live; create one with create_sandbox".into()
    } else {
        let ids: Vec<String> = g.live.keys().map(|n| format!("sb-{n}")).collect();
        format!("live sandboxes: {}", ids.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(max: usize) -> Sandboxes {
        Sandboxes::new(McpConfig {
            max_sandboxes: max,
            ..McpConfig::default()
        })
    }

    #[test]
    fn ids_parse_strictly() {
        assert_eq!(parse_id("sb-1"), Some(1));
        assert_eq!(parse_id("sb-42"), Some(42));
        for bad in [
            "", "sb-", "sb-x", "1", "sb--1", "sb-+1", "sb-01", "SB-1", " sb-1",
        ] {
            assert_eq!(parse_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_bound_counts_booting_sandboxes() {
        let r = registry(2);
        let a = r.reserve().unwrap();
        let b = r.reserve().unwrap();
        assert_ne!(a.id(), b.id());
        match r.reserve() {
            Err(ToolError::TooManySandboxes { live: 2, max: 2 }) => {}
            other => panic!("{other:?}"),
        }
        // A failed boot gives its slot back.
        drop(a);
        let c = r.reserve().unwrap();
        assert_eq!(c.id(), "sb-3");
        drop((b, c));
        r.kill_all();
        assert!(matches!(r.reserve(), Err(ToolError::Internal(_))));
    }

    #[test]
    fn unknown_ids_name_the_live_ones() {
        let r = registry(2);
        let e = r.get("sb-7").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown sandbox id \"sb-7\": no sandbox is live; create one with create_sandbox"
        );
        assert!(matches!(
            r.kill("nope"),
            Err(ToolError::UnknownSandbox { .. })
        ));
        assert!(r.set_timeout("sb-1", Duration::from_secs(1)).is_err());
        assert!(r.list().is_empty());
        assert!(r.reap().is_empty());
    }

    #[test]
    fn sandbox_config_uses_the_spec() {
        let r = Sandboxes::new(McpConfig {
            boot_timeout: Duration::from_secs(180),
            ..McpConfig::default()
        });
        let cfg = r.sandbox_config(
            3,
            &CreateSpec {
                image: Some("python".into()),
                memory_mib: 256,
                timeout: Duration::from_secs(5),
            },
        );
        assert_eq!(cfg.memory_mib, 256);
        assert_eq!(cfg.image.as_deref(), Some("python"));
        assert_eq!(cfg.boot_timeout, Duration::from_secs(180));
        assert!(cfg.name.as_deref().is_some_and(|n| n.ends_with("-3")));
    }
}
