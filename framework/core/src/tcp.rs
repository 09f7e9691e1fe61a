//! The TCP server app: one `SO_REUSEPORT` listener per core, created on the launching thread
//! (so "address in use" is reported before anything starts), adopted by each worker's
//! runtime; an accept loop that hands each connection to the core's service instance.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Mutex;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::launcher::{App, AppError};
use crate::runtime::{Runtime, TcpListener, TcpStream};
use crate::service::{Connection, Service, ServiceFactory, Stream};
use crate::task::spawn;
use crate::worker::Worker;

/// Listening failed.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The address is taken.
    #[error("cannot listen on {addr}: address already in use")]
    InUse {
        /// The address.
        addr: SocketAddr,
    },
    /// Another socket error.
    #[error("cannot listen on {addr}: {source}")]
    Io {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: io::Error,
    },
}

/// Opens `n` non-blocking listeners on `addr` with `SO_REUSEPORT`, so the kernel spreads
/// connections over them. Port 0 picks one free port shared by all of them.
pub fn reuseport_listeners(addr: SocketAddr, n: usize) -> Result<Vec<std::net::TcpListener>, ListenError> {
    let mut out: Vec<std::net::TcpListener> = Vec::with_capacity(n);
    let mut bind_addr = addr;
    for _ in 0..n {
        let l = open_listener(bind_addr).map_err(|source| {
            if source.kind() == io::ErrorKind::AddrInUse {
                ListenError::InUse { addr }
            } else {
                ListenError::Io { addr, source }
            }
        })?;
        if bind_addr.port() == 0 {
            bind_addr = l.local_addr().map_err(|source| ListenError::Io { addr, source })?;
        }
        out.push(l);
    }
    Ok(out)
}

fn open_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking().cloexec(), Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

/// Serves TCP connections with one service instance per core.
pub struct TcpServer<F> {
    listeners: Mutex<Vec<Option<std::net::TcpListener>>>,
    local_addr: SocketAddr,
    factory: F,
    max_connections_per_core: usize,
}

impl<F: ServiceFactory> TcpServer<F> {
    /// Binds `workers` listeners on `addr` for `factory`'s services.
    pub fn bind(addr: SocketAddr, workers: usize, factory: F) -> Result<Self, ListenError> {
        let listeners = reuseport_listeners(addr, workers)?;
        let local_addr = listeners[0].local_addr().map_err(|source| ListenError::Io { addr, source })?;
        Ok(Self {
            listeners: Mutex::new(listeners.into_iter().map(Some).collect()),
            local_addr,
            factory,
            max_connections_per_core: usize::MAX,
        })
    }

    /// Refuses (closes at once) connections beyond `n` open on one core.
    pub fn max_connections_per_core(mut self, n: usize) -> Self {
        self.max_connections_per_core = n;
        self
    }

    /// The address the listeners are bound to (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl<F: ServiceFactory> App for TcpServer<F> {
    async fn run<R: Runtime>(&self, worker: Worker) -> Result<(), AppError> {
        let index = worker.info().index;
        let std_listener = self
            .listeners
            .lock()
            .map_err(|_| AppError::msg("listener table poisoned"))?
            .get_mut(index)
            .and_then(Option::take)
            .ok_or_else(|| AppError::msg(format!("no listener prepared for worker {index}")))?;
        // Backends adopt the same descriptor, so its number stays valid for shutdown(2).
        let fd = std::os::fd::AsRawFd::as_raw_fd(&std_listener);
        let listener =
            R::TcpListener::from_std(std_listener).map_err(|e| AppError::msg(format!("adopting the listener: {e}")))?;
        let service = Rc::new(self.factory.new_service::<R>(&worker));
        accept_loop::<R, F::Service<R>>(&listener, fd, &worker, service, self.max_connections_per_core).await;
        Ok(())
    }
}

/// Accepts until the worker drains. Draining shuts the listening socket down (`SHUT_RD`),
/// which completes the pending accept with an error on every backend, so no accept operation
/// is ever dropped in flight (a dropped io_uring accept could leak the socket it accepts).
async fn accept_loop<R: Runtime, S: Service<Connection<R>, Response = ()> + 'static>(
    listener: &R::TcpListener,
    fd: std::os::fd::RawFd,
    worker: &Worker,
    service: Rc<S>,
    max_conns: usize,
) {
    let stopper = {
        let w = worker.clone();
        spawn::<R, _>(async move {
            w.draining().await;
            // SAFETY: shutdown(2) on the listener we own; it stays open until the accept loop
            // below returns and drops it.
            unsafe { libc::shutdown(fd, libc::SHUT_RD) };
        })
    };
    loop {
        if worker.is_draining() {
            break;
        }
        match listener.accept().await {
            Ok((stream, peer)) => {
                if worker.active_connections() >= max_conns {
                    tracing::debug!(%peer, "refusing connection: per-core limit reached");
                    drop(stream);
                    continue;
                }
                let _ = stream.set_nodelay(true);
                let guard = worker.register_connection(stream.as_raw_fd());
                let conn = Connection { stream: Stream::new(stream, worker.clone()), peer, worker: worker.clone() };
                let svc = service.clone();
                drop(spawn::<R, _>(async move {
                    if let Err(e) = svc.call(conn).await {
                        tracing::debug!(%peer, "connection ended with an error: {e}");
                    }
                    drop(guard);
                }));
            }
            Err(e) => {
                if worker.is_draining() {
                    break;
                }
                match e.raw_os_error() {
                    // Out of descriptors: back off instead of spinning on the full queue.
                    Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM) => {
                        tracing::warn!("accept: {e}; pausing 50 ms");
                        R::sleep(Duration::from_millis(50)).await;
                    }
                    _ => tracing::debug!("accept: {e}"),
                }
            }
        }
    }
    drop(stopper);
}
