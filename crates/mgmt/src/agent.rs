//! `dva agent`: one per machine. It joins the installation once (a join token buys the CA and a
//! certificate for its API), then runs the units the management tool assigns to this machine,
//! under its own run directory, and answers the management tool's calls over TCP with mutual
//! TLS: start, stop, kill, find, alive, its status (every unit with pid, start time, whether
//! alive and its exit status), and GETs relayed to a unit's control socket, so the management
//! tool never needs a file on this machine.
//!
//! * Only the management tool (a certificate of the installation CA naming `dva://mgmt`) may
//!   call; a client without a certificate of that CA does not get past the handshake, a unit's
//!   certificate gets 403.
//! * Units are their own process group and outlive the agent; a restarted agent finds them again
//!   from `<state>/units.json` and `/proc` (the local provisioner's matching), so the management
//!   tool sees the same pids.
//! * `<state>` (default `/var/lib/dva/agent`) is 0700 and holds `ca.pem`, `cert.pem`, `key.pem`,
//!   `units.json` (0600); a restart reuses the certificate rather than joining again.
//!
//! HTTP/1.1 is hyper's (a tokio runtime of the agent's own, TLS by tokio-rustls), one request
//! per connection (`Connection: close`), bounded like the API's: a head of at most [`MAX_HEAD`]
//! bytes, a body of at most [`MAX_BODY`] (checked against `Content-Length` before reading), the
//! handshake, head and body within [`IO_TIMEOUT`] of connecting, at most [`MAX_CONNECTIONS`] at
//! once. The calls themselves (start a unit, ask one) block, so they run on the blocking pool.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use dva_unit::tls::{Credentials, Peer};

use crate::hosts::{JoinAnswer, JoinRequest};
use crate::model::{now_ms, UnitRole};
use crate::pki::Issued;
use crate::provision::{LocalProvisioner, Provisioner, UnitLaunch, UnitProcess};

pub const MAX_HEAD: usize = 16 << 10;
pub const MAX_BODY: usize = 1 << 20;
/// Time a caller has for its handshake, head and body; and an answer to be written.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_CONNECTIONS: usize = 64;
/// How long a relayed control call may take at the unit.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);

/// `POST /v1/units`: start a unit (the management tool issued its credentials).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    pub appliance: String,
    pub id: u32,
    pub role: UnitRole,
    pub managers: String,
    pub listen: Option<String>,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

/// A unit's process: its pid and start time (clock ticks after boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitRef {
    pub pid: u32,
    pub start: Option<u64>,
}

/// One unit the agent started (or found again), as `GET /v1/status` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentUnit {
    pub appliance: String,
    pub id: u32,
    pub role: UnitRole,
    pub pid: u32,
    pub start: Option<u64>,
    pub started_ms: u64,
    #[serde(default)]
    pub alive: bool,
    /// The exit code (or `-signal`) once it exited, when the agent saw it exit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<i32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentStatus {
    pub name: String,
    pub cpus: u32,
    pub memory_mb: u64,
    pub units: Vec<AgentUnit>,
}

#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The management API (`http://HOST:PORT` or `https://...`).
    pub server: String,
    /// What authorizes the join (a one-time join token, or the API token).
    pub join_token: String,
    /// With an https server: the CA file its certificate chains to.
    pub server_ca: Option<PathBuf>,
    pub name: String,
    pub listen: SocketAddr,
    pub backplane: IpAddr,
    pub labels: BTreeMap<String, String>,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub exe: PathBuf,
}

/// This machine's CPUs and memory (MB), as registered.
pub fn capacity() -> (u32, u64) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024);
    (cpus, mem)
}

struct Agent {
    name: String,
    run_dir: PathBuf,
    state_dir: PathBuf,
    local: LocalProvisioner,
    units: Mutex<Vec<AgentUnit>>,
    cpus: u32,
    memory_mb: u64,
}

/// Run the agent until `stop` is set: join if this machine has no certificate yet, adopt the
/// units still running, serve the management tool's calls.
pub fn run(opts: &AgentOptions, stop: &AtomicBool) -> anyhow::Result<()> {
    crate::hosts::check_name(&opts.name).map_err(|e| anyhow::anyhow!("--name: {e}"))?;
    dva_io::local::create_private_dir_all(&opts.state_dir)
        .with_context(|| format!("creating {}", opts.state_dir.display()))?;
    let creds = match load_credentials(&opts.state_dir)? {
        Some(c) => {
            tracing::info!(
                "agent: reusing the certificate in {}",
                opts.state_dir.display()
            );
            c
        }
        None => {
            if opts.join_token.is_empty() {
                bail!(
                    "no certificate in {} yet: --join-token is needed to join (make one with \
                     `dva join-token`)",
                    opts.state_dir.display()
                );
            }
            let answer = join(opts)?;
            let issued = Issued {
                cert_pem: answer.cert_pem,
                key_pem: answer.key_pem,
                ca_pem: answer.ca_pem,
            };
            crate::pki::write_unit_files(&opts.state_dir, &issued)?;
            tracing::info!(name = %opts.name, "agent: joined {}", opts.server);
            issued
        }
    };
    let config = Credentials::from_pem(&creds.cert_pem, &creds.key_pem, &creds.ca_pem)
        .and_then(|c| c.server_config())
        .context("the agent's certificate")?;
    let (cpus, memory_mb) = capacity();
    let agent = Arc::new(Agent {
        name: opts.name.clone(),
        run_dir: opts.run_dir.clone(),
        state_dir: opts.state_dir.clone(),
        local: LocalProvisioner::new(opts.exe.clone()),
        units: Mutex::new(Vec::new()),
        cpus,
        memory_mb,
    });
    agent.adopt();
    let listener = TcpListener::bind(opts.listen)
        .with_context(|| format!("listening on {} (--listen)", opts.listen))?;
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(MAX_CONNECTIONS)
        .thread_name("agent")
        .build()
        .context("starting the agent's runtime")?;
    let listener = {
        let _entered = runtime.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    tracing::info!(listen = %opts.listen, "agent: serving the management tool (mutual TLS)");
    runtime.block_on(accept_loop(&listener, &agent, &config, stop));
    runtime.shutdown_timeout(Duration::from_millis(100));
    // The units keep running: they serve traffic whether or not an agent watches them.
    Ok(())
}

/// Accept until `stop` (a plain flag: looked at between accepts, every 50 ms at most).
async fn accept_loop(
    listener: &tokio::net::TcpListener,
    agent: &Arc<Agent>,
    config: &Arc<rustls::ServerConfig>,
    stop: &AtomicBool,
) {
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Acquire) {
        let accepted =
            match tokio::time::timeout(Duration::from_millis(50), listener.accept()).await {
                Ok(a) => a,
                Err(_) => continue,
            };
        match accepted {
            Ok((sock, peer)) => {
                if active.load(Ordering::Acquire) >= MAX_CONNECTIONS {
                    tracing::warn!(%peer, "agent: too many connections; closing one");
                    continue;
                }
                active.fetch_add(1, Ordering::AcqRel);
                let (agent, config, count) = (agent.clone(), config.clone(), active.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve_connection(agent, config, sock).await {
                        tracing::debug!(%peer, "agent: connection: {e:#}");
                    }
                    count.fetch_sub(1, Ordering::AcqRel);
                });
            }
            Err(e) => {
                tracing::warn!("agent: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn load_credentials(dir: &Path) -> anyhow::Result<Option<Issued>> {
    let (cert, key, ca) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("ca.pem"),
    );
    if !(cert.exists() && key.exists() && ca.exists()) {
        return Ok(None);
    }
    let read =
        |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    Ok(Some(Issued {
        cert_pem: read(&cert)?,
        key_pem: read(&key)?,
        ca_pem: read(&ca)?,
    }))
}

/// `POST /v1/hosts/{name}/join` on the management API.
/// Whether `url` (`http://HOST:PORT...`) names a loopback address.
fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or("");
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn join(opts: &AgentOptions) -> anyhow::Result<JoinAnswer> {
    let (cpus, memory_mb) = capacity();
    let req = JoinRequest {
        agent: opts.listen,
        backplane: opts.backplane,
        labels: opts.labels.clone(),
        cpus,
        memory_mb,
    };
    let ca = match &opts.server_ca {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        None => None,
    };
    // The join token goes up and the agent's private key comes back: over plain HTTP anyone on
    // the path reads both. Allowed (a lab, loopback), but said.
    if opts.server.starts_with("http://") && !is_loopback_url(&opts.server) {
        tracing::warn!(
            server = %opts.server,
            "joining over plain HTTP: the join token and this agent's key cross the network in \
             clear; serve the API with `dva serve --tls-auto` (or --tls-cert) and give --ca"
        );
    }
    let client =
        crate::client::Client::with_ca(&opts.server, Some(opts.join_token.clone()), ca.as_deref())?;
    let path = format!("/v1/hosts/{}/join", opts.name);
    let (status, body) = client
        .raw(
            "POST",
            &path,
            "application/json",
            &serde_json::to_vec(&req)?,
        )
        .with_context(|| format!("joining {}", opts.server))?;
    if status != 200 {
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let msg = v["error"]["message"]
            .as_str()
            .map_or_else(|| body.trim().to_string(), str::to_string);
        bail!(
            "joining {} as {:?}: HTTP {status}: {msg}",
            opts.server,
            opts.name
        );
    }
    serde_json::from_str(&body).context("the join answer")
}

impl Agent {
    fn launch(&self, appliance: &str, id: u32, role: UnitRole) -> UnitLaunch {
        let dir = self.run_dir.join(appliance);
        UnitLaunch {
            appliance: appliance.to_string(),
            id,
            role,
            host: self.name.clone(),
            netns: None,
            managers: String::new(),
            listen: None,
            tls_dir: dir.join(format!("unit-{id}")),
            credentials: None,
            control: dir.join(format!("unit-{id}.sock")),
            log: dir.join(format!("unit-{id}.log")),
        }
    }

    fn units(&self) -> std::sync::MutexGuard<'_, Vec<AgentUnit>> {
        self.units.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After a restart: the units recorded that still run (by pid and start time, else found
    /// again by their command line).
    fn adopt(&self) {
        let path = self.state_dir.join("units.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return;
        };
        let recorded: Vec<AgentUnit> = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(
                    "agent: {} is unreadable ({e}); starting empty",
                    path.display()
                );
                return;
            }
        };
        let mut kept = Vec::new();
        for mut u in recorded {
            let l = self.launch(&u.appliance, u.id, u.role);
            let p = UnitProcess {
                pid: u.pid,
                start: u.start,
            };
            if self.local.alive(p, &l) {
                kept.push(u);
            } else if let Some(f) = self.local.find(&l).first() {
                u.pid = f.pid;
                u.start = f.start;
                kept.push(u);
            }
        }
        tracing::info!(units = kept.len(), "agent: adopted the units still running");
        *self.units() = kept;
        self.save();
    }

    fn save(&self) {
        let units = self.units().clone();
        let path = self.state_dir.join("units.json");
        let tmp = self.state_dir.join("units.json.tmp");
        let written = serde_json::to_vec_pretty(&units)
            .map_err(std::io::Error::other)
            .and_then(|text| {
                let _ = std::fs::remove_file(&tmp);
                std::fs::OpenOptions::new()
                    .create_new(true)
                    .write(true)
                    .mode(0o600)
                    .open(&tmp)
                    .and_then(|mut f| f.write_all(&text))
            })
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!("agent: writing {}: {e}", path.display());
        }
    }

    fn status(&self) -> AgentStatus {
        let mut units = self.units().clone();
        for u in units.iter_mut() {
            let l = self.launch(&u.appliance, u.id, u.role);
            u.alive = self.local.alive(
                UnitProcess {
                    pid: u.pid,
                    start: u.start,
                },
                &l,
            );
            if !u.alive {
                u.exit = self.local.exit_code(u.pid);
            }
        }
        // Forget exited units after a while: the management tool has seen them go.
        {
            let mut kept = self.units();
            let before = kept.len();
            let gone: Vec<(String, u32, u32)> = units
                .iter()
                .filter(|u| !u.alive && now_ms().saturating_sub(u.started_ms) > 600_000)
                .map(|u| (u.appliance.clone(), u.id, u.pid))
                .collect();
            kept.retain(|k| !gone.contains(&(k.appliance.clone(), k.id, k.pid)));
            if kept.len() != before {
                drop(kept);
                self.save();
            }
        }
        AgentStatus {
            name: self.name.clone(),
            cpus: self.cpus,
            memory_mb: self.memory_mb,
            units,
        }
    }

    fn start(&self, req: StartRequest) -> Result<UnitRef, Reply> {
        check_appliance(&req.appliance)?;
        let mut l = self.launch(&req.appliance, req.id, req.role);
        l.managers = req.managers;
        l.listen = req.listen;
        l.credentials = Some(Issued {
            cert_pem: req.cert_pem,
            key_pem: req.key_pem,
            ca_pem: req.ca_pem,
        });
        let p = self
            .local
            .start(&l)
            .map_err(|e| Reply::error(500, format!("{e:#}")))?;
        tracing::info!(appliance = %req.appliance, unit = req.id, pid = p.pid, "agent: started");
        self.units().push(AgentUnit {
            appliance: req.appliance,
            id: req.id,
            role: req.role,
            pid: p.pid,
            start: p.start,
            started_ms: now_ms(),
            alive: true,
            exit: None,
        });
        self.save();
        Ok(UnitRef {
            pid: p.pid,
            start: p.start,
        })
    }

    fn role_of(&self, appliance: &str, id: u32) -> UnitRole {
        self.units()
            .iter()
            .find(|u| u.appliance == appliance && u.id == id)
            .map_or(UnitRole::Dataplane, |u| u.role)
    }
}

/// Appliance names become directory names here: nothing that could leave the run directory.
fn check_appliance(name: &str) -> Result<(), Reply> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(['-', '.'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Reply::error(
            400,
            format!("appliance name {name:?} is not allowed"),
        ))
    }
}

struct Reply {
    status: u16,
    body: String,
    content_type: &'static str,
}

impl Reply {
    fn json<T: Serialize>(v: &T) -> Reply {
        Reply {
            status: 200,
            body: serde_json::to_string(v).unwrap_or_else(|_| "null".into()),
            content_type: "application/json",
        }
    }
    fn error(status: u16, message: String) -> Reply {
        Reply {
            status,
            body: serde_json::json!({ "error": { "message": message } }).to_string(),
            content_type: "application/json",
        }
    }
}

impl Reply {
    fn into_response(self) -> http::Response<Full<Bytes>> {
        let mut r = http::Response::new(Full::new(Bytes::from(self.body)));
        *r.status_mut() = http::StatusCode::from_u16(self.status)
            .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(self.content_type),
        );
        r
    }
}

async fn serve_connection(
    agent: Arc<Agent>,
    config: Arc<rustls::ServerConfig>,
    sock: tokio::net::TcpStream,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + IO_TIMEOUT;
    let _ = sock.set_nodelay(true);
    // The client verifier refuses a peer without a certificate of our CA here.
    let tls = tokio::time::timeout_at(
        deadline,
        tokio_rustls::TlsAcceptor::from(config).accept(sock),
    )
    .await
    .map_err(|_| anyhow!("TLS handshake timed out"))?
    .context("TLS handshake")?;
    let refused = match tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(Peer::of_cert)
    {
        Some(Ok(Peer::Mgmt)) => None,
        Some(Ok(other)) => Some(format!("{other:?} may not call the agent")),
        Some(Err(e)) => Some(e),
        None => Some("no client certificate".into()),
    };
    let service = hyper::service::service_fn(move |req| {
        let (agent, refused) = (agent.clone(), refused.clone());
        async move {
            let reply = match refused {
                Some(why) => Reply::error(403, why),
                None => answer(agent, req, deadline).await,
            };
            Ok::<_, Infallible>(reply.into_response())
        }
    });
    hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(deadline.saturating_duration_since(tokio::time::Instant::now()))
        .keep_alive(false)
        .max_buf_size(MAX_HEAD)
        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
        .await
        .context("serving")
}

/// Read the body (by `deadline`, at most [`MAX_BODY`]) and route the call on the blocking pool.
async fn answer(
    agent: Arc<Agent>,
    req: http::Request<Incoming>,
    deadline: tokio::time::Instant,
) -> Reply {
    let method = req.method().as_str().to_string();
    let target = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let length = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if length > MAX_BODY as u64 {
        return Reply::error(400, format!("body of {length} bytes is too large"));
    }
    let read = http_body_util::Limited::new(req.into_body(), MAX_BODY).collect();
    let body = match tokio::time::timeout_at(deadline, read).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => return Reply::error(400, format!("reading the body: {e}")),
        Err(_) => return Reply::error(400, "request body timed out".into()),
    };
    tokio::task::spawn_blocking(move || route(&agent, &method, &target, &body))
        .await
        .unwrap_or_else(|_| Reply::error(500, "the call failed unexpectedly".into()))
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Reply> {
    serde_json::from_slice(body).map_err(|e| Reply::error(400, format!("request body: {e}")))
}

fn route(agent: &Agent, method: &str, target: &str, body: &[u8]) -> Reply {
    let path = target.split('?').next().unwrap_or("");
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let result = match (method, segments.as_slice()) {
        ("GET", ["v1", "status"]) => Ok(Reply::json(&agent.status())),
        ("POST", ["v1", "units"]) => parse::<StartRequest>(body)
            .and_then(|r| agent.start(r))
            .map(|r| Reply::json(&r)),
        ("POST", ["v1", "units", app, id, op]) => unit_op(agent, app, id, op, body),
        ("GET", ["v1", "units", app, id, "control", ..]) => {
            // Everything after `/control` (query included) is the unit's own path.
            let prefix = format!("/v1/units/{app}/{id}/control");
            let rest = target.strip_prefix(&prefix).unwrap_or("/");
            let rest = if rest.is_empty() { "/" } else { rest };
            control(agent, app, id, rest)
        }
        _ => Err(Reply::error(404, format!("no route {method} {path}"))),
    };
    result.unwrap_or_else(|r| r)
}

fn unit_id(id: &str) -> Result<u32, Reply> {
    id.parse()
        .map_err(|_| Reply::error(400, format!("unit id {id:?} is not a number")))
}

fn unit_op(agent: &Agent, app: &str, id: &str, op: &str, body: &[u8]) -> Result<Reply, Reply> {
    check_appliance(app)?;
    let id = unit_id(id)?;
    let l = agent.launch(app, id, agent.role_of(app, id));
    let process = || {
        parse::<UnitRef>(body).map(|r| UnitProcess {
            pid: r.pid,
            start: r.start,
        })
    };
    match op {
        "stop" => {
            agent.local.stop(process()?, &l);
            Ok(Reply::json(&serde_json::json!({})))
        }
        "kill" => {
            agent.local.kill(process()?, &l);
            Ok(Reply::json(&serde_json::json!({})))
        }
        "alive" => {
            let alive = agent.local.alive(process()?, &l);
            Ok(Reply::json(&serde_json::json!({ "alive": alive })))
        }
        "find" => {
            let found: Vec<UnitRef> = agent
                .local
                .find(&l)
                .into_iter()
                .map(|p| UnitRef {
                    pid: p.pid,
                    start: p.start,
                })
                .collect();
            Ok(Reply::json(&found))
        }
        _ => Err(Reply::error(404, format!("no unit operation {op:?}"))),
    }
}

fn control(agent: &Agent, app: &str, id: &str, path: &str) -> Result<Reply, Reply> {
    check_appliance(app)?;
    let id = unit_id(id)?;
    if !path.starts_with('/') || path.contains(['\r', '\n', ' ']) {
        return Err(Reply::error(400, format!("control path {path:?}")));
    }
    let l = agent.launch(app, id, agent.role_of(app, id));
    let (status, body) = agent
        .local
        .control_get(&l, path, CONTROL_TIMEOUT)
        .map_err(|e| Reply::error(502, format!("unit {id} of {app}: control socket: {e}")))?;
    Ok(Reply {
        status,
        body,
        content_type: "application/json",
    })
}

/// One call to an agent at `addr` with the management tool's TLS configuration (its certificate
/// must name `addr`'s IP address); `(status, body)` whatever the status.
pub fn call(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> anyhow::Result<(u16, String)> {
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string())
        .header(http::header::CONNECTION, "close")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::copy_from_slice(body.unwrap_or(b""))))
        .with_context(|| format!("{method} {path} is not a request"))?;
    let exchange = crate::client::exchange_whole(
        crate::client::Callee::Agent,
        addr,
        Some(tls),
        timeout,
        req,
        // Statuses list every unit: bounded, but well above a request's limit.
        MAX_BODY * 16,
    );
    // The timer is made inside the runtime (it needs one).
    let answer = crate::client::block_on(async { tokio::time::timeout(timeout, exchange).await })?
        .map_err(|_| anyhow!("the agent at {addr} did not answer within {timeout:?}"))??;
    Ok((answer.status, answer.body))
}

/// [`call`], expecting 200 and JSON.
pub fn call_json<T: DeserializeOwned>(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> anyhow::Result<T> {
    let (status, text) = call(addr, tls, method, path, body, timeout)?;
    if status != 200 {
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let msg = v["error"]["message"]
            .as_str()
            .map_or_else(|| text.trim().to_string(), str::to_string);
        bail!("{method} {path}: HTTP {status}: {msg}");
    }
    serde_json::from_str(&text).with_context(|| format!("the agent's answer to {method} {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Pki;

    #[test]
    fn loopback_urls() {
        for u in [
            "http://127.0.0.1:7080",
            "http://localhost:7080/",
            "http://[::1]:7080",
        ] {
            assert!(is_loopback_url(u), "{u}");
        }
        for u in [
            "http://198.19.0.1:7080",
            "http://fw1:7080",
            "http://[2001:db8::1]:80",
        ] {
            assert!(!is_loopback_url(u), "{u}");
        }
    }

    fn client(issued: &Issued) -> Arc<rustls::ClientConfig> {
        Credentials::from_pem(&issued.cert_pem, &issued.key_pem, &issued.ca_pem)
            .and_then(|c| c.client_config())
            .expect("client config")
    }

    /// The agent's API answers the management tool only: a unit's certificate of the same CA
    /// gets 403, another CA's (or none) does not get through the handshake; a restart reuses the
    /// stored certificate (no join: the server named here does not exist).
    #[test]
    fn only_the_management_tool_may_call_an_agent() {
        let pki = Pki::generate().unwrap();
        let dir = std::env::temp_dir().join(format!("dva-agent-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        crate::pki::write_unit_files(&dir.join("state"), &pki.issue_agent("h1", ip).unwrap())
            .unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let addr = SocketAddr::new(ip, port);
        let opts = AgentOptions {
            server: "http://127.0.0.1:1".into(),
            join_token: String::new(),
            server_ca: None,
            name: "h1".into(),
            listen: addr,
            backplane: ip,
            labels: BTreeMap::new(),
            state_dir: dir.join("state"),
            run_dir: dir.join("run"),
            exe: PathBuf::from("/bin/false"),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let server = {
            let stop = stop.clone();
            std::thread::spawn(move || run(&opts, &stop))
        };
        let t = Duration::from_secs(3);
        let mgmt = client(&pki.issue_mgmt().unwrap());
        let mut status = None;
        for _ in 0..50 {
            if let Ok(s) = call_json::<AgentStatus>(addr, &mgmt, "GET", "/v1/status", None, t) {
                status = Some(s);
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let status = status.expect("the agent answers the management tool");
        assert_eq!(status.name, "h1");
        assert!(status.units.is_empty());

        let unit = client(&pki.issue_unit("edge-fw", 3, false).unwrap());
        let (code, _) = call(addr, &unit, "GET", "/v1/status", None, t).unwrap();
        assert_eq!(code, 403, "a unit may not call the agent");

        let other = Pki::generate().unwrap();
        let foreign = client(&other.issue_mgmt().unwrap());
        assert!(call(addr, &foreign, "GET", "/v1/status", None, t).is_err());

        // Bad input: clear errors, no crash.
        let (code, body) = call(addr, &mgmt, "POST", "/v1/units", Some(b"{"), t).unwrap();
        assert_eq!(code, 400, "{body}");
        let (code, _) = call(addr, &mgmt, "POST", "/v1/units/../1/stop", Some(b"{}"), t).unwrap();
        assert_eq!(code, 400);
        let (code, _) = call(addr, &mgmt, "GET", "/v1/nothing", None, t).unwrap();
        assert_eq!(code, 404);
        let (code, _) = call(addr, &mgmt, "GET", "/v1/units/a/x/control/stats", None, t).unwrap();
        assert_eq!(code, 400, "unit ids are numbers");

        stop.store(true, Ordering::Release);
        server.join().unwrap().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn appliance_names_stay_in_the_run_directory() {
        for ok in ["edge-fw", "a", "x.y_z"] {
            assert!(check_appliance(ok).is_ok(), "{ok}");
        }
        for bad in ["", "..", ".x", "a/b", "-a", &"x".repeat(64)] {
            assert!(check_appliance(bad).is_err(), "{bad:?}");
        }
    }
}
