//! `Firewall::process` with a realistic 1000-rule set (CIDRs, port ranges, UDP, ICMP, IPv6,
//! source lists; the rule that accepts the traffic is number 990):
//!
//! - `established/1M_flows`: ACKs, both directions, of 1 000 000 tracked connections (each opened
//!   with a full handshake first), visited in pseudo-random order so the connection table is
//!   used the way a busy link uses it, not from cache; `established/64k_flows` the same with a
//!   table that fits the caches;
//! - `new_flow/syn_rule_990_of_1000`: a SYN of a connection never seen before: conntrack miss,
//!   a scan of 991 rules, a connection created;
//! - `new_flow/syn_default_drop`: a SYN no rule matches: the whole 1000-rule scan, then the
//!   default policy.
//!
//! Times are per packet (`Throughput::Elements(1)`). Run:
//! `cargo bench -p dva-services --bench firewall`.

mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dva_services::firewall::{Firewall, NewFlowPolicy, Verdict};

use common::{establish, established_packet, firewall, flow, packet, ACK, OUTSIDE, SYN};

const SEC: u64 = 1_000_000_000;
const TRACKED: u64 = 1_000_000;
/// Established packets prepared per table, spread over all its connections.
const PACKETS: u64 = 1 << 20;
/// New-flow runs start over with an empty table past this many connections, so the table's
/// size (and the memory it takes) stays that of a loaded firewall, not of an ever-growing one.
const NEW_FLOW_TABLE: usize = 1_000_000;

fn established(c: &mut Criterion) {
    let mut g = c.benchmark_group("established");
    g.throughput(Throughput::Elements(1));
    // Same work per packet on a table of ~10 MB and on one of ~150 MB: the difference is what
    // the table's size costs in cache and TLB misses.
    // `cargo bench` passes --bench; `cargo test --benches` runs each bench once as a smoke
    // test, where building a million connections in a debug build would take minutes.
    let sizes: &[(&str, u64)] = if std::env::args().any(|a| a == "--bench") {
        &[("64k_flows", 65_536), ("1M_flows", TRACKED)]
    } else {
        &[("64k_flows", 65_536)]
    };
    for &(name, tracked) in sizes {
        let mut fw = firewall(2 * tracked as usize);
        establish(&mut fw, SEC, tracked);
        assert_eq!(fw.len(), tracked as usize);
        // Made beforehand (read in order, which the prefetcher makes cheap), so the time is
        // the firewall's.
        let packets: Vec<_> = (0..PACKETS)
            .map(|n| established_packet(n, tracked))
            .collect();
        let mut n = 0usize;
        g.bench_function(name, |b| {
            b.iter(|| {
                n = (n + 1) % packets.len();
                let v = fw.process(2 * SEC, 0, black_box(&packets[n]), NewFlowPolicy::Create);
                debug_assert_eq!(v, Verdict::Accept);
                black_box(v)
            })
        });
    }
    g.finish();
}

/// Runs `iters` new-flow packets made by `make`, timing only `process`; the table is replaced
/// (untimed) whenever it reaches [`NEW_FLOW_TABLE`].
fn new_flows(
    fw: &mut Firewall,
    next: &mut u64,
    iters: u64,
    make: impl Fn(u64) -> dva_services::firewall::PacketInfo,
) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        if fw.len() >= NEW_FLOW_TABLE {
            *fw = firewall(2 * NEW_FLOW_TABLE);
        }
        let chunk = left.min((NEW_FLOW_TABLE - fw.len()) as u64);
        let t = Instant::now();
        for _ in 0..chunk {
            *next += 1;
            black_box(fw.process(SEC, 0, black_box(&make(*next)), NewFlowPolicy::Create));
        }
        total += t.elapsed();
        left -= chunk;
    }
    total
}

fn new_flow(c: &mut Criterion) {
    let mut g = c.benchmark_group("new_flow");
    g.throughput(Throughput::Elements(1));
    let mut fw = firewall(2 * NEW_FLOW_TABLE);
    let mut next = 0u64;
    g.bench_function("syn_rule_990_of_1000", |b| {
        b.iter_custom(|iters| {
            new_flows(&mut fw, &mut next, iters, |i| {
                packet(OUTSIDE, flow(i), SYN, 60)
            })
        })
    });
    // Whatever ran (a filter may have skipped it) was accepted: no rule or state dropped it.
    assert!(fw.stats().drops.iter().all(|&d| d == 0));

    // Port 8443 is allowed by no rule: every rule is tried, and nothing is created.
    let mut fw = firewall(2 * NEW_FLOW_TABLE);
    g.bench_function("syn_default_drop", |b| {
        b.iter(|| {
            next += 1;
            let mut k = flow(next);
            k.dst_port = 8443;
            black_box(fw.process(
                SEC,
                0,
                black_box(&packet(OUTSIDE, k, SYN, 60)),
                NewFlowPolicy::Create,
            ))
        })
    });
    assert_eq!(fw.len(), 0, "a dropped SYN creates nothing");
    g.finish();
    // An ACK of an unknown connection, for completeness of the miss path: conntrack miss, no
    // rules (it cannot start a connection).
    let mut fw = firewall(16);
    let mut g = c.benchmark_group("no_state");
    g.throughput(Throughput::Elements(1));
    g.bench_function("ack_without_connection", |b| {
        b.iter(|| {
            next += 1;
            black_box(fw.process(
                SEC,
                0,
                black_box(&packet(OUTSIDE, flow(next), ACK, 60)),
                NewFlowPolicy::Create,
            ))
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = established, new_flow
}
criterion_main!(benches);
