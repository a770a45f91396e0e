//! Host facts: which kind of KVM this host offers.
//!
//! One reusable answer to "can this host boot Linux guests?" ([`detect`]) shared by xtask, the
//! `kiln doctor` CLI and the tier-4 tests. (Where Kiln keeps its guest assets is not the VMM's
//! business: the VMM takes paths; `kiln::assets` locates them.)
//!
//! Detection is split in two: gathering [`HostFacts`] from the running system (device node,
//! `/sys/module`, `/proc/cpuinfo`) and the pure [`classify`] step, so the decision logic is
//! unit-tested without depending on the machine the tests run on.

use std::fmt;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// `KVM_GET_API_VERSION` = `_IO(KVMIO, 0x00)` with `KVMIO` = 0xAE.
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
/// The only KVM API version Linux has ever reported.
const KVM_API_VERSION: i32 = 12;

/// CPU vendor of a hardware-virtualization host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuVendor {
    /// Intel VT-x (`vmx` flag).
    Intel,
    /// AMD-V (`svm` flag).
    Amd,
}

impl fmt::Display for CpuVendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CpuVendor::Intel => f.write_str("Intel VT-x"),
            CpuVendor::Amd => f.write_str("AMD-V"),
        }
    }
}

/// Why this host has no usable KVM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoKvmReason {
    /// The device node does not exist (module not loaded, container without the device).
    DeviceMissing {
        /// The path looked at (normally `/dev/kvm`).
        path: PathBuf,
    },
    /// The device exists but this user may not open it read-write.
    PermissionDenied {
        /// The device path.
        path: PathBuf,
    },
    /// Opening the device failed for another reason.
    OpenFailed {
        /// The device path.
        path: PathBuf,
        /// The OS error text.
        error: String,
    },
    /// The device opened but does not answer `KVM_GET_API_VERSION` as KVM does.
    NotKvm {
        /// The device path.
        path: PathBuf,
        /// What the ioctl said (version or error).
        detail: String,
    },
    /// KVM works but the CPU flags show neither `vmx` nor `svm` and it is not PVM.
    NoVirtExtensions,
}

impl fmt::Display for NoKvmReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoKvmReason::DeviceMissing { path } => {
                write!(
                    f,
                    "{} does not exist (is the kvm module loaded?)",
                    path.display()
                )
            }
            NoKvmReason::PermissionDenied { path } => write!(
                f,
                "no permission to open {} read-write (add the user to the kvm group)",
                path.display()
            ),
            NoKvmReason::OpenFailed { path, error } => {
                write!(f, "cannot open {}: {error}", path.display())
            }
            NoKvmReason::NotKvm { path, detail } => {
                write!(f, "{} is not a usable KVM device: {detail}", path.display())
            }
            NoKvmReason::NoVirtExtensions => {
                f.write_str("the CPU flags show neither vmx nor svm (no hardware virtualization)")
            }
        }
    }
}

/// What kind of virtualization this host offers to Kiln.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKind {
    /// /dev/kvm is usable on a CPU with VMX or SVM: real Linux guests boot here (tier 4).
    HardwareVirt {
        /// Which extension the CPU has.
        vendor: CpuVendor,
    },
    /// /dev/kvm is `kvm-pvm`: only bare-metal test guests (tier 2) or PVM-patched kernels boot;
    /// Linux end-to-end tests need the emulated-virtualization harness.
    Pvm,
    /// No usable KVM at all.
    NoKvm {
        /// What is missing.
        reason: NoKvmReason,
    },
}

impl HostKind {
    /// Whether stock Linux guests (the Kiln guest kernel) can boot directly on this host.
    pub fn runs_linux_guests(&self) -> bool {
        matches!(self, HostKind::HardwareVirt { .. })
    }

    /// Whether /dev/kvm can run at least the bare-metal test guest (tier 2).
    pub fn has_kvm(&self) -> bool {
        !matches!(self, HostKind::NoKvm { .. })
    }
}

impl fmt::Display for HostKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostKind::HardwareVirt { vendor } => {
                write!(f, "hardware virtualization ({vendor}) with usable /dev/kvm")
            }
            HostKind::Pvm => f.write_str(
                "kvm-pvm (no VMX/SVM): bare-metal test guests only; Linux guests need `cargo xtask harness`",
            ),
            HostKind::NoKvm { reason } => write!(f, "no usable KVM: {reason}"),
        }
    }
}

/// State of the KVM device node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmDevice {
    /// Opened read-write and answered the expected API version.
    Usable,
    /// Missing or unusable, with the reason.
    Unusable(NoKvmReason),
}

/// Raw facts gathered from the host; [`classify`] turns them into a [`HostKind`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// The device node.
    pub kvm_device: KvmDevice,
    /// `/sys/module/kvm_pvm` exists.
    pub pvm_module: bool,
    /// Virtualization extension found in the CPU flags, if any.
    pub cpu_virt: Option<CpuVendor>,
}

/// Where [`gather_facts`] looks; tests point it at temporary files.
#[derive(Debug, Clone)]
pub struct HostPaths {
    /// Normally `/dev/kvm`.
    pub kvm_device: PathBuf,
    /// Normally `/sys/module`.
    pub sys_module: PathBuf,
    /// Normally `/proc/cpuinfo`.
    pub cpuinfo: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        HostPaths {
            kvm_device: PathBuf::from("/dev/kvm"),
            sys_module: PathBuf::from("/sys/module"),
            cpuinfo: PathBuf::from("/proc/cpuinfo"),
        }
    }
}

/// Detects what this host offers: hardware virtualization, PVM, or no usable KVM.
pub fn detect() -> HostKind {
    classify(&gather_facts(&HostPaths::default()))
}

/// The decision: unusable device wins, then PVM, then the CPU's extension.
pub fn classify(facts: &HostFacts) -> HostKind {
    if let KvmDevice::Unusable(reason) = &facts.kvm_device {
        return HostKind::NoKvm {
            reason: reason.clone(),
        };
    }
    if facts.pvm_module {
        return HostKind::Pvm;
    }
    match facts.cpu_virt {
        Some(vendor) => HostKind::HardwareVirt { vendor },
        None => HostKind::NoKvm {
            reason: NoKvmReason::NoVirtExtensions,
        },
    }
}

/// Reads the facts from the given locations.
pub fn gather_facts(paths: &HostPaths) -> HostFacts {
    HostFacts {
        kvm_device: probe_kvm_device(&paths.kvm_device),
        pvm_module: paths.sys_module.join("kvm_pvm").exists(),
        cpu_virt: std::fs::read_to_string(&paths.cpuinfo)
            .ok()
            .and_then(|text| cpu_virt_from_cpuinfo(&text)),
    }
}

/// Opens the device read-write and asks for the KVM API version.
pub fn probe_kvm_device(path: &Path) -> KvmDevice {
    let file = match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
    {
        Ok(file) => file,
        Err(e) => {
            let path = path.to_path_buf();
            return KvmDevice::Unusable(match e.kind() {
                io::ErrorKind::NotFound => NoKvmReason::DeviceMissing { path },
                io::ErrorKind::PermissionDenied => NoKvmReason::PermissionDenied { path },
                _ => NoKvmReason::OpenFailed {
                    path,
                    error: e.to_string(),
                },
            });
        }
    };
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int; the fd is owned by
    // `file` and open for the duration of the call. On a non-KVM file it fails with ENOTTY.
    let version = unsafe { libc::ioctl(file.as_raw_fd(), KVM_GET_API_VERSION as _) };
    if version == KVM_API_VERSION {
        KvmDevice::Usable
    } else {
        let detail = if version < 0 {
            format!("KVM_GET_API_VERSION failed: {}", io::Error::last_os_error())
        } else {
            format!("KVM_GET_API_VERSION returned {version}, expected {KVM_API_VERSION}")
        };
        KvmDevice::Unusable(NoKvmReason::NotKvm {
            path: path.to_path_buf(),
            detail,
        })
    }
}

/// Finds `vmx` or `svm` among the `flags` lines of /proc/cpuinfo text.
pub fn cpu_virt_from_cpuinfo(cpuinfo: &str) -> Option<CpuVendor> {
    for line in cpuinfo.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        if key.trim() != "flags" {
            continue;
        }
        for flag in value.split_whitespace() {
            match flag {
                "vmx" => return Some(CpuVendor::Intel),
                "svm" => return Some(CpuVendor::Amd),
                _ => {}
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_flags_parsing() {
        let amd = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu vme svm npt\n";
        assert_eq!(cpu_virt_from_cpuinfo(amd), Some(CpuVendor::Amd));
        let intel = "flags\t\t: fpu vmx ept\n";
        assert_eq!(cpu_virt_from_cpuinfo(intel), Some(CpuVendor::Intel));
        // "svm" only counts as a whole flag in the flags line.
        let none = "model name\t: svm vmx\nflags\t\t: fpu svmx hypervisor\n";
        assert_eq!(cpu_virt_from_cpuinfo(none), None);
        assert_eq!(cpu_virt_from_cpuinfo(""), None);
    }

    fn facts(dev: KvmDevice, pvm: bool, cpu: Option<CpuVendor>) -> HostFacts {
        HostFacts {
            kvm_device: dev,
            pvm_module: pvm,
            cpu_virt: cpu,
        }
    }

    #[test]
    fn classify_decisions() {
        let missing = NoKvmReason::DeviceMissing {
            path: PathBuf::from("/dev/kvm"),
        };
        assert_eq!(
            classify(&facts(
                KvmDevice::Unusable(missing.clone()),
                true,
                Some(CpuVendor::Amd)
            )),
            HostKind::NoKvm { reason: missing }
        );
        assert_eq!(
            classify(&facts(KvmDevice::Usable, true, None)),
            HostKind::Pvm
        );
        // PVM wins even if the (nested) CPU advertises svm.
        assert_eq!(
            classify(&facts(KvmDevice::Usable, true, Some(CpuVendor::Amd))),
            HostKind::Pvm
        );
        assert_eq!(
            classify(&facts(KvmDevice::Usable, false, Some(CpuVendor::Intel))),
            HostKind::HardwareVirt {
                vendor: CpuVendor::Intel
            }
        );
        assert_eq!(
            classify(&facts(KvmDevice::Usable, false, None)),
            HostKind::NoKvm {
                reason: NoKvmReason::NoVirtExtensions
            }
        );
        assert!(HostKind::HardwareVirt {
            vendor: CpuVendor::Amd
        }
        .runs_linux_guests());
        assert!(!HostKind::Pvm.runs_linux_guests());
        assert!(HostKind::Pvm.has_kvm());
    }

    #[test]
    fn gather_facts_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let cpuinfo = dir.path().join("cpuinfo");
        std::fs::write(&cpuinfo, "flags\t: fpu svm\n").unwrap();
        let sys_module = dir.path().join("module");
        std::fs::create_dir_all(sys_module.join("kvm_pvm")).unwrap();
        let paths = HostPaths {
            kvm_device: dir.path().join("kvm"),
            sys_module: sys_module.clone(),
            cpuinfo,
        };
        let f = gather_facts(&paths);
        assert!(matches!(
            f.kvm_device,
            KvmDevice::Unusable(NoKvmReason::DeviceMissing { .. })
        ));
        assert!(f.pvm_module);
        assert_eq!(f.cpu_virt, Some(CpuVendor::Amd));

        // A regular file is no KVM device: the ioctl fails with ENOTTY.
        std::fs::write(&paths.kvm_device, b"").unwrap();
        let kind = classify(&gather_facts(&paths));
        assert!(
            matches!(
                kind,
                HostKind::NoKvm {
                    reason: NoKvmReason::NotKvm { .. }
                }
            ),
            "{kind:?}"
        );
        assert!(kind.to_string().contains("not a usable KVM device"));
    }

    #[test]
    fn detect_agrees_with_the_device_node() {
        // Whatever this host is, detect() must not claim KVM when /dev/kvm cannot be opened.
        let kind = detect();
        let openable = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        if !openable {
            assert!(!kind.has_kvm(), "{kind}");
        }
        assert!(!kind.to_string().is_empty());
    }
}
