//! ICMPv6 (RFC 4443) and the neighbour-discovery messages a dispatcher needs (RFC 4861).
//!
//! The view's buffer is the whole message (the upper-layer slice of the IPv6 packet). The
//! checksum covers the IPv6 pseudo-header, so checking it takes the addresses
//! ([`Icmpv6Packet::verify_checksum`]) and the Reprs' `parse` do not check it.

use std::net::Ipv6Addr;

use crate::checksum;
use crate::ethernet::EthernetAddress;
use crate::field::Field;
use crate::ip_proto;
use crate::{get_ipv6, get_u16, get_u32, put_u16, put_u32, Error, Result};

/// Message types dva handles.
pub mod icmpv6_type {
    /// Destination unreachable.
    pub const DST_UNREACHABLE: u8 = 1;
    /// Packet too big.
    pub const PACKET_TOO_BIG: u8 = 2;
    /// Time exceeded.
    pub const TIME_EXCEEDED: u8 = 3;
    /// Parameter problem.
    pub const PARAM_PROBLEM: u8 = 4;
    /// Echo request.
    pub const ECHO_REQUEST: u8 = 128;
    /// Echo reply.
    pub const ECHO_REPLY: u8 = 129;
    /// Neighbor solicitation.
    pub const NEIGHBOR_SOLICIT: u8 = 135;
    /// Neighbor advertisement.
    pub const NEIGHBOR_ADVERT: u8 = 136;
}

/// Flag bits of a neighbor advertisement ([`NdiscRepr::NeighborAdvert::flags`]).
pub mod ndisc_flags {
    /// The sender is a router.
    pub const ROUTER: u8 = 0x80;
    /// Sent in response to a solicitation.
    pub const SOLICITED: u8 = 0x40;
    /// Override an existing cache entry.
    pub const OVERRIDE: u8 = 0x20;
}

/// Neighbor-discovery option types carrying a link-layer address.
pub mod ndisc_option {
    /// Source link-layer address.
    pub const SOURCE_LLADDR: u8 = 1;
    /// Target link-layer address.
    pub const TARGET_LLADDR: u8 = 2;
}

/// Error messages are types 0–127 (RFC 4443 §2.1).
pub fn is_error(t: u8) -> bool {
    t < 128
}

mod field {
    use super::*;
    pub const TYPE: usize = 0;
    pub const CODE: usize = 1;
    pub const CHECKSUM: Field = 2..4;
    pub const HEADER_DATA: Field = 4..8;
    pub const ECHO_IDENT: Field = 4..6;
    pub const ECHO_SEQNO: Field = 6..8;
    pub const NDISC_FLAGS: usize = 4;
    pub const TARGET_ADDR: Field = 8..24;
}

/// Length of the ICMPv6 header.
pub const HEADER_LEN: usize = field::HEADER_DATA.end;
/// Length of a neighbor solicitation/advertisement before its options.
pub const NDISC_HEADER_LEN: usize = field::TARGET_ADDR.end;
/// Length of a link-layer address option for Ethernet.
const LLADDR_OPTION_LEN: usize = 8;

/// A read/write view of an ICMPv6 message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Icmpv6Packet<T> {
    buffer: T,
}

impl<T> Icmpv6Packet<T> {
    /// Length of the ICMPv6 header.
    pub const HEADER_LEN: usize = HEADER_LEN;
}

impl<T: AsRef<[u8]>> Icmpv6Packet<T> {
    /// Wraps `buffer` without checking it.
    pub const fn new_unchecked(buffer: T) -> Icmpv6Packet<T> {
        Icmpv6Packet { buffer }
    }

    /// Wraps `buffer` after [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<Icmpv6Packet<T>> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// `Err(Truncated)` unless the 8-byte header fits.
    pub fn check_len(&self) -> Result<()> {
        if self.buffer.as_ref().len() < HEADER_LEN {
            Err(Error::Truncated)
        } else {
            Ok(())
        }
    }

    /// The wrapped buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Message type (see [`icmpv6_type`]).
    pub fn msg_type(&self) -> u8 {
        self.buffer.as_ref()[field::TYPE]
    }

    /// Message code.
    pub fn msg_code(&self) -> u8 {
        self.buffer.as_ref()[field::CODE]
    }

    /// Checksum as stored.
    pub fn checksum(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::CHECKSUM.start)
    }

    /// Echo identifier (echo request/reply).
    pub fn echo_ident(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::ECHO_IDENT.start)
    }

    /// Echo sequence number (echo request/reply).
    pub fn echo_seq_no(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::ECHO_SEQNO.start)
    }

    /// The 4 type-specific bytes after the checksum: the MTU of Packet Too Big, the pointer of
    /// Parameter Problem, the flags of a neighbor advertisement in the top byte.
    pub fn header_data(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::HEADER_DATA.start)
    }

    /// The MTU of a Packet Too Big message.
    pub fn mtu(&self) -> u32 {
        self.header_data()
    }

    /// Neighbor-advertisement flags (see [`ndisc_flags`]).
    pub fn ndisc_flags(&self) -> u8 {
        self.buffer.as_ref()[field::NDISC_FLAGS]
    }

    /// Target address of a neighbor solicitation/advertisement; `None` when the message is too
    /// short to hold one.
    pub fn target_addr(&self) -> Option<Ipv6Addr> {
        let buf = self.buffer.as_ref();
        (buf.len() >= NDISC_HEADER_LEN).then(|| get_ipv6(buf, field::TARGET_ADDR.start))
    }

    /// Bytes after the 8-byte header: echo data, or the quoted packet of an error.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }

    fn compute(&self, src: &Ipv6Addr, dst: &Ipv6Addr) -> u16 {
        let data = self.buffer.as_ref();
        checksum::fold(
            checksum::pseudo_header_v6(src, dst, ip_proto::ICMPV6, data.len() as u32)
                + checksum::sum(data),
        )
    }

    /// The checksum verifies for a message from `src` to `dst`.
    pub fn verify_checksum(&self, src: &Ipv6Addr, dst: &Ipv6Addr) -> bool {
        self.compute(src, dst) == 0
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Icmpv6Packet<T> {
    /// Sets the message type.
    pub fn set_msg_type(&mut self, value: u8) {
        self.buffer.as_mut()[field::TYPE] = value;
    }

    /// Sets the message code.
    pub fn set_msg_code(&mut self, value: u8) {
        self.buffer.as_mut()[field::CODE] = value;
    }

    /// Stores a checksum as given.
    pub fn set_checksum(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::CHECKSUM.start, value);
    }

    /// Sets the echo identifier.
    pub fn set_echo_ident(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::ECHO_IDENT.start, value);
    }

    /// Sets the echo sequence number.
    pub fn set_echo_seq_no(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::ECHO_SEQNO.start, value);
    }

    /// Sets the 4 type-specific bytes.
    pub fn set_header_data(&mut self, value: u32) {
        put_u32(self.buffer.as_mut(), field::HEADER_DATA.start, value);
    }

    /// Sets the target address of a neighbor solicitation/advertisement.
    ///
    /// # Panics
    /// If the buffer is shorter than 24 bytes.
    pub fn set_target_addr(&mut self, addr: Ipv6Addr) {
        self.buffer.as_mut()[field::TARGET_ADDR].copy_from_slice(&addr.octets());
    }

    /// Computes and stores the checksum for a message from `src` to `dst`.
    pub fn fill_checksum(&mut self, src: &Ipv6Addr, dst: &Ipv6Addr) {
        self.set_checksum(0);
        let c = self.compute(src, dst);
        self.set_checksum(c);
    }

    /// Mutable bytes after the header.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[HEADER_LEN..]
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for Icmpv6Packet<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

/// The ICMPv6 echo and error messages dva parses and builds (neighbor discovery is
/// [`NdiscRepr`]). `data_len` is the payload length after the 8-byte header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Icmpv6Repr {
    /// Type 128.
    EchoRequest {
        /// Identifier.
        ident: u16,
        /// Sequence number.
        seq_no: u16,
        /// Echo data length.
        data_len: usize,
    },
    /// Type 129.
    EchoReply {
        /// Identifier.
        ident: u16,
        /// Sequence number.
        seq_no: u16,
        /// Echo data length.
        data_len: usize,
    },
    /// Type 1.
    DstUnreachable {
        /// Reason (1: administratively prohibited, 4: port unreachable, …).
        code: u8,
        /// Quote length.
        data_len: usize,
    },
    /// Type 2.
    PacketTooBig {
        /// MTU of the next hop.
        mtu: u32,
        /// Quote length.
        data_len: usize,
    },
    /// Type 3.
    TimeExceeded {
        /// 0: hop limit exceeded in transit; 1: reassembly time exceeded.
        code: u8,
        /// Quote length.
        data_len: usize,
    },
}

impl Icmpv6Repr {
    /// Parses an echo or error message; other types give `Err(Unsupported)`. The checksum is
    /// not verified (see [`Icmpv6Packet::verify_checksum`]).
    pub fn parse<T: AsRef<[u8]>>(packet: &Icmpv6Packet<T>) -> Result<Icmpv6Repr> {
        packet.check_len()?;
        let data_len = packet.payload().len();
        match (packet.msg_type(), packet.msg_code()) {
            (icmpv6_type::ECHO_REQUEST, 0) => Ok(Icmpv6Repr::EchoRequest {
                ident: packet.echo_ident(),
                seq_no: packet.echo_seq_no(),
                data_len,
            }),
            (icmpv6_type::ECHO_REPLY, 0) => Ok(Icmpv6Repr::EchoReply {
                ident: packet.echo_ident(),
                seq_no: packet.echo_seq_no(),
                data_len,
            }),
            (icmpv6_type::ECHO_REQUEST | icmpv6_type::ECHO_REPLY, _) => Err(Error::Malformed),
            (icmpv6_type::DST_UNREACHABLE, code) => {
                Ok(Icmpv6Repr::DstUnreachable { code, data_len })
            }
            (icmpv6_type::PACKET_TOO_BIG, 0) => Ok(Icmpv6Repr::PacketTooBig {
                mtu: packet.mtu(),
                data_len,
            }),
            (icmpv6_type::PACKET_TOO_BIG, _) => Err(Error::Malformed),
            (icmpv6_type::TIME_EXCEEDED, code) => Ok(Icmpv6Repr::TimeExceeded { code, data_len }),
            _ => Err(Error::Unsupported),
        }
    }

    /// Always 8.
    pub const fn header_len(&self) -> usize {
        HEADER_LEN
    }

    /// Header plus payload.
    pub const fn buffer_len(&self) -> usize {
        match *self {
            Icmpv6Repr::EchoRequest { data_len, .. }
            | Icmpv6Repr::EchoReply { data_len, .. }
            | Icmpv6Repr::DstUnreachable { data_len, .. }
            | Icmpv6Repr::PacketTooBig { data_len, .. }
            | Icmpv6Repr::TimeExceeded { data_len, .. } => HEADER_LEN + data_len,
        }
    }

    /// Writes the header and the checksum for a message from `src` to `dst`. **The caller
    /// places the payload first** at `HEADER_LEN..`; exactly [`buffer_len`](Self::buffer_len)
    /// bytes are checksummed.
    ///
    /// # Panics
    /// If the buffer is shorter than `buffer_len()`.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        packet: &mut Icmpv6Packet<T>,
        src: &Ipv6Addr,
        dst: &Ipv6Addr,
    ) {
        let (msg_type, code, header_data) = match *self {
            Icmpv6Repr::EchoRequest { ident, seq_no, .. } => (
                icmpv6_type::ECHO_REQUEST,
                0,
                u32::from(ident) << 16 | u32::from(seq_no),
            ),
            Icmpv6Repr::EchoReply { ident, seq_no, .. } => (
                icmpv6_type::ECHO_REPLY,
                0,
                u32::from(ident) << 16 | u32::from(seq_no),
            ),
            Icmpv6Repr::DstUnreachable { code, .. } => (icmpv6_type::DST_UNREACHABLE, code, 0),
            Icmpv6Repr::PacketTooBig { mtu, .. } => (icmpv6_type::PACKET_TOO_BIG, 0, mtu),
            Icmpv6Repr::TimeExceeded { code, .. } => (icmpv6_type::TIME_EXCEEDED, code, 0),
        };
        packet.set_msg_type(msg_type);
        packet.set_msg_code(code);
        packet.set_header_data(header_data);
        let len = self.buffer_len();
        Icmpv6Packet::new_unchecked(&mut packet.buffer.as_mut()[..len]).fill_checksum(src, dst);
    }
}

/// A neighbor solicitation or advertisement (RFC 4861 §4.3, §4.4) with its Ethernet
/// link-layer address option, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NdiscRepr {
    /// Type 135: who has `target_addr`? `lladdr` is the source link-layer address option
    /// (absent in duplicate address detection probes).
    NeighborSolicit {
        /// The address being resolved.
        target_addr: Ipv6Addr,
        /// The sender's MAC.
        lladdr: Option<EthernetAddress>,
    },
    /// Type 136: `target_addr` is at `lladdr` (the target link-layer address option).
    NeighborAdvert {
        /// See [`ndisc_flags`].
        flags: u8,
        /// The address advertised.
        target_addr: Ipv6Addr,
        /// Its MAC.
        lladdr: Option<EthernetAddress>,
    },
}

impl NdiscRepr {
    /// Parses a neighbor solicitation or advertisement. Other types give `Unsupported`; a code
    /// other than 0, a multicast target, or an option of length 0 or running past the message
    /// give `Malformed` (RFC 4861 §7.1 says to drop those). Unknown options are skipped; a
    /// link-layer option of a size other than Ethernet's is ignored. The checksum and the IPv6
    /// hop limit (must be 255) are the caller's to check.
    pub fn parse<T: AsRef<[u8]>>(packet: &Icmpv6Packet<T>) -> Result<NdiscRepr> {
        packet.check_len()?;
        let msg_type = packet.msg_type();
        let wanted_option = match msg_type {
            icmpv6_type::NEIGHBOR_SOLICIT => ndisc_option::SOURCE_LLADDR,
            icmpv6_type::NEIGHBOR_ADVERT => ndisc_option::TARGET_LLADDR,
            _ => return Err(Error::Unsupported),
        };
        if packet.msg_code() != 0 {
            return Err(Error::Malformed);
        }
        let target_addr = packet.target_addr().ok_or(Error::Truncated)?;
        if target_addr.is_multicast() {
            return Err(Error::Malformed);
        }
        let mut lladdr = None;
        let mut options = &packet.buffer.as_ref()[NDISC_HEADER_LEN..];
        while !options.is_empty() {
            if options.len() < 2 {
                return Err(Error::Malformed);
            }
            let len = usize::from(options[1]) * 8;
            if len == 0 || len > options.len() {
                return Err(Error::Malformed);
            }
            if options[0] == wanted_option && len == LLADDR_OPTION_LEN && lladdr.is_none() {
                lladdr = EthernetAddress::try_from(&options[2..8]).ok();
            }
            options = &options[len..];
        }
        Ok(match msg_type {
            icmpv6_type::NEIGHBOR_SOLICIT => NdiscRepr::NeighborSolicit {
                target_addr,
                lladdr,
            },
            _ => NdiscRepr::NeighborAdvert {
                flags: packet.ndisc_flags(),
                target_addr,
                lladdr,
            },
        })
    }

    fn lladdr(&self) -> Option<EthernetAddress> {
        match *self {
            NdiscRepr::NeighborSolicit { lladdr, .. }
            | NdiscRepr::NeighborAdvert { lladdr, .. } => lladdr,
        }
    }

    /// 24 bytes, plus 8 with a link-layer address option.
    pub fn buffer_len(&self) -> usize {
        NDISC_HEADER_LEN
            + if self.lladdr().is_some() {
                LLADDR_OPTION_LEN
            } else {
                0
            }
    }

    /// Writes the whole message and its checksum for `src` to `dst` (the IPv6 header must
    /// carry hop limit 255).
    ///
    /// # Panics
    /// If the buffer is shorter than [`buffer_len`](Self::buffer_len).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        packet: &mut Icmpv6Packet<T>,
        src: &Ipv6Addr,
        dst: &Ipv6Addr,
    ) {
        let (msg_type, header_data, target_addr, option) = match *self {
            NdiscRepr::NeighborSolicit { target_addr, .. } => (
                icmpv6_type::NEIGHBOR_SOLICIT,
                0,
                target_addr,
                ndisc_option::SOURCE_LLADDR,
            ),
            NdiscRepr::NeighborAdvert {
                flags, target_addr, ..
            } => (
                icmpv6_type::NEIGHBOR_ADVERT,
                u32::from(flags) << 24,
                target_addr,
                ndisc_option::TARGET_LLADDR,
            ),
        };
        packet.set_msg_type(msg_type);
        packet.set_msg_code(0);
        packet.set_header_data(header_data);
        packet.set_target_addr(target_addr);
        let len = self.buffer_len();
        let buf = &mut packet.buffer.as_mut()[..len];
        if let Some(mac) = self.lladdr() {
            buf[NDISC_HEADER_LEN] = option;
            buf[NDISC_HEADER_LEN + 1] = (LLADDR_OPTION_LEN / 8) as u8;
            buf[NDISC_HEADER_LEN + 2..NDISC_HEADER_LEN + 8].copy_from_slice(&mac.0);
        }
        Icmpv6Packet::new_unchecked(buf).fill_checksum(src, dst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    const MAC: EthernetAddress = EthernetAddress([0x02, 0x00, 0x00, 0x00, 0x01, 0x02]);

    // NS from 2001:db8:1::2 for 2001:db8:1::1 to its solicited-node group, with a source
    // link-layer address option; checksum as the Linux kernel computes it.
    fn ns() -> (Vec<u8>, Ipv6Addr, Ipv6Addr) {
        let src = addr("2001:db8:1::2");
        let dst = addr("ff02::1:ff00:1");
        let mut v = vec![135, 0, 0, 0, 0, 0, 0, 0];
        v.extend_from_slice(&addr("2001:db8:1::1").octets());
        v.extend_from_slice(&[1, 1, 0x02, 0x00, 0x00, 0x00, 0x01, 0x02]);
        Icmpv6Packet::new_unchecked(&mut v[..]).fill_checksum(&src, &dst);
        (v, src, dst)
    }

    #[test]
    fn ns_fields_and_round_trip() {
        let (v, src, dst) = ns();
        let p = Icmpv6Packet::new_checked(&v[..]).unwrap();
        assert_eq!(p.msg_type(), icmpv6_type::NEIGHBOR_SOLICIT);
        assert_eq!(p.msg_code(), 0);
        assert!(p.verify_checksum(&src, &dst));
        assert!(!p.verify_checksum(&src, &addr("ff02::1")));
        assert_eq!(p.target_addr(), Some(addr("2001:db8:1::1")));
        let r = NdiscRepr::parse(&p).unwrap();
        assert_eq!(
            r,
            NdiscRepr::NeighborSolicit {
                target_addr: addr("2001:db8:1::1"),
                lladdr: Some(MAC)
            }
        );
        assert_eq!(r.buffer_len(), 32);
        let mut out = vec![0xffu8; 32];
        r.emit(&mut Icmpv6Packet::new_unchecked(&mut out[..]), &src, &dst);
        assert_eq!(out, v);
    }

    #[test]
    fn na_round_trip() {
        let src = addr("2001:db8:1::1");
        let dst = addr("2001:db8:1::2");
        let r = NdiscRepr::NeighborAdvert {
            flags: ndisc_flags::SOLICITED | ndisc_flags::OVERRIDE,
            target_addr: src,
            lladdr: Some(MAC),
        };
        let mut out = [0u8; 40];
        r.emit(&mut Icmpv6Packet::new_unchecked(&mut out[..]), &src, &dst);
        let p = Icmpv6Packet::new_checked(&out[..32]).unwrap();
        assert!(p.verify_checksum(&src, &dst));
        assert_eq!(p.ndisc_flags(), 0x60);
        assert_eq!(&out[24..26], &[2, 1]);
        assert_eq!(NdiscRepr::parse(&p).unwrap(), r);

        let bare = NdiscRepr::NeighborSolicit {
            target_addr: src,
            lladdr: None,
        };
        assert_eq!(bare.buffer_len(), 24);
        bare.emit(
            &mut Icmpv6Packet::new_unchecked(&mut out[..]),
            &Ipv6Addr::UNSPECIFIED,
            &dst,
        );
        assert_eq!(
            NdiscRepr::parse(&Icmpv6Packet::new_unchecked(&out[..24])).unwrap(),
            bare
        );
    }

    #[test]
    fn ndisc_options() {
        let (mut v, ..) = ns();
        // Unknown option (nonce, 8 bytes) first: skipped.
        let mut with_nonce = v[..24].to_vec();
        with_nonce.extend_from_slice(&[14, 1, 1, 2, 3, 4, 5, 6]);
        with_nonce.extend_from_slice(&v[24..]);
        let r = NdiscRepr::parse(&Icmpv6Packet::new_unchecked(&with_nonce[..])).unwrap();
        assert_eq!(
            r,
            NdiscRepr::NeighborSolicit {
                target_addr: addr("2001:db8:1::1"),
                lladdr: Some(MAC)
            }
        );
        // A target link-layer option in a solicitation is not its lladdr.
        v[24] = 2;
        assert!(matches!(
            NdiscRepr::parse(&Icmpv6Packet::new_unchecked(&v[..])).unwrap(),
            NdiscRepr::NeighborSolicit { lladdr: None, .. }
        ));
        // Length 0, overrun, stray byte.
        v[25] = 0;
        assert_eq!(
            NdiscRepr::parse(&Icmpv6Packet::new_unchecked(&v[..])),
            Err(Error::Malformed)
        );
        v[25] = 2;
        assert_eq!(
            NdiscRepr::parse(&Icmpv6Packet::new_unchecked(&v[..])),
            Err(Error::Malformed)
        );
        assert_eq!(
            NdiscRepr::parse(&Icmpv6Packet::new_unchecked(&v[..25])),
            Err(Error::Malformed)
        );
    }

    #[test]
    fn ndisc_rejects() {
        let (v, ..) = ns();
        assert_eq!(
            NdiscRepr::parse(&Icmpv6Packet::new_unchecked(&v[..23])),
            Err(Error::Truncated)
        );
        assert_eq!(Icmpv6Packet::new_unchecked(&v[..23]).target_addr(), None);
        assert_eq!(
            NdiscRepr::parse(&Icmpv6Packet::new_unchecked(&v[..7])),
            Err(Error::Truncated)
        );
        let mut bad = v.clone();
        bad[1] = 1;
        assert_eq!(
            NdiscRepr::parse(&Icmpv6Packet::new_unchecked(&bad[..])),
            Err(Error::Malformed)
        );
        let mut bad = v.clone();
        bad[8] = 0xff;
        assert_eq!(
            NdiscRepr::parse(&Icmpv6Packet::new_unchecked(&bad[..])),
            Err(Error::Malformed)
        );
        let mut bad = v.clone();
        bad[0] = 128;
        assert_eq!(
            NdiscRepr::parse(&Icmpv6Packet::new_unchecked(&bad[..])),
            Err(Error::Unsupported)
        );
    }

    #[test]
    fn echo_and_errors() {
        let src = addr("2001:db8:1::2");
        let dst = addr("2001:db8:2::2");
        let mut v = vec![128u8, 0, 0, 0, 0x0b, 0x2d, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8];
        Icmpv6Packet::new_unchecked(&mut v[..]).fill_checksum(&src, &dst);
        let p = Icmpv6Packet::new_checked(&v[..]).unwrap();
        assert_eq!((p.echo_ident(), p.echo_seq_no()), (0x0b2d, 1));
        assert_eq!(p.payload(), &[1, 2, 3, 4, 5, 6, 7, 8]);
        let r = Icmpv6Repr::parse(&p).unwrap();
        assert_eq!(
            r,
            Icmpv6Repr::EchoRequest {
                ident: 0x0b2d,
                seq_no: 1,
                data_len: 8
            }
        );
        let mut out = v.clone();
        out[..8].fill(0);
        r.emit(&mut Icmpv6Packet::new_unchecked(&mut out[..]), &src, &dst);
        assert_eq!(out, v);

        for r in [
            Icmpv6Repr::EchoReply {
                ident: 1,
                seq_no: 2,
                data_len: 8,
            },
            Icmpv6Repr::DstUnreachable {
                code: 4,
                data_len: 8,
            },
            Icmpv6Repr::PacketTooBig {
                mtu: 1280,
                data_len: 8,
            },
            Icmpv6Repr::TimeExceeded {
                code: 0,
                data_len: 8,
            },
        ] {
            let mut buf = [0u8; 20];
            r.emit(&mut Icmpv6Packet::new_unchecked(&mut buf[..]), &src, &dst);
            let p = Icmpv6Packet::new_unchecked(&buf[..16]);
            assert!(p.verify_checksum(&src, &dst));
            assert_eq!(Icmpv6Repr::parse(&p).unwrap(), r);
        }
        assert!(is_error(icmpv6_type::PACKET_TOO_BIG) && !is_error(icmpv6_type::ECHO_REPLY));

        let mut bad = v.clone();
        bad[1] = 3;
        assert_eq!(
            Icmpv6Repr::parse(&Icmpv6Packet::new_unchecked(&bad[..])),
            Err(Error::Malformed)
        );
        bad[0] = icmpv6_type::PACKET_TOO_BIG;
        assert_eq!(
            Icmpv6Repr::parse(&Icmpv6Packet::new_unchecked(&bad[..])),
            Err(Error::Malformed)
        );
        bad[0] = icmpv6_type::NEIGHBOR_ADVERT;
        assert_eq!(
            Icmpv6Repr::parse(&Icmpv6Packet::new_unchecked(&bad[..])),
            Err(Error::Unsupported)
        );
        assert_eq!(
            Icmpv6Repr::parse(&Icmpv6Packet::new_unchecked(&bad[..5])),
            Err(Error::Truncated)
        );
    }

    #[test]
    fn setters() {
        let mut v = [0u8; 24];
        let mut p = Icmpv6Packet::new_unchecked(&mut v[..]);
        p.set_msg_type(icmpv6_type::PACKET_TOO_BIG);
        p.set_msg_code(0);
        p.set_header_data(1400);
        assert_eq!(p.mtu(), 1400);
        p.set_echo_ident(7);
        p.set_echo_seq_no(8);
        p.payload_mut()[0] = 9;
        p.set_target_addr(addr("::1"));
        p.set_checksum(0xabcd);
        assert_eq!(
            (p.echo_ident(), p.echo_seq_no(), p.checksum()),
            (7, 8, 0xabcd)
        );
        assert_eq!(p.target_addr(), Some(addr("::1")));
    }
}
