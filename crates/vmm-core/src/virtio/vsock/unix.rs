//! Optional unix-socket front for out-of-process clients, with Firecracker's handshake: the
//! client connects to the socket, writes `CONNECT <port>\n`, and on success reads
//! `OK <host port>\n`; from then on the socket carries the stream's bytes both ways. A failed
//! connect (refused, timeout, malformed request) just closes the socket.
//!
//! Each accepted client gets two copy threads (one per direction); half-closes propagate
//! (EOF from the client → SHUTDOWN(SEND) to the guest, EOF from the guest → `shutdown(Write)`
//! on the socket).

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::{VsockError, VsockHost, VsockStream};
use crate::seccomp::{SeccompMode, ThreadKind};

/// Longest accepted handshake line.
const MAX_HANDSHAKE: usize = 64;
/// Deadline for the client to send its handshake line.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the accept loop checks for shutdown.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

/// A running unix-socket front. Dropping it stops accepting and removes the socket file;
/// connections already proxied run until either side closes.
#[derive(Debug)]
pub struct UnixFront {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UnixFront {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for UnixFront {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> VsockError {
    move |source| VsockError::Io { what, source }
}

impl VsockHost {
    /// Serve `CONNECT <port>` clients on a unix socket at `path` (replacing a stale file).
    /// Each guest connect waits at most `connect_timeout`.
    pub fn serve_unix(
        &self,
        path: impl AsRef<Path>,
        connect_timeout: Duration,
    ) -> Result<UnixFront, VsockError> {
        let path = path.as_ref().to_path_buf();
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(io_err("binding the unix socket"))?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("configuring the unix socket"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let host = self.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vsock-unix-{}", host.guest_cid()))
            .spawn(move || accept_loop(&listener, &host, &stop2, connect_timeout))
            .map_err(io_err("spawning the unix accept thread"))?;
        Ok(UnixFront {
            path,
            stop,
            thread: Some(thread),
        })
    }
}

fn accept_loop(listener: &UnixListener, host: &VsockHost, stop: &AtomicBool, timeout: Duration) {
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((sock, _)) => {
                let host = host.clone();
                let spawned = std::thread::Builder::new()
                    .name("vsock-unix-conn".into())
                    .spawn(move || {
                        if let Err(e) = serve_client(sock, &host, timeout) {
                            tracing::debug!(error = %e, "vsock unix front: client ended");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "vsock unix front: cannot spawn a client thread");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) => {
                tracing::warn!(error = %e, "vsock unix front: accept failed");
                std::thread::sleep(ACCEPT_POLL);
            }
        }
    }
}

/// Parse `CONNECT <port>`.
pub fn parse_connect(line: &str) -> Option<u32> {
    let rest = line.strip_prefix("CONNECT ")?;
    rest.trim_end_matches(['\r', '\n']).parse().ok()
}

fn read_line(sock: &mut UnixStream) -> io::Result<String> {
    let mut line = Vec::with_capacity(MAX_HANDSHAKE);
    let mut b = [0u8; 1];
    loop {
        if sock.read(&mut b)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "handshake cut",
            ));
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
        if line.len() > MAX_HANDSHAKE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "handshake too long",
            ));
        }
    }
    String::from_utf8(line).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"))
}

fn serve_client(mut sock: UnixStream, host: &VsockHost, timeout: Duration) -> io::Result<()> {
    sock.set_nonblocking(false)?;
    sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let line = read_line(&mut sock)?;
    let port = parse_connect(&line).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, format!("bad request {line:?}"))
    })?;
    let stream = host
        .connect(port, timeout)
        .map_err(|e| io::Error::new(io::ErrorKind::ConnectionRefused, e.to_string()))?;
    sock.write_all(format!("OK {}\n", stream.local_port()).as_bytes())?;
    sock.set_read_timeout(None)?;
    proxy(sock, stream, host.seccomp_mode())
}

/// Copies both ways on two threads, each under the vsock-proxy seccomp filter from before its
/// first guest byte (installed after the spawn, so the filter needs no `clone`). Public for the
/// jailed VMM process (kiln-jail), which bridges guest connections to unix sockets handed to
/// its parent; call it on a thread of its own (it installs the filter on the calling thread).
pub fn proxy(sock: UnixStream, stream: VsockStream, mode: SeccompMode) -> io::Result<()> {
    let filter_err = |e: crate::seccomp::SeccompError| io::Error::other(e.to_string());
    let mut sock_r = sock.try_clone()?;
    let mut vs_w = stream.try_clone()?;
    let up = std::thread::Builder::new()
        .name("vsock-unix-up".into())
        .spawn(move || {
            if let Err(e) = crate::seccomp::install(ThreadKind::VsockProxy, mode) {
                tracing::error!("vsock unix front: {e}");
                return;
            }
            let _ = io::copy(&mut sock_r, &mut vs_w);
            let _ = vs_w.flush();
            let _ = vs_w.shutdown(Shutdown::Write);
        })?;
    crate::seccomp::install(ThreadKind::VsockProxy, mode).map_err(filter_err)?;
    let mut vs_r = stream;
    let mut sock_w = sock;
    let _ = io::copy(&mut vs_r, &mut sock_w);
    let _ = sock_w.shutdown(Shutdown::Write);
    let _ = up.join();
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::virtio::testutil::TestGuest;
    use crate::virtio::vsock::packet::{OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN};
    use std::io::{BufRead, BufReader};

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn parse_connect_lines() {
        assert_eq!(parse_connect("CONNECT 5000"), Some(5000));
        assert_eq!(parse_connect("CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect("CONNECT -1"), None);
        assert_eq!(parse_connect("CONNECT 99999999999"), None);
        assert_eq!(parse_connect("connect 5"), None);
        assert_eq!(parse_connect(""), None);
    }

    #[test]
    fn unix_client_reaches_guest_port() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = TestGuest::with_config(crate::virtio::vsock::VsockConfig {
            seccomp: SeccompMode::Enforce, // whatever $KILN_SECCOMP says
            ..Default::default()
        });
        g.post_rx(16);
        let front = g.host.serve_unix(dir.path().join("v.sock"), T).unwrap();
        let path = front.path().to_path_buf();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let client = std::thread::spawn(move || {
            let mut s = UnixStream::connect(&path).unwrap();
            s.set_read_timeout(Some(T)).unwrap();
            s.write_all(b"CONNECT 5000\n").unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.starts_with("OK "), "{line:?}");
            s.write_all(b"hello").unwrap();
            // Keep both copy threads alive until the test has looked at them.
            wait.recv_timeout(T).unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            let mut v = Vec::new();
            r.read_to_end(&mut v).unwrap();
            v
        });
        let req = g.recv_wait(T).unwrap();
        assert_eq!((req.0.op, req.0.dst_port), (OP_REQUEST, 5000));
        let lp = req.0.src_port;
        g.send(OP_RESPONSE, 5000, lp, &[]);
        let p = g.recv_wait(T).unwrap();
        assert_eq!((p.0.op, p.1.as_slice()), (OP_RW, &b"hello"[..]));
        // Both copy threads run under the vsock-proxy filter.
        let deadline = std::time::Instant::now() + T;
        let filtered = |name: &str| {
            crate::seccomp::task_filters()
                .iter()
                .any(|(n, sc, nnp)| n == name && (*sc, *nnp) == (2, 1))
        };
        while !(filtered("vsock-unix-conn") && filtered("vsock-unix-up")) {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                crate::seccomp::task_filters()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        go.send(()).unwrap();
        let p = g.recv_wait(T).unwrap();
        assert_eq!(p.0.op, OP_SHUTDOWN, "client EOF reaches the guest");
        g.send(OP_RW, 5000, lp, b"world");
        let mut h = g.hdr(OP_SHUTDOWN, 5000, lp);
        h.flags = 3;
        g.send_hdr(h, &[]);
        assert_eq!(client.join().unwrap(), b"world");
        // The proxy closes; the guest's full shutdown was answered with RST.
        let deadline = std::time::Instant::now() + T;
        let mut saw_rst = false;
        while std::time::Instant::now() < deadline && !saw_rst {
            if let Some(p) = g.recv_wait(Duration::from_millis(50)) {
                saw_rst = p.0.op == OP_RST;
            }
        }
        assert!(saw_rst);
        drop(front);
        assert!(!dir.path().join("v.sock").exists());
    }

    #[test]
    fn bad_handshake_or_refused_port_closes_socket() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = TestGuest::new();
        g.post_rx(16);
        let front = g
            .host
            .serve_unix(dir.path().join("v.sock"), Duration::from_millis(200))
            .unwrap();
        let mut s = UnixStream::connect(front.path()).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(b"HELLO\n").unwrap();
        let mut v = Vec::new();
        s.read_to_end(&mut v).unwrap();
        assert!(v.is_empty());
        // A refused connect: the guest answers RST.
        let path = front.path().to_path_buf();
        let client = std::thread::spawn(move || {
            let mut s = UnixStream::connect(path).unwrap();
            s.set_read_timeout(Some(T)).unwrap();
            s.write_all(b"CONNECT 6000\n").unwrap();
            let mut v = Vec::new();
            s.read_to_end(&mut v).unwrap();
            v
        });
        let req = g.recv_wait(T).unwrap();
        g.send(OP_RST, 6000, req.0.src_port, &[]);
        assert!(client.join().unwrap().is_empty());
    }
}
