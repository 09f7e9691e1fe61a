//! The stream a service sees behind TLS: owned-buffer reads and writes of plaintext over any
//! [`ConnStream`], and its split into a read half and a write half.
//!
//! Owns the socket I/O of a TLS connection: reads ciphertext into the connection's receive
//! buffers, sends its send buffer, and hands the caller's plaintext to the session
//! (`session.rs`) between operations. Must not keep a `RefCell` borrow of the session across
//! an await: the read half may wait on the socket while the write half encrypts and sends.
//!
//! Reads decrypt straight into the caller's buffer where it has room (the rest of a record
//! waits in the session); writes encrypt from the caller's buffer into the connection's send
//! buffer, which goes to the socket as one write.

use std::cell::RefCell;
use std::io;
use std::os::fd::RawFd;
use std::rc::Rc;

use corepin_core::io::cancelled_error;
use corepin_core::{
    AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, BufResult, CancelToken, ConnStream, IoBuf, IoBufMut,
};
use rustls::{CipherSuite, HandshakeKind, ProtocolVersion};

use crate::session::{Failure, Goal, Reached, Session, IN_CAP};

/// What the handshake settled, for services and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// The protocol version (TLS 1.2 or 1.3).
    pub version: ProtocolVersion,
    /// The cipher suite.
    pub cipher_suite: CipherSuite,
    /// The application protocol chosen by ALPN, if any.
    pub alpn: Option<Vec<u8>>,
    /// Whether the session was resumed (a ticket) rather than a full handshake.
    pub resumed: bool,
}

impl TlsInfo {
    pub(crate) fn of(session: &Session) -> Option<TlsInfo> {
        let c = &session.conn;
        Some(TlsInfo {
            version: c.protocol_version()?,
            cipher_suite: c.negotiated_cipher_suite()?.suite(),
            alpn: c.alpn_protocol().map(<[u8]>::to_vec),
            resumed: matches!(c.handshake_kind(), Some(HandshakeKind::Resumed)),
        })
    }
}

/// A TLS connection over the stream `S` (usually corepin's TCP stream), as a
/// [`TlsAcceptor`](crate::TlsAcceptor) hands it to the service.
pub struct TlsStream<S> {
    io: S,
    rx: Option<Vec<u8>>,
    session: Rc<RefCell<Session>>,
    info: TlsInfo,
}

/// The read half of a split [`TlsStream`].
pub struct TlsReadHalf<R> {
    io: R,
    rx: Option<Vec<u8>>,
    session: Rc<RefCell<Session>>,
}

/// The write half of a split [`TlsStream`]: `shutdown` sends close_notify, then FIN.
pub struct TlsWriteHalf<W> {
    io: W,
    session: Rc<RefCell<Session>>,
}

impl<S> TlsStream<S> {
    pub(crate) fn new(io: S, rx: Vec<u8>, session: Session, info: TlsInfo) -> Self {
        Self { io, rx: Some(rx), session: Rc::new(RefCell::new(session)), info }
    }
    /// What the handshake settled.
    pub fn info(&self) -> &TlsInfo {
        &self.info
    }
    /// The stream under TLS.
    pub fn get_ref(&self) -> &S {
        &self.io
    }
}

impl<S: ConnStream> AsyncReadRent for TlsStream<S> {
    async fn read<B: IoBufMut>(&mut self, buf: B) -> BufResult<usize, B> {
        let r = read_plain(&mut self.io, &mut self.rx, &self.session, buf, None).await;
        self.send_pending().await;
        r
    }
    async fn read_cancelable<B: IoBufMut>(&mut self, buf: B, cancel: &CancelToken) -> BufResult<usize, B> {
        let r = read_plain(&mut self.io, &mut self.rx, &self.session, buf, Some(cancel)).await;
        self.send_pending().await;
        r
    }
}

impl<S: ConnStream> TlsStream<S> {
    /// Sends what reading produced for the peer (a key update, an alert): the unsplit stream
    /// owns the socket's write side too. Errors surface on the next write.
    async fn send_pending(&mut self) {
        let pending = self.session.borrow().has_output();
        if pending {
            let _ = flush(&mut self.io, &self.session).await;
        }
    }
}

impl<S: ConnStream> AsyncWriteRent for TlsStream<S> {
    async fn write<B: IoBuf>(&mut self, buf: B) -> BufResult<usize, B> {
        write_plain(&mut self.io, &self.session, buf).await
    }
    async fn writev<B: IoBuf>(&mut self, bufs: Vec<B>) -> BufResult<usize, Vec<B>> {
        writev_plain(&mut self.io, &self.session, bufs).await
    }
    async fn shutdown(&mut self) -> io::Result<()> {
        shutdown_tls(&mut self.io, &self.session).await
    }
}

impl<S: ConnStream> ConnStream for TlsStream<S> {
    type ReadHalf = TlsReadHalf<S::ReadHalf>;
    type WriteHalf = TlsWriteHalf<S::WriteHalf>;

    /// Splits the stream under TLS, and shares the session between the halves (one core, an
    /// `Rc`). A read half waiting for the peer holds no borrow, so the write half encrypts and
    /// sends meanwhile. Records the read half must answer (a TLS 1.3 key update) are sent
    /// with the write half's next write or shutdown.
    fn into_split(self) -> (Self::ReadHalf, Self::WriteHalf) {
        let (r, w) = self.io.into_split();
        (
            TlsReadHalf { io: r, rx: self.rx, session: Rc::clone(&self.session) },
            TlsWriteHalf { io: w, session: self.session },
        )
    }
    fn as_raw_fd(&self) -> RawFd {
        self.io.as_raw_fd()
    }
    /// Every byte must pass through TLS (no kernel TLS here), so never.
    fn can_send_file(&self) -> bool {
        false
    }
}

impl<R: AsyncReadRent> AsyncReadRent for TlsReadHalf<R> {
    async fn read<B: IoBufMut>(&mut self, buf: B) -> BufResult<usize, B> {
        read_plain(&mut self.io, &mut self.rx, &self.session, buf, None).await
    }
    async fn read_cancelable<B: IoBufMut>(&mut self, buf: B, cancel: &CancelToken) -> BufResult<usize, B> {
        read_plain(&mut self.io, &mut self.rx, &self.session, buf, Some(cancel)).await
    }
}

impl<W: AsyncWriteRent> AsyncWriteRent for TlsWriteHalf<W> {
    async fn write<B: IoBuf>(&mut self, buf: B) -> BufResult<usize, B> {
        write_plain(&mut self.io, &self.session, buf).await
    }
    async fn writev<B: IoBuf>(&mut self, bufs: Vec<B>) -> BufResult<usize, Vec<B>> {
        writev_plain(&mut self.io, &self.session, bufs).await
    }
    async fn shutdown(&mut self) -> io::Result<()> {
        shutdown_tls(&mut self.io, &self.session).await
    }
}

/// Copies `src` into `buf` at `at`.
fn copy_into<B: IoBufMut>(buf: &mut B, at: usize, src: &[u8]) {
    assert!(at + src.len() <= buf.bytes_total(), "copy past the end of a read buffer");
    // SAFETY: the range [at, at + src.len()) lies within bytes_total (checked above), which
    // the IoBufMut contract makes valid for writes through stable_mut_ptr; `src` is the
    // session's or rustls's own memory, never the caller's buffer, so they do not overlap.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), buf.stable_mut_ptr().add(at), src.len()) }
}

/// Reads plaintext into `buf`: what is already decrypted first, then records as they arrive.
/// `Ok(0)` is the peer's close_notify; an end of stream without one is `UnexpectedEof`.
pub(crate) async fn read_plain<Rd: AsyncReadRent, B: IoBufMut>(
    io: &mut Rd,
    rx: &mut Option<Vec<u8>>,
    session: &RefCell<Session>,
    mut buf: B,
    cancel: Option<&CancelToken>,
) -> BufResult<usize, B> {
    let room = buf.bytes_total();
    if room == 0 {
        return BufResult(Ok(0), buf);
    }
    loop {
        let mut filled = 0;
        let outcome = {
            let mut s = session.borrow_mut();
            let mut sink = |src: &[u8]| {
                let n = src.len().min(room - filled);
                copy_into(&mut buf, filled, &src[..n]);
                filled += n;
                n
            };
            let took = s.take_plain(&mut sink);
            if took == 0 && !s.peer_closed {
                s.drive(Goal::Read(&mut sink)).map(Some)
            } else {
                Ok(None)
            }
        };
        if filled > 0 {
            // SAFETY: `copy_into` wrote the first `filled` bytes, and filled <= bytes_total.
            unsafe { buf.set_init(filled) };
            return BufResult(Ok(filled), buf);
        }
        match outcome {
            Err(f) => return BufResult(Err(f.to_io()), buf),
            Ok(None) | Ok(Some(Reached::PeerClosed)) => return BufResult(Ok(0), buf),
            Ok(Some(_)) => {}
        }
        if cancel.is_some_and(CancelToken::is_cancelled) {
            return BufResult(Err(cancelled_error()), buf);
        }
        match receive(io, rx, session, cancel).await {
            Ok(0) => {
                let e = io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed the connection without close_notify");
                return BufResult(Err(e), buf);
            }
            Ok(_) => {}
            Err(e) => return BufResult(Err(e), buf),
        }
    }
}

/// Reads ciphertext from `io` into the session. The bytes not yet processed are copied to the
/// front of the spare receive buffer `rx` before the read (the compaction any receive buffer
/// needs), the read appends to them, and the two buffers then swap; the session's own buffer
/// stays untouched meanwhile, so the write half can go on using the session.
pub(crate) async fn receive<Rd: AsyncReadRent>(
    io: &mut Rd,
    rx: &mut Option<Vec<u8>>,
    session: &RefCell<Session>,
    cancel: Option<&CancelToken>,
) -> io::Result<usize> {
    // Only missing when a read future was dropped mid-read: that connection is broken anyway,
    // but a fresh buffer keeps this from panicking.
    let mut spare = rx.take().unwrap_or_else(|| vec![0; IN_CAP]);
    let staged = session.borrow_mut().stage_read(&mut spare);
    let (gen, leftover) = match staged {
        Ok(v) => v,
        Err(f) => {
            *rx = Some(spare);
            return Err(f.to_io());
        }
    };
    let len = spare.len();
    let BufResult(res, slice) = match cancel {
        Some(token) => io.read_cancelable(spare.slice(leftover..len), token).await,
        None => io.read(spare.slice(leftover..len)).await,
    };
    let mut spare = slice.into_inner();
    let res = match res {
        Ok(n) if n > 0 => session.borrow_mut().absorb(&mut spare, gen, leftover, n).map(|()| n).map_err(|f| f.to_io()),
        other => other,
    };
    *rx = Some(spare);
    res
}

/// Sends the session's pending ciphertext, and what was encoded while it was on the way.
pub(crate) async fn flush<W: AsyncWriteRent>(io: &mut W, session: &RefCell<Session>) -> io::Result<()> {
    loop {
        let (out, len) = {
            let mut s = session.borrow_mut();
            if !s.has_output() {
                return Ok(());
            }
            match s.tls_out.take() {
                Some(out) => (out, s.out_len),
                None => return Err(s.writable().err().map_or_else(|| io::ErrorKind::BrokenPipe.into(), |f| f.to_io())),
            }
        };
        let BufResult(res, slice) = io.write_all(out.slice(0..len)).await;
        let mut s = session.borrow_mut();
        s.return_out(slice.into_inner());
        if let Err(e) = res {
            s.set_failure(Failure::Io(e.kind(), e.to_string()));
            return Err(e);
        }
    }
}

/// Encrypts a prefix of `data` (up to four records) into the send buffer, making room first
/// when it is full; returns how many plaintext bytes it took.
async fn encrypt<W: AsyncWriteRent>(io: &mut W, session: &RefCell<Session>, data: &[u8]) -> io::Result<usize> {
    for _ in 0..2 {
        let r = {
            let mut s = session.borrow_mut();
            s.writable().and_then(|()| s.drive(Goal::Write(data)))
        };
        match r {
            Ok(Reached::Encrypted(0)) => flush(io, session).await?,
            Ok(Reached::Encrypted(n)) => return Ok(n),
            Ok(other) => return Err(io::Error::other(format!("TLS write stopped at {other:?}"))),
            Err(f) => return Err(f.to_io()),
        }
    }
    Err(io::Error::other("TLS send buffer has no room after a flush"))
}

async fn write_plain<W: AsyncWriteRent, B: IoBuf>(
    io: &mut W,
    session: &RefCell<Session>,
    buf: B,
) -> BufResult<usize, B> {
    if buf.bytes_init() == 0 {
        return BufResult(Ok(0), buf);
    }
    let n = match encrypt(io, session, buf.as_init_slice()).await {
        Ok(n) => n,
        Err(e) => return BufResult(Err(e), buf),
    };
    match flush(io, session).await {
        Ok(()) => BufResult(Ok(n), buf),
        Err(e) => BufResult(Err(e), buf),
    }
}

/// Encrypts the buffers in order into one send (each buffer its own records), as much as the
/// send buffer holds, then sends.
async fn writev_plain<W: AsyncWriteRent, B: IoBuf>(
    io: &mut W,
    session: &RefCell<Session>,
    bufs: Vec<B>,
) -> BufResult<usize, Vec<B>> {
    let mut total = 0;
    'bufs: for b in &bufs {
        let data = b.as_init_slice();
        let mut at = 0;
        while at < data.len() {
            let r = {
                let mut s = session.borrow_mut();
                s.writable().and_then(|()| s.drive(Goal::Write(&data[at..])))
            };
            match r {
                Ok(Reached::Encrypted(0)) if total > 0 => break 'bufs,
                Ok(Reached::Encrypted(0)) => match encrypt(io, session, &data[at..]).await {
                    Ok(n) => {
                        at += n;
                        total += n;
                    }
                    Err(e) => return BufResult(Err(e), bufs),
                },
                Ok(Reached::Encrypted(n)) => {
                    at += n;
                    total += n;
                }
                Ok(other) => return BufResult(Err(io::Error::other(format!("TLS write stopped at {other:?}"))), bufs),
                Err(f) => return BufResult(Err(f.to_io()), bufs),
            }
        }
    }
    match flush(io, session).await {
        Ok(()) => BufResult(Ok(total), bufs),
        Err(e) => BufResult(Err(e), bufs),
    }
}

/// Sends close_notify (once), then shuts the socket's write side down.
async fn shutdown_tls<W: AsyncWriteRent>(io: &mut W, session: &RefCell<Session>) -> io::Result<()> {
    let queued = {
        let mut s = session.borrow_mut();
        if s.close_sent || s.failure.is_some() || s.tls_out.is_none() {
            false
        } else {
            let r = s.drive(Goal::Close);
            s.close_sent = true;
            r.is_ok()
        }
    };
    if queued {
        flush(io, session).await?;
    }
    io.shutdown().await
}
