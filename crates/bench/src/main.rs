//! `kiln-bench`: the benchmark helpers `cargo xtask bench` drives. They are not user
//! commands (those are the `kiln` CLI, crates/cli); each prints raw samples (the documents in
//! `kiln_testkit::bench`) that xtask summarises and reports. Speed is measured here, never
//! asserted.
//!
//! Subcommands, one module each:
//! - [`boot`] (`kiln-bench boot`): boot a kernel on the VMM and wait for a serial line
//!   (`cargo xtask bench vmm`);
//! - [`vm_snapshot`] (`kiln-bench vm-snapshot create|restore|forks`): VMM-level snapshot and
//!   restore timing of a bare kernel (`cargo xtask bench snapshot`);
//! - [`exec`] (`kiln-bench exec`): exec and ping round trips in a warm sandbox, and the same on
//!   the QEMU microvm peer with vhost-vsock ([`exec`]'s `qemu` module) (`cargo xtask bench exec`);
//! - [`fork`] (`kiln-bench fork`): live fork of a running VM, per child, 1,000 children, the
//!   parent's pause window and memory per idle child (`cargo xtask bench fork`);
//! - [`image`] (`kiln-bench image`, `kiln-bench image-formats`): boots of the python image vs
//!   the initramfs guest, `python3 -c pass`, sequential reads from a disk vs QEMU's
//!   virtio-blk, and the image formats' make time and size (`cargo xtask bench image`);
//! - [`pool`] (`kiln-bench pool`): acquire + exec `true` + release with a warm `SandboxPool`
//!   (`cargo xtask bench pool`);
//! - [`egress`] (`kiln-bench egress`): egress throughput and connection latency through the
//!   host proxy against a raw vsock path (`cargo xtask bench egress`).
//!
//! Exit codes are the `kiln` CLI's (`kiln_cli::exit`).

mod boot;
mod egress;
mod exec;
mod fork;
mod image;
mod pool;
mod vm_snapshot;

use clap::{Parser, Subcommand};
// The helpers share the CLI's exit codes and value parsers.
use kiln_cli::{exit, parse_secs};

/// Kiln's benchmark helpers (for `cargo xtask bench`).
#[derive(Debug, Parser)]
#[command(
    name = "kiln-bench",
    version,
    about = "Kiln's benchmark helpers (driven by `cargo xtask bench`)"
)]
struct Cli {
    /// What to measure.
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a kernel on the VMM and wait for a serial line / the guest's exit (for
    /// `cargo xtask bench vmm` and VMM-level checks).
    Boot(boot::BootArgs),
    /// Snapshot / restore a bare kernel on the VMM and time it (for
    /// `cargo xtask bench snapshot`).
    VmSnapshot(vm_snapshot::VmSnapshotArgs),
    /// Exec and ping round trips in one warm sandbox, as JSON samples (for
    /// `cargo xtask bench exec`).
    Exec(exec::BenchExecArgs),
    /// Warm a sandbox pool and measure acquire + exec `true` + release (min/median/p99) (for
    /// `cargo xtask bench pool`).
    Pool(pool::PoolBenchArgs),
    /// Live fork of a running VM: per-child spawn time, 1,000 children, pause window,
    /// memory per idle child, as JSON samples (for `cargo xtask bench fork`).
    Fork(fork::ForkArgs),
    /// Image boots, `python3 -c pass`, sequential disk reads vs QEMU, as JSON samples (for
    /// `cargo xtask bench image`).
    Image(image::ImageBenchArgs),
    /// Make one tree's image in both formats; time and size as JSON (for
    /// `cargo xtask bench image`).
    ImageFormats(image::FormatsArgs),
    /// Egress throughput and connection latency, proxy vs raw vsock, as JSON samples (for
    /// `cargo xtask bench egress`).
    Egress(egress::EgressBenchArgs),
}

fn main() {
    let cli = Cli::parse();
    kiln_cli::logging::init(false);
    let code = match cli.command {
        Command::Boot(args) => boot::boot(&args),
        Command::VmSnapshot(args) => vm_snapshot::vm_snapshot(&args),
        Command::Exec(args) => exec::bench_exec(&args),
        Command::Pool(args) => pool::pool_bench(&args),
        Command::Fork(args) => fork::fork(&args),
        Command::Image(args) => image::image_bench(&args),
        Command::ImageFormats(args) => image::image_formats(&args),
        Command::Egress(args) => egress::bench_egress(&args),
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
