//! kiln-proto: the wire protocol between the Kiln host and the guest agent.
//!
//! This crate owns everything both ends must agree on and nothing else:
//! - [`limits`]: the protocol version, vsock ports and every size bound;
//! - [`msg`]: the messages (handshake, requests, responses) as serde types;
//! - [`frame`]: framing (`u32` little-endian length + postcard payload), the blocking
//!   [`read_frame`]/[`write_frame`] helpers, the incremental [`FrameDecoder`] and [`ProtoError`];
//! - [`client`]: a small transport-agnostic blocking client that multiplexes requests by id.
//!
//! The full protocol description lives in `docs/PROTOCOL.md`.

pub mod client;
pub mod frame;
pub mod limits;
pub mod msg;

pub use client::{
    Client, ClientConfig, ClientError, ExecEvent, ExecOutput, ExecStream, StdinWriter,
};
pub use frame::{decode_payload, encode_frame, read_frame, write_frame, FrameDecoder, ProtoError};
pub use limits::*;
pub use msg::*;
