//! Test packets for the translating stages: builders with correct checksums, and a checker that
//! recomputes every checksum from scratch (with `dva-wire`) after a translation.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use dva_flow::FlowKey;
use dva_wire::{
    ip_proto, Icmpv4Packet, Icmpv6Packet, Ipv4Packet, Ipv6Packet, TcpPacket, UdpPacket,
};

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

pub fn key(proto: u8, src: &str, sport: u16, dst: &str, dport: u16) -> FlowKey {
    FlowKey {
        proto,
        src: ip(src),
        dst: ip(dst),
        src_port: sport,
        dst_port: dport,
    }
}

fn fill_l4(src: IpAddr, dst: IpAddr, p: u8, seg: &mut [u8]) {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => match p {
            ip_proto::TCP => TcpPacket::new_unchecked(seg).fill_checksum_v4(&s, &d),
            ip_proto::UDP => UdpPacket::new_unchecked(seg).fill_checksum_v4(&s, &d),
            ip_proto::ICMP => Icmpv4Packet::new_unchecked(seg).fill_checksum(),
            _ => {}
        },
        (IpAddr::V6(s), IpAddr::V6(d)) => match p {
            ip_proto::TCP => TcpPacket::new_unchecked(seg).fill_checksum_v6(&s, &d),
            ip_proto::UDP => UdpPacket::new_unchecked(seg).fill_checksum_v6(&s, &d),
            ip_proto::ICMPV6 => Icmpv6Packet::new_unchecked(seg).fill_checksum(&s, &d),
            _ => {}
        },
        _ => panic!("mixed families"),
    }
}

/// An IP packet around transport bytes `l4` (whose checksum field this fills).
pub fn packet(src: IpAddr, dst: IpAddr, p: u8, mut l4: Vec<u8>) -> Vec<u8> {
    fill_l4(src, dst, p, &mut l4);
    let mut v = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = vec![0u8; 20];
            h[0] = 0x45;
            h[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            h[4..6].copy_from_slice(&0x1c46u16.to_be_bytes());
            h[6] = 0x40; // DF
            h[8] = 64;
            h[9] = p;
            h[12..16].copy_from_slice(&s.octets());
            h[16..20].copy_from_slice(&d.octets());
            Ipv4Packet::new_unchecked(&mut h[..]).fill_checksum();
            h
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut h = vec![0u8; 40];
            h[0] = 0x60;
            h[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
            h[6] = p;
            h[7] = 64;
            h[8..24].copy_from_slice(&s.octets());
            h[24..40].copy_from_slice(&d.octets());
            h
        }
        _ => panic!("mixed families"),
    };
    v.extend_from_slice(&l4);
    v
}

fn tcp_bytes(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&0x5e2b_6f4cu32.to_be_bytes());
    t[12] = 0x50;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    t.extend_from_slice(b"hello, world");
    t
}

pub fn tcp4(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Vec<u8> {
    packet(
        ip(src),
        ip(dst),
        ip_proto::TCP,
        tcp_bytes(sport, dport, flags),
    )
}

pub fn tcp6(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Vec<u8> {
    tcp4(src, sport, dst, dport, flags)
}

fn udp_bytes(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(payload);
    u
}

pub fn udp4(src: &str, sport: u16, dst: &str, dport: u16, payload: &[u8]) -> Vec<u8> {
    packet(
        ip(src),
        ip(dst),
        ip_proto::UDP,
        udp_bytes(sport, dport, payload),
    )
}

pub fn udp6(src: &str, sport: u16, dst: &str, dport: u16, payload: &[u8]) -> Vec<u8> {
    udp4(src, sport, dst, dport, payload)
}

fn echo_bytes(v6: bool, id: u16, request: bool) -> Vec<u8> {
    let ty = match (v6, request) {
        (false, true) => 8,
        (false, false) => 0,
        (true, true) => 128,
        (true, false) => 129,
    };
    let mut e = vec![ty, 0, 0, 0];
    e.extend_from_slice(&id.to_be_bytes());
    e.extend_from_slice(&7u16.to_be_bytes());
    e.extend_from_slice(b"abcdefghijklmnopq");
    e
}

pub fn echo4(src: &str, dst: &str, id: u16, request: bool) -> Vec<u8> {
    packet(
        ip(src),
        ip(dst),
        ip_proto::ICMP,
        echo_bytes(false, id, request),
    )
}

pub fn echo6(src: &str, dst: &str, id: u16, request: bool) -> Vec<u8> {
    packet(
        ip(src),
        ip(dst),
        ip_proto::ICMPV6,
        echo_bytes(true, id, request),
    )
}

/// An ICMP / ICMPv6 error from `from` to `to` quoting `quoted` (all of it).
pub fn icmp_error(from: &str, to: &str, ty: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(quoted);
    let p = if ip(from).is_ipv4() {
        ip_proto::ICMP
    } else {
        ip_proto::ICMPV6
    };
    packet(ip(from), ip(to), p, m)
}

pub fn icmp4_error(from: &str, to: &str, ty: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    icmp_error(from, to, ty, code, quoted)
}

fn verify_l4(src: IpAddr, dst: IpAddr, p: u8, seg: &[u8]) -> bool {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => match p {
            ip_proto::TCP => TcpPacket::new_unchecked(seg).verify_checksum_v4(&s, &d),
            ip_proto::UDP => UdpPacket::new_unchecked(seg).verify_checksum_v4(&s, &d),
            ip_proto::ICMP => Icmpv4Packet::new_unchecked(seg).verify_checksum(),
            _ => true,
        },
        (IpAddr::V6(s), IpAddr::V6(d)) => match p {
            ip_proto::TCP => TcpPacket::new_unchecked(seg).verify_checksum_v6(&s, &d),
            ip_proto::UDP => UdpPacket::new_unchecked(seg).verify_checksum_v6(&s, &d),
            ip_proto::ICMPV6 => Icmpv6Packet::new_unchecked(seg).verify_checksum(&s, &d),
            _ => true,
        },
        _ => false,
    }
}

/// `(src, dst, proto, l4 offset, end)` of an IP packet without extension headers.
fn ip_fields(pkt: &[u8]) -> (IpAddr, IpAddr, u8, usize, usize) {
    if pkt[0] >> 4 == 4 {
        let p = Ipv4Packet::new_unchecked(pkt);
        (
            IpAddr::V4(p.src_addr()),
            IpAddr::V4(p.dst_addr()),
            p.next_header(),
            usize::from(p.header_len()),
            usize::from(p.total_len()),
        )
    } else {
        let p = Ipv6Packet::new_unchecked(pkt);
        (
            IpAddr::V6(p.src_addr()),
            IpAddr::V6(p.dst_addr()),
            p.next_header(),
            40,
            40 + usize::from(p.payload_len()),
        )
    }
}

fn ports(p: u8, l4: &[u8]) -> (u16, u16) {
    match p {
        ip_proto::TCP | ip_proto::UDP => (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        ),
        ip_proto::ICMP | ip_proto::ICMPV6 => {
            let id = u16::from_be_bytes([l4[4], l4[5]]);
            (id, id)
        }
        _ => (0, 0),
    }
}

/// Recompute every checksum of `pkt` (outer IPv4 header, transport; for an ICMP error also the
/// quoted IPv4 header and, when quoted whole, the quoted transport checksum), panic on a wrong
/// one, and return the packet's tuple.
pub fn check(pkt: &[u8]) -> FlowKey {
    let (src, dst, p, l4, end) = ip_fields(pkt);
    if src.is_ipv4() {
        assert!(
            Ipv4Packet::new_unchecked(pkt).verify_checksum(),
            "IPv4 header checksum"
        );
    }
    let seg = &pkt[l4..end];
    assert!(verify_l4(src, dst, p, seg), "transport checksum of {p}");
    let (sp, dp) = ports(p, seg);
    let is_error = matches!(
        (p, seg[0]),
        (ip_proto::ICMP, 3 | 11 | 12) | (ip_proto::ICMPV6, 1..=4)
    );
    if is_error {
        let q = &seg[8..];
        let (is, id, ip_, il4, iend) = ip_fields(q);
        if is.is_ipv4() {
            assert!(
                Ipv4Packet::new_unchecked(q).verify_checksum(),
                "quoted IPv4 header checksum"
            );
        }
        if iend <= q.len() {
            assert!(
                verify_l4(is, id, ip_, &q[il4..iend]),
                "quoted transport checksum"
            );
        }
        return FlowKey {
            proto: p,
            src,
            dst,
            src_port: 0,
            dst_port: 0,
        };
    }
    FlowKey {
        proto: p,
        src,
        dst,
        src_port: sp,
        dst_port: dp,
    }
}

/// The tuple of the packet quoted by ICMP error `pkt`.
pub fn quoted_key(pkt: &[u8]) -> FlowKey {
    let (_, _, _, l4, _) = ip_fields(pkt);
    let q = &pkt[l4 + 8..];
    let (s, d, p, il4, _) = ip_fields(q);
    let (sp, dp) = ports(p, &q[il4..]);
    FlowKey {
        proto: p,
        src: s,
        dst: d,
        src_port: sp,
        dst_port: dp,
    }
}

#[allow(dead_code)]
pub fn v4(a: [u8; 4]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(a))
}

#[allow(dead_code)]
pub fn v6(a: u128) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from_bits(a))
}

/// Splitmix64: reproducible random inputs for property-style loops, without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}
