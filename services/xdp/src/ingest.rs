//! The ingest service: the app every worker runs. It takes the port's datagrams from its
//! source (an AF_XDP socket on the worker's RX queue, or the worker's `SO_REUSEPORT` socket),
//! in batches, waiting on the descriptor through the runtime's fd readiness, and for each
//! datagram counts its flow, writes it to the core's pcap series if asked, and hands it to
//! the user's [`DatagramService`]. Owns the choice of source and the per-core counters; the
//! kernel program and the sockets are their modules' business.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use corepin_core::datagram::{Datagram, DatagramService, DatagramServiceFactory, DatagramSource};
use corepin_core::launcher::{App, AppError};
use corepin_core::metrics::{per_core_counter, Collector, DescriptorEncoder, Registry};
use corepin_core::runtime::{FdWatch, Runtime};
use corepin_core::task::{race, Either};
use corepin_core::worker::{CoreCounters, PerCore, Worker};

use crate::flows::{FlowCollector, FlowCounter, Flows};
use crate::pcap::{LinkType, PcapConfig, PcapWriter};
use crate::program::{AttachMode, Attached, IngestProgram, Verdict, XdpError};
use crate::socket::{Batch, Slot, SocketSteering};
use crate::xsk::{XskError, XskSocket};

/// The largest UDP payload (IPv4: 65,535 less the headers), rounded up.
const MAX_DATAGRAM: usize = 64 * 1024;

/// Which source to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceChoice {
    /// AF_XDP when this process and kernel can, else sockets (saying why).
    Auto,
    /// AF_XDP, or fail.
    Xdp,
    /// Sockets.
    Socket,
}

/// What the service does besides handing datagrams on.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// The UDP port to take.
    pub port: u16,
    /// Flows kept per core before the least recently seen is evicted.
    pub flow_capacity: usize,
    /// Datagrams per batch.
    pub batch: usize,
    /// Write pcap files.
    pub pcap: Option<PcapConfig>,
    /// Receive buffer of each socket (socket source).
    pub socket_buffer: usize,
    /// UMEM frames per AF_XDP socket before the locked-memory limit is applied.
    pub frames: u32,
}

impl IngestConfig {
    /// Defaults for `port`: 65,536 flows per core, batches of 64, no pcap, 4 MiB socket
    /// buffers, 4,096 frames per queue.
    pub fn new(port: u16) -> Self {
        Self {
            port,
            flow_capacity: 65_536,
            batch: 64,
            pcap: None,
            socket_buffer: 4 << 20,
            frames: crate::xsk::DEFAULT_FRAMES,
        }
    }
}

/// The ingest service could not start.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The XDP program could not be loaded or attached.
    #[error(transparent)]
    Program(#[from] XdpError),
    /// An AF_XDP socket could not be made.
    #[error(transparent)]
    Xsk(#[from] XskError),
    /// The sockets of the socket source could not be bound.
    #[error("binding UDP port {port} on {interface}")]
    Bind {
        /// The port.
        port: u16,
        /// The interface.
        interface: String,
        /// The cause.
        source: io::Error,
    },
    /// The RX queues asked for cannot be served.
    #[error("{0}")]
    Queues(String),
    /// A pcap directory that cannot be written.
    #[error("pcap directory {dir}: {source}")]
    Pcap {
        /// The directory.
        dir: String,
        /// The cause.
        source: io::Error,
    },
}

/// Counters of one core, written only by it.
#[derive(Debug, Default)]
pub struct IngestCounters {
    /// Datagrams longer than a receive slot, dropped (socket source).
    pub truncated: AtomicU64,
    /// Redirected frames that held no whole UDP datagram (AF_XDP).
    pub unparsed: AtomicU64,
    /// Frames taken from the RX ring.
    pub frames_received: AtomicU64,
    /// Frames given back to the fill ring.
    pub frames_returned: AtomicU64,
    /// Frame ownership mistakes (a frame handed over or returned twice): always 0.
    pub frame_mistakes: AtomicU64,
    /// The kernel's drops on the core's AF_XDP socket: RX ring full.
    pub xsk_rx_ring_full: AtomicU64,
    /// ... fill ring empty.
    pub xsk_fill_ring_empty: AtomicU64,
    /// ... other drops (a packet larger than a frame).
    pub xsk_rx_dropped: AtomicU64,
    /// Batches handled.
    pub batches: AtomicU64,
    /// Records written to pcap files.
    pub pcap_records: AtomicU64,
}

/// The AF_XDP side: the attached program and which queue each worker serves.
pub struct XdpSetup {
    program: Mutex<Option<IngestProgram>>,
    attached: Attached,
    interface: String,
    /// `queues[i]` is served by worker `i`.
    queues: Vec<u32>,
    frames: u32,
    shrunk: Option<String>,
    replaced: Option<u32>,
}

/// The socket side: one socket per worker, taken by its worker.
pub struct SocketSetup {
    sockets: Mutex<Vec<Option<UdpSocket>>>,
    steering: SocketSteering,
    local: SocketAddr,
}

/// The source the workers take datagrams from.
pub enum Source {
    /// AF_XDP sockets fed by the XDP program.
    Xdp(XdpSetup),
    /// `SO_REUSEPORT` sockets.
    Socket(SocketSetup),
}

/// A chosen source and, for sockets chosen in place of AF_XDP, why.
pub struct Prepared {
    /// The source.
    pub source: Source,
    /// Why AF_XDP was not used (`None` when it is, or when sockets were asked for).
    pub fallback: Option<String>,
}

/// The RX queues of `interface` in the caller's network namespace: the driver's channel count
/// (`ETHTOOL_GCHANNELS`), else sysfs (which shows the namespace sysfs was mounted in), else 1.
pub fn rx_queues(interface: &str) -> u32 {
    if let Some(n) = ethtool_rx_channels(interface) {
        return n.max(1);
    }
    std::fs::read_dir(format!("/sys/class/net/{interface}/queues"))
        .map(|d| d.filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().starts_with("rx-")).count() as u32)
        .unwrap_or(1)
        .max(1)
}

/// `struct ethtool_channels` (linux/ethtool.h).
#[repr(C)]
#[derive(Default)]
struct EthtoolChannels {
    cmd: u32,
    max_rx: u32,
    max_tx: u32,
    max_other: u32,
    max_combined: u32,
    rx_count: u32,
    tx_count: u32,
    other_count: u32,
    combined_count: u32,
}

const ETHTOOL_GCHANNELS: u32 = 0x3c;
const SIOCETHTOOL: libc::c_ulong = 0x8946;

/// RX queues as the driver counts them: its RX-only plus combined channels.
fn ethtool_rx_channels(interface: &str) -> Option<u32> {
    let name = interface.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return None;
    }
    let mut channels = EthtoolChannels { cmd: ETHTOOL_GCHANNELS, ..EthtoolChannels::default() };
    // SAFETY: all-zero is a valid ifreq (bytes and a union of integers and pointers).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&mut channels as *mut EthtoolChannels).cast();
    // SAFETY: a plain datagram socket, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: SIOCETHTOOL reads the name from `req` and writes `channels`, which `req` points
    // at and which lives across the call.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut req) };
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
    (rc == 0).then_some(channels.rx_count + channels.combined_count)
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Prepares the source for `workers` workers: attaches the program (AF_XDP) or binds the
/// sockets. `queues` lists the RX queues to serve (default: all of the interface's, up to
/// one per worker); `cpus[i]` is worker `i`'s CPU (for socket steering). Call it in the
/// network namespace of `interface`; the workers must be started from there too.
pub fn prepare(
    interface: &str,
    cfg: &IngestConfig,
    choice: SourceChoice,
    mode: AttachMode,
    queues: Option<&[u32]>,
    cpus: &[usize],
) -> Result<Prepared, IngestError> {
    let workers = cpus.len();
    let xdp = |queues: Option<&[u32]>| -> Result<Source, IngestError> {
        let available = rx_queues(interface);
        let queues: Vec<u32> = match queues {
            Some(q) => q.to_vec(),
            None => (0..available.min(workers as u32)).collect(),
        };
        if queues.is_empty() {
            return Err(IngestError::Queues("no RX queue to serve".into()));
        }
        if queues.len() > workers {
            return Err(IngestError::Queues(format!(
                "{} RX queues asked for but {workers} worker(s): one queue per worker (give --cores at least {})",
                queues.len(),
                queues.len()
            )));
        }
        if let Some(q) = queues.iter().find(|&&q| q >= available) {
            return Err(IngestError::Queues(format!(
                "RX queue {q} is out of range: {interface} has {available} (ethtool -l {interface})"
            )));
        }
        crate::xsk::ifindex(interface)?;
        let (frames, shrunk) = crate::xsk::frames_for(queues.len(), cfg.frames);
        let program = IngestProgram::attach_with(interface, cfg.port, crate::xsk::MAX_PACKET as u32, mode)?;
        Ok(Source::Xdp(XdpSetup {
            replaced: program.replaced(),
            attached: program.attached(),
            program: Mutex::new(Some(program)),
            interface: interface.to_string(),
            queues,
            frames,
            shrunk,
        }))
    };
    match choice {
        SourceChoice::Xdp => Ok(Prepared { source: xdp(queues)?, fallback: None }),
        SourceChoice::Socket => Ok(Prepared { source: bind_sockets(interface, cfg, cpus)?, fallback: None }),
        SourceChoice::Auto => {
            let why = if euid() != 0 {
                Some(format!("not root (euid {}): AF_XDP and XDP programs need CAP_NET_RAW and CAP_BPF", euid()))
            } else if let Err(e) = crate::xsk::probe() {
                Some(format!("the kernel refuses AF_XDP sockets: {e}"))
            } else {
                match xdp(queues) {
                    Ok(source) => return Ok(Prepared { source, fallback: None }),
                    Err(e @ IngestError::Queues(_)) => return Err(e),
                    Err(e) => Some(format!("AF_XDP could not be set up: {e}")),
                }
            };
            Ok(Prepared { source: bind_sockets(interface, cfg, cpus)?, fallback: why })
        }
    }
}

/// One dual-stack socket per worker on the port, bound to `interface`.
fn bind_sockets(interface: &str, cfg: &IngestConfig, cpus: &[usize]) -> Result<Source, IngestError> {
    let err = |source| IngestError::Bind { port: cfg.port, interface: interface.to_string(), source };
    let any6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), cfg.port);
    let (sockets, steering) = crate::socket::bind_group(any6, Some(interface), cpus, Some(cfg.socket_buffer))
        .or_else(|e| {
            // No IPv6 on this host: IPv4 only. Any other failure (a port in use above all)
            // stands: an IPv4 socket beside another process's dual-stack one would share its
            // datagrams.
            if !matches!(e.raw_os_error(), Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)) {
                return Err(e);
            }
            let any4 = SocketAddr::from(([0, 0, 0, 0], cfg.port));
            crate::socket::bind_group(any4, Some(interface), cpus, Some(cfg.socket_buffer))
        })
        .map_err(err)?;
    let local = sockets[0].local_addr().map_err(err)?;
    Ok(Source::Socket(SocketSetup { sockets: Mutex::new(sockets.into_iter().map(Some).collect()), steering, local }))
}

/// What each worker reported once its source was ready (for the banner and for tests).
#[derive(Default)]
struct Ready {
    lines: Mutex<Vec<Option<Result<String, String>>>>,
    changed: Condvar,
}

/// What the workers and the outside (metrics, banner, tests) share.
pub struct Shared {
    /// Per-flow counters.
    pub flows: Arc<Flows>,
    /// Per-core counters.
    pub counters: Arc<PerCore<IngestCounters>>,
    ready: Ready,
    source: Source,
    cfg: IngestConfig,
    workers: usize,
}

impl Shared {
    /// Waits until every worker has its source ready (or failed); returns one line per
    /// worker, or the first failure.
    pub fn wait_ready(&self, timeout: Duration) -> Result<Vec<String>, String> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.ready.lines.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(Some(Err(e))) = lines.iter().find(|l| matches!(l, Some(Err(_)))) {
                return Err(e.clone());
            }
            if lines.iter().all(Option::is_some) {
                return Ok(lines.iter().flatten().filter_map(|l| l.as_ref().ok().cloned()).collect());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("the workers did not get their sources ready in time".into());
            }
            lines = self.ready.changed.wait_timeout(lines, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    fn report(&self, index: usize, line: Result<String, String>) {
        let mut lines = self.ready.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines[index] = Some(line);
        self.ready.changed.notify_all();
    }

    /// The source in use.
    pub fn source_kind(&self) -> DatagramSource {
        match self.source {
            Source::Xdp(_) => DatagramSource::AfXdp,
            Source::Socket(_) => DatagramSource::Socket,
        }
    }

    /// How the XDP program is attached (AF_XDP source).
    pub fn attached(&self) -> Option<Attached> {
        match &self.source {
            Source::Xdp(x) => Some(x.attached),
            Source::Socket(_) => None,
        }
    }

    /// The program's counters per served queue, in queue order of `--queues` (AF_XDP source).
    pub fn verdicts(&self) -> Option<Vec<(u32, crate::program::QueueCounters)>> {
        let Source::Xdp(x) = &self.source else { return None };
        let program = x.program.lock().unwrap_or_else(|p| p.into_inner());
        let max = x.queues.iter().max().copied().unwrap_or(0) + 1;
        let all = program.as_ref()?.counters(max).ok()?;
        Some(x.queues.iter().map(|&q| (q, all[q as usize])).collect())
    }

    /// Detaches the XDP program now (it is also detached when the last handle drops).
    pub fn detach(&self) -> Result<(), XdpError> {
        if let Source::Xdp(x) = &self.source {
            if let Some(p) = x.program.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return p.detach();
            }
        }
        Ok(())
    }

    /// Banner lines: the source, its mode, and anything shrunk.
    pub fn describe(&self) -> Vec<String> {
        match &self.source {
            Source::Xdp(x) => {
                let mut v = vec![format!(
                    "source: AF_XDP on {} RX queue(s) {:?}, XDP program attached in {} mode (bpf_link), port {}",
                    x.interface, x.queues, x.attached, self.cfg.port
                )];
                if let Some(id) = x.replaced {
                    v.push(format!(
                        "replaced XDP program id {id} that an earlier run left on {} (attached through netlink)",
                        x.interface
                    ));
                }
                if let Some(s) = &x.shrunk {
                    v.push(s.clone());
                } else {
                    v.push(format!("UMEM: {} frames of {} B per queue", x.frames, crate::xsk::FRAME_SIZE));
                }
                v
            }
            Source::Socket(s) => vec![
                format!("source: UDP sockets on {} (one SO_REUSEPORT socket per worker, recvmmsg batches)", s.local),
                format!("steering: {}", s.steering),
            ],
        }
    }

    /// Registers the flow, per-core and (AF_XDP) program counters with `registry`.
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        registry.register_collector(Box::new(FlowCollector::new(Arc::clone(&self.flows))));
        registry.register_collector(Box::new(IngestCollector { shared: Arc::clone(self) }));
    }
}

/// The ingest app: build it with [`Ingest::new`], start it with the launcher (from the
/// interface's network namespace), then wait for [`Shared::wait_ready`].
pub struct Ingest<F> {
    factory: F,
    shared: Arc<Shared>,
}

impl<F: DatagramServiceFactory> Ingest<F> {
    /// The app for `workers` workers over `prepared`, handing datagrams to `factory`'s services.
    pub fn new(prepared: Prepared, cfg: IngestConfig, workers: usize, factory: F) -> Result<Self, IngestError> {
        if let Some(p) = &cfg.pcap {
            std::fs::create_dir_all(&p.dir)
                .map_err(|source| IngestError::Pcap { dir: p.dir.display().to_string(), source })?;
        }
        let shared = Arc::new(Shared {
            flows: Flows::new(workers, cfg.flow_capacity),
            counters: PerCore::new(workers),
            ready: Ready { lines: Mutex::new(vec![None; workers]), changed: Condvar::new() },
            source: prepared.source,
            cfg,
            workers,
        });
        Ok(Self { factory, shared })
    }

    /// What the workers share with the outside.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

/// The per-core services a datagram goes through, and the capture.
struct CoreServices<S> {
    flows: FlowCounter,
    user: S,
    pcap: Option<PcapWriter>,
}

impl<F: DatagramServiceFactory> App for Ingest<F> {
    async fn run<R: Runtime>(&self, worker: Worker) -> Result<(), AppError> {
        let index = worker.info().index;
        let shared = &self.shared;
        let result = async {
            let link = match shared.source {
                Source::Xdp(_) => LinkType::Ethernet,
                Source::Socket(_) => LinkType::RawIp,
            };
            let pcap = match &shared.cfg.pcap {
                Some(p) => Some(
                    PcapWriter::new(p.clone(), index, link).map_err(|e| format!("pcap in {}: {e}", p.dir.display()))?,
                ),
                None => None,
            };
            let user = self.factory.new_service::<R>(&worker).map_err(|e| format!("the datagram service: {e}"))?;
            let services = CoreServices { flows: FlowCounter::new(Arc::clone(&shared.flows), index), user, pcap };
            Ok::<_, String>(services)
        }
        .await;
        let services = match result {
            Ok(s) => s,
            Err(e) => {
                shared.report(index, Err(e.clone()));
                return Err(AppError(e));
            }
        };
        match &shared.source {
            Source::Socket(s) => run_socket::<R, _>(shared, s, &worker, services).await,
            Source::Xdp(x) => run_xsk::<R, _>(shared, x, &worker, services).await,
        }
        .map_err(|e| {
            shared.report(index, Err(e.clone()));
            AppError(e)
        })
    }
}

/// Waits for `watch` to be readable, or for draining (`false`).
async fn readable_or_drain<W: FdWatch>(watch: &W, worker: &Worker) -> Result<bool, String> {
    match race(watch.readable(), worker.draining()).await {
        Either::Left(Ok(())) => Ok(true),
        Either::Left(Err(e)) => Err(format!("waiting for readiness: {e}")),
        Either::Right(()) => Ok(false),
    }
}

fn finish<S: DatagramService>(s: &mut CoreServices<S>) {
    s.flows.on_stop();
    s.user.on_stop();
    if let Some(p) = s.pcap.as_mut() {
        p.flush();
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

async fn run_socket<R: Runtime, S: DatagramService>(
    shared: &Shared,
    setup: &SocketSetup,
    worker: &Worker,
    mut services: CoreServices<S>,
) -> Result<(), String> {
    let index = worker.info().index;
    let socket = setup
        .sockets
        .lock()
        .map_err(|_| "socket table poisoned".to_string())?
        .get_mut(index)
        .and_then(Option::take)
        .ok_or_else(|| format!("no UDP socket prepared for worker {index}"))?;
    let watch = R::FdWatch::new(socket.as_raw_fd()).map_err(|e| format!("watching the UDP socket: {e}"))?;
    let counters = shared.counters.core(index);
    // Slots take the largest UDP datagram, so none is truncated; the pages of a slot are only
    // committed once a datagram that long has used them.
    let mut batch = Batch::new(shared.cfg.batch, MAX_DATAGRAM);
    shared.report(index, Ok(format!("worker {index} (cpu {}): UDP socket on {}", worker.info().cpu, setup.local)));
    loop {
        let n = batch.recv(socket.as_raw_fd()).map_err(|e| format!("recvmmsg: {e}"))?;
        if n == 0 {
            if !readable_or_drain(&watch, worker).await? {
                break;
            }
            continue;
        }
        let now = SystemTime::now();
        for i in 0..n {
            let (slot, bytes) = batch.get(i);
            let meta = match slot {
                Slot::Whole(m) => m,
                Slot::Truncated(_) => {
                    CoreCounters::add(&counters.truncated, 1);
                    continue;
                }
            };
            let to = SocketAddr::new(meta.dst_ip.unwrap_or(setup.local.ip()), setup.local.port());
            let d = Datagram {
                payload: bytes,
                from: canonical(meta.from),
                to: canonical(to),
                core: index,
                queue: None,
                received: now,
                source: DatagramSource::Socket,
            };
            services.flows.on_datagram(&d);
            if let Some(p) = services.pcap.as_mut() {
                p.write_datagram(&d);
            }
            services.user.on_datagram(&d);
        }
        end_batch(&mut services, counters);
        let full = n == shared.cfg.batch;
        if !between_batches(worker, full).await {
            break;
        }
        // A batch that was not full found the queue empty (`recvmmsg` stops at the first
        // `EAGAIN`): wait for the next datagram rather than make the receive that would fail.
        // The wait is level-triggered, so what arrived meanwhile completes it at once.
        if !full && !readable_or_drain(&watch, worker).await? {
            break;
        }
    }
    finish(&mut services);
    Ok(())
}

/// After a batch: when it was full (more are likely waiting: under a constant flood the
/// source would never wait for its descriptor) lets the core's other tasks run first, so the
/// source cannot keep the core to itself; and says whether to go on (not once the worker
/// drains: a flood must not hold up a stop). A batch that was not full ends in the wait for
/// the descriptor anyway, which yields.
async fn between_batches(worker: &Worker, full: bool) -> bool {
    if full {
        corepin_core::task::yield_now().await;
    }
    !worker.is_draining()
}

fn end_batch<S: DatagramService>(s: &mut CoreServices<S>, counters: &IngestCounters) {
    s.flows.on_batch();
    s.user.on_batch();
    if let Some(p) = s.pcap.as_mut() {
        p.flush();
        counters.pcap_records.store(p.records(), std::sync::atomic::Ordering::Relaxed);
    }
    CoreCounters::add(&counters.batches, 1);
}

async fn run_xsk<R: Runtime, S: DatagramService>(
    shared: &Shared,
    setup: &XdpSetup,
    worker: &Worker,
    mut services: CoreServices<S>,
) -> Result<(), String> {
    let index = worker.info().index;
    let counters = shared.counters.core(index);
    let Some(&queue) = setup.queues.get(index) else {
        // More workers than queues: this one serves no queue (it may serve other apps).
        shared.report(index, Ok(format!("worker {index} (cpu {}): no RX queue", worker.info().cpu)));
        worker.draining().await;
        finish(&mut services);
        return Ok(());
    };
    // Bound here, after pinning: the UMEM is this core's memory.
    let mut xsk = XskSocket::bind(&setup.interface, queue, setup.frames).map_err(|e| e.to_string())?;
    {
        let mut program = setup.program.lock().map_err(|_| "program lock poisoned".to_string())?;
        let program = program.as_mut().ok_or("the XDP program was detached before the workers started")?;
        program.set_socket(queue, &xsk).map_err(|e| e.to_string())?;
    }
    let watch = R::FdWatch::new(xsk.fd()).map_err(|e| format!("watching the AF_XDP socket: {e}"))?;
    shared.report(
        index,
        Ok(format!(
            "worker {index} (cpu {}): AF_XDP socket on {} queue {queue}, {} mode, {} frames",
            worker.info().cpu,
            setup.interface,
            xsk.mode(),
            xsk.account().frames
        )),
    );
    let mut packets = Vec::with_capacity(shared.cfg.batch);
    let mut stats_at = Instant::now();
    loop {
        xsk.receive(&mut packets, shared.cfg.batch);
        if packets.is_empty() {
            if stats_at.elapsed() >= Duration::from_millis(100) {
                publish_xsk(&xsk, counters);
                stats_at = Instant::now();
            }
            // Check the ring, arm the wait, check again: the wait is level-triggered, so a
            // packet that arrived in between makes it complete at once.
            if !readable_or_drain(&watch, worker).await? {
                break;
            }
            continue;
        }
        let now = SystemTime::now();
        for &(addr, len) in &packets {
            let Some(frame) = xsk.packet(addr, len) else {
                CoreCounters::add(&counters.unparsed, 1);
                continue;
            };
            let Some(udp) = crate::packet::parse_udp(frame) else {
                CoreCounters::add(&counters.unparsed, 1);
                continue;
            };
            let d = Datagram {
                payload: &frame[udp.payload.clone()],
                from: udp.from,
                to: udp.to,
                core: index,
                queue: Some(queue),
                received: now,
                source: DatagramSource::AfXdp,
            };
            services.flows.on_datagram(&d);
            if let Some(p) = services.pcap.as_mut() {
                p.write_frame(now, frame);
            }
            services.user.on_datagram(&d);
        }
        let full = packets.len() == shared.cfg.batch;
        xsk.release(&packets);
        end_batch(&mut services, counters);
        publish_frames(&xsk, counters);
        if !between_batches(worker, full).await {
            break;
        }
    }
    finish(&mut services);
    publish_xsk(&xsk, counters);
    Ok(())
}

fn publish_frames(xsk: &XskSocket, c: &IngestCounters) {
    use std::sync::atomic::Ordering::Relaxed;
    let a = xsk.account();
    c.frames_received.store(a.received, Relaxed);
    c.frames_returned.store(a.returned, Relaxed);
    c.frame_mistakes.store(a.mistakes, Relaxed);
}

fn publish_xsk(xsk: &XskSocket, c: &IngestCounters) {
    use std::sync::atomic::Ordering::Relaxed;
    publish_frames(xsk, c);
    if let Ok(s) = xsk.stats() {
        c.xsk_rx_ring_full.store(s.rx_ring_full, Relaxed);
        c.xsk_fill_ring_empty.store(s.rx_fill_ring_empty_descs, Relaxed);
        c.xsk_rx_dropped.store(s.rx_dropped, Relaxed);
    }
}

/// Exports the per-core ingest counters and the XDP program's verdicts per RX queue.
struct IngestCollector {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for IngestCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestCollector").finish_non_exhaustive()
    }
}

impl Collector for IngestCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        use corepin_core::metrics::prometheus_client::encoding::EncodeMetric;
        use corepin_core::metrics::prometheus_client::metrics::counter::ConstCounter;
        let s = &self.shared;
        let n = s.workers;
        type Field = fn(&IngestCounters) -> &AtomicU64;
        let fields: [(&str, &str, Field); 10] = [
            ("corepin_ingest_truncated", "Datagrams longer than a receive slot, dropped", |c| &c.truncated),
            ("corepin_ingest_unparsed", "Redirected frames without a whole UDP datagram", |c| &c.unparsed),
            ("corepin_ingest_batches", "Receive batches handled", |c| &c.batches),
            ("corepin_ingest_pcap_records", "Records written to pcap files", |c| &c.pcap_records),
            ("corepin_xsk_frames_received", "UMEM frames taken from the RX ring", |c| &c.frames_received),
            ("corepin_xsk_frames_returned", "UMEM frames given back to the fill ring", |c| &c.frames_returned),
            ("corepin_xsk_frame_mistakes", "UMEM frames handed over or returned twice (always 0)", |c| {
                &c.frame_mistakes
            }),
            ("corepin_xsk_rx_ring_full", "Packets the kernel dropped: RX ring full", |c| &c.xsk_rx_ring_full),
            ("corepin_xsk_fill_ring_empty", "Packets the kernel dropped: fill ring empty", |c| &c.xsk_fill_ring_empty),
            ("corepin_xsk_rx_dropped", "Packets the kernel dropped for other reasons", |c| &c.xsk_rx_dropped),
        ];
        for (name, help, field) in fields {
            per_core_counter(&mut enc, name, help, None, n, |c, _| CoreCounters::get(field(s.counters.core(c))))?;
        }
        {
            use corepin_core::metrics::prometheus_client::metrics::gauge::ConstGauge;
            let mut m = enc.encode_descriptor(
                "corepin_ingest_source_info",
                "Where datagrams come from: af_xdp (with the XDP program's attach mode) or socket",
                None,
                ConstGauge::new(0i64).metric_type(),
            )?;
            let mode = s.attached().map_or("none".to_string(), |a| a.to_string());
            let source = s.source_kind().to_string();
            ConstGauge::new(1i64).encode(m.encode_family(&[("source", source.as_str()), ("mode", mode.as_str())])?)?;
        }
        if let Some(queues) = s.verdicts() {
            let mut m = enc.encode_descriptor(
                "corepin_xdp_packets",
                "Packets the XDP program saw, by RX queue and what it did (summed over CPUs)",
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for (q, c) in queues {
                let q = q.to_string();
                for v in Verdict::ALL {
                    ConstCounter::new(c.get(v))
                        .encode(m.encode_family(&[("queue", q.as_str()), ("verdict", v.name())])?)?;
                }
            }
        }
        Ok(())
    }
}
