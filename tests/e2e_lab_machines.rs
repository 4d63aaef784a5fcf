//! End to end: `dva lab up --machines`, a lab whose hosts are machines (each a private
//! filesystem in a mount namespace of its own and its own agent, `dva serve` on the control
//! host), and `dva lab cut` / `dva lab heal` partitioning one of them, all through the CLI.
//!
//! * `dva lab up --machines` returns with every agent's host `ready`; `dva serve` and the agents
//!   keep their state on their own tmpfs (nothing of it on this machine's filesystem), their
//!   logs and the client file are in `/run/dva-lab/lm-/` (0700, files 0600);
//! * the edge firewall applied on the control host gets ready; the client reaches a server
//!   through it; every unit runs on an agent's host, the dispatcher on the dispatcher host;
//! * `dva lab cut` of a data-plane host running a data plane: within 20 s it is `lost` and its
//!   data planes run elsewhere; traffic passes; `dva lab show` says it is cut; `dva lab heal`:
//!   the host is `ready` again;
//! * `dva lab down`: no namespace of the lab, none of its processes, no mount namespace of its
//!   machines and no log directory left;
//! * `--etcd`: three etcd members and two replicas on the control host; kill -9 of the leading
//!   replica: the other leads, every host ready through it, traffic passes.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use dva_lab::apps::{self, Nginx};
use dva_lab::Lab;

const PREFIX: &str = "lm-";
const CTL: &str = "lm-ctl";
const CLIENT: &str = "lm-client";
const SERVER: &str = "lm-server1";
const DISP: &str = "lm-disp1";
const HOSTS: [&str; 2] = ["lm-host1", "lm-host2"];
const CLIENT_FILE: &str = "/run/dva-lab/lm-/client.json";
const LOG_DIR: &str = "/run/dva-lab/lm-";
const BODY: &str = "behind the lab's machines\n";

/// The lab and everything in it removed on drop, on panic too.
struct LabDown;

impl Drop for LabDown {
    fn drop(&mut self) {
        let _ = Lab::down(PREFIX);
    }
}

/// Run `cmd` to completion within `secs`; killed (and the test failed) otherwise.
fn bounded(mut cmd: Command, secs: u64) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "{shown} did not finish within {secs} s: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

/// `dva ARGS` on this machine (the lab commands); its stdout, the test failed on an error.
fn dva(args: &[&str], secs: u64) -> String {
    let mut c = Command::new(dva_bin());
    c.args(args);
    let out = bounded(c, secs);
    assert!(
        out.status.success(),
        "dva {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The CLI as the user runs it on the control host: server and token from the client file.
fn ctl(args: &[&str]) -> String {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", CTL])
        .arg(dva_bin())
        .args(args)
        .env("DVA_CLIENT_CONFIG", CLIENT_FILE)
        .env_remove("DVA_SERVER")
        .env_remove("DVA_TOKEN");
    let out = bounded(c, 70);
    assert!(
        out.status.success(),
        "dva {} on {CTL}: {}{}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        logs()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ctl(args)).expect("JSON from the CLI")
}

/// The machines' logs (dva serve's and the agents'), for a failure's report.
fn logs() -> String {
    let mut out = String::new();
    for ns in [CTL, DISP, HOSTS[0], HOSTS[1]] {
        let text = std::fs::read_to_string(format!("{LOG_DIR}/{ns}.log")).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        out.push_str(&format!("--- {ns}.log\n"));
        for l in tail.into_iter().rev() {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// Host `name` as `dva get hosts -o json` shows it.
fn host(name: &str) -> serde_json::Value {
    json(&["get", "hosts", "-o", "json"])
        .as_array()
        .and_then(|a| a.iter().find(|h| h["name"] == name).cloned())
        .unwrap_or_default()
}

/// (role, host, state) of every unit of edge-fw.
fn units() -> Vec<(String, String, String)> {
    let v = json(&["get", "edge-fw", "-o", "json"]);
    let field = |u: &serde_json::Value, k: &str| u[k].as_str().unwrap_or("").to_string();
    v["units"]
        .as_array()
        .expect("units")
        .iter()
        .map(|u| (field(u, "role"), field(u, "host"), field(u, "state")))
        .collect()
}

/// Hosts of the ready units of `role`.
fn ready(role: &str) -> Vec<String> {
    units()
        .into_iter()
        .filter(|(r, _, s)| r == role && s == "ready")
        .map(|(_, h, _)| h)
        .collect()
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "{what}: not within {secs} s\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    t0.elapsed()
}

/// A new connection from the client to the server through the appliance, within `secs`.
fn traffic_passes(secs: u64) -> Duration {
    let t0 = Instant::now();
    loop {
        let last = match apps::curl(CLIENT, "http://198.18.2.2/", 2) {
            Ok(body) if body == BODY => return t0.elapsed(),
            Ok(body) => format!("body {body:?}"),
            Err(e) => e.to_string(),
        };
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "no HTTP through the appliance within {secs} s: {last}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every pid in the lab's namespaces.
fn lab_pids() -> Vec<u32> {
    let names = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&names.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
        .flat_map(|ns| {
            let out = Command::new("ip")
                .args(["netns", "pids", ns])
                .output()
                .expect("ip netns pids");
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn mount_ns(pid: &str) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// The mount namespace of every process on the machine.
fn all_mount_namespaces() -> BTreeSet<String> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|pid| mount_ns(&pid))
        .collect()
}

/// `dva lab up --machines` with one server and two data-plane hosts, and `extra` flags: what it
/// printed.
fn lab_up(extra: &[&str]) -> String {
    let mut args = vec!["lab", "up", "--machines"];
    args.extend_from_slice(extra);
    args.extend(["--prefix", PREFIX, "--servers", "1", "--hosts", "2"]);
    dva(&args, 90)
}

#[test]
fn a_lab_of_machines_runs_the_appliance_and_survives_a_cut_host() {
    let _serial = serial();
    let started = Instant::now();
    let _down = LabDown;
    let _ = Lab::down(PREFIX);

    // 1. Up: every agent's host ready when the command returns.
    let up = lab_up(&[]);
    let up_took = started.elapsed();
    for needle in [
        format!("export DVA_CLIENT_CONFIG={CLIENT_FILE}"),
        format!("ip netns exec {CTL} dva get hosts"),
        format!("{DISP} (dispatcher=true)"),
    ] {
        assert!(up.contains(&needle), "{needle:?} missing from:\n{up}");
    }
    let hosts = json(&["get", "hosts", "-o", "json"]);
    let mut names: Vec<&str> = hosts
        .as_array()
        .expect("hosts")
        .iter()
        .filter(|h| h["state"] == "ready")
        .filter_map(|h| h["name"].as_str())
        .collect();
    names.sort();
    assert_eq!(names, [DISP, HOSTS[0], HOSTS[1]], "{hosts}");
    assert_eq!(host(DISP)["labels"]["dispatcher"], "true");

    // Private filesystems: each machine's processes see their own mounts, and nothing of their
    // state is on this machine's filesystem; logs and the client file are only root's.
    let my_mnt = mount_ns("self").expect("own mount namespace");
    let mut machine_mnts = BTreeSet::new();
    for pid in lab_pids() {
        if let Some(m) = mount_ns(&pid.to_string()) {
            assert_ne!(m, my_mnt, "process {pid} of the lab shares this filesystem");
            machine_mnts.insert(m);
        }
    }
    assert_eq!(
        machine_mnts.len(),
        4,
        "a mount namespace per machine (ctl, disp1, host1, host2)"
    );
    for private in ["/var/lib/dva/serve", "/var/lib/dva/agent"] {
        assert!(
            !Path::new(private).exists(),
            "{private} is on this machine's filesystem"
        );
    }
    let mode = |p: &str| {
        std::fs::metadata(p)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0)
    };
    assert_eq!(mode(LOG_DIR), 0o700, "{LOG_DIR}");
    let (serve_log, ca) = (format!("{LOG_DIR}/{CTL}.log"), format!("{LOG_DIR}/ca.pem"));
    for f in [CLIENT_FILE, serve_log.as_str(), ca.as_str()] {
        assert_eq!(mode(f), 0o600, "{f}");
    }

    // 2. The appliance, applied and reached through the machines.
    let web = Nginx::start(SERVER, &[80], BODY).expect("nginx");
    let spec = example("edge-firewall.yaml");
    ctl(&["apply", "-f", spec.to_str().expect("path")]);
    ctl(&["wait", "edge-fw", "--timeout", "60s"]);
    let first = traffic_passes(10);
    let all = units();
    let agents = [DISP, HOSTS[0], HOSTS[1]];
    assert!(
        all.iter().all(|(_, h, _)| agents.contains(&h.as_str())),
        "every unit on an agent's host: {all:?}"
    );
    assert!(
        all.iter()
            .filter(|(r, _, _)| r == "dispatcher")
            .all(|(_, h, _)| h == DISP),
        "the dispatcher on {DISP}: {all:?}"
    );
    let dps = ready("dataplane");
    assert_eq!(dps.len(), 2, "{all:?}");

    // 3. Cut a data-plane host running a data plane (the one without the manager if one is).
    let manager = ready("manager");
    let victim = HOSTS
        .into_iter()
        .filter(|h| dps.iter().any(|d| d == h))
        .min_by_key(|h| manager.iter().any(|m| m == h))
        .expect("a data-plane host with a data plane");
    let other = HOSTS.into_iter().find(|h| *h != victim).expect("other");
    let short = victim.strip_prefix(PREFIX).expect("prefixed");
    dva(&["lab", "cut", short, "--prefix", PREFIX], 10);
    let shown = dva(&["lab", "show", "--prefix", PREFIX], 20);
    assert!(
        shown.contains(&format!("cut: {victim}")),
        "`dva lab show` says {victim} is cut:\n{shown}"
    );
    let replaced = wait_until(
        &format!("{victim} lost, 2 data planes on {other}"),
        20,
        || {
            let dps = ready("dataplane");
            host(victim)["state"] == "lost" && dps.len() == 2 && dps.iter().all(|h| h == other)
        },
    );
    let after_cut = traffic_passes(5);

    // 4. Heal: the host is ready again.
    dva(&["lab", "heal", short, "--prefix", PREFIX], 10);
    let healed = wait_until(&format!("{victim} ready again"), 20, || {
        host(victim)["state"] == "ready"
    });
    assert!(!dva(&["lab", "show", "--prefix", PREFIX], 20).contains("cut:"));
    traffic_passes(5);
    drop(web);

    // 5. Down: nothing of the lab is left.
    let pids = lab_pids();
    assert!(!pids.is_empty(), "the machines' processes");
    dva(&["lab", "down", "--prefix", PREFIX], 30);
    let left = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let left = String::from_utf8_lossy(&left.stdout);
    assert!(
        !left.lines().any(|l| l.starts_with(PREFIX)),
        "namespaces left: {left}"
    );
    let alive: Vec<u32> = pids.into_iter().filter(|p| pid_alive(*p)).collect();
    assert!(alive.is_empty(), "processes of the lab left: {alive:?}");
    let now = all_mount_namespaces();
    let kept: Vec<&String> = machine_mnts.iter().filter(|m| now.contains(*m)).collect();
    assert!(
        kept.is_empty(),
        "mount namespaces of the machines left: {kept:?}"
    );
    assert!(!Path::new(LOG_DIR).exists(), "{LOG_DIR} left");

    println!(
        "lab of machines: up with every host ready in {up_took:?}; first HTTP through it {first:?} \
         after ready; {victim} cut: lost and its data planes on {other} {replaced:?} after the \
         cut, HTTP {after_cut:?} after that; healed: ready {healed:?} after; whole test {:?}",
        started.elapsed()
    );
}

/// The command line of every process in namespace `ns`, by pid.
fn commands_in(ns: &str) -> Vec<(u32, String)> {
    let out = Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .expect("ip netns pids");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .filter_map(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let line = String::from_utf8_lossy(&raw).replace('\0', " ");
            Some((pid, line))
        })
        .collect()
}

/// `dva lab up --machines --etcd`: three etcd members and two `dva serve` replicas on the
/// control host, each process on a filesystem of its own; the appliance applied through the
/// second replica (it forwards to the leader) passes traffic; kill -9 of the leading replica:
/// the second leads, sees every host ready, and traffic passes; `dva lab down` leaves nothing.
#[test]
fn a_lab_of_machines_on_etcd_survives_the_leading_replica() {
    let _serial = serial();
    if !Path::new("/usr/bin/etcd").exists() {
        println!("skipped: no /usr/bin/etcd (Debian: etcd-server)");
        return;
    }
    let started = Instant::now();
    let _down = LabDown;
    let _ = Lab::down(PREFIX);
    let up = lab_up(&["--etcd"]);
    let up_took = started.elapsed();
    assert!(up.contains("etcd: 3 members on lm-ctl's loopback"), "{up}");
    let on_ctl = commands_in(CTL);
    let count = |what: &str| on_ctl.iter().filter(|(_, c)| c.contains(what)).count();
    assert_eq!(
        (count("/etcd --name"), count(" serve --local")),
        (3, 2),
        "{on_ctl:?}"
    );
    let mnts: BTreeSet<String> = on_ctl
        .iter()
        .filter_map(|(pid, _)| mount_ns(&pid.to_string()))
        .collect();
    assert_eq!(
        mnts.len(),
        5,
        "a filesystem of its own for each: {on_ctl:?}"
    );
    let serve2_log = format!("{LOG_DIR}/{CTL}-serve2.log");
    let follows = || {
        std::fs::read_to_string(&serve2_log)
            .unwrap_or_default()
            .contains("following the leader")
    };
    wait_until("the second replica follows", 10, follows);

    // Through the second replica, which forwards to the leader.
    let r2 = "https://198.19.0.10:17081";
    let web = Nginx::start(SERVER, &[80], BODY).expect("nginx");
    let spec = example("edge-firewall.yaml");
    ctl(&["apply", "-f", spec.to_str().expect("path"), "--server", r2]);
    ctl(&["wait", "edge-fw", "--timeout", "60s", "--server", r2]);
    traffic_passes(10);

    // kill -9 of the leading replica: the second leads and sees every host.
    let (leader, _) = on_ctl
        .iter()
        .find(|(_, c)| c.contains("--listen 198.19.0.10:17080"))
        .expect("the first replica");
    let killed = Command::new("kill")
        .args(["-KILL", &leader.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success(), "kill -9 {leader}");
    let t0 = Instant::now();
    wait_until("the second replica leads", 20, || {
        std::fs::read_to_string(&serve2_log)
            .unwrap_or_default()
            .contains("leadership: took over")
    });
    let took_over = t0.elapsed();
    wait_until("every host ready through the second replica", 20, || {
        let v: serde_json::Value =
            serde_json::from_str(&ctl(&["get", "hosts", "-o", "json", "--server", r2]))
                .expect("JSON");
        v.as_array()
            .is_some_and(|a| a.len() == 3 && a.iter().all(|h| h["state"] == "ready"))
    });
    let after = traffic_passes(5);
    drop(web);

    let pids = lab_pids();
    dva(&["lab", "down", "--prefix", PREFIX], 30);
    let alive: Vec<u32> = pids.into_iter().filter(|p| pid_alive(*p)).collect();
    assert!(alive.is_empty(), "processes of the lab left: {alive:?}");
    assert!(!Path::new(LOG_DIR).exists(), "{LOG_DIR} left");
    println!(
        "lab of machines on etcd: up in {up_took:?}; the second replica led {took_over:?} after \
         kill -9 of the first; HTTP {after:?} after every host was ready again; whole test {:?}",
        started.elapsed()
    );
}
