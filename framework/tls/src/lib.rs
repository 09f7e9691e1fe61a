//! corepin-tls: TLS 1.3 and 1.2 (rustls, ring provider) as a stream adapter over corepin's
//! owned-buffer streams, written once for every backend.
//!
//! [`TlsAcceptor`] is an [`Acceptor`]: put it between a `TcpServer`'s listener and its
//! service (`TcpServer::bind(..)?.with_acceptor(acceptor)`), and the service's connections
//! carry a [`TlsStream`], which implements [`ConnStream`] like the plain TCP stream does, so
//! the service does not know TLS is there. The handshake runs in the connection's own task,
//! with a deadline and a per-core cap on handshakes in progress.
//!
//! rustls's unbuffered API does the protocol; this crate owns the buffers (`session.rs`) and
//! the socket I/O (`stream.rs`): records are decrypted from and encrypted into buffers
//! allocated once per connection, and a split stream shares one session between its halves.
//! Certificates ([`certs`]) are loaded from PEM files or generated self-signed, and reloaded
//! for new handshakes on every core without a restart. One [`ServerConfig`] with one ticket
//! key (rotated) serves every core, so a session resumes on whichever core the client lands.
//! docs/tls.md has the design.

#![warn(missing_docs)]

pub mod certs;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
mod session;
mod stream;

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use corepin_core::task::with_deadline;
use corepin_core::{Acceptor, ConnStream, Runtime, Stream, Worker};
use rustls::crypto::CryptoProvider;
use rustls::server::{ServerConfig, UnbufferedServerConnection};

pub use certs::{CertError, CertStore, Expiry, LoadedCert, SelfSigned, SpkiFingerprint};
pub use metrics::{CoreTlsCounters, FailReason, TlsCollector, TlsMetrics};
pub use rustls;
pub use stream::{TlsInfo, TlsReadHalf, TlsStream, TlsWriteHalf};

use session::{Failure, Goal, Reached, Session, IN_CAP};

/// The crypto provider: ring (see docs/tls.md for why not aws-lc-rs).
pub fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// A handshake did not complete, or the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The handshake deadline passed.
    #[error("TLS handshake did not complete within {0:?}")]
    Timeout(Duration),
    /// Too many handshakes were in progress on this core.
    #[error("too many TLS handshakes in progress on this core (limit {0}); connection closed")]
    OverCap(usize),
    /// The peer closed the connection before the handshake completed.
    #[error("peer closed the connection during the TLS handshake")]
    Closed,
    /// The TLS protocol failed (bad bytes, no common version or suite, an alert, ...).
    #[error("TLS handshake failed: {0}")]
    Protocol(rustls::Error),
    /// A record or handshake message does not fit the connection's buffer.
    #[error("TLS record or handshake message larger than the connection's {IN_CAP}-byte buffer")]
    Oversized,
    /// A TLS 1.2 client asked to renegotiate, which corepin refuses (after a handshake only).
    #[error("the client asked to renegotiate TLS; renegotiation is refused")]
    Renegotiation,
    /// A socket error.
    #[error("TLS handshake: {0}")]
    Io(io::Error),
    /// The TLS configuration was refused.
    #[error("TLS configuration: {0}")]
    Config(rustls::Error),
    /// A cipher suite name the provider does not have.
    #[error("unknown TLS cipher suite {name:?} (known: {known})")]
    UnknownCipherSuite {
        /// The name asked for.
        name: String,
        /// The names the provider has.
        known: String,
    },
}

impl TlsError {
    /// The metrics label for this failure.
    pub fn reason(&self) -> FailReason {
        use rustls::{Error as E, PeerIncompatible as P};
        match self {
            TlsError::Timeout(_) => FailReason::Timeout,
            TlsError::OverCap(_) => FailReason::OverCap,
            TlsError::Closed => FailReason::Closed,
            TlsError::Oversized => FailReason::Oversized,
            TlsError::Renegotiation => FailReason::Renegotiation,
            TlsError::Io(e) => match e.kind() {
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof => {
                    FailReason::Closed
                }
                _ => FailReason::Io,
            },
            TlsError::Protocol(e) => match e {
                E::PeerIncompatible(
                    P::Tls12NotOffered | P::Tls12NotOfferedOrEnabled | P::SupportedVersionsExtensionRequired,
                ) => FailReason::ProtocolVersion,
                E::PeerIncompatible(_) | E::NoApplicationProtocol => FailReason::Incompatible,
                E::PeerMisbehaved(rustls::PeerMisbehaved::TooManyRenegotiationRequests) => FailReason::Renegotiation,
                E::InvalidMessage(_)
                | E::InappropriateMessage { .. }
                | E::InappropriateHandshakeMessage { .. }
                | E::DecryptError
                | E::PeerMisbehaved(_)
                | E::PeerSentOversizedRecord => FailReason::BadMessage,
                E::AlertReceived(_) => FailReason::Alert,
                _ => FailReason::Other,
            },
            TlsError::Config(_) | TlsError::UnknownCipherSuite { .. } => FailReason::Other,
        }
    }
}

impl From<Failure> for TlsError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Tls(e) => TlsError::Protocol(e),
            Failure::Oversized => TlsError::Oversized,
            Failure::Renegotiation => TlsError::Renegotiation,
            Failure::Io(kind, msg) => TlsError::Io(io::Error::new(kind, msg)),
        }
    }
}

/// Handshake policy.
#[derive(Debug, Clone)]
pub struct TlsOptions {
    /// Time from accepting the connection to the end of the handshake.
    pub handshake_timeout: Duration,
    /// Handshakes in progress per core beyond which new connections are closed at once.
    pub max_handshakes_per_core: usize,
    /// Application protocols offered through ALPN, most preferred first (e.g. `http/1.1`).
    /// Empty: no ALPN. A client that offers only others is refused (`no_application_protocol`).
    pub alpn: Vec<Vec<u8>>,
    /// The cipher suites offered, by their IANA names (`TLS13_AES_128_GCM_SHA256`,
    /// `TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256`, ...), in the order given; the server then
    /// picks by its own order, not the client's. Empty: every suite of the provider, in the
    /// client's order.
    pub cipher_suites: Vec<String>,
}

impl Default for TlsOptions {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            max_handshakes_per_core: 256,
            alpn: Vec::new(),
            cipher_suites: Vec::new(),
        }
    }
}

/// Builds the one `ServerConfig` every core shares: TLS 1.3 and 1.2 only, certificates from
/// `certs`, stateless session tickets from one process-wide, rotating ticket key (so a
/// session resumes on any core), and no server-side session cache (which would be a lock
/// shared by every core's handshakes).
pub fn server_config(certs: Arc<CertStore>, alpn: Vec<Vec<u8>>) -> Result<ServerConfig, TlsError> {
    server_config_with_suites(certs, alpn, &[])
}

/// [`server_config`] offering only the cipher suites named in `suites` (IANA names), in that
/// order of preference; all of the provider's when empty.
pub fn server_config_with_suites(
    certs: Arc<CertStore>,
    alpn: Vec<Vec<u8>>,
    suites: &[String],
) -> Result<ServerConfig, TlsError> {
    let mut provider = provider();
    if !suites.is_empty() {
        let name = |s: &rustls::SupportedCipherSuite| format!("{:?}", s.suite());
        let mut chosen = Vec::with_capacity(suites.len());
        for wanted in suites {
            match provider.cipher_suites.iter().find(|s| name(s).eq_ignore_ascii_case(wanted)) {
                Some(s) => chosen.push(*s),
                None => {
                    let known = provider.cipher_suites.iter().map(name).collect::<Vec<_>>().join(", ");
                    return Err(TlsError::UnknownCipherSuite { name: wanted.clone(), known });
                }
            }
        }
        provider.cipher_suites = chosen;
    }
    let mut cfg = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    cfg.alpn_protocols = alpn;
    cfg.ticketer = rustls::crypto::ring::Ticketer::new().map_err(TlsError::Config)?;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    // A chosen list is the server's preference; otherwise the client's order decides.
    cfg.ignore_client_order = !suites.is_empty();
    Ok(cfg)
}

/// The TLS acceptor: a handshake between the listener and the service.
pub struct TlsAcceptor {
    config: Arc<ServerConfig>,
    certs: Arc<CertStore>,
    options: TlsOptions,
    metrics: Arc<TlsMetrics>,
}

impl TlsAcceptor {
    /// An acceptor serving `certs` with `options`, for a server of `cores` workers.
    pub fn new(certs: Arc<CertStore>, options: TlsOptions, cores: usize) -> Result<Self, TlsError> {
        let config =
            Arc::new(server_config_with_suites(Arc::clone(&certs), options.alpn.clone(), &options.cipher_suites)?);
        Ok(Self { config, certs, options, metrics: TlsMetrics::new(cores.max(1)) })
    }

    /// The certificates (call [`CertStore::reload`] on SIGHUP).
    pub fn certs(&self) -> &Arc<CertStore> {
        &self.certs
    }

    /// The counters of every core.
    pub fn metrics(&self) -> &Arc<TlsMetrics> {
        &self.metrics
    }

    /// A collector exporting the counters and the certificate reloads.
    pub fn collector(&self) -> TlsCollector {
        TlsCollector::new(Arc::clone(&self.metrics), Arc::clone(&self.certs))
    }

    /// The shared rustls configuration.
    pub fn server_config(&self) -> &Arc<ServerConfig> {
        &self.config
    }

    /// Runs the server side of a handshake on `stream` (any [`ConnStream`]) for the worker
    /// with index `core`, counting it in that core's counters. The deadline shuts the socket
    /// down, so nothing stays in flight when it fires.
    pub async fn handshake<R: Runtime, S: ConnStream>(
        &self,
        mut stream: S,
        core: usize,
    ) -> Result<TlsStream<S>, TlsError> {
        let counters = self.metrics.core(core.min(self.metrics.len() - 1));
        if counters.in_progress() >= self.options.max_handshakes_per_core as u64 {
            counters.failed(FailReason::OverCap);
            return Err(TlsError::OverCap(self.options.max_handshakes_per_core));
        }
        counters.begin();
        let fd: RawFd = stream.as_raw_fd();
        let timeout = self.options.handshake_timeout;
        let (result, timed_out) = with_deadline::<R, _>(fd, timeout, self.run_handshake(&mut stream)).await;
        counters.end();
        let result = if timed_out { Err(TlsError::Timeout(timeout)) } else { result };
        match result {
            Ok((rx, mut session, info)) => {
                counters.completed(info.resumed, info.version, info.cipher_suite);
                session.counters = Some((Arc::clone(&self.metrics), core.min(self.metrics.len() - 1)));
                Ok(TlsStream::new(stream, rx, session, info))
            }
            Err(e) => {
                counters.failed(e.reason());
                Err(e)
            }
        }
    }

    async fn run_handshake<S: ConnStream>(&self, io: &mut S) -> Result<(Vec<u8>, Session, TlsInfo), TlsError> {
        let conn = UnbufferedServerConnection::new(Arc::clone(&self.config)).map_err(TlsError::Config)?;
        let session = std::cell::RefCell::new(Session::new(conn));
        let mut rx = Some(vec![0u8; IN_CAP]);
        loop {
            let step = session.borrow_mut().drive(Goal::Handshake);
            match step {
                Ok(Reached::Handshaken) => break,
                Ok(Reached::Transmit) => stream::flush(io, &session).await.map_err(TlsError::Io)?,
                Ok(Reached::NeedInput) => {
                    // Send what is queued first (a TLS 1.3 server's flight) before waiting.
                    stream::flush(io, &session).await.map_err(TlsError::Io)?;
                    match stream::receive(io, &mut rx, &session, None).await {
                        Ok(0) => return Err(TlsError::Closed),
                        Ok(_) => {}
                        Err(e) => {
                            let oversized =
                                session.borrow().failure.as_ref().is_some_and(|f| matches!(f, Failure::Oversized));
                            return Err(if oversized { TlsError::Oversized } else { TlsError::Io(e) });
                        }
                    }
                }
                Ok(Reached::PeerClosed) => return Err(TlsError::Closed),
                Ok(other) => return Err(TlsError::Io(io::Error::other(format!("TLS handshake stopped at {other:?}")))),
                Err(f) => {
                    // Tell the peer why (the alert rustls queued), best effort, then close.
                    session.borrow_mut().encode_alert();
                    let _ = stream::flush(io, &session).await;
                    return Err(f.into());
                }
            }
        }
        // Tickets and anything else queued at the end of the handshake go out now. The
        // handshake is complete even if the peer has already gone (a client that closes right
        // after its Finished): the failure is kept in the session, and the service sees it on
        // its first write, after any data that did arrive.
        if let Err(e) = stream::flush(io, &session).await {
            tracing::debug!("sending session tickets failed: {e}");
        }
        let session = session.into_inner();
        let info = TlsInfo::of(&session)
            .ok_or_else(|| TlsError::Io(io::Error::other("handshake complete without a version or suite")))?;
        Ok((rx.unwrap_or_else(|| vec![0; IN_CAP]), session, info))
    }
}

impl Acceptor for TlsAcceptor {
    type Stream<R: Runtime> = TlsStream<Stream<R::TcpStream>>;
    type Error = TlsError;

    async fn accept<R: Runtime>(
        &self,
        stream: Stream<R::TcpStream>,
        _peer: SocketAddr,
        worker: &Worker,
    ) -> Result<TlsStream<Stream<R::TcpStream>>, TlsError> {
        self.handshake::<R, _>(stream, worker.info().index).await
    }
}
