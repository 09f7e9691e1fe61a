//! A descriptor's readiness, written into this thread's memory by the kernel before any of this
//! thread's system calls returns. It gives a per-core cache that learns of changes from a
//! kernel queue (the file server's open-file cache and its inotify descriptor) a "has anything
//! been queued?" check that costs two memory accesses instead of a system call, and is exact
//! but for the two windows named below.
//!
//! How: [`Posted`] keeps a private io_uring with one one-shot `IORING_OP_POLL_ADD` on the
//! descriptor, submitted by the thread that checks it. The ring is set up without
//! `DEFER_TASKRUN` or `COOP_TASKRUN`. When the descriptor becomes readable, the kernel's wake-up
//! (for inotify: inside the writer's own system call) queues the poll's completion as task work
//! for this thread, with `TWA_SIGNAL` (`TIF_NOTIFY_SIGNAL` is set before the writer's call
//! returns). The kernel runs a thread's queued task work before that thread returns to user
//! space, whatever it entered the kernel for (`exit_to_user_mode_loop`). A ring's completions
//! made by task work for this thread (a receive's, on any ring without `DEFER_TASKRUN`) go on
//! the same per-thread list and are run with it; a `DEFER_TASKRUN` ring's are posted inside
//! this thread's `io_uring_enter`, which runs the list before it returns. So once this thread
//! has returned from a system call made after the descriptor became readable, the completion is
//! in the ring. That system call may be the receive that took a request sent after a change, or
//! the engine's wait that collected the receive's completion. [`Posted::is_set`] then sees the
//! completion with one acquire load of the ring's tail. (Read against the 6.18 sources:
//! `io_uring/poll.c` `io_poll_wake`, `io_uring/io_uring.c` `io_req_normal_work_add`,
//! `kernel/task_work.c`, `kernel/entry/common.c`.)
//!
//! A side effect: the notice interrupts this thread's `epoll_wait` (`EINTR`, which every
//! engine's reactor retries); blocking calls that restart, and io_uring waits, do not notice.
//!
//! Where that order does not hold, [`Posted::watch`] refuses and the caller reads its queue
//! as before:
//! - no io_uring (kernel, sysctl `kernel.io_uring_disabled`, seccomp);
//! - the engine on this thread asked for `SQPOLL`: a kernel thread posts that ring's
//!   completions, so a request can reach this thread without it entering the kernel.
//!
//! Bytes handed over by another core through memory (HTTP/3's forwarded datagrams) also reach
//! this thread without a system call of its own. A caller must not trust the check for those;
//! [`arrivals::note_handed`](crate::arrivals::note_handed) counts them.
//!
//! Two orders the kernel does not promise. Each needs a coincidence, and lasts at most until
//! this thread's next system call or scheduler tick:
//! - a socket receive that io_uring hands to an io-wq worker (never asked for by the engines
//!   here; the kernel does it when it cannot arm a poll, or after 128 poll retries) posts its
//!   completion from that worker on a ring without `DEFER_TASKRUN`. If the engine reads that
//!   completion from user space without a system call, only the IPI the notice sends at the
//!   change stands between it and this thread's user code, and there is no IPI when the
//!   thread's task-work list already held work of a `COOP_TASKRUN` ring (the aux ring's);
//! - the kernel sets `TIF_NOTIFY_SIGNAL` only when it adds to an empty task-work list. If
//!   another CPU has just added this thread's first item and is stopped before setting the
//!   flag (a preempted `PREEMPT_RT` spinlock, a paused vCPU), a change made then is not
//!   flagged until that CPU goes on.

use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use io_uring::{opcode, types, IoUring};

/// The one poll's user data (the ring carries nothing else).
const POLL: u64 = 1;

/// A one-shot readiness poll on a descriptor, posted into a private ring (see the module
/// docs). Bound to the thread that made it: only that thread's system calls order it.
pub struct Posted {
    ring: IoUring,
    /// The descriptor polled (the caller keeps it open).
    fd: RawFd,
    /// Whether a poll is in the kernel, or completed and not yet consumed.
    armed: bool,
    _thread: PhantomData<*const ()>,
}

impl std::fmt::Debug for Posted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Posted").field("armed", &self.armed).finish_non_exhaustive()
    }
}

impl Posted {
    /// Arms the poll for `fd` becoming readable. Fails where the check would not be exact on
    /// this thread (see the module docs) or the ring cannot be made; the caller then reads its
    /// queue on every check instead. `fd` must stay open while this value lives: a re-arm polls
    /// it by number (closing it early loses only the notices, never memory safety).
    pub fn watch(fd: BorrowedFd<'_>) -> io::Result<Self> {
        if engine_may_post_without_this_thread() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the engine's ring uses SQPOLL: its completions can arrive without this thread entering the kernel",
            ));
        }
        // Two entries: a re-arm can never find the queue full.
        let ring = IoUring::builder().build(2)?;
        let mut posted = Self { ring, fd: fd.as_raw_fd(), armed: false, _thread: PhantomData };
        posted.arm()?;
        Ok(posted)
    }

    /// Whether the descriptor has become readable since it was last armed: a load of the
    /// ring's tail (and a store of its head), no system call.
    #[inline]
    pub fn is_set(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Consumes the notice and arms the poll again. Call it after emptying the descriptor's
    /// queue: anything queued after that makes the new poll complete at once. A poll that
    /// ended in an error is an error here: the caller stops trusting the notice.
    pub fn rearm(&mut self) -> io::Result<()> {
        let mut failed = None;
        for cqe in self.ring.completion() {
            if cqe.user_data() == POLL {
                self.armed = false;
                if cqe.result() < 0 {
                    failed = Some(io::Error::from_raw_os_error(-cqe.result()));
                }
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        if self.armed {
            return Ok(());
        }
        self.arm()
    }

    fn arm(&mut self) -> io::Result<()> {
        let poll = opcode::PollAdd::new(types::Fd(self.fd), libc::POLLIN as u32).build().user_data(POLL);
        // SAFETY: a poll request points at no user memory; the kernel takes its own reference
        // to the file (a descriptor closed meanwhile fails the poll with EBADF), so the entry
        // is valid whatever happens to the descriptor afterwards.
        unsafe { self.ring.submission().push(&poll) }
            .map_err(|_| io::Error::other("the private ring's submission queue is full"))?;
        self.ring.submit()?;
        self.armed = true;
        Ok(())
    }
}

/// Whether this machine lets a thread outside an SQPOLL engine have a [`Posted`] notice
/// (io_uring present and allowed).
pub fn available() -> bool {
    IoUring::<io_uring::squeue::Entry>::builder().build(2).is_ok()
}

/// Whether the engine on this thread may post completions from a kernel thread of its own
/// (`SQPOLL`), asked for or in use; `false` outside an engine.
fn engine_may_post_without_this_thread() -> bool {
    crate::engine::current_capabilities().is_some_and(|caps| {
        caps.ring_flags_requested.sqpoll_idle_ms.is_some()
            || caps.ring_flags.is_some_and(|f| f.sqpoll_idle_ms.is_some())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    fn inotify_on(path: &std::path::Path) -> OwnedFd {
        // SAFETY: flags only; a new descriptor or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0, "{}", io::Error::last_os_error());
        // SAFETY: fresh and unowned.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: an open inotify descriptor and a valid C string.
        let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), libc::IN_MODIFY) };
        assert!(wd >= 0, "{}", io::Error::last_os_error());
        fd
    }

    /// Reads everything queued; returns the bytes read.
    fn drain(fd: &OwnedFd) -> usize {
        let mut buf = [0u8; 4096];
        let mut total = 0;
        loop {
            // SAFETY: `buf` is valid for its length; `fd` is open.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return total;
            }
            total += n as usize;
        }
    }

    /// A file, an inotify watch on it and a notice on the watch; `None` (printed) without a
    /// private io_uring here.
    fn watched() -> Option<(tempfile::TempDir, std::path::PathBuf, OwnedFd, Posted)> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "a").unwrap();
        let fd = inotify_on(&path);
        match Posted::watch(fd.as_fd()) {
            Ok(p) => Some((dir, path, fd, p)),
            Err(e) => {
                eprintln!("skipped: no private io_uring here ({e})");
                None
            }
        }
    }

    #[test]
    fn a_change_on_this_thread_is_posted_and_rearming_clears_it() {
        let Some((_dir, path, fd, mut p)) = watched() else { return };
        assert!(!p.is_set(), "nothing changed yet");
        std::fs::write(&path, "b").unwrap();
        assert!(p.is_set(), "the write's own return ran the poll's task work");
        assert!(drain(&fd) > 0);
        p.rearm().unwrap();
        assert!(!p.is_set(), "emptied and armed again");
        // Queued between the drain and the re-arm: the new poll completes at once.
        std::fs::write(&path, "c").unwrap();
        p.rearm().unwrap();
        assert!(p.is_set(), "a change before the re-arm is not lost");
        assert!(drain(&fd) > 0);
        p.rearm().unwrap();
        assert!(!p.is_set());
    }

    #[test]
    fn no_notice_on_a_thread_whose_engine_asked_for_sqpoll() {
        use crate::caps::tests::{engine, ALL_NATIVE};
        use crate::caps::{Capabilities, Driver, KernelSupport};
        use crate::runtime::RingFlags;
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let kernel = KernelSupport { io_uring: true, ..Default::default() };
        let caps = |requested: RingFlags| {
            let mut report = engine(Driver::IoUring, ALL_NATIVE);
            report.ring_flags_requested = requested;
            Capabilities::derive(report, kernel)
        };
        let guard = crate::engine::EngineGuard::claim("test", 0).unwrap();
        guard.set_capabilities(caps(RingFlags { sqpoll_idle_ms: Some(1000), ..RingFlags::BEST }));
        let err = Posted::watch(a.as_fd()).expect_err("SQPOLL was asked for: no notice");
        assert_eq!(err.kind(), io::ErrorKind::Unsupported, "{err}");
        guard.set_capabilities(caps(RingFlags::BEST));
        if available() {
            Posted::watch(a.as_fd()).expect("an engine without SQPOLL keeps the notice");
        }
        drop(guard);
    }

    /// The order the file server relies on, through real threads and a real socket: another
    /// thread changes the file and only then sends bytes; when this thread's receive returns
    /// them, the notice must already be in the ring. Repeated, so a race would show.
    #[test]
    fn a_change_made_before_bytes_were_sent_is_posted_when_they_are_received() {
        let Some((_dir, path, fd, mut p)) = watched() else { return };
        let (mut here, mut there) = std::os::unix::net::UnixStream::pair().unwrap();
        let rounds = 2_000;
        let writer = {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                let mut go = [0u8; 1];
                for _ in 0..rounds {
                    // Wait for this round's go, change the file, then send.
                    if there.read_exact(&mut go).is_err() {
                        return;
                    }
                    f.write_all(b"x").unwrap();
                    there.write_all(b"!").unwrap();
                }
            })
        };
        let mut got = [0u8; 1];
        for round in 0..rounds {
            assert!(!p.is_set(), "round {round}: set before the change");
            here.write_all(b"g").unwrap();
            here.read_exact(&mut got).unwrap();
            assert!(p.is_set(), "round {round}: bytes sent after a change arrived before its notice");
            assert!(drain(&fd) > 0);
            p.rearm().unwrap();
        }
        writer.join().unwrap();
    }
}
