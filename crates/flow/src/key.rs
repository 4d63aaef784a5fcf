//! The flow key and its symmetric hash.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// A packet's 5-tuple, in the direction the packet was sent.
///
/// For ICMP echo (and other ICMP queries with an identifier) `src_port = dst_port = identifier`;
/// for protocols without ports both are 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FlowKey {
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
}

// wyhash's default secrets: odd, with balanced bits, so a multiply spreads every input bit.
const K0: u64 = 0xa076_1d64_78bd_642f;
const K1: u64 = 0xe703_7ed1_a0b4_28db;
const K2: u64 = 0x8ebc_6af0_9c88_c6e3;
const K3: u64 = 0x5899_65cc_7537_4cc3;

/// Full 64x64 -> 128 multiply folded back to 64 bits (wyhash's `wymix`).
#[inline(always)]
fn mix(a: u64, b: u64) -> u64 {
    let r = u128::from(a).wrapping_mul(u128::from(b));
    (r as u64) ^ ((r >> 64) as u64)
}

/// Two rounds over two words, as wyhash does for a 16-byte input.
#[inline(always)]
fn finish(a: u64, b: u64) -> u32 {
    let r = u128::from(a ^ K1).wrapping_mul(u128::from(b ^ K0));
    let h = mix((r as u64) ^ K0, ((r >> 64) as u64) ^ K1);
    (h ^ (h >> 32)) as u32
}

impl FlowKey {
    /// The key of a packet going the other way.
    #[inline]
    pub fn reversed(&self) -> FlowKey {
        FlowKey {
            proto: self.proto,
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
        }
    }

    /// Same value for a key and its reverse: a hash over `proto` and the unordered pair of
    /// endpoints `{(src, src_port), (dst, dst_port)}`.
    ///
    /// Deterministic across processes, machines and versions (see the crate doc); the values are
    /// pinned by a test. The exact function, for other implementations (e.g. an XDP dispatcher):
    /// order the endpoints as `(addr, port)` pairs, numerically, into `lo <= hi`; let
    /// `mix(a, b) = lo64(a*b) ^ hi64(a*b)` (128-bit product), `fin(a, b)`: `r = (a^K1)*(b^K0)`,
    /// `h = mix(lo64(r)^K0, hi64(r)^K1)`, result `(h ^ h>>32) as u32`, and
    /// `p(f) = lo.port<<48 | hi.port<<32 | proto<<8 | f`. IPv4: `fin(lo.addr<<32 | hi.addr, p(4))`.
    /// IPv6 (and keys mixing families, the v4 side v4-mapped): `fin(mix(lo.addr>>64 ^ K2,
    /// lo.addr_low64 ^ K3) ^ p(6), mix(hi.addr>>64 ^ K0, hi.addr_low64 ^ K2))`. `K0..K3` are
    /// wyhash's secrets.
    #[inline]
    pub fn symmetric_hash(&self) -> u32 {
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                // (addr, port) packed in 48 bits orders like the tuple; min/max avoid a branch
                // that random traffic would mispredict half the time.
                let s = (u64::from(s.to_bits()) << 16) | u64::from(self.src_port);
                let d = (u64::from(d.to_bits()) << 16) | u64::from(self.dst_port);
                let (lo, hi) = (s.min(d), s.max(d));
                let addrs = ((lo >> 16) << 32) | (hi >> 16);
                finish(addrs, ports_word(self.proto, lo as u16, hi as u16, 4))
            }
            (s, d) => {
                let (s, d) = (v6_bits(s), v6_bits(d));
                let ((lo, lp), (hi, hp)) = if (s, self.src_port) <= (d, self.dst_port) {
                    ((s, self.src_port), (d, self.dst_port))
                } else {
                    ((d, self.dst_port), (s, self.src_port))
                };
                // Different constants per side so equal endpoints do not cancel out.
                let a = mix(((lo >> 64) as u64) ^ K2, (lo as u64) ^ K3);
                let b = mix(((hi >> 64) as u64) ^ K0, (hi as u64) ^ K2);
                finish(a ^ ports_word(self.proto, lp, hp, 6), b)
            }
        }
    }

    /// The key with the lower endpoint (address, then port) as source, and whether `self` had to be
    /// reversed to get it. Both directions of a connection give the same canonical key, so it is
    /// the key of direction-agnostic maps (conntrack).
    #[inline]
    pub fn canonical(&self) -> (FlowKey, bool) {
        // The order of `(IpAddr, u16)` tuples, computed on integers: every connection-table
        // lookup takes this, and the tuple comparison's chained `Ord` costs ~20 instructions.
        let in_order = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                (u64::from(s.to_bits()) << 16 | u64::from(self.src_port))
                    <= (u64::from(d.to_bits()) << 16 | u64::from(self.dst_port))
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                (s.to_bits(), self.src_port) <= (d.to_bits(), self.dst_port)
            }
            (s, d) => (s, self.src_port) <= (d, self.dst_port),
        };
        if in_order {
            (*self, false)
        } else {
            (self.reversed(), true)
        }
    }

    pub fn is_ipv4(&self) -> bool {
        self.src.is_ipv4()
    }
}

#[inline(always)]
fn ports_word(proto: u8, lo_port: u16, hi_port: u16, family: u8) -> u64 {
    (u64::from(lo_port) << 48)
        | (u64::from(hi_port) << 32)
        | (u64::from(proto) << 8)
        | u64::from(family)
}

#[inline(always)]
fn v6_bits(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => a.to_ipv6_mapped().to_bits(),
        IpAddr::V6(a) => a.to_bits(),
    }
}

impl fmt::Display for FlowKey {
    /// `proto 6 198.18.1.2:40000 -> 198.18.2.2:80` (IPv6 addresses in brackets).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn ep(f: &mut fmt::Formatter<'_>, a: IpAddr, p: u16) -> fmt::Result {
            match a {
                IpAddr::V4(a) => write!(f, "{a}:{p}"),
                IpAddr::V6(a) => write!(f, "[{a}]:{p}"),
            }
        }
        write!(f, "proto {} ", self.proto)?;
        ep(f, self.src, self.src_port)?;
        f.write_str(" -> ")?;
        ep(f, self.dst, self.dst_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Rng;

    fn v4(proto: u8, s: [u8; 4], sp: u16, d: [u8; 4], dp: u16) -> FlowKey {
        FlowKey {
            proto,
            src: IpAddr::from(s),
            dst: IpAddr::from(d),
            src_port: sp,
            dst_port: dp,
        }
    }

    #[test]
    fn reversed_swaps_endpoints() {
        let k = v4(6, [198, 18, 1, 2], 40000, [198, 18, 2, 2], 80);
        let r = k.reversed();
        assert_eq!(r, v4(6, [198, 18, 2, 2], 80, [198, 18, 1, 2], 40000));
        assert_eq!(r.reversed(), k);
    }

    #[test]
    fn both_directions_hash_alike() {
        let mut rng = Rng::new(1);
        for v6 in [false, true] {
            for _ in 0..10_000 {
                let k = rng.key(v6);
                assert_eq!(k.symmetric_hash(), k.reversed().symmetric_hash(), "{k}");
            }
        }
    }

    #[test]
    fn canonical_is_direction_agnostic() {
        let mut rng = Rng::new(2);
        for v6 in [false, true] {
            for _ in 0..1000 {
                let k = rng.key(v6);
                let (c, rev) = k.canonical();
                let (cr, rev_r) = k.reversed().canonical();
                assert_eq!(c, cr);
                if k != k.reversed() {
                    assert_ne!(rev, rev_r);
                }
                assert_eq!(if rev { k.reversed() } else { k }, c);
                assert!((c.src, c.src_port) <= (c.dst, c.dst_port));
            }
        }
        // Equal addresses (ports decide), equal endpoints, and mixed families (V4 orders first).
        let a: IpAddr = "10.0.0.1".parse().expect("literal");
        let b: IpAddr = "2001:db8::1".parse().expect("literal");
        for (src, sp, dst, dp) in [
            (a, 80, a, 1000),
            (a, 1000, a, 80),
            (a, 7, a, 7),
            (b, 1, a, 2),
            (a, 9, b, 1),
        ] {
            let k = FlowKey {
                proto: 6,
                src,
                dst,
                src_port: sp,
                dst_port: dp,
            };
            let (c, rev) = k.canonical();
            assert_eq!(rev, (src, sp) > (dst, dp), "{k:?}");
            assert!((c.src, c.src_port) <= (c.dst, c.dst_port));
        }
    }

    #[test]
    fn hash_separates_fields() {
        let base = v4(6, [10, 0, 0, 1], 1000, [10, 0, 0, 2], 80);
        let variants = [
            FlowKey { proto: 17, ..base },
            FlowKey {
                src_port: 1001,
                ..base
            },
            FlowKey {
                dst_port: 81,
                ..base
            },
            FlowKey {
                src: IpAddr::from([10, 0, 0, 3]),
                ..base
            },
            // Same endpoints, ports swapped between them: a different connection.
            FlowKey {
                src_port: 80,
                dst_port: 1000,
                ..base
            },
        ];
        for v in variants {
            assert_ne!(base.symmetric_hash(), v.symmetric_hash(), "{v}");
        }
    }

    #[test]
    fn hash_spreads_over_buckets() {
        // Sequential client ports from one client to one server (the common case behind a NAT).
        let mut counts = [0u32; 64];
        for p in 0..64_000u16 {
            let k = v4(6, [198, 18, 1, 2], p, [198, 18, 2, 2], 443);
            counts[(k.symmetric_hash() & 63) as usize] += 1;
        }
        for c in counts {
            assert!((900..1100).contains(&c), "{counts:?}");
        }
    }

    /// Dispatchers of different builds must agree: a change here is a backplane protocol change.
    #[test]
    fn hash_values_are_pinned() {
        let cases = [
            (
                v4(6, [198, 18, 1, 2], 40000, [198, 18, 2, 2], 80),
                0x2430_9298_u32,
            ),
            (v4(17, [10, 0, 0, 1], 53, [10, 0, 0, 2], 5353), 0x6d7a_37bf),
            (v4(1, [192, 0, 2, 1], 7, [192, 0, 2, 9], 7), 0xbe60_4e72),
            (v4(47, [0, 0, 0, 0], 0, [0, 0, 0, 0], 0), 0xd5cd_1c97),
            (
                FlowKey {
                    proto: 6,
                    src: "2001:db8::1".parse().unwrap(),
                    dst: "2001:db8:1::2".parse().unwrap(),
                    src_port: 33000,
                    dst_port: 443,
                },
                0xdc36_1037,
            ),
            (
                FlowKey {
                    proto: 58,
                    src: "2001:db8::1".parse().unwrap(),
                    dst: "2001:db8::1".parse().unwrap(),
                    src_port: 1,
                    dst_port: 1,
                },
                0xa585_af53,
            ),
        ];
        let got: Vec<String> = cases
            .iter()
            .map(|(k, _)| format!("{:#010x}", k.symmetric_hash()))
            .collect();
        for ((k, want), g) in cases.iter().zip(&got) {
            assert_eq!(k.symmetric_hash(), *want, "{k}: got {g}; all: {got:?}");
        }
    }

    #[test]
    fn display() {
        let k = v4(6, [198, 18, 1, 2], 40000, [198, 18, 2, 2], 80);
        assert_eq!(k.to_string(), "proto 6 198.18.1.2:40000 -> 198.18.2.2:80");
        let k6 = FlowKey {
            proto: 17,
            src: "2001:db8::1".parse().unwrap(),
            dst: "2001:db8::2".parse().unwrap(),
            src_port: 1,
            dst_port: 2,
        };
        assert_eq!(
            k6.to_string(),
            "proto 17 [2001:db8::1]:1 -> [2001:db8::2]:2"
        );
    }

    #[test]
    fn serde_round_trip() {
        let k = v4(6, [198, 18, 1, 2], 40000, [198, 18, 2, 2], 80);
        let s = serde_json::to_string(&k).unwrap();
        assert_eq!(serde_json::from_str::<FlowKey>(&s).unwrap(), k);
    }
}
