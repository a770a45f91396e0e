//! `kiln-bench boot`: boot a kernel on the Kiln VMM directly (no agent, no protocol) and
//! wait for a serial line and/or the guest's exit. Used by `cargo xtask bench vmm` (fresh
//! process launch -> READY, and in-process repeats with `--repeat`) and for VMM-level checks
//! of the real guest (`--until-serial KILN-AGENT-READY --wait-exit`).
//!
//! Exit status: 0 when the awaited line appeared (and, with `--wait-exit`, the guest shut
//! itself down); 1 when the guest exited or timed out first; 2 on usage errors.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use kiln_vmm::vm::ExitMode;
use kiln_vmm::{Vm, VmConfig};

use super::parse_secs;

/// The VM of `kiln-bench boot` and `kiln-bench vm-snapshot create`: `--kernel`,
/// `--initramfs`, `--vcpus`, `--memory`, `--cmdline`.
#[derive(Debug, Clone, Args)]
pub struct VmArgs {
    /// Kernel image (ELF vmlinux booted through PVH, or bzImage).
    #[arg(long)]
    pub kernel: PathBuf,
    /// Initramfs (uncompressed newc cpio).
    #[arg(long)]
    pub initramfs: Option<PathBuf>,
    /// Number of vCPUs (1-8).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    pub memory: u64,
    /// Extra kernel command-line arguments.
    #[arg(long, default_value = "")]
    pub cmdline: String,
}

impl VmArgs {
    /// The VM configuration, named `name`.
    pub fn config(&self, name: String) -> VmConfig {
        let mut c = VmConfig::new(name, &self.kernel);
        c.initramfs = self.initramfs.clone();
        c.vcpus = self.vcpus;
        c.mem_mib = self.memory;
        c.cmdline_extra = self.cmdline.clone();
        c
    }
}

/// `kiln-bench boot` arguments.
#[derive(Debug, Args)]
pub struct BootArgs {
    /// The VM.
    #[command(flatten)]
    pub vm: VmArgs,
    /// Wait for this text on the serial console; print "<text> <ms>" on stdout when it appears.
    #[arg(long, value_name = "TEXT")]
    pub until_serial: Option<String>,
    /// Then wait for the guest to end the VM and print its exit reason.
    #[arg(long)]
    pub wait_exit: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value = "30", value_parser = parse_secs)]
    pub timeout: Duration,
    /// Print the guest's serial output (on stderr) when done.
    #[arg(long)]
    pub print_serial: bool,
    /// Boot this many VMs one after the other in this process and print the create -> TEXT
    /// times in milliseconds as a JSON array (needs --until-serial).
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// How the process ends after a single boot: `drop` stops the VM first (joins its threads,
    /// closes its fds), `exit` exits with the VM still open (the kernel tears it down in the
    /// exit path), `handoff` leaves the VM's fds to a forked helper that closes them after this
    /// process is gone (`Vm::exit_process`; `cargo xtask bench vmm` times READY -> gone).
    #[arg(long, value_enum, default_value_t = ExitArg::Drop)]
    pub exit: ExitArg,
}

/// `--exit`: how `kiln-bench boot` ends (see `kiln_vmm::vm::ExitMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExitArg {
    /// Stop the VM, then exit.
    Drop,
    /// Exit with the VM open.
    Exit,
    /// Hand the VM's fds to a helper, then exit.
    Handoff,
}

impl From<ExitArg> for ExitMode {
    fn from(a: ExitArg) -> ExitMode {
        match a {
            ExitArg::Drop => ExitMode::Drop,
            ExitArg::Exit => ExitMode::Exit,
            ExitArg::Handoff => ExitMode::Handoff,
        }
    }
}

fn config(args: &BootArgs, i: usize) -> VmConfig {
    let mut c = args.vm.config(format!("boot{i}"));
    c.serial_ring_bytes = 1 << 20;
    c
}

/// Runs `kiln-bench boot`; returns the exit code.
pub fn boot(args: &BootArgs) -> i32 {
    if args.repeat > 1 {
        return repeat(args);
    }
    let t0 = Instant::now();
    let vm = match Vm::start(config(args, 0)) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("kiln: error: {e}");
            return 1;
        }
    };
    let deadline = t0 + args.timeout;
    let mut code = 0;
    if let Some(text) = &args.until_serial {
        match vm.wait_for_serial(text, deadline) {
            Ok(()) => {
                let ms = t0.elapsed().as_secs_f64() * 1e3;
                let mut out = std::io::stdout().lock();
                // The parent (bench) times this line; nothing useful to do if stdout is gone.
                let _ = writeln!(out, "{text} {ms:.3}");
                let _ = out.flush();
            }
            Err(e) => {
                eprintln!("kiln: error: {e}");
                code = 1;
            }
        }
    }
    if code == 0 && (args.wait_exit || args.until_serial.is_none()) {
        match vm.wait_exit(deadline.saturating_duration_since(Instant::now())) {
            Ok(reason) => {
                println!("exit: {reason}");
                if !reason.is_guest_shutdown() {
                    code = 1;
                }
            }
            Err(e) => {
                eprintln!("kiln: error: {e}");
                code = 1;
            }
        }
    }
    if args.print_serial {
        eprintln!("{}", vm.serial_tail(1 << 20));
    }
    vm.exit_process(code, args.exit.into())
}

fn repeat(args: &BootArgs) -> i32 {
    let Some(text) = &args.until_serial else {
        eprintln!("kiln: error: --repeat needs --until-serial");
        return 2;
    };
    let mut samples = Vec::with_capacity(args.repeat);
    for i in 0..args.repeat {
        let t0 = Instant::now();
        let vm = match Vm::start(config(args, i)) {
            Ok(vm) => vm,
            Err(e) => {
                eprintln!("kiln: error: run {i}: {e}");
                return 1;
            }
        };
        if let Err(e) = vm.wait_for_serial(text, t0 + args.timeout) {
            eprintln!("kiln: error: run {i}: {e}");
            return 1;
        }
        samples.push(t0.elapsed().as_secs_f64() * 1e3);
        vm.stop();
    }
    let list: Vec<String> = samples.iter().map(|s| format!("{s:.4}")).collect();
    println!("[{}]", list.join(","));
    0
}
