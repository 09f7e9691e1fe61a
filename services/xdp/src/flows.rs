//! Live per-flow counters: packets, bytes, first and last seen per (source, destination), in a
//! bounded table per core that evicts the flow seen least recently when full (and counts it),
//! exported as Prometheus metrics. Owns the tables and their collector; must not keep a
//! datagram's bytes.
//!
//! Each core owns its table; the metrics thread reads it at a scrape. So that a scrape never
//! stalls a core for long and a core never takes a lock per datagram, the core stages a
//! batch's updates locally and applies them under its table's (uncontended) lock once per
//! batch.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use corepin_core::datagram::{Datagram, DatagramService};
use corepin_core::metrics::prometheus_client::encoding::EncodeMetric;
use corepin_core::metrics::prometheus_client::metrics::counter::ConstCounter;
use corepin_core::metrics::prometheus_client::metrics::gauge::ConstGauge;
use corepin_core::metrics::{per_core_counter, per_core_gauge, Collector, DescriptorEncoder};
use hashlink::LinkedHashMap;

/// A flow: UDP from `src` to `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// The sender.
    pub src: SocketAddr,
    /// The receiver.
    pub dst: SocketAddr,
}

/// What a flow has carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowStats {
    /// Datagrams.
    pub packets: u64,
    /// UDP payload bytes.
    pub bytes: u64,
    /// When its first datagram was received.
    pub first_seen: SystemTime,
    /// When its latest datagram was received.
    pub last_seen: SystemTime,
}

/// One core's flows, least recently seen first.
#[derive(Debug)]
pub struct FlowTable {
    flows: LinkedHashMap<FlowKey, FlowStats>,
    capacity: usize,
    evicted: u64,
    datagrams: u64,
    bytes: u64,
}

impl FlowTable {
    /// A table holding at most `capacity` flows (at least one).
    pub fn new(capacity: usize) -> Self {
        Self { flows: LinkedHashMap::new(), capacity: capacity.max(1), evicted: 0, datagrams: 0, bytes: 0 }
    }

    /// Counts `packets` datagrams of `bytes` payload bytes for `key`, last seen at `at`.
    pub fn record(&mut self, key: FlowKey, packets: u64, bytes: u64, first: SystemTime, at: SystemTime) {
        self.datagrams += packets;
        self.bytes += bytes;
        if let Some(s) = self.flows.get_mut(&key) {
            s.packets += packets;
            s.bytes += bytes;
            s.last_seen = s.last_seen.max(at);
            self.flows.to_back(&key);
            return;
        }
        if self.flows.len() >= self.capacity {
            self.flows.pop_front();
            self.evicted += 1;
        }
        self.flows.insert(key, FlowStats { packets, bytes, first_seen: first, last_seen: at });
    }

    /// The flow's counters, if it is in the table.
    pub fn get(&self, key: &FlowKey) -> Option<&FlowStats> {
        self.flows.get(key)
    }
    /// Flows in the table, least recently seen first.
    pub fn iter(&self) -> impl Iterator<Item = (&FlowKey, &FlowStats)> {
        self.flows.iter()
    }
    /// Flows in the table now.
    pub fn len(&self) -> usize {
        self.flows.len()
    }
    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }
    /// Flows pushed out to make room.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }
    /// Datagrams counted, evicted flows' included.
    pub fn datagrams(&self) -> u64 {
        self.datagrams
    }
    /// Payload bytes counted, evicted flows' included.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// Every core's flow table, shared between the cores (each writes its own) and the metrics.
#[derive(Debug)]
pub struct Flows {
    cores: Vec<Mutex<FlowTable>>,
}

impl Flows {
    /// Tables for `cores` cores of `capacity` flows each.
    pub fn new(cores: usize, capacity: usize) -> Arc<Self> {
        Arc::new(Self { cores: (0..cores).map(|_| Mutex::new(FlowTable::new(capacity))).collect() })
    }
    /// Core `core`'s table, locked. A poisoned lock (a panic while it was held, which only a
    /// bug in this module could cause) still gives the table: its counters stay consistent
    /// per field.
    pub fn core(&self, core: usize) -> MutexGuard<'_, FlowTable> {
        self.cores[core].lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Number of cores.
    pub fn cores(&self) -> usize {
        self.cores.len()
    }
    /// Every flow of every core, merged (a flow whose datagrams reached two cores is summed).
    pub fn merged(&self) -> HashMap<FlowKey, FlowStats> {
        let mut out: HashMap<FlowKey, FlowStats> = HashMap::new();
        for c in 0..self.cores() {
            for (k, s) in self.core(c).iter() {
                out.entry(*k)
                    .and_modify(|m| {
                        m.packets += s.packets;
                        m.bytes += s.bytes;
                        m.first_seen = m.first_seen.min(s.first_seen);
                        m.last_seen = m.last_seen.max(s.last_seen);
                    })
                    .or_insert(*s);
            }
        }
        out
    }
}

/// The per-core half: a [`DatagramService`] that stages each datagram's flow and applies the
/// batch to the core's table in [`on_batch`](DatagramService::on_batch).
pub struct FlowCounter {
    flows: Arc<Flows>,
    core: usize,
    /// (packets, bytes, first, last) per flow of the current batch.
    staged: HashMap<FlowKey, (u64, u64, SystemTime, SystemTime)>,
}

impl FlowCounter {
    /// Counts into `flows`' table of core `core`.
    pub fn new(flows: Arc<Flows>, core: usize) -> Self {
        Self { flows, core, staged: HashMap::new() }
    }
}

impl DatagramService for FlowCounter {
    fn on_datagram(&mut self, d: &Datagram<'_>) {
        let key = FlowKey { src: d.from, dst: d.to };
        let e = self.staged.entry(key).or_insert((0, 0, d.received, d.received));
        e.0 += 1;
        e.1 += d.payload.len() as u64;
        e.3 = d.received;
    }
    fn on_batch(&mut self) {
        if self.staged.is_empty() {
            return;
        }
        let mut table = self.flows.core(self.core);
        for (key, (packets, bytes, first, last)) in self.staged.drain() {
            table.record(key, packets, bytes, first, last);
        }
    }
    fn on_stop(&mut self) {
        self.on_batch();
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Exports [`Flows`]: per flow (labels `core`, `src`, `dst`) packets and bytes as counters and
/// first/last seen as gauges in Unix seconds; per core the datagrams and bytes counted, the
/// flows in the table and the flows evicted.
#[derive(Debug)]
pub struct FlowCollector {
    flows: Arc<Flows>,
}

impl FlowCollector {
    /// Exports `flows`.
    pub fn new(flows: Arc<Flows>) -> Self {
        Self { flows }
    }
}

impl Collector for FlowCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let n = self.flows.cores();
        // One consistent reading per core, taken without holding the lock while encoding.
        type Snapshot = (Vec<(FlowKey, FlowStats)>, u64, u64, u64);
        let snap: Vec<Snapshot> = (0..n)
            .map(|c| {
                let t = self.flows.core(c);
                let mut v: Vec<_> = t.iter().map(|(k, s)| (*k, *s)).collect();
                v.sort_by_key(|(k, _)| *k);
                (v, t.datagrams(), t.bytes(), t.evicted())
            })
            .collect();
        per_core_counter(&mut enc, "corepin_ingest_datagrams", "Datagrams taken in", None, n, |c, _| snap[c].1)?;
        per_core_counter(&mut enc, "corepin_ingest_bytes", "UDP payload bytes taken in", None, n, |c, _| snap[c].2)?;
        per_core_gauge(&mut enc, "corepin_ingest_flows", "Flows in the core's table", n, |c| snap[c].0.len() as i64)?;
        per_core_counter(
            &mut enc,
            "corepin_ingest_flows_evicted",
            "Flows pushed out of a full table (least recently seen first)",
            None,
            n,
            |c, _| snap[c].3,
        )?;
        type Field = fn(&FlowStats) -> u64;
        for (name, help, field) in [
            ("corepin_ingest_flow_packets", "Datagrams of the flow", (|s: &FlowStats| s.packets) as Field),
            ("corepin_ingest_flow_bytes", "UDP payload bytes of the flow", |s: &FlowStats| s.bytes),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
            for (core, (flows, ..)) in snap.iter().enumerate() {
                let core = core.to_string();
                for (k, s) in flows {
                    let (src, dst) = (k.src.to_string(), k.dst.to_string());
                    let labels = [("core", core.as_str()), ("src", src.as_str()), ("dst", dst.as_str())];
                    ConstCounter::new(field(s)).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        type When = fn(&FlowStats) -> SystemTime;
        for (name, help, field) in [
            (
                "corepin_ingest_flow_first_seen_seconds",
                "When the flow's first datagram arrived (Unix time)",
                (|s: &FlowStats| s.first_seen) as When,
            ),
            ("corepin_ingest_flow_last_seen_seconds", "When the flow's latest datagram arrived (Unix time)", |s| {
                s.last_seen
            }),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, ConstGauge::new(0f64).metric_type())?;
            for (core, (flows, ..)) in snap.iter().enumerate() {
                let core = core.to_string();
                for (k, s) in flows {
                    let (src, dst) = (k.src.to_string(), k.dst.to_string());
                    let labels = [("core", core.as_str()), ("src", src.as_str()), ("dst", dst.as_str())];
                    ConstGauge::new(unix_seconds(field(s))).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corepin_core::datagram::DatagramSource;
    use corepin_core::metrics::{render, Registry};
    use std::time::Duration;

    fn key(port: u16) -> FlowKey {
        FlowKey { src: SocketAddr::from(([10, 0, 0, 1], port)), dst: "10.0.0.2:9000".parse().unwrap() }
    }

    #[test]
    fn a_full_table_evicts_the_flow_seen_least_recently_and_counts_it() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut t = FlowTable::new(2);
        t.record(key(1), 1, 10, t0, t0);
        t.record(key(2), 1, 20, t0, t0);
        // Flow 1 seen again: flow 2 is now the oldest.
        t.record(key(1), 2, 5, t0, t0 + Duration::from_secs(1));
        t.record(key(3), 1, 7, t0, t0);
        assert_eq!(t.len(), 2);
        assert_eq!(t.evicted(), 1);
        assert!(t.get(&key(2)).is_none(), "the least recently seen went");
        let one = t.get(&key(1)).unwrap();
        assert_eq!((one.packets, one.bytes, one.first_seen, one.last_seen), (3, 15, t0, t0 + Duration::from_secs(1)));
        assert_eq!((t.datagrams(), t.bytes()), (5, 42), "totals keep what evicted flows carried");
    }

    #[test]
    fn batches_are_applied_and_exported_per_flow_and_core() {
        let flows = Flows::new(2, 16);
        let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut counter = FlowCounter::new(Arc::clone(&flows), 1);
        for (port, len) in [(1, 100usize), (1, 50), (2, 7)] {
            let payload = vec![0u8; len];
            let k = key(port);
            counter.on_datagram(&Datagram {
                payload: &payload,
                from: k.src,
                to: k.dst,
                core: 1,
                queue: None,
                received: at,
                source: DatagramSource::Socket,
            });
        }
        assert!(flows.core(1).is_empty(), "nothing applied before the batch ends");
        counter.on_batch();
        assert_eq!(flows.core(1).get(&key(1)).map(|s| (s.packets, s.bytes)), Some((2, 150)));
        let mut registry = Registry::default();
        registry.register_collector(Box::new(FlowCollector::new(Arc::clone(&flows))));
        let text = render(&registry);
        for line in [
            "corepin_ingest_datagrams_total{core=\"1\"} 3",
            "corepin_ingest_datagrams_all_cores_total 3",
            "corepin_ingest_bytes_total{core=\"1\"} 157",
            "corepin_ingest_flows{core=\"0\"} 0",
            "corepin_ingest_flows{core=\"1\"} 2",
            "corepin_ingest_flows_evicted_total{core=\"1\"} 0",
            "corepin_ingest_flow_packets_total{core=\"1\",src=\"10.0.0.1:1\",dst=\"10.0.0.2:9000\"} 2",
            "corepin_ingest_flow_bytes_total{core=\"1\",src=\"10.0.0.1:1\",dst=\"10.0.0.2:9000\"} 150",
            "corepin_ingest_flow_bytes_total{core=\"1\",src=\"10.0.0.1:2\",dst=\"10.0.0.2:9000\"} 7",
            "corepin_ingest_flow_first_seen_seconds{core=\"1\",src=\"10.0.0.1:2\",dst=\"10.0.0.2:9000\"} 1700000000.0",
        ] {
            assert!(text.lines().any(|l| l == line), "no line `{line}` in\n{text}");
        }
    }
}
