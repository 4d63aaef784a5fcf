//! IPv4 (RFC 791).
//!
//! [`Ipv4Packet::check_len`] validates IHL and total length against the buffer, so every getter
//! (including [`payload`](Ipv4Packet::payload) and [`options`](Ipv4Packet::options)) is
//! panic-free afterwards. Bytes past the total length (Ethernet padding of short frames) are not
//! part of the packet and are ignored.

use std::net::Ipv4Addr;

use crate::checksum;
use crate::field::Field;
use crate::{get_ipv4, get_u16, put_u16, Error, Result};

/// IP protocol numbers (also IPv6 next-header values).
pub mod ip_proto {
    /// IPv6 hop-by-hop options.
    pub const HOPOPTS: u8 = 0;
    /// ICMP for IPv4.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// IPv6 routing header.
    pub const ROUTING: u8 = 43;
    /// IPv6 fragment header.
    pub const FRAGMENT: u8 = 44;
    /// ICMP for IPv6.
    pub const ICMPV6: u8 = 58;
    /// IPv6 "no next header".
    pub const NONE: u8 = 59;
    /// IPv6 destination options.
    pub const DSTOPTS: u8 = 60;
    /// SCTP.
    pub const SCTP: u8 = 132;
    /// UDP-Lite.
    pub const UDPLITE: u8 = 136;
}

mod field {
    use super::*;
    pub const VER_IHL: usize = 0;
    pub const DSCP_ECN: usize = 1;
    pub const LENGTH: Field = 2..4;
    pub const IDENT: Field = 4..6;
    pub const FLG_OFF: Field = 6..8;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: Field = 10..12;
    pub const SRC_ADDR: Field = 12..16;
    pub const DST_ADDR: Field = 16..20;
}

/// Length of a header without options.
pub const HEADER_LEN: usize = field::DST_ADDR.end;

const FLAG_DF: u16 = 0x4000;
const FLAG_MF: u16 = 0x2000;
const OFFSET_MASK: u16 = 0x1fff;

/// A read/write view of an IPv4 packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv4Packet<T> {
    buffer: T,
}

impl<T> Ipv4Packet<T> {
    /// Length of a header without options.
    pub const HEADER_LEN: usize = HEADER_LEN;
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// Wraps `buffer` without checking it.
    pub const fn new_unchecked(buffer: T) -> Ipv4Packet<T> {
        Ipv4Packet { buffer }
    }

    /// Wraps `buffer` after [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<Ipv4Packet<T>> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Checks that the buffer holds the fixed header, that IHL is at least 5 and fits, and that
    /// the total length covers the header and fits the buffer. `Truncated` when the buffer is
    /// shorter than a length says, `Malformed` when the length fields contradict each other.
    /// The version is not checked here (see [`Ipv4Repr::parse`]).
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let header_len = usize::from(self.header_len());
        let total_len = usize::from(self.total_len());
        if header_len < HEADER_LEN || total_len < header_len {
            return Err(Error::Malformed);
        }
        if header_len > len || total_len > len {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    /// The wrapped buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// IP version (4 for a real IPv4 packet).
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_IHL] >> 4
    }

    /// Header length in bytes (IHL × 4).
    pub fn header_len(&self) -> u8 {
        (self.buffer.as_ref()[field::VER_IHL] & 0x0f) * 4
    }

    /// The DSCP and ECN byte (formerly TOS).
    pub fn dscp_ecn(&self) -> u8 {
        self.buffer.as_ref()[field::DSCP_ECN]
    }

    /// Total length (header and payload) in bytes.
    pub fn total_len(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::LENGTH.start)
    }

    /// Identification.
    pub fn ident(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::IDENT.start)
    }

    fn flags_offset(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::FLG_OFF.start)
    }

    /// Don't Fragment flag.
    pub fn dont_frag(&self) -> bool {
        self.flags_offset() & FLAG_DF != 0
    }

    /// More Fragments flag.
    pub fn more_frags(&self) -> bool {
        self.flags_offset() & FLAG_MF != 0
    }

    /// Fragment offset in bytes.
    pub fn frag_offset(&self) -> u16 {
        (self.flags_offset() & OFFSET_MASK) << 3
    }

    /// Part of a fragmented datagram: MF set or a non-zero offset.
    pub fn is_fragment(&self) -> bool {
        self.flags_offset() & (FLAG_MF | OFFSET_MASK) != 0
    }

    /// Time to live.
    pub fn hop_limit(&self) -> u8 {
        self.buffer.as_ref()[field::TTL]
    }

    /// Time to live (same as [`hop_limit`](Self::hop_limit)).
    pub fn ttl(&self) -> u8 {
        self.hop_limit()
    }

    /// Protocol of the payload (see [`ip_proto`]).
    pub fn next_header(&self) -> u8 {
        self.buffer.as_ref()[field::PROTOCOL]
    }

    /// Header checksum as stored.
    pub fn checksum(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::CHECKSUM.start)
    }

    /// Source address.
    pub fn src_addr(&self) -> Ipv4Addr {
        get_ipv4(self.buffer.as_ref(), field::SRC_ADDR.start)
    }

    /// Destination address.
    pub fn dst_addr(&self) -> Ipv4Addr {
        get_ipv4(self.buffer.as_ref(), field::DST_ADDR.start)
    }

    /// The header checksum verifies.
    pub fn verify_checksum(&self) -> bool {
        checksum::data(&self.buffer.as_ref()[..usize::from(self.header_len())]) == 0
    }

    /// Option bytes between the fixed header and the payload.
    pub fn options(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..usize::from(self.header_len())]
    }

    /// Whether the options may be forwarded (see [`check_options`]).
    pub fn check_options(&self) -> core::result::Result<(), OptionsError> {
        check_options(self.options())
    }

    /// The payload: from the end of the header to the total length.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[usize::from(self.header_len())..usize::from(self.total_len())]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    /// Sets the version nibble.
    pub fn set_version(&mut self, value: u8) {
        let b = &mut self.buffer.as_mut()[field::VER_IHL];
        *b = (*b & 0x0f) | (value << 4);
    }

    /// Sets the header length in bytes (a multiple of 4, at most 60).
    pub fn set_header_len(&mut self, value: u8) {
        let b = &mut self.buffer.as_mut()[field::VER_IHL];
        *b = (*b & 0xf0) | ((value / 4) & 0x0f);
    }

    /// Sets the DSCP and ECN byte.
    pub fn set_dscp_ecn(&mut self, value: u8) {
        self.buffer.as_mut()[field::DSCP_ECN] = value;
    }

    /// Sets the total length.
    pub fn set_total_len(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::LENGTH.start, value);
    }

    /// Sets the identification.
    pub fn set_ident(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::IDENT.start, value);
    }

    fn set_flags_offset(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::FLG_OFF.start, value);
    }

    /// Sets or clears Don't Fragment.
    pub fn set_dont_frag(&mut self, value: bool) {
        let v = self.flags_offset() & !FLAG_DF;
        self.set_flags_offset(if value { v | FLAG_DF } else { v });
    }

    /// Sets or clears More Fragments.
    pub fn set_more_frags(&mut self, value: bool) {
        let v = self.flags_offset() & !FLAG_MF;
        self.set_flags_offset(if value { v | FLAG_MF } else { v });
    }

    /// Sets the fragment offset in bytes (a multiple of 8).
    pub fn set_frag_offset(&mut self, value: u16) {
        let v = self.flags_offset() & !OFFSET_MASK;
        self.set_flags_offset(v | ((value >> 3) & OFFSET_MASK));
    }

    /// Sets the time to live (the checksum is not updated; see [`decrement_ttl`]).
    pub fn set_hop_limit(&mut self, value: u8) {
        self.buffer.as_mut()[field::TTL] = value;
    }

    /// Same as [`set_hop_limit`](Self::set_hop_limit).
    pub fn set_ttl(&mut self, value: u8) {
        self.set_hop_limit(value);
    }

    /// Sets the protocol.
    pub fn set_next_header(&mut self, value: u8) {
        self.buffer.as_mut()[field::PROTOCOL] = value;
    }

    /// Stores a checksum as given.
    pub fn set_checksum(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::CHECKSUM.start, value);
    }

    /// Sets the source address.
    pub fn set_src_addr(&mut self, addr: Ipv4Addr) {
        self.buffer.as_mut()[field::SRC_ADDR].copy_from_slice(&addr.octets());
    }

    /// Sets the destination address.
    pub fn set_dst_addr(&mut self, addr: Ipv4Addr) {
        self.buffer.as_mut()[field::DST_ADDR].copy_from_slice(&addr.octets());
    }

    /// Computes and stores the header checksum.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let header_len = usize::from(self.header_len());
        let c = checksum::data(&self.buffer.as_ref()[..header_len]);
        self.set_checksum(c);
    }

    /// Mutable option bytes.
    pub fn options_mut(&mut self) -> &mut [u8] {
        let header_len = usize::from(self.header_len());
        &mut self.buffer.as_mut()[HEADER_LEN..header_len]
    }

    /// Mutable payload, from the end of the header to the total length.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let range = usize::from(self.header_len())..usize::from(self.total_len());
        &mut self.buffer.as_mut()[range]
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for Ipv4Packet<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

/// IPv4 option types (RFC 791; the copied bit is part of the value).
pub mod ip_option {
    /// End of option list: the rest is padding.
    pub const EOL: u8 = 0;
    /// No operation (one byte, aligns the next option).
    pub const NOP: u8 = 1;
    /// Loose source and record route.
    pub const LSRR: u8 = 0x83;
    /// Strict source and record route.
    pub const SSRR: u8 = 0x89;
}

/// Why an IPv4 header's options make a packet unfit to forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OptionsError {
    /// Loose or strict source routing: the sender picks the path through us, which Linux
    /// refuses by default (`accept_source_route = 0`).
    SourceRoute,
    /// An option's length byte is missing, below 2, or runs past the header (the kernel's
    /// `ip_options_compile` answers these with a parameter problem and drops).
    Malformed,
}

/// Walks the option bytes of an IPv4 header (between the fixed 20 bytes and IHL * 4): every
/// option but EOL and NOP is type, length (counting both), data. Bytes after EOL are padding.
pub fn check_options(mut opts: &[u8]) -> core::result::Result<(), OptionsError> {
    let mut source_route = false;
    while let Some(&ty) = opts.first() {
        match ty {
            ip_option::EOL => break,
            ip_option::NOP => opts = &opts[1..],
            _ => {
                let len = usize::from(*opts.get(1).ok_or(OptionsError::Malformed)?);
                if len < 2 || len > opts.len() {
                    return Err(OptionsError::Malformed);
                }
                source_route |= matches!(ty, ip_option::LSRR | ip_option::SSRR);
                opts = &opts[len..];
            }
        }
    }
    // A malformed option anywhere wins over a source route before it: both drop, and the
    // count should say the header was broken.
    if source_route {
        return Err(OptionsError::SourceRoute);
    }
    Ok(())
}

/// Decrements the TTL and patches the header checksum incrementally (RFC 1624), as a router
/// does when forwarding. A TTL of 0 is left alone: the caller decides what to do with packets
/// whose TTL ran out (normally it checks `hop_limit() <= 1` first and answers Time Exceeded).
pub fn decrement_ttl<T: AsRef<[u8]> + AsMut<[u8]>>(pkt: &mut Ipv4Packet<T>) {
    let ttl = pkt.hop_limit();
    if ttl == 0 {
        return;
    }
    let proto = pkt.next_header();
    let old = u16::from_be_bytes([ttl, proto]);
    let new = u16::from_be_bytes([ttl - 1, proto]);
    pkt.set_hop_limit(ttl - 1);
    let c = checksum::update16(pkt.checksum(), old, new);
    pkt.set_checksum(c);
}

/// An IPv4 header as values (options and fragmentation are not represented: they are read from
/// the view when needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Repr {
    /// Source address.
    pub src_addr: Ipv4Addr,
    /// Destination address.
    pub dst_addr: Ipv4Addr,
    /// Protocol of the payload (see [`ip_proto`]).
    pub next_header: u8,
    /// Payload length in bytes (total length minus header length, options excluded).
    pub payload_len: usize,
    /// Time to live.
    pub hop_limit: u8,
}

impl Ipv4Repr {
    /// Parses and validates a header: lengths, version 4 (`Malformed` otherwise) and the header
    /// checksum (`Checksum`). Fragments parse; check [`Ipv4Packet::is_fragment`] if it matters.
    pub fn parse<T: AsRef<[u8]>>(packet: &Ipv4Packet<T>) -> Result<Ipv4Repr> {
        packet.check_len()?;
        if packet.version() != 4 {
            return Err(Error::Malformed);
        }
        if !packet.verify_checksum() {
            return Err(Error::Checksum);
        }
        Ok(Ipv4Repr {
            src_addr: packet.src_addr(),
            dst_addr: packet.dst_addr(),
            next_header: packet.next_header(),
            payload_len: usize::from(packet.total_len()) - usize::from(packet.header_len()),
            hop_limit: packet.hop_limit(),
        })
    }

    /// Always 20: `emit` writes no options.
    pub const fn header_len(&self) -> usize {
        HEADER_LEN
    }

    /// Header plus payload.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN + self.payload_len
    }

    /// Writes a 20-byte header: DSCP/ECN 0, ident 0, DF set, no fragmentation, checksum filled.
    /// The payload (at `HEADER_LEN..`) is not touched. `payload_len` must not exceed
    /// 65535 - 20; larger values are truncated to 16 bits.
    ///
    /// # Panics
    /// If the buffer is shorter than 20 bytes.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Ipv4Packet<T>) {
        packet.set_version(4);
        packet.set_header_len(HEADER_LEN as u8);
        packet.set_dscp_ecn(0);
        packet.set_total_len(self.buffer_len() as u16);
        packet.set_ident(0);
        packet.set_flags_offset(FLAG_DF);
        packet.set_hop_limit(self.hop_limit);
        packet.set_next_header(self.next_header);
        packet.set_src_addr(self.src_addr);
        packet.set_dst_addr(self.dst_addr);
        packet.fill_checksum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A TCP SYN, 198.18.1.2 -> 198.18.2.2, TTL 64, DF, ident 0x1c46, as Linux sends it,
    // followed by two bytes of link padding that are not part of the packet.
    static SYN: [u8; 62] = [
        0x45, 0x00, 0x00, 0x3c, 0x1c, 0x46, 0x40, 0x00, 0x40, 0x06, 0x8f, 0x4d, 0xc6, 0x12, 0x01,
        0x02, 0xc6, 0x12, 0x02, 0x02, // IPv4 header
        0xa4, 0x7e, 0x00, 0x50, 0x5e, 0x2b, 0x6f, 0x4c, 0x00, 0x00, 0x00, 0x00, 0xa0, 0x02, 0xfa,
        0xf0, 0x49, 0x9c, 0x00, 0x00, // TCP header
        0x02, 0x04, 0x05, 0xb4, 0x04, 0x02, 0x08, 0x0a, 0x00, 0x01, 0x02, 0x03, 0x00, 0x00, 0x00,
        0x00, 0x01, 0x03, 0x03, 0x07, // TCP options
        0xee, 0xee, // padding
    ];

    fn syn() -> Vec<u8> {
        SYN.to_vec()
    }

    #[test]
    fn options_source_routes_and_bad_lengths() {
        use OptionsError::*;
        let cases: [(&[u8], core::result::Result<(), OptionsError>); 14] = [
            (&[], Ok(())),
            (&[0, 0, 0, 0], Ok(())),
            (&[1, 1, 1, 0], Ok(())),
            // Router alert (RFC 2113), as IGMP and RSVP send it.
            (&[0x94, 4, 0, 0], Ok(())),
            // Record route with room for one address, then EOL.
            (&[7, 7, 4, 0, 0, 0, 0, 0], Ok(())),
            // Bytes after EOL are padding, whatever they hold.
            (&[0, 0x83, 0xff, 0], Ok(())),
            // LSRR through 198.18.2.9 (as `ping -g` sends it), then EOL.
            (
                &[1, 0x83, 7, 4, 198, 18, 2, 9, 0, 0, 0, 0],
                Err(SourceRoute),
            ),
            // SSRR.
            (&[0x89, 7, 4, 198, 18, 2, 9, 0], Err(SourceRoute)),
            // A length byte missing, zero, one, or past the header.
            (&[1, 1, 1, 7], Err(Malformed)),
            (&[7, 0, 0, 0], Err(Malformed)),
            (&[7, 1, 0, 0], Err(Malformed)),
            (&[7, 9, 4, 0, 0, 0, 0, 0], Err(Malformed)),
            // A broken option after a source route: counted as broken.
            (&[0x83, 3, 4, 7, 9, 0, 0, 0], Err(Malformed)),
            // An unknown option with a sound length passes, as in the kernel.
            (&[0x1e, 4, 0, 0], Ok(())),
        ];
        for (opts, want) in cases {
            assert_eq!(check_options(opts), want, "{opts:02x?}");
        }
        // Through the view: a header with IHL 6 carrying a 4-byte LSRR stub.
        let mut p = syn()[..60].to_vec();
        p[0] = 0x46;
        p.splice(20..20, [0x83, 3, 4, 0]);
        let pkt = Ipv4Packet::new_checked(&p[..]).expect("checked");
        assert_eq!(pkt.check_options(), Err(SourceRoute));
        assert_eq!(
            Ipv4Packet::new_checked(&SYN[..]).map(|p| p.check_options()),
            Ok(Ok(()))
        );
    }

    #[test]
    fn fields() {
        let v = syn();
        let p = Ipv4Packet::new_checked(&v[..]).unwrap();
        assert_eq!(p.version(), 4);
        assert_eq!(p.header_len(), 20);
        assert_eq!(p.dscp_ecn(), 0);
        assert_eq!(p.total_len(), 60);
        assert_eq!(p.ident(), 0x1c46);
        assert!(p.dont_frag());
        assert!(!p.more_frags());
        assert_eq!(p.frag_offset(), 0);
        assert!(!p.is_fragment());
        assert_eq!(p.hop_limit(), 64);
        assert_eq!(p.ttl(), 64);
        assert_eq!(p.next_header(), ip_proto::TCP);
        assert_eq!(p.src_addr(), Ipv4Addr::new(198, 18, 1, 2));
        assert_eq!(p.dst_addr(), Ipv4Addr::new(198, 18, 2, 2));
        assert!(p.verify_checksum());
        assert_eq!(p.checksum(), 0x8f4d);
        let tcp = crate::TcpPacket::new_checked(p.payload()).unwrap();
        assert!(tcp.verify_checksum_v4(&p.src_addr(), &p.dst_addr()));
        assert_eq!(p.options(), &[] as &[u8]);
        assert_eq!(p.payload().len(), 40);
        assert_eq!(p.payload()[..2], [0xa4, 0x7e]);
    }

    #[test]
    fn known_checksum() {
        // The Wikipedia example header: checksum 0xb861.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        let mut buf = h.to_vec();
        buf.resize(0x73, 0);
        let mut p = Ipv4Packet::new_checked(&mut buf[..]).unwrap();
        assert!(p.verify_checksum());
        p.set_checksum(0);
        p.fill_checksum();
        assert_eq!(p.checksum(), 0xb861);
    }

    #[test]
    fn repr_round_trip() {
        let v = syn();
        let p = Ipv4Packet::new_checked(&v[..]).unwrap();
        let r = Ipv4Repr::parse(&p).unwrap();
        assert_eq!(
            r,
            Ipv4Repr {
                src_addr: Ipv4Addr::new(198, 18, 1, 2),
                dst_addr: Ipv4Addr::new(198, 18, 2, 2),
                next_header: ip_proto::TCP,
                payload_len: 40,
                hop_limit: 64,
            }
        );
        assert_eq!(r.buffer_len(), 60);
        // emit writes ident 0; apart from ident and checksum the header is the same.
        let mut out = v.clone();
        out[..20].fill(0);
        r.emit(&mut Ipv4Packet::new_unchecked(&mut out[..]));
        let q = Ipv4Packet::new_checked(&out[..]).unwrap();
        assert!(q.verify_checksum());
        assert_eq!(q.ident(), 0);
        assert_eq!(Ipv4Repr::parse(&q).unwrap(), r);
        let mut expect = v.clone();
        expect[4..6].fill(0);
        Ipv4Packet::new_unchecked(&mut expect[..]).fill_checksum();
        assert_eq!(out, expect);
    }

    #[test]
    fn options_and_fragments() {
        let mut v = [0u8; 32];
        v[..20].copy_from_slice(&syn()[..20]);
        let mut p = Ipv4Packet::new_unchecked(&mut v[..]);
        p.set_header_len(24);
        p.set_total_len(32);
        p.options_mut().copy_from_slice(&[0x94, 0x04, 0x00, 0x00]); // router alert
        p.set_more_frags(true);
        p.set_frag_offset(1480);
        p.set_dont_frag(false);
        p.fill_checksum();
        let p = Ipv4Packet::new_checked(&v[..]).unwrap();
        assert_eq!(p.options(), &[0x94, 0x04, 0x00, 0x00]);
        assert_eq!(p.payload().len(), 8);
        assert!(p.more_frags() && !p.dont_frag() && p.is_fragment());
        assert_eq!(p.frag_offset(), 1480);
        assert_eq!(Ipv4Repr::parse(&p).unwrap().payload_len, 8);
    }

    #[test]
    fn decrement_ttl_keeps_checksum_valid() {
        let mut v = syn();
        for ttl in [64u8, 1, 255, 2] {
            let mut p = Ipv4Packet::new_unchecked(&mut v[..]);
            p.set_hop_limit(ttl);
            p.fill_checksum();
            decrement_ttl(&mut p);
            assert_eq!(p.hop_limit(), ttl - 1);
            assert!(p.verify_checksum(), "ttl {ttl}");
        }
        let mut p = Ipv4Packet::new_unchecked(&mut v[..]);
        p.set_hop_limit(0);
        p.fill_checksum();
        decrement_ttl(&mut p);
        assert_eq!(p.hop_limit(), 0);
        assert!(p.verify_checksum());
    }

    #[test]
    fn rejects() {
        let v = syn();
        assert_eq!(Ipv4Packet::new_checked(&v[..19]), Err(Error::Truncated));
        assert_eq!(Ipv4Packet::new_checked(&v[..59]), Err(Error::Truncated));
        let mut bad = v.clone();
        bad[0] = 0x44; // IHL 4
        assert_eq!(Ipv4Packet::new_checked(&bad[..]), Err(Error::Malformed));
        let mut bad = v.clone();
        bad[0] = 0x4f; // IHL 15 = 60 bytes, more than the total length
        bad[2..4].copy_from_slice(&40u16.to_be_bytes());
        assert_eq!(Ipv4Packet::new_checked(&bad[..]), Err(Error::Malformed));
        let mut bad = v.clone();
        bad[2..4].copy_from_slice(&19u16.to_be_bytes());
        assert_eq!(Ipv4Packet::new_checked(&bad[..]), Err(Error::Malformed));
        let mut bad = v.clone();
        bad[0] = 0x65;
        Ipv4Packet::new_unchecked(&mut bad[..]).fill_checksum();
        assert_eq!(
            Ipv4Repr::parse(&Ipv4Packet::new_unchecked(&bad[..])),
            Err(Error::Malformed)
        );
        let mut bad = v.clone();
        bad[15] ^= 1;
        assert_eq!(
            Ipv4Repr::parse(&Ipv4Packet::new_unchecked(&bad[..])),
            Err(Error::Checksum)
        );
        assert_eq!(
            Ipv4Repr::parse(&Ipv4Packet::new_unchecked(&v[..10])),
            Err(Error::Truncated)
        );
    }
}
