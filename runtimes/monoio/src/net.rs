//! TCP and UDP on Monoio: its io_uring (or epoll) sockets fed corepin's buffers through
//! [`Owned`](crate::buf::Owned).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use corepin_core::buf::{BufResult, IoBuf, IoBufMut};
use corepin_core::io::{cancelled_error, is_cancelled, AsyncReadRent, AsyncWriteRent, CancelToken};
use corepin_core::pool::PooledBuf;
use corepin_core::runtime as rt;
use corepin_uring::aux;
use monoio::io::{AsyncReadRent as _, AsyncWriteRent as _};

use crate::buf::{back, IoVecs, Owned};

/// A listening socket. It accepts with one multishot ACCEPT on corepin's auxiliary ring
/// (Monoio 0.2 has none of its own), or with Monoio's accept where there is no aux ring.
pub struct TcpListener {
    /// Declared first: dropped (its ACCEPT cancelled) while the listener is still open.
    acceptor: aux::Acceptor,
    inner: monoio::net::TcpListener,
}

impl rt::TcpListener for TcpListener {
    type Stream = TcpStream;
    fn from_std(listener: std::net::TcpListener) -> io::Result<Self> {
        monoio::net::TcpListener::from_std(listener).map(|inner| Self { acceptor: aux::Acceptor::default(), inner })
    }
    async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        if let Some(accepted) = self.acceptor.accept(self.inner.as_raw_fd()).await {
            let (s, a) = accepted?;
            return Ok((TcpStream::wrap(monoio::net::TcpStream::from_std(s)?), a));
        }
        let (s, a) = self.inner.accept().await?;
        Ok((TcpStream::wrap(s), a))
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A connected stream.
pub struct TcpStream {
    /// Its multishot receive on corepin's auxiliary ring, once `read_pooled` armed it.
    /// Declared first: dropped (its RECV cancelled) while the socket is still open.
    rx: aux::Receiver,
    inner: monoio::net::TcpStream,
}

impl TcpStream {
    fn wrap(inner: monoio::net::TcpStream) -> Self {
        Self { rx: aux::Receiver::default(), inner }
    }
}

impl AsyncReadRent for TcpStream {
    async fn read<B: IoBufMut>(&mut self, buf: B) -> BufResult<usize, B> {
        let buf = corepin_uring::queued_first!(&mut self.rx, self.inner.as_raw_fd(), buf, None);
        back(self.inner.read(Owned(buf)).await)
    }

    async fn read_cancelable<B: IoBufMut>(&mut self, buf: B, cancel: &CancelToken) -> BufResult<usize, B> {
        let buf = corepin_uring::queued_first!(&mut self.rx, self.inner.as_raw_fd(), buf, Some(cancel));
        read_cancelable(&mut self.inner, buf, cancel).await
    }
}

/// Monoio cancels the in-flight recv with `IORING_OP_ASYNC_CANCEL` and we await its
/// completion: the result is either `ECANCELED` (nothing consumed) or the bytes it read.
async fn read_cancelable<S, B>(stream: &mut S, buf: B, cancel: &CancelToken) -> BufResult<usize, B>
where
    S: monoio::io::CancelableAsyncReadRent,
    B: IoBufMut,
{
    if cancel.is_cancelled() {
        return BufResult(Err(cancelled_error()), buf);
    }
    let canceller = monoio::io::Canceller::new();
    let mut read = std::pin::pin!(stream.cancelable_read(Owned(buf), canceller.handle()));
    let mut canceller = Some(canceller);
    let mut waiting = std::pin::pin!(cancel.cancelled());
    let out = std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(r) = read.as_mut().poll(cx) {
            return std::task::Poll::Ready(r);
        }
        if canceller.is_some() && waiting.as_mut().poll(cx).is_ready() {
            if let Some(c) = canceller.take() {
                drop(c.cancel());
            }
            return read.as_mut().poll(cx);
        }
        std::task::Poll::Pending
    })
    .await;
    let BufResult(res, buf) = back(out);
    match res {
        Err(e) if is_cancelled(&e) => BufResult(Err(cancelled_error()), buf),
        other => BufResult(other, buf),
    }
}

impl AsyncWriteRent for TcpStream {
    async fn write<B: IoBuf>(&mut self, buf: B) -> BufResult<usize, B> {
        back(self.inner.write(Owned(buf)).await)
    }
    async fn writev<B: IoBuf>(&mut self, bufs: Vec<B>) -> BufResult<usize, Vec<B>> {
        let (res, v) = self.inner.writev(IoVecs::new(bufs)).await;
        BufResult(res, v.bufs)
    }
    async fn shutdown(&mut self) -> io::Result<()> {
        self.inner.shutdown().await
    }
}

/// The read half of a split [`TcpStream`]: Monoio's own owned read half.
///
/// Monoio's split shares the stream between the halves and declares it safe to do so
/// (`unsafe impl Split for TcpStream`): a read and a write are separate io_uring operations
/// (or separate reader and writer readiness on its epoll driver), so the halves touch disjoint
/// state. corepin adds no `unsafe` of its own here. The stream's multishot receive, if armed,
/// comes with this half.
pub struct TcpReadHalf {
    /// Declared first, as in [`TcpStream`].
    rx: aux::Receiver,
    fd: RawFd,
    inner: monoio::io::OwnedReadHalf<monoio::net::TcpStream>,
}

/// The write half of a split [`TcpStream`]: Monoio's owned write half, whose drop shuts the
/// write direction down (FIN).
pub struct TcpWriteHalf(monoio::io::OwnedWriteHalf<monoio::net::TcpStream>);

impl AsyncReadRent for TcpReadHalf {
    async fn read<B: IoBufMut>(&mut self, buf: B) -> BufResult<usize, B> {
        let buf = corepin_uring::queued_first!(&mut self.rx, self.fd, buf, None);
        back(self.inner.read(Owned(buf)).await)
    }
    async fn read_cancelable<B: IoBufMut>(&mut self, buf: B, cancel: &CancelToken) -> BufResult<usize, B> {
        let buf = corepin_uring::queued_first!(&mut self.rx, self.fd, buf, Some(cancel));
        read_cancelable(&mut self.inner, buf, cancel).await
    }
}

impl AsyncWriteRent for TcpWriteHalf {
    async fn write<B: IoBuf>(&mut self, buf: B) -> BufResult<usize, B> {
        back(self.0.write(Owned(buf)).await)
    }
    async fn writev<B: IoBuf>(&mut self, bufs: Vec<B>) -> BufResult<usize, Vec<B>> {
        let (res, v) = self.0.writev(IoVecs::new(bufs)).await;
        BufResult(res, v.bufs)
    }
    async fn shutdown(&mut self) -> io::Result<()> {
        self.0.shutdown().await
    }
}

impl rt::TcpStream for TcpStream {
    type ReadHalf = TcpReadHalf;
    type WriteHalf = TcpWriteHalf;

    fn into_split(self) -> (TcpReadHalf, TcpWriteHalf) {
        let fd = self.inner.as_raw_fd();
        let Self { rx, inner } = self;
        let (r, w) = monoio::io::Splitable::into_split(inner);
        (TcpReadHalf { rx, fd, inner: r }, TcpWriteHalf(w))
    }

    async fn connect(addr: SocketAddr) -> io::Result<Self> {
        monoio::net::TcpStream::connect_addr(addr).await.map(Self::wrap)
    }
    fn from_std(stream: std::net::TcpStream) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        monoio::net::TcpStream::from_std(stream).map(Self::wrap)
    }
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.inner.peer_addr()
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
    fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.inner.set_nodelay(on)
    }
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
    async fn writable(&mut self) -> io::Result<()> {
        // Not relaxed: on the epoll driver Monoio then re-checks with poll(2) and waits for a
        // fresh edge if its cached readiness is stale (our sendfile just hit EAGAIN).
        self.inner.writable(false).await
    }

    /// The stream's multishot receive into the provided buffers of corepin's auxiliary ring
    /// (Monoio has neither of its own; [`aux::read_pooled`]): the kernel picks a buffer only
    /// when data arrives, so a waiting connection holds none. Without the aux ring (the epoll
    /// driver, or it could not be set up), or when every buffer is lent out (`ENOBUFS`:
    /// nothing was consumed), the read takes the core pool's fallback.
    async fn read_pooled(&mut self) -> io::Result<PooledBuf> {
        let fd = self.inner.as_raw_fd();
        aux::read_pooled(self, |s: &mut Self| &mut s.rx, fd).await
    }
}

/// A UDP socket.
pub struct UdpSocket(monoio::net::udp::UdpSocket);

impl rt::UdpSocket for UdpSocket {
    fn from_std(socket: std::net::UdpSocket) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        monoio::net::udp::UdpSocket::from_std(socket).map(Self)
    }
    async fn send_to<B: IoBuf>(&self, buf: B, to: SocketAddr) -> BufResult<usize, B> {
        back(self.0.send_to(Owned(buf), to).await)
    }
    async fn recv_from<B: IoBufMut>(&self, buf: B) -> BufResult<(usize, SocketAddr), B> {
        back(self.0.recv_from(Owned(buf)).await)
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
    async fn readable(&self) -> io::Result<()> {
        // Not relaxed: Monoio re-checks a cached readiness with poll(2), so the wait is level-
        // triggered as the contract asks.
        self.0.readable(false).await
    }
    async fn writable(&self) -> io::Result<()> {
        self.0.writable(false).await
    }
}
