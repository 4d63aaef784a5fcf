//! End to end, issue #16: a SYN flood with random sources must neither freeze the data planes
//! (replication of half-open entries, whole-table scans on the packet thread) nor lock new
//! connections out of a full table (early drop of half-open entries). The `edge-fw` example with
//! 2 data planes; the flood is raw frames from the lab's client namespace, bounded in count.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use dva_lab::apps::{self, Nginx, StreamServer};

const SERVER1: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
const STREAMS: usize = 10;

/// `n` TCP SYNs to SERVER1:80 from random (non-martian, off-link) sources, `pps` a second at
/// most, as Ethernet frames from the client's eth0 to the dispatcher. Returns at once.
fn syn_flood(lab: &LabGuard, n: usize, pps: usize, seed: u64) -> JoinHandle<usize> {
    let client = lab.lab.client_ns();
    let disp_mac = dva_io::netns::in_netns(&lab.lab.dispatcher_ns(1), || {
        dva_io::netif::mac_address("out0")
    })
    .expect("netns")
    .expect("out0 MAC");
    let client_mac = dva_io::netns::in_netns(&client, || dva_io::netif::mac_address("eth0"))
        .expect("netns")
        .expect("eth0 MAC");
    std::thread::spawn(move || {
        dva_io::netns::in_netns(&client, move || {
            use dva_io::FrameIo;
            let mut port = dva_io::af_packet::AfPacket::open("eth0", &Default::default())
                .expect("AF_PACKET on client eth0");
            let mut rng = seed | 1;
            let mut next = || {
                // xorshift64: fast and good enough for spoofed addresses and ports.
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            const BURST: usize = 256;
            let start = Instant::now();
            let mut sent = 0;
            while sent < n {
                for _ in 0..BURST.min(n - sent) {
                    let r = next();
                    // First octet 11..=100: never martian, never the lab's own networks.
                    let src = Ipv4Addr::from(
                        ((11 + (r >> 56) % 90) << 24 | (r >> 32) & 0xff_ffff) as u32,
                    );
                    let frame = syn_frame(disp_mac, client_mac, src, r as u16 | 1024, r >> 16);
                    while let Err(e) = port.tx(&frame) {
                        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
                        std::thread::sleep(Duration::from_micros(200));
                        let _ = port.flush();
                    }
                    sent += 1;
                }
                while let Err(e) = port.flush() {
                    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
                    std::thread::sleep(Duration::from_micros(200));
                }
                let due = start + Duration::from_secs_f64(sent as f64 / pps as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            sent
        })
        .expect("netns")
    })
}

fn syn_frame(dst: [u8; 6], src_mac: [u8; 6], src: Ipv4Addr, sport: u16, seq: u64) -> Vec<u8> {
    use dva_wire::checksum;
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [
        0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&SERVER1.octets());
    let c = checksum::data(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&(seq as u32).to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let c = checksum::fold(checksum::pseudo_header_v4(&src, &SERVER1, 6, 20) + checksum::sum(&tcp));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp);
    f.resize(60, 0);
    f
}

fn dataplane_counter(app: &Running, name: &str) -> u64 {
    app.unit_stats()
        .iter()
        .filter(|(_, r, _)| r == "dataplane")
        .map(|(_, _, s)| {
            s.counters
                .get(name)
                .or_else(|| s.drops.get(name))
                .copied()
                .unwrap_or(0)
        })
        .sum()
}

/// A new legitimate connection (nginx through the appliance) within `secs` seconds.
fn new_connection_works(client: &str, secs: u32) -> Result<Duration, String> {
    let t = Instant::now();
    apps::curl(client, &format!("http://{SERVER1}/"), secs)
        .map_err(|e| e.to_string())
        .and_then(|body| {
            (body == "hello\n")
                .then(|| t.elapsed())
                .ok_or(format!("unexpected body {body:?}"))
        })
}

/// The flood scenario on `spec`: checked long-lived connections throughout, a new connection
/// during the flood and right after it. Returns the data planes' early drops.
fn flood_scenario(prefix: &str, spec: &std::path::Path, syns: usize, pps: usize) -> u64 {
    let lab = LabGuard::up(prefix, 1, 2);
    let client = lab.lab.client_ns();
    let server = lab.lab.server_ns(1);
    let _web = Nginx::start(&server, &[80], "hello\n").expect("nginx in server1");
    let _streams_srv = StreamServer::start(&server, 5201).expect("stream server");
    let app = Running::start(prefix, spec, "edge-fw", 2);
    new_connection_works(&client, 5).expect("curl before the flood");

    let flood_secs = syns as f64 / pps as f64;
    let streams = apps::start_streams(
        &client,
        SocketAddr::new(IpAddr::V4(SERVER1), 5201),
        STREAMS,
        Duration::from_secs_f64(flood_secs + 6.0),
        50_000,
    );
    std::thread::sleep(Duration::from_secs(1));
    let flood = syn_flood(&lab, syns, pps, 0x9e37_79b9_7f4a_7c15);
    std::thread::sleep(Duration::from_secs_f64((flood_secs / 2.0).min(2.0)));
    // 2 s: one lost SYN may be retransmitted, a frozen data plane (seconds) fails it.
    let during = new_connection_works(&client, 2);
    let sent = flood.join().expect("flood thread");
    // Right after the flood: a new connection must not wait for the flood's entries to time out.
    let after = new_connection_works(&client, 1);
    let results = streams.join().expect("streams");
    let broken: Vec<_> = results.iter().filter(|r| !r.intact()).collect();
    let early_drops = dataplane_counter(&app, "conntrack_early_drops");
    eprintln!(
        "{prefix}: {sent} SYNs in {flood_secs:.1} s; new connection during: {during:?}, \
         after: {after:?}; early drops {}, table-full drops {}, replicated out {}",
        early_drops,
        dataplane_counter(&app, "conntrack-table-full"),
        dataplane_counter(&app, "flows_replicated_out"),
    );
    for (id, role, st) in app.unit_stats() {
        eprintln!(
            "  unit {id} {role}: rx {} flows {} drops {:?}",
            st.rx_packets, st.flows, st.drops
        );
    }
    assert!(
        broken.is_empty(),
        "{} of {STREAMS} long-lived connections broken by the flood: {broken:?}",
        broken.len()
    );
    during.expect("a new connection during the flood");
    after.expect("a new connection within 1 s after the flood");
    early_drops
}

#[test]
fn syn_flood_leaves_connections_and_new_ones_working() {
    let _serial = serial();
    flood_scenario("e2efl-", &example("edge-firewall.yaml"), 300_000, 60_000);
}

#[test]
fn full_table_evicts_half_open_entries_for_new_connections() {
    let _serial = serial();
    // The example with a 20 000-connection cap per data plane, which the flood fills.
    let text = std::fs::read_to_string(example("edge-firewall.yaml")).expect("example spec");
    let limited = text.replacen(
        "        default: drop\n",
        "        default: drop\n        max_connections: 20000\n",
        1,
    );
    assert_ne!(limited, text, "the example's firewall section moved");
    let spec = std::env::temp_dir().join("e2e-flood-max-connections.yaml");
    std::fs::write(&spec, limited).expect("write the spec");
    let early_drops = flood_scenario("e2eft-", &spec, 150_000, 50_000);
    let _ = std::fs::remove_file(&spec);
    assert!(early_drops > 0, "the flood should have filled the table");
}
