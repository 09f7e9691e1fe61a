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
    /// Connections open now (handshake started, not yet closed).
    pub open: AtomicU64,
    /// Connections that ended on another client address than the one they started on (the
    /// client migrated or its NAT rebound, and the connection went on).
    pub migrated: AtomicU64,
    /// Datagrams this core received for a connection of another core and handed to it.
    pub forwarded_out: AtomicU64,
    /// Datagrams other cores handed to this core.
    pub forwarded_in: AtomicU64,
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
