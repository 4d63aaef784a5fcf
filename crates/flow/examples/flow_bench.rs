//! Per-packet cost of flow distribution: `cargo run --release -p dva-flow --example flow_bench`.
//! Prints a table; it asserts nothing (timings belong in benchmarks, not tests).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use dva_flow::{BucketTable, FlowKey, DEFAULT_BUCKETS};

fn keys(n: usize, v6: bool) -> Vec<FlowKey> {
    (0..n as u32)
        .map(|i| {
            let (src, dst) = if v6 {
                (
                    IpAddr::V6(Ipv6Addr::from_bits(0x2001_0db8_u128 << 96 | u128::from(i))),
                    IpAddr::V6(Ipv6Addr::from_bits(
                        0x2001_0db8_0001_u128 << 80 | u128::from(i % 97),
                    )),
                )
            } else {
                (
                    IpAddr::V4(Ipv4Addr::from_bits(0xc612_0000 | i)),
                    IpAddr::V4(Ipv4Addr::from_bits(0xc613_0000 | (i % 97))),
                )
            };
            FlowKey {
                proto: 6,
                src,
                dst,
                src_port: (i * 7919) as u16,
                dst_port: 443,
            }
        })
        .collect()
}

fn main() {
    let table =
        BucketTable::maglev(DEFAULT_BUCKETS, &[1, 2, 3, 4, 5, 6, 7, 8]).expect("valid table");
    let rounds = 200;
    println!("{:<28} {:>10}", "operation", "ns/op");
    for v6 in [false, true] {
        let ks = keys(4096, v6);
        let fam = if v6 { "v6" } else { "v4" };
        let t = Instant::now();
        let mut acc = 0u32;
        for _ in 0..rounds {
            for k in &ks {
                acc ^= black_box(k).symmetric_hash();
            }
        }
        black_box(acc);
        let per = t.elapsed().as_nanos() as f64 / (rounds * ks.len()) as f64;
        println!("{:<28} {:>10.2}", format!("symmetric_hash {fam}"), per);

        let t = Instant::now();
        let mut acc = 0u32;
        for _ in 0..rounds {
            for k in &ks {
                acc ^= table.owner(table.bucket_of(black_box(k).symmetric_hash()));
            }
        }
        black_box(acc);
        let per = t.elapsed().as_nanos() as f64 / (rounds * ks.len()) as f64;
        println!(
            "{:<28} {:>10.2}",
            format!("hash + bucket + owner {fam}"),
            per
        );
    }
    let t = Instant::now();
    let t2 = table
        .rebalance(&[1, 2, 3, 4, 5, 6, 7, 8, 9])
        .expect("members");
    println!(
        "{:<28} {:>10.0}",
        "rebalance 4096 buckets 8->9",
        t.elapsed().as_nanos() as f64
    );
    black_box(t2);
}
