//! Readiness of descriptors glommio does not own (corepin's cross-core doorbell, eventfds,
//! AF_XDP sockets).
//!
//! Glommio has no public "poll this fd" API, so each kind of descriptor takes the cheapest
//! route that consumes nothing:
//!
//! * **Sockets of AF_UNIX / AF_INET / AF_INET6** that are not listening (corepin's doorbell is
//!   an AF_UNIX SOCK_DGRAM socketpair): a non-blocking `recv(MSG_PEEK)` of one byte first
//!   (made by glommio's `peek` itself once the wrapper below exists); if the socket is empty,
//!   glommio's `peek` on a duplicate of the descriptor, which is an `IORING_OP_RECV` with
//!   `MSG_PEEK`: native io_uring readiness that leaves the data queued.
//! * **Other descriptors** (eventfd, timerfd, pipes, AF_XDP, listening sockets): a
//!   non-blocking `poll(2)` first; if not ready, a glommio stream wrapper around a
//!   duplicate. Glommio arms `IORING_OP_POLL_ADD(POLLIN)` on every stream it wraps and its
//!   `poll_read` waits for that poll before trying a `recv(2)`, so reading zero bytes from
//!   the wrapper completes exactly when the descriptor becomes readable. The `recv(2)` it then
//!   issues fails with ENOTSOCK on non-sockets and dequeues nothing on AF_XDP or listening
//!   sockets. This leans on glommio 0.9 internals, so it checks itself: if the wrapper ever
//!   completes without first waiting, the watch switches to the fallback below for good.
//! * **Fallback** (and sockets of other families, such as netlink or packet sockets, where a
//!   zero-byte `recv` would drop a message): `poll(2)` in 100 ms slices on glommio's blocking
//!   thread, looping until readable. The bounded slice keeps a dropped watch from holding the
//!   blocking thread, and so executor shutdown, for longer than that.
//!
//! Every wait is level-triggered: it completes at once while the descriptor is readable.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;

use corepin_core::runtime;
use futures_lite::io::AsyncRead;

use crate::engine::require_engine;
use crate::to_io;
use corepin_core::engine::{dup_cloexec, poll_now};

/// What the capability report says about foreign-descriptor readiness.
pub(crate) const FD_READINESS: &str = "sockets: IORING_OP_RECV with MSG_PEEK (1 byte) on a dup via glommio's peek; \
     eventfd/AF_XDP/other fds: IORING_OP_POLL_ADD that glommio arms for a stream wrapper on a dup (glommio 0.9 \
     internals, self-checking); otherwise poll(2) in 100 ms slices on glommio's blocking thread";

/// How long one `poll(2)` on the blocking thread may take.
const BLOCKING_POLL_SLICE_MS: libc::c_int = 100;

/// A glommio stream over a duplicate of a watched socket, used for its `peek`.
enum PeekSocket {
    Unix(glommio::net::UnixStream),
    Inet(glommio::net::TcpStream),
}

impl PeekSocket {
    async fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            PeekSocket::Unix(s) => s.peek(buf).await.map_err(to_io),
            PeekSocket::Inet(s) => s.peek(buf).await.map_err(to_io),
        }
    }
}

enum Mode {
    /// Wait with an io_uring `RECV(MSG_PEEK)`; the wrapper is made on first use.
    Peek { domain: libc::c_int, socket: RefCell<Option<Rc<PeekSocket>>> },
    /// Wait with the POLL_ADD glommio arms for a stream wrapper; `works` turns false if that
    /// ever stops holding.
    PollAdd { works: Cell<bool> },
    /// Wait with `poll(2)` on the blocking thread.
    Blocking,
}

/// Readiness of a descriptor the caller owns (see the module docs for how).
pub struct FdWatch {
    fd: RawFd,
    mode: Mode,
    /// Made on the first [`writable`](runtime::FdWatch::writable) wait.
    write: std::cell::OnceCell<WriteWatch>,
}

/// Writability of a descriptor: of a socket, for transfers made by syscalls on it (`sendfile`),
/// and of a watched foreign descriptor ([`FdWatch::writable`](runtime::FdWatch::writable)).
///
/// Glommio has no public readiness API, but it can wait for a descriptor to become readable
/// (see this module). An epoll instance with the socket registered for `EPOLLOUT`
/// (level-triggered) is readable exactly while the socket is writable, so waiting for the
/// epoll descriptor's readability through corepin's glommio fd watch is a wait for room in
/// the socket buffer. Made once per stream, and only by streams that wait.
pub(crate) struct WriteWatch {
    watch: Box<FdWatch>,
    /// The epoll instance the watch waits on; owned here so it lives exactly as long.
    _epoll: OwnedFd,
}

impl WriteWatch {
    /// Watches `socket` (any descriptor epoll accepts) for room to write.
    pub(crate) fn new(socket: RawFd) -> io::Result<Self> {
        // SAFETY: epoll_create1 takes no pointers; a negative result is an error.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `ep` is a fresh descriptor nobody else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(ep) };
        let mut ev = libc::epoll_event { events: libc::EPOLLOUT as u32, u64: 0 };
        // SAFETY: both descriptors are open; `ev` is a valid event for the call.
        if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, socket, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let watch = <FdWatch as runtime::FdWatch>::new(epoll.as_raw_fd())?;
        Ok(Self { watch: Box::new(watch), _epoll: epoll })
    }

    /// Completes while the watched descriptor is writable (level-triggered).
    pub(crate) async fn wait(&self) -> io::Result<()> {
        runtime::FdWatch::readable(&*self.watch).await
    }
}

fn getsockopt_int(fd: RawFd, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid out-parameters of the size passed.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, &mut v as *mut _ as *mut libc::c_void, &mut len) };
    if r == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn classify(fd: RawFd) -> io::Result<Mode> {
    // SAFETY: F_GETFD only inspects the descriptor table; a bad fd yields EBADF.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let ty = match getsockopt_int(fd, libc::SO_TYPE) {
        Ok(t) => t,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => {
            return Ok(Mode::PollAdd { works: Cell::new(true) });
        }
        Err(e) => return Err(e),
    };
    let domain = getsockopt_int(fd, libc::SO_DOMAIN)?;
    let listening = getsockopt_int(fd, libc::SO_ACCEPTCONN)? != 0;
    let peekable_family = matches!(domain, libc::AF_UNIX | libc::AF_INET | libc::AF_INET6);
    let peekable_type = matches!(ty, libc::SOCK_DGRAM | libc::SOCK_STREAM | libc::SOCK_SEQPACKET);
    Ok(if peekable_family && peekable_type && !listening {
        Mode::Peek { domain, socket: RefCell::new(None) }
    } else if listening || domain == libc::AF_XDP {
        // A zero-byte recv fails on a listening socket and never dequeues from an AF_XDP ring.
        Mode::PollAdd { works: Cell::new(true) }
    } else {
        Mode::Blocking
    })
}

/// A non-blocking one-byte `recv(MSG_PEEK)`: whether data (or end of stream) is there.
fn peek_now(fd: RawFd) -> io::Result<bool> {
    let mut byte = 0u8;
    loop {
        // SAFETY: `byte` is a valid one-byte buffer; MSG_PEEK leaves the data queued.
        let r = unsafe {
            libc::recv(fd, &mut byte as *mut u8 as *mut libc::c_void, 1, libc::MSG_PEEK | libc::MSG_DONTWAIT)
        };
        if r >= 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(false),
            _ => return Err(err),
        }
    }
}

/// `poll(2)` for readability with `timeout_ms`: whether the descriptor is readable (or has
/// an error or hang-up a read would report).
fn poll_readable(fd: RawFd, timeout_ms: libc::c_int) -> io::Result<bool> {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN | libc::POLLPRI, revents: 0 };
    loop {
        // SAFETY: `pfd` is one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if r > 0 {
            if pfd.revents & libc::POLLNVAL != 0 {
                return Err(io::Error::from_raw_os_error(libc::EBADF));
            }
            return Ok(true);
        }
        if r == 0 {
            return Ok(false);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// How a POLL_ADD wait through a glommio stream wrapper ended.
enum Armed {
    /// The poll completed after the wrapper had waited: the descriptor is readable.
    Fired,
    /// The wrapper completed without waiting: glommio no longer arms a poll first.
    NotArmed,
}

/// Waits for readability with the POLL_ADD glommio arms for every stream it wraps.
async fn poll_add_wait(fd: RawFd) -> io::Result<Armed> {
    let dup = dup_cloexec(fd)?.into_raw_fd();
    // SAFETY: `dup` is a fresh descriptor we own; glommio's stream takes it over and closes
    // it on drop. Glommio arms IORING_OP_POLL_ADD on it at construction; the only other
    // syscalls it makes on it here are a zero-byte non-blocking recv(2), which fails with
    // ENOTSOCK on a non-socket and dequeues nothing on the socket kinds routed here
    // (listening, AF_XDP), and close(2) on drop.
    let mut wrapper = unsafe { glommio::net::TcpStream::from_raw_fd(dup) };
    let mut first = true;
    let outcome = poll_fn(|cx| {
        let r = Pin::new(&mut wrapper).poll_read(cx, &mut []);
        let was_first = std::mem::replace(&mut first, false);
        match r {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) if was_first => Poll::Ready(Armed::NotArmed),
            Poll::Ready(_) => Poll::Ready(Armed::Fired),
        }
    })
    .await;
    Ok(outcome)
}

/// Waits for readability with `poll(2)` slices on glommio's blocking thread.
async fn blocking_wait(fd: RawFd) -> io::Result<()> {
    let dup = Arc::new(dup_cloexec(fd)?);
    loop {
        let d = Arc::clone(&dup);
        let ready =
            glommio::executor().spawn_blocking(move || poll_readable(d.as_raw_fd(), BLOCKING_POLL_SLICE_MS)).await?;
        if ready {
            return Ok(());
        }
    }
}

impl FdWatch {
    fn peek_socket(&self, domain: libc::c_int, slot: &RefCell<Option<Rc<PeekSocket>>>) -> io::Result<Rc<PeekSocket>> {
        if let Some(s) = slot.borrow().as_ref() {
            return Ok(Rc::clone(s));
        }
        let dup = dup_cloexec(self.fd)?.into_raw_fd();
        // SAFETY: `dup` is a fresh descriptor we own, a socket of `domain`; glommio's stream
        // takes it over and closes it on drop. Only `peek` (recv with MSG_PEEK) is used on it.
        let s = Rc::new(unsafe {
            if domain == libc::AF_UNIX {
                PeekSocket::Unix(glommio::net::UnixStream::from_raw_fd(dup))
            } else {
                PeekSocket::Inet(glommio::net::TcpStream::from_raw_fd(dup))
            }
        });
        *slot.borrow_mut() = Some(Rc::clone(&s));
        Ok(s)
    }
}

impl runtime::FdWatch for FdWatch {
    fn new(fd: RawFd) -> io::Result<Self> {
        Ok(Self { fd, mode: classify(fd)?, write: std::cell::OnceCell::new() })
    }

    async fn readable(&self) -> io::Result<()> {
        require_engine()?;
        match &self.mode {
            Mode::Peek { domain, socket } => loop {
                // Once the wrapper exists its `peek` looks first with a non-blocking
                // `recv(MSG_PEEK)` of its own (glommio's `GlommioStream::peek`), so a look of
                // ours before it would be the same system call twice per wait.
                if socket.borrow().is_none() && peek_now(self.fd)? {
                    return Ok(());
                }
                let s = self.peek_socket(*domain, socket)?;
                let mut byte = [0u8; 1];
                if s.peek(&mut byte).await? > 0 {
                    return Ok(());
                }
                // Zero bytes: end of stream or an empty datagram, or glommio's wrapper
                // remembering an earlier end of stream. Ask the socket itself; if it is empty
                // after all, start over with a fresh wrapper.
                if peek_now(self.fd)? {
                    return Ok(());
                }
                socket.borrow_mut().take();
            },
            Mode::PollAdd { works } => {
                if poll_readable(self.fd, 0)? {
                    return Ok(());
                }
                if works.get() {
                    match poll_add_wait(self.fd).await? {
                        Armed::Fired => return Ok(()),
                        Armed::NotArmed => {
                            tracing::warn!(
                                fd = self.fd,
                                "glommio did not arm a poll for its stream wrapper; this fd watch falls back to \
                                 poll(2) on the blocking thread"
                            );
                            works.set(false);
                        }
                    }
                }
                blocking_wait(self.fd).await
            }
            Mode::Blocking => {
                if poll_readable(self.fd, 0)? {
                    return Ok(());
                }
                blocking_wait(self.fd).await
            }
        }
    }

    async fn writable(&self) -> io::Result<()> {
        require_engine()?;
        if poll_now(self.fd, libc::POLLOUT)? {
            return Ok(());
        }
        if self.write.get().is_none() {
            let w = WriteWatch::new(self.fd)?;
            let _ = self.write.set(w);
        }
        match self.write.get() {
            Some(w) => w.wait().await,
            None => Err(io::Error::other("write watch missing")),
        }
    }
}
