//! End to end: `dva monitor` (issue #15). An edge firewall in a lab, managed by `dva serve`'s
//! code with its HTTP API; the real `dva` CLI streams the data planes' events while the lab
//! client makes one allowed connection (HTTP to the server) and one the firewall drops (8080,
//! where the server listens too, so only the firewall can refuse it).
//!
//! - the JSON stream holds a flow event for the allowed connection naming the rule that
//!   accepted it (`web-in`), its bucket and the data plane owning it;
//! - and a drop event for the blocked one: reason `firewall-default-policy` (or
//!   `firewall-rule`), destination port 8080, the interface it came in on;
//! - a dispatcher reports its drops too: TCP to the appliance's own address, with the tuple;
//! - the readable form filtered to drops on 8080 prints a line for it;
//! - a bad query is refused before any unit is asked.

mod common;

use std::net::IpAddr;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use dva_lab::apps::{self, Nginx};
use dva_unit::monitor::{EventType, FlowEvent, MonitorEvent};

const SERVER: &str = "198.18.2.2";
const CLIENT: &str = "198.18.1.2";
/// The appliance's outside address (its dispatchers answer pings there, nothing else).
const APPLIANCE: &str = "198.18.1.1";
const TOKEN: &str = "e2e-monitor-token-0123456789abcdef";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

/// `dva monitor edge-fw args...` while `traffic` runs, once the stream has started.
fn monitor_while(url: &str, args: &[&str], traffic: impl FnOnce()) -> Output {
    let child = Command::new(dva_bin())
        .args(["monitor", "edge-fw"])
        .args(args)
        .args(["--server", url, "--token", TOKEN])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dva monitor");
    // The sessions are installed before the API answers; give the CLI time to get there.
    std::thread::sleep(Duration::from_secs(2));
    traffic();
    child.wait_with_output().expect("dva monitor")
}

#[test]
fn monitor_shows_the_accepted_flow_with_its_rule_and_the_drop_with_its_reason() {
    let _serial = serial();
    let lab = LabGuard::up("e2emon-", 1, 2);
    let client = lab.lab.client_ns();
    let server = lab.lab.server_ns(1);
    let _web = Nginx::start(&server, &[80, 8080], "monitored\n").expect("nginx in the server");
    let m = MgmtGuard::open("e2emon-");
    m.apply_file(&example("edge-firewall.yaml"));
    let view = m.wait_ready("edge-fw", 2);
    let api = dva_mgmt::api::serve(m.mgmt.clone(), "127.0.0.1:0".parse().unwrap(), TOKEN.into())
        .expect("api");
    let url = format!("http://{}", api.local_addr());
    let of_role = |role| -> Vec<u32> {
        view.units
            .iter()
            .filter(|u| u.role == role)
            .map(|u| u.id)
            .collect()
    };
    let dataplanes = of_role(dva_mgmt::UnitRole::Dataplane);
    let dispatchers = of_role(dva_mgmt::UnitRole::Dispatcher);

    let out = monitor_while(&url, &["-o", "json", "--duration", "8s"], || {
        let body = apps::curl(&client, &format!("http://{SERVER}/"), 5)
            .expect("curl through the appliance");
        assert_eq!(body, "monitored\n");
        assert!(
            !apps::tcp_connect(&client, ip(SERVER), 8080, 2).expect("connect"),
            "TCP 8080 from outside must be blocked"
        );
        assert!(
            !apps::tcp_connect(&client, ip(APPLIANCE), 22, 1).expect("connect"),
            "the appliance serves no TCP"
        );
    });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "dva monitor: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<MonitorEvent> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?} is not an event: {e}")))
        .collect();
    let from_client = |e: &&MonitorEvent| e.src == Some(ip(CLIENT)) && e.dst == Some(ip(SERVER));
    let flow = events
        .iter()
        .filter(from_client)
        .find(|e| {
            e.kind == EventType::Flow && e.event == Some(FlowEvent::New) && e.dst_port == Some(80)
        })
        .unwrap_or_else(|| panic!("no flow event for the connection to port 80: {stdout}"));
    assert_eq!(flow.rule.as_deref(), Some("web-in"), "{flow:?}");
    assert_eq!(flow.proto, Some(6), "{flow:?}");
    assert!(flow.bucket.is_some(), "{flow:?}");
    assert!(dataplanes.contains(&flow.unit), "{flow:?} {dataplanes:?}");
    assert_eq!(flow.interface.as_deref(), Some("outside"), "{flow:?}");
    let drop = events
        .iter()
        .filter(from_client)
        .find(|e| e.kind == EventType::Drop && e.dst_port == Some(8080))
        .unwrap_or_else(|| panic!("no drop event for the connection to port 8080: {stdout}"));
    assert!(
        matches!(
            drop.reason.as_deref(),
            Some("firewall-default-policy" | "firewall-rule")
        ),
        "{drop:?}"
    );
    assert_eq!(drop.rule.as_deref(), Some("(default)"), "{drop:?}");
    assert_eq!(drop.interface.as_deref(), Some("outside"), "{drop:?}");
    assert!(dataplanes.contains(&drop.unit), "{drop:?}");
    let local = events
        .iter()
        .find(|e| {
            e.kind == EventType::Drop && e.dst == Some(ip(APPLIANCE)) && e.dst_port == Some(22)
        })
        .unwrap_or_else(|| panic!("no dispatcher drop for TCP to the appliance: {stdout}"));
    assert_eq!(
        local.reason.as_deref(),
        Some("to-appliance-unsupported"),
        "{local:?}"
    );
    assert!(
        dispatchers.contains(&local.unit),
        "{local:?} {dispatchers:?}"
    );
    assert_eq!(local.interface.as_deref(), Some("outside"), "{local:?}");
    // Well under the rate: nothing lost.
    assert!(
        !events.iter().any(|e| e.kind == EventType::Lost),
        "{stdout}"
    );

    // The readable form, only drops on 8080.
    let out = monitor_while(
        &url,
        &["--type", "drop", "--port", "8080", "--duration", "5s"],
        || {
            assert!(!apps::tcp_connect(&client, ip(SERVER), 8080, 2).expect("connect"));
        },
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    assert!(
        text.lines().any(|l| l.contains("DROP")
            && l.contains("firewall-")
            && l.contains(&format!("{SERVER}:8080"))),
        "{text}"
    );
    assert!(!text.contains("FLOW"), "only drops asked for: {text}");

    // Refused before any unit is asked, with the value named.
    let out = Command::new(dva_bin())
        .args(["monitor", "edge-fw", "--type", "trace", "--duration", "1s"])
        .args(["--server", &url, "--token", TOKEN])
        .output()
        .expect("dva monitor");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("trace"), "{err}");
    api.stop();
}
