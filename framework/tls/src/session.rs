//! One connection's TLS state and the buffers it owns, driven through rustls's unbuffered API.
//!
//! Owns: the rustls connection, the ciphertext received and not yet processed (`tls_in`), the
//! plaintext decrypted but not yet delivered (`plain`), and the ciphertext waiting to be sent
//! (`tls_out`, plus `side_out` for the rare records encoded while `tls_out` is in a socket
//! write). Every buffer is allocated once per connection and reused. Must not touch the
//! socket: the stream halves (`stream.rs`) do all I/O and call in here between operations,
//! never holding a borrow across an await, so a read half waiting on the socket never blocks
//! the write half.

use std::io;
use std::sync::Arc;

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::ProtocolVersion;

use crate::metrics::TlsMetrics;

/// The most plaintext one TLS record carries.
pub(crate) const RECORD_PLAIN_MAX: usize = 16 * 1024;
/// The largest ciphertext record a peer may send (TLS 1.2 allows 2^14 + 2048 bytes of
/// payload, plus the 5-byte header); the receive buffers hold one whole such record.
pub(crate) const IN_CAP: usize = RECORD_PLAIN_MAX + 2048 + 5;
/// Plaintext encrypted per write call: four full records, one socket write.
pub(crate) const WRITE_PLAIN_MAX: usize = 4 * RECORD_PLAIN_MAX;
/// Room for `WRITE_PLAIN_MAX` encrypted (header, explicit nonce, content type and tag add at
/// most 29 bytes per record with the suites offered) plus a pending handshake message.
pub(crate) const OUT_CAP: usize = WRITE_PLAIN_MAX + 4 * RECORD_OVERHEAD_MAX + 4096;
/// The send buffer a connection starts with: room for the server's handshake flight and small
/// responses. It grows to `OUT_CAP` once, on the first write that needs more, so idle and
/// small-response connections stay small.
pub(crate) const OUT_INITIAL: usize = 8 * 1024;
/// Bytes a record adds to its plaintext, bounded generously (TLS 1.2 AES-GCM adds 29).
pub(crate) const RECORD_OVERHEAD_MAX: usize = 64;

/// What a pass over the received records reached.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reached {
    /// Every complete record was processed; more ciphertext is needed to go on.
    NeedInput,
    /// Handshake records wait in `tls_out` and must be sent before going on (handshake only).
    Transmit,
    /// The handshake is complete (handshake only).
    Handshaken,
    /// `n` bytes of the caller's plaintext were encrypted into `tls_out` (writes only).
    Encrypted(usize),
    /// A close_notify was encrypted into `tls_out` (shutdown only).
    CloseQueued,
    /// The peer sent close_notify: no more application data will come.
    PeerClosed,
}

/// What the caller wants from a pass.
pub(crate) enum Goal<'a> {
    /// Complete the handshake.
    Handshake,
    /// Decrypt what has arrived; `sink` takes plaintext (returns how much it took; the rest
    /// is kept in `plain`).
    Read(&'a mut dyn FnMut(&[u8]) -> usize),
    /// Encrypt (a prefix of) this plaintext.
    Write(&'a [u8]),
    /// Encrypt a close_notify alert.
    Close,
}

/// A fatal condition, kept so that every later operation reports it too.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    Tls(rustls::Error),
    Oversized,
    /// A TLS 1.2 client asked to renegotiate after the handshake.
    Renegotiation,
    Io(io::ErrorKind, String),
}

impl Failure {
    pub(crate) fn to_io(&self) -> io::Error {
        match self {
            Failure::Tls(e) => io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}")),
            Failure::Oversized => io::Error::new(
                io::ErrorKind::InvalidData,
                format!("TLS record or handshake message larger than the connection's {IN_CAP}-byte buffer"),
            ),
            Failure::Renegotiation => io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS: the client asked to renegotiate; renegotiation is refused and the connection closed",
            ),
            Failure::Io(kind, msg) => io::Error::new(*kind, msg.clone()),
        }
    }
}

/// One connection's TLS state, shared (through `Rc<RefCell<..>>`) by the stream or its two
/// halves on one core.
pub(crate) struct Session {
    pub(crate) conn: UnbufferedServerConnection,
    /// Received ciphertext; `tls_in[in_start..in_end]` is not processed yet. Fully
    /// initialised (`len() == IN_CAP`) so it can be lent to rustls as a slice.
    pub(crate) tls_in: Vec<u8>,
    pub(crate) in_start: usize,
    pub(crate) in_end: usize,
    /// Bumped whenever the unprocessed range of `tls_in` moves, so a read that completes can
    /// tell whether the bytes it copied before reading are still the unprocessed ones.
    pub(crate) in_gen: u64,
    /// Decrypted plaintext not yet delivered: `plain[plain_start..]`. Allocated on first use.
    pub(crate) plain: Vec<u8>,
    pub(crate) plain_start: usize,
    /// Ciphertext to send, `tls_out[..out_len]`; `None` while lent to a socket write. Fully
    /// initialised (`OUT_INITIAL` bytes, grown once to `OUT_CAP` for bulk writes).
    pub(crate) tls_out: Option<Vec<u8>>,
    pub(crate) out_len: usize,
    /// Records encoded while `tls_out` was lent; sent right after it. Empty otherwise.
    pub(crate) side_out: Vec<u8>,
    pub(crate) peer_closed: bool,
    pub(crate) close_sent: bool,
    pub(crate) failure: Option<Failure>,
    /// Where a failure after the handshake is counted (set once the handshake is complete;
    /// handshake failures are counted by the acceptor).
    pub(crate) counters: Option<(Arc<TlsMetrics>, usize)>,
}

impl Session {
    pub(crate) fn new(conn: UnbufferedServerConnection) -> Self {
        Self {
            conn,
            tls_in: vec![0; IN_CAP],
            in_start: 0,
            in_end: 0,
            in_gen: 0,
            plain: Vec::new(),
            plain_start: 0,
            tls_out: Some(vec![0; OUT_INITIAL]),
            out_len: 0,
            side_out: Vec::new(),
            peer_closed: false,
            close_sent: false,
            failure: None,
            counters: None,
        }
    }

    /// Unprocessed ciphertext bytes.
    pub(crate) fn pending_in(&self) -> usize {
        self.in_end - self.in_start
    }

    /// Whether ciphertext waits to be sent.
    pub(crate) fn has_output(&self) -> bool {
        self.out_len > 0 || !self.side_out.is_empty()
    }

    /// Delivers buffered plaintext to `sink`; returns how much it took.
    pub(crate) fn take_plain(&mut self, sink: &mut dyn FnMut(&[u8]) -> usize) -> usize {
        if self.plain_start >= self.plain.len() {
            return 0;
        }
        let n = sink(&self.plain[self.plain_start..]);
        self.plain_start += n;
        if self.plain_start >= self.plain.len() {
            self.plain.clear();
            self.plain_start = 0;
        }
        n
    }

    /// Whether application data can be encrypted now: no fatal error, no close_notify sent,
    /// and the send buffer is here (it is missing only when a write future was dropped while
    /// its record was on the way, which leaves the stream unusable).
    pub(crate) fn writable(&mut self) -> Result<(), Failure> {
        if let Some(f) = &self.failure {
            return Err(f.clone());
        }
        if self.close_sent {
            return Err(Failure::Io(io::ErrorKind::BrokenPipe, "TLS stream already shut down for writing".into()));
        }
        if self.tls_out.is_none() {
            return Err(self.fail(Failure::Io(
                io::ErrorKind::BrokenPipe,
                "an abandoned write left a TLS record half sent; the stream cannot go on".into(),
            )));
        }
        Ok(())
    }

    pub(crate) fn set_failure(&mut self, f: Failure) {
        self.failure.get_or_insert(f);
    }

    /// Records the first fatal failure (and counts it, after the handshake); returns the one
    /// recorded.
    fn fail(&mut self, f: Failure) -> Failure {
        if self.failure.is_none() {
            if let Some((metrics, core)) = &self.counters {
                metrics.core(*core).broke(crate::TlsError::from(f.clone()).reason());
            }
        }
        self.failure.get_or_insert(f).clone()
    }

    /// Processes received records towards `goal` until it is reached or needs the socket.
    pub(crate) fn drive(&mut self, mut goal: Goal<'_>) -> Result<Reached, Failure> {
        if let Some(f) = &self.failure {
            return Err(f.clone());
        }
        // Bounded: every turn either consumes input, emits output, or returns.
        loop {
            // After a TLS 1.2 handshake rustls emits a record of its own accord only to refuse
            // a renegotiation (a `no_renegotiation` warning; it would answer a second attempt
            // with an error). corepin ends the connection at the first one instead of leaving
            // a client that asked for a new handshake waiting for it.
            // (The handshake's own last flight is encoded while `Goal::Handshake` drives it.)
            let tls12_traffic = !matches!(goal, Goal::Handshake)
                && !self.conn.is_handshaking()
                && self.conn.protocol_version() == Some(ProtocolVersion::TLSv1_2);
            let mut renegotiation = false;
            let Session {
                conn,
                tls_in,
                in_start,
                in_end,
                plain,
                plain_start,
                tls_out,
                out_len,
                side_out,
                peer_closed,
                ..
            } = self;
            let UnbufferedStatus { mut discard, state } = conn.process_tls_records(&mut tls_in[*in_start..*in_end]);
            let state = match state {
                Ok(s) => s,
                Err(e) => {
                    self.consume(discard);
                    return Err(self.fail(Failure::Tls(e)));
                }
            };
            let mut out = OutTarget { tls_out, out_len, side_out };
            let reached: Option<Reached> = match state {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = match record {
                            Ok(r) => r,
                            Err(e) => {
                                self.consume(discard);
                                return Err(self.fail(Failure::Tls(e)));
                            }
                        };
                        discard += record.discard;
                        let taken = match &mut goal {
                            Goal::Read(sink) if *plain_start >= plain.len() => sink(record.payload),
                            _ => 0,
                        };
                        if taken < record.payload.len() {
                            if plain.capacity() == 0 {
                                plain.reserve_exact(IN_CAP);
                            }
                            plain.extend_from_slice(&record.payload[taken..]);
                        }
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut enc) => {
                    let r = out.put(|b| match enc.encode(b) {
                        Ok(n) => Ok(n),
                        Err(EncodeError::InsufficientSize(s)) => Err(Some(s.required_size)),
                        Err(EncodeError::AlreadyEncoded) => Err(None),
                    });
                    match r {
                        Ok(_) => {
                            renegotiation = tls12_traffic;
                            None
                        }
                        Err(()) => {
                            self.consume(discard);
                            return Err(self.fail(Failure::Io(io::ErrorKind::Other, "TLS record encoded twice".into())));
                        }
                    }
                }
                ConnectionState::TransmitTlsData(t) => {
                    // The bytes stay in `tls_out` until the caller sends them; rustls only
                    // needs to know they will not be encoded again.
                    t.done();
                    matches!(goal, Goal::Handshake).then_some(Reached::Transmit)
                }
                ConnectionState::BlockedHandshake => Some(Reached::NeedInput),
                ConnectionState::PeerClosed => {
                    *peer_closed = true;
                    // Writing after the peer's close_notify is still allowed (half close): the
                    // next pass gives `WriteTraffic` to a writer.
                    matches!(goal, Goal::Handshake | Goal::Read(_)).then_some(Reached::PeerClosed)
                }
                ConnectionState::Closed => {
                    // Both sides sent close_notify: nothing more can be written or read.
                    *peer_closed = true;
                    match goal {
                        Goal::Handshake | Goal::Read(_) => Some(Reached::PeerClosed),
                        Goal::Close => Some(Reached::CloseQueued),
                        Goal::Write(_) => {
                            self.consume(discard);
                            return Err(Failure::Io(io::ErrorKind::BrokenPipe, "TLS stream already closed".into()));
                        }
                    }
                }
                ConnectionState::WriteTraffic(mut w) => match &mut goal {
                    // Whether the handshake is over is read once `w` is gone (it borrows the
                    // connection); see below.
                    Goal::Handshake => Some(Reached::Handshaken),
                    Goal::Read(_) => Some(Reached::NeedInput),
                    Goal::Write(data) => {
                        // As much as fits in the free space with every record's overhead, so
                        // the buffer never grows for application data.
                        if data.len() + 2 * RECORD_OVERHEAD_MAX > out.free() {
                            out.grow_to(OUT_CAP);
                        }
                        let free = out.free();
                        let budget = free.saturating_sub(RECORD_OVERHEAD_MAX * (free / RECORD_PLAIN_MAX + 1));
                        let n = data.len().min(WRITE_PLAIN_MAX).min(budget);
                        if n == 0 {
                            Some(Reached::Encrypted(0))
                        } else {
                            let r = out.put(|b| match w.encrypt(&data[..n], b) {
                                Ok(k) => Ok(k),
                                Err(EncryptError::InsufficientSize(s)) => Err(Some(s.required_size)),
                                Err(_) => Err(None),
                            });
                            match r {
                                Ok(_) => Some(Reached::Encrypted(n)),
                                Err(()) => {
                                    self.consume(discard);
                                    return Err(self.fail(Failure::Io(
                                        io::ErrorKind::Other,
                                        "TLS traffic keys exhausted; the connection must close".into(),
                                    )));
                                }
                            }
                        }
                    }
                    Goal::Close => {
                        let r = out.put(|b| match w.queue_close_notify(b) {
                            Ok(k) => Ok(k),
                            Err(EncryptError::InsufficientSize(s)) => Err(Some(s.required_size)),
                            Err(_) => Err(None),
                        });
                        match r {
                            Ok(_) => Some(Reached::CloseQueued),
                            Err(()) => {
                                self.consume(discard);
                                return Err(self.fail(Failure::Io(
                                    io::ErrorKind::Other,
                                    "TLS close_notify could not be encrypted".into(),
                                )));
                            }
                        }
                    }
                },
                // Early data is never enabled (max_early_data_size stays 0); any other new
                // state is a condition this layer does not know how to continue from.
                _ => {
                    self.consume(discard);
                    return Err(self.fail(Failure::Io(io::ErrorKind::Other, "unexpected TLS state".into())));
                }
            };
            self.consume(discard);
            if renegotiation {
                // The warning stays queued in `tls_out`, to be sent before the close.
                return Err(self.fail(Failure::Renegotiation));
            }
            match reached {
                // A TLS 1.3 server may send before the client's Finished has arrived.
                Some(Reached::Handshaken) if self.conn.is_handshaking() => return Ok(Reached::NeedInput),
                Some(r) => return Ok(r),
                None => {}
            }
        }
    }

    /// After a fatal TLS error rustls has queued an alert for the peer: encodes it into
    /// `tls_out` (best effort) so the caller can send it before closing. rustls is handed the
    /// unprocessed input again, not an empty buffer: it may still hold progress into that input
    /// (a handshake message spanning records), and it slices the buffer by that progress.
    pub(crate) fn encode_alert(&mut self) {
        for _ in 0..4 {
            let Session { conn, tls_in, in_start, in_end, tls_out, out_len, side_out, .. } = self;
            let UnbufferedStatus { state, .. } = conn.process_tls_records(&mut tls_in[*in_start..*in_end]);
            let mut out = OutTarget { tls_out, out_len, side_out };
            match state {
                Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                    let _ = out.put(|b| match enc.encode(b) {
                        Ok(n) => Ok(n),
                        Err(EncodeError::InsufficientSize(s)) => Err(Some(s.required_size)),
                        Err(EncodeError::AlreadyEncoded) => Err(None),
                    });
                }
                Ok(ConnectionState::TransmitTlsData(t)) => t.done(),
                _ => return,
            }
        }
    }

    fn consume(&mut self, n: usize) {
        if n > 0 {
            self.in_start = (self.in_start + n).min(self.in_end);
            self.in_gen = self.in_gen.wrapping_add(1);
            if self.in_start == self.in_end {
                self.in_start = 0;
                self.in_end = 0;
            }
        }
    }

    /// Readies `spare` for a socket read: copies the unprocessed bytes to its front and returns
    /// the generation and length of that copy, which [`absorb`](Self::absorb) takes back with
    /// the read's count. Fails (and records) `Oversized` when unprocessed bytes fill it.
    pub(crate) fn stage_read(&mut self, spare: &mut [u8]) -> Result<(u64, usize), Failure> {
        let leftover = self.pending_in();
        if leftover >= spare.len() {
            return Err(self.fail(Failure::Oversized));
        }
        spare[..leftover].copy_from_slice(&self.tls_in[self.in_start..self.in_end]);
        Ok((self.in_gen, leftover))
    }

    /// Takes the received bytes a read put into `rx`: `rx[..leftover]` is the copy of the
    /// unprocessed bytes made before the read (taken when `gen` still matches), followed by
    /// `n` new bytes. The buffers swap, so the new bytes are not copied again.
    pub(crate) fn absorb(&mut self, rx: &mut Vec<u8>, gen: u64, leftover: usize, n: usize) -> Result<(), Failure> {
        if gen == self.in_gen && leftover == self.pending_in() {
            std::mem::swap(&mut self.tls_in, rx);
            self.in_start = 0;
            self.in_end = leftover + n;
        } else {
            // The unprocessed range moved while the read was in flight (the other half
            // processed records): append the new bytes to what is there now.
            let pending = self.pending_in();
            if pending + n > self.tls_in.len() {
                return Err(self.fail(Failure::Oversized));
            }
            self.tls_in.copy_within(self.in_start..self.in_end, 0);
            self.tls_in[pending..pending + n].copy_from_slice(&rx[leftover..leftover + n]);
            self.in_start = 0;
            self.in_end = pending + n;
        }
        self.in_gen = self.in_gen.wrapping_add(1);
        Ok(())
    }

    /// Returns the send buffer after a socket write and queues what was encoded meanwhile.
    pub(crate) fn return_out(&mut self, mut buf: Vec<u8>) {
        self.out_len = 0;
        if !self.side_out.is_empty() {
            let n = self.side_out.len();
            if buf.len() < n {
                buf.resize(n, 0);
            }
            buf[..n].copy_from_slice(&self.side_out);
            self.side_out.clear();
            self.out_len = n;
        }
        self.tls_out = Some(buf);
    }
}

/// Where encoded records go: `tls_out` when it is here, `side_out` while it is lent.
struct OutTarget<'a> {
    tls_out: &'a mut Option<Vec<u8>>,
    out_len: &'a mut usize,
    side_out: &'a mut Vec<u8>,
}

impl OutTarget<'_> {
    /// Grows `tls_out` (when it is here) to `cap` bytes.
    fn grow_to(&mut self, cap: usize) {
        if let Some(b) = self.tls_out.as_mut() {
            if b.len() < cap {
                b.resize(cap, 0);
            }
        }
    }

    /// Free bytes in `tls_out` (0 while it is lent: nothing is encrypted then).
    fn free(&self) -> usize {
        self.tls_out.as_ref().map_or(0, |b| b.len() - *self.out_len)
    }

    /// Runs `f` on the free space; `f` fails with `Some(required)` when the space is too
    /// small (the buffer then grows once: a handshake flight larger than the buffer) or
    /// `None` when it cannot encode at all.
    fn put(&mut self, mut f: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>) -> Result<usize, ()> {
        for _ in 0..2 {
            let (buf, len) = match self.tls_out.as_mut() {
                Some(b) => (b, &mut *self.out_len),
                None => {
                    // side_out is sized as it is used; records land there rarely.
                    let b = &mut *self.side_out;
                    let used = b.len();
                    b.resize(used + IN_CAP, 0);
                    let r = f(&mut b[used..]);
                    match r {
                        Ok(n) => {
                            b.truncate(used + n);
                            return Ok(n);
                        }
                        Err(Some(required)) => {
                            b.resize(used + required, 0);
                            let r = f(&mut b[used..]);
                            let n = r.unwrap_or(0);
                            b.truncate(used + n);
                            return r.map_err(|_| ());
                        }
                        Err(None) => {
                            b.truncate(used);
                            return Err(());
                        }
                    }
                }
            };
            match f(&mut buf[*len..]) {
                Ok(n) => {
                    *len += n;
                    return Ok(n);
                }
                Err(Some(required)) => {
                    let want = *len + required;
                    if buf.len() < want {
                        buf.resize(want, 0);
                    }
                }
                Err(None) => return Err(()),
            }
        }
        Err(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn session() -> Session {
        let (certs, _) = crate::CertStore::self_signed(&["localhost"]).unwrap();
        let cfg = crate::server_config(Arc::new(certs), Vec::new()).unwrap();
        Session::new(UnbufferedServerConnection::new(Arc::new(cfg)).unwrap())
    }

    #[test]
    fn a_completed_read_swaps_buffers_when_the_tail_did_not_move() {
        let mut s = session();
        s.tls_in[..5].copy_from_slice(b"abcde");
        s.in_start = 2; // "ab" processed, "cde" pending
        s.in_end = 5;
        let (gen, leftover) = (s.in_gen, s.pending_in());
        let mut rx = vec![0u8; IN_CAP];
        rx[..leftover].copy_from_slice(b"cde");
        rx[leftover..leftover + 3].copy_from_slice(b"fgh");
        let rx_ptr = rx.as_ptr();
        s.absorb(&mut rx, gen, leftover, 3).unwrap();
        assert_eq!(&s.tls_in[s.in_start..s.in_end], b"cdefgh");
        assert_eq!(s.tls_in.as_ptr(), rx_ptr, "the read's buffer became the session's: no copy");
    }

    #[test]
    fn a_completed_read_appends_when_the_tail_moved_meanwhile() {
        let mut s = session();
        s.tls_in[..5].copy_from_slice(b"abcde");
        s.in_end = 5;
        let (gen, leftover) = (s.in_gen, s.pending_in());
        let mut rx = vec![0u8; IN_CAP];
        rx[..leftover].copy_from_slice(b"abcde");
        rx[leftover..leftover + 2].copy_from_slice(b"fg");
        s.consume(3); // the other half processed "abc" while the read was in flight
        s.absorb(&mut rx, gen, leftover, 2).unwrap();
        assert_eq!(&s.tls_in[s.in_start..s.in_end], b"defg");
    }

    #[test]
    fn records_encoded_while_the_send_buffer_is_lent_follow_it() {
        let mut s = session();
        let lent = s.tls_out.take().unwrap();
        let mut out = OutTarget { tls_out: &mut s.tls_out, out_len: &mut s.out_len, side_out: &mut s.side_out };
        out.put(|b| {
            b[..3].copy_from_slice(b"xyz");
            Ok(3)
        })
        .unwrap();
        assert_eq!(s.side_out, b"xyz");
        s.return_out(lent);
        assert!(s.side_out.is_empty());
        assert_eq!(&s.tls_out.as_ref().unwrap()[..s.out_len], b"xyz", "queued first, before new records");
    }

    #[test]
    fn garbage_fails_the_handshake_and_the_failure_sticks() {
        let mut s = session();
        let junk = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        s.tls_in[..junk.len()].copy_from_slice(junk);
        s.in_end = junk.len();
        let first = s.drive(Goal::Handshake).expect_err("not TLS");
        assert!(matches!(first, Failure::Tls(_)), "{first:?}");
        assert!(matches!(s.drive(Goal::Handshake), Err(Failure::Tls(_))), "later passes report it too");
        s.encode_alert();
        assert!(s.out_len > 0, "an alert is ready for the peer");
    }
}
