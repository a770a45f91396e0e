//! Jailed sandboxes ([`SandboxConfig::jailed`](crate::SandboxConfig::jailed)): the VM runs in
//! its own `kiln-vm` child process (kiln-jail: namespaces, pivot_root, cgroup v2, rlimits, an
//! unprivileged uid, no capabilities; docs/SECURITY.md). The child bridges the guest's vsock
//! connections to the host ports the sandbox needs — the agent's ([`kiln_proto::AGENT_PORT`])
//! and, with an egress policy, the proxy's ([`kiln_proto::EGRESS_PORT`]) — and hands each to
//! this process as a unix socket, so the protocol client and the egress proxy run here over
//! `UnixStream`s. This module owns what differs: [`Machine`] (the VM in this process or the
//! jailed one), [`Conn`] (the agent connection's shutdown handle) and [`boot`].
//! Snapshots, restores and forks of jailed sandboxes are refused
//! ([`SandboxError::NotSupportedJailed`]).

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use kiln_jail::{End, JailError, JailedVm, VmSpec};
use kiln_vmm::virtio::vsock::{VsockHost, VsockStream};
use kiln_vmm::Vm;

use super::{finish_agent, vm_config, Deadlines, Sandbox};
use crate::config::ResolvedConfig;
use crate::error::{SandboxError, SERIAL_TAIL_BYTES};

/// A sandbox's VM: in this process, or in a jailed child process.
#[derive(Debug)]
pub(crate) enum Machine {
    /// kiln-vmm in this process.
    Local(Vm),
    /// kiln-vmm in a `kiln-vm` child process.
    Jailed(JailedVm),
}

/// How a jailed VM's end reads in errors.
fn describe(end: End) -> String {
    match end {
        End::Exited(reason) => reason,
        End::SetupFailed { stage, message } => {
            format!("the jail's set-up failed: {stage}: {message}")
        }
        End::Died(status) => format!("the jailed VMM process died: {status}"),
    }
}

impl Machine {
    /// The exit reason once the VM ended.
    pub(crate) fn exit_reason(&self) -> Option<String> {
        match self {
            Machine::Local(vm) => vm.exit_reason().map(|r| r.to_string()),
            Machine::Jailed(j) => j.end().map(describe),
        }
    }

    /// Waits up to `timeout` for the VM to end; its exit reason.
    pub(crate) fn wait_exit(&self, timeout: Duration) -> Option<String> {
        match self {
            Machine::Local(vm) => vm.wait_exit(timeout).ok().map(|r| r.to_string()),
            Machine::Jailed(j) => j.wait_end(timeout).map(describe),
        }
    }

    /// The end of the serial console.
    pub(crate) fn serial_tail(&self, max: usize) -> String {
        match self {
            Machine::Local(vm) => vm.serial_tail(max),
            Machine::Jailed(j) => j.serial_tail(max),
        }
    }

    /// Stops the VM (bounded); how it ended.
    pub(crate) fn stop(self) -> String {
        match self {
            Machine::Local(vm) => vm.stop().to_string(),
            Machine::Jailed(j) => describe(j.stop()),
        }
    }

    /// The in-process vsock endpoint (`None` for a jailed VM: its connections are bridged).
    pub(crate) fn vsock(&self) -> Option<&VsockHost> {
        match self {
            Machine::Local(vm) => vm.vsock(),
            Machine::Jailed(_) => None,
        }
    }

    /// The in-process VM (snapshots, forks); `None` when jailed.
    pub(crate) fn local(&self) -> Option<&Vm> {
        match self {
            Machine::Local(vm) => Some(vm),
            Machine::Jailed(_) => None,
        }
    }

    /// The jailed VM, if this is one.
    pub(crate) fn jailed(&self) -> Option<&JailedVm> {
        match self {
            Machine::Local(_) => None,
            Machine::Jailed(j) => Some(j),
        }
    }
}

/// A handle on the agent connection that wakes every waiter when shut down.
#[derive(Debug)]
pub(crate) enum Conn {
    /// In-process vsock.
    Vsock(VsockStream),
    /// The unix socket the jailed child bridges.
    Unix(UnixStream),
}

impl Conn {
    pub(crate) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Conn::Vsock(s) => s.shutdown(how),
            Conn::Unix(s) => s.shutdown(how),
        }
    }
}

impl From<VsockStream> for Conn {
    fn from(s: VsockStream) -> Self {
        Conn::Vsock(s)
    }
}

impl From<UnixStream> for Conn {
    fn from(s: UnixStream) -> Self {
        Conn::Unix(s)
    }
}

/// A stream the agent handshake and client run over.
pub(crate) trait AgentStream: Read + Write + Send + Sized + 'static + Into<Conn> {
    fn set_read_deadline(&mut self, t: Option<Duration>) -> io::Result<()>;
    fn set_write_deadline(&mut self, t: Option<Duration>) -> io::Result<()>;
    fn clone_handle(&self) -> io::Result<Self>;
}

impl AgentStream for VsockStream {
    fn set_read_deadline(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
    fn set_write_deadline(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(t)
    }
    fn clone_handle(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

impl AgentStream for UnixStream {
    fn set_read_deadline(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
    fn set_write_deadline(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(t)
    }
    fn clone_handle(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

/// The VM of `cfg` as the jailed child's [`VmSpec`]; bridges the agent's port and, with
/// egress, the proxy's.
fn vm_spec(cfg: &ResolvedConfig) -> VmSpec {
    let v = vm_config(cfg);
    let mut spec = VmSpec::new(v.name, v.kernel);
    spec.vcpus = v.vcpus;
    spec.mem_mib = v.mem_mib;
    spec.initramfs = v.initramfs;
    spec.cmdline_extra = v.cmdline_extra;
    spec.vsock_cid = v.vsock_cid;
    spec.serial_ring_bytes = v.serial_ring_bytes as u64;
    spec.seccomp = v.seccomp.into();
    spec.disks = v
        .disks
        .into_iter()
        .map(|d| kiln_jail::DiskSpec {
            path: d.path,
            read_only: d.read_only,
            id: d.id,
        })
        .collect();
    spec.bridge_ports = vec![kiln_proto::AGENT_PORT];
    if cfg.egress.is_some() {
        spec.bridge_ports.push(kiln_proto::EGRESS_PORT);
    }
    spec
}

/// Boots a jailed sandbox: spawns the jailed VMM, accepts the agent's bridged connection
/// within the boot deadline, handshakes, attaches egress.
pub(crate) fn boot(cfg: ResolvedConfig, t0: Instant) -> Result<Sandbox, SandboxError> {
    let name = cfg.name.clone();
    let deadlines = Deadlines::of(&cfg);
    let jail = cfg.jail.clone().unwrap_or_default();
    let jvm =
        JailedVm::spawn(vm_spec(&cfg), jail, cfg.boot_timeout).map_err(|e| SandboxError::Jail {
            vm: name.clone(),
            op: "starting the jailed VMM",
            source: Box::new(e),
        })?;
    let vm_start = t0.elapsed();
    let deadline = Instant::now() + cfg.boot_timeout;
    // On error `jvm` is dropped, which stops it.
    let stream = jvm
        .accept(kiln_proto::AGENT_PORT, cfg.boot_timeout)
        .map_err(|e| boot_error(&name, &jvm, e, cfg.boot_timeout))?;
    let sandbox = finish_agent(
        Machine::Jailed(jvm),
        stream,
        deadline,
        name,
        t0,
        vm_start,
        deadlines,
    )?;
    sandbox.set_exec_defaults(cfg.exec_defaults.clone());
    crate::egress::attach(&sandbox, cfg.egress.as_ref())?;
    tracing::debug!(vm = %sandbox.name(), pid = ?sandbox.vmm_pid(), "jailed sandbox ready");
    Ok(sandbox)
}

fn boot_error(name: &str, jvm: &JailedVm, e: JailError, after: Duration) -> SandboxError {
    let serial_tail = jvm.serial_tail(SERIAL_TAIL_BYTES);
    match e {
        JailError::Timeout { .. } => SandboxError::BootTimeout {
            vm: name.to_owned(),
            after,
            serial_tail,
        },
        JailError::Died { status, .. } => SandboxError::GuestDied {
            vm: name.to_owned(),
            op: "boot",
            reason: format!("the jailed VMM process died before the agent connected: {status}"),
            serial_tail,
        },
        JailError::Ended { reason, .. } => SandboxError::GuestDied {
            vm: name.to_owned(),
            op: "boot",
            reason: format!("the VM ended before the agent connected ({reason})"),
            serial_tail,
        },
        other => SandboxError::Jail {
            vm: name.to_owned(),
            op: "boot",
            source: Box::new(other),
        },
    }
}

/// Jail accessors of [`Sandbox`].
impl Sandbox {
    /// Whether the sandbox's VM runs in a jailed child process.
    pub fn is_jailed(&self) -> bool {
        self.inner
            .vm_guard()
            .as_ref()
            .is_some_and(|m| m.jailed().is_some())
    }

    /// The jailed VMM process's pid (read its `/proc/<pid>/status`, `ns/`, `cgroup`,
    /// `root`); `None` for a sandbox whose VM runs in this process, or once it stopped.
    pub fn vmm_pid(&self) -> Option<u32> {
        self.inner
            .vm_guard()
            .as_ref()
            .and_then(Machine::jailed)
            .map(JailedVm::vmm_pid)
    }

    /// The jailed VM's bridged-connection acceptor (egress), when jailed.
    pub(crate) fn jail_acceptor(&self) -> Option<kiln_jail::Acceptor> {
        self.inner
            .vm_guard()
            .as_ref()
            .and_then(Machine::jailed)
            .map(JailedVm::acceptor)
    }

    /// The error for `op` on a jailed sandbox.
    pub(crate) fn jailed_unsupported(&self, op: &'static str) -> SandboxError {
        SandboxError::NotSupportedJailed {
            vm: self.inner.name.clone(),
            op,
        }
    }
}
