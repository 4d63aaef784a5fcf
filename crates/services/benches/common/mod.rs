//! The firewall workload shared by the criterion bench (`firewall.rs`) and the instruction
//! counter (`crates/unit/benches/instructions.rs`): a realistic 1000-rule set whose matching
//! rule sits near the end, and the flows of the lab's edge firewall (client 198.18.1.0/24 →
//! servers 198.18.2.0/24, TCP 80 and 5201).

#![allow(dead_code)] // each bench target uses a different part of this module

use std::net::{IpAddr, Ipv4Addr};

use dva_flow::FlowKey;
use dva_services::firewall::{
    Action, ConntrackConfig, Firewall, NewFlowPolicy, PacketInfo, PortRange, Rule, RuleSet, Verdict,
};
use dva_wire::ip_proto::{ICMP, TCP, UDP};

pub const RULES: usize = 1000;
/// Index of the rule that accepts the benchmark's flows: 990 rules are scanned before it.
pub const MATCHING_RULE: usize = 990;
/// Interface indices as the spec compiler numbers them.
pub const OUTSIDE: u8 = 0;
pub const INSIDE: u8 = 1;

pub use dva_wire::tcp::flags::{ACK, SYN};
pub const SYN_ACK: u8 = SYN | ACK;

/// A small deterministic generator (xorshift*), so every run builds the same rules.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn net(s: String) -> ipnet::IpNet {
    s.parse().expect("generated CIDR")
}

/// A rule of the kind an edge firewall collects over the years: services on other internal
/// networks (10/8, 172.16/12, other 198.18.x), source allow-lists, port ranges, UDP services,
/// ICMP types, a few IPv6 rules. None of them matches the benchmark's flows, and many fail only
/// on their last test (same protocol and port, another network), so the scan does real work.
fn filler(rng: &mut Rng, i: usize) -> Rule {
    let action = match rng.below(10) {
        0..=5 => Action::Accept,
        6..=8 => Action::Drop,
        _ => Action::Reject,
    };
    let from = match rng.below(3) {
        0 => None,
        1 => Some(OUTSIDE),
        _ => Some(INSIDE),
    };
    let other_net = |rng: &mut Rng| match rng.below(4) {
        0 => net(format!("10.{}.{}.0/24", rng.below(256), rng.below(256))),
        1 => net(format!("172.{}.0.0/16", 16 + rng.below(16))),
        2 => net(format!("198.18.{}.0/24", 10 + rng.below(200))),
        _ => net(format!(
            "192.168.{}.{}/32",
            rng.below(256),
            1 + rng.below(254)
        )),
    };
    let mut r = Rule {
        name: Some(format!("rule-{i}")),
        ingress_if: from,
        ..Rule::any(action)
    };
    match i % 10 {
        // TCP service on another network, often on the very ports the benchmark uses.
        0..=3 => {
            r.proto = Some(TCP);
            r.dst = (0..1 + rng.below(3)).map(|_| other_net(rng)).collect();
            r.dst_ports = match rng.below(3) {
                0 => vec![PortRange::single(80), PortRange::single(443)],
                1 => {
                    let first = 1024 + rng.below(60_000) as u16;
                    vec![PortRange {
                        first,
                        last: first.saturating_add(rng.below(500) as u16),
                    }]
                }
                _ => vec![PortRange::single(5201), PortRange::single(8080)],
            };
        }
        // UDP services.
        4 | 5 => {
            r.proto = Some(UDP);
            r.dst = vec![other_net(rng)];
            let first = 1 + rng.below(65_000) as u16;
            r.dst_ports = vec![PortRange {
                first,
                last: first.saturating_add(rng.below(100) as u16),
            }];
        }
        // Source allow-lists: partners' networks to anything inside on a port range.
        6 => {
            r.proto = Some(TCP);
            r.src = (0..1 + rng.below(4))
                .map(|_| net(format!("203.0.{}.0/24", rng.below(256))))
                .collect();
            r.dst = vec![net("198.18.2.0/24".into())];
            r.dst_ports = vec![PortRange {
                first: 1,
                last: 65535,
            }];
        }
        // ICMP types to other networks.
        7 => {
            r.proto = Some(ICMP);
            r.icmp_type = Some([0u8, 3, 8, 11][rng.below(4) as usize]);
            r.dst = vec![other_net(rng)];
        }
        // IPv6.
        8 => {
            r.proto = Some(TCP);
            r.dst = vec![net(format!("2001:db8:{:x}::/48", 0x100 + rng.below(0xf00)))];
            r.dst_ports = vec![PortRange::single(443)];
        }
        // Blocked sources (a deny list), any protocol.
        _ => {
            r.src = vec![net(format!(
                "100.{}.{}.0/24",
                64 + rng.below(64),
                rng.below(256)
            ))];
        }
    }
    r
}

/// [`RULES`] rules; rule [`MATCHING_RULE`] is the edge firewall's `web-in` (outside → inside
/// 198.18.2.0/24, TCP 80 and 5201, accept), the first one the benchmark's flows match. The
/// default drops.
pub fn rule_set() -> RuleSet {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let rules = (0..RULES)
        .map(|i| {
            if i == MATCHING_RULE {
                Rule {
                    name: Some("web-in".into()),
                    ingress_if: Some(OUTSIDE),
                    dst: vec![net("198.18.2.0/24".into())],
                    proto: Some(TCP),
                    dst_ports: vec![PortRange::single(80), PortRange::single(5201)],
                    ..Rule::any(Action::Accept)
                }
            } else {
                filler(&mut rng, i)
            }
        })
        .collect();
    let set = RuleSet {
        rules,
        default_action: Action::Drop,
    };
    set.validate().expect("generated rules are valid");
    set
}

/// Client → server key of flow `i`: clients 198.18.1.2..=251, servers 198.18.2.2..=4, client
/// ports 1024..65024, server ports 80 and 5201: 96 million distinct flows, then they repeat.
#[inline]
pub fn flow(i: u64) -> FlowKey {
    let i = i as u32;
    FlowKey {
        proto: TCP,
        src: IpAddr::V4(Ipv4Addr::new(198, 18, 1, 2 + (i % 250) as u8)),
        dst: IpAddr::V4(Ipv4Addr::new(198, 18, 2, 2 + ((i / 250) % 3) as u8)),
        src_port: 1024 + ((i / 750) % 64_000) as u16,
        dst_port: if (i / 750 / 64_000) & 1 == 0 {
            80
        } else {
            5201
        },
    }
}

#[inline]
pub fn packet(ingress_if: u8, key: FlowKey, tcp_flags: u8, len: u32) -> PacketInfo {
    PacketInfo {
        ingress_if,
        key,
        tcp_flags,
        tcp: Default::default(),
        icmp: None,
        icmp_inner: None,
        len,
    }
}

/// A firewall with the 1000 rules and room for `max_entries` connections.
pub fn firewall(max_entries: usize) -> Firewall {
    Firewall::new(
        rule_set(),
        ConntrackConfig {
            max_entries,
            ..ConntrackConfig::default()
        },
    )
}

/// Open flows `0..n` with a full handshake (SYN, SYN-ACK, ACK), so they are established.
pub fn establish(fw: &mut Firewall, now: u64, n: u64) {
    for i in 0..n {
        let k = flow(i);
        let steps = [
            (OUTSIDE, k, SYN),
            (INSIDE, k.reversed(), SYN_ACK),
            (OUTSIDE, k, ACK),
        ];
        for (iface, key, flags) in steps {
            let v = fw.process(
                now,
                0,
                &packet(iface, key, flags, 60),
                NewFlowPolicy::Create,
            );
            assert_eq!(v, Verdict::Accept, "handshake of flow {i}");
        }
    }
}

/// The established packet number `n` of a run: a pseudo-random one of the tracked flows
/// `0..flows` (consecutive packets hit unrelated table entries, as on a busy link), odd ones
/// in the reply direction.
#[inline]
pub fn established_packet(n: u64, flows: u64) -> PacketInfo {
    let i = n.wrapping_mul(0x9e37_79b9_7f4a_7c15 | 1) % flows;
    let k = flow(i);
    if n & 1 == 0 {
        packet(OUTSIDE, k, ACK, 1500)
    } else {
        packet(INSIDE, k.reversed(), ACK, 60)
    }
}
