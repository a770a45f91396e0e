//! HTTP/1.1 message heads (httparse) and bodies, bounded: a buffered connection that reads a
//! head within a size limit and a deadline (slowloris), request/response head parsing, the
//! rewriting of heads for forwarding (hop-by-hop headers, `Connection: close`), and body
//! relays for `Content-Length`, `chunked` and read-to-close framing.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use crate::stream::Timed;

/// Largest request or response head (request line + headers).
pub const MAX_HEAD: usize = 32 * 1024;
/// Most header fields in one head.
pub const MAX_HEADERS: usize = 100;
/// Longest chunk-size or trailer line.
const MAX_LINE: usize = 4096;

/// Errors of HTTP reading and parsing.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The peer closed before sending anything.
    #[error("connection closed before a request")]
    Closed,
    /// The head is larger than [`MAX_HEAD`] or has more than [`MAX_HEADERS`] fields.
    #[error("message head larger than {MAX_HEAD} bytes or {MAX_HEADERS} headers")]
    TooLarge,
    /// The head did not arrive within its deadline.
    #[error("message head not complete within {0:?}")]
    Timeout(Duration),
    /// The bytes are not HTTP/1.x.
    #[error("malformed HTTP message: {0}")]
    Malformed(String),
    /// A framing the proxy refuses (smuggling risks): both `Content-Length` and
    /// `Transfer-Encoding`, several lengths, or a coding other than `chunked`.
    #[error("unsupported message framing: {0}")]
    Framing(&'static str),
    /// I/O failed (including an idle timeout in a body).
    #[error("I/O")]
    Io(#[source] io::Error),
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// The method, e.g. `GET`, `CONNECT`.
    pub method: String,
    /// The request target as sent (absolute-form, authority-form or origin-form).
    pub target: String,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    /// Header fields in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// Status code.
    pub status: u16,
    /// Reason phrase.
    pub reason: String,
    /// Minor version.
    pub minor: u8,
    /// Header fields in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// How a body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the connection closes (responses only).
    UntilClose,
}

fn headers_of(h: &[httparse::Header<'_>]) -> Vec<(String, Vec<u8>)> {
    h.iter()
        .map(|h| (h.name.to_string(), h.value.to_vec()))
        .collect()
}

fn map_parse_err(e: httparse::Error) -> HttpError {
    match e {
        httparse::Error::TooManyHeaders => HttpError::TooLarge,
        e => HttpError::Malformed(e.to_string()),
    }
}

/// The length of the head `parsed` from `buf`: `None` while incomplete; a head (or an
/// incomplete one) over `MAX_HEAD` bytes is refused.
fn head_len(parsed: httparse::Result<usize>, buf: &[u8]) -> Result<Option<usize>, HttpError> {
    match parsed.map_err(map_parse_err)? {
        httparse::Status::Partial if buf.len() > MAX_HEAD => Err(HttpError::TooLarge),
        httparse::Status::Partial => Ok(None),
        httparse::Status::Complete(n) if n > MAX_HEAD => Err(HttpError::TooLarge),
        httparse::Status::Complete(n) => Ok(Some(n)),
    }
}

/// Parses a request head from the start of `buf`: `Ok(None)` when incomplete, else the head and
/// its length in bytes.
pub fn parse_request_head(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let Some(n) = head_len(req.parse(buf), buf)? else {
        return Ok(None);
    };
    Ok(Some((
        RequestHead {
            method: req.method.unwrap_or_default().to_string(),
            target: req.path.unwrap_or_default().to_string(),
            minor: req.version.unwrap_or(1),
            headers: headers_of(req.headers),
        },
        n,
    )))
}

/// Parses a response head from the start of `buf` (see [`parse_request_head`]).
pub fn parse_response_head(buf: &[u8]) -> Result<Option<(ResponseHead, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let Some(n) = head_len(resp.parse(buf), buf)? else {
        return Ok(None);
    };
    Ok(Some((
        ResponseHead {
            status: resp.code.unwrap_or(0),
            reason: resp.reason.unwrap_or_default().to_string(),
            minor: resp.version.unwrap_or(1),
            headers: headers_of(resp.headers),
        },
        n,
    )))
}

/// The value of the first header `name` (case-insensitive).
pub fn header<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

/// The body framing of a message with these headers (RFC 9112 section 6), refusing ambiguous
/// framings. `response` allows read-until-close.
pub fn body_framing(headers: &[(String, Vec<u8>)], response: bool) -> Result<Framing, HttpError> {
    let te: Vec<&[u8]> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"))
        .map(|(_, v)| v.as_slice())
        .collect();
    let cl: Vec<&[u8]> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.as_slice())
        .collect();
    if !te.is_empty() {
        if !cl.is_empty() {
            return Err(HttpError::Framing(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        if te.len() == 1 && te[0].trim_ascii().eq_ignore_ascii_case(b"chunked") {
            return Ok(Framing::Chunked);
        }
        return Err(HttpError::Framing("a transfer coding other than chunked"));
    }
    match cl.as_slice() {
        [] => Ok(if response {
            Framing::UntilClose
        } else {
            Framing::None
        }),
        [v] => {
            let v = v.trim_ascii();
            if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
                return Err(HttpError::Framing("an invalid Content-Length"));
            }
            let n = std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(HttpError::Framing("an invalid Content-Length"))?;
            Ok(if n == 0 && !response {
                Framing::None
            } else {
                Framing::Length(n)
            })
        }
        _ => Err(HttpError::Framing("several Content-Length fields")),
    }
}

/// Hop-by-hop fields never forwarded (plus those named by `Connection`).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
];

/// Removes hop-by-hop fields (and those listed in `Connection`) and `Expect`; returns whether
/// an `Expect: 100-continue` was removed.
pub fn strip_hop_by_hop(headers: &mut Vec<(String, Vec<u8>)>) -> bool {
    let mut named: Vec<String> = Vec::new();
    for (n, v) in headers.iter() {
        if n.eq_ignore_ascii_case("connection") {
            for tok in v.split(|&b| b == b',') {
                let tok = String::from_utf8_lossy(tok.trim_ascii()).to_ascii_lowercase();
                if !tok.is_empty() {
                    named.push(tok);
                }
            }
        }
    }
    let mut expect = false;
    headers.retain(|(n, v)| {
        let l = n.to_ascii_lowercase();
        if l == "expect" {
            expect |= v.trim_ascii().eq_ignore_ascii_case(b"100-continue");
            return false;
        }
        !HOP_BY_HOP.contains(&l.as_str()) && !named.contains(&l)
    });
    expect
}

/// Serialises a request head.
pub fn write_request_head(
    out: &mut Vec<u8>,
    method: &str,
    target: &str,
    headers: &[(String, Vec<u8>)],
) {
    out.extend_from_slice(format!("{method} {target} HTTP/1.1\r\n").as_bytes());
    write_headers(out, headers);
}

/// Serialises a response head (always HTTP/1.1).
pub fn write_response_head(
    out: &mut Vec<u8>,
    status: u16,
    reason: &str,
    headers: &[(String, Vec<u8>)],
) {
    out.extend_from_slice(format!("HTTP/1.1 {status} {reason}\r\n").as_bytes());
    write_headers(out, headers);
}

fn write_headers(out: &mut Vec<u8>, headers: &[(String, Vec<u8>)]) {
    for (n, v) in headers {
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A simple complete response with a text body, `Connection: close`.
pub fn simple_response(status: u16, reason: &str, body: &str) -> Vec<u8> {
    let mut out = Vec::new();
    write_response_head(
        &mut out,
        status,
        reason,
        &[
            ("Content-Type".into(), b"text/plain; charset=utf-8".to_vec()),
            ("Content-Length".into(), body.len().to_string().into_bytes()),
            ("Connection".into(), b"close".to_vec()),
        ],
    );
    out.extend_from_slice(body.as_bytes());
    out
}

/// A head parser: `Ok(None)` while incomplete, else the head and its length.
pub(crate) type HeadParser<H> = fn(&[u8]) -> Result<Option<(H, usize)>, HttpError>;

/// A connection with a read buffer: heads are read into it, what follows stays buffered for
/// the body (or the tunnel).
pub(crate) struct BufConn<T> {
    pub(crate) io: T,
    buf: Vec<u8>,
    pos: usize,
}

impl<T: Timed> BufConn<T> {
    pub(crate) fn new(io: T) -> Self {
        Self {
            io,
            buf: Vec::new(),
            pos: 0,
        }
    }

    /// Bytes read but not consumed yet.
    pub(crate) fn take_buffered(&mut self) -> Vec<u8> {
        let out = self.buf[self.pos..].to_vec();
        self.buf.clear();
        self.pos = 0;
        out
    }

    pub(crate) fn into_parts(mut self) -> (T, Vec<u8>) {
        let b = self.take_buffered();
        (self.io, b)
    }

    /// Reads one head within `timeout` (total, not per read) and [`MAX_HEAD`].
    pub(crate) fn read_head<H>(
        &mut self,
        timeout: Duration,
        parse: HeadParser<H>,
    ) -> Result<H, HttpError> {
        let deadline = Instant::now() + timeout;
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        loop {
            if !self.buf.is_empty() {
                if let Some((h, n)) = parse(&self.buf)? {
                    self.pos = n;
                    return Ok(h);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HttpError::Timeout(timeout));
            }
            self.io
                .read_timeout(Some(left.max(Duration::from_millis(1))))
                .map_err(HttpError::Io)?;
            let mut chunk = [0u8; 4096];
            let want = (MAX_HEAD + 1 - self.buf.len().min(MAX_HEAD)).min(chunk.len());
            match self.io.read(&mut chunk[..want]) {
                Ok(0) if self.buf.is_empty() => return Err(HttpError::Closed),
                Ok(0) => {
                    return Err(HttpError::Malformed(
                        "connection closed inside a head".into(),
                    ))
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if is_timeout(&e) => return Err(HttpError::Timeout(timeout)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(HttpError::Io(e)),
            }
            if self.buf.len() > MAX_HEAD {
                // One last parse: a complete head may end inside the extra bytes.
                if let Some((h, n)) = parse(&self.buf)? {
                    self.pos = n;
                    return Ok(h);
                }
                return Err(HttpError::TooLarge);
            }
        }
    }

    /// Puts one byte back in front of the buffered bytes.
    pub(crate) fn unread(&mut self, b: u8) {
        if self.pos > 0 {
            self.pos -= 1;
            self.buf[self.pos] = b;
        } else {
            self.buf.insert(0, b);
        }
    }

    /// Reads one CRLF-terminated line (bounded), returned with its CRLF.
    fn read_line(&mut self) -> Result<Vec<u8>, HttpError> {
        let mut line = Vec::new();
        loop {
            if self.pos < self.buf.len() {
                let avail = &self.buf[self.pos..];
                if let Some(i) = avail.iter().position(|&b| b == b'\n') {
                    line.extend_from_slice(&avail[..=i]);
                    self.pos += i + 1;
                    return Ok(line);
                }
                line.extend_from_slice(avail);
                self.pos = self.buf.len();
            }
            if line.len() > MAX_LINE {
                return Err(HttpError::Malformed("chunk line too long".into()));
            }
            self.buf.clear();
            self.pos = 0;
            let mut chunk = [0u8; 1024];
            let n = self.io.read(&mut chunk).map_err(HttpError::Io)?;
            if n == 0 {
                return Err(HttpError::Malformed(
                    "connection closed inside a chunked body".into(),
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

impl<T: Timed> Read for BufConn<T> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos < self.buf.len() {
            let n = (self.buf.len() - self.pos).min(out.len());
            out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
            self.pos += n;
            if self.pos == self.buf.len() {
                self.buf.clear();
                self.pos = 0;
            }
            return Ok(n);
        }
        self.io.read(out)
    }
}

impl<T: Timed> Write for BufConn<T> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.io.write(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.io.flush()
    }
}

impl<T: Timed> Timed for BufConn<T> {
    fn read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.io.read_timeout(t)
    }
    fn write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.io.write_timeout(t)
    }
}

/// Whether an I/O error is a read/write timeout.
pub(crate) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Where a relayed body's bytes are charged; an error stops the relay.
pub(crate) trait Meter {
    fn charge(&mut self, n: usize) -> Result<(), HttpError>;
}

/// Relays a body of `framing` from `src` to `dst`. With `decode`, a chunked body is written
/// de-chunked (for `http_request`); otherwise it is relayed as is. `max` bounds the bytes
/// read. Returns the bytes written.
pub(crate) fn relay_body<T: Timed, W: Write>(
    src: &mut BufConn<T>,
    dst: &mut W,
    framing: Framing,
    decode: bool,
    max: u64,
    meter: &mut dyn Meter,
) -> Result<u64, HttpError> {
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    match framing {
        Framing::None => {}
        Framing::Length(n) => copy_n(src, dst, Some(n), &mut total, max, &mut buf, meter)?,
        Framing::UntilClose => copy_n(src, dst, None, &mut total, max, &mut buf, meter)?,
        Framing::Chunked => loop {
            let line = src.read_line()?;
            let size_part = line
                .split(|&b| b == b';' || b == b'\r' || b == b'\n')
                .next()
                .unwrap_or_default()
                .trim_ascii();
            if size_part.is_empty()
                || size_part.len() > 15
                || !size_part.iter().all(u8::is_ascii_hexdigit)
            {
                return Err(HttpError::Malformed("bad chunk size".into()));
            }
            let size = u64::from_str_radix(&String::from_utf8_lossy(size_part), 16)
                .map_err(|_| HttpError::Malformed("bad chunk size".into()))?;
            if !decode {
                meter.charge(line.len())?;
                dst.write_all(&line).map_err(HttpError::Io)?;
            }
            if size == 0 {
                // Trailer fields until an empty line.
                let mut lines = 0;
                loop {
                    let t = src.read_line()?;
                    if !decode {
                        meter.charge(t.len())?;
                        dst.write_all(&t).map_err(HttpError::Io)?;
                    }
                    if t == b"\r\n" || t == b"\n" {
                        break;
                    }
                    lines += 1;
                    if lines > MAX_HEADERS {
                        return Err(HttpError::TooLarge);
                    }
                }
                break;
            }
            copy_n(src, dst, Some(size), &mut total, max, &mut buf, meter)?;
            let crlf = src.read_line()?;
            if crlf != b"\r\n" && crlf != b"\n" {
                return Err(HttpError::Malformed("chunk not followed by CRLF".into()));
            }
            if !decode {
                meter.charge(crlf.len())?;
                dst.write_all(&crlf).map_err(HttpError::Io)?;
            }
        },
    }
    dst.flush().map_err(HttpError::Io)?;
    Ok(total)
}

/// Copies `limit` bytes (or until EOF when `None`) from `src` to `dst`.
fn copy_n<T: Timed, W: Write>(
    src: &mut BufConn<T>,
    dst: &mut W,
    limit: Option<u64>,
    total: &mut u64,
    max: u64,
    buf: &mut [u8],
    meter: &mut dyn Meter,
) -> Result<(), HttpError> {
    let mut left = limit;
    loop {
        let want = match left {
            Some(0) => return Ok(()),
            Some(l) => l.min(buf.len() as u64) as usize,
            None => buf.len(),
        };
        let n = match src.read(&mut buf[..want]) {
            Ok(0) if left.is_none() => return Ok(()),
            Ok(0) => return Err(HttpError::Malformed("body shorter than its length".into())),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(HttpError::Io(e)),
        };
        if *total + n as u64 > max {
            return Err(HttpError::Framing("a body larger than allowed"));
        }
        meter.charge(n)?;
        dst.write_all(&buf[..n]).map_err(HttpError::Io)?;
        *total += n as u64;
        if let Some(l) = left.as_mut() {
            *l -= n as u64;
        }
    }
}

/// Fuzzing entry points (not a stable API).
#[doc(hidden)]
pub mod fuzz {
    use super::*;

    /// An in-memory "connection" for the bounded readers.
    struct Mem(io::Cursor<Vec<u8>>);

    impl Read for Mem {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.0.read(b)
        }
    }

    impl Write for Mem {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Timed for Mem {
        fn read_timeout(&self, _: Option<Duration>) -> io::Result<()> {
            Ok(())
        }
        fn write_timeout(&self, _: Option<Duration>) -> io::Result<()> {
            Ok(())
        }
    }

    struct NoMeter;

    impl Meter for NoMeter {
        fn charge(&mut self, _: usize) -> Result<(), HttpError> {
            Ok(())
        }
    }

    /// Reads one request from `data` the way the proxy reads a guest connection: bounded head,
    /// framing check, hop-by-hop stripping, body relayed (de-chunked, at most 1 MiB).
    pub fn read_request(data: &[u8]) -> Result<(RequestHead, Vec<u8>), HttpError> {
        let mut conn = BufConn::new(Mem(io::Cursor::new(data.to_vec())));
        let mut head = conn.read_head(Duration::from_secs(1), parse_request_head)?;
        let framing = body_framing(&head.headers, false)?;
        strip_hop_by_hop(&mut head.headers);
        let mut body = Vec::new();
        relay_body(&mut conn, &mut body, framing, true, 1 << 20, &mut NoMeter)?;
        Ok((head, body))
    }

    /// The same for a response (read-until-close allowed).
    pub fn read_response(data: &[u8]) -> Result<(ResponseHead, Vec<u8>), HttpError> {
        let mut conn = BufConn::new(Mem(io::Cursor::new(data.to_vec())));
        let head = conn.read_head(Duration::from_secs(1), parse_response_head)?;
        let framing = body_framing(&head.headers, true)?;
        let mut body = Vec::new();
        relay_body(&mut conn, &mut body, framing, false, 1 << 20, &mut NoMeter)?;
        Ok((head, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_whole_requests() {
        let (h, body) = fuzz::read_request(
            b"POST http://x/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nT: 1\r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            (h.method.as_str(), body.as_slice()),
            ("POST", &b"hello"[..])
        );
        let (_, body) =
            fuzz::read_request(b"PUT / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcdef").unwrap();
        assert_eq!(body, b"abc");
        assert!(fuzz::read_request(b"PUT / HTTP/1.1\r\nContent-Length: 9\r\n\r\nabc").is_err());
        assert!(
            fuzz::read_request(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
                .is_err()
        );
        let (r, body) = fuzz::read_response(b"HTTP/1.1 200 OK\r\n\r\nuntil close").unwrap();
        assert_eq!((r.status, body.as_slice()), (200, &b"until close"[..]));
    }

    #[test]
    fn parses_heads() {
        let (h, n) = parse_request_head(b"GET http://x.org/a HTTP/1.1\r\nHost: x.org\r\n\r\nBODY")
            .unwrap()
            .unwrap();
        assert_eq!(h.method, "GET");
        assert_eq!(h.target, "http://x.org/a");
        assert_eq!(n, 44);
        assert!(parse_request_head(b"GET / HTTP/1.1\r\nHost")
            .unwrap()
            .is_none());
        assert!(parse_request_head(b"\x00\x01garbage\r\n\r\n").is_err());
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert!(matches!(
            parse_request_head(big.as_bytes()),
            Err(HttpError::TooLarge)
        ));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X{i}: 1\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert!(matches!(
            parse_request_head(many.as_bytes()),
            Err(HttpError::TooLarge)
        ));
    }

    #[test]
    fn framing_rules() {
        let h = |v: &[(&str, &str)]| -> Vec<(String, Vec<u8>)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.as_bytes().to_vec()))
                .collect()
        };
        assert_eq!(body_framing(&h(&[]), false).unwrap(), Framing::None);
        assert_eq!(body_framing(&h(&[]), true).unwrap(), Framing::UntilClose);
        assert_eq!(
            body_framing(&h(&[("Content-Length", "5")]), false).unwrap(),
            Framing::Length(5)
        );
        assert_eq!(
            body_framing(&h(&[("transfer-encoding", "chunked")]), false).unwrap(),
            Framing::Chunked
        );
        assert!(body_framing(
            &h(&[("Content-Length", "5"), ("Transfer-Encoding", "chunked")]),
            false
        )
        .is_err());
        assert!(body_framing(
            &h(&[("Content-Length", "5"), ("Content-Length", "5")]),
            false
        )
        .is_err());
        assert!(body_framing(&h(&[("Content-Length", "-1")]), false).is_err());
        assert!(body_framing(&h(&[("Transfer-Encoding", "gzip, chunked")]), false).is_err());
    }

    #[test]
    fn strips_hop_by_hop() {
        let mut h: Vec<(String, Vec<u8>)> = [
            ("Host", "x"),
            ("Connection", "keep-alive, X-Foo"),
            ("X-Foo", "1"),
            ("Proxy-Authorization", "a"),
            ("Expect", "100-continue"),
            ("Accept", "*/*"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.as_bytes().to_vec()))
        .collect();
        assert!(strip_hop_by_hop(&mut h));
        let names: Vec<&str> = h.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["Host", "Accept"]);
    }
}
