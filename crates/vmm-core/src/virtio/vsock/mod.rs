//! The virtio-vsock device (virtio device id 19) and its in-process host endpoint.
//!
//! - [`packet`]: the owned packet header and protocol constants.
//! - [`connection`]: the per-connection state machine and credit accounting (device side).
//! - [`muxer`]: routes guest packets to connections, queues replies, owns the connection map.
//! - [`host`]: what the rest of Kiln uses: [`VsockHost`] (`connect`, `listen`,
//!   `transport_reset`), [`VsockStream`] (Read + Write, clonable, timeouts) and
//!   [`VsockListener`].
//! - [`device`]: [`VsockDevice`], the virtio device: RX/TX/event queues, the event-loop
//!   subscriber, activation and reset.
//!
//! See docs/VSOCK.md for the design and the state machine.

pub mod attach;
pub mod connection;
pub mod device;
pub mod host;
pub mod muxer;
pub mod packet;
pub mod unix;

#[cfg(test)]
mod tests;

use std::time::Duration;

pub use device::VsockDevice;
pub use host::{VsockHost, VsockListener, VsockStream};
pub use unix::UnixFront;

/// Virtio device id of vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Queue index of the RX queue (device -> guest).
pub const RXQ: usize = 0;
/// Queue index of the TX queue (guest -> device).
pub const TXQ: usize = 1;
/// Queue index of the event queue.
pub const EVQ: usize = 2;
/// Maximum size of each queue.
pub const QUEUE_MAX_SIZE: u16 = 256;
/// Largest payload of one packet, either direction (Linux uses the same 64 KiB).
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// A chain with more descriptors than this is malformed (drivers use one or two).
pub const MAX_CHAIN_DESCS: usize = 4;
/// Control packets (RST replies) queued for the guest before TX processing pauses.
pub const RST_QUEUE_MAX: usize = 256;
/// How long a connection the host closed waits for the guest's RST before we force it.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// First port used for host-initiated connections.
pub const EPHEMERAL_PORT_BASE: u32 = 1 << 30;

/// Per-VM vsock settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id (>= 3).
    pub guest_cid: u64,
    /// Cap on simultaneous connections (both directions, including pending connects).
    pub max_connections: usize,
    /// Per-connection receive buffer we advertise to the guest (`buf_alloc`), and the size of
    /// the per-connection host->guest send buffer. Bytes.
    pub conn_buffer_size: u32,
    /// Accepted-but-not-yet-`accept()`ed connections per listener.
    pub listen_backlog: usize,
    /// seccomp mode of the unix front's copy threads (the VM's mode).
    pub seccomp: crate::seccomp::SeccompMode,
}

impl Default for VsockConfig {
    fn default() -> Self {
        VsockConfig {
            guest_cid: 3,
            max_connections: 64,
            conn_buffer_size: 256 * 1024,
            listen_backlog: 32,
            seccomp: crate::seccomp::SeccompMode::from_env(),
        }
    }
}

/// Errors of the vsock device and its host endpoint.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest refused the connection (RST to our REQUEST).
    #[error("vsock: guest cid {cid} refused connection to port {port}")]
    ConnectionRefused {
        /// Guest CID.
        cid: u64,
        /// Guest port.
        port: u32,
    },
    /// No RESPONSE within the deadline.
    #[error("vsock: connect to guest cid {cid} port {port} timed out after {timeout:?}")]
    ConnectTimeout {
        /// Guest CID.
        cid: u64,
        /// Guest port.
        port: u32,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// The connection was reset while connecting (transport or device reset).
    #[error("vsock: connection to guest cid {cid} port {port} reset while connecting ({reason})")]
    ConnectionReset {
        /// Guest CID.
        cid: u64,
        /// Guest port.
        port: u32,
        /// Why.
        reason: String,
    },
    /// A listener already exists on this host port.
    #[error("vsock: host port {port} already has a listener")]
    PortInUse {
        /// Host port.
        port: u32,
    },
    /// The per-VM connection cap was reached.
    #[error("vsock: connection limit of {limit} reached (guest cid {cid})")]
    TooManyConnections {
        /// Guest CID.
        cid: u64,
        /// Configured cap.
        limit: usize,
    },
    /// `accept` found no connection before its deadline.
    #[error("vsock: no connection on host port {port} within {timeout:?}")]
    AcceptTimeout {
        /// Host port.
        port: u32,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// The device (and its VM) is gone.
    #[error("vsock: device for guest cid {cid} is gone")]
    DeviceGone {
        /// Guest CID.
        cid: u64,
    },
    /// Invalid configuration.
    #[error("vsock: invalid configuration: {0}")]
    Config(String),
    /// Creating an EventFd / TimerFd failed.
    #[error("vsock: {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}
