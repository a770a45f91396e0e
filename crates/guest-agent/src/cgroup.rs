//! Guest-side limits: every exec runs in its own cgroup v2 below the agent's, so a fork bomb
//! or a memory hog kills the command, not the sandbox (guest mode only; host mode has none).
//!
//! Layout (cgroup2 mounted on [`CGROUP_ROOT`] by [`init_guest`]; not in `sys::mount_all`,
//! which a tier-3 agent also runs on the host, where mounting cgroup2 would reapply its
//! mount options to the host's one cgroup2 hierarchy):
//! - the root cgroup holds the agent (PID 1, `oom_score_adj` -1000, nice [`AGENT_NICE`]);
//!   `memory`, `pids` and (when the kernel has it) `cpu` are enabled for its children;
//! - [`EXEC_PARENT`] holds every exec: its `memory.max` is the guest's RAM minus the agent's
//!   reserve ([`reserve_for`]), its `pids.max` the kernel's `threads-max` minus a reserve, so
//!   all execs together can never take the agent's memory or task slots; with the `cpu`
//!   controller all execs together weigh as much as one agent thread, so the agent keeps
//!   answering pings under a CPU storm;
//! - `EXEC_PARENT/exec-<n>` is one exec: `memory.max` / `pids.max` from the request (else the
//!   defaults: the parent's caps, `pids.max` at most [`DEFAULT_PIDS_MAX`]), and
//!   `memory.oom.group` 1 (an OOM kill takes the whole exec). The child moves itself into it
//!   between `fork` and `execve`. On exit `memory.events` (`oom_kill`) and `pids.events`
//!   (`max`) become `ExitStatus::oom_killed` / `pids_limit_hit`, and the cgroup is removed
//!   (or, while a daemonised process still lives in it, removed by a later exec's sweep).

use std::collections::VecDeque;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use kiln_proto::ExecLimits;
use kiln_sync::lock;
use nix::mount::MsFlags;

/// Where PID 1 mounts cgroup2.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The cgroup holding every exec.
pub const EXEC_PARENT: &str = "/sys/fs/cgroup/kiln-exec";
/// Default `pids.max` of one exec (capped by the parent's).
pub const DEFAULT_PIDS_MAX: u64 = 4096;
/// The agent's nice value (its exec children are reset to 0).
pub const AGENT_NICE: i32 = -10;
/// Task slots (`threads-max`) kept for the agent outside every exec.
const PIDS_RESERVE_MIN: u64 = 64;
/// Most lingering (still populated) exec cgroups remembered for a later sweep.
const MAX_LINGERING: usize = 4096;

/// Errors of setting up or using exec cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroups: {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroups: {path} is not a cgroup2 mount")]
    NotMounted { path: &'static str },
    #[error("cgroups: cannot read {what}")]
    Probe { what: &'static str },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io("writing", path))
}

/// The memory the agent keeps for itself out of `total` bytes of guest RAM: an eighth,
/// between 24 and 128 MiB.
pub fn reserve_for(total: u64) -> u64 {
    const MIB: u64 = 1024 * 1024;
    (total / 8).clamp(24 * MIB, 128 * MIB).min(total / 2)
}

/// `MemTotal` of /proc/meminfo text, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The value of `key` in a flat-keyed cgroup file (`memory.events`, `pids.events`).
fn event_count(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The defaults and the parent cgroup of every exec.
#[derive(Debug)]
pub struct Cgroups {
    parent: PathBuf,
    /// `memory.max` of the parent: guest RAM minus the agent's reserve.
    pub memory_max: u64,
    /// `pids.max` of the parent.
    pub pids_max: u64,
    next: AtomicU64,
    lingering: Mutex<VecDeque<PathBuf>>,
}

static CGROUPS: OnceLock<Cgroups> = OnceLock::new();

/// The exec cgroups, once [`init_guest`] succeeded (never in host mode).
pub fn get() -> Option<&'static Cgroups> {
    CGROUPS.get()
}

/// Protect the agent (oom_score_adj -1000, nice [`AGENT_NICE`] for its later threads), mount
/// cgroup2 and set up [`EXEC_PARENT`]. Guest mode (PID 1) only, after `sys::mount_all`. Failures leave execs
/// without cgroups (logged by the caller).
pub fn init_guest() -> Result<&'static Cgroups, CgroupError> {
    let adj = Path::new("/proc/self/oom_score_adj");
    write(adj, "-1000")?;
    // SAFETY: setpriority on the calling thread only changes its scheduling attributes.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, AGENT_NICE) };
    if let Some(c) = CGROUPS.get() {
        return Ok(c);
    }
    let root = Path::new(CGROUP_ROOT);
    if !root.join("cgroup.controllers").exists() {
        let _ = std::fs::create_dir_all(root);
        nix::mount::mount(
            Some("cgroup2"),
            root,
            Some("cgroup2"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(|e| io("mounting cgroup2 on", root)(std::io::Error::from(e)))?;
    }
    if !root.join("cgroup.controllers").exists() {
        return Err(CgroupError::NotMounted { path: CGROUP_ROOT });
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .map_err(io("reading", Path::new("/proc/meminfo")))?;
    let total = mem_total(&meminfo).ok_or(CgroupError::Probe {
        what: "MemTotal in /proc/meminfo",
    })?;
    let memory_max = total.saturating_sub(reserve_for(total));
    let threads_max: u64 = std::fs::read_to_string("/proc/sys/kernel/threads-max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(DEFAULT_PIDS_MAX * 2);
    let pids_max = threads_max
        .saturating_sub((threads_max / 8).max(PIDS_RESERVE_MIN))
        .max(1);

    let parent = PathBuf::from(EXEC_PARENT);
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers"))
        .map_err(io("reading", &root.join("cgroup.controllers")))?;
    let want: Vec<&str> = ["memory", "pids", "cpu"]
        .into_iter()
        .filter(|c| controllers.split_whitespace().any(|have| have == *c))
        .collect();
    for needed in ["memory", "pids"] {
        if !want.contains(&needed) {
            return Err(CgroupError::Probe {
                what: "the memory and pids controllers",
            });
        }
    }
    // One controller per write: `cpu` is optional (the kernel may refuse it, e.g. with
    // realtime tasks about), memory and pids are not.
    let enable = |dir: &Path| -> Result<(), CgroupError> {
        for c in &want {
            let r = write(&dir.join("cgroup.subtree_control"), &format!("+{c}"));
            if *c != "cpu" {
                r?;
            }
        }
        Ok(())
    };
    enable(root)?;
    match std::fs::create_dir(&parent) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("creating", &parent)(e)),
    }
    enable(&parent)?;
    write(&parent.join("memory.max"), &memory_max.to_string())?;
    // Without swap a hog would otherwise only shift to it; ignore kernels without swap.
    let _ = std::fs::write(parent.join("memory.swap.max"), "0");
    write(&parent.join("pids.max"), &pids_max.to_string())?;
    Ok(CGROUPS.get_or_init(|| Cgroups {
        parent,
        memory_max,
        pids_max,
        next: AtomicU64::new(0),
        lingering: Mutex::new(VecDeque::new()),
    }))
}

/// One exec's cgroup.
#[derive(Debug)]
pub struct ExecCgroup {
    path: PathBuf,
    /// [`ExecCgroup::kill`] was called: its processes are on their way out.
    killed: std::cell::Cell<bool>,
    /// `<path>/cgroup.procs`, for the child to write "0" into before `execve`.
    procs: CString,
}

/// What an exec's cgroup counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    pub oom_killed: bool,
    pub pids_limit_hit: bool,
}

impl Cgroups {
    /// Create the cgroup of one exec with `limits` (else the defaults).
    pub fn create(&self, limits: &ExecLimits) -> Result<ExecCgroup, CgroupError> {
        self.sweep();
        let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let path = self.parent.join(format!("exec-{n}"));
        std::fs::create_dir(&path).map_err(io("creating", &path))?;
        let cg = ExecCgroup {
            procs: CString::new(path.join("cgroup.procs").as_os_str().as_bytes()).map_err(
                |_| CgroupError::Probe {
                    what: "a NUL-free cgroup path",
                },
            )?,
            path,
            killed: std::cell::Cell::new(false),
        };
        let set = || -> Result<(), CgroupError> {
            if let Some(m) = limits.memory_max {
                write(&cg.path.join("memory.max"), &m.to_string())?;
            }
            let pids = limits
                .pids_max
                .unwrap_or(DEFAULT_PIDS_MAX.min(self.pids_max));
            write(&cg.path.join("pids.max"), &pids.to_string())?;
            write(&cg.path.join("memory.oom.group"), "1")
        };
        if let Err(e) = set() {
            let _ = std::fs::remove_dir(&cg.path);
            return Err(e);
        }
        Ok(cg)
    }

    /// Remove lingering exec cgroups that emptied since.
    fn sweep(&self) {
        let mut l = lock(&self.lingering);
        l.retain(|p| std::fs::remove_dir(p).is_err() && p.exists());
    }

    fn linger(&self, path: PathBuf) {
        let mut l = lock(&self.lingering);
        if l.len() >= MAX_LINGERING {
            l.pop_front();
        }
        l.push_back(path);
    }
}

impl ExecCgroup {
    /// `cgroup.procs` of this cgroup (NUL-terminated, for the forked child).
    pub fn procs_path(&self) -> &std::ffi::CStr {
        &self.procs
    }

    /// Kill every process in the cgroup (`cgroup.kill`), e.g. on the exec's timeout; also
    /// reaches processes that left the exec's process group.
    pub fn kill(&self) {
        self.killed.set(true);
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
    }

    /// Read what the cgroup counted, then remove it (or leave it to a later sweep while a
    /// daemonised process of the exec still lives in it).
    pub fn finish(self, cgroups: &Cgroups) -> Outcome {
        let read = |f: &str| std::fs::read_to_string(self.path.join(f)).unwrap_or_default();
        let mem = read("memory.events");
        let outcome = Outcome {
            oom_killed: event_count(&mem, "oom_kill") > 0
                || event_count(&mem, "oom_group_kill") > 0,
            pids_limit_hit: event_count(&read("pids.events"), "max") > 0,
        };
        // The leader was reaped; its last exiting threads may need a moment to leave, and
        // after a kill every process of the exec (up to 2 s).
        let tries = if self.killed.get() { 400 } else { 20 };
        for _ in 0..tries {
            if std::fs::remove_dir(&self.path).is_ok() {
                return outcome;
            }
            if !self.killed.get() && event_count(&read("cgroup.events"), "populated") > 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if self.path.exists() {
            cgroups.linger(self.path);
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reserve_is_an_eighth_within_bounds() {
        const MIB: u64 = 1024 * 1024;
        assert_eq!(reserve_for(512 * MIB), 64 * MIB);
        assert_eq!(reserve_for(128 * MIB), 24 * MIB);
        assert_eq!(reserve_for(8192 * MIB), 128 * MIB);
        // Never more than half of a tiny guest.
        assert_eq!(reserve_for(32 * MIB), 16 * MIB);
    }

    #[test]
    fn meminfo_and_events_parse() {
        assert_eq!(
            mem_total("MemTotal:        1000 kB\nMemFree: 5 kB\n"),
            Some(1_024_000)
        );
        assert_eq!(mem_total("MemFree: 5 kB\n"), None);
        let ev = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(event_count(ev, "oom_kill"), 1);
        assert_eq!(event_count(ev, "max"), 12);
        assert_eq!(event_count(ev, "missing"), 0);
        assert_eq!(event_count("populated 1\nfrozen 0\n", "populated"), 1);
    }
}
