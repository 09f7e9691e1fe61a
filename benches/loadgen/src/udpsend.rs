//! `corepin-loadgen udp`: open-loop UDP datagrams as fast as the kernel takes them, from
//! several pinned threads and many source ports, through `sendmmsg(2)`.
//!
//! Each thread (one per `--cpus` entry, pinned to it) owns every `threads`-th of `--ports`
//! connected UDP sockets (one source port each) and sends `--batch` datagrams of `--size`
//! payload bytes per `sendmmsg` call, going round the sockets one call at a time. After the
//! warm-up it prints `{"window": "start"}` and, at the end of the measured window,
//! one JSON object: datagrams sent inside the window and in all (warm-up included, for
//! the receiver's loss), and the calls that failed. Counting is per call, after the kernel
//! accepted the datagrams; what the kernel drops after that is the receiver's business.

use std::io::Write;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

pub struct Opts {
    pub to: SocketAddr,
    pub from: Option<IpAddr>,
    pub size: usize,
    pub ports: usize,
    pub cpus: Vec<usize>,
    pub batch: usize,
    pub secs: f64,
    pub warmup: f64,
}

#[derive(Serialize)]
struct Report {
    to: SocketAddr,
    size: usize,
    ports: usize,
    cpus: Vec<usize>,
    batch: usize,
    secs: f64,
    warmup_secs: f64,
    /// Datagrams the kernel accepted inside the measured window.
    sent: u64,
    /// Datagrams the kernel accepted from the first call to the last (warm-up included).
    sent_total: u64,
    pps: f64,
    /// Payload bits per second inside the window (without IP and UDP headers).
    payload_gbps: f64,
    /// sendmmsg calls that failed with ENOBUFS or EAGAIN (retried; nothing counted).
    busy: u64,
    /// sendmmsg calls that failed with ECONNREFUSED: an ICMP port unreachable came back,
    /// so for a while nothing listened on the port (retried; nothing counted).
    refused: u64,
}

/// Failed calls, shared by the sender threads.
#[derive(Default)]
struct Failed {
    busy: AtomicU64,
    refused: AtomicU64,
}

/// The largest UDP payload that fits an IPv4 datagram.
const MAX_PAYLOAD: usize = 65_507;

pub fn run(o: Opts) -> Result<i32> {
    if o.size == 0 || o.size > MAX_PAYLOAD {
        bail!("--size must be from 1 to {MAX_PAYLOAD} bytes");
    }
    if o.cpus.is_empty() {
        bail!("--cpus needs at least one CPU");
    }
    if o.ports < o.cpus.len() {
        bail!("--ports ({}) must be at least the number of sender threads ({})", o.ports, o.cpus.len());
    }
    if !(1..=1024).contains(&o.batch) {
        bail!("--batch must be from 1 to 1024");
    }
    if !(o.secs.is_finite() && o.secs > 0.0) {
        bail!("--secs must be a positive number");
    }
    if !(o.warmup.is_finite() && o.warmup >= 0.0) {
        bail!("--warmup must be a non-negative number");
    }
    let from = o.from.unwrap_or(if o.to.is_ipv4() {
        IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED)
    });
    let threads = o.cpus.len();
    let mut owned: Vec<Vec<UdpSocket>> = (0..threads).map(|_| Vec::new()).collect();
    for i in 0..o.ports {
        let s = UdpSocket::bind((from, 0)).with_context(|| format!("binding source socket #{i} on {from}"))?;
        s.connect(o.to).with_context(|| format!("connecting source socket #{i} to {}", o.to))?;
        owned[i % threads].push(s);
    }
    let counts: Arc<Vec<AtomicU64>> = Arc::new((0..threads).map(|_| AtomicU64::new(0)).collect());
    let failed = Arc::new(Failed::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::with_capacity(threads);
    for (t, (socks, &cpu)) in owned.into_iter().zip(&o.cpus).enumerate() {
        let (counts, failed, stop) = (Arc::clone(&counts), Arc::clone(&failed), Arc::clone(&stop));
        let (size, batch) = (o.size, o.batch);
        let h = std::thread::Builder::new()
            .name(format!("udp-send-{t}"))
            .spawn(move || -> Result<()> {
                crate::pin_to_cpu(cpu)?;
                send_loop(&socks, size, batch, &counts[t], &failed, &stop)
            })
            .context("spawning a sender thread")?;
        handles.push(h);
    }
    let sum = || counts.iter().map(|c| c.load(Ordering::Relaxed)).sum::<u64>();
    let stopped = |handles: Vec<std::thread::JoinHandle<Result<()>>>| -> Result<()> {
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("a sender thread panicked"))??;
        }
        Ok(())
    };
    // A thread that failed (e.g. cannot pin) ends the run at once, with its error.
    let until = |deadline: Instant, handles: &[std::thread::JoinHandle<Result<()>>]| {
        while Instant::now() < deadline && !handles.iter().any(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(5).min(deadline.saturating_duration_since(Instant::now())));
        }
    };
    until(Instant::now() + Duration::from_secs_f64(o.warmup), &handles);
    if handles.iter().any(|h| h.is_finished()) {
        stopped(handles)?;
        bail!("a sender thread stopped during the warm-up");
    }
    let (t0, s0) = (Instant::now(), sum());
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{{\"window\": \"start\"}}").context("writing to stdout")?;
        out.flush().context("flushing stdout")?;
    }
    until(t0 + Duration::from_secs_f64(o.secs), &handles);
    let (secs, sent) = (t0.elapsed().as_secs_f64(), sum() - s0);
    stopped(handles)?;
    let report = Report {
        to: o.to,
        size: o.size,
        ports: o.ports,
        cpus: o.cpus,
        batch: o.batch,
        secs,
        warmup_secs: o.warmup,
        sent,
        sent_total: sum(),
        pps: sent as f64 / secs,
        payload_gbps: sent as f64 * o.size as f64 * 8.0 / secs / 1e9,
        busy: failed.busy.load(Ordering::Relaxed),
        refused: failed.refused.load(Ordering::Relaxed),
    };
    let json = serde_json::to_string(&report).context("serializing report")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{json}").context("writing to stdout")?;
    out.flush().context("flushing stdout")?;
    Ok(if report.sent == 0 { 2 } else { 0 })
}

/// Sends batches round the sockets until `stop`; counts what the kernel accepted.
fn send_loop(
    socks: &[UdpSocket],
    size: usize,
    batch: usize,
    count: &AtomicU64,
    failed: &Failed,
    stop: &AtomicBool,
) -> Result<()> {
    let payload: Vec<u8> = (0..size).map(|i| i as u8).collect();
    let mut iov = libc::iovec { iov_base: payload.as_ptr() as *mut libc::c_void, iov_len: size };
    // SAFETY: mmsghdr is plain data; all-zero is a valid value (no name, no control data).
    let mut msgs: Vec<libc::mmsghdr> = (0..batch).map(|_| unsafe { std::mem::zeroed() }).collect();
    for m in &mut msgs {
        // Every message points at the same payload: the kernel copies it per datagram.
        m.msg_hdr.msg_iov = &mut iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let mut next = 0;
    while !stop.load(Ordering::Relaxed) {
        let fd = socks[next].as_raw_fd();
        next = (next + 1) % socks.len();
        // SAFETY: `msgs` holds `batch` initialized headers whose iovec and payload outlive
        // the call; the sockets are connected, so no address is given.
        let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), batch as u32, 0) };
        if n >= 0 {
            count.fetch_add(n as u64, Ordering::Relaxed);
            continue;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOBUFS) | Some(libc::EAGAIN) => {
                failed.busy.fetch_add(1, Ordering::Relaxed);
                std::thread::yield_now();
            }
            Some(libc::ECONNREFUSED) => {
                failed.refused.fetch_add(1, Ordering::Relaxed);
            }
            Some(libc::EINTR) => {}
            _ => return Err(e).context("sendmmsg"),
        }
    }
    Ok(())
}
