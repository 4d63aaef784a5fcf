//! ARP (RFC 826). The view handles any hardware/protocol address sizes; [`ArpRepr`] is
//! Ethernet/IPv4 only, the one combination a dispatcher answers.

use std::net::Ipv4Addr;

use crate::ethernet::{ethertype, EthernetAddress};
use crate::field::Field;
use crate::{get_ipv4, get_u16, put_u16, Error, Result};

/// Hardware type for Ethernet.
pub const HARDWARE_ETHERNET: u16 = 1;

/// The ARP opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArpOperation {
    /// 1: who has the target protocol address?
    Request,
    /// 2: the sender has it.
    Reply,
    /// Any other opcode (RARP, InARP, …), kept as read.
    Unknown(u16),
}

impl From<u16> for ArpOperation {
    fn from(value: u16) -> Self {
        match value {
            1 => ArpOperation::Request,
            2 => ArpOperation::Reply,
            other => ArpOperation::Unknown(other),
        }
    }
}

impl From<ArpOperation> for u16 {
    fn from(op: ArpOperation) -> u16 {
        match op {
            ArpOperation::Request => 1,
            ArpOperation::Reply => 2,
            ArpOperation::Unknown(other) => other,
        }
    }
}

mod field {
    use super::*;
    pub const HTYPE: Field = 0..2;
    pub const PTYPE: Field = 2..4;
    pub const HLEN: usize = 4;
    pub const PLEN: usize = 5;
    pub const OPER: Field = 6..8;

    // The addresses follow with sizes taken from HLEN and PLEN.
    #[inline]
    pub const fn sha(hlen: u8, _plen: u8) -> Field {
        let start = OPER.end;
        start..start + hlen as usize
    }
    #[inline]
    pub const fn spa(hlen: u8, plen: u8) -> Field {
        let start = sha(hlen, plen).end;
        start..start + plen as usize
    }
    #[inline]
    pub const fn tha(hlen: u8, plen: u8) -> Field {
        let start = spa(hlen, plen).end;
        start..start + hlen as usize
    }
    #[inline]
    pub const fn tpa(hlen: u8, plen: u8) -> Field {
        let start = tha(hlen, plen).end;
        start..start + plen as usize
    }
}

/// Length of the fixed part (before the addresses).
pub const FIXED_LEN: usize = field::OPER.end;

/// A read/write view of an ARP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArpPacket<T> {
    buffer: T,
}

impl<T: AsRef<[u8]>> ArpPacket<T> {
    /// Wraps `buffer` without checking it.
    pub const fn new_unchecked(buffer: T) -> ArpPacket<T> {
        ArpPacket { buffer }
    }

    /// Wraps `buffer` after [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<ArpPacket<T>> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// `Err(Truncated)` unless the buffer holds the fixed part and all four addresses at the
    /// sizes the packet declares.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < FIXED_LEN || len < field::tpa(self.hardware_len(), self.protocol_len()).end {
            Err(Error::Truncated)
        } else {
            Ok(())
        }
    }

    /// The wrapped buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Hardware type (1 for Ethernet).
    pub fn hardware_type(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::HTYPE.start)
    }

    /// Protocol type (0x0800 for IPv4).
    pub fn protocol_type(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::PTYPE.start)
    }

    /// Hardware address length in bytes.
    pub fn hardware_len(&self) -> u8 {
        self.buffer.as_ref()[field::HLEN]
    }

    /// Protocol address length in bytes.
    pub fn protocol_len(&self) -> u8 {
        self.buffer.as_ref()[field::PLEN]
    }

    /// The opcode.
    pub fn operation(&self) -> ArpOperation {
        ArpOperation::from(get_u16(self.buffer.as_ref(), field::OPER.start))
    }

    /// Sender hardware address bytes.
    pub fn source_hardware_addr(&self) -> &[u8] {
        &self.buffer.as_ref()[field::sha(self.hardware_len(), self.protocol_len())]
    }

    /// Sender protocol address bytes.
    pub fn source_protocol_addr(&self) -> &[u8] {
        &self.buffer.as_ref()[field::spa(self.hardware_len(), self.protocol_len())]
    }

    /// Target hardware address bytes.
    pub fn target_hardware_addr(&self) -> &[u8] {
        &self.buffer.as_ref()[field::tha(self.hardware_len(), self.protocol_len())]
    }

    /// Target protocol address bytes.
    pub fn target_protocol_addr(&self) -> &[u8] {
        &self.buffer.as_ref()[field::tpa(self.hardware_len(), self.protocol_len())]
    }

    /// Bytes past the target protocol address (Ethernet padding, usually).
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[field::tpa(self.hardware_len(), self.protocol_len()).end..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> ArpPacket<T> {
    /// Sets the hardware type.
    pub fn set_hardware_type(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::HTYPE.start, value);
    }

    /// Sets the protocol type.
    pub fn set_protocol_type(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::PTYPE.start, value);
    }

    /// Sets the hardware address length.
    pub fn set_hardware_len(&mut self, value: u8) {
        self.buffer.as_mut()[field::HLEN] = value;
    }

    /// Sets the protocol address length.
    pub fn set_protocol_len(&mut self, value: u8) {
        self.buffer.as_mut()[field::PLEN] = value;
    }

    /// Sets the opcode.
    pub fn set_operation(&mut self, op: ArpOperation) {
        put_u16(self.buffer.as_mut(), field::OPER.start, op.into());
    }

    /// Sets the sender hardware address (`value.len()` must equal the hardware length).
    pub fn set_source_hardware_addr(&mut self, value: &[u8]) {
        let f = field::sha(self.hardware_len(), self.protocol_len());
        self.buffer.as_mut()[f].copy_from_slice(value);
    }

    /// Sets the sender protocol address (`value.len()` must equal the protocol length).
    pub fn set_source_protocol_addr(&mut self, value: &[u8]) {
        let f = field::spa(self.hardware_len(), self.protocol_len());
        self.buffer.as_mut()[f].copy_from_slice(value);
    }

    /// Sets the target hardware address (`value.len()` must equal the hardware length).
    pub fn set_target_hardware_addr(&mut self, value: &[u8]) {
        let f = field::tha(self.hardware_len(), self.protocol_len());
        self.buffer.as_mut()[f].copy_from_slice(value);
    }

    /// Sets the target protocol address (`value.len()` must equal the protocol length).
    pub fn set_target_protocol_addr(&mut self, value: &[u8]) {
        let f = field::tpa(self.hardware_len(), self.protocol_len());
        self.buffer.as_mut()[f].copy_from_slice(value);
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for ArpPacket<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

/// An Ethernet/IPv4 ARP message as values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ArpRepr {
    /// Request, reply or other opcode.
    pub operation: ArpOperation,
    /// Sender MAC.
    pub source_hardware_addr: EthernetAddress,
    /// Sender IPv4 address (0.0.0.0 in an address probe, RFC 5227).
    pub source_protocol_addr: Ipv4Addr,
    /// Target MAC (zero in a request).
    pub target_hardware_addr: EthernetAddress,
    /// Target IPv4 address.
    pub target_protocol_addr: Ipv4Addr,
}

impl ArpRepr {
    /// Length of an Ethernet/IPv4 ARP packet.
    pub const BUFFER_LEN: usize = FIXED_LEN + 2 * (6 + 4);

    /// Parses an Ethernet/IPv4 ARP packet; other hardware or protocol types, or other address
    /// sizes, give `Err(Unsupported)`.
    pub fn parse<T: AsRef<[u8]>>(packet: &ArpPacket<T>) -> Result<ArpRepr> {
        if packet.buffer.as_ref().len() < FIXED_LEN {
            return Err(Error::Truncated);
        }
        if packet.hardware_type() != HARDWARE_ETHERNET
            || packet.protocol_type() != ethertype::IPV4
            || packet.hardware_len() != 6
            || packet.protocol_len() != 4
        {
            return Err(Error::Unsupported);
        }
        packet.check_len()?;
        let buf = packet.buffer.as_ref();
        let mac = |f: Field| {
            let mut a = [0u8; 6];
            a.copy_from_slice(&buf[f]);
            EthernetAddress(a)
        };
        Ok(ArpRepr {
            operation: packet.operation(),
            source_hardware_addr: mac(field::sha(6, 4)),
            source_protocol_addr: get_ipv4(buf, field::spa(6, 4).start),
            target_hardware_addr: mac(field::tha(6, 4)),
            target_protocol_addr: get_ipv4(buf, field::tpa(6, 4).start),
        })
    }

    /// Always [`ArpRepr::BUFFER_LEN`] (28).
    pub const fn buffer_len(&self) -> usize {
        Self::BUFFER_LEN
    }

    /// Writes the whole packet.
    ///
    /// # Panics
    /// If the buffer is shorter than [`ArpRepr::BUFFER_LEN`].
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut ArpPacket<T>) {
        packet.set_hardware_type(HARDWARE_ETHERNET);
        packet.set_protocol_type(ethertype::IPV4);
        packet.set_hardware_len(6);
        packet.set_protocol_len(4);
        packet.set_operation(self.operation);
        packet.set_source_hardware_addr(&self.source_hardware_addr.0);
        packet.set_source_protocol_addr(&self.source_protocol_addr.octets());
        packet.set_target_hardware_addr(&self.target_hardware_addr.0);
        packet.set_target_protocol_addr(&self.target_protocol_addr.octets());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // "Who has 198.18.1.1? Tell 198.18.1.2", as the client's kernel sends it, with the 18
    // bytes of Ethernet padding that bring the frame to 60 bytes.
    static REQUEST: [u8; 46] = [
        0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, // htype, ptype, hlen, plen, op
        0x02, 0x00, 0xc6, 0x12, 0x01, 0x02, 0xc6, 0x12, 0x01, 0x02, // sha, spa
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc6, 0x12, 0x01, 0x01, // tha, tpa
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];

    #[test]
    fn request_fields() {
        let p = ArpPacket::new_checked(&REQUEST[..]).unwrap();
        assert_eq!(p.hardware_type(), 1);
        assert_eq!(p.protocol_type(), 0x0800);
        assert_eq!((p.hardware_len(), p.protocol_len()), (6, 4));
        assert_eq!(p.operation(), ArpOperation::Request);
        assert_eq!(
            p.source_hardware_addr(),
            &[0x02, 0x00, 0xc6, 0x12, 0x01, 0x02]
        );
        assert_eq!(p.source_protocol_addr(), &[198, 18, 1, 2]);
        assert_eq!(p.target_hardware_addr(), &[0; 6]);
        assert_eq!(p.target_protocol_addr(), &[198, 18, 1, 1]);
        assert_eq!(p.payload().len(), 18);

        let r = ArpRepr::parse(&p).unwrap();
        assert_eq!(r.operation, ArpOperation::Request);
        assert_eq!(
            r.source_hardware_addr,
            EthernetAddress([0x02, 0x00, 0xc6, 0x12, 0x01, 0x02])
        );
        assert_eq!(r.source_protocol_addr, Ipv4Addr::new(198, 18, 1, 2));
        assert_eq!(r.target_hardware_addr, EthernetAddress::UNSPECIFIED);
        assert_eq!(r.target_protocol_addr, Ipv4Addr::new(198, 18, 1, 1));
    }

    #[test]
    fn round_trip_and_reply() {
        let r = ArpRepr::parse(&ArpPacket::new_unchecked(&REQUEST[..])).unwrap();
        let mut out = [0u8; ArpRepr::BUFFER_LEN];
        r.emit(&mut ArpPacket::new_unchecked(&mut out[..]));
        assert_eq!(out[..], REQUEST[..28]);

        let reply = ArpRepr {
            operation: ArpOperation::Reply,
            source_hardware_addr: EthernetAddress([2, 0, 0, 0, 0, 1]),
            source_protocol_addr: r.target_protocol_addr,
            target_hardware_addr: r.source_hardware_addr,
            target_protocol_addr: r.source_protocol_addr,
        };
        reply.emit(&mut ArpPacket::new_unchecked(&mut out[..]));
        assert_eq!(&out[6..8], &[0, 2]);
        assert_eq!(
            ArpRepr::parse(&ArpPacket::new_checked(&out[..]).unwrap()).unwrap(),
            reply
        );
    }

    #[test]
    fn opcodes() {
        assert_eq!(ArpOperation::from(2), ArpOperation::Reply);
        assert_eq!(ArpOperation::from(8), ArpOperation::Unknown(8));
        assert_eq!(u16::from(ArpOperation::Unknown(8)), 8);
        let mut p = REQUEST;
        p[7] = 9;
        assert_eq!(
            ArpRepr::parse(&ArpPacket::new_unchecked(&p[..]))
                .unwrap()
                .operation,
            ArpOperation::Unknown(9)
        );
    }

    #[test]
    fn rejects() {
        assert_eq!(
            ArpPacket::new_checked(&REQUEST[..27]),
            Err(Error::Truncated)
        );
        assert_eq!(ArpPacket::new_checked(&REQUEST[..5]), Err(Error::Truncated));
        assert_eq!(
            ArpRepr::parse(&ArpPacket::new_unchecked(&REQUEST[..27])),
            Err(Error::Truncated)
        );
        assert_eq!(
            ArpRepr::parse(&ArpPacket::new_unchecked(&REQUEST[..3])),
            Err(Error::Truncated)
        );
        for (at, value) in [(1, 6u8), (2, 0x86), (4, 8), (5, 16)] {
            let mut p = REQUEST;
            p[at] = value;
            assert_eq!(
                ArpRepr::parse(&ArpPacket::new_unchecked(&p[..])),
                Err(Error::Unsupported),
                "byte {at}"
            );
        }
        // A view over odd sizes stays panic-free after check_len.
        let mut p = REQUEST;
        p[4] = 20;
        p[5] = 20;
        assert_eq!(ArpPacket::new_checked(&p[..]), Err(Error::Truncated));
    }
}
