//! End to end through the public surface: `dva serve` as a process, the CLI as its client, the
//! HTTP API's auth, and a `kill -9` + restart of the management tool (issue: the control plane).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use dva_lab::apps::{self, Nginx};

struct Serve {
    child: Child,
    url: String,
}

impl Serve {
    fn start(state: &Path, client_file: &Path, prefix: &str) -> Serve {
        let mut child = Command::new(dva_bin())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--lab",
                prefix,
                "--state",
            ])
            .arg(state)
            .env("DVA_CLIENT_CONFIG", client_file)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn dva serve");
        let out = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(out).lines();
        let deadline = Instant::now() + Duration::from_secs(20);
        let url = loop {
            assert!(Instant::now() < deadline, "dva serve did not start");
            let Some(Ok(l)) = lines.next() else {
                panic!("dva serve exited before listening")
            };
            if let Some(rest) = l.split("listening on ").nth(1) {
                break rest.split_whitespace().next().expect("url").to_string();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Serve { child, url }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn dva(client_file: &Path, args: &[&str]) -> Output {
    Command::new(dva_bin())
        .args(args)
        .env("DVA_CLIENT_CONFIG", client_file)
        .env_remove("DVA_SERVER")
        .env_remove("DVA_TOKEN")
        .output()
        .expect("run dva")
}

fn get_json(client_file: &Path, name: &str) -> serde_json::Value {
    let out = dva(client_file, &["get", name, "-o", "json"]);
    assert!(
        out.status.success(),
        "dva get: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("get -o json is JSON")
}

fn wait_json(
    client_file: &Path,
    name: &str,
    what: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = get_json(client_file, name);
        if f(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: last {v:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A raw HTTP request to the API (to check what the CLI would never send).
fn http(url: &str, method: &str, path: &str, token: Option<&str>) -> u16 {
    let c = dva_mgmt::client::Client::new(url, token.map(str::to_string)).expect("client");
    c.raw(method, path, "", b"").expect("request").0
}

#[test]
fn serve_apply_get_scale_events_and_a_restart_that_loses_nothing() {
    let _serial = serial();
    let prefix = "e2ecli-";
    let lab = LabGuard::up(prefix, 1, 2);
    let client = lab.lab.client_ns();
    let _web = Nginx::start(&lab.lab.server_ns(1), &[80], "via cli\n").expect("nginx");
    let dir: PathBuf = std::env::temp_dir().join(format!("dva-e2ecli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let state = dir.join("state");
    let cf = dir.join("client.json");
    let mut serve = Serve::start(&state, &cf, prefix);
    let token = std::fs::read_to_string(state.join("token")).expect("token file");

    // The API refuses calls without the token, or with a wrong one.
    assert_eq!(http(&serve.url, "GET", "/v1/appliances", None), 401);
    assert_eq!(http(&serve.url, "GET", "/v1/appliances", Some("nope")), 401);
    assert_eq!(
        http(&serve.url, "GET", "/v1/appliances", Some(token.trim())),
        200
    );
    assert_eq!(http(&serve.url, "GET", "/healthz", None), 200);

    // apply with no flags: the CLI finds the server and token in the client file.
    let spec = example("edge-firewall.yaml");
    let out = dva(&cf, &["apply", "-f", spec.to_str().expect("path")]);
    assert!(
        out.status.success(),
        "apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = dva(&cf, &["scale", "edge-fw", "--dataplanes", "1"]);
    assert!(
        out.status.success(),
        "scale: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = wait_json(&cf, "edge-fw", "ready with 1 data plane", |v| {
        v["status"] == "ready" && v["dataplanes"]["ready"] == 1
    });
    for u in v["units"].as_array().expect("units") {
        for field in [
            "id",
            "role",
            "host",
            "state",
            "pid",
            "packets",
            "flows",
            "config_version",
        ] {
            assert!(u.get(field).is_some(), "unit lacks {field}: {u}");
        }
        if u["role"] == "manager" {
            assert_eq!(u["leader"], true);
        }
    }
    assert!(v["config_version"].as_u64().unwrap_or(0) >= 1);
    assert_eq!(
        apps::curl(&client, "http://198.18.2.2/", 5).expect("curl"),
        "via cli\n"
    );

    // kubectl habits: the same spec again (from a file, then from stdin, then from a
    // directory) is "unchanged" and keeps the generation; `wait`; YAML and wide output.
    let out = dva(&cf, &["apply", "-f", spec.to_str().expect("path")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("unchanged"), "{text}");

    // --dry-run, diff and describe: a changed spec is checked and its difference shown, and
    // nothing changes; an invalid one is refused by the dry run.
    let generation = get_json(&cf, "edge-fw")["generation"].clone();
    let changed = dir.join("changed.yaml");
    std::fs::write(
        &changed,
        std::fs::read_to_string(&spec)
            .expect("spec")
            .replace("dport: [80, 5201]", "dport: [80, 443, 5201]"),
    )
    .expect("write changed spec");
    let changed_s = changed.to_str().expect("path");
    let out = dva(&cf, &["apply", "-f", changed_s, "--dry-run=server"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("configured (dry run"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        get_json(&cf, "edge-fw")["generation"],
        generation,
        "dry run changed it"
    );
    let out = dva(&cf, &["diff", "-f", changed_s]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "diff: {text}");
    assert!(
        text.contains("@@ ")
            && text
                .lines()
                .any(|l| l.starts_with('+') && l.contains("443")),
        "{text}"
    );
    let out = dva(&cf, &["diff", "-f", spec.to_str().expect("path")]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "no difference: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    std::fs::write(
        &changed,
        std::fs::read_to_string(&spec)
            .expect("spec")
            .replace("initial: 2", "initial: 99"),
    )
    .expect("write bad spec");
    let out = dva(&cf, &["apply", "-f", changed_s, "--dry-run"]);
    assert!(!out.status.success(), "a bad spec passed the dry run");
    // `dva stats` asks the API (the units could be on other machines); -w prints rates.
    let out = dva(&cf, &["stats", "edge-fw"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("RX PKTS") && text.contains("dataplane"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut watch = Command::new(dva_bin())
        .args(["stats", "edge-fw", "-w", "-o", "json"])
        .env("DVA_CLIENT_CONFIG", &cf)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("dva stats -w");
    std::thread::sleep(Duration::from_millis(2600));
    let _ = watch.kill();
    let out = watch.wait_with_output().expect("dva stats -w output");
    let text = String::from_utf8_lossy(&out.stdout);
    let rates: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        rates
            .iter()
            .any(|r| r["role"] == "dataplane" && r["rx_pps"].is_number()),
        "{text}"
    );
    let out = dva(&cf, &["describe", "edge-fw"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "Name:            edge-fw",
        "Data planes:",
        "Hosts:",
        "Events (latest",
    ] {
        assert!(
            out.status.success() && text.contains(want),
            "{want}: {text}"
        );
    }
    let stdin_apply = Command::new(dva_bin())
        .args(["apply", "-f", "-"])
        .env("DVA_CLIENT_CONFIG", &cf)
        .env_remove("DVA_SERVER")
        .env_remove("DVA_TOKEN")
        .stdin(std::fs::File::open(&spec).expect("spec"))
        .output()
        .expect("dva apply -f -");
    let text = String::from_utf8_lossy(&stdin_apply.stdout);
    assert!(
        stdin_apply.status.success() && text.contains("unchanged"),
        "{text}"
    );
    let specs = dir.join("specs");
    std::fs::create_dir_all(&specs).expect("dir");
    std::fs::copy(&spec, specs.join("edge-fw.yaml")).expect("copy");
    std::fs::write(specs.join("README.txt"), "not a spec").expect("write");
    let out = dva(&cf, &["apply", "-f", specs.to_str().expect("path")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("unchanged"), "{text}");
    assert_eq!(get_json(&cf, "edge-fw")["generation"], v["generation"]);
    let out = dva(
        &cf,
        &["wait", "edge-fw", "--for", "ready", "--timeout", "30s"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = dva(&cf, &["get", "edge-fw", "-o", "yaml"]);
    let yaml = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && yaml.contains("name: edge-fw") && yaml.contains("status: ready"),
        "{yaml}"
    );
    let out = dva(&cf, &["get", "-o", "wide"]);
    let wide = String::from_utf8_lossy(&out.stdout);
    assert!(
        wide.contains("GENERATION") && wide.contains("edge-fw"),
        "{wide}"
    );
    let out = dva(&cf, &["wait", "nosuch", "--timeout", "1s"]);
    assert!(
        !out.status.success(),
        "waiting for a missing appliance fails"
    );

    // A bad spec: refused with the field and the value; the running config stays.
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&spec)
            .expect("spec")
            .replace("dport: [80, 5201]", "dport: [80, 99999]"),
    )
    .expect("write");
    let out = dva(&cf, &["apply", "-f", bad.to_str().expect("path")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("dport") && err.contains("99999"), "{err}");
    let same = get_json(&cf, "edge-fw");
    assert_eq!(same["generation"], v["generation"]);

    // Scale out through the CLI, watched: `get --watch` and `events --watch` print the changes
    // as they happen; events and units show it.
    let watch = |args: &[&str]| {
        let mut child = Command::new(dva_bin())
            .args(args)
            .env("DVA_CLIENT_CONFIG", &cf)
            .env_remove("DVA_SERVER")
            .env_remove("DVA_TOKEN")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("dva --watch");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        (child, rx)
    };
    let (mut get_w, get_lines) = watch(&["get", "edge-fw", "--watch"]);
    let (mut ev_w, ev_lines) = watch(&["events", "edge-fw", "-w"]);
    // Both have printed their first listing before the change.
    let first = get_lines
        .recv_timeout(Duration::from_secs(10))
        .expect("get --watch header");
    assert!(first.contains("NAME"), "{first}");
    let row = get_lines
        .recv_timeout(Duration::from_secs(10))
        .expect("get --watch row");
    assert!(row.contains("1/1"), "{row}");
    std::thread::sleep(Duration::from_millis(500));
    while ev_lines.try_recv().is_ok() {}
    let out = dva(&cf, &["scale", "edge-fw", "--dataplanes", "3"]);
    assert!(out.status.success());
    let v = wait_json(&cf, "edge-fw", "ready with 3", |v| {
        v["status"] == "ready" && v["dataplanes"]["ready"] == 3
    });
    let seen = |rx: &std::sync::mpsc::Receiver<String>, want: &dyn Fn(&str) -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut lines = Vec::new();
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(l) if want(&l) => return lines,
                Ok(l) => lines.push(l),
                Err(_) => break,
            }
        }
        panic!("not printed; got {lines:?}");
    };
    let before_ready = seen(&get_lines, &|l| l.contains("3/3") && l.contains("ready"));
    assert!(
        before_ready.iter().any(|l| l.contains("/3")),
        "the watch showed the way from 1 to 3: {before_ready:?}"
    );
    seen(&ev_lines, &|l| l.contains("scaled") && l.contains("1 -> 3"));
    seen(&ev_lines, &|l| l.contains("unit-ready"));
    let _ = get_w.kill();
    let _ = ev_w.kill();
    let _ = get_w.wait();
    let _ = ev_w.wait();
    let out = dva(&cf, &["events", "edge-fw"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("scaled") && text.contains("1 -> 3"), "{text}");
    let out = dva(&cf, &["units", "edge-fw", "-o", "json"]);
    let units: serde_json::Value = serde_json::from_slice(&out.stdout).expect("units json");
    assert_eq!(
        units.as_array().map(Vec::len),
        v["units"].as_array().map(Vec::len)
    );
    let out = dva(&cf, &["scale", "edge-fw", "--dataplanes", "99"]);
    assert!(!out.status.success(), "scale beyond max refused");

    // kill -9 of the management tool: traffic keeps flowing; a restart adopts everything.
    let pids: Vec<u64> = v["units"]
        .as_array()
        .expect("units")
        .iter()
        .filter_map(|u| u["pid"].as_u64())
        .collect();
    serve.kill9();
    assert_eq!(
        apps::curl(&client, "http://198.18.2.2/", 5).expect("curl with no management tool"),
        "via cli\n"
    );
    let mut serve = Serve::start(&state, &cf, prefix);
    let v = wait_json(&cf, "edge-fw", "ready after restart", |v| {
        v["status"] == "ready" && v["dataplanes"]["ready"] == 3
    });
    let after: Vec<u64> = v["units"]
        .as_array()
        .expect("units")
        .iter()
        .filter_map(|u| u["pid"].as_u64())
        .collect();
    assert_eq!(
        after, pids,
        "the restarted management tool adopted the running units"
    );
    assert_eq!(
        apps::curl(&client, "http://198.18.2.2/", 5).expect("curl"),
        "via cli\n"
    );

    // Watches end with the appliance: both say so and exit 0.
    let (mut get_w, get_lines) = watch(&["get", "edge-fw", "--watch"]);
    let (mut ev_w, ev_lines) = watch(&["events", "edge-fw", "-w"]);
    get_lines
        .recv_timeout(Duration::from_secs(10))
        .expect("get --watch header");
    let out = dva(&cf, &["delete", "edge-fw"]);
    assert!(
        out.status.success(),
        "delete: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    seen(&get_lines, &|l| {
        l.contains("edge-fw") && l.contains("deleted")
    });
    seen(&ev_lines, &|l| l.contains("appliance edge-fw deleted"));
    for (what, w) in [("get --watch", &mut get_w), ("events -w", &mut ev_w)] {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = w.try_wait().expect("wait") {
                break s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what} still running after the delete"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(status.success(), "{what} after the delete: {status}");
    }
    for pid in pids {
        assert!(!pid_alive(pid as u32), "unit {pid} stopped by delete");
    }
    serve.kill9();
    let _ = std::fs::remove_dir_all(&dir);
}
