//! The one QEMU command-line builder: [`QemuCommand`]. Every place Kiln starts QEMU (the QEMU
//! microvm peer of `kiln-bench exec`, the tier-4 QEMU boot test, `cargo xtask bench vmm`'s
//! QEMU peer and the harness's L1) describes its machine here and gets the same base line:
//!
//! `[-M MACHINE] -accel ACCEL [-cpu CPU] -smp N -m MIB -nodefaults -no-user-config
//! -display none -monitor MONITOR -serial stdio -no-reboot EXTRA... -kernel K [-initrd I]
//! [-append CMDLINE]`
//!
//! The serial console is QEMU's stdout, QEMU's own messages go to its stderr (both piped by
//! [`QemuCommand::command`]); nothing is read from stdin.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The QEMU binary used unless told otherwise.
pub const QEMU: &str = "qemu-system-x86_64";

/// A QEMU machine description that turns into its command line.
#[derive(Debug, Clone)]
pub struct QemuCommand {
    program: PathBuf,
    machine: Option<String>,
    accel: String,
    cpu: Option<String>,
    smp: u32,
    memory_mib: u32,
    monitor: String,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    append: Option<String>,
    extra: Vec<OsString>,
}

impl QemuCommand {
    /// Boots `kernel` with the defaults: [`QEMU`], QEMU's default machine, `-accel kvm`, 1
    /// vCPU, 128 MiB, no monitor, no initrd, no command line.
    pub fn new(kernel: impl Into<PathBuf>) -> QemuCommand {
        QemuCommand {
            program: PathBuf::from(QEMU),
            machine: None,
            accel: "kvm".into(),
            cpu: None,
            smp: 1,
            memory_mib: 128,
            monitor: "none".into(),
            kernel: kernel.into(),
            initrd: None,
            append: None,
            extra: Vec::new(),
        }
    }

    /// The QEMU binary.
    pub fn program(mut self, program: impl Into<PathBuf>) -> Self {
        self.program = program.into();
        self
    }

    /// `-M MACHINE` (e.g. `microvm,acpi=off`).
    pub fn machine(mut self, machine: impl Into<String>) -> Self {
        self.machine = Some(machine.into());
        self
    }

    /// `-accel ACCEL` (`kvm`, `tcg`).
    pub fn accel(mut self, accel: impl Into<String>) -> Self {
        self.accel = accel.into();
        self
    }

    /// `-cpu CPU` (e.g. `host`).
    pub fn cpu(mut self, cpu: impl Into<String>) -> Self {
        self.cpu = Some(cpu.into());
        self
    }

    /// `-smp N`.
    pub fn smp(mut self, vcpus: u32) -> Self {
        self.smp = vcpus;
        self
    }

    /// `-m MIB`.
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// `-monitor MONITOR` (default `none`).
    pub fn monitor(mut self, monitor: impl Into<String>) -> Self {
        self.monitor = monitor.into();
        self
    }

    /// `-initrd PATH`.
    pub fn initrd(mut self, initrd: impl Into<PathBuf>) -> Self {
        self.initrd = Some(initrd.into());
        self
    }

    /// `-append CMDLINE`.
    pub fn append(mut self, cmdline: impl Into<String>) -> Self {
        self.append = Some(cmdline.into());
        self
    }

    /// One more argument (devices, shares, chardevs), placed before `-kernel`.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.extra.push(arg.into());
        self
    }

    /// More arguments, placed before `-kernel`.
    pub fn extra_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.extra.extend(args.into_iter().map(Into::into));
        self
    }

    /// The QEMU binary this runs.
    pub fn program_path(&self) -> &std::path::Path {
        &self.program
    }

    /// The arguments (without the program).
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: &str| a.push(s.into());
        if let Some(m) = &self.machine {
            push("-M");
            push(m);
        }
        push("-accel");
        push(&self.accel);
        if let Some(c) = &self.cpu {
            push("-cpu");
            push(c);
        }
        push("-smp");
        push(&self.smp.to_string());
        push("-m");
        push(&self.memory_mib.to_string());
        for s in ["-nodefaults", "-no-user-config", "-display", "none"] {
            push(s);
        }
        push("-monitor");
        push(&self.monitor);
        for s in ["-serial", "stdio", "-no-reboot"] {
            push(s);
        }
        a.extend(self.extra.iter().cloned());
        a.push("-kernel".into());
        a.push(self.kernel.clone().into());
        if let Some(i) = &self.initrd {
            a.push("-initrd".into());
            a.push(i.clone().into());
        }
        if let Some(c) = &self.append {
            a.push("-append".into());
            a.push(c.into());
        }
        a
    }

    /// The command: serial console on stdout, QEMU's messages on stderr (both piped), stdin
    /// from /dev/null. Callers may redirect further before spawning.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(self.to_args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined(q: &QemuCommand) -> String {
        q.to_args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn base_line_in_order() {
        let q = QemuCommand::new("/k")
            .machine("microvm,acpi=off")
            .cpu("host")
            .smp(2)
            .memory_mib(256)
            .initrd("/i")
            .append("console=ttyS0 reboot=t panic=-1")
            .extra_args(["-device", "vhost-vsock-device,guest-cid=7"]);
        assert_eq!(
            joined(&q),
            "-M microvm,acpi=off -accel kvm -cpu host -smp 2 -m 256 -nodefaults \
             -no-user-config -display none -monitor none -serial stdio -no-reboot -device \
             vhost-vsock-device,guest-cid=7 -kernel /k -initrd /i -append console=ttyS0 \
             reboot=t panic=-1"
        );
        assert_eq!(q.program_path(), std::path::Path::new(QEMU));
    }

    #[test]
    fn optional_parts_are_left_out() {
        let q = QemuCommand::new("/k")
            .accel("tcg")
            .monitor("unix:/m,server=on,wait=off");
        let j = joined(&q);
        assert!(j.starts_with("-accel tcg -smp 1 -m 128 "), "{j}");
        assert!(j.contains("-monitor unix:/m,server=on,wait=off"), "{j}");
        assert!(j.ends_with("-kernel /k"), "{j}");
        assert!(
            !j.contains("-M ") && !j.contains("-cpu") && !j.contains("-initrd"),
            "{j}"
        );
    }
}
