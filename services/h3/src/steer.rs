//! Keeping every QUIC connection on the core that owns it.
//!
//! A connection's state lives in one core's endpoint, but `SO_REUSEPORT` hashes each datagram's
//! 4-tuple to a socket, and the 4-tuple changes when a client's NAT rebinds or it migrates.
//! So the server's connection IDs name their core, and two things route by them:
//!
//! 1. **A classic BPF program on the reuseport group** ([`attach_cbpf`],
//!    `SO_ATTACH_REUSEPORT_CBPF`, which needs no `CAP_BPF`): the kernel runs it for every
//!    datagram and delivers it to the socket of index `DCID[0] % cores`. Sockets are bound in
//!    core order, so index `i` is core `i`'s.
//! 2. **Forwarding** ([`owner`]): a datagram that still reaches a core whose index its DCID
//!    does not name (no BPF program, or one that could not be attached) is handed to the owner
//!    over corepin's cross-core messaging, with its source and destination address, ECN and
//!    segment size, before this core's endpoint sees it. So no core answers a packet of another
//!    core's connection with a stateless reset, and the owner answers from its own socket.
//!
//! Connection IDs ([`CoreCids`]) are 8 bytes from the system's random source, except that the
//! first byte is `k * cores + core` for a random `k`: routing needs only `byte % cores`, and the
//! byte still looks random. An observer learns which core (log2 of the core count in bits),
//! as with QUIC-LB's plaintext mode, and nothing that links two IDs of one connection beyond
//! that.
//!
//! Which packets name a core:
//! - short header (1-RTT): DCID at offset 1;
//! - long header, Handshake: DCID (length at offset 5) at offset 6; it is the server's ID;
//! - long header, Initial and 0-RTT: the DCID is the client's random choice. The BPF program
//!   still takes `DCID[0] % cores`, a uniform pick, and forwarding leaves them where they
//!   arrive: the core that takes a connection's first Initial owns it and names itself in the
//!   IDs it issues, so everything after follows;
//! - Retry and Version Negotiation never reach a server (a client does not send them).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use corepin_core::worker::CoreCounters;

use quinn_proto::{ConnectionId, ConnectionIdGenerator};

use crate::metrics::H3Metrics;

/// Length of the server's connection IDs.
pub const CID_LEN: usize = 8;

/// The most cores connection IDs can name (the routing byte is `k * cores + core`).
pub const MAX_CORES: usize = 256;

/// How datagrams reach the core that owns their connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Steering {
    /// The BPF program on the reuseport group, and forwarding for what it misses (or alone,
    /// when the program cannot be attached). The default.
    #[default]
    Bpf,
    /// Forwarding only (no BPF program): for kernels or sandboxes without it, and for tests.
    Forward,
    /// Neither: the kernel's 4-tuple hash decides, and a client whose address changes may land
    /// on a core that does not know its connection (which then answers with a stateless
    /// reset). For comparison only.
    Hash,
}

/// What steering is in force once the sockets are bound (for the banner).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SteeringReport {
    /// The BPF program is attached; forwarding catches anything it misses.
    Bpf,
    /// Forwarding alone: asked for, or the BPF program was refused (the reason).
    Forward(Option<String>),
    /// The kernel's hash alone.
    Hash,
    /// One core: nothing to steer.
    OneCore,
}

impl std::fmt::Display for SteeringReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bpf => write!(
                f,
                "connection IDs name their core; a classic BPF program on the reuseport group \
                 (SO_ATTACH_REUSEPORT_CBPF) delivers each datagram to that core's socket, and \
                 cross-core forwarding catches any it misses"
            ),
            Self::Forward(None) => write!(
                f,
                "connection IDs name their core; datagrams reaching another core are forwarded to \
                 the owner (cross-core messaging; no BPF program, as asked)"
            ),
            Self::Forward(Some(why)) => write!(
                f,
                "connection IDs name their core; datagrams reaching another core are forwarded to \
                 the owner (the BPF program was refused: {why})"
            ),
            Self::Hash => write!(
                f,
                "the kernel's reuseport hash only (no connection-ID steering, no forwarding: a \
                 client whose address changes may land on another core)"
            ),
            Self::OneCore => write!(f, "one core: every datagram reaches the owner"),
        }
    }
}

/// Makes a core's connection IDs: random, with the first byte naming the core modulo the core
/// count.
pub struct CoreCids {
    core: u8,
    cores: u16,
    rng: ring::rand::SystemRandom,
    lifetime: Option<Duration>,
    issued: Option<Arc<H3Metrics>>,
}

impl CoreCids {
    /// The generator of core `core` of `cores` (`cores <= MAX_CORES`); its IDs are never
    /// retired.
    pub fn new(core: usize, cores: usize) -> Self {
        assert!((1..=MAX_CORES).contains(&cores) && core < cores, "core {core} of {cores}");
        Self {
            core: core as u8,
            cores: cores as u16,
            rng: ring::rand::SystemRandom::new(),
            lifetime: None,
            issued: None,
        }
    }

    /// Each ID is retired and replaced after `lifetime` (`None`: never).
    pub fn with_lifetime(mut self, lifetime: Option<Duration>) -> Self {
        self.lifetime = lifetime;
        self
    }

    /// Counts each ID made in the core's `cids_issued`.
    pub fn counted(mut self, metrics: Arc<H3Metrics>) -> Self {
        self.issued = Some(metrics);
        self
    }
}

impl ConnectionIdGenerator for CoreCids {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut bytes = [0u8; CID_LEN];
        // The system's random source does not fail on Linux once the pool is seeded (which it
        // is long before a server runs); should it, the bytes stay zero but for the routing
        // byte, which still routes correctly.
        let _ = ring::rand::SecureRandom::fill(&self.rng, &mut bytes);
        let cores = self.cores;
        let spread = MAX_CORES as u16 / cores; // choices of k with k * cores + core < 256
        let k = u16::from(bytes[0]) % spread;
        bytes[0] = (k * cores + u16::from(self.core)) as u8;
        if let Some(m) = &self.issued {
            CoreCounters::add(&m.core(usize::from(self.core)).cids_issued, 1);
        }
        ConnectionId::new(&bytes)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        self.lifetime
    }
}

/// The core a datagram's destination connection ID names, when it names one (short header or
/// Handshake packet with a server-length ID); `None` for Initial and 0-RTT packets (the
/// client's own ID: they stay where they arrive) and for anything too short to tell.
pub fn owner(datagram: &[u8], cores: usize) -> Option<usize> {
    let first = *datagram.first()?;
    let routing = if first & 0x80 == 0 {
        // Short header: flags, then the DCID.
        *datagram.get(1)?
    } else {
        // Long header: flags, version (4), DCID length, DCID. Only Handshake (type 2) carries
        // a server-chosen DCID; version 0 is Version Negotiation.
        let version = datagram.get(1..5)?;
        if version == [0, 0, 0, 0] || (first >> 4) & 0x03 != 2 || *datagram.get(5)? as usize != CID_LEN {
            return None;
        }
        *datagram.get(6)?
    };
    Some(usize::from(routing) % cores)
}

/// The classic BPF program: `A = first byte; A = byte at (A & 0x80 ? 6 : 1); return A % cores`.
/// The socket index it returns is the core (sockets are bound in core order). A load past the
/// end of a short datagram ends the program with 0, which sends it to core 0's socket.
fn program(cores: usize) -> [libc::sock_filter; 6] {
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter { code: code as u16, jt, jf, k };
    [
        // A = payload[0] (the reuseport program sees the UDP payload at offset 0)
        op(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS, 0, 0, 0),
        // long header? then the next instruction, else skip two
        op(libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K, 0, 2, 0x80),
        // long: A = payload[6], the DCID's first byte, then skip the short case
        op(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS, 0, 0, 6),
        op(libc::BPF_JMP | libc::BPF_JA, 0, 0, 1),
        // short: A = payload[1]
        op(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS, 0, 0, 1),
        // A %= cores, and falls into the return below (appended by `attach_cbpf`)
        op(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K, 0, 0, cores as u32),
    ]
}

/// Attaches the steering program to the reuseport group `socket` belongs to (any member will
/// do: the program is the group's).
pub fn attach_cbpf(socket: &impl AsRawFd, cores: usize) -> io::Result<()> {
    let mut code: Vec<libc::sock_filter> = program(cores).to_vec();
    code.push(libc::sock_filter { code: (libc::BPF_RET | libc::BPF_A) as u16, jt: 0, jf: 0, k: 0 });
    corepin_core::udp::attach_reuseport_cbpf(socket, &code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_their_core_and_still_vary() {
        for cores in [1usize, 2, 3, 7, 64, 255, 256] {
            for core in [0, cores / 2, cores - 1] {
                let mut g = CoreCids::new(core, cores);
                let mut firsts = std::collections::HashSet::new();
                for _ in 0..200 {
                    let cid = g.generate_cid();
                    assert_eq!(cid.len(), CID_LEN);
                    assert_eq!(usize::from(cid[0]) % cores, core, "core {core} of {cores}");
                    firsts.insert(cid[0]);
                    // A short-header packet to this ID is routed to its core.
                    let mut pkt = vec![0x40];
                    pkt.extend_from_slice(&cid);
                    pkt.extend_from_slice(&[0; 20]);
                    assert_eq!(owner(&pkt, cores), Some(core));
                    // And so is a Handshake packet.
                    let mut hs = vec![0xe0, 0, 0, 0, 1, CID_LEN as u8];
                    hs.extend_from_slice(&cid);
                    hs.extend_from_slice(&[0; 20]);
                    assert_eq!(owner(&hs, cores), Some(core));
                }
                if cores <= 64 {
                    assert!(firsts.len() > 1, "the routing byte varies ({cores} cores)");
                }
            }
        }
    }

    #[test]
    fn initial_and_odd_packets_name_no_core() {
        let initial = [0xc0, 0, 0, 0, 1, 8, 5, 5, 5, 5, 5, 5, 5, 5];
        assert_eq!(owner(&initial, 2), None, "Initial: the client's ID");
        let zero_rtt = [0xd0, 0, 0, 0, 1, 8, 5, 5, 5, 5, 5, 5, 5, 5];
        assert_eq!(owner(&zero_rtt, 2), None, "0-RTT: the client's ID");
        let vn = [0xe0, 0, 0, 0, 0, 8, 5, 5, 5, 5, 5, 5, 5, 5];
        assert_eq!(owner(&vn, 2), None, "version 0");
        let odd_len = [0xe0, 0, 0, 0, 1, 4, 5, 5, 5, 5];
        assert_eq!(owner(&odd_len, 2), None, "not one of our IDs");
        assert_eq!(owner(&[], 2), None);
        assert_eq!(owner(&[0x40], 2), None);
        assert_eq!(owner(&[0xe0, 0, 0], 2), None);
    }

    /// The program, run by the kernel: datagrams sent to a group of two sockets arrive at the
    /// socket their first DCID byte names, whatever their source port.
    #[test]
    fn the_kernel_delivers_by_the_program() {
        use std::net::UdpSocket;
        let group = corepin_core::udp::reuseport_group("127.0.0.1:0".parse().unwrap(), 2, None).unwrap();
        attach_cbpf(&group[0], 2).unwrap();
        for s in &group {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        }
        let to = group[0].local_addr().unwrap();
        for round in 0..8u8 {
            // A fresh source port each time, so the 4-tuple hash would scatter them.
            let client = UdpSocket::bind("127.0.0.1:0").unwrap();
            for core in 0..2u8 {
                let short = [0x40, core + 2 * round, round, 0, 0, 0, 0, 0, 0];
                client.send_to(&short, to).unwrap();
                let mut buf = [0u8; 64];
                let (n, _) = group[usize::from(core)].recv_from(&mut buf).expect("delivered to the named core");
                assert_eq!(&buf[..n], &short);
                let long = [0xe0, 0, 0, 0, 1, 8, core + 4 * round, 1, 2, 3, 4, 5, 6, 7];
                client.send_to(&long, to).unwrap();
                let (n, _) = group[usize::from(core)].recv_from(&mut buf).expect("delivered to the named core");
                assert_eq!(&buf[..n], &long);
            }
        }
    }
}
