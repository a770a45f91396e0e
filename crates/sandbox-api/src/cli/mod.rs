//! The `kiln` command line: argument parsing and dispatch. Each subcommand lives in its own
//! module: [`run`] (`kiln run`), [`doctor`] (`kiln doctor`), [`bench`] (the hidden
//! `kiln bench-exec` used by `cargo xtask bench exec`); [`exit`] holds the exit codes.

pub mod bench;
pub mod boot;
pub mod doctor;
pub mod exit;
pub mod pool;
pub mod run;
pub mod signals;
pub mod snapshot;
pub mod vm_snapshot;

use std::time::Duration;

use clap::{Parser, Subcommand};

/// Kiln: run commands in microVM sandboxes.
#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "Run commands in Kiln microVM sandboxes",
    after_help = exit::HELP
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a sandbox, run one command in it (output streamed live) and exit with its status.
    #[command(after_help = exit::HELP)]
    Run(run::RunArgs),
    /// Report whether this host can run sandboxes: KVM, /dev/kvm permissions, guest assets.
    Doctor(doctor::DoctorArgs),
    /// Sandbox pools: `kiln pool bench` measures acquire + exec `true` + release.
    Pool(pool::PoolArgs),
    /// Exec and ping round trips in one warm sandbox, as JSON samples (for
    /// `cargo xtask bench exec`).
    #[command(hide = true)]
    BenchExec(bench::BenchExecArgs),
    /// Boot a kernel on the VMM and wait for a serial line / the guest's exit (for
    /// `cargo xtask bench vmm` and VMM-level checks).
    #[command(hide = true)]
    Boot(boot::BootArgs),
    /// Snapshot / restore a bare kernel on the VMM and time it (for
    /// `cargo xtask bench snapshot`).
    #[command(hide = true)]
    VmSnapshot(vm_snapshot::VmSnapshotArgs),
    /// Boot a sandbox, run an optional setup command, and save it to a directory.
    Snapshot(snapshot::SnapshotArgs),
    /// Restore a sandbox from a snapshot directory, run one command in it, exit with its status.
    Restore(snapshot::RestoreArgs),
    /// Restore N sandboxes from one snapshot at once and run a command in each.
    Fork(snapshot::ForkArgs),
}

/// Parses the command line and runs the subcommand; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Doctor(args) => doctor::doctor(&args),
        Command::Pool(args) => pool::pool(&args),
        Command::BenchExec(args) => bench::bench_exec(&args),
        Command::Boot(args) => boot::boot(&args),
        Command::VmSnapshot(args) => vm_snapshot::vm_snapshot(&args),
        Command::Snapshot(args) => snapshot::snapshot(args),
        Command::Restore(args) => snapshot::restore(args),
        Command::Fork(args) => snapshot::fork(args),
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
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

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
    fn run_takes_the_command_after_double_dash() {
        let cli = Cli::try_parse_from([
            "kiln",
            "run",
            "--vcpus",
            "2",
            "--memory",
            "256",
            "--env",
            "A=1",
            "-e",
            "B=2",
            "--cwd",
            "/tmp",
            "--timeout",
            "5",
            "-v",
            "--",
            "uname",
            "-a",
        ])
        .unwrap();
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        assert_eq!(a.vcpus, 2);
        assert_eq!(a.memory, 256);
        assert_eq!(a.env.len(), 2);
        assert_eq!(a.cwd.as_deref(), Some("/tmp"));
        assert_eq!(a.timeout, Some(Duration::from_secs(5)));
        assert!(a.verbose && !a.json);
        assert_eq!(a.command, vec!["uname", "-a"]);
    }

    #[test]
    fn run_without_double_dash_keeps_command_flags() {
        let cli = Cli::try_parse_from(["kiln", "run", "--json", "ls", "-l", "/"]).unwrap();
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        assert!(a.json);
        assert_eq!(a.command, vec!["ls", "-l", "/"]);
    }

    #[test]
    fn invalid_flags_are_usage_errors() {
        for argv in [
            vec!["kiln", "run"],
            vec!["kiln", "run", "--vcpus", "x", "--", "true"],
            vec!["kiln", "run", "--env", "NOEQUALS", "--", "true"],
            vec!["kiln", "run", "--timeout", "0", "--", "true"],
            vec!["kiln", "frobnicate"],
        ] {
            let e = Cli::try_parse_from(&argv).unwrap_err();
            assert_eq!(e.exit_code(), exit::USAGE, "{argv:?}");
        }
    }

    #[test]
    fn help_documents_exit_codes() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("127"), "{help}");
        assert!(help.contains("cargo xtask build-guest"), "{help}");
    }
}
