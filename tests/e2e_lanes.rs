//! End to end with a dispatcher on two data-path threads (`runtime.dispatcher_threads: 2`):
//! each lane takes its share of every interface's frames (AF_PACKET fanout by a symmetric
//! flow hash on the lab's veths, whose offloads are on), has a backplane port and rings of its
//! own, and gets its flows' packets back from the data planes. Checked: bytes arrive intact
//! through the firewall and NAT (both lanes carrying traffic, over rings and over sealed UDP),
//! the load balancer's health checks (probes from lane 0, answers hashed to either lane) keep
//! every backend up and notice one going down, and a scale event under traffic breaks nothing.
//!
//! And with data planes on two threads (`runtime.dataplane_threads: 2`): each lane serves
//! half the flow buckets; checked streams through NAT stay intact while a second data plane
//! takes buckets over and hands them back (handover and replication lane to lane), over rings
//! and over sealed UDP, and `dva flows` lists both lanes' flows.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use dva_lab::apps::{self, Nginx, StreamServer};
use dva_proto::spec::{BackplaneSpec, RuntimeSpec};

const CLIENT: [u8; 4] = [198, 18, 1, 2];
const VIP: [u8; 4] = [198, 18, 1, 100];

fn lanes(spec: &str, backplane: BackplaneSpec) -> String {
    with_runtime(
        spec,
        RuntimeSpec {
            dispatcher_threads: Some(2),
            backplane,
            ..Default::default()
        },
    )
}

/// Both lanes received a fair share: at least a tenth of the frames each.
fn assert_both_lanes_carry(m: &MgmtGuard, app: &str) {
    // Stats are merged every 100 ms.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        counter(m, app, "dispatcher", "lanes"),
        2,
        "two lanes reported"
    );
    let l0 = counter(m, app, "dispatcher", "lane0_rx_frames");
    let l1 = counter(m, app, "dispatcher", "lane1_rx_frames");
    eprintln!("lane 0 received {l0} frames, lane 1 {l1}");
    let total = l0 + l1;
    assert!(
        total > 1000 && l0 * 10 > total && l1 * 10 > total,
        "both lanes take a share (lane 0: {l0}, lane 1: {l1})\nunits:\n{}",
        m.diagnostics(app)
    );
}

/// `dva monitor` on a two-lane dispatcher reports the drops of both lanes: 64 flows of UDP from
/// `server` to the appliance's inside address (which serves no UDP and is no NAT source: the
/// dispatcher drops them, `to-appliance-unsupported`), hashed over the lanes, each datagram a
/// drop event.
fn monitor_sees_every_lane(m: &MgmtGuard, server: &str) {
    let monitor = m
        .mgmt
        .monitor("nat-gw", "type=drop&rate=10000&duration=4s")
        .expect("monitor");
    let events = std::thread::spawn(move || {
        let mut out = Vec::new();
        monitor.copy_to(&mut out, || false).map(|_| out)
    });
    std::thread::sleep(Duration::from_millis(500));
    let sent = apps::udpgen(
        server,
        &apps::UdpGenOptions {
            dst: SocketAddr::new(IpAddr::from([198, 18, 2, 1]), 4000),
            flows: 64,
            payload: 18,
            duration: Duration::from_secs(1),
            rate: Some(500),
        },
    )
    .expect("udpgen")
    .sent;
    let out = events
        .join()
        .expect("monitor thread")
        .expect("monitor stream");
    let drops = String::from_utf8_lossy(&out)
        .lines()
        .filter(|l| l.contains("to-appliance"))
        .count() as u64;
    eprintln!("monitor: {drops} drop events for {sent} datagrams to the appliance");
    assert!(
        sent > 300 && drops * 10 >= sent * 9,
        "the monitor saw the drops of both lanes ({drops} events for {sent} datagrams)"
    );
}

/// 16 checked streams from server 1 to the client through the nat-gw example (masqueraded:
/// NAT state and ports per bucket), each backplane in turn (rings, then sealed UDP), with
/// `runtime` for the backplane: a second data plane is added (half the buckets move to it,
/// with their state) and removed again (they come back) while the streams run. `during` looks
/// at the appliance 2 s into the streams, `after` once they are all checked intact.
fn nat_streams_through_scaling(
    prefix: &str,
    runtime: impl Fn(BackplaneSpec) -> RuntimeSpec,
    during: impl Fn(&MgmtGuard, BackplaneSpec),
    after: impl Fn(&MgmtGuard, &LabGuard, BackplaneSpec),
) {
    for backplane in [BackplaneSpec::Auto, BackplaneSpec::Udp] {
        let lab = LabGuard::up(prefix, 2, 2);
        lab.lab.set_offloads(true).expect("offloads on");
        let client = lab.lab.client_ns();
        let _streams_srv = StreamServer::start(&client, 9000).expect("stream server");
        let m = MgmtGuard::open(prefix);
        let spec = with_runtime(
            &std::fs::read_to_string(example("nat-gateway.yaml"))
                .expect("example")
                .replace("initial: 2", "initial: 1"),
            runtime(backplane),
        );
        m.mgmt.apply(&spec).expect("apply");
        m.wait_ready("nat-gw", 1);
        let streams = apps::start_streams(
            &lab.lab.server_ns(1),
            SocketAddr::new(IpAddr::from(CLIENT), 9000),
            16,
            Duration::from_secs(8),
            2_000_000,
        );
        std::thread::sleep(Duration::from_secs(2));
        during(&m, backplane);
        m.scale("nat-gw", 2, None);
        m.wait_ready("nat-gw", 2);
        std::thread::sleep(Duration::from_secs(2));
        m.scale("nat-gw", 1, Some("2s"));
        m.wait_ready("nat-gw", 1);
        let results = streams.join().expect("streams");
        let broken: Vec<_> = results.iter().filter(|r| !r.intact()).collect();
        assert!(
            broken.is_empty(),
            "{backplane:?}: {} of 16 streams broken: {broken:?}\nunits:\n{}",
            broken.len(),
            m.diagnostics("nat-gw")
        );
        let sent: u64 = results.iter().map(|r| r.sent).sum();
        eprintln!("{backplane:?}: 16 checked streams, {sent} bytes, all intact");
        assert!(
            sent > 10_000_000,
            "{backplane:?}: traffic flowed ({sent} bytes)"
        );
        after(&m, &lab, backplane);
    }
}

/// A counter summed over the units of `role`.
fn counter(m: &MgmtGuard, app: &str, role: &str, name: &str) -> u64 {
    m.unit_stats(app)
        .iter()
        .filter(|s| s.role == role)
        .map(|s| s.counters.get(name).copied().unwrap_or(0))
        .sum()
}

#[test]
fn two_lanes_carry_checked_streams_through_nat_over_rings_and_sealed_udp() {
    let _serial = serial();
    let runtime = |backplane| RuntimeSpec {
        dispatcher_threads: Some(2),
        backplane,
        ..Default::default()
    };
    nat_streams_through_scaling(
        "e2elanes-",
        runtime,
        |_, _| {},
        |m, lab, backplane| {
            assert_both_lanes_carry(m, "nat-gw");
            if backplane == BackplaneSpec::Auto {
                monitor_sees_every_lane(m, &lab.lab.server_ns(1));
            }
            if backplane == BackplaneSpec::Udp {
                // Every lane seals with its own sender instance: nothing refused as a replay.
                let refused = counter(m, "nat-gw", "dataplane", "backplane_auth_replayed")
                    + counter(m, "nat-gw", "dispatcher", "backplane_auth_replayed");
                assert_eq!(refused, 0, "no datagram of a lane refused as a replay");
            }
        },
    );
}

#[test]
fn data_planes_on_two_threads_keep_checked_streams_through_scaling() {
    let _serial = serial();
    let runtime = |backplane| RuntimeSpec {
        dataplane_threads: Some(2),
        backplane,
        ..Default::default()
    };
    // Both lanes of the one data plane hold flows, and `dva flows` lists them together.
    let during = |m: &MgmtGuard, backplane| {
        let listed = m.mgmt.flows("nat-gw", "port=9000").expect("flows");
        let odd = listed.flows.iter().filter(|f| f.bucket % 2 == 1).count();
        let even = listed.flows.len() - odd;
        eprintln!("{backplane:?}: dva flows lists {even} flows in even buckets, {odd} in odd");
        assert!(
            even > 0 && odd > 0 && listed.errors.is_empty(),
            "{backplane:?}: both lanes' flows listed: {listed:?}"
        );
    };
    let after = |m: &MgmtGuard, _: &LabGuard, backplane| {
        // Stats are merged every 100 ms.
        std::thread::sleep(Duration::from_millis(300));
        let dp = |name| counter(m, "nat-gw", "dataplane", name);
        let (l0, l1) = (dp("lane0_rx_frames"), dp("lane1_rx_frames"));
        eprintln!("{backplane:?}: data-plane lane 0 received {l0} datagrams, lane 1 {l1}");
        assert_eq!(dp("lanes"), 2);
        assert!(
            l0 > 100 && l1 > 100,
            "{backplane:?}: both data-plane lanes serve (lane 0: {l0}, lane 1: {l1})"
        );
        // The moved buckets' state went lane to lane: imported or replicated in.
        assert!(
            dp("flows_imported") + dp("flows_replicated_in") > 0,
            "{backplane:?}: state moved between the lanes of the data planes\nunits:\n{}",
            m.diagnostics("nat-gw")
        );
        let drops: std::collections::BTreeMap<String, u64> = m
            .unit_stats("nat-gw")
            .iter()
            .filter(|s| s.role == "dataplane")
            .flat_map(|s| s.drops.clone())
            .collect();
        eprintln!("{backplane:?}: data-plane drops {drops:?}");
        // A punt or a handover sent to the wrong lane finds no state there: none may be lost
        // that way (checked on the data plane that stays; the other one is stopped).
        for reason in ["no-state-anywhere", "punt-hop-limit"] {
            assert_eq!(
                drops.get(reason).copied().unwrap_or(0),
                0,
                "{backplane:?}: {reason} drops: {drops:?}\nunits:\n{}",
                m.diagnostics("nat-gw")
            );
        }
        if backplane == BackplaneSpec::Udp {
            let refused = dp("backplane_auth_replayed");
            assert_eq!(refused, 0, "no datagram of a lane refused as a replay");
        }
    };
    nat_streams_through_scaling("e2edplanes-", runtime, during, after);
}

#[test]
fn two_lanes_balance_and_health_check_every_backend() {
    let _serial = serial();
    let lab = LabGuard::up("e2elaneslb-", 3, 2);
    lab.lab.set_offloads(true).expect("offloads on");
    let mut web: Vec<Nginx> = (1..=3)
        .map(|k| {
            Nginx::start(&lab.lab.server_ns(k), &[80], &format!("server{k}\n")).expect("nginx")
        })
        .collect();
    let m = MgmtGuard::open("e2elaneslb-");
    let spec = lanes(
        &std::fs::read_to_string(example("web-lb.yaml")).expect("example"),
        BackplaneSpec::Auto,
    );
    m.mgmt.apply(&spec).expect("apply");
    m.wait_ready("web-lb", 2);

    // Probes leave from lane 0; the backends' answers come back to whichever lane their flow
    // hashes to and are handed to lane 0. Every backend comes up (rise 2 at 500 ms).
    let health = |m: &MgmtGuard| -> Vec<(String, bool)> {
        let mut h: Vec<(String, bool)> = m
            .unit_stats("web-lb")
            .iter()
            .filter(|s| s.role == "dispatcher")
            .flat_map(|s| s.health.iter().map(|b| (b.backend.clone(), b.up)))
            .collect();
        h.sort();
        h
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(&m).iter().filter(|(_, up)| *up).count() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        health(&m).iter().filter(|(_, up)| *up).count(),
        3,
        "every backend up: {:?}\nunits:\n{}",
        health(&m),
        m.diagnostics("web-lb")
    );
    // And stays up over several probe rounds: answers hashed to lane 1 are not lost (a lost
    // half would make backends flap: fall is 2 failures in a row).
    for _ in 0..15 {
        std::thread::sleep(Duration::from_millis(200));
        let h = health(&m);
        assert_eq!(
            h.iter().filter(|(_, up)| *up).count(),
            3,
            "every backend still up: {h:?}"
        );
    }

    // A capture on the outside interface taps every lane: it sees the SYN of every request,
    // whichever lane the request's flow hashed to.
    let capture = m
        .mgmt
        .capture(
            "web-lb",
            "interface=outside&proto=tcp&port=80&duration=8s&count=100000",
        )
        .expect("capture");
    let pcap = std::thread::spawn(move || {
        let mut out = Vec::new();
        capture.copy_to(&mut out).map(|_| out)
    });
    let url = format!("http://{}/", IpAddr::from(VIP));
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..120 {
        let got = apps::curl(&lab.lab.client_ns(), &url, 5)
            .unwrap_or_else(|e| panic!("request {i} through two lanes: {e}"));
        assert!(got.starts_with("server"), "request {i}: {got:?}");
        seen.insert(got);
    }
    assert_eq!(seen.len(), 3, "every backend served: {seen:?}");
    assert_both_lanes_carry(&m, "web-lb");
    let pcap = pcap
        .join()
        .expect("capture thread")
        .expect("capture stream");
    let file = std::env::temp_dir().join(format!("dva-e2e-lanes-{}.pcap", std::process::id()));
    std::fs::write(&file, &pcap).expect("write pcap");
    let out = std::process::Command::new("tshark")
        .args(["-r"])
        .arg(&file)
        .args([
            "-Y",
            "tcp.flags.syn==1 && tcp.flags.ack==0",
            "-T",
            "fields",
            "-e",
            "tcp.srcport",
        ])
        .output()
        .expect("tshark (Debian package tshark)");
    let _ = std::fs::remove_file(&file);
    let syns: std::collections::BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    eprintln!(
        "capture over both lanes: {} bytes, {} SYNs",
        pcap.len(),
        syns.len()
    );
    assert!(
        syns.len() >= 120,
        "the capture saw the SYN of every request ({} of 120)",
        syns.len()
    );

    // A backend that goes away is seen down (fall 2 at 500 ms) and out of rotation.
    drop(web.remove(0));
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(&m).iter().filter(|(_, up)| *up).count() != 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let h = health(&m);
    assert_eq!(
        h.iter()
            .filter(|(_, up)| !*up)
            .map(|(b, _)| b.as_str())
            .collect::<Vec<_>>(),
        ["server1"],
        "server1 seen down: {h:?}"
    );
    // The data planes take it out of rotation once the manager has told them.
    let out = apps::wait_until(Duration::from_secs(15), Duration::from_millis(100), || {
        let stats = m.unit_stats("web-lb");
        let dps: Vec<_> = stats.iter().filter(|s| s.role == "dataplane").collect();
        !dps.is_empty()
            && dps.iter().all(|s| {
                s.backends.iter().any(|b| {
                    b.backend == "server1" && b.state == dva_services::lb::BackendState::Down
                })
            })
    });
    assert!(out, "server1 marked down on every data plane");
    for i in 0..30 {
        let got = apps::curl(&lab.lab.client_ns(), &url, 5)
            .unwrap_or_else(|e| panic!("request {i} after server1 went: {e}"));
        assert_ne!(got, "server1\n", "request {i} went to the dead backend");
    }
}

#[test]
fn af_xdp_lanes_take_a_receive_queue_each() {
    // Offloads off (wire-sized frames, where AF_XDP is the driver to use) and veths with two
    // queues, as a NIC with RSS: each lane's AF_XDP socket serves one queue of each interface.
    let _serial = serial();
    let lab = LabGuard::up("e2elanesx-", 2, 2);
    lab.lab.set_queues(2).expect("two queues per veth");
    let client = lab.lab.client_ns();
    let _streams_srv = StreamServer::start(&client, 9000).expect("stream server");
    let m = MgmtGuard::open("e2elanesx-");
    let spec = with_runtime(
        &std::fs::read_to_string(example("nat-gateway.yaml"))
            .expect("example")
            .replace("initial: 2", "initial: 1"),
        RuntimeSpec {
            driver: dva_proto::spec::DriverSpec::AfXdp,
            dispatcher_threads: Some(2),
            ..Default::default()
        },
    );
    m.mgmt.apply(&spec).expect("apply");
    m.wait_ready("nat-gw", 1);
    let drivers: Vec<String> = m
        .unit_stats("nat-gw")
        .iter()
        .filter(|s| s.role == "dispatcher")
        .flat_map(|s| s.interfaces.iter().map(|i| i.driver.clone()))
        .collect();
    assert!(
        !drivers.is_empty() && drivers.iter().all(|d| d.starts_with("af_xdp")),
        "AF_XDP on every interface: {drivers:?}"
    );
    let streams = apps::start_streams(
        &lab.lab.server_ns(1),
        SocketAddr::new(IpAddr::from(CLIENT), 9000),
        16,
        Duration::from_secs(5),
        1_000_000,
    );
    let results = streams.join().expect("streams");
    let broken: Vec<_> = results.iter().filter(|r| !r.intact()).collect();
    assert!(
        broken.is_empty(),
        "{} of 16 streams broken: {broken:?}\nunits:\n{}",
        broken.len(),
        m.diagnostics("nat-gw")
    );
    let sent: u64 = results.iter().map(|r| r.sent).sum();
    eprintln!("AF_XDP, 2 lanes: 16 checked streams, {sent} bytes, all intact");
    assert_both_lanes_carry(&m, "nat-gw");
}
