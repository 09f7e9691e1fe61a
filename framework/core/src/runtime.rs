//! The runtime contract: what every backend implements so that a service written once runs
//! on each of them. Nothing here names an engine; backends are leaves that depend on this.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::buf::{BufResult, IoBuf, IoBufMut};
use crate::caps::Capabilities;
use crate::io::{AsyncReadRent, AsyncWriteRent};
use crate::pool::PooledBuf;
use crate::udp::{RecvMeta, SendMeta};

/// One engine, run as one executor per pinned core.
pub trait Runtime: Sized + 'static {
    /// The backend's name in reports, logs and test names (`monoio`, `monoio-epoll`, `glommio`,
    /// `tokio-uring`, `compio`). The CLI's `--runtime` names come from the facade's backend table, which
    /// lists engines, not driver variants such as `monoio-epoll`.
    const NAME: &'static str;

    /// A listening TCP socket adopted from a prepared `SO_REUSEPORT` std listener.
    type TcpListener: TcpListener<Stream = Self::TcpStream>;
    /// A connected TCP stream.
    type TcpStream: TcpStream;
    /// A UDP socket with owned-buffer datagram I/O.
    type UdpSocket: UdpSocket;
    /// A file with positional owned-buffer I/O.
    type File: File;
    /// Readiness of a raw descriptor this runtime does not own (an eventfd, an AF_XDP socket).
    type FdWatch: FdWatch;

    /// Builds this engine on the current thread (already pinned by the launcher) with
    /// `settings`, records its capability report, and runs `main` to completion on it. The
    /// engine and everything still in flight on it are torn down before this returns.
    /// Implementations claim the thread with [`EngineGuard::claim`](crate::engine::EngineGuard::claim)
    /// first, so a second engine on the same thread is refused and a panic in `main` frees it.
    fn block_on<F, Fut>(settings: &EngineSettings, main: F) -> Result<Fut::Output, EngineError>
    where
        F: FnOnce() -> Fut,
        Fut: Future;

    /// The capability report of the engine running on this thread (`None` outside one).
    fn capabilities() -> Option<Capabilities> {
        crate::engine::current_capabilities()
    }

    /// Spawns a task on this core's executor. Prefer [`crate::task::spawn`], which adds a
    /// join handle and panic accounting on top of this.
    fn spawn_detached<F: Future<Output = ()> + 'static>(fut: F);

    /// Completes after `dur`.
    fn sleep(dur: Duration) -> impl Future<Output = ()>;
}

/// A TCP listener.
pub trait TcpListener: Sized + 'static {
    /// The stream type its connections have.
    type Stream: TcpStream;
    /// Adopts a bound, listening, non-blocking std listener.
    fn from_std(listener: std::net::TcpListener) -> io::Result<Self>;
    /// Accepts one connection. Backends with multishot accept keep one armed operation and
    /// hand out its completions here (reported as `multishot accept`); the fallback is one
    /// accept operation per call.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>>;
    /// The address it listens on.
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

/// A connected TCP stream with owned-buffer I/O.
pub trait TcpStream: AsyncReadRent + AsyncWriteRent + Sized + 'static {
    /// The read half [`into_split`](Self::into_split) gives (`read_cancelable` included).
    type ReadHalf: AsyncReadRent + 'static;
    /// The write half [`into_split`](Self::into_split) gives.
    type WriteHalf: AsyncWriteRent + 'static;

    /// Splits the stream into a read half and a write half that two tasks on this core can
    /// drive at the same time (full duplex): a read waiting in one never holds up a write in
    /// the other. No descriptor is duplicated. `shutdown` on the write half sends FIN while the
    /// read half keeps reading; dropping the write half does the same; the socket closes when
    /// both halves are gone.
    fn into_split(self) -> (Self::ReadHalf, Self::WriteHalf);

    /// Connects to `addr`.
    fn connect(addr: SocketAddr) -> impl Future<Output = io::Result<Self>>;
    /// Adopts a connected std stream.
    fn from_std(stream: std::net::TcpStream) -> io::Result<Self>;
    /// The remote address.
    fn peer_addr(&self) -> io::Result<SocketAddr>;
    /// The local address.
    fn local_addr(&self) -> io::Result<SocketAddr>;
    /// Sets TCP_NODELAY.
    fn set_nodelay(&self, on: bool) -> io::Result<()>;
    /// The descriptor, for socket options and forced shutdown at drain.
    fn as_raw_fd(&self) -> RawFd;

    /// Completes once the socket can take more bytes. Call it only after a transfer made
    /// directly on the descriptor (such as `sendfile(2)`) failed with `EAGAIN`: backends
    /// built on edge-triggered readiness may report one stale readiness, never a missed one.
    fn writable(&mut self) -> impl Future<Output = io::Result<()>>;

    /// Writes `buf` like [`write`](AsyncWriteRent::write), by zero-copy send where the engine
    /// has one (`IORING_OP_SEND_ZC`: the kernel sends from `buf` itself, and the buffer comes
    /// back only after its notification completion, so it is never reused too early). The
    /// fallback, and the default, is a plain write. Worth it only above the threshold
    /// measured in docs/zero-copy.md.
    fn write_zc<B: IoBuf>(&mut self, buf: B) -> impl Future<Output = BufResult<usize, B>> {
        self.write(buf)
    }

    /// Reads into a buffer lent by the core rather than one the caller holds while waiting:
    /// engines with provided-buffer rings (and multishot receive) pick the buffer only when
    /// data arrives, so an idle connection holds none. The fallback, and the default, takes a
    /// buffer from the core's pool ([`crate::pool`]) when the read starts. An empty buffer is
    /// end of stream. Dropping the buffer returns it to its pool.
    fn read_pooled(&mut self) -> impl Future<Output = io::Result<PooledBuf>> {
        crate::pool::read_fallback(self)
    }

    /// Sends up to `len` bytes of `file`, starting at `offset`, from the page cache to the
    /// socket without passing through user space, and returns how many were sent (at least
    /// one unless `len` is 0; fewer than `len` is a short write, as with `write`). `Ok(0)` for
    /// a non-zero `len` means the file ended before `offset`.
    ///
    /// The default is `sendfile(2)` on the non-blocking socket, waiting with
    /// [`writable`](Self::writable) whenever the socket buffer is full. Each call is a
    /// synchronous syscall, so the file is only borrowed while the future runs: dropping the
    /// future leaves nothing in flight. A page-cache miss is read inside that syscall (see
    /// docs/zero-copy.md). `EINVAL`/`ENOSYS` mean the file system cannot do this; callers
    /// fall back to reading and writing.
    fn send_file(&mut self, file: BorrowedFd<'_>, offset: u64, len: usize) -> impl Future<Output = io::Result<usize>> {
        async move {
            if len == 0 {
                return Ok(0);
            }
            // sendfile(2) moves at most 0x7ffff000 bytes per call.
            let len = len.min(0x7fff_f000);
            let mut off = i64::try_from(offset)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file offset beyond i64::MAX"))?;
            let sock = self.as_raw_fd();
            loop {
                let res = sendfile_nonblocking(sock, file.as_raw_fd(), &mut off, len);
                match res {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable().await?,
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

/// One `sendfile(2)` that never blocks the thread. Completion-based engines often accept
/// sockets in blocking mode (io_uring does not need `O_NONBLOCK`), and a blocking sendfile
/// would stall the whole core until the client reads; so a blocking socket is switched to
/// non-blocking for this one call and back (the caller holds the stream exclusively, so no
/// other operation on it can observe the switch).
fn sendfile_nonblocking(sock: RawFd, file: RawFd, off: &mut i64, len: usize) -> io::Result<usize> {
    // SAFETY: F_GETFL only reads the flags of a descriptor the caller keeps open.
    let flags = unsafe { libc::fcntl(sock, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let blocking = flags & libc::O_NONBLOCK == 0;
    // SAFETY: F_SETFL on the caller's open socket changes only its O_NONBLOCK flag.
    if blocking && unsafe { libc::fcntl(sock, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are open for the duration of the call (the caller owns the
    // socket and borrows the file); `off` is a valid in/out offset that sendfile updates
    // instead of the file position.
    let n = unsafe { libc::sendfile(sock, file, off, len) };
    let res = if n >= 0 { Ok(n as usize) } else { Err(io::Error::last_os_error()) };
    if blocking {
        // SAFETY: as above; restores the flags read before the call.
        unsafe { libc::fcntl(sock, libc::F_SETFL, flags) };
    }
    res
}

/// A UDP socket with owned-buffer datagram I/O.
pub trait UdpSocket: Sized + 'static {
    /// Adopts a bound, non-blocking std socket.
    fn from_std(socket: std::net::UdpSocket) -> io::Result<Self>;
    /// Binds a new socket to `addr`.
    fn bind(addr: SocketAddr) -> io::Result<Self> {
        let socket = std::net::UdpSocket::bind(addr)?;
        socket.set_nonblocking(true)?;
        Self::from_std(socket)
    }
    /// Sends the initialised bytes of `buf` as one datagram to `to`.
    fn send_to<B: IoBuf>(&self, buf: B, to: SocketAddr) -> impl Future<Output = BufResult<usize, B>>;
    /// Receives one datagram into `buf` (from its start, up to its capacity).
    fn recv_from<B: IoBufMut>(&self, buf: B) -> impl Future<Output = BufResult<(usize, SocketAddr), B>>;
    /// The bound address.
    fn local_addr(&self) -> io::Result<SocketAddr>;
    /// The descriptor.
    fn as_raw_fd(&self) -> RawFd;
    /// Completes when a datagram can be received without blocking (level-triggered). Used by
    /// the core's non-blocking `recvmsg(2)` path after `EAGAIN`.
    fn readable(&self) -> impl Future<Output = io::Result<()>>;

    /// Sends `buf` as one datagram, or as several of `meta.segment_size` bytes (GSO), with the
    /// ECN codepoint and source address of `meta`. Call [`crate::udp::enable_cmsgs`] on the
    /// socket first to learn what the kernel takes. The default, written once here, is a
    /// non-blocking `sendmsg(2)` that waits with [`writable`](Self::writable) on `EAGAIN`;
    /// engines with a native SENDMSG op may override it with the same codec
    /// ([`crate::udp::MsgHdr`]).
    fn send_msg<B: IoBuf>(&self, buf: B, meta: &SendMeta) -> impl Future<Output = BufResult<usize, B>> {
        async move {
            loop {
                match crate::udp::send_msg_nonblocking(self.as_raw_fd(), &buf, meta) {
                    Ok(n) => return BufResult(Ok(n), buf),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if let Err(e) = self.writable().await {
                            return BufResult(Err(e), buf);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return BufResult(Err(e), buf),
                }
            }
        }
    }

    /// Receives one datagram (or, with GRO on, several coalesced ones of `stride` bytes each)
    /// into `buf`, with its source, destination address and ECN codepoint. A datagram longer
    /// than the buffer is an error carrying [`crate::udp::RecvTruncated`]. The default is a
    /// non-blocking `recvmsg(2)` that waits with [`readable`](Self::readable) on `EAGAIN`.
    fn recv_msg<B: IoBufMut>(&self, buf: B) -> impl Future<Output = BufResult<RecvMeta, B>> {
        async move {
            let mut buf = buf;
            loop {
                match crate::udp::recv_msg_nonblocking(self.as_raw_fd(), &mut buf) {
                    Ok(meta) => return BufResult(Ok(meta), buf),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if let Err(e) = self.readable().await {
                            return BufResult(Err(e), buf);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return BufResult(Err(e), buf),
                }
            }
        }
    }
    /// Completes when a datagram can be sent without blocking (level-triggered).
    fn writable(&self) -> impl Future<Output = io::Result<()>>;
}

/// How to open a file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// Open for reading.
    pub read: bool,
    /// Open for writing.
    pub write: bool,
    /// Create it if missing.
    pub create: bool,
    /// Truncate it to zero length.
    pub truncate: bool,
}

impl OpenOptions {
    /// Read-only.
    pub const READ: Self = Self { read: true, write: false, create: false, truncate: false };
    /// Read-write, created if missing, truncated.
    pub const CREATE: Self = Self { read: true, write: true, create: true, truncate: true };

    /// The same options as `std::fs::OpenOptions` (for backends that adopt std files).
    pub fn to_std(self) -> std::fs::OpenOptions {
        let mut o = std::fs::OpenOptions::new();
        o.read(self.read).write(self.write).create(self.create).truncate(self.truncate);
        o
    }
}

/// What a file server needs to know about a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metadata {
    /// Size in bytes.
    pub len: u64,
    /// Last modification time.
    pub modified: SystemTime,
    /// A regular file.
    pub is_file: bool,
    /// A directory.
    pub is_dir: bool,
    /// Inode number (for validators).
    pub ino: u64,
    /// Device number (for validators).
    pub dev: u64,
}

impl Metadata {
    /// Reads metadata of an open descriptor with `fstat(2)`: the named fallback for engines
    /// without an asynchronous stat.
    pub fn from_fd(fd: RawFd) -> io::Result<Self> {
        // SAFETY: a zeroed `stat` is a valid out-parameter; fstat fills it or fails.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is a descriptor the caller owns; `st` is a valid pointer.
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self::from_stat(&st))
    }

    /// The metadata a `stat` structure describes.
    pub fn from_stat(st: &libc::stat) -> Self {
        let fmt = st.st_mode & libc::S_IFMT;
        let modified = SystemTime::UNIX_EPOCH
            + Duration::new(st.st_mtime.max(0) as u64, st.st_mtime_nsec.clamp(0, 999_999_999) as u32);
        Self {
            len: st.st_size.max(0) as u64,
            modified,
            is_file: fmt == libc::S_IFREG,
            is_dir: fmt == libc::S_IFDIR,
            ino: st.st_ino,
            dev: st.st_dev,
        }
    }
}

/// A file with positional owned-buffer I/O.
pub trait File: Sized + 'static {
    /// Opens `path` with `options`.
    fn open_with(path: &Path, options: OpenOptions) -> impl Future<Output = io::Result<Self>>;
    /// Adopts a file opened by other means (for example `openat2(2)` confined to a root).
    fn from_std(file: std::fs::File) -> io::Result<Self>;
    /// Opens `path` read-only.
    fn open(path: &Path) -> impl Future<Output = io::Result<Self>> {
        Self::open_with(path, OpenOptions::READ)
    }
    /// Reads at `pos` into `buf` (from its start, up to its capacity).
    fn read_at<B: IoBufMut>(&self, buf: B, pos: u64) -> impl Future<Output = BufResult<usize, B>>;
    /// Reads up to `len` bytes at `pos` into a buffer the core lends: one of the engine's
    /// registered (fixed) buffers where the backend has them (`IORING_OP_READ_FIXED`, which
    /// copies from the page cache into pages pinned once instead of on every read), else a
    /// chunk of the core's pool ([`pool::read_at_fallback`](crate::pool::read_at_fallback)).
    /// The buffer goes back when dropped; an empty one is end of file. A registered buffer
    /// holds at most its own size, so a read may return fewer bytes than asked for.
    fn read_pooled_at(&self, pos: u64, len: usize) -> impl Future<Output = io::Result<crate::pool::PooledBuf>> {
        crate::pool::read_at_fallback(self, pos, len)
    }
    /// Writes the initialised bytes of `buf` at `pos`.
    fn write_at<B: IoBuf>(&self, buf: B, pos: u64) -> impl Future<Output = BufResult<usize, B>>;
    /// Size, times and kind of the open file.
    fn metadata(&self) -> impl Future<Output = io::Result<Metadata>>;
    /// Flushes data and metadata to the device.
    fn sync_all(&self) -> impl Future<Output = io::Result<()>>;
    /// The descriptor.
    fn as_raw_fd(&self) -> RawFd;
}

/// Waits for a descriptor the runtime does not own to become readable or writable.
pub trait FdWatch: Sized + 'static {
    /// Starts watching `fd`; the caller keeps ownership and must keep it open while watched.
    fn new(fd: RawFd) -> io::Result<Self>;
    /// Completes when the descriptor is readable (level-triggered: it completes again at once
    /// while data remains).
    fn readable(&self) -> impl Future<Output = io::Result<()>>;
    /// Completes when the descriptor is writable (level-triggered: it completes again at once
    /// while there is room), or reports an error or hang-up on it.
    fn writable(&self) -> impl Future<Output = io::Result<()>>;
}

/// io_uring setup flags a backend may request; each is tried and dropped if the kernel or the
/// engine refuses it, and the capability report says which were accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingFlags {
    /// `IORING_SETUP_SINGLE_ISSUER`: only the worker thread submits.
    pub single_issuer: bool,
    /// `IORING_SETUP_DEFER_TASKRUN`: completions run when the worker asks for them, not as
    /// cross-CPU interrupts (needs single_issuer).
    pub defer_taskrun: bool,
    /// `IORING_SETUP_COOP_TASKRUN`: no IPI on completion; the weaker cousin of defer_taskrun.
    pub coop_taskrun: bool,
    /// `IORING_SETUP_SQPOLL` with this idle time in milliseconds (costs a kernel thread per ring).
    pub sqpoll_idle_ms: Option<u32>,
}

impl RingFlags {
    /// The flags corepin asks for by default: the measured best on a small VM.
    pub const BEST: Self = Self { single_issuer: true, defer_taskrun: true, coop_taskrun: false, sqpoll_idle_ms: None };
    /// No setup flags at all (the engines' own defaults).
    pub const NONE: Self =
        Self { single_issuer: false, defer_taskrun: false, coop_taskrun: false, sqpoll_idle_ms: None };

    /// The fallback chain tried in order, best first, ending with no flags.
    pub fn fallbacks(self) -> Vec<RingFlags> {
        let mut chain = vec![self];
        let mut cur = self;
        if cur.sqpoll_idle_ms.is_some() {
            cur.sqpoll_idle_ms = None;
            chain.push(cur);
        }
        if cur.defer_taskrun {
            cur.defer_taskrun = false;
            cur.coop_taskrun = true;
            chain.push(cur);
        }
        if cur.single_issuer {
            cur.single_issuer = false;
            chain.push(cur);
        }
        if cur != Self::NONE {
            chain.push(Self::NONE);
        }
        chain.dedup();
        chain
    }

    /// Parses a comma-separated list: `single_issuer,defer_taskrun,coop_taskrun,sqpoll[=MS]`,
    /// or `none`, or `best`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut f = Self::NONE;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "none" => f = Self::NONE,
                "best" => f = Self::BEST,
                "single_issuer" => f.single_issuer = true,
                "defer_taskrun" => f.defer_taskrun = true,
                "coop_taskrun" => f.coop_taskrun = true,
                "sqpoll" => f.sqpoll_idle_ms = Some(1000),
                p if p.starts_with("sqpoll=") => {
                    let ms = p["sqpoll=".len()..].parse().map_err(|_| format!("bad sqpoll idle time in {p:?}"))?;
                    f.sqpoll_idle_ms = Some(ms);
                }
                other => {
                    return Err(format!(
                        "unknown ring flag {other:?} (known: none, best, single_issuer, defer_taskrun, coop_taskrun, sqpoll[=MS])"
                    ))
                }
            }
        }
        if f.defer_taskrun && !f.single_issuer {
            return Err("defer_taskrun needs single_issuer".into());
        }
        Ok(f)
    }

    /// The accepted flags by their kernel names.
    pub fn names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.single_issuer {
            v.push("SINGLE_ISSUER");
        }
        if self.defer_taskrun {
            v.push("DEFER_TASKRUN");
        }
        if self.coop_taskrun {
            v.push("COOP_TASKRUN");
        }
        if self.sqpoll_idle_ms.is_some() {
            v.push("SQPOLL");
        }
        v
    }
}

/// Per-worker engine settings, chosen by the launcher and the user.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// The core this worker is pinned to (for names and engines that place themselves).
    pub cpu: usize,
    /// Submission queue entries.
    pub ring_entries: u32,
    /// Setup flags to ask for.
    pub ring_flags: RingFlags,
    /// The locked-memory budget for this worker's engine (registered buffers, glommio's
    /// io_memory), already divided from RLIMIT_MEMLOCK by the launcher.
    pub memlock_budget: usize,
    /// Force the engine's non-io_uring fallback (for tests and for kernels that misbehave).
    pub force_fallback: bool,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            cpu: 0,
            ring_entries: 1024,
            ring_flags: RingFlags::BEST,
            memlock_budget: 512 * 1024,
            force_fallback: false,
        }
    }
}

/// A backend could not build its engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The engine refused to start; the message says why and what to change.
    #[error("{runtime} could not start on core {cpu}: {reason}")]
    Build {
        /// The backend.
        runtime: &'static str,
        /// The core.
        cpu: usize,
        /// Why, and what would fix it.
        reason: String,
    },
}
