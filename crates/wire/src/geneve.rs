//! GENEVE (RFC 8926), dva's backplane encapsulation, and dva's own metadata option.
//!
//! ```text
//!  0                   1                   2                   3
//! |Ver|  Opt Len  |O|C|    Rsvd.  |          Protocol Type        |
//! |        Virtual Network Identifier (VNI)       |    Reserved   |
//! |                    Variable-Length Options                    |
//! ```
//!
//! [`GenevePacket::check_len`] validates the option length and walks every option TLV, so
//! [`GenevePacket::options`] never meets a malformed one on a checked view.
//!
//! Every backplane packet carries exactly one dva option (class [`DVA_OPTION_CLASS`], type
//! [`DVA_OPTION_TYPE`]) with a [`DvaMeta`]; [`encap_dva`] and [`decap_dva`] are the fast path for
//! it.

use crate::field::{Field, Rest};
use crate::{get_u16, get_u32, put_u16, put_u32, Error, Result};

/// The IANA UDP port for GENEVE.
pub const UDP_PORT: u16 = 6081;
/// Protocol type of an IPv4 payload (an ethertype).
pub const PROTO_IPV4: u16 = 0x0800;
/// Protocol type of an IPv6 payload.
pub const PROTO_IPV6: u16 = 0x86DD;
/// Protocol type of an Ethernet frame payload (Transparent Ethernet Bridging).
pub const PROTO_ETHERNET: u16 = 0x6558;

/// dva's option class, from the experimental range (0xFF00–0xFFFF).
pub const DVA_OPTION_CLASS: u16 = 0xFFDA;
/// dva's option type (the critical bit is clear: a plain GENEVE receiver may ignore it).
pub const DVA_OPTION_TYPE: u8 = 0x01;
/// Length of dva's option data.
pub const DVA_OPTION_DATA_LEN: usize = 12;
/// GENEVE base header + dva option header + dva option data: where the inner packet starts in
/// a packet built by [`encap_dva`].
pub const DVA_HEADER_LEN: usize = 8 + 4 + 12;

/// Bit of an option's type byte that marks it critical: a receiver that does not understand a
/// critical option must drop the packet.
pub const OPTION_CRITICAL: u8 = 0x80;

/// Flag bits of [`DvaMeta::flags`].
pub mod dva_flags {
    /// A data plane without state for the flow sent the packet to a previous bucket owner.
    pub const PUNTED: u8 = 0x01;
    /// A previous owner without state hands the packet back: the flow starts at the sender.
    pub const NEW_HERE: u8 = 0x02;
    /// Sent by a data plane (processed traffic on its way out, or a punt), not a dispatcher.
    pub const FROM_DATAPLANE: u8 = 0x04;
    /// The packet's L4 checksum is partial (CHECKSUM_PARTIAL: the field holds whatever the
    /// stages left there, to be replaced by the pseudo-header sum and finished by the kernel
    /// on the way out, or in software where the egress cannot offload). Stages that rewrite
    /// the packet keep the flag; packets a unit builds itself never carry it.
    pub const CSUM_PARTIAL: u8 = 0x08;
}

mod field {
    use super::*;
    pub const VER_OPT_LEN: usize = 0;
    pub const FLAGS: usize = 1;
    pub const PROTOCOL: Field = 2..4;
    // VNI in the top 24 bits, reserved byte below.
    pub const VNI_RSVD: Field = 4..8;
    pub const OPTIONS: Rest = 8..;

    // Within an option.
    pub const OPT_CLASS: Field = 0..2;
    pub const OPT_TYPE: usize = 2;
    pub const OPT_LEN: usize = 3;
    pub const OPT_DATA: Rest = 4..;
}

/// Length of the base header (without options).
pub const HEADER_LEN: usize = field::OPTIONS.start;
/// Length of an option header (class, type, length).
pub const OPTION_HEADER_LEN: usize = field::OPT_DATA.start;
/// Longest options area the 6-bit length field can describe.
pub const MAX_OPTIONS_LEN: usize = 63 * 4;

const FLAG_OAM: u8 = 0x80;
const FLAG_CRITICAL: u8 = 0x40;

/// One option TLV. `opt_type` is the raw type byte, critical bit included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GeneveOption<'a> {
    /// Option class (namespace).
    pub class: u16,
    /// Type within the class; the high bit is the critical bit.
    pub opt_type: u8,
    /// Option data (a multiple of 4 bytes, at most 124).
    pub data: &'a [u8],
}

impl GeneveOption<'_> {
    /// The critical bit is set.
    pub const fn is_critical(&self) -> bool {
        self.opt_type & OPTION_CRITICAL != 0
    }

    /// Option header plus data.
    pub const fn buffer_len(&self) -> usize {
        OPTION_HEADER_LEN + self.data.len()
    }

    /// Writes the TLV at the start of `buf`; returns its length. Data lengths that are not a
    /// multiple of 4 give `Malformed` (the length field counts 4-byte words), longer than 124
    /// bytes `Unsupported`, and a short `buf` `Truncated`.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        if self.data.len() % 4 != 0 {
            return Err(Error::Malformed);
        }
        if self.data.len() > 31 * 4 {
            return Err(Error::Unsupported);
        }
        let len = self.buffer_len();
        let out = buf.get_mut(..len).ok_or(Error::Truncated)?;
        put_u16(out, field::OPT_CLASS.start, self.class);
        out[field::OPT_TYPE] = self.opt_type;
        out[field::OPT_LEN] = (self.data.len() / 4) as u8;
        out[field::OPT_DATA].copy_from_slice(self.data);
        Ok(len)
    }
}

/// Iterator over the option TLVs of a GENEVE header; it stops at the first malformed TLV (which
/// a checked view does not have).
#[derive(Debug, Clone)]
pub struct GeneveOptions<'a> {
    data: &'a [u8],
}

impl<'a> GeneveOptions<'a> {
    /// Iterates over a raw options area.
    pub const fn new(data: &'a [u8]) -> GeneveOptions<'a> {
        GeneveOptions { data }
    }
}

impl<'a> Iterator for GeneveOptions<'a> {
    type Item = GeneveOption<'a>;

    fn next(&mut self) -> Option<GeneveOption<'a>> {
        if self.data.len() < OPTION_HEADER_LEN {
            self.data = &[];
            return None;
        }
        let len = OPTION_HEADER_LEN + usize::from(self.data[field::OPT_LEN] & 0x1f) * 4;
        if len > self.data.len() {
            self.data = &[];
            return None;
        }
        let (tlv, rest) = self.data.split_at(len);
        self.data = rest;
        Some(GeneveOption {
            class: get_u16(tlv, field::OPT_CLASS.start),
            opt_type: tlv[field::OPT_TYPE],
            data: &tlv[field::OPT_DATA],
        })
    }
}

/// A read/write view of a GENEVE packet (the UDP payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenevePacket<T> {
    buffer: T,
}

impl<T> GenevePacket<T> {
    /// Length of the base header.
    pub const HEADER_LEN: usize = HEADER_LEN;
}

impl<T: AsRef<[u8]>> GenevePacket<T> {
    /// Wraps `buffer` without checking it.
    pub const fn new_unchecked(buffer: T) -> GenevePacket<T> {
        GenevePacket { buffer }
    }

    /// Wraps `buffer` after [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<GenevePacket<T>> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// `Truncated` unless the base header and the options area fit; `Malformed` unless the
    /// options area is exactly a sequence of well-formed TLVs. The version is not checked.
    pub fn check_len(&self) -> Result<()> {
        let buf = self.buffer.as_ref();
        if buf.len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let header_len = self.header_len();
        if header_len > buf.len() {
            return Err(Error::Truncated);
        }
        let mut opts = &buf[HEADER_LEN..header_len];
        while !opts.is_empty() {
            if opts.len() < OPTION_HEADER_LEN {
                return Err(Error::Malformed);
            }
            let len = OPTION_HEADER_LEN + usize::from(opts[field::OPT_LEN] & 0x1f) * 4;
            if len > opts.len() {
                return Err(Error::Malformed);
            }
            opts = &opts[len..];
        }
        Ok(())
    }

    /// The wrapped buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Version (0 is the only one defined).
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_OPT_LEN] >> 6
    }

    /// Length of the options area in bytes.
    pub fn opt_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::VER_OPT_LEN] & 0x3f) * 4
    }

    /// Base header plus options: the offset of the payload.
    pub fn header_len(&self) -> usize {
        HEADER_LEN + self.opt_len()
    }

    /// The O bit: a control message, not data.
    pub fn oam(&self) -> bool {
        self.buffer.as_ref()[field::FLAGS] & FLAG_OAM != 0
    }

    /// The C bit: at least one critical option is present.
    pub fn critical(&self) -> bool {
        self.buffer.as_ref()[field::FLAGS] & FLAG_CRITICAL != 0
    }

    /// Protocol type of the payload (an ethertype; see [`PROTO_IPV4`] and friends).
    pub fn protocol_type(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::PROTOCOL.start)
    }

    /// The 24-bit virtual network identifier.
    pub fn vni(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::VNI_RSVD.start) >> 8
    }

    /// Raw options area.
    pub fn options_bytes(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..self.header_len()]
    }

    /// The option TLVs.
    pub fn options(&self) -> GeneveOptions<'_> {
        GeneveOptions::new(self.options_bytes())
    }

    /// The encapsulated packet.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> GenevePacket<T> {
    /// Sets the version.
    pub fn set_version(&mut self, value: u8) {
        let b = &mut self.buffer.as_mut()[field::VER_OPT_LEN];
        *b = (*b & 0x3f) | (value << 6);
    }

    /// Sets the options length in bytes (a multiple of 4, at most 252).
    pub fn set_opt_len(&mut self, bytes: usize) {
        let b = &mut self.buffer.as_mut()[field::VER_OPT_LEN];
        *b = (*b & 0xc0) | ((bytes / 4) as u8 & 0x3f);
    }

    /// Sets or clears the O bit.
    pub fn set_oam(&mut self, value: bool) {
        let b = &mut self.buffer.as_mut()[field::FLAGS];
        *b = if value { *b | FLAG_OAM } else { *b & !FLAG_OAM };
    }

    /// Sets or clears the C bit.
    pub fn set_critical(&mut self, value: bool) {
        let b = &mut self.buffer.as_mut()[field::FLAGS];
        *b = if value {
            *b | FLAG_CRITICAL
        } else {
            *b & !FLAG_CRITICAL
        };
    }

    /// Sets the protocol type.
    pub fn set_protocol_type(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::PROTOCOL.start, value);
    }

    /// Sets the VNI (the low 24 bits of `value`) and clears the reserved byte.
    pub fn set_vni(&mut self, value: u32) {
        put_u32(
            self.buffer.as_mut(),
            field::VNI_RSVD.start,
            (value & 0x00ff_ffff) << 8,
        );
    }

    /// Mutable options area.
    pub fn options_mut(&mut self) -> &mut [u8] {
        let end = self.header_len();
        &mut self.buffer.as_mut()[HEADER_LEN..end]
    }

    /// Mutable payload.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let start = self.header_len();
        &mut self.buffer.as_mut()[start..]
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for GenevePacket<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

/// A GENEVE base header as values. The options are not represented: `emit` reserves
/// `options_len` bytes for them and the caller writes them (e.g. with [`GeneveOption::emit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GeneveRepr {
    /// The 24-bit virtual network identifier.
    pub vni: u32,
    /// Protocol type of the payload.
    pub protocol_type: u16,
    /// Options area length in bytes (a multiple of 4, at most 252).
    pub options_len: usize,
}

impl GeneveRepr {
    /// Parses a version-0 header (`Unsupported` for other versions).
    pub fn parse<T: AsRef<[u8]>>(packet: &GenevePacket<T>) -> Result<GeneveRepr> {
        packet.check_len()?;
        if packet.version() != 0 {
            return Err(Error::Unsupported);
        }
        Ok(GeneveRepr {
            vni: packet.vni(),
            protocol_type: packet.protocol_type(),
            options_len: packet.opt_len(),
        })
    }

    /// Base header plus options: where the payload starts.
    pub const fn header_len(&self) -> usize {
        HEADER_LEN + self.options_len
    }

    /// Same as [`header_len`](Self::header_len) (the payload is the caller's).
    pub const fn buffer_len(&self) -> usize {
        self.header_len()
    }

    /// Writes the base header: version 0, O and C clear, reserved fields zero. The options area
    /// is left to the caller.
    ///
    /// # Panics
    /// If the buffer is shorter than 8 bytes.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut GenevePacket<T>) {
        let buf = packet.buffer.as_mut();
        buf[field::VER_OPT_LEN] = 0;
        buf[field::FLAGS] = 0;
        packet.set_opt_len(self.options_len);
        packet.set_protocol_type(self.protocol_type);
        packet.set_vni(self.vni);
    }
}

/// dva's per-packet metadata on the backplane.
///
/// Data layout (12 bytes): epoch u32 | bucket u16 | hops u8 | flags u8 | ingress_if u8 |
/// egress_if u8 | gso_size u16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct DvaMeta {
    /// Bucket-table epoch the sender classified the packet with.
    pub epoch: u32,
    /// Flow bucket of the packet.
    pub bucket: u16,
    /// Punts so far (bounded by the receiver to stop loops).
    pub hops: u8,
    /// See [`dva_flags`].
    pub flags: u8,
    /// Dispatcher interface the packet came in on.
    pub ingress_if: u8,
    /// Dispatcher interface the packet should leave by.
    pub egress_if: u8,
    /// Non-zero: the packet is a GSO super-packet (TCP or UDP, larger than a wire frame) to be
    /// cut into segments of this many payload bytes on the way out.
    pub gso_size: u16,
}

impl DvaMeta {
    /// Reads the option data; anything but 12 bytes is `Malformed`.
    pub fn parse(data: &[u8]) -> Result<DvaMeta> {
        if data.len() != DVA_OPTION_DATA_LEN {
            return Err(Error::Malformed);
        }
        Ok(DvaMeta {
            epoch: get_u32(data, 0),
            bucket: get_u16(data, 4),
            hops: data[6],
            flags: data[7],
            ingress_if: data[8],
            egress_if: data[9],
            gso_size: get_u16(data, 10),
        })
    }

    /// Writes the 12 option data bytes at the start of `data`.
    ///
    /// # Panics
    /// If `data` is shorter than 12 bytes.
    pub fn emit(&self, data: &mut [u8]) {
        put_u32(data, 0, self.epoch);
        put_u16(data, 4, self.bucket);
        data[6] = self.hops;
        data[7] = self.flags;
        data[8] = self.ingress_if;
        data[9] = self.egress_if;
        put_u16(data, 10, self.gso_size);
    }
}

/// Writes a GENEVE header with exactly one option, dva's, into `buf[..DVA_HEADER_LEN]`; the
/// caller puts the inner packet at `buf[DVA_HEADER_LEN..]`. Returns `DVA_HEADER_LEN`. Only the
/// low 24 bits of `vni` are used.
///
/// # Panics
/// If `buf` is shorter than [`DVA_HEADER_LEN`].
pub fn encap_dva(buf: &mut [u8], vni: u32, protocol_type: u16, meta: &DvaMeta) -> usize {
    let header = &mut buf[..DVA_HEADER_LEN];
    let mut packet = GenevePacket::new_unchecked(&mut *header);
    GeneveRepr {
        vni,
        protocol_type,
        options_len: OPTION_HEADER_LEN + DVA_OPTION_DATA_LEN,
    }
    .emit(&mut packet);
    let opt = &mut header[HEADER_LEN..];
    put_u16(opt, field::OPT_CLASS.start, DVA_OPTION_CLASS);
    opt[field::OPT_TYPE] = DVA_OPTION_TYPE;
    opt[field::OPT_LEN] = (DVA_OPTION_DATA_LEN / 4) as u8;
    meta.emit(&mut opt[OPTION_HEADER_LEN..]);
    DVA_HEADER_LEN
}

/// Parses any valid GENEVE header carrying dva's option and returns
/// `(vni, protocol_type, meta, payload offset)`.
///
/// Errors: `Truncated`/`Malformed` for a bad header or options area; `Unsupported` for a version
/// other than 0, an OAM packet, or an unknown option with the critical bit set (RFC 8926 §3.5:
/// it must not be processed); `Malformed` when dva's option is missing or has the wrong length.
/// Unknown non-critical options are skipped; the first dva option wins.
pub fn decap_dva(buf: &[u8]) -> Result<(u32, u16, DvaMeta, usize)> {
    let packet = GenevePacket::new_checked(buf)?;
    if packet.version() != 0 || packet.oam() {
        return Err(Error::Unsupported);
    }
    let mut meta = None;
    for opt in packet.options() {
        if opt.class == DVA_OPTION_CLASS && opt.opt_type & !OPTION_CRITICAL == DVA_OPTION_TYPE {
            if meta.is_none() {
                meta = Some(DvaMeta::parse(opt.data)?);
            }
        } else if opt.is_critical() {
            return Err(Error::Unsupported);
        }
    }
    let meta = meta.ok_or(Error::Malformed)?;
    Ok((
        packet.vni(),
        packet.protocol_type(),
        meta,
        packet.header_len(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const META: DvaMeta = DvaMeta {
        epoch: 7,
        bucket: 0x0abc,
        hops: 1,
        flags: dva_flags::PUNTED,
        ingress_if: 2,
        egress_if: 3,
        gso_size: 0,
    };

    // A backplane packet as tshark shows it: VNI 0x000101, IPv4 payload, dva option, then the
    // first 4 bytes of an IPv4 header.
    static DVA_PACKET: [u8; 28] = [
        0x04, 0x00, 0x08, 0x00, 0x00, 0x01, 0x01, 0x00, // ver 0, optlen 4 words, IPv4, VNI
        0xff, 0xda, 0x01, 0x03, // class 0xffda, type 1, 3 words
        0x00, 0x00, 0x00, 0x07, 0x0a, 0xbc, 0x01, 0x01, 0x02, 0x03, 0x00, 0x00, // meta
        0x45, 0x00, 0x00, 0x54,
    ];

    // RFC 8926-style packet with a foreign non-critical option before dva's, Ethernet payload.
    static MIXED: [u8; 36] = [
        0x06, 0x00, 0x65, 0x58, 0x12, 0x34, 0x56, 0x00, // optlen 6 words
        0x01, 0x02, 0x05, 0x01, 0xaa, 0xbb, 0xcc, 0xdd, // class 0x0102 type 5, 1 word
        0xff, 0xda, 0x01, 0x03, 0x00, 0x00, 0x00, 0x07, 0x0a, 0xbc, 0x01, 0x01, 0x02, 0x03, 0x00,
        0x00, // dva option
        0xde, 0xad, 0xbe, 0xef,
    ];

    #[test]
    fn encap_matches_fixture_and_decaps() {
        let mut buf = [0u8; 28];
        buf[24..].copy_from_slice(&DVA_PACKET[24..]);
        assert_eq!(
            encap_dva(&mut buf, 0x101, PROTO_IPV4, &META),
            DVA_HEADER_LEN
        );
        assert_eq!(buf, DVA_PACKET);
        assert_eq!(decap_dva(&buf).unwrap(), (0x101, PROTO_IPV4, META, 24));
    }

    #[test]
    fn view_fields() {
        let p = GenevePacket::new_checked(&DVA_PACKET[..]).unwrap();
        assert_eq!(p.version(), 0);
        assert_eq!(p.opt_len(), 16);
        assert_eq!(p.header_len(), 24);
        assert!(!p.oam() && !p.critical());
        assert_eq!(p.protocol_type(), PROTO_IPV4);
        assert_eq!(p.vni(), 0x101);
        let opts: Vec<_> = p.options().collect();
        assert_eq!(opts.len(), 1);
        assert_eq!(
            (opts[0].class, opts[0].opt_type, opts[0].data.len()),
            (DVA_OPTION_CLASS, DVA_OPTION_TYPE, 12)
        );
        assert!(!opts[0].is_critical());
        assert_eq!(DvaMeta::parse(opts[0].data).unwrap(), META);
        assert_eq!(p.payload(), &[0x45, 0x00, 0x00, 0x54]);
        assert_eq!(
            GeneveRepr::parse(&p).unwrap(),
            GeneveRepr {
                vni: 0x101,
                protocol_type: PROTO_IPV4,
                options_len: 16
            }
        );
    }

    #[test]
    fn repr_and_option_emit_round_trip() {
        let p = GenevePacket::new_checked(&MIXED[..]).unwrap();
        let r = GeneveRepr::parse(&p).unwrap();
        assert_eq!(
            r,
            GeneveRepr {
                vni: 0x123456,
                protocol_type: PROTO_ETHERNET,
                options_len: 24
            }
        );
        let mut out = [0u8; 36];
        r.emit(&mut GenevePacket::new_unchecked(&mut out[..]));
        let mut at = HEADER_LEN;
        for opt in p.options() {
            at += opt.emit(&mut out[at..]).unwrap();
        }
        assert_eq!(at, r.header_len());
        out[at..].copy_from_slice(p.payload());
        assert_eq!(out, MIXED);
        assert_eq!(
            decap_dva(&MIXED).unwrap(),
            (0x123456, PROTO_ETHERNET, META, 32)
        );
    }

    #[test]
    fn option_emit_rejects_bad_lengths() {
        let mut buf = [0u8; 200];
        assert_eq!(
            GeneveOption {
                class: 1,
                opt_type: 1,
                data: &[1, 2, 3]
            }
            .emit(&mut buf),
            Err(Error::Malformed)
        );
        assert_eq!(
            GeneveOption {
                class: 1,
                opt_type: 1,
                data: &[0; 128]
            }
            .emit(&mut buf),
            Err(Error::Unsupported)
        );
        assert_eq!(
            GeneveOption {
                class: 1,
                opt_type: 1,
                data: &[0; 8]
            }
            .emit(&mut buf[..11]),
            Err(Error::Truncated)
        );
    }

    #[test]
    fn decap_rejects() {
        // Too short for the base header, for the options area.
        assert_eq!(decap_dva(&DVA_PACKET[..7]), Err(Error::Truncated));
        assert_eq!(decap_dva(&DVA_PACKET[..23]), Err(Error::Truncated));
        // Version 1.
        let mut v = DVA_PACKET;
        v[0] |= 0x40;
        assert_eq!(decap_dva(&v), Err(Error::Unsupported));
        // OAM.
        let mut v = DVA_PACKET;
        v[1] = 0x80;
        assert_eq!(decap_dva(&v), Err(Error::Unsupported));
        // An option whose length overruns the options area.
        let mut v = DVA_PACKET;
        v[11] = 4;
        assert_eq!(GenevePacket::new_checked(&v[..]), Err(Error::Malformed));
        assert_eq!(decap_dva(&v), Err(Error::Malformed));
        // Options area with a 2-byte tail.
        let mut v = DVA_PACKET;
        v[0] = 0x05;
        v[11] = 2;
        assert_eq!(decap_dva(&v), Err(Error::Malformed));
        // No dva option at all.
        let mut v = DVA_PACKET;
        v[8] = 0x00;
        assert_eq!(decap_dva(&v), Err(Error::Malformed));
        // Unknown critical option.
        let mut v = MIXED;
        v[10] = 0x85;
        assert_eq!(decap_dva(&v), Err(Error::Unsupported));
        // dva option with the wrong length.
        let mut v = DVA_PACKET;
        v[11] = 2;
        assert_eq!(decap_dva(&v), Err(Error::Malformed));
        // No options at all.
        let v = [0u8, 0, 8, 0, 0, 0, 1, 0];
        assert_eq!(decap_dva(&v), Err(Error::Malformed));
    }

    #[test]
    fn our_option_with_critical_bit_is_still_ours() {
        let mut v = DVA_PACKET;
        v[10] |= OPTION_CRITICAL;
        v[1] = 0x40;
        assert_eq!(decap_dva(&v).unwrap().2, META);
    }

    #[test]
    fn gso_size_and_offload_flags_round_trip() {
        let m = DvaMeta {
            gso_size: 1448,
            flags: dva_flags::CSUM_PARTIAL | dva_flags::FROM_DATAPLANE,
            ..META
        };
        let mut data = [0u8; DVA_OPTION_DATA_LEN];
        m.emit(&mut data);
        assert_eq!(data[10..12], 1448u16.to_be_bytes());
        assert_eq!(DvaMeta::parse(&data), Ok(m));
    }

    #[test]
    fn vni_is_24_bits_and_reserved_zero() {
        let mut buf = [0xffu8; DVA_HEADER_LEN];
        encap_dva(&mut buf, 0xffab_cdef, PROTO_IPV6, &DvaMeta::default());
        assert_eq!(&buf[4..8], &[0xab, 0xcd, 0xef, 0x00]);
        assert_eq!(&buf[22..24], &[0, 0]);
        let (vni, proto, meta, off) = decap_dva(&buf).unwrap();
        assert_eq!(
            (vni, proto, meta, off),
            (0xabcdef, PROTO_IPV6, DvaMeta::default(), 24)
        );
    }

    #[test]
    fn setters() {
        let mut buf = [0u8; 12];
        let mut p = GenevePacket::new_unchecked(&mut buf[..]);
        p.set_version(0);
        p.set_opt_len(4);
        p.set_oam(true);
        p.set_critical(true);
        p.set_protocol_type(PROTO_IPV6);
        p.set_vni(42);
        p.options_mut().copy_from_slice(&[0, 1, 2, 0]);
        assert!(p.payload_mut().is_empty());
        assert!(p.oam() && p.critical());
        p.set_oam(false);
        p.set_critical(false);
        assert!(!p.oam() && !p.critical());
        assert_eq!(buf, [1, 0, 0x86, 0xdd, 0, 0, 42, 0, 0, 1, 2, 0]);
        assert_eq!(DvaMeta::parse(&[0; 11]), Err(Error::Malformed));
    }
}
