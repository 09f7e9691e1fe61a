//! `corepin-peer-h3`: the reference HTTP/3 static file server for `corepin h3`'s benchmark:
//! quinn + h3 on a tokio current-thread runtime, one thread pinned to `--cpu`, the way one
//! would write it with these crates' own runtime.
//!
//! It is kept as close to `corepin h3` as is honest, so that the comparison is about how
//! QUIC is driven, not about what is served: the same quinn, h3 and h3-quinn versions, the
//! same TLS (rustls with the ring provider, TLS 1.3 only, ALPN `h3`, no 0-RTT), the same
//! transport limits (100 concurrent bidirectional streams, 8 unidirectional, 30 s idle
//! timeout), QUIC version 1 only, 4 MiB socket buffers, and a 16 KiB header-section limit.
//! Files up to `--memory-max` bytes (32 KiB, corepin's default) are read once and kept in
//! memory, as corepin's per-core caches do; larger ones are opened per request and sent in
//! `--chunk`-byte DATA frames (64 KiB), each read only once the previous one was taken by the
//! stream's flow control, so a 100 MiB file is never in memory. Reads are plain blocking
//! `pread`s on the runtime's thread: the benchmark's files are in the page cache.
//!
//! GET and HEAD only (405 otherwise); 200 with the fields `corepin h3` sends for the same
//! file (content-type, content-length, last-modified, etag, accept-ranges, date, server), so
//! both encode the same header section; 404 for a missing or non-regular file or a path with `..`. There
//! is no cache invalidation, no range or conditional request: it is a benchmark peer. With
//! `PEER_H3_DEBUG` set in its environment it prints why each connection ended.

mod sys;

/// The allocator `corepin` itself uses, so that the comparison is about how QUIC is driven,
/// not about malloc.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use clap::Parser;
use h3::server::RequestStream;
use http::header::{HeaderMap, HeaderValue};
use http::StatusCode;
use quinn::crypto::rustls::QuicServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// HTTP/3's ALPN id.
const ALPN_H3: &[u8] = b"h3";
/// `H3_NO_ERROR`, for clean closes.
const H3_NO_ERROR: u32 = 0x100;
/// Socket buffers, as `corepin h3` asks for its sockets.
const SOCKET_BUFFER: usize = 4 << 20;
/// The largest request header section accepted, as in `corepin h3`.
const MAX_FIELD_SECTION: u64 = 16 * 1024;
/// How long an answered request may take to send its end before it is told to stop.
const REQUEST_END_WAIT: Duration = Duration::from_secs(1);

/// quinn + h3 HTTP/3 static file server on a tokio current-thread runtime, pinned to one CPU.
#[derive(Debug, Parser)]
#[command(name = "corepin-peer-h3", version)]
struct Args {
    /// Directory to serve.
    root: PathBuf,
    /// UDP address to listen on (port 0 picks a free port; the real one is printed).
    #[arg(long)]
    listen: SocketAddr,
    /// The CPU to pin the serving thread to.
    #[arg(long)]
    cpu: usize,
    /// PEM certificate chain (end entity first); needs --key. Without both, a self-signed
    /// certificate for localhost and 127.0.0.1 is made (see --cert-out).
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// The PEM private key of --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Where to write the self-signed certificate's PEM (for a client's --ca).
    #[arg(long, conflicts_with = "cert")]
    cert_out: Option<PathBuf>,
    /// Files up to this many bytes are read once and kept in memory (0: never).
    #[arg(long, default_value_t = 32 * 1024)]
    memory_max: u64,
    /// Bytes per DATA frame for files sent from disk.
    #[arg(long, default_value_t = 64 * 1024)]
    chunk: usize,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("corepin-peer-h3: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    if args.chunk == 0 {
        bail!("--chunk must be at least 1");
    }
    let root = args.root.canonicalize().with_context(|| format!("cannot serve {}", args.root.display()))?;
    if !root.is_dir() {
        bail!("{} is not a directory", root.display());
    }
    sys::pin_to_cpu(args.cpu)?;
    sys::exit_on_signal()?;
    let (certs, key) = certificate(&args)?;
    let server_config = server_config(certs, key)?;
    let socket = bind(args.listen)?;
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot build tokio's runtime")?;
    let site = Rc::new(Site { root, memory_max: args.memory_max, chunk: args.chunk, cache: RefCell::default() });
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let mut endpoint_config = quinn::EndpointConfig::default();
        endpoint_config.supported_versions(vec![1]);
        let endpoint =
            quinn::Endpoint::new(endpoint_config, Some(server_config), socket, Arc::new(quinn::TokioRuntime))
                .context("cannot start the QUIC endpoint")?;
        sys::announce(endpoint.local_addr())?;
        while let Some(incoming) = endpoint.accept().await {
            let site = Rc::clone(&site);
            tokio::task::spawn_local(async move {
                if let Err(e) = serve_connection(incoming, site).await {
                    if std::env::var_os("PEER_H3_DEBUG").is_some() {
                        eprintln!("corepin-peer-h3: connection ended: {e:#}");
                    }
                }
            });
        }
        anyhow::Ok(())
    })
}

/// The certificate chain and key: from --cert/--key, or self-signed.
fn certificate(args: &Args) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
        let certs = CertificateDer::pem_file_iter(cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| anyhow::anyhow!("cannot read certificates from {}: {e}", cert.display()))?;
        if certs.is_empty() {
            bail!("{} holds no certificate", cert.display());
        }
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| anyhow::anyhow!("cannot read a private key from {}: {e}", key.display()))?;
        return Ok((certs, key));
    }
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .context("cannot make a self-signed certificate")?;
    if let Some(out) = &args.cert_out {
        std::fs::write(out, made.cert.pem()).with_context(|| format!("cannot write {}", out.display()))?;
    }
    let key =
        PrivateKeyDer::try_from(made.key_pair.serialize_der()).map_err(|e| anyhow::anyhow!("self-signed key: {e}"))?;
    Ok((vec![made.cert.der().clone()], key))
}

/// The same QUIC server configuration as `corepin h3`'s `server_config`.
fn server_config(certs: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<quinn::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("certificate and key do not match, or the key type is not supported")?;
    tls.alpn_protocols = vec![ALPN_H3.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(tls).context("TLS configuration for QUIC")?;
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(100));
    transport.max_concurrent_uni_streams(quinn::VarInt::from_u32(8));
    transport.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(30_000))));
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport));
    Ok(server)
}

/// A non-blocking UDP socket with corepin's buffer sizes.
fn bind(addr: SocketAddr) -> Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).context("UDP socket")?;
    // Best effort, as in corepin: the kernel caps them at net.core.{r,w}mem_max.
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    s.bind(&addr.into()).with_context(|| format!("cannot bind UDP {addr}"))?;
    s.set_nonblocking(true).context("non-blocking")?;
    Ok(s.into())
}

/// What is served, and the small files already read.
struct Site {
    root: PathBuf,
    memory_max: u64,
    chunk: usize,
    cache: RefCell<HashMap<String, Rc<Cached>>>,
}

/// A small file kept in memory, with the fields that describe it.
struct Cached {
    body: Bytes,
    content_type: HeaderValue,
    last_modified: HeaderValue,
    etag: HeaderValue,
}

type Stream = RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

async fn serve_connection(incoming: quinn::Incoming, site: Rc<Site>) -> Result<()> {
    let quic = incoming.await.context("handshake")?;
    let mut conn = h3::server::builder()
        .max_field_section_size(MAX_FIELD_SECTION)
        .build::<_, Bytes>(h3_quinn::Connection::new(quic.clone()))
        .await
        .context("HTTP/3 setup")?;
    let result = loop {
        match conn.accept().await {
            Ok(Some(resolver)) => {
                let site = Rc::clone(&site);
                tokio::task::spawn_local(async move { serve_request(resolver, &site).await });
            }
            Ok(None) => break Ok(()),
            Err(e) if e.is_h3_no_error() => break Ok(()),
            Err(e) => break Err(anyhow::Error::new(e).context("HTTP/3 connection")),
        }
    };
    quic.close(quinn::VarInt::from_u32(H3_NO_ERROR), b"");
    result
}

/// Reads the rest of an answered request, so the stream closes cleanly (a stream dropped
/// while open for reading gets STOP_SENDING with code 0, which h3's client reports as an
/// error although the answer is complete).
async fn finish_reading(stream: &mut Stream) {
    let ended = tokio::time::timeout(REQUEST_END_WAIT, async {
        loop {
            match stream.recv_data().await {
                Ok(None) => return true,
                Ok(Some(_)) => continue,
                Err(_) => return false,
            }
        }
    })
    .await;
    if !matches!(ended, Ok(true)) {
        stream.stop_sending(h3::error::Code::H3_NO_ERROR);
    }
}

/// One request's task: its header section, the answer, the end of the request. (A function of
/// its own so that profiles can name the whole request task, as corepin's `serve_request`.)
async fn serve_request(resolver: h3::server::RequestResolver<h3_quinn::Connection, Bytes>, site: &Site) {
    let Ok((req, mut stream)) = resolver.resolve_request().await else { return };
    if answer(site, &req, &mut stream).await.is_ok() {
        finish_reading(&mut stream).await;
    } else {
        stream.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
    }
}

/// Answers one request and finishes its stream.
async fn answer(site: &Site, req: &http::Request<()>, stream: &mut Stream) -> Result<()> {
    let head = req.method() == http::Method::HEAD;
    if req.method() != http::Method::GET && !head {
        return status_only(stream, StatusCode::METHOD_NOT_ALLOWED).await;
    }
    let path = req.uri().path();
    let Some(rel) = relative(path) else {
        return status_only(stream, StatusCode::NOT_FOUND).await;
    };
    let cached = site.cache.borrow().get(rel).cloned();
    if let Some(c) = cached {
        let len = c.body.len() as u64;
        stream.send_response(ok(len, &c.content_type, &c.last_modified, &c.etag)).await?;
        if !head && len > 0 {
            stream.send_data(c.body.clone()).await?;
        }
        stream.finish().await?;
        return Ok(());
    }
    let full = site.root.join(rel);
    let opened = std::fs::File::open(&full).and_then(|f| f.metadata().map(|m| (f, m)));
    let (file, meta) = match opened {
        Ok((f, m)) if m.is_file() => (f, m),
        _ => return status_only(stream, StatusCode::NOT_FOUND).await,
    };
    let len = meta.len();
    let content_type = content_type(&full);
    let last_modified = meta
        .modified()
        .ok()
        .and_then(|t| HeaderValue::from_str(&httpdate::fmt_http_date(t)).ok())
        .unwrap_or_else(|| HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"));
    let etag = etag(&meta);
    if len <= site.memory_max {
        let body = Bytes::from(std::fs::read(&full)?);
        if body.len() as u64 != len {
            bail!("{} changed while being read", full.display());
        }
        let c = Rc::new(Cached { body, content_type, last_modified, etag });
        site.cache.borrow_mut().insert(rel.to_string(), Rc::clone(&c));
        stream.send_response(ok(len, &c.content_type, &c.last_modified, &c.etag)).await?;
        if !head && len > 0 {
            stream.send_data(c.body.clone()).await?;
        }
        stream.finish().await?;
        return Ok(());
    }
    stream.send_response(ok(len, &content_type, &last_modified, &etag)).await?;
    if !head {
        let mut pos = 0u64;
        while pos < len {
            let want = (len - pos).min(site.chunk as u64) as usize;
            let mut buf = BytesMut::zeroed(want);
            let n = file.read_at(&mut buf, pos)?;
            if n == 0 {
                bail!("{} is shorter than announced", full.display());
            }
            buf.truncate(n);
            stream.send_data(buf.freeze()).await?;
            pos += n as u64;
        }
    }
    stream.finish().await?;
    Ok(())
}

/// The path below the root that `path` names, or None for one that could leave it.
fn relative(path: &str) -> Option<&str> {
    let rel = path.strip_prefix('/')?;
    if rel.is_empty() || rel.split('/').any(|seg| seg == ".." || seg == "." || seg.is_empty()) || rel.contains('\\') {
        return None;
    }
    Some(rel)
}

fn content_type(path: &Path) -> HeaderValue {
    let mime = mime_guess::from_path(path).first_or_octet_stream();
    HeaderValue::from_str(mime.as_ref()).unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"))
}

/// The entity tag `corepin h3` gives the same file: `"len-mtime_ns-inode"` in hex.
fn etag(meta: &std::fs::Metadata) -> HeaderValue {
    use std::os::unix::fs::MetadataExt;
    let nanos =
        meta.modified().ok().and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    HeaderValue::from_str(&format!("\"{:x}-{:x}-{:x}\"", meta.len(), nanos, meta.ino()))
        .unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
}

/// A 200 response head.
fn ok(len: u64, content_type: &HeaderValue, last_modified: &HeaderValue, etag: &HeaderValue) -> http::Response<()> {
    let mut fields = HeaderMap::with_capacity(8);
    fields.insert(http::header::CONTENT_TYPE, content_type.clone());
    fields.insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
    fields.insert(http::header::LAST_MODIFIED, last_modified.clone());
    fields.insert(http::header::ETAG, etag.clone());
    fields.insert(http::header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(date) = HeaderValue::from_str(&httpdate::fmt_http_date(SystemTime::now())) {
        fields.insert(http::header::DATE, date);
    }
    fields.insert(http::header::SERVER, HeaderValue::from_static("corepin-peer-h3"));
    let mut resp = http::Response::new(());
    *resp.headers_mut() = fields;
    resp
}

/// A response with no body (404, 405).
async fn status_only(stream: &mut Stream, status: StatusCode) -> Result<()> {
    let mut resp = http::Response::new(());
    *resp.status_mut() = status;
    resp.headers_mut().insert(http::header::CONTENT_LENGTH, HeaderValue::from(0u64));
    resp.headers_mut().insert(http::header::SERVER, HeaderValue::from_static("corepin-peer-h3"));
    stream.send_response(resp).await?;
    stream.finish().await?;
    Ok(())
}
