//! Scenarios after the Linux netfilter selftests (tools/testing/selftests/net/netfilter:
//! `nft_nat.sh` masquerade / snat / port forwarding / port shadowing, `nat_related` ICMP errors),
//! at the level of one stage: packets in, packets out, every checksum recomputed from scratch.

use dva_wire::tcp::flags::*;

use super::testpkt::*;
use super::*;

const N: usize = 4096;
const SEC: u64 = 1_000_000_000;

const CLIENT: &str = "198.18.1.2";
const POOL: &str = "198.19.0.1";
const SERVER: &str = "198.19.2.2";
const ROUTER: &str = "198.19.9.9";
const INSIDE_SERVER: &str = "198.18.1.10";
const OUTSIDE_CLIENT: &str = "198.19.5.5";

fn net(s: &str) -> IpNet {
    s.parse().expect("test network")
}

fn masquerade() -> SnatRule {
    SnatRule {
        name: Some("masquerade".into()),
        src: vec![net("198.18.1.0/24"), net("2001:db8:1::/64")],
        dst: vec![],
        proto: None,
        to: vec![ip(POOL), ip("2001:db8:ffff::1")],
        ports: DEFAULT_PORTS,
    }
}

fn forward_8080() -> DnatRule {
    DnatRule {
        name: Some("web".into()),
        ingress_if: Some(1),
        dst: ip(POOL),
        proto: ip_proto::TCP,
        dport: PortRange {
            first: 8080,
            last: 8081,
        },
        to_addr: ip(INSIDE_SERVER),
        to_port: Some(80),
    }
}

fn config(snat: Vec<SnatRule>, dnat: Vec<DnatRule>) -> NatConfig {
    NatConfig {
        snat,
        dnat,
        max_bindings: 10_000,
    }
}

fn masq_nat() -> Nat {
    Nat::new(config(vec![masquerade()], vec![]), N)
}

/// The bucket a dispatcher gives a packet that is not addressed to a NAT source.
fn flow_bucket(pkt: &[u8]) -> u16 {
    (check(pkt).symmetric_hash() as usize & (N - 1)) as u16
}

/// Process, expect a translation, verify all checksums, return the new tuple.
fn translate(nat: &mut Nat, now: u64, bucket: u16, ingress_if: u8, pkt: &mut [u8]) -> FlowKey {
    assert_eq!(
        nat.process(now, bucket, ingress_if, pkt),
        NatVerdict::Translated
    );
    check(pkt)
}

#[test]
fn masquerade_tcp_both_directions() {
    let mut nat = masq_nat();
    let mut syn = tcp4(CLIENT, 40000, SERVER, 80, SYN);
    let b = flow_bucket(&syn);
    let out = translate(&mut nat, 0, b, 0, &mut syn);
    assert_eq!((out.src, out.dst, out.dst_port), (ip(POOL), ip(SERVER), 80));
    assert_eq!(port_bucket(out.src_port, N), b);
    assert!(DEFAULT_PORTS.contains(out.src_port));

    // The reply is dispatched by its destination port: the same bucket.
    let mut synack = tcp4(SERVER, 80, POOL, out.src_port, SYN | ACK);
    let back = translate(&mut nat, SEC, port_bucket(out.src_port, N), 0, &mut synack);
    assert_eq!(back, key(6, SERVER, 80, CLIENT, 40000));

    let mut ack = tcp4(CLIENT, 40000, SERVER, 80, ACK | PSH);
    assert_eq!(translate(&mut nat, 2 * SEC, b, 0, &mut ack), out);
    assert_eq!(nat.len(), 1);
    assert_eq!(nat.stats().bindings_created, 1);
    assert_eq!(nat.stats().translated, 3);
    assert_eq!(nat.flows_per_bucket().collect::<Vec<_>>(), vec![(b, 1)]);
}

#[test]
fn masquerade_udp_keeps_a_zero_checksum_zero() {
    let mut nat = masq_nat();
    let mut q = udp4(CLIENT, 5353, SERVER, 53, b"query");
    let b = flow_bucket(&q);
    let out = translate(&mut nat, 0, b, 0, &mut q);
    assert_eq!(out.src, ip(POOL));
    assert_eq!(port_bucket(out.src_port, N), b);

    let mut r = udp4(SERVER, 53, POOL, out.src_port, b"answer");
    r[26] = 0;
    r[27] = 0;
    let back = translate(&mut nat, SEC, b, 0, &mut r);
    assert_eq!(back, key(17, SERVER, 53, CLIENT, 5353));
    assert_eq!(&r[26..28], &[0, 0], "no checksum stays no checksum");
}

#[test]
fn masquerade_icmp_echo_translates_the_id_in_the_bucket() {
    let mut nat = masq_nat();
    let mut req = echo4(CLIENT, SERVER, 0x1234, true);
    let b = flow_bucket(&req);
    let out = translate(&mut nat, 0, b, 0, &mut req);
    assert_eq!(out.src, ip(POOL));
    assert_eq!(out.src_port, out.dst_port);
    assert_eq!(port_bucket(out.src_port, N), b);

    let mut rep = echo4(SERVER, POOL, out.src_port, false);
    let back = translate(&mut nat, SEC, b, 0, &mut rep);
    assert_eq!(back, key(1, SERVER, 0x1234, CLIENT, 0x1234));

    // An echo *request* from outside with the allocated id is not a reply of the binding.
    let mut probe = echo4(SERVER, POOL, out.src_port, true);
    assert_eq!(
        nat.process(2 * SEC, b, 0, &mut probe),
        NatVerdict::Drop(NatDropReason::NoBinding)
    );
}

#[test]
fn port_forwarding_with_reply() {
    let mut nat = Nat::new(config(vec![masquerade()], vec![forward_8080()]), N);
    let mut syn = tcp4(OUTSIDE_CLIENT, 5555, POOL, 8081, SYN);
    let b = flow_bucket(&syn);
    let out = translate(&mut nat, 0, b, 1, &mut syn);
    // The range 8080-8081 maps onto 80-81; the source is untouched (no SNAT for outside clients).
    assert_eq!(out, key(6, OUTSIDE_CLIENT, 5555, INSIDE_SERVER, 81));

    // The dispatcher hashes the server's reply as the outside saw it: the same bucket.
    let mut synack = tcp4(INSIDE_SERVER, 81, OUTSIDE_CLIENT, 5555, SYN | ACK);
    let back = translate(&mut nat, SEC, b, 0, &mut synack);
    assert_eq!(back, key(6, POOL, 8081, OUTSIDE_CLIENT, 5555));

    // The rule is bound to interface 1; on another one the packet is to a pool address and
    // belongs to no binding.
    let mut other = tcp4(OUTSIDE_CLIENT, 6666, POOL, 8080, SYN);
    assert_eq!(
        nat.process(2 * SEC, b, 0, &mut other),
        NatVerdict::Drop(NatDropReason::NoBinding)
    );
}

fn full_nat() -> NatConfig {
    let dnat = DnatRule {
        name: Some("https".into()),
        ingress_if: None,
        dst: ip(POOL),
        proto: ip_proto::TCP,
        dport: PortRange::single(443),
        to_addr: ip(INSIDE_SERVER),
        to_port: None,
    };
    let snat = SnatRule {
        name: Some("to-inside".into()),
        src: vec![],
        dst: vec![net("198.18.1.10/32")],
        proto: Some(ip_proto::TCP),
        to: vec![ip("198.18.1.1")],
        ports: DEFAULT_PORTS,
    };
    config(vec![masquerade(), snat], vec![dnat])
}

#[test]
fn full_nat_rewrites_both_addresses_and_back() {
    let mut nat = Nat::new(full_nat(), N);
    let mut syn = tcp4(OUTSIDE_CLIENT, 5555, POOL, 443, SYN);
    let b = flow_bucket(&syn);
    let out = translate(&mut nat, 0, b, 0, &mut syn);
    assert_eq!(
        (out.src, out.dst, out.dst_port),
        (ip("198.18.1.1"), ip(INSIDE_SERVER), 443)
    );
    assert_eq!(port_bucket(out.src_port, N), b);

    let mut synack = tcp4(INSIDE_SERVER, 443, "198.18.1.1", out.src_port, SYN | ACK);
    let back = translate(&mut nat, SEC, port_bucket(out.src_port, N), 0, &mut synack);
    assert_eq!(back, key(6, POOL, 443, OUTSIDE_CLIENT, 5555));
}

#[test]
fn icmp_port_unreachable_for_a_masqueraded_flow() {
    let mut nat = masq_nat();
    let mut q = udp4(CLIENT, 5000, SERVER, 53, b"query");
    let b = flow_bucket(&q);
    let out = translate(&mut nat, 0, b, 0, &mut q);

    // The server answers the translated datagram with port unreachable, quoting it whole.
    let mut err = icmp_error(SERVER, POOL, 3, 3, &q);
    let outer = translate(&mut nat, SEC, port_bucket(out.src_port, N), 0, &mut err);
    assert_eq!((outer.src, outer.dst), (ip(SERVER), ip(CLIENT)));
    assert_eq!(quoted_key(&err), key(17, CLIENT, 5000, SERVER, 53));
    assert_eq!(nat.stats().related, 1);
}

#[test]
fn icmp_time_exceeded_from_a_router_full_and_short_quote() {
    let mut nat = masq_nat();
    let mut syn = tcp4(CLIENT, 40001, SERVER, 443, SYN);
    let b = flow_bucket(&syn);
    translate(&mut nat, 0, b, 0, &mut syn);
    // Whole quote: the quoted TCP checksum is verified too. RFC 792 quote: header + 8 bytes.
    for quote in [&syn[..], &syn[..28]] {
        let mut err = icmp_error(ROUTER, POOL, 11, 0, quote);
        let outer = translate(&mut nat, SEC, b, 0, &mut err);
        // The router's address is not the binding's: it stays.
        assert_eq!((outer.src, outer.dst), (ip(ROUTER), ip(CLIENT)));
        assert_eq!(quoted_key(&err), key(6, CLIENT, 40001, SERVER, 443));
    }
}

#[test]
fn icmp_error_about_an_echo() {
    let mut nat = masq_nat();
    let mut req = echo4(CLIENT, SERVER, 77, true);
    let b = flow_bucket(&req);
    translate(&mut nat, 0, b, 0, &mut req);
    let mut err = icmp_error(ROUTER, POOL, 11, 0, &req);
    let outer = translate(&mut nat, SEC, b, 0, &mut err);
    assert_eq!(outer.dst, ip(CLIENT));
    assert_eq!(quoted_key(&err), key(1, CLIENT, 77, SERVER, 77));
}

#[test]
fn icmp_errors_of_a_port_forwarded_flow_both_ways() {
    let mut nat = Nat::new(config(vec![masquerade()], vec![forward_8080()]), N);
    let mut syn = tcp4(OUTSIDE_CLIENT, 5555, POOL, 8080, SYN);
    let b = flow_bucket(&syn);
    translate(&mut nat, 0, b, 1, &mut syn);

    // The inside server's host refuses the forwarded segment: the error leaves from the public
    // address and quotes what the client sent.
    let mut err = icmp_error(INSIDE_SERVER, OUTSIDE_CLIENT, 3, 3, &syn);
    let outer = translate(&mut nat, SEC, b, 0, &mut err);
    assert_eq!((outer.src, outer.dst), (ip(POOL), ip(OUTSIDE_CLIENT)));
    assert_eq!(quoted_key(&err), key(6, OUTSIDE_CLIENT, 5555, POOL, 8080));

    // The other way: the server's (translated) reply dies on the way to the client; the router
    // there reports to the public address, and the error goes in to the server.
    let mut synack = tcp4(INSIDE_SERVER, 80, OUTSIDE_CLIENT, 5555, SYN | ACK);
    translate(&mut nat, SEC, b, 0, &mut synack);
    let mut err = icmp_error(ROUTER, POOL, 11, 0, &synack);
    let outer = translate(&mut nat, 2 * SEC, b, 1, &mut err);
    assert_eq!((outer.src, outer.dst), (ip(ROUTER), ip(INSIDE_SERVER)));
    assert_eq!(
        quoted_key(&err),
        key(6, INSIDE_SERVER, 80, OUTSIDE_CLIENT, 5555)
    );
}

#[test]
fn icmp_error_about_an_unknown_flow() {
    let mut nat = masq_nat();
    let q = udp4(POOL, 7777, SERVER, 53, b"q");
    let mut err = icmp_error(SERVER, POOL, 3, 3, &q);
    assert_eq!(
        nat.process(0, 0, 0, &mut err),
        NatVerdict::Drop(NatDropReason::NoBinding)
    );
    let q = udp4(SERVER, 7777, ROUTER, 53, b"q");
    let mut err = icmp_error(ROUTER, SERVER, 3, 3, &q);
    assert_eq!(nat.process(0, 0, 0, &mut err), NatVerdict::Untouched);
}

#[test]
fn nat66_tcp_and_icmpv6_error() {
    let mut nat = masq_nat();
    let (c, s, pool) = ("2001:db8:1::2", "2001:db8:2::2", "2001:db8:ffff::1");
    let mut syn = tcp6(c, 40000, s, 443, SYN);
    let b = flow_bucket(&syn);
    let out = translate(&mut nat, 0, b, 0, &mut syn);
    assert_eq!((out.src, out.dst), (ip(pool), ip(s)));
    assert_eq!(port_bucket(out.src_port, N), b);

    let mut synack = tcp6(s, 443, pool, out.src_port, SYN | ACK);
    assert_eq!(
        translate(&mut nat, SEC, b, 0, &mut synack),
        key(6, s, 443, c, 40000)
    );

    let mut err = icmp_error(s, pool, 1, 4, &syn);
    let outer = translate(&mut nat, 2 * SEC, b, 0, &mut err);
    assert_eq!((outer.src, outer.dst), (ip(s), ip(c)));
    assert_eq!(quoted_key(&err), key(6, c, 40000, s, 443));

    let mut ping = echo6(c, s, 9, true);
    let b = flow_bucket(&ping);
    let out = translate(&mut nat, 0, b, 0, &mut ping);
    let mut pong = echo6(s, pool, out.src_port, false);
    assert_eq!(translate(&mut nat, 0, b, 0, &mut pong), key(58, s, 9, c, 9));
}

#[test]
fn endpoint_dependent_reuse_and_counted_exhaustion() {
    // One bucket, one port: the port serves any number of distinct remote endpoints.
    let mut cfg = config(vec![masquerade()], vec![]);
    cfg.snat[0].ports = PortRange::single(5000);
    let mut nat = Nat::new(cfg, 1);
    let mut a = tcp4("198.18.1.2", 1000, SERVER, 80, SYN);
    assert_eq!(translate(&mut nat, 0, 0, 0, &mut a).src_port, 5000);
    let mut b = tcp4("198.18.1.3", 1000, "198.19.2.3", 80, SYN);
    assert_eq!(translate(&mut nat, 0, 0, 0, &mut b).src_port, 5000);
    let mut c = udp4("198.18.1.4", 1000, SERVER, 80, b"x");
    assert_eq!(translate(&mut nat, 0, 0, 0, &mut c).src_port, 5000);
    // ... but not twice towards the same one.
    let mut d = tcp4("198.18.1.4", 1000, SERVER, 80, SYN);
    assert_eq!(
        nat.process(0, 0, 0, &mut d),
        NatVerdict::Drop(NatDropReason::PortsExhausted)
    );
    assert_eq!(nat.drops()[0], (NatDropReason::PortsExhausted, 1));
    assert_eq!(nat.len(), 3);
}

#[test]
fn a_bucket_runs_out_after_exactly_its_ports() {
    let mut nat = masq_nat();
    let target = 1234u16;
    let available = alloc::BucketPorts::new(DEFAULT_PORTS, target, N).len();
    let (mut ok, mut exhausted) = (0, 0);
    let mut seen = std::collections::HashSet::new();
    let flows = (1..=250u8)
        .flat_map(|host| (1024..=u16::MAX).map(move |port| (host, port)))
        .map(|(host, port)| tcp4(&format!("198.18.1.{host}"), port, SERVER, 80, SYN))
        .filter(|syn| flow_bucket(syn) == target)
        .take(available as usize + 5);
    for mut syn in flows {
        match nat.process(0, target, 0, &mut syn) {
            NatVerdict::Translated => {
                let k = check(&syn);
                assert_eq!(port_bucket(k.src_port, N), target);
                assert!(seen.insert(k.src_port), "port {} twice", k.src_port);
                ok += 1;
            }
            NatVerdict::Drop(NatDropReason::PortsExhausted) => exhausted += 1,
            v => panic!("{v:?}"),
        }
    }
    assert_eq!(ok, available);
    assert_eq!(exhausted, 5);
    assert_eq!(nat.stats().drops[0], exhausted);
}

#[test]
fn allocated_ports_and_ids_satisfy_the_bucket_rule() {
    for n in [1usize, 64, 4096, 65536] {
        let mut nat = Nat::new(config(vec![masquerade()], vec![]), n);
        let mut rng = Rng(n as u64);
        for i in 0..2000 {
            let r = rng.next();
            let src = format!("198.18.1.{}", r as u8);
            let dst = format!("198.19.{}.{}", (r >> 8) as u8, (r >> 16) as u8);
            let mut pkt = match i % 3 {
                0 => tcp4(&src, (r >> 24) as u16, &dst, 443, SYN),
                1 => udp4(&src, (r >> 24) as u16, &dst, 53, b"q"),
                _ => echo4(&src, &dst, (r >> 24) as u16, true),
            };
            let b = (check(&pkt).symmetric_hash() as usize & (n - 1)) as u16;
            match nat.process(0, b, 0, &mut pkt) {
                NatVerdict::Translated => {
                    let k = check(&pkt);
                    assert_eq!(port_bucket(k.src_port, n), b, "n={n}");
                    assert!(DEFAULT_PORTS.contains(k.src_port));
                }
                // With 65536 buckets, buckets below 1024 have no port in 1024-65535.
                NatVerdict::Drop(NatDropReason::PortsExhausted)
                    if alloc::BucketPorts::new(DEFAULT_PORTS, b, n).len() == 0 => {}
                v => panic!("n={n} bucket {b}: {v:?}"),
            }
        }
    }
}

/// Valid packets of every kind the stage handles.
fn corpus() -> Vec<Vec<u8>> {
    let syn = tcp4(CLIENT, 40000, SERVER, 80, SYN);
    let q = udp4(CLIENT, 5000, SERVER, 53, b"query");
    let syn6 = tcp6("2001:db8:1::2", 40000, "2001:db8:2::2", 443, SYN);
    vec![
        icmp_error(SERVER, CLIENT, 3, 3, &q),
        icmp_error(ROUTER, CLIENT, 11, 0, &syn[..28]),
        icmp_error("2001:db8:2::2", "2001:db8:1::2", 1, 4, &syn6),
        echo4(CLIENT, SERVER, 5, true),
        echo6("2001:db8:1::2", "2001:db8:2::2", 5, true),
        udp6("2001:db8:1::2", 5000, "2001:db8:2::2", 53, b"q"),
        syn,
        q,
        syn6,
    ]
}

#[test]
fn truncations_are_malformed_and_nothing_panics() {
    let mut nat = Nat::new(full_nat(), N);
    // Bindings for the corpus flows, so lookups and error translation run on the mutants too.
    for mut p in corpus() {
        let b = flow_bucket(&p);
        nat.process(0, b, 0, &mut p);
    }
    for pkt in corpus() {
        for cut in 0..pkt.len() {
            let mut t = pkt[..cut].to_vec();
            assert_eq!(
                nat.process(SEC, 7, 0, &mut t),
                NatVerdict::Drop(NatDropReason::Malformed),
                "cut at {cut} of {pkt:02x?}"
            );
        }
        // Link padding after the packet is not part of it.
        let mut padded = pkt.clone();
        padded.extend_from_slice(&[0xee; 6]);
        assert_ne!(
            nat.process(SEC, 7, 0, &mut padded),
            NatVerdict::Drop(NatDropReason::Malformed)
        );
        assert_eq!(&padded[pkt.len()..], &[0xee; 6]);
    }
    // Random corruption: any verdict, no panic.
    let mut rng = Rng(42);
    for i in 0..20_000 {
        let c = corpus();
        let mut pkt = c[i % c.len()].clone();
        for _ in 0..1 + rng.next() % 4 {
            let at = (rng.next() as usize) % pkt.len();
            pkt[at] = rng.next() as u8;
        }
        let cut = pkt.len() - (rng.next() as usize % 4).min(pkt.len());
        nat.process(2 * SEC, (rng.next() & 0xfff) as u16, 0, &mut pkt[..cut]);
    }
    assert!(nat.stats().drops[NatDropReason::Malformed as usize] > 0);
}

#[test]
fn timeouts_follow_protocol_state() {
    let mut nat = masq_nat();
    // UDP: 30 s unreplied, 180 s once replied.
    let mut q = udp4(CLIENT, 5000, SERVER, 53, b"q");
    let k = check(&q);
    translate(&mut nat, 0, flow_bucket(&q), 0, &mut q);
    assert!(nat.binding_of(29 * SEC, &k).is_some());
    assert!(nat.binding_of(31 * SEC, &k).is_none());
    assert_eq!(
        nat.expire(31 * SEC, 100),
        0,
        "the lookup already removed it"
    );
    assert!(nat.is_empty());

    let mut q = udp4(CLIENT, 5001, SERVER, 53, b"q");
    let out = translate(&mut nat, 100 * SEC, flow_bucket(&q), 0, &mut q);
    let mut r = udp4(SERVER, 53, POOL, out.src_port, b"r");
    translate(&mut nat, 101 * SEC, 0, 0, &mut r);
    assert_eq!(nat.expire(200 * SEC, 100), 0);
    assert_eq!(nat.len(), 1);
    assert_eq!(nat.expire(282 * SEC, 100), 1);

    // TCP: 2 min until both ways, 2 h after, 10 s after FIN both ways.
    let t0 = 1000 * SEC;
    let mut syn = tcp4(CLIENT, 40000, SERVER, 80, SYN);
    let b = flow_bucket(&syn);
    translate(&mut nat, t0, b, 0, &mut syn);
    assert_eq!(nat.expire(t0 + 121 * SEC, 100), 1);
    let mut syn = tcp4(CLIENT, 40000, SERVER, 80, SYN);
    let out = translate(&mut nat, t0 + 200 * SEC, b, 0, &mut syn);
    let mut synack = tcp4(SERVER, 80, POOL, out.src_port, SYN | ACK);
    translate(&mut nat, t0 + 201 * SEC, b, 0, &mut synack);
    let t1 = t0 + 201 * SEC + 7000 * SEC;
    assert_eq!(nat.expire(t1, 100), 0);
    let mut fin = tcp4(CLIENT, 40000, SERVER, 80, FIN | ACK);
    translate(&mut nat, t1, b, 0, &mut fin);
    let mut fin2 = tcp4(SERVER, 80, POOL, out.src_port, FIN | ACK);
    translate(&mut nat, t1 + SEC, b, 0, &mut fin2);
    assert_eq!(nat.expire(t1 + 10 * SEC, 100), 0);
    assert_eq!(nat.expire(t1 + 12 * SEC, 100), 1);

    // ICMP: 30 s.
    let mut ping = echo4(CLIENT, SERVER, 1, true);
    translate(&mut nat, t1, flow_bucket(&ping), 0, &mut ping);
    assert_eq!(nat.expire(t1 + 29 * SEC, 100), 0);
    assert_eq!(nat.expire(t1 + 31 * SEC, 100), 1);
    assert!(nat.is_empty());
}

#[test]
fn a_syn_after_a_reset_opens_a_new_binding() {
    let mut nat = masq_nat();
    let mut syn = tcp4(CLIENT, 40000, SERVER, 80, SYN);
    let b = flow_bucket(&syn);
    let out = translate(&mut nat, 0, b, 0, &mut syn);
    let mut rst = tcp4(SERVER, 80, POOL, out.src_port, RST | ACK);
    translate(&mut nat, SEC, b, 0, &mut rst);
    let mut syn = tcp4(CLIENT, 40000, SERVER, 80, SYN);
    translate(&mut nat, 2 * SEC, b, 0, &mut syn);
    assert_eq!(nat.stats().bindings_created, 2);
    assert_eq!(nat.len(), 1);
}

#[test]
fn bindings_move_between_instances() {
    let mut a = masq_nat();
    let mut flows = Vec::new();
    for port in [40000u16, 40001, 40002, 40003] {
        let mut syn = tcp4(CLIENT, port, SERVER, 80, SYN);
        let b = flow_bucket(&syn);
        let out = translate(&mut a, 0, b, 0, &mut syn);
        flows.push((b, port, out));
    }
    let (b, port, out) = flows[0];
    let exported = a.export_bucket(SEC, b);
    assert_eq!(exported.len(), flows.iter().filter(|f| f.0 == b).count());
    let wire = serde_json::to_string(&exported).unwrap();
    let moved: Vec<Binding> = serde_json::from_str(&wire).unwrap();
    assert_eq!(moved, exported);

    let mut other = masq_nat();
    for m in moved {
        other.import(5 * SEC, m).unwrap();
    }
    assert_eq!(
        other.import(5 * SEC, exported[0].clone()),
        Err(BindingError::Exists {
            key: exported[0].orig
        })
    );
    let mut synack = tcp4(SERVER, 80, POOL, out.src_port, SYN | ACK);
    assert_eq!(
        translate(&mut other, 6 * SEC, b, 0, &mut synack),
        key(6, SERVER, 80, CLIENT, port)
    );
    assert_eq!(a.remove_bucket(b), exported.len());
    assert!(a.flows_per_bucket().all(|(x, _)| x != b));
    assert_eq!(
        other.flows_per_bucket().collect::<Vec<_>>(),
        vec![(b, exported.len() as u32)]
    );

    let bad = Binding {
        xlat: key(17, POOL, 1, SERVER, 80),
        ..exported[0].clone()
    };
    assert!(matches!(
        other.import(0, bad),
        Err(BindingError::Invalid { .. })
    ));
}

#[test]
fn table_full_is_a_counted_drop() {
    let mut cfg = config(vec![masquerade()], vec![]);
    cfg.max_bindings = 2;
    let mut nat = Nat::new(cfg, N);
    for (i, port) in [1000u16, 1001, 1002].into_iter().enumerate() {
        let mut q = udp4(CLIENT, port, SERVER, 53, b"q");
        let want = if i < 2 {
            NatVerdict::Translated
        } else {
            NatVerdict::Drop(NatDropReason::TableFull)
        };
        assert_eq!(nat.process(0, flow_bucket(&q), 0, &mut q), want);
    }
    assert_eq!(nat.stats().drops[NatDropReason::TableFull as usize], 1);
    // Once the old ones are idle long enough, there is room again.
    let mut q = udp4(CLIENT, 1002, SERVER, 53, b"q");
    assert_eq!(
        nat.process(40 * SEC, flow_bucket(&q), 0, &mut q),
        NatVerdict::Translated
    );
}

#[test]
fn unmatched_traffic_passes_and_orphans_need_their_binding() {
    let mut nat = masq_nat();
    // Not NAT's business: no state.
    let mut p = tcp4(SERVER, 1000, ROUTER, 80, SYN);
    let before = p.clone();
    assert_eq!(nat.process(0, 0, 0, &mut p), NatVerdict::Untouched);
    assert_eq!(p, before);
    let mut gre = packet(ip(CLIENT), ip(SERVER), 47, vec![0; 8]);
    assert_eq!(nat.process(0, 0, 0, &mut gre), NatVerdict::Untouched);
    assert!(nat.is_empty());
    // Mid-stream TCP a rule would translate, a stray reply to the pool: somebody else's flow.
    for mut p in [
        tcp4(CLIENT, 40000, SERVER, 80, ACK),
        udp4(SERVER, 53, POOL, 3333, b"r"),
        echo4(CLIENT, SERVER, 3, false),
    ] {
        assert_eq!(
            nat.process(0, 0, 0, &mut p),
            NatVerdict::Drop(NatDropReason::NoBinding)
        );
    }
    assert!(nat.is_empty());
    assert_eq!(nat.stats().drops[NatDropReason::NoBinding as usize], 3);
}

#[test]
fn fragments_nat_could_concern_are_dropped() {
    let mut nat = masq_nat();
    let mut frag = udp4(CLIENT, 5000, SERVER, 53, b"first fragment");
    frag[6] |= 0x20;
    assert_eq!(
        nat.process(0, 0, 0, &mut frag),
        NatVerdict::Drop(NatDropReason::UnsupportedFragment)
    );
    let mut frag = udp4(SERVER, 5000, ROUTER, 53, b"first fragment");
    frag[6] |= 0x20;
    assert_eq!(nat.process(0, 0, 0, &mut frag), NatVerdict::Untouched);
}

#[test]
fn new_rules_leave_bindings_alone() {
    let mut nat = masq_nat();
    let mut syn = tcp4(CLIENT, 40000, SERVER, 80, SYN);
    let b = flow_bucket(&syn);
    let out = translate(&mut nat, 0, b, 0, &mut syn);
    nat.set_config(NatConfig::default());
    let mut synack = tcp4(SERVER, 80, POOL, out.src_port, SYN | ACK);
    assert_eq!(
        translate(&mut nat, SEC, b, 0, &mut synack),
        key(6, SERVER, 80, CLIENT, 40000)
    );
    let mut other = tcp4(CLIENT, 40001, SERVER, 80, SYN);
    assert_eq!(nat.process(SEC, b, 0, &mut other), NatVerdict::Untouched);
}

#[test]
fn config_serde() {
    let cfg = full_nat();
    let json = serde_json::to_string(&cfg).unwrap();
    assert_eq!(serde_json::from_str::<NatConfig>(&json).unwrap(), cfg);
    let minimal: NatConfig = serde_json::from_str(
        r#"{"snat":[{"to":["198.19.0.1"]}],"dnat":[{"dst":"198.19.0.1","proto":6,
            "dport":{"first":80,"last":80},"to_addr":"198.18.1.10"}]}"#,
    )
    .unwrap();
    assert_eq!(minimal.snat[0].ports, DEFAULT_PORTS);
    assert_eq!(minimal.max_bindings, DEFAULT_MAX_BINDINGS);
    assert!(serde_json::from_str::<NatConfig>(r#"{"snat":[],"bogus":1}"#).is_err());
}

#[test]
fn port_bucket_is_the_low_bits() {
    assert_eq!(port_bucket(0x1234, 4096), 0x234);
    assert_eq!(port_bucket(0xffff, 65536), 0xffff);
    assert_eq!(port_bucket(0xffff, 1), 0);
    assert_eq!(port_bucket(0xffff, 0), 0);
    assert_eq!(normalize_buckets(0), 1);
    assert_eq!(normalize_buckets(3000), 4096);
    assert_eq!(normalize_buckets(1 << 20), 65536);
}

/// A TCP or UDP packet from an inside host with source port `sport` whose flow bucket is that
/// port's own bucket, so the allocator would keep `sport` if it may.
fn flow_in_port_bucket(tcp: bool, sport: u16) -> Vec<u8> {
    for host in 2..255u8 {
        for dport in 1..2000u16 {
            let client = format!("198.18.1.{host}");
            let pkt = if tcp {
                tcp4(&client, sport, SERVER, dport, SYN)
            } else {
                udp4(&client, sport, SERVER, dport, b"q")
            };
            if flow_bucket(&pkt) == port_bucket(sport, N) {
                return pkt;
            }
        }
    }
    panic!("no flow found in the bucket of port {sport}");
}

#[test]
fn masquerade_never_allocates_a_port_forwarded_port() {
    // Masquerade and a port forward on the same address (an edge gateway's usual setup): an
    // inside flow from source port 8080 keeps its port only if nothing forwards it, or the
    // reply to POOL:8080 would look like a new forwarded connection.
    let mut nat = Nat::new(config(vec![masquerade()], vec![forward_8080()]), N);
    for sport in [8080u16, 8081] {
        let mut syn = flow_in_port_bucket(true, sport);
        let b = flow_bucket(&syn);
        let out = translate(&mut nat, 0, b, 0, &mut syn);
        assert_ne!(out.src_port, sport, "{out:?}");
        assert_eq!(port_bucket(out.src_port, N), b);
    }
    // UDP is not forwarded: its port 8080 stays.
    let mut udp = flow_in_port_bucket(false, 8080);
    let b = flow_bucket(&udp);
    assert_eq!(translate(&mut nat, 0, b, 0, &mut udp).src_port, 8080);
    // Without the forward, the TCP port stays as well.
    let mut plain = masq_nat();
    let mut syn = flow_in_port_bucket(true, 8080);
    let b = flow_bucket(&syn);
    assert_eq!(translate(&mut plain, 0, b, 0, &mut syn).src_port, 8080);
}

#[test]
fn every_instance_picks_the_same_port_for_a_flow() {
    // As for the load balancer: a SYN retransmitted after its bucket moved is translated by
    // another data plane exactly as the first time.
    let (mut a, mut b) = (masq_nat(), masq_nat());
    let mut rng = Rng(3);
    for _ in 0..200 {
        let sport = 1024 + (rng.next() % 60_000) as u16;
        let mut p1 = tcp4(CLIENT, sport, SERVER, 443, SYN);
        let mut p2 = p1.clone();
        let bucket = flow_bucket(&p1);
        assert_eq!(
            translate(&mut a, 0, bucket, 0, &mut p1),
            translate(&mut b, SEC, bucket, 0, &mut p2)
        );
    }
}
