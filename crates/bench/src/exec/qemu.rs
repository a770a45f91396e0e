//! The QEMU microvm peer of `kiln-bench exec`: the same guest kernel + initramfs under
//! `qemu-system-x86_64 -M microvm,acpi=off -accel kvm` with a `vhost-vsock-device`, so the
//! same agent reaches "the host" (here: the kernel QEMU runs on, through vhost-vsock) on CID 2
//! port [`AGENT_PORT`]. A listener on AF_VSOCK port [`AGENT_PORT`] accepts it and the same
//! kiln-proto [`Client`] drives it, which makes exec and ping round trips comparable with
//! Kiln's own VMM.
//!
//! `acpi=off` matters: without ACPI QEMU announces its virtio-mmio devices on the kernel
//! command line (`virtio_mmio.device=...`), which is how the Kiln kernel (no ACPI) finds them.
//! Needs /dev/kvm and /dev/vhost-vsock (the harness's L1 loads `vhost_vsock`).
//!
//! Every wait has a deadline: the agent's connect and `Hello` ([`QemuPeer::boot_timeout`]),
//! and each read or write on the connection ([`IDLE_TIMEOUT`], `SO_RCVTIMEO`/`SO_SNDTIMEO`,
//! so a stalled guest fails the request instead of hanging the benchmark). QEMU is killed
//! when a [`QemuGuest`] is dropped. The command line is `kiln_testkit::QemuCommand`'s, the
//! console reader `kiln_testkit::Console`.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

use kiln_proto::{Client, ClientConfig, Message, AGENT_PORT, PROTOCOL_VERSION, READY_LINE};
use kiln_testkit::{Console, QemuCommand};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    accept4, bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
    VsockAddr,
};
use nix::sys::time::{TimeVal, TimeValLike};

/// `VMADDR_CID_ANY`: accept connections from any guest of this host.
const CID_ANY: u32 = u32::MAX;
/// The vhost-vsock control device QEMU opens.
pub const VHOST_VSOCK: &str = "/dev/vhost-vsock";
/// Longest wait for one read or write on the agent connection once it is up.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Console lines quoted in error messages.
const TAIL_LINES: usize = 40;
/// How often the accept loop checks whether QEMU is still alive.
const POLL_SLICE: Duration = Duration::from_millis(100);

/// Errors of the QEMU peer.
#[derive(Debug, thiserror::Error)]
pub enum QemuPeerError {
    /// The host lacks something QEMU + vhost-vsock needs.
    #[error("{what} is missing: {why}")]
    Unavailable {
        /// What is missing.
        what: String,
        /// Why it matters / how to get it.
        why: &'static str,
    },
    /// A vsock socket operation failed.
    #[error("vsock {op} (port {port}): {source}")]
    Vsock {
        /// Which operation.
        op: &'static str,
        /// The port.
        port: u32,
        /// Cause.
        #[source]
        source: nix::Error,
    },
    /// QEMU could not be started.
    #[error("starting {program}: {source}")]
    Spawn {
        /// The QEMU binary.
        program: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited before the agent connected.
    #[error("QEMU (guest CID {cid}) exited ({status}) before the agent connected; console and QEMU's stderr:\n{tail}")]
    Exited {
        /// The guest's CID.
        cid: u32,
        /// QEMU's exit status.
        status: String,
        /// Last console lines.
        tail: String,
    },
    /// The agent did not connect (or send its `Hello`) in time.
    #[error("QEMU guest (CID {cid}): {what} within {after:?}; last console lines:\n{tail}")]
    Timeout {
        /// The guest's CID.
        cid: u32,
        /// What did not happen.
        what: &'static str,
        /// The deadline.
        after: Duration,
        /// Last console lines.
        tail: String,
    },
    /// The agent's handshake was wrong.
    #[error("QEMU guest (CID {cid}): handshake: {reason}")]
    Handshake {
        /// The guest's CID.
        cid: u32,
        /// What was wrong.
        reason: String,
    },
    /// A request to the agent failed.
    #[error("QEMU guest (CID {cid}): {op}: {reason}")]
    Request {
        /// The guest's CID.
        cid: u32,
        /// Which request.
        op: &'static str,
        /// Why.
        reason: String,
    },
}

/// How to boot the peer guest.
#[derive(Debug, Clone)]
pub struct QemuPeer {
    /// QEMU binary.
    pub qemu: PathBuf,
    /// Guest kernel (ELF vmlinux through PVH, or a bzImage).
    pub kernel: PathBuf,
    /// Guest initramfs.
    pub initramfs: PathBuf,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory (MiB).
    pub memory_mib: u32,
    /// The guest's vsock CID (unique on this host while the guest runs).
    pub cid: u32,
    /// Words appended to Kiln's base command line `console=ttyS0 reboot=t panic=-1`.
    pub extra_cmdline: String,
    /// Deadline for the agent's connection and `Hello`, from launch.
    pub boot_timeout: Duration,
    /// More QEMU arguments after the vsock device (`kiln-bench image`: a virtio-blk drive).
    pub extra_args: Vec<String>,
}

impl QemuPeer {
    /// The kernel command line: Kiln's base line (QEMU adds the virtio-mmio devices).
    pub fn cmdline(&self) -> String {
        let mut s = String::from(kiln_vmm::boot::BASE_CMDLINE);
        if !self.extra_cmdline.is_empty() {
            s.push(' ');
            s.push_str(&self.extra_cmdline);
        }
        s
    }

    /// The QEMU command: serial console on stdout, QEMU's own messages on stderr.
    pub fn command(&self) -> Command {
        let q = QemuCommand::new(&self.kernel)
            .program(&self.qemu)
            .machine("microvm,acpi=off")
            .accel("kvm")
            .cpu("host")
            .memory_mib(self.memory_mib)
            .smp(self.vcpus)
            .initrd(&self.initramfs)
            .append(self.cmdline())
            .arg("-device")
            .arg(format!("vhost-vsock-device,guest-cid={}", self.cid));
        self.extra_args
            .iter()
            .fold(q, |q, a| q.arg(a.as_str()))
            .command()
    }

    /// Checks what QEMU + vhost-vsock need here, so a host without them gets a clear reason.
    pub fn check_host(&self) -> Result<(), QemuPeerError> {
        if !Path::new("/dev/kvm").exists() {
            return Err(QemuPeerError::Unavailable {
                what: "/dev/kvm".into(),
                why: "QEMU -accel kvm needs it",
            });
        }
        if !Path::new(VHOST_VSOCK).exists() {
            return Err(QemuPeerError::Unavailable {
                what: VHOST_VSOCK.into(),
                why: "QEMU's vhost-vsock-device needs it: load the vhost_vsock module \
                      (the harness's L1 does)",
            });
        }
        Ok(())
    }

    /// Boots the guest and waits for the agent's connection and `Hello`.
    pub fn boot(&self) -> Result<QemuGuest, QemuPeerError> {
        let listener = vsock_listener()?;
        let launched = Instant::now();
        let deadline = launched + self.boot_timeout;
        let mut child = self
            .command()
            .spawn()
            .map_err(|source| QemuPeerError::Spawn {
                program: self.qemu.display().to_string(),
                source,
            })?;
        let console = match (child.stdout.take(), child.stderr.take()) {
            (Some(out), Some(err)) => Console::spawn_with_diagnostics(out, err),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(QemuPeerError::Spawn {
                    program: self.qemu.display().to_string(),
                    source: std::io::Error::other("stdout/stderr not piped"),
                });
            }
        };
        let mut guest = QemuGuest {
            child,
            console,
            cid: self.cid,
            launched,
            handshake_after: Duration::ZERO,
            client: None,
            conn: None,
        };
        let conn = guest.accept(&listener, deadline, self.boot_timeout)?;
        drop(listener);
        let client = guest.handshake(&conn, deadline, self.boot_timeout)?;
        guest.handshake_after = launched.elapsed();
        guest.client = Some(client);
        guest.conn = Some(conn);
        Ok(guest)
    }
}

/// A bound, listening AF_VSOCK socket on [`AGENT_PORT`] for any CID.
fn vsock_listener() -> Result<OwnedFd, QemuPeerError> {
    let err = |op| {
        move |source| QemuPeerError::Vsock {
            op,
            port: AGENT_PORT,
            source,
        }
    };
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(err("socket"))?;
    bind(fd.as_raw_fd(), &VsockAddr::new(CID_ANY, AGENT_PORT)).map_err(err("bind"))?;
    listen(&fd, Backlog::new(4).map_err(err("listen"))?).map_err(err("listen"))?;
    Ok(fd)
}

/// A booted QEMU guest with its agent connected; QEMU is killed on drop.
#[derive(Debug)]
pub struct QemuGuest {
    child: Child,
    console: Console,
    cid: u32,
    launched: Instant,
    handshake_after: Duration,
    client: Option<Client>,
    conn: Option<File>,
}

impl QemuGuest {
    /// Launch until the agent's `Hello` was read (the counterpart of `Sandbox::create`).
    pub fn handshake_after(&self) -> Duration {
        self.handshake_after
    }

    /// Launch until the READY console line was read, if it was; waits at most `wait` for the
    /// console thread (the agent prints the line before it connects, but the thread reading
    /// QEMU's stdout may not have got to it yet).
    pub fn ready_after(&mut self, wait: Duration) -> Option<Duration> {
        self.console
            .wait_for_line(READY_LINE, Instant::now() + wait)
            .ok()
            .map(|t| t.saturating_duration_since(self.launched))
    }

    /// The kiln-proto client on the agent's connection.
    pub fn client(&self) -> Result<&Client, QemuPeerError> {
        self.client.as_ref().ok_or(QemuPeerError::Request {
            cid: self.cid,
            op: "client",
            reason: "the agent is not connected".into(),
        })
    }

    /// A request error naming this guest, with the console tail when QEMU has died.
    pub fn request_error(&mut self, op: &'static str, e: impl std::fmt::Display) -> QemuPeerError {
        let mut reason = e.to_string();
        if let Ok(Some(status)) = self.child.try_wait() {
            reason.push_str(&format!(
                "; QEMU exited ({status}); last console lines:\n{}",
                self.console.tail(TAIL_LINES)
            ));
        }
        QemuPeerError::Request {
            cid: self.cid,
            op,
            reason,
        }
    }

    /// Waits for the agent's connection, watching QEMU.
    fn accept(
        &mut self,
        listener: &OwnedFd,
        deadline: Instant,
        boot_timeout: Duration,
    ) -> Result<File, QemuPeerError> {
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the console threads drain what QEMU said last.
                thread::sleep(Duration::from_millis(50));
                return Err(QemuPeerError::Exited {
                    cid: self.cid,
                    status: status.to_string(),
                    tail: self.console.tail(TAIL_LINES),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QemuPeerError::Timeout {
                    cid: self.cid,
                    what: "the agent did not connect to vsock port 1024",
                    after: boot_timeout,
                    tail: self.console.tail(TAIL_LINES),
                });
            }
            let slice = left.min(POLL_SLICE);
            let ms = u16::try_from(slice.as_millis()).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(n) if n > 0 => break,
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(source) => {
                    return Err(QemuPeerError::Vsock {
                        op: "poll",
                        port: AGENT_PORT,
                        source,
                    })
                }
            }
        }
        let fd = accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC).map_err(|source| {
            QemuPeerError::Vsock {
                op: "accept",
                port: AGENT_PORT,
                source,
            }
        })?;
        // SAFETY: accept4 returned a fresh descriptor that nothing else owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Reads the agent's `Hello` (before `deadline`), checks it and starts the client. From
    /// then on every read or write waits at most [`IDLE_TIMEOUT`].
    fn handshake(
        &self,
        conn: &File,
        deadline: Instant,
        boot_timeout: Duration,
    ) -> Result<Client, QemuPeerError> {
        let hs = |reason: String| QemuPeerError::Handshake {
            cid: self.cid,
            reason,
        };
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        set_timeouts(conn, left).map_err(|e| hs(format!("setting socket timeouts: {e}")))?;
        let mut reader = conn
            .try_clone()
            .map_err(|e| hs(format!("duplicating the connection: {e}")))?;
        let hello = match kiln_proto::read_frame(&mut reader) {
            Ok(Message::Hello(h)) => h,
            Ok(Message::Request { body, .. }) => {
                return Err(hs(format!("expected Hello, got request {}", body.name())))
            }
            Ok(Message::Response { body, .. }) => {
                return Err(hs(format!("expected Hello, got response {}", body.name())))
            }
            Err(kiln_proto::ProtoError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(QemuPeerError::Timeout {
                    cid: self.cid,
                    what: "no Hello from the agent",
                    after: boot_timeout,
                    tail: self.console.tail(TAIL_LINES),
                })
            }
            Err(e) => return Err(hs(format!("reading the agent's Hello: {e}"))),
        };
        hello
            .validate()
            .map_err(|e| hs(format!("the agent's Hello is out of bounds: {e}")))?;
        if hello.version != PROTOCOL_VERSION {
            return Err(hs(format!(
                "the agent speaks protocol version {}, this host speaks {PROTOCOL_VERSION}",
                hello.version
            )));
        }
        set_timeouts(conn, IDLE_TIMEOUT)
            .map_err(|e| hs(format!("setting socket timeouts: {e}")))?;
        let writer = conn
            .try_clone()
            .map_err(|e| hs(format!("duplicating the connection: {e}")))?;
        Client::from_hello(hello, reader, writer, ClientConfig::default())
            .map_err(|e| hs(e.to_string()))
    }
}

impl Drop for QemuGuest {
    fn drop(&mut self) {
        if let Some(conn) = &self.conn {
            // Ends the client's reader thread.
            let _ = nix::sys::socket::shutdown(conn.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sets `SO_RCVTIMEO` and `SO_SNDTIMEO` on the connection.
fn set_timeouts(conn: &File, t: Duration) -> nix::Result<()> {
    let ms = i64::try_from(t.as_millis()).unwrap_or(i64::MAX).max(1);
    let tv = TimeVal::milliseconds(ms);
    setsockopt(conn, sockopt::ReceiveTimeout, &tv)?;
    setsockopt(conn, sockopt::SendTimeout, &tv)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> QemuPeer {
        QemuPeer {
            qemu: "qemu-system-x86_64".into(),
            kernel: "/k".into(),
            initramfs: "/i".into(),
            vcpus: 1,
            memory_mib: 256,
            cid: 7,
            extra_cmdline: String::new(),
            boot_timeout: Duration::from_secs(1),
            extra_args: Vec::new(),
        }
    }

    #[test]
    fn command_line_has_vhost_vsock_and_no_acpi() {
        let cmd = peer().command();
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(
            joined.contains("-M microvm,acpi=off -accel kvm"),
            "{joined}"
        );
        assert!(
            joined.contains("-device vhost-vsock-device,guest-cid=7"),
            "{joined}"
        );
        assert!(joined.contains("-kernel /k -initrd /i"), "{joined}");
        assert!(
            joined.ends_with("-append console=ttyS0 reboot=t panic=-1"),
            "{joined}"
        );
        let mut p = peer();
        p.extra_cmdline = "quiet".into();
        assert_eq!(p.cmdline(), "console=ttyS0 reboot=t panic=-1 quiet");
    }

    #[test]
    fn missing_qemu_is_a_spawn_error() {
        let mut p = peer();
        p.qemu = "/nonexistent/qemu-system-x86_64".into();
        // Only meaningful where a vsock listener can be created (vsock module present).
        match p.boot() {
            Err(QemuPeerError::Spawn { program, .. }) => {
                assert!(program.contains("nonexistent"), "{program}")
            }
            Err(QemuPeerError::Vsock { op, .. }) => eprintln!("no AF_VSOCK here ({op})"),
            other => panic!("unexpected: {other:?}"),
        }
    }
}
