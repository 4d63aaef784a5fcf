//! The binding table NAT and LB share: one entry per translated flow, found from either direction.
//!
//! - A [`Binding`] maps the flow's original tuple (`orig`, its first packet as it arrived) to the
//!   translated one (`xlat`, that packet as it left). Packets with key `orig` are the original
//!   direction; packets with key `xlat.reversed()` (the reply as it arrives) are the reply
//!   direction. Both keys are in one map, so a tuple belongs to at most one binding in either role:
//!   that is what makes a translated 5-tuple "in use" for the port allocator.
//! - Every binding carries its flow bucket ([`Binding::bucket`]); per-bucket counts, export and
//!   removal by bucket serve state moves between data planes (DESIGN.md §2).
//! - Each binding has a `tag` the owner chooses (LB: the backend), with a live count per tag.
//! - Idle timeouts by protocol state ([`BindingTimeouts`]). Expiry works as in conntrack: one FIFO
//!   per timeout class, sorted by construction because `now` only grows; a refresh pushes nothing,
//!   a change to a shorter class pushes one record, stale records are recognised by id. Lookups
//!   never see an expired binding; memory is reclaimed by [`BindingTable::expire`] in slices.

use std::collections::VecDeque;

use dva_flow::FlowKey;
use dva_wire::ip_proto;
use serde::{Deserialize, Serialize};

use crate::conntrack::Direction;
use crate::hash::{MapKey, SeededState};
use crate::index::{Chunked, FlowIndex};

const NS_PER_SEC: u64 = 1_000_000_000;

/// Idle timeouts of bindings, in seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BindingTimeouts {
    /// TCP until traffic was seen both ways.
    pub tcp_unreplied: u64,
    /// TCP once traffic was seen both ways.
    pub tcp_established: u64,
    /// TCP after a RST, or a FIN each way.
    pub tcp_closing: u64,
    pub udp_unreplied: u64,
    pub udp_replied: u64,
    /// ICMP / ICMPv6 echo.
    pub icmp: u64,
}

impl Default for BindingTimeouts {
    fn default() -> Self {
        BindingTimeouts {
            tcp_unreplied: 120,
            tcp_established: 7200,
            tcp_closing: 10,
            udp_unreplied: 30,
            udp_replied: 180,
            icmp: 30,
        }
    }
}

const N_CLASSES: usize = 6;

impl BindingTimeouts {
    fn table_ns(&self) -> [u64; N_CLASSES] {
        let s = |secs: u64| secs.saturating_mul(NS_PER_SEC);
        [
            s(self.tcp_unreplied),
            s(self.tcp_established),
            s(self.tcp_closing),
            s(self.udp_unreplied),
            s(self.udp_replied),
            s(self.icmp),
        ]
    }
}

/// What a binding has seen, enough to pick its timeout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct FlowState {
    /// A packet went the reply way.
    pub replied: bool,
    /// TCP: a FIN went the original way.
    pub fin_orig: bool,
    /// TCP: a FIN went the reply way.
    pub fin_reply: bool,
    /// TCP: a RST went either way.
    pub rst: bool,
}

impl FlowState {
    /// TCP connection over: a RST, or a FIN each way. A new SYN then starts a new flow.
    pub fn closing(self) -> bool {
        self.rst || (self.fin_orig && self.fin_reply)
    }

    fn class(self, p: u8) -> usize {
        match p {
            ip_proto::TCP if self.closing() => 2,
            ip_proto::TCP if self.replied => 1,
            ip_proto::TCP => 0,
            ip_proto::ICMP | ip_proto::ICMPV6 => 5,
            _ if self.replied => 4,
            _ => 3,
        }
    }
}

/// One translated flow: everything needed to move it to another data plane (serde).
///
/// Timestamps are on the owning process's monotonic clock; import resets them to the importer's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// Flow bucket of the flow (both directions dispatch to it).
    pub bucket: u16,
    /// The flow's first packet as it arrived.
    pub orig: FlowKey,
    /// That packet as it left (same protocol and family).
    pub xlat: FlowKey,
    pub state: FlowState,
    pub created: u64,
    pub last_seen: u64,
}

impl Binding {
    /// The key of reply packets as they arrive.
    #[inline]
    pub fn reply_key(&self) -> FlowKey {
        self.xlat.reversed()
    }

    /// `(from, to)`: the tuple a packet going `dir` arrives with and the one it leaves with.
    #[inline]
    pub fn translation(&self, dir: Direction) -> (FlowKey, FlowKey) {
        match dir {
            Direction::Original => (self.orig, self.xlat),
            Direction::Reply => (self.xlat.reversed(), self.orig.reversed()),
        }
    }

    fn is_consistent(&self) -> bool {
        let v4 = self.orig.src.is_ipv4();
        self.orig.proto == self.xlat.proto
            && [self.orig.dst, self.xlat.src, self.xlat.dst]
                .iter()
                .all(|a| a.is_ipv4() == v4)
            && self.orig != self.reply_key()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    #[error("binding table full ({max} bindings)")]
    TableFull { max: usize },
    #[error("{key} already belongs to a binding")]
    Exists { key: FlowKey },
    #[error("inconsistent binding: {orig} translated to {xlat}")]
    Invalid { orig: FlowKey, xlat: FlowKey },
}

struct Entry {
    b: Binding,
    tag: u32,
    expires: u64,
    record: u64,
    queued_deadline: u64,
}

struct Record {
    slot: u32,
    id: u64,
    deadline: u64,
}

pub(crate) struct BindingTable {
    max: usize,
    timeouts_ns: [u64; N_CLASSES],
    /// Both keys of each binding to its slot; sized once for the limit (see [`crate::index`]: no
    /// growth stalls).
    map: FlowIndex<(u32, Direction)>,
    slots: Chunked<Option<Entry>>,
    free: Vec<u32>,
    len: usize,
    queues: [VecDeque<Record>; N_CLASSES],
    cursor: usize,
    next_record: u64,
    per_bucket: Vec<u32>,
    per_tag: Vec<u32>,
}

impl BindingTable {
    pub fn new(max: usize, timeouts: &BindingTimeouts) -> BindingTable {
        BindingTable {
            max,
            timeouts_ns: timeouts.table_ns(),
            map: FlowIndex::new(max.saturating_mul(2), SeededState::random()),
            slots: Chunked::default(),
            free: Vec::new(),
            len: 0,
            queues: Default::default(),
            cursor: 0,
            next_record: 0,
            per_bucket: Vec::new(),
            per_tag: Vec::new(),
        }
    }

    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// New timeouts apply from each binding's next packet.
    pub fn set_timeouts(&mut self, t: &BindingTimeouts) {
        self.timeouts_ns = t.table_ns();
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// The live binding `key` belongs to, and the direction of a packet with that key. An expired
    /// binding found on the way is removed.
    #[inline]
    pub fn lookup(&mut self, now: u64, key: &FlowKey) -> Option<(u32, Direction)> {
        let (slot, dir) = self.map.get(&MapKey(*key))?;
        let e = self.entry(slot)?;
        if e.expires <= now {
            self.remove_slot(slot);
            return None;
        }
        Some((slot, dir))
    }

    /// No live binding uses `key` in either role.
    #[inline]
    pub fn is_free(&mut self, now: u64, key: &FlowKey) -> bool {
        self.lookup(now, key).is_none()
    }

    /// Room for one more binding (collecting a few expired ones if that makes room).
    pub fn has_room(&mut self, now: u64) -> bool {
        if self.len < self.max {
            return true;
        }
        self.expire(now, 64);
        self.len < self.max
    }

    pub fn get(&self, slot: u32) -> Option<&Binding> {
        self.entry(slot).map(|e| &e.b)
    }

    pub fn tag(&self, slot: u32) -> Option<u32> {
        self.entry(slot).map(|e| e.tag)
    }

    /// Live bindings with `tag`.
    pub fn tagged(&self, tag: u32) -> u32 {
        self.per_tag.get(tag as usize).copied().unwrap_or(0)
    }

    /// Add a binding. Its keys must be free.
    pub fn insert(&mut self, now: u64, b: Binding, tag: u32) -> Result<u32, BindingError> {
        if !b.is_consistent() {
            return Err(BindingError::Invalid {
                orig: b.orig,
                xlat: b.xlat,
            });
        }
        for k in [b.orig, b.reply_key()] {
            if !self.is_free(now, &k) {
                return Err(BindingError::Exists { key: k });
            }
        }
        if !self.has_room(now) {
            return Err(BindingError::TableFull { max: self.max });
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                let s = u32::try_from(self.slots.len())
                    .map_err(|_| BindingError::TableFull { max: self.max })?;
                self.slots.push(None);
                s
            }
        };
        self.map.insert(MapKey(b.orig), (slot, Direction::Original));
        self.map
            .insert(MapKey(b.reply_key()), (slot, Direction::Reply));
        bump(&mut self.per_bucket, usize::from(b.bucket));
        bump(&mut self.per_tag, tag as usize);
        let class = b.state.class(b.orig.proto);
        let expires = now.saturating_add(self.timeouts_ns[class]);
        self.slots[slot as usize] = Some(Entry {
            b,
            tag,
            expires,
            record: 0,
            queued_deadline: u64::MAX,
        });
        self.len += 1;
        self.enqueue(slot, class, expires);
        Ok(slot)
    }

    /// Take over a binding from another data plane: timestamps restart at `now`, so it gets a
    /// full timeout in its state.
    pub fn import(&mut self, now: u64, mut b: Binding, tag: u32) -> Result<u32, BindingError> {
        b.created = now;
        b.last_seen = now;
        self.insert(now, b, tag)
    }

    /// Insert or replace (a replica kept for failover): bindings holding either key go first.
    pub fn upsert(&mut self, now: u64, b: Binding, tag: u32) -> Result<u32, BindingError> {
        for k in [b.orig, b.reply_key()] {
            if let Some((slot, _)) = self.map.get(&MapKey(k)) {
                self.remove_slot(slot);
            }
        }
        self.import(now, b, tag)
    }

    /// A packet of binding `slot` went `dir`: update its state and timeout.
    pub fn touch(&mut self, now: u64, slot: u32, dir: Direction, tcp_flags: u8) {
        let Some(e) = self.slots.get_mut(slot as usize).and_then(Option::as_mut) else {
            return;
        };
        let s = &mut e.b.state;
        if dir == Direction::Reply {
            s.replied = true;
        }
        if e.b.orig.proto == ip_proto::TCP {
            if tcp_flags & 0x01 != 0 {
                match dir {
                    Direction::Original => s.fin_orig = true,
                    Direction::Reply => s.fin_reply = true,
                }
            }
            if tcp_flags & 0x04 != 0 {
                s.rst = true;
            }
        }
        e.b.last_seen = now;
        let class = e.b.state.class(e.b.orig.proto);
        let expires = now.saturating_add(self.timeouts_ns[class]);
        e.expires = expires;
        if expires < e.queued_deadline {
            self.enqueue(slot, class, expires);
        }
    }

    pub fn remove(&mut self, slot: u32) -> Option<Binding> {
        self.remove_slot(slot).map(|(b, _)| b)
    }

    /// Collect expired bindings, examining at most `max` expiry records. Returns how many went.
    pub fn expire(&mut self, now: u64, max: usize) -> usize {
        let mut removed = 0;
        for _ in 0..max {
            let Some(rec) = self.pop_due(now) else { break };
            let Some(e) = self.entry(rec.slot) else {
                continue;
            };
            if e.record != rec.id {
                continue;
            }
            if e.expires <= now {
                self.remove_slot(rec.slot);
                removed += 1;
            } else {
                let (class, expires) = (e.b.state.class(e.b.orig.proto), e.expires);
                self.enqueue(rec.slot, class, expires);
            }
        }
        removed
    }

    pub fn flows_per_bucket(&self) -> impl Iterator<Item = (u16, u32)> + '_ {
        self.per_bucket
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(b, &n)| (b as u16, n))
    }

    /// Copies of the live bindings of `bucket` (a full scan: state moves are rare).
    pub fn export_bucket(&self, now: u64, bucket: u16) -> Vec<Binding> {
        self.slots
            .iter()
            .flatten()
            .filter(|e| e.b.bucket == bucket && e.expires > now)
            .map(|e| e.b.clone())
            .collect()
    }

    /// Drop every binding of `bucket`. Returns how many.
    pub fn remove_bucket(&mut self, bucket: u16) -> usize {
        let slots: Vec<u32> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, e)| e.as_ref().is_some_and(|e| e.b.bucket == bucket))
            .map(|(i, _)| i as u32)
            .collect();
        slots
            .iter()
            .filter(|&&s| self.remove_slot(s).is_some())
            .count()
    }

    /// Bindings (including expired ones not yet collected) and their tags.
    pub fn iter(&self) -> impl Iterator<Item = (&Binding, u32)> + '_ {
        self.slots.iter().flatten().map(|e| (&e.b, e.tag))
    }

    #[inline]
    fn entry(&self, slot: u32) -> Option<&Entry> {
        self.slots.get(slot as usize).and_then(Option::as_ref)
    }

    fn remove_slot(&mut self, slot: u32) -> Option<(Binding, u32)> {
        let e = self.slots.get_mut(slot as usize)?.take()?;
        for k in [e.b.orig, e.b.reply_key()] {
            if self.map.get(&MapKey(k)).is_some_and(|(s, _)| s == slot) {
                self.map.remove(&MapKey(k));
            }
        }
        self.free.push(slot);
        self.len -= 1;
        if let Some(n) = self.per_bucket.get_mut(usize::from(e.b.bucket)) {
            *n = n.saturating_sub(1);
        }
        if let Some(n) = self.per_tag.get_mut(e.tag as usize) {
            *n = n.saturating_sub(1);
        }
        Some((e.b, e.tag))
    }

    fn enqueue(&mut self, slot: u32, class: usize, deadline: u64) {
        let q = &mut self.queues[class];
        let deadline = q.back().map_or(deadline, |r| r.deadline.max(deadline));
        let id = self.next_record;
        self.next_record += 1;
        q.push_back(Record { slot, id, deadline });
        if let Some(Some(e)) = self.slots.get_mut(slot as usize) {
            e.record = id;
            e.queued_deadline = deadline;
        }
    }

    fn pop_due(&mut self, now: u64) -> Option<Record> {
        for _ in 0..N_CLASSES {
            let c = self.cursor;
            self.cursor = (self.cursor + 1) % N_CLASSES;
            if self.queues[c].front().is_some_and(|r| r.deadline <= now) {
                return self.queues[c].pop_front();
            }
        }
        None
    }
}

/// Tags at or above this are not counted (a binding whose backend is unknown, say).
pub(crate) const UNCOUNTED: u32 = u32::MAX;

fn bump(v: &mut Vec<u32>, i: usize) {
    if i >= UNCOUNTED as usize {
        return;
    }
    if v.len() <= i {
        v.resize(i + 1, 0);
    }
    v[i] += 1;
}
