//! The HTTP/3 server's own counters, per core, and their collector for the metrics endpoint
//! (next to the file server's families, which count HTTP/3 responses too).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use corepin_core::metrics::{per_core_counter, per_core_gauge, Collector, DescriptorEncoder, Registry};
use corepin_core::worker::{CoreCounters, PerCore};

/// One core's QUIC counters (written by that core only).
#[derive(Debug, Default)]
pub struct CoreH3Counters {
    /// Connections whose handshake completed.
    pub handshakes: AtomicU64,
    /// Connection attempts that failed before or during the handshake.
    pub handshakes_failed: AtomicU64,
    /// Connection attempts refused at the per-core connection limit.
    pub refused: AtomicU64,
    /// Connection attempts answered with a Retry (address validation).
    pub retries: AtomicU64,
    /// Connections whose 0-RTT data was accepted (at least one request arrived in it).
    pub zero_rtt_accepted: AtomicU64,
    /// Requests answered 425 Too Early (a method other than GET or HEAD in 0-RTT data).
    pub too_early: AtomicU64,
    /// Connections open now (handshake started, not yet closed).
    pub open: AtomicU64,
    /// Connections that ended on another client address than the one they started on (the
    /// client migrated or its NAT rebound, and the connection went on).
    pub migrated: AtomicU64,
    /// QUIC packets sent by connections that have ended (quinn-proto's path statistics).
    pub packets_sent: AtomicU64,
    /// Of those, packets declared lost.
    pub packets_lost: AtomicU64,
    /// Datagrams this core received for a connection of another core and handed to it.
    pub forwarded_out: AtomicU64,
    /// Datagrams other cores handed to this core.
    pub forwarded_in: AtomicU64,
    /// Connection IDs this core issued (at each handshake, then one per rotation).
    pub cids_issued: AtomicU64,
}

/// The counters of every core.
pub type H3Metrics = PerCore<CoreH3Counters>;

/// Exports [`H3Metrics`].
pub struct H3Collector {
    m: Arc<H3Metrics>,
}

impl H3Collector {
    /// Exports `m`.
    pub fn new(m: Arc<H3Metrics>) -> Self {
        Self { m }
    }
    /// Adds the families to `registry`.
    pub fn register(self, registry: &mut Registry) {
        registry.register_collector(Box::new(self));
    }
}

impl std::fmt::Debug for H3Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H3Collector").field("cores", &self.m.len()).finish()
    }
}

impl Collector for H3Collector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.m;
        let n = m.len();
        let get = CoreCounters::get;
        per_core_counter(&mut enc, "corepin_quic_handshakes", "QUIC handshakes completed", None, n, |c, _| {
            get(&m.core(c).handshakes)
        })?;
        per_core_counter(
            &mut enc,
            "corepin_quic_handshakes_failed",
            "QUIC connection attempts that failed before their handshake completed",
            None,
            n,
            |c, _| get(&m.core(c).handshakes_failed),
        )?;
        per_core_counter(
            &mut enc,
            "corepin_quic_connections_refused",
            "QUIC connection attempts refused at the per-core connection limit",
            None,
            n,
            |c, _| get(&m.core(c).refused),
        )?;
        per_core_counter(
            &mut enc,
            "corepin_quic_retries",
            "QUIC connection attempts answered with a Retry (address validation)",
            None,
            n,
            |c, _| get(&m.core(c).retries),
        )?;
        per_core_counter(
            &mut enc,
            "corepin_quic_zero_rtt_accepted",
            "QUIC connections whose 0-RTT data was accepted",
            None,
            n,
            |c, _| get(&m.core(c).zero_rtt_accepted),
        )?;
        per_core_counter(
            &mut enc,
            "corepin_quic_too_early",
            "Requests answered 425 Too Early (not GET or HEAD, in 0-RTT data)",
            None,
            n,
            |c, _| get(&m.core(c).too_early),
        )?;
        per_core_gauge(&mut enc, "corepin_quic_connections_open", "QUIC connections open now", n, |c| {
            get(&m.core(c).open) as i64
        })?;
        per_core_counter(
            &mut enc,
            "corepin_quic_migrated_connections",
            "QUIC connections that ended on another client address than they started on",
            None,
            n,
            |c, _| get(&m.core(c).migrated),
        )?;
        per_core_counter(
            &mut enc,
            "corepin_quic_connection_ids_issued",
            "Connection IDs issued: at each handshake, then one per rotation (--cid-lifetime)",
            None,
            n,
            |c, _| get(&m.core(c).cids_issued),
        )?;
        per_core_counter(
            &mut enc,
            "corepin_quic_packets_sent",
            "QUIC packets sent, counted when their connection ends",
            None,
            n,
            |c, _| get(&m.core(c).packets_sent),
        )?;
        per_core_counter(
            &mut enc,
            "corepin_quic_packets_lost",
            "QUIC packets declared lost, counted when their connection ends",
            None,
            n,
            |c, _| get(&m.core(c).packets_lost),
        )?;
        let dirs = ["out", "in"];
        per_core_counter(
            &mut enc,
            "corepin_quic_forwarded_datagrams",
            "Datagrams forwarded between cores to the core owning their connection (out: sent to the owner, in: received as the owner)",
            Some(("direction", &dirs)),
            n,
            |c, i| get(if i == 0 { &m.core(c).forwarded_out } else { &m.core(c).forwarded_in }),
        )
    }
}
