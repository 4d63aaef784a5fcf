//! The real role cores on a bench, shared by the criterion bench (`dispatcher_path.rs`) and the
//! instruction counter (`instructions.rs`), so both measure the same code: the unit's own
//! `dispatcher::Core` and `dataplane::Core` (through `dva_unit::bench`), with in-memory
//! backplanes and ports instead of sockets and rings.
//!
//! - Dispatcher in: [`Dispatcher::on_frame`] on frames of [`FLOWS`] TCP connections from outside
//!   (Ethernet and IPv4 checks, hygiene, `classify`, the symmetric hash, the bucket's owner in a
//!   4096-bucket Maglev table over 4 data planes, GENEVE encapsulation and the copy into the
//!   send slot). The frames come marked `csum_valid`, as from a NIC (or veth) that verified the
//!   L4 checksum: the dispatcher then does not.
//! - Dispatcher out: [`Dispatcher::on_backplane`] on a data plane's datagrams (route, TTL, MAC
//!   rewrite, neighbour lookup, the frame handed to the port).
//! - Data plane: [`Dataplane::on_packet`] on the dispatcher's datagrams of established
//!   connections (firewall only, firewall + NAT, firewall + LB), forwarded into a send slot.
//!   The connections are opened through the same core beforehand (SYN, SYN-ACK, ACK), and
//!   replies are given the bucket the dispatcher would give them.

#![allow(dead_code)] // each bench target uses a different part of this module

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use dva_flow::BucketTable;
use dva_io::backplane::Origin;
use dva_io::RxMeta;
use dva_proto::role::{BackplaneAuth, RuntimeConfig, Stage, UnitEndpoint};
use dva_proto::{DataplaneConfig, DispatcherConfig, InterfaceConfig};
use dva_services::firewall::{Action, PortRange, RuleSet};
use dva_unit::bench::{Dataplane, Dispatcher, NullPort, SlotTx};
use dva_unit::classify::classify;
use dva_wire::geneve::{self, DvaMeta, DVA_HEADER_LEN};
use dva_wire::tcp::flags;
use dva_wire::{ethertype, EthernetAddress, EthernetFrame, EthernetRepr, Ipv4Packet, Ipv4Repr};
use dva_wire::{ip_proto, TcpPacket, TcpRepr};

/// Distinct flows in a batch: enough that the batch is not one cached flow, few enough that
/// the frames stay in L2 like a receive ring's would.
pub const FLOWS: usize = 1024;
/// The bucket table of the edge-firewall spec.
pub const BUCKETS: usize = 4096;
/// Data planes the dispatcher's table spreads the buckets over.
pub const MEMBERS: [u32; 4] = [11, 12, 13, 14];
/// The dispatcher's unit id.
pub const DISPATCHER: u32 = 1;
/// Connections a data plane holds for the established benches: instruction counts do not
/// depend on the table's size (cache misses are not instructions), and a smaller table keeps
/// the setup under callgrind short.
pub const TRACKED: u32 = 16_384;
const VNI: u32 = 0x00d7a0;

/// The dispatcher's MAC on the outside segment (interface 0) and the inside one (1).
pub const DISPATCHER_MAC: EthernetAddress = EthernetAddress([0x02, 0xd7, 0xa0, 0, 0, 1]);
const INSIDE_MAC: EthernetAddress = EthernetAddress([0x02, 0xd7, 0xa0, 0, 0, 2]);
const CLIENT_MAC: EthernetAddress = EthernetAddress([0x02, 0xc1, 0, 0, 0, 2]);
const SERVER_MAC: EthernetAddress = EthernetAddress([0x02, 0x5e, 0, 0, 0, 2]);

/// What a kernel reports for a frame whose checksum the NIC verified.
pub fn rx_meta(frame: &[u8]) -> RxMeta {
    RxMeta {
        csum_valid: true,
        wire_len: frame.len() as u32,
        ..RxMeta::default()
    }
}

fn dataplane_addr(id: u32) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::new(198, 19, 0, id as u8).into(), 6081)
}

fn dispatcher_addr() -> SocketAddr {
    SocketAddr::new(Ipv4Addr::new(198, 19, 1, 1).into(), 6081)
}

/// The datagrams' origin at a data plane: the dispatcher.
pub fn from_dispatcher() -> Origin {
    Origin {
        addr: dispatcher_addr(),
        unit: DISPATCHER,
    }
}

/// The datagrams' origin at the dispatcher: data plane 11.
pub fn from_dataplane() -> Origin {
    Origin {
        addr: dataplane_addr(MEMBERS[0]),
        unit: MEMBERS[0],
    }
}

/// TCP ACK frames client → server of `FLOWS` distinct connections (client ports differ; three
/// servers, ports 80 and 5201), each carrying `payload` bytes of TCP data. `payload = 0` gives
/// the 54-byte frame of a bare ACK (padded to the 60-byte Ethernet minimum, as on the wire);
/// `payload = 1460` a full 1514-byte frame.
pub fn tcp_frames(payload: usize) -> Vec<Vec<u8>> {
    (0..FLOWS)
        .map(|i| {
            let src = Ipv4Addr::new(198, 18, 1, 2 + (i % 200) as u8);
            let dst = Ipv4Addr::new(198, 18, 2, 2 + (i % 3) as u8);
            // 37 is odd: distinct ports for the first 32768 flows.
            let sport = 32768 | ((i as u16).wrapping_mul(37) & 0x7fff);
            let dport = if i % 2 == 0 { 80 } else { 5201 };
            tcp_frame(src, sport, dst, dport, payload, i as u32)
        })
        .collect()
}

fn tcp_frame(
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    payload: usize,
    seq: u32,
) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port: sport,
        dst_port: dport,
        seq_number: seq.wrapping_mul(2_654_435_761),
        ack_number: 1,
        flags: flags::ACK,
        window_len: 502,
        payload_len: payload,
    };
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: ip_proto::TCP,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    let eth = EthernetRepr {
        dst_addr: DISPATCHER_MAC,
        src_addr: CLIENT_MAC,
        vlan: None,
        ethertype: ethertype::IPV4,
    };
    let l3 = eth.header_len();
    let len = eth.buffer_len(ip.buffer_len()).max(60);
    let mut f = vec![0u8; len];
    eth.emit(&mut EthernetFrame::new_unchecked(&mut f[..]));
    ip.emit(&mut Ipv4Packet::new_unchecked(&mut f[l3..]));
    let l4 = l3 + ip.header_len();
    for (k, b) in f[l4 + tcp.header_len()..l4 + tcp.buffer_len()]
        .iter_mut()
        .enumerate()
    {
        *b = (k as u8).wrapping_mul(31) ^ seq as u8;
    }
    tcp.emit_v4(&mut TcpPacket::new_unchecked(&mut f[l4..]), &src, &dst);
    f
}

/// The Maglev table the manager would push: [`BUCKETS`] buckets over [`MEMBERS`].
pub fn table() -> BucketTable {
    BucketTable::maglev(BUCKETS, &MEMBERS).expect("valid table")
}

fn interfaces() -> Vec<InterfaceConfig> {
    vec![
        InterfaceConfig {
            id: 0,
            name: "outside".into(),
            device: "out0".into(),
            addresses: vec!["198.18.1.1/24".parse().expect("net")],
        },
        InterfaceConfig {
            id: 1,
            name: "inside".into(),
            device: "in0".into(),
            addresses: vec!["198.18.2.1/24".parse().expect("net")],
        },
    ]
}

/// The dispatcher of the edge-firewall layout: outside and inside interfaces, four data planes.
/// Its neighbours on both sides are resolved (ARP replies through the real path), so packets
/// out go straight to the port.
pub fn dispatcher() -> (Dispatcher, Vec<NullPort>) {
    let cfg = DispatcherConfig {
        appliance: "bench".into(),
        version: 1,
        vni: VNI,
        unit: DISPATCHER,
        listen: dispatcher_addr(),
        interfaces: interfaces(),
        routes: Vec::new(),
        dataplanes: MEMBERS
            .iter()
            .map(|&id| UnitEndpoint {
                id,
                addr: dataplane_addr(id),
            })
            .collect(),
        table: table(),
        fenced: Vec::new(),
        service_addrs: Vec::new(),
        dnat_reverse: Vec::new(),
        health_checks: Vec::new(),
        runtime: RuntimeConfig::default(),
        backplane: BackplaneAuth::default(),
    };
    let mut d = Dispatcher::new(
        cfg,
        &[(DISPATCHER_MAC, 1500), (INSIDE_MAC, 1500)],
        Instant::now(),
    )
    .expect("dispatcher");
    let mut ports = vec![NullPort::default(), NullPort::default()];
    let mut bp = SlotTx::default();
    // The hosts the frames come from and go to answer ARP.
    for (port, ours, mac, hosts) in [
        (
            0,
            [198, 18, 1, 1],
            CLIENT_MAC,
            (2..202).map(|h| [198, 18, 1, h]).collect::<Vec<_>>(),
        ),
        (
            1,
            [198, 18, 2, 1],
            SERVER_MAC,
            (2..5).map(|h| [198, 18, 2, h]).collect(),
        ),
    ] {
        let our_mac = if port == 0 {
            DISPATCHER_MAC
        } else {
            INSIDE_MAC
        };
        for h in hosts {
            let mut f = Vec::new();
            dva_unit::reply::ethernet(&mut f, our_mac, mac, ethertype::ARP);
            dva_unit::reply::arp(&mut f, 2, mac, h.into(), our_mac, ours.into());
            f.resize(60, 0);
            d.on_frame(port, &f, rx_meta(&f), &mut bp);
        }
    }
    d.send_deferred(&mut ports);
    (d, ports)
}

/// The dispatcher's datagram for each frame (what a data plane receives), by running them
/// through [`dispatcher`].
pub fn datagrams_of(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let (mut d, _) = dispatcher();
    let mut bp = SlotTx::default();
    frames
        .iter()
        .map(|f| {
            d.on_frame(0, f, rx_meta(f), &mut bp);
            bp.last().expect("forwarded").1.to_vec()
        })
        .collect()
}

/// The service chain of a data-plane bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chain {
    Firewall,
    Nat,
    Lb,
}

/// Where the clients of a chain's connections go, and the address replies come back to when
/// the chain translates (the dispatcher buckets those by port).
fn chain_addrs(chain: Chain) -> (Ipv4Addr, Option<Ipv4Addr>) {
    match chain {
        Chain::Firewall => (Ipv4Addr::new(198, 18, 2, 2), None),
        Chain::Nat => (
            Ipv4Addr::new(198, 18, 2, 2),
            Some(Ipv4Addr::new(198, 18, 1, 1)),
        ),
        Chain::Lb => (
            Ipv4Addr::new(198, 18, 1, 100),
            Some(Ipv4Addr::new(198, 18, 2, 1)),
        ),
    }
}

fn dataplane_config(chain: Chain) -> DataplaneConfig {
    let me = MEMBERS[0];
    let nat = (chain == Chain::Nat).then(|| dva_services::nat::NatConfig {
        snat: vec![dva_services::nat::SnatRule {
            name: None,
            src: vec!["10.0.0.0/8".parse().expect("net")],
            dst: Vec::new(),
            proto: None,
            to: vec!["198.18.1.1".parse().expect("addr")],
            ports: PortRange {
                first: 1024,
                last: 64_999,
            },
        }],
        dnat: Vec::new(),
        max_bindings: 1 << 20,
    });
    let lb = (chain == Chain::Lb).then(|| {
        use dva_services::lb::{Backend, LbConfig, VirtualService};
        LbConfig {
            services: vec![VirtualService {
                name: "web".into(),
                vip: "198.18.1.100".parse().expect("vip"),
                proto: ip_proto::TCP,
                port: 80,
                backends: (0..3u8)
                    .map(|k| Backend {
                        name: format!("server{k}"),
                        addr: IpAddr::from([198, 18, 2, 2 + k]),
                        port: 80,
                        weight: 1,
                    })
                    .collect(),
                source: vec!["198.18.2.1".parse().expect("source")],
                ports: PortRange {
                    first: 1024,
                    last: 64_999,
                },
            }],
            max_flows: 1 << 20,
        }
    });
    let mut stages = vec![Stage::Firewall];
    match chain {
        Chain::Firewall => {}
        Chain::Nat => stages.push(Stage::Nat),
        Chain::Lb => stages.push(Stage::Lb),
    }
    DataplaneConfig {
        appliance: "bench".into(),
        version: 1,
        vni: VNI,
        unit: me,
        listen: dataplane_addr(me),
        dispatchers: vec![UnitEndpoint {
            id: DISPATCHER,
            addr: dispatcher_addr(),
        }],
        dispatcher_lanes: 1,
        peers: vec![UnitEndpoint {
            id: me,
            addr: dataplane_addr(me),
        }],
        // One data plane owns every bucket: nothing is punted.
        table: BucketTable::maglev(BUCKETS, &[me]).expect("table"),
        interfaces: interfaces(),
        firewall: RuleSet::with_default(Action::Accept),
        max_connections: 1 << 20,
        tcp_liberal: false,
        export: false,
        backups: Vec::new(),
        chain: stages,
        nat,
        lb,
        backend_states: Vec::new(),
        runtime: RuntimeConfig::default(),
        backplane: BackplaneAuth::default(),
    }
}

/// `ip` as the dispatcher sends it to a data plane, in bucket `bucket`.
fn encap(ip: &[u8], bucket: u16) -> Vec<u8> {
    let meta = DvaMeta {
        epoch: 1,
        bucket,
        ..DvaMeta::default()
    };
    let mut d = vec![0; DVA_HEADER_LEN + ip.len()];
    geneve::encap_dva(&mut d, VNI, geneve::PROTO_IPV4, &meta);
    d[DVA_HEADER_LEN..].copy_from_slice(ip);
    d
}

/// The bucket the dispatcher gives `ip`: by port when it goes to a translation source address
/// (the data plane chose the port in the flow's bucket), else by the flow hash.
fn bucket_of(ip: &[u8], translated_to: Option<Ipv4Addr>) -> u16 {
    let c = classify(ip).expect("packet");
    let mask = (BUCKETS - 1) as u32;
    if translated_to.is_some_and(|a| c.key.dst == IpAddr::V4(a)) {
        return (u32::from(c.key.dst_port) & mask) as u16;
    }
    (c.bucket_key().symmetric_hash() & mask) as u16
}

fn segment(
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    fl: u8,
) -> Vec<u8> {
    let mut p = Vec::new();
    dva_unit::reply::tcp_segment(&mut p, src, dst, sport, dport, seq, ack, fl, &[])
        .expect("segment");
    p
}

/// A data plane holding [`TRACKED`] established connections through `chain`, and the
/// datagrams of their next packet (an ACK from the client), as the dispatcher sends them.
pub fn dataplane(chain: Chain) -> (Dataplane, Vec<Vec<u8>>) {
    let now = Instant::now();
    let mut dp = Dataplane::new(dataplane_config(chain), now).expect("data plane");
    dp.begin_turn(now);
    let (server, translated_to) = chain_addrs(chain);
    let from = from_dispatcher();
    let mut acks = Vec::with_capacity(TRACKED as usize);
    for i in 0..TRACKED {
        let client = IpAddr::V4(Ipv4Addr::new(10, 0, (i >> 8) as u8, i as u8));
        let (sport, dport) = (1024 + (i % 50_000) as u16, 80);
        let server = IpAddr::V4(server);
        let syn = segment(client, server, sport, dport, 1, 0, flags::SYN);
        dp.on_packet(&encap(&syn, bucket_of(&syn, None)), from);
        // The SYN as it left: the reply goes to its (translated) source.
        let (_, out) = dp.tx().last().expect("SYN forwarded");
        let out = classify(&out[DVA_HEADER_LEN..]).expect("forwarded SYN").key;
        let synack = segment(
            out.dst,
            out.src,
            out.dst_port,
            out.src_port,
            9,
            2,
            flags::SYN | flags::ACK,
        );
        let sent = dp.tx().sent;
        dp.on_packet(&encap(&synack, bucket_of(&synack, translated_to)), from);
        assert_eq!(dp.tx().sent, sent + 1, "flow {i}: SYN-ACK not forwarded");
        let ack = segment(client, server, sport, dport, 2, 10, flags::ACK);
        let d = encap(&ack, bucket_of(&ack, None));
        dp.on_packet(&d, from);
        acks.push(d);
        if i % 64 == 63 {
            dp.end_turn();
            dp.begin_turn(now);
        }
    }
    dp.end_turn();
    let st = dp.snapshot();
    assert!(
        st.drops.is_empty(),
        "drops while opening flows: {:?}",
        st.drops
    );
    (dp, acks)
}

/// Mark a dispatcher's datagram as a data plane's answer (what `dispatcher-out` receives).
pub fn mark_from_dataplane(d: &mut [u8]) {
    if let Ok((vni, ptype, mut meta, _)) = geneve::decap_dva(d) {
        meta.flags |= geneve::dva_flags::FROM_DATAPLANE;
        geneve::encap_dva(d, vni, ptype, &meta);
    }
}
