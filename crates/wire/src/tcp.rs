//! TCP segments (RFC 9293).
//!
//! The view's buffer is the whole segment and nothing more (build it from
//! [`Ipv4Packet::payload`](crate::Ipv4Packet::payload) or the IPv6 upper-layer slice): the
//! payload and the checksum both run to the end of the buffer.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::checksum;
use crate::field::Field;
use crate::ip_proto;
use crate::{get_u16, get_u32, put_u16, put_u32, Error, Result};

/// Flag bits of [`TcpPacket::flags`].
pub mod flags {
    /// No more data from the sender.
    pub const FIN: u8 = 0x01;
    /// Synchronize sequence numbers.
    pub const SYN: u8 = 0x02;
    /// Reset the connection.
    pub const RST: u8 = 0x04;
    /// Push.
    pub const PSH: u8 = 0x08;
    /// The acknowledgment number is significant.
    pub const ACK: u8 = 0x10;
    /// The urgent pointer is significant.
    pub const URG: u8 = 0x20;
    /// ECN echo.
    pub const ECE: u8 = 0x40;
    /// Congestion window reduced.
    pub const CWR: u8 = 0x80;
}

mod field {
    use super::*;
    pub const SRC_PORT: Field = 0..2;
    pub const DST_PORT: Field = 2..4;
    pub const SEQ_NUM: Field = 4..8;
    pub const ACK_NUM: Field = 8..12;
    pub const DATA_OFF: usize = 12;
    pub const FLAGS: usize = 13;
    pub const WIN_SIZE: Field = 14..16;
    pub const CHECKSUM: Field = 16..18;
    pub const URGENT: Field = 18..20;
}

/// Length of a header without options.
pub const HEADER_LEN: usize = field::URGENT.end;

mod option_kind {
    pub const END: u8 = 0;
    pub const NOP: u8 = 1;
    pub const MSS: u8 = 2;
    pub const WS: u8 = 3;
    pub const SACK_PERM: u8 = 4;
    pub const TIMESTAMP: u8 = 8;
}

/// One TCP option, as read by [`TcpOptions`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpOption<'a> {
    /// Kind 1, padding.
    NoOperation,
    /// Kind 2: maximum segment size.
    MaxSegmentSize(u16),
    /// Kind 3: window scale shift.
    WindowScale(u8),
    /// Kind 4: SACK permitted.
    SackPermitted,
    /// Kind 8: timestamps.
    Timestamps {
        /// Sender's timestamp value.
        tsval: u32,
        /// Echoed timestamp.
        tsecr: u32,
    },
    /// Any other option (SACK blocks, MD5, TFO, …), or a known kind with an unexpected length.
    Unknown {
        /// Option kind.
        kind: u8,
        /// Bytes after the kind and length.
        data: &'a [u8],
    },
}

/// Iterator over the options of a TCP header. It stops at End of Option List and at the first
/// option whose length field is invalid.
#[derive(Debug, Clone)]
pub struct TcpOptions<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> TcpOptions<'a> {
    /// Iterates over raw option bytes (as from [`TcpPacket::options`]).
    pub const fn new(data: &'a [u8]) -> TcpOptions<'a> {
        TcpOptions { data, pos: 0 }
    }

    /// Next option as (offset in the options area, kind, data after kind and length).
    fn next_raw(&mut self) -> Option<(usize, u8, &'a [u8])> {
        let at = self.pos;
        let kind = *self.data.get(at)?;
        match kind {
            option_kind::END => {
                self.pos = self.data.len();
                None
            }
            option_kind::NOP => {
                self.pos += 1;
                Some((at, kind, &[]))
            }
            _ => {
                let len = usize::from(*self.data.get(at + 1)?);
                if len < 2 || at + len > self.data.len() {
                    self.pos = self.data.len();
                    return None;
                }
                self.pos += len;
                Some((at, kind, &self.data[at + 2..at + len]))
            }
        }
    }
}

impl<'a> Iterator for TcpOptions<'a> {
    type Item = TcpOption<'a>;

    fn next(&mut self) -> Option<TcpOption<'a>> {
        let (_, kind, data) = self.next_raw()?;
        Some(match (kind, data.len()) {
            (option_kind::NOP, _) => TcpOption::NoOperation,
            (option_kind::MSS, 2) => TcpOption::MaxSegmentSize(get_u16(data, 0)),
            (option_kind::WS, 1) => TcpOption::WindowScale(data[0]),
            (option_kind::SACK_PERM, 0) => TcpOption::SackPermitted,
            (option_kind::TIMESTAMP, 8) => TcpOption::Timestamps {
                tsval: get_u32(data, 0),
                tsecr: get_u32(data, 4),
            },
            _ => TcpOption::Unknown { kind, data },
        })
    }
}

/// A read/write view of a TCP segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpPacket<T> {
    buffer: T,
}

impl<T> TcpPacket<T> {
    /// Length of a header without options.
    pub const HEADER_LEN: usize = HEADER_LEN;
}

impl<T: AsRef<[u8]>> TcpPacket<T> {
    /// Wraps `buffer` without checking it.
    pub const fn new_unchecked(buffer: T) -> TcpPacket<T> {
        TcpPacket { buffer }
    }

    /// Wraps `buffer` after [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<TcpPacket<T>> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// `Truncated` unless the fixed header and the header length from the data offset fit the
    /// buffer; `Malformed` for a data offset below 5.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let header_len = usize::from(self.header_len());
        if header_len < HEADER_LEN {
            return Err(Error::Malformed);
        }
        if header_len > len {
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

    /// Sequence number.
    pub fn seq_number(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::SEQ_NUM.start)
    }

    /// Acknowledgment number.
    pub fn ack_number(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::ACK_NUM.start)
    }

    /// Header length in bytes (data offset × 4).
    pub fn header_len(&self) -> u8 {
        (self.buffer.as_ref()[field::DATA_OFF] >> 4) * 4
    }

    /// The eight flag bits (see [`flags`]).
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    /// FIN is set.
    pub fn fin(&self) -> bool {
        self.flags() & flags::FIN != 0
    }

    /// SYN is set.
    pub fn syn(&self) -> bool {
        self.flags() & flags::SYN != 0
    }

    /// RST is set.
    pub fn rst(&self) -> bool {
        self.flags() & flags::RST != 0
    }

    /// PSH is set.
    pub fn psh(&self) -> bool {
        self.flags() & flags::PSH != 0
    }

    /// ACK is set.
    pub fn ack(&self) -> bool {
        self.flags() & flags::ACK != 0
    }

    /// URG is set.
    pub fn urg(&self) -> bool {
        self.flags() & flags::URG != 0
    }

    /// ECE is set.
    pub fn ece(&self) -> bool {
        self.flags() & flags::ECE != 0
    }

    /// CWR is set.
    pub fn cwr(&self) -> bool {
        self.flags() & flags::CWR != 0
    }

    /// Receive window (unscaled).
    pub fn window_len(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::WIN_SIZE.start)
    }

    /// Checksum as stored.
    pub fn checksum(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::CHECKSUM.start)
    }

    /// Urgent pointer.
    pub fn urgent(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::URGENT.start)
    }

    /// Raw option bytes.
    pub fn options(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..usize::from(self.header_len())]
    }

    /// The options, decoded.
    pub fn option_iter(&self) -> TcpOptions<'_> {
        TcpOptions::new(self.options())
    }

    /// The MSS option's value, if the segment carries one.
    pub fn max_seg_size(&self) -> Option<u16> {
        self.option_iter().find_map(|o| match o {
            TcpOption::MaxSegmentSize(mss) => Some(mss),
            _ => None,
        })
    }

    /// Data after the header.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[usize::from(self.header_len())..]
    }

    /// Sequence space the segment occupies: payload length plus one for SYN and one for FIN.
    pub fn segment_len(&self) -> usize {
        self.payload().len() + usize::from(self.syn()) + usize::from(self.fin())
    }

    fn checksum_v4(&self, src: &Ipv4Addr, dst: &Ipv4Addr) -> u16 {
        let data = self.buffer.as_ref();
        let ph = checksum::pseudo_header_v4(src, dst, ip_proto::TCP, data.len() as u32);
        checksum::fold(ph + checksum::sum(data))
    }

    fn checksum_v6(&self, src: &Ipv6Addr, dst: &Ipv6Addr) -> u16 {
        let data = self.buffer.as_ref();
        let ph = checksum::pseudo_header_v6(src, dst, ip_proto::TCP, data.len() as u32);
        checksum::fold(ph + checksum::sum(data))
    }

    /// The checksum verifies for a segment carried in IPv4 from `src` to `dst`.
    pub fn verify_checksum_v4(&self, src: &Ipv4Addr, dst: &Ipv4Addr) -> bool {
        self.checksum_v4(src, dst) == 0
    }

    /// The checksum verifies for a segment carried in IPv6 from `src` to `dst`.
    pub fn verify_checksum_v6(&self, src: &Ipv6Addr, dst: &Ipv6Addr) -> bool {
        self.checksum_v6(src, dst) == 0
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> TcpPacket<T> {
    /// Sets the source port.
    pub fn set_src_port(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::SRC_PORT.start, value);
    }

    /// Sets the destination port.
    pub fn set_dst_port(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::DST_PORT.start, value);
    }

    /// Sets the sequence number.
    pub fn set_seq_number(&mut self, value: u32) {
        put_u32(self.buffer.as_mut(), field::SEQ_NUM.start, value);
    }

    /// Sets the acknowledgment number.
    pub fn set_ack_number(&mut self, value: u32) {
        put_u32(self.buffer.as_mut(), field::ACK_NUM.start, value);
    }

    /// Sets the header length in bytes (a multiple of 4, 20 to 60); clears the reserved bits.
    pub fn set_header_len(&mut self, value: u8) {
        self.buffer.as_mut()[field::DATA_OFF] = ((value / 4) & 0x0f) << 4;
    }

    /// Sets all eight flag bits.
    pub fn set_flags(&mut self, value: u8) {
        self.buffer.as_mut()[field::FLAGS] = value;
    }

    /// Sets the receive window.
    pub fn set_window_len(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::WIN_SIZE.start, value);
    }

    /// Stores a checksum as given.
    pub fn set_checksum(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::CHECKSUM.start, value);
    }

    /// Sets the urgent pointer.
    pub fn set_urgent(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::URGENT.start, value);
    }

    /// Computes and stores the checksum for a segment carried in IPv4.
    pub fn fill_checksum_v4(&mut self, src: &Ipv4Addr, dst: &Ipv4Addr) {
        self.set_checksum(0);
        let c = self.checksum_v4(src, dst);
        self.set_checksum(c);
    }

    /// Computes and stores the checksum for a segment carried in IPv6.
    pub fn fill_checksum_v6(&mut self, src: &Ipv6Addr, dst: &Ipv6Addr) {
        self.set_checksum(0);
        let c = self.checksum_v6(src, dst);
        self.set_checksum(c);
    }

    /// Lowers the MSS option to `max` if it is larger, patching the checksum incrementally;
    /// returns whether the segment changed. Used to keep segments within the path MTU once the
    /// backplane encapsulation is added. Needs a checked view.
    pub fn clamp_mss(&mut self, max: u16) -> bool {
        let mut found = None;
        let mut iter = TcpOptions::new(self.options());
        while let Some((at, kind, data)) = iter.next_raw() {
            if kind == option_kind::MSS && data.len() == 2 {
                found = Some((HEADER_LEN + at + 2, get_u16(data, 0)));
                break;
            }
        }
        let Some((at, old)) = found else { return false };
        if old <= max {
            return false;
        }
        put_u16(self.buffer.as_mut(), at, max);
        // A 16-bit value at an odd offset enters the ones' complement sum byte-swapped.
        let (o, n) = if at % 2 == 0 {
            (old, max)
        } else {
            (old.swap_bytes(), max.swap_bytes())
        };
        let c = checksum::update16(self.checksum(), o, n);
        self.set_checksum(c);
        true
    }

    /// Mutable option bytes.
    pub fn options_mut(&mut self) -> &mut [u8] {
        let header_len = usize::from(self.header_len());
        &mut self.buffer.as_mut()[HEADER_LEN..header_len]
    }

    /// Mutable data after the header.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let header_len = usize::from(self.header_len());
        &mut self.buffer.as_mut()[header_len..]
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for TcpPacket<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

/// A TCP header without options, as values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TcpRepr {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Sequence number.
    pub seq_number: u32,
    /// Acknowledgment number.
    pub ack_number: u32,
    /// The eight flag bits (see [`flags`]).
    pub flags: u8,
    /// Receive window (unscaled).
    pub window_len: u16,
    /// Data length after the header.
    pub payload_len: usize,
}

impl TcpRepr {
    /// Reads the header (options are skipped). The checksum is not verified: it needs the IP
    /// addresses, see [`TcpPacket::verify_checksum_v4`] / [`verify_checksum_v6`](TcpPacket::verify_checksum_v6).
    pub fn parse<T: AsRef<[u8]>>(packet: &TcpPacket<T>) -> Result<TcpRepr> {
        packet.check_len()?;
        Ok(TcpRepr {
            src_port: packet.src_port(),
            dst_port: packet.dst_port(),
            seq_number: packet.seq_number(),
            ack_number: packet.ack_number(),
            flags: packet.flags(),
            window_len: packet.window_len(),
            payload_len: packet.payload().len(),
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

    fn emit_header<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut TcpPacket<T>) {
        packet.set_src_port(self.src_port);
        packet.set_dst_port(self.dst_port);
        packet.set_seq_number(self.seq_number);
        packet.set_ack_number(self.ack_number);
        packet.set_header_len(HEADER_LEN as u8);
        packet.set_flags(self.flags);
        packet.set_window_len(self.window_len);
        packet.set_checksum(0);
        packet.set_urgent(0);
    }

    /// Writes the header and the checksum for IPv4 from `src` to `dst`.
    ///
    /// **The caller places the payload first**, at `HEADER_LEN..HEADER_LEN + payload_len` of
    /// the buffer: the checksum covers it. Exactly [`buffer_len`](Self::buffer_len) bytes are
    /// checksummed, so the buffer may be longer than the segment.
    ///
    /// # Panics
    /// If the buffer is shorter than `buffer_len()`.
    pub fn emit_v4<T: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        packet: &mut TcpPacket<T>,
        src: &Ipv4Addr,
        dst: &Ipv4Addr,
    ) {
        self.emit_header(packet);
        let mut seg = TcpPacket::new_unchecked(&mut packet.buffer.as_mut()[..self.buffer_len()]);
        seg.fill_checksum_v4(src, dst);
    }

    /// As [`emit_v4`](Self::emit_v4), for IPv6.
    ///
    /// # Panics
    /// If the buffer is shorter than `buffer_len()`.
    pub fn emit_v6<T: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        packet: &mut TcpPacket<T>,
        src: &Ipv6Addr,
        dst: &Ipv6Addr,
    ) {
        self.emit_header(packet);
        let mut seg = TcpPacket::new_unchecked(&mut packet.buffer.as_mut()[..self.buffer_len()]);
        seg.fill_checksum_v6(src, dst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
    const DST: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);

    // A Linux SYN to port 80: MSS 1460, SACK permitted, timestamps, NOP, window scale 7.
    // Checksum 0x499c is correct for SRC -> DST.
    static SYN: [u8; 40] = [
        0xa4, 0x7e, 0x00, 0x50, 0x5e, 0x2b, 0x6f, 0x4c, 0x00, 0x00, 0x00, 0x00, 0xa0, 0x02, 0xfa,
        0xf0, 0x49, 0x9c, 0x00, 0x00, // header
        0x02, 0x04, 0x05, 0xb4, 0x04, 0x02, 0x08, 0x0a, 0x00, 0x01, 0x02, 0x03, 0x00, 0x00, 0x00,
        0x00, 0x01, 0x03, 0x03, 0x07, // options
    ];

    #[test]
    fn syn_fields() {
        let p = TcpPacket::new_checked(&SYN[..]).unwrap();
        assert_eq!(p.src_port(), 42110);
        assert_eq!(p.dst_port(), 80);
        assert_eq!(p.seq_number(), 0x5e2b_6f4c);
        assert_eq!(p.ack_number(), 0);
        assert_eq!(p.header_len(), 40);
        assert_eq!(p.flags(), flags::SYN);
        assert!(
            p.syn()
                && !p.ack()
                && !p.fin()
                && !p.rst()
                && !p.psh()
                && !p.urg()
                && !p.ece()
                && !p.cwr()
        );
        assert_eq!(p.window_len(), 64240);
        assert_eq!(p.checksum(), 0x499c);
        assert_eq!(p.urgent(), 0);
        assert_eq!(p.options().len(), 20);
        assert!(p.payload().is_empty());
        assert_eq!(p.segment_len(), 1);
        assert!(p.verify_checksum_v4(&SRC, &DST));
        assert!(!p.verify_checksum_v4(&DST, &Ipv4Addr::new(198, 18, 2, 3)));
        let opts: Vec<_> = p.option_iter().collect();
        assert_eq!(
            opts,
            vec![
                TcpOption::MaxSegmentSize(1460),
                TcpOption::SackPermitted,
                TcpOption::Timestamps {
                    tsval: 0x0001_0203,
                    tsecr: 0
                },
                TcpOption::NoOperation,
                TcpOption::WindowScale(7),
            ]
        );
        assert_eq!(p.max_seg_size(), Some(1460));
    }

    #[test]
    fn fill_checksum_reproduces_capture() {
        let mut v = SYN;
        let mut p = TcpPacket::new_unchecked(&mut v[..]);
        p.set_checksum(0xffff);
        p.fill_checksum_v4(&SRC, &DST);
        assert_eq!(v, SYN);
    }

    #[test]
    fn repr_round_trip_v4() {
        let r = TcpRepr::parse(&TcpPacket::new_unchecked(&SYN[..])).unwrap();
        assert_eq!(
            r,
            TcpRepr {
                src_port: 42110,
                dst_port: 80,
                seq_number: 0x5e2b_6f4c,
                ack_number: 0,
                flags: flags::SYN,
                window_len: 64240,
                payload_len: 0,
            }
        );
        // A RST+ACK answer with a payload, into a longer buffer.
        let reply = TcpRepr {
            flags: flags::RST | flags::ACK,
            payload_len: 3,
            ..r
        };
        let mut buf = [0xaau8; 30];
        buf[20..23].copy_from_slice(b"abc");
        reply.emit_v4(&mut TcpPacket::new_unchecked(&mut buf[..]), &DST, &SRC);
        let seg = TcpPacket::new_checked(&buf[..reply.buffer_len()]).unwrap();
        assert!(seg.verify_checksum_v4(&DST, &SRC));
        assert_eq!(seg.payload(), b"abc");
        assert_eq!(TcpRepr::parse(&seg).unwrap(), reply);
        assert_eq!(buf[23..], [0xaa; 7]);
    }

    #[test]
    fn repr_round_trip_v6() {
        let s: Ipv6Addr = "2001:db8:1::2".parse().unwrap();
        let d: Ipv6Addr = "2001:db8:2::2".parse().unwrap();
        let r = TcpRepr {
            src_port: 1,
            dst_port: 2,
            seq_number: 3,
            ack_number: 4,
            flags: flags::ACK,
            window_len: 5,
            payload_len: 1,
        };
        let mut buf = [0u8; 21];
        buf[20] = b'x';
        r.emit_v6(&mut TcpPacket::new_unchecked(&mut buf[..]), &s, &d);
        let p = TcpPacket::new_checked(&buf[..]).unwrap();
        assert!(p.verify_checksum_v6(&s, &d));
        assert!(!p.verify_checksum_v6(&s, &s));
        assert_eq!(TcpRepr::parse(&p).unwrap(), r);
        let mut again = buf;
        TcpPacket::new_unchecked(&mut again[..]).fill_checksum_v6(&s, &d);
        assert_eq!(again, buf);
    }

    #[test]
    fn clamp_mss_even_and_odd_offsets() {
        let mut v = SYN;
        let mut p = TcpPacket::new_checked(&mut v[..]).unwrap();
        assert!(!p.clamp_mss(1460));
        assert!(p.clamp_mss(1400));
        assert_eq!(p.max_seg_size(), Some(1400));
        assert!(p.verify_checksum_v4(&SRC, &DST));

        // Same options shifted by a NOP so the MSS value sits at an odd offset.
        let mut odd = [0u8; 44];
        odd[..20].copy_from_slice(&SYN[..20]);
        odd[12] = 0xb0;
        odd[20] = 1;
        odd[21..40].copy_from_slice(&SYN[20..39]);
        odd[40..44].copy_from_slice(&[1, 1, 1, 0]);
        let mut p = TcpPacket::new_checked(&mut odd[..]).unwrap();
        p.fill_checksum_v4(&SRC, &DST);
        assert!(p.clamp_mss(1360));
        assert_eq!(p.max_seg_size(), Some(1360));
        assert!(p.verify_checksum_v4(&SRC, &DST));

        let mut none = [0u8; 20];
        none[12] = 0x50;
        assert!(!TcpPacket::new_checked(&mut none[..]).unwrap().clamp_mss(1));
    }

    #[test]
    fn malformed_options_stop_the_iterator() {
        for opts in [
            &[2u8, 0, 1, 1][..],
            &[2, 9, 0, 0],
            &[3],
            &[0, 2, 4, 5, 0xb4],
        ] {
            let n = TcpOptions::new(opts).count();
            assert_eq!(n, 0, "{opts:?}");
        }
        let odd = [2u8, 3, 5, 1];
        assert_eq!(
            TcpOptions::new(&odd).collect::<Vec<_>>(),
            vec![
                TcpOption::Unknown {
                    kind: 2,
                    data: &[5]
                },
                TcpOption::NoOperation
            ]
        );
    }

    #[test]
    fn rejects() {
        assert_eq!(TcpPacket::new_checked(&SYN[..19]), Err(Error::Truncated));
        assert_eq!(TcpPacket::new_checked(&SYN[..39]), Err(Error::Truncated));
        let mut bad = SYN;
        bad[12] = 0x40;
        assert_eq!(TcpPacket::new_checked(&bad[..]), Err(Error::Malformed));
        assert_eq!(
            TcpRepr::parse(&TcpPacket::new_unchecked(&bad[..])),
            Err(Error::Malformed)
        );
    }

    #[test]
    fn setters() {
        let mut v = [0u8; 24];
        let mut p = TcpPacket::new_unchecked(&mut v[..]);
        p.set_header_len(24);
        p.set_src_port(1);
        p.set_dst_port(2);
        p.set_seq_number(3);
        p.set_ack_number(4);
        p.set_flags(flags::FIN | flags::ACK | flags::CWR | flags::ECE | flags::URG | flags::PSH);
        p.set_window_len(5);
        p.set_urgent(6);
        p.options_mut().copy_from_slice(&[1, 1, 1, 0]);
        assert!(p.payload_mut().is_empty());
        let p = TcpPacket::new_checked(&v[..]).unwrap();
        assert_eq!(
            (p.src_port(), p.dst_port(), p.seq_number(), p.ack_number()),
            (1, 2, 3, 4)
        );
        assert!(p.fin() && p.ack() && p.cwr() && p.ece() && p.urg() && p.psh() && !p.syn());
        assert_eq!((p.window_len(), p.urgent(), p.segment_len()), (5, 6, 1));
        assert_eq!(p.option_iter().count(), 3);
    }
}
