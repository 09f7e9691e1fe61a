//! corepin on Monoio: io_uring with the setup flags corepin asks for (walking down a fallback
//! chain when the kernel refuses one), and Monoio's epoll driver when io_uring is unavailable.
//!
//! Buffers cross into Monoio through [`Owned`], a newtype that implements Monoio's buffer
//! traits by forwarding to corepin's: a move, never a copy.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::Path;
use std::time::Duration;

use corepin_core::buf::{BufResult, IoBuf, IoBufMut};
use corepin_core::caps::{io_uring_unavailable, Capabilities, Driver, KernelSupport, Mechanism};
use corepin_core::io::{cancelled_error, is_cancelled, AsyncReadRent, AsyncWriteRent, CancelToken};
use corepin_core::runtime::{self as rt, EngineError, EngineSettings, Metadata, OpenOptions, RingFlags};
use monoio::io::{AsyncReadRent as _, AsyncWriteRent as _, CancelableAsyncReadRent as _};

/// The Monoio backend.
pub struct MonoioRuntime;

thread_local! {
    static CAPS: RefCell<Option<Capabilities>> = const { RefCell::new(None) };
}

/// A corepin buffer presented to Monoio. Forwarding only: the memory is the caller's.
pub struct Owned<B>(pub B);

// SAFETY: forwards to corepin's IoBuf, whose contract (stable pointer, `bytes_init`
// initialised bytes, valid while the value lives) is the one Monoio requires.
unsafe impl<B: IoBuf> monoio::buf::IoBuf for Owned<B> {
    fn read_ptr(&self) -> *const u8 {
        self.0.stable_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.0.bytes_init()
    }
}

// SAFETY: forwards to corepin's IoBufMut, whose contract matches Monoio's.
unsafe impl<B: IoBufMut> monoio::buf::IoBufMut for Owned<B> {
    fn write_ptr(&mut self) -> *mut u8 {
        self.0.stable_mut_ptr()
    }
    fn bytes_total(&mut self) -> usize {
        self.0.bytes_total()
    }
    unsafe fn set_init(&mut self, pos: usize) {
        // SAFETY: Monoio calls this with the byte count the kernel wrote.
        unsafe { self.0.set_init(pos) }
    }
}

/// Several corepin buffers as one `iovec` array for a gathered write.
struct IoVecs<B> {
    bufs: Vec<B>,
    iovecs: Vec<libc::iovec>,
}

impl<B: IoBuf> IoVecs<B> {
    fn new(bufs: Vec<B>) -> Self {
        let iovecs = bufs
            .iter()
            .map(|b| libc::iovec { iov_base: b.stable_ptr() as *mut libc::c_void, iov_len: b.bytes_init() })
            .collect();
        Self { bufs, iovecs }
    }
}

// SAFETY: the iovecs point into the buffers' stable memory, owned by the same value; the
// Vec's heap array does not move when the value moves.
unsafe impl<B: IoBuf> monoio::buf::IoVecBuf for IoVecs<B> {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iovecs.as_ptr()
    }
    fn read_iovec_len(&self) -> usize {
        self.iovecs.len()
    }
}

fn back<T, B>((res, buf): (io::Result<T>, Owned<B>)) -> BufResult<T, B> {
    BufResult(res, buf.0)
}

type UringRt = monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>>;
type LegacyRt = monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>>;

fn build_uring(settings: &EngineSettings) -> Result<(UringRt, RingFlags), String> {
    let mut last = String::new();
    for flags in settings.ring_flags.fallbacks() {
        let built = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(settings.ring_entries)
            .uring_builder(flags.uring_builder())
            .enable_timer()
            .build();
        match built {
            Ok(r) => return Ok((r, flags)),
            Err(e) => {
                tracing::debug!(?flags, "io_uring refused these setup flags: {e}");
                last = format!("{e} (with {:?})", flags.names());
            }
        }
    }
    Err(last)
}

fn report(driver: Driver, settings: &EngineSettings, flags: Option<RingFlags>) -> Capabilities {
    let k = KernelSupport::get();
    let uring = driver == Driver::IoUring;
    Capabilities {
        runtime: "monoio",
        driver,
        ring_flags_requested: settings.ring_flags,
        ring_flags: flags,
        ring_entries: if uring { settings.ring_entries.max(256) } else { 0 },
        splice: Mechanism::fallback(
            k.splice,
            "sendfile(2) (io_uring runs every SPLICE on an io-wq thread; see docs/zero-copy.md)",
        ),
        send_zc: Mechanism::fallback(k.send_zc, "send (monoio 0.2 has no SEND_ZC op)"),
        registered_buffers: Mechanism::fallback(
            k.registered_buffers,
            "plain buffers (monoio 0.2 exposes no fixed buffers)",
        ),
        multishot_accept: Mechanism::fallback(k.multishot_accept, "one accept per connection"),
        multishot_recv: Mechanism::fallback(k.multishot_recv, "one recv per read"),
        buffer_rings: Mechanism::fallback(k.buffer_rings, "caller-owned buffers"),
        fd_readiness: if uring { "io_uring POLL_ADD (native)" } else { "epoll (native)" },
        file_transfer: if uring {
            "sendfile(2), waiting for room with io_uring POLL_ADD"
        } else {
            "sendfile(2), waiting for room with epoll"
        },
        file_reads: if uring {
            "io_uring READ: a page-cache miss waits in the kernel, not on the worker"
        } else {
            "pread(2) on the worker: a page-cache miss blocks the core (the epoll driver has no async file I/O)"
        },
        rent_copies: false,
        notes: Vec::new(),
    }
}

fn run_on<D: monoio::Driver, F: Future>(mut rt: monoio::Runtime<D>, fut: F) -> F::Output {
    let out = rt.block_on(fut);
    // Dropping the runtime here tears down whatever is still in flight on this core.
    drop(rt);
    out
}

impl rt::Runtime for MonoioRuntime {
    const NAME: &'static str = "monoio";
    type TcpListener = TcpListener;
    type TcpStream = TcpStream;
    type UdpSocket = UdpSocket;
    type File = File;
    type FdWatch = FdWatch;

    fn block_on<F, Fut>(settings: &EngineSettings, main: F) -> Result<Fut::Output, EngineError>
    where
        F: FnOnce() -> Fut,
        Fut: Future,
    {
        let unavailable =
            if settings.force_fallback { Some("forced by configuration".to_string()) } else { io_uring_unavailable() };
        let out = match unavailable {
            None => match build_uring(settings) {
                Ok((r, flags)) => {
                    CAPS.with(|c| *c.borrow_mut() = Some(report(Driver::IoUring, settings, Some(flags))));
                    run_on(r, async move { main().await })
                }
                Err(reason) => {
                    tracing::warn!(
                        cpu = settings.cpu,
                        "io_uring ring setup failed ({reason}); using monoio's epoll driver"
                    );
                    legacy(settings, format!("ring setup failed: {reason}"), main)?
                }
            },
            Some(reason) => legacy(settings, reason, main)?,
        };
        CAPS.with(|c| c.borrow_mut().take());
        Ok(out)
    }

    fn capabilities() -> Option<Capabilities> {
        CAPS.with(|c| c.borrow().clone())
    }

    fn spawn_detached<F: Future<Output = ()> + 'static>(fut: F) {
        drop(monoio::spawn(fut));
    }

    fn sleep(dur: Duration) -> impl Future<Output = ()> {
        monoio::time::sleep(dur)
    }
}

fn legacy<F, Fut>(settings: &EngineSettings, reason: String, main: F) -> Result<Fut::Output, EngineError>
where
    F: FnOnce() -> Fut,
    Fut: Future,
{
    let r: LegacyRt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .with_entries(settings.ring_entries)
        .enable_timer()
        .build()
        .map_err(|e| EngineError::Build {
            runtime: "monoio",
            cpu: settings.cpu,
            reason: format!("epoll driver: {e}"),
        })?;
    CAPS.with(|c| *c.borrow_mut() = Some(report(Driver::Epoll { reason }, settings, None)));
    Ok(run_on(r, async move { main().await }))
}

/// A listening socket.
pub struct TcpListener(monoio::net::TcpListener);

impl rt::TcpListener for TcpListener {
    type Stream = TcpStream;
    fn from_std(listener: std::net::TcpListener) -> io::Result<Self> {
        monoio::net::TcpListener::from_std(listener).map(Self)
    }
    async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let (s, a) = self.0.accept().await?;
        Ok((TcpStream(s), a))
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// A connected stream.
pub struct TcpStream(monoio::net::TcpStream);

impl AsyncReadRent for TcpStream {
    async fn read<B: IoBufMut>(&mut self, buf: B) -> BufResult<usize, B> {
        back(self.0.read(Owned(buf)).await)
    }

    /// Monoio cancels the in-flight recv with `IORING_OP_ASYNC_CANCEL` and we await its
    /// completion: the result is either `ECANCELED` (nothing consumed) or the bytes it read.
    async fn read_cancelable<B: IoBufMut>(&mut self, buf: B, cancel: &CancelToken) -> BufResult<usize, B> {
        if cancel.is_cancelled() {
            return BufResult(Err(cancelled_error()), buf);
        }
        let canceller = monoio::io::Canceller::new();
        let mut read = std::pin::pin!(self.0.cancelable_read(Owned(buf), canceller.handle()));
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
}

impl AsyncWriteRent for TcpStream {
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
    async fn connect(addr: SocketAddr) -> io::Result<Self> {
        monoio::net::TcpStream::connect_addr(addr).await.map(Self)
    }
    fn from_std(stream: std::net::TcpStream) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        monoio::net::TcpStream::from_std(stream).map(Self)
    }
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.0.peer_addr()
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
    fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.0.set_nodelay(on)
    }
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
    async fn writable(&mut self) -> io::Result<()> {
        // Not relaxed: on the epoll driver Monoio then re-checks with poll(2) and waits for a
        // fresh edge if its cached readiness is stale (our sendfile just hit EAGAIN).
        self.0.writable(false).await
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
}

/// A file.
pub struct File(monoio::fs::File);

impl rt::File for File {
    async fn open_with(path: &Path, o: OpenOptions) -> io::Result<Self> {
        monoio::fs::OpenOptions::new()
            .read(o.read)
            .write(o.write)
            .create(o.create)
            .truncate(o.truncate)
            .open(path)
            .await
            .map(Self)
    }
    fn from_std(file: std::fs::File) -> io::Result<Self> {
        monoio::fs::File::from_std(file).map(Self)
    }
    async fn read_at<B: IoBufMut>(&self, buf: B, pos: u64) -> BufResult<usize, B> {
        back(self.0.read_at(Owned(buf), pos).await)
    }
    async fn write_at<B: IoBuf>(&self, buf: B, pos: u64) -> BufResult<usize, B> {
        back(self.0.write_at(Owned(buf), pos).await)
    }
    async fn metadata(&self) -> io::Result<Metadata> {
        Metadata::from_fd(self.0.as_raw_fd())
    }
    async fn sync_all(&self) -> io::Result<()> {
        self.0.sync_all().await
    }
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Readiness of a foreign descriptor: a duplicate of it, adopted by Monoio, awaited with
/// `POLL_ADD` on io_uring or epoll on the fallback driver.
pub struct FdWatch(monoio::net::udp::UdpSocket);

impl rt::FdWatch for FdWatch {
    fn new(fd: RawFd) -> io::Result<Self> {
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor the caller keeps open returns a new one we own.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `dup` is a fresh descriptor owned by nobody else. It is only polled, never
        // read or written as a UDP socket.
        let std_sock = unsafe { std::net::UdpSocket::from_raw_fd(dup) };
        match monoio::net::udp::UdpSocket::from_std(std_sock) {
            Ok(s) => Ok(Self(s)),
            Err(e) => Err(e),
        }
    }
    async fn readable(&self) -> io::Result<()> {
        self.0.readable(false).await
    }
}

/// Monoio forced onto its epoll driver: the fallback taken where io_uring is unavailable,
/// selectable on purpose (`corepin --epoll`) and tested with the same conformance bodies.
pub struct MonoioEpollRuntime;

impl rt::Runtime for MonoioEpollRuntime {
    const NAME: &'static str = "monoio-epoll";
    type TcpListener = TcpListener;
    type TcpStream = TcpStream;
    type UdpSocket = UdpSocket;
    type File = File;
    type FdWatch = FdWatch;

    fn block_on<F, Fut>(settings: &EngineSettings, main: F) -> Result<Fut::Output, EngineError>
    where
        F: FnOnce() -> Fut,
        Fut: Future,
    {
        let settings = EngineSettings { force_fallback: true, ..settings.clone() };
        <MonoioRuntime as rt::Runtime>::block_on(&settings, main)
    }
    fn capabilities() -> Option<Capabilities> {
        <MonoioRuntime as rt::Runtime>::capabilities()
    }
    fn spawn_detached<F: Future<Output = ()> + 'static>(fut: F) {
        <MonoioRuntime as rt::Runtime>::spawn_detached(fut)
    }
    fn sleep(dur: Duration) -> impl Future<Output = ()> {
        <MonoioRuntime as rt::Runtime>::sleep(dur)
    }
}
