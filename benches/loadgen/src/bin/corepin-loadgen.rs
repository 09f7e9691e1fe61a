//! corepin-loadgen: load generator for corepin's benchmarks.
//!
//! Subcommands:
//!
//! * `echo`: closed-loop ping-pong against an echo server. Every connection
//!   writes a `size`-byte message, reads back exactly `size` bytes, checks that
//!   they are the bytes it sent, and records the round trip's latency (ns) in an
//!   HDR histogram. Prints one JSON object on stdout at the end.
//! * `hold`: opens N idle connections, prints `{"held": N}` once all are
//!   established, keeps them open until stdin reaches EOF or `--secs` passes.
//! * `h3`: closed-loop HTTP/3 GETs (quinn + h3) against a server on loopback:
//!   N connections with K requests in flight each; requests/s, body bytes/s,
//!   latency, and with `--server-pid` the server's CPU per request and per MB.
//!   Prints one JSON object on stdout at the end.
//! * `udp`: open-loop UDP datagrams from several pinned threads and many source
//!   ports through `sendmmsg`, as fast as the kernel takes them; prints
//!   `{"window": "start"}` after the warm-up and one JSON object at the end.
//!
//! Exit codes: 0 on success; 1 on a setup failure (bad arguments, connect
//! failure, cannot pin, ...); 2 for `echo`, `h3` and `udp` when the run completed
//! but is not clean (errors > 0 or nothing measured) — the JSON is printed anyway.

#[path = "../h3load.rs"]
mod h3load;
#[path = "../udpsend.rs"]
mod udpsend;

use std::cell::{Cell, RefCell};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// How many connects are in flight at once while establishing connections.
const CONNECT_BATCH: usize = 128;
/// How long one connect may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long, after the measurement window ends, connections may take to finish
/// the round trip they are in before they are abandoned (and counted as errors).
const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// File descriptors kept free for stdio, the runtime's epoll/eventfd, etc.
const FD_RESERVE: u64 = 32;
/// Highest latency the histogram can hold (ns): 100 s. Larger values saturate.
const HIST_MAX_NS: u64 = 100_000_000_000;

#[derive(Parser)]
#[command(name = "corepin-loadgen", about = "Load generator for corepin's benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Closed-loop ping-pong against an echo server; prints one JSON object.
    Echo {
        /// Server address, HOST:PORT.
        #[arg(long)]
        addr: String,
        /// Number of connections (each has one message in flight).
        #[arg(long)]
        conns: usize,
        /// Message size in bytes.
        #[arg(long)]
        size: usize,
        /// Measured duration in seconds (after the warm-up).
        #[arg(long)]
        secs: f64,
        /// Warm-up in seconds, excluded from all counts.
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Pin the load generator's (single) thread to this CPU.
        #[arg(long)]
        cpu: Option<usize>,
    },
    /// Open N idle connections and hold them until stdin reaches EOF or --secs passes.
    Hold {
        /// Server address, HOST:PORT.
        #[arg(long)]
        addr: String,
        /// Number of connections to open.
        #[arg(long)]
        conns: usize,
        /// Hold for at most this many seconds (default: until stdin reaches EOF).
        #[arg(long)]
        secs: Option<f64>,
        /// Before holding, send one HTTP/1.1 `GET PATH` (keep-alive) on every connection and
        /// read its whole response, so each is an idle keep-alive connection of a file server.
        #[arg(long)]
        get: Option<String>,
    },
    /// Closed-loop HTTP/3 GETs against a server on loopback; prints one JSON object.
    H3 {
        /// Server address, a loopback IP:PORT (UDP).
        #[arg(long)]
        addr: SocketAddr,
        /// The path to GET (the same for every request).
        #[arg(long)]
        path: String,
        /// Number of QUIC connections.
        #[arg(long, default_value_t = 1)]
        conns: usize,
        /// Requests each connection keeps in flight (1 to 100).
        #[arg(long, default_value_t = 1)]
        inflight: usize,
        /// Measured duration in seconds (after the warm-up).
        #[arg(long)]
        secs: f64,
        /// Warm-up in seconds, excluded from all counts.
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Pin the load generator's (single) thread to this CPU.
        #[arg(long)]
        cpu: Option<usize>,
        /// Trust this PEM certificate (the server's own, or its CA).
        #[arg(long, required_unless_present = "dangerous_skip_verify_loopback")]
        ca: Option<PathBuf>,
        /// Accept any server certificate (loopback benchmarking only; the handshake signature
        /// is still checked against the certificate presented).
        #[arg(long, conflicts_with = "ca")]
        dangerous_skip_verify_loopback: bool,
        /// The name to ask for (SNI) and to verify the certificate against.
        #[arg(long, default_value = "localhost")]
        server_name: String,
        /// The server's process id: its CPU time is read at the window's start and end.
        #[arg(long)]
        server_pid: Option<u32>,
    },
    /// Open-loop UDP datagrams through sendmmsg from pinned threads; prints JSON.
    Udp {
        /// Destination, IP:PORT.
        #[arg(long)]
        to: SocketAddr,
        /// Source address to bind the sockets to (default: the unspecified address).
        #[arg(long)]
        from: Option<IpAddr>,
        /// UDP payload bytes per datagram.
        #[arg(long)]
        size: usize,
        /// Source ports (one connected socket each), spread over the threads.
        #[arg(long, default_value_t = 64)]
        ports: usize,
        /// One sender thread per entry, pinned to that CPU (`0,1,0,1` for two per CPU).
        #[arg(long, value_delimiter = ',', required = true)]
        cpus: Vec<usize>,
        /// Datagrams per sendmmsg call.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Measured duration in seconds (after the warm-up).
        #[arg(long)]
        secs: f64,
        /// Warm-up in seconds: sent, counted in `sent_total` only.
        #[arg(long, default_value_t = 0.5)]
        warmup: f64,
    },
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Echo { addr, conns, size, secs, warmup, cpu } => run_echo(&addr, conns, size, secs, warmup, cpu),
        Cmd::Hold { addr, conns, secs, get } => run_hold(&addr, conns, secs, get).map(|()| 0),
        Cmd::H3 {
            addr,
            path,
            conns,
            inflight,
            secs,
            warmup,
            cpu,
            ca,
            dangerous_skip_verify_loopback,
            server_name,
            server_pid,
        } => h3load::run(h3load::Opts {
            addr,
            path,
            conns,
            inflight,
            secs,
            warmup,
            cpu,
            ca,
            dangerous_skip_verify: dangerous_skip_verify_loopback,
            server_name,
            server_pid,
        }),
        Cmd::Udp { to, from, size, ports, cpus, batch, secs, warmup } => {
            udpsend::run(udpsend::Opts { to, from, size, ports, cpus, batch, secs, warmup })
        }
    };
    match res {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("corepin-loadgen: error: {e:#}");
            std::process::exit(1);
        }
    }
}

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

/// Raises RLIMIT_NOFILE's soft limit to its hard limit; returns (soft, hard) in force after.
fn raise_nofile() -> (u64, u64) {
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            eprintln!("corepin-loadgen: warning: getrlimit(RLIMIT_NOFILE): {}", std::io::Error::last_os_error());
            return (0, 0);
        }
        let hard = lim.rlim_max;
        // RLIM_INFINITY is not accepted for NOFILE's soft limit; cap it.
        let want = if hard == libc::RLIM_INFINITY { 1 << 20 } else { hard };
        if lim.rlim_cur < want {
            let new = libc::rlimit { rlim_cur: want, rlim_max: hard };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &new) == 0 {
                lim.rlim_cur = want;
            } else {
                eprintln!(
                    "corepin-loadgen: warning: could not raise RLIMIT_NOFILE soft limit {} to {}: {}",
                    lim.rlim_cur,
                    want,
                    std::io::Error::last_os_error()
                );
            }
        }
        (lim.rlim_cur as u64, hard as u64)
    }
}

/// Fails early, with a clear message, when `conns` sockets cannot fit under RLIMIT_NOFILE.
fn check_fd_budget(conns: usize) -> Result<()> {
    let (soft, hard) = raise_nofile();
    if soft != 0 && conns as u64 + FD_RESERVE > soft {
        bail!(
            "{conns} connections need about {} file descriptors, but RLIMIT_NOFILE is soft {soft} / hard {hard} \
             (raise the hard limit, e.g. `ulimit -Hn`, or use fewer connections)",
            conns as u64 + FD_RESERVE
        );
    }
    Ok(())
}

fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("cannot resolve address {addr:?} (expected HOST:PORT)"))?
        .next()
        .ok_or_else(|| anyhow!("address {addr:?} resolved to nothing"))
}

fn pin_to_cpu(cpu: usize) -> Result<()> {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
            bail!("--cpu {cpu} is out of range");
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!(
                "sched_setaffinity(cpu {cpu}) failed: {} (is CPU {cpu} online and allowed?)",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

fn single_thread_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build().context("building tokio runtime")
}

fn describe_connect_error(e: &std::io::Error) -> String {
    let hint = match e.raw_os_error() {
        Some(libc::EMFILE) | Some(libc::ENFILE) => " (out of file descriptors: check RLIMIT_NOFILE / fs.file-max)",
        Some(libc::EADDRNOTAVAIL) => {
            " (out of local ports: see net.ipv4.ip_local_port_range, or use several 127.x.y.z addresses)"
        }
        Some(libc::ECONNREFUSED) => " (is the server running and listening on that address?)",
        _ => "",
    };
    format!("{e}{hint}")
}

/// Opens `n` connections to `addr`, at most CONNECT_BATCH in flight at a time.
/// On failure returns how many were established and the first error.
async fn connect_many(
    addr: SocketAddr,
    n: usize,
    nodelay: bool,
) -> std::result::Result<Vec<TcpStream>, (usize, String)> {
    let mut streams: Vec<TcpStream> = Vec::with_capacity(n);
    let mut first_err: Option<String> = None;
    let mut next = 0usize;
    while next < n && first_err.is_none() {
        let batch_end = (next + CONNECT_BATCH).min(n);
        let mut set = JoinSet::new();
        for i in next..batch_end {
            set.spawn(async move {
                let s = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return Err(format!("connection #{i}: {}", describe_connect_error(&e))),
                    Err(_) => {
                        return Err(format!(
                            "connection #{i}: connect timed out after {}s (server's accept backlog full?)",
                            CONNECT_TIMEOUT.as_secs()
                        ))
                    }
                };
                if nodelay {
                    s.set_nodelay(true).map_err(|e| format!("connection #{i}: setting TCP_NODELAY: {e}"))?;
                }
                Ok(s)
            });
        }
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(s)) => streams.push(s),
                Ok(Err(e)) => {
                    if first_err.is_none() {
                        first_err = Some(e);
                    }
                }
                Err(e) => {
                    if first_err.is_none() {
                        first_err = Some(format!("connect task failed: {e}"));
                    }
                }
            }
        }
        next = batch_end;
    }
    match first_err {
        None => Ok(streams),
        Some(e) => Err((streams.len(), e)),
    }
}

// ---------------------------------------------------------------------------
// echo
// ---------------------------------------------------------------------------

#[derive(Serialize)]
struct EchoReport {
    conns: usize,
    size: usize,
    /// Measured duration (s), warm-up excluded.
    secs: f64,
    warmup_secs: f64,
    /// Round trips completed and verified inside the measurement window.
    messages: u64,
    msgs_per_sec: f64,
    /// messages * size / secs: payload bytes echoed per second (one direction).
    bytes_per_sec: f64,
    p50_us: Option<f64>,
    p90_us: Option<f64>,
    p99_us: Option<f64>,
    p999_us: Option<f64>,
    max_us: Option<f64>,
    mean_us: Option<f64>,
    /// Wrong echoes, I/O errors, and connections still stuck after the drain grace.
    errors: u64,
    /// Connections that stopped early because of an error.
    failed_conns: u64,
    cpu: Option<usize>,
    /// [[latency_us, quantile], ...]
    cdf: Vec<(f64, f64)>,
}

struct Shared {
    start: Instant,
    end: Instant,
    hist: RefCell<Histogram<u64>>,
    errors: Cell<u64>,
    failed_conns: Cell<u64>,
    reported: Cell<u32>,
}

impl Shared {
    fn error(&self, msg: impl FnOnce() -> String) {
        self.errors.set(self.errors.get() + 1);
        let r = self.reported.get();
        if r < 10 {
            eprintln!("corepin-loadgen: echo error: {}", msg());
        } else if r == 10 {
            eprintln!("corepin-loadgen: (further error messages suppressed)");
        }
        self.reported.set(r + 1);
    }
}

/// Writes the counter into the first 8 bytes and (when the message has room
/// for both) the last 8 bytes, so a stale or shifted echo is caught.
fn stamp(buf: &mut [u8], counter: u64) {
    let c = counter.to_le_bytes();
    let n = buf.len().min(8);
    buf[..n].copy_from_slice(&c[..n]);
    if buf.len() >= 24 {
        let l = buf.len();
        buf[l - 8..].copy_from_slice(&c);
    }
}

async fn echo_conn(id: usize, mut stream: TcpStream, size: usize, sh: Rc<Shared>) {
    // Bytes 8..16 carry the connection id; the rest a per-connection pattern.
    let mut send: Vec<u8> =
        (0..size).map(|i| (i as u64).wrapping_mul(31).wrapping_add(id as u64 * 7 + 1) as u8).collect();
    if size >= 16 {
        send[8..16].copy_from_slice(&(id as u64).to_le_bytes());
    }
    let mut recv = vec![0u8; size];
    let (mut rd, mut wr) = stream.split();
    let mut counter: u64 = 0;
    loop {
        counter += 1;
        stamp(&mut send, counter.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ id as u64);
        let t0 = Instant::now();
        if t0 >= sh.end {
            break;
        }
        // Write and read concurrently so large messages cannot deadlock on
        // full socket buffers.
        let r = tokio::try_join!(wr.write_all(&send), rd.read_exact(&mut recv));
        let t1 = Instant::now();
        if let Err(e) = r {
            let eof = e.kind() == std::io::ErrorKind::UnexpectedEof;
            sh.error(|| {
                format!(
                    "conn {id}: message {counter}: {}",
                    if eof { "server closed the connection mid-message".to_string() } else { e.to_string() }
                )
            });
            sh.failed_conns.set(sh.failed_conns.get() + 1);
            return;
        }
        if recv != send {
            let off = recv.iter().zip(&send).position(|(a, b)| a != b).unwrap_or(0);
            sh.error(|| {
                format!(
                    "conn {id}: message {counter}: wrong echo ({size} bytes, first difference at byte {off}: got {:#04x}, sent {:#04x})",
                    recv[off], send[off]
                )
            });
            // The stream's framing can no longer be trusted: stop this connection.
            sh.failed_conns.set(sh.failed_conns.get() + 1);
            return;
        }
        if t0 >= sh.start && t1 <= sh.end {
            let ns = t1.duration_since(t0).as_nanos().min(u64::MAX as u128) as u64;
            sh.hist.borrow_mut().saturating_record(ns.max(1));
        }
    }
}

/// Quantiles reported in the CDF: dense in the tail, always including
/// 0, 0.5, 0.9, 0.99, 0.999, 0.9999 and 1.
fn cdf_quantiles() -> Vec<f64> {
    let mut q: Vec<f64> = Vec::new();
    // Divisions (not multiplications) so that e.g. 0.15 prints as 0.15.
    for i in 0..=4 {
        q.push(i as f64 / 100.0); // 0 .. 0.04
    }
    for i in 1..=19 {
        q.push(i as f64 / 20.0); // 0.05 .. 0.95
    }
    for i in 96..=99 {
        q.push(i as f64 / 100.0);
    }
    for i in 991..=999 {
        q.push(i as f64 / 1000.0);
    }
    for i in 9991..=9999 {
        q.push(i as f64 / 10000.0);
    }
    for v in [0.99995, 0.99999, 0.999995, 0.999999, 1.0] {
        q.push(v);
    }
    q.sort_by(|a, b| a.partial_cmp(b).unwrap());
    q.dedup();
    q
}

fn run_echo(addr: &str, conns: usize, size: usize, secs: f64, warmup: f64, cpu: Option<usize>) -> Result<i32> {
    if conns == 0 {
        bail!("--conns must be at least 1");
    }
    if size == 0 {
        bail!("--size must be at least 1");
    }
    if !(secs.is_finite() && secs > 0.0) {
        bail!("--secs must be a positive number");
    }
    if !(warmup.is_finite() && warmup >= 0.0) {
        bail!("--warmup must be a non-negative number");
    }
    check_fd_budget(conns)?;
    let sa = resolve(addr)?;
    if let Some(c) = cpu {
        pin_to_cpu(c)?;
    }
    let rt = single_thread_runtime()?;
    let local = tokio::task::LocalSet::new();
    let report = local.block_on(&rt, async move {
        let streams = connect_many(sa, conns, true).await.map_err(|(got, e)| {
            anyhow!("could not connect all {conns} connections to {sa}: established {got}; first failure: {e}")
        })?;
        let hist = Histogram::<u64>::new_with_bounds(1, HIST_MAX_NS, 3).context("creating histogram")?;
        let start = Instant::now() + Duration::from_secs_f64(warmup);
        let end = start + Duration::from_secs_f64(secs);
        let sh = Rc::new(Shared {
            start,
            end,
            hist: RefCell::new(hist),
            errors: Cell::new(0),
            failed_conns: Cell::new(0),
            reported: Cell::new(0),
        });
        let mut handles = Vec::with_capacity(conns);
        for (id, s) in streams.into_iter().enumerate() {
            handles.push(tokio::task::spawn_local(echo_conn(id, s, size, sh.clone())));
        }
        tokio::time::sleep_until(tokio::time::Instant::from_std(end)).await;
        let drain_deadline = tokio::time::Instant::from_std(end + DRAIN_GRACE);
        let mut stuck = 0u64;
        for h in handles {
            if tokio::time::timeout_at(drain_deadline, h).await.is_err() {
                stuck += 1;
            }
        }
        // Tasks not finished by now are dropped with the LocalSet (their sockets close).
        if stuck > 0 {
            sh.errors.set(sh.errors.get() + stuck);
            sh.failed_conns.set(sh.failed_conns.get() + stuck);
            eprintln!(
                "corepin-loadgen: echo error: {stuck} connection(s) still waiting for their echo {}s after the end of the run",
                DRAIN_GRACE.as_secs()
            );
        }
        let measured = end.duration_since(start).as_secs_f64();
        let h = sh.hist.borrow();
        let n = h.len();
        let us = |ns: u64| ns as f64 / 1000.0;
        let lat = |q: f64| if n > 0 { Some(us(h.value_at_quantile(q))) } else { None };
        let cdf = if n > 0 {
            cdf_quantiles().into_iter().map(|q| (us(h.value_at_quantile(q)), q)).collect()
        } else {
            Vec::new()
        };
        anyhow::Ok(EchoReport {
            conns,
            size,
            secs: measured,
            warmup_secs: warmup,
            messages: n,
            msgs_per_sec: n as f64 / measured,
            bytes_per_sec: n as f64 * size as f64 / measured,
            p50_us: lat(0.5),
            p90_us: lat(0.9),
            p99_us: lat(0.99),
            p999_us: lat(0.999),
            max_us: if n > 0 { Some(us(h.max())) } else { None },
            mean_us: if n > 0 { Some(h.mean() / 1000.0) } else { None },
            errors: sh.errors.get(),
            failed_conns: sh.failed_conns.get(),
            cpu,
            cdf,
        })
    })?;
    drop(local);
    let json = serde_json::to_string(&report).context("serializing report")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{json}").context("writing to stdout")?;
    out.flush().context("flushing stdout")?;
    if report.errors > 0 {
        eprintln!("corepin-loadgen: run had {} error(s); results are not valid", report.errors);
        return Ok(2);
    }
    if report.messages == 0 {
        eprintln!("corepin-loadgen: no round trip completed inside the measurement window");
        return Ok(2);
    }
    Ok(0)
}

// ---------------------------------------------------------------------------
// hold
// ---------------------------------------------------------------------------

/// One keep-alive `GET path` on `s`, reading the whole response (its head and
/// `Content-Length` bytes of body); fails on anything but a 200.
async fn get_once(s: &mut TcpStream, path: &str) -> std::result::Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!("GET {path} HTTP/1.1\r\nHost: loadgen\r\n\r\n");
    s.write_all(req.as_bytes()).await.map_err(|e| format!("sending the GET: {e}"))?;
    let mut got = Vec::with_capacity(8192);
    let mut buf = [0u8; 8192];
    loop {
        let n = s.read(&mut buf).await.map_err(|e| format!("reading the response: {e}"))?;
        if n == 0 {
            return Err("the server closed the connection before the response was complete".into());
        }
        got.extend_from_slice(&buf[..n]);
        let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            return Err(format!("response: {}", head.lines().next().unwrap_or("")));
        }
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or("a response without Content-Length")?;
        if got.len() >= end + 4 + len {
            return Ok(());
        }
    }
}

fn run_hold(addr: &str, conns: usize, secs: Option<f64>, get: Option<String>) -> Result<()> {
    if let Some(s) = secs {
        if !(s.is_finite() && s >= 0.0) {
            bail!("--secs must be a non-negative number");
        }
    }
    check_fd_budget(conns)?;
    let sa = resolve(addr)?;
    let rt = single_thread_runtime()?;
    rt.block_on(async move {
        let t0 = Instant::now();
        let mut streams = connect_many(sa, conns, false)
            .await
            .map_err(|(got, e)| anyhow!("could only open {got} of {conns} connections to {sa}; first failure: {e}"))?;
        if let Some(path) = get {
            // One connection at a time, as a client arriving now and then would: the server
            // never answers many at once, so what it keeps afterwards is what an idle keep-alive
            // connection holds, not the allocator's high-water mark of a burst.
            for s in streams.iter_mut() {
                get_once(s, &path).await.map_err(|e| anyhow!("GET {path} on a held connection: {e}"))?;
            }
        }
        let took = t0.elapsed();
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{{\"held\": {}}}", streams.len()).context("writing to stdout")?;
            out.flush().context("flushing stdout")?;
        }
        eprintln!(
            "corepin-loadgen: holding {} connections to {sa} (opened in {:.2}s)",
            streams.len(),
            took.as_secs_f64()
        );

        // Wait for stdin EOF (in a plain thread: stdin reads block) or --secs.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("stdin-watch".into())
            .spawn(move || {
                let mut stdin = std::io::stdin().lock();
                let mut buf = [0u8; 4096];
                loop {
                    match stdin.read(&mut buf) {
                        Ok(0) => break,
                        Ok(_) => continue,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    }
                }
                let _ = tx.send(());
            })
            .context("spawning stdin watcher")?;
        let why = match secs {
            Some(s) => tokio::select! {
                _ = rx => "stdin reached EOF",
                _ = tokio::time::sleep(Duration::from_secs_f64(s)) => "--secs passed",
            },
            None => {
                let _ = rx.await;
                "stdin reached EOF"
            }
        };

        // Count connections the server closed while we held them.
        let mut peer_closed = 0usize;
        let mut buf = [0u8; 64];
        for s in &streams {
            match s.try_read(&mut buf) {
                Ok(0) => peer_closed += 1,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => peer_closed += 1,
            }
        }
        let n = streams.len();
        drop(streams);
        eprintln!(
            "corepin-loadgen: {why}; closed {n} connections{}",
            if peer_closed > 0 {
                format!(" ({peer_closed} had already been closed by the server)")
            } else {
                String::new()
            }
        );
        anyhow::Ok(())
    })
}
