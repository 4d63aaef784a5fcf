//! Firewall behaviour, mostly as data: scenarios of (time, packet, policy) -> verdict.

use std::net::IpAddr;

use super::*;
use dva_wire::tcp::flags::*;

const SEC: u64 = 1_000_000_000;
const OUT: u8 = 0; // interface "outside"
const IN: u8 = 1; // interface "inside"

const CLIENT: &str = "198.18.1.2";
const SERVER: &str = "198.18.2.2";
const BLOCKED: &str = "198.18.1.66";
const ROUTER: &str = "198.18.9.1";
const CLIENT6: &str = "2001:db8:1::2";
const SERVER6: &str = "2001:db8:2::2";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn key(proto: u8, src: &str, sp: u16, dst: &str, dp: u16) -> FlowKey {
    FlowKey {
        proto,
        src: ip(src),
        dst: ip(dst),
        src_port: sp,
        dst_port: dp,
    }
}

fn pkt(ingress_if: u8, key: FlowKey) -> PacketInfo {
    PacketInfo {
        ingress_if,
        key,
        tcp_flags: 0,
        tcp: TcpSegment::default(),
        icmp: None,
        icmp_inner: None,
        len: 100,
    }
}

fn tcp(ingress_if: u8, key: FlowKey, flags: u8) -> PacketInfo {
    PacketInfo {
        tcp_flags: flags,
        ..pkt(ingress_if, key)
    }
}

fn icmp(ingress_if: u8, key: FlowKey, ty: u8, code: u8) -> PacketInfo {
    PacketInfo {
        icmp: Some((ty, code)),
        ..pkt(ingress_if, key)
    }
}

fn icmp_err(ingress_if: u8, key: FlowKey, ty: u8, code: u8, inner: FlowKey) -> PacketInfo {
    PacketInfo {
        icmp_inner: Some(inner),
        ..icmp(ingress_if, key, ty, code)
    }
}

/// Client -> server web connection, as the client sends it.
fn web() -> FlowKey {
    key(ip_proto::TCP, CLIENT, 40000, SERVER, 80)
}
fn web6() -> FlowKey {
    key(ip_proto::TCP, CLIENT6, 40000, SERVER6, 443)
}
fn dns() -> FlowKey {
    key(ip_proto::UDP, CLIENT, 5353, SERVER, 53)
}
fn ping(id: u16) -> FlowKey {
    key(ip_proto::ICMP, CLIENT, id, SERVER, id)
}

fn rule(name: &str, action: Action) -> Rule {
    Rule {
        name: Some(name.into()),
        ..Rule::any(action)
    }
}

fn ruleset() -> RuleSet {
    let ports = |p: &[u16]| p.iter().map(|&p| PortRange::single(p)).collect::<Vec<_>>();
    RuleSet {
        rules: vec![
            // 0
            Rule {
                src: vec!["198.18.1.66/32".parse().unwrap()],
                ..rule("blocked", Action::Drop)
            },
            // 1
            Rule {
                ingress_if: Some(OUT),
                dst: vec![
                    "198.18.2.0/24".parse().unwrap(),
                    "2001:db8:2::/48".parse().unwrap(),
                ],
                proto: Some(ip_proto::TCP),
                dst_ports: ports(&[80, 443]),
                ..rule("web", Action::Accept)
            },
            // 2
            Rule {
                proto: Some(ip_proto::UDP),
                dst_ports: ports(&[53]),
                ..rule("dns", Action::Accept)
            },
            // 3
            Rule {
                proto: Some(ip_proto::ICMP),
                icmp_type: Some(8),
                ..rule("ping", Action::Accept)
            },
            // 4
            Rule {
                proto: Some(ip_proto::ICMPV6),
                icmp_type: Some(128),
                ..rule("ping6", Action::Accept)
            },
            // 5
            Rule {
                proto: Some(ip_proto::TCP),
                dst_ports: ports(&[22]),
                ..rule("ssh", Action::Reject)
            },
            // 6
            Rule {
                proto: Some(ip_proto::UDP),
                dst_ports: ports(&[9]),
                ..rule("discard", Action::Reject)
            },
            // 7: ICMP errors from the router are fine; anyone else's get rejected (-> dropped).
            Rule {
                src: vec!["198.18.9.1/32".parse().unwrap()],
                proto: Some(ip_proto::ICMP),
                ..rule("router", Action::Accept)
            },
            // 8
            Rule {
                proto: Some(ip_proto::ICMP),
                icmp_type: Some(3),
                ..rule("unreach", Action::Reject)
            },
            // 9
            Rule {
                ingress_if: Some(IN),
                proto: Some(47),
                ..rule("gre-out", Action::Accept)
            },
            // 10: ranges
            Rule {
                proto: Some(ip_proto::TCP),
                dst_ports: vec![PortRange {
                    first: 6000,
                    last: 6010,
                }],
                src_ports: vec![PortRange {
                    first: 1024,
                    last: 65535,
                }],
                ..rule("x11", Action::Accept)
            },
        ],
        default_action: Action::Drop,
    }
}

fn firewall() -> Firewall {
    Firewall::new(ruleset(), ConntrackConfig::default())
}

use NewFlowPolicy::{Create, Refuse};
const ACCEPT: Verdict = Verdict::Accept;
const INVALID: Verdict = Verdict::Drop(DropReason::InvalidState);
const DEFAULT: Verdict = Verdict::Drop(DropReason::DefaultPolicy);
const RULE_DROP: Verdict = Verdict::Drop(DropReason::RuleDrop);

/// One packet of a scenario: at `t` seconds, expect `want`, then (optionally) this TCP state for
/// the packet's connection and this number of tracked connections.
struct Step {
    t: u64,
    pkt: PacketInfo,
    policy: NewFlowPolicy,
    want: Verdict,
    state: Option<ConnState>,
    len: Option<usize>,
}

fn at(t: u64, pkt: PacketInfo, want: Verdict) -> Step {
    Step {
        t,
        pkt,
        policy: Create,
        want,
        state: None,
        len: None,
    }
}

impl Step {
    fn refuse(mut self) -> Step {
        self.policy = Refuse;
        self
    }
    fn tcp_state(mut self, s: TcpState) -> Step {
        self.state = Some(ConnState::Tcp(s));
        self
    }
    fn conn_state(mut self, s: ConnState) -> Step {
        self.state = Some(s);
        self
    }
    fn len(mut self, n: usize) -> Step {
        self.len = Some(n);
        self
    }
}

fn run(name: &str, fw: &mut Firewall, steps: &[Step]) {
    for (i, s) in steps.iter().enumerate() {
        let got = fw.process(s.t * SEC, 7, &s.pkt, s.policy);
        assert_eq!(got, s.want, "{name}, step {i}: {}", s.pkt.key);
        if let Some(want) = s.state {
            let c = fw
                .conntrack()
                .find(&s.pkt.key)
                .unwrap_or_else(|| panic!("{name}, step {i}: no conn"));
            assert_eq!(c.state, want, "{name}, step {i}");
        }
        if let Some(n) = s.len {
            assert_eq!(fw.len(), n, "{name}, step {i}: tracked connections");
        }
    }
}

#[test]
fn scenarios() {
    let w = web();
    let r = w.reversed();
    let w6 = web6();
    let r6 = w6.reversed();
    let scenarios: Vec<(&str, Vec<Step>)> = vec![
        (
            "tcp handshake, data, active close",
            vec![
                at(0, tcp(OUT, w, SYN), ACCEPT)
                    .tcp_state(TcpState::SynSent)
                    .len(1),
                at(0, tcp(OUT, w, SYN), ACCEPT)
                    .tcp_state(TcpState::SynSent)
                    .len(1),
                at(0, tcp(IN, r, SYN | ACK), ACCEPT).tcp_state(TcpState::SynRecv),
                at(0, tcp(OUT, w, ACK), ACCEPT).tcp_state(TcpState::Established),
                at(1, tcp(OUT, w, ACK | PSH), ACCEPT).tcp_state(TcpState::Established),
                at(1, tcp(IN, r, ACK | PSH), ACCEPT).tcp_state(TcpState::Established),
                at(2, tcp(OUT, w, FIN | ACK), ACCEPT).tcp_state(TcpState::FinWait),
                at(2, tcp(IN, r, FIN | ACK), ACCEPT).tcp_state(TcpState::LastAck),
                at(2, tcp(OUT, w, ACK), ACCEPT)
                    .tcp_state(TcpState::TimeWait)
                    .len(1),
                // time_wait lasts 120 s from its last packet.
                at(121, tcp(OUT, w, ACK), ACCEPT).len(1),
                at(241, tcp(OUT, w, ACK), INVALID).len(0),
            ],
        ),
        (
            "passive close with separate ACK and FIN",
            vec![
                at(0, tcp(OUT, w, SYN), ACCEPT),
                at(0, tcp(IN, r, SYN | ACK), ACCEPT),
                at(0, tcp(OUT, w, ACK), ACCEPT),
                at(5, tcp(IN, r, FIN | ACK), ACCEPT).tcp_state(TcpState::FinWait),
                at(5, tcp(OUT, w, ACK), ACCEPT).tcp_state(TcpState::CloseWait),
                at(6, tcp(OUT, w, FIN | ACK), ACCEPT).tcp_state(TcpState::LastAck),
                at(6, tcp(IN, r, ACK), ACCEPT).tcp_state(TcpState::TimeWait),
            ],
        ),
        (
            "replies pass only for accepted flows",
            vec![
                // Port 8080 is not allowed: the SYN drops and creates nothing ...
                at(
                    0,
                    tcp(OUT, key(6, CLIENT, 40001, SERVER, 8080), SYN),
                    DEFAULT,
                )
                .len(0),
                // ... so the server's answer has no connection to belong to.
                at(
                    0,
                    tcp(IN, key(6, SERVER, 8080, CLIENT, 40001), SYN | ACK),
                    INVALID,
                ),
                // A server cannot open a connection by sending ACKs either.
                at(0, tcp(IN, r, ACK), INVALID).len(0),
                // Right port, wrong interface: the web rule wants ingress "outside".
                at(0, tcp(IN, w, SYN), DEFAULT).len(0),
            ],
        ),
        (
            "rule order: blocked source loses even on an open port",
            vec![at(
                0,
                tcp(OUT, key(6, BLOCKED, 40000, SERVER, 80), SYN),
                RULE_DROP,
            )
            .len(0)],
        ),
        (
            "reject kinds create no state",
            vec![
                at(
                    0,
                    tcp(OUT, key(6, CLIENT, 40000, SERVER, 22), SYN),
                    Verdict::Reject(RejectKind::TcpReset),
                ),
                at(
                    0,
                    pkt(OUT, key(17, CLIENT, 40000, SERVER, 9)),
                    Verdict::Reject(RejectKind::IcmpPortUnreachable),
                )
                .len(0),
                // Only a SYN reaches the rules; a stray ACK to :22 is invalid, not rejected.
                at(0, tcp(OUT, key(6, CLIENT, 40000, SERVER, 22), ACK), INVALID),
            ],
        ),
        (
            "udp request and reply",
            vec![
                at(0, pkt(OUT, dns()), ACCEPT)
                    .conn_state(ConnState::Udp { replied: false })
                    .len(1),
                at(0, pkt(IN, dns().reversed()), ACCEPT)
                    .conn_state(ConnState::Udp { replied: true }),
                at(1, pkt(OUT, dns()), ACCEPT).len(1),
                // Another client port is another flow (and allowed as new by the dns rule).
                at(1, pkt(OUT, key(17, CLIENT, 5354, SERVER, 53)), ACCEPT).len(2),
                // An unsolicited datagram from the server's port 53 is new and matches nothing.
                at(1, pkt(IN, key(17, SERVER, 53, CLIENT, 7777)), DEFAULT).len(2),
            ],
        ),
        (
            "udp timeouts: 30 s unreplied, 180 s replied",
            vec![
                at(0, pkt(OUT, dns()), ACCEPT),
                at(29, pkt(IN, dns().reversed()), ACCEPT),
                at(29 + 179, pkt(IN, dns().reversed()), ACCEPT),
                at(29 + 179 + 180, pkt(IN, dns().reversed()), DEFAULT).len(0),
                at(400, pkt(OUT, key(17, CLIENT, 6000, SERVER, 53)), ACCEPT),
                at(430, pkt(IN, key(17, SERVER, 53, CLIENT, 6000)), DEFAULT).len(0),
            ],
        ),
        (
            "icmp echo: reply related by identifier",
            vec![
                at(0, icmp(OUT, ping(7), 8, 0), ACCEPT)
                    .conn_state(ConnState::Icmp { replied: false }),
                at(0, icmp(IN, ping(7).reversed(), 0, 0), ACCEPT)
                    .conn_state(ConnState::Icmp { replied: true }),
                // A reply with another identifier answers nothing we saw.
                at(0, icmp(IN, ping(8).reversed(), 0, 0), INVALID),
                // icmp timeout is 30 s.
                at(31, icmp(IN, ping(7).reversed(), 0, 0), INVALID).len(0),
            ],
        ),
        (
            "icmp errors: related if the quoted flow is tracked, else the rules, never state",
            vec![
                at(0, tcp(OUT, w, SYN), ACCEPT),
                // Fragmentation needed from a third party (not the router rule's source), about
                // the client's packet: related.
                at(
                    0,
                    icmp_err(IN, key(1, "198.18.2.254", 0, CLIENT, 0), 3, 4, w),
                    ACCEPT,
                )
                .len(1),
                // Port unreachable from the server about a flow never seen: the rules, where
                // "unreach" rejects it, and an error is never answered: drop.
                at(
                    0,
                    icmp_err(
                        IN,
                        key(1, SERVER, 0, CLIENT, 0),
                        3,
                        3,
                        key(17, CLIENT, 1, SERVER, 2),
                    ),
                    RULE_DROP,
                ),
                // From the router, unrelated but allowed by a rule: accepted, nothing created.
                at(
                    0,
                    icmp_err(
                        OUT,
                        key(1, ROUTER, 0, CLIENT, 0),
                        11,
                        0,
                        key(17, CLIENT, 1, SERVER, 2),
                    ),
                    ACCEPT,
                )
                .len(1),
                // Time exceeded from elsewhere, unrelated: default policy.
                at(
                    0,
                    icmp_err(
                        OUT,
                        key(1, "198.18.7.7", 0, CLIENT, 0),
                        11,
                        0,
                        key(17, CLIENT, 1, SERVER, 2),
                    ),
                    DEFAULT,
                ),
                // An error type without a quote (truncated) cannot be related.
                at(
                    0,
                    icmp(OUT, key(1, "198.18.7.7", 0, CLIENT, 0), 11, 0),
                    DEFAULT,
                )
                .len(1),
            ],
        ),
        (
            "icmp errors about a tracked flow go only to the host that sent the quoted packet",
            vec![
                at(0, tcp(OUT, w, SYN), ACCEPT),
                at(0, tcp(IN, r, SYN | ACK), ACCEPT),
                // About the server's SYN-ACK, to the server: related.
                at(
                    0,
                    icmp_err(OUT, key(1, CLIENT, 0, SERVER, 0), 3, 3, r),
                    ACCEPT,
                ),
                // The same quote aimed at another inside host (the kernel's "outer daddr !=
                // inner saddr"): dropped, whatever the rules say, and the flow is untouched.
                at(
                    0,
                    icmp_err(OUT, key(1, CLIENT, 0, "198.18.2.3", 0), 3, 3, r),
                    Verdict::Drop(DropReason::IcmpErrorUnrelated),
                ),
                // The client's own packet quoted back at the server that never sent it.
                at(
                    0,
                    icmp_err(OUT, key(1, ROUTER, 0, SERVER, 0), 3, 4, w),
                    Verdict::Drop(DropReason::IcmpErrorUnrelated),
                ),
                // Under the refuse policy too: the flow is here, so the answer is known.
                at(
                    0,
                    icmp_err(OUT, key(1, ROUTER, 0, SERVER, 0), 11, 0, w),
                    Verdict::Drop(DropReason::IcmpErrorUnrelated),
                )
                .refuse()
                .len(1),
            ],
        ),
        (
            "refuse policy gives NoState and creates nothing",
            vec![
                at(0, tcp(OUT, w, SYN), Verdict::NoState).refuse().len(0),
                at(0, pkt(OUT, dns()), Verdict::NoState).refuse().len(0),
                at(0, icmp(OUT, ping(1), 8, 0), Verdict::NoState)
                    .refuse()
                    .len(0),
                at(0, tcp(IN, r, ACK), Verdict::NoState).refuse(),
                at(
                    0,
                    icmp_err(OUT, key(1, ROUTER, 0, CLIENT, 0), 3, 1, w),
                    Verdict::NoState,
                )
                .refuse(),
                // Even a packet the rules would drop is NoState: the previous owner may track it.
                at(
                    0,
                    tcp(OUT, key(6, CLIENT, 1, SERVER, 8080), SYN),
                    Verdict::NoState,
                )
                .refuse()
                .len(0),
                // Once tracked, Refuse does not matter.
                at(1, tcp(OUT, w, SYN), ACCEPT).len(1),
                at(1, tcp(IN, r, SYN | ACK), ACCEPT).refuse(),
                at(
                    1,
                    icmp_err(OUT, key(1, ROUTER, 0, CLIENT, 0), 3, 1, w),
                    ACCEPT,
                )
                .refuse(),
            ],
        ),
        (
            "invalid segments on a tracked connection",
            vec![
                at(0, tcp(OUT, w, SYN), ACCEPT),
                at(0, tcp(OUT, w, ACK), INVALID).tcp_state(TcpState::SynSent),
                at(0, tcp(IN, r, FIN | ACK), INVALID),
                at(0, tcp(IN, r, SYN | ACK), ACCEPT),
                at(0, tcp(OUT, w, ACK), ACCEPT).tcp_state(TcpState::Established),
                at(0, tcp(OUT, w, SYN | FIN), INVALID).tcp_state(TcpState::Established),
                at(0, tcp(OUT, w, 0), INVALID),
                at(0, tcp(IN, r, SYN), INVALID).tcp_state(TcpState::Established),
            ],
        ),
        (
            "rst closes; close lasts 10 s",
            vec![
                at(0, tcp(OUT, w, SYN), ACCEPT),
                at(0, tcp(IN, r, RST | ACK), ACCEPT).tcp_state(TcpState::Close),
                at(9, tcp(OUT, w, ACK), ACCEPT).tcp_state(TcpState::Close),
                // Only the original side may re-open from CLOSE (Linux: reply SYN in CLOSE is invalid).
                at(9, tcp(IN, r, SYN), INVALID).tcp_state(TcpState::Close),
                at(20, tcp(OUT, w, ACK), INVALID).len(0),
            ],
        ),
        (
            "syn in time_wait re-opens through the rules",
            vec![
                at(0, tcp(OUT, w, SYN), ACCEPT),
                at(0, tcp(IN, r, SYN | ACK), ACCEPT),
                at(0, tcp(OUT, w, ACK), ACCEPT),
                at(0, tcp(OUT, w, FIN | ACK), ACCEPT),
                at(0, tcp(IN, r, FIN | ACK), ACCEPT),
                at(0, tcp(OUT, w, ACK), ACCEPT).tcp_state(TcpState::TimeWait),
                at(1, tcp(OUT, w, SYN), ACCEPT)
                    .tcp_state(TcpState::SynSent)
                    .len(1),
                at(1, tcp(IN, r, SYN | ACK), ACCEPT).tcp_state(TcpState::SynRecv),
                at(1, tcp(OUT, w, ACK), ACCEPT).tcp_state(TcpState::Established),
            ],
        ),
        (
            "syn in time_wait from the other side is a new connection, checked by the rules",
            vec![
                at(0, tcp(OUT, w, SYN), ACCEPT),
                at(0, tcp(IN, r, SYN | ACK), ACCEPT),
                at(0, tcp(OUT, w, ACK), ACCEPT),
                at(0, tcp(IN, r, FIN | ACK), ACCEPT),
                at(0, tcp(OUT, w, FIN | ACK), ACCEPT),
                at(0, tcp(IN, r, ACK), ACCEPT).tcp_state(TcpState::TimeWait),
                // The server re-using the tuple the other way round: the rules do not allow it;
                // dropped, and the finished connection is gone.
                at(1, tcp(IN, r, SYN), DEFAULT).len(0),
                at(2, tcp(OUT, w, SYN), ACCEPT)
                    .tcp_state(TcpState::SynSent)
                    .len(1),
            ],
        ),
        (
            "syn_sent times out after 120 s",
            vec![
                at(0, tcp(OUT, w, SYN), ACCEPT),
                at(121, tcp(IN, r, SYN | ACK), INVALID).len(0),
                at(121, tcp(OUT, w, SYN), ACCEPT).len(1),
            ],
        ),
        (
            "established lasts 5 days of silence",
            vec![
                at(0, tcp(OUT, w, SYN), ACCEPT),
                at(0, tcp(IN, r, SYN | ACK), ACCEPT),
                at(0, tcp(OUT, w, ACK), ACCEPT),
                at(431_999, tcp(IN, r, ACK), ACCEPT),
                at(431_999 + 432_000, tcp(IN, r, ACK), INVALID).len(0),
            ],
        ),
        (
            "ipv6: tcp, icmpv6 echo, packet too big related",
            vec![
                at(0, tcp(OUT, w6, SYN), ACCEPT),
                at(0, tcp(IN, r6, SYN | ACK), ACCEPT),
                at(0, tcp(OUT, w6, ACK), ACCEPT).tcp_state(TcpState::Established),
                at(
                    0,
                    icmp_err(IN, key(58, "2001:db8:2::1", 0, SERVER6, 0), 2, 0, r6),
                    ACCEPT,
                ),
                // Packet too big about the server's packet, aimed at another host: dropped.
                at(
                    0,
                    icmp_err(
                        IN,
                        key(58, "2001:db8:2::1", 0, "2001:db8:2::3", 0),
                        2,
                        0,
                        r6,
                    ),
                    Verdict::Drop(DropReason::IcmpErrorUnrelated),
                ),
                at(
                    0,
                    icmp(OUT, key(58, CLIENT6, 9, SERVER6, 9), 128, 0),
                    ACCEPT,
                ),
                at(0, icmp(IN, key(58, SERVER6, 9, CLIENT6, 9), 129, 0), ACCEPT),
                at(0, icmp(IN, key(58, SERVER6, 9, CLIENT6, 9), 128, 0), ACCEPT).len(2),
                // Neighbor solicitation: informational, no rule, default drop, no state.
                at(
                    0,
                    icmp(IN, key(58, SERVER6, 0, CLIENT6, 0), 135, 0),
                    DEFAULT,
                )
                .len(2),
                // The v4 web rule's v4 network does not match v6 addresses on port 80.
                at(
                    0,
                    tcp(OUT, key(6, CLIENT6, 1, "2001:db8:3::1", 80), SYN),
                    DEFAULT,
                ),
            ],
        ),
        (
            "other protocols: generic pseudo-connections",
            vec![
                at(0, pkt(IN, key(47, SERVER, 0, CLIENT, 0)), ACCEPT)
                    .conn_state(ConnState::Generic { replied: false }),
                at(0, pkt(OUT, key(47, CLIENT, 0, SERVER, 0)), ACCEPT)
                    .conn_state(ConnState::Generic { replied: true }),
                at(0, pkt(OUT, key(47, CLIENT, 0, "198.18.2.3", 0)), DEFAULT).len(1),
                at(601, pkt(OUT, key(47, CLIENT, 0, SERVER, 0)), DEFAULT).len(0),
            ],
        ),
        (
            "port ranges (source and destination)",
            vec![
                at(0, tcp(OUT, key(6, CLIENT, 1024, SERVER, 6000), SYN), ACCEPT),
                at(
                    0,
                    tcp(OUT, key(6, CLIENT, 65535, SERVER, 6010), SYN),
                    ACCEPT,
                ),
                at(
                    0,
                    tcp(OUT, key(6, CLIENT, 1023, SERVER, 6005), SYN),
                    DEFAULT,
                ),
                at(
                    0,
                    tcp(OUT, key(6, CLIENT, 2000, SERVER, 6011), SYN),
                    DEFAULT,
                )
                .len(2),
            ],
        ),
    ];
    for (name, steps) in &scenarios {
        run(name, &mut firewall(), steps);
    }
}

#[test]
fn table_full() {
    let mut fw = Firewall::new(
        ruleset(),
        ConntrackConfig {
            max_entries: 2,
            ..ConntrackConfig::default()
        },
    );
    let flow = |p: u16| key(17, CLIENT, p, SERVER, 53);
    assert_eq!(fw.process(0, 1, &pkt(OUT, flow(1)), Create), ACCEPT);
    assert_eq!(fw.process(SEC, 1, &pkt(OUT, flow(2)), Create), ACCEPT);
    // Replied flows are not evicted to make room (unreplied ones would be: early drop).
    for f in [1, 2] {
        assert_eq!(
            fw.process(SEC, 1, &pkt(IN, flow(f).reversed()), Create),
            ACCEPT
        );
    }
    assert_eq!(
        fw.process(SEC, 1, &pkt(OUT, flow(3)), Create),
        Verdict::Drop(DropReason::TableFull)
    );
    // Tracked flows are unaffected by a full table.
    assert_eq!(
        fw.process(2 * SEC, 1, &pkt(IN, flow(1).reversed()), Create),
        ACCEPT
    );
    // Rules come first: a dropped packet is a rule drop, not a full table.
    assert_eq!(
        fw.process(
            2 * SEC,
            1,
            &pkt(OUT, key(17, CLIENT, 1, SERVER, 54)),
            Create
        ),
        DEFAULT
    );
    assert_eq!(fw.len(), 2);
    // Both expire by 182 s (UDP replied); a new flow then finds room without an explicit
    // expire() call.
    assert_eq!(fw.process(200 * SEC, 1, &pkt(OUT, flow(3)), Create), ACCEPT);
    assert_eq!(fw.len(), 1);
    assert_eq!(fw.drops()[3], (DropReason::TableFull, 1));
}

#[test]
fn expire_is_bounded_and_complete() {
    let mut fw = firewall();
    for p in 0..1000u16 {
        assert_eq!(
            fw.process(
                0,
                p % 16,
                &pkt(OUT, key(17, CLIENT, 10_000 + p, SERVER, 53)),
                Create
            ),
            ACCEPT
        );
    }
    assert_eq!(fw.len(), 1000);
    assert_eq!(fw.expire(29 * SEC, 10_000), 0, "nothing due yet");
    assert_eq!(fw.expire(31 * SEC, 100), 100, "budget respected");
    assert_eq!(fw.len(), 900);
    let mut total = 100;
    while !fw.is_empty() {
        let n = fw.expire(31 * SEC, 64);
        assert!(n > 0 && n <= 64);
        total += n;
    }
    assert_eq!(total, 1000);
    assert_eq!(fw.flows_per_bucket().count(), 0);
}

#[test]
fn flows_per_bucket() {
    let mut fw = firewall();
    let cases: [(u16, u16); 4] = [(3, 1), (3, 2), (7, 3), (65535, 4)];
    for (bucket, port) in cases {
        assert_eq!(
            fw.process(
                0,
                bucket,
                &pkt(OUT, key(17, CLIENT, port, SERVER, 53)),
                Create
            ),
            ACCEPT
        );
    }
    let mut per: Vec<_> = fw.flows_per_bucket().collect();
    per.sort_unstable();
    assert_eq!(per, vec![(3, 2), (7, 1), (65535, 1)]);
    // A reply packet dispatched with another bucket number does not re-tag the connection.
    assert_eq!(
        fw.process(0, 9, &pkt(IN, key(17, SERVER, 53, CLIENT, 1)), Create),
        ACCEPT
    );
    assert_eq!(fw.flows_per_bucket().count(), 3);
}

#[test]
fn set_rules_keeps_connections() {
    let mut fw = firewall();
    let w = web();
    for (p, want) in [
        (tcp(OUT, w, SYN), ACCEPT),
        (tcp(IN, w.reversed(), SYN | ACK), ACCEPT),
        (tcp(OUT, w, ACK), ACCEPT),
    ] {
        assert_eq!(fw.process(0, 0, &p, Create), want);
    }
    assert_eq!(fw.rule_hits()[1], 1);
    fw.set_rules(RuleSet::with_default(Action::Drop));
    assert!(fw.rule_hits().is_empty());
    assert_eq!(
        fw.process(SEC, 0, &tcp(IN, w.reversed(), ACK | PSH), Create),
        ACCEPT
    );
    assert_eq!(
        fw.process(
            SEC,
            0,
            &tcp(OUT, key(6, CLIENT, 40001, SERVER, 80), SYN),
            Create
        ),
        DEFAULT
    );
    assert_eq!(fw.default_hits(), 1);
    assert_eq!(fw.len(), 1);
}

#[test]
fn counters() {
    let mut fw = firewall();
    let w = web();
    let steps = [
        (tcp(OUT, w, SYN), ACCEPT),
        (tcp(IN, w.reversed(), SYN | ACK), ACCEPT),
        (tcp(OUT, key(6, BLOCKED, 1, SERVER, 80), SYN), RULE_DROP),
        (tcp(OUT, key(6, CLIENT, 1, SERVER, 81), SYN), DEFAULT),
        (
            tcp(OUT, key(6, CLIENT, 1, SERVER, 22), SYN),
            Verdict::Reject(RejectKind::TcpReset),
        ),
        (tcp(OUT, key(6, CLIENT, 1, SERVER, 82), ACK), INVALID),
        (icmp_err(OUT, key(1, ROUTER, 0, CLIENT, 0), 3, 4, w), ACCEPT),
        (pkt(OUT, dns()), ACCEPT),
    ];
    for (p, want) in steps {
        assert_eq!(fw.process(0, 0, &p, Create), want);
    }
    assert_eq!(
        fw.process(0, 0, &pkt(OUT, key(17, CLIENT, 1, SERVER, 1)), Refuse),
        Verdict::NoState
    );
    let hits = fw.rule_hits();
    assert_eq!(hits.len(), ruleset().rules.len());
    assert_eq!((hits[0], hits[1], hits[2], hits[5]), (1, 1, 1, 1));
    assert_eq!(hits.iter().sum::<u64>(), 4);
    assert_eq!(fw.default_hits(), 1);
    assert_eq!(
        fw.drops(),
        [
            (DropReason::RuleDrop, 1),
            (DropReason::DefaultPolicy, 1),
            (DropReason::InvalidState, 1),
            (DropReason::TableFull, 0),
            (DropReason::IcmpErrorUnrelated, 0),
            (DropReason::TcpOutOfWindow, 0)
        ]
    );
    let s = fw.stats();
    assert_eq!(
        (s.created, s.established, s.related, s.rejected, s.no_state),
        (2, 1, 1, 1, 1)
    );

    let c = fw.conntrack().find(&w).unwrap();
    assert_eq!(
        (c.orig_packets, c.orig_bytes, c.reply_packets, c.reply_bytes),
        (1, 100, 1, 100)
    );
    assert_eq!(c.bucket, 0);
    assert_eq!(c.key, w, "the original direction is the SYN's");
}

#[test]
fn export_and_import_move_a_connection() {
    let mut a = firewall();
    let w = web();
    a.process(0, 5, &tcp(OUT, w, SYN), Create);
    a.process(0, 5, &tcp(IN, w.reversed(), SYN | ACK), Create);
    a.process(0, 5, &tcp(OUT, w, ACK), Create);
    a.process(0, 6, &pkt(OUT, dns()), Create);
    let moved = a.export_bucket(SEC, 5);
    assert_eq!(moved.len(), 1);
    let json = serde_json::to_string(&moved).unwrap();
    let moved: Vec<Conn> = serde_json::from_str(&json).unwrap();

    // The new owner's clock is unrelated to the old one's.
    let mut b = firewall();
    let t = 1_000_000 * SEC;
    for c in moved {
        b.import(t, c).unwrap();
    }
    assert_eq!(
        b.process(t, 5, &tcp(IN, w.reversed(), ACK | PSH), Refuse),
        ACCEPT
    );
    assert_eq!(
        b.conntrack().find(&w).unwrap().state,
        ConnState::Tcp(TcpState::Established)
    );
    let again = b.export_bucket(t, 5).pop().unwrap();
    assert!(matches!(
        b.import(t, again),
        Err(CreateError::Exists { .. })
    ));
    assert_eq!(a.conntrack_mut().remove_bucket(5), 1);
    assert_eq!(a.len(), 1);
}

#[test]
fn malformed_input_never_panics() {
    let mut fw = firewall();
    let weird = [
        PacketInfo {
            icmp: None,
            ..pkt(OUT, key(1, CLIENT, 0, SERVER, 0))
        },
        PacketInfo {
            tcp_flags: 0xff,
            ..pkt(OUT, key(6, CLIENT, 0, SERVER, 0))
        },
        // Mixed families (no real packet has them).
        pkt(
            OUT,
            FlowKey {
                proto: 17,
                src: ip(CLIENT),
                dst: ip(SERVER6),
                src_port: 1,
                dst_port: 53,
            },
        ),
        // ICMP error quoting a key of the other family, and an error quoting itself.
        icmp_err(OUT, key(1, ROUTER, 0, CLIENT, 0), 3, 0, web6()),
        icmp_err(
            OUT,
            key(1, ROUTER, 0, CLIENT, 0),
            3,
            0,
            key(1, ROUTER, 0, CLIENT, 0),
        ),
        PacketInfo {
            len: u32::MAX,
            ..pkt(OUT, dns())
        },
    ];
    for (i, p) in weird.iter().enumerate() {
        for policy in [Create, Refuse] {
            for t in [0, u64::MAX / 2, u64::MAX] {
                let _ = fw.process(t, u16::MAX, p, policy);
                let _ = fw.expire(t, 16);
            }
        }
        let _ = i;
    }
    assert_eq!(fw.process(0, 0, &weird[1], Create), INVALID);
}

#[test]
fn thousand_rules_first_match_wins() {
    let mut rules: Vec<Rule> = (0..1000u16)
        .map(|i| Rule {
            proto: Some(ip_proto::TCP),
            dst_ports: vec![PortRange::single(10_000 + i)],
            ..Rule::any(if i % 2 == 0 {
                Action::Accept
            } else {
                Action::Drop
            })
        })
        .collect();
    rules.push(Rule {
        proto: Some(ip_proto::TCP),
        ..Rule::any(Action::Reject)
    });
    let mut fw = Firewall::new(
        RuleSet {
            rules,
            default_action: Action::Accept,
        },
        ConntrackConfig::default(),
    );
    for i in [0u16, 1, 998, 999] {
        let want = if i % 2 == 0 { ACCEPT } else { RULE_DROP };
        assert_eq!(
            fw.process(
                0,
                0,
                &tcp(OUT, key(6, CLIENT, 1, SERVER, 10_000 + i), SYN),
                Create
            ),
            want
        );
    }
    assert_eq!(
        fw.process(0, 0, &tcp(OUT, key(6, CLIENT, 1, SERVER, 9), SYN), Create),
        Verdict::Reject(RejectKind::TcpReset)
    );
    assert_eq!(
        fw.process(0, 0, &pkt(OUT, key(17, CLIENT, 1, SERVER, 9)), Create),
        ACCEPT
    );
    assert_eq!(fw.rule_hits()[999], 1);
    assert_eq!(fw.rule_hits()[1000], 1);
    assert_eq!(fw.default_hits(), 1);
}

/// Each field of a rule, alone, against packets that do and do not match.
#[test]
fn rule_fields() {
    let base = tcp(OUT, key(6, CLIENT, 40000, SERVER, 80), SYN);
    let v6 = tcp(OUT, key(6, CLIENT6, 40000, SERVER6, 80), SYN);
    let echo = icmp(OUT, ping(3), 8, 0);
    let udp = pkt(OUT, key(17, CLIENT, 40000, SERVER, 80));
    let net = |s: &str| vec![s.parse::<ipnet::IpNet>().unwrap()];
    let cases: Vec<(&str, Rule, PacketInfo, bool)> = vec![
        ("any", Rule::any(Action::Accept), base, true),
        (
            "ingress match",
            Rule {
                ingress_if: Some(OUT),
                ..Rule::any(Action::Accept)
            },
            base,
            true,
        ),
        (
            "ingress other",
            Rule {
                ingress_if: Some(IN),
                ..Rule::any(Action::Accept)
            },
            base,
            false,
        ),
        (
            "src /24",
            Rule {
                src: net("198.18.1.0/24"),
                ..Rule::any(Action::Accept)
            },
            base,
            true,
        ),
        (
            "src other",
            Rule {
                src: net("198.18.3.0/24"),
                ..Rule::any(Action::Accept)
            },
            base,
            false,
        ),
        (
            "src host bits ignored",
            Rule {
                src: net("198.18.1.77/24"),
                ..Rule::any(Action::Accept)
            },
            base,
            true,
        ),
        (
            "src /0",
            Rule {
                src: net("0.0.0.0/0"),
                ..Rule::any(Action::Accept)
            },
            base,
            true,
        ),
        (
            "src /0 v4 vs v6 packet",
            Rule {
                src: net("0.0.0.0/0"),
                ..Rule::any(Action::Accept)
            },
            v6,
            false,
        ),
        (
            "src v6 /48",
            Rule {
                src: net("2001:db8:1::/48"),
                ..Rule::any(Action::Accept)
            },
            v6,
            true,
        ),
        (
            "src any of several",
            Rule {
                src: vec![
                    "10.0.0.0/8".parse().unwrap(),
                    "198.18.1.2/32".parse().unwrap(),
                ],
                ..Rule::any(Action::Accept)
            },
            base,
            true,
        ),
        (
            "dst /32",
            Rule {
                dst: net("198.18.2.2/32"),
                ..Rule::any(Action::Accept)
            },
            base,
            true,
        ),
        (
            "dst other",
            Rule {
                dst: net("198.18.2.3/32"),
                ..Rule::any(Action::Accept)
            },
            base,
            false,
        ),
        (
            "proto",
            Rule {
                proto: Some(6),
                ..Rule::any(Action::Accept)
            },
            base,
            true,
        ),
        (
            "proto other",
            Rule {
                proto: Some(17),
                ..Rule::any(Action::Accept)
            },
            base,
            false,
        ),
        (
            "dport",
            Rule {
                dst_ports: vec![PortRange::single(80)],
                ..Rule::any(Action::Accept)
            },
            base,
            true,
        ),
        (
            "dport udp",
            Rule {
                dst_ports: vec![PortRange::single(80)],
                ..Rule::any(Action::Accept)
            },
            udp,
            true,
        ),
        (
            "dport other",
            Rule {
                dst_ports: vec![PortRange::single(81)],
                ..Rule::any(Action::Accept)
            },
            base,
            false,
        ),
        (
            "dport on icmp id never matches",
            Rule {
                dst_ports: vec![PortRange::single(3)],
                ..Rule::any(Action::Accept)
            },
            echo,
            false,
        ),
        (
            "sport range",
            Rule {
                src_ports: vec![PortRange {
                    first: 32768,
                    last: 60999,
                }],
                ..Rule::any(Action::Accept)
            },
            base,
            true,
        ),
        (
            "inverted range matches nothing",
            Rule {
                dst_ports: vec![PortRange {
                    first: 90,
                    last: 70,
                }],
                ..Rule::any(Action::Accept)
            },
            base,
            false,
        ),
        (
            "icmp type",
            Rule {
                icmp_type: Some(8),
                ..Rule::any(Action::Accept)
            },
            echo,
            true,
        ),
        (
            "icmp type other",
            Rule {
                icmp_type: Some(0),
                ..Rule::any(Action::Accept)
            },
            echo,
            false,
        ),
        (
            "icmp type on tcp",
            Rule {
                icmp_type: Some(8),
                ..Rule::any(Action::Accept)
            },
            base,
            false,
        ),
    ];
    for (name, r, p, want) in cases {
        let set = RuleSet {
            rules: vec![r],
            default_action: Action::Drop,
        };
        let c = rules::CompiledRules::new(&set);
        assert_eq!(c.evaluate(&p).0.is_some(), want, "{name}");
    }
}

#[test]
fn ruleset_serde() {
    let json = r#"{
        "rules": [
            {"name": "web", "ingress_if": 0, "dst": ["198.18.2.0/24"], "proto": 6,
             "dst_ports": [{"first": 80, "last": 80}, {"first": 8000, "last": 8080}], "action": "accept"},
            {"proto": 1, "icmp_type": 8, "action": "reject"},
            {"action": "drop"}
        ],
        "default_action": "drop"
    }"#;
    let set: RuleSet = serde_json::from_str(json).unwrap();
    assert_eq!(set.rules.len(), 3);
    assert_eq!(
        set.rules[0].dst_ports[1],
        PortRange {
            first: 8000,
            last: 8080
        }
    );
    assert_eq!(set.rules[1].action, Action::Reject);
    assert!(set.rules[2].src.is_empty());
    set.validate().unwrap();
    let back: RuleSet = serde_json::from_str(&serde_json::to_string(&set).unwrap()).unwrap();
    assert_eq!(back, set);
    for bad in [
        r#"{"rules": [{"action": "allow"}], "default_action": "drop"}"#,
        r#"{"rules": [{"action": "drop", "port": 1}], "default_action": "drop"}"#,
        r#"{"rules": [], "default_action": "drop", "extra": 1}"#,
        r#"{"rules": [{"dst": ["198.18.2.0/33"], "action": "drop"}], "default_action": "drop"}"#,
    ] {
        assert!(serde_json::from_str::<RuleSet>(bad).is_err(), "{bad}");
    }
}

#[test]
fn ruleset_validate() {
    let bad = |r: Rule| {
        RuleSet {
            rules: vec![Rule::any(Action::Accept), r],
            default_action: Action::Drop,
        }
        .validate()
    };
    let e = bad(Rule {
        name: Some("x".into()),
        dst_ports: vec![PortRange { first: 9, last: 1 }],
        ..Rule::any(Action::Drop)
    })
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "rule 1 (x): port range 9-1 is empty (first > last)"
    );
    let e = bad(Rule {
        proto: Some(1),
        dst_ports: vec![PortRange::single(1)],
        ..Rule::any(Action::Drop)
    })
    .unwrap_err();
    assert!(
        matches!(
            e,
            RuleError::PortsWithoutPorts {
                index: 1,
                proto: 1,
                ..
            }
        ),
        "{e}"
    );
    let e = bad(Rule {
        proto: Some(6),
        icmp_type: Some(8),
        ..Rule::any(Action::Drop)
    })
    .unwrap_err();
    assert!(e.to_string().contains("icmp_type 8"), "{e}");
    let e = bad(Rule {
        icmp_type: Some(8),
        ..Rule::any(Action::Drop)
    })
    .unwrap_err();
    assert!(matches!(
        e,
        RuleError::IcmpTypeWithoutIcmp { proto: None, .. }
    ));
    ruleset().validate().unwrap();
}

#[test]
fn default_reject_and_default_accept() {
    let mut fw = Firewall::new(
        RuleSet::with_default(Action::Reject),
        ConntrackConfig::default(),
    );
    assert_eq!(
        fw.process(0, 0, &tcp(OUT, web(), SYN), Create),
        Verdict::Reject(RejectKind::TcpReset)
    );
    assert_eq!(
        fw.process(0, 0, &pkt(OUT, dns()), Create),
        Verdict::Reject(RejectKind::IcmpPortUnreachable)
    );
    assert_eq!(
        fw.process(0, 0, &icmp(OUT, ping(1), 8, 0), Create),
        Verdict::Reject(RejectKind::IcmpPortUnreachable)
    );
    // An unrelated error is dropped, not answered.
    assert_eq!(
        fw.process(
            0,
            0,
            &icmp_err(OUT, key(1, ROUTER, 0, CLIENT, 0), 3, 1, web()),
            Create
        ),
        DEFAULT
    );
    assert!(fw.is_empty());

    let mut fw = Firewall::new(
        RuleSet::with_default(Action::Accept),
        ConntrackConfig::default(),
    );
    assert_eq!(fw.process(0, 0, &tcp(OUT, web(), SYN), Create), ACCEPT);
    assert_eq!(
        fw.process(0, 0, &icmp(OUT, key(1, CLIENT, 0, SERVER, 0), 9, 0), Create),
        ACCEPT
    );
    assert_eq!(fw.len(), 1, "router advertisement: accepted without state");
    assert_eq!(fw.stats().accepted_stateless, 1);
}

#[test]
fn drop_reason_names() {
    let names: Vec<_> = DropReason::ALL.iter().map(|r| r.name()).collect();
    assert_eq!(
        names,
        [
            "rule_drop",
            "default_policy",
            "invalid_state",
            "table_full",
            "icmp_error_unrelated",
            "tcp_out_of_window"
        ]
    );
    for (i, r) in DropReason::ALL.iter().enumerate() {
        assert_eq!(*r as usize, i);
    }
}

#[test]
fn blind_rst_is_dropped_and_counted_as_out_of_window() {
    let mut fw = Firewall::new(
        RuleSet::with_default(Action::Accept),
        ConntrackConfig::default(),
    );
    let seg = |seq, ack, window| TcpSegment {
        seq,
        ack,
        window,
        ..TcpSegment::default()
    };
    let p = |key, flags, s| PacketInfo {
        tcp: s,
        ..tcp(OUT, key, flags)
    };
    for (key, flags, s) in [
        (web(), SYN, seg(100, 0, 1000)),
        (web().reversed(), SYN | ACK, seg(5000, 101, 1000)),
        (web(), ACK, seg(101, 5001, 1000)),
    ] {
        assert_eq!(fw.process(0, 0, &p(key, flags, s), Create), ACCEPT);
    }
    let blind = p(web(), RST, seg(101 + (1 << 30), 0, 0));
    assert_eq!(
        fw.process(0, 0, &blind, Create),
        Verdict::Drop(DropReason::TcpOutOfWindow)
    );
    assert_eq!(fw.drops()[5], (DropReason::TcpOutOfWindow, 1));
    let exact = p(web(), RST, seg(101, 0, 0));
    assert_eq!(fw.process(0, 0, &exact, Create), ACCEPT);
    assert_eq!(
        fw.conntrack().find(&web()).unwrap().state,
        ConnState::Tcp(TcpState::Close)
    );
}
