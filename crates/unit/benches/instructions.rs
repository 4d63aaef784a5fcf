//! A fixed number of packets through one stage of the packet path, for counting instructions
//! with callgrind (`scripts/callgrind.sh`): unlike time, instructions per packet do not move on
//! a noisy machine, so a change to the path shows up even as a 1 % difference.
//!
//! `instructions STAGE PACKETS` where STAGE is
//! - `dispatcher`: the dispatcher's core (`on_frame`, as the unit runs it) on 60-byte TCP
//!   frames of 1024 flows: Ethernet and IPv4 checks, hygiene, classify, hash, bucket owner,
//!   GENEVE encapsulation with the copy into the send slot (see `common/mod.rs`);
//! - `dispatcher-1514`: the same on full-size frames;
//! - `dispatcher-out`: the dispatcher's core (`on_backplane`) on a data plane's datagrams of
//!   60-byte packets: route, TTL, MAC rewrite, neighbour lookup, the frame to the port;
//! - `dataplane-firewall`, `dataplane-nat`, `dataplane-lb`: the data plane's core (`on_packet`,
//!   as the unit runs it) on the dispatcher's datagrams of ACKs of 16 384 established
//!   connections, through the firewall alone, firewall + NAT (masquerade), firewall + LB (full
//!   NAT): decapsulation, classify, the chain, encapsulation into the send slot;
//! - `firewall-established`: `Firewall::process` alone on ACKs of 16 384 established
//!   connections;
//! - `firewall-new`: `Firewall::process` on SYNs of new connections, 1000 rules, the matching
//!   one at index 990;
//! - `nat-established`: `Nat::process` alone on ACKs of 16 384 masqueraded connections (lookup
//!   and in-place rewrite with incremental checksums), the packet copied into the work buffer
//!   first;
//! - `lb-established`: `Lb::process` alone on ACKs of 16 384 load-balanced connections (full
//!   NAT).
//!
//! Only the `measure_*` functions do the counted work (setup is outside them), so the script
//! runs callgrind with `--collect-atstart=no --toggle-collect='*measure_*'`. Without arguments
//! (as `cargo bench` runs it) it prints this usage and exits.

mod common;
#[path = "../../services/benches/common/mod.rs"]
mod firewall_common;
#[allow(dead_code)]
#[path = "../../services/src/nat/testpkt.rs"]
mod testpkt;

use std::hint::black_box;
use std::time::Instant;

use common::Chain;
use dva_io::backplane::Origin;
use dva_services::firewall::{Firewall, NewFlowPolicy, PacketInfo, Verdict};
use dva_wire::ip_proto;

const SEC: u64 = 1_000_000_000;
/// Connections tracked for `firewall-established`: instruction counts do not depend on the
/// table's size (cache misses are not instructions), and a smaller table keeps the setup under
/// callgrind short.
const TRACKED: u64 = 16_384;

#[inline(never)]
fn measure_dispatcher(
    d: &mut dva_unit::bench::Dispatcher,
    frames: &[Vec<u8>],
    bp: &mut dva_unit::bench::SlotTx,
    n: u64,
) -> u64 {
    let before = bp.sent;
    for i in 0..n as usize {
        let f = &frames[i % frames.len()];
        d.on_frame(0, black_box(f), common::rx_meta(f), bp);
    }
    bp.sent - before
}

#[inline(never)]
fn measure_dispatcher_out(
    d: &mut dva_unit::bench::Dispatcher,
    datagrams: &[Vec<u8>],
    ports: &mut [dva_unit::bench::NullPort],
    from: Origin,
    n: u64,
) -> u64 {
    let before: u64 = ports.iter().map(|p| p.sent).sum();
    for i in 0..n as usize {
        d.on_backplane(black_box(&datagrams[i % datagrams.len()]), from, ports);
    }
    ports.iter().map(|p| p.sent).sum::<u64>() - before
}

#[inline(never)]
fn measure_dataplane(
    dp: &mut dva_unit::bench::Dataplane,
    datagrams: &[Vec<u8>],
    from: Origin,
    n: u64,
) -> u64 {
    let before = dp.tx().sent;
    for i in 0..n as usize {
        dp.on_packet(black_box(&datagrams[i % datagrams.len()]), from);
    }
    dp.tx().sent - before
}

/// `packets` are made beforehand, so only the firewall's own instructions are counted.
#[inline(never)]
fn measure_firewall(fw: &mut Firewall, now: u64, packets: &[PacketInfo]) -> u64 {
    let mut accepted = 0;
    for p in packets {
        let v = fw.process(now, 0, black_box(p), NewFlowPolicy::Create);
        accepted += u64::from(v == Verdict::Accept);
    }
    accepted
}

/// Packets (with their buckets) are made beforehand; each is copied into `work` and translated.
#[inline(never)]
fn measure_translate(
    packets: &[(u16, Vec<u8>)],
    n: u64,
    work: &mut [u8],
    mut stage: impl FnMut(u16, &mut [u8]) -> bool,
) -> u64 {
    let mut translated = 0;
    for i in 0..n as usize {
        let (bucket, p) = &packets[i % packets.len()];
        let buf = &mut work[..p.len()];
        buf.copy_from_slice(p);
        translated += u64::from(stage(*bucket, black_box(buf)));
    }
    translated
}

const BUCKETS: usize = 4096;

/// ACKs of `TRACKED` connections opened through `open` (which sees each SYN and its bucket).
fn translated_flows(
    dst: &str,
    mut open: impl FnMut(u16, &mut [u8]) -> bool,
) -> Vec<(u16, Vec<u8>)> {
    (0..TRACKED as u32)
        .map(|i| {
            let host = format!("10.0.{}.{}", (i >> 8) & 0xff, i & 0xff);
            let (sport, dport) = (1024 + (i % 50_000) as u16, 80 + (i % 1024) as u16);
            let dport = if dst.ends_with(".100") { 80 } else { dport };
            let mut syn = testpkt::tcp4(&host, sport, dst, dport, dva_wire::tcp::flags::SYN);
            let b = (testpkt::check(&syn).symmetric_hash() as usize & (BUCKETS - 1)) as u16;
            assert!(open(b, &mut syn), "flow {i} not translated");
            (
                b,
                testpkt::tcp4(&host, sport, dst, dport, dva_wire::tcp::flags::ACK),
            )
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (stage, packets) = match (args.first(), args.get(1).map(|n| n.parse::<u64>())) {
        (Some(s), Some(Ok(n))) if !s.starts_with('-') => (s.as_str(), n),
        _ => {
            println!(
                "instructions: usage: instructions (dispatcher|dispatcher-1514|dispatcher-out|dataplane-firewall|dataplane-nat|dataplane-lb|firewall-established|firewall-new|nat-established|lb-established) PACKETS \
                 (run by scripts/callgrind.sh)"
            );
            return;
        }
    };
    let t = Instant::now();
    let done = match stage {
        "dispatcher" | "dispatcher-1514" => {
            let payload = if stage == "dispatcher" { 0 } else { 1460 };
            let frames = common::tcp_frames(payload);
            let (mut d, _) = common::dispatcher();
            let mut bp = dva_unit::bench::SlotTx::default();
            measure_dispatcher(&mut d, &frames, &mut bp, packets)
        }
        "dispatcher-out" => {
            // What the data planes send back: the dispatcher's own datagrams, marked as theirs.
            let datagrams: Vec<Vec<u8>> = common::datagrams_of(&common::tcp_frames(0))
                .into_iter()
                .map(|mut d| {
                    common::mark_from_dataplane(&mut d);
                    d
                })
                .collect();
            let (mut d, mut ports) = common::dispatcher();
            measure_dispatcher_out(
                &mut d,
                &datagrams,
                &mut ports,
                common::from_dataplane(),
                packets,
            )
        }
        "dataplane-firewall" | "dataplane-nat" | "dataplane-lb" => {
            let chain = match stage {
                "dataplane-firewall" => Chain::Firewall,
                "dataplane-nat" => Chain::Nat,
                _ => Chain::Lb,
            };
            let (mut dp, acks) = common::dataplane(chain);
            measure_dataplane(&mut dp, &acks, common::from_dispatcher(), packets)
        }
        "firewall-established" => {
            let mut fw = firewall_common::firewall(2 * TRACKED as usize);
            firewall_common::establish(&mut fw, SEC, TRACKED);
            let p: Vec<PacketInfo> = (0..packets)
                .map(|i| firewall_common::established_packet(i, TRACKED))
                .collect();
            measure_firewall(&mut fw, 2 * SEC, &p)
        }
        "firewall-new" => {
            let mut fw = firewall_common::firewall(packets as usize + 1);
            let p: Vec<PacketInfo> = (0..packets)
                .map(|i| {
                    let k = firewall_common::flow(i);
                    firewall_common::packet(firewall_common::OUTSIDE, k, firewall_common::SYN, 60)
                })
                .collect();
            measure_firewall(&mut fw, SEC, &p)
        }
        "nat-established" => {
            use dva_services::nat::{Nat, NatConfig, NatVerdict, SnatRule};
            let mut nat = Nat::new(
                NatConfig {
                    snat: vec![SnatRule {
                        name: None,
                        src: vec!["10.0.0.0/8".parse().expect("net")],
                        dst: Vec::new(),
                        proto: None,
                        to: vec!["198.18.1.1".parse().expect("addr")],
                        ports: dva_services::firewall::PortRange {
                            first: 1024,
                            last: 64_999,
                        },
                    }],
                    dnat: Vec::new(),
                    max_bindings: 1 << 20,
                },
                BUCKETS,
            );
            let flows = translated_flows("198.18.1.2", |b, p| {
                nat.process(SEC, b, 1, p) == NatVerdict::Translated
            });
            let mut work = [0u8; 64];
            measure_translate(&flows, packets, &mut work, |b, p| {
                nat.process(2 * SEC, b, 1, p) == NatVerdict::Translated
            })
        }
        "lb-established" => {
            use dva_services::lb::{Backend, Lb, LbConfig, LbVerdict, VirtualService};
            let mut lb = Lb::new(
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
                        ports: dva_services::firewall::PortRange {
                            first: 1024,
                            last: 64_999,
                        },
                    }],
                    max_flows: 1 << 20,
                },
                BUCKETS,
            );
            let flows = translated_flows("198.18.1.100", |b, p| {
                lb.process(SEC, b, p) == LbVerdict::Translated
            });
            let mut work = [0u8; 64];
            measure_translate(&flows, packets, &mut work, |b, p| {
                lb.process(2 * SEC, b, p) == LbVerdict::Translated
            })
        }
        other => {
            eprintln!("instructions: unknown stage {other:?}");
            std::process::exit(2);
        }
    };
    if done != packets {
        eprintln!("instructions: only {done} of {packets} packets took the measured path");
        std::process::exit(1);
    }
    println!(
        "{stage}: {packets} packets in {:.3} s (wall time, setup included)",
        t.elapsed().as_secs_f64()
    );
}
