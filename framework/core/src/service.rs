//! The service abstraction: a `Send + Sync` factory crosses threads once and builds one
//! service instance per core; the instance stays on its core and answers requests with plain
//! `async fn` (no boxing). A service is generic over the runtime and over its connection's
//! stream, so one implementation runs on every backend and behind any [`Acceptor`] (clear
//! text, TLS), checked at compile time.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use std::marker::PhantomData;
use std::os::fd::{BorrowedFd, RawFd};

use crate::buf::{BufResult, IoBuf, IoBufMut};
use crate::io::{AsyncReadRent, AsyncWriteRent, CancelToken};
use crate::pool::PooledBuf;
use crate::runtime::{Runtime, TcpStream};
use crate::worker::{CoreCounters, Worker};

/// Answers requests of type `Req`.
pub trait Service<Req> {
    /// What a call produces.
    type Response;
    /// What a call fails with.
    type Error: std::fmt::Display;
    /// Handles one request.
    fn call(&self, req: Req) -> impl Future<Output = Result<Self::Response, Self::Error>>;
}

/// A connection's byte stream as a service sees it: owned-buffer reads and writes, plus what a
/// service may ask of the transport underneath. The plain TCP stream ([`Stream`]) and any layer
/// an [`Acceptor`] puts between the socket and the service (TLS) implement it, so a service
/// written against it runs over either without knowing which.
pub trait ConnStream: AsyncReadRent + AsyncWriteRent + 'static {
    /// The read half [`into_split`](Self::into_split) gives.
    type ReadHalf: AsyncReadRent + 'static;
    /// The write half [`into_split`](Self::into_split) gives.
    type WriteHalf: AsyncWriteRent + 'static;

    /// Splits the stream into halves that two tasks on this core drive at once (see
    /// [`TcpStream::into_split`]); with them [`copy_bidirectional`](crate::copy::copy_bidirectional)
    /// relays in both directions. `shutdown` on (or dropping) the write half sends end of
    /// stream to the peer while the read half keeps reading. A layer over the socket (TLS)
    /// splits its own state and the stream under it.
    fn into_split(self) -> (Self::ReadHalf, Self::WriteHalf);

    /// The descriptor of the socket under the stream: deadlines and drain shut it down.
    fn as_raw_fd(&self) -> RawFd;

    /// Whether [`send_file`](Self::send_file) moves file bytes to the peer as they are: true
    /// for a plain socket, false for a layer that must see every byte (TLS without kernel TLS).
    fn can_send_file(&self) -> bool {
        false
    }

    /// Sends up to `len` bytes of `file` from `offset` straight from the page cache (see
    /// [`TcpStream::send_file`]). Streams that cannot fail with `Unsupported`; callers ask
    /// [`can_send_file`](Self::can_send_file) first and read + write instead.
    fn send_file(&mut self, file: BorrowedFd<'_>, offset: u64, len: usize) -> impl Future<Output = io::Result<usize>> {
        let _ = (file, offset, len);
        async { Err(io::Error::new(io::ErrorKind::Unsupported, "this stream cannot send files by sendfile(2)")) }
    }

    /// Writes `buf` by zero-copy send where the transport has one (see
    /// [`TcpStream::write_zc`]); otherwise, and by default, a plain write.
    fn write_zc<B: IoBuf>(&mut self, buf: B) -> impl Future<Output = BufResult<usize, B>> {
        self.write(buf)
    }

    /// Writes all of `buf` by [`write_zc`](Self::write_zc) (a short send is continued), like
    /// [`write_all`](crate::AsyncWriteRentExt::write_all) for plain writes.
    fn write_all_zc<B: IoBuf>(&mut self, buf: B) -> impl Future<Output = BufResult<usize, B>> {
        async move {
            let len = buf.bytes_init();
            let mut buf = buf;
            let mut written = 0;
            while written < len {
                let BufResult(res, slice) = self.write_zc(buf.slice(written..len)).await;
                buf = slice.into_inner();
                match res {
                    Ok(0) => {
                        let e = io::Error::new(io::ErrorKind::WriteZero, "peer accepted no more bytes");
                        return BufResult(Err(e), buf);
                    }
                    Ok(n) => written += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return BufResult(Err(e), buf),
                }
            }
            BufResult(Ok(written), buf)
        }
    }

    /// Reads into a buffer lent by the core (see [`TcpStream::read_pooled`]); an empty buffer
    /// is end of stream.
    fn read_pooled(&mut self) -> impl Future<Output = io::Result<PooledBuf>> {
        crate::pool::read_fallback(self)
    }
}

/// Builds the per-core instance of a connection service; crosses threads, so `Send + Sync`.
/// The service is generic over the runtime `R` and over the stream `S` its connections carry
/// (a plain TCP [`Stream`], or what an [`Acceptor`] made of it), so one implementation serves
/// every backend, in clear text or behind TLS.
pub trait ServiceFactory: Send + Sync + 'static {
    /// The per-core service for runtime `R` and connection stream `S`.
    type Service<R: Runtime, S: ConnStream>: Service<Connection<R, S>, Response = ()> + 'static;
    /// Why a per-core instance could not be built.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Builds the instance for the worker it is called on (after pinning, so what it
    /// allocates is local to that core). An error stops that worker, and so the server, with
    /// the message.
    fn new_service<R: Runtime, S: ConnStream>(&self, worker: &Worker) -> Result<Self::Service<R, S>, Self::Error>;
}

/// Turns an accepted TCP stream into the stream a service sees: the identity ([`Plain`]), or
/// a handshake (TLS). It runs in the connection's own task, so a slow handshake never holds
/// up the accept loop. One acceptor serves every core (configuration is shared; per-core
/// state belongs in thread-locals or the worker).
pub trait Acceptor: Send + Sync + 'static {
    /// The stream services see.
    type Stream<R: Runtime>: ConnStream;
    /// Why a connection was not accepted (logged at debug level; the connection is closed).
    type Error: std::fmt::Display;
    /// Accepts `stream` from `peer` on `worker`'s core.
    fn accept<R: Runtime>(
        &self,
        stream: Stream<R::TcpStream>,
        peer: SocketAddr,
        worker: &Worker,
    ) -> impl Future<Output = Result<Self::Stream<R>, Self::Error>>;
}

/// The clear-text acceptor: services see the TCP stream itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct Plain;

impl Acceptor for Plain {
    type Stream<R: Runtime> = Stream<R::TcpStream>;
    type Error = std::convert::Infallible;
    async fn accept<R: Runtime>(
        &self,
        stream: Stream<R::TcpStream>,
        _peer: SocketAddr,
        _worker: &Worker,
    ) -> Result<Stream<R::TcpStream>, std::convert::Infallible> {
        Ok(stream)
    }
}

/// A connection accepted on this core, carrying stream `S` (by default the plain TCP stream of
/// runtime `R`).
pub struct Connection<R: Runtime, S = Stream<<R as Runtime>::TcpStream>> {
    /// The stream.
    pub stream: S,
    /// The peer.
    pub peer: SocketAddr,
    /// The worker it belongs to.
    pub worker: Worker,
    _runtime: PhantomData<fn() -> R>,
}

impl<R: Runtime, S> Connection<R, S> {
    /// A connection over `stream` from `peer`, served on `worker`'s core.
    pub fn new(stream: S, peer: SocketAddr, worker: Worker) -> Self {
        Self { stream, peer, worker, _runtime: PhantomData }
    }
}

/// A stream that adds what it reads and writes to its core's byte counters. It reaches them
/// through the core-local worker handle, so a connection touches no cross-core refcount.
pub struct Stream<S> {
    inner: S,
    worker: Worker,
}

impl<S> Stream<S> {
    /// Wraps `inner`, counting into `worker`'s core counters.
    pub fn new(inner: S, worker: Worker) -> Self {
        Self { inner, worker }
    }
    /// The raw stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
    /// The raw stream, mutably (bytes moved through it directly are not counted).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
    /// Adds `n` sent bytes (for transfers that bypass `write`, such as splice).
    pub fn count_out(&self, n: usize) {
        CoreCounters::add(&self.worker.counters().bytes_out, n as u64);
    }
    fn count_in(&self, n: usize) {
        CoreCounters::add(&self.worker.counters().bytes_in, n as u64);
    }
}

impl<S: AsyncReadRent> AsyncReadRent for Stream<S> {
    async fn read<B: IoBufMut>(&mut self, buf: B) -> BufResult<usize, B> {
        let r = self.inner.read(buf).await;
        if let Ok(n) = r.0 {
            self.count_in(n);
        }
        r
    }
    async fn read_cancelable<B: IoBufMut>(&mut self, buf: B, cancel: &CancelToken) -> BufResult<usize, B> {
        let r = self.inner.read_cancelable(buf, cancel).await;
        if let Ok(n) = r.0 {
            self.count_in(n);
        }
        r
    }
}

impl<S: AsyncWriteRent> AsyncWriteRent for Stream<S> {
    async fn write<B: IoBuf>(&mut self, buf: B) -> BufResult<usize, B> {
        let r = self.inner.write(buf).await;
        if let Ok(n) = r.0 {
            self.count_out(n);
        }
        r
    }
    async fn writev<B: IoBuf>(&mut self, bufs: Vec<B>) -> BufResult<usize, Vec<B>> {
        let r = self.inner.writev(bufs).await;
        if let Ok(n) = r.0 {
            self.count_out(n);
        }
        r
    }
    fn shutdown(&mut self) -> impl Future<Output = io::Result<()>> {
        self.inner.shutdown()
    }
}

impl<S: TcpStream> ConnStream for Stream<S> {
    type ReadHalf = ReadHalf<S::ReadHalf>;
    type WriteHalf = WriteHalf<S::WriteHalf>;

    /// Splits the socket with the engine's own split ([`TcpStream::into_split`]); both halves
    /// still count into this core's byte counters.
    fn into_split(self) -> (ReadHalf<S::ReadHalf>, WriteHalf<S::WriteHalf>) {
        let (r, w) = self.inner.into_split();
        (Stream::new(r, self.worker.clone()), Stream::new(w, self.worker))
    }
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
    fn can_send_file(&self) -> bool {
        true
    }
    async fn send_file(&mut self, file: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<usize> {
        let n = self.inner.send_file(file, offset, len).await?;
        self.count_out(n);
        Ok(n)
    }
    async fn write_zc<B: IoBuf>(&mut self, buf: B) -> BufResult<usize, B> {
        let r = self.inner.write_zc(buf).await;
        if let Ok(n) = r.0 {
            self.count_out(n);
        }
        r
    }
    async fn read_pooled(&mut self) -> io::Result<PooledBuf> {
        let buf = self.inner.read_pooled().await?;
        self.count_in(buf.len());
        Ok(buf)
    }
}

/// The read half of a split [`Stream`]: a `Stream` over the engine's read half, so its reads
/// count into the core's `bytes_in` through the same code as an unsplit stream.
pub type ReadHalf<H> = Stream<H>;

/// The write half of a split [`Stream`]: its writes count into the core's `bytes_out`.
pub type WriteHalf<H> = Stream<H>;
