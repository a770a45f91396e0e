//! [`JailConfig`]: who the jailed VMM process runs as and what it may use (cgroup v2 limits,
//! rlimits). Serialisable: the parent sends it to the child in the `Start` frame.

use serde::{Deserialize, Serialize};

/// Default unprivileged uid/gid of the jailed VMM (`nobody` / `nogroup` on Debian).
pub const DEFAULT_ID: u32 = 65534;

/// `cpu.max`: at most `quota_us` of CPU time every `period_us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuMax {
    /// CPU time per period, microseconds.
    pub quota_us: u64,
    /// The period, microseconds (cgroup v2 accepts 1000..=1000000).
    pub period_us: u64,
}

/// The cgroup v2 limits of the VMM process (`None`: the file is left at `max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CgroupLimits {
    /// `memory.max` in bytes (guest RAM + VMM overhead: leave room above the guest's size).
    pub memory_max: Option<u64>,
    /// `pids.max`: tasks (threads count) in the cgroup.
    pub pids_max: Option<u64>,
    /// `cpu.max`.
    pub cpu_max: Option<CpuMax>,
}

/// Resource limits (`setrlimit`, soft = hard) of the VMM process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimits {
    /// `RLIMIT_NOFILE`: open files (eventfds, KVM fds, bridged connections).
    pub nofile: u64,
    /// `RLIMIT_FSIZE`: largest file the process may write or extend, bytes (`None`: unchanged).
    pub fsize: Option<u64>,
    /// `RLIMIT_NPROC`: processes/threads of the jail's uid, counted system-wide by the
    /// kernel (sandboxes sharing a uid share it).
    pub nproc: u64,
}

impl Default for Rlimits {
    fn default() -> Self {
        Rlimits {
            nofile: 1024,
            fsize: None,
            nproc: 1024,
        }
    }
}

/// How a VM is jailed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailConfig {
    /// The uid the VMM runs as (not 0).
    pub uid: u32,
    /// The gid the VMM runs as (not 0); supplementary groups are cleared.
    pub gid: u32,
    /// cgroup v2 limits.
    pub cgroup: CgroupLimits,
    /// rlimits.
    pub rlimits: Rlimits,
    /// Require the cgroup: fail instead of warning when cgroup v2 (with the `memory`,
    /// `pids` and `cpu` controllers a limit needs) is not usable.
    pub require_cgroup: bool,
}

impl Default for JailConfig {
    fn default() -> Self {
        JailConfig {
            uid: DEFAULT_ID,
            gid: DEFAULT_ID,
            cgroup: CgroupLimits::default(),
            rlimits: Rlimits::default(),
            require_cgroup: false,
        }
    }
}

impl JailConfig {
    /// Checks the values; the message says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.uid == 0 || self.gid == 0 {
            return Err("the jail's uid and gid must not be 0 (root)".into());
        }
        if self.rlimits.nofile < 64 {
            return Err(format!(
                "rlimits.nofile {} is below the VMM's minimum of 64",
                self.rlimits.nofile
            ));
        }
        if self.rlimits.nproc < 16 {
            return Err(format!(
                "rlimits.nproc {} is below the VMM's minimum of 16",
                self.rlimits.nproc
            ));
        }
        if let Some(c) = self.cgroup.cpu_max {
            if !(1000..=1_000_000).contains(&c.period_us) || c.quota_us < 1000 {
                return Err(format!(
                    "cpu_max {}/{}: the period must be 1000..=1000000 us and the quota >= 1000 us",
                    c.quota_us, c.period_us
                ));
            }
        }
        if self.cgroup.pids_max.is_some_and(|p| p < 16) {
            return Err("cgroup.pids_max must be at least 16".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_tiny_limits_are_refused() {
        assert!(JailConfig::default().validate().is_ok());
        let root = JailConfig {
            uid: 0,
            ..JailConfig::default()
        };
        assert!(root.validate().is_err());
        let mut c = JailConfig::default();
        c.rlimits.nofile = 3;
        assert!(c.validate().is_err());
        let mut c = JailConfig::default();
        c.cgroup.cpu_max = Some(CpuMax {
            quota_us: 50_000,
            period_us: 10,
        });
        assert!(c.validate().is_err());
    }
}
