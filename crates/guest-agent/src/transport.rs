//! Transports: the vsock connection to the host (connect with backoff, reconnect after loss),
//! the vsock echo server for data-plane tests, and the unix-socket transports of host mode.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use kiln_proto::{AGENT_PORT, ECHO_PORT, HOST_CID};
use nix::sys::socket::{
    accept, bind, connect, listen, shutdown, socket, AddressFamily, Backlog, Shutdown, SockFlag,
    SockType, VsockAddr,
};

use crate::conn::{serve, Agent};

/// `VMADDR_CID_ANY`.
const CID_ANY: u32 = u32::MAX;
/// Backoff bounds for (re)connecting to the host.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// Errors of the transports.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("vsock {op} (port {port}): {source}")]
    Vsock {
        op: &'static str,
        port: u32,
        #[source]
        source: nix::Error,
    },
    #[error("unix socket {op} {path}: {source}")]
    Unix {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn vsock_socket(port: u32, op: &'static str) -> Result<OwnedFd, TransportError> {
    socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|source| TransportError::Vsock { op, port, source })
}

/// Serve one stream until it closes.
fn serve_fd(agent: &Arc<Agent>, fd: OwnedFd, restored: bool) {
    let file = File::from(fd);
    let writer = match file.try_clone() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("kiln-agent: cannot duplicate the connection: {e}");
            return;
        }
    };
    serve(agent, &file, Box::new(writer), restored);
    let _ = shutdown(std::os::fd::AsRawFd::as_raw_fd(&file), Shutdown::Both);
}

/// Connect to the host on vsock port [`AGENT_PORT`] forever: serve, and reconnect (with
/// `restored: true`) whenever the connection ends.
pub fn vsock_client_loop(agent: &Arc<Agent>) -> ! {
    let addr = VsockAddr::new(HOST_CID, AGENT_PORT);
    let mut connections = 0u64;
    let mut backoff = BACKOFF_MIN;
    let mut last_error = String::new();
    loop {
        let attempt = vsock_socket(AGENT_PORT, "socket").and_then(|fd| {
            connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr)
                .map(|()| fd)
                .map_err(|source| TransportError::Vsock {
                    op: "connect",
                    port: AGENT_PORT,
                    source,
                })
        });
        match attempt {
            Ok(fd) => {
                backoff = BACKOFF_MIN;
                serve_fd(agent, fd, connections > 0);
                connections += 1;
            }
            Err(e) => {
                let msg = e.to_string();
                if msg != last_error {
                    eprintln!("kiln-agent: {msg}; retrying");
                    last_error = msg;
                }
                thread::sleep(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Start the byte echo server on vsock port [`ECHO_PORT`] (a thread per connection).
pub fn start_vsock_echo() -> Result<(), TransportError> {
    let fd = vsock_socket(ECHO_PORT, "socket")?;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let err = |op: &'static str| {
        move |source| TransportError::Vsock {
            op,
            port: ECHO_PORT,
            source,
        }
    };
    bind(raw, &VsockAddr::new(CID_ANY, ECHO_PORT)).map_err(err("bind"))?;
    listen(&fd, Backlog::new(64).unwrap_or(Backlog::MAXCONN)).map_err(err("listen"))?;
    thread::Builder::new()
        .name("echo-accept".into())
        .spawn(move || loop {
            match accept(std::os::fd::AsRawFd::as_raw_fd(&fd)) {
                Ok(c) => {
                    // SAFETY: accept returned a fresh fd that nothing else owns.
                    let conn = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(c) };
                    let _ = thread::Builder::new()
                        .name("echo".into())
                        .spawn(move || echo(conn));
                }
                Err(nix::Error::EINTR) => {}
                Err(e) => {
                    eprintln!("kiln-agent: echo accept: {e}");
                    thread::sleep(Duration::from_millis(100));
                }
            }
        })
        .map_err(|e| TransportError::Vsock {
            op: "spawn",
            port: ECHO_PORT,
            source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EAGAIN)),
        })?;
    Ok(())
}

fn echo(mut conn: File) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

/// Host mode: bind the listening unix socket. Separate from [`unix_serve`] so that a
/// `--pid1-setup` agent binds before it mounts a fresh tmpfs over `/tmp` or `/run`, where the
/// socket's path may lie, and stays reachable from outside its mount namespace.
pub fn unix_bind(path: &str) -> Result<UnixListener, TransportError> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(|source| TransportError::Unix {
        op: "bind",
        path: path.to_owned(),
        source,
    })
}

/// Host mode: serve every connection of `listener` on its own thread.
/// Returns at once; the accept loop runs on a thread.
pub fn unix_serve(
    agent: &Arc<Agent>,
    listener: UnixListener,
    path: &str,
) -> Result<thread::JoinHandle<()>, TransportError> {
    let err = |op: &'static str| {
        let path = path.to_owned();
        move |source| TransportError::Unix { op, path, source }
    };
    let agent = Arc::clone(agent);
    thread::Builder::new()
        .name("unix-accept".into())
        .spawn(move || {
            let mut connections = 0u64;
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("kiln-agent: accept: {e}");
                        thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                };
                let restored = connections > 0;
                connections += 1;
                let a2 = Arc::clone(&agent);
                let _ = thread::Builder::new()
                    .name("unix-conn".into())
                    .spawn(move || serve_unix(&a2, stream, restored));
            }
        })
        .map_err(err("spawn"))
}

fn serve_unix(agent: &Arc<Agent>, stream: UnixStream, restored: bool) {
    let writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("kiln-agent: cannot duplicate the connection: {e}");
            return;
        }
    };
    serve(agent, &stream, Box::new(writer), restored);
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Host mode: connect to a unix socket, serve, and reconnect after loss, like the vsock loop.
pub fn unix_client_loop(agent: &Arc<Agent>, path: &str) -> ! {
    let mut connections = 0u64;
    let mut backoff = BACKOFF_MIN;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => {
                backoff = BACKOFF_MIN;
                serve_unix(agent, s, connections > 0);
                connections += 1;
            }
            Err(_) => {
                thread::sleep(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}
