//! Per-core TLS counters and their collector for the framework's metrics endpoint.
//!
//! Each core writes only its own cache-padded counters (see
//! [`PerCore`](corepin_core::worker::PerCore)); a scrape renders them per core and summed.
//! Certificate reloads are process-wide and come from the [`CertStore`].

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use corepin_core::metrics::{per_core_counter, Collector, DescriptorEncoder, Registry};
use corepin_core::worker::{CoreCounters, PerCore};
use prometheus_client::encoding::EncodeMetric;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use rustls::{CipherSuite, ProtocolVersion};

use crate::certs::CertStore;

/// Why a handshake did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    /// The handshake deadline passed (a client that stalls, or trickles).
    Timeout,
    /// The core already had its maximum of handshakes in progress.
    OverCap,
    /// The peer closed or reset the connection mid-handshake.
    Closed,
    /// Another socket error.
    Io,
    /// The client offered only TLS versions older than 1.2.
    ProtocolVersion,
    /// No cipher suite, group, signature scheme or application protocol in common.
    Incompatible,
    /// Bytes that are not TLS, or a malformed, misplaced or undecryptable message.
    BadMessage,
    /// The client sent a fatal alert.
    Alert,
    /// A record or handshake message larger than the connection's buffer.
    Oversized,
    /// A TLS 1.2 client asked to renegotiate (after the handshake; rustls refuses and so does
    /// corepin, by closing the connection).
    Renegotiation,
    /// Anything else.
    Other,
}

impl FailReason {
    /// Every reason, in exposition order.
    pub const ALL: [FailReason; 11] = [
        FailReason::Timeout,
        FailReason::OverCap,
        FailReason::Closed,
        FailReason::Io,
        FailReason::ProtocolVersion,
        FailReason::Incompatible,
        FailReason::BadMessage,
        FailReason::Alert,
        FailReason::Oversized,
        FailReason::Renegotiation,
        FailReason::Other,
    ];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            FailReason::Timeout => "timeout",
            FailReason::OverCap => "over_cap",
            FailReason::Closed => "closed",
            FailReason::Io => "io",
            FailReason::ProtocolVersion => "protocol_version",
            FailReason::Incompatible => "incompatible",
            FailReason::BadMessage => "bad_message",
            FailReason::Alert => "alert",
            FailReason::Oversized => "oversized",
            FailReason::Renegotiation => "renegotiation",
            FailReason::Other => "other",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(Self::ALL.len() - 1)
    }
}

/// The cipher suites counted (the ring provider's, TLS 1.3 then TLS 1.2).
pub fn counted_suites() -> Vec<CipherSuite> {
    rustls::crypto::ring::ALL_CIPHER_SUITES.iter().map(|s| s.suite()).collect()
}

const MAX_SUITES: usize = 16;

/// One core's TLS counters (written by that core only).
#[derive(Debug, Default)]
pub struct CoreTlsCounters {
    /// Completed full handshakes.
    pub full: AtomicU64,
    /// Completed resumed handshakes (a session ticket).
    pub resumed: AtomicU64,
    /// Failed handshakes, by [`FailReason`] (in `FailReason::ALL` order).
    pub failed: [AtomicU64; 11],
    /// Connections ended by a TLS failure after their handshake (bad or oversized records,
    /// a fatal alert, a renegotiation attempt), by [`FailReason`].
    pub broken: [AtomicU64; 11],
    /// Completed handshakes by version: TLS 1.2, TLS 1.3.
    pub versions: [AtomicU64; 2],
    /// Completed handshakes by cipher suite (in [`counted_suites`] order).
    pub suites: [AtomicU64; MAX_SUITES],
    /// Handshakes in progress now.
    pub in_progress: AtomicU64,
}

impl CoreTlsCounters {
    /// Counts a failed handshake.
    pub fn failed(&self, reason: FailReason) {
        CoreCounters::add(&self.failed[reason.index()], 1);
    }

    /// Counts a connection ended by a TLS failure after its handshake.
    pub fn broke(&self, reason: FailReason) {
        CoreCounters::add(&self.broken[reason.index()], 1);
    }

    /// Connections ended after their handshake for `reason`.
    pub fn breakages(&self, reason: FailReason) -> u64 {
        self.broken[reason.index()].load(Ordering::Relaxed)
    }

    /// Counts a completed handshake.
    pub fn completed(&self, resumed: bool, version: ProtocolVersion, suite: CipherSuite) {
        CoreCounters::add(if resumed { &self.resumed } else { &self.full }, 1);
        let v = if version == ProtocolVersion::TLSv1_3 { 1 } else { 0 };
        CoreCounters::add(&self.versions[v], 1);
        if let Some(i) = rustls::crypto::ring::ALL_CIPHER_SUITES.iter().position(|s| s.suite() == suite) {
            if let Some(c) = self.suites.get(i) {
                CoreCounters::add(c, 1);
            }
        }
    }

    /// Handshakes in progress on this core.
    pub fn in_progress(&self) -> u64 {
        self.in_progress.load(Ordering::Relaxed)
    }

    pub(crate) fn begin(&self) {
        CoreCounters::add(&self.in_progress, 1);
    }

    pub(crate) fn end(&self) {
        let v = self.in_progress.load(Ordering::Relaxed);
        self.in_progress.store(v.saturating_sub(1), Ordering::Relaxed);
    }

    /// Failed handshakes for `reason`.
    pub fn failures(&self, reason: FailReason) -> u64 {
        self.failed[reason.index()].load(Ordering::Relaxed)
    }
}

/// Every core's TLS counters.
pub type TlsMetrics = PerCore<CoreTlsCounters>;

/// Exports the TLS counters, and the certificate reloads of a [`CertStore`].
#[derive(Clone)]
pub struct TlsCollector {
    metrics: Arc<TlsMetrics>,
    certs: Arc<CertStore>,
}

impl fmt::Debug for TlsCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsCollector").finish_non_exhaustive()
    }
}

impl TlsCollector {
    /// Exports `metrics` and `certs`' reload counts.
    pub fn new(metrics: Arc<TlsMetrics>, certs: Arc<CertStore>) -> Self {
        Self { metrics, certs }
    }

    /// Adds this collector to `registry`.
    pub fn register(self, registry: &mut Registry) {
        registry.register_collector(Box::new(self));
    }
}

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl Collector for TlsCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let m = &self.metrics;
        let n = m.len();
        per_core_counter(
            &mut enc,
            "corepin_tls_handshakes",
            "Completed TLS handshakes, full or resumed",
            Some(("kind", &["full", "resumed"])),
            n,
            |c, i| if i == 0 { get(&m.core(c).full) } else { get(&m.core(c).resumed) },
        )?;
        let reasons: Vec<&str> = FailReason::ALL.iter().map(|r| r.name()).collect();
        per_core_counter(
            &mut enc,
            "corepin_tls_handshake_failures",
            "TLS handshakes that did not complete, by reason",
            Some(("reason", &reasons)),
            n,
            |c, i| get(&m.core(c).failed[i]),
        )?;
        per_core_counter(
            &mut enc,
            "corepin_tls_connection_failures",
            "Connections ended by a TLS failure after the handshake (bad records, fatal alerts, renegotiation attempts), by reason",
            Some(("reason", &reasons)),
            n,
            |c, i| get(&m.core(c).broken[i]),
        )?;
        per_core_counter(
            &mut enc,
            "corepin_tls_versions",
            "Completed TLS handshakes by protocol version",
            Some(("version", &["TLSv1.2", "TLSv1.3"])),
            n,
            |c, i| get(&m.core(c).versions[i]),
        )?;
        let names: Vec<String> = counted_suites().iter().map(|s| format!("{s:?}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).take(MAX_SUITES).collect();
        per_core_counter(
            &mut enc,
            "corepin_tls_cipher_suites",
            "Completed TLS handshakes by cipher suite",
            Some(("suite", &names)),
            n,
            |c, i| get(&m.core(c).suites[i]),
        )?;
        let mut g = enc.encode_descriptor(
            "corepin_tls_handshakes_in_progress",
            "TLS handshakes in progress",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for c in 0..n {
            let v = get(&m.core(c).in_progress) as i64;
            ConstGauge::new(v).encode(g.encode_family(&[("core", c.to_string().as_str())])?)?;
        }
        let mut r = enc.encode_descriptor(
            "corepin_tls_certificate_reloads",
            "Certificate reloads, by result (a failed reload keeps the certificate served before)",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        ConstCounter::new(self.certs.reloads()).encode(r.encode_family(&[("result", "ok")])?)?;
        ConstCounter::new(self.certs.reload_failures()).encode(r.encode_family(&[("result", "failed")])?)?;
        if let Some(expiry) = &self.certs.current().expiry {
            let g = enc.encode_descriptor(
                "corepin_tls_certificate_expiry_seconds",
                "Unix time at which the served certificate chain expires (its earliest notAfter)",
                None,
                ConstGauge::new(0i64).metric_type(),
            )?;
            ConstGauge::new(expiry.unix).encode(g)?;
        }
        Ok(())
    }
}
