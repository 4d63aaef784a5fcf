//! A dispatcher on several cores: `runtime.dispatcher_threads` lanes, each a whole
//! [`Dispatcher`] on a thread of its own.
//!
//! ```text
//!  interface ──fanout / rx queues──> lane 0 ─┐        ┌─> data plane (returns to the lane
//!            (symmetric flow hash)   lane 1 ─┼─GENEVE─┤    that sent it: lane i is port + i)
//!                                    lane n ─┘        └─> ...
//!  unit thread: config fan-out (all lanes or none acknowledged), inspection, stats merge
//! ```
//!
//! The lanes share nothing on the packet path: each has its interfaces' sockets for its share
//! of the frames (AF_PACKET fanout, AF_XDP receive queues; see `Device::open_lanes`), its own
//! backplane socket and rings, its own sealer (a sender id of its own, the unit's with the lane
//! in its top bits, so receivers keep a replay window per lane), its own counters. The dispatcher keeps no per-flow state, so which lane a packet reaches only
//! matters for what one lane learns for all or does for all:
//! - neighbours: every ARP frame reaches lane 0 (the fanout hash of a non-IP frame is 0) and a
//!   neighbour advertisement the lane its addresses hash to; what a lane learns it tells the
//!   others ([`LaneMsg::Neighbor`]), so each can resolve its next hops;
//! - health checks run on lane 0 alone; a backend's answer hashed to another lane is handed
//!   to lane 0 ([`LaneMsg::Probe`]).
//!
//! Lanes read their inbox once a turn; an idle lane sleeps up to 20 ms in poll(2) first, which
//! bounds how late a neighbour reaches it (frames waiting for it stay queued meanwhile).

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use dva_wire::EthernetAddress;

use super::Dispatcher;
use crate::channel::Update;
use crate::inspect::{Request, Requests};
use crate::stats::{StatsCell, UnitStats};

/// Messages a lane's inbox holds at most; a full inbox drops (counted): a neighbour is learned
/// again from its next ARP/ND message, a health check retries.
const INBOX: usize = 4096;

/// How long the unit thread waits for every lane to take a config.
const APPLY_TIMEOUT: Duration = Duration::from_secs(8);

/// What one lane hands another.
#[derive(Debug)]
pub enum LaneMsg {
    /// A neighbour learned on `interface`.
    Neighbor {
        interface: usize,
        ip: IpAddr,
        mac: EthernetAddress,
    },
    /// A health-check answer that reached another lane than the one probing (lane 0).
    Probe {
        interface: usize,
        src_mac: EthernetAddress,
        ip: Vec<u8>,
    },
}

/// A lane's ends of the lanes' inboxes.
pub struct LaneIo {
    to: Vec<SyncSender<LaneMsg>>,
    inbox: Receiver<LaneMsg>,
    dropped: Arc<AtomicU64>,
}

impl LaneIo {
    /// One `LaneIo` per lane, each able to reach every other.
    pub fn mesh(n: usize) -> Vec<LaneIo> {
        let (tx, rx): (Vec<_>, Vec<_>) = (0..n).map(|_| mpsc::sync_channel(INBOX)).unzip();
        let dropped = Arc::new(AtomicU64::new(0));
        rx.into_iter()
            .map(|inbox| LaneIo {
                to: tx.clone(),
                inbox,
                dropped: dropped.clone(),
            })
            .collect()
    }

    /// What the other lanes sent since the last turn.
    pub fn inbox(&self) -> impl Iterator<Item = LaneMsg> + '_ {
        self.inbox.try_iter()
    }

    /// Hand `msgs` from lane `me` to the lanes they are for.
    pub fn send(&self, me: u16, msgs: Vec<LaneMsg>) {
        for msg in msgs {
            match msg {
                LaneMsg::Neighbor { interface, ip, mac } => {
                    for (i, to) in self.to.iter().enumerate() {
                        if i != usize::from(me) {
                            self.deliver(to, LaneMsg::Neighbor { interface, ip, mac });
                        }
                    }
                }
                probe @ LaneMsg::Probe { .. } => {
                    if let Some(to) = self.to.first() {
                        self.deliver(to, probe);
                    }
                }
            }
        }
    }

    fn deliver(&self, to: &SyncSender<LaneMsg>, msg: LaneMsg) {
        if let Err(TrySendError::Full(_)) = to.try_send(msg) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// A lane's own ends of what the unit thread hands it.
struct LaneEnds {
    updates: mpsc::Sender<Update>,
    requests: SyncSender<Request>,
    stats: StatsCell,
}

/// Run `lanes` (from [`Dispatcher::open`]) until `stop`: each on a thread of its own (pinned by
/// `pin(lane)`), while this thread fans configs out to all of them, routes inspection requests
/// and merges their stats into `stats`.
pub fn run(
    lanes: Vec<Dispatcher>,
    stop: &Arc<AtomicBool>,
    stats: &StatsCell,
    updates: &Receiver<Update>,
    requests: &Requests,
    pin: impl Fn(usize) -> anyhow::Result<()> + Send + Sync + Clone + 'static,
) -> anyhow::Result<()> {
    let n = lanes.len();
    let mut ends = Vec::new();
    let mut threads = Vec::new();
    for (i, (mut lane, io)) in lanes.into_iter().zip(LaneIo::mesh(n)).enumerate() {
        lane.lane_io = Some(io);
        let (utx, urx) = mpsc::channel();
        let (rtx, rrx) = mpsc::sync_channel(16);
        let cell = StatsCell::new(lane.snapshot());
        let (stop, lane_stats, pin) = (stop.clone(), cell.clone(), pin.clone());
        let t = std::thread::Builder::new()
            .name(format!("dva-lane-{i}"))
            .spawn(move || -> anyhow::Result<()> {
                pin(i)?;
                let r = lane.run(&stop, &lane_stats, &urx, &rrx);
                // One lane ending (an error) ends the dispatcher: its share of every interface
                // would go unserved.
                stop.store(true, Ordering::Relaxed);
                r
            })
            .context("starting a dispatcher lane")?;
        threads.push(t);
        ends.push(LaneEnds {
            updates: utx,
            requests: rtx,
            stats: cell,
        });
    }
    let mut publish = crate::stats::Every::new(Duration::from_millis(100));
    while !stop.load(Ordering::Relaxed) {
        match updates.recv_timeout(Duration::from_millis(20)) {
            Ok(u) => apply(&ends, u),
            Err(RecvTimeoutError::Timeout) => {}
            // The unit channel is gone: keep serving the config we have.
            Err(RecvTimeoutError::Disconnected) => std::thread::sleep(Duration::from_millis(20)),
        }
        while let Ok(r) = requests.try_recv() {
            route(&ends, r);
        }
        if publish.due(Instant::now()) {
            stats.try_publish(merged(&ends));
        }
    }
    let mut result = Ok(());
    for t in threads {
        match t.join() {
            Ok(Err(e)) if result.is_ok() => result = Err(e),
            Err(_) if result.is_ok() => result = Err(anyhow::anyhow!("a dispatcher lane panicked")),
            _ => {}
        }
    }
    stats.try_publish(merged(&ends));
    result
}

/// Hand a config to every lane; acknowledged when all took it. A lane refusing what another
/// took can only be a local failure (its rings: tmpfs full), as every lane checks the same
/// config against the same state; the NACK names it and the manager sends the next version.
fn apply(ends: &[LaneEnds], u: Update) {
    let mut waits = Vec::new();
    for (i, e) in ends.iter().enumerate() {
        let (tx, rx) = mpsc::channel();
        let lane_update = Update {
            config: u.config.clone(),
            reply: tx,
        };
        if e.updates.send(lane_update).is_err() {
            let _ = u
                .reply
                .send(Err(format!("dispatcher lane {i} has stopped")));
            return;
        }
        waits.push(rx);
    }
    let deadline = Instant::now() + APPLY_TIMEOUT;
    let mut result = Ok(());
    for (i, rx) in waits.into_iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        let r = match rx.recv_timeout(left) {
            Ok(r) => r.map_err(|e| format!("lane {i}: {e}")),
            Err(_) => Err(format!("lane {i} did not answer in time")),
        };
        if result.is_ok() {
            result = r;
        }
    }
    let _ = u.reply.send(result);
}

/// Inspection: the config is lane 0's; a capture taps every lane (each takes its share of the
/// packets, the reader stops at the count), and a monitor session watches every lane (each with
/// a share of its event rate).
fn route(ends: &[LaneEnds], r: Request) {
    match r {
        Request::Monitor { session, reply } => {
            let lanes = u32::try_from(ends.len()).unwrap_or(u32::MAX);
            let answer = ask_every_lane(ends, |tx| Request::Monitor {
                session: session.fork(lanes),
                reply: tx,
            });
            let _ = reply.try_send(answer);
        }
        Request::Capture {
            interface,
            tap,
            reply,
        } => {
            let answer = ask_every_lane(ends, |tx| Request::Capture {
                interface: interface.clone(),
                tap: tap.fork(),
                reply: tx,
            });
            let _ = reply.try_send(answer);
        }
        other => {
            if let Some(e) = ends.first() {
                let _ = e.requests.try_send(other);
            }
        }
    }
}

/// Send every lane the request `make` builds around a reply channel of its own, and return lane
/// 0's answer (every lane answers the same; lane 0's names the tap point).
fn ask_every_lane<T>(
    ends: &[LaneEnds],
    make: impl Fn(SyncSender<Result<T, String>>) -> Request,
) -> Result<T, String> {
    let mut answers = Vec::new();
    for e in ends {
        let (tx, rx) = mpsc::sync_channel(1);
        if e.requests.try_send(make(tx)).is_ok() {
            answers.push(rx);
        }
    }
    answers
        .first()
        .and_then(|rx| rx.recv_timeout(Duration::from_secs(2)).ok())
        .unwrap_or_else(|| Err("the dispatcher's lanes did not answer".into()))
}

/// The lanes' stats as one unit's: counters summed, interfaces summed by position, the health
/// checks lane 0's; per-lane receive counts as `lane<i>_rx_frames` (how evenly the hash spreads).
fn merged(ends: &[LaneEnds]) -> UnitStats {
    let lanes: Vec<UnitStats> = ends.iter().map(|e| e.stats.snapshot()).collect();
    merge(&lanes)
}

pub fn merge(lanes: &[UnitStats]) -> UnitStats {
    let Some(first) = lanes.first() else {
        return UnitStats::default();
    };
    let mut out = first.clone();
    for l in &lanes[1..] {
        out.rx_packets += l.rx_packets;
        out.rx_bytes += l.rx_bytes;
        out.tx_packets += l.tx_packets;
        out.tx_bytes += l.tx_bytes;
        for (k, v) in &l.drops {
            *out.drops.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &l.counters {
            *out.counters.entry(k.clone()).or_default() += v;
        }
        for (o, i) in out.interfaces.iter_mut().zip(&l.interfaces) {
            o.rx_frames += i.rx_frames;
            o.rx_bytes += i.rx_bytes;
            o.tx_frames += i.tx_frames;
            o.tx_bytes += i.tx_bytes;
            o.ring_drops += i.ring_drops;
        }
        // The oldest config any lane serves is the dispatcher's.
        out.config_version = out.config_version.min(l.config_version);
    }
    out.counters.insert("lanes".into(), lanes.len() as u64);
    for (i, l) in lanes.iter().enumerate() {
        out.counters
            .insert(format!("lane{i}_rx_frames"), l.rx_packets);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::FakeTx;
    use crate::dispatcher::Core;
    use crate::reply;
    use crate::stats::InterfaceStats;
    use dva_flow::BucketTable;
    use dva_io::RxMeta;
    use dva_proto::role::{BackplaneAuth, InterfaceConfig, RuntimeConfig, UnitEndpoint};
    use dva_proto::DispatcherConfig;
    use dva_wire::ethertype;
    use std::net::Ipv4Addr;

    const OURS: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 1]);
    const PEER: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 9]);

    /// Lane `lane` of 2 of a dispatcher with one interface, 198.18.1.1/24.
    fn lane(lane: u16) -> Core {
        let cfg = DispatcherConfig {
            appliance: "lanes".into(),
            version: 1,
            vni: 7,
            unit: 1,
            listen: "198.19.0.1:6081".parse().expect("addr"),
            interfaces: vec![InterfaceConfig {
                id: 0,
                name: "outside".into(),
                device: "out0".into(),
                addresses: vec!["198.18.1.1/24".parse().expect("net")],
            }],
            routes: Vec::new(),
            dataplanes: vec![UnitEndpoint {
                id: 2,
                addr: "198.19.0.2:6081".parse().expect("addr"),
            }],
            table: BucketTable::maglev(64, &[2]).expect("table"),
            fenced: Vec::new(),
            service_addrs: Vec::new(),
            dnat_reverse: Vec::new(),
            health_checks: Vec::new(),
            runtime: RuntimeConfig {
                dispatcher_threads: 2,
                ..RuntimeConfig::default()
            },
            backplane: BackplaneAuth::default(),
        };
        let mut core =
            Core::with_links(Arc::new(cfg), &[(OURS, 1500)], Instant::now()).expect("core");
        core.lane = lane;
        core.lanes = 2;
        core
    }

    fn frame(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        reply::ethernet(&mut f, OURS, PEER, ethertype);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn a_lane_shares_what_it_learns_and_hands_probe_answers_to_lane_zero() {
        let neighbour = Ipv4Addr::new(198, 18, 1, 2);
        let (mut lane0, mut lane1) = (lane(0), lane(1));
        let mut bp = FakeTx::default();
        // An ARP reply reaches lane 1: it learns the neighbour and tells the other lane.
        let mut arp = Vec::new();
        reply::arp(
            &mut arp,
            2,
            PEER,
            neighbour,
            OURS,
            Ipv4Addr::new(198, 18, 1, 1),
        );
        lane1.on_frame(0, &frame(ethertype::ARP, &arp), RxMeta::default(), &mut bp);
        let now = lane1.now;
        assert_eq!(
            lane1.links[0].neigh.lookup(&neighbour.into(), now),
            Some(PEER)
        );
        let msgs = std::mem::take(&mut lane1.lane_out);
        assert!(
            matches!(msgs[..], [LaneMsg::Neighbor { interface: 0, .. }]),
            "{msgs:?}"
        );
        assert_eq!(lane0.links[0].neigh.lookup(&neighbour.into(), now), None);
        for m in msgs {
            lane0.on_lane_msg(m);
        }
        assert_eq!(
            lane0.links[0].neigh.lookup(&neighbour.into(), now),
            Some(PEER)
        );

        // A backend's answer to a health probe (to a probe port of ours) on lane 1 goes to lane
        // 0, which sent the probe; lane 1 answers nothing itself.
        let mut seg = Vec::new();
        reply::tcp_segment(
            &mut seg,
            neighbour.into(),
            Ipv4Addr::new(198, 18, 1, 1).into(),
            80,
            crate::dispatcher::health::PORT_FIRST + 1,
            1000,
            1,
            0x12,
            &[],
        )
        .expect("segment");
        lane1.on_frame(0, &frame(ethertype::IPV4, &seg), RxMeta::default(), &mut bp);
        assert!(lane1.deferred.is_empty(), "lane 1 does not answer probes");
        assert!(
            matches!(&lane1.lane_out[..], [LaneMsg::Probe { interface: 0, ip, .. }] if *ip == seg),
            "{:?}",
            lane1.lane_out
        );
        // Lane 0 alone keeps answering it: a single-lane dispatcher is unchanged.
        lane0.on_frame(0, &frame(ethertype::IPV4, &seg), RxMeta::default(), &mut bp);
        assert!(lane0.lane_out.is_empty());
    }

    #[test]
    fn lanes_stats_add_up_and_show_the_spread() {
        let lane = |rx: u64, version: u64| UnitStats {
            unit: 1,
            role: "dispatcher".into(),
            config_version: version,
            rx_packets: rx,
            tx_packets: rx / 2,
            drops: [("no_route".to_string(), 1)].into(),
            counters: [("to_dataplane".to_string(), rx)].into(),
            interfaces: vec![InterfaceStats {
                name: "out".into(),
                rx_frames: rx,
                ..Default::default()
            }],
            ..Default::default()
        };
        let m = merge(&[lane(10, 5), lane(30, 4)]);
        assert_eq!((m.rx_packets, m.tx_packets), (40, 20));
        assert_eq!(m.drops["no_route"], 2);
        assert_eq!(m.counters["to_dataplane"], 40);
        assert_eq!(m.interfaces[0].rx_frames, 40);
        assert_eq!(m.config_version, 4);
        assert_eq!(m.counters["lanes"], 2);
        assert_eq!(
            (m.counters["lane0_rx_frames"], m.counters["lane1_rx_frames"]),
            (10, 30)
        );
    }

    #[test]
    fn neighbours_reach_every_other_lane_and_probes_lane_zero() {
        let io = LaneIo::mesh(3);
        let mac = EthernetAddress([2, 0, 0, 0, 0, 1]);
        let ip: IpAddr = "198.18.0.1".parse().expect("ip");
        io[1].send(
            1,
            vec![
                LaneMsg::Neighbor {
                    interface: 0,
                    ip,
                    mac,
                },
                LaneMsg::Probe {
                    interface: 1,
                    src_mac: mac,
                    ip: vec![0x45],
                },
            ],
        );
        let got: Vec<Vec<LaneMsg>> = io.iter().map(|l| l.inbox().collect()).collect();
        assert_eq!(got[0].len(), 2, "lane 0: the neighbour and the probe");
        assert!(got[1].is_empty(), "not back to the sender");
        assert!(matches!(got[2][..], [LaneMsg::Neighbor { .. }]));
    }
}
