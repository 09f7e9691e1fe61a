//! Per-core counters of the file server and their Prometheus text exposition.
//!
//! Each core writes only its own cache-padded counters (a relaxed load and store, no locked
//! instruction); a scrape reads every core's values and renders them with
//! `prometheus-client`, per core (`core="N"`) and summed over cores (the `*_all_cores`
//! families, so that `sum()` over a per-core family never double counts).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use corepin_core::worker::{CoreCounters, Counters, PerCore};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// How a response body reached the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferPath {
    /// `sendfile(2)`: page cache to socket, no user-space copy.
    Sendfile,
    /// From the per-core in-memory cache (small hot files), one write with the headers.
    Memory,
    /// Read into a buffer, then written: the fallback where sendfile cannot be used.
    ReadWrite,
}

impl TransferPath {
    /// Every path, in exposition order.
    pub const ALL: [TransferPath; 3] = [TransferPath::Sendfile, TransferPath::Memory, TransferPath::ReadWrite];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            TransferPath::Sendfile => "sendfile",
            TransferPath::Memory => "memory",
            TransferPath::ReadWrite => "read-write",
        }
    }
}

/// One core's file-server counters (written by that core only).
#[derive(Debug, Default)]
pub struct CoreFileCounters {
    /// Responses by status class: index 0 is 1xx, ..., 4 is 5xx.
    pub responses: [AtomicU64; 5],
    /// Response bytes sent (headers and bodies).
    pub bytes_sent: AtomicU64,
    /// Bodies sent, by [`TransferPath`].
    pub transfers: [AtomicU64; 3],
    /// Body bytes sent, by [`TransferPath`].
    pub transfer_bytes: [AtomicU64; 3],
    /// Connections closed for a timeout (header, idle, or slow reader).
    pub timeouts: AtomicU64,
    /// Body bytes read by the engine (off the worker's thread) instead of by sendfile, because
    /// the page cache missed part of their range.
    pub cold_bytes: AtomicU64,
}

impl CoreFileCounters {
    /// Counts a response with `status`.
    pub fn response(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        CoreCounters::add(&self.responses[class], 1);
    }
    /// Counts a connection closed by a timeout.
    pub fn timeout(&self) {
        CoreCounters::add(&self.timeouts, 1);
    }
    /// Counts body bytes read through the engine because the page cache did not hold them.
    pub fn cold(&self, bytes: u64) {
        CoreCounters::add(&self.cold_bytes, bytes);
    }
    /// Counts one body sent by `path`.
    pub fn transfer(&self, path: TransferPath, bytes: u64) {
        let i = TransferPath::ALL.iter().position(|p| *p == path).unwrap_or(0);
        CoreCounters::add(&self.transfers[i], 1);
        CoreCounters::add(&self.transfer_bytes[i], bytes);
    }
}

/// Every core's file-server counters.
pub type FileMetrics = PerCore<CoreFileCounters>;

/// Renders the framework's connection counters and the file server's counters.
#[derive(Debug)]
struct FilesCollector {
    conns: Arc<Counters>,
    files: Arc<FileMetrics>,
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// Emits a counter family per core (label `core`, plus `extra`), then its all-cores sum.
fn counter_family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    extra: Option<(&str, &[&str])>,
    cores: usize,
    value: impl Fn(usize, usize) -> u64,
) -> Result<(), std::fmt::Error> {
    let variants: Vec<Option<&str>> = match extra {
        Some((_, vals)) => vals.iter().map(|v| Some(*v)).collect(),
        None => vec![None],
    };
    let mut m = enc.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
    for core in 0..cores {
        for (vi, v) in variants.iter().enumerate() {
            let c = core.to_string();
            let mut labels: Vec<(&str, &str)> = vec![("core", c.as_str())];
            if let (Some((k, _)), Some(v)) = (extra, v) {
                labels.push((k, v));
            }
            ConstCounter::new(value(core, vi)).encode(m.encode_family(&labels)?)?;
        }
    }
    let all = format!("{name}_all_cores");
    let mut m =
        enc.encode_descriptor(&all, &format!("{help} (sum over cores)"), None, ConstCounter::new(0u64).metric_type())?;
    let sum = |vi: usize| -> u64 { (0..cores).map(|c| value(c, vi)).sum() };
    match extra {
        Some((k, vals)) => {
            for (vi, v) in vals.iter().enumerate() {
                ConstCounter::new(sum(vi)).encode(m.encode_family(&[(k, *v)])?)?;
            }
        }
        None => ConstCounter::new(sum(0)).encode(m)?,
    }
    Ok(())
}

impl Collector for FilesCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let n = self.conns.len().min(self.files.len());
        let conns = &self.conns;
        let files = &self.files;
        counter_family(&mut enc, "corepin_connections_accepted", "Connections accepted", None, n, |c, _| {
            get(&conns.core(c).connections_accepted)
        })?;
        let mut m = enc.encode_descriptor(
            "corepin_connections_active",
            "Connections open now",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        let mut total = 0i64;
        for c in 0..n {
            let v = get(&conns.core(c).connections_active) as i64;
            total += v;
            ConstGauge::new(v).encode(m.encode_family(&[("core", c.to_string().as_str())])?)?;
        }
        let m = enc.encode_descriptor(
            "corepin_connections_active_all_cores",
            "Connections open now (sum over cores)",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        ConstGauge::new(total).encode(m)?;
        counter_family(&mut enc, "corepin_received_bytes", "Bytes read from connections", None, n, |c, _| {
            get(&conns.core(c).bytes_in)
        })?;
        counter_family(
            &mut enc,
            "corepin_http_responses",
            "HTTP responses by status class",
            Some(("class", &CLASSES)),
            n,
            |c, i| get(&files.core(c).responses[i]),
        )?;
        counter_family(
            &mut enc,
            "corepin_http_sent_bytes",
            "Response bytes sent (headers and bodies)",
            None,
            n,
            |c, _| get(&files.core(c).bytes_sent),
        )?;
        let paths: Vec<&str> = TransferPath::ALL.iter().map(|p| p.name()).collect();
        counter_family(
            &mut enc,
            "corepin_file_transfers",
            "Response bodies sent, by transfer path",
            Some(("path", &paths)),
            n,
            |c, i| get(&files.core(c).transfers[i]),
        )?;
        counter_family(
            &mut enc,
            "corepin_file_transfer_bytes",
            "Body bytes sent, by transfer path",
            Some(("path", &paths)),
            n,
            |c, i| get(&files.core(c).transfer_bytes[i]),
        )?;
        counter_family(
            &mut enc,
            "corepin_http_timeouts",
            "Connections closed by a header, idle or send timeout",
            None,
            n,
            |c, _| get(&files.core(c).timeouts),
        )?;
        counter_family(
            &mut enc,
            "corepin_file_cold_bytes",
            "Body bytes read by the engine instead of by sendfile, after a page-cache miss in their range",
            None,
            n,
            |c, _| get(&files.core(c).cold_bytes),
        )?;
        Ok(())
    }
}

/// Renders the current values in the Prometheus text format.
pub fn render(conns: &Arc<Counters>, files: &Arc<FileMetrics>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(FilesCollector { conns: Arc::clone(conns), files: Arc::clone(files) }));
    let mut out = String::new();
    // Encoding into a String cannot fail except through a collector bug; report it inline.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        out = format!("# encoding failed: {e}\n");
    }
    out
}

/// The metrics endpoint: its own listener on its own (unpinned) thread, so a scrape never
/// competes with a worker's event loop and a busy worker never delays a scrape.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Listens on `addr` and answers `GET /metrics` (any path) with the current values.
    pub fn start(addr: SocketAddr, conns: Arc<Counters>, files: Arc<FileMetrics>) -> io::Result<MetricsServer> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = Arc::clone(&stop);
        let thread = std::thread::Builder::new().name("corepin-metrics".into()).spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::Acquire) {
                    break;
                }
                if let Ok(c) = conn {
                    if let Err(e) = answer(c, &conns, &files) {
                        tracing::debug!("metrics scrape failed: {e}");
                    }
                }
            }
        })?;
        Ok(MetricsServer { addr, stop, thread: Some(thread) })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept call so the thread sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn answer(mut c: TcpStream, conns: &Arc<Counters>, files: &Arc<FileMetrics>) -> io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    c.set_write_timeout(Some(Duration::from_secs(5)))?;
    // Read the request head (bounded); its content does not change the answer.
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = c.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head_only = head.starts_with(b"HEAD ");
    let body = render(conns, files);
    let hdr = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    c.write_all(hdr.as_bytes())?;
    if !head_only {
        c.write_all(body.as_bytes())?;
    }
    Ok(())
}
