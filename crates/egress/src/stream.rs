//! The guest-side stream abstraction: any blocking byte stream that can be cloned, shut down
//! and given read/write timeouts. Implemented for `TcpStream` and `UnixStream`; the vsock
//! stream of kiln-vmm implements it when the proxy is wired into the sandbox.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// A blocking, cloneable stream carrying one guest connection.
///
/// Clones must share the underlying connection (a read on one and a write on another run at
/// once from two threads), and `shutdown` on any clone affects the connection.
pub trait EgressStream: Read + Write + Send + Sized + 'static {
    /// Another handle on the same connection.
    fn try_clone(&self) -> io::Result<Self>;
    /// Shuts down reading, writing or both.
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
    /// Timeout of each read (`None`: block).
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    /// Timeout of each write (`None`: block).
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()>;
}

impl EgressStream for TcpStream {
    fn try_clone(&self) -> io::Result<Self> {
        TcpStream::try_clone(self)
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        TcpStream::shutdown(self, how)
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, t)
    }
}

impl EgressStream for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        UnixStream::shutdown(self, how)
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, t)
    }
}

/// Internal: something readable/writable whose read/write timeouts can be set (a plain stream,
/// or a TLS stream over one).
pub(crate) trait Timed: Read + Write {
    fn read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    fn write_timeout(&self, t: Option<Duration>) -> io::Result<()>;
}

impl<S: EgressStream> Timed for S {
    fn read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
    fn write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(t)
    }
}

impl<C, D, T> Timed for rustls::StreamOwned<C, T>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
    D: rustls::SideData,
    T: Timed,
{
    fn read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.sock.read_timeout(t)
    }
    fn write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.sock.write_timeout(t)
    }
}
