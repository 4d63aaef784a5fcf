//! End to end (issue #16): fragments and path MTU. The `edge-fw` example with its inside link
//! at MTU 1400 (the dispatcher's `in0` and server1's `eth0`): a 3000-byte ping and 4000-byte
//! UDP datagrams cross the appliance fragmented, both ways (reassembled at the dispatcher,
//! fragmented again on the way out); overlapping fragments and a tiny first fragment, forged
//! with scapy towards a port the policy blocks, never reach the server; a TCP upload with DF
//! from the client completes through path MTU discovery (the dispatcher answers its 1500-byte
//! segments with ICMP fragmentation needed, MTU 1400). Needs `python3-scapy`.

mod common;

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use common::*;
use dva_lab::apps;

const CLIENT: &str = "198.18.1.2";
const SERVER1: &str = "198.18.2.2";
/// Debian's scapy imports only under the system interpreter.
const PYTHON: &str = "/usr/bin/python3";

/// Sniffs `eth0` for `secs` seconds; prints `ready`, then per IPv4 packet from the client:
/// `proto frag_offset_bytes dport icmp_type` (dport and type 0 when absent).
const SNIFF: &str = r#"
import sys, time
from scapy.all import AsyncSniffer, IP, TCP, UDP, ICMP
s = AsyncSniffer(iface="eth0", store=True, started_callback=lambda: print("ready", flush=True))
s.start()
time.sleep(float(sys.argv[1]))
for p in s.stop() or []:
    if IP not in p or p[IP].src != "198.18.1.2":
        continue
    ip = p[IP]
    dp = t = 0
    if ip.frag == 0 and TCP in ip:
        dp = ip[TCP].dport
    elif ip.frag == 0 and UDP in ip:
        dp = ip[UDP].dport
    elif ip.frag == 0 and ICMP in ip:
        t = ip[ICMP].type
    print(ip.proto, ip.frag * 8, dp, t, flush=True)
"#;

/// Forged fragments from the client to server1: TCP to 8080 (blocked from outside) hidden in
/// overlapping fragments whose first says port 80, a tiny first fragment (16 bytes, no whole TCP
/// header) for port 8080, and a control: a fragmented echo request that must arrive.
const FORGE: &str = r#"
from scapy.all import Ether, IP, TCP, ICMP, getmacbyip, get_if_hwaddr, sendp, raw, fragment
import time
eth = Ether(src=get_if_hwaddr("eth0"), dst=getmacbyip("198.18.1.1"))
def send(p):
    sendp(eth / p, iface="eth0", verbose=False)
hdr = dict(src="198.18.1.2", dst="198.18.2.2", proto=6)
allowed = raw(TCP(sport=41000, dport=80, flags="S", seq=1) / (b"a" * 32))
blocked = raw(TCP(sport=41000, dport=8080, flags="S", seq=1) / (b"a" * 32))
# Overlap: [0, 24) says port 80; [0, 52) again, saying 8080, then the end.
send(IP(id=101, flags="MF", frag=0, **hdr) / allowed[:24])
send(IP(id=101, flags="MF", frag=0, **hdr) / blocked[:48])
send(IP(id=101, frag=6, **hdr) / blocked[48:])
# Partial overlap: [0, 24) then [16, 52).
send(IP(id=102, flags="MF", frag=0, **hdr) / allowed[:24])
send(IP(id=102, frag=2, **hdr) / blocked[16:])
# Tiny first fragment: 16 bytes of a TCP header to 8080, then the rest.
send(IP(id=103, flags="MF", frag=0, **hdr) / blocked[:16])
send(IP(id=103, frag=2, **hdr) / blocked[16:])
# Control: a fragmented echo request, allowed.
for f in fragment(IP(src="198.18.1.2", dst="198.18.2.2") / ICMP(type=8, id=77) / (b"c" * 2000), fragsize=800):
    send(f)
"#;

/// UDP echo on port 7000, IPv4 and IPv6 (argv: seconds to live).
const UDP_ECHO: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("::", 7000))
s.settimeout(0.5)
print("ready", flush=True)
end = time.time() + float(sys.argv[1])
while time.time() < end:
    try:
        d, a = s.recvfrom(65535)
    except socket.timeout:
        continue
    s.sendto(d, a)
"#;

/// Sends `n` 4000-byte datagrams to argv[1]:7000; prints how many came back whole.
const UDP_CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
ok = 0
for i in range(5):
    d = bytes([i]) * 4000
    s.sendto(d, (sys.argv[1], 7000))
    try:
        r, _ = s.recvfrom(65535)
        ok += r == d
    except socket.timeout:
        pass
print(ok, flush=True)
"#;

/// TCP sink on 5201 (IPv4 and IPv6): reads one connection to EOF, answers with the byte count.
const SINK: &str = r#"
import socket
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", 5201))
s.listen(1)
s.settimeout(30)
print("ready", flush=True)
c, _ = s.accept()
c.settimeout(30)
n = 0
while True:
    d = c.recv(65536)
    if not d:
        break
    n += len(d)
c.sendall(str(n).encode())
c.close()
"#;

/// Uploads 2 MB to argv[1]:5201 (DF: Linux TCP does path MTU discovery); prints the count
/// the sink read.
const UPLOAD: &str = r#"
import socket, sys
c = socket.create_connection((sys.argv[1], 5201), timeout=20)
c.sendall(b"u" * 2000000)
c.shutdown(socket.SHUT_WR)
print(c.recv(64).decode(), flush=True)
"#;

/// A Python child in a namespace that prints `ready` before it serves.
struct Helper {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Helper {
    fn start(ns: &str, script: &str, args: &[&str]) -> Helper {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, PYTHON, "-c", script])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start python");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("helper output");
        assert_eq!(line.trim(), "ready", "helper in {ns} did not start");
        Helper { child, out }
    }

    /// Everything printed after `ready`, once the helper exited.
    fn lines(mut self) -> Vec<String> {
        let lines = (&mut self.out).lines().map_while(Result::ok).collect();
        let _ = self.child.wait();
        lines
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn run(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .expect("run in namespace");
    assert!(
        out.status.success(),
        "{args:?} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn total(stats: &[(u32, String, dva_unit::UnitStats)], name: &str) -> u64 {
    stats
        .iter()
        .filter(|(_, r, _)| r == "dispatcher")
        .map(|(_, _, s)| {
            s.drops.get(name).copied().unwrap_or(0) + s.counters.get(name).copied().unwrap_or(0)
        })
        .sum()
}

#[test]
fn fragments_cross_whole_forgeries_stop_and_pmtud_works() {
    let _serial = serial();
    let probe = Command::new(PYTHON)
        .args(["-c", "import scapy.all"])
        .status()
        .expect("run /usr/bin/python3");
    assert!(
        probe.success(),
        "python3-scapy is missing: run .ci/install-deps.sh"
    );
    let lab = LabGuard::up("frag-", 1, 2);
    let client = lab.lab.client_ns();
    let server = lab.lab.server_ns(1);
    // The inside link at MTU 1400, before the dispatcher reads its interfaces' MTU. The server
    // still advertises a 1460-byte MSS, so the client's segments need path MTU discovery.
    run(
        &lab.lab.dispatcher_ns(1),
        &["ip", "link", "set", "in0", "mtu", "1400"],
    );
    run(&server, &["ip", "link", "set", "eth0", "mtu", "1400"]);
    run(
        &server,
        &[
            "ip",
            "route",
            "replace",
            "default",
            "via",
            "198.18.2.1",
            "dev",
            "eth0",
            "advmss",
            "1460",
        ],
    );
    let app = Running::start("frag-", &example("edge-firewall.yaml"), "edge-fw", 1);
    let server_ip: IpAddr = SERVER1.parse().unwrap();

    // 1. A 3028-byte echo and its reply, fragmented both ways.
    assert!(
        apps::ping(&client, server_ip, 1, 5).unwrap(),
        "a plain ping must pass first"
    );
    let out = Command::new("ip")
        .args([
            "netns", "exec", &client, "ping", "-c", "3", "-W", "2", "-s", "3000", SERVER1,
        ])
        .output()
        .expect("ping");
    assert!(
        out.status.success(),
        "ping -s 3000 through the appliance: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    wait_stats(&app, "reassembly and refragmentation", |s| {
        total(s, "datagrams_reassembled") >= 6 && total(s, "datagrams_fragmented") >= 3
    });

    // 2. 4000-byte UDP datagrams inside -> outside, and their echoes back.
    let echo = Helper::start(&client, UDP_ECHO, &["8"]);
    let ok = run(&server, &[PYTHON, "-c", UDP_CLIENT, CLIENT]);
    assert_eq!(
        ok, "5",
        "4000-byte UDP datagrams echoed through the appliance"
    );
    drop(echo);

    // 3. Forged fragments: nothing of them reaches the server; the control does.
    let sniff = Helper::start(&server, SNIFF, &["4"]);
    let status = Command::new("ip")
        .args(["netns", "exec", &client, PYTHON, "-c", FORGE])
        .status()
        .expect("scapy");
    assert!(status.success(), "scapy forge: {status}");
    let seen = sniff.lines();
    assert!(
        seen.iter().any(|l| l == "1 0 0 8"),
        "the fragmented control echo must reach the server: {seen:?}"
    );
    assert!(
        !seen.iter().any(|l| l.starts_with("6 ")),
        "no forged TCP fragment may reach the server: {seen:?}"
    );
    wait_stats(&app, "fragment drops by reason", |s| {
        total(s, "fragment-overlap") >= 2 && total(s, "fragment-tiny") >= 1
    });

    // 4. A 2 MB upload with DF through the 1400-byte link: path MTU discovery.
    let sink = Helper::start(&server, SINK, &[]);
    let sent = run(&client, &[PYTHON, "-c", UPLOAD, SERVER1]);
    assert_eq!(sent, "2000000", "the upload must complete through PMTUD");
    drop(sink);
    wait_stats(&app, "fragmentation needed sent", |s| {
        total(s, "icmp_too_big_sent") >= 1
    });
}

/// The same through IPv6: routers do not fragment it, so the dispatcher cuts only what it
/// reassembled (to the inside link's 1400 bytes) and answers a 1500-byte packet with Packet Too
/// Big.
#[test]
fn ipv6_fragments_cross_whole_and_pmtud_works() {
    let _serial = serial();
    let lab = LabGuard::up("frag6-", 1, 2);
    let client = lab.lab.client_ns();
    let server = lab.lab.server_ns(1);
    let text = std::fs::read_to_string(example("edge-firewall.yaml"))
        .expect("example")
        .replace("addresses: [198.18.1.1/24]", "addresses: [198.18.1.1/24, 2001:db8:1::1/64]")
        .replace("addresses: [198.18.2.1/24]", "addresses: [198.18.2.1/24, 2001:db8:2::1/64]")
        .replacen(
            "          - name: inside-out",
            "          - name: web-in-v6\n            from: outside\n            dst: 2001:db8:2::/64\n            proto: tcp\n            dport: 5201\n            action: accept\n          - name: ping-in-v6\n            from: outside\n            dst: 2001:db8:2::/64\n            proto: icmpv6\n            icmp_type: echo-request\n            action: accept\n          - name: inside-out",
            1,
        );
    assert!(text.contains("2001:db8:1::1/64") && text.contains("web-in-v6"));
    let spec = std::env::temp_dir().join(format!("frag6-edge-fw-{}.yaml", std::process::id()));
    std::fs::write(&spec, text).expect("write spec");
    run(
        &lab.lab.dispatcher_ns(1),
        &["ip", "link", "set", "in0", "mtu", "1400"],
    );
    run(&server, &["ip", "link", "set", "eth0", "mtu", "1400"]);
    run(
        &server,
        &[
            "ip",
            "-6",
            "route",
            "replace",
            "default",
            "via",
            "2001:db8:2::1",
            "dev",
            "eth0",
            "advmss",
            "1440",
        ],
    );
    let app = Running::start("frag6-", &spec, "edge-fw", 1);
    let _ = std::fs::remove_file(&spec);
    let s6: IpAddr = "2001:db8:2::2".parse().unwrap();
    assert!(
        apps::wait_until(Duration::from_secs(10), Duration::from_millis(300), || {
            apps::ping(&client, s6, 1, 3).unwrap_or(false)
        }),
        "a plain ping6 must pass first"
    );

    // 1. A 3048-byte echo and its reply, fragmented by the hosts, cut again for the inside link.
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &client,
            "ping",
            "-6",
            "-c",
            "3",
            "-W",
            "2",
            "-s",
            "3000",
            "2001:db8:2::2",
        ])
        .output()
        .expect("ping");
    assert!(
        out.status.success(),
        "ping -6 -s 3000 through the appliance: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    wait_stats(&app, "IPv6 reassembly and refragmentation", |s| {
        total(s, "datagrams_reassembled") >= 6 && total(s, "datagrams_fragmented") >= 3
    });

    // 2. 4000-byte UDP datagrams inside -> outside and back.
    let echo = Helper::start(&client, UDP_ECHO, &["8"]);
    let ok = run(&server, &[PYTHON, "-c", UDP_CLIENT, "2001:db8:1::2"]);
    assert_eq!(
        ok, "5",
        "4000-byte UDP/IPv6 datagrams echoed through the appliance"
    );
    drop(echo);

    // 3. A 2 MB upload: 1500-byte packets answered with Packet Too Big (MTU 1400).
    let sink = Helper::start(&server, SINK, &[]);
    let sent = run(&client, &[PYTHON, "-c", UPLOAD, "2001:db8:2::2"]);
    assert_eq!(
        sent, "2000000",
        "the IPv6 upload must complete through PMTUD"
    );
    drop(sink);
    wait_stats(&app, "Packet Too Big sent", |s| {
        total(s, "icmp_too_big_sent") >= 1
    });
}

/// Masqueraded traffic gets path MTU discovery too: with the *outside* link at MTU 1400 and the
/// `nat-gw` example, uploads from an inside host to the outside one (IPv4 and IPv6, DF) leave as
/// 1500-byte packets from the appliance's address; the dispatcher's "fragmentation needed" /
/// "packet too big" about them goes through the flow's data plane, which translates it back to
/// the inside host, and the uploads complete.
#[test]
fn masqueraded_uploads_get_path_mtu_discovery() {
    let _serial = serial();
    let lab = LabGuard::up("fragnat-", 1, 2);
    let client = lab.lab.client_ns();
    let server = lab.lab.server_ns(1);
    run(
        &lab.lab.dispatcher_ns(1),
        &["ip", "link", "set", "out0", "mtu", "1400"],
    );
    run(&client, &["ip", "link", "set", "eth0", "mtu", "1400"]);
    // The outside host still advertises full-size segments, so the inside one needs PMTUD. It
    // sees the masqueraded connections come from the appliance's address, on its own link: the
    // connected routes carry the MSS.
    for (family, net, mss) in [
        ("-4", "198.18.1.0/24", "1460"),
        ("-6", "2001:db8:1::/64", "1440"),
    ] {
        run(
            &client,
            &[
                "ip", family, "route", "replace", net, "dev", "eth0", "advmss", mss,
            ],
        );
    }
    let app = Running::start("fragnat-", &example("nat-gateway.yaml"), "nat-gw", 2);
    let c4: IpAddr = CLIENT.parse().unwrap();
    assert!(
        apps::wait_until(Duration::from_secs(10), Duration::from_millis(300), || {
            apps::ping(&server, c4, 1, 3).unwrap_or(false)
        }),
        "a plain masqueraded ping must pass first"
    );
    for to in [CLIENT, "2001:db8:1::2"] {
        let sink = Helper::start(&client, SINK, &[]);
        let sent = run(&server, &[PYTHON, "-c", UPLOAD, to]);
        assert_eq!(
            sent, "2000000",
            "the masqueraded upload to {to} must complete through PMTUD"
        );
        drop(sink);
    }
    wait_stats(&app, "too-big errors about masqueraded packets", |s| {
        total(s, "icmp_too_big_sent") >= 2
    });
}
