//! The parent <-> jailed-child protocol over their socketpair: each frame is a little-endian
//! `u32` length followed by that many bytes of postcard; a frame may carry one file descriptor
//! (`SCM_RIGHTS`, attached to its length bytes). Every length is bounded by [`MAX_FRAME`], a
//! frame's fds beyond the one expected are closed, and a frame announcing an fd without one is
//! an error.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

use crate::config::JailConfig;

/// Largest frame body either side accepts.
pub const MAX_FRAME: usize = 1 << 20;
/// Largest serial chunk the child sends in one frame.
pub const MAX_SERIAL_CHUNK: usize = 64 * 1024;
/// Most vsock ports one jailed VM bridges.
pub const MAX_BRIDGED_PORTS: usize = 8;
/// Most disks one jailed VM gets.
pub const MAX_DISKS: usize = 16;

/// Why a frame could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The socket failed (a timeout shows as `WouldBlock` / `TimedOut`).
    #[error("socket: {0}")]
    Io(#[source] io::Error),
    /// The peer closed the socket.
    #[error("the peer closed the connection")]
    Closed,
    /// A length beyond [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// The body is not a valid message.
    #[error("undecodable frame: {0}")]
    Decode(#[source] postcard::Error),
    /// The message could not be encoded.
    #[error("unencodable message: {0}")]
    Encode(#[source] postcard::Error),
}

/// How the VMM threads' seccomp filters run (kiln_vmm's `SeccompMode`, serialisable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SeccompSpec {
    /// Trap, log, end the process.
    Enforce,
    /// Allow and let the kernel log.
    Log,
    /// No filters.
    Off,
}

impl From<kiln_vmm::seccomp::SeccompMode> for SeccompSpec {
    fn from(m: kiln_vmm::seccomp::SeccompMode) -> Self {
        use kiln_vmm::seccomp::SeccompMode as M;
        match m {
            M::Enforce => Self::Enforce,
            M::Log => Self::Log,
            M::Off => Self::Off,
        }
    }
}

impl From<SeccompSpec> for kiln_vmm::seccomp::SeccompMode {
    fn from(m: SeccompSpec) -> Self {
        match m {
            SeccompSpec::Enforce => Self::Enforce,
            SeccompSpec::Log => Self::Log,
            SeccompSpec::Off => Self::Off,
        }
    }
}

/// One disk of the jailed VM (host path; the child bind-mounts it into its root).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Backing file on the host.
    pub path: PathBuf,
    /// Opened read-only (and bind-mounted read-only).
    pub read_only: bool,
    /// GET_ID answer.
    pub id: Option<String>,
}

/// The VM the child runs (host paths; the child rewrites them to its root's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// VM name (threads are named after it).
    pub name: String,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Kernel file.
    pub kernel: PathBuf,
    /// Initramfs file.
    pub initramfs: Option<PathBuf>,
    /// Extra kernel command line.
    pub cmdline_extra: String,
    /// Attach a vsock device with this guest CID.
    pub vsock_cid: Option<u64>,
    /// Disks.
    pub disks: Vec<DiskSpec>,
    /// Serial console ring in the child.
    pub serial_ring_bytes: u64,
    /// Seccomp mode of the VMM threads.
    pub seccomp: SeccompSpec,
    /// Guest -> host vsock ports the child listens on and hands to the parent, one unix
    /// socket per accepted connection.
    pub bridge_ports: Vec<u32>,
}

impl VmSpec {
    /// A VM like `kiln_vmm::VmConfig::new`: 1 vCPU, 128 MiB, no devices.
    pub fn new(name: impl Into<String>, kernel: impl Into<PathBuf>) -> Self {
        let c = kiln_vmm::VmConfig::new(name, kernel);
        VmSpec {
            name: c.name,
            vcpus: c.vcpus,
            mem_mib: c.mem_mib,
            kernel: c.kernel,
            initramfs: c.initramfs,
            cmdline_extra: c.cmdline_extra,
            vsock_cid: c.vsock_cid,
            disks: Vec::new(),
            serial_ring_bytes: c.serial_ring_bytes as u64,
            seccomp: c.seccomp.into(),
            bridge_ports: Vec::new(),
        }
    }
}

/// The first frame the parent sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartSpec {
    /// The VM.
    pub vm: VmSpec,
    /// The jail.
    pub jail: JailConfig,
    /// The empty directory (created by the parent) the child mounts its tmpfs root on.
    pub root: PathBuf,
}

/// Parent -> child.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToChild {
    /// Set up the jail and start the VM (first frame, once).
    Start(Box<StartSpec>),
    /// Stop the VM and exit.
    Stop,
}

/// Child -> parent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToParent {
    /// The jail is set up and the VM runs; `vmm_pid` is the VMM process in the parent's pid
    /// namespace.
    Running {
        /// The VMM process.
        vmm_pid: u32,
    },
    /// New serial console output.
    Serial {
        /// The bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// A guest connection to bridged `port`; the frame carries the unix socket.
    Conn {
        /// The host port the guest connected to.
        port: u32,
    },
    /// The VM ended (the child exits next).
    Exited {
        /// kiln_vmm's exit reason, as text.
        reason: String,
    },
    /// Setting up the jail or starting the VM failed (the child exits next).
    Failed {
        /// What was being done.
        stage: String,
        /// Why it failed.
        message: String,
    },
}

/// Writes one frame, with `fd` attached when given.
pub fn send<T: Serialize>(sock: &UnixStream, msg: &T, fd: Option<RawFd>) -> Result<(), FrameError> {
    let body = postcard::to_stdvec(msg).map_err(FrameError::Encode)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let len = u32::try_from(body.len())
        .map_err(|_| FrameError::TooLarge(body.len()))?
        .to_le_bytes();
    let fds = fd.map(|f| [f]);
    let cmsgs: Vec<ControlMessage<'_>> = match &fds {
        Some(f) => vec![ControlMessage::ScmRights(f)],
        None => Vec::new(),
    };
    // The length bytes carry the fd; one byte at least is sent with them.
    let mut sent = 0;
    while sent == 0 {
        match socket::sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(&len)],
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => sent = n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(FrameError::Io(e.into())),
        }
    }
    let mut w = sock;
    w.write_all(&len[sent..]).map_err(FrameError::Io)?;
    w.write_all(&body).map_err(FrameError::Io)?;
    Ok(())
}

/// Reads one frame: the message and the fd it carried, if any. Honours the socket's read
/// timeout.
pub fn recv<T: for<'de> Deserialize<'de>>(
    sock: &UnixStream,
) -> Result<(T, Option<OwnedFd>), FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    let mut fd: Option<OwnedFd> = None;
    while got < len.len() {
        let mut cmsg = nix::cmsg_space!([RawFd; 2]);
        let (n, fds) = {
            let mut iov = [IoSliceMut::new(&mut len[got..])];
            let msg = match socket::recvmsg::<()>(
                sock.as_fd().as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(FrameError::Io(e.into())),
            };
            let mut fds = Vec::new();
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(v) = c {
                        fds.extend(v);
                    }
                }
            }
            (msg.bytes, fds)
        };
        for raw in fds {
            // SAFETY: the kernel just installed `raw` in our table for us (SCM_RIGHTS); we own it.
            let owned = unsafe { OwnedFd::from_raw_fd(raw) };
            if fd.is_none() {
                fd = Some(owned);
            } // further fds are dropped (closed)
        }
        if n == 0 {
            return Err(FrameError::Closed);
        }
        got += n;
    }
    let n = u32::from_le_bytes(len) as usize;
    if n > MAX_FRAME {
        return Err(FrameError::TooLarge(n));
    }
    let mut body = vec![0u8; n];
    let mut r = sock;
    r.read_exact(&mut body).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FrameError::Closed,
        _ => FrameError::Io(e),
    })?;
    let msg = postcard::from_bytes(&body).map_err(FrameError::Decode)?;
    Ok((msg, fd))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn frames_round_trip_with_and_without_an_fd() {
        let (a, b) = UnixStream::pair().unwrap();
        send(&a, &ToParent::Running { vmm_pid: 7 }, None).unwrap();
        let (x, y) = UnixStream::pair().unwrap();
        send(&a, &ToParent::Conn { port: 1024 }, Some(x.as_raw_fd())).unwrap();
        drop(x);
        let (m, fd): (ToParent, _) = recv(&b).unwrap();
        assert!(matches!(m, ToParent::Running { vmm_pid: 7 }) && fd.is_none());
        let (m, fd): (ToParent, _) = recv(&b).unwrap();
        assert!(matches!(m, ToParent::Conn { port: 1024 }));
        let mut s = UnixStream::from(fd.unwrap());
        s.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        (&y).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        drop(a);
        assert!(matches!(recv::<ToParent>(&b), Err(FrameError::Closed)));
    }

    #[test]
    fn oversized_and_garbage_frames_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&(MAX_FRAME as u32 + 1).to_le_bytes())
            .unwrap();
        assert!(matches!(recv::<ToParent>(&b), Err(FrameError::TooLarge(_))));
        (&a).write_all(&3u32.to_le_bytes()).unwrap();
        (&a).write_all(&[0xff, 0xff, 0xff]).unwrap();
        assert!(matches!(recv::<ToParent>(&b), Err(FrameError::Decode(_))));
    }
}
