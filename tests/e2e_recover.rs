//! End to end: units that die are replaced by the reconciler, and a restarted management tool
//! adopts the running appliance without disturbing it (issue: the control plane).

mod common;

use std::time::Duration;

use common::*;
use dva_lab::apps::{self, Nginx};
use dva_mgmt::{UnitRole, UnitState};

const SERVER1: &str = "198.18.2.2";

fn pid_of(v: &dva_mgmt::ApplianceView, role: UnitRole) -> (u32, u32) {
    v.units
        .iter()
        .find(|u| u.role == role && u.state == UnitState::Ready)
        .map(|u| (u.id, u.pid.unwrap_or(0)))
        .expect("a ready unit of that role")
}

fn kill9(pid: u32) {
    assert!(pid > 0);
    // SAFETY: kill(2) on a unit process this test started.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

#[test]
fn dead_units_are_replaced_and_a_restarted_management_tool_adopts_the_appliance() {
    let _serial = serial();
    let lab = LabGuard::up("e2erc-", 1, 2);
    let client = lab.lab.client_ns();
    let _web = Nginx::start(&lab.lab.server_ns(1), &[80], "alive\n").expect("nginx");
    let url = format!("http://{SERVER1}/");
    let curl_ok = || {
        apps::curl(&client, &url, 3)
            .map(|b| b == "alive\n")
            .unwrap_or(false)
    };

    let m = MgmtGuard::open("e2erc-");
    m.apply_file(&example("edge-firewall.yaml"));
    let v = m.wait_ready("edge-fw", 2);
    assert!(curl_ok());

    // A data plane, then the dispatcher, then the manager: each replaced, traffic back.
    for role in [UnitRole::Dataplane, UnitRole::Dispatcher, UnitRole::Manager] {
        let v = m.mgmt.get("edge-fw").expect("get");
        let (id, pid) = pid_of(&v, role);
        kill9(pid);
        let v = m.wait(
            "edge-fw",
            &format!("{} {id} replaced", role.as_str()),
            Duration::from_secs(30),
            |v| {
                v.status == dva_mgmt::ApplianceStatus::Ready
                    && v.dataplanes.ready == 2
                    && !v.units.iter().any(|u| u.id == id)
                    && v.units
                        .iter()
                        .any(|u| u.role == role && u.state == UnitState::Ready)
            },
        );
        assert!(
            apps::wait_until(Duration::from_secs(10), Duration::from_millis(200), curl_ok),
            "traffic after {} {id} was killed and replaced: {v:?}",
            role.as_str()
        );
        let events = m.mgmt.events("edge-fw").expect("events");
        assert!(
            events
                .iter()
                .any(|e| e.reason == "unit-died" && e.message.contains(&format!(" {id} "))),
            "death of {id} recorded: {events:#?}"
        );
    }

    // The management tool goes away (units keep running) and comes back on the same store.
    let before = m.mgmt.get("edge-fw").expect("get");
    let pids: Vec<Option<u32>> = before.units.iter().map(|u| u.pid).collect();
    m.mgmt.shutdown();
    assert!(curl_ok(), "traffic with no management tool running");
    let m2 = MgmtGuard::reopen(&m);
    let after = m2.wait_ready("edge-fw", 2);
    assert_eq!(
        after.units.iter().map(|u| u.pid).collect::<Vec<_>>(),
        pids,
        "the restarted management tool adopted the running units instead of restarting them"
    );
    assert_eq!(after.generation, before.generation);
    assert!(curl_ok());
    let _ = v;
    drop(m2);
    std::mem::forget(m);
}
