//! What every backend does around its engine, written once: the per-thread slot that says an
//! engine runs here and holds its capability report, the guard that claims the thread (refusing
//! a second engine on it) and clears the slot when the engine goes away, also by a panic, and
//! the descriptor helpers backends share. Nothing here names an engine.

use std::cell::{Cell, RefCell};
use std::io;
use std::marker::PhantomData;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::task::Waker;

use crate::caps::Capabilities;
use crate::runtime::EngineError;

thread_local! {
    static CLAIMED: Cell<bool> = const { Cell::new(false) };
    static REPORT: RefCell<Option<Capabilities>> = const { RefCell::new(None) };
    static YIELD: Cell<Option<fn(&Waker)>> = const { Cell::new(None) };
}

/// This thread's claim on running an engine. Dropping it (normally or while unwinding) frees
/// the thread and clears its capability report.
#[must_use = "the thread is claimed only while the guard lives"]
pub struct EngineGuard {
    // Tied to the thread that claimed it.
    _thread: PhantomData<*const ()>,
}

impl EngineGuard {
    /// Claims this thread for an engine of `runtime` on core `cpu`. Fails when an engine (of
    /// any backend) already runs on this thread: engines are one per worker thread, and a
    /// nested `block_on` would deadlock or corrupt the outer engine's thread-local state.
    pub fn claim(runtime: &'static str, cpu: usize) -> Result<EngineGuard, EngineError> {
        if CLAIMED.with(|c| c.replace(true)) {
            return Err(EngineError::Build {
                runtime,
                cpu,
                reason: "an engine is already running on this thread".into(),
            });
        }
        Ok(EngineGuard { _thread: PhantomData })
    }

    /// Tells [`task::yield_now`](crate::task::yield_now) how to put a task behind the core's
    /// other ready tasks on this engine, for engines where a task that wakes itself during its
    /// own poll is polled again first (Monoio re-queues such a task at the front, so a
    /// self-wake there yields to nothing). `defer` must arrange for the waker to be woken only
    /// after the tasks already queued have run. Without it, yielding is a self-wake.
    pub fn set_yield(&self, defer: fn(&Waker)) {
        YIELD.with(|y| y.set(Some(defer)));
    }

    /// Records the capability report of the engine built on this thread.
    pub fn set_capabilities(&self, caps: Capabilities) {
        tracing::debug!("{caps}");
        REPORT.with(|r| *r.borrow_mut() = Some(caps));
    }
}

impl Drop for EngineGuard {
    fn drop(&mut self) {
        REPORT.with(|r| r.borrow_mut().take());
        YIELD.with(|y| y.set(None));
        CLAIMED.with(|c| c.set(false));
    }
}

/// The capability report of the engine running on this thread (`None` outside one).
pub fn current_capabilities() -> Option<Capabilities> {
    REPORT.with(|r| r.borrow().clone())
}

/// Whether `read_pooled` on this thread's engine reads into its provided-buffer ring, so a
/// read waiting for data holds no buffer (the capability report's `buffer_rings`, read in
/// place: no clone of the report). `false` outside an engine.
pub fn lends_ring_buffers() -> bool {
    REPORT.with(|r| r.borrow().as_ref().is_some_and(|caps| caps.buffer_rings.used))
}

/// Wakes `waker` so that its task runs after the tasks already ready on this core (see
/// [`EngineGuard::set_yield`]).
pub(crate) fn wake_behind(waker: &Waker) {
    match YIELD.with(Cell::get) {
        Some(defer) => defer(waker),
        None => waker.wake_by_ref(),
    }
}

/// Whether an engine has claimed this thread.
pub fn is_running() -> bool {
    CLAIMED.with(Cell::get)
}

/// A close-on-exec duplicate of `fd` that the caller owns (for engines that must own the
/// descriptor they poll while corepin's caller keeps the original).
pub fn dup_cloexec(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC only reads `fd`; a bad descriptor yields EBADF, not UB.
    let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if d < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `d` is a fresh descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(d) })
}

/// Whether `fd` is ready for `events` (`libc::POLLIN`, `libc::POLLOUT`) right now: one
/// zero-timeout `poll(2)`. Error and hang-up count as ready, since the next operation then
/// returns at once. Backends whose reactor caches edge-triggered readiness confirm with this to
/// give [`FdWatch`](crate::runtime::FdWatch) its level-triggered meaning.
pub fn poll_now(fd: RawFd, events: libc::c_short) -> io::Result<bool> {
    let mut pfd = libc::pollfd { fd, events, revents: 0 };
    loop {
        // SAFETY: `pfd` is one valid pollfd; a zero timeout never blocks.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        if n >= 0 {
            return Ok(n > 0 && pfd.revents & (events | libc::POLLERR | libc::POLLHUP) != 0);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_engine_on_the_same_thread_is_refused_and_a_panic_frees_the_thread() {
        let g = EngineGuard::claim("a", 0).unwrap();
        assert!(is_running());
        let err = EngineGuard::claim("b", 0).err().expect("second claim must fail").to_string();
        assert!(err.contains("already running"), "{err}");
        drop(g);
        assert!(!is_running());
        let r = std::panic::catch_unwind(|| {
            let _g = EngineGuard::claim("a", 0).unwrap();
            panic!("engine main panicked");
        });
        assert!(r.is_err());
        assert!(!is_running(), "the unwinding guard must free the thread");
        assert!(current_capabilities().is_none());
        drop(EngineGuard::claim("c", 0).unwrap());
    }

    #[test]
    fn poll_now_sees_data_and_room() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(!poll_now(b.as_raw_fd(), libc::POLLIN).unwrap());
        assert!(poll_now(a.as_raw_fd(), libc::POLLOUT).unwrap());
        a.write_all(b"x").unwrap();
        assert!(poll_now(b.as_raw_fd(), libc::POLLIN).unwrap());
    }

    #[test]
    fn dup_cloexec_gives_an_independent_descriptor() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let d = dup_cloexec(std::os::fd::AsRawFd::as_raw_fd(&a)).unwrap();
        assert_ne!(std::os::fd::AsRawFd::as_raw_fd(&d), std::os::fd::AsRawFd::as_raw_fd(&a));
        // SAFETY: F_GETFD only reads the flags of the descriptor `d` owns.
        let flags = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&d), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        assert!(dup_cloexec(-1).is_err());
    }
}
