//! Per-source new-connection rate limiting: a token bucket per source prefix, charged only by
//! packets that would create a flow.
//!
//! - A packet of a flow some stage already holds ([`Packet::known`], from the chain's lookups)
//!   is never limited, nor one no stage may create state for here (it is punted; the data plane
//!   that creates the flow charges it), nor one that cannot start a flow (TCP without a plain
//!   SYN, ICMP errors and replies). Everything else takes a token from its source's bucket, or
//!   is dropped as `ratelimit-exceeded`.
//! - Sources are grouped by prefix (`prefix_v4`, `prefix_v6`: a /64 is one IPv6 host's usual
//!   share). Each bucket holds `burst` tokens and refills at `new_flows_per_second`.
//! - The table is bounded (`max_sources`). A bucket refilled to `burst` is the same as no bucket,
//!   so idle entries go first: [`Stage::expire`] walks the table in slices and drops them, and a
//!   new source in a full table takes the place of an idle one (or, when none is idle among the
//!   few looked at, of the least recently charged of those).
//! - No state moves between data planes: an allowance is soft state, and a moved bucket's sources
//!   start with a full bucket at the new owner (at most `burst` extra flows per move).
//!
//! Must run before the stages that create state (the spec checks the order): a flow created by
//! an earlier stage and then dropped here would leave that state behind.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::conntrack::Conn;
use crate::firewall::{self, NewFlowPolicy};
use crate::hash::SeededState;
use crate::stage::{Bytes, FlowSet, Import, Packet, Stage, Verdict};

/// Sources tracked at most when the config names no limit.
pub const DEFAULT_MAX_SOURCES: usize = 65_536;

/// Entries looked at for an idle one when a new source finds the table full.
const EVICT_PROBES: usize = 8;

/// Tokens are counted in billionths, so a refill over `ns` nanoseconds is `ns * rate`.
const TOKEN: u64 = 1_000_000_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// New flows a second each source prefix may open, sustained.
    pub new_flows_per_second: u32,
    /// New flows a source prefix may open at once (the bucket's size).
    pub burst: u32,
    /// Prefix length IPv4 sources are grouped by.
    pub prefix_v4: u8,
    /// Prefix length IPv6 sources are grouped by.
    pub prefix_v6: u8,
    /// Source prefixes tracked at most (memory bound).
    pub max_sources: usize,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            new_flows_per_second: 100,
            burst: 100,
            prefix_v4: 32,
            prefix_v6: 64,
            max_sources: DEFAULT_MAX_SOURCES,
        }
    }
}

/// Counters of one rate limiter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RateLimitStats {
    /// New flows let through.
    pub admitted: u64,
    /// New flows dropped.
    pub limited: u64,
    /// Entries removed to make room for another source (not idle ones).
    pub evicted: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    source: IpAddr,
    /// In billionths of a token.
    tokens: u64,
    /// When `tokens` was last brought up to date.
    last: u64,
}

/// The rate limiter of one data-path thread.
#[derive(Debug)]
pub struct RateLimiter {
    cfg: RateLimitConfig,
    /// Source prefix -> index into `entries`; keyed hasher (sources come from the network).
    index: HashMap<IpAddr, u32, SeededState>,
    /// Dense (removal swaps the last entry in), so the expiry walk and eviction probes are O(1).
    entries: Vec<Entry>,
    /// Where the next expiry walk or eviction probe starts.
    hand: usize,
    stats: RateLimitStats,
}

const DROP_NAMES: [&str; 1] = ["ratelimit-exceeded"];

impl RateLimiter {
    pub fn new(cfg: RateLimitConfig) -> RateLimiter {
        RateLimiter {
            index: HashMap::with_hasher(SeededState::random()),
            entries: Vec::new(),
            hand: 0,
            stats: RateLimitStats::default(),
            cfg,
        }
    }

    /// New limits; the sources' buckets are kept (capped to the new size on their next charge).
    pub fn set_config(&mut self, cfg: RateLimitConfig) {
        if (cfg.prefix_v4, cfg.prefix_v6) != (self.cfg.prefix_v4, self.cfg.prefix_v6) {
            // Entries are keyed by the old prefixes.
            self.index.clear();
            self.entries.clear();
        }
        self.cfg = cfg;
        while self.entries.len() > self.cfg.max_sources.max(1) {
            self.remove_at(self.entries.len() - 1);
        }
    }

    pub fn config(&self) -> &RateLimitConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &RateLimitStats {
        &self.stats
    }

    fn capacity(&self) -> u64 {
        u64::from(self.cfg.burst.max(1)) * TOKEN
    }

    /// The prefix `addr` is counted under.
    fn source_of(&self, addr: IpAddr) -> IpAddr {
        match addr {
            IpAddr::V4(a) => {
                let len = u32::from(self.cfg.prefix_v4.min(32));
                let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
                IpAddr::from((u32::from(a) & mask).to_be_bytes())
            }
            IpAddr::V6(a) => {
                let len = u32::from(self.cfg.prefix_v6.min(128));
                let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
                IpAddr::from((u128::from(a) & mask).to_be_bytes())
            }
        }
    }

    /// `e`'s tokens at `now`.
    fn refilled(&self, e: &Entry, now: u64) -> u64 {
        let gained = now
            .saturating_sub(e.last)
            .saturating_mul(u64::from(self.cfg.new_flows_per_second));
        e.tokens.saturating_add(gained).min(self.capacity())
    }

    /// Take a token from `addr`'s bucket at `now`; `false`: none left.
    pub fn admit(&mut self, now: u64, addr: IpAddr) -> bool {
        let source = self.source_of(addr);
        let i = match self.index.get(&source) {
            Some(&i) => i as usize,
            None => self.insert(now, source),
        };
        let Some(e) = self.entries.get(i).copied() else {
            return true;
        };
        let tokens = self.refilled(&e, now);
        let (tokens, ok) = match tokens.checked_sub(TOKEN) {
            Some(t) => (t, true),
            None => (tokens, false),
        };
        if let Some(slot) = self.entries.get_mut(i) {
            slot.tokens = tokens;
            slot.last = now;
        }
        if ok {
            self.stats.admitted += 1;
        } else {
            self.stats.limited += 1;
        }
        ok
    }

    /// A full bucket for `source`, making room if the table is full. Returns its index.
    fn insert(&mut self, now: u64, source: IpAddr) -> usize {
        if self.entries.len() >= self.cfg.max_sources.max(1) {
            self.evict(now);
        }
        let i = self.entries.len();
        self.entries.push(Entry {
            source,
            tokens: self.capacity(),
            last: now,
        });
        self.index.insert(source, i as u32);
        i
    }

    /// Remove one entry: the first idle one of the next few, else the least recently charged of
    /// them.
    fn evict(&mut self, now: u64) {
        let n = self.entries.len();
        if n == 0 {
            return;
        }
        let mut victim = self.hand % n;
        for k in 0..EVICT_PROBES.min(n) {
            let i = (self.hand + k) % n;
            let e = self.entries[i];
            if self.refilled(&e, now) >= self.capacity() {
                victim = i;
                break;
            }
            if e.last < self.entries[victim].last {
                victim = i;
            }
        }
        self.hand = victim + 1;
        if self.refilled(&self.entries[victim], now) < self.capacity() {
            self.stats.evicted += 1;
        }
        self.remove_at(victim);
    }

    fn remove_at(&mut self, i: usize) {
        if i >= self.entries.len() {
            return;
        }
        let gone = self.entries.swap_remove(i);
        self.index.remove(&gone.source);
        if let Some(moved) = self.entries.get(i) {
            self.index.insert(moved.source, i as u32);
        }
    }

    /// Drop idle entries (full buckets: the same as none) among the next `budget` ones.
    fn expire_idle(&mut self, now: u64, budget: usize) -> usize {
        let mut removed = 0;
        for _ in 0..budget.min(self.entries.len()) {
            if self.hand >= self.entries.len() {
                self.hand = 0;
            }
            let e = self.entries[self.hand];
            if self.refilled(&e, now) >= self.capacity() {
                // The last entry moves here: look at this index again next.
                self.remove_at(self.hand);
                removed += 1;
            } else {
                self.hand += 1;
            }
        }
        removed
    }
}

impl Stage for RateLimiter {
    fn name(&self) -> &'static str {
        "ratelimit"
    }

    fn reads_known(&self) -> bool {
        true
    }

    fn process(&mut self, now: u64, pkt: &mut Packet, _bytes: &mut Bytes<'_>) -> Verdict {
        if pkt.known || pkt.policy == NewFlowPolicy::Refuse || !firewall::starts_flow(&pkt.info) {
            return Verdict::Forward;
        }
        if self.admit(now, pkt.info.key.src) {
            Verdict::Forward
        } else {
            Verdict::Drop(0)
        }
    }

    fn drop_reasons(&self) -> &'static [&'static str] {
        &DROP_NAMES
    }

    fn expire(&mut self, now: u64, budget: usize, _gone: Option<&mut dyn FnMut(&Conn)>) -> usize {
        self.expire_idle(now, budget)
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn export_bucket(&self, _now: u64, _bucket: u16, _out: &mut FlowSet) {}

    fn import(
        &mut self,
        _now: u64,
        _set: &mut FlowSet,
        _how: &mut dyn FnMut(u16) -> Option<Import>,
    ) -> usize {
        0
    }

    fn remove_bucket(&mut self, _bucket: u16) -> usize {
        // Entries are per source, not per flow bucket.
        0
    }

    fn counters(&self, out: &mut BTreeMap<String, u64>) {
        out.insert("ratelimit_sources".into(), self.entries.len() as u64);
        out.insert("ratelimit_admitted".into(), self.stats.admitted);
        out.insert("ratelimit_limited".into(), self.stats.limited);
        out.insert("ratelimit_evicted".into(), self.stats.evicted);
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use dva_flow::FlowKey;
    use dva_wire::ip_proto;
    use dva_wire::tcp::flags::{ACK, SYN};

    use super::*;
    use crate::firewall::{PacketInfo, TcpSegment};

    const SEC: u64 = 1_000_000_000;

    fn cfg(rate: u32, burst: u32) -> RateLimitConfig {
        RateLimitConfig {
            new_flows_per_second: rate,
            burst,
            ..Default::default()
        }
    }

    fn packet(src: &str, sport: u16, flags: u8) -> Packet {
        let info = PacketInfo {
            ingress_if: 0,
            key: FlowKey {
                proto: ip_proto::TCP,
                src: src.parse().expect("addr"),
                dst: "198.18.2.2".parse().expect("addr"),
                src_port: sport,
                dst_port: 80,
            },
            tcp_flags: flags,
            tcp: TcpSegment::default(),
            icmp: None,
            icmp_inner: None,
            len: 60,
        };
        Packet::new(info, 0, NewFlowPolicy::Create, false, 20, 60)
    }

    fn run(rl: &mut RateLimiter, now: u64, mut p: Packet) -> Verdict {
        rl.process(now, &mut p, &mut Bytes::ReadOnly(&[]))
    }

    #[test]
    fn burst_then_rate() {
        let mut rl = RateLimiter::new(cfg(10, 5));
        let admitted = (0..8)
            .filter(|i| run(&mut rl, SEC, packet("10.0.0.1", 1000 + i, SYN)) == Verdict::Forward)
            .count();
        assert_eq!(admitted, 5, "the burst, then nothing at the same instant");
        // 10/s: one more token every 100 ms.
        assert_eq!(
            run(&mut rl, SEC + SEC / 10, packet("10.0.0.1", 2000, SYN)),
            Verdict::Forward
        );
        assert_eq!(
            run(&mut rl, SEC + SEC / 10, packet("10.0.0.1", 2001, SYN)),
            Verdict::Drop(0)
        );
        assert_eq!(rl.stats().limited, 4);
        assert_eq!(rl.stats().admitted, 6);
        assert_eq!(rl.drop_reasons()[0], "ratelimit-exceeded");
    }

    #[test]
    fn sources_are_apart_and_grouped_by_prefix() {
        let mut rl = RateLimiter::new(RateLimitConfig {
            prefix_v4: 24,
            ..cfg(1, 1)
        });
        assert_eq!(
            run(&mut rl, 0, packet("10.0.0.1", 1, SYN)),
            Verdict::Forward
        );
        // Same /24: the same bucket.
        assert_eq!(
            run(&mut rl, 0, packet("10.0.0.2", 1, SYN)),
            Verdict::Drop(0)
        );
        // Another source: its own.
        assert_eq!(
            run(&mut rl, 0, packet("10.0.1.1", 1, SYN)),
            Verdict::Forward
        );
        assert_eq!(
            run(&mut rl, 0, packet("2001:db8::1", 1, SYN)),
            Verdict::Forward
        );
        assert_eq!(
            run(&mut rl, 0, packet("2001:db8::ffff:1", 1, SYN)),
            Verdict::Drop(0),
            "one /64"
        );
    }

    #[test]
    fn only_packets_that_create_a_flow_count() {
        let mut rl = RateLimiter::new(cfg(1, 1));
        assert_eq!(
            run(&mut rl, 0, packet("10.0.0.1", 1, SYN)),
            Verdict::Forward
        );
        // The bucket is empty: established traffic, mid-flow segments and packets that are
        // punted elsewhere still pass.
        let mut known = packet("10.0.0.1", 2, SYN);
        known.known = true;
        assert_eq!(run(&mut rl, 0, known), Verdict::Forward);
        assert_eq!(
            run(&mut rl, 0, packet("10.0.0.1", 3, ACK)),
            Verdict::Forward
        );
        assert_eq!(
            run(&mut rl, 0, packet("10.0.0.1", 4, SYN | ACK)),
            Verdict::Forward
        );
        let mut refused = packet("10.0.0.1", 5, SYN);
        refused.policy = NewFlowPolicy::Refuse;
        assert_eq!(run(&mut rl, 0, refused), Verdict::Forward);
        assert_eq!(
            run(&mut rl, 0, packet("10.0.0.1", 6, SYN)),
            Verdict::Drop(0)
        );
        assert_eq!(rl.stats().limited, 1);
    }

    #[test]
    fn the_table_is_bounded_and_idle_sources_go_first() {
        let mut rl = RateLimiter::new(RateLimitConfig {
            max_sources: 4,
            ..cfg(1, 2)
        });
        // Four busy sources (one token used each), then one idle for long enough to refill.
        for i in 0..4u8 {
            let src = IpAddr::from([10, 0, 0, i]).to_string();
            assert_eq!(run(&mut rl, 0, packet(&src, 1, SYN)), Verdict::Forward);
        }
        assert_eq!(rl.len(), 4);
        // At 10 s every bucket is full again: a new source replaces an idle one, not counted
        // as an eviction.
        assert_eq!(
            run(&mut rl, 10 * SEC, packet("10.0.1.1", 1, SYN)),
            Verdict::Forward
        );
        assert_eq!(rl.len(), 4);
        assert_eq!(rl.stats().evicted, 0);
        // Many more sources at one instant: the table never grows past its bound.
        for i in 0..100u8 {
            let src = IpAddr::from([10, 0, 2, i]).to_string();
            run(&mut rl, 10 * SEC, packet(&src, 1, SYN));
        }
        assert_eq!(rl.len(), 4);
        assert!(rl.stats().evicted > 0);
    }

    #[test]
    fn expiry_removes_idle_sources_in_slices() {
        let mut rl = RateLimiter::new(cfg(1, 1));
        for i in 0..10u8 {
            let src = IpAddr::from([10, 0, 0, i]).to_string();
            run(&mut rl, 0, packet(&src, 1, SYN));
        }
        // Not yet refilled: nothing idle.
        assert_eq!(rl.expire(SEC / 2, 100, None), 0);
        assert_eq!(rl.expire(2 * SEC, 4, None), 4, "at most the budget");
        assert_eq!(rl.expire(2 * SEC, 100, None), 6);
        assert!(rl.is_empty());
    }

    #[test]
    fn a_long_idle_time_does_not_overflow() {
        let mut rl = RateLimiter::new(cfg(u32::MAX, 3));
        assert_eq!(
            run(&mut rl, 0, packet("10.0.0.1", 1, SYN)),
            Verdict::Forward
        );
        assert_eq!(
            run(&mut rl, u64::MAX, packet("10.0.0.1", 2, SYN)),
            Verdict::Forward
        );
    }
}
