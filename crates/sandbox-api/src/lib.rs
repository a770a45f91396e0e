//! kiln: Kiln's public API.
//!
//! A [`Sandbox`] is one microVM running the Kiln guest (a minimal Linux with the kiln-agent as
//! PID 1), created from a [`SandboxConfig`] and driven through the agent: run commands
//! ([`Sandbox::exec`], [`Sandbox::exec_with_options`], [`Sandbox::stream_exec`]), move files
//! ([`Sandbox::read_file`], [`Sandbox::write_file`], [`Sandbox::list_dir`]...), [`Sandbox::ping`]
//! and [`Sandbox::shutdown`]. Every failure is a [`SandboxError`] naming the sandbox and the
//! operation. See docs/API.md.
//!
//! Modules: [`config`] (configuration and validation), [`assets`] (where the guest kernel and
//! initramfs live by default), [`error`] (the error model), [`exec`] (exec options, results
//! and events), [`image`] (booting a root-filesystem image), [`sandbox`] (the sandbox itself), [`pool`] ([`SandboxPool`], a prewarm pool of
//! sandboxes).
//!
//! This crate is the library alone: the `kiln` command line is `kiln-cli` (crates/cli), the
//! benchmark helpers are `kiln-bench` (crates/bench).

pub mod assets;
pub mod config;
pub mod egress;
pub mod error;
pub mod exec;
pub mod image;
pub mod pool;
pub mod sandbox;

pub use config::{ConfigError, ResolvedConfig, SandboxConfig};
pub use egress::{EgressSettings, HttpRequest, HttpResponse, LogEntry, Policy};
pub use error::SandboxError;
pub use exec::{ExecEvent, ExecOptions, ExecResult, StdinSource, DEFAULT_OUTPUT_CAP};
pub use image::{ResolvedImage, SandboxExecDefaults};
pub use kiln_jail::{CgroupLimits, CpuMax, JailConfig, Rlimits};
pub use kiln_pool::{PoolConfig, PoolStats};
pub use kiln_proto::{DirEntry, ErrorKind, ExitStatus, FileKind, FileStat, Hello};
pub use kiln_vmm::snapshot::SnapshotInfo;
pub use pool::{PooledSandbox, ResetMode, SandboxPool, SandboxPoolError};
pub use sandbox::{BootTimings, ExecSignaller, ExecStream, HandshakeError, Sandbox};
