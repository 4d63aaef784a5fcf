//! GSO super-packets: the partial checksum of CHECKSUM_PARTIAL, its completion, and software
//! segmentation.
//!
//! With `PACKET_VNET_HDR` (and from virtio guests) the kernel hands over TCP segments of up to
//! 64 KB carrying a `gso_size` (the MSS), and L4 checksums that are either complete or
//! *partial*: the checksum field holds only the folded pseudo-header sum, and whoever transmits
//! (NIC or kernel) sums the L4 bytes from `csum_start` and stores the complement at
//! `csum_start + csum_offset`.
//!
//! - [`set_partial_checksum`](crate::gso::set_partial_checksum) produces that state;
//! - [`complete_checksum`](crate::gso::complete_checksum) finishes a checksum in software;
//! - [`segment`](crate::gso::segment) does what the kernel's `tcp_gso_segment` /
//!   `__udp_gso_segment` do when the output cannot take the super-packet whole.
//!
//! Every function takes the IP packet exactly (its length fields must match the slice), the
//! offset of the transport header and the transport protocol, and validates all of them before
//! writing or emitting anything.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::checksum;
use crate::ip_proto;
use crate::ipv4::Ipv4Packet;
use crate::ipv6::{self, Ipv6Packet};
use crate::tcp::{self, flags, TcpPacket};
use crate::udp::{self, UdpPacket};
use crate::{Error, Result};

/// Offset of the checksum field in a TCP header (virtio's `csum_offset` for TCP).
pub const TCP_CSUM_OFFSET: usize = 16;

/// Offset of the checksum field in a UDP header (virtio's `csum_offset` for UDP).
pub const UDP_CSUM_OFFSET: usize = 6;

/// Most segments [`segment`] produces from one super-packet. A 64 KB packet cut at a
/// realistic MSS gives at most a few dozen; a `gso_size` that would give more is a broken
/// header, and refusing it bounds the work one packet can cause.
pub const MAX_SEGMENTS: usize = 1024;

/// The addresses the pseudo-header needs.
#[derive(Debug, Clone, Copy)]
enum Addrs {
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr),
}

/// What [`parse`] learned about a packet whose headers all agree.
#[derive(Debug, Clone, Copy)]
struct Parsed {
    addrs: Addrs,
    /// IP and extension headers plus the transport header (TCP options included).
    headers_len: usize,
}

/// Validates the IP header, `l4_offset` and `proto` against each other and against `ip.len()`,
/// and the transport header's own length. `Unsupported` for other IP versions or protocols and
/// for fragments (a GSO super-packet is never one, and a fragment's pseudo-header length would
/// not be the L4 length here); `Malformed` when fields disagree; `Truncated` when a header does
/// not fit.
fn parse(ip: &[u8], l4_offset: usize, proto: u8) -> Result<Parsed> {
    if proto != ip_proto::TCP && proto != ip_proto::UDP {
        return Err(Error::Unsupported);
    }
    let first = *ip.first().ok_or(Error::Truncated)?;
    let addrs = match first >> 4 {
        4 => {
            let p = Ipv4Packet::new_checked(ip)?;
            // Bytes past the total length would be link padding, but the caller promises the
            // exact packet: a mismatch means the lengths we are about to rewrite are wrong.
            if usize::from(p.total_len()) != ip.len() {
                return Err(Error::Malformed);
            }
            if l4_offset > ip.len() {
                return Err(Error::Truncated);
            }
            if usize::from(p.header_len()) != l4_offset || p.next_header() != proto {
                return Err(Error::Malformed);
            }
            if p.is_fragment() {
                return Err(Error::Unsupported);
            }
            Addrs::V4(p.src_addr(), p.dst_addr())
        }
        6 => {
            let p = Ipv6Packet::new_checked(ip)?;
            // A payload length of 0 with more bytes would be a jumbogram (BIG TCP), which the
            // 16-bit length fields written here cannot describe.
            if ipv6::HEADER_LEN + usize::from(p.payload_len()) != ip.len() {
                return Err(Error::Malformed);
            }
            if l4_offset > ip.len() {
                return Err(Error::Truncated);
            }
            // The extension-header walk must land on `proto` at `l4_offset`, or the
            // pseudo-header and the per-segment headers would describe a different packet.
            let (next, offset, fragment) = ipv6::upper_layer(ip)?;
            if fragment {
                return Err(Error::Unsupported);
            }
            if next != proto || offset != l4_offset {
                return Err(Error::Malformed);
            }
            Addrs::V6(p.src_addr(), p.dst_addr())
        }
        _ => return Err(Error::Unsupported),
    };
    let l4 = ip.get(l4_offset..).ok_or(Error::Truncated)?;
    let l4_header_len = if proto == ip_proto::TCP {
        usize::from(TcpPacket::new_checked(l4)?.header_len())
    } else if l4.len() < udp::HEADER_LEN {
        return Err(Error::Truncated);
    } else {
        udp::HEADER_LEN
    };
    Ok(Parsed {
        addrs,
        headers_len: l4_offset + l4_header_len,
    })
}

/// The UDP length field must cover exactly the rest of the IP packet: the checksum runs to the
/// length field while the pseudo-header length here comes from IP, and the two must agree.
fn check_udp_len(l4: &[u8]) -> Result<()> {
    let dgram = UdpPacket::new_checked(l4)?;
    if usize::from(dgram.len()) != l4.len() {
        return Err(Error::Malformed);
    }
    Ok(())
}

/// Computes and stores the full checksum of the transport segment `l4` (the rest of the IP
/// packet, already validated by [`parse`]).
fn fill_l4(l4: &mut [u8], proto: u8, addrs: Addrs) {
    match (proto, addrs) {
        (ip_proto::TCP, Addrs::V4(s, d)) => TcpPacket::new_unchecked(l4).fill_checksum_v4(&s, &d),
        (ip_proto::TCP, Addrs::V6(s, d)) => TcpPacket::new_unchecked(l4).fill_checksum_v6(&s, &d),
        // `fill_checksum_*` sends a computed 0 as 0xFFFF (0 means "no checksum").
        (_, Addrs::V4(s, d)) => UdpPacket::new_unchecked(l4).fill_checksum_v4(&s, &d),
        (_, Addrs::V6(s, d)) => UdpPacket::new_unchecked(l4).fill_checksum_v6(&s, &d),
    }
}

/// Writes the partial checksum of CHECKSUM_PARTIAL / `VIRTIO_NET_HDR_F_NEEDS_CSUM` into the
/// TCP or UDP header at `l4_offset` of the IPv4 or IPv6 packet `ip`: the folded,
/// *non-complemented* pseudo-header sum (addresses, `proto`, L4 length = `ip.len() -
/// l4_offset`), as the Linux kernel leaves it. Summing `ip[l4_offset..]` and folding then
/// yields the full checksum, which is how a NIC completes it.
///
/// Returns the checksum field's offset in the transport header, virtio's `csum_offset`
/// ([`TCP_CSUM_OFFSET`] or [`UDP_CSUM_OFFSET`]); `csum_start` is `l4_offset`.
///
/// Errors as for [`segment`]; for UDP the length field must also equal the L4 length.
pub fn set_partial_checksum(ip: &mut [u8], l4_offset: usize, proto: u8) -> Result<usize> {
    let parsed = parse(ip, l4_offset, proto)?;
    let l4 = &mut ip[l4_offset..];
    if proto == ip_proto::UDP {
        check_udp_len(l4)?;
    }
    // `parse` bounded the packet by the 16-bit IP length fields, so this cannot truncate.
    let len = u32::try_from(l4.len()).map_err(|_| Error::Malformed)?;
    let pseudo = match parsed.addrs {
        Addrs::V4(s, d) => checksum::pseudo_header_v4(&s, &d, proto, len),
        Addrs::V6(s, d) => checksum::pseudo_header_v6(&s, &d, proto, len),
    };
    // `fold` complements; the partial value is the folded sum itself.
    let partial = !checksum::fold(pseudo);
    if proto == ip_proto::TCP {
        TcpPacket::new_unchecked(l4).set_checksum(partial);
        Ok(TCP_CSUM_OFFSET)
    } else {
        UdpPacket::new_unchecked(l4).set_checksum(partial);
        Ok(UDP_CSUM_OFFSET)
    }
}

/// Computes and stores the full TCP or UDP checksum of the IPv4 or IPv6 packet `ip` whose
/// transport header starts at `l4_offset`, whatever the field held before (partial or
/// garbage). A UDP checksum that computes to 0 is sent as 0xFFFF. This is the transport
/// views' `fill_checksum_v4/_v6`, after the validation they leave to the caller.
///
/// Errors as for [`segment`]; for UDP the length field must also equal the L4 length.
pub fn complete_checksum(ip: &mut [u8], l4_offset: usize, proto: u8) -> Result<()> {
    let parsed = parse(ip, l4_offset, proto)?;
    let l4 = &mut ip[l4_offset..];
    if proto == ip_proto::UDP {
        check_udp_len(l4)?;
    }
    fill_l4(l4, proto, parsed.addrs);
    Ok(())
}

/// Software GSO: cuts the TCP or UDP super-packet `ip` (IPv4 or IPv6, transport header at
/// `l4_offset`) into segments carrying at most `gso_size` bytes of transport payload each,
/// builds them one at a time in `scratch` and hands each to `out`. Returns the number of
/// segments.
///
/// Every segment gets a copy of all headers (IPv4 options, IPv6 extension headers, TCP
/// options), then:
/// - IPv4: total length and header checksum recomputed, identification = the super-packet's
///   plus the segment index (wrapping); IPv6: payload length = segment length - 40.
/// - TCP: sequence number advanced by the payload offset (wrapping); FIN and PSH kept only on
///   the last segment, CWR only on the first; other flags, the urgent pointer and the options
///   are copied unchanged.
/// - UDP (USO): length field set per segment.
/// - The full transport checksum is computed (UDP: 0 is sent as 0xFFFF).
///
/// The super-packet's transport checksum field is ignored (partial or garbage alike), and so
/// is its UDP length field, which every segment rewrites. A payload of at most `gso_size`
/// bytes (including none) gives one packet with a complete checksum.
///
/// Everything is validated before the first call to `out`, so an error emits nothing:
/// - `Malformed`: `gso_size` of 0; IP length fields that disagree with `ip.len()`;
///   `l4_offset` other than the IPv4 header length or the end of the IPv6 extension headers;
///   an IP protocol other than `proto`; a TCP data offset below 5.
/// - `Truncated`: `l4_offset`, or the transport header, beyond the packet.
/// - `Unsupported`: `proto` other than TCP/UDP, an IP version other than 4/6, a fragment, or
///   more than [`MAX_SEGMENTS`] segments.
///
/// `scratch` is cleared and reused: it grows at most once, to the largest segment.
pub fn segment(
    ip: &[u8],
    l4_offset: usize,
    proto: u8,
    gso_size: usize,
    scratch: &mut Vec<u8>,
    mut out: impl FnMut(&[u8]),
) -> Result<usize> {
    if gso_size == 0 {
        return Err(Error::Malformed);
    }
    let parsed = parse(ip, l4_offset, proto)?;
    let (headers, payload) = ip.split_at(parsed.headers_len);
    let count = payload.len().div_ceil(gso_size).max(1);
    if count > MAX_SEGMENTS {
        return Err(Error::Unsupported);
    }

    // Per-segment values derived from the super-packet's header.
    let first_ident = match parsed.addrs {
        Addrs::V4(..) => Ipv4Packet::new_unchecked(ip).ident(),
        Addrs::V6(..) => 0,
    };
    let (first_seq, tcp_flags) = if proto == ip_proto::TCP {
        let t = TcpPacket::new_unchecked(&ip[l4_offset..]);
        (t.seq_number(), t.flags())
    } else {
        (0, 0)
    };

    scratch.clear();
    scratch.reserve(headers.len() + payload.len().min(gso_size));
    // An empty payload still makes one (header-only) segment.
    let mut chunks = payload.chunks(gso_size);
    for index in 0..count {
        let chunk = chunks.next().unwrap_or(&[]);
        scratch.clear();
        scratch.extend_from_slice(headers);
        scratch.extend_from_slice(chunk);
        let seg_len = scratch.len();
        // Segments are no longer than the super-packet, whose lengths fit 16 bits.
        match parsed.addrs {
            Addrs::V4(..) => {
                let total = u16::try_from(seg_len).map_err(|_| Error::Malformed)?;
                let mut p = Ipv4Packet::new_unchecked(&mut scratch[..]);
                p.set_total_len(total);
                // `index < MAX_SEGMENTS`, so the cast is exact; the ID itself wraps.
                p.set_ident(first_ident.wrapping_add(index as u16));
                p.fill_checksum();
            }
            Addrs::V6(..) => {
                let payload_len =
                    u16::try_from(seg_len - ipv6::HEADER_LEN).map_err(|_| Error::Malformed)?;
                Ipv6Packet::new_unchecked(&mut scratch[..]).set_payload_len(payload_len);
            }
        }
        let l4 = &mut scratch[l4_offset..];
        if proto == ip_proto::TCP {
            let mut t = TcpPacket::new_unchecked(&mut *l4);
            // Sequence space is modulo 2^32; the offset is below 64 KB.
            let offset = (index * gso_size) as u32;
            t.set_seq_number(first_seq.wrapping_add(offset));
            let mut f = tcp_flags;
            if index + 1 != count {
                // The stream ends (FIN) and is pushed (PSH) after the last byte only.
                f &= !(flags::FIN | flags::PSH);
            }
            if index != 0 {
                // The window reduction is signalled once, not once per segment.
                f &= !flags::CWR;
            }
            t.set_flags(f);
        } else {
            let len = u16::try_from(l4.len()).map_err(|_| Error::Malformed)?;
            UdpPacket::new_unchecked(&mut *l4).set_len(len);
        }
        fill_l4(l4, proto, parsed.addrs);
        out(&scratch[..]);
    }
    Ok(count)
}

// The header constants these offsets mirror, so a change to either side is caught at build
// time rather than by a corrupted checksum.
const _: () = assert!(TCP_CSUM_OFFSET + 4 == tcp::HEADER_LEN);
const _: () = assert!(UDP_CSUM_OFFSET + 2 == udp::HEADER_LEN);

#[cfg(test)]
mod tests {
    use super::*;

    const SRC4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
    const DST4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);

    fn src6() -> Ipv6Addr {
        "2001:db8:1::2".parse().unwrap()
    }

    fn dst6() -> Ipv6Addr {
        "2001:db8:2::ffff:2".parse().unwrap()
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// A 20-byte IPv4 header (DF, TTL 64) followed by `l4`, with a valid header checksum.
    fn ipv4(proto: u8, ident: u16, l4: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; 20];
        v[0] = 0x45;
        v[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        v[4..6].copy_from_slice(&ident.to_be_bytes());
        v[6] = 0x40;
        v[8] = 64;
        v[9] = proto;
        v[12..16].copy_from_slice(&SRC4.octets());
        v[16..20].copy_from_slice(&DST4.octets());
        v.extend_from_slice(l4);
        Ipv4Packet::new_unchecked(&mut v[..]).fill_checksum();
        v
    }

    /// A fixed IPv6 header, then the extension headers `ext` (already chained, the last one
    /// naming `proto`), then `l4`.
    fn ipv6(first_next: u8, ext: &[u8], l4: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; 40];
        v[0] = 0x60;
        v[4..6].copy_from_slice(&((ext.len() + l4.len()) as u16).to_be_bytes());
        v[6] = first_next;
        v[7] = 64;
        v[8..24].copy_from_slice(&src6().octets());
        v[24..40].copy_from_slice(&dst6().octets());
        v.extend_from_slice(ext);
        v.extend_from_slice(l4);
        v
    }

    const TCP_FLAGS: u8 = flags::FIN | flags::PSH | flags::ACK | flags::CWR;
    // Close to the wrap so the per-segment sequence numbers wrap too.
    const SEQ: u32 = 0xffff_e000;

    /// A 32-byte TCP header (NOP, NOP, timestamps) with a garbage checksum, then `payload`.
    fn tcp(payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; 32];
        v[0..2].copy_from_slice(&40000u16.to_be_bytes());
        v[2..4].copy_from_slice(&443u16.to_be_bytes());
        v[4..8].copy_from_slice(&SEQ.to_be_bytes());
        v[8..12].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        v[12] = 8 << 4;
        v[13] = TCP_FLAGS;
        v[14..16].copy_from_slice(&502u16.to_be_bytes());
        v[16..18].copy_from_slice(&0xbeefu16.to_be_bytes());
        v[20..32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        v.extend_from_slice(payload);
        v
    }

    /// A UDP header (length set, garbage checksum), then `payload`.
    fn udp(payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; 8];
        v[0..2].copy_from_slice(&40000u16.to_be_bytes());
        v[2..4].copy_from_slice(&4433u16.to_be_bytes());
        v[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        v[6..8].copy_from_slice(&0xbeefu16.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// Pseudo-header plus segment sums to 0 after folding: the receiver's check, written out
    /// rather than through the views so it does not test the code with itself.
    fn l4_verifies(seg: &[u8], l4_offset: usize, proto: u8) -> bool {
        let l4 = &seg[l4_offset..];
        let len = l4.len() as u32;
        let ph = match seg[0] >> 4 {
            4 => checksum::pseudo_header_v4(
                &Ipv4Packet::new_unchecked(seg).src_addr(),
                &Ipv4Packet::new_unchecked(seg).dst_addr(),
                proto,
                len,
            ),
            _ => checksum::pseudo_header_v6(
                &Ipv6Packet::new_unchecked(seg).src_addr(),
                &Ipv6Packet::new_unchecked(seg).dst_addr(),
                proto,
                len,
            ),
        };
        checksum::fold(ph + checksum::sum(l4)) == 0
    }

    fn collect(
        ip: &[u8],
        l4_offset: usize,
        proto: u8,
        gso_size: usize,
    ) -> Result<(usize, Vec<Vec<u8>>)> {
        let mut scratch = Vec::new();
        let mut segs = Vec::new();
        let n = segment(ip, l4_offset, proto, gso_size, &mut scratch, |s| {
            segs.push(s.to_vec())
        })?;
        assert_eq!(n, segs.len());
        Ok((n, segs))
    }

    /// Checks everything the TCP segmentation promises, for either IP version.
    fn check_tcp_segments(
        segs: &[Vec<u8>],
        l4_offset: usize,
        gso_size: usize,
        payload: &[u8],
        ident: Option<u16>,
    ) {
        let headers = l4_offset + 32;
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            let last = i + 1 == segs.len();
            let want = if last {
                payload.len() - i * gso_size
            } else {
                gso_size
            };
            assert_eq!(s.len(), headers + want, "segment {i} length");
            match ident {
                Some(first) => {
                    let p = Ipv4Packet::new_checked(&s[..]).unwrap();
                    assert_eq!(usize::from(p.total_len()), s.len());
                    let hl = usize::from(p.header_len());
                    assert_eq!(checksum::data(&s[..hl]), 0, "segment {i} IPv4 checksum");
                    assert_eq!(p.ident(), first.wrapping_add(i as u16));
                    assert!(p.dont_frag());
                }
                None => {
                    let p = Ipv6Packet::new_checked(&s[..]).unwrap();
                    assert_eq!(usize::from(p.payload_len()), s.len() - 40);
                }
            }
            assert!(
                l4_verifies(s, l4_offset, ip_proto::TCP),
                "segment {i} TCP sum"
            );
            let t = TcpPacket::new_checked(&s[l4_offset..]).unwrap();
            assert_eq!(t.seq_number(), SEQ.wrapping_add((i * gso_size) as u32));
            assert_eq!(t.ack_number(), 0x1234_5678);
            assert!(t.ack());
            assert_eq!(t.fin(), last, "segment {i} FIN");
            assert_eq!(t.psh(), last, "segment {i} PSH");
            assert_eq!(t.cwr(), i == 0, "segment {i} CWR");
            assert_eq!(t.options(), &[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
            joined.extend_from_slice(t.payload());
        }
        assert_eq!(joined, payload);
    }

    #[test]
    fn tcp_v4_segments() {
        let payload = pattern(10_000);
        let ip = ipv4(ip_proto::TCP, 0xfffe, &tcp(&payload));
        let (n, segs) = collect(&ip, 20, ip_proto::TCP, 1448).unwrap();
        assert_eq!(n, 7);
        check_tcp_segments(&segs, 20, 1448, &payload, Some(0xfffe));
        // The ID wrapped on the third segment.
        assert_eq!(Ipv4Packet::new_unchecked(&segs[2][..]).ident(), 0);
    }

    #[test]
    fn tcp_v4_with_ip_options_segments() {
        // IHL 6: a 4-byte option (NOP, NOP, NOP, EOL) copied into every segment.
        let payload = pattern(3000);
        let plain = ipv4(ip_proto::TCP, 7, &tcp(&payload));
        let mut ip = plain[..20].to_vec();
        ip.extend_from_slice(&[1, 1, 1, 0]);
        ip.extend_from_slice(&plain[20..]);
        ip[0] = 0x46;
        let total = ip.len() as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        Ipv4Packet::new_unchecked(&mut ip[..]).fill_checksum();
        let (n, segs) = collect(&ip, 24, ip_proto::TCP, 1000).unwrap();
        assert_eq!(n, 3);
        for s in &segs {
            assert_eq!(&s[20..24], &[1, 1, 1, 0]);
            assert_eq!(checksum::data(&s[..24]), 0);
        }
        check_tcp_segments(&segs, 24, 1000, &payload, Some(7));
    }

    #[test]
    fn tcp_v6_segments() {
        let payload = pattern(10_000);
        let ip = ipv6(ip_proto::TCP, &[], &tcp(&payload));
        let (n, segs) = collect(&ip, 40, ip_proto::TCP, 1448).unwrap();
        assert_eq!(n, 7);
        check_tcp_segments(&segs, 40, 1448, &payload, None);
    }

    #[test]
    fn tcp_v6_with_extension_header_uneven_split() {
        // An 8-byte destination-options header (PadN) between IPv6 and TCP.
        let ext = [ip_proto::TCP, 0, 1, 4, 0, 0, 0, 0];
        let payload = pattern(5001);
        let ip = ipv6(ip_proto::DSTOPTS, &ext, &tcp(&payload));
        let (n, segs) = collect(&ip, 48, ip_proto::TCP, 1220).unwrap();
        assert_eq!(n, 5);
        assert_eq!(segs[4].len(), 48 + 32 + 121);
        for s in &segs {
            assert_eq!(&s[40..48], &ext);
        }
        check_tcp_segments(&segs, 48, 1220, &payload, None);
    }

    fn check_udp_segments(segs: &[Vec<u8>], l4_offset: usize, gso_size: usize, payload: &[u8]) {
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            let want = gso_size.min(payload.len() - i * gso_size);
            assert_eq!(s.len(), l4_offset + 8 + want);
            if s[0] >> 4 == 4 {
                let p = Ipv4Packet::new_checked(&s[..]).unwrap();
                assert_eq!(usize::from(p.total_len()), s.len());
                assert_eq!(checksum::data(&s[..20]), 0);
                assert_eq!(p.ident(), 0x0100 + i as u16);
            } else {
                let p = Ipv6Packet::new_checked(&s[..]).unwrap();
                assert_eq!(usize::from(p.payload_len()), s.len() - 40);
            }
            let d = UdpPacket::new_checked(&s[l4_offset..]).unwrap();
            assert_eq!(usize::from(d.len()), 8 + want);
            assert_ne!(d.checksum(), 0);
            assert_eq!((d.src_port(), d.dst_port()), (40000, 4433));
            assert!(
                l4_verifies(s, l4_offset, ip_proto::UDP),
                "segment {i} UDP sum"
            );
            joined.extend_from_slice(d.payload());
        }
        assert_eq!(joined, payload);
    }

    #[test]
    fn udp_v4_segments() {
        let payload = pattern(5000);
        let ip = ipv4(ip_proto::UDP, 0x0100, &udp(&payload));
        let (n, segs) = collect(&ip, 20, ip_proto::UDP, 1200).unwrap();
        assert_eq!(n, 5);
        check_udp_segments(&segs, 20, 1200, &payload);
    }

    #[test]
    fn udp_v6_segments() {
        let payload = pattern(4800);
        let ip = ipv6(ip_proto::UDP, &[], &udp(&payload));
        let (n, segs) = collect(&ip, 40, ip_proto::UDP, 1200).unwrap();
        assert_eq!(n, 4);
        check_udp_segments(&segs, 40, 1200, &payload);
    }

    #[test]
    fn single_segment_gets_complete_checksum() {
        let payload = pattern(1000);
        let ip = ipv4(ip_proto::TCP, 42, &tcp(&payload));
        let (n, segs) = collect(&ip, 20, ip_proto::TCP, 1448).unwrap();
        assert_eq!(n, 1);
        let s = &segs[0];
        assert_eq!(s.len(), ip.len());
        assert!(l4_verifies(s, 20, ip_proto::TCP));
        // Headers unchanged but for the checksum: all flags stay on the only segment.
        assert_eq!(&s[..36], &ip[..36]);
        assert_eq!(&s[38..], &ip[38..]);

        // Exactly gso_size bytes is still one segment; so is an empty payload.
        let (n, _) = collect(&ip, 20, ip_proto::TCP, 1000).unwrap();
        assert_eq!(n, 1);
        let bare = ipv6(ip_proto::UDP, &[], &udp(&[]));
        let (n, segs) = collect(&bare, 40, ip_proto::UDP, 1200).unwrap();
        assert_eq!(n, 1);
        assert_eq!(segs[0].len(), 48);
        assert!(l4_verifies(&segs[0], 40, ip_proto::UDP));
    }

    #[test]
    fn segments_reuse_scratch() {
        let ip = ipv4(ip_proto::TCP, 1, &tcp(&pattern(10_000)));
        let mut scratch = Vec::new();
        let mut ptrs = Vec::new();
        segment(&ip, 20, ip_proto::TCP, 1448, &mut scratch, |s| {
            ptrs.push(s.as_ptr() as usize)
        })
        .unwrap();
        assert_eq!(ptrs.len(), 7);
        assert!(ptrs.iter().all(|&p| p == ptrs[0]), "scratch reallocated");
    }

    #[test]
    fn segment_rejects_bad_input() {
        let payload = pattern(3000);
        let v4 = ipv4(ip_proto::TCP, 1, &tcp(&payload));
        let v6 = ipv6(ip_proto::TCP, &[], &tcp(&payload));
        let run = |ip: &[u8], l4: usize, proto: u8, gso: usize| {
            let mut scratch = Vec::new();
            let mut called = false;
            let r = segment(ip, l4, proto, gso, &mut scratch, |_| called = true);
            assert!(!called, "emitted before failing");
            r
        };
        assert_eq!(run(&v4, 20, ip_proto::TCP, 0), Err(Error::Malformed));
        assert_eq!(run(&v4, 20, ip_proto::ICMP, 1448), Err(Error::Unsupported));
        // Too many segments: 3000 bytes at 2 per segment.
        assert_eq!(run(&v4, 20, ip_proto::TCP, 2), Err(Error::Unsupported));
        assert_eq!(collect(&v4, 20, ip_proto::TCP, 3).unwrap().0, 1000);
        // Empty buffer, short header, unknown version.
        assert_eq!(run(&[], 20, ip_proto::TCP, 1448), Err(Error::Truncated));
        assert_eq!(
            run(&v4[..10], 20, ip_proto::TCP, 1448),
            Err(Error::Truncated)
        );
        let mut v5 = v4.clone();
        v5[0] = 0x55;
        assert_eq!(run(&v5, 20, ip_proto::TCP, 1448), Err(Error::Unsupported));
        // Lengths disagreeing with the slice: cut short, or followed by extra bytes.
        assert_eq!(
            run(&v4[..1000], 20, ip_proto::TCP, 1448),
            Err(Error::Truncated)
        );
        let mut long = v4.clone();
        long.push(0);
        assert_eq!(run(&long, 20, ip_proto::TCP, 1448), Err(Error::Malformed));
        assert_eq!(
            run(&v6[..1000], 40, ip_proto::TCP, 1448),
            Err(Error::Truncated)
        );
        let mut long6 = v6.clone();
        long6.push(0);
        assert_eq!(run(&long6, 40, ip_proto::TCP, 1448), Err(Error::Malformed));
        // l4_offset beyond the packet, or not where the IP header says L4 starts.
        assert_eq!(run(&v4, 5000, ip_proto::TCP, 1448), Err(Error::Truncated));
        assert_eq!(run(&v4, 24, ip_proto::TCP, 1448), Err(Error::Malformed));
        assert_eq!(run(&v6, 60, ip_proto::TCP, 1448), Err(Error::Malformed));
        // IP protocol other than `proto`.
        assert_eq!(run(&v4, 20, ip_proto::UDP, 1448), Err(Error::Malformed));
        assert_eq!(run(&v6, 40, ip_proto::UDP, 1448), Err(Error::Malformed));
        // TCP data offset below 5, and beyond the packet.
        let mut doff = v4.clone();
        doff[32] = 4 << 4;
        assert_eq!(run(&doff, 20, ip_proto::TCP, 1448), Err(Error::Malformed));
        let short = ipv4(ip_proto::TCP, 1, &tcp(&[])[..24]);
        assert_eq!(run(&short, 20, ip_proto::TCP, 1448), Err(Error::Truncated));
        // No room for a UDP header.
        let tiny = ipv4(ip_proto::UDP, 1, &[0; 4]);
        assert_eq!(run(&tiny, 20, ip_proto::UDP, 1448), Err(Error::Truncated));
        // An IPv4 fragment is not a super-packet.
        let mut frag = v4.clone();
        frag[6] |= 0x20;
        Ipv4Packet::new_unchecked(&mut frag[..]).fill_checksum();
        assert_eq!(run(&frag, 20, ip_proto::TCP, 1448), Err(Error::Unsupported));
    }

    /// Completes a partial checksum the way a NIC does: sum from csum_start, fold, store.
    fn nic_complete(ip: &[u8], l4_offset: usize) -> u16 {
        checksum::fold(checksum::sum(&ip[l4_offset..]))
    }

    fn partial_round_trip(mut ip: Vec<u8>, l4_offset: usize, proto: u8) {
        let mut full = ip.clone();
        complete_checksum(&mut full, l4_offset, proto).unwrap();
        assert!(l4_verifies(&full, l4_offset, proto));

        let csum_offset = set_partial_checksum(&mut ip, l4_offset, proto).unwrap();
        let want_offset = if proto == ip_proto::TCP { 16 } else { 6 };
        assert_eq!(csum_offset, want_offset);
        let at = l4_offset + csum_offset;
        let mut done = nic_complete(&ip, l4_offset);
        if proto == ip_proto::UDP && done == 0 {
            done = 0xffff;
        }
        assert_eq!(
            done.to_be_bytes(),
            full[at..at + 2],
            "NIC completion differs"
        );
        // Only the checksum field changed.
        assert_eq!(ip[..at], full[..at]);
        assert_eq!(ip[at + 2..], full[at + 2..]);
    }

    #[test]
    fn partial_checksum_round_trips() {
        partial_round_trip(
            ipv4(ip_proto::TCP, 1, &tcp(&pattern(1001))),
            20,
            ip_proto::TCP,
        );
        partial_round_trip(
            ipv4(ip_proto::UDP, 1, &udp(&pattern(777))),
            20,
            ip_proto::UDP,
        );
        partial_round_trip(
            ipv6(ip_proto::TCP, &[], &tcp(&pattern(1500))),
            40,
            ip_proto::TCP,
        );
        partial_round_trip(
            ipv6(ip_proto::UDP, &[], &udp(&pattern(33))),
            40,
            ip_proto::UDP,
        );
        let ext = [ip_proto::UDP, 0, 1, 4, 0, 0, 0, 0];
        let with_ext = ipv6(ip_proto::DSTOPTS, &ext, &udp(&pattern(64)));
        partial_round_trip(with_ext, 48, ip_proto::UDP);
    }

    #[test]
    fn partial_checksum_is_the_pseudo_header_sum() {
        let mut ip = ipv4(ip_proto::TCP, 1, &tcp(&pattern(100)));
        set_partial_checksum(&mut ip, 20, ip_proto::TCP).unwrap();
        // Written out: 198.18.1.2 + 198.18.2.2 + proto 6 + length 132.
        let mut acc: u32 = 0xc612 + 0x0102 + 0xc612 + 0x0202 + 6 + 132;
        acc = (acc & 0xffff) + (acc >> 16);
        assert_eq!(ip[36..38], (acc as u16).to_be_bytes());
    }

    #[test]
    fn complete_checksum_fixes_garbage_and_maps_udp_zero() {
        let mut ip = ipv6(ip_proto::TCP, &[], &tcp(&pattern(300)));
        assert!(!l4_verifies(&ip, 40, ip_proto::TCP));
        complete_checksum(&mut ip, 40, ip_proto::TCP).unwrap();
        assert!(l4_verifies(&ip, 40, ip_proto::TCP));

        // Choose two payload bytes so the UDP sum is all ones, making the checksum compute
        // to 0, which must go out as 0xFFFF.
        let mut ip = ipv4(ip_proto::UDP, 1, &udp(&[0, 0]));
        ip[26..28].fill(0);
        let rest = checksum::fold(
            checksum::pseudo_header_v4(&SRC4, &DST4, ip_proto::UDP, 10) + checksum::sum(&ip[20..]),
        );
        ip[28..30].copy_from_slice(&rest.to_be_bytes());
        complete_checksum(&mut ip, 20, ip_proto::UDP).unwrap();
        assert_eq!(ip[26..28], [0xff, 0xff]);
        assert!(l4_verifies(&ip, 20, ip_proto::UDP));
    }

    #[test]
    fn checksum_helpers_reject_bad_input() {
        let mut v4 = ipv4(ip_proto::UDP, 1, &udp(&pattern(100)));
        let orig = v4.clone();
        assert_eq!(
            set_partial_checksum(&mut v4, 20, ip_proto::ICMP),
            Err(Error::Unsupported)
        );
        assert_eq!(
            complete_checksum(&mut v4, 20, ip_proto::TCP),
            Err(Error::Malformed)
        );
        assert_eq!(
            set_partial_checksum(&mut v4, 200, ip_proto::UDP),
            Err(Error::Truncated)
        );
        assert_eq!(
            complete_checksum(&mut v4[..50], 20, ip_proto::UDP),
            Err(Error::Truncated)
        );
        // A UDP length field shorter than the IP packet says.
        let mut short_udp = v4.clone();
        short_udp[24..26].copy_from_slice(&50u16.to_be_bytes());
        assert_eq!(
            set_partial_checksum(&mut short_udp, 20, ip_proto::UDP),
            Err(Error::Malformed)
        );
        assert_eq!(
            complete_checksum(&mut short_udp, 20, ip_proto::UDP),
            Err(Error::Malformed)
        );
        assert_eq!(v4, orig, "failed calls wrote to the packet");
        let mut empty: [u8; 0] = [];
        assert_eq!(
            complete_checksum(&mut empty, 0, ip_proto::TCP),
            Err(Error::Truncated)
        );
    }
}
