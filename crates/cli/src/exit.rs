//! The `kiln` CLI's exit codes and the mapping from [`SandboxError`] to them.
//!
//! `kiln run` exits with the command's own exit code (128 + N when a signal N killed it). Its
//! own failures use codes from a block just below the shell's 126/127, so a script can tell
//! "the sandbox failed" from "the command failed" in all common cases.

use kiln::{ConfigError, SandboxError};

/// Invalid flags or arguments (clap's own code).
pub const USAGE: i32 = 2;
/// No usable KVM: /dev/kvm missing, no permission, or a host that cannot boot Linux guests.
pub const NO_KVM: i32 = 120;
/// The guest kernel or initramfs is missing.
pub const ASSETS: i32 = 121;
/// The VM failed to boot or its agent did not connect/handshake in time.
pub const BOOT: i32 = 122;
/// The guest died (or its agent connection broke) while the command ran.
pub const GUEST_DIED: i32 = 123;
/// The command's `--timeout` fired; its whole process group was killed.
pub const TIMEOUT: i32 = 124;
/// Any other Kiln failure (protocol error, agent unresponsive, host I/O).
pub const INTERNAL: i32 = 125;
/// The command was found but could not be started (not executable, bad cwd...).
pub const CANNOT_EXEC: i32 = 126;
/// The command was not found in the guest. The agent itself ends such an exec with this code
/// (and its message on stderr), so kiln only passes it through.
#[allow(dead_code)]
pub const NOT_FOUND: i32 = 127;

/// The exit-code table shown by `kiln --help` and documented in docs/API.md.
pub const HELP: &str = "\
Exit status of `kiln run`:
  0-255  the command's own exit code; 128+N when the command was killed by signal N
  2      invalid flags or arguments
  120    no usable KVM (/dev/kvm missing, no permission, or a kvm-pvm host)
  121    guest assets missing (run `cargo xtask kernel` and `cargo xtask build-guest`)
  122    the VM failed to boot or its agent did not answer in time
  123    the guest died while the command ran
  124    the command timed out (--timeout) and was killed with its children
  125    other kiln failure (protocol error, unresponsive agent, host I/O)
  126    the command could not be started (not executable, bad --cwd)
  127    the command was not found in the guest";

/// Exit code for a failure of the sandbox itself.
pub fn for_error(e: &SandboxError) -> i32 {
    match e {
        SandboxError::Config(ConfigError::Invalid { .. }) => USAGE,
        // An unknown or damaged image: `kiln image`'s codes (10 unknown, 11 corrupt, ...).
        SandboxError::Config(ConfigError::Image(e)) => e
            .store_kind()
            .map_or(USAGE, kiln_image::ErrorKind::exit_code),
        SandboxError::Config(ConfigError::MissingAsset { .. } | ConfigError::AssetsDir { .. }) => {
            ASSETS
        }
        SandboxError::NoKvm { .. } | SandboxError::UnsupportedHost { .. } => NO_KVM,
        // `--dir` names no snapshot (missing, or not a directory): a bad argument.
        SandboxError::Snapshot { source, .. } if is_missing_path(source) => USAGE,
        SandboxError::Vm { .. }
        | SandboxError::Vsock { .. }
        | SandboxError::BootTimeout { .. }
        | SandboxError::Handshake { .. } => BOOT,
        SandboxError::GuestDied { op: "boot", .. } => BOOT,
        SandboxError::GuestDied { .. } => GUEST_DIED,
        // A command that is not found is not an error (the agent ends it with exit code 127
        // and its message on stderr); a refused start (bad cwd, invalid env) is.
        SandboxError::ExecFailed { .. } => CANNOT_EXEC,
        SandboxError::InvalidArgument { .. } => USAGE,
        SandboxError::Guest { .. }
        | SandboxError::Timeout { .. }
        | SandboxError::Protocol { .. }
        | SandboxError::Io { .. } => INTERNAL,
        // Future variants: a generic failure.
        #[allow(unreachable_patterns)]
        _ => INTERNAL,
    }
}

/// A snapshot file or directory that does not exist or is not a directory.
fn is_missing_path(kind: &kiln_vmm::snapshot::SnapshotErrorKind) -> bool {
    matches!(
        kind,
        kiln_vmm::snapshot::SnapshotErrorKind::Io { source, .. }
            if matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            )
    )
}

/// Exit code for a command that ran to its end.
pub fn for_status(status: &kiln::ExitStatus) -> i32 {
    if status.timed_out {
        TIMEOUT
    } else {
        status.shell_code()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::path::PathBuf;
    use std::time::Duration;

    /// Every exit code this module defines.
    const ALL_CODES: [i32; 9] = [
        USAGE,
        NO_KVM,
        ASSETS,
        BOOT,
        GUEST_DIED,
        TIMEOUT,
        INTERNAL,
        CANNOT_EXEC,
        NOT_FOUND,
    ];

    fn status(code: Option<i32>, signal: Option<i32>, timed_out: bool) -> kiln::ExitStatus {
        kiln::ExitStatus {
            code,
            signal,
            timed_out,
            truncated: false,
            ..Default::default()
        }
    }

    #[test]
    fn command_status_maps_to_shell_convention() {
        assert_eq!(for_status(&status(Some(0), None, false)), 0);
        assert_eq!(for_status(&status(Some(3), None, false)), 3);
        assert_eq!(for_status(&status(None, Some(15), false)), 143);
        assert_eq!(for_status(&status(None, Some(9), true)), TIMEOUT);
    }

    #[test]
    fn sandbox_failures_have_distinct_codes() {
        let vm = || "vm".to_string();
        let cases = [
            (
                SandboxError::Config(ConfigError::MissingAsset {
                    what: "kernel",
                    path: PathBuf::from("/x"),
                    hint: "",
                }),
                ASSETS,
            ),
            (
                SandboxError::NoKvm {
                    vm: vm(),
                    reason: kiln_vmm::host::NoKvmReason::DeviceMissing {
                        path: PathBuf::from("/dev/kvm"),
                    },
                },
                NO_KVM,
            ),
            (
                SandboxError::BootTimeout {
                    vm: vm(),
                    after: Duration::from_secs(1),
                    serial_tail: String::new(),
                },
                BOOT,
            ),
            (
                SandboxError::GuestDied {
                    vm: vm(),
                    op: "exec",
                    reason: String::new(),
                    serial_tail: String::new(),
                },
                GUEST_DIED,
            ),
            (
                SandboxError::GuestDied {
                    vm: vm(),
                    op: "boot",
                    reason: String::new(),
                    serial_tail: String::new(),
                },
                BOOT,
            ),
            (
                SandboxError::ExecFailed {
                    vm: vm(),
                    op: "exec",
                    program: "x".into(),
                    kind: kiln::ErrorKind::NotFound,
                    message: String::new(),
                },
                CANNOT_EXEC,
            ),
            (
                SandboxError::Protocol {
                    vm: vm(),
                    op: "exec",
                    message: String::new(),
                },
                INTERNAL,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(for_error(&e), code, "{e}");
        }
        let mut sorted = ALL_CODES.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ALL_CODES.len());
    }

    #[test]
    fn help_lists_every_code() {
        for code in ALL_CODES {
            assert!(
                HELP.contains(&format!("  {code} ")),
                "{code} missing from HELP"
            );
        }
    }
}
