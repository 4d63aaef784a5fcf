//! Connection tracking: one entry per connection, found from either direction.
//!
//! - Entries are keyed by the canonical [`FlowKey`] (lower endpoint first), so a packet and its
//!   reply find the same entry; the entry keeps the original direction's key to tell them apart.
//! - Protocol state: TCP follows Linux conntrack's state machine and window tracking ([`tcp`]);
//!   UDP, ICMP queries and other protocols are pseudo-connections that only remember whether a
//!   reply was seen.
//! - Every state has a timeout ([`Timeouts`], Linux defaults). Expiry is exact for lookups (an entry
//!   past its deadline is gone as far as packets can tell) and lazy for memory: [`Conntrack::expire`]
//!   frees due entries in slices of caller-chosen size.
//!
//! - Table pressure, as Linux's `early_drop` and better: a data plane's own connections are capped
//!   at `max_entries`; at the cap a new connection evicts a half-open one (TCP before ESTABLISHED,
//!   UDP/ICMP/other without a reply) found among a bounded number of the oldest expiry records,
//!   and is refused only if none is found. Above [`PRESSURE_PERCENT`] of the cap, new half-open
//!   entries get a short timeout ([`Timeouts::half_open_pressure`]). Replicas (copies of another
//!   data plane's connections, see [`Conntrack::upsert`]) have a cap of their own, so backing up a
//!   peer never takes room from the connections this data plane serves.
//!
//! How expiry stays O(1): there is one FIFO per timeout class (a TCP state, UDP replied/unreplied,
//! ...). Every record pushed to a FIFO has deadline `now + that class's timeout`, and `now` only
//! grows, so each FIFO is sorted by construction and only its front can be due. A packet that
//! refreshes an entry pushes nothing: when the old record comes due, the entry is found alive and
//! re-queued once with its current deadline. Only a change to a class with a shorter timeout
//! (established -> fin_wait) pushes a new record; the older record is then recognised as stale by
//! its id. So each entry costs O(1) records per timeout period, whatever its packet rate.

pub mod tcp;

use std::collections::VecDeque;

use dva_flow::FlowKey;
use dva_wire::ip_proto;
use dva_wire::tcp::flags;
use serde::{Deserialize, Serialize};

use crate::hash::{MapKey, SeededState};
use crate::index::{Chunked, FlowIndex};
use tcp::{Next, RstEffect};
pub use tcp::{TcpPeer, TcpSegment, TcpState, TcpWindow};

const NS_PER_SEC: u64 = 1_000_000_000;

/// Timeouts in seconds, per state. Defaults are Linux's (`nf_conntrack_*_timeout*`) except UDP
/// replied (180 s, the brief's value; Linux uses 120 s).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    pub tcp_syn_sent: u64,
    pub tcp_syn_recv: u64,
    pub tcp_established: u64,
    pub tcp_fin_wait: u64,
    pub tcp_close_wait: u64,
    pub tcp_last_ack: u64,
    pub tcp_time_wait: u64,
    pub tcp_close: u64,
    /// UDP (and UDP-Lite) until the first reply.
    pub udp_unreplied: u64,
    /// UDP once a reply was seen.
    pub udp_replied: u64,
    /// ICMP / ICMPv6 queries (echo, timestamp, ...).
    pub icmp: u64,
    /// Any other IP protocol.
    pub generic: u64,
    /// Half-open entries (see [`ConnState::half_open`]) created or moved while the table is
    /// above [`PRESSURE_PERCENT`] of its cap get this timeout instead of their state's.
    pub half_open_pressure: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_syn_sent: 120,
            tcp_syn_recv: 60,
            tcp_established: 432_000,
            tcp_fin_wait: 120,
            tcp_close_wait: 60,
            tcp_last_ack: 30,
            tcp_time_wait: 120,
            tcp_close: 10,
            udp_unreplied: 30,
            udp_replied: 180,
            icmp: 30,
            generic: 600,
            half_open_pressure: 5,
        }
    }
}

impl Timeouts {
    /// Timeout of each class in nanoseconds, indexed by [`ConnState::class`].
    fn table_ns(&self) -> [u64; N_CLASSES] {
        let s = |secs: u64| secs.saturating_mul(NS_PER_SEC);
        [
            s(self.tcp_syn_sent), // None: only ever a transient state
            s(self.tcp_syn_sent),
            s(self.tcp_syn_recv),
            s(self.tcp_established),
            s(self.tcp_fin_wait),
            s(self.tcp_close_wait),
            s(self.tcp_last_ack),
            s(self.tcp_time_wait),
            s(self.tcp_close),
            s(self.tcp_syn_sent), // SynSent2, as Linux
            s(self.udp_unreplied),
            s(self.udp_replied),
            s(self.icmp),
            s(self.generic),
            s(self.half_open_pressure),
        ]
    }
}

/// Default cap on tracked connections.
pub const DEFAULT_MAX_ENTRIES: usize = 1_048_576;

/// Above this share of `max_entries` (own connections), new half-open entries get the short
/// [`Timeouts::half_open_pressure`] timeout.
pub const PRESSURE_PERCENT: usize = 90;

/// Expiry records an early drop looks at, at most, to find a half-open entry to evict (Linux's
/// `early_drop` scans a bounded part of a hash chain likewise).
pub const EARLY_DROP_SCAN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConntrackConfig {
    /// Own connections at most; beyond, a new one evicts a half-open entry or is refused
    /// (`TableFull`). Replicas have a cap of the same size, apart.
    pub max_entries: usize,
    pub timeouts: Timeouts,
    /// Skip the TCP window check (Linux `nf_conntrack_tcp_be_liberal`): out-of-window segments
    /// and RSTs are accepted and a RST closes wherever it points, as without window tracking.
    /// For asymmetric paths where one direction is never seen; off by default.
    pub tcp_liberal: bool,
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        ConntrackConfig {
            max_entries: DEFAULT_MAX_ENTRIES,
            timeouts: Timeouts::default(),
            tcp_liberal: false,
        }
    }
}

/// Which way a packet goes relative to the packet that created its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Original,
    Reply,
}

/// Protocol state of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnState {
    Tcp(TcpState),
    /// UDP and UDP-Lite.
    Udp {
        replied: bool,
    },
    /// ICMP / ICMPv6 query pseudo-connection (keyed by the query identifier).
    Icmp {
        replied: bool,
    },
    /// Any other protocol, keyed by addresses (and ports if the caller set them).
    Generic {
        replied: bool,
    },
}

const N_CLASSES: usize = 15;
/// Timeout class of half-open entries made under pressure (a FIFO of its own: every record in
/// it has deadline `now + half_open_pressure`, so it stays sorted).
const PRESSURE_CLASS: usize = 14;
/// Classes whose records may point at half-open entries, most likely first: where early drop
/// looks for a victim.
const EARLY_DROP_CLASSES: [usize; 7] = [PRESSURE_CLASS, 1, 2, 9, 10, 12, 13];

impl ConnState {
    /// The state a connection starts in, for the protocol of `key` and its first packet's flags;
    /// `None` if that packet cannot open a connection (TCP without a plain SYN).
    pub fn initial(key: &FlowKey, tcp_flags: u8) -> Option<ConnState> {
        Some(match key.proto {
            // Only a SYN: Linux would also pick up a connection mid-stream from an ACK (NONE ->
            // ESTABLISHED), but here a data plane without state punts to the previous owner instead.
            ip_proto::TCP if tcp::starts_connection(tcp_flags) => ConnState::Tcp(TcpState::SynSent),
            ip_proto::TCP => return None,
            ip_proto::UDP | ip_proto::UDPLITE => ConnState::Udp { replied: false },
            ip_proto::ICMP | ip_proto::ICMPV6 => ConnState::Icmp { replied: false },
            _ => ConnState::Generic { replied: false },
        })
    }

    /// Timeout class (index into the timeout table).
    fn class(self) -> usize {
        match self {
            ConnState::Tcp(s) => s as usize,
            ConnState::Udp { replied: false } => 10,
            ConnState::Udp { replied: true } => 11,
            ConnState::Icmp { .. } => 12,
            ConnState::Generic { .. } => 13,
        }
    }

    /// Not (yet) a connection worth keeping: TCP before ESTABLISHED, other protocols without a
    /// reply. These are what a flood of spoofed openers makes; they are evicted first when the
    /// table is full and not replicated (losing one on failover costs one retransmitted SYN).
    pub fn half_open(self) -> bool {
        match self {
            ConnState::Tcp(s) => matches!(
                s,
                TcpState::None | TcpState::SynSent | TcpState::SynRecv | TcpState::SynSent2
            ),
            ConnState::Udp { replied }
            | ConnState::Icmp { replied }
            | ConnState::Generic { replied } => !replied,
        }
    }

    /// A reply has been seen (TCP: the connection got past SYN_SENT).
    pub fn replied(self) -> bool {
        match self {
            ConnState::Tcp(s) => !matches!(s, TcpState::None | TcpState::SynSent),
            ConnState::Udp { replied }
            | ConnState::Icmp { replied }
            | ConnState::Generic { replied } => replied,
        }
    }
}

/// One tracked connection: everything needed to move it to another data plane (serde).
///
/// Timestamps are on the owning process's monotonic clock; [`Conntrack::import`] resets them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conn {
    /// The key of the packet that created the connection (its direction is `Original`).
    pub key: FlowKey,
    /// Flow bucket the connection belongs to (history retirement, state export).
    pub bucket: u16,
    pub state: ConnState,
    pub created: u64,
    pub last_seen: u64,
    pub orig_packets: u64,
    pub orig_bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// TCP window tracking (all zero for other protocols, and from an exporter that predates it:
    /// then relearned from the next segments).
    #[serde(default)]
    pub tcp_window: TcpWindow,
}

impl Conn {
    fn count(&mut self, dir: Direction, len: u32) {
        let (p, b) = match dir {
            Direction::Original => (&mut self.orig_packets, &mut self.orig_bytes),
            Direction::Reply => (&mut self.reply_packets, &mut self.reply_bytes),
        };
        *p = p.saturating_add(1);
        *b = b.saturating_add(u64::from(len));
    }
}

/// Handle to a tracked connection, valid until it is removed or expires (then `get` returns
/// `None` or, after reuse of the slot, another connection: do not keep ids across calls that
/// may remove entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId(u32);

impl ConnId {
    /// The slot number, to carry a lookup in a packet descriptor ([`crate::stage::Hint`]).
    pub(crate) fn raw(self) -> u32 {
        self.0
    }

    pub(crate) fn from_raw(slot: u32) -> ConnId {
        ConnId(slot)
    }
}

/// What feeding a packet to a tracked connection did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    /// Part of the connection; state and timeout updated.
    Tracked,
    /// Part of the connection but carries no state change (a retransmission, say); accepted.
    Ignored,
    /// Does not fit the connection's state (e.g. ACK before the SYN/ACK); nothing changed.
    Invalid,
    /// A TCP segment outside the window (a blind RST, data far beyond what the receiver
    /// accepts, an ACK of data never sent); nothing changed.
    OutOfWindow,
    /// A SYN for a connection in TIME_WAIT or CLOSE: the old connection is over and this opens a
    /// new one. The caller removes the entry and handles the packet as new (rules apply again, and
    /// the new connection may run the other way).
    Reopen,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CreateError {
    #[error("connection table full ({max} entries)")]
    TableFull { max: usize },
    #[error("a TCP segment with flags {flags:#04x} cannot open a connection (needs a plain SYN)")]
    NotAStart { flags: u8 },
    #[error("{key} is already tracked")]
    Exists { key: FlowKey },
}

struct Entry {
    conn: Conn,
    /// `conn.key` is its canonical key reversed: a packet whose key canonicalises the same way
    /// goes in the original direction (no key comparison per packet).
    reversed: bool,
    /// A copy of another data plane's connection (counted against the replica cap).
    replica: bool,
    expires: u64,
    /// Id and deadline of the entry's live expiry record.
    record: u64,
    queued_deadline: u64,
}

struct Record {
    slot: u32,
    id: u64,
    deadline: u64,
}

/// The connection table.
pub struct Conntrack {
    config: ConntrackConfig,
    timeouts_ns: [u64; N_CLASSES],
    /// Key to slot; sized once for the limits (see [`crate::index`]: no growth stalls).
    map: FlowIndex<u32>,
    slots: Chunked<Option<Entry>>,
    free: Vec<u32>,
    queues: [VecDeque<Record>; N_CLASSES],
    cursor: usize,
    next_record: u64,
    per_bucket: Vec<u32>,
    /// Entries that are replicas; the others (`map.len() - replicas`) are this data plane's own.
    replicas: usize,
    /// Half-open entries evicted to admit a new connection.
    early_drops: u64,
    /// Keys of connections created or changed state since the last [`Conntrack::take_journal`],
    /// when journaling is on (state replication to a backup data plane).
    journal: Option<Vec<FlowKey>>,
}

/// Journal entries kept at most between two takes (a data plane takes them every batch).
const JOURNAL_MAX: usize = 1 << 16;

impl std::fmt::Debug for Conntrack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conntrack")
            .field("len", &self.len())
            .field("config", &self.config)
            .finish()
    }
}

impl Conntrack {
    pub fn new(config: ConntrackConfig) -> Conntrack {
        // Own connections and replicas have a cap each.
        let entries = config.max_entries.saturating_mul(2);
        Conntrack {
            timeouts_ns: config.timeouts.table_ns(),
            config,
            map: FlowIndex::new(entries, SeededState::random()),
            slots: Chunked::default(),
            free: Vec::new(),
            queues: Default::default(),
            cursor: 0,
            next_record: 0,
            per_bucket: Vec::new(),
            replicas: 0,
            early_drops: 0,
            journal: None,
        }
    }

    /// Record creations and state changes for [`Conntrack::take_journal`] (or stop doing so).
    pub fn set_journal(&mut self, on: bool) {
        if on != self.journal.is_some() {
            self.journal = on.then(Vec::new);
        }
    }

    /// Keys of the connections created or changed since the last call (each possibly repeated).
    /// Half-open entries are not journaled: nothing worth a copy happened to them yet.
    pub fn take_journal(&mut self) -> Vec<FlowKey> {
        self.journal
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    fn journal(&mut self, key: FlowKey) {
        if let Some(j) = self.journal.as_mut() {
            if j.len() < JOURNAL_MAX {
                j.push(key);
            }
        }
    }

    /// Insert or replace a connection copied from another data plane (a replica kept for
    /// failover, counted against the replica cap until a packet of it is seen here).
    /// Timestamps restart at `now`, like [`Conntrack::import`].
    pub fn upsert(&mut self, now: u64, mut conn: Conn) -> Result<ConnId, CreateError> {
        if let Some(slot) = self.map.get(&MapKey(conn.key.canonical().0)) {
            self.remove_slot(slot);
        }
        conn.last_seen = now;
        conn.created = now;
        conn.tcp_window.relearn();
        let journal = self.journal.take();
        let r = self.insert(now, conn, true);
        self.journal = journal;
        r
    }

    /// This data plane's own connections (not replicas), including expired ones not yet collected.
    pub fn own_len(&self) -> usize {
        self.map.len() - self.replicas
    }

    /// Replicas held (copies of other data planes' connections).
    pub fn replica_len(&self) -> usize {
        self.replicas
    }

    /// Half-open entries evicted so far to admit new connections into a full table.
    pub fn early_drops(&self) -> u64 {
        self.early_drops
    }

    /// Own connections above [`PRESSURE_PERCENT`] of the cap.
    fn under_pressure(&self) -> bool {
        self.own_len().saturating_mul(100)
            >= self.config.max_entries.saturating_mul(PRESSURE_PERCENT)
    }

    /// Timeout class for an entry entering `state`: the state's, or the short pressure one for a
    /// half-open own entry while the table is nearly full.
    fn class_for(&self, state: ConnState, replica: bool) -> usize {
        if !replica && state.half_open() && self.under_pressure() {
            PRESSURE_CLASS
        } else {
            state.class()
        }
    }

    /// Turn the TCP window check off or on (a config change; tracked windows keep learning
    /// either way).
    pub fn set_tcp_liberal(&mut self, on: bool) {
        self.config.tcp_liberal = on;
    }

    pub fn config(&self) -> &ConntrackConfig {
        &self.config
    }

    /// Tracked connections, including expired ones not yet collected by [`Conntrack::expire`].
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// The live connection `key` (either direction) belongs to, and the packet's direction.
    /// An expired entry found on the way is removed.
    #[inline]
    pub fn lookup(&mut self, now: u64, key: &FlowKey) -> Option<(ConnId, Direction)> {
        let (canonical, reversed) = key.canonical();
        let slot = self.map.get(&MapKey(canonical))?;
        let e = self.slots.get(slot as usize)?.as_ref()?;
        if e.expires <= now {
            self.remove_slot(slot);
            return None;
        }
        let dir = if reversed == e.reversed {
            Direction::Original
        } else {
            Direction::Reply
        };
        Some((ConnId(slot), dir))
    }

    /// Whether a live connection exists for `key` (either direction); read-only.
    pub fn contains(&self, now: u64, key: &FlowKey) -> bool {
        self.find_entry(key).is_some_and(|e| e.expires > now)
    }

    /// The connection `key` belongs to, live or not yet collected.
    pub fn find(&self, key: &FlowKey) -> Option<&Conn> {
        self.find_entry(key).map(|e| &e.conn)
    }

    pub fn get(&self, id: ConnId) -> Option<&Conn> {
        self.entry(id.0).map(|e| &e.conn)
    }

    /// Deadline (same clock as `now`) after which `id` is gone unless a packet refreshes it.
    pub fn expires_at(&self, id: ConnId) -> Option<u64> {
        self.entry(id.0).map(|e| e.expires)
    }

    /// Track a new connection started by a packet with key `key` (the original direction).
    pub fn create(
        &mut self,
        now: u64,
        bucket: u16,
        key: &FlowKey,
        tcp_flags: u8,
        seg: &TcpSegment,
        len: u32,
    ) -> Result<ConnId, CreateError> {
        let state = ConnState::initial(key, tcp_flags)
            .ok_or(CreateError::NotAStart { flags: tcp_flags })?;
        let tcp_window = match state {
            ConnState::Tcp(_) => TcpWindow::from_syn(tcp_flags, seg),
            _ => TcpWindow::default(),
        };
        let mut conn = Conn {
            key: *key,
            bucket,
            state,
            created: now,
            last_seen: now,
            orig_packets: 0,
            orig_bytes: 0,
            reply_packets: 0,
            reply_bytes: 0,
            tcp_window,
        };
        conn.count(Direction::Original, len);
        self.insert(now, conn, false)
    }

    /// Take over a connection exported by another data plane. Its timestamps are on the
    /// exporter's clock, so both become `now`: the connection gets a full timeout in its state.
    /// Its TCP window keeps the negotiated options but relearns the positions (see
    /// [`TcpWindow::relearn`]): segments kept flowing to the exporter after its snapshot.
    pub fn import(&mut self, now: u64, mut conn: Conn) -> Result<ConnId, CreateError> {
        conn.last_seen = now;
        conn.created = now;
        conn.tcp_window.relearn();
        self.insert(now, conn, false)
    }

    fn insert(&mut self, now: u64, conn: Conn, replica: bool) -> Result<ConnId, CreateError> {
        let (canonical, reversed) = conn.key.canonical();
        let mk = MapKey(canonical);
        if let Some(slot) = self.map.get(&mk) {
            match self.entry(slot) {
                Some(e) if e.expires > now => return Err(CreateError::Exists { key: conn.key }),
                _ => {
                    self.remove_slot(slot);
                }
            }
        }
        let max = self.config.max_entries;
        let full = |t: &Conntrack| {
            if replica {
                t.replicas >= max
            } else {
                t.own_len() >= max
            }
        };
        if full(self) {
            // Expired entries may be waiting for collection: a little of it here keeps a table full
            // of dead entries from refusing live traffic.
            self.expire(now, 64);
            // Then, for a connection of our own, make room by evicting a half-open one.
            if full(self) && (replica || !self.early_drop()) {
                return Err(CreateError::TableFull { max });
            }
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                // max_entries bounds the slots; a u32 index covers any sane limit.
                let s = u32::try_from(self.slots.len()).map_err(|_| CreateError::TableFull {
                    max: self.slots.len(),
                })?;
                self.slots.push(None);
                s
            }
        };
        let bucket = usize::from(conn.bucket);
        if self.per_bucket.len() <= bucket {
            self.per_bucket.resize(bucket + 1, 0);
        }
        self.per_bucket[bucket] += 1;
        self.replicas += usize::from(replica);
        let class = self.class_for(conn.state, replica);
        let expires = now.saturating_add(self.timeouts_ns[class]);
        let journaled = !conn.state.half_open();
        self.slots[slot as usize] = Some(Entry {
            reversed,
            conn,
            replica,
            expires,
            record: 0,
            queued_deadline: u64::MAX,
        });
        self.map.insert(mk, slot);
        self.enqueue(slot, class, expires);
        if journaled {
            if let Some(key) = self.slots[slot as usize].as_ref().map(|e| e.conn.key) {
                self.journal(key);
            }
        }
        Ok(ConnId(slot))
    }

    /// Evict one half-open own entry, the oldest found among at most [`EARLY_DROP_SCAN`] records
    /// at the front of the queues that hold them. Records met on the way that point elsewhere are
    /// settled as [`Conntrack::expire`] would: stale ones dropped, live ones moved to their
    /// entry's class. Returns whether an entry was evicted.
    fn early_drop(&mut self) -> bool {
        let mut budget = EARLY_DROP_SCAN;
        for class in EARLY_DROP_CLASSES {
            while budget > 0 {
                let Some(rec) = self.queues[class].pop_front() else {
                    break;
                };
                budget -= 1;
                let Some(e) = self.entry(rec.slot) else {
                    continue;
                };
                if e.record != rec.id {
                    continue; // superseded by a newer record of the same entry
                }
                if !e.replica && e.conn.state.half_open() {
                    self.remove_slot(rec.slot);
                    self.early_drops += 1;
                    return true;
                }
                // Established (or a replica): never evicted. Its record moves to the back of its
                // own class, so the next scan does not meet it again.
                let (c, expires) = (e.conn.state.class(), e.expires);
                self.enqueue(rec.slot, c, expires);
                if c == class {
                    break; // the rest of this queue is as fresh as the record just re-queued
                }
            }
        }
        false
    }

    /// Feed a packet of connection `id` going `dir`: update protocol state, counters and timeout.
    /// `seg` is read for TCP only.
    pub fn update(
        &mut self,
        now: u64,
        id: ConnId,
        dir: Direction,
        tcp_flags: u8,
        seg: &TcpSegment,
        len: u32,
    ) -> Update {
        let pressure = self.under_pressure();
        let Some(e) = self.slots.get_mut(id.0 as usize).and_then(Option::as_mut) else {
            return Update::Invalid;
        };
        if e.replica {
            // A packet of it reached us: we serve it now (failover, or a moved bucket).
            e.replica = false;
            self.replicas -= 1;
        }
        let c = &mut e.conn;
        let liberal = self.config.tcp_liberal || c.tcp_window.is_liberal();
        let outcome = match c.state {
            ConnState::Tcp(s) => match tcp::transition(s, dir, tcp_flags) {
                Next::Invalid => return Update::Invalid,
                Next::To(TcpState::SynSent)
                    if matches!(s, TcpState::TimeWait | TcpState::Close) =>
                {
                    return Update::Reopen
                }
                Next::To(n) => {
                    // On a copy: a segment out of the window must not move it.
                    let mut w = c.tcp_window;
                    let fits = tcp::in_window(&mut w, s, dir, tcp_flags, seg);
                    if !fits && !liberal {
                        return Update::OutOfWindow;
                    }
                    let n = if tcp_flags & flags::RST != 0 && !liberal {
                        match tcp::rst_effect(&c.tcp_window, s, dir, seg.seq) {
                            RstEffect::Close => n,
                            RstEffect::Keep => s,
                            RstEffect::Invalid => return Update::OutOfWindow,
                        }
                    } else {
                        n
                    };
                    if fits {
                        c.tcp_window = w;
                        c.tcp_window.synced(dir);
                    } else if c.tcp_window.is_liberal() {
                        c.tcp_window.relearn_dir(dir);
                    }
                    // Closing states are not worth a copy: a lost one costs a retransmission.
                    let closing =
                        matches!(n, TcpState::LastAck | TcpState::TimeWait | TcpState::Close);
                    if n != s && !closing && !ConnState::Tcp(n).half_open() {
                        if let Some(j) = self.journal.as_mut() {
                            if j.len() < JOURNAL_MAX {
                                j.push(c.key);
                            }
                        }
                    }
                    c.state = ConnState::Tcp(n);
                    Update::Tracked
                }
                Next::Ignore => {
                    // As Linux: counted, but no timeout refresh (a stray retransmission must not
                    // keep a connection alive).
                    c.count(dir, len);
                    return Update::Ignored;
                }
            },
            ConnState::Udp { ref mut replied }
            | ConnState::Icmp { ref mut replied }
            | ConnState::Generic { ref mut replied } => {
                if !*replied && dir == Direction::Reply {
                    if let Some(j) = self.journal.as_mut() {
                        if j.len() < JOURNAL_MAX {
                            j.push(c.key);
                        }
                    }
                }
                *replied |= dir == Direction::Reply;
                Update::Tracked
            }
        };
        c.count(dir, len);
        c.last_seen = now;
        let class = if pressure && c.state.half_open() {
            PRESSURE_CLASS
        } else {
            c.state.class()
        };
        let expires = now.saturating_add(self.timeouts_ns[class]);
        e.expires = expires;
        if expires < e.queued_deadline {
            // The live record would fire too late (the new state has a shorter timeout).
            self.enqueue(id.0, class, expires);
        }
        outcome
    }

    pub fn remove(&mut self, id: ConnId) -> Option<Conn> {
        self.remove_slot(id.0)
    }

    /// Collect expired entries, examining at most `max` expiry records (so the data path can
    /// call this every batch without stalling). Returns the number of entries removed.
    pub fn expire(&mut self, now: u64, max: usize) -> usize {
        self.expire_with(now, max, |_| {})
    }

    /// [`Conntrack::expire`], showing each removed connection to `gone` first.
    pub fn expire_with(&mut self, now: u64, max: usize, mut gone: impl FnMut(&Conn)) -> usize {
        let mut removed = 0;
        for _ in 0..max {
            let Some(rec) = self.pop_due(now) else { break };
            let Some(e) = self.entry(rec.slot) else {
                continue;
            };
            if e.record != rec.id {
                continue; // superseded by a newer record of the same entry
            }
            if e.expires <= now {
                if let Some(c) = self.remove_slot(rec.slot) {
                    gone(&c);
                }
                removed += 1;
            } else {
                // Back to the class whose timeout matches what is left of the entry's, so the
                // short pressure queue only ever gets short deadlines.
                let left = e.expires - now;
                let class = if e.conn.state.half_open() && left <= self.timeouts_ns[PRESSURE_CLASS]
                {
                    PRESSURE_CLASS
                } else {
                    e.conn.state.class()
                };
                let expires = e.expires;
                self.enqueue(rec.slot, class, expires);
            }
        }
        removed
    }

    /// `(bucket, tracked connections)` for every bucket holding any.
    pub fn flows_per_bucket(&self) -> impl Iterator<Item = (u16, u32)> + '_ {
        self.per_bucket
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(b, &n)| (b as u16, n))
    }

    /// Tracked connections (including expired ones not yet collected), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Conn> + '_ {
        self.slots.iter().flatten().map(|e| &e.conn)
    }

    /// The connections in slots `start..start + max_slots` and where the next slice starts (0 once
    /// the end is reached): a walk over the table in bounded steps, for the periodic refresh of
    /// backups' copies. Slots are stable, so a walk sees every connection that lives through it.
    pub fn slice(
        &self,
        start: usize,
        max_slots: usize,
    ) -> (impl Iterator<Item = &Conn> + '_, usize) {
        let start = start.min(self.slots.len());
        let end = start.saturating_add(max_slots).min(self.slots.len());
        let next = if end >= self.slots.len() { 0 } else { end };
        (
            self.slots.range(start, end).flatten().map(|e| &e.conn),
            next,
        )
    }

    /// Copies of the live connections of `bucket`, for a state move. A full scan: state moves are
    /// rare control-plane events.
    pub fn export_bucket(&self, now: u64, bucket: u16) -> Vec<Conn> {
        self.slots
            .iter()
            .flatten()
            .filter(|e| e.conn.bucket == bucket && e.expires > now)
            .map(|e| e.conn.clone())
            .collect()
    }

    /// Drop every connection of `bucket` (after a successful export). Returns how many.
    pub fn remove_bucket(&mut self, bucket: u16) -> usize {
        let slots: Vec<u32> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, e)| e.as_ref().is_some_and(|e| e.conn.bucket == bucket))
            .map(|(i, _)| i as u32)
            .collect();
        slots
            .iter()
            .filter(|&&s| self.remove_slot(s).is_some())
            .count()
    }

    /// Make the TCP windows of every connection in the buckets `moved` says left this data plane
    /// relearn their positions (see [`TcpWindow::relearn`]). Once another data plane serves a
    /// flow, the positions here freeze; should the bucket come back (a scale-in after a
    /// scale-out), the entry found here first would drop the flow's current segments as out of
    /// window. One pass over the table, at a table change. Returns the entries touched.
    pub fn relearn_where(&mut self, moved: impl Fn(u16) -> bool) -> usize {
        let mut n = 0;
        for e in self.slots.iter_mut().flatten() {
            if moved(e.conn.bucket) {
                e.conn.tcp_window.relearn();
                n += 1;
            }
        }
        n
    }

    fn find_entry(&self, key: &FlowKey) -> Option<&Entry> {
        let slot = self.map.get(&MapKey(key.canonical().0))?;
        self.entry(slot)
    }

    #[inline]
    fn entry(&self, slot: u32) -> Option<&Entry> {
        self.slots.get(slot as usize).and_then(Option::as_ref)
    }

    fn remove_slot(&mut self, slot: u32) -> Option<Conn> {
        let e = self.slots.get_mut(slot as usize)?.take()?;
        self.map.remove(&MapKey(e.conn.key.canonical().0));
        self.free.push(slot);
        self.replicas -= usize::from(e.replica);
        if let Some(n) = self.per_bucket.get_mut(usize::from(e.conn.bucket)) {
            *n = n.saturating_sub(1);
        }
        Some(e.conn)
    }

    /// Push an expiry record for `slot` and make it the entry's live one. The deadline is raised to
    /// the queue's last one if needed, which keeps the queue sorted even if `now` went backwards or
    /// a re-queued entry's deadline predates newer records (it then expires a little late in memory,
    /// never late for lookups).
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

    /// The next due record, taking the queues in turn so no class starves another.
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

    /// Expiry records held (live and stale); for tests and memory accounting.
    pub fn pending_records(&self) -> usize {
        self.queues.iter().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
mod tests;
