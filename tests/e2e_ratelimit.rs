//! End to end: `examples/ratelimited-firewall.yaml` (a rate limit on new connections per source,
//! then the edge firewall) with one data plane. One outside address opens many connections at
//! once: some get through (the burst), the rest are dropped as `ratelimit-exceeded`; meanwhile
//! another outside address connects as usual and a connection opened before the flood keeps
//! working (established traffic is never limited).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::*;
use dva_lab::apps::{self, Nginx};

const SERVER1: &str = "198.18.2.2";
/// A second address on the client host: another source as the limiter sees it.
const OTHER_SOURCE: &str = "198.18.1.3";
/// More than the spec's burst (20) plus what refills while they are opened (10/s).
const FLOOD: usize = 80;

fn server() -> SocketAddr {
    SocketAddr::new(SERVER1.parse().unwrap(), 80)
}

/// One HTTP/1.1 request on `s` (kept alive); the response's first line.
fn get(s: &mut TcpStream) -> std::io::Result<String> {
    s.write_all(b"GET / HTTP/1.1\r\nHost: server1\r\n\r\n")?;
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_string())
}

/// curl from the client host with `source` as the source address.
fn curl_from(ns: &str, source: &str) -> Option<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-s", "--max-time", "3"])
        .args(["--interface", source, &format!("http://{SERVER1}/")])
        .output()
        .expect("curl");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).to_string())
}

#[test]
fn a_flood_of_new_connections_from_one_source_is_limited_and_nobody_else_is() {
    let _serial = serial();
    let lab = LabGuard::up("e2erl-", 1, 1);
    let client = lab.lab.client_ns();
    let server_ns = lab.lab.server_ns(1);
    let _web = Nginx::start(&server_ns, &[80], "hello from server1\n").expect("nginx in server1");
    ip(&[
        "-n",
        &client,
        "addr",
        "add",
        &format!("{OTHER_SOURCE}/24"),
        "dev",
        "eth0",
    ]);

    let app = Running::start("e2erl-", &example("ratelimited-firewall.yaml"), "rl-fw", 1);

    // A connection opened before the flood, kept open across it.
    let mut held = dva_io::netns::in_netns(&client, || {
        TcpStream::connect_timeout(&server(), Duration::from_secs(3))
    })
    .expect("client namespace")
    .expect("a connection before the flood");
    held.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    assert!(get(&mut held).expect("request").starts_with("HTTP/1.1 200"));

    // The flood: all at once, each given less than the kernel's first SYN retransmission (1 s),
    // so a dropped SYN shows as a failed connect.
    let opened = dva_io::netns::in_netns(&client, || {
        let threads: Vec<_> = (0..FLOOD)
            .map(|_| {
                std::thread::spawn(|| {
                    TcpStream::connect_timeout(&server(), Duration::from_millis(800)).is_ok()
                })
            })
            .collect();
        // A panicked thread counts as a failed connect.
        threads
            .into_iter()
            .map(|t| t.join().unwrap_or(false))
            .filter(|ok| *ok)
            .count()
    });
    let opened = opened.expect("client namespace");
    eprintln!("flood: {opened} of {FLOOD} connections opened");
    assert!(
        opened >= 10,
        "the burst (20) should get through, got {opened} of {FLOOD}"
    );
    assert!(
        opened <= FLOOD - 20,
        "the limit should refuse most of the flood, {opened} of {FLOOD} opened"
    );
    wait_stats(&app, "ratelimit-exceeded drops", |s| {
        drops(s, "dataplane", "ratelimit-exceeded") > 0
    });
    let stats = app.unit_stats();
    let limited = counter(&stats, "dataplane", "ratelimit_limited");
    let dropped = drops(&stats, "dataplane", "ratelimit-exceeded");
    eprintln!("limited {limited}, dropped {dropped}");
    assert_eq!(limited, dropped, "every limited flow is a counted drop");

    // Another source right after: its own allowance.
    for i in 0..5 {
        assert_eq!(
            curl_from(&client, OTHER_SOURCE).as_deref(),
            Some("hello from server1\n"),
            "connection {i} from the other source"
        );
    }
    // The connection opened before the flood still works.
    assert!(get(&mut held)
        .expect("request on the held connection")
        .starts_with("HTTP/1.1 200"));

    // And the flooding source gets connections again once its bucket refills.
    assert!(apps::wait_until(
        Duration::from_secs(5),
        Duration::from_millis(200),
        || apps::curl(&client, &format!("http://{SERVER1}/"), 2).is_ok()
    ));
}
