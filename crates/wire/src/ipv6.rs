//! IPv6 (RFC 8200) and the walk over its extension headers.
//!
//! [`Ipv6Packet::check_len`] validates the payload length against the buffer; bytes past it
//! (link padding) are ignored. Jumbograms (payload length 0 with a Jumbo option) are not
//! supported: a zero payload length means an empty payload.

use std::net::Ipv6Addr;

use crate::field::Field;
use crate::ip_proto;
use crate::{get_ipv6, get_u16, get_u32, put_u16, put_u32, Error, Result};

mod field {
    use super::*;
    pub const VER_TC_FLOW: Field = 0..4;
    pub const LENGTH: Field = 4..6;
    pub const NXT_HDR: usize = 6;
    pub const HOP_LIMIT: usize = 7;
    pub const SRC_ADDR: Field = 8..24;
    pub const DST_ADDR: Field = 24..40;
}

/// Length of the fixed IPv6 header.
pub const HEADER_LEN: usize = field::DST_ADDR.end;

/// Most extension headers [`upper_layer`] walks before giving up.
pub const MAX_EXTENSION_HEADERS: usize = 8;

/// A read/write view of an IPv6 packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv6Packet<T> {
    buffer: T,
}

impl<T> Ipv6Packet<T> {
    /// Length of the fixed header.
    pub const HEADER_LEN: usize = HEADER_LEN;
}

impl<T: AsRef<[u8]>> Ipv6Packet<T> {
    /// Wraps `buffer` without checking it.
    pub const fn new_unchecked(buffer: T) -> Ipv6Packet<T> {
        Ipv6Packet { buffer }
    }

    /// Wraps `buffer` after [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<Ipv6Packet<T>> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// `Err(Truncated)` unless the fixed header and the payload length fit the buffer. The
    /// version is not checked (see [`Ipv6Repr::parse`]).
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN || HEADER_LEN + usize::from(self.payload_len()) > len {
            Err(Error::Truncated)
        } else {
            Ok(())
        }
    }

    /// The wrapped buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn ver_tc_flow(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::VER_TC_FLOW.start)
    }

    /// IP version (6 for a real IPv6 packet).
    pub fn version(&self) -> u8 {
        (self.ver_tc_flow() >> 28) as u8
    }

    /// Traffic class (DSCP and ECN).
    pub fn traffic_class(&self) -> u8 {
        (self.ver_tc_flow() >> 20) as u8
    }

    /// The 20-bit flow label.
    pub fn flow_label(&self) -> u32 {
        self.ver_tc_flow() & 0x000f_ffff
    }

    /// Payload length (extension headers included).
    pub fn payload_len(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::LENGTH.start)
    }

    /// Type of the header after the fixed one (see [`ip_proto`]).
    pub fn next_header(&self) -> u8 {
        self.buffer.as_ref()[field::NXT_HDR]
    }

    /// Hop limit.
    pub fn hop_limit(&self) -> u8 {
        self.buffer.as_ref()[field::HOP_LIMIT]
    }

    /// Source address.
    pub fn src_addr(&self) -> Ipv6Addr {
        get_ipv6(self.buffer.as_ref(), field::SRC_ADDR.start)
    }

    /// Destination address.
    pub fn dst_addr(&self) -> Ipv6Addr {
        get_ipv6(self.buffer.as_ref(), field::DST_ADDR.start)
    }

    /// The payload (extension headers included), up to the payload length.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..HEADER_LEN + usize::from(self.payload_len())]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv6Packet<T> {
    fn set_ver_tc_flow(&mut self, value: u32) {
        put_u32(self.buffer.as_mut(), field::VER_TC_FLOW.start, value);
    }

    /// Sets the version.
    pub fn set_version(&mut self, value: u8) {
        let v = self.ver_tc_flow() & 0x0fff_ffff;
        self.set_ver_tc_flow(v | (u32::from(value & 0x0f) << 28));
    }

    /// Sets the traffic class.
    pub fn set_traffic_class(&mut self, value: u8) {
        let v = self.ver_tc_flow() & 0xf00f_ffff;
        self.set_ver_tc_flow(v | (u32::from(value) << 20));
    }

    /// Sets the flow label (low 20 bits of `value`).
    pub fn set_flow_label(&mut self, value: u32) {
        let v = self.ver_tc_flow() & 0xfff0_0000;
        self.set_ver_tc_flow(v | (value & 0x000f_ffff));
    }

    /// Sets the payload length.
    pub fn set_payload_len(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::LENGTH.start, value);
    }

    /// Sets the next header.
    pub fn set_next_header(&mut self, value: u8) {
        self.buffer.as_mut()[field::NXT_HDR] = value;
    }

    /// Sets the hop limit.
    pub fn set_hop_limit(&mut self, value: u8) {
        self.buffer.as_mut()[field::HOP_LIMIT] = value;
    }

    /// Sets the source address.
    pub fn set_src_addr(&mut self, addr: Ipv6Addr) {
        self.buffer.as_mut()[field::SRC_ADDR].copy_from_slice(&addr.octets());
    }

    /// Sets the destination address.
    pub fn set_dst_addr(&mut self, addr: Ipv6Addr) {
        self.buffer.as_mut()[field::DST_ADDR].copy_from_slice(&addr.octets());
    }

    /// Mutable payload, up to the payload length.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = HEADER_LEN + usize::from(self.payload_len());
        &mut self.buffer.as_mut()[HEADER_LEN..end]
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for Ipv6Packet<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

/// The fixed IPv6 header as values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv6Repr {
    /// Source address.
    pub src_addr: Ipv6Addr,
    /// Destination address.
    pub dst_addr: Ipv6Addr,
    /// Type of the next header.
    pub next_header: u8,
    /// Payload length (extension headers included).
    pub payload_len: usize,
    /// Hop limit.
    pub hop_limit: u8,
}

impl Ipv6Repr {
    /// Parses the fixed header: lengths, and version 6 (`Malformed` otherwise).
    pub fn parse<T: AsRef<[u8]>>(packet: &Ipv6Packet<T>) -> Result<Ipv6Repr> {
        packet.check_len()?;
        if packet.version() != 6 {
            return Err(Error::Malformed);
        }
        Ok(Ipv6Repr {
            src_addr: packet.src_addr(),
            dst_addr: packet.dst_addr(),
            next_header: packet.next_header(),
            payload_len: usize::from(packet.payload_len()),
            hop_limit: packet.hop_limit(),
        })
    }

    /// Always 40.
    pub const fn header_len(&self) -> usize {
        HEADER_LEN
    }

    /// Header plus payload.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN + self.payload_len
    }

    /// Writes the fixed header with traffic class 0 and flow label 0. `payload_len` must fit
    /// 16 bits.
    ///
    /// # Panics
    /// If the buffer is shorter than 40 bytes.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Ipv6Packet<T>) {
        packet.set_ver_tc_flow(6 << 28);
        packet.set_payload_len(self.payload_len as u16);
        packet.set_next_header(self.next_header);
        packet.set_hop_limit(self.hop_limit);
        packet.set_src_addr(self.src_addr);
        packet.set_dst_addr(self.dst_addr);
    }
}

/// Walks the extension headers of the IPv6 packet at the start of `pkt` and returns
/// `(upper-layer protocol, offset of its header from the start of pkt, is_fragment)`.
///
/// Hop-by-hop (first only), routing, destination options and fragment headers are skipped;
/// anything else is the upper layer (including `NONE`, ESP and AH). The walk stays within the
/// packet's payload length and the buffer, whichever ends first, so it also works on the
/// truncated quote inside an ICMPv6 error; the upper-layer header itself need not be present.
/// A fragment with a non-zero offset ends the walk at the fragment header's next header, as
/// the bytes after it are not headers. `is_fragment` is false for atomic fragments (offset 0,
/// M clear, RFC 6946). More than [`MAX_EXTENSION_HEADERS`] headers give `Unsupported`.
pub fn upper_layer(pkt: &[u8]) -> Result<(u8, usize, bool)> {
    if pkt.len() < HEADER_LEN {
        return Err(Error::Truncated);
    }
    let packet = Ipv6Packet::new_unchecked(pkt);
    if packet.version() != 6 {
        return Err(Error::Malformed);
    }
    let limit = pkt
        .len()
        .min(HEADER_LEN + usize::from(packet.payload_len()));
    let mut next = packet.next_header();
    let mut offset = HEADER_LEN;
    let mut fragment = false;
    for count in 0..MAX_EXTENSION_HEADERS {
        match next {
            ip_proto::HOPOPTS | ip_proto::ROUTING | ip_proto::DSTOPTS => {
                if next == ip_proto::HOPOPTS && count != 0 {
                    return Err(Error::Malformed);
                }
                if offset + 2 > limit {
                    return Err(Error::Truncated);
                }
                let len = (usize::from(pkt[offset + 1]) + 1) * 8;
                if offset + len > limit {
                    return Err(Error::Truncated);
                }
                next = pkt[offset];
                offset += len;
            }
            ip_proto::FRAGMENT => {
                if offset + 8 > limit {
                    return Err(Error::Truncated);
                }
                let off_flags = get_u16(pkt, offset + 2);
                let frag_offset = off_flags >> 3;
                let more = off_flags & 1 != 0;
                next = pkt[offset];
                offset += 8;
                if frag_offset != 0 {
                    return Ok((next, offset, true));
                }
                fragment |= more;
            }
            _ => return Ok((next, offset, fragment)),
        }
    }
    match next {
        ip_proto::HOPOPTS | ip_proto::ROUTING | ip_proto::DSTOPTS | ip_proto::FRAGMENT => {
            Err(Error::Unsupported)
        }
        _ => Ok((next, offset, fragment)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    // Echo request 2001:db8:1::2 -> 2001:db8:2::2, hop limit 64, traffic class 0xb8 (EF),
    // flow label 0x12345, 16-byte ICMPv6 payload, then 2 bytes of padding.
    fn echo_packet() -> Vec<u8> {
        let mut v = vec![
            0x6b, 0x81, 0x23, 0x45, 0x00, 0x10, 0x3a, 0x40, 0x20, 0x01, 0x0d, 0xb8, 0x00, 0x01, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x20, 0x01, 0x0d, 0xb8, 0x00, 0x02, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0x02,
        ];
        v.extend_from_slice(&[0x80, 0, 0, 0, 0x0b, 0x2d, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8]);
        v.extend_from_slice(&[0xee, 0xee]);
        v
    }

    #[test]
    fn fields() {
        let v = echo_packet();
        let p = Ipv6Packet::new_checked(&v[..]).unwrap();
        assert_eq!(p.version(), 6);
        assert_eq!(p.traffic_class(), 0xb8);
        assert_eq!(p.flow_label(), 0x12345);
        assert_eq!(p.payload_len(), 16);
        assert_eq!(p.next_header(), ip_proto::ICMPV6);
        assert_eq!(p.hop_limit(), 64);
        assert_eq!(p.src_addr(), addr("2001:db8:1::2"));
        assert_eq!(p.dst_addr(), addr("2001:db8:2::2"));
        assert_eq!(p.payload().len(), 16);
        assert_eq!(p.payload()[0], 0x80);
        assert_eq!(upper_layer(&v).unwrap(), (ip_proto::ICMPV6, 40, false));
    }

    #[test]
    fn repr_round_trip() {
        let v = echo_packet();
        let r = Ipv6Repr::parse(&Ipv6Packet::new_checked(&v[..]).unwrap()).unwrap();
        assert_eq!(
            r,
            Ipv6Repr {
                src_addr: addr("2001:db8:1::2"),
                dst_addr: addr("2001:db8:2::2"),
                next_header: ip_proto::ICMPV6,
                payload_len: 16,
                hop_limit: 64,
            }
        );
        assert_eq!((r.header_len(), r.buffer_len()), (40, 56));
        let mut out = v.clone();
        out[..40].fill(0xff);
        r.emit(&mut Ipv6Packet::new_unchecked(&mut out[..]));
        // emit writes traffic class and flow label 0.
        let mut expect = v.clone();
        expect[..4].copy_from_slice(&[0x60, 0, 0, 0]);
        assert_eq!(out, expect);
    }

    #[test]
    fn setters() {
        let mut v = echo_packet();
        let mut p = Ipv6Packet::new_unchecked(&mut v[..]);
        p.set_traffic_class(0x12);
        p.set_flow_label(0xfffff);
        p.set_version(6);
        p.set_hop_limit(1);
        p.set_next_header(ip_proto::UDP);
        p.set_src_addr(addr("::1"));
        p.set_dst_addr(addr("::2"));
        p.set_payload_len(8);
        p.payload_mut().fill(0);
        assert_eq!(
            (p.version(), p.traffic_class(), p.flow_label()),
            (6, 0x12, 0xfffff)
        );
        assert_eq!(
            (p.hop_limit(), p.next_header(), p.payload().len()),
            (1, ip_proto::UDP, 8)
        );
        assert_eq!((p.src_addr(), p.dst_addr()), (addr("::1"), addr("::2")));
    }

    #[test]
    fn rejects() {
        let v = echo_packet();
        assert_eq!(Ipv6Packet::new_checked(&v[..39]), Err(Error::Truncated));
        assert_eq!(Ipv6Packet::new_checked(&v[..55]), Err(Error::Truncated));
        let mut bad = v.clone();
        bad[0] = 0x45;
        assert_eq!(
            Ipv6Repr::parse(&Ipv6Packet::new_unchecked(&bad[..])),
            Err(Error::Malformed)
        );
        assert_eq!(upper_layer(&bad), Err(Error::Malformed));
        assert_eq!(upper_layer(&v[..39]), Err(Error::Truncated));
    }

    /// Builds a packet with the given chain of (header type, header bytes) after the fixed header.
    fn chain(first: u8, headers: &[&[u8]], tail: &[u8]) -> Vec<u8> {
        let mut v = echo_packet()[..40].to_vec();
        v[6] = first;
        for h in headers {
            v.extend_from_slice(h);
        }
        v.extend_from_slice(tail);
        let len = (v.len() - 40) as u16;
        v[4..6].copy_from_slice(&len.to_be_bytes());
        v
    }

    #[test]
    fn extension_headers() {
        let hop = [ip_proto::ROUTING, 0, 1, 4, 0, 0, 0, 0]; // hop-by-hop, PadN
        let routing = [
            ip_proto::DSTOPTS,
            2,
            4,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        let dst = [ip_proto::TCP, 0, 1, 4, 0, 0, 0, 0];
        let tcp = [0u8; 20];
        let v = chain(ip_proto::HOPOPTS, &[&hop, &routing, &dst], &tcp);
        assert_eq!(
            upper_layer(&v).unwrap(),
            (ip_proto::TCP, 40 + 8 + 24 + 8, false)
        );

        // First fragment: walk continues into UDP, flagged.
        let frag_first = [ip_proto::UDP, 0, 0x00, 0x01, 0, 0, 0, 7];
        let v = chain(ip_proto::FRAGMENT, &[&frag_first], &[0; 8]);
        assert_eq!(upper_layer(&v).unwrap(), (ip_proto::UDP, 48, true));
        // Later fragment: stops at the fragment header.
        let frag_later = [ip_proto::UDP, 0, 0x05, 0x28, 0, 0, 0, 7];
        let v = chain(ip_proto::FRAGMENT, &[&frag_later], &[0xab; 8]);
        assert_eq!(upper_layer(&v).unwrap(), (ip_proto::UDP, 48, true));
        // Atomic fragment.
        let atomic = [ip_proto::ICMPV6, 0, 0, 0, 0, 0, 0, 7];
        let v = chain(ip_proto::FRAGMENT, &[&atomic], &[0; 8]);
        assert_eq!(upper_layer(&v).unwrap(), (ip_proto::ICMPV6, 48, false));
        // No next header.
        let v = chain(ip_proto::NONE, &[], &[]);
        assert_eq!(upper_layer(&v).unwrap(), (ip_proto::NONE, 40, false));
    }

    #[test]
    fn extension_header_errors() {
        // Hop-by-hop not first.
        let dst = [ip_proto::HOPOPTS, 0, 1, 4, 0, 0, 0, 0];
        let hop = [ip_proto::TCP, 0, 1, 4, 0, 0, 0, 0];
        assert_eq!(
            upper_layer(&chain(ip_proto::DSTOPTS, &[&dst, &hop], &[])),
            Err(Error::Malformed)
        );
        // Header overruns the payload length.
        let big = [ip_proto::TCP, 3, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            upper_layer(&chain(ip_proto::DSTOPTS, &[&big], &[])),
            Err(Error::Truncated)
        );
        assert_eq!(
            upper_layer(&chain(ip_proto::FRAGMENT, &[&[6, 0, 0]], &[])),
            Err(Error::Truncated)
        );
        assert_eq!(
            upper_layer(&chain(ip_proto::ROUTING, &[&[6]], &[])),
            Err(Error::Truncated)
        );
        // A loop of nine destination-options headers.
        let d = [ip_proto::DSTOPTS, 0, 1, 4, 0, 0, 0, 0];
        let many: Vec<&[u8]> = vec![&d; 9];
        assert_eq!(
            upper_layer(&chain(ip_proto::DSTOPTS, &many, &[])),
            Err(Error::Unsupported)
        );
        // Eight headers then TCP is fine.
        let mut eight: Vec<&[u8]> = vec![&d; 7];
        let last = [ip_proto::TCP, 0, 1, 4, 0, 0, 0, 0];
        eight.push(&last);
        assert_eq!(
            upper_layer(&chain(ip_proto::DSTOPTS, &eight, &[])).unwrap(),
            (ip_proto::TCP, 104, false)
        );
    }

    #[test]
    fn truncated_quote_still_walks() {
        // The quote in an ICMPv6 error keeps the original payload length but is cut short.
        let hop = [ip_proto::TCP, 0, 1, 4, 0, 0, 0, 0];
        let mut v = chain(ip_proto::HOPOPTS, &[&hop], &[0; 20]);
        v[4..6].copy_from_slice(&1400u16.to_be_bytes());
        assert_eq!(upper_layer(&v[..52]).unwrap(), (ip_proto::TCP, 48, false));
        assert_eq!(upper_layer(&v[..46]), Err(Error::Truncated));
    }
}
