//! Readiness of descriptors tokio-uring does not own (eventfd doorbells, AF_XDP sockets).
//!
//! tokio-uring runs on a tokio current-thread runtime, so the watch is a tokio `AsyncFd`
//! registered with that runtime's epoll reactor, over a private `dup` of the descriptor (so
//! the same descriptor can be watched twice, or registered elsewhere, without `EEXIST`; the
//! dup is deregistered and closed when the watch drops).
//!
//! # Level-triggered contract
//!
//! tokio registers descriptors edge-triggered and caches readiness until told otherwise. To
//! give [`FdWatch::readable`] the level-triggered meaning the contract asks for, every call
//! confirms the cached readiness with a zero-timeout `poll(2)` on the descriptor:
//!
//! - readable now (`POLLIN`, or `POLLERR`/`POLLHUP`, after which a read does not block):
//!   complete at once and keep the cached readiness, so the next call re-checks immediately;
//! - not readable: clear the cached readiness (tokio keeps any edge that arrived after it was
//!   observed) and wait for the next edge.
//!
//! So a second call completes at once while data remains, and waits once the caller has
//! drained the descriptor. The cost is one `poll(2)` per call.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use corepin_core::runtime as contract;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Waits for a foreign descriptor to become readable (see the module docs).
pub struct FdWatch {
    fd: AsyncFd<OwnedFd>,
}

impl contract::FdWatch for FdWatch {
    fn new(fd: RawFd) -> io::Result<Self> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(io::Error::other("FdWatch::new needs the tokio-uring runtime on this thread"));
        }
        // SAFETY: F_DUPFD_CLOEXEC only reads `fd`; on success it returns a new descriptor we
        // own, on failure -1 and errno.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `dup` is a fresh descriptor owned by nobody else.
        let owned = unsafe { OwnedFd::from_raw_fd(dup) };
        // SAFETY: the AsyncFd owns `owned`, so the descriptor stays open and refers to the same
        // open file description until the AsyncFd (which deregisters it first) is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }?;
        Ok(Self { fd })
    }

    async fn readable(&self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            if readable_now(self.fd.get_ref().as_raw_fd())? {
                return Ok(());
            }
            guard.clear_ready();
        }
    }
}

/// Whether a read on `fd` would not block right now (zero-timeout `poll(2)`).
fn readable_now(fd: RawFd) -> io::Result<bool> {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    loop {
        // SAFETY: `pfd` is one valid pollfd; a zero timeout never blocks.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        if n >= 0 {
            return Ok(n > 0 && pfd.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}
