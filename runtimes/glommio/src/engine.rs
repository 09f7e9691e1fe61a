//! Building and running one glommio executor: sizing its locked memory to the worker's
//! budget (shared with corepin's auxiliary ring), the executor knobs corepin sets, and what it
//! declares for the capability report. Glommio 0.9 is patched (`runtimes/glommio/vendor/`):
//! its executor could park with a task runnable, which stalled the aux ring's single reap task.

use std::future::Future;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use corepin_core::caps::{self, Capabilities, Driver, EngineReport, KernelSupport, Native, Support};
use corepin_core::engine::{self, EngineGuard};
use corepin_core::runtime::{EngineError, EngineSettings};
use glommio::{GlommioError, LocalExecutorBuilder, Placement, PoolPlacement, ReactorErrorKind};

use corepin_uring::aux;

use crate::fd::FD_READINESS;

/// The backend name, as the CLI spells it.
pub(crate) const NAME: &str = "glommio";

/// Glommio creates three rings per executor (main, latency, and an IOPOLL ring for storage)
/// and registers its whole `io_memory` slab as a fixed buffer in each of them, so the kernel
/// charges that slab to RLIMIT_MEMLOCK three times.
const RINGS: usize = 3;
/// Glommio never allocates less than this for `io_memory`.
const MIN_IO_MEMORY: usize = 64 * 1024;
/// Glommio's default `io_memory`; more only pays off for heavy DMA file I/O, which corepin's
/// buffered files do not do.
const MAX_IO_MEMORY: usize = 10 << 20;
/// Glommio refuses to build a reactor when the process RLIMIT_MEMLOCK is below this.
const GLOMMIO_MIN_MEMLOCK: u64 = 512 * 1024;
/// The kernel refuses larger rings (`IORING_MAX_ENTRIES`).
const MAX_RING_DEPTH: u32 = 32 * 1024;
/// The smallest ring we shrink to when fitting rings into the budget.
const MIN_RING_DEPTH: u32 = 16;
const PAGE: usize = 4096;
/// How often glommio's preemption timer fires. Glommio re-arms it on every scheduler loop no
/// matter its length, so it does not change the syscall count; corepin keeps glommio's
/// default (100 ms) because corepin runs a single task queue and never needs to preempt.
const PREEMPT_TIMER: Duration = Duration::from_millis(100);

/// Fails unless a corepin engine runs on this thread (glommio's socket and file types panic
/// when made outside one).
pub(crate) fn require_engine() -> io::Result<()> {
    if engine::is_running() {
        Ok(())
    } else {
        Err(io::Error::other("corepin-glommio: not inside GlommioRuntime::block_on on this thread"))
    }
}

/// What glommio 0.9 does among the optional mechanisms, with corepin's auxiliary ring
/// (`corepin_uring::aux`, docs/aux-ring.md) for the provided-buffer receives behind
/// `read_pooled` and the registered buffers behind `read_pooled_at`; `missing` says what this
/// engine's aux ring lacks.
fn native(missing: aux::Missing) -> Native {
    Native {
        splice: Support::Absent("glommio has no splice API"),
        send_zc: Support::Absent("glommio has no SEND_ZC"),
        registered_buffers: aux::registered_buffers(missing),
        multishot_accept: aux::multishot_accept(missing),
        multishot_recv: aux::multishot_recv(missing),
        buffer_rings: aux::buffer_rings(missing),
    }
}

/// What the budget buys: the executor's memory and ring sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Bytes of glommio `io_memory` (registered in each of the three rings).
    pub io_memory: usize,
    /// Entries of each ring.
    pub ring_depth: u32,
    /// Whether this kernel charges ring memory to RLIMIT_MEMLOCK (before 5.12 and from 6.14).
    pub rings_charged: bool,
}

/// Locked bytes the kernel charges for one ring of `depth` entries (SQ ring, CQ ring with
/// twice the entries, SQE array), rounded up to pages as the kernel maps them.
fn ring_bytes(depth: u32) -> usize {
    let e = (depth.max(1) as usize).next_power_of_two();
    let pages = |n: usize| n.div_ceil(PAGE) * PAGE;
    pages(e * 4 + 128) + pages(2 * e * 16 + 128) + pages(e * 64)
}

impl Plan {
    /// Bytes of the budget glommio locks with this plan (as the kernel charges them).
    pub(crate) fn locked(&self) -> usize {
        RINGS * self.io_memory + if self.rings_charged { RINGS * ring_bytes(self.ring_depth) } else { 0 }
    }
}

/// Sizes glommio to the worker's locked-memory budget.
///
/// `process_limit` is RLIMIT_MEMLOCK (`None` when unlimited); `rings_charged` says whether
/// the kernel counts ring memory against it.
pub(crate) fn plan(settings: &EngineSettings, process_limit: Option<u64>, rings_charged: bool) -> Result<Plan, String> {
    if let Some(limit) = process_limit {
        if limit < GLOMMIO_MIN_MEMLOCK {
            return Err(format!(
                "RLIMIT_MEMLOCK is {limit} bytes and glommio refuses to start below {GLOMMIO_MIN_MEMLOCK} bytes \
                 (512 KiB); raise the locked-memory limit (`ulimit -l 8192` for 8 MiB, LimitMEMLOCK=8M in a \
                 systemd unit, `memlock` in /etc/security/limits.conf, or docker --ulimit memlock=8388608)"
            ));
        }
    }
    let budget = settings.memlock_budget;
    let mut depth = settings.ring_entries.clamp(1, MAX_RING_DEPTH);
    if rings_charged {
        while depth > MIN_RING_DEPTH && RINGS * ring_bytes(depth) > budget / 2 {
            depth /= 2;
        }
    }
    let ring_cost = if rings_charged { RINGS * ring_bytes(depth) } else { 0 };
    let per_ring = budget.saturating_sub(ring_cost) / RINGS;
    let io_memory = (per_ring / PAGE * PAGE).min(MAX_IO_MEMORY);
    if io_memory < MIN_IO_MEMORY {
        let needed = RINGS * MIN_IO_MEMORY + ring_cost;
        let limit = match process_limit {
            Some(l) => format!("{l} bytes"),
            None => "unlimited".to_string(),
        };
        return Err(format!(
            "the locked-memory budget for this worker is {budget} bytes but glommio needs at least {needed} bytes \
             ({RINGS} rings x {MIN_IO_MEMORY} bytes of registered io_memory{}); raise RLIMIT_MEMLOCK \
             (now {limit}; `ulimit -l`, LimitMEMLOCK= in systemd, docker --ulimit memlock=) or run fewer workers",
            if rings_charged { " plus the rings, which this kernel charges too" } else { "" }
        ));
    }
    Ok(Plan { io_memory, ring_depth: depth, rings_charged })
}

/// Locked memory the aux ring would use at most: its registered buffers and what it keeps
/// beside them for the rings (`corepin_uring::aux`).
const AUX_WANT: usize = aux::FIXED_MAX * aux::FIXED_LEN + 512 * 1024;

/// Splits the worker's budget between glommio and corepin's aux ring: the aux ring's
/// registered buffers (up to [`AUX_WANT`]) come first, as far as the budget leaves glommio its
/// minimum; glommio's `io_memory` serves only its DMA file API, which corepin does not use.
/// Returns glommio's plan and the aux ring's share (what glommio's plan leaves).
pub(crate) fn split_budget(
    settings: &EngineSettings,
    process_limit: Option<u64>,
    rings_charged: bool,
) -> Result<(Plan, usize), String> {
    let budget = settings.memlock_budget;
    // Refuses a budget glommio cannot start on, with its advice, before anything is set aside.
    let full = plan(settings, process_limit, rings_charged)?;
    let glommio_min = RINGS * MIN_IO_MEMORY + if rings_charged { RINGS * ring_bytes(full.ring_depth) } else { 0 };
    let reserve = AUX_WANT.min(budget.saturating_sub(glommio_min));
    let rest = EngineSettings { memlock_budget: budget - reserve, ..settings.clone() };
    let plan = plan(&rest, process_limit, rings_charged).unwrap_or(full);
    Ok((plan, budget.saturating_sub(plan.locked())))
}

/// The capability report of a glommio engine built with `plan`.
pub(crate) fn capabilities(
    settings: &EngineSettings,
    plan: &Plan,
    kernel: KernelSupport,
    missing: aux::Missing,
) -> Capabilities {
    let mut notes = vec![
        "ring flags: glommio creates its rings itself (main and latency rings without setup flags, a storage \
         ring with IOPOLL); corepin cannot pass SINGLE_ISSUER/DEFER_TASKRUN/COOP_TASKRUN/SQPOLL to it"
            .to_string(),
        format!(
            "memory: {} KiB io_memory registered in each of glommio's {RINGS} rings ({} KiB charged to \
             RLIMIT_MEMLOCK unless the process has CAP_IPC_LOCK){}",
            plan.io_memory / 1024,
            RINGS * plan.io_memory / 1024,
            if plan.rings_charged { "; this kernel also charges the rings" } else { "" }
        ),
        "copies: TCP reads and writes go straight between the socket and the caller's buffer (non-blocking \
         recv/send syscalls, io_uring only for readiness), except read_pooled, which receives into a buffer \
         the kernel picks from the auxiliary ring's provided-buffer ring; UDP copies through glommio's buffer when a \
         datagram has to be awaited or a send has to queue; file reads copy once out of glommio's buffer and \
         file writes copy once into a Vec"
            .to_string(),
        "syscalls: glommio re-arms its preemption and throughput timers on every scheduler loop and parks \
         through a membarrier plus a ring-linking POLL_ADD, so it costs several io_uring_enter calls per \
         wake-up on top of the recv/send syscalls"
            .to_string(),
    ];
    if settings.ring_entries != plan.ring_depth {
        notes.push(format!(
            "ring depth {} instead of the {} asked for (clamped to the kernel maximum or to fit the \
             locked-memory budget)",
            plan.ring_depth, settings.ring_entries
        ));
    }
    notes.extend(aux::note(missing));
    Capabilities::derive(
        EngineReport {
            runtime: NAME,
            driver: Driver::IoUring,
            ring_flags_requested: settings.ring_flags,
            ring_flags: None,
            ring_entries: plan.ring_depth,
            native: native(missing),
            fd_readiness: FD_READINESS,
            file_transfer:
                "sendfile(2), waiting for room through an epoll descriptor (EPOLLOUT) watched like any foreign fd",
            file_reads:
                "io_uring READ (glommio buffered file): a page-cache miss waits in the kernel, not on the worker",
            rent_copies: true,
            notes,
        },
        kernel,
    )
}

fn build_error(settings: &EngineSettings, reason: String) -> EngineError {
    EngineError::Build { runtime: NAME, cpu: settings.cpu, reason }
}

fn describe_glommio_error(err: GlommioError<()>) -> String {
    match err {
        GlommioError::ReactorError(ReactorErrorKind::MemLockLimit(have, need)) => format!(
            "glommio refused to start: RLIMIT_MEMLOCK is {have} bytes, it needs {need}; raise the \
             locked-memory limit (`ulimit -l`, LimitMEMLOCK= in systemd, docker --ulimit memlock=)"
        ),
        GlommioError::IoError(e) if e.raw_os_error() == Some(libc::ENOMEM) => format!(
            "glommio could not build its executor: the kernel refused to lock its rings and io_memory \
             (ENOMEM): the user's locked memory is over RLIMIT_MEMLOCK ({}), which io_uring charges for a \
             process without CAP_IPC_LOCK; raise the limit (`ulimit -l`, LimitMEMLOCK= in systemd, docker \
             --ulimit memlock=) or run fewer workers",
            match caps::memlock_limit() {
                Some(l) => format!("{l} bytes"),
                None => "unlimited".to_string(),
            }
        ),
        other => format!("glommio could not build its executor: {other}"),
    }
}

/// Builds a glommio executor on this thread per `settings`, runs `main` on it, and tears it
/// down. See [`crate::GlommioRuntime`].
pub(crate) fn block_on<F, Fut>(settings: &EngineSettings, main: F) -> Result<Fut::Output, EngineError>
where
    F: FnOnce() -> Fut,
    Fut: Future,
{
    let guard = EngineGuard::claim(NAME, settings.cpu)?;
    if settings.force_fallback {
        return Err(build_error(
            settings,
            "a fallback driver was forced, but glommio has none: it runs on io_uring only (monoio's epoll \
             driver is the fallback: --runtime monoio --epoll)"
                .into(),
        ));
    }
    if let Some(why) = caps::io_uring_unavailable() {
        return Err(build_error(
            settings,
            format!("io_uring is unavailable ({why}) and glommio has no fallback driver (monoio falls back to epoll)"),
        ));
    }
    let (plan, aux_budget) = split_budget(settings, caps::memlock_limit(), caps::kernel_charges_rings())
        .map_err(|r| build_error(settings, r))?;

    // Placement::Unbound: the launcher has already pinned this thread, and glommio must not
    // re-pin it. (Glommio ignores `spin_before_park` for unbound executors, so none is set;
    // see the crate docs for why spinning is not worth it anyway.) The one blocking thread
    // (fsync, the poll(2) fallback of FdWatch) is created unbound, so it inherits this
    // thread's pinning: a core's blocking work stays on that core, and the thread sleeps in
    // the kernel while it waits.
    let builder = LocalExecutorBuilder::new(Placement::Unbound)
        .name(&format!("corepin-glommio-{}", settings.cpu))
        .io_memory(plan.io_memory)
        .ring_depth(plan.ring_depth as usize)
        .preempt_timer(PREEMPT_TIMER)
        .record_io_latencies(false)
        .blocking_thread_pool_placement(PoolPlacement::Unbound(1));
    // Glommio's reactor setup unwraps a few results internally; a panic there is a build
    // failure, not a reason to take the process down.
    // Glommio spawns its blocking thread unnamed while it builds the executor, and Linux gives
    // an unnamed thread its creator's name: rename this thread for the duration so the pool
    // thread is `corepin-gb<cpu>`, not a second `corepin-w<cpu>`.
    let saved_name = thread_name();
    set_thread_name(&format!("corepin-gb{}", settings.cpu));
    let made = catch_unwind(AssertUnwindSafe(move || builder.make()));
    set_thread_name(&saved_name);
    let executor = match made {
        Ok(Ok(ex)) => ex,
        Ok(Err(e)) => return Err(build_error(settings, describe_glommio_error(e))),
        Err(_) => return Err(build_error(settings, "glommio panicked while building its executor".into())),
    };

    tracing::debug!(
        cpu = settings.cpu,
        io_memory = plan.io_memory,
        ring_depth = plan.ring_depth,
        "glommio engine built"
    );
    // Built here, on the worker's thread (SINGLE_ISSUER), before the service runs.
    let aux = aux::build_for_core(settings.cpu, aux_budget);
    // Stops the aux ring once the executor is gone (also on unwinding).
    let _stop = aux::UninstallOnDrop;
    let claimed = &guard;
    let out = executor.run(async move {
        let missing = aux::install_for_core::<crate::GlommioRuntime>(settings.cpu, aux);
        claimed.set_capabilities(capabilities(settings, &plan, KernelSupport::get(), missing));
        let out = main().await;
        aux::stop::<crate::GlommioRuntime>().await;
        out
    });
    drop(executor);
    drop(guard);
    Ok(out)
}

/// This thread's kernel name (at most 15 bytes).
fn thread_name() -> String {
    let mut buf = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes, NUL-terminated, into our buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, buf.as_mut_ptr() as libc::c_ulong, 0, 0, 0) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Sets this thread's kernel name (truncated to 15 bytes).
fn set_thread_name(name: &str) {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from our buffer.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(budget: usize, entries: u32) -> EngineSettings {
        EngineSettings { memlock_budget: budget, ring_entries: entries, ..EngineSettings::default() }
    }

    #[test]
    fn a_process_limit_below_512k_is_refused_with_advice() {
        let err = plan(&settings(4 << 20, 1024), Some(256 * 1024), false).unwrap_err();
        assert!(err.contains("RLIMIT_MEMLOCK is 262144 bytes"), "{err}");
        assert!(err.contains("ulimit -l"), "{err}");
    }

    #[test]
    fn a_budget_too_small_for_three_registered_slabs_is_refused() {
        let err = plan(&settings(128 * 1024, 1024), Some(8 << 20), false).unwrap_err();
        assert!(err.contains("131072 bytes"), "{err}");
        assert!(err.contains("fewer workers"), "{err}");
    }

    #[test]
    fn the_budget_is_split_across_the_three_rings() {
        let p = plan(&settings(4 << 20, 1024), Some(8 << 20), false).unwrap();
        assert_eq!(p.ring_depth, 1024);
        assert_eq!(p.io_memory, (4 << 20) / 3 / PAGE * PAGE);
        assert!(RINGS * p.io_memory <= 4 << 20);
        let p = plan(&settings(512 << 20, 1024), None, false).unwrap();
        assert_eq!(p.io_memory, MAX_IO_MEMORY);
    }

    #[test]
    fn the_aux_ring_gets_its_registered_buffers_first_and_glommio_the_rest() {
        let (p, aux) = split_budget(&settings(8 << 20, 1024), Some(8 << 20), false).unwrap();
        assert_eq!(aux, (8 << 20) - p.locked());
        assert!(aux >= AUX_WANT, "{aux}");
        assert!(p.locked() + aux <= 8 << 20);
        // A budget that leaves glommio only its minimum gives the aux ring what is left.
        let (p, aux) = split_budget(&settings(1 << 20, 1024), Some(8 << 20), false).unwrap();
        assert!(p.io_memory >= MIN_IO_MEMORY);
        assert!(p.locked() + aux <= 1 << 20);
        assert!(aux > 0 && aux < AUX_WANT);
        // Too small for glommio: refused as before, nothing set aside.
        assert!(split_budget(&settings(128 * 1024, 1024), Some(8 << 20), false).is_err());
    }

    #[test]
    fn kernels_that_charge_rings_shrink_them_to_fit() {
        let p = plan(&settings(512 * 1024, 4096), Some(8 << 20), true).unwrap();
        assert!(p.ring_depth < 4096);
        assert!(RINGS * ring_bytes(p.ring_depth) + RINGS * p.io_memory <= 512 * 1024);
        assert!(p.io_memory >= MIN_IO_MEMORY);
    }
}
