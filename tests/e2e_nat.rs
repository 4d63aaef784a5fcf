//! End to end: the `nat-gw` example (firewall → NAT). The inside network reaches the client side
//! masqueraded to the appliance's outside address; a port forward reaches an inside server; NAT'd
//! long-lived connections survive scaling the data planes 1 → 3 → 1 (issue: network services).

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;
use dva_lab::apps::{self, Nginx, StreamServer};

const OUTSIDE: [u8; 4] = [198, 18, 1, 1];
const CLIENT: [u8; 4] = [198, 18, 1, 2];
const OUTSIDE6: [u16; 8] = [0x2001, 0xdb8, 1, 0, 0, 0, 0, 1];
const CLIENT6: [u16; 8] = [0x2001, 0xdb8, 1, 0, 0, 0, 0, 2];

/// A server in `ns` that answers each TCP connection and each UDP datagram on `port` with the
/// address the packet came from, as text: what the far side of a NAT sees.
struct WhoAmI {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl WhoAmI {
    fn start(ns: &str, port: u16) -> WhoAmI {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        for udp in [false, true] {
            let (ns, stop, tx) = (ns.to_string(), stop.clone(), tx.clone());
            threads.push(std::thread::spawn(move || {
                dva_io::netns::enter(&ns).expect("enter the client namespace");
                if udp {
                    // [::] takes IPv4 too (as v4-mapped addresses).
                    let s = UdpSocket::bind(("::", port)).expect("bind udp");
                    s.set_read_timeout(Some(Duration::from_millis(100))).ok();
                    tx.send(()).ok();
                    let mut buf = [0u8; 1500];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((_, from)) = s.recv_from(&mut buf) {
                            let _ = s.send_to(from.to_string().as_bytes(), from);
                        }
                    }
                } else {
                    let l = TcpListener::bind(("::", port)).expect("bind tcp");
                    l.set_nonblocking(true).ok();
                    tx.send(()).ok();
                    while !stop.load(Ordering::Relaxed) {
                        match l.accept() {
                            Ok((mut c, from)) => {
                                let _ = c.write_all(from.to_string().as_bytes());
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(10)),
                        }
                    }
                }
            }));
        }
        for _ in 0..2 {
            rx.recv_timeout(Duration::from_secs(5))
                .expect("whoami server up");
        }
        WhoAmI { stop, threads }
    }
}

impl Drop for WhoAmI {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// From `ns`: what the whoami server at `dst` says our address is, over TCP and over UDP.
fn seen_as(ns: &str, dst: SocketAddr) -> (Option<SocketAddr>, Option<SocketAddr>) {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        if dva_io::netns::enter(&ns).is_err() {
            return (None, None);
        }
        let tcp = TcpStream::connect_timeout(&dst, Duration::from_secs(3))
            .ok()
            .and_then(|mut c| {
                c.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
                let mut s = String::new();
                c.read_to_string(&mut s).ok()?;
                s.parse().ok()
            });
        let any: IpAddr = if dst.is_ipv4() {
            IpAddr::from([0u8; 4])
        } else {
            IpAddr::from([0u16; 8])
        };
        let udp = UdpSocket::bind((any, 0)).ok().and_then(|s| {
            s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
            // UDP may lose the first datagram while the dispatcher resolves the neighbour.
            for _ in 0..6 {
                s.send_to(b"who", dst).ok()?;
                let mut buf = [0u8; 128];
                if let Ok((n, _)) = s.recv_from(&mut buf) {
                    return std::str::from_utf8(&buf[..n]).ok()?.parse().ok();
                }
            }
            None
        });
        (tcp, udp)
    })
    .join()
    .unwrap_or((None, None))
}

#[test]
fn the_inside_is_masqueraded_and_a_port_forward_reaches_a_server() {
    let _serial = serial();
    let lab = LabGuard::up("e2enat-", 2, 2);
    let client = lab.lab.client_ns();
    let _who = WhoAmI::start(&client, 7000);
    let _web2 = Nginx::start(&lab.lab.server_ns(2), &[80], "hello from server2\n").expect("nginx");
    let m = MgmtGuard::open("e2enat-");
    m.apply_file(&example("nat-gateway.yaml"));
    m.wait_ready("nat-gw", 2);

    // The client side sees the appliance's outside address, over TCP, UDP and ICMP.
    let who = SocketAddr::new(IpAddr::from(CLIENT), 7000);
    for k in 1..=2 {
        let (tcp, udp) = seen_as(&lab.lab.server_ns(k), who);
        let tcp = tcp.unwrap_or_else(|| panic!("TCP from server{k} through the NAT failed"));
        let udp = udp.unwrap_or_else(|| panic!("UDP from server{k} through the NAT failed"));
        assert_eq!(
            tcp.ip().to_canonical(),
            IpAddr::from(OUTSIDE),
            "TCP from server{k}"
        );
        assert_eq!(
            udp.ip().to_canonical(),
            IpAddr::from(OUTSIDE),
            "UDP from server{k}"
        );
        assert!(
            apps::ping(&lab.lab.server_ns(k), IpAddr::from(CLIENT), 3, 5).expect("ping"),
            "ping from server{k} through the NAT"
        );
    }
    // The same over IPv6 (NAT66 masquerade to 2001:db8:1::1).
    let who6 = SocketAddr::new(IpAddr::from(CLIENT6), 7000);
    let (tcp, udp) = seen_as(&lab.lab.server_ns(1), who6);
    assert_eq!(
        tcp.map(|a| a.ip()),
        Some(IpAddr::from(OUTSIDE6)),
        "TCP over IPv6"
    );
    assert_eq!(
        udp.map(|a| a.ip()),
        Some(IpAddr::from(OUTSIDE6)),
        "UDP over IPv6"
    );
    assert!(
        apps::ping(&lab.lab.server_ns(1), IpAddr::from(CLIENT6), 3, 5).expect("ping6"),
        "ping6 from server1 through the NAT"
    );
    // Nothing gets in unasked: the client cannot reach an inside server directly...
    assert!(
        !apps::tcp_connect(&client, IpAddr::from([198, 18, 2, 3]), 80, 2).expect("connect"),
        "inside servers are not reachable from outside"
    );
    // ...but the port forward 198.18.1.1:8080 reaches server2:80.
    let body = apps::curl(&client, "http://198.18.1.1:8080/", 5).expect("curl the port forward");
    assert_eq!(body, "hello from server2\n");

    let stats = m.unit_stats("nat-gw");
    let translated: u64 = stats
        .iter()
        .filter(|s| s.role == "dataplane")
        .map(|s| s.counters.get("nat_translated").copied().unwrap_or(0))
        .sum();
    assert!(translated > 0, "the data planes count translations");
}

#[test]
fn natted_connections_survive_scaling_out_and_in() {
    let _serial = serial();
    let lab = LabGuard::up("e2enats-", 2, 2);
    let client = lab.lab.client_ns();
    let _srv = StreamServer::start(&client, 9000).expect("stream server in the client");
    let _udp = apps::UdpEchoServer::start(&client, 9001).expect("udp echo in the client");
    let m = MgmtGuard::open("e2enats-");
    let spec = std::fs::read_to_string(example("nat-gateway.yaml"))
        .expect("example")
        .replace("initial: 2", "initial: 1");
    m.mgmt.apply(&spec).expect("apply");
    m.wait_ready("nat-gw", 1);

    // Inside → outside, masqueraded: 20 streams from server1, 10 UDP streams from server2.
    let streams = apps::start_streams(
        &lab.lab.server_ns(1),
        SocketAddr::new(IpAddr::from(CLIENT), 9000),
        20,
        Duration::from_secs(14),
        50_000,
    );
    let udp = apps::start_udp_streams(
        &lab.lab.server_ns(2),
        SocketAddr::new(IpAddr::from(CLIENT), 9001),
        10,
        Duration::from_secs(14),
        50,
    );
    std::thread::sleep(Duration::from_secs(2));
    m.scale("nat-gw", 3, None);
    m.wait_ready("nat-gw", 3);
    std::thread::sleep(Duration::from_secs(3));
    m.scale("nat-gw", 1, Some("2s"));
    m.wait_ready("nat-gw", 1);

    let results = streams.join().expect("streams");
    let broken: Vec<_> = results.iter().filter(|r| !r.intact()).collect();
    assert!(
        broken.is_empty(),
        "{} of 20 NAT'd connections broken by scaling: {broken:?}\nunits:\n{}",
        broken.len(),
        m.diagnostics("nat-gw")
    );
    let udp = udp.join().expect("udp");
    let sent: u64 = udp.iter().map(|r| r.sent).sum();
    let lost: u64 = udp.iter().map(|r| r.lost).sum();
    eprintln!("UDP through the NAT while scaling: {sent} sent, {lost} lost");
    assert!(sent > 0 && udp.iter().all(|r| r.error.is_none()), "{udp:?}");
    assert_eq!(lost, 0, "no UDP datagram lost: {udp:?}");
}

#[test]
fn natted_connections_survive_the_death_of_their_data_plane() {
    // The NAT bindings replicate to each bucket's backup with the connection-tracking entries:
    // kill -9 of the data plane holding the most flows breaks none of the translated streams.
    let _serial = serial();
    let lab = LabGuard::up("e2enatk-", 2, 2);
    let client = lab.lab.client_ns();
    let _srv = StreamServer::start(&client, 9000).expect("stream server in the client");
    let m = MgmtGuard::open("e2enatk-");
    let spec = std::fs::read_to_string(example("nat-gateway.yaml"))
        .expect("example")
        .replace("initial: 2", "initial: 3");
    m.mgmt.apply(&spec).expect("apply");
    m.wait_ready("nat-gw", 3);
    let streams = apps::start_streams(
        &lab.lab.server_ns(1),
        SocketAddr::new(IpAddr::from(CLIENT), 9000),
        24,
        Duration::from_secs(12),
        50_000,
    );
    let v = m.wait(
        "nat-gw",
        "NAT'd flows on every data plane",
        Duration::from_secs(10),
        |v| {
            v.units
                .iter()
                .filter(|u| u.role == dva_mgmt::UnitRole::Dataplane)
                .all(|u| u.flows >= 2)
        },
    );
    // Let the replicas settle (creation is copied at once, a full refresh runs every second).
    std::thread::sleep(Duration::from_secs(2));
    let vid = m.kill_busiest_dataplane("nat-gw", &v, 3);
    let results = streams.join().expect("streams");
    let broken: Vec<_> = results.iter().filter(|r| !r.intact()).collect();
    assert!(
        broken.is_empty(),
        "{} of 24 NAT'd connections broken by the death of data plane {vid}: {broken:?}\nunits:\n{}",
        broken.len(),
        m.diagnostics("nat-gw")
    );
}
