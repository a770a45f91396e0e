//! kiln-cli: the `kiln` command line (binary `kiln`, src/main.rs) over the `kiln` library.
//! This file parses the command line and dispatches; each user-facing subcommand lives in its
//! own module: [`run`] (`kiln run`), [`doctor`] (`kiln doctor`), [`snapshot`] (`kiln snapshot`,
//! `kiln restore`, `kiln fork`), [`image`] (`kiln image build|ls|rm|pull|import|verify`, the
//! `kiln-image` store), [`serve`] (`kiln serve`, crates/server), [`mcp`] (`kiln mcp`, crates/mcp). Shared pieces: [`args`] (argument parsers and the
//! [`args::MachineArgs`] every command that boots a guest takes), [`exit`] (the exit codes),
//! [`signals`] (forwarding Ctrl-C to the guest command), [`logging`] (the tracing subscriber:
//! `RUST_LOG`, `-v`).
//!
//! The benchmark helpers `cargo xtask bench` drives are not here: they are `kiln-bench`
//! (crates/bench), which reuses [`exit`] and [`args`].

pub mod args;
pub mod doctor;
pub mod exit;
pub mod image;
pub mod logging;
pub mod mcp;
pub mod run;
pub mod serve;
pub mod signals;
pub mod snapshot;

pub use args::EgressArgs;
pub use args::{check_command, parse_env, parse_secs, ImageRunArgs, MachineArgs};

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
    /// Boot a sandbox, run an optional setup command, and save it to a directory.
    Snapshot(snapshot::SnapshotArgs),
    /// Restore a sandbox from a snapshot directory, run one command in it, exit with its status.
    Restore(snapshot::RestoreArgs),
    /// Restore N sandboxes from one snapshot at once and run a command in each.
    Fork(snapshot::ForkArgs),
    /// Manage guest images: build from a recipe, pull, import, list, remove, verify.
    #[command(after_help = image::HELP)]
    Image(image::ImageArgs),
    /// Serve sandboxes over HTTP to the unmodified e2b SDKs (E2B control plane + envd API).
    Serve(serve::ServeArgs),
    /// Serve sandboxes as Model Context Protocol tools (stdio, or streamable HTTP with --http).
    Mcp(mcp::McpArgs),
}

/// Parses the command line and runs the subcommand; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    logging::init(cli.command.verbose());
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Doctor(args) => doctor::doctor(&args),
        Command::Snapshot(args) => snapshot::snapshot(args),
        Command::Restore(args) => snapshot::restore(args),
        Command::Fork(args) => snapshot::fork(args),
        Command::Image(args) => image::image(args),
        Command::Serve(args) => serve::serve(args),
        Command::Mcp(args) => mcp::mcp(args),
    }
}

impl Command {
    /// Whether the command was asked to be verbose (`kiln run -v`), which raises the log level.
    pub fn verbose(&self) -> bool {
        match self {
            Command::Run(a) => a.verbose,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use std::time::Duration;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
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
        assert_eq!(a.machine.vcpus, 2);
        assert_eq!(a.machine.memory, 256);
        assert_eq!(a.env.len(), 2);
        assert_eq!(a.cwd.as_deref(), Some("/tmp"));
        assert_eq!(a.timeout, Some(Duration::from_secs(5)));
        assert!(a.verbose && !a.json);
        assert_eq!(a.command, vec!["uname", "-a"]);
        assert!(Command::Run(a).verbose());
    }

    #[test]
    fn run_jailed_is_opt_in() {
        let cli = Cli::try_parse_from(["kiln", "run", "--jailed", "--", "true"]).unwrap();
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        assert!(a.jailed);
        let cli = Cli::try_parse_from(["kiln", "run", "--", "true"]).unwrap();
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        assert!(!a.jailed);
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
