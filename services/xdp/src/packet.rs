//! Reading a UDP datagram out of an Ethernet frame (what an AF_XDP socket receives), and
//! writing the IP and UDP headers of one (what a pcap of the socket source holds). The same
//! rules as the XDP program: up to two VLAN tags, IPv4 with options, IPv6 whose next header is
//! UDP; the lengths in the headers, not the frame's, delimit the payload (short frames are
//! padded). Owns no state.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const UDP: u8 = 17;

/// A UDP datagram found in a frame: its addresses and where its payload lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpInFrame {
    /// Source address and port.
    pub from: SocketAddr,
    /// Destination address and port.
    pub to: SocketAddr,
    /// The payload's range in the frame.
    pub payload: std::ops::Range<usize>,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Parses `frame`; `None` for anything that is not an unfragmented UDP datagram whose headers
/// and payload fit in the frame.
pub fn parse_udp(frame: &[u8]) -> Option<UdpInFrame> {
    let mut proto = be16(frame, 12)?;
    let mut at = 14;
    for _ in 0..2 {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        proto = be16(frame, at + 2)?;
        at += 4;
    }
    let (src, dst, udp_at, ip_end) = match proto {
        ETH_P_IP => {
            let ip = frame.get(at..at + 20)?;
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            if ip[0] >> 4 != 4 || ihl < 20 || u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 || ip[9] != UDP {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let src = IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]));
            let dst = IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
            (src, dst, at + ihl, at.checked_add(total)?)
        }
        ETH_P_IPV6 => {
            let ip = frame.get(at..at + 40)?;
            if ip[0] >> 4 != 6 || ip[6] != UDP {
                return None;
            }
            let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let src = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).ok()?));
            let dst = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).ok()?));
            (src, dst, at + 40, at + 40 + payload)
        }
        _ => return None,
    };
    let udp = frame.get(udp_at..udp_at + 8)?;
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    let end = udp_at.checked_add(udp_len)?;
    if udp_len < 8 || end > ip_end || end > frame.len() {
        return None;
    }
    Some(UdpInFrame {
        from: SocketAddr::new(src, u16::from_be_bytes([udp[0], udp[1]])),
        to: SocketAddr::new(dst, u16::from_be_bytes([udp[2], udp[3]])),
        payload: udp_at + 8..end,
    })
}

fn sum16(mut acc: u32, bytes: &[u8]) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// Appends to `out` the IP and UDP headers of a datagram from `from` to `to` carrying
/// `payload` (not the payload itself), checksums included: what a capture of it would hold
/// after the link layer. IPv4 when both addresses are IPv4 (or v4-mapped), else IPv6.
/// Returns `false`, writing nothing, when the datagram is too long for one IP packet.
pub fn ip_udp_headers(out: &mut Vec<u8>, from: SocketAddr, to: SocketAddr, payload: &[u8]) -> bool {
    let canon = |ip: IpAddr| ip.to_canonical();
    let (src, dst) = (canon(from.ip()), canon(to.ip()));
    let udp_len = payload.len() + 8;
    let mut udp = Vec::with_capacity(8);
    udp.extend_from_slice(&from.port().to_be_bytes());
    udp.extend_from_slice(&to.port().to_be_bytes());
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let Ok(total) = u16::try_from(udp_len + 20) else { return false };
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&total.to_be_bytes());
            ip[6] = 0x40; // don't fragment
            ip[8] = 64;
            ip[9] = UDP;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let c = fold(sum16(0, &ip));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
            let pseudo = sum16(sum16(0, &s.octets()), &d.octets()) + u32::from(UDP) + udp_len as u32;
            let c = fold(sum16(sum16(pseudo, &udp), payload));
            udp.extend_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
            out.extend_from_slice(&ip);
        }
        _ => {
            let to6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            let (s, d) = (to6(src), to6(dst));
            let Ok(len) = u16::try_from(udp_len) else { return false };
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&len.to_be_bytes());
            ip[6] = UDP;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            udp.extend_from_slice(&len.to_be_bytes());
            let pseudo = sum16(sum16(0, &s.octets()), &d.octets()) + u32::from(UDP) + udp_len as u32;
            let c = fold(sum16(sum16(pseudo, &udp), payload));
            udp.extend_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
            out.extend_from_slice(&ip);
        }
    }
    out.extend_from_slice(&udp);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(vlans: usize, l3: &[u8], ethertype: u16) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        for _ in 0..vlans {
            f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
            f.extend_from_slice(&[0, 5]);
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(l3);
        f
    }

    #[test]
    fn headers_written_here_parse_back_with_vlans_and_padding() {
        let from: SocketAddr = "10.1.2.3:4000".parse().unwrap();
        let to: SocketAddr = "10.9.8.7:53".parse().unwrap();
        for vlans in 0..=2 {
            let mut l3 = Vec::new();
            assert!(ip_udp_headers(&mut l3, from, to, b"hi"));
            l3.extend_from_slice(b"hi");
            let mut f = frame(vlans, &l3, ETH_P_IP);
            f.resize(60, 0); // Ethernet minimum: padding after the datagram
            let u = parse_udp(&f).unwrap();
            assert_eq!((u.from, u.to, &f[u.payload]), (from, to, &b"hi"[..]), "{vlans} VLAN tags");
        }
        let from6: SocketAddr = "[fd00::1]:5".parse().unwrap();
        let to6: SocketAddr = "[fd00::2]:6".parse().unwrap();
        let mut l3 = Vec::new();
        assert!(ip_udp_headers(&mut l3, from6, to6, b"six"));
        l3.extend_from_slice(b"six");
        let f = frame(0, &l3, ETH_P_IPV6);
        let u = parse_udp(&f).unwrap();
        assert_eq!((u.from, u.to, &f[u.payload]), (from6, to6, &b"six"[..]));
    }

    #[test]
    fn checksums_verify() {
        let mut l3 = Vec::new();
        let payload = b"checksum me, odd length";
        ip_udp_headers(&mut l3, "192.0.2.1:1".parse().unwrap(), "192.0.2.2:2".parse().unwrap(), payload);
        assert_eq!(fold(sum16(0, &l3[..20])), 0, "IPv4 header checksum");
        let mut pseudo = sum16(sum16(0, &l3[12..16]), &l3[16..20]) + 17 + (8 + payload.len()) as u32;
        pseudo = sum16(sum16(pseudo, &l3[20..28]), payload);
        assert_eq!(fold(pseudo), 0, "UDP checksum");
    }

    #[test]
    fn what_is_not_a_whole_udp_datagram_is_refused() {
        let mut l3 = Vec::new();
        ip_udp_headers(&mut l3, "10.0.0.1:1".parse().unwrap(), "10.0.0.2:2".parse().unwrap(), &[1; 100]);
        l3.extend_from_slice(&[1; 100]);
        let good = frame(0, &l3, ETH_P_IP);
        assert!(parse_udp(&good).is_some());
        for cut in [0, 13, 20, 33, 41, good.len() - 1] {
            assert!(parse_udp(&good[..cut]).is_none(), "cut at {cut}");
        }
        let mut bad_ihl = good.clone();
        bad_ihl[14] = 0x44;
        assert!(parse_udp(&bad_ihl).is_none());
        let mut fragment = good.clone();
        fragment[14 + 6] = 0x20; // more fragments
        assert!(parse_udp(&fragment).is_none());
        let mut tcp = good.clone();
        tcp[14 + 9] = 6;
        assert!(parse_udp(&tcp).is_none());
        let arp = frame(0, &[0; 28], 0x0806);
        assert!(parse_udp(&arp).is_none());
        let three_vlans = frame(3, &l3, ETH_P_IP);
        assert!(parse_udp(&three_vlans).is_none(), "a third tag is not looked through");
    }
}
