//! The data-plane role: runs the service chain on the packets of the flows it owns.
//!
//! ```text
//!  dispatcher ──GENEVE(bucket, ingress_if)──> on_packet ── chain (firewall, NAT, LB, as configured)
//!                                                │            ├─pass──> back to a dispatcher
//!                                                │            └─reject──> RST / ICMP unreachable to a dispatcher
//!                                                └─NoState, bucket has history──> punt to the previous owner
//! ```
//!
//! Punting (DESIGN.md §2): after the bucket table changes, packets of flows that started on the
//! bucket's previous owner arrive here first. A packet that cannot start a flow, or any packet in a
//! bucket with history, is first offered to the previous owners in order (hop count in the GENEVE
//! option bounds the chain); the end of the chain hands connectionless packets back marked
//! "new here" so the owner creates the flow, and drops mid-flow TCP that nobody knows.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dva_flow::{FlowKey, UnitId};
use dva_io::backplane::{Backplane, BackplaneTx, Origin};
use dva_proto::{DataplaneConfig, RoleConfig};
use dva_services::conntrack::{ConnState, TcpState};
use dva_services::firewall::{NewFlowPolicy, PacketInfo, RejectKind};
use dva_services::stage::{Bytes, Import, Packet};
use dva_wire::geneve::{self, dva_flags, DvaMeta, DVA_HEADER_LEN};
use dva_wire::ip_proto;

use crate::chain::{Chain, Outcome};
use crate::channel::Update;
use crate::classify::{classify, Classified};
use crate::handover::{
    self, Flows, Handover, HOLD_LIMIT, HOLD_MAX_BYTES, HOLD_MAX_PACKETS, MAX_RESENDS,
    PROTO_HANDOVER, RESEND_AFTER,
};
use crate::inspect::{self, FlowEntry, FlowFilter, FlowList, Request, Requests};
use crate::keys::epoch_keys;
use crate::monitor::{EventType, FlowEvent, MonitorEvent, Session};
use crate::offload;
use crate::reply;
use crate::stats::{
    DropCounters, Every, Histogram, Latencies, StatsCell, UnitStats, HANDOVER_BOUNDS,
};

const BATCH: usize = 64;
/// Journaled connections copied to backups per loop turn, at most; the rest wait for the next
/// turns (replication stays off the packet path's critical latency however fast flows change).
const REPLICATE_BUDGET: usize = 512;
/// Journaled keys waiting at most; beyond, they are dropped and the refresh walk repairs them.
const REPLICATE_PENDING_MAX: usize = 1 << 16;
/// Table slots the refresh walk visits per loop turn.
const REFRESH_SLOTS: usize = 1024;
/// Table slots the census visits per loop turn (it only reads them).
const CENSUS_SLOTS: usize = 16_384;
/// Longest punt chain: the bucket history is capped at 4 previous owners, plus the hand-back.
const MAX_HOPS: u8 = 6;
/// State of a handed-over bucket that started no hold this long after its first chunk is given
/// up: by then the previous owner stopped resending it ([`MAX_RESENDS`] × [`RESEND_AFTER`]).
const IMPORT_FORGOTTEN: Duration = RESEND_AFTER.saturating_mul(MAX_RESENDS + 2);

/// The data plane's drop counters. The stages' drop reasons of the same names count here (see
/// `Chain::build`); the ones only a stage names are counted by the chain.
mod drop_reason {
    pub const FOREIGN: usize = 0;
    pub const MALFORMED_GENEVE: usize = 1;
    pub const WRONG_VNI: usize = 2;
    pub const MALFORMED_IP: usize = 3;
    pub const FIREWALL_RULE: usize = 4;
    pub const FIREWALL_DEFAULT: usize = 5;
    pub const PUNT_LOOP: usize = 8;
    pub const NO_STATE: usize = 9;
    pub const TX_FULL: usize = 10;
    pub const FRAGMENT: usize = 11;
    pub const REJECTED: usize = 12;
    pub const MALFORMED_HANDOVER: usize = 13;
    pub const HANDOVER_REFUSED: usize = 19;
    pub const BACKPLANE_AUTH: usize = 20;
    pub const NAMES: [&str; 23] = [
        "backplane-foreign-source",
        "malformed-geneve",
        "wrong-vni",
        "malformed-ip",
        "firewall-rule",
        "firewall-default-policy",
        "invalid-state",
        "conntrack-table-full",
        "punt-hop-limit",
        "no-state-anywhere",
        "backplane-tx-full",
        "fragment-unsupported",
        "rejected",
        "malformed-handover",
        "nat-ports-exhausted",
        "nat-table-full",
        "lb-no-healthy-backend",
        "lb-ports-exhausted",
        "lb-table-full",
        "handover-not-allowed",
        "backplane-auth",
        "icmp-error-unrelated",
        "tcp-out-of-window",
    ];
}
use drop_reason as dr;

/// Rejects (TCP resets, ICMP unreachables) a data plane sends a second, and saved at most.
const REJECT_RATE: f64 = 1000.0;
const REJECT_BURST: f64 = 200.0;

/// One lane of a data plane. On several threads: `runtime.dataplane_threads` lanes, each a whole
/// [`Dataplane`] serving the buckets `b` with `b % lanes == lane`, run by [`crate::lanes`].
///
/// ```text
///  dispatcher ──bucket b──> lane b % n (port + b % n) ──punt, handover, replication──> the same
///                                                       lane of the peer (same buckets)
/// ```
///
/// Every message a lane sends a peer concerns its own buckets, which the peer's lane of the
/// same index serves (every data plane of an appliance runs as many lanes: the spec's
/// `runtime` is one for all), so lanes share nothing: not a table, not a socket, not a lock.
pub struct Dataplane {
    rx: Backplane,
    core: Core<Backplane>,
}

/// The data plane as a state machine: backplane datagrams in ([`Core::on_packet`]), the time
/// given with each turn ([`Core::begin_turn`]), datagrams out through `tx`. It reads no clock
/// and owns no socket, so punting, handover and replication run as data in tests
/// (`crate::conformance`) and benchmarks.
pub(crate) struct Core<B> {
    cfg: DataplaneConfig,
    /// Where datagrams go: in the unit, a second socket for sending, so a packet can be
    /// rewritten in the send batch while the receive batch it came from is still borrowed.
    pub(crate) tx: B,
    /// The service chain (firewall, NAT, LB, rate limiting, as configured): every flow table.
    chain: Chain,
    /// The other data planes (punt, handover and replication peers), by unit.
    peers: BTreeMap<UnitId, SocketAddr>,
    drops: DropCounters<{ dr::NAMES.len() }>,
    /// The receive side's authentication counters, as of the last publish.
    auth: dva_io::seal::AuthStats,
    rx_packets: u64,
    rx_bytes: u64,
    tx_packets: u64,
    tx_bytes: u64,
    events: BTreeMap<&'static str, u64>,
    scratch: Vec<u8>,
    /// Resets and ICMP unreachables this data plane may send (a scan of closed ports must not
    /// turn it into a packet cannon).
    reject_budget: reply::TokenBucket,
    epoch_start: Instant,
    now_ns: u64,
    active_flows: u64,
    bucket_flows: Vec<(u16, u32)>,
    now: Instant,
    // State handover (see `handover`): as the leaving data plane...
    exporting: bool,
    export_queue: VecDeque<u16>,
    /// bucket -> (owner it was sent to, when, resends)
    export_pending: BTreeMap<u16, (UnitId, Instant, u32)>,
    // ...and as the receiving owner.
    holds: HashMap<u16, Instant>,
    /// When the first state message of a bucket handed to us arrived, until its hold ends.
    importing: HashMap<u16, Instant>,
    /// From `importing` to the hold's end, per bucket: published as `dva_handover_seconds`.
    /// Timed here, on the receiving owner, because it sees both the state arrive and the
    /// handover end (`Done`), and it outlives the move: the sender is stopped as soon as it
    /// has exported, taking whatever it measured with it.
    handover_latency: Histogram,
    held: VecDeque<(u16, Vec<u8>, Origin)>,
    /// Bytes in `held` (super-packets make the packet count a poor bound on memory).
    held_bytes: usize,
    /// Count flows again right away (the last exported bucket just left).
    census_due: bool,
    /// Connections held only as a backup's copies (at the last census).
    replica_flows: u64,
    /// The census under way: where it goes on next turn and `(active, replicas)` so far.
    census_at: Option<(usize, u64, u64)>,
    /// Some bucket has a backup other than us: replication has somewhere to go.
    has_backup: bool,
    /// Journaled keys not yet copied to backups (see [`REPLICATE_BUDGET`]).
    replicate_pending: VecDeque<dva_flow::FlowKey>,
    /// Where the refresh walk over the connection table goes on next turn; `None` between walks.
    refresh_at: Option<usize>,
    /// When the next census starts, and the next refresh walk.
    census_every: Every,
    /// Backups' copies are refreshed now and then (a walk over the table, a slice per turn), so
    /// a quiet flow's copy does not time out at the backup while the flow lives here.
    refresh_every: Every,
    /// A packet being translated (the received one stays as it came, for punting).
    work: Vec<u8>,
    /// Which of the data plane's threads this is (see [`Dataplane::open`]); peers are
    /// addressed at the same lane.
    lane: u16,
    /// Segments of a super-packet no path takes whole, built one at a time.
    segments: Vec<u8>,
    /// The `dva monitor` session, if one runs: every event site checks this and nothing else
    /// when none does.
    monitor: Option<Session>,
    /// The rule that decided the last packet the rules decided (`None`: the default action),
    /// for drop events.
    last_rule: Option<usize>,
}

/// A config [`Core::prepare`] found servable, for [`Core::commit`].
pub(crate) struct Prepared(DataplaneConfig);

/// Whether this data plane has anyone to copy its flows to: some bucket has a backup other than
/// this data plane, or a bucket it owned has moved to another (a previous owner copies what it
/// still holds to the new owner, which then serves those flows itself). Only then is
/// replication worth any work (one data plane alone has none).
fn has_backup(cfg: &DataplaneConfig) -> bool {
    let me = cfg.unit;
    backs_up_to_another(&cfg.backups, me)
        || cfg
            .table
            .buckets()
            .iter()
            .any(|b| b.owner != me && b.history.contains(&me))
}

fn backs_up_to_another(backups: &[UnitId], me: UnitId) -> bool {
    backups.iter().any(|&b| b != 0 && b != me)
}

/// The dispatchers, which send to us through rings on this machine: a ring per lane (each of
/// a dispatcher's data-path threads is a producer of its own).
fn ring_peers(cfg: &DataplaneConfig) -> Vec<(UnitId, SocketAddr)> {
    cfg.dispatchers
        .iter()
        .flat_map(|d| {
            (0..cfg.dispatcher_lanes.max(1))
                .filter_map(move |i| dva_proto::role::lane_addr(d.addr, i).map(|a| (d.id, a)))
        })
        .collect()
}

/// The other data planes, at their lane `lane` (which serves the same buckets as ours): the
/// config lists every data plane, ourselves included, and a datagram claiming to come from us
/// is never a peer's.
fn peers_of(cfg: &DataplaneConfig, lane: u16) -> BTreeMap<UnitId, SocketAddr> {
    cfg.peers
        .iter()
        .filter(|p| p.id != cfg.unit)
        .filter_map(|p| Some((p.id, dva_proto::role::lane_addr(p.addr, lane)?)))
        .collect()
}

impl Dataplane {
    /// The data plane's `runtime.dataplane_threads` lanes (one: the data plane as it always
    /// was). `rings`: the directory for shared-memory rings to dispatchers on this machine
    /// (`None`: UDP only).
    pub fn open(
        cfg: DataplaneConfig,
        rings: Option<&std::path::Path>,
    ) -> anyhow::Result<Vec<Dataplane>> {
        (0..cfg.runtime.dataplane_threads.max(1))
            .map(|lane| Dataplane::lane(cfg.clone(), rings, lane))
            .collect()
    }

    /// Lane `lane`: its backplane at the data plane's port + `lane`, sealing as its own sender
    /// (the unit's id with the lane in the top bits: receivers keep a replay window per lane).
    fn lane(
        cfg: DataplaneConfig,
        rings: Option<&std::path::Path>,
        lane: u16,
    ) -> anyhow::Result<Dataplane> {
        let listen = dva_proto::role::lane_addr(cfg.listen, lane)
            .with_context(|| format!("no backplane port for lane {lane} after {}", cfg.listen))?;
        let mut rx = Backplane::bind(listen)
            .with_context(|| format!("binding the backplane socket {listen}"))?;
        let mut tx = Backplane::bind(SocketAddr::new(listen.ip(), 0))
            .context("binding the backplane send socket")?;
        if let Some(dir) = rings {
            // Dispatchers send to us through rings we make; we send to them through theirs, as
            // `listen` (the address they know this lane by). Data planes keep UDP between
            // themselves.
            rx.enable_rings(dir, listen, true, false)
                .and_then(|()| tx.enable_rings(dir, listen, false, true))
                .and_then(|()| rx.accept_rings_from(&ring_peers(&cfg)))
                .with_context(|| format!("backplane rings in {}", dir.display()))?;
        }
        cfg.backplane.check().map_err(anyhow::Error::msg)?;
        for bp in [&mut rx, &mut tx] {
            bp.set_auth(
                dva_io::seal::lane_sender(cfg.unit, lane),
                cfg.backplane.send_epoch,
                &epoch_keys(&cfg.backplane),
            )
            .map_err(anyhow::Error::msg)?;
        }
        let mut core = Core::new(cfg, tx, Instant::now())?;
        core.set_lane(lane);
        Ok(Dataplane { rx, core })
    }

    /// A new config version, all or nothing: everything that can refuse it (the core's checks,
    /// the keys, the rings the new dispatchers need) is done before anything changes, so a
    /// NACKed config leaves the running one serving.
    fn configure(&mut self, c: DataplaneConfig) -> Result<(), String> {
        let d = ring_peers(&c);
        let keys = epoch_keys(&c.backplane);
        let (me, epoch) = (
            dva_io::seal::lane_sender(c.unit, self.core.lane),
            c.backplane.send_epoch,
        );
        c.backplane.check()?;
        dva_io::seal::Sealer::check_keys(epoch, &keys)?;
        let ready = self.core.prepare(c)?;
        // Rings are made for every new peer before the old ones go: refused, they stay as they
        // were.
        self.rx
            .accept_rings_from(&d)
            .map_err(|e| format!("backplane rings: {e}"))?;
        // The keys were checked above and the unit id cannot change (`Core::check`): these
        // cannot refuse now.
        self.rx.set_auth(me, epoch, &keys)?;
        self.core.tx.set_auth(me, epoch, &keys)?;
        self.core.commit(ready);
        Ok(())
    }
}

impl crate::lanes::Lane for Dataplane {
    fn run(
        &mut self,
        stop: &AtomicBool,
        stats: &StatsCell,
        updates: &Receiver<Update>,
        requests: &Requests,
    ) -> anyhow::Result<()> {
        let mut poller = dva_io::poll::Poller::new(&self.rx.poll_fds());
        let mut publish = Every::new(Duration::from_millis(100));
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            // Config pushes are applied between batches, so a packet sees one config or the next.
            while let Ok(u) = updates.try_recv() {
                let result = match u.config {
                    RoleConfig::Dataplane(c) => self.configure(c),
                    RoleConfig::Dispatcher(_) => {
                        Err("this unit is a data plane; got a dispatcher config".into())
                    }
                };
                let _ = u.reply.send(result);
            }
            // Inspection (flow listings, config dumps) between batches too: one `try_recv` a
            // turn when nobody asks.
            while let Ok(r) = requests.try_recv() {
                self.core.set_now(now);
                self.core.inspect(r);
            }
            let core = &mut self.core;
            core.begin_turn(now);
            let n = self
                .rx
                .recv_batch(BATCH, |buf, from| core.on_packet(buf, from))
                .unwrap_or(0);
            core.end_turn();
            let _ = core.tx.flush();
            if publish.due(now) {
                core.auth = self.rx.auth_stats();
                core.drops.set(dr::BACKPLANE_AUTH, core.auth.rejected());
                stats.try_publish(core.snapshot());
            }
            if n == 0 {
                if self.rx.prepare_sleep() {
                    let _ = poller.wait(20);
                }
                self.rx.awake();
            }
        }
        stats.try_publish(self.core.snapshot());
        Ok(())
    }

    fn snapshot(&self) -> UnitStats {
        self.core.snapshot()
    }
}

impl<B: BackplaneTx> Core<B> {
    /// A data plane taking its first config at `now`, sending through `tx`.
    pub(crate) fn new(cfg: DataplaneConfig, tx: B, now: Instant) -> anyhow::Result<Core<B>> {
        if cfg.dispatchers.is_empty() {
            bail!("config lists no dispatcher to return packets to");
        }
        let mut chain = Chain::build(&cfg, None, None, &dr::NAMES);
        let has_backup = has_backup(&cfg);
        if let Some(ct) = chain.conntrack_mut() {
            ct.set_journal(has_backup && !cfg.export);
        }
        let peers = peers_of(&cfg, 0);
        Ok(Core {
            cfg,
            tx,
            chain,
            peers,
            drops: DropCounters::new(dr::NAMES),
            auth: Default::default(),
            rx_packets: 0,
            rx_bytes: 0,
            tx_packets: 0,
            tx_bytes: 0,
            events: BTreeMap::new(),
            scratch: Vec::with_capacity(2048),
            reject_budget: reply::TokenBucket::new(REJECT_RATE, REJECT_BURST, now),
            epoch_start: now,
            now_ns: 0,
            active_flows: 0,
            bucket_flows: Vec::new(),
            now,
            exporting: false,
            export_queue: VecDeque::new(),
            export_pending: BTreeMap::new(),
            holds: HashMap::new(),
            importing: HashMap::new(),
            handover_latency: Histogram::new(HANDOVER_BOUNDS),
            held: VecDeque::new(),
            held_bytes: 0,
            census_due: false,
            replica_flows: 0,
            census_at: None,
            has_backup,
            replicate_pending: VecDeque::new(),
            refresh_at: None,
            census_every: Every::starting(Duration::from_millis(250), now),
            refresh_every: Every::starting(Duration::from_secs(1), now),
            work: Vec::with_capacity(2048),
            lane: 0,
            segments: Vec::new(),
            monitor: None,
            last_rule: None,
        })
    }

    /// Serve as lane `lane` of the data plane: peers are addressed at theirs.
    pub(crate) fn set_lane(&mut self, lane: u16) {
        self.lane = lane;
        self.peers = peers_of(&self.cfg, lane);
    }

    /// The clock, as the caller read it: the core reads none.
    pub(crate) fn set_now(&mut self, now: Instant) {
        self.now = now;
        self.now_ns = now.duration_since(self.epoch_start).as_nanos() as u64;
    }

    /// The work of a turn before its batch of datagrams, at `now`: the monitor's end, the census
    /// slice, handover (state sent and resent, holds released).
    pub(crate) fn begin_turn(&mut self, now: Instant) {
        if self.monitor.as_ref().is_some_and(|m| m.over(now)) {
            self.monitor = None;
        }
        if std::mem::take(&mut self.census_due) {
            self.census_at = Some((0, 0, 0));
            self.census(usize::MAX);
        } else {
            if self.census_every.due(now) && self.census_at.is_none() {
                self.census_at = Some((0, 0, 0));
            }
            self.census(CENSUS_SLOTS);
        }
        self.set_now(now);
        self.handover_tick();
    }

    /// The work of a turn after its batch: copies to backups, bounded expiry (flat latency
    /// however many flows time out). The caller flushes `tx` next.
    pub(crate) fn end_turn(&mut self) {
        if self.refresh_every.due(self.now) && self.refresh_at.is_none() && self.has_backup {
            self.refresh_at = Some(0);
        }
        self.replicate();
        if self.monitor.is_some() {
            self.expire_reporting(256);
        } else {
            self.chain.expire(self.now_ns, 256, None);
        }
    }

    /// First half of a config transaction: everything that can refuse `cfg`, with nothing
    /// changed. [`Core::commit`] then takes it and cannot fail.
    pub(crate) fn prepare(&self, cfg: DataplaneConfig) -> Result<Prepared, String> {
        self.check(&cfg)?;
        Ok(Prepared(cfg))
    }

    /// Second half of a config transaction.
    pub(crate) fn commit(&mut self, ready: Prepared) {
        self.apply(ready.0)
    }

    /// What makes a config unservable, checked before any of it is taken.
    fn check(&self, cfg: &DataplaneConfig) -> Result<(), String> {
        // Rings and the pinned CPU were set up with the first config (see RuntimeConfig).
        self.cfg.runtime.unchanged(&cfg.runtime)?;
        if cfg.listen != self.cfg.listen {
            return Err(format!(
                "listen address {} cannot change at run time (this unit listens on {})",
                cfg.listen, self.cfg.listen
            ));
        }
        if cfg.dispatchers.is_empty() {
            return Err("config lists no dispatcher to return packets to".into());
        }
        if cfg.table.is_empty() || !cfg.table.len().is_power_of_two() {
            return Err(format!(
                "bucket table has {} buckets; need a power of two",
                cfg.table.len()
            ));
        }
        if cfg.unit != self.cfg.unit {
            return Err(format!(
                "unit id {} cannot change at run time (this unit is {})",
                cfg.unit, self.cfg.unit
            ));
        }
        Ok(())
    }

    /// Take a new config version (already checked): table, peers, dispatchers and rules change
    /// in place; the connection table is kept (that is the point of a stateful data plane).
    fn apply(&mut self, cfg: DataplaneConfig) {
        let old = std::mem::take(&mut self.chain);
        self.chain = Chain::build(&cfg, Some(&self.cfg), Some(old), &dr::NAMES);
        self.has_backup = has_backup(&cfg);
        if let Some(ct) = self.chain.conntrack_mut() {
            ct.set_journal(self.has_backup && !cfg.export);
        }
        if !self.has_backup || cfg.export {
            self.replicate_pending.clear();
            self.refresh_at = None;
        }
        let purge: Vec<u16> = if cfg.backups.is_empty() {
            Vec::new()
        } else {
            let me = cfg.unit;
            self.chain
                .conntrack()
                .flows_per_bucket()
                .map(|(b, _)| b)
                .filter(|&b| {
                    cfg.table
                        .get(b)
                        .is_some_and(|t| t.owner != me && !t.history.contains(&me))
                        && cfg.backups.get(usize::from(b)) != Some(&me)
                })
                .collect()
        };
        let purged = purge.len();
        for b in purge {
            // Copies of a bucket we no longer back up.
            self.remove_bucket(b);
        }
        if cfg.table.epoch() != self.cfg.table.epoch() {
            let me = cfg.unit;
            let (old, new) = (&self.cfg.table, &cfg.table);
            let moved: Vec<bool> = (0..new.len())
                .map(|b| {
                    let b = b as u16;
                    old.get(b).is_some_and(|o| o.owner == me) && new.owner(b) != me
                })
                .collect();
            if let Some(ct) = self.chain.conntrack_mut().filter(|_| moved.contains(&true)) {
                ct.relearn_where(|b| moved.get(usize::from(b)).copied().unwrap_or(false));
            }
            let owned = cfg.table.buckets().iter().filter(|b| b.owner == me).count();
            let backed = cfg.backups.iter().filter(|&&u| u == me).count();
            tracing::info!(
                config_version = cfg.version,
                epoch = cfg.table.epoch(),
                owns = owned,
                backs_up = backed,
                copies_dropped = purged,
                "new bucket table"
            );
        }
        if cfg.export && !self.exporting {
            self.exporting = true;
            // Only buckets we own or owned: copies held as a backup are not ours to hand over
            // (their owner exports them; the new owner would refuse them from us).
            let me = cfg.unit;
            self.export_queue = self
                .chain
                .conntrack()
                .flows_per_bucket()
                .map(|(b, _)| b)
                .filter(|&b| {
                    cfg.table
                        .get(b)
                        .is_some_and(|t| t.owner == me || t.history.contains(&me))
                })
                .collect();
            tracing::info!(
                buckets = self.export_queue.len(),
                "exporting flow state to the buckets' owners"
            );
        }
        self.peers = peers_of(&cfg, self.lane);
        self.cfg = cfg;
    }

    /// Count open connections, in total and per bucket (for the manager's history retirement and
    /// for draining): the next `max_slots` slots of a walk over the table (a few walks a second,
    /// in slices so a large table never stalls a turn), published when the walk ends.
    fn census(&mut self, max_slots: usize) {
        const RECENT_NS: u64 = 10_000_000_000;
        let Some((at, mut active, mut replicas)) = self.census_at else {
            return;
        };
        let now = self.now_ns;
        let (conns, next) = self.chain.conntrack().slice(at, max_slots);
        for c in conns {
            if self.is_replica_bucket(c.bucket) {
                replicas += 1;
                continue;
            }
            // Open and in use here: a flow whose packets another data plane now handles (it took
            // the bucket over with a copy of the state) goes quiet here and stops counting; a
            // draining data plane then hands what it still holds to the owners (export).
            let recent = now.saturating_sub(c.last_seen) < RECENT_NS;
            let open = match c.state {
                ConnState::Tcp(s) => {
                    recent
                        && !matches!(
                            s,
                            TcpState::None
                                | TcpState::LastAck
                                | TcpState::TimeWait
                                | TcpState::Close
                        )
                }
                _ => recent,
            };
            active += u64::from(open);
        }
        if next != 0 {
            self.census_at = Some((next, active, replicas));
            return;
        }
        self.census_at = None;
        self.active_flows = active;
        self.replica_flows = replicas;
        let per_bucket: Vec<(u16, u32)> = self.chain.conntrack().flows_per_bucket().collect();
        self.bucket_flows = per_bucket
            .into_iter()
            .filter(|(b, _)| !self.is_replica_bucket(*b))
            .collect();
    }

    /// Answer an inspection request from the control socket.
    fn inspect(&mut self, r: Request) {
        match r {
            Request::Flows { filter, reply } => {
                let _ = reply.try_send(self.list_flows(&filter));
            }
            Request::Config { reply } => {
                let _ = reply.try_send(RoleConfig::Dataplane(self.cfg.clone()).redacted_json());
            }
            Request::Capture { reply, .. } => {
                let _ = reply.try_send(Err(format!(
                    "unit {} is a data plane: capture runs in the dispatchers, which see the \
                     interfaces and every backplane datagram",
                    self.cfg.unit
                )));
            }
            Request::Monitor { session, reply } => {
                // One session at a time: a newer one replaces it (its stream sees the queue close).
                self.monitor = Some(session);
                let _ = reply.try_send(Ok(()));
            }
        }
    }

    /// Count a drop by reason and, when a monitor session runs, report it (`ctx`: the packet's
    /// tuple and ingress interface, when it was parsed that far).
    #[inline]
    fn drop_packet(&mut self, ctx: Option<(&FlowKey, u8)>, reason: usize) {
        if !self.chain.count_drop(reason) {
            self.drops.inc(reason);
        }
        if self.monitor.is_some() {
            self.report_drop(ctx, reason);
        }
    }

    #[cold]
    #[inline(never)]
    fn report_drop(&mut self, ctx: Option<(&FlowKey, u8)>, reason: usize) {
        let key = ctx.map(|(k, _)| *k);
        let Some(m) = self.monitor.as_mut() else {
            return;
        };
        if !m.wants_drop(key.as_ref()) {
            return;
        }
        let (cfg, unit, last_rule) = (&self.cfg, self.cfg.unit, self.last_rule);
        let name = self.chain.drop_name(reason);
        let alive = m.offer(self.now, || {
            // The firewall's rule verdicts name the rule (or the default policy) that decided.
            let by_rules = matches!(
                reason,
                dr::FIREWALL_RULE | dr::FIREWALL_DEFAULT | dr::REJECTED
            );
            MonitorEvent {
                reason: name.map(|n| n.to_string()),
                rule: by_rules.then(|| rule_name(cfg, last_rule)),
                interface: ctx.and_then(|(_, i)| interface_name(cfg, i)),
                ..MonitorEvent::new(EventType::Drop, unit, key.as_ref())
            }
        });
        if !alive {
            self.monitor = None;
        }
    }

    /// Report the connection a stage created for the packet just forwarded (`key`, as that
    /// stage saw it; `rule`: the rule that let it in), with its NAT binding or LB backend.
    #[cold]
    #[inline(never)]
    fn report_new_flow(&mut self, key: FlowKey, bucket: u16, rule: Option<usize>, ingress_if: u8) {
        let Some(m) = self.monitor.as_mut() else {
            return;
        };
        if !m.wants_flow(Some(&key)) {
            return;
        }
        let (cfg, now_ns, unit) = (&self.cfg, self.now_ns, self.cfg.unit);
        let chain = &mut self.chain;
        let alive = m.offer(self.now, || {
            let note = chain.annotate(now_ns, &key);
            MonitorEvent {
                event: Some(FlowEvent::New),
                rule: Some(rule_name(cfg, rule)),
                interface: interface_name(cfg, ingress_if),
                bucket: Some(bucket),
                nat: note.nat.as_ref().map(inspect::Tuple::from),
                backend: note.backend.map(|a| a.to_string()),
                ..MonitorEvent::new(EventType::Flow, unit, Some(&key))
            }
        });
        if !alive {
            self.monitor = None;
        }
    }

    /// The bounded expiry work of a turn, reporting each connection that leaves the table (the
    /// copies held for failover leave silently: their owner reports its flows).
    #[cold]
    #[inline(never)]
    fn expire_reporting(&mut self, max: usize) {
        let (cfg, now, now_ns, unit) = (&self.cfg, self.now, self.now_ns, self.cfg.unit);
        let monitor = &mut self.monitor;
        let mut alive = true;
        let mut gone = |c: &dva_services::conntrack::Conn| {
            let Some(m) = monitor.as_mut() else {
                return;
            };
            if replica_bucket(cfg, c.bucket) || !m.wants_flow(Some(&c.key)) {
                return;
            }
            alive &= m.offer(now, || MonitorEvent {
                event: Some(FlowEvent::Expired),
                bucket: Some(c.bucket),
                orig_packets: Some(c.orig_packets),
                orig_bytes: Some(c.orig_bytes),
                reply_packets: Some(c.reply_packets),
                reply_bytes: Some(c.reply_bytes),
                duration_secs: Some(c.last_seen.saturating_sub(c.created) as f64 / 1e9),
                ..MonitorEvent::new(EventType::Flow, unit, Some(&c.key))
            });
        };
        self.chain.expire(now_ns, max, Some(&mut gone));
        if !alive {
            self.monitor = None;
        }
    }

    /// The connections `filter` selects, at most `filter.limit` of them (the walk stops at the
    /// first one past the limit), with their NAT binding or load-balancer backend.
    fn list_flows(&mut self, filter: &FlowFilter) -> Result<FlowList, String> {
        let me = self.cfg.unit;
        if filter.unit.is_some_and(|u| u != me) {
            return Err(format!(
                "this is data plane {me}, not unit {}",
                filter.unit.unwrap_or(0)
            ));
        }
        let mut picked = Vec::new();
        let mut truncated = false;
        for c in self.chain.conntrack().iter() {
            let replica = self.is_replica_bucket(c.bucket);
            if replica && !filter.replicas {
                continue;
            }
            if !filter.matches(&c.key, inspect::state_name(c.state)) {
                continue;
            }
            if picked.len() == filter.limit {
                truncated = true;
                break;
            }
            picked.push((c.clone(), replica));
        }
        let now = self.now_ns;
        let secs = |t: u64| now.saturating_sub(t) as f64 / 1e9;
        let flows = picked
            .into_iter()
            .map(|(c, replica)| {
                // A stage before the firewall keys conntrack by its translated tuple: the stages
                // look the flow up both ways.
                let note = self.chain.annotate(now, &c.key);
                FlowEntry {
                    unit: me,
                    proto: c.key.proto,
                    src: c.key.src,
                    src_port: c.key.src_port,
                    dst: c.key.dst,
                    dst_port: c.key.dst_port,
                    bucket: c.bucket,
                    state: inspect::state_name(c.state).to_string(),
                    replica,
                    previous_owner: !replica
                        && self.cfg.table.get(c.bucket).is_some_and(|b| b.owner != me),
                    nat: note.nat.as_ref().map(inspect::Tuple::from),
                    backend: note.backend.map(|a| a.to_string()),
                    orig_packets: c.orig_packets,
                    orig_bytes: c.orig_bytes,
                    reply_packets: c.reply_packets,
                    reply_bytes: c.reply_bytes,
                    age_secs: secs(c.created),
                    idle_secs: secs(c.last_seen),
                }
            })
            .collect();
        Ok(FlowList { flows, truncated })
    }

    /// Forget every flow of `bucket`, in every stage.
    fn remove_bucket(&mut self, bucket: u16) {
        self.chain.remove_bucket(bucket);
    }

    /// A bucket's flows, every stage's, for a state move.
    fn export_flows(&self, bucket: u16) -> Flows {
        self.chain.export_bucket(self.now_ns, bucket)
    }

    pub(crate) fn snapshot(&self) -> UnitStats {
        let mut counters: BTreeMap<String, u64> = self
            .events
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        crate::keys::auth_counters(&mut counters, &self.auth);
        counters.insert("backplane_tx_dropped".into(), self.tx.tx_dropped());
        counters.insert("backplane_ring_tx".into(), self.tx.ring_stats().tx);
        counters.insert(
            "backplane_ring_fallback".into(),
            self.tx.ring_stats().tx_fallback,
        );
        counters.insert(
            "backplane_ring_waits".into(),
            self.tx.ring_stats().ring_waits,
        );
        counters.insert("replica_flows".into(), self.replica_flows);
        self.chain.counters(&mut counters);
        let mut drops = self.drops.to_map();
        drops.extend(
            self.chain
                .extra_drops()
                .filter(|(_, n)| *n > 0)
                .map(|(name, n)| (name.to_string(), n)),
        );
        UnitStats {
            appliance: self.cfg.appliance.clone(),
            unit: self.cfg.unit,
            role: "dataplane".into(),
            config_version: self.cfg.version,
            rx_packets: self.rx_packets,
            rx_bytes: self.rx_bytes,
            tx_packets: self.tx_packets,
            tx_bytes: self.tx_bytes,
            // Flows this data plane serves; backup copies are counted apart.
            flows: (self.chain.conntrack().len() as u64).saturating_sub(self.replica_flows),
            active_flows: self.active_flows,
            bucket_flows: self.bucket_flows.clone(),
            drops,
            counters,
            backends: self.chain.backend_stats(),
            rules: self.rule_hits(),
            latency: Latencies {
                handover: Some(self.handover_latency.clone()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// Hits of each rule under its name (`#<index>` when unnamed), then the default action's.
    fn rule_hits(&self) -> Vec<crate::stats::RuleHits> {
        let rules = &self.cfg.firewall.rules;
        let (rule_hits, default_hits) = self.chain.rule_hits();
        let mut hits: Vec<crate::stats::RuleHits> = rule_hits
            .into_iter()
            .enumerate()
            .map(|(i, hits)| crate::stats::RuleHits {
                rule: rules
                    .get(i)
                    .and_then(|r| r.name.clone())
                    .unwrap_or_else(|| format!("#{i}")),
                hits,
            })
            .collect();
        hits.push(crate::stats::RuleHits {
            rule: "(default)".into(),
            hits: default_hits,
        });
        hits
    }

    /// Handover work between batches: send the next buckets' state, resend what was not
    /// answered, release holds whose previous owner never answered.
    fn handover_tick(&mut self) {
        let now = self.now;
        if self.exporting {
            while self.export_pending.len() < 64 {
                let Some(b) = self.export_queue.pop_front() else {
                    break;
                };
                self.send_state(b, 0);
            }
            let stale: Vec<(u16, u32)> = self
                .export_pending
                .iter()
                .filter(|(_, (_, at, _))| now.duration_since(*at) >= RESEND_AFTER)
                .map(|(b, (_, _, n))| (*b, *n))
                .collect();
            for (b, n) in stale {
                if n >= MAX_RESENDS {
                    // The owner never answered: the flows stay here until this unit is stopped.
                    self.export_pending.remove(&b);
                    self.event("export_abandoned");
                } else {
                    self.send_state(b, n + 1);
                }
            }
        }
        if !self.holds.is_empty() {
            let expired: Vec<u16> = self
                .holds
                .iter()
                .filter(|(_, since)| now.duration_since(**since) >= HOLD_LIMIT)
                .map(|(b, _)| *b)
                .collect();
            for b in expired {
                self.event("hold_timeouts");
                self.release(b);
            }
        }
        if !self.importing.is_empty() {
            // State whose last chunk never came (the previous owner gave up resending) starts
            // no hold: forget it, or a later handover of the bucket would be timed from it.
            self.importing.retain(|b, since| {
                self.holds.contains_key(b) || now.duration_since(*since) < IMPORT_FORGOTTEN
            });
        }
    }

    fn send_state(&mut self, bucket: u16, resends: u32) {
        let owner = self.cfg.table.owner(bucket);
        let Some(addr) = self.peers.get(&owner).copied() else {
            self.event("export_no_owner");
            return;
        };
        if owner == self.cfg.unit {
            return;
        }
        let flows = self.export_flows(bucket);
        for body in handover::state_bodies(self.cfg.unit, bucket, flows) {
            self.send_control(addr, bucket, &body);
        }
        self.export_pending
            .insert(bucket, (owner, self.now, resends));
        if resends == 0 {
            self.event("buckets_export_started");
        }
    }

    fn send_control(&mut self, to: SocketAddr, bucket: u16, body: &[u8]) {
        let meta = DvaMeta {
            epoch: 0,
            bucket,
            hops: 0,
            flags: dva_flags::FROM_DATAPLANE,
            ingress_if: 0,
            egress_if: 0,
            gso_size: 0,
        };
        let total = DVA_HEADER_LEN + body.len();
        let Some(slot) = self.tx.tx_slot() else {
            return self.drop_packet(None, dr::TX_FULL);
        };
        if slot.len() < total {
            return self.drop_packet(None, dr::TX_FULL);
        }
        geneve::encap_dva(slot, self.cfg.vni, PROTO_HANDOVER, &meta);
        slot[DVA_HEADER_LEN..total].copy_from_slice(body);
        self.tx.commit_slot(total, to);
    }

    /// A handover or replication message from peer `sender` (authenticated). Each is taken
    /// only from the unit the bucket table says may send it, for a bucket we own or back up:
    /// state and its end marker from a previous owner of a bucket we own, the marker's answer
    /// from the owner of a bucket we export, copies from a bucket's owner or previous owner.
    fn on_handover(&mut self, body: &[u8], sender: UnitId) {
        let Some(msg) = handover::decode(body) else {
            return self.drop_packet(None, dr::MALFORMED_HANDOVER);
        };
        let me = self.cfg.unit;
        let claimed = match &msg {
            Handover::State { from, .. }
            | Handover::Marker { from, .. }
            | Handover::Done { from, .. }
            | Handover::Replicate { from, .. } => *from,
        };
        if claimed != sender {
            return self.drop_packet(None, dr::HANDOVER_REFUSED);
        }
        let previous_owner = |cfg: &DataplaneConfig, bucket: u16| {
            cfg.table
                .get(bucket)
                .is_some_and(|b| b.owner == me && b.history.contains(&sender))
        };
        let allowed = match &msg {
            Handover::State { bucket, .. } | Handover::Done { bucket, .. } => {
                previous_owner(&self.cfg, *bucket)
            }
            Handover::Marker { bucket, .. } => self
                .export_pending
                .get(bucket)
                .is_some_and(|(owner, _, _)| *owner == sender),
            Handover::Replicate { .. } => true, // checked per bucket below
        };
        if !allowed {
            return self.drop_packet(None, dr::HANDOVER_REFUSED);
        }
        match msg {
            Handover::State {
                from,
                bucket,
                last,
                conns,
                nat,
                lb,
            } => {
                if usize::from(bucket) >= self.cfg.table.len() {
                    return self.drop_packet(None, dr::MALFORMED_HANDOVER);
                }
                // A resent chunk keeps the first arrival: the resend's wait is part of the move.
                self.importing.entry(bucket).or_insert(self.now);
                // Only what belongs to the bucket named; a repeat (resend) is already here.
                let taken = self
                    .chain
                    .import(self.now_ns, Flows { conns, nat, lb }, &mut |b| {
                        (b == bucket).then_some(Import::Fill)
                    });
                self.count_event("flows_imported", taken as u64);
                if last {
                    let Some(addr) = self.peers.get(&from).copied() else {
                        return self.drop_packet(None, dr::MALFORMED_HANDOVER);
                    };
                    self.holds.entry(bucket).or_insert(self.now);
                    let marker = serde_json::to_vec(&Handover::Marker { from: me, bucket })
                        .unwrap_or_default();
                    self.send_control(addr, bucket, &marker);
                }
            }
            Handover::Marker { from, bucket } => {
                // Every packet the owner punted to us before this marker has been processed.
                let Some(addr) = self.peers.get(&from).copied() else {
                    return self.drop_packet(None, dr::MALFORMED_HANDOVER);
                };
                let done =
                    serde_json::to_vec(&Handover::Done { from: me, bucket }).unwrap_or_default();
                self.send_control(addr, bucket, &done);
                if self.export_pending.remove(&bucket).is_some() {
                    self.remove_bucket(bucket);
                    self.event("buckets_exported");
                    self.census_due =
                        self.export_pending.is_empty() && self.export_queue.is_empty();
                }
            }
            Handover::Done { bucket, .. } => self.release(bucket),
            Handover::Replicate { conns, nat, lb, .. } => {
                // Only for buckets we back up or own, and only from their owner or a previous
                // owner (a stale or foreign sender's copies are ignored).
                let ours = |cfg: &DataplaneConfig, bucket: u16| {
                    cfg.table.get(bucket).is_some_and(|b| {
                        (cfg.backups.get(usize::from(bucket)) == Some(&me) || b.owner == me)
                            && (b.owner == sender || b.history.contains(&sender))
                    })
                };
                // A previous owner's copy to us, the owner, only fills a gap: once we hold a flow
                // we serve its packets and our entry is the newest, while the previous owner's
                // froze when the bucket moved (its refresh walk still sends it every second, and
                // replacing ours with it would roll the connection back each time). A copy from
                // the owner to us, its backup, always replaces: the owner's is the newest.
                let fills_only = |cfg: &DataplaneConfig, bucket: u16| {
                    cfg.table.get(bucket).is_some_and(|b| b.owner == me)
                };
                let cfg = &self.cfg;
                let taken = self
                    .chain
                    .import(self.now_ns, Flows { conns, nat, lb }, &mut |b| {
                        ours(cfg, b).then_some(if fills_only(cfg, b) {
                            Import::Fill
                        } else {
                            Import::Replace
                        })
                    });
                self.count_event("flows_replicated_in", taken as u64);
            }
        }
    }

    /// A bucket whose flows we hold only as a backup's copy (not as its owner or a previous one).
    fn is_replica_bucket(&self, bucket: u16) -> bool {
        replica_bucket(&self.cfg, bucket)
    }

    /// Send the backup of each bucket copies of the connections created or changed here (the
    /// journal: no half-open ones), at most [`REPLICATE_BUDGET`] a turn, and of the next slice of
    /// the refresh walk when one is under way. Per-packet counters are not replicated.
    fn replicate(&mut self) {
        if !self.has_backup {
            return;
        }
        let journal = self
            .chain
            .conntrack_mut()
            .map(|ct| ct.take_journal())
            .unwrap_or_default();
        let room = REPLICATE_PENDING_MAX.saturating_sub(self.replicate_pending.len());
        self.replicate_pending
            .extend(journal.into_iter().take(room));
        let n = self.replicate_pending.len().min(REPLICATE_BUDGET);
        let mut keys: Vec<dva_flow::FlowKey> = self.replicate_pending.drain(..n).collect();
        let mut walk_done = false;
        if let Some(at) = self.refresh_at {
            // The open connections (not the closing ones, nor the half-open ones: losing those
            // costs a retransmission), so a lost replication datagram or a quiet flow's timeout at
            // the backup is repaired within a walk.
            const RECENT_NS: u64 = 30_000_000_000;
            let now = self.now_ns;
            let (conns, next) = self.chain.conntrack().slice(at, REFRESH_SLOTS);
            keys.extend(
                conns
                    .filter(|c| {
                        !c.state.half_open()
                            && match c.state {
                                ConnState::Tcp(s) => !matches!(
                                    s,
                                    TcpState::LastAck | TcpState::TimeWait | TcpState::Close
                                ),
                                _ => now.saturating_sub(c.last_seen) < RECENT_NS,
                            }
                    })
                    .map(|c| c.key),
            );
            self.refresh_at = (next != 0).then_some(next);
            walk_done = next == 0;
        }
        if keys.is_empty() && !walk_done {
            return;
        }
        let me = self.cfg.unit;
        // An owner copies its flows to the bucket's backup; a previous owner still holding flows
        // of a moved bucket copies them to the new owner, which then serves them itself instead
        // of punting (and holds them if we die).
        let target_of = |cfg: &DataplaneConfig, bucket: u16| {
            let owner = cfg.table.owner(bucket);
            let t = if owner == me {
                cfg.backups.get(usize::from(bucket)).copied().unwrap_or(0)
            } else {
                owner
            };
            (t != 0 && t != me).then_some(t)
        };
        let mut by_backup: BTreeMap<UnitId, Flows> = BTreeMap::new();
        let mut seen = std::collections::HashSet::new();
        let now = self.now_ns;
        for k in keys {
            let Some(c) = self.chain.conntrack().find(&k) else {
                continue;
            };
            if c.state.half_open()
                || !seen.insert(c.key.canonical().0)
                || self.is_replica_bucket(c.bucket)
            {
                continue;
            }
            let Some(target) = target_of(&self.cfg, c.bucket) else {
                continue;
            };
            let (c, key) = (c.clone(), c.key);
            let entry = by_backup.entry(target).or_default();
            entry.conns.push(c);
            // The flow's translation goes with it (found by the tuple the firewall saw, which
            // is the one the translating stages saw first when the firewall comes first).
            self.chain.replicate_flow(now, &key, entry);
        }
        if walk_done {
            // Every binding, whatever chain order produced it (a NAT before the firewall keys
            // its conntrack entries by translated tuples, which the lookups above miss). Once a
            // walk, and only in chains with translating stages.
            let cfg = &self.cfg;
            let all = self.chain.replicate_all().group_by(|b| {
                if replica_bucket(cfg, b) {
                    None
                } else {
                    target_of(cfg, b)
                }
            });
            for (t, set) in all {
                by_backup.entry(t).or_default().append(set);
            }
        }
        for (backup, flows) in by_backup {
            let Some(addr) = self.peers.get(&backup).copied() else {
                continue;
            };
            let n = flows.conns.len() as u64;
            for body in handover::replicate_bodies(me, flows) {
                self.send_control(addr, 0, &body);
            }
            *self.events.entry("flows_replicated_out").or_insert(0) += n;
        }
    }

    /// Stop holding `bucket` and process its held packets in arrival order.
    fn release(&mut self, bucket: u16) {
        if self.holds.remove(&bucket).is_none() {
            return;
        }
        // One observation per bucket handed over, whether `Done` or the hold limit ended it.
        if let Some(since) = self.importing.remove(&bucket) {
            self.handover_latency
                .observe(self.now.duration_since(since));
        }
        let (mine, rest): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|(b, _, _)| *b == bucket);
        self.held = rest;
        self.held_bytes = self.held.iter().map(|(_, b, _)| b.len()).sum();
        for (_, buf, from) in mine {
            self.event("held_packets_released");
            self.handle(&buf, from, false);
        }
    }

    fn event(&mut self, name: &'static str) {
        *self.events.entry(name).or_insert(0) += 1;
    }

    /// `n` more of event `name` (listed once it happened at all).
    fn count_event(&mut self, name: &'static str, n: u64) {
        if n > 0 {
            *self.events.entry(name).or_insert(0) += n;
        }
    }

    pub(crate) fn on_packet(&mut self, buf: &[u8], from: Origin) {
        self.rx_packets += 1;
        self.rx_bytes += buf.len() as u64;
        self.handle(buf, from, true);
    }

    /// One backplane packet, authenticated as sent by `from.unit` (the backplane delivers
    /// nothing else); `may_hold` is false when replaying packets held during a handover.
    fn handle(&mut self, buf: &[u8], from: Origin, may_hold: bool) {
        // The sender's role is what the config says of its unit, never what its address
        // suggests: a packet to process comes from a dispatcher or a peer, nothing else.
        let dispatcher = self.cfg.dispatchers.iter().find(|d| d.id == from.unit);
        let from_dispatcher = dispatcher.is_some();
        if !from_dispatcher && !self.peers.contains_key(&from.unit) {
            return self.drop_packet(None, dr::FOREIGN);
        }
        let Ok((vni, ptype, meta, off)) = geneve::decap_dva(buf) else {
            return self.drop_packet(None, dr::MALFORMED_GENEVE);
        };
        if vni != self.cfg.vni {
            return self.drop_packet(None, dr::WRONG_VNI);
        }
        if ptype == PROTO_HANDOVER {
            if from_dispatcher {
                return self.drop_packet(None, dr::FOREIGN);
            }
            return self.on_handover(&buf[off..], from.unit);
        }
        let ip = &buf[off..];
        let Ok(c) = classify(ip) else {
            return self.drop_packet(None, dr::MALFORMED_IP);
        };
        let ip = &ip[..c.ip_len.min(ip.len())];
        if c.fragment {
            // Dispatchers reassemble before hashing (dispatcher/fragment.rs) and hand over whole
            // datagrams only; a fragment here came from a unit that does not, and without its
            // ports it cannot be matched to a flow: counted, dropped.
            return self.drop_packet(Some((&c.key, meta.ingress_if)), dr::FRAGMENT);
        }
        let table = &self.cfg.table;
        let bucket = if usize::from(meta.bucket) < table.len() {
            meta.bucket
        } else {
            table.bucket_of(c.bucket_key().symmetric_hash())
        };
        if may_hold
            && self.holds.contains_key(&bucket)
            && self.held.len() < HOLD_MAX_PACKETS
            && self.held_bytes + buf.len() <= HOLD_MAX_BYTES
        {
            // Its state is arriving from the previous owner: keep the packet until that owner
            // has processed everything we punted to it before (see `handover`).
            self.held.push_back((bucket, buf.to_vec(), from));
            self.held_bytes += buf.len();
            return;
        }
        let history_len = table.bucket(bucket).history.len();
        let punted = meta.flags & dva_flags::PUNTED != 0;
        let new_here = meta.flags & dva_flags::NEW_HERE != 0;
        // A TCP SYN always starts a fresh flow where it lands; anything else in a bucket that moved
        // may belong to a flow a previous owner holds, so ask before creating state.
        let policy = if new_here
            || (!punted && history_len == 0)
            || (c.key.proto == ip_proto::TCP && c.can_start_flow() && !punted)
        {
            NewFlowPolicy::Create
        } else {
            NewFlowPolicy::Refuse
        };
        // Back to the lane that sent it (its thread holds the flow's direction); an address
        // that is none of the dispatcher's lanes gets the dispatcher's own.
        let lanes = self.cfg.dispatcher_lanes;
        let back = dispatcher.map(|d| {
            if dva_proto::role::is_lane_of(d.addr, lanes, from.addr) {
                from.addr
            } else {
                d.addr
            }
        });
        let to = self.dispatcher_for(back, &c);
        // The packet's one parse: every stage reads (and a translating one updates) this.
        let pkt = descriptor(meta.ingress_if, ip, &c, bucket, policy);
        self.process(&meta, ip, &c, pkt, to);
    }

    /// Run the service chain on one packet (`pkt`: its descriptor; `ip`, `c`: the packet as it
    /// arrived) and send, punt, reject or drop it. `to`: the dispatcher that gets it back.
    fn process(
        &mut self,
        meta: &DvaMeta,
        ip: &[u8],
        c: &Classified,
        mut pkt: Packet,
        to: SocketAddr,
    ) {
        let now = self.now_ns;
        let bucket = pkt.bucket;
        let mut work = std::mem::take(&mut self.work);
        let rewrites = self.chain.rewrites();
        let outcome = if rewrites {
            // The received packet stays as it came, for punting.
            work.clear();
            work.extend_from_slice(ip);
            self.chain.run(now, &mut pkt, Bytes::Writable(&mut work))
        } else {
            // Nothing rewrites the packet, so no copy of it is made.
            self.chain.run(now, &mut pkt, Bytes::ReadOnly(ip))
        };
        if let Some(rule) = pkt.rule {
            self.last_rule = rule;
        }
        let out: &[u8] = if rewrites { &work } else { ip };
        match outcome {
            Outcome::Forward => {
                self.send(to, meta, 0, out);
                if let Some(key) = pkt.created.filter(|_| self.monitor.is_some()) {
                    self.report_new_flow(key, bucket, pkt.rule.flatten(), meta.ingress_if);
                }
            }
            // The packet as it arrived: the previous owner runs the whole chain on it.
            Outcome::Punt => self.punt(bucket, meta, ip, c),
            Outcome::Drop(r) => self.drop_packet(Some((&c.key, meta.ingress_if)), r),
            Outcome::Reject(kind) => {
                self.drop_packet(Some((&c.key, meta.ingress_if)), dr::REJECTED);
                self.reject(kind, to, meta, out, &classified(&pkt));
            }
        }
        self.work = work;
    }

    /// Processed packets go back to the dispatcher they came from; punted ones to any dispatcher
    /// (dispatchers are interchangeable), chosen by flow so a flow keeps one path.
    fn dispatcher_for(&self, from: Option<SocketAddr>, c: &Classified) -> SocketAddr {
        if let Some(addr) = from {
            return addr;
        }
        let d = &self.cfg.dispatchers;
        d[c.bucket_key().symmetric_hash() as usize % d.len()].addr
    }

    fn punt(&mut self, bucket: u16, meta: &DvaMeta, ip: &[u8], c: &Classified) {
        let hops = meta.hops;
        if hops >= MAX_HOPS {
            return self.drop_packet(Some((&c.key, meta.ingress_if)), dr::PUNT_LOOP);
        }
        let b = self.cfg.table.bucket(bucket);
        let next = usize::from(hops);
        if let Some(prev) = b.history.get(next).copied().filter(|p| *p != self.cfg.unit) {
            let Some(addr) = self.peers.get(&prev).copied() else {
                return self.drop_packet(Some((&c.key, meta.ingress_if)), dr::NO_STATE);
            };
            self.event("punted_out");
            return self.send(addr, meta, dva_flags::PUNTED, ip);
        }
        // End of the chain: nobody holds this flow.
        if c.can_start_flow() && c.key.proto != ip_proto::TCP {
            let owner = b.owner;
            if owner == self.cfg.unit {
                // We are the owner and the chain came back empty: create it here, through the
                // whole chain. At the hop limit, so a stage that still refuses it cannot punt
                // it around again.
                let m = DvaMeta {
                    hops: MAX_HOPS,
                    ..*meta
                };
                let to = self.dispatcher_for(None, c);
                let pkt = descriptor(meta.ingress_if, ip, c, bucket, NewFlowPolicy::Create);
                return self.process(&m, ip, c, pkt, to);
            }
            if let Some(addr) = self.peers.get(&owner).copied() {
                self.event("handed_back_new");
                return self.send(addr, meta, dva_flags::NEW_HERE, ip);
            }
        }
        self.drop_packet(Some((&c.key, meta.ingress_if)), dr::NO_STATE)
    }

    fn reject(
        &mut self,
        kind: RejectKind,
        to: SocketAddr,
        meta: &DvaMeta,
        ip: &[u8],
        c: &Classified,
    ) {
        if !self.reject_budget.take(self.now) {
            // Still dropped (counted as rejected by the caller), without an answer.
            return self.event("rejects_rate_limited");
        }
        let mut out = std::mem::take(&mut self.scratch);
        out.clear();
        let built = match kind {
            RejectKind::TcpReset => reply::tcp_reset(&mut out, ip, c),
            RejectKind::IcmpPortUnreachable | RejectKind::IcmpAdminProhibited => {
                let v6 = c.is_v6();
                let from = self
                    .cfg
                    .interfaces
                    .get(usize::from(meta.ingress_if))
                    .and_then(|i| i.address(!v6));
                match from {
                    Some(IpAddr::V4(a)) => {
                        let code = if kind == RejectKind::IcmpPortUnreachable {
                            3
                        } else {
                            13
                        };
                        reply::icmpv4_error(&mut out, ip, a, 3, code)
                    }
                    Some(IpAddr::V6(a)) => {
                        let code = if kind == RejectKind::IcmpPortUnreachable {
                            4
                        } else {
                            1
                        };
                        reply::icmpv6_error(&mut out, ip, a, 1, code, 0)
                    }
                    None => None,
                }
            }
        };
        if built.is_some() {
            // A reply we built: complete checksum, wire-sized.
            let m = DvaMeta {
                hops: 0,
                flags: 0,
                gso_size: 0,
                ..*meta
            };
            self.send(to, &m, 0, &out);
            self.event("rejects_sent");
        }
        self.scratch = out;
    }

    /// Encapsulate `ip` with `meta` (flags replaced, hop count advanced for punts) into the send
    /// batch; a super-packet whole where the path takes it, in segments where not.
    fn send(&mut self, to: SocketAddr, meta: &DvaMeta, flags: u8, ip: &[u8]) {
        let hops = if flags != 0 {
            meta.hops.saturating_add(1)
        } else {
            0
        };
        let m = DvaMeta {
            flags: flags | dva_flags::FROM_DATAPLANE | (meta.flags & dva_flags::CSUM_PARTIAL),
            hops,
            ..*meta
        };
        let mut scratch = std::mem::take(&mut self.segments);
        let sent = offload::encap_send(&mut self.tx, self.cfg.vni, to, &m, ip, &mut scratch);
        self.segments = scratch;
        match sent {
            offload::Sent::Whole => {
                self.tx_packets += 1;
                self.tx_bytes += (DVA_HEADER_LEN + ip.len()) as u64;
            }
            offload::Sent::Segmented(n) => {
                self.event("super_packets_segmented");
                self.tx_packets += n as u64;
                self.tx_bytes += (DVA_HEADER_LEN * n + ip.len()) as u64;
            }
            offload::Sent::Failed => self.drop_packet(None, dr::TX_FULL),
        }
    }
}

/// Whether `cfg`'s data plane holds `bucket`'s flows only as a backup's copy.
fn replica_bucket(cfg: &DataplaneConfig, bucket: u16) -> bool {
    let me = cfg.unit;
    let Some(b) = cfg.table.get(bucket) else {
        return false;
    };
    b.owner != me && !b.history.contains(&me)
}

/// A rule as `dva stats` names it: its name, `#<index>` when unnamed, `(default)` for the
/// default action.
fn rule_name(cfg: &DataplaneConfig, index: Option<usize>) -> String {
    match index {
        None => "(default)".into(),
        Some(i) => cfg
            .firewall
            .rules
            .get(i)
            .and_then(|r| r.name.clone())
            .unwrap_or_else(|| format!("#{i}")),
    }
}

/// The spec name of the interface with backplane index `id`.
fn interface_name(cfg: &DataplaneConfig, id: u8) -> Option<String> {
    cfg.interfaces
        .iter()
        .find(|i| i.id == id)
        .map(|i| i.name.clone())
}

/// The descriptor of a packet the classifier parsed (`c` is `ip`'s classification): what every
/// stage reads.
#[inline]
fn descriptor(
    ingress_if: u8,
    ip: &[u8],
    c: &Classified,
    bucket: u16,
    policy: NewFlowPolicy,
) -> Packet {
    Packet::new(
        packet_info(ingress_if, ip, c),
        bucket,
        policy,
        c.fragment,
        c.l4_offset,
        ip.len(),
    )
}

/// What the firewall reads of a packet: `c` is `ip`'s classification.
#[inline]
fn packet_info(ingress_if: u8, ip: &[u8], c: &Classified) -> PacketInfo {
    PacketInfo {
        ingress_if,
        key: c.key,
        tcp_flags: c.tcp_flags,
        // The classifier already checked the TCP header fits; a fragment has none.
        tcp: Packet::tcp_segment(ip, c.key.proto, c.fragment, c.l4_offset),
        icmp: c.icmp,
        icmp_inner: c.icmp_inner,
        len: ip.len() as u32,
    }
}

/// The classification of the packet `d` describes (after any translation), for building an
/// answer to it.
fn classified(d: &Packet) -> Classified {
    Classified {
        key: d.info.key,
        tcp_flags: d.info.tcp_flags,
        icmp: d.info.icmp,
        icmp_inner: d.info.icmp_inner,
        fragment: d.fragment,
        l4_offset: d.l4,
        ip_len: d.end,
    }
}

#[cfg(test)]
mod tests {
    //! ICMP errors on the wire, through the classifier, to the firewall.
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use dva_services::firewall::{
        Action, ConntrackConfig, DropReason, Firewall, NewFlowPolicy, RuleSet, Verdict,
    };
    use dva_wire::tcp::flags::SYN;

    use super::packet_info;
    use crate::classify::classify;
    use crate::reply;

    #[test]
    fn one_data_plane_alone_replicates_nothing() {
        use super::backs_up_to_another;
        let alone = dva_flow::BucketTable::maglev(64, &[7]).expect("table");
        assert!(!backs_up_to_another(&alone.backups(), 7));
        assert!(!backs_up_to_another(&[0, 0, 7], 7), "no backup, or only us");
        let pair = dva_flow::BucketTable::maglev(64, &[7, 8]).expect("table");
        assert!(backs_up_to_another(&pair.backups(), 7));
        assert!(backs_up_to_another(&pair.backups(), 8));
    }

    fn verdict(fw: &mut Firewall, ip: &[u8]) -> Verdict {
        let c = classify(ip).expect("classify");
        fw.process(0, 0, &packet_info(0, ip, &c), NewFlowPolicy::Create)
    }

    fn syn(src: IpAddr, dst: IpAddr) -> Vec<u8> {
        let mut p = Vec::new();
        reply::tcp_segment(&mut p, src, dst, 40000, 80, 1, 0, SYN, &[]).expect("segment");
        p
    }

    /// An IPv4 packet with its destination rewritten (header checksum redone).
    fn redirect_v4(mut ip: Vec<u8>, dst: Ipv4Addr) -> Vec<u8> {
        ip[16..20].copy_from_slice(&dst.octets());
        ip[10..12].fill(0);
        let ck = dva_wire::checksum::data(&ip[..20]);
        ip[10..12].copy_from_slice(&ck.to_be_bytes());
        ip
    }

    /// A firewall tracking the connection `opener` starts, whose rules then drop everything:
    /// only relatedness can let an error through.
    fn tracking(opener: &[u8]) -> Firewall {
        let mut fw = Firewall::new(
            RuleSet::with_default(Action::Accept),
            ConntrackConfig::default(),
        );
        assert_eq!(verdict(&mut fw, opener), Verdict::Accept);
        fw.set_rules(RuleSet::with_default(Action::Drop));
        fw
    }

    const UNRELATED: Verdict = Verdict::Drop(DropReason::IcmpErrorUnrelated);

    #[test]
    fn icmpv4_error_is_related_only_towards_the_quoted_source() {
        let server2 = Ipv4Addr::new(198, 18, 2, 3);
        let server1 = Ipv4Addr::new(198, 18, 2, 2);
        let client = Ipv4Addr::new(198, 18, 1, 2);
        let out = syn(server2.into(), client.into());
        let mut fw = tracking(&out);
        // Port unreachable from the client about server2's SYN, to server2: related.
        let mut err = Vec::new();
        reply::icmpv4_error(&mut err, &out, client, 3, 3).expect("error");
        assert_eq!(verdict(&mut fw, &err), Verdict::Accept);
        // The same error aimed at server1, which never sent the quoted packet.
        assert_eq!(verdict(&mut fw, &redirect_v4(err, server1)), UNRELATED);
        // Fragmentation needed about the reply direction goes to the client, not to server2.
        let back = {
            let mut p = Vec::new();
            reply::tcp_segment(
                &mut p,
                client.into(),
                server2.into(),
                80,
                40000,
                9,
                2,
                0x12,
                &[],
            )
            .expect("segment");
            p
        };
        assert_eq!(verdict(&mut fw, &back), Verdict::Accept);
        let mut err = Vec::new();
        reply::icmpv4_error(&mut err, &back, Ipv4Addr::new(198, 18, 9, 1), 3, 4).expect("error");
        assert_eq!(verdict(&mut fw, &err), Verdict::Accept);
        assert_eq!(verdict(&mut fw, &redirect_v4(err, server2)), UNRELATED);
        assert_eq!(fw.stats().related, 2);
        assert_eq!(fw.drops()[4], (DropReason::IcmpErrorUnrelated, 2));
    }

    #[test]
    fn icmpv6_error_is_related_only_towards_the_quoted_source() {
        let server2: Ipv6Addr = "2001:db8:2::3".parse().expect("addr");
        let server1: Ipv6Addr = "2001:db8:2::2".parse().expect("addr");
        let client: Ipv6Addr = "2001:db8:1::2".parse().expect("addr");
        let out = syn(server2.into(), client.into());
        let mut fw = tracking(&out);
        let mut err = Vec::new();
        reply::icmpv6_error(&mut err, &out, client, 1, 4, 0).expect("error");
        assert_eq!(verdict(&mut fw, &err), Verdict::Accept);
        // IPv6 has no header checksum; the classifier reads the destination as it is.
        err[24..40].copy_from_slice(&server1.octets());
        assert_eq!(verdict(&mut fw, &err), UNRELATED);
    }
}
