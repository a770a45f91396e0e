//! The Python exception hierarchy and the one place where Kiln's Rust errors become Python
//! exceptions.
//!
//! [`map_error`] and [`map_pool_error`] are pure Rust (unit-tested without an interpreter):
//! they pick an [`ErrorClass`] for a [`SandboxError`] / [`SandboxPoolError`] and keep its
//! message, sandbox, operation, guest error kind and serial tail. [`to_pyerr`] builds the
//! exception. The classes themselves are created once per interpreter by [`classes`], from
//! [`CLASSES`], with `type(name, bases, dict)` so that some also derive from a built-in
//! (`ConfigError` is a `ValueError`, `NotFoundError` a `FileNotFoundError`...).

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

use kiln::{ConfigError, ErrorKind, SandboxError, SandboxPoolError};

/// The exception classes of the `kiln` module (each variant names its Python class).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    KilnError,
    ConfigError,
    MissingAssetError,
    InvalidArgumentError,
    NoKvmError,
    UnsupportedHostError,
    BootError,
    BootTimeout,
    HandshakeError,
    VmError,
    GuestDied,
    ExecError,
    GuestError,
    NotFoundError,
    PermissionDeniedError,
    AlreadyExistsError,
    AgentTimeout,
    ProtocolError,
    HostIOError,
    SnapshotError,
    SandboxClosedError,
    PoolError,
    PoolTimeout,
    PoolClosedError,
    CommandError,
    CommandTimeout,
}

/// One row of the hierarchy: the class, its Kiln parent, an extra built-in base, its doc.
type ClassRow = (
    ErrorClass,
    Option<ErrorClass>,
    Option<&'static str>,
    &'static str,
);

/// Every class, parents before children.
pub const CLASSES: &[ClassRow] = {
    use ErrorClass as C;
    &[
        (C::KilnError, None, None, "Base class of every Kiln error. `str(e)` is Kiln's message (with the guest's serial console tail when the guest died); attributes: `vm` (sandbox name), `op` (operation), `guest_kind` (the agent's error kind), `serial_tail`."),
        (C::ConfigError, Some(C::KilnError), Some("ValueError"), "An invalid sandbox or pool configuration (the message names the field)."),
        (C::MissingAssetError, Some(C::ConfigError), None, "The guest kernel or initramfs is missing (build it with `cargo xtask kernel && cargo xtask build-guest`)."),
        (C::InvalidArgumentError, Some(C::KilnError), Some("ValueError"), "A call was invalid (empty command, out-of-bounds request)."),
        (C::NoKvmError, Some(C::KilnError), None, "This host has no usable /dev/kvm (missing, no permission)."),
        (C::UnsupportedHostError, Some(C::NoKvmError), None, "This host's KVM cannot boot the Linux guest (kvm-pvm); run inside the harness."),
        (C::BootError, Some(C::KilnError), None, "The sandbox did not come up."),
        (C::BootTimeout, Some(C::BootError), Some("TimeoutError"), "The guest agent did not connect within `boot_timeout`."),
        (C::HandshakeError, Some(C::BootError), None, "The guest agent's handshake was wrong (protocol version, bounds)."),
        (C::VmError, Some(C::KilnError), None, "The VMM failed (creating, starting or stopping the VM, its vsock device)."),
        (C::GuestDied, Some(C::KilnError), None, "The guest VM ended or its agent connection broke during `op`; the sandbox is unusable."),
        (C::ExecError, Some(C::KilnError), None, "The agent refused to start the command (bad cwd, invalid environment)."),
        (C::GuestError, Some(C::KilnError), None, "The agent answered with an error; `guest_kind` names it (`NotFound`, `DirectoryNotEmpty`...)."),
        (C::NotFoundError, Some(C::GuestError), Some("FileNotFoundError"), "No such file or directory in the guest."),
        (C::PermissionDeniedError, Some(C::GuestError), Some("PermissionError"), "Permission denied in the guest."),
        (C::AlreadyExistsError, Some(C::GuestError), Some("FileExistsError"), "The guest path already exists."),
        (C::AgentTimeout, Some(C::KilnError), Some("TimeoutError"), "The guest agent did not answer within `request_timeout` although the VM runs."),
        (C::ProtocolError, Some(C::KilnError), None, "The guest agent broke the protocol."),
        (C::HostIOError, Some(C::KilnError), None, "Host-side I/O failed (reading a stdin source...)."),
        (C::SnapshotError, Some(C::KilnError), None, "Taking or restoring a snapshot failed (other Kiln version or KVM kind, corrupted files)."),
        (C::SandboxClosedError, Some(C::KilnError), None, "The sandbox was shut down (or returned to its pool)."),
        (C::PoolError, Some(C::KilnError), None, "A sandbox pool failed."),
        (C::PoolTimeout, Some(C::PoolError), Some("TimeoutError"), "`acquire()` waited `acquire_timeout` for a free slot."),
        (C::PoolClosedError, Some(C::PoolError), None, "The pool was shut down."),
        (C::CommandError, Some(C::KilnError), None, "`run(..., check=True)`: the command did not exit 0; `result` holds its Result."),
        (C::CommandTimeout, Some(C::CommandError), Some("TimeoutError"), "`run(..., check=True)`: the command's `timeout` fired and its process group was killed; `result` holds its Result."),
    ]
};

impl ErrorClass {
    /// The Python class name.
    pub fn name(self) -> &'static str {
        match self {
            Self::KilnError => "KilnError",
            Self::ConfigError => "ConfigError",
            Self::MissingAssetError => "MissingAssetError",
            Self::InvalidArgumentError => "InvalidArgumentError",
            Self::NoKvmError => "NoKvmError",
            Self::UnsupportedHostError => "UnsupportedHostError",
            Self::BootError => "BootError",
            Self::BootTimeout => "BootTimeout",
            Self::HandshakeError => "HandshakeError",
            Self::VmError => "VmError",
            Self::GuestDied => "GuestDied",
            Self::ExecError => "ExecError",
            Self::GuestError => "GuestError",
            Self::NotFoundError => "NotFoundError",
            Self::PermissionDeniedError => "PermissionDeniedError",
            Self::AlreadyExistsError => "AlreadyExistsError",
            Self::AgentTimeout => "AgentTimeout",
            Self::ProtocolError => "ProtocolError",
            Self::HostIOError => "HostIOError",
            Self::SnapshotError => "SnapshotError",
            Self::SandboxClosedError => "SandboxClosedError",
            Self::PoolError => "PoolError",
            Self::PoolTimeout => "PoolTimeout",
            Self::PoolClosedError => "PoolClosedError",
            Self::CommandError => "CommandError",
            Self::CommandTimeout => "CommandTimeout",
        }
    }

    fn index(self) -> usize {
        CLASSES
            .iter()
            .position(|row| row.0 == self)
            .unwrap_or_default()
    }
}

/// What a Rust error becomes in Python.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorInfo {
    /// The exception class.
    pub class: ErrorClass,
    /// `str(exception)`: Kiln's message (it ends with the serial tail when there is one).
    pub message: String,
    /// The sandbox the error names.
    pub vm: Option<String>,
    /// The operation (`"exec"`, `"read_file"`, `"boot"`...).
    pub op: Option<&'static str>,
    /// The agent's error kind (`"NotFound"`...), for errors the guest reported.
    pub guest_kind: Option<String>,
    /// The end of the guest's serial console, for errors about a dead or stuck guest.
    pub serial_tail: Option<String>,
}

impl ErrorInfo {
    /// An error of `class` with only a message.
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
            vm: None,
            op: None,
            guest_kind: None,
            serial_tail: None,
        }
    }
}

/// The class for an error the agent reported with `kind`.
fn guest_class(kind: ErrorKind) -> ErrorClass {
    match kind {
        ErrorKind::NotFound => ErrorClass::NotFoundError,
        ErrorKind::PermissionDenied => ErrorClass::PermissionDeniedError,
        ErrorKind::AlreadyExists => ErrorClass::AlreadyExistsError,
        _ => ErrorClass::GuestError,
    }
}

fn config_class(e: &ConfigError) -> ErrorClass {
    match e {
        // An unknown or damaged root-filesystem image: the configuration names it.
        ConfigError::Invalid { .. } | ConfigError::Image(_) => ErrorClass::ConfigError,
        ConfigError::MissingAsset { .. } | ConfigError::AssetsDir { .. } => {
            ErrorClass::MissingAssetError
        }
    }
}

/// Maps a [`SandboxError`] to its Python form. The only place that matches its variants
/// (plus [`map_pool_error`] for the pool's own variants).
pub fn map_error(e: &SandboxError) -> ErrorInfo {
    use ErrorClass as C;
    let mut info = ErrorInfo::new(C::KilnError, e.to_string());
    let (class, vm, op, tail): (_, Option<&str>, Option<&'static str>, Option<&str>) = match e {
        SandboxError::Config(c) => (config_class(c), None, None, None),
        SandboxError::NoKvm { vm, .. } => (C::NoKvmError, Some(vm), None, None),
        SandboxError::UnsupportedHost { vm } => (C::UnsupportedHostError, Some(vm), None, None),
        SandboxError::Vm {
            vm,
            op,
            serial_tail,
            ..
        } => (C::VmError, Some(vm), Some(*op), Some(serial_tail)),
        SandboxError::Vsock { vm, op, .. } => (C::VmError, Some(vm), Some(*op), None),
        SandboxError::BootTimeout {
            vm, serial_tail, ..
        } => (C::BootTimeout, Some(vm), Some("boot"), Some(serial_tail)),
        SandboxError::Handshake {
            vm, serial_tail, ..
        } => (C::HandshakeError, Some(vm), Some("boot"), Some(serial_tail)),
        SandboxError::GuestDied {
            vm,
            op,
            serial_tail,
            ..
        } => (C::GuestDied, Some(vm), Some(*op), Some(serial_tail)),
        SandboxError::ExecFailed { vm, op, kind, .. } => {
            info.guest_kind = Some(format!("{kind:?}"));
            (C::ExecError, Some(vm), Some(*op), None)
        }
        SandboxError::Guest { vm, op, kind, .. } => {
            info.guest_kind = Some(format!("{kind:?}"));
            (guest_class(*kind), Some(vm), Some(*op), None)
        }
        SandboxError::Timeout { vm, op, .. } => (C::AgentTimeout, Some(vm), Some(*op), None),
        SandboxError::Protocol { vm, op, .. } => (C::ProtocolError, Some(vm), Some(*op), None),
        SandboxError::Io { vm, op, .. } => (C::HostIOError, Some(vm), Some(*op), None),
        SandboxError::InvalidArgument { vm, op, .. } => {
            (C::InvalidArgumentError, Some(vm), Some(*op), None)
        }
        SandboxError::Snapshot { vm, op, .. } => (C::SnapshotError, Some(vm), Some(*op), None),
        // Variants added later: the base class, with Kiln's message.
        #[allow(unreachable_patterns)]
        _ => (C::KilnError, None, None, None),
    };
    info.class = class;
    info.vm = vm.filter(|v| !v.is_empty()).map(str::to_owned);
    info.op = op;
    info.serial_tail = tail
        .map(str::trim_end)
        .filter(|t| !t.is_empty())
        .map(str::to_owned);
    info
}

/// Maps a [`SandboxPoolError`] to its Python form: a failed boot keeps the class of its
/// cause (with the pool's message), a bad configuration is a `ConfigError`.
pub fn map_pool_error(e: &SandboxPoolError) -> ErrorInfo {
    use ErrorClass as C;
    let message = e.to_string();
    match e {
        SandboxPoolError::SandboxConfig(c) => ErrorInfo::new(config_class(c), message),
        SandboxPoolError::PoolConfig(_) => ErrorInfo::new(C::ConfigError, message),
        SandboxPoolError::Create(inner) => ErrorInfo {
            message,
            ..map_error(inner)
        },
        SandboxPoolError::TimedOut { .. } => ErrorInfo::new(C::PoolTimeout, message),
        SandboxPoolError::ShutDown => ErrorInfo::new(C::PoolClosedError, message),
        #[allow(unreachable_patterns)]
        _ => ErrorInfo::new(C::PoolError, message),
    }
}

/// The classes of this interpreter, indexed like [`CLASSES`].
static TYPES: PyOnceLock<Vec<Py<PyType>>> = PyOnceLock::new();

/// Creates (once) and returns the exception classes, indexed like [`CLASSES`].
pub fn classes(py: Python<'_>) -> PyResult<&Vec<Py<PyType>>> {
    TYPES.get_or_try_init(py, || {
        let builtins = py.import("builtins")?;
        let type_type = py.get_type::<PyType>();
        let mut made: Vec<Py<PyType>> = Vec::with_capacity(CLASSES.len());
        for (class, parent, builtin, doc) in CLASSES {
            let mut bases = Vec::new();
            match parent {
                Some(p) => bases.push(made[p.index()].bind(py).clone().into_any()),
                None => bases.push(builtins.getattr("Exception")?),
            }
            if let Some(b) = builtin {
                bases.push(builtins.getattr(*b)?);
            }
            let dict = PyDict::new(py);
            dict.set_item("__module__", "kiln")?;
            dict.set_item("__doc__", *doc)?;
            if *class == ErrorClass::KilnError {
                for attr in ["vm", "op", "guest_kind", "serial_tail"] {
                    dict.set_item(attr, py.None())?;
                }
            }
            if *class == ErrorClass::CommandError {
                dict.set_item("result", py.None())?;
            }
            let t = type_type.call1((class.name(), PyTuple::new(py, bases)?, dict))?;
            made.push(t.cast_into::<PyType>()?.unbind());
        }
        Ok(made)
    })
}

/// The Python class for `class`.
pub fn class(py: Python<'_>, class: ErrorClass) -> PyResult<Bound<'_, PyType>> {
    Ok(classes(py)?[class.index()].bind(py).clone())
}

/// Builds the exception for `info`.
pub fn to_pyerr(py: Python<'_>, info: ErrorInfo) -> PyErr {
    build(py, info, None).unwrap_or_else(|e| e)
}

/// Builds the exception for `info`, with `result` as its `result` attribute.
pub fn to_pyerr_with_result(py: Python<'_>, info: ErrorInfo, result: Py<PyAny>) -> PyErr {
    build(py, info, Some(result)).unwrap_or_else(|e| e)
}

fn build(py: Python<'_>, info: ErrorInfo, result: Option<Py<PyAny>>) -> PyResult<PyErr> {
    let cls = class(py, info.class)?;
    let exc = cls.call1((info.message,))?;
    exc.setattr("vm", info.vm)?;
    exc.setattr("op", info.op)?;
    exc.setattr("guest_kind", info.guest_kind)?;
    exc.setattr("serial_tail", info.serial_tail)?;
    if let Some(r) = result {
        exc.setattr("result", r)?;
    }
    Ok(PyErr::from_value(exc))
}

/// `SandboxError` -> Python exception.
pub fn sandbox_err(py: Python<'_>, e: &SandboxError) -> PyErr {
    to_pyerr(py, map_error(e))
}

/// `SandboxPoolError` -> Python exception.
pub fn pool_err(py: Python<'_>, e: &SandboxPoolError) -> PyErr {
    to_pyerr(py, map_pool_error(e))
}

/// A `ConfigError` naming `field`, in the words of `kiln::ConfigError::Invalid`.
pub fn config_err(py: Python<'_>, field: &'static str, reason: String) -> PyErr {
    let e = ConfigError::Invalid { field, reason };
    to_pyerr(py, ErrorInfo::new(ErrorClass::ConfigError, e.to_string()))
}

/// A `SandboxClosedError` for sandbox `vm`.
pub fn closed_err(py: Python<'_>, vm: &str) -> PyErr {
    let mut info = ErrorInfo::new(
        ErrorClass::SandboxClosedError,
        format!("sandbox {vm}: the sandbox is shut down (or was returned to its pool)"),
    );
    info.vm = Some(vm.to_owned());
    to_pyerr(py, info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::time::Duration;

    #[test]
    fn the_hierarchy_lists_parents_first_and_every_class_once() {
        for (k, (class, parent, _, doc)) in CLASSES.iter().enumerate() {
            assert_eq!(class.index(), k, "{class:?} listed twice");
            if let Some(p) = parent {
                assert!(p.index() < k, "{class:?} before its parent {p:?}");
            } else {
                assert_eq!(*class, ErrorClass::KilnError);
            }
            assert!(!doc.is_empty());
            assert_eq!(format!("{class:?}"), class.name());
        }
    }

    #[test]
    fn config_errors_map_to_config_classes() {
        let e = SandboxError::Config(ConfigError::Invalid {
            field: "vcpus",
            reason: "0 is not in 1..=8".into(),
        });
        let i = map_error(&e);
        assert_eq!(i.class, ErrorClass::ConfigError);
        assert_eq!(
            i.message,
            "invalid sandbox configuration: vcpus: 0 is not in 1..=8"
        );
        let e = SandboxError::Config(ConfigError::MissingAsset {
            what: "kernel",
            path: PathBuf::from("/nope/vmlinux"),
            hint: kiln::config::KERNEL_HINT,
        });
        let i = map_error(&e);
        assert_eq!(i.class, ErrorClass::MissingAssetError);
        assert!(i.message.contains("/nope/vmlinux"), "{}", i.message);
    }

    #[test]
    fn guest_death_keeps_the_serial_tail_and_the_op() {
        let e = SandboxError::GuestDied {
            vm: "sb1".into(),
            op: "exec",
            reason: "agent closed the connection".into(),
            serial_tail: "Kernel panic - not syncing\n\n".into(),
        };
        let i = map_error(&e);
        assert_eq!(i.class, ErrorClass::GuestDied);
        assert_eq!(i.vm.as_deref(), Some("sb1"));
        assert_eq!(i.op, Some("exec"));
        assert_eq!(i.serial_tail.as_deref(), Some("Kernel panic - not syncing"));
        assert!(i.message.contains("Kernel panic"), "{}", i.message);

        let e = SandboxError::BootTimeout {
            vm: "sb2".into(),
            after: Duration::from_secs(3),
            serial_tail: "  \n".into(),
        };
        let i = map_error(&e);
        assert_eq!(i.class, ErrorClass::BootTimeout);
        assert_eq!(i.serial_tail, None, "a blank tail is no tail");
    }

    #[test]
    fn guest_kinds_pick_the_os_error_classes() {
        let guest = |kind| SandboxError::Guest {
            vm: "v".into(),
            op: "read_file",
            kind,
            message: "x".into(),
        };
        let cases = [
            (ErrorKind::NotFound, ErrorClass::NotFoundError),
            (
                ErrorKind::PermissionDenied,
                ErrorClass::PermissionDeniedError,
            ),
            (ErrorKind::AlreadyExists, ErrorClass::AlreadyExistsError),
            (ErrorKind::DirectoryNotEmpty, ErrorClass::GuestError),
        ];
        for (kind, class) in cases {
            let i = map_error(&guest(kind));
            assert_eq!(i.class, class, "{kind:?}");
            assert_eq!(i.guest_kind, Some(format!("{kind:?}")));
            assert_eq!(i.op, Some("read_file"));
        }
        let e = SandboxError::ExecFailed {
            vm: "v".into(),
            op: "exec",
            program: "ls".into(),
            kind: ErrorKind::NotFound,
            message: "cwd /nope: No such file or directory".into(),
        };
        assert_eq!(map_error(&e).class, ErrorClass::ExecError);
    }

    #[test]
    fn other_variants_have_their_classes() {
        let vm = || "v".to_string();
        let cases = [
            (
                SandboxError::Timeout {
                    vm: vm(),
                    op: "stat",
                    after: Duration::from_secs(1),
                },
                ErrorClass::AgentTimeout,
            ),
            (
                SandboxError::Protocol {
                    vm: vm(),
                    op: "exec",
                    message: String::new(),
                },
                ErrorClass::ProtocolError,
            ),
            (
                SandboxError::InvalidArgument {
                    vm: vm(),
                    op: "exec",
                    message: "empty command".into(),
                },
                ErrorClass::InvalidArgumentError,
            ),
            (
                SandboxError::UnsupportedHost { vm: vm() },
                ErrorClass::UnsupportedHostError,
            ),
            (
                SandboxError::Io {
                    vm: String::new(),
                    op: "stdin",
                    source: std::io::Error::other("x"),
                },
                ErrorClass::HostIOError,
            ),
        ];
        for (e, class) in cases {
            let i = map_error(&e);
            assert_eq!(i.class, class, "{e}");
            assert_eq!(i.message, e.to_string());
        }
    }

    #[test]
    fn pool_errors_map_to_pool_classes_or_their_cause() {
        let i = map_pool_error(&SandboxPoolError::ShutDown);
        assert_eq!(i.class, ErrorClass::PoolClosedError);
        let i = map_pool_error(&SandboxPoolError::TimedOut {
            waited: Duration::from_secs(1),
            in_use: 2,
            max_in_use: 2,
        });
        assert_eq!(i.class, ErrorClass::PoolTimeout);
        let i = map_pool_error(&SandboxPoolError::Create(SandboxError::BootTimeout {
            vm: "p0".into(),
            after: Duration::from_secs(1),
            serial_tail: "booting".into(),
        }));
        assert_eq!(i.class, ErrorClass::BootTimeout);
        assert!(i
            .message
            .starts_with("sandbox pool: creating a sandbox failed"));
        assert_eq!(i.serial_tail.as_deref(), Some("booting"));
    }

    #[test]
    fn python_classes_form_the_hierarchy() {
        Python::initialize();
        Python::attach(|py| {
            let cfg = class(py, ErrorClass::ConfigError).unwrap();
            let base = class(py, ErrorClass::KilnError).unwrap();
            assert!(cfg.is_subclass(&base).unwrap());
            assert!(cfg
                .is_subclass(&py.get_type::<pyo3::exceptions::PyValueError>())
                .unwrap());
            let nf = class(py, ErrorClass::NotFoundError).unwrap();
            assert!(nf
                .is_subclass(&py.get_type::<pyo3::exceptions::PyFileNotFoundError>())
                .unwrap());
            assert!(nf.is_subclass(&base).unwrap());
            assert_eq!(nf.qualname().unwrap().to_string(), "NotFoundError");

            let e = to_pyerr(
                py,
                map_error(&SandboxError::GuestDied {
                    vm: "sb".into(),
                    op: "exec",
                    reason: "gone".into(),
                    serial_tail: "tail line".into(),
                }),
            );
            let v = e.value(py);
            assert!(v.is_instance(&base).unwrap());
            let tail: String = v.getattr("serial_tail").unwrap().extract().unwrap();
            assert_eq!(tail, "tail line");
            let op: String = v.getattr("op").unwrap().extract().unwrap();
            assert_eq!(op, "exec");
            assert!(v
                .str()
                .unwrap()
                .to_string()
                .contains("the guest died during exec"));
            // Attributes default to None on the class.
            let none = config_err(py, "vcpus", "0".into());
            assert!(none.value(py).getattr("serial_tail").unwrap().is_none());
        });
    }
}
