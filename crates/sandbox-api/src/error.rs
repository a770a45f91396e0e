//! [`SandboxError`]: every failure of the public API, naming the sandbox (VM) and the operation
//! and, when the guest died, quoting the tail of its serial console.

use std::fmt;
use std::time::Duration;

use kiln_proto::ErrorKind;

use crate::config::ConfigError;

/// Bytes of serial console quoted in errors about a dead guest.
pub const SERIAL_TAIL_BYTES: usize = 2048;

/// Errors of the sandbox API.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The configuration is invalid or a guest asset is missing.
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// This host has no usable KVM (missing device, no permission...).
    #[error("sandbox {vm}: cannot use KVM: {reason}")]
    NoKvm {
        /// The sandbox.
        vm: String,
        /// Why.
        reason: kiln_vmm::host::NoKvmReason,
    },

    /// /dev/kvm works but cannot boot Linux guests (kvm-pvm without VMX/SVM).
    #[error(
        "sandbox {vm}: this host's /dev/kvm is kvm-pvm (no VMX/SVM) and cannot boot the Linux \
         guest; run through the emulated-virtualization harness instead: \
         `cargo xtask run -- CMD` (set KILN_ALLOW_PVM=1 to try anyway)"
    )]
    UnsupportedHost {
        /// The sandbox.
        vm: String,
    },

    /// The VMM failed (creating, starting or stopping the VM).
    #[error("sandbox {vm}: {op}: {source}{}", tail(.serial_tail))]
    Vm {
        /// The sandbox.
        vm: String,
        /// The operation.
        op: &'static str,
        /// What failed in the VMM (without the VM's name, which is the sandbox's; boxed: it
        /// is large).
        #[source]
        source: Box<kiln_vmm::VmErrorKind>,
        /// The end of the serial console, when there was any output.
        serial_tail: String,
    },

    /// The vsock host endpoint failed.
    #[error("sandbox {vm}: {op}: {source}")]
    Vsock {
        /// The sandbox.
        vm: String,
        /// The operation.
        op: &'static str,
        /// The vsock error.
        #[source]
        source: kiln_vmm::virtio::vsock::VsockError,
    },

    /// The agent did not connect within the boot deadline.
    #[error(
        "sandbox {vm}: the guest agent did not connect within {after:?}{}",
        tail(.serial_tail)
    )]
    BootTimeout {
        /// The sandbox.
        vm: String,
        /// The deadline.
        after: Duration,
        /// The end of the serial console.
        serial_tail: String,
    },

    /// The agent connected but its handshake was wrong (protocol version...).
    #[error("sandbox {vm}: handshake with the guest agent failed: {source}{}", tail(.serial_tail))]
    Handshake {
        /// The sandbox.
        vm: String,
        /// What went wrong.
        #[source]
        source: crate::sandbox::HandshakeError,
        /// The end of the serial console.
        serial_tail: String,
    },

    /// The guest VM ended (or its agent connection broke) while an operation was running.
    #[error("sandbox {vm}: the guest died during {op}: {reason}{}", tail(.serial_tail))]
    GuestDied {
        /// The sandbox.
        vm: String,
        /// The operation.
        op: &'static str,
        /// What was observed (VM exit reason, connection error).
        reason: String,
        /// The end of the serial console.
        serial_tail: String,
    },

    /// The command could not be started in the guest (not found, not executable, bad cwd...).
    #[error("sandbox {vm}: {op} {program:?}: {message}")]
    ExecFailed {
        /// The sandbox.
        vm: String,
        /// The operation.
        op: &'static str,
        /// argv\[0\].
        program: String,
        /// The agent's error kind.
        kind: ErrorKind,
        /// The agent's error text.
        message: String,
    },

    /// The agent answered an operation with an error (file not found...).
    #[error("sandbox {vm}: {op} failed in the guest ({kind:?}): {message}")]
    Guest {
        /// The sandbox.
        vm: String,
        /// The operation.
        op: &'static str,
        /// The agent's error kind.
        kind: ErrorKind,
        /// The agent's error text.
        message: String,
    },

    /// The agent did not answer in time although the VM is still running.
    #[error("sandbox {vm}: {op}: no response from the guest agent within {after:?}")]
    Timeout {
        /// The sandbox.
        vm: String,
        /// The operation.
        op: &'static str,
        /// The deadline.
        after: Duration,
    },

    /// The agent broke the protocol (unexpected response, malformed frame...).
    #[error("sandbox {vm}: {op}: protocol error: {message}")]
    Protocol {
        /// The sandbox.
        vm: String,
        /// The operation.
        op: &'static str,
        /// What went wrong.
        message: String,
    },

    /// A host-side I/O error (reading a stdin source, writing output...).
    #[error("sandbox {vm}: {op}: {source}")]
    Io {
        /// The sandbox.
        vm: String,
        /// The operation.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The call itself was invalid (empty argv, path not UTF-8...).
    #[error("sandbox {vm}: {op}: {message}")]
    InvalidArgument {
        /// The sandbox.
        vm: String,
        /// The operation.
        op: &'static str,
        /// What is wrong.
        message: String,
    },

    /// Taking or restoring a snapshot failed: the files were refused (other Kiln version or
    /// KVM kind, truncated, corrupted) or KVM refused the state. (snapshots)
    #[error("sandbox {vm}: {op}: {source}")]
    Snapshot {
        /// The sandbox.
        vm: String,
        /// The operation.
        op: &'static str,
        /// What failed in the VMM's snapshot code (without the VM's name, which is the
        /// sandbox's; boxed: it is large).
        #[source]
        source: Box<kiln_vmm::snapshot::SnapshotErrorKind>,
    },

    /// The egress proxy could not start, or refused or failed a host request
    /// ([`Sandbox::http_request`](crate::Sandbox::http_request)). (egress)
    #[error("sandbox {vm}: {op}: {source}")]
    Egress {
        /// The sandbox.
        vm: String,
        /// The operation.
        op: &'static str,
        /// What the proxy reported (`Denied` names the rule).
        #[source]
        source: kiln_egress::EgressError,
    },

    /// The jailed VMM process could not be started or set up (kiln-jail). A jailed VMM that
    /// dies later is [`SandboxError::GuestDied`], its reason naming the process's end.
    #[error("sandbox {vm}: {op}: {source}")]
    Jail {
        /// The sandbox.
        vm: String,
        /// The operation.
        op: &'static str,
        /// What failed (boxed: it is large).
        #[source]
        source: Box<kiln_jail::JailError>,
    },

    /// The operation is not available for a jailed sandbox yet (snapshot, restore, fork).
    #[error("sandbox {vm}: {op} is not supported for jailed sandboxes yet")]
    NotSupportedJailed {
        /// The sandbox.
        vm: String,
        /// The operation.
        op: &'static str,
    },
}

impl SandboxError {
    /// The agent's error kind, for errors the guest reported.
    pub fn guest_kind(&self) -> Option<ErrorKind> {
        match self {
            Self::ExecFailed { kind, .. } | Self::Guest { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    /// True when the guest VM (or its agent) is gone and the sandbox is unusable.
    pub fn is_guest_death(&self) -> bool {
        matches!(self, Self::GuestDied { .. })
    }

    /// True for "no such file" answers from the guest.
    pub fn is_not_found(&self) -> bool {
        self.guest_kind() == Some(ErrorKind::NotFound)
    }
}

/// Formats a serial tail for an error message (empty when there is none).
fn tail(serial_tail: &str) -> SerialTail<'_> {
    SerialTail(serial_tail)
}

struct SerialTail<'a>(&'a str);

impl fmt::Display for SerialTail<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.0.trim_end();
        if t.is_empty() {
            return Ok(());
        }
        write!(f, "\n--- last serial console output ---\n{t}\n---")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_death_quotes_the_serial_tail() {
        let e = SandboxError::GuestDied {
            vm: "vm1".into(),
            op: "exec",
            reason: "the VM shut down".into(),
            serial_tail: "Kernel panic - not syncing\n".into(),
        };
        let s = e.to_string();
        assert!(s.starts_with("sandbox vm1: the guest died during exec: the VM shut down"));
        assert!(s.contains("Kernel panic - not syncing"), "{s}");
        assert!(e.is_guest_death());
    }

    #[test]
    fn empty_tail_adds_nothing() {
        let e = SandboxError::BootTimeout {
            vm: "v".into(),
            after: Duration::from_secs(2),
            serial_tail: "  \n".into(),
        };
        assert_eq!(
            e.to_string(),
            "sandbox v: the guest agent did not connect within 2s"
        );
    }

    /// Each layer's own message, outermost first, following `source()`.
    fn chain(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
        let mut out = vec![e.to_string()];
        let mut cur = e.source();
        while let Some(s) = cur {
            out.push(s.to_string());
            cur = s.source();
        }
        out
    }

    #[test]
    fn a_vm_failure_names_the_sandbox_once_and_keeps_its_cause() {
        use kiln_vmm::{VmError, VmErrorKind};
        // What the VMM returns for a failed Vm::start of the sandbox's VM (named after it).
        let vm_err = VmError::new(
            "job-1",
            VmErrorKind::Os {
                what: "vCPU thread",
                source: std::io::Error::from_raw_os_error(libc::EAGAIN),
            },
        );
        assert_eq!(vm_err.to_string().matches("job-1").count(), 1, "{vm_err}");
        let e = SandboxError::Vm {
            vm: "job-1".into(),
            op: "starting the VM",
            source: Box::new(vm_err.into_kind()),
            serial_tail: String::new(),
        };
        let msg = e.to_string();
        let os = std::io::Error::from_raw_os_error(libc::EAGAIN).to_string();
        assert_eq!(
            msg,
            format!("sandbox job-1: starting the VM: vCPU thread: {os}")
        );
        let layers = chain(&e);
        assert_eq!(layers.len(), 3, "{layers:?}");
        // The name is added by the outermost layer only, and the full rendering has it once.
        assert_eq!(layers.join("\n").matches("job-1").count(), 1, "{layers:?}");
        // The cause is the typed OS error, not a string.
        let mut last: &(dyn std::error::Error + 'static) = &e;
        while let Some(s) = last.source() {
            last = s;
        }
        let io = last.downcast_ref::<std::io::Error>();
        assert_eq!(io.and_then(|e| e.raw_os_error()), Some(libc::EAGAIN));
    }

    #[test]
    fn a_snapshot_failure_names_the_sandbox_once() {
        use kiln_vmm::snapshot::{SnapshotError, SnapshotErrorKind};
        let snap = SnapshotError::new(
            "job-2",
            SnapshotErrorKind::NotSnapshottable {
                what: "it has exited".into(),
            },
        );
        assert_eq!(snap.to_string(), "VM job-2: cannot snapshot: it has exited");
        let e = SandboxError::Snapshot {
            vm: "job-2".into(),
            op: "snapshot",
            source: Box::new(snap.into_kind()),
        };
        assert_eq!(
            e.to_string(),
            "sandbox job-2: snapshot: cannot snapshot: it has exited"
        );
        assert_eq!(chain(&e).join("\n").matches("job-2").count(), 1);
    }

    #[test]
    fn a_handshake_failure_keeps_its_typed_cause() {
        let e = SandboxError::Handshake {
            vm: "job-3".into(),
            source: crate::HandshakeError::Version { agent: 99 },
            serial_tail: String::new(),
        };
        assert_eq!(
            e.to_string(),
            format!(
                "sandbox job-3: handshake with the guest agent failed: the agent speaks \
                 protocol version 99, this host speaks {}",
                kiln_proto::PROTOCOL_VERSION
            )
        );
        let layers = chain(&e);
        assert_eq!(layers.len(), 2, "{layers:?}");
        assert_eq!(layers.join("\n").matches("job-3").count(), 1);
        let src =
            std::error::Error::source(&e).and_then(|s| s.downcast_ref::<crate::HandshakeError>());
        assert!(
            matches!(src, Some(crate::HandshakeError::Version { agent: 99 })),
            "{src:?}"
        );
    }

    #[test]
    fn guest_errors_expose_their_kind() {
        let e = SandboxError::Guest {
            vm: "v".into(),
            op: "read_file",
            kind: ErrorKind::NotFound,
            message: "/nope: No such file or directory".into(),
        };
        assert!(e.is_not_found());
        assert!(e
            .to_string()
            .contains("read_file failed in the guest (NotFound)"));
    }
}
