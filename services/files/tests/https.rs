//! The file server over TLS on every backend (and Monoio's epoll fallback), through the same
//! protocol-independent file logic as clear text: curl (an independent client) fetches files
//! of 0 B to 20 MiB with `--cacert` on TLS 1.3 and TLS 1.2 and compares SHA-256, sees ALPN
//! choose http/1.1 and reuses one connection for several requests; bodies go by read + write
//! (sendfile cannot pass through TLS), in chunks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use corepin::launcher::LaunchConfig;
use corepin::tls::{CertStore, TlsAcceptor, TlsOptions};
use corepin::topology::CoreSelection;
use corepin::{Runtime, Server, TcpServer};
use corepin_files::metrics::{FileMetrics, TransferPath};
use corepin_files::{FilesConfig, FilesFactory};
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

const SIZES: [(&str, usize); 6] = [
    ("empty.bin", 0),
    ("one.bin", 1),
    ("4k.bin", 4096),
    ("40k.bin", 40 * 1024),
    ("1m.bin", 1 << 20),
    ("20m.bin", 20 << 20),
];

struct Site {
    _dir: tempfile::TempDir,
    root: PathBuf,
    files: Vec<(&'static str, Vec<u8>)>,
}

fn site() -> Site {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let files = SIZES
        .iter()
        .map(|&(name, len)| {
            let mut data = vec![0u8; len];
            rng.fill_bytes(&mut data);
            std::fs::write(root.join(name), &data).unwrap();
            (name, data)
        })
        .collect();
    Site { _dir: dir, root, files }
}

fn sha(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}

struct Srv {
    server: Option<Server>,
    port: u16,
    cert_pem: String,
    ca: PathBuf,
    metrics: Arc<FileMetrics>,
    _ca_dir: tempfile::TempDir,
}

fn serve<R: Runtime>(site: &Site) -> Srv {
    let launch = LaunchConfig {
        cores: CoreSelection::Count(2),
        drain_timeout: Duration::from_secs(30),
        ..LaunchConfig::default()
    };
    let cpus = launch.plan().unwrap();
    let factory = FilesFactory::new(FilesConfig::new(&site.root), cpus.len()).unwrap();
    let metrics = factory.metrics().clone();
    let (certs, made) = CertStore::self_signed(&["localhost", "127.0.0.1"]).unwrap();
    let ca_dir = tempfile::tempdir().unwrap();
    let ca = ca_dir.path().join("ca.pem");
    std::fs::write(&ca, &made.cert_pem).unwrap();
    let opts = TlsOptions { alpn: vec![b"http/1.1".to_vec()], ..TlsOptions::default() };
    let acceptor = TlsAcceptor::new(Arc::new(certs), opts, cpus.len()).unwrap();
    let app = TcpServer::bind("127.0.0.1:0".parse().unwrap(), cpus.len(), factory).unwrap().with_acceptor(acceptor);
    let addr: SocketAddr = app.local_addr();
    let server = Server::start::<R, _>(&launch, &cpus, Arc::new(app)).unwrap();
    Srv { server: Some(server), port: addr.port(), cert_pem: made.cert_pem, ca, metrics, _ca_dir: ca_dir }
}

impl Srv {
    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }
    fn curl(&self, args: &[&str]) -> Output {
        Command::new("curl")
            .args(["-sS", "--max-time", "120", "--cacert", self.ca.to_str().unwrap()])
            .args(["--resolve", &format!("localhost:{}:127.0.0.1", self.port)])
            .args(args)
            .output()
            .expect("curl is needed for this test: scripts/setup.sh installs it")
    }
    fn transfers(&self, path: TransferPath) -> u64 {
        let i = TransferPath::ALL.iter().position(|p| *p == path).unwrap();
        (0..self.metrics.len())
            .map(|c| self.metrics.core(c).transfers[i].load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }
    fn stop(mut self) {
        let s = self.server.take().unwrap();
        s.shutdown_handle().close();
        s.wait().expect("the server stops cleanly");
    }
}

/// curl over HTTPS on TLS 1.3 and TLS 1.2: every size byte for byte (SHA-256), a range of
/// the largest, ALPN http/1.1, one connection for several URLs; no body took sendfile.
pub fn curl_fetches_every_size_over_https<R: Runtime>() {
    let site = site();
    let srv = serve::<R>(&site);
    for (flags, version) in [(&["--tlsv1.3"][..], "TLSv1.3"), (&["--tlsv1.2", "--tls-max", "1.2"][..], "TLSv1.2")] {
        for (name, data) in &site.files {
            let out = srv.curl(&[flags, &[srv.url(&format!("/{name}")).as_str()]].concat());
            assert!(out.status.success(), "{version} {name}: {}", String::from_utf8_lossy(&out.stderr));
            assert_eq!(out.stdout.len(), data.len(), "{version} {name}: length");
            assert_eq!(sha(&out.stdout), sha(data), "{version} {name}: body differs");
        }
        let big = &site.files.last().unwrap().1;
        let out = srv.curl(&[flags, &["-r", "1000000-3999999", &srv.url("/20m.bin")]].concat());
        assert_eq!(sha(&out.stdout), sha(&big[1_000_000..4_000_000]), "{version}: range of 20m.bin");
        let out = srv.curl(
            &[flags, &["-v", "-o", "/dev/null", "-o", "/dev/null", &srv.url("/4k.bin"), &srv.url("/1m.bin")]].concat(),
        );
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{log}");
        assert!(log.contains(&format!("SSL connection using {version}")), "{version} not used:\n{log}");
        assert!(log.contains("ALPN: server accepted http/1.1"), "ALPN not seen:\n{log}");
        assert!(log.contains("Re-using existing connection") || log.contains("Reusing existing"), "{log}");
    }
    // TLS must see every byte: nothing went by sendfile, the large bodies went by read + write.
    let read_write = settle(|| srv.transfers(TransferPath::ReadWrite), |n| *n >= 8);
    assert!(read_write >= 8, "1 MiB and 20 MiB (and the range) by read + write, counted {read_write}");
    assert_eq!(srv.transfers(TransferPath::Sendfile), 0, "sendfile bypassed TLS");
    srv.stop();
}

/// An idle keep-alive connection over TLS ends as soon as the server drains (its read is
/// cancelled without loss, through the TLS stream), long before the 30 s drain deadline.
pub fn idle_tls_connections_close_at_once_when_draining<R: Runtime>() {
    use corepin::tls::rustls;
    use std::io::{Read, Write};
    let site = site();
    let mut srv = serve::<R>(&site);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::pem::PemObject::from_pem_slice(srv.cert_pem.as_bytes()).unwrap()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), "localhost".try_into().unwrap()).unwrap();
    let sock = std::net::TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut c = rustls::StreamOwned::new(conn, sock);
    c.write_all(b"GET /one.bin HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n")
        || got.len() < got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 5
    {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "closed before the response");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
    // The connection is idle now, waiting for its next request.
    let server = srv.server.take().unwrap();
    let t = Instant::now();
    server.shutdown_handle().drain();
    server.wait().expect("the server stops cleanly");
    assert!(t.elapsed() < Duration::from_secs(10), "drain waited {:?} for an idle TLS connection", t.elapsed());
}

fn settle<T>(mut read: impl FnMut() -> T, done: impl Fn(&T) -> bool) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = read();
        if done(&v) || Instant::now() >= deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

corepin::per_runtime_tests! {
    curl_fetches_every_size_over_https,
    idle_tls_connections_close_at_once_when_draining,
}
