//! Building and running one tokio-uring engine: the io_uring ring it drives, the flags it can
//! take, and what it declares for the capability report.
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

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};

use corepin_core::caps::{
    self, io_uring_unavailable, Capabilities, Driver, EngineReport, KernelSupport, Native, Support,
};
use corepin_core::engine::EngineGuard;
use corepin_core::runtime::{EngineError, EngineSettings, RingFlags};
use corepin_uring::aux;

/// The backend's name in reports.
pub(crate) const NAME: &str = "tokio-uring";

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

/// What tokio-uring 0.5 does among the optional mechanisms, with corepin's auxiliary ring
/// (`corepin_uring::aux`, docs/aux-ring.md) for the provided-buffer receives behind
/// `read_pooled` and the registered buffers behind `read_pooled_at`; `missing` says what this
/// engine's aux ring lacks.
fn native(missing: aux::Missing) -> Native {
    Native {
        splice: Support::Absent("tokio-uring 0.5 has no splice API"),
        send_zc: Support::Absent("tokio-uring 0.5 has send_zc on UdpSocket only, not on TcpStream"),
        registered_buffers: aux::registered_buffers(missing),
        multishot_accept: aux::multishot_accept(missing),
        multishot_recv: aux::multishot_recv(missing),
        buffer_rings: aux::buffer_rings(missing),
    }
}

/// The capability report of a tokio-uring engine with `accepted` flags.
pub(crate) fn capabilities(
    requested: RingFlags,
    accepted: RingFlags,
    ring_entries: u32,
    mut notes: Vec<String>,
    missing: aux::Missing,
) -> Capabilities {
    notes.extend(aux::note(missing));
    Capabilities::derive(
        EngineReport {
            runtime: NAME,
            driver: Driver::IoUring,
            ring_flags_requested: requested,
            ring_flags: Some(accepted),
            ring_entries,
            native: native(missing),
            fd_readiness: "tokio AsyncFd on the runtime's epoll reactor, confirmed with poll(2) for level semantics",
            file_transfer: "sendfile(2), waiting for room with tokio AsyncFd (epoll)",
            file_reads: "io_uring READ: a page-cache miss waits in the kernel, not on the worker",
            rent_copies: false,
            notes,
        },
        KernelSupport::get(),
    )
}

fn build_error(settings: &EngineSettings, reason: impl Into<String>) -> EngineError {
    EngineError::Build { runtime: NAME, cpu: settings.cpu, reason: reason.into() }
}

/// Builds the tokio-uring runtime, walking the flag fallback chain. Returns the runtime, the
/// flags the kernel accepted, the ring's real SQ size, and notes.
fn build(settings: &EngineSettings) -> Result<(tokio_uring::Runtime, RingFlags, u32, Vec<String>), EngineError> {
    let (candidates, note) = candidates(settings.ring_flags);
    let mut notes: Vec<String> = note.map(String::from).into_iter().collect();
    let mut refused = Vec::new();
    for flags in candidates {
        let label = || {
            let n = flags.names();
            if n.is_empty() {
                "no flags".to_string()
            } else {
                n.join("|")
            }
        };
        let urb = corepin_uring::builder(&flags);
        // Probe with a bare ring first: a refused flag costs one io_uring_setup, and a failed
        // tokio-uring Runtime::new would leak its tokio runtime (it is held in a ManuallyDrop
        // until the driver is built).
        let sq_entries = match urb.build(settings.ring_entries) {
            Ok(probe) => probe.params().sq_entries(),
            Err(e) => {
                refused.push(format!("{}: {e}", label()));
                continue;
            }
        };
        let mut b = tokio_uring::builder();
        b.entries(settings.ring_entries).uring_builder(&urb);
        match catch_unwind(AssertUnwindSafe(|| tokio_uring::Runtime::new(&b))) {
            Ok(Ok(rt)) => {
                if !refused.is_empty() {
                    notes.push(format!("ring flags refused: {}", refused.join("; ")));
                }
                return Ok((rt, flags, sq_entries, notes));
            }
            Ok(Err(e)) => refused.push(format!("{}: tokio-uring runtime: {e}", label())),
            Err(panic) => {
                let msg = corepin_core::task::panic_message(&*panic);
                refused.push(format!("{}: tokio-uring runtime panicked: {msg}", label()));
            }
        }
    }
    Err(build_error(
        settings,
        format!(
            "no io_uring ring could be built with {} entries ({}); use 1..=32768 entries, fewer if memory is short, \
             or {}",
            settings.ring_entries,
            refused.join("; "),
            caps::ring_memory_advice()
        ),
    ))
}

/// Builds the engine on this thread and runs `main` on it (see `Runtime::block_on`).
pub(crate) fn block_on<F, Fut>(settings: &EngineSettings, main: F) -> Result<Fut::Output, EngineError>
where
    F: FnOnce() -> Fut,
    Fut: Future,
{
    if settings.force_fallback {
        return Err(build_error(
            settings,
            "tokio-uring has no epoll fallback driver, so a forced fallback cannot be honoured; \
             use the monoio backend, whose epoll driver is the readiness-based fallback",
        ));
    }
    if let Some(why) = io_uring_unavailable() {
        return Err(build_error(
            settings,
            format!(
                "{why}; tokio-uring has no epoll fallback, use the monoio backend (its epoll driver is the fallback)"
            ),
        ));
    }
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(build_error(settings, "an engine is already running on this thread"));
    }
    let guard = EngineGuard::claim(NAME, settings.cpu)?;
    let (rt, accepted, entries, notes) = build(settings)?;
    // Built here, on the worker's thread (SINGLE_ISSUER), before the service runs.
    let aux = aux::build_for_core(settings.cpu, settings.memlock_budget);
    // Stops the aux ring once the engine is gone (also on unwinding).
    let _stop = aux::UninstallOnDrop;
    let claimed = &guard;
    let out = rt.block_on(async move {
        let missing = aux::install_for_core::<crate::TokioUringRuntime>(settings.cpu, aux);
        claimed.set_capabilities(capabilities(settings.ring_flags, accepted, entries, notes, missing));
        let out = main().await;
        aux::stop::<crate::TokioUringRuntime>().await;
        out
    });
    // Tear the engine down before returning: tasks are dropped, then the driver cancels and
    // waits out every op still in flight. The guard (dropped after, also on unwind) frees the
    // thread.
    drop(rt);
    drop(guard);
    Ok(out)
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
