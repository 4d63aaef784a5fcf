//! End to end: `dva serve`'s `/metrics` (issue #15). An edge firewall in a lab carries real
//! traffic (curl through it, and connections its rules drop); the aggregated exposition, scraped
//! over HTTP with the bearer token as Prometheus would, passes `promtool check metrics`, has each
//! family once, and counts what the traffic did. The inside device has a name the spec accepts
//! but the exposition must escape (a quote and a backslash).
//!
//! The latency histograms are there with real observations: config pushes ACKed by both roles
//! and the first table switch once the appliance is up, API answers by route template, and
//! after a scale-in that hands open connections over, the bucket handovers on the data plane
//! that stays.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use dva_lab::apps::{self, Nginx, StreamServer};

const SERVER1: &str = "198.18.2.2";
/// A port the edge firewall's `web-in` rule lets in besides nginx's 80: long-lived streams.
const STREAM_PORT: u16 = 5201;
/// A device name the kernel and the spec accept (no '/', ':', whitespace or control characters)
/// holding both characters a Prometheus label value must escape.
const HOSTILE_DEVICE: &str = r#"i"n\0"#;

/// The value of the first sample of `family` whose labels contain every one of `labels`.
fn value(text: &str, family: &str, labels: &[&str]) -> Option<f64> {
    samples(text, family, labels).next()
}

/// The sum over the samples of `family` whose labels contain every one of `labels`.
fn sum(text: &str, family: &str, labels: &[&str]) -> f64 {
    samples(text, family, labels).sum()
}

fn samples<'a>(
    text: &'a str,
    family: &'a str,
    labels: &'a [&'a str],
) -> impl Iterator<Item = f64> + 'a {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(move |l| {
            let (name_labels, v) = l.rsplit_once(' ')?;
            let name = name_labels.split('{').next()?;
            (name == family && labels.iter().all(|want| name_labels.contains(want)))
                .then(|| v.parse().ok())
                .flatten()
        })
}

fn promtool_check(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; .ci/install-deps.sh installs it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feeding promtool");
    let out = child.wait_with_output().expect("promtool output");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn serve_exposes_every_units_metrics_once_and_promtool_accepts_them() {
    let _serial = serial();
    let lab = LabGuard::up("e2emt-", 1, 2);
    let client = lab.lab.client_ns();
    let _web = Nginx::start(&lab.lab.server_ns(1), &[80], "counted\n").expect("nginx");
    let disp = lab.lab.dispatcher_ns(1);
    for args in [
        vec!["-n", &disp, "link", "set", "in0", "down"],
        vec!["-n", &disp, "link", "set", "in0", "name", HOSTILE_DEVICE],
        vec!["-n", &disp, "link", "set", HOSTILE_DEVICE, "up"],
    ] {
        let st = Command::new("ip").args(&args).status().expect("ip");
        assert!(st.success(), "ip {args:?}");
    }
    let spec = std::fs::read_to_string(example("edge-firewall.yaml"))
        .expect("spec")
        .replace("device: in0", &format!("device: '{HOSTILE_DEVICE}'"));
    assert!(spec.contains(HOSTILE_DEVICE));
    let m = MgmtGuard::open("e2emt-");
    m.mgmt
        .apply(&spec)
        .expect("the spec accepts the device name");
    m.wait_ready("edge-fw", 2);

    let token = "e2e-metrics-token-0123456789abcdef";
    let api = dva_mgmt::api::serve(m.mgmt.clone(), "127.0.0.1:0".parse().unwrap(), token.into())
        .expect("api");
    let url = format!("http://{}", api.local_addr());
    let anonymous = dva_mgmt::client::Client::new(&url, None).expect("client");
    let prometheus = dva_mgmt::client::Client::new(&url, Some(token.into())).expect("client");
    assert_eq!(
        anonymous.raw("GET", "/metrics", "", b"").expect("scrape").0,
        401,
        "/metrics needs the bearer token like the rest of the API"
    );

    // Traffic the firewall passes, and some it drops (port 81 is not open from outside).
    for _ in 0..5 {
        let body = apps::curl(&client, &format!("http://{SERVER1}/"), 3).expect("curl through");
        assert_eq!(body, "counted\n");
    }
    for _ in 0..3 {
        assert!(apps::curl(&client, &format!("http://{SERVER1}:81/"), 1).is_err());
    }

    // Units publish their stats periodically: scrape until the traffic shows.
    let mut text = String::new();
    let counted = apps::wait_until(Duration::from_secs(15), Duration::from_millis(300), || {
        let (status, body) = prometheus.raw("GET", "/metrics", "", b"").expect("scrape");
        assert_eq!(status, 200, "{body}");
        text = body;
        // Each connection is counted once, by the data plane that owns it.
        sum(&text, "dva_firewall_rule_hits_total", &["rule=\"web-in\""]) >= 5.0
            && sum(
                &text,
                "dva_drops_total",
                &["reason=\"firewall-default-policy\""],
            ) > 0.0
    });
    assert!(counted, "traffic not counted in time:\n{text}");

    let (ok, report) = promtool_check(&text);
    assert!(ok, "promtool check metrics: {report}\n---\n{text}");

    // One HELP and one TYPE per family, whatever the number of units.
    let mut seen = HashSet::new();
    for l in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        assert!(seen.insert(l.to_string()), "typed twice: {l}\n{text}");
    }
    let mut help = HashSet::new();
    for l in text.lines().filter(|l| l.starts_with("# HELP ")) {
        let name = l.split_whitespace().nth(2).unwrap_or_default();
        assert!(help.insert(name.to_string()), "HELP twice: {l}");
    }
    for (family, kind) in [
        ("dva_rx_packets_total", "counter"),
        ("dva_interface_rx_packets_total", "counter"),
        ("dva_interface_rx_bytes_total", "counter"),
        ("dva_drops_total", "counter"),
        ("dva_flows", "gauge"),
        ("dva_backplane_auth_total", "counter"),
        ("dva_firewall_rule_hits_total", "counter"),
        ("dva_build_info", "gauge"),
        ("process_cpu_seconds_total", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("dva_mgmt_units", "gauge"),
        ("dva_mgmt_api_requests_total", "counter"),
        ("dva_config_ack_seconds", "histogram"),
        ("dva_table_switch_seconds", "histogram"),
        ("dva_handover_seconds", "histogram"),
        ("dva_mgmt_api_request_seconds", "histogram"),
    ] {
        assert!(
            seen.contains(&format!("# TYPE {family} {kind}")),
            "no {kind} {family}:\n{text}"
        );
    }

    let app = "appliance=\"edge-fw\"";
    let dispatcher = "role=\"dispatcher\"";
    assert!(
        value(
            &text,
            "dva_interface_rx_packets_total",
            &[app, dispatcher, "interface=\"outside\""]
        )
        .unwrap_or(0.0)
            > 0.0,
        "the dispatcher counted frames on the outside interface:\n{text}"
    );
    assert!(value(&text, "dva_rx_packets_total", &[app, dispatcher]).unwrap_or(0.0) > 0.0);
    assert!(
        value(
            &text,
            "dva_interface_rx_packets_total",
            &[app, dispatcher, r#"device="i\"n\\0""#]
        )
        .unwrap_or(0.0)
            > 0.0,
        "the hostile device name, escaped, on a counting interface:\n{text}"
    );
    // On one machine data travels over shared-memory rings, so the (UDP) authentication counts
    // may well be 0; every backplane user reports them all the same.
    for role in ["dispatcher", "dataplane"] {
        assert!(
            value(
                &text,
                "dva_backplane_auth_total",
                &[app, &format!("role=\"{role}\""), "result=\"ok\""]
            )
            .is_some(),
            "{role}: backplane authentication counted:\n{text}"
        );
    }
    // Drops carry their reason; a dispatcher reports no flow count of its own.
    assert!(
        text.lines()
            .any(|l| l.starts_with("dva_drops_total{") && l.contains("reason=\"")),
        "{text}"
    );
    assert!(!text
        .lines()
        .any(|l| l.starts_with("dva_flows{") && l.contains(dispatcher)));
    for role in ["manager", "dispatcher", "dataplane"] {
        let up = value(
            &text,
            "dva_unit_scrape_up",
            &[app, &format!("role=\"{role}\"")],
        );
        assert_eq!(up, Some(1.0), "{role} answered the scrape:\n{text}");
    }
    assert_eq!(
        value(
            &text,
            "dva_mgmt_units",
            &[app, "role=\"dataplane\"", "state=\"ready\""]
        ),
        Some(2.0)
    );
    assert!(
        value(&text, "dva_mgmt_api_requests_total", &["code=\"401\""]).unwrap_or(0.0) >= 1.0,
        "the refused anonymous scrape is counted:\n{text}"
    );
    assert_eq!(
        value(&text, "dva_build_info", &["role=\"mgmt\""]),
        Some(1.0)
    );

    // Up: the manager timed every unit's first config and the first table switch.
    let manager = "role=\"manager\"";
    for target in ["dataplane", "dispatcher"] {
        let target = format!("target_role=\"{target}\"");
        assert!(
            sum(
                &text,
                "dva_config_ack_seconds_count",
                &[app, manager, &target]
            ) > 0.0,
            "{target}: config ACKs timed:\n{text}"
        );
    }
    assert!(
        sum(&text, "dva_table_switch_seconds_count", &[app, manager]) > 0.0,
        "the first table switch timed:\n{text}"
    );
    assert_histograms_whole(&text);

    // A scale-in past a short drain deadline with connections open on both data planes: the
    // leaving one hands their buckets' state to the one that stays, which times each bucket.
    let _streams_server =
        StreamServer::start(&lab.lab.server_ns(1), STREAM_PORT).expect("stream server");
    let streams = apps::start_streams(
        &client,
        format!("{SERVER1}:{STREAM_PORT}").parse().expect("address"),
        16,
        Duration::from_secs(10),
        20_000,
    );
    m.wait(
        "edge-fw",
        "open connections on both data planes",
        Duration::from_secs(10),
        |v| {
            v.units
                .iter()
                .filter(|u| u.role == dva_mgmt::UnitRole::Dataplane)
                .all(|u| u.flows >= 2)
        },
    );
    m.scale("edge-fw", 1, Some("1s"));
    m.wait_ready("edge-fw", 1);
    let (status, body) = prometheus
        .raw("GET", "/v1/appliances/edge-fw", "", b"")
        .expect("get");
    assert_eq!(status, 200, "{body}");
    let handed = apps::wait_until(Duration::from_secs(10), Duration::from_millis(300), || {
        text = prometheus
            .raw("GET", "/metrics", "", b"")
            .expect("scrape")
            .1;
        sum(
            &text,
            "dva_handover_seconds_count",
            &[app, "role=\"dataplane\""],
        ) > 0.0
    });
    assert!(
        handed,
        "bucket handovers timed on the data plane that stayed:\n{text}\nevents: {:#?}",
        m.mgmt.events("edge-fw").unwrap_or_default()
    );
    let (ok, report) = promtool_check(&text);
    assert!(ok, "promtool check metrics: {report}\n---\n{text}");
    assert_histograms_whole(&text);
    // The figures, for whoever reads the test's output (never asserted: timings are not tests).
    for l in text.lines().filter(|l| {
        ["_seconds_count{", "_seconds_sum{"]
            .iter()
            .any(|s| l.contains(s))
            && !l.starts_with("process_")
    }) {
        eprintln!("  {l}");
    }
    assert!(
        value(
            &text,
            "dva_mgmt_api_request_seconds_count",
            &["method=\"GET\"", "route=\"/v1/appliances/{name}\""]
        )
        .unwrap_or(0.0)
            > 0.0,
        "API answers timed by route template:\n{text}"
    );
    assert!(
        !text.contains("route=\"/v1/appliances/edge-fw"),
        "a raw path became a label:\n{text}"
    );
    // The streams end by themselves; whether they survived the move is e2e_handover's matter.
    let _ = streams.join();
    api.stop();
}

/// Every histogram series is whole: its `+Inf` bucket equals its `_count`, and its buckets never
/// decrease.
fn assert_histograms_whole(text: &str) {
    let mut series: std::collections::BTreeMap<String, Vec<(String, f64)>> = Default::default();
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name_labels, v)) = l.rsplit_once(' ') else {
            continue;
        };
        let Some((name, labels)) = name_labels.split_once('{') else {
            continue;
        };
        let Some(family) = name.strip_suffix("_bucket") else {
            continue;
        };
        let (rest, le) = labels
            .rsplit_once(",le=\"")
            .unwrap_or_else(|| panic!("a bucket without le: {l}"));
        let key = format!("{family}{{{rest}}}");
        let v: f64 = v.parse().unwrap_or_else(|_| panic!("{l}"));
        series
            .entry(key)
            .or_default()
            .push((le.trim_end_matches("\"}").to_string(), v));
    }
    assert!(!series.is_empty(), "no histogram at all:\n{text}");
    for (key, buckets) in &series {
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{key}: buckets decrease: {buckets:?}"
        );
        let inf = buckets.last().filter(|(le, _)| le == "+Inf").map(|b| b.1);
        let (family, labels) = key.split_once('{').expect("series key");
        let count = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{family}_count{{{labels} ")))
            .and_then(|v| v.parse::<f64>().ok());
        assert!(
            inf.is_some() && inf == count,
            "{key}: +Inf {inf:?}, count {count:?}"
        );
    }
}

/// A load balancer: per-backend counters of every data plane come out under one family each,
/// and add up to the connections made through the VIP.
#[test]
fn load_balancer_backends_are_counted_per_backend() {
    let _serial = serial();
    let lab = LabGuard::up("e2emtlb-", 3, 2);
    let client = lab.lab.client_ns();
    let _web: Vec<Nginx> = (1..=3)
        .map(|k| {
            Nginx::start(&lab.lab.server_ns(k), &[80], &format!("server{k}\n")).expect("nginx")
        })
        .collect();
    let m = MgmtGuard::open("e2emtlb-");
    m.apply_file(&example("web-lb.yaml"));
    m.wait_ready("web-lb", 2);
    let token = "e2e-metrics-lb-token-0123456789abcdef";
    let api = dva_mgmt::api::serve(m.mgmt.clone(), "127.0.0.1:0".parse().unwrap(), token.into())
        .expect("api");
    let prometheus =
        dva_mgmt::client::Client::new(&format!("http://{}", api.local_addr()), Some(token.into()))
            .expect("client");

    // Health checks bring the backends up first; then every connection is counted once.
    let mut answered = 0;
    for _ in 0..40 {
        if apps::curl(&client, "http://198.18.1.100/", 3).is_ok() {
            answered += 1;
        }
        if answered == 12 {
            break;
        }
    }
    assert_eq!(answered, 12, "connections through the VIP");

    let mut text = String::new();
    let counted = apps::wait_until(Duration::from_secs(15), Duration::from_millis(300), || {
        text = prometheus
            .raw("GET", "/metrics", "", b"")
            .expect("scrape")
            .1;
        sum(
            &text,
            "dva_lb_backend_new_flows_total",
            &["service=\"web\""],
        ) >= 12.0
    });
    assert!(counted, "LB flows not counted in time:\n{text}");
    let (ok, report) = promtool_check(&text);
    assert!(ok, "promtool check metrics: {report}\n---\n{text}");
    for backend in ["server1", "server2", "server3"] {
        let b = format!("backend=\"{backend}\"");
        assert!(
            sum(&text, "dva_lb_backend_bytes_total", &[&b]) > 0.0,
            "{backend} carried bytes:\n{text}"
        );
        assert!(value(&text, "dva_lb_backend_up", &[&b]).is_some(), "{text}");
        assert_eq!(
            value(
                &text,
                "dva_lb_backend_healthy",
                &["role=\"dispatcher\"", &b]
            ),
            Some(1.0),
            "{text}"
        );
    }
    for (family, kind) in [
        ("dva_lb_backend_new_flows_total", "counter"),
        ("dva_lb_backend_flows", "gauge"),
        ("dva_lb_backend_packets_total", "counter"),
        ("dva_lb_flows", "gauge"),
        ("dva_lb_backend_healthy", "gauge"),
    ] {
        let typed = text
            .lines()
            .filter(|l| *l == format!("# TYPE {family} {kind}"))
            .count();
        assert_eq!(typed, 1, "{family}:\n{text}");
    }
    api.stop();
}
