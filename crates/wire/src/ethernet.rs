//! Ethernet II frames (IEEE 802.3) with at most one 802.1Q VLAN tag.
//!
//! [`EthernetFrame`] sees the 14-byte untagged header: its `ethertype()` is the outer one
//! (0x8100 on a tagged frame) and its `payload()` starts right after it. [`EthernetRepr`] and
//! [`l3_offset`] look through one 802.1Q tag; a second tag (or an 802.1ad S-tag) is reported as
//! the ethertype, for the caller to drop.

use core::fmt;
use core::str::FromStr;

use crate::field::{Field, Rest};
use crate::{get_u16, put_u16, Error, Result};

/// A 48-bit IEEE MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct EthernetAddress(pub [u8; 6]);

impl EthernetAddress {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: EthernetAddress = EthernetAddress([0xff; 6]);
    /// 00:00:00:00:00:00, e.g. the unknown target of an ARP request.
    pub const UNSPECIFIED: EthernetAddress = EthernetAddress([0; 6]);

    /// The six octets.
    pub const fn as_bytes(&self) -> &[u8; 6] {
        &self.0
    }

    /// ff:ff:ff:ff:ff:ff.
    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }

    /// The group bit is set (broadcast included).
    pub const fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    /// The group bit is clear.
    pub const fn is_unicast(&self) -> bool {
        !self.is_multicast()
    }

    /// The locally administered bit is set.
    pub const fn is_local(&self) -> bool {
        self.0[0] & 0x02 != 0
    }
}

impl From<[u8; 6]> for EthernetAddress {
    fn from(octets: [u8; 6]) -> Self {
        EthernetAddress(octets)
    }
}

impl TryFrom<&[u8]> for EthernetAddress {
    type Error = Error;

    /// Exactly six bytes, else `Truncated` (shorter) or `Malformed` (longer).
    fn try_from(data: &[u8]) -> Result<Self> {
        match <[u8; 6]>::try_from(data) {
            Ok(octets) => Ok(EthernetAddress(octets)),
            Err(_) if data.len() < 6 => Err(Error::Truncated),
            Err(_) => Err(Error::Malformed),
        }
    }
}

impl fmt::Display for EthernetAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for EthernetAddress {
    type Err = Error;

    /// `aa:bb:cc:dd:ee:ff` or `aa-bb-cc-dd-ee-ff`, hex digits in either case.
    fn from_str(s: &str) -> Result<Self> {
        let mut octets = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for octet in &mut octets {
            let part = parts.next().ok_or(Error::Malformed)?;
            // from_str_radix alone would also take a sign ("+f").
            if part.is_empty() || part.len() > 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(Error::Malformed);
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| Error::Malformed)?;
        }
        if parts.next().is_some() {
            return Err(Error::Malformed);
        }
        Ok(EthernetAddress(octets))
    }
}

/// EtherType values dva dispatches on.
pub mod ethertype {
    /// Internet Protocol version 4.
    pub const IPV4: u16 = 0x0800;
    /// Address Resolution Protocol.
    pub const ARP: u16 = 0x0806;
    /// Internet Protocol version 6.
    pub const IPV6: u16 = 0x86DD;
    /// IEEE 802.1Q VLAN tag (C-tag).
    pub const VLAN: u16 = 0x8100;
    /// IEEE 802.1ad service tag (S-tag, "QinQ").
    pub const QINQ: u16 = 0x88A8;
}

mod field {
    use super::*;
    pub const DESTINATION: Field = 0..6;
    pub const SOURCE: Field = 6..12;
    pub const ETHERTYPE: Field = 12..14;
    pub const PAYLOAD: Rest = 14..;
    // Inside an 802.1Q tag, relative to the frame start.
    pub const VLAN_TCI: Field = 14..16;
    pub const VLAN_ETHERTYPE: Field = 16..18;
}

/// Length of the untagged Ethernet header.
pub const HEADER_LEN: usize = field::PAYLOAD.start;
/// Length of the Ethernet header with one 802.1Q tag.
pub const VLAN_HEADER_LEN: usize = field::VLAN_ETHERTYPE.end;

/// A read/write view of an Ethernet II frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EthernetFrame<T> {
    buffer: T,
}

impl<T> EthernetFrame<T> {
    /// Length of the untagged header (destination, source, ethertype).
    pub const HEADER_LEN: usize = HEADER_LEN;
}

impl<T: AsRef<[u8]>> EthernetFrame<T> {
    /// Wraps `buffer` without checking its length.
    pub const fn new_unchecked(buffer: T) -> EthernetFrame<T> {
        EthernetFrame { buffer }
    }

    /// Wraps `buffer` after [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<EthernetFrame<T>> {
        let frame = Self::new_unchecked(buffer);
        frame.check_len()?;
        Ok(frame)
    }

    /// `Err(Truncated)` unless the buffer holds the 14-byte header.
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

    /// Destination MAC address.
    pub fn dst_addr(&self) -> EthernetAddress {
        let mut a = [0u8; 6];
        a.copy_from_slice(&self.buffer.as_ref()[field::DESTINATION]);
        EthernetAddress(a)
    }

    /// Source MAC address.
    pub fn src_addr(&self) -> EthernetAddress {
        let mut a = [0u8; 6];
        a.copy_from_slice(&self.buffer.as_ref()[field::SOURCE]);
        EthernetAddress(a)
    }

    /// The outer ethertype ([`ethertype::VLAN`] on a tagged frame).
    pub fn ethertype(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::ETHERTYPE.start)
    }

    /// Everything after the 14-byte header (on a tagged frame this starts with the tag's TCI).
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[field::PAYLOAD]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> EthernetFrame<T> {
    /// Sets the destination MAC address.
    pub fn set_dst_addr(&mut self, addr: EthernetAddress) {
        self.buffer.as_mut()[field::DESTINATION].copy_from_slice(&addr.0);
    }

    /// Sets the source MAC address.
    pub fn set_src_addr(&mut self, addr: EthernetAddress) {
        self.buffer.as_mut()[field::SOURCE].copy_from_slice(&addr.0);
    }

    /// Sets the outer ethertype.
    pub fn set_ethertype(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::ETHERTYPE.start, value);
    }

    /// Mutable bytes after the 14-byte header.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::PAYLOAD]
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for EthernetFrame<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

/// Offset of the L3 header in `frame` and the ethertype that describes it, looking through at
/// most one 802.1Q tag: `(14, outer)` for an untagged frame, `(18, inner)` for a tagged one.
/// A frame with a second tag yields `(18, ethertype::VLAN)`.
pub fn l3_offset(frame: &[u8]) -> Result<(usize, u16)> {
    if frame.len() < HEADER_LEN {
        return Err(Error::Truncated);
    }
    let outer = get_u16(frame, field::ETHERTYPE.start);
    if outer != ethertype::VLAN {
        return Ok((HEADER_LEN, outer));
    }
    if frame.len() < VLAN_HEADER_LEN {
        return Err(Error::Truncated);
    }
    Ok((VLAN_HEADER_LEN, get_u16(frame, field::VLAN_ETHERTYPE.start)))
}

/// The Ethernet header as values, with an optional 802.1Q tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EthernetRepr {
    /// Destination MAC address.
    pub dst_addr: EthernetAddress,
    /// Source MAC address.
    pub src_addr: EthernetAddress,
    /// The 802.1Q tag control information (PCP, DEI, VLAN ID), if the frame is tagged.
    pub vlan: Option<u16>,
    /// The ethertype of the payload (inside the tag when there is one).
    pub ethertype: u16,
}

impl EthernetRepr {
    /// Parses the header, looking through one 802.1Q tag.
    pub fn parse<T: AsRef<[u8]>>(frame: &EthernetFrame<T>) -> Result<EthernetRepr> {
        frame.check_len()?;
        let buf = frame.buffer.as_ref();
        let (vlan, ethertype) = match frame.ethertype() {
            ethertype::VLAN => {
                if buf.len() < VLAN_HEADER_LEN {
                    return Err(Error::Truncated);
                }
                (
                    Some(get_u16(buf, field::VLAN_TCI.start)),
                    get_u16(buf, field::VLAN_ETHERTYPE.start),
                )
            }
            other => (None, other),
        };
        Ok(EthernetRepr {
            dst_addr: frame.dst_addr(),
            src_addr: frame.src_addr(),
            vlan,
            ethertype,
        })
    }

    /// 14, or 18 with a VLAN tag: also the offset of the payload.
    pub const fn header_len(&self) -> usize {
        if self.vlan.is_some() {
            VLAN_HEADER_LEN
        } else {
            HEADER_LEN
        }
    }

    /// Header plus `payload_len` bytes.
    pub const fn buffer_len(&self, payload_len: usize) -> usize {
        self.header_len() + payload_len
    }

    /// Writes the header (and the tag) at the start of `frame`.
    ///
    /// # Panics
    /// If the buffer is shorter than [`header_len`](Self::header_len).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, frame: &mut EthernetFrame<T>) {
        frame.set_dst_addr(self.dst_addr);
        frame.set_src_addr(self.src_addr);
        match self.vlan {
            Some(tci) => {
                frame.set_ethertype(ethertype::VLAN);
                let buf = frame.buffer.as_mut();
                put_u16(buf, field::VLAN_TCI.start, tci);
                put_u16(buf, field::VLAN_ETHERTYPE.start, self.ethertype);
            }
            None => frame.set_ethertype(self.ethertype),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // An ARP request as captured on a lab veth: broadcast, from 02:00:c6:12:01:02.
    static UNTAGGED: [u8; 18] = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0x00, 0xc6, 0x12, 0x01, 0x02, 0x08, 0x06, 0x00,
        0x01, 0x08, 0x00,
    ];

    // A tagged IPv4 frame header: VLAN 100, PCP 5, then the first bytes of the IPv4 header.
    static TAGGED: [u8; 20] = [
        0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x52, 0x54, 0x00, 0xab, 0xcd, 0xef, 0x81, 0x00, 0xa0,
        0x64, 0x08, 0x00, 0x45, 0x00,
    ];

    #[test]
    fn address_helpers() {
        let a: EthernetAddress = "02:00:C6:12:01:02".parse().unwrap();
        assert_eq!(a, EthernetAddress([0x02, 0x00, 0xc6, 0x12, 0x01, 0x02]));
        assert_eq!(a.to_string(), "02:00:c6:12:01:02");
        assert!(a.is_unicast() && a.is_local() && !a.is_multicast() && !a.is_broadcast());
        assert!(
            EthernetAddress::BROADCAST.is_broadcast() && EthernetAddress::BROADCAST.is_multicast()
        );
        assert!(EthernetAddress([0x33, 0x33, 0, 0, 0, 1]).is_multicast());
        assert_eq!(
            "00-11-22-33-44-55".parse::<EthernetAddress>().unwrap().0[5],
            0x55
        );
        for bad in [
            "",
            "00:11:22:33:44",
            "00:11:22:33:44:55:66",
            "0g:11:22:33:44:55",
            "000:1:2:3:4:5",
            "+f:11:22:33:44:55",
        ] {
            assert_eq!(
                bad.parse::<EthernetAddress>(),
                Err(Error::Malformed),
                "{bad}"
            );
        }
        assert_eq!(EthernetAddress::try_from(&UNTAGGED[6..12]).unwrap(), a);
        assert_eq!(
            EthernetAddress::try_from(&UNTAGGED[..5]),
            Err(Error::Truncated)
        );
        assert_eq!(
            EthernetAddress::try_from(&UNTAGGED[..7]),
            Err(Error::Malformed)
        );
    }

    #[test]
    fn untagged_frame_fields_and_round_trip() {
        let frame = EthernetFrame::new_checked(&UNTAGGED[..]).unwrap();
        assert_eq!(frame.dst_addr(), EthernetAddress::BROADCAST);
        assert_eq!(frame.src_addr().to_string(), "02:00:c6:12:01:02");
        assert_eq!(frame.ethertype(), ethertype::ARP);
        assert_eq!(frame.payload(), &[0x00, 0x01, 0x08, 0x00]);
        assert_eq!(l3_offset(&UNTAGGED).unwrap(), (14, ethertype::ARP));

        let repr = EthernetRepr::parse(&frame).unwrap();
        assert_eq!(repr.vlan, None);
        assert_eq!(repr.header_len(), 14);
        let mut out = UNTAGGED;
        out[..14].fill(0);
        repr.emit(&mut EthernetFrame::new_unchecked(&mut out[..]));
        assert_eq!(out, UNTAGGED);
    }

    #[test]
    fn tagged_frame_through_repr_and_l3_offset() {
        let frame = EthernetFrame::new_checked(&TAGGED[..]).unwrap();
        assert_eq!(frame.ethertype(), ethertype::VLAN);
        let repr = EthernetRepr::parse(&frame).unwrap();
        assert_eq!(repr.vlan, Some(0xa064));
        assert_eq!(repr.vlan.map(|t| t & 0x0fff), Some(100));
        assert_eq!(repr.ethertype, ethertype::IPV4);
        assert_eq!(repr.header_len(), 18);
        assert_eq!(repr.buffer_len(2), 20);
        assert_eq!(l3_offset(&TAGGED).unwrap(), (18, ethertype::IPV4));
        let mut out = [0u8; 20];
        out[18..].copy_from_slice(&TAGGED[18..]);
        repr.emit(&mut EthernetFrame::new_unchecked(&mut out[..]));
        assert_eq!(out, TAGGED);
    }

    #[test]
    fn truncation_is_reported() {
        assert_eq!(
            EthernetFrame::new_checked(&UNTAGGED[..13]),
            Err(Error::Truncated)
        );
        assert_eq!(l3_offset(&UNTAGGED[..13]), Err(Error::Truncated));
        assert_eq!(l3_offset(&TAGGED[..17]), Err(Error::Truncated));
        let short = EthernetFrame::new_unchecked(&TAGGED[..16]);
        assert_eq!(EthernetRepr::parse(&short), Err(Error::Truncated));
        assert_eq!(
            EthernetRepr::parse(&EthernetFrame::new_unchecked(&[0u8; 3][..])),
            Err(Error::Truncated)
        );
    }

    #[test]
    fn double_tag_is_left_to_the_caller() {
        let mut f = TAGGED;
        f[16..18].copy_from_slice(&ethertype::VLAN.to_be_bytes());
        assert_eq!(l3_offset(&f).unwrap(), (18, ethertype::VLAN));
    }

    #[test]
    fn setters() {
        let mut buf = [0u8; 20];
        let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
        frame.set_dst_addr(EthernetAddress([1, 2, 3, 4, 5, 6]));
        frame.set_src_addr(EthernetAddress([7, 8, 9, 10, 11, 12]));
        frame.set_ethertype(ethertype::IPV6);
        frame.payload_mut()[0] = 0x60;
        assert_eq!(frame.ethertype(), ethertype::IPV6);
        assert_eq!(EthernetFrame::<&[u8]>::HEADER_LEN, 14);
        let inner = frame.into_inner();
        assert_eq!(
            &inner[..15],
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0x86, 0xdd, 0x60]
        );
    }
}
