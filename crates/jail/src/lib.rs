//! kiln-jail: runs a kiln-vmm VM in its own jailed process, like Firecracker's jailer.
//!
//! - [`parent`]: [`JailedVm`] — spawn the `kiln-vm` binary, talk to it over a socketpair,
//!   receive the guest's connections on bridged vsock ports as unix sockets.
//! - [`child`]: the `kiln-vm` process — namespaces, pivot_root into a tmpfs holding only
//!   the VM's files and `/dev/kvm`, rlimits, an unprivileged uid/gid, no capabilities,
//!   `PR_SET_NO_NEW_PRIVS`, then the VM (whose threads install their seccomp filters).
//! - [`cgroup`]: the VMM's cgroup v2 (created by the parent).
//! - [`proto`]: the frames between them.
//! - [`config`]: the [`JailConfig`].
//!
//! Design and the properties tested: docs/SECURITY.md ("The jailed VMM process").

pub mod cgroup;
pub mod child;
pub mod config;
pub mod parent;
pub mod proto;

pub use config::{CgroupLimits, CpuMax, JailConfig, Rlimits};
pub use parent::{find_binary, Acceptor, End, JailError, JailedVm, BIN_ENV, BIN_NAME};
pub use proto::{DiskSpec, SeccompSpec, VmSpec};

/// Serial tail quoted in errors.
pub const SERIAL_TAIL_BYTES: usize = 4096;
