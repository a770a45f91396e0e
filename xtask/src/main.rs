//! Kiln's developer flows: `cargo xtask <kernel|build-guest|harness|run|test|bench|fuzz|soak>`.
//!
//! This file only parses the command line and dispatches; each flow lives in its own module.

mod bench;
mod build_guest;
mod e2b;
mod fuzz;
mod harness;
mod kernel;
mod mcp;
mod python;
mod run;
mod soak;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Kiln's build and test flows")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build (or reuse from the cache) the guest kernel and print the vmlinux path.
    Kernel,
    /// Build the static agent and pack `<assets>/guest/initramfs.cpio`; print its path.
    BuildGuest,
    /// Run a command inside the emulated-virtualization harness (QEMU L1 with kvm-amd).
    Harness(harness::HarnessArgs),
    /// Build the assets and the kiln CLI, then `kiln run -- CMD...` (directly or in the harness).
    Run(run::RunArgs),
    /// Run every test tier that applies on this host (never silently skipping one).
    Test(test::TestArgs),
    /// Run a benchmark.
    Bench(bench::BenchArgs),
    /// Build and run the cargo-fuzz targets in fuzz/ (stable toolchain, RUSTC_BOOTSTRAP=1).
    Fuzz(fuzz::FuzzArgs),
    /// Run the tier-2 leak soak (create/READY/destroy and restore cycles) and print its samples.
    Soak(soak::SoakArgs),
    /// Build the `kiln` Python wheel into a venv under the target dir (and `--bench` it).
    Python(python::PythonArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Kernel => kernel::cmd_kernel().map(|()| 0),
        Cmd::BuildGuest => build_guest::cmd_build_guest().map(|()| 0),
        Cmd::Harness(args) => harness::cmd_harness(args).map(|()| 0),
        Cmd::Run(args) => run::cmd_run(&args),
        Cmd::Test(args) => test::cmd_test(&args).map(|()| 0),
        Cmd::Bench(args) => bench::cmd_bench(&args).map(|()| 0),
        Cmd::Python(args) => python::cmd_python(&args),
        Cmd::Fuzz(args) => fuzz::cmd_fuzz(&args),
        Cmd::Soak(args) => soak::cmd_soak(&args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
