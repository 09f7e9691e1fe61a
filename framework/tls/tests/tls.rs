//! TLS through real sockets on every backend (and Monoio's epoll fallback): echo round trips
//! larger than the socket buffers on TLS 1.2 and 1.3, a split stream whose writer is not held
//! up by a waiting reader, close_notify, ALPN, session resumption across cores (rustls and
//! openssl clients), old versions refused (openssl), bad, truncated, oversized and stalled
//! handshakes closed while others are served, the per-core handshake cap, certificate reload,
//! and the metrics.

use std::cell::Cell;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use corepin::launcher::LaunchConfig;
use corepin::task::LocalEvent;
use corepin::tls::rustls;
use corepin::tls::{certs, CertStore, FailReason, TlsAcceptor, TlsMetrics, TlsOptions};
use corepin::topology::CoreSelection;
use corepin::{
    AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, BufResult, ConnStream, Connection, Runtime, Server, Service,
    ServiceFactory, TcpServer, Worker,
};
use rand::{RngCore, SeedableRng};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use sha2::{Digest, Sha256};

// ---- a server under test ---------------------------------------------------------------

struct Srv {
    server: Option<Server>,
    addr: SocketAddr,
    metrics: Arc<TlsMetrics>,
    collector: corepin::tls::TlsCollector,
}

impl Srv {
    fn stop(mut self) {
        let s = self.server.take().unwrap();
        s.shutdown_handle().close();
        s.wait().expect("the server stops cleanly");
    }
    fn sum(&self, f: impl Fn(&corepin::tls::CoreTlsCounters) -> u64) -> u64 {
        (0..self.metrics.len()).map(|c| f(self.metrics.core(c))).sum()
    }
    fn failures(&self, reason: FailReason) -> u64 {
        self.sum(|c| c.failures(reason))
    }
}

fn serve<R: Runtime, F: ServiceFactory>(cores: usize, factory: F, certs: Arc<CertStore>, opts: TlsOptions) -> Srv {
    let launch = LaunchConfig {
        cores: CoreSelection::Count(cores),
        drain_timeout: Duration::from_secs(2),
        ..LaunchConfig::default()
    };
    let cpus = launch.plan().unwrap();
    let acceptor = TlsAcceptor::new(certs, opts, cpus.len()).unwrap();
    let metrics = acceptor.metrics().clone();
    let collector = acceptor.collector();
    let app = TcpServer::bind("127.0.0.1:0".parse().unwrap(), cpus.len(), factory).unwrap().with_acceptor(acceptor);
    let addr = app.local_addr();
    let server = Server::start::<R, _>(&launch, &cpus, Arc::new(app))
        .unwrap_or_else(|e| panic!("{} did not launch: {e}", R::NAME));
    Srv { server: Some(server), addr, metrics, collector }
}

fn echo<R: Runtime>(cores: usize, opts: TlsOptions) -> (Srv, Vec<CertificateDer<'static>>) {
    let (certs, made) = CertStore::self_signed(&["localhost", "127.0.0.1"]).unwrap();
    let der = CertificateDer::from_pem_slice(made.cert_pem.as_bytes()).unwrap();
    (serve::<R, _>(cores, corepin_echo::EchoFactory::default(), Arc::new(certs), opts), vec![der])
}

/// Polls `read` until `done` holds (10 s at most) and returns the last reading.
fn settle<T>(mut read: impl FnMut() -> T, done: impl Fn(&T) -> bool) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = read();
        if done(&v) || Instant::now() >= deadline {
            return v;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---- a rustls client ---------------------------------------------------------------------

type Client = StreamOwned<ClientConnection, TcpStream>;

static TLS12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
static TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

fn client_config(
    roots: &[CertificateDer<'static>],
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> Arc<ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for c in roots {
        store.add(c.clone()).unwrap();
    }
    let mut cfg = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// Connects and completes the handshake, or returns its error.
fn try_connect(addr: SocketAddr, cfg: &Arc<ClientConfig>) -> io::Result<Client> {
    let sock = TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    let conn = ClientConnection::new(Arc::clone(cfg), ServerName::try_from("localhost").unwrap()).unwrap();
    let mut s = StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

fn connect(addr: SocketAddr, cfg: &Arc<ClientConfig>) -> Client {
    try_connect(addr, cfg).unwrap_or_else(|e| panic!("TLS handshake with {addr} failed: {e}"))
}

/// Sends `data` and reads its echo at the same time (the echo of a large payload does not fit
/// in the socket buffers, so a client that sent everything first would deadlock).
fn echo_duplex(s: &mut Client, data: &[u8]) -> Vec<u8> {
    s.sock.set_nonblocking(true).unwrap();
    let (conn, sock) = (&mut s.conn, &mut s.sock);
    let mut sent = 0;
    let mut got = Vec::with_capacity(data.len());
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(120);
    let would_block = |e: &io::Error| e.kind() == io::ErrorKind::WouldBlock;
    while got.len() < data.len() {
        assert!(Instant::now() < deadline, "echo stalled at {} of {} bytes", got.len(), data.len());
        let mut progress = false;
        if sent < data.len() {
            let n = conn.writer().write(&data[sent..(sent + 64 * 1024).min(data.len())]).unwrap();
            sent += n;
            progress |= n > 0;
        }
        while conn.wants_write() {
            match conn.write_tls(sock) {
                Ok(n) => progress |= n > 0,
                Err(e) if would_block(&e) => break,
                Err(e) => panic!("write: {e}"),
            }
        }
        match conn.read_tls(sock) {
            Ok(0) => panic!("server closed after {} of {} bytes", got.len(), data.len()),
            Ok(_) => {
                conn.process_new_packets().unwrap();
                progress = true;
            }
            Err(e) if would_block(&e) => {}
            Err(e) => panic!("read: {e}"),
        }
        loop {
            match conn.reader().read(&mut buf) {
                Ok(0) => panic!("clean close after {} of {} bytes", got.len(), data.len()),
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    progress = true;
                }
                Err(e) if would_block(&e) => break,
                Err(e) => panic!("plaintext read: {e}"),
            }
        }
        if !progress {
            thread::sleep(Duration::from_millis(1));
        }
    }
    s.sock.set_nonblocking(false).unwrap();
    got
}

fn sha(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// A short echo on a connected client.
fn ping(s: &mut Client, what: &[u8]) {
    s.write_all(what).unwrap();
    let mut back = vec![0u8; what.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, what);
}

// ---- the tests ---------------------------------------------------------------------------

/// Echoes of 0.. 8 MiB (far beyond the socket buffers, so both directions are full at once)
/// come back byte for byte on TLS 1.3 and TLS 1.2, with the version and suite counted.
pub fn echo_round_trips_beyond_socket_buffers_on_tls12_and_tls13<R: Runtime>() {
    let (srv, roots) = echo::<R>(1, TlsOptions::default());
    for (versions, name, seed) in
        [(TLS13, rustls::ProtocolVersion::TLSv1_3, 1), (TLS12, rustls::ProtocolVersion::TLSv1_2, 2)]
    {
        let cfg = client_config(&roots, versions, &[]);
        let mut c = connect(srv.addr, &cfg);
        assert_eq!(c.conn.protocol_version(), Some(name));
        for len in [1, 100, 16 * 1024, 16 * 1024 + 1, 8 << 20] {
            let data = random(len, seed + len as u64);
            let back = echo_duplex(&mut c, &data);
            assert_eq!(sha(&back), sha(&data), "{name:?}: echo of {len} bytes differs");
        }
    }
    let by_version = settle(
        || {
            (
                srv.sum(|c| c.versions[0].load(std::sync::atomic::Ordering::Relaxed)),
                srv.sum(|c| c.versions[1].load(std::sync::atomic::Ordering::Relaxed)),
            )
        },
        |v| *v == (1, 1),
    );
    assert_eq!(by_version, (1, 1), "one TLS 1.2 and one TLS 1.3 handshake counted");
    srv.stop();
}

/// A service that splits its stream: the write half sends three ticks while the read half is
/// already waiting for the client, then reports what the read half counted, then shuts down.
struct SplitFactory;
struct Split;

impl ServiceFactory for SplitFactory {
    type Service<R: Runtime, S: ConnStream> = Split;
    type Error = std::convert::Infallible;
    fn new_service<R: Runtime, S: ConnStream>(&self, _worker: &Worker) -> Result<Split, Self::Error> {
        Ok(Split)
    }
}

impl<R: Runtime, S: ConnStream> Service<Connection<R, S>> for Split {
    type Response = ();
    type Error = io::Error;
    async fn call(&self, conn: Connection<R, S>) -> io::Result<()> {
        let (mut rd, mut wr) = conn.stream.into_split();
        let total = Rc::new(Cell::new(0u64));
        let done = LocalEvent::new();
        let (t, d) = (total.clone(), done.clone());
        let reader = async move {
            // Smaller than a record, so records are delivered in pieces.
            let mut buf = Vec::with_capacity(7001);
            loop {
                let BufResult(r, b) = rd.read(buf).await;
                buf = b;
                match r {
                    Ok(0) => break,
                    Ok(n) => t.set(t.get() + n as u64),
                    Err(e) => {
                        d.fire();
                        return Err(e);
                    }
                }
            }
            d.fire();
            Ok(())
        };
        let writer = async move {
            for i in 0..3 {
                let BufResult(r, _) = wr.write_all(format!("tick {i}\n").into_bytes()).await;
                r?;
                R::sleep(Duration::from_millis(30)).await;
            }
            done.wait().await;
            let BufResult(r, _) = wr.write_all(format!("got {}\n", total.get()).into_bytes()).await;
            r?;
            wr.shutdown().await
        };
        let (a, b) = corepin::task::join(reader, writer).await;
        a.and(b)
    }
}

/// The split stream: the writer is not held up by a read half waiting on the socket, the
/// reader sees the client's close_notify as end of stream (half close), and the write half's
/// shutdown sends close_notify (the client sees a clean end, not a truncation).
pub fn split_halves_write_while_the_reader_waits_and_close_cleanly<R: Runtime>() {
    let (certs, made) = CertStore::self_signed(&["localhost"]).unwrap();
    let roots = vec![CertificateDer::from_pem_slice(made.cert_pem.as_bytes()).unwrap()];
    let srv = serve::<R, _>(1, SplitFactory, Arc::new(certs), TlsOptions::default());
    let cfg = client_config(&roots, TLS13, &[]);
    let mut c = connect(srv.addr, &cfg);
    // Nothing sent yet: the server's read half is waiting, and the ticks still arrive.
    let mut ticks = vec![0u8; "tick 0\ntick 1\ntick 2\n".len()];
    c.read_exact(&mut ticks).expect("the ticks arrive while the read half waits");
    assert_eq!(ticks, b"tick 0\ntick 1\ntick 2\n");
    let data = random(1 << 20, 7);
    c.write_all(&data).unwrap();
    c.conn.send_close_notify();
    c.flush().unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).expect("a clean end: the server sent close_notify before closing");
    assert_eq!(String::from_utf8_lossy(&rest), format!("got {}\n", data.len()));
    srv.stop();
}

/// ALPN: the server's protocol is chosen when offered; a client offering none still connects;
/// one offering only others is refused and counted as incompatible.
pub fn alpn_is_negotiated_and_refused_without_overlap<R: Runtime>() {
    let opts = TlsOptions { alpn: vec![b"http/1.1".to_vec()], ..TlsOptions::default() };
    let (srv, roots) = echo::<R>(1, opts);
    let c = connect(srv.addr, &client_config(&roots, TLS13, &[b"h2", b"http/1.1"]));
    assert_eq!(c.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    let mut c = connect(srv.addr, &client_config(&roots, TLS12, &[]));
    assert_eq!(c.conn.alpn_protocol(), None);
    ping(&mut c, b"no alpn");
    let refused = try_connect(srv.addr, &client_config(&roots, TLS13, &[b"h2"]));
    assert!(refused.is_err(), "a client offering only h2 must be refused");
    assert_eq!(settle(|| srv.failures(FailReason::Incompatible), |n| *n == 1), 1);
    srv.stop();
}

/// One ticket key for the process: sessions resume on both cores, for TLS 1.3 and TLS 1.2,
/// with rustls and with openssl (`-sess_out` / `-sess_in`, "Reused").
pub fn sessions_resume_across_cores<R: Runtime>() {
    let (srv, roots) = echo::<R>(2, TlsOptions::default());
    for versions in [TLS13, TLS12] {
        let cfg = client_config(&roots, versions, &[]);
        for i in 0..24 {
            let mut c = connect(srv.addr, &cfg);
            ping(&mut c, b"x");
            let kind = c.conn.handshake_kind();
            if i == 0 {
                assert_eq!(kind, Some(rustls::HandshakeKind::Full));
            } else {
                assert_eq!(kind, Some(rustls::HandshakeKind::Resumed), "connection {i} ({versions:?}) not resumed");
            }
        }
    }
    // SO_REUSEPORT spread 46 resumptions over both cores; each core resumed sessions that
    // were (at least some of them) issued on the other.
    let per_core: Vec<u64> = settle(
        || (0..2).map(|c| srv.metrics.core(c).resumed.load(std::sync::atomic::Ordering::Relaxed)).collect(),
        |v: &Vec<u64>| v.iter().sum::<u64>() == 46,
    );
    assert_eq!(per_core.iter().sum::<u64>(), 46);
    assert!(per_core.iter().all(|n| *n > 0), "resumptions on both cores: {per_core:?}");

    let dir = tempfile::tempdir().unwrap();
    for flag in ["-tls1_3", "-tls1_2"] {
        let sess = dir.path().join(format!("sess{flag}"));
        let sess = sess.to_str().unwrap();
        let first = s_client(srv.addr, &[flag, "-sess_out", sess]);
        assert!(first.contains("New, TLSv1."), "{flag}: {first}");
        for _ in 0..4 {
            let again = s_client(srv.addr, &[flag, "-sess_in", sess]);
            assert!(again.contains("Reused, TLSv1."), "{flag}: not reused:\n{again}");
        }
    }
    srv.stop();
}

/// A running `openssl s_client`, its stdout and stderr collected as they come.
struct SClient {
    child: std::process::Child,
    text: Arc<std::sync::Mutex<String>>,
    readers: Vec<thread::JoinHandle<()>>,
}

impl SClient {
    /// Starts `openssl s_client` against `addr` with `args` (and `-ign_eof` if asked: it keeps
    /// the client up when stdin ends, but also turns its command letters off).
    fn spawn(addr: SocketAddr, args: &[&str], ign_eof: bool) -> SClient {
        let mut child = Command::new("openssl")
            .args(["s_client", "-connect", &addr.to_string(), "-servername", "localhost"])
            .args(ign_eof.then_some("-ign_eof"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("openssl is needed for this test: scripts/setup.sh installs it");
        let text = Arc::new(std::sync::Mutex::new(String::new()));
        let readers =
            [Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>, Box::new(child.stderr.take().unwrap())]
                .into_iter()
                .map(|mut r| {
                    let text = Arc::clone(&text);
                    thread::spawn(move || {
                        let mut buf = [0u8; 4096];
                        while let Ok(n) = r.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            text.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
                        }
                    })
                })
                .collect();
        SClient { child, text, readers }
    }

    fn said(&self, what: &str) -> bool {
        self.text.lock().unwrap().contains(what)
    }

    /// Stops the client (if still running) and returns everything it printed.
    fn finish(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        drop(self.child.stdin.take());
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let out = self.text.lock().unwrap().clone();
        out
    }
}

/// Runs `openssl s_client` against `addr` with `args` until it has said how the handshake
/// went ("Cipher is") and `-sess_out`, if given, has been written (5 s at most); returns its
/// stdout and stderr.
fn s_client(addr: SocketAddr, args: &[&str]) -> String {
    let mut client = SClient::spawn(addr, args, true);
    let sess_out = args.iter().position(|a| *a == "-sess_out").map(|i| args[i + 1].to_string());
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && client.child.try_wait().unwrap().is_none() {
        let saved = sess_out.as_ref().is_none_or(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0));
        if client.said("Cipher is") && saved {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    client.finish()
}

/// TLS 1.0 and 1.1 are refused (the server's failure counters move, so the client did send
/// those versions); TLS 1.2 and 1.3 connect.
pub fn old_tls_versions_are_refused<R: Runtime>() {
    let (srv, _roots) = echo::<R>(1, TlsOptions::default());
    for (i, flag) in ["-tls1", "-tls1_1"].into_iter().enumerate() {
        // SECLEVEL=0: OpenSSL 3 would not even offer these versions otherwise.
        let out = s_client(srv.addr, &[flag, "-cipher", "DEFAULT@SECLEVEL=0"]);
        assert!(out.contains("Cipher is (NONE)"), "{flag} must not connect:\n{out}");
        assert!(out.contains("alert"), "{flag}: the server answers with an alert:\n{out}");
        let refused = settle(
            || srv.failures(FailReason::ProtocolVersion) + srv.failures(FailReason::Incompatible),
            |n| *n == i as u64 + 1,
        );
        assert_eq!(refused, i as u64 + 1, "{flag}: the refusal is counted as a version/incompatibility failure");
    }
    for (flag, proto) in [("-tls1_2", "New, TLSv1.2, Cipher is"), ("-tls1_3", "New, TLSv1.3, Cipher is")] {
        let out = s_client(srv.addr, &[flag]);
        assert!(out.contains(proto), "{flag} must connect:\n{out}");
    }
    srv.stop();
}

/// A real ClientHello, for truncation.
fn client_hello(roots: &[CertificateDer<'static>]) -> Vec<u8> {
    let mut conn =
        ClientConnection::new(client_config(roots, TLS13, &[]), ServerName::try_from("localhost").unwrap()).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    hello
}

/// Reads until the server closes; returns how long that took (panics after 20 s).
fn closed_after(mut s: TcpStream) -> Duration {
    let t = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return t.elapsed(),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return t.elapsed(),
            Err(e) => panic!("the server did not close the connection: {e}"),
        }
    }
}

/// Garbage and oversized records are closed at once; a truncated ClientHello and a silent
/// client are closed at the handshake deadline; meanwhile other clients are served.
pub fn bad_and_stalled_handshakes_are_closed_and_others_served<R: Runtime>() {
    let deadline = Duration::from_secs(3);
    let (srv, roots) = echo::<R>(1, TlsOptions { handshake_timeout: deadline, ..TlsOptions::default() });
    let started = Instant::now();
    // Two stalled clients, opened first.
    let silent = TcpStream::connect(srv.addr).unwrap();
    let mut truncated = TcpStream::connect(srv.addr).unwrap();
    let hello = client_hello(&roots);
    truncated.write_all(&hello[..hello.len() / 2]).unwrap();
    // While they stall, a normal client is served.
    let mut good = connect(srv.addr, &client_config(&roots, TLS13, &[]));
    ping(&mut good, b"served while others stall");
    assert!(started.elapsed() < deadline, "the good client had to wait for the stalled ones");
    // Garbage: plain HTTP on the TLS port, and a record header announcing 65535 bytes.
    let mut garbage = TcpStream::connect(srv.addr).unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut oversized = TcpStream::connect(srv.addr).unwrap();
    oversized.write_all(&[0x16, 0x03, 0x03, 0xff, 0xff, 1, 2, 3]).unwrap();
    for (what, s) in [("garbage", garbage), ("oversized record", oversized)] {
        let took = closed_after(s);
        assert!(took < Duration::from_secs(2), "{what} closed after {took:?}, not at once");
    }
    for (what, s) in [("silent client", silent), ("truncated ClientHello", truncated)] {
        let took = closed_after(s);
        let since_start = started.elapsed();
        assert!(
            since_start >= deadline - Duration::from_millis(100) && took < Duration::from_secs(8),
            "{what} closed {since_start:?} after it connected (deadline {deadline:?})"
        );
    }
    ping(&mut good, b"still served");
    let timeouts = settle(|| srv.failures(FailReason::Timeout), |n| *n == 2);
    assert_eq!(timeouts, 2, "two handshakes timed out");
    let bad = settle(|| srv.failures(FailReason::BadMessage), |n| *n == 2);
    assert_eq!(bad, 2, "garbage and the oversized record count as bad messages");
    srv.stop();
}

/// Over the per-core cap, a new connection is closed at once and counted; once the stalled
/// handshakes end, handshakes are accepted again.
pub fn handshakes_over_the_per_core_cap_are_closed<R: Runtime>() {
    let opts =
        TlsOptions { max_handshakes_per_core: 2, handshake_timeout: Duration::from_secs(30), ..TlsOptions::default() };
    let (srv, roots) = echo::<R>(1, opts);
    let cfg = client_config(&roots, TLS13, &[]);
    let stalled: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(srv.addr).unwrap()).collect();
    let in_progress = settle(|| srv.sum(|c| c.in_progress()), |n| *n == 2);
    assert_eq!(in_progress, 2);
    let t = Instant::now();
    assert!(try_connect(srv.addr, &cfg).is_err(), "a third handshake is refused");
    assert!(t.elapsed() < Duration::from_secs(5), "refused at once, not at a deadline");
    assert_eq!(srv.failures(FailReason::OverCap), 1);
    drop(stalled);
    assert_eq!(settle(|| srv.sum(|c| c.in_progress()), |n| *n == 0), 0);
    assert_eq!(settle(|| srv.failures(FailReason::Closed), |n| *n == 2), 2, "the two stalled clients hung up");
    let mut c = connect(srv.addr, &cfg);
    ping(&mut c, b"after the cap");
    // The collector renders the counters.
    let mut registry = corepin::metrics::Registry::default();
    srv.collector.clone().register(&mut registry);
    let text = corepin::metrics::render(&registry);
    for line in [
        "corepin_tls_handshake_failures_all_cores_total{reason=\"over_cap\"} 1",
        "corepin_tls_handshake_failures_all_cores_total{reason=\"closed\"} 2",
        "corepin_tls_handshakes_all_cores_total{kind=\"full\"} 1",
        "corepin_tls_versions_all_cores_total{version=\"TLSv1.3\"} 1",
        "corepin_tls_handshakes_in_progress{core=\"0\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "no line `{line}` in\n{text}");
    }
    srv.stop();
}

/// Reload: new handshakes get the new certificate, an open connection keeps working, and a
/// broken or mismatched file keeps the current certificate (typed error, counted).
pub fn reload_changes_the_certificate_for_new_handshakes_only<R: Runtime>() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let a = certs::self_signed(&["localhost"]).unwrap();
    let b = certs::self_signed(&["localhost"]).unwrap();
    let c = certs::self_signed(&["localhost"]).unwrap();
    std::fs::write(&cert_path, &a.cert_pem).unwrap();
    std::fs::write(&key_path, &a.key_pem).unwrap();
    let store = Arc::new(CertStore::from_pem_files(&cert_path, &key_path).unwrap());
    assert_eq!(store.current().fingerprint.as_ref(), Some(&a.fingerprint));
    let der = |p: &str| CertificateDer::from_pem_slice(p.as_bytes()).unwrap();
    let roots = vec![der(&a.cert_pem), der(&b.cert_pem)];
    let srv = serve::<R, _>(2, corepin_echo::EchoFactory::default(), Arc::clone(&store), TlsOptions::default());
    // No resumption: a resumed session reports the certificate of the session it resumes.
    let mut cfg = (*client_config(&roots, TLS13, &[])).clone();
    cfg.resumption = rustls::client::Resumption::disabled();
    let cfg = Arc::new(cfg);
    let presented = |c: &Client| c.conn.peer_certificates().unwrap()[0].clone();

    let mut old = connect(srv.addr, &cfg);
    assert_eq!(presented(&old), der(&a.cert_pem));
    std::fs::write(&cert_path, &b.cert_pem).unwrap();
    std::fs::write(&key_path, &b.key_pem).unwrap();
    let loaded = store.reload().expect("B loads");
    assert_eq!(loaded.fingerprint.as_ref(), Some(&b.fingerprint));
    for _ in 0..6 {
        // Both cores see it (SO_REUSEPORT spreads these over them).
        let fresh = connect(srv.addr, &cfg);
        assert_eq!(presented(&fresh), der(&b.cert_pem), "a new handshake after reload presents B");
    }
    ping(&mut old, b"the old connection goes on");

    // A broken file, and a certificate with someone else's key: refused, B stays.
    std::fs::write(&cert_path, "-----BEGIN CERTIFICATE-----\nnot base64 at all\n").unwrap();
    let err = store.reload().expect_err("a broken certificate must not load");
    assert!(matches!(err, corepin::tls::CertError::Pem { .. } | corepin::tls::CertError::NoCertificate(_)), "{err}");
    std::fs::write(&cert_path, &c.cert_pem).unwrap(); // key.pem is still B's
    let err = store.reload().expect_err("a key that does not match must not load");
    assert!(matches!(err, corepin::tls::CertError::Key { .. }), "{err}");
    assert_eq!((store.reloads(), store.reload_failures()), (1, 2));
    let fresh = connect(srv.addr, &cfg);
    assert_eq!(presented(&fresh), der(&b.cert_pem), "after failed reloads B is still served");
    srv.stop();
}

/// A TLS 1.2 client that asks to renegotiate (`openssl s_client`'s `R` command) is refused:
/// the connection is closed and counted, and other clients are served meanwhile. The served
/// certificate's expiry is exported.
pub fn renegotiation_is_refused_closed_and_counted<R: Runtime>() {
    let (srv, roots) = echo::<R>(1, TlsOptions::default());
    // Without `-ign_eof`, which would turn the client's command letters off.
    let mut client = SClient::spawn(srv.addr, &["-tls1_2"], false);
    let mut stdin = client.child.stdin.take().unwrap();
    let said = |c: &SClient, what: &str| settle(|| c.said(what), |b| *b);
    assert!(said(&client, "New, TLSv1.2, Cipher is"), "TLS 1.2 connects:\n{}", client.text.lock().unwrap());
    stdin.write_all(b"before\n").unwrap();
    assert!(said(&client, "before\n"), "echoed before the renegotiation:\n{}", client.text.lock().unwrap());
    stdin.write_all(b"R\n").unwrap();
    let refused = settle(|| srv.sum(|c| c.breakages(FailReason::Renegotiation)), |n| *n == 1);
    assert_eq!(refused, 1, "the renegotiation attempt is counted:\n{}", client.text.lock().unwrap());
    // The server closed the connection: s_client exits on its own (stdin is still open).
    let t = Instant::now();
    let exited = loop {
        if let Some(status) = client.child.try_wait().unwrap() {
            break Some(status);
        }
        if t.elapsed() > Duration::from_secs(10) {
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    drop(stdin);
    let out = client.finish();
    assert!(exited.is_some(), "the server must close a connection that asked to renegotiate:\n{out}");
    assert!(out.contains("RENEGOTIATING"), "{out}");
    // Another client, meanwhile and after, is served.
    let mut c = connect(srv.addr, &client_config(&roots, TLS12, &[]));
    ping(&mut c, b"after a refused renegotiation");
    let mut registry = corepin::metrics::Registry::default();
    srv.collector.clone().register(&mut registry);
    let text = corepin::metrics::render(&registry);
    for line in [
        "corepin_tls_connection_failures_all_cores_total{reason=\"renegotiation\"} 1",
        "corepin_tls_handshakes_all_cores_total{kind=\"full\"} 2",
        // rcgen's default notAfter, 4096-01-01T00:00:00Z (`openssl x509 -enddate` of the
        // written PEM says "Jan  1 00:00:00 4096 GMT").
        "corepin_tls_certificate_expiry_seconds 67090118400",
    ] {
        assert!(text.lines().any(|l| l == line), "no line `{line}` in\n{text}");
    }
    srv.stop();
}

/// After the handshake, a record that does not decrypt and a record longer than TLS allows
/// each end their connection (closed, not left hanging) and are counted by reason; another
/// client is served meanwhile.
pub fn bad_records_after_the_handshake_close_the_connection_and_are_counted<R: Runtime>() {
    let (srv, roots) = echo::<R>(1, TlsOptions::default());
    let cfg = client_config(&roots, TLS13, &[]);
    let mut other = connect(srv.addr, &cfg);
    // An application-data record of 32 random bytes: authentication fails.
    let mut forged = vec![0x17, 0x03, 0x03, 0x00, 0x20];
    forged.extend(random(32, 7));
    // A header announcing 0x5000 bytes, beyond the 2^14 + 256 TLS 1.3 allows.
    let oversized = vec![0x17, 0x03, 0x03, 0x50, 0x00];
    for (n, bytes) in [forged, oversized].into_iter().enumerate() {
        let mut c = connect(srv.addr, &cfg);
        ping(&mut c, b"a good record first");
        c.sock.write_all(&bytes).unwrap();
        let took = closed_after(c.sock);
        assert!(took < Duration::from_secs(5), "record {n}: closed at once, took {took:?}");
        let bad = settle(|| srv.sum(|c| c.breakages(FailReason::BadMessage)), |v| *v == n as u64 + 1);
        assert_eq!(bad, n as u64 + 1, "record {n} is counted as a bad message");
        ping(&mut other, b"still served");
    }
    assert_eq!(srv.failures(FailReason::BadMessage), 0, "the handshakes themselves succeeded");
    srv.stop();
}

corepin::per_runtime_tests! {
    renegotiation_is_refused_closed_and_counted,
    bad_records_after_the_handshake_close_the_connection_and_are_counted,
    echo_round_trips_beyond_socket_buffers_on_tls12_and_tls13,
    split_halves_write_while_the_reader_waits_and_close_cleanly,
    alpn_is_negotiated_and_refused_without_overlap,
    sessions_resume_across_cores,
    old_tls_versions_are_refused,
    bad_and_stalled_handshakes_are_closed_and_others_served,
    handshakes_over_the_per_core_cap_are_closed,
    reload_changes_the_certificate_for_new_handshakes_only,
}
