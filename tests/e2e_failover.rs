//! End to end: kill -9 of a data plane while long-lived connections run through it. Each data
//! plane replicates its flows' state to the bucket's backup; when a data plane dies, its buckets
//! go to their backups, which already hold the flows (issue: high availability).

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use dva_lab::apps::{self, StreamServer};
use dva_mgmt::{UnitRole, UnitState};

const SERVER1: [u8; 4] = [198, 18, 2, 2];

#[test]
fn a_killed_data_planes_connections_survive_on_their_backups() {
    let _serial = serial();
    let lab = LabGuard::up("e2efo-", 1, 2);
    let client = lab.lab.client_ns();
    let _srv = StreamServer::start(&lab.lab.server_ns(1), 80).expect("stream server");
    let m = MgmtGuard::open("e2efo-");
    m.apply_file(&example("edge-firewall.yaml"));
    m.scale("edge-fw", 3, None);
    m.wait_ready("edge-fw", 3);

    let streams = apps::start_streams(
        &client,
        SocketAddr::new(IpAddr::from(SERVER1), 80),
        30,
        Duration::from_secs(14),
        50_000,
    );
    let v = m.wait(
        "edge-fw",
        "flows on every data plane",
        Duration::from_secs(10),
        |v| {
            v.units
                .iter()
                .filter(|u| u.role == UnitRole::Dataplane)
                .all(|u| u.flows >= 2)
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    let vid = m.kill_busiest_dataplane("edge-fw", &v, 3);
    let results = streams.join().expect("streams");
    let broken: Vec<_> = results.iter().filter(|r| !r.intact()).collect();
    assert!(
        broken.is_empty(),
        "{} of 30 connections broken by the death of data plane {vid}: {broken:?}\nunits:\n{}",
        broken.len(),
        m.diagnostics("edge-fw")
    );
}

#[test]
fn the_standby_manager_takes_over_without_rollback() {
    let _serial = serial();
    let lab = LabGuard::up("e2emh-", 1, 2);
    let client = lab.lab.client_ns();
    let _srv = StreamServer::start(&lab.lab.server_ns(1), 80).expect("stream server");
    let m = MgmtGuard::open("e2emh-");
    let spec = std::fs::read_to_string(example("edge-firewall.yaml"))
        .expect("example")
        .replacen("    buckets: 4096", "    buckets: 4096\n    managers: 2", 1);
    m.mgmt.apply(&spec).expect("apply");
    let v = m.wait(
        "edge-fw",
        "two managers, one leading",
        Duration::from_secs(30),
        |v| {
            v.status == dva_mgmt::ApplianceStatus::Ready
                && v.units
                    .iter()
                    .filter(|u| u.role == UnitRole::Manager && u.state == UnitState::Ready)
                    .count()
                    == 2
                && v.units.iter().any(|u| u.leader == Some(true))
        },
    );
    let leader = v
        .units
        .iter()
        .find(|u| u.leader == Some(true))
        .map(|u| (u.id, u.pid.unwrap_or(0)))
        .expect("leader");
    let version_before = v.config_version;
    let streams = apps::start_streams(
        &client,
        SocketAddr::new(IpAddr::from(SERVER1), 80),
        20,
        Duration::from_secs(10),
        50_000,
    );
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: kill(2) on a unit process this test started.
    unsafe {
        libc::kill(leader.1 as libc::pid_t, libc::SIGKILL);
    }
    let v = m.wait("edge-fw", "a standby leads", Duration::from_secs(15), |v| {
        v.units
            .iter()
            .any(|u| u.leader == Some(true) && u.id != leader.0)
            && v.status == dva_mgmt::ApplianceStatus::Ready
    });
    assert!(
        v.config_version >= version_before,
        "config version went back: {version_before} -> {}",
        v.config_version
    );
    // The new leader manages: a scale-out goes through it.
    m.scale("edge-fw", 3, None);
    m.wait_ready("edge-fw", 3);
    let results = streams.join().expect("streams");
    let broken: Vec<_> = results.iter().filter(|r| !r.intact()).collect();
    assert!(broken.is_empty(), "{broken:#?}");
    // The dead manager was replaced by a new standby.
    m.wait(
        "edge-fw",
        "two managers again",
        Duration::from_secs(15),
        |v| {
            v.units
                .iter()
                .filter(|u| u.role == UnitRole::Manager && u.state == UnitState::Ready)
                .count()
                == 2
        },
    );
}

/// The backplane impairment device: a data-plane host's link loses, delays and reorders frames,
/// then is cut off for a second; TCP connections through it recover, none breaks.
#[test]
fn an_impaired_or_briefly_cut_off_backplane_link_breaks_no_connection() {
    let _serial = serial();
    // The impairment device sits in the lab's backplane fabric: keep the units' datagrams on
    // it (UDP), not in the shared-memory rings units on one machine use by default.
    let lab = LabGuard::up("e2eim-", 1, 2);
    let client = lab.lab.client_ns();
    let _srv = StreamServer::start(&lab.lab.server_ns(1), 80).expect("stream server");
    let m = MgmtGuard::open("e2eim-");
    m.mgmt
        .apply(&example_over_udp("edge-firewall.yaml"))
        .expect("apply");
    m.wait_ready("edge-fw", 2);
    let streams = apps::start_streams(
        &client,
        SocketAddr::new(IpAddr::from(SERVER1), 80),
        20,
        Duration::from_secs(10),
        30_000,
    );
    std::thread::sleep(Duration::from_secs(1));
    let imp = apps::Impaired::start(
        &lab.lab,
        2,
        apps::Impairment {
            drop_pct: 3.0,
            delay: Duration::from_millis(5),
            reorder_pct: 2.0,
        },
    )
    .expect("impairment device");
    std::thread::sleep(Duration::from_secs(3));
    imp.set(apps::Impairment {
        drop_pct: 100.0,
        ..Default::default()
    });
    std::thread::sleep(Duration::from_secs(1));
    imp.set(apps::Impairment::default());
    std::thread::sleep(Duration::from_secs(1));
    let st = imp.stats();
    eprintln!("impairment device: {st:?}");
    assert!(
        st.dropped > 0 && st.reordered > 0 && st.forwarded > 0,
        "{st:?}"
    );
    drop(imp);
    let results = streams.join().expect("streams");
    let broken: Vec<_> = results.iter().filter(|r| !r.intact()).collect();
    assert!(broken.is_empty(), "{broken:#?}");
}
