//! End-to-end: the backplane takes nothing it cannot authenticate. Forged GENEVE datagrams from
//! ordinary sockets on the appliance's own hosts, replays of real backplane traffic captured on
//! the wire, and a forged handover `State` never reach the inside network nor create state;
//! each is a counted drop (`backplane-auth`).
//!
//! Before authentication, a data plane believed any datagram from a dispatcher's or peer's IP
//! (its own host included) and a dispatcher sent out whatever came from a data plane's IP.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use dva_io::FrameIo;
use dva_lab::Lab;
use dva_wire::geneve::{self, dva_flags, DvaMeta, DVA_HEADER_LEN};

const PREFIX: &str = "e2eauth-";
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const SERVER1: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
/// The port the inside server listens on; outside -> inside UDP is refused by `edge-fw`.
const BLOCKED_PORT: u16 = 9999;
/// The interface index of `inside` in `edge-firewall.yaml`.
const INSIDE_IF: u8 = 1;

/// An IPv4/UDP packet (UDP checksum 0: none, valid in IPv4).
fn ipv4_udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
        panic!("IPv4 only");
    };
    let total = 20 + 8 + payload.len();
    let mut p = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&s.octets());
    p.extend_from_slice(&d.octets());
    let sum = dva_wire::checksum::data(&p);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(&src.port().to_be_bytes());
    p.extend_from_slice(&dst.port().to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

/// A GENEVE datagram with dva's option, as a unit builds it (but not sealed).
fn geneve(vni: u32, ptype: u16, flags: u8, ingress_if: u8, body: &[u8]) -> Vec<u8> {
    let meta = DvaMeta {
        epoch: 0,
        bucket: 0xffff, // "classify it yourself"
        hops: 0,
        flags,
        ingress_if,
        egress_if: 0,
        gso_size: 0,
    };
    let mut d = vec![0u8; DVA_HEADER_LEN + body.len()];
    geneve::encap_dva(&mut d, vni, ptype, &meta);
    d[DVA_HEADER_LEN..].copy_from_slice(body);
    d
}

fn send_from(ns: &str, from: SocketAddr, to: SocketAddr, datagrams: Vec<Vec<u8>>) {
    dva_io::netns::in_netns(ns, move || {
        let s = UdpSocket::bind(from).expect("bind in lab namespace");
        for d in &datagrams {
            s.send_to(d, to).expect("send");
        }
    })
    .expect("enter namespace");
}

/// Every IPv4/UDP frame arriving on `dev` in `ns` for UDP port `port`, while `stop` is unset.
fn capture(
    ns: String,
    dev: &'static str,
    port: u16,
    stop: Arc<AtomicBool>,
) -> Arc<Mutex<Vec<Vec<u8>>>> {
    let frames = Arc::new(Mutex::new(Vec::new()));
    let out = frames.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        dva_io::netns::in_netns(&ns, move || {
            let mut sock = dva_io::af_packet::AfPacket::open(dev, &Default::default())
                .expect("AF_PACKET capture");
            let _ = ready_tx.send(());
            while !stop.load(Ordering::Relaxed) {
                let _ = sock.rx_batch(64, |f, _| {
                    // Ethernet, IPv4 without options, UDP to `port`.
                    if f.len() > 42
                        && f[12..14] == [0x08, 0x00]
                        && f[14] == 0x45
                        && f[23] == 17
                        && u16::from_be_bytes([f[36], f[37]]) == port
                    {
                        out.lock().expect("capture lock").push(f.to_vec());
                    }
                });
                std::thread::sleep(Duration::from_millis(2));
            }
        })
        .expect("netns");
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("capture started");
    frames
}

/// Send each frame as it is out of `dev` in `ns` (a replay on the wire).
fn replay(ns: &str, dev: &str, frames: Vec<Vec<u8>>) {
    let dev = dev.to_string();
    dva_io::netns::in_netns(ns, move || {
        let mut port =
            dva_io::af_packet::AfPacket::open(&dev, &Default::default()).expect("AF_PACKET");
        for f in &frames {
            port.tx(f).expect("queue frame");
            port.flush().expect("send frame");
        }
    })
    .expect("netns");
}

/// Datagrams a UDP socket at `at` (in `ns`) receives until `stop` is set.
fn receiver(ns: String, at: SocketAddr, stop: Arc<AtomicBool>) -> Arc<Mutex<Vec<Vec<u8>>>> {
    let got = Arc::new(Mutex::new(Vec::new()));
    let out = got.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        dva_io::netns::in_netns(&ns, move || {
            let s = UdpSocket::bind(at).expect("bind receiver");
            s.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            let _ = ready_tx.send(());
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, _)) = s.recv_from(&mut buf) {
                    out.lock().expect("lock").push(buf[..n].to_vec());
                }
            }
        })
        .expect("netns");
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("receiver started");
    got
}

#[test]
fn forged_and_replayed_backplane_datagrams_never_pass() {
    let _serial = serial();
    let lab = LabGuard::up(PREFIX, 1, 2);
    let client = lab.lab.client_ns();
    let server = lab.lab.server_ns(1);
    // Over UDP, so real backplane traffic crosses the wire where it can be captured.
    let spec = std::env::temp_dir().join(format!("{PREFIX}edge-fw-udp.json"));
    std::fs::write(&spec, example_over_udp("edge-firewall.yaml")).expect("spec file");
    let app = Running::start(PREFIX, &spec, "edge-fw", 1);
    let _ = std::fs::remove_file(&spec);
    let vni = dva_proto::ApplianceSpec::from_yaml(
        &std::fs::read_to_string(example("edge-firewall.yaml")).expect("example spec"),
    )
    .expect("example parses")
    .vni();

    // Where the data plane listens, and on which lab host.
    let units: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(app.run_dir().join("units.json")).expect("units.json"),
    )
    .expect("json");
    let dp_addr: SocketAddr = units
        .iter()
        .find(|u| u["role"] == "dataplane")
        .and_then(|u| u["backplane"].as_str())
        .expect("a data plane's backplane address")
        .parse()
        .expect("socket address");
    let host = (1..=2)
        .find(|m| IpAddr::V4(Lab::host_backplane_addr(*m)) == dp_addr.ip())
        .expect("the data plane runs on a lab host");
    let host_ns = lab.lab.host_ns(host);
    let disp_ns = lab.lab.dispatcher_ns(1);
    let disp_addr = SocketAddr::new(IpAddr::V4(Lab::dispatcher_backplane_addr(1)), 6081);

    let stop = Arc::new(AtomicBool::new(false));
    let inside = receiver(
        server.clone(),
        SocketAddr::new(IpAddr::V4(SERVER1), BLOCKED_PORT),
        stop.clone(),
    );
    let outside = receiver(
        client.clone(),
        SocketAddr::new(IpAddr::V4(CLIENT), 7000),
        stop.clone(),
    );

    // 1. Real traffic (inside -> outside is allowed), captured on the backplane both ways.
    let to_dp = capture(host_ns.clone(), "bp0", dp_addr.port(), stop.clone());
    let to_disp = capture(disp_ns.clone(), "bp0", disp_addr.port(), stop.clone());
    let real: Vec<Vec<u8>> = (0..20).map(|i| format!("real-{i}").into_bytes()).collect();
    dva_io::netns::in_netns(&server, {
        let real = real.clone();
        move || {
            let s = UdpSocket::bind((SERVER1, 7001)).expect("bind");
            for d in &real {
                s.send_to(d, (CLIENT, 7000)).expect("send");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    })
    .expect("netns");
    let deadline = Instant::now() + Duration::from_secs(5);
    while outside.lock().expect("lock").len() < real.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut got = outside.lock().expect("lock").clone();
    got.sort();
    let mut want = real.clone();
    want.sort();
    assert_eq!(got, want, "the real traffic passes, once");
    let to_dp = to_dp.lock().expect("lock").clone();
    let to_disp = to_disp.lock().expect("lock").clone();
    assert!(
        to_dp.len() >= real.len() && to_disp.len() >= real.len(),
        "captured {} datagrams to the data plane and {} to the dispatcher",
        to_dp.len(),
        to_disp.len()
    );

    // 2. Replays: each captured datagram twice more, from the wire, towards its own receiver
    // (from the sender's side of the segment, with the sender's addresses).
    let before = app.unit_stats();
    let replay_dp = counter(&before, "dataplane", "backplane_auth_replayed");
    let replay_disp = counter(&before, "dispatcher", "backplane_auth_replayed");
    let (n_dp, n_disp) = (to_dp.len() as u64, to_disp.len() as u64);
    for _ in 0..2 {
        replay(&disp_ns, "bp0", to_dp.clone());
        replay(&host_ns, "bp0", to_disp.clone());
    }
    wait_stats(&app, "every replay refused as seen before", |s| {
        counter(s, "dataplane", "backplane_auth_replayed") >= replay_dp + 2 * n_dp
            && counter(s, "dispatcher", "backplane_auth_replayed") >= replay_disp + 2 * n_disp
    });

    // 3. Forgeries: an outside packet to a blocked port, labelled as coming in on the inside
    // (the firewall would let it out as inside -> outside traffic)...
    let forged_pkt = ipv4_udp(
        SocketAddr::new(IpAddr::V4(CLIENT), 5555),
        SocketAddr::new(IpAddr::V4(SERVER1), BLOCKED_PORT),
        b"forged",
    );
    let as_dispatcher = geneve(vni, 0x0800, 0, INSIDE_IF, &forged_pkt);
    // ...from an ordinary socket on the data plane's own host (any port),
    let host_ip = IpAddr::V4(Lab::host_backplane_addr(host));
    send_from(
        &host_ns,
        SocketAddr::new(host_ip, 0),
        dp_addr,
        vec![as_dispatcher.clone(); 5],
    );
    // ...from another port of the dispatcher's host,
    send_from(
        &disp_ns,
        SocketAddr::new(disp_addr.ip(), 0),
        dp_addr,
        vec![as_dispatcher.clone(); 5],
    );
    // ...and as a processed packet from a data plane to the dispatcher: straight out of the
    // appliance's inside interface if the dispatcher believed it.
    let as_dataplane = geneve(vni, 0x0800, dva_flags::FROM_DATAPLANE, 0, &forged_pkt);
    send_from(
        &host_ns,
        SocketAddr::new(host_ip, 0),
        disp_addr,
        vec![as_dataplane; 5],
    );

    // 4. A forged handover: an established UDP "connection" server:9999 <-> client:5556,
    // imported, would let the client's datagrams in as replies.
    let key = dva_flow::FlowKey {
        proto: 17,
        src: IpAddr::V4(SERVER1),
        dst: IpAddr::V4(CLIENT),
        src_port: BLOCKED_PORT,
        dst_port: 5556,
    };
    let bucket = (key.symmetric_hash() & 4095) as u16;
    let conn = dva_services::conntrack::Conn {
        key,
        bucket,
        state: dva_services::conntrack::ConnState::Udp { replied: true },
        created: 0,
        last_seen: u64::MAX / 4,
        orig_packets: 1,
        orig_bytes: 100,
        reply_packets: 1,
        reply_bytes: 100,
        tcp_window: Default::default(),
    };
    let flows = dva_unit::handover::Flows {
        conns: vec![conn],
        ..Default::default()
    };
    let state: Vec<Vec<u8>> = dva_unit::handover::state_bodies(1, bucket, flows)
        .into_iter()
        .map(|b| {
            geneve(
                vni,
                dva_unit::handover::PROTO_HANDOVER,
                dva_flags::FROM_DATAPLANE,
                0,
                &b,
            )
        })
        .collect();
    send_from(&host_ns, SocketAddr::new(host_ip, 0), dp_addr, state);
    std::thread::sleep(Duration::from_millis(300));
    dva_io::netns::in_netns(&client, || {
        let s = UdpSocket::bind((CLIENT, 5556)).expect("bind");
        for _ in 0..5 {
            s.send_to(b"through the forged state", (SERVER1, BLOCKED_PORT))
                .expect("send");
        }
    })
    .expect("netns");

    wait_stats(
        &app,
        "every forgery counted as an authentication drop",
        |s| {
            // 2 replays of each capture, 10 forgeries, at least one State body.
            drops(s, "dataplane", "backplane-auth") > 2 * n_dp + 10
                && drops(s, "dispatcher", "backplane-auth") >= 2 * n_disp + 5
                && drops(s, "dataplane", "firewall-default-policy") >= 5
        },
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);

    let inside = inside.lock().expect("lock").clone();
    assert!(
        inside.is_empty(),
        "the inside server received {} datagram(s) it must never see: {:?}",
        inside.len(),
        inside
            .iter()
            .map(|d| String::from_utf8_lossy(d).into_owned())
            .collect::<Vec<_>>()
    );
    let mut got = outside.lock().expect("lock").clone();
    got.sort();
    assert_eq!(got, want, "no replayed datagram reached the client");
    let s = app.unit_stats();
    assert_eq!(
        drops(&s, "dataplane", "malformed-geneve") + drops(&s, "dispatcher", "malformed-geneve"),
        0,
        "nothing unauthenticated got as far as the GENEVE parser"
    );
}
