//! `corepin xdp`, end to end, on every backend: the socket source on loopback counts exactly
//! what was sent and says in its banner why AF_XDP is not used (run as `nobody`); bad
//! arguments and kernel refusals give one clear line. As root, in two network namespaces
//! joined by a 2-queue veth pair that the test creates and removes: AF_XDP in native mode
//! counts exactly what was sent (metrics scraped from the namespace), writes pcap files that
//! `tcpdump -r` reads, and leaves nothing on the interface after SIGTERM, nor after SIGKILL,
//! after which a restart serves again.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_corepin");
const RUNTIMES: [&str; 4] = ["monoio", "glommio", "tokio-uring", "compio"];

struct Running {
    child: Child,
    banner: String,
    metrics: SocketAddr,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `corepin xdp` through `prefix` (e.g. `ip netns exec NS`) and reads its banner up to
/// the metrics line.
fn start(prefix: &[&str], args: &[&str], uid: Option<u32>) -> Running {
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    cmd.arg("xdp").args(args).args(["--metrics", "127.0.0.1:0", "--drain-timeout", "5"]);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("corepin starts");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut banner = String::new();
    let metrics = loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            panic!("corepin exited before its banner was complete:\n{banner}");
        }
        banner.push_str(&line);
        if let Some(rest) = line.trim().strip_prefix("metrics: http://") {
            break rest.trim_end_matches("/metrics").parse().unwrap();
        }
    };
    std::thread::spawn(move || for _ in out.lines() {});
    Running { child, banner, metrics }
}

fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).expect("metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n").unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    all
}

/// The value of the sample named exactly `name` (with its labels), 0 when absent.
fn sample(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        .unwrap_or(0)
}

/// Waits until `metric` reaches `n` (or 20 s) through `scrape_fn`; returns the last scrape.
fn wait_for(scrape_fn: &dyn Fn() -> String, metric: &str, n: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = scrape_fn();
        if sample(&text, metric) >= n || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop(mut r: Running) -> String {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(r.child.id() as i32, libc::SIGTERM) };
    let out = r.child.wait().unwrap();
    assert!(out.success(), "corepin xdp exits 0 after SIGTERM: {out:?}");
    std::mem::take(&mut r.banner)
}

/// Sends `n` datagrams of sizes 1..=1400 to `to` from `ports` sockets; returns their bytes.
fn send(from: &str, to: SocketAddr, n: usize, ports: usize) -> u64 {
    let socks: Vec<UdpSocket> = (0..ports).map(|_| UdpSocket::bind((from, 0)).unwrap()).collect();
    let mut bytes = 0;
    for i in 0..n {
        let len = 1 + (i * 7919) % 1400;
        socks[i % ports].send_to(&vec![i as u8; len], to).unwrap();
        bytes += len as u64;
        if i % 64 == 63 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    bytes
}

#[test]
fn socket_source_on_loopback_counts_every_datagram_and_says_why_not_af_xdp() {
    for runtime in RUNTIMES {
        let port = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
        // As `nobody` when we are root, so `auto` must fall back and say why.
        // SAFETY: geteuid has no preconditions.
        let uid = (unsafe { libc::geteuid() } == 0).then_some(65_534);
        let args = ["--runtime", runtime, "--cores", "2", "--interface", "lo", "--port", &port];
        let r = start(&[], &args, uid);
        assert!(r.banner.contains("source: UDP sockets on"), "{}", r.banner);
        assert!(r.banner.contains("AF_XDP not used: not root"), "{}", r.banner);
        assert!(r.banner.contains("steering: SO_ATTACH_REUSEPORT_CBPF"), "{}", r.banner);
        let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let bytes = send("127.0.0.1", to, 2000, 16);
        let m = r.metrics;
        let text = wait_for(&|| scrape(m), "corepin_ingest_datagrams_all_cores_total", 2000);
        assert_eq!(sample(&text, "corepin_ingest_datagrams_all_cores_total"), 2000, "{runtime}");
        assert_eq!(sample(&text, "corepin_ingest_bytes_all_cores_total"), bytes, "{runtime}");
        // A flow is listed per core that saw it (the sender may move between CPUs, and its
        // datagrams follow the CPU): count distinct (src, dst) and sum their packets.
        let mut flows: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
        for l in text.lines().filter(|l| l.starts_with("corepin_ingest_flow_packets_total{")) {
            let (labels, value) = l.rsplit_once(' ').unwrap();
            let key = labels.split_once(",src=").unwrap().1.to_string();
            *flows.entry(key).or_default() += value.parse::<u64>().unwrap();
        }
        assert_eq!(flows.len(), 16, "{runtime}: one flow per source port");
        assert_eq!(flows.values().sum::<u64>(), 2000, "{runtime}: flows add up");
        let flows = flows.len();
        eprintln!("{runtime}: 2000 datagrams, {bytes} bytes, {flows} flows");
        // A second ingest on the same port is refused (SO_REUSEPORT would share the datagrams
        // between the two without a word), and the first one's port is untouched.
        // Run as the same user: as another, bind itself refuses (reuseport groups are per user).
        let mut second = Command::new(BIN);
        second.args(["xdp", "--source", "socket", "--cores", "1", "--interface", "lo", "--port", &port]);
        if let Some(uid) = uid {
            second.uid(uid);
        }
        let out = second.output().unwrap();
        let e = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success() && e.trim().lines().count() == 1, "{runtime}: one line: {e}");
        assert!(e.contains("address already in use"), "{runtime}: {e}");
        stop(r);
    }
}

#[test]
fn bad_arguments_and_refusals_give_one_line() {
    let e = common::one_error_line(BIN, &["xdp", "--interface", "lo", "--port", "9", "--source", "carrier-pigeon"]);
    assert!(e.contains("--source \"carrier-pigeon\" is not one of"), "{e}");
    let e = common::one_error_line(BIN, &["xdp", "--interface", "lo", "--port", "9", "--queues", "1-0"]);
    assert!(e.contains("--queues"), "{e}");
    let e = common::one_error_line(BIN, &["xdp", "--interface", "lo", "--port", "0"]);
    assert!(e.contains("--port"), "{e}");
    let e = common::one_error_line(
        BIN,
        &["xdp", "--interface", "corepin-nosuch0", "--port", "9", "--source", "socket", "--cores", "1"],
    );
    assert!(e.contains("corepin-nosuch0"), "{e}");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let e = common::one_error_line(
            BIN,
            &["xdp", "--interface", "corepin-nosuch0", "--port", "9", "--source", "xdp", "--cores", "1"],
        );
        assert!(e.contains("no interface \"corepin-nosuch0\""), "{e}");
        let e = common::one_error_line(
            BIN,
            &["xdp", "--interface", "lo", "--port", "9", "--source", "xdp", "--queues", "5"],
        );
        assert!(e.contains("RX queue 5 is out of range"), "{e}");
        // Loopback has no native XDP: the errno and a hint, in one line.
        let e = common::one_error_line(
            BIN,
            &["xdp", "--interface", "lo", "--port", "9", "--source", "xdp", "--mode", "native", "--cores", "1"],
        );
        assert!(e.contains("Operation not supported (os error 95) (the driver has no native XDP"), "{e}");
        // Without root: loading is refused, the errno and a hint, in one line.
        let out = Command::new(BIN)
            .args(["xdp", "--interface", "lo", "--port", "9", "--source", "xdp", "--cores", "1"])
            .uid(65_534)
            .gid(65_534)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let e = String::from_utf8_lossy(&out.stderr);
        assert_eq!(e.trim().lines().count(), 1, "{e}");
        assert!(e.contains("Operation not permitted (os error 1) (XDP programs need root"), "{e}");
    }
}

// ---- root: a veth pair between two namespaces --------------------------------------------

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("the `ip` command (iproute2)");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

struct Pair {
    a: String,
    b: String,
}

impl Pair {
    fn new() -> Pair {
        static N: AtomicU32 = AtomicU32::new(0);
        let id = format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let pair = Pair { a: format!("cpcli-a-{id}"), b: format!("cpcli-b-{id}") };
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
        for (ns, dev, v4) in [(&pair.a, "va", "10.78.0.1/24"), (&pair.b, "vb", "10.78.0.2/24")] {
            ip(&["-n", ns, "addr", "add", v4, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let _ = Command::new("ip").args(["netns", "exec", &pair.a, "ethtool", "-K", "va", "tx", "off"]).output();
        pair
    }

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

    fn program_attached(&self) -> bool {
        let shown = Command::new("ip").args(["-n", &self.b, "link", "show", "vb"]).output().unwrap();
        String::from_utf8_lossy(&shown.stdout).contains("prog/xdp")
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn xdp_in_namespaces_counts_exactly_and_leaves_nothing_after_sigterm_or_sigkill() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        eprintln!("skipped: XDP, AF_XDP and network namespaces need root (euid {euid})");
        return;
    }
    for runtime in RUNTIMES {
        let pair = Pair::new();
        let pcap = tempfile::tempdir().unwrap();
        let dir = pcap.path().to_str().unwrap().to_string();
        let args = [
            "--runtime",
            runtime,
            "--cores",
            "2",
            "--interface",
            "vb",
            "--port",
            "47300",
            "--source",
            "xdp",
            "--mode",
            "native",
            "--pcap",
            &dir,
            "--pcap-rotate-mb",
            "1",
        ];
        let prefix = ["ip", "netns", "exec", pair.b.as_str()];
        let r = start(&prefix, &args, None);
        assert!(r.banner.contains("attached in native mode"), "{}", r.banner);
        assert!(r.banner.contains("copy mode"), "veth has no zero-copy: {}", r.banner);
        assert!(pair.program_attached());
        let to: SocketAddr = "10.78.0.2:47300".parse().unwrap();
        Pair::inside(&pair.a, || {
            let ping = Command::new("ping").args(["-c", "1", "-W", "5", "10.78.0.2"]).output().expect("ping");
            assert!(ping.status.success(), "ping passes to the kernel");
        });
        let bytes = Pair::inside(&pair.a, || send("10.78.0.1", to, 3000, 32));
        let (m, b) = (r.metrics, pair.b.clone());
        let text = wait_for(&|| Pair::inside(&b, || scrape(m)), "corepin_ingest_datagrams_all_cores_total", 3000);
        assert_eq!(sample(&text, "corepin_ingest_datagrams_all_cores_total"), 3000, "{runtime}");
        assert_eq!(sample(&text, "corepin_ingest_bytes_all_cores_total"), bytes, "{runtime}");
        let redirected =
            |q: &str| sample(&text, &format!("corepin_xdp_packets_total{{queue=\"{q}\",verdict=\"redirected\"}}"));
        assert_eq!(redirected("0") + redirected("1"), 3000, "{runtime}");
        assert!(redirected("0") > 0 && redirected("1") > 0, "{runtime}: both queues");
        assert!(
            sample(&text, "corepin_xdp_packets_total{queue=\"0\",verdict=\"not_udp\"}")
                + sample(&text, "corepin_xdp_packets_total{queue=\"1\",verdict=\"not_udp\"}")
                >= 1,
            "the ping passed"
        );
        assert_eq!(sample(&text, "corepin_xsk_frame_mistakes_all_cores_total"), 0);
        assert_eq!(sample(&text, "corepin_ingest_source_info{source=\"af_xdp\",mode=\"native\"}"), 1);
        eprintln!(
            "{runtime}: 3000 datagrams, {bytes} bytes, queue 0: {}, queue 1: {}",
            redirected("0"),
            redirected("1")
        );
        stop(r);
        assert!(!pair.program_attached(), "{runtime}: nothing left on vb after SIGTERM");
        // tcpdump reads what was written (when installed).
        if Command::new("tcpdump").arg("--version").output().is_ok() {
            let mut n = 0;
            for f in std::fs::read_dir(&dir).unwrap() {
                // `-q`: no dissection by port (49152 would print as "BCM-LI-SHIM", not UDP).
                let out = Command::new("tcpdump").args(["-nn", "-q", "-r"]).arg(f.unwrap().path()).output().unwrap();
                assert!(out.status.success(), "tcpdump -r: {}", String::from_utf8_lossy(&out.stderr));
                n += String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("UDP, length")).count();
            }
            assert_eq!(n, 3000, "{runtime}: tcpdump -r reads every datagram");
        } else {
            eprintln!("tcpdump not installed: the pcap files are not read back");
        }

        // SIGKILL: the kernel drops the bpf_link with the process; a restart serves again.
        let mut r = start(&prefix, &args[..args.len() - 4], None);
        assert!(pair.program_attached());
        r.child.kill().unwrap();
        r.child.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while pair.program_attached() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!pair.program_attached(), "{runtime}: nothing left on vb after SIGKILL");
        let r = start(&prefix, &args[..args.len() - 4], None);
        Pair::inside(&pair.a, || send("10.78.0.1", to, 100, 4));
        let m = r.metrics;
        let text = wait_for(&|| Pair::inside(&b, || scrape(m)), "corepin_ingest_datagrams_all_cores_total", 100);
        assert_eq!(sample(&text, "corepin_ingest_datagrams_all_cores_total"), 100, "{runtime}: served after restart");
        stop(r);
        assert!(!pair.program_attached());
    }
}

#[allow(dead_code)]
#[path = "../examples/statsd.rs"]
mod statsd;

/// The statsd example's service, run in-process on every compiled backend over the socket
/// source on loopback: the sums are exactly those of the lines sent, malformed lines aside.
#[test]
fn the_statsd_example_sums_counters_on_every_backend() {
    use std::sync::Arc;
    for kind in corepin::RuntimeKind::compiled() {
        let cfg = corepin::LaunchConfig { cores: corepin::topology::CoreSelection::Count(2), ..Default::default() };
        let cpus = cfg.plan().unwrap();
        let port = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let ingest = corepin_xdp::IngestConfig::new(port);
        let os: Vec<usize> = cpus.iter().map(|c| c.os).collect();
        let prepared = corepin_xdp::ingest::prepare(
            "lo",
            &ingest,
            corepin_xdp::SourceChoice::Socket,
            corepin_xdp::AttachMode::Auto,
            None,
            &os,
        )
        .unwrap();
        let totals = statsd::Totals::default();
        let factory = statsd::StatsdFactory { totals: Arc::clone(&totals) };
        let app = corepin_xdp::Ingest::new(prepared, ingest, cpus.len(), factory).unwrap();
        let shared = Arc::clone(app.shared());
        let server = corepin::start(kind, &cfg, &cpus, Arc::new(app)).unwrap();
        shared.wait_ready(Duration::from_secs(10)).unwrap();
        let tx: Vec<UdpSocket> = (0..8).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
        let mut want = std::collections::HashMap::new();
        for i in 0..500i64 {
            let name = format!("m{}", i % 7);
            let line = format!("{name}:{i}|c\nnot a counter\nhits:1|c");
            tx[i as usize % 8].send_to(line.as_bytes(), ("127.0.0.1", port)).unwrap();
            *want.entry(name).or_insert(0) += i;
            *want.entry("hits".to_string()).or_insert(0) += 1;
            if i % 64 == 63 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while totals.lock().unwrap().get("hits").copied().unwrap_or(0) < 500 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        server.shutdown_handle().drain();
        server.wait().unwrap();
        assert_eq!(*totals.lock().unwrap(), want, "on {kind}");
    }
}
