//! A dispatcher on several cores: `runtime.dispatcher_threads` lanes, each a whole
//! [`Dispatcher`](super::Dispatcher) on a thread of its own.
//!
//! ```text
//!  interface ──fanout / rx queues──> lane 0 ─┐        ┌─> data plane (returns to the lane
//!            (symmetric flow hash)   lane 1 ─┼─GENEVE─┤    that sent it: lane i is port + i)
//!                                    lane n ─┘        └─> ...
//!  unit thread (crate::lanes): config fan-out (all lanes or none acknowledged), inspection,
//!  stats merge
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use dva_wire::EthernetAddress;

/// Messages a lane's inbox holds at most; a full inbox drops (counted): a neighbour is learned
/// again from its next ARP/ND message, a health check retries.
const INBOX: usize = 4096;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::FakeTx;
    use crate::dispatcher::Core;
    use crate::reply;
    use dva_flow::BucketTable;
    use dva_io::RxMeta;
    use dva_proto::role::{BackplaneAuth, InterfaceConfig, RuntimeConfig, UnitEndpoint};
    use dva_proto::DispatcherConfig;
    use dva_wire::ethertype;
    use std::net::Ipv4Addr;
    use std::time::Instant;

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
