//! What to answer, independent of the protocol: a request (method, decoded path, conditional
//! and range fields as typed values) becomes a [`Plan`]: a status, typed header values and a
//! [`Body`] source.
//!
//! Owns: the method rule (GET and HEAD; 405 with `Allow`, 501), confinement beneath the root
//! (through [`fsroot`]), directories (301 to the slash, `index.html`, listings), validators
//! (strong ETag, Last-Modified, `If-None-Match`, `If-Modified-Since`, `If-Range`), byte ranges
//! ([`range`]) and their multipart framing, the Content-Type, error texts and the per-core
//! memory cache ([`cache`]): what it holds is decided here, and bodies the transfer reads for it
//! come back through [`Files::remember`].
//!
//! Must not touch: sockets, deadlines, connection state or any wire syntax. Its inputs are
//! typed values, never an HTTP/1.1 parser's types; its output is serialized by a front end
//! (`h1` for HTTP/1.1; HTTP/3 and HTTPS reuse this module and `transfer` unchanged). Deciding is
//! synchronous (opens and `fstat`s, nothing awaited), so a front end can plan while the request
//! still borrows its read buffer.
//!
//! [`fsroot`]: crate::fsroot
//! [`range`]: crate::range
//! [`cache`]: crate::cache

use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use corepin_core::runtime::Metadata;
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};

use crate::fsroot::{self, OpenError};
use crate::open_cache::Known;
use crate::range::{self, ByteRange, RangeAnswer};
use crate::target::SafePath;
use crate::Files;

// ---- input -----------------------------------------------------------------------------

/// The request method as far as a file server cares (RFC 9110 §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// GET.
    Get,
    /// HEAD: the answer to GET without its body.
    Head,
}

impl Method {
    /// The method named by `token`, or why it is refused.
    pub fn from_token(token: &str) -> Result<Method, Refused> {
        match token {
            "GET" => Ok(Method::Get),
            "HEAD" => Ok(Method::Head),
            "POST" | "PUT" | "DELETE" | "PATCH" | "OPTIONS" | "TRACE" | "CONNECT" => Err(Refused::NotAllowed),
            _ => Err(Refused::NotImplemented),
        }
    }
}

/// A method this server does not serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// A standard method that no resource here allows (405 with `Allow`).
    NotAllowed,
    /// A method this server does not know (501).
    NotImplemented,
}

impl Refused {
    /// The answer.
    pub fn plan(self) -> Plan {
        match self {
            Refused::NotAllowed => {
                let mut plan = Plan::error(405);
                plan.headers.allow = Some(ALLOW);
                plan
            }
            Refused::NotImplemented => Plan::error(501),
        }
    }
}

/// The methods allowed on every resource.
const ALLOW: &str = "GET, HEAD";

/// An HTTP-date (RFC 9110 §5.6.7), to the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Date(u64);

impl Date {
    /// Parses a field value; `None` when it is not a date (the field is then ignored).
    pub fn parse(value: &[u8]) -> Option<Date> {
        let s = std::str::from_utf8(value).ok()?;
        httpdate::parse_http_date(s.trim()).ok().map(Date::of)
    }
    /// The date of `t`, truncated to the second.
    pub fn of(t: SystemTime) -> Date {
        Date(t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0))
    }
}

/// An `If-None-Match` value: `*` or a list of entity tags, compared when a validator is known
/// (kept as the field's bytes: a list would allocate for every conditional request).
#[derive(Debug, Clone, Copy)]
pub struct IfNoneMatch<'a>(&'a [u8]);

impl<'a> IfNoneMatch<'a> {
    /// The field value.
    pub fn new(value: &'a [u8]) -> Self {
        Self(value)
    }
    /// Whether `tag` matches, by the weak comparison (RFC 9110 §13.1.2).
    pub fn matches(&self, tag: &ETag) -> bool {
        let Ok(v) = std::str::from_utf8(self.0) else { return false };
        v.split(',').map(str::trim).any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t).as_bytes() == tag.as_bytes())
    }
}

/// A `Range` value (`bytes=...`), resolved against the representation's length once that is
/// known ([`range::resolve`]).
#[derive(Debug, Clone, Copy)]
pub struct RangeSpec<'a>(&'a [u8]);

impl<'a> RangeSpec<'a> {
    /// The field value.
    pub fn new(value: &'a [u8]) -> Self {
        Self(value)
    }
    /// A request that carried several `Range` fields: they cannot be combined, so none applies.
    pub fn ignored() -> Self {
        Self(b"")
    }
    fn resolve(&self, len: u64) -> RangeAnswer {
        range::resolve(self.0, len)
    }
}

/// An `If-Range` value (RFC 9110 §13.1.5).
#[derive(Debug, Clone, Copy)]
pub enum IfRange<'a> {
    /// An entity tag, which must match strongly (a weak one never does).
    Tag(&'a [u8]),
    /// A date, which must equal Last-Modified exactly.
    Date(Date),
    /// Neither: the condition never holds.
    Invalid,
}

impl<'a> IfRange<'a> {
    /// Parses a field value.
    pub fn parse(value: &'a [u8]) -> Self {
        let v = value.trim_ascii();
        if v.starts_with(b"\"") || v.starts_with(b"W/") {
            IfRange::Tag(v)
        } else {
            Date::parse(v).map_or(IfRange::Invalid, IfRange::Date)
        }
    }
    fn holds(&self, tag: &ETag, modified: Date) -> bool {
        match *self {
            IfRange::Tag(t) => t == tag.as_bytes(), // strong comparison
            IfRange::Date(d) => d == modified,
            IfRange::Invalid => false,
        }
    }
}

/// The request's conditional and range fields (absent ones are `None`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Conditions<'a> {
    /// `If-None-Match` (present, even if unreadable, it overrides `If-Modified-Since`).
    pub if_none_match: Option<IfNoneMatch<'a>>,
    /// `If-Modified-Since`, when it is a date.
    pub if_modified_since: Option<Date>,
    /// `Range`.
    pub range: Option<RangeSpec<'a>>,
    /// `If-Range`.
    pub if_range: Option<IfRange<'a>>,
}

// ---- output ----------------------------------------------------------------------------

/// A strong entity tag, `"len-mtime_ns-inode"` in hex, quotes included (visible ASCII).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ETag(Bytes);

impl ETag {
    fn of(meta: &Metadata) -> ETag {
        let nanos = meta.modified.duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        ETag(format!("\"{:x}-{:x}-{:x}\"", meta.len, nanos, meta.ino).into())
    }
    /// The tag as it is sent.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A `Last-Modified` value, rendered (IMF-fixdate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastModified(Bytes);

impl LastModified {
    fn of(t: SystemTime) -> Self {
        Self(httpdate::fmt_http_date(t).into())
    }
}

/// What the answers for one file say that changes only when the file does: its validators
/// and its type, rendered once. The open-file cache keeps it beside the file's entry (and
/// drops it with the entry), so a request for a known file costs no MIME lookup, no date
/// conversion and no hex formatting.
#[derive(Debug)]
pub struct Facts {
    tag: ETag,
    last_modified: LastModified,
    mime: ContentType,
}

impl Facts {
    /// The facts of the file `meta` describes, called `name`.
    fn of(meta: &Metadata, name: &str) -> Self {
        let mime = ContentType::Rendered(ContentType::of(name).to_string().into());
        Self { tag: ETag::of(meta), last_modified: LastModified::of(meta.modified), mime }
    }
}

/// A Content-Type value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentType {
    /// A type from a file name's extension; text types are sent with `charset=utf-8`.
    Guessed(&'static str),
    /// A complete value.
    Exact(&'static str),
    /// `multipart/byteranges` with this boundary.
    Multipart(String),
    /// A complete value rendered once and shared (a file's [`Facts`]).
    Rendered(Bytes),
}

impl ContentType {
    /// The type of a file called `name` (no allocation).
    pub fn of(name: &str) -> Self {
        Self::Guessed(mime_guess::from_path(name).first_raw().unwrap_or("application/octet-stream"))
    }
}

impl fmt::Display for ContentType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContentType::Guessed(t) => {
                f.write_str(t)?;
                if t.starts_with("text/") || *t == "application/javascript" {
                    f.write_str("; charset=utf-8")?;
                }
                Ok(())
            }
            ContentType::Exact(t) => f.write_str(t),
            ContentType::Multipart(boundary) => write!(f, "multipart/byteranges; boundary={boundary}"),
            // Rendered from this type's own text, so always UTF-8 (ASCII).
            ContentType::Rendered(v) => f.write_str(std::str::from_utf8(v).unwrap_or_default()),
        }
    }
}

const TEXT_PLAIN: ContentType = ContentType::Exact("text/plain; charset=utf-8");
const TEXT_HTML: ContentType = ContentType::Exact("text/html; charset=utf-8");

/// A Content-Range value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentRange {
    /// `bytes first-last/len` (206).
    Bytes {
        /// First byte.
        first: u64,
        /// Last byte (inclusive).
        last: u64,
        /// The representation's length.
        len: u64,
    },
    /// `bytes */len` (416).
    Unsatisfied {
        /// The representation's length.
        len: u64,
    },
}

impl fmt::Display for ContentRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContentRange::Bytes { first, last, len } => write!(f, "bytes {first}-{last}/{len}"),
            ContentRange::Unsatisfied { len } => write!(f, "bytes */{len}"),
        }
    }
}

/// The header values of an answer; a front end writes those that are set.
#[derive(Debug, Clone, Default)]
pub struct Headers {
    /// Content-Type.
    pub content_type: Option<ContentType>,
    /// Content-Range.
    pub content_range: Option<ContentRange>,
    /// Location (redirects), percent-encoded.
    pub location: Option<String>,
    /// Allow (405).
    pub allow: Option<&'static str>,
    /// Last-Modified.
    pub last_modified: Option<LastModified>,
    /// ETag.
    pub etag: Option<ETag>,
    /// `Accept-Ranges: bytes`.
    pub accept_ranges: bool,
    /// Content-Length: the body's length, also for HEAD; `None` for 304.
    pub content_length: Option<u64>,
}

impl Headers {
    /// Calls `field` with the name and value of every field that is set, in the order this
    /// server sends them (a 304 names its ETag before Last-Modified). Content-Length is left
    /// out: how a body's length is framed is the front end's business (HTTP/1.1 writes it with
    /// the connection fields, HTTP/3 as a field of its own).
    pub fn for_each_field(&self, status: u16, mut field: impl FnMut(&'static str, FieldValue<'_>)) {
        if let Some(t) = &self.content_type {
            let value = match t {
                ContentType::Rendered(v) => FieldValue::Shared(v),
                ContentType::Exact(v) => FieldValue::Static(v),
                other => FieldValue::Formatted(other),
            };
            field("Content-Type", value);
        }
        if let Some(r) = &self.content_range {
            field("Content-Range", FieldValue::Formatted(r));
        }
        if let Some(l) = &self.location {
            field("Location", FieldValue::Formatted(l));
        }
        if let Some(a) = self.allow {
            field("Allow", FieldValue::Static(a));
        }
        let last_modified = self.last_modified.as_ref().map(|d| FieldValue::Shared(&d.0));
        let etag = self.etag.as_ref().map(|t| FieldValue::Shared(&t.0));
        if status == 304 {
            if let Some(t) = etag {
                field("ETag", t);
            }
            if let Some(d) = last_modified {
                field("Last-Modified", d);
            }
        } else {
            if let Some(d) = last_modified {
                field("Last-Modified", d);
            }
            if let Some(t) = etag {
                field("ETag", t);
            }
        }
        if self.accept_ranges {
            field("Accept-Ranges", FieldValue::Static("bytes"));
        }
    }
}

/// One header value of an answer, in the form it is held: a front end copies or shares the
/// first two as they are, and formats only the third.
#[derive(Clone, Copy)]
pub enum FieldValue<'a> {
    /// Rendered once and shared (a file's validators and type, from its [`Facts`]).
    Shared(&'a Bytes),
    /// A fixed text.
    Static(&'static str),
    /// Rendered for this answer (ranges, redirects, multipart types).
    Formatted(&'a dyn fmt::Display),
}

impl FieldValue<'_> {
    /// Appends the value to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        match self {
            FieldValue::Shared(v) => out.extend_from_slice(v),
            FieldValue::Static(v) => out.extend_from_slice(v.as_bytes()),
            FieldValue::Formatted(v) => {
                use std::io::Write as _;
                // Writing into a Vec cannot fail.
                let _ = write!(out, "{v}");
            }
        }
    }
}

impl fmt::Debug for FieldValue<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut v = Vec::new();
        self.write_to(&mut v);
        f.debug_tuple("FieldValue").field(&String::from_utf8_lossy(&v)).finish()
    }
}

/// One part of a multipart body: its framing, then `len` bytes at `first`.
#[derive(Debug)]
pub struct Part {
    /// The delimiter and the part's header fields.
    pub prefix: Bytes,
    /// First byte.
    pub first: u64,
    /// Number of bytes.
    pub len: u64,
}

/// Which bytes of a source make the body.
#[derive(Debug)]
pub enum Extent {
    /// `len` bytes from `first`: the whole representation, or one range.
    Span {
        /// First byte.
        first: u64,
        /// Number of bytes.
        len: u64,
    },
    /// `multipart/byteranges`: each part in the order asked, then the closing delimiter.
    Multipart {
        /// The parts.
        parts: Vec<Part>,
        /// The closing delimiter.
        close: Bytes,
    },
}

impl Extent {
    /// Bytes of the source the body carries (framing not included).
    pub fn source_bytes(&self) -> u64 {
        match self {
            Extent::Span { len, .. } => *len,
            Extent::Multipart { parts, .. } => parts.iter().map(|p| p.len).sum(),
        }
    }
}

/// Where a body comes from.
#[derive(Debug)]
pub enum Body {
    /// No body (HEAD, 304).
    None,
    /// The short text of an error status.
    Text(Bytes),
    /// A directory listing generated for this request.
    Listing(Bytes),
    /// A file's bytes held by the per-core memory cache.
    Memory {
        /// The whole file.
        data: Bytes,
        /// What of it is sent.
        extent: Extent,
    },
    /// An open file (shared with the core's open-file cache, which may hold it too).
    File {
        /// The file.
        file: Rc<File>,
        /// What of it is sent.
        extent: Extent,
    },
    /// A small file not yet in the memory cache, sent whole: read it, hand it to
    /// [`Files::remember`], send it.
    Fill {
        /// The file.
        file: Rc<File>,
        /// Its metadata when planned (the cache's validator).
        meta: Metadata,
    },
}

/// The answer to one request.
#[derive(Debug)]
pub struct Plan {
    /// The status code.
    pub status: u16,
    /// The header values.
    pub headers: Headers,
    /// The body's source.
    pub body: Body,
}

impl Plan {
    /// An error answer: `status` with a short plain-text body naming it.
    pub fn error(status: u16) -> Plan {
        let text = status_text(status);
        let headers =
            Headers { content_type: Some(TEXT_PLAIN), content_length: Some(text.len() as u64), ..Headers::default() };
        Plan { status, headers, body: Body::Text(text) }
    }

    /// This answer to `method`: for HEAD, the same head without the body.
    pub fn for_method(mut self, method: Method) -> Plan {
        if method == Method::Head {
            self.body = Body::None;
        }
        self
    }
}

// ---- status names ----------------------------------------------------------------------

macro_rules! statuses {
    ($($code:literal $name:literal,)*) => {
        /// The name of a status code (RFC 9110 §15); HTTP/1.1 sends it as the reason phrase.
        pub fn status_name(status: u16) -> &'static str {
            match status {
                $($code => $name,)*
                _ => "Unknown",
            }
        }
        /// The body of an error answer: `"404 Not Found\n"`.
        fn status_text(status: u16) -> Bytes {
            match status {
                $($code => Bytes::from_static(concat!(stringify!($code), " ", $name, "\n").as_bytes()),)*
                _ => Bytes::from(format!("{status} Unknown\n")),
            }
        }
    };
}

statuses! {
    200 "OK",
    204 "No Content",
    206 "Partial Content",
    301 "Moved Permanently",
    304 "Not Modified",
    400 "Bad Request",
    403 "Forbidden",
    404 "Not Found",
    405 "Method Not Allowed",
    408 "Request Timeout",
    413 "Content Too Large",
    414 "URI Too Long",
    416 "Range Not Satisfiable",
    425 "Too Early",
    431 "Request Header Fields Too Large",
    500 "Internal Server Error",
    501 "Not Implemented",
    503 "Service Unavailable",
    505 "HTTP Version Not Supported",
}

// ---- deciding --------------------------------------------------------------------------

/// Characters escaped in hrefs of directory listings and in redirects (a path segment).
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'/')
    .add(b'\\')
    .add(b'\'')
    .add(b'&')
    .add(b';')
    .add(b'^')
    .add(b'|')
    .add(b'[')
    .add(b']');

/// A multipart boundary that differs per response (std's randomly keyed hasher).
fn random_boundary() -> String {
    use std::hash::BuildHasher;
    format!("corepin-{:016x}", std::collections::hash_map::RandomState::new().hash_one(0u8))
}

fn listing_html(display: &str, entries: &[fsroot::DirEntry]) -> String {
    let title = html_escape::encode_text(display);
    let mut s = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Index of {title}</title></head>\n\
         <body><h1>Index of {title}</h1>\n<ul>\n"
    );
    if display != "/" {
        s.push_str("<li><a href=\"../\">../</a></li>\n");
    }
    for e in entries {
        let slash = if e.is_dir { "/" } else { "" };
        let href = utf8_percent_encode(&e.name, SEGMENT).to_string();
        s.push_str(&format!(
            "<li><a href=\"{}{slash}\">{}{slash}</a></li>\n",
            html_escape::encode_double_quoted_attribute(&href),
            html_escape::encode_text(&e.name)
        ));
    }
    s.push_str("</ul></body></html>\n");
    s
}

fn open_error(e: OpenError) -> Plan {
    match e {
        OpenError::NotFound => Plan::error(404),
        OpenError::Forbidden => Plan::error(403),
        OpenError::TooLong => Plan::error(414),
        OpenError::Other(err) => {
            tracing::warn!("open failed: {err}");
            Plan::error(500)
        }
    }
}

impl Files {
    /// Decides the answer to `method` on `path` under `cond`. Synchronous: it opens and stats
    /// beneath the root and consults the memory cache, but sends nothing.
    pub fn plan(&self, method: Method, path: &SafePath, cond: &Conditions<'_>) -> Plan {
        self.plan_get(path, cond).for_method(method)
    }

    /// Keeps the body of the small file `meta` describes (read whole for a [`Body::Fill`]) in
    /// this core's memory cache.
    pub fn remember(&self, meta: &Metadata, data: Bytes) {
        self.caches.cache.borrow_mut().insert(meta, data);
    }

    /// The open file `rel` names beneath the root, its metadata and, when known, its facts:
    /// from this core's open-file cache when it holds the path (no system call), else opened,
    /// looked at and remembered.
    fn open_known(&self, rel: &str) -> Result<Known<Rc<Facts>>, OpenError> {
        let mut cache = self.caches.open_files.borrow_mut();
        let now = cache.enabled().then(Instant::now);
        if let Some(now) = now {
            let (before, reads_before) = (cache.invalidated(), cache.queue_reads());
            let (hit, how) = cache.lookup(rel, now, self.counted);
            let counters = self.counters();
            counters.open_lookup(how);
            if cache.invalidated() > before {
                counters.open_invalidated(cache.invalidated() - before);
            }
            if cache.queue_reads() > reads_before {
                counters.open_queue_reads(cache.queue_reads() - reads_before);
            }
            // Bodies of files found changed go too: an in-place rewrite can keep size and mtime.
            if let Some(changed) = cache.take_changed() {
                let mut bodies = self.caches.cache.borrow_mut();
                changed.for_each(|(dev, ino)| bodies.forget(dev, ino));
            }
            if let Some(known) = hit {
                return Ok(known);
            }
        }
        let file = Rc::new(self.root.open_file(rel)?);
        let meta = Metadata::from_fd(file.as_raw_fd()).map_err(OpenError::Other)?;
        Ok(match now {
            Some(now) => {
                let meta = cache.insert(rel, &file, meta, now);
                (file, meta, None)
            }
            None => (file, meta, None),
        })
    }

    /// The facts of the regular file `rel` (called `name`): `known` when the open-file cache
    /// had them, else rendered and attached to its entry there.
    fn facts(&self, rel: &str, name: &str, meta: &Metadata, known: Option<Rc<Facts>>) -> Rc<Facts> {
        known.unwrap_or_else(|| {
            let facts = Rc::new(Facts::of(meta, name));
            self.caches.open_files.borrow_mut().annotate(rel, meta, Rc::clone(&facts));
            facts
        })
    }

    fn plan_get(&self, path: &SafePath, cond: &Conditions<'_>) -> Plan {
        let rel = path.relative();
        let (file, meta, facts) = match self.open_known(rel) {
            Ok(known) => known,
            Err(e) => return open_error(e),
        };
        if meta.is_dir {
            if !path.trailing_slash && !path.is_root() {
                let loc: String =
                    path.segments().map(|s| format!("/{}", utf8_percent_encode(s, SEGMENT))).collect::<String>() + "/";
                let mut plan = Plan::error(301);
                plan.headers.location = Some(loc);
                return plan;
            }
            let index = if path.is_root() { "index.html".to_string() } else { format!("{rel}/index.html") };
            return match self.open_known(&index) {
                Ok((f, m, facts)) if m.is_file => {
                    let facts = self.facts(&index, "index.html", &m, facts);
                    self.plan_file(cond, f, m, &facts)
                }
                Ok(_) => Plan::error(403),
                Err(OpenError::NotFound) if self.cfg.list_dirs => match fsroot::list(&file) {
                    Ok(entries) => {
                        let html = Bytes::from(listing_html(&path.display(), &entries));
                        let headers = Headers {
                            content_type: Some(TEXT_HTML),
                            content_length: Some(html.len() as u64),
                            ..Headers::default()
                        };
                        Plan { status: 200, headers, body: Body::Listing(html) }
                    }
                    Err(_) => Plan::error(500),
                },
                Err(OpenError::NotFound) => Plan::error(403),
                Err(e) => open_error(e),
            };
        }
        if !meta.is_file {
            return Plan::error(403);
        }
        let name = path.segments().next_back().unwrap_or("");
        let facts = self.facts(rel, name, &meta, facts);
        self.plan_file(cond, file, meta, &facts)
    }

    fn plan_file(&self, cond: &Conditions<'_>, file: Rc<File>, meta: Metadata, facts: &Facts) -> Plan {
        let tag = facts.tag.clone();
        let modified = Date::of(meta.modified);
        // Conditional GET: If-None-Match wins over If-Modified-Since (RFC 9110 §13.2.2).
        let not_modified = match (&cond.if_none_match, cond.if_modified_since) {
            (Some(inm), _) => inm.matches(&tag),
            (None, Some(since)) => modified <= since,
            (None, None) => false,
        };
        if not_modified {
            let headers =
                Headers { etag: Some(tag), last_modified: Some(facts.last_modified.clone()), ..Headers::default() };
            return Plan { status: 304, headers, body: Body::None };
        }
        let len = meta.len;
        let answer = match cond.range {
            Some(r) if cond.if_range.is_none_or(|ir| ir.holds(&tag, modified)) => r.resolve(len),
            _ => RangeAnswer::Whole,
        };
        let memory_max = self.cfg.memory_max;
        let cached = (len <= memory_max).then(|| self.caches.cache.borrow().get(&meta)).flatten();
        let mime = facts.mime.clone();
        let (status, content_type, content_range, content_length, extent) = match answer {
            RangeAnswer::Whole => {
                if cached.is_none() && len > 0 && len <= memory_max {
                    let headers = Headers {
                        content_type: Some(mime),
                        last_modified: Some(facts.last_modified.clone()),
                        etag: Some(tag),
                        accept_ranges: true,
                        content_length: Some(len),
                        ..Headers::default()
                    };
                    return Plan { status: 200, headers, body: Body::Fill { file, meta } };
                }
                (200, mime, None, len, Extent::Span { first: 0, len })
            }
            RangeAnswer::One(ByteRange { first, last }) => {
                let n = last - first + 1;
                (206, mime, Some(ContentRange::Bytes { first, last, len }), n, Extent::Span { first, len: n })
            }
            RangeAnswer::Many(ranges) => {
                let boundary = random_boundary();
                let mut parts = Vec::with_capacity(ranges.len());
                let mut total = 0u64;
                for r in &ranges {
                    let prefix = Bytes::from(format!(
                        "\r\n--{boundary}\r\nContent-Type: {mime}\r\nContent-Range: bytes {}-{}/{len}\r\n\r\n",
                        r.first, r.last
                    ));
                    total += prefix.len() as u64 + r.len();
                    parts.push(Part { prefix, first: r.first, len: r.len() });
                }
                let close = Bytes::from(format!("\r\n--{boundary}--\r\n"));
                total += close.len() as u64;
                (206, ContentType::Multipart(boundary), None, total, Extent::Multipart { parts, close })
            }
            RangeAnswer::Unsatisfiable => {
                let mut plan = Plan::error(416);
                plan.headers.content_range = Some(ContentRange::Unsatisfied { len });
                return plan;
            }
        };
        let headers = Headers {
            content_type: Some(content_type),
            content_range,
            last_modified: Some(facts.last_modified.clone()),
            etag: Some(tag),
            accept_ranges: true,
            content_length: Some(content_length),
            ..Headers::default()
        };
        let body = match cached {
            Some(data) => Body::Memory { data, extent },
            None => Body::File { file, extent },
        };
        Plan { status, headers, body }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(s: &str) -> ETag {
        ETag(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn validators_compare_as_the_rfc_says() {
        let t = tag("\"a-b-c\"");
        assert!(IfNoneMatch::new(b"\"x\", W/\"a-b-c\"").matches(&t), "weak comparison");
        assert!(IfNoneMatch::new(b"*").matches(&t));
        assert!(!IfNoneMatch::new(b"\"x\"").matches(&t));
        assert!(!IfNoneMatch::new(b"\xff").matches(&t));
        let date = Date::parse(b"Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(Date::parse(b" Sun, 06 Nov 1994 08:49:37 GMT "), Some(date));
        assert_eq!(Date::parse(b"yesterday"), None);
        assert!(IfRange::parse(b" \"a-b-c\" ").holds(&t, date), "strong match");
        assert!(!IfRange::parse(b"W/\"a-b-c\"").holds(&t, date), "a weak tag never matches");
        assert!(IfRange::parse(b"Sun, 06 Nov 1994 08:49:37 GMT").holds(&t, date));
        assert!(!IfRange::parse(b"Sun, 06 Nov 1994 08:49:38 GMT").holds(&t, date));
        assert!(!IfRange::parse(b"soon").holds(&t, date));
    }

    #[test]
    fn a_files_fields_are_shared_not_formatted() {
        let meta = Metadata {
            len: 5,
            modified: UNIX_EPOCH + std::time::Duration::from_secs(784_111_777),
            is_file: true,
            is_dir: false,
            ino: 42,
            dev: 1,
        };
        let facts = Facts::of(&meta, "page.html");
        let headers = Headers {
            content_type: Some(facts.mime.clone()),
            content_range: Some(ContentRange::Bytes { first: 0, last: 1, len: 5 }),
            last_modified: Some(facts.last_modified.clone()),
            etag: Some(facts.tag.clone()),
            accept_ranges: true,
            ..Headers::default()
        };
        let mut seen = Vec::new();
        headers.for_each_field(206, |name, value| {
            let kind = match value {
                FieldValue::Shared(_) => "shared",
                FieldValue::Static(_) => "static",
                FieldValue::Formatted(_) => "formatted",
            };
            let mut text = Vec::new();
            value.write_to(&mut text);
            seen.push((name, kind, String::from_utf8(text).unwrap()));
        });
        let expected = [
            ("Content-Type", "shared", "text/html; charset=utf-8"),
            ("Content-Range", "formatted", "bytes 0-1/5"),
            ("Last-Modified", "shared", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ("ETag", "shared", "\"5-ae1b981bc490a00-2a\""),
            ("Accept-Ranges", "static", "bytes"),
        ];
        let seen: Vec<(&str, &str, &str)> = seen.iter().map(|(n, k, v)| (*n, *k, v.as_str())).collect();
        assert_eq!(seen, expected);
        // A 304 names the ETag first.
        let mut order = Vec::new();
        headers.for_each_field(304, |name, _| order.push(name));
        assert_eq!(order[2..4], ["ETag", "Last-Modified"]);
    }

    #[test]
    fn methods_and_error_texts() {
        assert_eq!(Method::from_token("GET").unwrap(), Method::Get);
        assert_eq!(Method::from_token("HEAD").unwrap(), Method::Head);
        let refused = Method::from_token("POST").unwrap_err().plan();
        assert_eq!((refused.status, refused.headers.allow), (405, Some("GET, HEAD")));
        assert_eq!(Method::from_token("BREW").unwrap_err().plan().status, 501);
        let plan = Plan::error(404);
        assert!(matches!(&plan.body, Body::Text(t) if &t[..] == b"404 Not Found\n"));
        assert_eq!(plan.headers.content_length, Some(14));
        assert_eq!(plan.headers.content_type.unwrap().to_string(), "text/plain; charset=utf-8");
        assert_eq!(ContentType::of("a.css").to_string(), "text/css; charset=utf-8");
        assert_eq!(ContentType::of("a.bin").to_string(), "application/octet-stream");
        assert_eq!(ContentRange::Unsatisfied { len: 9 }.to_string(), "bytes */9");
    }
}
