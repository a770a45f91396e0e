//! `cargo xtask run -- CMD ARGS...`: builds the guest assets and the `kiln` CLI, then runs
//! `kiln run -- CMD ARGS...` directly on a hardware-virtualization host, or inside the
//! emulated-virtualization harness elsewhere (saying which).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Result};
use clap::Args;

use crate::{build_guest, kernel, util};

/// `cargo xtask run` arguments.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The command to run in a fresh Kiln sandbox, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Builds the `kiln` CLI (debug; package kiln-cli, crates/cli) and returns its path.
pub fn build_kiln_cli() -> Result<PathBuf> {
    eprintln!("building the kiln CLI");
    util::cargo_build(
        "the kiln CLI",
        &["build", "-p", "kiln-cli", "--bin", "kiln"],
        util::target_dir().join("debug").join("kiln"),
    )
}

/// Whether the `kiln` binary offers a `run` subcommand (it does not until the CLI lands).
fn has_run_subcommand(kiln: &std::path::Path) -> bool {
    Command::new(kiln)
        .args(["run", "--help"])
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            o.status.success() && text.to_lowercase().contains("usage")
        })
        .unwrap_or(false)
}

/// `cargo xtask run -- CMD...`: returns the exit status to exit with.
pub fn cmd_run(args: &RunArgs) -> Result<i32> {
    let k = kernel::ensure()?;
    let g = build_guest::ensure()?;
    let kiln = build_kiln_cli()?;
    eprintln!("guest kernel:    {}", k.vmlinux.display());
    eprintln!("guest initramfs: {}", g.initramfs.display());
    if !has_run_subcommand(&kiln) {
        bail!(
            "the guest assets are ready, but {} has no working `run` subcommand yet: the \
             Kiln VMM and CLI (crates/vmm-core, crates/cli) are still missing",
            kiln.display()
        );
    }
    let mut argv = vec![kiln.display().to_string(), "run".into(), "--".into()];
    argv.extend(args.command.iter().cloned());
    let status = util::run_here_or_in_harness(
        "",
        "",
        argv,
        util::guest_env(&k.vmlinux, &g.initramfs),
        None,
    )?;
    if status != 0 {
        eprintln!("kiln run exited with status {status}");
    }
    Ok(status)
}
