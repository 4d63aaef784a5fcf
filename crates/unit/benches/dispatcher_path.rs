//! The per-packet work of the unit's own cores on realistic packets, without I/O (see
//! `common/mod.rs`): the dispatcher's `on_frame` (parse, hygiene, classify, symmetric hash →
//! bucket → owner in a 4096-bucket Maglev table over 4 data planes, GENEVE encapsulation with
//! the copy into the send slot) and `on_backplane` (route, neighbour, frame out), and the data
//! plane's `on_packet` on established connections through firewall, NAT and LB chains.
//!
//! Every iteration runs a batch of 1024 distinct flows (so the hash, the table and the branch
//! predictors see varied input, not one cached flow); throughput is reported per packet
//! (`Throughput::Elements`), so criterion's `thrpt` is packets/s and `time / 1024` is the time
//! per packet. Run: `cargo bench -p dva-unit --bench dispatcher_path`.

mod common;

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use common::{rx_meta, table, tcp_frames, Chain, FLOWS};
use dva_unit::bench::SlotTx;
use dva_unit::classify::classify;

/// Bare ACKs (60-byte frames) and full-size segments (1514-byte frames).
const SIZES: [(&str, usize); 2] = [("60B", 0), ("1514B", 1460)];

fn stages(c: &mut Criterion) {
    let table = table();
    let frames = tcp_frames(0);
    let ips: Vec<&[u8]> = frames.iter().map(|f| &f[14..]).collect();
    let keys: Vec<_> = ips
        .iter()
        .map(|ip| *classify(ip).expect("valid packet").bucket_key())
        .collect();

    let mut g = c.benchmark_group("dispatcher_stage");
    g.throughput(Throughput::Elements(FLOWS as u64));
    g.bench_function("classify", |b| {
        b.iter(|| {
            for ip in &ips {
                let _ = black_box(classify(black_box(ip)));
            }
        })
    });
    g.bench_function("symmetric_hash", |b| {
        b.iter(|| {
            for k in &keys {
                black_box(black_box(k).symmetric_hash());
            }
        })
    });
    g.bench_function("bucket_owner_lookup", |b| {
        let hashes: Vec<u32> = keys.iter().map(|k| k.symmetric_hash()).collect();
        b.iter(|| {
            for &h in &hashes {
                black_box(table.owner(table.bucket_of(black_box(h))));
            }
        })
    });
    g.finish();
}

fn full_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("dispatcher_path");
    g.throughput(Throughput::Elements(FLOWS as u64));
    for (name, payload) in SIZES {
        let frames = tcp_frames(payload);
        let (mut d, _) = common::dispatcher();
        let mut bp = SlotTx::default();
        g.bench_function(BenchmarkId::new("parse_hash_lookup_encap", name), |b| {
            b.iter(|| {
                for f in &frames {
                    d.on_frame(0, black_box(f), rx_meta(f), &mut bp);
                }
            })
        });
    }
    let datagrams: Vec<Vec<u8>> = common::datagrams_of(&tcp_frames(0))
        .into_iter()
        .map(|mut d| {
            common::mark_from_dataplane(&mut d);
            d
        })
        .collect();
    let (mut d, mut ports) = common::dispatcher();
    let from = common::from_dataplane();
    g.bench_function(BenchmarkId::new("route_transmit", "60B"), |b| {
        b.iter(|| {
            for dg in &datagrams {
                d.on_backplane(black_box(dg), from, &mut ports);
            }
        })
    });
    g.finish();
}

fn dataplane(c: &mut Criterion) {
    let mut g = c.benchmark_group("dataplane_path");
    g.throughput(Throughput::Elements(FLOWS as u64));
    let from = common::from_dispatcher();
    for (name, chain) in [
        ("firewall_established", Chain::Firewall),
        ("nat_established", Chain::Nat),
        ("lb_established", Chain::Lb),
    ] {
        let (mut dp, acks) = common::dataplane(chain);
        let mut at = 0;
        g.bench_function(name, |b| {
            b.iter(|| {
                // A batch of FLOWS out of the held connections, a different one each time.
                for _ in 0..FLOWS {
                    dp.on_packet(black_box(&acks[at]), from);
                    at = (at + 1) % acks.len();
                }
            })
        });
    }
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
    targets = full_path, stages, dataplane
}
criterion_main!(benches);
