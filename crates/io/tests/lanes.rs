//! Lanes: one interface opened as several ports, one per data-path thread, across a veth pair
//! between two throwaway namespaces (needs root; the AF_XDP cases need dva-io built with
//! clang).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;
use dva_io::af_packet::{AfPacket, AfPacketConfig};
use dva_io::af_xdp::BUILT;
use dva_io::poll::Poller;
use dva_io::port::{DriverChoice, Port};
use dva_io::{netns, FrameIo};

const WAIT: Duration = Duration::from_secs(3);
/// Marks our frames' payload, followed by a 32-bit sequence number.
const MAGIC: &[u8; 9] = b"dva-lanes";

/// Which group of frames must share a lane: a flow in both directions, or the fragments of one
/// datagram.
type Group = String;

/// Frames to send, each with its sequence number and group.
#[derive(Default)]
struct Traffic {
    frames: Vec<(u32, Group, Vec<u8>)>,
}

impl Traffic {
    fn next_seq(&self) -> u32 {
        self.frames.len() as u32
    }

    fn payload(&self) -> Vec<u8> {
        let mut p = MAGIC.to_vec();
        p.extend_from_slice(&self.next_seq().to_be_bytes());
        p
    }

    /// An IPv4 frame from MAC_B to MAC_A: `l4` after an IP header with `proto` and `frag`.
    fn ipv4(&mut self, group: Group, src: [u8; 4], dst: [u8; 4], proto: u8, frag: u16, l4: &[u8]) {
        let mut f = eth(0x0800);
        let total = (20 + l4.len()) as u16;
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&[0x12, 0x34]);
        ip.extend_from_slice(&frag.to_be_bytes());
        ip.extend_from_slice(&[64, proto, 0, 0]);
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        let sum = checksum(&ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(l4);
        let seq = self.next_seq();
        self.frames.push((seq, group, f));
    }

    fn udp4(&mut self, src: ([u8; 4], u16), dst: ([u8; 4], u16)) {
        let mut l4 = ports(src.1, dst.1);
        l4.extend_from_slice(&[0, 0, 0, 0]); // length, checksum (none)
        l4.extend_from_slice(&self.payload());
        let len = l4.len() as u16;
        l4[4..6].copy_from_slice(&len.to_be_bytes());
        self.ipv4(flow(&src.0, src.1, &dst.0, dst.1), src.0, dst.0, 17, 0, &l4);
    }

    /// Both fragments of one UDP datagram: the first (MF, offset 0) with the UDP header, the
    /// second (offset 24 bytes) without.
    fn fragmented_udp4(&mut self, src: ([u8; 4], u16), dst: ([u8; 4], u16)) {
        let group = format!("fragments of {}", self.next_seq());
        let mut first = ports(src.1, dst.1);
        first.extend_from_slice(&[0, 48, 0, 0]);
        first.extend_from_slice(&self.payload());
        first.resize(24, 0);
        self.ipv4(group.clone(), src.0, dst.0, 17, 0x2000, &first);
        let second = self.payload();
        self.ipv4(group, src.0, dst.0, 17, 3, &second);
    }

    fn tcp6(&mut self, src: ([u8; 16], u16), dst: ([u8; 16], u16)) {
        let mut f = eth(0x86dd);
        let mut l4 = ports(src.1, dst.1);
        l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
        l4.extend_from_slice(&self.payload());
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        f.extend_from_slice(&[6, 64]);
        f.extend_from_slice(&src.0);
        f.extend_from_slice(&dst.0);
        f.extend_from_slice(&l4);
        let group = flow(&src.0, src.1, &dst.0, dst.1);
        let seq = self.next_seq();
        self.frames.push((seq, group, f));
    }
}

fn eth(ethertype: u16) -> Vec<u8> {
    let mut f = MAC_A.to_vec();
    f.extend_from_slice(&MAC_B);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

fn ports(src: u16, dst: u16) -> Vec<u8> {
    let mut p = src.to_be_bytes().to_vec();
    p.extend_from_slice(&dst.to_be_bytes());
    p
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A flow's name, the same in both directions.
fn flow(a: &[u8], a_port: u16, b: &[u8], b_port: u16) -> Group {
    let mut ends = [(a.to_vec(), a_port), (b.to_vec(), b_port)];
    ends.sort();
    format!("{ends:?}")
}

/// The sequence number of one of our frames.
fn seq_of(frame: &[u8]) -> Option<u32> {
    let at = frame.windows(MAGIC.len()).position(|w| w == MAGIC)? + MAGIC.len();
    let b = frame.get(at..at + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Receive on every lane until `done` says so or `timeout` passes, then a little longer so
/// that duplicates would show. `pick` turns a frame into a key (None: not ours); the result is
/// every key with the lanes it arrived on, once per arrival.
fn receive_on_lanes<T: FrameIo>(
    lanes: &mut [T],
    pick: impl Fn(&[u8]) -> Option<u32>,
    done: impl Fn(&BTreeMap<u32, Vec<usize>>) -> bool,
    timeout: Duration,
) -> BTreeMap<u32, Vec<usize>> {
    let fds: Vec<_> = lanes.iter().flat_map(|l| l.poll_fds()).collect();
    let mut poller = Poller::new(&fds);
    let mut got: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    let deadline = Instant::now() + timeout;
    let mut linger = None;
    loop {
        let now = Instant::now();
        if now >= deadline || linger.is_some_and(|l| now >= l) {
            return got;
        }
        let mut n = 0;
        for (lane, port) in lanes.iter_mut().enumerate() {
            n += port
                .rx_batch(64, |f, _| {
                    if let Some(key) = pick(f) {
                        got.entry(key).or_default().push(lane);
                    }
                })
                .unwrap();
        }
        if linger.is_none() && done(&got) {
            linger = Some(Instant::now() + Duration::from_millis(100));
        }
        if n == 0 {
            poller.wait(10).unwrap();
        }
    }
}

#[test]
fn af_packet_lanes_take_every_frame_once_and_keep_flows_together() {
    let lab = VethLab::new();
    let (mut lanes, opened) = netns::in_netns(&lab.ns_a, || {
        Port::open_lanes(&lab.dev_a, DriverChoice::AfPacket, 0, 2)
    })
    .unwrap()
    .unwrap();
    assert_eq!(lanes.len(), 2);
    assert_eq!(opened.driver, "af_packet");
    assert!(opened.fallback.is_none(), "{opened}");
    let mut peer = netns::in_netns(&lab.ns_b, || {
        AfPacket::open(&lab.dev_b, &AfPacketConfig::default())
    })
    .unwrap()
    .unwrap();

    // 40 UDP flows between two hosts, apart only by the client's port, 3 frames one way and
    // 2 back; 8 TCP flows over IPv6 (documentation prefix 2001:db8::/32), 2 each way; 8
    // datagrams in two fragments each.
    let (client, server) = ([198, 18, 0, 2], [198, 18, 0, 1]);
    let mut t = Traffic::default();
    for round in 0..5 {
        for i in 0..40 {
            let c = (client, 30000 + i);
            let s = (server, 5000);
            if round < 3 {
                t.udp4(c, s);
            } else {
                t.udp4(s, c);
            }
        }
    }
    let v6 = |host: u8| {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        a[15] = host;
        a
    };
    for round in 0..4 {
        for i in 0..8 {
            let c = (v6(2), 40000 + i);
            let s = (v6(1), 443);
            if round % 2 == 0 {
                t.tcp6(c, s);
            } else {
                t.tcp6(s, c);
            }
        }
    }
    for i in 0..8 {
        t.fragmented_udp4(([198, 18, 1, i], 53), (server, 5353));
    }
    let want = t.frames.len();
    assert_eq!(want, 200 + 32 + 16);
    send_all(&mut peer, t.frames.iter().map(|(_, _, f)| f.clone()));

    let got = receive_on_lanes(&mut lanes, seq_of, |got| got.len() == want, WAIT);
    let mut per_lane = [0usize; 2];
    let mut group_lane: BTreeMap<&Group, BTreeSet<usize>> = BTreeMap::new();
    for (seq, group, _) in &t.frames {
        let arrived = got.get(seq).map_or(&[][..], Vec::as_slice);
        assert_eq!(
            arrived.len(),
            1,
            "frame {seq} ({group}) arrived {arrived:?}"
        );
        per_lane[arrived[0]] += 1;
        group_lane.entry(group).or_default().insert(arrived[0]);
    }
    eprintln!("frames per lane: {per_lane:?}");
    assert!(per_lane.iter().all(|&n| n > 0), "{per_lane:?}");
    for (group, lanes) in &group_lane {
        assert_eq!(lanes.len(), 1, "{group} split over lanes {lanes:?}");
    }
    let flows_per_lane = [0, 1].map(|l| group_lane.values().filter(|s| s.contains(&l)).count());
    eprintln!("flows and datagrams per lane: {flows_per_lane:?}");

    // Every lane transmits.
    for (i, lane) in lanes.iter_mut().enumerate() {
        send_all(lane, [test_frame(MAC_A, MAC_B, 7000 + i as u32, 100)]);
    }
    let back = collect(&mut peer, 2, 64, WAIT);
    let seqs: BTreeSet<_> = back
        .iter()
        .map(|(f, _)| u32::from_be_bytes([f[14], f[15], f[16], f[17]]))
        .collect();
    assert_eq!(seqs, BTreeSet::from([7000, 7001]));
}

#[test]
fn each_set_of_af_packet_lanes_is_its_own_group() {
    let lab = VethLab::new();
    let cfg = AfPacketConfig::default();
    let open = |lanes| {
        netns::in_netns(&lab.ns_a, || AfPacket::open_lanes(&lab.dev_a, &cfg, lanes))
            .unwrap()
            .unwrap()
    };
    let (one, two) = (open(3), open(2));
    let ids = |set: &[AfPacket]| -> Vec<u16> {
        set.iter()
            .map(|p| p.fanout_group().expect("in a group").id())
            .collect()
    };
    let (a, b) = (ids(&one), ids(&two));
    assert!(a.iter().all(|&id| id == a[0]), "{a:?}");
    assert!(b.iter().all(|&id| id == b[0]), "{b:?}");
    assert_ne!(a[0], b[0]);
    // One lane is a plain socket.
    assert_eq!(open(1)[0].fanout_group(), None);
    let zero = netns::in_netns(&lab.ns_a, || AfPacket::open_lanes(&lab.dev_a, &cfg, 0)).unwrap();
    assert!(zero.is_err());
}

#[test]
fn af_xdp_lanes_split_the_receive_queues() {
    if !BUILT {
        eprintln!("skipped: dva-io was built without clang, so without the XDP program");
        return;
    }
    let lab = VethLab::with_queues(2);
    lab.disable_offloads();
    let opened = netns::in_netns(&lab.ns_b, || {
        Port::open_lanes(&lab.dev_b, DriverChoice::AfXdp, 0, 2)
    })
    .unwrap();
    let (mut lanes, opened) = match opened {
        Ok(l) => l,
        Err(e) => {
            eprintln!("skipped: AF_XDP on a 2-queue veth refused here: {e}");
            return;
        }
    };
    assert!(opened.driver.starts_with("af_xdp"), "{opened}");
    let queues: Vec<Vec<u32>> = lanes
        .iter()
        .map(|l| match l {
            Port::AfXdp(x) => x.queue_ids(),
            Port::AfPacket(_) => panic!("an AF_PACKET lane under AfXdp"),
        })
        .collect();
    assert_eq!(queues, [[0], [1]]);
    let mut peer = netns::in_netns(&lab.ns_a, || {
        AfPacket::open(&lab.dev_a, &AfPacketConfig::default())
    })
    .unwrap()
    .unwrap();

    // The sending kernel spreads flows over its two TX queues by hash, and each lands on the
    // peer's RX queue of the same number.
    lab.address_a_towards_b();
    const FLOWS: u16 = 64;
    netns::in_netns(&lab.ns_a, || {
        for i in 0..FLOWS {
            let s = std::net::UdpSocket::bind(("198.18.0.1", 20000 + i)).unwrap();
            s.send_to(MAGIC, "198.18.0.2:9").unwrap();
        }
    })
    .unwrap();
    let source_port = |f: &[u8]| {
        let ours = f.len() >= 42 && f[12..14] == [0x08, 0x00] && f[23] == 17;
        (ours && f[36..38] == [0, 9]).then(|| u32::from(u16::from_be_bytes([f[34], f[35]])))
    };
    let got = receive_on_lanes(
        &mut lanes,
        source_port,
        |got| got.len() == usize::from(FLOWS),
        WAIT,
    );
    let mut per_lane = [0usize; 2];
    for port in 20000..20000 + u32::from(FLOWS) {
        let arrived = got.get(&port).map_or(&[][..], Vec::as_slice);
        assert_eq!(
            arrived.len(),
            1,
            "datagram from port {port} arrived {arrived:?}"
        );
        per_lane[arrived[0]] += 1;
    }
    eprintln!("datagrams per lane: {per_lane:?}");
    assert!(per_lane.iter().all(|&n| n > 0), "{per_lane:?}");

    for (i, lane) in lanes.iter_mut().enumerate() {
        send_all(lane, [test_frame(MAC_B, MAC_A, 8000 + i as u32, 100)]);
    }
    let back = collect(&mut peer, 2, 64, WAIT);
    let seqs: BTreeSet<_> = back
        .iter()
        .map(|(f, _)| u32::from_be_bytes([f[14], f[15], f[16], f[17]]))
        .collect();
    assert_eq!(seqs, BTreeSet::from([8000, 8001]));

    // The program stays while any lane lives.
    let last = lanes.pop();
    drop(lanes);
    assert!(xdp_attached(&lab.ns_b, &lab.dev_b));
    drop(last);
    assert!(!xdp_attached(&lab.ns_b, &lab.dev_b));
}

#[test]
fn lanes_on_a_single_queue_device() {
    let lab = VethLab::new();
    lab.disable_offloads();
    let tso = netns::in_netns(&lab.ns_a, || dva_io::netif::tso_enabled(&lab.dev_a))
        .unwrap()
        .unwrap();
    if tso {
        eprintln!("skipped: ethtool could not turn TSO off, so auto takes AF_PACKET anyway");
        return;
    }
    // Forced AF_XDP: a clear refusal, before anything is attached.
    let err = netns::in_netns(&lab.ns_a, || {
        Port::open_lanes(&lab.dev_a, DriverChoice::AfXdp, 0, 2)
    })
    .unwrap()
    .err()
    .expect("AF_XDP lanes on one queue");
    let msg = err.to_string();
    assert!(
        msg.contains("has 1 receive queue; 2 dispatcher threads need one each"),
        "{msg}"
    );
    assert!(!xdp_attached(&lab.ns_a, &lab.dev_a));

    // Auto: AF_PACKET lanes, saying why.
    let (lanes, opened) = netns::in_netns(&lab.ns_a, || {
        Port::open_lanes(&lab.dev_a, DriverChoice::Auto, 0, 2)
    })
    .unwrap()
    .unwrap();
    eprintln!("auto: {opened}");
    assert_eq!(lanes.len(), 2);
    assert!(lanes.iter().all(|l| l.driver() == "af_packet"));
    assert!(
        opened
            .fallback
            .as_deref()
            .is_some_and(|w| w.contains("1 receive queue")),
        "{opened}"
    );
    // One lane is what `open` gives: AF_XDP on this device when built with it.
    drop(lanes);
    let (one, opened) = netns::in_netns(&lab.ns_a, || {
        Port::open_lanes(&lab.dev_a, DriverChoice::Auto, 0, 1)
    })
    .unwrap()
    .unwrap();
    assert_eq!(one.len(), 1);
    if BUILT {
        assert!(one[0].driver().starts_with("af_xdp"), "{opened}");
    }
}

#[test]
fn host_traffic_out_of_the_interface_stays_out_of_the_lanes() {
    // A socket alone has PACKET_IGNORE_OUTGOING; a fanout group has its own receive hook,
    // which needs the group flag (or the members' filter) to do the same.
    let lab = VethLab::new();
    let (mut lanes, _) = netns::in_netns(&lab.ns_a, || {
        Port::open_lanes(&lab.dev_a, DriverChoice::AfPacket, 0, 2)
    })
    .unwrap()
    .unwrap();
    let mut peer = netns::in_netns(&lab.ns_b, || {
        AfPacket::open(&lab.dev_b, &AfPacketConfig::default())
    })
    .unwrap()
    .unwrap();
    lab.address_a_towards_b();
    netns::in_netns(&lab.ns_a, || {
        let s = std::net::UdpSocket::bind(("198.18.0.1", 20000)).unwrap();
        for _ in 0..10 {
            s.send_to(MAGIC, "198.18.0.2:9").unwrap();
        }
    })
    .unwrap();
    let to_port_9 = |f: &[u8]| {
        (f.len() >= 42 && f[12..14] == [0x08, 0x00] && f[23] == 17 && f[36..38] == [0, 9])
            .then_some(0)
    };
    // The datagrams did leave: the peer has them.
    let mut seen = receive_on_lanes(
        std::slice::from_mut(&mut peer),
        to_port_9,
        |got| got.get(&0).is_some_and(|l| l.len() == 10),
        WAIT,
    );
    assert_eq!(seen.remove(&0).map(|l| l.len()), Some(10));
    let on_lanes = receive_on_lanes(&mut lanes, to_port_9, |_| false, Duration::from_millis(200));
    assert!(on_lanes.is_empty(), "{on_lanes:?}");
}
