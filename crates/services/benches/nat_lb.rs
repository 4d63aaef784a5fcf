//! Per-packet cost of the translating stages, in ns/packet (`Throughput::Elements(1)`):
//!
//! - `nat/masquerade_established_32k`: TCP ACKs of 32 768 masqueraded connections, original
//!   direction, visited in pseudo-random order: binding lookup and the in-place rewrite (source
//!   address and port, incremental IP and TCP checksums);
//! - `nat/masquerade_reply_32k`: the replies of those connections (de-SNAT);
//! - `nat/masquerade_new_flow`: SYNs of connections never seen: rule match, a port allocated in
//!   the flow's bucket, a binding created;
//! - `lb/established_32k`, `lb/new_flow`: the same for the L4 load balancer (3 backends, full
//!   NAT: both addresses and both ports rewritten; new flows add a Maglev lookup).
//!
//! Each iteration first copies the pristine 40-byte packet into the work buffer (the stage
//! rewrites it in place), a few ns that the figures include: a data plane pays that copy too.
//! Run: `cargo bench -p dva-services --bench nat_lb`.

#[allow(dead_code)]
#[path = "../src/nat/testpkt.rs"]
mod testpkt;

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dva_services::firewall::PortRange;
use dva_services::lb::{Backend, Lb, LbConfig, LbVerdict, VirtualService};
use dva_services::nat::{Nat, NatConfig, NatVerdict, SnatRule};
use dva_wire::ip_proto;
use dva_wire::tcp::flags::{ACK, SYN};
use testpkt::{tcp4, v4};

const SEC: u64 = 1_000_000_000;
const BUCKETS: usize = 4096;
/// Flows held while the established-flow figures are taken (the same for NAT and LB: the
/// table's size, through cache misses, dominates the cost).
const FLOWS: u32 = 32_768;

/// Inside host and port of flow `i` (distinct for every i < 2^24).
fn inside(i: u32) -> (String, u16) {
    (
        format!("10.{}.{}.{}", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff),
        1024 + (i % 50_000) as u16,
    )
}

fn bucket_of(pkt: &[u8]) -> u16 {
    (testpkt::check(pkt).symmetric_hash() as usize & (BUCKETS - 1)) as u16
}

fn masquerade() -> Nat {
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
            max_bindings: 4 << 20,
        },
        BUCKETS,
    )
}

/// Original-direction ACKs (with their buckets) of `FLOWS` connections opened on `nat`, and the
/// replies to them as they arrive at the pool address.
/// Packets with the bucket the dispatcher would give them.
type Packets = Vec<(u16, Vec<u8>)>;

fn natted_flows(nat: &mut Nat) -> (Packets, Packets) {
    let mut orig = Vec::new();
    let mut replies = Vec::new();
    for i in 0..FLOWS {
        let (host, port) = inside(i);
        // Many remote endpoints, as on a real gateway: towards one endpoint a masquerade
        // address has only ~64k ports (about 15 per bucket), the limit NAT has everywhere.
        let dport = 80 + (i % 1024) as u16;
        let mut syn = tcp4(&host, port, "198.18.1.2", dport, SYN);
        let b = bucket_of(&syn);
        assert_eq!(nat.process(SEC, b, 1, &mut syn), NatVerdict::Translated);
        let out = testpkt::check(&syn);
        orig.push((b, tcp4(&host, port, "198.18.1.2", dport, ACK)));
        let reply = tcp4(
            "198.18.1.2",
            dport,
            &out.src.to_string(),
            out.src_port,
            SYN | ACK,
        );
        replies.push((b, reply));
    }
    // Visit order: a stride co-prime with the count, so consecutive packets hit unrelated
    // bindings (the table used as a busy link uses it, not from cache).
    let order = |v: Packets| -> Packets {
        (0..v.len())
            .map(|k| v[(k * 40_503) % v.len()].clone())
            .collect()
    };
    (order(orig), order(replies))
}

fn nat(c: &mut Criterion) {
    let mut g = c.benchmark_group("nat");
    g.throughput(Throughput::Elements(1));
    let mut n = masquerade();
    let (orig, replies) = natted_flows(&mut n);
    let mut work = [0u8; 64];
    for (name, packets) in [
        ("masquerade_established_32k", &orig),
        ("masquerade_reply_32k", &replies),
    ] {
        let mut k = 0usize;
        g.bench_function(name, |b| {
            b.iter(|| {
                k = (k + 1) % packets.len();
                let (bucket, p) = &packets[k];
                let buf = &mut work[..p.len()];
                buf.copy_from_slice(p);
                let v = n.process(2 * SEC, *bucket, 1, black_box(buf));
                debug_assert_eq!(v, NatVerdict::Translated);
                black_box(v)
            })
        });
    }
    // New flows: a fresh source every time.
    let mut fresh = masquerade();
    let mut i = 0u32;
    g.bench_function("masquerade_new_flow", |b| {
        b.iter_batched(
            || {
                i = i.wrapping_add(1);
                let (host, port) = inside(FLOWS + i % (1 << 23));
                let p = tcp4(&host, port, "198.18.1.2", 1024 + (i % 4096) as u16, SYN);
                (bucket_of(&p), p)
            },
            |(bucket, mut p)| {
                if fresh.len() >= 1_000_000 {
                    // Keep the table at a loaded gateway's size, not an ever-growing one
                    // (rare: amortized over a million packets).
                    fresh = masquerade();
                }
                black_box(fresh.process(SEC, bucket, 1, black_box(&mut p)))
            },
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn load_balancer() -> Lb {
    let backends = (0..3)
        .map(|k| Backend {
            name: format!("server{}", k + 1),
            addr: v4([198, 18, 2, 2 + k]),
            port: 80,
            weight: 1,
        })
        .collect();
    Lb::new(
        LbConfig {
            services: vec![VirtualService {
                name: "web".into(),
                vip: "198.18.1.100".parse().expect("vip"),
                proto: ip_proto::TCP,
                port: 80,
                backends,
                source: vec!["198.18.2.1".parse::<IpAddr>().expect("source")],
                ports: PortRange {
                    first: 1024,
                    last: 64_999,
                },
            }],
            max_flows: 4 << 20,
        },
        BUCKETS,
    )
}

fn lb(c: &mut Criterion) {
    let mut g = c.benchmark_group("lb");
    g.throughput(Throughput::Elements(1));
    let mut l = load_balancer();
    let mut packets = Vec::new();
    // Full NAT from one source address to 3 backends on one port has ~3 x 61k source ports,
    // ~45 per bucket: a random spread fills some bucket's share of one backend well before
    // 180k flows (a real limit; more source addresses would lift it).
    for i in 0..FLOWS {
        let (host, port) = inside(i);
        let mut syn = tcp4(&host, port, "198.18.1.100", 80, SYN);
        let b = bucket_of(&syn);
        let v = l.process(SEC, b, &mut syn);
        assert_eq!(v, LbVerdict::Translated, "flow {i}");
        packets.push((b, tcp4(&host, port, "198.18.1.100", 80, ACK)));
    }
    let packets: Vec<_> = (0..packets.len())
        .map(|k| packets[(k * 40_503) % packets.len()].clone())
        .collect();
    let mut work = [0u8; 64];
    let mut k = 0usize;
    g.bench_function("established_32k", |b| {
        b.iter(|| {
            k = (k + 1) % packets.len();
            let (bucket, p) = &packets[k];
            let buf = &mut work[..p.len()];
            buf.copy_from_slice(p);
            let v = l.process(2 * SEC, *bucket, black_box(buf));
            debug_assert_eq!(v, LbVerdict::Translated);
            black_box(v)
        })
    });
    let mut fresh = load_balancer();
    let mut i = 0u32;
    g.bench_function("new_flow", |b| {
        b.iter_batched(
            || {
                i = i.wrapping_add(1);
                let (host, port) = inside(FLOWS + i % (1 << 23));
                let p = tcp4(&host, port, "198.18.1.100", 80, SYN);
                (bucket_of(&p), p)
            },
            |(bucket, mut p)| {
                if fresh.len() >= 30_000 {
                    fresh = load_balancer();
                }
                black_box(fresh.process(SEC, bucket, black_box(&mut p)))
            },
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = config();
    targets = nat, lb
}
criterion_main!(benches);
