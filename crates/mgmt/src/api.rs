//! The public HTTP/JSON API under `/v1` (documented in `docs/openapi.json`, which a test keeps in
//! step with [`ROUTES`]), bearer-token auth, the client file the CLI finds the server by, and the
//! live web view at `/ui` (static files that call the API like any other client).
//!
//! Every error is JSON `{"error": {"code", "message"}}` with a matching status; no input makes
//! the server panic or lose state: operations go through [`Mgmt`], which validates before it
//! changes anything.
//!
//! The HTTP/1.1 layer is a small one of our own on `std::net` rather than a library: it is all
//! bounds. A request head is at most [`MAX_HEAD`] bytes, a body at most [`MAX_BODY`] (checked
//! against `Content-Length` before anything is read or allocated); the head must arrive within
//! [`HEAD_TIMEOUT`] of connecting and the body within [`BODY_TIMEOUT`] after it. At most
//! [`MAX_CONNECTIONS`] are served at once, [`MAX_PER_CLIENT`] from one address (IPv6: one /64),
//! each on its own thread, so a slow call (a delete waits for units to stop) or a slow client
//! holds up nobody else. Connections that have not yet sent a whole head cost their client
//! nothing to lose and are what a flood of idle connections is made of: when a limit is reached,
//! the oldest of those (of that client first) is closed to make room, so idle connections can
//! never lock everyone out, also when they come from the same address (every local user is
//! 127.0.0.1). The acceptor never waits on a client.
//!
//! HTTP/1.1 connections are kept alive (the web view polls every second): after an answer the
//! connection goes back to waiting for a head, evictable like a fresh one, for at most
//! [`KEEPALIVE_IDLE`], and serves at most [`MAX_REQUESTS`]. Whatever leaves the stream in doubt
//! (a body not read, a malformed request) and every stream (watch, capture, monitor) closes it;
//! `Connection: close` is honoured (the CLI sends it).
//!
//! With [`ServeOptions::tls`] the port speaks TLS 1.2/1.3 only. The handshake runs on the
//! connection's own thread, within the head's deadline: a client that connects and never
//! handshakes is an idle connection like any other (counted, evictable, timed out). Everything
//! after it goes through [`Conn`], the same over TCP or TLS.
//! (tiny_http 0.12, tried first, allocates a request's declared `Content-Length` when it drops an
//! unread body: one unauthenticated request declaring a few TB aborted the process.)

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::core::Mgmt;
use crate::etcd::Leader;
use crate::metrics::{ApiLatency, ApiRoute};
use crate::model::{ApiError, ScaleRequest, WriteOptions};

/// The OpenAPI document, served at `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

/// Every route: (method, path template). The router below and the OpenAPI document must agree.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("HEAD", "/healthz"),
    ("GET", "/readyz"),
    ("HEAD", "/readyz"),
    ("GET", "/v1/openapi.json"),
    ("GET", "/metrics"),
    ("GET", "/v1/appliances"),
    ("POST", "/v1/appliances"),
    ("GET", "/v1/appliances/{name}"),
    ("PUT", "/v1/appliances/{name}"),
    ("DELETE", "/v1/appliances/{name}"),
    ("POST", "/v1/appliances/{name}/scale"),
    ("GET", "/v1/appliances/{name}/units"),
    ("GET", "/v1/appliances/{name}/events"),
    ("GET", "/v1/appliances/{name}/stats"),
    ("GET", "/ui"),
    ("GET", "/ui/app.js"),
    ("GET", "/ui/app.css"),
    ("GET", "/v1/appliances/{name}/flows"),
    ("GET", "/v1/appliances/{name}/capture"),
    ("GET", "/v1/appliances/{name}/monitor"),
    ("GET", "/v1/appliances/{name}/units/{unit}/config"),
    ("GET", "/v1/hosts"),
    ("DELETE", "/v1/hosts/{name}"),
    ("POST", "/v1/hosts/{name}/join"),
    ("POST", "/v1/join-tokens"),
];

/// The web view (`/ui`): a page, its script and its style, served without the token because they
/// hold no data; the script asks for the token and calls the API with it like any client.
/// Separate files rather than inline ones, so the page's Content-Security-Policy needs no
/// `'unsafe-inline'`: an injected `<script>` or `style` attribute would not run.
const UI_HTML: &str = include_str!("ui/index.html");
const UI_JS: &str = include_str!("ui/app.js");
const UI_CSS: &str = include_str!("ui/app.css");

/// Headers of every web-view answer. Only our own files run and only our own API is called
/// (`connect-src 'self'`); the page is never framed (clickjacking), never cached (it is tiny,
/// and a stale script after an upgrade would misread the API), and never sniffed into another
/// type; `no-referrer` keeps even the page's path out of other sites' logs.
const UI_HEADERS: &[(&str, &str)] = &[
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
         img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Cache-Control", "no-store"),
    ("Referrer-Policy", "no-referrer"),
];

/// Largest request body accepted (a spec is a few KB).
pub const MAX_BODY: usize = 1 << 20;
/// Largest request line plus headers.
pub const MAX_HEAD: usize = 16 << 10;
/// Connections served at once (beyond it, one still waiting for its head is closed, or else the
/// new one is answered 503).
pub const MAX_CONNECTIONS: usize = 256;
/// Connections served at once from one client address (IPv6: one /64), the same way.
pub const MAX_PER_CLIENT: usize = 16;
/// Time a client has, from connecting, to send the request line and headers.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has, after the head, to send the body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an answer may take to be written.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HEADERS: usize = 100;
/// After answering, how long unread input is drained before closing (so the client reads the
/// answer instead of a reset).
const LINGER: Duration = Duration::from_millis(500);
/// How long [`ApiServer::stop`] waits for calls in progress.
const STOP_WAIT: Duration = Duration::from_secs(15);
/// How long a kept-alive connection waits for its next request. A browser polling every second
/// (the web view) comes back well within it and is spared a new connection (and TLS handshake)
/// per poll; longer would only park threads for clients that left, which eviction reclaims
/// anyway when room is needed.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Requests one connection serves before it is closed (its last answer says so): a client
/// cannot hold one thread for ever, and a long-lived one is spread over fresh connections.
pub const MAX_REQUESTS: u32 = 1000;

/// How [`serve_with`] serves, beyond where and with which token.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Speak TLS with this configuration (see [`tls_server_config`]) instead of plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// With TLS: certificates (PEM) trusted, beside the installation CA, when a call is forwarded
    /// to the leading replica, which serves TLS too (e.g. the `--tls-cert` chain).
    pub forward_ca: Option<String>,
}

struct Shared {
    mgmt: Mgmt,
    token: String,
    tls: Option<Arc<rustls::ServerConfig>>,
    /// How calls are forwarded to the leader: over TLS with this configuration when we serve TLS
    /// (so do the other replicas).
    forward_tls: Option<Arc<rustls::ClientConfig>>,
    stop: AtomicBool,
    /// Connection threads alive (what [`ApiServer::stop`] waits for).
    active: AtomicUsize,
    conns: Mutex<Connections>,
    /// Answers sent, by status code (exported in `/metrics`).
    answered: Mutex<BTreeMap<u16, u64>>,
    /// How long answers took, by route (exported in `/metrics`).
    latency: ApiLatency,
}

impl Shared {
    /// How clients reach this server (and the other replicas, served alike).
    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    fn count(&self, status: u16) {
        let mut a = self.answered.lock().unwrap_or_else(|e| e.into_inner());
        *a.entry(status).or_default() += 1;
    }
}

/// A client, for the per-client limit: its IPv4 address, or its IPv6 /64 (one host's share).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ClientKey(IpAddr);

impl ClientKey {
    fn of(ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(_) => ClientKey(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey(IpAddr::V4(v4)),
                None => {
                    let bits = u128::from(v6) & !((1u128 << 64) - 1);
                    ClientKey(IpAddr::V6(Ipv6Addr::from(bits)))
                }
            },
        }
    }
}

const IN_HEAD: u8 = 0;
const SERVING: u8 = 1;
const EVICTED: u8 = 2;

/// One open connection, as the limits see it.
struct Slot {
    id: u64,
    client: ClientKey,
    /// [`IN_HEAD`] (closing it loses its client nothing), [`SERVING`] or [`EVICTED`]; the
    /// acceptor and the connection's thread each claim it with one compare-exchange, so a
    /// connection is never closed once its request is being served.
    phase: AtomicU8,
    /// To close it from the acceptor when it must make room.
    stream: TcpStream,
}

/// The open connections (at most [`MAX_CONNECTIONS`], so scanning them is cheap), oldest first.
#[derive(Default)]
struct Connections {
    next_id: u64,
    open: Vec<Arc<Slot>>,
}

impl Connections {
    /// Make room for a connection from `client` and register it; `Err` says why there is none.
    fn admit(&mut self, client: ClientKey, stream: &TcpStream) -> Result<Arc<Slot>, String> {
        if self.open.iter().filter(|c| c.client == client).count() >= MAX_PER_CLIENT
            && !self.evict(|c| c.client == client)
        {
            return Err(format!(
                "too many connections from {} (at most {MAX_PER_CLIENT}); retry",
                client.0
            ));
        }
        if self.open.len() >= MAX_CONNECTIONS && !self.evict(|_| true) {
            return Err(format!(
                "too many connections (at most {MAX_CONNECTIONS}); retry"
            ));
        }
        let stream = stream
            .try_clone()
            .map_err(|e| format!("out of resources ({e}); retry"))?;
        self.next_id += 1;
        let slot = Arc::new(Slot {
            id: self.next_id,
            client,
            phase: AtomicU8::new(IN_HEAD),
            stream,
        });
        self.open.push(slot.clone());
        Ok(slot)
    }

    /// Close the oldest connection matching `which` that is still waiting for its head.
    fn evict(&mut self, which: impl Fn(&Slot) -> bool) -> bool {
        let Some(i) = self.open.iter().position(|c| {
            which(c)
                && c.phase
                    .compare_exchange(IN_HEAD, EVICTED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
        }) else {
            return false;
        };
        let slot = self.open.remove(i);
        // Its thread, blocked reading (a head, or a TLS handshake), sees the end of input and
        // finishes.
        let _ = slot.stream.shutdown(Shutdown::Both);
        true
    }

    /// Close every connection waiting for a head (the server stops: kept-alive connections
    /// would otherwise hold it for their idle time).
    fn evict_all_idle(&mut self) {
        while self.evict(|_| true) {}
    }

    fn release(&mut self, id: u64) {
        self.open.retain(|c| c.id != id);
    }
}

/// A running API server; [`stop`](ApiServer::stop) (or drop) ends it.
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// The address actually bound (the real port when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting, and wait (a bounded time) for the calls in progress to finish.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::SeqCst);
        // Watches wake to see it.
        self.shared.mgmt.inner.notify();
        // The acceptor blocks in accept(): a connection of our own wakes it to see the flag.
        let wake = SocketAddr::new(
            match self.addr.ip() {
                IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
                ip => ip,
            },
            self.addr.port(),
        );
        if TcpStream::connect_timeout(&wake, Duration::from_secs(1)).is_ok() {
            let _ = acceptor.join();
        }
        self.shared.conns().evict_all_idle();
        let deadline = Instant::now() + STOP_WAIT;
        while self.shared.active.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Serve the API on `listen` over plain HTTP, each connection on its own thread (at most
/// [`MAX_CONNECTIONS`]).
pub fn serve(mgmt: Mgmt, listen: SocketAddr, token: String) -> anyhow::Result<ApiServer> {
    serve_with(mgmt, listen, token, ServeOptions::default())
}

/// [`serve`], over TLS if `options` say so.
pub fn serve_with(
    mgmt: Mgmt,
    listen: SocketAddr,
    token: String,
    options: ServeOptions,
) -> anyhow::Result<ApiServer> {
    let forward_tls = match &options.tls {
        Some(_) => {
            let mut trusted = mgmt.inner.pki.ca_pem().to_string();
            if let Some(extra) = &options.forward_ca {
                trusted += "\n";
                trusted += extra;
            }
            Some(
                crate::client::tls_client_config(&trusted)
                    .context("the certificates trusted when forwarding to the leader")?,
            )
        }
        None => None,
    };
    let listener = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared {
        mgmt,
        token,
        tls: options.tls,
        forward_tls,
        stop: AtomicBool::new(false),
        active: AtomicUsize::new(0),
        conns: Mutex::new(Connections::default()),
        answered: Mutex::new(BTreeMap::new()),
        latency: crate::metrics::api_latency(),
    });
    let acceptor = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("api-accept".into())
            .spawn(move || accept_loop(&listener, &shared))?
    };
    Ok(ApiServer {
        addr,
        shared,
        acceptor: Some(acceptor),
    })
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    loop {
        let accepted = listener.accept();
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        match accepted {
            Ok((stream, peer)) => dispatch(shared, stream, peer.ip()),
            // Out of file descriptors and the like: back off instead of spinning.
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A connection in progress, for as long as it lives (also through a panic): counted, and
/// registered with the limits.
struct Active {
    shared: Arc<Shared>,
    slot: Arc<Slot>,
}

impl Drop for Active {
    fn drop(&mut self) {
        self.shared.conns().release(self.slot.id);
        self.shared.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Shared {
    fn conns(&self) -> std::sync::MutexGuard<'_, Connections> {
        // The registry is consistent between any two statements: a panic elsewhere leaves it usable.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Answer 503 from the acceptor without ever waiting on the client: one non-blocking write (a
/// new connection's send buffer is empty, so it fits), whatever becomes of it. Over TLS the
/// connection is just closed: an answer would need a handshake, which may wait on the client.
fn busy(shared: &Shared, stream: &TcpStream, why: String) {
    if shared.tls.is_some() {
        return;
    }
    let _ = stream.set_nonblocking(true);
    let r = Reply::error(503, "unavailable", why);
    let _ = (&*stream).write(&r.to_bytes());
}

fn dispatch(shared: &Arc<Shared>, stream: TcpStream, peer: IpAddr) {
    let admitted = shared.conns().admit(ClientKey::of(peer), &stream);
    let slot = match admitted {
        Ok(slot) => slot,
        Err(why) => {
            shared.count(503);
            return busy(shared, &stream, why);
        }
    };
    shared.active.fetch_add(1, Ordering::AcqRel);
    let active = Active {
        shared: shared.clone(),
        slot,
    };
    // Kept to say "busy" should the thread not start (the stream itself moves into it).
    let spare = stream.try_clone();
    let spawned = std::thread::Builder::new()
        .name("api-conn".into())
        .spawn(move || serve_connection(&active, stream));
    // A failed spawn dropped the closure, and with it the registration.
    if let (Err(_), Ok(spare)) = (spawned, spare) {
        busy(shared, &spare, "out of threads; retry".into());
    }
}

/// A served connection: the client's TCP stream, or TLS over it. Reads take a deadline, so a
/// client that trickles bytes (also inside a TLS record, or its handshake) is held to it; the
/// TLS variant drives rustls one socket read at a time for that reason rather than through
/// `rustls::StreamOwned`, whose reads loop over the socket until a record is whole.
enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsConn>),
}

struct TlsConn {
    tls: rustls::ServerConnection,
    sock: TcpStream,
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(t) => &t.sock,
        }
    }

    /// Whether a TLS handshake is still under way (nothing can be answered yet).
    fn handshaking(&self) -> bool {
        matches!(self, Conn::Tls(t) if t.tls.is_handshaking())
    }

    /// Read what arrived (`Ok(0)` at the end of the client's input), waiting until `until` at
    /// most: a `TimedOut` or `WouldBlock` error after it. Over TLS this also completes the
    /// handshake, as the first bytes come.
    fn read_before(&mut self, buf: &mut [u8], until: Instant) -> std::io::Result<usize> {
        let timed_out = || std::io::Error::from(std::io::ErrorKind::TimedOut);
        match self {
            Conn::Plain(s) => {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(timed_out());
                }
                s.set_read_timeout(Some(left))?;
                s.read(buf)
            }
            Conn::Tls(t) => loop {
                match t.tls.reader().read(buf) {
                    // Ok(0): the client's close_notify.
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    // The end of the TCP stream without close_notify: the client left.
                    Err(e) => return Err(e),
                }
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(timed_out());
                }
                t.sock.set_read_timeout(Some(left))?;
                match t.tls.read_tls(&mut t.sock) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
                if let Err(e) = t.tls.process_new_packets() {
                    // Tell the client why (the alert rustls queued), then give up on it.
                    let _ = t.tls.write_tls(&mut t.sock);
                    return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
                }
                // Handshake messages, key updates: what rustls has to say goes out now.
                while t.tls.wants_write() {
                    t.tls.write_tls(&mut t.sock)?;
                }
            },
        }
    }

    /// Stop sending: a TLS close_notify, then the end of our side of the TCP stream.
    fn shutdown_write(&mut self) {
        if let Conn::Tls(t) = self {
            if !t.tls.is_handshaking() {
                t.tls.send_close_notify();
                let _ = t.flush();
            }
        }
        let _ = self.tcp().shutdown(Shutdown::Write);
    }
}

impl TlsConn {
    fn flush(&mut self) -> std::io::Result<()> {
        while self.tls.wants_write() {
            self.tls.write_tls(&mut self.sock)?;
        }
        Ok(())
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(t) => {
                // rustls takes as much plaintext as its bounded buffer has room for; all of it
                // is sent before the next piece is taken (WRITE_TIMEOUT bounds each send).
                let n = t.tls.writer().write(buf)?;
                t.flush()?;
                if n == 0 && !buf.is_empty() {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                Ok(n)
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(t) => t.flush(),
        }
    }
}

/// An HTTP answer: always a complete body with its length.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reply {
    status: u16,
    content_type: &'static str,
    /// Headers beyond the ones every answer has (the web view's security headers).
    headers: &'static [(&'static str, &'static str)],
    body: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: String,
    /// `not_leader`: the leading replica's URL (`scheme://host:port`), where a client follows.
    #[serde(skip_serializing_if = "Option::is_none")]
    leader: Option<String>,
}

impl Reply {
    fn json<T: Serialize>(status: u16, body: &T) -> Reply {
        match serde_json::to_string_pretty(body) {
            Ok(text) => Reply::new(status, "application/json", text + "\n"),
            Err(e) => Reply::error(500, "internal", format!("encoding the answer: {e}")),
        }
    }

    fn error(status: u16, code: &str, message: String) -> Reply {
        Reply::error_detail(
            status,
            ErrorDetail {
                code,
                message,
                leader: None,
            },
        )
    }

    fn error_detail(status: u16, error: ErrorDetail<'_>) -> Reply {
        Reply::new(
            status,
            "application/json",
            serde_json::to_string_pretty(&ErrorBody { error }).unwrap_or_default() + "\n",
        )
    }

    /// 503 `not_leader` for what only the leader streams, naming it (`leader`) so a client can
    /// go there itself.
    fn not_leader(what: &str, leader: String) -> Reply {
        Reply::error_detail(
            503,
            ErrorDetail {
                code: "not_leader",
                message: format!("{what} stream from the leading replica: ask {leader}"),
                leader: Some(leader),
            },
        )
    }

    fn new(status: u16, content_type: &'static str, body: String) -> Reply {
        Reply {
            status,
            content_type,
            headers: &[],
            body,
        }
    }

    /// A file of the web view, with its security headers.
    fn ui(content_type: &'static str, body: &str) -> Reply {
        Reply {
            headers: UI_HEADERS,
            ..Reply::new(200, content_type, body.to_string())
        }
    }

    fn api(e: ApiError) -> Reply {
        Reply::error(e.status(), e.code(), e.to_string())
    }

    fn from<T: Serialize>(r: Result<T, ApiError>) -> Reply {
        match r {
            Ok(v) => Reply::json(200, &v),
            Err(e) => Reply::api(e),
        }
    }

    /// The answer, saying the connection closes after it.
    fn to_bytes(&self) -> Vec<u8> {
        self.encode(false)
    }

    /// The answer; `keep_alive`: the connection serves another request after it.
    fn encode(&self, keep_alive: bool) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            409 => "Conflict",
            412 => "Precondition Failed",
            411 => "Length Required",
            413 => "Content Too Large",
            422 => "Unprocessable Content",
            431 => "Request Header Fields Too Large",
            500 => "Internal Server Error",
            503 => "Service Unavailable",
            505 => "HTTP Version Not Supported",
            _ => "",
        };
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: {}\r\n",
            self.status,
            self.content_type,
            self.body.len(),
            if keep_alive { "keep-alive" } else { "close" }
        );
        if self.status == 401 {
            out += "WWW-Authenticate: Bearer\r\n";
        }
        for (name, value) in self.headers {
            out += &format!("{name}: {value}\r\n");
        }
        out += "\r\n";
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(self.body.as_bytes());
        bytes
    }
}

/// What a request head says that matters here.
#[derive(Debug, Default)]
struct Head {
    method: String,
    target: String,
    authorization: Option<String>,
    content_length: Option<usize>,
    expect_continue: bool,
    /// `If-Match: "<generation>"` (or `W/"…"`, or bare): the generation a write expects.
    if_match: Option<String>,
    /// `X-Dva-Forwarded`: a replica forwarded this call to the one it takes for the leader, so
    /// it is never forwarded again (no loops while an election settles).
    forwarded: bool,
    /// Whether the client would send another request on this connection: HTTP/1.1 unless it
    /// says `Connection: close`, HTTP/1.0 only if it says `Connection: keep-alive`.
    keep_alive: bool,
}

enum ReadError {
    /// The client went away before sending anything: nothing to answer.
    Closed,
    Reply(Reply),
}

impl From<Reply> for ReadError {
    fn from(r: Reply) -> ReadError {
        ReadError::Reply(r)
    }
}

/// A time limit for one part of the request.
#[derive(Debug, Clone, Copy)]
struct Deadline {
    at: Instant,
    /// "head" or "body", for the message.
    part: &'static str,
    limit: Duration,
    /// Passing it closes the connection unanswered: a kept-alive connection nobody used again.
    silent: bool,
}

impl Deadline {
    fn after(limit: Duration, part: &'static str) -> Deadline {
        Deadline {
            at: Instant::now() + limit,
            part,
            limit,
            silent: false,
        }
    }

    /// The wait for the first byte of a kept-alive connection's next request.
    fn idle(limit: Duration) -> Deadline {
        Deadline {
            silent: true,
            ..Deadline::after(limit, "next request")
        }
    }

    fn timed_out(&self) -> ReadError {
        ReadError::Reply(Reply::error(
            408,
            "timeout",
            format!(
                "the request {} did not arrive within {} s",
                self.part,
                self.limit.as_secs()
            ),
        ))
    }
}

/// One read before the deadline: `Ok(0)` at end of input.
fn read_some(s: &mut Conn, buf: &mut [u8], deadline: Deadline) -> Result<usize, ReadError> {
    loop {
        match s.read_before(buf, deadline.at) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                // Before the TLS handshake is done there is no way to answer.
                return Err(if deadline.silent || s.handshaking() {
                    ReadError::Closed
                } else {
                    deadline.timed_out()
                });
            }
            Err(_) => return Err(ReadError::Closed),
        }
    }
}

/// Read up to the end of the next head. `input` holds what was read from the connection and not
/// used yet (a pipelined request), and keeps what follows the head (body bytes). `idle`: how
/// long a kept-alive connection waits for the request to begin, when it is not the first; the
/// head then has [`HEAD_TIMEOUT`] from its first byte.
fn read_head(s: &mut Conn, input: &mut Vec<u8>, idle: Option<Duration>) -> Result<Head, ReadError> {
    let mut deadline = match idle {
        Some(idle) if input.is_empty() => Deadline::idle(idle),
        _ => Deadline::after(HEAD_TIMEOUT, "head"),
    };
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(end) = head_end(input) {
            break end;
        }
        if input.len() > MAX_HEAD {
            return Err(Reply::error(
                431,
                "too_large",
                format!("request head over {MAX_HEAD} bytes"),
            )
            .into());
        }
        let n = read_some(s, &mut chunk, deadline)?;
        if n == 0 {
            if input.iter().all(u8::is_ascii_whitespace) {
                return Err(ReadError::Closed);
            }
            return Err(bad("the request ended inside its head").into());
        }
        if deadline.silent {
            deadline = Deadline::after(HEAD_TIMEOUT, "head");
        }
        input.extend_from_slice(&chunk[..n]);
    };
    let head = parse_head(&input[..end.0])?;
    input.drain(..end.0 + end.1);
    Ok(head)
}

/// Where the head ends: (its length, the length of the blank-line terminator).
fn head_end(buf: &[u8]) -> Option<(usize, usize)> {
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn bad(message: &str) -> Reply {
    Reply::error(400, "bad_request", message.to_string())
}

fn parse_head(bytes: &[u8]) -> Result<Head, Reply> {
    let text = std::str::from_utf8(bytes).map_err(|_| bad("request head is not UTF-8"))?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    // Tolerate blank lines before the request line (RFC 9112 §2.2).
    let request_line = lines
        .by_ref()
        .find(|l| !l.is_empty())
        .ok_or_else(|| bad("empty request"))?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(
            "malformed request line (expected METHOD TARGET HTTP/1.1)",
        ));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(bad("malformed request method"));
    }
    if !target.starts_with('/') {
        return Err(bad("the request target must be a path"));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(Reply::error(
            505,
            "bad_request",
            format!("{version} is not supported (HTTP/1.1 is)"),
        ));
    }
    let mut head = Head {
        method: method.to_string(),
        target: target.to_string(),
        ..Head::default()
    };
    let (mut close, mut keep_alive) = (false, version == "HTTP/1.1");
    for (i, line) in lines.enumerate() {
        if i >= MAX_HEADERS {
            return Err(Reply::error(
                431,
                "too_large",
                format!("more than {MAX_HEADERS} headers"),
            ));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| bad("malformed header line"))?;
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(bad("malformed header name"));
        }
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => {
                let n: u64 = value
                    .parse()
                    .map_err(|_| bad("Content-Length is not a number"))?;
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                // Two differing lengths are how requests get smuggled: refuse.
                if head.content_length.is_some_and(|m| m != n) {
                    return Err(bad("conflicting Content-Length headers"));
                }
                head.content_length = Some(n);
            }
            "transfer-encoding" => {
                return Err(Reply::error(
                    411,
                    "length_required",
                    "chunked bodies are not accepted: send Content-Length".into(),
                ))
            }
            "authorization" => head.authorization = Some(value.to_string()),
            "if-match" => head.if_match = Some(value.to_string()),
            "x-dva-forwarded" => head.forwarded = true,
            "connection" => {
                for option in value.split(',').map(str::trim) {
                    close |= option.eq_ignore_ascii_case("close");
                    keep_alive |= option.eq_ignore_ascii_case("keep-alive");
                }
            }
            "expect" if value.eq_ignore_ascii_case("100-continue") => head.expect_continue = true,
            _ => {}
        }
    }
    // `close` wins over anything else said.
    head.keep_alive = keep_alive && !close;
    Ok(head)
}

/// Read the body `head` announces; `input` holds what was read past the head, and keeps what
/// follows the body.
fn read_body(
    s: &mut Conn,
    head: &Head,
    input: &mut Vec<u8>,
    deadline: Deadline,
) -> Result<String, ReadError> {
    let len = head.content_length.unwrap_or(0);
    if len > MAX_BODY {
        return Err(Reply::error(
            413,
            "too_large",
            format!("body of {len} bytes is over the limit of {MAX_BODY}"),
        )
        .into());
    }
    if head.expect_continue && input.len() < len {
        let _ = s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    let mut chunk = [0u8; 16 << 10];
    while input.len() < len {
        let want = (len - input.len()).min(chunk.len());
        let n = read_some(s, &mut chunk[..want], deadline)?;
        if n == 0 {
            return Err(bad("the body is shorter than its Content-Length").into());
        }
        input.extend_from_slice(&chunk[..n]);
    }
    let next = input.split_off(len);
    let body = std::mem::replace(input, next);
    String::from_utf8(body).map_err(|_| bad("the body is not UTF-8").into())
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from response times.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Head {
    /// The bearer credentials of `Authorization`, if it has that scheme.
    fn bearer(&self) -> Option<&str> {
        let (scheme, credentials) = self.authorization.as_deref()?.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| credentials.trim())
    }
}

fn authorized(head: &Head, token: &str) -> bool {
    let Some(value) = head.authorization.as_deref() else {
        return false;
    };
    let Some((scheme, credentials)) = value.split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer") && same(credentials.trim().as_bytes(), token.as_bytes())
}

/// A routed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call<'a> {
    Health,
    /// 200 while the reconciler runs (a pass within the last seconds), else 503.
    Ready,
    OpenApi,
    /// Prometheus metrics of every unit and of `dva serve` itself.
    Metrics,
    List,
    Apply,
    Get(&'a str),
    Put(&'a str),
    Delete(&'a str),
    Scale(&'a str),
    Units(&'a str),
    Events(&'a str),
    /// Every unit's traffic counters now (rates are two reads apart).
    Stats(&'a str),
    /// The web view's page, script and style: no data in them, so no token.
    Ui,
    UiScript,
    UiStyle,
    /// The connection table; the query is the filter.
    Flows(&'a str, &'a str),
    /// A pcap stream from the dispatchers; the query says where and what.
    Capture(&'a str, &'a str),
    /// A stream of flow and drop events from the data planes (NDJSON); the query says which.
    Monitor(&'a str, &'a str),
    UnitConfig(&'a str, &'a str),
    /// The registered hosts and their state.
    Hosts,
    RemoveHost(&'a str),
    /// An agent joins: authorized by a one-time join token (or the API token), not the API
    /// token alone.
    Join(&'a str),
    JoinToken,
}

impl Call<'_> {
    /// The call's path template in [`ROUTES`]: what its answer time is labelled by (a raw path
    /// would make a label value of every appliance name a client tries).
    fn template(self) -> &'static str {
        match self {
            Call::Health => "/healthz",
            Call::Ready => "/readyz",
            Call::OpenApi => "/v1/openapi.json",
            Call::Metrics => "/metrics",
            Call::List | Call::Apply => "/v1/appliances",
            Call::Get(_) | Call::Put(_) | Call::Delete(_) => "/v1/appliances/{name}",
            Call::Scale(_) => "/v1/appliances/{name}/scale",
            Call::Units(_) => "/v1/appliances/{name}/units",
            Call::Events(_) => "/v1/appliances/{name}/events",
            Call::Stats(_) => "/v1/appliances/{name}/stats",
            Call::Ui => "/ui",
            Call::UiScript => "/ui/app.js",
            Call::UiStyle => "/ui/app.css",
            Call::Flows(..) => "/v1/appliances/{name}/flows",
            Call::Capture(..) => "/v1/appliances/{name}/capture",
            Call::Monitor(..) => "/v1/appliances/{name}/monitor",
            Call::UnitConfig(..) => "/v1/appliances/{name}/units/{unit}/config",
            Call::Hosts => "/v1/hosts",
            Call::RemoveHost(_) => "/v1/hosts/{name}",
            Call::Join(_) => "/v1/hosts/{name}/join",
            Call::JoinToken => "/v1/join-tokens",
        }
    }

    /// Whether only the leader answers it (several replicas on etcd): every call on appliances
    /// and `/metrics`, since the leader alone holds the units' state. Health, readiness, the
    /// OpenAPI document and the web view's files are each replica's own.
    fn leader_only(self) -> bool {
        self.guarded() || matches!(self, Call::Join(_))
    }
    /// Whether the call needs the bearer token.
    fn guarded(self) -> bool {
        !matches!(
            self,
            Call::Health
                | Call::Ready
                | Call::OpenApi
                | Call::Ui
                | Call::UiScript
                | Call::UiStyle
                | Call::Join(_)
        )
    }
    fn has_body(self) -> bool {
        matches!(
            self,
            Call::Apply | Call::Put(_) | Call::Scale(_) | Call::Join(_)
        )
    }
}

/// Map a method and path (query and one trailing slash ignored) to a call: 404 when no route has
/// the path, 405 when one has it with other methods.
fn route<'a>(method: &str, target: &'a str) -> Result<Call<'a>, Reply> {
    let path = target.split(['?', '#']).next().unwrap_or("");
    let query = target
        .split_once('?')
        .map(|(_, q)| q.split('#').next().unwrap_or(""))
        .unwrap_or("");
    let path = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    let segments: Vec<&'a str> = path.split('/').skip(1).collect();
    let call = match (method, segments.as_slice()) {
        ("GET" | "HEAD", ["healthz"]) => Call::Health,
        ("GET" | "HEAD", ["readyz"]) => Call::Ready,
        ("GET", ["v1", "openapi.json"]) => Call::OpenApi,
        ("GET", ["metrics"]) => Call::Metrics,
        ("GET", ["v1", "appliances"]) => Call::List,
        ("POST", ["v1", "appliances"]) => Call::Apply,
        ("GET", ["v1", "appliances", n]) if !n.is_empty() => Call::Get(n),
        ("PUT", ["v1", "appliances", n]) if !n.is_empty() => Call::Put(n),
        ("DELETE", ["v1", "appliances", n]) if !n.is_empty() => Call::Delete(n),
        ("POST", ["v1", "appliances", n, "scale"]) if !n.is_empty() => Call::Scale(n),
        ("GET", ["v1", "appliances", n, "units"]) if !n.is_empty() => Call::Units(n),
        ("GET", ["v1", "appliances", n, "events"]) if !n.is_empty() => Call::Events(n),
        ("GET", ["v1", "appliances", n, "stats"]) if !n.is_empty() => Call::Stats(n),
        ("GET", ["v1", "hosts"]) => Call::Hosts,
        ("DELETE", ["v1", "hosts", n]) if !n.is_empty() => Call::RemoveHost(n),
        ("POST", ["v1", "hosts", n, "join"]) if !n.is_empty() => Call::Join(n),
        ("POST", ["v1", "join-tokens"]) => Call::JoinToken,
        ("GET", ["ui"]) => Call::Ui,
        ("GET", ["ui", "app.js"]) => Call::UiScript,
        ("GET", ["ui", "app.css"]) => Call::UiStyle,
        ("GET", ["v1", "appliances", n, "flows"]) if !n.is_empty() => Call::Flows(n, query),
        ("GET", ["v1", "appliances", n, "capture"]) if !n.is_empty() => Call::Capture(n, query),
        ("GET", ["v1", "appliances", n, "monitor"]) if !n.is_empty() => Call::Monitor(n, query),
        ("GET", ["v1", "appliances", n, "units", u, "config"])
            if !n.is_empty() && !u.is_empty() =>
        {
            Call::UnitConfig(n, u)
        }
        _ => {
            let allowed: Vec<&str> = ROUTES
                .iter()
                .filter(|(_, t)| matches_template(t, &segments))
                .map(|(m, _)| *m)
                .collect();
            return Err(if allowed.is_empty() {
                Reply::error(404, "not_found", format!("no route {path}"))
            } else {
                Reply::error(
                    405,
                    "method_not_allowed",
                    format!(
                        "{method} is not allowed on {path} (allowed: {})",
                        allowed.join(", ")
                    ),
                )
            });
        }
    };
    Ok(call)
}

fn matches_template(template: &str, segments: &[&str]) -> bool {
    let t: Vec<&str> = template.split('/').skip(1).collect();
    t.len() == segments.len()
        && t.iter()
            .zip(segments)
            .all(|(a, b)| (a.starts_with('{') && !b.is_empty()) || a == b)
}

/// The labels of a request's answer time: its route's method and template from [`ROUTES`], or
/// `(unmatched)` for a path no route has (404, 405).
fn route_labels(method: &str, call: Option<Call<'_>>) -> ApiRoute {
    let unmatched = "(unmatched)";
    let Some(call) = call else {
        return [("method", unmatched), ("route", unmatched)];
    };
    let template = call.template();
    let method = ROUTES
        .iter()
        .find(|(m, t)| *m == method && *t == template)
        .map_or(unmatched, |(m, _)| *m);
    [("method", method), ("route", template)]
}

/// What serving a request learnt about the connection.
#[derive(Debug, Default)]
struct Request {
    /// A HEAD: the answer goes without its body.
    head_only: bool,
    /// The client would send another request, and the stream is where it begins (no body left
    /// unread).
    keep_alive: bool,
    /// When the request head had arrived, and the labels its answer time goes under; `None`
    /// until a whole head has been read (a request that never sent one is not timed).
    timed: Option<(Instant, ApiRoute)>,
}

fn serve_connection(conn: &Active, stream: TcpStream) {
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let _ = stream.set_nodelay(true);
    let mut s = match &conn.shared.tls {
        None => Conn::Plain(stream),
        Some(config) => match rustls::ServerConnection::new(config.clone()) {
            Ok(tls) => Conn::Tls(Box::new(TlsConn { tls, sock: stream })),
            Err(_) => return,
        },
    };
    // Read from the connection and not used yet: what follows a request (pipelining).
    let mut input = Vec::new();
    for served in 0..MAX_REQUESTS {
        let mut req = Request::default();
        let reply = match answer(
            &conn.shared,
            &conn.slot,
            &mut s,
            &mut input,
            served,
            &mut req,
        ) {
            Ok(Answer::Reply(r)) => r,
            // Where the next request would start is unknown.
            Err(ReadError::Reply(r)) => {
                req.keep_alive = false;
                r
            }
            Ok(Answer::Capture(streams)) => {
                conn.shared.count(200);
                // No length: the stream ends when the connection closes (HTTP/1.1 allows it
                // with `Connection: close`). A client that stops reading fails a write within
                // WRITE_TIMEOUT, which ends the capture.
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.tcpdump.pcap\r\nConnection: close\r\n\r\n";
                if s.write_all(head.as_bytes()).is_ok() {
                    let _ = streams.copy_to(&mut s);
                }
                linger(s);
                return;
            }
            Ok(Answer::Monitor(streams)) => {
                conn.shared.count(200);
                // Like capture: no length, the stream ends when the connection closes. The
                // client sends nothing after its request, so its end of the stream closing
                // means it went away (Ctrl-C) even while no event is written.
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n";
                if s.write_all(head.as_bytes()).is_ok() {
                    let mut gone = client_gone(s.tcp());
                    let _ = streams.copy_to(&mut s, &mut gone);
                }
                linger(s);
                return;
            }
            Ok(Answer::Watch(what, timeout)) => {
                conn.shared.count(200);
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n";
                if s.write_all(head.as_bytes()).is_ok() {
                    // A stopping server ends its watches (the client watches again, elsewhere).
                    let mut client = client_gone(s.tcp());
                    let mut gone = || conn.shared.stop.load(Ordering::Acquire) || client();
                    let _ = watch(&conn.shared.mgmt, &what, timeout, &mut s, &mut gone);
                }
                linger(s);
                return;
            }
            Err(ReadError::Closed) => return,
        };
        conn.shared.count(reply.status);
        let keep_alive =
            req.keep_alive && served + 1 < MAX_REQUESTS && !conn.shared.stop.load(Ordering::SeqCst);
        let mut bytes = reply.encode(keep_alive);
        if req.head_only {
            // HEAD: the GET answer's status and headers (its Content-Length too), no body.
            bytes.truncate(bytes.len() - reply.body.len());
        }
        let sent = s.write_all(&bytes).and_then(|()| s.flush());
        // Written (or failed to be): what follows is the client's time, not ours. Streams
        // (capture, monitor, watch) returned above: counted but not timed, or they would swamp
        // every other answer time.
        if let Some((arrived, labels)) = req.timed.take() {
            conn.shared
                .latency
                .get_or_create(&labels)
                .observe(arrived.elapsed().as_secs_f64());
        }
        if !keep_alive {
            linger(s);
            return;
        }
        // Back to waiting for a head: from here the connection may be closed to make room, like
        // a new one. (The stop flag is read after that, so a stopping server that saw this
        // connection still serving does not leave it waiting.)
        if sent.is_err()
            || conn
                .slot
                .phase
                .compare_exchange(SERVING, IN_HEAD, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            || conn.shared.stop.load(Ordering::SeqCst)
        {
            return;
        }
    }
}

/// Whether the client of a stream went away: it sends nothing after its request, so its end of
/// the connection closing means it left (Ctrl-C) even while nothing is written to it. Asked of
/// the socket (poll(2)) without reading it: over TLS, bytes taken from under rustls would break
/// the stream.
fn client_gone(s: &TcpStream) -> impl FnMut() -> bool {
    use std::os::fd::AsRawFd;
    let fd = s.as_raw_fd();
    move || {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: `p` is one valid pollfd for the duration of the call (timeout 0: no wait); `fd`
        // belongs to the connection, which outlives this closure (both live in
        // `serve_connection`'s scope), and poll(2) only reports on it.
        let r = unsafe { libc::poll(&mut p, 1, 0) };
        r > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
    }
}

/// The longest a watch runs before the server ends it (the client then watches again, as
/// kubectl does): a stream is never held forever by a client that vanished without a FIN.
const WATCH_MAX: Duration = Duration::from_secs(1800);

/// `?watch=true` (or `1`) on a list, an appliance or its events, and `timeoutSeconds=N`: the
/// watch asked for and how long it may last, or `None` for a plain answer.
fn watch_query(target: &str) -> Result<Option<Duration>, Reply> {
    let query = target
        .split_once('?')
        .map(|(_, q)| q.split('#').next().unwrap_or(""))
        .unwrap_or("");
    let mut watch = false;
    let mut timeout = WATCH_MAX;
    for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        match k {
            "watch" => watch = matches!(v, "true" | "1"),
            "timeoutSeconds" => {
                let secs: u64 = v.parse().map_err(|_| {
                    Reply::error(
                        400,
                        "bad_request",
                        format!("timeoutSeconds={v:?} is not a number of seconds"),
                    )
                })?;
                timeout = Duration::from_secs(secs).min(WATCH_MAX);
            }
            _ => {}
        }
    }
    Ok(watch.then_some(timeout))
}

/// One line of a watch: what happened to which object, as Kubernetes' watch events say it.
#[derive(Serialize)]
struct WatchEvent<'a, T: Serialize> {
    #[serde(rename = "type")]
    kind: &'a str,
    object: &'a T,
}

/// What a watch follows.
#[derive(Debug, Clone)]
enum Watched {
    List,
    Get(String),
    Events(String),
}

/// Stream a watch until `timeout`, the client leaving, or a write failing: first every object as
/// `ADDED`, then each change as it happens. The server wakes on every write and after every
/// reconciler pass, so each state a pass leaves is seen (a poll would fall between some).
/// Appliances are `MODIFIED` when what an operator watches changes (status, data planes, config
/// version, units, error, backends), not with every packet counted; `DELETED` when they go (a
/// watch of one appliance or its events ends there).
fn watch(
    mgmt: &Mgmt,
    what: &Watched,
    timeout: Duration,
    out: &mut impl Write,
    gone: &mut impl FnMut() -> bool,
) -> std::io::Result<()> {
    let until = Instant::now() + timeout;
    let mut shown: BTreeMap<String, String> = BTreeMap::new();
    let mut last_event: Option<crate::model::Event> = None;
    let mut seen = mgmt.change_count();
    loop {
        let mut lines = String::new();
        let mut ended = false;
        match what {
            Watched::Events(name) => match mgmt.events(name) {
                Ok(events) => {
                    // The store keeps the newest events (a bounded list): what is new is what
                    // follows the last one sent.
                    let start = match &last_event {
                        Some(l) => events.iter().rposition(|e| e == l).map_or(0, |i| i + 1),
                        None => 0,
                    };
                    for e in &events[start..] {
                        line(&mut lines, "ADDED", e);
                    }
                    if let Some(e) = events.last() {
                        last_event = Some(e.clone());
                    }
                }
                Err(_) => ended = true,
            },
            Watched::Get(_) | Watched::List => {
                let views = match what {
                    Watched::Get(name) => mgmt.get(name).map(|v| vec![v]).unwrap_or_default(),
                    _ => mgmt.list(),
                };
                let mut now = BTreeMap::new();
                for v in &views {
                    let key = watch_key(v);
                    match shown.get(&v.name) {
                        None => line(&mut lines, "ADDED", v),
                        Some(k) if *k != key => line(&mut lines, "MODIFIED", v),
                        Some(_) => {}
                    }
                    now.insert(v.name.clone(), key);
                }
                for name in shown.keys().filter(|n| !now.contains_key(*n)) {
                    line(&mut lines, "DELETED", &serde_json::json!({ "name": name }));
                }
                ended = matches!(what, Watched::Get(_)) && views.is_empty();
                shown = now;
            }
        }
        if !lines.is_empty() {
            out.write_all(lines.as_bytes())?;
            out.flush()?;
        }
        let left = until.saturating_duration_since(Instant::now());
        if ended || left.is_zero() || gone() {
            return Ok(());
        }
        seen = mgmt.wait_change(seen, left.min(Duration::from_secs(1)));
    }
}

/// What a watched appliance is compared by: its view without the counters that move with every
/// packet.
fn watch_key(v: &crate::model::ApplianceView) -> String {
    let mut v = v.clone();
    for u in &mut v.units {
        u.packets = 0;
        u.flows = 0;
    }
    serde_json::to_string(&v).unwrap_or_default()
}

/// Append one watch line: `{"type": kind, "object": object}`.
fn line<T: Serialize>(lines: &mut String, kind: &str, object: &T) {
    lines.push_str(&serde_json::to_string(&WatchEvent { kind, object }).unwrap_or_default());
    lines.push('\n');
}

/// What a request gets: a complete reply, or a stream.
enum Answer {
    Reply(Reply),
    /// A watch on a list, an appliance or its events, for at most this long.
    Watch(Watched, Duration),
    Capture(crate::inspect::CaptureStreams),
    Monitor(crate::inspect::MonitorStreams),
}

/// Read and answer the request number `served` (from 0) of a connection.
fn answer(
    sh: &Shared,
    slot: &Slot,
    s: &mut Conn,
    input: &mut Vec<u8>,
    served: u32,
    req: &mut Request,
) -> Result<Answer, ReadError> {
    let head = read_head(s, input, (served > 0).then_some(KEEPALIVE_IDLE))?;
    let arrived = Instant::now();
    req.head_only = head.method == "HEAD";
    // A body announced is read only by the calls that take one: until then the next request's
    // start is unknown.
    req.keep_alive = head.keep_alive && head.content_length.unwrap_or(0) == 0;
    // A whole request arrived: from here on the connection is not closed to make room (unless
    // that happened already, and then there is nobody to answer).
    if slot
        .phase
        .compare_exchange(IN_HEAD, SERVING, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        return Err(ReadError::Closed);
    }
    let routed = route(&head.method, &head.target);
    req.timed = Some((
        arrived,
        route_labels(&head.method, routed.as_ref().ok().copied()),
    ));
    let call = routed?;
    if call.guarded() && !authorized(&head, &sh.token) {
        return Ok(Answer::Reply(Reply::error(
            401,
            "unauthorized",
            "missing or wrong bearer token (Authorization: Bearer <token>; `dva serve` keeps it in <state>/token)".into(),
        )));
    }
    if let (Call::Capture(..) | Call::Monitor(..), Leader::Other(api)) = (call, sh.mgmt.leader()) {
        // A capture or monitor streams for seconds: relayed through a follower it would hold two
        // connections; the leader answers it directly.
        return Ok(Answer::Reply(Reply::not_leader(
            "captures and monitors",
            format!("{}://{api}", sh.scheme()),
        )));
    }
    if let Call::List | Call::Get(_) | Call::Events(_) = call {
        let timeout = match watch_query(&head.target) {
            Ok(t) => t,
            Err(r) => return Ok(Answer::Reply(r)),
        };
        if let Some(timeout) = timeout {
            if let Leader::Other(api) = sh.mgmt.leader() {
                // The leader alone knows the units' state as it changes.
                return Ok(Answer::Reply(Reply::not_leader(
                    "watches",
                    format!("{}://{api}", sh.scheme()),
                )));
            }
            let what = match call {
                Call::Get(name) => Watched::Get(name.to_string()),
                Call::Events(name) => Watched::Events(name.to_string()),
                _ => Watched::List,
            };
            // A missing appliance is a plain 404, not an empty stream.
            if let Watched::Get(name) | Watched::Events(name) = &what {
                if let Err(e) = sh.mgmt.get(name) {
                    return Ok(Answer::Reply(Reply::api(e)));
                }
            }
            return Ok(Answer::Watch(what, timeout));
        }
    }
    if let Call::Monitor(name, query) = call {
        return Ok(match sh.mgmt.monitor(name, query) {
            Ok(streams) => Answer::Monitor(streams),
            Err(e) => Answer::Reply(Reply::api(e)),
        });
    }
    if let Call::Capture(name, query) = call {
        return Ok(match sh.mgmt.capture(name, query) {
            Ok(streams) => Answer::Capture(streams),
            Err(e) => Answer::Reply(Reply::api(e)),
        });
    }
    let body = if call.has_body() {
        let body = read_body(s, &head, input, Deadline::after(BODY_TIMEOUT, "body"))?;
        req.keep_alive = head.keep_alive;
        body
    } else {
        String::new()
    };
    if call.leader_only() {
        match sh.mgmt.settled_leader(ELECTION_WAIT) {
            Leader::Me => {}
            Leader::Other(_) if head.forwarded => {
                return Ok(Answer::Reply(Reply::error(
                    503,
                    "no_leader",
                    "forwarded to a replica that does not lead (an election is settling); retry"
                        .into(),
                )))
            }
            Leader::Other(api) => {
                return Ok(Answer::Reply(forward(
                    &api,
                    &head,
                    &body,
                    sh.forward_tls.as_ref(),
                )))
            }
            Leader::Unknown => {
                return Ok(Answer::Reply(Reply::error(
                    503,
                    "no_leader",
                    "no dva serve replica leads right now (an election is settling); retry".into(),
                )))
            }
        }
    }
    if let Call::Join(_) = call {
        // The API token, or a one-time join token (used up here, whatever the join's outcome).
        let ok = authorized(&head, &sh.token)
            || head
                .bearer()
                .is_some_and(|t| !t.is_empty() && sh.mgmt.use_join_token(t));
        if !ok {
            return Ok(Answer::Reply(Reply::error(
                401,
                "unauthorized",
                "missing, used, expired or wrong join token (Authorization: Bearer <token>; \
                 `dva join-token` makes one)"
                    .into(),
            )));
        }
    }
    let opts = match write_options(&head) {
        Ok(o) => o,
        Err(r) => return Ok(Answer::Reply(r)),
    };
    // Mgmt does not panic on input; should a bug make it, the caller gets a 500 and the server
    // keeps serving.
    Ok(Answer::Reply(
        std::panic::catch_unwind(AssertUnwindSafe(|| execute(sh, call, &body, opts)))
            .unwrap_or_else(|_| {
                Reply::error(500, "internal", "the call failed unexpectedly".into())
            }),
    ))
}

/// How long a call that needs the leader waits for an election to settle before it is refused:
/// a dead leader's lease runs out in [`crate::etcd::LEASE_TTL`], an etcd member's death holds up
/// renewals while etcd elects its own leader (up to twice its 1 s election timeout).
const ELECTION_WAIT: Duration = Duration::from_secs(6);

/// How long a forwarded call may take at the leader (a delete waits for its units to stop).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(120);

/// Relay a call to the leader's API at `api` (`HOST:PORT`) and its answer back: the method,
/// target (query included), body, and the headers that matter (Authorization, If-Match). Over
/// TLS with `tls` (we serve TLS, so does the leader), checking its certificate names `api`'s
/// address.
fn forward(api: &str, head: &Head, body: &str, tls: Option<&Arc<rustls::ClientConfig>>) -> Reply {
    let unavailable = |why: String| {
        Reply::error(
            503,
            "no_leader",
            format!("forwarding to the leader at {api}: {why}; retry"),
        )
    };
    let addr = match api.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(e) => return unavailable(format!("not an address ({e})")),
    };
    let host = addr.ip().to_string();
    let mut s = match crate::client::connect(addr, &host, tls, Duration::from_secs(2)) {
        Ok(s) => s,
        Err(e) => return unavailable(format!("{e:#}")),
    };
    let _ = s.tcp().set_read_timeout(Some(FORWARD_TIMEOUT));
    let _ = s.tcp().set_write_timeout(Some(WRITE_TIMEOUT));
    let mut req = format!(
        "{} {} HTTP/1.1\r\nHost: {api}\r\nX-Dva-Forwarded: 1\r\nConnection: close\r\n\
         Content-Length: {}\r\n",
        head.method,
        head.target,
        body.len()
    );
    if let Some(a) = &head.authorization {
        req += &format!("Authorization: {a}\r\n");
    }
    if let Some(m) = &head.if_match {
        req += &format!("If-Match: {m}\r\n");
    }
    req += "\r\n";
    req += body;
    if let Err(e) = s.write_all(req.as_bytes()) {
        return unavailable(e.to_string());
    }
    let mut answer = Vec::new();
    // The leader closes after its answer (asked to: `Connection: close`); the answer is bounded
    // like a request body, since a leader could be anything listening at that address.
    if let Err(e) = (&mut s).take(MAX_BODY as u64 * 8).read_to_end(&mut answer) {
        return unavailable(e.to_string());
    }
    parse_answer(&answer).unwrap_or_else(|| unavailable("a malformed answer".into()))
}

/// An HTTP answer from another replica, as a [`Reply`] (the content types are ours, so they map
/// onto the ones this server sends).
fn parse_answer(bytes: &[u8]) -> Option<Reply> {
    let (head_len, terminator) = head_end(bytes)?;
    let body_at = head_len + terminator;
    let head = std::str::from_utf8(&bytes[..head_len]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let mut content_type = "application/json";
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("content-type") {
            let value = value.trim();
            content_type = if value == dva_unit::metrics::CONTENT_TYPE {
                dva_unit::metrics::CONTENT_TYPE
            } else if value.starts_with("text/plain") {
                "text/plain"
            } else {
                "application/json"
            };
        }
    }
    let body = String::from_utf8_lossy(&bytes[body_at..]).into_owned();
    Some(Reply::new(status, content_type, body))
}

/// `?dryRun=All` (kubectl's spelling; `true` and `1` too) and `If-Match: "<generation>"`.
fn write_options(head: &Head) -> Result<WriteOptions, Reply> {
    let mut opts = WriteOptions::default();
    if let Some((_, query)) = head.target.split_once('?') {
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            // Unknown parameters are ignored, as the route ignores the query.
            if k != "dryRun" {
                continue;
            }
            opts.dry_run = match v {
                "All" | "all" | "true" | "1" | "" => true,
                "false" | "0" => false,
                other => {
                    return Err(Reply::error(
                        400,
                        "bad_request",
                        format!("dryRun={other:?}: use dryRun=All"),
                    ))
                }
            };
        }
    }
    if let Some(v) = head.if_match.as_deref() {
        let t = v.trim();
        let t = t.strip_prefix("W/").unwrap_or(t).trim_matches('"');
        opts.if_match = Some(t.parse().map_err(|_| {
            Reply::error(
                400,
                "bad_request",
                format!("If-Match: {v:?} is not a generation (expected e.g. \"3\")"),
            )
        })?);
    }
    Ok(opts)
}

fn execute(sh: &Shared, call: Call<'_>, body: &str, opts: WriteOptions) -> Reply {
    let mgmt = &sh.mgmt;
    match call {
        Call::Health => Reply::new(200, "text/plain", "ok\n".into()),
        Call::Ready => match mgmt.ready() {
            Ok(()) => Reply::new(200, "text/plain", "ready\n".into()),
            Err(why) => Reply::error(503, "not-ready", why),
        },
        Call::OpenApi => Reply::new(200, "application/json", OPENAPI.into()),
        Call::Ui => Reply::ui("text/html; charset=utf-8", UI_HTML),
        Call::UiScript => Reply::ui("text/javascript; charset=utf-8", UI_JS),
        Call::UiStyle => Reply::ui("text/css; charset=utf-8", UI_CSS),
        Call::Metrics => {
            let answered = sh
                .answered
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            Reply::new(
                200,
                dva_unit::metrics::CONTENT_TYPE,
                mgmt.metrics(&answered, &sh.latency),
            )
        }
        Call::List => Reply::json(200, &mgmt.list()),
        Call::Apply => Reply::from(mgmt.apply_with(body, opts)),
        Call::Get(name) => Reply::from(mgmt.get(name)),
        Call::Put(name) => {
            // A spec that does not parse is reported by apply, with the field it stumbled on.
            if let Ok(spec) = dva_proto::ApplianceSpec::from_yaml(body) {
                if spec.name() != name {
                    return Reply::error(
                        422,
                        "invalid",
                        format!(
                            "metadata.name: {:?} does not match the path's {name:?}",
                            spec.name()
                        ),
                    );
                }
            }
            Reply::from(mgmt.apply_with(body, opts))
        }
        Call::Delete(name) => match mgmt.delete_with(name, opts) {
            Ok(()) if opts.dry_run => {
                Reply::json(200, &serde_json::json!({ "deleted": name, "dryRun": true }))
            }
            Ok(()) => Reply::json(200, &serde_json::json!({ "deleted": name })),
            Err(e) => Reply::api(e),
        },
        Call::Scale(name) => match serde_json::from_str::<ScaleRequest>(body) {
            Ok(r) => Reply::from(mgmt.scale_with(name, &r, opts)),
            Err(e) => Reply::error(400, "bad_request", format!("scale request: {e}")),
        },
        Call::Units(name) => Reply::from(mgmt.units(name)),
        Call::Events(name) => Reply::from(mgmt.events(name)),
        Call::Stats(name) => Reply::from(mgmt.stats(name)),
        Call::Flows(name, query) => Reply::from(mgmt.flows(name, query)),
        Call::UnitConfig(name, unit) => Reply::from(mgmt.unit_config(name, unit)),
        Call::Hosts => Reply::json(200, &mgmt.hosts()),
        Call::RemoveHost(name) => match mgmt.remove_host(name) {
            Ok(()) => Reply::json(200, &serde_json::json!({ "deleted": name })),
            Err(e) => Reply::api(e),
        },
        Call::Join(name) => Reply::from(mgmt.join(name, body)),
        Call::JoinToken => Reply::from(mgmt.create_join_token()),
        // Streamed by `answer` itself; never reaches here.
        Call::Capture(..) | Call::Monitor(..) => {
            Reply::error(500, "internal", "capture and monitor are streamed".into())
        }
    }
}

/// Close after the answer without resetting it away: stop sending, then drain what the client
/// still sends (a body we refused) for a short while, from the TCP stream itself (over TLS too:
/// it is only thrown away).
fn linger(mut conn: Conn) {
    conn.shutdown_write();
    let mut s = conn.tcp();
    let until = Instant::now() + LINGER;
    let mut sink = [0u8; 16 << 10];
    let mut drained = 0usize;
    while drained <= MAX_BODY {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match s.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n,
        }
    }
}

/// The API's TLS configuration: TLS 1.3 and 1.2 (what curl and browsers speak; nothing older),
/// the `ring` provider, no client certificates (clients are known by the token), HTTP/1.1 by
/// ALPN. `cert_pem`: the server's certificate, then the chain up to its CA.
pub fn tls_server_config(
    cert_pem: &str,
    key_pem: &str,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("the certificate is not PEM: {e}"))?;
    anyhow::ensure!(!chain.is_empty(), "no certificate (PEM) found");
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("no private key (PEM) found: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the certificate and the key do not make a pair")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// [`tls_server_config`] from PEM files (`dva serve --tls-cert FILE --tls-key FILE`).
pub fn tls_server_config_from_files(
    cert: &Path,
    key: &Path,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let read =
        |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    tls_server_config(&read(cert)?, &read(key)?)
        .with_context(|| format!("{} and {}", cert.display(), key.display()))
}

/// TLS with no files to make (`dva serve --tls-auto`): a certificate from the installation CA
/// naming `names` (the addresses and host names clients dial), kept in `<state>/pki/api.crt` and
/// `api.key` (0600). Returns the server configuration and the CA's certificate (PEM), which
/// clients trust (the client file carries it).
pub fn auto_tls(
    mgmt: &Mgmt,
    names: &[String],
) -> anyhow::Result<(Arc<rustls::ServerConfig>, String)> {
    let pki = &mgmt.inner.pki;
    let issued = pki.issue_server(names)?;
    crate::pki::write_server_files(&mgmt.inner.opts.state_dir.join("pki"), &issued)?;
    let config = tls_server_config(&issued.cert_pem, &issued.key_pem)?;
    Ok((config, pki.ca_pem().to_string()))
}

/// The API token: `<state>/token`, 32 random bytes in hex, created (mode 0600) on first start and
/// reused after.
pub fn load_or_create_token(state_dir: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::DirBuilderExt;
    let path = state_dir.join("token");
    match std::fs::read_to_string(&path) {
        Ok(t) if t.trim().len() >= 32 => return Ok(t.trim().to_string()),
        // Empty or truncated (a crash while creating it): make a new one.
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let mut raw = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .context("reading /dev/urandom")?;
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    save_token(state_dir, &token)?;
    Ok(token)
}

/// Write `<state>/token` (mode 0600), replacing it: e.g. with the token the other replicas on
/// etcd accept.
pub fn save_token(state_dir: &Path, token: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = state_dir.join("token");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(token.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Where the CLI finds the server and its token (kubeconfig-like), written by `dva serve`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientConfig {
    /// e.g. `http://127.0.0.1:7080`, or `https://...` with TLS
    pub server: String,
    pub token: String,
    /// The CA (PEM) whose certificate the server must present over https: the installation CA
    /// with `dva serve --tls-auto`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
}

impl ClientConfig {
    /// `$DVA_CLIENT_CONFIG`, else `$HOME/.dva/client.json` (`HOME` defaulting to `/root`).
    pub fn default_path() -> PathBuf {
        if let Some(p) = std::env::var_os("DVA_CLIENT_CONFIG") {
            return PathBuf::from(p);
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
        PathBuf::from(home).join(".dva").join("client.json")
    }

    /// Write the file (mode 0600, holding a secret), creating its directory.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("writing {}", path.display()))?;
        // An older file keeps its mode through open(): tighten it.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(serde_json::to_string_pretty(self)?.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
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

    /// [`ROUTES`] is what the router serves: every entry routes, and every other method on its
    /// path is a 405.
    #[test]
    fn the_router_serves_exactly_the_routes() {
        const METHODS: [&str; 7] = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"];
        for (_, template) in ROUTES {
            let path = template.replace("{name}", "edge-fw");
            for m in METHODS {
                let listed = ROUTES.iter().any(|(rm, rt)| *rm == m && rt == template);
                match route(m, &path) {
                    Ok(_) => assert!(listed, "{m} {path} is served but not in ROUTES"),
                    Err(r) => {
                        assert!(!listed, "{m} {path} is in ROUTES but not served");
                        assert_eq!(r.status, 405, "{m} {path}");
                    }
                }
            }
        }
        assert_eq!(route("GET", "/v1/appliances/x"), Ok(Call::Get("x")));
        assert_eq!(route("GET", "/v1/appliances/x/?a=b"), Ok(Call::Get("x")));
        // Answer times are labelled by the ROUTES entry a call came in by, never the raw path.
        for (m, template) in ROUTES {
            let path = template.replace("{name}", "edge-fw").replace("{unit}", "3");
            let call = route(m, &path).ok();
            assert_eq!(
                route_labels(m, call),
                [("method", *m), ("route", *template)],
                "{m} {path}"
            );
        }
        assert_eq!(
            route_labels("GET", route("GET", "/v1/nope\"x").ok()),
            [("method", "(unmatched)"), ("route", "(unmatched)")]
        );
        assert_eq!(route("GET", "/v1/appliances?x"), Ok(Call::List));
        for p in [
            "/",
            "",
            "/v1",
            "/v1/appliances//scale",
            "/v1/appliances/x/y",
            "//v1/appliances",
        ] {
            assert_eq!(route("GET", p).map_err(|r| r.status), Err(404), "{p:?}");
        }
    }

    #[test]
    fn templates_and_tokens() {
        // Prometheus sends the token (`authorization` in its scrape config): /metrics needs it.
        assert_eq!(route("GET", "/metrics"), Ok(Call::Metrics));
        assert!(Call::Metrics.guarded());
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
        let head = |a: &str| Head {
            authorization: Some(a.into()),
            ..Head::default()
        };
        assert!(authorized(&head("Bearer tok"), "tok"));
        assert!(authorized(&head("bearer  tok "), "tok"));
        assert!(!authorized(&head("Basic tok"), "tok"));
        assert!(!authorized(&head("Bearer"), "tok"));
        assert!(!authorized(&head("Bearer to"), "tok"));
        assert!(!authorized(&Head::default(), "tok"));
    }

    #[test]
    fn heads_parse_or_are_refused() {
        let h = parse_head(
            b"POST /v1/appliances HTTP/1.1\r\nHost: x\r\ncontent-length: 12\r\nAuthorization: Bearer t\r\nExpect: 100-continue",
        )
        .expect("valid head");
        assert_eq!(
            (h.method.as_str(), h.target.as_str(), h.content_length),
            ("POST", "/v1/appliances", Some(12))
        );
        assert_eq!(h.authorization.as_deref(), Some("Bearer t"));
        assert!(h.expect_continue);
        let status = |b: &[u8]| parse_head(b).map(|_| 0).unwrap_or_else(|r| r.status);
        assert_eq!(status(b"GET / HTTP/1.0\nHost: x"), 0);
        assert_eq!(status(b"GET / HTTP/2.0"), 505);
        assert_eq!(status(b"GET /"), 400);
        assert_eq!(status(b"GET  / HTTP/1.1"), 400);
        assert_eq!(status(b"get / HTTP/1.1"), 400);
        assert_eq!(status(b"GET http://x/ HTTP/1.1"), 400);
        assert_eq!(status(b"GET / HTTP/1.1\r\nno colon"), 400);
        assert_eq!(status(b"GET / HTTP/1.1\r\nContent-Length: -1"), 400);
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2"),
            400
        );
        assert_eq!(status(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked"), 411);
        assert_eq!(status(b"GET / HTTP/1.1\r\n\xff: x"), 400);
        let many = format!("GET / HTTP/1.1{}", "\r\nX: y".repeat(MAX_HEADERS + 1));
        assert_eq!(status(many.as_bytes()), 431);
        let huge = parse_head(b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999")
            .map(|h| h.content_length);
        assert_eq!(huge.map_err(|r| r.status), Err(400));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some((14, 4)));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\nbody"), Some((14, 2)));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
    }

    /// The web view's files need no token (they hold no data) and carry the headers that keep
    /// anything but our own script from running in the page; they show data only through the
    /// DOM's text, never as markup.
    #[test]
    fn the_web_view_is_open_locked_down_and_inert() {
        for (path, call) in [
            ("/ui", Call::Ui),
            ("/ui/", Call::Ui),
            ("/ui/app.js", Call::UiScript),
            ("/ui/app.css", Call::UiStyle),
        ] {
            assert_eq!(route("GET", path), Ok(call), "{path}");
            assert!(!call.guarded(), "{path}");
        }
        assert!(route("GET", "/v1/appliances/x/stats").is_ok_and(Call::guarded));
        let text = String::from_utf8(Reply::ui("text/html", UI_HTML).to_bytes()).expect("utf8");
        for want in [
            "\r\nContent-Security-Policy: default-src 'none'; script-src 'self'; style-src 'self'; ",
            "\r\nX-Content-Type-Options: nosniff\r\n",
            "\r\nCache-Control: no-store\r\n",
            "\r\nX-Frame-Options: DENY\r\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in {text}");
        }
        assert!(!text.contains("unsafe-inline"));
        // The API's own answers carry none of them (JSON is never rendered as a page).
        let api = String::from_utf8(Reply::json(200, &1).to_bytes()).expect("utf8");
        assert!(!api.contains("Content-Security-Policy"), "{api}");
        // The CSP allows no inline script or style, so the page must have none (they would be
        // silently refused); and the script builds the DOM from text nodes only.
        assert!(UI_HTML.contains("<script src=\"/ui/app.js\""));
        for inline in ["<script>", "<style", " style=", " onclick=", "javascript:"] {
            assert!(!UI_HTML.contains(inline), "inline {inline:?} in index.html");
        }
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!UI_JS.contains(sink), "{sink} in app.js");
        }
    }

    #[test]
    fn clients_are_told_apart_by_address_and_ipv6_slash_64() {
        let key = |s: &str| ClientKey::of(s.parse().expect("address"));
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.1"), key("192.0.2.1"));
        assert_ne!(key("192.0.2.1"), key("192.0.2.2"));
    }

    /// A follower relays the leader's answer as it came: status, type and body.
    #[test]
    fn forwarded_answers_parse() {
        let r = Reply::error(409, "conflict", "appliance x is being deleted".into());
        assert_eq!(parse_answer(&r.to_bytes()), Some(r));
        let ok = Reply::new(200, "text/plain", "ready\n".into());
        assert_eq!(parse_answer(&ok.to_bytes()), Some(ok));
        let metrics = Reply::new(200, dva_unit::metrics::CONTENT_TYPE, "# EOF\n".into());
        assert_eq!(parse_answer(&metrics.to_bytes()), Some(metrics));
        for junk in [
            &b""[..],
            b"HTTP/1.1 200 OK\r\n",
            b"garbage\r\n\r\n",
            b"HTTP/1.1 abc\r\n\r\n",
        ] {
            assert_eq!(parse_answer(junk), None, "{junk:?}");
        }
    }

    /// Replicas serving TLS forward over TLS: the leader's certificate must chain to the CA
    /// trusted and name the address forwarded to; the call arrives whole, marked forwarded.
    #[test]
    fn forwarding_speaks_tls_to_a_leader_the_ca_vouches_for() {
        let pki = crate::pki::Pki::generate().expect("CA");
        let leader_cert = pki.issue_server(&["127.0.0.1".into()]).expect("cert");
        let config =
            tls_server_config(&leader_cert.cert_pem, &leader_cert.key_pem).expect("config");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let api = listener.local_addr().expect("addr").to_string();
        // The leader: answers each connection's request with what it received.
        let leader = std::thread::spawn(move || {
            let mut got = Vec::new();
            for _ in 0..2 {
                let (sock, _) = listener.accept().expect("accept");
                let conn = rustls::ServerConnection::new(config.clone()).expect("tls");
                let mut s = rustls::StreamOwned::new(conn, sock);
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while head_end(&req).is_none() {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                if req.is_empty() {
                    continue;
                }
                let text = String::from_utf8_lossy(&req).into_owned();
                let _ = s.write_all(&Reply::new(200, "text/plain", text.clone()).to_bytes());
                s.conn.send_close_notify();
                let _ = s.flush();
                got.push(text);
            }
            got
        });
        let head = Head {
            method: "DELETE".into(),
            target: "/v1/appliances/x".into(),
            authorization: Some("Bearer t".into()),
            ..Head::default()
        };
        let trusted = crate::client::tls_client_config(pki.ca_pem()).expect("client");
        let r = forward(&api, &head, "", Some(&trusted));
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(
            r.body.starts_with("DELETE /v1/appliances/x HTTP/1.1\r\n"),
            "{}",
            r.body
        );
        assert!(r.body.contains("\r\nX-Dva-Forwarded: 1\r\n"), "{}", r.body);
        assert!(
            r.body.contains("\r\nAuthorization: Bearer t\r\n"),
            "{}",
            r.body
        );
        // A leader this CA did not vouch for is not told the token.
        let other = crate::pki::Pki::generate().expect("CA");
        let untrusted = crate::client::tls_client_config(other.ca_pem()).expect("client");
        let r = forward(&api, &head, "", Some(&untrusted));
        assert_eq!(r.status, 503, "{}", r.body);
        assert!(r.body.contains("TLS handshake"), "{}", r.body);
        let got = leader.join().expect("leader");
        assert_eq!(got.len(), 1, "{got:?}");
    }

    /// A call that reaches a non-leader already forwarded once is not forwarded again.
    #[test]
    fn the_forwarded_mark_is_read() {
        let head = parse_head(b"GET /v1/appliances HTTP/1.1\r\nX-Dva-Forwarded: 1").expect("head");
        assert!(head.forwarded);
        let head = parse_head(b"GET /v1/appliances HTTP/1.1").expect("head");
        assert!(!head.forwarded);
    }

    #[test]
    fn replies_are_complete_http() {
        let r = Reply::error(401, "unauthorized", "no".into());
        let text = String::from_utf8(r.to_bytes()).expect("utf8");
        assert!(text.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{text}");
        assert!(text.contains("\r\nWWW-Authenticate: Bearer\r\n"), "{text}");
        assert!(text.contains(&format!("\r\nContent-Length: {}\r\n", r.body.len())));
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("json");
        assert_eq!(v["error"]["code"], "unauthorized");
        assert_eq!(v["error"]["message"], "no");
    }
}
