//! TCP and UDP on tokio-uring with corepin's owned-buffer traits.
//!
//! Reads, writes, accepts, connects and datagrams are tokio-uring's io_uring operations, fed
//! the caller's buffers through [`Owned`] (no copies).
//!
//! # Cancelable reads: readiness first
//!
//! Dropping an in-flight tokio-uring read does not cancel it in the kernel: the op stays armed
//! and the bytes it later reads are lost with it. So [`TcpStream::read_cancelable`] never
//! leaves a read armed while it waits:
//!
//! 1. It waits until the socket is readable through tokio's `AsyncFd` (tokio-uring runs on a
//!    tokio current-thread runtime, whose epoll reactor is available), racing that wait against
//!    the [`CancelToken`]. The registration is made lazily, once per stream, over a
//!    non-owning view of the stream's descriptor, and kept in the stream. If the token fires
//!    first, the buffer comes back with [`cancelled_error`]: nothing was consumed.
//! 2. Once readable, it submits a real io_uring `IORING_OP_RECV` with `MSG_DONTWAIT` into the
//!    caller's buffer and awaits it. Because of `MSG_DONTWAIT` the kernel never arms a poll for
//!    it: it completes at once with data, end of stream, an error, or `EAGAIN`. `EAGAIN` (a
//!    stale readiness) clears tokio's cached readiness and goes back to step 1. A short read
//!    also clears it (it drained the receive queue; tokio's own rule for TCP), so the next
//!    call waits for a new edge instead of paying an `EAGAIN` round trip.
//!
//! The op in step 2 keeps the stream's descriptor alive (it holds an `Rc` of the socket), so
//! even a caller that drops the future mid-op cannot make it read from a recycled descriptor.
//! Dropping the future (rather than firing the token) during step 2 can still lose the bytes
//! of that one completion, which is why the contract cancels through tokens.

use std::future::{poll_fn, Future};
use std::io;
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::pin::pin;
use std::rc::Rc;
use std::task::Poll;

use corepin_core::buf::{BufResult, IoBuf, IoBufMut};
use corepin_core::io::{cancelled_error, AsyncReadRent, AsyncWriteRent, CancelToken};
use corepin_core::pool::PooledBuf;
use corepin_core::runtime as contract;
use corepin_uring::aux;
use io_uring::{cqueue, opcode, types};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio_uring::{OneshotOutputTransform, UnsubmittedOneshot};

use crate::buf::{unwrap_vec, Owned};
use crate::fd::FdWatch;

/// Turns a tokio-uring `(result, Owned<B>)` pair into corepin's [`BufResult`].
pub(crate) fn back<T, B>((res, buf): (io::Result<T>, Owned<B>)) -> BufResult<T, B> {
    BufResult(res, buf.into_inner())
}

/// Runs `f` on a std view of `fd` without taking ownership (the view is never dropped, so the
/// descriptor is not closed).
fn with_std_socket<S: FromRawFd, R>(fd: RawFd, f: impl FnOnce(&S) -> R) -> R {
    // SAFETY: `fd` is an open socket owned by the caller's object, which is borrowed for the
    // whole call; `ManuallyDrop` guarantees the temporary std object never closes it.
    let s = ManuallyDrop::new(unsafe { S::from_raw_fd(fd) });
    f(&s)
}

// ---- TcpListener ------------------------------------------------------------------------

/// A listening TCP socket driven by tokio-uring (`IORING_OP_ACCEPT`, one per connection).
pub struct TcpListener {
    /// Declared first: dropped (its ACCEPT cancelled) while the listener is still open.
    acceptor: aux::Acceptor,
    inner: tokio_uring::net::TcpListener,
}

impl contract::TcpListener for TcpListener {
    type Stream = TcpStream;

    fn from_std(listener: std::net::TcpListener) -> io::Result<Self> {
        Ok(Self { acceptor: aux::Acceptor::default(), inner: tokio_uring::net::TcpListener::from_std(listener) })
    }

    /// One multishot ACCEPT on corepin's auxiliary ring (tokio-uring 0.5 has none), or
    /// tokio-uring's accept where there is no aux ring.
    async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        if let Some(accepted) = self.acceptor.accept(self.inner.as_raw_fd()).await {
            let (stream, addr) = accepted?;
            return Ok((TcpStream::wrap(tokio_uring::net::TcpStream::from_std(stream)), addr));
        }
        let (stream, addr) = self.inner.accept().await?;
        Ok((TcpStream::wrap(stream), addr))
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

/// A non-owning view of a descriptor, for registering it with tokio's reactor.
struct FdRef(RawFd);

impl AsRawFd for FdRef {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// A connected TCP stream driven by tokio-uring.
pub struct TcpStream {
    // Field order matters: `rx` (its multishot RECV cancelled) and `readiness` (deregistered
    // from epoll) are dropped before `inner` can close the descriptor they refer to.
    /// Its multishot receive on corepin's auxiliary ring, once `read_pooled` armed it.
    rx: aux::Receiver,
    /// Lazily made epoll registration used by `read_cancelable` and `writable` (see the
    /// module docs).
    readiness: Option<AsyncFd<FdRef>>,
    /// The socket; shared with in-flight `MSG_DONTWAIT` receives so they keep it open.
    inner: Rc<tokio_uring::net::TcpStream>,
}

impl TcpStream {
    fn wrap(inner: tokio_uring::net::TcpStream) -> Self {
        Self { rx: aux::Receiver::default(), readiness: None, inner: Rc::new(inner) }
    }
}

/// The readiness registration `slot` of the stream `inner`, made on first use.
fn readiness<'a>(
    slot: &'a mut Option<AsyncFd<FdRef>>,
    inner: &tokio_uring::net::TcpStream,
) -> io::Result<&'a AsyncFd<FdRef>> {
    if slot.is_none() {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(io::Error::other("readiness waits need the tokio-uring runtime on this thread"));
        }
        let fd = FdRef(inner.as_raw_fd());
        // SAFETY: `slot` is the `readiness` field of the stream whose socket is `inner`. The
        // descriptor closes only when the last `Rc` of the socket (held by the stream and by
        // in-flight receives) is gone; `readiness` is declared before `inner`, so it is dropped
        // (and deregistered) first, while the descriptor is still open and refers to the same
        // socket.
        *slot = Some(unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }?);
    }
    match slot {
        Some(r) => Ok(r),
        None => Err(io::Error::other("readiness registration missing")),
    }
}

impl AsyncReadRent for TcpStream {
    async fn read<B: IoBufMut>(&mut self, buf: B) -> BufResult<usize, B> {
        let buf = corepin_uring::queued_first!(&mut self.rx, self.inner.as_raw_fd(), buf, None);
        back(self.inner.read(Owned(buf)).await)
    }

    async fn read_cancelable<B: IoBufMut>(&mut self, buf: B, cancel: &CancelToken) -> BufResult<usize, B> {
        let buf = corepin_uring::queued_first!(&mut self.rx, self.inner.as_raw_fd(), buf, Some(cancel));
        read_cancelable(&mut self.readiness, &self.inner, buf, cancel).await
    }
}

/// tokio-uring's read made cancelable: wait for readiness (or the cancel), then a receive that
/// cannot block.
async fn read_cancelable<B: IoBufMut>(
    slot: &mut Option<AsyncFd<FdRef>>,
    inner: &Rc<tokio_uring::net::TcpStream>,
    buf: B,
    cancel: &CancelToken,
) -> BufResult<usize, B> {
    if cancel.is_cancelled() {
        return BufResult(Err(cancelled_error()), buf);
    }
    let socket = Rc::clone(inner);
    let readiness = match readiness(slot, inner) {
        Ok(r) => r,
        Err(e) => return BufResult(Err(e), buf),
    };
    let mut buf = buf;
    loop {
        // Step 1: readable or cancelled, whichever comes first; nothing is armed yet.
        let waited = {
            let mut ready = pin!(readiness.readable());
            let mut cancelled = pin!(cancel.cancelled());
            poll_fn(|cx| {
                if cancelled.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
                ready.as_mut().poll(cx).map(Some)
            })
            .await
        };
        let mut guard = match waited {
            None => return BufResult(Err(cancelled_error()), buf),
            Some(Err(e)) => return BufResult(Err(e), buf),
            Some(Ok(guard)) => guard,
        };
        // Step 2: a receive that cannot block; awaited to completion, never abandoned.
        let want = buf.bytes_total().min(u32::MAX as usize);
        let BufResult(res, b) = recv_nowait(&socket, buf).await;
        buf = b;
        match res {
            Ok(n) if n > 0 && n < want => {
                // A short TCP read drained the receive queue (tokio's own rule): forget
                // the readiness now instead of paying an EAGAIN round trip next time.
                // Bytes that arrive later raise a new epoll edge, which tokio keeps.
                guard.clear_ready();
                return BufResult(Ok(n), buf);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Stale readiness: forget it (tokio keeps any newer edge) and wait again.
                guard.clear_ready();
                if cancel.is_cancelled() {
                    return BufResult(Err(cancelled_error()), buf);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return BufResult(other, buf),
        }
    }
}

impl AsyncWriteRent for TcpStream {
    async fn write<B: IoBuf>(&mut self, buf: B) -> BufResult<usize, B> {
        back(self.inner.write(Owned(buf)).submit().await)
    }

    async fn writev<B: IoBuf>(&mut self, bufs: Vec<B>) -> BufResult<usize, Vec<B>> {
        let bufs: Vec<Owned<B>> = bufs.into_iter().map(Owned).collect();
        let (res, bufs) = self.inner.writev(bufs).await;
        BufResult(res, unwrap_vec(bufs))
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        self.inner.shutdown(std::net::Shutdown::Write)
    }
}

// ---- split halves -----------------------------------------------------------------------

/// The read half of a split [`TcpStream`]: the stream itself, limited to reads, keeping the
/// readiness registration `read_cancelable` uses.
///
/// tokio-uring's socket operations take `&self` (each is its own io_uring operation holding its
/// buffer), so the halves simply share the socket through an `Rc`: nothing is aliased mutably
/// and no `unsafe` is involved. The lazily made readiness registration (`AsyncFd`) belongs to
/// this half alone: the write half needs none (it only submits writes), and tokio's reactor
/// would refuse a second registration of the same descriptor anyway.
pub struct TcpReadHalf(TcpStream);

/// The write half of a split [`TcpStream`]. Dropping it shuts the write direction down (FIN),
/// as Monoio's write half does; the socket closes when both halves (and any operation still in
/// flight on it) are gone.
pub struct TcpWriteHalf {
    inner: Rc<tokio_uring::net::TcpStream>,
}

impl AsyncReadRent for TcpReadHalf {
    fn read<B: IoBufMut>(&mut self, buf: B) -> impl Future<Output = BufResult<usize, B>> {
        self.0.read(buf)
    }

    fn read_cancelable<B: IoBufMut>(
        &mut self,
        buf: B,
        cancel: &CancelToken,
    ) -> impl Future<Output = BufResult<usize, B>> {
        self.0.read_cancelable(buf, cancel)
    }
}

impl AsyncWriteRent for TcpWriteHalf {
    async fn write<B: IoBuf>(&mut self, buf: B) -> BufResult<usize, B> {
        back(self.inner.write(Owned(buf)).submit().await)
    }

    async fn writev<B: IoBuf>(&mut self, bufs: Vec<B>) -> BufResult<usize, Vec<B>> {
        let bufs: Vec<Owned<B>> = bufs.into_iter().map(Owned).collect();
        let (res, bufs) = self.inner.writev(bufs).await;
        BufResult(res, unwrap_vec(bufs))
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        self.inner.shutdown(std::net::Shutdown::Write)
    }
}

impl Drop for TcpWriteHalf {
    fn drop(&mut self) {
        // Errors (the peer already reset the connection) leave nothing to do.
        let _ = self.inner.shutdown(std::net::Shutdown::Write);
    }
}

impl contract::TcpStream for TcpStream {
    type ReadHalf = TcpReadHalf;
    type WriteHalf = TcpWriteHalf;

    fn into_split(self) -> (TcpReadHalf, TcpWriteHalf) {
        let write = TcpWriteHalf { inner: Rc::clone(&self.inner) };
        (TcpReadHalf(self), write)
    }

    async fn connect(addr: SocketAddr) -> io::Result<Self> {
        Ok(Self::wrap(tokio_uring::net::TcpStream::connect(addr).await?))
    }

    fn from_std(stream: std::net::TcpStream) -> io::Result<Self> {
        Ok(Self::wrap(tokio_uring::net::TcpStream::from_std(stream)))
    }

    fn peer_addr(&self) -> io::Result<SocketAddr> {
        with_std_socket(self.inner.as_raw_fd(), std::net::TcpStream::peer_addr)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        with_std_socket(self.inner.as_raw_fd(), std::net::TcpStream::local_addr)
    }

    fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.inner.set_nodelay(on)
    }

    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }

    async fn writable(&mut self) -> io::Result<()> {
        let mut guard = readiness(&mut self.readiness, &self.inner)?.writable().await?;
        // The contract calls this only after a syscall on the descriptor hit EAGAIN, which
        // tokio's edge-triggered reactor did not see: clear what it cached, so a stale
        // readiness costs one retry and the next wait is for a fresh edge.
        guard.clear_ready();
        Ok(())
    }

    /// The stream's multishot receive into the provided buffers of corepin's auxiliary ring
    /// (tokio-uring has neither of its own; [`aux::read_pooled`]): the kernel picks a buffer
    /// only when data arrives, so a waiting connection holds none, and a dropped read loses
    /// nothing. Without the aux ring, or when every buffer is lent out (`ENOBUFS`: nothing was
    /// consumed), the read takes the core pool's fallback.
    async fn read_pooled(&mut self) -> io::Result<PooledBuf> {
        let fd = self.inner.as_raw_fd();
        aux::read_pooled(self, |s: &mut Self| &mut s.rx, fd).await
    }
}

// ---- IORING_OP_RECV with MSG_DONTWAIT ----------------------------------------------------

/// What the engine keeps while the receive is in flight: the buffer and the socket.
struct RecvData<B> {
    buf: B,
    _socket: Rc<tokio_uring::net::TcpStream>,
}

/// Turns the completion into a [`BufResult`].
struct RecvDone<B>(PhantomData<fn() -> B>);

impl<B: IoBufMut> OneshotOutputTransform for RecvDone<B> {
    type Output = BufResult<usize, B>;
    type StoredData = RecvData<B>;

    fn transform_oneshot_output(self, data: RecvData<B>, cqe: cqueue::Entry) -> BufResult<usize, B> {
        let mut buf = data.buf;
        let res = cqe.result();
        if res < 0 {
            return BufResult(Err(io::Error::from_raw_os_error(-res)), buf);
        }
        let n = res as usize;
        // SAFETY: the kernel reports it wrote `n` bytes at the start of the buffer, and `n` is
        // at most the length we passed, which is at most `bytes_total`.
        unsafe { buf.set_init(n) };
        BufResult(Ok(n), buf)
    }
}

/// A receive into `buf` that completes at once (data, end of stream, error or `EAGAIN`).
async fn recv_nowait<B: IoBufMut>(socket: &Rc<tokio_uring::net::TcpStream>, mut buf: B) -> BufResult<usize, B> {
    let len = u32::try_from(buf.bytes_total()).unwrap_or(u32::MAX);
    let ptr = buf.stable_mut_ptr();
    let sqe = opcode::Recv::new(types::Fd(socket.as_raw_fd()), ptr, len).flags(libc::MSG_DONTWAIT).build();
    // The pointer stays valid after `buf` moves into the op data (corepin's `IoBufMut`
    // contract); the op data also holds the socket so the descriptor outlives the op.
    let data = RecvData { buf, _socket: Rc::clone(socket) };
    UnsubmittedOneshot::new(data, RecvDone(PhantomData), sqe).submit().await
}

// ---- UdpSocket --------------------------------------------------------------------------

/// A UDP socket driven by tokio-uring (`SENDMSG` / `RECVMSG` into the caller's buffers), with
/// readiness from a watch made on first use.
pub struct UdpSocket {
    inner: tokio_uring::net::UdpSocket,
    readiness: std::cell::OnceCell<FdWatch>,
}

impl UdpSocket {
    fn readiness(&self) -> io::Result<&FdWatch> {
        if let Some(w) = self.readiness.get() {
            return Ok(w);
        }
        let w = <FdWatch as contract::FdWatch>::new(self.inner.as_raw_fd())?;
        Ok(self.readiness.get_or_init(|| w))
    }
}

impl contract::UdpSocket for UdpSocket {
    fn from_std(socket: std::net::UdpSocket) -> io::Result<Self> {
        Ok(Self { inner: tokio_uring::net::UdpSocket::from_std(socket), readiness: std::cell::OnceCell::new() })
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
        contract::FdWatch::readable(self.readiness()?).await
    }

    async fn writable(&self) -> io::Result<()> {
        contract::FdWatch::writable(self.readiness()?).await
    }
}
