//! Per-flow storage that never stops the data path to grow.
//!
//! A `HashMap` or `Vec` grows by doubling, and the doubling moves everything it holds at once: a
//! connection table of a quarter of a million entries stalled its data plane for 24 ms on the
//! insert that crossed 229 376 (the map's rehash), 45 ms at 458 752, plus the slot vector's
//! copies. Under a SYN flood those inserts come every few microseconds, and every packet queued
//! behind the stall waits (`dva bench flood` measured probe p99 of 40-80 ms from exactly that).
//! The kernel's conntrack avoids it the same way as here: a bucket array sized once for the
//! table's limit, chains through the entries, and entries in chunks that are added, never moved.
//!
//! - [`Chunked`]: a vector whose growth adds a fixed-size chunk (no element ever moves, so a push
//!   costs at most one chunk's allocation).
//! - [`FlowIndex`]: a chained hash index from a flow key to a small value, with its heads
//!   allocated zeroed once (the OS hands pages in as they are first touched, so an idle table
//!   costs little) and its nodes in a [`Chunked`]. Chains stay short because the heads are at least
//!   as many as the entries the table is sized for; beyond that they lengthen gracefully instead of
//!   rehashing. The hash is the table's seeded one ([`SeededState`]), so an attacker cannot aim
//!   keys at one chain.

use std::hash::BuildHasher;

use crate::hash::{MapKey, SeededState};

const CHUNK_BITS: u32 = 12;
const CHUNK: usize = 1 << CHUNK_BITS;

/// A vector grown a chunk ([`CHUNK`] elements) at a time; elements never move.
pub(crate) struct Chunked<T> {
    chunks: Vec<Vec<T>>,
    len: usize,
}

impl<T> Default for Chunked<T> {
    fn default() -> Self {
        Chunked {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Chunked<T> {
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn push(&mut self, v: T) {
        if self.len == self.chunks.len() << CHUNK_BITS {
            self.chunks.push(Vec::with_capacity(CHUNK));
        }
        if let Some(c) = self.chunks.last_mut() {
            c.push(v);
            self.len += 1;
        }
    }

    #[inline]
    pub(crate) fn get(&self, i: usize) -> Option<&T> {
        self.chunks.get(i >> CHUNK_BITS)?.get(i & (CHUNK - 1))
    }

    #[inline]
    pub(crate) fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.chunks
            .get_mut(i >> CHUNK_BITS)?
            .get_mut(i & (CHUNK - 1))
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        self.chunks.iter().flatten()
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> + '_ {
        self.chunks.iter_mut().flatten()
    }

    /// Elements `start..end` (clamped to the length).
    pub(crate) fn range(&self, start: usize, end: usize) -> impl Iterator<Item = &T> + '_ {
        let end = end.min(self.len);
        (start.min(end)..end).filter_map(move |i| self.get(i))
    }
}

impl<T> std::ops::Index<usize> for Chunked<T> {
    type Output = T;
    #[inline]
    fn index(&self, i: usize) -> &T {
        &self.chunks[i >> CHUNK_BITS][i & (CHUNK - 1)]
    }
}

impl<T> std::ops::IndexMut<usize> for Chunked<T> {
    #[inline]
    fn index_mut(&mut self, i: usize) -> &mut T {
        &mut self.chunks[i >> CHUNK_BITS][i & (CHUNK - 1)]
    }
}

/// No node: heads and `next` hold a node's index plus one.
const NIL: u32 = 0;
/// Fewest heads (a small table still spreads its keys).
const MIN_HEADS: usize = 1 << 10;
/// Most heads: 64 MiB of address space, touched only where used; a table sized beyond it gets
/// longer chains instead.
const MAX_HEADS: usize = 1 << 24;

struct Node<V> {
    key: MapKey,
    value: V,
    /// The next node of the chain (or of the free list), as index + 1.
    next: u32,
}

/// A hash index from flow keys to small values; see the module comment.
pub(crate) struct FlowIndex<V> {
    hasher: SeededState,
    heads: Vec<u32>,
    mask: usize,
    nodes: Chunked<Node<V>>,
    /// Free nodes, linked through `next` (index + 1).
    free: u32,
    len: usize,
}

impl<V: Copy> FlowIndex<V> {
    /// An index for about `entries` keys at most (the heads are allocated now, for that many).
    pub(crate) fn new(entries: usize, hasher: SeededState) -> FlowIndex<V> {
        let n = entries.clamp(MIN_HEADS, MAX_HEADS).next_power_of_two();
        FlowIndex {
            hasher,
            // Zeroed, so the allocator maps fresh pages and nothing is touched until used.
            heads: vec![NIL; n],
            mask: n - 1,
            nodes: Chunked::default(),
            free: NIL,
            len: 0,
        }
    }

    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[inline]
    fn head(&self, key: &MapKey) -> usize {
        (self.hasher.hash_one(key) as usize) & self.mask
    }

    #[inline]
    pub(crate) fn get(&self, key: &MapKey) -> Option<V> {
        let mut at = self.heads[self.head(key)];
        while at != NIL {
            let n = &self.nodes[(at - 1) as usize];
            if n.key == *key {
                return Some(n.value);
            }
            at = n.next;
        }
        None
    }

    /// Insert or replace; the value replaced.
    pub(crate) fn insert(&mut self, key: MapKey, value: V) -> Option<V> {
        let h = self.head(&key);
        let mut at = self.heads[h];
        while at != NIL {
            let n = &mut self.nodes[(at - 1) as usize];
            if n.key == key {
                return Some(std::mem::replace(&mut n.value, value));
            }
            at = n.next;
        }
        let next = self.heads[h];
        let node = Node { key, value, next };
        let id = if self.free != NIL {
            let id = self.free;
            let slot = &mut self.nodes[(id - 1) as usize];
            self.free = slot.next;
            *slot = node;
            id
        } else {
            // Node ids are u32 (+1): over four billion entries is far past any table's limit.
            let Ok(id) = u32::try_from(self.nodes.len() + 1) else {
                return None;
            };
            self.nodes.push(node);
            id
        };
        self.heads[h] = id;
        self.len += 1;
        None
    }

    pub(crate) fn remove(&mut self, key: &MapKey) -> Option<V> {
        let h = self.head(key);
        let mut prev = NIL;
        let mut at = self.heads[h];
        while at != NIL {
            let n = &self.nodes[(at - 1) as usize];
            let next = n.next;
            if n.key == *key {
                let value = n.value;
                if prev == NIL {
                    self.heads[h] = next;
                } else {
                    self.nodes[(prev - 1) as usize].next = next;
                }
                self.nodes[(at - 1) as usize].next = self.free;
                self.free = at;
                self.len -= 1;
                return Some(value);
            }
            prev = at;
            at = next;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dva_flow::FlowKey;
    use std::collections::HashMap;
    use std::net::{IpAddr, Ipv4Addr};

    fn key(i: u32) -> MapKey {
        MapKey(FlowKey {
            proto: 6,
            src: IpAddr::V4(Ipv4Addr::from(0xc612_0000 | (i >> 10))),
            dst: IpAddr::V4(Ipv4Addr::new(198, 18, 2, 2)),
            src_port: (i & 0x3ff) as u16,
            dst_port: 80,
        })
    }

    #[test]
    fn chunked_keeps_order_and_ranges() {
        let mut c = Chunked::default();
        for i in 0..(3 * CHUNK + 5) {
            c.push(i);
        }
        assert_eq!(c.len(), 3 * CHUNK + 5);
        assert_eq!(c[CHUNK], CHUNK);
        assert_eq!(c.get(3 * CHUNK + 5), None);
        assert!(c.iter().copied().eq(0..3 * CHUNK + 5));
        assert!(c
            .range(CHUNK - 2, CHUNK + 2)
            .copied()
            .eq(CHUNK - 2..CHUNK + 2));
        assert_eq!(c.range(10, 5).count(), 0);
        assert_eq!(c.range(3 * CHUNK, usize::MAX).count(), 5);
        *c.get_mut(7).expect("7") = 70;
        c[8] = 80;
        assert_eq!((c[7], c[8]), (70, 80));
    }

    /// The index agrees with std's map through inserts, replacements and removals, also far
    /// beyond the size it was made for (longer chains, same answers).
    #[test]
    fn index_matches_a_hashmap() {
        let mut idx = FlowIndex::new(1000, SeededState::random());
        let mut model = HashMap::new();
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        for step in 0..200_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = key((x % 50_000) as u32);
            match x % 3 {
                0 | 1 => assert_eq!(idx.insert(k, step), model.insert(k, step)),
                _ => assert_eq!(idx.remove(&k), model.remove(&k)),
            }
            assert_eq!(idx.len(), model.len());
        }
        for i in 0..50_000 {
            assert_eq!(idx.get(&key(i)), model.get(&key(i)).copied());
        }
        for k in model.keys() {
            assert!(idx.remove(k).is_some());
        }
        assert_eq!(idx.len(), 0);
        assert_eq!(idx.get(&key(1)), None);
    }
}
