//! The HTTP/3 front end: one connection's request loop, HTTP/3 fields to the file server's
//! typed inputs, its [`Plan`] to a response, and the body pump.
//!
//! Owns: what only HTTP/3 framing decides (pseudo-header `:path` as the request target, one
//! field per value, no connection fields, GOAWAY on drain) and how body bytes reach a request
//! stream: memory bodies as shared `Bytes`, file bodies read through the engine
//! (`R::File::read_at`, owned buffers) a chunk at a time, each chunk waiting for the stream's
//! flow control before the next is read, so a file is never read whole (only a small file
//! filling the memory cache is, as in HTTP/1.1).
//!
//! Must not touch: the file system, validators, ranges, content types or the cache's contents
//! (all in `corepin_files::resource`); sockets and QUIC (`crate::quic`).

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use corepin_core::runtime::File as _;
use corepin_core::task::{catch_panic, race, spawn_detached, timeout, Either};
use corepin_core::worker::CoreCounters;
use corepin_core::{BufResult, IoBuf, Runtime};
use corepin_files::metrics::TransferPath;
use corepin_files::resource::{
    Body, Conditions, Date, Extent, FieldValue, IfNoneMatch, IfRange, Method, Plan, RangeSpec,
};
use corepin_files::target;
use corepin_files::transfer::{self, End};
use corepin_files::Files;
use h3::error::{Code, ConnectionError, StreamError};
use h3::server::RequestStream;
use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::h3_quic::{H3Bidi, H3Conn};
use crate::quic::{Conn, Incoming};
use crate::{CoreShared, Tracker, H3_NO_ERROR};

type Stream = RequestStream<H3Bidi<Bytes>, Bytes>;

/// Why serving a connection or a request ended early.
#[derive(Debug, thiserror::Error)]
pub enum H3Error {
    /// The QUIC handshake failed.
    #[error("handshake: {0}")]
    Handshake(#[from] quinn_proto::ConnectionError),
    /// The HTTP/3 connection failed (the peer broke the protocol, or the connection closed).
    #[error("HTTP/3 connection: {0}")]
    Connection(#[from] ConnectionError),
    /// A request stream failed (reset by the peer, or malformed).
    #[error("HTTP/3 stream: {0}")]
    Stream(#[from] StreamError),
    /// The request's header section did not arrive in time.
    #[error("request header section timed out")]
    HeaderTimeout,
    /// The client's flow control did not take a body chunk in time.
    #[error("body write timed out")]
    SendTimeout,
    /// The file ended before the promised length (it changed while being served).
    #[error("file shorter than announced")]
    Truncated,
    /// Reading the file failed.
    #[error("reading the file: {0}")]
    Io(std::io::Error),
}

impl From<End> for H3Error {
    fn from(e: End) -> Self {
        match e {
            End::Truncated => H3Error::Truncated,
            End::Io(e) => H3Error::Io(e),
            End::Closed => H3Error::Io(std::io::ErrorKind::ConnectionAborted.into()),
            End::Timeout => H3Error::SendTimeout,
        }
    }
}

/// Completes the handshake of `incoming` and serves its requests, each in a task of its own,
/// until the client goes away, the connection fails, or the worker drains (then GOAWAY, the
/// requests in flight finish, and the connection closes with `H3_NO_ERROR`).
pub(crate) async fn serve_connection<R: Runtime>(incoming: Incoming, shared: Rc<CoreShared>) -> Result<(), H3Error> {
    let counters = shared.metrics.core(shared.worker.info().index);
    // Whether the handshake is complete. With 0-RTT the connection is served from the client's
    // first flight on, and a request that arrives before completion is early data.
    let confirmed = Cell::new(false);
    // With 0-RTT the handshake is still going on while requests are served: `true` until its
    // end has been recorded. The driver handles the client's Finished before any 1-RTT packet
    // after it, so a look at the connection when a request arrives tells early data from the rest.
    let quic = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            CoreCounters::add(&counters.handshakes_failed, 1);
            return Err(e.into());
        }
    };
    let mut done = shared.cfg.zero_rtt;
    if !done {
        handshake(quic.handshake().await, &confirmed, counters)?;
    }

    let first_peer = quic.remote_address();
    let mut conn = h3::server::builder()
        .max_field_section_size(shared.cfg.max_field_section_size)
        .build::<_, Bytes>(H3Conn::new(quic.clone()))
        .await?;
    let early_counted = Cell::new(false);
    let requests = Rc::new(Tracker::default());
    let worker = shared.worker.clone();
    let mut goaway_sent = false;
    let result = loop {
        // The next request, or (with 0-RTT) the end of the handshake, recorded as it happens.
        let accept = async {
            match race(conn.accept(), handshake_end(done, &quic)).await {
                Either::Left(r) => Some(r),
                Either::Right(()) => {
                    record(&quic, &confirmed, counters);
                    None
                }
            }
        };
        let next = if goaway_sent {
            // After GOAWAY, h3 refuses streams beyond it by itself; the connection ends
            // when its last request is done (or the client closes first).
            match race(accept, requests.idle()).await {
                Either::Left(Some(r)) => r,
                Either::Left(None) => {
                    done = false;
                    continue;
                }
                Either::Right(()) => break Ok(()),
            }
        } else {
            match race(accept, worker.draining()).await {
                Either::Left(Some(r)) => r,
                Either::Left(None) => {
                    done = false;
                    continue;
                }
                Either::Right(()) => {
                    goaway_sent = true;
                    // Requests already accepted finish; the next stream id is the first refused.
                    if let Err(e) = conn.shutdown(1).await {
                        break Err(e.into());
                    }
                    continue;
                }
            }
        };
        match next {
            Ok(Some(resolver)) => {
                let guard = requests.enter();
                let shared = Rc::clone(&shared);
                settle(&mut done, &quic, &confirmed, counters);
                let early = !confirmed.get();
                // A request before the handshake's end came in 0-RTT data: it was accepted.
                if early && !early_counted.replace(true) {
                    CoreCounters::add(&counters.zero_rtt_accepted, 1);
                }
                // The task's own future stays small (its captures), and the request's, a few
                // KiB, is boxed once when the task first runs: a spawn moves its future more
                // than once on its way into the executor, and each move copies all of it.
                // Detached: nothing joins a request, so the join handle's shared state would
                // be one allocation per request for nothing.
                spawn_detached::<R, _>(async move {
                    let counters = shared.worker.clone();
                    match catch_panic(Box::pin(serve_request::<R>(resolver, &shared, early))).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::debug!("HTTP/3 request ended early: {e}"),
                        Err(message) => {
                            CoreCounters::add(&counters.counters().connection_panics, 1);
                            tracing::error!(
                                core = counters.info().cpu,
                                "an HTTP/3 request's task panicked ({message}); that stream is reset, the others go on"
                            );
                        }
                    }
                    drop(guard);
                });
            }
            Ok(None) => break Ok(()),
            Err(e) if e.is_h3_no_error() => break Ok(()),
            Err(e) => break Err(e.into()),
        }
    };
    if goaway_sent && result.is_ok() {
        // Draining, every request answered: but an answer handed to QUIC may still be in its
        // send buffer or in flight, and a CONNECTION_CLOSE now would discard it. Only the
        // receiver can know all data arrived, so let the client close; until it does, keep
        // the connection while it is still sending, closing once it has gone quiet (all data
        // acknowledged), bounded by the drain deadline.
        linger::<R>(&quic, shared.cfg.drain_timeout).await;
    }
    if quic.remote_address() != first_peer {
        CoreCounters::add(&counters.migrated, 1);
    }
    let stats = quic.stats();
    CoreCounters::add(&counters.packets_sent, stats.path.sent_packets);
    CoreCounters::add(&counters.packets_lost, stats.path.lost_packets);
    settle(&mut done, &quic, &confirmed, counters);
    if done {
        // Ended before its handshake did.
        CoreCounters::add(&counters.handshakes_failed, 1);
    }
    quic.close(H3_NO_ERROR.into(), b"");
    result
}

/// How often a draining connection checks whether it is still sending.
const LINGER_TICK: std::time::Duration = std::time::Duration::from_millis(200);

/// Waits until the peer closes `quic`, or the connection has sent nothing for a tick (what it
/// had to deliver is acknowledged: a QUIC sender keeps retransmitting until it is), or `limit`
/// has passed.
async fn linger<R: Runtime>(quic: &Conn, limit: std::time::Duration) {
    let until = Instant::now() + limit;
    let mut sent = quic.stats().udp_tx.bytes;
    while Instant::now() < until {
        if let Either::Left(_) = race(quic.closed(), R::sleep(LINGER_TICK)).await {
            return;
        }
        let now = quic.stats().udp_tx.bytes;
        if now == sent {
            return;
        }
        sent = now;
    }
}

/// Looks, without waiting, whether a 0-RTT connection's handshake has ended; when it has,
/// records it and stops looking.
fn settle(done: &mut bool, quic: &Conn, confirmed: &Cell<bool>, counters: &crate::metrics::CoreH3Counters) {
    if *done && (quic.is_connected() || quic.close_reason().is_some()) {
        *done = false;
        record(quic, confirmed, counters);
    }
}

/// Resolves when a 0-RTT connection's handshake ends (or the connection first); never when
/// there is nothing to wait for.
async fn handshake_end(done: bool, quic: &Conn) {
    if done {
        let _ = quic.handshake().await;
    } else {
        std::future::pending::<()>().await;
    }
}

/// Counts the end of a 0-RTT connection's handshake and marks the connection confirmed, or
/// counts a failure when the connection closed first.
fn record(quic: &Conn, confirmed: &Cell<bool>, counters: &crate::metrics::CoreH3Counters) {
    if quic.close_reason().is_some() && !quic.is_connected() {
        CoreCounters::add(&counters.handshakes_failed, 1);
        return;
    }
    CoreCounters::add(&counters.handshakes, 1);
    confirmed.set(true);
}

/// The end of a handshake: counted, and the connection marked confirmed.
fn handshake(
    done: Result<(), quinn_proto::ConnectionError>,
    confirmed: &Cell<bool>,
    counters: &crate::metrics::CoreH3Counters,
) -> Result<(), H3Error> {
    match done {
        Ok(()) => {
            CoreCounters::add(&counters.handshakes, 1);
            confirmed.set(true);
            Ok(())
        }
        Err(e) => {
            CoreCounters::add(&counters.handshakes_failed, 1);
            Err(e.into())
        }
    }
}

/// Reads one request's header section and answers it. `early`: the request arrived before the
/// handshake completed (0-RTT data, which an attacker could replay): only GET and HEAD are
/// served then, anything else is told 425 Too Early (RFC 8470 §5.2) and may retry.
async fn serve_request<R: Runtime>(
    resolver: h3::server::RequestResolver<H3Conn, Bytes>,
    shared: &CoreShared,
    early: bool,
) -> Result<(), H3Error> {
    let files = &shared.files;
    // The clock is read only for the access log's duration.
    let started = files.config().access_log.then(Instant::now);
    let (req, mut stream) = match timeout::<R, _>(shared.cfg.header_timeout, resolver.resolve_request()).await {
        Ok(r) => r?,
        Err(_) => return Err(H3Error::HeaderTimeout),
    };
    let safe = matches!(*req.method(), http::Method::GET | http::Method::HEAD);
    let plan = if early && !safe {
        CoreCounters::add(&shared.metrics.core(shared.worker.info().index).too_early, 1);
        Plan::error(425)
    } else {
        plan(files, &req)
    };
    let status = plan.status;
    let counters = files.counters();
    let result = respond::<R>(files, &mut stream, plan, shared.cfg.send_timeout).await;
    counters.response(status);
    if let Some(started) = started {
        tracing::info!(
            target: "corepin::access",
            "\"{} {} HTTP/3\" {} {}us",
            req.method().as_str().escape_debug(),
            req.uri().to_string().escape_debug(),
            status,
            started.elapsed().as_micros()
        );
    }
    match &result {
        // The answer is incomplete: say so on the stream rather than let it look finished.
        Err(_) => stream.stop_stream(Code::H3_INTERNAL_ERROR),
        Ok(()) => finish_reading::<R>(&mut stream).await,
    }
    result
}

/// How long a complete response waits for the end of its request before it stops reading it.
const REQUEST_END_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
/// Request body bytes read and dropped while waiting for the request's end.
const REQUEST_BODY_DROP: usize = 64 * 1024;

/// Reads the rest of an answered request (a GET or HEAD has nothing but its end), so the
/// stream closes cleanly. Dropping a request stream that is still open for reading sends
/// STOP_SENDING with code 0 (`quic::RecvStream`, as quinn does), which is no HTTP/3 code, and
/// a client that sends its FIN a moment after the header section (h3's own client does) would
/// see its request fail although the answer is complete. A request that does not end soon, or sends a body, is
/// told to stop with H3_NO_ERROR, as RFC 9114 §4.1.2 asks of a server that has answered.
async fn finish_reading<R: Runtime>(stream: &mut Stream) {
    let ended = timeout::<R, _>(REQUEST_END_WAIT, async {
        let mut dropped = 0usize;
        loop {
            match stream.recv_data().await {
                Ok(None) => return true,
                Ok(Some(chunk)) => {
                    dropped += bytes::Buf::remaining(&chunk);
                    if dropped > REQUEST_BODY_DROP {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
    })
    .await;
    if !matches!(ended, Ok(true)) {
        stream.stop_sending(Code::H3_NO_ERROR);
    }
}

/// The file server's inputs from an HTTP/3 request, and its answer.
fn plan(files: &Files, req: &http::Request<()>) -> Plan {
    let method = match Method::from_token(req.method().as_str()) {
        Ok(m) => m,
        Err(refused) => return refused.plan(),
    };
    // `:path` is the request target in origin form (RFC 9114 §4.3.1); h3 has already refused
    // a request without it, except CONNECT, which `from_token` refused above.
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let headers = req.headers();
    // A field sent more than once is combined as a list (If-None-Match), or ignored where
    // values cannot be combined (Range, If-Range, If-Modified-Since), as HTTP/1.1 does.
    let if_none_match: Option<Vec<u8>> = {
        let mut values = headers.get_all(http::header::IF_NONE_MATCH).iter();
        values.next().map(|first| {
            let mut v = first.as_bytes().to_vec();
            for more in values {
                v.extend_from_slice(b", ");
                v.extend_from_slice(more.as_bytes());
            }
            v
        })
    };
    let single = |name: HeaderName| -> Option<Option<&[u8]>> {
        let mut values = headers.get_all(name).iter();
        let first = values.next()?;
        Some(if values.next().is_some() { None } else { Some(first.as_bytes()) })
    };
    let cond = Conditions {
        if_none_match: if_none_match.as_deref().map(IfNoneMatch::new),
        if_modified_since: single(http::header::IF_MODIFIED_SINCE).flatten().and_then(Date::parse),
        range: single(http::header::RANGE).map(|v| v.map_or_else(RangeSpec::ignored, RangeSpec::new)),
        if_range: single(http::header::IF_RANGE).flatten().map(IfRange::parse),
    };
    match target::parse_target(target.as_bytes()) {
        Ok(path) => files.plan(method, &path, &cond),
        Err(e) => {
            tracing::debug!("refused target: {e}");
            Plan::error(400).for_method(method)
        }
    }
}

thread_local! {
    /// The `Date` value of the current second, per core: formatted once a second, and each
    /// response takes a reference-counted copy.
    static DATE: std::cell::RefCell<(u64, HeaderValue)> =
        const { std::cell::RefCell::new((u64::MAX, HeaderValue::from_static(""))) };
}

/// The `Date` field's value now.
fn date() -> HeaderValue {
    let now = SystemTime::now();
    let secs = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(now)) {
                *d = (secs, v);
            }
        }
        d.1.clone()
    })
}

/// The field name the plan calls `name` (the plan's names are fixed; the match saves a parse).
fn field_name(name: &'static str) -> Option<HeaderName> {
    use http::header;
    Some(match name {
        "Content-Type" => header::CONTENT_TYPE,
        "Content-Range" => header::CONTENT_RANGE,
        "Last-Modified" => header::LAST_MODIFIED,
        "ETag" => header::ETAG,
        "Accept-Ranges" => header::ACCEPT_RANGES,
        "Location" => header::LOCATION,
        "Allow" => header::ALLOW,
        other => HeaderName::from_bytes(other.as_bytes()).ok()?,
    })
}

/// The response head of `plan`. A file's validators and type are shared with its cached
/// facts (no copy), fixed texts are static, and the few values rendered per answer (ranges,
/// redirects) are written one after another into one buffer, each field taking its slice.
fn response(plan: &Plan) -> http::Response<()> {
    use std::fmt::Write as _;
    let mut fields = HeaderMap::with_capacity(10);
    let mut text = bytes::BytesMut::new();
    plan.headers.for_each_field(plan.status, |name, value| {
        // Every value the plan holds is visible ASCII; one that is not is left out rather
        // than sent broken.
        let value = match value {
            FieldValue::Shared(v) => HeaderValue::from_maybe_shared(v.clone()),
            FieldValue::Static(v) => HeaderValue::from_maybe_shared(Bytes::from_static(v.as_bytes())),
            FieldValue::Formatted(v) => {
                if write!(text, "{v}").is_err() {
                    text.clear();
                    return;
                }
                HeaderValue::from_maybe_shared(text.split().freeze())
            }
        };
        if let (Some(name), Ok(value)) = (field_name(name), value) {
            fields.append(name, value);
        }
    });
    if let Some(len) = plan.headers.content_length {
        fields.insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    fields.insert(http::header::DATE, date());
    fields.insert(http::header::SERVER, HeaderValue::from_static("corepin"));
    let mut resp = http::Response::new(());
    *resp.status_mut() = http::StatusCode::from_u16(plan.status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    *resp.headers_mut() = fields;
    resp
}

/// Sends the head and the body of `plan` and finishes the stream.
async fn respond<R: Runtime>(
    files: &Files,
    stream: &mut Stream,
    plan: Plan,
    send_timeout: std::time::Duration,
) -> Result<(), H3Error> {
    stream.send_response(response(&plan)).await?;
    let mut pump = Pump::<R> { stream, send_timeout, sent: 0, _runtime: std::marker::PhantomData };
    let counters = files.counters();
    match plan.body {
        Body::None => {}
        Body::Text(text) => pump.send(text).await?,
        Body::Listing(html) => {
            let n = html.len() as u64;
            pump.send(html).await?;
            counters.transfer(TransferPath::Memory, n);
        }
        // The two bodies read through the engine are boxed: their futures (the engine's
        // reads) would otherwise widen this one, and the request task holding it, for every
        // request, while most answers come from memory.
        Body::Fill { file, meta } => Box::pin(pump.fill(files, file, meta)).await?,
        Body::Memory { data, extent } => {
            let n = extent.source_bytes();
            let span = |first: u64, len: u64| Bytes::slice(&data, first as usize..(first + len) as usize);
            match extent {
                Extent::Span { first, len } => pump.send(span(first, len)).await?,
                Extent::Multipart { parts, close } => {
                    for p in parts {
                        pump.send(p.prefix).await?;
                        pump.send(span(p.first, p.len)).await?;
                    }
                    pump.send(close).await?;
                }
            }
            counters.transfer(TransferPath::Memory, n);
        }
        Body::File { file, extent } => Box::pin(pump.file(files, file, extent)).await?,
    }
    CoreCounters::add(&counters.bytes_sent, pump.sent);
    stream.finish().await?;
    Ok(())
}

/// Moves body bytes onto one request stream.
struct Pump<'s, R: Runtime> {
    stream: &'s mut Stream,
    send_timeout: std::time::Duration,
    sent: u64,
    _runtime: std::marker::PhantomData<fn() -> R>,
}

impl<R: Runtime> Pump<'_, R> {
    /// Sends one DATA frame, waiting at most the send timeout for the client's flow control.
    async fn send(&mut self, data: Bytes) -> Result<(), H3Error> {
        if data.is_empty() {
            return Ok(());
        }
        let n = data.len() as u64;
        match timeout::<R, _>(self.send_timeout, self.stream.send_data(data)).await {
            Ok(r) => r?,
            Err(_) => return Err(H3Error::SendTimeout),
        }
        self.sent += n;
        Ok(())
    }

    /// A small file's body, read whole, kept in the core's memory cache and sent.
    async fn fill(
        &mut self,
        files: &Files,
        file: Rc<std::fs::File>,
        meta: corepin_core::runtime::Metadata,
    ) -> Result<(), H3Error> {
        let data = transfer::read_whole::<R>(file, &meta).await?;
        let short = (data.len() as u64) < meta.len;
        if !short {
            files.remember(&meta, data.clone());
        }
        let n = data.len() as u64;
        self.send(data).await?;
        files.counters().transfer(TransferPath::Memory, n);
        if short {
            return Err(H3Error::Truncated);
        }
        Ok(())
    }

    /// A larger file's body (or its ranges), read through the engine a chunk at a time.
    async fn file(&mut self, files: &Files, file: Rc<std::fs::File>, extent: Extent) -> Result<(), H3Error> {
        let file = R::File::from_std(transfer::owned(file)?).map_err(H3Error::Io)?;
        let chunk = files.config().read_write_chunk.max(4096);
        let n = extent.source_bytes();
        match extent {
            Extent::Span { first, len } => self.file_range(&file, first, len, chunk).await?,
            Extent::Multipart { parts, close } => {
                for p in parts {
                    self.send(p.prefix).await?;
                    self.file_range(&file, p.first, p.len, chunk).await?;
                }
                self.send(close).await?;
            }
        }
        files.counters().transfer(TransferPath::ReadWrite, n);
        Ok(())
    }

    /// Sends `len` bytes of `file` at `first`, a chunk at a time: each chunk is read through
    /// the engine into a fresh owned buffer, which becomes the DATA frame's bytes.
    async fn file_range(&mut self, file: &R::File, first: u64, len: u64, chunk: usize) -> Result<(), H3Error> {
        let (mut pos, end) = (first, first + len);
        while pos < end {
            let want = (end - pos).min(chunk as u64) as usize;
            let BufResult(res, slice) = file.read_at(Vec::with_capacity(want).slice(0..want), pos).await;
            let mut buf = slice.into_inner();
            let n = match res {
                Ok(0) => return Err(H3Error::Truncated),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(H3Error::Io(e)),
            };
            buf.truncate(n);
            self.send(Bytes::from(buf)).await?;
            pos += n as u64;
        }
        Ok(())
    }
}
