//! The portable source: one `SO_REUSEPORT` UDP socket per worker, steered so that each
//! datagram lands on the socket of the worker pinned to the CPU that took its softirq, and
//! received in batches with non-blocking `recvmmsg(2)`, destination address included. Owns the
//! sockets' setup, the steering program and the batch buffers; knows no runtime (the worker
//! waits for readiness itself).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};

use corepin_core::udp::{decode_recv, recv_msghdr, ControlBuf, RecvMeta, RecvTruncated, RECV_FLAGS};

/// Classic BPF ancillary loads start here (`SKF_AD_OFF`, linux/filter.h) ...
const SKF_AD_OFF: i32 = -0x1000;
/// ... and the current CPU is at this offset from it (`SKF_AD_CPU`).
const SKF_AD_CPU: i32 = 36;

/// The reuseport program: `A = current CPU; return the index of the worker on that CPU`, or,
/// for a CPU without a worker, `A % workers` (an index the group has, so no datagram falls
/// back to the hash). `cpus[i]` is worker `i`'s CPU; sockets are created in worker order, so
/// index `i` is worker `i`'s socket.
pub fn steering_program(cpus: &[usize]) -> Vec<libc::sock_filter> {
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter { code: code as u16, jt, jf, k };
    let mut code = vec![op(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, (SKF_AD_OFF + SKF_AD_CPU) as u32)];
    for (index, &cpu) in cpus.iter().enumerate() {
        // A == cpu: fall into the `ret index` below; otherwise skip it.
        code.push(op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, 0, 1, cpu as u32));
        code.push(op(libc::BPF_RET | libc::BPF_K, 0, 0, index as u32));
    }
    code.push(op(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K, 0, 0, cpus.len().max(1) as u32));
    code.push(op(libc::BPF_RET | libc::BPF_A, 0, 0, 0));
    code
}

/// Attaches [`steering_program`] to the reuseport group of `socket`.
pub fn attach_steering(socket: &impl AsRawFd, cpus: &[usize]) -> io::Result<()> {
    corepin_core::udp::attach_reuseport_cbpf(socket, &steering_program(cpus))
}

/// How datagrams reach the workers' sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketSteering {
    /// The CPU program is attached.
    Cpu,
    /// The kernel's 4-tuple hash, because the program was refused (the reason).
    Hash(String),
    /// One worker: nothing to steer.
    OneWorker,
}

impl std::fmt::Display for SocketSteering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SocketSteering::Cpu => write!(
                f,
                "SO_ATTACH_REUSEPORT_CBPF: each datagram goes to the socket of the worker on the CPU that took it"
            ),
            SocketSteering::Hash(why) => write!(f, "the kernel's reuseport hash (the CPU program was refused: {why})"),
            SocketSteering::OneWorker => write!(f, "one worker: nothing to steer"),
        }
    }
}

/// Binds one socket per worker on `addr` (worker order; an IPv6 `addr` is dual-stack, so IPv4
/// peers come as v4-mapped addresses), each bound to `device` when given (`SO_BINDTODEVICE`),
/// with destination addresses reported (`IP_PKTINFO`/`IPV6_RECVPKTINFO`), a receive buffer of
/// `buffer` bytes when given (forced past `rmem_max` where the process may), and the CPU
/// steering program.
pub fn bind_group(
    addr: SocketAddr,
    device: Option<&str>,
    cpus: &[usize],
    buffer: Option<usize>,
) -> io::Result<(Vec<UdpSocket>, SocketSteering)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut sockets: Vec<UdpSocket> = Vec::with_capacity(cpus.len());
    let mut bind_addr = addr;
    for _ in 0..cpus.len().max(1) {
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM.nonblocking().cloexec(), Some(Protocol::UDP))?;
        s.set_reuse_port(true)?;
        if addr.is_ipv6() {
            s.set_only_v6(false)?;
        }
        if let Some(dev) = device {
            s.bind_device(Some(dev.as_bytes()))?;
        }
        if let Some(bytes) = buffer {
            let _ = s.set_recv_buffer_size(bytes);
            force_recv_buffer(s.as_raw_fd(), bytes);
        }
        s.bind(&bind_addr.into())?;
        let socket: UdpSocket = s.into();
        if bind_addr.port() == 0 {
            bind_addr = socket.local_addr()?;
        }
        corepin_core::udp::enable_cmsgs_with(socket.as_raw_fd(), false)?;
        sockets.push(socket);
    }
    // As every corepin listener: a port another process already has is refused, not shared.
    corepin_core::udp::refuse_shared_port(addr, &sockets)
        .map_err(|e| io::Error::new(io::ErrorKind::AddrInUse, e.to_string()))?;
    let steering = if cpus.len() <= 1 {
        SocketSteering::OneWorker
    } else {
        match attach_steering(&sockets[0], cpus) {
            Ok(()) => SocketSteering::Cpu,
            Err(e) => SocketSteering::Hash(e.to_string()),
        }
    };
    Ok((sockets, steering))
}

fn force_recv_buffer(fd: RawFd, bytes: usize) {
    let val = libc::c_int::try_from(bytes / 2).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt reads one c_int from `val`, a live local; failure (no CAP_NET_ADMIN)
    // leaves the socket as it was.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// One received datagram of a batch.
#[derive(Debug, Clone, Copy)]
pub enum Slot {
    /// A whole datagram: its metadata (payload length, source, destination IP).
    Whole(RecvMeta),
    /// A datagram longer than the slot (or whose control data did not fit): dropped.
    Truncated(RecvTruncated),
}

/// Receive buffers for batches of `recvmmsg(2)`: one data slot, address and control buffer
/// per datagram. The headers are rebuilt before each call, pointing into these buffers, which
/// never move once made.
pub struct Batch {
    data: Vec<u8>,
    slot: usize,
    names: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    controls: Vec<ControlBuf>,
    hdrs: Vec<libc::mmsghdr>,
    results: Vec<Slot>,
}

impl Batch {
    /// Buffers for `count` datagrams of up to `slot` bytes each.
    pub fn new(count: usize, slot: usize) -> Self {
        let count = count.max(1);
        // SAFETY: sockaddr_storage and mmsghdr are integers and pointers; all-zero is valid.
        let name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let hdr: libc::mmsghdr = unsafe { std::mem::zeroed() };
        Self {
            data: vec![0; count * slot],
            slot,
            names: vec![name; count],
            iovs: vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; count],
            controls: vec![ControlBuf::new(); count],
            hdrs: vec![hdr; count],
            results: Vec::with_capacity(count),
        }
    }

    /// Datagrams per batch.
    pub fn capacity(&self) -> usize {
        self.hdrs.len()
    }

    /// Receives what is queued on `fd`, up to a batch (`recvmmsg` with `MSG_DONTWAIT`),
    /// retrying `EINTR`. `Ok(0)` means nothing is queued: wait for readability.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.results.clear();
        let n = self.hdrs.len();
        for i in 0..n {
            self.iovs[i] = libc::iovec { iov_base: self.data[i * self.slot..].as_mut_ptr().cast(), iov_len: self.slot };
            let hdr = recv_msghdr(&mut self.names[i], &mut self.iovs[i], &mut self.controls[i]);
            self.hdrs[i] = libc::mmsghdr { msg_hdr: hdr, msg_len: 0 };
        }
        let got = loop {
            // SAFETY: every header points at this batch's own name, iovec (a `slot`-byte piece
            // of `data`) and control buffer, all alive and unmoved for the call; `n` is the
            // number of headers.
            let rc = unsafe {
                libc::recvmmsg(
                    fd,
                    self.hdrs.as_mut_ptr(),
                    n as libc::c_uint,
                    libc::MSG_DONTWAIT | RECV_FLAGS,
                    std::ptr::null_mut(),
                )
            };
            if rc >= 0 {
                break rc as usize;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(0),
                _ => return Err(e),
            }
        };
        for i in 0..got {
            let h = &self.hdrs[i];
            // SAFETY: the kernel filled this header, whose parts are this batch's own live
            // buffers of the lengths it names.
            match unsafe { decode_recv(&h.msg_hdr, h.msg_len as usize) } {
                Ok(meta) => self.results.push(Slot::Whole(meta)),
                Err(e) => match RecvTruncated::from_io_error(&e) {
                    Some(t) => self.results.push(Slot::Truncated(*t)),
                    None => return Err(e),
                },
            }
        }
        Ok(got)
    }

    /// The `i`-th datagram of the last batch and its bytes (the whole slot for a truncated one
    /// holds only its first bytes).
    pub fn get(&self, i: usize) -> (Slot, &[u8]) {
        let slot = self.results[i];
        let len = match slot {
            Slot::Whole(m) => m.len,
            Slot::Truncated(t) => t.meta.len,
        };
        (slot, &self.data[i * self.slot..i * self.slot + len.min(self.slot)])
    }

    /// Datagrams in the last batch.
    pub fn len(&self) -> usize {
        self.results.len()
    }

    /// Whether the last batch was empty.
    pub fn is_empty(&self) -> bool {
        self.results.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_batch_receives_every_queued_datagram_with_its_destination() {
        let (sockets, steering) = bind_group("127.0.0.1:0".parse().unwrap(), None, &[0], Some(1 << 20)).unwrap();
        assert_eq!(steering, SocketSteering::OneWorker);
        let to = sockets[0].local_addr().unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..40u8 {
            tx.send_to(&vec![i; usize::from(i) * 10], to).unwrap();
        }
        tx.send_to(&[0xaa; 3000], to).unwrap();
        let mut batch = Batch::new(16, 2048);
        let mut seen = Vec::new();
        let mut truncated = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while seen.len() + truncated < 41 && std::time::Instant::now() < deadline {
            let n = batch.recv(sockets[0].as_raw_fd()).unwrap();
            assert!(n <= 16);
            for i in 0..n {
                match batch.get(i) {
                    (Slot::Whole(meta), bytes) => {
                        assert_eq!(meta.from, tx.local_addr().unwrap());
                        assert_eq!(meta.dst_ip, Some(to.ip()), "IP_PKTINFO gives the destination");
                        seen.push(bytes.to_vec());
                    }
                    (Slot::Truncated(t), _) => {
                        assert_eq!(t.datagram_len, 3000);
                        truncated += 1;
                    }
                }
            }
        }
        assert_eq!(truncated, 1, "the datagram longer than a slot");
        assert_eq!(seen.len(), 40);
        for (i, d) in seen.iter().enumerate() {
            assert_eq!(d, &vec![i as u8; i * 10], "datagram {i} in order and whole");
        }
        assert_eq!(batch.recv(sockets[0].as_raw_fd()).unwrap(), 0, "nothing left: Ok(0)");
    }

    /// The program, run by the kernel: a sender pinned to a CPU has its datagrams handled on
    /// that CPU (loopback takes the softirq where the sender runs), so they all reach the socket
    /// of the worker the program maps that CPU to, whatever their source port.
    #[test]
    fn the_kernel_delivers_to_the_socket_of_the_senders_cpu() {
        let cpus = corepin_core::topology::Topology::discover()
            .select(&corepin_core::topology::CoreSelection::All)
            .unwrap()
            .iter()
            .map(|c| c.os)
            .collect::<Vec<_>>();
        if cpus.len() < 2 {
            eprintln!("skipped: one CPU, nothing to steer");
            return;
        }
        // Workers in reverse CPU order, so the index differs from the CPU number.
        let workers: Vec<usize> = cpus.iter().rev().copied().collect();
        let (sockets, steering) = bind_group("127.0.0.1:0".parse().unwrap(), None, &workers, Some(1 << 20)).unwrap();
        assert_eq!(steering, SocketSteering::Cpu);
        let to = sockets[0].local_addr().unwrap();
        for (index, &cpu) in workers.iter().enumerate() {
            std::thread::spawn(move || {
                assert!(corepin_core::topology::pin_current_thread(cpu));
                for _ in 0..20 {
                    UdpSocket::bind("127.0.0.1:0").unwrap().send_to(&[cpu as u8], to).unwrap();
                }
            })
            .join()
            .unwrap();
            let mut batch = Batch::new(64, 64);
            let mut got = 0;
            for _ in 0..100 {
                got += batch.recv(sockets[index].as_raw_fd()).unwrap();
                if got == 20 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(got, 20, "all of CPU {cpu}'s datagrams on worker {index}'s socket");
            for (other, s) in sockets.iter().enumerate().filter(|(i, _)| *i != index) {
                assert_eq!(batch.recv(s.as_raw_fd()).unwrap(), 0, "none on worker {other}'s socket");
            }
        }
    }
}
