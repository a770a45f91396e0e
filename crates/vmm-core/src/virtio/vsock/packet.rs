//! The virtio-vsock packet header as plain data, and the protocol constants.
//!
//! Parsing packets out of descriptor chains is done by the `virtio-vsock` crate's
//! `VsockPacket`; this module gives the muxer an owned, copyable header it can queue, compare
//! and build replies from, plus encode/decode of the 44-byte little-endian wire form.

/// Size of the packed `virtio_vsock_hdr`.
pub const HDR_SIZE: usize = 44;

/// The host's CID.
pub const HOST_CID: u64 = 2;

/// Stream socket type (the only one supported).
pub const TYPE_STREAM: u16 = 1;

/// Connection request.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection reset / refused.
pub const OP_RST: u16 = 3;
/// Half or full shutdown (flags say which direction).
pub const OP_SHUTDOWN: u16 = 4;
/// Data.
pub const OP_RW: u16 = 5;
/// Unsolicited credit information.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Ask the peer for a credit update.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// Event queue event id: the transport was reset, every connection is gone.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// Owned copy of a vsock packet header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Op-specific flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer (wrapping).
    pub fwd_cnt: u32,
}

impl Header {
    /// Decode the little-endian wire form.
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |o: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(a)
        };
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encode into the little-endian wire form.
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Read the header fields out of a parsed `VsockPacket`.
    pub fn from_packet<B: vm_memory::bitmap::BitmapSlice>(
        p: &virtio_vsock::packet::VsockPacket<'_, B>,
    ) -> Self {
        Header {
            src_cid: p.src_cid(),
            dst_cid: p.dst_cid(),
            src_port: p.src_port(),
            dst_port: p.dst_port(),
            len: p.len(),
            type_: p.type_(),
            op: p.op(),
            flags: p.flags(),
            buf_alloc: p.buf_alloc(),
            fwd_cnt: p.fwd_cnt(),
        }
    }

    /// Human-readable op name for logs.
    pub fn op_name(&self) -> &'static str {
        match self.op {
            OP_REQUEST => "REQUEST",
            OP_RESPONSE => "RESPONSE",
            OP_RST => "RST",
            OP_SHUTDOWN => "SHUTDOWN",
            OP_RW => "RW",
            OP_CREDIT_UPDATE => "CREDIT_UPDATE",
            OP_CREDIT_REQUEST => "CREDIT_REQUEST",
            _ => "UNKNOWN",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip_and_layout() {
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 1024,
            dst_port: 0xdead_beef,
            len: 4096,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: SHUTDOWN_SEND,
            buf_alloc: 256 * 1024,
            fwd_cnt: 77,
        };
        let b = h.to_bytes();
        assert_eq!(Header::from_bytes(&b), h);
        assert_eq!(b[0], 0x08, "src_cid is little endian at offset 0");
        assert_eq!(&b[20..24], &0xdead_beefu32.to_le_bytes());
        assert_eq!(u16::from_le_bytes([b[30], b[31]]), OP_RW);
        assert_eq!(HDR_SIZE, virtio_vsock::packet::PKT_HEADER_SIZE);
    }
}
