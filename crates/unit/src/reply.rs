//! Packets a unit originates itself: ARP and neighbour discovery, ICMP errors and echo replies
//! (dispatcher), TCP resets and ICMP unreachables for `reject` (data plane).
//!
//! Each builder appends to a caller-owned buffer so hot paths reuse one allocation.

use std::net::{Ipv4Addr, Ipv6Addr};

use dva_wire::checksum;
use dva_wire::ip_proto;
use dva_wire::{EthernetAddress, Icmpv6Packet, NdiscRepr};

use crate::classify::Classified;

/// TTL/hop limit of packets we originate (Linux's default).
pub const DEFAULT_TTL: u8 = 64;
/// RFC 1812 asks for as much of the original as fits in 576 bytes; the same bound keeps our replies small.
const ICMP_QUOTE_V4: usize = 576 - 20 - 8;
/// RFC 4443: as much as fits in the minimum IPv6 MTU.
const ICMP_QUOTE_V6: usize = 1280 - 40 - 8;

pub fn ethernet(out: &mut Vec<u8>, dst: EthernetAddress, src: EthernetAddress, ethertype: u16) {
    out.extend_from_slice(&dst.0);
    out.extend_from_slice(&src.0);
    out.extend_from_slice(&ethertype.to_be_bytes());
}

/// ARP request or reply (Ethernet/IPv4), without the Ethernet header.
pub fn arp(
    out: &mut Vec<u8>,
    op: u16,
    sha: EthernetAddress,
    spa: Ipv4Addr,
    tha: EthernetAddress,
    tpa: Ipv4Addr,
) {
    out.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    out.extend_from_slice(&op.to_be_bytes());
    out.extend_from_slice(&sha.0);
    out.extend_from_slice(&spa.octets());
    out.extend_from_slice(&tha.0);
    out.extend_from_slice(&tpa.octets());
}

/// Append an IPv4 header (no options, DF set) and return its offset in `out`.
pub fn ipv4_header(
    out: &mut Vec<u8>,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    payload_len: usize,
    ttl: u8,
) -> usize {
    let start = out.len();
    let total = (20 + payload_len).min(usize::from(u16::MAX)) as u16;
    out.extend_from_slice(&[0x45, 0]);
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0x40, 0, ttl, proto, 0, 0]);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&dst.octets());
    let c = checksum::data(&out[start..start + 20]);
    out[start + 10..start + 12].copy_from_slice(&c.to_be_bytes());
    start
}

pub fn ipv6_header(
    out: &mut Vec<u8>,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next: u8,
    payload_len: usize,
    hop_limit: u8,
) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0x60, 0, 0, 0]);
    out.extend_from_slice(&(payload_len.min(usize::from(u16::MAX)) as u16).to_be_bytes());
    out.extend_from_slice(&[next, hop_limit]);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&dst.octets());
    start
}

fn l4_checksum_v4(seg: &[u8], src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> u16 {
    checksum::fold(
        checksum::pseudo_header_v4(&src, &dst, proto, seg.len() as u32) + checksum::sum(seg),
    )
}

fn l4_checksum_v6(seg: &[u8], src: Ipv6Addr, dst: Ipv6Addr, proto: u8) -> u16 {
    checksum::fold(
        checksum::pseudo_header_v6(&src, &dst, proto, seg.len() as u32) + checksum::sum(seg),
    )
}

/// An ICMPv4 error about `orig` (an IPv4 packet), from `src` to `orig`'s source.
pub fn icmpv4_error(
    out: &mut Vec<u8>,
    orig: &[u8],
    src: Ipv4Addr,
    typ: u8,
    code: u8,
) -> Option<()> {
    icmpv4_error_with(out, orig, src, typ, code, 0)
}

/// An ICMPv4 error whose second word is `rest` (fragmentation needed: the next-hop MTU in its
/// low 16 bits, RFC 1191).
pub fn icmpv4_error_with(
    out: &mut Vec<u8>,
    orig: &[u8],
    src: Ipv4Addr,
    typ: u8,
    code: u8,
    rest: u32,
) -> Option<()> {
    let osrc = Ipv4Addr::new(*orig.get(12)?, orig[13], orig[14], orig[15]);
    let quote = &orig[..orig.len().min(ICMP_QUOTE_V4)];
    ipv4_header(out, src, osrc, ip_proto::ICMP, 8 + quote.len(), DEFAULT_TTL);
    let s = out.len();
    out.extend_from_slice(&[typ, code, 0, 0]);
    out.extend_from_slice(&rest.to_be_bytes());
    out.extend_from_slice(quote);
    let c = checksum::data(&out[s..]);
    out[s + 2..s + 4].copy_from_slice(&c.to_be_bytes());
    Some(())
}

pub fn icmpv6_error(
    out: &mut Vec<u8>,
    orig: &[u8],
    src: Ipv6Addr,
    typ: u8,
    code: u8,
    param: u32,
) -> Option<()> {
    let osrc: [u8; 16] = orig.get(8..24)?.try_into().ok()?;
    let osrc = Ipv6Addr::from(osrc);
    let quote = &orig[..orig.len().min(ICMP_QUOTE_V6)];
    ipv6_header(
        out,
        src,
        osrc,
        ip_proto::ICMPV6,
        8 + quote.len(),
        DEFAULT_TTL,
    );
    let s = out.len();
    out.extend_from_slice(&[typ, code, 0, 0]);
    out.extend_from_slice(&param.to_be_bytes());
    out.extend_from_slice(quote);
    let c = l4_checksum_v6(&out[s..], src, osrc, ip_proto::ICMPV6);
    out[s + 2..s + 4].copy_from_slice(&c.to_be_bytes());
    Some(())
}

/// Echo reply to an echo request addressed to the appliance itself (`req` is the whole IP packet).
pub fn echo_reply(out: &mut Vec<u8>, req: &[u8], c: &Classified) -> Option<()> {
    let l4 = req.get(c.l4_offset..c.ip_len)?;
    if l4.len() < 8 {
        return None;
    }
    match (c.key.src, c.key.dst) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => {
            ipv4_header(out, d, s, ip_proto::ICMP, l4.len(), DEFAULT_TTL);
            let st = out.len();
            out.extend_from_slice(l4);
            out[st] = 0;
            out[st + 2..st + 4].copy_from_slice(&[0, 0]);
            let ck = checksum::data(&out[st..]);
            out[st + 2..st + 4].copy_from_slice(&ck.to_be_bytes());
        }
        (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => {
            ipv6_header(out, d, s, ip_proto::ICMPV6, l4.len(), DEFAULT_TTL);
            let st = out.len();
            out.extend_from_slice(l4);
            out[st] = 129;
            out[st + 2..st + 4].copy_from_slice(&[0, 0]);
            let ck = l4_checksum_v6(&out[st..], d, s, ip_proto::ICMPV6);
            out[st + 2..st + 4].copy_from_slice(&ck.to_be_bytes());
        }
        _ => return None,
    }
    Some(())
}

/// TCP RST answering `orig` as its destination would (RFC 793 reset generation), as nftables'
/// `reject with tcp reset` does: from the original destination to the original source.
pub fn tcp_reset(out: &mut Vec<u8>, orig: &[u8], c: &Classified) -> Option<()> {
    if c.key.proto != ip_proto::TCP {
        return None;
    }
    let tcp = orig.get(c.l4_offset..c.ip_len)?;
    if tcp.len() < 20 {
        return None;
    }
    let flags = tcp[13];
    if flags & 0x04 != 0 {
        return None; // never answer a reset with a reset
    }
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    let data_off = usize::from(tcp[12] >> 4) * 4;
    let payload = tcp.len().saturating_sub(data_off) as u32;
    let (rseq, rack, rflags) = if flags & 0x10 != 0 {
        (ack, 0, 0x04)
    } else {
        let syn_fin = u32::from(flags & 0x02 != 0) + u32::from(flags & 0x01 != 0);
        (0, seq.wrapping_add(payload).wrapping_add(syn_fin), 0x14)
    };
    let mut seg = [0u8; 20];
    seg[0..2].copy_from_slice(&c.key.dst_port.to_be_bytes());
    seg[2..4].copy_from_slice(&c.key.src_port.to_be_bytes());
    seg[4..8].copy_from_slice(&rseq.to_be_bytes());
    seg[8..12].copy_from_slice(&rack.to_be_bytes());
    seg[12] = 5 << 4;
    seg[13] = rflags;
    match (c.key.src, c.key.dst) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => {
            let ck = l4_checksum_v4(&seg, d, s, ip_proto::TCP);
            seg[16..18].copy_from_slice(&ck.to_be_bytes());
            ipv4_header(out, d, s, ip_proto::TCP, 20, DEFAULT_TTL);
        }
        (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => {
            let ck = l4_checksum_v6(&seg, d, s, ip_proto::TCP);
            seg[16..18].copy_from_slice(&ck.to_be_bytes());
            ipv6_header(out, d, s, ip_proto::TCP, 20, DEFAULT_TTL);
        }
        _ => return None,
    }
    out.extend_from_slice(&seg);
    Some(())
}

/// The solicited-node multicast address and its Ethernet group for a target (RFC 4291, RFC 2464).
pub fn solicited_node(target: Ipv6Addr) -> (Ipv6Addr, EthernetAddress) {
    let t = target.octets();
    let addr = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(t[13]),
        u16::from_be_bytes([t[14], t[15]]),
    );
    let a = addr.octets();
    (
        addr,
        EthernetAddress([0x33, 0x33, a[12], a[13], a[14], a[15]]),
    )
}

/// A neighbour solicitation or advertisement from `src` to `dst`, as an IPv6 packet with hop
/// limit 255 (RFC 4861 requires it).
pub fn ndisc(out: &mut Vec<u8>, src: Ipv6Addr, dst: Ipv6Addr, msg: &NdiscRepr) {
    // 24 bytes of message and 8 of link-layer address option at the most.
    let mut body = [0u8; 32];
    let body = &mut body[..msg.buffer_len()];
    msg.emit(&mut Icmpv6Packet::new_unchecked(&mut *body), &src, &dst);
    ipv6_header(out, src, dst, ip_proto::ICMPV6, body.len(), 255);
    out.extend_from_slice(body);
}

/// Recompute a TCP/UDP/ICMPv6 checksum over the whole packet: the kernel left it partial
/// (TP_STATUS_CSUMNOTREADY) because the sender's interface offloads checksumming. TCP and UDP
/// are `dva_wire::gso::complete_checksum`'s job (the offload path's); ICMPv6 is done here.
pub fn complete_l4_checksum(ip: &mut [u8], c: &Classified) -> bool {
    let (off, end) = (c.l4_offset, c.ip_len.min(ip.len()));
    if c.fragment {
        return false;
    }
    match (c.key.proto, c.key.src, c.key.dst) {
        (ip_proto::TCP | ip_proto::UDP, _, _) => {
            dva_wire::gso::complete_checksum(&mut ip[..end], off, c.key.proto).is_ok()
        }
        (ip_proto::ICMPV6, std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) if end >= off + 4 => {
            ip[off + 2..off + 4].copy_from_slice(&[0, 0]);
            let ck = l4_checksum_v6(&ip[off..end], s, d, ip_proto::ICMPV6);
            ip[off + 2..off + 4].copy_from_slice(&ck.to_be_bytes());
            true
        }
        _ => false,
    }
}

/// A TCP segment from `src:sport` to `dst:dport` (no options), with its IP header, appended to
/// `out`. For packets the appliance itself originates (health checks).
#[allow(clippy::too_many_arguments)]
pub fn tcp_segment(
    out: &mut Vec<u8>,
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
) -> Option<()> {
    let mut seg = vec![0u8; 20 + payload.len()];
    seg[0..2].copy_from_slice(&sport.to_be_bytes());
    seg[2..4].copy_from_slice(&dport.to_be_bytes());
    seg[4..8].copy_from_slice(&seq.to_be_bytes());
    seg[8..12].copy_from_slice(&ack.to_be_bytes());
    seg[12] = 5 << 4;
    seg[13] = flags;
    seg[14..16].copy_from_slice(&65535u16.to_be_bytes());
    seg[20..].copy_from_slice(payload);
    let len = seg.len();
    match (src, dst) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => {
            let ck = l4_checksum_v4(&seg, s, d, ip_proto::TCP);
            seg[16..18].copy_from_slice(&ck.to_be_bytes());
            ipv4_header(out, s, d, ip_proto::TCP, len, DEFAULT_TTL);
        }
        (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => {
            let ck = l4_checksum_v6(&seg, s, d, ip_proto::TCP);
            seg[16..18].copy_from_slice(&ck.to_be_bytes());
            ipv6_header(out, s, d, ip_proto::TCP, len, DEFAULT_TTL);
        }
        _ => return None,
    }
    out.extend_from_slice(&seg);
    Some(())
}

/// A token bucket for packets we originate (ICMP errors, resets): a flood of packets that
/// earn one must not become a flood of them (Linux: icmp_ratelimit, icmp_msgs_per_sec).
pub struct TokenBucket {
    tokens: f64,
    last: std::time::Instant,
    rate: f64,
    burst: f64,
}

impl TokenBucket {
    /// `rate` tokens a second, at most `burst` saved; starts full.
    pub fn new(rate: f64, burst: f64, now: std::time::Instant) -> TokenBucket {
        TokenBucket {
            tokens: burst,
            last: now,
            rate,
            burst,
        }
    }

    /// A bucket with a `1/n` share of this one's rate and burst (at least one token), for one
    /// of `n` threads that together must stay within it.
    pub fn share(&self, n: u32) -> TokenBucket {
        let n = f64::from(n.max(1));
        let burst = (self.burst / n).max(1.0);
        TokenBucket {
            tokens: burst,
            last: self.last,
            rate: self.rate / n,
            burst,
        }
    }

    /// Spend a token if there is one.
    pub fn take(&mut self, now: std::time::Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod budget_tests {
    use super::TokenBucket;
    use std::time::{Duration, Instant};

    #[test]
    fn a_burst_then_the_rate() {
        let now = Instant::now();
        let mut b = TokenBucket::new(10.0, 3.0, now);
        assert_eq!((0..5).filter(|_| b.take(now)).count(), 3);
        let later = now + Duration::from_millis(200);
        assert_eq!((0..5).filter(|_| b.take(later)).count(), 2);
    }
}

#[cfg(test)]
mod ndisc_tests {
    use std::net::Ipv6Addr;

    use dva_wire::icmpv6::ndisc_flags;
    use dva_wire::{ip_proto, EthernetAddress, NdiscRepr};

    use super::{l4_checksum_v6, ndisc};

    /// The layout RFC 4861 §4.4 gives a solicited advertisement with its target link-layer
    /// address option, byte by byte.
    #[test]
    fn an_advertisement_byte_by_byte() {
        let (src, dst): (Ipv6Addr, Ipv6Addr) = (
            "2001:db8::1".parse().expect("address"),
            "fe80::2".parse().unwrap(),
        );
        let mac = EthernetAddress([0x02, 0xd7, 0xa0, 0, 0, 1]);
        let mut out = Vec::new();
        let advert = NdiscRepr::NeighborAdvert {
            flags: ndisc_flags::SOLICITED | ndisc_flags::OVERRIDE,
            target_addr: src,
            lladdr: Some(mac),
        };
        ndisc(&mut out, src, dst, &advert);

        let mut body = [0u8; 32];
        body[0] = 136;
        body[4] = 0x60;
        body[8..24].copy_from_slice(&src.octets());
        body[24..26].copy_from_slice(&[2, 1]);
        body[26..32].copy_from_slice(&mac.0);
        let ck = l4_checksum_v6(&body, src, dst, ip_proto::ICMPV6);
        body[2..4].copy_from_slice(&ck.to_be_bytes());
        assert_eq!(out.len(), 40 + 32);
        assert_eq!((out[6], out[7]), (ip_proto::ICMPV6, 255));
        assert_eq!(&out[4..6], &32u16.to_be_bytes());
        assert_eq!(&out[40..], &body);

        // A solicitation carries the source link-layer address option (type 1).
        out.clear();
        let solicit = NdiscRepr::NeighborSolicit {
            target_addr: dst,
            lladdr: Some(mac),
        };
        ndisc(&mut out, src, dst, &solicit);
        assert_eq!((out[40], out[44], out[64], out[65]), (135, 0, 1, 1));
    }
}
