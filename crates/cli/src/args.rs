//! Arguments several commands share: [`MachineArgs`] (the guest's size, kernel, initramfs and
//! command line, for every command that boots a sandbox) and the value parsers
//! [`parse_secs`] and [`parse_env`].

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use kiln::config::{DEFAULT_MEMORY_MIB, DEFAULT_VCPUS};
use kiln::SandboxConfig;

/// The guest machine: `--vcpus`, `--memory`, `--kernel`, `--initramfs`, `--cmdline`.
#[derive(Debug, Clone, Args)]
pub struct MachineArgs {
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_VCPUS)]
    pub vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT_MEMORY_MIB)]
    pub memory: u32,
    /// Guest kernel (default: $KILN_KERNEL or <assets>/guest/vmlinux).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Guest initramfs (default: $KILN_INITRAMFS or <assets>/guest/initramfs.cpio).
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,
    /// Extra guest kernel command line.
    #[arg(long, value_name = "ARGS")]
    pub cmdline: Option<String>,
}

impl MachineArgs {
    /// `config` with this machine (flags not given keep `config`'s values).
    pub fn apply(self, config: SandboxConfig) -> SandboxConfig {
        let mut config = config.vcpus(self.vcpus).memory_mib(self.memory);
        if self.kernel.is_some() {
            config.kernel = self.kernel;
        }
        if self.initramfs.is_some() {
            config.initramfs = self.initramfs;
        }
        if let Some(c) = self.cmdline {
            config.extra_cmdline = c;
        }
        config
    }
}

/// `kiln run`'s root-filesystem image: `--image NAME|REF|PATH`, `--overlay-size MIB`.
#[derive(Debug, Clone, Args)]
pub struct ImageRunArgs {
    /// Boot this image as the root file system: a name in the image store (`kiln image ls`),
    /// an OCI reference (`localhost:5000/app:1`, pulled first when not stored), or an image
    /// file's path. Without CMD, the image's entrypoint + cmd run.
    #[arg(long, value_name = "NAME|REF|PATH")]
    pub image: Option<String>,
    /// Size of the overlay's tmpfs (the image's writable layer, in guest RAM) in MiB
    /// (default: half the guest memory).
    #[arg(long, value_name = "MIB", requires = "image")]
    pub overlay_size: Option<u32>,
}

impl ImageRunArgs {
    /// `config` with the image (pulled into the store first when it is an OCI reference
    /// that is not there). Errors: kiln's exit code and the message.
    pub fn apply(self, mut config: SandboxConfig) -> Result<SandboxConfig, (i32, String)> {
        let Some(image) = self.image else {
            return Ok(config);
        };
        if !kiln::image::is_path(&image) {
            super::image::ensure_stored(&image)?;
        }
        config.image = Some(image);
        config.overlay_size_mib = self.overlay_size;
        Ok(config)
    }
}

/// Who a command runs as and its guest-side limits: `--user`, `--memory-max`, `--pids-max`.
#[derive(Debug, Clone, Default, Args)]
pub struct LimitArgs {
    /// Run the command as this guest user: a name from the guest's /etc/passwd, UID or
    /// UID:GID (default: root).
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// The command's memory limit in MiB (its cgroup's memory.max in the guest; past it the
    /// guest's OOM killer ends the command). Default: the guest's RAM minus the agent's reserve.
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..=1 << 40))]
    pub memory_max: Option<u64>,
    /// Most processes and threads the command may have at once (its cgroup's pids.max).
    #[arg(long, value_name = "N")]
    pub pids_max: Option<u64>,
}

impl LimitArgs {
    /// `opts` with these settings (flags not given keep `opts`' values).
    pub fn apply(&self, mut opts: kiln::ExecOptions) -> kiln::ExecOptions {
        if let Some(u) = &self.user {
            opts = opts.user(u.clone());
        }
        if let Some(m) = self.memory_max {
            opts = opts.memory_max(m.saturating_mul(1024 * 1024));
        }
        if let Some(p) = self.pids_max {
            opts = opts.pids_max(p);
        }
        opts
    }
}

/// Refuses a command whose program (the first argument after `--`) is an empty string, before
/// anything boots (`kiln run -- ""`). Later arguments may be empty (`sh -c ""`).
pub fn check_command(command: &[String]) -> Result<(), String> {
    match command.first() {
        Some(p) if p.is_empty() => Err(
            "the command is empty: its first argument (CMD, after `--`) is the empty string \"\""
                .into(),
        ),
        _ => Ok(()),
    }
}

/// Parses a positive number of seconds (decimals allowed), e.g. `30` or `0.5`.
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !v.is_finite() || v <= 0.0 || v > 1e9 {
        return Err(format!(
            "{s:?}: seconds must be greater than 0 and at most 1e9"
        ));
    }
    Ok(Duration::from_secs_f64(v))
}

/// Parses `KEY=VALUE` (the value may be empty or contain `=`).
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("{s:?}: empty variable name"));
    }
    if let Some(c) = k
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_'))
    {
        return Err(format!(
            "{s:?}: variable name contains {c:?}; use letters, digits and '_'"
        ));
    }
    if k.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(format!("{s:?}: variable name starts with a digit"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_parse_and_reject() {
        assert_eq!(parse_secs("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_secs("0.25").unwrap(), Duration::from_millis(250));
        for bad in ["0", "-1", "abc", "inf", "NaN", ""] {
            assert!(parse_secs(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn env_pairs_parse_and_reject() {
        assert_eq!(parse_env("A=1").unwrap(), ("A".into(), "1".into()));
        assert_eq!(parse_env("A_B=x=y").unwrap(), ("A_B".into(), "x=y".into()));
        assert_eq!(parse_env("E=").unwrap(), ("E".into(), String::new()));
        for bad in ["A", "=1", "A-B=1", "1A=2"] {
            assert!(parse_env(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_empty_program_is_refused() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let e = check_command(&v(&[""])).unwrap_err();
        assert!(e.contains("empty string"), "{e}");
        assert!(check_command(&v(&["", "x"])).is_err());
        check_command(&v(&["sh", "-c", ""])).unwrap();
        check_command(&[]).unwrap();
    }

    #[test]
    fn limit_args_set_the_exec_options() {
        let l = LimitArgs {
            user: Some("1000:1000".into()),
            memory_max: Some(64),
            pids_max: Some(100),
        };
        let o = l.apply(kiln::ExecOptions::new());
        assert_eq!(o.user.as_deref(), Some("1000:1000"));
        assert_eq!((o.memory_max, o.pids_max), (Some(64 << 20), Some(100)));
        let o = LimitArgs::default().apply(kiln::ExecOptions::new());
        assert_eq!((o.user, o.memory_max, o.pids_max), (None, None, None));
    }

    #[test]
    fn machine_args_set_the_config() {
        let m = MachineArgs {
            vcpus: 2,
            memory: 384,
            kernel: Some("/k".into()),
            initramfs: None,
            cmdline: Some("quiet".into()),
        };
        let c = m.apply(SandboxConfig::new());
        assert_eq!((c.vcpus, c.memory_mib), (2, 384));
        assert_eq!(c.kernel.as_deref(), Some(std::path::Path::new("/k")));
        assert!(c.initramfs.is_none());
        assert_eq!(c.extra_cmdline, "quiet");
    }
}
