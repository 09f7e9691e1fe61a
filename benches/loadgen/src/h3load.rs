//! `corepin-loadgen h3`: closed-loop HTTP/3 GETs over quinn + h3 on the generator's single
//! tokio thread.
//!
//! N connections (one client endpoint, one UDP socket), each keeping K requests in flight:
//! every request task sends `GET path`, reads the whole response, checks the status and that
//! the body is as long as its content-length says, records the round trip, and sends the
//! next. Body bytes are counted as they arrive, inside the measured window, so a transfer
//! that spans the window's edges counts what arrived in it. Only loopback addresses are
//! accepted: this is a benchmark tool for a server on the same machine.
//!
//! With `--server-pid`, the server's CPU time (utime + stime from /proc/PID/stat) is read
//! exactly at the window's start and end, so the report carries the server's CPU per request
//! and per MB without the handshakes or the warm-up in it.

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, Bytes};
use hdrhistogram::Histogram;
use quinn::crypto::rustls::QuicClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::Serialize;

/// How long connecting (handshake and HTTP/3 settings) may take per connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long request tasks may take to finish after the window ends.
const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// The socket buffers `corepin h3` and the peer use; the client asks for the same.
const SOCKET_BUFFER: usize = 4 << 20;
/// Highest latency the histogram holds (ns): 100 s.
const HIST_MAX_NS: u64 = 100_000_000_000;
/// The most requests a connection may have in flight: the servers allow 100 streams.
const MAX_INFLIGHT: usize = 100;

/// What to run.
pub struct Opts {
    pub addr: SocketAddr,
    pub path: String,
    pub conns: usize,
    pub inflight: usize,
    pub secs: f64,
    pub warmup: f64,
    pub cpu: Option<usize>,
    pub ca: Option<PathBuf>,
    pub dangerous_skip_verify: bool,
    pub server_name: String,
    pub server_pid: Option<u32>,
}

#[derive(Serialize)]
struct Report {
    path: String,
    conns: usize,
    inflight: usize,
    secs: f64,
    warmup_secs: f64,
    /// Requests that completed (whole body, right length, 200) inside the window.
    requests: u64,
    req_per_sec: f64,
    /// Body bytes received inside the window.
    body_bytes: u64,
    bytes_per_sec: f64,
    p50_us: Option<f64>,
    p90_us: Option<f64>,
    p99_us: Option<f64>,
    p999_us: Option<f64>,
    max_us: Option<f64>,
    mean_us: Option<f64>,
    /// Failed requests: a status other than 200, a wrong length, a stream or connection error.
    errors: u64,
    /// Connections that failed (all their request tasks stop).
    failed_conns: u64,
    cpu: Option<usize>,
    server_pid: Option<u32>,
    /// The server's CPU time (user + system) inside the window, µs.
    server_cpu_us: Option<f64>,
    server_cpu_us_per_req: Option<f64>,
    /// Per 10^6 body bytes.
    server_cpu_us_per_mb: Option<f64>,
    /// Server CPU time / window length (1.0: one core fully busy).
    server_busy: Option<f64>,
}

struct Shared {
    start: Instant,
    end: Instant,
    hist: RefCell<Histogram<u64>>,
    requests: Cell<u64>,
    body_bytes: Cell<u64>,
    errors: Cell<u64>,
    failed_conns: Cell<u64>,
    reported: Cell<u32>,
}

impl Shared {
    fn error(&self, msg: impl FnOnce() -> String) {
        self.errors.set(self.errors.get() + 1);
        let r = self.reported.get();
        if r < 10 {
            eprintln!("corepin-loadgen: h3 error: {}", msg());
        } else if r == 10 {
            eprintln!("corepin-loadgen: (further error messages suppressed)");
        }
        self.reported.set(r + 1);
    }

    fn in_window(&self, t: Instant) -> bool {
        t >= self.start && t <= self.end
    }
}

/// Runs the load; returns the exit code (0, or 2 when the run is not clean).
pub fn run(o: Opts) -> Result<i32> {
    if !o.addr.ip().is_loopback() {
        bail!("--addr {} is not a loopback address: the h3 load generator only targets this machine", o.addr);
    }
    if o.conns == 0 {
        bail!("--conns must be at least 1");
    }
    if o.inflight == 0 || o.inflight > MAX_INFLIGHT {
        bail!("--inflight must be between 1 and {MAX_INFLIGHT} (the servers allow {MAX_INFLIGHT} streams)");
    }
    if !(o.secs.is_finite() && o.secs > 0.0) {
        bail!("--secs must be a positive number");
    }
    if !(o.warmup.is_finite() && o.warmup >= 0.0) {
        bail!("--warmup must be a non-negative number");
    }
    if !o.path.starts_with('/') {
        bail!("--path must start with '/'");
    }
    if o.ca.is_some() == o.dangerous_skip_verify {
        bail!("give exactly one of --ca PEM and --dangerous-skip-verify-loopback");
    }
    if let Some(pid) = o.server_pid {
        server_ticks(pid)?;
    }
    let client_config = client_config(o.ca.as_deref())?;
    let uri: http::Uri = format!("https://{}:{}{}", o.server_name, o.addr.port(), o.path)
        .parse()
        .with_context(|| format!("--path {:?} does not make a valid URI", o.path))?;
    if let Some(c) = o.cpu {
        crate::pin_to_cpu(c)?;
    }
    let rt = crate::single_thread_runtime()?;
    let local = tokio::task::LocalSet::new();
    let report = local.block_on(&rt, drive(&o, client_config, uri))?;
    drop(local);
    let json = serde_json::to_string(&report).context("serializing report")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{json}").context("writing to stdout")?;
    out.flush().context("flushing stdout")?;
    if report.errors > 0 {
        eprintln!("corepin-loadgen: run had {} error(s); results are not valid", report.errors);
        return Ok(2);
    }
    if report.requests == 0 && report.body_bytes == 0 {
        eprintln!("corepin-loadgen: nothing was received inside the measurement window");
        return Ok(2);
    }
    Ok(0)
}

type SendRequest = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

async fn drive(o: &Opts, client_config: quinn::ClientConfig, uri: http::Uri) -> Result<Report> {
    let mut endpoint =
        quinn::Endpoint::new(quinn::EndpointConfig::default(), None, client_socket()?, Arc::new(quinn::TokioRuntime))
            .context("cannot start the client endpoint")?;
    endpoint.set_default_client_config(client_config);

    // Connect one by one: the handshakes are not what is measured, and a server that fails
    // one is reported at once.
    let mut conns: Vec<(quinn::Connection, SendRequest)> = Vec::with_capacity(o.conns);
    for i in 0..o.conns {
        let connect = async {
            let quic = endpoint
                .connect(o.addr, &o.server_name)
                .map_err(|e| anyhow!("connection #{i}: {e}"))?
                .await
                .map_err(|e| anyhow!("connection #{i}: handshake: {e}"))?;
            let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(quic.clone()))
                .await
                .map_err(|e| anyhow!("connection #{i}: HTTP/3 setup: {e}"))?;
            tokio::task::spawn_local(async move {
                let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
            });
            anyhow::Ok((quic, send))
        };
        let c = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| anyhow!("connection #{i}: no handshake within {} s", CONNECT_TIMEOUT.as_secs()))??;
        conns.push(c);
    }

    let hist = Histogram::<u64>::new_with_bounds(1, HIST_MAX_NS, 3).context("creating histogram")?;
    let start = Instant::now() + Duration::from_secs_f64(o.warmup);
    let end = start + Duration::from_secs_f64(o.secs);
    let sh = Rc::new(Shared {
        start,
        end,
        hist: RefCell::new(hist),
        requests: Cell::new(0),
        body_bytes: Cell::new(0),
        errors: Cell::new(0),
        failed_conns: Cell::new(0),
        reported: Cell::new(0),
    });
    let mut tasks = Vec::with_capacity(o.conns * o.inflight);
    for (id, (quic, send)) in conns.iter().enumerate() {
        let failed = Rc::new(Cell::new(false));
        for _ in 0..o.inflight {
            let (send, sh, uri, failed) = (send.clone(), Rc::clone(&sh), uri.clone(), Rc::clone(&failed));
            let quic = quic.clone();
            tasks.push(tokio::task::spawn_local(requester(id, quic, send, uri, sh, failed)));
        }
    }

    tokio::time::sleep_until(start.into()).await;
    let cpu0 = o.server_pid.map(server_ticks).transpose()?;
    tokio::time::sleep_until(end.into()).await;
    let cpu1 = o.server_pid.map(server_ticks).transpose()?;

    let drain_deadline = tokio::time::Instant::from_std(end + DRAIN_GRACE);
    let mut stuck = 0u64;
    for t in tasks {
        if tokio::time::timeout_at(drain_deadline, t).await.is_err() {
            stuck += 1;
        }
    }
    if stuck > 0 {
        sh.error(|| format!("{stuck} request task(s) still waiting {} s after the window", DRAIN_GRACE.as_secs()));
    }
    for (quic, _) in &conns {
        quic.close(quinn::VarInt::from_u32(0x100), b"done");
    }
    drop(conns);
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;

    let secs = end.duration_since(start).as_secs_f64();
    let h = sh.hist.borrow();
    let n = h.len();
    let us = |ns: u64| ns as f64 / 1000.0;
    let lat = |q: f64| if n > 0 { Some(us(h.value_at_quantile(q))) } else { None };
    let requests = sh.requests.get();
    let body_bytes = sh.body_bytes.get();
    let server_cpu_us = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 * 1e6 / clock_ticks()),
        _ => None,
    };
    Ok(Report {
        path: o.path.clone(),
        conns: o.conns,
        inflight: o.inflight,
        secs,
        warmup_secs: o.warmup,
        requests,
        req_per_sec: requests as f64 / secs,
        body_bytes,
        bytes_per_sec: body_bytes as f64 / secs,
        p50_us: lat(0.5),
        p90_us: lat(0.9),
        p99_us: lat(0.99),
        p999_us: lat(0.999),
        max_us: (n > 0).then(|| us(h.max())),
        mean_us: (n > 0).then(|| h.mean() / 1000.0),
        errors: sh.errors.get(),
        failed_conns: sh.failed_conns.get(),
        cpu: o.cpu,
        server_pid: o.server_pid,
        server_cpu_us,
        server_cpu_us_per_req: server_cpu_us.filter(|_| requests > 0).map(|c| c / requests as f64),
        server_cpu_us_per_mb: server_cpu_us.filter(|_| body_bytes > 0).map(|c| c / (body_bytes as f64 / 1e6)),
        server_busy: server_cpu_us.map(|c| c / (secs * 1e6)),
    })
}

/// One request loop of one connection: GET, read it all, check it, again, until the window
/// ends. A connection-level failure stops every loop of that connection.
async fn requester(
    id: usize,
    quic: quinn::Connection,
    mut send: SendRequest,
    uri: http::Uri,
    sh: Rc<Shared>,
    failed: Rc<Cell<bool>>,
) {
    loop {
        let t0 = Instant::now();
        if t0 >= sh.end || failed.get() {
            return;
        }
        match one_request(&mut send, &uri, &sh).await {
            Ok(true) => {
                let t1 = Instant::now();
                if sh.in_window(t0) && sh.in_window(t1) {
                    sh.requests.set(sh.requests.get() + 1);
                    let ns = t1.duration_since(t0).as_nanos().min(u64::MAX as u128) as u64;
                    sh.hist.borrow_mut().saturating_record(ns.max(1));
                }
            }
            // Cut short at the window's end: neither a request nor an error.
            Ok(false) => return,
            Err(e) => {
                sh.error(|| format!("conn {id}: {e:#}"));
                if quic.close_reason().is_some() {
                    if !failed.replace(true) {
                        sh.failed_conns.set(sh.failed_conns.get() + 1);
                    }
                    return;
                }
            }
        }
    }
}

/// One GET: Ok(true) when the whole, correct response arrived; Ok(false) when the window
/// ended while its body was arriving (the stream is cancelled).
async fn one_request(send: &mut SendRequest, uri: &http::Uri, sh: &Shared) -> Result<bool> {
    let req = http::Request::get(uri.clone()).body(()).context("building the request")?;
    let mut stream = send.send_request(req).await.context("sending the request")?;
    stream.finish().await.context("ending the request")?;
    let resp = stream.recv_response().await.context("receiving the response head")?;
    if resp.status() != http::StatusCode::OK {
        bail!("status {} (expected 200)", resp.status());
    }
    let announced: Option<u64> =
        resp.headers().get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let mut got = 0u64;
    while let Some(chunk) = stream.recv_data().await.context("receiving the body")? {
        let n = chunk.remaining() as u64;
        got += n;
        let now = Instant::now();
        if sh.in_window(now) {
            sh.body_bytes.set(sh.body_bytes.get() + n);
        } else if now > sh.end {
            stream.stop_sending(h3::error::Code::H3_REQUEST_CANCELLED);
            return Ok(false);
        }
    }
    match announced {
        Some(len) if len != got => bail!("body of {got} bytes, content-length {len}"),
        None => bail!("no content-length in the response"),
        _ => Ok(true),
    }
}

/// A client UDP socket on 127.0.0.1 with the servers' buffer sizes.
fn client_socket() -> Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).context("UDP socket")?;
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    let local: SocketAddr = ([127, 0, 0, 1], 0).into();
    s.bind(&local.into()).context("binding the client socket")?;
    s.set_nonblocking(true).context("non-blocking")?;
    Ok(s.into())
}

/// TLS 1.3 with ALPN h3, the ring provider (as the servers), trusting `ca` or, without it,
/// any certificate (loopback benchmarking only; handshake signatures are still checked).
fn client_config(ca: Option<&Path>) -> Result<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with the ring provider")?;
    let mut tls = match ca {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs: Vec<CertificateDer<'static>> =
                CertificateDer::pem_file_iter(path)
                    .and_then(|it| it.collect())
                    .map_err(|e| anyhow!("cannot read certificates from {}: {e}", path.display()))?;
            if certs.is_empty() {
                bail!("{} holds no certificate", path.display());
            }
            for c in certs {
                roots.add(c).map_err(|e| anyhow!("{}: unusable certificate: {e}", path.display()))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(DangerousLoopbackOnlyVerifier(provider)))
            .with_no_client_auth(),
    };
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = QuicClientConfig::try_from(tls).context("TLS configuration for QUIC")?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// Accepts any server certificate chain (the handshake's signature is still verified against
/// the certificate presented). For benchmarking a server on loopback only: `run` refuses any
/// other address.
#[derive(Debug)]
struct DangerousLoopbackOnlyVerifier(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for DangerousLoopbackOnlyVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The server's CPU time so far (utime + stime), in clock ticks.
fn server_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("--server-pid {pid}: cannot read /proc/{pid}/stat"))?;
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let field = |i: usize| -> Result<u64> {
        fields.get(i).and_then(|v| v.parse().ok()).ok_or_else(|| anyhow!("/proc/{pid}/stat has no field {}", i + 3))
    };
    // After the command name: state is field 3 (index 0), utime field 14, stime field 15.
    Ok(field(11)? + field(12)?)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}
