//! corepin-glommio: the glommio 0.9 backend of corepin.
//!
//! This crate owns [`GlommioRuntime`], the implementation of corepin's runtime contract
//! ([`corepin_core::runtime::Runtime`]) on glommio: one `LocalExecutor` per pinned worker
//! thread, sized to the worker's locked-memory budget, with TCP, UDP, files and foreign-fd
//! readiness adapted to corepin's owned-buffer I/O.
//!
//! * [`engine`](crate::engine): building, sizing and running the executor, and the
//!   capability report.
//! * [`net`](crate::net): TCP listener and stream, UDP socket.
//! * [`fs`](crate::fs): buffered files.
//! * [`fd`](crate::fd): readiness of descriptors glommio does not own.
//!
//! Glommio runs on io_uring only; it has no epoll driver, so a forced fallback or a kernel
//! without io_uring is a build error, not a degraded engine.
//!
//! # Syscalls per message
//!
//! A ping-pong echo costs about ten syscalls per message on glommio 0.9 (measured with
//! `perf stat` on `examples/echo_syscalls.rs`): the `recv` and `send`, one `io_uring_enter`
//! for the POLL_ADD glommio arms after a short read, and seven that are the scheduler's own
//! bookkeeping: each loop re-arms the preemption timer (latency ring) and the throughput
//! timer (main ring) before and after parking, and parking itself is a `membarrier`, a
//! POLL_ADD linking the latency ring into the main ring, and the waiting `io_uring_enter`.
//! `ring_depth` and `preempt_timer` do not change that count. `spin_before_park` removes the
//! three parking syscalls and the context switch, but glommio only honours it for a bound
//! placement, it did not lower latency on a 2-vCPU VM, and it burns the core while idle, so
//! corepin leaves it off.

#![warn(missing_docs)]

mod engine;
mod fd;
mod fs;
mod net;

use std::future::Future;
use std::io;
use std::time::Duration;

use corepin_core::runtime::{EngineError, EngineSettings, Runtime};
use glommio::GlommioError;

pub use fd::FdWatch;
pub use fs::File;
pub use net::{TcpListener, TcpReadHalf, TcpStream, TcpWriteHalf, UdpSocket};

/// The glommio backend.
///
/// [`block_on`](Runtime::block_on) builds a glommio `LocalExecutor` on the calling thread
/// with `Placement::Unbound` (the launcher has pinned the thread already), `io_memory` and
/// `ring_depth` sized to [`EngineSettings::memlock_budget`], and runs the service on it.
pub struct GlommioRuntime;

impl Runtime for GlommioRuntime {
    const NAME: &'static str = engine::NAME;

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
        engine::block_on(settings, main)
    }

    fn spawn_detached<F: Future<Output = ()> + 'static>(fut: F) {
        glommio::spawn_local(fut).detach();
    }

    fn sleep(dur: Duration) -> impl Future<Output = ()> {
        glommio::timer::sleep(dur)
    }
}

/// Converts a glommio error to `io::Error`, keeping the OS error code where there is one
/// (glommio's own conversion of its "enhanced" errors, which add the operation and path to
/// the message, drops the code; callers match on codes such as ECANCELED or ECONNRESET).
pub(crate) fn to_io(err: GlommioError<()>) -> io::Error {
    match err {
        GlommioError::IoError(e) => e,
        GlommioError::EnhancedIoError { source, .. } => source,
        other => io::Error::from(other),
    }
}
