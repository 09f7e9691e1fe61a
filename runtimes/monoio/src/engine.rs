//! Building and running one Monoio engine: io_uring with the setup flags corepin asks for
//! (walking down the fallback chain when the kernel refuses one), or Monoio's epoll driver when
//! io_uring is unavailable or the fallback is forced; and what it declares for the capability
//! report.

use std::future::Future;

use corepin_core::caps::{io_uring_unavailable, Capabilities, Driver, EngineReport, KernelSupport, Native, Support};
use corepin_core::engine::EngineGuard;
use corepin_core::runtime::{EngineError, EngineSettings, RingFlags};
use corepin_uring::aux;

/// The backend's name in reports.
pub(crate) const NAME: &str = "monoio";

type UringRt = monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>>;
type LegacyRt = monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>>;

/// What Monoio 0.2 does among the optional mechanisms, with corepin's auxiliary ring
/// (`corepin_uring::aux`, docs/aux-ring.md) for the provided-buffer receives behind
/// `read_pooled` and the registered buffers behind `read_pooled_at`; `missing` says what this
/// engine's aux ring lacks.
fn native(missing: aux::Missing) -> Native {
    Native {
        splice: Support::Absent("io_uring runs every SPLICE on an io-wq thread; see docs/zero-copy.md"),
        send_zc: Support::Absent("monoio 0.2 has no SEND_ZC op"),
        registered_buffers: aux::registered_buffers(missing),
        multishot_accept: aux::multishot_accept(missing),
        multishot_recv: aux::multishot_recv(missing),
        buffer_rings: aux::buffer_rings(missing),
    }
}

fn build_uring(settings: &EngineSettings) -> Result<(UringRt, RingFlags), String> {
    let mut last = String::new();
    for flags in settings.ring_flags.fallbacks() {
        let built = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(settings.ring_entries)
            .uring_builder(corepin_uring::builder(&flags))
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

fn report(driver: Driver, settings: &EngineSettings, flags: Option<RingFlags>, missing: aux::Missing) -> Capabilities {
    let uring = driver == Driver::IoUring;
    Capabilities::derive(
        EngineReport {
            runtime: NAME,
            driver,
            ring_flags_requested: settings.ring_flags,
            ring_flags: flags,
            ring_entries: settings.ring_entries.max(256),
            native: native(missing),
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
            notes: aux::note(missing).into_iter().collect(),
        },
        KernelSupport::get(),
    )
}

fn run_on<D: monoio::Driver, F: Future>(mut rt: monoio::Runtime<D>, fut: F) -> F::Output {
    let out = rt.block_on(fut);
    // Dropping the runtime here tears down whatever is still in flight on this core.
    drop(rt);
    out
}

/// Builds the engine on this thread and runs `main` on it (see `Runtime::block_on`).
pub(crate) fn block_on<F, Fut>(settings: &EngineSettings, main: F) -> Result<Fut::Output, EngineError>
where
    F: FnOnce() -> Fut,
    Fut: Future,
{
    // Claimed first, so a nested engine is refused before anything is built, and freed by the
    // guard's drop also when `main` panics.
    let guard = EngineGuard::claim(NAME, settings.cpu)?;
    guard.set_yield(wake_behind);
    let unavailable =
        if settings.force_fallback { Some("forced by configuration".to_string()) } else { io_uring_unavailable() };
    let reason = match unavailable {
        None => match build_uring(settings) {
            Ok((r, flags)) => {
                // Built here, on the worker's thread (SINGLE_ISSUER), before the service runs.
                let aux = aux::build_for_core(settings.cpu, settings.memlock_budget);
                // Stops the aux ring once the engine is gone (also on unwinding).
                let _stop = aux::UninstallOnDrop;
                let claimed = &guard;
                return Ok(run_on(r, async move {
                    let missing = aux::install_for_core::<crate::MonoioRuntime>(settings.cpu, aux);
                    claimed.set_capabilities(report(Driver::IoUring, settings, Some(flags), missing));
                    let out = main().await;
                    aux::stop::<crate::MonoioRuntime>().await;
                    out
                }));
            }
            Err(reason) => {
                tracing::warn!(
                    cpu = settings.cpu,
                    "io_uring ring setup failed ({reason}); using monoio's epoll driver"
                );
                format!("ring setup failed: {reason}")
            }
        },
        Some(reason) => reason,
    };
    let r: LegacyRt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .with_entries(settings.ring_entries)
        .enable_timer()
        .build()
        .map_err(|e| EngineError::Build { runtime: NAME, cpu: settings.cpu, reason: format!("epoll driver: {e}") })?;
    guard.set_capabilities(report(
        Driver::Epoll { reason },
        settings,
        None,
        aux::Missing::everything("the epoll driver has no io_uring"),
    ));
    Ok(run_on(r, async move { main().await }))
}

/// Monoio polls a task that woke itself during its poll again before any other (it goes to the
/// front of the run queue), so a plain self-wake yields to nothing. A task spawned now goes to
/// the back: it wakes the yielding task after everything already queued has run.
fn wake_behind(waker: &std::task::Waker) {
    let waker = waker.clone();
    drop(monoio::spawn(async move { waker.wake() }));
}
