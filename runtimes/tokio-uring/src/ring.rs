//! Building the io_uring ring that tokio-uring drives, and the capability report.
//!
//! # Ring flags on tokio-uring 0.5
//!
//! tokio-uring submits from a tokio park hook with `io_uring_enter(to_submit, 0, flags=0)` and
//! reaps completions when tokio's epoll reports the ring descriptor readable, by reading the
//! CQ directly. It never enters the kernel with `IORING_ENTER_GETEVENTS` while running (only
//! while dropping its driver). With `IORING_SETUP_DEFER_TASKRUN` the kernel posts completions
//! only from such a GETEVENTS enter, so none ever arrive and the first I/O hangs forever
//! (measured on Linux 6.18: an accept/connect/echo round trip never completes; `strace` shows
//! only `io_uring_enter(fd, n, 0, 0)` and an endless `epoll_wait`). This backend therefore
//! never asks for DEFER_TASKRUN: it walks [`RingFlags::fallbacks`] skipping the entries with
//! DEFER_TASKRUN, so a request for SINGLE_ISSUER|DEFER_TASKRUN lands on the chain's next step,
//! SINGLE_ISSUER|COOP_TASKRUN, and the capability report carries a note. SQPOLL works (its
//! kernel thread posts completions itself) when asked for without DEFER_TASKRUN; the kernel
//! refuses SQPOLL together with DEFER_TASKRUN or COOP_TASKRUN anyway.

use corepin_core::caps::{Capabilities, Driver, KernelSupport, Mechanism};
use corepin_core::runtime::RingFlags;

/// Why DEFER_TASKRUN is never requested by this backend (also the capability note).
pub(crate) const DEFER_TASKRUN_NOTE: &str =
    "DEFER_TASKRUN not used: tokio-uring 0.5 never calls io_uring_enter with GETEVENTS while \
     running (it submits with flags 0 and reaps the CQ when epoll reports the ring fd), so with \
     DEFER_TASKRUN completions are never posted and I/O hangs; the next flags of the fallback \
     chain (COOP_TASKRUN) are used instead";

/// The flag sets this backend tries, best first: `requested`'s fallback chain without the
/// entries that ask for DEFER_TASKRUN, so what is accepted always comes from the chain. Also a
/// note when entries were skipped.
pub(crate) fn candidates(requested: RingFlags) -> (Vec<RingFlags>, Option<&'static str>) {
    let chain = requested.fallbacks();
    let usable: Vec<RingFlags> = chain.iter().copied().filter(|f| !f.defer_taskrun).collect();
    let note = (usable.len() != chain.len()).then_some(DEFER_TASKRUN_NOTE);
    (usable, note)
}

/// The capability report of a tokio-uring engine with `accepted` flags.
pub(crate) fn capabilities(
    requested: RingFlags,
    accepted: RingFlags,
    ring_entries: u32,
    notes: Vec<String>,
) -> Capabilities {
    let k = KernelSupport::get();
    Capabilities {
        runtime: crate::NAME,
        driver: Driver::IoUring,
        ring_flags_requested: requested,
        ring_flags: Some(accepted),
        ring_entries,
        splice: Mechanism::fallback(k.splice, "sendfile(2) (tokio-uring 0.5 has no splice API)"),
        send_zc: Mechanism::fallback(
            k.send_zc,
            "plain send (tokio-uring 0.5 has send_zc on UdpSocket only, not on TcpStream)",
        ),
        registered_buffers: Mechanism::fallback(
            k.registered_buffers,
            "plain buffers (tokio-uring's fixed-buffer registry is not used for caller-owned buffers)",
        ),
        multishot_accept: Mechanism::fallback(
            k.multishot_accept,
            "one accept op per connection (tokio-uring 0.5 has no multishot accept)",
        ),
        multishot_recv: Mechanism::fallback(
            k.multishot_recv,
            "one read op per read (tokio-uring 0.5 has no multishot recv)",
        ),
        buffer_rings: Mechanism::fallback(
            k.buffer_rings,
            "caller-owned buffers (tokio-uring 0.5 has no provided buffer rings)",
        ),
        fd_readiness: "tokio AsyncFd on the runtime's epoll reactor, confirmed with poll(2) for level semantics",
        file_transfer: "sendfile(2), waiting for room with tokio AsyncFd (epoll)",
        file_reads: "io_uring READ: a page-cache miss waits in the kernel, not on the worker",
        rent_copies: false,
        notes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defer_taskrun_gives_way_to_coop_taskrun() {
        let (c, note) = candidates(RingFlags::BEST);
        assert!(c[0].single_issuer && c[0].coop_taskrun && !c[0].defer_taskrun);
        assert!(c.iter().all(|f| !f.defer_taskrun));
        assert!(note.is_some());
    }

    #[test]
    fn every_candidate_comes_from_the_fallback_chain() {
        for req in [
            RingFlags::BEST,
            RingFlags::NONE,
            RingFlags { sqpoll_idle_ms: Some(10), ..RingFlags::BEST },
            RingFlags { single_issuer: true, sqpoll_idle_ms: Some(10), ..RingFlags::NONE },
        ] {
            let (c, _) = candidates(req);
            assert!(!c.is_empty());
            assert!(c.iter().all(|f| req.fallbacks().contains(f)), "{req:?}: {c:?}");
        }
    }

    #[test]
    fn requests_without_defer_taskrun_are_kept() {
        assert_eq!(candidates(RingFlags::NONE), (vec![RingFlags::NONE], None));
        let sq = RingFlags { single_issuer: true, sqpoll_idle_ms: Some(10), ..RingFlags::NONE };
        assert_eq!(candidates(sq).0[0], sq);
    }
}
