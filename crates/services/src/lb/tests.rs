use std::collections::HashMap;

use dva_wire::tcp::flags::*;

use super::*;
use crate::nat::testpkt::*;

const N: usize = 4096;
const SEC: u64 = 1_000_000_000;
const VIP: &str = "198.19.0.100";
const SOURCE: &str = "198.18.2.1";
const CLIENT: &str = "198.19.7.7";

fn backend(name: &str, last: u8, weight: u32) -> Backend {
    Backend {
        name: name.into(),
        addr: ip(&format!("198.18.2.{last}")),
        port: 8080,
        weight,
    }
}

fn web(backends: Vec<Backend>) -> VirtualService {
    VirtualService {
        name: "web".into(),
        vip: ip(VIP),
        proto: ip_proto::TCP,
        port: 80,
        backends,
        source: vec![ip(SOURCE)],
        ports: DEFAULT_PORTS,
    }
}

fn three() -> Vec<Backend> {
    vec![
        backend("a", 10, 1),
        backend("b", 11, 1),
        backend("c", 12, 2),
    ]
}

fn lb_with(services: Vec<VirtualService>) -> Lb {
    Lb::new(
        LbConfig {
            services,
            max_flows: 100_000,
        },
        N,
    )
}

/// A random client's first packet to the VIP.
fn client_key(rng: &mut Rng) -> FlowKey {
    let r = rng.next();
    FlowKey {
        proto: ip_proto::TCP,
        src: v4([198, 19, (r >> 8) as u8, (r >> 16) as u8]),
        dst: ip(VIP),
        src_port: (r >> 24) as u16 | 1024,
        dst_port: 80,
    }
}

fn flow_bucket(pkt: &[u8]) -> u16 {
    (check(pkt).symmetric_hash() as usize & (N - 1)) as u16
}

fn translate(lb: &mut Lb, now: u64, bucket: u16, pkt: &mut [u8]) -> FlowKey {
    assert_eq!(lb.process(now, bucket, pkt), LbVerdict::Translated);
    check(pkt)
}

fn stats_of(lb: &Lb, name: &str) -> BackendStats {
    lb.backend_stats()
        .into_iter()
        .find(|s| s.backend == name)
        .expect("backend stats")
}

#[test]
fn weighted_distribution_within_five_percent() {
    let lb = lb_with(vec![web(three())]);
    let mut rng = Rng(1);
    let mut count: HashMap<String, u32> = HashMap::new();
    let flows = 100_000;
    for _ in 0..flows {
        let k = client_key(&mut rng);
        *count
            .entry(lb.backend_for(&k).expect("backend").to_string())
            .or_default() += 1;
    }
    for (name, share) in [("a", 0.25), ("b", 0.25), ("c", 0.5)] {
        let got = f64::from(count[name]) / f64::from(flows);
        assert!(
            (got - share).abs() <= share * 0.05,
            "{name}: {got:.4} of flows, want {share} ± 5%: {count:?}"
        );
    }
}

#[test]
fn instances_with_one_config_agree_on_every_flow() {
    // Different processes: different hash seeds for their maps and ports, same backend choice.
    let mut x = lb_with(vec![web(three())]);
    let mut y = lb_with(vec![web(three())]);
    // Even with the backends listed in another order.
    let mut shuffled = three();
    shuffled.reverse();
    let z = lb_with(vec![web(shuffled)]);
    let mut rng = Rng(2);
    for _ in 0..20_000 {
        let k = client_key(&mut rng);
        assert_eq!(x.backend_for(&k), y.backend_for(&k));
        assert_eq!(x.backend_for(&k), z.backend_for(&k));
    }
    for i in 0..200u16 {
        let mut p = tcp4(CLIENT, 2000 + i, VIP, 80, SYN);
        let mut q = p.clone();
        let b = flow_bucket(&p);
        let (kx, ky) = (
            translate(&mut x, 0, b, &mut p),
            translate(&mut y, 0, b, &mut q),
        );
        assert_eq!((kx.dst, kx.dst_port), (ky.dst, ky.dst_port));
    }
}

#[test]
fn removing_a_backend_moves_little_else() {
    let backends: Vec<Backend> = (0..10)
        .map(|i| backend(&format!("b{i}"), 10 + i as u8, 1))
        .collect();
    let before = lb_with(vec![web(backends.clone())]);
    let mut after_cfg = backends.clone();
    after_cfg.remove(3);
    let after = lb_with(vec![web(after_cfg)]);
    let mut down = lb_with(vec![web(backends)]);
    down.set_backend_state("web", "b3", BackendState::Down)
        .unwrap();

    let mut rng = Rng(3);
    let (mut kept_total, mut moved, mut moved_down) = (0u32, 0u32, 0u32);
    for _ in 0..100_000 {
        let k = client_key(&mut rng);
        let old = before.backend_for(&k).unwrap();
        let new = after.backend_for(&k).unwrap();
        assert_ne!(new, "b3");
        assert_eq!(down.backend_for(&k).unwrap(), new, "down = removed");
        if old == "b3" {
            continue;
        }
        kept_total += 1;
        moved += u32::from(old != new);
        moved_down += u32::from(old != down.backend_for(&k).unwrap());
    }
    let frac = f64::from(moved) / f64::from(kept_total);
    assert!(frac < 0.02, "{:.2}% of other flows moved", frac * 100.0);
    assert_eq!(moved, moved_down);
}

#[test]
fn full_nat_rewrite_both_ways_with_counters() {
    let mut lb = lb_with(vec![web(three())]);
    let mut syn = tcp4(CLIENT, 33000, VIP, 80, SYN);
    let b = flow_bucket(&syn);
    let chosen = lb.backend_for(&check(&syn)).unwrap().to_string();
    let out = translate(&mut lb, 0, b, &mut syn);
    assert_eq!(out.src, ip(SOURCE));
    assert_eq!(port_bucket(out.src_port, N), b);
    assert!(three()
        .iter()
        .any(|be| be.name == chosen && be.addr == out.dst && be.port == out.dst_port));

    // The backend answers the full-NAT source; the dispatcher buckets that by port.
    let mut synack = tcp4(
        &out.dst.to_string(),
        out.dst_port,
        SOURCE,
        out.src_port,
        SYN | ACK,
    );
    let back = translate(&mut lb, SEC, port_bucket(out.src_port, N), &mut synack);
    assert_eq!(back, key(6, VIP, 80, CLIENT, 33000));
    let mut ack = tcp4(CLIENT, 33000, VIP, 80, ACK);
    assert_eq!(translate(&mut lb, 2 * SEC, b, &mut ack), out);

    let s = stats_of(&lb, &chosen);
    assert_eq!((s.new_flows, s.active_flows, s.packets), (1, 1, 3));
    assert_eq!(s.bytes as usize, syn.len() + synack.len() + ack.len());
    assert_eq!(lb.stats().flows_created, 1);
    assert_eq!(lb.flows_per_bucket().collect::<Vec<_>>(), vec![(b, 1)]);
}

#[test]
fn udp_service_and_icmp_error_from_the_backend() {
    let mut dns = web(vec![backend("ns1", 53, 1)]);
    dns.name = "dns".into();
    dns.proto = ip_proto::UDP;
    dns.port = 53;
    let mut lb = lb_with(vec![dns]);
    let mut q = udp4(CLIENT, 5353, VIP, 53, b"query");
    let b = flow_bucket(&q);
    let out = translate(&mut lb, 0, b, &mut q);
    assert_eq!((out.dst, out.dst_port), (ip("198.18.2.53"), 8080));

    let mut err = icmp_error("198.18.2.53", SOURCE, 3, 3, &q);
    let outer = translate(&mut lb, SEC, port_bucket(out.src_port, N), &mut err);
    assert_eq!((outer.src, outer.dst), (ip(VIP), ip(CLIENT)));
    assert_eq!(quoted_key(&err), key(17, CLIENT, 5353, VIP, 53));
    assert_eq!(lb.stats().related, 1);
}

#[test]
fn draining_and_down_backends_keep_their_flows_and_get_no_new_ones() {
    let mut lb = lb_with(vec![web(three())]);
    let mut rng = Rng(4);
    // A flow to "c" (the heaviest).
    let (k, mut syn) = loop {
        let k = client_key(&mut rng);
        if lb.backend_for(&k) == Some("c") {
            let p = tcp4(&k.src.to_string(), k.src_port, VIP, 80, SYN);
            break (k, p);
        }
    };
    let b = flow_bucket(&syn);
    let out = translate(&mut lb, 0, b, &mut syn);
    let rebuilds = lb.table_rebuilds();
    let picks_c =
        |lb: &Lb, rng: &mut Rng| (0..2000).any(|_| lb.backend_for(&client_key(rng)) == Some("c"));

    // (state, table rebuilds so far): only a change of eligibility rebuilds.
    for (state, rebuilt) in [
        (BackendState::Draining, 1),
        (BackendState::Draining, 1),
        (BackendState::Down, 1),
        (BackendState::Up, 2),
    ] {
        lb.set_backend_state("web", "c", state).unwrap();
        assert_eq!(lb.backend_state("web", "c"), Some(state));
        assert_eq!(lb.table_rebuilds(), rebuilds + rebuilt, "{state:?}");
        assert_eq!(
            picks_c(&lb, &mut rng),
            state == BackendState::Up,
            "{state:?}"
        );
        // The existing flow keeps going to "c" whatever its state.
        let mut data = tcp4(&k.src.to_string(), k.src_port, VIP, 80, ACK | PSH);
        assert_eq!(translate(&mut lb, SEC, b, &mut data), out, "{state:?}");
    }
    assert_eq!(stats_of(&lb, "c").active_flows, 1);

    assert_eq!(
        lb.set_backend_state("web", "zz", BackendState::Down),
        Err(LbError::UnknownBackend {
            service: "web".into(),
            backend: "zz".into()
        })
    );
    assert_eq!(
        lb.set_backend_state("nope", "a", BackendState::Down),
        Err(LbError::UnknownService("nope".into()))
    );
}

#[test]
fn no_flow_no_backend_and_untouched() {
    let mut lb = lb_with(vec![web(three())]);
    let mut ack = tcp4(CLIENT, 40000, VIP, 80, ACK);
    assert_eq!(
        lb.process(0, 0, &mut ack),
        LbVerdict::Drop(LbDropReason::NoFlow)
    );
    let mut stray = tcp4("198.18.2.10", 8080, SOURCE, 4444, SYN | ACK);
    assert_eq!(
        lb.process(0, 0, &mut stray),
        LbVerdict::Drop(LbDropReason::NoFlow)
    );
    let mut other = tcp4(CLIENT, 40000, "198.19.0.200", 80, SYN);
    assert_eq!(lb.process(0, 0, &mut other), LbVerdict::Untouched);
    let mut wrong_port = tcp4(CLIENT, 40000, VIP, 81, SYN);
    assert_eq!(lb.process(0, 0, &mut wrong_port), LbVerdict::Untouched);
    for name in ["a", "b", "c"] {
        lb.set_backend_state("web", name, BackendState::Down)
            .unwrap();
    }
    let mut syn = tcp4(CLIENT, 40000, VIP, 80, SYN);
    assert_eq!(
        lb.process(0, 0, &mut syn),
        LbVerdict::Drop(LbDropReason::NoBackend)
    );
    assert!(lb.is_empty());
    let drops: HashMap<_, _> = lb.drops().into_iter().collect();
    assert_eq!(drops[&LbDropReason::NoFlow], 2);
    assert_eq!(drops[&LbDropReason::NoBackend], 1);
}

#[test]
fn source_ports_satisfy_the_bucket_rule() {
    for n in [1usize, 64, 4096] {
        let mut lb = Lb::new(
            LbConfig {
                services: vec![web(three())],
                max_flows: 100_000,
            },
            n,
        );
        let mut rng = Rng(n as u64);
        for _ in 0..3000 {
            let k = client_key(&mut rng);
            let mut syn = tcp4(&k.src.to_string(), k.src_port, VIP, 80, SYN);
            let b = (k.symmetric_hash() as usize & (n - 1)) as u16;
            let out = translate(&mut lb, 0, b, &mut syn);
            assert_eq!(port_bucket(out.src_port, n), b);
        }
    }
}

#[test]
fn port_exhaustion_in_a_bucket() {
    let mut svc = web(vec![backend("only", 10, 1)]);
    svc.ports = PortRange {
        first: 2000,
        last: 2000 + 3 * 64,
    };
    let mut lb = Lb::new(
        LbConfig {
            services: vec![svc],
            max_flows: 1000,
        },
        64,
    );
    // Ports of bucket 16 in 2000..=2192: 2000, 2064, 2128, 2192 (all to one backend endpoint).
    let mut verdicts = Vec::new();
    for port in 40000..40010u16 {
        let mut syn = tcp4(CLIENT, port, VIP, 80, SYN);
        verdicts.push(lb.process(0, 16, &mut syn));
    }
    let ok = verdicts
        .iter()
        .filter(|v| **v == LbVerdict::Translated)
        .count();
    assert_eq!(ok, 4);
    assert_eq!(lb.stats().drops[LbDropReason::PortsExhausted as usize], 6);
}

#[test]
fn malformed_input_never_panics() {
    let mut lb = lb_with(vec![web(three())]);
    let syn = tcp4(CLIENT, 40000, VIP, 80, SYN);
    let b = flow_bucket(&syn);
    let out = translate(&mut lb, 0, b, &mut syn.clone());
    let reply = tcp4(&out.dst.to_string(), 8080, SOURCE, out.src_port, SYN | ACK);
    let err = icmp_error(&out.dst.to_string(), SOURCE, 3, 3, &syn[..28]);
    let corpus = [syn, reply, err, udp4(CLIENT, 1, VIP, 80, b"x")];
    for pkt in &corpus {
        for cut in 0..pkt.len() {
            let mut t = pkt[..cut].to_vec();
            assert_eq!(
                lb.process(SEC, b, &mut t),
                LbVerdict::Drop(LbDropReason::Malformed)
            );
        }
    }
    let mut rng = Rng(5);
    for i in 0..20_000 {
        let mut pkt = corpus[i % corpus.len()].clone();
        for _ in 0..1 + rng.next() % 4 {
            let at = rng.next() as usize % pkt.len();
            pkt[at] = rng.next() as u8;
        }
        lb.process(2 * SEC, (rng.next() & 0xfff) as u16, &mut pkt);
    }
}

#[test]
fn flows_move_between_instances_with_their_backend() {
    let mut a = lb_with(vec![web(three())]);
    let mut syn = tcp4(CLIENT, 33000, VIP, 80, SYN);
    let b = flow_bucket(&syn);
    let out = translate(&mut a, 0, b, &mut syn);
    let chosen = a
        .backend_for(&key(6, CLIENT, 33000, VIP, 80))
        .unwrap()
        .to_string();
    let exported = a.export_bucket(SEC, b);
    assert_eq!(exported.len(), 1);

    let mut other = lb_with(vec![web(three())]);
    for f in exported {
        other.import(2 * SEC, f).unwrap();
    }
    assert_eq!(stats_of(&other, &chosen).active_flows, 1);
    let mut synack = tcp4(
        &out.dst.to_string(),
        out.dst_port,
        SOURCE,
        out.src_port,
        SYN | ACK,
    );
    assert_eq!(
        translate(&mut other, 3 * SEC, b, &mut synack),
        key(6, VIP, 80, CLIENT, 33000)
    );
    assert_eq!(a.remove_bucket(b), 1);
    assert_eq!(stats_of(&a, &chosen).active_flows, 0);
}

#[test]
fn expiry_updates_active_flows() {
    let mut lb = lb_with(vec![web(vec![backend("only", 10, 1)])]);
    for port in 1000..1010u16 {
        let mut syn = tcp4(CLIENT, port, VIP, 80, SYN);
        let b = flow_bucket(&syn);
        translate(&mut lb, 0, b, &mut syn);
    }
    assert_eq!(stats_of(&lb, "only").active_flows, 10);
    assert_eq!(lb.expire(60 * SEC, 100), 0);
    assert_eq!(lb.expire(121 * SEC, 4), 4);
    assert_eq!(stats_of(&lb, "only").active_flows, 6);
    assert_eq!(lb.expire(121 * SEC, 100), 6);
    assert_eq!(stats_of(&lb, "only").active_flows, 0);
    assert_eq!(stats_of(&lb, "only").new_flows, 10);
}

#[test]
fn config_changes_keep_flows_and_rebuild_only_when_needed() {
    let mut lb = lb_with(vec![web(three())]);
    let mut syn = tcp4(CLIENT, 33000, VIP, 80, SYN);
    let b = flow_bucket(&syn);
    let out = translate(&mut lb, 0, b, &mut syn);
    lb.set_backend_state("web", "a", BackendState::Draining)
        .unwrap();
    let r = lb.table_rebuilds();
    let cfg = lb.config().clone();
    lb.set_config(cfg.clone());
    assert_eq!(lb.table_rebuilds(), r, "same config, same table");
    assert_eq!(
        lb.backend_state("web", "a"),
        Some(BackendState::Draining),
        "state survives a config push"
    );

    // ("a" is draining: its weight does not matter to the table.)
    let mut heavier = cfg.clone();
    heavier.services[0].backends[0].weight = 9;
    lb.set_config(heavier.clone());
    assert_eq!(lb.table_rebuilds(), r);
    heavier.services[0].backends[1].weight = 5;
    lb.set_config(heavier);
    assert_eq!(lb.table_rebuilds(), r + 1);

    // All backends removed: the flow still forwards to where it went, counted as removed.
    let mut empty = cfg;
    empty.services[0].backends.clear();
    lb.set_config(empty);
    let mut ack = tcp4(CLIENT, 33000, VIP, 80, ACK);
    assert_eq!(translate(&mut lb, SEC, b, &mut ack), out);
    let st = lb.backend_stats();
    assert_eq!(st.len(), 1);
    assert!(!st[0].configured);
    assert_eq!(st[0].active_flows, 1);
    let mut syn = tcp4(CLIENT, 33001, VIP, 80, SYN);
    assert_eq!(
        lb.process(SEC, 0, &mut syn),
        LbVerdict::Drop(LbDropReason::NoBackend)
    );
}

#[test]
fn ipv6_service() {
    let svc = VirtualService {
        name: "web6".into(),
        vip: ip("2001:db8:0:100::1"),
        proto: ip_proto::TCP,
        port: 443,
        backends: vec![
            Backend {
                name: "x".into(),
                addr: ip("2001:db8:2::10"),
                port: 8443,
                weight: 1,
            },
            // Another family: ignored.
            backend("v4", 10, 1),
        ],
        source: vec![ip(SOURCE), ip("2001:db8:2::1")],
        ports: DEFAULT_PORTS,
    };
    let mut lb = lb_with(vec![svc]);
    let mut syn = tcp6("2001:db8:7::7", 50000, "2001:db8:0:100::1", 443, SYN);
    let b = flow_bucket(&syn);
    let out = translate(&mut lb, 0, b, &mut syn);
    assert_eq!(
        out,
        FlowKey {
            src_port: out.src_port,
            ..key(6, "2001:db8:2::1", 0, "2001:db8:2::10", 8443)
        }
    );
    assert_eq!(port_bucket(out.src_port, N), b);
    let mut synack = tcp6(
        "2001:db8:2::10",
        8443,
        "2001:db8:2::1",
        out.src_port,
        SYN | ACK,
    );
    assert_eq!(
        translate(&mut lb, SEC, b, &mut synack),
        key(6, "2001:db8:0:100::1", 443, "2001:db8:7::7", 50000)
    );
    assert_eq!(lb.backend_stats().len(), 1);
}

#[test]
fn config_serde() {
    let cfg = LbConfig {
        services: vec![web(three())],
        max_flows: 10,
    };
    let json = serde_json::to_string(&cfg).unwrap();
    assert_eq!(serde_json::from_str::<LbConfig>(&json).unwrap(), cfg);
    let minimal: LbConfig = serde_json::from_str(
        r#"{"services":[{"name":"w","vip":"198.19.0.100","proto":6,"port":80,"source":["198.18.2.1"],
            "backends":[{"name":"a","addr":"198.18.2.10","port":80}]}]}"#,
    )
    .unwrap();
    assert_eq!(minimal.services[0].backends[0].weight, 1);
    assert_eq!(minimal.services[0].ports, DEFAULT_PORTS);
    assert_eq!(minimal.max_flows, DEFAULT_MAX_FLOWS);
    assert!(serde_json::from_str::<LbConfig>(r#"{"services":[],"x":1}"#).is_err());
}

#[test]
fn a_syn_translated_on_two_data_planes_gets_one_source_port() {
    // A bucket moved between a SYN and its retransmission: the new owner creates the flow
    // afresh, and must pick the translation the old owner picked, or the backend sees a second
    // connection and resets the client on its next ACK.
    let mut old = lb_with(vec![web(three())]);
    let mut new = lb_with(vec![web(three())]);
    let mut rng = Rng(9);
    for _ in 0..200 {
        let k = client_key(&mut rng);
        let syn = tcp4(
            &k.src.to_string(),
            k.src_port,
            &k.dst.to_string(),
            k.dst_port,
            SYN,
        );
        let b = flow_bucket(&syn);
        let (mut p1, mut p2) = (syn.clone(), syn);
        assert_eq!(translate(&mut old, SEC, b, &mut p1), {
            translate(&mut new, 2 * SEC, b, &mut p2)
        });
    }
}
