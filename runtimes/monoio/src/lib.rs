//! corepin on Monoio: io_uring with the setup flags corepin asks for (walking down a fallback
//! chain when the kernel refuses one), and Monoio's epoll driver when io_uring is unavailable.
//!
//! * `engine`: building and running the engine, and what it declares for the capability report.
//! * `buf`: corepin buffers presented to Monoio ([`Owned`]): a move, never a copy.
//! * `net`: TCP listener and stream, UDP socket.
//! * `fs`: files.
//! * `fd`: readiness of descriptors Monoio does not own.

#![warn(missing_docs)]

mod buf;
mod engine;
mod fd;
mod fs;
mod net;

use std::future::Future;
use std::time::Duration;

use corepin_core::runtime::{self as rt, EngineError, EngineSettings};

pub use buf::Owned;
pub use fd::FdWatch;
pub use fs::File;
pub use net::{TcpListener, TcpReadHalf, TcpStream, TcpWriteHalf, UdpSocket};

/// The Monoio backend.
pub struct MonoioRuntime;

impl rt::Runtime for MonoioRuntime {
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
        drop(monoio::spawn(fut));
    }

    fn sleep(dur: Duration) -> impl Future<Output = ()> {
        monoio::time::sleep(dur)
    }
}

/// Monoio forced onto its epoll driver: the fallback taken where io_uring is unavailable,
/// selectable on purpose (`corepin --epoll`) and tested with the same conformance bodies.
pub struct MonoioEpollRuntime;

impl rt::Runtime for MonoioEpollRuntime {
    const NAME: &'static str = "monoio-epoll";
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
        engine::block_on(&EngineSettings { force_fallback: true, ..settings.clone() }, main)
    }
    fn spawn_detached<F: Future<Output = ()> + 'static>(fut: F) {
        MonoioRuntime::spawn_detached(fut)
    }
    fn sleep(dur: Duration) -> impl Future<Output = ()> {
        MonoioRuntime::sleep(dur)
    }
}
