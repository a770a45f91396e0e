//! The guest side of egress (docs/EGRESS.md): a TCP listener on the guest's proxy port
//! (127.0.0.1:3128) whose every accepted connection is forwarded, byte for byte, as one vsock
//! connection to the host (CID 2) on [`EGRESS_PORT`], where the sandbox's proxy serves it.
//!
//! The agent decides nothing: policy, limits and the log live on the host. Without an egress
//! policy the host does not listen on [`EGRESS_PORT`], the vsock connect is refused, and the
//! guest's TCP connection is closed at once: no policy, no egress.
//!
//! Bounds: at most [`MAX_FORWARDS`] connections are forwarded at once (the VM's vsock device
//! has a fixed connection cap shared with the agent's own connection); further guest
//! connections wait in the TCP accept backlog until a slot frees. Each direction copies
//! through one [`BUF`] buffer; a connection with no byte either way for [`IDLE`] is closed,
//! and a write that makes no progress for [`WRITE_TIMEOUT`] aborts it.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use kiln_proto::{EGRESS_PORT, HOST_CID};
use nix::sys::socket::{connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType};
use nix::sys::socket::{shutdown as sock_shutdown, Shutdown as SockShutdown, VsockAddr};
use nix::sys::time::TimeVal;

/// The guest proxy address the exec environment's proxy variables point at.
pub const PROXY_ADDR: &str = "127.0.0.1:3128";
/// Connections forwarded at once (the vsock device allows 64 per VM in all).
pub const MAX_FORWARDS: usize = 48;
/// Copy buffer per direction.
pub const BUF: usize = 64 * 1024;
/// A forwarded connection with no byte in either direction for this long is closed (longer
/// than the host proxy's own idle timeout, which normally ends it first).
pub const IDLE: Duration = Duration::from_secs(300);
/// A write that makes no progress for this long aborts the connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(120);
/// Granularity of the idle check (each blocking read wakes this often).
const TICK: Duration = Duration::from_secs(5);

/// Errors of the egress forwarder.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// Binding the guest proxy port failed.
    #[error("egress: binding {PROXY_ADDR}: {0}")]
    Bind(#[source] io::Error),
    /// Connecting to the host's egress port failed (usually: no egress policy, refused).
    #[error("egress: vsock {op} to the host port {EGRESS_PORT}: {source}")]
    Vsock {
        /// What failed.
        op: &'static str,
        /// Cause.
        #[source]
        source: nix::Error,
    },
    /// Spawning a thread failed.
    #[error("egress: spawning a thread: {0}")]
    Spawn(#[source] io::Error),
}

/// Counting semaphore bounding the forwarded connections.
#[derive(Default)]
struct Slots {
    used: Mutex<usize>,
    freed: Condvar,
}

impl Slots {
    fn acquire(self: &Arc<Self>) -> Slot {
        let mut used = kiln_sync::lock(&self.used);
        while *used >= MAX_FORWARDS {
            used = self.freed.wait(used).unwrap_or_else(|p| p.into_inner());
        }
        *used += 1;
        Slot(Arc::clone(self))
    }
}

/// One taken slot, released on drop.
struct Slot(Arc<Slots>);

impl Drop for Slot {
    fn drop(&mut self) {
        let mut used = kiln_sync::lock(&self.0.used);
        *used = used.saturating_sub(1);
        self.0.freed.notify_one();
    }
}

/// Binds the guest proxy port and starts the accept loop on a thread. Returns at once.
pub fn start() -> Result<(), EgressError> {
    let listener = TcpListener::bind(PROXY_ADDR).map_err(EgressError::Bind)?;
    thread::Builder::new()
        .name("egress-accept".into())
        .spawn(move || accept_loop(listener))
        .map_err(EgressError::Spawn)?;
    Ok(())
}

fn accept_loop(listener: TcpListener) {
    let slots = Arc::new(Slots::default());
    loop {
        // Take the slot first: beyond the cap, connections wait in the kernel's backlog.
        let slot = slots.acquire();
        let tcp = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    eprintln!("kiln-agent: egress accept: {e}");
                    thread::sleep(Duration::from_millis(50));
                }
                continue;
            }
        };
        let spawned = thread::Builder::new()
            .name("egress-fwd".into())
            .spawn(move || {
                let _slot = slot;
                if let Err(e) = forward(tcp) {
                    // Refused = no egress policy: expected, keep the console quiet.
                    if !matches!(
                        e,
                        EgressError::Vsock {
                            source: nix::Error::ECONNREFUSED | nix::Error::ECONNRESET,
                            ..
                        }
                    ) {
                        eprintln!("kiln-agent: {e}");
                    }
                }
            });
        if let Err(e) = spawned {
            // The closure (with the connection and the slot) was dropped: both are released.
            eprintln!("kiln-agent: egress: spawning a forwarder: {e}");
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Opens the vsock connection to the host's egress port.
fn connect_host() -> Result<OwnedFd, EgressError> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|source| EgressError::Vsock {
        op: "socket",
        source,
    })?;
    connect(fd.as_raw_fd(), &VsockAddr::new(HOST_CID, EGRESS_PORT)).map_err(|source| {
        EgressError::Vsock {
            op: "connect",
            source,
        }
    })?;
    Ok(fd)
}

/// Forwards one guest TCP connection to the host until both directions ended.
fn forward(tcp: TcpStream) -> Result<(), EgressError> {
    let vsock = match connect_host() {
        Ok(fd) => fd,
        Err(e) => {
            let _ = tcp.shutdown(Shutdown::Both);
            return Err(e);
        }
    };
    let tv = |d: Duration| TimeVal::new(d.as_secs() as _, 0);
    let vraw = vsock.as_raw_fd();
    let _ = setsockopt(&vsock, sockopt::ReceiveTimeout, &tv(TICK));
    let _ = setsockopt(&vsock, sockopt::SendTimeout, &tv(WRITE_TIMEOUT));
    let _ = tcp.set_read_timeout(Some(TICK));
    let _ = tcp.set_write_timeout(Some(WRITE_TIMEOUT));
    let _ = tcp.set_nodelay(true);
    let vfile = File::from(vsock);
    let (vfile2, tcp2) = match (vfile.try_clone(), tcp.try_clone()) {
        (Ok(v), Ok(t)) => (v, t),
        _ => {
            let _ = tcp.shutdown(Shutdown::Both);
            return Ok(());
        }
    };
    let state = Arc::new(Shared {
        start: Instant::now(),
        last: AtomicU64::new(0),
        aborted: AtomicBool::new(false),
    });
    let up_state = Arc::clone(&state);
    // guest -> host on a helper thread, host -> guest here.
    let up = thread::Builder::new()
        .name("egress-up".into())
        .spawn(move || {
            let ok = copy(tcp2, &vfile2, &up_state);
            // Half-close: the host proxy reads end of stream.
            let _ = sock_shutdown(
                vfile2.as_raw_fd(),
                if ok {
                    SockShutdown::Write
                } else {
                    SockShutdown::Both
                },
            );
        })
        .map_err(EgressError::Spawn);
    let up = match up {
        Ok(h) => h,
        Err(e) => {
            let _ = tcp.shutdown(Shutdown::Both);
            return Err(e);
        }
    };
    let ok = copy(&vfile, &tcp, &state);
    let _ = tcp.shutdown(if ok { Shutdown::Write } else { Shutdown::Both });
    if !ok {
        let _ = sock_shutdown(vraw, SockShutdown::Both);
    }
    let _ = up.join();
    let _ = tcp.shutdown(Shutdown::Both);
    Ok(())
}

/// Activity shared by a connection's two directions.
struct Shared {
    start: Instant,
    /// Milliseconds after `start` of the last byte either way.
    last: AtomicU64,
    /// A direction failed: the other stops too.
    aborted: AtomicBool,
}

impl Shared {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// Copies `from` into `to` until end of stream (`true`) or an error, the idle limit or the
/// other direction's failure (`false`). `from`'s reads time out every [`TICK`].
fn copy(mut from: impl Read, mut to: impl Write, state: &Shared) -> bool {
    let mut buf = vec![0u8; BUF];
    loop {
        if state.aborted.load(Ordering::Relaxed) {
            return false;
        }
        match from.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => {
                state.touch();
                if to.write_all(&buf[..n]).is_err() {
                    state.aborted.store(true, Ordering::Relaxed);
                    return false;
                }
                state.touch();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if state.idle() >= IDLE {
                    state.aborted.store(true, Ordering::Relaxed);
                    return false;
                }
            }
            Err(_) => {
                state.aborted.store(true, Ordering::Relaxed);
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_relays_until_eof_and_reports_it() {
        let state = Shared {
            start: Instant::now(),
            last: AtomicU64::new(0),
            aborted: AtomicBool::new(false),
        };
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let mut out = Vec::new();
        assert!(copy(&data[..], &mut out, &state));
        assert_eq!(out, data);
    }

    #[test]
    fn copy_stops_when_the_other_direction_failed() {
        let state = Shared {
            start: Instant::now(),
            last: AtomicU64::new(0),
            aborted: AtomicBool::new(true),
        };
        let mut out = Vec::new();
        assert!(!copy(&b"abc"[..], &mut out, &state));
        assert!(out.is_empty());
    }

    #[test]
    fn slots_bound_and_release() {
        let slots = Arc::new(Slots::default());
        let held: Vec<Slot> = (0..MAX_FORWARDS).map(|_| slots.acquire()).collect();
        assert_eq!(*kiln_sync::lock(&slots.used), MAX_FORWARDS);
        let s2 = Arc::clone(&slots);
        let waiter = thread::spawn(move || drop(s2.acquire()));
        thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "a slot beyond the cap must wait");
        drop(held);
        waiter.join().unwrap();
        assert_eq!(*kiln_sync::lock(&slots.used), 0);
    }
}
