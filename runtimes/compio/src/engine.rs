//! Building and running one compio engine: the io_uring ring its proactor drives, with the
//! setup flags corepin asks for (walking [`RingFlags::fallbacks`] when the kernel refuses
//! one), and what it declares for the capability report.
//!
//! compio's `ProactorBuilder` takes the ring size and every setup flag corepin knows
//! (`single_issuer`, `defer_taskrun`, `coop_taskrun`, `sqpoll_idle`) but builds the ring itself
//! on io-uring 0.7, so corepin's shared `corepin-uring` builder (io-uring 0.6) is not used.
//! compio waits for completions with `io_uring_enter(GETEVENTS)` (with `EXT_ARG` timeouts), so
//! DEFER_TASKRUN works with it, unlike with tokio-uring.
//!
//! compio is built here with its io_uring driver only (no `polling` feature), so it has no
//! readiness fallback: a forced fallback or a kernel without io_uring is a build error, as
//! for glommio and tokio-uring.

use std::future::Future;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::pin::pin;
use std::task::{Context, Poll};
use std::time::Duration;

use corepin_core::caps::{
    self, io_uring_unavailable, Capabilities, Driver, EngineReport, KernelSupport, Native, Support,
};
use corepin_core::engine::EngineGuard;
use corepin_core::runtime::{EngineError, EngineSettings, RingFlags};
use corepin_uring::aux;

/// The backend's name in reports.
pub(crate) const NAME: &str = "compio";

/// What this backend wires to compio's native operations among the optional mechanisms, with
/// corepin's auxiliary ring (`corepin_uring::aux`, files only: compio has its own buffer ring)
/// for the registered buffers compio 0.19 lacks; `missing` says what that ring lacks.
pub(crate) fn native(missing: aux::Missing) -> Native {
    Native { registered_buffers: aux::registered_buffers(missing), ..NATIVE }
}

/// [`native`] without the auxiliary ring.
pub(crate) const NATIVE: Native = Native {
    splice: Support::Absent("io_uring runs every SPLICE on an io-wq thread; see docs/zero-copy.md"),
    send_zc: Support::Native,
    registered_buffers: Support::Absent("compio 0.19 has no READ_FIXED/WRITE_FIXED for caller-owned buffers"),
    multishot_accept: Support::Native,
    multishot_recv: Support::Absent(
        "read_pooled arms one receive per read: compio's multishot receive queues its results inside the \
         driver without a bound and has no total byte limit, so a connection whose service is not reading \
         could drain the core's ring (docs/compio.md)",
    ),
    buffer_rings: Support::Native,
};

/// The capability report of a compio engine with `accepted` flags and `entries` SQ entries.
pub(crate) fn capabilities(
    requested: RingFlags,
    accepted: RingFlags,
    entries: u32,
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
            ring_entries: entries,
            native: native(missing),
            fd_readiness: "compio PollFd: one-shot io_uring POLL_ADD (level-triggered)",
            file_transfer: "sendfile(2), waiting for room with io_uring POLL_ADD",
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

/// Buffers in the core's provided-buffer ring (`read_pooled`): 512 of
/// [`RING_BUF_LEN`](crate::net::RING_BUF_LEN) bytes, 4 MiB per core whatever the number of
/// connections. A read finding the ring empty takes the core pool's fallback.
const RING_BUFS: std::num::NonZero<u16> = std::num::NonZero::new(512).unwrap();

/// compio's proactor builder with `entries` and the setup flags of `flags`.
fn proactor(entries: u32, flags: &RingFlags) -> compio_driver::ProactorBuilder {
    let mut b = compio_driver::ProactorBuilder::new();
    b.capacity(entries)
        .buffer_pool_size(RING_BUFS)
        .buffer_pool_buffer_len(crate::net::RING_BUF_LEN)
        .single_issuer(flags.single_issuer)
        .defer_taskrun(flags.defer_taskrun)
        .coop_taskrun(flags.coop_taskrun);
    if let Some(ms) = flags.sqpoll_idle_ms {
        b.sqpoll_idle(Duration::from_millis(u64::from(ms)));
    }
    b
}

/// Builds the runtime, walking the flag fallback chain. Returns the runtime, the flags the
/// kernel accepted, and notes.
fn build(settings: &EngineSettings) -> Result<(compio_runtime::Runtime, RingFlags, Vec<String>), EngineError> {
    let mut refused = Vec::new();
    for flags in settings.ring_flags.fallbacks() {
        let built = compio_runtime::Runtime::builder().with_proactor(proactor(settings.ring_entries, &flags)).build();
        match built {
            Ok(rt) => {
                let notes = if refused.is_empty() {
                    Vec::new()
                } else {
                    vec![format!("ring flags refused: {}", refused.join("; "))]
                };
                return Ok((rt, flags, notes));
            }
            Err(e) => {
                tracing::debug!(?flags, "io_uring refused these setup flags: {e}");
                let names = flags.names();
                let label = if names.is_empty() { "no flags".to_string() } else { names.join("|") };
                refused.push(format!("{label}: {e}"));
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

/// The submission queue size the kernel gives for `entries`: io_uring_setup(2) rounds up to a
/// power of two.
pub(crate) fn sq_entries(entries: u32) -> u32 {
    entries.checked_next_power_of_two().unwrap_or(entries)
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
    if settings.force_fallback {
        return Err(build_error(
            settings,
            "compio is built with its io_uring driver only, so a forced fallback cannot be honoured; \
             use the monoio backend, whose epoll driver is the readiness-based fallback",
        ));
    }
    if let Some(why) = io_uring_unavailable() {
        return Err(build_error(
            settings,
            format!("{why}; compio is built without a readiness fallback, use the monoio backend (its epoll driver is the fallback)"),
        ));
    }
    let (rt, accepted, notes) = build(settings)?;
    // Built here, on the worker's thread (SINGLE_ISSUER), before the service runs.
    let aux = aux::build_for_core_files(settings.cpu, settings.memlock_budget);
    // Stops the aux ring once the engine is gone (also on unwinding).
    let _stop = aux::UninstallOnDrop;
    let claimed = &guard;
    let out = drive(&rt, async move {
        let missing = aux::install_for_core::<crate::CompioRuntime>(settings.cpu, aux);
        let entries = sq_entries(settings.ring_entries);
        claimed.set_capabilities(capabilities(settings.ring_flags, accepted, entries, notes, missing));
        let out = main().await;
        aux::stop::<crate::CompioRuntime>().await;
        out
    });
    let out = match out {
        Ok(out) => out,
        Err(panic) => {
            // As compio's own `block_on`: the tasks still queued are dropped (by the last
            // runtime handle's drop) once the unwind has ended, then the panic goes on.
            drop(rt);
            resume_unwind(panic)
        }
    };
    // Tear the engine down before returning: dropping the last runtime handle drops every task
    // still queued (their in-flight operations submit ASYNC_CANCEL), then the driver closes the
    // ring, which waits out or cancels what the kernel still holds, and only then frees the
    // operations and their buffers. The guard (dropped after, also on unwind) frees the thread.
    drop(rt);
    drop(guard);
    Ok(out)
}

/// Executor ticks run between two looks at the ring while tasks are still runnable.
const TICKS_PER_POLL: usize = 4;

/// Runs `fut` on `rt` as compio's `block_on` does, except for when the ring is looked at.
/// compio's loop polls its driver (one `io_uring_enter` without waiting) after every executor
/// tick that leaves tasks runnable, and a tick runs only the tasks that were runnable when it
/// began. A wake-up that passes through a chain of tasks (quinn hands each datagram from the
/// endpoint driver to the connection driver, to HTTP/3's connection task, to the request)
/// then costs one `io_uring_enter` per link: three per HTTP/3 request at one connection
/// (strace). Here up to [`TICKS_PER_POLL`] ticks run before the ring is polled, as tokio's
/// scheduler runs a batch of tasks between looks at its driver; with nothing runnable the
/// loop waits on the ring exactly as compio's does. Uses compio's public low-level API
/// (`enter`, `run`, `poll`, `poll_with`) only. A panic unwinds out of here (caught by the
/// caller, which drops the runtime after the unwind, as compio's `block_on` does).
fn drive<F: Future>(rt: &compio_runtime::Runtime, fut: F) -> std::thread::Result<F::Output> {
    catch_unwind(AssertUnwindSafe(|| {
        rt.enter(|| {
            let waker = rt.waker();
            let mut cx = Context::from_waker(&waker);
            let mut fut = pin!(fut);
            loop {
                if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
                    rt.run();
                    return out;
                }
                let mut runnable = rt.run();
                for _ in 1..TICKS_PER_POLL {
                    if !runnable {
                        break;
                    }
                    runnable = rt.run();
                }
                if runnable {
                    rt.poll_with(Some(Duration::ZERO));
                } else {
                    rt.poll();
                }
            }
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reported_ring_size_is_the_kernels_rounding() {
        assert_eq!(sq_entries(1024), 1024);
        assert_eq!(sq_entries(1000), 1024);
        assert_eq!(sq_entries(1), 1);
    }
}
