//! XDP programs attached the legacy way, through netlink (`ip link set dev IF xdp obj ...`, or
//! a loader on a kernel without XDP bpf_links): finding the one on an interface and removing
//! it. A bpf_link cannot be left behind by a crashed process, but such an attachment can, and
//! it blocks bpf_link creation (EBUSY). Owns only rtnetlink messages; the kernel refuses to
//! remove an attachment that a live process holds through a bpf_link, so this never takes
//! an interface from a running program.

use std::io;
use std::mem::size_of;

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_SETLINK: u16 = 19;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLA_F_NESTED: u16 = 0x8000;
const IFLA_XDP: u16 = 43;
const IFLA_XDP_FD: u16 = 1;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_FLAGS: u16 = 3;
const IFLA_XDP_PROG_ID: u16 = 4;
const XDP_ATTACHED_DRV: u8 = 1;
const XDP_ATTACHED_SKB: u8 = 2;
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// The XDP program on an interface, as netlink reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The program's id.
    pub id: u32,
    /// Native (`true`) or generic.
    pub native: bool,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A request: header, ifinfomsg for `ifindex`, then `attrs` (already encoded).
fn request(ty: u16, flags: u16, ifindex: u32, attrs: &[u8]) -> Vec<u8> {
    let len = 16 + 16 + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&ty.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
                                              // ifinfomsg: family, pad, type, index, flags, change.
    m.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    m.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    m.extend_from_slice(&[0; 8]);
    m.extend_from_slice(attrs);
    m
}

fn attr(ty: u16, data: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(align4(4 + data.len()));
    a.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
    a.extend_from_slice(&ty.to_ne_bytes());
    a.extend_from_slice(data);
    a.resize(align4(a.len()), 0);
    a
}

/// The attributes in `b`: (type without flags, data).
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
        let ty = u16::from_ne_bytes([b[2], b[3]]) & !NLA_F_NESTED;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((ty, &b[4..len]));
        b = &b[align4(len).min(b.len())..];
    }
    out
}

/// Sends `msg` on a fresh rtnetlink socket and returns the reply datagram.
fn exchange(msg: &[u8]) -> io::Result<Vec<u8>> {
    // SAFETY: plain socket creation; the descriptor is owned by `fd` below.
    let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor owned by nobody else.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    // SAFETY: all-zero is a valid sockaddr_nl: the kernel (pid 0).
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: `msg` and `kernel` are live for the call; lengths are theirs.
    let n = unsafe {
        libc::sendto(
            raw,
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: `buf` is writable for its length.
    let n = unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// The errno of an NLMSG_ERROR reply (0 for an acknowledgement), if `reply` is one.
fn nl_error(reply: &[u8]) -> Option<i32> {
    if reply.len() >= 20 && u16::from_ne_bytes([reply[4], reply[5]]) == NLMSG_ERROR {
        return Some(-i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]));
    }
    None
}

/// The XDP program attached to interface `ifindex` (by any means), if any.
pub fn find(ifindex: u32) -> io::Result<Option<Found>> {
    let reply = exchange(&request(RTM_GETLINK, NLM_F_REQUEST, ifindex, &[]))?;
    if let Some(errno) = nl_error(&reply).filter(|e| *e != 0) {
        return Err(io::Error::from_raw_os_error(errno));
    }
    if reply.len() < 32 || u16::from_ne_bytes([reply[4], reply[5]]) != RTM_NEWLINK {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "unexpected rtnetlink reply"));
    }
    let len = (u32::from_ne_bytes([reply[0], reply[1], reply[2], reply[3]]) as usize).min(reply.len());
    let Some((_, xdp)) = attrs(&reply[32..len]).into_iter().find(|(ty, _)| *ty == IFLA_XDP) else {
        return Ok(None);
    };
    let (mut mode, mut id) = (0u8, 0u32);
    for (ty, data) in attrs(xdp) {
        match ty {
            IFLA_XDP_ATTACHED if !data.is_empty() => mode = data[0],
            IFLA_XDP_PROG_ID if data.len() >= 4 => id = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]),
            _ => {}
        }
    }
    Ok(match mode {
        XDP_ATTACHED_DRV if id != 0 => Some(Found { id, native: true }),
        XDP_ATTACHED_SKB if id != 0 => Some(Found { id, native: false }),
        _ => None,
    })
}

/// Removes the program `found` describes from `ifindex` (netlink, fd -1). The kernel refuses
/// with EBUSY when a bpf_link holds it.
pub fn remove(ifindex: u32, found: &Found) -> io::Result<()> {
    let flags = if found.native { XDP_FLAGS_DRV_MODE } else { XDP_FLAGS_SKB_MODE };
    let mut nested = attr(IFLA_XDP_FD, &(-1i32).to_ne_bytes());
    nested.extend(attr(IFLA_XDP_FLAGS, &flags.to_ne_bytes()));
    let body = attr(IFLA_XDP | NLA_F_NESTED, &nested);
    let reply = exchange(&request(RTM_SETLINK, NLM_F_REQUEST | NLM_F_ACK, ifindex, &body))?;
    match nl_error(&reply) {
        Some(0) => Ok(()),
        Some(errno) => Err(io::Error::from_raw_os_error(errno)),
        None => Err(io::Error::new(io::ErrorKind::InvalidData, "no acknowledgement from rtnetlink")),
    }
}

/// The name of loaded program `id` (as the kernel keeps it: up to 15 bytes).
pub fn program_name(id: u32) -> Option<String> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .and_then(|p| p.name_as_str().map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_with_padding() {
        let mut b = attr(IFLA_XDP_FD, &(-1i32).to_ne_bytes());
        b.extend(attr(IFLA_XDP_ATTACHED, &[XDP_ATTACHED_SKB]));
        b.extend(attr(IFLA_XDP_PROG_ID, &7u32.to_ne_bytes()));
        let a = attrs(&b);
        assert_eq!(a.len(), 3);
        assert_eq!(a[1], (IFLA_XDP_ATTACHED, &[XDP_ATTACHED_SKB][..]));
        assert_eq!(a[2].1, 7u32.to_ne_bytes());
        assert!(attrs(&[9, 0, 1]).is_empty(), "a cut attribute is not read");
    }

    #[test]
    fn the_kernel_answers_for_loopback_and_refuses_a_missing_interface() {
        // Loopback is index 1 in every namespace; it answers whether or not it has a program.
        assert!(find(1).is_ok());
        let missing = find(1_000_000).expect_err("no such interface");
        assert_eq!(missing.raw_os_error(), Some(libc::ENODEV), "{missing}");
    }
}
