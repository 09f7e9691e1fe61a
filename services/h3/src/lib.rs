//! corepin's static file server over HTTP/3 (RFC 9114) on QUIC (RFC 9000), written once
//! against corepin's traits and run on every backend.
//!
//! Per core: one UDP socket of a `SO_REUSEPORT` group (bound on the launching thread, in core
//! order), one `quinn_proto::Endpoint` and its connections driven by one task of that core's
//! executor (`quic`: no task, channel or lock per connection; request tasks read and write
//! their streams in the core's QUIC state directly), HTTP/3 framing by the `h3` crate over
//! `h3`'s QUIC traits implemented on that state (`h3_quic`), TLS 1.3 by rustls with ALPN `h3`.
//! No tokio runtime runs in a worker (h3 uses tokio's runtime-free `sync` types). Requests are
//! answered by the file server's protocol-independent part ([`corepin_files::resource`]):
//! this crate only maps HTTP/3 fields to its typed inputs and its [`Plan`] to a response,
//! and pumps the body ([`front`]).
//!
//! All cores share one stateless-reset key and one address-validation token key, so a
//! reset or token made on one core verifies on any other. Server connection IDs name their
//! core, and a classic BPF program on the reuseport group plus cross-core forwarding deliver
//! every datagram to the core that owns its connection, whatever the client's address
//! ([`steer`]).
//!
//! [`Plan`]: corepin_files::resource::Plan

#![warn(missing_docs)]

pub mod front;
pub(crate) mod h3_quic;
pub mod metrics;
pub(crate) mod quic;
pub mod steer;

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corepin_core::launcher::{App, AppError};
use corepin_core::task::{catch_panic, race, spawn, timeout, Either, LocalEvent};
use corepin_core::tcp::ListenError;
use corepin_core::worker::CoreCounters;
use corepin_core::{Runtime, Sharded, Worker};
use corepin_files::{Files, FilesFactory};
use corepin_tls::CertStore;
use quinn_proto::crypto::rustls::QuicServerConfig;

use crate::metrics::H3Metrics;
use crate::quic::{CoreSocket, Endpoint, ForwardInbox, Forwarding};
pub use crate::steer::{Steering, SteeringReport};

/// The ALPN protocol id of HTTP/3.
pub const ALPN_H3: &[u8] = b"h3";

/// The HTTP/3 error code for a clean close (`H3_NO_ERROR`).
const H3_NO_ERROR: u32 = 0x100;

/// Resumable sessions the process remembers (shared by every core).
const SESSION_CACHE: usize = 16 * 1024;

/// Settings of the HTTP/3 front end (the file server's own settings are in
/// [`corepin_files::FilesConfig`]).
#[derive(Debug, Clone)]
pub struct H3Config {
    /// Concurrent request streams a client may open on one connection.
    pub max_concurrent_streams: u32,
    /// Connections one core keeps open; further handshakes are refused.
    pub max_connections_per_core: usize,
    /// A connection with no packet from its peer for this long is closed.
    pub idle_timeout: Duration,
    /// Time from a request stream's opening to its complete header section.
    pub header_timeout: Duration,
    /// Time any single body write may wait for the client's flow control.
    pub send_timeout: Duration,
    /// Largest request header section accepted (HTTP/3 `SETTINGS_MAX_FIELD_SECTION_SIZE`).
    pub max_field_section_size: u64,
    /// How long connections may finish their requests once draining starts; then they are
    /// closed.
    pub drain_timeout: Duration,
    /// `SO_RCVBUF`/`SO_SNDBUF` of each core's socket (best effort).
    pub socket_buffer: Option<usize>,
    /// How datagrams reach the core that owns their connection.
    pub steering: Steering,
    /// Accept 0-RTT (early data) from resuming clients: GET and HEAD in early data are served,
    /// other methods get 425 Too Early (RFC 8470). Tickets are single use (one session store
    /// for the process), so an early request cannot be replayed on another core.
    pub zero_rtt: bool,
    /// When a client must prove its address with a Retry round trip before its handshake.
    pub retry: Retry,
    /// How long each of the server's connection IDs is used before quinn-proto issues a new one
    /// and retires the old (RFC 9000 §5.1.2), so that a long connection cannot be followed
    /// across address changes by one identifier; `None`: never retired. Every new ID names the
    /// same core, so steering is unaffected.
    pub cid_lifetime: Option<Duration>,
}

/// When to answer a new connection attempt with a Retry (RFC 9000 §8.1.2), which costs an
/// honest client one round trip and a spoofed source address everything: the handshake goes on
/// only from an address that can receive the Retry's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Every attempt from an address not yet validated.
    Always,
    /// Only while the core starts more than this many handshakes in the current second.
    AboveRate(u32),
}

impl Default for Retry {
    fn default() -> Self {
        Retry::AboveRate(DEFAULT_RETRY_ABOVE)
    }
}

/// Handshakes per second per core beyond which attempts get a Retry, by default.
pub const DEFAULT_RETRY_ABOVE: u32 = 1000;

impl Default for H3Config {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 100,
            max_connections_per_core: 10_000,
            idle_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(30),
            max_field_section_size: 16 * 1024,
            drain_timeout: Duration::from_secs(10),
            socket_buffer: Some(4 << 20),
            steering: Steering::default(),
            zero_rtt: false,
            retry: Retry::default(),
            cid_lifetime: Some(DEFAULT_CID_LIFETIME),
        }
    }
}

/// How long a server connection ID is used by default before it is rotated.
pub const DEFAULT_CID_LIFETIME: Duration = Duration::from_secs(600);

/// Setting the server up failed.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The UDP sockets could not be bound.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// The TLS configuration was refused (by rustls or by quinn-proto's QUIC TLS layer).
    #[error("TLS configuration for QUIC: {0}")]
    Tls(String),
    /// The system's random source failed while making the shared keys.
    #[error("cannot draw random key material: {0}")]
    Random(String),
    /// A limit is out of range for QUIC.
    #[error("{0}")]
    Limit(String),
}

/// The UDP offloads quinn-udp found on this kernel for the server's sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpOffloads {
    /// Datagrams one `sendmsg` may carry (`UDP_SEGMENT`, GSO); 1 without GSO.
    pub gso_segments: usize,
    /// Datagrams one receive may return coalesced (`UDP_GRO`); 1 without GRO.
    pub gro_segments: usize,
}

impl std::fmt::Display for UdpOffloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let on = |n: usize| if n > 1 { format!("up to {n} datagrams per call") } else { "off".to_string() };
        write!(f, "GSO {}, GRO {}", on(self.gso_segments), on(self.gro_segments))
    }
}

/// The HTTP/3 file server: an [`App`] running one QUIC endpoint per core.
pub struct H3Server {
    sockets: Mutex<Vec<Option<std::net::UdpSocket>>>,
    local_addr: SocketAddr,
    offloads: UdpOffloads,
    files: FilesFactory,
    endpoint_config: quinn_proto::EndpointConfig,
    server_config: Arc<quinn_proto::ServerConfig>,
    cfg: H3Config,
    workers: usize,
    steering: SteeringReport,
    inboxes: Sharded<ForwardInbox>,
    metrics: Arc<H3Metrics>,
}

impl H3Server {
    /// Binds `workers` UDP sockets on `addr` (one `SO_REUSEPORT` group) and prepares the
    /// QUIC and TLS configuration every core shares, presenting the certificates of `certs`.
    pub fn bind(
        addr: SocketAddr,
        workers: usize,
        files: FilesFactory,
        certs: Arc<CertStore>,
        cfg: H3Config,
    ) -> Result<Self, SetupError> {
        let endpoint_config = Self::endpoint_config()?;
        let server_config = Arc::new(server_config(certs, &cfg, workers.max(1))?);
        let sockets = corepin_core::udp::reuseport_group(addr, workers, cfg.socket_buffer)?;
        let local_addr = sockets[0].local_addr().map_err(|source| ListenError::Io { addr, source })?;
        // quinn-udp probes the kernel when it takes a socket; ask it once here for the banner
        // (every core's socket is the same kind, and adopting it again later is harmless).
        let probe =
            quinn_udp::UdpSocketState::new((&sockets[0]).into()).map_err(|source| ListenError::Io { addr, source })?;
        let offloads = UdpOffloads { gso_segments: probe.max_gso_segments(), gro_segments: probe.gro_segments() };
        let steering = match cfg.steering {
            _ if workers <= 1 => SteeringReport::OneCore,
            Steering::Hash => SteeringReport::Hash,
            _ if workers > steer::MAX_CORES => SteeringReport::Hash,
            Steering::Forward => SteeringReport::Forward(None),
            Steering::Bpf => match steer::attach_cbpf(&sockets[0], workers) {
                Ok(()) => SteeringReport::Bpf,
                Err(e) => SteeringReport::Forward(Some(e.to_string())),
            },
        };
        Ok(Self {
            sockets: Mutex::new(sockets.into_iter().map(Some).collect()),
            local_addr,
            offloads,
            files,
            endpoint_config,
            server_config,
            cfg,
            workers,
            steering,
            inboxes: Sharded::new(|_| ForwardInbox::default()),
            metrics: H3Metrics::new(workers.max(1)),
        })
    }

    /// The endpoint configuration every core shares: one stateless-reset key, so a reset
    /// made on any core for a connection is recognised whichever core the client's next
    /// packet reaches. Each core adds its own connection-ID generator ([`steer::CoreCids`]).
    fn endpoint_config() -> Result<quinn_proto::EndpointConfig, SetupError> {
        let mut seed = [0u8; 64];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .map_err(|e| SetupError::Random(e.to_string()))?;
        let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &seed);
        let mut config = quinn_proto::EndpointConfig::new(Arc::new(reset_key));
        config.supported_versions(vec![1]);
        Ok(config)
    }

    /// The address the sockets are bound to (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// What the kernel offers the sockets for batching datagrams.
    pub fn offloads(&self) -> UdpOffloads {
        self.offloads
    }

    /// The file service's counters, for the metrics endpoint.
    pub fn files(&self) -> &FilesFactory {
        &self.files
    }

    /// The QUIC counters of every core, for the metrics endpoint.
    pub fn metrics(&self) -> &Arc<H3Metrics> {
        &self.metrics
    }

    /// How datagrams reach their connection's core (for the banner).
    pub fn steering(&self) -> &SteeringReport {
        &self.steering
    }

    /// How long each server connection ID lives before it is rotated (`None`: never).
    pub fn cid_lifetime(&self) -> Option<Duration> {
        self.cfg.cid_lifetime
    }

    fn steers(&self) -> bool {
        matches!(self.steering, SteeringReport::Bpf | SteeringReport::Forward(_))
    }
}

/// The QUIC server configuration every core shares: TLS 1.3 with ALPN `h3` presenting the
/// certificate store's current certificate, one address-validation token key, the limits.
fn server_config(certs: Arc<CertStore>, cfg: &H3Config, cores: usize) -> Result<quinn_proto::ServerConfig, SetupError> {
    let provider = Arc::new(corepin_tls::provider());
    let mut tls = corepin_tls::rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&corepin_tls::rustls::version::TLS13])
        .map_err(|e| SetupError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    tls.alpn_protocols = vec![ALPN_H3.to_vec()];
    // Resumption is stateful: one session store for the process (a lock per handshake, not per
    // packet), so a session resumes on any core and, with 0-RTT, each ticket's early data is
    // accepted once only (rustls takes the session out of the store), whichever core the
    // replay reaches. rustls accepts early data only with stateful resumption.
    tls.session_storage = corepin_tls::rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
    // QUIC allows only 0 (off) or the maximum (RFC 9001 §4.6.1).
    tls.max_early_data_size = if cfg.zero_rtt { u32::MAX } else { 0 };
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| SetupError::Tls(e.to_string()))?;

    let mut seed = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
        .map_err(|e| SetupError::Random(e.to_string()))?;
    let token_key = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &[]).extract(&seed);

    let mut transport = quinn_proto::TransportConfig::default();
    transport.max_concurrent_bidi_streams(quinn_proto::VarInt::from_u32(cfg.max_concurrent_streams));
    // HTTP/3 needs three unidirectional streams of each side (control, QPACK encoder and
    // decoder); a few more leave room for extensions and GREASE.
    transport.max_concurrent_uni_streams(quinn_proto::VarInt::from_u32(8));
    let idle = quinn_proto::IdleTimeout::try_from(cfg.idle_timeout)
        .map_err(|_| SetupError::Limit(format!("idle timeout {:?} is too long for QUIC", cfg.idle_timeout)))?;
    transport.max_idle_timeout(Some(idle));

    let mut server = quinn_proto::ServerConfig::new(Arc::new(crypto), Arc::new(token_key));
    server.transport_config(Arc::new(transport));
    // quinn-proto's limits on attempts not yet accepted (65,536 of them, 100 MiB of their early
    // datagrams) are per endpoint: shared out over the cores, they hold for the process.
    server.max_incoming(((1usize << 16) / cores).max(64));
    server.incoming_buffer_size_total(((100u64 << 20) / cores as u64).max(10 << 20));
    Ok(server)
}

/// Counts open things on one core and says when none are left.
#[derive(Default)]
struct Tracker {
    open: Cell<usize>,
    idle: RefCell<Option<LocalEvent>>,
}

impl Tracker {
    fn enter(self: &Rc<Self>) -> TrackGuard {
        self.open.set(self.open.get() + 1);
        TrackGuard(Rc::clone(self))
    }
    fn open(&self) -> usize {
        self.open.get()
    }
    async fn idle(&self) {
        while self.open.get() > 0 {
            let ev = self.idle.borrow_mut().get_or_insert_with(LocalEvent::new).clone();
            ev.wait().await;
        }
    }
}

struct TrackGuard(Rc<Tracker>);

impl Drop for TrackGuard {
    fn drop(&mut self) {
        let n = self.0.open.get() - 1;
        self.0.open.set(n);
        if n == 0 {
            if let Some(ev) = self.0.idle.borrow_mut().take() {
                ev.fire();
            }
        }
    }
}

/// What every connection task of a core shares.
struct CoreShared {
    files: Files,
    cfg: H3Config,
    worker: Worker,
    metrics: Arc<H3Metrics>,
}

impl App for H3Server {
    async fn run<R: Runtime>(&self, worker: Worker) -> Result<(), AppError> {
        let index = worker.info().index;
        let socket = self
            .sockets
            .lock()
            .map_err(|_| AppError::msg("socket table poisoned"))?
            .get_mut(index)
            .and_then(Option::take)
            .ok_or_else(|| AppError::msg(format!("no UDP socket prepared for worker {index}")))?;
        let mut socket = CoreSocket::<R>::adopt(socket)
            .map_err(|e| AppError::msg(format!("adopting the UDP socket on core {}: {e}", worker.info().cpu)))?;
        let mut endpoint_config = self.endpoint_config.clone();
        // Every mode uses this generator (its IDs name the core whether or not anything routes
        // by them), so rotation and the count of issued IDs are the same in all of them.
        let (workers, lifetime, metrics) = (self.workers, self.cfg.cid_lifetime, Arc::clone(&self.metrics));
        endpoint_config.cid_generator(move || {
            Box::new(steer::CoreCids::new(index, workers).with_lifetime(lifetime).counted(Arc::clone(&metrics)))
        });
        if self.steers() {
            socket = socket
                .with_forwarding(Forwarding {
                    core: index,
                    cores: workers,
                    inboxes: self.inboxes.clone(),
                    metrics: Arc::clone(&self.metrics),
                })
                .map_err(|e| AppError::msg(e.to_string()))?;
        }
        let (endpoint, driver) = Endpoint::new::<R>(endpoint_config, Arc::clone(&self.server_config), socket);
        // The core's QUIC driver: every datagram in and out of this core goes through it.
        let driver = spawn::<R, _>(driver);
        let shared = Rc::new(CoreShared {
            // The driver counts every receive (each UDP receive, each datagram forwarded here).
            // Where the open-file cache has no posted notice on its inotify queue
            // (`corepin_core::posted`), it then reads the queue once per batch.
            files: self.files.files_for(&worker).receives_counted(),
            cfg: self.cfg.clone(),
            worker: worker.clone(),
            metrics: Arc::clone(&self.metrics),
        });
        let connections = Rc::new(Tracker::default());

        accept_loop::<R>(&endpoint, &shared, &connections).await;

        // Draining: no new connections; each open one has sent GOAWAY and closes once its
        // requests are done. Wait for them up to the drain deadline (or an order to close).
        endpoint.refuse_new();
        let deadline = R::sleep(self.cfg.drain_timeout);
        if let Either::Right(_) = race(connections.idle(), race(deadline, worker.closing())).await {
            tracing::info!(
                core = worker.info().cpu,
                open = connections.open(),
                "drain deadline passed; closing open HTTP/3 connections"
            );
        }
        endpoint.close(H3_NO_ERROR.into(), b"server shutting down");
        // Let the CONNECTION_CLOSE frames leave (bounded: a peer that vanished is not waited
        // for); the driver ends once every connection has drained.
        match timeout::<R, _>(quic::CLOSE_LINGER, driver).await {
            Ok(Ok(Err(e))) => {
                return Err(AppError::msg(format!("the QUIC socket on core {} failed: {e}", worker.info().cpu)))
            }
            Ok(Err(panicked)) => {
                return Err(AppError::msg(format!(
                    "the QUIC driver on core {} panicked: {}",
                    worker.info().cpu,
                    panicked.0
                )))
            }
            Ok(Ok(Ok(()))) => {}
            Err(_) => tracing::debug!(
                core = worker.info().cpu,
                left = endpoint.open_connections(),
                "connections still closing when the worker stopped"
            ),
        }
        Ok(())
    }
}

/// Handshakes started by one core in the current one-second window.
struct HandshakeRate {
    window: std::time::Instant,
    started: u32,
}

impl HandshakeRate {
    /// Counts one more attempt; whether the core is over `limit` attempts this second.
    fn over(&mut self, limit: u32) -> bool {
        let now = std::time::Instant::now();
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.started = 0;
        }
        self.started = self.started.saturating_add(1);
        self.started > limit
    }
}

/// Accepts connections until the worker drains.
async fn accept_loop<R: Runtime>(endpoint: &Endpoint, shared: &Rc<CoreShared>, connections: &Rc<Tracker>) {
    let worker = &shared.worker;
    let mut rate = HandshakeRate { window: std::time::Instant::now(), started: 0 };
    loop {
        let incoming = match race(endpoint.accept(), worker.draining()).await {
            Either::Left(Some(incoming)) => incoming,
            Either::Left(None) | Either::Right(()) => return,
        };
        let counters = shared.metrics.core(worker.info().index);
        if connections.open() >= shared.cfg.max_connections_per_core {
            tracing::debug!(peer = %incoming.remote_address(), "refusing connection: per-core limit reached");
            CoreCounters::add(&counters.refused, 1);
            incoming.refuse();
            continue;
        }
        // Address validation: an attempt that carries no valid token is sent a Retry when the
        // policy says so (its next Initial carries the token, and is accepted below).
        if !incoming.remote_address_validated() && incoming.may_retry() {
            let retry = match shared.cfg.retry {
                Retry::Always => true,
                Retry::AboveRate(limit) => rate.over(limit),
            };
            if retry {
                CoreCounters::add(&counters.retries, 1);
                if let Err(e) = incoming.retry() {
                    tracing::debug!("a Retry could not be sent: {e}");
                }
                continue;
            }
        }
        let guard = connections.enter();
        let shared = Rc::clone(shared);
        let open = &shared.metrics.core(worker.info().index).open;
        CoreCounters::add(open, 1);
        drop(spawn::<R, _>(async move {
            let peer = incoming.remote_address();
            let counters = shared.worker.clone();
            // The panic policy, as for TCP connections: a panic while serving one connection
            // is caught here, logged with its core and peer, counted, and ends that
            // connection only (its handles are dropped while unwinding, which closes it).
            let served = catch_panic(front::serve_connection::<R>(incoming, Rc::clone(&shared))).await;
            match served {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, "HTTP/3 connection ended: {e}"),
                Err(message) => {
                    CoreCounters::add(&counters.counters().connection_panics, 1);
                    tracing::error!(
                        core = counters.info().cpu,
                        %peer,
                        "an HTTP/3 connection's task panicked ({message}); that connection is closed, the others go on"
                    );
                }
            }
            let open = &shared.metrics.core(shared.worker.info().index).open;
            open.store(
                open.load(std::sync::atomic::Ordering::Relaxed).saturating_sub(1),
                std::sync::atomic::Ordering::Relaxed,
            );
            drop(guard);
        }));
    }
}
