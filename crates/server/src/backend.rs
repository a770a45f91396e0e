//! What the server needs from a sandbox, as traits ([`Launcher`], [`Guest`], [`Process`]),
//! and their implementation over the `kiln` library ([`KilnLauncher`]). Every method blocks:
//! the HTTP layer calls them on `spawn_blocking` or dedicated threads. The unit tests of the
//! HTTP layer use a fake implementation; everything real goes through `kiln::Sandbox`.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use kiln::{ErrorKind, ExecEvent, ExecOptions, FileKind, Sandbox, SandboxConfig, SandboxError};

use crate::config::TemplateConfig;

/// Category of a backend failure; the HTTP layer maps it to E2B's statuses and codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailKind {
    /// No such file, directory or process.
    NotFound,
    /// Already exists.
    AlreadyExists,
    /// Bad path, bad cwd, not a directory, is a directory...
    InvalidArgument,
    /// Permission denied in the guest.
    PermissionDenied,
    /// The VM or its agent is gone.
    Dead,
    /// A request timed out while the VM still runs.
    Timeout,
    /// The backend cannot do this (e.g. snapshots of a fake).
    Unsupported,
    /// Anything else.
    Other,
}

/// A backend failure: kind + message (the `kiln` error's text).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Fail {
    /// Category.
    pub kind: FailKind,
    /// Message.
    pub message: String,
}

impl Fail {
    /// A new failure.
    pub fn new(kind: FailKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl From<SandboxError> for Fail {
    fn from(e: SandboxError) -> Self {
        let kind = if e.is_guest_death() {
            FailKind::Dead
        } else {
            match &e {
                SandboxError::Timeout { .. } => FailKind::Timeout,
                SandboxError::ExecFailed { kind, .. } | SandboxError::Guest { kind, .. } => {
                    match kind {
                        ErrorKind::NotFound => FailKind::NotFound,
                        ErrorKind::AlreadyExists => FailKind::AlreadyExists,
                        ErrorKind::PermissionDenied => FailKind::PermissionDenied,
                        ErrorKind::InvalidRequest
                        | ErrorKind::NotADirectory
                        | ErrorKind::IsADirectory
                        | ErrorKind::DirectoryNotEmpty
                        | ErrorKind::ExecFailed
                        | ErrorKind::TooLarge => FailKind::InvalidArgument,
                        _ => FailKind::Other,
                    }
                }
                SandboxError::InvalidArgument { .. } => FailKind::InvalidArgument,
                _ => FailKind::Other,
            }
        };
        // The message without the serial tail: it goes to clients.
        let message = e.to_string();
        let message = match message.find("\n--- last serial console output") {
            Some(i) => message[..i].to_string(),
            None => message,
        };
        Fail { kind, message }
    }
}

/// What to run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecSpec {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Environment, in order (later wins).
    pub env: Vec<(String, String)>,
    /// Working directory (absolute).
    pub cwd: Option<String>,
    /// Guest user (`None` = root).
    pub user: Option<String>,
    /// Kill after this long.
    pub timeout: Option<Duration>,
}

/// Signals a running process from any thread.
pub type Signaller = Box<dyn Fn(i32) -> Result<(), Fail> + Send + Sync>;

/// One running process's event source.
pub trait Process: Send {
    /// The next event (`Started` first, `Exit` last); `Ok(None)` after the exit.
    fn next_event(&mut self) -> Result<Option<ExecEvent>, Fail>;
    /// A signaller (after `Started`); `None` when the process could not start. Must not wait
    /// for events beyond `Started` (it is asked right after that event).
    fn signaller(&mut self) -> Result<Option<Signaller>, Fail>;
}

/// File type and metadata as the server reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Kind.
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Name within its directory.
    pub name: String,
    /// Kind.
    pub kind: FileKind,
    /// Size.
    pub size: u64,
}

/// One running sandbox.
pub trait Guest: Send + Sync {
    /// Starts a process; `stdin` is streamed to it when given (EOF when the reader ends).
    fn start(
        &self,
        spec: &ExecSpec,
        stdin: Option<Box<dyn Read + Send>>,
    ) -> Result<Box<dyn Process>, Fail>;
    /// Stat without following symlinks.
    fn stat(&self, path: &str) -> Result<Stat, Fail>;
    /// Directory listing.
    fn list_dir(&self, path: &str) -> Result<Vec<Entry>, Fail>;
    /// `mkdir -p`.
    fn mkdir(&self, path: &str) -> Result<(), Fail>;
    /// Recursive remove.
    fn remove_all(&self, path: &str) -> Result<(), Fail>;
    /// Rename.
    fn rename(&self, from: &str, to: &str) -> Result<(), Fail>;
    /// Streams a file into `out`; returns its size.
    fn read_file_to(&self, path: &str, out: &mut dyn Write) -> Result<u64, Fail>;
    /// Creates or truncates a file with what `src` yields.
    fn write_file_from(&self, path: &str, src: &mut dyn Read) -> Result<u64, Fail>;
    /// Whether the VM still runs.
    fn is_running(&self) -> bool;
    /// Stops the VM now (idempotent); running processes see their exit or an error.
    fn kill(&self);
    /// Saves the VM to `dir` (it keeps running).
    fn snapshot(&self, _dir: &Path) -> Result<SnapshotMeta, Fail> {
        Err(unsupported("snapshots"))
    }
    /// `n` live forks of the VM as it is now.
    fn fork(&self, _n: usize) -> Result<Vec<Arc<dyn Guest>>, Fail> {
        Err(unsupported("forks"))
    }
    /// The egress proxy's connection log (empty without egress).
    fn egress_log(&self) -> Vec<crate::kiln_v1::EgressLogJson> {
        Vec::new()
    }
}

/// What a snapshot saved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// Guest RAM size.
    pub guest_bytes: u64,
    /// RAM bytes written to the memory file.
    pub written_bytes: u64,
    /// How long the VM was paused.
    pub paused: Duration,
}

fn unsupported(what: &str) -> Fail {
    Fail::new(
        FailKind::Unsupported,
        format!("{what} are not supported by this backend"),
    )
}

/// Makes sandboxes from templates.
pub trait Launcher: Send + Sync {
    /// Boots a sandbox for `template`, named `name`.
    fn launch(&self, name: &str, template: &TemplateConfig) -> Result<Arc<dyn Guest>, Fail>;
    /// Restores a sandbox of `template` from the snapshot in `dir`.
    fn restore(
        &self,
        _name: &str,
        _dir: &Path,
        _template: &TemplateConfig,
    ) -> Result<Arc<dyn Guest>, Fail> {
        Err(unsupported("restores"))
    }
    /// The image store's images.
    fn images(&self) -> Result<Vec<crate::kiln_v1::ImageJson>, Fail> {
        Ok(Vec::new())
    }
}

/// The real launcher: `kiln::Sandbox::create`.
#[derive(Debug, Default)]
pub struct KilnLauncher;

impl KilnLauncher {
    /// The sandbox configuration of a template.
    pub fn sandbox_config(name: &str, t: &TemplateConfig) -> SandboxConfig {
        let mut cfg = SandboxConfig::new()
            .name(name)
            .vcpus(t.vcpus)
            .memory_mib(t.memory_mib)
            .boot_timeout(Duration::from_secs(t.boot_timeout_secs.max(1)));
        if let Some(image) = &t.image {
            cfg = image_config(cfg, image);
        }
        if let Some(allow) = &t.egress_allow {
            // Checked by ServerConfig::validate.
            if let Ok(p) = kiln::Policy::from_rules(allow, &t.egress_deny) {
                cfg = cfg.egress(p);
            }
        }
        cfg
    }
}

/// Applies the template's image (a store name, OCI reference or image path) to the
/// configuration.
fn image_config(cfg: SandboxConfig, image: &str) -> SandboxConfig {
    cfg.image(image)
}

impl Launcher for KilnLauncher {
    fn launch(&self, name: &str, template: &TemplateConfig) -> Result<Arc<dyn Guest>, Fail> {
        let sb = Sandbox::create(Self::sandbox_config(name, template))?;
        Ok(Arc::new(KilnGuest {
            sb: RwLock::new(Some(sb)),
        }))
    }

    fn restore(
        &self,
        name: &str,
        dir: &Path,
        template: &TemplateConfig,
    ) -> Result<Arc<dyn Guest>, Fail> {
        let sb = Sandbox::restore(dir, restore_config(name, template))?;
        Ok(Arc::new(KilnGuest {
            sb: RwLock::new(Some(sb)),
        }))
    }

    fn images(&self) -> Result<Vec<crate::kiln_v1::ImageJson>, Fail> {
        let Ok(dir) = kiln::assets::images_dir() else {
            return Ok(Vec::new());
        };
        if !dir.is_dir() {
            return Ok(Vec::new());
        }
        let store = kiln_image::ImageStore::open(&dir)
            .map_err(|e| Fail::new(FailKind::Other, e.to_string()))?;
        let list = store
            .list()
            .map_err(|e| Fail::new(FailKind::Other, e.to_string()))?;
        Ok(list
            .into_iter()
            .map(|e| crate::kiln_v1::ImageJson {
                size_bytes: e.meta.as_ref().map(|m| m.size),
                name: e.name,
                key: e.key,
                problem: e.problem,
            })
            .collect())
    }
}

/// The restore configuration of a template: its name, boot deadline and egress.
fn restore_config(name: &str, t: &TemplateConfig) -> SandboxConfig {
    let mut cfg = SandboxConfig::new()
        .name(name)
        .boot_timeout(Duration::from_secs(t.boot_timeout_secs.max(1)));
    if let Some(allow) = &t.egress_allow {
        if let Ok(p) = kiln::Policy::from_rules(allow, &t.egress_deny) {
            cfg = cfg.egress(p);
        }
    }
    cfg
}

/// A `kiln::Sandbox` behind a lock so that [`Guest::kill`] can drop it while other handles
/// (process threads) still exist.
struct KilnGuest {
    sb: RwLock<Option<Sandbox>>,
}

impl KilnGuest {
    fn with<T>(&self, f: impl FnOnce(&Sandbox) -> Result<T, SandboxError>) -> Result<T, Fail> {
        let g = kiln_sync_read(&self.sb);
        match g.as_ref() {
            Some(sb) => f(sb).map_err(Fail::from),
            None => Err(Fail::new(FailKind::Dead, "the sandbox was killed")),
        }
    }
}

fn kiln_sync_read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

struct KilnProcess {
    stream: kiln::ExecStream,
    /// Taken when the stream starts (see [`KilnGuest::start`]).
    signaller: Option<kiln::ExecSignaller>,
}

impl Process for KilnProcess {
    fn next_event(&mut self) -> Result<Option<ExecEvent>, Fail> {
        self.stream.next_event().map_err(Fail::from)
    }

    fn signaller(&mut self) -> Result<Option<Signaller>, Fail> {
        let s = self.signaller.take();
        Ok(s.map(|s| Box::new(move |sig: i32| s.signal(sig).map_err(Fail::from)) as Signaller))
    }
}

fn to_stat(s: kiln::FileStat) -> Stat {
    Stat {
        kind: s.kind,
        size: s.size,
        mode: s.mode,
        mtime_ns: s.mtime_ns,
    }
}

impl Guest for KilnGuest {
    fn start(
        &self,
        spec: &ExecSpec,
        stdin: Option<Box<dyn Read + Send>>,
    ) -> Result<Box<dyn Process>, Fail> {
        let mut opts = ExecOptions::new().output_cap(None);
        for (k, v) in &spec.env {
            opts = opts.env(k, v);
        }
        if let Some(c) = &spec.cwd {
            opts = opts.cwd(c);
        }
        if let Some(u) = &spec.user {
            opts = opts.user(u);
        }
        if let Some(t) = spec.timeout {
            opts = opts.timeout(t);
        }
        if let Some(r) = stdin {
            opts.stdin = kiln::StdinSource::Reader(r);
        }
        let mut stream = self.with(|sb| sb.stream_exec_with_options(&spec.argv, opts))?;
        // The signaller now, before any event is read: `ExecStream::signaller` waits for the
        // `Started` event still queued in the stream. Asked after `next_event` has taken
        // that event it would wait for another one until the process exits: a background
        // command then never reported its start (the SDK's `run(background=True)` hung).
        let signaller = stream.signaller().map_err(Fail::from)?;
        Ok(Box::new(KilnProcess { stream, signaller }))
    }

    fn stat(&self, path: &str) -> Result<Stat, Fail> {
        self.with(|sb| sb.stat(path)).map(to_stat)
    }

    fn list_dir(&self, path: &str) -> Result<Vec<Entry>, Fail> {
        let v = self.with(|sb| sb.list_dir(path))?;
        Ok(v.into_iter()
            .map(|e| Entry {
                name: e.name,
                kind: e.kind,
                size: e.size,
            })
            .collect())
    }

    fn mkdir(&self, path: &str) -> Result<(), Fail> {
        self.with(|sb| sb.mkdir(path))
    }

    fn remove_all(&self, path: &str) -> Result<(), Fail> {
        self.with(|sb| sb.remove_all(path))
    }

    fn rename(&self, from: &str, to: &str) -> Result<(), Fail> {
        self.with(|sb| sb.rename(from, to))
    }

    fn read_file_to(&self, path: &str, out: &mut dyn Write) -> Result<u64, Fail> {
        self.with(|sb| sb.read_file_to(path, out))
    }

    fn write_file_from(&self, path: &str, src: &mut dyn Read) -> Result<u64, Fail> {
        self.with(|sb| sb.write_file_from(path, src))
    }

    fn is_running(&self) -> bool {
        kiln_sync_read(&self.sb)
            .as_ref()
            .is_some_and(|sb| sb.is_running())
    }

    fn kill(&self) {
        let sb = self.sb.write().unwrap_or_else(|p| p.into_inner()).take();
        drop(sb);
    }

    fn snapshot(&self, dir: &Path) -> Result<SnapshotMeta, Fail> {
        let info = self.with(|sb| sb.snapshot(dir))?;
        Ok(SnapshotMeta {
            guest_bytes: info.guest_bytes,
            written_bytes: info.written_bytes,
            paused: info.paused_for,
        })
    }

    fn fork(&self, n: usize) -> Result<Vec<Arc<dyn Guest>>, Fail> {
        let forks = self.with(|sb| sb.fork_live(n))?;
        Ok(forks
            .into_iter()
            .map(|sb| {
                Arc::new(KilnGuest {
                    sb: RwLock::new(Some(sb)),
                }) as Arc<dyn Guest>
            })
            .collect())
    }

    fn egress_log(&self) -> Vec<crate::kiln_v1::EgressLogJson> {
        let g = kiln_sync_read(&self.sb);
        let Some(sb) = g.as_ref() else {
            return Vec::new();
        };
        sb.egress_log()
            .into_iter()
            .map(|e| crate::kiln_v1::EgressLogJson {
                time: crate::state::rfc3339(e.time),
                kind: format!("{:?}", e.kind).to_lowercase(),
                name: e.name,
                addr: e.addr.map(|a| a.to_string()),
                port: e.port,
                bytes_up: e.bytes_up,
                bytes_down: e.bytes_down,
                verdict: format!("{:?}", e.verdict).to_lowercase(),
                rule: e.rule,
            })
            .collect()
    }
}
