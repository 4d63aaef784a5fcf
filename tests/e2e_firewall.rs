//! End to end: the `edge-fw` example with 2 data planes, real traffic from the lab's client and
//! server namespaces through the dispatcher and data-plane processes (issue: the data path).

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use common::*;
use dva_lab::apps::{self, Iperf3Server, Nginx};
use dva_lab::Lab;

const SERVER1: &str = "198.18.2.2";
const CLIENT: &str = "198.18.1.2";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn edge_firewall_passes_allowed_traffic_and_blocks_the_rest() {
    let _serial = serial();
    let lab = LabGuard::up("e2efw-", 1, 2);
    let client = lab.lab.client_ns();
    let server = lab.lab.server_ns(1);
    let _web =
        Nginx::start(&server, &[80, 8080], "hello from server1\n").expect("nginx in server1");
    let _client_web =
        Nginx::start(&client, &[8081], "hello from client\n").expect("nginx in client");
    let _iperf = Iperf3Server::start(&server, 5201).expect("iperf3 server");
    // The server really listens on 8080: a refusal through the appliance can only be the firewall.
    assert!(
        apps::tcp_connect(&server, ip("127.0.0.1"), 8080, 2).unwrap(),
        "nginx must listen on 8080 in the server"
    );

    let app = Running::start("e2efw-", &example("edge-firewall.yaml"), "edge-fw", 2);

    // Allowed: HTTP to the inside network.
    let body =
        apps::curl(&client, &format!("http://{SERVER1}/"), 5).expect("curl through the appliance");
    assert_eq!(body, "hello from server1\n");

    // Not allowed: a port the spec does not open (the server listens there).
    assert!(
        !apps::tcp_connect(&client, ip(SERVER1), 8080, 2).unwrap(),
        "TCP 8080 from outside must be blocked"
    );

    // ICMP echo is allowed; so is pinging the appliance's own address.
    assert!(
        apps::ping(&client, ip(SERVER1), 3, 5).unwrap(),
        "ping through the appliance"
    );
    assert!(
        apps::ping(&client, ip("198.18.1.1"), 2, 5).unwrap(),
        "ping the appliance's outside address"
    );

    // Inside may start anything; the replies come back through conntrack.
    let back = apps::curl(&server, &format!("http://{CLIENT}:8081/"), 5)
        .expect("server-initiated connection");
    assert_eq!(back, "hello from client\n");

    // Many short connections: with 2 data planes, each gets some flows (all on one: p = 2^-29).
    for _ in 0..30 {
        assert_eq!(
            apps::curl(&client, &format!("http://{SERVER1}/"), 5).expect("curl"),
            "hello from server1\n"
        );
    }

    // Bulk TCP for 10 s.
    let report = apps::iperf3_client(&client, ip(SERVER1), 5201, 10, 1, false, None)
        .expect("iperf3 through the appliance");
    assert!(
        report.received_bps > 1e6,
        "iperf3 moved almost nothing: {report:?}"
    );
    eprintln!(
        "iperf3 through dva (2 data planes): {:.2} Gbit/s, {} retransmits",
        report.received_bps / 1e9,
        report.retransmits
    );

    wait_stats(
        &app,
        "both data planes carried flows, the blocked port was dropped",
        |s| {
            let dps: Vec<_> = s.iter().filter(|(_, r, _)| r == "dataplane").collect();
            dps.len() == 2
                && dps.iter().all(|(_, _, st)| st.rx_packets > 10)
                && drops(s, "dataplane", "firewall-default-policy") > 0
        },
    );
    let s = app.unit_stats();
    for (id, role, st) in &s {
        eprintln!(
            "unit {id} {role}: rx {} tx {} flows {} drops {:?}",
            st.rx_packets, st.tx_packets, st.flows, st.drops
        );
    }
    let disp = s
        .iter()
        .find(|(_, r, _)| r == "dispatcher")
        .expect("dispatcher");
    assert!(disp.2.counters.get("to_dataplane").copied().unwrap_or(0) > 1000);
    // The client must ARP for its gateway 198.18.1.1; the servers usually learn the
    // appliance's MAC from the dispatcher's own ARP probe for them, so only one side is sure
    // to ask.
    let counter = |k: &str| disp.2.counters.get(k).copied().unwrap_or(0);
    assert!(
        counter("arp_replies") >= 1,
        "dispatcher answered the client's ARP: {:?}",
        disp.2.counters
    );
    assert!(
        counter("neighbor_probes") >= 1,
        "dispatcher resolved the servers: {:?}",
        disp.2.counters
    );
}

/// Frames that must be counted and dropped, never crash a unit.
fn malformed_frames(dst: [u8; 6], src: [u8; 6]) -> Vec<(&'static str, Vec<u8>)> {
    let eth = |ethertype: u16, payload: &[u8]| {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f.resize(f.len().max(60), 0);
        f
    };
    let mut v4 = vec![
        0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 198, 18, 1, 2, 198, 18, 2, 2,
    ];
    let c = dva_wire::checksum::data(&v4);
    v4[10..12].copy_from_slice(&c.to_be_bytes());
    let mut bad_csum = v4.clone();
    bad_csum[10] ^= 0xff;
    let mut long_total = v4.clone();
    long_total[2..4].copy_from_slice(&1400u16.to_be_bytes());
    let c = dva_wire::checksum::data(&{
        let mut h = long_total.clone();
        h[10] = 0;
        h[11] = 0;
        h
    });
    long_total[10..12].copy_from_slice(&c.to_be_bytes());
    let mut bad_ihl = v4.clone();
    bad_ihl[0] = 0x4f;
    // A valid IPv4 header whose TCP header claims a 60-byte data offset in 20 bytes.
    let mut bad_tcp = v4.clone();
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
    tcp[12] = 0xf0;
    tcp[13] = 0x02;
    bad_tcp.extend_from_slice(&tcp);
    let mut v6 = vec![0x60, 0, 0, 0, 0x13, 0x88, 6, 64];
    v6.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    v6.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    vec![
        ("header only", eth(0x0800, &[])),
        ("truncated ipv4", eth(0x0800, &v4[..10])),
        ("bad ipv4 checksum", eth(0x0800, &bad_csum)),
        ("ipv4 total length past the frame", eth(0x0800, &long_total)),
        ("ipv4 ihl past the frame", eth(0x0800, &bad_ihl)),
        ("tcp data offset past the segment", eth(0x0800, &bad_tcp)),
        (
            "arp with hardware length 9",
            eth(0x0806, &[0, 1, 8, 0, 9, 4, 0, 1, 1, 2, 3]),
        ),
        ("ipv6 payload length past the frame", eth(0x86dd, &v6)),
        ("vlan tagged", eth(0x8100, &[0, 5, 8, 0, 0x45])),
        ("garbage ethertype", eth(0x1234, &[0xde, 0xad, 0xbe, 0xef])),
    ]
}

fn send_udp(ns: &str, from: SocketAddr, to: SocketAddr, payloads: Vec<Vec<u8>>) {
    dva_io::netns::in_netns(ns, move || {
        let s = UdpSocket::bind(from).expect("bind in lab namespace");
        for p in &payloads {
            s.send_to(p, to).expect("send");
        }
    })
    .expect("enter namespace");
}

fn geneve_garbage(vni: u32) -> Vec<Vec<u8>> {
    // Options: 4 words (the dva option's 4-byte header and 12 bytes of data).
    let mut valid_hdr_bad_inner = vec![0x04, 0x00, 0x08, 0x00];
    valid_hdr_bad_inner.extend_from_slice(&(vni << 8).to_be_bytes());
    // dva option: class 0xFFDA, type 1, length 3 words.
    valid_hdr_bad_inner.extend_from_slice(&[0xff, 0xda, 0x01, 0x03]);
    valid_hdr_bad_inner.extend_from_slice(&[0; 12]);
    valid_hdr_bad_inner.extend_from_slice(&[0x45, 0, 0, 200, 1, 2, 3]);
    vec![
        vec![1, 2, 3],
        vec![0xc0, 0, 0x65, 0x58, 0, 0, 1, 0], // version 3
        vec![0x3f, 0, 0x08, 0x00, 0, 0, 1, 0, 0xff, 0xda, 1, 3], // options longer than the packet
        vec![0x01, 0x00, 0x08, 0x00, 0, 0, 1, 0, 0x01, 0x02, 0x81, 0x00], // unknown critical option
        vec![0xff; 200],
        valid_hdr_bad_inner,
    ]
}

#[test]
fn malformed_input_is_counted_and_crashes_nothing() {
    let _serial = serial();
    let lab = LabGuard::up("e2ebad-", 1, 2);
    let client = lab.lab.client_ns();
    let server = lab.lab.server_ns(1);
    let _web = Nginx::start(&server, &[80], "still here\n").expect("nginx");
    let app = Running::start("e2ebad-", &example("edge-firewall.yaml"), "edge-fw", 2);
    assert_eq!(
        apps::curl(&client, &format!("http://{SERVER1}/"), 5).expect("curl"),
        "still here\n"
    );

    // Frames at the dispatcher's outside interface, from the client's link.
    let disp_mac = dva_io::netns::in_netns(&lab.lab.dispatcher_ns(1), || {
        dva_io::netif::mac_address("out0")
    })
    .expect("netns")
    .expect("out0 MAC");
    let client_mac = dva_io::netns::in_netns(&client, || dva_io::netif::mac_address("eth0"))
        .expect("netns")
        .expect("eth0 MAC");
    let frames = malformed_frames(disp_mac, client_mac);
    let n_frames = frames.len();
    dva_io::netns::in_netns(&client, move || {
        use dva_io::FrameIo;
        let mut port = dva_io::af_packet::AfPacket::open("eth0", &Default::default())
            .expect("AF_PACKET on client eth0");
        // One frame per send: each is a separate bad event for the dispatcher to count.
        for (_, f) in &frames {
            port.tx(f).expect("queue frame");
            port.flush().expect("send frame");
        }
    })
    .expect("netns");

    // GENEVE garbage at a data plane (from a peer's address and from a foreign one) and at the
    // dispatcher.
    let vni = dva_proto::ApplianceSpec::from_yaml(
        &std::fs::read_to_string(example("edge-firewall.yaml")).expect("example spec"),
    )
    .expect("example parses")
    .vni();
    // The data plane listening on host1's first backplane port.
    let dp_id = app
        .unit_stats()
        .iter()
        .find(|(_, role, st)| role == "dataplane" && st.pid != 0)
        .map(|(id, _, _)| *id)
        .expect("a data plane");
    let dp_addr: SocketAddr = {
        let text = std::fs::read_to_string(app.run_dir().join("units.json")).expect("units.json");
        let units: Vec<serde_json::Value> = serde_json::from_str(&text).expect("json");
        units
            .iter()
            .find(|u| u["id"].as_u64() == Some(u64::from(dp_id)))
            .and_then(|u| u["backplane"].as_str())
            .expect("backplane address")
            .parse()
            .expect("socket address")
    };
    let host1 = Lab::host_backplane_addr(1);
    let host2 = Lab::host_backplane_addr(2);
    send_udp(
        &lab.lab.host_ns(2),
        SocketAddr::new(IpAddr::V4(host2), 0),
        dp_addr,
        geneve_garbage(vni),
    );
    let status = std::process::Command::new("ip")
        .args([
            "-n",
            &lab.lab.host_ns(2),
            "addr",
            "add",
            "198.19.0.99/24",
            "dev",
            "bp0",
        ])
        .status()
        .expect("ip addr add");
    assert!(status.success());
    send_udp(
        &lab.lab.host_ns(2),
        "198.19.0.99:0".parse().unwrap(),
        dp_addr,
        vec![vec![0; 64]],
    );
    let disp_bp = SocketAddr::new(IpAddr::V4(Lab::dispatcher_backplane_addr(1)), 6081);
    send_udp(
        &lab.lab.host_ns(1),
        SocketAddr::new(IpAddr::V4(host1), 0),
        disp_bp,
        geneve_garbage(vni),
    );

    wait_stats(&app, "malformed input counted as drops", |s| {
        let d = |r: &str| drops(s, "dispatcher", r);
        let p = |r: &str| {
            s.iter()
                .filter(|(id, _, _)| *id == dp_id)
                .map(|(_, _, st)| st.drops.get(r).copied().unwrap_or(0))
                .sum::<u64>()
        };
        let disp_frames = d("malformed-ethernet")
            + d("malformed-ip")
            + d("bad-ip-checksum")
            + d("malformed-l4")
            + d("malformed-arp")
            + d("vlan-unsupported")
            + d("unsupported-ethertype");
        // Unsealed datagrams fail authentication before any of their bytes is parsed, from
        // a peer's address as from a foreign one.
        let garbage = geneve_garbage(vni).len() as u64;
        disp_frames >= n_frames as u64
            && d("backplane-auth") >= garbage
            && p("backplane-auth") > garbage
            && p("malformed-geneve") == 0
    });

    // Nothing crashed, and traffic still flows.
    let mut app = app;
    assert!(app.alive(), "dva run exited");
    for pid in app.pids() {
        assert!(pid_alive(pid), "unit pid {pid} died");
    }
    assert_eq!(
        apps::curl(&client, &format!("http://{SERVER1}/"), 5).expect("curl after garbage"),
        "still here\n"
    );
}

/// The edge firewall with IPv6 addresses too: neighbour discovery answered by the dispatcher,
/// ICMPv6 echo and a TCP connection through the data planes, an unallowed port refused.
#[test]
fn ipv6_through_the_appliance() {
    let _serial = serial();
    let lab = LabGuard::up("e2ev6-", 1, 2);
    let client = lab.lab.client_ns();
    let server = lab.lab.server_ns(1);
    let text = std::fs::read_to_string(example("edge-firewall.yaml"))
        .expect("example")
        .replace("addresses: [198.18.1.1/24]", "addresses: [198.18.1.1/24, 2001:db8:1::1/64]")
        .replace("addresses: [198.18.2.1/24]", "addresses: [198.18.2.1/24, 2001:db8:2::1/64]")
        .replacen(
            "          - name: inside-out",
            "          - name: web-in-v6\n            from: outside\n            dst: 2001:db8:2::/64\n            proto: tcp\n            dport: 8090\n            action: accept\n          - name: ping-in-v6\n            from: outside\n            dst: 2001:db8:2::/64\n            proto: icmpv6\n            icmp_type: echo-request\n            action: accept\n          - name: inside-out",
            1,
        );
    assert!(text.contains("2001:db8:1::1/64") && text.contains("web-in-v6"));
    let m = MgmtGuard::open("e2ev6-");
    m.mgmt.apply(&text).expect("apply v6 spec");
    m.wait_ready("edge-fw", 2);
    let s6: IpAddr = "2001:db8:2::2".parse().unwrap();
    assert!(
        apps::wait_until(Duration::from_secs(10), Duration::from_millis(300), || {
            apps::ping(&client, s6, 2, 3).unwrap_or(false)
        }),
        "ping6 through the appliance"
    );
    // A TCP listener on [::]:8090 and [::]:8091 in the server; 8091 is not allowed.
    let (tx, rx) = std::sync::mpsc::channel();
    let srv = server.clone();
    std::thread::spawn(move || {
        dva_io::netns::enter(&srv).expect("netns");
        let l = std::net::TcpListener::bind("[::]:8090").expect("bind 8090");
        let _l2 = std::net::TcpListener::bind("[::]:8091").expect("bind 8091");
        tx.send(()).expect("ready");
        if let Ok((mut c, _)) = l.accept() {
            use std::io::{Read, Write};
            let mut buf = [0u8; 5];
            if c.read_exact(&mut buf).is_ok() {
                let _ = c.write_all(&buf);
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("listener up");
    let echoed = dva_io::netns::in_netns(&client, move || {
        use std::io::{Read, Write};
        let addr = SocketAddr::new(s6, 8090);
        let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        c.write_all(b"hello")?;
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf)?;
        Ok::<_, std::io::Error>(buf)
    })
    .expect("netns")
    .expect("TCP over IPv6 through the appliance");
    assert_eq!(&echoed, b"hello");
    assert!(
        !apps::tcp_connect(&client, s6, 8091, 2).unwrap_or(true),
        "port 8091 is not allowed from outside"
    );
}
