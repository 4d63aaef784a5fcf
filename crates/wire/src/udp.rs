//! UDP datagrams (RFC 768, RFC 8200 §8.1 for IPv6).
//!
//! The view's payload is bounded by the UDP length field, which `check_len` validates; bytes
//! after it in the buffer are ignored, as are the checksums' view of them.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::checksum;
use crate::field::Field;
use crate::ip_proto;
use crate::{get_u16, put_u16, Error, Result};

mod field {
    use super::*;
    pub const SRC_PORT: Field = 0..2;
    pub const DST_PORT: Field = 2..4;
    pub const LENGTH: Field = 4..6;
    pub const CHECKSUM: Field = 6..8;
}

/// Length of the UDP header.
pub const HEADER_LEN: usize = field::CHECKSUM.end;

/// A read/write view of a UDP datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpPacket<T> {
    buffer: T,
}

impl<T> UdpPacket<T> {
    /// Length of the UDP header.
    pub const HEADER_LEN: usize = HEADER_LEN;
}

impl<T: AsRef<[u8]>> UdpPacket<T> {
    /// Wraps `buffer` without checking it.
    pub const fn new_unchecked(buffer: T) -> UdpPacket<T> {
        UdpPacket { buffer }
    }

    /// Wraps `buffer` after [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<UdpPacket<T>> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// `Truncated` unless the header and the length field's bytes fit the buffer;
    /// `Malformed` for a length field below 8.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let field_len = usize::from(self.len());
        if field_len < HEADER_LEN {
            return Err(Error::Malformed);
        }
        if field_len > len {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    /// The wrapped buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Source port.
    pub fn src_port(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::SRC_PORT.start)
    }

    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::DST_PORT.start)
    }

    /// Length field: header plus payload.
    pub fn len(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::LENGTH.start)
    }

    /// The length field says there is no payload.
    pub fn is_empty(&self) -> bool {
        usize::from(self.len()) <= HEADER_LEN
    }

    /// Checksum as stored (0 over IPv4: none was computed).
    pub fn checksum(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::CHECKSUM.start)
    }

    /// The payload, up to the length field.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..usize::from(self.len())]
    }

    fn datagram(&self) -> &[u8] {
        &self.buffer.as_ref()[..usize::from(self.len())]
    }

    fn compute_v4(&self, src: &Ipv4Addr, dst: &Ipv4Addr) -> u16 {
        let data = self.datagram();
        checksum::fold(
            checksum::pseudo_header_v4(src, dst, ip_proto::UDP, data.len() as u32)
                + checksum::sum(data),
        )
    }

    fn compute_v6(&self, src: &Ipv6Addr, dst: &Ipv6Addr) -> u16 {
        let data = self.datagram();
        checksum::fold(
            checksum::pseudo_header_v6(src, dst, ip_proto::UDP, data.len() as u32)
                + checksum::sum(data),
        )
    }

    /// The checksum verifies over IPv4, or is 0 (the sender computed none).
    pub fn verify_checksum_v4(&self, src: &Ipv4Addr, dst: &Ipv4Addr) -> bool {
        self.checksum() == 0 || self.compute_v4(src, dst) == 0
    }

    /// The checksum verifies over IPv6, where it is mandatory (0 fails).
    pub fn verify_checksum_v6(&self, src: &Ipv6Addr, dst: &Ipv6Addr) -> bool {
        self.checksum() != 0 && self.compute_v6(src, dst) == 0
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpPacket<T> {
    /// Sets the source port.
    pub fn set_src_port(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::SRC_PORT.start, value);
    }

    /// Sets the destination port.
    pub fn set_dst_port(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::DST_PORT.start, value);
    }

    /// Sets the length field.
    pub fn set_len(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::LENGTH.start, value);
    }

    /// Stores a checksum as given.
    pub fn set_checksum(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::CHECKSUM.start, value);
    }

    /// Computes and stores the checksum over IPv4 (a computed 0 is sent as 0xFFFF, since 0
    /// means "none"). Covers the bytes up to the length field.
    pub fn fill_checksum_v4(&mut self, src: &Ipv4Addr, dst: &Ipv4Addr) {
        self.set_checksum(0);
        let c = self.compute_v4(src, dst);
        self.set_checksum(if c == 0 { 0xffff } else { c });
    }

    /// Computes and stores the checksum over IPv6.
    pub fn fill_checksum_v6(&mut self, src: &Ipv6Addr, dst: &Ipv6Addr) {
        self.set_checksum(0);
        let c = self.compute_v6(src, dst);
        self.set_checksum(if c == 0 { 0xffff } else { c });
    }

    /// Mutable payload, up to the length field.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = usize::from(self.len());
        &mut self.buffer.as_mut()[HEADER_LEN..end]
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for UdpPacket<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

/// A UDP header as values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UdpRepr {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Payload length.
    pub payload_len: usize,
}

impl UdpRepr {
    /// Reads the header. The checksum is not verified (it needs the IP addresses): see
    /// [`UdpPacket::verify_checksum_v4`] / [`verify_checksum_v6`](UdpPacket::verify_checksum_v6).
    pub fn parse<T: AsRef<[u8]>>(packet: &UdpPacket<T>) -> Result<UdpRepr> {
        packet.check_len()?;
        Ok(UdpRepr {
            src_port: packet.src_port(),
            dst_port: packet.dst_port(),
            payload_len: usize::from(packet.len()) - HEADER_LEN,
        })
    }

    /// Always 8.
    pub const fn header_len(&self) -> usize {
        HEADER_LEN
    }

    /// Header plus payload.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN + self.payload_len
    }

    fn emit_header<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut UdpPacket<T>) {
        packet.set_src_port(self.src_port);
        packet.set_dst_port(self.dst_port);
        packet.set_len(self.buffer_len() as u16);
    }

    /// Writes the header and the checksum over IPv4. **The caller places the payload first**
    /// at `HEADER_LEN..`; the checksum covers it. `payload_len` must fit the 16-bit length
    /// field (at most 65527).
    ///
    /// # Panics
    /// If the buffer is shorter than [`buffer_len`](Self::buffer_len).
    pub fn emit_v4<T: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        packet: &mut UdpPacket<T>,
        src: &Ipv4Addr,
        dst: &Ipv4Addr,
    ) {
        self.emit_header(packet);
        packet.fill_checksum_v4(src, dst);
    }

    /// As [`emit_v4`](Self::emit_v4), for IPv6.
    ///
    /// # Panics
    /// If the buffer is shorter than [`buffer_len`](Self::buffer_len).
    pub fn emit_v6<T: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        packet: &mut UdpPacket<T>,
        src: &Ipv6Addr,
        dst: &Ipv6Addr,
    ) {
        self.emit_header(packet);
        packet.fill_checksum_v6(src, dst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
    const DST: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);

    // A DNS-sized query, 53000 -> 53, "hello" payload, then 3 bytes of trailing junk.
    static DGRAM: [u8; 16] = [
        0xcf, 0x08, 0x00, 0x35, 0x00, 0x0d, 0x00, 0x00, b'h', b'e', b'l', b'l', b'o', 0xde, 0xad,
        0xbe,
    ];

    fn with_checksum() -> [u8; 16] {
        let mut v = DGRAM;
        UdpPacket::new_unchecked(&mut v[..]).fill_checksum_v4(&SRC, &DST);
        v
    }

    #[test]
    fn fields() {
        let p = UdpPacket::new_checked(&DGRAM[..]).unwrap();
        assert_eq!(p.src_port(), 53000);
        assert_eq!(p.dst_port(), 53);
        assert_eq!(p.len(), 13);
        assert!(!p.is_empty());
        assert_eq!(p.checksum(), 0);
        assert_eq!(p.payload(), b"hello");
        // No checksum over IPv4 is acceptable, over IPv6 it is not.
        assert!(p.verify_checksum_v4(&SRC, &DST));
        assert!(!p.verify_checksum_v6(&Ipv6Addr::LOCALHOST, &Ipv6Addr::LOCALHOST));
    }

    #[test]
    fn checksums_ignore_trailing_bytes() {
        let mut v = with_checksum();
        assert!(UdpPacket::new_checked(&v[..])
            .unwrap()
            .verify_checksum_v4(&SRC, &DST));
        v[15] ^= 0xff;
        assert!(UdpPacket::new_checked(&v[..])
            .unwrap()
            .verify_checksum_v4(&SRC, &DST));
        v[9] ^= 0xff;
        assert!(!UdpPacket::new_checked(&v[..])
            .unwrap()
            .verify_checksum_v4(&SRC, &DST));
    }

    #[test]
    fn repr_round_trip_v4_and_v6() {
        let v = with_checksum();
        let r = UdpRepr::parse(&UdpPacket::new_checked(&v[..]).unwrap()).unwrap();
        assert_eq!(
            r,
            UdpRepr {
                src_port: 53000,
                dst_port: 53,
                payload_len: 5
            }
        );
        assert_eq!(r.buffer_len(), 13);
        let mut out = [0u8; 13];
        out[8..].copy_from_slice(b"hello");
        r.emit_v4(&mut UdpPacket::new_unchecked(&mut out[..]), &SRC, &DST);
        assert_eq!(out[..], v[..13]);

        let s: Ipv6Addr = "2001:db8:1::2".parse().unwrap();
        let d: Ipv6Addr = "2001:db8:2::2".parse().unwrap();
        r.emit_v6(&mut UdpPacket::new_unchecked(&mut out[..]), &s, &d);
        let p = UdpPacket::new_checked(&out[..]).unwrap();
        assert!(p.verify_checksum_v6(&s, &d));
        assert_eq!(UdpRepr::parse(&p).unwrap(), r);
    }

    #[test]
    fn zero_checksum_is_sent_as_ffff() {
        // Search a payload whose checksum computes to 0 and check it goes out as 0xffff.
        let mut buf = [0u8; 10];
        let r = UdpRepr {
            src_port: 1,
            dst_port: 2,
            payload_len: 2,
        };
        let mut hit = false;
        for x in 0..=u16::MAX {
            buf[8..].copy_from_slice(&x.to_be_bytes());
            r.emit_v4(&mut UdpPacket::new_unchecked(&mut buf[..]), &SRC, &DST);
            let p = UdpPacket::new_unchecked(&buf[..]);
            assert!(p.verify_checksum_v4(&SRC, &DST));
            if p.checksum() == 0xffff {
                hit = true;
                break;
            }
        }
        assert!(hit);
    }

    #[test]
    fn rejects() {
        assert_eq!(UdpPacket::new_checked(&DGRAM[..7]), Err(Error::Truncated));
        assert_eq!(UdpPacket::new_checked(&DGRAM[..12]), Err(Error::Truncated));
        let mut bad = DGRAM;
        bad[5] = 7;
        assert_eq!(UdpPacket::new_checked(&bad[..]), Err(Error::Malformed));
        assert_eq!(
            UdpRepr::parse(&UdpPacket::new_unchecked(&bad[..])),
            Err(Error::Malformed)
        );
    }

    #[test]
    fn setters() {
        let mut v = [0u8; 9];
        let mut p = UdpPacket::new_unchecked(&mut v[..]);
        p.set_src_port(6081);
        p.set_dst_port(6081);
        p.set_len(9);
        p.payload_mut()[0] = 7;
        p.set_checksum(0x1234);
        assert_eq!(v, [0x17, 0xc1, 0x17, 0xc1, 0, 9, 0x12, 0x34, 7]);
    }
}
