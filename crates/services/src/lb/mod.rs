//! L4 load balancer: virtual services (VIP, protocol, port) in front of weighted backends, full NAT.
//! A sans-IO stage over a mutable IP packet (no Ethernet header), rewritten in place with
//! incremental checksums (shared with [`crate::nat`]).
//!
//! Per packet ([`Lb::process`]):
//! 1. A packet of a flow is translated both ways: client → VIP becomes source → backend, the
//!    backend's reply to source becomes VIP → client. ICMP errors about a flow are translated like
//!    NAT's.
//! 2. A new TCP SYN or UDP datagram to a VIP:port picks a backend from the service's Maglev table
//!    (`maglev.rs`) by the flow's symmetric 5-tuple hash, so every data plane with the same config
//!    and backend health picks the same backend; takes a full-NAT source address and a port in
//!    the flow's bucket ([`crate::nat::port_bucket`], as NAT does); records the flow.
//! 3. A TCP segment without SYN to a VIP, or anything to a full-NAT source address, with no flow
//!    here: [`LbDropReason::NoFlow`] (the data plane punts it to the bucket's previous owner). No
//!    healthy backend: [`LbDropReason::NoBackend`]. Anything else passes untouched.
//!
//! Backend state ([`Lb::set_backend_state`]): `Down` and `Draining` backends get no new flows (the
//! table is rebuilt without them). Existing flows keep going to their backend in both cases: for
//! `Draining` that is the point; for `Down` it is a choice — a health check failing does not mean
//! every connection is dead (a partition between the checker and the backend, a slow check), a
//! broken connection times out or is reset by its endpoints on its own, and re-pinning a TCP flow
//! to another backend mid-stream would only get it reset there. (Long-lived UDP flows to a dead
//! backend therefore live until their idle timeout; a `set_backend_state` that also flushed them
//! would be a future option.)
//!
//! The table is rebuilt only when a service's backend set, weights or eligibility change; its size
//! depends on the configured backend count only, so health changes move as few flows as Maglev
//! allows. Backends must be of the VIP's family (others are ignored: no NAT46); only TCP and UDP
//! services are served.

mod maglev;

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;

use dva_flow::FlowKey;
use dva_wire::ip_proto;
use serde::{Deserialize, Serialize};

use crate::conntrack::tcp::starts_connection;
use crate::hash::SeededState;
use crate::nat::rewrite::{self, Kind, ParseError, Parsed};
use crate::nat::{
    allocate_source, normalize_buckets, port_bucket, translate_bound, translate_related,
    BindingTable, SourceRequest,
};

pub use crate::nat::{
    Binding, BindingError, BindingTimeouts, Direction, FlowState, PortRange, DEFAULT_PORTS,
};
pub use maglev::TABLE_SIZES;

/// Default cap on flows per instance.
pub const DEFAULT_MAX_FLOWS: usize = 1_048_576;

fn default_ports() -> PortRange {
    DEFAULT_PORTS
}

fn default_max_flows() -> usize {
    DEFAULT_MAX_FLOWS
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// Unique within the service; the Maglev permutation derives from it.
    pub name: String,
    pub addr: IpAddr,
    pub port: u16,
    /// Share of new flows relative to the service's other backends; 0 = none.
    #[serde(default = "one")]
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualService {
    pub name: String,
    pub vip: IpAddr,
    /// TCP or UDP.
    pub proto: u8,
    pub port: u16,
    pub backends: Vec<Backend>,
    /// Full-NAT source addresses towards the backends (the appliance's inside address); a flow
    /// takes one of its family, chosen by a hash of the client address.
    pub source: Vec<IpAddr>,
    /// Full-NAT source ports.
    #[serde(default = "default_ports")]
    pub ports: PortRange,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LbConfig {
    #[serde(default)]
    pub services: Vec<VirtualService>,
    /// New flows beyond this many are dropped ([`LbDropReason::TableFull`]).
    #[serde(default = "default_max_flows")]
    pub max_flows: usize,
}

impl Default for LbConfig {
    fn default() -> Self {
        LbConfig {
            services: Vec::new(),
            max_flows: DEFAULT_MAX_FLOWS,
        }
    }
}

/// Health / admin state of a backend (see the module doc for what each means to flows).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    #[default]
    Up,
    Down,
    Draining,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbVerdict {
    Translated,
    Untouched,
    Drop(LbDropReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LbDropReason {
    /// Belongs to a flow not held here (TCP without SYN to a VIP, a packet to a full-NAT source
    /// address): punt it to the bucket's previous owner, or drop it.
    NoFlow,
    /// The service has no backend that takes new flows.
    NoBackend,
    /// No free full-NAT source port in the flow's bucket.
    PortsExhausted,
    /// `max_flows` reached.
    TableFull,
    Malformed,
    /// A fragment to a VIP or source address (no reassembly here).
    UnsupportedFragment,
}

impl LbDropReason {
    pub const ALL: [LbDropReason; 6] = [
        LbDropReason::NoFlow,
        LbDropReason::NoBackend,
        LbDropReason::PortsExhausted,
        LbDropReason::TableFull,
        LbDropReason::Malformed,
        LbDropReason::UnsupportedFragment,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LbDropReason::NoFlow => "no_flow",
            LbDropReason::NoBackend => "no_backend",
            LbDropReason::PortsExhausted => "ports_exhausted",
            LbDropReason::TableFull => "table_full",
            LbDropReason::Malformed => "malformed",
            LbDropReason::UnsupportedFragment => "unsupported_fragment",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LbError {
    #[error("no virtual service named {0:?}")]
    UnknownService(String),
    #[error("virtual service {service:?} has no backend named {backend:?}")]
    UnknownBackend { service: String, backend: String },
}

/// Counters of one backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStats {
    pub service: String,
    pub backend: String,
    pub addr: IpAddr,
    pub port: u16,
    pub weight: u32,
    pub state: BackendState,
    /// In the current config (a removed backend is listed while it still has flows).
    pub configured: bool,
    pub new_flows: u64,
    /// Live flows (expired ones count until collected).
    pub active_flows: u64,
    /// Packets and bytes of its flows, both directions.
    pub packets: u64,
    pub bytes: u64,
}

/// Counters of one LB instance (one per data-path thread; sum them to report).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LbStats {
    pub translated: u64,
    /// ICMP errors among them.
    pub related: u64,
    pub untouched: u64,
    pub flows_created: u64,
    /// Indexed like [`LbDropReason::ALL`].
    pub drops: [u64; 6],
}

/// One backend's identity and counters; its index is the tag of its flows in the table. Slots
/// outlive config changes so that flows keep their counters; a slot is reused only once it is out
/// of the config and has no flows.
#[derive(Debug, Clone)]
struct Slot {
    service: String,
    name: String,
    addr: IpAddr,
    port: u16,
    weight: u32,
    state: BackendState,
    configured: bool,
    new_flows: u64,
    packets: u64,
    bytes: u64,
}

impl Slot {
    fn eligible(&self) -> bool {
        self.state == BackendState::Up && self.weight > 0
    }
}

#[derive(Debug)]
struct Service {
    name: String,
    source: Vec<IpAddr>,
    ports: PortRange,
    /// Backend slots, config order.
    backends: Vec<u32>,
    table_size: usize,
    /// Maglev table: indices into `backends`. Empty: no eligible backend.
    lookup: Vec<u16>,
    /// `(name, weight)` of eligible backends (weight 0 otherwise) the table was built from.
    built_from: Vec<(String, u32)>,
}

/// The load balancer of one data-path thread.
pub struct Lb {
    cfg: LbConfig,
    services: Vec<Service>,
    by_vip: HashMap<(IpAddr, u8, u16), usize>,
    /// `(source address, proto, ports)` of every service, for replies without a flow.
    sources: Vec<(IpAddr, u8, PortRange)>,
    slots: Vec<Slot>,
    slot_index: HashMap<(String, String), u32>,
    n_buckets: usize,
    table: BindingTable,
    seed: SeededState,
    stats: LbStats,
    rebuilds: u64,
    /// The tuple the last translated TCP or UDP packet left with (for the chain's descriptor).
    out: Option<FlowKey>,
}

impl std::fmt::Debug for Lb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lb")
            .field("flows", &self.table.len())
            .field("n_buckets", &self.n_buckets)
            .field("services", &self.services.len())
            .finish()
    }
}

impl Lb {
    /// `n_buckets`: the appliance's bucket count (a power of two up to 65536; other values are
    /// rounded up).
    pub fn new(cfg: LbConfig, n_buckets: usize) -> Lb {
        let mut lb = Lb {
            cfg: LbConfig::default(),
            services: Vec::new(),
            by_vip: HashMap::new(),
            sources: Vec::new(),
            slots: Vec::new(),
            slot_index: HashMap::new(),
            n_buckets: normalize_buckets(n_buckets),
            table: BindingTable::new(cfg.max_flows, &BindingTimeouts::default()),
            // Fixed, not per instance: every data plane then picks the same translated port
            // for a flow (when free), so a SYN retransmitted after its bucket moved to another
            // data plane is translated as the first one was and the far end sees a
            // retransmission, not a second connection that its next ACK would reset. Only the
            // first candidate depends on it; the probe budget bounds what a chosen key can cost.
            seed: SeededState::fixed(0x6476_615f_706f_7274),
            stats: LbStats::default(),
            out: None,
            rebuilds: 0,
        };
        lb.set_config(cfg);
        lb
    }

    /// Install a new config. Existing flows keep their backend and translation; backend states set
    /// with [`Lb::set_backend_state`] persist for backends (by service and backend name) that
    /// stay. A service's table is rebuilt only if its backends, weights or eligibility changed.
    pub fn set_config(&mut self, cfg: LbConfig) {
        // Pass 1: which (service, backend) names the new config has.
        let mut wanted: Vec<(usize, usize)> = Vec::new();
        let mut seen: HashMap<(String, String), ()> = HashMap::new();
        let mut service_seen: HashMap<&str, ()> = HashMap::new();
        for (si, s) in cfg.services.iter().enumerate() {
            if service_seen.insert(&s.name, ()).is_some() {
                continue;
            }
            for (bi, b) in s.backends.iter().enumerate() {
                if b.addr.is_ipv4() != s.vip.is_ipv4() {
                    continue;
                }
                if seen.insert((s.name.clone(), b.name.clone()), ()).is_none() {
                    wanted.push((si, bi));
                }
            }
        }
        for slot in &mut self.slots {
            slot.configured = false;
        }
        // Pass 2: update kept slots, then place new backends (reusing dead slots).
        let mut new_ones = Vec::new();
        for &(si, bi) in &wanted {
            let (s, b) = (&cfg.services[si], &cfg.services[si].backends[bi]);
            match self.slot_index.get(&(s.name.clone(), b.name.clone())) {
                Some(&id) => {
                    let slot = &mut self.slots[id as usize];
                    slot.addr = b.addr;
                    slot.port = b.port;
                    slot.weight = b.weight;
                    slot.configured = true;
                }
                None => new_ones.push((si, bi)),
            }
        }
        for (si, bi) in new_ones {
            let (s, b) = (&cfg.services[si], &cfg.services[si].backends[bi]);
            let slot = Slot {
                service: s.name.clone(),
                name: b.name.clone(),
                addr: b.addr,
                port: b.port,
                weight: b.weight,
                state: BackendState::Up,
                configured: true,
                new_flows: 0,
                packets: 0,
                bytes: 0,
            };
            let reusable = (0..self.slots.len())
                .find(|&i| !self.slots[i].configured && self.table.tagged(i as u32) == 0);
            let id = match reusable {
                Some(i) => {
                    let old = &self.slots[i];
                    self.slot_index
                        .remove(&(old.service.clone(), old.name.clone()));
                    self.slots[i] = slot;
                    i
                }
                None => {
                    self.slots.push(slot);
                    self.slots.len() - 1
                }
            };
            self.slot_index
                .insert((s.name.clone(), b.name.clone()), id as u32);
        }
        // Services, reusing tables whose inputs did not change.
        let mut old: HashMap<String, Service> = self
            .services
            .drain(..)
            .map(|s| (s.name.clone(), s))
            .collect();
        self.by_vip.clear();
        self.sources.clear();
        let mut service_seen: HashMap<&str, ()> = HashMap::new();
        for s in &cfg.services {
            if service_seen.insert(&s.name, ()).is_some() {
                continue;
            }
            let backends: Vec<u32> = s
                .backends
                .iter()
                .filter_map(|b| {
                    let id = *self.slot_index.get(&(s.name.clone(), b.name.clone()))?;
                    let slot = &self.slots[id as usize];
                    // A later backend of the same name (ignored) has another address.
                    (slot.configured && slot.addr == b.addr && slot.port == b.port).then_some(id)
                })
                .fold(Vec::new(), |mut v, id| {
                    if !v.contains(&id) {
                        v.push(id);
                    }
                    v
                });
            let mut svc = Service {
                name: s.name.clone(),
                source: s
                    .source
                    .iter()
                    .copied()
                    .filter(|a| a.is_ipv4() == s.vip.is_ipv4())
                    .collect(),
                ports: s.ports,
                table_size: maglev::table_size(backends.len()),
                backends,
                lookup: Vec::new(),
                built_from: Vec::new(),
            };
            match old.remove(&s.name) {
                Some(o) if o.table_size == svc.table_size => {
                    svc.lookup = o.lookup;
                    svc.built_from = o.built_from;
                    // Old table indices refer to the old backend order.
                    if o.backends != svc.backends {
                        svc.built_from.clear();
                    }
                }
                _ => {}
            }
            self.rebuild_if_changed(&mut svc);
            let idx = self.services.len();
            if matches!(s.proto, ip_proto::TCP | ip_proto::UDP) {
                self.by_vip.entry((s.vip, s.proto, s.port)).or_insert(idx);
                for &a in &svc.source {
                    self.sources.push((a, s.proto, s.ports));
                }
            }
            self.services.push(svc);
        }
        self.table.set_max(cfg.max_flows);
        self.cfg = cfg;
    }

    fn rebuild_if_changed(&mut self, svc: &mut Service) {
        let members: Vec<(String, u32)> = svc
            .backends
            .iter()
            .map(|&id| {
                let s = &self.slots[id as usize];
                (s.name.clone(), if s.eligible() { s.weight } else { 0 })
            })
            .collect();
        if members == svc.built_from
            && (svc.lookup.is_empty() || svc.lookup.len() == svc.table_size)
        {
            return;
        }
        let refs: Vec<(&str, u32)> = members.iter().map(|(n, w)| (n.as_str(), *w)).collect();
        svc.lookup = maglev::populate(&refs, svc.table_size);
        svc.built_from = members;
        self.rebuilds += 1;
    }

    pub fn config(&self) -> &LbConfig {
        &self.cfg
    }

    pub fn set_timeouts(&mut self, t: &BindingTimeouts) {
        self.table.set_timeouts(t);
    }

    pub fn n_buckets(&self) -> usize {
        self.n_buckets
    }

    /// Health or admin input for one backend. Rebuilds the service's table if the backend's
    /// eligibility for new flows changed.
    pub fn set_backend_state(
        &mut self,
        service: &str,
        backend: &str,
        state: BackendState,
    ) -> Result<(), LbError> {
        let Some(si) = self.services.iter().position(|s| s.name == service) else {
            return Err(LbError::UnknownService(service.to_string()));
        };
        let id = self
            .slot_index
            .get(&(service.to_string(), backend.to_string()))
            .copied()
            .filter(|&id| self.slots[id as usize].configured)
            .ok_or_else(|| LbError::UnknownBackend {
                service: service.to_string(),
                backend: backend.to_string(),
            })?;
        self.slots[id as usize].state = state;
        let mut svc = self.services.remove(si);
        self.rebuild_if_changed(&mut svc);
        self.services.insert(si, svc);
        Ok(())
    }

    pub fn backend_state(&self, service: &str, backend: &str) -> Option<BackendState> {
        let id = self
            .slot_index
            .get(&(service.to_string(), backend.to_string()))?;
        Some(self.slots[*id as usize].state)
    }

    /// Maglev tables built so far (construction, config changes, state changes).
    pub fn table_rebuilds(&self) -> u64 {
        self.rebuilds
    }

    /// The backend (name) a new flow whose first packet has tuple `key` would get, if `key` is
    /// addressed to a service with a backend taking new flows.
    pub fn backend_for(&self, key: &FlowKey) -> Option<&str> {
        let slot = self.pick(key)?;
        Some(&self.slots[slot as usize].name)
    }

    fn pick(&self, key: &FlowKey) -> Option<u32> {
        let &si = self.by_vip.get(&(key.dst, key.proto, key.dst_port))?;
        let svc = self.services.get(si)?;
        if svc.lookup.is_empty() {
            return None;
        }
        let e = svc.lookup[key.symmetric_hash() as usize % svc.lookup.len()];
        svc.backends.get(usize::from(e)).copied()
    }

    /// Translate one IP packet in place (see the module doc). `bucket`: the flow bucket it was
    /// dispatched to.
    pub fn process(&mut self, now: u64, bucket: u16, pkt: &mut [u8]) -> LbVerdict {
        match rewrite::parse(pkt) {
            Ok(p) => self.process_parsed(now, bucket, &p, None, pkt),
            Err(e) => self.unparsed(e),
        }
    }

    /// A packet [`rewrite::parse`] refused.
    fn unparsed(&mut self, e: ParseError) -> LbVerdict {
        match e {
            ParseError::Malformed => self.drop(LbDropReason::Malformed),
            ParseError::Fragment { proto, src: _, dst } => {
                let concerns = self.by_vip.keys().any(|&(v, p, _)| v == dst && p == proto)
                    || self.sources.iter().any(|&(a, p, _)| a == dst && p == proto);
                if concerns {
                    self.drop(LbDropReason::UnsupportedFragment)
                } else {
                    self.untouched()
                }
            }
        }
    }

    /// [`Lb::process`] on a parsed packet; `found`: the flow lookup of `p.key`, when the caller
    /// already made it.
    #[inline]
    fn process_parsed(
        &mut self,
        now: u64,
        bucket: u16,
        p: &Parsed,
        found: Option<Option<(u32, Direction)>>,
        pkt: &mut [u8],
    ) -> LbVerdict {
        match p.kind {
            Kind::Other => self.untouched(),
            Kind::IcmpError(inner) => match translate_related(&mut self.table, now, pkt, p, &inner)
            {
                Some(slot) => {
                    self.account(slot, p);
                    self.stats.related += 1;
                    self.translated()
                }
                None if self.sources.iter().any(|&(a, _, _)| a == p.key.dst) => {
                    self.drop(LbDropReason::NoFlow)
                }
                None => self.untouched(),
            },
            Kind::Tcp { .. } | Kind::Udp | Kind::Echo { .. } => {
                let found = found.unwrap_or_else(|| self.table.lookup(now, &p.key));
                if let Some((slot, dir)) = found {
                    if let Some(to) = translate_bound(&mut self.table, now, slot, dir, p, pkt) {
                        self.out = Some(to);
                        self.account(slot, p);
                        return self.translated();
                    }
                }
                self.new_flow(now, bucket, p, pkt)
            }
        }
    }

    fn new_flow(&mut self, now: u64, bucket: u16, p: &Parsed, pkt: &mut [u8]) -> LbVerdict {
        let key = p.key;
        let Some(&si) = self.by_vip.get(&(key.dst, key.proto, key.dst_port)) else {
            let reply = self
                .sources
                .iter()
                .any(|&(a, pr, r)| a == key.dst && pr == key.proto && r.contains(key.dst_port));
            return if reply {
                self.drop(LbDropReason::NoFlow)
            } else {
                self.untouched()
            };
        };
        let starts = match p.kind {
            Kind::Tcp { flags } => starts_connection(flags),
            Kind::Udp => true,
            _ => return self.untouched(),
        };
        if !starts {
            return self.drop(LbDropReason::NoFlow);
        }
        let Some(slot) = self.pick(&key) else {
            return self.drop(LbDropReason::NoBackend);
        };
        if !self.table.has_room(now) {
            return self.drop(LbDropReason::TableFull);
        }
        let be = &self.slots[slot as usize];
        let template = FlowKey {
            proto: key.proto,
            src: key.src,
            src_port: key.src_port,
            dst: be.addr,
            dst_port: be.port,
        };
        let bucket = port_bucket(bucket, self.n_buckets);
        let svc = &self.services[si];
        let req = SourceRequest {
            addrs: &svc.source,
            ports: svc.ports,
            bucket,
            n_buckets: self.n_buckets,
            addr_hash: self.seed.hash_one(key.src),
            port_hash: self.seed.hash_one(key),
            reserved: &[],
        };
        let Some(to) = allocate_source(&mut self.table, now, &req, &template) else {
            return self.drop(LbDropReason::PortsExhausted);
        };
        let b = Binding {
            bucket,
            orig: key,
            xlat: to,
            state: FlowState::default(),
            created: now,
            last_seen: now,
        };
        match self.table.insert(now, b, slot) {
            Ok(_) => {}
            Err(BindingError::TableFull { .. }) => return self.drop(LbDropReason::TableFull),
            Err(BindingError::Exists { .. } | BindingError::Invalid { .. }) => {
                return self.drop(LbDropReason::PortsExhausted)
            }
        }
        rewrite::rewrite(pkt, p, &to);
        self.out = Some(to);
        self.stats.flows_created += 1;
        let s = &mut self.slots[slot as usize];
        s.new_flows += 1;
        s.packets += 1;
        s.bytes += u64::from(p.len());
        self.translated()
    }

    fn account(&mut self, slot: u32, p: &Parsed) {
        if let Some(s) = self
            .table
            .tag(slot)
            .and_then(|t| self.slots.get_mut(t as usize))
        {
            s.packets += 1;
            s.bytes += u64::from(p.len());
        }
    }

    fn translated(&mut self) -> LbVerdict {
        self.stats.translated += 1;
        LbVerdict::Translated
    }

    fn untouched(&mut self) -> LbVerdict {
        self.stats.untouched += 1;
        LbVerdict::Untouched
    }

    fn drop(&mut self, reason: LbDropReason) -> LbVerdict {
        self.stats.drops[reason as usize] += 1;
        LbVerdict::Drop(reason)
    }

    /// Remove expired flows, examining at most `max` expiry records. Returns how many went.
    pub fn expire(&mut self, now: u64, max: usize) -> usize {
        self.table.expire(now, max)
    }

    /// Flows, including expired ones not yet collected.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.len() == 0
    }

    /// `(bucket, flows)` for every bucket holding any.
    pub fn flows_per_bucket(&self) -> impl Iterator<Item = (u16, u32)> + '_ {
        self.table.flows_per_bucket()
    }

    /// Copies of the live flows of `bucket`, for a state move.
    pub fn export_bucket(&self, now: u64, bucket: u16) -> Vec<Binding> {
        self.table.export_bucket(now, bucket)
    }

    /// The backend slot of an imported flow: the service's backend at the translated destination.
    fn tag_of(&self, b: &Binding) -> u32 {
        let Some(&si) = self
            .by_vip
            .get(&(b.orig.dst, b.orig.proto, b.orig.dst_port))
        else {
            return crate::nat::UNCOUNTED;
        };
        self.services[si]
            .backends
            .iter()
            .copied()
            .find(|&id| {
                let s = &self.slots[id as usize];
                s.addr == b.xlat.dst && s.port == b.xlat.dst_port
            })
            .unwrap_or(crate::nat::UNCOUNTED)
    }

    /// Take over a flow another data plane exported (its timestamps restart at `now`). A flow to a
    /// backend this config does not know still forwards, uncounted.
    pub fn import(&mut self, now: u64, b: Binding) -> Result<(), BindingError> {
        let tag = self.tag_of(&b);
        self.table.import(now, b, tag).map(|_| ())
    }

    /// Insert or replace a flow copied from another data plane (a failover replica).
    pub fn upsert(&mut self, now: u64, b: Binding) -> Result<(), BindingError> {
        let tag = self.tag_of(&b);
        self.table.upsert(now, b, tag).map(|_| ())
    }

    /// Drop every flow of `bucket` (after a successful export). Returns how many.
    pub fn remove_bucket(&mut self, bucket: u16) -> usize {
        self.table.remove_bucket(bucket)
    }

    /// Flows (including expired ones not yet collected), in no particular order.
    pub fn flows(&self) -> impl Iterator<Item = &Binding> + '_ {
        self.table.iter().map(|(b, _)| b)
    }

    /// The live flow a packet with tuple `key` belongs to, and its direction.
    pub fn binding_of(&mut self, now: u64, key: &FlowKey) -> Option<(&Binding, Direction)> {
        let (slot, dir) = self.table.lookup(now, key)?;
        Some((self.table.get(slot)?, dir))
    }

    /// Counters of every configured backend, and of removed ones that still have flows.
    pub fn backend_stats(&self) -> Vec<BackendStats> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(i, s)| s.configured || self.table.tagged(*i as u32) > 0)
            .map(|(i, s)| BackendStats {
                service: s.service.clone(),
                backend: s.name.clone(),
                addr: s.addr,
                port: s.port,
                weight: s.weight,
                state: s.state,
                configured: s.configured,
                new_flows: s.new_flows,
                active_flows: u64::from(self.table.tagged(i as u32)),
                packets: s.packets,
                bytes: s.bytes,
            })
            .collect()
    }

    pub fn stats(&self) -> &LbStats {
        &self.stats
    }

    /// Drops by reason.
    pub fn drops(&self) -> [(LbDropReason, u64); 6] {
        LbDropReason::ALL.map(|r| (r, self.stats.drops[r as usize]))
    }
}

mod stage;
#[cfg(test)]
mod tests;
