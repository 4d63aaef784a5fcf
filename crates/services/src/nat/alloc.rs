//! Translated source ports (and ICMP echo ids) chosen in the flow's own bucket.
//!
//! The ports of a range that map to bucket `b` are `p0, p0 + n, p0 + 2n, ...` (`n` buckets,
//! `p0` the first port of the range with `p & (n-1) == b`), so the k-th candidate is computed,
//! not searched for. A flow's search starts at a hashed candidate and walks on; the caller's
//! `free` test decides (endpoint-dependent: the whole translated 5-tuple must be unused). The walk
//! is bounded by a probe budget shared across pool addresses, so exhaustion costs a bounded amount
//! of work and yields `None`, never a loop.

use super::PortRange;

/// Most `free` tests one allocation makes (Linux's `nf_nat_l4proto_unique_tuple` tries 128 per
/// round).
pub(crate) const MAX_PROBES: usize = 256;

/// The ports of a range that belong to one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BucketPorts {
    first: u32,
    step: u32,
    count: u32,
}

impl BucketPorts {
    /// `n_buckets` must be a power of two in `1..=65536` (the stages normalise it).
    pub fn new(range: PortRange, bucket: u16, n_buckets: usize) -> BucketPorts {
        let step = n_buckets.clamp(1, 1 << 16) as u32;
        let mask = step - 1;
        let b = u32::from(bucket) & mask;
        let (lo, hi) = (u32::from(range.first), u32::from(range.last));
        let mut first = (lo & !mask) | b;
        if first < lo {
            first += step;
        }
        let count = if lo > hi || first > hi {
            0
        } else {
            (hi - first) / step + 1
        };
        BucketPorts { first, step, count }
    }

    pub fn len(&self) -> u32 {
        self.count
    }

    #[inline]
    pub fn nth(&self, k: u32) -> u16 {
        // first + k*step <= last <= 65535 for k < count.
        (self.first + (k % self.count.max(1)) * self.step) as u16
    }

    pub fn contains(&self, port: u16) -> bool {
        let p = u32::from(port);
        self.count > 0
            && p >= self.first
            && (p - self.first).is_multiple_of(self.step)
            && (p - self.first) / self.step < self.count
    }
}

/// A port of `ports` for which `free` holds: `preferred` if it is a candidate and free, else the
/// candidates from the one at `start` on, at most `budget` tests in all (the budget is consumed).
pub(crate) fn allocate(
    ports: &BucketPorts,
    preferred: Option<u16>,
    start: u64,
    budget: &mut usize,
    mut free: impl FnMut(u16) -> bool,
) -> Option<u16> {
    if ports.len() == 0 {
        return None;
    }
    if let Some(p) = preferred.filter(|&p| ports.contains(p)) {
        if *budget == 0 {
            return None;
        }
        *budget -= 1;
        if free(p) {
            return Some(p);
        }
    }
    let n = ports.len();
    let start = (start % u64::from(n)) as u32;
    let tries = (*budget).min(n as usize);
    for i in 0..tries {
        *budget -= 1;
        let p = ports.nth((start + i as u32) % n);
        if free(p) {
            return Some(p);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(first: u16, last: u16) -> PortRange {
        PortRange { first, last }
    }

    #[test]
    fn candidates_are_exactly_the_bucket_ports_of_the_range() {
        for (r, n) in [
            (range(1024, 65535), 4096),
            (range(1024, 65535), 1),
            (range(1000, 1003), 8),
            (range(5000, 5000), 1024),
            (range(0, 65535), 65536),
            (range(10, 5), 4),
            (range(60000, 65535), 256),
        ] {
            for b in [0u16, 1, 3, 7, 255, 4095, 65535] {
                let bp = BucketPorts::new(r, b, n);
                let want: Vec<u16> = (u32::from(r.first)..=u32::from(r.last))
                    .map(|p| p as u16)
                    .filter(|&p| usize::from(p) & (n - 1) == usize::from(b) & (n - 1))
                    .collect();
                let got: Vec<u16> = (0..bp.len()).map(|k| bp.nth(k)).collect();
                assert_eq!(got, want, "{r:?} n={n} b={b}");
                for p in [0u16, 1023, 1024, 5000, 65535] {
                    assert_eq!(bp.contains(p), want.contains(&p), "{p}");
                }
            }
        }
    }

    #[test]
    fn allocation_is_bounded() {
        let bp = BucketPorts::new(range(1024, 65535), 0, 1);
        let mut budget = MAX_PROBES;
        let mut calls = 0;
        let got = allocate(&bp, Some(2000), 99, &mut budget, |_| {
            calls += 1;
            false
        });
        assert_eq!(got, None);
        assert_eq!(calls, MAX_PROBES);
        assert_eq!(budget, 0);
        let mut budget = MAX_PROBES;
        assert_eq!(
            allocate(&bp, Some(2000), 99, &mut budget, |p| p == 2000),
            Some(2000)
        );
    }
}
