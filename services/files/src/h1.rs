//! The HTTP/1.1 front end (RFC 9112): one connection's loop. It reads request heads into a
//! per-connection buffer and parses them ([`http`](crate::http)), answers pipelined requests
//! in order, keeps the connection alive or closes it, enforces the header, idle and drain
//! deadlines, turns each request into [`resource`] inputs, serializes the resulting
//! [`Plan`] into an HTTP/1.1 head (status line with its reason phrase, `Date`, `Server`,
//! `Connection`) and hands head and body to [`transfer`]. It also answers what only HTTP/1.1
//! framing can get wrong (400, 408, 413, 414, 431, 505), and writes the access log.
//!
//! Must not touch: the file system, the memory cache, validators or ranges (that is
//! `resource`), and how body bytes reach the socket (that is `transfer`). Nothing here is
//! needed by another protocol's front end.
//!
//! [`resource`]: crate::resource
//! [`transfer`]: crate::transfer

use std::future::Future;
use std::time::{Duration, Instant};

use corepin_core::task::{read_timeout, read_timeout_or, Either};
use corepin_core::{BufResult, ConnStream, Connection, IoBuf, Runtime};

use crate::http::{self, Head, HeadWriter, Parsed};
use crate::metrics::CoreFileCounters;
use crate::resource::{Conditions, Date, IfNoneMatch, IfRange, Method, Plan, RangeSpec};
use crate::target;
use crate::transfer::{End, Transfer};
use crate::{Files, FilesConfig};

/// Serves one connection until it closes, fails or times out.
///
/// Not an `async fn`: its future would keep `conn` beside the connection state it is moved
/// into, for as long as the connection lives. The state is built first and the future uses it
/// in place.
pub fn serve<'f, R: Runtime, S: ConnStream>(
    files: &'f Files,
    conn: Connection<R, S>,
) -> impl Future<Output = std::io::Result<()>> + use<'f, R, S> {
    let mut c = Conn {
        files,
        counters: files.counters(),
        c: conn,
        inbuf: Vec::with_capacity(4096),
        start: 0,
        head: Vec::with_capacity(512),
        tx: Transfer::new(files),
    };
    async move {
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

/// The resource inputs of a parsed head.
fn conditions<'a>(head: &Head<'a>) -> Conditions<'a> {
    Conditions {
        if_none_match: head.if_none_match.map(IfNoneMatch::new),
        if_modified_since: head.if_modified_since.and_then(Date::parse),
        range: head.range.map(RangeSpec::new),
        if_range: head.if_range.map(IfRange::parse),
    }
}

/// Writes the HTTP/1.1 head of `plan` into `out` (cleared first; its allocation is reused).
fn write_head(out: &mut Vec<u8>, plan: &Plan, alt_svc: Option<&str>, keep_alive: bool, minor: u8) {
    let h = &plan.headers;
    let mut w = HeadWriter::new(out, plan.status);
    h.for_each_field(plan.status, |name, value| {
        w.field(name, value);
    });
    if let Some(v) = alt_svc {
        w.header("Alt-Svc", v);
    }
    w.finish(h.content_length, keep_alive, minor);
}

/// Lingering close (nginx's `lingering_close`): after an answer that ends the connection
/// while the client may still be sending, what still arrives is read and dropped for at most
/// this long in all...
const LINGER_TIME: Duration = Duration::from_secs(5);
/// ...until the client has been silent this long...
const LINGER_SILENCE: Duration = Duration::from_secs(1);
/// ...or this many bytes have been dropped, before the socket is closed.
const LINGER_BYTES: u64 = 1 << 20;

/// What follows a burst of answers.
enum Next {
    /// Every buffered request is answered: wait for the next.
    Idle,
    /// The connection closes (the answer said so, or the request was refused).
    Close,
}

/// One connection's state.
struct Conn<'s, R: Runtime, S: ConnStream> {
    files: &'s Files,
    c: Connection<R, S>,
    counters: &'s CoreFileCounters,
    /// Bytes received and not yet consumed start at `start`.
    inbuf: Vec<u8>,
    start: usize,
    /// The response head being built; moves into writes and comes back.
    head: Vec<u8>,
    /// Sends heads and bodies; keeps its buffers between responses.
    tx: Transfer<'s, R>,
}

impl<R: Runtime, S: ConnStream> Conn<'_, R, S> {
    fn cfg(&self) -> &FilesConfig {
        &self.files.cfg
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

    /// Waits for the next request (nothing is buffered) holding no buffer, on engines whose
    /// `read_pooled` reads into the core's provided-buffer ring: the connection's own buffers
    /// are given back, the
    /// kernel picks a ring buffer only when bytes arrive, and they are copied into a fresh
    /// input buffer (a request head is small) before the ring buffer goes back. An idle
    /// keep-alive connection then costs its task and its socket. (On engines without a ring,
    /// the pool's fallback would hold a bigger buffer than the connection's own while waiting,
    /// so `fill` keeps reading into the connection's buffer there.)
    ///
    /// A read dropped by the idle timeout or the drain may take bytes with it, which is fine:
    /// the connection closes either way.
    async fn fill_idle(&mut self) -> Result<(), End> {
        self.inbuf = Vec::new();
        self.head = Vec::new();
        self.tx.release_buffers();
        let timeout = self.cfg().idle_timeout;
        // Built in place: a `let` for the read would keep a second copy of it in this future.
        // The worker is borrowed, not cloned: a clone would be one more field of the wait.
        let read = corepin_core::task::race(
            corepin_core::task::timeout::<R, _>(timeout, self.c.stream.read_pooled()),
            self.c.worker.draining(),
        );
        match read.await {
            Either::Left(Ok(Ok(buf))) if buf.is_empty() => Err(End::Closed),
            Either::Left(Ok(Ok(buf))) => {
                self.inbuf.reserve(buf.len().max(4096));
                self.inbuf.extend_from_slice(&buf);
                Ok(())
            }
            Either::Left(Ok(Err(e))) => Err(e.into()),
            Either::Left(Err(_elapsed)) => Err(End::Timeout),
            Either::Right(()) => Err(End::Closed),
        }
    }

    /// Closes without losing the answer just sent. Closing a socket that still holds unread
    /// input makes the kernel send a reset, and a reset that reaches the client before it has
    /// read the answer destroys it (the client sees "connection reset" instead of its 413). So
    /// writing is shut down first (the client sees the end of the answer), then what the client
    /// still sends is dropped until it closes its side, falls silent, or the time or byte
    /// budget runs out. Bounded, so a client cannot hold the connection open this way.
    async fn linger(&mut self) {
        if self.c.stream.shutdown().await.is_err() {
            return;
        }
        let until = Instant::now() + LINGER_TIME;
        let mut dropped = 0u64;
        while dropped < LINGER_BYTES {
            let left = until.saturating_duration_since(Instant::now()).min(LINGER_SILENCE);
            if left.is_zero() {
                break;
            }
            let mut buf = std::mem::take(&mut self.inbuf);
            buf.clear();
            let cap = buf.capacity().max(4096);
            buf.reserve(cap);
            let BufResult(res, slice) = read_timeout::<R, _, _>(&mut self.c.stream, buf.slice(0..cap), left).await;
            self.inbuf = slice.into_inner();
            match res {
                Ok(n) if n > 0 => dropped += n as u64,
                _ => break,
            }
        }
        self.inbuf.clear();
        self.start = 0;
    }

    /// Whether the client may still be sending: part of a request body, or bytes past the
    /// last request, are unread.
    fn input_pending(&self, discard: u64) -> bool {
        discard > 0 || self.start < self.inbuf.len()
    }

    /// Writes the head of `plan` and sends it with its body.
    async fn respond(&mut self, plan: Plan, keep_alive: bool, minor: u8) -> Result<(), End> {
        write_head(&mut self.head, &plan, self.files.cfg.alt_svc.as_deref(), keep_alive, minor);
        self.tx.send(&mut self.c.stream, &mut self.head, plan.body).await
    }

    /// The connection's loop: wait idle for a request, then answer what arrived. Only the idle
    /// wait lives in this future; answering is one boxed future per burst of requests, so the
    /// connection task, which lives as long as the connection, is sized for the wait alone
    /// (a send's state, partial heads, the access log line and the lingering close are freed
    /// before the next wait).
    async fn serve(&mut self) -> Result<(), End> {
        loop {
            self.inbuf.clear();
            self.start = 0;
            if self.c.worker.is_draining() {
                return Ok(());
            }
            if corepin_core::engine::lends_ring_buffers() {
                self.fill_idle().await?;
            } else {
                // Boxed, so that the idle wait on a ring (above) is what an idle
                // connection's task is sized for.
                Box::pin(self.fill(None)).await?;
            }
            if let Next::Close = Box::pin(self.answer()).await? {
                return Ok(());
            }
        }
    }

    /// Answers the requests in the input buffer, in order, reading more of a request (head or
    /// body to skip) under the header deadline, until the input is used up between requests
    /// ([`Next::Idle`]) or the connection must close ([`Next::Close`]).
    async fn answer(&mut self) -> Result<Next, End> {
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
                return Ok(Next::Idle);
            }
            // The clock is read only for the access log's duration.
            let started = self.cfg().access_log.then(Instant::now);
            let limits = self.cfg().limits;
            let outcome = match http::parse(&self.inbuf[self.start..], &limits) {
                Parsed::Complete(head, n) => {
                    let plan = self.plan(&head);
                    // A name too long for the file system is answered as HTTP/1.1 answers an
                    // over-long request line: the connection closes.
                    let keep_alive = head.keep_alive && plan.status != 414;
                    let log = started.map(|started| {
                        let (method, target) = (head.method.to_string(), String::from_utf8_lossy(head.target));
                        (method, target.into_owned(), head.minor, started)
                    });
                    Ok((plan, keep_alive, head.minor, n, head.body_len, log))
                }
                Parsed::Partial => Err(None),
                Parsed::Rejected(r) => Err(Some(r)),
            };
            match outcome {
                Ok((plan, keep_alive, minor, n, body_len, log)) => {
                    self.start += n;
                    discard = body_len;
                    head_deadline = None;
                    let status = plan.status;
                    let stay = keep_alive && !self.c.worker.is_draining();
                    let result = self.respond(plan, keep_alive, minor).await;
                    self.counters.response(status);
                    let sent = self.tx.sent();
                    corepin_core::worker::CoreCounters::add(&self.counters.bytes_sent, sent);
                    if let Some((method, target, minor, started)) = log {
                        tracing::info!(
                            target: "corepin::access",
                            "{} \"{} {} HTTP/1.{}\" {} {} {}us",
                            self.c.peer,
                            method.escape_debug(),
                            target.escape_debug(),
                            minor,
                            status,
                            sent,
                            started.elapsed().as_micros()
                        );
                    }
                    result?;
                    if !stay {
                        if self.input_pending(discard) {
                            self.linger().await;
                        }
                        return Ok(Next::Close);
                    }
                }
                Err(None) => {
                    let d = *head_deadline.get_or_insert_with(|| Instant::now() + self.cfg().header_timeout);
                    match self.fill(Some(d)).await {
                        Err(End::Timeout) => {
                            // The head did not arrive in time: say so (best effort), then close.
                            if self.respond(Plan::error(408), false, 1).await.is_ok() {
                                self.linger().await;
                            }
                            self.counters.response(408);
                            return Err(End::Timeout);
                        }
                        other => other?,
                    }
                }
                Err(Some(reject)) => {
                    tracing::debug!(peer = %self.c.peer, "refused request: {}", reject.why);
                    self.respond(Plan::error(reject.status), false, 1).await?;
                    self.counters.response(reject.status);
                    self.linger().await;
                    return Ok(Next::Close);
                }
            }
        }
    }

    /// Decides the answer to `head` through `resource` (synchronous: opens and stats, but
    /// sends nothing).
    fn plan(&self, head: &Head<'_>) -> Plan {
        let method = match Method::from_token(head.method) {
            Ok(m) => m,
            Err(refused) => return refused.plan(),
        };
        match target::parse_target(head.target) {
            Ok(path) => self.files.plan(method, &path, &conditions(head)),
            Err(e) => {
                tracing::debug!(peer = %self.c.peer, "refused target: {e}");
                Plan::error(400).for_method(method)
            }
        }
    }
}
