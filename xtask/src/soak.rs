//! `cargo xtask soak`: runs the tier-2 leak soak (`crates/vmm-core/tests/soak.rs`,
//! docs/SECURITY.md "Soak") on this host's /dev/kvm and prints its samples: 10,000
//! create -> READY -> destroy cycles and 1,000 restores in one process, fd count, thread
//! count and RSS every 1,000 cycles, checked against the bound the test states. `--tier4`
//! runs tests/tests/soak_tier4.rs in the harness instead: 500 sandbox create -> exec ->
//! destroy cycles of a real Linux guest (`--cycles N`).

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
    /// Run the tier-4 soak instead: `--cycles` sandbox create -> exec -> destroy cycles of a
    /// real Linux guest in the harness (tests/tests/soak_tier4.rs).
    #[arg(long, conflicts_with = "short")]
    pub tier4: bool,
    /// Cycles of the tier-4 soak.
    #[arg(long, default_value_t = 500, requires = "tier4")]
    pub cycles: u32,
}

/// `cargo xtask soak`.
pub fn cmd_soak(args: &SoakArgs) -> Result<i32> {
    if args.tier4 {
        return soak_tier4(args.cycles);
    }
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

/// `cargo xtask soak --tier4`: tier 4 with only the soak test, given `cycles` and deadlines
/// long enough for them (a cycle boots a Linux guest under software emulation: seconds).
fn soak_tier4(cycles: u32) -> Result<i32> {
    let per_test = u64::from(cycles) * 20 + 600;
    // Read by `cargo xtask test` below and passed into the harness (tier4_env).
    std::env::set_var("KILN_SOAK_CYCLES", cycles.to_string());
    std::env::set_var("KILN_TIER4_EXE_TIMEOUT", per_test.to_string());
    std::env::set_var("KILN_TIER4_IDLE_TIMEOUT", (per_test + 120).to_string());
    std::env::set_var("KILN_HARNESS_TIMEOUT", (per_test + 1800).to_string());
    std::env::set_var("KILN_TIER4_SHARDS", "1");
    let args = crate::test::TestArgs {
        tier: Some(4),
        filter: Some("soak_tier4".into()),
    };
    match crate::test::cmd_test(&args) {
        Ok(()) => Ok(0),
        Err(e) => {
            eprintln!("the tier-4 soak failed: {e:#}");
            Ok(1)
        }
    }
}
