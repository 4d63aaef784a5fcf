//! Conformance cases for the data-plane and dispatcher cores, run as data (holo's habit): each
//! file in `crates/unit/tests/conformance/` is a case, units and a bucket table, then inputs each
//! followed by the outputs it must produce. A new case is a new file, not new code.
//!
//! The harness wires real cores ([`dataplane::Core`], [`dispatcher::Core`]) to a fake backplane
//! that hands datagrams from one core to another in memory, in the order they were sent, and
//! to fake ports ([`MemoryIo`]). Packets are real bytes through the real code; only sockets,
//! sealing and the clock are the harness's. The cores receive datagrams with the [`Origin`]
//! the backplane authenticated, as in the unit.
//!
//! A case file, line by line (`#` starts a comment):
//!
//! ```text
//! dataplanes 1 2 3             # the data planes (backplane address 10.255.0.<id>:6081)
//! dispatchers 100              # dispatchers (10.255.1.<id mod 256>:6081); see `dispatcher`
//! buckets 8 owner 1            # the bucket table: 8 buckets, all owned by 1, no history
//! firewall default accept      # the rule set's default action (accept, drop, reject; staged)
//! dispatcher 100 ports 2       # run dispatcher 100's core too, with 2 interfaces (see below)
//!
//! table bucket 5 owner 3 history 2 1   # staged for the next `push`
//! backup 5 2                           # bucket 5's backup is data plane 2 (staged)
//! export 1                             # data plane 1 drains: hands its flows over (staged)
//! push [UNITS] [with listen ADDR] # a new config version to UNITS (default: every live one)
//! send FROM -> TO PACKET [bucket B]   # a datagram from a dispatcher (or data plane) to a data plane
//! frame D port P PACKET | arp-reply IP MAC # a frame into dispatcher D's interface P
//! tick MS                      # time passes; every live unit takes a turn
//! kill UNIT                    # the unit stops receiving and taking turns
//! lose PATTERN / hold PATTERN  # the next datagram whose output line starts so is lost / held
//! release                      # held datagrams are delivered now (reordered behind the others)
//! expect LINE                  # an output of the input above, in order; all must be listed
//! check UNIT drop|counter NAME N / check UNIT flows|version N
//! ```
//!
//! `PACKET` is `tcp SRC:PORT > DST:PORT FLAGS [seq N] [ack N]` (FLAGS from `SFRPA`, or `-`) or
//! `udp SRC:PORT > DST:PORT`. Output lines name units by id: `3 -> 2 punt tcp … A`,
//! `1 -> 100 forward …`, `1 -> 2 handover state bucket 5 conns 1 last`, `1 -> 2 replicate conns
//! 1`, `1 config v2 ack` / `… nack REASON`, `100 -> 1 dataplane … bucket 5`, `100 port 1 tx …`.
//! An expected line ending in `...` matches any line that starts with what precedes it.
//!
//! Every case runs with `tcp_liberal` (window tracking is conntrack's own tests' business).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dva_flow::{BucketTable, UnitId};
use dva_io::backplane::{BackplaneTx, Origin};
use dva_io::memory::MemoryIo;
use dva_proto::role::{BackplaneAuth, RuntimeConfig, Stage, UnitEndpoint};
use dva_proto::{DataplaneConfig, DispatcherConfig, InterfaceConfig};
use dva_services::firewall::{Action, RuleSet};
use dva_wire::geneve::{self, dva_flags, DvaMeta, DVA_HEADER_LEN};
use dva_wire::{ethertype, ip_proto, EthernetAddress};

use crate::classify::classify;
use crate::handover::{self, Handover, PROTO_HANDOVER};
use crate::{dataplane, dispatcher, reply};

pub mod fuzz;

const VNI: u32 = 77;
const SLOT: usize = 9000;

/// A backplane that keeps what it is given, for the harness to deliver.
#[derive(Default)]
pub(crate) struct FakeTx {
    slot: Vec<u8>,
    pub(crate) sent: Vec<(SocketAddr, Vec<u8>)>,
}

impl BackplaneTx for FakeTx {
    fn tx_slot(&mut self) -> Option<&mut [u8]> {
        self.slot.resize(SLOT, 0);
        Some(&mut self.slot)
    }
    fn commit_slot(&mut self, len: usize, dst: SocketAddr) {
        self.sent.push((dst, self.slot[..len].to_vec()));
    }
    fn send_with(&mut self, len: usize, dst: SocketAddr, fill: impl FnOnce(&mut [u8])) -> bool {
        let mut d = vec![0; len];
        fill(&mut d);
        self.sent.push((dst, d));
        true
    }
}

fn dp_addr(id: UnitId) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::new(10, 255, 0, id as u8).into(), 6081)
}

fn dispatcher_addr(id: UnitId) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::new(10, 255, 1, id as u8).into(), 6081)
}

/// The MAC of dispatcher interface `port` (the harness's convention).
fn port_mac(port: usize) -> EthernetAddress {
    EthernetAddress([0x02, 0, 0, 0, 0, port as u8 + 1])
}

struct Dp {
    core: dataplane::Core<FakeTx>,
    inbox: VecDeque<(Vec<u8>, Origin)>,
}

struct Disp {
    id: UnitId,
    core: dispatcher::Core,
    ports: Vec<MemoryIo>,
    tx: FakeTx,
}

enum Fault {
    Lose(String),
    Hold(String),
}

struct World {
    start: Instant,
    now: Instant,
    dataplanes: Vec<UnitId>,
    dispatchers: Vec<UnitId>,
    buckets: Vec<(UnitId, Vec<UnitId>)>,
    epoch: u64,
    backups: BTreeMap<u16, UnitId>,
    export: BTreeSet<UnitId>,
    default_action: Action,
    version: u64,
    dps: BTreeMap<UnitId, Dp>,
    dead: BTreeSet<UnitId>,
    disp: Option<Disp>,
    disp_ports: usize,
    faults: Vec<Fault>,
    held: Vec<(UnitId, UnitId, Vec<u8>)>,
    log: Vec<String>,
    /// The data planes' chain and its translating stages' configs (cases: the firewall alone;
    /// the fuzz target picks).
    chain: Vec<Stage>,
    nat: Option<dva_services::nat::NatConfig>,
    lb: Option<dva_services::lb::LbConfig>,
    /// NAT/LB source addresses the dispatcher buckets replies to by port.
    service_addrs: Vec<dva_proto::role::ServiceAddr>,
}

fn unit(s: &str) -> Result<UnitId, String> {
    s.parse().map_err(|_| format!("{s:?}: not a unit id"))
}

fn num<T: std::str::FromStr>(s: Option<&&str>) -> Result<T, String> {
    s.and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{s:?}: not a number"))
}

/// `tcp 10.0.0.1:40000 > 10.0.1.1:80 S [seq N] [ack N]` or `udp A:P > B:P`: the IP packet, and
/// the words after it.
fn packet<'a>(w: &'a [&'a str]) -> Result<(Vec<u8>, &'a [&'a str]), String> {
    let ep = |s: &str| -> Result<SocketAddr, String> {
        s.parse().map_err(|_| format!("{s:?}: not ADDR:PORT"))
    };
    let (Some(proto), Some(src), Some(&">"), Some(dst)) = (w.first(), w.get(1), w.get(2), w.get(3))
    else {
        return Err(format!("{w:?}: not PROTO SRC > DST"));
    };
    let (src, dst) = (ep(src)?, ep(dst)?);
    let mut out = Vec::new();
    match *proto {
        "tcp" => {
            let flags_word = w.get(4).ok_or("tcp needs FLAGS")?;
            let mut flags = 0u8;
            for ch in flags_word.chars() {
                flags |= match ch {
                    'F' => 0x01,
                    'S' => 0x02,
                    'R' => 0x04,
                    'P' => 0x08,
                    'A' => 0x10,
                    '-' => 0,
                    _ => return Err(format!("{flags_word}: TCP flags are of SFRPA")),
                };
            }
            let mut rest = &w[5..];
            let (mut seq, mut ack) = (1u32, 0u32);
            while let [k @ ("seq" | "ack"), v, tail @ ..] = rest {
                let v: u32 = num(Some(v))?;
                if *k == "seq" {
                    seq = v
                } else {
                    ack = v
                }
                rest = tail;
            }
            reply::tcp_segment(
                &mut out,
                src.ip(),
                dst.ip(),
                src.port(),
                dst.port(),
                seq,
                ack,
                flags,
                &[],
            )
            .ok_or("tcp segment")?;
            Ok((out, rest))
        }
        "udp" => {
            let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
                return Err("udp: IPv4 only".into());
            };
            reply::ipv4_header(&mut out, s, d, ip_proto::UDP, 8, 64);
            out.extend_from_slice(&src.port().to_be_bytes());
            out.extend_from_slice(&dst.port().to_be_bytes());
            out.extend_from_slice(&8u16.to_be_bytes());
            // No checksum (IPv4 allows it).
            out.extend_from_slice(&[0, 0]);
            Ok((out, &w[4..]))
        }
        p => Err(format!("{p}: tcp or udp")),
    }
}

/// One line naming an IP packet: `tcp 10.0.0.1:40000 > 10.0.1.1:80 A`.
fn describe_ip(ip: &[u8]) -> String {
    let Ok(c) = classify(ip) else {
        return "malformed".into();
    };
    let k = c.key;
    let ep = |a: IpAddr, p: u16| SocketAddr::new(a, p).to_string();
    match k.proto {
        ip_proto::TCP => {
            let mut f = String::new();
            for (bit, ch) in [
                (0x02, 'S'),
                (0x01, 'F'),
                (0x04, 'R'),
                (0x08, 'P'),
                (0x10, 'A'),
            ] {
                if c.tcp_flags & bit != 0 {
                    f.push(ch);
                }
            }
            if f.is_empty() {
                f.push('-');
            }
            format!(
                "tcp {} > {} {f}",
                ep(k.src, k.src_port),
                ep(k.dst, k.dst_port)
            )
        }
        ip_proto::UDP => format!("udp {} > {}", ep(k.src, k.src_port), ep(k.dst, k.dst_port)),
        p => format!("proto {p} {} > {}", k.src, k.dst),
    }
}

impl World {
    fn new() -> World {
        let start = Instant::now();
        World {
            start,
            now: start,
            dataplanes: Vec::new(),
            dispatchers: Vec::new(),
            buckets: Vec::new(),
            epoch: 1,
            backups: BTreeMap::new(),
            export: BTreeSet::new(),
            default_action: Action::Accept,
            version: 1,
            dps: BTreeMap::new(),
            dead: BTreeSet::new(),
            disp: None,
            disp_ports: 0,
            faults: Vec::new(),
            held: Vec::new(),
            log: Vec::new(),
            chain: vec![Stage::Firewall],
            nat: None,
            lb: None,
            service_addrs: Vec::new(),
        }
    }

    fn unit_of(&self, addr: SocketAddr) -> Option<UnitId> {
        self.dataplanes
            .iter()
            .chain(&self.dispatchers)
            .copied()
            .find(|&u| {
                (self.dataplanes.contains(&u) && dp_addr(u) == addr)
                    || (self.dispatchers.contains(&u) && dispatcher_addr(u) == addr)
            })
    }

    fn table(&self) -> Result<BucketTable, String> {
        let raw = serde_json::json!({
            "epoch": self.epoch,
            "buckets": self.buckets.iter().map(|(o, h)| serde_json::json!({"owner": o, "history": h})).collect::<Vec<_>>(),
        });
        serde_json::from_value(raw).map_err(|e| format!("bucket table: {e}"))
    }

    fn interfaces(&self) -> Vec<InterfaceConfig> {
        (0..self.disp_ports)
            .map(|i| InterfaceConfig {
                id: i as u8,
                name: format!("if{i}"),
                device: format!("dev{i}"),
                addresses: vec![format!("10.0.{i}.254/24").parse().expect("literal")],
            })
            .collect()
    }

    fn dp_config(&self, me: UnitId) -> Result<DataplaneConfig, String> {
        let table = self.table()?;
        let backups = if self.backups.is_empty() {
            Vec::new()
        } else {
            (0..table.len() as u16)
                .map(|b| self.backups.get(&b).copied().unwrap_or(0))
                .collect()
        };
        Ok(DataplaneConfig {
            appliance: "conformance".into(),
            version: self.version,
            vni: VNI,
            unit: me,
            listen: dp_addr(me),
            dispatchers: self
                .dispatchers
                .iter()
                .map(|&id| UnitEndpoint {
                    id,
                    addr: dispatcher_addr(id),
                })
                .collect(),
            dispatcher_lanes: 1,
            peers: self
                .dataplanes
                .iter()
                .map(|&id| UnitEndpoint {
                    id,
                    addr: dp_addr(id),
                })
                .collect(),
            table,
            interfaces: self.interfaces(),
            firewall: RuleSet::with_default(self.default_action),
            max_connections: 1024,
            tcp_liberal: true,
            export: self.export.contains(&me),
            backups,
            chain: self.chain.clone(),
            nat: self.nat.clone(),
            lb: self.lb.clone(),
            backend_states: Vec::new(),
            runtime: RuntimeConfig::default(),
            backplane: BackplaneAuth::default(),
        })
    }

    fn dispatcher_config(&self, me: UnitId) -> Result<DispatcherConfig, String> {
        Ok(DispatcherConfig {
            appliance: "conformance".into(),
            version: self.version,
            vni: VNI,
            unit: me,
            listen: dispatcher_addr(me),
            interfaces: self.interfaces(),
            routes: Vec::new(),
            dataplanes: self
                .dataplanes
                .iter()
                .map(|&id| UnitEndpoint {
                    id,
                    addr: dp_addr(id),
                })
                .collect(),
            table: self.table()?,
            fenced: Vec::new(),
            service_addrs: self.service_addrs.clone(),
            dnat_reverse: Vec::new(),
            health_checks: Vec::new(),
            runtime: RuntimeConfig::default(),
            backplane: BackplaneAuth::default(),
        })
    }

    /// The units come up with the setup lines' config.
    fn start(&mut self) -> Result<(), String> {
        for &id in &self.dataplanes {
            let core = dataplane::Core::new(self.dp_config(id)?, FakeTx::default(), self.now)
                .map_err(|e| format!("data plane {id}: {e:#}"))?;
            self.dps.insert(
                id,
                Dp {
                    core,
                    inbox: VecDeque::new(),
                },
            );
        }
        if self.disp_ports > 0 {
            let id = *self.dispatchers.first().ok_or("no dispatcher listed")?;
            let links: Vec<(EthernetAddress, usize)> =
                (0..self.disp_ports).map(|i| (port_mac(i), 1500)).collect();
            let core = dispatcher::Core::with_links(
                Arc::new(self.dispatcher_config(id)?),
                &links,
                self.now,
            )
            .map_err(|e| format!("dispatcher {id}: {e:#}"))?;
            self.disp = Some(Disp {
                id,
                core,
                ports: (0..self.disp_ports).map(|_| MemoryIo::new()).collect(),
                tx: FakeTx::default(),
            });
        }
        Ok(())
    }

    /// The output line of a datagram from `from` to `to`.
    fn describe(&self, from: UnitId, to: UnitId, d: &[u8]) -> String {
        let Ok((_, ptype, meta, off)) = geneve::decap_dva(d) else {
            return format!("{from} -> {to} malformed");
        };
        let body = &d[off..];
        if ptype == PROTO_HANDOVER {
            let what = match handover::decode(body) {
                Some(Handover::State {
                    bucket,
                    last,
                    conns,
                    ..
                }) => format!(
                    "handover state bucket {bucket} conns {}{}",
                    conns.len(),
                    if last { " last" } else { "" }
                ),
                Some(Handover::Marker { bucket, .. }) => format!("handover marker bucket {bucket}"),
                Some(Handover::Done { bucket, .. }) => format!("handover done bucket {bucket}"),
                Some(Handover::Replicate { conns, .. }) => {
                    format!("replicate conns {}", conns.len())
                }
                None => "handover malformed".into(),
            };
            return format!("{from} -> {to} {what}");
        }
        let kind = if self.dispatchers.contains(&from) {
            "dataplane"
        } else if meta.flags & dva_flags::PUNTED != 0 {
            "punt"
        } else if meta.flags & dva_flags::NEW_HERE != 0 {
            "new-here"
        } else if self.dispatchers.contains(&to) {
            "forward"
        } else {
            "packet"
        };
        let bucket = if self.dispatchers.contains(&from) {
            format!(" bucket {}", meta.bucket)
        } else {
            String::new()
        };
        format!("{from} -> {to} {kind} {}{bucket}", describe_ip(body))
    }

    /// Hand a datagram from `from` to its destination, as the case's faults say.
    fn route(&mut self, from: UnitId, dst: SocketAddr, d: Vec<u8>) {
        let Some(to) = self.unit_of(dst) else {
            self.log
                .push(format!("{from} -> {dst} unknown destination"));
            return;
        };
        let line = self.describe(from, to, &d);
        let fault = self.faults.iter().position(|f| match f {
            Fault::Lose(p) | Fault::Hold(p) => line.starts_with(p.as_str()),
        });
        if let Some(i) = fault {
            match self.faults.remove(i) {
                Fault::Lose(_) => self.log.push(format!("{line} (lost)")),
                Fault::Hold(_) => {
                    self.log.push(format!("{line} (held)"));
                    self.held.push((from, to, d));
                }
            }
            return;
        }
        if self.dead.contains(&to) {
            self.log.push(format!("{line} (lost)"));
            return;
        }
        self.log.push(line);
        self.deliver(from, to, d);
    }

    fn deliver(&mut self, from: UnitId, to: UnitId, d: Vec<u8>) {
        let addr = if self.dispatchers.contains(&from) {
            dispatcher_addr(from)
        } else {
            dp_addr(from)
        };
        let origin = Origin { addr, unit: from };
        if let Some(dp) = self.dps.get_mut(&to) {
            dp.inbox.push_back((d, origin));
        } else if let Some(disp) = self.disp.as_mut().filter(|x| x.id == to) {
            disp.core.set_now(self.now);
            disp.core.on_backplane(&d, origin, &mut disp.ports);
            disp.core.take_reinjected(&mut disp.tx);
            self.collect_dispatcher();
        }
    }

    /// What the dispatcher sent: datagrams routed on, frames logged.
    fn collect_dispatcher(&mut self) {
        let Some(disp) = self.disp.as_mut() else {
            return;
        };
        let id = disp.id;
        disp.core.send_deferred(&mut disp.ports);
        let sent = std::mem::take(&mut disp.tx.sent);
        let mut frames = Vec::new();
        for (i, p) in disp.ports.iter_mut().enumerate() {
            for f in p.take_tx() {
                frames.push((i, f));
            }
        }
        for (i, f) in frames {
            let line = describe_frame(&f);
            self.log.push(format!("{id} port {i} tx {line}"));
        }
        for (dst, d) in sent {
            self.route(id, dst, d);
        }
    }

    /// Every live data plane takes turns until no datagram is in flight.
    fn settle(&mut self) {
        for _ in 0..64 {
            let mut out = Vec::new();
            for (&id, dp) in self.dps.iter_mut() {
                if self.dead.contains(&id) {
                    dp.inbox.clear();
                    continue;
                }
                dp.core.begin_turn(self.now);
                while let Some((d, o)) = dp.inbox.pop_front() {
                    dp.core.on_packet(&d, o);
                }
                dp.core.end_turn();
                for (dst, d) in dp.core.tx.sent.drain(..) {
                    out.push((id, dst, d));
                }
            }
            if out.is_empty() && self.dps.values().all(|d| d.inbox.is_empty()) {
                return;
            }
            for (from, dst, d) in out {
                self.route(from, dst, d);
            }
        }
        self.log.push("(still busy after 64 turns)".into());
    }

    fn push(&mut self, w: &[&str]) -> Result<(), String> {
        let mut targets: Vec<UnitId> = Vec::new();
        let mut listen = None;
        let mut i = 0;
        while i < w.len() {
            if w[i] == "with" {
                match (w.get(i + 1), w.get(i + 2)) {
                    (Some(&"listen"), Some(a)) => {
                        listen = Some(a.parse().map_err(|_| format!("{a}: not ADDR:PORT"))?)
                    }
                    _ => return Err("push … with listen ADDR".into()),
                }
                i += 3;
                continue;
            }
            targets.push(unit(w[i])?);
            i += 1;
        }
        if targets.is_empty() {
            targets = self
                .dataplanes
                .iter()
                .copied()
                .filter(|u| !self.dead.contains(u))
                .collect();
        }
        self.version += 1;
        self.epoch += 1;
        for u in targets {
            let mut cfg = self.dp_config(u)?;
            if let Some(a) = listen {
                cfg.listen = a;
            }
            let Some(dp) = self.dps.get_mut(&u) else {
                return Err(format!("push to {u}: not a data plane"));
            };
            let answer = match dp.core.prepare(cfg) {
                Ok(ready) => {
                    dp.core.commit(ready);
                    "ack".to_string()
                }
                Err(e) => format!("nack {e}"),
            };
            self.log
                .push(format!("{u} config v{} {answer}", self.version));
        }
        if let Some(id) = self.disp.as_ref().map(|d| d.id) {
            let cfg = self.dispatcher_config(id)?;
            let Some(disp) = self.disp.as_mut() else {
                return Ok(());
            };
            let answer = match disp.core.prepare(cfg) {
                Ok(ready) => {
                    disp.core.commit(ready);
                    "ack".to_string()
                }
                Err(e) => format!("nack {e}"),
            };
            self.log
                .push(format!("{} config v{} {answer}", disp.id, self.version));
        }
        self.settle();
        Ok(())
    }

    fn send(&mut self, w: &[&str]) -> Result<(), String> {
        let (Some(from), Some(&"->"), Some(to)) = (w.first(), w.get(1), w.get(2)) else {
            return Err("send FROM -> TO PACKET".into());
        };
        let (from, to) = (unit(from)?, unit(to)?);
        let (ip, rest) = packet(&w[3..])?;
        let bucket = match rest {
            [] => u16::MAX,
            ["bucket", b] => num(Some(b))?,
            r => return Err(format!("{r:?}: expected `bucket N`")),
        };
        let meta = DvaMeta {
            epoch: self.epoch as u32,
            bucket,
            ..Default::default()
        };
        let mut d = vec![0; DVA_HEADER_LEN + ip.len()];
        geneve::encap_dva(&mut d, VNI, geneve::PROTO_IPV4, &meta);
        d[DVA_HEADER_LEN..].copy_from_slice(&ip);
        let line = format!("{from} -> {to} {}", describe_ip(&ip));
        let _ = line;
        self.deliver(from, to, d);
        self.settle();
        Ok(())
    }

    fn frame(&mut self, w: &[&str]) -> Result<(), String> {
        let (Some(d), Some(&"port"), Some(p)) = (w.first(), w.get(1), w.get(2)) else {
            return Err("frame D port P …".into());
        };
        let (_d, p): (UnitId, usize) = (unit(d)?, num(Some(p))?);
        let mut f = Vec::new();
        match w.get(3) {
            Some(&"arp-reply") => {
                let (Some(ip), Some(mac)) = (w.get(4), w.get(5)) else {
                    return Err("arp-reply IP MAC".into());
                };
                let ip: Ipv4Addr = ip.parse().map_err(|_| format!("{ip}: not IPv4"))?;
                let mac = parse_mac(mac)?;
                let ours = match self.interfaces().get(p).and_then(|i| i.address(true)) {
                    Some(IpAddr::V4(a)) => a,
                    _ => return Err(format!("port {p}: no IPv4 address")),
                };
                reply::ethernet(&mut f, port_mac(p), mac, ethertype::ARP);
                reply::arp(&mut f, 2, mac, ip, port_mac(p), ours);
                f.resize(60, 0);
            }
            _ => {
                let (ip, rest) = packet(&w[3..])?;
                if !rest.is_empty() {
                    return Err(format!("{rest:?}: unexpected"));
                }
                reply::ethernet(
                    &mut f,
                    port_mac(p),
                    EthernetAddress([2, 0, 0, 0, 9, 9]),
                    ethertype::IPV4,
                );
                f.extend_from_slice(&ip);
            }
        }
        self.inject_frame(p, f)
    }

    /// Frame `f` received on the dispatcher's interface `p`, and everything it leads to.
    fn inject_frame(&mut self, p: usize, f: Vec<u8>) -> Result<(), String> {
        let disp = self
            .disp
            .as_mut()
            .ok_or("no dispatcher core (dispatcher D ports N)")?;
        disp.ports
            .get_mut(p)
            .ok_or_else(|| format!("port {p}: no such interface"))?
            .push_rx(f);
        disp.core.set_now(self.now);
        let (core, ports, tx) = (&mut disp.core, &mut disp.ports, &mut disp.tx);
        core.receive_ports(ports, tx);
        core.take_reinjected(tx);
        self.collect_dispatcher();
        self.settle();
        Ok(())
    }

    fn tick(&mut self, ms: u64) {
        self.now += Duration::from_millis(ms);
        if let Some(disp) = self.disp.as_mut() {
            disp.core.set_now(self.now);
            disp.core.tick(&mut disp.ports);
            self.collect_dispatcher();
        }
        self.settle();
    }

    fn check(&self, w: &[&str]) -> Result<(), String> {
        let u = unit(w.first().ok_or("check UNIT …")?)?;
        let dp = self.dps.get(&u);
        let stats = match (dp, self.disp.as_ref().filter(|d| d.id == u)) {
            (Some(dp), _) => dp.core.snapshot(),
            (None, Some(d)) => d.core.snapshot(),
            _ => return Err(format!("check: no unit {u}")),
        };
        let (what, got, want): (String, u64, u64) = match w.get(1..) {
            Some(["drop", name, n]) => (
                format!("drop {name}"),
                stats.drops.get(*name).copied().unwrap_or(0),
                num(Some(n))?,
            ),
            Some(["counter", name, n]) => (
                format!("counter {name}"),
                stats.counters.get(*name).copied().unwrap_or(0),
                num(Some(n))?,
            ),
            Some(["flows", n]) => ("flows".into(), stats.flows, num(Some(n))?),
            Some(["version", n]) => ("version".into(), stats.config_version, num(Some(n))?),
            _ => {
                return Err(format!(
                    "{w:?}: check UNIT drop|counter NAME N, flows|version N"
                ))
            }
        };
        if got != want {
            return Err(format!(
                "unit {u}: {what} is {got}, expected {want} (drops {:?}, counters {:?})",
                stats.drops, stats.counters
            ));
        }
        Ok(())
    }
}

fn parse_mac(s: &str) -> Result<EthernetAddress, String> {
    let b: Vec<u8> = s
        .split(':')
        .map(|x| u8::from_str_radix(x, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| format!("{s}: not a MAC"))?;
    let b: [u8; 6] = b.try_into().map_err(|_| format!("{s}: not a MAC"))?;
    Ok(EthernetAddress(b))
}

fn mac_string(m: &[u8]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A frame a dispatcher sent: `to MAC PACKET`, or `arp who-has IP`.
fn describe_frame(f: &[u8]) -> String {
    let Some(et) = f.get(12..14).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
        return "runt".into();
    };
    match et {
        ethertype::ARP => {
            let op = f.get(20..22).map(|b| u16::from_be_bytes([b[0], b[1]]));
            let target = f
                .get(38..42)
                .map(|b| Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string())
                .unwrap_or_default();
            match op {
                Some(1) => format!("arp who-has {target}"),
                _ => format!("arp reply to {target}"),
            }
        }
        _ => format!("to {} {}", mac_string(&f[..6]), describe_ip(&f[14..])),
    }
}

/// Run one case file; `Err` names the line that failed and what was seen.
pub fn run_case(text: &str) -> Result<(), String> {
    let mut w = World::new();
    let mut started = false;
    let lines: Vec<(usize, Vec<&str>)> = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            (
                i + 1,
                l.split('#')
                    .next()
                    .unwrap_or("")
                    .split_whitespace()
                    .collect(),
            )
        })
        .filter(|(_, l): &(usize, Vec<&str>)| !l.is_empty())
        .collect();
    let mut i = 0;
    while i < lines.len() {
        let (n, words) = &lines[i];
        let at = |e: String| format!("line {n}: {e}");
        let (cmd, args) = (words[0], &words[1..]);
        let setup = matches!(cmd, "dataplanes" | "dispatchers" | "buckets" | "dispatcher");
        if setup {
            if started {
                return Err(at(format!(
                    "{cmd}: setup lines come before the first input"
                )));
            }
        } else if !started && !matches!(cmd, "table" | "backup" | "export" | "firewall") {
            w.start().map_err(at)?;
            started = true;
        }
        w.log.clear();
        let input = match cmd {
            "dataplanes" => {
                w.dataplanes = args
                    .iter()
                    .map(|a| unit(a))
                    .collect::<Result<_, _>>()
                    .map_err(at)?;
                false
            }
            "dispatchers" => {
                w.dispatchers = args
                    .iter()
                    .map(|a| unit(a))
                    .collect::<Result<_, _>>()
                    .map_err(at)?;
                false
            }
            "buckets" => {
                let (Some(n), Some(&"owner"), Some(o)) = (args.first(), args.get(1), args.get(2))
                else {
                    return Err(at("buckets N owner UNIT".into()));
                };
                let n: usize = num(Some(n)).map_err(at)?;
                w.buckets = vec![(unit(o).map_err(at)?, Vec::new()); n];
                false
            }
            "firewall" => {
                w.default_action = match args {
                    ["default", "accept"] => Action::Accept,
                    ["default", "drop"] => Action::Drop,
                    ["default", "reject"] => Action::Reject,
                    _ => return Err(at("firewall default accept|drop|reject".into())),
                };
                false
            }
            "dispatcher" => {
                match args {
                    [_, "ports", p] => w.disp_ports = num(Some(p)).map_err(at)?,
                    _ => return Err(at("dispatcher D ports N".into())),
                }
                false
            }
            "table" => {
                let ["bucket", b, "owner", o, rest @ ..] = args else {
                    return Err(at("table bucket B owner U [history U…]".into()));
                };
                let b: usize = num(Some(b)).map_err(at)?;
                let history = match rest {
                    [] => Vec::new(),
                    ["history", h @ ..] => h
                        .iter()
                        .map(|u| unit(u))
                        .collect::<Result<_, _>>()
                        .map_err(at)?,
                    _ => return Err(at("history U…".into())),
                };
                let slot = w
                    .buckets
                    .get_mut(b)
                    .ok_or_else(|| at(format!("no bucket {b}")))?;
                *slot = (unit(o).map_err(at)?, history);
                false
            }
            "backup" => {
                let [b, u] = args else {
                    return Err(at("backup BUCKET UNIT".into()));
                };
                w.backups
                    .insert(num(Some(b)).map_err(at)?, unit(u).map_err(at)?);
                false
            }
            "export" => {
                for a in args.iter() {
                    w.export.insert(unit(a).map_err(at)?);
                }
                false
            }
            "push" => {
                w.push(args).map_err(at)?;
                true
            }
            "send" => {
                w.send(args).map_err(at)?;
                true
            }
            "frame" => {
                w.frame(args).map_err(at)?;
                true
            }
            "tick" => {
                w.tick(num(args.first()).map_err(at)?);
                true
            }
            "kill" => {
                w.dead
                    .insert(unit(args.first().ok_or_else(|| at("kill UNIT".into()))?).map_err(at)?);
                true
            }
            "lose" | "hold" => {
                let p = args.join(" ");
                w.faults.push(if cmd == "lose" {
                    Fault::Lose(p)
                } else {
                    Fault::Hold(p)
                });
                false
            }
            "release" => {
                for (from, to, d) in std::mem::take(&mut w.held) {
                    w.deliver(from, to, d);
                }
                w.settle();
                true
            }
            "check" => {
                w.check(args).map_err(at)?;
                false
            }
            "expect" => return Err(at("`expect` without an input above it".into())),
            other => return Err(at(format!("{other}: unknown command"))),
        };
        i += 1;
        if !input {
            continue;
        }
        let mut want = Vec::new();
        while let Some((_, l)) = lines.get(i).filter(|(_, l)| l[0] == "expect") {
            want.push(l[1..].join(" "));
            i += 1;
        }
        let got = std::mem::take(&mut w.log);
        let matches = got.len() == want.len()
            && got
                .iter()
                .zip(&want)
                .all(|(g, x)| match x.strip_suffix("...") {
                    Some(prefix) => g.starts_with(prefix.trim_end()),
                    None => g == x,
                });
        if !matches {
            return Err(format!(
                "line {n} ({}): outputs differ\n  expected:\n{}\n  got:\n{}",
                words.join(" "),
                want.iter()
                    .map(|l| format!("    expect {l}\n"))
                    .collect::<String>(),
                got.iter()
                    .map(|l| format!("    expect {l}\n"))
                    .collect::<String>(),
            ));
        }
    }
    let _ = w.start;
    Ok(())
}

#[test]
fn conformance_cases() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/conformance")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    let mut failed = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("case file");
        if let Err(e) = run_case(&text) {
            failed.push(format!("{}: {e}", f.display()));
        }
    }
    assert!(failed.is_empty(), "\n{}", failed.join("\n\n"));
    assert!(files.len() >= 6, "cases in {}", dir.display());
}
