//! The per-datagram cost of backplane authentication: sealing on send and opening (window
//! check, tag verification) on receive, for a small packet, a full Ethernet frame and a jumbo
//! frame, each wrapped in dva's GENEVE header (32 bytes).

use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use dva_io::seal::{EpochKey, Sealer, KEY_LEN, TRAILER_LEN};

fn sealers() -> (Sealer, Sealer) {
    let keys = [EpochKey {
        epoch: 1,
        key: [7; KEY_LEN],
    }];
    let mut a = Sealer::new(1).expect("sealer");
    let mut b = Sealer::new(2).expect("sealer");
    a.set_keys(1, &keys).expect("keys");
    b.set_keys(1, &keys).expect("keys");
    (a, b)
}

fn bench(c: &mut Criterion) {
    let dst: SocketAddr = "198.19.0.11:6081".parse().expect("addr");
    let mut g = c.benchmark_group("backplane_auth");
    for len in [32 + 64, 32 + 1500, 32 + 9000 - TRAILER_LEN - 32] {
        g.throughput(Throughput::Bytes(len as u64));
        let (mut a, _) = sealers();
        let mut buf = vec![0x5au8; len + TRAILER_LEN];
        g.bench_function(format!("seal/{len}B"), |bench| {
            bench.iter(|| a.seal(&mut buf, len, dst).expect("seal"))
        });
        let (mut a, mut b) = sealers();
        g.bench_function(format!("open/{len}B"), |bench| {
            // Each datagram opens once (a second time is a replay), so seal a fresh one per
            // iteration outside the measurement.
            bench.iter_batched_ref(
                || {
                    let mut d = vec![0x5au8; len + TRAILER_LEN];
                    a.seal(&mut d, len, dst).expect("seal");
                    d
                },
                |d| b.open(d, dst).expect("open"),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
