//! The public HTTP/JSON API under `/v1` (documented in `docs/openapi.json`, which a test keeps in
//! step with [`ROUTES`]), bearer-token auth, and the client file the CLI finds the server by.
//!
//! Every error is JSON `{"error": {"code", "message"}}` with a matching status; no input makes
//! the server panic or lose state: operations go through [`Mgmt`], which validates before it
//! changes anything.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tiny_http::{Header, Method, Request, Response, Server};

use crate::core::Mgmt;
use crate::model::{ApiError, ScaleRequest};

/// The OpenAPI document, served at `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

/// Every route: (method, path template). The router below and the OpenAPI document must agree.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/v1/openapi.json"),
    ("GET", "/v1/appliances"),
    ("POST", "/v1/appliances"),
    ("GET", "/v1/appliances/{name}"),
    ("PUT", "/v1/appliances/{name}"),
    ("DELETE", "/v1/appliances/{name}"),
    ("POST", "/v1/appliances/{name}/scale"),
    ("GET", "/v1/appliances/{name}/units"),
    ("GET", "/v1/appliances/{name}/events"),
];

/// Largest request body accepted (a spec is a few KB).
const MAX_BODY: u64 = 1 << 20;
const WORKERS: usize = 4;

pub struct ApiServer {
    server: Arc<Server>,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

impl ApiServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.server.unblock();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Serve the API on `listen` with a few worker threads (a delete waits for units to stop; other
/// calls keep being answered meanwhile).
pub fn serve(mgmt: Mgmt, listen: SocketAddr, token: String) -> anyhow::Result<ApiServer> {
    let server = Server::http(listen).map_err(|e| anyhow::anyhow!("listening on {listen}: {e}"))?;
    let addr = server
        .server_addr()
        .to_ip()
        .context("the API listens on an IP address")?;
    let server = Arc::new(server);
    let stop = Arc::new(AtomicBool::new(false));
    let token = Arc::new(token);
    let mut workers = Vec::new();
    for i in 0..WORKERS {
        let (server, stop, token, mgmt) =
            (server.clone(), stop.clone(), token.clone(), mgmt.clone());
        workers.push(
            std::thread::Builder::new()
                .name(format!("api-{i}"))
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        match server.recv_timeout(Duration::from_millis(200)) {
                            Ok(Some(req)) => handle(&mgmt, &token, req),
                            Ok(None) => {}
                            Err(_) => break,
                        }
                    }
                })?,
        );
    }
    Ok(ApiServer {
        server,
        addr,
        stop,
        workers,
    })
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: String,
}

fn json_header() -> Header {
    Header::from_bytes("Content-Type", "application/json").expect("static header is valid")
}

fn respond_json<T: Serialize>(req: Request, status: u16, body: &T) {
    let text = serde_json::to_string_pretty(body).unwrap_or_else(|_| "{}".into());
    let _ = req.respond(
        Response::from_string(text + "\n")
            .with_status_code(status)
            .with_header(json_header()),
    );
}

fn respond_error(req: Request, status: u16, code: &str, message: String) {
    respond_json(
        req,
        status,
        &ErrorBody {
            error: ErrorDetail { code, message },
        },
    );
}

fn respond_api_error(req: Request, e: ApiError) {
    respond_error(req, e.status(), e.code(), e.to_string());
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from response times.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(req: &Request, token: &str) -> bool {
    req.headers()
        .iter()
        .find(|h| h.field.equiv("Authorization"))
        .and_then(|h| h.value.as_str().strip_prefix("Bearer "))
        .is_some_and(|t| same(t.trim().as_bytes(), token.as_bytes()))
}

fn read_body(req: &mut Request) -> Result<String, (u16, &'static str, String)> {
    let mut body = Vec::new();
    let n = req
        .as_reader()
        .take(MAX_BODY + 1)
        .read_to_end(&mut body)
        .map_err(|e| (400, "bad_request", format!("reading the body: {e}")))?;
    if n as u64 > MAX_BODY {
        return Err((413, "too_large", format!("body over {MAX_BODY} bytes")));
    }
    String::from_utf8(body).map_err(|_| (400, "bad_request", "body is not UTF-8".into()))
}

fn handle(mgmt: &Mgmt, token: &str, mut req: Request) {
    let url = req.url().to_string();
    let path = url.split('?').next().unwrap_or("").trim_end_matches('/');
    let path = if path.is_empty() { "/" } else { path };
    let method = req.method().clone();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // Unauthenticated: liveness and the API's own description.
    match (&method, path) {
        (Method::Get, "/healthz") => {
            let _ = req.respond(Response::from_string("ok\n"));
            return;
        }
        (Method::Get, "/v1/openapi.json") => {
            let _ = req.respond(Response::from_string(OPENAPI).with_header(json_header()));
            return;
        }
        _ => {}
    }
    let known = ROUTES.iter().any(|(_, t)| matches_template(t, &segments));
    if !known {
        return respond_error(req, 404, "not_found", format!("no route {path}"));
    }
    if !authorized(&req, token) {
        return respond_error(
            req,
            401,
            "unauthorized",
            "missing or wrong bearer token (Authorization: Bearer <token>; `dva serve` prints where the token is)".into(),
        );
    }
    match (&method, segments.as_slice()) {
        (Method::Get, ["v1", "appliances"]) => respond_json(req, 200, &mgmt.list()),
        (Method::Post, ["v1", "appliances"]) => match read_body(&mut req) {
            Ok(body) => match mgmt.apply(&body) {
                Ok(v) => respond_json(req, 200, &v),
                Err(e) => respond_api_error(req, e),
            },
            Err((s, c, m)) => respond_error(req, s, c, m),
        },
        (Method::Get, ["v1", "appliances", name]) => match mgmt.get(name) {
            Ok(v) => respond_json(req, 200, &v),
            Err(e) => respond_api_error(req, e),
        },
        (Method::Put, ["v1", "appliances", name]) => {
            let name = name.to_string();
            match read_body(&mut req) {
                Ok(body) => {
                    match dva_proto::ApplianceSpec::from_yaml(&body) {
                        Ok(spec) if spec.name() != name => {
                            return respond_error(
                                req,
                                422,
                                "invalid",
                                format!(
                                    "metadata.name: {:?} does not match the path's {name:?}",
                                    spec.name()
                                ),
                            )
                        }
                        _ => {}
                    }
                    match mgmt.apply(&body) {
                        Ok(v) => respond_json(req, 200, &v),
                        Err(e) => respond_api_error(req, e),
                    }
                }
                Err((s, c, m)) => respond_error(req, s, c, m),
            }
        }
        (Method::Delete, ["v1", "appliances", name]) => {
            let name = name.to_string();
            match mgmt.delete(&name) {
                Ok(()) => respond_json(req, 200, &serde_json::json!({ "deleted": name })),
                Err(e) => respond_api_error(req, e),
            }
        }
        (Method::Post, ["v1", "appliances", name, "scale"]) => {
            let name = name.to_string();
            match read_body(&mut req) {
                Ok(body) => match serde_json::from_str::<ScaleRequest>(&body) {
                    Ok(r) => match mgmt.scale(&name, &r) {
                        Ok(v) => respond_json(req, 200, &v),
                        Err(e) => respond_api_error(req, e),
                    },
                    Err(e) => respond_error(req, 400, "bad_request", format!("scale request: {e}")),
                },
                Err((s, c, m)) => respond_error(req, s, c, m),
            }
        }
        (Method::Get, ["v1", "appliances", name, "units"]) => match mgmt.units(name) {
            Ok(v) => respond_json(req, 200, &v),
            Err(e) => respond_api_error(req, e),
        },
        (Method::Get, ["v1", "appliances", name, "events"]) => match mgmt.events(name) {
            Ok(v) => respond_json(req, 200, &v),
            Err(e) => respond_api_error(req, e),
        },
        _ => respond_error(
            req,
            405,
            "method_not_allowed",
            format!("{method} is not allowed on {path}"),
        ),
    }
}

fn matches_template(template: &str, segments: &[&str]) -> bool {
    let t: Vec<&str> = template.trim_start_matches('/').split('/').collect();
    t.len() == segments.len()
        && t.iter()
            .zip(segments)
            .all(|(a, b)| (a.starts_with('{') && !b.is_empty()) || a == b)
}

/// The API token: `<state>/token`, 32 random bytes in hex, created (mode 0600) on first start.
pub fn load_or_create_token(state_dir: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = state_dir.join("token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_string();
        if t.len() >= 32 {
            return Ok(t);
        }
    }
    std::fs::create_dir_all(state_dir)?;
    let mut raw = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .context("reading /dev/urandom")?;
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut f, token.as_bytes())?;
    Ok(token)
}

/// Where the CLI finds the server and its token (kubeconfig-like), written by `dva serve`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientConfig {
    pub server: String,
    pub token: String,
}

impl ClientConfig {
    /// `$DVA_CLIENT_CONFIG`, else `$HOME/.dva/client.json`.
    pub fn default_path() -> PathBuf {
        if let Some(p) = std::env::var_os("DVA_CLIENT_CONFIG") {
            return PathBuf::from(p);
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
        PathBuf::from(home).join(".dva").join("client.json")
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("writing {}", path.display()))?;
        std::io::Write::write_all(&mut f, serde_json::to_string_pretty(self)?.as_bytes())?;
        Ok(())
    }

    pub fn load(path: &Path) -> anyhow::Result<ClientConfig> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a client config", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The router's routes and the checked-in OpenAPI document describe the same API.
    #[test]
    fn routes_match_the_openapi_document() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        let mut documented = BTreeSet::new();
        for (path, ops) in doc["paths"].as_object().expect("paths") {
            for (method, _) in ops.as_object().expect("operations") {
                if method == "parameters" {
                    continue;
                }
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
        let routed: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(routed, documented);
    }

    #[test]
    fn templates_match_segments() {
        assert!(matches_template(
            "/v1/appliances/{name}",
            &["v1", "appliances", "x"]
        ));
        assert!(!matches_template(
            "/v1/appliances/{name}",
            &["v1", "appliances", ""]
        ));
        assert!(!matches_template(
            "/v1/appliances",
            &["v1", "appliances", "x"]
        ));
        assert!(same(b"abc", b"abc") && !same(b"abc", b"abd") && !same(b"ab", b"abc"));
    }
}
