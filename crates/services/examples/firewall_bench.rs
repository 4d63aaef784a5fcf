//! Per-packet cost of the firewall: `cargo run --release -p dva-services --example firewall_bench`.
//! Prints a table; asserts nothing (timings belong in benchmarks, not tests).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use dva_flow::FlowKey;
use dva_services::firewall::{
    Action, ConntrackConfig, Firewall, NewFlowPolicy, PacketInfo, PortRange, Rule, RuleSet, Verdict,
};
use dva_wire::ip_proto;
use dva_wire::tcp::flags::{ACK, SYN};

fn key(i: u32, dport: u16) -> FlowKey {
    FlowKey {
        proto: ip_proto::TCP,
        src: IpAddr::V4(Ipv4Addr::from_bits(0xc612_0000 | (i >> 8))),
        dst: IpAddr::V4(Ipv4Addr::from_bits(0xc613_0202)),
        src_port: 1024 + (i & 0xff) as u16 * 97 % 60_000,
        dst_port: dport,
    }
}

fn info(key: FlowKey, tcp_flags: u8) -> PacketInfo {
    PacketInfo {
        ingress_if: 0,
        key,
        tcp_flags,
        tcp: Default::default(),
        icmp: None,
        icmp_inner: None,
        len: 1500,
    }
}

fn rules(n: u16) -> RuleSet {
    // n - 1 rules that do not match port 80, then one that does: the worst case for a scan.
    let mut rules: Vec<Rule> = (0..n - 1)
        .map(|i| Rule {
            dst: vec!["198.19.0.0/16".parse().expect("cidr")],
            proto: Some(ip_proto::TCP),
            dst_ports: vec![PortRange::single(10_000 + i)],
            ..Rule::any(Action::Drop)
        })
        .collect();
    rules.push(Rule {
        proto: Some(ip_proto::TCP),
        dst_ports: vec![PortRange::single(80)],
        ..Rule::any(Action::Accept)
    });
    RuleSet {
        rules,
        default_action: Action::Drop,
    }
}

fn row(what: &str, n: usize, t: Instant) {
    println!(
        "{:<44} {:>10.1}",
        what,
        t.elapsed().as_nanos() as f64 / n as f64
    );
}

fn main() {
    println!("{:<44} {:>10}", "operation", "ns/packet");
    for n_rules in [10u16, 1000] {
        let flows: u32 = std::env::var("FLOWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100_000);
        let mut fw = Firewall::new(rules(n_rules), ConntrackConfig::default());
        let t = Instant::now();
        for i in 0..flows {
            let v = fw.process(0, 0, &info(key(i, 80), SYN), NewFlowPolicy::Create);
            debug_assert_eq!(v, Verdict::Accept);
            black_box(v);
        }
        row(
            &format!("new flow, {n_rules} rules (last one matches)"),
            flows as usize,
            t,
        );

        let rounds = 10;
        let t = Instant::now();
        for r in 0..rounds {
            for i in 0..flows {
                let k = if i % 2 == 0 {
                    key(i, 80)
                } else {
                    key(i, 80).reversed()
                };
                black_box(fw.process(u64::from(r), 0, &info(k, ACK), NewFlowPolicy::Create));
            }
        }
        row(
            &format!("established packet, {flows} connections"),
            (rounds * flows) as usize,
            t,
        );
    }
    let mut fw = Firewall::new(rules(10), ConntrackConfig::default());
    for i in 0..100_000 {
        fw.process(0, 0, &info(key(i, 80), SYN), NewFlowPolicy::Create);
    }
    let t = Instant::now();
    let mut n = 0;
    while !fw.is_empty() {
        n += fw.expire(200_000_000_000, 256);
    }
    row("expire, per connection removed", n, t);
}
