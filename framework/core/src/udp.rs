//! UDP control messages: the `sendmsg(2)`/`recvmsg(2)` codec for ECN, GSO/GRO and packet info,
//! written once so the readiness path (the non-blocking calls here) and native io_uring
//! `SENDMSG`/`RECVMSG` ops share one `msghdr` + control-buffer layout and one decoder.

use std::fmt;
use std::io;
use std::mem::{self, size_of};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;
use std::ptr;

use libc::{c_int, c_uint, c_void};

use crate::buf::{IoBuf, IoBufMut};

// libc names these for Linux (glibc and musl); the uapi values are SOL_UDP = 17 (= IPPROTO_UDP),
// UDP_SEGMENT = 103 (linux/udp.h, since 4.18) and UDP_GRO = 104 (since 5.0).
const SOL_UDP: c_int = libc::SOL_UDP;
const UDP_SEGMENT: c_int = libc::UDP_SEGMENT;
const UDP_GRO: c_int = libc::UDP_GRO;

/// Flags a receive should always pass: `MSG_TRUNC` makes a UDP `recvmsg` return the datagram's
/// full length even when it did not fit, so a truncation can name its size. A native
/// `RECVMSG` op should pass them too; the non-blocking path here adds `MSG_DONTWAIT`.
pub const RECV_FLAGS: c_int = libc::MSG_TRUNC;

/// Flags a send should always pass (`MSG_NOSIGNAL`; harmless for UDP, kept for symmetry with
/// stream sockets). The non-blocking path here adds `MSG_DONTWAIT`.
pub const SEND_FLAGS: c_int = libc::MSG_NOSIGNAL;

/// ECN codepoint (RFC 3168): the two low bits of the IPv4 TOS / IPv6 traffic class byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Ecn {
    /// Not ECN-capable transport (`0b00`).
    NotEct = 0b00,
    /// ECN-capable transport, codepoint 1 (`0b01`; L4S).
    Ect1 = 0b01,
    /// ECN-capable transport, codepoint 0 (`0b10`).
    Ect0 = 0b10,
    /// Congestion experienced (`0b11`).
    Ce = 0b11,
}

impl Ecn {
    /// The codepoint in the two low bits of `bits` (a whole TOS / traffic class byte is fine;
    /// the DSCP bits are ignored).
    pub const fn from_bits(bits: u8) -> Ecn {
        match bits & 0b11 {
            0b00 => Ecn::NotEct,
            0b01 => Ecn::Ect1,
            0b10 => Ecn::Ect0,
            _ => Ecn::Ce,
        }
    }

    /// The codepoint as the two low bits of a byte.
    pub const fn to_bits(self) -> u8 {
        self as u8
    }
}

/// What goes with a datagram being sent.
///
/// `to` must be in the socket's family: on a dual-stack IPv6 socket give an IPv4 peer as a
/// v4-mapped `SocketAddr::V6` (`::ffff:a.b.c.d`), which is also how such a socket reports it
/// in [`RecvMeta::from`]. For a v4 or v4-mapped `to` the IPv4-level cmsgs (`IP_TOS`,
/// `IP_PKTINFO`) are sent, which is what the kernel reads on that path; otherwise the IPv6 ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendMeta {
    /// Destination.
    pub to: SocketAddr,
    /// ECN codepoint to send with (`IP_TOS` / `IPV6_TCLASS`). The whole TOS / traffic class
    /// byte is set, so its DSCP bits are 0; `None` sends no cmsg and keeps the socket's own.
    pub ecn: Option<Ecn>,
    /// `UDP_SEGMENT` (GSO): the buffer is several datagrams of this size, the last may be
    /// shorter. Check [`UdpFeatures::gso`] first. `Some(0)` is passed through and tells the
    /// kernel "no segmentation" even when the socket has a `UDP_SEGMENT` default.
    pub segment_size: Option<u16>,
    /// Source address (`IP_PKTINFO` `ipi_spec_dst` / `IPV6_PKTINFO` `ipi6_addr`); it must be
    /// local, and in `to`'s family (a v4-mapped address counts as IPv4 and vice versa).
    /// Echoing [`RecvMeta::dst_ip`] here answers from the address a request was sent to.
    pub src_ip: Option<IpAddr>,
}

impl SendMeta {
    /// A plain datagram to `to`: no ECN, no segmentation, kernel-chosen source.
    pub const fn new(to: SocketAddr) -> Self {
        SendMeta { to, ecn: None, segment_size: None, src_ip: None }
    }
}

/// What came with a received datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvMeta {
    /// Bytes written into the buffer, from its start.
    pub len: usize,
    /// Source, as the kernel gives it: a dual-stack IPv6 socket reports IPv4 peers as v4-mapped
    /// `SocketAddr::V6` (call `ip().to_canonical()` for display), which is also the form a
    /// reply through that socket needs.
    pub from: SocketAddr,
    /// ECN codepoint of the datagram, `None` when the socket does not report it (see
    /// [`enable_cmsgs`]).
    pub ecn: Option<Ecn>,
    /// `UDP_GRO` segment size: the buffer holds `len / stride` datagrams of `stride` bytes and
    /// a shorter last one (see [`RecvMeta::segments`]). Equals `len` when not coalesced (so it
    /// is 0 only for an empty datagram).
    pub stride: usize,
    /// The datagram's destination address (`IP_PKTINFO` `ipi_addr` / `IPV6_PKTINFO`
    /// `ipi6_addr`), `None` when the socket does not report it. Given in the family of
    /// [`from`](RecvMeta::from), v4-mapped when `from` is.
    pub dst_ip: Option<IpAddr>,
}

impl RecvMeta {
    /// The datagrams in `data` (the received buffer): `stride`-sized pieces of its first `len`
    /// bytes, the last possibly shorter. An empty datagram yields one empty slice.
    pub fn segments<'a>(&self, data: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        let data = &data[..self.len.min(data.len())];
        let stride = if self.stride == 0 { data.len().max(1) } else { self.stride };
        let empty = data.is_empty().then_some(data);
        data.chunks(stride).chain(empty)
    }
}

/// The payload of the [`io::ErrorKind::InvalidData`] error a receive returns when the datagram
/// or its control data did not fit. The datagram is consumed; the buffer holds its first
/// `meta.len` bytes (marked initialised). Get it with [`RecvTruncated::from_io_error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvTruncated {
    /// What was received, as far as it fitted.
    pub meta: RecvMeta,
    /// The datagram's length as the receive returned it: the full length when the receive
    /// passed [`RECV_FLAGS`] (the non-blocking path does), else the copied length.
    pub datagram_len: usize,
    /// The datagram was longer than the buffer (`MSG_TRUNC`).
    pub data_truncated: bool,
    /// Some control message did not fit (`MSG_CTRUNC`); `meta`'s `ecn`, `dst_ip` and `stride`
    /// may be missing, so `stride` cannot be trusted to split a coalesced read.
    pub control_truncated: bool,
}

impl RecvTruncated {
    /// The truncation report inside `err`, if that is what `err` is.
    pub fn from_io_error(err: &io::Error) -> Option<&RecvTruncated> {
        err.get_ref()?.downcast_ref()
    }
}

impl fmt::Display for RecvTruncated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.data_truncated {
            write!(
                f,
                "UDP datagram from {} truncated: {} bytes into a {}-byte buffer",
                self.meta.from, self.datagram_len, self.meta.len
            )?;
        }
        if self.control_truncated {
            let sep = if self.data_truncated { "; " } else { "" };
            write!(f, "{sep}UDP control data from {} truncated, metadata incomplete", self.meta.from)?;
        }
        Ok(())
    }
}

impl std::error::Error for RecvTruncated {}

/// What a socket was set up to report/accept, found by [`enable_cmsgs`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UdpFeatures {
    /// `UDP_GRO` is on: reads may be coalesced (see [`RecvMeta::stride`]); receive buffers must
    /// then be 64 KiB or a coalesced read is truncated and lost.
    pub gro: bool,
    /// The kernel knows `UDP_SEGMENT`, so [`SendMeta::segment_size`] can be used.
    pub gso: bool,
    /// Destination addresses are reported ([`RecvMeta::dst_ip`]).
    pub pktinfo: bool,
    /// ECN codepoints are reported ([`RecvMeta::ecn`]); on a dual-stack IPv6 socket, for IPv4
    /// peers as well.
    pub ecn: bool,
}

/// Turns on everything corepin's UDP codec uses, `UDP_GRO` included: see
/// [`enable_cmsgs_with`].
pub fn enable_cmsgs(fd: RawFd) -> io::Result<UdpFeatures> {
    enable_cmsgs_with(fd, true)
}

/// Asks the kernel to report destination addresses and ECN on `fd`, a UDP socket:
/// `IP_PKTINFO` + `IP_RECVTOS` on IPv4; `IPV6_RECVPKTINFO` + `IPV6_RECVTCLASS` on IPv6, plus the
/// IPv4 pair on a dual-stack IPv6 socket (its IPv4 peers' TOS only comes that way). Sets
/// `UDP_GRO` to `gro` (off when false, so the report is true either way) and probes GSO with
/// `getsockopt(UDP_SEGMENT)`. An option the kernel refuses is recorded as false, not an error;
/// the error cases are a descriptor that is not a datagram socket of family IPv4 or IPv6.
pub fn enable_cmsgs_with(fd: RawFd, gro: bool) -> io::Result<UdpFeatures> {
    let domain = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)?;
    let ty = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE)?;
    if ty != libc::SOCK_DGRAM {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "enable_cmsgs: not a datagram socket"));
    }
    let on = |level, name| setsockopt_int(fd, level, name, 1).is_ok();
    let (pktinfo, ecn) = match domain {
        libc::AF_INET => (on(libc::IPPROTO_IP, libc::IP_PKTINFO), on(libc::IPPROTO_IP, libc::IP_RECVTOS)),
        libc::AF_INET6 => {
            let pktinfo = on(libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO);
            let tclass = on(libc::IPPROTO_IPV6, libc::IPV6_RECVTCLASS);
            let v6only = getsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY).is_ok_and(|v| v != 0);
            // IPv4 peers of a dual-stack socket: their destination also comes as a v4-mapped
            // IPV6_PKTINFO, but their TOS only through the IPv4-level option.
            let tos = v6only || {
                on(libc::IPPROTO_IP, libc::IP_PKTINFO);
                on(libc::IPPROTO_IP, libc::IP_RECVTOS)
            };
            (pktinfo, tclass && tos)
        }
        _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, "enable_cmsgs: not an IPv4 or IPv6 socket")),
    };
    let gso = getsockopt_int(fd, SOL_UDP, UDP_SEGMENT).is_ok();
    let gro = setsockopt_int(fd, SOL_UDP, UDP_GRO, c_int::from(gro)).is_ok() && gro;
    Ok(UdpFeatures { gro, gso, pktinfo, ecn })
}

fn getsockopt_int(fd: RawFd, level: c_int, name: c_int) -> io::Result<c_int> {
    let mut val: c_int = 0;
    let mut len = size_of::<c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` (= size of `val`) bytes into `val` and the
    // actual size into `len`, both live locals.
    let rc = unsafe { libc::getsockopt(fd, level, name, (&mut val as *mut c_int).cast(), &mut len) };
    if rc == 0 {
        Ok(val)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn setsockopt_int(fd: RawFd, level: c_int, name: c_int, val: c_int) -> io::Result<()> {
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `val`, a live local.
    let rc = unsafe {
        libc::setsockopt(fd, level, name, (&val as *const c_int).cast(), size_of::<c_int>() as libc::socklen_t)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

// ---- control buffer ----------------------------------------------------------------------

const fn cmsg_space(data_len: usize) -> usize {
    // SAFETY: CMSG_SPACE is arithmetic on its argument; it touches no memory.
    unsafe { libc::CMSG_SPACE(data_len as c_uint) as usize }
}

const fn cmsg_len(data_len: usize) -> usize {
    // SAFETY: CMSG_LEN is arithmetic on its argument; it touches no memory.
    unsafe { libc::CMSG_LEN(data_len as c_uint) as usize }
}

/// Everything a receive can carry at once: a dual-stack socket's IPv4 peer brings `IP_TOS` (one
/// byte), `IP_PKTINFO` and a v4-mapped `IPV6_PKTINFO`; an IPv6 peer `IPV6_TCLASS` and
/// `IPV6_PKTINFO`; either may add `UDP_GRO`.
const RECV_CONTROL_LEN: usize = cmsg_space(1)
    + cmsg_space(size_of::<libc::in_pktinfo>())
    + cmsg_space(size_of::<c_int>())
    + cmsg_space(size_of::<libc::in6_pktinfo>())
    + cmsg_space(size_of::<c_int>());

/// A send carries at most a TOS/TCLASS int, one pktinfo and `UDP_SEGMENT`.
const SEND_CONTROL_LEN: usize =
    cmsg_space(size_of::<c_int>()) + cmsg_space(size_of::<libc::in6_pktinfo>()) + cmsg_space(size_of::<u16>());

/// Room for a cmsg or two that something else enabled on the socket (a timestamp), so that
/// does not turn every read into `MSG_CTRUNC`.
const CONTROL_SLACK: usize = 64;

/// Size of a [`ControlBuf`].
pub const CONTROL_LEN: usize =
    if RECV_CONTROL_LEN > SEND_CONTROL_LEN { RECV_CONTROL_LEN } else { SEND_CONTROL_LEN } + CONTROL_SLACK;

/// A control buffer sized for every cmsg corepin sends or receives, aligned for `cmsghdr`.
#[derive(Clone)]
#[repr(C, align(8))]
pub struct ControlBuf {
    bytes: [u8; CONTROL_LEN],
}

const _: () = assert!(mem::align_of::<ControlBuf>() >= mem::align_of::<libc::cmsghdr>());

impl ControlBuf {
    /// A zeroed buffer.
    pub const fn new() -> Self {
        ControlBuf { bytes: [0; CONTROL_LEN] }
    }

    /// Start of the buffer, for `msg_control`.
    pub fn as_mut_ptr(&mut self) -> *mut c_void {
        self.bytes.as_mut_ptr().cast()
    }

    /// Its size, for `msg_controllen`.
    pub const fn capacity(&self) -> usize {
        CONTROL_LEN
    }
}

impl Default for ControlBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ControlBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlBuf").field("capacity", &CONTROL_LEN).finish_non_exhaustive()
    }
}

/// Appends cmsgs to a [`ControlBuf`], each at a `CMSG_SPACE` step from the last.
struct CmsgWriter<'a> {
    buf: &'a mut ControlBuf,
    used: usize,
}

impl<'a> CmsgWriter<'a> {
    fn new(buf: &'a mut ControlBuf) -> Self {
        buf.bytes.fill(0);
        CmsgWriter { buf, used: 0 }
    }

    fn push<T: Copy>(&mut self, level: c_int, ty: c_int, value: T) -> io::Result<()> {
        let space = cmsg_space(size_of::<T>());
        if CONTROL_LEN - self.used < space {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "UDP control buffer full"));
        }
        // SAFETY: `used` is a sum of CMSG_SPACE values (multiples of the cmsghdr alignment)
        // from the 8-aligned start of the buffer, so `cmsg` is aligned for cmsghdr; the check
        // above keeps all `space` bytes from it, header and the data at CMSG_DATA, inside the
        // buffer. The all-zero cmsghdr is a valid value (integers only).
        unsafe {
            let cmsg = self.buf.bytes.as_mut_ptr().add(self.used).cast::<libc::cmsghdr>();
            let mut hdr: libc::cmsghdr = mem::zeroed();
            hdr.cmsg_len = cmsg_len(size_of::<T>()) as _;
            hdr.cmsg_level = level;
            hdr.cmsg_type = ty;
            ptr::write_unaligned(cmsg, hdr);
            ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<T>(), value);
        }
        self.used += space;
        Ok(())
    }
}

// ---- addresses ---------------------------------------------------------------------------

fn zeroed_storage() -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain integers and bytes; all-zero is a valid value.
    unsafe { mem::zeroed() }
}

/// Writes `addr` into `storage` as a `sockaddr_in`/`sockaddr_in6`; returns its length.
fn encode_addr(addr: &SocketAddr, storage: &mut libc::sockaddr_storage) -> libc::socklen_t {
    *storage = zeroed_storage();
    let base = (storage as *mut libc::sockaddr_storage).cast::<u8>();
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: all-zero is a valid sockaddr_in (integers and bytes).
            let mut sin: libc::sockaddr_in = unsafe { mem::zeroed() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            // SAFETY: sockaddr_storage is by definition large enough for any sockaddr and is
            // exclusively borrowed; the write is unaligned-tolerant anyway.
            unsafe { ptr::write_unaligned(base.cast::<libc::sockaddr_in>(), sin) };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: all-zero is a valid sockaddr_in6 (integers and bytes).
            let mut sin6: libc::sockaddr_in6 = unsafe { mem::zeroed() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            // As std does: flowinfo and scope id are passed through unconverted.
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_scope_id = a.scope_id();
            // SAFETY: as above, sockaddr_storage holds any sockaddr.
            unsafe { ptr::write_unaligned(base.cast::<libc::sockaddr_in6>(), sin6) };
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Reads the socket address at `name`.
///
/// # Safety
/// `name` is null or valid for reads of `namelen` bytes.
unsafe fn decode_addr(name: *const u8, namelen: usize) -> io::Result<SocketAddr> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("recvmsg source address: {what}"));
    if name.is_null() || namelen < size_of::<libc::sa_family_t>() {
        return Err(bad("missing"));
    }
    // SAFETY: at least a sa_family_t's worth of bytes is readable (checked above, contract).
    let family = c_int::from(unsafe { ptr::read_unaligned(name.cast::<libc::sa_family_t>()) });
    match family {
        libc::AF_INET if namelen >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: a whole sockaddr_in is readable (checked above); any bytes are a valid one.
            let sin = unsafe { ptr::read_unaligned(name.cast::<libc::sockaddr_in>()) };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Ok(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 if namelen >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: a whole sockaddr_in6 is readable (checked above); any bytes are a valid one.
            let sin6 = unsafe { ptr::read_unaligned(name.cast::<libc::sockaddr_in6>()) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Ok(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        libc::AF_INET | libc::AF_INET6 => Err(bad("too short for its family")),
        _ => Err(bad("not IPv4 or IPv6")),
    }
}

// ---- encode / decode ---------------------------------------------------------------------

fn invalid_input(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Builds the `msghdr` of a send: writes `meta.to` into `name` and `meta`'s cmsgs into
/// `control`, and points the header at `name`, `iov` (one entry; the caller fills it with the
/// bytes to send) and the used part of `control`.
///
/// The header holds raw pointers to the three: they must stay alive and unmoved until the
/// send (syscall or native op) has completed. [`MsgHdr`] owns all of them in one box.
/// Fails with `InvalidInput` when `src_ip` is not in `to`'s family.
pub fn encode_send(
    meta: &SendMeta,
    name: &mut libc::sockaddr_storage,
    iov: &mut libc::iovec,
    control: &mut ControlBuf,
) -> io::Result<libc::msghdr> {
    // The kernel sends to a v4-mapped address through the IPv4 path, which reads only
    // IPv4-level cmsgs.
    let v4_path = match meta.to {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    let mut w = CmsgWriter::new(control);
    if let Some(ecn) = meta.ecn {
        // Both IP_TOS (which also takes one byte) and IPV6_TCLASS accept an int.
        let tos = c_int::from(ecn.to_bits());
        if v4_path {
            w.push(libc::IPPROTO_IP, libc::IP_TOS, tos)?;
        } else {
            w.push(libc::IPPROTO_IPV6, libc::IPV6_TCLASS, tos)?;
        }
    }
    if let Some(src) = meta.src_ip {
        let mismatch = || invalid_input(format!("src_ip {src} is not in the family of the destination {}", meta.to));
        if v4_path {
            let ip = match src {
                IpAddr::V4(ip) => ip,
                IpAddr::V6(ip) => ip.to_ipv4_mapped().ok_or_else(mismatch)?,
            };
            // SAFETY: all-zero is a valid in_pktinfo (integers only).
            let mut info: libc::in_pktinfo = unsafe { mem::zeroed() };
            // On send the kernel takes the source from ipi_spec_dst (ipi_addr is ignored).
            info.ipi_spec_dst.s_addr = u32::from_ne_bytes(ip.octets());
            w.push(libc::IPPROTO_IP, libc::IP_PKTINFO, info)?;
        } else {
            let ip = match src {
                IpAddr::V6(ip) => ip,
                IpAddr::V4(_) => return Err(mismatch()),
            };
            // SAFETY: all-zero is a valid in6_pktinfo (integers and bytes).
            let mut info: libc::in6_pktinfo = unsafe { mem::zeroed() };
            info.ipi6_addr.s6_addr = ip.octets();
            w.push(libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, info)?;
        }
    }
    if let Some(size) = meta.segment_size {
        // The kernel insists on exactly a u16 here.
        w.push(SOL_UDP, UDP_SEGMENT, size)?;
    }
    let used = w.used;
    let namelen = encode_addr(&meta.to, name);

    // SAFETY: msghdr is pointers and integers (and padding on musl); all-zero is valid.
    let mut hdr: libc::msghdr = unsafe { mem::zeroed() };
    hdr.msg_name = (name as *mut libc::sockaddr_storage).cast();
    hdr.msg_namelen = namelen;
    hdr.msg_iov = iov;
    hdr.msg_iovlen = 1;
    if used > 0 {
        hdr.msg_control = control.as_mut_ptr();
        hdr.msg_controllen = used as _;
    }
    Ok(hdr)
}

/// Builds the `msghdr` of a receive: the whole of `name` and `control`, and `iov` (one entry;
/// the caller points it at the receive buffer). The same lifetime rule as for
/// [`encode_send`] applies; after the receive, read it with [`decode_recv`].
pub fn recv_msghdr(name: &mut libc::sockaddr_storage, iov: &mut libc::iovec, control: &mut ControlBuf) -> libc::msghdr {
    // SAFETY: msghdr is pointers and integers (and padding on musl); all-zero is valid.
    let mut hdr: libc::msghdr = unsafe { mem::zeroed() };
    hdr.msg_name = (name as *mut libc::sockaddr_storage).cast();
    hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    hdr.msg_iov = iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.as_mut_ptr();
    hdr.msg_controllen = CONTROL_LEN as _;
    hdr
}

// `msg_controllen` and `msg_iovlen` are `size_t` on glibc but `socklen_t`/`c_int` on musl, so
// the casts below are only no-ops on some targets.
#[allow(clippy::unnecessary_cast)]
fn controllen(hdr: &libc::msghdr) -> usize {
    hdr.msg_controllen as usize
}

#[allow(clippy::unnecessary_cast)]
fn iovlen(hdr: &libc::msghdr) -> usize {
    hdr.msg_iovlen as usize
}

/// What the cmsgs of one receive said.
#[derive(Default)]
struct Cmsgs {
    tos: Option<u8>,
    tclass: Option<u8>,
    dst4: Option<Ipv4Addr>,
    dst6: Option<Ipv6Addr>,
    gro: Option<usize>,
}

/// Walks the control data of `hdr`. A cmsg whose length is shorter than its header or runs
/// past the control data ends the walk; one too short for its type is skipped; unknown ones
/// are skipped.
///
/// # Safety
/// `msg_control` is null or aligned for `cmsghdr` and valid for reads of `msg_controllen` bytes.
unsafe fn parse_cmsgs(hdr: &libc::msghdr) -> Cmsgs {
    let mut out = Cmsgs::default();
    if hdr.msg_control.is_null() {
        return out;
    }
    let end = (hdr.msg_control as usize).saturating_add(controllen(hdr));
    let header = cmsg_len(0);
    // SAFETY: CMSG_FIRSTHDR reads only `hdr`'s fields; it returns null, or msg_control when
    // msg_controllen leaves room for a cmsghdr.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(hdr) };
    while !cmsg.is_null() {
        // SAFETY: FIRSTHDR/NXTHDR only return a cmsg whose header lies inside the control
        // data, which the contract makes readable.
        let h = unsafe { ptr::read_unaligned(cmsg) };
        let len = h.cmsg_len as usize;
        let room = end.saturating_sub(cmsg as usize);
        if len < header || len > room {
            break;
        }
        let data_len = len - header;
        // SAFETY: CMSG_DATA is `cmsg` plus the aligned header size; `data_len` bytes from
        // there end at `cmsg + len`, inside the control data (checked above).
        let data = unsafe { libc::CMSG_DATA(cmsg) }.cast_const();
        // SAFETY (for each read below): `data` is valid for `data_len` bytes and each read
        // is guarded by a check that it needs no more; any bytes are valid integers/addresses.
        match (h.cmsg_level, h.cmsg_type) {
            (libc::IPPROTO_IP, libc::IP_TOS) => {
                // Linux delivers the TOS as one byte; accept an int too.
                if data_len >= size_of::<c_int>() {
                    let v = unsafe { ptr::read_unaligned(data.cast::<c_int>()) };
                    out.tos = u8::try_from(v).ok();
                } else if data_len >= 1 {
                    out.tos = Some(unsafe { ptr::read_unaligned(data) });
                }
            }
            (libc::IPPROTO_IPV6, libc::IPV6_TCLASS) if data_len >= size_of::<c_int>() => {
                let v = unsafe { ptr::read_unaligned(data.cast::<c_int>()) };
                out.tclass = u8::try_from(v).ok();
            }
            (libc::IPPROTO_IP, libc::IP_PKTINFO) if data_len >= size_of::<libc::in_pktinfo>() => {
                let info = unsafe { ptr::read_unaligned(data.cast::<libc::in_pktinfo>()) };
                // ipi_addr is the header's destination; ipi_spec_dst is the local address a
                // reply would be routed from, which differs for broadcast and multicast.
                out.dst4 = Some(Ipv4Addr::from(info.ipi_addr.s_addr.to_ne_bytes()));
            }
            (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) if data_len >= size_of::<libc::in6_pktinfo>() => {
                let info = unsafe { ptr::read_unaligned(data.cast::<libc::in6_pktinfo>()) };
                out.dst6 = Some(Ipv6Addr::from(info.ipi6_addr.s6_addr));
            }
            (SOL_UDP, UDP_GRO) if data_len >= size_of::<c_int>() => {
                let v = unsafe { ptr::read_unaligned(data.cast::<c_int>()) };
                out.gro = usize::try_from(v).ok().filter(|&v| v > 0);
            }
            _ => {}
        }
        // SAFETY: `cmsg` is inside the control data and its cmsg_len was checked to stay
        // inside it; NXTHDR returns null unless the next header also fits.
        cmsg = unsafe { libc::CMSG_NXTHDR(hdr, cmsg) };
    }
    out
}

/// Reads what a receive returned: `ret` is the receive's result (the full datagram length when
/// it passed [`RECV_FLAGS`]), `hdr` the header it filled (`msg_flags` included).
///
/// Malformed control data is not an error: the walk stops at the first cmsg that does not fit
/// and the fields it would have filled stay `None`. The errors are `InvalidData`: a missing or
/// non-IP source address, or a truncation (`MSG_TRUNC`, `MSG_CTRUNC`, or `ret` larger than the
/// iovecs), which carries a [`RecvTruncated`] with everything else decoded.
///
/// # Safety
/// `msg_name` is null or valid for reads of `msg_namelen` bytes; `msg_iov` is valid for reads
/// of `msg_iovlen` iovecs (only their lengths are read); `msg_control` is null or aligned for
/// `cmsghdr` and valid for reads of `msg_controllen` bytes. A header from [`recv_msghdr`]
/// whose parts are still alive meets this once the kernel has filled it.
pub unsafe fn decode_recv(hdr: &libc::msghdr, ret: usize) -> io::Result<RecvMeta> {
    // SAFETY: forwarded contract on msg_name.
    let from = unsafe { decode_addr(hdr.msg_name.cast::<u8>().cast_const(), hdr.msg_namelen as usize) }?;
    let mut capacity = 0usize;
    if !hdr.msg_iov.is_null() {
        for i in 0..iovlen(hdr) {
            // SAFETY: forwarded contract: msg_iov holds msg_iovlen readable iovecs.
            capacity = capacity.saturating_add(unsafe { ptr::read(hdr.msg_iov.add(i)) }.iov_len);
        }
    }
    let len = ret.min(capacity);
    // SAFETY: forwarded contract on msg_control.
    let c = unsafe { parse_cmsgs(hdr) };
    let (own_tos, other_tos) = if from.is_ipv4() { (c.tos, c.tclass) } else { (c.tclass, c.tos) };
    let ecn = own_tos.or(other_tos).map(Ecn::from_bits);
    let dst_ip = match from {
        SocketAddr::V4(_) => c.dst4.or_else(|| c.dst6.and_then(|ip| ip.to_ipv4_mapped())).map(IpAddr::V4),
        SocketAddr::V6(_) => c.dst6.or_else(|| c.dst4.map(|ip| ip.to_ipv6_mapped())).map(IpAddr::V6),
    };
    let stride = c.gro.unwrap_or(len);
    let meta = RecvMeta { len, from, ecn, stride, dst_ip };
    let data_truncated = hdr.msg_flags & libc::MSG_TRUNC != 0 || ret > capacity;
    let control_truncated = hdr.msg_flags & libc::MSG_CTRUNC != 0;
    if data_truncated || control_truncated {
        let report = RecvTruncated { meta, datagram_len: ret, data_truncated, control_truncated };
        return Err(io::Error::new(io::ErrorKind::InvalidData, report));
    }
    Ok(meta)
}

// ---- an owned header for native ops --------------------------------------------------------

struct MsgHdrParts {
    hdr: libc::msghdr,
    name: libc::sockaddr_storage,
    iov: libc::iovec,
    control: ControlBuf,
}

/// A `msghdr` that owns its address, iovec and control buffer in one heap block, so its
/// pointers stay valid while the value moves: what a native `SENDMSG`/`RECVMSG` op holds
/// (with the data buffer) until it completes. Re-preparing reuses the allocation.
pub struct MsgHdr {
    parts: Box<MsgHdrParts>,
}

impl MsgHdr {
    /// An empty header (no name, data or control); prepare it before use.
    pub fn new() -> Self {
        // SAFETY: msghdr is pointers and integers (and padding on musl); all-zero is valid.
        let hdr: libc::msghdr = unsafe { mem::zeroed() };
        let iov = libc::iovec { iov_base: ptr::null_mut(), iov_len: 0 };
        MsgHdr { parts: Box::new(MsgHdrParts { hdr, name: zeroed_storage(), iov, control: ControlBuf::new() }) }
    }

    /// A header for sending the `len` bytes at `data` with `meta`; see [`MsgHdr::prepare_send`].
    pub fn for_send(meta: &SendMeta, data: *const u8, len: usize) -> io::Result<Self> {
        let mut hdr = MsgHdr::new();
        hdr.prepare_send(meta, data, len)?;
        Ok(hdr)
    }

    /// A header for receiving into the `capacity` bytes at `data`; see [`MsgHdr::prepare_recv`].
    pub fn for_recv(data: *mut u8, capacity: usize) -> Self {
        let mut hdr = MsgHdr::new();
        hdr.prepare_recv(data, capacity);
        hdr
    }

    /// Sets the header up to send the `len` bytes at `data` with `meta` (see [`encode_send`]).
    /// Only the pointer is stored: the bytes must be initialised and stay put until the send
    /// completes, as for any in-flight buffer (an [`IoBuf`]'s `stable_ptr`/`bytes_init`).
    pub fn prepare_send(&mut self, meta: &SendMeta, data: *const u8, len: usize) -> io::Result<()> {
        let p = &mut *self.parts;
        p.iov = libc::iovec { iov_base: data.cast_mut().cast(), iov_len: len };
        let hdr = encode_send(meta, &mut p.name, &mut p.iov, &mut p.control)?;
        p.hdr = hdr;
        Ok(())
    }

    /// Sets the header up to receive into the `capacity` bytes at `data` (an [`IoBufMut`]'s
    /// `stable_mut_ptr`/`bytes_total`), which must stay put until the receive completes.
    pub fn prepare_recv(&mut self, data: *mut u8, capacity: usize) {
        let p = &mut *self.parts;
        p.iov = libc::iovec { iov_base: data.cast(), iov_len: capacity };
        p.name = zeroed_storage();
        p.hdr = recv_msghdr(&mut p.name, &mut p.iov, &mut p.control);
    }

    /// The header, for a send op.
    pub fn as_ptr(&self) -> *const libc::msghdr {
        &self.parts.hdr
    }

    /// The header, for a receive op (the kernel writes its lengths and flags back).
    pub fn as_mut_ptr(&mut self) -> *mut libc::msghdr {
        &mut self.parts.hdr
    }

    /// Decodes a completed receive whose result was `ret` (see [`decode_recv`]); call it only
    /// once the op has completed. Only memory this value owns is read, with the header's
    /// lengths clamped to it, so odd header contents give an error or `None` fields, never
    /// undefined behaviour.
    pub fn decode_recv(&self, ret: usize) -> io::Result<RecvMeta> {
        let p = &*self.parts;
        // A copy whose pointers are this block's own and whose lengths are clamped to it.
        let mut hdr = p.hdr;
        hdr.msg_name = (&p.name as *const libc::sockaddr_storage).cast_mut().cast();
        hdr.msg_namelen = hdr.msg_namelen.min(size_of::<libc::sockaddr_storage>() as libc::socklen_t);
        hdr.msg_iov = (&p.iov as *const libc::iovec).cast_mut();
        hdr.msg_iovlen = 1;
        hdr.msg_control = (&p.control as *const ControlBuf).cast_mut().cast();
        hdr.msg_controllen = controllen(&hdr).min(CONTROL_LEN) as _;
        // SAFETY: name, iov and control are this value's own initialised fields, at least as
        // large as the lengths clamped above, and the control buffer is cmsghdr-aligned.
        unsafe { decode_recv(&hdr, ret) }
    }
}

impl Default for MsgHdr {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MsgHdr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MsgHdr").finish_non_exhaustive()
    }
}

// ---- non-blocking syscalls ---------------------------------------------------------------

/// Sends the initialised bytes of `buf` with `meta` (`sendmsg` with `MSG_DONTWAIT`), retrying
/// `EINTR`. A full send buffer is an error of kind `WouldBlock`: wait for writability and call
/// again. Returns the bytes sent (all of them for UDP).
pub fn send_msg_nonblocking<B: IoBuf>(fd: RawFd, buf: &B, meta: &SendMeta) -> io::Result<usize> {
    let mut name = zeroed_storage();
    let mut control = ControlBuf::new();
    let mut iov = libc::iovec { iov_base: buf.stable_ptr().cast_mut().cast(), iov_len: buf.bytes_init() };
    let hdr = encode_send(meta, &mut name, &mut iov, &mut control)?;
    loop {
        // SAFETY: `hdr` points at `name`, `iov` and `control`, locals alive and unmoved for
        // this call; `iov` covers `buf`'s `bytes_init` initialised bytes (IoBuf contract),
        // which sendmsg only reads.
        let n = unsafe { libc::sendmsg(fd, &hdr, libc::MSG_DONTWAIT | SEND_FLAGS) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Receives one datagram (or one `UDP_GRO`-coalesced run of them) into `buf`, from its start up
/// to `bytes_total` (`recvmsg` with `MSG_DONTWAIT` and [`RECV_FLAGS`]), retrying `EINTR`, and
/// marks the received bytes initialised (`set_init(len)`; a `Vec` already longer keeps its
/// length, so go by [`RecvMeta::len`]).
///
/// Nothing queued is an error of kind `WouldBlock`: wait for readability and call again. A
/// datagram longer than the buffer, or control data that did not fit, is an `InvalidData`
/// error carrying a [`RecvTruncated`]; the datagram is consumed and its first bytes are in
/// the buffer.
pub fn recv_msg_nonblocking<B: IoBufMut>(fd: RawFd, buf: &mut B) -> io::Result<RecvMeta> {
    let capacity = buf.bytes_total();
    let mut iov = libc::iovec { iov_base: buf.stable_mut_ptr().cast(), iov_len: capacity };
    let mut name = zeroed_storage();
    let mut control = ControlBuf::new();
    let mut hdr = recv_msghdr(&mut name, &mut iov, &mut control);
    let ret = loop {
        // SAFETY: `hdr` points at `name`, `iov` and `control`, locals alive and unmoved for
        // this call; `iov` covers `bytes_total` writable bytes of `buf` (IoBufMut contract),
        // which recvmsg writes without reading.
        let n = unsafe { libc::recvmsg(fd, &mut hdr, libc::MSG_DONTWAIT | RECV_FLAGS) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    // SAFETY: recvmsg wrote the datagram's first min(ret, capacity) bytes at the start of the
    // buffer, and that is at most bytes_total.
    unsafe { buf.set_init(ret.min(capacity)) };
    // The kernel never grows these, but the decoder's contract is stated in them.
    hdr.msg_namelen = hdr.msg_namelen.min(size_of::<libc::sockaddr_storage>() as libc::socklen_t);
    hdr.msg_controllen = controllen(&hdr).min(CONTROL_LEN) as _;
    // SAFETY: `hdr` still points at the live `name` (sockaddr_storage-sized, initialised),
    // the one live `iov`, and `control` (cmsghdr-aligned, initialised, CONTROL_LEN bytes),
    // with lengths clamped to them above.
    unsafe { decode_recv(&hdr, ret) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    const V4_LO: Ipv4Addr = Ipv4Addr::LOCALHOST;
    const V4_LO2: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

    fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
        let s = UdpSocket::bind(addr)?;
        s.set_nonblocking(true)?;
        Ok(s)
    }

    fn bind_v6(only_v6: bool) -> io::Result<UdpSocket> {
        let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None)?;
        s.set_only_v6(only_v6)?;
        s.set_nonblocking(true)?;
        s.bind(&SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0).into())?;
        Ok(s.into())
    }

    /// Receives, waiting up to 5 s for something to arrive.
    fn recv_wait<B: IoBufMut>(s: &UdpSocket, buf: &mut B) -> io::Result<RecvMeta> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match recv_msg_nonblocking(s.as_raw_fd(), buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "nothing arrived within 5 s");
                    let mut pfd = libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                    // SAFETY: poll reads and writes one live pollfd.
                    unsafe { libc::poll(&mut pfd, 1, 100) };
                }
                other => return other,
            }
        }
    }

    fn port(s: &UdpSocket) -> u16 {
        s.local_addr().unwrap().port()
    }

    #[test]
    fn v4_round_trip_reports_ecn_destination_and_source() {
        let rx = bind("0.0.0.0:0".parse().unwrap()).unwrap();
        let feats = enable_cmsgs_with(rx.as_raw_fd(), false).unwrap();
        assert!(feats.pktinfo && feats.ecn, "{feats:?}");
        let tx = bind(SocketAddr::new(V4_LO.into(), 0)).unwrap();
        for dst in [V4_LO, V4_LO2] {
            let payload = format!("hello {dst}").into_bytes();
            let meta = SendMeta { ecn: Some(Ecn::Ect0), ..SendMeta::new(SocketAddr::new(dst.into(), port(&rx))) };
            match send_msg_nonblocking(tx.as_raw_fd(), &payload, &meta) {
                Ok(n) => assert_eq!(n, payload.len()),
                Err(e) if dst == V4_LO2 => {
                    println!("skipping {dst}: the kernel does not route it: {e}");
                    continue;
                }
                Err(e) => panic!("send to {dst}: {e}"),
            }
            let mut buf = Vec::with_capacity(2048);
            let got = recv_wait(&rx, &mut buf).unwrap();
            let want = RecvMeta {
                len: payload.len(),
                from: tx.local_addr().unwrap(),
                ecn: Some(Ecn::Ect0),
                stride: payload.len(),
                dst_ip: Some(dst.into()),
            };
            assert_eq!(got, want);
            assert_eq!(buf, payload);
        }
    }

    #[test]
    fn v4_src_ip_picks_the_source_address() {
        let rx = bind("0.0.0.0:0".parse().unwrap()).unwrap();
        enable_cmsgs_with(rx.as_raw_fd(), false).unwrap();
        let tx = bind("0.0.0.0:0".parse().unwrap()).unwrap();
        let to = SocketAddr::new(V4_LO2.into(), port(&rx));
        // The kernel's own choice for 127.0.0.2 is 127.0.0.1 (the loopback route's src), ...
        let sent = send_msg_nonblocking(tx.as_raw_fd(), &b"a".as_slice(), &SendMeta::new(to));
        if let Err(e) = sent {
            println!("skipping: the kernel does not route 127.0.0.2: {e}");
            return;
        }
        let mut buf = Vec::with_capacity(64);
        let got = recv_wait(&rx, &mut buf).unwrap();
        assert_eq!(got.from, SocketAddr::new(V4_LO.into(), port(&tx)));
        // ... and a datagram sent without ECN is reported as Not-ECT, not as unknown.
        assert_eq!(got.ecn, Some(Ecn::NotEct));
        assert_eq!(got.dst_ip, Some(V4_LO2.into()));
        // ... so a source of 127.0.0.2 can only have come from IP_PKTINFO.
        let meta = SendMeta { src_ip: Some(V4_LO2.into()), ecn: Some(Ecn::Ect1), ..SendMeta::new(to) };
        assert_eq!(send_msg_nonblocking(tx.as_raw_fd(), &b"bc".as_slice(), &meta).unwrap(), 2);
        let mut buf = Vec::with_capacity(64);
        let got = recv_wait(&rx, &mut buf).unwrap();
        let want = RecvMeta {
            len: 2,
            from: SocketAddr::new(V4_LO2.into(), port(&tx)),
            ecn: Some(Ecn::Ect1),
            stride: 2,
            dst_ip: Some(V4_LO2.into()),
        };
        assert_eq!(got, want);
        assert_eq!(buf, b"bc");
    }

    #[test]
    fn v6_round_trip_on_loopback() {
        let (rx, tx) = match (bind_v6(true), bind(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 0))) {
            (Ok(rx), Ok(tx)) => (rx, tx),
            (Err(e), _) | (_, Err(e)) => {
                println!("skipping: IPv6 unavailable: {e}");
                return;
            }
        };
        let feats = enable_cmsgs_with(rx.as_raw_fd(), false).unwrap();
        assert!(feats.pktinfo && feats.ecn, "{feats:?}");
        let payload = b"over six".to_vec();
        let to = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port(&rx));
        let meta = SendMeta { ecn: Some(Ecn::Ce), src_ip: Some(Ipv6Addr::LOCALHOST.into()), ..SendMeta::new(to) };
        assert_eq!(send_msg_nonblocking(tx.as_raw_fd(), &payload, &meta).unwrap(), payload.len());
        let mut buf = Vec::with_capacity(2048);
        let got = recv_wait(&rx, &mut buf).unwrap();
        let want = RecvMeta {
            len: payload.len(),
            from: tx.local_addr().unwrap(),
            ecn: Some(Ecn::Ce),
            stride: payload.len(),
            dst_ip: Some(Ipv6Addr::LOCALHOST.into()),
        };
        assert_eq!(got, want);
        assert_eq!(buf, payload);
    }

    #[test]
    fn dual_stack_v6_socket_reports_and_answers_v4_peers_as_mapped() {
        let rx = match bind_v6(false) {
            Ok(rx) => rx,
            Err(e) => {
                println!("skipping: no dual-stack IPv6 socket: {e}");
                return;
            }
        };
        let feats = enable_cmsgs_with(rx.as_raw_fd(), false).unwrap();
        assert!(feats.pktinfo && feats.ecn, "{feats:?}");
        let tx = bind(SocketAddr::new(V4_LO.into(), 0)).unwrap();
        enable_cmsgs_with(tx.as_raw_fd(), false).unwrap();
        let to = SocketAddr::new(V4_LO.into(), port(&rx));
        let meta = SendMeta { ecn: Some(Ecn::Ect1), ..SendMeta::new(to) };
        assert_eq!(send_msg_nonblocking(tx.as_raw_fd(), &b"ping".as_slice(), &meta).unwrap(), 4);
        let mut buf = Vec::with_capacity(64);
        let got = recv_wait(&rx, &mut buf).unwrap();
        let mapped = V4_LO.to_ipv6_mapped();
        let want = RecvMeta {
            len: 4,
            from: SocketAddr::V6(SocketAddrV6::new(mapped, port(&tx), 0, 0)),
            ecn: Some(Ecn::Ect1),
            stride: 4,
            dst_ip: Some(mapped.into()),
        };
        assert_eq!(got, want);
        assert_eq!(buf, b"ping");

        // The reply goes back through the v6 socket to the mapped address, from the mapped
        // destination, with IPv4-level cmsgs.
        let reply = SendMeta { ecn: Some(Ecn::Ce), src_ip: got.dst_ip, ..SendMeta::new(got.from) };
        assert_eq!(send_msg_nonblocking(rx.as_raw_fd(), &b"pong!".as_slice(), &reply).unwrap(), 5);
        let mut buf = Vec::with_capacity(64);
        let got = recv_wait(&tx, &mut buf).unwrap();
        let want = RecvMeta {
            len: 5,
            from: SocketAddr::new(V4_LO.into(), port(&rx)),
            ecn: Some(Ecn::Ce),
            stride: 5,
            dst_ip: Some(V4_LO.into()),
        };
        assert_eq!(got, want);
        assert_eq!(buf, b"pong!");
    }

    fn gso_payload() -> Vec<u8> {
        // Three 1200-byte segments and a 500-byte tail, each byte naming its segment and offset.
        (0..3 * 1200 + 500).map(|i: usize| ((i / 1200) * 61 + i % 1200) as u8).collect()
    }

    #[test]
    fn gso_send_arrives_split_without_gro_and_coalesced_with_it() {
        let tx = bind(SocketAddr::new(V4_LO.into(), 0)).unwrap();
        let feats = enable_cmsgs(tx.as_raw_fd()).unwrap();
        if !feats.gso {
            println!("skipping: the kernel does not know UDP_SEGMENT (GSO)");
            return;
        }
        let payload = gso_payload();
        let want_lens = [1200, 1200, 1200, 500];

        let plain = bind(SocketAddr::new(V4_LO.into(), 0)).unwrap();
        let plain_feats = enable_cmsgs_with(plain.as_raw_fd(), false).unwrap();
        assert!(!plain_feats.gro);
        let to = SocketAddr::new(V4_LO.into(), port(&plain));
        let meta = SendMeta { segment_size: Some(1200), ecn: Some(Ecn::Ect0), ..SendMeta::new(to) };
        assert_eq!(send_msg_nonblocking(tx.as_raw_fd(), &payload, &meta).unwrap(), payload.len());
        let mut offset = 0;
        for want_len in want_lens {
            let mut buf = Vec::with_capacity(65536);
            let got = recv_wait(&plain, &mut buf).unwrap();
            let want = RecvMeta {
                len: want_len,
                from: tx.local_addr().unwrap(),
                ecn: Some(Ecn::Ect0),
                stride: want_len,
                dst_ip: Some(V4_LO.into()),
            };
            assert_eq!(got, want);
            assert_eq!(buf, payload[offset..offset + want_len]);
            offset += want_len;
        }
        let mut buf = Vec::with_capacity(65536);
        assert_eq!(recv_msg_nonblocking(plain.as_raw_fd(), &mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);

        let coalescing = bind(SocketAddr::new(V4_LO.into(), 0)).unwrap();
        if !enable_cmsgs(coalescing.as_raw_fd()).unwrap().gro {
            println!("skipping the GRO half: the kernel refuses UDP_GRO");
            return;
        }
        let to = SocketAddr::new(V4_LO.into(), port(&coalescing));
        let meta = SendMeta { segment_size: Some(1200), ..SendMeta::new(to) };
        assert_eq!(send_msg_nonblocking(tx.as_raw_fd(), &payload, &meta).unwrap(), payload.len());
        let mut reads = Vec::new();
        let mut joined = Vec::new();
        let mut segments = Vec::new();
        while joined.len() < payload.len() {
            let mut buf = Vec::with_capacity(65536);
            let got = recv_wait(&coalescing, &mut buf).unwrap();
            assert_eq!(buf.len(), got.len);
            segments.extend(got.segments(&buf).map(<[u8]>::len));
            reads.push((got.len, got.stride));
            joined.extend_from_slice(&buf);
        }
        // Loopback hands the GSO packet to a GRO socket whole.
        assert_eq!(reads, [(payload.len(), 1200)]);
        assert_eq!(segments, want_lens);
        assert_eq!(joined, payload);
    }

    #[test]
    fn recv_into_an_uninitialised_vec_sets_its_length() {
        let rx = bind(SocketAddr::new(V4_LO.into(), 0)).unwrap();
        let tx = bind(SocketAddr::new(V4_LO.into(), 0)).unwrap();
        let to = SocketAddr::new(V4_LO.into(), port(&rx));
        send_msg_nonblocking(tx.as_raw_fd(), &b"0123456789".as_slice(), &SendMeta::new(to)).unwrap();
        let mut buf = Vec::<u8>::with_capacity(100);
        let got = recv_wait(&rx, &mut buf).unwrap();
        // No cmsgs were enabled on rx: nothing is reported beyond the datagram itself.
        let want = RecvMeta { len: 10, from: tx.local_addr().unwrap(), ecn: None, stride: 10, dst_ip: None };
        assert_eq!(got, want);
        assert_eq!(buf, b"0123456789");
    }

    #[test]
    fn a_datagram_longer_than_the_buffer_is_a_truncation_error() {
        let rx = bind(SocketAddr::new(V4_LO.into(), 0)).unwrap();
        enable_cmsgs_with(rx.as_raw_fd(), false).unwrap();
        let tx = bind(SocketAddr::new(V4_LO.into(), 0)).unwrap();
        let to = SocketAddr::new(V4_LO.into(), port(&rx));
        send_msg_nonblocking(tx.as_raw_fd(), &b"0123456789".as_slice(), &SendMeta::new(to)).unwrap();
        let mut buf = vec![0u8; 4].into_boxed_slice();
        let err = recv_wait(&rx, &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let report = *RecvTruncated::from_io_error(&err).expect("a RecvTruncated payload");
        let meta = RecvMeta {
            len: 4,
            from: tx.local_addr().unwrap(),
            ecn: Some(Ecn::NotEct),
            stride: 4,
            dst_ip: Some(V4_LO.into()),
        };
        let want = RecvTruncated { meta, datagram_len: 10, data_truncated: true, control_truncated: false };
        assert_eq!(report, want);
        assert_eq!(&buf[..], b"0123");
        assert!(err.to_string().contains("10 bytes into a 4-byte buffer"), "{err}");
        // The datagram was consumed.
        let mut buf = Vec::with_capacity(64);
        assert_eq!(recv_msg_nonblocking(rx.as_raw_fd(), &mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn an_empty_socket_would_block() {
        let rx = bind(SocketAddr::new(V4_LO.into(), 0)).unwrap();
        enable_cmsgs(rx.as_raw_fd()).unwrap();
        let mut buf = Vec::with_capacity(64);
        let err = recv_msg_nonblocking(rx.as_raw_fd(), &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(buf.len(), 0);
    }

    #[test]
    fn enable_cmsgs_refuses_a_stream_socket() {
        let l = std::net::TcpListener::bind(SocketAddr::new(V4_LO.into(), 0)).unwrap();
        assert_eq!(enable_cmsgs(l.as_raw_fd()).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    /// Lays `cmsgs` (level, type, declared cmsg_len, data) out as the kernel would.
    fn control_with(cmsgs: &[(c_int, c_int, usize, &[u8])]) -> (ControlBuf, usize) {
        let mut control = ControlBuf::new();
        let mut at = 0;
        for &(level, ty, len, data) in cmsgs {
            // SAFETY: all-zero is a valid cmsghdr (integers only). Bytes are copied in with
            // slice indexing below, so a layout that does not fit panics instead of overflowing.
            let mut hdr: libc::cmsghdr = unsafe { mem::zeroed() };
            hdr.cmsg_len = len as _;
            hdr.cmsg_level = level;
            hdr.cmsg_type = ty;
            let header = cmsg_len(0);
            // SAFETY: cmsghdr is plain integers; viewing it as bytes is fine.
            let raw = unsafe {
                std::slice::from_raw_parts((&hdr as *const libc::cmsghdr).cast::<u8>(), size_of::<libc::cmsghdr>())
            };
            control.bytes[at..at + raw.len()].copy_from_slice(raw);
            control.bytes[at + header..at + header + data.len()].copy_from_slice(data);
            at += cmsg_space(data.len());
        }
        (control, at)
    }

    /// Decodes a hand-built receive of 5 bytes from 127.0.0.1:9.
    fn decode_with(control: &mut ControlBuf, controllen: usize, flags: c_int) -> io::Result<RecvMeta> {
        let mut name = zeroed_storage();
        let namelen = encode_addr(&"127.0.0.1:9".parse().unwrap(), &mut name);
        let mut data = [0u8; 5];
        let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() };
        let mut hdr = recv_msghdr(&mut name, &mut iov, control);
        hdr.msg_namelen = namelen;
        hdr.msg_controllen = controllen as _;
        hdr.msg_flags = flags;
        // SAFETY: the header points at live locals of the sizes it states.
        unsafe { decode_recv(&hdr, 5) }
    }

    fn plain(ecn: Option<Ecn>, dst_ip: Option<IpAddr>, stride: usize) -> RecvMeta {
        RecvMeta { len: 5, from: "127.0.0.1:9".parse().unwrap(), ecn, stride, dst_ip }
    }

    #[test]
    fn decode_recv_survives_garbage_control_data() {
        let ip = libc::IPPROTO_IP;
        let ip6 = libc::IPPROTO_IPV6;
        let tos_ce: &[u8] = &[0x03];
        let pktinfo6 = [0u8; size_of::<libc::in6_pktinfo>()];

        // Well-formed TOS, then an IPV6_PKTINFO declaring only 4 data bytes (skipped), then a
        // cmsg whose length runs far past the buffer (ends the walk before its GRO value).
        let int_1200 = 1200i32.to_ne_bytes();
        let (mut c, n) = control_with(&[
            (ip, libc::IP_TOS, cmsg_len(1), tos_ce),
            (ip6, libc::IPV6_PKTINFO, cmsg_len(4), &pktinfo6[..4]),
            (SOL_UDP, UDP_GRO, 0x7fff_ffff, &int_1200),
        ]);
        assert_eq!(decode_with(&mut c, n, 0).unwrap(), plain(Some(Ecn::Ce), None, 5));

        // The same GRO cmsg, well-formed, is read; a zero or negative one is ignored.
        let (mut c, n) = control_with(&[(SOL_UDP, UDP_GRO, cmsg_len(4), &int_1200)]);
        assert_eq!(decode_with(&mut c, n, 0).unwrap(), plain(None, None, 1200));
        let (mut c, n) = control_with(&[(SOL_UDP, UDP_GRO, cmsg_len(4), &(-7i32).to_ne_bytes())]);
        assert_eq!(decode_with(&mut c, n, 0).unwrap(), plain(None, None, 5));

        // A first cmsg with a zero or sub-header length ends the walk at once.
        for bad_len in [0, 3, cmsg_len(0) - 1] {
            let (mut c, n) =
                control_with(&[(ip, libc::IP_TOS, bad_len, tos_ce), (ip, libc::IP_TOS, cmsg_len(1), tos_ce)]);
            assert_eq!(decode_with(&mut c, n, 0).unwrap(), plain(None, None, 5), "cmsg_len {bad_len}");
        }

        // Control data shorter than a header, or absent, holds nothing.
        let (mut c, _) = control_with(&[(ip, libc::IP_TOS, cmsg_len(1), tos_ce)]);
        assert_eq!(decode_with(&mut c, 5, 0).unwrap(), plain(None, None, 5));
        assert_eq!(decode_with(&mut c, 0, 0).unwrap(), plain(None, None, 5));
        // A cmsg cut off by msg_controllen (as after MSG_CTRUNC) is not read.
        let (mut c, n) = control_with(&[(ip, libc::IP_PKTINFO, cmsg_len(12), &[127, 0, 0, 1].repeat(3))]);
        assert_eq!(decode_with(&mut c, n - 8, 0).unwrap(), plain(None, None, 5));
        assert_eq!(decode_with(&mut c, n, 0).unwrap(), plain(None, Some(V4_LO.into()), 5));

        // TCLASS out of byte range is ignored; a v4 TOS as an int is accepted.
        let (mut c, n) = control_with(&[(ip6, libc::IPV6_TCLASS, cmsg_len(4), &300i32.to_ne_bytes())]);
        assert_eq!(decode_with(&mut c, n, 0).unwrap(), plain(None, None, 5));
        let (mut c, n) = control_with(&[(ip, libc::IP_TOS, cmsg_len(4), &0x02i32.to_ne_bytes())]);
        assert_eq!(decode_with(&mut c, n, 0).unwrap(), plain(Some(Ecn::Ect0), None, 5));

        // MSG_CTRUNC is reported with what was decoded.
        let (mut c, n) = control_with(&[(ip, libc::IP_TOS, cmsg_len(1), tos_ce)]);
        let err = decode_with(&mut c, n, libc::MSG_CTRUNC).unwrap_err();
        let want = RecvTruncated {
            meta: plain(Some(Ecn::Ce), None, 5),
            datagram_len: 5,
            data_truncated: false,
            control_truncated: true,
        };
        assert_eq!(RecvTruncated::from_io_error(&err), Some(&want));

        // Random control bytes and lengths: never a panic, and the name still decodes.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..20_000 {
            let mut c = ControlBuf::new();
            for b in c.bytes.iter_mut() {
                *b = next() as u8;
            }
            // Small lengths and plausible levels/types make the walk go deep sometimes.
            if round % 2 == 0 {
                // SAFETY: all-zero is a valid cmsghdr (integers only).
                let mut hdr: libc::cmsghdr = unsafe { mem::zeroed() };
                hdr.cmsg_len = (next() % 48) as _;
                hdr.cmsg_level = [ip, ip6, SOL_UDP][round % 3];
                hdr.cmsg_type = (next() % 110) as c_int;
                // SAFETY: the buffer is aligned for cmsghdr and larger than one.
                unsafe { ptr::write(c.bytes.as_mut_ptr().cast::<libc::cmsghdr>(), hdr) };
            }
            let len = (next() as usize) % (CONTROL_LEN + 1);
            let got = decode_with(&mut c, len, 0);
            assert!(got.is_ok(), "round {round}: {got:?}");
            assert_eq!(got.unwrap().len, 5);
        }
    }

    #[test]
    fn decode_recv_rejects_a_bad_source_address() {
        let mut control = ControlBuf::new();
        let mut name = zeroed_storage();
        let mut data = [0u8; 5];
        let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() };
        let mut hdr = recv_msghdr(&mut name, &mut iov, &mut control);
        hdr.msg_controllen = 0;
        for (family, namelen) in [(libc::AF_UNIX, 110), (libc::AF_INET6, 16), (libc::AF_INET, 0), (libc::AF_INET, 2)] {
            // SAFETY: writes a sa_family_t at the start of the live, aligned storage.
            unsafe { ptr::write((&mut name as *mut libc::sockaddr_storage).cast::<libc::sa_family_t>(), family as _) };
            hdr.msg_namelen = namelen;
            // SAFETY: the header points at live locals; namelen <= the storage size.
            let err = unsafe { decode_recv(&hdr, 5) }.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "family {family}, namelen {namelen}");
        }
        hdr.msg_name = ptr::null_mut();
        hdr.msg_namelen = 28;
        // SAFETY: a null name is allowed by the contract.
        assert_eq!(unsafe { decode_recv(&hdr, 5) }.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn encode_send_lays_out_the_cmsgs_the_kernel_expects() {
        let mut name = zeroed_storage();
        let mut control = ControlBuf::new();
        let mut data = *b"xyz";
        let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: 3 };
        let meta = SendMeta {
            to: "127.0.0.1:4433".parse().unwrap(),
            ecn: Some(Ecn::Ect0),
            segment_size: Some(1200),
            src_ip: Some(V4_LO2.into()),
        };
        let hdr = encode_send(&meta, &mut name, &mut iov, &mut control).unwrap();
        assert_eq!(hdr.msg_namelen as usize, size_of::<libc::sockaddr_in>());
        // SAFETY: msg_name points at `name`, which holds msg_namelen bytes.
        let to = unsafe { decode_addr(hdr.msg_name.cast::<u8>(), hdr.msg_namelen as usize) }.unwrap();
        assert_eq!(to, meta.to);
        let mut seen = Vec::new();
        // SAFETY: the header points at the live, aligned control buffer, msg_controllen bytes.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&hdr);
            while !cmsg.is_null() {
                let h = ptr::read(cmsg);
                let data = std::slice::from_raw_parts(libc::CMSG_DATA(cmsg), h.cmsg_len as usize - cmsg_len(0));
                seen.push((h.cmsg_level, h.cmsg_type, data.to_vec()));
                cmsg = libc::CMSG_NXTHDR(&hdr, cmsg);
            }
        }
        let mut pktinfo = vec![0u8; size_of::<libc::in_pktinfo>()];
        pktinfo[4..8].copy_from_slice(&[127, 0, 0, 2]); // ipi_spec_dst
        let want = vec![
            (libc::IPPROTO_IP, libc::IP_TOS, 2i32.to_ne_bytes().to_vec()),
            (libc::IPPROTO_IP, libc::IP_PKTINFO, pktinfo),
            (SOL_UDP, UDP_SEGMENT, 1200u16.to_ne_bytes().to_vec()),
        ];
        assert_eq!(seen, want);
        assert_eq!(hdr.msg_controllen as usize, cmsg_space(4) + cmsg_space(12) + cmsg_space(2));

        // A v6 destination takes the IPv6-level cmsgs; a v4 source for it is refused.
        let v6 = SendMeta { to: "[::1]:1".parse().unwrap(), ecn: Some(Ecn::Ce), segment_size: None, src_ip: None };
        let hdr = encode_send(&v6, &mut name, &mut iov, &mut control).unwrap();
        // SAFETY: as above.
        let h = unsafe { ptr::read(libc::CMSG_FIRSTHDR(&hdr)) };
        assert_eq!(
            (h.cmsg_level, h.cmsg_type, h.cmsg_len as usize),
            (libc::IPPROTO_IPV6, libc::IPV6_TCLASS, cmsg_len(4))
        );
        let bad = SendMeta { src_ip: Some(V4_LO.into()), ..v6 };
        assert_eq!(
            encode_send(&bad, &mut name, &mut iov, &mut control).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        // No metadata: no control data at all.
        let hdr = encode_send(&SendMeta::new(meta.to), &mut name, &mut iov, &mut control).unwrap();
        assert!(hdr.msg_control.is_null());
        assert_eq!(hdr.msg_controllen, 0);
    }

    #[test]
    fn owned_msghdr_round_trips_through_raw_syscalls() {
        let rx = bind(SocketAddr::new(V4_LO.into(), 0)).unwrap();
        enable_cmsgs_with(rx.as_raw_fd(), false).unwrap();
        let tx = bind(SocketAddr::new(V4_LO.into(), 0)).unwrap();
        let data = b"native".to_vec();
        let to = SocketAddr::new(V4_LO.into(), port(&rx));
        let send = MsgHdr::for_send(&SendMeta { ecn: Some(Ecn::Ect1), ..SendMeta::new(to) }, data.as_ptr(), data.len())
            .unwrap();
        // Moving the header keeps its pointers valid: they point into its box.
        let moved = send;
        // SAFETY: the header and the bytes it points at are alive for the call.
        assert_eq!(unsafe { libc::sendmsg(tx.as_raw_fd(), moved.as_ptr(), 0) }, 6);

        let mut buf = Vec::<u8>::with_capacity(64);
        let mut recv = MsgHdr::for_recv(buf.as_mut_ptr(), buf.capacity());
        let mut pfd = libc::pollfd { fd: rx.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll reads and writes one live pollfd.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1);
        // SAFETY: the header and the buffer it points at are alive for the call.
        let n = unsafe { libc::recvmsg(rx.as_raw_fd(), recv.as_mut_ptr(), RECV_FLAGS) };
        assert_eq!(n, 6);
        let got = recv.decode_recv(n as usize).unwrap();
        // SAFETY: recvmsg wrote 6 bytes at the start of the buffer.
        unsafe { buf.set_len(got.len) };
        let want = RecvMeta {
            len: 6,
            from: tx.local_addr().unwrap(),
            ecn: Some(Ecn::Ect1),
            stride: 6,
            dst_ip: Some(V4_LO.into()),
        };
        assert_eq!(got, want);
        assert_eq!(buf, b"native");
    }

    #[test]
    fn segments_split_by_stride() {
        let data: Vec<u8> = (0..10).collect();
        let meta = RecvMeta { len: 10, from: "127.0.0.1:1".parse().unwrap(), ecn: None, stride: 4, dst_ip: None };
        let lens: Vec<usize> = meta.segments(&data).map(<[u8]>::len).collect();
        assert_eq!(lens, [4, 4, 2]);
        let empty = RecvMeta { len: 0, stride: 0, ..meta };
        assert_eq!(empty.segments(&data).collect::<Vec<_>>(), [&[] as &[u8]]);
        assert_eq!(Ecn::from_bits(0xff), Ecn::Ce);
        assert_eq!(Ecn::from_bits(0b1000_0010), Ecn::Ect0);
        assert_eq!(Ecn::Ect1.to_bits(), 1);
    }
}

/// Opens `n` non-blocking UDP sockets on `addr` in one `SO_REUSEPORT` group, in order (the
/// group's index of each is its position here, which a reuseport BPF program would steer by),
/// for one socket per core. Port 0 picks one free port shared by all of them. As with
/// [`reuseport_listeners`](crate::tcp::reuseport_listeners), a socket of this namespace on the
/// same port that is not one of ours makes this fail with
/// [`ListenError::InUse`](crate::tcp::ListenError::InUse) instead of silently sharing the
/// datagrams with it. `buffer` sets `SO_RCVBUF` and `SO_SNDBUF` where the kernel allows
/// (best effort; `None` keeps its defaults).
pub fn reuseport_group(
    addr: SocketAddr,
    n: usize,
    buffer: Option<usize>,
) -> Result<Vec<std::net::UdpSocket>, crate::tcp::ListenError> {
    // Port 0 asks for any free port: if the one the kernel picked for the first socket is
    // taken before the group is whole (another socket of the namespace, of either family,
    // bound it meanwhile), any other will do as well, so try afresh.
    let tries = if addr.port() == 0 { PORT_ZERO_TRIES } else { 1 };
    let mut last = None;
    for _ in 0..tries {
        match bind_reuseport_group(addr, n, buffer) {
            Err(crate::tcp::ListenError::InUse { .. }) if addr.port() == 0 => {
                last = Some(crate::tcp::ListenError::InUse { addr });
            }
            other => return other,
        }
    }
    Err(last.unwrap_or(crate::tcp::ListenError::InUse { addr }))
}

/// How many ports [`reuseport_group`] tries for port 0 before it gives up.
const PORT_ZERO_TRIES: usize = 8;

fn bind_reuseport_group(
    addr: SocketAddr,
    n: usize,
    buffer: Option<usize>,
) -> Result<Vec<std::net::UdpSocket>, crate::tcp::ListenError> {
    use crate::tcp::ListenError;
    use socket2::{Domain, Protocol, Socket, Type};

    let wrap = |source: io::Error| {
        if source.kind() == io::ErrorKind::AddrInUse {
            ListenError::InUse { addr }
        } else {
            ListenError::Io { addr, source }
        }
    };
    let mut out: Vec<std::net::UdpSocket> = Vec::with_capacity(n);
    let mut bind_addr = addr;
    for _ in 0..n {
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM.nonblocking().cloexec(), Some(Protocol::UDP))
            .map_err(wrap)?;
        s.set_reuse_port(true).map_err(wrap)?;
        if addr.is_ipv6() {
            s.set_only_v6(true).map_err(wrap)?;
        }
        if let Some(bytes) = buffer {
            let _ = s.set_recv_buffer_size(bytes);
            let _ = s.set_send_buffer_size(bytes);
        }
        s.bind(&bind_addr.into()).map_err(wrap)?;
        let socket: std::net::UdpSocket = s.into();
        if bind_addr.port() == 0 {
            bind_addr = socket.local_addr().map_err(wrap)?;
        }
        out.push(socket);
    }
    refuse_shared_port(addr, &out)?;
    Ok(out)
}

/// Refuses a port that a UDP socket other than `ours` (a reuseport group just bound, any
/// address family) is already bound to in this network namespace: `SO_REUSEPORT` would
/// otherwise share its datagrams with another process without a word. `addr` is what was
/// asked for (for the error); the port is read from `ours`.
pub fn refuse_shared_port(addr: SocketAddr, ours: &[std::net::UdpSocket]) -> Result<(), crate::tcp::ListenError> {
    use crate::tcp::{foreign_socket, socket_inode, ListenError, SocketTable};
    use std::os::fd::AsRawFd;
    let Some(bound) = ours.first().and_then(|s| s.local_addr().ok()) else { return Ok(()) };
    let inodes: Vec<u64> = ours.iter().filter_map(|s| socket_inode(s.as_raw_fd())).collect();
    if let Some(other) = foreign_socket(SocketTable::UdpBound, bound, &inodes) {
        tracing::debug!(%bound, inode = other, "another UDP socket is already bound to this port");
        return Err(ListenError::InUse { addr });
    }
    Ok(())
}

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic/socket.h; the same on x86, Arm and RISC-V).
const SO_ATTACH_REUSEPORT_CBPF: c_int = 51;

/// Attaches the classic BPF program `code` to the reuseport group `socket` belongs to (any
/// member will do: the program is the group's). It sees each datagram's payload at offset 0
/// and returns the index of the group's socket to deliver it to; the kernel falls back to its
/// hash when the index is out of range. Needs no `CAP_BPF`.
pub fn attach_reuseport_cbpf(socket: &impl std::os::fd::AsRawFd, code: &[libc::sock_filter]) -> io::Result<()> {
    let len = u16::try_from(code.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "classic BPF program too long"))?;
    let prog = libc::sock_fprog { len, filter: code.as_ptr().cast_mut() };
    // SAFETY: `prog` points at `code`, `len` live instructions, for the duration of the call;
    // the kernel only reads and copies them; the option length is the size of `prog`.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod reuseport_tests {
    use super::reuseport_group;
    use crate::tcp::ListenError;

    #[test]
    fn a_udp_port_another_socket_holds_is_refused_even_with_reuseport() {
        let group = reuseport_group("127.0.0.1:0".parse().unwrap(), 3, Some(1 << 20)).unwrap();
        assert_eq!(group.len(), 3);
        let addr = group[0].local_addr().unwrap();
        assert!(group.iter().all(|s| s.local_addr().unwrap() == addr), "one port for the group");
        // A second group on the same port (as a second corepin would make) is refused.
        assert!(matches!(reuseport_group(addr, 1, None), Err(ListenError::InUse { .. })));
        drop(group);
        // A plain socket without SO_REUSEPORT is refused by bind itself.
        let plain = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let taken = plain.local_addr().unwrap();
        assert!(matches!(reuseport_group(taken, 2, None), Err(ListenError::InUse { .. })));
    }
}
