//! End-to-end (tier-4) test support: the host gate ([`require_tier4`]), the guest asset paths
//! ([`guest_kernel`], [`guest_initramfs`]), and [`qemu_boot_to_ready`], which boots the Kiln
//! guest under QEMU/KVM and measures launch -> `KILN-AGENT-READY` (the cold-boot comparison
//! peer). The QEMU command line, the bounded console reader ([`Console`], [`wait_for_line`])
//! and the statistics are kiln-testkit's (crates/testkit), shared with kiln-bench and xtask.
//!
//! Tier-4 tests run directly on hosts with hardware virtualization, elsewhere inside the
//! emulated-virtualization harness (`cargo xtask harness -- <test binary>`, docs/HARNESS.md).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use kiln::assets;
use kiln_testkit::QemuCommand;
use kiln_vmm::host::{self, HostKind};

pub use kiln_proto::READY_LINE;
pub use kiln_testkit::console::{wait_for_line, Console, ConsoleError, MAX_LINE, MAX_LINES};

/// Errors of the test-support helpers.
#[derive(Debug, thiserror::Error)]
pub enum SupportError {
    /// The console did not show the wanted line (timeout, or the stream ended).
    #[error(transparent)]
    Console(#[from] ConsoleError),
    /// A process could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// A required asset is missing.
    #[error("{what} not found at {path} ({hint})")]
    MissingAsset {
        /// Which asset.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// How to build it.
        hint: &'static str,
    },
    /// The assets directory cannot be located.
    #[error(transparent)]
    Assets(#[from] assets::AssetsError),
}

/// Fails the calling test (never skips) unless this host can boot Linux guests under KVM.
///
/// On a PVM or KVM-less host the message says to run the test inside the harness.
pub fn require_tier4() {
    let kind = host::detect();
    if let Err(msg) = tier4_verdict(&kind) {
        panic!("{msg}");
    }
}

/// The decision behind [`require_tier4`], separate so it can be tested on any host.
pub fn tier4_verdict(kind: &HostKind) -> Result<(), String> {
    if kind.runs_linux_guests() {
        return Ok(());
    }
    Err(format!(
        "tier-4 test needs a host with hardware virtualization (VMX/SVM and a usable /dev/kvm), \
         but this host is: {kind}.\nRun it inside the emulated-virtualization harness: \
         `cargo xtask test` (all tiers) or `cargo xtask harness -- <test binary> --nocapture`."
    ))
}

/// The guest kernel (`$KILN_KERNEL` or `<assets>/guest/vmlinux`), which must exist.
pub fn guest_kernel() -> Result<PathBuf, SupportError> {
    existing(
        assets::default_kernel()?,
        "the Kiln guest kernel",
        "build it with `cargo xtask kernel`",
    )
}

/// The guest initramfs (`$KILN_INITRAMFS` or `<assets>/guest/initramfs.cpio`), which must exist.
pub fn guest_initramfs() -> Result<PathBuf, SupportError> {
    existing(
        assets::default_initramfs()?,
        "the Kiln guest initramfs",
        "build it with `cargo xtask build-guest`",
    )
}

fn existing(
    path: PathBuf,
    what: &'static str,
    hint: &'static str,
) -> Result<PathBuf, SupportError> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(SupportError::MissingAsset { what, path, hint })
    }
}

/// QEMU machine type for [`qemu_boot_to_ready`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    /// `-M microvm` (no PCI, no ACPI, ISA serial): the closest to Kiln's own VMM.
    Microvm,
    /// The default `pc` machine.
    Pc,
}

/// How [`qemu_boot_to_ready`] boots a guest.
#[derive(Debug, Clone)]
pub struct QemuBoot {
    /// QEMU binary (default `qemu-system-x86_64`).
    pub qemu: PathBuf,
    /// Guest kernel (ELF vmlinux booted through PVH, or a bzImage).
    pub kernel: PathBuf,
    /// Initramfs.
    pub initramfs: PathBuf,
    /// Machine type.
    pub machine: Machine,
    /// Accelerator (`kvm`; `tcg` works anywhere but slowly).
    pub accel: String,
    /// Guest memory.
    pub memory_mib: u32,
    /// vCPUs.
    pub cpus: u32,
    /// Appended to `console=ttyS0 reboot=t panic=-1`.
    pub extra_cmdline: String,
    /// Deadline for the READY line.
    pub timeout: Duration,
}

impl QemuBoot {
    /// Defaults: microvm, KVM, 1 vCPU, 256 MiB, 60 s.
    pub fn new(kernel: impl Into<PathBuf>, initramfs: impl Into<PathBuf>) -> QemuBoot {
        QemuBoot {
            qemu: PathBuf::from("qemu-system-x86_64"),
            kernel: kernel.into(),
            initramfs: initramfs.into(),
            machine: Machine::Microvm,
            accel: "kvm".into(),
            memory_mib: 256,
            cpus: 1,
            extra_cmdline: String::new(),
            timeout: Duration::from_secs(60),
        }
    }

    /// The kernel command line.
    pub fn cmdline(&self) -> String {
        let mut s = String::from(kiln_vmm::boot::BASE_CMDLINE);
        if !self.extra_cmdline.is_empty() {
            s.push(' ');
            s.push_str(&self.extra_cmdline);
        }
        s
    }

    /// The QEMU command line (serial console on its stdout, QEMU's messages on stderr).
    pub fn qemu_command(&self) -> QemuCommand {
        let machine = match self.machine {
            Machine::Microvm => "microvm",
            Machine::Pc => "pc",
        };
        let mut q = QemuCommand::new(&self.kernel)
            .program(&self.qemu)
            .machine(machine)
            .accel(&self.accel)
            .memory_mib(self.memory_mib)
            .smp(self.cpus)
            .initrd(&self.initramfs)
            .append(self.cmdline());
        if self.accel == "kvm" {
            q = q.cpu("host");
        }
        q
    }
}

/// Result of [`qemu_boot_to_ready`].
#[derive(Debug, Clone)]
pub struct BootReport {
    /// QEMU process start -> READY line read on the host.
    pub ready_after: Duration,
    /// QEMU process start -> first console line (QEMU's own start-up plus early boot).
    pub first_output_after: Option<Duration>,
    /// Console lines up to READY.
    pub console: Vec<String>,
}

/// Kills and reaps the child when dropped (a failing test must not leave QEMU running).
#[derive(Debug)]
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots the guest under QEMU and returns the time from launch to the agent's READY line;
/// QEMU is killed afterwards (and on any error). QEMU's stderr is part of the error text.
pub fn qemu_boot_to_ready(boot: &QemuBoot) -> Result<BootReport, SupportError> {
    let mut cmd = boot.qemu_command().command();
    let launched = Instant::now();
    let child = cmd.spawn().map_err(|source| SupportError::Spawn {
        program: boot.qemu.display().to_string(),
        source,
    })?;
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take();
    let stderr = child.0.stderr.take();
    let (Some(stdout), Some(stderr)) = (stdout, stderr) else {
        return Err(SupportError::Spawn {
            program: boot.qemu.display().to_string(),
            source: std::io::Error::other("stdout/stderr not piped"),
        });
    };
    // QEMU's own complaints are in the console history, so failures show them.
    let mut console = Console::spawn_with_diagnostics(stdout, stderr);
    let at = console.wait_for_line(READY_LINE, launched + boot.timeout)?;
    Ok(BootReport {
        ready_after: at.saturating_duration_since(launched),
        first_output_after: console
            .first_line_at()
            .map(|t| t.saturating_duration_since(launched)),
        console: console.lines(),
    })
}

/// Whether `path` is an ELF file (the PVH-bootable vmlinux) rather than a bzImage.
pub fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_vmm::host::{CpuVendor, NoKvmReason};

    #[test]
    fn tier4_verdict_passes_only_hardware_virt() {
        assert!(tier4_verdict(&HostKind::HardwareVirt {
            vendor: CpuVendor::Amd
        })
        .is_ok());
        let pvm = tier4_verdict(&HostKind::Pvm).unwrap_err();
        assert!(pvm.contains("cargo xtask harness"), "{pvm}");
        let none = tier4_verdict(&HostKind::NoKvm {
            reason: NoKvmReason::NoVirtExtensions,
        })
        .unwrap_err();
        assert!(none.contains("neither vmx nor svm"), "{none}");
    }

    #[test]
    fn qemu_command_line() {
        let boot = QemuBoot::new("/k", "/i");
        let args: Vec<String> = boot
            .qemu_command()
            .to_args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("-M microvm -accel kvm"), "{joined}");
        assert!(joined.contains("-kernel /k -initrd /i"), "{joined}");
        assert!(
            joined.contains("console=ttyS0 reboot=t panic=-1"),
            "{joined}"
        );
    }

    #[test]
    fn missing_assets_say_how_to_build_them() {
        let err = existing(
            PathBuf::from("/nonexistent/vmlinux"),
            "the Kiln guest kernel",
            "build it with `cargo xtask kernel`",
        )
        .unwrap_err();
        assert!(err.to_string().contains("cargo xtask kernel"), "{err}");
    }
}

/// What [`run_collecting`] saw: the exit status (`None` = killed at the deadline), stdout and
/// stderr.
#[derive(Debug)]
pub struct Collected {
    /// Exit status; `None` when the command was killed at its deadline.
    pub status: Option<std::process::ExitStatus>,
    /// Everything on stdout.
    pub stdout: String,
    /// Everything on stderr.
    pub stderr: String,
}

/// Runs `cmd` (stdin `/dev/null`, stdout and stderr collected) and kills it past `timeout`.
/// Panics when it cannot be started (a test helper).
pub fn run_collecting(cmd: &mut std::process::Command, timeout: Duration) -> Collected {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {:?}: {e}", cmd.get_program()));
    let read_all = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = read_all(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err = read_all(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if started.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => panic!("waiting for {:?}: {e}", cmd.get_program()),
        }
    };
    Collected {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// Fails the test unless the pytest run `c` of `file` finished within `timeout`, passed, and
/// ran at least one test.
pub fn assert_pytest_passed(file: &str, c: &Collected, timeout: Duration) {
    let (stdout, stderr) = (&c.stdout, &c.stderr);
    match c.status {
        None => panic!("pytest {file} did not finish within {timeout:?}\n{stdout}"),
        Some(s) => {
            assert!(
                s.success(),
                "pytest {file} failed ({s}):\n{stdout}\n{stderr}"
            );
            assert!(
                stdout.contains(" passed"),
                "pytest {file} ran no tests:\n{stdout}"
            );
        }
    }
}
