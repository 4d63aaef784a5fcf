//! End to end: the live web view (issue #15). `dva serve` runs as a process over a lab with the
//! edge firewall at one data plane, and the page is open in headless Chromium, driven over the
//! DevTools protocol. While `dva scale` takes the appliance 1 → 3 → 1, the test reads the page's
//! DOM, never reloading it, and sees the data-plane count and the bucket owners follow, and the
//! flows of traffic sent through the firewall. It also checks, as curl sees them, that the page
//! has its security headers and holds no data, and that the API still refuses calls without the
//! token. It saves a screenshot of the page. With a load balancer, the page shows each backend's
//! health.
//!
//! Chromium is Debian's `chromium` (`.ci/install-deps.sh` installs it; `DVA_CHROMIUM` names
//! another binary). Without it the test fails and says so: skipping would make a test that
//! cannot fail.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use dva_lab::apps::{self, Nginx};
use serde_json::{json, Value};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

const SERVER1: &str = "198.18.2.2";
const BUCKETS: u64 = 4096;
/// How long the page may take to show a change (it polls every second; units take a few seconds
/// to start, and a removed data plane drains first).
const SHOWN_WITHIN: Duration = Duration::from_secs(30);

/// `dva serve` as a process; killed when dropped.
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
        let url = loop {
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
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dva(client_file: &Path, args: &[&str]) -> Output {
    let out = Command::new(dva_bin())
        .args(args)
        .env("DVA_CLIENT_CONFIG", client_file)
        .env_remove("DVA_SERVER")
        .env_remove("DVA_TOKEN")
        .output()
        .expect("run dva");
    assert!(
        out.status.success(),
        "dva {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `curl` a URL without any token: (status, headers, body).
fn curl(url: &str) -> (u16, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "-D", "-", url])
        .output()
        .expect("curl (Debian package curl; .ci/install-deps.sh installs it)");
    assert!(out.status.success(), "curl {url}: {:?}", out);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head from {url}: {text}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status from {url}: {head}"));
    (status, head.to_string(), body.to_string())
}

/// Headless Chromium with a DevTools-protocol session on one page. Killed (its whole process
/// group: the browser forks helpers) when dropped.
struct Browser {
    child: Child,
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    session: String,
    next_id: u64,
}

impl Browser {
    fn launch(profile: &Path) -> Browser {
        let exe = std::env::var_os("DVA_CHROMIUM")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
        assert!(
            exe.exists(),
            "{} not found: the web-view test needs Chromium (Debian package chromium; \
             .ci/install-deps.sh installs it, DVA_CHROMIUM names another binary)",
            exe.display()
        );
        std::fs::create_dir_all(profile).expect("profile dir");
        let log = std::fs::File::create(profile.join("chromium.log")).expect("chromium log");
        let child = Command::new(&exe)
            .args([
                "--headless=new",
                // Tests run as root, where Chromium's sandbox cannot start.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--window-size=1280,1100",
                // Port 0: Chromium picks one and writes it to DevToolsActivePort.
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", exe.display()));
        let active = profile.join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        let endpoint = loop {
            let text = std::fs::read_to_string(&active).unwrap_or_default();
            let mut lines = text.lines();
            if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                break format!("ws://127.0.0.1:{port}{path}");
            }
            assert!(
                Instant::now() < deadline,
                "Chromium did not open its DevTools port within 30 s; its log:\n{}",
                std::fs::read_to_string(profile.join("chromium.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let (ws, _) = tungstenite::connect(&endpoint)
            .unwrap_or_else(|e| panic!("DevTools websocket {endpoint}: {e}"));
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("read timeout");
        }
        let mut b = Browser {
            child,
            ws,
            session: String::new(),
            next_id: 0,
        };
        let target = b.call("Target.createTarget", json!({ "url": "about:blank" }));
        let target = target["targetId"].as_str().expect("targetId").to_string();
        let attached = b.call(
            "Target.attachToTarget",
            json!({ "targetId": target, "flatten": true }),
        );
        b.session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string();
        b
    }

    /// One DevTools command (on the page's session once attached); its result.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        self.ws
            .send(Message::text(msg.to_string()))
            .unwrap_or_else(|e| panic!("DevTools {method}: {e}"));
        loop {
            let m = self
                .ws
                .read()
                .unwrap_or_else(|e| panic!("DevTools {method}: no answer ({e})"));
            let Message::Text(text) = m else { continue };
            let v: Value = serde_json::from_str(text.as_str()).expect("DevTools JSON");
            // Everything else is an event of the page's or an answer to nobody.
            if v["id"].as_u64() == Some(id) {
                if let Some(e) = v.get("error") {
                    panic!("DevTools {method}: {e}");
                }
                return v["result"].clone();
            }
        }
    }

    /// Evaluate a JavaScript expression in the page; its JSON value.
    fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true }),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expression}: {e}");
        }
        r["result"]["value"].clone()
    }

    fn screenshot(&mut self, path: &Path) -> usize {
        let r = self.call(
            "Page.captureScreenshot",
            json!({ "format": "png", "captureBeyondViewport": true }),
        );
        let png = data_encoding::BASE64
            .decode(r["data"].as_str().expect("screenshot data").as_bytes())
            .expect("screenshot base64");
        std::fs::write(path, &png).expect("writing the screenshot");
        png.len()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group of the browser this test started (process_group(0)
        // made its pid the group id).
        unsafe {
            libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// What the page shows: ready data planes, and (unit, buckets, flows) per data plane row.
#[derive(Debug, Clone, PartialEq)]
struct Shown {
    dataplanes: String,
    owners: Vec<(u64, u64, u64)>,
}

impl Shown {
    fn read(b: &mut Browser) -> Shown {
        let v = b.eval(
            // Optional chaining: until the page has loaded, there is no such element.
            "({ dataplanes: document.getElementById('dp-count')?.textContent ?? '', \
                owners: [...document.querySelectorAll('#owners tbody tr')].map(r => \
                  [Number(r.dataset.unit), Number(r.dataset.buckets), Number(r.dataset.flows)]) })",
        );
        let owners = v["owners"]
            .as_array()
            .expect("owners")
            .iter()
            .map(|r| {
                let n = |i: usize| r[i].as_u64().expect("a number");
                (n(0), n(1), n(2))
            })
            .collect();
        Shown {
            dataplanes: v["dataplanes"].as_str().unwrap_or_default().to_string(),
            owners,
        }
    }

    /// The data planes owning buckets.
    fn owning(&self) -> Vec<u64> {
        self.owners
            .iter()
            .filter(|o| o.1 > 0)
            .map(|o| o.0)
            .collect()
    }
}

/// Read the page until `f` holds; panics with what it showed last.
fn wait_shown(b: &mut Browser, what: &str, f: impl Fn(&Shown) -> bool) -> Shown {
    let deadline = Instant::now() + SHOWN_WITHIN;
    loop {
        let s = Shown::read(b);
        if f(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "the page did not show {what} within {SHOWN_WITHIN:?}; it shows {s:?}, status {}",
            b.eval("document.getElementById('status')?.textContent ?? 'no page'")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_web_view_follows_scaling_live() {
    let _serial = serial();
    let started = Instant::now();
    let prefix = "e2eui-";
    let lab = LabGuard::up(prefix, 1, 2);
    let client = lab.lab.client_ns();
    let _web = Nginx::start(&lab.lab.server_ns(1), &[80], "seen\n").expect("nginx");
    let dir: PathBuf = std::env::temp_dir().join(format!("dva-e2eui-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let state = dir.join("state");
    let cf = dir.join("client.json");
    let serve = Serve::start(&state, &cf, prefix);
    let token = std::fs::read_to_string(state.join("token")).expect("token file");
    let token = token.trim();

    // One data plane to begin with.
    let spec = std::fs::read_to_string(example("edge-firewall.yaml"))
        .expect("spec")
        .replace("initial: 2", "initial: 1");
    assert!(spec.contains("initial: 1"));
    let spec_file = dir.join("edge-fw.yaml");
    std::fs::write(&spec_file, spec).expect("spec file");
    dva(&cf, &["apply", "-f", spec_file.to_str().expect("path")]);

    // curl's view: the page and its files are open, locked down and hold no data; the API is not
    // open.
    for (path, ty) in [
        ("/ui", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
    ] {
        let (status, head, body) = curl(&format!("{}{path}", serve.url));
        assert_eq!(status, 200, "{path}: {head}");
        let head = head.to_ascii_lowercase();
        for want in [
            format!("content-type: {ty}"),
            "content-security-policy: default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'".into(),
            "x-content-type-options: nosniff".into(),
            "cache-control: no-store".into(),
            "x-frame-options: deny".into(),
        ] {
            assert!(head.contains(&want), "{path} lacks {want:?}:\n{head}");
        }
        assert!(!head.contains("unsafe-inline"), "{path}: {head}");
        assert!(
            !body.contains("edge-fw") && !body.contains(token),
            "{path} holds data"
        );
    }
    for path in [
        "/v1/appliances",
        "/v1/appliances/edge-fw",
        "/v1/appliances/edge-fw/stats",
        "/v1/appliances/edge-fw/events",
    ] {
        assert_eq!(
            curl(&format!("{}{path}", serve.url)).0,
            401,
            "{path} without the token"
        );
    }

    // The page, with the token in the fragment (which the browser never sends).
    let mut b = Browser::launch(&dir.join("chromium"));
    b.call(
        "Page.navigate",
        json!({ "url": format!("{}/ui#token={token}", serve.url) }),
    );
    let one = wait_shown(&mut b, "one data plane owning every bucket", |s| {
        s.dataplanes == "1" && s.owners.len() == 1 && s.owners[0].1 == BUCKETS
    });
    // The token left the address bar and lives in this tab's sessionStorage only.
    assert_eq!(b.eval("location.hash"), json!(""));
    assert_eq!(b.eval("sessionStorage.getItem('dva-token')"), json!(token));
    assert_eq!(b.eval("localStorage.length"), json!(0));
    // Gone after a reload, which this test never does.
    b.eval("window.__notReloaded = true");

    // Traffic through the firewall: the page shows the data plane's flows.
    for _ in 0..5 {
        let body = apps::curl(&client, &format!("http://{SERVER1}/"), 3).expect("curl through");
        assert_eq!(body, "seen\n");
    }
    wait_shown(&mut b, "the flows of the traffic", |s| {
        s.owners.iter().map(|o| o.2).sum::<u64>() >= 1
    });

    dva(&cf, &["scale", "edge-fw", "--dataplanes", "3"]);
    let three = wait_shown(&mut b, "three data planes sharing the buckets", |s| {
        s.dataplanes == "3"
            && s.owning().len() == 3
            && s.owners.iter().map(|o| o.1).sum::<u64>() == BUCKETS
    });
    assert!(three.owning().contains(&one.owners[0].0), "{three:?}");

    dva(
        &cf,
        &[
            "scale",
            "edge-fw",
            "--dataplanes",
            "1",
            "--drain-deadline",
            "2s",
        ],
    );
    let back = wait_shown(&mut b, "one data plane again, the others gone", |s| {
        s.dataplanes == "1" && s.owners.len() == 1 && s.owners[0].1 == BUCKETS
    });
    assert_ne!(back.owners, three.owners);

    // The event stream shows the scaling; the rates were computed; still the same page.
    let reasons = b.eval(
        "[...document.querySelectorAll('#events li')].map(li => li.dataset.reason).join(' ')",
    );
    assert!(
        reasons.as_str().unwrap_or_default().contains("scaled"),
        "events shown: {reasons}"
    );
    assert_eq!(b.eval("window.__notReloaded === true"), json!(true));
    // Rates come from two successive reads of a unit's counters: every unit carrying traffic
    // shows one (a number, not the '–' of a unit read once or not at all).
    let deadline = Instant::now() + SHOWN_WITHIN;
    loop {
        let cells = b.eval(
            "[...document.querySelectorAll('#units tr[data-role=dataplane], \
                #units tr[data-role=dispatcher]')].map(r => r.children[6].textContent)",
        );
        let cells: Vec<&str> = cells
            .as_array()
            .expect("rate cells")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        if cells.len() == 2 && cells.iter().all(|c| c.parse::<f64>().is_ok()) {
            break;
        }
        assert!(Instant::now() < deadline, "packets/s shown: {cells:?}");
        std::thread::sleep(Duration::from_millis(200));
    }

    let png = dir.join("web-view.png");
    let size = b.screenshot(&png);
    let bytes = std::fs::read(&png).expect("screenshot");
    assert!(
        size > 1000 && bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "screenshot {} of {size} bytes",
        png.display()
    );
    eprintln!(
        "web view: screenshot {} ({size} bytes); test took {:?}",
        png.display(),
        started.elapsed()
    );

    // A token the server refuses is forgotten and asked for again.
    b.eval("sessionStorage.setItem('dva-token', 'wrong')");
    let deadline = Instant::now() + SHOWN_WITHIN;
    while b.eval("document.getElementById('login').hidden") != json!(false) {
        assert!(Instant::now() < deadline, "no login form after a 401");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(b.eval("sessionStorage.getItem('dva-token')"), Value::Null);
    assert_eq!(
        b.eval("document.getElementById('view').hidden"),
        json!(true)
    );

    drop(b);
    dva(&cf, &["delete", "edge-fw"]);
    // The screenshot stays for a person to look at; the browser profile and the store go.
    let _ = std::fs::remove_dir_all(dir.join("chromium"));
    let _ = std::fs::remove_dir_all(&state);
}

/// A load balancer: the page lists its backends with the health the dispatchers' checks find
/// (server3 has no web server, so its checks fail).
#[test]
fn the_web_view_shows_load_balancer_backends_health() {
    let _serial = serial();
    let prefix = "e2euilb-";
    let lab = LabGuard::up(prefix, 3, 2);
    let _web: Vec<Nginx> = (1..=2)
        .map(|k| {
            Nginx::start(&lab.lab.server_ns(k), &[80], &format!("server{k}\n")).expect("nginx")
        })
        .collect();
    let m = MgmtGuard::open(prefix);
    m.apply_file(&example("web-lb.yaml"));
    m.wait_ready("web-lb", 2);
    let token = "e2e-ui-lb-token-0123456789abcdef";
    let api = dva_mgmt::api::serve(m.mgmt.clone(), "127.0.0.1:0".parse().unwrap(), token.into())
        .expect("api");
    let dir: PathBuf = std::env::temp_dir().join(format!("dva-e2euilb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut b = Browser::launch(&dir.join("chromium"));
    b.call(
        "Page.navigate",
        json!({ "url": format!("http://{}/ui#token={token}", api.local_addr()) }),
    );
    let want = json!([
        ["web", "server1", "up"],
        ["web", "server2", "up"],
        ["web", "server3", "down"]
    ]);
    let deadline = Instant::now() + SHOWN_WITHIN;
    loop {
        let shown = b.eval(
            "[...document.querySelectorAll('#backends tbody tr')].map(r => \
               [...r.children].slice(0, 3).map(c => c.textContent))",
        );
        let visible = b.eval("document.getElementById('backends-section')?.hidden === false");
        if shown == want && visible == json!(true) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backends shown: {shown} (visible: {visible}), want {want}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
}
