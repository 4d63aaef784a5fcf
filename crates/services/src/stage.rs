//! The one interface every service implements: a [`Stage`] processes packets described once
//! ([`Packet`], katran's `packet_description`) and owns the lifecycle of its flow state.
//!
//! ```text
//!  bytes ──parse once──> Packet ──lookup (every stage)──> reply? ──process (chain order, or
//!                          ▲                                        backwards for replies)──> Verdict
//!                          └── a stage that rewrites the bytes updates the descriptor
//! ```
//!
//! - The caller parses a packet once and fills a [`Packet`]; every stage reads it. A stage that
//!   rewrites the bytes (NAT, LB) updates the descriptor's tuple, so the next stage never parses
//!   again.
//! - Before processing, the caller asks every stage to [`Stage::lookup`] the packet: translating
//!   stages say whether it is the reply of a flow they translated (the chain then runs backwards),
//!   and every stage keeps what it found in the descriptor ([`Hint`]) so `process` does not look
//!   it up a second time.
//! - One [`Verdict`] for every stage; drop reasons are the stage's own names
//!   ([`Stage::drop_reasons`]), which the caller counts.
//! - Flow state moves between data planes as a [`FlowSet`] (state handover, replication): each
//!   stage adds its entries to it and takes its own back.
//!
//! A new service is one `impl Stage` (and its spec entry); the data plane treats every stage
//! alike.

use std::any::Any;
use std::collections::BTreeMap;
use std::net::SocketAddr;

use dva_flow::FlowKey;
use serde::{Deserialize, Serialize};

use crate::conntrack::{Conn, Conntrack, Direction, TcpSegment};
use crate::firewall::{NewFlowPolicy, PacketInfo, RejectKind};
use crate::lb::BackendStats;
use crate::nat::Binding;

/// What happens to a packet after a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// On to the next stage, then out.
    Forward,
    /// This stage holds no state for it and may not create any here: the caller asks the
    /// bucket's previous owners (punting).
    Punt,
    /// Dropped; the index into the stage's [`Stage::drop_reasons`].
    Drop(u8),
    /// Dropped, and the sender is answered with this.
    Reject(RejectKind),
}

/// A stage's binding lookup for one packet, carried from [`Stage::lookup`] to [`Stage::process`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum Hint {
    /// Not looked up (or the packet was rewritten since): look it up.
    #[default]
    Unknown,
    /// Looked up: nothing.
    Missing,
    /// Looked up: this entry of the stage's table, in this direction.
    Found(u32, Direction),
}

/// Most stages whose lookups a descriptor carries; stages past it look up in `process`.
pub const MAX_HINTS: usize = 4;

/// One packet, parsed once: what every stage reads. Offsets are into the packet's bytes as the
/// caller hands them to [`Stage::process`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    /// The fields the rules and connection tracking read; `info.key` is the tuple as the packet
    /// is now (after any translation by an earlier stage).
    pub info: PacketInfo,
    /// The flow bucket the packet was dispatched to.
    pub bucket: u16,
    /// Whether a stage may create state for it here.
    pub policy: NewFlowPolicy,
    pub fragment: bool,
    /// Offset of the transport header.
    pub l4: usize,
    /// End of the IP packet (bytes past it are link padding).
    pub end: usize,
    /// Set by the stage that created a connection for this packet (its tuple as that stage saw
    /// it), for the caller's event stream.
    pub created: Option<FlowKey>,
    /// Set by a stage whose rules decided the packet: the rule's index, `None` for a default
    /// action.
    pub rule: Option<Option<usize>>,
    /// Some stage holds state for this packet (set by lookups, made before any stage processes
    /// it when a stage [`Stage::reads_known`]): it belongs to a known flow.
    pub known: bool,
    /// The stage being run (its index in the chain), for [`Packet::hint`].
    pub(crate) at: usize,
    hints: [Hint; MAX_HINTS],
}

impl Packet {
    /// A descriptor for a packet whose fields the caller parsed (`l4`, `end`: offsets into the
    /// bytes stages will see).
    pub fn new(
        info: PacketInfo,
        bucket: u16,
        policy: NewFlowPolicy,
        fragment: bool,
        l4: usize,
        end: usize,
    ) -> Packet {
        Packet {
            info,
            bucket,
            policy,
            fragment,
            l4,
            end,
            created: None,
            rule: None,
            known: false,
            at: 0,
            hints: [Hint::Unknown; MAX_HINTS],
        }
    }

    /// The TCP header fields window tracking reads, from the bytes at `l4` (`bytes`: the IP
    /// packet). Zero for anything but TCP, or a header that does not fit.
    pub fn tcp_segment(bytes: &[u8], proto: u8, fragment: bool, l4: usize) -> TcpSegment {
        if proto != dva_wire::ip_proto::TCP || fragment {
            return TcpSegment::default();
        }
        bytes
            .get(l4..)
            .and_then(TcpSegment::parse)
            .unwrap_or_default()
    }

    pub fn is_v6(&self) -> bool {
        self.info.key.src.is_ipv6()
    }

    /// Run the stage at chain index `i` next (its lookups are kept under that index).
    pub fn enter(&mut self, i: usize) {
        self.at = i;
    }

    /// What the current stage's [`Stage::lookup`] found, if it still applies.
    pub fn hint(&self) -> Hint {
        self.hints.get(self.at).copied().unwrap_or_default()
    }

    /// Keep the current stage's lookup for its `process`.
    pub fn set_hint(&mut self, h: Hint) {
        if let Hint::Found(..) = h {
            self.known = true;
        }
        if let Some(slot) = self.hints.get_mut(self.at) {
            *slot = h;
        }
    }

    /// The packet's tuple changed (a stage rewrote it): every lookup made for the old tuple is
    /// stale.
    pub fn retuple(&mut self, key: FlowKey, icmp_inner: Option<FlowKey>) {
        self.info.key = key;
        if self.info.icmp_inner.is_some() {
            self.info.icmp_inner = icmp_inner;
        }
        self.hints = [Hint::Unknown; MAX_HINTS];
    }
}

/// The packet's bytes as a stage gets them: writable when the chain has a stage that rewrites
/// ([`Stage::rewrites`]), the received buffer itself otherwise (no copy).
pub enum Bytes<'a> {
    ReadOnly(&'a [u8]),
    Writable(&'a mut [u8]),
}

impl Bytes<'_> {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::ReadOnly(b) => b,
            Bytes::Writable(b) => b,
        }
    }

    /// `None` when read-only (a caller that did not ask [`Stage::rewrites`]).
    pub fn writable(&mut self) -> Option<&mut [u8]> {
        match self {
            Bytes::ReadOnly(_) => None,
            Bytes::Writable(b) => Some(b),
        }
    }
}

/// How an imported entry is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Import {
    /// Only if absent (a state handover, or a previous owner's copy to the owner).
    Fill,
    /// Insert or replace (the owner's copy to its backup: the newest).
    Replace,
}

/// Flow state in transit between data planes, by kind of table. The handover and replication
/// encodings carry it as it is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowSet {
    #[serde(default)]
    pub conns: Vec<Conn>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nat: Vec<Binding>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lb: Vec<Binding>,
}

impl FlowSet {
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty() && self.nat.is_empty() && self.lb.is_empty()
    }

    pub fn len(&self) -> usize {
        self.conns.len() + self.nat.len() + self.lb.len()
    }

    /// Split by where each entry's bucket goes (`None`: nowhere, the entry is dropped).
    pub fn group_by<K: Ord>(self, mut to: impl FnMut(u16) -> Option<K>) -> BTreeMap<K, FlowSet> {
        let mut out: BTreeMap<K, FlowSet> = BTreeMap::new();
        for c in self.conns {
            if let Some(k) = to(c.bucket) {
                out.entry(k).or_default().conns.push(c);
            }
        }
        for b in self.nat {
            if let Some(k) = to(b.bucket) {
                out.entry(k).or_default().nat.push(b);
            }
        }
        for b in self.lb {
            if let Some(k) = to(b.bucket) {
                out.entry(k).or_default().lb.push(b);
            }
        }
        out
    }

    pub fn append(&mut self, other: FlowSet) {
        self.conns.extend(other.conns);
        self.nat.extend(other.nat);
        self.lb.extend(other.lb);
    }
}

/// What stages add to a flow's listing (`dva flows`, flow events).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowNote {
    /// The tuple a NAT binding translates the flow to.
    pub nat: Option<FlowKey>,
    /// The backend a load balancer sends the flow to.
    pub backend: Option<SocketAddr>,
}

/// A service in the chain. Sans-IO: `now` is the caller's monotonic clock in nanoseconds.
pub trait Stage: Send {
    /// The spec's name of the service (`firewall`, `nat`, ...).
    fn name(&self) -> &'static str;

    /// Whether `process` may rewrite the packet's bytes (the caller then hands it a writable
    /// copy).
    fn rewrites(&self) -> bool {
        false
    }

    /// Look the packet up in this stage's table and keep the result in the descriptor
    /// ([`Packet::set_hint`]) for `process`. `Some(Direction::Reply)`: the packet is the reply of
    /// a flow this stage translated (the chain runs backwards for it).
    fn lookup(&mut self, _now: u64, _pkt: &mut Packet) -> Option<Direction> {
        None
    }

    /// Whether `process` reads [`Packet::known`] (the caller then makes every stage look the
    /// packet up before the first one processes it; otherwise a stage that cannot answer
    /// `Reply` looks up in its own `process`, once).
    fn reads_known(&self) -> bool {
        false
    }

    /// Process one packet; a stage that rewrites `bytes` updates `pkt` ([`Packet::retuple`]).
    fn process(&mut self, now: u64, pkt: &mut Packet, bytes: &mut Bytes<'_>) -> Verdict;

    /// The names `Verdict::Drop(i)` counts under (`i` indexes this), as metrics and events show
    /// them.
    fn drop_reasons(&self) -> &'static [&'static str];

    /// Remove expired flow state, examining at most `budget` entries; `gone` sees each removed
    /// connection (event streams). Returns how many went.
    fn expire(&mut self, now: u64, budget: usize, gone: Option<&mut dyn FnMut(&Conn)>) -> usize;

    /// Entries of this stage's table (including expired ones not yet collected).
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Add the live state of `bucket` to `out` (a state move).
    fn export_bucket(&self, now: u64, bucket: u16, out: &mut FlowSet);

    /// Take this stage's entries out of `set`, each as `how(bucket)` says (`None`: skip).
    /// Returns the connections taken (bindings ride along with theirs and count as none).
    fn import(
        &mut self,
        now: u64,
        set: &mut FlowSet,
        how: &mut dyn FnMut(u16) -> Option<Import>,
    ) -> usize;

    /// Forget every flow of `bucket`.
    fn remove_bucket(&mut self, bucket: u16) -> usize;

    /// Add this stage's state for the flow `key` (as the connection tracker holds it) to `out`,
    /// to travel with the connection (replication).
    fn replicate_flow(&mut self, _now: u64, _key: &FlowKey, _out: &mut FlowSet) {}

    /// Add every entry of this stage's table that does not ride with a tracked connection to
    /// `out` (the replication walk's end: translations made before the tracker saw the flow).
    fn replicate_all(&self, _out: &mut FlowSet) {}

    /// Add what this stage knows of the flow `key` (either direction) to `note`.
    fn annotate(&mut self, _now: u64, _key: &FlowKey, _note: &mut FlowNote) {}

    /// This stage's counters for `dva stats` (`name -> value`).
    fn counters(&self, _out: &mut BTreeMap<String, u64>) {}

    /// Load-balancer backends' counters.
    fn backend_stats(&self, _out: &mut Vec<BackendStats>) {}

    /// Hits per rule and of the default action, for a stage with rules.
    fn rule_hits(&self) -> Option<(Vec<u64>, u64)> {
        None
    }

    /// The connection table, for the stage that tracks connections (the data plane's census,
    /// flow listing, replication journal and bucket moves read it).
    fn conntrack(&self) -> Option<&Conntrack> {
        None
    }

    fn conntrack_mut(&mut self) -> Option<&mut Conntrack> {
        None
    }

    /// For reconfiguring a running stage in place (its state is the flows').
    fn as_any_mut(&mut self) -> &mut dyn Any;
}
