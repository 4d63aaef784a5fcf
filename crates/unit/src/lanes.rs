//! A unit on several cores: its lanes, each a whole role ([`Dispatcher`](crate::dispatcher) or
//! [`Dataplane`](crate::dataplane)) on a thread of its own, and the unit thread between them and
//! the control socket.
//!
//! ```text
//!  manager ──config──> unit thread ──the same config──> lane 0, lane 1, ... (ACK: all took it)
//!  control socket ──inspection──> unit thread ──> lane 0 (config) or every lane (flows,
//!                                                  capture, monitor), answers merged
//!  stats: every lane publishes its own; the unit thread publishes their sum
//! ```
//!
//! The lanes share nothing on the packet path; how a role splits its work over them is the
//! role's (a dispatcher: each lane its share of every interface's frames; a data plane: each
//! lane its share of the flow buckets).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::channel::Update;
use crate::inspect::{FlowList, Request, Requests};
use crate::stats::{StatsCell, UnitStats};

/// How long the unit thread waits for every lane to take a config.
const APPLY_TIMEOUT: Duration = Duration::from_secs(8);

/// A role's data path as one lane of a unit.
pub trait Lane: Send + 'static {
    /// Serve until `stop`, taking configs from `updates` and inspection from `requests`,
    /// publishing counters to `stats`.
    fn run(
        &mut self,
        stop: &AtomicBool,
        stats: &StatsCell,
        updates: &Receiver<Update>,
        requests: &Requests,
    ) -> anyhow::Result<()>;

    fn snapshot(&self) -> UnitStats;
}

/// A lane's own ends of what the unit thread hands it.
struct LaneEnds {
    updates: mpsc::Sender<Update>,
    requests: SyncSender<Request>,
    stats: StatsCell,
}

/// Run `lanes` until `stop`: each on a thread of its own (pinned by `pin(lane)`), while this
/// thread fans configs out to all of them, routes inspection requests and merges their stats
/// into `stats`. One lane ending (an error, a panic) stops them all: its share of the work
/// would go unserved.
pub fn run<L: Lane>(
    lanes: Vec<L>,
    stop: &Arc<AtomicBool>,
    stats: &StatsCell,
    updates: &Receiver<Update>,
    requests: &Requests,
    pin: impl Fn(usize) -> anyhow::Result<()> + Send + Sync + Clone + 'static,
) -> anyhow::Result<()> {
    let mut ends = Vec::new();
    let mut threads = Vec::new();
    for (i, mut lane) in lanes.into_iter().enumerate() {
        let (utx, urx) = mpsc::channel();
        let (rtx, rrx) = mpsc::sync_channel(16);
        let cell = StatsCell::new(lane.snapshot());
        let (stop, lane_stats, pin) = (stop.clone(), cell.clone(), pin.clone());
        let t = std::thread::Builder::new()
            .name(format!("dva-lane-{i}"))
            .spawn(move || -> anyhow::Result<()> {
                let r = pin(i).and_then(|()| lane.run(&stop, &lane_stats, &urx, &rrx));
                stop.store(true, Ordering::Relaxed);
                r
            })
            .context("starting a lane")?;
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
            Err(_) if result.is_ok() => result = Err(anyhow::anyhow!("a lane panicked")),
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
            let _ = u.reply.send(Err(format!("lane {i} has stopped")));
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

/// Inspection: the config is lane 0's; flows are every lane's (each holds its buckets'),
/// listed together up to the filter's limit; a capture taps every lane (each takes its share
/// of the packets, the reader stops at the count), and a monitor session watches every lane
/// (each with a share of its event rate).
fn route(ends: &[LaneEnds], r: Request) {
    match r {
        Request::Flows { filter, reply } => {
            let limit = filter.limit;
            let answers = ask_every_lane(ends, |tx| Request::Flows {
                filter: filter.clone(),
                reply: tx,
            });
            let _ = reply.try_send(merge_flows(answers, limit));
        }
        Request::Monitor { session, reply } => {
            let lanes = u32::try_from(ends.len()).unwrap_or(u32::MAX);
            let answers = ask_every_lane(ends, |tx| Request::Monitor {
                session: session.fork(lanes),
                reply: tx,
            });
            let _ = reply.try_send(first(answers));
        }
        Request::Capture {
            interface,
            tap,
            reply,
        } => {
            let answers = ask_every_lane(ends, |tx| Request::Capture {
                interface: interface.clone(),
                tap: tap.fork(),
                reply: tx,
            });
            let _ = reply.try_send(first(answers));
        }
        other => {
            if let Some(e) = ends.first() {
                let _ = e.requests.try_send(other);
            }
        }
    }
}

/// Send every lane the request `make` builds around a reply channel of its own, and collect
/// the answers in lane order (a lane that does not answer within 2 s, an error).
fn ask_every_lane<T>(
    ends: &[LaneEnds],
    make: impl Fn(SyncSender<Result<T, String>>) -> Request,
) -> Vec<Result<T, String>> {
    let mut waits = Vec::new();
    for (i, e) in ends.iter().enumerate() {
        let (tx, rx) = mpsc::sync_channel(1);
        if e.requests.try_send(make(tx)).is_ok() {
            waits.push((i, rx));
        }
    }
    if waits.is_empty() {
        return vec![Err("the unit's lanes did not answer".into())];
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    waits
        .into_iter()
        .map(|(i, rx)| {
            rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| Err(format!("lane {i} did not answer")))
        })
        .collect()
}

/// Lane 0's answer (every lane answers alike; lane 0's names the tap point).
fn first<T>(answers: Vec<Result<T, String>>) -> Result<T, String> {
    answers
        .into_iter()
        .next()
        .unwrap_or_else(|| Err("the unit's lanes did not answer".into()))
}

/// Every lane's flows as one listing of at most `limit`: cut (and said so) when the lanes
/// together hold more. A lane's error is the answer: a listing missing a lane's flows would
/// look complete.
fn merge_flows(answers: Vec<Result<FlowList, String>>, limit: usize) -> Result<FlowList, String> {
    let mut out = FlowList::default();
    for a in answers {
        let l = a?;
        out.truncated |= l.truncated;
        out.flows.extend(l.flows);
    }
    if out.flows.len() > limit {
        out.flows.truncate(limit);
        out.truncated = true;
    }
    Ok(out)
}

fn merged(ends: &[LaneEnds]) -> UnitStats {
    let lanes: Vec<UnitStats> = ends.iter().map(|e| e.stats.snapshot()).collect();
    merge(&lanes)
}

/// The lanes' stats as one unit's: counters summed, interfaces summed by position, the health
/// checks lane 0's (a dispatcher probes from lane 0); flows, per-bucket counts, backends (by
/// name), rule hits and handover latencies summed (a data plane's lanes hold disjoint
/// buckets); per-lane receive counts as `lane<i>_rx_frames` (how evenly the work spreads).
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
        out.flows += l.flows;
        out.active_flows += l.active_flows;
        out.bucket_flows.extend_from_slice(&l.bucket_flows);
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
        for b in &l.backends {
            match out.backends.iter_mut().find(|o| {
                (&o.service, &o.backend, o.addr, o.port) == (&b.service, &b.backend, b.addr, b.port)
            }) {
                Some(o) => {
                    o.new_flows += b.new_flows;
                    o.active_flows += b.active_flows;
                    o.packets += b.packets;
                    o.bytes += b.bytes;
                }
                None => out.backends.push(b.clone()),
            }
        }
        for r in &l.rules {
            match out.rules.iter_mut().find(|o| o.rule == r.rule) {
                Some(o) => o.hits += r.hits,
                None => out.rules.push(r.clone()),
            }
        }
        if let (Some(o), Some(h)) = (out.latency.handover.as_mut(), &l.latency.handover) {
            o.add(h);
        }
        // The oldest config any lane serves is the unit's.
        out.config_version = out.config_version.min(l.config_version);
    }
    out.bucket_flows.sort_unstable();
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
    use crate::inspect::FlowEntry;
    use crate::stats::{Histogram, InterfaceStats, Latencies, RuleHits, HANDOVER_BOUNDS};

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
    fn data_plane_lanes_add_up_flows_buckets_rules_and_handovers() {
        let lane = |flows: u64, bucket: u16, hits: u64| {
            let mut h = Histogram::new(HANDOVER_BOUNDS);
            h.observe(Duration::from_millis(1));
            UnitStats {
                unit: 5,
                role: "dataplane".into(),
                flows,
                active_flows: flows,
                bucket_flows: vec![(bucket, flows as u32)],
                rules: vec![RuleHits {
                    rule: "ssh".into(),
                    hits,
                }],
                latency: Latencies {
                    handover: Some(h),
                    ..Default::default()
                },
                ..Default::default()
            }
        };
        let m = merge(&[lane(3, 4, 1), lane(5, 1, 2)]);
        assert_eq!((m.flows, m.active_flows), (8, 8));
        assert_eq!(m.bucket_flows, vec![(1, 5), (4, 3)]);
        assert_eq!(m.rules[0].hits, 3);
        assert_eq!(m.latency.handover.as_ref().map(Histogram::count), Some(2));
    }

    #[test]
    fn flow_listings_of_every_lane_are_one_cut_at_the_limit() {
        let entry = |port: u16| FlowEntry {
            unit: 5,
            proto: 6,
            src: "198.18.0.1".parse().expect("ip"),
            src_port: port,
            dst: "198.18.1.1".parse().expect("ip"),
            dst_port: 80,
            bucket: 0,
            state: "established".into(),
            replica: false,
            previous_owner: false,
            nat: None,
            backend: None,
            orig_packets: 0,
            orig_bytes: 0,
            reply_packets: 0,
            reply_bytes: 0,
            age_secs: 0.0,
            idle_secs: 0.0,
        };
        let list = |ports: &[u16]| {
            Ok(FlowList {
                flows: ports.iter().map(|p| entry(*p)).collect(),
                truncated: false,
            })
        };
        let all = merge_flows(vec![list(&[1, 2]), list(&[3])], 10).expect("merged");
        assert_eq!(all.flows.len(), 3);
        assert!(!all.truncated);
        let cut = merge_flows(vec![list(&[1, 2]), list(&[3])], 2).expect("merged");
        assert_eq!((cut.flows.len(), cut.truncated), (2, true));
        assert!(merge_flows(vec![list(&[1]), Err("lane 1 did not answer".into())], 10).is_err());
    }
}
