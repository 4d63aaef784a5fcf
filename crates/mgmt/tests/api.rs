//! The HTTP API against a real server on 127.0.0.1 (no lab needed: with a lab prefix that does not
//! exist the reconciler only records why it cannot place units, which the API does not care about).
//!
//! Covers auth, the error contract (status, code, a message naming the field and the value), that
//! a refused call changes nothing, the store across a restart, that the routes, the OpenAPI
//! document and the model's field names agree, and that no request (malformed, oversized, slow)
//! takes the server down or holds it up.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use dva_mgmt::api::{self, ApiServer, ClientConfig, OPENAPI, ROUTES};
use dva_mgmt::client::Client;
use dva_mgmt::{Mgmt, MgmtOptions};
use serde_json::Value;

const LAB: &str = "apitest-nolab-";
const TOKEN: &str = "0123456789abcdef0123456789abcdef";

fn example(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A unique, empty directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "dva-apitest-{what}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Send `request` on a new connection and return everything the server answers.
fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // The server may answer (and stop reading) before all of it is written.
    let _ = s.write_all(request);
    // Nothing more comes: a server keeping the connection alive for another request sees its
    // end, and closes after the answer.
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    String::from_utf8_lossy(&resp).into_owned()
}

fn open(state: &Path) -> Mgmt {
    let mut opts = MgmtOptions::new(state.join("state"), LAB).expect("options");
    // Keep unit run directories out of /run/dva.
    opts.run_root = state.join("run");
    Mgmt::open(opts).expect("open mgmt")
}

/// A management tool with its API on an ephemeral port.
struct Api {
    mgmt: Mgmt,
    server: Option<ApiServer>,
    addr: SocketAddr,
    /// With TLS (as `dva serve --tls-auto`): the installation CA, which clients trust.
    ca: Option<String>,
}

impl Api {
    fn start(dir: &Path) -> Api {
        let mgmt = open(dir);
        let server = api::serve(
            mgmt.clone(),
            "127.0.0.1:0".parse().expect("addr"),
            TOKEN.into(),
        )
        .expect("serve");
        let addr = server.local_addr();
        assert_ne!(addr.port(), 0, "the real bound port is reported");
        Api {
            mgmt,
            server: Some(server),
            addr,
            ca: None,
        }
    }

    /// Over TLS, with a certificate the installation CA issues for 127.0.0.1 and localhost.
    fn start_tls(dir: &Path) -> Api {
        let mgmt = open(dir);
        let names = ["127.0.0.1".to_string(), "localhost".to_string()];
        let (tls, ca) = api::auto_tls(&mgmt, &names).expect("a certificate");
        let options = api::ServeOptions {
            tls: Some(tls),
            ..Default::default()
        };
        let listen = "127.0.0.1:0".parse().expect("addr");
        let server = api::serve_with(mgmt.clone(), listen, TOKEN.into(), options).expect("serve");
        let addr = server.local_addr();
        Api {
            mgmt,
            server: Some(server),
            addr,
            ca: Some(ca),
        }
    }

    fn url(&self) -> String {
        match self.ca {
            Some(_) => format!("https://{}", self.addr),
            None => format!("http://{}", self.addr),
        }
    }

    fn client(&self) -> Client {
        Client::with_ca(&self.url(), Some(TOKEN.into()), self.ca.as_deref()).expect("client")
    }

    /// A TLS connection to the server, trusting its CA, handshake done.
    fn tls_stream(&self) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
        let config = dva_mgmt::client::tls_client_config(self.ca.as_deref().expect("a TLS server"))
            .expect("config");
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
        let mut conn = rustls::ClientConnection::new(config, name).expect("connection");
        let mut sock = TcpStream::connect(self.addr).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        while conn.is_handshaking() {
            conn.complete_io(&mut sock).expect("handshake");
        }
        rustls::StreamOwned::new(conn, sock)
    }

    /// (status, parsed JSON body or `Value::String` of the raw body if it is not JSON).
    fn call(&self, method: &str, path: &str, content_type: &str, body: &str) -> (u16, Value) {
        let (status, text) = self
            .client()
            .raw(method, path, content_type, body.as_bytes())
            .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"));
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v)
    }

    fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, "", "")
    }

    fn apply(&self, spec: &str) -> (u16, Value) {
        self.call("POST", "/v1/appliances", "application/yaml", spec)
    }

    /// Stop the server and the management tool (as `dva serve` does on SIGTERM).
    fn stop(self) {
        drop(self);
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop();
        }
        self.mgmt.shutdown();
    }
}

/// The error contract: the status, `{"error": {"code", "message"}}`, and the message.
fn error_message(status: u16, v: &Value, want_status: u16, want_code: &str) -> String {
    assert_eq!(status, want_status, "{v:#}");
    assert_eq!(v["error"]["code"], want_code, "{v:#}");
    v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("error without a message: {v:#}"))
        .to_string()
}

#[test]
fn calls_without_or_with_a_wrong_token_are_refused() {
    let dir = TempDir::new("auth");
    let api = Api::start(&dir.0);
    let url = api.url();
    let bad_tokens: [Option<String>; 4] = [
        None,
        Some("nope".into()),
        Some(TOKEN[..TOKEN.len() - 1].into()),
        Some(format!("{TOKEN}0")),
    ];
    for t in bad_tokens {
        let c = Client::new(&url, t).expect("client");
        for (method, path) in [
            ("GET", "/v1/appliances"),
            ("POST", "/v1/appliances"),
            ("GET", "/v1/appliances/edge-fw"),
            ("DELETE", "/v1/appliances/edge-fw"),
            ("GET", "/v1/appliances/edge-fw/stats"),
        ] {
            let (status, text) = c.raw(method, path, "", b"").expect("request");
            let v: Value = serde_json::from_str(&text).expect("JSON error");
            error_message(status, &v, 401, "unauthorized");
        }
    }
    // Another scheme carrying the right token is refused too.
    let mut s = TcpStream::connect(api.addr).expect("connect");
    write!(
        s,
        "GET /v1/appliances HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Basic {TOKEN}\r\n\r\n"
    )
    .expect("write");
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");

    // The right token works; liveness and the API's description need none.
    assert_eq!(api.get("/v1/appliances"), (200, Value::Array(vec![])));
    let anon = Client::new(&url, None).expect("client");
    let (status, body) = anon.raw("GET", "/healthz", "", b"").expect("healthz");
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, body) = anon
        .raw("GET", "/v1/openapi.json", "", b"")
        .expect("openapi");
    assert_eq!(status, 200);
    assert_eq!(body, OPENAPI);
    // The web view's page needs none either: it holds no data, its script asks for the token.
    let (status, body) = anon.raw("GET", "/ui", "", b"").expect("ui");
    assert_eq!(status, 200);
    assert!(body.contains("<script src=\"/ui/app.js\""), "{body}");
}

#[test]
fn apply_get_put_and_bad_specs_that_change_nothing() {
    let dir = TempDir::new("apply");
    let api = Api::start(&dir.0);
    let spec = example("edge-firewall.yaml");

    let (status, v) = api.apply(&spec);
    assert_eq!(status, 200, "{v:#}");
    assert_eq!(v["name"], "edge-fw");
    assert_eq!(v["generation"], 1);
    let (status, v) = api.get("/v1/appliances/edge-fw");
    assert_eq!(status, 200, "{v:#}");
    assert_eq!(v["name"], "edge-fw");
    assert_eq!(v["generation"], 1);
    assert!(
        ["pending", "ready", "degraded"].contains(&v["status"].as_str().unwrap_or("")),
        "{v:#}"
    );
    assert_eq!(v["spec"], spec.as_str());
    assert_eq!(v["dataplanes"]["desired"], 2);
    assert_eq!(
        (
            v["dataplanes"]["min"].clone(),
            v["dataplanes"]["max"].clone()
        ),
        (1.into(), 8.into())
    );

    // The same spec again is a no-op; the listing shows it.
    let (status, v) = api.apply(&spec);
    assert_eq!((status, v["generation"].clone()), (200, 1.into()));
    let (status, v) = api.get("/v1/appliances");
    assert_eq!(status, 200);
    let names: Vec<&str> = v
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|a| a["name"].as_str())
        .collect();
    assert_eq!(names, ["edge-fw"]);

    // Each bad spec: 422, the message names the field's path and the bad value.
    let bad = [
        (
            spec.replace("default: drop", "default: drop\n        colour: red"),
            ["spec.services[0].firewall", "colour"],
        ),
        (
            spec.replace("dst: 198.18.2.0/24", "dst: 198.18.300.0/24"),
            ["spec.services[0].firewall.rules[0].dst", "198.18.300.0/24"],
        ),
        (
            spec.replace("dport: [80, 5201]", "dport: [80, 70000]"),
            ["spec.services[0].firewall.rules[0].dport", "70000"],
        ),
    ];
    for (text, needles) in &bad {
        assert_ne!(text, &spec, "the fixture replacement must apply");
        for method_path in [
            ("POST", "/v1/appliances"),
            ("PUT", "/v1/appliances/edge-fw"),
        ] {
            let (status, v) = api.call(method_path.0, method_path.1, "application/yaml", text);
            let msg = error_message(status, &v, 422, "invalid");
            for n in needles {
                assert!(
                    msg.contains(n),
                    "{method_path:?}: {msg:?} should name {n:?}"
                );
            }
        }
    }
    // Not YAML at all, or the wrong kind of document: 422 too, never a 5xx.
    for text in ["", "null", "[]", "{", "apiVersion: [", "\t- :", "42"] {
        let (status, v) = api.apply(text);
        error_message(status, &v, 422, "invalid");
    }

    // A runtime change: 409, the field named (the units set it up when they start and would
    // refuse every config after it); `backplane: shm` is what the default already is.
    let runtime =
        |rt: &str| spec.replace("  layout:", &format!("  runtime: {{ {rt} }}\n  layout:"));
    for (rt, field) in [
        ("driver: af_packet", "spec.runtime.driver"),
        ("cpus: \"0-1\"", "spec.runtime.cpus"),
        ("backplane: udp", "spec.runtime.backplane"),
    ] {
        let text = runtime(rt);
        assert_ne!(text, spec, "the fixture replacement must apply");
        let (status, v) = api.apply(&text);
        let msg = error_message(status, &v, 409, "conflict");
        assert!(msg.contains(field) && msg.contains("delete"), "{msg}");
    }
    let (status, v) = api.apply(&runtime("backplane: shm"));
    assert_eq!((status, v["generation"].clone()), (200, 2.into()), "{v:#}");
    let (status, _) = api.apply(&spec);
    assert_eq!(status, 200);

    // No bad spec reached the store: the generations are the two accepted runtime applies'.
    let (_, v) = api.get("/v1/appliances/edge-fw");
    assert_eq!(v["generation"], 3, "{v:#}");
    assert_eq!(v["spec"], spec.as_str());

    // PUT: the name in the path must be the spec's.
    let (status, v) = api.call("PUT", "/v1/appliances/other", "application/yaml", &spec);
    let msg = error_message(status, &v, 422, "invalid");
    assert!(
        msg.contains("metadata.name") && msg.contains("other"),
        "{msg}"
    );
    assert_eq!(api.get("/v1/appliances/other").0, 404);

    // A changed spec by PUT, sent as JSON: accepted, a new generation.
    let mut tree: Value =
        serde_json::to_value(dva_proto::ApplianceSpec::from_yaml(&spec).expect("example parses"))
            .expect("spec to JSON");
    tree["spec"]["layout"]["dataplanes"]["max"] = 6.into();
    let json = serde_json::to_string(&tree).expect("JSON");
    let (status, v) = api.call("PUT", "/v1/appliances/edge-fw", "application/json", &json);
    assert_eq!(status, 200, "{v:#}");
    assert_eq!(v["generation"], 4);
    assert_eq!(v["dataplanes"]["max"], 6);
    // text/plain is accepted as well.
    let (status, v) = api.call("POST", "/v1/appliances", "text/plain", &spec);
    assert_eq!((status, v["generation"].clone()), (200, 5.into()), "{v:#}");
}

#[test]
fn scale_bounds_malformed_bodies_and_unknown_appliances() {
    let dir = TempDir::new("scale");
    let api = Api::start(&dir.0);
    assert_eq!(api.apply(&example("edge-firewall.yaml")).0, 200);
    let scale = |body: &str| {
        api.call(
            "POST",
            "/v1/appliances/edge-fw/scale",
            "application/json",
            body,
        )
    };

    let (status, v) = scale(r#"{"dataplanes": 3, "drain_deadline": "2s"}"#);
    assert_eq!(status, 200, "{v:#}");
    assert_eq!(v["dataplanes"]["desired"], 3);
    assert_eq!(v["generation"], 2);

    // Outside the layout's min..max (1..8): 422 naming the value and the bounds.
    for n in [0, 9, 1000] {
        let (status, v) = scale(&format!(r#"{{"dataplanes": {n}}}"#));
        let msg = error_message(status, &v, 422, "invalid");
        assert!(
            msg.contains(&n.to_string()) && msg.contains("1..=8"),
            "{msg}"
        );
    }
    // A deadline that is not a duration: 422 naming the field.
    let (status, v) = scale(r#"{"dataplanes": 2, "drain_deadline": "soon"}"#);
    let msg = error_message(status, &v, 422, "invalid");
    assert!(
        msg.contains("drain_deadline") && msg.contains("soon"),
        "{msg}"
    );

    // Malformed bodies: 400 with serde's message.
    for (body, needle) in [
        ("garbage", "expected"),
        ("", "EOF"),
        ("{}", "dataplanes"),
        (r#"{"dataplanes": -1}"#, "-1"),
        (r#"{"dataplanes": "two"}"#, "two"),
        (r#"{"dataplanes": 2, "colour": "red"}"#, "colour"),
        (r#"{"dataplanes": 99999999999}"#, "99999999999"),
    ] {
        let (status, v) = scale(body);
        let msg = error_message(status, &v, 400, "bad_request");
        assert!(
            msg.contains(needle),
            "{body:?}: {msg:?} should contain {needle:?}"
        );
    }
    // None of those changed anything.
    let (_, v) = api.get("/v1/appliances/edge-fw");
    assert_eq!(v["generation"], 2, "{v:#}");
    assert_eq!(v["dataplanes"]["desired"], 3);

    // Unknown appliance: 404 everywhere.
    for (method, path, body) in [
        ("GET", "/v1/appliances/nope", ""),
        ("GET", "/v1/appliances/nope/units", ""),
        ("GET", "/v1/appliances/nope/events", ""),
        ("DELETE", "/v1/appliances/nope", ""),
        ("POST", "/v1/appliances/nope/scale", r#"{"dataplanes": 2}"#),
    ] {
        let (status, v) = api.call(method, path, "application/json", body);
        let msg = error_message(status, &v, 404, "not_found");
        assert!(msg.contains("nope"), "{msg}");
    }

    // Units and events of a known one.
    let (status, v) = api.get("/v1/appliances/edge-fw/units");
    assert_eq!(status, 200);
    assert!(v.is_array(), "{v:#}");
    let (status, v) = api.get("/v1/appliances/edge-fw/events");
    assert_eq!(status, 200);
    let reasons: Vec<&str> = v
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["reason"].as_str())
        .collect();
    assert!(
        reasons.contains(&"applied") && reasons.contains(&"scaled"),
        "{reasons:?}"
    );
}

#[test]
fn unknown_routes_wrong_methods_and_oversized_bodies() {
    let dir = TempDir::new("routes");
    let api = Api::start(&dir.0);
    for path in [
        "/",
        "/v1",
        "/v2/appliances",
        "/v1/appliance",
        "/v1/appliances/x/y",
        "/v1/appliances/x/scale/more",
        "/healthz/x",
    ] {
        let (status, v) = api.get(path);
        error_message(status, &v, 404, "not_found");
    }
    for (method, path) in [
        ("DELETE", "/v1/appliances"),
        ("PUT", "/v1/appliances"),
        ("PATCH", "/v1/appliances/x"),
        ("POST", "/v1/appliances/x"),
        ("GET", "/v1/appliances/x/scale"),
        ("DELETE", "/v1/appliances/x/units"),
        ("POST", "/v1/appliances/x/events"),
    ] {
        let (status, v) = api.call(method, path, "", "");
        error_message(status, &v, 405, "method_not_allowed");
    }
    // A query string or a trailing slash does not change the route.
    assert_eq!(api.get("/v1/appliances?limit=1").0, 200);
    assert_eq!(api.get("/v1/appliances/").0, 200);

    // Bodies over 1 MiB: 413, and the server keeps answering.
    let big = format!("# {}\n", "x".repeat(1 << 20));
    let (status, v) = api.apply(&big);
    error_message(status, &v, 413, "too_large");
    // Announced but never sent: refused up front rather than waited for, and a length no machine
    // could hold is no reason to allocate it (with or without the token).
    for (auth, len) in [
        (true, "1000000000"),
        (true, "100000000000000"),
        (false, "100000000000000"),
        (true, "18446744073709551615"),
    ] {
        let auth = if auth {
            format!("Authorization: Bearer {TOKEN}\r\n")
        } else {
            String::new()
        };
        let resp = raw_exchange(
            api.addr,
            format!("POST /v1/appliances HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {len}\r\n\r\napiVersion: dva/v1\n").as_bytes(),
        );
        let want = if auth.is_empty() {
            "HTTP/1.1 401"
        } else if len == "18446744073709551615" {
            // Past what hyper represents (2^64 - 2): refused by hyper itself, as a head field
            // too large, before any service sees the request.
            "HTTP/1.1 431"
        } else {
            "HTTP/1.1 413"
        };
        assert!(resp.starts_with(want), "{len}: {resp}");
    }
    // Chunked bodies are refused with a reason; an oversized head too.
    let resp = raw_exchange(
        api.addr,
        format!("POST /v1/appliances HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n").as_bytes(),
    );
    assert!(resp.starts_with("HTTP/1.1 411"), "{resp}");
    let resp = raw_exchange(
        api.addr,
        format!(
            "GET /healthz HTTP/1.1\r\nX-Junk: {}\r\n\r\n",
            "j".repeat(64 << 10)
        )
        .as_bytes(),
    );
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    // A client that waits for "100 Continue" (curl does, for bodies over 1 KiB) gets it.
    let spec = example("edge-firewall.yaml");
    let mut s = TcpStream::connect(api.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "PUT /v1/appliances/edge-fw HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/yaml\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        spec.len()
    )
    .expect("write");
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).expect("100 Continue");
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(spec.as_bytes()).expect("body");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("answer");
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
    assert!(resp.contains("\"name\": \"edge-fw\""), "{resp}");
    drop(s);
    // Not UTF-8: 400.
    let (status, text) = api
        .client()
        .raw(
            "POST",
            "/v1/appliances",
            "application/yaml",
            &[0xff, 0xfe, 0],
        )
        .expect("request");
    let v: Value = serde_json::from_str(&text).expect("JSON");
    error_message(status, &v, 400, "bad_request");
    // Deeply nested documents are an error, not a stack overflow.
    for depth in [1_000, 100_000] {
        let text = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let (status, v) = api.apply(&text);
        error_message(status, &v, 422, "invalid");
        let text = "{a: ".repeat(depth);
        let (status, v) = api.apply(&text);
        error_message(status, &v, 422, "invalid");
    }
    // Garbage on the socket does not take the server down.
    for junk in [
        &b"\r\n\r\n"[..],
        b"GARBAGE\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        &[0u8; 64],
    ] {
        if let Ok(mut s) = TcpStream::connect(api.addr) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.write_all(junk);
            let _ = s.read(&mut [0u8; 256]);
        }
    }
    assert_eq!(api.get("/v1/appliances").0, 200);
}

#[test]
fn calls_are_answered_while_others_are_in_progress() {
    let dir = TempDir::new("workers");
    let api = Api::start(&dir.0);
    // Requests whose heads or bodies never complete each hold a connection ...
    let stuck: Vec<TcpStream> = (0..12)
        .map(|i| {
            let mut s = TcpStream::connect(api.addr).expect("connect");
            if i % 2 == 0 {
                write!(
                    s,
                    "POST /v1/appliances HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 100\r\n\r\napiVersion"
                )
            } else {
                write!(s, "GET /v1/appliances HTTP/1.1\r\nHost:")
            }
            .expect("write");
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // ... and the API still answers, promptly.
    let t = std::time::Instant::now();
    assert_eq!(api.get("/v1/appliances").0, 200);
    assert_eq!(api.get("/healthz").0, 200);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    drop(stuck);
}

/// Idle connections that each send one byte and hold, more than the server serves at once and
/// from the address every local client shares: a normal call is still answered, within 1 s, and
/// an idle connection is cut off once its head is overdue.
#[test]
fn idle_connections_do_not_lock_out_other_clients() {
    let dir = TempDir::new("idle");
    let api = Api::start(&dir.0);
    let mut idle: Vec<TcpStream> = (0..100)
        .map(|_| {
            let mut s = TcpStream::connect(api.addr).expect("connect");
            s.write_all(b"G").expect("write");
            s
        })
        .collect();
    let t = std::time::Instant::now();
    let (status, v) = api.get("/v1/appliances");
    let took = t.elapsed();
    assert_eq!(status, 200, "{v:#}");
    assert!(took < Duration::from_secs(1), "answered after {took:?}");

    // The newest idle connection is still open (the oldest made room), until its head is late.
    let last = idle.last_mut().expect("connections");
    last.set_read_timeout(Some(api::HEAD_TIMEOUT * 2))
        .expect("timeout");
    let mut resp = String::new();
    let _ = last.read_to_string(&mut resp);
    assert!(
        resp.starts_with("HTTP/1.1 408") && resp.contains("head"),
        "{resp:?}"
    );
}

#[test]
fn the_store_survives_a_restart_and_delete_removes_the_appliance() {
    let dir = TempDir::new("restart");
    let api = Api::start(&dir.0);
    let (status, v) = api.apply(&example("edge-firewall.yaml"));
    assert_eq!(status, 200, "{v:#}");
    let (status, _) = api.call(
        "POST",
        "/v1/appliances/edge-fw/scale",
        "application/json",
        r#"{"dataplanes": 4}"#,
    );
    assert_eq!(status, 200);
    api.stop();

    // A new management tool on the same state directory knows it all.
    let api = Api::start(&dir.0);
    let (status, v) = api.get("/v1/appliances");
    assert_eq!(status, 200);
    let list = v.as_array().expect("array");
    assert_eq!(list.len(), 1, "{v:#}");
    assert_eq!(list[0]["name"], "edge-fw");
    assert_eq!(list[0]["generation"], 2);
    assert_eq!(list[0]["dataplanes"]["desired"], 4);

    let (status, v) = api.call("DELETE", "/v1/appliances/edge-fw", "", "");
    assert_eq!(status, 200, "{v:#}");
    assert_eq!(v, serde_json::json!({ "deleted": "edge-fw" }));
    assert_eq!(api.get("/v1/appliances/edge-fw").0, 404);
    assert_eq!(api.get("/v1/appliances"), (200, Value::Array(vec![])));
    api.stop();

    // Deleted for good.
    let api = Api::start(&dir.0);
    assert_eq!(api.get("/v1/appliances"), (200, Value::Array(vec![])));
    api.stop();
}

/// A record that is garbage or was cut short does not keep the management tool from starting:
/// it is set aside (kept, renamed), shown as an appliance in `error` with the reason and an event,
/// and the other appliances work as before.
#[test]
fn a_corrupt_store_record_is_set_aside_and_reported() {
    let dir = TempDir::new("corrupt");
    let spec = example("edge-firewall.yaml");
    let api = Api::start(&dir.0);
    assert_eq!(api.apply(&spec).0, 200);
    assert_eq!(
        api.apply(&spec.replace("name: edge-fw", "name: half")).0,
        200
    );
    api.stop();
    let records = dir.0.join("state/appliances");
    let half = std::fs::read(records.join("half.json")).expect("record");
    std::fs::write(records.join("half.json"), &half[..half.len() / 2]).expect("truncate");
    std::fs::write(records.join("junk.json"), b"\x00\xffnot json").expect("write");

    let api = Api::start(&dir.0);
    let (status, v) = api.get("/v1/appliances");
    assert_eq!(status, 200, "{v:#}");
    let listed: Vec<(&str, &str)> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|a| {
            (
                a["name"].as_str().unwrap_or(""),
                a["status"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(listed[0].0, "edge-fw", "{v:#}");
    assert_ne!(listed[0].1, "error", "{v:#}");
    assert_eq!(
        &listed[1..],
        [("half", "error"), ("junk", "error")],
        "{v:#}"
    );
    for name in ["half", "junk"] {
        let (status, v) = api.get(&format!("/v1/appliances/{name}"));
        assert_eq!(
            (status, v["status"].as_str()),
            (200, Some("error")),
            "{v:#}"
        );
        let error = v["error"].as_str().unwrap_or("");
        assert!(
            error.contains(&format!("{name}.json")) && error.contains("set aside"),
            "{error}"
        );
        let (status, events) = api.get(&format!("/v1/appliances/{name}/events"));
        assert_eq!(status, 200);
        assert_eq!(events[0]["reason"], "store-corrupt", "{events:#}");
        // The bytes are kept for a human to look at, out of the way of a new record.
        let aside: Vec<String> = std::fs::read_dir(&records)
            .expect("dir")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|f| f.starts_with(&format!("{name}.json.corrupt-")))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert!(!records.join(format!("{name}.json")).exists());
    }
    let aside = std::fs::read_dir(&records)
        .expect("dir")
        .filter_map(|e| e.ok())
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("half.json.corrupt-")
        })
        .expect("half set aside");
    assert_eq!(
        std::fs::read(aside.path()).expect("read"),
        &half[..half.len() / 2]
    );

    // The healthy appliance works; the broken ones refuse a scale but take a fresh spec or a
    // delete.
    let scale = |name: &str| {
        api.call(
            "POST",
            &format!("/v1/appliances/{name}/scale"),
            "application/json",
            r#"{"dataplanes": 3}"#,
        )
    };
    assert_eq!(scale("edge-fw").0, 200);
    let (status, v) = scale("junk");
    let msg = error_message(status, &v, 409, "conflict");
    assert!(msg.contains("junk.json"), "{msg}");
    let (status, v) = api.apply(&spec.replace("name: edge-fw", "name: half"));
    assert_eq!(
        (status, v["status"].as_str()),
        (200, Some("pending")),
        "{v:#}"
    );
    assert_eq!(api.call("DELETE", "/v1/appliances/junk", "", "").0, 200);
    assert_eq!(api.get("/v1/appliances/junk").0, 404);
    api.stop();

    // After a restart: the set-aside files are not records any more.
    let api = Api::start(&dir.0);
    let (_, v) = api.get("/v1/appliances");
    let listed: Vec<(&str, &str)> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|a| {
            (
                a["name"].as_str().unwrap_or(""),
                a["status"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [("edge-fw", "pending"), ("half", "pending")],
        "{v:#}"
    );
}

#[test]
fn the_typed_client_round_trips() {
    let dir = TempDir::new("client");
    let api = Api::start(&dir.0);
    let c = api.client();
    let v = c.apply(&example("edge-firewall.yaml")).expect("apply");
    assert_eq!((v.name.as_str(), v.generation), ("edge-fw", 1));
    // Names and generations, not whole views: the reconciler may change a view's status or
    // error between the two calls.
    let listed: Vec<(String, u64)> = c
        .list()
        .expect("list")
        .into_iter()
        .map(|v| (v.name, v.generation))
        .collect();
    let got = c.get("edge-fw").expect("get");
    assert_eq!(listed, vec![(got.name, got.generation)]);
    let v = c
        .scale(
            "edge-fw",
            &dva_mgmt::ScaleRequest {
                dataplanes: 1,
                drain_deadline: Some("500ms".into()),
            },
        )
        .expect("scale");
    assert_eq!(v.dataplanes.desired, 1);
    assert!(c.units("edge-fw").is_ok());
    assert!(!c.events("edge-fw").expect("events").is_empty());
    let e = c
        .get("nope")
        .expect_err("unknown")
        .downcast::<dva_mgmt::client::HttpError>()
        .expect("an HTTP error");
    assert_eq!((e.status, e.code.as_str()), (404, "not_found"));
    c.delete("edge-fw").expect("delete");
    assert!(c.list().expect("list").is_empty());
}

/// Every (method, path) the router serves is documented, and every documented one is served.
#[test]
fn routes_equal_the_openapi_paths() {
    let doc: Value = serde_json::from_str(OPENAPI).expect("docs/openapi.json is JSON");
    assert_eq!(doc["openapi"], "3.0.3");
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (key, _) in item.as_object().expect("path item") {
            if ["get", "put", "post", "delete", "patch", "head", "options"].contains(&key.as_str())
            {
                documented.insert((key.to_uppercase(), path.clone()));
            }
        }
    }
    let routed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(routed.len(), ROUTES.len(), "ROUTES has duplicates");
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty(),
        "served but not documented: {undocumented:?}"
    );
    assert!(
        unrouted.is_empty(),
        "documented but not served: {unrouted:?}"
    );

    // Only /healthz, /readyz, the document itself and the web view's files (which hold no data)
    // are open; the rest needs the bearer token.
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"],
        serde_json::json!({ "type": "http", "scheme": "bearer" })
    );
    assert_eq!(doc["security"], serde_json::json!([{ "bearer": [] }]));
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            let open = op.get("security") == Some(&serde_json::json!([]));
            let should_be_open = path == "/healthz"
                || path == "/readyz"
                || path == "/v1/openapi.json"
                || path == "/ui"
                || path.starts_with("/ui/");
            if method != "parameters" {
                assert_eq!(open, should_be_open, "{method} {path}");
            }
        }
    }
}

/// The schemas in the document name exactly the fields (and enum values) the server sends.
#[test]
fn openapi_schemas_match_the_model() {
    use dva_mgmt::*;
    let doc: Value = serde_json::from_str(OPENAPI).expect("JSON");
    let schemas = &doc["components"]["schemas"];
    let unit = |role, state| UnitView {
        id: 1,
        role,
        host: "h".into(),
        state,
        pid: Some(1),
        config_version: 1,
        packets: 0,
        flows: 0,
        buckets: Some(1),
        leader: Some(true),
        error: Some("e".into()),
    };
    let view = ApplianceView {
        name: "a".into(),
        status: ApplianceStatus::Ready,
        generation: 1,
        config_version: 1,
        dataplanes: DataplaneCounts {
            desired: 1,
            ready: 1,
            draining: 0,
            min: 1,
            max: 1,
        },
        units: vec![unit(UnitRole::Manager, UnitState::Ready)],
        error: Some("e".into()),
        backends: vec![BackendView {
            service: "web".into(),
            backend: "server1".into(),
            health: "down".into(),
            up_votes: 0,
            checks: 1,
            error: Some("e".into()),
        }],
        spec: String::new(),
    };
    let event = Event {
        time_ms: 1,
        reason: "r".into(),
        message: "m".into(),
    };
    let scale = ScaleRequest {
        dataplanes: 1,
        drain_deadline: Some("1s".into()),
    };
    let check = |name: &str, value: Value| {
        let schema = &schemas[name];
        let props: BTreeSet<&String> = schema["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("schema {name}"))
            .keys()
            .collect();
        let sent: BTreeSet<&String> = value.as_object().expect("object").keys().collect();
        assert_eq!(props, sent, "schema {name} vs what the server sends");
        for r in schema["required"].as_array().expect("required") {
            assert!(sent.iter().any(|k| *k == r), "{name}.{r} is required");
        }
    };
    check("ApplianceView", serde_json::to_value(&view).expect("json"));
    check(
        "BackendView",
        serde_json::to_value(&view.backends[0]).expect("json"),
    );
    check(
        "UnitView",
        serde_json::to_value(&view.units[0]).expect("json"),
    );
    check(
        "DataplaneCounts",
        serde_json::to_value(view.dataplanes).expect("json"),
    );
    check("Event", serde_json::to_value(&event).expect("json"));
    let counters = UnitCounters {
        id: 1,
        role: UnitRole::Dataplane,
        host: "h".into(),
        state: UnitState::Ready,
        answered: true,
        uptime_secs: 1.0,
        rx_packets: 1,
        rx_bytes: 1,
        tx_packets: 1,
        tx_bytes: 1,
        drops: 0,
        flows: 0,
        active_flows: 0,
    };
    let stats = StatsView {
        name: "a".into(),
        time_ms: 1,
        units: vec![counters.clone()],
    };
    check("StatsView", serde_json::to_value(&stats).expect("json"));
    check(
        "UnitCounters",
        serde_json::to_value(&counters).expect("json"),
    );
    check("ScaleRequest", serde_json::to_value(&scale).expect("json"));

    let enum_of = |schema: &str, field: &str| -> BTreeSet<String> {
        schemas[schema]["properties"][field]["enum"]
            .as_array()
            .unwrap_or_else(|| panic!("{schema}.{field} enum"))
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    };
    let names = |vals: Vec<Value>| -> BTreeSet<String> {
        vals.iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    };
    assert_eq!(
        enum_of("UnitView", "role"),
        names(
            [UnitRole::Manager, UnitRole::Dispatcher, UnitRole::Dataplane]
                .iter()
                .map(|r| serde_json::to_value(r).expect("json"))
                .collect()
        )
    );
    assert_eq!(
        enum_of("UnitView", "state"),
        names(
            [
                UnitState::Starting,
                UnitState::Ready,
                UnitState::Draining,
                UnitState::Stopped,
                UnitState::Failed
            ]
            .iter()
            .map(|r| serde_json::to_value(r).expect("json"))
            .collect()
        )
    );
    assert_eq!(
        enum_of("ApplianceView", "status"),
        names(
            [
                ApplianceStatus::Pending,
                ApplianceStatus::Ready,
                ApplianceStatus::Degraded,
                ApplianceStatus::Deleting,
                ApplianceStatus::Error
            ]
            .iter()
            .map(|r| serde_json::to_value(r).expect("json"))
            .collect()
        )
    );
    // The error codes the server can send are all documented.
    let codes: BTreeSet<String> = schemas["Error"]["properties"]["error"]["properties"]["code"]
        ["enum"]
        .as_array()
        .expect("codes")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    for e in [
        ApiError::NotFound(String::new()),
        ApiError::Invalid(String::new()),
        ApiError::BadRequest(String::new()),
        ApiError::Conflict(String::new()),
        ApiError::Internal(String::new()),
    ] {
        assert!(codes.contains(e.code()), "{} not documented", e.code());
    }
    for code in [
        "unauthorized",
        "too_large",
        "method_not_allowed",
        "timeout",
        "length_required",
        "unavailable",
    ] {
        assert!(codes.contains(code), "{code} not documented");
    }
}

#[test]
fn the_token_is_created_once_private_and_reused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("token");
    let state = dir.0.join("state");
    let t1 = api::load_or_create_token(&state).expect("create");
    assert_eq!(t1.len(), 64);
    assert!(t1.bytes().all(|b| b.is_ascii_hexdigit()), "{t1}");
    let mode = std::fs::metadata(state.join("token"))
        .expect("token file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(api::load_or_create_token(&state).expect("reuse"), t1);
    let other = TempDir::new("token2");
    assert_ne!(api::load_or_create_token(&other.0).expect("create"), t1);
}

#[test]
fn the_client_config_file_round_trips_privately() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("clientcfg");
    let path = dir.0.join("sub").join("client.json");
    let c = ClientConfig {
        server: "http://127.0.0.1:7080".into(),
        token: TOKEN.into(),
        ca: None,
    };
    c.save(&path).expect("save");
    assert_eq!(ClientConfig::load(&path).expect("load"), c);
    let mode = std::fs::metadata(&path).expect("file").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // With TLS it carries the CA to trust; a file from before TLS (no `ca`) still loads.
    let tls = ClientConfig {
        server: "https://127.0.0.1:7080".into(),
        ca: Some("-----BEGIN CERTIFICATE-----\n...".into()),
        ..c.clone()
    };
    tls.save(&path).expect("save");
    assert_eq!(ClientConfig::load(&path).expect("load"), tls);
    std::fs::write(
        &path,
        format!(r#"{{"server": "http://127.0.0.1:7080", "token": "{TOKEN}"}}"#),
    )
    .expect("write");
    assert_eq!(ClientConfig::load(&path).expect("load"), c);
    std::fs::write(&path, "not json").expect("write");
    assert!(ClientConfig::load(&path).is_err());
    assert!(ClientConfig::load(&dir.0.join("missing.json")).is_err());
}

/// `/healthz` and `/readyz` answer without the token, and to HEAD with headers only; `/readyz`
/// says ready once the reconciler has run, and 503 with the reason after the tool stopped
/// reconciling.
#[test]
fn liveness_readiness_and_head() {
    let dir = TempDir::new("ready");
    let api = Api::start(&dir.0);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let resp = raw_exchange(api.addr, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n");
        if resp.starts_with("HTTP/1.1 200") {
            assert!(resp.ends_with("ready\n"), "{resp}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never ready: {resp}");
        std::thread::sleep(Duration::from_millis(100));
    }
    for path in ["/healthz", "/readyz"] {
        let resp = raw_exchange(
            api.addr,
            format!("HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        );
        let (head, body) = resp.split_once("\r\n\r\n").expect("a head");
        assert!(head.starts_with("HTTP/1.1 200"), "{resp}");
        assert!(head.contains("Content-Length: "), "{head}");
        assert_eq!(body, "", "HEAD {path} carries no body");
    }
    // The reconciler stops with the tool; the API (still up here) reports not ready.
    api.mgmt.shutdown();
    std::thread::sleep(Duration::from_millis(5_200));
    let resp = raw_exchange(api.addr, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert!(resp.contains("not-ready"), "{resp}");
}

/// kubectl's `--dry-run=server` (`?dryRun=All`) and optimistic concurrency (`If-Match` with the
/// generation last read): a dry run checks and answers but changes nothing; a write naming a
/// generation the appliance no longer has is refused with 412 and changes nothing.
#[test]
fn dry_runs_change_nothing_and_if_match_refuses_stale_writes() {
    let dir = TempDir::new("dryrun");
    let api = Api::start(&dir.0);
    let spec = example("edge-firewall.yaml");
    let with_header = |method: &str, path: &str, header: &str, body: &str| -> (u16, Value) {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n{header}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let resp = raw_exchange(api.addr, req.as_bytes());
        let status: u16 = resp
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {resp:?}"));
        let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    };

    // A dry-run create answers what would be created and stores nothing.
    let (status, v) = api.call(
        "POST",
        "/v1/appliances?dryRun=All",
        "application/yaml",
        &spec,
    );
    assert_eq!(status, 200, "{v:#}");
    assert_eq!(v["name"], "edge-fw");
    assert_eq!(v["generation"], 1);
    assert_eq!(api.get("/v1/appliances/edge-fw").0, 404, "nothing stored");
    // A bad spec is refused in a dry run as in a real one.
    let (status, v) = api.call(
        "POST",
        "/v1/appliances?dryRun=All",
        "application/yaml",
        &spec.replace("initial: 2", "initial: 99"),
    );
    assert_eq!(status, 422, "{v:#}");

    assert_eq!(api.apply(&spec).0, 200);
    let events_before = api.get("/v1/appliances/edge-fw/events").1;

    // A dry-run scale shows the new desired count; the appliance keeps its own.
    let (status, v) = api.call(
        "POST",
        "/v1/appliances/edge-fw/scale?dryRun=All",
        "application/json",
        r#"{"dataplanes": 3}"#,
    );
    assert_eq!(status, 200, "{v:#}");
    assert_eq!(v["dataplanes"]["desired"], 3);
    assert_eq!(v["generation"], 2);
    let (_, now) = api.get("/v1/appliances/edge-fw");
    assert_eq!(now["generation"], 1);
    assert_ne!(now["dataplanes"]["desired"], 3);
    assert_eq!(
        api.get("/v1/appliances/edge-fw/events").1,
        events_before,
        "a dry run records no event"
    );

    // If-Match: the right generation writes; the stale one is refused and changes nothing.
    let scale = r#"{"dataplanes": 3}"#;
    let (status, v) = with_header(
        "POST",
        "/v1/appliances/edge-fw/scale",
        "If-Match: \"1\"",
        scale,
    );
    assert_eq!(status, 200, "{v:#}");
    assert_eq!(v["generation"], 2);
    let (status, v) = with_header(
        "POST",
        "/v1/appliances/edge-fw/scale",
        "If-Match: \"1\"",
        r#"{"dataplanes": 1}"#,
    );
    let msg = error_message(status, &v, 412, "precondition_failed");
    assert!(
        msg.contains("generation 2") && msg.contains("not 1"),
        "{msg}"
    );
    assert_eq!(
        api.get("/v1/appliances/edge-fw").1["dataplanes"]["desired"],
        3
    );
    let (status, v) = with_header("DELETE", "/v1/appliances/edge-fw", "If-Match: W/\"1\"", "");
    error_message(status, &v, 412, "precondition_failed");
    let (status, v) = with_header(
        "POST",
        "/v1/appliances/nope/scale",
        "If-Match: \"1\"",
        scale,
    );
    assert!(status == 404 || status == 412, "{status} {v:#}");
    // Malformed options are 400s, not ignored.
    let (status, v) = with_header(
        "POST",
        "/v1/appliances/edge-fw/scale",
        "If-Match: \"two\"",
        scale,
    );
    error_message(status, &v, 400, "bad_request");
    let (status, v) = api.call(
        "POST",
        "/v1/appliances/edge-fw/scale?dryRun=maybe",
        "application/json",
        scale,
    );
    error_message(status, &v, 400, "bad_request");

    // A dry-run delete keeps the appliance.
    let (status, v) = api.call("DELETE", "/v1/appliances/edge-fw?dryRun=All", "", "");
    assert_eq!(status, 200, "{v:#}");
    assert_eq!(v["dryRun"], true);
    assert_eq!(api.get("/v1/appliances/edge-fw").0, 200);
    api.stop();
}

#[test]
fn seeing_traffic_calls_check_their_input_before_asking_any_unit() {
    let dir = TempDir::new("seeing");
    let api = Api::start(&dir.0);
    let anon = Client::new(&api.url(), None).expect("client");
    for path in [
        "/v1/appliances/edge-fw/flows",
        "/v1/appliances/edge-fw/units/1/config",
        "/v1/appliances/edge-fw/capture",
        "/v1/appliances/edge-fw/monitor",
    ] {
        let (status, _) = anon.raw("GET", path, "", b"").expect("request");
        assert_eq!(status, 401, "{path} needs the token");
    }
    let (s, v) = api.get("/v1/appliances/nope/flows");
    assert!(error_message(s, &v, 404, "not_found").contains("nope"));
    assert_eq!(api.apply(&example("edge-firewall.yaml")).0, 200);
    // Bad filters: 400 naming the value, whatever the units' state.
    for (path, says) in [
        ("/v1/appliances/edge-fw/flows?port=http", "port"),
        ("/v1/appliances/edge-fw/flows?limit=0", "limit"),
        ("/v1/appliances/edge-fw/flows?state=open", "state"),
        ("/v1/appliances/edge-fw/flows?colour=red", "colour"),
        ("/v1/appliances/edge-fw/capture?duration=1h", "duration"),
        ("/v1/appliances/edge-fw/capture?host=a.b", "host"),
        ("/v1/appliances/edge-fw/monitor?type=trace", "type"),
        ("/v1/appliances/edge-fw/monitor?rate=0", "rate"),
        ("/v1/appliances/edge-fw/monitor?duration=2h", "duration"),
        ("/v1/appliances/edge-fw/monitor?port=http", "port"),
        ("/v1/appliances/edge-fw/units/x/config", "x"),
    ] {
        let (s, v) = api.get(path);
        let m = error_message(s, &v, 400, "bad_request");
        assert!(m.contains(says), "{path}: {m}");
    }
    // No unit runs without a lab: nothing to list, nobody to capture on or ask.
    let (s, v) = api.get("/v1/appliances/edge-fw/flows?proto=tcp");
    assert_eq!(s, 200, "{v:#}");
    assert_eq!(v["flows"], Value::Array(vec![]));
    let (s, v) = api.get("/v1/appliances/edge-fw/capture?interface=outside");
    error_message(s, &v, 409, "conflict");
    let (s, v) = api.get("/v1/appliances/edge-fw/monitor?type=drop");
    error_message(s, &v, 409, "conflict");
    let (s, v) = api.get("/v1/appliances/edge-fw/units/99/config");
    error_message(s, &v, 404, "not_found");
    let (s, v) = api.get("/v1/appliances/edge-fw/flows?unit=99");
    error_message(s, &v, 404, "not_found");
}

#[test]
fn openapi_flow_schemas_match_what_the_server_sends() {
    use dva_mgmt::inspect::{FlowsView, UnitError};
    use dva_unit::inspect::{FlowEntry, Tuple};
    let doc: Value = serde_json::from_str(OPENAPI).expect("JSON");
    let schemas = &doc["components"]["schemas"];
    let a = "198.18.1.2".parse().expect("addr");
    let flow = FlowEntry {
        unit: 3,
        proto: 6,
        src: a,
        src_port: 1,
        dst: a,
        dst_port: 2,
        bucket: 7,
        state: "established".into(),
        replica: true,
        previous_owner: true,
        nat: Some(Tuple {
            src: a,
            src_port: 1,
            dst: a,
            dst_port: 2,
        }),
        backend: Some("198.18.2.2:80".into()),
        orig_packets: 1,
        orig_bytes: 1,
        reply_packets: 1,
        reply_bytes: 1,
        age_secs: 1.0,
        idle_secs: 1.0,
    };
    let view = FlowsView {
        appliance: "a".into(),
        flows: vec![flow.clone()],
        truncated: false,
        errors: vec![UnitError {
            unit: 4,
            error: "e".into(),
        }],
    };
    for (name, value) in [
        ("Flow", serde_json::to_value(&flow).expect("json")),
        ("Flows", serde_json::to_value(&view).expect("json")),
    ] {
        let props: BTreeSet<&String> = schemas[name]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("schema {name}"))
            .keys()
            .collect();
        let sent: BTreeSet<&String> = value.as_object().expect("object").keys().collect();
        assert_eq!(props, sent, "schema {name} vs what the server sends");
    }
}

/// The spec's JSON Schema in docs/openapi.json is the one generated from the parser's own types
/// (so it cannot drift from what `dva apply` accepts), and the request bodies refer to it.
#[test]
fn openapi_carries_the_specs_generated_schema() {
    let doc: Value = serde_json::from_str(OPENAPI).expect("docs/openapi.json is JSON");
    let schemas = &doc["components"]["schemas"];
    let generated = dva_proto::spec::openapi_schemas();
    let mut stale = Vec::new();
    for (name, schema) in &generated {
        if &schemas[name.as_str()] != schema {
            stale.push(format!(
                "      \"{name}\": {},",
                serde_json::to_string(schema).unwrap_or_default()
            ));
        }
    }
    assert!(
        stale.is_empty(),
        "docs/openapi.json components.schemas differ from the generated spec schema; \
         replace these lines:\n{}",
        stale.join("\n")
    );
    assert_eq!(
        doc["components"]["requestBodies"]["Spec"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/ApplianceSpec"
    );
    // Every example spec has only the top-level fields the schema names.
    let props = schemas["ApplianceBody"]["properties"]
        .as_object()
        .expect("ApplianceBody properties");
    for entry in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples"))
        .expect("examples")
        .flatten()
    {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let Ok(spec) = dva_proto::ApplianceSpec::from_yaml(&text) else {
            continue;
        };
        let v = serde_json::to_value(&spec.spec).expect("spec as JSON");
        for key in v.as_object().expect("object").keys() {
            assert!(
                props.contains_key(key),
                "{key} of {:?} not in the schema",
                entry.path()
            );
        }
    }
}

/// `?watch=true`: the current objects, then each change as it happens (a scale's desired count,
/// a new event), a deletion ending the watch of that appliance; a missing appliance is a plain
/// 404, a bad timeout a 400, and the token is needed as for any read.
#[test]
fn watches_stream_each_change_and_end_on_delete() {
    let dir = TempDir::new("watch");
    let api = Api::start(&dir.0);
    let (status, v) = api.apply(&example("edge-firewall.yaml"));
    assert_eq!(status, 200, "{v:#}");

    let follow = |path: &str| {
        let (tx, rx) = std::sync::mpsc::channel();
        let client = api.client();
        let path = path.to_string();
        std::thread::spawn(move || {
            let r = client.watch(&path, Duration::from_secs(30), &mut |kind, obj| {
                tx.send((kind.to_string(), obj))
                    .map_err(|_| anyhow::anyhow!("test gone"))
            });
            let _ = tx.send(("END".into(), serde_json::json!(r.is_ok())));
        });
        rx
    };
    let next = |rx: &std::sync::mpsc::Receiver<(String, Value)>| {
        rx.recv_timeout(Duration::from_secs(10))
            .expect("a watch event within 10 s")
    };
    let one = follow("/v1/appliances/edge-fw?watch=true");
    let all = follow("/v1/appliances?watch=1&timeoutSeconds=60");
    let events = follow("/v1/appliances/edge-fw/events?watch=true");
    let (kind, obj) = next(&one);
    assert_eq!(
        (kind.as_str(), obj["name"].as_str()),
        ("ADDED", Some("edge-fw"))
    );
    assert_eq!(next(&all).0, "ADDED");
    let (kind, obj) = next(&events);
    assert_eq!(
        (kind.as_str(), obj["reason"].as_str()),
        ("ADDED", Some("applied"))
    );

    let (status, _) = api.call(
        "POST",
        "/v1/appliances/edge-fw/scale",
        "application/json",
        r#"{"dataplanes": 3}"#,
    );
    assert_eq!(status, 200);
    let desired = |rx: &std::sync::mpsc::Receiver<(String, Value)>| loop {
        let (kind, obj) = next(rx);
        if obj["dataplanes"]["desired"] == 3 {
            break kind;
        }
    };
    assert_eq!(desired(&one), "MODIFIED");
    assert_eq!(desired(&all), "MODIFIED");
    loop {
        let (kind, obj) = next(&events);
        assert_eq!(kind, "ADDED");
        if obj["reason"] == "scaled" {
            break;
        }
    }

    let (status, _) = api.call("DELETE", "/v1/appliances/edge-fw", "", "");
    assert_eq!(status, 200);
    let ended = |rx: &std::sync::mpsc::Receiver<(String, Value)>, deleted: bool| {
        let mut saw_deleted = false;
        loop {
            let (kind, obj) = next(rx);
            if kind == "DELETED" {
                assert_eq!(obj["name"], "edge-fw");
                saw_deleted = true;
            }
            if kind == "END" {
                assert_eq!(saw_deleted, deleted);
                break;
            }
        }
    };
    ended(&one, true);
    ended(&events, false);
    // The list's watch goes on after the deletion (until its timeout): it says DELETED.
    loop {
        if next(&all).0 == "DELETED" {
            break;
        }
    }

    assert_eq!(api.get("/v1/appliances/nosuch?watch=true").0, 404);
    assert_eq!(
        api.get("/v1/appliances?watch=true&timeoutSeconds=soon").0,
        400
    );
    let anon = Client::new(&api.url(), None).expect("client");
    let (status, _) = anon
        .raw("GET", "/v1/appliances?watch=true", "", b"")
        .expect("call");
    assert_eq!(status, 401);
    api.stop();
}

/// Read one answer off a kept-alive connection: the head (up to the blank line) and the body
/// its Content-Length announces.
fn read_answer(r: &mut impl Read) -> (String, String) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        r.read_exact(&mut byte)
            .unwrap_or_else(|e| panic!("{e} after {:?}", String::from_utf8_lossy(&head)));
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).expect("UTF-8 head");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Content-Length in {head}"));
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).expect("body");
    (head, String::from_utf8(body).expect("UTF-8 body"))
}

/// HTTP/1.1 connections serve request after request (pipelined ones too, and bodies in
/// between), each answer saying whether another may follow; `Connection: close`, HTTP/1.0, a
/// body left unread and a malformed request close it; a kept-alive connection may wait for its
/// next request longer than a head may take.
#[test]
fn connections_are_kept_alive_until_closed() {
    let dir = TempDir::new("keepalive");
    let api = Api::start(&dir.0);
    let mut s = TcpStream::connect(api.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let (head, body) = read_answer(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("\r\nConnection: keep-alive\r\n"), "{head}");
    assert_eq!(body, "ok\n");
    // Two requests at once, the first with a body: both answered, in order.
    let spec = example("edge-firewall.yaml");
    write!(
        s,
        "POST /v1/appliances HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\n\r\n{spec}GET /v1/appliances/edge-fw HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n",
        spec.len()
    )
    .expect("write");
    let (head, body) = read_answer(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}{body}");
    assert!(head.contains("\r\nConnection: keep-alive\r\n"), "{head}");
    let (head, body) = read_answer(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["name"], "edge-fw");
    // Idle for longer than a head may take: still there for the next request.
    std::thread::sleep(api::HEAD_TIMEOUT + Duration::from_secs(1));
    s.write_all(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
        .expect("write");
    let (head, _) = read_answer(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("\r\nConnection: close\r\n"), "{head}");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("closed after the answer");
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));

    // Each of these answers closes the connection (an HTTP/1.0 client is answered in HTTP/1.0).
    for (request, status) in [
        (&b"GET /healthz HTTP/1.0\r\n\r\n"[..], "200"),
        // A body the call does not read: where the next request starts is unknown.
        (
            b"GET /healthz HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            "200",
        ),
        (
            b"GET /v1/appliances HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            "401",
        ),
        (b"GET /healthz HTTP/1.1\r\nbroken header\r\n\r\n", "400"),
    ] {
        let mut s = TcpStream::connect(api.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(request).expect("write");
        let mut resp = String::new();
        s.read_to_string(&mut resp)
            .expect("the server closes after the answer");
        let version = if request.ends_with(b"HTTP/1.0\r\n\r\n") {
            "HTTP/1.0"
        } else {
            "HTTP/1.1"
        };
        assert!(resp.starts_with(&format!("{version} {status}")), "{resp}");
        assert!(resp.contains("\r\nConnection: close\r\n"), "{resp}");
    }
    // HTTP/1.0 asking for it is kept alive.
    let mut s = TcpStream::connect(api.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .expect("write");
    let (head, _) = read_answer(&mut s);
    assert!(head.contains("\r\nConnection: keep-alive\r\n"), "{head}");
}

/// A kept-alive connection waiting for its next request is an idle connection like a new one:
/// closed to make room when its client floods the server (every local client is 127.0.0.1),
/// and normal calls are still answered.
#[test]
fn idle_kept_alive_connections_are_evicted_under_a_flood() {
    let dir = TempDir::new("keepalive-evict");
    let api = Api::start(&dir.0);
    let mut kept = TcpStream::connect(api.addr).expect("connect");
    kept.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    kept.write_all(b"GET /healthz HTTP/1.1\r\n\r\n")
        .expect("write");
    let (head, _) = read_answer(&mut kept);
    assert!(head.contains("\r\nConnection: keep-alive\r\n"), "{head}");

    let t = std::time::Instant::now();
    let _idle: Vec<TcpStream> = (0..api::MAX_PER_CLIENT + 4)
        .map(|_| {
            let mut s = TcpStream::connect(api.addr).expect("connect");
            s.write_all(b"G").expect("write");
            s
        })
        .collect();
    // The oldest idle connection, the kept-alive one, made room first: closed, unanswered.
    let mut rest = Vec::new();
    kept.read_to_end(&mut rest).expect("closed");
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert!(
        t.elapsed() < api::HEAD_TIMEOUT,
        "closed after {:?}: timed out, not evicted",
        t.elapsed()
    );
    let t = std::time::Instant::now();
    let (status, v) = api.get("/v1/appliances");
    assert_eq!(status, 200, "{v:#}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

/// `dva serve --tls-auto`: a certificate from the installation CA (kept private in its PKI
/// directory), which the typed client trusts to apply, read and watch over https; a client
/// trusting another CA fails the handshake and says so; plain HTTP on the TLS port gets no
/// answer and does not disturb the server; a kept-alive TLS connection serves several requests.
#[test]
fn tls_serves_clients_that_trust_its_ca_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("tls");
    let api = Api::start_tls(&dir.0);
    for f in ["api.crt", "api.key"] {
        let path = dir.0.join("state/pki").join(f);
        let mode = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    assert!(api.url().starts_with("https://"));
    let c = api.client();
    let view = c
        .apply(&example("edge-firewall.yaml"))
        .expect("apply over https");
    assert_eq!(view.name, "edge-fw");
    assert_eq!(c.get("edge-fw").expect("get").name, "edge-fw");
    assert_eq!(c.list().expect("list").len(), 1);

    let (tx, rx) = std::sync::mpsc::channel();
    let watcher = api.client();
    std::thread::spawn(move || {
        let r = watcher.watch(
            "/v1/appliances?watch=true&timeoutSeconds=20",
            Duration::from_secs(30),
            &mut |kind, obj| {
                tx.send((kind.to_string(), obj))
                    .map_err(|_| anyhow::anyhow!("test gone"))
            },
        );
        let _ = tx.send(("END".into(), serde_json::json!(format!("{r:?}"))));
    });
    let next = || {
        rx.recv_timeout(Duration::from_secs(10))
            .expect("a watch event within 10 s")
    };
    let (kind, obj) = next();
    assert_eq!(
        (kind.as_str(), obj["name"].as_str()),
        ("ADDED", Some("edge-fw"))
    );
    let scaled = c
        .scale(
            "edge-fw",
            &serde_json::from_str(r#"{"dataplanes": 3}"#).expect("request"),
        )
        .expect("scale");
    assert_eq!(scaled.dataplanes.desired, 3);
    loop {
        let (kind, obj) = next();
        assert_ne!(kind, "END", "{obj}");
        if obj["dataplanes"]["desired"] == 3 {
            assert_eq!(kind, "MODIFIED");
            break;
        }
    }

    // Another installation's CA: the handshake fails, and the error says it is about TLS.
    let other = dva_mgmt::pki::Pki::generate().expect("CA");
    let stranger =
        Client::with_ca(&api.url(), Some(TOKEN.into()), Some(other.ca_pem())).expect("client");
    let e = format!("{:#}", stranger.list().expect_err("an untrusted server"));
    assert!(e.contains("TLS handshake"), "{e}");
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    // Plain HTTP on the TLS port: no HTTP answer (at most a TLS alert), the connection closed.
    let resp = raw_exchange(api.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(!resp.starts_with("HTTP/"), "{resp:?}");
    let plain = Client::new(&format!("http://{}", api.addr), None).expect("client");
    let e = plain
        .raw("GET", "/healthz", "", b"")
        .expect_err("no plain HTTP");
    assert!(format!("{e:#}").contains("https://"), "{e:#}");
    assert_eq!(api.get("/healthz").0, 200);

    // Keep-alive over TLS: two requests on one connection, then a HEAD that closes it.
    let mut s = api.tls_stream();
    for _ in 0..2 {
        write!(
            s,
            "GET /v1/appliances HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
        )
        .expect("write");
        let (head, body) = read_answer(&mut s);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.contains("\r\nConnection: keep-alive\r\n"), "{head}");
        assert!(body.contains("edge-fw"), "{body}");
    }
    s.write_all(b"HEAD /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .expect("a clean close (close_notify)");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("\r\n\r\n"), "HEAD has no body: {resp}");
    api.stop();
}

/// Over TLS, connections that never send a ClientHello (or only its first byte) are idle
/// connections like any other: a normal call is still answered promptly, and they are closed
/// once their head is overdue (with no answer: without a handshake there is no way to send one).
#[test]
fn tls_connections_that_never_handshake_do_not_lock_out_other_clients() {
    let dir = TempDir::new("tls-idle");
    let api = Api::start_tls(&dir.0);
    let mut idle: Vec<TcpStream> = (0..100)
        .map(|i| {
            let mut s = TcpStream::connect(api.addr).expect("connect");
            if i % 2 == 0 {
                // The first byte of a TLS handshake record.
                s.write_all(&[0x16]).expect("write");
            }
            s
        })
        .collect();
    let t = std::time::Instant::now();
    let (status, v) = api.get("/v1/appliances");
    let took = t.elapsed();
    assert_eq!(status, 200, "{v:#}");
    // A handshake more than over plain HTTP, on a shared machine: still prompt.
    assert!(took < Duration::from_secs(2), "answered after {took:?}");

    let last = idle.last_mut().expect("connections");
    last.set_read_timeout(Some(api::HEAD_TIMEOUT * 2))
        .expect("timeout");
    let t = std::time::Instant::now();
    let mut resp = Vec::new();
    last.read_to_end(&mut resp)
        .expect("closed once its head is overdue");
    assert!(resp.is_empty(), "{resp:?}");
    assert!(
        t.elapsed() < api::HEAD_TIMEOUT + Duration::from_secs(2),
        "{:?}",
        t.elapsed()
    );
}

/// `dva_mgmt_api_request_seconds`: every answered request is timed under its method and route
/// template (never the raw path, so a scan of names adds no series); unrouted paths share one
/// `(unmatched)` series; a stream (here a watch) is not timed.
#[test]
fn answer_times_are_labelled_by_route_template() {
    let dir = TempDir::new("latency");
    let api = Api::start(&dir.0);
    for name in ["no-such-a", "no-such-b", "no-such-c"] {
        assert_eq!(api.get(&format!("/v1/appliances/{name}")).0, 404);
    }
    assert_eq!(api.get("/v1/no/such/route").0, 404);
    assert_eq!(api.call("HEAD", "/healthz", "", "").0, 200);
    // A watch that ends by itself after a second: counted as answered, not timed.
    let (status, _) = api.get("/v1/appliances?watch=true&timeoutSeconds=1");
    assert_eq!(status, 200);

    let (status, text) = api
        .client()
        .raw("GET", "/metrics", "", b"")
        .expect("scrape");
    assert_eq!(status, 200, "{text}");
    let count = |labels: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(&format!("dva_mgmt_api_request_seconds_count{{{labels}}} "))
            })
            .and_then(|v| v.parse::<u64>().ok())
    };
    assert!(
        text.lines()
            .any(|l| l == "# TYPE dva_mgmt_api_request_seconds histogram"),
        "{text}"
    );
    assert_eq!(
        count(r#"method="GET",route="/v1/appliances/{name}""#),
        Some(3),
        "{text}"
    );
    assert_eq!(
        count(r#"method="(unmatched)",route="(unmatched)""#),
        Some(1),
        "{text}"
    );
    assert_eq!(
        count(r#"method="HEAD",route="/healthz""#),
        Some(1),
        "{text}"
    );
    assert_eq!(
        count(r#"method="GET",route="/v1/appliances""#),
        None,
        "the watch is a stream, not timed:\n{text}"
    );
    assert!(
        !text.contains("no-such"),
        "raw paths never become labels:\n{text}"
    );
    // The `+Inf` bucket of every series is its count.
    for l in text.lines().filter(|l| {
        l.starts_with("dva_mgmt_api_request_seconds_bucket{") && l.contains("le=\"+Inf\"")
    }) {
        let (series, n) = l.rsplit_once(' ').expect("sample");
        let labels = series
            .trim_start_matches("dva_mgmt_api_request_seconds_bucket{")
            .trim_end_matches(",le=\"+Inf\"}");
        assert_eq!(
            count(labels).map(|c| c.to_string()).as_deref(),
            Some(n),
            "{l}"
        );
    }
    api.stop();
}
