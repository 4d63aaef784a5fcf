//! The dispatcher role: owns the appliance's interfaces and spreads flows over data planes.
//!
//! ```text
//!  wire ──AF_XDP/AF_PACKET rx──> on_frame ──ARP/ND──> answer for the appliance's addresses
//!                            │ IPv4/IPv6: hygiene (martian or own source, IPv4 source route or
//!                            │ broken options, bad TCP/UDP checksum: counted drops), TTL > 1
//!                            └─ classify → symmetric hash → bucket → owner DP
//!                                  └─ GENEVE(bucket, epoch, ingress_if) ──UDP──> data plane
//!  data plane ──GENEVE──> on_backplane ── route (connected + static) ── neighbour ── AF_XDP/AF_PACKET tx ──> wire
//! ```
//!
//! The interface driver is the spec's `runtime.driver`, taken with the dispatcher's first config
//! (`af_xdp`, `af_packet` or `auto`, the default: AF_PACKET on a veth carrying super-packets,
//! AF_XDP where the XDP program attaches, AF_PACKET otherwise); each interface logs which one it
//! got and reports it in its stats.
//!
//! The dispatcher keeps no per-flow state: everything it needs per packet is in the packet and
//! the config (bucket table, interfaces, routes), so any dispatcher can serve any packet.
//!
//! With `runtime.dispatcher_threads` above 1 the dispatcher runs that many lanes, each a
//! [`Dispatcher`] of its own on a thread of its own with its share of every interface's frames
//! and a backplane port of its own (see [`lanes`]).

pub mod fragment;
pub mod health;
pub mod hygiene;
pub mod lanes;
pub mod neighbor;
pub mod route;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dva_io::backplane::{Backplane, BackplaneTx, Origin};
use dva_io::capture::Tapped;
use dva_io::port::{DriverChoice, Port as Device};
use dva_io::{FrameIo, GsoType, RxMeta};
use dva_proto::spec::DriverSpec;
use dva_proto::{DispatcherConfig, InterfaceConfig, RoleConfig};
use dva_wire::geneve::{self, dva_flags, DvaMeta, DVA_HEADER_LEN};
use dva_wire::icmpv6::ndisc_flags;
use dva_wire::{
    ethertype, icmpv6_type, ip_proto, ArpOperation, ArpPacket, ArpRepr, EthernetAddress,
    EthernetFrame, Icmpv6Packet, Ipv4Packet, Ipv6Packet, NdiscRepr, OptionsError,
};

use crate::channel::Update;
use crate::classify::{classify, Classified};
use crate::inspect::{Request, Requests, BACKPLANE};
use crate::keys::epoch_keys;
use crate::offload;
use crate::reply;
use crate::stats::{DropCounters, Every, InterfaceStats, StatsCell, UnitStats};
use hygiene::L4Checksum;
use neighbor::NeighborTable;
use route::RouteTable;

/// Frames taken from one ring per turn: large enough to amortize the loop, small enough to stay fair
/// between interfaces and the backplane.
const BATCH: usize = 64;

mod drop_reason {
    pub const OVERSIZE: usize = 0;
    pub const MALFORMED_ETHERNET: usize = 1;
    pub const NOT_FOR_US: usize = 2;
    pub const UNSUPPORTED_ETHERTYPE: usize = 3;
    pub const VLAN: usize = 4;
    pub const MALFORMED_ARP: usize = 5;
    pub const MALFORMED_IP: usize = 6;
    pub const BAD_IP_CHECKSUM: usize = 7;
    pub const MALFORMED_L4: usize = 8;
    pub const TTL_EXCEEDED: usize = 9;
    pub const TO_APPLIANCE: usize = 10;
    pub const NO_ROUTE: usize = 11;
    pub const NEIGHBOR_UNRESOLVED: usize = 12;
    pub const NEIGHBOR_QUEUE_FULL: usize = 13;
    pub const TX_RING_FULL: usize = 14;
    pub const BACKPLANE_FOREIGN: usize = 15;
    pub const MALFORMED_GENEVE: usize = 16;
    pub const WRONG_VNI: usize = 17;
    pub const BACKPLANE_TX_FULL: usize = 18;
    pub const EXCEEDS_MTU: usize = 19;
    pub const MULTICAST: usize = 20;
    pub const ICMP_RATE_LIMITED: usize = 21;
    pub const GSO_UNSUPPORTED: usize = 22;
    pub const BACKPLANE_AUTH: usize = 23;
    pub const MARTIAN_SOURCE: usize = 24;
    pub const OWN_SOURCE: usize = 25;
    pub const BAD_L4_CHECKSUM: usize = 26;
    pub const SOURCE_ROUTE: usize = 27;
    pub const MALFORMED_IP_OPTIONS: usize = 28;
    pub const FRAGMENT_TIMEOUT: usize = 29;
    /// Reassembly drops: `FRAGMENT_BASE + k` for the `k`-th [`FRAGMENT_REASONS`] entry.
    pub const FRAGMENT_BASE: usize = 30;
    pub const FENCED: usize = 37;
    pub const FRAGMENT_REASONS: [super::fragment::FragDrop; 7] = {
        use super::fragment::FragDrop::*;
        [
            Malformed, Tiny, Overlap, Duplicate, TooMany, TooBig, MemoryFull,
        ]
    };
    pub const NAMES: [&str; 38] = [
        "oversize-frame",
        "malformed-ethernet",
        "not-for-us",
        "unsupported-ethertype",
        "vlan-unsupported",
        "malformed-arp",
        "malformed-ip",
        "bad-ip-checksum",
        "malformed-l4",
        "ttl-exceeded",
        "to-appliance-unsupported",
        "no-route",
        "neighbor-unresolved",
        "neighbor-queue-full",
        "tx-ring-full",
        "backplane-foreign-source",
        "malformed-geneve",
        "wrong-vni",
        "backplane-tx-full",
        "exceeds-mtu",
        "multicast-ignored",
        "icmp-rate-limited",
        "gso-unsupported",
        "backplane-auth",
        "martian-source",
        "own-address-source",
        "bad-l4-checksum",
        "ip-source-route",
        "malformed-ip-options",
        "fragment-timeout",
        "fragment-malformed",
        "fragment-tiny",
        "fragment-overlap",
        "fragment-duplicate",
        "fragment-too-many",
        "fragment-too-big",
        "fragment-memory-full",
        "fenced-dataplane",
    ];
}
use drop_reason as dr;

/// Bytes of a super-packet's headers that every segment repeats (IP with extensions, TCP
/// with options, or UDP).
fn segment_header_len(ip: &[u8], c: &Classified) -> Option<usize> {
    match c.key.proto {
        ip_proto::TCP => ip
            .get(c.l4_offset + 12)
            .map(|b| c.l4_offset + usize::from(b >> 4) * 4),
        _ => Some(c.l4_offset + 8),
    }
}

/// Per-interface state other than the I/O object (split so an rx callback can borrow it while the
/// ring is borrowed).
struct Link {
    cfg: InterfaceConfig,
    /// Service addresses (VIPs, NAT pools) answered for on this link besides its own.
    extra: Vec<IpAddr>,
    mac: EthernetAddress,
    mtu: usize,
    neigh: NeighborTable,
    stats: InterfaceStats,
}

impl Link {
    fn owns(&self, ip: IpAddr) -> bool {
        self.cfg.addresses.iter().any(|a| a.addr() == ip) || self.extra.contains(&ip)
    }
    fn on_link(&self, ip: IpAddr) -> bool {
        self.cfg.addresses.iter().any(|a| a.contains(&ip))
    }
    /// Our address on the subnet of `peer` (source of our ARP/ND probes to it).
    fn source_for(&self, peer: IpAddr) -> Option<IpAddr> {
        self.cfg
            .addresses
            .iter()
            .find(|a| a.contains(&peer))
            .map(|a| a.addr())
    }
}

/// The dispatcher as a state machine: frames in from its interfaces ([`Core::on_frame`]),
/// datagrams in from data planes ([`Core::on_backplane`]), the time given by the caller
/// ([`Core::set_now`]); frames out through the ports and datagrams out through the backplane
/// the caller passes (any [`FrameIo`], any [`BackplaneTx`]). It owns no socket and reads no
/// clock, so it runs in tests (`crate::conformance`) and benchmarks as it runs in the unit.
pub(crate) struct Core {
    cfg: Arc<DispatcherConfig>,
    /// The `dva monitor` session, if one runs: drops are reported to it (with no session,
    /// one branch per drop).
    monitor: Option<crate::monitor::Session>,
    links: Vec<Link>,
    routes: RouteTable,
    /// Per bucket: the owner's backplane address, resolved once per config instead of per packet.
    bucket_dst: Vec<SocketAddr>,
    bucket_mask: u32,
    epoch: u32,
    /// The data planes of the config: the only units whose packets leave the appliance.
    dataplane_ids: Vec<u32>,
    /// Data planes the manager failed over while they were silent: whatever they send is
    /// dropped until they have rejoined (see `DispatcherConfig::fenced`).
    fenced: Vec<u32>,
    drops: DropCounters<{ dr::NAMES.len() }>,
    events: HashMap<&'static str, u64>,
    to_dataplane: u64,
    from_dataplane: u64,
    /// Frames for interface `.0` produced while that interface's ring is borrowed.
    deferred: Vec<(usize, Vec<u8>)>,
    /// ICMP errors about masqueraded packets, to enter as if they had arrived on interface `.0`
    /// (see [`Core::too_big`]); taken after the backplane batch that made them.
    reinject: Vec<(usize, Vec<u8>)>,
    scratch: Vec<u8>,
    /// Segments of a super-packet being cut in software, and each with its Ethernet header.
    segments: Vec<u8>,
    framed: Vec<u8>,
    /// Super-packets (GSO/GRO) received whole from the interfaces.
    super_packets: u64,
    /// Super-packets handed to an interface whole, for the kernel to segment.
    super_packets_tx: u64,
    icmp_budget: reply::TokenBucket,
    now: Instant,
    /// NAT/LB source addresses: packets to them are bucketed by port.
    nat_sources: Vec<IpAddr>,
    vips: Vec<IpAddr>,
    dnat_reverse: Vec<dva_proto::role::DnatReverse>,
    health: health::HealthChecker,
    /// Incomplete datagrams: fragments are reassembled before their flow is hashed.
    reassembly: fragment::Reassembler,
    /// This lane's index among the dispatcher's lanes (0 alone: no lanes). Lane 0 runs the
    /// health checks.
    lane: u16,
    lanes: u16,
    /// What this lane learned or received for another lane during the turn (see [`lanes`]).
    lane_out: Vec<lanes::LaneMsg>,
}

/// A config [`Core::prepare`] resolved, for [`Core::commit`].
pub(crate) struct Ready {
    cfg: Arc<DispatcherConfig>,
    routes: RouteTable,
    bucket_dst: Vec<SocketAddr>,
    /// Per link, its service addresses.
    extra: Vec<Vec<IpAddr>>,
}

/// The io crate's name for the spec's driver.
fn driver_choice(d: DriverSpec) -> DriverChoice {
    match d {
        DriverSpec::Auto => DriverChoice::Auto,
        DriverSpec::AfXdp => DriverChoice::AfXdp,
        DriverSpec::AfPacket => DriverChoice::AfPacket,
    }
}

/// An interface: its driver, wrapped with a capture tap (`dva capture`).
type Port = Tapped<Device>;

/// How long a busy-polling dispatcher keeps spinning after its last packet.
const BUSY_IDLE: Duration = Duration::from_millis(1);

pub struct Dispatcher {
    busy_poll: bool,
    ports: Vec<Port>,
    backplane: Backplane,
    core: Core,
    /// The other lanes of this dispatcher, if it has several.
    lane_io: Option<lanes::LaneIo>,
}

impl Dispatcher {
    /// Open the interfaces and the backplane socket. Runs inside the dispatcher host's namespace.
    /// `rings`: the directory for shared-memory rings to data planes on this machine (`None`:
    /// UDP to every data plane). One lane: see [`Dispatcher::open`] for several.
    pub fn new(
        cfg: DispatcherConfig,
        rings: Option<&std::path::Path>,
    ) -> anyhow::Result<Dispatcher> {
        let mut cfg = cfg;
        cfg.runtime.dispatcher_threads = 1;
        let mut lanes = Dispatcher::open(cfg, rings)?;
        lanes.pop().context("no lane opened")
    }

    /// Open the dispatcher's `runtime.dispatcher_threads` lanes: every interface opened once per
    /// lane, each lane's sockets taking their share of its frames (`Device::open_lanes`), and a
    /// backplane socket per lane at the dispatcher's port + its index.
    pub fn open(
        cfg: DispatcherConfig,
        rings: Option<&std::path::Path>,
    ) -> anyhow::Result<Vec<Dispatcher>> {
        let cfg = Arc::new(cfg);
        let n = cfg.runtime.dispatcher_threads.max(1);
        let choice = driver_choice(cfg.runtime.driver);
        let busy_poll = cfg.runtime.busy_poll_us;
        // ports[lane][interface], links likewise.
        let mut ports: Vec<Vec<Tapped<Device>>> = (0..n).map(|_| Vec::new()).collect();
        let mut links: Vec<Vec<Link>> = (0..n).map(|_| Vec::new()).collect();
        for ifc in &cfg.interfaces {
            let (opened_ports, opened) =
                Device::open_lanes(&ifc.device, choice, busy_poll, usize::from(n)).with_context(
                    || {
                        format!(
                            "opening interface {} (device {}, driver {choice:?}, {n} lane(s))",
                            ifc.name, ifc.device
                        )
                    },
                )?;
            if opened_ports.len() != usize::from(n) {
                bail!(
                    "interface {} opened {} lanes of {n}",
                    ifc.name,
                    opened_ports.len()
                );
            }
            tracing::info!(
                interface = %ifc.name,
                device = %ifc.device,
                driver = %opened,
                lanes = n,
                "interface opened"
            );
            let mac = dva_io::netif::mac_address(&ifc.device)
                .with_context(|| format!("MAC address of {}", ifc.device))?;
            let mtu = dva_io::netif::mtu(&ifc.device).unwrap_or(1500) as usize;
            for (lane, port) in opened_ports.into_iter().enumerate() {
                let driver = port.driver().to_string();
                ports[lane].push(Tapped::new(port));
                links[lane].push(Link {
                    cfg: ifc.clone(),
                    extra: Vec::new(),
                    mac: EthernetAddress(mac),
                    mtu,
                    neigh: NeighborTable::default(),
                    stats: InterfaceStats {
                        name: ifc.name.clone(),
                        device: ifc.device.clone(),
                        driver,
                        ..Default::default()
                    },
                });
            }
        }
        cfg.backplane.check().map_err(anyhow::Error::msg)?;
        let now = Instant::now();
        let mut out = Vec::new();
        // Several lanes can reach each other (neighbours, probe answers); one needs no inbox.
        let mut meshes = lanes::LaneIo::mesh(usize::from(n)).into_iter();
        for (lane, (ports, links)) in (0..n).zip(ports.into_iter().zip(links)) {
            let listen = dva_proto::role::lane_addr(cfg.listen, lane)
                .with_context(|| format!("lane {lane}: no port above {}", cfg.listen))?;
            let mut backplane = Backplane::bind(listen)
                .with_context(|| format!("binding the backplane socket {listen}"))?;
            if let Some(dir) = rings {
                backplane
                    .enable_rings(dir, listen, true, true)
                    .with_context(|| format!("backplane rings in {}", dir.display()))?;
                backplane
                    .accept_rings_from(&ring_peers(&cfg))
                    .with_context(|| format!("backplane rings in {}", dir.display()))?;
            }
            // Each lane seals with its own count, as a sender of its own (the unit id with the
            // lane in its top bits): receivers keep a replay window per sender.
            backplane
                .set_auth(
                    dva_io::seal::lane_sender(cfg.unit, lane),
                    cfg.backplane.send_epoch,
                    &epoch_keys(&cfg.backplane),
                )
                .map_err(anyhow::Error::msg)?;
            let core = Core::new(cfg.clone(), links, now, lane, n)?;
            out.push(Dispatcher {
                busy_poll: busy_poll > 0,
                ports,
                backplane,
                core,
                lane_io: meshes.next().filter(|_| n > 1),
            });
        }
        Ok(out)
    }

    /// Answer an inspection request from the control socket.
    fn inspect(&mut self, r: Request) {
        match r {
            Request::Flows { reply, .. } => {
                let _ = reply.try_send(Err(format!(
                    "unit {} is a dispatcher: it keeps no connection state (ask a data plane)",
                    self.core.cfg.unit
                )));
            }
            Request::Config { reply } => {
                let cfg = RoleConfig::Dispatcher((*self.core.cfg).clone());
                let _ = reply.try_send(cfg.redacted_json());
            }
            Request::Monitor { session, reply } => {
                // One session at a time: a newer one replaces it (its stream sees the queue close).
                self.core.monitor = Some(session);
                let _ = reply.try_send(Ok(()));
            }
            Request::Capture {
                interface,
                tap,
                reply,
            } => {
                // One session at a time: a new one replaces the running one, wherever it tapped
                // (its consumer then sees its queue close).
                for p in &mut self.ports {
                    p.set_tap(None);
                }
                self.backplane.set_tap(None);
                let links = &self.core.links;
                let answer = match interface.as_deref() {
                    Some(BACKPLANE) => {
                        self.backplane.set_tap(Some(tap));
                        Ok(BACKPLANE.to_string())
                    }
                    name => match links
                        .iter()
                        .position(|l| name.is_none_or(|n| l.cfg.name == n))
                    {
                        Some(i) => {
                            self.ports[i].set_tap(Some(tap));
                            Ok(links[i].cfg.name.clone())
                        }
                        None => Err(format!(
                            "dispatcher {} has no interface {:?} (it has {}, and {BACKPLANE})",
                            self.core.cfg.unit,
                            name.unwrap_or(""),
                            links
                                .iter()
                                .map(|l| l.cfg.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )),
                    },
                };
                let _ = reply.try_send(answer);
            }
        }
    }
}

impl crate::lanes::Lane for Dispatcher {
    /// The data-path loop. Returns when `stop` is set.
    fn run(
        &mut self,
        stop: &AtomicBool,
        stats: &StatsCell,
        updates: &Receiver<Update>,
        requests: &Requests,
    ) -> anyhow::Result<()> {
        let mut fds: Vec<_> = self.ports.iter().flat_map(|p| p.poll_fds()).collect();
        fds.extend(self.backplane.poll_fds());
        let mut poller = dva_io::poll::Poller::new(&fds);
        let mut publish = Every::new(Duration::from_millis(100));
        let mut timers = Every::new(Duration::from_millis(200));
        let mut last_work = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let mut work = 0;
            self.core.set_now(Instant::now());
            // Config pushes are applied between batches: each packet sees one table or the next.
            while let Ok(u) = updates.try_recv() {
                let result = match u.config {
                    RoleConfig::Dispatcher(c) => {
                        let dps = ring_peers(&c);
                        let keys = epoch_keys(&c.backplane);
                        let me = dva_io::seal::lane_sender(c.unit, self.core.lane);
                        let epoch = c.backplane.send_epoch;
                        // All or nothing: everything that can refuse the config is done before
                        // anything changes (rings are made for new data planes before old ones
                        // go; the keys are checked first, so `set_auth` cannot refuse after).
                        c.backplane
                            .check()
                            .and_then(|()| dva_io::seal::Sealer::check_keys(epoch, &keys))
                            .and_then(|()| self.core.prepare(c))
                            .and_then(|ready| {
                                self.backplane
                                    .accept_rings_from(&dps)
                                    .map_err(|e| format!("backplane rings: {e}"))?;
                                self.backplane.set_auth(me, epoch, &keys)?;
                                self.core.commit(ready);
                                Ok(())
                            })
                    }
                    RoleConfig::Dataplane(_) => {
                        Err("this unit is a dispatcher; got a data-plane config".into())
                    }
                };
                let _ = u.reply.send(result);
            }
            // Inspection requests between batches too: one `try_recv` a turn when nobody asks.
            while let Ok(r) = requests.try_recv() {
                self.inspect(r);
            }
            let now = self.core.now;
            if self.core.monitor.as_ref().is_some_and(|m| m.over(now)) {
                self.core.monitor = None;
            }
            if let Some(io) = &self.lane_io {
                for msg in io.inbox() {
                    self.core.on_lane_msg(msg);
                }
            }
            work += self
                .core
                .receive_ports(&mut self.ports, &mut self.backplane);
            {
                let core = &mut self.core;
                let ports = &mut self.ports;
                // Ring records stay ours until the ports are flushed below: packets leave from
                // where the data planes put them.
                work += self
                    .backplane
                    .recv_batch_held(BATCH, |buf, from, held| {
                        if held {
                            core.on_backplane_held(buf, from, ports)
                        } else {
                            core.on_backplane(buf, from, ports)
                        }
                    })
                    .unwrap_or(0);
            }
            self.core.take_reinjected(&mut self.backplane);
            if !self.core.lane_out.is_empty() {
                let msgs = std::mem::take(&mut self.core.lane_out);
                match &self.lane_io {
                    Some(io) => io.send(self.core.lane, msgs),
                    None => drop(msgs),
                }
            }
            self.core.send_deferred(&mut self.ports);
            for p in &mut self.ports {
                let _ = p.flush();
                // What the kernel did not take yet is copied: the rings get their records back.
                p.detach();
            }
            self.backplane.release_rings();
            let _ = self.backplane.flush();
            let now = self.core.now;
            if timers.due(now) {
                self.core.tick(&mut self.ports);
            }
            if publish.due(now) {
                let rejected = self.backplane.auth_stats().rejected();
                self.core.drops.set(dr::BACKPLANE_AUTH, rejected);
                stats.try_publish(self.snapshot());
            }
            if work > 0 {
                last_work = now;
            }
            // Busy polling keeps spinning (each empty receive runs the device's NAPI poll)
            // until the interfaces have been quiet for a millisecond.
            let spinning = self.busy_poll && now.duration_since(last_work) < BUSY_IDLE;
            if work == 0 && !spinning {
                // Idle: sleep in poll(2) until a ring or the backplane has something (or a timer
                // is due); producers ring our doorbell only while we say we sleep.
                if self.backplane.prepare_sleep() {
                    let _ = poller.wait(20);
                }
                self.backplane.awake();
            }
        }
        stats.try_publish(self.snapshot());
        Ok(())
    }

    fn snapshot(&self) -> UnitStats {
        let mut st = self.core.snapshot();
        for (i, p) in self.ports.iter().enumerate() {
            if let Some(s) = st.interfaces.get_mut(i) {
                s.ring_drops = p.inner().rx_drops();
            }
        }
        let counters = &mut st.counters;
        counters.insert("backplane_tx_dropped".into(), self.backplane.tx_dropped());
        let rs = self.backplane.ring_stats();
        counters.insert("backplane_ring_rx".into(), rs.rx);
        counters.insert("backplane_ring_tx".into(), rs.tx);
        counters.insert("backplane_ring_fallback".into(), rs.tx_fallback);
        counters.insert("backplane_doorbells".into(), rs.doorbells);
        counters.insert("backplane_ring_waits".into(), rs.ring_waits);
        crate::keys::auth_counters(counters, &self.backplane.auth_stats());
        if let Some(io) = &self.lane_io {
            counters.insert("lane_messages_dropped".into(), io.dropped());
        }
        st
    }
}

impl Core {
    /// The core's stats (the unit adds its devices' and backplane's).
    pub(crate) fn snapshot(&self) -> UnitStats {
        let c = self;
        let interfaces: Vec<InterfaceStats> = c.links.iter().map(|l| l.stats.clone()).collect();
        let mut counters: std::collections::BTreeMap<String, u64> =
            c.events.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        counters.insert("to_dataplane".into(), c.to_dataplane);
        counters.insert("from_dataplane".into(), c.from_dataplane);
        counters.insert("super_packets_rx".into(), c.super_packets);
        counters.insert("super_packets_tx".into(), c.super_packets_tx);
        let neigh = |f: fn(&NeighborTable) -> u64| c.links.iter().map(|l| f(&l.neigh)).sum();
        counters.insert(
            "neighbor_overrides_refused".into(),
            neigh(|n| n.overrides_refused),
        );
        counters.insert("neighbor_table_full".into(), neigh(|n| n.table_full));
        UnitStats {
            appliance: c.cfg.appliance.clone(),
            unit: c.cfg.unit,
            role: "dispatcher".into(),
            config_version: c.cfg.version,
            rx_packets: interfaces.iter().map(|i| i.rx_frames).sum(),
            rx_bytes: interfaces.iter().map(|i| i.rx_bytes).sum(),
            tx_packets: interfaces.iter().map(|i| i.tx_frames).sum(),
            tx_bytes: interfaces.iter().map(|i| i.tx_bytes).sum(),
            drops: c.drops.to_map(),
            counters,
            interfaces,
            health: c
                .health
                .states()
                .into_iter()
                .map(
                    |(service, backend, up, error)| dva_proto::channel::BackendHealth {
                        service,
                        backend,
                        up,
                        error,
                    },
                )
                .collect(),
            ..Default::default()
        }
    }
}

/// The data planes, which send to us through rings on this machine: a ring per lane (each of
/// a data plane's threads is a producer of its own).
fn ring_peers(cfg: &DispatcherConfig) -> Vec<(u32, SocketAddr)> {
    cfg.dataplanes
        .iter()
        .flat_map(|d| {
            (0..cfg.runtime.dataplane_threads.max(1))
                .filter_map(move |i| dva_proto::role::lane_addr(d.addr, i).map(|a| (d.id, a)))
        })
        .collect()
}

impl Core {
    /// A dispatcher taking its first config at `now`, with one link per configured interface.
    fn new(
        cfg: Arc<DispatcherConfig>,
        links: Vec<Link>,
        now: Instant,
        lane: u16,
        lanes: u16,
    ) -> anyhow::Result<Core> {
        let mut core = Core {
            cfg: cfg.clone(),
            links,
            routes: RouteTable::default(),
            bucket_dst: Vec::new(),
            bucket_mask: 0,
            epoch: 0,
            dataplane_ids: Vec::new(),
            fenced: Vec::new(),
            drops: DropCounters::new(dr::NAMES),
            events: HashMap::new(),
            to_dataplane: 0,
            from_dataplane: 0,
            deferred: Vec::new(),
            reinject: Vec::new(),
            scratch: Vec::with_capacity(16 * 1024),
            segments: Vec::new(),
            framed: Vec::new(),
            super_packets: 0,
            super_packets_tx: 0,
            icmp_budget: reply::TokenBucket::new(1000.0, 100.0, now),
            now,
            nat_sources: Vec::new(),
            vips: Vec::new(),
            dnat_reverse: Vec::new(),
            health: health::HealthChecker::default(),
            reassembly: fragment::Reassembler::default(),
            monitor: None,
            lane,
            lanes,
            lane_out: Vec::new(),
        };
        let ready = core.prepare_config(cfg)?;
        core.commit_config(ready);
        Ok(core)
    }

    /// A dispatcher whose interfaces are not devices (tests, benchmarks): interface `i` has
    /// MAC and MTU `links[i]`.
    #[cfg(any(test, feature = "bench"))]
    pub(crate) fn with_links(
        cfg: Arc<DispatcherConfig>,
        links: &[(EthernetAddress, usize)],
        now: Instant,
    ) -> anyhow::Result<Core> {
        let links = cfg
            .interfaces
            .iter()
            .zip(links)
            .map(|(ifc, &(mac, mtu))| Link {
                cfg: ifc.clone(),
                extra: Vec::new(),
                mac,
                mtu,
                neigh: NeighborTable::default(),
                stats: InterfaceStats {
                    name: ifc.name.clone(),
                    device: ifc.device.clone(),
                    driver: "memory".into(),
                    ..Default::default()
                },
            })
            .collect();
        Core::new(cfg, links, now, 0, 1)
    }

    /// Everything a config needs resolved (per-bucket destinations, routes, service addresses),
    /// checked before anything changes. Fails if the bucket table names a data plane the
    /// config does not list.
    fn prepare_config(&self, cfg: Arc<DispatcherConfig>) -> anyhow::Result<Ready> {
        let addrs: HashMap<u32, SocketAddr> =
            cfg.dataplanes.iter().map(|d| (d.id, d.addr)).collect();
        let n = cfg.table.len();
        if n == 0 || !n.is_power_of_two() {
            bail!("bucket table has {n} buckets; need a power of two");
        }
        // A data plane on several threads serves bucket b on its lane b % lanes (its port + the
        // lane), where that bucket's flows live.
        let dp_lanes = cfg.runtime.dataplane_threads.max(1);
        let mut bucket_dst = Vec::with_capacity(n);
        for b in 0..n {
            let owner = cfg.table.owner(b as u16);
            let Some(a) = addrs.get(&owner) else {
                bail!("bucket {b} is owned by data plane {owner}, which the config does not list")
            };
            let lane = (b % usize::from(dp_lanes)) as u16;
            match dva_proto::role::lane_addr(*a, lane) {
                Some(a) => bucket_dst.push(a),
                None => bail!("data plane {owner} at {a} has no port for its lane {lane}"),
            }
        }
        if cfg.interfaces.len() != self.links.len() {
            bail!(
                "config has {} interfaces; this dispatcher drives {}",
                cfg.interfaces.len(),
                self.links.len()
            );
        }
        let extra = (0..self.links.len())
            .map(|i| {
                cfg.service_addrs
                    .iter()
                    .filter(|a| usize::from(a.interface) == i)
                    .map(|a| a.addr)
                    .collect()
            })
            .collect();
        Ok(Ready {
            routes: RouteTable::new(&cfg.interfaces, &cfg.routes),
            bucket_dst,
            extra,
            cfg,
        })
    }

    /// Take a config [`Core::prepare_config`] resolved; cannot fail.
    fn commit_config(&mut self, ready: Ready) {
        let Ready {
            cfg,
            routes,
            bucket_dst,
            extra,
        } = ready;
        self.routes = routes;
        self.bucket_mask = (bucket_dst.len() - 1) as u32;
        self.bucket_dst = bucket_dst;
        self.epoch = cfg.table.epoch() as u32;
        self.dataplane_ids = cfg.dataplanes.iter().map(|d| d.id).collect();
        self.fenced = cfg.fenced.clone();
        // Addresses may change: the links take the new ones.
        for ((l, extra), ifc) in self.links.iter_mut().zip(extra).zip(&cfg.interfaces) {
            l.extra = extra;
            l.cfg = ifc.clone();
        }
        self.nat_sources = cfg
            .service_addrs
            .iter()
            .filter(|a| a.nat_source)
            .map(|a| a.addr)
            .collect();
        self.vips = cfg
            .service_addrs
            .iter()
            .filter(|a| !a.nat_source)
            .map(|a| a.addr)
            .collect();
        self.dnat_reverse = cfg.dnat_reverse.clone();
        // One lane probes the backends: their answers are sent to it (see `on_local`).
        if self.lane == 0 {
            self.health.configure(&cfg.health_checks, self.now);
        }
        self.cfg = cfg;
    }

    /// The bucket of a packet addressed to a NAT/LB source address: the port the data plane
    /// chose maps to its flow's bucket (DESIGN.md §3). `None`: not such a packet.
    fn nat_bucket(&self, dst: IpAddr, c: &Classified) -> Option<u32> {
        if self.nat_sources.is_empty() || !self.nat_sources.contains(&dst) {
            return None;
        }
        if self.is_forwarded(dst, c) {
            // A port forward on a masquerade address: a new flow from outside, hashed like any
            // flow (its replies are hashed as the outside sees them, see `flow_bucket`).
            return None;
        }
        let port = match (c.key.proto, c.icmp, &c.icmp_inner) {
            // Errors quote the packet we sent: its source port is the one we chose.
            (_, Some(_), Some(inner)) if inner.src == dst => inner.src_port,
            (ip_proto::ICMP, Some((0, _)), _) | (ip_proto::ICMPV6, Some((129, _)), _) => {
                c.key.dst_port
            }
            (ip_proto::ICMP, _, _) | (ip_proto::ICMPV6, _, _) => return None,
            _ if health::HealthChecker::is_probe_port(c.key.dst_port) => return None,
            _ => c.key.dst_port,
        };
        Some(u32::from(port) & self.bucket_mask)
    }

    /// A packet no route could ever take out, dropped on arrival (as the kernel's
    /// `InNoRoutes`): no data plane work and no backplane crossing both ways for it. Under a SYN
    /// flood from spoofed sources the server answers every SYN, and these answers were half the
    /// dispatcher's work. Addresses the data planes rewrite (ours, a VIP, a port forward's
    /// public side) are not judged by their destination here.
    fn unroutable(&self, dst: IpAddr, c: &Classified) -> bool {
        !self.is_local(dst) && !self.is_forwarded(dst, c) && self.routes.lookup(dst).is_none()
    }

    /// Whether a packet to `dst` hits a port forward (the public side of a DNAT rule).
    fn is_forwarded(&self, dst: IpAddr, c: &Classified) -> bool {
        self.dnat_reverse.iter().any(|r| {
            r.public == dst
                && r.proto == c.key.proto
                && c.key.dst_port >= r.public_first
                && c.key.dst_port - r.public_first <= r.inside_last - r.inside_first
        })
    }

    /// The flow-hash bucket, seeing a port-forwarding target's packets as the outside saw them.
    #[inline]
    fn flow_bucket(&self, c: &Classified) -> u32 {
        let key = c.bucket_key();
        if !self.dnat_reverse.is_empty() {
            for r in &self.dnat_reverse {
                if key.proto == r.proto
                    && key.src == r.inside
                    && (r.inside_first..=r.inside_last).contains(&key.src_port)
                {
                    let mut k = *key;
                    k.src = r.public;
                    k.src_port = r.public_first + (key.src_port - r.inside_first);
                    return k.symmetric_hash() & self.bucket_mask;
                }
            }
        }
        key.symmetric_hash() & self.bucket_mask
    }

    /// First half of a config transaction: everything that can refuse `cfg`, with nothing
    /// changed. Interfaces and the backplane socket are opened once, at start, with the runtime
    /// (driver, busy polling, rings) of the first config: a config that changes them is refused
    /// (NACK) and the running one stays.
    pub(crate) fn prepare(&self, cfg: DispatcherConfig) -> Result<Ready, String> {
        self.cfg.runtime.unchanged(&cfg.runtime)?;
        if cfg.listen != self.cfg.listen {
            return Err(format!(
                "backplane address {} cannot change at run time (this unit listens on {})",
                cfg.listen, self.cfg.listen
            ));
        }
        if cfg.interfaces.len() != self.links.len()
            || cfg
                .interfaces
                .iter()
                .zip(&self.links)
                .any(|(a, l)| a.device != l.cfg.device)
        {
            return Err("interfaces (devices) cannot change at run time".into());
        }
        self.prepare_config(Arc::new(cfg))
            .map_err(|e| format!("{e:#}"))
    }

    /// Second half of a config transaction.
    pub(crate) fn commit(&mut self, ready: Ready) {
        self.commit_config(ready)
    }

    /// The clock, as the caller read it: the core reads none.
    pub(crate) fn set_now(&mut self, now: Instant) {
        self.now = now;
    }

    /// One batch from each interface, frames through [`Core::on_frame`]. Returns how many.
    pub(crate) fn receive_ports(
        &mut self,
        ports: &mut [impl FrameIo],
        bp: &mut impl BackplaneTx,
    ) -> usize {
        let mut work = 0;
        for (i, port) in ports.iter_mut().enumerate() {
            work += port
                .rx_batch(BATCH, |frame, meta| self.on_frame(i, frame, meta, bp))
                .unwrap_or(0);
        }
        work
    }

    #[inline]
    fn drop(&mut self, reason: usize) {
        self.drops.inc(reason);
        if self.monitor.is_some() {
            self.report_drop(reason, None);
        }
    }

    /// A drop of a parsed packet: reported with its tuple and the interface it came in on.
    #[inline]
    fn drop_flow(&mut self, reason: usize, key: &dva_flow::FlowKey, i: usize) {
        self.drops.inc(reason);
        if self.monitor.is_some() {
            self.report_drop(reason, Some((key, i)));
        }
    }

    /// Most dispatcher drops happen before the packet is parsed far enough for a tuple, so
    /// most events carry only the reason (`dva monitor` shows them with an empty filter).
    #[cold]
    #[inline(never)]
    fn report_drop(&mut self, reason: usize, at: Option<(&dva_flow::FlowKey, usize)>) {
        use crate::monitor::{EventType, MonitorEvent};
        let key = at.map(|(k, _)| *k);
        let Some(m) = self.monitor.as_mut() else {
            return;
        };
        if !m.wants_drop(key.as_ref()) {
            return;
        }
        let (unit, links) = (self.cfg.unit, &self.links);
        let alive = m.offer(self.now, || MonitorEvent {
            reason: dr::NAMES.get(reason).map(|n| n.to_string()),
            interface: at
                .and_then(|(_, i)| links.get(i))
                .map(|l| l.cfg.name.clone()),
            ..MonitorEvent::new(EventType::Drop, unit, key.as_ref())
        });
        if !alive {
            self.monitor = None;
        }
    }

    fn event(&mut self, name: &'static str) {
        *self.events.entry(name).or_insert(0) += 1;
    }

    fn is_local(&self, ip: IpAddr) -> bool {
        self.links.iter().any(|l| l.owns(ip))
    }

    /// The drop reason for a packet from `src` to `dst` no host may send: a martian source, or
    /// one of our interfaces' addresses (the kernel's "local source" martian: a spoof, or a
    /// loop).
    fn bad_source(&self, src: IpAddr, dst: IpAddr) -> Option<usize> {
        if hygiene::martian_source(src, dst) {
            return Some(dr::MARTIAN_SOURCE);
        }
        let own = self
            .links
            .iter()
            .any(|l| l.cfg.addresses.iter().any(|a| a.addr() == src));
        own.then_some(dr::OWN_SOURCE)
    }

    /// Judge the TCP/UDP checksum before anything acts on the segment. `Some(meta)`: go on,
    /// with a partial checksum found under `csum_unknown` now flagged `csum_not_ready`.
    fn checked_l4(&mut self, ip: &[u8], c: &Classified, meta: RxMeta) -> Option<RxMeta> {
        match hygiene::l4_checksum(ip, c, &meta) {
            L4Checksum::Bad => {
                self.drop(dr::BAD_L4_CHECKSUM);
                None
            }
            L4Checksum::Partial if !meta.csum_not_ready && meta.csum_unknown => {
                // A veth peer left it partial and AF_XDP could not say so: finish it on the
                // way out.
                self.event("partial_checksums_found");
                Some(RxMeta {
                    csum_not_ready: true,
                    ..meta
                })
            }
            L4Checksum::Partial | L4Checksum::Good => Some(meta),
        }
    }

    pub(crate) fn on_frame(
        &mut self,
        i: usize,
        frame: &[u8],
        meta: RxMeta,
        bp: &mut impl BackplaneTx,
    ) {
        let link = &mut self.links[i];
        link.stats.rx_frames += 1;
        link.stats.rx_bytes += frame.len() as u64;
        if meta.truncated {
            return self.drop(dr::OVERSIZE);
        }
        let Ok((l3, etype)) = dva_wire::ethernet::l3_offset(frame) else {
            return self.drop(dr::MALFORMED_ETHERNET);
        };
        // A tag the kernel moved into the packet's metadata (rx VLAN offload) counts too.
        if l3 != EthernetFrame::<&[u8]>::HEADER_LEN || meta.vlan_tci.is_some() {
            return self.drop(dr::VLAN);
        }
        let eth = EthernetFrame::new_unchecked(frame);
        let (dst, src_mac) = (eth.dst_addr(), eth.src_addr());
        let to_us = dst == link.mac;
        if !to_us && !dst.is_broadcast() && !dst.is_multicast() {
            return self.drop(dr::NOT_FOR_US);
        }
        let payload = &frame[l3..];
        match etype {
            ethertype::ARP => self.on_arp(i, payload),
            ethertype::IPV4 => self.on_ipv4(i, src_mac, to_us, payload, meta, bp),
            ethertype::IPV6 => self.on_ipv6(i, src_mac, to_us, payload, meta, bp),
            _ => self.drop(dr::UNSUPPORTED_ETHERTYPE),
        }
    }

    fn on_arp(&mut self, i: usize, payload: &[u8]) {
        let Ok(pkt) = ArpPacket::new_checked(payload) else {
            return self.drop(dr::MALFORMED_ARP);
        };
        let Ok(arp) = ArpRepr::parse(&pkt) else {
            return self.drop(dr::MALFORMED_ARP);
        };
        let now = self.now;
        let link = &mut self.links[i];
        let sender = IpAddr::V4(arp.source_protocol_addr);
        // Learn only neighbours on our subnets, and never from address probes (sender 0.0.0.0).
        if link.on_link(sender) && !arp.source_protocol_addr.is_unspecified() && !link.owns(sender)
        {
            let mac = arp.source_hardware_addr;
            for mut f in link.neigh.learn(sender, mac, now) {
                f[0..6].copy_from_slice(&mac.0);
                self.deferred.push((i, f));
            }
            self.tell_lanes(i, sender, mac);
        }
        let link = &self.links[i];
        if arp.operation == ArpOperation::Request && link.owns(IpAddr::V4(arp.target_protocol_addr))
        {
            let mut f = Vec::with_capacity(60);
            reply::ethernet(&mut f, arp.source_hardware_addr, link.mac, ethertype::ARP);
            reply::arp(
                &mut f,
                2,
                link.mac,
                arp.target_protocol_addr,
                arp.source_hardware_addr,
                arp.source_protocol_addr,
            );
            f.resize(60, 0);
            self.deferred.push((i, f));
            self.event("arp_replies");
        }
    }

    fn on_ipv4(
        &mut self,
        i: usize,
        src_mac: EthernetAddress,
        to_us: bool,
        ip: &[u8],
        meta: RxMeta,
        bp: &mut impl BackplaneTx,
    ) {
        let Ok(pkt) = Ipv4Packet::new_checked(ip) else {
            return self.drop(dr::MALFORMED_IP);
        };
        if pkt.version() != 4 {
            return self.drop(dr::MALFORMED_IP);
        }
        if !pkt.verify_checksum() {
            return self.drop(dr::BAD_IP_CHECKSUM);
        }
        let ip = &ip[..usize::from(pkt.total_len())];
        let dst = IpAddr::V4(pkt.dst_addr());
        if let Some(reason) = self.bad_source(IpAddr::V4(pkt.src_addr()), dst) {
            return self.drop(reason);
        }
        match pkt.check_options() {
            Ok(()) => {}
            Err(OptionsError::SourceRoute) => return self.drop(dr::SOURCE_ROUTE),
            Err(OptionsError::Malformed) => return self.drop(dr::MALFORMED_IP_OPTIONS),
        }
        if pkt.is_fragment() {
            if let Some(whole) = self.reassemble(ip) {
                self.on_ipv4_datagram(i, src_mac, to_us, &whole, RxMeta::default(), bp);
            }
            return;
        }
        self.on_ipv4_datagram(i, src_mac, to_us, ip, meta, bp);
    }

    /// A whole IPv4 datagram (received so, or reassembled), its header checked.
    fn on_ipv4_datagram(
        &mut self,
        i: usize,
        src_mac: EthernetAddress,
        to_us: bool,
        ip: &[u8],
        meta: RxMeta,
        bp: &mut impl BackplaneTx,
    ) {
        let pkt = Ipv4Packet::new_unchecked(ip);
        let dst = IpAddr::V4(pkt.dst_addr());
        let ttl = pkt.hop_limit();
        let Ok(c) = classify(ip) else {
            return self.drop(dr::MALFORMED_L4);
        };
        let Some(meta) = self.checked_l4(ip, &c, meta) else {
            return;
        };
        if let Some(bucket) = self.nat_bucket(dst, &c) {
            return self.send_to_dataplane(i, ip, &c, &meta, bp, Some(bucket));
        }
        if self.is_local(dst) && !self.is_vip_traffic(dst, &c) {
            return self.on_local(i, src_mac, ip, &c);
        }
        if !to_us || dst.is_multicast() || pkt.dst_addr().is_broadcast() {
            return self.drop(dr::MULTICAST);
        }
        if ttl <= 1 {
            self.drop(dr::TTL_EXCEEDED);
            return self.icmp_error(i, src_mac, ip, 11, 0);
        }
        if self.unroutable(dst, &c) {
            return self.drop(dr::NO_ROUTE);
        }
        self.send_to_dataplane(i, ip, &c, &meta, bp, None);
    }

    fn on_ipv6(
        &mut self,
        i: usize,
        src_mac: EthernetAddress,
        to_us: bool,
        ip: &[u8],
        meta: RxMeta,
        bp: &mut impl BackplaneTx,
    ) {
        let Ok(pkt) = Ipv6Packet::new_checked(ip) else {
            return self.drop(dr::MALFORMED_IP);
        };
        let ip = &ip[..Ipv6Packet::<&[u8]>::HEADER_LEN + usize::from(pkt.payload_len())];
        if fragment::Reassembler::is_fragment(ip) {
            if let Some(whole) = self.reassemble(ip) {
                self.on_ipv6_datagram(i, src_mac, to_us, &whole, RxMeta::default(), bp);
            }
            return;
        }
        self.on_ipv6_datagram(i, src_mac, to_us, ip, meta, bp);
    }

    /// Take a fragment; the whole datagram once it is complete.
    fn reassemble(&mut self, ip: &[u8]) -> Option<Vec<u8>> {
        match self.reassembly.insert(ip, self.now) {
            Ok(fragment::Reassembled::Held) => None,
            Ok(fragment::Reassembled::Complete(whole)) => {
                self.event("datagrams_reassembled");
                Some(whole)
            }
            Err(e) => {
                let k = dr::FRAGMENT_REASONS.iter().position(|r| *r == e);
                self.drop(dr::FRAGMENT_BASE + k.unwrap_or(0));
                None
            }
        }
    }

    /// A whole IPv6 datagram (received so, or reassembled).
    fn on_ipv6_datagram(
        &mut self,
        i: usize,
        src_mac: EthernetAddress,
        to_us: bool,
        ip: &[u8],
        meta: RxMeta,
        bp: &mut impl BackplaneTx,
    ) {
        let pkt = Ipv6Packet::new_unchecked(ip);
        let dst = IpAddr::V6(pkt.dst_addr());
        let hop_limit = pkt.hop_limit();
        let Ok(c) = classify(ip) else {
            return self.drop(dr::MALFORMED_L4);
        };
        if c.key.proto == ip_proto::ICMPV6 {
            if let Some((icmpv6_type::NEIGHBOR_SOLICIT | icmpv6_type::NEIGHBOR_ADVERT, _)) = c.icmp
            {
                return self.on_ndisc(i, ip, &c);
            }
        }
        if let Some(reason) = self.bad_source(c.key.src, dst) {
            return self.drop(reason);
        }
        let Some(meta) = self.checked_l4(ip, &c, meta) else {
            return;
        };
        if let Some(bucket) = self.nat_bucket(dst, &c) {
            return self.send_to_dataplane(i, ip, &c, &meta, bp, Some(bucket));
        }
        if self.is_local(dst) && !self.is_vip_traffic(dst, &c) {
            return self.on_local(i, src_mac, ip, &c);
        }
        if !to_us || dst.is_multicast() {
            return self.drop(dr::MULTICAST);
        }
        if hop_limit <= 1 {
            self.drop(dr::TTL_EXCEEDED);
            return self.icmp_error(i, src_mac, ip, 3, 0);
        }
        if self.unroutable(dst, &c) {
            return self.drop(dr::NO_ROUTE);
        }
        self.send_to_dataplane(i, ip, &c, &meta, bp, None);
    }

    /// Neighbour solicitation for one of our addresses: advertise; any NS/NA teaches us the sender.
    fn on_ndisc(&mut self, i: usize, ip: &[u8], c: &Classified) {
        let Some(msg) = ndisc_message(ip, c) else {
            return self.drop(dr::MALFORMED_L4);
        };
        let now = self.now;
        let IpAddr::V6(src) = c.key.src else {
            return;
        };
        // NS: the sender is src; NA: the advertised one is target.
        let (solicit, target, lladdr) = match msg {
            NdiscRepr::NeighborSolicit {
                target_addr,
                lladdr,
            } => (true, target_addr, lladdr),
            NdiscRepr::NeighborAdvert {
                target_addr,
                lladdr,
                ..
            } => (false, target_addr, lladdr),
        };
        let learned = IpAddr::V6(if solicit { src } else { target });
        if let Some(mac) = lladdr {
            let link = &mut self.links[i];
            if link.on_link(learned) && !src.is_unspecified() {
                for mut f in link.neigh.learn(learned, mac, now) {
                    f[0..6].copy_from_slice(&mac.0);
                    self.deferred.push((i, f));
                }
                self.tell_lanes(i, learned, mac);
            }
        }
        let link = &self.links[i];
        if solicit && link.owns(IpAddr::V6(target)) {
            let Some(mac) = lladdr else { return };
            if src.is_unspecified() {
                return; // duplicate address detection probe: not for us to answer
            }
            let mut f = Vec::with_capacity(86);
            reply::ethernet(&mut f, mac, link.mac, ethertype::IPV6);
            let advert = NdiscRepr::NeighborAdvert {
                flags: ndisc_flags::SOLICITED | ndisc_flags::OVERRIDE,
                target_addr: target,
                lladdr: Some(link.mac),
            };
            reply::ndisc(&mut f, target, src, &advert);
            self.deferred.push((i, f));
            self.event("nd_advertisements");
        }
    }

    /// Traffic addressed to the appliance itself: answer pings, count the rest.
    /// Traffic to a VIP goes to the data planes (only pings to it are answered here).
    fn is_vip_traffic(&self, dst: IpAddr, c: &Classified) -> bool {
        (self.vips.contains(&dst) || self.is_forwarded(dst, c))
            && !matches!(
                (c.key.proto, c.icmp),
                (ip_proto::ICMP, Some((8, 0))) | (ip_proto::ICMPV6, Some((128, 0)))
            )
    }

    fn on_local(&mut self, i: usize, src_mac: EthernetAddress, ip: &[u8], c: &Classified) {
        if c.key.proto == ip_proto::TCP && health::HealthChecker::is_probe_port(c.key.dst_port) {
            if self.lane != 0 {
                // The flow hash put a backend's answer on this lane; lane 0 sent the probe.
                self.lane_out.push(lanes::LaneMsg::Probe {
                    interface: i,
                    src_mac,
                    ip: ip.to_vec(),
                });
                return;
            }
            if let Some(answer) = self.health.on_segment(ip, c) {
                let link = &self.links[i];
                let etype = if c.is_v6() {
                    ethertype::IPV6
                } else {
                    ethertype::IPV4
                };
                let mut f = Vec::with_capacity(answer.len() + 14);
                reply::ethernet(&mut f, src_mac, link.mac, etype);
                f.extend_from_slice(&answer);
                if f.len() < 60 {
                    f.resize(60, 0);
                }
                self.deferred.push((i, f));
            }
            for msg in self.health.take_changes() {
                tracing::info!("{msg}");
            }
            return;
        }
        let echo = matches!(
            (c.key.proto, c.icmp),
            (ip_proto::ICMP, Some((8, 0))) | (ip_proto::ICMPV6, Some((128, 0)))
        );
        if !echo {
            return self.drop_flow(dr::TO_APPLIANCE, &c.key, i);
        }
        let link = &self.links[i];
        let etype = if c.is_v6() {
            ethertype::IPV6
        } else {
            ethertype::IPV4
        };
        let mut f = Vec::with_capacity(ip.len() + 14);
        reply::ethernet(&mut f, src_mac, link.mac, etype);
        if reply::echo_reply(&mut f, ip, c).is_some() {
            self.deferred.push((i, f));
            self.event("echo_replies");
        } else {
            self.drop(dr::MALFORMED_L4);
        }
    }

    /// An ICMP error from the ingress interface's address, straight back to the sender's MAC.
    fn icmp_error(&mut self, i: usize, to_mac: EthernetAddress, ip: &[u8], typ: u8, code: u8) {
        if !self.icmp_budget.take(self.now) {
            return self.drop(dr::ICMP_RATE_LIMITED);
        }
        let link = &self.links[i];
        let v6 = ip.first().map(|b| b >> 4) == Some(6);
        let Some(src) = link.cfg.address(!v6) else {
            return;
        };
        let mut f = Vec::with_capacity(600);
        match src {
            IpAddr::V4(s) => {
                reply::ethernet(&mut f, to_mac, link.mac, ethertype::IPV4);
                if reply::icmpv4_error(&mut f, ip, s, typ, code).is_none() {
                    return;
                }
            }
            IpAddr::V6(s) => {
                reply::ethernet(&mut f, to_mac, link.mac, ethertype::IPV6);
                if reply::icmpv6_error(&mut f, ip, s, typ, code, 0).is_none() {
                    return;
                }
            }
        }
        self.deferred.push((i, f));
        self.event("icmp_errors_sent");
    }

    /// Encapsulate one packet to its bucket's data plane, writing straight into the send batch.
    /// A partial checksum stays partial and a super-packet whole (see [`crate::offload`]).
    #[inline]
    fn send_to_dataplane(
        &mut self,
        i: usize,
        ip: &[u8],
        c: &Classified,
        rx: &RxMeta,
        bp: &mut impl BackplaneTx,
        bucket: Option<u32>,
    ) {
        let bucket = bucket.unwrap_or_else(|| self.flow_bucket(c));
        let dst = self.bucket_dst[bucket as usize];
        let mut meta = DvaMeta {
            epoch: self.epoch,
            bucket: bucket as u16,
            hops: 0,
            flags: 0,
            ingress_if: i as u8,
            egress_if: 0,
            gso_size: 0,
        };
        let offloadable = offload::offloadable(c);
        match rx.offload.gso {
            GsoType::None => {}
            GsoType::TcpV4 | GsoType::TcpV6 | GsoType::UdpL4
                if offloadable && rx.offload.gso_size > 0 =>
            {
                meta.gso_size = rx.offload.gso_size;
                // Whatever the sender left in the field, it is rewritten on the way out.
                meta.flags |= dva_flags::CSUM_PARTIAL;
                self.super_packets += 1;
            }
            _ => return self.drop(dr::GSO_UNSUPPORTED),
        }
        let mut completed = false;
        // (A partial checksum under `csum_unknown` was found by `checked_l4`.)
        if rx.csum_not_ready {
            if offloadable {
                meta.flags |= dva_flags::CSUM_PARTIAL;
            } else {
                completed = true;
            }
        }
        let total = DVA_HEADER_LEN + ip.len();
        let ptype = if c.is_v6() {
            geneve::PROTO_IPV6
        } else {
            geneve::PROTO_IPV4
        };
        let vni = self.cfg.vni;
        let mut checksummed = false;
        // Built once, where it goes: straight in the data plane's ring on this machine.
        let whole = bp.send_with(total, dst, |d| {
            geneve::encap_dva(d, vni, ptype, &meta);
            d[DVA_HEADER_LEN..].copy_from_slice(ip);
            checksummed = completed && reply::complete_l4_checksum(&mut d[DVA_HEADER_LEN..], c);
        });
        if whole {
            if checksummed {
                self.event("checksums_completed");
            }
            self.to_dataplane += 1;
            return;
        }
        if meta.gso_size == 0 {
            return self.drop(if bp.tx_slot().is_none() {
                dr::BACKPLANE_TX_FULL
            } else {
                dr::OVERSIZE
            });
        }
        // A super-packet no path takes whole (no ring, or a full one): cut here.
        let mut scratch = std::mem::take(&mut self.segments);
        let sent = offload::encap_send(bp, self.cfg.vni, dst, &meta, ip, &mut scratch);
        self.segments = scratch;
        match sent {
            offload::Sent::Whole => self.to_dataplane += 1,
            offload::Sent::Segmented(n) => {
                self.to_dataplane += n as u64;
                self.event("super_packets_segmented");
            }
            offload::Sent::Failed => self.drop(dr::OVERSIZE),
        }
    }

    /// A processed packet from a data plane, to send out. `from` authenticated it (the
    /// backplane delivers nothing else); a unit that is not a data plane of this appliance
    /// (another dispatcher, a stale unit) never gets a packet out of its interfaces.
    pub(crate) fn on_backplane(&mut self, buf: &[u8], from: Origin, ports: &mut [impl FrameIo]) {
        if let Some((meta, off)) = self.check_from_dataplane(buf, from) {
            self.forward(Frame::Copy(&buf[off..]), &meta, ports);
        }
    }

    /// As [`Core::on_backplane`], for a datagram that stays where it is (a backplane ring's
    /// record) until the run loop's ports are flushed and detached: the packet leaves from
    /// there, its Ethernet header written over its GENEVE header, not copied.
    pub(crate) fn on_backplane_held(
        &mut self,
        buf: &mut [u8],
        from: Origin,
        ports: &mut [impl FrameIo],
    ) {
        if let Some((meta, off)) = self.check_from_dataplane(buf, from) {
            self.forward(Frame::InPlace(buf, off), &meta, ports);
        }
    }

    /// The checks of a datagram from a data plane: its header, if it may leave.
    fn check_from_dataplane(&mut self, buf: &[u8], from: Origin) -> Option<(DvaMeta, usize)> {
        if !self.dataplane_ids.contains(&from.unit) {
            self.drop(dr::BACKPLANE_FOREIGN);
            return None;
        }
        // Its buckets are served by others now: a packet it still processed (it may be cut off
        // from the manager, not from us) must not leave beside theirs.
        if self.fenced.contains(&from.unit) {
            self.drop(dr::FENCED);
            return None;
        }
        let Ok((vni, _ptype, meta, off)) = geneve::decap_dva(buf) else {
            self.drop(dr::MALFORMED_GENEVE);
            return None;
        };
        if vni != self.cfg.vni {
            self.drop(dr::WRONG_VNI);
            return None;
        }
        self.from_dataplane += 1;
        Some((meta, off))
    }

    /// Route a processed packet out of the appliance: next hop, TTL, MAC rewrite, neighbour resolution.
    fn forward(&mut self, frame: Frame<'_>, meta: &DvaMeta, ports: &mut [impl FrameIo]) {
        let ip: &[u8] = match &frame {
            Frame::Copy(ip) => ip,
            Frame::InPlace(buf, off) => &buf[*off..],
        };
        let (dst, ttl, len, etype) = match ip.first().map(|b| b >> 4) {
            Some(4) => match Ipv4Packet::new_checked(ip) {
                Ok(p) => (
                    IpAddr::V4(p.dst_addr()),
                    p.hop_limit(),
                    usize::from(p.total_len()),
                    ethertype::IPV4,
                ),
                Err(_) => return self.drop(dr::MALFORMED_IP),
            },
            Some(6) => match Ipv6Packet::new_checked(ip) {
                Ok(p) => (
                    IpAddr::V6(p.dst_addr()),
                    p.hop_limit(),
                    Ipv6Packet::<&[u8]>::HEADER_LEN + usize::from(p.payload_len()),
                    ethertype::IPV6,
                ),
                Err(_) => return self.drop(dr::MALFORMED_IP),
            },
            _ => return self.drop(dr::MALFORMED_IP),
        };
        let Some(nh) = self.routes.lookup(dst) else {
            return self.drop(dr::NO_ROUTE);
        };
        if ttl <= 1 {
            return self.drop(dr::TTL_EXCEEDED);
        }
        let e = usize::from(nh.interface);
        let Some(mtu) = self.links.get(e).map(|l| l.mtu) else {
            return self.drop(dr::NO_ROUTE);
        };
        // Offload work (a partial checksum, a super-packet) needs the L4 header's place.
        let offload = meta.gso_size > 0 || meta.flags & dva_flags::CSUM_PARTIAL != 0;
        if etype == ethertype::IPV6 && !offload {
            // A datagram we reassembled (it kept an atomic fragment header): whole, or cut to
            // this link as its sender allowed.
            let mut pieces = Vec::new();
            if fragment::egress_v6(&ip[..len], mtu, &mut pieces).is_some() {
                if pieces.len() > 1 {
                    self.event("datagrams_fragmented");
                }
                for p in pieces {
                    self.transmit(e, nh.addr, &p, etype, None, meta, ports);
                }
                return;
            }
        }
        let c = if offload {
            match classify(&ip[..len]) {
                Ok(c) if offload::offloadable(&c) => Some(c),
                _ => return self.drop(dr::MALFORMED_L4),
            }
        } else {
            None
        };
        // A super-packet leaves as segments: each of them must fit the link.
        let wire_len = match (&c, meta.gso_size) {
            (Some(c), gso @ 1..) => match segment_header_len(&ip[..len], c) {
                Some(h) => len.min(h + usize::from(gso)),
                None => return self.drop(dr::MALFORMED_L4),
            },
            _ => len,
        };
        if wire_len > mtu {
            return self.too_big(e, nh.addr, &ip[..len], mtu, c.is_some(), ports);
        }
        match frame {
            Frame::InPlace(buf, off) => {
                if !self.transmit_in_place(
                    e,
                    nh.addr,
                    buf,
                    off,
                    len,
                    etype,
                    c.as_ref(),
                    meta,
                    ports,
                ) {
                    self.transmit(e, nh.addr, &buf[off..off + len], etype, c, meta, ports);
                }
            }
            Frame::Copy(ip) => self.transmit(e, nh.addr, &ip[..len], etype, c, meta, ports),
        }
    }

    /// Send `buf[off..off + len]` from where it lies (see [`Core::on_backplane_held`]): the
    /// usual case of a packet back from a data plane on this machine, on a driver that can
    /// (AF_PACKET), to a known neighbour. False: it cannot, and [`Core::transmit`] copies it.
    #[allow(clippy::too_many_arguments)]
    fn transmit_in_place(
        &mut self,
        e: usize,
        nh: IpAddr,
        buf: &mut [u8],
        off: usize,
        len: usize,
        etype: u16,
        c: Option<&Classified>,
        meta: &DvaMeta,
        ports: &mut [impl FrameIo],
    ) -> bool {
        let Some(room) = ports[e].headroom() else {
            return false;
        };
        // The Ethernet header and the driver's go where the GENEVE header was; a frame short
        // of the Ethernet minimum would need padding past the packet.
        if off < 14 + room || 14 + len < 60 || buf.len() < off + len {
            return false;
        }
        if c.is_some() && !ports[e].offloads() {
            return false;
        }
        let link = &self.links[e];
        let Some(mac) = link.neigh.lookup(&nh, self.now) else {
            return false;
        };
        let src = link.mac;
        let sent = match finish_frame(&mut buf[off - 14..off + len], mac, src, etype, c, meta) {
            // SAFETY: `buf` is a backplane ring's record, which the run loop gives back to its
            // producer only after flushing the ports and detaching what they still queue.
            Some(offload) => unsafe {
                ports[e].tx_borrowed(&mut buf[..off + len], off - 14, &offload)
            },
            None => Err(std::io::ErrorKind::InvalidData.into()),
        };
        self.count_tx(e, sent, 14 + len, c.is_some() && meta.gso_size > 0);
        true
    }

    /// Account for a frame handed to interface `e` (`bytes` long, a super-packet or not), or
    /// for why it was not: malformed offload work, or a full transmit queue.
    fn count_tx(&mut self, e: usize, sent: std::io::Result<()>, bytes: usize, super_packet: bool) {
        match sent {
            Ok(()) => {
                let link = &mut self.links[e];
                link.stats.tx_frames += 1;
                link.stats.tx_bytes += bytes as u64;
                if super_packet {
                    self.super_packets_tx += 1;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                self.drops.inc(dr::MALFORMED_L4)
            }
            Err(_) => self.drops.inc(dr::TX_RING_FULL),
        }
    }

    /// A datagram larger than the egress MTU: IPv4 without DF is cut into fragments (as a
    /// router does); with DF, and IPv6 (routers do not fragment it), the source is told the
    /// MTU (ICMP fragmentation needed, RFC 1191 / Packet Too Big, RFC 8201), rate-limited.
    fn too_big(
        &mut self,
        e: usize,
        nh: IpAddr,
        ip: &[u8],
        mtu: usize,
        offloaded: bool,
        ports: &mut [impl FrameIo],
    ) {
        let v4 = ip.first().map(|b| b >> 4) == Some(4);
        if v4 && !offloaded && !Ipv4Packet::new_unchecked(ip).dont_frag() {
            let mut pieces = Vec::new();
            if fragment::fragment_v4(ip, mtu, &mut pieces).is_none() {
                return self.drop(dr::EXCEEDS_MTU);
            }
            self.event("datagrams_fragmented");
            for p in pieces {
                self.transmit(e, nh, &p, ethertype::IPV4, None, &DvaMeta::default(), ports);
            }
            return;
        }
        self.drop(dr::EXCEEDS_MTU);
        if !self.icmp_budget.take(self.now) {
            return self.drop(dr::ICMP_RATE_LIMITED);
        }
        let (src, v6) = match classify(ip) {
            Ok(c) => (c.key.src, c.is_v6()),
            Err(_) => return,
        };
        // A masqueraded packet: its sender is inside, behind an address the data planes rewrote.
        // The error is made as the next router would make it (from our address on the egress
        // link, quoting the packet as it would leave) and enters through that link: the flow's
        // data plane translates it back to the sender as it does any error about the flow
        // (RFC 5508), and the sender's path MTU discovery works. Otherwise it comes from our
        // address on the link towards the source (where it leaves).
        let masqueraded = self.nat_sources.contains(&src);
        let link = if masqueraded {
            e
        } else if self.is_local(src) {
            return; // our own packet (a health probe): nobody to tell
        } else {
            match self.routes.lookup(src) {
                Some(back) => usize::from(back.interface),
                None => return,
            }
        };
        let Some(from) = self.links.get(link).and_then(|l| l.cfg.address(!v6)) else {
            return;
        };
        let mtu = mtu.min(usize::from(u16::MAX)) as u32;
        let mut err = Vec::with_capacity(600);
        let built = match from {
            IpAddr::V4(s) => reply::icmpv4_error_with(&mut err, ip, s, 3, 4, mtu),
            IpAddr::V6(s) => reply::icmpv6_error(&mut err, ip, s, 2, 0, mtu),
        };
        if built.is_none() {
            return;
        }
        if masqueraded {
            if self.reinject.len() < BATCH {
                self.event("icmp_too_big_sent");
                self.reinject.push((e, err));
            }
        } else {
            self.event("icmp_too_big_sent");
            self.forward(Frame::Copy(&err), &DvaMeta::default(), ports);
        }
    }

    /// Frame `ip` for interface `e` and send it to neighbour `nh` (or queue it while `nh`
    /// resolves), finishing offload work `c` asks for.
    #[allow(clippy::too_many_arguments)]
    fn transmit(
        &mut self,
        e: usize,
        nh: IpAddr,
        ip: &[u8],
        etype: u16,
        c: Option<Classified>,
        meta: &DvaMeta,
        ports: &mut [impl FrameIo],
    ) {
        let link = &mut self.links[e];
        let len = ip.len();
        let mac = link.neigh.lookup(&nh, self.now);
        if let Some(mac) = mac.filter(|_| c.is_none() || ports[e].offloads()) {
            // The usual case: the frame is built once, straight in the driver's transmit
            // buffer (a super-packet is 64 KB to copy).
            let total = (14 + len).max(60);
            let src = link.mac;
            let sent = ports[e].tx_with(total, |f| {
                f[14..14 + len].copy_from_slice(ip);
                f[14 + len..].fill(0);
                finish_frame(f, mac, src, etype, c.as_ref(), meta)
            });
            return self.count_tx(e, sent, total, c.is_some() && meta.gso_size > 0);
        }
        let f = &mut self.scratch;
        f.clear();
        reply::ethernet(f, EthernetAddress([0; 6]), link.mac, etype);
        f.extend_from_slice(&ip[..len]);
        decrement_ttl(&mut f[14..], etype);
        if f.len() < 60 {
            f.resize(60, 0);
        }
        if let Some(mac) = mac {
            f[0..6].copy_from_slice(&mac.0);
        }
        match (mac, c) {
            (Some(_), None) => {
                if ports[e].tx(f).is_ok() {
                    link.stats.tx_frames += 1;
                    link.stats.tx_bytes += f.len() as u64;
                } else {
                    self.drops.inc(dr::TX_RING_FULL);
                }
            }
            (Some(_), Some(c)) => {
                let sent = offload::tx_offloaded(
                    &mut ports[e],
                    f,
                    &c,
                    meta.gso_size,
                    &mut self.segments,
                    &mut self.framed,
                );
                match sent {
                    Some(n) if n > 0 => {
                        link.stats.tx_frames += n as u64;
                        link.stats.tx_bytes += f.len() as u64;
                        if meta.gso_size > 0 && n == 1 {
                            self.super_packets_tx += 1;
                        }
                    }
                    Some(_) => self.drops.inc(dr::TX_RING_FULL),
                    None => self.drops.inc(dr::MALFORMED_L4),
                }
            }
            (None, c) => {
                // The neighbour queue holds plain frames: finish offload work first.
                let mut frames = Vec::new();
                match c {
                    None => frames.push(f.clone()),
                    Some(c) => {
                        let done = offload::finish_in_software(
                            f,
                            &c,
                            meta.gso_size,
                            &mut self.segments,
                            &mut self.framed,
                            |fr| frames.push(fr.to_vec()),
                        );
                        if done.is_none() {
                            return self.drop(dr::MALFORMED_L4);
                        }
                    }
                }
                for fr in frames {
                    let now = self.now;
                    let (queued, probe) = self.links[e].neigh.enqueue(nh, fr, now);
                    if !queued {
                        self.drops.inc(dr::NEIGHBOR_QUEUE_FULL);
                    }
                    if probe {
                        self.probe(e, nh, ports);
                    }
                }
            }
        }
    }

    /// ARP request / neighbour solicitation for `ip` on interface `e`.
    fn probe(&mut self, e: usize, ip: IpAddr, ports: &mut [impl FrameIo]) {
        let link = &mut self.links[e];
        let Some(src) = link.source_for(ip) else {
            return;
        };
        let mut f = Vec::with_capacity(86);
        match (src, ip) {
            (IpAddr::V4(s), IpAddr::V4(t)) => {
                reply::ethernet(&mut f, EthernetAddress::BROADCAST, link.mac, ethertype::ARP);
                reply::arp(&mut f, 1, link.mac, s, EthernetAddress([0; 6]), t);
                f.resize(60, 0);
            }
            (IpAddr::V6(s), IpAddr::V6(t)) => {
                let (group, group_mac) = reply::solicited_node(t);
                reply::ethernet(&mut f, group_mac, link.mac, ethertype::IPV6);
                let solicit = NdiscRepr::NeighborSolicit {
                    target_addr: t,
                    lladdr: Some(link.mac),
                };
                reply::ndisc(&mut f, s, group, &solicit);
            }
            _ => return,
        }
        if ports[e].tx(&f).is_ok() {
            link.stats.tx_frames += 1;
            link.stats.tx_bytes += f.len() as u64;
        }
        *self.events.entry("neighbor_probes").or_insert(0) += 1;
    }

    /// Enter the ICMP errors [`Core::too_big`] made about masqueraded packets, each as if it
    /// had arrived on its interface, past the arrival checks (its source is ours, which those
    /// refuse from the wire): to the data plane of the flow it quotes.
    pub(crate) fn take_reinjected(&mut self, bp: &mut impl BackplaneTx) {
        if self.reinject.is_empty() {
            return;
        }
        for (i, ip) in std::mem::take(&mut self.reinject) {
            let mac = EthernetAddress([0; 6]);
            match ip.first().map(|b| b >> 4) {
                Some(4) => self.on_ipv4_datagram(i, mac, true, &ip, RxMeta::default(), bp),
                _ => self.on_ipv6_datagram(i, mac, true, &ip, RxMeta::default(), bp),
            }
        }
    }

    /// A neighbour this lane learned, for the other lanes (ARP replies all reach lane 0, and an
    /// advertisement reaches the lane its addresses hash to, not the one that solicited it).
    fn tell_lanes(&mut self, interface: usize, ip: IpAddr, mac: EthernetAddress) {
        if self.lanes > 1 {
            self.lane_out
                .push(lanes::LaneMsg::Neighbor { interface, ip, mac });
        }
    }

    /// What another lane sent this one.
    pub(crate) fn on_lane_msg(&mut self, msg: lanes::LaneMsg) {
        match msg {
            lanes::LaneMsg::Neighbor { interface, ip, mac } => {
                let now = self.now;
                let Some(link) = self.links.get_mut(interface) else {
                    return;
                };
                for mut f in link.neigh.learn(ip, mac, now) {
                    f[0..6].copy_from_slice(&mac.0);
                    self.deferred.push((interface, f));
                }
            }
            lanes::LaneMsg::Probe {
                interface,
                src_mac,
                ip,
            } => {
                if interface >= self.links.len() {
                    return;
                }
                if let Ok(c) = classify(&ip) {
                    self.on_local(interface, src_mac, &ip, &c);
                }
            }
        }
    }

    pub(crate) fn send_deferred(&mut self, ports: &mut [impl FrameIo]) {
        for (i, f) in self.deferred.drain(..) {
            let link = &mut self.links[i];
            if ports[i].tx(&f).is_ok() {
                link.stats.tx_frames += 1;
                link.stats.tx_bytes += f.len() as u64;
            } else {
                self.drops.inc(dr::TX_RING_FULL);
            }
        }
    }

    pub(crate) fn tick(&mut self, ports: &mut [impl FrameIo]) {
        for pkt in self.health.tick(self.now) {
            // Built here with complete checksums: no offload work.
            self.forward(Frame::Copy(&pkt), &DvaMeta::default(), ports);
            self.event("health_probes");
        }
        for msg in self.health.take_changes() {
            tracing::info!("{msg}");
        }
        for _ in 0..self.reassembly.expire(self.now) {
            self.drops.inc(dr::FRAGMENT_TIMEOUT);
        }
        for e in 0..self.links.len() {
            let r = self.links[e].neigh.tick(self.now);
            for _ in 0..r.dropped {
                self.drops.inc(dr::NEIGHBOR_UNRESOLVED);
            }
            for ip in r.probe {
                self.probe(e, ip, ports);
            }
        }
    }
}

/// The neighbour solicitation or advertisement in the IPv6 packet `ip`, or `None` when it is to
/// be dropped: sent with a hop limit other than 255 (RFC 4861 §7.1: the proof it was not
/// forwarded) or malformed as [`NdiscRepr::parse`] judges it.
fn ndisc_message(ip: &[u8], c: &Classified) -> Option<NdiscRepr> {
    let body = ip.get(c.l4_offset..c.ip_len)?;
    if Ipv6Packet::new_checked(ip).ok()?.hop_limit() != 255 {
        return None;
    }
    NdiscRepr::parse(&Icmpv6Packet::new_unchecked(body)).ok()
}

/// A packet to send out: borrowed for the call, or in a buffer that stays put until the ports
/// are flushed (its IP packet at the offset), from which it can leave without a copy.
enum Frame<'a> {
    Copy(&'a [u8]),
    InPlace(&'a mut [u8], usize),
}

/// Make the IP packet at `f[14..]` a frame from `src` to `dst`: its Ethernet header, the hop
/// (TTL), and, for a packet with offload work `c`, its partial checksum in place; answers the
/// work left to the kernel, or `None` for a packet whose L4 header is not where `c` says.
fn finish_frame(
    f: &mut [u8],
    dst: EthernetAddress,
    src: EthernetAddress,
    etype: u16,
    c: Option<&Classified>,
    meta: &DvaMeta,
) -> Option<dva_io::Offload> {
    f[0..6].copy_from_slice(&dst.0);
    f[6..12].copy_from_slice(&src.0);
    f[12..14].copy_from_slice(&etype.to_be_bytes());
    decrement_ttl(&mut f[14..], etype);
    match c {
        None => Some(dva_io::Offload::default()),
        Some(c) => offload::offload_in_place(f, c, meta.gso_size),
    }
}

/// A forwarded packet's hop: its TTL (IPv4, header checksum updated) or hop limit (IPv6) down
/// by one; the caller checked it was above 1.
fn decrement_ttl(ip: &mut [u8], etype: u16) {
    if etype == ethertype::IPV4 {
        let mut p = Ipv4Packet::new_unchecked(ip);
        dva_wire::ipv4::decrement_ttl(&mut p);
    } else {
        ip[7] -= 1;
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use dva_wire::icmpv6::ndisc_flags;
    use dva_wire::{EthernetAddress, NdiscRepr};

    use super::ndisc_message;
    use crate::classify::classify;
    use crate::reply;

    const MAC: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 2]);

    fn addr(s: &str) -> Ipv6Addr {
        s.parse().expect("test address")
    }

    /// `msg` from `src` to `dst` as the IPv6 packet a neighbour sends.
    fn packet(src: Ipv6Addr, dst: Ipv6Addr, msg: &NdiscRepr) -> Vec<u8> {
        let mut ip = Vec::new();
        reply::ndisc(&mut ip, src, dst, msg);
        ip
    }

    #[test]
    fn solicitations_and_advertisements_are_read() {
        let ns = NdiscRepr::NeighborSolicit {
            target_addr: addr("2001:db8:1::1"),
            lladdr: Some(MAC),
        };
        let (group, _) = reply::solicited_node(addr("2001:db8:1::1"));
        let ip = packet(addr("2001:db8:1::2"), group, &ns);
        let c = classify(&ip).expect("classified");
        assert_eq!(ndisc_message(&ip, &c), Some(ns));

        let na = NdiscRepr::NeighborAdvert {
            flags: ndisc_flags::SOLICITED | ndisc_flags::OVERRIDE,
            target_addr: addr("2001:db8:1::2"),
            lladdr: Some(MAC),
        };
        let ip = packet(addr("2001:db8:1::2"), addr("2001:db8:1::1"), &na);
        let c = classify(&ip).expect("classified");
        assert_eq!(ndisc_message(&ip, &c), Some(na));
    }

    #[test]
    fn forwarded_or_truncated_messages_are_refused() {
        let ns = NdiscRepr::NeighborSolicit {
            target_addr: addr("2001:db8:1::1"),
            lladdr: Some(MAC),
        };
        let mut ip = packet(addr("2001:db8:1::2"), addr("2001:db8:1::1"), &ns);
        let c = classify(&ip).expect("classified");
        ip[7] = 254; // a router on the way decremented the hop limit
        assert_eq!(ndisc_message(&ip, &c), None);

        // Cut inside the target address (the IPv6 payload length says so too).
        let mut ip = packet(addr("2001:db8:1::2"), addr("2001:db8:1::1"), &ns);
        ip.truncate(40 + 20);
        ip[4..6].copy_from_slice(&20u16.to_be_bytes());
        let c = classify(&ip).expect("an ICMPv6 header fits");
        assert_eq!(ndisc_message(&ip, &c), None);
    }
}
