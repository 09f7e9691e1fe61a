//! The compio backend of corepin.
//!
//! [`CompioRuntime`] implements corepin's runtime contract on compio 0.19 (compio-runtime,
//! compio-net, compio-fs, compio-driver with its io_uring driver): one compio runtime (a
//! single-threaded executor and a proactor driving one io_uring ring) per pinned worker thread.
//!
//! - Buffers go to the kernel as they are: corepin buffers are wrapped in a newtype that
//!   implements compio's buffer traits (module `buf`), never copied.
//! - Ring size and every setup flag corepin asks for go to compio's `ProactorBuilder`, walking
//!   the fallback chain when the kernel refuses one (module `engine`).
//! - Cancelable reads cancel the one receive with compio's cancel token and await its
//!   completion, so no byte is lost (module `net`).
//! - Foreign descriptors are watched with compio's `PollFd`: one-shot io_uring `POLL_ADD`s
//!   (module `fd`).
//! - compio is built without its `polling` driver: when io_uring is unavailable, or a fallback
//!   is forced, [`CompioRuntime::block_on`] fails with [`EngineError::Build`].
//!
//! See docs/compio.md for the design choices.

#![warn(missing_docs)]

mod buf;
mod engine;
mod fd;
mod fs;
mod net;

use std::future::Future;
use std::time::Duration;

use corepin_core::runtime::{EngineError, EngineSettings, Runtime};

pub use buf::Owned;
pub use fd::FdWatch;
pub use fs::File;
pub use net::{TcpListener, TcpReadHalf, TcpStream, TcpWriteHalf, UdpSocket};

/// corepin on compio.
#[derive(Debug, Clone, Copy, Default)]
pub struct CompioRuntime;

impl Runtime for CompioRuntime {
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
        // compio cancels a task whose JoinHandle is dropped; detaching lets it run on.
        compio_runtime::spawn(fut).detach();
    }

    fn sleep(dur: Duration) -> impl Future<Output = ()> {
        // compio's timer wheel: the driver's wait is bounded by the nearest deadline.
        // `sleep_until` rather than `sleep` (an `async fn` that calls it): one layer less in
        // every pending timeout, among them each idle keep-alive connection's.
        compio_runtime::time::sleep_until(std::time::Instant::now() + dur)
    }
}
