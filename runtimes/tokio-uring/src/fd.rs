//! Readiness of descriptors tokio-uring does not own (eventfd doorbells, AF_XDP sockets), and
//! of the backend's own UDP sockets.
//!
//! tokio-uring runs on a tokio current-thread runtime, so the watch is a tokio `AsyncFd`
//! registered with that runtime's epoll reactor, over a private `dup` of the descriptor (so
//! the same descriptor can be watched twice, or registered elsewhere, without `EEXIST`; the
//! dup is deregistered and closed when the watch drops).
//!
//! # Level-triggered contract
//!
//! tokio registers descriptors edge-triggered and caches readiness until told otherwise. To
//! give [`FdWatch::readable`] and [`FdWatch::writable`] the level-triggered meaning the contract
//! asks for, every call confirms the cached readiness with a zero-timeout `poll(2)` on the
//! descriptor ([`poll_now`]):
//!
//! - ready now (`POLLIN`/`POLLOUT`, or `POLLERR`/`POLLHUP`, after which the operation does not
//!   block): complete at once and keep the cached readiness, so the next call re-checks at once;
//! - not ready: clear the cached readiness (tokio keeps any edge that arrived after it was
//!   observed) and wait for the next edge.
//!
//! So a second call completes at once while data remains, and waits once the caller has
//! drained the descriptor. The cost is one `poll(2)` per call that finds readiness cached.
//! An edge that arrives after the `poll(2)` said "not ready" is fresh (data or room came since
//! the check), so the call completes on it without a second `poll(2)`: a caller that drained
//! the descriptor with its own syscalls pays one confirmation per wait, not two.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use corepin_core::engine::{dup_cloexec, poll_now};
use corepin_core::runtime as contract;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Waits for a foreign descriptor to become readable or writable (see the module docs).
pub struct FdWatch {
    fd: AsyncFd<OwnedFd>,
}

impl contract::FdWatch for FdWatch {
    fn new(fd: RawFd) -> io::Result<Self> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(io::Error::other("FdWatch::new needs the tokio-uring runtime on this thread"));
        }
        let owned = dup_cloexec(fd)?;
        // SAFETY: the AsyncFd owns `owned`, so the descriptor stays open and refers to the same
        // open file description until the AsyncFd (which deregisters it first) is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE | Interest::WRITABLE) }?;
        Ok(Self { fd })
    }

    async fn readable(&self) -> io::Result<()> {
        let mut fresh = false;
        loop {
            let mut guard = self.fd.readable().await?;
            if fresh || poll_now(self.fd.get_ref().as_raw_fd(), libc::POLLIN)? {
                return Ok(());
            }
            guard.clear_ready();
            fresh = true;
        }
    }

    async fn writable(&self) -> io::Result<()> {
        let mut fresh = false;
        loop {
            let mut guard = self.fd.writable().await?;
            if fresh || poll_now(self.fd.get_ref().as_raw_fd(), libc::POLLOUT)? {
                return Ok(());
            }
            guard.clear_ready();
            fresh = true;
        }
    }
}
