//! The `corepin` command: runs corepin's reference services on a chosen backend.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use corepin::launcher::LaunchConfig;
use corepin::topology::{CoreSelection, Cpu, Topology};
use corepin::{RingFlags, RuntimeKind, Server, TcpServer};

/// mimalloc: each thread allocates from heaps of its own without locks, which fits one
/// worker per core (glibc's malloc spent about 12% of an HTTP/3 worker's CPU; see
/// docs/http3.md, "Measured").
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "corepin",
    version,
    about = "Thread-per-core network services on io_uring engines (Monoio, Glommio, tokio-uring, compio)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// TCP echo: returns every byte a client sends.
    Echo(EchoArgs),
    /// Static file server: HTTP/1.1 GET/HEAD with keep-alive, ranges and zero-copy bodies.
    Files(FilesArgs),
    /// Static file server over HTTP/3 (QUIC): one endpoint per core, GET/HEAD, ranges,
    /// validators; without --cert/--key a self-signed certificate for localhost.
    H3(H3Args),
    /// UDP ingest: the datagrams for one port taken off an interface (AF_XDP with corepin's
    /// XDP program, or one SO_REUSEPORT socket per core), counted per flow, optionally written
    /// to pcap files.
    Xdp(XdpArgs),
    /// Prints the topology, the chosen cores and each compiled backend's capability report.
    Caps(CommonArgs),
}

/// The first backend compiled into this build, in the facade's table order.
fn default_runtime() -> String {
    RuntimeKind::compiled().first().map_or("monoio", |k| k.name()).to_string()
}

#[derive(Args, Clone)]
struct CommonArgs {
    /// Backend, among those compiled in (`corepin caps` lists them; the names come from the
    /// facade's backend table: monoio, glommio, tokio-uring, compio). The default is the first
    /// compiled one in that order (monoio in a default build).
    #[arg(long, default_value_t = default_runtime())]
    runtime: String,
    /// Cores: `all`, a count (`2`), or a list (`0,2-3`; one CPU: `1-1`).
    #[arg(long, default_value = "all")]
    cores: String,
    /// io_uring setup flags: `best` (SINGLE_ISSUER|DEFER_TASKRUN), `none`, or a list of
    /// single_issuer, defer_taskrun, coop_taskrun, sqpoll[=MS].
    #[arg(long, default_value = "best")]
    ring_flags: String,
    /// Submission queue entries per core.
    #[arg(long, default_value_t = 1024)]
    ring_entries: u32,
    /// Use the backend's epoll driver instead of io_uring (monoio only).
    #[arg(long)]
    epoll: bool,
    /// Seconds open connections may take to finish after SIGINT/SIGTERM.
    #[arg(long, default_value_t = 10.0)]
    drain_timeout: f64,
    /// Zero-downtime upgrade: share the port with a corepin (of the same user) already
    /// listening there, instead of refusing with "address already in use"; then send the old
    /// one SIGTERM so it drains and exits (TCP services).
    #[arg(long)]
    takeover: bool,
    /// Microseconds an idle worker keeps looking for cross-core messages before it sleeps
    /// (0: sleep at once; some µs pay off on cores the server owns, see docs/cross-core.md).
    #[arg(long, default_value_t = 0)]
    inbox_poll_us: u64,
}

#[derive(Args, Clone)]
struct TlsArgs {
    /// Serve TLS (1.3 and 1.2) with a self-signed certificate for localhost, 127.0.0.1 and
    /// ::1; its SPKI fingerprint and the path of its PEM (for `curl --cacert`) are printed.
    #[arg(long)]
    tls: bool,
    /// Serve TLS with this PEM certificate chain (end entity first); needs --tls-key.
    /// SIGHUP reloads both files.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key (PKCS#8, RSA or EC) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Seconds a TLS handshake may take before the connection is closed.
    #[arg(long, default_value_t = 10.0)]
    tls_handshake_timeout: f64,
    /// TLS handshakes in progress per core beyond which new connections are closed.
    #[arg(long, default_value_t = 256)]
    tls_max_handshakes_per_core: usize,
    /// Offer only these cipher suites, comma-separated IANA names in order of preference
    /// (e.g. TLS13_AES_128_GCM_SHA256); default: all of rustls's, in the client's order.
    #[arg(long, value_delimiter = ',')]
    tls_ciphers: Vec<String>,
}

#[derive(Args)]
struct EchoArgs {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    tls: TlsArgs,
    /// Address to listen on (one SO_REUSEPORT listener per core).
    #[arg(long, default_value = "127.0.0.1:7000")]
    listen: String,
    /// Give each connection a read buffer of its own, of this many bytes. Without it, each
    /// read borrows a buffer from the core when data arrives (the engine's provided-buffer ring
    /// where it has one, see the capability report), so an idle connection holds none.
    #[arg(long)]
    buffer_size: Option<usize>,
    /// Serve Prometheus metrics on this address (its own listener and thread).
    #[arg(long)]
    metrics: Option<String>,
}

#[derive(Args)]
struct FilesArgs {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    tls: TlsArgs,
    /// Directory to serve (default: the demo site shipped in the repository).
    root: Option<PathBuf>,
    /// Address to listen on (one SO_REUSEPORT listener per core).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// List directories that have no index.html (otherwise 403).
    #[arg(long)]
    list_dirs: bool,
    /// Follow symlinks that lead outside ROOT (refused by default).
    #[arg(long)]
    follow_symlinks: bool,
    /// Serve Prometheus metrics on this address (its own listener and thread).
    #[arg(long)]
    metrics: Option<String>,
    /// Log every request (tracing target corepin::access, to stderr).
    #[arg(long)]
    access_log: bool,
    /// Open connections per core beyond which new ones are closed at once
    /// (default: the descriptor limit shared out over the cores).
    #[arg(long)]
    max_connections_per_core: Option<usize>,
    /// Seconds a client has from the first byte of a request to the end of its head.
    #[arg(long, default_value_t = 10.0)]
    header_timeout: f64,
    /// Seconds an idle keep-alive connection is kept.
    #[arg(long, default_value_t = 60.0)]
    idle_timeout: f64,
    /// Seconds any single write to a client may take (slow or stalled readers are closed).
    #[arg(long, default_value_t = 30.0)]
    send_timeout: f64,
    /// Files up to this many bytes are served from each core's memory cache (0: never).
    #[arg(long, default_value_t = corepin_files::DEFAULT_MEMORY_MAX)]
    memory_max: u64,
    /// Bytes of small files each core may cache.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    cache_size: u64,
    /// How larger files are sent: `sendfile` (zero-copy) or `read-write` (the fallback).
    #[arg(long, default_value = "sendfile")]
    transfer: String,
    /// Send read + write chunks of at least this many bytes by zero-copy send (SEND_ZC where
    /// the backend has it). Off by default: it costs more CPU than a plain send when clients
    /// are on this host, and pays only behind a real NIC (docs/zero-copy.md).
    #[arg(long)]
    send_zc_min: Option<usize>,
    /// Files each core keeps open with their metadata, so a known file costs no open, fstat
    /// or close (0: off). Changes to a file are seen at once (inotify).
    #[arg(long, default_value_t = corepin_files::DEFAULT_OPEN_FILES)]
    open_file_cache: usize,
    /// Seconds an open-file cache entry is trusted before its path is checked again (bounds
    /// how long a renamed directory or retargeted symlink above a cached file goes unseen).
    #[arg(long, default_value_t = 1.0)]
    open_file_cache_valid: f64,
    /// Also serve HTTP/3 (QUIC) on the same port number over UDP, with the same certificate,
    /// and advertise it with `Alt-Svc: h3=":PORT"` on HTTPS responses (needs --tls or
    /// --tls-cert).
    #[arg(long)]
    h3: bool,
}

#[derive(Args)]
struct XdpArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The interface to take datagrams from.
    #[arg(long)]
    interface: String,
    /// The UDP port to take.
    #[arg(long)]
    port: u16,
    /// RX queues to serve, one per worker in worker order (`0,1` or `0-3`; default: all of
    /// the interface's, up to one per worker).
    #[arg(long)]
    queues: Option<String>,
    /// `xdp` (AF_XDP; fails if it cannot be set up), `socket` (SO_REUSEPORT UDP sockets), or
    /// `auto`: AF_XDP when possible, else sockets, saying why.
    #[arg(long, default_value = "auto")]
    source: String,
    /// XDP attach mode: `auto` (native where the driver has it, else generic), `native` or
    /// `generic`.
    #[arg(long, default_value = "auto")]
    mode: String,
    /// Write each core's datagrams to pcap files in this directory.
    #[arg(long)]
    pcap: Option<PathBuf>,
    /// Start the next pcap file before one passes this many MiB.
    #[arg(long, default_value_t = 100, requires = "pcap")]
    pcap_rotate_mb: u64,
    /// Flows each core keeps counters for; beyond it the least recently seen is evicted.
    #[arg(long, default_value_t = 65_536)]
    flows_per_core: usize,
    /// Serve Prometheus metrics on this address (its own listener and thread).
    #[arg(long)]
    metrics: Option<String>,
}

#[derive(Args)]
struct H3Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Directory to serve (default: the demo site shipped in the repository).
    root: Option<PathBuf>,
    /// UDP address to listen on (one SO_REUSEPORT socket and QUIC endpoint per core).
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: String,
    /// PEM certificate chain (end entity first); needs --key. Without both, a self-signed
    /// certificate for localhost, 127.0.0.1 and ::1 is made and its SPKI fingerprint printed.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// The PEM private key (PKCS#8, RSA or EC) of --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// List directories that have no index.html (otherwise 403).
    #[arg(long)]
    list_dirs: bool,
    /// Follow symlinks that lead outside ROOT (refused by default).
    #[arg(long)]
    follow_symlinks: bool,
    /// Serve Prometheus metrics on this address (its own listener and thread).
    #[arg(long)]
    metrics: Option<String>,
    /// Log every request (tracing target corepin::access, to stderr).
    #[arg(long)]
    access_log: bool,
    /// Seconds a connection may stay silent before it is closed (QUIC idle timeout).
    #[arg(long, default_value_t = 30.0)]
    idle_timeout: f64,
    /// Concurrent request streams per connection.
    #[arg(long, default_value_t = 100)]
    max_streams: u32,
    /// Open connections per core beyond which new handshakes are refused.
    #[arg(long, default_value_t = 10_000)]
    max_connections_per_core: usize,
    /// Files up to this many bytes are served from each core's memory cache (0: never).
    #[arg(long, default_value_t = corepin_files::DEFAULT_MEMORY_MAX)]
    memory_max: u64,
    /// Bytes of small files each core may cache.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    cache_size: u64,
    /// How datagrams reach the core that owns their connection: `bpf` (connection IDs name
    /// their core, a classic BPF program on the port delivers by them, forwarding catches the
    /// rest), `forward` (forwarding between cores only) or `hash` (the kernel's 4-tuple hash
    /// alone: connections break when a client's address changes; for comparison).
    #[arg(long, default_value = "bpf")]
    steering: String,
    /// Accept 0-RTT (early data) from resuming clients: GET and HEAD in it are served, other
    /// methods get 425 Too Early. Off by default.
    #[arg(long = "0rtt")]
    zero_rtt: bool,
    /// Send every new connection attempt a Retry (address validation) before its handshake.
    #[arg(long)]
    retry: bool,
    /// Otherwise, send a Retry to attempts beyond this many per second on a core.
    #[arg(long, default_value_t = corepin_h3::DEFAULT_RETRY_ABOVE)]
    retry_above: u32,
    /// Seconds each server connection ID is used before it is replaced by a new one (which
    /// names the same core); 0 keeps them for the connection's life.
    #[arg(long, default_value_t = corepin_h3::DEFAULT_CID_LIFETIME.as_secs_f64())]
    cid_lifetime: f64,
}

struct Prepared {
    kind: RuntimeKind,
    cfg: LaunchConfig,
    cpus: Vec<Cpu>,
    topology: Topology,
}

fn prepare(c: &CommonArgs) -> Result<Prepared> {
    let kind: RuntimeKind = c.runtime.parse()?;
    let cores: CoreSelection = c.cores.parse()?;
    let ring_flags = RingFlags::parse(&c.ring_flags).map_err(anyhow::Error::msg)?;
    if !(c.drain_timeout.is_finite() && c.drain_timeout >= 0.0) {
        anyhow::bail!("--drain-timeout must be a number of seconds >= 0");
    }
    let topology = Topology::discover();
    let cfg = LaunchConfig {
        cores,
        topology: Some(topology.clone()),
        ring_entries: c.ring_entries,
        ring_flags,
        force_fallback: c.epoll,
        drain_timeout: Duration::from_secs_f64(c.drain_timeout),
        inbox_poll: Duration::from_micros(c.inbox_poll_us),
        ..LaunchConfig::default()
    };
    let cpus = cfg.plan()?;
    Ok(Prepared { kind, cfg, cpus, topology })
}

fn describe_cores(cpus: &[Cpu]) -> String {
    cpus.iter().map(|c| format!("{} (node {})", c.os, c.numa)).collect::<Vec<_>>().join(", ")
}

/// Prints the start-up banner (address, runtime, cores, capability report, then `extra`
/// lines) and flushes it, so a supervisor reading stdout sees it at once. It is written by a
/// thread of its own, and write errors are ignored: stdout may be a closed or full pipe, or
/// /dev/full, and none of that may keep the server from running or from stopping on a signal.
fn print_banner(what: &str, addr: SocketAddr, p: &Prepared, server: &Server, extra: &[String]) {
    use std::fmt::Write as _;
    let mut text = String::new();
    let _ = writeln!(text, "corepin {what} listening on {addr}");
    let _ = writeln!(text, "runtime: {}", p.kind);
    let _ = writeln!(text, "topology: {}", p.topology);
    let _ = writeln!(text, "cores: {}", describe_cores(&p.cpus));
    // Every worker builds the same engine; print the first report and any that differ.
    let caps = server.capabilities();
    if let Some(first) = caps.first() {
        let _ = write!(text, "{first}");
        for (w, c) in server.workers().iter().zip(caps).skip(1) {
            if c != first {
                let _ = write!(text, "worker on core {}: {c}", w.cpu);
            }
        }
    }
    for line in extra {
        let _ = writeln!(text, "{line}");
    }
    let spawned = std::thread::Builder::new().name("corepin-banner".into()).spawn(move || write_out(&text));
    if spawned.is_err() {
        tracing::warn!("could not start the banner thread; the banner is not printed");
    }
}

/// Writes `text` to stdout and flushes, ignoring errors (a closed pipe or a full device is not
/// a reason to panic).
fn write_out(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Writes one line to stderr, ignoring errors.
fn write_err(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

fn run_echo(args: EchoArgs) -> Result<()> {
    // Before anything listens: a SIGTERM during start-up then drains instead of killing.
    let signals = corepin::Signals::install()?;
    let p = prepare(&args.common)?;
    let listen = parse_addr("listen", &args.listen)?;
    let metrics_addr = args.metrics.as_deref().map(|m| parse_addr("metrics", m)).transpose()?;
    if args.buffer_size == Some(0) {
        anyhow::bail!("--buffer-size must be at least 1");
    }
    let factory = corepin_echo::EchoFactory { buffer_size: args.buffer_size };
    let (app, joined) = bind_tcp(listen, p.cpus.len(), factory, args.common.takeover)?;
    let tls = Tls::prepare(&args.tls, Vec::new(), p.cpus.len())?;
    let launch =
        Launch { what: "echo", p: &p, metrics_addr, extra: joined.into_iter().collect(), add: Box::new(|_| {}) };
    match tls {
        None => launch.run(app.local_addr(), app, signals),
        Some(tls) => tls.run(app, signals, launch, |app| app),
    }
}

/// Binds a TCP service's listeners, joining a running server's with `--takeover`; returns
/// the banner line that says what the takeover found.
fn bind_tcp<F: corepin::ServiceFactory>(
    listen: SocketAddr,
    workers: usize,
    factory: F,
    takeover: bool,
) -> Result<(TcpServer<F>, Option<String>)> {
    let sharing = if takeover { corepin::PortSharing::Takeover } else { corepin::PortSharing::Exclusive };
    let (app, joined) = TcpServer::bind_with(listen, workers, factory, sharing)?;
    let line = match (takeover, joined) {
        (false, _) => None,
        (true, corepin::Joined::Alone) => Some(format!("takeover: nothing else listens on {listen}; serving alone")),
        (true, corepin::Joined::Group) => Some(format!(
            "takeover: sharing {listen} with the server already there; send it SIGTERM to finish the upgrade ({})",
            match corepin::tcp::migrate_req_enabled() {
                Some(true) => "net.ipv4.tcp_migrate_req=1: connections still queued there move here",
                Some(false) => {
                    "net.ipv4.tcp_migrate_req=0: connections still in its accept queue when it closes are reset"
                }
                None => "tcp_migrate_req unknown",
            }
        )),
    };
    Ok((app, line))
}

/// Whether binding failed because the address is taken.
fn in_use(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| matches!(c.downcast_ref::<corepin::tcp::ListenError>(), Some(corepin::tcp::ListenError::InUse { .. })))
}

/// Adds a service's collectors to the metrics registry.
type AddMetrics = Box<dyn FnOnce(&mut corepin::metrics::Registry)>;

/// What `run_echo` and `run_files` share once their app is built: start it, serve metrics,
/// print the banner (naming `addr`), wait for signals.
struct Launch<'a> {
    what: &'static str,
    p: &'a Prepared,
    metrics_addr: Option<SocketAddr>,
    /// Banner lines after the capability report.
    extra: Vec<String>,
    /// Adds the service's own collectors to the registry.
    add: Box<dyn FnOnce(&mut corepin::metrics::Registry) + 'a>,
}

impl Launch<'_> {
    fn run<A: corepin::launcher::App>(mut self, addr: SocketAddr, app: A, signals: corepin::Signals) -> Result<()> {
        let server = corepin::start(self.p.kind, &self.p.cfg, &self.p.cpus, Arc::new(app))?;
        let mut registry = corepin::metrics::registry_for(&server);
        (self.add)(&mut registry);
        let metrics = serve_metrics(self.metrics_addr, registry, &mut self.extra)?;
        print_banner(self.what, addr, self.p, &server, &self.extra);
        server.wait_with(signals)?;
        drop(metrics);
        tracing::info!("stopped cleanly");
        Ok(())
    }
}

/// The TLS front of `echo` and `files`: the acceptor, its banner lines, the SIGHUP reload.
#[cfg(feature = "tls")]
struct Tls {
    acceptor: corepin::tls::TlsAcceptor,
    lines: Vec<String>,
    /// The self-signed certificate's PEM file, removed at exit.
    written: Option<PathBuf>,
}

#[cfg(feature = "tls")]
impl Tls {
    /// Builds the acceptor when --tls or --tls-cert asked for TLS.
    fn prepare(args: &TlsArgs, alpn: Vec<Vec<u8>>, cores: usize) -> Result<Option<Tls>> {
        use corepin::tls::{TlsAcceptor, TlsOptions};
        if !args.tls && args.tls_cert.is_none() {
            return Ok(None);
        }
        let options = TlsOptions {
            handshake_timeout: seconds("tls-handshake-timeout", args.tls_handshake_timeout)?,
            max_handshakes_per_core: args.tls_max_handshakes_per_core.max(1),
            alpn,
            cipher_suites: args.tls_ciphers.clone(),
        };
        let (certs, mut lines, written) = load_certificates(args.tls_cert.as_deref(), args.tls_key.as_deref(), |fp| {
            format!("tls: SPKI sha256 {fp} (chromium --ignore-certificate-errors-spki-list={fp})")
        })?;
        if let (Some(path), Some(line)) = (&written, lines.first_mut()) {
            line.push_str(&format!(" (curl --cacert {})", path.display()));
        }
        lines.push("tls: TLS 1.3 and 1.2 (rustls, ring); session tickets shared by every core".into());
        let acceptor = TlsAcceptor::new(certs, options, cores)?;
        Ok(Some(Tls { acceptor, lines, written }))
    }

    /// Runs `app` behind TLS (with what `beside` adds to it, HTTP/3 say): adds the banner
    /// lines and the TLS metrics, and reloads the certificate on SIGHUP.
    fn run<F: corepin::ServiceFactory, X: corepin::launcher::App>(
        self,
        app: TcpServer<F>,
        signals: corepin::Signals,
        mut launch: Launch<'_>,
        beside: impl FnOnce(TcpServer<F, corepin::tls::TlsAcceptor>) -> X,
    ) -> Result<()> {
        let Tls { acceptor, lines, written } = self;
        launch.extra.extend(lines);
        let certs = Arc::clone(acceptor.certs());
        let signals = signals.on_hangup(move || reload_certificate(&certs))?;
        let collector = acceptor.collector();
        let add = launch.add;
        launch.add = Box::new(move |registry| {
            add(registry);
            collector.register(registry);
        });
        let app = app.with_acceptor(acceptor);
        let result = launch.run(app.local_addr(), beside(app), signals);
        if let Some(path) = written {
            let _ = std::fs::remove_file(path);
        }
        result
    }
}

/// A build without the `tls` feature: asking for TLS is an error.
#[cfg(not(feature = "tls"))]
enum Tls {}

#[cfg(not(feature = "tls"))]
impl Tls {
    fn prepare(args: &TlsArgs, _alpn: Vec<Vec<u8>>, _cores: usize) -> Result<Option<Tls>> {
        if args.tls || args.tls_cert.is_some() {
            anyhow::bail!("this build has no TLS; rebuild with `--features tls`");
        }
        Ok(None)
    }
    fn run<F: corepin::ServiceFactory, X>(
        self,
        _app: TcpServer<F>,
        _s: corepin::Signals,
        _l: Launch<'_>,
        _beside: impl FnOnce(TcpServer<F>) -> X,
    ) -> Result<()> {
        match self {}
    }
}

/// The certificate a TLS or QUIC server presents: from `cert` and `key`, or self-signed for
/// localhost (its PEM written to a temporary file, returned for removal at exit). Returns the
/// store, the banner lines (where it came from, `spki_line` of its fingerprint, its expiry) and
/// the PEM written.
#[cfg(feature = "tls")]
fn load_certificates(
    cert: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
    spki_line: impl Fn(&corepin::tls::SpkiFingerprint) -> String,
) -> Result<(Arc<corepin::tls::CertStore>, Vec<String>, Option<std::path::PathBuf>)> {
    use corepin::tls::CertStore;
    let mut lines = Vec::new();
    let mut written = None;
    let certs = match (cert, key) {
        (Some(cert), Some(key)) => {
            let store = CertStore::from_pem_files(cert, key)?;
            lines.push(format!("tls: certificate {} with key {} (SIGHUP reloads them)", cert.display(), key.display()));
            store
        }
        _ => {
            let (store, made) = CertStore::self_signed(&["localhost", "127.0.0.1", "::1"])?;
            let path = std::env::temp_dir().join(format!("corepin-{}-localhost.pem", std::process::id()));
            std::fs::write(&path, &made.cert_pem)
                .with_context(|| format!("cannot write the self-signed certificate to {}", path.display()))?;
            lines.push(format!(
                "tls: self-signed certificate for localhost, 127.0.0.1, ::1 written to {}",
                path.display()
            ));
            written = Some(path);
            store
        }
    };
    if let Some(fp) = &certs.current().fingerprint {
        lines.push(spki_line(fp));
    }
    if let Some(expiry) = &certs.current().expiry {
        lines.push(format!("tls: certificate chain valid until {expiry}"));
    }
    Ok((Arc::new(certs), lines, written))
}

/// SIGHUP: reads the certificate and key again; one line either way.
#[cfg(feature = "tls")]
fn reload_certificate(certs: &corepin::tls::CertStore) {
    match certs.reload() {
        Ok(loaded) => {
            let fp = loaded.fingerprint.as_ref().map_or_else(|| "unknown".to_string(), ToString::to_string);
            let until = loaded.expiry.as_ref().map_or_else(|| "unknown".to_string(), ToString::to_string);
            tracing::info!(
                "SIGHUP: TLS certificate reloaded; new handshakes present SPKI sha256 {fp}, valid until {until}"
            );
        }
        Err(e) => tracing::error!("SIGHUP: TLS certificate NOT reloaded, still serving the previous one: {e}"),
    }
}

/// Starts the metrics endpoint on `addr`, when one was asked for, serving `registry`; adds
/// its banner line to `extra`.
fn serve_metrics(
    addr: Option<SocketAddr>,
    registry: corepin::metrics::Registry,
    extra: &mut Vec<String>,
) -> Result<Option<corepin::metrics::MetricsEndpoint>> {
    let Some(a) = addr else {
        return Ok(None);
    };
    let m = corepin::metrics::MetricsEndpoint::start(a, registry)
        .with_context(|| format!("cannot serve metrics on {a}"))?;
    extra.push(format!("metrics: http://{}/metrics", m.local_addr()));
    Ok(Some(m))
}

/// Parses the socket address given to `--{flag}`.
fn parse_addr(flag: &str, value: &str) -> Result<SocketAddr> {
    value.parse().with_context(|| format!("--{flag} {value:?} is not an address like 127.0.0.1:8080"))
}

fn seconds(name: &str, v: f64) -> Result<Duration> {
    if !(v.is_finite() && v > 0.0 && v < 1e9) {
        anyhow::bail!("--{name} must be a positive number of seconds");
    }
    Ok(Duration::from_secs_f64(v))
}

/// The demo site shipped in the repository.
fn demo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/services/files/demo"))
}

fn nofile_limit() -> u64 {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `r` is a valid out-parameter for getrlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 || r.rlim_cur == libc::RLIM_INFINITY {
        return 1 << 20;
    }
    r.rlim_cur
}

fn run_files(args: FilesArgs) -> Result<()> {
    let signals = corepin::Signals::install()?;
    let p = prepare(&args.common)?;
    let listen = parse_addr("listen", &args.listen)?;
    let metrics_addr = args.metrics.as_deref().map(|m| parse_addr("metrics", m)).transpose()?;
    let large_bodies = match args.transfer.as_str() {
        "sendfile" => corepin_files::LargeBodies::Sendfile,
        "read-write" => corepin_files::LargeBodies::ReadWrite,
        other => anyhow::bail!("--transfer {other:?} is not one of: sendfile, read-write"),
    };
    let root = args.root.clone().unwrap_or_else(demo_root);
    let mut cfg = corepin_files::FilesConfig::new(&root);
    cfg.list_dirs = args.list_dirs;
    cfg.follow_symlinks = args.follow_symlinks;
    cfg.header_timeout = seconds("header-timeout", args.header_timeout)?;
    cfg.idle_timeout = seconds("idle-timeout", args.idle_timeout)?;
    cfg.send_timeout = seconds("send-timeout", args.send_timeout)?;
    cfg.memory_max = args.memory_max;
    cfg.cache_bytes = args.cache_size;
    cfg.large_bodies = large_bodies;
    cfg.send_zc_min = args.send_zc_min;
    cfg.access_log = args.access_log;
    cfg.open_files = args.open_file_cache;
    cfg.open_files_valid = seconds("open-file-cache-valid", args.open_file_cache_valid)?;
    let factory = corepin_files::FilesFactory::new(cfg, p.cpus.len())?;
    let files_metrics = factory.metrics().clone();
    let confinement = factory.root().confinement();
    let served = factory.root().path().to_path_buf();
    let tls = Tls::prepare(&args.tls, vec![b"http/1.1".to_vec()], p.cpus.len())?;
    // HTTP/3 binds first, so that with port 0 TCP takes the port UDP was given. That port can
    // be taken on TCP (by any socket's ephemeral port): then both are bound again, a few times.
    let mut attempt = 0;
    let (Beside { server: h3, lines: h3_lines, add_metrics: h3_metrics, .. }, (app, joined)) = loop {
        let beside = h3_beside(&args, tls.as_ref(), factory.clone(), listen, &p)?;
        match bind_tcp(beside.listen, p.cpus.len(), beside.factory.clone(), args.common.takeover) {
            Ok(bound) => break (beside, bound),
            Err(e) if listen.port() == 0 && beside.server.is_some() && attempt < 8 && in_use(&e) => attempt += 1,
            Err(e) => return Err(e),
        }
    };
    // Keep some descriptors for listeners, rings, files being sent, the open-file caches and
    // the metrics endpoint.
    let cached = (args.open_file_cache * p.cpus.len()) as u64;
    let per_core = args
        .max_connections_per_core
        .unwrap_or_else(|| (nofile_limit().saturating_sub(256 + cached) / 2 / p.cpus.len() as u64).max(1) as usize);
    let app = app.max_connections_per_core(per_core);
    let mut extra = vec![
        format!("root: {} (confined with {:?})", served.display(), confinement),
        format!("max connections per core: {per_core}"),
    ];
    extra.extend(joined);
    if tls.is_some() {
        extra.push(
            "file transfer under TLS: read + write through the engine; sendfile(2) is not used \
             (every byte is encrypted in user space: this kernel has no kernel TLS)"
                .into(),
        );
    }
    extra.extend(h3_lines);
    let add = Box::new(move |registry: &mut corepin::metrics::Registry| {
        corepin_files::metrics::FilesCollector::new(files_metrics).register(registry);
        h3_metrics(registry);
    });
    let launch = Launch { what: "files", p: &p, metrics_addr, extra, add };
    match (tls, h3) {
        (None, _) => launch.run(app.local_addr(), app, signals),
        (Some(tls), None) => tls.run(app, signals, launch, |app| app),
        #[cfg(feature = "h3")]
        (Some(tls), Some(h3)) => tls.run(app, signals, launch, move |app| (app, h3)),
    }
}

/// `files --h3`: binds the HTTP/3 server on `listen` (UDP) with the TLS front's certificate
/// store; the factory HTTPS then uses advertises it with `Alt-Svc`, and the TCP address has
/// the port UDP got when 0 was asked for.
#[cfg(feature = "h3")]
fn h3_beside(
    args: &FilesArgs,
    tls: Option<&Tls>,
    factory: corepin_files::FilesFactory,
    mut listen: SocketAddr,
    p: &Prepared,
) -> Result<Beside> {
    if !args.h3 {
        return Ok(Beside::nothing(factory, listen));
    }
    let Some(tls) = tls else {
        anyhow::bail!(
            "--h3 needs --tls or --tls-cert/--tls-key: HTTP/3 is always encrypted, and browsers find it through HTTPS"
        );
    };
    if args.common.takeover {
        anyhow::bail!("--takeover covers TCP only: it cannot be combined with --h3 (QUIC connections cannot move between processes yet)");
    }
    let cfg = corepin_h3::H3Config {
        idle_timeout: seconds("idle-timeout", args.idle_timeout)?,
        send_timeout: seconds("send-timeout", args.send_timeout)?,
        header_timeout: seconds("header-timeout", args.header_timeout)?,
        drain_timeout: p.cfg.drain_timeout,
        ..corepin_h3::H3Config::default()
    };
    let h3 = corepin_h3::H3Server::bind(listen, p.cpus.len(), factory.clone(), Arc::clone(tls.acceptor.certs()), cfg)?;
    let port = h3.local_addr().port();
    listen.set_port(port);
    let alt_svc = format!("h3=\":{port}\"");
    let mut lines = h3_banner_lines(&h3);
    lines.push(format!("h3: HTTPS responses advertise it with Alt-Svc: {alt_svc}"));
    let quic_metrics = Arc::clone(h3.metrics());
    let add: AddMetrics =
        Box::new(move |registry| corepin_h3::metrics::H3Collector::new(quic_metrics).register(registry));
    Ok(Beside { factory: factory.with_alt_svc(alt_svc), listen, server: Some(h3), lines, add_metrics: add })
}

/// A build without the `h3` feature: `files --h3` says how to get it.
#[cfg(not(feature = "h3"))]
fn h3_beside(
    args: &FilesArgs,
    _tls: Option<&Tls>,
    factory: corepin_files::FilesFactory,
    listen: SocketAddr,
    _p: &Prepared,
) -> Result<Beside> {
    if args.h3 {
        anyhow::bail!("this build has no HTTP/3; rebuild with `--features h3`");
    }
    Ok(Beside::nothing(factory, listen))
}

/// The HTTP/3 server `files --h3` runs beside HTTPS.
#[cfg(feature = "h3")]
type H3App = corepin_h3::H3Server;
/// A build without the `h3` feature has none.
#[cfg(not(feature = "h3"))]
type H3App = std::convert::Infallible;

/// What `files --h3` adds beside HTTPS: the factory HTTPS uses, the TCP address, the HTTP/3
/// server, its banner lines and what adds its metrics.
struct Beside {
    factory: corepin_files::FilesFactory,
    listen: SocketAddr,
    server: Option<H3App>,
    lines: Vec<String>,
    add_metrics: AddMetrics,
}

impl Beside {
    /// No HTTP/3: HTTPS (or HTTP) alone.
    fn nothing(factory: corepin_files::FilesFactory, listen: SocketAddr) -> Self {
        Self { factory, listen, server: None, lines: Vec::new(), add_metrics: Box::new(|_| {}) }
    }
}

/// What the banner says about an HTTP/3 server.
#[cfg(feature = "h3")]
fn h3_banner_lines(app: &corepin_h3::H3Server) -> Vec<String> {
    vec![
        format!(
            "h3: one QUIC endpoint per core on udp {} (quinn-proto driven by one task per core: quinn-udp \
             GSO/GRO/ECN, engine timers and readiness), TLS 1.3 with ALPN h3, one reset key and token key for all cores",
            app.local_addr()
        ),
        format!("h3: UDP offloads: {}", app.offloads()),
        format!("h3: connection steering: {}", app.steering()),
        match app.cid_lifetime() {
            Some(d) => format!("h3: connection IDs are replaced every {} s (--cid-lifetime)", d.as_secs_f64()),
            None => "h3: connection IDs are kept for each connection's life (--cid-lifetime 0)".to_string(),
        },
    ]
}

#[cfg(feature = "h3")]
fn run_h3(args: H3Args) -> Result<()> {
    let signals = corepin::Signals::install()?;
    let p = prepare(&args.common)?;
    let listen = parse_addr("listen", &args.listen)?;
    let metrics_addr = args.metrics.as_deref().map(|m| parse_addr("metrics", m)).transpose()?;
    let root = args.root.clone().unwrap_or_else(demo_root);
    let mut cfg = corepin_files::FilesConfig::new(&root);
    cfg.list_dirs = args.list_dirs;
    cfg.follow_symlinks = args.follow_symlinks;
    cfg.memory_max = args.memory_max;
    cfg.cache_bytes = args.cache_size;
    cfg.access_log = args.access_log;
    let factory = corepin_files::FilesFactory::new(cfg, p.cpus.len())?;
    let files_metrics = factory.metrics().clone();
    let confinement = factory.root().confinement();
    let served = factory.root().path().to_path_buf();

    let port = listen.port();
    let (certs, mut extra, written) = load_certificates(args.cert.as_deref(), args.key.as_deref(), |fp| {
        format!(
            "tls: SPKI sha256 {fp} (chromium --origin-to-force-quic-on=localhost:{port} \
             --ignore-certificate-errors-spki-list={fp})"
        )
    })?;
    let steering = match args.steering.as_str() {
        "bpf" => corepin_h3::Steering::Bpf,
        "forward" => corepin_h3::Steering::Forward,
        "hash" => corepin_h3::Steering::Hash,
        other => anyhow::bail!("--steering {other:?} is not one of: bpf, forward, hash"),
    };
    let retry = if args.retry { corepin_h3::Retry::Always } else { corepin_h3::Retry::AboveRate(args.retry_above) };
    let h3 = corepin_h3::H3Config {
        steering,
        zero_rtt: args.zero_rtt,
        retry,
        cid_lifetime: if args.cid_lifetime == 0.0 { None } else { Some(seconds("cid-lifetime", args.cid_lifetime)?) },
        max_concurrent_streams: args.max_streams.max(1),
        max_connections_per_core: args.max_connections_per_core.max(1),
        idle_timeout: seconds("idle-timeout", args.idle_timeout)?,
        drain_timeout: p.cfg.drain_timeout,
        ..corepin_h3::H3Config::default()
    };
    let app = corepin_h3::H3Server::bind(listen, p.cpus.len(), factory, Arc::clone(&certs), h3)?;
    let addr = app.local_addr();
    extra.insert(0, format!("root: {} (confined with {:?})", served.display(), confinement));
    extra.extend(h3_banner_lines(&app));
    extra.push(if args.zero_rtt {
        "h3: 0-RTT on: GET and HEAD in early data are served, other methods get 425 Too Early; tickets are single use"
            .into()
    } else {
        "h3: 0-RTT off (--0rtt turns it on)".into()
    });
    extra.push(match retry {
        corepin_h3::Retry::Always => "h3: Retry: every new connection proves its address first (--retry)".to_string(),
        corepin_h3::Retry::AboveRate(n) => {
            format!("h3: Retry: for attempts beyond {n} a second on a core (--retry-above; --retry for all)")
        }
    });
    let signals = signals.on_hangup(move || reload_certificate(&certs))?;
    let quic_metrics = Arc::clone(app.metrics());
    let server = corepin::start(p.kind, &p.cfg, &p.cpus, Arc::new(app))?;
    let mut registry = corepin::metrics::registry_for(&server);
    corepin_files::metrics::FilesCollector::new(files_metrics).register(&mut registry);
    corepin_h3::metrics::H3Collector::new(quic_metrics).register(&mut registry);
    let metrics = serve_metrics(metrics_addr, registry, &mut extra)?;
    print_banner("h3", addr, &p, &server, &extra);
    let result = server.wait_with(signals);
    drop(metrics);
    if let Some(path) = written {
        let _ = std::fs::remove_file(path);
    }
    result?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// A build without the `h3` feature: the subcommand says how to get it.
#[cfg(not(feature = "h3"))]
fn run_h3(_args: H3Args) -> Result<()> {
    anyhow::bail!("this build has no HTTP/3; rebuild with `--features h3`")
}

/// Parses `--queues`: comma-separated queue numbers and inclusive ranges (`0,2-3`).
fn parse_queues(list: &str) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || anyhow::anyhow!("--queues {list:?}: {part:?} is not a queue number or a range like 0-3");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    if out.is_empty() {
        anyhow::bail!("--queues {list:?} names no queue");
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(q) = out.iter().find(|q| !seen.insert(**q)) {
        anyhow::bail!("--queues {list:?} names queue {q} twice");
    }
    Ok(out)
}

fn run_xdp(args: XdpArgs) -> Result<()> {
    use corepin_xdp::{AttachMode, IngestConfig, PcapConfig, SourceChoice};
    let signals = corepin::Signals::install()?;
    let p = prepare(&args.common)?;
    let metrics_addr = args.metrics.as_deref().map(|m| parse_addr("metrics", m)).transpose()?;
    let choice = match args.source.as_str() {
        "auto" => SourceChoice::Auto,
        "xdp" => SourceChoice::Xdp,
        "socket" => SourceChoice::Socket,
        other => anyhow::bail!("--source {other:?} is not one of: auto, xdp, socket"),
    };
    let mode = match args.mode.as_str() {
        "auto" => AttachMode::Auto,
        "native" => AttachMode::Native,
        "generic" => AttachMode::Generic,
        other => anyhow::bail!("--mode {other:?} is not one of: auto, native, generic"),
    };
    let queues = args.queues.as_deref().map(parse_queues).transpose()?;
    if args.port == 0 {
        anyhow::bail!("--port must be a UDP port from 1 to 65535");
    }
    let mut cfg = IngestConfig::new(args.port);
    cfg.flow_capacity = args.flows_per_core.max(1);
    if let Some(dir) = &args.pcap {
        if args.pcap_rotate_mb == 0 {
            anyhow::bail!("--pcap-rotate-mb must be at least 1");
        }
        cfg.pcap = Some(PcapConfig { dir: dir.clone(), rotate_bytes: args.pcap_rotate_mb.saturating_mul(1 << 20) });
    }
    let cpus: Vec<usize> = p.cpus.iter().map(|c| c.os).collect();
    let prepared = corepin_xdp::ingest::prepare(&args.interface, &cfg, choice, mode, queues.as_deref(), &cpus)
        .with_context(|| format!("cannot take UDP port {} on {}", args.port, args.interface))?;
    let fallback = prepared.fallback.clone();
    let app = corepin_xdp::Ingest::new(prepared, cfg, cpus.len(), corepin::datagram::Discard)
        .context("cannot prepare the ingest service")?;
    let shared = Arc::clone(app.shared());
    let mut extra = vec![format!("interface: {}", args.interface)];
    extra.extend(shared.describe());
    if let Some(why) = fallback {
        extra.push(format!("AF_XDP not used: {why}"));
    } else if choice == SourceChoice::Socket {
        extra.push("AF_XDP not used: --source socket".into());
    }
    if let Some(dir) = &args.pcap {
        extra.push(format!("pcap: {} (one series per core, rotated at {} MiB)", dir.display(), args.pcap_rotate_mb));
    }
    let server = corepin::start(p.kind, &p.cfg, &p.cpus, Arc::new(app))?;
    let ready = shared.wait_ready(Duration::from_secs(30));
    let lines = match ready {
        Ok(lines) => lines,
        Err(e) => {
            server.shutdown_handle().close();
            let _ = server.wait();
            let _ = shared.detach();
            anyhow::bail!("the ingest service did not start: {e}");
        }
    };
    extra.extend(lines);
    let mut registry = corepin::metrics::registry_for(&server);
    shared.register(&mut registry);
    let metrics = serve_metrics(metrics_addr, registry, &mut extra)?;
    let addr = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, args.port));
    print_banner("xdp", addr, &p, &server, &extra);
    let result = server.wait_with(signals);
    drop(metrics);
    if let Err(e) = shared.detach() {
        tracing::warn!("detaching the XDP program: {e}");
    }
    result?;
    tracing::info!("stopped cleanly");
    Ok(())
}

fn run_caps(c: CommonArgs) -> Result<()> {
    let p = prepare(&c)?;
    write_out(&format!("topology: {}\ncores: {}\n", p.topology, describe_cores(&p.cpus)));
    for kind in RuntimeKind::compiled() {
        let app = Arc::new(corepin::launcher::NoopApp);
        match corepin::start(kind, &p.cfg, &p.cpus[..1], app) {
            Ok(server) => {
                if let Some(c) = server.capabilities().first() {
                    write_out(&c.to_string());
                }
                server.wait()?;
            }
            Err(e) => write_out(&format!("capabilities ({kind}): cannot start: {e}\n")),
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            if e.use_stderr() {
                // One clear line, not a page of usage.
                let text = e.to_string();
                let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
                let first = lines.next().unwrap_or("bad arguments");
                // "the following required arguments were not provided:" names them below.
                let named: Vec<&str> = if first.ends_with(':') {
                    lines.take_while(|l| !l.starts_with("Usage")).collect()
                } else {
                    Vec::new()
                };
                let line = if named.is_empty() { first.to_string() } else { format!("{first} {}", named.join(", ")) };
                write_err(&format!("{line} (see `corepin --help`)"));
                return ExitCode::from(2);
            }
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    // Logs go to stderr through a writer thread of their own (lossy when it falls behind), so a
    // stderr that is a full pipe never blocks a worker or the signal thread, and a failed write
    // is dropped silently rather than reported on the same broken stderr (which would panic).
    let (log_writer, _log_guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .thread_name("corepin-log")
        .finish(std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COREPIN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(log_writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .log_internal_errors(false)
        .init();
    let result = match cli.command {
        Command::Echo(a) => run_echo(a),
        Command::Files(a) => run_files(a),
        Command::H3(a) => run_h3(a),
        Command::Xdp(a) => run_xdp(a),
        Command::Caps(c) => run_caps(c),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            write_err(&format!("error: {e:#}"));
            ExitCode::FAILURE
        }
    }
}
