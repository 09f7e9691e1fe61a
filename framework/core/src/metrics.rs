//! The metrics endpoint every service shares, and the framework's own collectors.
//!
//! A service exports its counters by adding a [`Collector`] to a [`Registry`] (the
//! `prometheus-client` registry, re-exported here, used as is: collectors, plain metrics,
//! prefixes and sub-registries all work, and a service needs no wrapper type to learn).
//! [`registry_for`] starts one with the framework's collectors for a running
//! [`Server`]: the per-core connection counters
//! ([`ConnectionCollector`]) and the capability report ([`CapabilitiesCollector`]).
//! [`MetricsEndpoint`] then serves it, in the Prometheus text format, at `/metrics` on its own
//! listener and thread.
//!
//! Counters are per core: each core writes only its own (see
//! [`PerCore`](crate::worker::PerCore)); a scrape reads every core's values and renders each
//! family per core (`core="N"`) and summed over cores in a `*_all_cores` family, so that
//! `sum()` over a per-core family never double counts.
//! [`per_core_counter`] renders a family that way for services' own counters.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub use prometheus_client;
pub use prometheus_client::collector::Collector;
pub use prometheus_client::encoding::DescriptorEncoder;
pub use prometheus_client::registry::Registry;

use prometheus_client::encoding::EncodeMetric;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::caps::{Capabilities, Driver};
use crate::launcher::Server;
use crate::worker::{CoreCounters, Counters};

/// A registry holding the framework's collectors for `server`: its per-core connection
/// counters and its capability report. Services add their own collectors to it, then hand it
/// to [`MetricsEndpoint::start`].
pub fn registry_for(server: &Server) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ConnectionCollector::new(Arc::clone(server.counters()))));
    registry.register_collector(Box::new(CapabilitiesCollector::new(server.capabilities())));
    registry
}

/// Renders `registry` in the Prometheus text format (what the endpoint serves).
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Encoding into a String cannot fail except through a collector bug; report it inline.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        out = format!("# encoding failed: {e}\n");
    }
    out
}

/// Emits the counter family `name` with one sample per core (label `core`, plus the label
/// `extra.0` with each of the values `extra.1`), then the family `{name}_all_cores` with the
/// sum over cores (one sample per `extra` value). `value(core, i)` is core `core`'s count for
/// the `i`-th `extra` value (`i` is 0 without `extra`).
pub fn per_core_counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    extra: Option<(&str, &[&str])>,
    cores: usize,
    value: impl Fn(usize, usize) -> u64,
) -> fmt::Result {
    let variants: Vec<Option<&str>> = match extra {
        Some((_, vals)) => vals.iter().map(|v| Some(*v)).collect(),
        None => vec![None],
    };
    let mut m = enc.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
    for core in 0..cores {
        let c = core.to_string();
        for (vi, v) in variants.iter().enumerate() {
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

/// Emits the gauge family `name` with one sample per core (label `core`), then
/// `{name}_all_cores` with the sum over cores. `value(core)` is core `core`'s value.
pub fn per_core_gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    cores: usize,
    value: impl Fn(usize) -> i64,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
    let mut total = 0i64;
    for c in 0..cores {
        let v = value(c);
        total += v;
        ConstGauge::new(v).encode(m.encode_family(&[("core", c.to_string().as_str())])?)?;
    }
    let all = format!("{name}_all_cores");
    let m =
        enc.encode_descriptor(&all, &format!("{help} (sum over cores)"), None, ConstGauge::new(0i64).metric_type())?;
    ConstGauge::new(total).encode(m)
}

/// Exports the framework's per-core connection counters ([`Counters`]): connections accepted
/// and open, bytes received and sent, per core and summed over cores.
#[derive(Debug)]
pub struct ConnectionCollector {
    counters: Arc<Counters>,
}

impl ConnectionCollector {
    /// Exports `counters` (a running server's are [`Server::counters`]).
    pub fn new(counters: Arc<Counters>) -> Self {
        Self { counters }
    }
}

impl Collector for ConnectionCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let conns = &self.counters;
        let n = conns.len();
        per_core_counter(&mut enc, "corepin_connections_accepted", "Connections accepted", None, n, |c, _| {
            CoreCounters::get(&conns.core(c).connections_accepted)
        })?;
        per_core_gauge(&mut enc, "corepin_connections_active", "Connections open now", n, |c| {
            CoreCounters::get(&conns.core(c).connections_active) as i64
        })?;
        per_core_counter(&mut enc, "corepin_received_bytes", "Bytes read from connections", None, n, |c, _| {
            CoreCounters::get(&conns.core(c).bytes_in)
        })?;
        per_core_counter(
            &mut enc,
            "corepin_connection_panics",
            "Connection tasks that panicked; each closed only its own connection",
            None,
            n,
            |c, _| CoreCounters::get(&conns.core(c).connection_panics),
        )?;
        per_core_counter(&mut enc, "corepin_sent_bytes", "Bytes written to connections", None, n, |c, _| {
            CoreCounters::get(&conns.core(c).bytes_out)
        })
    }
}

/// What the metrics export of one worker's capability report: the only reader of
/// [`Capabilities`]' fields here is [`capability_view`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct CapabilityView {
    runtime: String,
    /// `io_uring` or `epoll`.
    driver: &'static str,
    /// Each optional mechanism: (name, the kernel has it, the backend uses it).
    mechanisms: Vec<(String, bool, bool)>,
}

/// Reads what the metrics export from a capability report.
fn capability_view(c: &Capabilities) -> CapabilityView {
    let driver = match c.driver {
        Driver::IoUring => "io_uring",
        Driver::Epoll { .. } => "epoll",
    };
    // Label values are the report's mechanism names with `_` for spaces (`multishot_accept`).
    let mechanisms = c.mechanisms().into_iter().map(|(name, m)| (name.replace(' ', "_"), m.kernel, m.used)).collect();
    CapabilityView { runtime: c.runtime.to_string(), driver, mechanisms }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// Exports the capability report of every worker (label `core` is the worker index, as for
/// the connection counters): `corepin_driver_info{core,runtime,driver} 1` and, per optional
/// mechanism, `corepin_capability_info{core,runtime,mechanism,kernel,used} 1`, where `kernel`
/// and `used` are `yes` or `no`. Both are gauges, the usual shape of an info metric in the
/// Prometheus text format.
#[derive(Debug)]
pub struct CapabilitiesCollector {
    workers: Vec<CapabilityView>,
}

impl CapabilitiesCollector {
    /// Exports `caps`, one report per worker in worker order (as [`Server::capabilities`]
    /// returns them). The reports do not change while a server runs, so they are read once.
    pub fn new(caps: &[Capabilities]) -> Self {
        Self { workers: caps.iter().map(capability_view).collect() }
    }
}

impl Collector for CapabilitiesCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let mut m = enc.encode_descriptor(
            "corepin_driver_info",
            "The I/O driver of each core's engine",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for (core, w) in self.workers.iter().enumerate() {
            let core = core.to_string();
            let labels = [("core", core.as_str()), ("runtime", w.runtime.as_str()), ("driver", w.driver)];
            ConstGauge::new(1i64).encode(m.encode_family(&labels)?)?;
        }
        let mut m = enc.encode_descriptor(
            "corepin_capability_info",
            "Optional io_uring mechanisms of each core's engine: offered by the kernel, used by the backend",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for (core, w) in self.workers.iter().enumerate() {
            let core = core.to_string();
            for (mechanism, kernel, used) in &w.mechanisms {
                let labels = [
                    ("core", core.as_str()),
                    ("runtime", w.runtime.as_str()),
                    ("mechanism", mechanism.as_str()),
                    ("kernel", yes(*kernel)),
                    ("used", yes(*used)),
                ];
                ConstGauge::new(1i64).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// How long a scrape may take to send its request or read the answer.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request head read.
const MAX_HEAD: usize = 16 * 1024;

/// The metrics endpoint: its own listener on its own (unpinned) thread, so a scrape never
/// competes with a worker's event loop and a busy worker never delays a scrape. It answers
/// `GET /metrics` (and `HEAD`) with the registry rendered in the Prometheus text format, other
/// paths with 404, one request per connection. Dropping it stops the thread.
pub struct MetricsEndpoint {
    addr: SocketAddr,
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for MetricsEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsEndpoint").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl MetricsEndpoint {
    /// Listens on `addr` and serves `registry` until dropped.
    pub fn start(addr: SocketAddr, registry: Registry) -> io::Result<MetricsEndpoint> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let accept = listener.try_clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = Arc::clone(&stop);
        let thread = std::thread::Builder::new().name("corepin-metrics".into()).spawn(move || {
            for conn in accept.incoming() {
                if st.load(Ordering::Acquire) {
                    break;
                }
                match conn {
                    Ok(c) => {
                        if let Err(e) = answer(c, &registry) {
                            tracing::debug!("metrics scrape failed: {e}");
                        }
                    }
                    Err(e) => {
                        // Out of descriptors, say: do not spin on it.
                        tracing::debug!("metrics accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })?;
        Ok(MetricsEndpoint { addr, listener, stop, thread: Some(thread) })
    }

    /// The address it listens on (with the port the kernel chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsEndpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Shutting the listening socket down completes the blocked accept with an error, as
        // the framework drains its own listeners; connecting is the fallback wake-up.
        if socket2::SockRef::from(&self.listener).shutdown(Shutdown::Read).is_err() {
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The status line, extra headers and body for a request head.
fn respond(head: &[u8], registry: &Registry) -> (&'static str, &'static str, String) {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_ascii_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return ("400 Bad Request", "", "bad request\n".into());
    };
    let path = target.split('?').next().unwrap_or_default();
    if path != "/metrics" {
        return ("404 Not Found", "", "not found: metrics are at /metrics\n".into());
    }
    if method != "GET" && method != "HEAD" {
        return ("405 Method Not Allowed", "Allow: GET, HEAD\r\n", "method not allowed\n".into());
    }
    ("200 OK", "", render(registry))
}

fn answer(mut c: TcpStream, registry: &Registry) -> io::Result<()> {
    c.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
    c.set_write_timeout(Some(SCRAPE_TIMEOUT))?;
    // Read the request head (bounded).
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        let n = c.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head_only = head.starts_with(b"HEAD ");
    let (status, extra, body) = respond(&head, registry);
    let hdr = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\n\
         {extra}Connection: close\r\n\r\n",
        body.len()
    );
    c.write_all(hdr.as_bytes())?;
    if !head_only {
        c.write_all(body.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caps::Mechanism;
    use crate::runtime::RingFlags;

    fn mechanism(kernel: bool, used: bool) -> Mechanism {
        // `Default` keeps this independent of how the fallback text is held.
        Mechanism { kernel, used, fallback: Default::default() }
    }

    fn caps(runtime: &'static str, driver: Driver) -> Capabilities {
        Capabilities {
            runtime,
            driver,
            ring_flags_requested: RingFlags::BEST,
            ring_flags: None,
            ring_entries: 1024,
            splice: mechanism(true, true),
            send_zc: mechanism(true, false),
            registered_buffers: mechanism(false, false),
            multishot_accept: mechanism(true, true),
            multishot_recv: mechanism(true, false),
            buffer_rings: mechanism(true, false),
            fd_readiness: "poll",
            file_transfer: "sendfile",
            file_reads: "engine",
            rent_copies: false,
            notes: Vec::new(),
        }
    }

    /// Two cores' counters with distinct values.
    fn counters() -> Arc<Counters> {
        let counters = Counters::new(2);
        for (core, base) in [(0, 1u64), (1, 10)] {
            let c = counters.core(core);
            CoreCounters::add(&c.connections_accepted, base);
            CoreCounters::add(&c.connections_active, base + 1);
            CoreCounters::add(&c.bytes_in, base * 100);
            CoreCounters::add(&c.bytes_out, base * 1000);
        }
        counters
    }

    fn framework_registry() -> Registry {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ConnectionCollector::new(counters())));
        let epoll = Driver::Epoll { reason: "asked for".into() };
        registry.register_collector(Box::new(CapabilitiesCollector::new(&[
            caps("monoio", Driver::IoUring),
            caps("monoio", epoll),
        ])));
        registry
    }

    fn has(text: &str, line: &str) {
        assert!(text.lines().any(|l| l == line), "no line `{line}` in\n{text}");
    }

    #[test]
    fn connection_counters_render_per_core_and_summed() {
        let text = render(&framework_registry());
        for line in [
            "# HELP corepin_connections_accepted Connections accepted",
            "# TYPE corepin_connections_accepted counter",
            "corepin_connections_accepted_total{core=\"0\"} 1",
            "corepin_connections_accepted_total{core=\"1\"} 10",
            "# TYPE corepin_connections_accepted_all_cores counter",
            "corepin_connections_accepted_all_cores_total 11",
            "# TYPE corepin_connections_active gauge",
            "corepin_connections_active{core=\"0\"} 2",
            "corepin_connections_active{core=\"1\"} 11",
            "# TYPE corepin_connections_active_all_cores gauge",
            "corepin_connections_active_all_cores 13",
            "corepin_received_bytes_total{core=\"0\"} 100",
            "corepin_received_bytes_total{core=\"1\"} 1000",
            "corepin_received_bytes_all_cores_total 1100",
            "# TYPE corepin_sent_bytes counter",
            "corepin_sent_bytes_total{core=\"0\"} 1000",
            "corepin_sent_bytes_total{core=\"1\"} 10000",
            "corepin_sent_bytes_all_cores_total 11000",
        ] {
            has(&text, line);
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn capabilities_render_one_line_per_core_and_mechanism() {
        let text = render(&framework_registry());
        for line in [
            "# TYPE corepin_driver_info gauge",
            "corepin_driver_info{core=\"0\",runtime=\"monoio\",driver=\"io_uring\"} 1",
            "corepin_driver_info{core=\"1\",runtime=\"monoio\",driver=\"epoll\"} 1",
            "# TYPE corepin_capability_info gauge",
            "corepin_capability_info{core=\"0\",runtime=\"monoio\",mechanism=\"splice\",kernel=\"yes\",used=\"yes\"} 1",
            "corepin_capability_info{core=\"0\",runtime=\"monoio\",mechanism=\"send_zc\",kernel=\"yes\",used=\"no\"} 1",
            "corepin_capability_info{core=\"0\",runtime=\"monoio\",mechanism=\"registered_buffers\",kernel=\"no\",used=\"no\"} 1",
            "corepin_capability_info{core=\"0\",runtime=\"monoio\",mechanism=\"multishot_accept\",kernel=\"yes\",used=\"yes\"} 1",
            "corepin_capability_info{core=\"0\",runtime=\"monoio\",mechanism=\"multishot_recv\",kernel=\"yes\",used=\"no\"} 1",
            "corepin_capability_info{core=\"1\",runtime=\"monoio\",mechanism=\"buffer_rings\",kernel=\"yes\",used=\"no\"} 1",
        ] {
            has(&text, line);
        }
        assert_eq!(text.lines().filter(|l| l.starts_with("corepin_capability_info{")).count(), 12, "{text}");
        assert_eq!(text.lines().filter(|l| l.starts_with("corepin_driver_info{")).count(), 2, "{text}");
    }

    #[test]
    fn per_core_counter_with_a_label_sums_each_value() {
        #[derive(Debug)]
        struct Classes;
        impl Collector for Classes {
            fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
                per_core_counter(&mut enc, "t_responses", "Responses", Some(("class", &["2xx", "4xx"])), 2, |c, i| {
                    (c as u64 + 1) * (i as u64 + 1)
                })
            }
        }
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Classes));
        let text = render(&registry);
        for line in [
            "t_responses_total{core=\"0\",class=\"2xx\"} 1",
            "t_responses_total{core=\"0\",class=\"4xx\"} 2",
            "t_responses_total{core=\"1\",class=\"2xx\"} 2",
            "t_responses_total{core=\"1\",class=\"4xx\"} 4",
            "# HELP t_responses_all_cores Responses (sum over cores)",
            "t_responses_all_cores_total{class=\"2xx\"} 3",
            "t_responses_all_cores_total{class=\"4xx\"} 6",
        ] {
            has(&text, line);
        }
    }

    /// One request on a fresh connection: (status line, body).
    fn ask(addr: SocketAddr, request: &str) -> (String, String) {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        s.write_all(request.as_bytes()).expect("write");
        let mut all = String::new();
        s.read_to_string(&mut all).expect("read");
        let (head, body) = all.split_once("\r\n\r\n").expect("a response head");
        (head.lines().next().unwrap_or_default().to_string(), body.to_string())
    }

    #[test]
    fn the_endpoint_serves_metrics_404s_elsewhere_and_stops_on_drop() {
        let ep = MetricsEndpoint::start("127.0.0.1:0".parse().expect("addr"), framework_registry()).expect("start");
        let addr = ep.local_addr();
        assert_ne!(addr.port(), 0);
        let (status, body) = ask(addr, "GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(body.contains("\ncorepin_connections_accepted_all_cores_total 11\n"), "{body}");
        let (status, body) = ask(addr, "GET /metrics?x=1 HTTP/1.1\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(body.ends_with("# EOF\n"));
        let (status, body) = ask(addr, "HEAD /metrics HTTP/1.1\r\n\r\n");
        assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", ""));
        assert_eq!(ask(addr, "GET / HTTP/1.1\r\n\r\n").0, "HTTP/1.1 404 Not Found");
        assert_eq!(ask(addr, "POST /metrics HTTP/1.1\r\n\r\n").0, "HTTP/1.1 405 Method Not Allowed");
        assert_eq!(ask(addr, "\r\n\r\n").0, "HTTP/1.1 400 Bad Request");
        drop(ep);
        assert!(TcpStream::connect(addr).is_err(), "the listener is closed after drop");
    }
}
