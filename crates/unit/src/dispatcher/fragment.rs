//! IP fragments at the dispatcher: reassembly before a flow is hashed, IPv4 fragmentation on the
//! way out (sans-IO: the caller passes `now` and the bytes; nothing here reads a clock).
//!
//! A non-first fragment carries no ports, so it cannot be hashed to its flow's bucket, and the
//! data plane's firewall and NAT need the whole transport header: the dispatcher hands the data
//! plane whole datagrams only, as the kernel's `nf_defrag` does for netfilter.
//!
//! Rules (the kernel's `ip_defrag`/`ipv6_frag_rcv`, RFC 5722, RFC 1858/3128, RFC 7112):
//! - a fragment wholly inside one already held is a duplicate: it is dropped, the datagram kept;
//!   any other overlap drops the whole datagram (RFC 5722; Linux does the same for IPv4 since
//!   FragmentSmack);
//! - a first fragment that does not hold the whole TCP/UDP/ICMP header is dropped, and so is a
//!   TCP fragment at offset 8 (it could rewrite the flags of the first);
//! - a datagram is held at most [`TIMEOUT`], with at most [`MAX_FRAGMENTS`] fragments, and all
//!   of them together at most [`MEMORY_LIMIT`] bytes (a fragment far out counts its offset) in
//!   at most [`MAX_DATAGRAMS`] datagrams; a reassembled datagram is at most 64 KB.
//! - a reassembled IPv4 datagram leaves without DF: it may be fragmented again on the way out.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use dva_wire::ip_proto;
use dva_wire::Ipv4Packet;

/// How long an incomplete datagram is held (Linux: ipfrag_time, 30 s; a fragment later than a
/// few seconds is lost anyway and only holds memory).
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// Fragments per datagram: 64 KB in 1280-byte fragments is 52.
pub const MAX_FRAGMENTS: usize = 64;
/// Bytes of reassembly buffers over all datagrams, each as large as its highest fragment end
/// (Linux: ipfrag_high_thresh, 4 MB).
pub const MEMORY_LIMIT: usize = 4 << 20;
/// Incomplete datagrams held at once.
pub const MAX_DATAGRAMS: usize = 4096;
/// Largest IP datagram reassembled (IPv4 total length; IPv6 payload length without jumbograms).
pub const MAX_DATAGRAM: usize = 65_535;

const IPV6_HEADER: usize = 40;

/// Why a fragment (or its whole datagram) was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FragDrop {
    /// Offsets or lengths that cannot be: a non-last fragment not a multiple of 8 bytes, two
    /// different ends, data past the end, an empty fragment, a broken header chain.
    Malformed,
    /// A first fragment without the whole transport header, or TCP at offset 8.
    Tiny,
    /// Overlapping fragments: the whole datagram is dropped.
    Overlap,
    /// A fragment wholly inside one already held (the datagram is kept).
    Duplicate,
    /// More than [`MAX_FRAGMENTS`] fragments: the datagram is dropped.
    TooMany,
    /// Reassembled, it would exceed [`MAX_DATAGRAM`]: the datagram is dropped.
    TooBig,
    /// [`MEMORY_LIMIT`] reached: a fragment of a new datagram is refused.
    MemoryFull,
}

impl FragDrop {
    /// The counter name of each reason.
    pub fn name(self) -> &'static str {
        match self {
            FragDrop::Malformed => "fragment-malformed",
            FragDrop::Tiny => "fragment-tiny",
            FragDrop::Overlap => "fragment-overlap",
            FragDrop::Duplicate => "fragment-duplicate",
            FragDrop::TooMany => "fragment-too-many",
            FragDrop::TooBig => "fragment-too-big",
            FragDrop::MemoryFull => "fragment-memory-full",
        }
    }
}

/// What a fragment was found to be in a buffer (one parse, read by every later step).
struct Fragment<'a> {
    key: Key,
    /// IPv4: the header with options; IPv6: the unfragmentable part (no fragment header).
    header: &'a [u8],
    /// IPv6: where in `header` the next-header byte that named the fragment header is.
    next_header_at: usize,
    /// The protocol after the fragment header (IPv4: the header's protocol).
    proto: u8,
    offset: usize,
    more: bool,
    payload: &'a [u8],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    src: IpAddr,
    dst: IpAddr,
    /// IPv4 keys on the protocol too (RFC 791); IPv6 on addresses and identification.
    proto: u8,
    id: u32,
}

struct Datagram {
    since: Instant,
    /// The first fragment's header (see [`Fragment::header`]) and next-header position.
    header: Option<(Vec<u8>, usize)>,
    proto: u8,
    /// Byte ranges of the fragmentable part held, unordered.
    held: Vec<(usize, usize)>,
    data: Vec<u8>,
    /// Length of the fragmentable part, once the last fragment came.
    end: Option<usize>,
}

impl Datagram {
    fn complete(&self) -> bool {
        let (Some(end), Some(_)) = (self.end, &self.header) else {
            return false;
        };
        let mut ranges = self.held.clone();
        ranges.sort_unstable();
        let mut covered = 0;
        for (s, e) in ranges {
            if s > covered {
                return false;
            }
            covered = covered.max(e);
        }
        covered == end
    }
}

/// What [`Reassembler::insert`] made of a fragment.
#[derive(Debug, PartialEq, Eq)]
pub enum Reassembled {
    /// Held until the rest arrives.
    Held,
    /// The last missing piece: the whole datagram, headers fixed up.
    Complete(Vec<u8>),
}

/// Incomplete datagrams, bounded in count of fragments, bytes and time.
#[derive(Default)]
pub struct Reassembler {
    pending: HashMap<Key, Datagram>,
    bytes: usize,
}

impl Reassembler {
    /// Whether `ip` (a whole, valid IPv4 or IPv6 packet) is a fragment this table should take.
    pub fn is_fragment(ip: &[u8]) -> bool {
        match ip.first().map(|b| b >> 4) {
            Some(4) => ip.len() >= 8 && u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0,
            Some(6) => matches!(v6_fragment_header(ip), Ok(Some(_))),
            _ => false,
        }
    }

    /// Datagrams held.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Take one fragment (`ip` is the whole packet, trimmed to its IP length).
    pub fn insert(&mut self, ip: &[u8], now: Instant) -> Result<Reassembled, FragDrop> {
        let f = match ip.first().map(|b| b >> 4) {
            Some(4) => parse_v4(ip)?,
            Some(6) => parse_v6(ip)?,
            _ => return Err(FragDrop::Malformed),
        };
        check_tiny(&f)?;
        let end = f.offset + f.payload.len();
        // IPv6: the payload length counts extension headers, the kept fragment header too.
        let fixed = if f.key.src.is_ipv6() {
            IPV6_HEADER - 8
        } else {
            0
        };
        if f.header.len() + end > MAX_DATAGRAM + fixed {
            self.remove(&f.key);
            return Err(FragDrop::TooBig);
        }
        if f.offset == 0 && !f.more {
            // An atomic fragment (RFC 6946): a whole datagram already.
            return Ok(Reassembled::Complete(build(
                f.header,
                f.next_header_at,
                f.proto,
                f.key.id,
                f.payload,
            )));
        }
        if !self.pending.contains_key(&f.key) {
            if self.pending.len() >= MAX_DATAGRAMS || self.bytes + end > MEMORY_LIMIT {
                return Err(FragDrop::MemoryFull);
            }
            self.pending.insert(
                f.key,
                Datagram {
                    since: now,
                    header: None,
                    proto: f.proto,
                    held: Vec::new(),
                    data: Vec::new(),
                    end: None,
                },
            );
        }
        let verdict = {
            let Some(d) = self.pending.get_mut(&f.key) else {
                return Err(FragDrop::Malformed);
            };
            admit(d, &f, end)
        };
        match verdict {
            Err(FragDrop::Duplicate) => return Err(FragDrop::Duplicate),
            Err(e) => {
                self.remove(&f.key);
                return Err(e);
            }
            Ok(()) => {}
        }
        let Some(d) = self.pending.get_mut(&f.key) else {
            return Err(FragDrop::Malformed);
        };
        // The buffer grows to the highest end seen: that is what the datagram holds.
        let grow = end.saturating_sub(d.data.len());
        if self.bytes + grow > MEMORY_LIMIT {
            self.remove(&f.key);
            return Err(FragDrop::MemoryFull);
        }
        self.bytes += grow;
        if d.data.len() < end {
            d.data.resize(end, 0);
        }
        d.data[f.offset..end].copy_from_slice(f.payload);
        d.held.push((f.offset, end));
        if f.offset == 0 {
            d.header = Some((f.header.to_vec(), f.next_header_at));
        }
        if !f.more {
            d.end = Some(end);
        }
        if !d.complete() {
            return Ok(Reassembled::Held);
        }
        let key = f.key;
        let Some(d) = self.remove(&key) else {
            return Err(FragDrop::Malformed);
        };
        let Some((header, at)) = &d.header else {
            return Err(FragDrop::Malformed);
        };
        Ok(Reassembled::Complete(build(
            header, *at, d.proto, key.id, &d.data,
        )))
    }

    /// Forget datagrams older than [`TIMEOUT`]; returns how many were given up.
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.pending.len();
        let mut freed = 0;
        self.pending.retain(|_, d| {
            let keep = now.duration_since(d.since) < TIMEOUT;
            if !keep {
                freed += d.data.len();
            }
            keep
        });
        self.bytes -= freed.min(self.bytes);
        before - self.pending.len()
    }

    fn remove(&mut self, key: &Key) -> Option<Datagram> {
        let d = self.pending.remove(key)?;
        self.bytes -= d.data.len().min(self.bytes);
        Some(d)
    }
}

/// Whether fragment `f` (ending at `end`) fits datagram `d`: `Duplicate` keeps the datagram,
/// any other error drops it.
fn admit(d: &Datagram, f: &Fragment, end: usize) -> Result<(), FragDrop> {
    for &(s, e) in &d.held {
        if f.offset >= s && end <= e {
            return Err(FragDrop::Duplicate);
        }
        if f.offset < e && end > s {
            return Err(FragDrop::Overlap);
        }
    }
    match (d.end, f.more) {
        (Some(known), false) if known != end => return Err(FragDrop::Malformed),
        (Some(known), true) if end > known => return Err(FragDrop::Malformed),
        (None, false) if d.held.iter().any(|&(_, e)| e > end) => return Err(FragDrop::Malformed),
        _ => {}
    }
    if d.proto != f.proto && f.offset == 0 {
        return Err(FragDrop::Malformed);
    }
    if d.held.len() >= MAX_FRAGMENTS {
        return Err(FragDrop::TooMany);
    }
    Ok(())
}

/// RFC 1858/3128 (and RFC 7112 for IPv6): the first fragment holds the whole transport header,
/// and no TCP fragment starts at offset 8, inside the header.
fn check_tiny(f: &Fragment) -> Result<(), FragDrop> {
    let need = match f.proto {
        ip_proto::TCP => match f.payload.get(12) {
            Some(b) => usize::from(b >> 4).max(5) * 4,
            None => 20,
        },
        ip_proto::UDP | ip_proto::ICMP | ip_proto::ICMPV6 => 8,
        _ => 0,
    };
    if f.offset == 0 && f.payload.len() < need {
        return Err(FragDrop::Tiny);
    }
    if f.offset == 8 && f.proto == ip_proto::TCP {
        return Err(FragDrop::Tiny);
    }
    Ok(())
}

fn parse_v4(ip: &[u8]) -> Result<Fragment<'_>, FragDrop> {
    let p = Ipv4Packet::new_checked(ip).map_err(|_| FragDrop::Malformed)?;
    let hl = usize::from(p.header_len());
    let total = usize::from(p.total_len());
    let payload = &ip[hl..total];
    let more = p.more_frags();
    if payload.is_empty() || (more && !payload.len().is_multiple_of(8)) {
        return Err(FragDrop::Malformed);
    }
    Ok(Fragment {
        key: Key {
            src: IpAddr::V4(p.src_addr()),
            dst: IpAddr::V4(p.dst_addr()),
            proto: p.next_header(),
            id: u32::from(p.ident()),
        },
        header: &ip[..hl],
        next_header_at: 9,
        proto: p.next_header(),
        offset: usize::from(p.frag_offset()),
        more,
        payload,
    })
}

/// The IPv6 fragment header: (its offset, where the next-header byte naming it is).
fn v6_fragment_header(ip: &[u8]) -> Result<Option<(usize, usize)>, FragDrop> {
    if ip.len() < IPV6_HEADER {
        return Err(FragDrop::Malformed);
    }
    let limit = ip.len();
    let (mut next, mut at, mut off) = (ip[6], 6, IPV6_HEADER);
    for _ in 0..dva_wire::ipv6::MAX_EXTENSION_HEADERS {
        match next {
            // Hop-by-hop, routing, destination options: the unfragmentable part.
            0 | 43 | 60 => {
                let len = (usize::from(*ip.get(off + 1).ok_or(FragDrop::Malformed)?) + 1) * 8;
                if off + len > limit {
                    return Err(FragDrop::Malformed);
                }
                next = ip[off];
                at = off;
                off += len;
            }
            ip_proto::FRAGMENT => {
                return if off + 8 <= limit {
                    Ok(Some((off, at)))
                } else {
                    Err(FragDrop::Malformed)
                }
            }
            _ => return Ok(None),
        }
    }
    Ok(None)
}

fn parse_v6(ip: &[u8]) -> Result<Fragment<'_>, FragDrop> {
    let Some((off, at)) = v6_fragment_header(ip)? else {
        return Err(FragDrop::Malformed);
    };
    let src: [u8; 16] = ip[8..24].try_into().map_err(|_| FragDrop::Malformed)?;
    let dst: [u8; 16] = ip[24..40].try_into().map_err(|_| FragDrop::Malformed)?;
    let off_flags = u16::from_be_bytes([ip[off + 2], ip[off + 3]]);
    let more = off_flags & 1 != 0;
    let payload = &ip[off + 8..];
    if payload.is_empty() || (more && !payload.len().is_multiple_of(8)) {
        return Err(FragDrop::Malformed);
    }
    Ok(Fragment {
        key: Key {
            src: IpAddr::V6(Ipv6Addr::from(src)),
            dst: IpAddr::V6(Ipv6Addr::from(dst)),
            proto: 0,
            id: u32::from_be_bytes([ip[off + 4], ip[off + 5], ip[off + 6], ip[off + 7]]),
        },
        header: &ip[..off],
        next_header_at: at,
        proto: ip[off],
        offset: usize::from(off_flags & !7),
        more,
        payload,
    })
}

/// The whole datagram from the first fragment's header and the fragmentable part. IPv6 keeps
/// an atomic fragment header (offset 0, no more fragments, RFC 6946) with the datagram's
/// identification: every stage reads past it, and on the way out it says that the sender let
/// this datagram be fragmented (see [`egress_v6`]).
fn build(header: &[u8], next_header_at: usize, proto: u8, id: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(header.len() + 8 + data.len());
    out.extend_from_slice(header);
    if out[0] >> 4 == 6 {
        out[next_header_at] = ip_proto::FRAGMENT;
        out.extend_from_slice(&[proto, 0, 0, 0]);
        out.extend_from_slice(&id.to_be_bytes());
    }
    out.extend_from_slice(data);
    if out[0] >> 4 == 4 {
        let total = out.len() as u16;
        let mut p = Ipv4Packet::new_unchecked(&mut out[..]);
        p.set_total_len(total);
        p.set_more_frags(false);
        p.set_frag_offset(0);
        // The sender let it be fragmented: so may we, to another MTU (the kernel keeps DF
        // and compares the largest fragment with the MTU; that size does not survive the
        // trip through the data plane).
        p.set_dont_frag(false);
        p.fill_checksum();
    } else {
        let payload = (out.len() - IPV6_HEADER) as u16;
        out[4..6].copy_from_slice(&payload.to_be_bytes());
    }
    out
}

/// A reassembled IPv6 datagram (one with an atomic fragment header) on its way out of a link
/// of `mtu`: pushed to `out` without that header if it fits, else cut into fragments that do
/// (the sender fragmented it already: the kernel does the same after conntrack reassembled it,
/// where the original fragments fit). `None`: no atomic fragment header (an ordinary packet),
/// or an MTU too small for the unfragmentable part and 8 bytes.
pub fn egress_v6(ip: &[u8], mtu: usize, out: &mut Vec<Vec<u8>>) -> Option<()> {
    // Most packets carry no extension header: decided on one byte.
    if !matches!(ip.get(6), Some(0 | 43 | 44 | 60)) {
        return None;
    }
    let (off, at) = v6_fragment_header(ip).ok()??;
    let off_flags = u16::from_be_bytes([ip[off + 2], ip[off + 3]]);
    if off_flags & !6 != 0 {
        return None; // a real fragment, not the marker
    }
    let data = &ip[off + 8..];
    let unfrag = &ip[..off];
    if unfrag.len() + data.len() <= mtu {
        let mut p = Vec::with_capacity(unfrag.len() + data.len());
        p.extend_from_slice(unfrag);
        p.extend_from_slice(data);
        p[at] = ip[off];
        let len = (p.len() - IPV6_HEADER) as u16;
        p[4..6].copy_from_slice(&len.to_be_bytes());
        out.push(p);
        return Some(());
    }
    let room = mtu.checked_sub(off + 8)? & !7;
    if room == 0 {
        return None;
    }
    let mut at_data = 0;
    while at_data < data.len() {
        let n = room.min(data.len() - at_data);
        let more = at_data + n < data.len();
        let mut p = Vec::with_capacity(off + 8 + n);
        p.extend_from_slice(&ip[..off + 8]);
        let of = (at_data as u16) | u16::from(more);
        p[off + 2..off + 4].copy_from_slice(&of.to_be_bytes());
        p.extend_from_slice(&data[at_data..at_data + n]);
        let len = (p.len() - IPV6_HEADER) as u16;
        p[4..6].copy_from_slice(&len.to_be_bytes());
        out.push(p);
        at_data += n;
    }
    Some(())
}

/// Cut IPv4 datagram `ip` into fragments of at most `mtu` bytes, each a whole IP packet pushed
/// to `out`. Options without the copy flag go in the first fragment only (RFC 791). `None`: not
/// a valid IPv4 packet, or an MTU too small for its header and 8 bytes.
pub fn fragment_v4(ip: &[u8], mtu: usize, out: &mut Vec<Vec<u8>>) -> Option<()> {
    let p = Ipv4Packet::new_checked(ip).ok()?;
    let hl = usize::from(p.header_len());
    let total = usize::from(p.total_len());
    let base = usize::from(p.frag_offset());
    let last_more = p.more_frags();
    let copied = copied_options(&ip[20..hl]);
    let payload = &ip[hl..total];
    let mut at = 0;
    while at < payload.len() {
        let header = if at == 0 { &ip[..hl] } else { &ip[..20] };
        let opts: &[u8] = if at == 0 { &[] } else { &copied };
        let h = header.len() + opts.len();
        let room = mtu.checked_sub(h)? & !7;
        if room == 0 {
            return None;
        }
        let n = room.min(payload.len() - at);
        let more = at + n < payload.len() || last_more;
        let mut f = Vec::with_capacity(h + n);
        f.extend_from_slice(header);
        f.extend_from_slice(opts);
        f.extend_from_slice(&payload[at..at + n]);
        let mut q = Ipv4Packet::new_unchecked(&mut f[..]);
        q.set_header_len(h as u8);
        q.set_total_len((h + n) as u16);
        q.set_more_frags(more);
        q.set_frag_offset((base + at) as u16);
        q.fill_checksum();
        out.push(f);
        at += n;
    }
    Some(())
}

/// The options a non-first fragment repeats (copy flag set), padded to a multiple of 4.
fn copied_options(opts: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => break,
            1 => i += 1,
            t => {
                let len = usize::from(*opts.get(i + 1).unwrap_or(&0));
                if len < 2 || i + len > opts.len() {
                    break;
                }
                if t & 0x80 != 0 {
                    out.extend_from_slice(&opts[i..i + len]);
                }
                i += len;
            }
        }
    }
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 UDP datagram 10.0.0.1:1000 -> 10.0.0.2:53 with `len` payload bytes.
    fn udp_v4(len: usize, id: u16) -> Vec<u8> {
        let total = 20 + 8 + len;
        let mut ip = vec![0u8; total];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&id.to_be_bytes());
        ip[8] = 64;
        ip[9] = ip_proto::UDP;
        ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
        ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
        ip[20..22].copy_from_slice(&1000u16.to_be_bytes());
        ip[22..24].copy_from_slice(&53u16.to_be_bytes());
        ip[24..26].copy_from_slice(&((8 + len) as u16).to_be_bytes());
        for (i, b) in ip[28..].iter_mut().enumerate() {
            *b = i as u8;
        }
        Ipv4Packet::new_unchecked(&mut ip[..]).fill_checksum();
        ip
    }

    /// One IPv4 fragment of `whole` holding payload bytes `from..to`.
    fn piece_v4(whole: &[u8], from: usize, to: usize, more: bool) -> Vec<u8> {
        let mut f = whole[..20].to_vec();
        f.extend_from_slice(&whole[20 + from..20 + to]);
        let mut p = Ipv4Packet::new_unchecked(&mut f[..]);
        p.set_total_len((20 + to - from) as u16);
        p.set_more_frags(more);
        p.set_frag_offset(from as u16);
        p.fill_checksum();
        f
    }

    /// An IPv6 UDP datagram with `len` payload bytes, cut at fragmentable offsets `cuts`.
    fn udp_v6_pieces(len: usize, cuts: &[(usize, usize, bool)]) -> (Vec<u8>, Vec<Vec<u8>>) {
        let mut whole = vec![0u8; 40 + 8 + len];
        whole[0] = 0x60;
        whole[4..6].copy_from_slice(&((8 + len) as u16).to_be_bytes());
        whole[6] = ip_proto::UDP;
        whole[7] = 64;
        whole[23] = 1;
        whole[39] = 2;
        whole[40..42].copy_from_slice(&1000u16.to_be_bytes());
        whole[42..44].copy_from_slice(&53u16.to_be_bytes());
        for (i, b) in whole[48..].iter_mut().enumerate() {
            *b = i as u8;
        }
        let pieces = cuts
            .iter()
            .map(|&(from, to, more)| {
                let mut f = whole[..40].to_vec();
                f[6] = ip_proto::FRAGMENT;
                let off_flags = (from as u16) | u16::from(more);
                f.extend_from_slice(&[ip_proto::UDP, 0]);
                f.extend_from_slice(&off_flags.to_be_bytes());
                f.extend_from_slice(&0x1234_5678u32.to_be_bytes());
                f.extend_from_slice(&whole[40 + from..40 + to]);
                let pl = (f.len() - 40) as u16;
                f[4..6].copy_from_slice(&pl.to_be_bytes());
                f
            })
            .collect();
        (whole, pieces)
    }

    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn reassembles_v4_out_of_order() {
        let whole = udp_v4(3000, 7);
        let now = t0();
        let mut r = Reassembler::default();
        let a = piece_v4(&whole, 0, 1480, true);
        let b = piece_v4(&whole, 1480, 2960, true);
        let c = piece_v4(&whole, 2960, 3008, false);
        assert!(Reassembler::is_fragment(&a) && Reassembler::is_fragment(&c));
        assert!(!Reassembler::is_fragment(&whole));
        assert_eq!(r.insert(&c, now), Ok(Reassembled::Held));
        assert_eq!(r.insert(&a, now), Ok(Reassembled::Held));
        assert_eq!(r.insert(&b, now), Ok(Reassembled::Complete(whole)));
        assert!(r.is_empty());
        assert_eq!(r.bytes, 0);
    }

    #[test]
    fn fragment_then_reassemble_round_trips() {
        let whole = udp_v4(4000, 9);
        let mut out = Vec::new();
        fragment_v4(&whole, 1400, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|f| f.len() <= 1400));
        assert!(out
            .iter()
            .all(|f| Ipv4Packet::new_checked(&f[..]).unwrap().verify_checksum()));
        let mut r = Reassembler::default();
        let now = t0();
        let mut done = None;
        for f in out.iter().rev() {
            if let Ok(Reassembled::Complete(d)) = r.insert(f, now) {
                done = Some(d);
            }
        }
        assert_eq!(done, Some(whole));
    }

    #[test]
    fn fragmenting_keeps_only_copied_options() {
        let mut whole = udp_v4(100, 1);
        // Record route (not copied), then a copied option (0x94: router alert, 4 bytes).
        let opts = [7u8, 3, 4, 0x94, 4, 0, 0, 0];
        whole.splice(20..20, opts);
        whole[0] = 0x47;
        let total = whole.len() as u16;
        whole[2..4].copy_from_slice(&total.to_be_bytes());
        let mut out = Vec::new();
        fragment_v4(&whole, 28 + 64, &mut out).unwrap();
        assert_eq!(out[0][0], 0x47);
        assert_eq!(out[1][0], 0x46);
        assert_eq!(&out[1][20..24], &[0x94, 4, 0, 0]);
    }

    #[test]
    fn overlap_drops_the_whole_datagram() {
        let whole = udp_v4(3000, 7);
        let now = t0();
        let mut r = Reassembler::default();
        r.insert(&piece_v4(&whole, 0, 1480, true), now).unwrap();
        let overlapping = piece_v4(&whole, 1472, 2960, true);
        assert_eq!(r.insert(&overlapping, now), Err(FragDrop::Overlap));
        assert!(r.is_empty());
        // The rest alone completes nothing.
        r.insert(&piece_v4(&whole, 1480, 2960, true), now).unwrap();
        r.insert(&piece_v4(&whole, 2960, 3008, false), now).unwrap();
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn duplicate_is_dropped_datagram_kept() {
        let whole = udp_v4(3000, 7);
        let now = t0();
        let mut r = Reassembler::default();
        let a = piece_v4(&whole, 0, 1480, true);
        r.insert(&a, now).unwrap();
        assert_eq!(r.insert(&a, now), Err(FragDrop::Duplicate));
        r.insert(&piece_v4(&whole, 1480, 3008, false), now)
            .map(|x| assert_eq!(x, Reassembled::Complete(whole.clone())))
            .unwrap();
    }

    #[test]
    fn tiny_first_fragment_and_tcp_offset_8_are_dropped() {
        let mut r = Reassembler::default();
        let now = t0();
        // TCP with a 16-byte first fragment: the header is 20.
        let mut tcp = udp_v4(100, 4);
        tcp[9] = ip_proto::TCP;
        assert_eq!(
            r.insert(&piece_v4(&tcp, 0, 16, true), now),
            Err(FragDrop::Tiny)
        );
        assert_eq!(
            r.insert(&piece_v4(&tcp, 8, 108, false), now),
            Err(FragDrop::Tiny)
        );
        // UDP: 8 bytes are the whole header.
        let udp = udp_v4(100, 3);
        assert_eq!(
            r.insert(&piece_v4(&udp, 0, 8, true), now),
            Ok(Reassembled::Held)
        );
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn bounds_fragments_time_and_size() {
        let now = t0();
        let mut r = Reassembler::default();
        let whole = udp_v4(8 * 80, 5);
        for k in 0..MAX_FRAGMENTS {
            r.insert(&piece_v4(&whole, 8 * k + 8, 8 * k + 16, true), now)
                .unwrap();
        }
        assert_eq!(
            r.insert(&piece_v4(&whole, 8 * 70, 8 * 71, true), now),
            Err(FragDrop::TooMany)
        );
        assert!(r.is_empty());
        r.insert(&piece_v4(&whole, 8, 16, true), now).unwrap();
        assert_eq!(r.expire(now + TIMEOUT / 2), 0);
        assert_eq!(r.expire(now + TIMEOUT), 1);
        assert_eq!(r.bytes, 0);
        // Past 64 KB.
        let mut far = piece_v4(&whole, 8, 16, true);
        Ipv4Packet::new_unchecked(&mut far[..]).set_frag_offset(65_528);
        Ipv4Packet::new_unchecked(&mut far[..]).fill_checksum();
        assert_eq!(r.insert(&far, now), Err(FragDrop::TooBig));
    }

    #[test]
    fn memory_counts_the_buffer_not_the_fragment() {
        let now = t0();
        let mut r = Reassembler::default();
        let whole = udp_v4(64, 1);
        // 8 bytes at offset 60000 hold a 60 KB buffer: 70 of them pass the limit.
        let mut refused = 0;
        for id in 0..100u16 {
            let mut far = piece_v4(&whole, 8, 16, true);
            let mut p = Ipv4Packet::new_unchecked(&mut far[..]);
            p.set_ident(id);
            p.set_frag_offset(60_000);
            p.fill_checksum();
            if r.insert(&far, now) == Err(FragDrop::MemoryFull) {
                refused += 1;
            }
        }
        assert!(
            r.bytes <= MEMORY_LIMIT && refused > 0,
            "{} {refused}",
            r.bytes
        );
        assert_eq!(r.len(), MEMORY_LIMIT / 60_008);
        r.expire(now + TIMEOUT);
        assert_eq!((r.len(), r.bytes), (0, 0));
    }

    #[test]
    fn inconsistent_ends_are_malformed() {
        let whole = udp_v4(3000, 7);
        let now = t0();
        let mut r = Reassembler::default();
        r.insert(&piece_v4(&whole, 1480, 2960, false), now).unwrap();
        assert_eq!(
            r.insert(&piece_v4(&whole, 2960, 3008, false), now),
            Err(FragDrop::Malformed)
        );
        assert!(r.is_empty());
    }

    #[test]
    fn reassembles_v6_and_removes_the_fragment_header() {
        let (whole, pieces) = udp_v6_pieces(2000, &[(0, 1232, true), (1232, 2008, false)]);
        let now = t0();
        let mut r = Reassembler::default();
        assert!(Reassembler::is_fragment(&pieces[0]));
        assert!(!Reassembler::is_fragment(&whole));
        assert_eq!(r.insert(&pieces[1], now), Ok(Reassembled::Held));
        let Ok(Reassembled::Complete(d)) = r.insert(&pieces[0], now) else {
            panic!("not reassembled");
        };
        // The atomic fragment header stays until the way out, where it goes...
        assert_eq!(d.len(), whole.len() + 8);
        let mut out = Vec::new();
        egress_v6(&d, 9000, &mut out).unwrap();
        assert_eq!(out, vec![whole.clone()]);
        // ...or the datagram is cut again to a smaller link, and reassembles the same.
        out.clear();
        egress_v6(&d, 1280, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|p| p.len() <= 1280));
        let mut again = Reassembler::default();
        again.insert(&out[0], now).unwrap();
        assert_eq!(again.insert(&out[1], now), Ok(Reassembled::Complete(d)));
        // An ordinary packet is not touched.
        assert_eq!(egress_v6(&whole, 1280, &mut out), None);
    }

    #[test]
    fn v6_overlap_and_atomic() {
        let (_, pieces) = udp_v6_pieces(2000, &[(0, 1232, true), (1224, 2008, false)]);
        let now = t0();
        let mut r = Reassembler::default();
        r.insert(&pieces[0], now).unwrap();
        assert_eq!(r.insert(&pieces[1], now), Err(FragDrop::Overlap));
        assert!(r.is_empty());
        let (whole, atomic) = udp_v6_pieces(16, &[(0, 24, false)]);
        let Ok(Reassembled::Complete(d)) = r.insert(&atomic[0], now) else {
            panic!("an atomic fragment is whole");
        };
        assert_eq!(d, atomic[0]);
        let mut out = Vec::new();
        egress_v6(&d, 1500, &mut out).unwrap();
        assert_eq!(out, vec![whole]);
    }
}
