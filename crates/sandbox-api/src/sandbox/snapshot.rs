//! Sandbox snapshots: [`Sandbox::snapshot`], [`Sandbox::restore`], [`Sandbox::fork`] (through
//! a snapshot directory) and [`Sandbox::fork_live`] (live: memory shared copy-on-write, state
//! captured in memory, kiln_vmm::ForkSource).
//! A child of `sandbox` so a restored sandbox is assembled exactly like a booted one.
//!
//! Restore: `Vm::restore_with` rebuilds the VM from the snapshot and, before its vCPUs start,
//! listens on [`kiln_proto::AGENT_PORT`]; the restore sends the guest a vsock
//! TRANSPORT_RESET, so the agent drops its old connection and reconnects at once. We accept
//! it, check its `Hello` as at boot, then send `PostRestore` with the host's wall-clock time
//! and 32 fresh random bytes, so the guest clock is current and forks do not share random
//! streams. See docs/SNAPSHOT.md.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_vmm::snapshot::{RestoreConfig, SnapshotError, SnapshotErrorKind, SnapshotInfo};

use super::*;

/// Random bytes sent to each restored guest to reseed its RNG.
const SEED_BYTES: usize = 32;
/// Most forks one [`Sandbox::fork`] call makes.
pub const MAX_FORKS: usize = 256;

/// The sandbox's error for a failed snapshot operation: the VM is named after the sandbox, so
/// only what failed is kept.
fn snap_err(vm: &str, op: &'static str, source: SnapshotError) -> SandboxError {
    SandboxError::Snapshot {
        vm: vm.to_owned(),
        op,
        source: Box::new(source.into_kind()),
    }
}

/// A unique name for a restored sandbox without one.
fn restored_name() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "kiln-{}-r{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn seed(vm: &str) -> Result<Vec<u8>, SandboxError> {
    let mut seed = vec![0u8; SEED_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(|source| SandboxError::Io {
            vm: vm.to_owned(),
            op: "reading /dev/urandom for the restore seed",
            source,
        })?;
    Ok(seed)
}

/// Checks that `dir` is a directory holding a snapshot's two files (their contents are checked
/// by the restore itself).
fn check_snapshot_files(dir: &Path) -> Result<(), SnapshotErrorKind> {
    let io = |path: &Path, op, source| SnapshotErrorKind::Io {
        path: path.to_owned(),
        op,
        source,
    };
    let meta = std::fs::metadata(dir).map_err(|e| io(dir, "opening the snapshot directory", e))?;
    if !meta.is_dir() {
        return Err(io(
            dir,
            "opening the snapshot directory",
            std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        ));
    }
    let (state, memory) = kiln_vmm::snapshot::paths(dir);
    for file in [state, memory] {
        let meta = std::fs::metadata(&file).map_err(|e| io(&file, "opening", e))?;
        if !meta.is_file() {
            return Err(io(
                &file,
                "opening",
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
            ));
        }
    }
    Ok(())
}

impl Sandbox {
    /// Saves this sandbox's VM to `dir` (created if needed; a snapshot there is replaced).
    /// The VM is paused meanwhile and then continues. Requests in flight while it is paused
    /// just wait; open streams of the guest's agent are not part of the snapshot.
    pub fn snapshot(&self, dir: &Path) -> Result<SnapshotInfo, SandboxError> {
        let guard = self.inner.vm_guard();
        let Some(vm) = guard.as_ref() else {
            return Err(self.inner.died("snapshot", "the VM has stopped".into()));
        };
        let Some(vm) = vm.local() else {
            return Err(self.jailed_unsupported("snapshot"));
        };
        let info = vm
            .snapshot(dir)
            .map_err(|e| snap_err(&self.inner.name, "snapshot", e))?;
        self.exec_defaults()
            .save(dir)
            .map_err(|source| SandboxError::Io {
                vm: self.inner.name.clone(),
                op: "writing the image's exec defaults into the snapshot",
                source,
            })?;
        Ok(info)
    }

    /// Builds a new sandbox from the snapshot in `dir`. From `config` only the name and the
    /// deadlines are used (vCPUs, memory and the guest come from the snapshot). The guest
    /// continues where the snapshot was taken, with its clock set to now and its RNG
    /// reseeded.
    pub fn restore(dir: &Path, config: SandboxConfig) -> Result<Sandbox, SandboxError> {
        let t0 = Instant::now();
        config.validate_for_restore()?;
        let name = config.name.clone().unwrap_or_else(restored_name);
        if config.jail.is_some() {
            return Err(SandboxError::NotSupportedJailed {
                vm: name,
                op: "restore",
            });
        }
        // Input first, then the host: a missing snapshot is reported as such on any host.
        check_snapshot_files(dir).map_err(|kind| SandboxError::Snapshot {
            vm: name.clone(),
            op: "restoring the VM",
            source: Box::new(kind),
        })?;
        let exec_defaults =
            crate::image::SandboxExecDefaults::load(dir).map_err(|source| SandboxError::Io {
                vm: name.clone(),
                op: "reading the snapshot's exec defaults",
                source,
            })?;
        check_host(&name)?;
        let (vm, listener) = Vm::restore_with(dir, restore_config(&name), listen_agent)
            .map_err(|e| snap_err(&name, "restoring the VM", e))?;
        finish_restore(vm, listener, name, t0, &config, exec_defaults)
    }

    /// `n` new sandboxes forked live from this one as it is now: its VM is paused for the
    /// capture of its vCPU and device state (in memory, no file) and the freezing of its
    /// guest memory into a copy-on-write base (no copy), then resumed; each child maps that
    /// memory `MAP_PRIVATE`, gets a vsock TRANSPORT_RESET, its agent reconnects, and it gets
    /// `PostRestore` (clock and RNG refreshed) as after a restore. Writes in a child are
    /// invisible to the others and to this sandbox. Deadlines are `config`'s; names are
    /// `<this name>-fork<i>`. Refused (typed `SnapshotErrorKind::ReadWriteDisk`) if the VM has
    /// a read-write disk. [`Sandbox::fork_with`] is the snapshot-directory fork.
    pub fn fork_live_with(
        &self,
        n: usize,
        config: SandboxConfig,
    ) -> Result<Vec<Sandbox>, SandboxError> {
        if n == 0 || n > MAX_FORKS {
            return Err(SandboxError::InvalidArgument {
                vm: self.inner.name.clone(),
                op: "fork",
                message: format!("fork count {n} is not in 1..={MAX_FORKS}"),
            });
        }
        config.validate_for_restore()?;
        let source = {
            let guard = self.inner.vm_guard();
            let Some(vm) = guard.as_ref() else {
                return Err(self.inner.died("fork", "the VM has stopped".into()));
            };
            let Some(vm) = vm.local() else {
                return Err(self.jailed_unsupported("fork"));
            };
            vm.fork_source()
                .map_err(|e| snap_err(&self.inner.name, "forking the VM", e))?
        };
        // All VMs first (their agents reconnect in parallel), then each agent's handshake.
        let mut started = Vec::with_capacity(n);
        for i in 0..n {
            let t0 = Instant::now();
            let name = format!("{}-fork{i}", self.inner.name);
            let (vm, listener) = source
                .spawn_with(restore_config(&name), listen_agent)
                .map_err(|e| snap_err(&name, "starting a forked VM", e))?;
            started.push((vm, listener, name, t0));
        }
        let mut forks = Vec::with_capacity(n);
        // Children run the parent's image: they keep its exec defaults.
        let defaults = self.exec_defaults();
        for (vm, listener, name, t0) in started {
            forks.push(finish_restore(
                vm,
                listener,
                name,
                t0,
                &config,
                Some(defaults.clone()),
            )?);
        }
        Ok(forks)
    }

    /// [`Sandbox::fork_live_with`] with the default deadlines.
    pub fn fork_live(&self, n: usize) -> Result<Vec<Sandbox>, SandboxError> {
        self.fork_live_with(n, SandboxConfig::default())
    }
}

/// How a restored or forked sandbox's VM is set up.
fn restore_config(name: &str) -> RestoreConfig {
    let mut rc = RestoreConfig::new(name.to_owned());
    rc.serial_ring_bytes = SERIAL_RING_BYTES;
    rc.vsock_cid = Some(GUEST_CID);
    rc
}

/// Listens on the agent port of a restored or forked VM before its vCPUs start.
fn listen_agent(vm: &Vm) -> Result<kiln_vmm::virtio::vsock::VsockListener, SnapshotErrorKind> {
    vm.vsock()
        .ok_or_else(|| SnapshotErrorKind::Device {
            device: "virtio-vsock",
            what: "the snapshot has no vsock device".into(),
        })?
        .listen(kiln_proto::AGENT_PORT)
        .map_err(SnapshotErrorKind::device_restore::<
            kiln_vmm::virtio::vsock::VsockError,
        >("virtio-vsock"))
}

/// Accepts the reconnecting agent of a restored or forked VM, checks its `Hello` and sends
/// `PostRestore` (wall clock + fresh RNG seed).
fn finish_restore(
    vm: Vm,
    listener: kiln_vmm::virtio::vsock::VsockListener,
    name: String,
    t0: Instant,
    config: &SandboxConfig,
    exec_defaults: Option<crate::image::SandboxExecDefaults>,
) -> Result<Sandbox, SandboxError> {
    let vm_start = t0.elapsed();
    {
        let sandbox = connect_agent(
            vm,
            listener,
            name,
            t0,
            vm_start,
            super::Deadlines {
                boot: config.boot_timeout,
                request: config.request_timeout,
                consumer: config.consumer_deadline,
            },
        )?;
        sandbox.set_exec_defaults(exec_defaults.unwrap_or_default());
        let ready = sandbox.inner.timings.ready;
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or_default();
        sandbox
            .inner
            .client
            .post_restore(now_ns, seed(&sandbox.inner.name)?)
            .map_err(|e| sandbox.inner.error("post-restore", e))?;
        // Egress is host config: this restore call's settings, a fresh proxy and CA.
        crate::egress::attach(&sandbox, config.egress.as_ref())?;
        tracing::debug!(vm = %sandbox.inner.name, ?vm_start, ?ready, "sandbox restored");
        Ok(sandbox)
    }
}

impl Sandbox {
    /// `n` new sandboxes, each a copy of this one as it is now (snapshot + `n` restores).
    /// They share the snapshot's memory copy-on-write; a change in one is invisible to the
    /// others and to this sandbox, which keeps running. Deadlines are `config`'s; names are
    /// `<this name>-fork<i>`.
    pub fn fork_with(&self, n: usize, config: SandboxConfig) -> Result<Vec<Sandbox>, SandboxError> {
        if n == 0 || n > MAX_FORKS {
            return Err(SandboxError::InvalidArgument {
                vm: self.inner.name.clone(),
                op: "fork",
                message: format!("fork count {n} is not in 1..={MAX_FORKS}"),
            });
        }
        static N: AtomicU64 = AtomicU64::new(0);
        let dir: PathBuf = std::env::temp_dir().join(format!(
            "kiln-fork-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let res = (|| {
            self.snapshot(&dir)?;
            let mut forks = Vec::with_capacity(n);
            for i in 0..n {
                let mut c = config.clone();
                c.name = Some(format!("{}-fork{i}", self.inner.name));
                forks.push(Sandbox::restore(&dir, c)?);
            }
            Ok(forks)
        })();
        // The forks map the memory file; unlinking it keeps their mappings alive.
        let _ = std::fs::remove_dir_all(&dir);
        res
    }

    /// [`Sandbox::fork_with`] with the default deadlines.
    pub fn fork(&self, n: usize) -> Result<Vec<Sandbox>, SandboxError> {
        self.fork_with(n, SandboxConfig::default())
    }
}

/// The pristine snapshot of a [`crate::SandboxPool`] in `ResetMode::Restore`: taken of the
/// pool's first sandbox right after it booted (before any user touched it); every later
/// sandbox of the pool is restored from it. The directory is removed when this is dropped
/// (restored sandboxes keep their memory mapped).
#[derive(Debug)]
pub(crate) struct PristineSnapshot {
    dir: PathBuf,
}

impl Drop for PristineSnapshot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A sandbox for a restore-mode pool: restored from `slot`'s snapshot, or — the first time —
/// booted from `config` and snapshotted into a new pristine snapshot (the lock is held
/// meanwhile, so concurrent callers restore from it instead of booting too).
pub(crate) fn pooled_sandbox(
    slot: &Mutex<Option<PristineSnapshot>>,
    config: SandboxConfig,
) -> Result<Sandbox, SandboxError> {
    let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = guard.as_ref() {
        let dir = p.dir.clone();
        drop(guard);
        return Sandbox::restore(&dir, config);
    }
    let sandbox = Sandbox::create(config)?;
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "kiln-pool-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let pristine = PristineSnapshot { dir };
    sandbox.snapshot(&pristine.dir)?;
    tracing::debug!(vm = sandbox.name(), dir = %pristine.dir.display(), "sandbox pool: pristine snapshot taken");
    *guard = Some(pristine);
    Ok(sandbox)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigError;

    #[test]
    fn a_missing_or_incomplete_snapshot_is_refused_before_the_host_check() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        // Whatever this host is (no KVM, kvm-pvm, hardware), the input is reported.
        let e = Sandbox::restore(&missing, SandboxConfig::new()).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, SandboxError::Snapshot { .. }), "{msg}");
        assert!(msg.contains(&missing.display().to_string()), "{msg}");
        assert!(msg.contains("snapshot directory"), "{msg}");

        // A directory without the memory file names that file.
        let (state, memory) = kiln_vmm::snapshot::paths(dir.path());
        std::fs::write(&state, b"x").unwrap();
        let e = check_snapshot_files(dir.path()).unwrap_err();
        assert!(e.to_string().contains(&memory.display().to_string()), "{e}");
        // A file given as the directory.
        let e = check_snapshot_files(&state).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        std::fs::write(&memory, b"").unwrap();
        check_snapshot_files(dir.path()).unwrap();
    }

    #[test]
    fn restore_validates_its_configuration_first() {
        // A zero deadline is refused at once (not by failing requests early), before the
        // snapshot is even looked at.
        let e = Sandbox::restore(
            Path::new("/nonexistent"),
            SandboxConfig::new().consumer_deadline(Duration::ZERO),
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                SandboxError::Config(ConfigError::Invalid {
                    field: "consumer_deadline",
                    ..
                })
            ),
            "{e}"
        );
    }
}
