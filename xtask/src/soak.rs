//! `cargo xtask soak`: runs the tier-2 leak soak (`crates/vmm-core/tests/soak.rs`,
//! docs/SECURITY.md "Soak") on this host's /dev/kvm and prints its samples: 10,000
//! create -> READY -> destroy cycles and 1,000 restores in one process, fd count, thread
//! count and RSS every 1,000 cycles, checked against the bound the test states.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use clap::Args;
use kiln_vmm::host;

use crate::util;

/// `cargo xtask soak` arguments.
#[derive(Debug, Args)]
pub struct SoakArgs {
    /// Run the short soak instead (1,000 cycles, 100 restores; the one tier 2 runs).
    #[arg(long)]
    pub short: bool,
}

/// `cargo xtask soak`.
pub fn cmd_soak(args: &SoakArgs) -> Result<i32> {
    let kind = host::detect();
    if !kind.has_kvm() {
        bail!("the soak needs /dev/kvm and this host has none usable: {kind}");
    }
    let test = if args.short {
        "soak_short_1000_cycles_and_100_restores_leak_nothing"
    } else {
        "soak_full_10000_cycles_and_1000_restores_leak_nothing"
    };
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(util::repo_root())
        .args([
            "test", "-p", "kiln-vmm", "--test", "soak", "--", "--exact", test,
        ])
        .args(["--include-ignored", "--nocapture", "--test-threads=1"]);
    eprintln!("running `{}`", util::display_cmd(&cmd));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{}`", util::display_cmd(&cmd)))?;
    let mut samples = Vec::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            println!("{line}");
            if line.starts_with("SOAK ") {
                samples.push(line);
            }
        }
    }
    let status = child.wait().context("waiting for the soak test")?;
    println!();
    println!("==== soak samples ====");
    for s in &samples {
        println!("{s}");
    }
    if status.success() {
        Ok(0)
    } else {
        eprintln!("the soak failed (see the assertion above)");
        Ok(1)
    }
}
