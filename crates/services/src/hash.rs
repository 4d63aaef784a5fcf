//! The conntrack map's hasher: fast, and keyed per table.
//!
//! Flow keys come from the network, so a fixed hash function would let an attacker precompute keys
//! that collide and turn lookups into scans. Each table draws a seed from std's `RandomState` (which
//! the OS seeds once per process) and mixes it in. This is wyhash-style multiply-folding, not a
//! keyed PRF like SipHash: it defeats precomputed collision sets, at a fraction of SipHash's cost
//! on the per-packet path.

use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::net::IpAddr;

use dva_flow::FlowKey;

const K: u64 = 0xa076_1d64_78bd_642f;

#[inline(always)]
fn mix(a: u64, b: u64) -> u64 {
    let r = u128::from(a).wrapping_mul(u128::from(b));
    (r as u64) ^ ((r >> 64) as u64)
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct SeededState {
    seed: u64,
}

impl SeededState {
    /// The same hash in every process: for choices that must agree across data planes (a
    /// translated port), never for a table's own map.
    pub(crate) const fn fixed(seed: u64) -> Self {
        SeededState { seed: seed | 1 }
    }

    pub(crate) fn random() -> Self {
        SeededState {
            seed: RandomState::new().hash_one(0x636f_6e6e_7472_6163_u64) | 1,
        }
    }
}

impl BuildHasher for SeededState {
    type Hasher = FoldHasher;

    #[inline]
    fn build_hasher(&self) -> FoldHasher {
        FoldHasher { acc: self.seed }
    }
}

pub(crate) struct FoldHasher {
    acc: u64,
}

impl Hasher for FoldHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.write_u64(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.write_u64(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 59));
        }
    }

    #[inline]
    fn write_u64(&mut self, w: u64) {
        self.acc = mix(self.acc ^ w, K);
    }

    #[inline]
    fn write_u128(&mut self, w: u128) {
        self.write_u64(w as u64);
        self.write_u64((w >> 64) as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.acc
    }
}

/// A canonical flow key as a map key, hashed as two (IPv4) or five (IPv6) packed words instead of
/// the derived field-by-field `Hash` (seven writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MapKey(pub(crate) FlowKey);

impl Hash for MapKey {
    #[inline]
    fn hash<H: Hasher>(&self, h: &mut H) {
        let k = &self.0;
        let ports = (u64::from(k.src_port) << 48)
            | (u64::from(k.dst_port) << 32)
            | (u64::from(k.proto) << 8);
        match (k.src, k.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                h.write_u64((u64::from(s.to_bits()) << 32) | u64::from(d.to_bits()));
                h.write_u64(ports | 4);
            }
            (s, d) => {
                h.write_u128(v6_bits(s));
                h.write_u128(v6_bits(d));
                h.write_u64(ports | 6);
            }
        }
    }
}

#[inline]
fn v6_bits(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => a.to_ipv6_mapped().to_bits(),
        IpAddr::V6(a) => a.to_bits(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_differ_and_hash_is_stable_per_seed() {
        let k = MapKey(FlowKey {
            proto: 6,
            src: "198.18.1.2".parse().unwrap(),
            dst: "198.18.2.2".parse().unwrap(),
            src_port: 1,
            dst_port: 2,
        });
        let a = SeededState::random();
        let b = SeededState::random();
        assert_eq!(a.hash_one(k), a.hash_one(k));
        assert_ne!(a.hash_one(k), b.hash_one(k));
        let mut h = a.build_hasher();
        h.write(b"0123456789");
        assert_ne!(h.finish(), a.build_hasher().finish());
    }
}
