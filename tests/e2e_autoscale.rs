//! End to end: load above the layout's scale-out rule grows the data planes; load gone shrinks
//! them back to min; every decision is an event with its reason (issue: elasticity).

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use dva_lab::apps::{self, UdpEchoServer};

const SERVER1: [u8; 4] = [198, 18, 2, 2];

fn autoscaled_spec() -> String {
    let text = std::fs::read_to_string(example("edge-firewall.yaml")).expect("example");
    let out = text
        .replacen(
            "          - name: ping-in",
            "          - name: udp-echo-in\n            from: outside\n            dst: 198.18.2.0/24\n            proto: udp\n            dport: 5300\n            action: accept\n          - name: ping-in",
            1,
        )
        .replacen(
            "    dataplanes: { min: 1, initial: 2, max: 8 }\n    buckets: 4096",
            "    dataplanes: { min: 1, initial: 1, max: 3 }\n    buckets: 4096\n    drain_deadline: 2s\n    autoscale:\n      scale_out: [{ metric: pps, above: 1500, for: 2s }]\n      scale_in: [{ metric: pps, below: 400, for: 3s }]\n      cooldown: 4s",
            1,
        );
    assert!(
        out.contains("autoscale") && out.contains("udp-echo-in"),
        "{out}"
    );
    out
}

#[test]
fn load_scales_data_planes_out_and_its_absence_back_to_min() {
    let _serial = serial();
    let lab = LabGuard::up("e2eas-", 1, 2);
    let client = lab.lab.client_ns();
    let _udp = UdpEchoServer::start(&lab.lab.server_ns(1), 5300).expect("udp echo");
    let m = MgmtGuard::open("e2eas-");
    m.mgmt.apply(&autoscaled_spec()).expect("apply");
    m.wait_ready("edge-fw", 1);

    // ~6000 packets/s through the data planes (3000/s each way): 4 data planes' worth at 1500
    // per data plane, capped by max 3.
    let udp = apps::start_udp_streams(
        &client,
        SocketAddr::new(IpAddr::from(SERVER1), 5300),
        10,
        Duration::from_secs(14),
        300,
    );
    let v = m.wait(
        "edge-fw",
        "scaled out to 3 by policy",
        Duration::from_secs(12),
        |v| v.dataplanes.desired == 3,
    );
    eprintln!("scaled out: {:?}", v.dataplanes);
    m.wait_ready("edge-fw", 3);
    let udp = udp.join().expect("udp streams");
    let lost: u64 = udp.iter().map(|r| r.lost).sum();
    let sent: u64 = udp.iter().map(|r| r.sent).sum();
    eprintln!("UDP during scale-out: {sent} sent, {lost} lost");
    assert_eq!(lost, 0, "{udp:#?}");

    // Load gone: back to min, by policy.
    m.wait(
        "edge-fw",
        "scaled in to 1 by policy",
        Duration::from_secs(30),
        |v| v.dataplanes.desired == 1 && v.dataplanes.ready == 1 && v.dataplanes.draining == 0,
    );
    let events = m.mgmt.events("edge-fw").expect("events");
    let auto: Vec<_> = events.iter().filter(|e| e.reason == "autoscale").collect();
    for e in &auto {
        eprintln!("autoscale: {}", e.message);
    }
    assert!(
        auto.iter()
            .any(|e| e.message.contains("pps") && e.message.contains("1 -> 3")),
        "{events:#?}"
    );
    assert!(
        auto.iter().any(|e| e.message.contains("-> 1 data planes")),
        "{events:#?}"
    );
    // Never flapped: exactly one decision each way.
    assert_eq!(auto.len(), 2, "{auto:#?}");
}
