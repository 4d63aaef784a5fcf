//! End to end: TCP window tracking (issue #16). An established connection through `edge-fw`
//! survives a spoofed RST and a data segment far out of its window (dropped by the data plane as
//! `tcp-out-of-window`), and an RST at the exact next sequence number does close it.
//!
//! The spoofer is scapy (`/usr/bin/python3`, Debian `python3-scapy`) in the client's namespace:
//! it watches the server's segments to learn the sequence numbers, then sends what it is told
//! on stdin, one packet per line.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

const SERVER: &str = "198.18.2.2";
const CLIENT: &str = "198.18.1.2";
const PORT: u16 = 80;

/// Learns the client's and server's next sequence numbers from the last segment the server sent
/// (its ACK is the client's next byte, its end the server's next byte), then sends one packet
/// per command.
const SPOOFER: &str = r#"
import sys, time
from scapy.all import AsyncSniffer, IP, TCP, send, conf
conf.verb = 0
client, server, sport, dport = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
last = {}
def seen(p):
    if TCP in p and p[IP].src == server and p[TCP].sport == dport and p[TCP].dport == sport:
        last["seq"] = (p[TCP].seq + len(p[TCP].payload)) & 0xffffffff
        last["ack"] = p[TCP].ack
# No BPF filter: scapy compiles those with tcpdump, which the lab does not need otherwise.
sniffer = AsyncSniffer(prn=seen, store=False)
sniffer.start()
while not sniffer.running:
    time.sleep(0.05)
time.sleep(0.5)
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.strip()
    deadline = time.time() + 2
    while "ack" not in last and time.time() < deadline:
        time.sleep(0.05)
    if "ack" not in last:
        print("unknown", flush=True)
        continue
    cnext, snext = last["ack"], last["seq"]
    ip = IP(src=client, dst=server)
    if cmd == "rst-far":
        send(ip / TCP(sport=sport, dport=dport, flags="R", seq=(cnext + 2**31) & 0xffffffff))
    elif cmd == "data-far":
        send(ip / TCP(sport=sport, dport=dport, flags="PA", seq=(cnext + 2**30) & 0xffffffff, ack=snext) / (b"x" * 100))
    elif cmd == "rst-exact":
        send(ip / TCP(sport=sport, dport=dport, flags="R", seq=cnext))
    print("sent %s %d %d" % (cmd, cnext, snext), flush=True)
sniffer.stop()
"#;

struct Spoofer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Spoofer {
    fn start(ns: &str, sport: u16) -> Spoofer {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "/usr/bin/python3", "-u", "-c", SPOOFER])
            .args([CLIENT, SERVER, &sport.to_string(), &PORT.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("scapy spoofer (needs python3-scapy: .ci/install-deps.sh)");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut s = Spoofer {
            child,
            stdin,
            stdout,
        };
        assert_eq!(s.line(), "ready", "scapy spoofer did not start");
        s
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.stdout.read_line(&mut l).expect("spoofer output");
        l.trim().to_string()
    }

    fn send(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").expect("spoofer input");
        let l = self.line();
        assert!(l.starts_with(&format!("sent {cmd}")), "spoofer: {l:?}");
        eprintln!("spoofer: {l}");
    }
}

impl Drop for Spoofer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An echo server for one connection in the server namespace; reports how the connection ended.
fn echo_server(ns: &str) -> mpsc::Receiver<std::io::ErrorKind> {
    let listener = dva_io::netns::in_netns(ns, || TcpListener::bind((SERVER, PORT)))
        .expect("netns")
        .expect("listen in the server namespace");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        let mut buf = [0u8; 4096];
        let end = loop {
            match s.read(&mut buf) {
                Ok(0) => break std::io::ErrorKind::UnexpectedEof,
                Ok(n) => {
                    if let Err(e) = s.write_all(&buf[..n]) {
                        break e.kind();
                    }
                }
                Err(e) => break e.kind(),
            }
        };
        let _ = tx.send(end);
    });
    rx
}

fn echo(c: &mut TcpStream, what: &[u8]) {
    c.write_all(what).expect("send on the connection");
    let mut back = vec![0u8; what.len()];
    c.read_exact(&mut back)
        .expect("echo back on the connection");
    assert_eq!(back, what);
}

fn out_of_window(app: &Running) -> u64 {
    app.unit_stats()
        .iter()
        .filter(|(_, role, _)| role == "dataplane")
        .map(|(_, _, s)| s.drops.get("tcp-out-of-window").copied().unwrap_or(0))
        .sum()
}

/// Wait until the data planes' stats (published every 100 ms) count `n` out-of-window drops.
fn wait_out_of_window(app: &Running, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while out_of_window(app) < n {
        assert!(
            Instant::now() < deadline,
            "expected {n} tcp-out-of-window drops; stats: {:#?}",
            app.unit_stats()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn spoofed_segments_out_of_window_are_dropped_and_an_exact_rst_closes() {
    let _serial = serial();
    let lab = LabGuard::up("e2ewin-", 1, 2);
    let client = lab.lab.client_ns();
    let server = lab.lab.server_ns(1);
    let ended = echo_server(&server);
    let app = Running::start("e2ewin-", &example("edge-firewall.yaml"), "edge-fw", 1);

    let mut conn = dva_io::netns::in_netns(&client, || {
        TcpStream::connect_timeout(
            &format!("{SERVER}:{PORT}").parse().unwrap(),
            Duration::from_secs(5),
        )
    })
    .expect("netns")
    .expect("connect through the appliance");
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let sport = conn.local_addr().expect("local address").port();
    let mut spoofer = Spoofer::start(&client, sport);
    // Traffic both ways with the sniffer watching: it learns where both sides are.
    echo(&mut conn, b"hello through the appliance");
    std::thread::sleep(Duration::from_millis(300));
    let drops_before = out_of_window(&app);

    // (a) A RST 2^31 away from the next sequence number: a blind guess.
    spoofer.send("rst-far");
    wait_out_of_window(&app, drops_before + 1);
    echo(&mut conn, b"still here after a blind RST");
    std::thread::sleep(Duration::from_millis(300));

    // (b) Data 2^30 beyond the window.
    spoofer.send("data-far");
    wait_out_of_window(&app, drops_before + 2);
    echo(&mut conn, b"still here after data far out of window");
    assert!(
        ended.try_recv().is_err(),
        "the server's connection must still be open"
    );
    std::thread::sleep(Duration::from_millis(300));

    // (c) A RST at exactly the next sequence number: the connection is over.
    spoofer.send("rst-exact");
    let end = ended
        .recv_timeout(Duration::from_secs(5))
        .expect("the server sees the connection end after an exact RST");
    assert_eq!(end, std::io::ErrorKind::ConnectionReset);
    assert_eq!(
        out_of_window(&app),
        drops_before + 2,
        "the exact RST was not dropped"
    );
    drop(spoofer);
}
