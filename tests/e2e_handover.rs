//! End to end: a scale-in with a short drain deadline exports the leaving data plane's flows to
//! the buckets' new owners; long-lived TCP connections and UDP streams lose nothing (issue: elasticity).

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use dva_lab::apps::{self, StreamServer, UdpEchoServer};
use dva_mgmt::{UnitRole, UnitState};

const SERVER1: [u8; 4] = [198, 18, 2, 2];

/// The edge firewall, plus UDP 5300 from outside (the echo server the UDP streams use).
fn spec_with_udp() -> String {
    let text = std::fs::read_to_string(example("edge-firewall.yaml")).expect("example");
    let udp_rule = "          - name: udp-echo-in\n            from: outside\n            dst: 198.18.2.0/24\n            proto: udp\n            dport: 5300\n            action: accept\n          - name: ping-in";
    let out = text.replacen("          - name: ping-in", udp_rule, 1);
    assert_ne!(out, text);
    out
}

#[test]
fn scale_in_past_the_drain_deadline_exports_state_and_loses_nothing() {
    let _serial = serial();
    let lab = LabGuard::up("e2eho-", 1, 2);
    let client = lab.lab.client_ns();
    let server = lab.lab.server_ns(1);
    let _tcp = StreamServer::start(&server, 80).expect("stream server");
    let _udp = UdpEchoServer::start(&server, 5300).expect("udp echo server");
    let m = MgmtGuard::open("e2eho-");
    m.mgmt.apply(&spec_with_udp()).expect("apply");
    let v = m.wait_ready("edge-fw", 2);
    let leaving = v
        .units
        .iter()
        .filter(|u| u.role == UnitRole::Dataplane)
        .max_by_key(|u| u.id)
        .map(|u| (u.id, u.pid.unwrap_or(0)))
        .expect("a data plane");

    let tcp = apps::start_streams(
        &client,
        SocketAddr::new(IpAddr::from(SERVER1), 80),
        30,
        Duration::from_secs(14),
        50_000,
    );
    let udp = apps::start_udp_streams(
        &client,
        SocketAddr::new(IpAddr::from(SERVER1), 5300),
        10,
        Duration::from_secs(14),
        200,
    );
    // Both data planes hold connections before the scale-in.
    m.wait(
        "edge-fw",
        "flows on both data planes",
        Duration::from_secs(10),
        |v| {
            v.units
                .iter()
                .filter(|u| u.role == UnitRole::Dataplane)
                .all(|u| u.flows >= 3)
        },
    );
    std::thread::sleep(Duration::from_secs(2));

    let t0 = Instant::now();
    m.scale("edge-fw", 1, Some("2s"));
    let v = m.wait(
        "edge-fw",
        "the leaving data plane gone",
        Duration::from_secs(15),
        |v| !v.units.iter().any(|u| u.id == leaving.0),
    );
    let took = t0.elapsed();
    eprintln!("scale-in 2 -> 1 with a 2 s drain deadline completed in {took:?}");
    assert!(!pid_alive(leaving.1), "data plane {} exited", leaving.0);
    assert_eq!(v.dataplanes.ready, 1);
    assert!(
        took <= Duration::from_secs(5),
        "scale-in took {took:?} (deadline 2 s + export)"
    );
    let events = m.mgmt.events("edge-fw").expect("events");
    if let Some(scaled) = events.iter().rev().find(|e| e.reason == "scaled") {
        for e in events.iter().filter(|e| e.time_ms >= scaled.time_ms) {
            eprintln!(
                "  +{:>5} ms  {:<14} {}",
                e.time_ms - scaled.time_ms,
                e.reason,
                e.message
            );
        }
    }
    assert!(
        events.iter().any(|e| e.reason == "unit-exporting"),
        "the leaving data plane held flows at its deadline and exported them: {events:#?}"
    );

    let tcp = tcp.join().expect("tcp streams");
    let broken: Vec<_> = tcp.iter().filter(|r| !r.intact()).collect();
    assert!(broken.is_empty(), "broken TCP connections: {broken:#?}");
    let udp = udp.join().expect("udp streams");
    let lost: u64 = udp.iter().map(|r| r.lost).sum();
    let reordered: u64 = udp.iter().map(|r| r.reordered).sum();
    let sent: u64 = udp.iter().map(|r| r.sent).sum();
    let worst = udp.iter().map(|r| r.rtt_max_us).max().unwrap_or(0);
    eprintln!(
        "UDP: {sent} sent, {lost} lost, {reordered} reordered, worst RTT {worst} us; TCP: 30 intact"
    );
    assert!(udp.iter().all(|r| r.error.is_none()), "{udp:#?}");
    assert_eq!(lost, 0, "UDP datagrams lost: {udp:#?}");
    assert_eq!(reordered, 0, "UDP datagrams reordered: {udp:#?}");
    let _ = UnitState::Ready;
}
