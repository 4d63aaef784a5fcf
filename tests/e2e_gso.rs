//! End to end with the lab's offloads on (TSO, GSO, GRO, TX checksumming: a Linux host's
//! defaults) and the AF_PACKET driver (asked for, or chosen by `auto`): kernel TCP senders hand the dispatcher 64 KB
//! super-packets with partial checksums, which cross the backplane and the service chain
//! (firewall → NAT) whole and leave for the kernel to segment (fast-path issue: large segments).
//! Every byte is checked at the far end, and a scale event splits super-packets into wire
//! frames where a punt takes the UDP path between data planes.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use dva_lab::apps::{self, Nginx, StreamServer};
use dva_proto::spec::{DriverSpec, RuntimeSpec};

const CLIENT: [u8; 4] = [198, 18, 1, 2];
const CLIENT6: [u16; 8] = [0x2001, 0xdb8, 1, 0, 0, 0, 0, 2];
const VIP: [u8; 4] = [198, 18, 1, 100];

/// `spec` with its dispatchers on `driver`.
fn with_driver(spec: &str, driver: DriverSpec) -> String {
    with_runtime(
        spec,
        RuntimeSpec {
            driver,
            ..Default::default()
        },
    )
}

/// 2 MB of text that is not a repeat of a short pattern: a segment in the wrong place or a
/// byte changed shows in the comparison.
fn big_body() -> String {
    (0..2_000_000u64)
        .map(|i| char::from(b'a' + (((i * 2_654_435_761) >> 7) % 26) as u8))
        .collect()
}

fn counter(stats: &[dva_unit::UnitStats], role: &str, name: &str) -> u64 {
    stats
        .iter()
        .filter(|s| s.role == role)
        .map(|s| s.counters.get(name).copied().unwrap_or(0))
        .sum()
}

/// Units publish their counters every 100 ms: read until `name` of `role` exceeds `min`, for at
/// most 3 s, and return the last reading.
fn settled(m: &MgmtGuard, app: &str, role: &str, name: &str, min: u64) -> Vec<dva_unit::UnitStats> {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let stats = m.unit_stats(app);
        if counter(&stats, role, name) > min || std::time::Instant::now() > deadline {
            return stats;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
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
    let lab = LabGuard::up("e2egso-", 2, 2);
    lab.lab.set_offloads(true).expect("offloads on");
    let client = lab.lab.client_ns();
    let body = big_body();
    let _web = Nginx::start(&lab.lab.server_ns(2), &[80], &body).expect("nginx in server2");
    let _streams_srv = StreamServer::start(&client, 9000).expect("stream server in the client");
    let _iperf = apps::Iperf3Server::start(&client, 5201).expect("iperf3 in the client");
    let m = MgmtGuard::open("e2egso-");
    let spec = with_driver(
        &std::fs::read_to_string(example("nat-gateway.yaml"))
            .expect("example")
            .replace("initial: 2", "initial: 1"),
        DriverSpec::AfPacket,
    );
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

    // IPv6: server1 reaches the client masqueraded to 2001:db8:1::1 (NAT66), TCP over IPv6
    // super-packets. A checksum the NAT or the egress got wrong would make the client drop
    // every segment: megabytes arriving in 3 s (against ~1 GB at this lab's speed) say they
    // were right.
    let before = counter(&m.unit_stats("nat-gw"), "dispatcher", "super_packets_tx");
    let r = apps::iperf3_client(
        &lab.lab.server_ns(1),
        IpAddr::from(CLIENT6),
        5201,
        3,
        1,
        false,
        None,
    )
    .expect("iperf3 over IPv6 through NAT66");
    let after = counter(
        &settled(&m, "nat-gw", "dispatcher", "super_packets_tx", before + 100),
        "dispatcher",
        "super_packets_tx",
    );
    eprintln!(
        "IPv6 through NAT66: {} MB received, {} super-packets",
        r.received_bytes / 1_000_000,
        after - before
    );
    assert!(r.received_bytes > 50_000_000, "{r:?}");
    assert!(after - before > 100, "IPv6 TCP crossed as super-packets");

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
    let stats = settled(&m, "nat-gw", "dispatcher", "super_packets_tx", after + 100);
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

#[test]
fn the_load_balancer_rewrites_super_packets_both_ways() {
    // Full NAT on both legs of every connection: client -> VIP becomes appliance -> backend,
    // and the backends' 64 KB replies are rewritten back with their checksums partial.
    let _serial = serial();
    let lab = LabGuard::up("e2egsolb-", 3, 1);
    lab.lab.set_offloads(true).expect("offloads on");
    let body = big_body();
    let _web: Vec<Nginx> = (1..=3)
        .map(|k| Nginx::start(&lab.lab.server_ns(k), &[80], &body).expect("nginx"))
        .collect();
    let m = MgmtGuard::open("e2egsolb-");
    // The default driver: `auto` sees veths with segmentation offload on and takes AF_PACKET
    // with virtio-net headers on each of them by itself.
    let spec = std::fs::read_to_string(example("web-lb.yaml"))
        .expect("example")
        .replace("initial: 2", "initial: 1");
    m.mgmt.apply(&spec).expect("apply");
    m.wait_ready("web-lb", 1);
    let drivers: Vec<String> = m
        .unit_stats("web-lb")
        .iter()
        .filter(|s| s.role == "dispatcher")
        .flat_map(|s| s.interfaces.iter().map(|i| i.driver.clone()))
        .collect();
    assert!(
        !drivers.is_empty() && drivers.iter().all(|d| d == "af_packet"),
        "auto on veths with offloads on: {drivers:?}"
    );
    let url = format!("http://{}/", IpAddr::from(VIP));
    for _ in 0..6 {
        let got = apps::curl(&lab.lab.client_ns(), &url, 10).expect("curl the VIP");
        assert!(
            got == body,
            "2 MB body changed on the way ({} bytes)",
            got.len()
        );
    }
    let stats = settled(&m, "web-lb", "dispatcher", "super_packets_tx", 20);
    let (rx, tx) = (
        counter(&stats, "dispatcher", "super_packets_rx"),
        counter(&stats, "dispatcher", "super_packets_tx"),
    );
    eprintln!("dispatcher: {rx} super-packets in, {tx} out whole");
    assert!(
        rx > 20 && tx > 20,
        "replies crossed as super-packets\nunits:\n{}",
        m.diagnostics("web-lb")
    );
}

#[test]
fn af_xdp_completes_the_checksums_veth_peers_leave_partial() {
    // A Linux host's defaults on the veths (TX checksumming on) with the default driver:
    // XDP turns the peers' segmentation off but not their checksum offload, so frames arrive
    // with partial checksums AF_XDP cannot mark. The dispatcher verifies and completes them;
    // without that, every TCP segment would reach the far end with a bad checksum.
    let _serial = serial();
    let lab = LabGuard::up("e2egsox-", 2, 1);
    lab.lab.set_offloads(true).expect("offloads on");
    let client = lab.lab.client_ns();
    let body = big_body();
    let _web = Nginx::start(&lab.lab.server_ns(2), &[80], &body).expect("nginx in server2");
    let m = MgmtGuard::open("e2egsox-");
    let spec = with_driver(
        &std::fs::read_to_string(example("nat-gateway.yaml"))
            .expect("example")
            .replace("initial: 2", "initial: 1"),
        DriverSpec::AfXdp,
    );
    m.mgmt.apply(&spec).expect("apply");
    m.wait_ready("nat-gw", 1);
    for _ in 0..2 {
        let got = apps::curl(&client, "http://198.18.1.1:8080/", 10).expect("curl");
        assert!(
            got == body,
            "2 MB body changed on the way ({} bytes)",
            got.len()
        );
    }
    let stats = settled(&m, "nat-gw", "dispatcher", "partial_checksums_found", 0);
    let found = counter(&stats, "dispatcher", "partial_checksums_found");
    eprintln!("dispatcher: {found} partial checksums found and completed");
    assert!(
        found > 0,
        "the veth peers' partial checksums were seen\nunits:\n{}",
        m.diagnostics("nat-gw")
    );
    assert_eq!(counter(&stats, "dispatcher", "super_packets_rx"), 0);
}
