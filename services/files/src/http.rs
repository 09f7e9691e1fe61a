//! HTTP/1.1 message framing (RFC 9112) for a server that takes no request bodies: request
//! heads parsed with `httparse`, limits enforced, response heads written into a reused
//! buffer. The wire syntax only: `h1` drives it, and what the fields mean is `resource`'s.

use std::cell::RefCell;
use std::io::Write;
use std::mem::MaybeUninit;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::resource::status_name;

/// The request fields the file server acts on, borrowed from the connection's buffer.
#[derive(Debug)]
pub struct Head<'a> {
    /// The method token.
    pub method: &'a str,
    /// The raw request-target.
    pub target: &'a [u8],
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    /// The connection persists after this exchange.
    pub keep_alive: bool,
    /// `Range`, when present once.
    pub range: Option<&'a [u8]>,
    /// `If-Range`.
    pub if_range: Option<&'a [u8]>,
    /// `If-None-Match`.
    pub if_none_match: Option<&'a [u8]>,
    /// `If-Modified-Since`.
    pub if_modified_since: Option<&'a [u8]>,
    /// Bytes of request body that follow the head (`Content-Length`), to be discarded.
    pub body_len: u64,
}

/// A request that cannot be served, with the status to answer it with. The connection is
/// closed afterwards: its framing can no longer be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reject {
    /// The status code.
    pub status: u16,
    /// A short reason for the body and the log.
    pub why: &'static str,
}

const fn reject(status: u16, why: &'static str) -> Reject {
    Reject { status, why }
}

/// The largest `max_headers` honoured (the parse array lives on the stack).
pub const MAX_HEADERS_CAP: usize = 256;

/// Limits on what a client may send.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest request line (414 beyond).
    pub max_request_line: usize,
    /// Largest request head, request line included (431 beyond).
    pub max_head: usize,
    /// Most header fields (431 beyond).
    pub max_headers: usize,
    /// Largest request body that is read and discarded (413 beyond).
    pub max_discard_body: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_request_line: 8 * 1024, max_head: 16 * 1024, max_headers: 64, max_discard_body: 64 * 1024 }
    }
}

/// Result of looking for a request head at the start of a buffer.
#[derive(Debug)]
pub enum Parsed<'a> {
    /// A complete head of this many bytes.
    Complete(Head<'a>, usize),
    /// More bytes are needed.
    Partial,
    /// The request is refused.
    Rejected(Reject),
}

fn token_list_has(value: &[u8], token: &str) -> bool {
    value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Parses a request head at the start of `buf`, enforcing `limits`.
pub fn parse<'a>(buf: &'a [u8], limits: &Limits) -> Parsed<'a> {
    // Tolerate empty lines before a request (RFC 9112 §2.2).
    let mut skip = 0;
    while skip < buf.len() && (buf[skip] == b'\r' || buf[skip] == b'\n') {
        skip += 1;
    }
    let data = &buf[skip..];
    let line_end = data.iter().position(|&b| b == b'\n');
    match line_end {
        None if data.len() > limits.max_request_line => return Parsed::Rejected(reject(414, "request line too long")),
        Some(i) if i > limits.max_request_line => return Parsed::Rejected(reject(414, "request line too long")),
        _ => {}
    }
    // Left uninitialized: httparse writes the headers it finds and hands back only those (an
    // initialized array would cost a write of the whole 8 KiB for every request).
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS_CAP];
    let mut req = httparse::Request::new(&mut []);
    let n = match req.parse_with_uninit_headers(data, &mut storage[..limits.max_headers.clamp(1, MAX_HEADERS_CAP)]) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if data.len() > limits.max_head {
                Parsed::Rejected(reject(431, "request header fields too large"))
            } else {
                Parsed::Partial
            };
        }
        Err(httparse::Error::Version) => return Parsed::Rejected(reject(505, "HTTP version not supported")),
        Err(httparse::Error::TooManyHeaders) => return Parsed::Rejected(reject(431, "too many header fields")),
        Err(_) => return Parsed::Rejected(reject(400, "malformed request")),
    };
    if n > limits.max_head {
        return Parsed::Rejected(reject(431, "request header fields too large"));
    }
    let (Some(method), Some(path), Some(minor)) = (req.method, req.path, req.version) else {
        return Parsed::Rejected(reject(400, "malformed request"));
    };
    let mut head = Head {
        method,
        target: path.as_bytes(),
        minor,
        keep_alive: minor >= 1,
        range: None,
        if_range: None,
        if_none_match: None,
        if_modified_since: None,
        body_len: 0,
    };
    let mut hosts = 0;
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    for h in req.headers.iter() {
        let name = h.name;
        let v = h.value;
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case("connection") {
            if token_list_has(v, "close") {
                head.keep_alive = false;
            } else if token_list_has(v, "keep-alive") && minor == 0 {
                head.keep_alive = true;
            }
        } else if name.eq_ignore_ascii_case("range") {
            // Two Range fields cannot be combined meaningfully: ignore both.
            head.range = if head.range.is_none() { Some(v) } else { Some(b"") };
        } else if name.eq_ignore_ascii_case("if-range") {
            head.if_range = Some(v);
        } else if name.eq_ignore_ascii_case("if-none-match") {
            head.if_none_match = Some(v);
        } else if name.eq_ignore_ascii_case("if-modified-since") {
            head.if_modified_since = Some(v);
        } else if name.eq_ignore_ascii_case("content-length") {
            let s = std::str::from_utf8(v).unwrap_or("").trim();
            let parsed = if !s.is_empty() && s.len() <= 19 && s.bytes().all(|b| b.is_ascii_digit()) {
                s.parse::<u64>().ok()
            } else {
                None
            };
            match (parsed, content_length) {
                (None, _) => return Parsed::Rejected(reject(400, "bad Content-Length")),
                (Some(a), Some(b)) if a != b => return Parsed::Rejected(reject(400, "conflicting Content-Length")),
                (Some(a), _) => content_length = Some(a),
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = true;
        }
    }
    if minor >= 1 && hosts != 1 {
        return Parsed::Rejected(reject(400, "HTTP/1.1 request needs exactly one Host"));
    }
    if chunked {
        // Both framings at once is a smuggling attempt (RFC 9112 §6.1); a chunked body of
        // unknown length is more than a file server takes.
        if content_length.is_some() {
            return Parsed::Rejected(reject(400, "both Transfer-Encoding and Content-Length"));
        }
        return Parsed::Rejected(reject(413, "request bodies are not accepted"));
    }
    head.body_len = content_length.unwrap_or(0);
    if head.body_len > limits.max_discard_body {
        return Parsed::Rejected(reject(413, "request body too large"));
    }
    Parsed::Complete(head, skip + n)
}

thread_local! {
    /// The formatted `Date` of the current second, per core.
    static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// Appends `Date: <IMF-fixdate>\r\n`, formatting at most once a second per core.
fn write_date(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            *d = (secs, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(b"Date: ");
        out.extend_from_slice(d.1.as_bytes());
        out.extend_from_slice(b"\r\n");
    });
}

/// Bytes reserved for a response head before it is written.
const HEAD_RESERVE: usize = 384;

/// A response head being written into a reused buffer.
pub struct HeadWriter<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> HeadWriter<'a> {
    /// Starts a response with `status`, `Server` and `Date`.
    pub fn new(out: &'a mut Vec<u8>, status: u16) -> Self {
        out.clear();
        // A file's head is about 250 bytes: one allocation when the buffer was given up while
        // the connection idled, rather than a doubling from nothing.
        out.reserve(HEAD_RESERVE);
        out.extend_from_slice(b"HTTP/1.1 ");
        if (100..1000).contains(&status) {
            out.extend_from_slice(&[
                b'0' + (status / 100) as u8,
                b'0' + (status / 10 % 10) as u8,
                b'0' + (status % 10) as u8,
            ]);
        } else {
            let _ = write!(out, "{status}");
        }
        out.push(b' ');
        out.extend_from_slice(status_name(status).as_bytes());
        out.extend_from_slice(b"\r\nServer: corepin\r\n");
        write_date(out);
        Self { out }
    }
    /// Adds a header field.
    pub fn header(&mut self, name: &str, value: impl std::fmt::Display) -> &mut Self {
        self.field(name, crate::resource::FieldValue::Formatted(&value))
    }
    /// Adds a header field of an answer's plan.
    pub fn field(&mut self, name: &str, value: crate::resource::FieldValue<'_>) -> &mut Self {
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(b": ");
        value.write_to(self.out);
        self.out.extend_from_slice(b"\r\n");
        self
    }
    /// Ends the head with `Content-Length` and, when closing, `Connection: close`
    /// (HTTP/1.0 clients that asked to keep the connection get `Connection: keep-alive`).
    /// `None` leaves `Content-Length` out (304 responses).
    pub fn finish(self, content_length: Option<u64>, keep_alive: bool, minor: u8) {
        if let Some(n) = content_length {
            let _ = write!(self.out, "Content-Length: {n}\r\n");
        }
        if !keep_alive {
            self.out.extend_from_slice(b"Connection: close\r\n");
        } else if minor == 0 {
            self.out.extend_from_slice(b"Connection: keep-alive\r\n");
        }
        self.out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Parsed<'_> {
        parse(s.as_bytes(), &Limits::default())
    }

    #[test]
    fn parses_and_rejects() {
        match p("GET /a HTTP/1.1\r\nHost: x\r\nRange: bytes=1-2\r\n\r\nGET") {
            Parsed::Complete(h, n) => {
                assert_eq!((h.method, h.target, h.minor, h.keep_alive), ("GET", &b"/a"[..], 1, true));
                assert_eq!(h.range, Some(&b"bytes=1-2"[..]));
                assert_eq!(n, "GET /a HTTP/1.1\r\nHost: x\r\nRange: bytes=1-2\r\n\r\n".len());
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(p("GET /a HTTP/1.1\r\nHost: x\r\n"), Parsed::Partial));
        let status = |s: &str| match p(s) {
            Parsed::Rejected(r) => r.status,
            other => panic!("{other:?}"),
        };
        assert_eq!(status("GET /a HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status("GET /a HTTP/2.0\r\nHost: x\r\n\r\n"), 505);
        assert_eq!(status("GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"), 400);
        assert_eq!(status("GET /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"), 413);
        assert_eq!(status("GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n"), 413);
        assert_eq!(status(&format!("GET /{} HTTP/1.1\r\n", "a".repeat(9000))), 414);
        assert_eq!(status(&format!("GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n", "a".repeat(17000))), 431);
        let many: String = (0..70).map(|i| format!("X{i}: y\r\n")).collect();
        assert_eq!(status(&format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n")), 431);
        match p("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n") {
            Parsed::Complete(h, _) => assert!(h.keep_alive),
            other => panic!("{other:?}"),
        }
        match p("\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: foo, Close\r\n\r\n") {
            Parsed::Complete(h, _) => assert!(!h.keep_alive),
            other => panic!("{other:?}"),
        }
    }
}
