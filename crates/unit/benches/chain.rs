//! Instructions per established packet through the data plane's service chain, counted by
//! callgrind like `instructions.rs`, but over the whole per-packet work of the data plane after
//! the GENEVE header: classify, describe, the stages' lookups, the copy into the work buffer,
//! every stage of the chain.
//!
//! `chain STAGE PACKETS`, STAGE one of
//! - `fw`, `nat`, `lb`: the chain as the data plane runs it (`dva_unit::chain::Chain`, one parse
//!   per packet, one binding lookup), for the chains firewall, firewall → NAT (masquerade),
//!   firewall → LB (one VIP, three backends);
//! - `fw-before`, `nat-before`, `lb-before`: the same packets through the path the data plane
//!   took before the `Stage` trait (e8e0198): classify, `is_translated_reply`'s lookup, copy,
//!   the firewall on the classification, then `Nat::process` / `Lb::process` (which parse the
//!   packet again and look the binding up again).
//!
//! ACKs of 16 384 established connections, client to server. Run under
//! `valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*measure_*'`.

#[allow(dead_code)]
#[path = "../../services/src/nat/testpkt.rs"]
mod testpkt;

use std::hint::black_box;

use dva_services::conntrack::Direction;
use dva_services::firewall::{
    Action, ConntrackConfig, Firewall, NewFlowPolicy, PacketInfo, PortRange, RuleSet,
    Verdict as FwVerdict,
};
use dva_services::lb::{Backend, Lb, LbConfig, LbVerdict, VirtualService};
use dva_services::nat::{Nat, NatConfig, NatVerdict, SnatRule};
use dva_services::stage::{Bytes, Packet};
use dva_unit::chain::{Chain, Outcome};
use dva_unit::classify::{classify, Classified};
use dva_wire::ip_proto;
use dva_wire::tcp::flags::{ACK, SYN};

const SEC: u64 = 1_000_000_000;
const FLOWS: u32 = 16_384;
const BUCKETS: usize = 4096;
const NAMES: [&str; 1] = ["malformed-ip"];

fn info(ip: &[u8], c: &Classified) -> PacketInfo {
    PacketInfo {
        ingress_if: 0,
        key: c.key,
        tcp_flags: c.tcp_flags,
        tcp: Packet::tcp_segment(ip, c.key.proto, c.fragment, c.l4_offset),
        icmp: c.icmp,
        icmp_inner: c.icmp_inner,
        len: ip.len() as u32,
    }
}

fn bucket(c: &Classified) -> u16 {
    (c.bucket_key().symmetric_hash() as usize & (BUCKETS - 1)) as u16
}

/// The data plane's per-packet work today: classify, describe, run the chain.
#[inline(never)]
fn measure_chain(chain: &mut Chain, packets: &[Vec<u8>], n: u64, work: &mut Vec<u8>) -> u64 {
    let mut forwarded = 0;
    for i in 0..n as usize {
        let ip = black_box(&packets[i % packets.len()][..]);
        let Ok(c) = classify(ip) else { continue };
        let mut pkt = Packet::new(
            info(ip, &c),
            bucket(&c),
            NewFlowPolicy::Create,
            c.fragment,
            c.l4_offset,
            ip.len(),
        );
        let out = if chain.rewrites() {
            work.clear();
            work.extend_from_slice(ip);
            chain.run(2 * SEC, &mut pkt, Bytes::Writable(work))
        } else {
            chain.run(2 * SEC, &mut pkt, Bytes::ReadOnly(ip))
        };
        forwarded += u64::from(out == Outcome::Forward);
    }
    forwarded
}

/// The same packets through the data plane's path before the `Stage` trait.
#[inline(never)]
fn measure_before(
    fw: &mut Firewall,
    mut nat: Option<&mut Nat>,
    mut lb: Option<&mut Lb>,
    packets: &[Vec<u8>],
    n: u64,
    work: &mut Vec<u8>,
) -> u64 {
    let now = 2 * SEC;
    let mut forwarded = 0;
    for i in 0..n as usize {
        let ip = black_box(&packets[i % packets.len()][..]);
        let Ok(c) = classify(ip) else { continue };
        let b = bucket(&c);
        if nat.is_none() && lb.is_none() {
            let v = fw.process(now, b, &info(ip, &c), NewFlowPolicy::Create);
            forwarded += u64::from(v == FwVerdict::Accept);
            continue;
        }
        // is_translated_reply
        let key = c.icmp_inner.map(|k| k.reversed()).unwrap_or(c.key);
        let reply = |d: Option<Direction>| d == Some(Direction::Reply);
        let reverse = reply(
            nat.as_deref_mut()
                .and_then(|n| n.binding_of(now, &key))
                .map(|(_, d)| d),
        ) || reply(
            lb.as_deref_mut()
                .and_then(|l| l.binding_of(now, &key))
                .map(|(_, d)| d),
        );
        work.clear();
        work.extend_from_slice(ip);
        assert!(!reverse, "the measured packets are originals");
        let mut ok =
            fw.process(now, b, &info(work, &c), NewFlowPolicy::Create) == FwVerdict::Accept;
        if let Some(n) = nat.as_deref_mut() {
            ok &= n.process(now, b, 0, work) == NatVerdict::Translated;
        }
        if let Some(l) = lb.as_deref_mut() {
            ok &= l.process(now, b, work) == LbVerdict::Translated;
        }
        forwarded += u64::from(ok);
    }
    forwarded
}

fn firewall() -> Firewall {
    Firewall::new(
        RuleSet::with_default(Action::Accept),
        ConntrackConfig {
            max_entries: 4 * FLOWS as usize,
            tcp_liberal: true,
            ..Default::default()
        },
    )
}

fn nat() -> Nat {
    Nat::new(
        NatConfig {
            snat: vec![SnatRule {
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
        },
        BUCKETS,
    )
}

fn lb() -> Lb {
    Lb::new(
        LbConfig {
            services: vec![VirtualService {
                name: "web".into(),
                vip: "198.18.1.100".parse().expect("vip"),
                proto: ip_proto::TCP,
                port: 80,
                backends: (0..3u8)
                    .map(|k| Backend {
                        name: format!("server{k}"),
                        addr: std::net::IpAddr::from([198, 18, 2, 2 + k]),
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
        },
        BUCKETS,
    )
}

/// Open `FLOWS` connections through `chain` (SYN, the SYN-ACK back, the ACK); their ACKs.
fn established(chain: &mut Chain, dst: &str) -> Vec<Vec<u8>> {
    let mut work = Vec::new();
    let mut run = |chain: &mut Chain, ip: &[u8]| -> Packet {
        let c = classify(ip).expect("test packet");
        let mut pkt = Packet::new(
            info(ip, &c),
            bucket(&c),
            NewFlowPolicy::Create,
            false,
            c.l4_offset,
            ip.len(),
        );
        work.clear();
        work.extend_from_slice(ip);
        let out = chain.run(SEC, &mut pkt, Bytes::Writable(&mut work));
        assert_eq!(out, Outcome::Forward, "setup packet not forwarded");
        pkt
    };
    (0..FLOWS)
        .map(|i| {
            let host = format!("10.0.{}.{}", (i >> 8) & 0xff, i & 0xff);
            let sport = 1024 + (i % 50_000) as u16;
            let syn = testpkt::tcp4(&host, sport, dst, 80, SYN);
            let out = run(chain, &syn).info.key;
            let synack = testpkt::tcp4(
                &out.dst.to_string(),
                out.dst_port,
                &out.src.to_string(),
                out.src_port,
                SYN | ACK,
            );
            run(chain, &synack);
            let ack = testpkt::tcp4(&host, sport, dst, 80, ACK);
            run(chain, &ack);
            ack
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (stage, packets) = match (args.first(), args.get(1).map(|n| n.parse::<u64>())) {
        (Some(s), Some(Ok(n))) if !s.starts_with('-') => (s.as_str(), n),
        _ => {
            println!("chain: usage: chain (fw|nat|lb)[-before] PACKETS (under callgrind)");
            return;
        }
    };
    let (kind, before) = match stage.strip_suffix("-before") {
        Some(k) => (k, true),
        None => (stage, false),
    };
    let (mut chain, dst) = match kind {
        "fw" => (
            Chain::from_stages(vec![Box::new(firewall())], &NAMES),
            "198.18.2.2",
        ),
        "nat" => (
            Chain::from_stages(vec![Box::new(firewall()), Box::new(nat())], &NAMES),
            "198.18.2.2",
        ),
        "lb" => (
            Chain::from_stages(vec![Box::new(firewall()), Box::new(lb())], &NAMES),
            "198.18.1.100",
        ),
        other => {
            eprintln!("chain: unknown stage {other:?}");
            std::process::exit(2);
        }
    };
    let acks = established(&mut chain, dst);
    let mut work = Vec::with_capacity(2048);
    let done = if before {
        // The stages apart, as the data plane's old fields held them.
        let mut stages = chain.into_stages();
        let (mut fw, mut nat, mut lb) = (None, None, None);
        for s in stages.iter_mut() {
            let any = s.as_any_mut();
            if any.is::<Firewall>() {
                fw = any.downcast_mut::<Firewall>();
            } else if any.is::<Nat>() {
                nat = any.downcast_mut::<Nat>();
            } else if any.is::<Lb>() {
                lb = any.downcast_mut::<Lb>();
            }
        }
        let fw = fw.expect("firewall");
        measure_before(fw, nat, lb, &acks, packets, &mut work)
    } else {
        measure_chain(&mut chain, &acks, packets, &mut work)
    };
    if done != packets {
        eprintln!("chain: only {done} of {packets} packets forwarded");
        std::process::exit(1);
    }
    println!("{stage}: {packets} packets");
}
