//! End to end with the lab's offloads on (TSO, GSO, GRO, TX checksumming: a Linux host's
//! defaults) and the AF_PACKET driver: kernel TCP senders hand the dispatcher 64 KB
//! super-packets with partial checksums, which cross the backplane and the service chain
//! (firewall → NAT) whole and leave for the kernel to segment (fast-path issue: large segments).
//! Every byte is checked at the far end, and a scale event splits super-packets into wire
//! frames where a punt takes the UDP path between data planes.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use dva_lab::apps::{self, Nginx, StreamServer};

const CLIENT: [u8; 4] = [198, 18, 1, 2];

fn counter(stats: &[dva_unit::UnitStats], role: &str, name: &str) -> u64 {
    stats
        .iter()
        .filter(|s| s.role == role)
        .map(|s| s.counters.get(name).copied().unwrap_or(0))
        .sum()
}

fn drops(stats: &[dva_unit::UnitStats], reason: &str) -> u64 {
    stats
        .iter()
        .map(|s| s.drops.get(reason).copied().unwrap_or(0))
        .sum()
}

#[test]
fn super_packets_cross_firewall_and_nat_whole_and_arrive_intact() {
    let _serial = serial();
    let _driver = EnvGuard::set("DVA_DRIVER", "af_packet");
    let lab = LabGuard::up("e2egso-", 2, 2);
    lab.lab.set_offloads(true).expect("offloads on");
    let client = lab.lab.client_ns();
    // 2 MB of text that is not a repeat of a short pattern: a segment in the wrong place or
    // a byte changed shows in the comparison.
    let body: String = (0..2_000_000u64)
        .map(|i| char::from(b'a' + (((i * 2_654_435_761) >> 7) % 26) as u8))
        .collect();
    let _web = Nginx::start(&lab.lab.server_ns(2), &[80], &body).expect("nginx in server2");
    let _streams_srv = StreamServer::start(&client, 9000).expect("stream server in the client");
    let m = MgmtGuard::open("e2egso-");
    let spec = std::fs::read_to_string(example("nat-gateway.yaml"))
        .expect("example")
        .replace("initial: 2", "initial: 1");
    m.mgmt.apply(&spec).expect("apply");
    m.wait_ready("nat-gw", 1);

    // Outside → port forward → server2: nginx answers with 64 KB TSO segments, which the
    // NAT un-translates (reply direction) with their checksums partial.
    for _ in 0..3 {
        let got = apps::curl(&client, "http://198.18.1.1:8080/", 10).expect("curl");
        assert!(
            got == body,
            "2 MB body changed on the way ({} bytes)",
            got.len()
        );
    }

    // Inside → outside, masqueraded: checked streams writing 64 KB at a time.
    let streams = apps::start_streams(
        &lab.lab.server_ns(1),
        SocketAddr::new(IpAddr::from(CLIENT), 9000),
        8,
        Duration::from_secs(10),
        4_000_000,
    );
    // A second data plane and back while they run: moved buckets' super-packets are punted
    // between data planes (UDP), where they travel as wire-sized segments.
    std::thread::sleep(Duration::from_secs(2));
    m.scale("nat-gw", 2, None);
    m.wait_ready("nat-gw", 2);
    std::thread::sleep(Duration::from_secs(2));
    m.scale("nat-gw", 1, Some("2s"));
    m.wait_ready("nat-gw", 1);
    let results = streams.join().expect("streams");
    let broken: Vec<_> = results.iter().filter(|r| !r.intact()).collect();
    let stats = m.unit_stats("nat-gw");
    assert!(
        broken.is_empty(),
        "{} of 8 streams broken: {broken:?}\nunits:\n{}",
        broken.len(),
        m.diagnostics("nat-gw")
    );
    let sent: u64 = results.iter().map(|r| r.sent).sum();
    eprintln!("8 checked streams: {sent} bytes through NAT with offloads on, all intact");

    let rx = counter(&stats, "dispatcher", "super_packets_rx");
    let tx = counter(&stats, "dispatcher", "super_packets_tx");
    eprintln!("dispatcher: {rx} super-packets in, {tx} handed to the kernel whole");
    assert!(
        rx > 100 && tx > 100,
        "TCP crossed as super-packets (rx {rx}, tx {tx})\nunits:\n{}",
        m.diagnostics("nat-gw")
    );
    for reason in [
        "exceeds-mtu",
        "malformed-l4",
        "oversize-frame",
        "gso-unsupported",
    ] {
        assert_eq!(
            drops(&stats, reason),
            0,
            "no {reason} drops\nunits:\n{}",
            m.diagnostics("nat-gw")
        );
    }
}
