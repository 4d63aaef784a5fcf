//! Maglev lookup tables (Eisenbud et al., NSDI'16, §3.4), weighted as Katran does.
//!
//! Each backend has a permutation of the table's `m` entries, `(offset + j * skip) mod m`, with
//! `offset` and `skip` from a fixed hash of its name (`m` prime, so every `skip` visits every
//! entry). Backends take turns claiming their next unclaimed preferred entry until the table is
//! full. Weights: on each round a backend's credit grows by its weight and it takes a turn each
//! time the credit reaches the largest weight, so turns (and entries) are proportional to weight.
//!
//! Everything is deterministic (names sorted, fixed hash constants), so every data plane with the
//! same backends, weights and health builds the same table and sends a flow to the same backend.
//! Removing a backend hands its entries to the others and moves few other entries (Maglev's
//! minimal disruption; not zero, unlike consistent hashing with a ring).

/// Table sizes: primes, the smallest of at least 100 entries per backend is used.
pub const TABLE_SIZES: [usize; 5] = [4093, 16381, 65537, 262147, 1_048_573];

/// Most backends one table holds (entries are 16-bit indices, `u16::MAX` marks empty).
pub(crate) const MAX_BACKENDS: usize = u16::MAX as usize - 1;

const EMPTY: u16 = u16::MAX;

/// Table size for `n` configured backends (health does not change it, so a backend going down
/// does not reshuffle everyone).
pub(crate) fn table_size(n: usize) -> usize {
    TABLE_SIZES
        .iter()
        .copied()
        .find(|&m| m >= n.saturating_mul(100))
        .unwrap_or(TABLE_SIZES[TABLE_SIZES.len() - 1])
}

/// splitmix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a over the name, seeded, then mixed: fixed across processes and versions.
fn name_hash(name: &str, seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

/// The lookup table for `members` (`(name, weight)`; weight 0 = takes no entries) of size `m`
/// (prime). Entries are indices into `members`; empty if no member has weight.
pub(crate) fn populate(members: &[(&str, u32)], m: usize) -> Vec<u16> {
    let mut order: Vec<usize> = (0..members.len().min(MAX_BACKENDS))
        .filter(|&i| members[i].1 > 0)
        .collect();
    if order.is_empty() || m < 2 {
        return Vec::new();
    }
    order.sort_by(|&a, &b| members[a].0.cmp(members[b].0).then(a.cmp(&b)));
    let m64 = m as u64;
    let max_w = order
        .iter()
        .map(|&i| u64::from(members[i].1))
        .max()
        .unwrap_or(1);
    // Per member (in `order`): its next position in its permutation, and its credit.
    let mut pos: Vec<u64> = order
        .iter()
        .map(|&i| name_hash(members[i].0, 0) % m64)
        .collect();
    let skip: Vec<u64> = order
        .iter()
        .map(|&i| name_hash(members[i].0, 0x9e37_79b9_7f4a_7c15) % (m64 - 1) + 1)
        .collect();
    let mut credit = vec![0u64; order.len()];
    let mut table = vec![EMPTY; m];
    let mut filled = 0;
    loop {
        for (j, &i) in order.iter().enumerate() {
            credit[j] += u64::from(members[i].1);
            if credit[j] < max_w {
                continue;
            }
            credit[j] -= max_w;
            // The table is not full, so this ends within m steps (the permutation covers it).
            loop {
                let c = pos[j] as usize;
                pos[j] = (pos[j] + skip[j]) % m64;
                if table[c] == EMPTY {
                    table[c] = i as u16;
                    break;
                }
            }
            filled += 1;
            if filled == m {
                return table;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_prime(n: usize) -> bool {
        n >= 2
            && (2..)
                .take_while(|d| d * d <= n)
                .all(|d| !n.is_multiple_of(d))
    }

    #[test]
    fn sizes_are_primes_and_big_enough() {
        for m in TABLE_SIZES {
            assert!(is_prime(m), "{m}");
        }
        assert_eq!(table_size(3), 4093);
        assert_eq!(table_size(40), 4093);
        assert_eq!(table_size(41), 16381);
        assert_eq!(table_size(1_000_000), 1_048_573);
    }

    #[test]
    fn weights_give_proportional_entries_and_order_does_not_matter() {
        let a = populate(&[("a", 1), ("b", 1), ("c", 2)], 4093);
        let mut n = [0usize; 3];
        for &e in &a {
            n[usize::from(e)] += 1;
        }
        assert_eq!(n.iter().sum::<usize>(), 4093);
        assert!((1020..=1027).contains(&n[0]), "{n:?}");
        assert!((2044..=2050).contains(&n[2]), "{n:?}");
        // The same members listed in another order: the same backend at every entry.
        let b = populate(&[("c", 2), ("a", 1), ("b", 1)], 4093);
        let name_a = ["a", "b", "c"];
        let name_b = ["c", "a", "b"];
        assert!(a
            .iter()
            .zip(&b)
            .all(|(&x, &y)| name_a[usize::from(x)] == name_b[usize::from(y)]));
    }

    #[test]
    fn degenerate_inputs() {
        assert!(populate(&[], 4093).is_empty());
        assert!(populate(&[("a", 0)], 4093).is_empty());
        assert_eq!(populate(&[("a", u32::MAX), ("b", 1)], 7).len(), 7);
        assert!(populate(&[("a", 1)], 7).iter().all(|&e| e == 0));
    }
}
