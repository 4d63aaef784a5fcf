//! The lab for real: namespaces, veth, bridges, nginx, iperf3, curl and ping. Needs root.
//! Every test builds its own lab under its own prefix and removes it on drop, also on panic.

use std::net::IpAddr;
use std::process::Command;

use dva_lab::apps::{self, Iperf3Server, Nginx};
use dva_lab::{netns_command, Lab, LabError, LabSpec};

/// A lab removed on drop; the prefix carries the test process id so parallel runs never meet.
struct LabGuard {
    lab: Lab,
}

impl LabGuard {
    fn up(tag: &str, servers: usize, hosts: usize) -> LabGuard {
        let lab = Lab::up(&spec(tag, servers, hosts))
            .expect("lab up (are we root, are the lab's packages installed?)");
        LabGuard { lab }
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        let _ = Lab::down(&self.lab.prefix);
    }
}

fn prefix(tag: &str) -> String {
    format!("lt{}{tag}-", std::process::id())
}

fn spec(tag: &str, servers: usize, hosts: usize) -> LabSpec {
    LabSpec {
        prefix: prefix(tag),
        servers,
        hosts,
        dispatchers: 1,
        control: false,
    }
}

fn all_namespaces() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

fn namespaces_of(prefix: &str) -> Vec<String> {
    all_namespaces()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// `cmd` inside `ns`, its stdout.
fn in_ns(ns: &str, program: &str, args: &[&str]) -> String {
    let out = netns_command(ns, program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn up_is_idempotent_discoverable_and_down_leaves_nothing() {
    let g = LabGuard::up("a", 2, 1);
    let p = g.lab.prefix.clone();
    let mut names = namespaces_of(&p);
    names.sort();
    let mut want = g.lab.namespaces();
    want.sort();
    assert_eq!(names, want);

    // Same shape: the same lab comes back untouched (the client's interface keeps its index).
    let ifindex = in_ns(&g.lab.client_ns(), "cat", &["/sys/class/net/eth0/ifindex"]);
    assert_eq!(Lab::up(&spec("a", 2, 1)).unwrap(), g.lab);
    assert_eq!(
        in_ns(&g.lab.client_ns(), "cat", &["/sys/class/net/eth0/ifindex"]),
        ifindex
    );
    assert_eq!(Lab::discover(&p).unwrap(), Some(g.lab.clone()));

    // The kernel-router addresses are not part of the lab: up removes them.
    g.lab.set_kernel_router(true).unwrap();
    Lab::up(&spec("a", 2, 1)).unwrap();
    let out0 = in_ns(
        &g.lab.dispatcher_ns(1),
        "ip",
        &["-4", "-o", "addr", "show", "dev", "out0"],
    );
    assert!(out0.trim().is_empty(), "out0 still has {out0}");

    // Another shape: rebuilt.
    let bigger = Lab::up(&spec("a", 3, 2)).unwrap();
    assert_eq!(Lab::discover(&p).unwrap(), Some(bigger.clone()));
    assert_eq!(namespaces_of(&p).len(), bigger.namespaces().len());

    // A namespace that belongs to no lab plan (an extra server) is removed by a rebuild too.
    Command::new("ip")
        .args(["netns", "add", &format!("{p}server9")])
        .status()
        .unwrap();
    Lab::up(&spec("a", 3, 2)).unwrap();
    assert!(!namespaces_of(&p).contains(&format!("{p}server9")));

    // A process still running in the lab does not keep its namespace alive.
    let mut sleeper = netns_command(&bigger.host_ns(2), "sleep")
        .arg("60")
        .spawn()
        .unwrap();
    Lab::down(&p).unwrap();
    let status = sleeper.wait().unwrap();
    assert!(!status.success(), "the sleeper was killed");
    Lab::down(&p).unwrap();
    assert!(
        namespaces_of(&p).is_empty(),
        "left behind: {:?}",
        namespaces_of(&p)
    );
    assert_eq!(Lab::discover(&p).unwrap(), None);
}

#[test]
fn topology_matches_the_plan() {
    let g = LabGuard::up("t", 2, 1);
    let lab = &g.lab;
    let disp = lab.dispatcher_ns(1);

    // The dispatcher host's kernel has no say on the appliance's segments.
    for dev in ["out0", "in0"] {
        let addrs = in_ns(&disp, "ip", &["-o", "addr", "show", "dev", dev]);
        assert!(addrs.trim().is_empty(), "{dev} has addresses: {addrs}");
        assert_eq!(
            in_ns(
                &disp,
                "cat",
                &[&format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6")]
            )
            .trim(),
            "1"
        );
    }
    for ns in lab.namespaces() {
        assert_eq!(
            in_ns(&ns, "cat", &["/proc/sys/net/ipv4/ip_forward"]).trim(),
            "0",
            "{ns}"
        );
        assert!(
            in_ns(&ns, "ip", &["-o", "link", "show", "lo"]).contains("UP"),
            "lo in {ns}"
        );
    }
    assert!(
        in_ns(&disp, "ip", &["-4", "route", "show", "default"])
            .trim()
            .is_empty(),
        "no default route on disp1"
    );
    assert!(
        in_ns(&lab.client_ns(), "ip", &["-4", "route", "show", "default"])
            .contains("via 198.18.1.1")
    );
    assert!(
        in_ns(&lab.server_ns(1), "ip", &["-6", "route", "show", "default"])
            .contains("via 2001:db8:2::1")
    );
    assert!(in_ns(
        &lab.server_ns(1),
        "ip",
        &["-6", "addr", "show", "dev", "eth0"]
    )
    .contains("2001:db8:2::2/64"));

    // MTU: 9000 on the backplane, 1500 elsewhere.
    assert!(in_ns(&lab.host_ns(1), "ip", &["link", "show", "bp0"]).contains("mtu 9000"));
    assert!(in_ns(&lab.fabric_ns(), "ip", &["link", "show", "br-bp"]).contains("mtu 9000"));
    assert!(in_ns(&lab.client_ns(), "ip", &["link", "show", "eth0"]).contains("mtu 1500"));

    // Offloads off on both ends of a veth, RX checksum left on.
    for (ns, dev) in [
        (lab.client_ns(), "eth0"),
        (lab.fabric_ns(), "b-host1"),
        (disp.clone(), "out0"),
    ] {
        let k = in_ns(&ns, "ethtool", &["-k", dev]);
        for line in [
            "tcp-segmentation-offload: off",
            "generic-segmentation-offload: off",
            "generic-receive-offload: off",
            "tx-checksumming: off",
            "rx-checksumming: on",
        ] {
            assert!(k.contains(line), "{dev} in {ns}: no {line:?}");
        }
    }

    // Nothing of the lab shows up in the root namespace.
    let root = Command::new("ip").args(["-o", "link"]).output().unwrap();
    let root = String::from_utf8_lossy(&root.stdout);
    for name in ["c-client", "s-server1", "o-disp1", "b-host1", "br-bp"] {
        assert!(
            !root.contains(&format!(": {name}")),
            "{name} in the root namespace"
        );
    }

    // The backplane and the inside are L2 segments: hosts on them reach each other directly,
    // over IPv4 and (inside) IPv6, with nothing routing.
    assert!(apps::ping(
        &lab.host_ns(1),
        IpAddr::V4(Lab::dispatcher_backplane_addr(1)),
        1,
        2
    )
    .unwrap());
    assert!(apps::ping(&lab.server_ns(1), ip("2001:db8:2::3"), 1, 2).unwrap());
    assert!(apps::ping(&lab.server_ns(1), IpAddr::V4(Lab::server_addr(2)), 1, 2).unwrap());
    // Reachable but nothing listens: refused, promptly.
    let t0 = std::time::Instant::now();
    assert!(!apps::tcp_connect(&lab.server_ns(1), ip("2001:db8:2::3"), 80, 2).unwrap());
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(2),
        "refusal is not a timeout"
    );

    let text = lab.describe();
    assert!(
        text.contains(&lab.client_ns()) && text.contains("198.19.0.11/24"),
        "{text}"
    );
}

#[test]
fn kernel_router_carries_ping_http_and_iperf3() {
    let g = LabGuard::up("k", 1, 1);
    let lab = &g.lab;
    let client = lab.client_ns();
    let server = lab.server_ns(1);
    let s1 = IpAddr::V4(Lab::server_addr(1));
    let web = Nginx::start(&server, &[80, 8080], "hello from server1\n").unwrap();
    let _iperf = Iperf3Server::start(&server, 5201).unwrap();
    assert_eq!(web.ports(), [80, 8080]);

    lab.set_kernel_router(true).unwrap();
    lab.set_kernel_router(true).unwrap(); // idempotent

    assert!(
        apps::ping(&client, s1, 2, 5).unwrap(),
        "ping client -> server1 through the kernel router"
    );
    assert_eq!(
        apps::curl(&client, &format!("http://{s1}/"), 5).unwrap(),
        "hello from server1\n"
    );
    assert_eq!(
        apps::curl(&client, &format!("http://{s1}:8080/"), 5).unwrap(),
        "hello from server1\n"
    );
    let big = Command::new("ip")
        .args([
            "netns",
            "exec",
            &client,
            "curl",
            "-sS",
            "--noproxy",
            "*",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
        ])
        .arg(format!("http://{s1}/big"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&big.stdout),
        (100u64 << 20).to_string()
    );

    // Connected, refused and HTTP error are told apart.
    assert!(apps::tcp_connect(&client, s1, 80, 2).unwrap());
    assert!(
        !apps::tcp_connect(&client, s1, 81, 2).unwrap(),
        "nothing listens on 81: refused"
    );
    match apps::curl(&client, &format!("http://{s1}/missing"), 5) {
        Err(LabError::Curl {
            code: Some(22),
            stderr,
            ..
        }) => assert!(stderr.contains("404"), "{stderr}"),
        other => panic!("want curl exit 22 for a 404, got {other:?}"),
    }

    let r = apps::iperf3_client(&client, s1, 5201, 2, 1, false, None).unwrap();
    assert!(r.received_bps > 1e6 && r.received_bytes > 0, "{r:?}");
    eprintln!(
        "iperf3 through the kernel router: {:.2} Gbit/s, {} retransmits",
        r.received_bps / 1e9,
        r.retransmits
    );

    lab.set_kernel_router(false).unwrap();
    assert!(
        !apps::ping(&client, s1, 1, 1).unwrap(),
        "no router, no reply"
    );
    assert!(
        !apps::tcp_connect(&client, s1, 80, 1).unwrap(),
        "no router: timed out"
    );
    assert!(matches!(
        apps::curl(&client, &format!("http://{s1}/"), 1),
        Err(LabError::Curl { .. })
    ));
    // Inside the server's own namespace nginx is still there.
    assert!(apps::tcp_connect(&server, ip("127.0.0.1"), 8080, 1).unwrap());
}

#[test]
fn two_labs_coexist() {
    let a = LabGuard::up("x", 1, 1);
    let b = LabGuard::up("y", 1, 1);
    let s1 = IpAddr::V4(Lab::server_addr(1));
    let _wa = Nginx::start(&a.lab.server_ns(1), &[80], "lab a\n").unwrap();
    let _wb = Nginx::start(&b.lab.server_ns(1), &[80], "lab b\n").unwrap();
    a.lab.set_kernel_router(true).unwrap();
    b.lab.set_kernel_router(true).unwrap();
    // Same addresses, separate worlds.
    assert_eq!(
        apps::curl(&a.lab.client_ns(), &format!("http://{s1}/"), 5).unwrap(),
        "lab a\n"
    );
    assert_eq!(
        apps::curl(&b.lab.client_ns(), &format!("http://{s1}/"), 5).unwrap(),
        "lab b\n"
    );
    // Removing one leaves the other working.
    Lab::down(&a.lab.prefix).unwrap();
    assert!(namespaces_of(&a.lab.prefix).is_empty());
    assert_eq!(
        apps::curl(&b.lab.client_ns(), &format!("http://{s1}/"), 5).unwrap(),
        "lab b\n"
    );
    assert_eq!(
        Lab::discover(&b.lab.prefix).unwrap().map(|l| l.servers),
        Some(1)
    );
}

#[test]
fn apps_report_failures_clearly() {
    let g = LabGuard::up("f", 1, 0);
    let server = g.lab.server_ns(1);
    let lo = ip("127.0.0.1");

    // iperf3 with no server: iperf3's own reason.
    match apps::iperf3_client(&server, lo, 5299, 1, 1, false, None) {
        Err(LabError::Iperf3 { message, .. }) => {
            assert!(message.contains("Connection refused"), "{message}")
        }
        other => panic!("want an iperf3 error, got {other:?}"),
    }
    // A port taken by another server: nginx's own reason, and nothing left running.
    let first = Nginx::start(&server, &[8000], "one\n").unwrap();
    match Nginx::start(&server, &[8000], "two\n") {
        Err(LabError::Exited { log, .. }) => {
            assert!(log.contains("Address already in use"), "{log}")
        }
        other => panic!("want nginx to fail on a taken port, got {other:?}"),
    }
    let dir = first.dir().to_path_buf();
    assert!(dir.join("nginx.conf").exists());
    drop(first);
    assert!(!dir.exists(), "temp dir removed on drop");
    assert!(
        !apps::tcp_connect(&server, lo, 8000, 1).unwrap(),
        "nginx killed on drop"
    );

    // Namespaces that do not exist are errors, not "no".
    assert!(apps::ping("no-such-ns", lo, 1, 1).is_err());
    assert!(apps::tcp_connect("no-such-ns", lo, 80, 1).is_err());
    assert!(matches!(
        apps::curl("no-such-ns", "http://127.0.0.1/", 1),
        Err(LabError::Curl { .. })
    ));
    assert!(Nginx::start("no-such-ns", &[80], "x").is_err());

    // Bad prefixes never reach `ip`.
    assert!(matches!(Lab::down(""), Err(LabError::InvalidPrefix { .. })));
    assert!(matches!(
        Lab::up(&LabSpec {
            prefix: "-x".into(),
            servers: 1,
            hosts: 1,
            dispatchers: 1,
            control: false,
        }),
        Err(LabError::InvalidPrefix { .. })
    ));
    assert!(matches!(
        Lab::discover("a b"),
        Err(LabError::InvalidPrefix { .. })
    ));
}
