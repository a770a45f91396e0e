//! End-to-end (tier-4) test support: the host gate ([`require_tier4`]), the guest asset paths,
//! a bounded console reader that waits for a line with a deadline ([`Console`],
//! [`wait_for_line`]), and [`qemu_boot_to_ready`], which boots the Kiln guest under QEMU/KVM and
//! measures launch -> `KILN-AGENT-READY` (the cold-boot comparison peer).
//!
//! Tier-4 tests run directly on hosts with hardware virtualization, elsewhere inside the
//! emulated-virtualization harness (`cargo xtask harness -- <test binary>`, docs/HARNESS.md).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_vmm::host::{self, HostKind};

/// The line the guest agent prints on the serial console when it is up.
pub const READY_LINE: &str = "KILN-AGENT-READY";

/// Longest console line kept (longer lines are cut; the guest is not trusted).
pub const MAX_LINE: usize = 64 * 1024;
/// Console lines retained for error messages and [`Console::lines`].
pub const MAX_LINES: usize = 4096;

/// Errors of the test-support helpers.
#[derive(Debug, thiserror::Error)]
pub enum SupportError {
    /// The wanted line did not appear before the deadline.
    #[error("no line containing {needle:?} within {waited:?}; last console lines:\n{tail}")]
    Timeout {
        /// What was waited for.
        needle: String,
        /// How long.
        waited: Duration,
        /// The last console lines.
        tail: String,
    },
    /// The stream ended (process exited) before the wanted line.
    #[error("console closed before a line containing {needle:?}; last console lines:\n{tail}")]
    Closed {
        /// What was waited for.
        needle: String,
        /// The last console lines.
        tail: String,
    },
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
    Host(#[from] host::HostError),
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
        host::default_kernel()?,
        "the Kiln guest kernel",
        "build it with `cargo xtask kernel`",
    )
}

/// The guest initramfs (`$KILN_INITRAMFS` or `<assets>/guest/initramfs.cpio`), which must exist.
pub fn guest_initramfs() -> Result<PathBuf, SupportError> {
    existing(
        host::default_initramfs()?,
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

/// A console stream read line by line on its own thread, with bounded lines and history.
#[derive(Debug)]
pub struct Console {
    rx: Receiver<(Instant, String)>,
    history: Arc<Mutex<VecDeque<String>>>,
    first_line: Arc<Mutex<Option<Instant>>>,
    closed: bool,
}

impl Console {
    /// Starts reading `reader` (e.g. a child's piped stdout).
    pub fn spawn<R: Read + Send + 'static>(reader: R) -> Console {
        let (tx, rx) = mpsc::channel();
        let history = Arc::new(Mutex::new(VecDeque::new()));
        let hist = Arc::clone(&history);
        let first_line = Arc::new(Mutex::new(None));
        let first = Arc::clone(&first_line);
        std::thread::spawn(move || {
            let mut reader = BufReader::new(reader);
            while let Ok(Some(line)) = read_bounded_line(&mut reader) {
                let now = Instant::now();
                first
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(now);
                {
                    let mut h = hist.lock().unwrap_or_else(|p| p.into_inner());
                    if h.len() == MAX_LINES {
                        h.pop_front();
                    }
                    h.push_back(line.clone());
                }
                if tx.send((now, line)).is_err() {
                    break;
                }
            }
        });
        Console {
            rx,
            history,
            first_line,
            closed: false,
        }
    }

    /// Waits until a line containing `needle` arrives, at most until `deadline`; returns when
    /// it was read. Lines before it are consumed (and kept in the history).
    pub fn wait_for_line(
        &mut self,
        needle: &str,
        deadline: Instant,
    ) -> Result<Instant, SupportError> {
        let started = Instant::now();
        loop {
            if self.closed {
                return Err(SupportError::Closed {
                    needle: needle.to_string(),
                    tail: self.tail(40),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((at, line)) if line.contains(needle) => return Ok(at),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(SupportError::Timeout {
                        needle: needle.to_string(),
                        waited: started.elapsed(),
                        tail: self.tail(40),
                    })
                }
                Err(RecvTimeoutError::Disconnected) => self.closed = true,
            }
        }
    }

    /// When the first line was read, if one was.
    pub fn first_line_at(&self) -> Option<Instant> {
        *self.first_line.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// All retained lines (the last [`MAX_LINES`]).
    pub fn lines(&self) -> Vec<String> {
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// The last `n` lines joined with newlines.
    pub fn tail(&self, n: usize) -> String {
        let lines = self.lines();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes (the rest of a longer line is dropped);
/// strips `\r\n`. `None` at end of stream.
fn read_bounded_line(reader: &mut impl BufRead) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    let mut any = false;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        any = true;
        let (chunk, used, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], i + 1, true),
            None => (buf, buf.len(), false),
        };
        let room = MAX_LINE.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        reader.consume(used);
        if done {
            break;
        }
    }
    if !any {
        return Ok(None);
    }
    while line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

/// Waits until `reader` yields a line containing `needle`, at most until `deadline`; returns
/// the console (to keep reading or inspect) and when the line arrived.
pub fn wait_for_line<R: Read + Send + 'static>(
    reader: R,
    needle: &str,
    deadline: Instant,
) -> Result<(Console, Instant), SupportError> {
    let mut console = Console::spawn(reader);
    let at = console.wait_for_line(needle, deadline)?;
    Ok((console, at))
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
        let mut s = String::from("console=ttyS0 reboot=t panic=-1");
        if !self.extra_cmdline.is_empty() {
            s.push(' ');
            s.push_str(&self.extra_cmdline);
        }
        s
    }

    /// The QEMU command (serial console on its stdout).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.qemu);
        let machine = match self.machine {
            Machine::Microvm => "microvm",
            Machine::Pc => "pc",
        };
        cmd.args(["-M", machine, "-accel", &self.accel])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-monitor", "none", "-serial", "stdio", "-no-reboot"])
            .args(["-m", &self.memory_mib.to_string()])
            .args(["-smp", &self.cpus.to_string()]);
        if self.accel == "kvm" {
            cmd.args(["-cpu", "host"]);
        }
        cmd.arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initramfs)
            .arg("-append")
            .arg(self.cmdline())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
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
    let mut cmd = boot.command();
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
    // QEMU's own complaints follow its console output, so failures show them.
    let mut console = Console::spawn(stdout.chain(stderr));
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
    fn wait_for_line_finds_the_line() {
        let input = b"booting\r\nstill booting\nKILN-AGENT-READY\nafter\n".to_vec();
        let (mut console, _) = wait_for_line(
            std::io::Cursor::new(input),
            READY_LINE,
            Instant::now() + Duration::from_secs(5),
        )
        .unwrap();
        assert!(console.first_line_at().is_some());
        // Lines before READY are in the history without their \r.
        assert_eq!(console.lines()[..2], ["booting", "still booting"]);
        console
            .wait_for_line("after", Instant::now() + Duration::from_secs(5))
            .unwrap();
    }

    #[test]
    fn wait_for_line_reports_closed_stream() {
        let err = wait_for_line(
            std::io::Cursor::new(b"panic: no init\n".to_vec()),
            READY_LINE,
            Instant::now() + Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(matches!(err, SupportError::Closed { .. }), "{err}");
        assert!(err.to_string().contains("panic: no init"), "{err}");
    }

    #[test]
    fn wait_for_line_times_out() {
        // A pipe that stays open and silent: the deadline must end the wait.
        let mut child = Command::new("sleep")
            .arg("5")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let started = Instant::now();
        let err = wait_for_line(out, READY_LINE, Instant::now() + Duration::from_millis(200))
            .unwrap_err();
        assert!(matches!(err, SupportError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn long_lines_are_bounded() {
        let mut input = vec![b'x'; MAX_LINE * 3];
        input.extend_from_slice(b"\nKILN-AGENT-READY\n");
        let (console, _) = wait_for_line(
            std::io::Cursor::new(input),
            READY_LINE,
            Instant::now() + Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(console.lines()[0].len(), MAX_LINE);
    }

    #[test]
    fn qemu_command_line() {
        let boot = QemuBoot::new("/k", "/i");
        let cmd = boot.command();
        let args: Vec<String> = cmd
            .get_args()
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
