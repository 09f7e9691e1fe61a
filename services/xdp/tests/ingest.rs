//! The ingest service end to end, on every backend: thousands of datagrams of random sizes
//! from many source ports, and exact checks that every one was counted once in its flow,
//! written once to the pcap files (read back by the format's rules and, when installed, by
//! `tcpdump -r`), and handed once to a user service.
//!
//! - The socket source on loopback (no root needed).
//! - Root only, in two network namespaces joined by a 2-queue veth pair that the test creates
//!   and removes: the AF_XDP source in native and in generic mode (with the XDP program's
//!   per-queue verdicts, both queues and both cores in native mode, and ARP, ping and UDP to
//!   another port still reaching the kernel), and the socket source on the same pair. Without
//!   root these print why and skip.

use std::collections::HashMap;
use std::fs::File;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corepin::datagram::{Datagram, DatagramService, DatagramServiceFactory};
use corepin::launcher::LaunchConfig;
use corepin::topology::CoreSelection;
use corepin::{Runtime, Server, Worker};
use corepin_xdp::{AttachMode, Attached, Ingest, IngestConfig, PcapConfig, Shared, SourceChoice, Verdict};
use rand::{Rng, SeedableRng};

// ---- the user service: records every payload it is handed ---------------------------------

/// What the user service saw: (core, source, destination, payload) per datagram.
type Seen = Arc<Mutex<Vec<(usize, SocketAddr, SocketAddr, Vec<u8>)>>>;

struct Recorder {
    seen: Seen,
}

struct CoreRecorder {
    seen: Seen,
    mine: Vec<(usize, SocketAddr, SocketAddr, Vec<u8>)>,
}

impl DatagramService for CoreRecorder {
    fn on_datagram(&mut self, d: &Datagram<'_>) {
        self.mine.push((d.core, d.from, d.to, d.payload.to_vec()));
    }
    fn on_batch(&mut self) {
        let mut all = self.seen.lock().unwrap();
        all.append(&mut self.mine);
    }
}

impl DatagramServiceFactory for Recorder {
    type Service<R: Runtime> = CoreRecorder;
    type Error = std::convert::Infallible;
    fn new_service<R: Runtime>(&self, _worker: &Worker) -> Result<CoreRecorder, Self::Error> {
        Ok(CoreRecorder { seen: Arc::clone(&self.seen), mine: Vec::new() })
    }
}

// ---- namespaces -----------------------------------------------------------------------------

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("the `ip` command (iproute2)");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Two namespaces joined by a veth pair with two queues each way (`va` in `a`: 10.77.0.1 and
/// fd77::1; `vb` in `b`: 10.77.0.2 and fd77::2), removed on drop (also when a test fails).
struct Pair {
    a: String,
    b: String,
}

impl Pair {
    fn new() -> Pair {
        static N: AtomicU32 = AtomicU32::new(0);
        let id = format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let pair = Pair { a: format!("cpin-a-{id}"), b: format!("cpin-b-{id}") };
        ip(&["netns", "add", &pair.a]);
        ip(&["netns", "add", &pair.b]);
        ip(&[
            "-n",
            &pair.a,
            "link",
            "add",
            "va",
            "numtxqueues",
            "2",
            "numrxqueues",
            "2",
            "type",
            "veth",
            "peer",
            "name",
            "vb",
            "numtxqueues",
            "2",
            "numrxqueues",
            "2",
            "netns",
            &pair.b,
        ]);
        for (ns, dev, v4, v6) in
            [(&pair.a, "va", "10.77.0.1/24", "fd77::1/64"), (&pair.b, "vb", "10.77.0.2/24", "fd77::2/64")]
        {
            ip(&["-n", ns, "addr", "add", v4, "dev", dev]);
            ip(&["-n", ns, "addr", "add", v6, "dev", dev, "nodad"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        // Complete UDP checksums on the sender, so captured frames hold valid ones.
        let _ = Command::new("ip").args(["netns", "exec", &pair.a, "ethtool", "-K", "va", "tx", "off"]).output();
        pair
    }

    /// Runs `f` on a thread that has entered namespace `ns` (threads it starts stay there).
    fn inside<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(format!("/var/run/netns/{ns}")).expect("the namespace exists");
                // SAFETY: setns on this thread only, with a namespace descriptor we hold open.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("the namespaced thread")
        })
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        eprintln!("skipped: XDP, AF_XDP and network namespaces need root (euid {euid})");
    }
    euid == 0
}

// ---- running the service ----------------------------------------------------------------------

struct Running {
    server: Option<Server>,
    shared: Arc<Shared>,
    seen: Seen,
    pcap: tempfile::TempDir,
}

impl Running {
    /// Starts the service on two workers, from the current thread's namespace.
    fn start<R: Runtime>(interface: &str, port: u16, choice: SourceChoice, mode: AttachMode) -> Running {
        let launch = LaunchConfig { cores: CoreSelection::Count(2), ..LaunchConfig::default() };
        let cpus = launch.plan().unwrap();
        let pcap = tempfile::tempdir().unwrap();
        let mut cfg = IngestConfig::new(port);
        cfg.pcap = Some(PcapConfig { dir: pcap.path().to_path_buf(), rotate_bytes: 256 * 1024 });
        let os: Vec<usize> = cpus.iter().map(|c| c.os).collect();
        let prepared = corepin_xdp::ingest::prepare(interface, &cfg, choice, mode, None, &os).expect("the source");
        if choice == SourceChoice::Xdp {
            assert!(prepared.fallback.is_none());
        }
        let seen: Seen = Arc::default();
        let app = Ingest::new(prepared, cfg, cpus.len(), Recorder { seen: Arc::clone(&seen) }).unwrap();
        let shared = Arc::clone(app.shared());
        let server = Server::start::<R, _>(&launch, &cpus, Arc::new(app)).unwrap();
        let lines = shared.wait_ready(Duration::from_secs(10)).expect("every worker ready");
        eprintln!("{}", shared.describe().join("\n"));
        eprintln!("{}", lines.join("\n"));
        Running { server: Some(server), shared, seen, pcap }
    }

    /// Waits until the service has counted `n` datagrams (or 20 s), then drains it.
    fn stop_after(&mut self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.counted() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let server = self.server.take().unwrap();
        server.shutdown_handle().drain();
        server.wait().expect("the service stops cleanly");
    }

    fn counted(&self) -> u64 {
        (0..self.shared.flows.cores()).map(|c| self.shared.flows.core(c).datagrams()).sum()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown_handle().close();
            let _ = s.wait();
        }
    }
}

/// One sent datagram: (source, destination, payload).
type Sent = Vec<(SocketAddr, SocketAddr, Vec<u8>)>;

/// Sends `n` datagrams of random sizes up to `max` bytes to `to` from `ports` sockets bound on
/// `from_ip`, paced so that no receive buffer overflows. Each payload starts with its
/// sequence number, so each is unique.
fn send(from_ip: IpAddr, to: SocketAddr, n: u32, max: usize, ports: usize, seed: u64) -> Sent {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let socks: Vec<UdpSocket> = (0..ports).map(|_| UdpSocket::bind((from_ip, 0)).unwrap()).collect();
    let mut sent = Vec::with_capacity(n as usize);
    for seq in 0..n {
        let len = rng.gen_range(4..=max);
        let mut payload = vec![0u8; len];
        rng.fill(&mut payload[4..]);
        payload[..4].copy_from_slice(&seq.to_be_bytes());
        let s = &socks[rng.gen_range(0..ports)];
        s.send_to(&payload, to).unwrap();
        sent.push((s.local_addr().unwrap(), to, payload));
        if seq % 64 == 63 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    sent
}

/// Reads every record of the pcap files in `dir`: (link type, records).
fn read_pcaps(dir: &Path) -> Vec<(u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    for path in names {
        let b = std::fs::read(&path).unwrap();
        assert_eq!(u32::from_le_bytes(b[0..4].try_into().unwrap()), 0xa1b2_c3d4, "{path:?}");
        let link = u32::from_le_bytes(b[20..24].try_into().unwrap());
        let mut at = 24;
        while at < b.len() {
            let cap = u32::from_le_bytes(b[at + 8..at + 12].try_into().unwrap()) as usize;
            out.push((link, b[at + 16..at + 16 + cap].to_vec()));
            at += 16 + cap;
        }
        assert_eq!(at, b.len(), "{path:?} ends with a whole record");
    }
    out
}

/// Records `tcpdump -r` reads in `dir`, or `None` when tcpdump is not installed.
fn tcpdump_count(dir: &Path) -> Option<usize> {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        // `-q`: no application-layer dissection. Without it a datagram whose random source
        // port is one tcpdump knows (49152 decodes as "BCM-LI-SHIM") prints no "UDP, length".
        let out = match Command::new("tcpdump").args(["-nn", "-q", "-r"]).arg(e.unwrap().path()).output() {
            Ok(o) => o,
            Err(_) => {
                eprintln!("tcpdump not installed: pcap files checked by the format's rules only");
                return None;
            }
        };
        assert!(out.status.success(), "tcpdump -r: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.lines().all(|l| l.contains(" UDP, length ")), "tcpdump reads UDP datagrams:\n{text}");
        total += text.lines().count();
    }
    Some(total)
}

fn canon(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Every check that holds whichever the source: flows, user service and pcap each hold every
/// sent datagram exactly once.
fn check_exactly(run: &Running, sent: &Sent) {
    let n = sent.len() as u64;
    // Flows: per (source, destination) packets and bytes.
    let mut expect: HashMap<(SocketAddr, SocketAddr), (u64, u64)> = HashMap::new();
    for (from, to, p) in sent {
        let e = expect.entry((canon(*from), canon(*to))).or_default();
        e.0 += 1;
        e.1 += p.len() as u64;
    }
    let flows = run.shared.flows.merged();
    let got: HashMap<_, _> = flows.iter().map(|(k, s)| ((k.src, k.dst), (s.packets, s.bytes))).collect();
    assert_eq!(got, expect, "per-flow packets and bytes");
    let per_core: Vec<u64> = (0..run.shared.flows.cores()).map(|c| run.shared.flows.core(c).datagrams()).collect();
    assert_eq!(per_core.iter().sum::<u64>(), n, "each datagram counted once: {per_core:?}");
    eprintln!("datagrams per core: {per_core:?}; flows: {}", flows.len());

    // The user service: each payload once, with its addresses.
    let mut seen: Vec<(SocketAddr, SocketAddr, Vec<u8>)> =
        run.seen.lock().unwrap().iter().map(|(_, f, t, p)| (*f, *t, p.clone())).collect();
    let mut want: Vec<_> = sent.iter().map(|(f, t, p)| (canon(*f), canon(*t), p.clone())).collect();
    seen.sort();
    want.sort();
    assert_eq!(seen.len(), want.len(), "the user service saw every datagram once");
    assert!(seen == want, "the user service saw exactly what was sent");

    // The pcap files: exactly what was sent.
    let records = read_pcaps(run.pcap.path());
    let mut captured: Vec<(SocketAddr, SocketAddr, Vec<u8>)> = records
        .iter()
        .map(|(link, r)| {
            let frame = match link {
                1 => r.clone(),
                101 => {
                    let ethertype: [u8; 2] = if r[0] >> 4 == 4 { [0x08, 0x00] } else { [0x86, 0xdd] };
                    [&[0u8; 12][..], &ethertype, r].concat()
                }
                other => panic!("link type {other}"),
            };
            let u = corepin_xdp::packet::parse_udp(&frame).expect("a UDP datagram in each record");
            (canon(u.from), canon(u.to), frame[u.payload].to_vec())
        })
        .collect();
    captured.sort();
    assert_eq!(captured.len(), want.len(), "one pcap record per datagram");
    assert!(captured == want, "the pcap files hold exactly what was sent");
    if let Some(count) = tcpdump_count(run.pcap.path()) {
        assert_eq!(count, sent.len(), "tcpdump -r reads every record");
    }
    for c in 0..run.shared.flows.cores() {
        let k = run.shared.counters.core(c);
        assert_eq!(k.truncated.load(Ordering::Relaxed), 0);
        assert_eq!(k.unparsed.load(Ordering::Relaxed), 0);
        assert_eq!(k.frame_mistakes.load(Ordering::Relaxed), 0, "every frame back exactly once");
        assert_eq!(
            k.frames_received.load(Ordering::Relaxed),
            k.frames_returned.load(Ordering::Relaxed),
            "every frame taken was given back"
        );
    }
}

fn free_udp_port(ip: &str) -> u16 {
    UdpSocket::bind((ip, 0)).unwrap().local_addr().unwrap().port()
}

// ---- the tests ------------------------------------------------------------------------------

const DATAGRAMS: u32 = 3000;

/// The socket source on loopback: no root needed.
pub fn socket_source_on_loopback_takes_every_datagram_once<R: Runtime>() {
    let port = free_udp_port("127.0.0.1");
    let mut run = Running::start::<R>("lo", port, SourceChoice::Socket, AttachMode::Auto);
    assert_eq!(run.shared.source_kind(), corepin::datagram::DatagramSource::Socket);
    let to: SocketAddr = ([127, 0, 0, 1], port).into();
    let sent = send(IpAddr::from([127, 0, 0, 1]), to, DATAGRAMS, 1472, 40, 1);
    run.stop_after(u64::from(DATAGRAMS));
    check_exactly(&run, &sent);
}

/// Sends the known set from namespace `a` to `b`, v4 and v6, plus other traffic that must
/// reach `b`'s kernel: UDP to another port (received by a kernel socket), ping, and ARP.
fn exchange(pair: &Pair, port: u16) -> Sent {
    let other = port + 1;
    let kernel_socket = Pair::inside(&pair.b, || UdpSocket::bind(("10.77.0.2", other)).unwrap());
    // Resolve both neighbours first: datagrams sent while a neighbour is unresolved wait in a
    // short queue in the sender's kernel and the rest are dropped there, before the wire.
    for peer in ["10.77.0.2", "fd77::2"] {
        let ping = Command::new("ip")
            .args(["netns", "exec", &pair.a, "ping", "-c", "1", "-W", "5", peer])
            .output()
            .expect("ping (iputils-ping)");
        assert!(ping.status.success(), "ping {peer}: {}", String::from_utf8_lossy(&ping.stdout));
    }
    let sent = Pair::inside(&pair.a, || {
        let mut sent = send(IpAddr::from([10, 77, 0, 1]), ([10, 77, 0, 2], port).into(), DATAGRAMS, 1472, 64, 2);
        let six = SocketAddr::new("fd77::2".parse().unwrap(), port);
        sent.extend(send("fd77::1".parse().unwrap(), six, 300, 1452, 8, 3));
        let tx = UdpSocket::bind("10.77.0.1:0").unwrap();
        for _ in 0..10 {
            tx.send_to(b"for the kernel", ("10.77.0.2", other)).unwrap();
        }
        sent
    });
    kernel_socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    for i in 0..10 {
        let (n, _) = kernel_socket.recv_from(&mut buf).unwrap_or_else(|e| panic!("other port, datagram {i}: {e}"));
        assert_eq!(&buf[..n], b"for the kernel");
    }
    let ping = Command::new("ip")
        .args(["netns", "exec", &pair.a, "ping", "-c", "3", "-i", "0.2", "-W", "2", "10.77.0.2"])
        .output()
        .expect("ping (iputils-ping)");
    assert!(ping.status.success(), "ping reaches the kernel: {}", String::from_utf8_lossy(&ping.stdout));
    sent
}

fn xdp_source_in_namespaces<R: Runtime>(mode: AttachMode, expect: Attached) {
    let pair = Pair::new();
    let port = 47_100;
    let mut run = Pair::inside(&pair.b, || Running::start::<R>("vb", port, SourceChoice::Xdp, mode));
    assert_eq!(run.shared.attached(), Some(expect));
    let shown = Command::new("ip").args(["-n", &pair.b, "link", "show", "vb"]).output().unwrap();
    assert!(String::from_utf8_lossy(&shown.stdout).contains("prog/xdp"), "ip link shows the program");
    let sent = exchange(&pair, port);
    run.stop_after(sent.len() as u64);
    let verdicts = run.shared.verdicts().expect("program counters");
    eprintln!(
        "{mode:?}: verdicts per queue: {:?}",
        verdicts
            .iter()
            .map(|(q, c)| (
                q,
                Verdict::ALL.iter().map(|v| (v.name(), c.get(*v))).filter(|(_, n)| *n > 0).collect::<Vec<_>>()
            ))
            .collect::<Vec<_>>()
    );
    let total = |v: Verdict| verdicts.iter().map(|(_, c)| c.get(v)).sum::<u64>();
    assert_eq!(total(Verdict::Redirected), sent.len() as u64, "every datagram for the port redirected once");
    assert_eq!(total(Verdict::NoSocket), 0, "every queue that got the port's traffic had a socket");
    assert_eq!(total(Verdict::OtherPort), 10, "UDP to the other port passed");
    assert!(total(Verdict::NotIp) >= 1, "ARP passed");
    assert!(total(Verdict::NotUdp) >= 3, "the pings (and ICMPv6) passed");
    assert_eq!(total(Verdict::Malformed), 0);
    check_exactly(&run, &sent);
    if expect == Attached::Native {
        for (q, c) in &verdicts {
            assert!(c.get(Verdict::Redirected) > 0, "native mode: traffic on queue {q} too: {verdicts:?}");
        }
        for core in 0..2 {
            assert!(run.shared.flows.core(core).datagrams() > 0, "native mode: core {core} took datagrams");
        }
    }
    run.shared.detach().unwrap();
    let shown = Command::new("ip").args(["-n", &pair.b, "link", "show", "vb"]).output().unwrap();
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(!text.contains("prog/xdp"), "nothing left on vb after stopping:\n{text}");
}

/// AF_XDP in native (driver) mode on the veth pair.
pub fn xdp_native_takes_every_datagram_once_and_passes_the_rest<R: Runtime>() {
    if root() {
        xdp_source_in_namespaces::<R>(AttachMode::Native, Attached::Native);
    }
}

/// AF_XDP in generic mode on the veth pair.
pub fn xdp_generic_takes_every_datagram_once_and_passes_the_rest<R: Runtime>() {
    if root() {
        xdp_source_in_namespaces::<R>(AttachMode::Generic, Attached::Generic);
    }
}

/// The socket source on the veth pair, bound to the interface.
pub fn socket_source_in_namespaces_takes_every_datagram_once<R: Runtime>() {
    if !root() {
        return;
    }
    let pair = Pair::new();
    let port = 47_200;
    let mut run = Pair::inside(&pair.b, || Running::start::<R>("vb", port, SourceChoice::Socket, AttachMode::Auto));
    let sent = exchange(&pair, port);
    run.stop_after(sent.len() as u64);
    check_exactly(&run, &sent);
}

// ---- malformed frames ---------------------------------------------------------------------

/// The MAC address of `dev` in namespace `ns`.
fn mac(ns: &str, dev: &str) -> [u8; 6] {
    let out = Command::new("ip").args(["-n", ns, "link", "show", dev]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text.split("link/ether ").nth(1).and_then(|r| r.split_whitespace().next()).expect("a MAC address");
    let mut m = [0u8; 6];
    for (b, h) in m.iter_mut().zip(hex.split(':')) {
        *b = u8::from_str_radix(h, 16).unwrap();
    }
    m
}

/// Sends raw Ethernet frames on `dev` (in the calling thread's namespace) with AF_PACKET.
fn send_frames(dev: &str, frames: &[Vec<u8>]) {
    // SAFETY: plain socket creation; closed below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
    let name = std::ffi::CString::new(dev).unwrap();
    // SAFETY: a valid NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(ifindex, 0);
    for f in frames {
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = ifindex as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&f[..6]);
        // SAFETY: `f` and `to` are live for the call; lengths are theirs.
        let n = unsafe {
            libc::sendto(
                fd,
                f.as_ptr().cast(),
                f.len(),
                0,
                (&to as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(n, f.len() as isize, "sendto: {}", std::io::Error::last_os_error());
    }
    // SAFETY: our descriptor, closed once.
    unsafe { libc::close(fd) };
}

/// An IPv4 header (with `options` words of options) and UDP header for `payload`, IHL as given.
fn ipv4_udp(ihl: u8, frag: u16, dport: u16, payload: &[u8], udp_len: Option<u16>) -> Vec<u8> {
    let opts = usize::from(ihl.max(5) - 5) * 4;
    let total = 20 + opts + 8 + payload.len();
    let mut ip = vec![0u8; 20 + opts];
    ip[0] = 0x40 | ihl;
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[6..8].copy_from_slice(&frag.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[10, 77, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 77, 0, 2]);
    for o in ip[20..].iter_mut() {
        *o = 1; // NOP options
    }
    let mut sum = 0u32;
    for c in ip.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    ip.extend_from_slice(&4444u16.to_be_bytes());
    ip.extend_from_slice(&dport.to_be_bytes());
    ip.extend_from_slice(&udp_len.unwrap_or(8 + payload.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0]); // no UDP checksum (IPv4 allows it)
    ip.extend_from_slice(payload);
    ip
}

fn ethernet(dst: [u8; 6], src: [u8; 6], tags: &[u16], ethertype: u16, l3: &[u8]) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    for &t in tags {
        f.extend_from_slice(&t.to_be_bytes());
        f.extend_from_slice(&[0, 7]);
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(l3);
    f
}

/// Malformed and unusual frames, injected raw from the peer: those the program cannot take
/// are passed (counted by reason), the two well-formed ones in unusual dress (two VLAN tags,
/// IPv4 options) reach the user service whole, one with a lying UDP length is redirected but
/// refused by the parser, and the service goes on serving.
pub fn malformed_frames_are_passed_and_nothing_breaks<R: Runtime>() {
    if !root() {
        return;
    }
    let pair = Pair::new();
    // Room for a frame longer than an AF_XDP frame holds (veth's native XDP allows ~3.5 KB).
    ip(&["-n", &pair.a, "link", "set", "va", "mtu", "3000"]);
    ip(&["-n", &pair.b, "link", "set", "vb", "mtu", "3000"]);
    let port = 47_400;
    // A kernel socket on the same port: it gets only what the program passes.
    let kernel = Pair::inside(&pair.b, || UdpSocket::bind(("10.77.0.2", port)).unwrap());
    let mut run = Pair::inside(&pair.b, || Running::start::<R>("vb", port, SourceChoice::Xdp, AttachMode::Native));
    let (dst, src) = (mac(&pair.b, "vb"), mac(&pair.a, "va"));
    let (ip4, ip6, q) = (0x0800u16, 0x86ddu16, 0x8100u16);
    let good = ipv4_udp(5, 0, port, b"two tags", None);
    let mut v6_hbh = vec![0u8; 40 + 8 + 8];
    v6_hbh[0] = 0x60;
    v6_hbh[4..6].copy_from_slice(&16u16.to_be_bytes());
    v6_hbh[6] = 0; // hop-by-hop options first
    v6_hbh[7] = 64;
    v6_hbh[8..24].copy_from_slice(&"fd77::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
    v6_hbh[24..40].copy_from_slice(&"fd77::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
    v6_hbh[40] = 17; // then UDP
    let mut v6_frag = v6_hbh.clone();
    v6_frag[6] = 44;
    let frames = vec![
        // Malformed: an IPv4 header cut short, an IHL below 5, a UDP header cut short.
        ethernet(dst, src, &[], ip4, &good[..10]),
        ethernet(dst, src, &[], ip4, &ipv4_udp(4, 0, port, b"bad ihl", None)),
        ethernet(dst, src, &[], ip4, &good[..24]),
        // Fragments: IPv4 with more-fragments set, IPv6 with a fragment header.
        ethernet(dst, src, &[], ip4, &ipv4_udp(5, 0x2000, port, b"first fragment", None)),
        ethernet(dst, src, &[], ip6, &v6_frag),
        // Not UDP to the program: IPv6 behind a hop-by-hop header.
        ethernet(dst, src, &[], ip6, &v6_hbh),
        // Not IP past two tags: three VLAN tags.
        ethernet(dst, src, &[q, q, q], ip4, &good),
        // Taken: two VLAN tags; IPv4 with two words of options.
        ethernet(dst, src, &[0x88a8, q], ip4, &good),
        ethernet(dst, src, &[], ip4, &ipv4_udp(7, 0, port, b"with options", None)),
        // Too long for an AF_XDP frame: passed to the kernel's socket instead.
        ethernet(dst, src, &[], ip4, &ipv4_udp(5, 0, port, &[7u8; 2400], None)),
        // Taken by the program, refused by the parser: a UDP length past the packet.
        ethernet(dst, src, &[], ip4, &ipv4_udp(5, 0, port, b"lies", Some(400))),
    ];
    Pair::inside(&pair.a, || send_frames("va", &frames));
    // Then ordinary traffic: still served.
    let to: SocketAddr = ([10, 77, 0, 2], port).into();
    let ping = Command::new("ip")
        .args(["netns", "exec", &pair.a, "ping", "-c", "1", "-W", "5", "10.77.0.2"])
        .output()
        .expect("ping");
    assert!(ping.status.success());
    let sent = Pair::inside(&pair.a, || send(IpAddr::from([10, 77, 0, 1]), to, 100, 200, 4, 9));
    run.stop_after(102);
    let verdicts = run.shared.verdicts().unwrap();
    let total = |v: Verdict| verdicts.iter().map(|(_, c)| c.get(v)).sum::<u64>();
    let show = format!("{:?}", Verdict::ALL.iter().map(|v| (v.name(), total(*v))).collect::<Vec<_>>());
    eprintln!("verdicts: {show}");
    assert_eq!(total(Verdict::Malformed), 3, "{show}");
    assert_eq!(total(Verdict::Fragment), 2, "{show}");
    assert!(total(Verdict::NotIp) >= 1, "three tags: {show}");
    assert!(total(Verdict::NotUdp) >= 2, "hop-by-hop, ping: {show}");
    assert_eq!(total(Verdict::Redirected), 3 + 100, "{show}");
    assert_eq!(total(Verdict::TooBig), 1, "{show}");
    kernel.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, _) = kernel.recv_from(&mut buf).expect("the long datagram reached the kernel's socket");
    assert_eq!(&buf[..n], &[7u8; 2400][..]);
    kernel.set_nonblocking(true).unwrap();
    assert!(kernel.recv_from(&mut buf).is_err(), "and nothing else the program took");
    let unparsed: u64 = (0..2).map(|c| run.shared.counters.core(c).unparsed.load(Ordering::Relaxed)).sum();
    assert_eq!(unparsed, 1, "the lying UDP length");
    let seen = run.seen.lock().unwrap();
    let odd: Vec<&[u8]> =
        seen.iter().map(|(_, _, _, p)| p.as_slice()).filter(|p| p == b"two tags" || p == b"with options").collect();
    assert_eq!(odd.len(), 2, "both unusual but whole datagrams reached the service once");
    assert_eq!(seen.len(), 2 + sent.len(), "and every ordinary one after them");
}

corepin::per_runtime_tests! {
    malformed_frames_are_passed_and_nothing_breaks,
    socket_source_on_loopback_takes_every_datagram_once,
    socket_source_in_namespaces_takes_every_datagram_once,
    xdp_native_takes_every_datagram_once_and_passes_the_rest,
    xdp_generic_takes_every_datagram_once_and_passes_the_rest,
}
