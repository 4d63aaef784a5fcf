//! The dispatcher's per-packet work on realistic frames, without I/O: parse (Ethernet, IPv4
//! checks, classify), symmetric hash → bucket → owner in a 4096-bucket Maglev table over 4 data
//! planes, and GENEVE encapsulation with the copy of the packet into a reused send buffer.
//!
//! Every iteration runs a batch of 1024 distinct flows (so the hash, the table and the branch
//! predictors see varied input, not one cached flow); throughput is reported per packet
//! (`Throughput::Elements`), so criterion's `thrpt` is packets/s and `time / 1024` is the time
//! per packet. Run: `cargo bench -p dva-unit --bench dispatcher_path`.

mod common;

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use common::{bucket, dispatch, encap, parse, table, tcp_frames, FLOWS, SLOT_LEN};

/// Bare ACKs (60-byte frames) and full-size segments (1514-byte frames).
const SIZES: [(&str, usize); 2] = [("60B", 0), ("1514B", 1460)];

fn stages(c: &mut Criterion) {
    let table = table();
    let frames = tcp_frames(0);
    let parsed: Vec<_> = frames
        .iter()
        .map(|f| parse(f).expect("valid frame").1)
        .collect();
    let keys: Vec<_> = parsed.iter().map(|c| *c.bucket_key()).collect();
    let buckets: Vec<u16> = parsed.iter().map(|c| bucket(&table, c)).collect();

    let mut g = c.benchmark_group("dispatcher_stage");
    g.throughput(Throughput::Elements(FLOWS as u64));
    g.bench_function("parse_classify", |b| {
        b.iter(|| {
            for f in &frames {
                let _ = black_box(parse(black_box(f)));
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
    for (name, payload) in SIZES {
        let frames = tcp_frames(payload);
        let ips: Vec<&[u8]> = frames
            .iter()
            .map(|f| parse(f).expect("valid frame").0)
            .collect();
        let mut slot = vec![0u8; SLOT_LEN];
        g.bench_function(BenchmarkId::new("geneve_encap_copy", name), |b| {
            b.iter(|| {
                for (ip, &bk) in ips.iter().zip(&buckets) {
                    let _ = black_box(encap(&mut slot, black_box(ip), bk, 0));
                }
            })
        });
    }
    g.finish();
}

fn full_path(c: &mut Criterion) {
    let table = table();
    let mut g = c.benchmark_group("dispatcher_path");
    g.throughput(Throughput::Elements(FLOWS as u64));
    for (name, payload) in SIZES {
        let frames = tcp_frames(payload);
        let mut slot = vec![0u8; SLOT_LEN];
        g.bench_function(BenchmarkId::new("parse_hash_lookup_encap", name), |b| {
            b.iter(|| {
                for f in &frames {
                    let _ = black_box(dispatch(&table, black_box(f), &mut slot));
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
    targets = full_path, stages
}
criterion_main!(benches);
