//! The XDP program on a real interface: a veth pair between two network namespaces that the
//! test creates and removes (root only; otherwise it skips, saying why). UDP to the port with
//! no AF_XDP socket, UDP to other ports, IPv4 fragments, IPv6, TCP and ARP all reach the
//! kernel's sockets, every packet counted under its verdict, in native and in generic mode;
//! after detaching, nothing is left on the interface.

use std::fs::File;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use corepin_xdp::{AttachMode, Attached, IngestProgram, QueueCounters, Verdict};

const PORT: u16 = 47_000;
const OTHER: u16 = 47_001;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("the `ip` command (iproute2)");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Two namespaces joined by a veth pair (`va` in `a`, 10.77.0.1 and fd77::1; `vb` in `b`,
/// 10.77.0.2 and fd77::2), removed on drop.
struct Pair {
    a: String,
    b: String,
}

impl Pair {
    fn new() -> Pair {
        static N: AtomicU32 = AtomicU32::new(0);
        let id = format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let pair = Pair { a: format!("cpxdp-a-{id}"), b: format!("cpxdp-b-{id}") };
        ip(&["netns", "add", &pair.a]);
        ip(&["netns", "add", &pair.b]);
        ip(&["-n", &pair.a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", &pair.b]);
        for (ns, dev, v4, v6) in
            [(&pair.a, "va", "10.77.0.1/24", "fd77::1/64"), (&pair.b, "vb", "10.77.0.2/24", "fd77::2/64")]
        {
            ip(&["-n", ns, "addr", "add", v4, "dev", dev]);
            ip(&["-n", ns, "addr", "add", v6, "dev", dev, "nodad"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }

    /// Runs `f` on a thread that has entered namespace `ns`.
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

fn sum(counters: &[QueueCounters]) -> QueueCounters {
    let mut t = QueueCounters::default();
    for c in counters {
        for (a, b) in t.0.iter_mut().zip(c.0) {
            *a += b;
        }
    }
    t
}

fn receive_all(sock: &UdpSocket, n: usize, len: usize) {
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; 65536];
    for i in 0..n {
        let (got, _) = sock.recv_from(&mut buf).unwrap_or_else(|e| panic!("datagram {i} of {n} did not arrive: {e}"));
        assert_eq!(got, len);
    }
}

fn exercise(mode: AttachMode, expect: Attached) {
    let pair = Pair::new();
    let program = Pair::inside(&pair.b, || IngestProgram::attach("vb", PORT, mode)).expect("attach");
    assert_eq!(program.attached(), expect);
    let shown = Command::new("ip").args(["-n", &pair.b, "link", "show", "vb"]).output().unwrap();
    assert!(String::from_utf8_lossy(&shown.stdout).contains("prog/xdp"), "ip link shows the program");
    // The kernel's sockets on B: the port (no AF_XDP socket: everything passes) and another.
    let (ours, other, ours6) = Pair::inside(&pair.b, || {
        (
            UdpSocket::bind(("10.77.0.2", PORT)).unwrap(),
            UdpSocket::bind(("10.77.0.2", OTHER)).unwrap(),
            UdpSocket::bind(("fd77::2", PORT)).unwrap(),
        )
    });
    Pair::inside(&pair.a, || {
        let tx = UdpSocket::bind("10.77.0.1:0").unwrap();
        for _ in 0..20 {
            tx.send_to(&[7u8; 100], ("10.77.0.2", PORT)).unwrap();
        }
        for _ in 0..10 {
            tx.send_to(&[8u8; 100], ("10.77.0.2", OTHER)).unwrap();
        }
        // 4,000 bytes over a 1,500-byte MTU: three IPv4 fragments, reassembled by the kernel.
        tx.send_to(&[9u8; 4000], ("10.77.0.2", PORT)).unwrap();
        let tx6 = UdpSocket::bind("[fd77::1]:0").unwrap();
        for _ in 0..5 {
            tx6.send_to(&[6u8; 100], SocketAddr::from((std::net::Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2), PORT)))
                .unwrap();
        }
        // TCP to a closed port: the SYN is counted and passed; the kernel answers with a reset.
        let refused = TcpStream::connect_timeout(&"10.77.0.2:9".parse().unwrap(), Duration::from_secs(5));
        assert!(refused.is_err(), "nothing listens on port 9");
    });
    receive_all(&ours, 20, 100);
    receive_all(&ours, 1, 4000);
    receive_all(&other, 10, 100);
    receive_all(&ours6, 5, 100);
    let c = sum(&program.counters(1).unwrap());
    let show = format!("{:?}", Verdict::ALL.iter().map(|v| (v.name(), c.get(*v))).collect::<Vec<_>>());
    assert_eq!(c.get(Verdict::Redirected), 0, "no socket, so nothing redirected: {show}");
    assert_eq!(c.get(Verdict::NoSocket), 20 + 5, "the port's unfragmented datagrams, v4 and v6: {show}");
    assert_eq!(c.get(Verdict::OtherPort), 10, "{show}");
    assert_eq!(c.get(Verdict::Fragment), 3, "{show}");
    assert!(c.get(Verdict::NotIp) >= 1, "ARP: {show}");
    assert!(c.get(Verdict::NotUdp) >= 1, "the TCP SYN, ICMPv6: {show}");
    assert_eq!(c.get(Verdict::Malformed), 0, "{show}");
    program.detach().unwrap();
    let shown = Command::new("ip").args(["-n", &pair.b, "link", "show", "vb"]).output().unwrap();
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(!text.contains("prog/xdp"), "detached: nothing left on vb:\n{text}");
}

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        eprintln!("skipped: XDP and network namespaces need root (euid {euid})");
    }
    euid == 0
}

#[test]
fn native_mode_passes_everything_not_taken_and_counts_it() {
    if root() {
        exercise(AttachMode::Auto, Attached::Native);
    }
}

#[test]
fn generic_mode_passes_everything_not_taken_and_counts_it() {
    if root() {
        exercise(AttachMode::Generic, Attached::Generic);
    }
}

/// The id of the XDP program `ip link` shows on `dev` in `ns`.
fn shown_id(ns: &str, dev: &str) -> Option<u32> {
    let shown = Command::new("ip").args(["-n", ns, "link", "show", dev]).output().unwrap();
    let text = String::from_utf8_lossy(&shown.stdout).to_string();
    text.split("prog/xdp id ").nth(1).and_then(|r| r.split_whitespace().next()).map(|id| id.parse().unwrap())
}

/// A program of ours left on the interface through netlink (as a loader without bpf_links, or
/// `ip link set ... xdp obj`, leaves it) is replaced on attach, saying which; while ours is
/// held by a live bpf_link, a second attach is refused with the reason and changes nothing.
#[test]
fn a_program_left_through_netlink_is_replaced_and_a_live_one_is_not() {
    if !root() {
        return;
    }
    let pair = Pair::new();
    let object = concat!(env!("OUT_DIR"), "/ingest.o");
    ip(&["-n", &pair.b, "link", "set", "dev", "vb", "xdpgeneric", "obj", object, "sec", "xdp"]);
    let left = shown_id(&pair.b, "vb").expect("the leftover is attached");
    let program = Pair::inside(&pair.b, || IngestProgram::attach("vb", PORT, AttachMode::Auto)).expect("attach");
    assert_eq!(program.replaced(), Some(left), "the leftover named as replaced");
    assert_eq!(program.attached(), Attached::Native, "native is free once the generic leftover is gone");
    let ours = shown_id(&pair.b, "vb").expect("ours is attached");
    assert_ne!(ours, left);
    let second = Pair::inside(&pair.b, || IngestProgram::attach("vb", PORT, AttachMode::Auto));
    match second {
        Err(e @ corepin_xdp::XdpError::Occupied { held: true, .. }) => eprintln!("second attach: {e}"),
        other => panic!("a second attach must be refused as held by a bpf_link: {other:?}"),
    }
    assert_eq!(shown_id(&pair.b, "vb"), Some(ours), "the live program is untouched");
    program.detach().unwrap();
    assert_eq!(shown_id(&pair.b, "vb"), None, "nothing left after detach");
}
