//! The Connect-RPC codec envd speaks (JSON only): envelope framing of streaming requests and
//! responses, the error codes and their HTTP statuses, and the unary / streaming response
//! builders. The e2b SDK's client is the reference (docs/SERVER.md, "Connect").

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Content type of a streaming response: exactly this, with no parameters (the SDK compares it
/// verbatim).
pub const STREAM_CONTENT_TYPE: &str = "application/connect+json";

/// Flag of the end-of-stream envelope.
pub const FLAG_END_STREAM: u8 = 0x02;
/// Flag of a compressed envelope (never accepted: the SDK disables compression).
pub const FLAG_COMPRESSED: u8 = 0x01;

/// Largest envelope payload accepted from a client.
pub const MAX_ENVELOPE: usize = 16 * 1024 * 1024;

/// A Connect error code (lower-case snake on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// `canceled`
    Canceled,
    /// `invalid_argument`
    InvalidArgument,
    /// `deadline_exceeded`
    DeadlineExceeded,
    /// `not_found`
    NotFound,
    /// `already_exists`
    AlreadyExists,
    /// `permission_denied`
    PermissionDenied,
    /// `resource_exhausted`
    ResourceExhausted,
    /// `failed_precondition`
    FailedPrecondition,
    /// `unimplemented`
    Unimplemented,
    /// `internal`
    Internal,
    /// `unavailable`
    Unavailable,
    /// `unauthenticated`
    Unauthenticated,
}

impl Code {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The conventional HTTP status of a unary error with this code.
    pub fn status(self) -> StatusCode {
        match self {
            Code::Canceled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Code::InvalidArgument | Code::FailedPrecondition => StatusCode::BAD_REQUEST,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        }
    }
}

/// A Connect error: code + message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct RpcError {
    /// The code.
    pub code: Code,
    /// Human-readable message.
    pub message: String,
}

impl RpcError {
    /// A new error.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The JSON object `{"code","message"}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"code": self.code.as_str(), "message": self.message})
    }
}

impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        json_response(self.code.status(), &self.to_json())
    }
}

/// A JSON response with this status (`application/json`).
pub fn json_response(status: StatusCode, body: &impl Serialize) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Body::from(bytes));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A successful unary response.
pub fn unary_ok(body: &impl Serialize) -> Response {
    json_response(StatusCode::OK, body)
}

/// Errors decoding a streaming request's envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Fewer than 5 bytes, or fewer payload bytes than the header says.
    #[error("truncated envelope ({have} bytes, need {need})")]
    Truncated {
        /// Bytes available.
        have: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The payload length is over [`MAX_ENVELOPE`].
    #[error("envelope of {0} bytes is over the limit")]
    TooLarge(usize),
    /// The compressed flag is set.
    #[error("compressed envelopes are not supported")]
    Compressed,
}

/// One decoded envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// Flags byte.
    pub flags: u8,
    /// The payload.
    pub payload: &'a [u8],
}

/// Decodes the first envelope of `buf`; returns it and the bytes it used.
pub fn decode_envelope(buf: &[u8]) -> Result<(Envelope<'_>, usize), EnvelopeError> {
    if buf.len() < 5 {
        return Err(EnvelopeError::Truncated {
            have: buf.len(),
            need: 5,
        });
    }
    let flags = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > MAX_ENVELOPE {
        return Err(EnvelopeError::TooLarge(len));
    }
    if flags & FLAG_COMPRESSED != 0 {
        return Err(EnvelopeError::Compressed);
    }
    let need = 5 + len;
    if buf.len() < need {
        return Err(EnvelopeError::Truncated {
            have: buf.len(),
            need,
        });
    }
    Ok((
        Envelope {
            flags,
            payload: &buf[5..need],
        },
        need,
    ))
}

/// Encodes one envelope.
pub fn encode_envelope(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(flags);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A message envelope carrying this JSON value.
pub fn message_frame(v: &serde_json::Value) -> Vec<u8> {
    let payload = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    encode_envelope(0, &payload)
}

/// The end-of-stream envelope: `{}` or `{"error":{...}}`.
pub fn end_frame(error: Option<&RpcError>) -> Vec<u8> {
    let v = match error {
        None => serde_json::json!({}),
        Some(e) => serde_json::json!({"error": e.to_json()}),
    };
    let payload = serde_json::to_vec(&v).unwrap_or_else(|_| b"{}".to_vec());
    encode_envelope(FLAG_END_STREAM, &payload)
}

/// A streaming response over `body` (frames already encoded).
pub fn stream_response(body: Body) -> Response {
    let mut r = Response::new(body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(STREAM_CONTENT_TYPE),
    );
    r
}

/// A streaming response that fails at once (HTTP 200 + an end-of-stream error frame, as
/// connect-go does for errors before the first message).
pub fn stream_error(e: &RpcError) -> Response {
    stream_response(Body::from(end_frame(Some(e))))
}

/// Parses the single request message of a streaming call (one envelope).
pub fn stream_request(body: &[u8]) -> Result<serde_json::Value, RpcError> {
    let (env, _) = decode_envelope(body)
        .map_err(|e| RpcError::new(Code::InvalidArgument, format!("request envelope: {e}")))?;
    parse_json(env.payload)
}

/// Parses a unary (or enveloped) JSON request message.
pub fn parse_json(body: &[u8]) -> Result<serde_json::Value, RpcError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(serde_json::json!({}));
    }
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| RpcError::new(Code::InvalidArgument, format!("invalid JSON: {e}")))?;
    if !v.is_object() {
        return Err(RpcError::new(
            Code::InvalidArgument,
            "the request message must be a JSON object",
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trip() {
        let f = encode_envelope(0, br#"{"a":1}"#);
        assert_eq!(&f[..5], &[0, 0, 0, 0, 7]);
        let (e, used) = decode_envelope(&f).unwrap();
        assert_eq!(used, f.len());
        assert_eq!(e.flags, 0);
        assert_eq!(e.payload, br#"{"a":1}"#);
    }

    #[test]
    fn bad_envelopes_are_typed_errors() {
        assert!(matches!(
            decode_envelope(&[0, 0, 0]),
            Err(EnvelopeError::Truncated { .. })
        ));
        assert!(matches!(
            decode_envelope(&[0, 0, 0, 0, 9, b'{']),
            Err(EnvelopeError::Truncated { need: 14, .. })
        ));
        assert!(matches!(
            decode_envelope(&[0, 0xff, 0xff, 0xff, 0xff]),
            Err(EnvelopeError::TooLarge(_))
        ));
        assert_eq!(
            decode_envelope(&[1, 0, 0, 0, 0]),
            Err(EnvelopeError::Compressed)
        );
    }

    #[test]
    fn end_frame_carries_the_error() {
        let f = end_frame(Some(&RpcError::new(Code::NotFound, "no such pid")));
        assert_eq!(f[0], FLAG_END_STREAM);
        let v: serde_json::Value = serde_json::from_slice(&f[5..]).unwrap();
        assert_eq!(v["error"]["code"], "not_found");
        assert_eq!(v["error"]["message"], "no such pid");
        let ok = end_frame(None);
        assert_eq!(&ok[5..], b"{}");
    }

    #[test]
    fn requests_must_be_objects() {
        assert!(parse_json(b"").unwrap().is_object());
        assert_eq!(parse_json(b"[1]").unwrap_err().code, Code::InvalidArgument);
        assert_eq!(parse_json(b"{").unwrap_err().code, Code::InvalidArgument);
        assert_eq!(Code::AlreadyExists.status(), StatusCode::CONFLICT);
    }
}
