//! `cargo xtask run -- CMD ARGS...`: builds the guest assets and the `kiln` CLI, then runs
//! `kiln run -- CMD ARGS...` directly on a hardware-virtualization host, or inside the
//! emulated-virtualization harness elsewhere (saying which).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Args;
use kiln_vmm::host;

use crate::harness::{self, HarnessOptions};
use crate::{build_guest, kernel, util};

/// `cargo xtask run` arguments.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The command to run in a fresh Kiln sandbox, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Builds the `kiln` CLI (debug) and returns its path.
pub fn build_kiln_cli() -> Result<PathBuf> {
    eprintln!("building the kiln CLI");
    util::run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(util::repo_root())
            .args(["build", "-p", "kiln", "--bin", "kiln"]),
    )
    .context("building the kiln CLI")?;
    let kiln = util::target_dir().join("debug").join("kiln");
    if !kiln.is_file() {
        bail!("cargo built the kiln CLI but {} is missing", kiln.display());
    }
    Ok(kiln)
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
             Kiln VMM and CLI (crates/vmm-core, crates/sandbox-api) are still missing",
            kiln.display()
        );
    }
    let mut argv = vec![kiln.display().to_string(), "run".into(), "--".into()];
    argv.extend(args.command.iter().cloned());
    let env = vec![
        ("KILN_KERNEL".to_string(), k.vmlinux.display().to_string()),
        (
            "KILN_INITRAMFS".to_string(),
            g.initramfs.display().to_string(),
        ),
    ];
    let kind = host::detect();
    let status = if kind.runs_linux_guests() {
        eprintln!("running directly on this host ({kind})");
        let status = Command::new(&argv[0])
            .args(&argv[1..])
            .envs(env)
            .status()
            .with_context(|| format!("starting {}", kiln.display()))?;
        status.code().unwrap_or(128)
    } else {
        eprintln!("this host cannot boot Linux guests ({kind}); running inside the emulated-virtualization harness");
        // `..Default::default()` keeps this call valid as the harness grows options.
        #[allow(clippy::needless_update)]
        // `..Default::default()` keeps this valid as the harness grows options.
        #[allow(clippy::needless_update)]
        let opts = HarnessOptions {
            command: argv,
            timeout: None,
            env,
            ..Default::default()
        };
        harness::run(&opts)?
    };
    if status != 0 {
        eprintln!("kiln run exited with status {status}");
    }
    Ok(status)
}
