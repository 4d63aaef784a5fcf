//! End-to-end over agents and etcd, without the lab: six "machines" (network namespaces this
//! test makes, each with a private filesystem: its own mount namespace, tmpfs over `/run/dva`
//! and the agent's state) joined only by a backplane network. A control machine runs a 3-member
//! etcd cluster and two `dva serve` replicas on it; the other five run `dva agent`, through which
//! the leading replica places the appliance's units.
//!
//! * `ag-app` holds `out0`/`in0` (as `common::Machines` makes it, a client and a server behind
//!   them) and is labelled `dispatcher=true`; `ag-dp1` to `ag-dp4` take the data planes and the
//!   manager; `ag-ctl` runs etcd and the replicas;
//! * the backplane: a bridge in `ag-app` (198.19.0.1) with veth pairs to `ag-dp1` (198.19.0.2),
//!   `ag-dp2` (.3), `ag-dp3` (.4), `ag-dp4` (.5) and `ag-ctl` (.10);
//! * agents join through the follower with one-time tokens from `dva join-token`; a used token is
//!   refused; the agent's API refuses a client without a certificate, and one with another CA's;
//! * `dva apply`, `dva scale`: units on several hosts, `dva get -o json` names them, allowed
//!   traffic passes, the rest is blocked, connections survive the scaling and an agent's restart;
//! * kill -9 of the leading replica: the other leads within 5 s, adopts the units through the
//!   agents and scales; kill -9 of an etcd member: the API goes on answering;
//! * machine loss: every process of a data-plane host killed and its link cut under 30 checked
//!   TCP connections and 10 paced UDP streams: none broken, replacements on the other hosts;
//! * partition: a data-plane host's control plane cut off for 10 s (its backplane still up): its
//!   old data planes forward nothing from then on (their own counters, read on that host), and
//!   when it is healed they are stopped, never left as second owners;
//! * the manager's machine dies: units leave the silent manager, a new one runs elsewhere, no
//!   connection breaks (they stall while that machine's buckets wait for it).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::etcd::{Etcd, Replica};
use common::*;
use dva_lab::apps::{self, Nginx, StreamServer, UdpEchoServer};

const APP: &str = "ag-app";
const CLIENT: &str = "ag-client";
const SERVER: &str = "ag-server";
const CTL: &str = "ag-ctl";
const DP1: &str = "ag-dp1";
const DP2: &str = "ag-dp2";
const DP3: &str = "ag-dp3";
const DP4: &str = "ag-dp4";
const DPS: [&str; 4] = [DP1, DP2, DP3, DP4];
/// The data-plane hosts: (namespace, the bridge's veth towards it, its backplane address).
const DP_HOSTS: [(&str, &str, &str); 4] = [
    (DP1, "bp-dp1", "198.19.0.2"),
    (DP2, "bp-dp2", "198.19.0.3"),
    (DP3, "bp-dp3", "198.19.0.4"),
    (DP4, "bp-dp4", "198.19.0.5"),
];
const CTL_ADDR: &str = "198.19.0.10";
const AGENT_PORT: u16 = 17070;

/// The replica the CLI talks to (the follower at first, the survivor after the leader's death).
static API_URL: Mutex<String> = Mutex::new(String::new());

fn use_replica(url: &str) {
    *API_URL.lock().unwrap_or_else(|p| p.into_inner()) = url.to_string();
}

fn api_url() -> String {
    API_URL.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The backplane between the hosts, and cleanup of everything the test started in them: every
/// process left in the namespaces (agents, their units, etcd, `dva serve`) is killed before they
/// are deleted, on panic too.
struct Backplane(PathBuf);

impl Backplane {
    fn up(dir: PathBuf) -> Backplane {
        let b = Backplane(dir);
        b.down();
        ip(&["-n", APP, "link", "add", "bp0", "type", "bridge"]);
        ip(&["-n", APP, "link", "set", "bp0", "mtu", "9000", "up"]);
        ip(&["-n", APP, "addr", "add", "198.19.0.1/24", "dev", "bp0"]);
        let ctl = (CTL, "bp-ctl", CTL_ADDR);
        for (ns, dev, addr) in DP_HOSTS.into_iter().chain([ctl]) {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n", APP, "link", "add", dev, "mtu", "9000", "type", "veth", "peer", "name",
                "bp0", "netns", ns,
            ]);
            ip(&["-n", APP, "link", "set", dev, "master", "bp0", "up"]);
            ip(&["-n", ns, "link", "set", "bp0", "mtu", "9000", "up"]);
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "bp0"]);
        }
        b
    }

    /// Kill every process in the test's namespaces (they are all ours), then delete ours.
    fn down(&self) {
        for ns in [APP, DP1, DP2, DP3, DP4, CTL, CLIENT, SERVER] {
            kill_all_in(ns);
        }
        for ns in [DP1, DP2, DP3, DP4, CTL] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Backplane {
    fn drop(&mut self) {
        self.down();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A process started in a namespace, killed on drop; its output in `log`.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn start(ns: &str, program: &str, args: &[String], log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("spawn");
        Proc { child, log }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The output, and the last lines of each unit's log on the agent's private filesystem
    /// (what a failure needs to be understood).
    fn output_and_units(&self) -> String {
        let units = Command::new("nsenter")
            .arg(format!("--mount=/proc/{}/ns/mnt", self.child.id()))
            .args(["sh", "-c", "tail -n 30 /run/dva/*/unit-*.log"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        format!("{}{units}", self.output())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `dva agent` on `ns`, with a private filesystem: a mount namespace of its own with tmpfs over
/// `/run/dva` and over its state directory (what units and the agent write stays on that
/// "machine").
fn agent(ns: &str, dir: &Path, server: &str, token: &str, addr: &str, labels: &[&str]) -> Proc {
    let state = dir.join(format!("{ns}-state"));
    std::fs::create_dir_all(&state).expect("state dir");
    std::fs::create_dir_all("/run/dva").expect("/run/dva");
    let mut cmd = format!(
        "mount -t tmpfs -o mode=0700 tmpfs /run/dva && mount -t tmpfs -o mode=0700 tmpfs {st} && \
         exec {dva} agent --server {server} --join-token {token} --name {ns} \
         --listen {addr}:{AGENT_PORT} --backplane {addr} --state {st}/agent",
        st = state.display(),
        dva = dva_bin().display(),
    );
    for l in labels {
        cmd += &format!(" --label {l}");
    }
    let args: Vec<String> = [
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        cmd.as_str(),
    ]
    .map(String::from)
    .into();
    Proc::start(ns, "unshare", &args, dir.join(format!("{ns}-agent.log")))
}

/// The CLI against the replica in use, from the dispatcher host.
fn ctl(token: &str, args: &[&str]) -> String {
    ctl_in(APP, &api_url(), token, args)
}

/// The CLI, not asserting: (succeeded, stdout + stderr).
fn try_ctl(token: &str, args: &[&str]) -> (bool, String) {
    try_ctl_in(APP, &api_url(), token, args)
}

fn json(token: &str, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ctl(token, args)).expect("json")
}

fn allowed_passes_and_the_rest_is_blocked() {
    assert_eq!(
        apps::curl(CLIENT, "http://198.18.2.2/", 5).expect("curl through the appliance"),
        "behind agents\n"
    );
    assert!(
        apps::curl(CLIENT, "http://198.18.2.2:8080/", 2).is_err(),
        "port 8080 is not allowed from outside: the appliance must drop it"
    );
}

/// (role, host) of the ready units.
fn ready_units(token: &str) -> Vec<(String, String)> {
    units_where(token, |u| u["state"] == "ready")
        .into_iter()
        .map(|u| {
            (
                u["role"].as_str().unwrap_or("").to_string(),
                u["host"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// The units of `dva get edge-fw -o json` that `f` picks.
fn units_where(token: &str, f: impl Fn(&serde_json::Value) -> bool) -> Vec<serde_json::Value> {
    let v = json(token, &["get", "edge-fw", "-o", "json"]);
    v["units"]
        .as_array()
        .expect("units")
        .iter()
        .filter(|u| f(u))
        .cloned()
        .collect()
}

fn ready_dataplanes(token: &str) -> Vec<String> {
    ready_units(token)
        .into_iter()
        .filter(|(r, _)| r == "dataplane")
        .map(|(_, h)| h)
        .collect()
}

fn manager_host(token: &str) -> String {
    ready_units(token)
        .into_iter()
        .find(|(r, _)| r == "manager")
        .map(|(_, h)| h)
        .expect("a ready manager")
}

fn wait_until(what: &str, secs: u64, logs: &dyn Fn() -> String, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "{what}: timed out\n{}", logs());
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `curl` in the dispatcher host against an agent's API, with extra arguments: whether it got an
/// HTTP answer.
fn curl_agent(extra: &[&str]) -> bool {
    Command::new("ip")
        .args(["netns", "exec", APP, "curl", "-sS", "-k", "--max-time", "3"])
        .args(extra)
        .arg(format!("https://198.19.0.2:{AGENT_PORT}/v1/status"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The management tool's credentials (issued by the installation's CA, as a replica's own are),
/// written to files for curl: the test asks an agent for its units' counters on its own machine
/// while the management tool cannot reach it.
struct MgmtFiles {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

impl MgmtFiles {
    fn issue(pki: &Path, dir: &Path) -> MgmtFiles {
        let issued = dva_mgmt::pki::Pki::open(pki)
            .and_then(|p| p.issue_mgmt())
            .expect("the management tool's certificate");
        let f = MgmtFiles {
            cert: dir.join("mgmt.crt"),
            key: dir.join("mgmt.key"),
            ca: dir.join("mgmt-ca.crt"),
        };
        std::fs::write(&f.cert, &issued.cert_pem).expect("cert");
        std::fs::write(&f.key, &issued.key_pem).expect("key");
        std::fs::write(&f.ca, &issued.ca_pem).expect("ca");
        f
    }

    /// A unit's counters through the agent of host `ns` (at `addr`), asked from that host
    /// itself; `None` once the agent no longer knows the unit (stopped).
    fn unit_stats(&self, ns: &str, addr: &str, id: u64) -> Option<serde_json::Value> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "curl",
                "-sS",
                "--max-time",
                "3",
                "--fail",
            ])
            .arg("--cert")
            .arg(&self.cert)
            .arg("--key")
            .arg(&self.key)
            .arg("--cacert")
            .arg(&self.ca)
            .arg(format!(
                "https://{addr}:{AGENT_PORT}/v1/units/edge-fw/{id}/control/stats"
            ))
            .output()
            .expect("curl");
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }
}

/// Cut host `ns`'s control plane (every TCP segment on its backplane link: the manager channel,
/// the agent's API), leaving the backplane's datagrams flowing; or heal it.
fn control_plane(ns: &str, cut: bool) {
    if cut {
        let rules = "table inet cut {\n\
             chain i { type filter hook input priority -300; iifname \"bp0\" meta l4proto tcp drop; }\n\
             chain o { type filter hook output priority -300; oifname \"bp0\" meta l4proto tcp drop; }\n\
             }\n";
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("nft");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(rules.as_bytes())
            .expect("rules");
        assert!(child.wait().expect("nft").success(), "nft refused the cut");
    } else {
        let ok = Command::new("ip")
            .args(["netns", "exec", ns, "nft", "delete", "table", "inet", "cut"])
            .status()
            .expect("nft");
        assert!(ok.success(), "nft could not heal the cut");
    }
}

fn addr_of(ns: &str) -> &'static str {
    DP_HOSTS
        .iter()
        .find(|(n, _, _)| *n == ns)
        .map(|(_, _, a)| *a)
        .expect("a data-plane host")
}

fn link_of(ns: &str) -> &'static str {
    DP_HOSTS
        .iter()
        .find(|(n, _, _)| *n == ns)
        .map(|(_, l, _)| *l)
        .expect("a data-plane host")
}

/// Host `name` as `dva get hosts -o json` shows it (`null` if not listed).
fn host(token: &str, name: &str) -> serde_json::Value {
    json(token, &["get", "hosts", "-o", "json"])
        .as_array()
        .and_then(|a| a.iter().find(|h| h["name"] == name).cloned())
        .unwrap_or_default()
}

/// (id, host, pid) of every unit.
fn unit_pids(token: &str) -> Vec<(u64, String, u64)> {
    let mut out: Vec<(u64, String, u64)> = units_where(token, |_| true)
        .iter()
        .map(|u| {
            (
                u["id"].as_u64().unwrap_or(0),
                u["host"].as_str().unwrap_or("").to_string(),
                u["pid"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn agents_and_replicas_on_six_machines_run_the_appliance() {
    let _serial = serial();
    let _m = Machines::up([APP, CLIENT, SERVER]);
    let dir = std::env::temp_dir().join(format!("dva-agents-{}", std::process::id()));
    let _bp = Backplane::up(dir.clone());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("test dir");
    let _web = Nginx::start(SERVER, &[80, 8080], "behind agents\n").expect("nginx");
    let spec = example("edge-firewall.yaml");
    let spec = spec.to_str().expect("path");

    // 1. The control machine: etcd, and two replicas of `dva serve` on it.
    let mut etcd = Etcd::start(CTL);
    let lost_after = ["--host-lost-after", "5s"];
    let mut r1 = Replica::start(CTL, 1, CTL_ADDR, &lost_after);
    r1.wait_for("this replica leads now");
    let mut r2 = Replica::start(CTL, 2, CTL_ADDR, &lost_after);
    r2.wait_for("following the leader");
    let token = r1.token();
    assert_eq!(r2.token(), token, "the replicas share the API token");
    // Everything goes through the follower (it forwards to the leader) until the leader dies.
    use_replica(&r2.url);

    // One-time join tokens; the agents join with them, through the follower.
    let join = |ns: &str, addr: &str, labels: &[&str]| {
        let t = ctl(&token, &["join-token"]).trim().to_string();
        (agent(ns, &dir, &r2.url, &t, addr, labels), t)
    };
    let (a_app, used) = join(APP, "198.19.0.1", &["dispatcher=true"]);
    let (mut a_dp1, _) = join(DP1, "198.19.0.2", &[]);
    let (a_dp2, _) = join(DP2, "198.19.0.3", &[]);
    let (a_dp3, _) = join(DP3, "198.19.0.4", &[]);
    let (a_dp4, _) = join(DP4, "198.19.0.5", &[]);
    let agents_log = |a_dp1: &Proc| {
        format!(
            "--- {APP}\n{}\n--- {DP1}\n{}\n--- {DP2}\n{}\n--- {DP3}\n{}\n--- {DP4}\n{}",
            a_app.output_and_units(),
            a_dp1.output_and_units(),
            a_dp2.output_and_units(),
            a_dp3.output_and_units(),
            a_dp4.output_and_units()
        )
    };
    wait_until("5 hosts ready", 30, &|| agents_log(&a_dp1), || {
        let v = json(&token, &["get", "hosts", "-o", "json"]);
        v.as_array()
            .is_some_and(|a| a.len() == 5 && a.iter().all(|h| h["state"] == "ready"))
    });
    // A join token is good once.
    let again = Command::new("ip")
        .args([
            "netns",
            "exec",
            APP,
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(["-X", "POST", "-H", &format!("Authorization: Bearer {used}")])
        .args(["-d", r#"{"agent":"198.19.0.9:1","backplane":"198.19.0.9"}"#])
        .arg(format!("{}/v1/hosts/intruder/join", r1.url))
        .output()
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&again.stdout),
        "401",
        "a used token"
    );

    // The agent's API: no certificate, or one of another CA, does not get through the handshake.
    assert!(
        !curl_agent(&[]),
        "an agent answered a client without a certificate"
    );
    let (key, crt) = (dir.join("other.key"), dir.join("other.crt"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=mgmt"])
        .args(["-addext", "subjectAltName=URI:dva://mgmt"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(made.success(), "openssl made no certificate");
    let (key, crt) = (key.to_str().expect("path"), crt.to_str().expect("path"));
    assert!(
        !curl_agent(&["--cert", crt, "--key", key]),
        "an agent answered a client whose certificate is of another CA"
    );

    // 2. The appliance over the agents.
    ctl(&token, &["apply", "-f", spec]);
    let logs = || agents_log(&a_dp1);
    wait_until("2 data planes ready", 40, &logs, || {
        ready_dataplanes(&token).len() == 2
    });
    allowed_passes_and_the_rest_is_blocked();

    let checker = StreamServer::start(SERVER, 5201).expect("stream server");
    let dst: SocketAddr = "198.18.2.2:5201".parse().expect("addr");
    let flows = apps::start_streams(CLIENT, dst, 8, Duration::from_secs(10), 50_000);
    std::thread::sleep(Duration::from_secs(2));
    ctl(&token, &["scale", "edge-fw", "--dataplanes", "3"]);
    wait_until("3 data planes ready", 30, &logs, || {
        ready_dataplanes(&token).len() == 3
    });
    let units = ready_units(&token);
    let dp_hosts: std::collections::BTreeSet<String> =
        ready_dataplanes(&token).into_iter().collect();
    assert!(
        dp_hosts.len() >= 2
            && dp_hosts
                .iter()
                .all(|h| [DP1, DP2, DP3].contains(&h.as_str())),
        "data planes spread over the data-plane hosts: {units:?}"
    );
    assert!(
        units.iter().any(|(r, h)| r == "dispatcher" && h == APP),
        "the dispatcher on the host labelled dispatcher=true: {units:?}"
    );
    assert!(
        units
            .iter()
            .any(|(r, h)| r == "manager" && DPS.contains(&h.as_str())),
        "the manager on a data-plane host: {units:?}"
    );
    let results = flows.join().expect("streams");
    drop(checker);
    let broken: Vec<_> = results.iter().filter(|r| !r.intact()).collect();
    assert!(
        broken.is_empty(),
        "connections broken by scaling 2 -> 3 over agents: {broken:#?}\n{}",
        logs()
    );
    assert!(results.iter().all(|r| r.received > 0));
    allowed_passes_and_the_rest_is_blocked();

    // Counters come through the agents (no unit socket is a file of this machine).
    let out = Command::new("ip")
        .args(["netns", "exec", APP, "curl", "-sS", "--max-time", "10"])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .arg(format!("{}/v1/appliances/edge-fw/stats", api_url()))
        .output()
        .expect("curl");
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats json");
    let answered = stats["units"]
        .as_array()
        .map_or(0, |u| u.iter().filter(|u| u["answered"] == true).count());
    assert!(
        answered >= 5,
        "units answered through their agents: {stats}"
    );

    // 3. The agent of ag-dp1 dies and comes back: its units ran on meanwhile and are adopted
    // (same pids, none replaced). It comes back into the same mount namespace (its units' one:
    // their sockets and its state are there).
    let pids_before = unit_pids(&token);
    let unit_on_dp1 = pids_before
        .iter()
        .find(|(_, h, _)| h == DP1)
        .map(|(_, _, pid)| *pid)
        .unwrap_or_else(|| panic!("no unit on {DP1} to adopt: {pids_before:?}"));
    drop(a_dp1);
    let st = dir.join(format!("{DP1}-state"));
    let restart = [
        format!("--mount=/proc/{unit_on_dp1}/ns/mnt"),
        dva_bin().display().to_string(),
        "agent".into(),
        "--server".into(),
        r2.url.clone(),
        "--name".into(),
        DP1.into(),
        "--listen".into(),
        format!("198.19.0.2:{AGENT_PORT}"),
        "--backplane".into(),
        "198.19.0.2".into(),
        "--state".into(),
        format!("{}/agent", st.display()),
    ];
    a_dp1 = Proc::start(DP1, "nsenter", &restart, dir.join("dp1-again.log"));
    let logs = || agents_log(&a_dp1);
    wait_until("ag-dp1's agent back", 20, &logs, || {
        a_dp1.output().contains("adopted the units")
            && json(&token, &["get", "hosts", "-o", "json"])
                .as_array()
                .is_some_and(|a| a.iter().all(|h| h["state"] == "ready"))
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        unit_pids(&token),
        pids_before,
        "the restarted agent adopted its units (none replaced)\n{}",
        logs()
    );
    allowed_passes_and_the_rest_is_blocked();

    // 4. kill -9 of the leading replica under 8 checked connections: the follower leads within
    // 5 s, adopts every unit through the agents (same pids) and scales.
    let checker = StreamServer::start(SERVER, 5201).expect("stream server");
    let flows = apps::start_streams(CLIENT, dst, 8, Duration::from_secs(15), 50_000);
    std::thread::sleep(Duration::from_secs(2));
    let pids_before = unit_pids(&token);
    r1.kill9();
    let killed = Instant::now();
    let failover = loop {
        if try_ctl(&token, &["get", "edge-fw", "-o", "json"]).0 {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "no replica led 15 s after the leader was killed"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    r2.wait_for("leadership: took over");
    println!(
        "leader failover over agents: replica 2 answered {failover:?} after kill -9 of replica 1"
    );
    assert!(
        failover < Duration::from_secs(5),
        "failover took {failover:?}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        unit_pids(&token),
        pids_before,
        "the new leader adopted the units through the agents (none replaced)\n{}",
        logs()
    );
    ctl(&token, &["scale", "edge-fw", "--dataplanes", "4"]);
    wait_until("4 data planes ready", 30, &logs, || {
        ready_dataplanes(&token).len() == 4
    });
    let results = flows.join().expect("streams");
    drop(checker);
    let broken: Vec<_> = results.iter().filter(|r| !r.intact()).collect();
    assert!(
        broken.is_empty(),
        "connections broken across the leader's death and a scale: {broken:#?}\n{}",
        logs()
    );

    // 5. kill -9 of one etcd member: the API answers as before and scaling works.
    etcd.kill(0);
    let (ok, text) = try_ctl(
        &token,
        &[
            "scale",
            "edge-fw",
            "--dataplanes",
            "3",
            "--drain-deadline",
            "2s",
        ],
    );
    assert!(ok, "scale right after an etcd member died: {text}");
    wait_until("3 data planes ready", 30, &logs, || {
        ready_dataplanes(&token).len() == 3
    });
    allowed_passes_and_the_rest_is_blocked();

    // 6. Machine loss: a data-plane host that does not run the manager dies (every process on
    // it killed: agent and units) and its backplane link goes down (no FIN, no RST, silence)
    // while 30 checked TCP connections and 10 paced UDP streams cross the appliance. The manager
    // hears nothing from its data planes and moves their buckets to the backups on the other
    // machines (which hold the flows' state); the management tool declares the host lost after
    // --host-lost-after and replaces its units. No connection may break and no UDP stream may
    // lose seconds.
    let manager_on = manager_host(&token);
    let dps = ready_dataplanes(&token);
    let dead = DPS
        .into_iter()
        .find(|h| *h != manager_on && dps.iter().any(|d| d == h))
        .expect("a data-plane host without the manager");
    let others: Vec<&str> = DPS.into_iter().filter(|h| *h != dead).collect();
    let checker = StreamServer::start(SERVER, 5201).expect("stream server");
    let _echo = UdpEchoServer::start(CLIENT, 5300).expect("udp echo");
    let tcp = apps::start_streams(CLIENT, dst, 30, Duration::from_secs(20), 30_000);
    // From inside (anything may start there): the echo answers from outside as replies.
    let udp_dst: SocketAddr = "198.18.1.2:5300".parse().expect("addr");
    let udp = apps::start_udp_streams(SERVER, udp_dst, 10, Duration::from_secs(20), 100);
    std::thread::sleep(Duration::from_secs(3));
    kill_all_in(dead);
    ip(&["-n", APP, "link", "set", link_of(dead), "down"]);
    let cut = Instant::now();
    wait_until(
        &format!("{dead} lost, 3 data planes on {others:?}"),
        30,
        &logs,
        || {
            let dps = ready_dataplanes(&token);
            host(&token, dead)["state"] == "lost"
                && dps.len() == 3
                && dps.iter().all(|h| others.contains(&h.as_str()))
        },
    );
    // A figure for docs/CHAOS.md, not an assertion (the machine's load decides it).
    println!(
        "machine loss: {dead} declared lost and its data planes replaced on {others:?} {:?} \
         after it died (--host-lost-after 5s)",
        cut.elapsed()
    );
    let tcp = tcp.join().expect("tcp streams");
    drop(checker);
    let udp = udp.join().expect("udp streams");
    let broken: Vec<_> = tcp.iter().filter(|r| !r.intact()).collect();
    let sent: u64 = udp.iter().map(|r| r.sent).sum();
    let lost: Vec<u64> = udp.iter().map(|r| r.lost).collect();
    println!(
        "machine loss: {} of 30 TCP connections broken; UDP {sent} sent at 100/s per stream, lost \
         per stream {lost:?} (100 lost = 1 s without service)",
        broken.len()
    );
    assert!(
        broken.is_empty(),
        "connections broken by the loss of {dead}: {broken:#?}\n{}",
        logs()
    );
    // Without the manager's own failover the streams would wait for the host to be declared
    // lost (5 s here, 500 datagrams a stream); the bound leaves room for a loaded machine.
    assert!(
        sent > 0 && udp.iter().all(|r| r.error.is_none() && r.lost < 250),
        "UDP streams lost more than 2.5 s of datagrams to the loss of {dead}: {udp:#?}\n{}",
        logs()
    );
    let events = ctl(&token, &["events", "edge-fw", "-o", "json"]);
    assert!(
        events.contains(&format!("{dead}: the host is lost")),
        "events say why: {events}"
    );
    allowed_passes_and_the_rest_is_blocked();

    // 7. Partition: the remaining data-plane host without the manager loses its control plane
    // (TCP on its link: the manager channel and its agent) for 10 s, while its backplane still
    // carries datagrams: its data planes could still be sent packets, and must forward none
    // from the moment the cut is detected. Their own counters, read from that host (its agent
    // answers there), prove it; healed, they are stopped (fenced), never a second owner.
    let manager_on = manager_host(&token);
    let dps = ready_dataplanes(&token);
    let cut_off = others
        .iter()
        .copied()
        .find(|h| *h != manager_on && dps.iter().any(|d| d == h))
        .expect("a data-plane host without the manager");
    let old: Vec<u64> = units_where(&token, |u| {
        u["role"] == "dataplane" && u["state"] == "ready" && u["host"] == cut_off
    })
    .iter()
    .filter_map(|u| u["id"].as_u64())
    .collect();
    assert!(
        !old.is_empty(),
        "data planes on {cut_off} to partition: {:?}",
        ready_units(&token)
    );
    let mgmt = MgmtFiles::issue(&r2.state.join("pki"), &dir);
    let forwarded = |id: u64| -> Option<u64> {
        mgmt.unit_stats(cut_off, addr_of(cut_off), id)
            .and_then(|s| s["tx_packets"].as_u64())
    };
    for id in &old {
        assert!(
            forwarded(*id).is_some(),
            "data plane {id}'s counters through its agent"
        );
    }
    let checker = StreamServer::start(SERVER, 5201).expect("stream server");
    let tcp = apps::start_streams(CLIENT, dst, 10, Duration::from_secs(20), 30_000);
    let udp = apps::start_udp_streams(SERVER, udp_dst, 5, Duration::from_secs(20), 100);
    std::thread::sleep(Duration::from_secs(3));
    control_plane(cut_off, true);
    let cut = Instant::now();
    // Detected: the manager heard no report from them for 0.8 s and took them out of the bucket
    // table (they own no bucket); the dispatchers switch to that table in milliseconds (the
    // silent units are not waited for): half a second is left for it.
    wait_until(
        &format!("{cut_off}'s data planes own no bucket"),
        15,
        &logs,
        || {
            units_where(&token, |u| {
                old.iter().any(|id| u["id"] == *id) && u["buckets"].as_u64().is_some_and(|b| b > 0)
            })
            .is_empty()
        },
    );
    let detected = cut.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let at_detection: Vec<(u64, u64)> = old
        .iter()
        .map(|id| {
            (
                *id,
                forwarded(*id).expect("counters of a cut-off data plane"),
            )
        })
        .collect();
    while cut.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(250));
    }
    let before_heal: Vec<(u64, u64)> = old
        .iter()
        .map(|id| {
            (
                *id,
                forwarded(*id).expect("counters of a cut-off data plane"),
            )
        })
        .collect();
    println!(
        "partition: {cut_off} cut off, detected {detected:?} after the cut; its data planes' \
         forwarded packets at detection {at_detection:?}, 10 s after the cut {before_heal:?}"
    );
    assert_eq!(
        at_detection,
        before_heal,
        "the cut-off data planes forwarded packets after the cut was detected\n{}",
        logs()
    );
    control_plane(cut_off, false);
    let healed = Instant::now();
    // Until they are stopped, they still forward nothing.
    wait_until(
        &format!("{cut_off} back, its old data planes stopped"),
        30,
        &logs,
        || {
            for (id, n) in &before_heal {
                if let Some(now) = forwarded(*id) {
                    assert_eq!(
                        now,
                        *n,
                        "data plane {id} forwarded packets after the partition healed\n{}",
                        logs()
                    );
                }
            }
            let h = host(&token, cut_off);
            h["state"] == "ready" && old.iter().all(|id| forwarded(*id).is_none())
        },
    );
    println!(
        "partition healed: {cut_off} ready again, its old data planes stopped {:?} after the \
         cut was healed",
        healed.elapsed()
    );
    let tcp = tcp.join().expect("tcp streams");
    drop(checker);
    let udp = udp.join().expect("udp streams");
    let broken: Vec<_> = tcp.iter().filter(|r| !r.intact()).collect();
    assert!(
        broken.is_empty(),
        "connections broken by the partition of {cut_off}: {broken:#?}\n{}",
        logs()
    );
    assert!(
        udp.iter().all(|r| r.error.is_none() && r.lost < 250),
        "UDP streams lost more than 2.5 s of datagrams to the partition: {udp:#?}\n{}",
        logs()
    );
    let events = ctl(&token, &["events", "edge-fw", "-o", "json"]);
    assert!(events.contains("unit-fenced"), "events say why: {events}");
    wait_until("3 data planes ready", 30, &logs, || {
        ready_dataplanes(&token).len() == 3
    });
    allowed_passes_and_the_rest_is_blocked();

    // 8. The manager's machine dies (every process on it killed, its link down). The units
    // hear no keepalive from their manager and look for one at the other addresses; the
    // management tool declares the host lost and starts a manager elsewhere, which adopts the
    // newest table the units report and moves the dead data planes' buckets to their backups
    // (on other machines). Until then the dead data planes' buckets are black-holed: the
    // connections stall, none may break.
    ctl(&token, &["scale", "edge-fw", "--dataplanes", "4"]);
    wait_until("4 data planes ready", 30, &logs, || {
        ready_dataplanes(&token).len() == 4
    });
    let manager_on = manager_host(&token);
    let dps = ready_dataplanes(&token);
    assert!(
        dps.iter().any(|h| *h != manager_on),
        "a data plane off the manager's host {manager_on}: {dps:?}"
    );
    let survivors: Vec<&str> = others
        .iter()
        .copied()
        .filter(|h| *h != manager_on)
        .collect();
    let checker = StreamServer::start(SERVER, 5201).expect("stream server");
    let tcp = apps::start_streams(CLIENT, dst, 10, Duration::from_secs(25), 30_000);
    let udp = apps::start_udp_streams(SERVER, udp_dst, 5, Duration::from_secs(25), 100);
    std::thread::sleep(Duration::from_secs(3));
    // Where each stream's state lives before the kill (owner, bucket): read when one breaks.
    let flows_before = ctl(&token, &["flows", "edge-fw", "--port", "5201"]);
    kill_all_in(&manager_on);
    ip(&["-n", APP, "link", "set", link_of(&manager_on), "down"]);
    let cut = Instant::now();
    wait_until(
        &format!("{manager_on} lost, a manager and 4 data planes on {survivors:?}"),
        40,
        &logs,
        || {
            let ready = ready_units(&token);
            let on_survivors = |role: &str| {
                ready
                    .iter()
                    .filter(|(r, h)| r == role && survivors.contains(&h.as_str()))
                    .count()
            };
            host(&token, &manager_on)["state"] == "lost"
                && on_survivors("manager") >= 1
                && on_survivors("dataplane") == 4
        },
    );
    println!(
        "manager's machine lost: {manager_on} lost, a manager and the data planes on          {survivors:?} {:?} after it died",
        cut.elapsed()
    );
    let tcp = tcp.join().expect("tcp streams");
    drop(checker);
    let udp = udp.join().expect("udp streams");
    let broken: Vec<_> = tcp.iter().filter(|r| !r.intact()).collect();
    let lost: Vec<u64> = udp.iter().map(|r| r.lost).collect();
    println!(
        "manager's machine lost: {} of 10 TCP connections broken; UDP lost per stream {lost:?}          (100 lost = 1 s without service)",
        broken.len()
    );
    assert!(
        broken.is_empty(),
        "connections broken by the loss of the manager's machine {manager_on}: {broken:#?}\n\
         flows before the kill:\n{flows_before}\nflows now:\n{}\nstats:\n{}\n{}",
        ctl(&token, &["flows", "edge-fw", "--port", "5201"]),
        ctl(&token, &["stats", "edge-fw"]),
        logs()
    );
    assert!(
        udp.iter().all(|r| r.error.is_none() && r.received > 0),
        "UDP streams through the loss of the manager's machine: {udp:#?}"
    );
    allowed_passes_and_the_rest_is_blocked();

    ctl(&token, &["delete", "edge-fw"]);
    drop(r2);
    drop(r1);
    drop(etcd);
}

/// SIGKILL every process in namespace `ns` (a machine's sudden death).
fn kill_all_in(ns: &str) {
    // Also called from Drop: no panic here.
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        // SAFETY: kill(2) with a pid `ip netns pids` listed in the test's own namespace.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}
