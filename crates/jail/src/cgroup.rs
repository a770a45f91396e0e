//! The parent side of the VMM process's cgroup v2: `<cgroup2 mount>/kiln/<vm>-<pid>/` with
//! `memory.max`, `pids.max`, `cpu.max` from [`CgroupLimits`], the child moved into it before
//! it starts the VM; removed when the jailed VM is dropped. When cgroup v2 is not mounted or
//! not writable, or a controller a limit needs is not enabled there, the limit goes to that
//! controller's cgroup v1 hierarchy when the host mounts one (a hybrid layout:
//! `<v1 mount>/kiln/<vm>-<pid>/` with `memory.limit_in_bytes`, `pids.max`,
//! `cpu.cfs_quota_us`/`cpu.cfs_period_us`, the child moved into it too); otherwise the jail
//! runs without that limit and says so in [`Created::warnings`] (and a log line) — unless the
//! configuration requires the cgroup. [`Created::applied`] lists every limit file written.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::CgroupLimits;

/// The directory below the cgroup v2 root that holds every jailed VM's cgroup.
pub const KILN_CGROUP: &str = "kiln";

/// Why the cgroup could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No cgroup v2 hierarchy is mounted.
    #[error("no cgroup v2 hierarchy is mounted (/proc/self/mountinfo has no cgroup2 entry)")]
    NotMounted,
    /// A cgroup file or directory could not be written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A limit was asked for but its controller is not available.
    #[error("cgroup v2 at {path} cannot enforce {missing}: the controller is not enabled there")]
    Controller {
        /// The cgroup.
        path: PathBuf,
        /// e.g. `memory.max`.
        missing: String,
    },
}

/// A created cgroup; dropping it removes the directory (once its processes are gone).
#[derive(Debug)]
pub struct Created {
    /// The cgroup's directory.
    pub path: PathBuf,
    /// Its path as `/proc/<pid>/cgroup` shows it (`0::<this>`).
    pub rel: String,
    /// Limits that could not be applied, and why.
    pub warnings: Vec<String>,
    /// Every limit file written: (file, value), in the v2 cgroup or a v1 fallback.
    pub applied: Vec<(PathBuf, String)>,
    /// cgroup v1 directories made for limits v2 could not enforce (removed on drop).
    pub v1_dirs: Vec<PathBuf>,
}

fn remove_retrying(path: &Path) {
    // The kernel refuses while the last task is still exiting: retry briefly.
    for _ in 0..50 {
        match std::fs::remove_dir(path) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    tracing::warn!(path = %path.display(), "could not remove the jail's cgroup");
}

impl Drop for Created {
    fn drop(&mut self) {
        remove_retrying(&self.path);
        for d in &self.v1_dirs {
            remove_retrying(d);
        }
    }
}

/// The mount point of the cgroup v1 hierarchy that has `controller`, from /proc/self/mountinfo.
pub fn cgroup1_mount(controller: &str) -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let mut post = post.split_whitespace();
        if post.next()? != "cgroup" {
            return None;
        }
        let opts = post.nth(1)?;
        if !opts.split(',').any(|o| o == controller) {
            return None;
        }
        pre.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// The cgroup v1 files (and values, in write order) that carry one v2 limit.
fn v1_files(v2_file: &str, value: &str) -> Option<(&'static str, Vec<(&'static str, String)>)> {
    match v2_file {
        "memory.max" => Some(("memory", vec![("memory.limit_in_bytes", value.to_owned())])),
        "pids.max" => Some(("pids", vec![("pids.max", value.to_owned())])),
        "cpu.max" => {
            let (quota, period) = value.split_once(' ')?;
            Some((
                "cpu",
                vec![
                    ("cpu.cfs_period_us", period.to_owned()),
                    ("cpu.cfs_quota_us", quota.to_owned()),
                ],
            ))
        }
        _ => None,
    }
}

/// Applies one limit v2 cannot enforce in its controller's v1 hierarchy and moves `pid` there;
/// `Ok(None)` when the host mounts no such hierarchy.
fn apply_v1(
    created: &mut Created,
    dir_name: &str,
    pid: u32,
    v2_file: &str,
    value: &str,
) -> Result<Option<()>, CgroupError> {
    let Some((controller, files)) = v1_files(v2_file, value) else {
        return Ok(None);
    };
    let Some(mount) = cgroup1_mount(controller) else {
        return Ok(None);
    };
    let base = mount.join(KILN_CGROUP);
    mkdir_exist_ok(&base)?;
    let dir = base.join(dir_name);
    if !created.v1_dirs.contains(&dir) {
        mkdir_exist_ok(&dir)?;
        created.v1_dirs.push(dir.clone());
    }
    for (file, v) in files {
        let f = dir.join(file);
        write(&f, &v, "writing")?;
        created.applied.push((f, v));
    }
    write(
        &dir.join("cgroup.procs"),
        &pid.to_string(),
        "moving the VMM process into",
    )?;
    Ok(Some(()))
}

/// The cgroup v2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        pre.split_whitespace().nth(4).map(PathBuf::from)
    })
}

fn write(path: &Path, value: &str, what: &'static str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Io {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Creates the directory `path` unless it exists.
fn mkdir_exist_ok(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Io {
            what: "creating",
            path: path.to_owned(),
            source,
        }),
    }
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect()
}

/// Creates `kiln/<name>-<pid>`, applies `limits` and moves `pid` into it.
pub fn create(name: &str, pid: u32, limits: &CgroupLimits) -> Result<Created, CgroupError> {
    let mount = cgroup2_mount().ok_or(CgroupError::NotMounted)?;
    let base = mount.join(KILN_CGROUP);
    mkdir_exist_ok(&base)?;
    // Enable what the limits need on the way down; a controller the host does not offer
    // in v2 stays off (reported below).
    for ctl in ["memory", "pids", "cpu"] {
        let _ = std::fs::write(mount.join("cgroup.subtree_control"), format!("+{ctl}"));
        let _ = std::fs::write(base.join("cgroup.subtree_control"), format!("+{ctl}"));
    }
    let dir_name = format!("{}-{pid}", sanitize(name));
    let path = base.join(&dir_name);
    std::fs::create_dir(&path).map_err(|source| CgroupError::Io {
        what: "creating",
        path: path.clone(),
        source,
    })?;
    let mut created = Created {
        rel: format!("/{KILN_CGROUP}/{dir_name}"),
        path,
        warnings: Vec::new(),
        applied: Vec::new(),
        v1_dirs: Vec::new(),
    };
    let wanted = [
        ("memory.max", limits.memory_max.map(|v| v.to_string())),
        ("pids.max", limits.pids_max.map(|v| v.to_string())),
        (
            "cpu.max",
            limits
                .cpu_max
                .map(|c| format!("{} {}", c.quota_us, c.period_us)),
        ),
    ];
    for (file, value) in wanted {
        let Some(value) = value else { continue };
        let f = created.path.join(file);
        if !f.exists() {
            if apply_v1(&mut created, &dir_name, pid, file, &value)?.is_some() {
                continue;
            }
            created.warnings.push(
                CgroupError::Controller {
                    path: created.path.clone(),
                    missing: file.into(),
                }
                .to_string(),
            );
            continue;
        }
        write(&f, &value, "writing")?;
        created.applied.push((f, value));
    }
    write(
        &created.path.join("cgroup.procs"),
        &pid.to_string(),
        "moving the VMM process into",
    )?;
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_limits_map_to_v1_files() {
        assert_eq!(
            v1_files("cpu.max", "50000 100000"),
            Some((
                "cpu",
                vec![
                    ("cpu.cfs_period_us", "100000".to_owned()),
                    ("cpu.cfs_quota_us", "50000".to_owned())
                ]
            ))
        );
        assert_eq!(
            v1_files("memory.max", "1024"),
            Some(("memory", vec![("memory.limit_in_bytes", "1024".to_owned())]))
        );
        assert_eq!(v1_files("io.max", "x"), None);
    }

    #[test]
    fn names_are_sanitised() {
        assert_eq!(sanitize("a/b c-1_x"), "a_b_c-1_x");
        assert_eq!(sanitize(&"x".repeat(100)).len(), 64);
    }
}
