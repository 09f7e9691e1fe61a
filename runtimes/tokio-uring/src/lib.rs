//! The tokio-uring backend of corepin.
//!
//! [`TokioUringRuntime`] implements corepin's runtime contract on tokio-uring 0.5: one
//! tokio-uring runtime (a tokio current-thread runtime plus a `LocalSet`, driving an io_uring
//! ring whose descriptor sits in tokio's epoll) per pinned worker thread.
//!
//! - Buffers go to the kernel as they are: corepin buffers are wrapped in a newtype that
//!   implements tokio-uring's buffer traits (module `buf`), never copied.
//! - Ring setup flags are chosen by module `engine`: DEFER_TASKRUN cannot work with tokio-uring's
//!   driver, so the fallback chain is walked without it (SINGLE_ISSUER|COOP_TASKRUN instead of
//!   the default SINGLE_ISSUER|DEFER_TASKRUN; the reason is in the capability report).
//! - Cancelable reads wait for readiness first and never leave a read armed (module `net`).
//! - Foreign descriptors are watched with tokio's `AsyncFd` (module `fd`).
//! - tokio-uring has no epoll driver: when io_uring is unavailable, or a fallback is forced,
//!   [`TokioUringRuntime::block_on`] fails with [`EngineError::Build`].

#![warn(missing_docs)]

mod buf;
mod engine;
mod fd;
mod fs;
mod net;

use std::future::Future;
use std::time::Duration;

use corepin_core::runtime::{EngineError, EngineSettings, Runtime};

pub use fd::FdWatch;
pub use fs::File;
pub use net::{TcpListener, TcpReadHalf, TcpStream, TcpWriteHalf, UdpSocket};

/// corepin on tokio-uring 0.5.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioUringRuntime;

impl Runtime for TokioUringRuntime {
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
        drop(tokio_uring::spawn(fut));
    }

    async fn sleep(dur: Duration) {
        // The timer is created on first poll, inside the runtime (tokio's timer needs it).
        tokio::time::sleep(dur).await
    }
}
