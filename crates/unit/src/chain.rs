//! The data plane's service chain: the stages its role config names, each a
//! [`dva_services::stage::Stage`], run in order over one packet descriptor (backwards for the
//! replies of a translated flow), and treated alike for their flow state's lifecycle.
//!
//! [`Chain::build`] is the registry: the one place that knows which type serves which
//! `role::Stage`. It reuses the running stages (their tables are the flows' state) and
//! reconfigures them in place.

use std::collections::BTreeMap;

use dva_proto::role::Stage as StageConfig;
use dva_proto::DataplaneConfig;
use dva_services::conntrack::{Conn, Conntrack, Direction};
use dva_services::firewall::{ConntrackConfig, Firewall, RejectKind};
use dva_services::lb::{BackendStats, Lb};
use dva_services::nat::Nat;
use dva_services::ratelimit::RateLimiter;
use dva_services::stage::{Bytes, FlowNote, FlowSet, Import, Packet, Stage, Verdict};

/// Where a packet goes after the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Forward,
    /// No stage may create state for it here: ask the bucket's previous owners.
    Punt,
    /// Dropped; the data plane's drop counter (see [`Chain::drop_name`]).
    Drop(usize),
    Reject(RejectKind),
}

pub struct Chain {
    stages: Vec<Box<dyn Stage>>,
    /// The stage that tracks connections (there is always one: the firewall).
    tracker: usize,
    /// Some stage rewrites packets: they are copied before the chain runs.
    rewrites: bool,
    /// Every stage looks a packet up before the first processes it: some stage may run the
    /// chain backwards (the translating ones) or reads what the others know.
    lookups_first: bool,
    /// Per stage, the drop counter of each of its drop reasons.
    drop_slots: Vec<Vec<usize>>,
    /// The data plane's own drop reasons (counter `i` for `i` below their count)...
    base_names: &'static [&'static str],
    /// ...and those only stages name, counted here.
    extra_drops: Vec<(&'static str, u64)>,
}

/// Take the running stage named `name` out of `old` if it is a `T` that `fits`.
fn reuse<T: Stage + 'static>(
    old: &mut Vec<Box<dyn Stage>>,
    name: &str,
    fits: impl Fn(&mut T) -> bool,
) -> Option<Box<dyn Stage>> {
    let i = old
        .iter_mut()
        .position(|s| s.name() == name && s.as_any_mut().downcast_mut::<T>().is_some_and(&fits))?;
    Some(old.swap_remove(i))
}

/// Reconfigure the reused stage `s` (of type `T`) in place.
fn with<T: 'static>(mut s: Box<dyn Stage>, f: impl FnOnce(&mut T)) -> Box<dyn Stage> {
    if let Some(t) = s.as_any_mut().downcast_mut::<T>() {
        f(t);
    }
    s
}

/// The stage for `spec`, reusing a running one from `old` (`prev`: the config it runs with).
/// `None`: the config has nothing for it to do.
fn stage_for(
    spec: &StageConfig,
    cfg: &DataplaneConfig,
    prev: Option<&DataplaneConfig>,
    old: &mut Vec<Box<dyn Stage>>,
) -> Option<Box<dyn Stage>> {
    let n_buckets = cfg.table.len().next_power_of_two();
    // A data plane on several threads holds its flows in one chain per lane, each a share of
    // the buckets: the spec's limits are the data plane's, so each lane takes its share.
    let lanes = usize::from(cfg.runtime.dataplane_threads.max(1));
    let share = |limit: usize| limit.div_ceil(lanes);
    Some(match spec {
        StageConfig::Firewall => match reuse(old, "firewall", |_: &mut Firewall| true) {
            Some(s) => with(s, |fw: &mut Firewall| {
                if prev.is_none_or(|p| p.firewall != cfg.firewall) {
                    fw.set_rules(cfg.firewall.clone());
                }
                fw.conntrack_mut().set_tcp_liberal(cfg.tcp_liberal);
            }),
            None => Box::new(Firewall::new(
                cfg.firewall.clone(),
                ConntrackConfig {
                    max_entries: share(cfg.max_connections),
                    tcp_liberal: cfg.tcp_liberal,
                    ..Default::default()
                },
            )),
        },
        StageConfig::Nat => {
            let mut c = cfg.nat.clone()?;
            c.max_bindings = share(c.max_bindings);
            let c = &c;
            // Bindings hold ports picked for the bucket count: a new count starts afresh.
            match reuse(old, "nat", |n: &mut Nat| n.n_buckets() == n_buckets) {
                Some(s) => with(s, |n: &mut Nat| {
                    if n.config() != c {
                        n.set_config(c.clone());
                    }
                }),
                None => Box::new(Nat::new(c.clone(), cfg.table.len())),
            }
        }
        StageConfig::Lb => {
            let mut c = cfg.lb.clone()?;
            c.max_flows = share(c.max_flows);
            let c = &c;
            let s = match reuse(old, "lb", |l: &mut Lb| l.n_buckets() == n_buckets) {
                Some(s) => with(s, |l: &mut Lb| {
                    if l.config() != c {
                        l.set_config(c.clone());
                    }
                }),
                None => Box::new(Lb::new(c.clone(), cfg.table.len())),
            };
            // Backend states come from the spec (drain) and from the dispatchers' health
            // checks, merged by the manager: applied every time.
            with(s, |l: &mut Lb| {
                for v in &c.services {
                    for b in &v.backends {
                        let state = cfg
                            .backend_states
                            .iter()
                            .find(|s| s.service == v.name && s.backend == b.name)
                            .map_or(dva_services::lb::BackendState::Up, |s| s.state);
                        if l.backend_state(&v.name, &b.name) != Some(state) {
                            let _ = l.set_backend_state(&v.name, &b.name, state);
                        }
                    }
                }
            })
        }
        StageConfig::Ratelimit(c) => match reuse(old, "ratelimit", |_: &mut RateLimiter| true) {
            Some(s) => with(s, |r: &mut RateLimiter| r.set_config(c.clone())),
            None => Box::new(RateLimiter::new(c.clone())),
        },
    })
}

impl Chain {
    /// The chain `cfg` asks for, reusing `old`'s stages (`prev`: the config they run with).
    /// `base_names`: the data plane's drop counters; a stage's drop reason of the same name is
    /// counted there.
    pub fn build(
        cfg: &DataplaneConfig,
        prev: Option<&DataplaneConfig>,
        old: Option<Chain>,
        base_names: &'static [&'static str],
    ) -> Chain {
        let (mut old_stages, extra_drops) = match old {
            Some(c) => (c.stages, c.extra_drops),
            None => (Vec::new(), Vec::new()),
        };
        let mut specs = cfg.chain.clone();
        if !specs.contains(&StageConfig::Firewall) {
            // Connections are tracked whatever the chain (as `compile_chain` does).
            let at = specs
                .iter()
                .take_while(|s| matches!(s, StageConfig::Ratelimit(_)))
                .count();
            specs.insert(at, StageConfig::Firewall);
        }
        let stages: Vec<Box<dyn Stage>> = specs
            .iter()
            .filter_map(|s| stage_for(s, cfg, prev, &mut old_stages))
            .collect();
        Chain::assemble(stages, base_names, extra_drops)
    }

    /// A chain of `stages` as they are (benches, tests); the first with a connection table
    /// tracks connections.
    pub fn from_stages(stages: Vec<Box<dyn Stage>>, base_names: &'static [&'static str]) -> Chain {
        Chain::assemble(stages, base_names, Vec::new())
    }

    fn assemble(
        stages: Vec<Box<dyn Stage>>,
        base_names: &'static [&'static str],
        mut extra_drops: Vec<(&'static str, u64)>,
    ) -> Chain {
        let tracker = stages
            .iter()
            .position(|s| s.conntrack().is_some())
            .unwrap_or(0);
        let drop_slots = stages
            .iter()
            .map(|s| {
                s.drop_reasons()
                    .iter()
                    .map(|name| match base_names.iter().position(|b| b == name) {
                        Some(i) => i,
                        None => {
                            let j = match extra_drops.iter().position(|(n, _)| n == name) {
                                Some(j) => j,
                                None => {
                                    extra_drops.push((*name, 0));
                                    extra_drops.len() - 1
                                }
                            };
                            base_names.len() + j
                        }
                    })
                    .collect()
            })
            .collect();
        let rewrites = stages.iter().any(|s| s.rewrites());
        Chain {
            rewrites,
            lookups_first: rewrites || stages.iter().any(|s| s.reads_known()),
            stages,
            tracker,
            drop_slots,
            base_names,
            extra_drops,
        }
    }

    /// The stages, in chain order (benches, tests).
    pub fn into_stages(self) -> Vec<Box<dyn Stage>> {
        self.stages
    }

    /// Some stage rewrites packets (the caller hands the chain a writable copy).
    #[inline]
    pub fn rewrites(&self) -> bool {
        self.rewrites
    }

    /// Run the chain on one packet: every stage looks it up (a translated reply runs the chain
    /// backwards; each stage keeps what it found in `pkt`), then each processes it in turn
    /// until one does not forward it. A chain where nobody needs the lookups first (nothing
    /// translates, nothing reads `known`) skips that pass: each stage looks up as it processes.
    #[inline]
    pub fn run(&mut self, now: u64, pkt: &mut Packet, mut bytes: Bytes<'_>) -> Outcome {
        if !self.lookups_first {
            // The common chain (no stage translates): front to back, each stage looking up its
            // own state as it processes.
            for (i, s) in self.stages.iter_mut().enumerate() {
                pkt.enter(i);
                match s.process(now, pkt, &mut bytes) {
                    Verdict::Forward => {}
                    v => return self.outcome(i, v),
                }
            }
            return Outcome::Forward;
        }
        self.run_translating(now, pkt, bytes)
    }

    /// [`Chain::run`] for a chain with a translating stage: every stage looks the packet up
    /// first, and a reply runs the chain back to front.
    #[inline(never)]
    fn run_translating(&mut self, now: u64, pkt: &mut Packet, mut bytes: Bytes<'_>) -> Outcome {
        let mut reverse = false;
        for (i, s) in self.stages.iter_mut().enumerate() {
            pkt.enter(i);
            reverse |= s.lookup(now, pkt) == Some(Direction::Reply);
        }
        let n = self.stages.len();
        for k in 0..n {
            let i = if reverse { n - 1 - k } else { k };
            pkt.enter(i);
            let Some(s) = self.stages.get_mut(i) else {
                break;
            };
            match s.process(now, pkt, &mut bytes) {
                Verdict::Forward => {}
                v => return self.outcome(i, v),
            }
        }
        Outcome::Forward
    }

    /// What stage `i`'s verdict `v` (not `Forward`) means for the packet.
    #[cold]
    fn outcome(&self, i: usize, v: Verdict) -> Outcome {
        match v {
            Verdict::Forward => Outcome::Forward,
            Verdict::Punt => Outcome::Punt,
            Verdict::Reject(kind) => Outcome::Reject(kind),
            Verdict::Drop(r) => Outcome::Drop(
                self.drop_slots
                    .get(i)
                    .and_then(|d| d.get(usize::from(r)))
                    .copied()
                    .unwrap_or(usize::MAX),
            ),
        }
    }

    /// Count a drop of counter `slot` if it is one of the stages' own (`false`: it is the data
    /// plane's).
    pub fn count_drop(&mut self, slot: usize) -> bool {
        match slot
            .checked_sub(self.base_names.len())
            .and_then(|j| self.extra_drops.get_mut(j))
        {
            Some((_, n)) => {
                *n += 1;
                true
            }
            None => false,
        }
    }

    /// The name drop counter `slot` is shown under.
    pub fn drop_name(&self, slot: usize) -> Option<&'static str> {
        self.base_names.get(slot).copied().or_else(|| {
            slot.checked_sub(self.base_names.len())
                .and_then(|j| self.extra_drops.get(j))
                .map(|(n, _)| *n)
        })
    }

    /// The drops only stages name, with their counts.
    pub fn extra_drops(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.extra_drops.iter().copied()
    }

    /// The connection table (census, flow listing, replication journal, bucket moves).
    pub fn conntrack(&self) -> &Conntrack {
        match self.stages.get(self.tracker).and_then(|s| s.conntrack()) {
            Some(ct) => ct,
            None => empty_conntrack(),
        }
    }

    pub fn conntrack_mut(&mut self) -> Option<&mut Conntrack> {
        self.stages
            .get_mut(self.tracker)
            .and_then(|s| s.conntrack_mut())
    }

    /// Bounded expiry work in every stage; `gone` sees each connection that leaves.
    pub fn expire(&mut self, now: u64, budget: usize, mut gone: Option<&mut dyn FnMut(&Conn)>) {
        for s in &mut self.stages {
            match gone {
                Some(ref mut g) => s.expire(now, budget, Some(&mut **g)),
                None => s.expire(now, budget, None),
            };
        }
    }

    /// Every stage's live state of `bucket`.
    pub fn export_bucket(&self, now: u64, bucket: u16) -> FlowSet {
        let mut out = FlowSet::default();
        for s in &self.stages {
            s.export_bucket(now, bucket, &mut out);
        }
        out
    }

    /// Each stage takes its entries of `set`, as `how(bucket)` says. Returns the connections
    /// taken.
    pub fn import(
        &mut self,
        now: u64,
        mut set: FlowSet,
        how: &mut dyn FnMut(u16) -> Option<Import>,
    ) -> usize {
        self.stages
            .iter_mut()
            .map(|s| s.import(now, &mut set, how))
            .sum()
    }

    pub fn remove_bucket(&mut self, bucket: u16) {
        for s in &mut self.stages {
            s.remove_bucket(bucket);
        }
    }

    /// What the stages other than the tracker hold for the connection `key`, to travel with it.
    pub fn replicate_flow(&mut self, now: u64, key: &dva_flow::FlowKey, out: &mut FlowSet) {
        for s in &mut self.stages {
            s.replicate_flow(now, key, out);
        }
    }

    /// Every entry that does not ride with a tracked connection.
    pub fn replicate_all(&self) -> FlowSet {
        let mut out = FlowSet::default();
        for s in &self.stages {
            s.replicate_all(&mut out);
        }
        out
    }

    /// What the stages know of the flow `key`.
    pub fn annotate(&mut self, now: u64, key: &dva_flow::FlowKey) -> FlowNote {
        let mut note = FlowNote::default();
        for s in &mut self.stages {
            s.annotate(now, key, &mut note);
        }
        note
    }

    pub fn counters(&self, out: &mut BTreeMap<String, u64>) {
        for s in &self.stages {
            s.counters(out);
        }
    }

    pub fn backend_stats(&self) -> Vec<BackendStats> {
        let mut out = Vec::new();
        for s in &self.stages {
            s.backend_stats(&mut out);
        }
        out
    }

    /// Hits per rule and of the default action (the stage with rules).
    pub fn rule_hits(&self) -> (Vec<u64>, u64) {
        self.stages
            .iter()
            .find_map(|s| s.rule_hits())
            .unwrap_or_default()
    }
}

/// A table for a chain without a tracker (`Chain::build` always adds one: never reached in
/// practice, but no panic either).
fn empty_conntrack() -> &'static Conntrack {
    static EMPTY: std::sync::OnceLock<Conntrack> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| {
        Conntrack::new(ConntrackConfig {
            max_entries: 1,
            ..Default::default()
        })
    })
}

impl Default for Chain {
    /// No stage: a placeholder while the running chain is rebuilt.
    fn default() -> Chain {
        Chain {
            stages: Vec::new(),
            tracker: 0,
            rewrites: false,
            lookups_first: false,
            drop_slots: Vec::new(),
            base_names: &[],
            extra_drops: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use dva_flow::FlowKey;
    use dva_services::firewall::{Action, NewFlowPolicy, PacketInfo, RuleSet};
    use dva_services::ratelimit::RateLimitConfig;
    use dva_wire::ip_proto;

    use super::*;

    const NAMES: [&str; 2] = ["malformed-ip", "invalid-state"];

    fn syn(sport: u16) -> Packet {
        let info = PacketInfo {
            ingress_if: 0,
            key: FlowKey {
                proto: ip_proto::TCP,
                src: "198.18.1.2".parse().expect("addr"),
                dst: "198.18.2.2".parse().expect("addr"),
                src_port: sport,
                dst_port: 80,
            },
            tcp_flags: dva_wire::tcp::flags::SYN,
            tcp: Default::default(),
            icmp: None,
            icmp_inner: None,
            len: 60,
        };
        Packet::new(info, 0, NewFlowPolicy::Create, false, 20, 60)
    }

    #[test]
    fn a_stage_of_its_own_names_its_drops_and_known_flows_pass_it() {
        let rl = RateLimiter::new(RateLimitConfig {
            new_flows_per_second: 1,
            burst: 1,
            ..Default::default()
        });
        let fw = Firewall::new(
            RuleSet::with_default(Action::Accept),
            ConntrackConfig::default(),
        );
        let mut chain = Chain::from_stages(vec![Box::new(rl), Box::new(fw)], &NAMES);
        let run = |chain: &mut Chain, mut p: Packet| chain.run(0, &mut p, Bytes::ReadOnly(&[]));
        assert_eq!(run(&mut chain, syn(1)), Outcome::Forward);
        // The same SYN again: the firewall's lookup finds its connection, the limiter lets it be.
        assert_eq!(run(&mut chain, syn(1)), Outcome::Forward);
        let Outcome::Drop(slot) = run(&mut chain, syn(2)) else {
            panic!("a second new flow within the second is limited");
        };
        assert_eq!(chain.drop_name(slot), Some("ratelimit-exceeded"));
        assert!(chain.count_drop(slot));
        assert!(!chain.count_drop(1), "the data plane's own counter");
        // (This test's data plane names only two reasons: the firewall's others are extra too.)
        assert_eq!(
            chain
                .extra_drops()
                .filter(|(_, n)| *n > 0)
                .collect::<Vec<_>>(),
            vec![("ratelimit-exceeded", 1)]
        );
        assert_eq!(chain.conntrack().len(), 1);
    }

    /// A data plane on two threads: each lane's chain takes half the data plane's limits (its
    /// share of the buckets), so the spec's limits hold for the data plane as a whole.
    #[test]
    fn each_lane_takes_its_share_of_the_limits() {
        use dva_proto::spec::ApplianceSpec;
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../examples/nat-gateway.yaml"
        ))
        .expect("example");
        let spec = ApplianceSpec::from_yaml(&text).expect("spec");
        let ep = |id: u32, port: u16| dva_proto::role::UnitEndpoint {
            id,
            addr: std::net::SocketAddr::from(([198, 19, 0, 11], port)),
        };
        let placement = dva_proto::role::Placement {
            dispatchers: vec![ep(1, 6081)],
            dataplanes: vec![ep(11, 6082)],
            table: dva_flow::BucketTable::maglev(spec.spec.layout.buckets, &[11]).expect("table"),
        };
        let (_, dps) = dva_proto::role::compile(&spec, &placement, 1).expect("compile");
        let mut cfg = dps[0].clone();
        let one = Chain::build(&cfg, None, None, &NAMES);
        cfg.runtime.dataplane_threads = 2;
        let two = Chain::build(&cfg, None, None, &NAMES);
        let entries = |c: &Chain| c.conntrack().config().max_entries;
        assert_eq!(entries(&one), cfg.max_connections);
        assert_eq!(entries(&two), cfg.max_connections.div_ceil(2));
        let bindings = |mut c: Chain| {
            c.stages
                .iter_mut()
                .find_map(|s| s.as_any_mut().downcast_mut::<Nat>())
                .map(|n| n.config().max_bindings)
        };
        let nat = cfg.nat.as_ref().expect("a NAT stage").max_bindings;
        assert_eq!(bindings(one), Some(nat));
        assert_eq!(bindings(two), Some(nat.div_ceil(2)));
    }
}
