//! Network address translation: source NAT to a pool (masquerade is SNAT to the egress address),
//! destination NAT (port forwarding), and both at once (full NAT), with endpoint-dependent
//! mappings. A sans-IO stage over a mutable IP packet (no Ethernet header), rewritten in place with
//! incremental checksums (`nat/rewrite.rs`).
//!
//! Per packet ([`Nat::process`]):
//! 1. A packet of a binding is translated: the original direction to the binding's translated
//!    tuple, the reply direction back (de-SNAT restores the destination, de-DNAT the source).
//! 2. An ICMP error quoting a bound flow (either direction) gets its outer address and the quoted
//!    header translated consistently, as Linux's `nf_nat_icmp_reply_translation` does.
//! 3. Anything else is new. DNAT rules are tried first (destination rewrite), then SNAT rules
//!    against the post-DNAT tuple (source rewrite, port allocated in the flow's bucket). A match
//!    creates a binding; no match leaves the packet alone and creates nothing. A packet that cannot
//!    start a flow (TCP without a plain SYN, an echo reply), and anything addressed to an SNAT pool
//!    address, gets [`NatDropReason::NoBinding`]: it belongs to a flow this instance does not hold
//!    (the data plane punts it to the bucket's previous owner, or drops it).
//!
//! Bucket affinity (DESIGN.md §3): replies to a pool address are dispatched by their destination
//! port, [`port_bucket`]. A translated source port (or echo id) is therefore chosen so that
//! `port_bucket(port) == bucket` of the flow, which keeps both directions in one bucket; the
//! translated 5-tuple must be unused (the same port serves many remote endpoints). Probes are
//! bounded (`nat/alloc.rs`); exhaustion is a counted drop.
//!
//! Not translated: fragments (dropped as [`NatDropReason::UnsupportedFragment`] when NAT could
//! concern them, passed otherwise: there is no reassembly), protocols other than TCP, UDP and ICMP
//! echo (passed untouched), ICMP queries other than echo, and NAT between address families.

mod alloc;
pub(crate) mod rewrite;
mod table;
#[cfg(test)]
pub(crate) mod testpkt;

use std::hash::BuildHasher;
use std::net::IpAddr;

use dva_flow::FlowKey;
use dva_wire::ip_proto;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::conntrack::tcp::starts_connection;
use crate::hash::SeededState;
use rewrite::{Inner, Kind, ParseError, Parsed};
pub(crate) use table::{BindingTable, UNCOUNTED};

pub use crate::conntrack::Direction;
pub use crate::firewall::PortRange;
pub use table::{Binding, BindingError, BindingTimeouts, FlowState};

/// Ports (and echo ids) allocated when a rule names none.
pub const DEFAULT_PORTS: PortRange = PortRange {
    first: 1024,
    last: 65535,
};

/// Default cap on bindings per instance.
pub const DEFAULT_MAX_BINDINGS: usize = 1_048_576;

fn default_ports() -> PortRange {
    DEFAULT_PORTS
}

fn default_max_bindings() -> usize {
    DEFAULT_MAX_BINDINGS
}

/// The flow bucket of a packet addressed to a NAT/LB source address and port `port`
/// (`n_buckets`: a power of two, at most 65536). The dispatcher uses it for such packets; the
/// stages pick ports that satisfy it for the flow's bucket.
#[inline]
pub fn port_bucket(port: u16, n_buckets: usize) -> u16 {
    (usize::from(port) & n_buckets.saturating_sub(1)) as u16
}

/// A bucket count as the stages use it: a power of two in `1..=65536`.
pub(crate) fn normalize_buckets(n: usize) -> usize {
    n.clamp(1, 1 << 16).next_power_of_two()
}

/// Source NAT: packets matching `src`, `dst` (after any DNAT) and `proto` leave from a pool
/// address and a port of `ports`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnatRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Source networks; empty = any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub src: Vec<IpNet>,
    /// Destination networks; empty = any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dst: Vec<IpNet>,
    /// IP protocol; `None` = TCP, UDP and ICMP echo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<u8>,
    /// The pool. A flow takes an address of its own family, chosen by a hash of its source
    /// address (so one inside host keeps one outside address while the pool allows). A rule with
    /// no address of the packet's family does not match it.
    pub to: Vec<IpAddr>,
    /// Translated source ports and echo ids.
    #[serde(default = "default_ports")]
    pub ports: PortRange,
}

impl SnatRule {
    fn matches(&self, key: &FlowKey) -> bool {
        self.proto.is_none_or(|p| p == key.proto)
            && (self.src.is_empty() || self.src.iter().any(|n| n.contains(&key.src)))
            && (self.dst.is_empty() || self.dst.iter().any(|n| n.contains(&key.dst)))
            && self.to.iter().any(|a| a.is_ipv4() == key.src.is_ipv4())
    }
}

/// Destination NAT (port forwarding): TCP/UDP packets to `dst`, a port of `dport`, go to
/// `to_addr`. `to_port: Some(p)` maps the range onto `p..` (`dport.first` to `p`, the next port to
/// `p + 1`, ...), `None` keeps the port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnatRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Only packets that arrived on this interface; `None` = any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_if: Option<u8>,
    pub dst: IpAddr,
    pub proto: u8,
    pub dport: PortRange,
    pub to_addr: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_port: Option<u16>,
}

impl DnatRule {
    /// The translated destination of a packet with `key`, if the rule matches it.
    fn target(&self, ingress_if: u8, key: &FlowKey) -> Option<(IpAddr, u16)> {
        if key.proto != self.proto
            || key.dst != self.dst
            || !self.dport.contains(key.dst_port)
            || self.ingress_if.is_some_and(|i| i != ingress_if)
            || self.to_addr.is_ipv4() != key.dst.is_ipv4()
        {
            return None;
        }
        let port = match self.to_port {
            None => key.dst_port,
            Some(p) => p.checked_add(key.dst_port - self.dport.first)?,
        };
        Some((self.to_addr, port))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatConfig {
    /// Tried in order; the first match applies.
    #[serde(default)]
    pub snat: Vec<SnatRule>,
    /// Tried in order, before SNAT; the first match applies.
    #[serde(default)]
    pub dnat: Vec<DnatRule>,
    /// New flows beyond this many bindings are dropped ([`NatDropReason::TableFull`]).
    #[serde(default = "default_max_bindings")]
    pub max_bindings: usize,
}

impl Default for NatConfig {
    fn default() -> Self {
        NatConfig {
            snat: Vec::new(),
            dnat: Vec::new(),
            max_bindings: DEFAULT_MAX_BINDINGS,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatVerdict {
    /// Rewritten in place; forward it.
    Translated,
    /// Not NAT's business; forward it as it is.
    Untouched,
    Drop(NatDropReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NatDropReason {
    /// No free port (or echo id) in the flow's bucket, within the probe budget; also a DNAT whose
    /// translated tuple is taken.
    PortsExhausted,
    /// `max_bindings` reached.
    TableFull,
    /// Truncated or inconsistent headers.
    Malformed,
    /// A fragment NAT could concern (no reassembly here).
    UnsupportedFragment,
    /// Belongs to a flow without a binding here (TCP without SYN or an echo reply a rule would
    /// translate, anything addressed to an SNAT pool address): punt it to the bucket's previous
    /// owner, or drop it.
    NoBinding,
}

impl NatDropReason {
    pub const ALL: [NatDropReason; 5] = [
        NatDropReason::PortsExhausted,
        NatDropReason::TableFull,
        NatDropReason::Malformed,
        NatDropReason::UnsupportedFragment,
        NatDropReason::NoBinding,
    ];

    pub fn name(self) -> &'static str {
        match self {
            NatDropReason::PortsExhausted => "ports_exhausted",
            NatDropReason::TableFull => "table_full",
            NatDropReason::Malformed => "malformed",
            NatDropReason::UnsupportedFragment => "unsupported_fragment",
            NatDropReason::NoBinding => "no_binding",
        }
    }
}

/// Counters of one NAT instance (one per data-path thread; sum them to report).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NatStats {
    /// Packets rewritten (both directions and ICMP errors).
    pub translated: u64,
    /// ICMP errors among them.
    pub related: u64,
    pub untouched: u64,
    pub bindings_created: u64,
    /// Indexed like [`NatDropReason::ALL`].
    pub drops: [u64; 5],
}

/// The NAT stage of one data-path thread.
pub struct Nat {
    cfg: NatConfig,
    /// Every SNAT pool address, sorted.
    pools: Vec<IpAddr>,
    /// `(address, protocol, ports)` that port forwards receive on: never allocated as a
    /// translated source, or a reply to it would be taken for a new forwarded flow (and the
    /// dispatcher would bucket it by flow hash, not by port).
    reserved: Vec<(IpAddr, u8, PortRange)>,
    n_buckets: usize,
    table: BindingTable,
    seed: SeededState,
    stats: NatStats,
    /// The tuple the last translated TCP, UDP or echo packet left with (the chain's descriptor
    /// takes it instead of reading the bytes back).
    out: Option<FlowKey>,
}

impl std::fmt::Debug for Nat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nat")
            .field("bindings", &self.table.len())
            .field("n_buckets", &self.n_buckets)
            .field("config", &self.cfg)
            .finish()
    }
}

impl Nat {
    /// `n_buckets`: the appliance's bucket count (what the dispatchers use; a power of two up to
    /// 65536, other values are rounded up).
    pub fn new(cfg: NatConfig, n_buckets: usize) -> Nat {
        let mut nat = Nat {
            table: BindingTable::new(cfg.max_bindings, &BindingTimeouts::default()),
            cfg: NatConfig::default(),
            pools: Vec::new(),
            reserved: Vec::new(),
            n_buckets: normalize_buckets(n_buckets),
            // Fixed, not per instance: every data plane then picks the same translated port
            // for a flow (when free), so a SYN retransmitted after its bucket moved to another
            // data plane is translated as the first one was and the far end sees a
            // retransmission, not a second connection that its next ACK would reset. Only the
            // first candidate depends on it; the probe budget bounds what a chosen key can cost.
            seed: SeededState::fixed(0x6476_615f_706f_7274),
            stats: NatStats::default(),
            out: None,
        };
        nat.set_config(cfg);
        nat
    }

    /// Install new rules. Existing bindings keep translating as they did (as nftables does).
    pub fn set_config(&mut self, cfg: NatConfig) {
        let mut pools: Vec<IpAddr> = cfg.snat.iter().flat_map(|r| r.to.iter().copied()).collect();
        pools.sort();
        pools.dedup();
        self.pools = pools;
        self.reserved = cfg.dnat.iter().map(|r| (r.dst, r.proto, r.dport)).collect();
        self.table.set_max(cfg.max_bindings);
        self.cfg = cfg;
    }

    pub fn config(&self) -> &NatConfig {
        &self.cfg
    }

    pub fn set_timeouts(&mut self, t: &BindingTimeouts) {
        self.table.set_timeouts(t);
    }

    pub fn n_buckets(&self) -> usize {
        self.n_buckets
    }

    /// Translate one IP packet in place (see the module doc). `bucket`: the flow bucket it was
    /// dispatched to; `ingress_if`: the interface it arrived on (for DNAT rules).
    pub fn process(&mut self, now: u64, bucket: u16, ingress_if: u8, pkt: &mut [u8]) -> NatVerdict {
        match rewrite::parse(pkt) {
            Ok(p) => self.process_parsed(now, bucket, ingress_if, &p, None, pkt),
            Err(e) => self.unparsed(ingress_if, e),
        }
    }

    /// A packet [`rewrite::parse`] refused.
    fn unparsed(&mut self, ingress_if: u8, e: ParseError) -> NatVerdict {
        match e {
            ParseError::Malformed => self.drop(NatDropReason::Malformed),
            ParseError::Fragment { proto, src, dst } => {
                if self.fragment_concerns(ingress_if, proto, src, dst) {
                    self.drop(NatDropReason::UnsupportedFragment)
                } else {
                    self.untouched()
                }
            }
        }
    }

    /// [`Nat::process`] on a parsed packet; `found`: the binding lookup of `p.key`, when the
    /// caller already made it.
    #[inline]
    fn process_parsed(
        &mut self,
        now: u64,
        bucket: u16,
        ingress_if: u8,
        p: &Parsed,
        found: Option<Option<(u32, Direction)>>,
        pkt: &mut [u8],
    ) -> NatVerdict {
        match p.kind {
            Kind::Other => self.untouched(),
            Kind::IcmpError(inner) => {
                if translate_related(&mut self.table, now, pkt, p, &inner).is_some() {
                    self.stats.related += 1;
                    self.translated()
                } else if self.is_pool(p.key.dst) {
                    self.drop(NatDropReason::NoBinding)
                } else {
                    self.untouched()
                }
            }
            Kind::Tcp { .. } | Kind::Udp | Kind::Echo { .. } => {
                let found = found.unwrap_or_else(|| self.table.lookup(now, &p.key));
                if let Some((slot, dir)) = found {
                    if let Some(to) = translate_bound(&mut self.table, now, slot, dir, p, pkt) {
                        self.out = Some(to);
                        return self.translated();
                    }
                }
                self.new_flow(now, bucket, ingress_if, p, pkt)
            }
        }
    }

    fn new_flow(
        &mut self,
        now: u64,
        bucket: u16,
        ingress_if: u8,
        p: &Parsed,
        pkt: &mut [u8],
    ) -> NatVerdict {
        let key = p.key;
        let mut to = key;
        let dnat = match p.kind {
            Kind::Tcp { .. } | Kind::Udp => self
                .cfg
                .dnat
                .iter()
                .find_map(|r| r.target(ingress_if, &key)),
            _ => None,
        };
        match dnat {
            Some((addr, port)) => {
                to.dst = addr;
                to.dst_port = port;
            }
            // Addressed to a pool address and not forwarded: a reply whose binding is elsewhere.
            None if self.is_pool(key.dst) => return self.drop(NatDropReason::NoBinding),
            None => {}
        }
        let snat = self.cfg.snat.iter().position(|r| r.matches(&to));
        if dnat.is_none() && snat.is_none() {
            return self.untouched();
        }
        let starts = match p.kind {
            Kind::Tcp { flags } => starts_connection(flags),
            Kind::Udp => true,
            Kind::Echo { request } => request,
            Kind::IcmpError(_) | Kind::Other => false,
        };
        if !starts {
            return self.drop(NatDropReason::NoBinding);
        }
        if !self.table.has_room(now) {
            return self.drop(NatDropReason::TableFull);
        }
        let bucket = port_bucket(bucket, self.n_buckets);
        if let Some(rule) = snat.and_then(|i| self.cfg.snat.get(i)) {
            let addr_hash = self.seed.hash_one(key.src);
            let port_hash = self.seed.hash_one(key);
            match allocate_source(
                &mut self.table,
                now,
                &SourceRequest {
                    addrs: &rule.to,
                    ports: rule.ports,
                    bucket,
                    n_buckets: self.n_buckets,
                    addr_hash,
                    port_hash,
                    reserved: &self.reserved,
                },
                &to,
            ) {
                Some(k) => to = k,
                None => return self.drop(NatDropReason::PortsExhausted),
            }
        } else if !self.table.is_free(now, &to.reversed()) {
            return self.drop(NatDropReason::PortsExhausted);
        }
        let b = Binding {
            bucket,
            orig: key,
            xlat: to,
            state: FlowState::default(),
            created: now,
            last_seen: now,
        };
        match self.table.insert(now, b, 0) {
            Ok(_) => {}
            Err(BindingError::TableFull { .. }) => return self.drop(NatDropReason::TableFull),
            Err(BindingError::Exists { .. } | BindingError::Invalid { .. }) => {
                return self.drop(NatDropReason::PortsExhausted)
            }
        }
        self.stats.bindings_created += 1;
        rewrite::rewrite(pkt, p, &to);
        self.out = Some(to);
        self.translated()
    }

    fn is_pool(&self, addr: IpAddr) -> bool {
        self.pools.binary_search(&addr).is_ok()
    }

    /// Could NAT have to translate a fragment with these header fields?
    fn fragment_concerns(&self, ingress_if: u8, p: u8, src: IpAddr, dst: IpAddr) -> bool {
        if !matches!(
            p,
            ip_proto::TCP | ip_proto::UDP | ip_proto::ICMP | ip_proto::ICMPV6
        ) {
            return false; // passed untouched whole, so in pieces too
        }
        let k = FlowKey {
            proto: p,
            src,
            dst,
            src_port: 0,
            dst_port: 0,
        };
        self.is_pool(dst)
            || self.cfg.dnat.iter().any(|r| {
                r.proto == p
                    && ((r.dst == dst && r.ingress_if.is_none_or(|i| i == ingress_if))
                        || r.to_addr == src)
            })
            || self.cfg.snat.iter().any(|r| r.matches(&k))
    }

    fn translated(&mut self) -> NatVerdict {
        self.stats.translated += 1;
        NatVerdict::Translated
    }

    fn untouched(&mut self) -> NatVerdict {
        self.stats.untouched += 1;
        NatVerdict::Untouched
    }

    fn drop(&mut self, reason: NatDropReason) -> NatVerdict {
        self.stats.drops[reason as usize] += 1;
        NatVerdict::Drop(reason)
    }

    /// Remove expired bindings, examining at most `max` expiry records. Returns how many went.
    pub fn expire(&mut self, now: u64, max: usize) -> usize {
        self.table.expire(now, max)
    }

    /// Bindings, including expired ones not yet collected.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.len() == 0
    }

    /// `(bucket, bindings)` for every bucket holding any.
    pub fn flows_per_bucket(&self) -> impl Iterator<Item = (u16, u32)> + '_ {
        self.table.flows_per_bucket()
    }

    /// Copies of the live bindings of `bucket`, for a state move.
    pub fn export_bucket(&self, now: u64, bucket: u16) -> Vec<Binding> {
        self.table.export_bucket(now, bucket)
    }

    /// Take over a binding another data plane exported (its timestamps restart at `now`).
    pub fn import(&mut self, now: u64, b: Binding) -> Result<(), BindingError> {
        self.table.import(now, b, 0).map(|_| ())
    }

    /// Insert or replace a binding copied from another data plane (a failover replica).
    pub fn upsert(&mut self, now: u64, b: Binding) -> Result<(), BindingError> {
        self.table.upsert(now, b, 0).map(|_| ())
    }

    /// Drop every binding of `bucket` (after a successful export). Returns how many.
    pub fn remove_bucket(&mut self, bucket: u16) -> usize {
        self.table.remove_bucket(bucket)
    }

    /// Bindings (including expired ones not yet collected), in no particular order.
    pub fn bindings(&self) -> impl Iterator<Item = &Binding> + '_ {
        self.table.iter().map(|(b, _)| b)
    }

    /// The live binding a packet with tuple `key` belongs to, and its direction.
    pub fn binding_of(&mut self, now: u64, key: &FlowKey) -> Option<(&Binding, Direction)> {
        let (slot, dir) = self.table.lookup(now, key)?;
        Some((self.table.get(slot)?, dir))
    }

    pub fn stats(&self) -> &NatStats {
        &self.stats
    }

    /// Drops by reason.
    pub fn drops(&self) -> [(NatDropReason, u64); 5] {
        NatDropReason::ALL.map(|r| (r, self.stats.drops[r as usize]))
    }
}

/// Translate a packet of binding `slot` going `dir`; the tuple it has now. `None`: the packet is not really part of it
/// (an echo request matching a reply key, or a SYN re-opening a closed TCP binding, which is then
/// removed) and should be handled as new.
pub(crate) fn translate_bound(
    table: &mut BindingTable,
    now: u64,
    slot: u32,
    dir: Direction,
    p: &Parsed,
    pkt: &mut [u8],
) -> Option<FlowKey> {
    let b = table.get(slot)?;
    match p.kind {
        Kind::Echo { request } if request != (dir == Direction::Original) => return None,
        Kind::Tcp { flags }
            if dir == Direction::Original && starts_connection(flags) && b.state.closing() =>
        {
            table.remove(slot);
            return None;
        }
        _ => {}
    }
    let (_, to) = b.translation(dir);
    rewrite::rewrite(pkt, p, &to);
    table.touch(now, slot, dir, p.tcp_flags());
    Some(to)
}

/// Translate an ICMP error quoting a bound flow; the binding's slot, or `None` if none matches.
///
/// The quoted packet went the other way from the error. If the quote reversed is a key of binding
/// B in direction D, the error travels in direction D: its quote is rewritten to how the quoted
/// packet looked on the other side (the reverse of D's translated tuple), and each outer address
/// that B's D-translation changes is set to the translated value (as Linux does, whoever sent the
/// error: a router's error about a DNAT'd flow leaves from the public address).
pub(crate) fn translate_related(
    table: &mut BindingTable,
    now: u64,
    pkt: &mut [u8],
    p: &Parsed,
    inner: &Inner,
) -> Option<u32> {
    let (slot, dir) = table.lookup(now, &inner.key.reversed())?;
    let (from, to) = table.get(slot)?.translation(dir);
    let outer_src = (from.src != to.src).then_some(to.src);
    let outer_dst = (from.dst != to.dst).then_some(to.dst);
    rewrite::rewrite_icmp_error(pkt, p, inner, &to.reversed(), outer_src, outer_dst);
    Some(slot)
}

/// What [`allocate_source`] allocates from.
pub(crate) struct SourceRequest<'a> {
    /// Candidate source addresses (those of the flow's family are used).
    pub addrs: &'a [IpAddr],
    pub ports: PortRange,
    pub bucket: u16,
    pub n_buckets: usize,
    /// Picks the first address tried.
    pub addr_hash: u64,
    /// Picks the first port tried.
    pub port_hash: u64,
    /// Ports never to allocate, by address and protocol.
    pub reserved: &'a [(IpAddr, u8, PortRange)],
}

/// Most pool addresses one allocation tries.
const MAX_POOL_TRIES: usize = 16;

/// `to` with its source replaced by an address of `req.addrs` and a port (echo: id) of the bucket
/// such that the reply tuple is free. The flow's own source port is kept when it qualifies.
pub(crate) fn allocate_source(
    table: &mut BindingTable,
    now: u64,
    req: &SourceRequest<'_>,
    to: &FlowKey,
) -> Option<FlowKey> {
    let v4 = to.dst.is_ipv4();
    let n = req.addrs.iter().filter(|a| a.is_ipv4() == v4).count();
    if n == 0 {
        return None;
    }
    let echo = matches!(to.proto, ip_proto::ICMP | ip_proto::ICMPV6);
    let ports = alloc::BucketPorts::new(req.ports, req.bucket, req.n_buckets);
    let mut budget = alloc::MAX_PROBES;
    let first = (req.addr_hash % n as u64) as usize;
    for i in 0..n.min(MAX_POOL_TRIES) {
        let Some(&addr) = req
            .addrs
            .iter()
            .filter(|a| a.is_ipv4() == v4)
            .nth((first + i) % n)
        else {
            break;
        };
        let cand = |port: u16| FlowKey {
            src: addr,
            src_port: port,
            dst_port: if echo { port } else { to.dst_port },
            ..*to
        };
        let got = alloc::allocate(
            &ports,
            Some(to.src_port),
            req.port_hash,
            &mut budget,
            |port| {
                !req.reserved
                    .iter()
                    .any(|(a, p, r)| *a == addr && *p == to.proto && r.contains(port))
                    && table.is_free(now, &cand(port).reversed())
            },
        );
        if let Some(port) = got {
            return Some(cand(port));
        }
        if budget == 0 {
            break;
        }
    }
    None
}

pub(crate) mod stage;
#[cfg(test)]
mod tests;
