//! End to end: the highly available edge firewall (2 dispatchers behind ECMP routers, 2 managers,
//! 3 data planes). While 30 long-lived TCP connections and UDP streams run, kill -9 a data plane,
//! then a dispatcher, then the leading manager: every connection completes intact, and the
//! appliance is back to its layout within 10 s of each kill (issue: high availability).

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use dva_lab::apps::{self, StreamServer, UdpEchoServer};
use dva_mgmt::{ApplianceView, UnitRole, UnitState};

const SERVER1: [u8; 4] = [198, 18, 2, 2];

fn at_layout(v: &ApplianceView) -> bool {
    let ready = |r: UnitRole| {
        v.units
            .iter()
            .filter(|u| u.role == r && u.state == UnitState::Ready)
            .count()
    };
    v.status == dva_mgmt::ApplianceStatus::Ready
        && v.dataplanes.ready == 3
        && ready(UnitRole::Dispatcher) == 2
        && ready(UnitRole::Manager) == 2
        && v.units.iter().any(|u| u.leader == Some(true))
}

#[test]
fn kills_of_a_data_plane_a_dispatcher_and_the_leader_break_no_connection() {
    let _serial = serial();
    let prefix = "e2eha-";
    let lab = LabGuard::up_ha(prefix, 1, 2, 2);
    let client = lab.lab.client_ns();
    let server = lab.lab.server_ns(1);
    let _tcp = StreamServer::start(&server, 80).expect("stream server");
    let _udp = UdpEchoServer::start(&server, 5300).expect("udp echo");
    let m = MgmtGuard::open(prefix);
    m.apply_file(&example("edge-firewall-ha.yaml"));
    m.wait(
        "edge-fw-ha",
        "at its layout",
        Duration::from_secs(30),
        at_layout,
    );

    let tcp = apps::start_streams(
        &client,
        SocketAddr::new(IpAddr::from(SERVER1), 80),
        30,
        Duration::from_secs(22),
        30_000,
    );
    let udp = apps::start_udp_streams(
        &client,
        SocketAddr::new(IpAddr::from(SERVER1), 5300),
        10,
        Duration::from_secs(22),
        100,
    );
    // Both dispatchers carry traffic (the routers spread flows over them).
    m.wait(
        "edge-fw-ha",
        "both dispatchers in use",
        Duration::from_secs(10),
        |v| {
            v.units
                .iter()
                .filter(|u| u.role == UnitRole::Dispatcher)
                .all(|u| u.packets > 100)
        },
    );
    std::thread::sleep(Duration::from_secs(2));

    for role in [UnitRole::Dataplane, UnitRole::Dispatcher, UnitRole::Manager] {
        let v = m.mgmt.get("edge-fw-ha").expect("get");
        let victim = v
            .units
            .iter()
            .filter(|u| {
                u.role == role
                    && u.state == UnitState::Ready
                    && (role != UnitRole::Manager || u.leader == Some(true))
            })
            .max_by_key(|u| u.flows)
            .map(|u| (u.id, u.pid.unwrap_or(0)))
            .expect("a victim");
        let start = Instant::now();
        // SAFETY: kill(2) on a unit process this test's management tool started.
        unsafe {
            libc::kill(victim.1 as libc::pid_t, libc::SIGKILL);
        }
        m.wait(
            "edge-fw-ha",
            &format!(
                "back to the layout after killing {} {}",
                role.as_str(),
                victim.0
            ),
            Duration::from_secs(10),
            |v| !v.units.iter().any(|u| u.id == victim.0) && at_layout(v),
        );
        eprintln!(
            "killed {} {}: back to the layout in {:.2} s",
            role.as_str(),
            victim.0,
            start.elapsed().as_secs_f64()
        );
        std::thread::sleep(Duration::from_secs(3));
    }

    let tcp = tcp.join().expect("tcp");
    let broken: Vec<_> = tcp.iter().filter(|r| !r.intact()).collect();
    assert!(
        broken.is_empty(),
        "{} of 30 broken: {broken:?}\nunits:\n{}",
        broken.len(),
        m.diagnostics("edge-fw-ha")
    );
    let udp = udp.join().expect("udp");
    let sent: u64 = udp.iter().map(|r| r.sent).sum();
    let lost: u64 = udp.iter().map(|r| r.lost).sum();
    eprintln!("UDP: {sent} sent, {lost} lost across the three kills");
    assert!(
        sent > 0 && lost * 20 < sent,
        "most UDP datagrams arrive: {lost} of {sent} lost"
    );
    let events = m.mgmt.events("edge-fw-ha").expect("events");
    assert!(
        events.iter().any(|e| e.reason == "routes"),
        "the dead dispatcher was withdrawn from the upstream routes: {events:#?}"
    );
}
