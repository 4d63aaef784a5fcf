//! ICMP for IPv4 (RFC 792).
//!
//! ICMP has no length field: the view's buffer is the whole message (build it from
//! [`Ipv4Packet::payload`](crate::Ipv4Packet::payload)) and the checksum covers all of it.

use crate::checksum;
use crate::field::Field;
use crate::{get_u16, get_u32, put_u16, put_u32, Error, Result};

/// Message types dva handles.
pub mod icmpv4_type {
    /// Echo reply.
    pub const ECHO_REPLY: u8 = 0;
    /// Destination unreachable.
    pub const DST_UNREACHABLE: u8 = 3;
    /// Source quench (deprecated, still an error message).
    pub const SOURCE_QUENCH: u8 = 4;
    /// Redirect.
    pub const REDIRECT: u8 = 5;
    /// Echo request.
    pub const ECHO_REQUEST: u8 = 8;
    /// Time exceeded.
    pub const TIME_EXCEEDED: u8 = 11;
    /// Parameter problem.
    pub const PARAM_PROBLEM: u8 = 12;
}

/// Codes of Destination Unreachable that dva sends.
pub mod dst_unreachable_code {
    /// Port unreachable.
    pub const PORT_UNREACHABLE: u8 = 3;
    /// Fragmentation needed and DF set (carries the next-hop MTU).
    pub const FRAG_NEEDED: u8 = 4;
    /// Communication administratively prohibited (RFC 1812).
    pub const ADMIN_PROHIBITED: u8 = 13;
}

/// An error message, which quotes the packet it is about (and must never be answered with
/// another error).
pub fn is_error(t: u8) -> bool {
    matches!(
        t,
        icmpv4_type::DST_UNREACHABLE
            | icmpv4_type::SOURCE_QUENCH
            | icmpv4_type::REDIRECT
            | icmpv4_type::TIME_EXCEEDED
            | icmpv4_type::PARAM_PROBLEM
    )
}

mod field {
    use super::*;
    pub const TYPE: usize = 0;
    pub const CODE: usize = 1;
    pub const CHECKSUM: Field = 2..4;
    pub const HEADER_DATA: Field = 4..8;
    pub const ECHO_IDENT: Field = 4..6;
    pub const ECHO_SEQNO: Field = 6..8;
    pub const NEXT_HOP_MTU: Field = 6..8;
}

/// Length of the ICMP header (type, code, checksum and the 4-byte rest of header).
pub const HEADER_LEN: usize = field::HEADER_DATA.end;

/// A read/write view of an ICMPv4 message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Icmpv4Packet<T> {
    buffer: T,
}

impl<T> Icmpv4Packet<T> {
    /// Length of the ICMP header.
    pub const HEADER_LEN: usize = HEADER_LEN;
}

impl<T: AsRef<[u8]>> Icmpv4Packet<T> {
    /// Wraps `buffer` without checking it.
    pub const fn new_unchecked(buffer: T) -> Icmpv4Packet<T> {
        Icmpv4Packet { buffer }
    }

    /// Wraps `buffer` after [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<Icmpv4Packet<T>> {
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

    /// Message type (see [`icmpv4_type`]).
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

    /// The 4 type-specific bytes after the checksum.
    pub fn header_data(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::HEADER_DATA.start)
    }

    /// Next-hop MTU of a "fragmentation needed" message (RFC 1191).
    pub fn next_hop_mtu(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::NEXT_HOP_MTU.start)
    }

    /// Bytes after the 8-byte header: echo data, or the quoted packet of an error.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }

    /// The checksum over the whole message verifies.
    pub fn verify_checksum(&self) -> bool {
        checksum::data(self.buffer.as_ref()) == 0
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Icmpv4Packet<T> {
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

    /// Sets the echo identifier (patch the checksum afterwards, e.g. with
    /// [`checksum::update16`]).
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

    /// Sets the next-hop MTU of a "fragmentation needed" message.
    pub fn set_next_hop_mtu(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::NEXT_HOP_MTU.start, value);
    }

    /// Computes and stores the checksum over the whole buffer.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let c = checksum::data(self.buffer.as_ref());
        self.set_checksum(c);
    }

    /// Mutable bytes after the header.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[HEADER_LEN..]
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for Icmpv4Packet<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

/// The ICMPv4 messages dva parses and builds. `data_len` is the length of the payload after
/// the 8-byte header (echo data, or the quote of an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Icmpv4Repr {
    /// Type 8.
    EchoRequest {
        /// Identifier.
        ident: u16,
        /// Sequence number.
        seq_no: u16,
        /// Echo data length.
        data_len: usize,
    },
    /// Type 0.
    EchoReply {
        /// Identifier.
        ident: u16,
        /// Sequence number.
        seq_no: u16,
        /// Echo data length.
        data_len: usize,
    },
    /// Type 3.
    DstUnreachable {
        /// Reason (see [`dst_unreachable_code`]).
        code: u8,
        /// Quote length.
        data_len: usize,
    },
    /// Type 11.
    TimeExceeded {
        /// 0: TTL exceeded in transit; 1: reassembly time exceeded.
        code: u8,
        /// Quote length.
        data_len: usize,
    },
}

impl Icmpv4Repr {
    /// Parses a message and verifies its checksum (`Err(Checksum)`); other types give
    /// `Err(Unsupported)`.
    pub fn parse<T: AsRef<[u8]>>(packet: &Icmpv4Packet<T>) -> Result<Icmpv4Repr> {
        packet.check_len()?;
        if !packet.verify_checksum() {
            return Err(Error::Checksum);
        }
        let data_len = packet.payload().len();
        match (packet.msg_type(), packet.msg_code()) {
            (icmpv4_type::ECHO_REQUEST, 0) => Ok(Icmpv4Repr::EchoRequest {
                ident: packet.echo_ident(),
                seq_no: packet.echo_seq_no(),
                data_len,
            }),
            (icmpv4_type::ECHO_REPLY, 0) => Ok(Icmpv4Repr::EchoReply {
                ident: packet.echo_ident(),
                seq_no: packet.echo_seq_no(),
                data_len,
            }),
            (icmpv4_type::ECHO_REQUEST | icmpv4_type::ECHO_REPLY, _) => Err(Error::Malformed),
            (icmpv4_type::DST_UNREACHABLE, code) => {
                Ok(Icmpv4Repr::DstUnreachable { code, data_len })
            }
            (icmpv4_type::TIME_EXCEEDED, code) => Ok(Icmpv4Repr::TimeExceeded { code, data_len }),
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
            Icmpv4Repr::EchoRequest { data_len, .. }
            | Icmpv4Repr::EchoReply { data_len, .. }
            | Icmpv4Repr::DstUnreachable { data_len, .. }
            | Icmpv4Repr::TimeExceeded { data_len, .. } => HEADER_LEN + data_len,
        }
    }

    /// Writes the header and the checksum. **The caller places the payload first**, at
    /// `HEADER_LEN..HEADER_LEN + data_len`; exactly [`buffer_len`](Self::buffer_len) bytes are
    /// checksummed, so the buffer may be longer.
    ///
    /// # Panics
    /// If the buffer is shorter than `buffer_len()`.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Icmpv4Packet<T>) {
        let (msg_type, code, header_data) = match *self {
            Icmpv4Repr::EchoRequest { ident, seq_no, .. } => (
                icmpv4_type::ECHO_REQUEST,
                0,
                u32::from(ident) << 16 | u32::from(seq_no),
            ),
            Icmpv4Repr::EchoReply { ident, seq_no, .. } => (
                icmpv4_type::ECHO_REPLY,
                0,
                u32::from(ident) << 16 | u32::from(seq_no),
            ),
            Icmpv4Repr::DstUnreachable { code, .. } => (icmpv4_type::DST_UNREACHABLE, code, 0),
            Icmpv4Repr::TimeExceeded { code, .. } => (icmpv4_type::TIME_EXCEEDED, code, 0),
        };
        packet.set_msg_type(msg_type);
        packet.set_msg_code(code);
        packet.set_header_data(header_data);
        let len = self.buffer_len();
        Icmpv4Packet::new_unchecked(&mut packet.buffer.as_mut()[..len]).fill_checksum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // `ping -c1` from Linux: echo request, id 0x0b2d, seq 1, 16 bytes of data.
    static ECHO: [u8; 24] = [
        0x08, 0x00, 0x34, 0x11, 0x0b, 0x2d, 0x00, 0x01, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16,
        0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f,
    ];

    fn echo() -> [u8; 24] {
        ECHO
    }

    #[test]
    fn echo_fields() {
        let v = echo();
        let p = Icmpv4Packet::new_checked(&v[..]).unwrap();
        assert_eq!(p.msg_type(), icmpv4_type::ECHO_REQUEST);
        assert_eq!(p.msg_code(), 0);
        assert_eq!(p.echo_ident(), 0x0b2d);
        assert_eq!(p.echo_seq_no(), 1);
        assert_eq!(p.header_data(), 0x0b2d_0001);
        assert_eq!(p.payload(), &ECHO[8..]);
        assert!(p.verify_checksum());
        assert_eq!(p.checksum(), 0x3411);
        let mut zeroed = ECHO;
        Icmpv4Packet::new_unchecked(&mut zeroed[..]).fill_checksum();
        assert_eq!(zeroed, ECHO);
    }

    #[test]
    fn echo_round_trip_and_reply() {
        let v = echo();
        let r = Icmpv4Repr::parse(&Icmpv4Packet::new_checked(&v[..]).unwrap()).unwrap();
        assert_eq!(
            r,
            Icmpv4Repr::EchoRequest {
                ident: 0x0b2d,
                seq_no: 1,
                data_len: 16
            }
        );
        let mut out = [0u8; 24];
        out[8..].copy_from_slice(&ECHO[8..]);
        r.emit(&mut Icmpv4Packet::new_unchecked(&mut out[..]));
        assert_eq!(out, v);

        let reply = Icmpv4Repr::EchoReply {
            ident: 0x0b2d,
            seq_no: 1,
            data_len: 16,
        };
        reply.emit(&mut Icmpv4Packet::new_unchecked(&mut out[..]));
        assert_eq!(
            Icmpv4Repr::parse(&Icmpv4Packet::new_unchecked(&out[..])).unwrap(),
            reply
        );
    }

    #[test]
    fn errors_and_quotes() {
        let mut buf = [0u8; 8 + 28 + 4];
        buf[8] = 0x45; // the quote starts with an IPv4 header
        let r = Icmpv4Repr::DstUnreachable {
            code: dst_unreachable_code::PORT_UNREACHABLE,
            data_len: 28,
        };
        r.emit(&mut Icmpv4Packet::new_unchecked(&mut buf[..]));
        let p = Icmpv4Packet::new_unchecked(&buf[..36]);
        assert!(p.verify_checksum());
        assert!(is_error(p.msg_type()));
        assert_eq!(Icmpv4Repr::parse(&p).unwrap(), r);
        let te = Icmpv4Repr::TimeExceeded {
            code: 0,
            data_len: 28,
        };
        te.emit(&mut Icmpv4Packet::new_unchecked(&mut buf[..]));
        assert_eq!(
            Icmpv4Repr::parse(&Icmpv4Packet::new_unchecked(&buf[..36])).unwrap(),
            te
        );
        for t in [0, 8, 13, 14] {
            assert!(!is_error(t));
        }
        for t in [3, 4, 5, 11, 12] {
            assert!(is_error(t));
        }
    }

    #[test]
    fn rejects() {
        assert_eq!(Icmpv4Packet::new_checked(&ECHO[..7]), Err(Error::Truncated));
        assert_eq!(
            Icmpv4Repr::parse(&Icmpv4Packet::new_unchecked(&ECHO[..7])),
            Err(Error::Truncated)
        );
        let mut corrupt = ECHO;
        corrupt[20] ^= 0x40;
        assert_eq!(
            Icmpv4Repr::parse(&Icmpv4Packet::new_unchecked(&corrupt[..])),
            Err(Error::Checksum)
        );
        let mut v = echo();
        let mut p = Icmpv4Packet::new_unchecked(&mut v[..]);
        p.set_msg_type(icmpv4_type::REDIRECT);
        p.fill_checksum();
        assert_eq!(Icmpv4Repr::parse(&p), Err(Error::Unsupported));
        p.set_msg_type(icmpv4_type::ECHO_REQUEST);
        p.set_msg_code(1);
        p.fill_checksum();
        assert_eq!(Icmpv4Repr::parse(&p), Err(Error::Malformed));
    }

    #[test]
    fn setters_and_incremental_ident_rewrite() {
        let mut v = echo();
        let mut p = Icmpv4Packet::new_unchecked(&mut v[..]);
        let old = p.echo_ident();
        p.set_echo_ident(0x4242);
        let c = checksum::update16(p.checksum(), old, 0x4242);
        p.set_checksum(c);
        assert!(p.verify_checksum());
        p.set_echo_seq_no(9);
        p.set_next_hop_mtu(1400);
        assert_eq!(p.next_hop_mtu(), 1400);
        p.payload_mut()[0] = 0;
        assert_eq!(p.echo_seq_no(), 1400);
    }
}
