//! The tokio-uring backend of corepin.
//!
//! [`TokioUringRuntime`] implements corepin's runtime contract on tokio-uring 0.5: one
//! tokio-uring runtime (a tokio current-thread runtime plus a `LocalSet`, driving an io_uring
//! ring whose descriptor sits in tokio's epoll) per pinned worker thread.
//!
//! - Buffers go to the kernel as they are: corepin buffers are wrapped in a newtype that
//!   implements tokio-uring's buffer traits (module `buf`), never copied.
//! - Ring setup flags are chosen by module `ring`: DEFER_TASKRUN cannot work with tokio-uring's
//!   driver, so the fallback chain is walked without it (SINGLE_ISSUER|COOP_TASKRUN instead of
//!   the default SINGLE_ISSUER|DEFER_TASKRUN; the reason is in the capability report).
//! - Cancelable reads wait for readiness first and never leave a read armed (module `net`).
//! - Foreign descriptors are watched with tokio's `AsyncFd` (module `fd_watch`).
//! - tokio-uring has no epoll driver: when io_uring is unavailable, or a fallback is forced,
//!   [`TokioUringRuntime::block_on`] fails with [`EngineError::Build`].

mod buf;
mod fd_watch;
mod fs;
mod net;
mod ring;

use std::cell::RefCell;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use corepin_core::caps::{io_uring_unavailable, Capabilities};
use corepin_core::runtime::{EngineError, EngineSettings, RingFlags, Runtime};

pub use fd_watch::FdWatch;
pub use fs::File;
pub use net::{TcpListener, TcpStream, UdpSocket};

/// The backend's name as the CLI spells it.
pub const NAME: &str = "tokio-uring";

thread_local! {
    /// The capability report of the engine running on this thread.
    static CAPS: RefCell<Option<Capabilities>> = const { RefCell::new(None) };
}

/// Clears this thread's capability report when the engine goes away (also on panic).
struct CapsGuard;

impl Drop for CapsGuard {
    fn drop(&mut self) {
        CAPS.with(|c| c.borrow_mut().take());
    }
}

/// corepin on tokio-uring 0.5.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioUringRuntime;

impl TokioUringRuntime {
    fn build_error(settings: &EngineSettings, reason: impl Into<String>) -> EngineError {
        EngineError::Build { runtime: NAME, cpu: settings.cpu, reason: reason.into() }
    }

    /// Builds the tokio-uring runtime, walking the flag fallback chain. Returns the runtime,
    /// the flags the kernel accepted, the ring's real SQ size, and notes.
    fn build(settings: &EngineSettings) -> Result<(tokio_uring::Runtime, RingFlags, u32, Vec<String>), EngineError> {
        let (candidates, note) = ring::candidates(settings.ring_flags);
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
            let urb = flags.uring_builder();
            // Probe with a bare ring first: a refused flag costs one io_uring_setup, and a
            // failed tokio-uring Runtime::new would leak its tokio runtime (it is held in a
            // ManuallyDrop until the driver is built).
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
                    let msg = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "panic".into());
                    refused.push(format!("{}: tokio-uring runtime panicked: {msg}", label()));
                }
            }
        }
        Err(Self::build_error(
            settings,
            format!(
                "no io_uring ring could be built with {} entries ({}); use 1..=32768 entries, fewer if memory is short, \
                 or raise RLIMIT_MEMLOCK on old kernels",
                settings.ring_entries,
                refused.join("; ")
            ),
        ))
    }
}

impl Runtime for TokioUringRuntime {
    const NAME: &'static str = NAME;

    type TcpListener = TcpListener;
    type TcpStream = TcpStream;
    type UdpSocket = UdpSocket;
    type File = File;
    type FdWatch = FdWatch;

    fn block_on<F, Fut>(settings: &EngineSettings, main: F) -> Result<Fut::Output, EngineError>
    where
        F: FnOnce() -> Fut,
        Fut: Future,
    {
        if settings.force_fallback {
            return Err(Self::build_error(
                settings,
                "tokio-uring has no epoll fallback driver, so a forced fallback cannot be honoured; \
                 use the monoio backend, whose epoll driver is the readiness-based fallback",
            ));
        }
        if let Some(why) = io_uring_unavailable() {
            return Err(Self::build_error(
                settings,
                format!("{why}; tokio-uring has no epoll fallback, use the monoio backend (its epoll driver is the fallback)"),
            ));
        }
        if CAPS.with(|c| c.borrow().is_some()) || tokio::runtime::Handle::try_current().is_ok() {
            return Err(Self::build_error(settings, "an engine is already running on this thread"));
        }
        let (rt, accepted, entries, notes) = Self::build(settings)?;
        let caps = ring::capabilities(settings.ring_flags, accepted, entries, notes);
        tracing::debug!(cpu = settings.cpu, "{caps}");
        CAPS.with(|c| *c.borrow_mut() = Some(caps));
        let _caps = CapsGuard;
        let out = rt.block_on(async move { main().await });
        // Tear the engine down before returning: tasks are dropped, then the driver cancels
        // and waits out every op still in flight.
        drop(rt);
        Ok(out)
    }

    fn capabilities() -> Option<Capabilities> {
        CAPS.with(|c| c.borrow().clone())
    }

    fn spawn_detached<F: Future<Output = ()> + 'static>(fut: F) {
        drop(tokio_uring::spawn(fut));
    }

    async fn sleep(dur: Duration) {
        // The timer is created on first poll, inside the runtime (tokio's timer needs it).
        tokio::time::sleep(dur).await
    }
}
