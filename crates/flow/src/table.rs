//! The bucket table: which data plane owns each flow bucket, and who owned it before.
//!
//! Population follows Maglev (Eisenbud et al., NSDI'16, §3.4): every member has a permutation of the
//! buckets given by an `offset` and a `skip` drawn from two hashes of its id (the skip is odd, so with
//! a power-of-two size the permutation visits every bucket), and members take turns claiming their
//! next preferred free bucket. Taking turns gives each member `B / N` buckets, the first `B % N`
//! members (by id) one more.
//!
//! [`BucketTable::rebalance`] runs the same turn-taking with two changes that make it move only what
//! it must: each remaining member first keeps as many of its current buckets as its new share allows
//! (its most preferred ones), and the members that get the `+1` of the remainder are those that
//! already hold the most. The buckets that move are then exactly the removed members' buckets plus
//! each member's excess over its share, which is the least any balanced assignment can move.

use serde::{Deserialize, Serialize};

use crate::{FlowError, FlowKey, UnitId};

/// Bucket count of a new appliance.
pub const DEFAULT_BUCKETS: usize = 4096;
/// Bucket numbers travel as 16-bit values (backplane option, APIs).
pub const MAX_BUCKETS: usize = 1 << 16;
/// Previous owners remembered per bucket; older ones are forgotten (their flows are lost to punting).
pub const MAX_HISTORY: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    pub owner: UnitId,
    /// Previous owners, newest first; never contains `owner`.
    pub history: Vec<UnitId>,
}

impl Bucket {
    /// This bucket with `owner`: unchanged if it already owns it, else with the old owner at the
    /// front of the history (deduplicated, without the new owner, at most [`MAX_HISTORY`] long).
    fn moved_to(&self, owner: UnitId) -> Bucket {
        if owner == self.owner {
            return self.clone();
        }
        let mut history = Vec::with_capacity(MAX_HISTORY);
        for u in std::iter::once(self.owner).chain(self.history.iter().copied()) {
            if u != owner && !history.contains(&u) && history.len() < MAX_HISTORY {
                history.push(u);
            }
        }
        Bucket { owner, history }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawBucketTable")]
pub struct BucketTable {
    epoch: u64,
    buckets: Vec<Bucket>,
}

/// The unchecked wire form; a table from outside the process is validated before use, because
/// lookups rely on a power-of-two, non-empty bucket array.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBucketTable {
    epoch: u64,
    buckets: Vec<Bucket>,
}

impl TryFrom<RawBucketTable> for BucketTable {
    type Error = FlowError;

    fn try_from(raw: RawBucketTable) -> Result<Self, FlowError> {
        check_size(raw.buckets.len())?;
        for (i, b) in raw.buckets.iter().enumerate() {
            if b.history.contains(&b.owner) {
                return Err(FlowError::OwnerInHistory {
                    bucket: i,
                    owner: b.owner,
                });
            }
            if b.history.len() > MAX_HISTORY {
                return Err(FlowError::HistoryTooLong {
                    bucket: i,
                    len: b.history.len(),
                });
            }
        }
        Ok(BucketTable {
            epoch: raw.epoch,
            buckets: raw.buckets,
        })
    }
}

fn check_size(n: usize) -> Result<(), FlowError> {
    if n == 0 {
        Err(FlowError::ZeroBuckets)
    } else if !n.is_power_of_two() {
        Err(FlowError::NotPowerOfTwo(n))
    } else if n > MAX_BUCKETS {
        Err(FlowError::TooManyBuckets(n))
    } else {
        Ok(())
    }
}

/// Sorted, deduplicated: the table depends on the member set, not on the order it was listed in.
fn member_set(members: &[UnitId]) -> Result<Vec<UnitId>, FlowError> {
    let mut m = members.to_vec();
    m.sort_unstable();
    m.dedup();
    if m.is_empty() {
        return Err(FlowError::NoMembers);
    }
    Ok(m)
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A member's Maglev permutation of `n` (a power of two) buckets.
#[derive(Clone, Copy)]
struct Permutation {
    offset: usize,
    skip: usize,
    mask: usize,
}

impl Permutation {
    fn new(unit: UnitId, n: usize) -> Self {
        let mask = n - 1;
        // Two independent hashes of the id, fixed constants: every manager computes the same table.
        let h1 = splitmix64(u64::from(unit) ^ 0x6d61_676c_6576_3031);
        let h2 = splitmix64(u64::from(unit) ^ 0x736b_6970_5f5f_3032);
        Permutation {
            offset: h1 as usize & mask,
            skip: (h2 as usize & mask) | 1,
            mask,
        }
    }

    #[inline]
    fn at(&self, j: usize) -> usize {
        self.offset.wrapping_add(j.wrapping_mul(self.skip)) & self.mask
    }
}

/// Owner index (into `members`) of every bucket. `prev` holds the current owner of each bucket
/// (same length as the result) when rebalancing.
fn populate(n: usize, members: &[UnitId], prev: Option<&[Bucket]>) -> Vec<usize> {
    let nm = members.len();
    let perms: Vec<Permutation> = members.iter().map(|&u| Permutation::new(u, n)).collect();
    let mut quota = vec![n / nm; nm];
    let extra = n % nm;
    let mut owner: Vec<Option<usize>> = vec![None; n];
    let mut assigned = vec![0usize; nm];
    match prev {
        None => quota.iter_mut().take(extra).for_each(|q| *q += 1),
        Some(prev) => {
            let mut count = vec![0usize; nm];
            for b in prev {
                if let Ok(i) = members.binary_search(&b.owner) {
                    count[i] += 1;
                }
            }
            let mut order: Vec<usize> = (0..nm).collect();
            order.sort_by(|&a, &b| count[b].cmp(&count[a]).then(members[a].cmp(&members[b])));
            for &i in order.iter().take(extra) {
                quota[i] += 1;
            }
            // Keep each member's most preferred current buckets, up to its share.
            for (i, p) in perms.iter().enumerate() {
                let keep = count[i].min(quota[i]);
                let mut j = 0;
                while assigned[i] < keep && j < n {
                    let b = p.at(j);
                    if prev[b].owner == members[i] {
                        owner[b] = Some(i);
                        assigned[i] += 1;
                    }
                    j += 1;
                }
            }
        }
    }
    let mut filled: usize = assigned.iter().sum();
    let mut next = vec![0usize; nm];
    // Each round every member short of its share claims its next preferred free bucket. The
    // shares sum to `n`, so while one is short a free bucket exists and its permutation reaches it.
    while filled < n {
        for i in 0..nm {
            if assigned[i] == quota[i] {
                continue;
            }
            while next[i] < n {
                let b = perms[i].at(next[i]);
                next[i] += 1;
                if owner[b].is_none() {
                    owner[b] = Some(i);
                    assigned[i] += 1;
                    filled += 1;
                    break;
                }
            }
            if filled == n {
                break;
            }
        }
    }
    owner.into_iter().map(|o| o.unwrap_or(0)).collect()
}

impl BucketTable {
    /// A fresh Maglev table of `n_buckets` (a power of two, at most [`MAX_BUCKETS`]) over
    /// `members` (order and duplicates do not matter). Epoch 0, empty histories.
    pub fn maglev(n_buckets: usize, members: &[UnitId]) -> Result<BucketTable, FlowError> {
        check_size(n_buckets)?;
        let members = member_set(members)?;
        let buckets = populate(n_buckets, &members, None)
            .into_iter()
            .map(|i| Bucket {
                owner: members[i],
                history: Vec::new(),
            })
            .collect();
        Ok(BucketTable { epoch: 0, buckets })
    }

    /// The table for a new member set, same size, epoch + 1: balanced as [`BucketTable::maglev`]
    /// is (every member within one bucket of `len / N`), moving the fewest buckets a balanced
    /// table allows. A bucket whose owner changes gets the old owner at the front of its history
    /// (deduplicated, without the new owner, at most [`MAX_HISTORY`] long).
    pub fn rebalance(&self, members: &[UnitId]) -> Result<BucketTable, FlowError> {
        let members = member_set(members)?;
        let owners = populate(self.buckets.len(), &members, Some(&self.buckets));
        let buckets = self
            .buckets
            .iter()
            .zip(owners)
            .map(|(old, i)| old.moved_to(members[i]))
            .collect();
        Ok(BucketTable {
            epoch: self.epoch + 1,
            buckets,
        })
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Always false for a table built by this crate or deserialized through it.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Incremented by every [`BucketTable::rebalance`]; carried on the backplane so a unit can tell
    /// a packet routed by an older table.
    #[inline]
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The bucket of a flow hash (`hash & (len - 1)`).
    #[inline]
    pub fn bucket_of(&self, hash: u32) -> u16 {
        (hash as usize & self.mask()) as u16
    }

    /// The bucket of a flow, either direction.
    #[inline]
    pub fn bucket_of_key(&self, key: &FlowKey) -> u16 {
        self.bucket_of(key.symmetric_hash())
    }

    /// The current owner of `bucket` (taken modulo `len`, so an out-of-range number from a peer
    /// cannot panic; use [`BucketTable::get`] to reject one instead).
    #[inline]
    pub fn owner(&self, bucket: u16) -> UnitId {
        self.bucket(bucket).owner
    }

    /// `bucket` is taken modulo `len`, as in [`BucketTable::owner`].
    #[inline]
    pub fn bucket(&self, bucket: u16) -> &Bucket {
        &self.buckets[usize::from(bucket) & self.mask()]
    }

    /// The bucket, or `None` if the number is out of range.
    #[inline]
    pub fn get(&self, bucket: u16) -> Option<&Bucket> {
        self.buckets.get(usize::from(bucket))
    }

    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    /// Drop `unit` from a bucket's history (the manager does this once `unit` holds no flows there).
    /// Returns whether it was there. The epoch does not change: ownership did not.
    pub fn retire(&mut self, bucket: u16, unit: UnitId) -> bool {
        let Some(b) = self.buckets.get_mut(usize::from(bucket)) else {
            return false;
        };
        let before = b.history.len();
        b.history.retain(|&u| u != unit);
        b.history.len() != before
    }

    /// Backup owner of every bucket: the member that would own it if its owner left, i.e. the
    /// bucket's owner in `self.rebalance(members without the owner)`. Rebalancing is deterministic,
    /// so when an owner dies and the manager rebalances without it, each of its buckets goes to
    /// exactly the data plane that has been receiving its flows' replicated state. With a single
    /// member there is no backup at all: an empty list, so nobody replicates to nobody.
    pub fn backups(&self) -> Vec<UnitId> {
        self.backups_apart(&|_| None)
    }

    /// Backups as [`BucketTable::backups`] chooses them, but never on the owner's host when
    /// another host has a member: the backup of a member's buckets is their owner in
    /// `rebalance(members on other hosts)`. A machine's loss takes every data plane on it at once,
    /// so a backup beside its owner would die with it and its flows' state with both. `host_of`
    /// names each member's host. A member it does not know is nobody's backup while a member on a
    /// known other host can be: it may share the owner's machine (a manager that took over knows
    /// the hosts of the units still desired, not of the dead ones its adopted table still names,
    /// and two dead units of one machine must not back each other up). When every member shares
    /// one host, or none is known, this is exactly [`BucketTable::backups`].
    ///
    /// The manager must then fail over with [`BucketTable::transition`] and these backups: a
    /// single member's loss (its host still up) no longer lands where `rebalance` would put it.
    pub fn backups_apart(&self, host_of: &dyn Fn(UnitId) -> Option<String>) -> Vec<UnitId> {
        let members = self.members();
        if members.len() < 2 {
            return Vec::new();
        }
        let hosts: Vec<Option<String>> = members.iter().map(|&m| host_of(m)).collect();
        let mut backup = vec![0; self.buckets.len()];
        for (i, &m) in members.iter().enumerate() {
            let others = |apart: bool| -> Vec<UnitId> {
                members
                    .iter()
                    .zip(&hosts)
                    .filter(|&(&u, h)| u != m && !(apart && (h.is_none() || *h == hosts[i])))
                    .map(|(&u, _)| u)
                    .collect()
            };
            let mut rest = others(true);
            if rest.is_empty() {
                rest = others(false);
            }
            let Ok(without) = self.rebalance(&rest) else {
                continue;
            };
            for (b, bucket) in self.buckets.iter().enumerate() {
                if bucket.owner == m {
                    backup[b] = without.buckets[b].owner;
                }
            }
        }
        backup
    }

    /// Move to `members` the way failover needs: members that leave go first, each of their
    /// buckets to its backup in `backups` (what the data planes replicated to: see
    /// [`BucketTable::backups`] and [`BucketTable::backups_apart`]) if that one stays, else where
    /// `rebalance(staying)` puts it; the other buckets keep their owners. Then the new members
    /// join by [`BucketTable::rebalance`]. Done as one direct rebalance, a dead member's buckets
    /// could go straight to a newcomer with no state and only the dead member to punt to; in two
    /// steps the backup that holds the replicated state stays in the moved bucket's history.
    pub fn transition(
        &self,
        members: &[UnitId],
        backups: &[UnitId],
    ) -> Result<BucketTable, FlowError> {
        let current = self.members();
        let staying: Vec<UnitId> = current
            .iter()
            .copied()
            .filter(|m| members.contains(m))
            .collect();
        if staying.is_empty() || staying.len() == current.len() {
            return self.rebalance(members);
        }
        let fallback = self.rebalance(&staying)?;
        let buckets = self
            .buckets
            .iter()
            .enumerate()
            .map(|(b, old)| {
                if staying.contains(&old.owner) {
                    return old.clone();
                }
                let owner = backups
                    .get(b)
                    .copied()
                    .filter(|u| staying.contains(u))
                    .unwrap_or(fallback.buckets[b].owner);
                old.moved_to(owner)
            })
            .collect();
        let failed_over = BucketTable {
            epoch: self.epoch + 1,
            buckets,
        };
        let mut joining: Vec<UnitId> = members.to_vec();
        joining.sort_unstable();
        joining.dedup();
        if joining == staying {
            return Ok(failed_over);
        }
        failed_over.rebalance(members)
    }

    /// Distinct owners, sorted.
    pub fn members(&self) -> Vec<UnitId> {
        let mut m: Vec<UnitId> = self.buckets.iter().map(|b| b.owner).collect();
        m.sort_unstable();
        m.dedup();
        m
    }

    /// Number of buckets `unit` owns.
    pub fn owned_by(&self, unit: UnitId) -> usize {
        self.buckets.iter().filter(|b| b.owner == unit).count()
    }

    /// Buckets whose owner differs between `self` and `other` (tables of different sizes: every
    /// bucket of the larger one counts as moved beyond the smaller one's range).
    pub fn moved_buckets(&self, other: &BucketTable) -> usize {
        let common = self
            .buckets
            .iter()
            .zip(&other.buckets)
            .filter(|(a, b)| a.owner != b.owner)
            .count();
        common + self.len().abs_diff(other.len())
    }

    /// True if `unit` owns or previously owned `bucket` (a packet punted to it is legitimate).
    pub fn knows(&self, bucket: u16, unit: UnitId) -> bool {
        self.get(bucket)
            .is_some_and(|b| b.owner == unit || b.history.contains(&unit))
    }

    #[inline]
    fn mask(&self) -> usize {
        self.buckets.len().wrapping_sub(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Rng;

    const B: usize = DEFAULT_BUCKETS;

    fn ids(n: u32) -> Vec<UnitId> {
        (0..n).map(|i| 11 + i * 7).collect()
    }

    fn assert_balanced(t: &BucketTable, members: &[UnitId]) {
        let n = members.len();
        for &m in members {
            let got = t.owned_by(m);
            // Maglev turn-taking gives floor or ceil of B/N; the brief asks for ±10%.
            assert!(
                got == t.len() / n || got == t.len().div_ceil(n),
                "unit {m}: {got} of {}",
                t.len()
            );
            let ideal = t.len() as f64 / n as f64;
            assert!((got as f64 - ideal).abs() <= ideal * 0.10);
        }
        assert_eq!(t.members(), {
            let mut m = members.to_vec();
            m.sort_unstable();
            m
        });
    }

    fn check_history_invariants(t: &BucketTable) {
        for b in t.buckets() {
            assert!(!b.history.contains(&b.owner));
            assert!(b.history.len() <= MAX_HISTORY);
            let mut h = b.history.clone();
            h.sort_unstable();
            h.dedup();
            assert_eq!(
                h.len(),
                b.history.len(),
                "duplicate in history {:?}",
                b.history
            );
        }
    }

    #[test]
    fn rejects_bad_sizes_and_members() {
        assert_eq!(BucketTable::maglev(0, &[1]), Err(FlowError::ZeroBuckets));
        assert_eq!(
            BucketTable::maglev(1000, &[1]),
            Err(FlowError::NotPowerOfTwo(1000))
        );
        assert_eq!(
            BucketTable::maglev(1 << 17, &[1]),
            Err(FlowError::TooManyBuckets(1 << 17))
        );
        assert_eq!(BucketTable::maglev(16, &[]), Err(FlowError::NoMembers));
        let t = BucketTable::maglev(16, &[1]).unwrap();
        assert_eq!(t.rebalance(&[]), Err(FlowError::NoMembers));
        assert!(FlowError::NotPowerOfTwo(1000).to_string().contains("1000"));
    }

    #[test]
    fn tiny_tables() {
        let t = BucketTable::maglev(1, &[5, 6]).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t.owner(t.bucket_of(0xdead_beef)), 5);
        let t = BucketTable::maglev(2, &[5, 6, 7]).unwrap();
        assert_eq!(t.members().len(), 2);
        let t2 = t.rebalance(&[7]).unwrap();
        assert_eq!(t2.members(), vec![7]);
        check_history_invariants(&t2);
    }

    #[test]
    fn maglev_is_balanced_and_order_independent() {
        for n in 1..=9 {
            let m = ids(n);
            let t = BucketTable::maglev(B, &m).unwrap();
            assert_eq!(t.len(), B);
            assert!(!t.is_empty());
            assert_eq!(t.epoch(), 0);
            assert_balanced(&t, &m);
            let mut rev = m.clone();
            rev.reverse();
            rev.push(m[0]);
            assert_eq!(BucketTable::maglev(B, &rev).unwrap(), t);
        }
    }

    #[test]
    fn maglev_interleaves_members() {
        // Maglev spreads each member's buckets over the table instead of handing out ranges.
        let t = BucketTable::maglev(B, &ids(4)).unwrap();
        for chunk in t.buckets().chunks(64) {
            let mut owners: Vec<_> = chunk.iter().map(|b| b.owner).collect();
            owners.sort_unstable();
            owners.dedup();
            assert_eq!(owners.len(), 4);
        }
    }

    #[test]
    fn rebalance_same_members_moves_nothing() {
        for n in 1..=8 {
            let t = BucketTable::maglev(B, &ids(n)).unwrap();
            let t2 = t.rebalance(&ids(n)).unwrap();
            assert_eq!(t.moved_buckets(&t2), 0);
            assert_eq!(t2.epoch(), 1);
            assert!(t2.buckets().iter().all(|b| b.history.is_empty()));
        }
    }

    #[test]
    fn adding_a_member_moves_at_most_its_share() {
        let slack = B / 50; // 2% of B
        for n in 1..=8u32 {
            let before = ids(n);
            let t = BucketTable::maglev(B, &before).unwrap();
            let mut after = before.clone();
            after.push(1000 + n);
            let t2 = t.rebalance(&after).unwrap();
            let moved = t.moved_buckets(&t2);
            let share = B / (n as usize + 1);
            assert!(
                moved <= share + slack,
                "N={n}: moved {moved}, share {share}"
            );
            // Only the new member gains buckets: nothing moves between old members.
            for (a, b) in t.buckets().iter().zip(t2.buckets()) {
                assert!(a.owner == b.owner || b.owner == 1000 + n);
            }
            assert_balanced(&t2, &after);
            assert_eq!(t2.epoch(), 1);
            check_history_invariants(&t2);
        }
    }

    #[test]
    fn removing_a_member_moves_only_its_buckets() {
        let slack = B / 50;
        for n in 2..=9u32 {
            let before = ids(n);
            let t = BucketTable::maglev(B, &before).unwrap();
            for gone in [
                before[0],
                before[before.len() / 2],
                before[before.len() - 1],
            ] {
                let after: Vec<_> = before.iter().copied().filter(|&u| u != gone).collect();
                let t2 = t.rebalance(&after).unwrap();
                let moved = t.moved_buckets(&t2);
                let share = B / n as usize;
                assert!(
                    moved <= share + slack,
                    "N={n}: moved {moved}, share {share}"
                );
                assert_eq!(
                    moved,
                    t.owned_by(gone),
                    "only the leaving unit's buckets move"
                );
                assert_eq!(t2.owned_by(gone), 0);
                assert_balanced(&t2, &after);
                check_history_invariants(&t2);
            }
        }
    }

    #[test]
    fn rebalance_is_deterministic_and_close_to_fresh_maglev() {
        // Two managers computing the same change agree, and the result stays Maglev-like.
        let t = BucketTable::maglev(B, &ids(4)).unwrap();
        let a = t.rebalance(&ids(5)).unwrap();
        let b = t.rebalance(&ids(5)).unwrap();
        assert_eq!(a, b);
        let fresh = BucketTable::maglev(B, &ids(5)).unwrap();
        assert!(
            a.moved_buckets(&fresh) < B / 4,
            "{}",
            a.moved_buckets(&fresh)
        );
    }

    #[test]
    fn history_records_previous_owners() {
        let t = BucketTable::maglev(B, &[1, 2, 3]).unwrap();
        let t2 = t.rebalance(&[1, 2, 3, 4]).unwrap();
        let mut moved = 0;
        for (i, (a, b)) in t.buckets().iter().zip(t2.buckets()).enumerate() {
            if a.owner != b.owner {
                moved += 1;
                assert_eq!(b.owner, 4);
                assert_eq!(b.history, vec![a.owner], "bucket {i}");
            } else {
                assert!(b.history.is_empty());
            }
        }
        assert!(moved > 0);

        // Scale in 4 again: buckets go back, possibly to their earlier owner, which must then
        // leave the history while 4 enters it.
        let t3 = t2.rebalance(&[1, 2, 3]).unwrap();
        for (a, b) in t2.buckets().iter().zip(t3.buckets()) {
            if a.owner == 4 {
                assert_ne!(b.owner, 4);
                assert_eq!(b.history[0], 4);
                assert!(!b.history.contains(&b.owner));
            }
        }
        check_history_invariants(&t3);
        assert_eq!(t3.epoch(), 2);
    }

    #[test]
    fn history_is_capped_and_deduplicated() {
        let mut t = BucketTable::maglev(64, &[1]).unwrap();
        for u in 2..=10 {
            t = t.rebalance(&[u]).unwrap();
            check_history_invariants(&t);
        }
        let b = t.bucket(0);
        assert_eq!(b.owner, 10);
        assert_eq!(b.history, vec![9, 8, 7, 6]);
        // Coming back to an owner still in the history moves it out and the current one in front.
        let t2 = t.rebalance(&[8]).unwrap();
        assert_eq!(t2.bucket(0).history, vec![10, 9, 7, 6]);
    }

    #[test]
    fn retire_removes_from_history() {
        let t = BucketTable::maglev(B, &[1, 2]).unwrap();
        let mut t2 = t.rebalance(&[1, 2, 3]).unwrap();
        let (i, prev) = t2
            .buckets()
            .iter()
            .enumerate()
            .find_map(|(i, b)| b.history.first().map(|&p| (i as u16, p)))
            .unwrap();
        assert!(t2.knows(i, prev));
        assert!(t2.retire(i, prev));
        assert!(t2.bucket(i).history.is_empty());
        assert!(!t2.knows(i, prev));
        assert!(!t2.retire(i, prev), "second retire finds nothing");
        assert!(!t2.retire(u16::MAX, prev), "out of range bucket");
        assert_eq!(t2.epoch(), 1);
    }

    #[test]
    fn lookups_never_panic() {
        let t = BucketTable::maglev(16, &[1, 2]).unwrap();
        for b in [0u16, 15, 16, 1000, u16::MAX] {
            let _ = t.owner(b);
            let _ = t.bucket(b);
        }
        assert!(t.get(16).is_none());
        assert!(t.get(15).is_some());
        assert!(t.bucket_of(u32::MAX) < 16);
    }

    #[test]
    fn both_directions_land_in_one_bucket() {
        let t = BucketTable::maglev(B, &ids(5)).unwrap();
        let mut rng = Rng::new(7);
        for v6 in [false, true] {
            for _ in 0..5000 {
                let k = rng.key(v6);
                assert_eq!(t.bucket_of_key(&k), t.bucket_of_key(&k.reversed()));
                assert_eq!(
                    t.owner(t.bucket_of_key(&k)),
                    t.owner(t.bucket_of_key(&k.reversed()))
                );
            }
        }
    }

    #[test]
    fn flows_spread_over_members() {
        let m = ids(4);
        let t = BucketTable::maglev(B, &m).unwrap();
        let mut rng = Rng::new(9);
        let mut per = std::collections::HashMap::new();
        let flows = 40_000;
        for _ in 0..flows {
            *per.entry(t.owner(t.bucket_of_key(&rng.key(false))))
                .or_insert(0usize) += 1;
        }
        for &u in &m {
            let c = per[&u];
            assert!((9_000..11_000).contains(&c), "unit {u}: {c}");
        }
    }

    #[test]
    fn a_dead_owners_buckets_go_to_their_backups() {
        let t = BucketTable::maglev(1024, &[1, 2, 3, 4]).unwrap();
        let backups = t.backups();
        for dead in [1, 2, 3, 4] {
            let rest: Vec<UnitId> = [1, 2, 3, 4].into_iter().filter(|&u| u != dead).collect();
            let after = t.rebalance(&rest).unwrap();
            for b in 0..1024u16 {
                let owner = t.owner(b);
                let backup = backups[usize::from(b)];
                assert_ne!(backup, owner, "a backup differs from its owner");
                assert_ne!(backup, 0);
                if owner == dead {
                    assert_eq!(after.owner(b), backup, "bucket {b} of dead {dead}");
                }
            }
        }
        // Backups spread over the other members rather than all landing on one.
        let of_1: std::collections::BTreeSet<UnitId> = (0..1024u16)
            .filter(|&b| t.owner(b) == 1)
            .map(|b| backups[usize::from(b)])
            .collect();
        assert_eq!(of_1.len(), 3);
        assert!(BucketTable::maglev(64, &[7]).unwrap().backups().is_empty());
    }

    #[test]
    fn backups_apart_survive_the_loss_of_a_whole_host() {
        // Units 1 and 2 on host a, 3 and 4 on host b, 5 somewhere unknown.
        let host_of = |u: UnitId| match u {
            1 | 2 => Some("a".to_string()),
            3 | 4 => Some("b".to_string()),
            _ => None,
        };
        let t = BucketTable::maglev(1024, &[1, 2, 3, 4, 5]).unwrap();
        let backups = t.backups_apart(&host_of);
        for b in 0..1024u16 {
            let (owner, backup) = (t.owner(b), backups[usize::from(b)]);
            assert_ne!(backup, 0);
            assert_ne!(backup, owner);
            if owner != 5 {
                assert_ne!(
                    host_of(backup),
                    host_of(owner),
                    "bucket {b}: backup beside owner"
                );
            }
        }
        // Host a dies: every bucket of 1 and 2 goes to the backup holding its state.
        let after = t.transition(&[3, 4, 5], &backups).unwrap();
        // One member dies, its host lives on: its buckets still go to their backups.
        let one = t.transition(&[2, 3, 4, 5], &backups).unwrap();
        // Host a dies and a replacement joins in the same change: the backup stays in history.
        let replaced = t.transition(&[3, 4, 5, 6], &backups).unwrap();
        for b in 0..1024u16 {
            let (owner, backup) = (t.owner(b), backups[usize::from(b)]);
            if owner == 1 || owner == 2 {
                assert_eq!(after.owner(b), backup, "bucket {b} after host a's loss");
                assert_eq!(after.bucket(b).history.first(), Some(&owner));
                let r = replaced.bucket(b);
                assert!(
                    r.owner == backup || r.history.first() == Some(&backup),
                    "{b}: {r:?}"
                );
            } else {
                assert_eq!(after.owner(b), owner, "bucket {b} of a survivor moved");
            }
            if owner == 1 {
                assert_eq!(one.owner(b), backup, "bucket {b} after unit 1's loss");
            } else {
                assert_eq!(one.owner(b), owner, "bucket {b} of a survivor moved");
            }
        }
        assert!(after.epoch() > t.epoch());
        // Everyone on one host: the same backups as without hosts.
        let same = t.backups_apart(&|_| Some("a".to_string()));
        assert_eq!(same, t.backups());
        assert_eq!(t.backups_apart(&|_| None), same, "no host known");
    }

    #[test]
    fn members_of_unknown_hosts_back_up_nobody() {
        // A manager that took over: 3 and 8 (dead, one machine) are in the adopted table but not
        // in what it was told, so their hosts are unknown; 7 and 9 are on machines of their own.
        let host_of = |u: UnitId| match u {
            7 => Some("dp4".to_string()),
            9 => Some("dp3".to_string()),
            _ => None,
        };
        let t = BucketTable::maglev(4096, &[3, 7, 8, 9]).unwrap();
        let backups = t.backups_apart(&host_of);
        for b in 0..4096u16 {
            let backup = backups[usize::from(b)];
            assert!(
                backup == 7 || backup == 9,
                "bucket {b} of {} backed up by {backup}",
                t.owner(b)
            );
            assert_ne!(backup, t.owner(b));
        }
        // Their loss leaves every bucket with its state.
        let after = t.transition(&[7, 9], &backups).unwrap();
        for b in 0..4096u16 {
            let owner = t.owner(b);
            if owner == 3 || owner == 8 {
                assert_eq!(after.owner(b), backups[usize::from(b)]);
            }
        }
    }

    #[test]
    fn a_dead_owner_replaced_at_once_leaves_its_backup_in_history() {
        let t = BucketTable::maglev(1024, &[1, 2, 3]).unwrap();
        let backups = t.backups();
        // Unit 3 dies and unit 4 replaces it in the same change.
        let after = t.transition(&[1, 2, 4], &backups).unwrap();
        let mut to_newcomer = 0;
        for b in 0..1024u16 {
            if t.owner(b) != 3 {
                continue;
            }
            let backup = backups[usize::from(b)];
            let nb = after.bucket(b);
            // Either the backup owns it, or it is the newest previous owner (punt target).
            if nb.owner == backup {
                continue;
            }
            assert_eq!(nb.owner, 4, "bucket {b}");
            assert_eq!(nb.history.first(), Some(&backup), "bucket {b}: {nb:?}");
            to_newcomer += 1;
        }
        assert!(
            to_newcomer > 0,
            "the newcomer takes some of the dead unit's buckets"
        );
        assert_eq!(after.members(), vec![1, 2, 4]);
        // Plain joins and leaves are ordinary rebalances.
        assert_eq!(
            t.transition(&[1, 2, 3, 4], &backups).unwrap().buckets(),
            t.rebalance(&[1, 2, 3, 4]).unwrap().buckets()
        );
    }

    #[test]
    fn serde_round_trip_and_validation() {
        let t = BucketTable::maglev(8, &[1, 2])
            .unwrap()
            .rebalance(&[1, 2, 3])
            .unwrap();
        let s = serde_json::to_string(&t).unwrap();
        let back: BucketTable = serde_json::from_str(&s).unwrap();
        assert_eq!(back, t);

        let bad = r#"{"epoch":1,"buckets":[{"owner":1,"history":[]},{"owner":1,"history":[]},{"owner":2,"history":[]}]}"#;
        let e = serde_json::from_str::<BucketTable>(bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a power of two"), "{e}");
        let empty = r#"{"epoch":1,"buckets":[]}"#;
        assert!(serde_json::from_str::<BucketTable>(empty).is_err());
        let loop_ = r#"{"epoch":1,"buckets":[{"owner":1,"history":[2,1]}]}"#;
        let e = serde_json::from_str::<BucketTable>(loop_)
            .unwrap_err()
            .to_string();
        assert!(e.contains("owner 1"), "{e}");
        let long = r#"{"epoch":1,"buckets":[{"owner":1,"history":[2,3,4,5,6]}]}"#;
        assert!(serde_json::from_str::<BucketTable>(long).is_err());
        let unknown = r#"{"epoch":1,"buckets":[{"owner":1,"history":[]}],"x":1}"#;
        assert!(serde_json::from_str::<BucketTable>(unknown).is_err());
    }
}
