//! Protocol version, well-known vsock addresses (CIDs, ports), the agent's READY console line
//! and every size bound of the protocol.
//!
//! Both ends enforce these: the decoder refuses frames larger than [`MAX_FRAME`] before
//! allocating, and [`crate::Message::validate`] checks the per-field bounds.

/// Protocol version announced by the agent in its `Hello`. A host refuses a different version.
pub const PROTOCOL_VERSION: u32 = 2;

/// vsock port on the host (CID 2) that the agent connects to and speaks kiln-proto on.
pub const AGENT_PORT: u32 = 1024;

/// vsock port on the host (CID 2) of the sandbox's egress proxy: the agent forwards each TCP
/// connection made to the guest's proxy port (127.0.0.1:3128) as one vsock connection here.
/// The host listens on it only when the sandbox has an egress policy (docs/EGRESS.md).
pub const EGRESS_PORT: u32 = 1025;

/// vsock port in the guest of the byte echo server (only with `kiln.echo=1` on the cmdline).
pub const ECHO_PORT: u32 = 5000;

/// The vsock CID of the host.
pub const HOST_CID: u32 = 2;

/// The vsock CID Kiln gives its guests (one guest per VM, so every guest has the same one).
pub const GUEST_CID: u32 = 3;

/// The line the agent prints on the serial console once it can serve; tests and tools wait
/// for this exact line.
pub const READY_LINE: &str = "KILN-AGENT-READY";

/// Length of the frame header: a `u32` little-endian payload length.
pub const FRAME_HEADER_LEN: usize = 4;

/// Largest data chunk carried by one message (stdout/stderr chunks, stdin data, file data).
pub const MAX_CHUNK: usize = 256 * 1024;

/// Largest frame payload (the bytes after the header): 1 MiB plus room for message overhead.
pub const MAX_FRAME: usize = 1024 * 1024 + 4096;

/// Most argv entries in one `Exec`.
pub const MAX_ARGS: usize = 4096;

/// Most environment variables in one `Exec`.
pub const MAX_ENV: usize = 4096;

/// Longest single argv entry, environment key or value (bytes); Linux's own limit is 128 KiB.
pub const MAX_STRING: usize = 128 * 1024;

/// Longest path (bytes), as Linux's `PATH_MAX`.
pub const MAX_PATH: usize = 4096;

/// Longest `ExecRequest::user` (a user name, `UID` or `UID:GID`).
pub const MAX_USER: usize = 256;

/// Longest error message or capability string (bytes).
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Most capability strings in a `Hello`.
pub const MAX_CAPABILITIES: usize = 64;

/// Most directory entries in one `DirEntries` response (the client pages with `start`).
pub const MAX_DIR_ENTRIES: usize = 1024;

/// Largest seed accepted by `PostRestore`.
pub const MAX_SEED: usize = 4096;

/// Bytes of output a background exec buffers while nobody waits on it, when it has no
/// `output_cap` of its own. Beyond it the output is dropped and `truncated` is reported.
pub const BACKGROUND_BUFFER: u64 = 16 * 1024 * 1024;

/// Stdin chunks an exec may have queued in the agent (not yet written to the pipe).
pub const MAX_STDIN_QUEUE: usize = 16;
