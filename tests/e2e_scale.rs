//! End to end: data planes added and removed while long-lived TCP connections and iperf3 run
//! through the appliance; no connection may break (issue: the control plane).

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use dva_lab::apps::{self, Iperf3Server, StreamServer};
use dva_mgmt::{UnitRole, UnitState};

const SERVER1: [u8; 4] = [198, 18, 2, 2];

fn dataplane_pids(v: &dva_mgmt::ApplianceView) -> Vec<(u32, u32, UnitState)> {
    v.units
        .iter()
        .filter(|u| u.role == UnitRole::Dataplane)
        .map(|u| (u.id, u.pid.unwrap_or(0), u.state))
        .collect()
}

#[test]
fn scaling_out_and_in_breaks_no_connection() {
    let _serial = serial();
    let lab = LabGuard::up("e2esc-", 1, 2);
    let client = lab.lab.client_ns();
    let server = lab.lab.server_ns(1);
    // The edge firewall lets TCP 80 and 5201 in: the checked streams use 80, iperf3 5201.
    let _streams_srv = StreamServer::start(&server, 80).expect("stream server");
    let _iperf = Iperf3Server::start(&server, 5201).expect("iperf3 server");
    let m = MgmtGuard::open("e2esc-");
    m.apply_file(&example("edge-firewall.yaml"));
    m.scale("edge-fw", 1, Some("60s"));
    let v = m.wait_ready("edge-fw", 1);
    let first_dp: Vec<u32> = dataplane_pids(&v).iter().map(|d| d.0).collect();

    let dst = SocketAddr::new(IpAddr::from(SERVER1), 80);
    // 15 connections now (they live on the first data plane), 15 after the scale-out (they spread
    // over all four, so the data planes removed later hold live connections while they drain).
    let streams = apps::start_streams(&client, dst, 15, Duration::from_secs(20), 50_000);
    let iperf = {
        let client = client.clone();
        std::thread::spawn(move || {
            apps::iperf3_client(&client, IpAddr::from(SERVER1), 5201, 16, 1, false, None)
        })
    };
    std::thread::sleep(Duration::from_secs(2));

    // 1 -> 4: new data planes get their config before they own buckets; flows already running
    // keep their data plane (punting), new flows land on the new ones.
    m.scale("edge-fw", 4, None);
    let v = m.wait_ready("edge-fw", 4);
    let new_dps: Vec<u32> = dataplane_pids(&v)
        .iter()
        .map(|d| d.0)
        .filter(|id| !first_dp.contains(id))
        .collect();
    assert_eq!(new_dps.len(), 3, "three new data planes: {v:?}");
    // New short connections spread over the new owners.
    for _ in 0..40 {
        let _ = apps::tcp_connect(&client, IpAddr::from(SERVER1), 80, 2);
    }
    let v = m.wait(
        "edge-fw",
        "new data planes carry new flows",
        Duration::from_secs(10),
        |v| {
            v.units
                .iter()
                .filter(|u| new_dps.contains(&u.id))
                .all(|u| u.packets > 0)
        },
    );
    eprintln!("after scale-out: {:?}", v.units);
    let streams2 = apps::start_streams(&client, dst, 15, Duration::from_secs(15), 50_000);
    let v = m.wait(
        "edge-fw",
        "later connections spread over the new data planes",
        Duration::from_secs(10),
        |v| {
            v.units
                .iter()
                .filter(|u| new_dps.contains(&u.id))
                .map(|u| u.flows)
                .sum::<u64>()
                >= 5
        },
    );
    eprintln!(
        "flows per unit: {:?}",
        v.units.iter().map(|u| (u.id, u.flows)).collect::<Vec<_>>()
    );

    // 4 -> 1: three data planes drain; their connections keep going through them.
    std::thread::sleep(Duration::from_secs(2));
    m.scale("edge-fw", 1, None);
    let v = m.wait("edge-fw", "three draining", Duration::from_secs(10), |v| {
        v.dataplanes.draining
            + v.units
                .iter()
                .filter(|u| u.state == UnitState::Stopped)
                .count() as u32
            == 3
    });
    let drained: Vec<(u32, u32, UnitState)> = dataplane_pids(&v)
        .into_iter()
        .filter(|d| d.2 != UnitState::Ready)
        .collect();
    eprintln!("draining: {drained:?}");
    // While their connections run, the draining data planes stay (and keep serving them).
    std::thread::sleep(Duration::from_secs(2));
    let v = m.mgmt.get("edge-fw").expect("get");
    let holding: Vec<_> = v
        .units
        .iter()
        .filter(|u| u.state == UnitState::Draining && u.flows > 0)
        .collect();
    assert!(
        !holding.is_empty(),
        "some draining data plane holds live connections: {v:?}"
    );
    for u in &holding {
        assert!(
            pid_alive(u.pid.unwrap_or(0)),
            "draining data plane {} still runs",
            u.id
        );
    }

    // 1 -> 3 while they still drain.
    std::thread::sleep(Duration::from_secs(1));
    m.scale("edge-fw", 3, None);
    m.wait("edge-fw", "three ready", Duration::from_secs(30), |v| {
        v.dataplanes.ready == 3
    });

    let mut results = streams.join().expect("streams thread");
    results.extend(streams2.join().expect("streams thread"));
    let broken: Vec<_> = results.iter().filter(|r| !r.intact()).collect();
    assert!(
        broken.is_empty(),
        "{} of {} connections broken: {broken:#?}",
        broken.len(),
        results.len()
    );
    let total: u64 = results.iter().map(|r| r.received).sum();
    eprintln!("30 streams intact, {total} bytes checked");
    let report = iperf.join().expect("iperf thread").expect("iperf3 ran");
    assert!(report.received_bps > 1e6, "iperf3 got through: {report:?}");
    eprintln!(
        "iperf3 during scaling: {:.2} Gbit/s, {} retransmits",
        report.received_bps / 1e9,
        report.retransmits
    );

    // The drained data planes exit once their flows have ended.
    m.wait(
        "edge-fw",
        "drained data planes gone",
        Duration::from_secs(30),
        |v| v.dataplanes.draining == 0 && v.units.iter().all(|u| u.state != UnitState::Stopped),
    );
    for (id, pid, _) in drained {
        assert!(
            !pid_alive(pid),
            "drained data plane {id} (pid {pid}) still runs"
        );
    }
    let events = m.mgmt.events("edge-fw").expect("events");
    assert!(
        events.iter().any(|e| e.reason == "unit-drained"),
        "{events:#?}"
    );
}
