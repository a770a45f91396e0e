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

// --- egress (docs/EGRESS.md) ---

/// Network egress of the sandbox through the host proxy: `--allow-host`, `--deny-host`,
/// `--secret`, `--egress-policy`. None given: no egress at all.
#[derive(Debug, Clone, Default, Args)]
pub struct EgressArgs {
    /// Allow connections to HOST[:PORT] (a name, `*.suffix`, an IP address or a CIDR;
    /// repeatable). Loopback and private addresses need a rule that names them.
    #[arg(long = "allow-host", value_name = "HOST[:PORT]", value_parser = parse_host_rule)]
    pub allow_host: Vec<kiln::egress::Rule>,
    /// Deny connections to HOST[:PORT] (checked before the allow rules; repeatable).
    #[arg(long = "deny-host", value_name = "HOST[:PORT]", value_parser = parse_host_rule)]
    pub deny_host: Vec<kiln::egress::Rule>,
    /// A secret the guest sees only as a placeholder in env var NAME; the proxy sends the
    /// value of the host variable VAR to HOSTs only (repeatable).
    #[arg(long = "secret", value_name = "NAME@HOST[,HOST..]=env:VAR", value_parser = parse_secret)]
    pub secret: Vec<kiln::egress::SecretSpec>,
    /// Egress policy file (TOML: `allow`, `deny`, `[limits]`); the flags' rules are added.
    #[arg(long = "egress-policy", value_name = "FILE")]
    pub egress_policy: Option<PathBuf>,
}

/// Parses `--allow-host` / `--deny-host`.
pub fn parse_host_rule(s: &str) -> Result<kiln::egress::Rule, String> {
    kiln::egress::Rule::parse(s).map_err(|e| e.to_string())
}

/// Parses `--secret NAME@HOST[,HOST..]=env:VAR` (the variable is read when the sandbox is
/// configured, by [`EgressArgs::apply`]).
pub fn parse_secret(s: &str) -> Result<kiln::egress::SecretSpec, String> {
    kiln::egress::SecretSpec::parse(s).map_err(|e| e.to_string())
}

impl EgressArgs {
    /// Whether any egress flag was given.
    pub fn is_set(&self) -> bool {
        !(self.allow_host.is_empty()
            && self.deny_host.is_empty()
            && self.secret.is_empty()
            && self.egress_policy.is_none())
    }

    /// `config` with this egress (unchanged when no flag was given); `lookup` reads the host
    /// variables of `--secret`. Errors name the flag.
    pub fn apply(
        self,
        config: SandboxConfig,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<SandboxConfig, String> {
        if !self.is_set() {
            return Ok(config);
        }
        let mut policy = match &self.egress_policy {
            Some(path) => kiln::egress::Policy::load(path).map_err(|e| e.to_string())?,
            None => kiln::egress::Policy::default(),
        };
        policy.allow.extend(self.allow_host);
        policy.deny.extend(self.deny_host);
        let mut config = config.egress(policy);
        for spec in self.secret {
            let value = lookup(&spec.env).ok_or_else(|| {
                format!(
                    "--secret {}: the host variable {} is not set",
                    spec.name, spec.env
                )
            })?;
            config = config.secret(&spec.name, &value, &spec.hosts);
        }
        Ok(config)
    }
}

#[cfg(test)]
mod egress_tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        egress: EgressArgs,
    }

    fn parse(args: &[&str]) -> Result<EgressArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("kiln").chain(args.iter().copied())).map(|c| c.egress)
    }

    #[test]
    fn no_flag_no_egress() {
        let e = parse(&[]).unwrap();
        assert!(!e.is_set());
        let c = e.apply(SandboxConfig::new(), &|_| None).unwrap();
        assert!(c.egress.is_none());
    }

    #[test]
    fn rules_secrets_and_policy_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.toml");
        std::fs::write(
            &file,
            "allow = [\"pypi.org:443\"]\n[limits]\nmax_connections = 8\n",
        )
        .unwrap();
        let e = parse(&[
            "--allow-host",
            "*.pythonhosted.org",
            "--deny-host",
            "10.0.0.0/8",
            "--secret",
            "TOKEN@api.example.com=env:HOST_TOKEN",
            "--egress-policy",
            file.to_str().unwrap(),
        ])
        .unwrap();
        let c = e
            .apply(SandboxConfig::new(), &|v| {
                (v == "HOST_TOKEN").then(|| "the-value".to_string())
            })
            .unwrap();
        let eg = c.egress.unwrap();
        let allow: Vec<String> = eg.policy.allow.iter().map(|r| r.to_string()).collect();
        assert_eq!(allow, ["pypi.org:443", "*.pythonhosted.org"]);
        assert_eq!(eg.policy.deny.len(), 1);
        assert_eq!(eg.policy.limits.max_connections, 8);
        assert_eq!(eg.secrets.len(), 1);
        assert_eq!(eg.secrets[0].name, "TOKEN");
        assert_eq!(eg.secrets[0].value, "the-value");
        assert_eq!(eg.secrets[0].hosts, ["api.example.com"]);
    }

    #[test]
    fn bad_values_are_refused_naming_the_problem() {
        assert!(parse(&["--allow-host", "exa mple.com"]).is_err());
        assert!(parse(&["--secret", "TOKEN=api.example.com"]).is_err());
        let e = parse(&["--secret", "TOKEN@api.example.com=env:UNSET_VAR"]).unwrap();
        let err = e.apply(SandboxConfig::new(), &|_| None).unwrap_err();
        assert!(err.contains("UNSET_VAR"), "{err}");
        let e = parse(&["--egress-policy", "/nonexistent/policy.toml"]).unwrap();
        assert!(e.apply(SandboxConfig::new(), &|_| None).is_err());
    }
}

// --- end egress ---

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
