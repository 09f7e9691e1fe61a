//! TCP and UDP over glommio's sockets, with corepin's owned-buffer ("rent") I/O on top of
//! glommio's readiness-based streams.
//!
//! Glommio's TCP stream is not completion-based: `poll_read` first tries a non-blocking
//! `recv(2)` straight into the caller's memory and, when the socket is empty, arms an
//! `IORING_OP_POLL_ADD` and waits for it; writes are a non-blocking `send(2)` with a POLL_ADD
//! for writability when the socket buffer is full. No byte is ever held by the engine, so a
//! read future can be dropped at any time without losing data, which is what makes
//! [`read_cancelable`](AsyncReadRent::read_cancelable) simple here.

use std::future::{poll_fn, Future};
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use corepin_core::buf::{BufResult, IoBuf, IoBufMut};
use corepin_core::io::{cancelled_error, AsyncReadRent, AsyncWriteRent, CancelToken};
use corepin_core::pool::PooledBuf;
use corepin_core::runtime;
use futures_lite::io::{AsyncRead, AsyncWrite};

use crate::engine::require_engine;
use crate::fd::{FdWatch, WriteWatch};
use crate::to_io;

/// `IOV_MAX` on Linux: a gather write sends at most this many buffers at once.
const IOV_MAX: usize = 1024;

/// A glommio accept in flight (`'static`: it holds the listener by `Rc`).
type AcceptOp = Pin<Box<dyn Future<Output = glommio::Result<glommio::net::AcceptedTcpStream, ()>>>>;

/// A listening TCP socket (glommio `TcpListener`).
///
/// Glommio's accept is an `IORING_OP_ACCEPT` once its non-blocking `accept(2)` finds nothing,
/// and dropping it while the kernel has it only queues a cancel: a connection the ACCEPT takes
/// before the cancel lands is a descriptor nobody will ever see, and its client waits forever.
/// So an accept, once started, is kept here until it completes, whatever happens to the
/// `accept` call that started it (a timeout or a `race` drops those), and the next call
/// takes its result. When the listener goes, its socket is shut down, which makes an
/// ACCEPT still in flight end at once, and a task of the core's drops what it returns.
pub struct TcpListener {
    /// One multishot ACCEPT on corepin's auxiliary ring (glommio has none); glommio's accept
    /// below where there is no aux ring. Declared first: dropped (its ACCEPT cancelled) while
    /// the listener is still open.
    acceptor: corepin_uring::aux::Acceptor,
    inner: std::rc::Rc<glommio::net::TcpListener>,
    /// The listening socket's descriptor, owned by `inner`.
    fd: RawFd,
    pending: std::cell::RefCell<Option<AcceptOp>>,
}

impl TcpListener {
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<glommio::Result<glommio::net::AcceptedTcpStream, ()>> {
        let mut pending = self.pending.borrow_mut();
        let op = pending.get_or_insert_with(|| {
            let listener = std::rc::Rc::clone(&self.inner);
            Box::pin(async move { listener.shared_accept().await })
        });
        let out = std::task::ready!(op.as_mut().poll(cx));
        *pending = None;
        Poll::Ready(out)
    }
}

impl Drop for TcpListener {
    fn drop(&mut self) {
        let Some(mut op) = self.pending.get_mut().take() else { return };
        // Ends an ACCEPT in flight (it fails once the socket is shut down; so do new
        // connections in the backlog, which get a reset).
        // SAFETY: shutdown(2) on the listening socket this value owns (the Rc'd listener is
        // still alive: `op` holds it).
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        // An accepted descriptor is only closed by the stream made of it.
        let close = |r: glommio::Result<glommio::net::AcceptedTcpStream, ()>| {
            if let Ok(accepted) = r {
                drop(accepted.bind_to_executor());
            }
        };
        if let Poll::Ready(r) = op.as_mut().poll(&mut Context::from_waker(std::task::Waker::noop())) {
            close(r);
            return;
        }
        if require_engine().is_ok() {
            // The completion is on its way: let the core close what it brings (a connection,
            // if the ACCEPT took one before the shutdown) when it arrives.
            glommio::spawn_local(async move { close(op.await) }).detach();
        }
    }
}

impl runtime::TcpListener for TcpListener {
    type Stream = TcpStream;

    fn from_std(listener: std::net::TcpListener) -> io::Result<Self> {
        require_engine()?;
        let fd = listener.into_raw_fd();
        // SAFETY: `fd` is a bound, listening TCP socket whose ownership `into_raw_fd` just
        // gave us; glommio's listener takes it over and closes it on drop.
        let inner = unsafe { glommio::net::TcpListener::from_raw_fd(fd) };
        Ok(Self {
            acceptor: corepin_uring::aux::Acceptor::default(),
            inner: std::rc::Rc::new(inner),
            fd,
            pending: std::cell::RefCell::new(None),
        })
    }

    async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        if let Some(accepted) = self.acceptor.accept(self.fd).await {
            let (s, peer) = accepted?;
            // SAFETY: `into_raw_fd` gives up the connected socket the aux ring's ACCEPT made;
            // glommio's stream takes it over and closes it on drop.
            let inner = unsafe { glommio::net::TcpStream::from_raw_fd(s.into_raw_fd()) };
            return Ok((TcpStream::wrap(inner), peer));
        }
        let stream = poll_fn(|cx| self.poll_accept(cx)).await.map_err(to_io)?.bind_to_executor();
        let peer = stream.peer_addr().map_err(to_io)?;
        Ok((TcpStream::wrap(stream), peer))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr().map_err(to_io)
    }
}

/// A connected TCP stream (glommio `TcpStream`, unbuffered).
pub struct TcpStream {
    // Field order matters: the multishot receive (cancelled on drop) and the write watch (an
    // epoll instance holding the socket) go before the socket.
    /// Its multishot receive on corepin's auxiliary ring, once `read_pooled` armed it.
    rx: corepin_uring::aux::Receiver,
    /// Made on the first [`writable`](runtime::TcpStream::writable) wait.
    write_watch: Option<WriteWatch>,
    inner: glommio::net::TcpStream,
}

impl TcpStream {
    fn wrap(inner: glommio::net::TcpStream) -> Self {
        Self { rx: corepin_uring::aux::Receiver::default(), write_watch: None, inner }
    }

    /// Reads into `buf`, from the stream's multishot receive while it is armed, else through
    /// glommio's readiness-based `poll_read`; with `cancel`, stops once it fires if nothing was
    /// read yet.
    async fn read_into<B: IoBufMut>(&mut self, buf: B, cancel: Option<&CancelToken>) -> BufResult<usize, B> {
        let buf = corepin_uring::queued_first!(&mut self.rx, self.inner.as_raw_fd(), buf, cancel);
        let inner = &mut self.inner;
        poll_read_into(move |cx, slice| Pin::new(&mut *inner).poll_read(cx, slice), buf, cancel).await
    }
}

/// Reads into `buf` through `poll_read` (glommio's readiness-based read on the stream); with
/// `cancel`, stops once it fires if nothing was read yet.
async fn poll_read_into<B: IoBufMut>(
    mut poll_read: impl FnMut(&mut Context<'_>, &mut [u8]) -> Poll<io::Result<usize>>,
    mut buf: B,
    cancel: Option<&CancelToken>,
) -> BufResult<usize, B> {
    let total = buf.bytes_total();
    if total == 0 {
        return BufResult(Ok(0), buf);
    }
    let ptr = buf.stable_mut_ptr();
    let mut cancelled = cancel.map(CancelToken::cancelled);
    let res = poll_fn(|cx| {
        // SAFETY: `ptr` is valid for writes of `total` bytes for as long as `buf` lives
        // (IoBufMut contract), and `buf` is owned by this future and untouched until the
        // poll_fn completes. The slice lives only for this call. Glommio's poll_read hands
        // the pointer to recv(2), which only writes; nothing reads the bytes beyond the
        // initialised prefix before `set_init` below records what recv wrote.
        let slice = unsafe { std::slice::from_raw_parts_mut(ptr, total) };
        if let Poll::Ready(r) = poll_read(cx, slice) {
            return Poll::Ready(r);
        }
        // Nothing was read and nothing is in flight that could consume bytes: the data
        // stays in the socket, so stopping here loses nothing.
        if let Some(c) = cancelled.as_mut() {
            if Pin::new(c).poll(cx).is_ready() {
                return Poll::Ready(Err(cancelled_error()));
            }
        }
        Poll::Pending
    })
    .await;
    if let Ok(n) = res {
        // SAFETY: recv(2) wrote `n <= total` bytes at the start of the buffer.
        unsafe { buf.set_init(n) };
    }
    BufResult(res, buf)
}

impl AsyncReadRent for TcpStream {
    fn read<B: IoBufMut>(&mut self, buf: B) -> impl Future<Output = BufResult<usize, B>> {
        self.read_into(buf, None)
    }

    fn read_cancelable<B: IoBufMut>(
        &mut self,
        buf: B,
        cancel: &CancelToken,
    ) -> impl Future<Output = BufResult<usize, B>> {
        self.read_into(buf, Some(cancel))
    }
}

/// One non-blocking `sendmsg(2)` gathering `iov`: `None` when the socket buffer is full.
fn try_sendmsg(fd: RawFd, iov: &[libc::iovec]) -> Option<io::Result<usize>> {
    loop {
        // SAFETY: a zeroed msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len() as _;
        // SAFETY: every iovec points at initialised bytes of a buffer the caller keeps alive
        // for this call; the kernel only reads them. MSG_NOSIGNAL turns a closed peer into
        // EPIPE instead of SIGPIPE.
        let r = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if r >= 0 {
            return Some(Ok(r as usize));
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return None,
            _ => return Some(Err(err)),
        }
    }
}

/// A write of `buf`: a non-blocking `send(2)` straight from the caller's buffer (with
/// MSG_NOSIGNAL, which glommio's own send lacks); only when the socket buffer is full does
/// `poll_write` (glommio's write path) wait for writability (a POLL_ADD) and send.
async fn write_buf<B: IoBuf>(
    fd: RawFd,
    mut poll_write: impl FnMut(&mut Context<'_>, &[u8]) -> Poll<io::Result<usize>>,
    buf: B,
) -> BufResult<usize, B> {
    let init = buf.as_init_slice();
    let iov = [libc::iovec { iov_base: init.as_ptr() as *mut libc::c_void, iov_len: init.len() }];
    if let Some(res) = try_sendmsg(fd, &iov) {
        return BufResult(res, buf);
    }
    let res = poll_fn(|cx| poll_write(cx, buf.as_init_slice())).await;
    BufResult(res, buf)
}

/// One `sendmsg(2)` gathering every buffer (up to `IOV_MAX`). When the socket buffer is
/// full, waits through `poll_write` (glommio's write path) with the first non-empty buffer and
/// returns what that wrote (a short write, which the contract allows).
async fn writev_bufs<B: IoBuf>(
    fd: RawFd,
    mut poll_write: impl FnMut(&mut Context<'_>, &[u8]) -> Poll<io::Result<usize>>,
    bufs: Vec<B>,
) -> BufResult<usize, Vec<B>> {
    let iov: Vec<libc::iovec> = bufs
        .iter()
        .filter(|b| b.bytes_init() > 0)
        .take(IOV_MAX)
        .map(|b| libc::iovec { iov_base: b.stable_ptr() as *mut libc::c_void, iov_len: b.bytes_init() })
        .collect();
    if iov.is_empty() {
        return BufResult(Ok(0), bufs);
    }
    if let Some(res) = try_sendmsg(fd, &iov) {
        return BufResult(res, bufs);
    }
    drop(iov);
    let res = match bufs.iter().find(|b| b.bytes_init() > 0) {
        Some(first) => poll_fn(|cx| poll_write(cx, first.as_init_slice())).await,
        None => Ok(0),
    };
    BufResult(res, bufs)
}

impl AsyncWriteRent for TcpStream {
    async fn write<B: IoBuf>(&mut self, buf: B) -> BufResult<usize, B> {
        let fd = self.inner.as_raw_fd();
        let inner = &mut self.inner;
        write_buf(fd, |cx, b| Pin::new(&mut *inner).poll_write(cx, b), buf).await
    }

    async fn writev<B: IoBuf>(&mut self, bufs: Vec<B>) -> BufResult<usize, Vec<B>> {
        let fd = self.inner.as_raw_fd();
        let inner = &mut self.inner;
        writev_bufs(fd, |cx, b| Pin::new(&mut *inner).poll_write(cx, b), bufs).await
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        self.inner.shutdown(Shutdown::Write).await.map_err(to_io)
    }
}

// ---- split halves -----------------------------------------------------------------------

/// The glommio stream shared by the two halves of a split [`TcpStream`].
///
/// Glommio 0.9 has no split of its own. Its stream keeps separate state per direction (a
/// read poll source and timeout for `poll_read`, a write poll source and timeout for
/// `poll_write`, each with its own waker), so a read waiting in one task and a write waiting in
/// another do not disturb each other. Access goes through a `RefCell` borrowed only for the
/// duration of one synchronous `poll_read`/`poll_write` call, never across an `.await`, and both
/// halves live on one thread (`Rc`, `!Send`), so the borrows never overlap: no `unsafe`, no
/// aliased `&mut`. Were one ever to overlap, the half fails that call with an error rather than
/// panicking. The descriptor closes when the last half is dropped.
type Shared = std::rc::Rc<std::cell::RefCell<glommio::net::TcpStream>>;

fn busy() -> io::Error {
    io::Error::new(io::ErrorKind::ResourceBusy, "the other half of this stream is in the middle of a call")
}

/// The read half of a split [`TcpStream`].
pub struct TcpReadHalf {
    /// The stream's multishot receive, if armed; declared first, as in [`TcpStream`].
    rx: corepin_uring::aux::Receiver,
    fd: RawFd,
    inner: Shared,
}

/// The write half of a split [`TcpStream`]. Dropping it shuts the write direction down (FIN),
/// as Monoio's write half does; the socket closes when both halves are gone.
pub struct TcpWriteHalf {
    inner: Shared,
    fd: RawFd,
}

impl TcpReadHalf {
    async fn read_into<B: IoBufMut>(&mut self, buf: B, cancel: Option<&CancelToken>) -> BufResult<usize, B> {
        let buf = corepin_uring::queued_first!(&mut self.rx, self.fd, buf, cancel);
        let inner = &self.inner;
        poll_read_into(
            move |cx, slice| match inner.try_borrow_mut() {
                Ok(mut s) => Pin::new(&mut *s).poll_read(cx, slice),
                Err(_) => Poll::Ready(Err(busy())),
            },
            buf,
            cancel,
        )
        .await
    }
}

impl AsyncReadRent for TcpReadHalf {
    fn read<B: IoBufMut>(&mut self, buf: B) -> impl Future<Output = BufResult<usize, B>> {
        self.read_into(buf, None)
    }

    fn read_cancelable<B: IoBufMut>(
        &mut self,
        buf: B,
        cancel: &CancelToken,
    ) -> impl Future<Output = BufResult<usize, B>> {
        self.read_into(buf, Some(cancel))
    }
}

/// `poll_write` on the shared stream, borrowed for this one call.
fn poll_write_shared(inner: &Shared, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
    match inner.try_borrow_mut() {
        Ok(mut s) => Pin::new(&mut *s).poll_write(cx, buf),
        Err(_) => Poll::Ready(Err(busy())),
    }
}

impl AsyncWriteRent for TcpWriteHalf {
    async fn write<B: IoBuf>(&mut self, buf: B) -> BufResult<usize, B> {
        let inner = &self.inner;
        write_buf(self.fd, |cx, b| poll_write_shared(inner, cx, b), buf).await
    }

    async fn writev<B: IoBuf>(&mut self, bufs: Vec<B>) -> BufResult<usize, Vec<B>> {
        let inner = &self.inner;
        writev_bufs(self.fd, |cx, b| poll_write_shared(inner, cx, b), bufs).await
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        shutdown_write(self.fd)
    }
}

impl Drop for TcpWriteHalf {
    fn drop(&mut self) {
        // Errors (the peer already reset the connection) leave nothing to do.
        let _ = shutdown_write(self.fd);
    }
}

/// `shutdown(fd, SHUT_WR)`: a synchronous syscall (glommio's own shutdown is one too).
fn shutdown_write(fd: RawFd) -> io::Result<()> {
    // SAFETY: `fd` belongs to the shared stream, which the calling half keeps open; shutdown
    // takes no pointers.
    if unsafe { libc::shutdown(fd, libc::SHUT_WR) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl runtime::TcpStream for TcpStream {
    type ReadHalf = TcpReadHalf;
    type WriteHalf = TcpWriteHalf;

    fn into_split(self) -> (TcpReadHalf, TcpWriteHalf) {
        let fd = self.inner.as_raw_fd();
        let Self { rx, inner, .. } = self;
        let shared: Shared = std::rc::Rc::new(std::cell::RefCell::new(inner));
        (TcpReadHalf { rx, fd, inner: shared.clone() }, TcpWriteHalf { inner: shared, fd })
    }

    async fn connect(addr: SocketAddr) -> io::Result<Self> {
        require_engine()?;
        let inner = glommio::net::TcpStream::connect(addr).await.map_err(to_io)?;
        Ok(Self::wrap(inner))
    }

    fn from_std(stream: std::net::TcpStream) -> io::Result<Self> {
        require_engine()?;
        let fd = stream.into_raw_fd();
        // SAFETY: `fd` is a connected TCP socket whose ownership `into_raw_fd` just gave us;
        // glommio's stream takes it over and closes it on drop.
        let inner = unsafe { glommio::net::TcpStream::from_raw_fd(fd) };
        Ok(Self::wrap(inner))
    }

    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.inner.peer_addr().map_err(to_io)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr().map_err(to_io)
    }

    fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.inner.set_nodelay(on).map_err(to_io)
    }

    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }

    /// The stream's multishot receive into the provided buffers of corepin's auxiliary ring
    /// (glommio has neither of its own; [`corepin_uring::aux::read_pooled`]): the kernel picks
    /// a buffer only when data arrives, so a waiting connection holds none, and a dropped read
    /// loses nothing. Without the aux ring (it could not be set up), or when every buffer is
    /// lent out (`ENOBUFS`: nothing was consumed), the read takes the core pool's fallback.
    async fn read_pooled(&mut self) -> io::Result<PooledBuf> {
        let fd = self.inner.as_raw_fd();
        corepin_uring::aux::read_pooled(self, |s: &mut Self| &mut s.rx, fd).await
    }

    async fn writable(&mut self) -> io::Result<()> {
        if self.write_watch.is_none() {
            self.write_watch = Some(WriteWatch::new(self.inner.as_raw_fd())?);
        }
        match &self.write_watch {
            Some(w) => w.wait().await,
            None => Err(io::Error::other("write watch missing")),
        }
    }
}

/// A UDP socket (glommio `UdpSocket`).
///
/// Glommio tries a non-blocking `sendmsg`/`recvmsg` on the caller's memory first; when it
/// has to wait it goes through io_uring with a buffer of its own and copies.
pub struct UdpSocket {
    inner: glommio::net::UdpSocket,
    /// Readiness for the core's non-blocking `sendmsg`/`recvmsg` path, made on first use.
    readiness: std::cell::OnceCell<FdWatch>,
}

impl UdpSocket {
    fn readiness(&self) -> io::Result<&FdWatch> {
        if let Some(w) = self.readiness.get() {
            return Ok(w);
        }
        let w = <FdWatch as runtime::FdWatch>::new(self.inner.as_raw_fd())?;
        Ok(self.readiness.get_or_init(|| w))
    }
}

impl runtime::UdpSocket for UdpSocket {
    fn from_std(socket: std::net::UdpSocket) -> io::Result<Self> {
        require_engine()?;
        let fd = socket.into_raw_fd();
        // SAFETY: `fd` is a bound UDP socket whose ownership `into_raw_fd` just gave us;
        // glommio's socket takes it over and closes it on drop.
        let inner = unsafe { glommio::net::UdpSocket::from_raw_fd(fd) };
        Ok(Self { inner, readiness: std::cell::OnceCell::new() })
    }

    async fn send_to<B: IoBuf>(&self, buf: B, to: SocketAddr) -> BufResult<usize, B> {
        let res = self.inner.send_to(buf.as_init_slice(), to).await.map_err(to_io);
        BufResult(res, buf)
    }

    async fn recv_from<B: IoBufMut>(&self, mut buf: B) -> BufResult<(usize, SocketAddr), B> {
        let total = buf.bytes_total();
        // SAFETY: the memory is valid for writes of `total` bytes while `buf` lives (IoBufMut
        // contract); `buf` is owned by this future and not touched until the receive ends.
        // Glommio either recvmsg(2)s into it directly or copies a received datagram into it;
        // it never reads the uninitialised bytes, and if this future is dropped mid-wait the
        // kernel writes into glommio's own buffer, not this one.
        let slice = unsafe { std::slice::from_raw_parts_mut(buf.stable_mut_ptr(), total) };
        let res = self.inner.recv_from(slice).await.map_err(to_io);
        if let Ok((n, _)) = res {
            // SAFETY: `n <= total` bytes at the start of the buffer were written.
            unsafe { buf.set_init(n.min(total)) };
        }
        BufResult(res, buf)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr().map_err(to_io)
    }

    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }

    async fn readable(&self) -> io::Result<()> {
        runtime::FdWatch::readable(self.readiness()?).await
    }

    async fn writable(&self) -> io::Result<()> {
        runtime::FdWatch::writable(self.readiness()?).await
    }
}
