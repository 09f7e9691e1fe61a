//! `corepin-peer-echo`: TCP echo servers written directly against each engine corepin runs
//! on (Monoio, Glommio, tokio-uring), plus two references: tokio's epoll multi-thread runtime
//! and a minimal hand-written io_uring loop (the floor). The benchmark harness runs them next
//! to `corepin echo` to show what corepin costs over each raw engine.
//!
//! Every engine serves from one thread pinned to `--cpu`, on a listener made the same way as
//! corepin's (SO_REUSEADDR, backlog 4096, non-blocking), with TCP_NODELAY on each accepted
//! socket and one `--buffer-size` buffer per connection. Only the I/O path differs.
//!
//! `monoio-aux` and `monoio-aux-hostsend` are issue 11's experiment (docs/aux-ring.md): Monoio
//! hosting an auxiliary io_uring that receives with multishot RECV into a per-core
//! provided-buffer ring (fixed size, `--buffer-size` unused), with the sends on the aux ring or
//! on Monoio's own.

mod aux_ring;
mod glommio;
mod monoio;
mod sys;
mod tokio_mt;
mod tokio_uring;
mod uring;

use sys::exit_on_signal;
pub(crate) use sys::{announce, pin_to_cpu};

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};

/// Entries of the io_uring submission queue for the engines that take a size (corepin's
/// default `ring_entries`, and Monoio's own default).
pub(crate) const RING_ENTRIES: u32 = 1024;

/// Listen backlog, the same as corepin's listeners.
const BACKLOG: libc::c_int = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Engine {
    /// Raw Monoio on its io_uring driver.
    Monoio,
    /// Raw Glommio executor.
    Glommio,
    /// Raw tokio-uring.
    TokioUring,
    /// Tokio's multi-thread (epoll) runtime with one worker thread.
    TokioMt,
    /// A hand-written io_uring event loop (the floor).
    Uring,
    /// Monoio hosting an auxiliary io_uring that does each connection's I/O with multishot
    /// receive into a provided-buffer ring (issue 11's experiment, docs/aux-ring.md).
    MonoioAux,
    /// The same, with the sends on Monoio's own ring (the aux ring only receives).
    MonoioAuxHostsend,
}

/// TCP echo server on one pinned core, written directly against one engine.
#[derive(Debug, Parser)]
#[command(name = "corepin-peer-echo", version)]
struct Args {
    /// The engine to serve with.
    #[arg(value_enum)]
    engine: Engine,
    /// Address to listen on (port 0 picks a free port; the real one is printed).
    #[arg(long)]
    listen: SocketAddr,
    /// The CPU to pin the serving thread to.
    #[arg(long)]
    cpu: usize,
    /// Read buffer size per connection, in bytes.
    #[arg(long, default_value_t = 16 * 1024)]
    buffer_size: usize,
    /// `uring` only: answer each HTTP/1.1 request with a fixed 200 response of this many body
    /// bytes instead of echoing (the floor for the file server's small-file benchmark).
    #[arg(long)]
    http_body: Option<usize>,
    /// `uring` only: one ACCEPT per connection instead of a multishot ACCEPT.
    #[arg(long)]
    single_accept: bool,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("corepin-peer-echo: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    if args.buffer_size == 0 {
        bail!("--buffer-size must be at least 1");
    }
    pin_to_cpu(args.cpu)?;
    exit_on_signal()?;
    let listener = bind(args.listen)?;
    let size = args.buffer_size;
    if (args.http_body.is_some() || args.single_accept) && args.engine != Engine::Uring {
        bail!("--http-body and --single-accept are for the uring engine only");
    }
    match args.engine {
        Engine::Monoio => monoio::run(listener, size),
        Engine::Glommio => glommio::run(listener, args.cpu, size),
        Engine::TokioUring => tokio_uring::run(listener, size),
        Engine::TokioMt => tokio_mt::run(listener, args.cpu, size),
        Engine::Uring => uring::run(listener, size, args.http_body, args.single_accept),
        Engine::MonoioAux => aux_ring::run(listener, aux_ring::Sends::Aux),
        Engine::MonoioAuxHostsend => aux_ring::run(listener, aux_ring::Sends::Host),
    }
}

/// A listening socket made like corepin's: SO_REUSEADDR (std sets it), backlog 4096,
/// non-blocking. Each engine adopts it with its own `from_std`/`from_raw_fd`.
fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    // SAFETY: listen(2) on a socket we own; calling it again only raises the backlog.
    if unsafe { libc::listen(l.as_raw_fd(), BACKLOG) } != 0 {
        return Err(io::Error::last_os_error()).context("listen");
    }
    l.set_nonblocking(true).context("setting the listener non-blocking")?;
    Ok(l)
}

/// How long to stop accepting after running out of descriptors or memory.
pub(crate) const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Says whether to back off for [`ACCEPT_BACKOFF`] after a failed accept (the server keeps
/// serving either way). When descriptors or memory run out, the listen queue stays full and
/// accept would fail again at once, so spinning on it would only burn the core; a correctly
/// sized benchmark never gets here. Anything else (the peer went away before it was
/// accepted, and the like) is not worth a line.
pub(crate) fn accept_failed(e: &io::Error) -> bool {
    let exhausted = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM));
    if exhausted {
        eprintln!("corepin-peer-echo: accept: {e}; pausing {} ms", ACCEPT_BACKOFF.as_millis());
    }
    exhausted
}
