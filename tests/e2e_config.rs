//! End to end: a bad spec is refused with an error naming the field and the value, a config a
//! unit cannot run is NACKed; either way the running config keeps serving (issue: the control
//! plane).

mod common;

use std::time::Duration;

use common::*;
use dva_lab::apps::{self, Nginx};
use dva_mgmt::{ApiError, ApplianceStatus, UnitRole};

fn spec() -> String {
    std::fs::read_to_string(example("edge-firewall.yaml")).expect("example")
}

#[test]
fn bad_specs_are_refused_and_nacked_configs_leave_the_running_one_serving() {
    let _serial = serial();
    let lab = LabGuard::up("e2ecf-", 1, 2);
    let client = lab.lab.client_ns();
    let _web = Nginx::start(&lab.lab.server_ns(1), &[80, 8080], "up\n").expect("nginx");
    let curl = |port: u16| {
        apps::curl(&client, &format!("http://198.18.2.2:{port}/"), 3)
            .map(|b| b == "up\n")
            .unwrap_or(false)
    };
    let m = MgmtGuard::open("e2ecf-");
    let good = spec();
    m.mgmt.apply(&good).expect("apply");
    let before = m.wait_ready("edge-fw", 2);
    assert!(curl(80));

    // Refused at apply time: nothing changes.
    let cases = [
        (
            good.replace("    buckets: 4096", "    buckets: 4096\n    colour: blue"),
            ["colour"].as_slice(),
        ),
        (
            good.replace(
                "dst: 198.18.2.0/24\n            proto: tcp",
                "dst: 198.18.2.0/33\n            proto: tcp",
            ),
            ["spec.services[0].firewall.rules[0].dst", "198.18.2.0/33"].as_slice(),
        ),
        (
            good.replace("dport: [80, 5201]", "dport: [80, 70000]"),
            ["spec.services[0].firewall.rules[0].dport", "70000"].as_slice(),
        ),
    ];
    for (text, needles) in &cases {
        assert_ne!(text, &good, "the test case edits the spec");
        match m.mgmt.apply(text) {
            Err(ApiError::Invalid(msg)) => {
                for n in *needles {
                    assert!(msg.contains(n), "error {msg:?} names {n:?}");
                }
            }
            other => panic!("bad spec accepted or wrong error: {other:?}"),
        }
    }
    let v = m.mgmt.get("edge-fw").expect("get");
    assert_eq!(v.generation, before.generation);
    assert_eq!(v.config_version, before.config_version);
    assert_eq!(v.spec, good);

    // Accepted by the API but refused by the dispatcher (its interfaces cannot change at run
    // time): NACK, error visible, and the previous version keeps serving. The same spec also
    // opens TCP 8080, which data planes apply: the change is real, not a no-op.
    let nacked = good
        .replace("device: out0", "device: out9")
        .replace("dport: [80, 5201]", "dport: [80, 5201, 8080]");
    m.mgmt.apply(&nacked).expect("accepted by the API");
    let v = m.wait(
        "edge-fw",
        "dispatcher NACK reported",
        Duration::from_secs(10),
        |v| v.error.as_deref().is_some_and(|e| e.contains("refused")),
    );
    let disp = v
        .units
        .iter()
        .find(|u| u.role == UnitRole::Dispatcher)
        .expect("dispatcher");
    assert!(
        disp.error.is_some(),
        "the dispatcher's refusal is on its unit: {v:?}"
    );
    assert!(
        disp.config_version < v.config_version,
        "it kept its version: {v:?}"
    );
    assert_ne!(v.status, ApplianceStatus::Ready);
    assert!(curl(80), "traffic through the previous config");

    // Back to a good spec: error gone, everyone on the newest version.
    m.mgmt.apply(&good).expect("apply");
    let v = m.wait_ready("edge-fw", 2);
    assert!(v.error.is_none(), "{v:?}");
    assert!(curl(80));
    assert!(!curl(8080), "8080 closed again");
}
