//! The Internet checksum (RFC 1071) and its incremental update (RFC 1624).
//!
//! A *partial sum* ([`sum`], [`pseudo_header_v4`], [`pseudo_header_v6`]) is a ones' complement
//! sum folded to at most 16 significant bits, so callers can add several partial sums in a `u32`
//! without overflow and finish with [`fold`]. Partial sums of buffers only combine correctly
//! when every buffer but the last has an even length.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Folds carries until the value fits 16 bits, keeping it congruent modulo 0xFFFF.
/// A non-zero input never folds to zero, which keeps the ±0 behaviour of RFC 1071.
#[inline]
fn fold_partial(mut acc: u64) -> u32 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u32
}

/// Ones' complement partial sum of `data` as big-endian 16-bit words; an odd trailing byte is
/// padded with a zero byte. The result is at most `0xFFFF`.
pub fn sum(data: &[u8]) -> u32 {
    // 32-bit words summed in 64 bits: 2^16 ≡ 1 (mod 0xFFFF), so this equals the 16-bit word sum
    // after folding, with a quarter of the additions and no carry handling in the loop.
    let mut acc: u64 = 0;
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut tail = [0u8; 4];
    tail[..rest.len()].copy_from_slice(rest);
    acc += u64::from(u32::from_be_bytes(tail));
    fold_partial(acc)
}

/// Finishes a checksum: folds the carries of `sum` and returns its ones' complement, the value
/// that goes into the header field.
#[inline]
pub fn fold(sum: u32) -> u16 {
    !(fold_partial(u64::from(sum)) as u16)
}

/// Checksum of a whole buffer (e.g. an IPv4 header or an ICMPv4 message). Over a buffer that
/// already holds a correct checksum this returns 0.
#[inline]
pub fn data(data: &[u8]) -> u16 {
    fold(sum(data))
}

/// Partial sum of the IPv4 pseudo-header for a transport segment of `len` bytes (RFC 793, 768).
pub fn pseudo_header_v4(src: &Ipv4Addr, dst: &Ipv4Addr, proto: u8, len: u32) -> u32 {
    let acc =
        u64::from(u32::from(*src)) + u64::from(u32::from(*dst)) + u64::from(proto) + u64::from(len);
    fold_partial(acc)
}

/// Partial sum of the IPv6 pseudo-header for an upper-layer packet of `len` bytes
/// (RFC 8200 §8.1).
pub fn pseudo_header_v6(src: &Ipv6Addr, dst: &Ipv6Addr, proto: u8, len: u32) -> u32 {
    let acc = u64::from(sum(&src.octets()))
        + u64::from(sum(&dst.octets()))
        + u64::from(proto)
        + u64::from(len);
    fold_partial(acc)
}

/// RFC 1624 eqn. 3: the checksum `csum` after one 16-bit word covered by it changed from `old`
/// to `new` (`HC' = ~(~HC + ~m + m')`). The word must sit at an even offset of the checksummed
/// data; for a value at an odd offset pass both words byte-swapped.
#[inline]
pub fn update16(csum: u16, old: u16, new: u16) -> u16 {
    fold(u32::from(!csum) + u32::from(!old) + u32::from(new))
}

/// [`update16`] for a 32-bit value at an even offset (two adjacent words).
#[inline]
pub fn update32(csum: u16, old: u32, new: u32) -> u16 {
    let acc = u32::from(!csum)
        + u32::from(!(old >> 16) as u16)
        + u32::from(!(old as u16))
        + (new >> 16)
        + (new & 0xffff);
    fold(acc)
}

/// [`update32`] for an IPv4 address: the IPv4 header checksum and the TCP/UDP checksums (which
/// cover the address through the pseudo-header) after NAT rewrites it.
#[inline]
pub fn update_addr_v4(csum: u16, old: Ipv4Addr, new: Ipv4Addr) -> u16 {
    update32(csum, u32::from(old), u32::from(new))
}

/// Incremental update for an IPv6 address rewritten under a TCP/UDP/ICMPv6 checksum.
pub fn update_addr_v6(csum: u16, old: &Ipv6Addr, new: &Ipv6Addr) -> u16 {
    // The ones' complement of the old words' sum is what `data` returns for them.
    let acc = u64::from(!csum) + u64::from(data(&old.octets())) + u64::from(sum(&new.octets()));
    fold(fold_partial(acc))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic xorshift so the tests need no `rand`.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    /// Reference: RFC 1071 straight from the text, 16 bits at a time.
    fn reference(data: &[u8]) -> u16 {
        let mut acc: u32 = 0;
        for pair in data.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            acc += u32::from(word);
            acc = (acc & 0xffff) + (acc >> 16);
        }
        !(acc as u16)
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
        let bytes = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(sum(&bytes), 0xddf2);
        assert_eq!(data(&bytes), !0xddf2);
    }

    #[test]
    fn ipv4_header_checksum_of_known_header() {
        // A real header (checksum 0xb861) from the Wikipedia IPv4 checksum example.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(data(&h), 0xb861);
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(data(&h), 0);
    }

    #[test]
    fn sum_matches_reference_on_random_lengths() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for len in 0..300 {
            let buf = rng.bytes(len);
            assert_eq!(data(&buf), reference(&buf), "len {len}");
        }
        let big = rng.bytes(70_000);
        assert_eq!(data(&big), reference(&big));
    }

    #[test]
    fn all_zero_and_all_ones() {
        assert_eq!(data(&[]), 0xffff);
        assert_eq!(data(&[0; 10]), 0xffff);
        assert_eq!(data(&[0xff; 10]), 0);
    }

    #[test]
    fn pseudo_headers_match_manual_layout() {
        let src = Ipv4Addr::new(198, 18, 1, 2);
        let dst = Ipv4Addr::new(198, 18, 2, 2);
        let mut ph = Vec::new();
        ph.extend_from_slice(&src.octets());
        ph.extend_from_slice(&dst.octets());
        ph.extend_from_slice(&[0, 6, 0x05, 0xdc]);
        assert_eq!(pseudo_header_v4(&src, &dst, 6, 1500), sum(&ph));

        let s6: Ipv6Addr = "2001:db8:1::2".parse().unwrap();
        let d6: Ipv6Addr = "2001:db8:2::ffff:2".parse().unwrap();
        let mut ph6 = Vec::new();
        ph6.extend_from_slice(&s6.octets());
        ph6.extend_from_slice(&d6.octets());
        ph6.extend_from_slice(&70_000u32.to_be_bytes());
        ph6.extend_from_slice(&[0, 0, 0, 17]);
        assert_eq!(pseudo_header_v6(&s6, &d6, 17, 70_000), sum(&ph6));
    }

    #[test]
    fn partial_sums_compose() {
        let mut rng = XorShift(7);
        let a = rng.bytes(64);
        let b = rng.bytes(33);
        let whole: Vec<u8> = a.iter().chain(&b).copied().collect();
        assert_eq!(fold(sum(&a) + sum(&b)), data(&whole));
    }

    /// Random buffer with a checksum field at 0..2 filled in; one other word is forced non-zero
    /// so the ±0 corner (an all-zero buffer) cannot occur.
    fn checksummed(rng: &mut XorShift, len: usize) -> Vec<u8> {
        let mut buf = rng.bytes(len);
        buf[2] |= 1;
        buf[0] = 0;
        buf[1] = 0;
        let c = data(&buf);
        buf[..2].copy_from_slice(&c.to_be_bytes());
        buf
    }

    #[test]
    fn update16_matches_recomputation() {
        let mut rng = XorShift(0xdead_beef);
        for _ in 0..5000 {
            let len = 8 + 2 * (rng.next() as usize % 40);
            let mut buf = checksummed(&mut rng, len);
            let at = 4 + 2 * (rng.next() as usize % ((len - 4) / 2));
            let old = u16::from_be_bytes([buf[at], buf[at + 1]]);
            let new = rng.next() as u16;
            let csum = u16::from_be_bytes([buf[0], buf[1]]);
            buf[at..at + 2].copy_from_slice(&new.to_be_bytes());
            let inc = update16(csum, old, new);
            buf[0] = 0;
            buf[1] = 0;
            assert_eq!(inc, data(&buf), "at {at} old {old:#x} new {new:#x}");
        }
    }

    #[test]
    fn update16_at_odd_offset_with_swapped_words() {
        let mut rng = XorShift(99);
        for _ in 0..2000 {
            let mut buf = checksummed(&mut rng, 32);
            let at = 5 + 2 * (rng.next() as usize % 12);
            let old = u16::from_be_bytes([buf[at], buf[at + 1]]);
            let new = rng.next() as u16;
            let csum = u16::from_be_bytes([buf[0], buf[1]]);
            buf[at..at + 2].copy_from_slice(&new.to_be_bytes());
            let inc = update16(csum, old.swap_bytes(), new.swap_bytes());
            buf[0] = 0;
            buf[1] = 0;
            assert_eq!(inc, data(&buf));
        }
    }

    #[test]
    fn update32_and_addr_updates_match_recomputation() {
        let mut rng = XorShift(0x1234_5678);
        for _ in 0..5000 {
            let mut buf = checksummed(&mut rng, 40);
            let at = 4 + 2 * (rng.next() as usize % 17);
            let old = u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
            let new = rng.next() as u32;
            let csum = u16::from_be_bytes([buf[0], buf[1]]);
            buf[at..at + 4].copy_from_slice(&new.to_be_bytes());
            let inc32 = update32(csum, old, new);
            let inc_addr = update_addr_v4(csum, Ipv4Addr::from(old), Ipv4Addr::from(new));
            buf[0] = 0;
            buf[1] = 0;
            assert_eq!(inc32, data(&buf));
            assert_eq!(inc_addr, data(&buf));
        }
    }

    #[test]
    fn update_addr_v6_matches_recomputation() {
        let mut rng = XorShift(0xabcdef);
        for _ in 0..2000 {
            let mut buf = checksummed(&mut rng, 48);
            let at = 4 + 2 * (rng.next() as usize % 14);
            let mut old = [0u8; 16];
            old.copy_from_slice(&buf[at..at + 16]);
            let new: [u8; 16] = rng.bytes(16).try_into().unwrap();
            let csum = u16::from_be_bytes([buf[0], buf[1]]);
            buf[at..at + 16].copy_from_slice(&new);
            let inc = update_addr_v6(csum, &Ipv6Addr::from(old), &Ipv6Addr::from(new));
            buf[0] = 0;
            buf[1] = 0;
            assert_eq!(inc, data(&buf));
        }
    }
}
