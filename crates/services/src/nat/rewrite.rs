//! In-place header rewriting for the translating stages (NAT, LB), with incremental checksums.
//!
//! [`parse`] reads what translation needs from an IP packet (no Ethernet header) and checks every
//! offset the rewriters will touch, so [`rewrite`] and [`rewrite_icmp_error`] never index out of
//! bounds (they also use checked slicing, so a caller that broke that contract would get an
//! untranslated packet, not a panic).
//!
//! Checksums are patched, never recomputed (RFC 1624): each rewritten 16-bit word adds
//! `~old + new` to the delta of every checksum that covers it — the IPv4 header checksum for
//! addresses, the TCP/UDP/ICMPv6 checksum for addresses (pseudo-header) and ports, the ICMPv4
//! checksum for the echo identifier — and each checksum is patched once at the end. A UDP
//! checksum of 0 over IPv4 means "none" and stays 0; a patched UDP checksum that comes out 0 is
//! sent as 0xFFFF (RFC 768). ICMP errors get the quoted packet translated as well (its addresses,
//! ports or echo id, its IPv4 header checksum and, when quoted, its transport checksum), and the
//! outer ICMP checksum patched for all of it, as Linux's `nf_nat_icmp_reply_translation` does
//! (Linux recomputes the outer ICMP checksum; patching gives the same value for a packet whose
//! checksum was right, and keeps a wrong one wrong).
//!
//! All fields touched sit at even offsets of the data their checksums cover (IPv4 header lengths
//! are multiples of 4, IPv6 extension headers of 8), so word-wise deltas are exact.

use std::net::IpAddr;

use dva_flow::FlowKey;
use dva_wire::{ip_proto, ipv6, Ipv4Packet, Ipv6Packet, TcpPacket, UdpPacket};

/// Why a packet cannot be translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ParseError {
    /// Truncated, inconsistent lengths, wrong version, an unparseable ICMP quote.
    Malformed,
    /// A fragment (IPv4 MF or offset, IPv6 fragment header): ports are not (all) there.
    Fragment { proto: u8, src: IpAddr, dst: IpAddr },
}

/// What a translating stage needs to know about one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Parsed {
    /// The packet's 5-tuple as sent; for ICMP echo both ports are the identifier.
    pub key: FlowKey,
    pub v6: bool,
    /// Offset of the transport header.
    pub l4: usize,
    /// End of the IP packet (IPv4 total length, 40 + IPv6 payload length); bytes past it are link
    /// padding and are not touched.
    pub end: usize,
    pub kind: Kind,
}

impl Parsed {
    /// IP packet length, for byte counters.
    pub fn len(&self) -> u32 {
        self.end as u32
    }

    /// TCP flags, 0 for anything else.
    pub fn tcp_flags(&self) -> u8 {
        match self.kind {
            Kind::Tcp { flags } => flags,
            _ => 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Tcp {
        flags: u8,
    },
    Udp,
    /// ICMP / ICMPv6 echo request (`request`) or reply.
    Echo {
        request: bool,
    },
    /// ICMPv4 destination unreachable / time exceeded / parameter problem, ICMPv6 types 1-4,
    /// quoting a TCP, UDP or echo packet.
    IcmpError(Inner),
    /// Anything a translating stage passes untouched: other protocols, other ICMP messages, ICMP
    /// errors quoting something without ports (or a non-first fragment).
    Other,
}

/// The packet quoted by an ICMP error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Inner {
    /// Offset of the quoted IP header in the outer packet.
    pub ip: usize,
    /// Offset of the quoted transport header (at least 8 bytes of it are present).
    pub l4: usize,
    /// The quoted packet's 5-tuple, as it was sent.
    pub key: FlowKey,
}

const ICMP_HEADER_LEN: usize = 8;

/// What [`parse`] would say of a packet the caller already parsed into `d` (`pkt`: its bytes):
/// the same fields, taken from the descriptor. Only an ICMP error's quote is read here (the
/// descriptor has its tuple, not its offsets).
pub(crate) fn from_descriptor(d: &crate::stage::Packet, pkt: &[u8]) -> Result<Parsed, ParseError> {
    let key = d.info.key;
    let v6 = key.src.is_ipv6();
    if d.fragment {
        return Err(ParseError::Fragment {
            proto: key.proto,
            src: key.src,
            dst: key.dst,
        });
    }
    let (l4, end) = (d.l4, d.end);
    let kind = match (key.proto, d.info.icmp) {
        (ip_proto::TCP, _) => Kind::Tcp {
            flags: d.info.tcp_flags,
        },
        (ip_proto::UDP, _) => Kind::Udp,
        (ip_proto::ICMP | ip_proto::ICMPV6, Some((t, _)))
            if (key.proto == ip_proto::ICMPV6) == v6 =>
        {
            match (v6, t) {
                (false, 8) | (true, 128) => Kind::Echo { request: true },
                (false, 0) | (true, 129) => Kind::Echo { request: false },
                (false, 3 | 11 | 12) | (true, 1..=4) => {
                    parse_inner(pkt, v6, l4 + ICMP_HEADER_LEN, end)?
                }
                _ => Kind::Other,
            }
        }
        _ => Kind::Other,
    };
    Ok(Parsed {
        key,
        v6,
        l4,
        end,
        kind,
    })
}

impl Parsed {
    /// The tuple (and an ICMP error's quoted tuple) as `pkt` now holds it, after a rewrite: read
    /// at the offsets [`parse`] checked, not parsed again.
    pub(crate) fn tuple_in(&self, pkt: &[u8]) -> (FlowKey, Option<FlowKey>) {
        let v6 = self.v6;
        let addr = |at: usize, old: IpAddr| -> IpAddr {
            if v6 {
                pkt.get(at..at + 16)
                    .and_then(|b| <[u8; 16]>::try_from(b).ok())
                    .map_or(old, IpAddr::from)
            } else {
                pkt.get(at..at + 4)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map_or(old, IpAddr::from)
            }
        };
        let (s, d) = addr_offsets(v6);
        let ports = |k: &mut FlowKey, l4: usize, echo: bool| {
            if echo {
                let id = get16(pkt, l4 + 4).unwrap_or(k.src_port);
                (k.src_port, k.dst_port) = (id, id);
            } else {
                k.src_port = get16(pkt, l4).unwrap_or(k.src_port);
                k.dst_port = get16(pkt, l4 + 2).unwrap_or(k.dst_port);
            }
        };
        let mut key = self.key;
        key.src = addr(s, key.src);
        key.dst = addr(d, key.dst);
        match self.kind {
            Kind::Tcp { .. } | Kind::Udp => ports(&mut key, self.l4, false),
            Kind::Echo { .. } => ports(&mut key, self.l4, true),
            Kind::IcmpError(inner) => {
                let mut q = inner.key;
                q.src = addr(inner.ip + s, q.src);
                q.dst = addr(inner.ip + d, q.dst);
                let echo = !matches!(q.proto, ip_proto::TCP | ip_proto::UDP);
                ports(&mut q, inner.l4, echo);
                return (key, Some(q));
            }
            Kind::Other => {}
        }
        (key, None)
    }
}

/// Parse an IP packet (the first byte's version nibble picks IPv4 or IPv6).
pub(crate) fn parse(pkt: &[u8]) -> Result<Parsed, ParseError> {
    match pkt.first().map(|b| b >> 4) {
        Some(4) => parse_v4(pkt),
        Some(6) => parse_v6(pkt),
        _ => Err(ParseError::Malformed),
    }
}

fn parse_v4(pkt: &[u8]) -> Result<Parsed, ParseError> {
    let ip = Ipv4Packet::new_checked(pkt).map_err(|_| ParseError::Malformed)?;
    let (src, dst) = (IpAddr::V4(ip.src_addr()), IpAddr::V4(ip.dst_addr()));
    let p = ip.next_header();
    if ip.is_fragment() {
        return Err(ParseError::Fragment { proto: p, src, dst });
    }
    let l4 = usize::from(ip.header_len());
    let end = usize::from(ip.total_len());
    let (kind, sport, dport) = parse_l4(pkt, false, p, l4, end)?;
    Ok(Parsed {
        key: FlowKey {
            proto: p,
            src,
            dst,
            src_port: sport,
            dst_port: dport,
        },
        v6: false,
        l4,
        end,
        kind,
    })
}

fn parse_v6(pkt: &[u8]) -> Result<Parsed, ParseError> {
    let ip = Ipv6Packet::new_checked(pkt).map_err(|_| ParseError::Malformed)?;
    let (src, dst) = (IpAddr::V6(ip.src_addr()), IpAddr::V6(ip.dst_addr()));
    let end = ipv6::HEADER_LEN + usize::from(ip.payload_len());
    let (p, l4, fragment) = ipv6::upper_layer(pkt).map_err(|_| ParseError::Malformed)?;
    if fragment {
        return Err(ParseError::Fragment { proto: p, src, dst });
    }
    let (kind, sport, dport) = parse_l4(pkt, true, p, l4, end)?;
    Ok(Parsed {
        key: FlowKey {
            proto: p,
            src,
            dst,
            src_port: sport,
            dst_port: dport,
        },
        v6: true,
        l4,
        end,
        kind,
    })
}

fn parse_l4(
    pkt: &[u8],
    v6: bool,
    p: u8,
    l4: usize,
    end: usize,
) -> Result<(Kind, u16, u16), ParseError> {
    let seg = pkt.get(l4..end).ok_or(ParseError::Malformed)?;
    match p {
        ip_proto::TCP => {
            let t = TcpPacket::new_checked(seg).map_err(|_| ParseError::Malformed)?;
            Ok((Kind::Tcp { flags: t.flags() }, t.src_port(), t.dst_port()))
        }
        ip_proto::UDP => {
            let u = UdpPacket::new_checked(seg).map_err(|_| ParseError::Malformed)?;
            Ok((Kind::Udp, u.src_port(), u.dst_port()))
        }
        ip_proto::ICMP | ip_proto::ICMPV6 if (p == ip_proto::ICMPV6) == v6 => {
            if seg.len() < ICMP_HEADER_LEN {
                return Err(ParseError::Malformed);
            }
            let id = u16::from_be_bytes([seg[4], seg[5]]);
            match (v6, seg[0]) {
                (false, 8) | (true, 128) => Ok((Kind::Echo { request: true }, id, id)),
                (false, 0) | (true, 129) => Ok((Kind::Echo { request: false }, id, id)),
                (false, 3 | 11 | 12) | (true, 1..=4) => {
                    let kind = parse_inner(pkt, v6, l4 + ICMP_HEADER_LEN, end)?;
                    Ok((kind, 0, 0))
                }
                _ => Ok((Kind::Other, 0, 0)),
            }
        }
        _ => Ok((Kind::Other, 0, 0)),
    }
}

/// The packet quoted by an ICMP error, from `start` to `end` of `pkt`.
fn parse_inner(pkt: &[u8], v6: bool, start: usize, end: usize) -> Result<Kind, ParseError> {
    let q = pkt.get(start..end).ok_or(ParseError::Malformed)?;
    let (p, src, dst, off) = if v6 {
        if q.len() < ipv6::HEADER_LEN || q[0] >> 4 != 6 {
            return Err(ParseError::Malformed);
        }
        let ip = Ipv6Packet::new_unchecked(q);
        let (p, off, fragment) = ipv6::upper_layer(q).map_err(|_| ParseError::Malformed)?;
        if fragment {
            // Maybe a non-first fragment: no ports to match on.
            return Ok(Kind::Other);
        }
        (p, IpAddr::V6(ip.src_addr()), IpAddr::V6(ip.dst_addr()), off)
    } else {
        if q.len() < dva_wire::ipv4::HEADER_LEN || q[0] >> 4 != 4 {
            return Err(ParseError::Malformed);
        }
        let ip = Ipv4Packet::new_unchecked(q);
        let off = usize::from(ip.header_len());
        if off < dva_wire::ipv4::HEADER_LEN {
            return Err(ParseError::Malformed);
        }
        if ip.frag_offset() != 0 {
            return Ok(Kind::Other);
        }
        (
            ip.next_header(),
            IpAddr::V4(ip.src_addr()),
            IpAddr::V4(ip.dst_addr()),
            off,
        )
    };
    // RFC 792 quotes the IP header and 8 bytes of what follows: ports, or echo type/code/id.
    let Some(l4) = q.get(off..off + 8) else {
        return Err(ParseError::Malformed);
    };
    let (sport, dport) = match p {
        ip_proto::TCP | ip_proto::UDP => (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        ),
        ip_proto::ICMP if !v6 && matches!(l4[0], 0 | 8) => {
            let id = u16::from_be_bytes([l4[4], l4[5]]);
            (id, id)
        }
        ip_proto::ICMPV6 if v6 && matches!(l4[0], 128 | 129) => {
            let id = u16::from_be_bytes([l4[4], l4[5]]);
            (id, id)
        }
        _ => return Ok(Kind::Other),
    };
    Ok(Kind::IcmpError(Inner {
        ip: start,
        l4: start + off,
        key: FlowKey {
            proto: p,
            src,
            dst,
            src_port: sport,
            dst_port: dport,
        },
    }))
}

/// An RFC 1624 checksum delta: the sum of `~old + new` over the rewritten words.
#[derive(Debug, Clone, Copy, Default)]
struct Delta(u32);

impl Delta {
    #[inline]
    fn word(&mut self, old: u16, new: u16) {
        let acc = self.0 + u32::from(!old) + u32::from(new);
        self.0 = (acc & 0xffff) + (acc >> 16);
    }

    #[inline]
    fn add(&mut self, other: Delta) {
        let acc = self.0 + other.0;
        self.0 = (acc & 0xffff) + (acc >> 16);
    }

    /// `csum` patched by the delta (`~(~csum + delta)`).
    #[inline]
    fn apply(self, csum: u16) -> u16 {
        dva_wire::checksum::fold(u32::from(!csum) + self.0)
    }
}

#[inline]
fn get16(buf: &[u8], at: usize) -> Option<u16> {
    let b = buf.get(at..at + 2)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

/// Write `new` at `at` and return the delta of the change.
#[inline]
fn put16(buf: &mut [u8], at: usize, new: u16) -> Delta {
    let mut d = Delta::default();
    if let Some(b) = buf.get_mut(at..at + 2) {
        let old = u16::from_be_bytes([b[0], b[1]]);
        b.copy_from_slice(&new.to_be_bytes());
        d.word(old, new);
    }
    d
}

/// Write address `new` at `at` (4 or 16 bytes, by its family) and return the delta.
fn put_addr(buf: &mut [u8], at: usize, new: IpAddr) -> Delta {
    let mut d = Delta::default();
    let (bytes, n) = match new {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            (b, 4)
        }
        IpAddr::V6(a) => (a.octets(), 16),
    };
    if let Some(slot) = buf.get_mut(at..at + n) {
        for (old, new) in slot.chunks_exact_mut(2).zip(bytes[..n].chunks_exact(2)) {
            d.word(
                u16::from_be_bytes([old[0], old[1]]),
                u16::from_be_bytes([new[0], new[1]]),
            );
            old.copy_from_slice(new);
        }
    }
    d
}

/// Patch the checksum at `at` by `d`. `udp`: over IPv4 a zero checksum means none and stays
/// zero; a result of zero is written as 0xFFFF. Returns the delta of the checksum word itself
/// (for a checksum that is in turn covered by another one, inside an ICMP error).
fn patch(buf: &mut [u8], at: usize, d: Delta, udp: bool, v6: bool) -> Delta {
    let Some(old) = get16(buf, at) else {
        return Delta::default();
    };
    if udp && !v6 && old == 0 {
        return Delta::default();
    }
    let mut new = d.apply(old);
    if udp && new == 0 {
        new = 0xffff;
    }
    put16(buf, at, new)
}

const fn addr_offsets(v6: bool) -> (usize, usize) {
    if v6 {
        (8, 24)
    } else {
        (12, 16)
    }
}

/// Offset of the transport checksum from the transport header, and whether it covers the
/// pseudo-header.
fn l4_checksum(proto: u8) -> Option<(usize, bool)> {
    match proto {
        ip_proto::TCP => Some((16, true)),
        ip_proto::UDP => Some((6, true)),
        ip_proto::ICMP => Some((2, false)),
        ip_proto::ICMPV6 => Some((2, true)),
        _ => None,
    }
}

/// Rewrite a TCP, UDP or echo packet with tuple `p.key` into tuple `to` (same protocol and
/// family; for echo, `to.src_port` is the new identifier).
pub(crate) fn rewrite(pkt: &mut [u8], p: &Parsed, to: &FlowKey) {
    let Some((csum_off, pseudo)) = l4_checksum(p.key.proto) else {
        return;
    };
    let (src_at, dst_at) = addr_offsets(p.v6);
    let mut ip = Delta::default();
    let mut l4 = Delta::default();
    for (at, old, new) in [(src_at, p.key.src, to.src), (dst_at, p.key.dst, to.dst)] {
        if old != new && old.is_ipv4() == new.is_ipv4() {
            let d = put_addr(pkt, at, new);
            ip.add(d);
            if pseudo {
                l4.add(d);
            }
        }
    }
    match p.kind {
        Kind::Tcp { .. } | Kind::Udp => {
            if p.key.src_port != to.src_port {
                l4.add(put16(pkt, p.l4, to.src_port));
            }
            if p.key.dst_port != to.dst_port {
                l4.add(put16(pkt, p.l4 + 2, to.dst_port));
            }
        }
        Kind::Echo { .. } => {
            if p.key.src_port != to.src_port {
                l4.add(put16(pkt, p.l4 + 4, to.src_port));
            }
        }
        Kind::IcmpError(_) | Kind::Other => return,
    }
    patch(pkt, p.l4 + csum_off, l4, p.key.proto == ip_proto::UDP, p.v6);
    if !p.v6 {
        patch(pkt, 10, ip, false, false);
    }
}

/// Rewrite an ICMP error: the quoted packet's tuple becomes `new_inner`, and the outer source /
/// destination become `outer_src` / `outer_dst` where given.
pub(crate) fn rewrite_icmp_error(
    pkt: &mut [u8],
    p: &Parsed,
    inner: &Inner,
    new_inner: &FlowKey,
    outer_src: Option<IpAddr>,
    outer_dst: Option<IpAddr>,
) {
    let Some((in_csum_off, in_pseudo)) = l4_checksum(inner.key.proto) else {
        return;
    };
    // Delta of the outer ICMP checksum: every word changed inside the message, and for ICMPv6
    // the outer addresses (pseudo-header).
    let mut icmp = Delta::default();
    let mut in_ip = Delta::default();
    let mut in_l4 = Delta::default();
    let (src_off, dst_off) = addr_offsets(p.v6);
    let old = inner.key;
    for (at, o, n) in [
        (inner.ip + src_off, old.src, new_inner.src),
        (inner.ip + dst_off, old.dst, new_inner.dst),
    ] {
        if o != n && o.is_ipv4() == n.is_ipv4() {
            let d = put_addr(pkt, at, n);
            in_ip.add(d);
            if in_pseudo {
                in_l4.add(d);
            }
            icmp.add(d);
        }
    }
    let is_echo = matches!(inner.key.proto, ip_proto::ICMP | ip_proto::ICMPV6);
    let port_fields: [(usize, u16, u16); 2] = if is_echo {
        [(inner.l4 + 4, old.src_port, new_inner.src_port), (0, 0, 0)]
    } else {
        [
            (inner.l4, old.src_port, new_inner.src_port),
            (inner.l4 + 2, old.dst_port, new_inner.dst_port),
        ]
    };
    for (at, o, n) in port_fields {
        if o != n {
            let d = put16(pkt, at, n);
            in_l4.add(d);
            icmp.add(d);
        }
    }
    // The quoted transport checksum, if the quote reaches it (a TCP checksum is past the 8 bytes
    // RFC 792 guarantees).
    let in_csum_at = inner.l4 + in_csum_off;
    if in_csum_at + 2 <= p.end {
        let d = patch(
            pkt,
            in_csum_at,
            in_l4,
            inner.key.proto == ip_proto::UDP,
            p.v6,
        );
        icmp.add(d);
    }
    if !p.v6 {
        icmp.add(patch(pkt, inner.ip + 10, in_ip, false, false));
    }
    let mut ip = Delta::default();
    for (at, o, n) in [
        (src_off, p.key.src, outer_src),
        (dst_off, p.key.dst, outer_dst),
    ] {
        if let Some(n) = n {
            if o != n && o.is_ipv4() == n.is_ipv4() {
                let d = put_addr(pkt, at, n);
                ip.add(d);
                if p.v6 {
                    icmp.add(d);
                }
            }
        }
    }
    patch(pkt, p.l4 + 2, icmp, false, p.v6);
    if !p.v6 {
        patch(pkt, 10, ip, false, false);
    }
}

#[cfg(test)]
mod tests {
    use dva_wire::tcp::flags::{ACK, SYN};

    use super::*;
    use crate::nat::testpkt::*;

    #[test]
    fn parses_tuples_and_kinds() {
        let syn = tcp4("198.18.1.2", 40000, "198.18.2.2", 80, SYN);
        let p = parse(&syn).unwrap();
        assert_eq!(p.key, key(6, "198.18.1.2", 40000, "198.18.2.2", 80));
        assert_eq!(p.kind, Kind::Tcp { flags: SYN });
        assert_eq!((p.l4, p.end, p.v6), (20, syn.len(), false));

        let echo = echo6("2001:db8::1", "2001:db8:1::2", 77, true);
        let p = parse(&echo).unwrap();
        assert_eq!(p.key.src_port, 77);
        assert_eq!(p.key.dst_port, 77);
        assert_eq!(p.kind, Kind::Echo { request: true });

        let err = icmp4_error("198.18.9.9", "198.18.1.2", 3, 3, &syn);
        let p = parse(&err).unwrap();
        match p.kind {
            Kind::IcmpError(i) => {
                assert_eq!(i.key, key(6, "198.18.1.2", 40000, "198.18.2.2", 80));
                assert_eq!((i.ip, i.l4), (28, 48));
            }
            k => panic!("{k:?}"),
        }
    }

    #[test]
    fn fragments_and_garbage() {
        let mut frag = udp4("198.18.1.2", 1, "198.18.2.2", 2, b"x");
        frag[6] |= 0x20; // MF
        assert!(matches!(parse(&frag), Err(ParseError::Fragment { .. })));
        assert_eq!(parse(&[]), Err(ParseError::Malformed));
        assert_eq!(parse(&[0x45]), Err(ParseError::Malformed));
        assert_eq!(parse(&[0x75; 40]), Err(ParseError::Malformed));
    }

    #[test]
    fn rewrite_keeps_checksums_right() {
        let mut pkt = tcp4("198.18.1.2", 40000, "198.18.2.2", 80, SYN | ACK);
        let p = parse(&pkt).unwrap();
        let to = key(6, "198.18.3.3", 1234, "198.18.4.4", 8080);
        rewrite(&mut pkt, &p, &to);
        assert_eq!(check(&pkt), to);

        let mut pkt = udp6("2001:db8::1", 5353, "2001:db8:1::2", 53, b"query");
        let p = parse(&pkt).unwrap();
        let to = key(17, "2001:db8:ffff::1", 1111, "2001:db8:1::2", 53);
        rewrite(&mut pkt, &p, &to);
        assert_eq!(check(&pkt), to);
    }

    #[test]
    fn ipv4_options_and_ipv6_extension_headers() {
        // IPv4 with 4 bytes of options (IHL 6).
        let plain = udp4("198.18.1.2", 5000, "198.18.2.2", 53, b"q");
        let mut pkt = plain[..20].to_vec();
        pkt.extend_from_slice(&[1, 1, 1, 0]);
        pkt.extend_from_slice(&plain[20..]);
        pkt[0] = 0x46;
        let total = pkt.len() as u16;
        pkt[2..4].copy_from_slice(&total.to_be_bytes());
        Ipv4Packet::new_unchecked(&mut pkt[..]).fill_checksum();
        let p = parse(&pkt).unwrap();
        assert_eq!(p.l4, 24);
        let to = key(17, "198.18.3.3", 6000, "198.18.2.2", 53);
        rewrite(&mut pkt, &p, &to);
        assert!(Ipv4Packet::new_unchecked(&pkt[..]).verify_checksum());
        let seg = &pkt[24..];
        assert!(UdpPacket::new_unchecked(seg).verify_checksum_v4(
            &"198.18.3.3".parse().unwrap(),
            &"198.18.2.2".parse().unwrap()
        ));

        // IPv6 with an 8-byte destination options header before TCP.
        let plain = tcp6("2001:db8::1", 1000, "2001:db8:1::2", 80, SYN);
        let mut pkt = plain[..40].to_vec();
        pkt.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]);
        pkt.extend_from_slice(&plain[40..]);
        pkt[6] = 60;
        let plen = (pkt.len() - 40) as u16;
        pkt[4..6].copy_from_slice(&plen.to_be_bytes());
        let p = parse(&pkt).unwrap();
        assert_eq!((p.l4, p.kind), (48, Kind::Tcp { flags: SYN }));
        let to = key(6, "2001:db8:ffff::9", 2000, "2001:db8:1::2", 80);
        rewrite(&mut pkt, &p, &to);
        assert!(TcpPacket::new_unchecked(&pkt[48..]).verify_checksum_v6(
            &"2001:db8:ffff::9".parse().unwrap(),
            &"2001:db8:1::2".parse().unwrap()
        ));
    }

    #[test]
    fn udp_zero_checksum_stays_zero_over_ipv4() {
        let mut pkt = udp4("198.18.1.2", 5000, "198.18.2.2", 53, b"q");
        pkt[26] = 0;
        pkt[27] = 0;
        let p = parse(&pkt).unwrap();
        let to = key(17, "198.18.3.3", 6000, "198.18.2.2", 53);
        rewrite(&mut pkt, &p, &to);
        assert_eq!(&pkt[26..28], &[0, 0]);
        assert_eq!(check(&pkt), to);
    }
}
