//! End-to-end without the lab: namespaces and veth pairs this test makes itself stand for a
//! real server with two NICs (`out0`, `in0`, the devices `examples/edge-firewall.yaml` names)
//! between a client and a server. `dva run` and `dva serve`, started in that "server" with no
//! other set-up, put the appliance between the NICs: allowed traffic passes, the rest is
//! blocked, and scaling through the API keeps every connection.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use dva_lab::apps::{self, Nginx, StreamServer};

const APP: &str = "nolab-app";
const CLIENT: &str = "nolab-client";
const SERVER: &str = "nolab-server";

/// A `dva` process in the appliance's namespace; its output lines on a channel; stopped
/// (SIGTERM, then SIGKILL) on drop.
struct Dva {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Dva {
    fn start(args: &[&str]) -> Dva {
        let mut child = Command::new("ip")
            .args(["netns", "exec", APP])
            .arg(dva_bin())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dva");
        let (tx, lines) = std::sync::mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send(format!("stderr: {l}"));
            }
        });
        Dva { child, lines }
    }

    fn wait_for(&mut self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return,
                Ok(l) => seen.push(l),
                Err(_) => break,
            }
        }
        panic!(
            "dva did not print {needle:?}; it printed:\n{}",
            seen.join("\n")
        );
    }
}

impl Drop for Dva {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the child we spawned (`ip netns exec` execs dva in place).
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The CLI against the management tool in the appliance's namespace.
fn ctl(server: &str, token: &str, args: &[&str]) -> String {
    ctl_in(APP, server, token, args)
}

fn allowed_passes_and_the_rest_is_blocked() {
    assert_eq!(
        apps::curl(CLIENT, "http://198.18.2.2/", 5).expect("curl through the appliance"),
        "behind a real server's NICs\n"
    );
    assert!(
        apps::curl(CLIENT, "http://198.18.2.2:8080/", 2).is_err(),
        "port 8080 is not allowed from outside: the appliance must drop it"
    );
}

/// Ready data planes in `dva get NAME -o json`, with their hosts.
fn dataplanes(server: &str, token: &str) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(&ctl(server, token, &["get", "edge-fw", "-o", "json"])).expect("json");
    v["units"]
        .as_array()
        .expect("units")
        .iter()
        .filter(|u| u["role"] == "dataplane" && u["state"] == "ready")
        .map(|u| u["host"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn the_appliance_between_a_machines_own_nics_without_a_lab() {
    let _serial = serial();
    let _m = Machines::up([APP, CLIENT, SERVER]);
    let _web = Nginx::start(SERVER, &[80, 8080], "behind a real server's NICs\n").expect("nginx");
    let spec = example("edge-firewall.yaml");
    let spec = spec.to_str().expect("path");

    // 1. `dva run`, foreground, nothing else.
    {
        let mut run = Dva::start(&["run", "-f", spec, "--dataplanes", "2", "--local"]);
        run.wait_for("ready on this machine");
        allowed_passes_and_the_rest_is_blocked();
        // `dva logs` finds the units of this machine's appliance (no lab prefix).
        let out = Command::new(dva_bin())
            .args(["logs", "edge-fw"])
            .output()
            .expect("dva logs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success()
                && text.contains("[dispatcher ")
                && text.contains("[dataplane ")
                // Structured lines: level, and who wrote them.
                && text.contains(" INFO appliance=edge-fw unit=")
                && text.contains("role=dataplane"),
            "dva logs: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // 2. The management tool (`dva serve`) on the same machine, scaling through the API while
    // checked connections run.
    let state = std::env::temp_dir().join(format!("dva-nolab-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let server = "http://127.0.0.1:17080";
    let mut serve = Dva::start(&[
        "serve",
        "--local",
        "--state",
        state.to_str().expect("path"),
        "--listen",
        "127.0.0.1:17080",
        "--no-client-config",
    ]);
    serve.wait_for("listening on");
    let token = std::fs::read_to_string(state.join("token")).expect("token");
    let token = token.trim();
    ctl(server, token, &["apply", "-f", spec]);
    ctl(server, token, &["scale", "edge-fw", "--dataplanes", "2"]);
    let deadline = Instant::now() + Duration::from_secs(40);
    while dataplanes(server, token).len() != 2 {
        assert!(Instant::now() < deadline, "2 data planes never ready");
        std::thread::sleep(Duration::from_millis(250));
    }
    allowed_passes_and_the_rest_is_blocked();

    let checker = StreamServer::start(SERVER, 5201).expect("stream server");
    let dst: SocketAddr = "198.18.2.2:5201".parse().expect("addr");
    let flows = apps::start_streams(CLIENT, dst, 8, Duration::from_secs(14), 50_000);
    std::thread::sleep(Duration::from_secs(2));
    ctl(server, token, &["scale", "edge-fw", "--dataplanes", "3"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let hosts = dataplanes(server, token);
        if hosts.len() == 3 {
            let me = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
            assert!(
                hosts.iter().all(|h| h == me.trim()),
                "units are on this machine: {hosts:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "3 data planes never ready");
        std::thread::sleep(Duration::from_millis(250));
    }
    std::thread::sleep(Duration::from_secs(2));
    ctl(
        server,
        token,
        &[
            "scale",
            "edge-fw",
            "--dataplanes",
            "1",
            "--drain-deadline",
            "3s",
        ],
    );
    let results = flows.join().expect("streams");
    drop(checker);
    let broken: Vec<_> = results.iter().filter(|r| !r.intact()).collect();
    assert!(
        broken.is_empty(),
        "connections broken by scaling 2 -> 3 -> 1: {broken:#?}"
    );
    assert!(results.iter().all(|r| r.received > 0));
    allowed_passes_and_the_rest_is_blocked();
    ctl(server, token, &["delete", "edge-fw"]);
    drop(serve);
    let _ = std::fs::remove_dir_all(&state);
}
