//! Several `dva serve` replicas on a real 3-member etcd cluster (`/usr/bin/etcd`, no mocks): the
//! store's round trip through etcd, one leader among two replicas with the follower forwarding
//! API calls, a `kill -9` of the leader taken over within 5 s without restarting any unit (and
//! without breaking the connections through the appliance), the loss of one etcd member, and of
//! the quorum (the leader fences itself: it stops reconciling). The cluster speaks only TLS and
//! takes only clients with a certificate of its CA, as a production one should.
//!
//! Everything runs in network namespaces this test makes (as tests/e2e_nolab.rs does): the
//! appliance's machine with `out0`/`in0` (the devices examples/edge-firewall.yaml names), a
//! client and a server. The etcd members and both replicas run on the appliance machine's
//! loopback.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::etcd::*;
use common::*;
use dva_lab::apps::{self, Nginx, StreamServer};
use dva_mgmt::etcd::{EtcdLink, EtcdStore};
use dva_mgmt::store::Store;
use dva_mgmt::ApplianceRecord;

const APP: &str = "etcd-app";
const CLIENT: &str = "etcd-client";
const SERVER: &str = "etcd-server";
/// The CLI against one replica: (succeeded, stdout + stderr).
fn try_ctl(server: &str, token: &str, args: &[&str]) -> (bool, String) {
    try_ctl_in(APP, server, token, args)
}

fn ctl(server: &str, token: &str, args: &[&str]) -> String {
    let (ok, text) = try_ctl(server, token, args);
    assert!(ok, "dva {}: {text}", args.join(" "));
    text
}

fn get(server: &str, token: &str) -> serde_json::Value {
    serde_json::from_str(&ctl(server, token, &["get", "edge-fw", "-o", "json"])).expect("json")
}

/// Ready data planes, and (role, id, pid) of every unit with a process.
fn units(v: &serde_json::Value) -> (usize, Vec<(String, u64, u64)>) {
    let units = v["units"].as_array().cloned().unwrap_or_default();
    let ready = units
        .iter()
        .filter(|u| u["role"] == "dataplane" && u["state"] == "ready")
        .count();
    let mut pids: Vec<(String, u64, u64)> = units
        .iter()
        .filter(|u| u["pid"].is_u64())
        .map(|u| {
            (
                u["role"].as_str().unwrap_or("").to_string(),
                u["id"].as_u64().unwrap_or(0),
                u["pid"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    pids.sort();
    (ready, pids)
}

fn wait_dataplanes(server: &str, token: &str, n: usize) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        // No retry on "an election is settling": the API waits out a settling election itself
        // (an etcd member's death holds up the leader's lease renewals for a second or two).
        let (ok, text) = try_ctl(server, token, &["get", "edge-fw", "-o", "json"]);
        assert!(ok, "dva get edge-fw -o json: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        if units(&v).0 == n {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{n} data planes never ready: {v:#}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn allowed_passes() {
    assert_eq!(
        apps::curl(CLIENT, "http://198.18.2.2/", 5).expect("curl through the appliance"),
        "behind the replicas\n"
    );
}

/// (a) The store through etcd, from a thread inside the appliance machine's namespace (where
/// the members listen): save, load, set-aside of a corrupt record, remove.
fn store_round_trip() {
    std::thread::spawn(|| {
        dva_io::netns::enter(APP).expect("enter the namespace");
        let endpoints: Vec<String> = MEMBERS.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let tls = dva_mgmt::store::EtcdTls {
            ca: pki_file("ca.pem").into(),
            identity: Some((pki_file("dva.pem").into(), pki_file("dva-key.pem").into())),
        };
        // The cluster takes no client without a certificate of its CA: not in plain HTTP/2, not
        // over TLS without a client certificate.
        for (what, tls) in [
            ("plain HTTP/2", None),
            (
                "TLS without a client certificate",
                Some(dva_mgmt::store::EtcdTls {
                    ca: pki_file("ca.pem").into(),
                    identity: None,
                }),
            ),
        ] {
            match EtcdLink::connect(&endpoints, tls.as_ref()) {
                Ok(_) => panic!("etcd accepted a client over {what}"),
                Err(e) => println!("etcd refused a client over {what}: {e:#}"),
            }
        }
        let link = EtcdLink::connect(&endpoints, Some(&tls)).expect("connect to etcd");
        let store = EtcdStore::new(link, None);
        let rec = ApplianceRecord {
            name: "round-trip".into(),
            spec_text: "kind: Appliance\n".into(),
            generation: 7,
            dataplanes: 2,
            drain_deadline_ms: 3000,
            units: Vec::new(),
            next_unit_id: 4,
            events: Vec::new(),
            created_ms: 1,
            manager_port: Some(7443),
        };
        store.save(&rec).expect("save");
        let loaded = store.load_all().expect("load");
        assert_eq!(loaded.records, vec![rec.clone()]);
        assert!(loaded.corrupt.is_empty());

        store.put_raw("torn", b"{\"name\": \"to").expect("put raw");
        let loaded = store.load_all().expect("load");
        assert_eq!(loaded.records, vec![rec.clone()]);
        assert_eq!(loaded.corrupt.len(), 1, "{:?}", loaded.corrupt);
        assert!(loaded.corrupt[0]
            .reason
            .contains("set aside as /dva/corrupt/torn/"));
        assert_eq!(store.set_aside_keys("torn").expect("keys").len(), 1);
        // Set aside, not loaded again.
        assert!(store.load_all().expect("load").corrupt.is_empty());

        store.remove("round-trip").expect("remove");
        store
            .remove("round-trip")
            .expect("removing twice is no error");
        assert!(store.load_all().expect("load").records.is_empty());
    })
    .join()
    .expect("store round trip");
}

#[test]
fn replicas_on_etcd_fail_over_without_touching_the_units() {
    let _serial = serial();
    let _m = Machines::up([APP, CLIENT, SERVER]);
    let mut etcd = Etcd::start(APP);
    store_round_trip();

    let _web = Nginx::start(SERVER, &[80], "behind the replicas\n").expect("nginx");
    let spec = example("edge-firewall.yaml");
    let spec = spec.to_str().expect("path");

    // (b) Two replicas: the first leads, the second follows; both accept one token.
    let mut a = Replica::start(APP, 1, "127.0.0.1", &[]);
    a.wait_for("this replica leads now");
    let mut b = Replica::start(APP, 2, "127.0.0.1", &[]);
    b.wait_for("following the leader");
    let token = a.token();
    assert_eq!(
        b.token(),
        token,
        "the replicas share the API token through etcd"
    );

    // Writes through the follower are forwarded to the leader.
    ctl(&b.url, &token, &["apply", "-f", spec]);
    ctl(&b.url, &token, &["scale", "edge-fw", "--dataplanes", "2"]);
    let via_b = wait_dataplanes(&b.url, &token, 2);
    let via_a = get(&a.url, &token);
    assert_eq!(via_a["generation"], via_b["generation"]);
    assert_eq!(via_a["generation"], 2, "apply, then scale: {via_a:#}");
    // A watch asked of the follower streams from the leader (the follower names it, the client
    // goes there): the stored events come first.
    let out = Command::new("ip")
        .args(["netns", "exec", APP, "timeout", "4"])
        .arg(dva_bin())
        .args([
            "events", "edge-fw", "-w", "--server", &b.url, "--token", &token,
        ])
        .output()
        .expect("dva events -w");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("applied") && text.contains("scaled"),
        "events -w through the follower: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    allowed_passes();
    let before = units(&via_a).1;
    assert!(
        before.len() >= 3,
        "manager, dispatcher, data planes: {before:?}"
    );

    // Connections through the appliance across the leader's death.
    let checker = StreamServer::start(SERVER, 5201).expect("stream server");
    let dst: SocketAddr = "198.18.2.2:5201".parse().expect("addr");
    let flows = apps::start_streams(CLIENT, dst, 8, Duration::from_secs(20), 50_000);
    std::thread::sleep(Duration::from_secs(2));

    a.kill9();
    let killed = Instant::now();
    let failover = loop {
        let (ok, _) = try_ctl(&b.url, &token, &["get", "edge-fw", "-o", "json"]);
        if ok {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "no leader answered 15 s after the leader was killed"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    println!(
        "leader failover: replica 2 answered as leader {failover:?} after kill -9 of replica 1"
    );
    assert!(
        failover < Duration::from_secs(5),
        "failover took {failover:?}"
    );
    b.wait_for("leadership: took over");

    // The units were adopted, not restarted: the same processes.
    let after = units(&get(&b.url, &token)).1;
    assert_eq!(after, before, "units were restarted by the new leader");
    let events = ctl(&b.url, &token, &["events", "edge-fw"]);
    assert!(events.contains("leader-elected"), "{events}");

    ctl(&b.url, &token, &["scale", "edge-fw", "--dataplanes", "3"]);
    let v = wait_dataplanes(&b.url, &token, 3);
    assert_eq!(v["generation"], 3);

    let results = flows.join().expect("streams");
    drop(checker);
    let broken: Vec<_> = results.iter().filter(|r| !r.intact()).collect();
    assert!(
        broken.is_empty(),
        "connections broken across the leader's death and a scale: {broken:#?}"
    );
    assert!(results.iter().all(|r| r.received > 0));

    // (c) One etcd member dies: the quorum (2 of 3) holds, the API answers, scaling works.
    etcd.kill(0);
    // Every call goes through: the client may still send to the dead member for a while, and the
    // store makes the call again on another one (once, not as a retry by the test).
    let (ok, text) = try_ctl(
        &b.url,
        &token,
        &[
            "scale",
            "edge-fw",
            "--dataplanes",
            "2",
            "--drain-deadline",
            "2s",
        ],
    );
    assert!(ok, "scale right after an etcd member died: {text}");
    let v = wait_dataplanes(&b.url, &token, 2);
    assert_eq!(v["generation"], 4);
    allowed_passes();
    let (ok, text) = try_ctl(&b.url, &token, &["delete", "edge-fw"]);
    assert!(ok, "delete after an etcd member died: {text}");

    // (d) Fencing: a second member dies, the quorum is gone and the lease cannot be renewed; the
    // leader must stop reconciling by itself (before anyone else could be elected) and stop
    // calling itself ready.
    while b.lines.try_recv().is_ok() {}
    etcd.kill(1);
    let lost = Instant::now();
    b.wait_for("reconciler is paused");
    println!(
        "fencing: the leader paused its reconciler {:?} after etcd lost its quorum",
        lost.elapsed()
    );
    let (ok, text) = try_ctl(&b.url, &token, &["get", "edge-fw"]);
    assert!(!ok && text.contains("leads right now"), "{text}");
    drop(b);
    drop(a);
}
