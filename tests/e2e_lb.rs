//! End to end: the `web-lb` example (firewall → L4 load balancer, full NAT, HTTP health checks)
//! in front of three nginx servers: short-connection load spreads by weight with no error, also
//! while the data planes scale; a stopped backend leaves the rotation; a drained one keeps its
//! connections (issue: network services).

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use dva_lab::apps::{self, Nginx, StreamServer};

const VIP: &str = "198.18.1.100";

/// New flows per backend, summed over the data planes.
fn new_flows(m: &MgmtGuard, name: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for s in m.unit_stats(name) {
        for b in s.backends {
            *out.entry(format!("{}/{}", b.service, b.backend))
                .or_insert(0) += b.new_flows;
        }
    }
    out
}

fn delta(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .collect()
}

fn servers(lab: &LabGuard) -> Vec<Nginx> {
    (1..=3)
        .map(|k| {
            Nginx::start(
                &lab.lab.server_ns(k),
                &[80],
                &format!("hello from server{k}\n"),
            )
            .expect("nginx")
        })
        .collect()
}

#[test]
fn short_connections_spread_by_weight_without_errors_also_while_scaling() {
    let _serial = serial();
    let lab = LabGuard::up("e2elb-", 3, 2);
    let client = lab.lab.client_ns();
    let _web = servers(&lab);
    let m = MgmtGuard::open("e2elb-");
    m.apply_file(&example("web-lb.yaml"));
    m.wait_ready("web-lb", 2);

    // Every backend answers through the VIP.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..60 {
        if let Ok(body) = apps::curl(&client, &format!("http://{VIP}/"), 5) {
            seen.insert(body);
        }
        if seen.len() == 3 {
            break;
        }
    }
    assert_eq!(seen.len(), 3, "all three backends answer: {seen:?}");
    // The firewall lets only TCP 80 to the VIP in: not another port, not the servers directly.
    assert!(!apps::tcp_connect(&client, VIP.parse().unwrap(), 8080, 2).unwrap());
    assert!(!apps::tcp_connect(&client, IpAddr::from([198, 18, 2, 2]), 80, 2).unwrap());

    let before = new_flows(&m, "web-lb");
    let report =
        apps::wrk(&client, &format!("http://{VIP}/"), 2, 16, 8, true).expect("wrk through the VIP");
    // Units publish their counters every 100 ms: wait for the last of them.
    let mut spread = BTreeMap::new();
    apps::wait_until(Duration::from_secs(3), Duration::from_millis(100), || {
        spread = delta(&new_flows(&m, "web-lb"), &before);
        spread.values().sum::<u64>() >= report.requests
    });
    // One new flow per request (Connection: close), give or take the few whose client port
    // was reused while the old binding still lived (the kernel lets such a SYN reopen the
    // backend's TIME_WAIT connection, and the LB keeps translating it as the old flow).
    eprintln!(
        "wrk: {} requests, {:.0} req/s, {} errors; new flows per backend: {spread:?}",
        report.requests,
        report.requests_per_sec,
        report.errors()
    );
    assert_eq!(report.errors(), 0, "{report:?}");
    assert!(report.requests > 300, "{report:?}");
    let total: u64 = spread.values().sum();
    assert!(
        total * 100 >= report.requests * 99,
        "{spread:?} vs {report:?}"
    );
    for (backend, n) in &spread {
        // Equal weights: a third each, within ±10% of that share.
        let share = *n as f64 / total as f64;
        assert!(
            (share - 1.0 / 3.0).abs() <= 0.1 / 3.0,
            "{backend} got {share:.3} of {total} new flows: {spread:?}"
        );
    }

    // Scaling the data planes while wrk runs adds no error.
    let url = format!("http://{VIP}/");
    let ns = client.clone();
    let load = std::thread::spawn(move || apps::wrk(&ns, &url, 2, 16, 14, true));
    std::thread::sleep(Duration::from_secs(2));
    m.scale("web-lb", 3, None);
    m.wait_ready("web-lb", 3);
    std::thread::sleep(Duration::from_secs(2));
    m.scale("web-lb", 1, Some("2s"));
    m.wait_ready("web-lb", 1);
    let report = load.join().expect("wrk thread").expect("wrk");
    eprintln!(
        "wrk while scaling 2 -> 3 -> 1: {} requests, {} errors",
        report.requests,
        report.errors()
    );
    assert!(report.requests > 300, "{report:?}");
    assert_eq!(
        report.errors(),
        0,
        "{report:?}\nunits:\n{}",
        m.diagnostics("web-lb")
    );
}

#[test]
fn a_dead_backend_leaves_the_rotation_and_a_drained_one_keeps_its_connections() {
    let _serial = serial();
    let lab = LabGuard::up("e2elbh-", 3, 2);
    let client = lab.lab.client_ns();
    let mut web = servers(&lab);
    // Long-lived checked streams through a second virtual service on the same VIP.
    let _streams: Vec<StreamServer> = (1..=3)
        .map(|k| StreamServer::start(&lab.lab.server_ns(k), 9000).expect("stream server"))
        .collect();
    let spec = std::fs::read_to_string(example("web-lb.yaml")).expect("example");
    let with_streams = |drain_server2: bool| {
        let state = if drain_server2 { ", state: drain" } else { "" };
        spec.replace(
            "    - lb:\n        services:\n",
            &format!(
                "    - lb:\n        services:\n          - name: streams\n            vip: 198.18.1.100\n            proto: tcp\n            port: 9000\n            source: inside\n            backends:\n              - {{ name: server1, addr: 198.18.2.2, port: 9000 }}\n              - {{ name: server2, addr: 198.18.2.3, port: 9000{state} }}\n              - {{ name: server3, addr: 198.18.2.4, port: 9000 }}\n"
            ),
        )
        .replace(
            "            dport: 80\n            action: accept",
            "            dport: [80, 9000]\n            action: accept",
        )
    };
    let m = MgmtGuard::open("e2elbh-");
    m.mgmt.apply(&with_streams(false)).expect("apply");
    m.wait_ready("web-lb", 2);

    // Stop server3's nginx: the HTTP health check takes it out of rotation.
    let stopped = Instant::now();
    drop(web.pop());
    let out = apps::wait_until(Duration::from_secs(15), Duration::from_millis(100), || {
        let stats = m.unit_stats("web-lb");
        let dps: Vec<_> = stats.iter().filter(|s| s.role == "dataplane").collect();
        !dps.is_empty()
            && dps.iter().all(|s| {
                s.backends.iter().any(|b| {
                    b.service == "web"
                        && b.backend == "server3"
                        && b.state == dva_services::lb::BackendState::Down
                })
            })
    });
    assert!(out, "server3 marked down on every data plane");
    let v = m.wait(
        "web-lb",
        "server3 down in the view",
        Duration::from_secs(10),
        |v| {
            v.backends
                .iter()
                .any(|b| b.service == "web" && b.backend == "server3" && b.health == "down")
        },
    );
    assert!(
        v.backends
            .iter()
            .filter(|b| b.service == "web" && b.backend != "server3")
            .all(|b| b.health == "up"),
        "{:?}",
        v.backends
    );
    eprintln!(
        "server3 out of rotation {:.1} s after its nginx stopped",
        stopped.elapsed().as_secs_f64()
    );
    let before = new_flows(&m, "web-lb");
    let report = apps::wrk(&client, &format!("http://{VIP}/"), 2, 16, 5, true).expect("wrk");
    let spread = delta(&new_flows(&m, "web-lb"), &before);
    eprintln!("wrk with server3 down: {report:?}; new flows: {spread:?}");
    assert_eq!(report.errors(), 0, "{report:?}");
    assert_eq!(
        spread.get("web/server3").copied().unwrap_or(0),
        0,
        "{spread:?}"
    );

    // Drain server2 of the stream service while 30 streams run: none breaks, and it gets no
    // new flow afterwards.
    let streams = apps::start_streams(
        &client,
        SocketAddr::new(VIP.parse().unwrap(), 9000),
        30,
        Duration::from_secs(8),
        50_000,
    );
    std::thread::sleep(Duration::from_secs(2));
    m.mgmt.apply(&with_streams(true)).expect("apply the drain");
    m.wait(
        "web-lb",
        "server2 draining",
        Duration::from_secs(10),
        |_| {
            m.unit_stats("web-lb")
                .iter()
                .filter(|s| s.role == "dataplane")
                .all(|s| {
                    s.backends.iter().any(|b| {
                        b.service == "streams"
                            && b.backend == "server2"
                            && b.state == dva_services::lb::BackendState::Draining
                    })
                })
        },
    );
    let draining_flows: u64 = m
        .unit_stats("web-lb")
        .iter()
        .flat_map(|s| s.backends.iter())
        .filter(|b| b.service == "streams" && b.backend == "server2")
        .map(|b| b.active_flows)
        .sum();
    let before = new_flows(&m, "web-lb");
    let more = apps::start_streams(
        &client,
        SocketAddr::new(VIP.parse().unwrap(), 9000),
        12,
        Duration::from_secs(2),
        50_000,
    );
    let results = streams.join().expect("streams");
    let broken: Vec<_> = results.iter().filter(|r| !r.intact()).collect();
    assert!(
        broken.is_empty(),
        "{} of 30 streams broken by draining server2 ({draining_flows} of them on it): {broken:?}",
        broken.len()
    );
    assert!(
        draining_flows > 0,
        "some streams were on server2 when it was drained"
    );
    let more = more.join().expect("streams");
    assert!(more.iter().all(|r| r.intact()), "{more:?}");
    let spread = delta(&new_flows(&m, "web-lb"), &before);
    assert_eq!(
        spread.get("streams/server2").copied().unwrap_or(0),
        0,
        "a draining backend gets no new flow: {spread:?}"
    );
}

#[test]
fn an_ipv6_vip_balances_over_ipv6_backends() {
    let _serial = serial();
    let lab = LabGuard::up("e2elb6-", 2, 2);
    let client = lab.lab.client_ns();
    let _web: Vec<Nginx> = (1..=2)
        .map(|k| {
            Nginx::start(&lab.lab.server_ns(k), &[80], &format!("v6 server{k}\n")).expect("nginx")
        })
        .collect();
    // The example, made dual-stack: an IPv6 VIP, IPv6 backends, IPv6 health checks.
    let spec = std::fs::read_to_string(example("web-lb.yaml"))
        .expect("example")
        .replace("[198.18.1.1/24]", "[198.18.1.1/24, \"2001:db8:1::1/64\"]")
        .replace("[198.18.2.1/24]", "[198.18.2.1/24, \"2001:db8:2::1/64\"]")
        .replace("dst: 198.18.1.100/32", "dst: \"2001:db8:1::100/128\"")
        .replace("vip: 198.18.1.100", "vip: \"2001:db8:1::100\"")
        .replace(
            "              - { name: server1, addr: 198.18.2.2, port: 80, weight: 1 }\n              - { name: server2, addr: 198.18.2.3, port: 80, weight: 1 }\n              - { name: server3, addr: 198.18.2.4, port: 80, weight: 1 }",
            "              - { name: server1, addr: \"2001:db8:2::2\", port: 80 }\n              - { name: server2, addr: \"2001:db8:2::3\", port: 80 }",
        );
    assert!(
        spec.contains("2001:db8:2::3"),
        "the example changed: {spec}"
    );
    let m = MgmtGuard::open("e2elb6-");
    m.mgmt.apply(&spec).expect("apply");
    m.wait_ready("web-lb", 2);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        if let Ok(body) = apps::curl(&client, "http://[2001:db8:1::100]/", 5) {
            seen.insert(body);
        }
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(
        seen.len(),
        2,
        "both IPv6 backends answer through the IPv6 VIP: {seen:?}\nunits:\n{}",
        m.diagnostics("web-lb")
    );
    let v = m.wait(
        "web-lb",
        "IPv6 health checks",
        Duration::from_secs(10),
        |v| v.backends.len() == 2 && v.backends.iter().all(|b| b.health == "up"),
    );
    assert!(
        v.backends.iter().all(|b| b.service == "web"),
        "{:?}",
        v.backends
    );
}
