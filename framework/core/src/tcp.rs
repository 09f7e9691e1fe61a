//! The TCP server app: one `SO_REUSEPORT` listener per core, created on the launching thread
//! (so "address in use" is reported before anything starts), adopted by each worker's
//! runtime; an accept loop that hands each connection to the core's service instance.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::launcher::{App, AppError};
use crate::runtime::{Runtime, TcpListener, TcpStream};
use crate::service::{Acceptor, Connection, Plain, Service, ServiceFactory, Stream};
use crate::task::{catch_panic, spawn, spawn_detached};
use crate::worker::{ConnectionGuard, CoreCounters, Worker};

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
///
/// `SO_REUSEPORT` would also let a second process of the same user join the group and take
/// half the connections without any error, so once bound, the listening sockets of this
/// network namespace are checked: any on the same port and an overlapping address that is not
/// one of ours makes this fail with [`ListenError::InUse`], as a plain bind would.
pub fn reuseport_listeners(addr: SocketAddr, n: usize) -> Result<Vec<std::net::TcpListener>, ListenError> {
    reuseport_listeners_with(addr, n, PortSharing::Exclusive).map(|(listeners, _)| listeners)
}

/// Whether a server may share its port with listeners it did not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PortSharing {
    /// Refused with [`ListenError::InUse`] if another socket listens there (the default).
    #[default]
    Exclusive,
    /// A deliberate takeover for a zero-downtime upgrade: join the `SO_REUSEPORT` group of
    /// the running server (the kernel allows it for the same user only), so both accept until
    /// the old one is told to drain (SIGTERM). Connections still in the old listeners' accept
    /// queues when they close are reset unless `net.ipv4.tcp_migrate_req` is 1
    /// ([`migrate_req_enabled`]).
    Takeover,
}

/// What [`reuseport_listeners_with`] found on the port besides its own listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// Nobody else listened there.
    Alone,
    /// Another listener was there and the group was joined (takeover).
    Group,
}

/// [`reuseport_listeners`] with the sharing rule spelled out; also says whether another
/// listener was found (and joined, under [`PortSharing::Takeover`]).
pub fn reuseport_listeners_with(
    addr: SocketAddr,
    n: usize,
    sharing: PortSharing,
) -> Result<(Vec<std::net::TcpListener>, Joined), ListenError> {
    let listeners = bind_group(addr, n)?;
    let Some(first) = listeners.first() else {
        return Ok((listeners, Joined::Alone));
    };
    let bound = first.local_addr().map_err(|source| ListenError::Io { addr, source })?;
    let ours: Vec<u64> = listeners.iter().filter_map(|l| socket_inode(l.as_raw_fd())).collect();
    match (foreign_socket(SocketTable::TcpListening, bound, &ours), sharing) {
        (None, _) => Ok((listeners, Joined::Alone)),
        (Some(other), PortSharing::Exclusive) => {
            tracing::debug!(%bound, inode = other, "another socket already listens on this port");
            Err(ListenError::InUse { addr })
        }
        (Some(other), PortSharing::Takeover) => {
            tracing::debug!(%bound, inode = other, "joined another listener's SO_REUSEPORT group (takeover)");
            Ok((listeners, Joined::Group))
        }
    }
}

/// Whether this network namespace hands the accept queue of a closing `SO_REUSEPORT`
/// listener to the others in its group (`net.ipv4.tcp_migrate_req`, Linux 5.14+) instead of
/// resetting those connections. `None` when the setting cannot be read.
pub fn migrate_req_enabled() -> Option<bool> {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req").ok().map(|v| v.trim() == "1")
}

/// The inode of a socket descriptor, as `/proc/net/tcp` lists it.
pub(crate) fn socket_inode(fd: RawFd) -> Option<u64> {
    // SAFETY: a zeroed `stat` is a valid out-parameter; fstat fills it or fails.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is a listener the caller owns; `st` is a valid pointer.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st.st_ino)
}

/// Which sockets of `/proc/net` a port check looks at.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SocketTable {
    /// Listening TCP sockets (`/proc/net/tcp{,6}`, state `0A`).
    TcpListening,
    /// Bound, unconnected UDP sockets (`/proc/net/udp{,6}`, state `07`).
    UdpBound,
}

/// A socket of `table` in this network namespace on `bound`'s port, with an address that
/// overlaps `bound`'s (equal, or either one the wildcard), whose inode is not in `ours`.
pub(crate) fn foreign_socket(table: SocketTable, bound: SocketAddr, ours: &[u64]) -> Option<u64> {
    let (path, wanted_state) = match (table, bound.is_ipv4()) {
        (SocketTable::TcpListening, true) => ("/proc/net/tcp", "0A"),
        (SocketTable::TcpListening, false) => ("/proc/net/tcp6", "0A"),
        (SocketTable::UdpBound, true) => ("/proc/net/udp", "07"),
        (SocketTable::UdpBound, false) => ("/proc/net/udp6", "07"),
    };
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
        let (local, state, inode) = (f.get(1)?, f.get(3)?, f.get(9)?.parse::<u64>().ok()?);
        if *state != wanted_state || ours.contains(&inode) {
            return None;
        }
        let (ip_hex, port_hex) = local.split_once(':')?;
        if u16::from_str_radix(port_hex, 16).ok()? != bound.port() {
            return None;
        }
        let ip = parse_proc_ip(ip_hex)?;
        let overlaps = ip == bound.ip() || ip.is_unspecified() || bound.ip().is_unspecified();
        overlaps.then_some(inode)
    })
}

/// An address as `/proc/net/tcp{,6}` prints it: the raw bytes of the address in 32-bit words,
/// each in host byte order.
fn parse_proc_ip(hex: &str) -> Option<std::net::IpAddr> {
    let words: Vec<u32> =
        (0..hex.len() / 8).map(|i| u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok()).collect::<Option<_>>()?;
    let mut bytes = Vec::with_capacity(16);
    for w in &words {
        bytes.extend_from_slice(&w.to_ne_bytes());
    }
    match bytes.len() {
        4 => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

fn bind_group(addr: SocketAddr, n: usize) -> Result<Vec<std::net::TcpListener>, ListenError> {
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

/// Serves TCP connections with one service instance per core, each connection passing through
/// acceptor `A` ([`Plain`] by default; a TLS acceptor makes it HTTPS) before the service sees it.
pub struct TcpServer<F, A = Plain> {
    listeners: Mutex<Vec<Option<std::net::TcpListener>>>,
    local_addr: SocketAddr,
    factory: F,
    acceptor: Arc<A>,
    max_connections_per_core: usize,
}

impl<F: ServiceFactory> TcpServer<F> {
    /// Binds `workers` listeners on `addr` for `factory`'s services; refused with
    /// [`ListenError::InUse`] if another socket already listens there.
    pub fn bind(addr: SocketAddr, workers: usize, factory: F) -> Result<Self, ListenError> {
        Self::bind_with(addr, workers, factory, PortSharing::Exclusive).map(|(server, _)| server)
    }

    /// [`bind`](Self::bind) with the sharing rule spelled out ([`PortSharing::Takeover`] joins
    /// a running server's listeners, for a zero-downtime upgrade); also says whether another
    /// listener was there.
    pub fn bind_with(
        addr: SocketAddr,
        workers: usize,
        factory: F,
        sharing: PortSharing,
    ) -> Result<(Self, Joined), ListenError> {
        let (listeners, joined) = reuseport_listeners_with(addr, workers, sharing)?;
        let local_addr = listeners[0].local_addr().map_err(|source| ListenError::Io { addr, source })?;
        let server = Self {
            listeners: Mutex::new(listeners.into_iter().map(Some).collect()),
            local_addr,
            factory,
            acceptor: Arc::new(Plain),
            max_connections_per_core: usize::MAX,
        };
        Ok((server, joined))
    }
}

impl<F: ServiceFactory, A: Acceptor> TcpServer<F, A> {
    /// Puts `acceptor` between the listener and the service.
    pub fn with_acceptor<B: Acceptor>(self, acceptor: B) -> TcpServer<F, B> {
        TcpServer {
            listeners: self.listeners,
            local_addr: self.local_addr,
            factory: self.factory,
            acceptor: Arc::new(acceptor),
            max_connections_per_core: self.max_connections_per_core,
        }
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

impl<F: ServiceFactory, A: Acceptor> App for TcpServer<F, A> {
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
        let service = self
            .factory
            .new_service::<R, A::Stream<R>>(&worker)
            .map_err(|e| AppError::msg(format!("building the service on core {}: {e}", worker.info().cpu)))?;
        // Core-local handles: cloning them per connection touches no shared cache line (an
        // `Arc` clone per connection would bump one counter shared by every core).
        let service = Rc::new(service);
        let acceptor = Rc::new(Arc::clone(&self.acceptor));
        accept_loop::<R, A, F::Service<R, A::Stream<R>>>(
            &listener,
            fd,
            &worker,
            service,
            acceptor,
            self.max_connections_per_core,
        )
        .await;
        Ok(())
    }
}

/// Accepts until the worker drains. Draining shuts the listening socket down (`SHUT_RD`),
/// which completes the pending accept with an error on every backend, so no accept operation
/// is ever dropped in flight (a dropped io_uring accept could leak the socket it accepts).
#[allow(clippy::redundant_allocation)] // Rc<Arc<A>>: the Rc is the core-local handle, see `run`.
async fn accept_loop<R: Runtime, A: Acceptor, S: Service<Connection<R, A::Stream<R>>, Response = ()> + 'static>(
    listener: &R::TcpListener,
    fd: std::os::fd::RawFd,
    worker: &Worker,
    service: Rc<S>,
    acceptor: Rc<Arc<A>>,
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
                let stream = Stream::new(stream, worker.clone());
                // The panic policy: a panic in one connection's acceptor or service is
                // caught here, logged with its core and peer, counted, and closes that
                // connection only (its stream is dropped while unwinding); the core and
                // its other connections go on. See docs/architecture.md.
                let served = catch_panic(serve_connection::<R, A, S>(
                    acceptor.clone(),
                    service.clone(),
                    stream,
                    peer,
                    worker.clone(),
                ));
                spawn_detached::<R, _>(ConnTask { served, guard: Some(guard), peer });
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

/// One connection, accepted (a TLS handshake, say) and then served. Not an `async fn`: its
/// future would keep the arguments beside the copies its body works with; the block uses
/// them in place.
#[allow(clippy::redundant_allocation)] // Rc<Arc<A>>: the Rc is the core-local handle, see `run`.
#[allow(clippy::manual_async_fn)] // Deliberately not an `async fn` (above).
fn serve_connection<R: Runtime, A: Acceptor, S: Service<Connection<R, A::Stream<R>>, Response = ()>>(
    acceptor: Rc<Arc<A>>,
    service: Rc<S>,
    stream: Stream<R::TcpStream>,
    peer: SocketAddr,
    worker: Worker,
) -> impl Future<Output = ()> {
    async move {
        match acceptor.accept::<R>(stream, peer, &worker).await {
            Ok(stream) => {
                if let Err(e) = service.call(Connection::new(stream, peer, worker)).await {
                    tracing::debug!(%peer, "connection ended with an error: {e}");
                }
            }
            Err(e) => tracing::debug!(%peer, "connection not accepted: {e}"),
        }
    }
}

pin_project_lite::pin_project! {
    /// A connection's task: [`serve_connection`] with its panic caught, then the connection
    /// deregistered. A named future rather than an `async` block: a block would keep what it
    /// captured beside the connection's future, which holds the same values, for as long as
    /// the connection lives (an idle connection is mostly its task).
    struct ConnTask<F> {
        #[pin]
        served: F,
        // Also the core's handle, for the panic report.
        guard: Option<ConnectionGuard>,
        peer: SocketAddr,
    }
}

impl<F: Future<Output = Result<(), String>>> Future for ConnTask<F> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let served = ready!(this.served.poll(cx));
        // Deregistered as soon as the connection is done, not when the engine drops the task.
        let guard = this.guard.take();
        if let (Err(message), Some(guard)) = (served, &guard) {
            let worker = guard.worker();
            CoreCounters::add(&worker.counters().connection_panics, 1);
            tracing::error!(
                core = worker.info().cpu,
                peer = %this.peer,
                "a connection's task panicked ({message}); that connection is closed, the others go on"
            );
        }
        drop(guard);
        Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_addresses_parse() {
        // 127.0.0.1 as /proc/net/tcp prints it on a little-endian machine, and ::1.
        let v4 = u32::from_ne_bytes([127, 0, 0, 1]);
        assert_eq!(parse_proc_ip(&format!("{v4:08X}")), Some("127.0.0.1".parse().unwrap()));
        let one = u32::from_ne_bytes([0, 0, 0, 1]);
        assert_eq!(parse_proc_ip(&format!("000000000000000000000000{one:08X}")), Some("::1".parse().unwrap()));
        assert_eq!(parse_proc_ip("zz"), None);
    }

    #[test]
    fn a_port_another_socket_listens_on_is_refused_even_with_reuseport() {
        // A foreign SO_REUSEPORT listener (as a second corepin would have) on the port.
        let other = open_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = other.local_addr().unwrap();
        match reuseport_listeners(addr, 2) {
            Err(ListenError::InUse { .. }) => {}
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("joined another socket's reuseport group silently"),
        }
        // The wildcard overlaps too.
        let wild = SocketAddr::from(([0, 0, 0, 0], addr.port()));
        assert!(matches!(reuseport_listeners(wild, 1), Err(ListenError::InUse { .. })));
        drop(other);
        // Once it is gone, the port is ours, and our own group does not count against us.
        let ours = reuseport_listeners(addr, 2).unwrap();
        assert_eq!(ours.len(), 2);
    }
}
