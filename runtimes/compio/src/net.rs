//! TCP and UDP on compio: its io_uring socket operations fed corepin's buffers through
//! [`Owned`](crate::buf::Owned).
//!
//! # Cancelable reads: readiness first, then a receive that cannot wait
//!
//! Dropping an in-flight compio operation submits `IORING_OP_ASYNC_CANCEL` and lets the
//! driver keep the operation (and its buffer) until the kernel completes it, but the bytes a
//! receive consumed in that window are lost with it. So [`TcpStream::read_cancelable`] never
//! leaves a receive armed while it waits:
//!
//! 1. It tries a `recv(2)` with `MSG_DONTWAIT` into the caller's buffer: data already queued
//!    is taken at once, with no ring round trip.
//! 2. On `EAGAIN` it waits until the socket is readable with compio's `PollFd` (a one-shot
//!    io_uring `POLL_ADD`), racing that wait against the [`CancelToken`]. If the token fires
//!    first the poll is dropped (compio cancels it; a poll consumes nothing) and the buffer
//!    comes back with [`cancelled_error`]. Otherwise it goes back to step 1.
//!
//! The receive is a synchronous syscall that never blocks, so nothing is ever in flight
//! holding data when the read returns or its future is dropped.
//!
//! compio has its own scheme for this (a compio `CancelToken` attached with `with_cancel`,
//! whose `cancel` submits `ASYNC_CANCEL` for the registered receive, after which the receive's
//! completion says whether data arrived). It is not used because the token does not reach the
//! operation in a release build of a downstream crate: compio finds it by comparing the
//! waker's vtable with its own `ExtWaker` vtable, and that comparison fails when the vtable's
//! functions are instantiated in another crate (measured: `CancelToken::current()` inside
//! `with_cancel` is `Some` in a debug build of this crate and `None` in release), so the
//! cancel is never issued and the read waits for data.
//!
//! # Split halves
//!
//! A compio `TcpStream` is a handle on a shared descriptor (`SharedFd`, reference counted):
//! every operation holds a clone of it until its completion, and `into_split` hands out two
//! handles on the same socket. Reads and writes are separate io_uring operations, so the
//! halves are full duplex with no `unsafe` and no `RefCell`. The descriptor closes when the
//! last handle and the last operation holding it are gone.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::pin::pin;
use std::task::{ready, Context, Poll, Waker};

use compio_driver::op::AcceptMulti;
use compio_driver::{SharedFd, ToSharedFd};
use compio_io::{AsyncRead as _, AsyncReadManaged as _, AsyncWrite as _, AsyncWriteZerocopy as _};
use compio_runtime::fd::PollFd;
use compio_runtime::SubmitMulti;
use corepin_core::buf::{BufResult, IoBuf, IoBufMut};
use corepin_core::caps::KernelSupport;
use corepin_core::io::{cancelled_error, AsyncReadRent, AsyncWriteRent, CancelToken};
use corepin_core::pool::{LentBuf, PooledBuf};
use corepin_core::runtime as contract;
use futures_util::stream::FusedStream as _;
use futures_util::StreamExt as _;

use crate::buf::{back, unwrap_vec, Owned};

// ---- TcpListener ------------------------------------------------------------------------

/// compio's multishot accept on a shared listening descriptor.
type AcceptOp = SubmitMulti<AcceptMulti<SharedFd<socket2::Socket>>>;

/// A listening TCP socket driven by compio: one armed multishot `IORING_OP_ACCEPT` whose
/// completions [`accept`](contract::TcpListener::accept) hands out one by one (one accept
/// operation per call where the kernel has no multishot accept).
///
/// The armed operation lives in the listener, not in the `accept` future, so dropping that
/// future loses no connection: completions that arrive meanwhile queue in compio's operation
/// (as owned sockets) until the next call, and are closed if the listener goes away first.
/// Shutting the listener down (`SHUT_RD`, the drain) ends the multishot operation with an
/// error, which `accept` returns.
///
/// compio wakes only the task that polled the operation last, so when several tasks accept
/// at once the others wait in `waiters`, and each completion handed out wakes them to poll
/// again (one of them then becomes the operation's waker).
pub struct TcpListener {
    inner: compio_net::TcpListener,
    /// Whether this kernel has multishot accept (else one accept per call).
    multishot: bool,
    armed: RefCell<Option<AcceptOp>>,
    waiters: RefCell<Vec<Waker>>,
}

impl TcpListener {
    /// The next accepted socket from the armed multishot operation, arming one if needed;
    /// other tasks waiting to accept are woken when it is handed out.
    fn poll_accept_socket(&self, cx: &mut Context<'_>) -> Poll<io::Result<socket2::Socket>> {
        let polled = self.poll_armed(cx);
        let mut waiters = self.waiters.borrow_mut();
        match polled {
            Poll::Pending => {
                if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                    waiters.push(cx.waker().clone());
                }
            }
            Poll::Ready(_) => {
                for w in waiters.drain(..).filter(|w| !w.will_wake(cx.waker())) {
                    w.wake();
                }
            }
        }
        polled
    }

    fn poll_armed(&self, cx: &mut Context<'_>) -> Poll<io::Result<socket2::Socket>> {
        let mut armed = self.armed.borrow_mut();
        loop {
            let op = match armed.as_mut() {
                Some(op) => op,
                None => armed.insert(compio_runtime::submit_multi(AcceptMulti::new(self.inner.to_shared_fd()))),
            };
            let Some(compio_buf::BufResult(res, _)) = ready!(op.poll_next_unpin(cx)) else {
                // The operation ended on an earlier completion: arm a new one.
                *armed = None;
                continue;
            };
            if !op.is_terminated() {
                // SAFETY: a multishot accept completion that succeeded carries a new socket
                // descriptor, handed over to us (compio gave up its own ownership of it).
                return Poll::Ready(res.map(|fd| unsafe { socket2::Socket::from_raw_fd(fd as RawFd) }));
            }
            // The last completion: its socket, if any, stays inside the operation.
            let ended = armed.take();
            return Poll::Ready(res.and_then(|_| match ended.map(SubmitMulti::try_take) {
                Some(Ok(op)) => Ok(compio_buf::IntoInner::into_inner(op)),
                _ => Err(io::Error::other("compio's accept ended without its socket")),
            }));
        }
    }
}

/// Wakes the other accepting tasks if an `accept` future is dropped before it got a
/// connection: it may have been the one compio would wake, so another must poll instead.
struct Handoff<'a> {
    listener: &'a TcpListener,
    done: bool,
}

impl Handoff<'_> {
    fn finish(mut self) {
        self.done = true;
    }
}

impl Drop for Handoff<'_> {
    fn drop(&mut self) {
        if !self.done {
            for w in self.listener.waiters.borrow_mut().drain(..) {
                w.wake();
            }
        }
    }
}

impl contract::TcpListener for TcpListener {
    type Stream = TcpStream;

    fn from_std(listener: std::net::TcpListener) -> io::Result<Self> {
        Ok(Self {
            inner: compio_net::TcpListener::from_std(listener)?,
            multishot: KernelSupport::get().multishot_accept,
            armed: RefCell::new(None),
            waiters: RefCell::new(Vec::new()),
        })
    }

    async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        if !self.multishot {
            let (stream, addr) = self.inner.accept().await?;
            return Ok((TcpStream { inner: stream }, addr));
        }
        loop {
            let handoff = Handoff { listener: self, done: false };
            let socket = poll_fn(|cx| self.poll_accept_socket(cx)).await;
            handoff.finish();
            let socket = socket?;
            // Multishot accept does not report the peer's address: ask the socket. A peer
            // that already reset has none; its connection is closed and the next is taken.
            let std: std::net::TcpStream = socket.into();
            let Ok(peer) = std.peer_addr() else { continue };
            return Ok((TcpStream { inner: compio_net::TcpStream::from_std(std)? }, peer));
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

impl AsRawFd for TcpListener {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

// ---- TcpStream --------------------------------------------------------------------------

/// A connected TCP stream driven by compio.
pub struct TcpStream {
    inner: compio_net::TcpStream,
}

/// One `recv(2)` into `buf` that never blocks (`MSG_DONTWAIT`); the bytes it read are marked
/// initialised.
fn recv_nowait<B: IoBufMut>(fd: RawFd, buf: &mut B) -> io::Result<usize> {
    let len = buf.bytes_total();
    // SAFETY: `fd` is the stream's open socket (the caller borrows the stream for the call);
    // the pointer is valid for writes of `bytes_total` bytes (corepin's `IoBufMut` contract)
    // and the buffer is borrowed mutably, so nothing else touches that memory meanwhile.
    let n = unsafe { libc::recv(fd, buf.stable_mut_ptr().cast(), len, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: the kernel wrote `n <= len` bytes at the start of the buffer.
    unsafe { buf.set_init(n) };
    Ok(n)
}

/// A read that `cancel` stops without losing data (see the module docs).
async fn read_cancelable<B: IoBufMut>(
    stream: &compio_net::TcpStream,
    mut buf: B,
    cancel: &CancelToken,
) -> BufResult<usize, B> {
    let fd = stream.as_raw_fd();
    loop {
        if cancel.is_cancelled() {
            return BufResult(Err(cancelled_error()), buf);
        }
        match recv_nowait(fd, &mut buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return BufResult(other, buf),
        }
        let poll = match stream.to_poll_fd() {
            Ok(p) => p,
            Err(e) => return BufResult(Err(e), buf),
        };
        let mut ready = pin!(poll.read_ready());
        let mut cancelled = pin!(cancel.cancelled());
        let waited = poll_fn(|cx| {
            if cancelled.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            ready.as_mut().poll(cx).map(Some)
        })
        .await;
        match waited {
            // Dropping the pending POLL_ADD (with `poll`) cancels it; it consumed nothing.
            None => return BufResult(Err(cancelled_error()), buf),
            Some(Err(e)) => return BufResult(Err(e), buf),
            Some(Ok(())) => {}
        }
    }
}

/// Bytes in each buffer of the core's provided-buffer ring.
pub(crate) const RING_BUF_LEN: usize = 8 * 1024;

/// A buffer of compio's provided-buffer ring, lent by `read_pooled`; dropping it puts it back
/// in the ring.
struct RingBuf(compio_driver::BufferRef);

impl LentBuf for RingBuf {
    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

async fn read<B: IoBufMut>(stream: &compio_net::TcpStream, buf: B) -> BufResult<usize, B> {
    let mut reader = stream;
    back(reader.read(Owned(buf)).await)
}

async fn write<B: IoBuf>(stream: &compio_net::TcpStream, buf: B) -> BufResult<usize, B> {
    let mut writer = stream;
    back(writer.write(Owned(buf)).await)
}

async fn writev<B: IoBuf>(stream: &compio_net::TcpStream, bufs: Vec<B>) -> BufResult<usize, Vec<B>> {
    let mut writer = stream;
    let bufs: Vec<Owned<B>> = bufs.into_iter().map(Owned).collect();
    let compio_buf::BufResult(res, bufs) = writer.write_vectored(bufs).await;
    BufResult(res, unwrap_vec(bufs))
}

async fn shutdown(stream: &compio_net::TcpStream) -> io::Result<()> {
    let mut writer = stream;
    writer.shutdown().await
}

impl AsyncReadRent for TcpStream {
    fn read<B: IoBufMut>(&mut self, buf: B) -> impl Future<Output = BufResult<usize, B>> {
        read(&self.inner, buf)
    }

    fn read_cancelable<B: IoBufMut>(
        &mut self,
        buf: B,
        cancel: &CancelToken,
    ) -> impl Future<Output = BufResult<usize, B>> {
        read_cancelable(&self.inner, buf, cancel)
    }
}

impl AsyncWriteRent for TcpStream {
    fn write<B: IoBuf>(&mut self, buf: B) -> impl Future<Output = BufResult<usize, B>> {
        write(&self.inner, buf)
    }

    fn writev<B: IoBuf>(&mut self, bufs: Vec<B>) -> impl Future<Output = BufResult<usize, Vec<B>>> {
        writev(&self.inner, bufs)
    }

    fn shutdown(&mut self) -> impl Future<Output = io::Result<()>> {
        shutdown(&self.inner)
    }
}

// ---- split halves -----------------------------------------------------------------------

/// The read half of a split [`TcpStream`]: a compio handle on the shared socket, limited to
/// reads.
pub struct TcpReadHalf {
    inner: compio_net::TcpStream,
}

/// The write half of a split [`TcpStream`]. Dropping it shuts the write direction down (FIN),
/// as the other backends' write halves do; the socket closes when both halves (and any
/// operation still in flight on it) are gone.
pub struct TcpWriteHalf {
    inner: compio_net::TcpStream,
}

impl AsyncReadRent for TcpReadHalf {
    fn read<B: IoBufMut>(&mut self, buf: B) -> impl Future<Output = BufResult<usize, B>> {
        read(&self.inner, buf)
    }

    fn read_cancelable<B: IoBufMut>(
        &mut self,
        buf: B,
        cancel: &CancelToken,
    ) -> impl Future<Output = BufResult<usize, B>> {
        read_cancelable(&self.inner, buf, cancel)
    }
}

impl AsyncWriteRent for TcpWriteHalf {
    fn write<B: IoBuf>(&mut self, buf: B) -> impl Future<Output = BufResult<usize, B>> {
        write(&self.inner, buf)
    }

    fn writev<B: IoBuf>(&mut self, bufs: Vec<B>) -> impl Future<Output = BufResult<usize, Vec<B>>> {
        writev(&self.inner, bufs)
    }

    fn shutdown(&mut self) -> impl Future<Output = io::Result<()>> {
        shutdown(&self.inner)
    }
}

impl Drop for TcpWriteHalf {
    fn drop(&mut self) {
        // A synchronous shutdown(2): drop cannot await an io_uring SHUTDOWN. Errors (the peer
        // already reset the connection) leave nothing to do.
        // SAFETY: the descriptor belongs to `self.inner`, which is alive for this call;
        // shutdown(2) neither closes nor otherwise invalidates it.
        let _ = unsafe { libc::shutdown(self.inner.as_raw_fd(), libc::SHUT_WR) };
    }
}

impl contract::TcpStream for TcpStream {
    type ReadHalf = TcpReadHalf;
    type WriteHalf = TcpWriteHalf;

    fn into_split(self) -> (TcpReadHalf, TcpWriteHalf) {
        let (r, w) = self.inner.into_split();
        (TcpReadHalf { inner: r }, TcpWriteHalf { inner: w })
    }

    async fn connect(addr: SocketAddr) -> io::Result<Self> {
        Ok(Self { inner: compio_net::TcpStream::connect(addr).await? })
    }

    fn from_std(stream: std::net::TcpStream) -> io::Result<Self> {
        Ok(Self { inner: compio_net::TcpStream::from_std(stream)? })
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

    async fn write_zc<B: IoBuf>(&mut self, buf: B) -> BufResult<usize, B> {
        if !KernelSupport::get().send_zc {
            return write(&self.inner, buf).await;
        }
        // IORING_OP_SEND_ZC: the first completion says how many bytes were sent; the buffer
        // comes back only with the notification that the kernel no longer reads it, which is
        // what awaiting `released` waits for. Dropping this future leaves the operation and
        // the buffer with compio's driver until both completions have arrived.
        let mut writer = &self.inner;
        let compio_buf::BufResult(res, released) = writer.write_zerocopy(Owned(buf)).await;
        BufResult(res, released.await.into_inner())
    }

    async fn writable(&mut self) -> io::Result<()> {
        // A one-shot io_uring POLL_ADD: it checks the socket's state when armed, so it is
        // level-triggered and never reports a stale readiness.
        self.inner.to_poll_fd()?.write_ready().await
    }

    /// A receive with `IOSQE_BUFFER_SELECT` on the runtime's provided-buffer ring: the kernel
    /// picks a buffer only when data arrives, so a waiting connection holds none. When every
    /// buffer of the ring is lent out (`ENOBUFS`, which compio reports as `ResourceBusy`;
    /// nothing was consumed), the read takes the core pool's fallback.
    async fn read_pooled(&mut self) -> io::Result<PooledBuf> {
        let mut reader = &self.inner;
        match reader.read_managed(RING_BUF_LEN).await {
            Ok(Some(buf)) => Ok(PooledBuf::lent(RingBuf(buf))),
            // No buffer taken: the receive returned 0, end of stream.
            Ok(None) => Ok(PooledBuf::end_of_stream()),
            Err(e) if e.kind() == io::ErrorKind::ResourceBusy => {
                tracing::trace!("provided-buffer ring empty; read_pooled takes a buffer of the core's pool");
                corepin_core::pool::read_fallback(self).await
            }
            Err(e) => Err(e),
        }
    }
}

// ---- UdpSocket --------------------------------------------------------------------------

/// A UDP socket driven by compio (`SENDMSG` / `RECVMSG` into the caller's buffers), waiting
/// for readiness with one-shot io_uring `POLL_ADD`s.
pub struct UdpSocket {
    inner: compio_net::UdpSocket,
}

impl UdpSocket {
    fn poll_fd(&self) -> io::Result<PollFd<socket2::Socket>> {
        PollFd::from_shared_fd(self.inner.to_shared_fd())
    }
}

impl contract::UdpSocket for UdpSocket {
    fn from_std(socket: std::net::UdpSocket) -> io::Result<Self> {
        // The core's sendmsg/recvmsg path on the descriptor must never block the worker.
        socket.set_nonblocking(true)?;
        Ok(Self { inner: compio_net::UdpSocket::from_std(socket)? })
    }

    async fn send_to<B: IoBuf>(&self, buf: B, to: SocketAddr) -> BufResult<usize, B> {
        back(self.inner.send_to(Owned(buf), to).await)
    }

    async fn recv_from<B: IoBufMut>(&self, buf: B) -> BufResult<(usize, SocketAddr), B> {
        back(self.inner.recv_from(Owned(buf)).await)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }

    async fn readable(&self) -> io::Result<()> {
        self.poll_fd()?.read_ready().await
    }

    async fn writable(&self) -> io::Result<()> {
        self.poll_fd()?.write_ready().await
    }
}
