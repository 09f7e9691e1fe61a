//! The service abstraction: a `Send + Sync` factory crosses threads once and builds one
//! service instance per core; the instance stays on its core and answers requests with plain
//! `async fn` (no boxing). A service is generic over the runtime, so one implementation runs
//! on every backend, checked at compile time.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use crate::buf::{BufResult, IoBuf, IoBufMut};
use crate::io::{AsyncReadRent, AsyncWriteRent, CancelToken};
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

/// Builds the per-core instance of a connection service; crosses threads, so `Send + Sync`.
pub trait ServiceFactory: Send + Sync + 'static {
    /// The per-core service for runtime `R`.
    type Service<R: Runtime>: Service<Connection<R>, Response = ()> + 'static;
    /// Builds the instance for the worker it is called on (after pinning, so what it
    /// allocates is local to that core).
    fn new_service<R: Runtime>(&self, worker: &Worker) -> Self::Service<R>;
}

/// A connection accepted on this core.
pub struct Connection<R: Runtime> {
    /// The stream, counting bytes into this core's counters.
    pub stream: Stream<R::TcpStream>,
    /// The peer.
    pub peer: SocketAddr,
    /// The worker it belongs to.
    pub worker: Worker,
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

impl<S: TcpStream> Stream<S> {
    /// The descriptor.
    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.inner.as_raw_fd()
    }

    /// [`TcpStream::send_file`], counting the bytes sent.
    pub async fn send_file(&mut self, file: std::os::fd::BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<usize> {
        let n = self.inner.send_file(file, offset, len).await?;
        self.count_out(n);
        Ok(n)
    }
}
