//! Harnesses shared by the stable-toolchain smoke tests (`tests/hostile_fragments.rs`) and the
//! cargo-fuzz targets (`fuzz/fuzz_targets/fragments.rs`): hostile input turned into operations on
//! the dispatcher's sans-IO parts, with the properties each must keep checked after every step.

use std::time::{Duration, Instant};

use dva_unit::dispatcher::fragment::{self, Reassembled, Reassembler};
use dva_wire::Ipv4Packet;

/// What one input reached, so a smoke test can prove it got past the parsers.
#[derive(Debug, Default, Clone, Copy)]
pub struct Reached {
    pub fragments: usize,
    pub dropped: usize,
    pub complete: usize,
    /// Completed datagrams too long for the egress link, cut again and reassembled.
    pub refragmented: usize,
}

impl std::ops::AddAssign for Reached {
    fn add_assign(&mut self, o: Reached) {
        self.fragments += o.fragments;
        self.dropped += o.dropped;
        self.complete += o.complete;
        self.refragmented += o.refragmented;
    }
}

/// Byte `at` of the fragmentable part of datagram `id`: every fragment of one datagram carries
/// the same bytes wherever it starts, so a reassembled datagram can be checked byte for byte
/// (overlaps that are not duplicates drop the datagram, so nothing else may come out).
fn pattern(id: u32, at: usize) -> u8 {
    (at as u8).wrapping_mul(31) ^ (id as u8) ^ ((at >> 8) as u8)
}

const PROTOS_V4: [u8; 4] = [6, 17, 1, 47];
const PROTOS_V6: [u8; 4] = [6, 17, 58, 47];

fn v4_fragment(src: u8, id: u16, proto: u8, units: u16, more: bool, data: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
    p[4..6].copy_from_slice(&id.to_be_bytes());
    let flags = (units & 0x1fff) | if more { 0x2000 } else { 0 };
    p[6..8].copy_from_slice(&flags.to_be_bytes());
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&[198, 18, 1, src]);
    p[16..20].copy_from_slice(&[198, 18, 2, 2]);
    p.extend_from_slice(data);
    Ipv4Packet::new_unchecked(&mut p[..]).fill_checksum();
    p
}

fn v6_fragment(src: u8, id: u32, proto: u8, units: u16, more: bool, data: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 48];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    p[6] = 44;
    p[7] = 64;
    p[8..24].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, src]);
    p[24..40].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 2]);
    p[40] = proto;
    let of = ((units & 0x1fff) << 3) | u16::from(more);
    p[42..44].copy_from_slice(&of.to_be_bytes());
    p[44..48].copy_from_slice(&id.to_be_bytes());
    p.extend_from_slice(data);
    p
}

/// Where the fragment header of IPv6 packet `v` starts, past the extension headers that may
/// come before it (hop-by-hop, routing, destination options).
fn v6_fragment_at(v: &[u8]) -> Option<usize> {
    let (mut next, mut at) = (*v.get(6)?, 40);
    while matches!(next, 0 | 43 | 60) {
        next = *v.get(at)?;
        at += (usize::from(*v.get(at + 1)?) + 1) * 8;
    }
    (next == 44 && at + 8 <= v.len()).then_some(at)
}

/// The data of a reassembled datagram (after its headers) and its id, checking its headers are
/// what the rest of the dispatcher expects.
fn check_whole(v: &[u8]) -> (u32, &[u8]) {
    match v[0] >> 4 {
        4 => {
            let p = Ipv4Packet::new_checked(v).expect("a reassembled datagram parses");
            assert!(p.verify_checksum(), "reassembled header checksum");
            assert!(
                !p.more_frags() && p.frag_offset() == 0,
                "reassembled, not a fragment"
            );
            assert_eq!(usize::from(p.total_len()), v.len(), "total length");
            assert!(
                v.len() <= fragment::MAX_DATAGRAM,
                "longer than an IP datagram"
            );
            let hl = usize::from(p.header_len());
            (u32::from(p.ident()), &v[hl..])
        }
        6 => {
            let at = v6_fragment_at(v).expect("the atomic fragment header stays");
            let payload = usize::from(u16::from_be_bytes([v[4], v[5]]));
            assert_eq!(payload + 40, v.len(), "payload length");
            let off_flags = u16::from_be_bytes([v[at + 2], v[at + 3]]);
            assert_eq!(off_flags & !6, 0, "offset 0, no more");
            assert!(
                payload <= fragment::MAX_DATAGRAM,
                "longer than an IPv6 datagram"
            );
            let id = u32::from_be_bytes([v[at + 4], v[at + 5], v[at + 6], v[at + 7]]);
            (id, &v[at + 8..])
        }
        other => panic!("reassembled a version {other} datagram"),
    }
}

/// Cut a reassembled datagram for a link of `mtu` and reassemble the pieces anew: each piece
/// fits, and together they give back the same datagram. True when it had to be cut.
fn refragment(v: &[u8], mtu: usize, now: Instant) -> bool {
    let mut pieces = Vec::new();
    let cut = if v[0] >> 4 == 4 {
        fragment::fragment_v4(v, mtu, &mut pieces)
    } else {
        fragment::egress_v6(v, mtu, &mut pieces)
    };
    if cut.is_none() {
        assert!(pieces.is_empty(), "nothing pushed when it cannot be cut");
        return false;
    }
    assert!(!pieces.is_empty());
    for p in &pieces {
        assert!(p.len() <= mtu, "a piece of {} bytes for MTU {mtu}", p.len());
    }
    if pieces.len() == 1 {
        // It fitted: IPv4 leaves as it is; IPv6 leaves without the atomic fragment header.
        if v[0] >> 4 == 4 {
            assert_eq!(pieces[0], v);
        } else {
            let at = v6_fragment_at(v).expect("checked");
            assert_eq!(pieces[0].len() + 8, v.len());
            assert_eq!(&pieces[0][at..], &v[at + 8..]);
        }
        return false;
    }
    let mut again = Reassembler::default();
    let mut whole = None;
    for (i, p) in pieces.iter().enumerate() {
        assert!(Reassembler::is_fragment(p), "piece {i} is a fragment");
        match again.insert(p, now) {
            Ok(Reassembled::Held) => assert!(i + 1 < pieces.len(), "the last piece completes"),
            Ok(Reassembled::Complete(w)) => whole = Some(w),
            Err(e) => panic!("piece {i} of {} refused: {e:?}", pieces.len()),
        }
    }
    assert_eq!(
        whole.as_deref(),
        Some(v),
        "the pieces give back the datagram"
    );
    assert!(again.is_empty());
    true
}

/// Fragments described by `data`, 5 bytes each, into one reassembler, with time moving on: any
/// input must leave the reassembler bounded and every datagram it completes well-formed, its
/// bytes exactly the fragments', and cut again for a smaller link, the same once reassembled.
/// An op `ff ff LEN ..` hands the next LEN bytes in raw instead.
pub fn fragments(data: &[u8]) -> Reached {
    let mut r = Reassembler::default();
    let mut reached = Reached::default();
    let start = Instant::now();
    let mut now = start;
    let mut i = 0;
    // Raw packets carry bytes of their own: a datagram they joined is not checked against the
    // pattern (its structure still is).
    let mut raw_seen = false;
    while i + 5 <= data.len() {
        let op = &data[i..i + 5];
        i += 5;
        let packet = if op[0] == 0xff && op[1] == 0xff {
            let n = usize::from(op[2]).min(data.len() - i);
            raw_seen = true;
            let raw = data[i..i + n].to_vec();
            i += n;
            raw
        } else {
            let (flags, hi, lo, len, extra) = (op[0], op[1], op[2], op[3], op[4]);
            let v6 = flags & 1 != 0;
            let more = flags & 2 != 0;
            let proto_sel = usize::from((flags >> 2) & 3);
            let id = u32::from((flags >> 4) & 3) | (u32::from(extra & 0x80) << 1);
            let src = 2 + ((flags >> 6) & 1);
            if extra & 0x40 != 0 {
                now += Duration::from_secs(2);
            }
            // Mostly near the start, so datagrams complete; sometimes anywhere.
            let units = if hi & 0x80 == 0 {
                u16::from(lo % 24)
            } else {
                u16::from_be_bytes([hi & 0x1f, lo])
            };
            let n = if more {
                (usize::from(len % 32) + 1) * 8
            } else {
                usize::from(len) % 200 + 1 + usize::from(extra & 0x3f) * 8
            };
            let at = usize::from(units) * 8;
            let bytes: Vec<u8> = (at..at + n).map(|p| pattern(id, p)).collect();
            if v6 {
                v6_fragment(src, id, PROTOS_V6[proto_sel], units, more, &bytes)
            } else {
                let proto = PROTOS_V4[proto_sel];
                v4_fragment(src, id as u16, proto, units, more, &bytes)
            }
        };
        if !Reassembler::is_fragment(&packet) {
            continue;
        }
        reached.fragments += 1;
        match r.insert(&packet, now) {
            Ok(Reassembled::Held) => {}
            Err(_) => reached.dropped += 1,
            Ok(Reassembled::Complete(v)) => {
                reached.complete += 1;
                let (id, bytes) = check_whole(&v);
                if !raw_seen {
                    for (at, b) in bytes.iter().enumerate() {
                        assert_eq!(*b, pattern(id, at), "byte {at} of datagram {id}");
                    }
                }
                // An MTU from the input, at least what IPv6 guarantees.
                let mtu = 1280 + usize::from(op[4]) * 8;
                if refragment(&v, mtu, now) {
                    reached.refragmented += 1;
                }
            }
        }
        assert!(r.len() <= fragment::MAX_DATAGRAMS, "held datagrams bounded");
    }
    r.expire(now + fragment::TIMEOUT + Duration::from_secs(1));
    assert!(r.is_empty(), "everything expires");
    reached
}
