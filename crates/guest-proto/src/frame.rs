//! Framing: each message is a `u32` little-endian payload length followed by the postcard
//! encoding of a [`Message`]. Lengths above [`MAX_FRAME`] are refused before any allocation.
//!
//! Blocking helpers ([`read_frame`], [`write_frame`]) serve threads that own a stream; the
//! incremental [`FrameDecoder`] serves non-blocking readers (feed bytes, take messages).

use std::io::{self, Read, Write};

use crate::limits::{FRAME_HEADER_LEN, MAX_FRAME};
use crate::msg::{LimitError, Message};

/// Errors of framing, encoding and decoding.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// A frame header announced more than [`MAX_FRAME`] payload bytes.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge { len: usize, max: usize },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame: {what}, got {got} of {expected} bytes")]
    Truncated {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// The stream ended cleanly between frames.
    #[error("connection closed")]
    Closed,
    /// A complete frame whose payload is not a valid message. `what` names how far decoding
    /// got (e.g. `Request 42: Exec`); `request_id` is the id when the payload at least starts
    /// like a request, so the receiver can answer that request.
    #[error("cannot decode a {len}-byte frame payload ({what}): {source}")]
    Decode {
        len: usize,
        what: String,
        request_id: Option<u64>,
        #[source]
        source: postcard::Error,
    },
    /// A frame payload with bytes left over after the message.
    #[error("{extra} trailing bytes after the message in a {len}-byte frame payload")]
    TrailingBytes {
        len: usize,
        extra: usize,
        request_id: Option<u64>,
    },
    /// A message could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(#[source] postcard::Error),
    /// A message broke a field bound.
    #[error("message out of bounds: {0}")]
    Limit(#[from] LimitError),
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: we speak {ours}, the peer speaks {theirs}")]
    VersionMismatch { ours: u32, theirs: u32 },
    /// The first message on a connection was not the expected handshake.
    #[error("expected a Hello handshake, got {got}")]
    NoHandshake { got: &'static str },
    /// Reading or writing the stream failed.
    #[error("stream I/O: {0}")]
    Io(#[from] io::Error),
}

impl ProtoError {
    /// True when the stream itself is unusable after this error (as opposed to one bad
    /// message in an otherwise intact stream).
    pub fn is_fatal(&self) -> bool {
        !matches!(
            self,
            Self::Decode { .. } | Self::TrailingBytes { .. } | Self::Limit(_)
        )
    }
}

/// Encode `msg` as one frame (header + payload).
pub fn encode_frame(msg: &Message) -> Result<Vec<u8>, ProtoError> {
    let mut buf =
        postcard::to_extend(msg, vec![0u8; FRAME_HEADER_LEN]).map_err(ProtoError::Encode)?;
    let len = buf.len() - FRAME_HEADER_LEN;
    if len > MAX_FRAME {
        return Err(ProtoError::FrameTooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    // The length fits in u32: it is at most MAX_FRAME.
    let header = u32::try_from(len).map_err(|_| ProtoError::FrameTooLarge {
        len,
        max: MAX_FRAME,
    })?;
    buf[..FRAME_HEADER_LEN].copy_from_slice(&header.to_le_bytes());
    Ok(buf)
}

/// Decode one frame payload (the bytes after the header).
pub fn decode_payload(payload: &[u8]) -> Result<Message, ProtoError> {
    let (msg, rest) = postcard::take_from_bytes(payload).map_err(|source| ProtoError::Decode {
        len: payload.len(),
        what: describe_payload(payload),
        request_id: peek_request_id(payload),
        source,
    })?;
    if !rest.is_empty() {
        return Err(ProtoError::TrailingBytes {
            len: payload.len(),
            extra: rest.len(),
            request_id: peek_request_id(payload),
        });
    }
    Ok(msg)
}

/// Names of `Request` variants by encoded index (checked against the enum by a test).
const REQUEST_NAMES: &[&str] = &[
    "Ping",
    "Exec",
    "StdinData",
    "StdinEof",
    "Signal",
    "Wait",
    "ReadFile",
    "WriteFile",
    "ListDir",
    "Stat",
    "Mkdir",
    "Remove",
    "Rename",
    "Exists",
    "PostRestore",
    "Shutdown",
];

/// Names of `Response` variants by encoded index (checked against the enum by a test).
const RESPONSE_NAMES: &[&str] = &[
    "Pong",
    "Ok",
    "ExecStarted",
    "Stdout",
    "Stderr",
    "Exit",
    "Data",
    "Written",
    "DirEntries",
    "Stat",
    "Bool",
    "Error",
];

/// Describe how far a payload decodes: message kind, id and body variant.
fn describe_payload(payload: &[u8]) -> String {
    let Ok((variant, rest)) = postcard::take_from_bytes::<u32>(payload) else {
        return "no message variant".into();
    };
    let (kind, names) = match variant {
        0 => return "Hello".into(),
        1 => ("Request", REQUEST_NAMES),
        2 => ("Response", RESPONSE_NAMES),
        v => return format!("unknown message variant {v}"),
    };
    let Ok((id, rest)) = postcard::take_from_bytes::<u64>(rest) else {
        return format!("{kind} without an id");
    };
    match postcard::take_from_bytes::<u32>(rest) {
        Ok((b, _)) => match names.get(b as usize) {
            Some(name) => format!("{kind} {id}: {name}"),
            None => format!("{kind} {id}: unknown variant {b}"),
        },
        Err(_) => format!("{kind} {id} without a body"),
    }
}

/// The request id of a payload that starts like `Message::Request`, even when the rest of it
/// does not decode (e.g. an unknown request variant from a newer host).
fn peek_request_id(payload: &[u8]) -> Option<u64> {
    let (variant, rest) = postcard::take_from_bytes::<u32>(payload).ok()?;
    if variant != 1 {
        return None;
    }
    postcard::take_from_bytes::<u64>(rest)
        .ok()
        .map(|(id, _)| id)
}

/// Write `msg` as one frame and flush.
pub fn write_frame<W: Write + ?Sized>(w: &mut W, msg: &Message) -> Result<(), ProtoError> {
    let buf = encode_frame(msg)?;
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

fn parse_header(h: [u8; FRAME_HEADER_LEN]) -> Result<usize, ProtoError> {
    let len = u32::from_le_bytes(h) as usize;
    if len > MAX_FRAME {
        return Err(ProtoError::FrameTooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    Ok(len)
}

/// Read into `buf` until full or end of stream; returns the bytes read.
fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Read one frame and decode it. A clean end of stream between frames is
/// [`ProtoError::Closed`]. Message field bounds are not checked here: call
/// [`Message::validate`].
pub fn read_frame<R: Read + ?Sized>(r: &mut R) -> Result<Message, ProtoError> {
    let mut h = [0u8; FRAME_HEADER_LEN];
    let got = read_full(r, &mut h)?;
    if got == 0 {
        return Err(ProtoError::Closed);
    }
    if got < FRAME_HEADER_LEN {
        return Err(ProtoError::Truncated {
            what: "frame header",
            expected: FRAME_HEADER_LEN,
            got,
        });
    }
    let len = parse_header(h)?;
    let mut payload = vec![0u8; len];
    let got = read_full(r, &mut payload)?;
    if got < len {
        return Err(ProtoError::Truncated {
            what: "frame payload",
            expected: len,
            got,
        });
    }
    decode_payload(&payload)
}

/// Incremental decoder: [`feed`](Self::feed) bytes as they arrive, then call
/// [`next_message`](Self::next_message) until it returns `Ok(None)`.
///
/// After [`ProtoError::FrameTooLarge`] the stream cannot be resynchronised and the decoder
/// keeps returning that error. After [`ProtoError::Decode`] the bad frame has been consumed and
/// decoding continues with the next frame.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    poisoned: Option<usize>,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append received bytes. Call [`next_message`](Self::next_message) after each feed: the
    /// buffer then never holds more than one maximum frame plus the last fed slice.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.poisoned.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Bytes buffered but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete message, `Ok(None)` when more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Message>, ProtoError> {
        if let Some(len) = self.poisoned {
            return Err(ProtoError::FrameTooLarge {
                len,
                max: MAX_FRAME,
            });
        }
        if self.buf.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let mut h = [0u8; FRAME_HEADER_LEN];
        h.copy_from_slice(&self.buf[..FRAME_HEADER_LEN]);
        let len = match parse_header(h) {
            Ok(len) => len,
            Err(e) => {
                self.poisoned = Some(u32::from_le_bytes(h) as usize);
                self.buf = Vec::new();
                return Err(e);
            }
        };
        let end = FRAME_HEADER_LEN + len;
        if self.buf.len() < end {
            return Ok(None);
        }
        let result = decode_payload(&self.buf[FRAME_HEADER_LEN..end]);
        self.buf.drain(..end);
        result.map(Some)
    }

    /// Called at end of stream: an error if a partial frame is still buffered.
    pub fn finish(&self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if self.buf.len() < FRAME_HEADER_LEN {
            return Err(ProtoError::Truncated {
                what: "frame header",
                expected: FRAME_HEADER_LEN,
                got: self.buf.len(),
            });
        }
        let mut h = [0u8; FRAME_HEADER_LEN];
        h.copy_from_slice(&self.buf[..FRAME_HEADER_LEN]);
        Err(ProtoError::Truncated {
            what: "frame payload",
            expected: u32::from_le_bytes(h) as usize,
            got: self.buf.len() - FRAME_HEADER_LEN,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{Request, Response};

    #[test]
    fn oversized_header_rejected_before_payload() {
        let mut bytes = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0; 16]);
        let err = read_frame(&mut bytes.as_slice()).unwrap_err();
        assert!(matches!(err, ProtoError::FrameTooLarge { len, .. } if len == MAX_FRAME + 1));
        let mut d = FrameDecoder::new();
        d.feed(&u32::MAX.to_le_bytes());
        assert!(matches!(
            d.next_message(),
            Err(ProtoError::FrameTooLarge { .. })
        ));
        d.feed(&[1, 2, 3]);
        assert_eq!(d.buffered(), 0);
        assert!(d.next_message().is_err());
    }

    #[test]
    fn clean_eof_and_truncation() {
        assert!(matches!(read_frame(&mut &[][..]), Err(ProtoError::Closed)));
        assert!(matches!(
            read_frame(&mut &[5u8, 0][..]),
            Err(ProtoError::Truncated {
                what: "frame header",
                got: 2,
                ..
            })
        ));
        let frame = encode_frame(&Message::Request {
            id: 9,
            body: Request::Ping,
        })
        .unwrap();
        let cut = &frame[..frame.len() - 1];
        assert!(matches!(
            read_frame(&mut &cut[..]),
            Err(ProtoError::Truncated {
                what: "frame payload",
                ..
            })
        ));
        let mut d = FrameDecoder::new();
        d.feed(cut);
        assert!(d.next_message().unwrap().is_none());
        assert!(d.finish().is_err());
    }

    #[test]
    fn decode_error_keeps_request_id_and_stream() {
        // Message::Request (variant 1), id 300 (varint), request variant 200 (unknown).
        let payload = [1u8, 0xac, 0x02, 0xc8, 0x01];
        let mut bytes = (payload.len() as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(&payload);
        let good = Message::Response {
            id: 1,
            body: Response::Pong,
        };
        bytes.extend_from_slice(&encode_frame(&good).unwrap());
        let mut d = FrameDecoder::new();
        d.feed(&bytes);
        match d.next_message() {
            Err(ProtoError::Decode {
                request_id: Some(300),
                len: 5,
                what,
                ..
            }) => assert_eq!(what, "Request 300: unknown variant 200"),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(d.next_message().unwrap(), Some(good));
        assert_eq!(d.next_message().unwrap(), None);
        d.finish().unwrap();
    }

    #[test]
    fn variant_name_tables_match_the_enums() {
        use crate::msg::*;
        let st = ExitStatus {
            code: None,
            signal: None,
            timed_out: false,
            truncated: false,
            ..Default::default()
        };
        let p = String::new;
        let reqs = [
            Request::Ping,
            Request::Exec(ExecRequest::new(["x"])),
            Request::StdinData {
                exec_id: 0,
                data: vec![],
            },
            Request::StdinEof { exec_id: 0 },
            Request::Signal {
                exec_id: 0,
                signal: 0,
            },
            Request::Wait { exec_id: 0 },
            Request::ReadFile {
                path: p(),
                offset: 0,
                len: 0,
            },
            Request::WriteFile {
                path: p(),
                offset: 0,
                data: vec![],
                create: false,
                truncate: false,
                mode: None,
            },
            Request::ListDir {
                path: p(),
                start: 0,
            },
            Request::Stat { path: p() },
            Request::Mkdir {
                path: p(),
                parents: false,
                mode: None,
            },
            Request::Remove {
                path: p(),
                recursive: false,
            },
            Request::Rename { from: p(), to: p() },
            Request::Exists { path: p() },
            Request::PostRestore {
                unix_time_ns: 0,
                seed: vec![],
            },
            Request::Shutdown,
        ];
        assert_eq!(reqs.len(), REQUEST_NAMES.len());
        for r in reqs {
            let name = r.name();
            let f = encode_frame(&Message::Request { id: 5, body: r }).unwrap();
            assert_eq!(describe_payload(&f[4..]), format!("Request 5: {name}"));
        }
        let resps = [
            Response::Pong,
            Response::Ok,
            Response::ExecStarted { exec_id: 0, pid: 0 },
            Response::Stdout(vec![]),
            Response::Stderr(vec![]),
            Response::Exit(st),
            Response::Data {
                data: vec![],
                eof: false,
            },
            Response::Written { len: 0 },
            Response::DirEntries {
                entries: vec![],
                more: false,
            },
            Response::Stat(FileStat {
                kind: FileKind::File,
                size: 0,
                mode: 0,
                mtime_ns: 0,
            }),
            Response::Bool(true),
            Response::error(ErrorKind::Io, ""),
        ];
        assert_eq!(resps.len(), RESPONSE_NAMES.len());
        for r in resps {
            let name = r.name();
            let f = encode_frame(&Message::Response { id: 6, body: r }).unwrap();
            assert_eq!(describe_payload(&f[4..]), format!("Response 6: {name}"));
        }
        // Hello, and garbage.
        assert_eq!(describe_payload(&[0]), "Hello");
        assert_eq!(describe_payload(&[9]), "unknown message variant 9");
        assert_eq!(describe_payload(&[]), "no message variant");
        assert_eq!(describe_payload(&[1]), "Request without an id");
    }

    #[test]
    fn trailing_bytes_rejected() {
        let mut frame = encode_frame(&Message::Request {
            id: 4,
            body: Request::Ping,
        })
        .unwrap();
        frame.push(0);
        let len = (frame.len() - 4) as u32;
        frame[..4].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(
            read_frame(&mut frame.as_slice()),
            Err(ProtoError::TrailingBytes {
                extra: 1,
                request_id: Some(4),
                ..
            })
        ));
    }

    #[test]
    fn byte_at_a_time_feeding() {
        let msgs = [
            Message::Request {
                id: 1,
                body: Request::Ping,
            },
            Message::Response {
                id: 1,
                body: Response::Stdout(vec![7; 1000]),
            },
        ];
        let mut bytes = Vec::new();
        for m in &msgs {
            write_frame(&mut bytes, m).unwrap();
        }
        let mut d = FrameDecoder::new();
        let mut out = Vec::new();
        for b in bytes {
            d.feed(&[b]);
            while let Some(m) = d.next_message().unwrap() {
                out.push(m);
            }
        }
        assert_eq!(out, msgs);
    }

    #[test]
    fn encoding_too_large_message_fails() {
        // A message that serializes above MAX_FRAME is refused by the encoder.
        let m = Message::Response {
            id: 1,
            body: Response::Stdout(vec![0; MAX_FRAME + 1]),
        };
        assert!(matches!(
            encode_frame(&m),
            Err(ProtoError::FrameTooLarge { .. })
        ));
    }
}
