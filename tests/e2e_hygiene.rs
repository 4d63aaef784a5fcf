//! End to end (issue #16): the firewall holds where the kernel holds. From the lab's client,
//! scapy forges what a Linux router would refuse — martian and appliance-owned sources, bad
//! TCP/UDP checksums, IPv4 source routes and broken options, an ICMP error aimed at a host
//! that never sent the packet it quotes — each towards an inside server on a port the policy
//! opens, so the only reason to drop it is the check under test. Sniffers in the server
//! namespaces show none of it arrives, while a clean SYN and a legitimate ICMP error do; the
//! units' drop counters name each reason. Needs `python3-scapy` (`.ci/install-deps.sh`).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use common::*;

const CLIENT: &str = "198.18.1.2";
const SERVER2: &str = "198.18.2.3";
/// Debian's scapy imports only under the system interpreter.
const PYTHON: &str = "/usr/bin/python3";

/// Sniffs `eth0` for `secs` seconds; prints `ready`, then one line per IPv4 packet:
/// `src dst proto sport dport icmp_type icmp_code` (ports and ICMP fields 0 when absent).
const SNIFF: &str = r#"
import sys
from scapy.all import AsyncSniffer, IP, TCP, UDP, ICMP
import time
secs = float(sys.argv[1])
s = AsyncSniffer(iface="eth0", store=True, started_callback=lambda: print("ready", flush=True))
s.start()
time.sleep(secs)
for p in s.stop() or []:
    if IP not in p:
        continue
    ip = p[IP]
    sp = dp = t = c = 0
    if TCP in ip and not ip.frag:
        sp, dp = ip[TCP].sport, ip[TCP].dport
    elif UDP in ip and not ip.frag:
        sp, dp = ip[UDP].sport, ip[UDP].dport
    elif ICMP in ip:
        t, c = ip[ICMP].type, ip[ICMP].code
    print(ip.src, ip.dst, ip.proto, sp, dp, t, c, flush=True)
"#;

/// Sends the forged packets from the client (argv: phase). Every TCP probe goes to server1's
/// port 80 (open to the outside) with its own source port, so a capture names the case.
const FORGE: &str = r#"
import sys
from scapy.all import Ether, IP, TCP, UDP, ICMP, IPerror, UDPerror, IPOption_LSRR, getmacbyip, get_if_hwaddr, sendp, raw
import struct
CLIENT, SERVER1, SERVER2, GW = "198.18.1.2", "198.18.2.2", "198.18.2.3", "198.18.1.1"
eth = Ether(src=get_if_hwaddr("eth0"), dst=getmacbyip(GW))
def send(pkt):
    sendp(eth / pkt, iface="eth0", verbose=False)
def syn(sport, src=CLIENT, **kw):
    return IP(src=src, dst=SERVER1, **kw) / TCP(sport=sport, dport=80, flags="S", seq=1)
def ip_checksum(h):
    s = sum(struct.unpack("!%dH" % (len(h) // 2), h))
    s = (s & 0xffff) + (s >> 16)
    s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff
phase = sys.argv[1]
if phase == "probes":
    # The control: a clean SYN must arrive.
    send(syn(40000))
    for i, src in enumerate(["127.0.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255", "240.0.0.9"]):
        send(syn(40001 + i, src=src))
    send(syn(40011, src="198.18.1.1"))
    send(syn(40012, src="198.18.2.1"))
    send(IP(src=CLIENT, dst=SERVER1) / TCP(sport=40021, dport=80, flags="S", seq=1, chksum=0xdead))
    send(IP(src=CLIENT, dst=SERVER1) / UDP(sport=40022, dport=5201, chksum=0xbeef) / b"dva")
    send(syn(40031, options=[IPOption_LSRR(routers=[SERVER1])]))
    # Record route whose length byte (9) runs past the 4 option bytes.
    b = bytearray(raw(IP(src=CLIENT, dst=SERVER1, ihl=6, options=b"\x01\x01\x01\x01") / TCP(sport=40032, dport=80, flags="S", seq=1)))
    b[20:24] = b"\x07\x09\x04\x00"
    b[10:12] = b"\x00\x00"
    b[10:12] = struct.pack("!H", ip_checksum(bytes(b[:24])))
    send(IP(bytes(b)))
elif phase == "errors":
    quote = IPerror(src=SERVER2, dst=CLIENT, proto=17) / UDPerror(sport=5555, dport=9999)
    # About server2's datagram, aimed at server1: must not arrive.
    send(IP(src=CLIENT, dst=SERVER1) / ICMP(type=3, code=3) / quote)
    # The same, to server2 that sent it (fragmentation needed, MTU 1300): must arrive.
    send(IP(src=CLIENT, dst=SERVER2) / ICMP(type=3, code=4, nexthopmtu=1300) / quote)
"#;

struct Sniffer {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Sniffer {
    fn start(ns: &str, secs: u32) -> Sniffer {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, PYTHON, "-c", SNIFF, &secs.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start scapy sniffer");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("sniffer output");
        assert_eq!(line.trim(), "ready", "scapy sniffer in {ns} did not start");
        Sniffer { child, out }
    }

    /// The packets seen, once the capture window closed.
    fn packets(mut self) -> Vec<Vec<String>> {
        let lines: Vec<Vec<String>> = (&mut self.out)
            .lines()
            .map_while(Result::ok)
            .map(|l| l.split_whitespace().map(str::to_string).collect())
            .collect();
        let status = self.child.wait().expect("sniffer exit");
        assert!(status.success(), "sniffer failed: {status}");
        lines
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        // Kill only if still running (a panic before `packets`).
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn forge(ns: &str, phase: &str) {
    let status = Command::new("ip")
        .args(["netns", "exec", ns, PYTHON, "-c", FORGE, phase])
        .status()
        .expect("run scapy");
    assert!(status.success(), "scapy {phase} in {ns}: {status}");
}

#[test]
fn forged_and_martian_packets_stop_at_the_appliance() {
    let _serial = serial();
    let probe = Command::new(PYTHON)
        .args(["-c", "import scapy.all"])
        .status()
        .expect("run /usr/bin/python3");
    assert!(
        probe.success(),
        "python3-scapy is missing: run .ci/install-deps.sh"
    );
    let lab = LabGuard::up("hyg-", 2, 2);
    let client = lab.lab.client_ns();
    let (server1, server2) = (lab.lab.server_ns(1), lab.lab.server_ns(2));
    let app = Running::start("hyg-", &example("edge-firewall.yaml"), "edge-fw", 1);

    // 1. Ingress hygiene at the dispatcher.
    let sniff = Sniffer::start(&server1, 4);
    forge(&client, "probes");
    let seen = sniff.packets();
    let from_client_probe = |sport: u16| {
        seen.iter()
            .any(|p| p.len() == 7 && p[2] == "6" && p[3] == sport.to_string() && p[4] == "80")
    };
    assert!(
        from_client_probe(40000),
        "the clean SYN must reach server1 (is the capture working?): {seen:?}"
    );
    for sport in [
        40001, 40002, 40003, 40004, 40005, 40011, 40012, 40021, 40031, 40032,
    ] {
        assert!(
            !from_client_probe(sport),
            "probe with source port {sport} must not reach server1: {seen:?}"
        );
    }
    assert!(
        !seen.iter().any(|p| p.len() == 7 && p[3] == "40022"),
        "UDP with a bad checksum must not reach server1: {seen:?}"
    );
    wait_stats(&app, "hygiene drops by reason", |s| {
        let d = |r: &str| drops(s, "dispatcher", r);
        d("martian-source") >= 5
            && d("own-address-source") >= 2
            && d("bad-l4-checksum") >= 2
            && d("ip-source-route") >= 1
            && d("malformed-ip-options") >= 1
    });

    // 2. ICMP errors: related only towards the host that sent the quoted packet. Server2
    // opens a UDP flow to the client (inside -> outside: allowed, tracked).
    let status = Command::new("ip")
        .args([
            "netns",
            "exec",
            &server2,
            PYTHON,
            "-c",
            "from scapy.all import IP, UDP, send\n\
             send(IP(src='198.18.2.3', dst='198.18.1.2') / UDP(sport=5555, dport=9999) / b'x', verbose=False)",
        ])
        .status()
        .expect("scapy in server2");
    assert!(status.success());
    std::thread::sleep(Duration::from_millis(300));
    let sniff1 = Sniffer::start(&server1, 4);
    let sniff2 = Sniffer::start(&server2, 4);
    forge(&client, "errors");
    let (seen1, seen2) = (sniff1.packets(), sniff2.packets());
    let icmp = |seen: &[Vec<String>], dst: &str, code: &str| {
        seen.iter().any(|p| {
            p.len() == 7
                && p[0] == CLIENT
                && p[1] == dst
                && p[2] == "1"
                && p[5] == "3"
                && p[6] == code
        })
    };
    assert!(
        icmp(&seen2, SERVER2, "4"),
        "fragmentation needed about server2's own packet must reach server2: {seen2:?}"
    );
    assert!(
        !seen1.iter().any(|p| p.len() == 7 && p[2] == "1"),
        "an error about server2's packet must not reach server1: {seen1:?}"
    );
    wait_stats(&app, "icmp-error-unrelated drop", |s| {
        drops(s, "dataplane", "icmp-error-unrelated") >= 1
    });
}
