//! End to end: seeing traffic (issue #15). An edge firewall in a lab, managed by `dva serve`'s
//! code with its HTTP API; the real `dva` CLI talks to it.
//!
//! - `dva flows` lists a TCP connection held open through the appliance, with the data plane
//!   that owns it and its exact 5-tuple; bad filters are refused with a clear message.
//! - `dva config` dumps each unit's role config with the backplane keys redacted.
//! - `dva capture --interface outside` sees the SYN of a new connection (read back with
//!   tshark), and `--interface backplane` sees that flow's GENEVE datagrams (UDP port 6081, the
//!   appliance's VNI).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use dva_mgmt::inspect::FlowsView;

const SERVER: &str = "198.18.2.2";
const CLIENT: &str = "198.18.1.2";
/// Open from outside in examples/edge-firewall.yaml.
const PORT: u16 = 5201;
const TOKEN: &str = "e2e-seeing-token-0123456789abcdef";

/// Echo every connection to SERVER:PORT in the server namespace, each on its own thread.
fn echo_server(ns: &str) {
    let listener = dva_io::netns::in_netns(ns, || TcpListener::bind((SERVER, PORT)))
        .expect("netns")
        .expect("listen in the server namespace");
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// A connection from the client namespace through the appliance, that has echoed once.
fn connect(client_ns: &str) -> TcpStream {
    let mut c = dva_io::netns::in_netns(client_ns, || {
        TcpStream::connect_timeout(
            &format!("{SERVER}:{PORT}").parse().unwrap(),
            Duration::from_secs(5),
        )
    })
    .expect("netns")
    .expect("connect through the appliance");
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"hello").expect("send");
    let mut back = [0u8; 5];
    c.read_exact(&mut back).expect("echo");
    assert_eq!(&back, b"hello");
    c
}

struct Cli {
    url: String,
}

impl Cli {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(dva_bin())
            .args(args)
            .args(["--server", &self.url, "--token", TOKEN])
            .output()
            .expect("run dva")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "dva {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `dva capture NAME args... -w file` while `traffic` runs, once the capture has started.
    fn capture_while(&self, args: &[&str], file: &str, traffic: impl FnOnce()) -> String {
        let _ = std::fs::remove_file(file);
        let child = Command::new(dva_bin())
            .args(["capture", "edge-fw"])
            .args(args)
            .args(["-w", file, "--server", &self.url, "--token", TOKEN])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start dva capture");
        // The tap is installed before the API answers; give the CLI time to get there (on a
        // loaded machine 2 s was not always enough; the captures last 5 s from their start, so
        // traffic at 3 s falls inside them whenever the tap came within those 3 s).
        std::thread::sleep(Duration::from_secs(3));
        traffic();
        let out = child.wait_with_output().expect("dva capture");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "dva capture {args:?}: {stderr}");
        stderr
    }
}

/// A number as tshark prints it: decimal, or hex with 0x (and maybe the decimal after it).
fn number(s: &str) -> Option<u64> {
    let s = s.split_whitespace().next()?;
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

fn tshark(args: &[&str]) -> String {
    let out = Command::new("tshark")
        .args(args)
        .output()
        .expect("tshark (Debian package tshark; .ci/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "tshark {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn flows_config_and_capture_show_the_traffic() {
    let _serial = serial();
    let lab = LabGuard::up("e2esee-", 1, 2);
    let client = lab.lab.client_ns();
    echo_server(&lab.lab.server_ns(1));
    let m = MgmtGuard::open("e2esee-");
    m.apply_file(&example("edge-firewall.yaml"));
    let view = m.wait_ready("edge-fw", 2);
    let api = dva_mgmt::api::serve(m.mgmt.clone(), "127.0.0.1:0".parse().unwrap(), TOKEN.into())
        .expect("api");
    let url = format!("http://{}", api.local_addr());
    let cli = Cli { url: url.clone() };
    let http = dva_mgmt::client::Client::new(&url, Some(TOKEN.into())).expect("client");
    let role_of = |id: u32| {
        view.units
            .iter()
            .find(|u| u.id == id)
            .map(|u| u.role)
            .expect("a unit of the appliance")
    };

    // --- dva flows: the open connection, owned by a data plane, with its exact tuple.
    let held = connect(&client);
    let sport = held.local_addr().unwrap().port();
    let sport_s = sport.to_string();
    let listing: FlowsView = serde_json::from_str(&cli.ok(&[
        "flows", "edge-fw", "--port", &sport_s, "--proto", "tcp", "-o", "json",
    ]))
    .expect("flows as JSON");
    assert!(listing.errors.is_empty(), "{listing:?}");
    assert_eq!(
        listing.flows.len(),
        1,
        "one flow on port {sport}: {listing:#?}"
    );
    let f = &listing.flows[0];
    assert_eq!(role_of(f.unit), dva_mgmt::UnitRole::Dataplane, "{f:?}");
    assert_eq!(
        (
            f.proto,
            f.src.to_string(),
            f.src_port,
            f.dst.to_string(),
            f.dst_port
        ),
        (6, CLIENT.to_string(), sport, SERVER.to_string(), PORT)
    );
    assert_eq!(f.state, "established");
    assert!(
        !f.replica && f.orig_packets >= 3 && f.reply_packets >= 2,
        "{f:?}"
    );
    let table = cli.ok(&["flows", "edge-fw", "--src", CLIENT, "-o", "wide"]);
    assert!(
        table.contains(&format!("{CLIENT}:{sport}")) && table.contains("established"),
        "{table}"
    );
    // Filters that select nothing, and filters that make no sense.
    let none: FlowsView = serde_json::from_str(&cli.ok(&[
        "flows",
        "edge-fw",
        "--port",
        &sport_s,
        "--state",
        "time_wait",
        "-o",
        "json",
    ]))
    .unwrap();
    assert!(none.flows.is_empty(), "{none:?}");
    let bad = cli.run(&["flows", "edge-fw", "--state", "open"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("state"));
    let (status, body) = http
        .raw("GET", "/v1/appliances/edge-fw/flows?src=nope", "", b"")
        .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("src"), "{body}");
    let limited: FlowsView = serde_json::from_str(
        &http
            .raw("GET", "/v1/appliances/edge-fw/flows?limit=1", "", b"")
            .unwrap()
            .1,
    )
    .unwrap();
    assert!(limited.flows.len() <= 1);

    // --- dva config: every serving unit's config, keys redacted.
    let mut vni = None;
    for u in &view.units {
        if u.role == dva_mgmt::UnitRole::Manager {
            continue;
        }
        let text = cli.ok(&["config", "edge-fw", &u.id.to_string(), "-o", "json"]);
        let cfg: serde_json::Value = serde_json::from_str(&text).expect("config as JSON");
        assert_eq!(cfg["unit"], u.id, "{text}");
        let keys = cfg["backplane"]["keys"].as_array().expect("keys listed");
        assert!(!keys.is_empty(), "{text}");
        assert!(keys.iter().all(|k| k["key"] == "<redacted>"), "{text}");
        // No 64-digit hex string (a key) anywhere in the dump.
        let hex_run = text
            .split(|c: char| !c.is_ascii_hexdigit())
            .map(str::len)
            .max()
            .unwrap_or(0);
        assert!(hex_run < 64, "a key-sized hex string in {text}");
        vni = cfg["vni"].as_u64().or(vni);
        let yaml = cli.ok(&["config", "edge-fw", &u.id.to_string()]);
        assert!(
            yaml.contains("<redacted>") && yaml.contains("role:"),
            "{yaml}"
        );
    }
    let vni = vni.expect("the configs carry the VNI");

    // --- dva capture on the outside interface: the client's SYN of a new connection.
    let file = std::env::temp_dir().join(format!(
        "dva-e2e-seeing-outside-{}.pcap",
        std::process::id()
    ));
    let file = file.to_str().unwrap().to_string();
    let mut new_port = 0;
    let said = cli.capture_while(
        &[
            "--interface",
            "outside",
            "--duration",
            "5s",
            "tcp",
            "and",
            "port",
            "5201",
        ],
        &file,
        || new_port = connect(&client).local_addr().unwrap().port(),
    );
    eprintln!("outside capture: {said}");
    let syns = tshark(&[
        "-r",
        &file,
        "-Y",
        "tcp.flags.syn==1 && tcp.flags.ack==0",
        "-T",
        "fields",
        "-e",
        "ip.src",
        "-e",
        "tcp.srcport",
        "-e",
        "ip.dst",
        "-e",
        "tcp.dstport",
    ]);
    let want = format!("{CLIENT}\t{new_port}\t{SERVER}\t{PORT}");
    assert!(
        syns.lines().any(|l| l.trim() == want),
        "the SYN {want:?} in the outside capture:\n{syns}\n{}",
        tshark(&["-r", &file])
    );

    // --- dva capture on the backplane: GENEVE datagrams of a new connection.
    let file = file.replace("outside", "backplane");
    backplane_capture(&cli, &client, &file, vni, true);
    drop(held);
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(file.replace("backplane", "outside"));
}

/// Capture a new connection's backplane datagrams into `file` and check them: GENEVE on UDP
/// port 6081 with the appliance's VNI, only that flow's. `rings`: units on one machine talk
/// through rings, in clear; over UDP the packet inside is sealed (tshark cannot read it).
fn backplane_capture(cli: &Cli, client: &str, file: &str, vni: u64, rings: bool) {
    let mut bp_port = 0;
    cli.capture_while(
        &[
            "-i",
            "backplane",
            "--duration",
            "5s",
            "host",
            CLIENT,
            "and",
            "port",
            "5201",
        ],
        file,
        || bp_port = connect(client).local_addr().unwrap().port(),
    );
    let frames = tshark(&[
        "-r",
        file,
        "-d",
        "udp.port==6081,geneve",
        "-Y",
        "geneve",
        "-T",
        "fields",
        // The first occurrence is the outer header: a sealed payload's bytes sometimes happen
        // to parse as a second, nested UDP header, and tshark then lists both ("55063,50190").
        "-E",
        "occurrence=f",
        "-e",
        "udp.srcport",
        "-e",
        "udp.dstport",
        "-e",
        "geneve.vni",
        "-e",
        "tcp.srcport",
        "-e",
        "tcp.dstport",
    ]);
    eprintln!("backplane capture (outer ports, VNI, inner ports):\n{frames}");
    let rows: Vec<Vec<&str>> = frames.lines().map(|l| l.split('\t').collect()).collect();
    assert!(
        !rows.is_empty(),
        "no GENEVE frame:\n{}",
        tshark(&["-r", file])
    );
    for r in &rows {
        assert!(
            r[0] == "6081" || r[1] == "6081",
            "outer UDP port 6081: {r:?}"
        );
        assert_eq!(number(r[2]), Some(vni), "the appliance's VNI: {r:?}");
    }
    // The inner packet is readable where it travelled in clear (rings between units on one
    // machine); sealed UDP datagrams carry it encrypted. Either way it is this flow's.
    // Sealed bytes that happen to parse as TCP are noise, not a packet in clear.
    let inner: Vec<_> = rows
        .iter()
        .filter(|r| rings && r.len() > 4 && !r[3].is_empty())
        .collect();
    if rings {
        assert!(
            !inner.is_empty(),
            "inner packets in clear through the rings: {rows:?}"
        );
    }
    let bp = bp_port.to_string();
    assert!(
        inner
            .iter()
            .all(|r| (r[3] == bp || r[4] == bp) && (r[3] == "5201" || r[4] == "5201")),
        "only the new flow's packets: {rows:?}"
    );
    let _ = std::fs::remove_file(file);
}

/// Over UDP (as between machines) backplane datagrams are sealed: the capture holds them as on
/// the wire, and tshark still reads their GENEVE header and VNI; the filter was applied to the
/// packet inside before sealing (sent) and after opening (received).
#[test]
fn backplane_capture_over_sealed_udp() {
    let _serial = serial();
    let lab = LabGuard::up("e2eseu-", 1, 2);
    let client = lab.lab.client_ns();
    echo_server(&lab.lab.server_ns(1));
    let m = MgmtGuard::open("e2eseu-");
    m.mgmt
        .apply(&example_over_udp("edge-firewall.yaml"))
        .expect("apply");
    let view = m.wait_ready("edge-fw", 2);
    let api = dva_mgmt::api::serve(m.mgmt.clone(), "127.0.0.1:0".parse().unwrap(), TOKEN.into())
        .expect("api");
    let cli = Cli {
        url: format!("http://{}", api.local_addr()),
    };
    let dispatcher = view
        .units
        .iter()
        .find(|u| u.role == dva_mgmt::UnitRole::Dispatcher)
        .expect("a dispatcher");
    let cfg: serde_json::Value = serde_json::from_str(&cli.ok(&[
        "config",
        "edge-fw",
        &dispatcher.id.to_string(),
        "-o",
        "json",
    ]))
    .expect("config");
    let vni = cfg["vni"].as_u64().expect("vni");
    let file = std::env::temp_dir().join(format!("dva-e2e-seeing-udp-{}.pcap", std::process::id()));
    backplane_capture(&cli, &client, file.to_str().unwrap(), vni, false);
}
