//! corepin's static file server: HTTP/1.1 (RFC 9110 / 9112) GET and HEAD with keep-alive,
//! pipelining, validators, conditional requests and byte ranges, written once against
//! corepin's traits; no backend is named here.
//!
//! Bodies take one of three paths, chosen by size (docs/zero-copy.md has the measurements):
//! small files come from a per-core memory cache and leave in one gather write together with
//! the response head; larger files go from the page cache to the socket with
//! [`send_file`](corepin_core::runtime::TcpStream::send_file) (`sendfile(2)`); where a file
//! system cannot do that, read + write is the named fallback. The path used is counted.
//!
//! Safety: request paths are decoded once and refused when they could escape
//! ([`target`]); files are opened confined beneath the root by the kernel ([`fsroot`]);
//! heads are bounded ([`http::Limits`]); and every wait on a client has a deadline: the head
//! must arrive within `header_timeout`, an idle keep-alive connection closes after
//! `idle_timeout`, and every write must progress within `send_timeout`, so a client that
//! trickles or stops reading is closed and its core moves on.

pub mod cache;
pub mod fsroot;
pub mod http;
pub mod metrics;
pub mod range;
pub mod target;

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use corepin_core::pagecache::{self, Residency};
use corepin_core::runtime::{File as _, Metadata};
use corepin_core::task::{read_timeout_or, with_deadline};
use corepin_core::{
    AsyncWriteRent, AsyncWriteRentExt, BufResult, Connection, IoBuf, Runtime, Service, ServiceFactory, Worker,
};
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};

use crate::cache::Cache;
use crate::fsroot::{OpenError, Root};
use crate::http::{Head, HeadWriter, Limits, Parsed};
use crate::metrics::{CoreFileCounters, FileMetrics, TransferPath};
use crate::range::{ByteRange, RangeAnswer};

/// How bodies larger than `memory_max` are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LargeBodies {
    /// `sendfile(2)` (falls back to read + write per transfer where the file system refuses).
    Sendfile,
    /// Always read into a buffer and write (the fallback, selectable for measurement).
    ReadWrite,
}

/// File server settings.
#[derive(Debug, Clone)]
pub struct FilesConfig {
    /// The directory served.
    pub root: PathBuf,
    /// Answer directory requests without an index.html with a listing (otherwise 403).
    pub list_dirs: bool,
    /// Follow symlinks that lead outside the root (refused by default).
    pub follow_symlinks: bool,
    /// Request size limits.
    pub limits: Limits,
    /// Time from the first byte of a request to the end of its head.
    pub header_timeout: Duration,
    /// Time an idle keep-alive connection is kept.
    pub idle_timeout: Duration,
    /// Time any single write to a client may take to make progress.
    pub send_timeout: Duration,
    /// Files up to this size are served from the per-core memory cache (0: never).
    pub memory_max: u64,
    /// Bytes of small-file bodies each core may cache.
    pub cache_bytes: u64,
    /// How larger bodies are sent.
    pub large_bodies: LargeBodies,
    /// Buffer size of the read + write path.
    pub read_write_chunk: usize,
    /// Log every request through tracing (target `corepin::access`).
    pub access_log: bool,
}

impl FilesConfig {
    /// Defaults for serving `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            list_dirs: false,
            follow_symlinks: false,
            limits: Limits::default(),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(30),
            memory_max: DEFAULT_MEMORY_MAX,
            cache_bytes: 64 * 1024 * 1024,
            large_bodies: LargeBodies::Sendfile,
            read_write_chunk: 128 * 1024,
            access_log: false,
        }
    }
}

/// Files up to this size are served from memory by default (docs/zero-copy.md).
pub const DEFAULT_MEMORY_MAX: u64 = 32 * 1024;

/// Builds the per-core file service.
pub struct FilesFactory {
    cfg: Arc<FilesConfig>,
    root: Arc<Root>,
    metrics: Arc<FileMetrics>,
}

impl FilesFactory {
    /// Opens the root (failing clearly if it is missing or not a directory) for `cores` workers.
    pub fn new(cfg: FilesConfig, cores: usize) -> io::Result<Self> {
        let root = Root::open(&cfg.root, cfg.follow_symlinks)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot serve {}: {e}", cfg.root.display())))?;
        Ok(Self { cfg: Arc::new(cfg), root: Arc::new(root), metrics: FileMetrics::new(cores.max(1)) })
    }
    /// The counters, for the metrics endpoint.
    pub fn metrics(&self) -> &Arc<FileMetrics> {
        &self.metrics
    }
    /// The root being served.
    pub fn root(&self) -> &Root {
        &self.root
    }
}

impl ServiceFactory for FilesFactory {
    type Service<R: Runtime> = Files;
    fn new_service<R: Runtime>(&self, worker: &Worker) -> Files {
        Files {
            cfg: Arc::clone(&self.cfg),
            root: Arc::clone(&self.root),
            metrics: Arc::clone(&self.metrics),
            core: worker.info().index,
            cache: RefCell::new(Cache::new(self.cfg.cache_bytes)),
        }
    }
}

/// The file service of one core.
pub struct Files {
    cfg: Arc<FilesConfig>,
    root: Arc<Root>,
    metrics: Arc<FileMetrics>,
    core: usize,
    cache: RefCell<Cache>,
}

/// A buffer that is either owned by the connection (heads) or shared (cached bodies).
enum Chunk {
    Owned(Vec<u8>),
    Shared(Bytes),
}

// SAFETY: both variants keep their bytes on the heap (or in static memory for static
// `Bytes`), so the pointer stays valid and unchanged when the `Chunk` moves, and the bytes are
// never mutated while it exists.
unsafe impl IoBuf for Chunk {
    fn stable_ptr(&self) -> *const u8 {
        match self {
            Chunk::Owned(v) => v.as_ptr(),
            Chunk::Shared(b) => b.as_ptr(),
        }
    }
    fn bytes_init(&self) -> usize {
        match self {
            Chunk::Owned(v) => v.len(),
            Chunk::Shared(b) => b.len(),
        }
    }
    fn bytes_total(&self) -> usize {
        self.bytes_init()
    }
}

/// Where body bytes come from.
enum Source {
    Memory(Bytes),
    File(File),
}

/// One part of a body: optional framing (multipart headers) then `len` bytes at `first`.
struct Part {
    prefix: Option<Bytes>,
    first: u64,
    len: u64,
}

enum Body {
    None,
    Parts {
        source: Source,
        parts: Vec<Part>,
        suffix: Option<Bytes>,
    },
    /// A small file not yet cached: read it whole, cache it, send it.
    Fill {
        file: File,
        meta: Metadata,
    },
}

/// The answer to one request, with its head already written into the head buffer.
struct Plan {
    status: u16,
    keep_alive: bool,
    body: Body,
}

/// Characters escaped in hrefs of directory listings (a path segment).
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

fn etag(meta: &Metadata) -> String {
    let nanos = meta.modified.duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("\"{:x}-{:x}-{:x}\"", meta.len, nanos, meta.ino)
}

fn mtime_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// `If-None-Match` with weak comparison (RFC 9110 §13.1.2).
fn none_match(value: &[u8], tag: &str) -> bool {
    let Ok(v) = std::str::from_utf8(value) else { return false };
    v.split(',').map(str::trim).any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == tag)
}

fn parse_date(value: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(value).ok()?;
    httpdate::parse_http_date(s.trim()).ok().map(mtime_secs)
}

/// Whether the Range header applies given `If-Range` (RFC 9110 §13.1.5).
fn if_range_holds(value: &[u8], tag: &str, meta: &Metadata) -> bool {
    let v = value.trim_ascii();
    if v.starts_with(b"\"") || v.starts_with(b"W/") {
        v == tag.as_bytes() // strong comparison; a weak tag never matches
    } else {
        parse_date(v) == Some(mtime_secs(meta.modified))
    }
}

/// A Content-Type from the file name's extension, with a charset for text (no allocation).
struct ContentType(&'static str);

impl ContentType {
    fn of(name: &str) -> Self {
        Self(mime_guess::from_path(name).first_raw().unwrap_or("application/octet-stream"))
    }
}

impl std::fmt::Display for ContentType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)?;
        if self.0.starts_with("text/") || self.0 == "application/javascript" {
            f.write_str("; charset=utf-8")?;
        }
        Ok(())
    }
}

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

fn io_kind_is_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP))
}

/// Why a connection ended early.
#[derive(Debug)]
enum End {
    /// The client closed or reset the connection, or the server is draining.
    Closed,
    /// A deadline passed.
    Timeout,
    /// The file ended before the promised length (it changed while being served).
    Truncated,
    /// Another I/O error.
    Io(io::Error),
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::TimedOut => End::Timeout,
            io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
            | io::ErrorKind::UnexpectedEof => End::Closed,
            _ => End::Io(e),
        }
    }
}

/// One connection's state.
struct Conn<'s, R: Runtime> {
    svc: &'s Files,
    c: Connection<R>,
    counters: &'s CoreFileCounters,
    /// Bytes received and not yet consumed start at `start`.
    inbuf: Vec<u8>,
    start: usize,
    /// The response head being built; moves into writes and comes back.
    head: Vec<u8>,
    /// Chunks queued for the next gather write; the list's allocation is reused.
    out: Vec<Chunk>,
    /// The read + write buffer, allocated on first use.
    rw_buf: Option<Vec<u8>>,
    /// Bytes of the current response sent so far.
    sent: u64,
}

impl<R: Runtime> Service<Connection<R>> for Files {
    type Response = ();
    type Error = io::Error;

    async fn call(&self, conn: Connection<R>) -> io::Result<()> {
        let mut c = Conn {
            svc: self,
            counters: self.metrics.core(self.core.min(self.metrics.len() - 1)),
            c: conn,
            inbuf: Vec::with_capacity(4096),
            start: 0,
            head: Vec::with_capacity(512),
            out: Vec::with_capacity(4),
            rw_buf: None,
            sent: 0,
        };
        match c.serve().await {
            Ok(()) | Err(End::Closed) | Err(End::Truncated) => Ok(()),
            Err(End::Timeout) => {
                c.counters.timeout();
                Ok(())
            }
            Err(End::Io(e)) => Err(e),
        }
    }
}

impl<R: Runtime> Conn<'_, R> {
    fn cfg(&self) -> &FilesConfig {
        &self.svc.cfg
    }

    /// Reads more request bytes. `deadline` is the header deadline when a head is under way,
    /// `None` when waiting idle for the next request.
    async fn fill(&mut self, head_deadline: Option<Instant>) -> Result<(), End> {
        if self.start > 0 {
            self.inbuf.drain(..self.start);
            self.start = 0;
        }
        if self.inbuf.capacity() - self.inbuf.len() < 1024 {
            self.inbuf.reserve(4096);
        }
        let dur = match head_deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => self.cfg().idle_timeout,
        };
        let len = self.inbuf.len();
        let cap = self.inbuf.capacity();
        let buf = std::mem::take(&mut self.inbuf);
        let worker = self.c.worker.clone();
        // Idle connections also close as soon as the server starts draining.
        let stop = async move {
            if head_deadline.is_none() {
                worker.draining().await
            } else {
                std::future::pending().await
            }
        };
        let BufResult(res, slice) =
            read_timeout_or::<R, _, _, _>(&mut self.c.stream, buf.slice(len..cap), dur, stop).await;
        self.inbuf = slice.into_inner();
        match res {
            Ok(0) => Err(End::Closed),
            Ok(_) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn serve(&mut self) -> Result<(), End> {
        let mut head_deadline: Option<Instant> = None;
        let mut discard: u64 = 0;
        loop {
            if discard > 0 {
                let avail = (self.inbuf.len() - self.start) as u64;
                let n = avail.min(discard);
                self.start += n as usize;
                discard -= n;
                if discard > 0 {
                    let d = *head_deadline.get_or_insert_with(|| Instant::now() + self.cfg().header_timeout);
                    self.fill(Some(d)).await?;
                    continue;
                }
            }
            if self.start == self.inbuf.len() {
                self.inbuf.clear();
                self.start = 0;
                head_deadline = None;
                if self.c.worker.is_draining() {
                    return Ok(());
                }
                self.fill(None).await?;
                continue;
            }
            let started = Instant::now();
            let limits = self.cfg().limits;
            let inbuf = std::mem::take(&mut self.inbuf);
            let outcome = match http::parse(&inbuf[self.start..], &limits) {
                Parsed::Complete(head, n) => {
                    let plan = self.plan(&head);
                    let log = self.cfg().access_log.then(|| {
                        (head.method.to_string(), String::from_utf8_lossy(head.target).into_owned(), head.minor)
                    });
                    Ok((plan, n, head.body_len, log))
                }
                Parsed::Partial => Err(None),
                Parsed::Rejected(r) => Err(Some(r)),
            };
            self.inbuf = inbuf;
            match outcome {
                Ok((plan, n, body_len, log)) => {
                    self.start += n;
                    discard = body_len;
                    head_deadline = None;
                    let status = plan.status;
                    let keep_alive = plan.keep_alive && !self.c.worker.is_draining();
                    let result = self.respond(plan).await;
                    self.counters.response(status);
                    corepin_core::worker::CoreCounters::add(&self.counters.bytes_sent, self.sent);
                    if let Some((method, target, minor)) = log {
                        tracing::info!(
                            target: "corepin::access",
                            "{} \"{} {} HTTP/1.{}\" {} {} {}us",
                            self.c.peer,
                            method.escape_debug(),
                            target.escape_debug(),
                            minor,
                            status,
                            self.sent,
                            started.elapsed().as_micros()
                        );
                    }
                    result?;
                    if !keep_alive {
                        return Ok(());
                    }
                }
                Err(None) => {
                    let d = *head_deadline.get_or_insert_with(|| Instant::now() + self.cfg().header_timeout);
                    match self.fill(Some(d)).await {
                        Err(End::Timeout) => {
                            // The head did not arrive in time: say so (best effort), then close.
                            let plan = self.error(408, false, 1, None);
                            let _ = self.respond(plan).await;
                            self.counters.response(408);
                            return Err(End::Timeout);
                        }
                        other => other?,
                    }
                }
                Err(Some(reject)) => {
                    tracing::debug!(peer = %self.c.peer, "refused request: {}", reject.why);
                    let plan = self.error(reject.status, false, 1, None);
                    self.respond(plan).await?;
                    self.counters.response(reject.status);
                    return Ok(());
                }
            }
        }
    }

    /// A plain-text error response.
    fn error(&mut self, status: u16, keep_alive: bool, minor: u8, extra: Option<(&str, String)>) -> Plan {
        let body = Bytes::from(format!("{status} {}\n", http::reason(status)));
        let mut w = HeadWriter::new(&mut self.head, status);
        w.header("Content-Type", "text/plain; charset=utf-8");
        if let Some((k, v)) = extra {
            w.header(k, v);
        }
        let len = body.len() as u64;
        w.finish(Some(len), keep_alive, minor);
        Plan {
            status,
            keep_alive,
            body: Body::Parts {
                source: Source::Memory(body),
                parts: vec![Part { prefix: None, first: 0, len }],
                suffix: None,
            },
        }
    }

    /// Decides the answer to `head` (synchronous: opens and stats, but sends nothing).
    fn plan(&mut self, head: &Head<'_>) -> Plan {
        let (ka, minor) = (head.keep_alive, head.minor);
        let is_head = match head.method {
            "GET" => false,
            "HEAD" => true,
            "POST" | "PUT" | "DELETE" | "PATCH" | "OPTIONS" | "TRACE" | "CONNECT" => {
                return self.error(405, ka, minor, Some(("Allow", "GET, HEAD".into())));
            }
            _ => return self.error(501, ka, minor, None),
        };
        let mut plan = self.plan_get(head);
        if is_head {
            plan.body = Body::None;
        }
        plan
    }

    fn plan_get(&mut self, head: &Head<'_>) -> Plan {
        let (ka, minor) = (head.keep_alive, head.minor);
        let path = match target::parse_target(head.target) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(peer = %self.c.peer, "refused target: {e}");
                return self.error(400, ka, minor, None);
            }
        };
        let rel = path.relative();
        let file = match self.svc.root.open_file(&rel) {
            Ok(f) => f,
            Err(e) => return self.open_error(e, ka, minor),
        };
        let meta = match Metadata::from_fd(std::os::fd::AsRawFd::as_raw_fd(&file)) {
            Ok(m) => m,
            Err(_) => return self.error(500, ka, minor, None),
        };
        if meta.is_dir {
            if !path.trailing_slash && !path.segments.is_empty() {
                let loc: String =
                    path.segments.iter().map(|s| format!("/{}", utf8_percent_encode(s, SEGMENT))).collect::<String>()
                        + "/";
                return self.error(301, ka, minor, Some(("Location", loc)));
            }
            let index = if rel == "." { "index.html".to_string() } else { format!("{rel}/index.html") };
            return match self.svc.root.open_file(&index) {
                Ok(f) => match Metadata::from_fd(std::os::fd::AsRawFd::as_raw_fd(&f)) {
                    Ok(m) if m.is_file => self.plan_file(head, f, m, "index.html"),
                    _ => self.error(403, ka, minor, None),
                },
                Err(OpenError::NotFound) if self.cfg().list_dirs => match fsroot::list(&file) {
                    Ok(entries) => {
                        let html = Bytes::from(listing_html(&path.display(), &entries));
                        let len = html.len() as u64;
                        let mut w = HeadWriter::new(&mut self.head, 200);
                        w.header("Content-Type", "text/html; charset=utf-8");
                        w.finish(Some(len), ka, minor);
                        Plan {
                            status: 200,
                            keep_alive: ka,
                            body: Body::Parts {
                                source: Source::Memory(html),
                                parts: vec![Part { prefix: None, first: 0, len }],
                                suffix: None,
                            },
                        }
                    }
                    Err(_) => self.error(500, ka, minor, None),
                },
                Err(OpenError::NotFound) => self.error(403, ka, minor, None),
                Err(e) => self.open_error(e, ka, minor),
            };
        }
        if !meta.is_file {
            return self.error(403, ka, minor, None);
        }
        let name = path.segments.last().cloned().unwrap_or_default();
        self.plan_file(head, file, meta, &name)
    }

    fn open_error(&mut self, e: OpenError, ka: bool, minor: u8) -> Plan {
        match e {
            OpenError::NotFound => self.error(404, ka, minor, None),
            OpenError::Forbidden => self.error(403, ka, minor, None),
            OpenError::TooLong => self.error(414, false, minor, None),
            OpenError::Other(err) => {
                tracing::warn!("open failed: {err}");
                self.error(500, ka, minor, None)
            }
        }
    }

    fn plan_file(&mut self, head: &Head<'_>, file: File, meta: Metadata, name: &str) -> Plan {
        let (ka, minor) = (head.keep_alive, head.minor);
        let tag = etag(&meta);
        let last_modified = httpdate::fmt_http_date(meta.modified);
        // Conditional GET: If-None-Match wins over If-Modified-Since (RFC 9110 §13.2.2).
        let not_modified = match (head.if_none_match, head.if_modified_since) {
            (Some(inm), _) => none_match(inm, &tag),
            (None, Some(ims)) => parse_date(ims).is_some_and(|since| mtime_secs(meta.modified) <= since),
            (None, None) => false,
        };
        if not_modified {
            let mut w = HeadWriter::new(&mut self.head, 304);
            w.header("ETag", &tag).header("Last-Modified", &last_modified);
            w.finish(None, ka, minor);
            return Plan { status: 304, keep_alive: ka, body: Body::None };
        }
        let len = meta.len;
        let answer = match head.range {
            Some(r) if head.if_range.is_none_or(|ir| if_range_holds(ir, &tag, &meta)) => range::resolve(r, len),
            _ => RangeAnswer::Whole,
        };
        let mime = ContentType::of(name);
        let cached = (len <= self.cfg().memory_max).then(|| self.svc.cache.borrow().get(&meta)).flatten();
        let source = |file: File| match cached.clone() {
            Some(b) => Source::Memory(b),
            None => Source::File(file),
        };
        let begin = |w: &mut HeadWriter<'_>| {
            w.header("Last-Modified", &last_modified).header("ETag", &tag).header("Accept-Ranges", "bytes");
        };
        match answer {
            RangeAnswer::Whole => {
                let mut w = HeadWriter::new(&mut self.head, 200);
                w.header("Content-Type", &mime);
                begin(&mut w);
                w.finish(Some(len), ka, minor);
                let body = if cached.is_none() && len > 0 && len <= self.cfg().memory_max {
                    Body::Fill { file, meta }
                } else {
                    Body::Parts {
                        source: source(file),
                        parts: vec![Part { prefix: None, first: 0, len }],
                        suffix: None,
                    }
                };
                Plan { status: 200, keep_alive: ka, body }
            }
            RangeAnswer::One(ByteRange { first, last }) => {
                let mut w = HeadWriter::new(&mut self.head, 206);
                w.header("Content-Type", &mime).header("Content-Range", format!("bytes {first}-{last}/{len}"));
                begin(&mut w);
                let n = last - first + 1;
                w.finish(Some(n), ka, minor);
                Plan {
                    status: 206,
                    keep_alive: ka,
                    body: Body::Parts {
                        source: source(file),
                        parts: vec![Part { prefix: None, first, len: n }],
                        suffix: None,
                    },
                }
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
                    parts.push(Part { prefix: Some(prefix), first: r.first, len: r.len() });
                }
                let suffix = Bytes::from(format!("\r\n--{boundary}--\r\n"));
                total += suffix.len() as u64;
                let mut w = HeadWriter::new(&mut self.head, 206);
                w.header("Content-Type", format!("multipart/byteranges; boundary={boundary}"));
                begin(&mut w);
                w.finish(Some(total), ka, minor);
                Plan {
                    status: 206,
                    keep_alive: ka,
                    body: Body::Parts { source: source(file), parts, suffix: Some(suffix) },
                }
            }
            RangeAnswer::Unsatisfiable => self.error(416, ka, minor, Some(("Content-Range", format!("bytes */{len}")))),
        }
    }

    /// Writes every chunk, each write bounded by the send timeout.
    async fn write_chunks(&mut self, chunks: Vec<Chunk>) -> Result<Vec<Chunk>, End> {
        let fd = self.c.stream.as_raw_fd();
        let timeout = self.cfg().send_timeout;
        let total: usize = chunks.iter().map(IoBuf::bytes_init).sum();
        let (BufResult(res, mut chunks), timed_out) =
            with_deadline::<R, _>(fd, timeout, self.c.stream.writev(chunks)).await;
        if timed_out {
            return Err(End::Timeout);
        }
        let mut done = res?;
        self.sent += done as u64;
        if done < total {
            // A short gather write: finish chunk by chunk.
            let mut rest = Vec::with_capacity(chunks.len());
            for ch in chunks.drain(..) {
                let n = ch.bytes_init();
                if done >= n {
                    done -= n;
                    rest.push(ch);
                    continue;
                }
                let (BufResult(res, slice), timed_out) =
                    with_deadline::<R, _>(fd, timeout, self.c.stream.write_all(ch.slice(done..n))).await;
                if timed_out {
                    return Err(End::Timeout);
                }
                self.sent += res? as u64;
                done = 0;
                rest.push(slice.into_inner());
            }
            chunks = rest;
        }
        Ok(chunks)
    }

    /// Queues the response head (moved out of its buffer until the write gives it back).
    fn queue_head(&mut self) {
        let head = std::mem::take(&mut self.head);
        self.out.push(Chunk::Owned(head));
    }

    /// Writes every queued chunk in one gather write, then takes back the head buffer and
    /// keeps the list's allocation for the next response.
    async fn flush(&mut self) -> Result<(), End> {
        if self.out.is_empty() {
            return Ok(());
        }
        let chunks = std::mem::take(&mut self.out);
        let mut back = self.write_chunks(chunks).await?;
        for chunk in back.drain(..) {
            if let Chunk::Owned(v) = chunk {
                self.head = v;
            }
        }
        self.out = back;
        Ok(())
    }

    async fn respond(&mut self, plan: Plan) -> Result<(), End> {
        self.sent = 0;
        self.queue_head();
        match plan.body {
            Body::None => self.flush().await,
            Body::Fill { file, meta } => {
                let data = self.read_whole(file, meta.len).await?;
                let short = (data.len() as u64) < meta.len;
                if !short {
                    self.svc.cache.borrow_mut().insert(&meta, data.clone());
                }
                let n = data.len() as u64;
                self.out.push(Chunk::Shared(data));
                self.flush().await?;
                self.counters.transfer(TransferPath::Memory, n);
                if short {
                    return Err(End::Truncated);
                }
                Ok(())
            }
            Body::Parts { source: Source::Memory(data), parts, suffix } => {
                let mut n = 0;
                for p in parts {
                    if let Some(pre) = p.prefix {
                        self.out.push(Chunk::Shared(pre));
                    }
                    n += p.len;
                    self.out.push(Chunk::Shared(Bytes::slice(&data, p.first as usize..(p.first + p.len) as usize)));
                }
                if let Some(s) = suffix {
                    self.out.push(Chunk::Shared(s));
                }
                self.flush().await?;
                if plan.status < 300 {
                    self.counters.transfer(TransferPath::Memory, n);
                }
                Ok(())
            }
            Body::Parts { source: Source::File(file), parts, suffix } => {
                let mut state = FileState::<R>::Std(file);
                let mut paths = (0u64, 0u64);
                for p in parts {
                    // The head and each part's framing leave in one write before its bytes.
                    if let Some(pre) = p.prefix {
                        self.out.push(Chunk::Shared(pre));
                    }
                    self.flush().await?;
                    let (by_sendfile, by_rw) = self.send_range(&mut state, p.first, p.len).await?;
                    paths.0 += by_sendfile;
                    paths.1 += by_rw;
                }
                if let Some(s) = suffix {
                    self.out.push(Chunk::Shared(s));
                }
                self.flush().await?;
                // An empty body counts under the path it would have taken.
                let rw_configured = self.cfg().large_bodies == LargeBodies::ReadWrite;
                if paths.1 > 0 || (paths.0 == 0 && rw_configured) {
                    self.counters.transfer(TransferPath::ReadWrite, paths.1);
                }
                if paths.0 > 0 || (paths.1 == 0 && !rw_configured) {
                    self.counters.transfer(TransferPath::Sendfile, paths.0);
                }
                Ok(())
            }
        }
    }

    /// Reads a small file whole through the engine's file I/O.
    async fn read_whole(&mut self, file: File, len: u64) -> Result<Bytes, End> {
        let f = R::File::from_std(file).map_err(End::Io)?;
        let mut buf = Vec::with_capacity(len as usize);
        while (buf.len() as u64) < len {
            let at = buf.len();
            let BufResult(res, slice) = f.read_at(buf.slice(at..len as usize), at as u64).await;
            buf = slice.into_inner();
            match res {
                Ok(0) => break, // the file shrank
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(End::Io(e)),
            }
        }
        Ok(Bytes::from(buf))
    }

    /// Sends `len` bytes at `first` of the file; returns (bytes by sendfile, bytes by read+write).
    ///
    /// Sendfile reads the file on the worker's thread, so it only gets windows that the page
    /// cache holds. From the first window with a missing page on, the rest of the range goes
    /// a chunk at a time through the engine's file read (io_uring: the disk wait happens in
    /// the kernel, not on the core). It does not return to sendfile: the readahead those
    /// reads start puts the next pages in the cache before their data has arrived, so a probe
    /// would call them cached and sendfile would wait for the disk after all (measured in
    /// docs/zero-copy.md).
    async fn send_range(&mut self, state: &mut FileState<R>, first: u64, len: u64) -> Result<(u64, u64), End> {
        let timeout = self.cfg().send_timeout;
        let mut sendfile = self.cfg().large_bodies == LargeBodies::Sendfile;
        let (mut pos, end) = (first, first + len);
        let (mut by_sendfile, mut by_rw) = (0, 0);
        let mut cold = false;
        while pos < end {
            if sendfile && !cold {
                let window = (end - pos).min(SENDFILE_WINDOW);
                // `Unknown` (the kernel could not say) keeps sendfile, as before the probe.
                cold = pagecache::residency(state.fd()?, pos, window) == Residency::NotCached;
                if !cold {
                    let sock = self.c.stream.as_raw_fd();
                    let fut = self.c.stream.send_file(state.fd()?, pos, window as usize);
                    let (res, timed_out) = with_deadline::<R, _>(sock, timeout, fut).await;
                    if timed_out {
                        return Err(End::Timeout);
                    }
                    match res {
                        Ok(0) => return Err(End::Truncated),
                        Ok(n) => {
                            pos += n as u64;
                            by_sendfile += n as u64;
                            self.sent += n as u64;
                        }
                        Err(e) if io_kind_is_unsupported(&e) && by_sendfile == 0 => {
                            tracing::debug!("sendfile refused ({e}); reading and writing instead");
                            sendfile = false;
                        }
                        Err(e) => return Err(e.into()),
                    }
                    continue;
                }
            }
            // One chunk through the engine: the read + write path, or the rest of a cold range.
            let want = (end - pos).min(self.cfg().read_write_chunk.max(4096) as u64) as usize;
            let n = self.copy_chunk(state, pos, want).await?;
            if cold {
                self.counters.cold(n as u64);
            }
            pos += n as u64;
            by_rw += n as u64;
            self.sent += n as u64;
        }
        Ok((by_sendfile, by_rw))
    }

    /// Reads up to `want` bytes at `pos` through the engine's file I/O and writes them to the
    /// client; returns how many went out.
    async fn copy_chunk(&mut self, state: &mut FileState<R>, pos: u64, want: usize) -> Result<usize, End> {
        let mut buf = self.rw_buf.take().unwrap_or_default();
        buf.clear();
        buf.reserve(want);
        let BufResult(res, slice) = state.engine()?.read_at(buf.slice(0..want), pos).await;
        buf = slice.into_inner();
        let n = match res {
            Ok(n) if n > 0 => n,
            other => {
                self.rw_buf = Some(buf);
                return Err(other.map_or_else(End::from, |_| End::Truncated));
            }
        };
        let sock = self.c.stream.as_raw_fd();
        let (BufResult(res, slice), timed_out) =
            with_deadline::<R, _>(sock, self.cfg().send_timeout, self.c.stream.write_all(buf.slice(0..n))).await;
        self.rw_buf = Some(slice.into_inner());
        if timed_out {
            return Err(End::Timeout);
        }
        res?;
        Ok(n)
    }
}

/// The most one sendfile call is given, and so the span probed in the page cache before it:
/// about what a socket's send buffer takes in one go.
const SENDFILE_WINDOW: u64 = 4 << 20;

/// A file being sent: a std handle (for `sendfile`), adopted by the engine the first time a
/// chunk must be read through it; sendfile then goes on with the engine file's descriptor.
enum FileState<R: Runtime> {
    Std(File),
    Engine(R::File),
    /// The engine refused to adopt the file (the error went to the caller).
    Lost,
}

impl<R: Runtime> FileState<R> {
    fn fd(&self) -> Result<BorrowedFd<'_>, End> {
        match self {
            FileState::Std(f) => Ok(f.as_fd()),
            // SAFETY: the engine's file owns this descriptor and lives as long as `self`.
            FileState::Engine(f) => Ok(unsafe { BorrowedFd::borrow_raw(f.as_raw_fd()) }),
            FileState::Lost => Err(End::Io(io::Error::other("the file could not be adopted by the engine"))),
        }
    }

    fn engine(&mut self) -> Result<&R::File, End> {
        *self = match std::mem::replace(self, FileState::Lost) {
            FileState::Std(f) => FileState::Engine(R::File::from_std(f).map_err(End::Io)?),
            other => other,
        };
        match self {
            FileState::Engine(f) => Ok(f),
            _ => Err(End::Io(io::Error::other("the file could not be adopted by the engine"))),
        }
    }
}
