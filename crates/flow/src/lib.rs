//! dva-flow: how flows are spread over data-plane units.
//!
//! Contract of this layer:
//! - [`FlowKey`] is a packet's 5-tuple as sent. [`FlowKey::symmetric_hash`] gives the same value for
//!   both directions of a connection and the same value in every process, on every machine and in
//!   every version of dva that shares a backplane (fixed constants, no per-process seed): a
//!   dispatcher never talks to another one, yet all of them must send a flow to the same bucket.
//!   Changing the function is a wire-protocol change; the pinned values in the tests guard it.
//! - [`BucketTable`] maps the hash to a bucket (`hash & (len - 1)`) and a bucket to its owner data
//!   plane, plus the bucket's history of previous owners (newest first) that a data plane punts
//!   packets of unknown flows to. [`BucketTable::maglev`] populates it with Maglev permutations;
//!   [`BucketTable::rebalance`] computes the table for a new member set moving no more buckets than
//!   a balanced assignment needs, and records the moved buckets' previous owners.
//! - Sans-IO, no clock, no allocation on the per-packet path (`symmetric_hash`, `bucket_of`, `owner`).
//!   Bucket numbers from outside the process are taken modulo the table size, so lookups never panic.
#![forbid(unsafe_code)]

mod key;
mod table;

pub use key::FlowKey;
pub use table::{Bucket, BucketTable, DEFAULT_BUCKETS, MAX_BUCKETS, MAX_HISTORY};

/// Identifier of a compute unit (assigned by the manager, unique within an appliance).
pub type UnitId = u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    #[error("a bucket table needs at least one bucket (got 0)")]
    ZeroBuckets,
    #[error("bucket count {0} is not a power of two")]
    NotPowerOfTwo(usize),
    #[error("bucket count {0} exceeds the maximum of {MAX_BUCKETS} (bucket numbers are 16-bit)")]
    TooManyBuckets(usize),
    #[error("a bucket table needs at least one member unit (got none)")]
    NoMembers,
    #[error("bucket {bucket}: owner {owner} is also listed in the bucket's history")]
    OwnerInHistory { bucket: usize, owner: UnitId },
    #[error("bucket {bucket}: history of {len} units exceeds the maximum of {MAX_HISTORY}")]
    HistoryTooLong { bucket: usize, len: usize },
}

#[cfg(test)]
pub(crate) mod testutil {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use crate::FlowKey;

    /// Small deterministic generator (splitmix64) for property-style tests without external crates.
    pub(crate) struct Rng(u64);

    impl Rng {
        pub(crate) fn new(seed: u64) -> Self {
            Rng(seed)
        }

        pub(crate) fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        pub(crate) fn key(&mut self, v6: bool) -> FlowKey {
            let (src, dst) = if v6 {
                let s = (u128::from(self.next()) << 64) | u128::from(self.next());
                let d = (u128::from(self.next()) << 64) | u128::from(self.next());
                (
                    IpAddr::V6(Ipv6Addr::from_bits(s)),
                    IpAddr::V6(Ipv6Addr::from_bits(d)),
                )
            } else {
                let r = self.next();
                (
                    IpAddr::V4(Ipv4Addr::from_bits(r as u32)),
                    IpAddr::V4(Ipv4Addr::from_bits((r >> 32) as u32)),
                )
            };
            let r = self.next();
            FlowKey {
                proto: [1, 6, 17, 58][(r & 3) as usize],
                src,
                dst,
                src_port: (r >> 8) as u16,
                dst_port: (r >> 24) as u16,
            }
        }
    }
}
